//! The log lines of this test process: one global `tracing` subscriber (at
//! info, no colours) set on first use, writing into memory, and a wait for
//! a line that [`line_where`] is looking for.
#![allow(dead_code)]

use std::sync::{Arc, Mutex, OnceLock};

/// What this test process has logged so far; the first call installs the
/// global subscriber (call it before starting what logs).
pub fn captured() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOG: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOG.get_or_init(|| {
        let log = Arc::new(Mutex::new(Vec::new()));
        let writer = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter("info")
            .with_ansi(false)
            .with_writer(move || Writer(writer.clone()))
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("one global subscriber");
        log
    })
}

/// The first captured line for which `matches` holds, once it is written;
/// fails the test, naming `what`, if none is within the deadline of
/// [`super::poll::eventually`].
pub async fn line_where(what: &str, matches: impl Fn(&str) -> bool) -> String {
    let log = captured();
    let mut line = String::new();
    super::poll::eventually(what, async || {
        let text = String::from_utf8_lossy(&log.lock().expect("lock")).into_owned();
        match text.lines().find(|l| matches(l)) {
            Some(l) => {
                line = l.to_owned();
                true
            }
            None => false,
        }
    })
    .await;
    line
}

/// Fails the test unless `line` contains every one of `fields`.
pub fn assert_has_all(line: &str, fields: &[&str]) {
    for field in fields {
        assert!(line.contains(field), "{field} missing from {line}");
    }
}

struct Writer(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Writer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
