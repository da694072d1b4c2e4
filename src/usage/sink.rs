//! Where usage records go: a bounded queue in front of a writer thread that inserts them in
//! batches (one transaction per batch) into SQLite in WAL mode. Nothing on the request path
//! waits on the database; a full queue drops the record, counts it and logs it.
//!
//! Crash window: a record is durable once its batch commits, at most `flush_interval` (or
//! `batch` records) after the request ended. On `kill -9` the records still queued or in the
//! open batch are lost; nothing committed is (WAL with `synchronous=NORMAL` survives a process
//! crash; a power loss may also lose the last commits). A graceful shutdown flushes everything.
//!
//! Storage faults (the database locked by another process, a full disk, a read-only file) do
//! not lose records: the writer retries its batch with back-off (up to 5 s apart) while new
//! records wait in the bounded queue; only what overflows the queue, or is still unwritten
//! when a flush's time runs out at shutdown, is dropped, logged and counted.

use super::UsageRecord;
use crate::metrics::Metrics;
use rusqlite::{params, Connection};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A destination for usage records (SQLite now; Postgres can follow).
pub trait UsageSink: Send + Sync {
    /// Hands a record over; never blocks.
    fn record(&self, record: UsageRecord);
    /// Writes everything handed over so far; waits at most `limit`.
    fn flush(&self, limit: Duration);
}

enum Message {
    Record(Box<UsageRecord>),
    /// Write everything now; give up on what cannot be written by the deadline.
    Flush(SyncSender<()>, Instant),
}

/// SQLite behind a writer thread.
pub struct SqliteSink {
    tx: SyncSender<Message>,
    metrics: Arc<Metrics>,
    warned: AtomicBool,
    path: PathBuf,
}

/// The store's schema, one step per version. Opening a database brings it to the last version
/// (`PRAGMA user_version` says where it is); steps only add, so older readers keep working.
const MIGRATIONS: &[&str] = &[
    // 1: the records.
    "CREATE TABLE IF NOT EXISTS usage (
        request_id TEXT PRIMARY KEY,
        time_ms INTEGER NOT NULL,
        user_id TEXT NOT NULL,
        username TEXT NOT NULL,
        cluster TEXT NOT NULL,
        framework TEXT NOT NULL,
        model TEXT NOT NULL,
        endpoint TEXT NOT NULL,
        route TEXT NOT NULL,
        status INTEGER NOT NULL,
        prompt_tokens INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL,
        total_tokens INTEGER NOT NULL,
        ttft_ms INTEGER,
        duration_ms INTEGER NOT NULL,
        bytes_in INTEGER NOT NULL,
        bytes_out INTEGER NOT NULL,
        instance TEXT NOT NULL,
        cancelled INTEGER NOT NULL
    );
    CREATE INDEX IF NOT EXISTS usage_user_time ON usage (username, time_ms);
    CREATE INDEX IF NOT EXISTS usage_model_time ON usage (model, time_ms);",
    // 2: answers the backend broke off, and tokens that are not the backend's own count.
    "ALTER TABLE usage ADD COLUMN failed INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE usage ADD COLUMN tokens_unknown INTEGER NOT NULL DEFAULT 0;",
    // 3: the W3C trace each request was part of, to find its spans and log lines.
    "ALTER TABLE usage ADD COLUMN trace_id TEXT NOT NULL DEFAULT '';",
];

/// Opens (creating if needed) the usage database, at the current schema version.
pub fn open(path: &Path) -> rusqlite::Result<Connection> {
    let mut conn = Connection::open(path)?;
    // Another process's lock is waited for briefly; longer ones are retried by the writer.
    conn.busy_timeout(Duration::from_millis(500))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    migrate(&mut conn)?;
    Ok(conn)
}

/// Applies the schema steps the database has not had yet, each in its own transaction.
fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let version: usize = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    for (done, step) in MIGRATIONS.iter().enumerate().skip(version) {
        let tx = conn.transaction()?;
        tx.execute_batch(step)?;
        tx.pragma_update(None, "user_version", done + 1)?;
        tx.commit()?;
    }
    Ok(())
}

impl SqliteSink {
    /// Opens the database and starts the writer thread.
    pub fn start(
        path: &Path,
        queue: usize,
        batch: usize,
        flush_interval: Duration,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Arc<SqliteSink>> {
        let conn = open(path).map_err(|e| {
            anyhow::anyhow!(
                "usage.store {}: cannot open the database: {e}",
                path.display()
            )
        })?;
        let (tx, rx) = sync_channel(queue.max(1));
        let writer_metrics = metrics.clone();
        let shown = path.display().to_string();
        std::thread::Builder::new()
            .name("usage-writer".into())
            .spawn(move || {
                write_loop(
                    conn,
                    rx,
                    batch.max(1),
                    flush_interval,
                    writer_metrics,
                    shown,
                )
            })?;
        Ok(Arc::new(SqliteSink {
            tx,
            metrics,
            warned: AtomicBool::new(false),
            path: path.to_path_buf(),
        }))
    }
}

impl UsageSink for SqliteSink {
    fn record(&self, record: UsageRecord) {
        match self.tx.try_send(Message::Record(Box::new(record))) {
            Ok(()) => self.metrics.usage_queue.inc(),
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.metrics.usage_dropped.inc();
                if !self.warned.swap(true, Ordering::Relaxed) {
                    log::error!(
                        "usage queue full: records are being DROPPED (the writer to {} cannot keep \
                         up); see firstgate_usage_dropped_total and raise usage.queue or check the disk",
                        self.path.display()
                    );
                }
            }
        }
    }

    fn flush(&self, limit: Duration) {
        let (ack, done) = sync_channel(1);
        let deadline = Instant::now() + limit;
        let mut msg = Message::Flush(ack, deadline);
        loop {
            match self.tx.try_send(msg) {
                Ok(()) => break,
                Err(TrySendError::Full(m)) if Instant::now() < deadline => {
                    msg = m;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => return,
            }
        }
        let _ = done.recv_timeout(deadline.saturating_duration_since(Instant::now()));
    }
}

fn write_loop(
    mut conn: Connection,
    rx: Receiver<Message>,
    batch: usize,
    flush_interval: Duration,
    metrics: Arc<Metrics>,
    path: String,
) {
    let mut pending: Vec<UsageRecord> = Vec::with_capacity(batch);
    let mut acks: Vec<SyncSender<()>> = Vec::new();
    let mut flush_by: Option<Instant> = None;
    let mut opened = Instant::now();
    loop {
        let wait = flush_interval.saturating_sub(opened.elapsed());
        let closed = match rx.recv_timeout(if pending.is_empty() {
            flush_interval
        } else {
            wait
        }) {
            Ok(Message::Record(r)) => {
                metrics.usage_queue.dec();
                if pending.is_empty() {
                    opened = Instant::now();
                }
                pending.push(*r);
                false
            }
            Ok(Message::Flush(ack, deadline)) => {
                acks.push(ack);
                flush_by = Some(flush_by.map_or(deadline, |d| d.min(deadline)));
                false
            }
            Err(RecvTimeoutError::Timeout) => false,
            Err(RecvTimeoutError::Disconnected) => true,
        };
        let due = pending.len() >= batch
            || (!pending.is_empty() && opened.elapsed() >= flush_interval)
            || !acks.is_empty()
            || closed;
        if due && !pending.is_empty() {
            write_batch(&mut conn, &mut pending, flush_by, &metrics, &path);
        }
        for ack in acks.drain(..) {
            let _ = ack.send(());
        }
        flush_by = None;
        if closed {
            return;
        }
    }
}

/// Writes `pending`, retrying with back-off while the store refuses (new records wait in the
/// queue meanwhile); gives up, counting the batch as dropped, only when `give_up_at` passes.
fn write_batch(
    conn: &mut Connection,
    pending: &mut Vec<UsageRecord>,
    give_up_at: Option<Instant>,
    metrics: &Metrics,
    path: &str,
) {
    let mut backoff = Duration::from_millis(50);
    let mut failures = 0u32;
    loop {
        match insert(conn, pending) {
            Ok(()) => {
                metrics.usage_written.inc_by(pending.len() as u64);
                if failures > 0 {
                    log::warn!(
                        "usage: {} records written to {path} after {failures} failed attempts",
                        pending.len()
                    );
                }
                break;
            }
            Err(e) => {
                failures += 1;
                metrics.usage_write_errors.inc();
                if failures == 1 {
                    log::error!(
                        "usage: cannot write {} records to {path}: {e}; retrying with back-off \
                         while new records wait in the queue (usage.queue)",
                        pending.len()
                    );
                }
                if give_up_at.is_some_and(|t| Instant::now() + backoff > t) {
                    metrics.usage_dropped.inc_by(pending.len() as u64);
                    log::error!(
                        "usage: {} records DROPPED at shutdown: {path} still refuses them ({e})",
                        pending.len()
                    );
                    break;
                }
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
    metrics
        .background_runs
        .with_label_values(&["usage_flush"])
        .inc();
    pending.clear();
}

fn insert(conn: &mut Connection, records: &[UsageRecord]) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    {
        let mut stmt = tx.prepare_cached(
            "INSERT OR REPLACE INTO usage (request_id, time_ms, user_id, username, cluster, \
             framework, model, endpoint, route, status, prompt_tokens, completion_tokens, \
             total_tokens, ttft_ms, duration_ms, bytes_in, bytes_out, instance, cancelled, failed, \
             tokens_unknown, trace_id) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, \
             ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22)",
        )?;
        for r in records {
            stmt.execute(params![
                r.request_id,
                r.time_ms,
                r.user_id,
                r.username,
                r.cluster,
                r.framework,
                r.model,
                r.endpoint,
                r.route,
                r.status,
                clamp(r.prompt_tokens),
                clamp(r.completion_tokens),
                clamp(r.total_tokens),
                r.ttft_ms.map(|t| t as i64),
                r.duration_ms as i64,
                r.bytes_in as i64,
                r.bytes_out as i64,
                r.instance,
                r.cancelled,
                r.failed,
                r.tokens_unknown,
                r.trace_id,
            ])?;
        }
    }
    tx.commit()
}

/// SQLite integers are signed: counts beyond `i64::MAX` (only a broken backend reports them)
/// are stored as the largest one.
fn clamp(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Totals per user and model from the store (for `firstgate usage` and start-up).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Totals {
    pub username: String,
    pub model: String,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
}

/// Sums the store's records since `since_ms`, optionally for one user or model.
pub fn totals(
    conn: &Connection,
    since_ms: i64,
    user: Option<&str>,
    model: Option<&str>,
) -> rusqlite::Result<Vec<Totals>> {
    let mut stmt = conn.prepare(
        "SELECT username, model, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), SUM(total_tokens)
         FROM usage WHERE time_ms >= ?1 AND (?2 IS NULL OR username = ?2) AND (?3 IS NULL OR model = ?3)
         GROUP BY username, model ORDER BY username, model",
    )?;
    let rows = stmt.query_map(params![since_ms, user, model], |r| {
        Ok(Totals {
            username: r.get(0)?,
            model: r.get(1)?,
            requests: r.get::<_, i64>(2)? as u64,
            prompt_tokens: r.get::<_, i64>(3)? as u64,
            completion_tokens: r.get::<_, i64>(4)? as u64,
            total_tokens: r.get::<_, i64>(5)? as u64,
        })
    })?;
    rows.collect()
}

/// A sink that keeps records in memory (tests of the request path, and `usage.store: null`
/// with totals still served).
#[derive(Default)]
pub struct MemorySink(pub Mutex<Vec<UsageRecord>>);

impl UsageSink for MemorySink {
    fn record(&self, record: UsageRecord) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(record);
    }

    fn flush(&self, _limit: Duration) {}
}
