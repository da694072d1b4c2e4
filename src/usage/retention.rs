//! Keeping the usage store bounded: raw records older than `usage.retention` are deleted (their
//! hours stay in `usage_hourly`), rollups older than `usage.rollup_retention` too, raw rows
//! written without their rollup are rolled up, and SQLite gives freed pages back. All of it
//! runs on the writer thread between batches, in small transactions, so that neither the
//! request path nor the writer's inserts wait long on it.
//!
//! `usage_state` keeps `raw_since_ms`: raw records are complete from that time on (older ones
//! may have been deleted; their hours are in the rollups). [`raw_since`] reads it, for reports
//! and for whoever must know whether a period still has its per-request rows.

use super::rollup;
use crate::metrics::Metrics;
use crate::sql::{Db, Result, Tx, Val};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Rows deleted, or rolled up, per transaction: small enough that a batch of new records never
/// waits long behind one.
const STEP_ROWS: i64 = 2_000;

/// Pages SQLite gives back to the file system per step, once a quarter of the file is free.
const VACUUM_PAGES: i64 = 1_024;

/// How long the store keeps what.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Raw records; `None` keeps them all.
    pub raw: Option<Duration>,
    /// Hourly rollups; `None` keeps them all.
    pub rollups: Option<Duration>,
}

/// The time from which raw records are complete (0: none was ever deleted). Before it, only
/// the hourly rollups hold the usage.
pub fn raw_since(db: &mut Db) -> Result<i64> {
    Ok(db
        .query_opt(
            "SELECT value FROM usage_state WHERE name = 'raw_since_ms'",
            &[],
            |r| r.int(0),
        )?
        .unwrap_or(0))
}

/// Moves `raw_since_ms` forward to `ms` (never back).
fn set_raw_since(tx: &mut Tx<'_>, ms: i64) -> Result<()> {
    tx.execute(
        "INSERT INTO usage_state (name, value) VALUES ('raw_since_ms', ?1) \
         ON CONFLICT (name) DO UPDATE SET value = CASE WHEN excluded.value > usage_state.value \
         THEN excluded.value ELSE usage_state.value END",
        &[Val::Int(ms)],
    )?;
    Ok(())
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The writer's background work on the store, one small step at a time.
pub struct Upkeep {
    retention: Retention,
    /// When to look for work again while there is none.
    next_check: Instant,
    every: Duration,
    /// Steps failed in a row (the database refused): the next try waits longer, up to 5 s.
    failures: u32,
}

impl Upkeep {
    pub fn new(retention: Retention) -> Upkeep {
        // Often enough that records outlive the retention by at most half of it (a second
        // for short test settings), seldom enough to cost nothing (a minute at most).
        let every = retention
            .raw
            .map_or(Duration::from_secs(60), |r| r / 2)
            .clamp(Duration::from_secs(1), Duration::from_secs(60));
        Upkeep {
            retention,
            next_check: Instant::now(),
            every,
            failures: 0,
        }
    }

    /// Whether a step is due now.
    pub fn due(&self) -> bool {
        Instant::now() >= self.next_check
    }

    /// How long the writer may sleep before the next step is due.
    pub fn wait(&self) -> Duration {
        self.next_check.saturating_duration_since(Instant::now())
    }

    /// Does one step of each kind of work that is waiting; when some is left the next step is
    /// due at once, otherwise after the check interval. A step that fails is tried again after
    /// a back-off (100 ms doubling up to 5 s), not at once: a refusing database must not keep
    /// the writer thread spinning.
    pub fn step(&mut self, db: &mut Db, metrics: &Metrics) -> Result<()> {
        let backoff =
            Duration::from_millis(100u64 << self.failures.min(6)).min(Duration::from_secs(5));
        self.next_check = Instant::now() + backoff;
        self.failures = self.failures.saturating_add(1);
        let more = self.work(db, metrics)?;
        self.failures = 0;
        self.next_check = if more {
            Instant::now()
        } else {
            Instant::now() + self.every
        };
        Ok(())
    }

    /// One step of each kind of work; whether some is left.
    fn work(&mut self, db: &mut Db, metrics: &Metrics) -> Result<bool> {
        let mut more = false;
        let rolled = db.transaction(|tx| rollup::backfill(tx, STEP_ROWS))?;
        if rolled > 0 {
            metrics.usage_backfilled.inc_by(rolled);
            metrics
                .background_runs
                .with_label_values(&["usage_backfill"])
                .inc();
        }
        more |= rolled == STEP_ROWS as u64;
        if let Some(keep) = self.retention.raw.filter(|d| !d.is_zero()) {
            let cutoff = now_ms() - keep.as_millis() as i64;
            let deleted = db.transaction(|tx| {
                set_raw_since(tx, cutoff)?;
                // Rows not rolled up yet stay until the backfill has them.
                tx.execute(
                    "DELETE FROM usage WHERE request_id IN (SELECT request_id FROM usage \
                     WHERE time_ms < ?1 AND rolled ORDER BY time_ms LIMIT ?2)",
                    &[cutoff.into(), STEP_ROWS.into()],
                )
            })?;
            metrics
                .usage_deleted
                .with_label_values(&["usage"])
                .inc_by(deleted);
            metrics
                .background_runs
                .with_label_values(&["usage_retention"])
                .inc();
            more |= deleted == STEP_ROWS as u64;
        }
        if let Some(keep) = self.retention.rollups.filter(|d| !d.is_zero()) {
            let cutoff = now_ms() - keep.as_millis() as i64;
            // One hour per step: an hour has as many rows as its users x models, not more.
            let deleted = db.execute(
                "DELETE FROM usage_hourly WHERE hour_ms < ?1 AND hour_ms = \
                 (SELECT MIN(hour_ms) FROM usage_hourly)",
                &[cutoff.into()],
            )?;
            metrics
                .usage_deleted
                .with_label_values(&["usage_hourly"])
                .inc_by(deleted);
            more |= deleted > 0;
        }
        if let Db::Sqlite(c) = db {
            more |= give_back_pages(c)?;
        }
        Ok(more)
    }
}

/// With `auto_vacuum=incremental`, pages freed by deletes are reused by new rows; once more
/// than a quarter of the file is free (the retention was shortened) a few are given back to
/// the file system per step. Returns whether more are to be given back.
fn give_back_pages(c: &rusqlite::Connection) -> rusqlite::Result<bool> {
    let free: i64 = c.pragma_query_value(None, "freelist_count", |r| r.get(0))?;
    let pages: i64 = c.pragma_query_value(None, "page_count", |r| r.get(0))?;
    let incremental: i64 = c.pragma_query_value(None, "auto_vacuum", |r| r.get(0))?;
    if incremental != 2 || free * 4 <= pages {
        return Ok(false);
    }
    c.execute_batch(&format!("PRAGMA incremental_vacuum({VACUUM_PAGES})"))?;
    Ok(true)
}
