//! The cold path: no instance is hot, so the request runs through Globus Compute (FIRST's
//! inference function on the model's endpoint) and the gateway answers itself: the completion
//! JSON, or for a stream an SSE response that keeps the connection alive with comments while
//! the task waits and then sends the completion as OpenAI chunks. With `compute.streaming`
//! a stream's tokens come back as they are generated instead (`relay`).

use super::serve::Outcome;
use super::trace::phase_span;
use super::{errors, headers, respond, Gateway, RequestCtx};
use crate::catalog::Deployment;
use crate::compute::relay::{RelayTicket, StreamRelay};
use crate::compute::{serialize::unwrap_json_string, ComputeClient, ComputeError};
use crate::config::ComputeStreaming;
use crate::openai::{completion_events, ApiError, ControlFields, Endpoint, Framing, END};
use crate::usage::Tokens;
use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderValue};
use pingora::proxy::Session;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

/// How long after a task was sent to an endpoint without managers it counts as starting a
/// node (FIRST's `endpoint_triggered` lives 600 s).
const STARTING: Duration = Duration::from_secs(600);

/// What the cold path needs from the gateway.
pub struct ColdPath {
    pub client: Arc<ComputeClient>,
    /// Longest wait for a task.
    pub wait: Duration,
    /// Interval of keep-alive comments on streams.
    pub keepalive: Duration,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Where streamed lines come back to, and how compute nodes reach it.
    pub streaming: Option<(Arc<StreamRelay>, ComputeStreaming)>,
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
        // A stream's lines come back through the relay when it is set up.
        let relayed = match cold.streaming.as_ref().filter(|_| req.stream) {
            Some((relay, at)) => Some((relay.open().await, at)),
            None => None,
        };
        let submitting = phase_span!(ctx, "compute_submit");
        let via = relayed.as_ref().map(|(ticket, at)| (ticket, *at));
        let task = submit(cold, d, req.endpoint, &req.body, via).await?;
        drop(submitting);
        let _polling = phase_span!(ctx, "compute_poll", task = task.as_str());
        let written = if let Some((ticket, _)) = relayed {
            ctx.target.answered = true;
            let stream = StreamAnswer {
                ctx,
                task: &task,
                endpoint: req.endpoint,
                include_usage: req.include_usage,
            };
            super::relay::answer_relayed(session, cold, d, stream, ticket)
                .await
                .map(|tokens| ctx.meter.answered = Some(tokens))
        } else if req.stream {
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
            let extra = [
                (headers::ROUTE, "compute".to_string()),
                (headers::TASK, task.clone()),
            ];
            let body = Bytes::from(completion.to_string());
            respond::send_json(session, ctx, 200, body, &extra).await
        };
        if let Err(e) = written {
            // The client went away while the task ran.
            log::debug!("cold answer for task {task} not delivered: {e}");
            ctx.meter.client_left = true;
        }
        Ok(Outcome::Answered)
    }
}

/// Submits FIRST's payload for this request, with where to stream its lines (`relay`) or for a
/// whole answer; errors are the client's answer.
async fn submit(
    cold: &ColdPath,
    d: &Deployment,
    endpoint: Endpoint,
    body: &Bytes,
    relay: Option<(&RelayTicket, &ComputeStreaming)>,
) -> Result<String, ApiError> {
    let Some(c) = &d.compute else {
        return Err(errors::compute_unavailable(d));
    };
    // No node runs the endpoint's workers and a task already went there to start one
    // (FIRST's `endpoint_triggered`): another would only queue behind it.
    let starts_node = match cold.client.endpoint_status(&c.endpoint).await {
        Ok(s) if !s.online => return Err(errors::endpoint_offline(d)),
        Ok(s) if s.without_managers() => {
            if !cold.client.claim_start(&c.endpoint, STARTING).await {
                return Err(errors::endpoint_not_ready(d));
            }
            true
        }
        Ok(_) => false,
        Err(e) => return Err(errors::compute(&e, d)),
    };
    let task = submit_task(cold, d, c, endpoint, body, relay).await;
    if task.is_err() && starts_node {
        cold.client.release_start(&c.endpoint).await;
    }
    task
}

/// FIRST's `model_params` for this request, submitted to the model's function.
async fn submit_task(
    cold: &ColdPath,
    d: &Deployment,
    c: &crate::config::ModelCompute,
    endpoint: Endpoint,
    body: &Bytes,
    relay: Option<(&RelayTicket, &ComputeStreaming)>,
) -> Result<String, ApiError> {
    let mut params: Value =
        serde_json::from_slice(body).map_err(|_| errors::body_not_an_object(false))?;
    let p = params
        .as_object_mut()
        .ok_or_else(|| errors::body_not_an_object(true))?;
    match relay {
        // FIRST's streaming parameters; the usage chunk is asked for (and hidden from a client
        // that did not ask), as on the direct path.
        Some((ticket, at)) => {
            p.insert("streaming_server_host".into(), json!(at.advertise_host));
            p.insert("streaming_server_port".into(), json!(at.advertise_port));
            p.insert("streaming_server_protocol".into(), json!(at.protocol));
            p.insert("stream_task_id".into(), json!(ticket.task_id));
            p.insert("stream_task_token".into(), json!(ticket.token));
            if endpoint.usage_on_request() {
                let options = p.entry("stream_options").or_insert_with(|| json!({}));
                if !options.is_object() {
                    *options = json!({});
                }
                options["include_usage"] = json!(true);
            }
        }
        // Without a streaming server FIRST's function cannot stream: the answer comes back
        // whole and the gateway replays it as SSE. vLLM refuses `stream_options` then.
        None => {
            p.insert("stream".into(), json!(false));
            p.remove("stream_options");
        }
    }
    p.insert("openai_endpoint".into(), json!(endpoint.path()));
    p.insert("api_port".into(), json!(c.api_port));
    let task = cold
        .client
        .submit(&c.endpoint, &c.function, &[json!({"model_params": params})])
        .await
        .map_err(|e| errors::compute(&e, d))?;
    cold.client.trigger(&c.endpoint);
    cold.metrics
        .compute_tasks
        .with_label_values(&["submitted"])
        .inc();
    Ok(task)
}

/// Waits for the task and returns the completion JSON.
pub(super) async fn completion(
    cold: &ColdPath,
    d: &Deployment,
    task: &str,
) -> Result<Value, ApiError> {
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
pub(super) struct StreamAnswer<'a> {
    /// The request (its id, trace and CORS headers go on the answer).
    pub ctx: &'a RequestCtx,
    pub task: &'a str,
    pub endpoint: Endpoint,
    /// The client asked for the usage chunk.
    pub include_usage: bool,
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
    write_stream_head(session, &a).await?;
    let result = completion(cold, d, task);
    tokio::pin!(result);
    let mut tick = tokio::time::interval(cold.keepalive);
    tick.tick().await;
    let outcome = loop {
        tokio::select! {
            r = &mut result => break r,
            _ = tick.tick() => {
                // An error here means the client left: stop waiting.
                session.write_response_body(Some(waiting_comment(d, task)), false).await?;
            }
        }
    };
    let (events, tokens) = match outcome {
        Ok(c) => (
            completion_events(&c, a.endpoint, a.include_usage),
            Some(Tokens::of_completion(&c)),
        ),
        Err(e) => (error_event(a.endpoint, &e), None),
    };
    session
        .write_response_body(Some(Bytes::from(events)), true)
        .await?;
    Ok(tokens)
}

/// The keep-alive comment of a stream waiting for its task.
pub(super) fn waiting_comment(d: &Deployment, task: &str) -> Bytes {
    Bytes::from(format!(": waiting for {} (task {task})\n\n", d.model))
}

/// The head of a streamed cold answer.
pub(super) async fn write_stream_head(
    session: &mut Session,
    a: &StreamAnswer<'_>,
) -> pingora::Result<()> {
    let mut h = HeaderMap::with_capacity(10);
    respond::tag(&mut h, a.ctx)?;
    let fixed = [
        (CONTENT_TYPE, "text/event-stream; charset=utf-8"),
        (CACHE_CONTROL, "no-cache"),
        (TRANSFER_ENCODING, "chunked"),
        (headers::ROUTE, "compute"),
    ];
    for (name, value) in fixed {
        h.insert(name, HeaderValue::from_static(value));
    }
    h.insert(headers::TASK, headers::value(a.task)?);
    let resp = headers::response(200, h)?;
    session.write_response_header(Box::new(resp), false).await
}

/// An error inside a stream, in the endpoint's envelope: an error event, then the stream's
/// end (a typed-event stream's end is the error itself).
pub(super) fn error_event(endpoint: Endpoint, e: &ApiError) -> String {
    let body = String::from_utf8_lossy(&e.body_for(endpoint.envelope())).into_owned();
    match endpoint.framing() {
        Framing::TypedEvents => format!("event: error\ndata: {body}\n\n"),
        Framing::OpenAiChunks | Framing::None => format!("data: {body}\n\n{END}"),
    }
}
