//! The `firstgate` command: serve, check a configuration, or run the demo.

use anyhow::Context;
use clap::{Parser, Subcommand};
#[cfg(feature = "sim")]
use firstgate::demo;
use firstgate::loadtest::{self, Level};
use firstgate::{config, server};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// jemalloc in place of glibc's malloc: per-thread caches, so the worker threads no longer
/// contend on allocator locks when one frees what another allocated (tasks move between
/// workers), without the memory mimalloc keeps per open stream. See docs/benchmarks.md.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read before `main`:
/// - its per-thread caches also keep blocks up to 64 KiB (default 32 KiB), the size of
///   Pingora's body buffers (one per proxied request, for the backend's answer), which
///   otherwise take the arena's path for large blocks (some 4,000 instructions for the pair of
///   calls). jemalloc 5.3.0's limit is 8 MiB; the 5.3.1 of tikv-jemallocator 0.7 caps it at
///   32 KiB, hence 0.6.
/// - those caches are trimmed after every 16 MiB allocated (default 64 KiB): with a 64 KiB
///   buffer per request the default trimmed them on every request, and refilling them from
///   the arena (under its lock) cost some 0.7 µs per request.
///
/// See docs/benchmarks.md. `_RJEM_MALLOC_CONF` in the environment overrides them.
#[export_name = "_rjem_malloc_conf"]
static MALLOC_CONF: &[u8; 47] = b"tcache_max:65536,tcache_gc_incr_bytes:16777216\0";

#[derive(Parser)]
#[command(
    name = "firstgate",
    version,
    about = "OpenAI-compatible inference gateway for HPC facilities"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway. Signals: SIGHUP reloads the configuration (catalog, limits, usage,
    /// access log, policies, TLS certificate, maintenance notices); SIGQUIT hands the sockets to a new process started with --upgrade; SIGTERM
    /// drains (in-flight streams finish, at most shutdown.grace_period); SIGINT stops at once.
    Serve {
        /// The configuration file (see conf/gateway.yaml).
        #[arg(long, short)]
        config: PathBuf,
        /// Take the listening sockets over from the running gateway (then send it SIGQUIT):
        /// a binary or configuration upgrade that drops no connection.
        #[arg(long, short)]
        upgrade: bool,
        /// Run in the background and write server.pid_file (for systemd `Type=forking`); the
        /// command returns once the gateway is set up (with --upgrade: ready to take over) and
        /// fails if it stopped before.
        #[arg(long, short)]
        daemon: bool,
    },
    /// Tell a running gateway to report not-ready (its admin `POST /drain`), then wait, so load
    /// balancers stop sending it traffic before it is stopped (a Kubernetes preStop hook).
    Drain {
        /// The gateway's admin listener.
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin: SocketAddr,
        /// How long to wait after the gateway turned not-ready (e.g. 10s).
        #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
        settle: Duration,
        /// Undo an earlier drain: the gateway reports ready again (`DELETE /drain`).
        #[arg(long)]
        undo: bool,
        /// Environment variable holding the admin token, sent when it is set (the gateway's
        /// `admin.token_env`).
        #[arg(long, default_value = "FIRSTGATE_ADMIN_TOKEN")]
        token_env: String,
    },
    /// Validate a configuration without serving; exits non-zero with file, line and field.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Requests and tokens per user and model, from the usage store.
    Usage {
        #[arg(long, short)]
        config: PathBuf,
        /// Only records since this long ago (e.g. 1h, 7d) or since this Unix time in seconds.
        #[arg(long)]
        since: Option<String>,
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        model: Option<String>,
        /// Print JSON instead of a table (where the totals were read from goes to stderr).
        #[arg(long)]
        json: bool,
        /// Give the space that retention freed back (SQLite: rebuilds a file from before
        /// auto_vacuum=incremental once, trims a newer one; PostgreSQL: VACUUM, which keeps
        /// the space for reuse), then exit.
        #[arg(long)]
        vacuum: bool,
        /// Requests sent by load tests (`x-firstgate-loadtest`): left out (`exclude`, the
        /// default), counted with the others (`include`), or alone (`only`).
        #[arg(long, value_enum, default_value = "exclude")]
        loadtest: LoadTests,
    },
    /// Load-test a deployment through its OpenAI API (this gateway or any other): per model and
    /// level, requests/s, tokens/s, latency, time to first token, time between tokens and
    /// errors by kind, as a table, JSON and an SVG chart. Ctrl-C stops and reports what was
    /// measured.
    Loadtest {
        /// The OpenAI base URL: http://HOST:8080/v1 or a FIRST-layout
        /// http://HOST:8080/resource_server/CLUSTER/FRAMEWORK/v1.
        #[arg(long)]
        url: String,
        /// Environment variable holding the bearer token (a Globus access token).
        #[arg(long, default_value = "FIRSTGATE_TOKEN")]
        token_env: String,
        /// A model to test (repeat for several; each runs every level in turn).
        #[arg(long = "model", required = true)]
        models: Vec<String>,
        /// Closed-loop levels: workers that each send a request as soon as the last answered.
        #[arg(long, value_delimiter = ',', default_value = "1")]
        concurrency: Vec<u32>,
        /// Open-loop levels instead, in requests per second: sent on schedule whatever the
        /// answers, latency counted from when each was due.
        #[arg(long, value_delimiter = ',')]
        rate: Vec<f64>,
        /// Measured time per level.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Unmeasured time before each level (connections opened, caches warm).
        #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
        warmup: Duration,
        /// Stream the answers (time to first token and between tokens are measured).
        #[arg(long)]
        stream: bool,
        /// chat/completions, completions, embeddings or messages (the Anthropic Messages
        /// API; `--api messages` says the same).
        #[arg(long, alias = "api", default_value = "chat/completions")]
        endpoint: String,
        /// Prompts of about this many tokens (default: varied lengths, like chat traffic).
        #[arg(long, conflicts_with = "prompts")]
        prompt_tokens: Option<usize>,
        /// Prompts from a JSONL file: {"prompt": "..."} or {"messages": [...]} per line.
        #[arg(long)]
        prompts: Option<PathBuf>,
        /// `max_tokens` of each request.
        #[arg(long, default_value_t = 128)]
        max_tokens: u32,
        /// Seed of the generated prompts (the same seed, the same prompts).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Longest a request may take before it counts as a timeout.
        #[arg(long, default_value = "300s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// Also write the results as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Also draw tokens/s and p99 latency against the level, as SVG, here.
        #[arg(long)]
        plot: Option<PathBuf>,
    },
    /// Try the routing and scaling policies without serving.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Run the gateway with simulated clusters on this machine (no outside service).
    #[cfg(feature = "sim")]
    Demo {
        /// The demo configuration.
        #[arg(long, short, default_value = "conf/demo.yaml")]
        config: PathBuf,
        /// Users and tokens of the Globus stand-in.
        #[arg(long, default_value = "conf/demo-users.yaml")]
        users: PathBuf,
        /// Address of the API listener (overrides the configuration).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Address of the admin listener (overrides the configuration).
        #[arg(long)]
        admin_listen: Option<SocketAddr>,
        /// Address of the HTTPS listener the demo adds when its configuration has no `tls:`.
        #[arg(long, default_value = "127.0.0.1:8443")]
        tls_listen: SocketAddr,
        /// Simulated time to first token, in milliseconds.
        #[arg(long, default_value_t = 50)]
        ttft_ms: u64,
        /// Simulated time between tokens, in milliseconds.
        #[arg(long, default_value_t = 20)]
        itl_ms: u64,
    },
}

/// Which requests of load tests `firstgate usage` counts.
#[derive(Clone, Copy, clap::ValueEnum)]
enum LoadTests {
    Exclude,
    Include,
    Only,
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Print the decision a policy takes for a request (`--request`) or the actions it takes
    /// for a model's demand (`--scale`).
    Test {
        #[arg(long, short)]
        config: PathBuf,
        /// The policy file to try (default: the one the configuration names).
        #[arg(long)]
        policy: Option<PathBuf>,
        /// The request, as JSON: model, endpoint, stream, cluster, framework, user
        /// {id, username, domain, groups}, prompt_bytes, headers.
        #[arg(long, required_unless_present = "scale", conflicts_with = "scale")]
        request: Option<PathBuf>,
        /// The catalog state, as JSON: {"deployments": [{cluster, framework, model, state,
        /// instances: [{id, healthy, in_flight, latency_ms, ends_in}], compute}]}. Deployments
        /// not listed are assumed hot with every instance idle.
        #[arg(long, requires = "request")]
        state: Option<PathBuf>,
        /// A model's demand and instances, as JSON, for the scale policy.
        #[arg(long)]
        scale: Option<PathBuf>,
    },
    /// Replay the recorded requests of a period (from the usage store) in simulated time
    /// through the policies in force and candidate ones (`--route`, `--scale`): requests
    /// served hot, through Compute or refused, cold starts, time to first token, node-hours,
    /// and how far the live policies agree with the recorded routes.
    Replay {
        #[arg(long, short)]
        config: PathBuf,
        /// The period: since this long ago (e.g. 7d) or this Unix time in seconds.
        #[arg(long, conflicts_with = "from", default_value = "7d")]
        since: String,
        /// The period's start (RFC 3339, e.g. 2026-12-01T00:00:00Z, or Unix seconds).
        #[arg(long, requires = "to")]
        from: Option<String>,
        /// The period's end (default: now).
        #[arg(long)]
        to: Option<String>,
        /// A candidate route policy (default: the one in force).
        #[arg(long)]
        route: Option<PathBuf>,
        /// A candidate scale policy (default: the one in force).
        #[arg(long)]
        scale: Option<PathBuf>,
        /// Replay the arrivals this many times as dense (2: twice the demand).
        #[arg(long, default_value_t = 1.0)]
        speed: f64,
        /// Print JSON instead of the Markdown table.
        #[arg(long)]
        json: bool,
        /// Also draw instances over time against demand, for both policies, as SVG, here.
        #[arg(long)]
        plot: Option<PathBuf>,
        /// Batch-queue wait before a node starts (default: fitted from the recorded cold
        /// starts, else 60s).
        #[arg(long, value_parser = humantime::parse_duration)]
        queue_wait: Option<Duration>,
        /// Time the model takes to load once its node runs (default: fitted with the queue
        /// wait, else 120s).
        #[arg(long, value_parser = humantime::parse_duration)]
        load_time: Option<Duration>,
        /// Instances sharing one node, for node-hours.
        #[arg(long)]
        instances_per_node: Option<u32>,
        /// Output tokens per second of one request on an instance (default: fitted from the
        /// requests served hot).
        #[arg(long)]
        tokens_per_second: Option<f64>,
        /// Time until an answer through Compute (default: the recorded median).
        #[arg(long, value_parser = humantime::parse_duration)]
        compute_latency: Option<Duration>,
    },
}

fn main() -> ExitCode {
    let command = Cli::parse().command;
    // Serving sets up its own log, from the configuration, once any fork is done.
    let serves = matches!(command, Command::Serve { .. });
    #[cfg(feature = "sim")]
    let serves = serves || matches!(command, Command::Demo { .. });
    if !serves {
        firstgate::logging::init_text();
    }
    let result = match command {
        Command::Serve {
            config,
            upgrade,
            daemon,
        } => serve(&config, upgrade, daemon),
        Command::Drain {
            admin,
            settle,
            undo,
            token_env,
        } => drain(admin, settle, undo, &token_env),
        Command::Check { config } => check(&config),
        Command::Usage {
            config,
            vacuum: true,
            ..
        } => usage_vacuum(&config),
        Command::Usage {
            config,
            since,
            user,
            model,
            json,
            loadtest,
            vacuum: false,
        } => usage_report(
            &config,
            since.as_deref(),
            user.as_deref(),
            model.as_deref(),
            json,
            loadtest,
        ),
        Command::Loadtest {
            url,
            token_env,
            models,
            concurrency,
            rate,
            duration,
            warmup,
            stream,
            endpoint,
            prompt_tokens,
            prompts,
            max_tokens,
            seed,
            timeout,
            json,
            plot,
        } => (|| {
            use firstgate::openai::Endpoint;
            let endpoint = Endpoint::from_path(&endpoint)
                .filter(|e| e.load_testable())
                .ok_or_else(|| {
                    let testable: Vec<&str> = Endpoint::ALL
                        .into_iter()
                        .filter(|e| e.load_testable())
                        .map(Endpoint::path)
                        .collect();
                    anyhow::anyhow!("--endpoint {endpoint}: use {}", testable.join(", "))
                })?;
            let token = std::env::var(&token_env).map_err(|_| {
                anyhow::anyhow!(
                    "--token-env {token_env}: the variable is not set; export the token in it"
                )
            })?;
            let levels = if rate.is_empty() {
                concurrency.into_iter().map(Level::Concurrency).collect()
            } else {
                rate.into_iter().map(Level::Rate).collect()
            };
            let settings = loadtest::Settings {
                base_url: url.trim_end_matches('/').to_string(),
                token,
                models,
                levels,
                duration,
                warmup,
                shape: loadtest::Shape {
                    endpoint,
                    stream,
                    max_tokens,
                },
                prompt_tokens,
                prompts,
                seed,
                timeout,
            };
            load_test(settings, json.as_deref(), plot.as_deref())
        })(),
        Command::Policy {
            command:
                PolicyCommand::Test {
                    config,
                    policy,
                    request,
                    state,
                    scale,
                },
        } => policy_test(
            &config,
            policy.as_deref(),
            request.as_deref(),
            state.as_deref(),
            scale.as_deref(),
        ),
        Command::Policy {
            command:
                PolicyCommand::Replay {
                    config,
                    since,
                    from,
                    to,
                    route,
                    scale,
                    speed,
                    json,
                    plot,
                    queue_wait,
                    load_time,
                    instances_per_node,
                    tokens_per_second,
                    compute_latency,
                },
        } => (|| {
            let now = unix_ms_now();
            let to_ms = match &to {
                Some(t) => time_arg("--to", t)?,
                None => now,
            };
            let from_ms = match &from {
                Some(f) => time_arg("--from", f)?,
                None => since_ms(&since, now)?,
            };
            if from_ms >= to_ms {
                anyhow::bail!("the period is empty: --from must come before --to");
            }
            if !speed.is_finite() || speed <= 0.0 {
                anyhow::bail!("--speed {speed}: give a number above 0");
            }
            let opts = firstgate::policy::replay::ReplayOptions {
                from_ms,
                to_ms,
                route,
                scale,
                speed,
                cluster: firstgate::policy::replay::ClusterOverrides {
                    queue_wait,
                    load_time,
                    instances_per_node,
                    tokens_per_second,
                    compute_latency,
                },
            };
            policy_replay(&config, &opts, json, plot.as_deref())
        })(),
        #[cfg(feature = "sim")]
        Command::Demo {
            config,
            users,
            listen,
            admin_listen,
            tls_listen,
            ttft_ms,
            itl_ms,
        } => demo::run(demo::DemoOptions {
            config,
            users,
            listen,
            admin_listen,
            tls_listen,
            ttft: Duration::from_millis(ttft_ms),
            itl: Duration::from_millis(itl_ms),
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(path: &Path, upgrade: bool, daemon: bool) -> anyhow::Result<()> {
    let loaded = config::load(path)?;
    let config_path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let prepared: Option<Box<dyn FnOnce()>> = if daemon {
        let mut report = daemonize(&loaded.config.server.pid_file)?;
        Some(Box::new(move || {
            // The waiting foreground process may be gone (killed); serving goes on.
            let _ = report.write_all(b"1");
        }))
    } else {
        None
    };
    firstgate::logging::init(loaded.config.log.format, &loaded.config.tracing)?;
    let options = server::ServeOptions {
        upgrade,
        config_path: Some(config_path),
        prepared,
    };
    server::build(&loaded.config, options)?.run_forever()
}

/// Forks into the background before any thread exists (Pingora's own daemon mode forks after
/// our background threads started, which would lose them). Standard error is kept, so logs
/// still reach the journal. The previous process's pid file is moved aside first: during an
/// upgrade both processes run.
///
/// The foreground process stays until the background one reports on the returned socket that
/// it is prepared (for an upgrade: about to take the sockets over), then exits 0; if the
/// background process stops first, it puts the pid file back and exits 1. So `serve --upgrade
/// --daemon && kill -QUIT <old>` never stops the old process for a new one that failed.
fn daemonize(pid_file: &Path) -> anyhow::Result<UnixStream> {
    let moved_aside = if pid_file.exists() {
        let mut old = pid_file.as_os_str().to_owned();
        old.push(".old");
        std::fs::rename(pid_file, &old)
            .map_err(|e| anyhow::anyhow!("{}: cannot move aside: {e}", pid_file.display()))?;
        Some(PathBuf::from(old))
    } else {
        None
    };
    let (mut waiting, report) = UnixStream::pair()?;
    let cwd = std::env::current_dir()?;
    let outcome = daemonix::Daemonize::new()
        .pid_file(pid_file)
        .working_directory(cwd)
        .umask(0o027)
        .stdout(daemonix::Stdio::keep())
        .stderr(daemonix::Stdio::keep())
        .execute();
    match outcome {
        daemonix::Outcome::Child(Ok(_)) => {
            drop(waiting);
            Ok(report)
        }
        daemonix::Outcome::Child(Err(e)) => {
            Err(anyhow::anyhow!("cannot run in the background: {e}"))
        }
        daemonix::Outcome::Parent(result) => {
            drop(report);
            let mut byte = [0u8; 1];
            if result.is_ok() && matches!(waiting.read(&mut byte), Ok(1)) {
                std::process::exit(0);
            }
            if let Some(old) = moved_aside {
                let _ = std::fs::rename(old, pid_file);
            }
            anyhow::bail!(
                "the gateway stopped while starting in the background (see its log above)"
            )
        }
    }
}

fn drain(admin: SocketAddr, settle: Duration, undo: bool, token_env: &str) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let url = format!("http://{admin}/drain");
        let method = if undo {
            reqwest::Method::DELETE
        } else {
            reqwest::Method::POST
        };
        let mut request = reqwest::Client::new()
            .request(method, &url)
            .header(firstgate::admin::ADMIN_HEADER, "firstgate drain")
            .timeout(Duration::from_secs(5));
        if let Ok(token) = std::env::var(token_env) {
            request = request.bearer_auth(token);
        }
        let resp = request
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("{url}: {e}"))?;
        let expected = if undo {
            reqwest::StatusCode::OK
        } else {
            reqwest::StatusCode::SERVICE_UNAVAILABLE
        };
        if resp.status() != expected {
            let status = resp.status();
            let body = resp.text().await.unwrap_or_default();
            anyhow::bail!("{url}: unexpected answer {status}: {body}");
        }
        if undo {
            println!("ready again");
            return Ok(());
        }
        println!("draining; waiting {}", humantime::format_duration(settle));
        tokio::time::sleep(settle).await;
        Ok(())
    })
}

fn check(path: &std::path::Path) -> anyhow::Result<()> {
    let loaded = config::load(path)?;
    let c = &loaded.config;
    firstgate::policy::PolicyStore::load(&c.policies)?;
    if let Some(tls) = &c.tls {
        firstgate::edge::CertificateStore::load(&tls.cert, &tls.key)
            .map_err(|e| anyhow::anyhow!("{}: tls: {e:#}", path.display()))?;
    }
    for (cluster, m) in c.clusters.iter().flat_map(|(name, cl)| {
        cl.frameworks
            .values()
            .flat_map(move |f| f.models.iter().map(move |m| (name, m)))
    }) {
        firstgate::catalog::UpstreamTls::load(m).map_err(|e| {
            anyhow::anyhow!(
                "{}: clusters.{cluster}, model {}: {e:#}",
                path.display(),
                m.name
            )
        })?;
    }
    let models: usize = c
        .clusters
        .values()
        .flat_map(|c| c.frameworks.values())
        .map(|f| f.models.len())
        .sum();
    println!(
        "{}: OK ({} clusters, {models} models)",
        path.display(),
        c.clusters.len()
    );
    Ok(())
}

fn usage_report(
    config_path: &Path,
    since: Option<&str>,
    user: Option<&str>,
    model: Option<&str>,
    json: bool,
    loadtest: LoadTests,
) -> anyhow::Result<()> {
    let loaded = config::load(config_path)?;
    let usage = &loaded.config.usage;
    let since_ms = match since {
        None => 0,
        Some(s) => since_ms(s, unix_ms_now())?,
    };
    let only = match loadtest {
        LoadTests::Exclude => Some(false),
        LoadTests::Include => None,
        LoadTests::Only => Some(true),
    };
    let (rows, source) = firstgate::usage::read_totals(usage, since_ms, user, model, only)
        .with_context(|| config_path.display().to_string())?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        eprintln!("({})", source.describe());
        return Ok(());
    }
    println!(
        "{:<32} {:<40} {:>9} {:>12} {:>12} {:>12}",
        "user", "model", "requests", "prompt", "completion", "total"
    );
    for r in &rows {
        println!(
            "{:<32} {:<40} {:>9} {:>12} {:>12} {:>12}",
            r.username, r.model, r.requests, r.prompt_tokens, r.completion_tokens, r.total_tokens
        );
    }
    if rows.is_empty() {
        println!("(no requests)");
    }
    if let LoadTests::Exclude = loadtest {
        let left_out: u64 =
            firstgate::usage::read_totals(usage, since_ms, user, model, Some(true))?
                .0
                .iter()
                .map(|t| t.requests)
                .sum();
        if left_out > 0 {
            println!(
                "({left_out} requests of load tests left out; --loadtest include counts them)"
            );
        }
    }
    println!("({})", source.describe());
    Ok(())
}

fn usage_vacuum(config_path: &Path) -> anyhow::Result<()> {
    let loaded = config::load(config_path)?;
    let done = firstgate::usage::vacuum_store(&loaded.config.usage)
        .with_context(|| config_path.display().to_string())?;
    println!("{done}");
    Ok(())
}

/// Runs a load test, prints its table, writes its JSON and chart; fails when nothing succeeded.
fn load_test(
    settings: loadtest::Settings,
    json: Option<&Path>,
    plot: Option<&Path>,
) -> anyhow::Result<()> {
    loadtest::validate(&settings)?;
    let runtime = tokio::runtime::Runtime::new()?;
    let report = runtime.block_on(async {
        let control = Arc::new(loadtest::Control::default());
        let on_ctrl_c = control.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("\nstopping: the report has what was measured so far");
                on_ctrl_c.stop();
            }
        });
        loadtest::run(settings, control).await
    })?;
    print!("{}", report.table());
    if let Some(path) = json {
        std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n")
            .map_err(|e| anyhow::anyhow!("--json {}: {e}", path.display()))?;
    }
    if let Some(path) = plot {
        std::fs::write(path, report.svg())
            .map_err(|e| anyhow::anyhow!("--plot {}: {e}", path.display()))?;
    }
    if report.levels.iter().all(|l| l.requests == 0) {
        anyhow::bail!("no request succeeded; the errors column says why");
    }
    Ok(())
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path, what: &str) -> anyhow::Result<T> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("{}: cannot read the {what}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {what}: {e}", path.display()))
}

fn policy_replay(
    config_path: &Path,
    opts: &firstgate::policy::replay::ReplayOptions,
    json: bool,
    plot: Option<&Path>,
) -> anyhow::Result<()> {
    let loaded = config::load(config_path)?;
    let report = firstgate::policy::replay::replay(&loaded.config, opts)
        .with_context(|| config_path.display().to_string())?;
    if let Some(plot) = plot {
        std::fs::write(plot, report.svg())
            .map_err(|e| anyhow::anyhow!("--plot {}: {e}", plot.display()))?;
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

fn unix_ms_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// `--since`: this long ago (e.g. 1h, 7d) or this Unix time in seconds, as Unix milliseconds.
fn since_ms(s: &str, now_ms: i64) -> anyhow::Result<i64> {
    match s.parse::<i64>() {
        Ok(unix) => Ok(unix * 1000),
        Err(_) => {
            let ago = humantime::parse_duration(s).map_err(|e| {
                anyhow::anyhow!("--since {s:?}: {e} (use e.g. 1h, 7d, or Unix seconds)")
            })?;
            Ok(now_ms - ago.as_millis() as i64)
        }
    }
}

/// A point in time given as RFC 3339 or Unix seconds, as Unix milliseconds.
fn time_arg(flag: &str, s: &str) -> anyhow::Result<i64> {
    if let Ok(unix) = s.parse::<i64>() {
        return Ok(unix * 1000);
    }
    let t = humantime::parse_rfc3339_weak(s).map_err(|e| {
        anyhow::anyhow!("{flag} {s:?}: {e} (use e.g. 2026-12-01T00:00:00Z or Unix seconds)")
    })?;
    Ok(t.duration_since(std::time::UNIX_EPOCH)?.as_millis() as i64)
}

fn policy_test(
    config_path: &Path,
    policy: Option<&Path>,
    request: Option<&Path>,
    state: Option<&Path>,
    scale: Option<&Path>,
) -> anyhow::Result<()> {
    use firstgate::policy::dry_run;
    let loaded = config::load(config_path)?;
    let out = match (request, scale) {
        (Some(request), _) => {
            let req = read_json(request, "request")?;
            let state = match state {
                Some(s) => read_json(s, "state")?,
                None => dry_run::CatalogState::default(),
            };
            serde_json::to_string_pretty(&dry_run::route(&loaded.config, policy, req, &state)?)?
        }
        (None, Some(scale)) => {
            let input = read_json(scale, "scale input")?;
            serde_json::to_string_pretty(&dry_run::scale(&loaded.config, policy, input)?)?
        }
        (None, None) => anyhow::bail!("give --request (route) or --scale (scale)"),
    };
    println!("{out}");
    Ok(())
}
