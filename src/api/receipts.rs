//! Signed receipts on answers: who asked (from the auth layer's
//! [`Principal`]), the request id, and the claims of one answer, signed with
//! the server's [`ReceiptSigner`].

use std::sync::Arc;

use tonic::Request;

use super::convert::status_names;
use crate::domain::Answer;
use crate::identity::Principal;
use crate::receipt::{ReceiptClaims, ReceiptError, ReceiptSigner, number_sha256};

/// The metadata key of a client-chosen request id.
pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// Longest client request id taken as is; longer (or non-printable) ids are
/// replaced by a generated one.
const MAX_REQUEST_ID: usize = 128;

/// The client's request id if it is usable as is: 1 to 128 printable
/// ASCII characters.
pub fn usable_request_id(id: Option<&str>) -> Option<&str> {
    id.filter(|id| !id.is_empty() && id.len() <= MAX_REQUEST_ID && id.bytes().all(|b| b.is_ascii_graphic()))
}

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
        Self::new(
            request.extensions().get::<Principal>(),
            request
                .metadata()
                .get(REQUEST_ID_HEADER)
                .and_then(|v| v.to_str().ok()),
        )
    }

    /// The call of `principal` with the client's `request_id` if usable
    /// (else a generated one); any face (gRPC metadata, an HTTP header).
    pub fn new(principal: Option<&Principal>, request_id: Option<&str>) -> Self {
        let platform = principal.map(|p| p.platform.id.clone());
        let request_id = usable_request_id(request_id)
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

    /// Signs the receipt of `answer`. `index` is the item's position in a
    /// batch or stream (suffixed to the `jti`).
    pub fn sign(&self, answer: &Answer, index: Option<u64>) -> Result<String, ReceiptError> {
        let (status, reason) = status_names(answer.status);
        let claims = ReceiptClaims {
            platform: self.platform.clone(),
            number_sha256: number_sha256(&answer.check.number.to_string()),
            since: answer.check.since.to_string(),
            status: status.to_owned(),
            no_data_reason: reason.map(str::to_owned),
            data_as_of: answer.as_of.map(|d| d.to_string()).unwrap_or_default(),
            sequence: answer.sequence,
            iat: self.iat,
            jti: match index {
                Some(i) => format!("{}.{i}", self.request_id),
                None => self.request_id.clone(),
            },
        };
        self.signer.sign(&claims)
    }
}

/// What the receipts of one call come to.
#[derive(Clone, Debug)]
pub enum Receipts {
    /// The call asked for none: no answer of it gets a receipt.
    NotWanted,
    /// Answers that ask for one are signed in this context.
    Sign(ReceiptContext),
    /// Receipts cannot be made on this call (no signer, no platform):
    /// answers that ask for one fail with this error, item by item.
    Refused(ReceiptError),
}

/// Which answers of a call get receipts, and who made the call (for the
/// audit trail too).
#[derive(Clone, Debug)]
pub struct ReceiptPlan {
    /// What the call's receipts come to.
    pub receipts: Receipts,
    /// Every answer gets one (`want_receipts`), not only the checks that set
    /// `want_receipt`.
    pub all: bool,
    /// The caller and request id (also for the audit trail).
    pub call: CallInfo,
}

impl ReceiptPlan {
    /// The plan of a call that asked for receipts (`wanted`: by any of its
    /// checks; `all`: for every answer) or not: receipts that cannot be
    /// made fail the whole call.
    pub fn for_call(
        signer: Option<&Arc<ReceiptSigner>>,
        call: CallInfo,
        wanted: bool,
        all: bool,
    ) -> Result<Self, ReceiptError> {
        let receipts = match wanted || all {
            true => Receipts::Sign(ReceiptContext::new(signer, &call)?),
            false => Receipts::NotWanted,
        };
        Ok(Self { receipts, all, call })
    }

    /// The plan of a stream, whose checks are not known in advance: receipts
    /// that cannot be made fail only the items that ask for one.
    pub fn for_stream(signer: Option<&Arc<ReceiptSigner>>, call: CallInfo) -> Self {
        let receipts = match ReceiptContext::new(signer, &call) {
            Ok(context) => Receipts::Sign(context),
            Err(e) => Receipts::Refused(e),
        };
        Self {
            receipts,
            all: false,
            call,
        }
    }

    /// The receipt of `answer` if it is `wanted` (by its check or the plan):
    /// `Ok(None)` when not wanted. `index` is the item's position in a batch
    /// or stream (`None`: a single check).
    pub fn receipt(
        &self,
        wanted: bool,
        answer: &Answer,
        index: Option<u64>,
    ) -> Result<Option<String>, ReceiptError> {
        if !(wanted || self.all) {
            return Ok(None);
        }
        match &self.receipts {
            Receipts::Sign(context) => context.sign(answer, index).map(Some),
            Receipts::Refused(e) => Err(e.clone()),
            // A plan for a call that asked for none, asked anyway: never
            // answer without the receipt that was asked for.
            Receipts::NotWanted => Err(ReceiptError::NotConfigured),
        }
    }
}
