//! Files and batches of the OpenAI Batch API in SQLite (`{batch.dir}/batches.db`, WAL): the
//! metadata only; contents are files under `{batch.dir}/files/`.

use rusqlite::{params, Connection, OptionalExtension, Row};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The schema, one step per version (`PRAGMA user_version`); steps only add.
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

pub fn open(path: &Path) -> rusqlite::Result<Connection> {
    let mut conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(2))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    crate::usage::sink::migrate(&mut conn, MIGRATIONS)?;
    Ok(conn)
}

pub fn insert_file(conn: &Connection, f: &FileRow) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO files (id, owner, filename, purpose, bytes, lines, created_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            f.id,
            f.owner,
            f.filename,
            f.purpose,
            f.bytes as i64,
            f.lines as i64,
            f.created_at
        ],
    )?;
    Ok(())
}

fn file_of(r: &Row) -> rusqlite::Result<FileRow> {
    Ok(FileRow {
        id: r.get(0)?,
        owner: r.get(1)?,
        filename: r.get(2)?,
        purpose: r.get(3)?,
        bytes: r.get::<_, i64>(4)? as u64,
        lines: r.get::<_, i64>(5)? as u64,
        created_at: r.get(6)?,
    })
}

const FILE_COLUMNS: &str = "id, owner, filename, purpose, bytes, lines, created_at";

pub fn file(conn: &Connection, id: &str) -> rusqlite::Result<Option<FileRow>> {
    conn.query_row(
        &format!("SELECT {FILE_COLUMNS} FROM files WHERE id = ?1"),
        [id],
        file_of,
    )
    .optional()
}

/// A user's files, newest first, after the cursor `after` (an id), at most `limit`.
pub fn files(
    conn: &Connection,
    owner: &str,
    purpose: Option<&str>,
    after: Option<&str>,
    limit: usize,
) -> rusqlite::Result<Vec<FileRow>> {
    let mut stmt = conn.prepare(&format!(
        "SELECT {FILE_COLUMNS} FROM files WHERE owner = ?1 AND (?2 IS NULL OR purpose = ?2) \
         AND (?3 IS NULL OR id < ?3) ORDER BY id DESC LIMIT ?4"
    ))?;
    let rows = stmt.query_map(params![owner, purpose, after, limit as i64], file_of)?;
    rows.collect()
}

pub fn delete_file(conn: &Connection, id: &str) -> rusqlite::Result<()> {
    conn.execute("DELETE FROM files WHERE id = ?1", [id])?;
    Ok(())
}

/// Files created before `before` (Unix seconds), for the retention sweep.
pub fn files_before(conn: &Connection, before: i64) -> rusqlite::Result<Vec<String>> {
    let mut stmt = conn.prepare("SELECT id FROM files WHERE created_at < ?1")?;
    let rows = stmt.query_map([before], |r| r.get(0))?;
    rows.collect()
}

const BATCH_COLUMNS: &str = "id, identity, endpoint, input_file_id, completion_window, status, \
    created_at, in_progress_at, finalizing_at, completed_at, failed_at, expired_at, cancelling_at, \
    cancelled_at, expires_at, output_file_id, error_file_id, total, completed, failed, metadata, errors, compute_task";

fn batch_of(r: &Row) -> rusqlite::Result<BatchRow> {
    let json = |i: usize| -> rusqlite::Result<Option<serde_json::Value>> {
        Ok(r.get::<_, Option<String>>(i)?
            .and_then(|s| serde_json::from_str(&s).ok()))
    };
    let identity: String = r.get(1)?;
    let owner = serde_json::from_str(&identity).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(1, rusqlite::types::Type::Text, Box::new(e))
    })?;
    Ok(BatchRow {
        id: r.get(0)?,
        owner,
        endpoint: r.get(2)?,
        input_file_id: r.get(3)?,
        completion_window: r.get(4)?,
        status: r.get(5)?,
        created_at: r.get(6)?,
        in_progress_at: r.get(7)?,
        finalizing_at: r.get(8)?,
        completed_at: r.get(9)?,
        failed_at: r.get(10)?,
        expired_at: r.get(11)?,
        cancelling_at: r.get(12)?,
        cancelled_at: r.get(13)?,
        expires_at: r.get(14)?,
        output_file_id: r.get(15)?,
        error_file_id: r.get(16)?,
        total: r.get::<_, i64>(17)? as u64,
        completed: r.get::<_, i64>(18)? as u64,
        failed: r.get::<_, i64>(19)? as u64,
        metadata: json(20)?,
        errors: json(21)?,
        compute_task: r.get(22)?,
    })
}

pub fn insert_batch(conn: &Connection, b: &BatchRow) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO batches (id, owner, identity, endpoint, input_file_id, completion_window, \
         status, created_at, expires_at, total, metadata) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        params![
            b.id,
            b.owner.username,
            serde_json::to_string(&b.owner).unwrap_or_default(),
            b.endpoint,
            b.input_file_id,
            b.completion_window,
            b.status,
            b.created_at,
            b.expires_at,
            b.total as i64,
            b.metadata.as_ref().map(|m| m.to_string()),
        ],
    )?;
    Ok(())
}

pub fn batch(conn: &Connection, id: &str) -> rusqlite::Result<Option<BatchRow>> {
    conn.query_row(
        &format!("SELECT {BATCH_COLUMNS} FROM batches WHERE id = ?1"),
        [id],
        batch_of,
    )
    .optional()
}

/// A user's batches, newest first, after the cursor `after`, at most `limit`.
pub fn batches(
    conn: &Connection,
    owner: &str,
    after: Option<&str>,
    limit: usize,
) -> rusqlite::Result<Vec<BatchRow>> {
    let mut stmt = conn.prepare(&format!(
        "SELECT {BATCH_COLUMNS} FROM batches WHERE owner = ?1 AND (?2 IS NULL OR id < ?2) \
         ORDER BY id DESC LIMIT ?3"
    ))?;
    let rows = stmt.query_map(params![owner, after, limit as i64], batch_of)?;
    rows.collect()
}

/// Batches not over yet (every user's), oldest first.
pub fn unfinished(conn: &Connection) -> rusqlite::Result<Vec<BatchRow>> {
    let mut stmt = conn.prepare(&format!(
        "SELECT {BATCH_COLUMNS} FROM batches WHERE status IN ('validating', 'in_progress', \
         'finalizing', 'cancelling') ORDER BY id"
    ))?;
    let rows = stmt.query_map([], batch_of)?;
    rows.collect()
}

/// How many of `owner`'s batches are not over.
pub fn active_count(conn: &Connection, owner: &str) -> rusqlite::Result<usize> {
    conn.query_row(
        "SELECT COUNT(*) FROM batches WHERE owner = ?1 AND status IN ('validating', \
         'in_progress', 'finalizing', 'cancelling')",
        [owner],
        |r| r.get::<_, i64>(0),
    )
    .map(|n| n as usize)
}

/// Moves a batch to `status`, stamping `{status}_at` (where there is one) with `now`.
pub fn set_status(conn: &Connection, id: &str, status: &str, now: i64) -> rusqlite::Result<()> {
    let stamp = match status {
        "in_progress" => "in_progress_at",
        "finalizing" => "finalizing_at",
        "completed" => "completed_at",
        "failed" => "failed_at",
        "expired" => "expired_at",
        "cancelling" => "cancelling_at",
        "cancelled" => "cancelled_at",
        _ => {
            conn.execute(
                "UPDATE batches SET status = ?2 WHERE id = ?1",
                params![id, status],
            )?;
            return Ok(());
        }
    };
    conn.execute(
        &format!("UPDATE batches SET status = ?2, {stamp} = ?3 WHERE id = ?1"),
        params![id, status, now],
    )?;
    Ok(())
}

pub fn set_counts(
    conn: &Connection,
    id: &str,
    completed: u64,
    failed: u64,
) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE batches SET completed = ?2, failed = ?3 WHERE id = ?1",
        params![id, completed as i64, failed as i64],
    )?;
    Ok(())
}

pub fn set_results(
    conn: &Connection,
    id: &str,
    output_file_id: Option<&str>,
    error_file_id: Option<&str>,
) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE batches SET output_file_id = ?2, error_file_id = ?3 WHERE id = ?1",
        params![id, output_file_id, error_file_id],
    )?;
    Ok(())
}

pub fn set_compute_task(conn: &Connection, id: &str, task: &str) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE batches SET compute_task = ?2 WHERE id = ?1",
        params![id, task],
    )?;
    Ok(())
}

pub fn set_errors(conn: &Connection, id: &str, errors: &serde_json::Value) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE batches SET errors = ?2 WHERE id = ?1",
        params![id, errors.to_string()],
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

fn first_of(r: &Row) -> rusqlite::Result<FirstBatchRow> {
    let tasks: String = r.get(7)?;
    Ok(FirstBatchRow {
        id: r.get(0)?,
        username: r.get(1)?,
        cluster: r.get(2)?,
        framework: r.get(3)?,
        model: r.get(4)?,
        input_file: r.get(5)?,
        output_folder_path: r.get(6)?,
        task_ids: tasks
            .split(',')
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
            .collect(),
        status: r.get(8)?,
        created_at: r.get(9)?,
        completed_at: r.get(10)?,
        failed_at: r.get(11)?,
        result: r.get(12)?,
        error: r.get(13)?,
    })
}

pub fn insert_first(conn: &Connection, b: &FirstBatchRow) -> rusqlite::Result<()> {
    conn.execute(
        &format!("INSERT INTO first_batches ({FIRST_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)"),
        params![
            b.id,
            b.username,
            b.cluster,
            b.framework,
            b.model,
            b.input_file,
            b.output_folder_path,
            b.task_ids.join(","),
            b.status,
            b.created_at,
            b.completed_at,
            b.failed_at,
            b.result,
            b.error
        ],
    )?;
    Ok(())
}

pub fn first(conn: &Connection, id: &str) -> rusqlite::Result<Option<FirstBatchRow>> {
    conn.query_row(
        &format!("SELECT {FIRST_COLUMNS} FROM first_batches WHERE id = ?1"),
        [id],
        first_of,
    )
    .optional()
}

/// A user's FIRST batches (newest first), or every unfinished one (`None`, oldest first).
pub fn firsts(
    conn: &Connection,
    username: Option<&str>,
    status: Option<&str>,
) -> rusqlite::Result<Vec<FirstBatchRow>> {
    let mut stmt = conn.prepare(&format!(
        "SELECT {FIRST_COLUMNS} FROM first_batches WHERE (?1 IS NULL OR username = ?1) \
         AND (?2 IS NULL OR status = ?2) AND (?1 IS NOT NULL OR status IN ('pending', 'running')) \
         ORDER BY created_at DESC, id DESC"
    ))?;
    let rows = stmt.query_map(params![username, status], first_of)?;
    rows.collect()
}

pub fn set_first_tasks(conn: &Connection, id: &str, tasks: &[String]) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE first_batches SET task_ids = ?2 WHERE id = ?1",
        params![id, tasks.join(",")],
    )?;
    Ok(())
}

/// Ends a FIRST batch: `Ok(result)` completed, `Err(why)` failed.
pub fn end_first(
    conn: &Connection,
    id: &str,
    outcome: Result<String, String>,
    now: i64,
) -> rusqlite::Result<()> {
    match outcome {
        Ok(result) => conn.execute(
            "UPDATE first_batches SET status = 'completed', completed_at = ?2, result = ?3 WHERE id = ?1",
            params![id, now, result],
        ),
        Err(why) => conn.execute(
            "UPDATE first_batches SET status = 'failed', failed_at = ?2, error = ?3 WHERE id = ?1",
            params![id, now, why],
        ),
    }?;
    Ok(())
}
