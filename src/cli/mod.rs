//! Operator commands: certificates and other tooling behind `reassigned <command>`.
pub mod audit;
pub mod bench;
pub mod bench_bare;
pub mod bench_fanout;
pub mod certs;
pub mod client;
mod commands;
pub mod generate;
pub mod health;
pub mod loadgen;
pub mod publish;
pub mod receipt;
pub mod rest_client;
pub mod token;
pub mod watch;

pub use commands::{
    EXIT_INTERRUPTED, SyncMetricsArgs, exit_code, gc, import_with, sync_every, sync_observed, sync_with,
    verify,
};
pub use commands::{
    certs_dev, demo, generate_cmd, import, init_tracing, open_store, serve, shutdown_signal, sync,
};
