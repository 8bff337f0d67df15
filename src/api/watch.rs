//! The `reassigned.v1.Watchlist` handlers: a platform's own watch list
//! (add, remove, count) and its stream of disconnection events.
//!
//! The platform is always the caller's certificate identity: no request
//! field names a platform, so one platform can never see, count or change
//! another's list.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::pb::watchlist_server::Watchlist;
use super::{ApiError, pb};
use crate::domain::{FieldViolation, PhoneNumber};
use crate::federation::deliver::{Cursor, CursorError, DeliveryStats, Feed, Start, Tips};
use crate::federation::log::{AnyLog, EventLog, LogError};
use crate::federation::watch::{MAX_WATCH_BATCH, WatchLists};
use crate::federation::{Event, EventKind};
use crate::identity::Principal;
use crate::store::StoreError;

/// The cursor that starts at the oldest event still held.
pub const OLDEST: &str = "oldest";

/// Events sent to one watcher that it has not read yet, at most (with
/// one batch of its feed: a watcher that stops reading holds no more).
const WATCH_BUFFER: usize = 64;

/// The `Watchlist` service.
#[derive(Clone)]
pub struct WatchlistService {
    /// `None`: no watch key configured; every call is FAILED_PRECONDITION.
    lists: Option<WatchLists>,
    /// The event log and its tips (`None`: no log; WatchDisconnections is
    /// then FAILED_PRECONDITION too).
    log: Option<(AnyLog, Tips)>,
    /// Counts the events sent.
    stats: Arc<DeliveryStats>,
    /// How long the log keeps events.
    retention: std::time::Duration,
    /// Turns true when the server stops: open watch streams then end with
    /// UNAVAILABLE at once (see [`WatchlistService::with_stop`]).
    stop: Option<tokio::sync::watch::Receiver<bool>>,
}

impl std::fmt::Debug for WatchlistService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchlistService")
            .field("lists", &self.lists)
            .field("log", &self.log.is_some())
            .finish()
    }
}

impl WatchlistService {
    /// The service over `lists` (`None`: watch lists are off), delivering
    /// from `log` (woken by its `tips`).
    pub fn new(
        lists: Option<WatchLists>,
        log: Option<(AnyLog, Tips)>,
        stats: Arc<DeliveryStats>,
        retention: std::time::Duration,
    ) -> Self {
        Self {
            lists,
            log,
            stats,
            retention,
            stop: None,
        }
    }

    /// Ends every open `WatchDisconnections` stream with UNAVAILABLE when
    /// `stop` turns true (the server is shutting down), so that a stop does
    /// not wait its whole drain for watchers that never hang up: they
    /// resume with their last cursor, on this server once restarted or on
    /// another (at least once: nothing is lost).
    pub fn with_stop(mut self, stop: tokio::sync::watch::Receiver<bool>) -> Self {
        self.stop = Some(stop);
        self
    }

    fn lists(&self) -> Result<&WatchLists, ApiError> {
        self.lists.as_ref().ok_or(ApiError::WatchOff)
    }
}

/// The caller's platform id.
fn platform_of<T>(request: &Request<T>) -> Result<String, ApiError> {
    request
        .extensions()
        .get::<Principal>()
        .map(|p| p.platform.id.clone())
        .ok_or(ApiError::NoCaller)
}

/// Per item of a request: fine, or its error.
type ItemChecks = Vec<Result<(), pb::CheckError>>;

/// Checks the size of a list of numbers and parses each: the numbers to
/// act on and, per item, whether it is one or its error.
fn parse_numbers(numbers: &[String]) -> Result<(Vec<PhoneNumber>, ItemChecks), ApiError> {
    if numbers.is_empty() || numbers.len() > MAX_WATCH_BATCH {
        return Err(ApiError::InvalidArgument(vec![FieldViolation {
            field: "phone_numbers",
            reason: format!("must hold 1 to {MAX_WATCH_BATCH} numbers, got {}", numbers.len()),
        }]));
    }
    let mut valid = Vec::with_capacity(numbers.len());
    let items = numbers
        .iter()
        .enumerate()
        .map(|(i, text)| match PhoneNumber::parse(text) {
            Ok(n) => {
                valid.push(n);
                Ok(())
            }
            Err(e) => Err(pb::CheckError {
                code: "INVALID_ARGUMENT".into(),
                message: format!("phone_numbers[{i}]: {e}"),
            }),
        })
        .collect();
    Ok((valid, items))
}

/// One result per number: `changed[k]` for the k-th valid one, the error
/// for an invalid one.
fn results(numbers: Vec<String>, items: ItemChecks, changed: Vec<bool>) -> Vec<pb::WatchResult> {
    let mut changed = changed.into_iter();
    numbers
        .into_iter()
        .zip(items)
        .map(|(phone_number, item)| pb::WatchResult {
            phone_number,
            outcome: Some(match item {
                Ok(()) => pb::watch_result::Outcome::Changed(changed.next().unwrap_or(false)),
                Err(e) => pb::watch_result::Outcome::Error(e),
            }),
        })
        .collect()
}

#[tonic::async_trait]
impl Watchlist for WatchlistService {
    async fn add_watches(
        &self,
        request: Request<pb::AddWatchesRequest>,
    ) -> Result<Response<pb::AddWatchesResponse>, Status> {
        let platform = platform_of(&request)?;
        let lists = self.lists()?;
        let pb::AddWatchesRequest { phone_numbers } = request.into_inner();
        let (valid, items) = parse_numbers(&phone_numbers)?;
        let changed = lists.add(&platform, &valid).await.map_err(ApiError::from)?;
        tracing::debug!(
            numbers = valid.len(),
            added = changed.iter().filter(|c| **c).count(),
            "watches added"
        );
        Ok(Response::new(pb::AddWatchesResponse {
            results: results(phone_numbers, items, changed),
        }))
    }

    async fn remove_watches(
        &self,
        request: Request<pb::RemoveWatchesRequest>,
    ) -> Result<Response<pb::RemoveWatchesResponse>, Status> {
        let platform = platform_of(&request)?;
        let lists = self.lists()?;
        let pb::RemoveWatchesRequest { phone_numbers } = request.into_inner();
        let (valid, items) = parse_numbers(&phone_numbers)?;
        let changed = lists.remove(&platform, &valid).await.map_err(ApiError::from)?;
        Ok(Response::new(pb::RemoveWatchesResponse {
            results: results(phone_numbers, items, changed),
        }))
    }

    async fn count_watches(
        &self,
        request: Request<pb::CountWatchesRequest>,
    ) -> Result<Response<pb::CountWatchesResponse>, Status> {
        let platform = platform_of(&request)?;
        let pb::CountWatchesRequest {} = request.into_inner();
        let count = self.lists()?.count(&platform).await.map_err(ApiError::from)?;
        Ok(Response::new(pb::CountWatchesResponse { count }))
    }

    type WatchDisconnectionsStream = ReceiverStream<Result<pb::DisconnectionEvent, Status>>;

    async fn watch_disconnections(
        &self,
        request: Request<pb::WatchDisconnectionsRequest>,
    ) -> Result<Response<Self::WatchDisconnectionsStream>, Status> {
        let platform = platform_of(&request)?;
        let lists = self.lists()?.clone();
        let (log, tips) = self.log.clone().ok_or(ApiError::WatchOff)?;
        let pb::WatchDisconnectionsRequest { cursor } = request.into_inner();
        let start = match cursor.as_str() {
            "" => Start::Now,
            OLDEST => Start::Oldest,
            text => Start::After(Cursor::decode(text, log.shards()).map_err(cursor_error)?),
        };
        let feed = Feed::open(log, lists, tips, platform, start, self.retention)
            .await
            .map_err(cursor_error)?;
        // Bounded: a watcher that stops reading stops its feed.
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        tokio::spawn(stream_events(feed, tx, self.stats.clone(), self.stop.clone()).in_current_span());
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// A cursor that cannot be used, as the client's error.
fn cursor_error(e: CursorError) -> ApiError {
    match e {
        CursorError::Malformed(reason) => ApiError::InvalidArgument(vec![FieldViolation {
            field: "cursor",
            reason: format!(
                "not a cursor of this service ({reason}); send one received from WatchDisconnections, or none"
            ),
        }]),
        CursorError::OutOfRange(oldest) => ApiError::CursorOutOfRange(oldest.encode()),
        CursorError::Log(e) => log_error(e),
    }
}

/// A failure of the event log, as the client's error (detail to the log).
fn log_error(e: LogError) -> ApiError {
    match e {
        LogError::Store(e) => ApiError::Store(e),
        LogError::Corrupt(detail) => ApiError::Store(StoreError::Corrupt(detail)),
        e @ (LogError::NotDurable(_) | LogError::Journal(_)) => {
            ApiError::Store(StoreError::Unavailable(e.to_string()))
        }
    }
}

/// Sends `feed`'s events to `tx` until the watcher goes away; a log or
/// store failure, or the server stopping (`stop` turning true), ends the
/// stream with UNAVAILABLE (the client resumes with its last cursor).
async fn stream_events(
    mut feed: Feed,
    tx: mpsc::Sender<Result<pb::DisconnectionEvent, Status>>,
    stats: Arc<DeliveryStats>,
    mut stop: Option<tokio::sync::watch::Receiver<bool>>,
) {
    let stopping = async {
        match stop.as_mut() {
            // An error: the server is gone, which is stopping too.
            Some(stop) => {
                let _ = stop.wait_for(|s| *s).await;
            }
            None => std::future::pending().await,
        }
    };
    tokio::pin!(stopping);
    loop {
        let batch = tokio::select! {
            batch = feed.next() => batch,
            () = tx.closed() => return,
            () = &mut stopping => {
                // Not waiting for room: a watcher that stopped reading must
                // not hold the stop (dropping `tx` ends its stream anyway).
                let _ = tx.try_send(Err(Status::unavailable(
                    "the server is shutting down: resume with the last cursor received",
                )));
                return;
            }
        };
        match batch {
            Ok(events) => {
                for (event, cursor) in events {
                    if tx.send(Ok(event_message(event, &cursor))).await.is_err() {
                        return;
                    }
                    stats.watch_events_sent.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(e) => {
                let _ = tx.send(Err(log_error(e).into())).await;
                return;
            }
        }
    }
}

/// The message of `event`, delivered with `cursor`.
pub(crate) fn event_message(event: Event, cursor: &Cursor) -> pb::DisconnectionEvent {
    let Event {
        event_id,
        number,
        disconnect_date,
        earliest_reissue_date,
        source,
        kind,
        accepted_unix_ms: _,
    } = event;
    pb::DisconnectionEvent {
        cursor: cursor.encode(),
        event_id,
        phone_number: number.to_string(),
        disconnect_date: disconnect_date.to_string(),
        earliest_reissue_date: earliest_reissue_date.to_string(),
        source,
        kind: match kind {
            EventKind::Disconnected => pb::DisconnectionEventKind::Disconnected,
            EventKind::Retracted => pb::DisconnectionEventKind::Retracted,
        } as i32,
    }
}
