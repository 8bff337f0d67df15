//! Reloading the TLS material without a restart: on SIGHUP, when one of its
//! files changes, or when [`ReloadHandle::reload`] is called.
//!
//! A reload re-reads the server certificate and key, the client CA bundle
//! and the client CRLs, and swaps them in for new connections only (see
//! [`TlsMaterial`]); connections already open keep the material they were
//! handshaken with, except that those whose client certificate the new CAs
//! or CRLs refuse are closed once their calls finish (see
//! [`crate::server::revoke`]). A reload that fails changes nothing and logs why at
//! `warn` (file and reason, never key material); a successful one logs the
//! new certificate's subject, serial and expiry at `info`.
//!
//! File changes are found by polling: every interval the watched files are
//! hashed (contents, not mtimes, so a rewrite within the same second or a
//! copy that keeps the mtime is still seen), and a reload runs when the hash
//! differs from the last one seen. A failed reload is not retried until a
//! file changes again, so a broken file is logged once, not every interval.

use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::server::tls::{TlsError, TlsFiles, TlsMaterial, TlsSummary};

/// A hook run after every explicit reload (SIGHUP, [`ReloadHandle::reload`]),
/// whether the TLS reload succeeded or not, e.g. to re-read a token
/// verifier's key set. Its error is logged; it does not fail the reload.
pub type ReloadHook = Box<dyn Fn() -> anyhow::Result<()> + Send + Sync>;

/// Why a reload triggered through a [`ReloadHandle`] did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// No server is running with this handle (not started yet, or stopped).
    #[error("no running server to reload")]
    NotRunning,
    /// The new material is unusable; the previous material stays in service.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The reload task panicked or was cancelled.
    #[error("reload task failed: {0}")]
    Task(String),
}

/// Triggers a reload of a running server's TLS material.
///
/// Clone it out of [`crate::server::Handles::reload`] before passing the
/// handles to [`crate::server::run_with`]; the server attaches to it while it runs.
/// `reassigned serve` calls it on SIGHUP.
#[derive(Clone, Default)]
pub struct ReloadHandle {
    target: Arc<Mutex<Option<Arc<Reloader>>>>,
}

impl fmt::Debug for ReloadHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReloadHandle")
            .field("attached", &self.current().is_some())
            .finish()
    }
}

impl ReloadHandle {
    /// A handle attached to no server yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reload now, whether or not the files changed, and say what is in
    /// service afterwards. The file reading runs on the blocking pool.
    pub async fn reload(&self) -> Result<TlsSummary, ReloadError> {
        let reloader = self.current().ok_or(ReloadError::NotRunning)?;
        tokio::task::spawn_blocking(move || reloader.reload("trigger"))
            .await
            .map_err(|err| ReloadError::Task(err.to_string()))?
            .map_err(ReloadError::from)
    }

    fn current(&self) -> Option<Arc<Reloader>> {
        self.target.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Route this handle to `reloader` until the returned guard is dropped.
    pub(crate) fn attach(&self, reloader: Arc<Reloader>) -> Attached {
        *self.target.lock().unwrap_or_else(PoisonError::into_inner) = Some(reloader.clone());
        Attached {
            handle: self.clone(),
            reloader,
        }
    }
}

/// Detaches a [`ReloadHandle`] from its server when dropped.
pub(crate) struct Attached {
    handle: ReloadHandle,
    reloader: Arc<Reloader>,
}

impl Drop for Attached {
    fn drop(&mut self) {
        let mut target = self.handle.target.lock().unwrap_or_else(PoisonError::into_inner);
        // Another server may have attached the same handle since.
        if target.as_ref().is_some_and(|t| Arc::ptr_eq(t, &self.reloader)) {
            *target = None;
        }
    }
}

/// The TLS material of one server and what it takes to reload it.
pub struct Reloader {
    tls: TlsMaterial,
    /// Hash of the watched files as of the last reload (or the start).
    seen: Mutex<Fingerprint>,
    hooks: Vec<(&'static str, ReloadHook)>,
}

impl fmt::Debug for Reloader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reloader")
            .field("tls", &self.tls)
            .field(
                "hooks",
                &self.hooks.iter().map(|(name, _)| *name).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Reloader {
    /// Load the TLS material from `files` and `client_crls`; fails, naming
    /// the file, if any of it is unusable.
    pub fn load(files: TlsFiles, client_crls: Vec<PathBuf>) -> Result<Self, TlsError> {
        let mut paths = vec![files.cert.clone(), files.key.clone(), files.client_ca.clone()];
        paths.extend(client_crls.iter().cloned());
        // Hashed before reading, so a change during the load is seen later.
        let seen = Fingerprint::of(&paths);
        let tls = TlsMaterial::load_with_crls(files, client_crls)?;
        let summary = tls.summary();
        tracing::info!(
            subject = %summary.subject,
            serial = %summary.serial,
            not_after = %summary.not_after,
            client_cas = summary.client_cas,
            crls = summary.crls,
            revoked = summary.revoked,
            "tls material loaded"
        );
        Ok(Self {
            tls,
            seen: Mutex::new(seen),
            hooks: Vec::new(),
        })
    }

    /// Run `hook` after every explicit reload. For other reloadable material, such as
    /// a token verifier's JWKS: `reloader.with_hook("jwks", move || verifier.reload())`.
    pub fn with_hook(
        mut self,
        name: &'static str,
        hook: impl Fn() -> anyhow::Result<()> + Send + Sync + 'static,
    ) -> Self {
        self.hooks.push((name, Box::new(hook)));
        self
    }

    /// The TLS material.
    pub fn tls(&self) -> &TlsMaterial {
        &self.tls
    }

    /// Reload now and log the outcome; `cause` says why (`"sighup"`,
    /// `"trigger"`). Runs the hooks too (see [`Reloader::with_hook`]).
    pub fn reload(&self, cause: &'static str) -> Result<TlsSummary, TlsError> {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        *seen = Fingerprint::of(&self.tls.watched_files());
        let result = self.reload_locked(cause);
        for (name, hook) in &self.hooks {
            match hook() {
                Ok(()) => tracing::info!(cause, hook = name, "reloaded"),
                Err(err) => {
                    tracing::warn!(cause, hook = name, error = %err, "reload failed; keeping the previous state")
                }
            }
        }
        result
    }

    /// Reload the TLS material if one of its files changed since the last
    /// reload; `None` if nothing changed. Hooks do not run: they watch their
    /// own files.
    pub fn reload_if_changed(&self) -> Option<Result<TlsSummary, TlsError>> {
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Fingerprint::of(&self.tls.watched_files());
        if now == *seen {
            return None;
        }
        *seen = now;
        Some(self.reload_locked("file change"))
    }

    /// Called with `seen` locked, so reloads never interleave.
    fn reload_locked(&self, cause: &'static str) -> Result<TlsSummary, TlsError> {
        let result = self.tls.reload();
        match &result {
            Ok(summary) => tracing::info!(
                cause,
                subject = %summary.subject,
                serial = %summary.serial,
                not_after = %summary.not_after,
                client_cas = summary.client_cas,
                crls = summary.crls,
                revoked = summary.revoked,
                "tls material reloaded"
            ),
            Err(err) => tracing::warn!(
                cause,
                error = %err,
                "tls reload failed; the previous certificate, client CAs and CRLs stay in service"
            ),
        }
        result
    }
}

/// SHA-256 over the watched files' paths and contents (or, for a file that
/// cannot be read, the kind of error).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint([u8; 32]);

impl Fingerprint {
    fn of(paths: &[PathBuf]) -> Self {
        let mut hash = Sha256::new();
        for path in paths {
            hash.update(path.as_os_str().as_encoded_bytes());
            hash.update([0]);
            match std::fs::read(path) {
                Ok(bytes) => {
                    hash.update((bytes.len() as u64).to_be_bytes());
                    hash.update(&bytes);
                }
                Err(err) => {
                    hash.update(u64::MAX.to_be_bytes());
                    hash.update(format!("{:?}", err.kind()).as_bytes());
                }
            }
        }
        Self(hash.finalize().into())
    }
}

/// Every `interval`, reload if a watched file changed, until `stop` turns
/// true (or its sender is dropped).
pub async fn watch_files(reloader: Arc<Reloader>, interval: Duration, mut stop: watch::Receiver<bool>) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate; the material was just loaded.
    ticks.tick().await;
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    return;
                }
                continue;
            }
        }
        let reloader = reloader.clone();
        // The outcome is logged by the reloader.
        let _ = tokio::task::spawn_blocking(move || reloader.reload_if_changed()).await;
    }
}

/// Reload through `handle` on every SIGHUP, for as long as the returned task
/// runs. Only the binary installs this: the handler replaces SIGHUP's default
/// action (terminate) for the whole process.
#[cfg(unix)]
pub fn spawn_sighup_reloader(handle: ReloadHandle) -> std::io::Result<JoinHandle<()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangups = signal(SignalKind::hangup())?;
    Ok(tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            tracing::info!(signal = "SIGHUP", "signal received; reloading tls material");
            let reloader = handle.current();
            match reloader {
                Some(reloader) => {
                    // The outcome is logged by the reloader.
                    let _ = tokio::task::spawn_blocking(move || reloader.reload("sighup")).await;
                }
                None => tracing::warn!("SIGHUP before the server started; nothing to reload"),
            }
        }
    }))
}

/// Aborts a task when dropped, so an early return cannot leak it.
#[derive(Debug)]
pub(crate) struct AbortOnDrop(pub(crate) JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::cli::certs::DevPki;

    fn fixture(dir: &std::path::Path, pki: &DevPki) -> TlsFiles {
        let server = pki.server(&["localhost"]).unwrap();
        let files = TlsFiles {
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
            client_ca: dir.join("ca.pem"),
        };
        std::fs::write(&files.cert, &server.cert_pem).unwrap();
        std::fs::write(&files.key, &server.key_pem).unwrap();
        std::fs::write(&files.client_ca, pki.ca_cert_pem()).unwrap();
        files
    }

    #[test]
    fn file_changes_reload_once_and_a_broken_file_is_not_retried() {
        let dir = tempfile::tempdir().unwrap();
        let pki = DevPki::new().unwrap();
        let files = fixture(dir.path(), &pki);
        let crl = dir.path().join("ca.crl");
        std::fs::write(&crl, pki.crl(&[]).unwrap()).unwrap();
        let reloader = Reloader::load(files.clone(), vec![crl.clone()]).unwrap();
        assert!(reloader.reload_if_changed().is_none());

        let revoked = pki.client("platform-a").unwrap();
        std::fs::write(&crl, pki.crl(&[&revoked.cert_pem]).unwrap()).unwrap();
        let summary = reloader.reload_if_changed().unwrap().unwrap();
        assert_eq!(summary.revoked, 1);
        assert!(reloader.reload_if_changed().is_none());

        std::fs::remove_file(&files.key).unwrap();
        let err = reloader.reload_if_changed().unwrap().unwrap_err();
        assert!(err.to_string().contains("server.key"), "{err}");
        assert!(reloader.reload_if_changed().is_none(), "a broken file is retried");
        assert_eq!(reloader.tls().summary().revoked, 1);

        let next = pki.server(&["localhost"]).unwrap();
        std::fs::write(&files.cert, &next.cert_pem).unwrap();
        std::fs::write(&files.key, &next.key_pem).unwrap();
        assert!(reloader.reload_if_changed().unwrap().is_ok());
    }

    #[test]
    fn explicit_reloads_run_the_hooks_and_file_changes_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let pki = DevPki::new().unwrap();
        let files = fixture(dir.path(), &pki);
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        let reloader = Reloader::load(files.clone(), Vec::new())
            .unwrap()
            .with_hook("count", move || {
                counter.fetch_add(1, Ordering::SeqCst);
                anyhow::bail!("hook errors are logged, not returned")
            });
        reloader.reload("trigger").unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        std::fs::write(&files.client_ca, DevPki::new().unwrap().ca_cert_pem()).unwrap();
        assert!(reloader.reload_if_changed().unwrap().is_ok());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
