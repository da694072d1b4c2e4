//! Reloading the configuration without a restart (SIGHUP and the admin listener's
//! `POST /reload`): models added and removed while a stream runs, a backend's pool kept, an
//! access rule and the limits changed, a broken edit refused with the last good configuration
//! still serving.

#![cfg(feature = "sim")] // against the simulators

mod common;

use common::*;
use firstgate::sim::globus::{FakeClient, FakeUser, GlobusSim, Seed};
use futures_util::StreamExt;
use serde_json::Value;
use std::time::Duration;

const OTHER: &str = "Qwen/Qwen2.5-7B-Instruct";
const ADDED: &str = "mistralai/Mistral-7B-Instruct-v0.3";

fn clusters(models: &[(&str, std::net::SocketAddr)]) -> String {
    let mut out =
        String::from("clusters:\n  sophia:\n    frameworks:\n      vllm:\n        models:\n");
    for (name, backend) in models {
        out.push_str(&format!(
            "          - name: {name}\n            backends: [{backend}]\n"
        ));
    }
    out
}

/// Replaces the `clusters:` section of the gateway's configuration file.
fn rewrite(gw: &Gateway, clusters_yaml: &str) {
    let path = gw.config_path();
    let text = std::fs::read_to_string(&path).unwrap();
    let head = &text[..text.find("clusters:").expect("a clusters section")];
    std::fs::write(&path, format!("{head}{clusters_yaml}")).unwrap();
}

async fn reload(gw: &Gateway) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(gw.admin_url("/reload"))
        .header("x-firstgate-admin", "1")
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or_default())
}

async fn status_of(gw: &Gateway, model: &str) -> u16 {
    post_chat(gw, "/v1/chat/completions", None, model, false)
        .await
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_come_and_go_while_streams_run_and_a_broken_edit_is_refused() {
    let slow = sim(&[LLAMA], |c| c.itl = Duration::from_millis(40)).await;
    let other = sim(&[OTHER], |_| {}).await;
    let added = sim(&[ADDED], |_| {}).await;
    let gw = Gateway::start(&clusters(&[(LLAMA, slow.addr()), (OTHER, other.addr())])).await;
    assert_eq!(status_of(&gw, OTHER).await, 200);

    // A stream of 40 tokens (1.6 s) runs across the reload.
    let mut body = chat_body(LLAMA, true);
    body["max_tokens"] = 40.into();
    let resp = gw
        .post("/v1/chat/completions")
        .bearer_auth("tok")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    assert!(!first.is_empty());

    // Add one model, remove another (its backend), keep the streaming one unchanged.
    rewrite(
        &gw,
        &clusters(&[(LLAMA, slow.addr()), (ADDED, added.addr())]),
    );
    let (status, v) = reload(&gw).await;
    assert_eq!(
        (status, v["status"].as_str()),
        (200, Some("reloaded")),
        "{v}"
    );
    assert_eq!(v["needs_upgrade"], serde_json::json!([]));
    assert_eq!(status_of(&gw, ADDED).await, 200);
    assert_eq!(status_of(&gw, OTHER).await, 404);
    // The unchanged model kept its pool: served at once (no health check to wait for).
    assert_eq!(status_of(&gw, LLAMA).await, 200);

    // The stream that began before the reload ends normally.
    let mut text = String::from_utf8_lossy(&first).into_owned();
    while let Some(chunk) = stream.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert_eq!(text.matches("\"content\":\"tok").count(), 40);

    // A broken edit: refused with where it is broken; the last good configuration serves.
    let path = gw.config_path();
    let good = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, good.replace("backends: [", "backends: {")).unwrap();
    let (status, v) = reload(&gw).await;
    assert_eq!(status, 409, "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    let at = message.find("gateway.yaml:").expect("the file named") + "gateway.yaml:".len();
    assert!(
        message[at..].starts_with(|c: char| c.is_ascii_digit()),
        "with its line: {message}"
    );
    assert_eq!(status_of(&gw, ADDED).await, 200);
    let metrics = gw.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "firstgate_config_reloads_total{result=\"refused\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &metrics,
            "firstgate_config_reloads_total{result=\"applied\"}"
        ),
        1.0
    );

    // SIGHUP does the same; a setting only a new process can take is named.
    std::fs::write(&path, good.replace("threads: 2", "threads: 3")).unwrap();
    rewrite(
        &gw,
        &clusters(&[(LLAMA, slow.addr()), (OTHER, other.addr())]),
    );
    gw.signal("HUP");
    wait_for("the SIGHUP reload", || async {
        (status_of(&gw, OTHER).await == 200).then_some(())
    })
    .await;
    assert!(gw
        .log()
        .contains("need `firstgate serve --upgrade` to take effect: threads"));
}

/// An access rule edited and reloaded applies from the next request, with a real token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_access_rule_changed_by_a_reload_applies_to_the_next_request() {
    let seed = Seed {
        clients: vec![FakeClient {
            id: "gw".into(),
            secret: "gw-secret".into(),
        }],
        users: vec![FakeUser::new("tok-mallory", "mallory@example.com")],
        ..Seed::default()
    };
    let globus = GlobusSim::start("127.0.0.1:0".parse().unwrap(), seed)
        .await
        .unwrap();
    let backend = sim(&[LLAMA], |_| {}).await;
    let model = |rule: &str| {
        format!(
            "clusters:\n  sophia:\n    frameworks:\n      vllm:\n        models:\n          \
             - name: {LLAMA}\n            backends: [{}]\n{rule}",
            backend.addr()
        )
    };
    let gw = Gateway::start_with(
        &globus_auth(&globus.url(), "gw", "", ""),
        &model("            allowed_domains: [anl.gov]\n"),
        &[(GLOBUS_SECRET_ENV, "gw-secret")],
    )
    .await;
    let ask = || async {
        post_chat(
            &gw,
            "/v1/chat/completions",
            Some("tok-mallory"),
            LLAMA,
            false,
        )
        .await
        .status()
        .as_u16()
    };
    assert_eq!(ask().await, 403);
    rewrite(&gw, &model(""));
    assert_eq!(reload(&gw).await.0, 200);
    assert_eq!(ask().await, 200);
    rewrite(&gw, &model("            allowed_domains: [anl.gov]\n"));
    assert_eq!(reload(&gw).await.0, 200);
    assert_eq!(ask().await, 403);

    // `limits:` apply to the next request too (here the body cap: the chat body is larger).
    rewrite(
        &gw,
        &format!("limits:\n  max_body_bytes: 64\n{}", model("")),
    );
    let (status, v) = reload(&gw).await;
    assert_eq!(
        (status, &v["needs_upgrade"]),
        (200, &serde_json::json!([])),
        "{v}"
    );
    assert_eq!(ask().await, 413);
}

/// Requests recorded in the usage store at `path` (0 while it does not exist).
fn requests_in(path: &std::path::Path) -> i64 {
    rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .and_then(|c| c.query_row("SELECT count(*) FROM usage", [], |r| r.get(0)))
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_store_access_log_and_log_format_follow_a_reload() {
    let backend = sim(&[LLAMA], |_| {}).await;
    let models = clusters(&[(LLAMA, backend.addr())]);
    let gw = Gateway::start(&models).await;
    let dir = gw.config_path().parent().unwrap().to_path_buf();
    let (first, second, access) = (
        dir.join("firstgate-usage.db"),
        dir.join("second.db"),
        dir.join("access.jsonl"),
    );
    assert_eq!(status_of(&gw, LLAMA).await, 200);
    wait_for("the first store's record", || async {
        (requests_in(&first) == 1).then_some(())
    })
    .await;

    // Another store, the access log into a file, the log as JSON lines.
    rewrite(
        &gw,
        &format!(
            "usage:\n  store: second.db\naccess_log:\n  path: access.jsonl\n\
             log:\n  format: json\n{models}"
        ),
    );
    let (status, v) = reload(&gw).await;
    assert_eq!(
        (status, &v["needs_upgrade"]),
        (200, &serde_json::json!([])),
        "{v}"
    );
    assert_eq!(status_of(&gw, LLAMA).await, 200);
    wait_for("the record in the new store", || async {
        (requests_in(&second) == 1).then_some(())
    })
    .await;
    let line = wait_for("the access-log line in the file", || async {
        std::fs::read_to_string(&access)
            .ok()
            .filter(|t| !t.is_empty())
    })
    .await;
    let line: Value = serde_json::from_str(line.trim_end()).expect("one JSON line");
    assert_eq!(line["model"], LLAMA);
    assert_eq!(requests_in(&first), 1, "the old store got nothing more");
    // The totals a user sees are the new store's.
    let usage: Value = gw
        .get("/resource_server/usage")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(usage["total"]["requests"], 1, "{usage}");
    assert!(
        gw.log().lines().any(|l| l.starts_with('{')
            && l.contains("configuration reloaded")
            && serde_json::from_str::<Value>(l).is_ok()),
        "the log switched to JSON lines:\n{}",
        gw.log()
    );

    // A store that cannot be opened refuses the whole reload: the working one stays.
    let text = std::fs::read_to_string(gw.config_path()).unwrap();
    let text = text.replace("store: second.db", "store: no-such-dir/x.db");
    std::fs::write(gw.config_path(), text).unwrap();
    let (status, v) = reload(&gw).await;
    assert_eq!(status, 409, "{v}");
    assert!(v.to_string().contains("no-such-dir"), "{v}");
    assert_eq!(status_of(&gw, LLAMA).await, 200);
    wait_for("the record still in the working store", || async {
        (requests_in(&second) == 2).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_added_by_a_reload_is_polled_for_its_status() {
    let (status, server) = status_page(
        serde_json::json!({"a1": {"model": "gpt-oss-120b", "status": "Stopped", "description": ""}}),
    )
    .await;
    let api = sim(&["gpt-oss-120b"], |_| {}).await;
    let backend = sim(&[LLAMA], |_| {}).await;
    let sophia = clusters(&[(LLAMA, backend.addr())]);
    let gw = Gateway::start(&sophia).await;
    assert_eq!(status_of(&gw, "gpt-oss-120b").await, 404);

    rewrite(
        &gw,
        &format!(
            "{sophia}  metis:\n    status: {{url: \"http://{}/status\", interval: 100ms}}\n    \
             frameworks:\n      api:\n        models:\n          - name: gpt-oss-120b\n            \
             backends: [{}]\n",
            server.addr(),
            api.addr()
        ),
    );
    assert_eq!(reload(&gw).await.0, 200);
    wait_for("the stopped model to be refused", || async {
        (status_of(&gw, "gpt-oss-120b").await == 503).then_some(())
    })
    .await;
    status.write().unwrap()["a1"]["status"] = "Live".into();
    wait_for("the live model to be served", || async {
        (status_of(&gw, "gpt-oss-120b").await == 200).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_setting_that_needs_an_upgrade_stays_reported_until_it_is_undone() {
    let backend = sim(&[LLAMA], |_| {}).await;
    let models = clusters(&[(LLAMA, backend.addr())]);
    let gw = Gateway::start(&models).await;
    let needs = |v: &Value| v["needs_upgrade"].clone();
    // Each edit is written whole over the file as it started.
    let path = gw.config_path();
    let original = std::fs::read_to_string(&path).unwrap();
    let write = |extra: &str| std::fs::write(&path, format!("{extra}{original}")).unwrap();

    write("shutdown:\n  grace_period: 7s\n");
    let (status, v) = reload(&gw).await;
    assert_eq!((status, needs(&v)), (200, serde_json::json!(["shutdown"])));
    // A second reload that changes something else: the process still runs its first
    // `shutdown`, so it is still reported.
    write("shutdown:\n  grace_period: 7s\nlimits:\n  max_body_bytes: 100000\n");
    let (status, v) = reload(&gw).await;
    assert_eq!((status, needs(&v)), (200, serde_json::json!(["shutdown"])));
    // Undone: nothing needs an upgrade any more.
    write("");
    let (status, v) = reload(&gw).await;
    assert_eq!((status, needs(&v)), (200, serde_json::json!([])));
}
