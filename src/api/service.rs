//! The `reassigned.v1.ReassignedNumbers` handlers: convert, call the domain
//! and the store, convert back.

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use super::convert::{answer_message, status_message};
use super::pb::reassigned_numbers_server::ReassignedNumbers;
use super::{ApiError, pb};
use crate::domain::{self, Check, Date, FieldViolation};
use crate::store::{Store, StoreError};

/// Most requests of a stream answered with one store round trip.
const STREAM_CHUNK: usize = 512;
/// Results buffered per stream before the server stops reading requests.
const STREAM_BUFFER: usize = 1024;

/// Limits and rules of the service.
#[derive(Clone, Debug)]
pub struct ServiceOptions {
    /// Most checks accepted in one BatchCheckNumbers call.
    pub max_batch: usize,
    /// Data older than this many days (`today - as_of`) answers NO_DATA.
    pub max_staleness_days: u32,
}

impl Default for ServiceOptions {
    fn default() -> Self {
        Self {
            max_batch: 1000,
            max_staleness_days: 45,
        }
    }
}

/// The `ReassignedNumbers` service over any [`Store`].
#[derive(Clone)]
pub struct ReassignedService<S> {
    store: S,
    options: ServiceOptions,
}

impl<S: Store> ReassignedService<S> {
    /// A service answering from `store`.
    pub fn new(store: S, options: ServiceOptions) -> Self {
        Self { store, options }
    }

    /// Answers many checks with one store round trip; invalid items get their
    /// own error. Fails only if the store cannot answer.
    async fn check_many(
        &self,
        checks: Vec<pb::CheckNumberRequest>,
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
            .map(|(request, parsed)| {
                let result = match parsed {
                    Ok(check) => {
                        let disconnect = found.next().flatten();
                        let status = self.answer(check, disconnect, meta, today);
                        pb::batch_check_result::Result::Answer(answer_message(
                            request.phone_number,
                            status,
                            meta,
                        ))
                    }
                    Err(violations) => {
                        pb::batch_check_result::Result::Error(ApiError::InvalidArgument(violations).into())
                    }
                };
                pb::BatchCheckResult { result: Some(result) }
            })
            .collect())
    }

    fn answer(
        &self,
        check: Check,
        disconnect: Option<Date>,
        meta: Option<&domain::MirrorMeta>,
        today: Date,
    ) -> domain::Status {
        domain::answer(check, disconnect, meta, today, self.options.max_staleness_days)
    }
}

#[tonic::async_trait]
impl<S: Store + Clone> ReassignedNumbers for ReassignedService<S> {
    async fn check_number(
        &self,
        request: Request<pb::CheckNumberRequest>,
    ) -> Result<Response<pb::CheckNumberResponse>, Status> {
        let pb::CheckNumberRequest { phone_number, since } = request.into_inner();
        let today = Date::today_utc();
        let check = Check::parse(&phone_number, &since, today).map_err(ApiError::InvalidArgument)?;
        let lookup = self.store.lookup(check.number).await.map_err(ApiError::from)?;
        let status = self.answer(check, lookup.found, lookup.meta.as_deref(), today);
        tracing::debug!(?status, "checked");
        Ok(Response::new(answer_message(
            phone_number,
            status,
            lookup.meta.as_deref(),
        )))
    }

    async fn batch_check_numbers(
        &self,
        request: Request<pb::BatchCheckNumbersRequest>,
    ) -> Result<Response<pb::BatchCheckNumbersResponse>, Status> {
        let pb::BatchCheckNumbersRequest { checks } = request.into_inner();
        if checks.is_empty() || checks.len() > self.options.max_batch {
            return Err(ApiError::InvalidArgument(vec![FieldViolation {
                field: "checks",
                reason: format!(
                    "must hold 1 to {} checks, got {}",
                    self.options.max_batch,
                    checks.len()
                ),
            }])
            .into());
        }
        let results = self.check_many(checks).await.map_err(ApiError::from)?;
        Ok(Response::new(pb::BatchCheckNumbersResponse { results }))
    }

    type StreamCheckNumbersStream = ReceiverStream<Result<pb::BatchCheckResult, Status>>;

    async fn stream_check_numbers(
        &self,
        request: Request<Streaming<pb::CheckNumberRequest>>,
    ) -> Result<Response<Self::StreamCheckNumbersStream>, Status> {
        let mut input = request.into_inner().ready_chunks(STREAM_CHUNK);
        // Bounded: when the client stops reading, sends wait, and the server
        // stops reading requests (HTTP/2 flow control pushes back further).
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let this = self.clone();
        tokio::spawn(
            async move {
                while let Some(chunk) = input.next().await {
                    let mut checks = Vec::with_capacity(chunk.len());
                    let mut failure = None;
                    for item in chunk {
                        match item {
                            Ok(check) => checks.push(check),
                            Err(status) => {
                                failure = Some(status);
                                break;
                            }
                        }
                    }
                    let count = checks.len();
                    let results = match this.check_many(checks).await {
                        Ok(results) => results,
                        Err(e) => {
                            let error: pb::CheckError = ApiError::from(e).into();
                            let item = pb::BatchCheckResult {
                                result: Some(pb::batch_check_result::Result::Error(error)),
                            };
                            vec![item; count]
                        }
                    };
                    for result in results {
                        if tx.send(Ok(result)).await.is_err() {
                            return; // the client went away
                        }
                    }
                    if let Some(status) = failure {
                        tracing::debug!(code = ?status.code(), "request stream ended with an error");
                        return;
                    }
                }
            }
            .in_current_span(),
        );
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn get_mirror_status(
        &self,
        _request: Request<pb::GetMirrorStatusRequest>,
    ) -> Result<Response<pb::GetMirrorStatusResponse>, Status> {
        let meta = self.store.cached_meta();
        Ok(Response::new(status_message(
            meta.as_deref(),
            Date::today_utc(),
            self.options.max_staleness_days,
        )))
    }
}
