//! The gRPC API: the generated code ([`pb`]) and its codec ([`codec`]:
//! undecodable requests are INVALID_ARGUMENT), conversions between it and
//! the domain, and the service handlers (`ReassignedNumbers`, `Watchlist`).

pub mod codec;
mod convert;
pub mod feed;
pub mod methods;
pub mod note;
mod receipts;
mod service;
mod watch;

pub use convert::ApiError;
pub use methods::code_name;
pub use receipts::{CallInfo, REQUEST_ID_HEADER, ReceiptContext, ReceiptPlan, Receipts, usable_request_id};
pub use service::{Answered, ReassignedService, ServiceOptions};
pub use watch::{OLDEST, WatchlistService};

/// Code generated from `proto/reassigned/v1/reassigned.proto`.
#[allow(missing_docs, clippy::all, clippy::pedantic, clippy::unwrap_used)]
pub mod pb {
    tonic::include_proto!("reassigned.v1");

    /// The encoded descriptor set of the public protos, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/reassigned_descriptor.bin"));
}

/// The store the server answers from: the configured store with the
/// federation's overlay of published disconnects on top (every face, gRPC
/// and REST, answers from it).
pub type ServedStore = crate::federation::overlay::OverlayStore<crate::store::AnyStore>;
