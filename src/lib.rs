//! `reassigned`: a gRPC mirror of a national register of reassigned (recycled)
//! phone numbers. It answers platforms, at login speed, "has this number changed
//! hands since date X?" over mutual TLS.
//!
//! # Layout
//! A request flows: TLS accept -> auth layer -> handler -> domain rule -> store.
//!
//! - [`domain`]: E.164 numbers, calendar dates and the answer rule (plain Rust,
//!   no tonic, no redis).
//! - [`store`]: the [`store::Store`] trait, the Redis store (production) and the
//!   embedded in-process store (default without Redis).
//! - [`import`]: manifests and CSV data files of the national register, their
//!   checks, and applying snapshots and deltas in sequence order.
//! - [`api`]: the generated protobuf code, conversions, the service handlers.
//! - [`server`]: TLS termination, the auth layer with certificate-bound
//!   bearer tokens ([`server::token`]), per-platform quotas
//!   ([`server::quota`]), reloading TLS material without a restart
//!   ([`server::reload`]), closing connections a reload revoked
//!   ([`server::revoke`]), rate-limited log lines ([`server::lograte`]),
//!   health, reflection, [`run`].
//! - [`receipt`]: signed receipts of answers (compact JWS), their keys, JWKS
//!   and offline verification.
//! - [`audit`]: the audit trail of answers (keyed number hashes, a Redis
//!   Stream written in the background).
//! - [`config`]: layered, validated configuration of `serve`.
//! - [`cli`]: operator commands (dev certificates, token issuer keys and
//!   tokens, synthetic data, demo).

pub mod api;
pub mod audit;
pub mod cli;
pub mod config;
pub mod domain;
pub mod import;
pub mod receipt;
pub mod server;
pub mod store;

pub use server::run;
