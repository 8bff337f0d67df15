//! `reassigned audit export`: the audit records of one platform over a range
//! of UTC days, as JSON lines on stdout.

use std::io::Write as _;

use crate::audit;
use crate::domain::Date;

const DAY_MS: i64 = 86_400_000;

/// Writes the records of `platform` from the start of `from` to the end of
/// `to` (UTC days, `YYYY-MM-DD`) in the stream `{key_prefix}:audit` of
/// `redis_url`, one JSON object per line, oldest first. Returns the count.
pub async fn export_cmd(
    redis_url: &str,
    key_prefix: &str,
    platform: &str,
    from: &str,
    to: &str,
) -> anyhow::Result<u64> {
    let from = Date::parse(from).map_err(|e| anyhow::anyhow!("--from: {e}"))?;
    let to = Date::parse(to).map_err(|e| anyhow::anyhow!("--to: {e}"))?;
    anyhow::ensure!(from <= to, "--from must not be after --to");
    let from_ms = i64::from(from.days()) * DAY_MS;
    let to_ms = (i64::from(to.days()) + 1) * DAY_MS - 1;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let count = audit::export(
        redis_url,
        &format!("{key_prefix}:audit"),
        platform,
        from_ms,
        to_ms,
        |record| {
            serde_json::to_writer(&mut out, &record)?;
            out.write_all(b"\n")?;
            Ok(())
        },
    )
    .await?;
    out.flush()?;
    Ok(count)
}
