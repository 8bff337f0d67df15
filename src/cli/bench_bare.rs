//! `reassigned bench-bare`: the bare reference server of the benchmarks.
//!
//! [`serve_bare`] serves `ReassignedNumbers` over the server's own transport
//! ([`server::transport`]: TLS acceptor, layers, limits) but answers fixed
//! messages without a store: the ceiling of the framework on this machine,
//! to which the real server's throughput is compared (`deploy/bench/run.sh`).
//! It stops on SIGTERM or SIGINT like `reassigned serve`.
//!
//! Nothing here prints or logs a phone number.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;

use anyhow::Context as _;
use futures_util::{Stream, StreamExt as _};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status, Streaming};

use crate::api::pb;
use crate::api::pb::reassigned_numbers_server::{ReassignedNumbers, ReassignedNumbersServer};
use crate::server;
use crate::server::tls::{self, TlsFiles};

/// The `data_as_of` of every bare answer.
const BARE_AS_OF: &str = "2026-01-01";

/// Options of `reassigned bench-bare` (flatten into the subcommand).
#[derive(Clone, Debug, clap::Args)]
pub struct BareOptions {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:50052")]
    pub listen: SocketAddr,
    /// Server certificate chain (PEM).
    #[arg(long)]
    pub tls_cert: PathBuf,
    /// Private key of the server certificate (PEM).
    #[arg(long)]
    pub tls_key: PathBuf,
    /// CA certificate(s) that sign client certificates (PEM).
    #[arg(long)]
    pub client_ca: PathBuf,
}

/// `ReassignedNumbers` answering fixed messages without a store: every
/// number is NOT_REASSIGNED, no input is checked, no receipt is signed.
#[derive(Clone, Copy, Debug, Default)]
pub struct BareService;

fn bare_answer(phone_number: String) -> pb::CheckNumberResponse {
    pb::CheckNumberResponse {
        phone_number,
        status: pb::ReassignmentStatus::NotReassigned as i32,
        data_as_of: BARE_AS_OF.to_owned(),
        no_data_reason: pb::NoDataReason::Unspecified as i32,
        ..Default::default()
    }
}

fn bare_result(phone_number: String) -> pb::BatchCheckResult {
    pb::BatchCheckResult {
        result: Some(pb::batch_check_result::Result::Answer(bare_answer(phone_number))),
    }
}

/// The response stream of [`BareService`]'s `StreamCheckNumbers`.
pub type BareStream = Pin<Box<dyn Stream<Item = Result<pb::BatchCheckResult, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl ReassignedNumbers for BareService {
    async fn check_number(
        &self,
        request: Request<pb::CheckNumberRequest>,
    ) -> Result<Response<pb::CheckNumberResponse>, Status> {
        Ok(Response::new(bare_answer(request.into_inner().phone_number)))
    }

    async fn batch_check_numbers(
        &self,
        request: Request<pb::BatchCheckNumbersRequest>,
    ) -> Result<Response<pb::BatchCheckNumbersResponse>, Status> {
        let results = request
            .into_inner()
            .checks
            .into_iter()
            .map(|check| bare_result(check.phone_number))
            .collect();
        Ok(Response::new(pb::BatchCheckNumbersResponse { results }))
    }

    type StreamCheckNumbersStream = BareStream;

    async fn stream_check_numbers(
        &self,
        request: Request<Streaming<pb::CheckNumberRequest>>,
    ) -> Result<Response<Self::StreamCheckNumbersStream>, Status> {
        let results = request
            .into_inner()
            .map(|check| check.map(|check| bare_result(check.phone_number)));
        Ok(Response::new(Box::pin(results)))
    }

    async fn get_mirror_status(
        &self,
        _request: Request<pb::GetMirrorStatusRequest>,
    ) -> Result<Response<pb::GetMirrorStatusResponse>, Status> {
        Ok(Response::new(pb::GetMirrorStatusResponse::default()))
    }

    async fn get_signing_keys(
        &self,
        _request: Request<pb::GetSigningKeysRequest>,
    ) -> Result<Response<pb::GetSigningKeysResponse>, Status> {
        Err(Status::failed_precondition("the bare server signs no receipts"))
    }
}

/// Serves [`BareService`] on `listener` until `shutdown` resolves, over
/// the server's own transport ([`server::transport`]: the same TLS
/// acceptor, layers and limits as `reassigned serve` with its defaults,
/// mTLS without bearer tokens), plus health.
pub async fn serve_bare<F>(listener: TcpListener, tls_files: TlsFiles, shutdown: F) -> anyhow::Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    let config = tls::server_config(&tls_files)?;
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_serving::<ReassignedNumbersServer<BareService>>()
        .await;
    let metrics = server::metrics::MetricsHandle::default();
    let (mut transport, incoming) =
        server::transport(listener, config, server::Limits::default(), &metrics, None);
    transport
        .add_service(health)
        .add_service(ReassignedNumbersServer::new(BareService))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}

/// `reassigned bench-bare`: binds `--listen` and runs [`serve_bare`] until
/// SIGTERM or SIGINT.
pub async fn run_bare(opts: &BareOptions) -> anyhow::Result<()> {
    let listener = TcpListener::bind(opts.listen)
        .await
        .with_context(|| format!("cannot listen on {}", opts.listen))?;
    tracing::info!(addr = %listener.local_addr()?, "bare server listening (fixed answers, no store)");
    let files = TlsFiles {
        cert: opts.tls_cert.clone(),
        key: opts.tls_key.clone(),
        client_ca: opts.client_ca.clone(),
    };
    serve_bare(listener, files, crate::cli::shutdown_signal()).await
}
