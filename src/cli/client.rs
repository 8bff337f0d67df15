//! The client commands' connection (`publish`, `watch`, `watchlist`):
//! where, as whom, with which token (the TLS endpoint and the token
//! interceptor are `bench`'s).

use std::path::PathBuf;

use anyhow::Context;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use super::bench::{Bearer, tls_endpoint};

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
    /// Client certificate chain (PEM): the operator's or the platform's.
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
pub(crate) type Client = InterceptedService<Channel, Bearer>;

impl ClientArgs {
    /// Connects one channel.
    pub(crate) async fn connect(&self) -> anyhow::Result<Client> {
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
