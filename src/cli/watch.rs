//! The platform side of the federation: `reassigned watchlist add|remove
//! --file numbers.txt`, `reassigned watchlist count`, and `reassigned watch
//! --cursor-file F` (events as JSON lines on stdout, the cursor kept in a
//! file so that a cron job or a pipeline resumes where it stopped).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use futures_util::StreamExt;

use super::client::ClientArgs;
use crate::api::pb::watchlist_client::WatchlistClient;
use crate::api::pb::{self, watch_result};
use crate::federation::watch::MAX_WATCH_BATCH;

/// What `watchlist add` / `remove` did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct WatchlistSummary {
    /// Numbers whose state changed (added; removed).
    pub changed: u64,
    /// Numbers already so (already watched; not watched).
    pub unchanged: u64,
    /// Lines refused, with their line number and the reason.
    pub refused: Vec<(usize, String)>,
}

/// Adds (`add`) or removes the numbers of `file` (one E.164 number per
/// line; empty lines and `#` comments skipped), in calls of 10,000, with a
/// progress line on stderr per call.
pub async fn watchlist_file(client: &ClientArgs, file: &Path, add: bool) -> anyhow::Result<WatchlistSummary> {
    let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let lines: Vec<(usize, String)> = text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim().to_owned()))
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let mut watchlist = WatchlistClient::new(client.connect().await?);
    let mut summary = WatchlistSummary::default();
    let mut done = 0usize;
    for chunk in lines.chunks(MAX_WATCH_BATCH) {
        let phone_numbers: Vec<String> = chunk.iter().map(|(_, n)| n.clone()).collect();
        let results = if add {
            watchlist
                .add_watches(pb::AddWatchesRequest { phone_numbers })
                .await
                .context("AddWatches")?
                .into_inner()
                .results
        } else {
            watchlist
                .remove_watches(pb::RemoveWatchesRequest { phone_numbers })
                .await
                .context("RemoveWatches")?
                .into_inner()
                .results
        };
        for ((line, _), result) in chunk.iter().zip(results) {
            match result.outcome {
                Some(watch_result::Outcome::Changed(true)) => summary.changed += 1,
                Some(watch_result::Outcome::Changed(false)) => summary.unchanged += 1,
                Some(watch_result::Outcome::Error(e)) => summary
                    .refused
                    .push((*line, format!("{}: {}", e.code, e.message))),
                None => summary.refused.push((*line, "no outcome".into())),
            }
        }
        done += chunk.len();
        eprintln!("watchlist: {done}/{} numbers sent", lines.len());
    }
    Ok(summary)
}

/// Prints `summary` (stdout; refusals on stderr) and whether all went in.
pub fn print_summary(summary: &WatchlistSummary, add: bool) -> bool {
    for (line, reason) in &summary.refused {
        eprintln!("line {line}: refused: {reason}");
    }
    let (changed, unchanged) = if add {
        ("added", "already watched")
    } else {
        ("removed", "not watched")
    };
    println!(
        "{changed}: {}, {unchanged}: {}, refused: {}",
        summary.changed,
        summary.unchanged,
        summary.refused.len()
    );
    summary.refused.is_empty()
}

/// How many numbers the caller's list holds.
pub async fn watchlist_count(client: &ClientArgs) -> anyhow::Result<u64> {
    let mut watchlist = WatchlistClient::new(client.connect().await?);
    Ok(watchlist
        .count_watches(pb::CountWatchesRequest {})
        .await
        .context("CountWatches")?
        .into_inner()
        .count)
}

/// Options of `reassigned watch`.
#[derive(Clone, Debug, clap::Args)]
pub struct WatchOptions {
    /// Where to connect.
    #[command(flatten)]
    pub client: ClientArgs,
    /// The file that keeps the cursor: read at start (missing: from the
    /// oldest event still held), rewritten after each event printed.
    #[arg(long)]
    pub cursor_file: PathBuf,
    /// Exit (status 0) after this many seconds without an event, e.g. for
    /// a cron job; default: follow until interrupted.
    #[arg(long)]
    pub idle_exit_secs: Option<u64>,
}

/// Prints the caller's events as JSON lines on stdout, each followed by
/// saving its cursor in `--cursor-file` (at least once: an event printed
/// just before a crash is printed again at the next start). Returns the
/// number of events printed.
pub async fn watch(opts: &WatchOptions) -> anyhow::Result<u64> {
    let cursor = match std::fs::read_to_string(&opts.cursor_file) {
        Ok(text) => text.trim().to_owned(),
        // First run: everything still held for the list (no gap between
        // loading the list and the first run, whenever cron starts it).
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => crate::api::OLDEST.to_owned(),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", opts.cursor_file.display())),
    };
    let mut watchlist = WatchlistClient::new(opts.client.connect().await?);
    let mut stream = watchlist
        .watch_disconnections(pb::WatchDisconnectionsRequest { cursor })
        .await
        .context("WatchDisconnections")?
        .into_inner();
    let idle = opts.idle_exit_secs.map(Duration::from_secs);
    let mut printed = 0u64;
    loop {
        let next = match idle {
            Some(wait) => match tokio::time::timeout(wait, stream.next()).await {
                Ok(next) => next,
                Err(_) => return Ok(printed),
            },
            None => stream.next().await,
        };
        let Some(event) = next else {
            return Ok(printed);
        };
        let event = event.context("the event stream failed (resume with the same cursor file)")?;
        let kind = pb::DisconnectionEventKind::try_from(event.kind)
            .map(|k| {
                k.as_str_name()
                    .trim_start_matches("DISCONNECTION_EVENT_KIND_")
                    .to_owned()
            })
            .unwrap_or_default();
        let line = serde_json::json!({
            "event_id": event.event_id,
            "phone_number": event.phone_number,
            "disconnect_date": event.disconnect_date,
            "earliest_reissue_date": event.earliest_reissue_date,
            "source": event.source,
            "kind": kind,
            "cursor": event.cursor,
        });
        println!("{line}");
        save_cursor(&opts.cursor_file, &event.cursor)?;
        printed += 1;
    }
}

/// Replaces the cursor file (write aside, fsync, rename).
fn save_cursor(path: &Path, cursor: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(cursor.as_bytes())?;
    f.sync_data()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot replace {}", path.display()))
}
