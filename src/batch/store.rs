//! Files and batches of the OpenAI Batch API, and FIRST's batches: the metadata only (contents
//! are files under `{batch.dir}/files/`). In SQLite (`{batch.dir}/batches.db`, WAL) for one
//! process, or in the PostgreSQL of `usage.store` when replicas share the state (then
//! `batch.dir` is storage they share too). The statements are written once, with `?N`
//! placeholders, and run on either database.

use crate::pg::PgConnection;
pub use crate::sql::{Cols, Db, Result, StoreError, Val};
use rusqlite::Connection;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// SQLite's schema, one step per version (`PRAGMA user_version`); steps only add.
const MIGRATIONS: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS files (
        id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        filename TEXT NOT NULL,
        purpose TEXT NOT NULL,
        bytes INTEGER NOT NULL,
        lines INTEGER NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE INDEX IF NOT EXISTS files_owner ON files (owner, created_at);
    CREATE TABLE IF NOT EXISTS batches (
        id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        identity TEXT NOT NULL,
        endpoint TEXT NOT NULL,
        input_file_id TEXT NOT NULL,
        completion_window TEXT NOT NULL,
        status TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        in_progress_at INTEGER,
        finalizing_at INTEGER,
        completed_at INTEGER,
        failed_at INTEGER,
        expired_at INTEGER,
        cancelling_at INTEGER,
        cancelled_at INTEGER,
        expires_at INTEGER NOT NULL,
        output_file_id TEXT,
        error_file_id TEXT,
        total INTEGER NOT NULL,
        completed INTEGER NOT NULL DEFAULT 0,
        failed INTEGER NOT NULL DEFAULT 0,
        metadata TEXT,
        errors TEXT
    );
    CREATE INDEX IF NOT EXISTS batches_owner ON batches (owner, created_at);",
    // 2: batches of FIRST's batch API.
    "CREATE TABLE IF NOT EXISTS first_batches (
        id TEXT PRIMARY KEY,
        username TEXT NOT NULL,
        cluster TEXT NOT NULL,
        framework TEXT NOT NULL,
        model TEXT NOT NULL,
        input_file TEXT NOT NULL,
        output_folder_path TEXT,
        task_ids TEXT NOT NULL,
        status TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        completed_at INTEGER,
        failed_at INTEGER,
        result TEXT,
        error TEXT
    );
    CREATE INDEX IF NOT EXISTS first_batches_user ON first_batches (username, created_at);",
    // 3: an OpenAI-API batch run by a cluster's batch function: its Compute task.
    "ALTER TABLE batches ADD COLUMN compute_task TEXT;",
];

/// PostgreSQL's schema (the same tables, 64-bit integers), one step per version.
const PG_MIGRATIONS: &[&str] = &["CREATE TABLE IF NOT EXISTS files (
        id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        filename TEXT NOT NULL,
        purpose TEXT NOT NULL,
        bytes BIGINT NOT NULL,
        lines BIGINT NOT NULL,
        created_at BIGINT NOT NULL
    );
    CREATE INDEX IF NOT EXISTS files_owner ON files (owner, created_at);
    CREATE TABLE IF NOT EXISTS batches (
        id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        identity TEXT NOT NULL,
        endpoint TEXT NOT NULL,
        input_file_id TEXT NOT NULL,
        completion_window TEXT NOT NULL,
        status TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        in_progress_at BIGINT,
        finalizing_at BIGINT,
        completed_at BIGINT,
        failed_at BIGINT,
        expired_at BIGINT,
        cancelling_at BIGINT,
        cancelled_at BIGINT,
        expires_at BIGINT NOT NULL,
        output_file_id TEXT,
        error_file_id TEXT,
        total BIGINT NOT NULL,
        completed BIGINT NOT NULL DEFAULT 0,
        failed BIGINT NOT NULL DEFAULT 0,
        metadata TEXT,
        errors TEXT,
        compute_task TEXT
    );
    CREATE INDEX IF NOT EXISTS batches_owner ON batches (owner, created_at);
    CREATE TABLE IF NOT EXISTS first_batches (
        id TEXT PRIMARY KEY,
        username TEXT NOT NULL,
        cluster TEXT NOT NULL,
        framework TEXT NOT NULL,
        model TEXT NOT NULL,
        input_file TEXT NOT NULL,
        output_folder_path TEXT,
        task_ids TEXT NOT NULL,
        status TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        completed_at BIGINT,
        failed_at BIGINT,
        result TEXT,
        error TEXT
    );
    CREATE INDEX IF NOT EXISTS first_batches_user ON first_batches (username, created_at);
    CREATE TABLE IF NOT EXISTS leases (
        name TEXT PRIMARY KEY,
        holder TEXT NOT NULL,
        until_ms BIGINT NOT NULL
    );"];

/// An uploaded (or produced) file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRow {
    pub id: String,
    pub owner: String,
    pub filename: String,
    /// `batch` (uploads), `batch_output` (results).
    pub purpose: String,
    pub bytes: u64,
    pub lines: u64,
    pub created_at: i64,
}

/// Who a batch runs for: what its lines need to pass the same checks as the user's own
/// requests (never a token).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub id: String,
    pub username: String,
    pub name: Option<String>,
    pub idp_id: Option<String>,
    pub idp_name: Option<String>,
    pub groups: Vec<String>,
    pub service_account: bool,
}

impl Owner {
    /// What a batch keeps of the identity that created it (never a token).
    pub fn of(i: &crate::auth::Identity) -> Owner {
        Owner {
            id: i.id.clone(),
            username: i.username.clone(),
            name: i.name.clone(),
            idp_id: i.idp_id.clone(),
            idp_name: i.idp_name.clone(),
            groups: i.groups.clone(),
            service_account: i.service_account,
        }
    }

    /// The identity a batch's lines run as (it never expires: the batch was admitted).
    pub fn identity(&self) -> crate::auth::Identity {
        crate::auth::Identity {
            domain: crate::auth::Identity::domain_of(&self.username),
            id: self.id.clone(),
            username: self.username.clone(),
            name: self.name.clone(),
            idp_id: self.idp_id.clone(),
            idp_name: self.idp_name.clone(),
            groups: self.groups.clone(),
            service_account: self.service_account,
            expires_at: u64::MAX,
            auth_service: "batch",
        }
    }
}

/// A batch and its progress.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchRow {
    pub id: String,
    pub owner: Owner,
    pub endpoint: String,
    pub input_file_id: String,
    pub completion_window: String,
    pub status: String,
    pub created_at: i64,
    pub in_progress_at: Option<i64>,
    pub finalizing_at: Option<i64>,
    pub completed_at: Option<i64>,
    pub failed_at: Option<i64>,
    pub expired_at: Option<i64>,
    pub cancelling_at: Option<i64>,
    pub cancelled_at: Option<i64>,
    pub expires_at: i64,
    pub output_file_id: Option<String>,
    pub error_file_id: Option<String>,
    pub total: u64,
    pub completed: u64,
    pub failed: u64,
    pub metadata: Option<serde_json::Value>,
    pub errors: Option<serde_json::Value>,
    /// The Compute task running it, when the policy sent it to a batch function.
    pub compute_task: Option<String>,
}

/// Statuses of a batch that is not over.
pub const UNFINISHED: [&str; 4] = ["validating", "in_progress", "finalizing", "cancelling"];

/// Opens (creating) the SQLite database of one process.
pub fn open(path: &Path) -> Result<Db> {
    let mut conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(2))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    crate::usage::sink::migrate(&mut conn, MIGRATIONS)?;
    Ok(Db::Sqlite(conn))
}

/// The PostgreSQL database replicas share (connected, and migrated, on first use: one that
/// cannot be reached yet fails the batch calls until it can).
pub fn open_shared(url: &str, password: Option<String>) -> anyhow::Result<Db> {
    let pg = PgConnection::new(url, password, "batch", PG_MIGRATIONS)
        .map_err(|e| anyhow::anyhow!("usage.store (batch state): {e}"))?;
    Ok(Db::Postgres(Box::new(pg)))
}

pub fn insert_file(db: &mut Db, f: &FileRow) -> Result<()> {
    db.execute(
        "INSERT INTO files (id, owner, filename, purpose, bytes, lines, created_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        &[
            (&f.id).into(),
            (&f.owner).into(),
            (&f.filename).into(),
            (&f.purpose).into(),
            f.bytes.into(),
            f.lines.into(),
            f.created_at.into(),
        ],
    )?;
    Ok(())
}

fn file_of(r: &dyn Cols) -> Result<FileRow> {
    Ok(FileRow {
        id: r.text(0)?,
        owner: r.text(1)?,
        filename: r.text(2)?,
        purpose: r.text(3)?,
        bytes: r.int(4)? as u64,
        lines: r.int(5)? as u64,
        created_at: r.int(6)?,
    })
}

const FILE_COLUMNS: &str = "id, owner, filename, purpose, bytes, lines, created_at";

pub fn file(db: &mut Db, id: &str) -> Result<Option<FileRow>> {
    db.query_opt(
        &format!("SELECT {FILE_COLUMNS} FROM files WHERE id = ?1"),
        &[id.into()],
        file_of,
    )
}

/// A user's files, newest first, after the cursor `after` (an id), at most `limit`.
pub fn files(
    db: &mut Db,
    owner: &str,
    purpose: Option<&str>,
    after: Option<&str>,
    limit: usize,
) -> Result<Vec<FileRow>> {
    db.query(
        &format!(
            "SELECT {FILE_COLUMNS} FROM files WHERE owner = ?1 AND (CAST(?2 AS TEXT) IS NULL OR purpose = ?2) \
             AND (CAST(?3 AS TEXT) IS NULL OR id < ?3) ORDER BY id DESC LIMIT ?4"
        ),
        &[
            owner.into(),
            purpose.into(),
            after.into(),
            (limit as u64).into(),
        ],
        file_of,
    )
}

pub fn delete_file(db: &mut Db, id: &str) -> Result<()> {
    db.execute("DELETE FROM files WHERE id = ?1", &[id.into()])?;
    Ok(())
}

/// Files created before `before` (Unix seconds), for the retention sweep.
pub fn files_before(db: &mut Db, before: i64) -> Result<Vec<String>> {
    db.query(
        "SELECT id FROM files WHERE created_at < ?1",
        &[before.into()],
        |r| r.text(0),
    )
}

const BATCH_COLUMNS: &str = "id, identity, endpoint, input_file_id, completion_window, status, \
    created_at, in_progress_at, finalizing_at, completed_at, failed_at, expired_at, cancelling_at, \
    cancelled_at, expires_at, output_file_id, error_file_id, total, completed, failed, metadata, errors, compute_task";

fn batch_of(r: &dyn Cols) -> Result<BatchRow> {
    let json = |i: usize| -> Result<Option<serde_json::Value>> {
        Ok(r.opt_text(i)?.and_then(|s| serde_json::from_str(&s).ok()))
    };
    let owner = serde_json::from_str(&r.text(1)?)
        .map_err(|e| StoreError::new(format!("a batch's owner does not read back: {e}")))?;
    Ok(BatchRow {
        id: r.text(0)?,
        owner,
        endpoint: r.text(2)?,
        input_file_id: r.text(3)?,
        completion_window: r.text(4)?,
        status: r.text(5)?,
        created_at: r.int(6)?,
        in_progress_at: r.opt_int(7)?,
        finalizing_at: r.opt_int(8)?,
        completed_at: r.opt_int(9)?,
        failed_at: r.opt_int(10)?,
        expired_at: r.opt_int(11)?,
        cancelling_at: r.opt_int(12)?,
        cancelled_at: r.opt_int(13)?,
        expires_at: r.int(14)?,
        output_file_id: r.opt_text(15)?,
        error_file_id: r.opt_text(16)?,
        total: r.int(17)? as u64,
        completed: r.int(18)? as u64,
        failed: r.int(19)? as u64,
        metadata: json(20)?,
        errors: json(21)?,
        compute_task: r.opt_text(22)?,
    })
}

pub fn insert_batch(db: &mut Db, b: &BatchRow) -> Result<()> {
    db.execute(
        "INSERT INTO batches (id, owner, identity, endpoint, input_file_id, completion_window, \
         status, created_at, expires_at, total, metadata) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        &[
            (&b.id).into(),
            (&b.owner.username).into(),
            serde_json::to_string(&b.owner).unwrap_or_default().into(),
            (&b.endpoint).into(),
            (&b.input_file_id).into(),
            (&b.completion_window).into(),
            (&b.status).into(),
            b.created_at.into(),
            b.expires_at.into(),
            b.total.into(),
            b.metadata.as_ref().map(|m| m.to_string()).into(),
        ],
    )?;
    Ok(())
}

pub fn batch(db: &mut Db, id: &str) -> Result<Option<BatchRow>> {
    db.query_opt(
        &format!("SELECT {BATCH_COLUMNS} FROM batches WHERE id = ?1"),
        &[id.into()],
        batch_of,
    )
}

/// A user's batches, newest first, after the cursor `after`, at most `limit`.
pub fn batches(
    db: &mut Db,
    owner: &str,
    after: Option<&str>,
    limit: usize,
) -> Result<Vec<BatchRow>> {
    db.query(
        &format!(
            "SELECT {BATCH_COLUMNS} FROM batches WHERE owner = ?1 AND (CAST(?2 AS TEXT) IS NULL OR id < ?2) \
             ORDER BY id DESC LIMIT ?3"
        ),
        &[owner.into(), after.into(), (limit as u64).into()],
        batch_of,
    )
}

/// The SQL list of [`UNFINISHED`].
fn unfinished_list() -> String {
    UNFINISHED.map(|s| format!("'{s}'")).join(", ")
}

/// Batches not over yet (every user's), oldest first.
pub fn unfinished(db: &mut Db) -> Result<Vec<BatchRow>> {
    db.query(
        &format!(
            "SELECT {BATCH_COLUMNS} FROM batches WHERE status IN ({}) ORDER BY id",
            unfinished_list()
        ),
        &[],
        batch_of,
    )
}

/// How many of `owner`'s batches are not over.
pub fn active_count(db: &mut Db, owner: &str) -> Result<usize> {
    let n = db.query_opt(
        &format!(
            "SELECT COUNT(*) FROM batches WHERE owner = ?1 AND status IN ({})",
            unfinished_list()
        ),
        &[owner.into()],
        |r| r.int(0),
    )?;
    Ok(n.unwrap_or(0) as usize)
}

/// Moves a batch to `status`, stamping `{status}_at` (where there is one) with `now`.
pub fn set_status(db: &mut Db, id: &str, status: &str, now: i64) -> Result<()> {
    let stamp = match status {
        "in_progress" => "in_progress_at",
        "finalizing" => "finalizing_at",
        "completed" => "completed_at",
        "failed" => "failed_at",
        "expired" => "expired_at",
        "cancelling" => "cancelling_at",
        "cancelled" => "cancelled_at",
        _ => {
            db.execute(
                "UPDATE batches SET status = ?2 WHERE id = ?1",
                &[id.into(), status.into()],
            )?;
            return Ok(());
        }
    };
    db.execute(
        &format!("UPDATE batches SET status = ?2, {stamp} = ?3 WHERE id = ?1"),
        &[id.into(), status.into(), now.into()],
    )?;
    Ok(())
}

pub fn set_counts(db: &mut Db, id: &str, completed: u64, failed: u64) -> Result<()> {
    db.execute(
        "UPDATE batches SET completed = ?2, failed = ?3 WHERE id = ?1",
        &[id.into(), completed.into(), failed.into()],
    )?;
    Ok(())
}

pub fn set_results(
    db: &mut Db,
    id: &str,
    output_file_id: Option<&str>,
    error_file_id: Option<&str>,
) -> Result<()> {
    db.execute(
        "UPDATE batches SET output_file_id = ?2, error_file_id = ?3 WHERE id = ?1",
        &[id.into(), output_file_id.into(), error_file_id.into()],
    )?;
    Ok(())
}

pub fn set_compute_task(db: &mut Db, id: &str, task: &str) -> Result<()> {
    db.execute(
        "UPDATE batches SET compute_task = ?2 WHERE id = ?1",
        &[id.into(), task.into()],
    )?;
    Ok(())
}

pub fn set_errors(db: &mut Db, id: &str, errors: &serde_json::Value) -> Result<()> {
    db.execute(
        "UPDATE batches SET errors = ?2 WHERE id = ?1",
        &[id.into(), errors.to_string().into()],
    )?;
    Ok(())
}

/// A batch of FIRST's batch API (run by the cluster's batch function on Globus Compute).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirstBatchRow {
    pub id: String,
    pub username: String,
    pub cluster: String,
    pub framework: String,
    pub model: String,
    pub input_file: String,
    pub output_folder_path: Option<String>,
    pub task_ids: Vec<String>,
    /// `pending`, `running`, `completed` or `failed`.
    pub status: String,
    pub created_at: i64,
    pub completed_at: Option<i64>,
    pub failed_at: Option<i64>,
    /// The batch function's result (a JSON string), once completed.
    pub result: Option<String>,
    /// Why it failed.
    pub error: Option<String>,
}

const FIRST_COLUMNS: &str = "id, username, cluster, framework, model, input_file, \
    output_folder_path, task_ids, status, created_at, completed_at, failed_at, result, error";

fn first_of(r: &dyn Cols) -> Result<FirstBatchRow> {
    Ok(FirstBatchRow {
        id: r.text(0)?,
        username: r.text(1)?,
        cluster: r.text(2)?,
        framework: r.text(3)?,
        model: r.text(4)?,
        input_file: r.text(5)?,
        output_folder_path: r.opt_text(6)?,
        task_ids: r
            .text(7)?
            .split(',')
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
            .collect(),
        status: r.text(8)?,
        created_at: r.int(9)?,
        completed_at: r.opt_int(10)?,
        failed_at: r.opt_int(11)?,
        result: r.opt_text(12)?,
        error: r.opt_text(13)?,
    })
}

pub fn insert_first(db: &mut Db, b: &FirstBatchRow) -> Result<()> {
    db.execute(
        &format!("INSERT INTO first_batches ({FIRST_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)"),
        &[
            (&b.id).into(),
            (&b.username).into(),
            (&b.cluster).into(),
            (&b.framework).into(),
            (&b.model).into(),
            (&b.input_file).into(),
            b.output_folder_path.as_ref().into(),
            b.task_ids.join(",").into(),
            (&b.status).into(),
            b.created_at.into(),
            b.completed_at.into(),
            b.failed_at.into(),
            b.result.as_ref().into(),
            b.error.as_ref().into(),
        ],
    )?;
    Ok(())
}

pub fn first(db: &mut Db, id: &str) -> Result<Option<FirstBatchRow>> {
    db.query_opt(
        &format!("SELECT {FIRST_COLUMNS} FROM first_batches WHERE id = ?1"),
        &[id.into()],
        first_of,
    )
}

/// A user's FIRST batches (newest first), or every unfinished one (`None`, oldest first).
pub fn firsts(
    db: &mut Db,
    username: Option<&str>,
    status: Option<&str>,
) -> Result<Vec<FirstBatchRow>> {
    db.query(
        &format!(
            "SELECT {FIRST_COLUMNS} FROM first_batches WHERE (CAST(?1 AS TEXT) IS NULL OR username = ?1) \
             AND (CAST(?2 AS TEXT) IS NULL OR status = ?2) AND (CAST(?1 AS TEXT) IS NOT NULL OR status IN ('pending', 'running')) \
             ORDER BY created_at DESC, id DESC"
        ),
        &[username.into(), status.into()],
        first_of,
    )
}

pub fn set_first_tasks(db: &mut Db, id: &str, tasks: &[String]) -> Result<()> {
    db.execute(
        "UPDATE first_batches SET task_ids = ?2 WHERE id = ?1",
        &[id.into(), tasks.join(",").into()],
    )?;
    Ok(())
}

/// Ends a FIRST batch: `Ok(result)` completed, `Err(why)` failed.
pub fn end_first(
    db: &mut Db,
    id: &str,
    outcome: std::result::Result<String, String>,
    now: i64,
) -> Result<()> {
    match outcome {
        Ok(result) => db.execute(
            "UPDATE first_batches SET status = 'completed', completed_at = ?2, result = ?3 WHERE id = ?1",
            &[id.into(), now.into(), result.into()],
        ),
        Err(why) => db.execute(
            "UPDATE first_batches SET status = 'failed', failed_at = ?2, error = ?3 WHERE id = ?1",
            &[id.into(), now.into(), why.into()],
        ),
    }?;
    Ok(())
}

/// Takes or renews the lease `name` for `holder` for `ttl_ms` (on the database's clock): true
/// when `holder` has it, false while another holder's lease runs. PostgreSQL only: one SQLite
/// file is one process's, whose runner takes a file lock instead.
pub fn take_lease(db: &mut Db, name: &str, holder: &str, ttl_ms: i64) -> Result<bool> {
    let taken = db.execute(
        "INSERT INTO leases (name, holder, until_ms) \
         VALUES (?1, ?2, (extract(epoch from clock_timestamp()) * 1000)::bigint + ?3) \
         ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder, until_ms = EXCLUDED.until_ms \
         WHERE leases.holder = EXCLUDED.holder \
         OR leases.until_ms < (extract(epoch from clock_timestamp()) * 1000)::bigint",
        &[name.into(), holder.into(), ttl_ms.into()],
    )?;
    Ok(taken == 1)
}

/// Gives the lease up, so that another replica need not wait for it to lapse.
pub fn release_lease(db: &mut Db, name: &str, holder: &str) -> Result<()> {
    db.execute(
        "DELETE FROM leases WHERE name = ?1 AND holder = ?2",
        &[name.into(), holder.into()],
    )?;
    Ok(())
}
