//! The `reassigned.v1.DisconnectionFeed` handlers: operators publish and
//! retract disconnections (see [`crate::federation`]). Validation and
//! authority are per item; the log decides idempotency; accepted events go
//! into this server's overlay at once (the others follow the log).

use std::sync::Arc;

use tonic::{Code, Request, Response, Status};

use super::pb::disconnection_feed_server::DisconnectionFeed;
use super::{ApiError, code_name, pb};
use crate::audit::{AuditRecord, Auditor};
use crate::domain::{Date, FieldViolation, PhoneNumber};
use crate::federation::operators::Operator;
use crate::federation::{Event, EventKind, EventLog, Federation, LogError, Published, Retraction};
use crate::identity::Principal;

/// Most items of one PublishDisconnections call.
pub const MAX_PUBLISH_ITEMS: usize = 10_000;

/// Longest `event_id`.
pub const MAX_EVENT_ID: usize = 128;

/// Longest retraction `reason`, in characters.
pub const MAX_REASON: usize = 500;

/// The `DisconnectionFeed` service.
#[derive(Clone)]
pub struct FeedService {
    federation: Arc<Federation>,
    audit: Option<Arc<Auditor>>,
}

impl FeedService {
    /// The feed over `federation`, auditing retractions with `audit`.
    pub fn new(federation: Arc<Federation>, audit: Option<Arc<Auditor>>) -> Self {
        Self { federation, audit }
    }
}

/// Checks an event id: 1 to [`MAX_EVENT_ID`] characters of
/// `A-Z a-z 0-9 . _ : -`.
pub fn check_event_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_EVENT_ID {
        return Err(format!(
            "must be 1 to {MAX_EVENT_ID} characters, got {}",
            id.len()
        ));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
    {
        return Err("may contain only A-Z a-z 0-9 . _ : -".into());
    }
    Ok(())
}

/// The caller's certificate identity.
fn caller<T>(request: &Request<T>) -> Result<String, Status> {
    request
        .extensions()
        .get::<Principal>()
        .map(|p| p.platform.id.clone())
        .ok_or_else(|| Status::unauthenticated("no client certificate identity"))
}

/// The status of a log failure (one exhaustive mapping).
fn log_status(e: LogError) -> Status {
    match e {
        LogError::Store(e) => ApiError::Store(e).into(),
        LogError::NotDurable(reason) => {
            if let Some(suppressed) = crate::lograte::global().check("federation_not_durable") {
                tracing::warn!(%reason, suppressed, "publication refused: the event log is not durable");
            }
            Status::failed_precondition(
                "the server cannot make publications durable right now (see the server log); nothing was stored",
            )
        }
        LogError::Journal(e) => {
            tracing::error!(error = %e, "federation journal write failed");
            Status::unavailable("the event journal cannot be written; nothing was stored; retry")
        }
        LogError::Corrupt(e) => {
            tracing::error!(error = %e, "federation log entry unreadable");
            Status::internal("the event log holds unreadable data")
        }
    }
}

fn item_error(code: Code, message: String) -> pb::publish_result::Outcome {
    pb::publish_result::Outcome::Error(pb::CheckError {
        code: code_name(code).to_owned(),
        message,
    })
}

/// Validates item `i` and checks `operator`'s authority over it.
fn item_event(
    i: usize,
    item: &pb::Disconnection,
    operator: &Operator,
    today: Date,
    now_ms: i64,
) -> Result<Event, pb::publish_result::Outcome> {
    let mut problems = Vec::new();
    if let Err(reason) = check_event_id(&item.event_id) {
        problems.push(format!("items[{i}].event_id: {reason}"));
    }
    let number = PhoneNumber::parse(&item.phone_number)
        .map_err(|e| problems.push(format!("items[{i}].phone_number: {e}")))
        .ok();
    let date = match Date::parse(&item.disconnect_date) {
        Ok(d) if d > today => {
            problems.push(format!(
                "items[{i}].disconnect_date: must not be after today ({today})"
            ));
            None
        }
        Ok(d) => Some(d),
        Err(e) => {
            problems.push(format!("items[{i}].disconnect_date: {e}"));
            None
        }
    };
    let (Some(number), Some(date), true) = (number, date, problems.is_empty()) else {
        return Err(item_error(Code::InvalidArgument, problems.join("; ")));
    };
    if !operator.covers(number) {
        return Err(item_error(
            Code::PermissionDenied,
            format!(
                "items[{i}].phone_number: outside the prefixes operator {:?} is authoritative for",
                operator.id
            ),
        ));
    }
    let quarantine = i32::try_from(operator.quarantine_days).unwrap_or(i32::MAX);
    Ok(Event {
        event_id: item.event_id.clone(),
        number,
        disconnect_date: date,
        earliest_reissue_date: date.add_days(quarantine),
        source: operator.id.clone(),
        kind: EventKind::Disconnected,
        accepted_unix_ms: now_ms,
    })
}

#[tonic::async_trait]
impl DisconnectionFeed for FeedService {
    async fn publish_disconnections(
        &self,
        request: Request<pb::PublishDisconnectionsRequest>,
    ) -> Result<Response<pb::PublishDisconnectionsResponse>, Status> {
        let source = caller(&request)?;
        let pb::PublishDisconnectionsRequest { items } = request.into_inner();
        if items.is_empty() || items.len() > MAX_PUBLISH_ITEMS {
            return Err(ApiError::InvalidArgument(vec![FieldViolation {
                field: "items",
                reason: format!("must hold 1 to {MAX_PUBLISH_ITEMS} items, got {}", items.len()),
            }])
            .into());
        }
        let operators = self.federation.operators.current();
        let Some(operator) = operators.get(&source) else {
            return Err(Status::permission_denied(format!(
                "{source:?} is not a configured operator (see the operators file)"
            )));
        };
        let today = Date::today_utc();
        let now_ms = Federation::now_ms();
        let checked: Vec<Result<Event, pb::publish_result::Outcome>> = items
            .iter()
            .enumerate()
            .map(|(i, item)| item_event(i, item, operator, today, now_ms))
            .collect();
        let events: Vec<Event> = checked.iter().filter_map(|c| c.as_ref().ok().cloned()).collect();
        let published = if events.is_empty() {
            Vec::new()
        } else {
            self.federation.log.publish(&events).await.map_err(log_status)?
        };
        let mut published = published.into_iter().zip(events);
        let mut counts = [0usize; 3];
        let results = items
            .into_iter()
            .zip(checked)
            .map(|(item, checked)| {
                let outcome = match checked {
                    Err(outcome) => {
                        counts[2] += 1;
                        outcome
                    }
                    Ok(_) => match published.next() {
                        Some((Published::Accepted(..), event)) => {
                            self.federation.overlay.apply(&event);
                            counts[0] += 1;
                            pb::publish_result::Outcome::Accepted(true)
                        }
                        Some((Published::Duplicate, _)) => {
                            counts[1] += 1;
                            pb::publish_result::Outcome::Duplicate(true)
                        }
                        Some((Published::Conflict, _)) => {
                            counts[2] += 1;
                            item_error(
                                Code::AlreadyExists,
                                "event_id: already used by this operator for another number or date".into(),
                            )
                        }
                        None => item_error(Code::Internal, "no outcome for this item".into()),
                    },
                };
                pb::PublishResult {
                    event_id: item.event_id,
                    outcome: Some(outcome),
                }
            })
            .collect();
        tracing::info!(
            operator = %source,
            accepted = counts[0],
            duplicate = counts[1],
            refused = counts[2],
            "disconnections published"
        );
        Ok(Response::new(pb::PublishDisconnectionsResponse { results }))
    }

    async fn retract_disconnection(
        &self,
        request: Request<pb::RetractDisconnectionRequest>,
    ) -> Result<Response<pb::RetractDisconnectionResponse>, Status> {
        let source = caller(&request)?;
        let request_id = super::CallInfo::of(&request).request_id;
        let pb::RetractDisconnectionRequest { event_id, reason } = request.into_inner();
        let mut violations = Vec::new();
        if let Err(reason) = check_event_id(&event_id) {
            violations.push(FieldViolation {
                field: "event_id",
                reason,
            });
        }
        let chars = reason.chars().count();
        if reason.trim().is_empty() || chars > MAX_REASON {
            violations.push(FieldViolation {
                field: "reason",
                reason: format!("must be 1 to {MAX_REASON} characters (not blank), got {chars}"),
            });
        }
        if !violations.is_empty() {
            return Err(ApiError::InvalidArgument(violations).into());
        }
        let outcome = self
            .federation
            .log
            .retract(&source, &event_id, Federation::now_ms())
            .await
            .map_err(log_status)?;
        let (event, retracted) = match outcome {
            Retraction::NotFound => {
                return Err(Status::not_found(format!(
                    "event_id: operator {source:?} published no event {event_id:?}"
                )));
            }
            Retraction::AlreadyRetracted(event) => (event, false),
            Retraction::Retracted(event, ..) => {
                self.federation.overlay.apply(&event);
                (event, true)
            }
        };
        if retracted {
            tracing::info!(operator = %source, event_id = %event_id, reason = %reason, "disconnection retracted");
            if let Some(auditor) = &self.audit {
                let record = AuditRecord {
                    time_ms: event.accepted_unix_ms,
                    request_id,
                    platform: source.clone(),
                    number_hmac: auditor.number_hmac(&event.number.to_string()),
                    since: event.disconnect_date.to_string(),
                    status: "RETRACTED".into(),
                    data_as_of: String::new(),
                    reason: reason.clone(),
                };
                auditor.record(record).map_err(ApiError::from)?;
            }
        }
        Ok(Response::new(pb::RetractDisconnectionResponse {
            phone_number: event.number.to_string(),
            retracted,
        }))
    }
}

/// The sources of `GetMirrorStatus`: the register (from the mirror's
/// metadata), then every configured operator with what the overlay knows.
pub fn mirror_sources(
    meta: Option<&crate::domain::MirrorMeta>,
    federation: &Federation,
) -> Vec<pb::MirrorSource> {
    let mut sources = Vec::new();
    if let Some(meta) = meta {
        sources.push(pb::MirrorSource {
            name: crate::federation::REGISTER_SOURCE.to_owned(),
            kind: pb::SourceKind::Register as i32,
            prefixes: meta.prefixes.iter().map(ToString::to_string).collect(),
            data_as_of: meta.as_of.to_string(),
            last_event_time: Some(prost_types::Timestamp {
                seconds: meta.last_import_unix,
                nanos: 0,
            }),
            record_count: meta.record_count,
            quarantine_days: crate::federation::REGISTER_QUARANTINE_DAYS,
        });
    }
    for operator in federation.operators.current().iter() {
        let stats = federation.overlay.source_stats(&operator.id);
        sources.push(pb::MirrorSource {
            name: operator.id.clone(),
            kind: pb::SourceKind::Operator as i32,
            prefixes: operator.prefixes.iter().map(ToString::to_string).collect(),
            data_as_of: String::new(),
            last_event_time: stats.last_event_ms.map(|ms| prost_types::Timestamp {
                seconds: ms.div_euclid(1000),
                nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
            }),
            record_count: stats.in_force,
            quarantine_days: operator.quarantine_days,
        });
    }
    sources
}
