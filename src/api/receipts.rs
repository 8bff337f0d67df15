//! Signed receipts on answers: who asked (from the auth layer's
//! [`Principal`]), the request id, and the claims of one answer, signed with
//! the server's [`ReceiptSigner`].

use std::sync::Arc;

use tonic::Request;

use super::pb;
use crate::domain::{Check, MirrorMeta};
use crate::identity::Principal;
use crate::receipt::{ReceiptClaims, ReceiptError, ReceiptSigner, number_sha256};

/// The metadata key of a client-chosen request id.
pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// Longest client request id taken as is; longer (or non-printable) ids are
/// replaced by a generated one.
const MAX_REQUEST_ID: usize = 128;

/// Who made a call and its request id: shared by its receipts and its
/// audit records. The default (no platform, empty id) stands for a call
/// whose server makes neither.
#[derive(Clone, Debug, Default)]
pub struct CallInfo {
    /// The platform id; `None` if the auth layer put no [`Principal`] in the
    /// extensions.
    pub platform: Option<String>,
    /// The client's `x-request-id` if usable, else a random 128-bit hex id.
    pub request_id: String,
}

impl CallInfo {
    /// Reads the caller and the request id of `request`.
    pub fn of<T>(request: &Request<T>) -> Self {
        let platform = request
            .extensions()
            .get::<Principal>()
            .map(|p| p.platform.id.clone());
        let request_id = request
            .metadata()
            .get(REQUEST_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|id| {
                !id.is_empty() && id.len() <= MAX_REQUEST_ID && id.bytes().all(|b| b.is_ascii_graphic())
            })
            .map_or_else(|| format!("{:032x}", rand::random::<u128>()), str::to_owned);
        Self { platform, request_id }
    }
}

/// What every receipt of one call shares: the signer, the platform, the
/// request id and the time.
#[derive(Clone, Debug)]
pub struct ReceiptContext {
    signer: Arc<ReceiptSigner>,
    platform: String,
    request_id: String,
    iat: i64,
}

impl ReceiptContext {
    /// The receipt context of a call: `NotConfigured` without a signer,
    /// `NoPlatform` without a platform.
    pub fn new(signer: Option<&Arc<ReceiptSigner>>, call: &CallInfo) -> Result<Self, ReceiptError> {
        let signer = signer.ok_or(ReceiptError::NotConfigured)?;
        let platform = call.platform.clone().ok_or(ReceiptError::NoPlatform)?;
        let request_id = call.request_id.clone();
        let iat = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        Ok(Self {
            signer: signer.clone(),
            platform,
            request_id,
            iat,
        })
    }

    /// Signs the receipt of `answer` to `check`, given from `meta`. `index`
    /// is the item's position in a batch or stream (suffixed to the `jti`).
    pub fn sign(
        &self,
        check: Check,
        answer: &pb::CheckNumberResponse,
        meta: Option<&MirrorMeta>,
        index: Option<u64>,
    ) -> Result<String, ReceiptError> {
        let status =
            pb::ReassignmentStatus::try_from(answer.status).unwrap_or(pb::ReassignmentStatus::Unspecified);
        let no_data_reason = match pb::NoDataReason::try_from(answer.no_data_reason) {
            Ok(pb::NoDataReason::Unspecified) | Err(_) => None,
            Ok(reason) => Some(reason.as_str_name().to_owned()),
        };
        let claims = ReceiptClaims {
            platform: self.platform.clone(),
            number_sha256: number_sha256(&check.number.to_string()),
            since: check.since.to_string(),
            status: status.as_str_name().to_owned(),
            no_data_reason,
            data_as_of: answer.data_as_of.clone(),
            sequence: meta.map_or(0, |m| m.sequence),
            iat: self.iat,
            jti: match index {
                Some(i) => format!("{}.{i}", self.request_id),
                None => self.request_id.clone(),
            },
        };
        self.signer.sign(&claims)
    }
}

/// Which answers of a batch or stream get receipts.
#[derive(Clone, Debug)]
pub struct ReceiptPlan {
    /// The call's context; `Err` when receipts cannot be made (asked-for
    /// receipts then fail per item).
    pub context: Result<ReceiptContext, ReceiptError>,
    /// Every answer gets one (`want_receipts`), not only the checks that set
    /// `want_receipt`.
    pub all: bool,
    /// The caller and request id (also for the audit trail).
    pub call: CallInfo,
}

impl ReceiptPlan {
    /// The receipt for one answer, if `wanted` (by the check or the plan).
    pub fn receipt(
        &self,
        wanted: bool,
        check: Check,
        answer: &pb::CheckNumberResponse,
        meta: Option<&MirrorMeta>,
        index: u64,
    ) -> Option<Result<String, ReceiptError>> {
        if !(wanted || self.all) {
            return None;
        }
        Some(match &self.context {
            Ok(context) => context.sign(check, answer, meta, Some(index)),
            Err(e) => Err(e.clone()),
        })
    }
}
