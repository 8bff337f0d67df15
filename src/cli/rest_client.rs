//! A small HTTP/1.1 client of the REST face over mutual TLS, one keep-alive
//! connection per client: the REST mode of `reassigned bench` (and the
//! tests) use it.

use std::sync::Arc;

use anyhow::Context as _;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// The TLS side of a REST client: CA, client certificate, server name.
#[derive(Clone)]
pub struct RestTls {
    config: Arc<rustls::ClientConfig>,
    server_name: ServerName<'static>,
}

impl RestTls {
    /// Trusts `ca_pem`, presents `cert_pem` with `key_pem`, expects the
    /// server certificate to name `server_name`; offers ALPN `http/1.1`.
    pub fn new(ca_pem: &[u8], cert_pem: &[u8], key_pem: &[u8], server_name: &str) -> anyhow::Result<Self> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem) {
            roots.add(cert.context("the CA file is not PEM")?)?;
        }
        let chain = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .context("the certificate file is not PEM")?;
        let key = PrivateKeyDer::from_pem_slice(key_pem).context("the key file holds no private key")?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            config: Arc::new(config),
            server_name: ServerName::try_from(server_name.to_owned())
                .with_context(|| format!("{server_name:?} is not a server name"))?,
        })
    }
}

/// One HTTP/1.1 keep-alive connection to the REST face.
pub struct RestClient {
    sender: SendRequest<Full<Bytes>>,
    authorization: Option<HeaderValue>,
    host: HeaderValue,
}

/// A response: status, headers, body.
#[derive(Debug)]
pub struct RestResponse {
    /// The HTTP status.
    pub status: StatusCode,
    /// The headers.
    pub headers: HeaderMap,
    /// The body.
    pub body: Bytes,
}

impl RestResponse {
    /// The body as JSON.
    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_slice(&self.body).context("the response body is not JSON")
    }
}

impl RestClient {
    /// Connects to `target` (HOST:PORT) with `tls`; `token` is sent as
    /// `authorization: Bearer ...` on every request.
    pub async fn connect(target: &str, tls: &RestTls, token: Option<&str>) -> anyhow::Result<Self> {
        let tcp = tokio::net::TcpStream::connect(target)
            .await
            .with_context(|| format!("cannot connect to {target}"))?;
        tcp.set_nodelay(true)?;
        let stream = tokio_rustls::TlsConnector::from(tls.config.clone())
            .connect(tls.server_name.clone(), tcp)
            .await
            .with_context(|| format!("TLS handshake with {target} failed"))?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            // Ends when the client is dropped or the server closes.
            let _ = connection.await;
        });
        let authorization = token
            .map(|t| HeaderValue::from_str(&format!("Bearer {}", t.trim())))
            .transpose()
            .context("the token is not a valid header value")?;
        Ok(Self {
            sender,
            authorization,
            host: HeaderValue::from_str(target).context("the target is not a valid host")?,
        })
    }

    /// Sends `method path` with `headers` and `body` (JSON content type
    /// when not empty, unless `headers` sets one).
    pub async fn send(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> anyhow::Result<RestResponse> {
        let body = body.into();
        let mut request = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, self.host.clone());
        if let Some(auth) = &self.authorization {
            request = request.header(http::header::AUTHORIZATION, auth.clone());
        }
        if !body.is_empty()
            && !headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        {
            request = request.header(http::header::CONTENT_TYPE, "application/json");
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(Full::new(body))?;
        self.sender.ready().await?;
        let response = self.sender.send_request(request).await?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(RestResponse {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    /// `POST path` with a JSON body.
    pub async fn post_json(&mut self, path: &str, body: &serde_json::Value) -> anyhow::Result<RestResponse> {
        self.send(Method::POST, path, &[], serde_json::to_vec(body)?)
            .await
    }
}
