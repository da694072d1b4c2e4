//! The streaming half of FIRST's `vllm_inference_function`: with `stream` true and the
//! gateway's streaming parameters in `model_params`, it streams from the model's instance and
//! posts the SSE lines back to `{protocol}://{host}:{port}/resource_server/api/streaming/
//! {data,error,done}/` with `X-Internal-Secret` (the endpoint's `INTERNAL_STREAMING_SECRET`,
//! here `compute.streaming_secret` of the seed) and `X-Stream-Task-Token`: lines batched (20,
//! or every 0.5 s), 2 s per post, a failed post counted and passed over, `done/` after vLLM's
//! `[DONE]`, `error/` when vLLM refuses. The task's result is FIRST's summary, not the answer.

use super::{python_json, Shared};
use futures_util::StreamExt as _;
use serde_json::{json, Map, Value};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

const BATCH_LINES: usize = 20;
const BATCH_EVERY: Duration = Duration::from_millis(500);
const POST_TIMEOUT: Duration = Duration::from_secs(2);

/// Where and how to post back.
struct Poster<'a> {
    s: &'a Shared,
    /// The advertised address; with `stream_post_ports` in the seed, the load balancer behind
    /// it sends each post to the next of those ports.
    bases: Vec<String>,
    posts: std::sync::atomic::AtomicUsize,
    task_id: String,
    token: String,
}

impl Poster<'_> {
    async fn post(&self, kind: &str, mut body: Value) {
        let n = self.posts.fetch_add(1, Ordering::Relaxed);
        let base = &self.bases[n % self.bases.len()];
        body["task_id"] = json!(self.task_id);
        body["type"] = json!(kind);
        let secret = self
            .s
            .compute
            .seed
            .streaming_secret
            .clone()
            .unwrap_or_default();
        let sent = self
            .s
            .compute
            .http
            .post(format!("{base}/{kind}/"))
            .header("X-Internal-Secret", secret)
            .header("X-Stream-Task-Token", &self.token)
            .timeout(POST_TIMEOUT)
            .json(&body)
            .send()
            .await;
        let ok = sent.is_ok_and(|r| r.status().is_success());
        let counter = if ok {
            &self.s.compute.stats.stream_posts
        } else {
            &self.s.compute.stats.stream_posts_failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    async fn data(&self, batch: &mut Vec<String>) {
        if !batch.is_empty() {
            let data = batch.join("\n");
            batch.clear();
            self.post("data", json!({ "data": data })).await;
        }
    }
}

/// Streams `params` from `url` back to the gateway (the parameters are checked by the caller).
pub(super) async fn stream_back(
    s: &Shared,
    url: String,
    mut params: Map<String, Value>,
) -> Result<Value, String> {
    let text = |p: &mut Map<String, Value>, k: &str| match p.remove(k) {
        Some(Value::String(v)) => v,
        Some(v) => v.to_string(),
        None => String::new(),
    };
    let host = text(&mut params, "streaming_server_host");
    let port = text(&mut params, "streaming_server_port");
    let protocol = match text(&mut params, "streaming_server_protocol") {
        p if p.is_empty() => "https".to_string(),
        p => p,
    };
    let spread = s.compute.stream_post_ports.lock().unwrap().clone();
    let ports = match spread {
        spread if !spread.is_empty() => spread.iter().map(u16::to_string).collect(),
        _ => vec![port],
    };
    let poster = Poster {
        s,
        bases: ports
            .iter()
            .map(|port| format!("{protocol}://{host}:{port}/resource_server/api/streaming"))
            .collect(),
        posts: Default::default(),
        task_id: text(&mut params, "stream_task_id"),
        token: text(&mut params, "stream_task_token"),
    };
    let started = Instant::now();
    let resp = super::post_to_instance(s, url, &params).await?;
    let status = resp.status().as_u16();
    if status != 200 {
        let body = resp.text().await.unwrap_or_default();
        let error = format!("API request failed with status code: {status}\nResponse text: {body}");
        poster.post("error", json!({ "error": error })).await;
        return Ok(summary(&poster.task_id, started, 0, "error"));
    }
    let mut body = resp.bytes_stream();
    let mut pending: Vec<u8> = Vec::new();
    let mut batch: Vec<String> = Vec::new();
    let mut flushed = Instant::now();
    let mut total_tokens = 0u64;
    'read: loop {
        let wait = BATCH_EVERY.saturating_sub(flushed.elapsed());
        match tokio::time::timeout(wait, body.next()).await {
            Ok(Some(Ok(bytes))) => pending.extend_from_slice(&bytes),
            Ok(Some(Err(e))) => {
                poster.data(&mut batch).await;
                poster
                    .post("error", json!({ "error": e.to_string() }))
                    .await;
                return Ok(summary(&poster.task_id, started, total_tokens, "error"));
            }
            Ok(None) => break,
            Err(_) => {}
        }
        while let Some(at) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=at).collect();
            let line = String::from_utf8_lossy(&line).trim_end().to_string();
            if line.is_empty() {
                continue;
            }
            if line == "data: [DONE]" {
                break 'read;
            }
            if let Some(n) = usage_total(&line) {
                total_tokens = n;
            }
            batch.push(line);
            if batch.len() >= BATCH_LINES {
                poster.data(&mut batch).await;
                flushed = Instant::now();
            }
        }
        if flushed.elapsed() >= BATCH_EVERY {
            poster.data(&mut batch).await;
            flushed = Instant::now();
        }
    }
    poster.data(&mut batch).await;
    poster.post("done", json!({})).await;
    Ok(summary(&poster.task_id, started, total_tokens, "completed"))
}

/// `total_tokens` of a line that carries usage.
fn usage_total(line: &str) -> Option<u64> {
    let data = line.strip_prefix("data:")?.trim();
    let v: Value = serde_json::from_str(data).ok()?;
    let usage = if v["usage"].is_object() {
        &v["usage"]
    } else {
        &v["response"]["usage"]
    };
    usage["total_tokens"].as_u64()
}

/// The task's result: FIRST's summary as a JSON string.
fn summary(task_id: &str, started: Instant, total_tokens: u64, status: &str) -> Value {
    let dt = started.elapsed().as_secs_f64();
    let v = json!({
        "streaming": true, "task_id": task_id, "response_time": dt,
        "throughput_tokens_per_second": if dt > 0.0 { total_tokens as f64 / dt } else { 0.0 },
        "total_tokens": total_tokens, "status": status,
    });
    Value::String(python_json(&v))
}
