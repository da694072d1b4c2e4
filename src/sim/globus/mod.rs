//! A Globus Auth and Groups stand-in that speaks the real wire formats
//! (`shared/reference/globus-api.md` §1–3, §6): token introspection, the client-credentials and
//! dependent-token grants, and Groups `my_groups`, on one port (their paths do not overlap).
//! Test-control routes live under `/_fake/`: call counts, fault knobs, and adding tokens.

mod auth;
mod compute;
mod groups;
mod seed;

pub use compute::{
    ComputeFaults, ComputeSeed, ComputeSim, ComputeStats, FakeEndpoint, FakeFunction,
};
pub use seed::{FakeClient, FakeGroup, FakeUser, Seed};

use super::Listening;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Calls per route.
#[derive(Debug, Default)]
pub struct GlobusStats {
    pub introspect: AtomicU64,
    pub client_credentials: AtomicU64,
    pub dependent_token: AtomicU64,
    pub my_groups: AtomicU64,
}

impl GlobusStats {
    pub fn snapshot(&self) -> Value {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        json!({
            "introspect": g(&self.introspect),
            "client_credentials": g(&self.client_credentials),
            "dependent_token": g(&self.dependent_token),
            "my_groups": g(&self.my_groups),
        })
    }
}

/// Misbehaviour on demand, for every Globus route (also `POST /_fake/faults`).
#[derive(Debug, Default)]
pub struct GlobusFaults {
    /// Added before every answer.
    pub latency_ms: AtomicU64,
    /// When non-zero, calls fail with this status (429 carries `Retry-After`).
    pub fail_status: AtomicU16,
    /// How many calls still fail; `u32::MAX` means all of them.
    pub fail_remaining: AtomicU32,
    /// `Retry-After` seconds sent with 429 and 503.
    pub retry_after_secs: AtomicU32,
}

impl GlobusFaults {
    /// Fails the next `count` calls (`None`: every call) with `status`.
    pub fn fail(&self, status: u16, count: Option<u32>) {
        self.fail_remaining
            .store(count.unwrap_or(u32::MAX), Ordering::SeqCst);
        self.fail_status.store(status, Ordering::SeqCst);
    }

    /// Stops failing.
    pub fn heal(&self) {
        self.fail_status.store(0, Ordering::SeqCst);
    }

    fn snapshot(&self) -> Value {
        let remaining = self.fail_remaining.load(Ordering::Relaxed);
        json!({
            "latency_ms": self.latency_ms.load(Ordering::Relaxed),
            "fail_status": self.fail_status.load(Ordering::Relaxed),
            "fail_count": (remaining != u32::MAX).then_some(remaining),
            "retry_after": self.retry_after_secs.load(Ordering::Relaxed),
        })
    }

    /// Whether this call should fail, consuming one failure.
    fn take(&self) -> Option<u16> {
        let status = self.fail_status.load(Ordering::SeqCst);
        if status == 0 {
            return None;
        }
        self.fail_remaining
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| match n {
                0 => None,
                u32::MAX => Some(u32::MAX),
                n => Some(n - 1),
            })
            .ok()
            .map(|_| status)
    }
}

/// What a token stands for.
#[derive(Debug, Clone)]
enum Grant {
    /// A user's access token for the gateway.
    User(Arc<FakeUser>),
    /// A Groups token obtained by the dependent-token grant for this user.
    Groups(Arc<FakeUser>),
    /// A client-credentials token.
    Client {
        client_id: String,
        scope: String,
        resource_server: String,
    },
}

#[derive(Debug, Clone)]
struct TokenRecord {
    grant: Grant,
    /// Unix time of expiry.
    exp: i64,
}

struct Shared {
    seed: Seed,
    compute: ComputeSim,
    tokens: RwLock<HashMap<String, TokenRecord>>,
    stats: GlobusStats,
    faults: GlobusFaults,
    started: i64,
}

impl Shared {
    /// Registers a user's token; `expires_in` counts from `issued_at` (Unix seconds).
    fn add_user(&self, user: FakeUser, issued_at: i64) {
        let record = TokenRecord {
            exp: issued_at + user.expires_in,
            grant: Grant::User(Arc::new(user.clone())),
        };
        self.tokens.write().unwrap().insert(user.token, record);
    }

    fn token(&self, token: &str) -> Option<TokenRecord> {
        self.tokens.read().unwrap().get(token).cloned()
    }

    /// The default scope and audience: the first client's.
    fn default_client(&self) -> &str {
        self.seed.clients.first().map_or("", |c| c.id.as_str())
    }

    /// Sleeps the added latency, then answers a failure if one is due.
    async fn fault(&self) -> Option<Response> {
        let latency = self.faults.latency_ms.load(Ordering::Relaxed);
        if latency > 0 {
            tokio::time::sleep(Duration::from_millis(latency)).await;
        }
        let status = self.faults.take()?;
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut resp = globus_error(status, "simulated failure");
        if matches!(status.as_u16(), 429 | 503) {
            let secs = self.faults.retry_after_secs.load(Ordering::Relaxed);
            resp.headers_mut()
                .insert("retry-after", HeaderValue::from(secs));
        }
        Some(resp)
    }
}

/// Globus's generic error envelope (JSON:API `errors` plus OAuth `error`).
fn globus_error(status: StatusCode, detail: &str) -> Response {
    let code = status
        .canonical_reason()
        .unwrap_or("error")
        .to_uppercase()
        .replace(' ', "_");
    let body = json!({
        "errors": [{"status": status.as_u16().to_string(), "id": format!("{:032x}", fastrand::u128(..)),
                    "code": code, "detail": detail, "title": status.canonical_reason()}],
        "error": code.to_lowercase(),
        "error_description": detail,
    });
    (status, Json(body)).into_response()
}

/// A running stand-in. Dropping it stops it.
pub struct GlobusSim {
    shared: Arc<Shared>,
    listening: Listening,
}

impl GlobusSim {
    /// Binds `addr` (port 0 picks one) and serves the seeded users until dropped.
    pub async fn start(addr: SocketAddr, seed: Seed) -> std::io::Result<GlobusSim> {
        let users = seed.users.clone();
        let shared = Arc::new(Shared {
            compute: ComputeSim::new(seed.compute.clone()),
            seed,
            tokens: RwLock::new(HashMap::new()),
            stats: GlobusStats::default(),
            faults: GlobusFaults::default(),
            started: unix_now(),
        });
        for user in users {
            shared.add_user(user, shared.started);
        }
        let listening = Listening::bind(addr, router(shared.clone())).await?;
        Ok(GlobusSim { shared, listening })
    }

    pub fn addr(&self) -> SocketAddr {
        self.listening.addr()
    }

    /// The base URL to configure as both `auth_url` and `groups_url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    pub fn stats(&self) -> &GlobusStats {
        &self.shared.stats
    }

    pub fn faults(&self) -> &GlobusFaults {
        &self.shared.faults
    }

    /// The Compute service and its simulated facility.
    pub fn compute(&self) -> &ComputeSim {
        &self.shared.compute
    }

    /// Starts a job of `model` on the simulated facility (as an operator's `qsub` would),
    /// outside any gateway's lifecycle; its vLLM listens at `api_port` on its node.
    pub fn start_job(&self, model: &str, api_port: u16) -> serde_json::Value {
        compute::start_job(&self.shared, model, api_port)
    }

    /// Adds (or replaces) a user's token; `expires_in` counts from now.
    pub fn add_user(&self, user: FakeUser) {
        self.shared.add_user(user, unix_now());
    }

    /// Refuses connections, as an unreachable Globus.
    pub async fn stop_listening(&mut self) {
        self.listening.stop().await;
    }

    pub async fn resume_listening(&mut self) -> std::io::Result<()> {
        self.listening.resume().await
    }
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v2/oauth2/token/introspect", post(auth::introspect))
        .route("/v2/oauth2/token", post(auth::token))
        .route("/v2/groups/my_groups", get(groups::my_groups))
        .route(
            "/_fake/stats",
            get(|State(s): State<Arc<Shared>>| async move { Json(s.stats.snapshot()) }),
        )
        .route("/_fake/faults", get(get_faults).post(set_faults))
        .route("/_fake/tokens", post(add_token))
        .route("/v2/version", get(compute::version))
        .route("/v2/endpoints/{ep}/status", get(compute::endpoint_status))
        .route("/v3/endpoints/{ep}/submit", post(compute::submit))
        .route("/v2/tasks/{tid}", get(compute::task))
        .route("/v2/batch_status", post(compute::batch_status))
        .route("/v2/taskgroup/{tg}", get(compute::taskgroup))
        .route(
            "/_fake/compute",
            get(compute_state).post(set_compute_faults),
        )
        .fallback(|| async { globus_error(StatusCode::NOT_FOUND, "No such route") })
        .with_state(shared)
}

/// Compute call counts and the simulated facility's jobs.
async fn compute_state(State(s): State<Arc<Shared>>) -> Json<Value> {
    Json(json!({"stats": s.compute.stats.snapshot(), "jobs": s.compute.jobs_by_status()}))
}

/// `{"offline": ["<endpoint>"], "lose_workers": 1, "rate_limit": true}`.
async fn set_compute_faults(State(s): State<Arc<Shared>>, Json(v): Json<Value>) -> Json<Value> {
    let f = &s.compute.faults;
    if let Some(list) = v["offline"].as_array() {
        *f.offline.lock().unwrap() = list
            .iter()
            .filter_map(|e| e.as_str().map(str::to_owned))
            .collect();
    }
    if let Some(n) = v["lose_workers"].as_u64() {
        f.lose_workers.store(n as u32, Ordering::SeqCst);
    }
    if let Some(b) = v["rate_limit"].as_bool() {
        f.rate_limit.store(b, Ordering::SeqCst);
    }
    compute_state(State(s)).await
}

async fn get_faults(State(s): State<Arc<Shared>>) -> Json<Value> {
    Json(s.faults.snapshot())
}

/// `{"latency_ms": 100, "fail_status": 503, "fail_count": 2, "retry_after": 1}`; a
/// `fail_status` of 0 heals, a missing `fail_count` fails every call.
async fn set_faults(State(s): State<Arc<Shared>>, Json(v): Json<Value>) -> Json<Value> {
    if let Some(ms) = v["latency_ms"].as_u64() {
        s.faults.latency_ms.store(ms, Ordering::SeqCst);
    }
    if let Some(secs) = v["retry_after"].as_u64() {
        s.faults
            .retry_after_secs
            .store(secs as u32, Ordering::SeqCst);
    }
    if let Some(status) = v["fail_status"].as_u64() {
        let count = v["fail_count"].as_u64().map(|n| n as u32);
        s.faults.fail(status as u16, count);
    }
    Json(s.faults.snapshot())
}

/// Adds a user token at run time (the body is one `users:` entry of the seed file).
async fn add_token(State(s): State<Arc<Shared>>, Json(user): Json<FakeUser>) -> StatusCode {
    s.add_user(user, unix_now());
    StatusCode::CREATED
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}
