//! Several replicas: two gateway processes share their limits and token verdicts through one
//! real Redis and write their usage to one real PostgreSQL (Debian's servers, started on
//! loopback by `scripts/state-servers.sh`; `scripts/install-deps.sh --servers` installs them).

#![cfg(feature = "sim")] // against the simulators

mod common;

use common::*;
use firstgate::sim::globus::{FakeClient, FakeUser, GlobusSim, Seed};
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

const CLIENT: &str = "6f1d2c4b-scaleout-gateway";
const SECRET: &str = "scaleout-client-secret";
/// A model with a tiny budget of tokens per minute, for everyone.
const SMALL: &str = "tiny-budget-model";

async fn globus() -> GlobusSim {
    let seed = Seed {
        clients: vec![FakeClient {
            id: CLIENT.into(),
            secret: SECRET.into(),
        }],
        users: ["alice", "bob", "carol", "dave", "erin"]
            .iter()
            .map(|u| FakeUser::new(&format!("tok-{u}"), &format!("{u}@anl.gov")))
            .collect(),
        ..Seed::default()
    };
    GlobusSim::start("127.0.0.1:0".parse().unwrap(), seed)
        .await
        .expect("Globus stand-in starts")
}

/// A replica: Globus auth, `state` and `limits` as given, Llama and the small-budget model.
async fn replica(globus: &GlobusSim, backend: std::net::SocketAddr, extra: &str) -> Gateway {
    Gateway::start_with(
        &globus_auth(&globus.url(), CLIENT, "", ""),
        &format!(
            "{extra}clusters:\n  sophia:\n    frameworks:\n      vllm:\n        models:\n\
             \x20         - name: {LLAMA}\n            backends: [{backend}]\n\
             \x20         - name: {SMALL}\n            backends: [{backend}]\n\
             \x20           tokens_per_minute: 10\n"
        ),
        &[(GLOBUS_SECRET_ENV, SECRET)],
    )
    .await
}

/// `state:` for Redis at `url` with `on_error`.
fn redis_state(url: &str, on_error: &str) -> String {
    format!("state:\n  redis:\n    url: {url}\n    on_error: {on_error}\n    timeout: 250ms\n")
}

async fn chat(gw: &Gateway, token: &str, model: &str) -> reqwest::Response {
    gw.post("/v1/chat/completions")
        .bearer_auth(token)
        .json(&chat_body(model, false))
        .send()
        .await
        .expect("request")
}

/// The status and the limit that refused (`x-firstgate-limit`), if one did.
async fn status_limit(gw: &Gateway, token: &str, model: &str) -> (u16, Option<String>) {
    let resp = chat(gw, token, model).await;
    let limit = resp
        .headers()
        .get("x-firstgate-limit")
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    (resp.status().as_u16(), limit)
}

/// The first answer of replica `gw` to `token` that the per-user rate does not refuse (a
/// refused request does not count against the rate, so polling spends nothing).
async fn past_the_rate(gw: &Gateway, token: &str, model: &str) -> (u16, Option<String>) {
    wait_for("an answer past the rate limit", || async {
        let answer = status_limit(gw, token, model).await;
        (answer.1.as_deref() != Some("requests_per_second")).then_some(answer)
    })
    .await
}

/// Polls replica `gw` as `token` until it answers `status` with `limit`.
async fn until_answer(gw: &Gateway, token: &str, model: &str, status: u16, limit: Option<&str>) {
    wait_for(&format!("{status} {limit:?} from {}", gw.addr), || async {
        let (s, l) = status_limit(gw, token, model).await;
        (s == status && l.as_deref() == limit).then_some(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_rate_and_concurrency_limits_token_budgets_and_verdicts() {
    let servers = StateServers::start();
    let globus = globus().await;
    let chat_sim = sim(&[LLAMA, SMALL], |c| c.itl = Duration::from_millis(50)).await;
    let settings = format!(
        "{}    slot_ttl: 2s\nlimits:\n  requests_per_second: 1\n  ip_requests_per_second: 0\n  \
         max_concurrent_per_user: 1\n  token_window: 24h\n",
        redis_state(&servers.redis, "open")
    );
    let a = replica(&globus, chat_sim.addr(), &settings).await;
    let mut b = replica(&globus, chat_sim.addr(), &settings).await;

    // A token verified by A is not sent to Globus again by B: the verdict is in Redis.
    assert_eq!(chat(&a, "tok-alice", LLAMA).await.status(), 200);
    let introspections = globus.stats().introspect.load(Ordering::SeqCst);
    wait_for("alice's verdict in Redis", || async {
        (servers.redis_keys("firstgate:auth:*").len() == 1).then_some(())
    })
    .await;
    chat(&b, "tok-alice", LLAMA).await;
    assert_eq!(
        globus.stats().introspect.load(Ordering::SeqCst),
        introspections,
        "replica B introspected a token replica A had verified"
    );
    assert!(
        metric(
            &b.metrics().await,
            "firstgate_auth_cache_lookups_total{outcome=\"shared\"}"
        ) >= 1.0
    );
    let keys = servers.redis_keys("firstgate:auth:*");
    assert!(
        !keys[0].contains("tok-alice") && keys[0].len() == "firstgate:auth:".len() + 64,
        "verdicts are keyed by the token's SHA-256: {keys:?}"
    );

    // Requests per second: one of bob's on A, and B refuses the next within the second.
    refused_within_a_second(&a, &b, "tok-bob", "requests_per_second").await;

    // Requests in flight: carol's stream on A holds her only slot, so B refuses her, also
    // after the slot's time to live (A renews it) ...
    let mut stream = long_stream(&a, "tok-carol").await;
    assert_eq!(
        past_the_rate(&b, "tok-carol", LLAMA).await,
        (429, Some("max_concurrent_per_user".into()))
    );
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        stream.next().await.expect("the stream goes on").unwrap();
    }
    assert_eq!(
        past_the_rate(&b, "tok-carol", LLAMA).await,
        (429, Some("max_concurrent_per_user".into()))
    );
    // ... until it ends: the slot is given back.
    drop(stream);
    until_answer(&b, "tok-carol", LLAMA, 200, None).await;

    // Tokens per minute of a model: dave's request on A spends the budget for B as well.
    assert_eq!(chat(&a, "tok-dave", SMALL).await.status(), 200);
    assert_eq!(
        past_the_rate(&b, "tok-dave", SMALL).await,
        (429, Some("tokens_per_minute".into()))
    );

    // A replica killed with kill -9 leaks its slots only for their time to live.
    let stream = long_stream(&b, "tok-erin").await;
    assert_eq!(
        past_the_rate(&a, "tok-erin", LLAMA).await,
        (429, Some("max_concurrent_per_user".into()))
    );
    signal(b.pid(), "KILL");
    wait_for("replica B to die", || {
        let gone = b.exited();
        async move { gone.then_some(()) }
    })
    .await;
    drop(stream);
    until_answer(&a, "tok-erin", LLAMA, 200, None).await;
}

/// A request on replica `a`, then one on `b` within the same second: `b` refuses it with
/// `limit` (a limit of one request per second). Each round first lets the limit's second pass
/// (whatever was sent before is forgotten by then); a round that took a second or more proves
/// nothing and is tried again.
async fn refused_within_a_second(a: &Gateway, b: &Gateway, token: &str, limit: &str) {
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let start = Instant::now();
        let first = status_limit(a, token, LLAMA).await;
        let second = status_limit(b, token, LLAMA).await;
        if start.elapsed() < Duration::from_millis(900) && first.0 == 200 {
            assert_eq!(second, (429, Some(limit.to_string())));
            return;
        }
    }
    panic!("no round of two requests within a second");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_the_per_address_limit() {
    let servers = StateServers::start();
    let globus = globus().await;
    let chat_sim = sim(&[LLAMA, SMALL], |_| {}).await;
    let settings = format!(
        "{}limits:\n  requests_per_second: 0\n  ip_requests_per_second: 1\n  ip_burst: 1\n",
        redis_state(&servers.redis, "open")
    );
    let a = replica(&globus, chat_sim.addr(), &settings).await;
    let b = replica(&globus, chat_sim.addr(), &settings).await;
    refused_within_a_second(&a, &b, "tok-alice", "ip_requests_per_second").await;
}

/// A stream of 400 tokens 50 ms apart, begun (its first bytes read).
async fn long_stream(
    gw: &Gateway,
    token: &str,
) -> impl futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin {
    let mut body = chat_body(LLAMA, true);
    body["max_tokens"] = json!(400);
    let resp = gw
        .post("/v1/chat/completions")
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    stream.next().await.expect("the stream starts").unwrap();
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_follows_on_error_and_ends_when_redis_returns() {
    let servers = StateServers::start();
    let globus = globus().await;
    let chat_sim = sim(&[LLAMA, SMALL], |_| {}).await;
    let limits = "limits:\n  requests_per_second: 1000\n  ip_requests_per_second: 0\n";
    let open = replica(
        &globus,
        chat_sim.addr(),
        &format!("{}{limits}", redis_state(&servers.redis, "open")),
    )
    .await;
    let closed = replica(
        &globus,
        chat_sim.addr(),
        &format!("{}{limits}", redis_state(&servers.redis, "closed")),
    )
    .await;
    assert_eq!(chat(&open, "tok-alice", LLAMA).await.status(), 200);
    assert_eq!(chat(&closed, "tok-alice", LLAMA).await.status(), 200);

    // A Redis that does not answer is given `timeout` per call, then `on_error` applies.
    assert_eq!(
        servers.redis_cli(&["CLIENT", "PAUSE", "20000", "WRITE"]),
        ["OK"]
    );
    let (status, body) = status_json(chat(&closed, "tok-alice", LLAMA).await).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(chat(&open, "tok-alice", LLAMA).await.status(), 200);
    assert_eq!(servers.redis_cli(&["CLIENT", "UNPAUSE"]), ["OK"]);

    servers.redis("stop-redis");
    // `open` serves, counting in the process; `closed` refuses what a limit applies to.
    assert_eq!(chat(&open, "tok-alice", LLAMA).await.status(), 200);
    let resp = chat(&closed, "tok-alice", LLAMA).await;
    let (status, body) = status_json(resp).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "limits_unavailable", "{body}");
    // Authentication does not fail open: a new token is verified with Globus, a bad one refused.
    assert_eq!(chat(&open, "tok-erin", LLAMA).await.status(), 200);
    assert_eq!(chat(&open, "tok-not-a-user", LLAMA).await.status(), 401);
    let metrics = open.metrics().await;
    assert!(
        metric(&metrics, "firstgate_redis_errors_total{op=\"admit\"}") >= 1.0,
        "{metrics}"
    );
    assert_eq!(
        open.log().matches("state.redis: ").count(),
        1,
        "the outage is logged once per interval:\n{}",
        open.log()
    );

    servers.redis("start-redis");
    until_answer(&closed, "tok-alice", LLAMA, 200, None).await;
    // The shared budget counts again: a request on one replica spends it for the other (the
    // open replica may count a few more in its process until it has reconnected).
    wait_for(
        "the open replica to reserve tokens in Redis again",
        || async {
            chat(&open, "tok-bob", SMALL).await;
            (!servers.redis_keys("firstgate:tpm:*").is_empty()).then_some(())
        },
    )
    .await;
    assert_eq!(
        status_limit(&closed, "tok-bob", SMALL).await,
        (429, Some("tokens_per_minute".into()))
    );
}

fn requests_in(report: &Value) -> u64 {
    report
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["requests"].as_u64().unwrap())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_replicas_write_usage_to_postgres_and_a_killed_one_keeps_its_committed_rows() {
    let servers = StateServers::start();
    let globus = globus().await;
    let chat_sim = sim(&[LLAMA, SMALL], |_| {}).await;
    let settings = format!(
        "usage:\n  store: {}\n  flush_interval: 50ms\n  refresh_interval: 200ms\n\
         limits:\n  requests_per_second: 0\n  ip_requests_per_second: 0\n",
        servers.postgres
    );
    let a = replica(&globus, chat_sim.addr(), &settings).await;
    let mut b = replica(&globus, chat_sim.addr(), &settings).await;
    for _ in 0..3 {
        assert_eq!(chat(&a, "tok-alice", LLAMA).await.status(), 200);
    }
    for _ in 0..2 {
        assert_eq!(chat(&b, "tok-alice", LLAMA).await.status(), 200);
    }
    // Every replica's records, summed by `firstgate usage` ...
    wait_for("5 records in PostgreSQL", || async {
        (requests_in(&usage_report(&a)) == 5).then_some(())
    })
    .await;
    let report = usage_report(&b);
    assert_eq!(report[0]["username"], "alice@anl.gov", "{report}");
    assert!(report[0]["total_tokens"].as_u64().unwrap() > 0, "{report}");
    // ... in the operator's page of either replica (read from PostgreSQL) ...
    let (_, summary) = status_json(
        reqwest::get(b.admin_url("/api/usage?window=1h"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(summary["total"]["requests"], 5, "{summary}");
    // ... and in what each replica answers the user.
    for gw in [&a, &b] {
        wait_for("everyone's totals on each replica", || async {
            let (_, mine) = status_json(
                gw.get("/resource_server/usage")
                    .bearer_auth("tok-alice")
                    .send()
                    .await
                    .unwrap(),
            )
            .await;
            (mine["total"]["requests"] == 5).then_some(())
        })
        .await;
    }

    // kill -9 of a replica keeps what it committed.
    for _ in 0..2 {
        assert_eq!(chat(&b, "tok-alice", LLAMA).await.status(), 200);
    }
    wait_for("7 records in PostgreSQL", || async {
        (requests_in(&usage_report(&a)) == 7).then_some(())
    })
    .await;
    signal(b.pid(), "KILL");
    wait_for("replica B to die", || {
        let gone = b.exited();
        async move { gone.then_some(()) }
    })
    .await;
    assert_eq!(requests_in(&usage_report(&a)), 7);
    assert_eq!(chat(&a, "tok-alice", LLAMA).await.status(), 200);
    wait_for("8 records in PostgreSQL", || async {
        (requests_in(&usage_report(&a)) == 8).then_some(())
    })
    .await;
}

/// The Compute endpoint and inference function of the cold-path tests.
const COLD_EP: &str = "2b5f3c1a-7d4e-4f8a-9c0b-1e2d3c4b5a61";
const COLD_FN: &str = "0f9e8d7c-6b5a-4c3d-8e2f-1a0b9c8d7e61";

/// Globus with alice and a Compute service whose endpoint `sophia` runs the inference
/// function; `tweak` adjusts the Compute seed.
async fn compute_facility(
    tweak: impl FnOnce(&mut firstgate::sim::globus::ComputeSeed),
) -> GlobusSim {
    use firstgate::sim::globus::{ComputeSeed, FakeEndpoint, FakeFunction};
    let mut compute = ComputeSeed {
        endpoints: vec![FakeEndpoint {
            id: COLD_EP.into(),
            name: "sophia".into(),
            cold: false,
        }],
        functions: vec![FakeFunction {
            id: COLD_FN.into(),
            kind: "inference".into(),
        }],
        ..ComputeSeed::default()
    };
    tweak(&mut compute);
    let seed = Seed {
        clients: vec![FakeClient {
            id: CLIENT.into(),
            secret: SECRET.into(),
        }],
        users: vec![FakeUser::new("tok-alice", "alice@anl.gov")],
        compute,
        ..Seed::default()
    };
    GlobusSim::start("127.0.0.1:0".parse().unwrap(), seed)
        .await
        .unwrap()
}

/// A replica's configuration: shared state in `servers`' Redis, Compute at `globus` (with
/// `compute_extra` lines), and Llama cold on sophia (no backends; through Compute).
fn cold_model_config(servers: &StateServers, globus: &GlobusSim, compute_extra: &str) -> String {
    format!(
        "{}compute:\n  url: {url}\n  auth_url: {url}\n  client_id: {CLIENT}\n  \
         client_secret_env: {GLOBUS_SECRET_ENV}\n  poll_interval: 100ms\n{compute_extra}\
         clusters:\n  sophia:\n    frameworks:\n      vllm:\n        models:\n\
         \x20         - name: {LLAMA}\n            backends: []\n\
         \x20           compute: {{endpoint: {COLD_EP}, function: {COLD_FN}}}\n",
        redis_state(&servers.redis, "open"),
        url = globus.url(),
    )
}

/// A cold stream relayed across replicas: compute nodes post a stream's lines to the one
/// advertised host, which may send them to either replica. Here every post lands on replica B
/// while the client waits on replica A; with Redis between them the client gets every line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_streams_lines_posted_to_the_other_replica_reach_the_client() {
    const RELAY_SECRET: &str = "scaleout-relay-secret";
    let servers = StateServers::start();
    let globus = compute_facility(|c| {
        c.ttft = Duration::from_millis(5);
        c.itl = Duration::from_millis(40);
        c.streaming_secret = Some(RELAY_SECRET.into());
    })
    .await;
    // A node runs the model; neither replica knows of it, so the stream is cold.
    globus.start_job(LLAMA, 8000);
    let config = |advertise_port: &str| {
        cold_model_config(
            &servers,
            &globus,
            &format!(
                "  keepalive: 100ms\n  streaming:\n    advertise_host: 127.0.0.1\n    \
                 advertise_port: {advertise_port}\n    protocol: http\n    \
                 secret_env: FG_TEST_RELAY_SECRET\n"
            ),
        )
    };
    let env = [
        (GLOBUS_SECRET_ENV, SECRET),
        ("FG_TEST_RELAY_SECRET", RELAY_SECRET),
    ];
    let auth = globus_auth(&globus.url(), CLIENT, "", "");
    let b = Gateway::start_with(&auth, &config("{LISTEN_PORT}"), &env).await;
    let a = Gateway::start_with(&auth, &config(&b.addr.port().to_string()), &env).await;

    let mut body = chat_body(LLAMA, true);
    body["max_tokens"] = 12.into();
    let resp = a
        .post("/v1/chat/completions")
        .bearer_auth("tok-alice")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers().get("x-firstgate-route").unwrap(), "compute");
    let text = resp.text().await.unwrap();
    let content: String = text
        .split("\n\n")
        .filter_map(|e| e.trim().strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    let expected: String = (0..12).map(|i| format!("tok{i} ")).collect();
    assert_eq!(content, expected, "{text}");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");

    // Posts alternating between the replicas (a load balancer behind the advertised host):
    // lines stay in order and `done` on one replica does not overtake lines sent to the other.
    globus
        .compute()
        .spread_stream_posts(vec![a.addr.port(), b.addr.port()]);
    for _ in 0..3 {
        let resp = a
            .post("/v1/chat/completions")
            .bearer_auth("tok-alice")
            .json(&body)
            .send()
            .await
            .unwrap();
        let text = resp.text().await.unwrap();
        let content: String = text
            .split("\n\n")
            .filter_map(|e| e.trim().strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .filter_map(|c| {
                c["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(str::to_owned)
            })
            .collect();
        assert_eq!(content, expected, "{text}");
    }
    let stats = &globus.compute().stats;
    assert!(
        stats.stream_posts.load(Ordering::SeqCst) >= 2,
        "lines and done posted to B"
    );
    assert_eq!(stats.stream_posts_failed.load(Ordering::SeqCst), 0);
    // The task's keys are gone once the stream ended.
    wait_for("the stream's keys to be removed", || async {
        servers
            .redis_keys("firstgate:stream:*")
            .is_empty()
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_keeps_hourly_rollups_of_raw_records_past_the_retention() {
    let servers = StateServers::start();
    let globus = globus().await;
    let chat_sim = sim(&[LLAMA, SMALL], |_| {}).await;
    let settings = format!(
        "usage:\n  store: {}\n  flush_interval: 50ms\n  retention: 2s\n\
         limits:\n  requests_per_second: 0\n  ip_requests_per_second: 0\n",
        servers.postgres
    );
    let a = replica(&globus, chat_sim.addr(), &settings).await;
    let mut sent = 0;
    for _ in 0..5 {
        let (status, v) = status_json(chat(&a, "tok-alice", LLAMA).await).await;
        assert_eq!(status, 200);
        sent += v["usage"]["total_tokens"].as_u64().unwrap();
    }
    // The raw records are deleted past the retention; their hours still count them.
    wait_for("the raw records to be deleted", || async {
        let m = a.metrics().await;
        (metric(&m, "firstgate_usage_rows_deleted_total{table=\"usage\"}") == 5.0).then_some(())
    })
    .await;
    let report = usage_report(&a);
    assert_eq!(requests_in(&report), 5, "{report}");
    assert_eq!(report[0]["total_tokens"], sent, "{report}");
    let (_, summary) = status_json(
        reqwest::get(a.admin_url("/api/usage?window=1h"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(summary["total"]["requests"], 5, "{summary}");
    assert!(
        summary["source"]["raw_from_ms"].as_i64() > summary["source"]["since_ms"].as_i64(),
        "{summary}"
    );
    // `firstgate usage --vacuum` vacuums PostgreSQL's tables while the replica writes; the
    // totals stay.
    let config = a.config_path();
    let (ok, out, err) = firstgate(&[
        "usage".as_ref(),
        "--vacuum".as_ref(),
        "--config".as_ref(),
        config.as_os_str(),
    ]);
    assert!(ok && out.contains("usage_hourly"), "{out}{err}");
    let report = usage_report(&a);
    assert_eq!(report[0]["total_tokens"], sent, "{report}");
}

/// FIRST's readiness rule across replicas: a cold endpoint (no managers) gets one task that
/// starts its node, whichever replica a request reaches; the other replica answers 503
/// `endpoint_not_ready` instead of sending a second one (the mark is shared through Redis).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_starting_task_for_a_cold_endpoint_whichever_replica_is_asked() {
    let servers = StateServers::start();
    let globus = compute_facility(|c| {
        c.endpoints[0].cold = true;
        c.queue_wait = Duration::from_secs(30);
    })
    .await;
    let config = cold_model_config(&servers, &globus, "");
    let env = [(GLOBUS_SECRET_ENV, SECRET)];
    let auth = globus_auth(&globus.url(), CLIENT, "", "");
    let a = Gateway::start_with(&auth, &config, &env).await;
    let b = Gateway::start_with(&auth, &config, &env).await;
    let first = tokio::spawn(
        a.post("/v1/chat/completions")
            .bearer_auth("tok-alice")
            .json(&chat_body(LLAMA, false))
            .send(),
    );
    let compute = globus.compute();
    wait_for("the starting task from replica A", || async {
        (compute.stats.tasks_inference.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    let (status, v) = status_json(chat(&b, "tok-alice", LLAMA).await).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (503, Some("endpoint_not_ready")),
        "{v}"
    );
    assert_eq!(compute.stats.tasks_inference.load(Ordering::SeqCst), 1);
    assert_eq!(
        servers.redis_keys("firstgate:endpoint_triggered:*").len(),
        1
    );
    first.abort();
}

/// A post that reaches a replica as the stream ends: the replica checked the task's token, the
/// holder then forgot the task (the stream over, its keys deleted), and only then does the
/// post's event arrive. It is refused and leaves no list behind, where an unconditional append
/// made the list again, to linger until its time to live ran out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_posted_after_its_task_ended_is_refused_and_stores_nothing() {
    use firstgate::compute::relay::{RelayEvent, RelayRefusal};
    use firstgate::compute::relay_redis::{token_digest, RedisRelay};
    use std::sync::Arc;

    let servers = StateServers::start();
    let cfg: firstgate::config::RedisConfig =
        serde_yaml_ng::from_str(&format!("url: {}\ntimeout: 2s", servers.redis)).unwrap();
    let metrics = Arc::new(firstgate::metrics::Metrics::new());
    let state = Arc::new(firstgate::state::SharedState::new(&cfg, metrics).unwrap());
    let relay = RedisRelay::new(state, Duration::from_secs(600));
    let digest = token_digest(b"task-token");

    relay.register("task-1", &digest).await.unwrap();
    let line = RelayEvent::Data("data: {\"choices\":[]}".into());
    assert_eq!(
        relay.push("task-1", &token_digest(b"other"), &line).await,
        Err(RelayRefusal::Token),
        "another token's post is refused"
    );
    relay.push("task-1", &digest, &line).await.unwrap();
    let drained = relay.drain(&[("task-1".to_string(), 8)]).await.unwrap();
    assert_eq!(drained, vec![("task-1".to_string(), vec![line])]);

    relay.forget("task-1").await;
    assert_eq!(
        relay.push("task-1", &digest, &RelayEvent::Done).await,
        Err(RelayRefusal::UnknownTask),
        "an ended task takes no events"
    );
    assert_eq!(
        servers.redis_keys("firstgate:stream:*"),
        Vec::<String>::new()
    );
}
