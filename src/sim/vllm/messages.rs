//! vLLM's Anthropic Messages API (`POST /v1/messages`, served since vLLM 0.11) in the shapes
//! of the recorded transcripts (`messages-json`, `messages-stream`, vLLM 0.32): one `message`
//! object (`stop_reason`, `usage` as `input_tokens`/`output_tokens`), or its events, each with
//! an `event:` line: `message_start` (usage with `output_tokens: 0`), `content_block_start`,
//! a `content_block_delta` (`text_delta`) per token, `content_block_stop`, `message_delta`
//! (final usage and `stop_reason`), `message_stop`; no `ping`. `max_tokens` is required, as in
//! vLLM's `AnthropicMessagesRequest`. Also `POST /v1/messages/count_tokens`
//! (`{"input_tokens": N}`).

use super::{accept, bad_request, token_budget, Api, Running, Shared};
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use std::sync::atomic::Ordering;
use std::sync::Arc;

pub(super) async fn messages(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    raw: Bytes,
) -> Response {
    let req = match accept(&s, Api::Messages, headers, raw) {
        Ok(r) => r,
        Err(r) => return r.into_response(),
    };
    if req.body["max_tokens"].is_null() {
        return bad_request("Field required: max_tokens").into_response();
    }
    let (tokens, finish) = match token_budget(&s, &req.body) {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    let answer = Answer {
        id: format!("chatcmpl-{:016x}", fastrand::u64(..)),
        model: req.model,
        prompt_tokens: req.prompt_tokens,
        ttft: req.ttft,
        blocks: req.blocks,
        tokens,
        stop_reason: if finish == "length" {
            "max_tokens"
        } else {
            "end_turn"
        },
    };
    if req.body["stream"].as_bool() == Some(true) {
        return stream(s, answer);
    }
    let _running = Running::new(&s, answer.blocks);
    tokio::time::sleep(answer.ttft + s.cfg.itl * tokens.saturating_sub(1)).await;
    s.stats
        .generation_tokens
        .fetch_add(u64::from(tokens), Ordering::Relaxed);
    Json(json!({
        "id": answer.id, "type": "message", "role": "assistant",
        "content": [{"type": "text", "text": answer.text()}],
        "model": answer.model, "stop_reason": answer.stop_reason,
        "usage": {"input_tokens": answer.prompt_tokens, "output_tokens": answer.tokens},
    }))
    .into_response()
}

pub(super) async fn count_tokens(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    raw: Bytes,
) -> Response {
    match accept(&s, Api::Messages, headers, raw) {
        Ok(req) => Json(json!({"input_tokens": req.prompt_tokens})).into_response(),
        Err(r) => r.into_response(),
    }
}

/// One message being generated.
struct Answer {
    id: String,
    model: String,
    prompt_tokens: u64,
    /// Time to the first token, and the KV-cache blocks held meanwhile.
    ttft: std::time::Duration,
    blocks: u64,
    tokens: u32,
    stop_reason: &'static str,
}

impl Answer {
    fn text(&self) -> String {
        (0..self.tokens).map(|i| format!("tok{i} ")).collect()
    }
}

/// The events, one delta per token, at the simulator's pace.
fn stream(s: Arc<Shared>, answer: Answer) -> Response {
    s.stats.streams_started.fetch_add(1, Ordering::Relaxed);
    let running = Running::new(&s, answer.blocks);
    let events = futures_util::stream::unfold(
        (s, answer, 0u32, Some(running)),
        |(s, a, step, running)| async move {
            let running = running?;
            let (kind, data) = match step {
                0 => (
                    "message_start",
                    json!({"type": "message_start", "message": {"id": a.id, "type": "message",
                        "role": "assistant", "content": [], "model": a.model,
                        "stop_reason": null, "stop_sequence": null,
                        "usage": {"input_tokens": a.prompt_tokens, "output_tokens": 0}}}),
                ),
                1 => (
                    "content_block_start",
                    json!({"type": "content_block_start",
                           "content_block": {"type": "text", "text": ""}, "index": 0}),
                ),
                n if n < 2 + a.tokens => {
                    let i = n - 2;
                    let delay = if i == 0 { a.ttft } else { s.cfg.itl };
                    tokio::time::sleep(delay).await;
                    s.stats.generation_tokens.fetch_add(1, Ordering::Relaxed);
                    (
                        "content_block_delta",
                        json!({"type": "content_block_delta",
                               "delta": {"type": "text_delta", "text": format!("tok{i} ")},
                               "index": 0}),
                    )
                }
                n if n == 2 + a.tokens => (
                    "content_block_stop",
                    json!({"type": "content_block_stop", "index": 0}),
                ),
                n if n == 3 + a.tokens => (
                    "message_delta",
                    json!({"type": "message_delta",
                           "delta": {"stop_reason": a.stop_reason, "stop_sequence": null},
                           "usage": {"input_tokens": a.prompt_tokens, "output_tokens": a.tokens}}),
                ),
                n if n == 4 + a.tokens => ("message_stop", json!({"type": "message_stop"})),
                _ => {
                    s.stats.streams_completed.fetch_add(1, Ordering::Relaxed);
                    drop(running);
                    return None;
                }
            };
            let event = Bytes::from(format!("event: {kind}\ndata: {data}\n\n"));
            Some((
                Ok::<_, std::io::Error>(event),
                (s, a, step + 1, Some(running)),
            ))
        },
    );
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream; charset=utf-8")
        .body(Body::from_stream(events))
        .expect("a valid response")
}
