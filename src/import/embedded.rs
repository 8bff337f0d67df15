//! The embedded store's register directory: loading it at start
//! ([`open_dir`], [`load_dir`]) and re-syncing it in the background
//! ([`spawn_resync`]). The store itself ([`EmbeddedStore`]) only holds
//! data; this module decides what to load into it and keeps the list of
//! files it skipped.
//!
//! The files can be applied through a wrapper of the store (a *layer*, e.g.
//! `crate::federation::register`'s `EventingStore`, which appends the
//! register's events): at start [`load_dir`] applies the files up to a
//! sequence straight into the store and only the later ones through the
//! layer, and [`spawn_resync`] applies what arrives later through it.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::{ImportError, ImportOptions, Progress, spawn_resync_with, sync_dir_lenient_split};
use crate::store::{EmbeddedStore, Store};

/// A store loaded from a register directory: runs [`super::sync_dir_lenient`]
/// on `dir` (the newest snapshot that applies, then its deltas up to the
/// first that does not).
///
/// Never refuses to start because of a bad file: it loads the longest valid
/// sequence and logs and keeps (see [`EmbeddedStore::import_problems`]) what
/// it skipped, e.g. a garbage manifest, a half-written or missing data file,
/// a gap. Only an unreadable directory is an error; an empty one gives an
/// empty store.
pub async fn open_dir(
    dir: &Path,
    options: ImportOptions,
    progress: &mut dyn Progress,
) -> Result<EmbeddedStore, ImportError> {
    let store = EmbeddedStore::new();
    load_dir(&store, u64::MAX, &store, dir, options, progress).await?;
    Ok(store)
}

/// Loads `dir` into `store` as [`open_dir`] does, in two steps over one
/// reading of the manifests ([`super::sync_dir_lenient_split`]): the files
/// up to sequence `through` straight into `store`, then the later ones
/// through `layer`, which must wrap `store`. With `through` at or above
/// every file's sequence (e.g. `u64::MAX`) `layer` is not used.
pub async fn load_dir<L: Store>(
    store: &EmbeddedStore,
    through: u64,
    layer: &L,
    dir: &Path,
    options: ImportOptions,
    progress: &mut dyn Progress,
) -> Result<(), ImportError> {
    // A first load into an empty store builds the membership filter once,
    // at the end, not beside every delta's merge (the load's peak memory).
    let deferred = store.is_empty().then(|| store.defer_filter());
    let (report, problems) = sync_dir_lenient_split(store, through, layer, dir, options, progress).await?;
    drop(deferred);
    if problems.is_empty() {
        tracing::info!(%report, records = store.len(), "register loaded");
    } else {
        tracing::warn!(
            %report,
            records = store.len(),
            skipped = problems.len(),
            "register loaded; some files were skipped"
        );
    }
    store.set_import_problems(problems);
    Ok(())
}

/// Starts a Tokio task that re-runs [`super::sync_dir_lenient`] on `dir`
/// every `interval` until `shutdown` completes, applying new files through
/// `layer` (which wraps `store`; `store` itself when there is nothing to
/// add); the files skipped by each run replace
/// [`EmbeddedStore::import_problems`], and the store keeps serving what it
/// has. See [`super::spawn_resync_with`].
pub fn spawn_resync<L: Store + Clone>(
    store: &Arc<EmbeddedStore>,
    layer: L,
    dir: PathBuf,
    interval: Duration,
    options: ImportOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    let weak = Arc::downgrade(store);
    let on_problems = move |problems| {
        if let Some(store) = weak.upgrade() {
            store.set_import_problems(problems);
        }
    };
    spawn_resync_with(layer, dir, interval, options, on_problems, shutdown)
}
