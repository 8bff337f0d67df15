//! The `reassigned.v1.Watchlist` handlers: a platform's own watch list
//! (add, remove, count) and its stream of disconnection events.
//!
//! The platform is always the caller's certificate identity: no request
//! field names a platform, so one platform can never see, count or change
//! another's list.

use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::pb::watchlist_server::Watchlist;
use super::{ApiError, pb};
use crate::domain::{FieldViolation, PhoneNumber};
use crate::federation::watch::{MAX_WATCH_BATCH, WatchLists};
use crate::identity::Principal;

/// The `Watchlist` service.
#[derive(Clone, Debug)]
pub struct WatchlistService {
    /// `None`: no watch key configured; every call is FAILED_PRECONDITION.
    lists: Option<WatchLists>,
}

impl WatchlistService {
    /// The service over `lists` (`None`: watch lists are off).
    pub fn new(lists: Option<WatchLists>) -> Self {
        Self { lists }
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

/// Checks the size of a list of numbers and parses each: the numbers to
/// act on and, per item, the number or the item's error.
fn parse_numbers(
    numbers: &[String],
) -> Result<(Vec<PhoneNumber>, Vec<Result<(), pb::CheckError>>), ApiError> {
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
fn results(
    numbers: Vec<String>,
    items: Vec<Result<(), pb::CheckError>>,
    changed: Vec<bool>,
) -> Vec<pb::WatchResult> {
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
        let _platform = platform_of(&request)?;
        self.lists()?;
        Err(Status::unimplemented(
            "WatchDisconnections: delivery lands with the event log",
        ))
    }
}
