//! Development certificates: `reassigned certs dev --out DIR`.
//!
//! [`DevPki`] mints a throw-away CA, a server certificate and platform client
//! certificates in memory (PEM strings), so integration tests can make fresh
//! certificates per test (valid, expired, from another CA). [`dev_certs`] and
//! [`mint_client_cert`] write the same material to files.
//!
//! Not for production: the CA key sits next to the certificates it signs.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context as _, bail, ensure};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
    PublicKeyData as _, RevokedCertParams, SanType, SerialNumber,
};
use rustls_pki_types::pem::PemObject as _;
use time::OffsetDateTime;

const DAY: Duration = Duration::from_secs(24 * 60 * 60);
/// Backdating of `not_before`, so small clock skew does not reject a fresh certificate.
const BACKDATE: Duration = Duration::from_secs(60 * 60);
/// Validity of the development CA.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);
/// Validity of server and client certificates.
const LEAF_VALIDITY: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// Platforms that `reassigned certs dev` makes client certificates for.
pub const DEV_PLATFORMS: &[&str] = &["platform-a", "platform-b"];
/// Operators that `reassigned certs dev` makes client certificates for
/// (publishers of the federation; `demo` makes `operator-a` authoritative
/// for its register's prefixes).
pub const DEV_OPERATORS: &[&str] = &["operator-a"];
/// Names the development server certificate is valid for.
pub const DEV_SERVER_NAMES: &[&str] = &["localhost", "127.0.0.1", "::1"];

/// The URI SAN given to a platform's client certificate.
pub fn platform_uri(name: &str) -> String {
    format!("spiffe://dev.reassigned/{name}")
}

/// A certificate (chain) and its private key, both PEM.
#[derive(Clone)]
pub struct PemPair {
    /// The certificate, followed by the issuing CA for server certificates.
    pub cert_pem: String,
    /// The PKCS#8 private key.
    pub key_pem: String,
}

impl fmt::Debug for PemPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PemPair")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// What a client certificate says. Start from [`ClientCertSpec::platform`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCertSpec {
    /// Subject common name.
    pub common_name: String,
    /// URI subject alternative name, if any.
    pub uri_san: Option<String>,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
}

impl ClientCertSpec {
    /// A platform certificate valid for a year from now: CN = `name`, URI SAN
    /// [`platform_uri`]`(name)`.
    pub fn platform(name: &str) -> Self {
        let now = SystemTime::now();
        Self {
            common_name: name.to_owned(),
            uri_san: Some(platform_uri(name)),
            not_before: now - BACKDATE,
            not_after: now + LEAF_VALIDITY,
        }
    }

    /// The same certificate, expired yesterday.
    pub fn expired(mut self) -> Self {
        let now = SystemTime::now();
        self.not_before = now - 2 * DAY;
        self.not_after = now - DAY;
        self
    }

    /// The same certificate without subject alternative names (CN only).
    pub fn without_san(mut self) -> Self {
        self.uri_san = None;
        self
    }
}

/// An in-memory development PKI: one CA that signs server and client
/// certificates.
pub struct DevPki {
    issuer: Issuer<'static, KeyPair>,
    ca_cert_pem: String,
}

impl fmt::Debug for DevPki {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DevPki")
            .field("ca_cert_pem", &self.ca_cert_pem)
            .finish_non_exhaustive()
    }
}

impl DevPki {
    /// A fresh CA ("reassigned dev CA", ECDSA P-256, valid 10 years).
    pub fn new() -> anyhow::Result<Self> {
        Self::named("reassigned dev CA")
    }

    /// A fresh CA with this common name. CAs trusted side by side with CRLs
    /// need distinct names: a CRL applies to the CA of the same name.
    pub fn named(common_name: &str) -> anyhow::Result<Self> {
        let key = new_key()?;
        let now = SystemTime::now();
        let mut params = CertificateParams::default();
        params.distinguished_name = name(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + CA_VALIDITY).into();
        let cert = params.self_signed(&key).context("cannot sign the dev CA")?;
        Ok(Self {
            ca_cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Use an existing CA, e.g. the `ca.pem` and `ca.key` written by
    /// [`dev_certs`]. Fails if the key is not the certificate's key.
    pub fn from_pem(ca_cert_pem: &str, ca_key_pem: &str) -> anyhow::Result<Self> {
        let key = KeyPair::from_pem(ca_key_pem).context("cannot parse the CA private key")?;
        let der = rustls_pki_types::CertificateDer::from_pem_slice(ca_cert_pem.as_bytes())
            .context("cannot parse the CA certificate PEM")?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der)
            .map_err(|err| anyhow::anyhow!("cannot parse the CA certificate: {err}"))?;
        ensure!(
            cert.public_key().raw == key.subject_public_key_info().as_slice(),
            "the CA private key does not match the CA certificate"
        );
        let issuer = Issuer::from_ca_cert_der(&der, key).context("cannot use the CA certificate")?;
        Ok(Self {
            issuer,
            ca_cert_pem: ca_cert_pem.to_owned(),
        })
    }

    /// The CA certificate, PEM.
    pub fn ca_cert_pem(&self) -> &str {
        &self.ca_cert_pem
    }

    /// The CA private key, PKCS#8 PEM. Handle with care.
    pub fn ca_key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// A server certificate for `names` (DNS names or IP addresses), valid a
    /// year, with the ServerAuth EKU. `cert_pem` is the leaf followed by the CA.
    pub fn server(&self, names: &[&str]) -> anyhow::Result<PemPair> {
        ensure!(!names.is_empty(), "a server certificate needs at least one name");
        let key = new_key()?;
        let now = SystemTime::now();
        let mut params =
            CertificateParams::new(names.iter().map(|name| (*name).to_owned()).collect::<Vec<_>>())
                .context("invalid server name")?;
        params.distinguished_name = name(names[0]);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + LEAF_VALIDITY).into();
        let cert = params
            .signed_by(&key, &self.issuer)
            .context("cannot sign the server certificate")?;
        Ok(PemPair {
            cert_pem: format!("{}{}", cert.pem(), self.ca_cert_pem),
            key_pem: key.serialize_pem(),
        })
    }

    /// A valid certificate for platform `name` (see [`ClientCertSpec::platform`]).
    pub fn client(&self, name: &str) -> anyhow::Result<PemPair> {
        self.client_with(&ClientCertSpec::platform(name))
    }

    /// A client certificate (ClientAuth EKU) as described by `spec`.
    /// `cert_pem` holds the leaf only.
    pub fn client_with(&self, spec: &ClientCertSpec) -> anyhow::Result<PemPair> {
        let key = new_key()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name(&spec.common_name);
        if let Some(uri) = &spec.uri_san {
            params.subject_alt_names = vec![SanType::URI(
                uri.as_str()
                    .try_into()
                    .with_context(|| format!("invalid URI SAN {uri:?}"))?,
            )];
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = OffsetDateTime::from(spec.not_before);
        params.not_after = OffsetDateTime::from(spec.not_after);
        let cert = params
            .signed_by(&key, &self.issuer)
            .context("cannot sign the client certificate")?;
        Ok(PemPair {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

impl DevPki {
    /// A CRL signed by this CA that revokes the leaf certificate of each PEM
    /// in `revoked_cert_pems` (reason unspecified), valid from an hour ago
    /// for [`CRL_VALIDITY`]. PEM (`X509 CRL`).
    pub fn crl(&self, revoked_cert_pems: &[&str]) -> anyhow::Result<String> {
        let serials = revoked_cert_pems
            .iter()
            .map(|pem| leaf_serial(pem))
            .collect::<anyhow::Result<Vec<_>>>()?;
        self.crl_for_serials(&serials)
    }

    /// A CRL signed by this CA that revokes these serial numbers (big-endian
    /// bytes, as in the certificates). PEM (`X509 CRL`).
    pub fn crl_for_serials(&self, serials: &[Vec<u8>]) -> anyhow::Result<String> {
        let now = SystemTime::now();
        let this_update = OffsetDateTime::from(now - BACKDATE);
        let params = CertificateRevocationListParams {
            this_update,
            next_update: OffsetDateTime::from(now + CRL_VALIDITY),
            // Increases with every CRL this process or a later one makes.
            crl_number: SerialNumber::from(
                now.duration_since(SystemTime::UNIX_EPOCH)
                    .map(|since| since.as_micros() as u64)
                    .unwrap_or(1),
            ),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|serial| RevokedCertParams {
                    serial_number: SerialNumber::from_slice(serial),
                    revocation_time: this_update,
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(&self.issuer).context("cannot sign the CRL")?;
        crl.pem().context("cannot encode the CRL")
    }
}

/// Validity of a CRL made by [`DevPki::crl`] (`nextUpdate` - now).
pub const CRL_VALIDITY: Duration = Duration::from_secs(30 * 24 * 60 * 60);

/// The serial number of the first certificate in `cert_pem`.
pub fn leaf_serial(cert_pem: &str) -> anyhow::Result<Vec<u8>> {
    let der = rustls_pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .context("cannot parse the certificate PEM")?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|err| anyhow::anyhow!("cannot parse the certificate: {err}"))?;
    Ok(cert.raw_serial().to_vec())
}

/// `reassigned certs revoke`: write to `out` a CRL signed by the CA in
/// `ca_cert`/`ca_key` that revokes the certificates in `certs` and every
/// serial already revoked by the CRL in `out`, if there is one (so repeated
/// calls accumulate). The file is replaced atomically, so a server watching
/// it never reads half a CRL. Returns the number of revoked serials.
pub fn revoke(ca_cert: &Path, ca_key: &Path, certs: &[PathBuf], out: &Path) -> anyhow::Result<usize> {
    let read =
        |path: &Path| fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()));
    let pki = DevPki::from_pem(&read(ca_cert)?, &read(ca_key)?)?;
    let mut serials = match fs::read(out) {
        Ok(existing) => crl_serials(&existing).with_context(|| format!("{} is not a CRL", out.display()))?,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(err) => return Err(err).with_context(|| format!("cannot read {}", out.display())),
    };
    for cert in certs {
        let serial = leaf_serial(&read(cert)?).with_context(|| format!("certificate {}", cert.display()))?;
        // Compare as numbers: DER may carry a leading zero byte.
        if !serials
            .iter()
            .any(|known| trim_zeros(known) == trim_zeros(&serial))
        {
            serials.push(serial);
        }
    }
    let crl = pki.crl_for_serials(&serials)?;
    let dir = out
        .parent()
        .filter(|dir| !dir.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp",
        out.file_name().and_then(|name| name.to_str()).unwrap_or("crl")
    ));
    fs::write(&tmp, crl).with_context(|| format!("cannot write {}", tmp.display()))?;
    fs::rename(&tmp, out).with_context(|| format!("cannot write {}", out.display()))?;
    tracing::info!(path = %out.display(), revoked = serials.len(), "wrote CRL");
    Ok(serials.len())
}

/// The serials revoked by the CRLs in `bytes` (PEM, or one DER CRL).
fn crl_serials(bytes: &[u8]) -> anyhow::Result<Vec<Vec<u8>>> {
    let ders = if bytes.trim_ascii_start().starts_with(b"-----BEGIN") {
        rustls_pki_types::CertificateRevocationListDer::pem_slice_iter(bytes)
            .collect::<Result<Vec<_>, _>>()
            .context("invalid PEM")?
    } else {
        vec![rustls_pki_types::CertificateRevocationListDer::from(
            bytes.to_vec(),
        )]
    };
    let mut serials = Vec::new();
    for der in &ders {
        let (_, crl) =
            x509_parser::parse_x509_crl(der).map_err(|err| anyhow::anyhow!("cannot parse the CRL: {err}"))?;
        serials.extend(
            crl.iter_revoked_certificates()
                .map(|revoked| revoked.raw_serial().to_vec()),
        );
    }
    Ok(serials)
}

fn trim_zeros(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|&b| b != 0).unwrap_or(bytes.len());
    &bytes[start..]
}

fn new_key() -> anyhow::Result<KeyPair> {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).context("cannot generate an ECDSA P-256 key")
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

/// One file to write.
struct Output {
    path: PathBuf,
    contents: String,
    secret: bool,
}

/// Write a development PKI into `out` (created if missing):
/// `ca.pem`, `ca.key`, `server.pem` (leaf + CA), `server.key` (for
/// `localhost`, `127.0.0.1`, `::1`), `platform-a.pem`/`.key`,
/// `platform-b.pem`/`.key` and `operator-a.pem`/`.key`. Keys get mode 0600. Existing files are left
/// alone and the command fails, writing nothing, unless `force` is set.
pub fn dev_certs(out: &Path, force: bool) -> anyhow::Result<()> {
    dev_certs_for(out, force, &[])
}

/// [`dev_certs`] with a server certificate that also names `extra_names`
/// (DNS names or IP addresses, e.g. `server` for a compose service or
/// `reassigned.ns.svc` in Kubernetes), besides the local ones.
pub fn dev_certs_for(out: &Path, force: bool, extra_names: &[String]) -> anyhow::Result<()> {
    let pki = DevPki::new()?;
    let mut names: Vec<&str> = DEV_SERVER_NAMES.to_vec();
    for name in extra_names {
        let name = name.trim();
        ensure!(!name.is_empty(), "--san: a server name must not be empty");
        if !names.contains(&name) {
            names.push(name);
        }
    }
    let server = pki.server(&names)?;
    let mut outputs = vec![
        Output::public(out.join("ca.pem"), pki.ca_cert_pem().to_owned()),
        Output::secret(out.join("ca.key"), pki.ca_key_pem()),
        Output::public(out.join("server.pem"), server.cert_pem),
        Output::secret(out.join("server.key"), server.key_pem),
    ];
    for platform in DEV_PLATFORMS.iter().chain(DEV_OPERATORS) {
        outputs.extend(client_outputs(&pki, platform, out)?);
    }
    write_all(&outputs, force)
}

/// Mint one more platform certificate (`<name>.pem`, `<name>.key` in
/// `out_dir`) from an existing CA, e.g. the `ca.pem`/`ca.key` of
/// [`dev_certs`]. Never overwrites existing files.
pub fn mint_client_cert(
    ca_cert_pem: &str,
    ca_key_pem: &str,
    name: &str,
    out_dir: &Path,
) -> anyhow::Result<()> {
    let pki = DevPki::from_pem(ca_cert_pem, ca_key_pem)?;
    write_all(&client_outputs(&pki, name, out_dir)?, false)
}

/// `reassigned certs client NAME`: [`mint_client_cert`] from the CA's
/// files; creates `out_dir` if needed.
pub fn client_cert_files(ca_cert: &Path, ca_key: &Path, name: &str, out_dir: &Path) -> anyhow::Result<()> {
    let read = |path: &Path| {
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
    };
    let (cert, key) = (read(ca_cert)?, read(ca_key)?);
    std::fs::create_dir_all(out_dir).with_context(|| format!("cannot create {}", out_dir.display()))?;
    mint_client_cert(&cert, &key, name, out_dir)
}

fn client_outputs(pki: &DevPki, name: &str, out: &Path) -> anyhow::Result<Vec<Output>> {
    check_platform_name(name)?;
    let client = pki.client(name)?;
    Ok(vec![
        Output::public(out.join(format!("{name}.pem")), client.cert_pem),
        Output::secret(out.join(format!("{name}.key")), client.key_pem),
    ])
}

/// Platform names become file names and URI path segments: keep them plain.
fn check_platform_name(name: &str) -> anyhow::Result<()> {
    let plain = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['.', '-'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    ensure!(
        plain,
        "invalid platform name {name:?}: use 1-64 ASCII letters, digits, '-', '_' or '.', \
         not starting with '.' or '-'"
    );
    Ok(())
}

impl Output {
    fn public(path: PathBuf, contents: String) -> Self {
        Self {
            path,
            contents,
            secret: false,
        }
    }

    fn secret(path: PathBuf, contents: String) -> Self {
        Self {
            path,
            contents,
            secret: true,
        }
    }
}

fn write_all(outputs: &[Output], force: bool) -> anyhow::Result<()> {
    if !force {
        let existing: Vec<String> = outputs
            .iter()
            .filter(|out| out.path.exists())
            .map(|out| out.path.display().to_string())
            .collect();
        if !existing.is_empty() {
            bail!(
                "refusing to overwrite existing files (use --force): {}",
                existing.join(", ")
            );
        }
    }
    for output in outputs {
        if let Some(dir) = output.path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
            fs::create_dir_all(dir).with_context(|| format!("cannot create directory {}", dir.display()))?;
        }
        write_file(output, force).with_context(|| format!("cannot write {}", output.path.display()))?;
        tracing::info!(path = %output.path.display(), "wrote");
    }
    Ok(())
}

fn write_file(output: &Output, force: bool) -> std::io::Result<()> {
    let mut options = OpenOptions::new();
    options.write(true);
    if force {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
        if output.secret {
            options.mode(0o600);
        }
        let mut file = options.open(&output.path)?;
        if output.secret {
            // `mode` only applies to new files; tighten an overwritten one
            // before the key goes in.
            file.set_permissions(fs::Permissions::from_mode(0o600))?;
        }
        file.write_all(output.contents.as_bytes())?;
        file.sync_all()
    }
    #[cfg(not(unix))]
    {
        let mut file = options.open(&output.path)?;
        file.write_all(output.contents.as_bytes())?;
        file.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revoke_writes_and_accumulates_a_crl() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        dev_certs(dir.path(), false)?;
        let crl = dir.path().join("crl.pem");
        let ca = dir.path().join("ca.pem");
        let ca_key = dir.path().join("ca.key");
        assert_eq!(
            revoke(&ca, &ca_key, &[dir.path().join("platform-a.pem")], &crl)?,
            1
        );
        // Again with the same and one more: both listed once.
        let certs = [
            dir.path().join("platform-a.pem"),
            dir.path().join("platform-b.pem"),
        ];
        assert_eq!(revoke(&ca, &ca_key, &certs, &crl)?, 2);
        let serials = crl_serials(&fs::read(&crl)?)?;
        let a = leaf_serial(&fs::read_to_string(dir.path().join("platform-a.pem"))?)?;
        assert!(serials.iter().any(|s| trim_zeros(s) == trim_zeros(&a)));
        Ok(())
    }

    #[test]
    fn platform_names_are_checked() {
        assert!(check_platform_name("platform-a").is_ok());
        assert!(check_platform_name("../etc").is_err());
        assert!(check_platform_name("a/b").is_err());
        assert!(check_platform_name("").is_err());
    }

    #[test]
    fn from_pem_round_trips_and_rejects_a_foreign_key() -> anyhow::Result<()> {
        let pki = DevPki::new()?;
        let again = DevPki::from_pem(pki.ca_cert_pem(), &pki.ca_key_pem())?;
        again.client("platform-c")?;
        let other = DevPki::new()?;
        assert!(DevPki::from_pem(pki.ca_cert_pem(), &other.ca_key_pem()).is_err());
        Ok(())
    }

    #[test]
    fn dev_certs_writes_and_refuses_to_overwrite() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        dev_certs(dir.path(), false)?;
        for file in [
            "ca.pem",
            "ca.key",
            "server.pem",
            "server.key",
            "platform-a.pem",
            "platform-a.key",
            "platform-b.pem",
            "platform-b.key",
            "operator-a.pem",
            "operator-a.key",
        ] {
            assert!(dir.path().join(file).is_file(), "{file} missing");
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = fs::metadata(dir.path().join("server.key"))?.permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(dev_certs(dir.path(), false).is_err());
        dev_certs(dir.path(), true)?;

        let ca = fs::read_to_string(dir.path().join("ca.pem"))?;
        let ca_key = fs::read_to_string(dir.path().join("ca.key"))?;
        mint_client_cert(&ca, &ca_key, "platform-c", dir.path())?;
        assert!(dir.path().join("platform-c.pem").is_file());
        assert!(mint_client_cert(&ca, &ca_key, "platform-c", dir.path()).is_err());

        // `certs client NAME`: from the CA's files, into a new directory.
        let out = dir.path().join("watchers");
        let (ca_pem, ca_key_pem) = (dir.path().join("ca.pem"), dir.path().join("ca.key"));
        client_cert_files(&ca_pem, &ca_key_pem, "platform-7", &out)?;
        let pem = fs::read_to_string(out.join("platform-7.pem"))?;
        let der = rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())?;
        let platform = crate::identity::platform_from_cert(der.as_ref())?;
        assert_eq!(platform.id, platform_uri("platform-7"));
        assert!(out.join("platform-7.key").is_file());
        assert!(client_cert_files(&ca_pem, &ca_key_pem, "platform-7", &out).is_err());
        assert!(client_cert_files(&ca_pem, &ca_key_pem, "../x", &out).is_err());
        Ok(())
    }
}
