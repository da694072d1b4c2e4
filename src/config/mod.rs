//! The gateway's YAML configuration: the types below *are* the documentation of the file
//! (`conf/gateway.yaml` is the commented example). `load` parses and validates once; the rest
//! of the code trusts what it returns. Errors name the file, the line (when it can be found),
//! the field and what is wrong, so `firstgate check` can point an operator at the mistake.

mod auth;
mod backend;
mod error;

pub use auth::{
    AccessList, AccessRules, AuthConfig, AuthMode, GlobusAuthConfig, JwtConfig, TokenCacheConfig,
};
pub use backend::{BackendAddr, Scheme};
pub use error::ConfigError;

use crate::openai::Endpoint;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where clients connect (the OpenAI-compatible API). Default `127.0.0.1:8080`.
    #[serde(default = "defaults::listen")]
    pub listen: SocketAddr,
    /// Health and Prometheus metrics. Default `127.0.0.1:9090`; keep it off the public network.
    #[serde(default = "defaults::admin_listen")]
    pub admin_listen: SocketAddr,
    /// Protection of the admin listener's routes that change state.
    #[serde(default)]
    pub admin: Admin,
    /// An HTTPS listener (HTTP/2 and HTTP/1.1 by ALPN) next to the plain one.
    #[serde(default)]
    pub tls: Option<TlsListener>,
    /// What the gateway does at the facility edge, in place of nginx.
    #[serde(default)]
    pub edge: Edge,
    /// Process management: the graceful-upgrade socket and the pid file.
    #[serde(default)]
    pub server: ServerProcess,
    /// Worker threads of the proxy service (Pingora defaults to 1; we default to the core count).
    #[serde(default)]
    pub threads: Option<usize>,
    /// How clients authenticate and who may use the gateway. Required: write `mode: none`
    /// explicitly to accept any token (local development).
    pub auth: AuthConfig,
    /// Request limits.
    #[serde(default)]
    pub limits: Limits,
    /// Defaults for every backend; a model may override each field.
    #[serde(default)]
    pub upstream: UpstreamDefaults,
    /// Active health checking of backends.
    #[serde(default)]
    pub health_check: HealthCheck,
    /// Shutdown behaviour.
    #[serde(default)]
    pub shutdown: Shutdown,
    /// Clusters by name, e.g. `sophia`, `metis`. The name appears in FIRST's URL layout
    /// `/resource_server/{cluster}/{framework}/v1/...`.
    #[serde(default)]
    pub policies: PolicyFiles,
    #[serde(default)]
    pub usage: UsageConfig,
    /// State shared by several replicas of the gateway (Redis); without it each process keeps
    /// its own limits and token cache.
    #[serde(default)]
    pub state: SharedStateConfig,
    #[serde(default)]
    pub access_log: AccessLog,
    /// The application log's format.
    #[serde(default)]
    pub log: Log,
    /// Trace export.
    #[serde(default)]
    pub tracing: Tracing,
    /// Globus Compute, for cold models and the clusters' instance lifecycle.
    #[serde(default)]
    pub compute: Option<ComputeConfig>,
    /// The OpenAI Files and Batch APIs (`/v1/files`, `/v1/batches`); off without it.
    #[serde(default)]
    pub batch: Option<BatchConfig>,
    #[serde(default)]
    pub clusters: BTreeMap<String, Cluster>,
}

/// The OpenAI Batch API: uploaded files and batches kept under `dir`, lines run through this
/// gateway on hot instances, behind interactive traffic.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    /// Where files and the batch database live (relative to this file's directory). With
    /// `usage.store` in PostgreSQL the batch state is kept there too, and `dir` must be storage
    /// every replica mounts at the same path.
    pub dir: PathBuf,
    /// Largest file a user may upload. Default 100 MiB.
    #[serde(default = "defaults::batch_max_file_bytes")]
    pub max_file_bytes: usize,
    /// Most lines in one input file. Default 50,000.
    #[serde(default = "defaults::batch_max_lines")]
    pub max_lines: usize,
    /// Batches one user may have unfinished at once (FIRST's `MAX_BATCHES_PER_USER`, whose
    /// default is 1). Default 1.
    #[serde(default = "defaults::batch_max_active_per_user")]
    pub max_active_per_user: usize,
    /// Lines of one user's batches running at once. Default 4.
    #[serde(default = "defaults::batch_lines_in_flight_per_user")]
    pub lines_in_flight_per_user: usize,
    /// How long files (uploads and results) are kept. Default 30 days.
    #[serde(default = "defaults::batch_retention", with = "humantime_serde")]
    pub retention: Duration,
    /// A directory the gateway and the compute nodes share (the same path on both): where a
    /// batch the route policy's `batch(job)` sends to Globus Compute gets its input file and
    /// results. Without it every batch runs in the gateway.
    #[serde(default)]
    pub staging_dir: Option<PathBuf>,
    /// With the state in PostgreSQL: how long the replica running batches holds its lease
    /// without renewing it (it renews every third of this). Another replica resumes the
    /// batches this long after the runner died. Default 30 s.
    #[serde(default = "defaults::batch_lease", with = "humantime_serde")]
    pub lease: Duration,
}

/// Request limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest request body accepted, in bytes (413 above). Default 20 MiB, as FIRST's nginx.
    pub max_body_bytes: usize,
    /// Requests per second per user (0: no limit). Default 10, as FIRST.
    pub requests_per_second: u32,
    /// Requests per second per client address, on every route (0: no limit). Default 50.
    pub ip_requests_per_second: u32,
    /// Requests one address may send at once above its rate (nginx's `limit_req burst`).
    /// Default 100.
    pub ip_burst: u32,
    /// The window of the token limits (`tokens_per_minute*` of models). Default 1 minute.
    #[serde(with = "humantime_serde")]
    pub token_window: Duration,
    /// Completion tokens a request that sets no `max_tokens` is assumed to use when it reserves
    /// against a token limit (its real usage replaces the estimate when it ends). Default 512.
    pub default_max_tokens: u64,
    /// Inference requests one user may have in flight at once, so that one user's long streams
    /// cannot hold every backend slot (0: no limit). Default 128.
    pub max_concurrent_per_user: u32,
    /// Usernames the per-user limits (requests per second, requests in flight, a model's
    /// tokens per minute per user) do not apply to: operators' load tests.
    pub exempt_users: Vec<String>,
    /// Globus group ids whose members the per-user limits do not apply to.
    pub exempt_groups: Vec<String>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 20 * 1024 * 1024,
            requests_per_second: 10,
            ip_requests_per_second: 50,
            ip_burst: 100,
            token_window: Duration::from_secs(60),
            default_max_tokens: 512,
            max_concurrent_per_user: 128,
            exempt_users: Vec::new(),
            exempt_groups: Vec::new(),
        }
    }
}

/// The HTTPS listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsListener {
    /// Address of the HTTPS listener, e.g. `0.0.0.0:8443`.
    pub listen: SocketAddr,
    /// PEM certificate chain (leaf first). Re-read when it or the key changes, and on SIGHUP.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1). Re-read with the certificate.
    pub key: PathBuf,
    /// Offer HTTP/2 by ALPN. Default true.
    #[serde(default = "defaults::yes")]
    pub http2: bool,
}

/// Edge behaviour that nginx gave FIRST: who the client is, what it may hold, and how long it
/// may stall. Each key names the nginx directive it replaces (`deploy/MIGRATING-FROM-NGINX.md`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Edge {
    /// Addresses or CIDR blocks of proxies in front of the gateway. Only from these are
    /// `X-Forwarded-For` and `X-Forwarded-Proto` believed; from anyone else they are replaced.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Largest request head (request line and headers) accepted, in bytes (431 above); also the
    /// HTTP/2 header-list limit (nginx `large_client_header_buffers`).
    pub max_header_bytes: usize,
    /// Longest time a whole request head may take to arrive: counted from the connection's
    /// start (after TLS) for its first request, from the first byte for later ones, and for
    /// every HTTP/2 stream's header block. Total time, not per read (nginx
    /// `client_header_timeout`). Longer: 408 and the connection is closed. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub client_header_timeout: Duration,
    /// Longest time a TLS handshake may take. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub tls_handshake_timeout: Duration,
    /// Longest wait for a single read of a request body (nginx `client_body_timeout`): a slow
    /// upload that stalls longer gets 408. Default 60 s.
    #[serde(with = "humantime_serde")]
    pub client_read_timeout: Duration,
    /// Longest wait for a single write to a client: a client that stops reading a stream is
    /// dropped after it (nginx `send_timeout`). Gaps between tokens do not count. Default 60 s.
    #[serde(with = "humantime_serde")]
    pub client_write_timeout: Duration,
    /// How long an idle client connection is kept open between requests, for HTTP/1.1 and
    /// HTTP/2 on both listeners (nginx `keepalive_timeout`). Default 75 s.
    #[serde(with = "humantime_serde")]
    pub keepalive_timeout: Duration,
    /// Streams one HTTP/2 connection may have open at once (nginx
    /// `http2_max_concurrent_streams`). Default 100.
    pub http2_max_concurrent_streams: u32,
    /// Client connections served at once on the API listeners (the admin listener does not
    /// count). Beyond it new connections wait in the listen backlog until one closes (nginx
    /// `worker_connections`). Default: what the descriptor limit allows, two descriptors per
    /// proxied connection after a reserve (see the README).
    pub max_connections: Option<usize>,
    /// Connections one client address may hold at once; more are closed as they are accepted
    /// (nginx `limit_conn`). Trusted proxies are exempt. 0 (the default) turns it off.
    pub max_connections_per_ip: usize,
    /// While this file exists every API request is answered 503; its text, if any, is the
    /// message (FIRST's nginx `maintenance_on` switch). Relative to this file's directory.
    pub maintenance_file: Option<PathBuf>,
    /// Clusters under maintenance and the message their requests get (FIRST's
    /// `MAINTENANCE_ERROR_NOTICES`). Re-read on SIGHUP.
    pub maintenance: BTreeMap<String, String>,
    /// Which web pages may call the API from a browser (CORS).
    pub cors: CorsConfig,
}

/// Cross-origin requests from browsers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CorsConfig {
    /// Origins (`https://host[:port]`) whose pages may call the API; `*` (the default, as FIRST
    /// and OpenAI answer) for any; an empty list turns CORS off (preflights then get 405).
    pub allowed_origins: Vec<String>,
    /// How long a browser may cache a preflight's answer (`Access-Control-Max-Age`). Default 1 h.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
}

impl Default for CorsConfig {
    fn default() -> Self {
        CorsConfig {
            allowed_origins: vec!["*".into()],
            max_age: Duration::from_secs(3600),
        }
    }
}

impl Default for Edge {
    fn default() -> Self {
        Edge {
            trusted_proxies: Vec::new(),
            max_header_bytes: 32 * 1024,
            client_header_timeout: Duration::from_secs(30),
            tls_handshake_timeout: Duration::from_secs(10),
            client_read_timeout: Duration::from_secs(60),
            client_write_timeout: Duration::from_secs(60),
            keepalive_timeout: Duration::from_secs(75),
            http2_max_concurrent_streams: 100,
            max_connections: None,
            max_connections_per_ip: 0,
            maintenance_file: None,
            maintenance: BTreeMap::new(),
            cors: CorsConfig::default(),
        }
    }
}

/// The admin listener's protection.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Admin {
    /// Environment variable holding a bearer token that the admin routes which change state
    /// (`/drain`, `/maintenance`, `/reload`) then require. Reads stay open to the listener's
    /// own names. Without it those routes rely on the listener being private. An empty
    /// variable refuses to start, as an unset one does.
    pub token_env: Option<String>,
    /// Host names (or addresses) operators use to reach the admin listener, besides its own
    /// address, the address a connection arrived on, `localhost`, `127.0.0.1` and `[::1]`.
    /// Requests addressed to any other name are refused (DNS rebinding), except `/health`,
    /// `/ready` and `/metrics`.
    pub allowed_hosts: Vec<String>,
}

/// Process management.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerProcess {
    /// Unix socket over which a new process (`serve --upgrade`) takes the listening sockets
    /// from the running one (on SIGQUIT). Both must agree on it.
    pub upgrade_sock: PathBuf,
    /// Written with `serve --daemon`.
    pub pid_file: PathBuf,
}

impl Default for ServerProcess {
    fn default() -> Self {
        ServerProcess {
            upgrade_sock: PathBuf::from("/tmp/firstgate-upgrade.sock"),
            pid_file: PathBuf::from("/tmp/firstgate.pid"),
        }
    }
}

/// Where usage records go.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UsageConfig {
    /// A SQLite file (relative to this file's directory), or a PostgreSQL database
    /// (`postgres://user@host:5432/db`, shared by replicas); `null` keeps no records.
    pub store: Option<UsageStore>,
    /// Environment variable holding the PostgreSQL password (a password is never written in
    /// `store`), e.g. `PGPASSWORD`.
    pub password_env: Option<String>,
    /// With PostgreSQL, how often the per-user totals (`/resource_server/usage`) are read back
    /// from the store, so that they include other replicas' requests.
    #[serde(with = "humantime_serde")]
    pub refresh_interval: Duration,
    /// Records waiting to be written; beyond it they are dropped (and counted).
    pub queue: usize,
    /// Records per transaction.
    pub batch: usize,
    /// Longest a record waits before its batch is committed (the crash window).
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
    /// How long raw records (one row per request) are kept; older ones are deleted in small
    /// batches by the writer, their hours staying in the hourly rollups (`usage_hourly`),
    /// which `firstgate usage`, the operator page and `/resource_server/usage` read beyond it.
    /// `0` keeps every record. Default `90d`.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// How long hourly rollups are kept; unset (the default) keeps them for good.
    #[serde(with = "humantime_serde")]
    pub rollup_retention: Option<Duration>,
}

impl Default for UsageConfig {
    fn default() -> Self {
        UsageConfig {
            store: Some(UsageStore::File(PathBuf::from("firstgate-usage.db"))),
            password_env: None,
            refresh_interval: Duration::from_secs(10),
            queue: 100_000,
            batch: 512,
            flush_interval: Duration::from_millis(200),
            retention: Duration::from_secs(90 * 24 * 3600),
            rollup_retention: None,
        }
    }
}

/// Where usage records are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UsageStore {
    /// A SQLite file, for one process.
    File(PathBuf),
    /// A PostgreSQL URL without a password, for replicas.
    Postgres(String),
}

impl UsageStore {
    /// The SQLite file, if the store is one.
    pub fn file(&self) -> Option<&Path> {
        match self {
            UsageStore::File(p) => Some(p),
            UsageStore::Postgres(_) => None,
        }
    }
}

impl<'de> Deserialize<'de> for UsageStore {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(
            if s.starts_with("postgres://") || s.starts_with("postgresql://") {
                UsageStore::Postgres(s)
            } else {
                UsageStore::File(PathBuf::from(s))
            },
        )
    }
}

/// State shared by replicas.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SharedStateConfig {
    /// Redis for the rate limits (requests per second, requests in flight, tokens per minute)
    /// and the token verdicts of every replica.
    pub redis: Option<RedisConfig>,
}

/// The Redis the replicas share.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://host:6379/0` (no password in it: see `password_env`).
    pub url: String,
    /// Environment variable holding Redis's password (`requirepass` or an ACL user's).
    #[serde(default)]
    pub password_env: Option<String>,
    /// What the limits do when Redis cannot answer: `open` (the default) serves and counts in
    /// this process meanwhile; `closed` refuses with 503. Authentication never fails open: a
    /// token is then verified with the identity provider.
    #[serde(default)]
    pub on_error: OnRedisError,
    /// Longest wait for one Redis call before it counts as failed. Default 50 ms.
    #[serde(default = "defaults::redis_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Prefix of every key, so that several gateways can share one Redis. Default `firstgate:`.
    #[serde(default = "defaults::redis_prefix")]
    pub prefix: String,
    /// Share token verdicts too (keyed by the token's SHA-256), so that a new replica does not
    /// verify every active token again. Default true.
    #[serde(default = "defaults::yes")]
    pub auth_verdicts: bool,
    /// How long a request-in-flight slot outlives its replica (a replica renews its slots while
    /// it holds them; a replica killed without a goodbye leaks them this long). Default 30 s.
    #[serde(default = "defaults::redis_slot_ttl", with = "humantime_serde")]
    pub slot_ttl: Duration,
}

/// What the limits do while Redis cannot answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnRedisError {
    /// Serve, counting in this process (each replica then allows the full limit).
    #[default]
    Open,
    /// Refuse the requests that a limit applies to, with 503.
    Closed,
}

/// The access log: one JSON object per line per inference request, nothing else on the line.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessLog {
    pub enabled: bool,
    /// Also log request bodies (prompts). Off by default.
    pub log_prompts: bool,
    /// `stdout` (the default), `stderr`, or a file (relative to this file's directory),
    /// appended to and reopened on SIGHUP or when it was moved or deleted (logrotate).
    pub path: LogTarget,
}

impl Default for AccessLog {
    fn default() -> Self {
        AccessLog {
            enabled: true,
            log_prompts: false,
            path: LogTarget::Stdout,
        }
    }
}

/// Where a log goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogTarget {
    Stdout,
    Stderr,
    File(PathBuf),
}

impl<'de> Deserialize<'de> for LogTarget {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(match s.as_str() {
            "stdout" => LogTarget::Stdout,
            "stderr" => LogTarget::Stderr,
            "" => {
                return Err(serde::de::Error::custom(
                    "empty: say stdout, stderr or a file",
                ))
            }
            _ => LogTarget::File(PathBuf::from(s)),
        })
    }
}

/// The application log (standard error; `RUST_LOG` sets what it shows).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Log {
    /// `text` (the default) or `json` (one object per line, for log pipelines). Text is in
    /// colour only on a terminal, and never with `NO_COLOR` set.
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Trace export (W3C trace context is always read from and passed to clients and backends).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Tracing {
    /// An OpenTelemetry collector's OTLP/HTTP endpoint (`http://host:4318`): one span per
    /// request with child spans for its phases, sent in batches off the request path. Off by
    /// default.
    pub otlp_endpoint: Option<String>,
    /// The `service.name` of the spans. Default `firstgate`.
    pub service_name: String,
}

impl Default for Tracing {
    fn default() -> Self {
        Tracing {
            otlp_endpoint: None,
            service_name: "firstgate".into(),
        }
    }
}

/// Connection behaviour towards backends. Durations are written like `2s`, `500ms`, `5m`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamDefaults {
    /// TCP (and TLS) connect timeout. Default 2 s.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Longest wait for any single read from the backend: bounds the time to first token and
    /// the gap between streamed tokens, not the whole answer. Default 300 s.
    #[serde(with = "humantime_serde")]
    pub read_timeout: Duration,
    /// Longest wait for a single write to the backend. Default 60 s.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// How long an idle pooled connection is kept. Keep it below the backend's keep-alive
    /// timeout (uvicorn, under vLLM, closes idle connections after 5 s). Default 4 s.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Most requests one backend instance is given at once (admission control). Default 256.
    pub max_concurrent_per_backend: usize,
    /// How long a request waits for a free slot when every healthy backend of its model is at
    /// `max_concurrent_per_backend`, before it is answered 503. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub admission_wait: Duration,
    /// How a model's requests are spread over its instances (the built-in route rule, and
    /// `direct(...)` in a route policy); a model may override it. Default `least_in_flight`.
    pub routing: Routing,
    /// Prefix affinity: how many tokens' worth of the prompt's start (system prompt and leading
    /// messages, about 4 bytes a token) decide the instance. Default 256.
    pub prefix_tokens: usize,
    /// Prefix affinity's bound on load: an instance with `1 + affinity_slack` times the other
    /// instances' average requests in flight (plus one), or a vLLM queue of at least 2 and
    /// `1 + affinity_slack` times theirs, is passed over for the next one on the ring. Default 2 (see
    /// `docs/benchmarks.md`: moving a prompt off its cache costs a whole prefill).
    pub affinity_slack: f64,
    /// How often each instance's own Prometheus metrics (vLLM's queue, KV-cache use and
    /// prefix-cache hits) are read, off the request path; `0s` turns scraping off. Default 1 s.
    #[serde(with = "humantime_serde")]
    pub metrics_interval: Duration,
    /// Where an instance serves its metrics. Default `/metrics`.
    pub metrics_path: String,
    /// Per-scrape timeout. Default 500 ms.
    #[serde(with = "humantime_serde")]
    pub metrics_timeout: Duration,
}

/// How requests are spread over a model's instances.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Routing {
    /// The instance with the fewest requests in flight at this gateway.
    #[default]
    LeastInFlight,
    /// Requests whose prompts start alike go to the same instance (its prefix cache holds
    /// them), by consistent hashing with bounded load.
    PrefixAffinity,
}

impl Routing {
    pub fn as_str(self) -> &'static str {
        match self {
            Routing::LeastInFlight => "least_in_flight",
            Routing::PrefixAffinity => "prefix_affinity",
        }
    }
}

impl Default for UpstreamDefaults {
    fn default() -> Self {
        UpstreamDefaults {
            connect_timeout: Duration::from_secs(2),
            read_timeout: Duration::from_secs(300),
            write_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(4),
            max_concurrent_per_backend: 256,
            admission_wait: Duration::from_secs(10),
            routing: Routing::LeastInFlight,
            prefix_tokens: 256,
            affinity_slack: 2.0,
            metrics_interval: Duration::from_secs(1),
            metrics_path: "/metrics".into(),
            metrics_timeout: Duration::from_millis(500),
        }
    }
}

/// Active HTTP health checks (`GET <path>` must answer 2xx).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthCheck {
    /// Time between two rounds of checks. Default 1 s.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Per-check timeout. Default 1 s.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Consecutive failures before a backend is taken out of rotation. Default 1.
    pub failures_to_down: usize,
    /// Consecutive successes before it is put back. Default 1.
    pub successes_to_up: usize,
    /// How often backend host names are resolved again. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub resolve_interval: Duration,
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            failures_to_down: 1,
            successes_to_up: 1,
            resolve_interval: Duration::from_secs(30),
        }
    }
}

/// Graceful shutdown (SIGTERM) and hand-over (SIGQUIT) behaviour.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Shutdown {
    /// How long in-flight requests (long streams) may run after shutdown starts; the process
    /// exits as soon as none is left. (Pingora's own default is 300 s, always slept.)
    #[serde(with = "humantime_serde")]
    pub grace_period: Duration,
    /// After the grace period, how long services get to stop before they are dropped.
    #[serde(with = "humantime_serde")]
    pub final_timeout: Duration,
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown {
            grace_period: Duration::from_secs(30),
            final_timeout: Duration::from_secs(5),
        }
    }
}

/// Operator policies in Rhai. Relative paths are relative to the configuration file's
/// directory. Without a route policy the built-in one applies (prefer hot, least in flight).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyFiles {
    /// Script defining `fn route(req, candidates)`.
    pub route: Option<PathBuf>,
    /// Script defining `fn scale(model)`.
    pub scale: Option<PathBuf>,
    /// How often `scale` runs for each model.
    #[serde(with = "humantime_serde")]
    pub scale_interval: Duration,
    /// How often the files are checked for changes (SIGHUP reloads at once).
    #[serde(with = "humantime_serde")]
    pub watch_interval: Duration,
}

impl Default for PolicyFiles {
    fn default() -> Self {
        PolicyFiles {
            route: None,
            scale: None,
            scale_interval: Duration::from_secs(10),
            watch_interval: Duration::from_secs(1),
        }
    }
}

/// Bounds the scale policy sees for a model (it decides; the lifecycle carries it out).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Scaling {
    pub min_instances: u32,
    pub max_instances: u32,
    /// How long a started instance runs (the walltime its job asks for).
    #[serde(with = "humantime_serde")]
    pub keep_hot: Duration,
    /// How long an idle instance is kept before the policy may release it.
    #[serde(with = "humantime_serde")]
    pub idle_release: Duration,
}

impl Default for Scaling {
    fn default() -> Self {
        Scaling {
            min_instances: 0,
            max_instances: 1,
            keep_hot: Duration::from_secs(24 * 3600),
            idle_release: Duration::from_secs(2 * 3600),
        }
    }
}

/// The Globus Compute service (base URL and the gateway's service account).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComputeConfig {
    #[serde(default = "defaults::compute_url")]
    pub url: String,
    /// Globus Auth, for the client-credentials grant.
    #[serde(default = "defaults::auth_url")]
    pub auth_url: String,
    /// The service account that owns the endpoints.
    pub client_id: String,
    /// Environment variable holding its secret.
    pub client_secret_env: String,
    /// Longest a request waits for its task's result (then 504 naming the task).
    #[serde(default = "defaults::compute_wait", with = "humantime_serde")]
    pub wait: Duration,
    /// How often pending tasks are polled, all in one `batch_status` call.
    #[serde(default = "defaults::compute_poll", with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Interval of keep-alive comments on a streamed answer that waits for its task.
    #[serde(default = "defaults::compute_keepalive", with = "humantime_serde")]
    pub keepalive: Duration,
    /// Timeout of each call to the service.
    #[serde(default = "defaults::compute_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// True token streaming for cold models (FIRST's protocol): the inference function posts
    /// each batch of lines back to this gateway. Without it a cold stream is answered whole
    /// and replayed as SSE.
    #[serde(default)]
    pub streaming: Option<ComputeStreaming>,
}

/// Where FIRST's inference function sends a cold stream's lines: this gateway's API listener
/// as compute nodes reach it (routes `/resource_server/api/streaming/{data,error,done}/`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComputeStreaming {
    /// Host name or address of this gateway, as compute nodes reach it. With several replicas
    /// each advertises its own, so a stream's lines come back to the replica holding its client.
    pub advertise_host: String,
    /// Port of the API listener there.
    pub advertise_port: u16,
    /// `https` (the function's default) or `http`.
    #[serde(default = "defaults::streaming_protocol")]
    pub protocol: String,
    /// Environment variable holding the shared secret (the endpoints'
    /// `INTERNAL_STREAMING_SECRET`, sent as `X-Internal-Secret`).
    pub secret_env: String,
}

/// A cluster's lifecycle functions, run on its Globus Compute endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterCompute {
    pub endpoint: String,
    /// Reports the cluster's model jobs (FIRST's qstat function).
    pub status_function: String,
    /// Starts instances: called with {model, framework, cluster, count, walltime}.
    #[serde(default)]
    pub start_function: Option<String>,
    /// Stops an instance: called with {job_id}.
    #[serde(default)]
    pub stop_function: Option<String>,
    #[serde(default = "defaults::status_interval", with = "humantime_serde")]
    pub status_interval: Duration,
    /// Instances whose job ends within this get no new requests (and are replaced while
    /// demand remains).
    #[serde(default = "defaults::drain_before", with = "humantime_serde")]
    pub drain_before: Duration,
    /// The walltime of the model jobs (the endpoint provider's `walltime`; FIRST's endpoints:
    /// 24h). FIRST's qstat function reports the time a job used, not what is left; the end is
    /// this much after the start. Default: the deployment's `scaling.keep_hot`, which is what
    /// the start function is asked for.
    #[serde(default, with = "humantime_serde")]
    pub job_walltime: Option<Duration>,
}

/// Running a model through Globus Compute when no instance is hot.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelCompute {
    pub endpoint: String,
    /// The inference function (FIRST's `vllm_inference_function`).
    pub function: String,
    /// The port vLLM listens on, on the compute node.
    #[serde(default = "defaults::api_port")]
    pub api_port: u16,
    /// FIRST's batch function (`chunked_vllm_inference_function`) and the endpoint it runs
    /// on: with both, `POST /resource_server/{cluster}/{framework}/v1/batches` serves the model.
    #[serde(default)]
    pub batch_function: Option<String>,
    #[serde(default)]
    pub batch_endpoint: Option<String>,
}

/// A cluster's model status published at a URL (SambaNova Metis style).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusUrl {
    pub url: String,
    #[serde(default = "defaults::status_url_interval", with = "humantime_serde")]
    pub interval: Duration,
}

/// One cluster (a facility resource: Sophia, Polaris, Metis, ...).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    /// Only members of one of these Globus groups may use the cluster (empty: anyone admitted).
    #[serde(default)]
    pub allowed_groups: Vec<String>,
    /// Only users from these domains may use the cluster (empty: any).
    #[serde(default)]
    pub allowed_domains: Vec<String>,
    /// Instance lifecycle through Globus Compute (status, start, stop).
    #[serde(default)]
    pub compute: Option<ClusterCompute>,
    /// A status URL in the Metis style (`{id: {model, status: "Live" | ...}}`): models not
    /// `Live` get no requests.
    #[serde(default)]
    pub status: Option<StatusUrl>,
    /// Frameworks by name (`vllm`, `api`, ...), the second segment of FIRST's URL layout.
    pub frameworks: BTreeMap<String, Framework>,
}

/// One inference framework on a cluster.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Framework {
    /// Endpoints offered (see `openai::endpoint`). Default: chat/completions, completions,
    /// embeddings; `responses`, `messages` and `messages/count_tokens` when listed.
    #[serde(default = "defaults::endpoints")]
    pub endpoints: Vec<Endpoint>,
    /// The models served.
    pub models: Vec<Model>,
}

/// One model served on a cluster/framework, and where it runs (its deployment).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Model {
    /// The name clients use, e.g. `meta-llama/Meta-Llama-3.1-8B-Instruct`. Matching ignores case
    /// and punctuation, so `meta-llama-meta-llama-3.1-8b-instruct` finds it too.
    pub name: String,
    /// Other names clients may use (matched the same way).
    #[serde(default)]
    pub aliases: Vec<String>,
    /// The model name the backend expects, when it differs from `name`.
    #[serde(default)]
    pub backend_model: Option<String>,
    /// Backend instances: `host:port` or a URL `http(s)://host[:port][/base]`. The base path
    /// defaults to `/v1`; requests go to `{base}/chat/completions` and so on.
    pub backends: Vec<String>,
    /// Talk TLS to `host:port` backends (URL backends say it with their scheme).
    #[serde(default)]
    pub tls: bool,
    /// PEM CA bundle that backend certificates must chain to (default: the system's roots).
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate chain for mutual TLS (with `tls_client_key`).
    #[serde(default)]
    pub tls_client_cert: Option<PathBuf>,
    /// PEM private key of `tls_client_cert`.
    #[serde(default)]
    pub tls_client_key: Option<PathBuf>,
    /// Name of the environment variable holding the backend's bearer key (direct APIs such as
    /// Metis). The client's own Authorization header is never forwarded.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Only members of one of these groups may use (and see) the model.
    #[serde(default)]
    pub allowed_groups: Vec<String>,
    /// Only users from these domains may use (and see) the model.
    #[serde(default)]
    pub allowed_domains: Vec<String>,
    /// Health-check path; `null` turns active checks off for this model. Default `/health`.
    #[serde(default = "defaults::health_path")]
    pub health_path: Option<String>,
    /// Overrides of the `upstream:` defaults for this model.
    #[serde(default)]
    pub max_concurrent_per_backend: Option<usize>,
    /// `least_in_flight` or `prefix_affinity` for this model (default: `upstream.routing`).
    #[serde(default)]
    pub routing: Option<Routing>,
    /// What the scale policy may do with this model.
    #[serde(default)]
    pub scaling: Scaling,
    /// Running through Globus Compute when no instance is hot.
    #[serde(default)]
    pub compute: Option<ModelCompute>,
    /// Tokens per minute for all users of this model together (FIRST's `tpm_model`).
    #[serde(default)]
    pub tokens_per_minute: Option<u64>,
    /// Tokens per minute for each user of this model (FIRST's `tpm_user`).
    #[serde(default)]
    pub tokens_per_minute_per_user: Option<u64>,
    #[serde(default, with = "humantime_serde")]
    pub read_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub connect_timeout: Option<Duration>,
}

mod defaults {
    pub fn batch_max_file_bytes() -> usize {
        100 * 1024 * 1024
    }
    pub fn batch_max_lines() -> usize {
        50_000
    }
    pub fn batch_max_active_per_user() -> usize {
        1
    }
    pub fn batch_lines_in_flight_per_user() -> usize {
        4
    }
    pub fn batch_retention() -> std::time::Duration {
        std::time::Duration::from_secs(30 * 86_400)
    }

    use crate::openai::Endpoint;
    use std::net::SocketAddr;
    use std::time::Duration;

    pub fn listen() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 8080))
    }
    pub fn admin_listen() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 9090))
    }
    pub fn streaming_protocol() -> String {
        "https".into()
    }
    pub fn endpoints() -> Vec<Endpoint> {
        Endpoint::DEFAULT.to_vec()
    }
    pub fn batch_lease() -> std::time::Duration {
        std::time::Duration::from_secs(30)
    }

    pub fn redis_timeout() -> std::time::Duration {
        std::time::Duration::from_millis(50)
    }

    pub fn redis_prefix() -> String {
        "firstgate:".into()
    }

    pub fn redis_slot_ttl() -> std::time::Duration {
        std::time::Duration::from_secs(30)
    }

    pub fn yes() -> bool {
        true
    }
    pub fn health_path() -> Option<String> {
        Some("/health".to_string())
    }
    pub fn compute_url() -> String {
        "https://compute.api.globus.org".into()
    }
    pub fn auth_url() -> String {
        "https://auth.globus.org".into()
    }
    pub fn compute_wait() -> Duration {
        Duration::from_secs(300)
    }
    pub fn compute_poll() -> Duration {
        Duration::from_secs(1)
    }
    pub fn compute_keepalive() -> Duration {
        Duration::from_secs(5)
    }
    pub fn compute_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn status_interval() -> Duration {
        Duration::from_secs(10)
    }
    pub fn status_url_interval() -> Duration {
        Duration::from_secs(30)
    }
    pub fn drain_before() -> Duration {
        Duration::from_secs(600)
    }
    pub fn api_port() -> u16 {
        8000
    }
}

/// A configuration file, read and checked.
#[derive(Debug, Clone)]
pub struct LoadedConfig {
    pub path: PathBuf,
    pub config: Config,
}

/// Reads, parses and validates the configuration file at `path`.
pub fn load(path: &Path) -> Result<LoadedConfig, ConfigError> {
    let source = std::fs::read_to_string(path).map_err(|e| ConfigError::io(path, e))?;
    let config = parse(path, &source)?;
    Ok(LoadedConfig {
        path: path.to_path_buf(),
        config,
    })
}

/// Whether two values of a section are the same settings (sections derive `Debug`, which
/// shows every field, rather than `PartialEq`): how a reload tells what changed.
pub fn same(a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug) -> bool {
    format!("{a:?}") == format!("{b:?}")
}

/// The Redis and PostgreSQL URLs parse and carry no password (secrets come from the
/// environment, so they never sit in the file or in what the gateway logs about it).
fn check_shared_state(config: &Config) -> Result<(), error::Invalid> {
    use error::Invalid;
    let check = |key: &str, near: &str, url: &str, schemes: &[&str]| {
        let parsed = url::Url::parse(url)
            .map_err(|e| Invalid::new(key, format!("is not a URL: {e}")).near(near))?;
        if !schemes.contains(&parsed.scheme()) {
            return Err(Invalid::new(
                key,
                format!("must start with {}://", schemes.join(":// or ")),
            )
            .near(near));
        }
        if parsed.password().is_some() {
            return Err(Invalid::new(
                key,
                "must not contain a password: put it in an environment variable and name it \
                 in `password_env`",
            )
            .near(near));
        }
        Ok(())
    };
    if let Some(r) = &config.state.redis {
        check("state.redis.url", "url", &r.url, &["redis"])?;
        if r.timeout < Duration::from_millis(1) || r.slot_ttl < Duration::from_secs(2) {
            return Err(Invalid::new(
                "state.redis",
                "`timeout` must be at least 1ms and `slot_ttl` at least 2s",
            )
            .near("redis"));
        }
    }
    if let Some(UsageStore::Postgres(url)) = &config.usage.store {
        check("usage.store", "store", url, &["postgres", "postgresql"])?;
    }
    Ok(())
}

/// Parses and validates configuration text; `path` is only used in error messages.
/// Relative policy paths become relative to the file's directory.
pub fn parse(path: &Path, source: &str) -> Result<Config, ConfigError> {
    let mut config: Config =
        serde_yaml_ng::from_str(source).map_err(|e| ConfigError::syntax(path, source, e))?;
    validate(&config).map_err(|e| e.located(path, source))?;
    let dir = path.parent().unwrap_or(Path::new(""));
    let relative = |file: &mut PathBuf| {
        if file.is_relative() {
            *file = dir.join(&*file);
        }
    };
    [
        &mut config.policies.route,
        &mut config.policies.scale,
        &mut config.auth.cache.file,
        &mut config.edge.maintenance_file,
    ]
    .into_iter()
    .flatten()
    .for_each(relative);
    if let Some(UsageStore::File(file)) = &mut config.usage.store {
        relative(file);
    }
    if let Some(batch) = &mut config.batch {
        relative(&mut batch.dir);
        if let Some(dir) = &mut batch.staging_dir {
            relative(dir);
        }
    }
    if let Some(tls) = &mut config.tls {
        relative(&mut tls.cert);
        relative(&mut tls.key);
    }
    if let LogTarget::File(file) = &mut config.access_log.path {
        relative(file);
    }
    for model in config
        .clusters
        .values_mut()
        .flat_map(|c| c.frameworks.values_mut())
        .flat_map(|f| f.models.iter_mut())
    {
        [
            &mut model.tls_ca,
            &mut model.tls_client_cert,
            &mut model.tls_client_key,
        ]
        .into_iter()
        .flatten()
        .for_each(relative);
    }
    Ok(config)
}

/// Semantic checks serde cannot express. Errors carry the field path and the offending text,
/// which `ConfigError::located` turns into a line number.
fn validate(config: &Config) -> Result<(), error::Invalid> {
    use error::Invalid;
    check_auth(&config.auth)?;
    for host in &config.admin.allowed_hosts {
        let bare = !host.is_empty()
            && host
                .parse::<http::uri::Authority>()
                .is_ok_and(|a| a.port().is_none() && a.as_str() == host);
        if !bare {
            return Err(Invalid::new(
                "admin.allowed_hosts",
                format!("`{host}` must be a host name or address alone (no scheme, port or path; IPv6 in brackets)"),
            )
            .near("allowed_hosts"));
        }
    }
    let u = &config.usage;
    if let Some(rollups) = u.rollup_retention.filter(|r| !r.is_zero()) {
        if u.retention.is_zero() || rollups < u.retention {
            return Err(Invalid::new(
                "usage.rollup_retention",
                "must be at least `usage.retention` (raw records are deleted only once rolled \
                 up: shorter rollups would lose usage the raw records no longer hold)",
            )
            .near("rollup_retention"));
        }
    }
    if config.listen == config.admin_listen {
        return Err(Invalid::new("admin_listen", "must differ from `listen`").near("admin_listen"));
    }
    if let Some(tls) = &config.tls {
        if tls.listen == config.listen || tls.listen == config.admin_listen {
            return Err(
                Invalid::new("tls.listen", "must differ from `listen` and `admin_listen`")
                    .near("listen"),
            );
        }
    }
    if let Some(s) = config.compute.as_ref().and_then(|c| c.streaming.as_ref()) {
        if s.protocol != "https" && s.protocol != "http" {
            return Err(Invalid::new(
                "compute.streaming.protocol",
                format!("must be `https` or `http`, not `{}`", s.protocol),
            )
            .near("protocol"));
        }
    }
    let edge = &config.edge;
    for (key, value) in [
        ("client_header_timeout", edge.client_header_timeout),
        ("tls_handshake_timeout", edge.tls_handshake_timeout),
        ("client_read_timeout", edge.client_read_timeout),
        ("client_write_timeout", edge.client_write_timeout),
        ("keepalive_timeout", edge.keepalive_timeout),
    ] {
        if value < Duration::from_millis(10) {
            return Err(Invalid::new(format!("edge.{key}"), "must be at least 10ms").near(key));
        }
    }
    check_shared_state(config)?;
    if edge.http2_max_concurrent_streams == 0 {
        return Err(
            Invalid::new("edge.http2_max_concurrent_streams", "must be at least 1")
                .near("http2_max_concurrent_streams"),
        );
    }
    if edge.max_connections == Some(0) {
        return Err(
            Invalid::new("edge.max_connections", "must be at least 1").near("max_connections")
        );
    }
    if config.edge.max_header_bytes < 1024 {
        return Err(
            Invalid::new("edge.max_header_bytes", "must be at least 1024").near("max_header_bytes"),
        );
    }
    for cluster in config.edge.maintenance.keys() {
        if !config.clusters.contains_key(cluster) {
            return Err(Invalid::new(
                format!("edge.maintenance.{cluster}"),
                "names no configured cluster",
            )
            .near(cluster));
        }
    }
    if config.threads == Some(0) {
        return Err(Invalid::new("threads", "must be at least 1").near("threads"));
    }
    if config.limits.max_body_bytes == 0 {
        return Err(
            Invalid::new("limits.max_body_bytes", "must be at least 1").near("max_body_bytes")
        );
    }
    if config.upstream.max_concurrent_per_backend == 0 {
        return Err(
            Invalid::new("upstream.max_concurrent_per_backend", "must be at least 1")
                .near("max_concurrent_per_backend"),
        );
    }
    if config.upstream.prefix_tokens == 0 {
        return Err(
            Invalid::new("upstream.prefix_tokens", "must be at least 1").near("prefix_tokens")
        );
    }
    if !(config.upstream.affinity_slack.is_finite() && config.upstream.affinity_slack >= 0.0) {
        return Err(Invalid::new(
            "upstream.affinity_slack",
            "must be a number of at least 0 (0.5: up to 1.5 times the average load)",
        )
        .near("affinity_slack"));
    }
    if !config.upstream.metrics_path.starts_with('/') {
        return Err(
            Invalid::new("upstream.metrics_path", "must start with '/'").near("metrics_path")
        );
    }
    for (cluster_name, cluster) in &config.clusters {
        check_name(&format!("clusters.{cluster_name}"), cluster_name)?;
        for (fw_name, fw) in &cluster.frameworks {
            let fw_path = format!("clusters.{cluster_name}.frameworks.{fw_name}");
            check_name(&fw_path, fw_name)?;
            if fw.endpoints.is_empty() {
                return Err(
                    Invalid::new(format!("{fw_path}.endpoints"), "lists no endpoint").near(fw_name),
                );
            }
            // Names that normalize alike would make model lookup ambiguous.
            let mut seen: BTreeMap<String, String> = BTreeMap::new();
            for (i, model) in fw.models.iter().enumerate() {
                let path = format!("{fw_path}.models[{i}]");
                check_model(&path, model, cluster.compute.is_some())?;
                if (model.compute.is_some() || cluster.compute.is_some())
                    && config.compute.is_none()
                {
                    return Err(Invalid::new(
                        "compute",
                        format!(
                            "{path} uses Globus Compute: add a top-level `compute:` section with \
                             client_id and client_secret_env"
                        ),
                    )
                    .near(&model.name));
                }
                for name in std::iter::once(&model.name).chain(&model.aliases) {
                    let key = crate::model_name::normalize(name);
                    if key.is_empty() {
                        return Err(Invalid::new(
                            &path,
                            format!("model name or alias {name:?} has no letter or digit"),
                        )
                        .near(name));
                    }
                    if let Some(other) = seen.insert(key, name.clone()) {
                        return Err(Invalid::new(
                            &path,
                            format!(
                                "{name:?} is the same model name as {other:?} once case and \
                                 punctuation are ignored; rename or remove one"
                            ),
                        )
                        .near(name));
                    }
                }
            }
        }
    }
    Ok(())
}

fn check_auth(auth: &AuthConfig) -> Result<(), error::Invalid> {
    use error::Invalid;
    match auth.mode {
        AuthMode::Globus if auth.globus.is_none() => Err(Invalid::new(
            "auth.globus",
            "mode is globus: add a `globus:` section with client_id and client_secret_env",
        )
        .near("mode")),
        AuthMode::Jwt if auth.jwt.is_none() => Err(Invalid::new(
            "auth.jwt",
            "mode is jwt: add a `jwt:` section with jwks_url, issuer and audience",
        )
        .near("mode")),
        _ if auth
            .globus
            .as_ref()
            .is_some_and(|g| g.max_introspections_per_second == 0) =>
        {
            Err(Invalid::new(
                "auth.globus.max_introspections_per_second",
                "must be at least 1 (0 would refuse every new token)",
            )
            .near("max_introspections_per_second"))
        }
        _ => Ok(()),
    }
}

fn check_name(path: &str, name: &str) -> Result<(), error::Invalid> {
    let ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(error::Invalid::new(
            path,
            format!("{name:?} may only use letters, digits, '-', '_' and '.' (it is part of URLs)"),
        )
        .near(name))
    }
}

fn check_model(path: &str, model: &Model, lifecycle: bool) -> Result<(), error::Invalid> {
    use error::Invalid;
    if model.name.trim().is_empty() {
        return Err(Invalid::new(format!("{path}.name"), "must not be empty"));
    }
    if model.backends.is_empty() && !lifecycle && model.compute.is_none() {
        return Err(Invalid::new(
            format!("{path}.backends"),
            "lists no backend; give at least one host:port or URL (or a `compute:` section, or \
             a cluster `compute:` lifecycle that starts instances)",
        )
        .near(&model.name));
    }
    for (j, b) in model.backends.iter().enumerate() {
        BackendAddr::parse(b, model.tls)
            .map_err(|why| Invalid::new(format!("{path}.backends[{j}]"), why).near(b))?;
    }
    if model.tls_client_cert.is_some() != model.tls_client_key.is_some() {
        return Err(Invalid::new(
            format!("{path}.tls_client_cert"),
            "mutual TLS needs both tls_client_cert and tls_client_key",
        )
        .near(&model.name));
    }
    let tls_files = model.tls_ca.is_some() || model.tls_client_cert.is_some();
    if tls_files
        && model
            .backends
            .iter()
            .any(|b| BackendAddr::parse(b, model.tls).is_ok_and(|a| !a.tls()))
    {
        return Err(Invalid::new(
            format!("{path}.tls_ca"),
            "TLS files are given but a backend is plain HTTP: set `tls: true` or use https:// URLs",
        )
        .near(&model.name));
    }
    if let Some(var) = &model.api_key_env {
        if var.is_empty() || var.contains('=') {
            return Err(Invalid::new(
                format!("{path}.api_key_env"),
                "must name an environment variable",
            )
            .near(var));
        }
    }
    if let Some(p) = &model.health_path {
        if !p.starts_with('/') {
            return Err(Invalid::new(format!("{path}.health_path"), "must start with '/'").near(p));
        }
    }
    if model.max_concurrent_per_backend == Some(0) {
        return Err(Invalid::new(
            format!("{path}.max_concurrent_per_backend"),
            "must be at least 1",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(s: &str) -> Result<Config, ConfigError> {
        parse(Path::new("test.yaml"), s)
    }

    const GOOD: &str = r#"
auth: {mode: none}
clusters:
  sophia:
    frameworks:
      vllm:
        models:
          - name: meta-llama/Meta-Llama-3.1-8B-Instruct
            aliases: [llama3-8b]
            backends: [127.0.0.1:8001, "http://127.0.0.1:8002"]
"#;

    #[test]
    fn rollups_cannot_be_kept_shorter_than_raw_records() {
        let with = |usage: &str| parse_str(&format!("usage:\n{usage}{GOOD}"));
        let e = with("  retention: 30d\n  rollup_retention: 7d\n").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("usage.rollup_retention"), "{e}");
        assert_eq!(e.line, Some(3), "{e}");
        assert!(with("  retention: 0\n  rollup_retention: 365d\n").is_err());
        assert!(with("  retention: 30d\n  rollup_retention: 365d\n").is_ok());
    }

    #[test]
    fn routing_settings_are_checked_and_a_model_may_override_them() {
        let with = |upstream: &str| parse_str(&format!("upstream:\n{upstream}{GOOD}"));
        let c = with("  routing: prefix_affinity\n  metrics_interval: 250ms\n").unwrap();
        assert_eq!(c.upstream.routing, Routing::PrefixAffinity);
        assert_eq!(c.upstream.metrics_interval, Duration::from_millis(250));
        assert_eq!(c.upstream.prefix_tokens, 256);
        let e = with("  affinity_slack: -1\n").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("upstream.affinity_slack"), "{e}");
        assert!(with("  prefix_tokens: 0\n").is_err());
        assert!(with("  metrics_path: metrics\n").is_err());
        assert!(with("  routing: round_robin\n").is_err());
        let model = parse_str(&GOOD.replace(
            "aliases: [llama3-8b]",
            "aliases: [llama3-8b]\n            routing: prefix_affinity",
        ))
        .unwrap();
        let m = &model.clusters["sophia"].frameworks["vllm"].models[0];
        assert_eq!(m.routing, Some(Routing::PrefixAffinity));
    }

    #[test]
    fn good_config_gets_defaults() {
        let c = parse_str(GOOD).unwrap();
        assert_eq!(c.listen.port(), 8080);
        assert_eq!(c.limits.max_body_bytes, 20 * 1024 * 1024);
        let fw = &c.clusters["sophia"].frameworks["vllm"];
        assert_eq!(fw.endpoints.len(), 3);
        assert_eq!(fw.models[0].health_path.as_deref(), Some("/health"));
    }

    #[test]
    fn unknown_field_names_line_and_field() {
        let src = GOOD.replace("aliases:", "alias:");
        let e = parse_str(&src).unwrap_err().to_string();
        assert!(e.starts_with("test.yaml:"), "{e}");
        assert!(e.starts_with("test.yaml:9:"), "{e}");
        assert!(e.contains("alias"), "{e}");
    }

    #[test]
    fn bad_backend_names_line_field_and_reason() {
        let src = GOOD.replace("127.0.0.1:8001", "127.0.0.1:99999");
        let e = parse_str(&src).unwrap_err().to_string();
        assert!(e.starts_with("test.yaml:10:"), "{e}");
        assert!(
            e.contains("clusters.sophia.frameworks.vllm.models[0].backends[0]"),
            "{e}"
        );
        assert!(e.contains("port"), "{e}");
    }

    #[test]
    fn ambiguous_model_names_are_refused() {
        let src = GOOD.replace("[llama3-8b]", "[Meta-Llama/meta-llama-3.1-8b-instruct]");
        let e = parse_str(&src).unwrap_err().to_string();
        assert!(e.contains("same model name"), "{e}");
    }

    #[test]
    fn durations_are_human() {
        let src = format!("upstream:\n  read_timeout: 5m\n  connect_timeout: 250ms\n{GOOD}");
        let c = parse_str(&src).unwrap();
        assert_eq!(c.upstream.read_timeout, Duration::from_secs(300));
        assert_eq!(c.upstream.connect_timeout, Duration::from_millis(250));
    }

    #[test]
    fn shared_state_urls_carry_no_password_and_name_their_scheme() {
        let c = parse_str(&format!(
            "usage:\n  store: postgres://firstgate@db:5432/firstgate\n\
             state:\n  redis:\n    url: redis://cache:6379/0\n{GOOD}"
        ))
        .unwrap();
        let pg = UsageStore::Postgres("postgres://firstgate@db:5432/firstgate".into());
        assert_eq!(c.usage.store, Some(pg));
        let redis = c.state.redis.unwrap();
        assert_eq!(redis.on_error, OnRedisError::Open);
        assert_eq!(redis.timeout, Duration::from_millis(50));
        // A file store is still relative to the configuration's directory.
        let c = parse(
            Path::new("/etc/fg/gateway.yaml"),
            &format!("usage:\n  store: usage.db\n{GOOD}"),
        )
        .unwrap();
        let file = UsageStore::File(PathBuf::from("/etc/fg/usage.db"));
        assert_eq!(c.usage.store, Some(file));

        for (yaml, says) in [
            (
                "usage:\n  store: postgres://firstgate:hunter2@db/firstgate\n",
                "usage.store: must not contain a password",
            ),
            (
                "state:\n  redis:\n    url: redis://:hunter2@cache:6379\n",
                "state.redis.url: must not contain a password",
            ),
            (
                "state:\n  redis:\n    url: http://cache:6379\n",
                "must start with redis://",
            ),
            (
                "state:\n  redis:\n    url: redis://cache\n    on_error: maybe\n",
                "on_error",
            ),
        ] {
            let e = parse_str(&format!("{yaml}{GOOD}")).unwrap_err().to_string();
            assert!(e.contains(says), "{yaml}: {e}");
            assert!(!e.contains("hunter2"), "the password is repeated: {e}");
        }
    }
}
