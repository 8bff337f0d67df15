//! `reassigned`: a gRPC mirror of a national register of reassigned (recycled)
//! phone numbers. It answers platforms, at login speed, "has this number changed
//! hands since date X?" over mutual TLS.
//!
//! # Layout
//! A request flows: TLS accept -> auth layer -> handler -> domain rule -> store.
//!
//! - [`domain`]: E.164 numbers, calendar dates and the answer rule (plain Rust,
//!   no tonic, no redis).
//! - [`store`]: the [`store::Store`] trait and its input types
//!   ([`store::Records`], checked once when built; the snapshot and delta
//!   writes), the Redis store (production) and the embedded in-process
//!   store (default without Redis).
//! - [`import`]: manifests and CSV data files of the national register, their
//!   checks, applying snapshots and deltas in sequence order, and the
//!   embedded store's directory (load at start, background resync).
//! - [`federation`]: operators' published disconnections, platforms' watch
//!   lists and the event log between them.
//! - [`identity`]: who is calling: the certificate-identity rule
//!   ([`identity::Platform`]), the connection's [`identity::PeerInfo`], token
//!   [`identity::Scopes`], the request's [`identity::Principal`] (no tonic).
//! - [`quota`]: per-platform quotas (request rate, numbers per day), a policy
//!   the handlers apply.
//! - [`api`]: the generated protobuf code, conversions, the service handlers,
//!   and the one table of the proto's methods ([`api::methods`]: scope,
//!   metrics label, streaming kind).
//! - [`server`]: TLS material ([`server::tls`]) and the accept loop
//!   ([`server::accept`]), the auth layer with certificate-bound
//!   bearer tokens ([`server::token`]), reloading TLS material without a
//!   restart ([`server::reload`]), closing connections a reload revoked
//!   ([`server::revoke`]), metrics ([`server::metrics`]: gRPC and REST
//!   calls), the admin listener of probes and metrics ([`server::admin`]),
//!   the metrics of a `reassigned sync` process ([`server::sync_metrics`]),
//!   the access log and trace export ([`server::trace`]), health,
//!   reflection, [`run`].
//! - [`receipt`]: signed receipts of answers (compact JWS), their keys, JWKS
//!   and offline verification.
//! - [`audit`]: the audit trail of answers (keyed number hashes, a Redis
//!   Stream written in the background).
//! - [`lograte`]: rate-limited log lines (used by every room).
//! - [`stats`]: lock-free latency histograms (store calls, server calls)
//!   read by the metrics endpoint.
//! - [`rest`]: the REST face (CAMARA Number Recycling v0.2.0, JSON
//!   batches, the OpenAPI document) over the gRPC handlers' service paths;
//!   its port is the server's ([`server::rest_port`]).
//! - [`config`]: the one table of `serve`'s settings (name, flag,
//!   environment variable, default, doc) and their validation into a plain
//!   [`config::ServeConfig`]; the server makes its runtime handles from it.
//! - [`cli`]: operator commands (dev certificates, token issuer keys and
//!   tokens, synthetic data, demo).
//!
//! # Who may import whom
//! Imports run one way, from transport down to the domain. `tests/layout.rs`
//! reads every `crate::` path of `src/` (comments and test modules aside) and
//! fails on an import this table does not allow.
//!
//! | module | may import (besides its own submodules) |
//! |---|---|
//! | `domain` | nothing |
//! | `lograte` | nothing |
//! | `stats` | nothing |
//! | `identity` | `domain` |
//! | `store` | `domain`, `lograte`, `stats` |
//! | `import` | `domain`, `store`, `lograte` |
//! | `federation` | `domain`, `store`, `lograte` |
//! | `audit`, `receipt`, `quota` | `domain` |
//! | `api` | `domain`, `identity`, `store`, `federation`, `audit`, `receipt`, `quota`, `lograte`; never `server` |
//! | `rest` | `domain`, `identity`, `store`, `api`, `lograte`; never `server` |
//! | `server` | `domain`, `identity`, `store`, `federation`, `audit`, `receipt`, `quota`, `lograte`, `stats`, `api`, `rest`, `config` (not `import`, not `cli`) |
//! | `config` | `domain`, `identity`, `store`, `federation`, `import`, `audit`, `receipt`, `quota` (plain data: never `server`, `cli`, `api`) |
//! | `cli` | everything |
//!
//! Inside `server`, the submodules (`tls`, `accept`, `token`, `auth`, `revoke`,
//! `reload`, `metrics`, `admin`, ...) import each other without a circle: identity and
//! scopes come from [`identity`], the method table from [`api::methods`].

pub mod api;
pub mod audit;
pub mod cli;
pub mod config;
pub mod domain;
pub mod federation;
pub mod identity;
pub mod import;
pub mod lograte;
pub mod quota;
pub mod receipt;
pub mod rest;
pub mod server;
pub mod stats;
pub mod store;

pub use server::run;
