//! Error texts do not repeat their cause: an error either says its cause in
//! its own message or returns it as `source()`, never both, so that a chain
//! printed with `{:#}` (as `reassigned` prints its errors) or walked by a
//! log pipeline names each cause once.

use std::error::Error as StdError;
use std::io;
use std::path::PathBuf;

use reassigned::api::ApiError;
use reassigned::domain::{Date, SinceError};
use reassigned::import::{ImportError, Manifest};
use reassigned::server::tls::TlsError;
use reassigned::store::StoreError;

/// Fails if any error of the chain repeats its source's message, or if the
/// chain as `reassigned` prints it (`{:#}`) holds `cause` more than once.
fn assert_said_once(error: anyhow::Error, cause: &str) {
    let rendered = format!("{error:#}");
    let mut current: Option<&(dyn StdError + 'static)> = Some(error.as_ref());
    while let Some(e) = current {
        if let Some(source) = e.source() {
            let (outer, inner) = (e.to_string(), source.to_string());
            assert!(
                !outer.contains(&inner),
                "{outer:?} repeats its source {inner:?} (rendered: {rendered:?})"
            );
        }
        current = e.source();
    }
    assert_eq!(
        rendered.matches(cause).count(),
        1,
        "{rendered:?} should say {cause:?} exactly once"
    );
}

#[test]
fn a_missing_manifest_says_its_os_error_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let e = Manifest::load(dir.path().join("nope.json")).expect_err("missing");
    assert!(matches!(e, ImportError::Io { .. }), "{e}");
    assert_said_once(anyhow::Error::from(e).context("sync failed"), "(os error 2)");
}

#[test]
fn a_held_import_lock_says_conflict_once() {
    let e = ImportError::from(StoreError::Conflict(
        "another import holds the redis import lock".into(),
    ));
    assert_said_once(anyhow::Error::from(e), "import lock");
    assert_said_once(
        anyhow::Error::from(ImportError::from(StoreError::Unavailable(
            "connection refused".into(),
        ))),
        "connection refused",
    );
}

#[test]
fn an_unreadable_tls_file_says_its_os_error_once() {
    let e = TlsError::Read {
        what: "certificate",
        path: PathBuf::from("/nonexistent/server.pem"),
        error: io::Error::from_raw_os_error(2),
    };
    assert_said_once(anyhow::Error::from(e).context("cannot start"), "(os error 2)");
}

#[test]
fn a_bad_date_and_a_store_error_say_their_reason_once() {
    let date_error = Date::parse("2024-02-30").expect_err("impossible date");
    let reason = date_error.to_string();
    assert_said_once(anyhow::Error::from(SinceError::from(date_error)), &reason);
    assert_said_once(
        anyhow::Error::from(ApiError::from(StoreError::Corrupt("bad bucket".into()))),
        "bad bucket",
    );
}
