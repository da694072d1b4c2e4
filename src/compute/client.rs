//! Globus Compute client: the gateway's own token (client credentials, cached until expiry −
//! 60 s, fetched again once on a 401), submissions through `POST /v3/endpoints/{ep}/submit`
//! with JSONData payloads, and one poller that asks `POST /v2/batch_status` about every pending
//! task at once. Every call to the service passes one rate limiter (20 per 10 s, the service's
//! limit per client), however many requests wait.

use super::serialize::{decode_result, task_payload};
use crate::config::ComputeConfig;
use crate::outbound::describe;
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, Notify};

const COMPUTE_SCOPE: &str =
    "https://auth.globus.org/scopes/facd7ccc-c5f4-42aa-916b-a0e270e2c2a9/all";
const JSON_RESULTS: &str = "globus_compute_sdk.serialize.concretes.JSONData";
/// The service's limit: 20 requests per 10 s per client.
const RATE_LIMIT: (usize, Duration) = (20, Duration::from_secs(10));
const STATUS_TTL: Duration = Duration::from_secs(60);
const STATUS_ERROR_TTL: Duration = Duration::from_secs(10);
/// How long submissions are gathered into one call.
const SUBMIT_GATHER: Duration = Duration::from_millis(20);

/// A failed Compute call. Texts never contain tokens or secrets.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ComputeError {
    #[error("Globus Compute unreachable: {0}")]
    Unreachable(String),
    /// No connection could be made: the request surely did not reach the service.
    #[error("Globus Compute unreachable: {0}")]
    NotSent(String),
    #[error("Globus Compute answered HTTP {status}: {message}")]
    Refused { status: u16, message: String },
    #[error("task {0} did not finish in time")]
    TimedOut(String),
    #[error("task {task} failed: {exception}")]
    TaskFailed { task: String, exception: String },
    #[error("task {task}: {reason}")]
    Undecodable { task: String, reason: String },
}

/// An endpoint's status (`GET /v2/endpoints/{ep}/status`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointStatus {
    pub online: bool,
    /// Workers' managers connected (0: online but no node running). `None` when the report has
    /// no count: a v4 multi-user endpoint reports only `status`, and is taken as ready (as
    /// FIRST's `has_no_managers` does).
    pub managers: Option<u64>,
}

impl EndpointStatus {
    /// Online with no node running its workers (a cold start, or lost managers).
    pub fn without_managers(&self) -> bool {
        self.online && self.managers == Some(0)
    }
}

struct StatusExpiry;

impl moka::Expiry<String, Result<EndpointStatus, ComputeError>> for StatusExpiry {
    fn expire_after_create(
        &self,
        _key: &String,
        value: &Result<EndpointStatus, ComputeError>,
        _now: Instant,
    ) -> Option<Duration> {
        Some(if value.is_ok() {
            STATUS_TTL
        } else {
            STATUS_ERROR_TTL
        })
    }
}

type Waiters = HashMap<String, Vec<oneshot::Sender<Result<Value, ComputeError>>>>;

pub struct ComputeClient {
    http: reqwest::Client,
    url: String,
    auth_url: String,
    client_id: String,
    client_secret: String,
    pub poll_interval: Duration,
    /// The service token and when to stop using it.
    token: Mutex<Option<(String, Instant)>>,
    /// Times of the calls in the current window.
    calls: Mutex<VecDeque<Instant>>,
    /// Senders waiting for each pending task.
    waiting: Mutex<Waiters>,
    /// Wakes the poller when a task is added.
    wake: Notify,
    /// Endpoint statuses: one call however many requests ask at once.
    statuses: moka::future::Cache<String, Result<EndpointStatus, ComputeError>>,
    /// Submissions waiting to be sent.
    submissions: Mutex<Vec<Submission>>,
    wake_submitter: Notify,
    /// Per endpoint, the task group the service created on the first submission there, reused
    /// by every later one (the SDK's `Executor` does the same; since globus-compute 2.3 the
    /// service refuses a group it did not create).
    task_groups: Mutex<HashMap<String, String>>,
    /// Per endpoint, when an inference task was last sent there: an endpoint with no managers
    /// that already got one is starting a node, and is not sent another (FIRST's
    /// `endpoint_triggered`).
    triggered: Mutex<HashMap<String, Instant>>,
    /// With `state.redis`, the replicas share the marks (FIRST keeps `endpoint_triggered` in
    /// Redis): one starting task per endpoint, whichever replica sends it.
    shared_starts: Option<Arc<crate::state::SharedState>>,
}

/// One task to submit, and where its id goes.
struct Submission {
    endpoint: String,
    function: String,
    payload: String,
    reply: oneshot::Sender<Result<String, ComputeError>>,
}

impl ComputeClient {
    pub fn new(cfg: &ComputeConfig, client_secret: String) -> Result<Self, reqwest::Error> {
        Ok(ComputeClient {
            http: reqwest::Client::builder()
                .timeout(cfg.timeout)
                .connect_timeout(cfg.timeout.min(Duration::from_secs(5)))
                .build()?,
            url: cfg.url.trim_end_matches('/').to_string(),
            auth_url: cfg.auth_url.trim_end_matches('/').to_string(),
            client_id: cfg.client_id.clone(),
            client_secret,
            poll_interval: cfg.poll_interval,
            token: Mutex::new(None),
            calls: Mutex::new(VecDeque::new()),
            waiting: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            statuses: moka::future::Cache::builder()
                .max_capacity(1024)
                .expire_after(StatusExpiry)
                .build(),
            submissions: Mutex::new(Vec::new()),
            wake_submitter: Notify::new(),
            task_groups: Mutex::new(HashMap::new()),
            triggered: Mutex::new(HashMap::new()),
            shared_starts: None,
        })
    }

    /// Waits until a call fits in the rate limit, then counts it.
    async fn rate_limit(&self) {
        loop {
            let wait = {
                let mut calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
                let now = Instant::now();
                while calls
                    .front()
                    .is_some_and(|t| now.duration_since(*t) >= RATE_LIMIT.1)
                {
                    calls.pop_front();
                }
                if calls.len() < RATE_LIMIT.0 {
                    calls.push_back(now);
                    return;
                }
                RATE_LIMIT.1 - now.duration_since(calls[0])
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// The service token (client credentials), fetched when missing or about to expire.
    async fn token(&self) -> Result<String, ComputeError> {
        if let Some((t, until)) = &*self.token.lock().unwrap_or_else(|e| e.into_inner()) {
            if Instant::now() < *until {
                return Ok(t.clone());
            }
        }
        let resp = self
            .http
            .post(format!("{}/v2/oauth2/token", self.auth_url))
            .basic_auth(&self.client_id, Some(&self.client_secret))
            .form(&[
                ("grant_type", "client_credentials"),
                ("scope", COMPUTE_SCOPE),
            ])
            .send()
            .await
            .map_err(|e| ComputeError::Unreachable(format!("Globus Auth: {}", describe(&e))))?;
        if !resp.status().is_success() {
            return Err(ComputeError::Refused {
                status: resp.status().as_u16(),
                message: "Globus Auth refused the client-credentials grant".into(),
            });
        }
        let body: Value = resp
            .json()
            .await
            .map_err(|e| ComputeError::Unreachable(format!("Globus Auth: {}", describe(&e))))?;
        let token = body["access_token"]
            .as_str()
            .ok_or_else(|| ComputeError::Unreachable("Globus Auth sent no access_token".into()))?
            .to_string();
        let lifetime = body["expires_in"].as_u64().unwrap_or(3600);
        let until = Instant::now() + Duration::from_secs(lifetime.saturating_sub(60));
        *self.token.lock().unwrap_or_else(|e| e.into_inner()) = Some((token.clone(), until));
        Ok(token)
    }

    /// One call to the service, with the token fetched again once on a 401.
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, ComputeError> {
        for attempt in 0..2 {
            self.rate_limit().await;
            let token = self.token().await?;
            let mut req = self
                .http
                .request(method.clone(), format!("{}{path}", self.url))
                .bearer_auth(token);
            if let Some(b) = body {
                req = req.json(b);
            }
            let resp = req.send().await.map_err(|e| {
                if e.is_connect() {
                    ComputeError::NotSent(describe(&e))
                } else {
                    ComputeError::Unreachable(describe(&e))
                }
            })?;
            let status = resp.status().as_u16();
            if status == 401 && attempt == 0 {
                *self.token.lock().unwrap_or_else(|e| e.into_inner()) = None;
                continue;
            }
            let text = resp
                .text()
                .await
                .map_err(|e| ComputeError::Unreachable(describe(&e)))?;
            if !(200..300).contains(&status) {
                let message = serde_json::from_str::<Value>(&text)
                    .ok()
                    .and_then(|v| {
                        v["message"]
                            .as_str()
                            .or(v["error"].as_str())
                            .map(str::to_owned)
                    })
                    .unwrap_or_else(|| text.chars().take(200).collect());
                return Err(ComputeError::Refused { status, message });
            }
            return serde_json::from_str(&text)
                .map_err(|e| ComputeError::Unreachable(format!("unexpected body: {e}")));
        }
        unreachable!("the loop returns on its second attempt")
    }

    /// The endpoint's status, cached 60 s (errors 10 s) as FIRST does.
    pub async fn endpoint_status(&self, endpoint: &str) -> Result<EndpointStatus, ComputeError> {
        self.statuses
            .get_with(endpoint.to_string(), async {
                self.call(
                    reqwest::Method::GET,
                    &format!("/v2/endpoints/{endpoint}/status"),
                    None,
                )
                .await
                .map(|v| EndpointStatus {
                    online: v["status"].as_str() == Some("online"),
                    managers: v["details"]["managers"].as_u64(),
                })
            })
            .await
    }

    /// Submits `function(*args)` on `endpoint`; returns the task id. Submissions made close
    /// together are sent in one call per endpoint (as the Compute SDK batches them).
    pub async fn submit(
        &self,
        endpoint: &str,
        function: &str,
        args: &[Value],
    ) -> Result<String, ComputeError> {
        let (tx, rx) = oneshot::channel();
        self.submissions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Submission {
                endpoint: endpoint.to_string(),
                function: function.to_string(),
                payload: task_payload(args),
                reply: tx,
            });
        self.wake_submitter.notify_one();
        rx.await.unwrap_or_else(|_| {
            Err(ComputeError::Unreachable(
                "the task submitter stopped".into(),
            ))
        })
    }

    /// Sends every queued submission: one call per endpoint, tasks in order per function.
    pub async fn submit_queued(&self) {
        let queued =
            std::mem::take(&mut *self.submissions.lock().unwrap_or_else(|e| e.into_inner()));
        let mut by_endpoint: Vec<(String, Vec<Submission>)> = Vec::new();
        for s in queued {
            match by_endpoint.iter_mut().find(|(e, _)| *e == s.endpoint) {
                Some((_, list)) => list.push(s),
                None => by_endpoint.push((s.endpoint.clone(), vec![s])),
            }
        }
        for (endpoint, batch) in by_endpoint {
            let mut tasks: serde_json::Map<String, Value> = serde_json::Map::new();
            for s in &batch {
                let list = tasks.entry(s.function.clone()).or_insert_with(|| json!([]));
                list.as_array_mut().expect("a list").push(json!(s.payload));
            }
            let result = self
                .submit_batch(&endpoint, Value::Object(tasks), batch.len())
                .await;
            // Task ids come back in submission order per function.
            let mut next: HashMap<String, usize> = HashMap::new();
            for s in batch {
                let i = next.entry(s.function.clone()).or_default();
                let outcome = match &result {
                    Ok(v) => v["tasks"][&s.function][*i]
                        .as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| {
                            ComputeError::Unreachable(
                                "the submit answer lists too few tasks".into(),
                            )
                        }),
                    Err(e) => Err(e.clone()),
                };
                *i += 1;
                let _ = s.reply.send(outcome);
            }
        }
    }

    /// One `POST /v3/endpoints/{ep}/submit`, in the endpoint's task group once the service
    /// made one. A refusal of a submission that named a group, saying it is about the group, is
    /// taken as the service having forgotten it (expired, or another service instance): the
    /// group is dropped and the tasks sent once more without one. A call that got no answer is not repeated (its tasks may
    /// exist), unless no connection was made at all.
    async fn submit_batch(
        &self,
        endpoint: &str,
        tasks: Value,
        count: usize,
    ) -> Result<Value, ComputeError> {
        let path = format!("/v3/endpoints/{endpoint}/submit");
        let mut outcome = Err(ComputeError::NotSent("not tried".into()));
        for _ in 0..2 {
            let group = self.task_group(endpoint);
            let body = submit_body(&tasks, group.as_deref());
            outcome = self.call(reqwest::Method::POST, &path, Some(&body)).await;
            match &outcome {
                Ok(v) => {
                    if let Some(g) = v["task_group_id"].as_str() {
                        self.lock_groups()
                            .insert(endpoint.to_string(), g.to_string());
                    }
                    return outcome;
                }
                // Only a refusal that is about the group (a refused function, say, is not).
                Err(ComputeError::Refused { status, message })
                    if group.is_some()
                        && matches!(status, 400 | 403 | 404 | 410 | 422)
                        && message.to_ascii_lowercase().contains("group") =>
                {
                    log::warn!(
                        "Globus Compute refused task group {} on {endpoint} ({status}: \
                         {message}); submitting {count} tasks without one",
                        group.as_deref().unwrap_or_default()
                    );
                    self.lock_groups().remove(endpoint);
                }
                Err(ComputeError::NotSent(why)) => {
                    log::warn!("submit to {endpoint} not sent ({why}); trying once more");
                }
                Err(ComputeError::Unreachable(why)) => {
                    log::warn!(
                        "submit of {count} tasks to {endpoint} had no answer ({why}); not \
                         resubmitted, as they may exist"
                    );
                    return outcome;
                }
                Err(_) => return outcome,
            }
        }
        outcome
    }

    fn lock_groups(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.task_groups.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_triggered(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        self.triggered.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The task group of `endpoint`, once the service created one.
    pub fn task_group(&self, endpoint: &str) -> Option<String> {
        self.lock_groups().get(endpoint).cloned()
    }

    /// Notes that an inference task went to `endpoint`: on an endpoint without managers it
    /// starts a node.
    pub fn trigger(&self, endpoint: &str) {
        self.lock_triggered()
            .insert(endpoint.to_string(), Instant::now());
    }

    /// Shares the starting marks with the other replicas through Redis.
    pub fn share_starts(&mut self, state: Arc<crate::state::SharedState>) {
        self.shared_starts = Some(state);
    }

    /// Claims the task that starts `endpoint`'s node: false when an inference task went there
    /// within `within` (it may be starting one already), else marks it as sent now. Checked
    /// and marked at once (in this process, then with `SET NX` in Redis when shared), so a
    /// burst of cold requests sends one starting task, not one each. Redis failing leaves
    /// this process's claim standing.
    pub async fn claim_start(&self, endpoint: &str, within: Duration) -> bool {
        {
            let mut triggered = self.lock_triggered();
            if triggered
                .get(endpoint)
                .is_some_and(|at| at.elapsed() < within)
            {
                return false;
            }
            triggered.insert(endpoint.to_string(), Instant::now());
        }
        let Some(state) = &self.shared_starts else {
            return true;
        };
        let (key, ms) = (start_key(state, endpoint), within.as_millis() as u64);
        let claimed = state
            .call("compute_start_claim", |mut conn| async move {
                redis::cmd("SET")
                    .arg(&key)
                    .arg(1)
                    .arg("NX")
                    .arg("PX")
                    .arg(ms)
                    .query_async::<Option<String>>(&mut conn)
                    .await
            })
            .await;
        // Another replica's claim: this process keeps its mark too (a task is starting).
        !matches!(claimed, Ok(None))
    }

    /// Gives up a claim whose task could not be sent.
    pub async fn release_start(&self, endpoint: &str) {
        self.lock_triggered().remove(endpoint);
        if let Some(state) = &self.shared_starts {
            let key = start_key(state, endpoint);
            let _ = state
                .call("compute_start_release", |mut conn| async move {
                    redis::cmd("DEL")
                        .arg(&key)
                        .query_async::<i64>(&mut conn)
                        .await
                })
                .await;
        }
    }

    /// Sends queued submissions as they come, gathering those made within a few milliseconds.
    pub async fn submit_forever(&self) {
        loop {
            self.wake_submitter.notified().await;
            tokio::time::sleep(SUBMIT_GATHER).await;
            self.submit_queued().await;
        }
    }

    /// Waits up to `limit` for a task's decoded result.
    pub async fn wait(&self, task: &str, limit: Duration) -> Result<Value, ComputeError> {
        let (tx, rx) = oneshot::channel();
        self.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(task.to_string())
            .or_default()
            .push(tx);
        self.wake.notify_one();
        match tokio::time::timeout(limit, rx).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => Err(ComputeError::Unreachable("the task poller stopped".into())),
            Err(_) => {
                self.forget_closed();
                Err(ComputeError::TimedOut(task.to_string()))
            }
        }
    }

    /// Submits and waits.
    pub async fn run(
        &self,
        endpoint: &str,
        function: &str,
        args: &[Value],
        limit: Duration,
    ) -> Result<Value, ComputeError> {
        let task = self.submit(endpoint, function, args).await?;
        self.wait(&task, limit).await
    }

    /// Drops waiters that gave up (timed out or cancelled).
    fn forget_closed(&self) {
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        waiting.retain(|_, senders| {
            senders.retain(|s| !s.is_closed());
            !senders.is_empty()
        });
    }

    /// Tasks someone waits for.
    pub fn pending(&self) -> usize {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// One poll: every pending task in one `batch_status` call; finished ones are delivered.
    pub async fn poll_once(&self) -> Result<(), ComputeError> {
        self.forget_closed();
        let ids: Vec<String> = self
            .waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        if ids.is_empty() {
            return Ok(());
        }
        let v = self
            .call(
                reqwest::Method::POST,
                "/v2/batch_status",
                Some(&json!({"task_ids": ids})),
            )
            .await?;
        let Some(results) = v["results"].as_object() else {
            return Ok(());
        };
        for (id, doc) in results {
            let status = doc["status"]
                .as_str()
                .unwrap_or_default()
                .to_ascii_lowercase();
            if status != "success" && status != "failed" {
                continue;
            }
            let outcome = task_outcome(id, doc);
            let senders = self
                .waiting
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(id);
            for s in senders.into_iter().flatten() {
                let _ = s.send(outcome.clone());
            }
        }
        Ok(())
    }

    /// Runs the poller until the process ends: one call per interval while tasks are pending.
    pub async fn poll_forever(&self) {
        loop {
            if self.pending() == 0 {
                self.wake.notified().await;
            }
            tokio::time::sleep(self.poll_interval).await;
            if let Err(e) = self.poll_once().await {
                log::warn!("polling Globus Compute tasks: {e}");
            }
        }
    }
}

/// The body of `POST /v3/endpoints/{ep}/submit`, as the SDK's `Batch.prepare()` builds it
/// (globus-compute-sdk 4.19, `sdk/batch.py`): `task_group_id` only when there is one.
/// `user_runtime` is left out: it describes the submitting Python (`sys.version`, `platform`),
/// which the gateway is not, and only a multi-user endpoint's config template reads it.
pub fn submit_body(tasks: &Value, task_group: Option<&str>) -> Value {
    let mut body = json!({
        "create_queue": false,
        "tasks": tasks,
        "result_serializers": [JSON_RESULTS],
    });
    if let Some(g) = task_group {
        body["task_group_id"] = json!(g);
    }
    body
}

/// A finished task document as a result or an error.
fn task_outcome(id: &str, doc: &Value) -> Result<Value, ComputeError> {
    if doc["status"]
        .as_str()
        .is_some_and(|s| s.eq_ignore_ascii_case("success"))
    {
        let raw = doc["result"].as_str().unwrap_or_default();
        decode_result(raw).map_err(|e| ComputeError::Undecodable {
            task: id.to_string(),
            reason: e.to_string(),
        })
    } else {
        let exception = doc["exception"]
            .as_str()
            .or(doc["reason"].as_str())
            .unwrap_or("unknown")
            .to_string();
        Err(ComputeError::TaskFailed {
            task: id.to_string(),
            exception,
        })
    }
}

/// A random (version 4) uuid.
pub fn uuid() -> String {
    uuid_from_bits(fastrand::u128(..))
}

/// 128 bits in the uuid text form, marked as version 4, variant 1.
pub fn uuid_from_bits(bits: u128) -> String {
    let h = format!("{bits:032x}");
    format!(
        "{}-{}-4{}-a{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

/// The Redis key of `endpoint`'s starting mark (FIRST's `endpoint_triggered`).
fn start_key(state: &crate::state::SharedState, endpoint: &str) -> String {
    state.key(&format!("endpoint_triggered:{endpoint}"))
}
