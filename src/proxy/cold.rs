//! The cold path: no instance is hot, so the request runs through Globus Compute (FIRST's
//! inference function on the model's endpoint) and the gateway answers itself: the completion
//! JSON, or for a stream an SSE response that keeps the connection alive with comments while
//! the task waits and then sends the completion as OpenAI chunks.

use super::serve::Outcome;
use super::trace::phase_span;
use super::{errors, respond, Gateway, RequestCtx};
use crate::catalog::Deployment;
use crate::compute::{serialize::unwrap_json_string, ComputeClient, ComputeError};
use crate::config::Endpoint;
use crate::openai::{completion_events, ApiError, ControlFields, END};
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

/// A request the policy sent through Globus Compute.
pub struct ColdRequest {
    deployment: Arc<Deployment>,
    endpoint: Endpoint,
    /// The body with the backend's model name.
    body: Bytes,
    stream: bool,
    /// The client asked for the usage chunk.
    include_usage: bool,
}

impl ColdRequest {
    pub fn new(
        deployment: Arc<Deployment>,
        endpoint: Endpoint,
        control: &ControlFields,
        body: Bytes,
    ) -> Self {
        let body = if control.model != deployment.backend_model {
            control.rewrite(&body, Some(&deployment.backend_model), false)
        } else {
            body
        };
        ColdRequest {
            deployment,
            endpoint,
            body,
            stream: control.stream,
            include_usage: control.include_usage,
        }
    }
}

impl Gateway {
    /// Runs the request through Globus Compute and answers it.
    pub(super) async fn answer_cold(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        req: ColdRequest,
    ) -> Result<Outcome, ApiError> {
        let Some(cold) = &self.cold else {
            return Err(errors::compute_unavailable(&req.deployment));
        };
        let d = &req.deployment;
        // Counts as waiting demand, and asks the scale policy now rather than at its next run.
        let _cold = d.demand.cold();
        self.scale_wake.notify_one();
        let submitting = phase_span!(ctx, "compute_submit");
        let task = submit(cold, d, req.endpoint, &req.body).await?;
        drop(submitting);
        let _polling = phase_span!(ctx, "compute_poll", task = task.as_str());
        let written = if req.stream {
            ctx.target.answered = true;
            let stream = StreamAnswer {
                ctx,
                task: &task,
                endpoint: req.endpoint,
                include_usage: req.include_usage,
            };
            answer_stream(session, cold, d, stream)
                .await
                .map(|tokens| ctx.meter.answered = tokens)
        } else {
            let completion = completion(cold, d, &task).await?;
            ctx.target.answered = true;
            ctx.meter.answered = Some(Tokens::of_completion(&completion));
            let headers = [
                ("x-firstgate-route", "compute".to_string()),
                ("x-firstgate-task", task.clone()),
            ];
            let body = Bytes::from(completion.to_string());
            respond::send_json(session, ctx, 200, body, &headers).await
        };
        if let Err(e) = written {
            // The client went away while the task ran.
            log::debug!("cold answer for task {task} not delivered: {e}");
            ctx.meter.client_left = true;
        }
        Ok(Outcome::Answered)
    }
}

/// Submits FIRST's payload for this request; errors are the client's answer.
async fn submit(
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
        Ok(_) => return Err(errors::endpoint_offline(d)),
        Err(e) => return Err(errors::compute(&e, d)),
    }
    let mut params: Value =
        serde_json::from_slice(body).map_err(|_| errors::body_not_an_object(false))?;
    let p = params
        .as_object_mut()
        .ok_or_else(|| errors::body_not_an_object(true))?;
    // FIRST's function streams only back to a streaming server; without one the answer comes
    // back whole and the gateway replays it as SSE. vLLM refuses `stream_options` then.
    p.insert("stream".into(), json!(false));
    p.remove("stream_options");
    p.insert("openai_endpoint".into(), json!(endpoint.path()));
    p.insert("api_port".into(), json!(c.api_port));
    let task = cold
        .client
        .submit(&c.endpoint, &c.function, &[json!({"model_params": params})])
        .await
        .map_err(|e| errors::compute(&e, d))?;
    cold.metrics
        .compute_tasks
        .with_label_values(&["submitted"])
        .inc();
    Ok(task)
}

/// Waits for the task and returns the completion JSON.
async fn completion(cold: &ColdPath, d: &Deployment, task: &str) -> Result<Value, ApiError> {
    let outcome = cold.client.wait(task, cold.wait).await;
    let state = match &outcome {
        Ok(_) => "success",
        Err(ComputeError::TimedOut(_)) => "timeout",
        Err(_) => "failed",
    };
    cold.metrics.compute_tasks.with_label_values(&[state]).inc();
    let v = outcome.map_err(|e| errors::compute(&e, d))?;
    match unwrap_json_string(v) {
        Value::Object(o) => Ok(Value::Object(o)),
        // FIRST wraps a non-JSON 200 answer this way.
        other => Ok(json!({"completion": other})),
    }
}

/// What a streamed cold answer needs to know.
struct StreamAnswer<'a> {
    /// The request (its id, trace and CORS headers go on the answer).
    ctx: &'a RequestCtx,
    task: &'a str,
    endpoint: Endpoint,
    /// The client asked for the usage chunk.
    include_usage: bool,
}

/// Answers a streamed request: the header at once, keep-alive comments while the task runs,
/// then the completion as chunks, or the error as an SSE error event. Returns the completion's
/// usage, if one came.
async fn answer_stream(
    session: &mut Session,
    cold: &ColdPath,
    d: &Deployment,
    a: StreamAnswer<'_>,
) -> pingora::Result<Option<Tokens>> {
    let task = a.task;
    let mut resp = ResponseHeader::build(200, Some(10))?;
    respond::tag(&mut resp, a.ctx)?;
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
        Ok(c) => (
            completion_events(&c, a.endpoint, a.include_usage),
            Some(Tokens::of_completion(&c)),
        ),
        // An error event, then the stream's end (a Responses stream's is the error itself).
        Err(e) if a.endpoint == Endpoint::Responses => (
            format!(
                "event: error\ndata: {}\n\n",
                String::from_utf8_lossy(&e.body())
            ),
            None,
        ),
        Err(e) => (
            format!("data: {}\n\n{END}", String::from_utf8_lossy(&e.body())),
            None,
        ),
    };
    session
        .write_response_body(Some(Bytes::from(events)), true)
        .await?;
    Ok(tokens)
}
