//! Test harness: runs the real `firstgate` binary against in-process simulators on ephemeral
//! loopback ports, and waits on conditions with deadlines (never fixed sleeps).

#![allow(dead_code)] // each test binary uses a different part of the harness

use firstgate::sim::vllm::{VllmSim, VllmSimConfig};
use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The chat model most tests serve.
pub const LLAMA: &str = "meta-llama/Meta-Llama-3.1-8B-Instruct";

/// FIRST's layout for the chat endpoint of cluster `sophia`, framework `vllm`.
pub const SOPHIA_CHAT: &str = "/resource_server/sophia/vllm/v1/chat/completions";

/// The variable that holds the gateway's Globus client secret in tests.
pub const GLOBUS_SECRET_ENV: &str = "FG_TEST_GLOBUS_SECRET";

/// How long any awaited condition may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// A port that was free a moment ago (the gateway binds it itself).
pub fn free_port() -> u16 {
    // Never the same port twice in one test binary: two gateways of concurrent tests given the
    // same port would each find the other's listener answering its readiness check.
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("an ephemeral port")
            .port();
        let mut given = GIVEN.lock().unwrap();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Polls `check` until it returns `Some`, failing the test after [`DEADLINE`].
pub async fn wait_for<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A simulated vLLM server on an ephemeral port.
pub async fn sim(models: &[&str], tweak: impl FnOnce(&mut VllmSimConfig)) -> VllmSim {
    let mut cfg = VllmSimConfig {
        models: models.iter().map(|m| m.to_string()).collect(),
        ..VllmSimConfig::default()
    };
    tweak(&mut cfg);
    VllmSim::start("127.0.0.1:0".parse().unwrap(), cfg)
        .await
        .expect("simulator starts")
}

/// A running gateway process.
pub struct Gateway {
    child: Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    log_path: PathBuf,
    /// The environment it was started with (a successor gets the same).
    env: Vec<(String, String)>,
    _dir: tempfile::TempDir,
}

impl Gateway {
    /// Starts `firstgate serve` with `body` (YAML without the listeners and `auth:`), any
    /// token accepted, and waits until both listeners answer.
    pub async fn start(body: &str) -> Gateway {
        Gateway::start_with("auth:\n  mode: none\n", body, &[]).await
    }

    /// Like [`Gateway::start`] with an `auth:` section and extra environment variables
    /// (secrets; `RUST_LOG`, default `info`). `{LISTEN_PORT}` in `body` becomes the port the
    /// gateway listens on.
    pub async fn start_with(auth: &str, body: &str, env: &[(&str, &str)]) -> Gateway {
        // A port found free may be taken (by an outgoing connection of another test) before
        // the gateway binds it: try again on other ports.
        for _ in 0..3 {
            match Gateway::try_start(auth, body, env).await {
                Ok(gw) => return gw,
                Err(log) if log.contains("Address already in use") => continue,
                Err(log) => panic!("firstgate exited early:\n{log}"),
            }
        }
        panic!("no free ports for the gateway after 3 tries")
    }

    async fn try_start(auth: &str, body: &str, env: &[(&str, &str)]) -> Result<Gateway, String> {
        let dir = tempfile::tempdir().expect("temp dir");
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let config = dir.path().join("gateway.yaml");
        let body = body.replace("{LISTEN_PORT}", &addr.port().to_string());
        let yaml = format!(
            "listen: {addr}\nadmin_listen: {admin}\nthreads: 2\n\
             health_check:\n  interval: 100ms\n  timeout: 500ms\n\
             server:\n  upgrade_sock: {dir}/upgrade.sock\n  pid_file: {dir}/firstgate.pid\n\
             {auth}{body}",
            dir = dir.path().display()
        );
        std::fs::write(&config, yaml).expect("write config");
        let log_path = dir.path().join("gateway.log");
        let log = std::fs::File::create(&log_path).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_firstgate"))
            .args(["serve", "--config"])
            .arg(&config)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("start firstgate");
        let mut gw = Gateway {
            child,
            addr,
            admin,
            log_path,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            _dir: dir,
        };
        let client = reqwest::Client::new();
        let health = [gw.admin_url("/health"), gw.url("/resource_server/health")];
        let exited = wait_for("the gateway to listen", || {
            let client = client.clone();
            let health = health.clone();
            let exited = gw.child.try_wait().ok().flatten();
            async move {
                if let Some(status) = exited {
                    return Some(Some(status));
                }
                for url in &health {
                    match client.get(url).send().await {
                        Ok(r) if r.status().is_success() => {}
                        _ => return None,
                    }
                }
                Some(None)
            }
        })
        .await;
        match exited {
            Some(status) => Err(format!("({status}) {}", gw.log())),
            None => Ok(gw),
        }
    }

    /// A POST to `path` on the gateway (a new client each time: no connection is reused).
    pub fn post(&self, path: &str) -> reqwest::RequestBuilder {
        reqwest::Client::new().post(self.url(path))
    }

    /// A GET of `path` on the gateway.
    pub fn get(&self, path: &str) -> reqwest::RequestBuilder {
        reqwest::Client::new().get(self.url(path))
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// The configuration file the gateway runs with.
    pub fn config_path(&self) -> PathBuf {
        self._dir.path().join("gateway.yaml")
    }

    /// The gateway's process id (for signals).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the gateway logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Sends a signal (`HUP`, `QUIT`, `TERM`, ...) to the gateway.
    pub fn signal(&self, name: &str) {
        signal(self.child.id(), name);
    }

    /// Whether the process has exited (and reaps it).
    pub fn exited(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_some()
    }

    /// Starts `firstgate serve --upgrade` with the same configuration: it waits for this
    /// process to hand over its sockets (send this one SIGQUIT).
    pub fn start_successor(&self) -> Successor {
        let log_path = self._dir.path().join("successor.log");
        let log = std::fs::File::create(&log_path).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_firstgate"))
            .args(["serve", "--upgrade", "--config"])
            .arg(self.config_path())
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("start the successor");
        Successor { child, log_path }
    }

    /// The Prometheus text from the admin listener.
    pub async fn metrics(&self) -> String {
        reqwest::get(self.admin_url("/metrics"))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text")
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- gateway log ---\n{}", self.log());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends a signal by name to a process.
pub fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{name} {pid}");
}

/// A gateway process started with `--upgrade`.
pub struct Successor {
    child: Child,
    log_path: PathBuf,
}

impl Successor {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for Successor {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- successor log ---\n{}", self.log());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The YAML of one cluster/framework with one model on `backends`.
pub fn one_model(cluster: &str, framework: &str, model: &str, backends: &[SocketAddr]) -> String {
    let list: Vec<String> = backends.iter().map(|b| b.to_string()).collect();
    format!(
        "clusters:\n  {cluster}:\n    frameworks:\n      {framework}:\n        models:\n          \
         - name: {model}\n            backends: [{}]\n",
        list.join(", ")
    )
}

/// A chat request body.
pub fn chat_body(model: &str, stream: bool) -> serde_json::Value {
    serde_json::json!({
        "model": model,
        "stream": stream,
        "max_tokens": 5,
        "messages": [{"role": "user", "content": "say hello to the world"}],
    })
}

/// Reads an SSE response to the end and returns the `data:` payloads.
pub async fn sse_events(resp: reqwest::Response) -> Vec<String> {
    let text = resp.text().await.expect("stream body");
    text.split("\n\n")
        .filter_map(|ev| ev.trim().strip_prefix("data: ").map(str::to_owned))
        .collect()
}

/// The `auth:` section for the Globus stand-in at `url`, as client `client` (its secret in
/// [`GLOBUS_SECRET_ENV`]); `extra_globus` lines go under `globus:`, `rules` under `rules:`.
pub fn globus_auth(url: &str, client: &str, extra_globus: &str, rules: &str) -> String {
    let rules = if rules.is_empty() {
        String::new()
    } else {
        format!("  rules:\n{rules}")
    };
    format!(
        "auth:\n  mode: globus\n  globus:\n    client_id: {client}\n    client_secret_env: \
         {GLOBUS_SECRET_ENV}\n    auth_url: {url}\n    groups_url: {url}\n{extra_globus}{rules}"
    )
}

/// Posts [`chat_body`] for `model` to `path`, with `token` as the bearer if given.
pub async fn post_chat(
    gw: &Gateway,
    path: &str,
    token: Option<&str>,
    model: &str,
    stream: bool,
) -> reqwest::Response {
    let mut req = gw.post(path).json(&chat_body(model, stream));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    req.send().await.expect("request")
}

/// A response's status and JSON body (`Null` when the body is not JSON).
pub async fn status_json(resp: reqwest::Response) -> (u16, serde_json::Value) {
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or_default())
}

/// Runs `firstgate` with `args` in the repository; whether it succeeded, its stdout and stderr.
pub fn firstgate<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_firstgate"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run firstgate");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `firstgate usage --json` of `gw`'s configuration: totals per user and model.
pub fn usage_report(gw: &Gateway) -> serde_json::Value {
    let config = gw.config_path();
    let (ok, stdout, stderr) = firstgate(&[
        "usage".as_ref(),
        "--json".as_ref(),
        "--config".as_ref(),
        config.as_os_str(),
    ]);
    assert!(ok, "{stderr}");
    serde_json::from_str(&stdout).unwrap()
}

/// The gateway's usage store (the default `firstgate-usage.db` beside its configuration).
pub fn usage_store(gw: &Gateway) -> rusqlite::Connection {
    let path = gw.config_path().with_file_name("firstgate-usage.db");
    rusqlite::Connection::open(path).expect("the usage store exists")
}

/// Usage records of `gw` matching the SQL condition `filter` (0 while the store is empty).
pub fn usage_rows(gw: &Gateway, filter: &str) -> i64 {
    usage_store(gw)
        .query_row(
            &format!("SELECT COUNT(*) FROM usage WHERE {filter}"),
            [],
            |r| r.get(0),
        )
        .unwrap_or(0)
}

/// A value of the Prometheus text `metrics` for `series` (name and labels), 0 when absent.
pub fn metric(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse::<f64>().ok())
        .unwrap_or(0.0)
}

/// A model status page (SambaNova Metis style) answering `GET /status` with `initial`; write
/// the returned value to change what it reports.
pub async fn status_page(
    initial: serde_json::Value,
) -> (
    std::sync::Arc<std::sync::RwLock<serde_json::Value>>,
    firstgate::sim::Listening,
) {
    use axum::{extract::State, routing::get, Json, Router};
    use std::sync::{Arc, RwLock};
    let status = Arc::new(RwLock::new(initial));
    let router = Router::new()
        .route(
            "/status",
            get(
                |State(s): State<Arc<RwLock<serde_json::Value>>>| async move {
                    Json(s.read().unwrap().clone())
                },
            ),
        )
        .with_state(status.clone());
    let server = firstgate::sim::Listening::bind("127.0.0.1:0".parse().unwrap(), router)
        .await
        .expect("a port for the status page");
    (status, server)
}

/// A private Redis and PostgreSQL on loopback (`scripts/state-servers.sh`, Debian's servers),
/// stopped when dropped.
pub struct StateServers {
    dir: tempfile::TempDir,
    pub redis: String,
    pub postgres: String,
}

fn state_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/state-servers.sh")
}

impl StateServers {
    pub fn start() -> StateServers {
        let dir = tempfile::tempdir().expect("temp dir");
        let out = Command::new(state_script())
            .arg("start")
            .arg(dir.path())
            .arg(free_port().to_string())
            .arg(free_port().to_string())
            .output()
            .expect("run scripts/state-servers.sh");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "Redis and PostgreSQL did not start (scripts/install-deps.sh --servers installs \
             them):\n{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut urls = stdout.lines();
        StateServers {
            redis: urls.next().expect("the Redis URL").to_string(),
            postgres: urls.next().expect("the PostgreSQL URL").to_string(),
            dir,
        }
    }

    /// `stop-redis` or `start-redis`.
    pub fn redis(&self, action: &str) {
        let status = Command::new(state_script())
            .arg(action)
            .arg(self.dir.path())
            .status()
            .expect("run scripts/state-servers.sh");
        assert!(status.success(), "{action} failed");
    }

    /// Runs `redis-cli` with `args` against the Redis; its output lines.
    pub fn redis_cli(&self, args: &[&str]) -> Vec<String> {
        let port = self
            .redis
            .rsplit(':')
            .next()
            .unwrap()
            .trim_end_matches("/0");
        let out = Command::new("redis-cli")
            .args(["-p", port])
            .args(args)
            .output()
            .expect("run redis-cli");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(String::from)
            .collect()
    }

    /// Keys in Redis matching `pattern`.
    pub fn redis_keys(&self, pattern: &str) -> Vec<String> {
        self.redis_cli(&["--scan", "--pattern", pattern])
    }
}

impl Drop for StateServers {
    fn drop(&mut self) {
        let _ = Command::new(state_script())
            .arg("stop")
            .arg(self.dir.path())
            .status();
    }
}

/// The Globus Compute stand-in's cluster `sophia` as the cold-path tests use it: one endpoint
/// running FIRST's inference, status (qstat), start and stop functions, client `svc`.
pub mod compute_ids {
    pub const EP: &str = "2b5f3c1a-7d4e-4f8a-9c0b-1e2d3c4b5a60";
    pub const F_INFER: &str = "0f9e8d7c-6b5a-4c3d-8e2f-1a0b9c8d7e60";
    pub const F_STATUS: &str = "1a2b3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c50";
    pub const F_START: &str = "2c3d4e5f-6a7b-4c8d-9e0f-1a2b3c4d5e60";
    pub const F_STOP: &str = "3d4e5f6a-7b8c-4d9e-8f0a-1b2c3d4e5f70";
}

/// [`compute_ids`]' facility: a started job waits `queue_wait_ms` in the batch queue and loads
/// its model for `load_ms`; `tweak` adjusts the rest.
pub async fn lifecycle_facility(
    queue_wait_ms: u64,
    load_ms: u64,
    tweak: impl FnOnce(&mut firstgate::sim::globus::ComputeSeed),
) -> firstgate::sim::globus::GlobusSim {
    use compute_ids::*;
    use firstgate::sim::globus::{ComputeSeed, FakeClient, FakeEndpoint, FakeFunction, Seed};
    let f = |id: &str, kind: &str| FakeFunction {
        id: id.into(),
        kind: kind.into(),
    };
    let mut seed = Seed {
        clients: vec![FakeClient {
            id: "svc".into(),
            secret: "svc-secret".into(),
        }],
        compute: ComputeSeed {
            endpoints: vec![FakeEndpoint {
                id: EP.into(),
                name: "sophia".into(),
                cold: false,
            }],
            functions: vec![
                f(F_INFER, "inference"),
                f(F_STATUS, "status"),
                f(F_START, "start"),
                f(F_STOP, "stop"),
            ],
            queue_wait: Duration::from_millis(queue_wait_ms),
            load_time: Duration::from_millis(load_ms),
            ttft: Duration::from_millis(5),
            itl: Duration::from_millis(5),
            ..ComputeSeed::default()
        },
        ..Seed::default()
    };
    tweak(&mut seed.compute);
    firstgate::sim::globus::GlobusSim::start("127.0.0.1:0".parse().unwrap(), seed)
        .await
        .unwrap()
}
