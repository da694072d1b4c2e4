//! Streams and usage that survive odd backends: SSE with any line ends, events too large to
//! read, backends that break off or stall; exact tokens whatever the client asked; token
//! limits that hold under concurrency.

#![cfg(feature = "sim")] // against the simulators

mod common;

use common::*;
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;

/// The usage record of the last request: tokens, and how it ended.
#[derive(Debug, PartialEq, Eq)]
struct Record {
    prompt: i64,
    completion: i64,
    cancelled: bool,
    failed: bool,
    tokens_unknown: bool,
}

/// Waits for the `n`th usage record and returns the newest.
async fn nth_record(gw: &Gateway, n: i64) -> Record {
    wait_for("the usage record", || async {
        let db = usage_store(gw);
        let count: i64 = db
            .query_row("SELECT COUNT(*) FROM usage", [], |r| r.get(0))
            .ok()?;
        if count < n {
            return None;
        }
        db.query_row(
            "SELECT prompt_tokens, completion_tokens, cancelled, failed, tokens_unknown FROM usage \
             ORDER BY time_ms DESC, rowid DESC LIMIT 1",
            [],
            |r| {
                Ok(Record {
                    prompt: r.get(0)?,
                    completion: r.get(1)?,
                    cancelled: r.get(2)?,
                    failed: r.get(3)?,
                    tokens_unknown: r.get(4)?,
                })
            },
        )
        .ok()
    })
    .await
}

fn stream_body(max_tokens: u32, extra: Value) -> Value {
    let mut body = json!({
        "model": LLAMA,
        "stream": true,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "count for me please"}],
    });
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    body
}

async fn in_flight(gw: &Gateway) -> f64 {
    metric(
        &gw.metrics().await,
        &format!("firstgate_in_flight_requests{{cluster=\"sophia\",model=\"{LLAMA}\"}}"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crlf_and_cr_streams_pass_incrementally_and_are_counted() {
    let chat = sim(&[LLAMA], |c| c.itl = std::time::Duration::from_millis(100)).await;
    let gw = Gateway::start(&one_model("sophia", "vllm", LLAMA, &[chat.addr()])).await;
    for (n, line_ends) in [(1, 1u8), (2, 2)] {
        chat.faults()
            .sse_line_ends
            .store(line_ends, Ordering::Relaxed);
        let completed = chat.stats().streams_completed.load(Ordering::Relaxed);
        let resp = gw
            .post("/v1/chat/completions")
            .json(&stream_body(10, json!({})))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let mut body = resp.bytes_stream();
        let mut text = Vec::new();
        let mut first_content_while_running = None;
        while let Some(chunk) = body.next().await {
            text.extend_from_slice(&chunk.unwrap());
            if first_content_while_running.is_none()
                && String::from_utf8_lossy(&text).contains("tok0")
            {
                // The backend is still generating: the chunk was not held back.
                first_content_while_running =
                    Some(chat.stats().streams_completed.load(Ordering::Relaxed) == completed);
            }
        }
        assert_eq!(
            first_content_while_running,
            Some(true),
            "line ends {line_ends}"
        );
        let text = String::from_utf8(text).unwrap();
        assert!(text.contains("[DONE]"), "{text}");
        assert!(
            !text.contains("\"usage\""),
            "the usage chunk was not asked for: {text}"
        );
        let r = nth_record(&gw, n).await;
        assert_eq!(r.completion, 10, "line ends {line_ends}");
        assert!(r.prompt > 0);
        assert!(!r.cancelled && !r.failed && !r.tokens_unknown, "{r:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_never_ends_an_event_passes_through_with_bounded_memory() {
    let chat = sim(&[LLAMA], |_| {}).await;
    let gw = Gateway::start(&one_model("sophia", "vllm", LLAMA, &[chat.addr()])).await;
    const SIZE: u64 = 100 * 1024 * 1024;
    chat.faults()
        .oversized_event_bytes
        .store(SIZE, Ordering::Relaxed);
    let rss = |field: &str| {
        let status = std::fs::read_to_string(format!("/proc/{}/status", gw.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap()
    };
    let before = rss("VmRSS:");
    let resp = gw
        .post("/v1/chat/completions")
        .json(&stream_body(10, json!({})))
        .send()
        .await
        .unwrap();
    let mut received = 0u64;
    let mut tail = Vec::new();
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.unwrap();
        received += chunk.len() as u64;
        tail = chunk.to_vec();
    }
    assert!(received >= SIZE, "{received}");
    assert!(String::from_utf8_lossy(&tail).contains("[DONE]"));
    let grew_kib = rss("VmHWM:").saturating_sub(before);
    assert!(
        grew_kib < 64 * 1024,
        "the gateway's peak memory grew by {grew_kib} KiB for a {SIZE}-byte event"
    );
    let r = nth_record(&gw, 1).await;
    assert!(r.tokens_unknown && !r.failed && !r.cancelled, "{r:?}");
    assert_eq!(
        metric(&gw.metrics().await, "firstgate_usage_unscanned_total"),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_breaks_off_or_stalls_ends_the_answer_and_is_recorded_failed() {
    let chat = sim(&[LLAMA], |_| {}).await;
    let gw = Gateway::start(&format!(
        "upstream:\n  read_timeout: 1s\n{}",
        one_model("sophia", "vllm", LLAMA, &[chat.addr()])
    ))
    .await;

    // Closed after three chunks: the client's stream ends without [DONE].
    chat.faults().close_after_chunks.store(3, Ordering::Relaxed);
    let resp = gw
        .post("/v1/chat/completions")
        .json(&stream_body(10, json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let text = tokio::time::timeout(DEADLINE, resp.text())
        .await
        .expect("the stream ends rather than hangs")
        .unwrap_or_default();
    assert!(!text.contains("[DONE]"), "{text}");
    let r = nth_record(&gw, 1).await;
    assert!(r.failed && !r.cancelled, "{r:?}");
    wait_for("the in-flight gauge to return to zero", || async {
        (in_flight(&gw).await == 0.0).then_some(())
    })
    .await;
    chat.faults().close_after_chunks.store(0, Ordering::Relaxed);
    let ok = post_chat(&gw, "/v1/chat/completions", None, LLAMA, false).await;
    assert_eq!(ok.status(), 200, "the next request is served");

    // Stalled past read_timeout: a JSON answer is a 504 in the envelope...
    chat.faults().stall_after_chunks.store(3, Ordering::Relaxed);
    let (status, v) =
        status_json(post_chat(&gw, "/v1/chat/completions", None, LLAMA, false).await).await;
    assert_eq!(status, 504, "{v}");
    assert_eq!(v["error"]["code"], "upstream_timeout");
    // ...and a stream is closed.
    let resp = gw
        .post("/v1/chat/completions")
        .json(&stream_body(10, json!({})))
        .send()
        .await
        .unwrap();
    let text = tokio::time::timeout(DEADLINE, resp.text())
        .await
        .expect("the stalled stream is closed")
        .unwrap_or_default();
    assert!(!text.contains("[DONE]"));
    let r = nth_record(&gw, 4).await;
    assert!(r.failed, "{r:?}");
    wait_for("the in-flight gauge to return to zero", || async {
        (in_flight(&gw).await == 0.0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_is_recorded_for_streams_whose_client_turned_it_off() {
    let chat = sim(&[LLAMA], |_| {}).await;
    let gw = Gateway::start(&one_model("sophia", "vllm", LLAMA, &[chat.addr()])).await;
    for (n, options) in [
        (1, json!({"include_usage": false})),
        (2, json!({})),
        (3, json!({"include_usage": true})),
    ] {
        let body = stream_body(7, json!({"stream_options": options}));
        let text = gw
            .post("/v1/chat/completions")
            .json(&body)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let asked = options["include_usage"] == true;
        assert_eq!(text.contains("\"usage\""), asked, "{options}: {text}");
        let r = nth_record(&gw, n).await;
        assert_eq!(r.completion, 7, "{options}");
        assert!(!r.tokens_unknown, "{options}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_cannot_overrun_a_token_limit() {
    let chat = sim(&[LLAMA], |c| c.ttft = std::time::Duration::from_millis(200)).await;
    let gw = Gateway::start(&format!(
        "limits:\n  ip_requests_per_second: 0\n  token_window: 1h\n\
         clusters:\n  sophia:\n    frameworks:\n      vllm:\n        models:\n\
         \x20         - name: {LLAMA}\n            backends: [{}]\n            tokens_per_minute_per_user: 1000\n",
        chat.addr()
    ))
    .await;
    let body = json!({
        "model": LLAMA, "max_tokens": 100,
        "messages": [{"role": "user", "content": "one two three"}],
    });
    let answers = futures_util::future::join_all(
        (0..50).map(|_| gw.post("/v1/chat/completions").json(&body).send()),
    )
    .await;
    let mut admitted = 0;
    for a in answers {
        let (status, v) = status_json(a.unwrap()).await;
        match status {
            200 => admitted += 1,
            429 => assert_eq!(v["error"]["code"], "rate_limit_exceeded"),
            other => panic!("{other}: {v}"),
        }
    }
    assert!(admitted >= 1);
    let used: i64 = wait_for("the records", || async {
        let db = usage_store(&gw);
        let (n, used): (i64, i64) = db
            .query_row(
                "SELECT COUNT(*), COALESCE(SUM(total_tokens), 0) FROM usage WHERE status = 200",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .ok()?;
        (n == admitted).then_some(used)
    })
    .await;
    assert!(
        used <= 1000,
        "{admitted} requests used {used} tokens of a 1,000 budget"
    );
    assert!(chat.stats().requests.load(Ordering::Relaxed) == admitted as u64);
}
