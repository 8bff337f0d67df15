//! `reassigned health`: a probe for scripts and container health checks
//! (Docker `HEALTHCHECK`). Exit status 0 when the server is ready, 1
//! otherwise, with the reason on stderr.
//!
//! With `--admin` it asks the admin listener's `GET /readyz` over plain HTTP
//! (no certificates needed); without it, the gRPC health service
//! (`grpc.health.v1.Health/Check`) over mutual TLS with `--ca`, `--cert` and
//! `--key`, like the other client subcommands.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tonic::transport::Endpoint;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use super::bench::parse_duration;
use super::client::client_tls;

/// The options of `reassigned health`.
#[derive(Clone, Debug, clap::Args)]
pub struct HealthOptions {
    /// The server to probe, as HOST:PORT: the admin listener with
    /// `--admin`, else the gRPC (mutual TLS) port.
    #[arg(long)]
    pub addr: String,
    /// Ask the admin listener's `GET /readyz` (plain HTTP) instead of the
    /// gRPC health service.
    #[arg(long)]
    pub admin: bool,
    /// CA certificate(s) that sign the server certificate (PEM); gRPC only.
    #[arg(long, required_unless_present = "admin")]
    pub ca: Option<PathBuf>,
    /// Client (platform) certificate chain (PEM); gRPC only.
    #[arg(long, required_unless_present = "admin")]
    pub cert: Option<PathBuf>,
    /// Private key of the client certificate (PEM); gRPC only.
    #[arg(long, required_unless_present = "admin")]
    pub key: Option<PathBuf>,
    /// The name the server certificate must be valid for; gRPC only.
    #[arg(long, default_value = "localhost")]
    pub server_name: String,
    /// The gRPC service to ask about (default: the server as a whole).
    #[arg(long, default_value = "")]
    pub service: String,
    /// Give up after this long, e.g. `3s`, `500ms`.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub timeout: Duration,
}

/// Probes the server: `Ok` with a one-line description when it is ready,
/// an error saying why otherwise (the binary exits 1).
pub async fn probe(options: &HealthOptions) -> anyhow::Result<String> {
    if options.admin {
        let (status, body) = crate::server::admin::get(&options.addr, "/readyz", options.timeout).await?;
        if status != 200 {
            bail!("not ready: {body} (HTTP {status} from {}/readyz)", options.addr);
        }
        return Ok(format!("ready ({}/readyz)", options.addr));
    }
    let (Some(ca), Some(cert), Some(key)) = (&options.ca, &options.cert, &options.key) else {
        bail!("the gRPC health check needs --ca, --cert and --key (or use --admin)");
    };
    let tls = client_tls(ca, cert, key, &options.server_name)?;
    let endpoint = Endpoint::from_shared(format!("https://{}", options.addr))
        .with_context(|| format!("--addr {:?} is not HOST:PORT", options.addr))?
        .tls_config(tls)
        .context("cannot use the TLS material")?
        .connect_timeout(options.timeout)
        .timeout(options.timeout);
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("cannot connect to {} over TLS", options.addr))?;
    let answer = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: options.service.clone(),
        })
        .await
        .with_context(|| format!("health check of {} failed", options.addr))?
        .into_inner();
    let status = ServingStatus::try_from(answer.status).unwrap_or(ServingStatus::Unknown);
    if status != ServingStatus::Serving {
        bail!("not serving: {} says {}", options.addr, status.as_str_name());
    }
    Ok(format!("serving ({})", options.addr))
}
