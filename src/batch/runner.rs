//! Runs batches: each line is sent to this gateway's own listener with the process's secret
//! (so it takes the same trip as the owner's requests, at background priority), and its
//! answer appended to the batch's output or error work file at once. A restart reads those
//! files back and sends only the lines not answered yet. When no line is left (or the batch
//! is cancelled or expires) the work files become the batch's output and error files.

use super::input::{self, Line};
use super::store::{self, BatchRow, FileRow};
use super::{new_id, now, Batches, LINE_BATCH_HEADER, LINE_HEADER};
use crate::catalog::SharedCatalog;
use crate::compute::ComputeClient;
use crate::metrics::Metrics;
use crate::policy::PolicyStore;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Semaphore;

/// How often unfinished batches are looked for without a wake-up (expiry, restarts).
const TICK: Duration = Duration::from_secs(2);
/// Longest wait before a line refused for capacity is tried again.
const MOST_RETRY: Duration = Duration::from_secs(30);

/// The background service that runs batches.
pub struct BatchRunner(Arc<Runner>);

struct Runner {
    batches: Arc<Batches>,
    /// Where a policy may send a batch instead (`batch(job)` of the route script).
    places: Places,
    client: reqwest::Client,
    /// This gateway's own API listener (`http://127.0.0.1:8080`).
    base: String,
    metrics: Arc<Metrics>,
    /// Each user's lines in flight, over all their batches.
    per_user: Mutex<HashMap<String, Arc<Semaphore>>>,
}

/// What deciding where a batch runs needs: the route policy, the catalog, Globus Compute.
pub struct Places {
    pub policies: Arc<PolicyStore>,
    pub catalog: SharedCatalog,
    pub compute: Option<Arc<ComputeClient>>,
}

/// Where a batch runs.
enum Place {
    /// Its lines through this gateway.
    Gateway,
    /// The model's batch function: `(endpoint, function, the backend's model name)`.
    Compute(String, String, String),
}

impl BatchRunner {
    pub fn new(
        batches: Arc<Batches>,
        places: Places,
        listen: std::net::SocketAddr,
        metrics: Arc<Metrics>,
    ) -> Self {
        let mut own = listen;
        if own.ip().is_unspecified() {
            own.set_ip(match own {
                std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        BatchRunner(Arc::new(Runner {
            batches,
            places,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(3600))
                .build()
                .unwrap_or_default(),
            base: format!("http://{own}"),
            metrics,
            per_user: Mutex::new(HashMap::new()),
        }))
    }
}

/// The lease of the replica that runs batches (with a shared database).
const LEASE: &str = "batch_runner";

/// What lets this process run batches: the batch directory's file lock (one process), or the
/// lease in the shared database (replicas), renewed while it runs.
enum RunnerRight {
    File(#[allow(dead_code)] std::fs::File),
    Lease {
        /// When it was last renewed.
        renewed: std::time::Instant,
    },
}

impl Runner {
    /// Waits for the right to run batches; `None` at shutdown or hand-over.
    async fn acquire(&self, stop: &mut Stop) -> Option<RunnerRight> {
        let path = self.batches.settings.dir.join("runner.lock");
        loop {
            let right = if self.batches.is_shared() {
                match self.lease(true).await {
                    Ok(true) => Some(RunnerRight::Lease {
                        renewed: std::time::Instant::now(),
                    }),
                    Ok(false) => None,
                    Err(e) => {
                        log::warn!("batch runner: cannot take the lease: {e}");
                        None
                    }
                }
            } else {
                match lock(&path) {
                    Ok(file) => file.map(RunnerRight::File),
                    Err(e) => {
                        log::error!("batch runner: {}: {e}", path.display());
                        return None;
                    }
                }
            };
            if let Some(RunnerRight::Lease { .. }) = &right {
                log::info!(
                    "batch runner: this replica ({}) holds the lease and runs the batches",
                    self.batches.holder
                );
            }
            if right.is_some() {
                return right;
            }
            if stop.wait(Duration::from_millis(200)).await {
                return None;
            }
        }
    }

    /// Takes or renews (`true`) the lease, or gives it up (`false`).
    async fn lease(&self, take: bool) -> Result<bool, String> {
        let batches = self.batches.clone();
        let ttl = self.batches.settings.lease.as_millis() as i64;
        tokio::task::spawn_blocking(move || {
            let mut db = batches.db();
            if take {
                store::take_lease(&mut db, LEASE, &batches.holder, ttl)
            } else {
                store::release_lease(&mut db, LEASE, &batches.holder).map(|()| false)
            }
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
    }

    /// Whether this process may go on running batches: a lease is renewed (every third of
    /// its time), and counts as lost when another replica has it, or when two thirds of its
    /// time passed without a renewal (so this runner stops before another may start).
    async fn still_holds(&self, right: &mut RunnerRight) -> bool {
        let RunnerRight::Lease { renewed } = right else {
            return true;
        };
        let ttl = self.batches.settings.lease;
        if renewed.elapsed() < ttl / 3 {
            return true;
        }
        match self.lease(true).await {
            Ok(true) => {
                *renewed = std::time::Instant::now();
                true
            }
            Ok(false) => {
                log::warn!("batch runner: another replica holds the lease now; stopping here");
                false
            }
            Err(e) if renewed.elapsed() < ttl * 2 / 3 => {
                log::warn!("batch runner: cannot renew the lease ({e}); retrying");
                true
            }
            Err(e) => {
                log::error!(
                    "batch runner: cannot renew the lease ({e}); stopping here before it lapses"
                );
                false
            }
        }
    }
}

/// Shutdown, or a hand-over to a new process (SIGQUIT), which stops the runner at once.
struct Stop {
    shutdown: ShutdownWatch,
    quit: Option<tokio::signal::unix::Signal>,
}

impl Stop {
    /// Waits `d`; true when told to stop meanwhile.
    async fn wait(&mut self, d: Duration) -> bool {
        tokio::select! {
            _ = self.shutdown.changed() => true,
            Some(()) = async { self.quit.as_mut()?.recv().await } => true,
            _ = tokio::time::sleep(d) => false,
        }
    }
}

#[async_trait]
impl BackgroundService for BatchRunner {
    async fn start(&self, shutdown: ShutdownWatch) {
        let runner = &self.0;
        let mut stop = Stop {
            shutdown,
            quit: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::quit()).ok(),
        };
        // One runner per batch directory (or shared database): another process waits until
        // this one lets go.
        while let Some(mut right) = runner.acquire(&mut stop).await {
            runner.batches.runs_here.store(true, Ordering::Relaxed);
            let stopped = runner.run_while_held(&mut right, &mut stop).await;
            runner.batches.runs_here.store(false, Ordering::Relaxed);
            if let RunnerRight::Lease { .. } = right {
                if stopped {
                    let _ = runner.lease(false).await;
                }
            }
            if stopped {
                return;
            }
        }
    }
}

impl Runner {
    /// Runs batches until told to stop (true) or the right to is lost (false). Dropping the
    /// set of tasks aborts every batch's task, and with it their lines' tasks: an unanswered
    /// line is sent again by the next runner.
    async fn run_while_held(self: &Arc<Self>, right: &mut RunnerRight, stop: &mut Stop) -> bool {
        let mut tasks = tokio::task::JoinSet::new();
        let mut running: HashSet<String> = HashSet::new();
        let mut swept = std::time::Instant::now() - Duration::from_secs(3600);
        let tick = TICK.min(self.batches.settings.lease / 3);
        loop {
            if !self.still_holds(right).await {
                return false;
            }
            while let Some(done) = tasks.try_join_next() {
                if let Ok(id) = done {
                    running.remove(&id);
                }
            }
            let batches = self.batches.clone();
            let rows = tokio::task::spawn_blocking(move || store::unfinished(&mut batches.db()))
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default();
            self.count(&rows);
            for row in rows {
                // Cancelled through another replica: its lines stop here.
                if row.status == "cancelling" {
                    self.batches.mark_cancelled(&row.id);
                }
                if running.insert(row.id.clone()) {
                    let runner = self.clone();
                    tasks.spawn(async move {
                        let id = row.id.clone();
                        runner.run(row).await;
                        id
                    });
                }
            }
            if swept.elapsed() > Duration::from_secs(3600) {
                swept = std::time::Instant::now();
                let batches = self.batches.clone();
                let _ = tokio::task::spawn_blocking(move || batches.sweep()).await;
            }
            tokio::select! {
                stopped = stop.wait(tick) => if stopped { return true },
                _ = self.batches.wake.notified() => {}
                Some(Ok(id)) = tasks.join_next() => { running.remove(&id); }
            }
        }
    }
}

/// Takes the batch directory's runner lock, or `None` while another process holds it.
fn lock(path: &Path) -> std::io::Result<Option<std::fs::File>> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

/// A batch ready to run: its lines, its work files, the ids already answered.
type Prepared = (Vec<Line>, Arc<Work>, HashSet<String>);

/// A line's outcome.
enum Answer {
    /// A 2xx answer: into the output file.
    Completed(Value),
    /// Another answer: into the error file.
    Failed(Value),
}

/// A running batch's work files and counts.
struct Work {
    output: Mutex<std::fs::File>,
    errors: Mutex<std::fs::File>,
    completed: AtomicU64,
    failed: AtomicU64,
}

impl Work {
    fn counts(&self) -> (u64, u64) {
        (
            self.completed.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

impl Runner {
    fn count(&self, rows: &[BatchRow]) {
        for status in store::UNFINISHED {
            let n = rows.iter().filter(|r| r.status == status).count();
            self.metrics
                .batches
                .with_label_values(&[status])
                .set(n as i64);
        }
    }

    fn work_path(&self, id: &str, kind: &str) -> PathBuf {
        self.batches.work_dir.join(format!("{id}.{kind}.jsonl"))
    }

    async fn run(self: Arc<Self>, row: BatchRow) {
        let id = row.id.clone();
        let outcome = match (row.status.as_str(), &row.compute_task) {
            ("validating" | "in_progress", Some(task)) => {
                let task = task.clone();
                self.wait_compute(&row, &task).await
            }
            ("validating", None) => match self.place(&row).await {
                Place::Compute(endpoint, function, model) => {
                    self.clone()
                        .run_on_compute(row, endpoint, function, model)
                        .await
                }
                Place::Gateway => self.clone().run_lines(row).await,
            },
            ("in_progress", None) => self.clone().run_lines(row).await,
            ("cancelling", _) => Ok("cancelled"),
            ("finalizing", _) => Ok("completed"),
            _ => return,
        };
        let result = match outcome {
            Ok(end) => self.finalize(&id, end).await,
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            log::error!("batch {id}: {e}");
            let batches = self.batches.clone();
            let id2 = id.clone();
            let _ = tokio::task::spawn_blocking(move || {
                let mut db = batches.db();
                let _ = store::set_errors(
                    &mut db,
                    &id2,
                    &json!({"object": "list", "data": [{"code": "batch_failed", "message": e, "param": null, "line": null}]}),
                );
                store::set_status(&mut db, &id2, "failed", now())
            })
            .await;
        }
        self.batches
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        self.batches
            .cancelled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }

    /// Sends the lines not answered yet; returns how the batch ends.
    async fn run_lines(self: Arc<Self>, row: BatchRow) -> Result<&'static str, String> {
        let id = row.id.clone();
        let input_path = self.batches.file_path(&row.input_file_id);
        let (out_path, err_path) = (self.work_path(&id, "output"), self.work_path(&id, "errors"));
        let prepared = tokio::task::spawn_blocking({
            let batches = self.batches.clone();
            let id = id.clone();
            move || -> Result<Prepared, String> {
                let content = std::fs::read(&input_path)
                    .map_err(|e| format!("the input file is gone ({e})"))?;
                let lines = input::parse(&content, usize::MAX, &|_| true)?;
                let (work, done) = open_work(&out_path, &err_path)?;
                let mut db = batches.db();
                store::set_status(&mut db, &id, "in_progress", now()).map_err(|e| e.to_string())?;
                let (c, f) = work.counts();
                store::set_counts(&mut db, &id, c, f).map_err(|e| e.to_string())?;
                Ok((lines, work, done))
            }
        })
        .await
        .map_err(|e| e.to_string())??;
        let (lines, work, done) = prepared;
        if !done.is_empty() {
            log::info!(
                "batch {id}: resumed, {} lines were answered before",
                done.len()
            );
        }
        self.batches
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone(), row.owner.clone());
        let user_slots = self.user_slots(&row.owner.username);
        let todo: Vec<Line> = lines
            .into_iter()
            .filter(|l| !done.contains(&l.custom_id))
            .collect();
        self.metrics.batch_lines_waiting.add(todo.len() as i64);
        let mut left = todo.len() as i64;
        let mut tasks = tokio::task::JoinSet::new();
        let mut end = "completed";
        for line in todo {
            if self.batches.is_cancelled(&id) {
                end = "cancelled";
                break;
            }
            if now() >= row.expires_at {
                end = "expired";
                break;
            }
            let Ok(permit) = user_slots.clone().acquire_owned().await else {
                break;
            };
            let (runner, work, id, expires) =
                (self.clone(), work.clone(), id.clone(), row.expires_at);
            tasks.spawn(async move {
                let _permit = permit;
                let answer = runner.send(&id, &line, expires).await;
                runner.metrics.batch_lines_waiting.dec();
                if let Some(answer) = answer {
                    runner.record(&id, &work, answer).await;
                }
            });
            left -= 1;
        }
        self.metrics.batch_lines_waiting.sub(left);
        while tasks.join_next().await.is_some() {}
        if self.batches.is_cancelled(&id) {
            end = "cancelled";
        } else if end == "completed" && now() >= row.expires_at {
            end = "expired";
        }
        let to = if end == "cancelled" {
            "cancelling"
        } else {
            "finalizing"
        };
        let batches = self.batches.clone();
        let (c, f) = work.counts();
        tokio::task::spawn_blocking(move || {
            let mut db = batches.db();
            store::set_counts(&mut db, &id, c, f)?;
            store::set_status(&mut db, &id, to, now())
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        Ok(end)
    }

    /// Asks the route policy's `batch(job)` where a new batch runs (the gateway without one).
    async fn place(&self, row: &BatchRow) -> Place {
        let Some(script) = self.places.policies.current().route.clone() else {
            return Place::Gateway;
        };
        let input = self.batches.file_path(&row.input_file_id);
        let lines = tokio::task::spawn_blocking(move || {
            input::parse(&std::fs::read(input).ok()?, usize::MAX, &|_| true).ok()
        })
        .await
        .ok()
        .flatten()
        .unwrap_or_default();
        let mut models: Vec<String> = lines
            .iter()
            .filter_map(|l| l.body["model"].as_str().map(str::to_owned))
            .collect();
        models.sort();
        models.dedup();
        let catalog = self.places.catalog.load_full();
        let identity = row.owner.identity();
        // The one model's batch function the owner may use, if every line asks for one model.
        let target = match models.as_slice() {
            [model] => catalog.resolve_federated(model).ok().and_then(|ds| {
                ds.iter().find_map(|d| {
                    let c = d.compute.as_ref()?;
                    let visible = d.visible_to(&identity);
                    visible.then(|| {
                        Some((
                            c.batch_endpoint.clone()?,
                            c.batch_function.clone()?,
                            d.backend_model.clone(),
                        ))
                    })?
                })
            }),
            _ => None,
        };
        let mut job = rhai::Map::new();
        job.insert("id".into(), row.id.clone().into());
        job.insert("endpoint".into(), row.endpoint.clone().into());
        job.insert("lines".into(), (row.total as i64).into());
        job.insert("username".into(), row.owner.username.clone().into());
        let groups: rhai::Array = row.owner.groups.iter().map(|g| g.clone().into()).collect();
        job.insert("groups".into(), groups.into());
        job.insert(
            "model".into(),
            models
                .first()
                .filter(|_| models.len() == 1)
                .cloned()
                .unwrap_or_default()
                .into(),
        );
        job.insert("batch_function".into(), target.is_some().into());
        match script.batch(job) {
            Some(Ok(place)) if place == "compute" => {
                let ready =
                    self.places.compute.is_some() && self.batches.settings.staging_dir.is_some();
                match target {
                    Some((endpoint, function, model)) if ready => {
                        Place::Compute(endpoint, function, model)
                    }
                    _ => {
                        log::warn!(
                            "batch {}: the policy chose compute, but {}; it runs in the gateway",
                            row.id,
                            if ready {
                                "its lines need one model with a batch function"
                            } else {
                                "batch.staging_dir or compute: is not configured"
                            }
                        );
                        Place::Gateway
                    }
                }
            }
            Some(Err(e)) => {
                log::error!("batch {}: {e}; it runs in the gateway", row.id);
                Place::Gateway
            }
            _ => Place::Gateway,
        }
    }

    /// Stages the input where compute nodes read it and submits the model's batch function.
    async fn run_on_compute(
        self: Arc<Self>,
        row: BatchRow,
        endpoint: String,
        function: String,
        model: String,
    ) -> Result<&'static str, String> {
        let (Some(client), Some(staging)) =
            (&self.places.compute, &self.batches.settings.staging_dir)
        else {
            return Err("no Globus Compute or staging directory".into());
        };
        let dir = staging.join(&row.id);
        let input = dir.join("input.jsonl");
        let results = dir.join("results");
        let from = self.batches.file_path(&row.input_file_id);
        let staged = (input.clone(), results.clone());
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            std::fs::create_dir_all(&staged.1)?;
            std::fs::copy(from, &staged.0).map(|_| ())
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("cannot stage the input in {}: {e}", dir.display()))?;
        let arg = json!({
            "model_params": {"input_file": input.display().to_string(), "model": model,
                             "output_folder_path": results.display().to_string()},
            "batch_id": row.id, "username": row.owner.username,
        });
        let task = client
            .submit(&endpoint, &function, &[arg])
            .await
            .map_err(|e| format!("the batch function could not be submitted: {e}"))?;
        let (batches, id, t) = (self.batches.clone(), row.id.clone(), task.clone());
        tokio::task::spawn_blocking(move || {
            let mut db = batches.db();
            store::set_compute_task(&mut db, &id, &t)?;
            store::set_status(&mut db, &id, "in_progress", now())
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        self.wait_compute(&row, &task).await
    }

    /// Waits for a batch function's task and turns its results file into the batch's output
    /// and error lines. A cancel stops waiting (the task itself runs on: FIRST cannot cancel).
    async fn wait_compute(&self, row: &BatchRow, task: &str) -> Result<&'static str, String> {
        let client = self
            .places
            .compute
            .as_ref()
            .ok_or("no Globus Compute configured")?;
        let left = Duration::from_secs((row.expires_at - now()).max(1) as u64);
        let id = row.id.clone();
        let waited = client.wait(task, left);
        tokio::pin!(waited);
        let outcome = loop {
            tokio::select! {
                r = &mut waited => break r,
                _ = self.batches.wake.notified() => {
                    if self.batches.is_cancelled(&id) {
                        return Ok("cancelled");
                    }
                }
            }
        };
        let summary = match outcome {
            Ok(Value::String(s)) => serde_json::from_str::<Value>(&s).unwrap_or(Value::String(s)),
            Ok(v) => v,
            Err(crate::compute::ComputeError::TimedOut(_)) => return Ok("expired"),
            Err(e) => return Err(format!("the batch function failed: {e}")),
        };
        let file = summary["results_file"]
            .as_str()
            .ok_or_else(|| format!("the batch function's result names no results_file: {summary}"))?
            .to_string();
        let text = tokio::fs::read_to_string(&file)
            .await
            .map_err(|e| format!("cannot read the results {file}: {e}"))?;
        let (out, err) = (self.work_path(&id, "output"), self.work_path(&id, "errors"));
        let (work, _) = tokio::task::spawn_blocking(move || open_work(&out, &err))
            .await
            .map_err(|e| e.to_string())??;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let v: Value = serde_json::from_str(line).map_err(|e| format!("{file}: {e}"))?;
            let answer = if v["response"]["status_code"] == 200 {
                Answer::Completed(v)
            } else {
                Answer::Failed(v)
            };
            self.record(&id, &work, answer).await;
        }
        let batches = self.batches.clone();
        tokio::task::spawn_blocking(move || {
            store::set_status(&mut batches.db(), &id, "finalizing", now())
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        Ok("completed")
    }

    fn user_slots(&self, user: &str) -> Arc<Semaphore> {
        let n = self.batches.settings.lines_in_flight_per_user.max(1);
        self.per_user
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(user.to_string())
            .or_insert_with(|| Arc::new(Semaphore::new(n)))
            .clone()
    }

    /// Sends one line until it gets an answer; `None` when the batch was cancelled or expired
    /// while the line waited for capacity.
    async fn send(&self, batch_id: &str, line: &Line, expires_at: i64) -> Option<Answer> {
        let mut wait = Duration::from_millis(250);
        loop {
            if self.batches.is_cancelled(batch_id) || now() >= expires_at {
                return None;
            }
            let sent = self
                .client
                .post(format!("{}{}", self.base, line.url))
                .header(LINE_HEADER, &self.batches.secret)
                .header(LINE_BATCH_HEADER, batch_id)
                .json(&line.body)
                .send()
                .await;
            let retry_in = match sent {
                Ok(resp) if matches!(resp.status().as_u16(), 429 | 503) => resp
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok())
                    .map(Duration::from_secs)
                    .unwrap_or(wait),
                Ok(resp) => return Some(answer_of(line, resp).await),
                // The gateway is restarting or draining: try again.
                Err(_) => wait,
            };
            tokio::select! {
                _ = tokio::time::sleep(retry_in.min(MOST_RETRY)) => {}
                _ = self.batches.wake.notified() => {}
            }
            wait = (wait * 2).min(MOST_RETRY);
        }
    }

    async fn record(&self, id: &str, work: &Arc<Work>, answer: Answer) {
        let (file, line, counter, label) = match &answer {
            Answer::Completed(v) => (&work.output, v, &work.completed, "completed"),
            Answer::Failed(v) => (&work.errors, v, &work.failed, "failed"),
        };
        let mut text = line.to_string();
        text.push('\n');
        let written = file
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write_all(text.as_bytes());
        if let Err(e) = written {
            log::error!("batch {id}: cannot write a result: {e}");
            return;
        }
        counter.fetch_add(1, Ordering::Relaxed);
        self.metrics.batch_lines.with_label_values(&[label]).inc();
        let (batches, id) = (self.batches.clone(), id.to_string());
        let (c, f) = work.counts();
        let _ =
            tokio::task::spawn_blocking(move || store::set_counts(&mut batches.db(), &id, c, f))
                .await;
    }

    /// Turns the work files into the batch's output and error files and ends it as `end`.
    async fn finalize(&self, id: &str, end: &'static str) -> Result<(), String> {
        let batches = self.batches.clone();
        let (id, out, err) = (
            id.to_string(),
            self.work_path(id, "output"),
            self.work_path(id, "errors"),
        );
        tokio::task::spawn_blocking(move || -> Result<(), String> {
            let row = store::batch(&mut batches.db(), &id)
                .map_err(|e| e.to_string())?
                .ok_or("the batch is gone")?;
            let keep = |path: &Path, kind: &str| -> Result<Option<String>, String> {
                let (_, lines) = answered(path)?;
                if lines == 0 {
                    let _ = std::fs::remove_file(path);
                    return Ok(None);
                }
                let bytes = std::fs::metadata(path).map_err(|e| e.to_string())?.len();
                let file = FileRow {
                    id: new_id("file-"),
                    owner: row.owner.username.clone(),
                    filename: format!("{id}_{kind}.jsonl"),
                    purpose: "batch_output".into(),
                    bytes,
                    lines,
                    created_at: now(),
                };
                std::fs::rename(path, batches.file_path(&file.id)).map_err(|e| e.to_string())?;
                store::insert_file(&mut batches.db(), &file).map_err(|e| e.to_string())?;
                Ok(Some(file.id))
            };
            let output = keep(&out, "output")?;
            let errors = keep(&err, "error")?;
            let mut db = batches.db();
            store::set_results(&mut db, &id, output.as_deref(), errors.as_deref())
                .map_err(|e| e.to_string())?;
            store::set_status(&mut db, &id, end, now()).map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())?
    }
}

/// A batch's work files, opened for appending, and the custom ids they hold (reads the disk).
fn open_work(out: &Path, err: &Path) -> Result<(Arc<Work>, HashSet<String>), String> {
    let open = |p: &Path| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .map_err(|e| format!("{}: {e}", p.display()))
    };
    let (done_ok, completed) = answered(out)?;
    let (done_err, failed) = answered(err)?;
    let work = Work {
        output: Mutex::new(open(out)?),
        errors: Mutex::new(open(err)?),
        completed: AtomicU64::new(completed),
        failed: AtomicU64::new(failed),
    };
    Ok((Arc::new(work), &done_ok | &done_err))
}

/// The custom ids a work file holds and how many; a line cut by a crash is dropped (its
/// request runs again).
fn answered(path: &Path) -> Result<(HashSet<String>, u64), String> {
    let mut text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((HashSet::new(), 0)),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    if !text.is_empty() && !text.ends_with(b"\n") {
        let keep = text.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        text.truncate(keep);
        std::fs::write(path, &text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    let ids: HashSet<String> = text
        .split(|b| *b == b'\n')
        .filter_map(|l| serde_json::from_slice::<Value>(l).ok())
        .filter_map(|v| v["custom_id"].as_str().map(str::to_owned))
        .collect();
    let n = ids.len() as u64;
    Ok((ids, n))
}

/// A line's answer as OpenAI's batch output (or error) line.
async fn answer_of(line: &Line, resp: reqwest::Response) -> Answer {
    let status = resp.status().as_u16();
    let request_id = resp
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let text = resp.text().await.unwrap_or_default();
    let body = serde_json::from_str::<Value>(&text).unwrap_or(Value::String(text));
    let response = json!({"status_code": status, "request_id": request_id, "body": body});
    if (200..300).contains(&status) {
        Answer::Completed(json!({
            "id": new_id("batch_req_"), "custom_id": line.custom_id,
            "response": response, "error": null,
        }))
    } else {
        let error = json!({
            "code": body["error"]["code"].as_str().unwrap_or("request_failed"),
            "message": body["error"]["message"].as_str().unwrap_or("the request failed"),
        });
        Answer::Failed(json!({
            "id": new_id("batch_req_"), "custom_id": line.custom_id,
            "response": response, "error": error,
        }))
    }
}
