//! vLLM's `/v1/responses` (the OpenAI Responses API) in the shapes of the recorded transcripts
//! (`responses-json`, `responses-stream`): one response object, or its typed events
//! (`event: response.created` ... `response.completed`, the usage as `input_tokens` /
//! `output_tokens` in the completed response), with no `data: [DONE]` at the end.

use super::{accept, token_budget, unix_now, Api, Running, Shared};
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;

pub(super) async fn responses(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    raw: Bytes,
) -> Response {
    let req = match accept(&s, Api::Responses, headers, raw) {
        Ok(r) => r,
        Err(r) => return r.into_response(),
    };
    let (tokens, finish) = match token_budget(&s, &req.body) {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    let answer = Answer {
        id: format!("resp_{:016x}", fastrand::u64(..)),
        item: format!("msg_{:016x}", fastrand::u64(..)),
        model: req.model,
        created: unix_now(),
        max_output_tokens: req.body["max_output_tokens"].clone(),
        prompt_tokens: req.prompt_tokens,
        ttft: req.ttft,
        blocks: req.blocks,
        tokens,
        cut: finish == "length",
    };
    if req.body["stream"].as_bool() == Some(true) {
        return stream(s, answer);
    }
    let _running = Running::new(&s, answer.blocks);
    tokio::time::sleep(answer.ttft + s.cfg.itl * tokens.saturating_sub(1)).await;
    s.stats
        .generation_tokens
        .fetch_add(u64::from(tokens), Ordering::Relaxed);
    Json(answer.response(&answer.text(tokens), true)).into_response()
}

/// One response being generated.
struct Answer {
    id: String,
    item: String,
    model: String,
    created: u64,
    max_output_tokens: Value,
    prompt_tokens: u64,
    /// Time to the first token, and the KV-cache blocks held meanwhile.
    ttft: std::time::Duration,
    blocks: u64,
    tokens: u32,
    /// Ended by `max_output_tokens` (status `incomplete`).
    cut: bool,
}

impl Answer {
    fn text(&self, tokens: u32) -> String {
        (0..tokens).map(|i| format!("tok{i} ")).collect()
    }

    fn message(&self, text: &str, done: bool) -> Value {
        let content = if done {
            json!([{"annotations": [], "text": text, "type": "output_text", "logprobs": null}])
        } else {
            json!([])
        };
        json!({"id": self.item, "content": content, "role": "assistant",
               "status": if done { "completed" } else { "in_progress" },
               "type": "message", "phase": null})
    }

    /// The response object: finished (with its output and usage) or just begun.
    fn response(&self, text: &str, finished: bool) -> Value {
        let (status, incomplete, output, usage) = if finished {
            let usage = json!({
                "input_tokens": self.prompt_tokens,
                "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0,
                    "input_tokens_per_turn": [], "cached_tokens_per_turn": []},
                "output_tokens": self.tokens,
                "output_tokens_details": {"reasoning_tokens": 0, "tool_output_tokens": 0,
                    "output_tokens_per_turn": [], "tool_output_tokens_per_turn": []},
                "total_tokens": self.prompt_tokens + u64::from(self.tokens),
            });
            let (status, incomplete) = if self.cut {
                ("incomplete", json!({"reason": "max_output_tokens"}))
            } else {
                ("completed", Value::Null)
            };
            (status, incomplete, json!([self.message(text, true)]), usage)
        } else {
            ("in_progress", Value::Null, json!([]), Value::Null)
        };
        json!({
            "id": self.id, "created_at": self.created, "incomplete_details": incomplete,
            "instructions": null, "metadata": null, "model": self.model, "object": "response",
            "output": output, "parallel_tool_calls": true, "temperature": 1.0,
            "tool_choice": "auto", "tools": [], "top_p": 1.0, "background": false,
            "max_output_tokens": self.max_output_tokens, "max_tool_calls": null,
            "previous_response_id": null, "prompt": null, "reasoning": null,
            "service_tier": "auto", "status": status, "text": null, "top_logprobs": null,
            "truncation": "disabled", "usage": usage, "user": null,
            "presence_penalty": 0.0, "frequency_penalty": 0.0, "kv_transfer_params": null,
            "ec_transfer_params": null, "input_messages": null, "output_messages": null,
        })
    }
}

/// The typed events, one per token for the text, at the simulator's pace.
fn stream(s: Arc<Shared>, answer: Answer) -> Response {
    s.stats.streams_started.fetch_add(1, Ordering::Relaxed);
    let running = Running::new(&s, answer.blocks);
    let events = futures_util::stream::unfold(
        (s, answer, 0u32, 0u64, Some(running)),
        |(s, a, step, seq, running)| async move {
            let running = running?;
            let part = |text: &str| {
                json!({"annotations": [], "text": text, "type": "output_text",
                                           "logprobs": null})
            };
            let common = json!({"item_id": a.item, "output_index": 0, "content_index": 0,
                                "logprobs": []});
            let with = |mut base: Value, extra: Value| {
                if let (Some(b), Some(e)) = (base.as_object_mut(), extra.as_object()) {
                    b.extend(e.clone());
                }
                base
            };
            let (kind, data) = match step {
                0 => (
                    "response.created",
                    json!({"response": a.response("", false)}),
                ),
                1 => (
                    "response.in_progress",
                    json!({"response": a.response("", false)}),
                ),
                2 => (
                    "response.output_item.added",
                    json!({"item": a.message("", false), "output_index": 0}),
                ),
                3 => (
                    "response.content_part.added",
                    json!({"content_index": 0, "item_id": a.item, "output_index": 0,
                           "part": part("")}),
                ),
                n if n < 4 + a.tokens => {
                    let i = n - 4;
                    let delay = if i == 0 { a.ttft } else { s.cfg.itl };
                    tokio::time::sleep(delay).await;
                    s.stats.generation_tokens.fetch_add(1, Ordering::Relaxed);
                    (
                        "response.output_text.delta",
                        with(common.clone(), json!({"delta": format!("tok{i} ")})),
                    )
                }
                n if n == 4 + a.tokens => (
                    "response.output_text.done",
                    with(common.clone(), json!({"text": a.text(a.tokens)})),
                ),
                n if n == 5 + a.tokens => (
                    "response.content_part.done",
                    json!({"content_index": 0, "item_id": a.item, "output_index": 0,
                           "part": part(&a.text(a.tokens))}),
                ),
                n if n == 6 + a.tokens => (
                    "response.output_item.done",
                    json!({"item": a.message(&a.text(a.tokens), true), "output_index": 0}),
                ),
                n if n == 7 + a.tokens => (
                    "response.completed",
                    json!({"response": a.response(&a.text(a.tokens), true)}),
                ),
                _ => {
                    s.stats.streams_completed.fetch_add(1, Ordering::Relaxed);
                    drop(running);
                    return None;
                }
            };
            let data = with(data, json!({"sequence_number": seq, "type": kind}));
            let event = Bytes::from(format!("event: {kind}\ndata: {data}\n\n"));
            Some((
                Ok::<_, std::io::Error>(event),
                (s, a, step + 1, seq + 1, Some(running)),
            ))
        },
    );
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream; charset=utf-8")
        .body(Body::from_stream(events))
        .expect("a valid response")
}
