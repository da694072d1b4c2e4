//! One request of a load test, timed: latency, time to first token and the gaps between
//! tokens of a stream, tokens from the answer's `usage` (counted from the stream without it),
//! or what went wrong.

use super::prompts::Prompt;
use crate::openai::Endpoint;
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// What a load test sends.
#[derive(Debug, Clone)]
pub struct Shape {
    pub endpoint: Endpoint,
    pub stream: bool,
    pub max_tokens: u32,
}

/// One request's outcome.
#[derive(Debug, Clone)]
pub struct Sample {
    /// When it was sent (open loop: when it was due, so that queueing in the generator counts).
    pub started: Instant,
    pub finished: Instant,
    /// `None` when it succeeded; else its kind: `429 <limit>`, the status, `timeout`,
    /// `connection`, `cut stream`, `stream error`.
    pub error: Option<String>,
    pub ttft: Option<Duration>,
    /// Gaps between successive tokens of a stream.
    pub gaps: Vec<Duration>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
}

/// The request body for `prompt`.
pub fn body(model: &str, prompt: &Prompt, shape: &Shape) -> anyhow::Result<Value> {
    let text = |p: &Prompt| match p {
        Prompt::Text(t) => Ok(t.clone()),
        Prompt::Messages(_) => Err(anyhow::anyhow!(
            "--endpoint {}: the prompts need \"prompt\" text, not \"messages\"",
            shape.endpoint.path()
        )),
    };
    let mut body = match shape.endpoint {
        Endpoint::ChatCompletions | Endpoint::Messages => {
            let messages = match prompt {
                Prompt::Text(t) => json!([{"role": "user", "content": t}]),
                Prompt::Messages(m) => m.clone(),
            };
            json!({"model": model, "messages": messages, "max_tokens": shape.max_tokens})
        }
        Endpoint::Completions => {
            json!({"model": model, "prompt": text(prompt)?, "max_tokens": shape.max_tokens})
        }
        Endpoint::Embeddings => return Ok(json!({"model": model, "input": text(prompt)?})),
        e => anyhow::bail!("--endpoint {} is not load-tested", e.path()),
    };
    if shape.stream {
        body["stream"] = json!(true);
        if shape.endpoint.usage_on_request() {
            body["stream_options"] = json!({"include_usage": true});
        }
    }
    Ok(body)
}

/// Sends `body` and times it; `started` is when it was due.
pub async fn send(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    body: &Value,
    started: Instant,
) -> Sample {
    let mut sample = Sample {
        started,
        finished: started,
        error: None,
        ttft: None,
        gaps: Vec::new(),
        prompt_tokens: 0,
        completion_tokens: 0,
        total_tokens: 0,
    };
    let outcome = exchange(client, url, token, body, &mut sample).await;
    sample.finished = Instant::now();
    sample.error = outcome.err();
    sample
}

async fn exchange(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    body: &Value,
    sample: &mut Sample,
) -> Result<(), String> {
    let resp = client
        .post(url)
        .bearer_auth(token)
        .header(crate::usage::LOADTEST_HEADER, "1")
        .json(body)
        .send()
        .await
        .map_err(|e| kind_of(&e))?;
    let status = resp.status().as_u16();
    if status != 200 {
        let limit = resp
            .headers()
            .get("x-firstgate-limit")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        // Read the body so the connection can be reused.
        let _ = resp.bytes().await;
        return Err(match limit {
            Some(l) if status == 429 => format!("429 {l}"),
            _ => status.to_string(),
        });
    }
    let streamed = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("text/event-stream"));
    if !streamed {
        let v: Value = resp.json().await.map_err(|e| kind_of(&e))?;
        sample.ttft = Some(sample.started.elapsed());
        take_usage(sample, &v["usage"]);
        return Ok(());
    }
    let mut body = resp.bytes_stream();
    let mut pending: Vec<u8> = Vec::new();
    let mut last_token: Option<Instant> = None;
    let mut tokens_seen = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| match kind_of(&e).as_str() {
            "timeout" => "timeout".to_string(),
            _ => "cut stream".to_string(),
        })?;
        pending.extend_from_slice(&chunk);
        while let Some(at) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=at).collect();
            let line = String::from_utf8_lossy(&line);
            let Some(data) = line.trim_end().strip_prefix("data:") else {
                continue;
            };
            let data = data.trim_start();
            if data == "[DONE]" || data.starts_with(r#"{"type":"message_stop""#) {
                if sample.completion_tokens == 0 {
                    sample.completion_tokens = tokens_seen;
                    sample.total_tokens = sample.prompt_tokens + tokens_seen;
                }
                return Ok(());
            }
            let Ok(v) = serde_json::from_str::<Value>(data) else {
                continue;
            };
            if v.get("error").is_some() {
                return Err("stream error".into());
            }
            let choice = &v["choices"][0];
            let text = choice["delta"]["content"]
                .as_str()
                .or(choice["text"].as_str())
                // Anthropic's `content_block_delta`.
                .or(v["delta"]["text"].as_str())
                .unwrap_or_default();
            if !text.is_empty() {
                let now = Instant::now();
                match last_token {
                    None => sample.ttft = Some(now - sample.started),
                    Some(t) => sample.gaps.push(now - t),
                }
                last_token = Some(now);
                tokens_seen += 1;
            }
            take_usage(sample, &v["usage"]);
            // Anthropic's `message_start` carries the input tokens.
            take_usage(sample, &v["message"]["usage"]);
        }
    }
    Err("cut stream".into())
}

fn take_usage(sample: &mut Sample, usage: &Value) {
    let n = |k: &str| usage[k].as_u64();
    if let Some(total) = n("total_tokens") {
        sample.prompt_tokens = n("prompt_tokens").unwrap_or(0);
        sample.completion_tokens = n("completion_tokens").unwrap_or(0);
        sample.total_tokens = total;
    } else if let Some(output) = n("output_tokens") {
        // Anthropic's shape: no total, and a stream's last usage may omit the input.
        if let Some(input) = n("input_tokens") {
            sample.prompt_tokens = input;
        }
        sample.completion_tokens = output;
        sample.total_tokens = sample.prompt_tokens + output;
    }
}

fn kind_of(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timeout".into()
    } else if e.is_connect() {
        "connection".into()
    } else if e.is_decode() {
        "bad answer".into()
    } else {
        "connection".into()
    }
}
