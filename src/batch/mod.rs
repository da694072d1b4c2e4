//! The OpenAI Files and Batch APIs (`/v1/files`, `/v1/batches`), in OpenAI's shapes so the
//! SDKs' `client.files` and `client.batches` work unchanged.
//!
//! An uploaded input file is checked line by line, then kept under `batch.dir/files/`; its
//! metadata, and the batches', are in SQLite (`batch.dir/batches.db`). A batch's lines run
//! through this gateway itself (see [`runner`]): the same routing, access rules, token limits
//! and usage records as the user's own requests, on hot instances only and never in a slot an
//! interactive request is waiting for. Results are appended to work files as they come, so a
//! restart resumes a batch without repeating its finished lines. The proxy calls the methods
//! here off its async workers (they touch the disk and the database).

pub mod first;
pub mod input;
pub mod runner;
pub mod store;

pub use first::{FirstBatchWatcher, FirstRequest};
pub use runner::{BatchRunner, Places};
pub use store::Owner;

use crate::config::BatchConfig;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};
use store::Db;
use store::{BatchRow, FileRow};

/// The header a batch line carries (the process's own secret), and the batch it belongs to.
pub const LINE_HEADER: &str = "x-firstgate-batch";
pub const LINE_BATCH_HEADER: &str = "x-firstgate-batch-id";

/// What a client did wrong, or what failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchError {
    /// No such file or batch of this user (another user's is not revealed).
    NotFound(String),
    /// A request that must change; `param` names the field.
    Invalid {
        message: String,
        param: Option<&'static str>,
    },
    /// Too many unfinished batches for this user.
    Quota(usize),
    /// The state does not allow it (e.g. cancelling a finished batch).
    Conflict(String),
    /// The store or the disk failed (logged).
    Internal,
    /// A refusal with FIRST's own status and code (`batch_not_found`, `access_denied`,
    /// `batch_ongoing`, `batch_failed`, `quota_exceeded`, ...).
    Coded {
        status: u16,
        code: &'static str,
        message: String,
    },
}

fn invalid(message: impl Into<String>, param: Option<&'static str>) -> BatchError {
    BatchError::Invalid {
        message: message.into(),
        param,
    }
}

fn internal(e: impl std::fmt::Display) -> BatchError {
    log::error!("batch store: {e}");
    BatchError::Internal
}

/// The Files and Batch APIs' state (see the module comment).
pub struct Batches {
    pub settings: BatchConfig,
    conn: Mutex<Db>,
    /// Whether replicas share the state (PostgreSQL): then the runner holds a lease in it.
    shared: bool,
    /// This process, as the holder of the runner's lease.
    holder: String,
    /// Whether this process runs the batches now (holds the lock or the lease).
    runs_here: std::sync::atomic::AtomicBool,
    files_dir: PathBuf,
    work_dir: PathBuf,
    /// Authenticates this process's own batch lines (random per process, never logged).
    secret: String,
    /// Owners of the batches running now, for their lines' requests.
    running: Mutex<HashMap<String, Owner>>,
    /// Batches asked to stop.
    cancelled: Mutex<HashSet<String>>,
    /// Wakes the runner: a batch was created or cancelled.
    pub wake: tokio::sync::Notify,
    /// Wakes the watcher of FIRST batches: one was submitted.
    first_wake: tokio::sync::Notify,
}

/// This host's name, to tell replicas apart in the lease table.
fn gethostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "host".into())
}

/// Seconds since the epoch.
pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// A time-ordered id with a prefix (`file-...`, `batch_...`): newer ids sort after older ones.
fn new_id(prefix: &str) -> String {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let random = fastrand::u128(..).to_le_bytes();
    let random: &[u8; 10] = random[..10].try_into().expect("16 bytes have 10");
    let id = uuid::Builder::from_unix_timestamp_millis(ms, random).into_uuid();
    format!("{prefix}{}", id.simple())
}

impl Batches {
    /// Opens (creating) the directory, and the SQLite database in it unless the state is kept
    /// in `shared` (the PostgreSQL database replicas share).
    pub fn open(settings: BatchConfig, shared: Option<Db>) -> anyhow::Result<Batches> {
        let files_dir = settings.dir.join("files");
        let work_dir = settings.dir.join("work");
        for d in [&files_dir, &work_dir] {
            std::fs::create_dir_all(d)
                .map_err(|e| anyhow::anyhow!("batch.dir: cannot create {}: {e}", d.display()))?;
        }
        let conn = match shared {
            Some(db) => db,
            None => {
                let path = settings.dir.join("batches.db");
                store::open(&path)
                    .map_err(|e| anyhow::anyhow!("batch.dir: {}: {e}", path.display()))?
            }
        };
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
        Ok(Batches {
            settings,
            shared: conn.is_shared(),
            holder: format!(
                "{}-{}-{:08x}",
                gethostname(),
                std::process::id(),
                fastrand::u32(..)
            ),
            runs_here: std::sync::atomic::AtomicBool::new(false),
            conn: Mutex::new(conn),
            files_dir,
            work_dir,
            secret: hex::encode(secret),
            running: Mutex::new(HashMap::new()),
            cancelled: Mutex::new(HashSet::new()),
            wake: tokio::sync::Notify::new(),
            first_wake: tokio::sync::Notify::new(),
        })
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Db> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn file_path(&self, id: &str) -> PathBuf {
        self.files_dir.join(id)
    }

    // ---- files ----

    /// `POST /v1/files`: checks and keeps an input file.
    pub fn upload(
        &self,
        owner: &str,
        filename: &str,
        purpose: &str,
        content: &[u8],
        may_use: &dyn Fn(&str) -> bool,
    ) -> Result<Value, BatchError> {
        if purpose != "batch" {
            return Err(invalid(
                format!("purpose '{purpose}' is not offered here: upload batch input with purpose \"batch\""),
                Some("purpose"),
            ));
        }
        let lines = input::parse(content, self.settings.max_lines, may_use)
            .map_err(|e| invalid(format!("{filename}: {e}"), Some("file")))?;
        let row = FileRow {
            id: new_id("file-"),
            owner: owner.to_string(),
            filename: filename.to_string(),
            purpose: purpose.to_string(),
            bytes: content.len() as u64,
            lines: lines.len() as u64,
            created_at: now(),
        };
        std::fs::write(self.file_path(&row.id), content).map_err(internal)?;
        store::insert_file(&mut self.db(), &row).map_err(internal)?;
        Ok(self.file_json(&row))
    }

    fn file_json(&self, f: &FileRow) -> Value {
        json!({
            "id": f.id, "object": "file", "bytes": f.bytes, "created_at": f.created_at,
            "expires_at": f.created_at + self.settings.retention.as_secs() as i64,
            "filename": f.filename, "purpose": f.purpose, "status": "processed",
            "status_details": null,
        })
    }

    fn own_file(&self, owner: &str, id: &str) -> Result<FileRow, BatchError> {
        store::file(&mut self.db(), id)
            .map_err(internal)?
            .filter(|f| f.owner == owner)
            .ok_or_else(|| BatchError::NotFound(format!("No such File object: {id}")))
    }

    /// `GET /v1/files/{id}`
    pub fn file(&self, owner: &str, id: &str) -> Result<Value, BatchError> {
        Ok(self.file_json(&self.own_file(owner, id)?))
    }

    /// `GET /v1/files/{id}/content`: the name and the bytes.
    pub fn content(&self, owner: &str, id: &str) -> Result<(String, Vec<u8>), BatchError> {
        let f = self.own_file(owner, id)?;
        let bytes = std::fs::read(self.file_path(&f.id)).map_err(internal)?;
        Ok((f.filename, bytes))
    }

    /// `DELETE /v1/files/{id}` (not while a batch reads it).
    pub fn delete(&self, owner: &str, id: &str) -> Result<Value, BatchError> {
        let f = self.own_file(owner, id)?;
        let mut db = self.db();
        let in_use = store::unfinished(&mut db)
            .map_err(internal)?
            .iter()
            .any(|b| b.input_file_id == f.id);
        if in_use {
            return Err(BatchError::Conflict(format!(
                "{id} is the input of an unfinished batch; cancel the batch first"
            )));
        }
        store::delete_file(&mut db, id).map_err(internal)?;
        drop(db);
        let _ = std::fs::remove_file(self.file_path(id));
        Ok(json!({"id": id, "object": "file", "deleted": true}))
    }

    /// `GET /v1/files[?purpose=&after=&limit=&order=]`
    pub fn files(&self, owner: &str, query: &HashMap<String, String>) -> Result<Value, BatchError> {
        let limit = page_limit(query, 10_000)?;
        let rows = store::files(
            &mut self.db(),
            owner,
            query.get("purpose").map(String::as_str),
            query.get("after").map(String::as_str),
            limit + 1,
        )
        .map_err(internal)?;
        let data: Vec<Value> = rows.iter().take(limit).map(|f| self.file_json(f)).collect();
        Ok(page(data, rows.len() > limit))
    }

    // ---- batches ----

    /// `POST /v1/batches`
    pub fn create(&self, owner: Owner, body: &Value) -> Result<Value, BatchError> {
        let Value::Object(o) = body else {
            return Err(invalid("the body must be a JSON object", None));
        };
        let text = |k: &'static str| {
            o.get(k)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .ok_or_else(|| invalid(format!("'{k}' is required"), Some(k)))
        };
        let input_file_id = text("input_file_id")?;
        let endpoint = text("endpoint")?;
        if input::endpoint_of(endpoint).is_none() {
            return Err(invalid(
                format!("endpoint '{endpoint}' is not one of {}", input::urls()),
                Some("endpoint"),
            ));
        }
        let window = text("completion_window")?;
        if window != "24h" {
            return Err(invalid(
                "completion_window must be \"24h\"",
                Some("completion_window"),
            ));
        }
        let metadata = match o.get("metadata") {
            None | Some(Value::Null) => None,
            Some(m @ Value::Object(map)) if map.len() <= 16 => Some(m.clone()),
            Some(_) => {
                return Err(invalid(
                    "metadata must be an object of at most 16 keys",
                    Some("metadata"),
                ))
            }
        };
        let file = self.own_file(&owner.username, input_file_id).map_err(|_| {
            invalid(
                format!("No such File object: {input_file_id}"),
                Some("input_file_id"),
            )
        })?;
        if file.purpose != "batch" {
            return Err(invalid(
                format!("{input_file_id} was not uploaded with purpose \"batch\""),
                Some("input_file_id"),
            ));
        }
        let content = std::fs::read(self.file_path(&file.id)).map_err(internal)?;
        let lines = input::parse(&content, usize::MAX, &|_| true)
            .map_err(|e| invalid(e, Some("input_file_id")))?;
        if let Some((n, l)) = lines.iter().enumerate().find(|(_, l)| l.url != endpoint) {
            return Err(invalid(
                format!(
                    "line {} of {input_file_id} calls {} but the batch's endpoint is {endpoint}",
                    n + 1,
                    l.url
                ),
                Some("endpoint"),
            ));
        }
        let mut db = self.db();
        let active = store::active_count(&mut db, &owner.username).map_err(internal)?;
        if active >= self.settings.max_active_per_user {
            return Err(BatchError::Quota(self.settings.max_active_per_user));
        }
        let created = now();
        let row = BatchRow {
            id: new_id("batch_"),
            owner,
            endpoint: endpoint.to_string(),
            input_file_id: input_file_id.to_string(),
            completion_window: window.to_string(),
            status: "validating".into(),
            created_at: created,
            in_progress_at: None,
            finalizing_at: None,
            completed_at: None,
            failed_at: None,
            expired_at: None,
            cancelling_at: None,
            cancelled_at: None,
            expires_at: created + 86_400,
            output_file_id: None,
            error_file_id: None,
            total: lines.len() as u64,
            completed: 0,
            failed: 0,
            metadata,
            errors: None,
            compute_task: None,
        };
        store::insert_batch(&mut db, &row).map_err(internal)?;
        drop(db);
        self.wake.notify_one();
        Ok(batch_json(&row))
    }

    fn own_batch(&self, owner: &str, id: &str) -> Result<BatchRow, BatchError> {
        store::batch(&mut self.db(), id)
            .map_err(internal)?
            .filter(|b| b.owner.username == owner)
            .ok_or_else(|| BatchError::NotFound(format!("No such Batch object: {id}")))
    }

    /// `GET /v1/batches/{id}`
    pub fn batch(&self, owner: &str, id: &str) -> Result<Value, BatchError> {
        Ok(batch_json(&self.own_batch(owner, id)?))
    }

    /// `GET /v1/batches[?after=&limit=]`
    pub fn batches(
        &self,
        owner: &str,
        query: &HashMap<String, String>,
    ) -> Result<Value, BatchError> {
        let limit = page_limit(query, 100)?;
        let rows = store::batches(
            &mut self.db(),
            owner,
            query.get("after").map(String::as_str),
            limit + 1,
        )
        .map_err(internal)?;
        let data: Vec<Value> = rows.iter().take(limit).map(batch_json).collect();
        Ok(page(data, rows.len() > limit))
    }

    /// `POST /v1/batches/{id}/cancel`: no new lines start; what is done is finalized.
    pub fn cancel(&self, owner: &str, id: &str) -> Result<Value, BatchError> {
        let b = self.own_batch(owner, id)?;
        if !matches!(
            b.status.as_str(),
            "validating" | "in_progress" | "cancelling"
        ) {
            return Err(BatchError::Conflict(format!(
                "Cannot cancel a batch with status '{}'.",
                b.status
            )));
        }
        if b.status != "cancelling" {
            store::set_status(&mut self.db(), id, "cancelling", now()).map_err(internal)?;
        }
        self.mark_cancelled(id);
        self.batch(owner, id)
    }

    /// Stops a batch's lines (cancelled here, or through another replica).
    fn mark_cancelled(&self, id: &str) {
        let new = self
            .cancelled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_string());
        if new {
            // Everyone waiting on this batch looks again (the runner's loop also when busy).
            self.wake.notify_waiters();
            self.wake.notify_one();
        }
    }

    /// Whether replicas share the batch state (PostgreSQL).
    fn is_shared(&self) -> bool {
        self.shared
    }

    /// Whether the background work on batches is this process's: always with one process's
    /// store, only the lease holder's among replicas.
    fn works_here(&self) -> bool {
        !self.shared || self.runs_here.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The owner of a running batch, for a request that proves it is this process's own line.
    pub fn line_owner(&self, secret: &[u8], batch_id: &str) -> Option<Owner> {
        use subtle::ConstantTimeEq;
        if !bool::from(secret.ct_eq(self.secret.as_bytes())) {
            return None;
        }
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(batch_id)
            .cloned()
    }

    fn is_cancelled(&self, id: &str) -> bool {
        self.cancelled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(id)
    }

    /// Deletes files older than the retention (and their contents).
    pub fn sweep(&self) {
        let before = now() - self.settings.retention.as_secs() as i64;
        let old = match store::files_before(&mut self.db(), before) {
            Ok(ids) => ids,
            Err(e) => return log::error!("batch retention sweep: {e}"),
        };
        for id in old {
            if store::delete_file(&mut self.db(), &id).is_ok() {
                let _ = std::fs::remove_file(self.file_path(&id));
            }
        }
    }
}

/// The OpenAI batch object.
fn batch_json(b: &BatchRow) -> Value {
    json!({
        "id": b.id, "object": "batch", "endpoint": b.endpoint, "errors": b.errors,
        "input_file_id": b.input_file_id, "completion_window": b.completion_window,
        "status": b.status, "output_file_id": b.output_file_id, "error_file_id": b.error_file_id,
        "created_at": b.created_at, "in_progress_at": b.in_progress_at, "expires_at": b.expires_at,
        "finalizing_at": b.finalizing_at, "completed_at": b.completed_at, "failed_at": b.failed_at,
        "expired_at": b.expired_at, "cancelling_at": b.cancelling_at, "cancelled_at": b.cancelled_at,
        "request_counts": {"total": b.total, "completed": b.completed, "failed": b.failed},
        "metadata": b.metadata,
    })
}

/// `limit` of a list (1 to `max`, default 20).
fn page_limit(query: &HashMap<String, String>, max: usize) -> Result<usize, BatchError> {
    match query.get("limit") {
        None => Ok(20),
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=max).contains(n))
            .ok_or_else(|| invalid(format!("limit must be between 1 and {max}"), Some("limit"))),
    }
}

/// OpenAI's cursor page.
fn page(data: Vec<Value>, has_more: bool) -> Value {
    let first = data.first().map(|d| d["id"].clone());
    let last = data.last().map(|d| d["id"].clone());
    json!({"object": "list", "data": data, "first_id": first, "last_id": last, "has_more": has_more})
}
