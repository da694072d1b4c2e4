//! FIRST's batch API, as FIRST serves it: `POST /resource_server/{cluster}/{framework}/v1/batches`
//! submits the model's batch function to the cluster's Globus Compute endpoint (the input file
//! and the output folder are paths on the facility's file system), `GET
//! /resource_server/v1/batches[/{id}[/result]]` report on it. The [`FirstBatchWatcher`] waits
//! for each batch's task (also those submitted before a restart) and records how it ended.

use super::store::{self, FirstBatchRow};
use super::{now, BatchError, Batches, Owner};
use crate::compute::ComputeClient;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A FIRST batch not finished after this long has failed (FIRST's `GLOBUS_BATCH_TIMEOUT_IN_DAYS`).
const TIMEOUT: Duration = Duration::from_secs(7 * 86_400);

fn coded(status: u16, code: &'static str, message: impl Into<String>) -> BatchError {
    BatchError::Coded {
        status,
        code,
        message: message.into(),
    }
}

/// What `POST .../v1/batches` asks for.
pub struct FirstRequest {
    pub model: String,
    pub input_file: String,
    pub output_folder_path: Option<String>,
}

impl FirstRequest {
    /// FIRST's schema: `model` and `input_file` non-empty, `output_folder_path` optional,
    /// nothing else. An OpenAI Batch API body gets the `/v1` base named.
    pub fn parse(body: &[u8]) -> Result<FirstRequest, BatchError> {
        let v: Value = serde_json::from_slice(body).map_err(|e| {
            coded(
                400,
                "invalid_request",
                format!("The body is not valid JSON: {e}"),
            )
        })?;
        let Value::Object(o) = v else {
            return Err(coded(
                400,
                "invalid_request",
                "The body must be a JSON object.",
            ));
        };
        if o.contains_key("input_file_id") {
            return Err(coded(
                400,
                "invalid_request",
                "This is FIRST's batch route (model, input_file on the facility file system). For \
                 the OpenAI Batch API (input_file_id) use the base URL http://HOST/v1.",
            ));
        }
        if let Some(k) = o
            .keys()
            .find(|k| !["model", "input_file", "output_folder_path"].contains(&k.as_str()))
        {
            return Err(coded(
                400,
                "invalid_request",
                format!(
                    "Unknown field '{k}': a batch takes model, input_file and output_folder_path."
                ),
            ));
        }
        let text = |k: &str| {
            o.get(k)
                .and_then(Value::as_str)
                .filter(|s| !s.trim().is_empty())
        };
        let need = |k: &'static str| {
            text(k).map(str::to_owned).ok_or_else(|| {
                coded(
                    400,
                    "invalid_request",
                    format!("'{k}' is required and may not be empty."),
                )
            })
        };
        Ok(FirstRequest {
            model: need("model")?,
            input_file: need("input_file")?,
            output_folder_path: text("output_folder_path").map(str::to_owned),
        })
    }
}

fn iso(t: Option<i64>) -> Value {
    t.map_or(Value::Null, |s| {
        let at = std::time::UNIX_EPOCH + Duration::from_secs(s.max(0) as u64);
        json!(humantime::format_rfc3339_seconds(at).to_string())
    })
}

impl Batches {
    /// Checks FIRST's rules (the user's quota, the same input file already running) and
    /// records the batch as pending; the caller submits it, then calls [`Self::first_submitted`].
    pub fn first_admit(
        &self,
        owner: &Owner,
        cluster: &str,
        framework: &str,
        model: &str,
        req: &FirstRequest,
    ) -> Result<FirstBatchRow, BatchError> {
        let mut db = self.db();
        let unfinished = store::firsts(&mut db, None, None).map_err(super::internal)?;
        let mine = unfinished
            .iter()
            .filter(|b| b.username == owner.username)
            .count();
        if mine >= self.settings.max_active_per_user {
            return Err(coded(
                400,
                "quota_exceeded",
                format!(
                    "Quota exceeded: you have {mine} batches pending or running, the most allowed; \
                     wait for one to finish."
                ),
            ));
        }
        // Per user, as FIRST's `submit_batch` filters by `user_id`: another user's batch of the
        // same file does not block this one.
        if unfinished
            .iter()
            .any(|b| b.username == owner.username && b.input_file == req.input_file)
        {
            return Err(coded(
                400,
                "batch_ongoing",
                format!(
                    "The input file {} is already in a batch that has not finished.",
                    req.input_file
                ),
            ));
        }
        let row = FirstBatchRow {
            id: crate::compute::uuid(),
            username: owner.username.clone(),
            cluster: cluster.to_string(),
            framework: framework.to_string(),
            model: model.to_string(),
            input_file: req.input_file.clone(),
            output_folder_path: req.output_folder_path.clone(),
            task_ids: Vec::new(),
            status: "pending".into(),
            created_at: now(),
            completed_at: None,
            failed_at: None,
            result: None,
            error: None,
        };
        store::insert_first(&mut db, &row).map_err(super::internal)?;
        Ok(row)
    }

    /// The batch function's task was submitted (or not: `Err` ends the batch as failed).
    pub fn first_submitted(
        &self,
        row: &FirstBatchRow,
        task: Result<String, String>,
    ) -> Result<Value, BatchError> {
        let mut db = self.db();
        match task {
            Ok(task) => {
                store::set_first_tasks(&mut db, &row.id, std::slice::from_ref(&task))
                    .map_err(super::internal)?;
                drop(db);
                self.first_wake.notify_one();
                Ok(json!({
                    "batch_id": row.id, "input_file": row.input_file,
                    "output_folder_path": row.output_folder_path,
                    // FIRST joins the task ids with commas (`SubmitBatchResult.task_ids: str`).
                    "task_ids": task,
                    "status": "pending",
                }))
            }
            Err(why) => {
                store::end_first(&mut db, &row.id, Err(why.clone()), now())
                    .map_err(super::internal)?;
                Err(coded(
                    503,
                    "compute_unavailable",
                    format!("The batch could not be submitted to Globus Compute: {why}"),
                ))
            }
        }
    }

    /// `GET /resource_server/v1/batches[?status=]`: the caller's batches.
    pub fn first_list(&self, owner: &str, status: Option<&str>) -> Result<Value, BatchError> {
        if let Some(s) =
            status.filter(|s| !["pending", "running", "failed", "completed"].contains(s))
        {
            return Err(coded(
                400,
                "invalid_request",
                format!("status '{s}' is not one of pending, running, failed, completed"),
            ));
        }
        let rows = store::firsts(&mut self.db(), Some(owner), status).map_err(super::internal)?;
        Ok(Value::Array(
            rows.iter()
                .map(|b| {
                    json!({
                        "id": b.id, "batch_id": b.id, "cluster": b.cluster, "framework": b.framework,
                        "input_file": b.input_file, "in_progress_at": iso(Some(b.created_at)),
                        "completed_at": iso(b.completed_at), "failed_at": iso(b.failed_at),
                        "status": b.status,
                    })
                })
                .collect(),
        ))
    }

    fn own_first(&self, owner: &str, id: &str) -> Result<FirstBatchRow, BatchError> {
        let row = store::first(&mut self.db(), id).map_err(super::internal)?;
        match row {
            None if id.starts_with("batch_") => Err(coded(
                404,
                "batch_not_found",
                format!("Batch {id} not found here: OpenAI Batch API batches are under the base URL http://HOST/v1."),
            )),
            None => Err(coded(404, "batch_not_found", format!("Batch {id} not found."))),
            Some(b) if b.username != owner => Err(coded(403, "access_denied", format!("Permission denied to Batch {id}."))),
            Some(b) => Ok(b),
        }
    }

    /// `GET /resource_server/v1/batches/{id}`: the status, as a JSON string.
    pub fn first_status(&self, owner: &str, id: &str) -> Result<Value, BatchError> {
        Ok(json!(self.own_first(owner, id)?.status))
    }

    /// `GET /resource_server/v1/batches/{id}/result`: the function's result, as a JSON string.
    pub fn first_result(&self, owner: &str, id: &str) -> Result<Value, BatchError> {
        let b = self.own_first(owner, id)?;
        match b.status.as_str() {
            "completed" => Ok(json!(b.result.unwrap_or_default())),
            "failed" => Err(coded(
                400,
                "batch_failed",
                format!("Batch failed: {}", b.error.unwrap_or_default()),
            )),
            _ => Err(coded(
                400,
                "batch_ongoing",
                "Batch not completed yet. Results not ready.",
            )),
        }
    }
}

/// Waits for the tasks of FIRST batches and records how they ended.
pub struct FirstBatchWatcher {
    pub batches: Arc<Batches>,
    pub client: Arc<ComputeClient>,
}

#[async_trait]
impl BackgroundService for FirstBatchWatcher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let watched: Arc<Mutex<HashSet<String>>> = Arc::default();
        loop {
            let batches = self.batches.clone();
            // Among replicas, the one running the batches watches FIRST's too.
            let rows = if !batches.works_here() {
                Ok(Ok(Vec::new()))
            } else {
                tokio::task::spawn_blocking(move || store::firsts(&mut batches.db(), None, None))
                    .await
            };
            let rows = rows.ok().and_then(Result::ok).unwrap_or_default();
            for row in rows {
                let Some(task) = row.task_ids.first().cloned() else {
                    continue;
                };
                if !watched
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(row.id.clone())
                {
                    continue;
                }
                let (batches, client, watched) =
                    (self.batches.clone(), self.client.clone(), watched.clone());
                tokio::spawn(async move {
                    let left = TIMEOUT.saturating_sub(Duration::from_secs(
                        (now() - row.created_at).max(0) as u64,
                    ));
                    let outcome = match client.wait(&task, left).await {
                        Ok(Value::String(result)) => Ok(result),
                        Ok(other) => Ok(other.to_string()),
                        Err(crate::compute::ComputeError::TimedOut(_)) => {
                            Err("Timeout after 7 days.".to_string())
                        }
                        Err(e) => Err(e.to_string()),
                    };
                    let id = row.id.clone();
                    let _ = tokio::task::spawn_blocking(move || {
                        store::end_first(&mut batches.db(), &id, outcome, now())
                    })
                    .await;
                    watched
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&row.id);
                });
            }
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = self.batches.first_wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(30)) => {}
            }
        }
    }
}
