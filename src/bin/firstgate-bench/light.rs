//! `firstgate-bench --light` (`scripts/bench.sh --light`): what each proxy costs per request,
//! measured with a generator that costs little itself. The default harness's reqwest client
//! shares the two cores with two-thread proxies; here wrk (one thread, a Lua script for the
//! POST) and h2load (streams) load proxies that each run on one thread or worker, in front of
//! the same static nginx backend (a canned chat completion), so the proxy's own CPU per 1,000
//! requests, read from /proc, is what differs. Each run reports whether the proxy was the
//! bottleneck (its one thread busy) or the generator or backend was.

use super::*;

/// What the static backend answers every request with: a non-streamed chat completion with
/// usage, as vLLM's is shaped.
const CANNED: &str = r#"{"id":"chatcmpl-bench","object":"chat.completion","created":1764979200,"model":"fast","choices":[{"index":0,"message":{"role":"assistant","content":"tok0 tok1 tok2 tok3 tok4 "},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":5,"total_tokens":17}}"#;

/// Tokens of each stream and the time between them: 4 s, long enough that all of a run's
/// streams are open at once. 200 ms apart (a heavily batched vLLM's pace) so that the
/// simulator keeps up: at 10 ms, 5,000 streams asked it for 500,000 chunks a second, it used
/// 90 % of a core, and with the proxy and h2load the two cores were oversubscribed, so time to
/// first byte measured the kernel's sharing of them more than the proxy. The stream rows show
/// the simulator's share (`backend`).
const STREAM_TOKENS: u32 = 20;
const STREAM_INTERVAL_MS: u64 = 200;

#[derive(Debug, Default, Clone, Serialize)]
struct LightRun {
    target: String,
    scenario: String,
    requests: u64,
    errors: u64,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    cpu_s_per_1k: Option<f64>,
    /// With --callgrind: instructions the proxy ran per request, or per stream (user space).
    instructions_per_request: Option<f64>,
    /// Share of one core the proxy, the generator and the backend used.
    proxy_busy: f64,
    generator_busy: f64,
    backend_busy: f64,
    /// Streams: mean time to first byte, and resident memory added per open stream.
    ttfb_mean_ms: Option<f64>,
    kib_per_stream: Option<f64>,
}

impl LightRun {
    /// What a row is compared by: instructions (with --callgrind), else a stream's time to
    /// first byte, else CPU per request.
    fn cost(&self) -> Option<f64> {
        self.instructions_per_request
            .or(self.ttfb_mean_ms)
            .or(self.cpu_s_per_1k)
    }
}

pub async fn run(cli: &Cli) -> anyhow::Result<()> {
    for tool in ["wrk", "h2load"] {
        anyhow::ensure!(
            Command::new(tool).arg("--version").output().is_ok(),
            "{tool} is missing: scripts/bench.sh --light installs it (Debian's wrk and \
             nghttp2-client)"
        );
    }
    let dir = tempfile_dir()?;
    let bin = cli.bin_dir.clone();
    let (backend_proc, backend) = start_static_backend(&cli.nginx, &dir)?;
    let real = free_addr();
    let sim_real = start_sim(&bin, real, "real", 50, STREAM_INTERVAL_MS)?;
    wait_listening(backend, "the static backend").await?;
    wait_listening(real, "the streaming simulator").await?;
    let globus = bench_globus().await?;
    let (full, lite) = gateway_configs(&globus, &dir.join("usage-light.db"), backend, real)?;
    // Everything on includes per-user limits, far above the load so that none refuses.
    let full = full.replace(
        LIMITS_OFF,
        "limits:\n  requests_per_second: 1000000\n  ip_requests_per_second: 0\n  \
         max_concurrent_per_user: 1000000\n",
    );
    if cli.callgrind {
        anyhow::ensure!(
            Command::new("valgrind").arg("--version").output().is_ok(),
            "valgrind is missing (Debian's valgrind): --callgrind runs the proxies under it"
        );
    }
    // With --callgrind, where a proxy's counts go (nginx, several processes, runs as it is).
    let counts = |name: &str| {
        (cli.callgrind && name != "nginx").then(|| dir.join(format!("{name}.callgrind")))
    };
    let env = [("FG_BENCH_SECRET", "bench-secret")];
    let (gw_full, full_addr, _) = start_gateway_on(
        &bin,
        &dir,
        "light-full",
        &full,
        &env,
        1,
        counts("firstgate-full").as_deref(),
    )?;
    let (gw_lite, lite_addr, _) = start_gateway_on(
        &bin,
        &dir,
        "light-lite",
        &lite,
        &[],
        1,
        counts("firstgate-lite").as_deref(),
    )?;
    let (ngx, ngx_addr) = start_nginx(&cli.nginx, &dir, backend, real, 1)?;
    let (bare, bare_addr) = start_bare(
        &bin,
        backend,
        real,
        false,
        1,
        counts("pingora-bare").as_deref(),
    )?;
    for (a, what) in [
        (full_addr, "firstgate (full)"),
        (lite_addr, "firstgate (lite)"),
        (ngx_addr, "nginx"),
        (bare_addr, "the bare Pingora proxy"),
    ] {
        wait_listening(a, what).await?;
    }
    let target = |name, addr: SocketAddr, prefixed: bool, pid, token| Target {
        name,
        base: format!("http://{addr}"),
        fast: ("fast", if prefixed { "/fast" } else { "" }),
        real: ("real", if prefixed { "/real" } else { "" }),
        pid: Some(pid),
        token,
        admin: None,
    };
    let targets = [
        target("nginx", ngx_addr, true, ngx.pid(), None),
        target("pingora-bare", bare_addr, true, bare.pid(), None),
        target("firstgate-lite", lite_addr, false, gw_lite.pid(), None),
        target(
            "firstgate-full",
            full_addr,
            false,
            gw_full.pid(),
            Some("bench-token"),
        ),
    ];
    let chosen: Vec<&Target> = targets
        .iter()
        .filter(|t| cli.targets.is_empty() || cli.targets.iter().any(|n| n == t.name))
        .collect();
    let client = reqwest::Client::new();
    for t in &chosen {
        for _ in 0..50 {
            let r = request(&client, t, false, false, 4).send().await?;
            anyhow::ensure!(
                r.status().is_success(),
                "{} answered {}",
                t.name,
                r.status()
            );
        }
    }

    let mut runs: Vec<LightRun> = Vec::new();
    for round in 1..=cli.rounds.max(1) {
        eprintln!("light round {round} of {}", cli.rounds.max(1));
        for t in &chosen {
            // Closed loop (as fast as the proxy goes), each offered rate, new connections.
            let paces = std::iter::once(Pace::ClosedLoop)
                .chain(cli.light_rates.iter().map(|r| Pace::Rate(*r)))
                .chain(cli.light_new_connections.then_some(Pace::NewConnections));
            for pace in paces {
                runs.push(wrk(
                    &dir,
                    t,
                    cli.concurrency,
                    cli.duration,
                    backend_proc.pid(),
                    pace,
                    counts(t.name).as_deref(),
                )?);
            }
        }
    }
    // Streams after every wrk round (thousands of streams leave a proxy's heap larger, which
    // would weigh on the wrk rounds after them), as many rounds: one run of 5,000 streams
    // swung by a third from one to the next.
    for round in 1..=cli.rounds.max(1) {
        for n in cli.streams.iter().filter(|n| **n > 0) {
            eprintln!("streams round {round} of {}: {n}", cli.rounds.max(1));
            for t in &chosen {
                runs.push(h2load(&dir, t, *n, sim_real.pid(), counts(t.name).as_deref()).await?);
            }
        }
    }
    // Each scenario's rows together, targets in the order chosen; each row the median round.
    let mut scenarios: Vec<&String> = Vec::new();
    for r in &runs {
        if !scenarios.contains(&&r.scenario) {
            scenarios.push(&r.scenario);
        }
    }
    let median = |target: &str, scenario: &String| {
        let mut of: Vec<&LightRun> = runs
            .iter()
            .filter(|r| r.target == target && &r.scenario == scenario)
            .collect();
        // Memory per stream from the first round: later ones reuse what the allocator kept.
        let first_memory = of.first()?.kib_per_stream;
        of.sort_by(|a, b| a.cost().partial_cmp(&b.cost()).unwrap());
        let mut median = of[of.len() / 2].clone();
        median.kib_per_stream = first_memory;
        Some(median)
    };
    let results: Vec<LightRun> = scenarios
        .iter()
        .flat_map(|s| chosen.iter().filter_map(|t| median(t.name, s)))
        .collect();
    print_table(&results);
    std::fs::create_dir_all(&cli.out)?;
    let json = cli.out.join("light.json");
    std::fs::write(&json, serde_json::to_string_pretty(&results)?)?;
    println!("JSON: {}", json.display());
    drop((gw_full, gw_lite, ngx, bare, backend_proc));
    if cli.keep {
        println!("working directory kept: {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}

/// nginx, one worker, answering every request with [`CANNED`].
fn start_static_backend(nginx: &str, dir: &Path) -> anyhow::Result<(Proc, SocketAddr)> {
    let addr = free_addr();
    let conf = dir.join("backend.conf");
    std::fs::write(
        &conf,
        format!(
            "worker_processes 1;\ndaemon off;\npid {dir}/backend.pid;\n\
             error_log {dir}/backend-error.log warn;\nevents {{ worker_connections 20000; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {dir};\n  keepalive_requests 1000000;\n\
             \x20 server {{\n    listen {addr};\n    location / {{ default_type application/json; \
             return 200 '{CANNED}'; }}\n  }}\n}}\n",
            dir = dir.display()
        ),
    )?;
    let child = Command::new(nginx)
        .arg("-c")
        .arg(&conf)
        .arg("-p")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    Ok((Proc { child }, addr))
}

/// CPU seconds of the child processes this process has waited for (wrk, h2load).
fn waited_children_cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = after
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0.0))
        .collect();
    // cutime and cstime, in USER_HZ (100 on Linux).
    (f.get(13).unwrap_or(&0.0) + f.get(14).unwrap_or(&0.0)) / 100.0
}

/// How a wrk run offers its requests.
#[derive(Debug, Clone, Copy)]
enum Pace {
    /// Each connection sends its next request as soon as the answer is in.
    ClosedLoop,
    /// About this many requests per second in all.
    Rate(u64),
    /// As the closed loop, each request on a new connection (`Connection: close`).
    NewConnections,
}

/// One wrk run of non-streamed chats against `t`: `connections` connections on one thread for
/// `duration`, kept alive unless `pace` says otherwise.
fn wrk(
    dir: &Path,
    t: &Target,
    connections: usize,
    duration: Duration,
    backend_pid: u32,
    pace: Pace,
    callgrind: Option<&Path>,
) -> anyhow::Result<LightRun> {
    let script = dir.join(format!("{}.lua", t.name));
    let pacing = match pace {
        Pace::ClosedLoop => String::new(),
        // wrk waits `delay()` ms before each request of a connection: `connections` of them
        // offer about `rate` requests per second (less the time each answer takes).
        Pace::Rate(r) => format!(
            "function delay() return {} end\n",
            (connections as u64 * 1000 / r.max(1)).max(1)
        ),
        Pace::NewConnections => "wrk.headers[\"Connection\"] = \"close\"\n".into(),
    };
    let auth = t.token.map_or(String::new(), |tok| {
        format!("wrk.headers[\"Authorization\"] = \"Bearer {tok}\"\n")
    });
    std::fs::write(
        &script,
        format!(
            "wrk.method = \"POST\"\nwrk.body = '{}'\n\
             wrk.headers[\"Content-Type\"] = \"application/json\"\n{auth}{pacing}",
            body(t.model(false), false, 5)
        ),
    )?;
    let meter = Meter::start(t, backend_pid, callgrind)?;
    let out = Command::new("wrk")
        .args(["-t1", &format!("-c{connections}")])
        .arg(format!("-d{}s", duration.as_secs().max(1)))
        .arg("--latency")
        .arg("-s")
        .arg(&script)
        .arg(t.url(false))
        .output()?;
    let used = meter.stop()?;
    let text = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(out.status.success(), "wrk against {}: {text}", t.name);
    let requests = text
        .lines()
        .find(|l| l.contains(" requests in "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    let field = |label: &str| {
        text.lines()
            .find(|l| l.trim_start().starts_with(label))
            .and_then(|l| l.split_whitespace().nth(label.split_whitespace().count()))
            .map(str::to_string)
    };
    let errors = field("Non-2xx or 3xx responses:").map_or(0, |n| n.parse().unwrap_or(0))
        + text
            .lines()
            .find(|l| l.contains("Socket errors:"))
            .map_or(0, |l| {
                l.split(|c: char| !c.is_ascii_digit())
                    .filter_map(|n| n.parse::<u64>().ok())
                    .sum()
            });
    Ok(LightRun {
        target: t.name.into(),
        scenario: match pace {
            Pace::ClosedLoop => format!("wrk, {connections} connections"),
            Pace::Rate(r) => format!("wrk, ~{r}/s"),
            Pace::NewConnections => format!("wrk, {connections} new each"),
        },
        errors,
        p50_ms: field("50%").map_or(0.0, |v| millis(&v)),
        p99_ms: field("99%").map_or(0.0, |v| millis(&v)),
        ..used.per(requests)
    })
}

/// What a run costs: the CPU time of the proxy, of the generators this process waited for and
/// of the backend, and with callgrind the proxy's instructions, from `start` to `stop`.
struct Meter<'a> {
    pid: u32,
    backend_pid: u32,
    callgrind: Option<&'a Path>,
    cpu: f64,
    generator: f64,
    backend: f64,
    start: Instant,
}

/// What a run used, over `wall` seconds.
struct Used {
    wall: f64,
    cpu: f64,
    generator: f64,
    backend: f64,
    instructions: Option<u64>,
}

impl<'a> Meter<'a> {
    fn start(t: &Target, backend_pid: u32, callgrind: Option<&'a Path>) -> anyhow::Result<Self> {
        let pid = t.pid.expect("a proxy target");
        if callgrind.is_some() {
            callgrind_control("-z", pid)?;
        }
        Ok(Meter {
            pid,
            backend_pid,
            callgrind,
            cpu: cpu_seconds(pid),
            generator: waited_children_cpu(),
            backend: cpu_seconds(backend_pid),
            start: Instant::now(),
        })
    }

    fn stop(self) -> anyhow::Result<Used> {
        Ok(Used {
            wall: self.start.elapsed().as_secs_f64(),
            cpu: cpu_seconds(self.pid) - self.cpu,
            generator: waited_children_cpu() - self.generator,
            backend: cpu_seconds(self.backend_pid) - self.backend,
            instructions: match self.callgrind {
                Some(file) => Some(callgrind_total(file, self.pid)?),
                None => None,
            },
        })
    }
}

impl Used {
    /// A row's rate, costs per request (or stream) and shares of a core, for `n` done.
    fn per(&self, n: u64) -> LightRun {
        let each = |total: f64| (n > 0).then(|| total / n as f64);
        LightRun {
            requests: n,
            rps: n as f64 / self.wall,
            cpu_s_per_1k: each(self.cpu * 1000.0),
            instructions_per_request: self.instructions.and_then(|i| each(i as f64)),
            proxy_busy: self.cpu / self.wall,
            generator_busy: self.generator / self.wall,
            backend_busy: self.backend / self.wall,
            ..LightRun::default()
        }
    }
}

/// Asks the callgrind of process `pid` to zero (`-z`) or dump (`-d`) its counts.
fn callgrind_control(what: &str, pid: u32) -> anyhow::Result<()> {
    let status = Command::new("callgrind_control")
        .args([what, &pid.to_string()])
        .stdout(Stdio::null())
        .status()?;
    anyhow::ensure!(status.success(), "callgrind_control {what} {pid} failed");
    Ok(())
}

/// Dumps the counts of process `pid` (written to `file.N`, N counting up from 1) and reads the
/// instructions of the newest dump: what ran since the last zeroing.
fn callgrind_total(file: &Path, pid: u32) -> anyhow::Result<u64> {
    callgrind_control("-d", pid)?;
    let name = file
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let dir = file.parent().unwrap_or(Path::new("."));
    let newest = std::fs::read_dir(dir)?
        .filter_map(|e| {
            let path = e.ok()?.path();
            let n: u32 = path
                .file_name()?
                .to_str()?
                .strip_prefix(name)?
                .strip_prefix('.')?
                .parse()
                .ok()?;
            Some((n, path))
        })
        .max()
        .map(|(_, path)| path)
        .ok_or_else(|| anyhow::anyhow!("no callgrind dump beside {}", file.display()))?;
    let text = std::fs::read_to_string(&newest)?;
    text.lines()
        .find_map(|l| {
            l.strip_prefix("summary:")
                .or_else(|| l.strip_prefix("totals:"))
        })
        // Instructions are the first event (cache simulation adds its misses after them).
        .and_then(|n| n.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no instruction total in {}", newest.display()))
}

/// wrk's and h2load's durations (`850.00us`, `1.20ms`, `2.00s`) in milliseconds.
fn millis(v: &str) -> f64 {
    let (num, factor) = if let Some(n) = v.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1000.0)
    } else {
        (v, 1.0)
    };
    num.parse::<f64>().unwrap_or(0.0) * factor
}

/// `n` streams opened at once, one connection each (h2load over HTTP/1.1), to the streaming
/// simulator through `t`: mean time to first byte, and the proxy's resident memory per open
/// stream (its peak during the run over its resident memory before); with `callgrind`, the
/// instructions per stream (its whole life, every chunk relayed).
async fn h2load(
    dir: &Path,
    t: &Target,
    n: usize,
    backend_pid: u32,
    callgrind: Option<&Path>,
) -> anyhow::Result<LightRun> {
    let data = dir.join("stream.json");
    std::fs::write(&data, body(t.model(true), true, STREAM_TOKENS))?;
    let pid = t.pid.expect("a proxy target");
    let (rss0, _) = rss_kib(pid);
    let meter = Meter::start(t, backend_pid, callgrind)?;
    let mut cmd = tokio::process::Command::new("h2load");
    cmd.args([
        "--h1",
        "-n",
        &n.to_string(),
        "-c",
        &n.to_string(),
        "-m",
        "1",
    ])
    .arg("-d")
    .arg(&data)
    .args(["-H", "content-type: application/json"]);
    if let Some(tok) = t.token {
        cmd.args(["-H", &format!("authorization: Bearer {tok}")]);
    }
    let child = cmd.arg(t.url(true)).stdout(Stdio::piped()).spawn()?;
    let output = tokio::spawn(child.wait_with_output());
    let mut peak = rss0;
    while !output.is_finished() {
        peak = peak.max(rss_kib(pid).0);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let out = output.await??;
    let used = meter.stop()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let numbers = |label: &str| -> Vec<String> {
        text.lines()
            .find(|l| l.trim_start().starts_with(label))
            .map(|l| {
                l[l.find(label).unwrap_or(0) + label.len()..]
                    .split(|c: char| c == ',' || c.is_whitespace())
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    };
    // "requests: 1000 total, 1000 started, 1000 done, 1000 succeeded, 0 failed, 0 errored,
    // 0 timeout": the number before each word.
    let requests = numbers("requests:");
    let count = |word: &str| {
        requests
            .iter()
            .position(|w| w == word)
            .and_then(|i| requests.get(i.checked_sub(1)?))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let (succeeded, failed) = (
        count("succeeded"),
        count("failed") + count("errored") + count("timeout"),
    );
    // "time to 1st byte:  min  max  mean  sd  +/- sd"
    let ttfb = numbers("time to 1st byte:").get(2).map(|v| millis(v));
    Ok(LightRun {
        target: t.name.into(),
        scenario: format!("{n} streams (h2load)"),
        errors: failed,
        ttfb_mean_ms: ttfb,
        kib_per_stream: Some(peak.saturating_sub(rss0) as f64 / n as f64),
        ..used.per(succeeded)
    })
}

fn print_table(results: &[LightRun]) {
    println!(
        "\n{:<16} {:<22} {:>9} {:>6} {:>9} {:>8} {:>8} {:>11} {:>9} {:>8} {:>7} {:>9} {:>8} {:>9} {:>10}",
        "target",
        "scenario",
        "requests",
        "errors",
        "req/s",
        "p50 ms",
        "p99 ms",
        "CPU s/1k",
        "instr/req",
        "vs bare",
        "proxy",
        "generator",
        "backend",
        "TTFB ms",
        "KiB/stream"
    );
    for r in results {
        let bare = results
            .iter()
            .find(|b| b.target == "pingora-bare" && b.scenario == r.scenario);
        let ratio = |f: fn(&LightRun) -> Option<f64>| match (f(r), bare.and_then(f)) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
            _ => "-".into(),
        };
        let opt = |v: Option<f64>, digits: usize| v.map_or("-".into(), |v| format!("{v:.digits$}"));
        let versus = ratio(LightRun::cost);
        println!(
            "{:<16} {:<22} {:>9} {:>6} {:>9.0} {:>8.2} {:>8.2} {:>11} {:>9} {:>8} {:>6.0}% {:>8.0}% {:>7.0}% {:>9} {:>10}",
            r.target,
            r.scenario,
            r.requests,
            r.errors,
            r.rps,
            r.p50_ms,
            r.p99_ms,
            opt(r.cpu_s_per_1k, 4),
            opt(r.instructions_per_request, 0),
            versus,
            r.proxy_busy * 100.0,
            r.generator_busy * 100.0,
            r.backend_busy * 100.0,
            opt(r.ttfb_mean_ms, 1),
            opt(r.kib_per_stream, 1)
        );
    }
    println!(
        "\n\"vs bare\": CPU per request (wrk rows) or mean time to first byte (stream rows) over \
         pingora-bare's; with --callgrind, instructions per request or per stream. A proxy whose one thread is \
         not near 100% busy in a wrk row was not the bottleneck: the generator or the backend \
         was, and its figure is not a cost. In stream rows CPU and instructions are per stream, \
         and a backend (the streaming simulator) near 100% sets the pace, not the proxy."
    );
}
