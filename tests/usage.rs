//! Usage records with exact tokens, what clients see of the injected usage chunk, cancelled
//! streams, rate limits, the store surviving kill -9, and the metrics.

#![cfg(feature = "sim")] // against the simulators

mod common;

use common::*;
use firstgate::sim::globus::{FakeClient, FakeUser, GlobusSim, Seed};
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;

async fn post(gw: &Gateway, body: Value) -> reqwest::Response {
    let req = gw.post("/v1/chat/completions").bearer_auth("tok");
    req.json(&body).send().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_exact_and_the_injected_usage_chunk_is_hidden() {
    let chat = sim(&[LLAMA], |_| {}).await;
    let gw = Gateway::start(&one_model("sophia", "vllm", LLAMA, &[chat.addr()])).await;

    let resp = post(&gw, chat_body(LLAMA, false)).await;
    assert!(resp.headers().contains_key("x-firstgate-overhead-ms"));
    assert!(resp.headers().contains_key("x-request-id"));
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 5);

    // A client that did not ask for usage gets none, though the gateway asked the backend.
    let events = sse_events(post(&gw, chat_body(LLAMA, true)).await).await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert!(
        !events.iter().any(|e| e.contains("\"usage\"")),
        "{events:?}"
    );
    let sent = chat.last_request_body().unwrap();
    assert!(String::from_utf8_lossy(&sent).contains(r#""stream_options":{"include_usage":true}"#));

    // A client that asked keeps its usage chunk.
    let mut asked = chat_body(LLAMA, true);
    asked["stream_options"] = json!({"include_usage": true});
    let events = sse_events(post(&gw, asked).await).await;
    let usage: Vec<Value> = events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter(|v| !v["usage"].is_null())
        .collect();
    assert_eq!(usage.len(), 1);
    assert_eq!(usage[0]["usage"]["completion_tokens"], 5);

    // Three records, each with the backend's exact counts.
    wait_for("three records in the store", || async {
        (usage_rows(&gw, "1") == 3).then_some(())
    })
    .await;
    assert_eq!(
        usage_rows(
            &gw,
            "prompt_tokens = 5 AND completion_tokens = 5 AND total_tokens = 10"
        ),
        3
    );
    assert_eq!(
        usage_rows(
            &gw,
            "cancelled = 0 AND status = 200 AND route = 'direct' AND cluster = 'sophia'"
        ),
        3
    );
    let totals = usage_report(&gw);
    assert_eq!(totals[0]["requests"], 3);
    assert_eq!(totals[0]["total_tokens"], 30);
    let mine: Value = reqwest::Client::new()
        .get(gw.url("/resource_server/usage"))
        .bearer_auth("tok")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(mine["total"]["completion_tokens"], 15, "{mine}");

    let metrics = gw.metrics().await;
    let line = format!(
        "firstgate_tokens_total{{cluster=\"sophia\",kind=\"completion\",model=\"{LLAMA}\"}} 15"
    );
    assert!(metrics.contains(&line), "{metrics}");
    assert!(metrics.contains("firstgate_usage_records_written_total 3"));
    assert!(metrics.contains("firstgate_usage_queue_depth 0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_stream_is_recorded_with_the_tokens_so_far() {
    let chat = sim(&[LLAMA], |c| c.itl = std::time::Duration::from_millis(30)).await;
    let gw = Gateway::start(&one_model("sophia", "vllm", LLAMA, &[chat.addr()])).await;
    let mut body = chat_body(LLAMA, true);
    body["max_tokens"] = json!(200);
    let mut stream = post(&gw, body).await.bytes_stream();
    let mut seen = String::new();
    while seen.matches("tok").count() < 3 {
        seen.push_str(std::str::from_utf8(&stream.next().await.unwrap().unwrap()).unwrap());
    }
    drop(stream);
    wait_for("the cancelled record", || async {
        (usage_rows(
            &gw,
            "cancelled = 1 AND completion_tokens >= 3 AND completion_tokens < 200",
        ) == 1)
            .then_some(())
    })
    .await;
}

async fn globus_user() -> GlobusSim {
    let seed = Seed {
        clients: vec![FakeClient {
            id: "gw".into(),
            secret: "gw-secret".into(),
        }],
        users: vec![
            FakeUser::new("tok", "alice@anl.gov"),
            FakeUser::new("tok-bob", "bob@anl.gov"),
        ],
        ..Seed::default()
    };
    GlobusSim::start("127.0.0.1:0".parse().unwrap(), seed)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_limit_answers_429_then_recovers() {
    let globus = globus_user().await;
    let chat = sim(&[LLAMA], |_| {}).await;
    let auth = globus_auth(&globus.url(), "gw", "", "");
    let body = format!(
        "limits:\n  requests_per_second: 3\n  ip_requests_per_second: 20\n  ip_burst: 20\n  token_window: 2s\n\
         clusters:\n  sophia:\n    frameworks:\n      vllm:\n        models:\n          - name: {LLAMA}\n\
         \x20           backends: [{}]\n            tokens_per_minute_per_user: 10\n",
        chat.addr()
    );
    let gw = Gateway::start_with(&auth, &body, &[(GLOBUS_SECRET_ENV, "gw-secret")]).await;
    let models = || async {
        reqwest::Client::new()
            .get(gw.url("/v1/models"))
            .bearer_auth("tok")
            .send()
            .await
            .unwrap()
    };

    // Requests per second per user.
    let statuses: Vec<u16> = futures_util::future::join_all((0..6).map(|_| models()))
        .await
        .iter()
        .map(|r| r.status().as_u16())
        .collect();
    assert!(statuses.contains(&429), "{statuses:?}");
    let limited = loop {
        let r = models().await;
        if r.status() == 429 {
            break r;
        }
    };
    assert!(limited.headers().contains_key("retry-after"));
    let v: Value = limited.json().await.unwrap();
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("3 requests per second"));
    wait_for("the user limit to recover", || async {
        (models().await.status() == 200).then_some(())
    })
    .await;

    // Tokens per window per user of a model: 10 used by the first request (5 + 5).
    wait_for("a request inside the token budget", || async {
        (post(&gw, chat_body(LLAMA, false)).await.status() == 200).then_some(())
    })
    .await;
    // (Polling also meets the request limit; wait for the token limit's own answer.)
    wait_for("the token limit", || async {
        let r = post(&gw, chat_body(LLAMA, false)).await;
        let v: Value = r.json().await.unwrap_or_default();
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("tokens per minute per user"))
            .then_some(())
    })
    .await;
    wait_for("the token window to roll over", || async {
        (post(&gw, chat_body(LLAMA, false)).await.status() == 200).then_some(())
    })
    .await;

    // Per address, on every route (the health route here).
    let health = || async {
        reqwest::get(gw.url("/resource_server/health"))
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    wait_for("the address limit", || async {
        (health().await == 429).then_some(())
    })
    .await;
    wait_for("the address limit to recover", || async {
        (health().await == 200).then_some(())
    })
    .await;

    let metrics = gw.metrics().await;
    for limit in [
        "requests_per_second",
        "tokens_per_minute_per_user",
        "ip_requests_per_second",
    ] {
        assert!(
            metrics.contains(&format!(
                "firstgate_rate_limited_total{{limit=\"{limit}\"}}"
            )),
            "{limit}: {metrics}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_records_survive_kill_9() {
    let chat = sim(&[LLAMA], |_| {}).await;
    let gw = Gateway::start(&format!(
        "limits:\n  ip_requests_per_second: 0\nusage:\n  flush_interval: 100ms\n{}",
        one_model("sophia", "vllm", LLAMA, &[chat.addr()])
    ))
    .await;
    let n = 200;
    let ok =
        futures_util::future::join_all((0..n).map(|_| post(&gw, chat_body(LLAMA, false)))).await;
    assert!(ok.iter().all(|r| r.status() == 200));
    // Everything acknowledged is committed within the flush interval...
    wait_for("the records to be committed", || async {
        gw.metrics()
            .await
            .contains(&format!("firstgate_usage_records_written_total {n}"))
            .then_some(())
    })
    .await;
    // ...and a kill -9 then loses none of it.
    gw.signal("KILL");
    wait_for("the gateway to die", || async {
        std::net::TcpStream::connect(gw.addr).is_err().then_some(())
    })
    .await;
    assert_eq!(usage_rows(&gw, "1"), n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_at_the_concurrency_cap_does_not_block_another() {
    let globus = globus_user().await;
    let chat = sim(&[LLAMA], |c| c.itl = std::time::Duration::from_millis(100)).await;
    let gw = Gateway::start_with(
        &globus_auth(&globus.url(), "gw", "", ""),
        &format!(
            "limits:\n  max_concurrent_per_user: 2\n  ip_requests_per_second: 0\n{}",
            one_model("sophia", "vllm", LLAMA, &[chat.addr()])
        ),
        &[(GLOBUS_SECRET_ENV, "gw-secret")],
    )
    .await;
    let long = json!({"model": LLAMA, "stream": true, "max_tokens": 30,
        "messages": [{"role": "user", "content": "a long story"}]});
    // Alice's two long streams take her share...
    let streams: Vec<_> = (0..2)
        .map(|_| {
            let req = gw
                .post("/v1/chat/completions")
                .bearer_auth("tok")
                .json(&long);
            tokio::spawn(async move { req.send().await.unwrap().text().await.unwrap() })
        })
        .collect();
    wait_for("alice's streams to run", || async {
        (chat.stats().running.load(Ordering::Relaxed) == 2).then_some(())
    })
    .await;
    // ...a third is refused, naming the limit...
    let third = post(&gw, chat_body(LLAMA, false)).await;
    assert_eq!(third.status(), 429);
    assert!(third.headers().contains_key("retry-after"));
    let v: Value = third.json().await.unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("in flight per user"),
        "{v}"
    );
    // ...while Bob is served.
    let bob = post_chat(&gw, "/v1/chat/completions", Some("tok-bob"), LLAMA, false).await;
    assert_eq!(bob.status(), 200);
    assert_eq!(
        chat.stats().running.load(Ordering::Relaxed),
        2,
        "alice's still run"
    );
    for s in streams {
        assert!(s.await.unwrap().contains("[DONE]"));
    }
    // Her share is back once they end.
    assert_eq!(post(&gw, chat_body(LLAMA, false)).await.status(), 200);
    assert!(gw
        .metrics()
        .await
        .contains("firstgate_rate_limited_total{limit=\"max_concurrent_per_user\"} 1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_locked_for_seconds_loses_no_record_and_holds_up_no_request() {
    let chat = sim(&[LLAMA], |_| {}).await;
    let gw = Gateway::start(&format!(
        "limits:\n  ip_requests_per_second: 0\nusage:\n  flush_interval: 50ms\n{}",
        one_model("sophia", "vllm", LLAMA, &[chat.addr()])
    ))
    .await;
    // Something else takes the database's write lock (a backup, a long report).
    let holder = usage_store(&gw);
    holder.execute_batch("BEGIN EXCLUSIVE").unwrap();
    // Every request is answered while the lock is held: none waits for the store.
    let answers =
        futures_util::future::join_all((0..50).map(|_| post(&gw, chat_body(LLAMA, false)))).await;
    assert!(answers.iter().all(|r| r.status() == 200));
    wait_for("the writer to meet the lock and retry", || async {
        (metric(&gw.metrics().await, "firstgate_usage_write_errors_total") >= 2.0).then_some(())
    })
    .await;
    holder.execute_batch("COMMIT").unwrap();
    wait_for(
        "every record to be written once the lock is gone",
        || async { (usage_rows(&gw, "1 = 1") == 50).then_some(()) },
    )
    .await;
    assert_eq!(
        metric(&gw.metrics().await, "firstgate_usage_records_dropped_total"),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cut_at_the_end_of_the_grace_period_still_leaves_its_record() {
    let chat = sim(&[LLAMA], |c| c.itl = std::time::Duration::from_millis(200)).await;
    let mut gw = Gateway::start(&format!(
        "shutdown:\n  grace_period: 1s\n  final_timeout: 1s\n{}",
        one_model("sophia", "vllm", LLAMA, &[chat.addr()])
    ))
    .await;
    let long = json!({"model": LLAMA, "stream": true, "max_tokens": 200,
        "messages": [{"role": "user", "content": "a very long story"}]});
    let stream = tokio::spawn(post(&gw, long).await.text());
    wait_for("the stream to run", || async {
        (chat.stats().running.load(Ordering::Relaxed) == 1).then_some(())
    })
    .await;
    gw.signal("TERM");
    wait_for("the gateway to exit", || {
        let exited = gw.exited();
        async move { exited.then_some(()) }
    })
    .await;
    let _ = stream.await;
    assert_eq!(
        usage_rows(&gw, "failed = 1 AND cancelled = 0 AND status = 200"),
        1
    );
}

/// `/v1/responses` where a framework lists it: JSON and typed-event streams reach the client as
/// vLLM sent them (no `stream_options` added, no `[DONE]`), bad input is refused with the field
/// named, and the usage comes from the response's own `input_tokens`/`output_tokens`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_endpoint_json_and_stream_with_usage() {
    let chat = sim(&[LLAMA], |_| {}).await;
    let gw = Gateway::start(&format!(
        "clusters:\n  sophia:\n    frameworks:\n      vllm:\n        \
         endpoints: [chat/completions, responses]\n        models:\n          \
         - name: {LLAMA}\n            backends: [{}]\n",
        chat.addr()
    ))
    .await;
    let ask = |body: Value| {
        gw.post("/resource_server/sophia/vllm/v1/responses")
            .bearer_auth("tok")
            .json(&body)
            .send()
    };
    let v: Value = ask(json!({"model": LLAMA, "input": "say hello", "max_output_tokens": 4}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["object"], "response");
    assert_eq!(v["status"], "incomplete");
    assert_eq!(v["usage"]["output_tokens"], 4);

    let resp = ask(
        json!({"model": LLAMA, "stream": true, "max_output_tokens": 3,
                          "input": [{"role": "user", "content": "say hello"}]}),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert!(text.starts_with("event: response.created\n"), "{text}");
    assert!(text.contains("event: response.output_text.delta"));
    assert!(
        text.trim_end().lines().rev().nth(1) == Some("event: response.completed"),
        "{text}"
    );
    assert!(!text.contains("[DONE]"));
    let sent: Value = serde_json::from_slice(&chat.last_request_body().unwrap()).unwrap();
    assert!(sent.get("stream_options").is_none(), "{sent}");

    let resp = ask(json!({"model": LLAMA, "input": 42})).await.unwrap();
    let (status, e) = status_json(resp).await;
    assert_eq!(
        (status, e["error"]["param"].as_str()),
        (400, Some("input")),
        "{e}"
    );

    // Not offered for embeddings-only frameworks and the like: a clear 400.
    let resp = gw
        .post("/resource_server/sophia/vllm/v1/completions")
        .bearer_auth("tok")
        .json(&json!({"model": LLAMA, "prompt": "x"}))
        .send()
        .await
        .unwrap();
    let (status, e) = status_json(resp).await;
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (400, Some("unsupported_endpoint")),
        "{e}"
    );
    // ...naming what the model does offer.
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("/v1/responses"),
        "{e}"
    );

    wait_for("two records with the responses' tokens", || async {
        (usage_rows(&gw, "endpoint = 'responses' AND status = 200") == 2).then_some(())
    })
    .await;
    assert_eq!(
        usage_rows(&gw,
            "endpoint = 'responses' AND completion_tokens IN (3, 4) AND prompt_tokens > 0 AND tokens_unknown = 0"
        ),
        2
    );
}

/// The sums of `usage_hourly`: requests and total tokens.
fn hourly_sums(db: &rusqlite::Connection) -> (i64, i64) {
    db.query_row(
        "SELECT COALESCE(SUM(requests), 0), COALESCE(SUM(total_tokens), 0) FROM usage_hourly",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .unwrap()
}

/// `firstgate usage --json` with `args`: the totals, and what it says it read.
fn usage_with(gw: &Gateway, args: &[&str]) -> (Value, String) {
    let config = gw.config_path();
    let mut all = vec!["usage", "--json", "--config", config.to_str().unwrap()];
    all.extend_from_slice(args);
    let (ok, stdout, stderr) = firstgate(&all);
    assert!(ok, "{stderr}");
    (serde_json::from_str(&stdout).unwrap(), stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_records_past_the_retention_are_deleted_and_their_hours_still_count() {
    let chat = sim(&[LLAMA], |_| {}).await;
    let gw = Gateway::start(&format!(
        "limits:\n  ip_requests_per_second: 0\n\
         usage:\n  flush_interval: 50ms\n  retention: 2s\n{}",
        one_model("sophia", "vllm", LLAMA, &[chat.addr()])
    ))
    .await;
    let n = 12;
    let mut sent_tokens = 0;
    for _ in 0..n {
        let v: Value = post(&gw, chat_body(LLAMA, false))
            .await
            .json()
            .await
            .unwrap();
        sent_tokens += v["usage"]["total_tokens"].as_i64().unwrap();
    }
    // Every record is written, then deleted once older than the retention...
    wait_for("every raw record to be deleted", || async {
        let m = gw.metrics().await;
        let deleted = metric(&m, "firstgate_usage_rows_deleted_total{table=\"usage\"}");
        (deleted == n as f64 && usage_rows(&gw, "1") == 0).then_some(())
    })
    .await;
    // ... while their hours stay, with exactly what was sent.
    assert_eq!(hourly_sums(&usage_store(&gw)), (n, sent_tokens));
    let (totals, said) = usage_with(&gw, &[]);
    assert_eq!(totals[0]["requests"], n, "{totals}");
    assert_eq!(totals[0]["total_tokens"], sent_tokens, "{totals}");
    assert!(said.contains("hourly rollups"), "{said}");
    let (long, _) = usage_with(&gw, &["--since", "400d"]);
    assert_eq!(long, totals);
    // The operator page's chart and the user's own usage count them too.
    let (_, summary) = status_json(
        reqwest::get(gw.admin_url("/api/usage?window=1h"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(summary["total"]["requests"], n, "{summary}");
    let (_, mine) = status_json(
        gw.get("/resource_server/usage")
            .bearer_auth("tok")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(mine["total"]["total_tokens"], sent_tokens, "{mine}");

    // A graceful stop empties the write-ahead log (a reader kept open keeps SQLite from
    // deleting the file, so its size shows the checkpoint).
    let reader = usage_store(&gw);
    let _: i64 = reader
        .query_row("SELECT COUNT(*) FROM usage_hourly", [], |r| r.get(0))
        .unwrap();
    let wal = gw.config_path().with_file_name("firstgate-usage.db-wal");
    assert!(
        std::fs::metadata(&wal).unwrap().len() > 0,
        "records were written"
    );
    gw.signal("TERM");
    wait_for("the gateway to stop and empty its log", || {
        let size = std::fs::metadata(&wal).map(|m| m.len());
        let stopped = std::net::TcpStream::connect(gw.addr).is_err();
        async move { (matches!(size, Ok(0)) && stopped).then_some(()) }
    })
    .await;
    drop(reader);
}

/// A usage store as the gateway left it before rollups (schema version 5), with `rows` records
/// a minute apart from 4 days ago; returns their total tokens.
fn store_of_version_5(path: &std::path::Path, rows: i64) -> i64 {
    let db = rusqlite::Connection::open(path).unwrap();
    db.execute_batch(
        "CREATE TABLE usage (request_id TEXT PRIMARY KEY, time_ms INTEGER NOT NULL, \
         user_id TEXT NOT NULL, username TEXT NOT NULL, cluster TEXT NOT NULL, \
         framework TEXT NOT NULL, model TEXT NOT NULL, endpoint TEXT NOT NULL, \
         route TEXT NOT NULL, status INTEGER NOT NULL, prompt_tokens INTEGER NOT NULL, \
         completion_tokens INTEGER NOT NULL, total_tokens INTEGER NOT NULL, ttft_ms INTEGER, \
         duration_ms INTEGER NOT NULL, bytes_in INTEGER NOT NULL, bytes_out INTEGER NOT NULL, \
         instance TEXT NOT NULL, cancelled INTEGER NOT NULL, \
         failed INTEGER NOT NULL DEFAULT 0, tokens_unknown INTEGER NOT NULL DEFAULT 0, \
         trace_id TEXT NOT NULL DEFAULT '', loadtest INTEGER NOT NULL DEFAULT 0, batch_id TEXT); \
         CREATE INDEX usage_user_time ON usage (username, time_ms); \
         CREATE INDEX usage_model_time ON usage (model, time_ms); PRAGMA user_version = 5;",
    )
    .unwrap();
    let start = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
        - 4 * 24 * 3_600_000;
    let mut tokens = 0;
    for i in 0..rows {
        let total = 10 + i % 7;
        tokens += total;
        db.execute(
            "INSERT INTO usage VALUES (?1, ?2, 'u', 'alice@anl.gov', 'sophia', 'vllm', ?3, \
             'chat/completions', 'direct', 200, 4, ?4 - 4, ?4, 30, 100, 10, 10, 'i', 0, 0, 0, \
             '', 0, NULL)",
            rusqlite::params![format!("old-{i}"), start + i * 60_000, LLAMA, total],
        )
        .unwrap();
    }
    tokens
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_store_gets_its_rollups_while_serving_and_keeps_its_totals() {
    let chat = sim(&[LLAMA], |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.db");
    let rows = 4_500; // more than one backfill step, over 75 hours
    let tokens = store_of_version_5(&path, rows);
    let gw = Gateway::start(&format!(
        "usage:\n  store: {}\n  flush_interval: 50ms\n  retention: 1d\n{}",
        path.display(),
        one_model("sophia", "vllm", LLAMA, &[chat.addr()])
    ))
    .await;
    // It serves while the old rows are rolled up, then those past a day are deleted.
    assert_eq!(post(&gw, chat_body(LLAMA, false)).await.status(), 200);
    let db = rusqlite::Connection::open(&path).unwrap();
    wait_for(
        "the old rows rolled up and those past a day deleted",
        || {
            let left: i64 = db
                .query_row(
                    "SELECT COUNT(*) FROM usage WHERE request_id LIKE 'old-%'",
                    [],
                    |r| r.get(0),
                )
                .unwrap();
            let rolled = hourly_sums(&db).0;
            // 4 days ago plus 75 hours of minutes: the last ~3 hours are inside the day.
            async move { (rolled == rows + 1 && left < 200).then_some(()) }
        },
    )
    .await;
    let m = gw.metrics().await;
    assert_eq!(
        metric(&m, "firstgate_usage_rows_backfilled_total"),
        rows as f64
    );
    let (totals, said) = usage_with(&gw, &["--since", "400d"]);
    assert_eq!(totals[0]["username"], "alice@anl.gov", "{totals}");
    assert_eq!(totals[0]["requests"], rows, "{totals}");
    assert_eq!(totals[0]["total_tokens"], tokens, "{totals}");
    assert_eq!(totals[1]["requests"], 1, "{totals}");
    assert!(said.contains("hourly rollups"), "{said}");
    // Raw records still answer inside the window, and an old file can be vacuumed.
    let (recent, said) = usage_with(&gw, &["--since", "1h"]);
    assert_eq!(recent[0]["requests"], 1, "{recent}");
    assert!(said.contains("raw records"), "{said}");
    let config = gw.config_path();
    let (ok, out, err) = firstgate(&["usage", "--vacuum", "--config", config.to_str().unwrap()]);
    assert!(ok && out.contains("auto_vacuum=incremental"), "{out}{err}");
}
