//! The client side of a connection, for every client command (`bench`,
//! `health`, `publish`, `watch`, `watchlist`): where and as whom
//! ([`TlsTarget`], [`client_tls`]), with which token (`Bearer`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Request, Status};

/// The server a command connects to and the client's TLS identity (flatten
/// into a subcommand; `bench`, `publish`, `watch` and `watchlist` share it).
#[derive(Clone, Debug, clap::Args)]
pub struct TlsTarget {
    /// The server, as HOST:PORT.
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub target: String,
    /// The name the server certificate must be valid for.
    #[arg(long, default_value = "localhost")]
    pub server_name: String,
    /// CA certificate(s) that sign the server certificate (PEM).
    #[arg(long)]
    pub ca: PathBuf,
    /// Client certificate chain (PEM): the platform's, or to publish the
    /// operator's.
    #[arg(long)]
    pub cert: PathBuf,
    /// Private key of the client certificate (PEM).
    #[arg(long)]
    pub key: PathBuf,
}

impl TlsTarget {
    /// An endpoint of `target` over mutual TLS as `cert` (not connected).
    pub(crate) fn endpoint(&self) -> anyhow::Result<Endpoint> {
        self.endpoint_as(&self.cert, &self.key)
    }

    /// The same TLS material for the REST face (`bench --rest`).
    pub(crate) fn rest_tls(&self) -> anyhow::Result<super::rest_client::RestTls> {
        super::rest_client::RestTls::new(
            &read_pem("CA", &self.ca)?,
            &read_pem("certificate", &self.cert)?,
            &read_pem("key", &self.key)?,
            &self.server_name,
        )
    }

    /// [`Self::endpoint`] with another client identity (`bench`'s watchers).
    pub(crate) fn endpoint_as(&self, cert: &Path, key: &Path) -> anyhow::Result<Endpoint> {
        let tls = client_tls(&self.ca, cert, key, &self.server_name)?;
        let target = &self.target;
        Ok(Endpoint::from_shared(format!("https://{target}"))
            .with_context(|| format!("--target {target:?} is not HOST:PORT"))?
            .tls_config(tls)
            .context("cannot use the TLS material")?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(10)))
    }
}

/// Where a client command connects and as whom (flatten into a subcommand).
#[derive(Clone, Debug, clap::Args)]
pub struct ClientArgs {
    /// The server and the client's TLS identity.
    #[command(flatten)]
    pub tls: TlsTarget,
    /// A bearer token sent with every call (`authorization: Bearer ...`), as
    /// minted by `reassigned token mint`; also from `REASSIGNED_TOKEN`.
    #[arg(long, env = "REASSIGNED_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// A channel that adds the bearer token, if any.
pub(crate) type Client = InterceptedService<Channel, Bearer>;

impl ClientArgs {
    /// Connects one channel.
    pub(crate) async fn connect(&self) -> anyhow::Result<Client> {
        let channel = self
            .tls
            .endpoint()?
            .connect()
            .await
            .with_context(|| format!("cannot connect to {} over TLS", self.tls.target))?;
        Ok(InterceptedService::new(
            channel,
            Bearer::new(self.token.as_deref())?,
        ))
    }
}

/// The client side of mutual TLS from files, as the client subcommands
/// (`bench`, `health`) take them: `--ca`, `--cert`, `--key`, and the name
/// the server certificate must be valid for (`--server-name`).
pub fn client_tls(ca: &Path, cert: &Path, key: &Path, server_name: &str) -> anyhow::Result<ClientTlsConfig> {
    Ok(ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read_pem("CA", ca)?))
        .identity(Identity::from_pem(
            read_pem("certificate", cert)?,
            read_pem("key", key)?,
        ))
        .domain_name(server_name.to_owned()))
}

/// One PEM file of the TLS material; the error names `what` and the path.
fn read_pem(what: &str, path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read the {what} file {}", path.display()))
}

/// Adds `authorization: Bearer <token>` to every call when a token is given.
#[derive(Clone)]
pub(crate) struct Bearer(Option<MetadataValue<Ascii>>);

impl Bearer {
    /// Sends `token` (none: nothing); an error if it is not a header value.
    pub(crate) fn new(token: Option<&str>) -> anyhow::Result<Self> {
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
