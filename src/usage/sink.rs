//! Where usage records go: a bounded queue in front of a writer thread that inserts them in
//! batches into SQLite in WAL mode, or into PostgreSQL when replicas share the store; one
//! transaction per batch adds the records and their hours' rollups, and between batches the
//! same thread does the retention and backfill steps (`retention.rs`). Nothing on the request path
//! waits on the database: handing a record over is a short lock and a push; the writer is woken
//! once per batch (when `batch` records wait, for a flush, or every `flush_interval`), not per
//! record. A full queue drops the record, counts it and logs it.
//!
//! Crash window: a record is durable once its batch commits, at most `flush_interval` (plus the
//! write itself) after the request ended. On `kill -9` the records still queued or in the open
//! batch are lost; nothing committed is (WAL with `synchronous=NORMAL` survives a process crash;
//! a power loss may also lose the last commits; PostgreSQL keeps what it acknowledged). A
//! graceful shutdown flushes everything.
//!
//! Storage faults (the database locked by another process, a full disk, a read-only file, the
//! connection to PostgreSQL lost) do not lose records: the writer retries its batch with back-off (up to 5 s apart) while new
//! records wait in the bounded queue; only what overflows the queue, or is still unwritten
//! when a flush's time runs out at shutdown, is dropped, logged and counted.

use super::retention::{Retention, Upkeep};
use super::{rollup, UsageRecord};
use crate::metrics::Metrics;
use crate::sql::{Db, Tx};
use rusqlite::{params, Connection};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A destination for usage records.
pub trait UsageSink: Send + Sync {
    /// Hands a record over; never blocks.
    fn record(&self, record: UsageRecord);
    /// Writes everything handed over so far; waits at most `limit`.
    fn flush(&self, limit: Duration);
    /// For a store several replicas write to: everyone's totals per user and model, read
    /// from it (blocking: call it off the async workers). `None` for a store of one process,
    /// whose totals are counted in memory.
    fn shared_totals(&self) -> Option<anyhow::Result<Vec<Totals>>> {
        None
    }

    /// The records since `since_ms` summed up (`report::summary`), read from the store
    /// (blocking); `None` for a sink that keeps no store.
    fn summary(
        &self,
        _since_ms: i64,
        _bucket_ms: i64,
    ) -> Option<anyhow::Result<serde_json::Value>> {
        None
    }
}

/// Where a store's records are read back from.
enum Reader {
    /// A SQLite file, opened read-only for each report.
    File(std::path::PathBuf),
    /// PostgreSQL, through a connection of its own.
    Shared(Mutex<Db>),
}

impl Reader {
    fn read<T>(&self, f: impl FnOnce(&mut Db) -> crate::sql::Result<T>) -> anyhow::Result<T> {
        match self {
            Reader::File(path) => {
                let conn =
                    Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
                Ok(Db::Sqlite(conn).snapshot(f)?)
            }
            Reader::Shared(db) => Ok(db.lock().unwrap_or_else(|e| e.into_inner()).snapshot(f)?),
        }
    }
}

/// A database the writer thread inserts batches of records into.
pub trait RecordStore: Send + 'static {
    /// Inserts the records and adds them into their hours' rollups, in one transaction.
    fn insert(&mut self, records: &[UsageRecord]) -> Result<(), String>;
    /// One step of the background work (retention, backfill), between batches.
    fn upkeep(&mut self, upkeep: &mut Upkeep, metrics: &Metrics) -> Result<(), String>;
    /// Called when a flush (shutdown) has been written: SQLite empties its write-ahead log.
    fn checkpoint(&mut self) {}
}

impl RecordStore for Db {
    fn insert(&mut self, records: &[UsageRecord]) -> Result<(), String> {
        self.transaction(|tx| {
            // Only what this transaction inserted is rolled up: a record already there (a
            // retried batch whose commit was not acknowledged) was added then.
            let inserted = match tx {
                Tx::Sqlite(t) => insert(t, records)?,
                Tx::Postgres(t) => super::postgres::insert(t, records)?,
            };
            rollup::add(tx, inserted.into_iter().map(|i| &records[i]))
        })
        .map_err(|e| e.to_string())
    }

    fn upkeep(&mut self, upkeep: &mut Upkeep, metrics: &Metrics) -> Result<(), String> {
        upkeep.step(self, metrics).map_err(|e| e.to_string())
    }

    fn checkpoint(&mut self) {
        if let Db::Sqlite(c) = self {
            // A stopped gateway leaves a database file and no write-ahead log to replay.
            if let Err(e) = c.pragma_update(None, "wal_checkpoint", "TRUNCATE") {
                log::warn!("usage: cannot checkpoint the write-ahead log at shutdown: {e}");
            }
        }
    }
}

/// A store behind a writer thread.
pub struct WriterSink {
    queue: Arc<Queue>,
    metrics: Arc<Metrics>,
    warned: AtomicBool,
    /// The store, as named in messages.
    name: String,
    /// Where reports read the records back.
    reader: Reader,
}

/// Records on their way to the writer, and what is asked of it.
struct Queue {
    state: Mutex<QueueState>,
    /// Wakes the writer: a batch is ready, a flush is asked, or the sink is closed.
    wake: Condvar,
    /// Wakes the flushers when the writer is done.
    flushed: Condvar,
    /// Most records waiting.
    capacity: usize,
    /// Records per transaction; this many waiting wakes the writer.
    batch: usize,
}

#[derive(Default)]
struct QueueState {
    records: Vec<UsageRecord>,
    /// Flushes asked for, and done (each flusher waits for `flushes_done` to pass its number).
    flushes_asked: u64,
    flushes_done: u64,
    /// The earliest time a flush asked for gives up at.
    flush_by: Option<Instant>,
    closed: bool,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The store's schema, one step per version. Opening a database brings it to the last version
/// (`PRAGMA user_version` says where it is); steps never remove a column, so older readers keep
/// working.
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
    // 4: requests of load tests, which reports leave out unless asked.
    "ALTER TABLE usage ADD COLUMN loadtest INTEGER NOT NULL DEFAULT 0;",
    // 5: the batch a request was a line of.
    "ALTER TABLE usage ADD COLUMN batch_id TEXT;",
    // 6: hourly rollups, kept beyond the raw records' retention (`usage/rollup.rs`). Rows of
    // earlier versions are not rolled up yet: the writer adds them in batches while serving.
    // The time index lets retention find the oldest rows without reading the table.
    "ALTER TABLE usage ADD COLUMN rolled INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX IF NOT EXISTS usage_unrolled ON usage (time_ms) WHERE NOT rolled;
    CREATE INDEX IF NOT EXISTS usage_time ON usage (time_ms);
    CREATE TABLE IF NOT EXISTS usage_hourly (
        hour_ms INTEGER NOT NULL,
        username TEXT NOT NULL,
        cluster TEXT NOT NULL,
        framework TEXT NOT NULL,
        model TEXT NOT NULL,
        endpoint TEXT NOT NULL,
        status_class INTEGER NOT NULL,
        loadtest INTEGER NOT NULL,
        batch INTEGER NOT NULL,
        requests INTEGER NOT NULL,
        prompt_tokens INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL,
        total_tokens INTEGER NOT NULL,
        failed INTEGER NOT NULL,
        cancelled INTEGER NOT NULL,
        tokens_unknown INTEGER NOT NULL,
        duration_ms INTEGER NOT NULL,
        ttft_ms INTEGER NOT NULL,
        ttft_count INTEGER NOT NULL,
        bytes_in INTEGER NOT NULL,
        bytes_out INTEGER NOT NULL,
        PRIMARY KEY (hour_ms, username, cluster, framework, model, endpoint, status_class,
                     loadtest, batch)
    );
    CREATE TABLE IF NOT EXISTS usage_state (name TEXT PRIMARY KEY, value INTEGER NOT NULL);",
    // 7: no query reads the user and model indexes (reports filter by user and model within a
    // time range, and SQLite plans that on `usage_time`), yet every insert paid for them.
    "DROP INDEX IF EXISTS usage_user_time;
    DROP INDEX IF EXISTS usage_model_time;",
];

/// Opens (creating if needed) the usage database, at the current schema version.
pub fn open(path: &Path) -> rusqlite::Result<Connection> {
    let mut conn = Connection::open(path)?;
    // Another process's lock is waited for briefly; longer ones are retried by the writer.
    conn.busy_timeout(Duration::from_millis(500))?;
    // A new file reuses and gives back the pages retention frees (an old one keeps them for
    // reuse; `firstgate usage --vacuum` converts it). Only settable before the first table.
    let pages: i64 = conn.pragma_query_value(None, "page_count", |r| r.get(0))?;
    if pages == 0 {
        conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")?;
    }
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // A write-ahead log grown by a burst is cut back to 16 MiB at the next checkpoint.
    conn.pragma_update(None, "journal_size_limit", 16 * 1024 * 1024)?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    // Index pages stay cached between batches instead of being read back (16 MiB).
    conn.pragma_update(None, "cache_size", -16 * 1024)?;
    migrate(&mut conn, MIGRATIONS)?;
    Ok(conn)
}

/// Applies the schema steps (one per version, `PRAGMA user_version` says how many were) the
/// database has not had yet, each in its own transaction.
pub fn migrate(conn: &mut Connection, steps: &[&str]) -> rusqlite::Result<()> {
    let version: usize = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    for (done, step) in steps.iter().enumerate().skip(version) {
        let tx = conn.transaction()?;
        tx.execute_batch(step)?;
        tx.pragma_update(None, "user_version", done + 1)?;
        tx.commit()?;
    }
    Ok(())
}

/// How the writer batches (queue capacity, records per batch, longest wait) and how long the
/// store keeps what.
#[derive(Debug, Clone, Copy)]
pub struct Batching {
    pub queue: usize,
    pub batch: usize,
    pub flush_interval: Duration,
    pub retention: Retention,
}

impl WriterSink {
    /// Opens the SQLite file and starts the writer thread.
    pub fn sqlite(
        path: &Path,
        batching: Batching,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Arc<WriterSink>> {
        let conn = open(path).map_err(|e| {
            anyhow::anyhow!(
                "usage.store {}: cannot open the database: {e}",
                path.display()
            )
        })?;
        let name = path.display().to_string();
        let reader = Reader::File(path.to_path_buf());
        Self::start(Box::new(Db::Sqlite(conn)), name, reader, batching, metrics)
    }

    /// Starts the writer thread for PostgreSQL (`url` without its password). A database that
    /// cannot be reached yet is logged, and written to once it can (records wait meanwhile).
    pub fn postgres(
        url: &str,
        password: Option<String>,
        batching: Batching,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Arc<WriterSink>> {
        let mut writer = super::postgres::open(url, password.clone())?;
        if let Err(e) = writer.connect() {
            log::error!(
                "usage.store {url}: cannot reach PostgreSQL yet ({e}); records wait in the queue \
                 and are written once it answers"
            );
        }
        let reader = Reader::Shared(Mutex::new(super::postgres::open(url, password)?));
        Self::start(Box::new(writer), url.to_string(), reader, batching, metrics)
    }

    fn start(
        store: Box<dyn RecordStore>,
        name: String,
        reader: Reader,
        Batching {
            queue,
            batch,
            flush_interval,
            retention,
        }: Batching,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Arc<WriterSink>> {
        let queue = Arc::new(Queue {
            state: Mutex::new(QueueState::default()),
            wake: Condvar::new(),
            flushed: Condvar::new(),
            capacity: queue.max(1),
            batch: batch.max(1),
        });
        let writer = Writer {
            store,
            queue: queue.clone(),
            flush_interval,
            metrics: metrics.clone(),
            name: name.clone(),
            upkeep: Upkeep::new(retention),
        };
        std::thread::Builder::new()
            .name("usage-writer".into())
            .spawn(move || writer.run())?;
        Ok(Arc::new(WriterSink {
            queue,
            metrics,
            warned: AtomicBool::new(false),
            name,
            reader,
        }))
    }
}

impl UsageSink for WriterSink {
    fn record(&self, record: UsageRecord) {
        let mut state = self.queue.lock();
        if state.records.len() >= self.queue.capacity || state.closed {
            drop(state);
            self.metrics.usage_dropped.inc();
            if !self.warned.swap(true, Ordering::Relaxed) {
                log::error!(
                    "usage queue full: records are being DROPPED (the writer to {} cannot keep \
                     up); see firstgate_usage_dropped_total and raise usage.queue or check the store",
                    self.name
                );
            }
            return;
        }
        state.records.push(record);
        // Counted under the lock, so that the writer's subtraction never runs ahead of it.
        self.metrics.usage_queue.inc();
        let batch_ready = state.records.len() == self.queue.batch;
        drop(state);
        if batch_ready {
            self.queue.wake.notify_one();
        }
    }

    fn flush(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        let mut state = self.queue.lock();
        state.flushes_asked += 1;
        let ticket = state.flushes_asked;
        state.flush_by = Some(state.flush_by.map_or(deadline, |d| d.min(deadline)));
        self.queue.wake.notify_one();
        while state.flushes_done < ticket {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            state = self
                .queue
                .flushed
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn shared_totals(&self) -> Option<anyhow::Result<Vec<Totals>>> {
        let Reader::Shared(_) = self.reader else {
            return None;
        };
        Some(
            self.reader
                .read(|db| super::report::totals(db, 0, None, None, None))
                .map_err(|e| anyhow::anyhow!("usage.store {}: {e}", self.name)),
        )
    }

    fn summary(&self, since_ms: i64, bucket_ms: i64) -> Option<anyhow::Result<serde_json::Value>> {
        Some(
            self.reader
                .read(|db| super::report::summary(db, since_ms, bucket_ms))
                .map_err(|e| anyhow::anyhow!("usage.store {}: {e}", self.name)),
        )
    }
}

impl Drop for WriterSink {
    fn drop(&mut self) {
        // The writer writes what is left, then ends.
        self.queue.lock().closed = true;
        self.queue.wake.notify_one();
    }
}

/// The writer thread's side.
struct Writer {
    store: Box<dyn RecordStore>,
    queue: Arc<Queue>,
    flush_interval: Duration,
    metrics: Arc<Metrics>,
    /// The store, as named in messages.
    name: String,
    /// Retention and rollup backfill, done between batches.
    upkeep: Upkeep,
}

/// What the writer takes from the queue in one go.
struct Taken {
    records: Vec<UsageRecord>,
    /// The flush this answers, and when it gives up.
    flush: Option<(u64, Option<Instant>)>,
    closed: bool,
}

impl Writer {
    fn run(mut self) {
        loop {
            let taken = self.take();
            let give_up_at = taken.flush.and_then(|(_, by)| by);
            for batch in taken.records.chunks(self.queue.batch) {
                write_batch(
                    &mut *self.store,
                    batch,
                    give_up_at,
                    &self.metrics,
                    &self.name,
                );
            }
            if let Some((ticket, _)) = taken.flush {
                // Flushes come at shutdown: the process may end before the writer does.
                self.store.checkpoint();
                self.queue.lock().flushes_done = ticket;
                self.queue.flushed.notify_all();
            }
            if taken.closed {
                self.store.checkpoint();
                return;
            }
            if self.upkeep.due() {
                if let Err(e) = self.store.upkeep(&mut self.upkeep, &self.metrics) {
                    // Tried again at the next check; records keep being written meanwhile.
                    log::warn!("usage: retention and rollups of {}: {e}", self.name);
                }
            }
        }
    }

    /// Waits until a batch is ready, a flush is asked, the sink is closed or `flush_interval`
    /// has passed, and takes what is waiting.
    fn take(&self) -> Taken {
        // Background work that is due cuts the wait short (records waiting are taken first).
        let deadline = Instant::now() + self.flush_interval.min(self.upkeep.wait());
        let mut state = self.queue.lock();
        loop {
            let flush_asked = state.flushes_asked > state.flushes_done;
            let left = deadline.saturating_duration_since(Instant::now());
            if state.records.len() >= self.queue.batch
                || flush_asked
                || state.closed
                || left.is_zero()
            {
                break;
            }
            state = self
                .queue
                .wake
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let flush = (state.flushes_asked > state.flushes_done)
            .then(|| (state.flushes_asked, state.flush_by.take()));
        self.metrics.usage_queue.sub(state.records.len() as i64);
        Taken {
            records: std::mem::replace(&mut state.records, Vec::with_capacity(self.queue.batch)),
            flush,
            closed: state.closed,
        }
    }
}

/// Writes `pending`, retrying with back-off while the store refuses (new records wait in the
/// queue meanwhile); gives up, counting the batch as dropped, only when `give_up_at` passes.
fn write_batch(
    store: &mut dyn RecordStore,
    pending: &[UsageRecord],
    give_up_at: Option<Instant>,
    metrics: &Metrics,
    path: &str,
) {
    let mut backoff = Duration::from_millis(50);
    let mut failures = 0u32;
    loop {
        match store.insert(pending) {
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
}

/// Inserts the records into SQLite (in the writer's transaction); the indexes of those it
/// inserted (a request id already there is left as it is).
fn insert(tx: &rusqlite::Transaction<'_>, records: &[UsageRecord]) -> rusqlite::Result<Vec<usize>> {
    let mut inserted = Vec::with_capacity(records.len());
    {
        let mut stmt = tx.prepare_cached(
            "INSERT OR IGNORE INTO usage (request_id, time_ms, user_id, username, cluster, \
             framework, model, endpoint, route, status, prompt_tokens, completion_tokens, \
             total_tokens, ttft_ms, duration_ms, bytes_in, bytes_out, instance, cancelled, failed, \
             tokens_unknown, trace_id, loadtest, batch_id, rolled) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, \
             ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23, ?24, 1)",
        )?;
        for (i, r) in records.iter().enumerate() {
            let n = stmt.execute(params![
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
                r.loadtest,
                r.batch_id,
            ])?;
            if n == 1 {
                inserted.push(i);
            }
        }
    }
    Ok(inserted)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn records(ids: std::ops::Range<usize>, tokens: u64) -> Vec<UsageRecord> {
        ids.map(|i| UsageRecord {
            request_id: format!("r{i}"),
            time_ms: 1_800_000_000_000 + i as i64,
            username: "ada@anl.gov".into(),
            total_tokens: tokens,
            ..UsageRecord::default()
        })
        .collect()
    }

    /// A retried batch (some of its records already stored) adds only the new ones: each
    /// record is stored, and rolled up, once, as first written.
    #[test]
    fn a_batch_is_stored_once_even_when_part_of_it_was_already() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = Db::Sqlite(open(&dir.path().join("usage.db")).unwrap());
        db.insert(&records(0..90, 10)).unwrap();
        db.insert(&records(45..120, 20)).unwrap();
        let count = |db: &mut Db, sql: &str| db.query(sql, &[], |r| r.int(0)).unwrap()[0];
        assert_eq!(count(&mut db, "SELECT count(*) FROM usage"), 120);
        assert_eq!(
            count(&mut db, "SELECT sum(total_tokens) FROM usage"),
            90 * 10 + 30 * 20
        );
        assert_eq!(
            count(&mut db, "SELECT sum(requests) FROM usage_hourly"),
            120
        );
        assert_eq!(
            count(&mut db, "SELECT sum(total_tokens) FROM usage_hourly"),
            90 * 10 + 30 * 20
        );
    }
}
