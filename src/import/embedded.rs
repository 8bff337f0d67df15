//! The embedded store's register directory: loading it at start
//! ([`open_dir`]) and re-syncing it in the background ([`spawn_resync`]).
//! The store itself ([`EmbeddedStore`]) only holds data; this module
//! decides what to load into it and keeps the list of files it skipped.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::{ImportError, ImportOptions, Progress, spawn_resync_with, sync_dir_lenient};
use crate::store::EmbeddedStore;

/// A store loaded from a register directory: runs [`sync_dir_lenient`] on
/// `dir` (the newest snapshot that applies, then its deltas up to the first
/// that does not).
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
    let (report, problems) = sync_dir_lenient(&store, dir, options, progress).await?;
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
    Ok(store)
}

/// Starts a Tokio task that re-runs [`sync_dir_lenient`] on `dir` every
/// `interval` until `shutdown` completes; the files skipped by each run
/// replace [`EmbeddedStore::import_problems`], and the store keeps serving
/// what it has. See [`super::spawn_resync_with`].
pub fn spawn_resync(
    store: &Arc<EmbeddedStore>,
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
    spawn_resync_with(Arc::clone(store), dir, interval, options, on_problems, shutdown)
}
