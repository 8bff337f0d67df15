//! The client side of the operator and platform commands (`bench`,
//! `watch`, `watchlist`): a TLS endpoint presenting a client certificate,
//! and the bearer token sent with every call.

use std::path::{Path, PathBuf};

use anyhow::Context;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Request, Status};

/// Where a client command connects and as whom (flatten into a subcommand).
#[derive(Clone, Debug, clap::Args)]
pub struct ClientArgs {
    /// The server, as HOST:PORT.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub target: String,
    /// The name the server certificate must be valid for.
    #[arg(long, default_value = "localhost")]
    pub server_name: String,
    /// CA certificate(s) that sign the server certificate (PEM).
    #[arg(long)]
    pub ca: PathBuf,
    /// Client certificate chain (PEM).
    #[arg(long)]
    pub cert: PathBuf,
    /// Private key of the client certificate (PEM).
    #[arg(long)]
    pub key: PathBuf,
    /// A bearer token sent with every call (`authorization: Bearer ...`), as
    /// minted by `reassigned token mint`; also from `REASSIGNED_TOKEN`.
    #[arg(long, env = "REASSIGNED_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// A channel that adds the bearer token, if any.
pub type Client = InterceptedService<Channel, Bearer>;

impl ClientArgs {
    /// Connects one channel.
    pub async fn connect(&self) -> anyhow::Result<Client> {
        let channel = tls_endpoint(&self.target, &self.server_name, &self.ca, &self.cert, &self.key)?
            .connect()
            .await
            .with_context(|| format!("cannot connect to {} over TLS", self.target))?;
        Ok(InterceptedService::new(
            channel,
            Bearer::new(self.token.as_deref())?,
        ))
    }
}

/// An endpoint for `https://target` trusting `ca`, presenting the client
/// certificate `cert` / `key`.
pub fn tls_endpoint(
    target: &str,
    server_name: &str,
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> anyhow::Result<Endpoint> {
    let read = |what: &str, path: &Path| {
        std::fs::read(path).with_context(|| format!("cannot read the {what} file {}", path.display()))
    };
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("CA", ca)?))
        .identity(Identity::from_pem(read("certificate", cert)?, read("key", key)?))
        .domain_name(server_name.to_owned());
    Ok(Endpoint::from_shared(format!("https://{target}"))
        .with_context(|| format!("--target {target:?} is not HOST:PORT"))?
        .tls_config(tls)
        .context("cannot use the TLS material")?
        .tcp_nodelay(true)
        .connect_timeout(std::time::Duration::from_secs(10)))
}

/// Adds `authorization: Bearer <token>` to every call when a token is given.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl Bearer {
    /// Sends `token` (none: no header).
    pub fn new(token: Option<&str>) -> anyhow::Result<Self> {
        token
            .map(|t| {
                MetadataValue::try_from(format!("Bearer {}", t.trim()))
                    .map_err(|_| anyhow::anyhow!("--token is not a valid header value"))
            })
            .transpose()
            .map(Self)
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}
