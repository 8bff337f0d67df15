//! `reassigned publish`: an operator publishes disconnections from a CSV
//! file (`event_id,phone_number,disconnect_date`, a header line optional)
//! over `DisconnectionFeed`, in batches, with progress on stderr and a
//! summary of accepted / duplicate / refused (with reasons) on stdout.
//! Exits non-zero if anything was refused (or a line could not be read).

use std::io::BufRead;
use std::path::PathBuf;

use anyhow::Context;

use crate::api::feed::MAX_PUBLISH_ITEMS;
use crate::api::pb::disconnection_feed_client::DisconnectionFeedClient;
use crate::api::pb::publish_result::Outcome;
use crate::api::pb::{Disconnection, PublishDisconnectionsRequest};

/// Refusals listed in full in the summary; more are counted.
const LISTED_REFUSALS: usize = 50;

/// Options of `reassigned publish`.
#[derive(Clone, Debug, clap::Args)]
pub struct PublishOptions {
    /// The CSV file: `event_id,phone_number,disconnect_date` per line.
    #[arg(long)]
    pub file: PathBuf,
    /// Where to connect, as whom (the operator's certificate), and the
    /// token (scope `register:write`, bound to that certificate).
    #[command(flatten)]
    pub client: super::client::ClientArgs,
    /// Items per call (1 to 10000).
    #[arg(long, default_value_t = 1000)]
    pub batch_size: usize,
}

/// What a run published.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PublishSummary {
    /// Items new and durable.
    pub accepted: u64,
    /// Items already published before (nothing changed).
    pub duplicate: u64,
    /// Items refused (by the server, or lines that could not be read):
    /// `(line, event id, code, reason)`, the first `LISTED_REFUSALS`.
    pub refused: Vec<(u64, String, String, String)>,
    /// All refusals, listed or not.
    pub refused_count: u64,
}

impl PublishSummary {
    fn refuse(&mut self, line: u64, event_id: &str, code: &str, reason: String) {
        self.refused_count += 1;
        if self.refused.len() < LISTED_REFUSALS {
            self.refused
                .push((line, event_id.to_owned(), code.to_owned(), reason));
        }
    }
}

impl std::fmt::Display for PublishSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "accepted {}, duplicate {}, refused {}",
            self.accepted, self.duplicate, self.refused_count
        )?;
        for (line, id, code, reason) in &self.refused {
            writeln!(f, "  line {line}: event {id:?}: {code}: {reason}")?;
        }
        if self.refused_count > self.refused.len() as u64 {
            writeln!(
                f,
                "  ... and {} more",
                self.refused_count - self.refused.len() as u64
            )?;
        }
        Ok(())
    }
}

type FeedClient = DisconnectionFeedClient<super::client::Client>;

/// Publishes the file as `opts` says; the summary (refusals are not an
/// error here: see [`run`]).
pub async fn publish(opts: &PublishOptions) -> anyhow::Result<PublishSummary> {
    anyhow::ensure!(
        (1..=MAX_PUBLISH_ITEMS).contains(&opts.batch_size),
        "--batch-size must be 1 to {MAX_PUBLISH_ITEMS}"
    );
    let mut client = DisconnectionFeedClient::new(opts.client.connect().await?)
        .max_encoding_message_size(crate::server::FEED_MAX_MESSAGE_BYTES);
    let file =
        std::fs::File::open(&opts.file).with_context(|| format!("cannot open {}", opts.file.display()))?;
    let mut summary = PublishSummary::default();
    let mut batch: Vec<(u64, Disconnection)> = Vec::with_capacity(opts.batch_size);
    let mut sent = 0u64;
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let number = i as u64 + 1;
        let line = line.with_context(|| format!("cannot read line {number} of {}", opts.file.display()))?;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || (number == 1 && line.starts_with("event_id")) {
            continue;
        }
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let [event_id, phone_number, disconnect_date] = fields[..] else {
            summary.refuse(
                number,
                fields.first().copied().unwrap_or_default(),
                "INVALID_ARGUMENT",
                format!(
                    "expected 3 fields event_id,phone_number,disconnect_date, got {}",
                    fields.len()
                ),
            );
            continue;
        };
        batch.push((
            number,
            Disconnection {
                event_id: event_id.to_owned(),
                phone_number: phone_number.to_owned(),
                disconnect_date: disconnect_date.to_owned(),
            },
        ));
        if batch.len() == opts.batch_size {
            sent += send(&mut client, &mut batch, &mut summary).await?;
            eprintln!(
                "published {sent} items ({} refused so far)",
                summary.refused_count
            );
        }
    }
    if !batch.is_empty() {
        sent += send(&mut client, &mut batch, &mut summary).await?;
        eprintln!(
            "published {sent} items ({} refused so far)",
            summary.refused_count
        );
    }
    Ok(summary)
}

/// Sends one batch and counts its outcomes; the batch is emptied.
async fn send(
    client: &mut FeedClient,
    batch: &mut Vec<(u64, Disconnection)>,
    summary: &mut PublishSummary,
) -> anyhow::Result<u64> {
    let (lines, items): (Vec<u64>, Vec<Disconnection>) = std::mem::take(batch).into_iter().unzip();
    let count = items.len() as u64;
    let results = client
        .publish_disconnections(PublishDisconnectionsRequest { items })
        .await
        .map_err(|s| anyhow::anyhow!("the server refused the call: {:?}: {}", s.code(), s.message()))?
        .into_inner()
        .results;
    anyhow::ensure!(
        results.len() as u64 == count,
        "the server answered {} results for {count} items",
        results.len()
    );
    for (line, result) in lines.into_iter().zip(results) {
        match result.outcome {
            Some(Outcome::Accepted(_)) => summary.accepted += 1,
            Some(Outcome::Duplicate(_)) => summary.duplicate += 1,
            Some(Outcome::Error(e)) => summary.refuse(line, &result.event_id, &e.code, e.message),
            None => summary.refuse(line, &result.event_id, "UNKNOWN", "no outcome".into()),
        }
    }
    Ok(count)
}

/// `reassigned publish`: publishes, prints the summary, fails if anything
/// was refused.
pub async fn run(opts: &PublishOptions) -> anyhow::Result<()> {
    let summary = publish(opts).await?;
    print!("{summary}");
    anyhow::ensure!(
        summary.refused_count == 0,
        "{} items refused",
        summary.refused_count
    );
    Ok(())
}
