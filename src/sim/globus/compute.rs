//! Globus Compute stand-in (`shared/reference/globus-api.md` §4, §6.3): version, endpoint
//! status, v3 submit, task, batch_status and taskgroup, with a simulated facility behind the
//! endpoints. Built-in functions mirror FIRST's: `inference` (like `vllm_inference_function`:
//! calls the model's running instance), `status` (like the qstat function: the jobs by state),
//! `start` (queues a job that launches a simulated vLLM after a queue wait and a load time),
//! `stop`, and `echo`.
//!
//! It is as strict as the real service and as literal as FIRST's functions, each rule from:
//! - Task groups: a submit naming a `task_group_id` the service did not create is refused
//!   (globus-compute-sdk 4.19 `Client.create_batch` docstring: "If there is no Task Group
//!   associated with the given ID ... the services will respond with an error"; enforced since
//!   the service of SDK 2.3.0). The status (404) and code are inferred; `forget_task_groups`
//!   empties the service's memory of them.
//! - The submit body is `Batch.prepare()`'s (SDK 4.19 `sdk/batch.py`): `create_queue` and
//!   `tasks` required; `user_runtime`, when sent, has `UserRuntime`'s fields (flat versions plus
//!   nested `python` and `platform`).
//! - Endpoint status (SDK `get_endpoint_status`): an endpoint seeded `cold` reports
//!   `managers: 0` until a job of its runs (a PBS provider with `min_blocks: 0`).
//! - Failed tasks carry the traceback text in `exception` (globus-compute-endpoint
//!   `exception_handling.get_error_string`); FIRST's inference function
//!   (`compute-functions/vllm_register_function_with_streaming.py`) raises on a non-200 from
//!   vLLM "API request failed with status code: N\nResponse text: ...\nResponse headers: ...",
//!   wrapped by its outer handler as "Unexpected error of type Exception: ...\nResponse time:
//!   t"; it requires `openai_endpoint` and `api_port`, and for a stream the four streaming
//!   fields.
//! - The status function returns what FIRST's `qstat_register_function.py` returns:
//!   `json.dumps(...)` of `running`, `queued`, `others`, `private-batch-running`,
//!   `private-batch-queued` and `cluster_status`; jobs with `Host Name` = PBS `exec_host`
//!   (`host/0*64`, `N/A` while queued), `Walltime` = `resources_used.walltime` (time used, only
//!   once running), `Job State` R or Q. Each job's simulated vLLM listens on its own loopback
//!   address at the model's `api_port` (the start function's argument), as a node would.

mod batch;
mod streaming;

use super::{globus_error, unix_now, Grant, Shared, TokenRecord};
use crate::compute::serialize::{python_json, unpack};
use crate::sim::vllm::{VllmSim, VllmSimConfig};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const COMPUTE_SCOPE: &str =
    "https://auth.globus.org/scopes/facd7ccc-c5f4-42aa-916b-a0e270e2c2a9/all";

/// The stand-in's endpoints, functions and facility timings (the `compute:` seed section).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComputeSeed {
    #[serde(default)]
    pub endpoints: Vec<FakeEndpoint>,
    #[serde(default)]
    pub functions: Vec<FakeFunction>,
    /// How long a started job waits in the queue.
    #[serde(default = "default_queue_wait", with = "humantime_serde")]
    pub queue_wait: Duration,
    /// How long a running job loads its model before its `/health` answers 200.
    #[serde(default = "default_load_time", with = "humantime_serde")]
    pub load_time: Duration,
    /// Simulated time to first token and between tokens of started instances.
    #[serde(default = "default_ttft", with = "humantime_serde")]
    pub ttft: Duration,
    #[serde(default = "default_itl", with = "humantime_serde")]
    pub itl: Duration,
    /// Nodes of the simulated cluster (each job takes one).
    #[serde(default = "default_nodes")]
    pub nodes: u32,
    /// The endpoints' `INTERNAL_STREAMING_SECRET`: sent as `X-Internal-Secret` when a cold
    /// stream's lines are posted back to the gateway.
    #[serde(default)]
    pub streaming_secret: Option<String>,
    /// Where the batch function writes results when a batch names no `output_folder_path`
    /// (FIRST's is a project directory on the facility file system). Default: the temp dir.
    #[serde(default)]
    pub batch_results_dir: Option<std::path::PathBuf>,
}

impl Default for ComputeSeed {
    fn default() -> Self {
        ComputeSeed {
            endpoints: Vec::new(),
            functions: Vec::new(),
            queue_wait: default_queue_wait(),
            load_time: default_load_time(),
            ttft: default_ttft(),
            itl: default_itl(),
            nodes: default_nodes(),
            streaming_secret: None,
            batch_results_dir: None,
        }
    }
}

fn default_queue_wait() -> Duration {
    Duration::from_secs(2)
}
fn default_load_time() -> Duration {
    Duration::from_secs(2)
}
fn default_ttft() -> Duration {
    Duration::from_millis(50)
}
fn default_itl() -> Duration {
    Duration::from_millis(20)
}
fn default_nodes() -> u32 {
    4
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FakeEndpoint {
    pub id: String,
    #[serde(default)]
    pub name: String,
    /// Reports `managers: 0` until one of the facility's jobs runs (an endpoint whose node is
    /// not up). Otherwise at least one manager is reported.
    #[serde(default)]
    pub cold: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FakeFunction {
    pub id: String,
    /// `inference`, `status`, `start`, `stop`, `batch` or `echo`.
    pub kind: String,
}

/// Calls per route and tasks per function kind.
#[derive(Debug, Default)]
pub struct ComputeStats {
    pub submit: AtomicU64,
    pub batch_status: AtomicU64,
    pub task: AtomicU64,
    pub endpoint_status: AtomicU64,
    pub taskgroup: AtomicU64,
    pub tasks_inference: AtomicU64,
    pub tasks_status: AtomicU64,
    pub tasks_start: AtomicU64,
    pub tasks_stop: AtomicU64,
    /// Posts of streamed lines back to the gateway, answered 200 or not.
    pub stream_posts: AtomicU64,
    pub stream_posts_failed: AtomicU64,
    /// Payloads as submitted (the `tasks` strings), for byte-level checks.
    pub payloads: Mutex<Vec<String>>,
    /// Submit bodies as received, for checks of their shape.
    pub submit_bodies: Mutex<Vec<Value>>,
}

impl ComputeStats {
    pub fn snapshot(&self) -> Value {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        json!({
            "submit": g(&self.submit), "batch_status": g(&self.batch_status), "task": g(&self.task),
            "endpoint_status": g(&self.endpoint_status), "taskgroup": g(&self.taskgroup),
            "tasks": {"inference": g(&self.tasks_inference), "status": g(&self.tasks_status),
                      "start": g(&self.tasks_start), "stop": g(&self.tasks_stop)},
        })
    }
}

/// Compute misbehaviour on demand.
#[derive(Debug, Default)]
pub struct ComputeFaults {
    /// Endpoints reported offline (their tasks stay `waiting-for-ep`).
    pub offline: Mutex<Vec<String>>,
    /// The next this-many inference tasks fail with a lost-worker traceback.
    pub lose_workers: AtomicU32,
    /// Enforce the 20-requests-per-10-s limit with 429 + Retry-After.
    pub rate_limit: AtomicBool,
    /// The next inference tasks succeed with these result strings, as an endpoint serialized
    /// them (header included): what a broken or hostile endpoint could return.
    pub raw_results: Mutex<std::collections::VecDeque<String>>,
    /// While set, batch tasks wait (a batch runs for hours on a real cluster).
    pub hold_batches: AtomicBool,
}

/// One simulated batch job running a model instance.
struct Job {
    id: String,
    /// The loopback address standing for the job's node (its vLLM listens there).
    node: std::net::IpAddr,
    api_port: u16,
    model: String,
    framework: String,
    cluster: String,
    submitted: Instant,
    walltime: Duration,
    /// The instance, once the job left the queue.
    sim: Option<VllmSim>,
    /// When it left the queue (PBS counts `resources_used.walltime` from then).
    started: Option<Instant>,
    /// When the model finished loading.
    ready: bool,
}

impl Job {
    fn state(&self) -> &'static str {
        match (&self.sim, self.ready) {
            (None, _) => "queued",
            (Some(_), false) => "starting",
            (Some(_), true) => "running",
        }
    }

    /// The job as FIRST's qstat function reports it (`common_job_attributes`).
    fn report(&self) -> Value {
        let mut job = json!({
            "Models": self.model, "Framework": self.framework, "Cluster": self.cluster,
            "Model Status": self.state(), "Job ID": self.id,
            "Job State": if self.sim.is_some() { "R" } else { "Q" },
            "Host Name": "N/A", "Job Comments": "N/A", "Nodes Reserved": "1",
        });
        if let Some(started) = self.started {
            // PBS's `exec_host`: the node, its first vnode, 64 CPUs.
            job["Host Name"] = json!(format!("{}/0*64", self.node));
            job["Walltime"] = json!(hms(started.elapsed()));
        }
        job
    }
}

fn hms(d: Duration) -> String {
    let s = d.as_secs();
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

#[derive(Debug, Clone)]
struct Task {
    id: String,
    group: String,
    status: &'static str,
    result: Option<String>,
    exception: Option<String>,
    completed: Option<f64>,
    created: f64,
}

impl Task {
    fn doc(&self) -> Value {
        let mut v = json!({"task_id": self.id, "status": self.status});
        if let Some(r) = &self.result {
            v["result"] = json!(r);
        }
        if let Some(e) = &self.exception {
            v["exception"] = json!(e);
        }
        if let Some(t) = self.completed {
            v["completion_t"] = json!(t.to_string());
            v["details"] = json!({"os": "Linux-sim", "python_version": "3.11.9",
                "dill_version": "0.3.8", "globus_compute_sdk_version": "3.6.0",
                "task_transitions": {"execution-start": self.created, "execution-end": t}});
        }
        v
    }
}

/// The Compute half of the stand-in.
pub struct ComputeSim {
    pub seed: ComputeSeed,
    pub stats: ComputeStats,
    pub faults: ComputeFaults,
    tasks: Mutex<HashMap<String, Task>>,
    jobs: Mutex<Vec<Job>>,
    next_job: AtomicU64,
    calls: Mutex<Vec<Instant>>,
    http: reqwest::Client,
    /// Task groups the service created.
    groups: Mutex<std::collections::HashSet<String>>,
    /// Replicas behind the advertised streaming host (see `spread_stream_posts`).
    stream_post_ports: Mutex<Vec<u16>>,
}

impl ComputeSim {
    pub fn new(seed: ComputeSeed) -> Self {
        ComputeSim {
            seed,
            stats: ComputeStats::default(),
            faults: ComputeFaults::default(),
            tasks: Mutex::new(HashMap::new()),
            jobs: Mutex::new(Vec::new()),
            next_job: AtomicU64::new(1000),
            calls: Mutex::new(Vec::new()),
            http: reqwest::Client::new(),
            groups: Mutex::new(std::collections::HashSet::new()),
            stream_post_ports: Mutex::new(Vec::new()),
        }
    }

    /// Puts a load balancer in front of the advertised streaming host: each post of a cold
    /// stream goes to the next of `ports` on that host, in turn (empty: the advertised port).
    pub fn spread_stream_posts(&self, ports: Vec<u16>) {
        *self.stream_post_ports.lock().unwrap() = ports;
    }

    fn online(&self, endpoint: &str) -> bool {
        !self
            .faults
            .offline
            .lock()
            .unwrap()
            .iter()
            .any(|e| e == endpoint)
    }

    /// The jobs by state, as FIRST's qstat function returns them (before `json.dumps`).
    pub fn jobs_by_status(&self) -> Value {
        let jobs = self.jobs.lock().unwrap();
        // As FIRST's qstat function: a starting job is listed under `running`.
        let mut by: HashMap<&str, Vec<Value>> = HashMap::new();
        for j in jobs.iter() {
            let list = if j.state() == "queued" {
                "queued"
            } else {
                "running"
            };
            by.entry(list).or_default().push(j.report());
        }
        let free = self.seed.nodes.saturating_sub(jobs.len() as u32);
        let list = |k: &str| Value::Array(by.get(k).cloned().unwrap_or_default());
        json!({
            "running": list("running"), "queued": list("queued"), "others": [],
            "private-batch-running": [], "private-batch-queued": [],
            "cluster_status": {"free_nodes": free},
        })
    }

    /// The service forgets every task group it created (as after their expiry).
    pub fn forget_task_groups(&self) {
        self.groups.lock().unwrap().clear();
    }

    /// Task groups the service created.
    pub fn task_groups(&self) -> usize {
        self.groups.lock().unwrap().len()
    }

    /// Running instances of `model`.
    pub fn running_instances(&self, model: &str) -> Vec<std::net::SocketAddr> {
        let jobs = self.jobs.lock().unwrap();
        jobs.iter()
            .filter(|j| j.model == model && j.ready)
            .map(|j| std::net::SocketAddr::new(j.node, j.api_port))
            .collect()
    }

    /// Ends a job now (as its walltime running out would).
    pub fn end_job(&self, job_id: &str) -> bool {
        let mut jobs = self.jobs.lock().unwrap();
        let before = jobs.len();
        jobs.retain(|j| j.id != job_id);
        before != jobs.len()
    }
}

fn now_f() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// A Compute-scoped client token, or the 401 the service answers.
fn unauthorized(s: &Shared, headers: &HeaderMap) -> Option<Response> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let ok = matches!(
        token.and_then(|t| s.token(t)),
        Some(TokenRecord { grant: Grant::Client { scope, .. }, exp }) if scope == COMPUTE_SCOPE && exp > unix_now()
    );
    (!ok).then(|| {
        (
            StatusCode::UNAUTHORIZED,
            Json(json!({"code": "UNAUTHORIZED", "message": "Missing or invalid Compute access token"})),
        )
            .into_response()
    })
}

/// Faults common to every Compute route, then authorization.
async fn refusal(s: &Shared, headers: &HeaderMap) -> Option<Response> {
    if let Some(r) = s.fault().await {
        return Some(r);
    }
    if let Some(r) = unauthorized(s, headers) {
        return Some(r);
    }
    if s.compute.faults.rate_limit.load(Ordering::Relaxed) {
        let mut calls = s.compute.calls.lock().unwrap();
        calls.retain(|t| t.elapsed() < Duration::from_secs(10));
        if calls.len() >= 20 {
            let mut r = (
                StatusCode::TOO_MANY_REQUESTS,
                Json(json!({"code": "RATE_LIMITED", "message": "Too many requests"})),
            )
                .into_response();
            r.headers_mut().insert("retry-after", 10.into());
            return Some(r);
        }
        calls.push(Instant::now());
    }
    None
}

pub(super) async fn version(Query(q): Query<HashMap<String, String>>) -> Json<Value> {
    if q.get("service").map(String::as_str) == Some("all") {
        Json(
            json!({"api": "1.23.0", "min_sdk_version": "2.0.0", "min_ep_version": "2.0.0",
                    "min_endpoint_version": "2.0.0"}),
        )
    } else {
        Json(json!("1.23.0"))
    }
}

pub(super) async fn endpoint_status(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(ep): Path<String>,
) -> Response {
    s.compute
        .stats
        .endpoint_status
        .fetch_add(1, Ordering::Relaxed);
    if let Some(r) = refusal(&s, &headers).await {
        return r;
    }
    if !s.compute.seed.endpoints.iter().any(|e| e.id == ep) {
        return globus_error(StatusCode::NOT_FOUND, "Endpoint not found");
    }
    let online = s.compute.online(&ep);
    let cold = s
        .compute
        .seed
        .endpoints
        .iter()
        .any(|e| e.id == ep && e.cold);
    let running = s
        .compute
        .jobs
        .lock()
        .unwrap()
        .iter()
        .filter(|j| j.ready)
        .count();
    Json(json!({"status": if online { "online" } else { "offline" },
    "details": {"total_workers": running, "idle_workers": running, "pending_tasks": 0,
                "outstanding_tasks": 0,
                "managers": match (online, cold) {
                    (false, _) => 0,
                    (true, true) => running,
                    (true, false) => running.max(1),
                }}}))
    .into_response()
}

#[derive(Deserialize)]
pub(super) struct SubmitBody {
    #[serde(default)]
    create_queue: Option<bool>,
    tasks: HashMap<String, Vec<String>>,
    #[serde(default)]
    task_group_id: Option<String>,
    #[serde(default)]
    result_serializers: Vec<String>,
    #[serde(default)]
    user_runtime: Option<Value>,
    #[serde(flatten)]
    _rest: HashMap<String, Value>,
}

/// `UserRuntime`'s fields (SDK 4.19 `sdk/batch.py`, `create_user_runtime`).
const USER_RUNTIME: [&str; 5] = [
    "globus_compute_sdk_version",
    "globus_sdk_version",
    "python_version",
    "python",
    "platform",
];

fn semantically_invalid(message: &str) -> Response {
    (
        StatusCode::UNPROCESSABLE_ENTITY,
        Json(json!({"code": "SEMANTICALLY_INVALID", "message": format!("Request payload failed validation: {message}")})),
    )
        .into_response()
}

pub(super) async fn submit(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(ep): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    s.compute.stats.submit.fetch_add(1, Ordering::Relaxed);
    if let Some(r) = refusal(&s, &headers).await {
        return r;
    }
    if body.len() > 10 * 1024 * 1024 {
        return (
            StatusCode::PAYLOAD_TOO_LARGE,
            Json(json!({"code": "TASK_PAYLOAD_TOO_LARGE", "message": "Task payload too large"})),
        )
            .into_response();
    }
    if let Ok(v) = serde_json::from_slice::<Value>(&body) {
        s.compute.stats.submit_bodies.lock().unwrap().push(v);
    }
    let Ok(req) = serde_json::from_slice::<SubmitBody>(&body) else {
        return semantically_invalid("the body is not a v3 submit document");
    };
    if req.create_queue.is_none() {
        return semantically_invalid("create_queue is required");
    }
    if !s.compute.seed.endpoints.iter().any(|e| e.id == ep) {
        return globus_error(StatusCode::NOT_FOUND, "Endpoint not found");
    }
    if let Some(rt) = &req.user_runtime {
        if let Some(k) = USER_RUNTIME.iter().find(|k| rt.get(**k).is_none()) {
            return semantically_invalid(&format!("user_runtime.{k}: field required"));
        }
    }
    let json_results = req
        .result_serializers
        .iter()
        .any(|r| r.ends_with("JSONData"));
    let group = match req.task_group_id {
        Some(g) if !s.compute.groups.lock().unwrap().contains(&g) => {
            return (
                StatusCode::NOT_FOUND,
                Json(json!({"code": "TASK_GROUP_NOT_FOUND",
                            "message": format!("Task Group {g} not found")})),
            )
                .into_response();
        }
        Some(g) => g,
        None => {
            let g = crate::compute::uuid();
            s.compute.groups.lock().unwrap().insert(g.clone());
            g
        }
    };
    let mut ids: HashMap<String, Vec<String>> = HashMap::new();
    for (fid, payloads) in req.tasks {
        let Some(kind) = s
            .compute
            .seed
            .functions
            .iter()
            .find(|f| f.id == fid)
            .map(|f| f.kind.clone())
        else {
            return semantically_invalid(&format!("Function {fid} not found"));
        };
        for payload in payloads {
            s.compute
                .stats
                .payloads
                .lock()
                .unwrap()
                .push(payload.clone());
            let id = crate::compute::uuid();
            let task = Task {
                id: id.clone(),
                group: group.clone(),
                status: "waiting-for-ep",
                result: None,
                exception: None,
                completed: None,
                created: now_f(),
            };
            s.compute.tasks.lock().unwrap().insert(id.clone(), task);
            tokio::spawn(run_task(
                s.clone(),
                ep.clone(),
                kind.clone(),
                id.clone(),
                payload,
                json_results,
            ));
            ids.entry(fid.clone()).or_default().push(id);
        }
    }
    Json(
        json!({"request_id": crate::compute::uuid(), "task_group_id": group, "endpoint_id": ep,
                "tasks": ids}),
    )
    .into_response()
}

pub(super) async fn task(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(tid): Path<String>,
) -> Response {
    s.compute.stats.task.fetch_add(1, Ordering::Relaxed);
    if let Some(r) = refusal(&s, &headers).await {
        return r;
    }
    match s.compute.tasks.lock().unwrap().get(&tid) {
        Some(t) => Json(t.doc()).into_response(),
        None => globus_error(StatusCode::NOT_FOUND, "Task not found"),
    }
}

pub(super) async fn batch_status(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    s.compute.stats.batch_status.fetch_add(1, Ordering::Relaxed);
    if let Some(r) = refusal(&s, &headers).await {
        return r;
    }
    let tasks = s.compute.tasks.lock().unwrap();
    let results: serde_json::Map<String, Value> = body["task_ids"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|id| id.as_str())
        .filter_map(|id| tasks.get(id).map(|t| (id.to_string(), t.doc())))
        .collect();
    Json(json!({"response": "batch", "results": results})).into_response()
}

pub(super) async fn taskgroup(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(group): Path<String>,
) -> Response {
    s.compute.stats.taskgroup.fetch_add(1, Ordering::Relaxed);
    if let Some(r) = refusal(&s, &headers).await {
        return r;
    }
    let tasks = s.compute.tasks.lock().unwrap();
    let list: Vec<Value> = tasks
        .values()
        .filter(|t| t.group == group)
        .map(|t| json!({"id": t.id, "created_at": t.created.to_string()}))
        .collect();
    Json(json!({"taskgroup_id": group, "create_websockets_queue": false, "tasks": list}))
        .into_response()
}

fn finish(s: &Shared, id: &str, outcome: Result<Value, String>, json_results: bool) {
    let mut tasks = s.compute.tasks.lock().unwrap();
    let Some(t) = tasks.get_mut(id) else { return };
    t.completed = Some(now_f());
    match outcome {
        Ok(v) if json_results => {
            t.status = "success";
            t.result = Some(format!("11\n{}", python_json(&v)));
        }
        Ok(_) => {
            t.status = "failed";
            t.exception = Some("globus_compute_sdk.errors.error_types.SerializationError: All strategies failed (the stand-in only returns JSONData)".into());
        }
        Err(e) => {
            t.status = "failed";
            t.exception = Some(e);
        }
    }
}

fn traceback(last: &str) -> String {
    format!("Traceback (most recent call last):\n  File \"/compute/function.py\", line 1, in <module>\n{last}")
}

/// One task on the simulated endpoint.
async fn run_task(
    s: Arc<Shared>,
    ep: String,
    kind: String,
    id: String,
    payload: String,
    json_results: bool,
) {
    // An offline endpoint holds its tasks.
    while !s.compute.online(&ep) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if let Some(t) = s.compute.tasks.lock().unwrap().get_mut(&id) {
        t.status = "running";
    }
    // Lost workers hit inference tasks (the long-running ones).
    let lost = kind == "inference"
        && s.compute
            .faults
            .lose_workers
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
    if lost {
        let e = traceback("parsl.executors.high_throughput.errors.WorkerLost: Task failure due to loss of worker 0 on host sim-node-01");
        return finish(&s, &id, Err(e), json_results);
    }
    let raw = if kind == "inference" {
        s.compute.faults.raw_results.lock().unwrap().pop_front()
    } else {
        None
    };
    if let Some(raw) = raw {
        let mut tasks = s.compute.tasks.lock().unwrap();
        if let Some(t) = tasks.get_mut(&id) {
            t.completed = Some(now_f());
            t.status = "success";
            t.result = Some(raw);
        }
        return;
    }
    let args = match parse_payload(&payload) {
        Ok(a) => a,
        Err(e) => {
            let e = traceback(&format!("globus_compute_sdk.errors.error_types.DeserializationError: Deserialization failed: {e}"));
            return finish(&s, &id, Err(e), json_results);
        }
    };
    let arg = args.first().cloned().unwrap_or(Value::Null);
    let outcome = match kind.as_str() {
        "inference" => {
            s.compute
                .stats
                .tasks_inference
                .fetch_add(1, Ordering::Relaxed);
            inference(&s, arg).await
        }
        "status" => {
            s.compute.stats.tasks_status.fetch_add(1, Ordering::Relaxed);
            // `json_output = json.dumps(output, indent=4); return json_output`: a string.
            Ok(Value::String(python_json(&s.compute.jobs_by_status())))
        }
        "start" => {
            s.compute.stats.tasks_start.fetch_add(1, Ordering::Relaxed);
            start_jobs(&s, &arg)
        }
        "stop" => {
            s.compute.stats.tasks_stop.fetch_add(1, Ordering::Relaxed);
            let job = arg["job_id"].as_str().unwrap_or_default();
            if s.compute.end_job(job) {
                Ok(json!({"stopped": job}))
            } else {
                Err(traceback(&format!("ValueError: no job {job}")))
            }
        }
        "batch" => {
            while s.compute.faults.hold_batches.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            batch::run(&s, &arg).await
        }
        "echo" => Ok(arg),
        other => Err(traceback(&format!(
            "RuntimeError: unknown built-in function kind {other}"
        ))),
    };
    finish(&s, &id, outcome, json_results);
}

/// `[args, kwargs]` from a packed JSONData payload.
fn parse_payload(payload: &str) -> Result<Vec<Value>, String> {
    let parts = unpack(payload).map_err(|e| e.to_string())?;
    let [args, kwargs] = parts[..] else {
        return Err(format!(
            "expected 2 buffers (args, kwargs), got {}",
            parts.len()
        ));
    };
    let decode = |b: &str| -> Result<Value, String> {
        let body = b
            .strip_prefix("11\n")
            .ok_or("only JSONData (11) buffers are allowed")?;
        serde_json::from_str(body).map_err(|e| e.to_string())
    };
    let args = decode(args)?;
    decode(kwargs)?;
    args.as_array()
        .cloned()
        .ok_or_else(|| "args must be a list".into())
}

/// What FIRST's inference function needs in `model_params` to stream (`streaming_server_protocol`
/// is optional, `https` by default).
const STREAMING_PARAMS: [&str; 4] = [
    "streaming_server_host",
    "streaming_server_port",
    "stream_task_id",
    "stream_task_token",
];

/// FIRST's `vllm_inference_function`, against a running instance of the model.
async fn inference(s: &Shared, arg: Value) -> Result<Value, String> {
    let mut params = arg["model_params"].clone();
    let Some(p) = params.as_object_mut() else {
        return Err(traceback("KeyError: 'model_params'"));
    };
    let started = Instant::now();
    let Some(endpoint) = p
        .remove("openai_endpoint")
        .and_then(|v| v.as_str().map(str::to_owned))
    else {
        return Err(traceback(
            "Exception: Missing required parameter: 'model_params.openai_endpoint'",
        ));
    };
    if p.remove("api_port").is_none() {
        return Err(traceback(
            "Exception: Missing required parameter: 'model_params.api_port'",
        ));
    }
    // As FIRST's function: a stream is relayed to the gateway's streaming routes, which needs
    // their address and the task's credentials.
    let streamed = p.get("stream").and_then(Value::as_bool) == Some(true);
    if streamed {
        let missing: Vec<&str> = STREAMING_PARAMS
            .into_iter()
            .filter(|k| !p.contains_key(*k))
            .collect();
        if !missing.is_empty() {
            return Err(traceback(&format!(
                "Exception: Unexpected error of type Exception: Streaming requires the \
                 following parameters: {}\nResponse time: {}",
                missing.join(", "),
                started.elapsed().as_secs_f64()
            )));
        }
    }
    let model = p
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    // The task runs once an instance of the model is up (as on a node whose job started).
    let addr = loop {
        if let Some(a) = s.compute.running_instances(&model).first() {
            break *a;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let url = format!("http://{addr}/v1/{endpoint}");
    if streamed {
        return streaming::stream_back(s, url, p.clone()).await;
    }
    let resp = post_to_instance(s, url, &params).await?;
    let status = resp.status().as_u16();
    let headers: Vec<String> = resp
        .headers()
        .iter()
        .map(|(k, v)| format!("'{k}': '{}'", v.to_str().unwrap_or_default()))
        .collect();
    let text = resp.text().await.unwrap_or_default();
    if status != 200 {
        return Err(traceback(&format!(
            "Exception: Unexpected error of type Exception: API request failed with status \
             code: {status}\nResponse text: {text}\nResponse headers: {{{}}}\nResponse time: {}",
            headers.join(", "),
            started.elapsed().as_secs_f64()
        )));
    }
    let mut completion: Value =
        serde_json::from_str(&text).map_err(|e| traceback(&format!("JSONDecodeError: {e}")))?;
    let dt = started.elapsed().as_secs_f64();
    let total = completion["usage"]["total_tokens"].as_f64().unwrap_or(0.0);
    completion["response_time"] = json!(dt);
    completion["throughput_tokens_per_second"] = json!(if dt > 0.0 { total / dt } else { 0.0 });
    // FIRST returns json.dumps(...): a string holding the JSON.
    Ok(Value::String(python_json(&completion)))
}

/// Sends the request to the model's instance, as FIRST's function does with `requests.post`.
async fn post_to_instance(
    s: &Shared,
    url: String,
    params: &impl serde::Serialize,
) -> Result<reqwest::Response, String> {
    s.compute
        .http
        .post(url)
        .json(params)
        .send()
        .await
        .map_err(|e| traceback(&format!("requests.exceptions.ConnectionError: {e}")))
}

/// One job of `model` at `api_port`, as the start function would queue it.
pub(super) fn start_job(s: &Arc<Shared>, model: &str, api_port: u16) -> Value {
    start_jobs(
        s,
        &json!({"model": model, "count": 1, "api_port": api_port}),
    )
    .unwrap_or_else(|e| json!(e))
}

/// Queues `count` jobs of a model; each leaves the queue after `queue_wait`, launches a
/// simulated vLLM, and reports healthy after `load_time`.
fn start_jobs(s: &Arc<Shared>, arg: &Value) -> Result<Value, String> {
    let model = arg["model"]
        .as_str()
        .ok_or_else(|| traceback("KeyError: 'model'"))?
        .to_string();
    let count = arg["count"].as_u64().unwrap_or(1);
    let walltime = Duration::from_secs(arg["walltime"].as_u64().unwrap_or(86_400));
    let api_port = arg["api_port"].as_u64().unwrap_or(8000) as u16;
    let mut started = Vec::new();
    for _ in 0..count {
        let job_id = format!(
            "{}.sim-pbs",
            s.compute.next_job.fetch_add(1, Ordering::Relaxed)
        );
        s.compute.jobs.lock().unwrap().push(Job {
            id: job_id.clone(),
            node: std::net::Ipv4Addr::LOCALHOST.into(),
            api_port,
            model: model.clone(),
            framework: arg["framework"].as_str().unwrap_or("vllm").to_string(),
            cluster: arg["cluster"].as_str().unwrap_or_default().to_string(),
            submitted: Instant::now(),
            walltime,
            sim: None,
            started: None,
            ready: false,
        });
        tokio::spawn(launch(s.clone(), job_id.clone(), model.clone()));
        started.push(job_id);
    }
    Ok(json!({"job_ids": started}))
}

async fn launch(s: Arc<Shared>, job_id: String, model: String) {
    let seed = &s.compute.seed;
    tokio::time::sleep(seed.queue_wait).await;
    let mut cfg = VllmSimConfig {
        name: format!("job {job_id}"),
        ttft: seed.ttft,
        itl: seed.itl,
        ..VllmSimConfig::default()
    };
    if model.to_lowercase().contains("embed") {
        cfg.embedding_models.push(model.clone());
    } else {
        cfg.models.push(model.clone());
    }
    let port = {
        let jobs = s.compute.jobs.lock().unwrap();
        match jobs.iter().find(|j| j.id == job_id) {
            Some(j) => j.api_port,
            None => return, // stopped while queued
        }
    };
    let Some(sim) = on_a_node(cfg, port).await else {
        log::error!("job {job_id}: no loopback address free for a simulated node at port {port}");
        return;
    };
    sim.faults().unhealthy.store(true, Ordering::SeqCst);
    {
        let mut jobs = s.compute.jobs.lock().unwrap();
        match jobs.iter_mut().find(|j| j.id == job_id) {
            Some(j) => {
                j.node = sim.addr().ip();
                j.started = Some(Instant::now());
                j.sim = Some(sim);
            }
            None => return, // stopped while queued
        }
    }
    tokio::time::sleep(seed.load_time).await;
    let walltime = {
        let mut jobs = s.compute.jobs.lock().unwrap();
        let Some(j) = jobs.iter_mut().find(|j| j.id == job_id) else {
            return;
        };
        j.ready = true;
        if let Some(sim) = &j.sim {
            sim.faults().unhealthy.store(false, Ordering::SeqCst);
        }
        j.walltime.saturating_sub(j.submitted.elapsed())
    };
    // The scheduler ends the job when its walltime runs out.
    tokio::time::sleep(walltime).await;
    s.compute.end_job(&job_id);
}

/// A simulated vLLM on a node of its own: a random loopback address (Linux routes all of
/// 127.0.0.0/8 to `lo`) at the model's `api_port`, as every node runs vLLM at the same port.
async fn on_a_node(cfg: VllmSimConfig, port: u16) -> Option<VllmSim> {
    for _ in 0..32 {
        let ip = std::net::Ipv4Addr::new(
            127,
            fastrand::u8(1..=254),
            fastrand::u8(..),
            fastrand::u8(1..=254),
        );
        if let Ok(sim) =
            VllmSim::start(std::net::SocketAddr::new(ip.into(), port), cfg.clone()).await
        {
            return Some(sim);
        }
    }
    None
}
