//! The client commands' connection (`publish`, `watch`, `watchlist`):
//! where, as whom, with which token; [`TlsTarget`], the server and the TLS
//! identity, is `bench`'s too (the token interceptor is `bench`'s).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use super::bench::{Bearer, client_tls};

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
