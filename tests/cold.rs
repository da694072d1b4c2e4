//! The cold path and the hot-node lifecycle against the Globus Compute stand-in: a cold model is
//! answered through Compute while the scale policy starts an instance, then served directly;
//! and the failures a user can meet on the way.

#![cfg(feature = "sim")] // against the simulators

mod common;

use common::compute_ids::*;
use common::*;
use firstgate::sim::globus::GlobusSim;
use futures_util::future::join_all;
use serde_json::Value;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

const MODEL: &str = "meta-llama/Llama-3.3-70B-Instruct";
const RELAY_SECRET: &str = "relay-secret";

async fn facility(queue_wait_ms: u64, load_ms: u64) -> GlobusSim {
    lifecycle_facility(queue_wait_ms, load_ms, |_| {}).await
}

struct Opts {
    /// Whether the scale policy runs (without it the model stays cold).
    scale: bool,
    wait: &'static str,
    keep_hot: &'static str,
    drain_before: &'static str,
    /// Cold streams come back through the relay (`compute.streaming`).
    streaming: bool,
    /// The cluster runs the status function (without it the gateway never learns of instances).
    lifecycle: bool,
    /// The framework offers the Anthropic Messages API too.
    messages: bool,
}

const DEFAULT: Opts = Opts {
    scale: true,
    wait: "60s",
    keep_hot: "24h",
    drain_before: "10m",
    streaming: false,
    lifecycle: true,
    messages: false,
};

async fn gateway(globus: &GlobusSim, o: Opts) -> Gateway {
    let scale = if o.scale {
        format!(
            "policies:\n  scale: {}/conf/policies/scale-on-demand.rhai\n  scale_interval: 200ms\n",
            env!("CARGO_MANIFEST_DIR")
        )
    } else {
        String::new()
    };
    let streaming = if o.streaming {
        "  streaming:\n    advertise_host: 127.0.0.1\n    advertise_port: {LISTEN_PORT}\n    \
         protocol: http\n    secret_env: FG_TEST_RELAY_SECRET\n"
    } else {
        ""
    };
    let lifecycle = if o.lifecycle {
        format!(
            "    compute:\n      endpoint: {EP}\n      status_function: {F_STATUS}\n\
             \x20     start_function: {F_START}\n      stop_function: {F_STOP}\n      \
             status_interval: 100ms\n      drain_before: {}\n",
            o.drain_before
        )
    } else {
        String::new()
    };
    let body = format!(
        "compute:\n  url: {url}\n  auth_url: {url}\n  client_id: svc\n  client_secret_env: FG_TEST_COMPUTE_SECRET\n\
         \x20 wait: {wait}\n  poll_interval: 100ms\n  keepalive: 100ms\n{streaming}{scale}\
         clusters:\n  sophia:\n{lifecycle}    frameworks:\n      vllm:\n{endpoints}        models:\n\
         \x20         - name: {MODEL}\n            backends: []\n\
         \x20           compute: {{endpoint: {EP}, function: {F_INFER}}}\n\
         \x20           scaling: {{max_instances: 2, keep_hot: {keep_hot}}}\n",
        url = globus.url(),
        endpoints = if o.messages {
            "        endpoints: [chat/completions, messages]\n"
        } else {
            ""
        },
        wait = o.wait,
        keep_hot = o.keep_hot,
    );
    Gateway::start_with(
        "auth:\n  mode: none\n",
        &body,
        &[
            ("FG_TEST_COMPUTE_SECRET", "svc-secret"),
            ("FG_TEST_RELAY_SECRET", RELAY_SECRET),
        ],
    )
    .await
}

async fn ask(gw: &Gateway, stream: bool) -> reqwest::Response {
    post_chat(gw, "/v1/chat/completions", None, MODEL, stream).await
}

fn route(r: &reqwest::Response) -> String {
    r.headers()
        .get("x-firstgate-route")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_model_is_answered_through_compute_then_started_and_served_directly() {
    let globus = facility(300, 300).await;
    let gw = gateway(&globus, DEFAULT).await;

    // The first requests find nothing hot: both answered through Compute while the scale
    // policy starts an instance; the streamed one keeps the connection alive meanwhile.
    let (plain, streamed) = tokio::join!(ask(&gw, false), ask(&gw, true));
    assert_eq!(
        (plain.status().as_u16(), route(&plain)),
        (200, "compute".into())
    );
    assert!(plain.headers().contains_key("x-firstgate-task"));
    let v: Value = plain.json().await.unwrap();
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "tok0 tok1 tok2 tok3 tok4 "
    );
    assert!(
        v["response_time"].is_number(),
        "FIRST's compute answer: {v}"
    );

    assert_eq!(
        (streamed.status().as_u16(), route(&streamed)),
        (200, "compute".into())
    );
    let text = streamed.text().await.unwrap();
    assert!(
        text.starts_with(": waiting for"),
        "keep-alive comments first: {text}"
    );
    assert_eq!(streamed_content(&text), "tok0 tok1 tok2 tok3 tok4 ");

    // Once the instance passes its health check, requests go to it directly, streamed.
    let resp = wait_for("a direct answer", || async {
        let r = ask(&gw, true).await;
        (route(&r) == "direct").then_some(r)
    })
    .await;
    let events = sse_events(resp).await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));

    let stats = globus.compute().stats.snapshot();
    assert_eq!(stats["tasks"]["start"], 1, "one instance started: {stats}");
    assert_eq!(stats["tasks"]["inference"], 2);
    let jobs: Value = reqwest::get(gw.url("/resource_server/sophia/jobs"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(jobs["running"][0]["Models"], MODEL, "{jobs}");
    // FIRST's qstat shape (PBS `exec_host`), from which the instance above became routable.
    assert!(
        jobs["running"][0]["Host Name"]
            .as_str()
            .unwrap()
            .ends_with("/0*64"),
        "{jobs}"
    );
    // FIRST's `JobsByStatus` keys, no others.
    let keys: Vec<&String> = jobs.as_object().unwrap().keys().collect();
    assert_eq!(
        keys,
        [
            "running",
            "queued",
            "stopped",
            "others",
            "private_batch_running",
            "private_batch_queued",
            "cluster_status"
        ],
        "{jobs}"
    );
    let endpoints: Value = reqwest::get(gw.url("/resource_server/list-endpoints"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        endpoints["clusters"]["sophia"]["frameworks"]["vllm"]["model_states"][MODEL],
        "hot"
    );
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains(&format!(
            "firstgate_scale_actions_total{{action=\"start\",model=\"{MODEL}\"}} 1"
        )),
        "{metrics}"
    );

    // The payload is FIRST's, in JSONData, byte for byte what Python's json.dumps would write.
    let payloads = globus.compute().stats.payloads.lock().unwrap().clone();
    let inference = payloads
        .iter()
        .find(|p| p.contains("model_params"))
        .unwrap();
    let (len, rest) = inference.split_once('\n').unwrap();
    let args_end = rest
        .char_indices()
        .nth(len.parse().unwrap())
        .map_or(rest.len(), |(i, _)| i);
    assert_eq!(&rest[args_end..], "5\n11\n{}");
    let args: Value = serde_json::from_str(rest[..args_end].strip_prefix("11\n").unwrap()).unwrap();
    assert_eq!(
        args[0]["model_params"]["openai_endpoint"],
        "chat/completions"
    );
    assert_eq!(args[0]["model_params"]["api_port"], 8000);
    assert_eq!(
        rest[..args_end].strip_prefix("11\n").unwrap(),
        firstgate::compute::serialize::python_json(&args)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_waiting_requests_share_their_status_calls() {
    let globus = facility(1000, 500).await;
    let gw = gateway(&globus, DEFAULT).await;
    let started = Instant::now();
    let answers = join_all((0..100).map(|_| ask(&gw, false))).await;
    let elapsed = started.elapsed();
    for a in &answers {
        assert_eq!(a.status(), 200);
    }
    let stats = &globus.compute().stats;
    let polls = stats.batch_status.load(Ordering::SeqCst);
    // One batch_status call per poll interval (100 ms) however many wait, plus slack.
    let bound = (elapsed.as_millis() / 100) as u64 + 5;
    assert!(polls <= bound, "{polls} batch_status calls in {elapsed:?}");
    assert!(
        stats.submit.load(Ordering::SeqCst) < 30,
        "submissions are batched: {}",
        stats.snapshot()
    );
    assert!(
        stats.endpoint_status.load(Ordering::SeqCst) <= 2,
        "the endpoint status is cached"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_endpoint_is_a_503() {
    let globus = facility(100, 100).await;
    globus
        .compute()
        .faults
        .offline
        .lock()
        .unwrap()
        .push(EP.into());
    let gw = gateway(
        &globus,
        Opts {
            scale: false,
            ..DEFAULT
        },
    )
    .await;
    let resp = ask(&gw, false).await;
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().contains_key("retry-after"));
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "endpoint_offline", "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_worker_is_a_502_without_internal_details() {
    let globus = facility(100, 100).await;
    globus
        .compute()
        .faults
        .lose_workers
        .store(1, Ordering::SeqCst);
    let gw = gateway(&globus, DEFAULT).await;
    let resp = ask(&gw, false).await;
    assert_eq!(resp.status(), 502);
    let v: Value = resp.json().await.unwrap();
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("WorkerLost"), "{message}");
    assert!(
        !message.contains("host") && !message.contains("Traceback"),
        "{message}"
    );
    assert!(
        gw.log().contains("loss of worker"),
        "the full text is logged"
    );
    // The next request succeeds.
    assert_eq!(ask(&gw, false).await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_result_is_a_502_and_the_gateway_keeps_serving() {
    use base64::Engine as _;
    let globus = facility(100, 100).await;
    // 200,000 nested lists, pickled: a recursive decoder would overflow its stack.
    let mut deep = b"\x80\x02".to_vec();
    deep.extend(std::iter::repeat_n(b']', 200_000));
    deep.extend(std::iter::repeat_n(b'a', 199_999));
    deep.push(b'.');
    let deep = format!(
        "00\n{}\n",
        base64::engine::general_purpose::STANDARD.encode(deep)
    );
    // And JSON nested deeper than any answer.
    let json = format!("11\n{}{}", "[".repeat(100_000), "]".repeat(100_000));
    globus
        .compute()
        .faults
        .raw_results
        .lock()
        .unwrap()
        .extend([deep, json]);
    let gw = gateway(&globus, DEFAULT).await;
    for _ in 0..2 {
        let resp = ask(&gw, false).await;
        assert_eq!(resp.status(), 502);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["code"], "compute_bad_result");
    }
    assert_eq!(
        ask(&gw, false).await.status(),
        200,
        "the gateway still serves"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_longer_than_the_limit_is_a_504_naming_the_task() {
    let globus = facility(100, 100).await;
    // No scale policy: nothing ever starts, so the task waits.
    let gw = gateway(
        &globus,
        Opts {
            scale: false,
            wait: "500ms",
            ..DEFAULT
        },
    )
    .await;
    let resp = ask(&gw, false).await;
    assert_eq!(resp.status(), 504);
    let task = resp.headers().get("x-firstgate-task").cloned();
    let v: Value = resp.json().await.unwrap();
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("task "), "{message}");
    assert!(task.is_none());
    // Streamed, the error arrives in-band after the keep-alives.
    let text = ask(&gw, true).await.text().await.unwrap();
    assert!(
        text.contains("compute_timeout") && text.ends_with("data: [DONE]\n\n"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_whose_job_ends_soon_is_drained_and_replaced() {
    let globus = facility(100, 100).await;
    // Jobs run 20 s; instances are drained 17 s before the end (so, about 3 s in).
    let gw = gateway(
        &globus,
        Opts {
            keep_hot: "20s",
            drain_before: "17s",
            ..DEFAULT
        },
    )
    .await;
    wait_for("the first instance to serve", || async {
        let r = ask(&gw, false).await;
        assert_eq!(r.status(), 200);
        (route(&r) == "direct").then_some(())
    })
    .await;
    // Keep demand up: the first instance drains and a second one is started before it ends.
    wait_for("the first instance to drain", || async {
        assert_eq!(ask(&gw, false).await.status(), 200);
        gw.log().contains("draining").then_some(())
    })
    .await;
    wait_for("a replacement instance", || async {
        let r = ask(&gw, false).await;
        assert_eq!(r.status(), 200, "no request fails during the replacement");
        (globus.compute().stats.tasks_start.load(Ordering::SeqCst) >= 2).then_some(())
    })
    .await;
    // The first job is still there next to the new one: replaced before its end.
    let job_ids = || {
        let jobs = globus.compute().jobs_by_status();
        ["running", "queued"]
            .iter()
            .flat_map(|k| jobs[k].as_array().cloned().unwrap_or_default())
            .filter_map(|j| j["Job ID"].as_str().map(str::to_owned))
            .collect::<Vec<_>>()
    };
    let ids = wait_for("both jobs listed", || async {
        let ids = job_ids();
        (ids.len() == 2).then_some(ids)
    })
    .await;
    assert!(ids.contains(&"1000.sim-pbs".to_string()), "{ids:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_not_live_at_its_status_url_gets_no_requests() {
    let (status, server) = status_page(
        serde_json::json!({"a1": {"model": "gpt-oss-120b", "status": "Stopped", "description": ""}}),
    )
    .await;
    let api = sim(&["gpt-oss-120b"], |_| {}).await;
    let gw = Gateway::start(&format!(
        "clusters:\n  metis:\n    status: {{url: \"http://{}/status\", interval: 100ms}}\n    frameworks:\n      api:\n\
         \x20       models:\n          - name: gpt-oss-120b\n            backends: [{}]\n",
        server.addr(),
        api.addr()
    ))
    .await;
    let ask = || async {
        reqwest::Client::new()
            .post(gw.url("/v1/chat/completions"))
            .json(&chat_body("gpt-oss-120b", false))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    wait_for("the stopped model to be refused", || async {
        (ask().await == 503).then_some(())
    })
    .await;
    status.write().unwrap()["a1"]["status"] = "Live".into();
    wait_for("the live model to be served", || async {
        (ask().await == 200).then_some(())
    })
    .await;
    let jobs: Value = reqwest::get(gw.url("/resource_server/metis/jobs"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(jobs["running"][0]["Models"], "gpt-oss-120b", "{jobs}");
}

/// The id and token a cold stream's payload handed FIRST's function (the `n`-th streamed one).
fn relay_credentials(globus: &GlobusSim, n: usize) -> Option<(String, String)> {
    let payloads = globus.compute().stats.payloads.lock().unwrap().clone();
    let streamed: Vec<&String> = payloads
        .iter()
        .filter(|p| p.contains("stream_task_id"))
        .collect();
    let p = streamed.get(n)?;
    let value_after = |key: &str| {
        let rest = &p[p.find(key)? + key.len()..];
        let start = rest.find(|c: char| c.is_ascii_hexdigit())?;
        let rest = &rest[start..];
        let end = rest
            .find(|c: char| !(c.is_ascii_hexdigit() || c == '-'))
            .unwrap_or(rest.len());
        Some(rest[..end].to_string())
    };
    Some((
        value_after("stream_task_id")?,
        value_after("stream_task_token")?,
    ))
}

/// FIRST's streaming protocol: the inference function streams on the compute node and posts
/// the lines back as they are generated, so a cold model's tokens reach the client spread over
/// the generation (not all at the end); the posts need the shared secret and the task's own
/// token; and a refused request becomes an error event in the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_stream_arrives_as_it_is_generated_through_the_relay() {
    let globus = lifecycle_facility(300, 300, |c| {
        c.itl = Duration::from_millis(60);
        c.streaming_secret = Some(RELAY_SECRET.into());
    })
    .await;
    let gw = gateway(
        &globus,
        Opts {
            scale: true,
            streaming: true,
            ..DEFAULT
        },
    )
    .await;
    let stream = |max_tokens: u64| {
        let mut body = chat_body(MODEL, true);
        body["max_tokens"] = max_tokens.into();
        gw.post("/v1/chat/completions").json(&body).send()
    };
    // Both are cold (the instance they wait for is starting).
    let long = tokio::spawn(stream(16));
    let refused = tokio::spawn(stream(100_000));

    // While they wait: posts without the secret, for no waiting task, or with a wrong token.
    let (task, token) = wait_for("the first stream's payload", || async {
        relay_credentials(&globus, 0)
    })
    .await;
    let relay_post = |secret: &str, token: &str, task: &str| {
        gw.post("/resource_server/api/streaming/data/")
            .header("x-internal-secret", secret)
            .header("x-stream-task-token", token)
            .json(&serde_json::json!({"task_id": task, "data": "data: {}", "type": "data"}))
            .send()
    };
    let status = |r: reqwest::Response| r.status().as_u16();
    assert_eq!(
        status(relay_post("wrong", &token, &task).await.unwrap()),
        401
    );
    assert_eq!(
        status(relay_post(RELAY_SECRET, "wrong", &task).await.unwrap()),
        403
    );
    let nobody = "00000000-0000-4000-a000-000000000000";
    assert_eq!(
        status(relay_post(RELAY_SECRET, &token, nobody).await.unwrap()),
        404
    );

    // The long stream: content chunks arrive spread over the generation (16 tokens, 60 ms
    // apart, posted in batches every 0.5 s), complete, ended by [DONE].
    let resp = long.await.unwrap().unwrap();
    assert_eq!(route(&resp), "compute");
    let mut body = resp.bytes_stream();
    let mut text = String::new();
    let mut content_at = Vec::new();
    while let Some(chunk) = futures_util::StreamExt::next(&mut body).await {
        let chunk = String::from_utf8(chunk.unwrap().to_vec()).unwrap();
        if chunk.contains("\"content\":\"tok") {
            content_at.push(Instant::now());
        }
        text.push_str(&chunk);
    }
    let expected: String = (0..16).map(|i| format!("tok{i} ")).collect();
    assert_eq!(streamed_content(&text), expected);
    assert!(!text.contains("\"usage\""), "usage chunk hidden: {text}");
    let spread = *content_at.last().unwrap() - content_at[0];
    assert!(
        content_at.len() >= 2 && spread >= Duration::from_millis(300),
        "tokens arrived in {} pieces over {spread:?}",
        content_at.len()
    );

    // vLLM refused the other (too many tokens): an error event, then the end.
    let text = refused.await.unwrap().unwrap().text().await.unwrap();
    assert!(text.contains("compute_stream_failed"), "{text}");
    assert!(text.contains("maximum context length"), "{text}");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");

    assert_eq!(
        globus
            .compute()
            .stats
            .stream_posts_failed
            .load(Ordering::Relaxed),
        0
    );
    // The usage record has the stream's exact tokens (from the hidden usage chunk).
    wait_for("the stream's usage record", || async {
        usage_store(&gw)
            .query_row(
                "SELECT completion_tokens FROM usage WHERE route = 'compute' AND status = 200 \
                 AND completion_tokens = 16 AND tokens_unknown = 0",
                [],
                |r| r.get::<_, i64>(0),
            )
            .ok()
    })
    .await;
}

/// Against a service that refuses task groups it did not make (as since globus-compute 2.3):
/// the first submission leaves the group out and later ones reuse the one the service made,
/// so a cold JSON request, a second one and a cold stream all succeed; when the service forgets
/// the group, the next request still succeeds in a new one. And vLLM's refusal of a cold
/// request reaches the client with vLLM's status and message, as a direct one would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_requests_share_the_services_task_group_and_show_vllms_refusals() {
    let globus = lifecycle_facility(50, 50, |c| {
        c.streaming_secret = Some(RELAY_SECRET.into());
    })
    .await;
    // A node runs the model, but this gateway has no lifecycle: every request is cold.
    globus.start_job(MODEL, 8000);
    let gw = gateway(
        &globus,
        Opts {
            scale: false,
            streaming: true,
            lifecycle: false,
            ..DEFAULT
        },
    )
    .await;
    for _ in 0..2 {
        let resp = ask(&gw, false).await;
        assert_eq!(
            (resp.status().as_u16(), route(&resp)),
            (200, "compute".into())
        );
        let v: Value = resp.json().await.unwrap();
        assert_eq!(
            v["choices"][0]["message"]["content"],
            "tok0 tok1 tok2 tok3 tok4 "
        );
    }
    let text = ask(&gw, true).await.text().await.unwrap();
    assert_eq!(streamed_content(&text), "tok0 tok1 tok2 tok3 tok4 ");
    let compute = globus.compute();
    assert_eq!(
        compute.task_groups(),
        1,
        "one group, made by the service, reused"
    );

    // The service forgets it: the next request is refused in it, then sent without one.
    compute.forget_task_groups();
    let resp = ask(&gw, false).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(compute.task_groups(), 1);
    assert!(
        gw.log().contains("refused task group"),
        "the recovery is logged"
    );

    // vLLM refuses (FIRST's function raises with vLLM's answer in its text): the client gets
    // vLLM's 400 and message, not the traceback's last line.
    let mut body = chat_body(MODEL, false);
    body["max_tokens"] = 0.into();
    let resp = gw
        .post("/v1/chat/completions")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(
        v["error"]["message"], "max_tokens must be at least 1, got 0.",
        "{v}"
    );
    let said = v.to_string();
    assert!(
        !said.contains("Traceback") && !said.contains("Response time"),
        "{said}"
    );
    assert!(gw.log().contains("Traceback"), "the full text is logged");
}

/// The Anthropic Messages API on a cold model: through Compute as FIRST does (FIRST's function
/// posts to vLLM's `/v1/messages`, which answers a `message`), a stream replayed as
/// Anthropic's events, a refusal in Anthropic's envelope.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_model_answers_the_messages_api_through_compute() {
    let globus = facility(50, 50).await;
    globus.start_job(MODEL, 8000);
    let gw = gateway(
        &globus,
        Opts {
            scale: false,
            lifecycle: false,
            messages: true,
            ..DEFAULT
        },
    )
    .await;
    let body = |stream: bool, max_tokens: u32| {
        serde_json::json!({"model": MODEL, "max_tokens": max_tokens, "stream": stream,
                           "messages": [{"role": "user", "content": "hello"}]})
    };
    let resp = gw
        .post("/v1/messages")
        .json(&body(false, 3))
        .send()
        .await
        .unwrap();
    assert_eq!(
        (resp.status().as_u16(), route(&resp)),
        (200, "compute".into())
    );
    let v: Value = resp.json().await.unwrap();
    assert_eq!(
        (v["type"].as_str(), v["content"][0]["text"].as_str()),
        (Some("message"), Some("tok0 tok1 tok2 ")),
        "{v}"
    );

    let text = gw
        .post("/v1/messages")
        .json(&body(true, 3))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let kinds: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(kinds.first(), Some(&"message_start"), "{text}");
    assert_eq!(kinds.last(), Some(&"message_stop"), "{text}");
    assert!(text.contains(r#""text":"tok0 tok1 tok2 ""#), "{text}");

    let resp = gw
        .post("/v1/messages")
        .json(&body(false, 0))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let v: Value = resp.json().await.unwrap();
    assert_eq!(
        (status, v["type"].as_str(), v["error"]["type"].as_str()),
        (400, Some("error"), Some("invalid_request_error")),
        "{v}"
    );
}

/// FIRST's readiness rule: an endpoint that is online with no managers, and already got a task
/// that starts its node, is refused with 503 "not ready" rather than sent a second one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_starting_endpoint_is_not_sent_a_second_task() {
    let globus = lifecycle_facility(300, 300, |c| c.endpoints[0].cold = true).await;
    let gw = gateway(&globus, DEFAULT).await;
    let first = tokio::spawn(
        gw.post("/v1/chat/completions")
            .json(&chat_body(MODEL, false))
            .send(),
    );
    let compute = globus.compute();
    wait_for("the first request's task", || async {
        (compute.stats.tasks_inference.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    let resp = ask(&gw, false).await;
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().contains_key("retry-after"));
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "endpoint_not_ready", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not ready"),
        "{v}"
    );
    let first = first.await.unwrap().unwrap();
    assert_eq!(first.status(), 200, "the first one is answered");
    assert_eq!(compute.stats.tasks_inference.load(Ordering::SeqCst), 1);
}

/// The text of a streamed chat completion (its `data:` events, which end with `[DONE]`).
fn streamed_content(text: &str) -> String {
    let events: Vec<&str> = text
        .split("\n\n")
        .filter_map(|e| e.trim().strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{text}");
    events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}
