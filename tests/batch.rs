//! The OpenAI Files and Batch APIs: upload (checked line by line), a batch run to the end with
//! one output line per input line and a usage record per line, interactive requests never
//! refused for slots batch lines hold, cancel, and an upgrade in the middle of a batch that
//! resumes it without repeating finished lines.

#![cfg(feature = "sim")] // against the simulators

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// `n` chat requests as a batch input file.
fn input(n: usize, max_tokens: u32) -> String {
    (0..n)
        .map(|i| {
            json!({"custom_id": format!("req-{i}"), "method": "POST", "url": "/v1/chat/completions",
                   "body": {"model": LLAMA, "max_tokens": max_tokens,
                            "messages": [{"role": "user", "content": format!("line {i}")}]}})
            .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Uploads `content` as `POST /v1/files` does it (multipart/form-data).
async fn upload(gw: &Gateway, content: &str) -> (u16, Value) {
    let boundary = "firstgate-test-boundary";
    let body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\n\
         Content-Type: application/jsonl\r\n\r\n{content}\r\n--{boundary}--\r\n"
    );
    let resp = gw
        .post("/v1/files")
        .bearer_auth("tok")
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(body)
        .send()
        .await
        .unwrap();
    status_json(resp).await
}

async fn create(gw: &Gateway, file_id: &str) -> Value {
    let resp = gw
        .post("/v1/batches")
        .bearer_auth("tok")
        .json(
            &json!({"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                      "completion_window": "24h"}),
        )
        .send()
        .await
        .unwrap();
    let (status, v) = status_json(resp).await;
    assert_eq!(status, 200, "{v}");
    v
}

async fn batch(gw: &Gateway, id: &str) -> Value {
    let resp = gw
        .get(&format!("/v1/batches/{id}"))
        .bearer_auth("tok")
        .send()
        .await
        .unwrap();
    status_json(resp).await.1
}

/// Waits for the batch to reach `status`.
async fn until(gw: &Gateway, id: &str, status: &str) -> Value {
    wait_for(&format!("batch {id} {status}"), || async {
        let b = batch(gw, id).await;
        (b["status"] == status).then_some(b)
    })
    .await
}

/// The custom ids of a result file, each once.
async fn custom_ids(gw: &Gateway, file_id: &str) -> Vec<String> {
    let text = gw
        .get(&format!("/v1/files/{file_id}/content"))
        .bearer_auth("tok")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).expect("a JSON line");
            assert_eq!(v["response"]["status_code"], 200, "{v}");
            v["custom_id"].as_str().unwrap().to_string()
        })
        .collect()
}

/// A batch of `lines` requests, once `done` of them are answered; its id.
async fn running_batch(gw: &Gateway, lines: usize, done: u64) -> String {
    let (_, file) = upload(gw, &input(lines, 8)).await;
    let id = create(gw, file["id"].as_str().unwrap()).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    wait_for(&format!("{done} lines done"), || async {
        (batch(gw, &id).await["request_counts"]["completed"].as_u64() >= Some(done)).then_some(())
    })
    .await;
    id
}

fn config(backend: std::net::SocketAddr, lines_in_flight: usize) -> String {
    format!(
        "batch:\n  dir: batches\n  lines_in_flight_per_user: {lines_in_flight}\n\
         upstream:\n  max_concurrent_per_backend: 2\n  admission_wait: 0s\n{}",
        one_model("sophia", "vllm", LLAMA, &[backend])
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_runs_to_the_end_behind_interactive_requests() {
    let backend = sim(&[LLAMA], |c| c.itl = Duration::from_millis(30)).await;
    let gw = Gateway::start(&config(backend.addr(), 4)).await;

    // Each line is checked at upload.
    let bad = input(2, 4).replace("\"POST\"", "\"GET\"");
    let (status, v) = upload(&gw, &bad).await;
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("line 1"),
        "{v}"
    );
    let unknown = input(1, 4).replace(LLAMA, "no-such-model");
    let (status, v) = upload(&gw, &unknown).await;
    assert_eq!(status, 400, "{v}");

    let (status, file) = upload(&gw, &input(12, 10)).await;
    assert_eq!((status, &file["purpose"]), (200, &json!("batch")), "{file}");
    let b = create(&gw, file["id"].as_str().unwrap()).await;
    let id = b["id"].as_str().unwrap().to_string();
    assert_eq!(b["request_counts"]["total"], 12);

    // While it runs, interactive requests always find a slot (admission_wait 0: a full
    // instance would refuse them at once).
    wait_for("the batch to start", || async {
        (batch(&gw, &id).await["status"] == "in_progress").then_some(())
    })
    .await;
    for _ in 0..10 {
        let r = post_chat(&gw, "/v1/chat/completions", Some("tok"), LLAMA, false).await;
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    }

    let done = until(&gw, &id, "completed").await;
    assert_eq!(
        done["request_counts"],
        json!({"total": 12, "completed": 12, "failed": 0})
    );
    let ids = custom_ids(&gw, done["output_file_id"].as_str().unwrap()).await;
    let expected: HashSet<String> = (0..12).map(|i| format!("req-{i}")).collect();
    assert_eq!(ids.len(), 12);
    assert_eq!(ids.into_iter().collect::<HashSet<_>>(), expected);
    // One usage record per line, tagged with the batch.
    wait_for("a usage record per line", || async {
        let n: i64 = usage_store(&gw)
            .query_row(
                "SELECT count(*) FROM usage WHERE batch_id = ?1",
                [&id],
                |r| r.get(0),
            )
            .unwrap();
        (n == 12).then_some(())
    })
    .await;

    // Listed, and not under a FIRST-layout base.
    let list: Value = gw
        .get("/v1/batches?limit=1")
        .bearer_auth("tok")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["data"][0]["id"], id.as_str(), "{list}");
    let (status, v) = status_json(
        gw.get("/resource_server/sophia/vllm/v1/files")
            .bearer_auth("tok")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 404);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("/v1 base URL"),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_survives_an_upgrade_and_another_is_cancelled() {
    let backend = sim(&[LLAMA], |c| c.itl = Duration::from_millis(25)).await;
    let mut old = Gateway::start(&config(backend.addr(), 1)).await;
    let id = running_batch(&old, 16, 3).await;

    // Hand over to a new process in the middle of the batch.
    let _new = old.start_successor();
    old.signal("QUIT");
    wait_for("the old process to exit", || {
        let exited = old.exited();
        async move { exited.then_some(()) }
    })
    .await;
    let done = until(&old, &id, "completed").await;
    let ids = custom_ids(&old, done["output_file_id"].as_str().unwrap()).await;
    let unique: HashSet<&String> = ids.iter().collect();
    assert_eq!((ids.len(), unique.len()), (16, 16), "{ids:?}");
    // The runner's credential stays in the gateway (the last request was a batch line).
    let headers = backend
        .last_request_headers()
        .expect("a request reached the backend");
    assert!(
        !headers.contains_key("x-firstgate-batch") && !headers.contains_key("x-firstgate-batch-id"),
        "{headers:?}"
    );

    // A cancel stops new lines and keeps what is done.
    let id = running_batch(&old, 16, 1).await;
    let resp = old
        .post(&format!("/v1/batches/{id}/cancel"))
        .bearer_auth("tok")
        .send()
        .await
        .unwrap();
    let (status, v) = status_json(resp).await;
    assert_eq!(status, 200, "{v}");
    assert!(
        ["cancelling", "cancelled"].contains(&v["status"].as_str().unwrap()),
        "{v}"
    );
    let cancelled = until(&old, &id, "cancelled").await;
    let completed = cancelled["request_counts"]["completed"].as_u64().unwrap();
    assert!(completed < 16, "{cancelled}");
    let ids = custom_ids(&old, cancelled["output_file_id"].as_str().unwrap()).await;
    assert_eq!(ids.len() as u64, completed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_batches_and_one_resumes_them_when_the_runner_dies() {
    let servers = StateServers::start();
    let shared_dir = tempfile::tempdir().unwrap();
    let backend = sim(&[LLAMA], |c| c.itl = Duration::from_millis(25)).await;
    let body = format!(
        "usage:\n  store: {}\n  flush_interval: 50ms\n\
         batch:\n  dir: {}\n  lines_in_flight_per_user: 2\n  max_active_per_user: 2\n  lease: 3s\n\
         upstream:\n  max_concurrent_per_backend: 4\n  admission_wait: 0s\n{}",
        servers.postgres,
        shared_dir.path().display(),
        one_model("sophia", "vllm", LLAMA, &[backend.addr()])
    );
    // Replica A runs batches (it holds the lease); B starts later and waits for it.
    let mut a = Gateway::start(&body).await;
    let id = running_batch(&a, 100, 3).await;
    let b = Gateway::start(&body).await;
    // Any replica answers for any batch, and lists them ...
    assert_eq!(batch(&b, &id).await["id"], id.as_str());
    for list in ["/v1/batches?limit=5", "/v1/files?purpose=batch"] {
        let resp = b.get(list).bearer_auth("tok").send().await.unwrap();
        let (status, v) = status_json(resp).await;
        assert_eq!(
            (status, v["data"].as_array().map(Vec::len)),
            (200, Some(1)),
            "{list}: {v}"
        );
    }
    // ... and a cancel through B stops the batch A runs.
    let other = running_batch(&b, 16, 1).await;
    let resp = b
        .post(&format!("/v1/batches/{other}/cancel"))
        .bearer_auth("tok")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let cancelled = until(&b, &other, "cancelled").await;
    assert!(
        cancelled["request_counts"]["completed"].as_u64().unwrap() < 16,
        "{cancelled}"
    );

    // kill -9 of the runner: B takes the lease once it lapses and resumes the batch, without
    // repeating a line.
    assert_eq!(batch(&b, &id).await["status"], "in_progress");
    signal(a.pid(), "KILL");
    wait_for("replica A to die", || {
        let gone = a.exited();
        async move { gone.then_some(()) }
    })
    .await;
    let done = until(&b, &id, "completed").await;
    let ids = custom_ids(&b, done["output_file_id"].as_str().unwrap()).await;
    let unique: HashSet<&String> = ids.iter().collect();
    assert_eq!((ids.len(), unique.len()), (100, 100));
}

mod first {
    //! FIRST's batch API against the Compute stand-in's batch function.

    use super::*;
    use firstgate::sim::globus::{
        ComputeSeed, FakeClient, FakeEndpoint, FakeFunction, FakeUser, GlobusSim, Seed,
    };

    const EP: &str = "5a0b7c1d-2e3f-4a5b-8c6d-7e8f9a0b1c2d";
    const F_INFER: &str = "6b1c8d2e-3f4a-4b5c-9d7e-8f9a0b1c2d3e";
    const F_BATCH: &str = "7c2d9e3f-4a5b-4c6d-8e8f-9a0b1c2d3e4f";

    async fn gateway(results: &std::path::Path) -> (GlobusSim, Gateway) {
        gateway_with(results, "").await
    }

    /// With `extra` configuration lines (at the top level).
    async fn gateway_with(results: &std::path::Path, extra: &str) -> (GlobusSim, Gateway) {
        let globus = GlobusSim::start(
            "127.0.0.1:0".parse().unwrap(),
            Seed {
                clients: vec![FakeClient {
                    id: "gw".into(),
                    secret: "gw-secret".into(),
                }],
                users: vec![
                    FakeUser::new("tok-alice", "alice@anl.gov"),
                    FakeUser::new("tok-bob", "bob@anl.gov"),
                ],
                compute: ComputeSeed {
                    endpoints: vec![FakeEndpoint {
                        id: EP.into(),
                        name: "sophia".into(),
                        cold: false,
                    }],
                    functions: vec![
                        FakeFunction {
                            id: F_INFER.into(),
                            kind: "inference".into(),
                        },
                        FakeFunction {
                            id: F_BATCH.into(),
                            kind: "batch".into(),
                        },
                    ],
                    batch_results_dir: Some(results.to_path_buf()),
                    ..ComputeSeed::default()
                },
                ..Seed::default()
            },
        )
        .await
        .unwrap();
        let url = globus.url();
        let staging = results.join("staging").display().to_string();
        let gw = Gateway::start_with(
            &globus_auth(&url, "gw", "", ""),
            &format!(
                "{extra}batch:\n  dir: batches\n  max_active_per_user: 1\n  staging_dir: {staging}\n\
                 limits:\n  requests_per_second: 0\n\
                 compute:\n  url: {url}\n  auth_url: {url}\n  client_id: gw\n  \
                 client_secret_env: {GLOBUS_SECRET_ENV}\n\
                 clusters:\n  sophia:\n    frameworks:\n      vllm:\n        models:\n\
                 \x20         - name: {LLAMA}\n            backends: []\n            compute:\n\
                 \x20             endpoint: {EP}\n              function: {F_INFER}\n\
                 \x20             batch_endpoint: {EP}\n              batch_function: {F_BATCH}\n\
                 \x20         - name: {OTHER}\n            backends: []\n            compute:\n\
                 \x20             endpoint: {EP}\n              function: {F_INFER}\n"
            ),
            &[(GLOBUS_SECRET_ENV, "gw-secret")],
        )
        .await;
        (globus, gw)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_policy_sends_an_openai_batch_to_the_batch_function() {
        let dir = tempfile::tempdir().unwrap();
        let policy = dir.path().join("route.rhai");
        std::fs::write(
            &policy,
            "fn route(req, candidates) { direct(candidates.requested(req)) }\n\
             fn batch(job) { if job.batch_function { \"compute\" } else { \"gateway\" } }\n",
        )
        .unwrap();
        let (globus, gw) = gateway_with(
            dir.path(),
            &format!("policies:\n  route: {}\n", policy.display()),
        )
        .await;
        let resp = gw
            .post("/v1/files")
            .bearer_auth("tok-alice")
            .header("content-type", "multipart/form-data; boundary=b")
            .body(format!(
                "--b\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--b\r\n\
                 Content-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\n\r\n{}\r\n--b--\r\n",
                super::input(5, 4)
            ))
            .send()
            .await
            .unwrap();
        let (status, file) = status_json(resp).await;
        assert_eq!(status, 200, "{file}");
        let (status, b) = call(
            &gw,
            "tok-alice",
            "POST",
            "/v1/batches",
            Some(
                json!({"input_file_id": file["id"], "endpoint": "/v1/chat/completions",
                        "completion_window": "24h"}),
            ),
        )
        .await;
        assert_eq!(status, 200, "{b}");
        let path = format!("/v1/batches/{}", b["id"].as_str().unwrap());
        let done = wait_for("the batch to complete on Compute", || async {
            let (_, b) = call(&gw, "tok-alice", "GET", &path, None).await;
            (b["status"] == "completed").then_some(b)
        })
        .await;
        assert_eq!(done["request_counts"]["completed"], 5, "{done}");
        let out = gw
            .get(&format!(
                "/v1/files/{}/content",
                done["output_file_id"].as_str().unwrap()
            ))
            .bearer_auth("tok-alice")
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let ids: HashSet<String> = out
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["custom_id"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(
            ids,
            (0..5).map(|i| format!("req-{i}")).collect::<HashSet<_>>()
        );
        // It ran as one task of the batch function, not as five requests of the gateway.
        let payloads = globus.compute().stats.payloads.lock().unwrap().clone();
        assert_eq!(
            payloads
                .iter()
                .filter(|p| p.contains("output_folder_path"))
                .count(),
            1
        );
    }

    const OTHER: &str = "Qwen/Qwen2.5-7B-Instruct";

    async fn call(
        gw: &Gateway,
        token: &str,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let client = reqwest::Client::new();
        let mut req = client
            .request(method.parse().unwrap(), gw.url(path))
            .bearer_auth(token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        status_json(req.send().await.unwrap()).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn firsts_batch_routes_run_the_batch_function() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("prompts.jsonl");
        std::fs::write(&input, input_lines()).unwrap();
        let (globus, gw) = gateway(dir.path()).await;
        let create = "/resource_server/sophia/vllm/v1/batches";
        let body = |model: &str| json!({"model": model, "input_file": input.display().to_string()});

        // FIRST's refusals.
        let (s, v) = call(&gw, "tok-alice", "POST", create, Some(body(OTHER))).await;
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (400, Some("batch_unavailable")),
            "{v}"
        );
        let (s, v) = call(
            &gw,
            "tok-alice",
            "POST",
            create,
            Some(json!({"model": LLAMA, "input_file": "x", "extra": 1})),
        )
        .await;
        assert_eq!(s, 400, "{v}");
        let (s, v) = call(
            &gw,
            "tok-alice",
            "POST",
            create,
            Some(json!({"input_file_id": "file-1"})),
        )
        .await;
        assert!(
            s == 400 && v["error"]["message"].as_str().unwrap().contains("/v1"),
            "{v}"
        );

        // A batch runs for a while (the stand-in holds it): it stays pending meanwhile.
        let hold = &globus.compute().faults.hold_batches;
        hold.store(true, Ordering::SeqCst);
        let (s, v) = call(&gw, "tok-alice", "POST", create, Some(body(LLAMA))).await;
        assert_eq!((s, &v["status"]), (200, &json!("pending")), "{v}");
        let id = v["batch_id"].as_str().unwrap().to_string();
        // FIRST's `task_ids`: the ids joined by commas, a string.
        assert!(v["task_ids"].as_str().is_some_and(|t| t.len() == 36), "{v}");
        // A second batch of hers is over the quota (1); the same file is "in use" for her
        // only: Bob may run it too.
        let (s, v) = call(&gw, "tok-alice", "POST", create, Some(body(LLAMA))).await;
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (400, Some("quota_exceeded")),
            "{v}"
        );
        let (s, v) = call(&gw, "tok-bob", "POST", create, Some(body(LLAMA))).await;
        assert_eq!((s, &v["status"]), (200, &json!("pending")), "{v}");

        // Another user's batch: 403; an unknown one: 404.
        let status = format!("/resource_server/v1/batches/{id}");
        let (s, v) = call(&gw, "tok-bob", "GET", &status, None).await;
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (403, Some("access_denied")),
            "{v}"
        );
        let (s, v) = call(
            &gw,
            "tok-alice",
            "GET",
            "/resource_server/v1/batches/nope",
            None,
        )
        .await;
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (404, Some("batch_not_found")),
            "{v}"
        );
        // FIRST's own envelope on FIRST's routes: code, message and info.
        assert!(
            v["error"]["message"].is_string() && v["error"]["info"].is_object(),
            "{v}"
        );
        assert!(v["error"].get("type").is_none(), "{v}");

        let (s, v) = call(&gw, "tok-alice", "GET", &format!("{status}/result"), None).await;
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (400, Some("batch_ongoing")),
            "{v}"
        );
        hold.store(false, Ordering::SeqCst);
        wait_for("the batch to complete", || async {
            (call(&gw, "tok-alice", "GET", &status, None).await.1 == json!("completed"))
                .then_some(())
        })
        .await;
        let (s, result) = call(&gw, "tok-alice", "GET", &format!("{status}/result"), None).await;
        assert_eq!(s, 200, "{result}");
        let summary: Value = serde_json::from_str(result.as_str().unwrap()).unwrap();
        let results = std::fs::read_to_string(summary["results_file"].as_str().unwrap()).unwrap();
        assert_eq!(results.lines().count(), 3, "{results}");
        let (_, list) = call(
            &gw,
            "tok-alice",
            "GET",
            "/resource_server/v1/batches?status=completed",
            None,
        )
        .await;
        assert_eq!(list[0]["batch_id"], id.as_str(), "{list}");
        let (_, list) = call(&gw, "tok-bob", "GET", "/resource_server/v1/batches", None).await;
        assert_eq!(list.as_array().unwrap().len(), 1, "only his own: {list}");

        // A batch whose function fails (no such input file): its result is 400 batch_failed.
        let missing = json!({"model": LLAMA, "input_file": "/nonexistent/prompts.jsonl"});
        let (s, v) = call(&gw, "tok-alice", "POST", create, Some(missing)).await;
        assert_eq!(s, 200, "{v}");
        let failed = format!(
            "/resource_server/v1/batches/{}",
            v["batch_id"].as_str().unwrap()
        );
        wait_for("the batch to fail", || async {
            (call(&gw, "tok-alice", "GET", &failed, None).await.1 == json!("failed")).then_some(())
        })
        .await;
        let (s, v) = call(&gw, "tok-alice", "GET", &format!("{failed}/result"), None).await;
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (400, Some("batch_failed")),
            "{v}"
        );
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("FileNotFoundError"),
            "{v}"
        );
    }

    /// FIRST checks the batch endpoint before submitting: offline, the batch is refused at
    /// once (503) instead of sitting pending for days.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_for_an_offline_endpoint_fails_fast() {
        let dir = tempfile::tempdir().unwrap();
        let (globus, gw) = gateway(dir.path()).await;
        globus
            .compute()
            .faults
            .offline
            .lock()
            .unwrap()
            .push(EP.into());
        let body = json!({"model": LLAMA, "input_file": "/data/prompts.jsonl"});
        let (s, v) = call(
            &gw,
            "tok-alice",
            "POST",
            "/resource_server/sophia/vllm/v1/batches",
            Some(body),
        )
        .await;
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (503, Some("endpoint_offline")),
            "{v}"
        );
        let (_, list) = call(&gw, "tok-alice", "GET", "/resource_server/v1/batches", None).await;
        assert_eq!(list, json!([]), "nothing recorded");
        assert_eq!(globus.compute().stats.submit.load(Ordering::SeqCst), 0);
    }

    fn input_lines() -> String {
        super::input(3, 4)
    }
}
