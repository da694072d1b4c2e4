//! A simulated vLLM OpenAI-compatible server (`vllm serve`), faithful on the wire: the same
//! routes, JSON shapes, SSE framing, error bodies and `--api-key` behaviour, with generated
//! text (`tok0 tok1 …`) instead of a model. Tests and the demo drive it; the counters and fault
//! knobs let a test observe what reached the backend and make it misbehave.

mod messages;
pub mod prefix_cache;
mod responses;

use super::listener::Listening;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use futures_util::StreamExt as _;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// What a simulated server serves and how fast it "generates".
#[derive(Debug, Clone)]
pub struct VllmSimConfig {
    /// Shown in logs only.
    pub name: String,
    /// Generative models (chat and completions).
    pub models: Vec<String>,
    /// Embedding models (`/v1/embeddings` only).
    pub embedding_models: Vec<String>,
    /// Like `vllm serve --api-key`: requests to `/v1/*` must carry `Bearer <key>`.
    pub api_key: Option<String>,
    /// Time to the first token.
    pub ttft: Duration,
    /// Time between tokens.
    pub itl: Duration,
    /// Tokens generated when the request sets no `max_tokens`.
    pub default_max_tokens: u32,
    /// Context length reported by `/v1/models` and enforced on `max_tokens`.
    pub max_model_len: u32,
    /// Length of the generated embedding vectors.
    pub embedding_dim: usize,
    /// Serve HTTPS with this configuration (it may require client certificates).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Prefill time per prompt token not found in the prefix cache, added to `ttft`: a prompt
    /// whose start is cached answers sooner. Prefills are computed one after another (the
    /// GPU's compute is shared), so a prefill waits for those before it, and the requests
    /// waiting are reported as `vllm:num_requests_waiting`.
    pub prefill_per_token: Duration,
    /// KV-cache blocks (16 tokens each) the prefix cache holds (0: no prefix caching).
    pub prefix_cache_blocks: usize,
    /// How long a kept-alive connection may wait for its next request before the server closes
    /// it: vLLM's uvicorn closes it after `VLLM_HTTP_TIMEOUT_KEEP_ALIVE`, 5 s by default, so a
    /// proxy that pools connections must let them go sooner or meet closed ones.
    pub keep_alive: Duration,
}

/// vLLM's `VLLM_HTTP_TIMEOUT_KEEP_ALIVE` default (uvicorn's `timeout_keep_alive`).
const VLLM_KEEP_ALIVE: Duration = Duration::from_secs(5);

impl Default for VllmSimConfig {
    fn default() -> Self {
        VllmSimConfig {
            name: "vllm-sim".into(),
            models: Vec::new(),
            embedding_models: Vec::new(),
            api_key: None,
            ttft: Duration::ZERO,
            itl: Duration::ZERO,
            default_max_tokens: 16,
            max_model_len: 8192,
            embedding_dim: 16,
            tls: None,
            prefill_per_token: Duration::ZERO,
            prefix_cache_blocks: 4096,
            keep_alive: VLLM_KEEP_ALIVE,
        }
    }
}

/// What reached the simulator. All counters only grow, except `running`.
#[derive(Debug, Default)]
pub struct SimStats {
    /// Inference requests (`POST /v1/...`), valid or not.
    pub requests: AtomicU64,
    pub chat_requests: AtomicU64,
    pub completion_requests: AtomicU64,
    pub embedding_requests: AtomicU64,
    pub responses_requests: AtomicU64,
    /// `/v1/messages` and `/v1/messages/count_tokens`.
    pub messages_requests: AtomicU64,
    pub streams_started: AtomicU64,
    pub streams_completed: AtomicU64,
    /// Streams whose client went away before the last chunk.
    pub streams_cancelled: AtomicU64,
    /// Generations in progress now.
    pub running: AtomicU64,
    pub health_checks: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub generation_tokens: AtomicU64,
    /// Prompt tokens looked up in the prefix cache, and found there.
    pub prefix_cache_queries: AtomicU64,
    pub prefix_cache_hits: AtomicU64,
    /// KV-cache blocks held by the generations running now.
    pub kv_blocks_in_use: AtomicU64,
}

impl SimStats {
    /// The counters as JSON (served at `GET /_sim/stats`).
    pub fn snapshot(&self) -> Value {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        json!({
            "requests": g(&self.requests),
            "chat_requests": g(&self.chat_requests),
            "completion_requests": g(&self.completion_requests),
            "embedding_requests": g(&self.embedding_requests),
            "responses_requests": g(&self.responses_requests),
            "messages_requests": g(&self.messages_requests),
            "streams_started": g(&self.streams_started),
            "streams_completed": g(&self.streams_completed),
            "streams_cancelled": g(&self.streams_cancelled),
            "running": g(&self.running),
            "health_checks": g(&self.health_checks),
            "prompt_tokens": g(&self.prompt_tokens),
            "generation_tokens": g(&self.generation_tokens),
            "prefix_cache_queries": g(&self.prefix_cache_queries),
            "prefix_cache_hits": g(&self.prefix_cache_hits),
        })
    }
}

/// Misbehaviour on demand (also settable with `POST /_sim/faults`).
#[derive(Debug, Default)]
pub struct SimFaults {
    /// When non-zero, inference requests fail with this status and a vLLM error body.
    pub fail_status: AtomicU16,
    /// When non-zero, streams break off (connection reset) after this many chunks.
    pub close_after_chunks: AtomicU32,
    /// `GET /health` answers 503, as vLLM does when its engine died.
    pub unhealthy: AtomicBool,
    /// When non-zero, streams stop sending (and keep the connection open) after this many
    /// chunks, and JSON answers never come: a backend that hangs.
    pub stall_after_chunks: AtomicU32,
    /// How SSE lines end: 0 LF (vLLM's own), 1 CRLF, 2 CR (all allowed by the SSE
    /// specification; some servers and proxies use them).
    pub sse_line_ends: AtomicU8,
    /// When non-zero, a stream sends one event of this many bytes before its blank line (a
    /// stream that never lets a reader find an event's end), then ends normally.
    pub oversized_event_bytes: AtomicU64,
    /// Requests `/metrics` reports waiting in the scheduler's queue (`vllm:num_requests_waiting`),
    /// as a server past its batch capacity does.
    pub reported_waiting: AtomicU64,
    /// `/metrics` answers 500 (a scrape that fails).
    pub metrics_down: AtomicBool,
}

impl SimFaults {
    /// The line end SSE events are written with.
    fn line_end(&self) -> &'static str {
        match self.sse_line_ends.load(Ordering::Relaxed) {
            1 => "\r\n",
            2 => "\r",
            _ => "\n",
        }
    }
}

impl SimFaults {
    fn snapshot(&self) -> Value {
        json!({
            "fail_status": self.fail_status.load(Ordering::Relaxed),
            "close_after_chunks": self.close_after_chunks.load(Ordering::Relaxed),
            "unhealthy": self.unhealthy.load(Ordering::Relaxed),
            "stall_after_chunks": self.stall_after_chunks.load(Ordering::Relaxed),
            "sse_line_ends": self.sse_line_ends.load(Ordering::Relaxed),
            "oversized_event_bytes": self.oversized_event_bytes.load(Ordering::Relaxed),
            "reported_waiting": self.reported_waiting.load(Ordering::Relaxed),
            "metrics_down": self.metrics_down.load(Ordering::Relaxed),
        })
    }
}

struct Shared {
    cfg: VllmSimConfig,
    stats: SimStats,
    faults: SimFaults,
    last_request: Mutex<Option<(HeaderMap, Bytes)>>,
    started: u64,
    prefix_cache: Mutex<prefix_cache::PrefixCache>,
    prefill_queue: Mutex<PrefillQueue>,
}

/// The instance's prefills, computed one after another. vLLM schedules prefills under a token
/// budget per step and a step's time grows with the tokens it computes, so on one GPU the
/// prefill work of concurrent requests adds up: a request whose prompt must be computed waits
/// for the prefills admitted before it, and so does a cached one behind it.
#[derive(Debug, Default)]
struct PrefillQueue {
    /// When the last admitted prefill ends.
    busy_until: Option<Instant>,
    /// When each prefill not yet started starts, oldest first: vLLM's waiting requests.
    starts: VecDeque<Instant>,
}

impl PrefillQueue {
    /// Admits a prefill of `work`; returns how long until it is done.
    fn admit(&mut self, now: Instant, work: Duration) -> Duration {
        let start = self.busy_until.map_or(now, |b| b.max(now));
        if start > now {
            self.starts.push_back(start);
        }
        let end = start + work;
        self.busy_until = Some(end);
        end - now
    }

    /// Requests whose prefill has not started at `now`.
    fn waiting(&mut self, now: Instant) -> u64 {
        while self.starts.front().is_some_and(|s| *s <= now) {
            self.starts.pop_front();
        }
        self.starts.len() as u64
    }
}

/// A running simulator. Dropping it stops it.
pub struct VllmSim {
    shared: Arc<Shared>,
    listening: Listening,
}

impl VllmSim {
    /// Binds `addr` (port 0 picks one) and serves until dropped.
    pub async fn start(addr: SocketAddr, cfg: VllmSimConfig) -> std::io::Result<VllmSim> {
        let shared = Arc::new(Shared {
            stats: SimStats::default(),
            faults: SimFaults::default(),
            last_request: Mutex::new(None),
            started: unix_now(),
            prefix_cache: Mutex::new(prefix_cache::PrefixCache::new(cfg.prefix_cache_blocks)),
            prefill_queue: Mutex::default(),
            cfg,
        });
        let (tls, keep_alive) = (shared.cfg.tls.clone(), shared.cfg.keep_alive);
        let listening =
            Listening::bind_with(addr, router(shared.clone()), tls, Some(keep_alive)).await?;
        Ok(VllmSim { shared, listening })
    }

    pub fn addr(&self) -> SocketAddr {
        self.listening.addr()
    }

    pub fn stats(&self) -> &SimStats {
        &self.shared.stats
    }

    pub fn faults(&self) -> &SimFaults {
        &self.shared.faults
    }

    /// Client connections open now.
    pub fn connections(&self) -> u64 {
        self.listening.connections()
    }

    /// The body of the last inference request, byte for byte.
    pub fn last_request_body(&self) -> Option<Bytes> {
        let last = self.shared.last_request.lock().unwrap();
        last.as_ref().map(|(_, b)| b.clone())
    }

    /// The headers of the last inference request.
    pub fn last_request_headers(&self) -> Option<HeaderMap> {
        let last = self.shared.last_request.lock().unwrap();
        last.as_ref().map(|(h, _)| h.clone())
    }

    /// Refuses new connections and closes idle ones, as a node that went down; requests in
    /// flight finish.
    pub async fn stop_listening(&mut self) {
        self.listening.stop().await;
    }

    /// Listens again on the same address.
    pub async fn resume_listening(&mut self) -> std::io::Result<()> {
        self.listening.resume().await
    }

    /// Stops listening and closes idle connections.
    pub async fn shutdown(mut self) {
        self.stop_listening().await;
    }
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route(
            "/version",
            get(|| async { Json(json!({"version": "0.11.0-sim"})) }),
        )
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/responses", post(responses::responses))
        .route("/v1/messages", post(messages::messages))
        .route("/v1/messages/count_tokens", post(messages::count_tokens))
        .route(
            "/_sim/stats",
            get(|State(s): State<Arc<Shared>>| async move { Json(s.stats.snapshot()) }),
        )
        .route("/_sim/faults", get(get_faults).post(set_faults))
        .fallback(|| async {
            Refusal::Error {
                status: StatusCode::NOT_FOUND,
                kind: "NotFoundError",
                message: "Not Found".into(),
                param: None,
            }
        })
        .with_state(shared)
}

async fn health(State(s): State<Arc<Shared>>) -> StatusCode {
    s.stats.health_checks.fetch_add(1, Ordering::Relaxed);
    if s.faults.unhealthy.load(Ordering::Relaxed) {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    }
}

/// vLLM's own Prometheus series that routers read, in the shape vLLM 0.11 serves them
/// (`reference/vllm-transcripts/metrics-excerpt.txt`: `# HELP`/`# TYPE` lines, `engine` and
/// `model_name` labels, counters named `..._total`, values as floats).
async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    if s.faults.metrics_down.load(Ordering::Relaxed) {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    let g = |c: &AtomicU64| c.load(Ordering::Relaxed) as f64;
    let queued = s.prefill_queue.lock().unwrap().waiting(Instant::now());
    let running = s
        .stats
        .running
        .load(Ordering::Relaxed)
        .saturating_sub(queued) as f64;
    let waiting = (queued + s.faults.reported_waiting.load(Ordering::Relaxed)) as f64;
    let capacity = s.cfg.prefix_cache_blocks.max(1) as f64;
    let kv = (g(&s.stats.kv_blocks_in_use) / capacity).min(1.0);
    let series: [(&str, &str, &str, f64); 7] = [
        (
            "vllm:num_requests_running",
            "gauge",
            "Number of requests in model execution batches.",
            running,
        ),
        (
            "vllm:num_requests_waiting",
            "gauge",
            "Number of requests waiting to be processed.",
            waiting,
        ),
        (
            "vllm:kv_cache_usage_perc",
            "gauge",
            "KV-cache usage. 1 means 100 percent usage.",
            kv,
        ),
        (
            "vllm:prefix_cache_queries_total",
            "counter",
            "Prefix cache queries, in terms of number of queried tokens.",
            g(&s.stats.prefix_cache_queries),
        ),
        (
            "vllm:prefix_cache_hits_total",
            "counter",
            "Prefix cache hits, in terms of number of cached tokens.",
            g(&s.stats.prefix_cache_hits),
        ),
        (
            "vllm:prompt_tokens_total",
            "counter",
            "Number of prefill tokens processed.",
            g(&s.stats.prompt_tokens),
        ),
        (
            "vllm:generation_tokens_total",
            "counter",
            "Number of generation tokens processed.",
            g(&s.stats.generation_tokens),
        ),
    ];
    let mut out = String::new();
    for (name, kind, help, value) in series {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for model in s.cfg.models.iter().chain(&s.cfg.embedding_models) {
            out.push_str(&format!(
                "{name}{{engine=\"0\",model_name=\"{model}\"}} {value:?}\n"
            ));
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
        .into_response()
}

async fn models(State(s): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if let Err(r) = check_key(&s, &headers) {
        return r.into_response();
    }
    let data: Vec<Value> = s
        .cfg
        .models
        .iter()
        .chain(&s.cfg.embedding_models)
        .map(|id| {
            json!({
                "id": id, "object": "model", "created": s.started, "owned_by": "vllm",
                "root": id, "parent": null, "max_model_len": s.cfg.max_model_len,
            })
        })
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

async fn get_faults(State(s): State<Arc<Shared>>) -> Json<Value> {
    Json(s.faults.snapshot())
}

async fn set_faults(State(s): State<Arc<Shared>>, Json(v): Json<Value>) -> Json<Value> {
    if let Some(n) = v["fail_status"].as_u64() {
        s.faults.fail_status.store(n as u16, Ordering::Relaxed);
    }
    if let Some(n) = v["close_after_chunks"].as_u64() {
        s.faults
            .close_after_chunks
            .store(n as u32, Ordering::Relaxed);
    }
    if let Some(b) = v["unhealthy"].as_bool() {
        s.faults.unhealthy.store(b, Ordering::Relaxed);
    }
    if let Some(n) = v["stall_after_chunks"].as_u64() {
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        s.faults.stall_after_chunks.store(n, Ordering::Relaxed);
    }
    if let Some(n) = v["sse_line_ends"].as_u64() {
        s.faults
            .sse_line_ends
            .store(n.min(2) as u8, Ordering::Relaxed);
    }
    if let Some(n) = v["oversized_event_bytes"].as_u64() {
        s.faults.oversized_event_bytes.store(n, Ordering::Relaxed);
    }
    if let Some(n) = v["reported_waiting"].as_u64() {
        s.faults.reported_waiting.store(n, Ordering::Relaxed);
    }
    if let Some(b) = v["metrics_down"].as_bool() {
        s.faults.metrics_down.store(b, Ordering::Relaxed);
    }
    Json(s.faults.snapshot())
}

/// Why the simulator refuses a request, answered as vLLM would.
enum Refusal {
    /// A missing or wrong `--api-key`: vLLM's bare `{"error": "Unauthorized"}`.
    Unauthorized,
    /// vLLM's `ErrorResponse` body, as served since v0.10.
    Error {
        status: StatusCode,
        kind: &'static str,
        message: String,
        param: Option<&'static str>,
    },
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self {
            Refusal::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                Json(json!({"error": "Unauthorized"})),
            )
                .into_response(),
            Refusal::Error {
                status,
                kind,
                message,
                param,
            } => {
                let body = json!({"error": {
                    "message": message, "type": kind, "param": param, "code": status.as_u16(),
                }});
                (status, Json(body)).into_response()
            }
        }
    }
}

fn bad_request(message: impl Into<String>) -> Refusal {
    Refusal::Error {
        status: StatusCode::BAD_REQUEST,
        kind: "BadRequestError",
        message: message.into(),
        param: None,
    }
}

fn check_key(s: &Shared, headers: &HeaderMap) -> Result<(), Refusal> {
    let Some(key) = &s.cfg.api_key else {
        return Ok(());
    };
    // vLLM takes the key as a bearer token, or (Anthropic clients) as `x-api-key`.
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()));
    if given == Some(key.as_str()) {
        Ok(())
    } else {
        Err(Refusal::Unauthorized)
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Api {
    Chat,
    Completions,
    Embeddings,
    Responses,
    Messages,
}

/// Everything common to the three inference routes, up to a validated request.
struct Accepted {
    body: Value,
    model: String,
    prompt_tokens: u64,
    /// Time to the first token: the configured `ttft` plus the prefill of the prompt tokens
    /// the prefix cache did not hold, after the prefills admitted before it.
    ttft: Duration,
    /// KV-cache blocks the prompt occupies while it runs.
    blocks: u64,
}

fn accept(s: &Shared, api: Api, headers: HeaderMap, raw: Bytes) -> Result<Accepted, Refusal> {
    s.stats.requests.fetch_add(1, Ordering::Relaxed);
    let counter = match api {
        Api::Chat => &s.stats.chat_requests,
        Api::Completions => &s.stats.completion_requests,
        Api::Embeddings => &s.stats.embedding_requests,
        Api::Responses => &s.stats.responses_requests,
        Api::Messages => &s.stats.messages_requests,
    };
    counter.fetch_add(1, Ordering::Relaxed);
    *s.last_request.lock().unwrap() = Some((headers.clone(), raw.clone()));
    check_key(s, &headers)?;
    let fail = s.faults.fail_status.load(Ordering::Relaxed);
    if fail != 0 {
        let status = StatusCode::from_u16(fail).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let kind = if status.is_client_error() {
            "BadRequestError"
        } else {
            "InternalServerError"
        };
        return Err(Refusal::Error {
            status,
            kind,
            message: "simulated failure".into(),
            param: None,
        });
    }
    let body: Value =
        serde_json::from_slice(&raw).map_err(|e| bad_request(format!("JSON decode error: {e}")))?;
    let Some(model) = body["model"].as_str().map(str::to_owned) else {
        return Err(bad_request("Field required: model"));
    };
    // vLLM's request validator (`validate_stream_options`).
    if !body["stream_options"].is_null() && body["stream"].as_bool() != Some(true) {
        return Err(bad_request(
            "Stream options can only be defined when `stream=True`.",
        ));
    }
    let generative = s.cfg.models.contains(&model);
    let embedding = s.cfg.embedding_models.contains(&model);
    if !generative && !embedding {
        return Err(Refusal::Error {
            status: StatusCode::NOT_FOUND,
            kind: "NotFoundError",
            message: format!("The model `{model}` does not exist."),
            param: Some("model"),
        });
    }
    let text = match api {
        Api::Chat if generative => chat_text(&body["messages"])
            .ok_or_else(|| bad_request("Field required: messages (a list of messages)"))?,
        Api::Completions if generative => {
            input_text(&body["prompt"]).ok_or_else(|| bad_request("Field required: prompt"))?
        }
        Api::Embeddings if embedding => {
            input_text(&body["input"]).ok_or_else(|| bad_request("Field required: input"))?
        }
        Api::Responses if generative => match &body["input"] {
            Value::String(t) => t.clone(),
            Value::Array(items) if items.iter().all(Value::is_object) => {
                chat_text(&body["input"]).unwrap_or_default()
            }
            _ => return Err(bad_request("Field required: input")),
        },
        Api::Messages if generative => {
            let system = match &body["system"] {
                Value::String(t) => t.clone(),
                blocks => chat_text(&json!([{"content": blocks}])).unwrap_or_default(),
            };
            let messages = chat_text(&body["messages"])
                .ok_or_else(|| bad_request("Field required: messages (a list of messages)"))?;
            format!("{system} {messages}")
        }
        Api::Messages => return Err(bad_request("The model does not support Messages API")),
        Api::Embeddings => return Err(bad_request("The model does not support Embeddings API")),
        Api::Responses => return Err(bad_request("The model does not support Responses API")),
        Api::Chat => {
            return Err(bad_request(
                "The model does not support Chat Completions API",
            ))
        }
        Api::Completions => return Err(bad_request("The model does not support Completions API")),
    };
    let prompt_tokens = text.split_whitespace().count() as u64;
    s.stats
        .prompt_tokens
        .fetch_add(prompt_tokens, Ordering::Relaxed);
    let mut ttft = s.cfg.ttft;
    if api != Api::Embeddings {
        let cached = s
            .prefix_cache
            .lock()
            .unwrap()
            .lookup_and_insert(text.split_whitespace()) as u64;
        s.stats
            .prefix_cache_queries
            .fetch_add(prompt_tokens, Ordering::Relaxed);
        s.stats
            .prefix_cache_hits
            .fetch_add(cached, Ordering::Relaxed);
        let uncached = u32::try_from(prompt_tokens - cached).unwrap_or(u32::MAX);
        let work = s.cfg.prefill_per_token * uncached;
        if !work.is_zero() {
            ttft += s.prefill_queue.lock().unwrap().admit(Instant::now(), work);
        }
    }
    Ok(Accepted {
        body,
        model,
        prompt_tokens,
        ttft,
        blocks: prompt_tokens.div_ceil(prefix_cache::BLOCK_TOKENS as u64),
    })
}

fn chat_text(messages: &Value) -> Option<String> {
    let mut out = String::new();
    for m in messages.as_array()? {
        match &m["content"] {
            Value::String(t) => out.push_str(t),
            Value::Array(parts) => {
                for p in parts {
                    out.push_str(p["text"].as_str().unwrap_or_default());
                    out.push(' ');
                }
            }
            _ => {}
        }
        out.push(' ');
    }
    Some(out)
}

fn input_text(v: &Value) -> Option<String> {
    match v {
        Value::String(t) => Some(t.clone()),
        Value::Array(items) => Some(
            items
                .iter()
                .map(|i| i.as_str().unwrap_or("t"))
                .collect::<Vec<_>>()
                .join(" "),
        ),
        _ => None,
    }
}

/// How many tokens to generate, and whether that ends the answer on `length` or `stop`.
fn token_budget(s: &Shared, body: &Value) -> Result<(u32, &'static str), Refusal> {
    let requested = ["max_completion_tokens", "max_tokens", "max_output_tokens"]
        .iter()
        .find_map(|f| body.get(*f).filter(|v| !v.is_null()));
    match requested {
        None => Ok((s.cfg.default_max_tokens, "stop")),
        Some(v) => match v.as_i64() {
            Some(n) if n >= 1 && n <= i64::from(s.cfg.max_model_len) => Ok((n as u32, "length")),
            Some(n) if n >= 1 => Err(bad_request(format!(
                "This model's maximum context length is {} tokens. However, you requested {n} \
                 tokens. Please reduce the length of the input messages.",
                s.cfg.max_model_len
            ))),
            Some(n) => Err(bad_request(format!(
                "max_tokens must be at least 1, got {n}."
            ))),
            None => Err(bad_request("max_tokens: Input should be a valid integer")),
        },
    }
}

fn usage(prompt: u64, completion: u64) -> Value {
    json!({
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "completion_tokens": completion,
        "prompt_tokens_details": null,
    })
}

async fn chat(State(s): State<Arc<Shared>>, headers: HeaderMap, raw: Bytes) -> Response {
    generate(s, Api::Chat, headers, raw).await
}

async fn completions(State(s): State<Arc<Shared>>, headers: HeaderMap, raw: Bytes) -> Response {
    generate(s, Api::Completions, headers, raw).await
}

async fn generate(s: Arc<Shared>, api: Api, headers: HeaderMap, raw: Bytes) -> Response {
    let req = match accept(&s, api, headers, raw) {
        Ok(r) => r,
        Err(r) => return r.into_response(),
    };
    let (tokens, finish) = match token_budget(&s, &req.body) {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    let id = format!(
        "{}-{:032x}",
        if api == Api::Chat { "chatcmpl" } else { "cmpl" },
        fastrand::u128(..)
    );
    if req.body["stream"].as_bool() == Some(true) {
        let include_usage = req.body["stream_options"]["include_usage"].as_bool() == Some(true);
        return stream(s, api, id, req, tokens, finish, include_usage);
    }

    let _running = Running::new(&s, req.blocks);
    if s.faults.stall_after_chunks.load(Ordering::Relaxed) != 0 {
        std::future::pending::<()>().await;
    }
    tokio::time::sleep(req.ttft + s.cfg.itl * tokens.saturating_sub(1)).await;
    s.stats
        .generation_tokens
        .fetch_add(u64::from(tokens), Ordering::Relaxed);
    let text: String = (0..tokens).map(|i| format!("tok{i} ")).collect();
    let created = unix_now();
    let choice = match api {
        Api::Chat => json!({
            "index": 0,
            "message": {"role": "assistant", "reasoning_content": null, "content": text, "tool_calls": []},
            "logprobs": null, "finish_reason": finish, "stop_reason": null,
        }),
        _ => json!({
            "index": 0, "text": text, "logprobs": null, "finish_reason": finish,
            "stop_reason": null, "prompt_logprobs": null,
        }),
    };
    let object = if api == Api::Chat {
        "chat.completion"
    } else {
        "text_completion"
    };
    Json(json!({
        "id": id, "object": object, "created": created, "model": req.model,
        "choices": [choice], "usage": usage(req.prompt_tokens, u64::from(tokens)),
        "prompt_logprobs": null, "kv_transfer_params": null,
    }))
    .into_response()
}

/// Counts a generation as running, holding its prompt's KV-cache blocks, for as long as it
/// lives.
struct Running(Arc<Shared>, u64);

impl Running {
    fn new(s: &Arc<Shared>, blocks: u64) -> Running {
        s.stats.running.fetch_add(1, Ordering::Relaxed);
        s.stats
            .kv_blocks_in_use
            .fetch_add(blocks, Ordering::Relaxed);
        Running(s.clone(), blocks)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.stats.running.fetch_sub(1, Ordering::Relaxed);
        self.0
            .stats
            .kv_blocks_in_use
            .fetch_sub(self.1, Ordering::Relaxed);
    }
}

/// State of one SSE stream; dropped early (client gone) it counts as cancelled.
struct StreamState {
    s: Arc<Shared>,
    api: Api,
    id: String,
    model: String,
    created: u64,
    prompt_tokens: u64,
    tokens: u32,
    finish: &'static str,
    include_usage: bool,
    /// Time to the first token (after the prefill of the uncached prompt).
    ttft: Duration,
    /// Chunks sent so far (the role chunk of a chat counts as one).
    sent: u32,
    /// Tokens generated so far.
    next: u32,
    usage_sent: bool,
    done: bool,
    _running: Running,
}

impl Drop for StreamState {
    fn drop(&mut self) {
        let counter = if self.done {
            &self.s.stats.streams_completed
        } else {
            &self.s.stats.streams_cancelled
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

impl StreamState {
    fn chunk(&self, choices: Value, usage: Value) -> String {
        let object = if self.api == Api::Chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        let mut v = json!({
            "id": self.id, "object": object, "created": self.created, "model": self.model,
            "choices": choices,
        });
        if !usage.is_null() {
            v["usage"] = usage;
        }
        let end = self.s.faults.line_end();
        format!("data: {v}{end}{end}")
    }

    fn choice(&self, text: &str, finish: Option<&str>, first: bool) -> Value {
        match self.api {
            Api::Chat => {
                let delta = if first {
                    json!({"role": "assistant", "content": text})
                } else {
                    json!({"content": text})
                };
                json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}])
            }
            _ => json!([{
                "index": 0, "text": text, "logprobs": null, "finish_reason": finish,
                "stop_reason": null,
            }]),
        }
    }

    /// The next SSE event, or `None` when the stream is over.
    async fn next_event(&mut self) -> Option<Result<Bytes, std::io::Error>> {
        let limit = self.s.faults.close_after_chunks.load(Ordering::Relaxed);
        if limit != 0 && self.sent >= limit && !self.done {
            return Some(Err(std::io::Error::other("simulated crash mid-stream")));
        }
        let stall = self.s.faults.stall_after_chunks.load(Ordering::Relaxed);
        if stall != 0 && self.sent >= stall && !self.done {
            std::future::pending::<()>().await;
        }
        let event = if self.api == Api::Chat && self.sent == 0 {
            // vLLM opens a chat stream with the assistant role and empty content.
            self.chunk(self.choice("", None, true), Value::Null)
        } else if self.next < self.tokens {
            let delay = if self.next == 0 {
                self.ttft
            } else {
                self.s.cfg.itl
            };
            tokio::time::sleep(delay).await;
            let i = self.next;
            self.next += 1;
            self.s
                .stats
                .generation_tokens
                .fetch_add(1, Ordering::Relaxed);
            let finish = (self.next == self.tokens).then_some(self.finish);
            self.chunk(self.choice(&format!("tok{i} "), finish, false), Value::Null)
        } else if self.include_usage && !self.usage_sent {
            // `stream_options.include_usage`: one last chunk with no choices and the usage.
            self.usage_sent = true;
            self.chunk(json!([]), usage(self.prompt_tokens, u64::from(self.tokens)))
        } else if !self.done {
            self.done = true;
            let end = self.s.faults.line_end();
            format!("data: [DONE]{end}{end}")
        } else {
            return None;
        };
        self.sent += 1;
        Some(Ok(Bytes::from(event)))
    }
}

/// A stream whose first event is `size` bytes long before its blank line: `data: ` and then
/// `x`s in 64 KiB pieces, then the blank line and `[DONE]`.
fn oversized_stream(mut state: StreamState, size: u64) -> Response {
    const PIECE: u64 = 64 * 1024;
    let pieces = size.div_ceil(PIECE);
    let head = futures_util::stream::once(async { Ok(Bytes::from_static(b"data: ")) });
    let body = futures_util::stream::iter((0..pieces).map(move |i| {
        let n = PIECE.min(size - i * PIECE) as usize;
        Ok::<_, std::io::Error>(Bytes::from(vec![b'x'; n]))
    }));
    state.done = true;
    let tail = futures_util::stream::once(async move {
        let _done = state;
        Ok(Bytes::from_static(b"\n\ndata: [DONE]\n\n"))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream; charset=utf-8")
        .body(Body::from_stream(head.chain(body).chain(tail)))
        .expect("a valid response")
}

fn stream(
    s: Arc<Shared>,
    api: Api,
    id: String,
    req: Accepted,
    tokens: u32,
    finish: &'static str,
    include_usage: bool,
) -> Response {
    s.stats.streams_started.fetch_add(1, Ordering::Relaxed);
    let state = StreamState {
        _running: Running::new(&s, req.blocks),
        ttft: req.ttft,
        s,
        api,
        id,
        model: req.model,
        created: unix_now(),
        prompt_tokens: req.prompt_tokens,
        tokens,
        finish,
        include_usage,
        sent: 0,
        next: 0,
        usage_sent: false,
        done: false,
    };
    let oversized = state.s.faults.oversized_event_bytes.load(Ordering::Relaxed);
    if oversized > 0 {
        return oversized_stream(state, oversized);
    }
    let body = futures_util::stream::unfold(state, |mut st| async move {
        st.next_event().await.map(|ev| (ev, st))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream; charset=utf-8")
        .body(Body::from_stream(body))
        .expect("a valid response")
}

async fn embeddings(State(s): State<Arc<Shared>>, headers: HeaderMap, raw: Bytes) -> Response {
    let req = match accept(&s, Api::Embeddings, headers, raw) {
        Ok(r) => r,
        Err(r) => return r.into_response(),
    };
    let inputs: Vec<String> = match &req.body["input"] {
        Value::Array(items) => items.iter().map(|i| i.to_string()).collect(),
        other => vec![other.to_string()],
    };
    let base64 = req.body["encoding_format"].as_str() == Some("base64");
    let _running = Running::new(&s, 0);
    tokio::time::sleep(s.cfg.ttft).await;
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, text)| {
            let vector = embed(text, s.cfg.embedding_dim);
            let embedding = if base64 {
                let bytes: Vec<u8> = vector.iter().flat_map(|f| f.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(vector)
            };
            json!({"index": i, "object": "embedding", "embedding": embedding})
        })
        .collect();
    Json(json!({
        "id": format!("embd-{:032x}", fastrand::u128(..)),
        "object": "list", "created": unix_now(), "model": req.model, "data": data,
        "usage": {"prompt_tokens": req.prompt_tokens, "total_tokens": req.prompt_tokens,
                  "completion_tokens": 0, "prompt_tokens_details": null},
    }))
    .into_response()
}

/// A deterministic unit vector derived from the text, so equal inputs embed equally.
fn embed(text: &str, dim: usize) -> Vec<f32> {
    let mut rng = fastrand::Rng::with_seed(text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    }));
    let v: Vec<f32> = (0..dim).map(|_| rng.f32() - 0.5).collect();
    let norm = v
        .iter()
        .map(|x| x * x)
        .sum::<f32>()
        .sqrt()
        .max(f32::EPSILON);
    v.into_iter().map(|x| x / norm).collect()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::PrefillQueue;
    use std::time::{Duration, Instant};

    #[test]
    fn prefills_wait_for_those_admitted_before_them() {
        let mut q = PrefillQueue::default();
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        assert_eq!(q.admit(t0, ms(200)), ms(200), "an idle GPU starts at once");
        assert_eq!(q.admit(t0, ms(10)), ms(210), "behind the first");
        assert_eq!(q.admit(t0 + ms(5), ms(10)), ms(215));
        assert_eq!(q.waiting(t0 + ms(5)), 2);
        assert_eq!(q.waiting(t0 + ms(200)), 1, "the second has started");
        assert_eq!(q.waiting(t0 + ms(210)), 0);
        // Idle again: no wait.
        assert_eq!(q.admit(t0 + ms(300), ms(10)), ms(10));
        assert_eq!(q.waiting(t0 + ms(300)), 0);
    }
}
