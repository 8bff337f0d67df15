//! TLS material: loading the server certificate and key, the client CA
//! bundle and the client CRLs, building the rustls [`ServerConfig`] (mutual
//! TLS, ALPN h2), and reloading them without a restart.
//!
//! We terminate TLS ourselves instead of using tonic's `ServerTlsConfig` so
//! that we control the handshake (see [`crate::server::accept`], the accept
//! loop) and so that [`TlsMaterial::reload`] can replace the server
//! certificate, the client CA bundle and the client CRLs without a restart:
//! each new handshake takes the current [`ServerConfig`] from an
//! [`ArcSwap`] ([`SharedServerConfig`]), while open connections keep the
//! one they were made with (but are closed, after their calls, when a
//! reload refuses their client certificate: see [`crate::server::revoke`]).
//! Revocation policy: see [`TlsMaterial`]. When reloads happen: see
//! [`crate::server::reload`].

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arc_swap::{ArcSwap, ArcSwapOption};
use rustls::crypto::CryptoProvider;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{InconsistentKeys, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use x509_parser::prelude::FromDer as _;
use x509_parser::x509::SubjectPublicKeyInfo;

use crate::server::revoke::OpenConnections;

/// Where the server's TLS material lives on disk (all PEM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Server certificate chain, leaf first.
    pub cert: PathBuf,
    /// Private key of the leaf (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA certificates that sign client (platform) certificates.
    pub client_ca: PathBuf,
}

/// What went wrong while loading TLS material. Messages name the file and
/// never include key material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {what} file {}: {error}", path.display())]
    Read {
        /// Which file: "certificate", "private key" or "client CA".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error (in the message; not a `source`, which a chain
        /// would print twice).
        error: io::Error,
    },
    /// A file is not well-formed PEM.
    #[error("{what} file {} is not valid PEM: {reason}", path.display())]
    Pem {
        /// Which file: "certificate", "private key" or "client CA".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What the PEM parser reported.
        reason: String,
    },
    /// A certificate file holds no `CERTIFICATE` section.
    #[error("no certificate found in {what} file {}", path.display())]
    NoCertificate {
        /// Which file: "certificate" or "client CA".
        what: &'static str,
        /// The file.
        path: PathBuf,
    },
    /// A key file holds no private key section.
    #[error("no private key (PKCS#8, PKCS#1 or SEC1 PEM) found in {}", path.display())]
    NoPrivateKey {
        /// The file.
        path: PathBuf,
    },
    /// The private key is of a type or curve the crypto provider cannot use.
    #[error("private key in {} is not usable: {reason}", path.display())]
    UnusableKey {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The leaf certificate cannot be parsed.
    #[error("certificate in {} cannot be parsed: {reason}", path.display())]
    BadCertificate {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The private key is not the key of the leaf certificate.
    #[error("private key {} does not match the certificate in {}", key.display(), cert.display())]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// A client CA certificate cannot be used as a trust anchor.
    #[error("client CA file {}: certificate #{index} is not a usable trust anchor: {reason}", path.display())]
    BadClientCa {
        /// The file.
        path: PathBuf,
        /// Position of the certificate in the file, from 1.
        index: usize,
        /// Why.
        reason: String,
    },
    /// A CRL file holds no `X509 CRL` section.
    #[error("no CRL found in client CRL file {}", path.display())]
    NoCrl {
        /// The file.
        path: PathBuf,
    },
    /// A CRL cannot be parsed.
    #[error("client CRL file {}: CRL #{index} cannot be parsed: {reason}", path.display())]
    BadCrl {
        /// The file.
        path: PathBuf,
        /// Position of the CRL in the file, from 1.
        index: usize,
        /// Why.
        reason: String,
    },
    /// The client certificate verifier could not be built.
    #[error("cannot build the client certificate verifier: {0}")]
    Verifier(rustls::server::VerifierBuilderError),
    /// rustls refused the configuration.
    #[error("cannot build the TLS server configuration: {0}")]
    Config(rustls::Error),
}

/// The crypto provider used everywhere in this module: ring, never aws-lc-rs
/// (see STACK.md, "crypto-provider trap").
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Server TLS material that can be replaced while the server runs.
///
/// Two swaps make a reload take effect for new connections only, without
/// touching connections already open:
/// - the server certificate is resolved through an [`ArcSwap`] on every
///   handshake, so even a [`ServerConfig`] handed out earlier by
///   [`TlsMaterial::server_config`] serves the new certificate;
/// - the client CA bundle and the CRLs live in the client certificate
///   verifier, which is fixed inside a [`ServerConfig`]; a reload therefore
///   builds a new `ServerConfig` and stores it in [`SharedServerConfig`],
///   which [`incoming`](crate::server::accept::incoming) reads for every new handshake.
///
/// A reload is all or nothing: if any file is missing or unusable, nothing
/// changes and the error names the file.
///
/// # Revocation
/// CRLs (PEM or DER, see [`TlsMaterial::load_with_crls`]) are checked for
/// every certificate of the client's chain except the trust anchor (not only
/// the end entity), so a revoked intermediate also refuses its clients.
/// Unknown revocation status is allowed: a certificate whose issuer has no
/// CRL configured is accepted, so one CA's CRL does not lock out the clients
/// of every other CA in the bundle. A CRL past its `nextUpdate` is still
/// enforced (and logged as outdated at load): an old list of revoked
/// certificates is better than none.
#[derive(Debug)]
pub struct TlsMaterial {
    files: TlsFiles,
    client_crls: Vec<PathBuf>,
    provider: Arc<CryptoProvider>,
    current: Arc<ArcSwap<CertifiedKey>>,
    config: SharedServerConfig,
    summary: ArcSwap<TlsSummary>,
    /// Serialises reloads, so an older reading never overwrites a newer one.
    reloading: Mutex<()>,
}

impl TlsMaterial {
    /// Load the server certificate chain and key from `files`, checking that
    /// the key belongs to the leaf certificate, and the client CA bundle.
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        Self::load_with_crls(files, Vec::new())
    }

    /// Like [`TlsMaterial::load`], and also enforce the certificate
    /// revocation lists in `client_crls` at the handshake. Each file holds
    /// one or more PEM `X509 CRL` sections, or one DER CRL.
    pub fn load_with_crls(files: TlsFiles, client_crls: Vec<PathBuf>) -> Result<Self, TlsError> {
        let provider = provider();
        let loaded = Loaded::read(&files, &client_crls, &provider)?;
        let summary = ArcSwap::from_pointee(loaded.summary());
        let current = Arc::new(ArcSwap::from_pointee(loaded.key));
        let (config, verifier) = build_config(&provider, &current, loaded.roots, loaded.crls)?;
        Ok(Self {
            files,
            client_crls,
            provider,
            current,
            config: SharedServerConfig {
                http1: Arc::new(ArcSwap::new(with_http1_alpn(&config))),
                use_http1: false,
                config: Arc::new(ArcSwap::new(config)),
                verifier: Arc::new(ArcSwapOption::from_pointee(verifier)),
                connections: OpenConnections::new(),
            },
            summary,
            reloading: Mutex::new(()),
        })
    }

    /// Re-read every file (certificate, key, client CA bundle, CRLs) and use
    /// them for new connections. On error nothing changes: the previous
    /// material stays in use and the error names the file and the reason.
    pub fn reload(&self) -> Result<TlsSummary, TlsError> {
        let _serialised = self
            .reloading
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let loaded = Loaded::read(&self.files, &self.client_crls, &self.provider)?;
        let summary = loaded.summary();
        // Build everything before swapping anything. The new config resolves
        // through `current` like the old ones, and no handshake sees it
        // before the key below is in place.
        let (config, verifier) = build_config(&self.provider, &self.current, loaded.roots, loaded.crls)?;
        self.current.store(Arc::new(loaded.key));
        // The verifier first: a handshake that sees the new config checks
        // itself with it (see `accept::accept_loop`).
        self.config.verifier.store(Some(Arc::new(verifier.clone())));
        self.config.store(config);
        self.summary.store(Arc::new(summary.clone()));
        // Open connections whose certificate the new CAs or CRLs refuse are
        // closed once their calls finish (see [`crate::server::revoke`]).
        let closing = self.config.connections.revalidate(verifier.as_ref());
        if closing > 0 {
            tracing::info!(
                connections = closing,
                "reload: closing connections whose client certificate is no longer accepted"
            );
        }
        Ok(summary)
    }

    /// The files this material is loaded from.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// The CRL files enforced at the handshake.
    pub fn client_crls(&self) -> &[PathBuf] {
        &self.client_crls
    }

    /// Every file a reload reads: certificate, key, client CA bundle, CRLs.
    pub fn watched_files(&self) -> Vec<PathBuf> {
        let mut paths = vec![
            self.files.cert.clone(),
            self.files.key.clone(),
            self.files.client_ca.clone(),
        ];
        paths.extend(self.client_crls.iter().cloned());
        paths
    }

    /// The certificate chain currently served (leaf first).
    pub fn current_chain(&self) -> Vec<CertificateDer<'static>> {
        self.current.load().cert.clone()
    }

    /// What is loaded now (subject, serial and expiry of the leaf, counts of
    /// client CAs, CRLs and revoked serials).
    pub fn summary(&self) -> TlsSummary {
        self.summary.load().as_ref().clone()
    }

    /// The rustls server configuration currently in force: client
    /// certificates required and verified against `files.client_ca` and the
    /// CRLs, safe default protocol versions, ALPN `h2`, server certificate
    /// served from this handle. A later [`TlsMaterial::reload`] swaps in a
    /// new configuration; use [`TlsMaterial::shared_config`] to follow it.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        Ok(self.config.current())
    }

    /// The swappable configuration to hand to [`incoming`](crate::server::accept::incoming): every new
    /// handshake uses the configuration of the latest successful reload.
    pub fn shared_config(&self) -> SharedServerConfig {
        self.config.clone()
    }
}

/// A [`ServerConfig`] that a reload can replace; [`incoming`](crate::server::accept::incoming) takes the
/// current one for every new handshake, so open connections keep theirs,
/// and registers every connection it hands over in [`OpenConnections`], so
/// a reload that revokes a connection's certificate closes it.
#[derive(Debug, Clone)]
pub struct SharedServerConfig {
    config: Arc<ArcSwap<ServerConfig>>,
    /// `config` with ALPN `h2` and `http/1.1` (the REST face), swapped with it.
    http1: Arc<ArcSwap<ServerConfig>>,
    /// Whether [`SharedServerConfig::current`] gives `http1`.
    use_http1: bool,
    /// The client certificate verifier of `config` (`None`: fixed config).
    verifier: Arc<ArcSwapOption<Arc<dyn ClientCertVerifier>>>,
    connections: OpenConnections,
}

impl SharedServerConfig {
    /// The configuration in force now.
    pub fn current(&self) -> Arc<ServerConfig> {
        if self.use_http1 {
            self.http1.load_full()
        } else {
            self.config.load_full()
        }
    }

    /// The same material, reloaded with it, offering ALPN `h2` and
    /// `http/1.1` (the REST face: REST clients speak HTTP/1.1). Its
    /// connections are registered with this one's (a reload revokes them too).
    pub fn with_http1(&self) -> Self {
        Self {
            use_http1: true,
            ..self.clone()
        }
    }

    /// Puts `config` in service (and its HTTP/1.1 twin).
    fn store(&self, config: Arc<ServerConfig>) {
        self.http1.store(with_http1_alpn(&config));
        self.config.store(config);
    }

    /// The connections made with this configuration and still open.
    pub fn connections(&self) -> OpenConnections {
        self.connections.clone()
    }

    /// The client certificate verifier in force now (`None`: a fixed
    /// configuration made without [`TlsMaterial`]).
    pub fn verifier(&self) -> Option<Arc<Arc<dyn ClientCertVerifier>>> {
        self.verifier.load_full()
    }
}

impl From<Arc<ServerConfig>> for SharedServerConfig {
    /// A configuration that never changes.
    fn from(config: Arc<ServerConfig>) -> Self {
        Self {
            http1: Arc::new(ArcSwap::new(with_http1_alpn(&config))),
            use_http1: false,
            config: Arc::new(ArcSwap::new(config)),
            verifier: Arc::new(ArcSwapOption::empty()),
            connections: OpenConnections::new(),
        }
    }
}

/// What a load or reload put in service, for the logs. Holds no key material.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsSummary {
    /// Subject of the server's leaf certificate.
    pub subject: String,
    /// Serial number of the leaf, hex.
    pub serial: String,
    /// End of the leaf's validity.
    pub not_after: String,
    /// End of the leaf's validity, Unix seconds (0 if unreadable).
    pub not_after_unix: i64,
    /// Trust anchors in the client CA bundle.
    pub client_cas: usize,
    /// CRLs enforced.
    pub crls: usize,
    /// Serial numbers revoked by those CRLs, all issuers together.
    pub revoked: usize,
}

/// Everything read from disk for one load, checked, not yet in service.
struct Loaded {
    key: CertifiedKey,
    roots: RootCertStore,
    crls: Vec<CertificateRevocationListDer<'static>>,
    revoked: usize,
}

impl Loaded {
    fn read(files: &TlsFiles, client_crls: &[PathBuf], provider: &CryptoProvider) -> Result<Self, TlsError> {
        let key = load_certified_key(files, provider)?;
        let (roots, subjects) = load_client_roots(&files.client_ca)?;
        let mut crls = Vec::new();
        let mut revoked = 0;
        for path in client_crls {
            for crl in read_crls(path, &subjects)? {
                revoked += crl.1;
                crls.push(crl.0);
            }
        }
        Ok(Self {
            key,
            roots,
            crls,
            revoked,
        })
    }

    fn summary(&self) -> TlsSummary {
        TlsSummary {
            client_cas: self.roots.len(),
            crls: self.crls.len(),
            revoked: self.revoked,
            ..summarise_leaf(&self.key.cert)
        }
    }
}

fn summarise_leaf(chain: &[CertificateDer<'static>]) -> TlsSummary {
    let parsed = chain
        .first()
        .and_then(|leaf| x509_parser::parse_x509_certificate(leaf).ok());
    match parsed {
        Some((_, cert)) => TlsSummary {
            subject: cert.subject().to_string(),
            serial: cert.raw_serial_as_string(),
            not_after: cert.validity().not_after.to_string(),
            not_after_unix: cert.validity().not_after.timestamp(),
            ..TlsSummary::default()
        },
        None => TlsSummary::default(),
    }
}

/// Client certificates required (no `allow_unauthenticated()`: a client
/// without a certificate fails the handshake) and checked against `roots`
/// and `crls` as documented on [`TlsMaterial`].
fn build_config(
    provider: &Arc<CryptoProvider>,
    key: &Arc<ArcSwap<CertifiedKey>>,
    roots: RootCertStore,
    crls: Vec<CertificateRevocationListDer<'static>>,
) -> Result<(Arc<ServerConfig>, Arc<dyn ClientCertVerifier>), TlsError> {
    let mut verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
    if !crls.is_empty() {
        verifier = verifier.with_crls(crls).allow_unknown_revocation_status();
    }
    let verifier = verifier.build().map_err(TlsError::Verifier)?;
    let mut config = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_client_cert_verifier(verifier.clone())
        .with_cert_resolver(Arc::new(SwappableCert(key.clone())));
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok((Arc::new(config), verifier))
}

/// `config` offering ALPN `h2` then `http/1.1`.
fn with_http1_alpn(config: &ServerConfig) -> Arc<ServerConfig> {
    let mut config = config.clone();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(config)
}

/// Load `files` and build the server configuration in one step.
///
/// The material cannot be reloaded through this path; keep a
/// [`TlsMaterial`] for that.
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    TlsMaterial::load(files.clone())?.server_config()
}

/// Resolves every handshake to the certificate currently in the swap.
#[derive(Debug)]
struct SwappableCert(Arc<ArcSwap<CertifiedKey>>);

impl ResolvesServerCert for SwappableCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|error| TlsError::Read {
        what,
        path: path.to_owned(),
        error,
    })
}

fn read_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_file(what, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| TlsError::Pem {
            what,
            path: path.to_owned(),
            reason: err.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            what,
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read_file("private key", path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|err| match err {
        rustls_pki_types::pem::Error::NoItemsFound => TlsError::NoPrivateKey {
            path: path.to_owned(),
        },
        // The PEM errors describe structure (markers, base64), never content.
        other => TlsError::Pem {
            what: "private key",
            path: path.to_owned(),
            reason: other.to_string(),
        },
    })
}

fn load_certified_key(files: &TlsFiles, provider: &CryptoProvider) -> Result<CertifiedKey, TlsError> {
    let chain = read_certs("certificate", &files.cert)?;
    let key = read_key(&files.key)?;
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|err| TlsError::UnusableKey {
            path: files.key.clone(),
            reason: err.to_string(),
        })?;
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(InconsistentKeys::Unknown)) => Ok(certified),
        Err(rustls::Error::InconsistentKeys(InconsistentKeys::KeyMismatch)) => Err(TlsError::KeyMismatch {
            cert: files.cert.clone(),
            key: files.key.clone(),
        }),
        Err(other) => Err(TlsError::BadCertificate {
            path: files.cert.clone(),
            reason: other.to_string(),
        }),
    }
}

/// A client CA's subject and public key (both DER), to check CRLs against.
struct CaKey {
    subject: Vec<u8>,
    spki: Vec<u8>,
}

/// The trust anchors of a client CA bundle, and their subjects and keys, so
/// CRLs can be matched to them.
fn load_client_roots(path: &Path) -> Result<(RootCertStore, Vec<CaKey>), TlsError> {
    let mut roots = RootCertStore::empty();
    let mut subjects = Vec::new();
    for (index, cert) in read_certs("client CA", path)?.into_iter().enumerate() {
        let bad = |reason: String| TlsError::BadClientCa {
            path: path.to_owned(),
            index: index + 1,
            reason,
        };
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert).map_err(|err| bad(err.to_string()))?;
        subjects.push(CaKey {
            subject: parsed.subject().as_raw().to_vec(),
            spki: parsed.public_key().raw.to_vec(),
        });
        roots.add(cert).map_err(|err| bad(err.to_string()))?;
    }
    Ok((roots, subjects))
}

/// The CRLs in `path` (PEM `X509 CRL` sections, or one DER CRL), each
/// checked to parse, with its number of revoked serials.
///
/// The handshake matches a CRL to a certificate by issuer name only and then
/// refuses the client if the CRL's signature does not verify. So a CRL that
/// names a CA of the bundle must be signed by it (else it is refused here,
/// before it can lock that CA's clients out), and the CAs of a bundle used
/// with CRLs should have distinct names. A CRL whose issuer is not in the
/// bundle, or that is past its `nextUpdate`, is kept but logged: the first
/// never applies, the second is outdated.
fn read_crls(
    path: &Path,
    cas: &[CaKey],
) -> Result<Vec<(CertificateRevocationListDer<'static>, usize)>, TlsError> {
    let bytes = read_file("client CRL", path)?;
    let crls = if bytes.trim_ascii_start().starts_with(b"-----BEGIN") {
        CertificateRevocationListDer::pem_slice_iter(&bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| TlsError::Pem {
                what: "client CRL",
                path: path.to_owned(),
                reason: err.to_string(),
            })?
    } else {
        vec![CertificateRevocationListDer::from(bytes)]
    };
    if crls.is_empty() {
        return Err(TlsError::NoCrl {
            path: path.to_owned(),
        });
    }
    let now = x509_parser::time::ASN1Time::now();
    let mut checked = Vec::with_capacity(crls.len());
    for (index, crl) in crls.into_iter().enumerate() {
        let bad = |reason: String| TlsError::BadCrl {
            path: path.to_owned(),
            index: index + 1,
            reason,
        };
        let (rest, parsed) = x509_parser::parse_x509_crl(&crl).map_err(|err| bad(err.to_string()))?;
        if !rest.is_empty() {
            return Err(bad("trailing data after the CRL".into()));
        }
        let named: Vec<&CaKey> = cas
            .iter()
            .filter(|ca| ca.subject == parsed.issuer().as_raw())
            .collect();
        if !named.is_empty() {
            let signed = named.iter().any(|ca| {
                SubjectPublicKeyInfo::from_der(&ca.spki)
                    .is_ok_and(|(_, spki)| parsed.verify_signature(&spki).is_ok())
            });
            if !signed {
                return Err(bad(format!(
                    "not signed by the client CA named {} (it would refuse all of that CA's clients)",
                    parsed.issuer()
                )));
            }
        } else {
            tracing::warn!(
                path = %path.display(),
                issuer = %parsed.issuer(),
                "client CRL is issued by no CA of the client CA bundle; it revokes nothing"
            );
        }
        if parsed.next_update().is_some_and(|next| next < now) {
            tracing::warn!(
                path = %path.display(),
                issuer = %parsed.issuer(),
                "client CRL is past its next update; still enforced"
            );
        }
        let revoked = parsed.iter_revoked_certificates().count();
        checked.push((crl, revoked));
    }
    Ok(checked)
}
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::cli::certs::DevPki;

    struct Fixture {
        dir: tempfile::TempDir,
        files: TlsFiles,
        pki: DevPki,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let pki = DevPki::new().unwrap();
        let server = pki.server(&["localhost"]).unwrap();
        let files = TlsFiles {
            cert: dir.path().join("server.pem"),
            key: dir.path().join("server.key"),
            client_ca: dir.path().join("ca.pem"),
        };
        std::fs::write(&files.cert, &server.cert_pem).unwrap();
        std::fs::write(&files.key, &server.key_pem).unwrap();
        std::fs::write(&files.client_ca, pki.ca_cert_pem()).unwrap();
        Fixture { dir, files, pki }
    }

    fn error(files: &TlsFiles) -> TlsError {
        server_config(files).unwrap_err()
    }

    #[test]
    fn loads_a_valid_configuration() {
        let fx = fixture();
        let config = server_config(&fx.files).unwrap();
        assert_eq!(config.alpn_protocols, vec![b"h2".to_vec()]);
    }

    /// The REST port's twin offers HTTP/1.1 too, and a reload swaps it
    /// with the gRPC port's configuration.
    #[test]
    fn the_http1_twin_follows_reloads() {
        let fx = fixture();
        let material = TlsMaterial::load(fx.files.clone()).unwrap();
        let grpc = material.shared_config();
        let rest = grpc.with_http1();
        assert_eq!(grpc.current().alpn_protocols, vec![b"h2".to_vec()]);
        assert_eq!(
            rest.current().alpn_protocols,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        );
        let before = rest.current();
        material.reload().unwrap();
        assert!(!Arc::ptr_eq(&before, &rest.current()), "the twin was not swapped");
        assert_eq!(rest.current().alpn_protocols.len(), 2);
        assert_eq!(grpc.current().alpn_protocols, vec![b"h2".to_vec()]);
    }

    #[test]
    fn missing_file_is_named() {
        let fx = fixture();
        let files = TlsFiles {
            key: fx.dir.path().join("nope.key"),
            ..fx.files.clone()
        };
        let err = error(&files);
        assert!(
            matches!(
                err,
                TlsError::Read {
                    what: "private key",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("nope.key"), "{err}");
    }

    #[test]
    fn file_without_certificate_is_refused() {
        let fx = fixture();
        let files = TlsFiles {
            cert: fx.files.key.clone(),
            ..fx.files.clone()
        };
        assert!(matches!(
            error(&files),
            TlsError::NoCertificate {
                what: "certificate",
                ..
            }
        ));
        let files = TlsFiles {
            client_ca: fx.files.key.clone(),
            ..fx.files.clone()
        };
        assert!(matches!(
            error(&files),
            TlsError::NoCertificate {
                what: "client CA",
                ..
            }
        ));
    }

    #[test]
    fn file_without_key_is_refused() {
        let fx = fixture();
        let files = TlsFiles {
            key: fx.files.cert.clone(),
            ..fx.files.clone()
        };
        let err = error(&files);
        assert!(matches!(err, TlsError::NoPrivateKey { .. }), "{err}");
        assert!(err.to_string().contains("server.pem"), "{err}");
    }

    #[test]
    fn key_of_another_certificate_is_refused() {
        let fx = fixture();
        let other = fx.pki.server(&["localhost"]).unwrap();
        let other_key = fx.dir.path().join("other.key");
        std::fs::write(&other_key, &other.key_pem).unwrap();
        let files = TlsFiles {
            key: other_key,
            ..fx.files.clone()
        };
        let err = error(&files);
        assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err}");
        assert!(!err.to_string().contains("PRIVATE KEY"), "{err}");
    }

    fn crl_file(fx: &Fixture, name: &str, contents: &str) -> PathBuf {
        let path = fx.dir.path().join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }

    #[test]
    fn crl_errors_name_the_file() {
        let fx = fixture();
        let garbage = crl_file(
            &fx,
            "garbage.crl",
            "-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n",
        );
        let err = TlsMaterial::load_with_crls(fx.files.clone(), vec![garbage]).unwrap_err();
        assert!(matches!(err, TlsError::BadCrl { index: 1, .. }), "{err}");
        assert!(err.to_string().contains("garbage.crl"), "{err}");

        let empty = crl_file(&fx, "empty.crl", "");
        let err = TlsMaterial::load_with_crls(fx.files.clone(), vec![empty]).unwrap_err();
        assert!(matches!(err, TlsError::BadCrl { .. }), "{err}");

        let no_crl = crl_file(&fx, "cert.crl", fx.pki.ca_cert_pem());
        let err = TlsMaterial::load_with_crls(fx.files.clone(), vec![no_crl]).unwrap_err();
        assert!(matches!(err, TlsError::NoCrl { .. }), "{err}");
    }

    #[test]
    fn crl_of_a_same_named_ca_with_another_key_is_refused() {
        let fx = fixture();
        // Same subject as the fixture's CA, another key.
        let impostor = DevPki::new().unwrap();
        let crl = crl_file(&fx, "impostor.crl", &impostor.crl(&[]).unwrap());
        let err = TlsMaterial::load_with_crls(fx.files.clone(), vec![crl]).unwrap_err();
        assert!(err.to_string().contains("not signed by the client CA"), "{err}");

        let ours = crl_file(&fx, "ours.crl", &fx.pki.crl(&[]).unwrap());
        let material = TlsMaterial::load_with_crls(fx.files.clone(), vec![ours]).unwrap();
        assert_eq!(material.summary().crls, 1);
    }

    #[test]
    fn reload_is_all_or_nothing() {
        let fx = fixture();
        let revoked = fx.pki.client("platform-a").unwrap();
        let crl = crl_file(&fx, "ca.crl", &fx.pki.crl(&[&revoked.cert_pem]).unwrap());
        let material = TlsMaterial::load_with_crls(fx.files.clone(), vec![crl.clone()]).unwrap();
        assert_eq!((material.summary().crls, material.summary().revoked), (1, 1));
        let config = material.server_config().unwrap();
        let chain = material.current_chain();

        // A new certificate with a broken CRL: neither is taken.
        let next = fx.pki.server(&["localhost"]).unwrap();
        std::fs::write(&fx.files.cert, &next.cert_pem).unwrap();
        std::fs::write(&fx.files.key, &next.key_pem).unwrap();
        std::fs::write(&crl, "garbage").unwrap();
        let err = material.reload().unwrap_err();
        assert!(err.to_string().contains("ca.crl"), "{err}");
        assert_eq!(material.current_chain(), chain);
        assert!(Arc::ptr_eq(&material.server_config().unwrap(), &config));

        // Fixed: both are taken, and a new config is in force.
        std::fs::write(&crl, fx.pki.crl(&[]).unwrap()).unwrap();
        let summary = material.reload().unwrap();
        assert_eq!((summary.crls, summary.revoked), (1, 0));
        assert_ne!(material.current_chain(), chain);
        assert!(!Arc::ptr_eq(&material.server_config().unwrap(), &config));
        assert!(Arc::ptr_eq(
            &material.server_config().unwrap(),
            &material.shared_config().current()
        ));
    }

    #[test]
    fn reload_swaps_the_certificate_and_keeps_it_on_error() {
        let fx = fixture();
        let material = TlsMaterial::load(fx.files.clone()).unwrap();
        let _config = material.server_config().unwrap();
        let before = material.current_chain();

        let next = fx.pki.server(&["localhost"]).unwrap();
        std::fs::write(&fx.files.cert, &next.cert_pem).unwrap();
        std::fs::write(&fx.files.key, &next.key_pem).unwrap();
        material.reload().unwrap();
        let after = material.current_chain();
        assert_ne!(before[0], after[0]);

        std::fs::write(&fx.files.key, "garbage").unwrap();
        assert!(material.reload().is_err());
        assert_eq!(material.current_chain()[0], after[0]);
    }
}
