//! The cold path: no instance is hot, so the request runs through Globus Compute (FIRST's
//! inference function on the model's endpoint) and the gateway answers itself: the completion
//! JSON, or for a stream an SSE response that keeps the connection alive with comments while
//! the task waits and then sends the completion as OpenAI chunks.

use super::errors;
use crate::catalog::Deployment;
use crate::compute::{serialize::unwrap_json_string, ComputeClient, ComputeError};
use crate::config::Endpoint;
use crate::openai::ApiError;
use crate::usage::Tokens;
use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

/// What the cold path needs from the gateway.
pub struct ColdPath {
    pub client: Arc<ComputeClient>,
    /// Longest wait for a task.
    pub wait: Duration,
    /// Interval of keep-alive comments on streams.
    pub keepalive: Duration,
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// Submits FIRST's payload for this request; errors are the client's answer.
pub async fn submit(
    cold: &ColdPath,
    d: &Deployment,
    endpoint: Endpoint,
    body: &Bytes,
) -> Result<String, ApiError> {
    let Some(c) = &d.compute else {
        return Err(errors::compute_unavailable(d));
    };
    match cold.client.endpoint_status(&c.endpoint).await {
        Ok(s) if s.online => {}
        Ok(_) => return Err(endpoint_offline(d)),
        Err(e) => return Err(compute_error(&e, d)),
    }
    let mut params: Value = serde_json::from_slice(body).map_err(|_| {
        ApiError::new(
            400,
            "invalid_request_error",
            "The request body is not valid JSON.",
        )
    })?;
    let Some(p) = params.as_object_mut() else {
        return Err(ApiError::new(
            400,
            "invalid_request_error",
            "The request body must be a JSON object.",
        ));
    };
    p.insert("openai_endpoint".into(), json!(endpoint.path()));
    p.insert("api_port".into(), json!(c.api_port));
    let task = cold
        .client
        .submit(&c.endpoint, &c.function, &[json!({"model_params": params})])
        .await
        .map_err(|e| compute_error(&e, d))?;
    cold.metrics
        .compute_tasks
        .with_label_values(&["submitted"])
        .inc();
    Ok(task)
}

/// Waits for the task and returns the completion JSON.
pub async fn completion(cold: &ColdPath, d: &Deployment, task: &str) -> Result<Value, ApiError> {
    let outcome = cold.client.wait(task, cold.wait).await;
    let state = match &outcome {
        Ok(_) => "success",
        Err(ComputeError::TimedOut(_)) => "timeout",
        Err(_) => "failed",
    };
    cold.metrics.compute_tasks.with_label_values(&[state]).inc();
    let v = outcome.map_err(|e| compute_error(&e, d))?;
    match unwrap_json_string(v) {
        Value::Object(o) => Ok(Value::Object(o)),
        // FIRST wraps a non-JSON 200 answer this way.
        other => Ok(json!({"completion": other})),
    }
}

/// Answers a non-streamed request.
pub async fn answer_json(
    session: &mut Session,
    task: &str,
    completion: &Value,
) -> pingora::Result<()> {
    let body = Bytes::from(completion.to_string());
    let mut resp = ResponseHeader::build(200, Some(4))?;
    resp.insert_header("content-type", "application/json")?;
    resp.insert_header("content-length", body.len().to_string())?;
    resp.insert_header("x-firstgate-route", "compute")?;
    resp.insert_header("x-firstgate-task", task)?;
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(body), true).await
}

/// Answers a streamed request: the header at once, keep-alive comments while the task runs,
/// then the completion as chunks, or the error as an SSE error event. Returns the completion's
/// usage, if one came.
pub async fn answer_stream(
    session: &mut Session,
    cold: &ColdPath,
    d: &Deployment,
    task: &str,
    endpoint: Endpoint,
    include_usage: bool,
) -> pingora::Result<Option<Tokens>> {
    let mut resp = ResponseHeader::build(200, Some(5))?;
    resp.insert_header("content-type", "text/event-stream; charset=utf-8")?;
    resp.insert_header("cache-control", "no-cache")?;
    resp.insert_header("transfer-encoding", "chunked")?;
    resp.insert_header("x-firstgate-route", "compute")?;
    resp.insert_header("x-firstgate-task", task)?;
    session.write_response_header(Box::new(resp), false).await?;

    let result = completion(cold, d, task);
    tokio::pin!(result);
    let mut tick = tokio::time::interval(cold.keepalive);
    tick.tick().await;
    let outcome = loop {
        tokio::select! {
            r = &mut result => break r,
            _ = tick.tick() => {
                // An error here means the client left: stop waiting.
                let comment = format!(": waiting for {} (task {task})\n\n", d.model);
                session.write_response_body(Some(Bytes::from(comment)), false).await?;
            }
        }
    };
    let (events, tokens) = match outcome {
        Ok(completion) => (
            chunks(&completion, endpoint, include_usage),
            Some(tokens_of(&completion)),
        ),
        Err(e) => (
            format!("data: {}\n\n", String::from_utf8_lossy(&e.body())),
            None,
        ),
    };
    session
        .write_response_body(Some(Bytes::from(events + "data: [DONE]\n\n")), true)
        .await?;
    Ok(tokens)
}

/// The completion's usage.
pub fn tokens_of(c: &Value) -> Tokens {
    let u = &c["usage"];
    let prompt = u["prompt_tokens"].as_u64().unwrap_or(0);
    let completion = u["completion_tokens"].as_u64().unwrap_or(0);
    Tokens {
        prompt,
        completion,
        total: u["total_tokens"].as_u64().unwrap_or(prompt + completion),
    }
}

/// A finished completion as the SSE events a streaming backend would have sent.
pub fn chunks(c: &Value, endpoint: Endpoint, include_usage: bool) -> String {
    let chat = endpoint == Endpoint::ChatCompletions;
    let object = if chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let base = |choices: Value| {
        json!({"id": c["id"], "object": object, "created": c["created"], "model": c["model"],
               "choices": choices})
    };
    let mut out = String::new();
    let mut push = |v: Value| out.push_str(&format!("data: {v}\n\n"));
    for (i, choice) in c["choices"].as_array().into_iter().flatten().enumerate() {
        let index = choice.get("index").cloned().unwrap_or(json!(i));
        if chat {
            let msg = &choice["message"];
            push(base(
                json!([{"index": index, "delta": {"role": "assistant", "content": ""},
                              "logprobs": null, "finish_reason": null}]),
            ));
            let mut delta = json!({"content": msg["content"]});
            if msg
                .get("tool_calls")
                .is_some_and(|t| t.as_array().is_some_and(|a| !a.is_empty()))
            {
                delta["tool_calls"] = msg["tool_calls"].clone();
            }
            push(base(
                json!([{"index": index, "delta": delta, "logprobs": null,
                              "finish_reason": choice["finish_reason"]}]),
            ));
        } else {
            push(base(
                json!([{"index": index, "text": choice["text"], "logprobs": null,
                              "finish_reason": choice["finish_reason"]}]),
            ));
        }
    }
    if include_usage && !c["usage"].is_null() {
        let mut last = base(json!([]));
        last["usage"] = c["usage"].clone();
        push(last);
    }
    out
}

fn endpoint_offline(d: &Deployment) -> ApiError {
    ApiError::new(
        503,
        "endpoint_offline",
        format!(
            "The Globus Compute endpoint of '{}' on cluster '{}' is offline. Try again later.",
            d.model, d.cluster
        ),
    )
    .with_retry_after(60)
}

/// What the client is told about a Compute failure (details go to the log only).
fn compute_error(e: &ComputeError, d: &Deployment) -> ApiError {
    match e {
        ComputeError::TimedOut(task) => ApiError::new(
            504,
            "compute_timeout",
            format!(
                "'{}' on cluster '{}' did not answer in time (Globus Compute task {task}); it is \
                 probably still starting. Try again in a few minutes.",
                d.model, d.cluster
            ),
        ),
        ComputeError::TaskFailed { task, exception } => {
            log::error!(
                "compute task {task} for {} on {} failed:\n{exception}",
                d.model,
                d.cluster
            );
            ApiError::new(
                502,
                "compute_task_failed",
                format!(
                    "Running '{}' on cluster '{}' failed (Globus Compute task {task}: {}). The \
                     operators have the details.",
                    d.model,
                    d.cluster,
                    last_line(exception)
                ),
            )
        }
        ComputeError::Undecodable { task, reason } => {
            log::error!("compute task {task}: {reason}");
            ApiError::new(
                502,
                "compute_bad_result",
                format!("Globus Compute task {task} returned a result the gateway cannot read."),
            )
        }
        ComputeError::Refused { status: 429, .. } => ApiError::new(
            503,
            "compute_busy",
            "Globus Compute is rate-limiting the gateway. Try again shortly.",
        )
        .with_retry_after(10),
        ComputeError::Unreachable(_) | ComputeError::Refused { .. } => {
            log::error!("Globus Compute for {} on {}: {e}", d.model, d.cluster);
            ApiError::new(
                503,
                "compute_unavailable",
                format!(
                    "Globus Compute cannot be reached to run '{}' on cluster '{}'. Try again shortly.",
                    d.model, d.cluster
                ),
            )
            .with_retry_after(30)
        }
    }
}

/// The exception's last line with its Python class name only (no paths or hosts), e.g.
/// `WorkerLost` or `Exception: API request failed with status code: 500`.
fn last_line(exception: &str) -> String {
    let line = exception
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("unknown error");
    let (class, rest) = line.split_once(':').unwrap_or((line, ""));
    let class = class.rsplit('.').next().unwrap_or(class).trim();
    let rest = rest.trim();
    // Keep the message only when it is short and names no host.
    if rest.is_empty() || rest.len() > 80 || rest.contains(" on host ") {
        class.to_string()
    } else {
        format!("{class}: {rest}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exceptions_are_sanitized() {
        let e = "Traceback (most recent call last):\n  File \"/x.py\"\nparsl.executors.high_throughput.errors.WorkerLost: Task failure due to loss of worker 0 on host x3005c0s13b0n0";
        assert_eq!(last_line(e), "WorkerLost");
        assert_eq!(
            last_line("Traceback\nException: API request failed with status code: 500"),
            "Exception: API request failed with status code: 500"
        );
    }

    #[test]
    fn a_completion_becomes_chunks() {
        let c = json!({"id": "x", "created": 1, "model": "m", "usage": {"total_tokens": 3},
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}]});
        let sse = chunks(&c, Endpoint::ChatCompletions, true);
        let events: Vec<Value> = sse
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        assert_eq!(events.len(), 3);
        assert_eq!(events[1]["choices"][0]["delta"]["content"], "hi");
        assert_eq!(events[1]["choices"][0]["finish_reason"], "stop");
        assert_eq!(events[2]["usage"]["total_tokens"], 3);
    }
}
