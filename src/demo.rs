//! `firstgate demo`: the gateway and simulated clusters on one machine, no outside service.
//!
//! Every backend address in the demo configuration gets a simulated vLLM server serving the
//! models configured there; a Globus stand-in seeded with the demo users answers for Globus
//! when `auth.globus.auth_url` is a loopback address; then the gateway starts.

use crate::config::AuthMode;
use crate::config::{self, Config, UsageStore};
use crate::sim::certs::TestCa;
use crate::sim::globus::{GlobusSim, Seed};
use crate::sim::vllm::{VllmSim, VllmSimConfig};
use anyhow::{bail, Context};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The demo configuration shipped with the binary, used when `conf/demo.yaml` is not around.
const EMBEDDED_DEMO_CONFIG: &str = include_str!("../conf/demo.yaml");
/// The demo users shipped with the binary, used when `conf/demo-users.yaml` is not around.
const EMBEDDED_DEMO_USERS: &str = include_str!("../conf/demo-users.yaml");

/// Options of `firstgate demo`.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub config: PathBuf,
    /// Users of the Globus stand-in.
    pub users: PathBuf,
    pub listen: Option<SocketAddr>,
    pub admin_listen: Option<SocketAddr>,
    /// Address of the HTTPS listener (its certificate comes from a CA made for the demo).
    pub tls_listen: SocketAddr,
    /// Simulated time to first token and between tokens.
    pub ttft: Duration,
    pub itl: Duration,
}

/// Runs the demo until interrupted.
pub fn run(opts: DemoOptions) -> anyhow::Result<()> {
    let mut config = load(&opts.config)?;
    crate::logging::init(config.log.format, &config.tracing)?;
    if let Some(l) = opts.listen {
        config.listen = l;
    }
    if let Some(l) = opts.admin_listen {
        config.admin_listen = l;
    }
    // The simulated compute nodes post cold streams back to this gateway's API listener.
    let port = config.listen.port();
    if let Some(s) = config.compute.as_mut().and_then(|c| c.streaming.as_mut()) {
        s.advertise_port = port;
    }
    let demo_ca = demo_tls(&mut config, opts.tls_listen)?;
    let keys = provide_api_keys(&config);
    let sims = simulated_backends(&config, &keys, &opts)?;
    let globus = globus_stand_in(&config, &opts.users)?;
    let users = globus.as_ref().map(|(_, seed)| seed.users.clone());
    start_simulators(sims, globus)?;
    let options = crate::server::ServeOptions {
        config_path: opts.config.exists().then(|| opts.config.clone()),
        ..Default::default()
    };
    let server = crate::server::build(&config, options)?;
    print_banner(&config, users.as_deref(), demo_ca.as_deref());
    server.run_forever()
}

/// The stand-in's address and users, when the configuration points Globus at this machine;
/// also puts the client secret in the configured variable when it is unset.
fn globus_stand_in(config: &Config, users: &Path) -> anyhow::Result<Option<(SocketAddr, Seed)>> {
    let Some(globus) = config
        .auth
        .globus
        .as_ref()
        .filter(|_| config.auth.mode == AuthMode::Globus)
    else {
        return Ok(None);
    };
    let addr = config::BackendAddr::parse(&globus.auth_url, false).map_err(anyhow::Error::msg)?;
    let Ok(ip) = addr.host.parse::<std::net::IpAddr>() else {
        return Ok(None);
    };
    if !ip.is_loopback() {
        return Ok(None);
    }
    let seed = match std::fs::read_to_string(users) {
        Ok(text) => Seed::from_yaml(&text).with_context(|| users.display().to_string())?,
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound
                && users == Path::new("conf/demo-users.yaml") =>
        {
            Seed::from_yaml(EMBEDDED_DEMO_USERS).context("(built-in) conf/demo-users.yaml")?
        }
        Err(e) => bail!("{}: cannot read the demo users: {e}", users.display()),
    };
    let client = seed
        .clients
        .iter()
        .find(|c| c.id == globus.client_id)
        .with_context(|| {
            format!(
                "{}: no client {:?} (auth.globus.client_id) among `clients`",
                users.display(),
                globus.client_id
            )
        })?;
    // Single-threaded here: no other thread reads the environment yet.
    if std::env::var_os(&globus.client_secret_env).is_none() {
        std::env::set_var(&globus.client_secret_env, &client.secret);
    }
    let streaming = config.compute.as_ref().and_then(|c| c.streaming.as_ref());
    if let (Some(s), Some(secret)) = (streaming, &seed.compute.streaming_secret) {
        if std::env::var_os(&s.secret_env).is_none() {
            std::env::set_var(&s.secret_env, secret);
        }
    }
    Ok(Some((SocketAddr::new(ip, addr.port), seed)))
}

fn load(path: &Path) -> anyhow::Result<Config> {
    match std::fs::read_to_string(path) {
        Ok(source) => Ok(config::parse(path, &source)?),
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound && path == Path::new("conf/demo.yaml") =>
        {
            let mut config =
                config::parse(Path::new("(built-in) conf/demo.yaml"), EMBEDDED_DEMO_CONFIG)?;
            // The policy files live next to conf/demo.yaml; without them, the built-in rule.
            config.policies.route = None;
            config.policies.scale = None;
            config.usage.store = Some(UsageStore::File(
                std::env::temp_dir().join("firstgate-demo-usage.db"),
            ));
            Ok(config)
        }
        Err(e) => bail!(
            "{}: cannot read the demo configuration: {e}",
            path.display()
        ),
    }
}

/// Gives the demo an HTTPS listener when its configuration has none: a CA made for this run
/// signs a certificate for `localhost` and `127.0.0.1`. Returns the CA file clients must trust.
fn demo_tls(config: &mut Config, listen: SocketAddr) -> anyhow::Result<Option<PathBuf>> {
    if config.tls.is_some() {
        return Ok(None);
    }
    let dir = std::env::temp_dir().join("firstgate-demo-tls");
    let ca = TestCa::create(&dir, "firstgate demo CA")
        .with_context(|| format!("cannot write the demo certificates to {}", dir.display()))?;
    let issued = ca.server("gateway")?;
    config.tls = Some(config::TlsListener {
        listen,
        cert: issued.cert,
        key: issued.key,
        http2: true,
    });
    Ok(Some(ca.ca_path()))
}

/// Puts a development key in each `api_key_env` variable that is unset, and returns the key
/// each variable holds so the simulators can require it.
fn provide_api_keys(config: &Config) -> BTreeMap<String, String> {
    let mut keys = BTreeMap::new();
    for m in all_models(config) {
        if let Some(var) = &m.api_key_env {
            let key = std::env::var(var).unwrap_or_else(|_| {
                let key = format!("demo-key-{}", var.to_lowercase());
                // Single-threaded here: no other thread reads the environment yet.
                std::env::set_var(var, &key);
                key
            });
            keys.insert(var.clone(), key);
        }
    }
    keys
}

fn all_models(config: &Config) -> impl Iterator<Item = &config::Model> {
    config
        .clusters
        .values()
        .flat_map(|c| c.frameworks.values())
        .flat_map(|f| f.models.iter())
}

/// One simulator per backend address, serving every model configured on it.
fn simulated_backends(
    config: &Config,
    keys: &BTreeMap<String, String>,
    opts: &DemoOptions,
) -> anyhow::Result<BTreeMap<SocketAddr, VllmSimConfig>> {
    let mut sims: BTreeMap<SocketAddr, VllmSimConfig> = BTreeMap::new();
    for m in all_models(config) {
        let served = m.backend_model.clone().unwrap_or_else(|| m.name.clone());
        for b in &m.backends {
            let addr = config::BackendAddr::parse(b, m.tls).map_err(anyhow::Error::msg)?;
            let ip = addr.host.parse().with_context(|| {
                format!(
                    "the demo simulates backends on IP addresses only, not {:?}",
                    addr.host
                )
            })?;
            let sim = sims
                .entry(SocketAddr::new(ip, addr.port))
                .or_insert_with(|| VllmSimConfig {
                    models: Vec::new(),
                    embedding_models: Vec::new(),
                    api_key: m.api_key_env.as_ref().and_then(|v| keys.get(v).cloned()),
                    ttft: opts.ttft,
                    itl: opts.itl,
                    name: format!("sim {}", addr.authority()),
                    ..VllmSimConfig::default()
                });
            // Demo convention: models named like embedding models are served as such.
            if served.to_lowercase().contains("embed") {
                sim.embedding_models.push(served.clone());
            } else {
                sim.models.push(served.clone());
            }
        }
    }
    Ok(sims)
}

/// Starts the simulators on their own runtime thread and waits until all listen.
fn start_simulators(
    sims: BTreeMap<SocketAddr, VllmSimConfig>,
    globus: Option<(SocketAddr, Seed)>,
) -> anyhow::Result<()> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
    std::thread::Builder::new()
        .name("demo-simulators".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.into()));
                    return;
                }
            };
            rt.block_on(async move {
                let mut running = Vec::new();
                for (addr, cfg) in sims {
                    match VllmSim::start(addr, cfg).await {
                        Ok(sim) => running.push(sim),
                        Err(e) => {
                            let _ = ready_tx.send(Err(anyhow::anyhow!(
                                "cannot start the simulated backend on {addr}: {e} \
                                 (is another demo running?)"
                            )));
                            return;
                        }
                    }
                }
                let mut stand_in = None;
                if let Some((addr, seed)) = globus {
                    match GlobusSim::start(addr, seed).await {
                        Ok(sim) => stand_in = Some(sim),
                        Err(e) => {
                            let _ = ready_tx.send(Err(anyhow::anyhow!(
                                "cannot start the Globus stand-in on {addr}: {e} \
                                 (is another demo running?)"
                            )));
                            return;
                        }
                    }
                }
                let _ = ready_tx.send(Ok(()));
                // Keep the simulators alive as long as the process runs.
                std::future::pending::<()>().await;
                drop((running, stand_in));
            });
        })
        .context("cannot start the simulator thread")?;
    ready_rx
        .recv()
        .context("the simulator thread stopped before it was ready")?
}

fn print_banner(
    config: &Config,
    users: Option<&[crate::sim::globus::FakeUser]>,
    demo_ca: Option<&Path>,
) {
    let api = format!("http://{}", config.listen);
    let https = match (&config.tls, demo_ca) {
        (Some(tls), Some(ca)) => format!(
            "  HTTPS      https://{}/v1   (HTTP/2 or HTTP/1.1; trust the demo CA {})\n",
            tls.listen,
            ca.display()
        ),
        (Some(tls), None) => format!(
            "  HTTPS      https://{}/v1   (HTTP/2 or HTTP/1.1)\n",
            tls.listen
        ),
        (None, _) => String::new(),
    };
    let https_example = match (&config.tls, demo_ca) {
        (Some(tls), Some(ca)) => format!(
            r#"
  Over HTTPS and HTTP/2 (pip install openai 'httpx[http2]'):

  python3 - <<'PY'
import httpx
from openai import OpenAI
client = OpenAI(base_url="https://{}/v1", api_key="TOKEN",
                http_client=httpx.Client(http2=True, verify="{}"))
raw = client.chat.completions.with_raw_response.create(
    model="meta-llama/Meta-Llama-3.1-8B-Instruct",
    messages=[{{"role": "user", "content": "Hello!"}}])
print(raw.http_response.http_version, raw.parse().choices[0].message.content)
PY
"#,
            tls.listen,
            ca.display()
        ),
        _ => String::new(),
    };
    let admin = format!("http://{}", config.admin_listen);
    let mut models = String::new();
    for (cluster, c) in &config.clusters {
        for (fw, f) in &c.frameworks {
            for m in &f.models {
                let mut note = String::new();
                if !(m.allowed_groups.is_empty() && m.allowed_domains.is_empty()) {
                    note.push_str("   (restricted)");
                }
                if m.backends.is_empty() && m.compute.is_some() {
                    note.push_str(&format!(
                        "   (starts cold: via Globus Compute until its instance is up; \
                         see {api}/resource_server/{cluster}/jobs)"
                    ));
                }
                models.push_str(&format!("    {cluster}/{fw}: {}{note}\n", m.name));
            }
        }
    }
    let (auth, token) = match users {
        Some(users) => {
            let mut text = String::from(
                "  Tokens     (Globus stand-in; send as 'Authorization: Bearer <token>')\n",
            );
            for u in users {
                let note = u.note.as_deref().unwrap_or(&u.username);
                text.push_str(&format!("    {:<14} {note}\n", u.token));
            }
            let token = users
                .first()
                .map_or("demo-alice", |u| u.token.as_str())
                .to_string();
            (text, token)
        }
        None if config.auth.mode == AuthMode::None => (
            "  Authentication is off (auth.mode: none): any bearer token is accepted.\n".into(),
            "demo-token".into(),
        ),
        None => (
            "  Authentication: real identity provider (see auth: in the configuration).\n".into(),
            "$ACCESS_TOKEN".into(),
        ),
    };
    println!(
        r#"
firstgate demo — gateway and simulated clusters on this machine

  API        {api}/v1                      (OpenAI layout, the gateway picks the cluster)
             {api}/resource_server/sophia/vllm/v1   (FIRST layout)
{https}  Admin      {admin}/  (the operator's page)   {admin}/health   {admin}/metrics   {admin}/maintenance
  Models
{models}
{auth}
Try it:

  curl -N {api}/resource_server/sophia/vllm/v1/chat/completions \
    -H 'Authorization: Bearer {token}' -H 'Content-Type: application/json' \
    -d '{{"model": "meta-llama/Meta-Llama-3.1-8B-Instruct", "stream": true,
         "messages": [{{"role": "user", "content": "Hello!"}}]}}'

  python3 - <<'PY'
from openai import OpenAI
client = OpenAI(base_url="{api}/v1", api_key="{token}")
for chunk in client.chat.completions.create(
        model="meta-llama/Meta-Llama-3.1-8B-Instruct", stream=True,
        messages=[{{"role": "user", "content": "Hello!"}}]):
    print(chunk.choices[0].delta.content or "", end="", flush=True) if chunk.choices else None
print()
PY
{https_example}
Stop with Ctrl-C.
"#,
        https_example = https_example.replace("TOKEN", &token),
    );
}
