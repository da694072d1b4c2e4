//! Hourly rollups of the usage records (`usage_hourly`): requests, tokens, failures and time
//! summed per hour, user, cluster, framework, model, endpoint, status class, load test or not
//! and batch or not. They are what remains of an hour once retention has deleted its raw
//! records, so a facility can report allocations over years from a bounded store.
//!
//! Exactness: a record is added into its hour in the same transaction that inserts it, and
//! only when the insert did insert it (a retried batch adds nothing twice). Raw rows that
//! were written without their rollup (a store from before rollups, or a replica of the
//! previous version during a rolling upgrade) have `rolled` false and are added by
//! [`backfill`], in small batches, by the writer. The sums are integers, added with an upsert:
//! a record arriving late for an hour already rolled adds into it.

use super::UsageRecord;
use crate::sql::{Cols, Result, Tx, Val};
use std::collections::BTreeMap;

/// An hour, in milliseconds.
pub const HOUR_MS: i64 = 3_600_000;

/// The start of the hour `time_ms` falls in.
pub fn hour_of(time_ms: i64) -> i64 {
    time_ms.div_euclid(HOUR_MS) * HOUR_MS
}

/// What a rollup row is for: its primary key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    hour_ms: i64,
    username: String,
    cluster: String,
    framework: String,
    model: String,
    endpoint: String,
    /// `status / 100`: 2 for 2xx, 4 for 4xx, ...
    status_class: i64,
    loadtest: bool,
    batch: bool,
}

/// What a rollup row sums (each record adds 1 request and its own counts).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Sums {
    requests: i64,
    prompt_tokens: i64,
    completion_tokens: i64,
    total_tokens: i64,
    failed: i64,
    cancelled: i64,
    tokens_unknown: i64,
    duration_ms: i64,
    /// Sum of the times to first token, over the `ttft_count` records that had one.
    ttft_ms: i64,
    ttft_count: i64,
    bytes_in: i64,
    bytes_out: i64,
}

impl Sums {
    fn add(&mut self, o: &Sums) {
        // Integers that only a broken backend could overflow: saturate rather than fail the
        // batch forever.
        let add = |a: &mut i64, b: i64| *a = a.saturating_add(b);
        add(&mut self.requests, o.requests);
        add(&mut self.prompt_tokens, o.prompt_tokens);
        add(&mut self.completion_tokens, o.completion_tokens);
        add(&mut self.total_tokens, o.total_tokens);
        add(&mut self.failed, o.failed);
        add(&mut self.cancelled, o.cancelled);
        add(&mut self.tokens_unknown, o.tokens_unknown);
        add(&mut self.duration_ms, o.duration_ms);
        add(&mut self.ttft_ms, o.ttft_ms);
        add(&mut self.ttft_count, o.ttft_count);
        add(&mut self.bytes_in, o.bytes_in);
        add(&mut self.bytes_out, o.bytes_out);
    }
}

fn int(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A record's key and sums, as the writer has it.
fn part_of(r: &UsageRecord) -> (Key, Sums) {
    let key = Key {
        hour_ms: hour_of(r.time_ms),
        username: r.username.clone(),
        cluster: r.cluster.clone(),
        framework: r.framework.clone(),
        model: r.model.clone(),
        endpoint: r.endpoint.clone(),
        status_class: i64::from(r.status / 100),
        loadtest: r.loadtest,
        batch: r.batch_id.is_some(),
    };
    let sums = Sums {
        requests: 1,
        prompt_tokens: int(r.prompt_tokens),
        completion_tokens: int(r.completion_tokens),
        total_tokens: int(r.total_tokens),
        failed: i64::from(r.failed),
        cancelled: i64::from(r.cancelled),
        tokens_unknown: i64::from(r.tokens_unknown),
        duration_ms: int(r.duration_ms),
        ttft_ms: r.ttft_ms.map_or(0, int),
        ttft_count: i64::from(r.ttft_ms.is_some()),
        bytes_in: int(r.bytes_in),
        bytes_out: int(r.bytes_out),
    };
    (key, sums)
}

/// Adds `records` (just inserted, in the transaction `tx`) into their hours.
pub fn add<'r>(tx: &mut Tx<'_>, records: impl IntoIterator<Item = &'r UsageRecord>) -> Result<()> {
    upsert(tx, records.into_iter().map(part_of))
}

/// Sums the parts per key, then adds each key's sums into its row (one statement per row:
/// a batch of one hour's records has few keys).
fn upsert(tx: &mut Tx<'_>, parts: impl Iterator<Item = (Key, Sums)>) -> Result<()> {
    let mut rows: BTreeMap<Key, Sums> = BTreeMap::new();
    for (key, sums) in parts {
        rows.entry(key).or_default().add(&sums);
    }
    for (k, s) in rows {
        tx.execute(
            "INSERT INTO usage_hourly (hour_ms, username, cluster, framework, model, endpoint, \
             status_class, loadtest, batch, requests, prompt_tokens, completion_tokens, \
             total_tokens, failed, cancelled, tokens_unknown, duration_ms, ttft_ms, ttft_count, \
             bytes_in, bytes_out) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, \
             ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21) \
             ON CONFLICT (hour_ms, username, cluster, framework, model, endpoint, status_class, \
             loadtest, batch) DO UPDATE SET requests = usage_hourly.requests + excluded.requests, \
             prompt_tokens = usage_hourly.prompt_tokens + excluded.prompt_tokens, \
             completion_tokens = usage_hourly.completion_tokens + excluded.completion_tokens, \
             total_tokens = usage_hourly.total_tokens + excluded.total_tokens, \
             failed = usage_hourly.failed + excluded.failed, \
             cancelled = usage_hourly.cancelled + excluded.cancelled, \
             tokens_unknown = usage_hourly.tokens_unknown + excluded.tokens_unknown, \
             duration_ms = usage_hourly.duration_ms + excluded.duration_ms, \
             ttft_ms = usage_hourly.ttft_ms + excluded.ttft_ms, \
             ttft_count = usage_hourly.ttft_count + excluded.ttft_count, \
             bytes_in = usage_hourly.bytes_in + excluded.bytes_in, \
             bytes_out = usage_hourly.bytes_out + excluded.bytes_out",
            &[
                k.hour_ms.into(),
                k.username.into(),
                k.cluster.into(),
                k.framework.into(),
                k.model.into(),
                k.endpoint.into(),
                k.status_class.into(),
                i64::from(k.loadtest).into(),
                i64::from(k.batch).into(),
                s.requests.into(),
                s.prompt_tokens.into(),
                s.completion_tokens.into(),
                s.total_tokens.into(),
                s.failed.into(),
                s.cancelled.into(),
                s.tokens_unknown.into(),
                s.duration_ms.into(),
                s.ttft_ms.into(),
                s.ttft_count.into(),
                s.bytes_in.into(),
                s.bytes_out.into(),
            ],
        )?;
    }
    Ok(())
}

/// A boolean column as 0 or 1, read alike from SQLite's integers and PostgreSQL's booleans.
macro_rules! flag {
    ($col:literal) => {
        concat!("CAST(CASE WHEN ", $col, " THEN 1 ELSE 0 END AS BIGINT)")
    };
}

/// Rolls up at most `limit` raw rows written without their rollup (marking them rolled in
/// the same transaction); returns how many. Replicas doing this at once roll each row once:
/// the update re-checks `NOT rolled` on the row it locks.
pub fn backfill(tx: &mut Tx<'_>, limit: i64) -> Result<u64> {
    let parts = tx.query(
        concat!(
            "UPDATE usage SET rolled = TRUE WHERE NOT rolled AND request_id IN \
             (SELECT request_id FROM usage WHERE NOT rolled ORDER BY time_ms LIMIT ?1) RETURNING time_ms, \
             username, cluster, framework, model, endpoint, CAST(status AS BIGINT), ",
            flag!("loadtest"),
            ", CAST(CASE WHEN batch_id IS NULL THEN 0 ELSE 1 END AS BIGINT), prompt_tokens, \
             completion_tokens, total_tokens, ",
            flag!("failed"),
            ", ",
            flag!("cancelled"),
            ", ",
            flag!("tokens_unknown"),
            ", duration_ms, ttft_ms, bytes_in, bytes_out"
        ),
        &[Val::Int(limit)],
        read_part,
    )?;
    let n = parts.len() as u64;
    upsert(tx, parts.into_iter())?;
    Ok(n)
}

fn read_part(r: &dyn Cols) -> Result<(Key, Sums)> {
    let ttft = r.opt_int(16)?;
    Ok((
        Key {
            hour_ms: hour_of(r.int(0)?),
            username: r.text(1)?,
            cluster: r.text(2)?,
            framework: r.text(3)?,
            model: r.text(4)?,
            endpoint: r.text(5)?,
            status_class: r.int(6)? / 100,
            loadtest: r.int(7)? != 0,
            batch: r.int(8)? != 0,
        },
        Sums {
            requests: 1,
            prompt_tokens: r.int(9)?,
            completion_tokens: r.int(10)?,
            total_tokens: r.int(11)?,
            failed: r.int(12)?,
            cancelled: r.int(13)?,
            tokens_unknown: r.int(14)?,
            duration_ms: r.int(15)?,
            ttft_ms: ttft.unwrap_or(0),
            ttft_count: i64::from(ttft.is_some()),
            bytes_in: r.int(17)?,
            bytes_out: r.int(18)?,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hours_start_on_the_hour_even_before_1970() {
        assert_eq!(hour_of(HOUR_MS + 1), HOUR_MS);
        assert_eq!(hour_of(HOUR_MS), HOUR_MS);
        assert_eq!(hour_of(-1), -HOUR_MS);
    }
}
