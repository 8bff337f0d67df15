//! The `reassigned.v1.ReassignedNumbers` handlers: convert, call the domain
//! and the store, convert back.

use std::collections::VecDeque;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use futures_util::stream::{FuturesOrdered, ReadyChunks};
use futures_util::{FutureExt, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use super::convert::status_names;
use super::convert::{answer_message, status_message};
use super::note::{self, CallNote};
use super::pb::reassigned_numbers_server::ReassignedNumbers;
use super::receipts::{CallInfo, ReceiptPlan};
use super::{ApiError, pb};
use crate::audit::{AuditError, AuditRecord, Auditor};
use crate::domain::{self, Answer, Check, Date, FieldViolation};
use crate::identity::Principal;
use crate::quota::Quotas;
use crate::receipt::{ReceiptError, ReceiptSigner};
use crate::store::{Store, StoreError};

/// Most requests of a stream answered with one store round trip.
const STREAM_CHUNK: usize = 512;
/// Results buffered per stream before the server stops reading requests.
const STREAM_BUFFER: usize = 1024;
/// Chunk lookups of one stream waiting on the store at once. Chunks read
/// while that many wait are not looked up: their items are answered
/// UNAVAILABLE, so the stream keeps reading (HTTP/2 closes a connection
/// whose peer keeps sending small DATA frames that are not read) and memory
/// stays bounded however long the store stalls.
const STREAM_IN_FLIGHT: usize = 16;
/// With [`STREAM_IN_FLIGHT`] lookups waiting, the stream stops reading for
/// at most this long (the oldest lookup's wait) before it sheds: a short
/// pause is harmless to HTTP/2 and spares a busy but healthy store spurious
/// UNAVAILABLE items.
const STREAM_SHED_AFTER: std::time::Duration = std::time::Duration::from_millis(100);

/// Limits and rules of the service.
#[derive(Clone, Debug)]
pub struct ServiceOptions {
    /// Most checks accepted in one BatchCheckNumbers call.
    pub max_batch: usize,
    /// Data older than this many days (`today - as_of`) answers NO_DATA.
    pub max_staleness_days: u32,
    /// Per-platform quotas; `None`: unlimited.
    pub quotas: Option<std::sync::Arc<Quotas>>,
}

impl Default for ServiceOptions {
    fn default() -> Self {
        Self {
            max_batch: crate::domain::DEFAULT_MAX_BATCH,
            max_staleness_days: crate::domain::DEFAULT_MAX_STALENESS_DAYS,
            quotas: None,
        }
    }
}

/// One check answered by [`ReassignedService::check_one`].
#[derive(Debug)]
pub struct Answered {
    /// The domain answer.
    pub answer: Answer,
    /// Its response message (receipt included when asked for).
    pub message: pb::CheckNumberResponse,
    /// The mirror's metadata the answer was made from (`None`: empty).
    pub meta: Option<Arc<domain::MirrorMeta>>,
}

/// The `ReassignedNumbers` service over any [`Store`].
#[derive(Clone)]
pub struct ReassignedService<S> {
    store: S,
    options: ServiceOptions,
    /// Signs receipts when asked; `None`: asking is FAILED_PRECONDITION.
    receipts: Option<std::sync::Arc<ReceiptSigner>>,
    /// Takes one record per answer; `None`: no audit trail.
    audit: Option<std::sync::Arc<Auditor>>,
    /// The federation, for GetMirrorStatus' sources; `None`: the register only.
    federation: Option<std::sync::Arc<crate::federation::Federation>>,
}

impl<S: Store> ReassignedService<S> {
    /// A service answering from `store`.
    pub fn new(store: S, options: ServiceOptions) -> Self {
        Self {
            store,
            options,
            receipts: None,
            audit: None,
            federation: None,
        }
    }

    /// Lists the federation's sources in GetMirrorStatus.
    pub fn with_federation(
        mut self,
        federation: Option<std::sync::Arc<crate::federation::Federation>>,
    ) -> Self {
        self.federation = federation;
        self
    }

    /// Audits every answer with `auditor` (none: no audit trail).
    pub fn with_audit(mut self, auditor: Option<std::sync::Arc<Auditor>>) -> Self {
        self.audit = auditor;
        self
    }

    /// The caller and request id, read (and an id generated) only when this
    /// server signs receipts or keeps an audit trail: the hot path of a plain
    /// check does no such work.
    fn call_info<T>(&self, request: &Request<T>) -> CallInfo {
        self.call_info_with(|| CallInfo::of(request))
    }

    /// `call_info` for any face: `read` runs only when this server
    /// signs receipts or keeps an audit trail.
    pub fn call_info_with(&self, read: impl FnOnce() -> CallInfo) -> CallInfo {
        if self.receipts.is_none() && self.audit.is_none() {
            return CallInfo::default();
        }
        read()
    }

    /// The receipt plan of a call from `call` (see
    /// [`ReceiptPlan::for_call`]).
    pub fn receipt_plan(&self, call: CallInfo, wanted: bool, all: bool) -> Result<ReceiptPlan, ApiError> {
        Ok(ReceiptPlan::for_call(self.receipts.as_ref(), call, wanted, all)?)
    }

    /// The one single-check path (gRPC CheckNumber, the REST check): looks
    /// `check` up, answers it, and makes its response message (with its
    /// receipt if `want_receipt`) and audit record (see `respond`).
    /// `phone_number` is the number as the client wrote it.
    pub async fn check_one(
        &self,
        plan: &ReceiptPlan,
        check: Check,
        phone_number: String,
        want_receipt: bool,
        today: Date,
        note: Option<&CallNote>,
    ) -> Result<Answered, ApiError> {
        if let Some(note) = note {
            note.number(&check.number);
        }
        let lookup = match note::timed_now(note, || self.store.lookup_now(check.number)) {
            Some(found) => found?,
            // The store must go out (e.g. a Redis round trip). Its future is
            // boxed so that this call's own future, moved a few times per
            // call, stays small for the calls answered in process.
            None => Box::pin(note::timed(note, self.store.lookup(check.number))).await?,
        };
        let answer = self.answer(check, lookup.found, lookup.meta.as_deref(), today);
        tracing::debug!(status = ?answer.status, "checked");
        let message = self.respond(plan, phone_number, want_receipt, &answer, None)?;
        Ok(Answered {
            answer,
            message,
            meta: lookup.meta,
        })
    }

    /// The one batch path (gRPC BatchCheckNumbers, the REST batch): charges
    /// the caller (one request; every check, unless the batch is refused for
    /// its size), checks the 1..=`max_batch` rule and answers every check,
    /// each with its result or its own error. `call` is read only when
    /// needed (see [`Self::call_info_with`]). `note`: the call's
    /// observation (access log, trace), if any.
    pub async fn check_batch(
        &self,
        principal: Option<&Principal>,
        call: impl FnOnce() -> CallInfo,
        checks: Vec<pb::CheckNumberRequest>,
        want_receipts: bool,
        note: Option<&CallNote>,
    ) -> Result<Vec<pb::BatchCheckResult>, ApiError> {
        let size = checks.len();
        let numbers = if size <= self.options.max_batch {
            size as u64
        } else {
            0
        };
        self.charge(principal, 1, numbers).await?;
        let wanted = checks.iter().any(|c| c.want_receipt);
        let plan = self.receipt_plan(self.call_info_with(call), wanted, want_receipts)?;
        if checks.is_empty() || checks.len() > self.options.max_batch {
            return Err(ApiError::InvalidArgument(vec![FieldViolation {
                field: "checks",
                reason: format!(
                    "must hold 1 to {} checks, got {}",
                    self.options.max_batch,
                    checks.len()
                ),
            }]));
        }
        if let Some(note) = note {
            note.numbers(checks.len() as u64);
        }
        Ok(note::timed(note, self.check_many(checks, &plan, 0)).await?)
    }

    /// Hands the record of `answer` to the audit trail (never waits).
    fn audit(&self, call: &CallInfo, answer: &Answer) -> Result<(), AuditError> {
        let Some(auditor) = &self.audit else {
            return Ok(());
        };
        let time_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        auditor.record(AuditRecord {
            time_ms,
            request_id: call.request_id.clone(),
            platform: call.platform.clone().unwrap_or_default(),
            number_hmac: auditor.number_hmac(&answer.check.number.to_string()),
            since: answer.check.since.to_string(),
            status: status_names(answer.status).0.to_owned(),
            data_as_of: answer.as_of.map(|d| d.to_string()).unwrap_or_default(),
            reason: String::new(),
        })
    }

    /// The one per-answer path of every check method (single, batch,
    /// stream): `answer` becomes the response message to `phone_number` (as
    /// the client wrote it), with its receipt if `wanted` (by the check or
    /// the plan), and its audit record. `index`: the item's position in a
    /// batch or stream (`None`: a single check).
    fn respond(
        &self,
        plan: &ReceiptPlan,
        phone_number: String,
        wanted: bool,
        answer: &Answer,
        index: Option<u64>,
    ) -> Result<pb::CheckNumberResponse, ApiError> {
        let receipt = plan.receipt(wanted, answer, index)?.unwrap_or_default();
        self.audit(&plan.call, answer)?;
        Ok(answer_message(phone_number, answer, receipt))
    }

    /// Signs receipts with `signer` (none: receipts are refused).
    pub fn with_receipts(mut self, signer: Option<std::sync::Arc<ReceiptSigner>>) -> Self {
        self.receipts = signer;
        self
    }

    /// Answers many checks with one store round trip; invalid items get their
    /// own error, and so do receipts (per `plan`) that cannot be made.
    /// `first_index` is the position of `checks[0]` in the call (for receipt
    /// ids). Fails only if the store cannot answer.
    async fn check_many(
        &self,
        checks: Vec<pb::CheckNumberRequest>,
        plan: &ReceiptPlan,
        first_index: u64,
    ) -> Result<Vec<pb::BatchCheckResult>, StoreError> {
        let today = Date::today_utc();
        let parsed: Vec<Result<Check, Vec<FieldViolation>>> = checks
            .iter()
            .map(|c| Check::parse(&c.phone_number, &c.since, today))
            .collect();
        let numbers: Vec<_> = parsed.iter().flatten().map(|c| c.number).collect();
        let lookup = self.store.lookup_many(&numbers).await?;
        let meta = lookup.meta.as_deref();
        let mut found = lookup.found.into_iter();
        Ok(checks
            .into_iter()
            .zip(parsed)
            .zip(first_index..)
            .map(|((request, parsed), index)| {
                let result = match parsed {
                    Ok(check) => {
                        let answer = self.answer(check, found.next().flatten(), meta, today);
                        let wanted = request.want_receipt;
                        match self.respond(plan, request.phone_number, wanted, &answer, Some(index)) {
                            Ok(message) => pb::batch_check_result::Result::Answer(message),
                            Err(e) => pb::batch_check_result::Result::Error(e.into()),
                        }
                    }
                    Err(violations) => {
                        pb::batch_check_result::Result::Error(ApiError::InvalidArgument(violations).into())
                    }
                };
                pb::BatchCheckResult { result: Some(result) }
            })
            .collect())
    }

    /// Charges the caller's quotas with `requests` requests and `numbers`
    /// numbers (see [`crate::quota`]); skipped without quotas or
    /// without a [`Principal`].
    pub async fn charge(
        &self,
        principal: Option<&Principal>,
        requests: u32,
        numbers: u64,
    ) -> Result<(), ApiError> {
        let (Some(quotas), Some(principal)) = (&self.options.quotas, principal) else {
            return Ok(());
        };
        // Boxed: the quota check's future (a Redis round trip when quotas are
        // shared) would otherwise enlarge the future of every call.
        Ok(Box::pin(quotas.check(&principal.platform.id, requests, numbers)).await?)
    }

    /// The domain answer to `check` (see [`Answer::new`]).
    fn answer(
        &self,
        check: Check,
        disconnect: Option<Date>,
        meta: Option<&domain::MirrorMeta>,
        today: Date,
    ) -> Answer {
        Answer::new(check, disconnect, meta, today, self.options.max_staleness_days)
    }
}

#[tonic::async_trait]
impl<S: Store + Clone> ReassignedNumbers for ReassignedService<S> {
    async fn check_number(
        &self,
        request: Request<pb::CheckNumberRequest>,
    ) -> Result<Response<pb::CheckNumberResponse>, Status> {
        self.charge(request.extensions().get(), 1, 1).await?;
        let note = request.extensions().get::<CallNote>().cloned();
        let wanted = request.get_ref().want_receipt;
        let plan = self.receipt_plan(self.call_info(&request), wanted, false)?;
        let pb::CheckNumberRequest {
            phone_number,
            since,
            want_receipt,
        } = request.into_inner();
        let today = Date::today_utc();
        let check = Check::parse(&phone_number, &since, today).map_err(ApiError::InvalidArgument)?;
        let answered = self
            .check_one(&plan, check, phone_number, want_receipt, today, note.as_ref())
            .await?;
        Ok(Response::new(answered.message))
    }

    async fn batch_check_numbers(
        &self,
        request: Request<pb::BatchCheckNumbersRequest>,
    ) -> Result<Response<pb::BatchCheckNumbersResponse>, Status> {
        let principal = request.extensions().get::<Principal>().cloned();
        let note = request.extensions().get::<CallNote>().cloned();
        let call = self.call_info(&request);
        let pb::BatchCheckNumbersRequest {
            checks,
            want_receipts,
        } = request.into_inner();
        let results = self
            .check_batch(principal.as_ref(), || call, checks, want_receipts, note.as_ref())
            .await?;
        Ok(Response::new(pb::BatchCheckNumbersResponse { results }))
    }

    type StreamCheckNumbersStream = ReceiverStream<Result<pb::BatchCheckResult, Status>>;

    async fn stream_check_numbers(
        &self,
        request: Request<Streaming<pb::CheckNumberRequest>>,
    ) -> Result<Response<Self::StreamCheckNumbersStream>, Status> {
        // Opening the stream is one request; each chunk adds its checks to
        // the daily count as it arrives.
        let principal = request.extensions().get::<Principal>().cloned();
        let note = request.extensions().get::<CallNote>().cloned();
        self.charge(principal.as_ref(), 1, 0)
            .await
            .map_err(Status::from)?;
        // Checks that set `want_receipt` get one; without a signer, they get
        // FAILED_PRECONDITION as their item error.
        let receipts = ReceiptPlan::for_stream(self.receipts.as_ref(), self.call_info(&request));
        let input = request.into_inner().ready_chunks(STREAM_CHUNK);
        // Bounded: when the client stops reading, sends wait, and the server
        // stops reading requests (HTTP/2 flow control pushes back further).
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        tokio::spawn(
            stream_pipeline(self.clone(), principal, Arc::new(receipts), input, tx, note).in_current_span(),
        );
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn get_mirror_status(
        &self,
        _request: Request<pb::GetMirrorStatusRequest>,
    ) -> Result<Response<pb::GetMirrorStatusResponse>, Status> {
        let meta = self.store.cached_meta();
        let mut status = status_message(
            meta.as_deref(),
            Date::today_utc(),
            self.options.max_staleness_days,
        );
        status.skipped_files = self.store.import_problems();
        if let Some(federation) = &self.federation {
            status.sources = super::feed::mirror_sources(meta.as_deref(), federation);
        }
        Ok(Response::new(status))
    }

    async fn get_signing_keys(
        &self,
        _request: Request<pb::GetSigningKeysRequest>,
    ) -> Result<Response<pb::GetSigningKeysResponse>, Status> {
        let signer = self
            .receipts
            .as_ref()
            .ok_or(ApiError::Receipt(ReceiptError::NotConfigured))?;
        Ok(Response::new(pb::GetSigningKeysResponse {
            jwks: signer.jwks_json().to_owned(),
        }))
    }
}

/// What one chunk of a stream comes to, in request order.
enum Segment {
    /// One result per item of the chunk.
    Results(Vec<pb::BatchCheckResult>),
    /// This many items were not looked up (answered UNAVAILABLE).
    Shed(u64),
    /// The stream ends with this status (e.g. over quota).
    Fail(Status),
}

/// The item error of a request that was read but not looked up.
fn shed_item() -> pb::BatchCheckResult {
    let error: pb::CheckError = ApiError::Store(StoreError::Unavailable(
        "lookups of this stream are waiting on the store".into(),
    ))
    .into();
    pb::BatchCheckResult {
        result: Some(pb::batch_check_result::Result::Error(error)),
    }
}

/// Runs one StreamCheckNumbers call: reads requests in chunks, looks them up
/// (at most [`STREAM_IN_FLIGHT`] chunks at once, results in request order)
/// and sends the results to `tx`.
///
/// The requests are read as long as the client reads its results, even
/// while lookups wait on a slow or stalled store: chunks that arrive while
/// [`STREAM_IN_FLIGHT`] lookups wait are answered UNAVAILABLE item by item
/// (counted, not stored, so memory stays bounded). When the client stops
/// reading (results waiting for room in `tx`), reading stops too.
async fn stream_pipeline<S: Store + Clone>(
    this: ReassignedService<S>,
    principal: Option<Principal>,
    receipts: Arc<ReceiptPlan>,
    mut input: ReadyChunks<Streaming<pb::CheckNumberRequest>>,
    tx: mpsc::Sender<Result<pb::BatchCheckResult, Status>>,
    note: Option<CallNote>,
) {
    let mut lookups: FuturesOrdered<BoxFuture<'static, Segment>> = FuturesOrdered::new();
    // When each lookup segment (not shed ones) in `lookups` started.
    let mut in_flight: VecDeque<tokio::time::Instant> = VecDeque::new();
    // Items shed after the last segment in `lookups` (only while it is not empty).
    let mut shed_after = 0_u64;
    // The segment being sent: its results, then its shed items.
    let mut out: VecDeque<pb::BatchCheckResult> = VecDeque::new();
    let mut out_shed = 0_u64;
    let mut input_done = false;
    let mut first_index = 0_u64;
    loop {
        let sending = !out.is_empty() || out_shed > 0;
        // Full: read again (and shed) once the oldest lookup waited too long.
        let shed_at = match in_flight.front() {
            Some(oldest) if in_flight.len() >= STREAM_IN_FLIGHT => Some(*oldest + STREAM_SHED_AFTER),
            _ => None,
        };
        let may_read = shed_at.is_none_or(|at| at <= tokio::time::Instant::now());
        tokio::select! {
            biased;
            permit = tx.reserve(), if sending => {
                let Ok(permit) = permit else {
                    return; // the client went away
                };
                match out.pop_front() {
                    Some(result) => permit.send(Ok(result)),
                    None => {
                        out_shed -= 1;
                        permit.send(Ok(shed_item()));
                    }
                }
            }
            Some(segment) = lookups.next(), if !sending && !lookups.is_empty() => {
                match segment {
                    Segment::Results(results) => {
                        in_flight.pop_front();
                        out = results.into();
                    }
                    Segment::Shed(count) => out_shed = count,
                    Segment::Fail(status) => {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                }
                if lookups.is_empty() {
                    out_shed += std::mem::take(&mut shed_after);
                }
            }
            () = tokio::time::sleep_until(shed_at.unwrap_or_else(tokio::time::Instant::now)),
                if !sending && !input_done && !may_read => {}
            chunk = input.next(), if !sending && !input_done && may_read => {
                let Some(chunk) = chunk else {
                    input_done = true;
                    continue;
                };
                let mut checks = Vec::with_capacity(chunk.len());
                let mut failure = None;
                for item in chunk {
                    match item {
                        Ok(check) => checks.push(check),
                        Err(status) => {
                            tracing::debug!(code = ?status.code(), "request stream ended with an error");
                            input_done = true;
                            failure = Some(status);
                            break;
                        }
                    }
                }
                let count = checks.len() as u64;
                if count > 0 && in_flight.len() >= STREAM_IN_FLIGHT {
                    // Shed items keep their positions (receipt ids count them).
                    first_index += count;
                    shed_after += count;
                } else if count > 0 {
                    if shed_after > 0 {
                        let shed = std::mem::take(&mut shed_after);
                        lookups.push_back(futures_util::future::ready(Segment::Shed(shed)).boxed());
                    }
                    let start = first_index;
                    first_index += count;
                    in_flight.push_back(tokio::time::Instant::now());
                    lookups.push_back(lookup_chunk(this.clone(), principal.clone(), receipts.clone(), checks, start, note.clone()).boxed());
                }
                if let Some(status) = failure {
                    // The client must learn that its stream was cut (e.g. a
                    // message that does not decode): not a silent OK, and
                    // only after the answers to what came before it.
                    let shed = std::mem::take(&mut shed_after);
                    if shed > 0 {
                        lookups.push_back(futures_util::future::ready(Segment::Shed(shed)).boxed());
                    }
                    lookups.push_back(futures_util::future::ready(Segment::Fail(status)).boxed());
                }
            }
            else => return,
        }
    }
}

/// Charges and looks up one chunk of a stream; a store failure answers
/// every item with the store's error.
async fn lookup_chunk<S: Store + Clone>(
    this: ReassignedService<S>,
    principal: Option<Principal>,
    receipts: Arc<ReceiptPlan>,
    checks: Vec<pb::CheckNumberRequest>,
    start: u64,
    note: Option<CallNote>,
) -> Segment {
    let count = checks.len();
    if let Err(e) = this.charge(principal.as_ref(), 0, count as u64).await {
        return Segment::Fail(e.into());
    }
    if let Some(note) = &note {
        note.numbers(count as u64);
    }
    match note::timed(note.as_ref(), this.check_many(checks, &receipts, start)).await {
        Ok(results) => Segment::Results(results),
        Err(e) => {
            let error: pb::CheckError = ApiError::from(e).into();
            let item = pb::BatchCheckResult {
                result: Some(pb::batch_check_result::Result::Error(error)),
            };
            Segment::Results(vec![item; count])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ServedStore;
    use crate::federation::overlay::{Overlay, OverlayStore};
    use crate::store::AnyStore;
    use crate::store::embedded::EmbeddedStore;

    /// The login path's future does not hold a store future inline: a
    /// store call that must go out is boxed (see [`ReassignedService::check_one`]),
    /// so the calls answered in process do not build and move kilobytes of
    /// future state (a Redis lookup's future is several kilobytes).
    #[test]
    fn the_check_path_future_stays_small() -> Result<(), Box<dyn std::error::Error>> {
        let store: ServedStore = OverlayStore::new(
            AnyStore::Embedded(std::sync::Arc::new(EmbeddedStore::new())),
            std::sync::Arc::new(Overlay::new()),
        );
        let lookup_size =
            std::mem::size_of_val(&store.lookup(crate::domain::PhoneNumber::parse("+12025550100")?));
        let svc = ReassignedService::new(store, ServiceOptions::default());
        let plan = svc.receipt_plan(CallInfo::default(), false, false)?;
        let today = Date::today_utc();
        let check = Check::parse("+12025550100", "2020-01-01", today).map_err(|v| format!("{v:?}"))?;
        let one = svc.check_one(&plan, check, String::new(), false, today, None);
        let one_size = std::mem::size_of_val(&one);
        assert!(
            one_size < 512 && one_size < lookup_size,
            "check_one's future is {one_size} bytes (a store lookup's is {lookup_size})"
        );
        let charge = svc.charge(None, 1, 1);
        assert!(std::mem::size_of_val(&charge) < 128);
        Ok(())
    }
}
