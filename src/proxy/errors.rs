//! The one place where the domain's failures become HTTP errors for the client.

use super::routes::RouteError;
use crate::auth::AuthError;
use crate::catalog::{Deployment, LookupError, PoolError};
use crate::compute::relay::RelayRefusal;
use crate::compute::{failure, ComputeError};
use crate::openai::ApiError;
use crate::openai::Endpoint;
use pingora::{Error, ErrorSource, ErrorType};

/// Where the gateway's inference is, for errors that send clients there.
const SERVED: &str = "Inference is POST /v1/chat/completions (or completions, embeddings, \
                      responses, messages), or the same under \
                      /resource_server/{cluster}/{framework}/v1; GET /v1/models lists models.";

const BATCH: &str = "The OpenAI Files and Batch APIs are not offered by this gateway (its \
                     configuration has no `batch:` section): send the requests one by one.";

/// Parts of the OpenAI API that an inference gateway does not offer, by the path segment after
/// `v1/` (what an SDK's `client.<part>` calls), with what to do instead.
const NOT_OFFERED: [(&str, &str); 12] = [
    ("files", BATCH),
    ("batches", BATCH),
    ("uploads", "The OpenAI Uploads API is not offered by this gateway."),
    ("assistants", "The OpenAI Assistants API is not offered by this gateway: use chat/completions or responses, keeping the conversation on the client."),
    ("threads", "The OpenAI Assistants API (threads) is not offered by this gateway: use chat/completions or responses, keeping the conversation on the client."),
    ("vector_stores", "Vector stores are not offered by this gateway: compute embeddings with POST /v1/embeddings and keep them on the client."),
    ("audio", "Audio models are not offered by this gateway."),
    ("images", "Image generation is not offered by this gateway."),
    ("moderations", "The moderation endpoint is not offered by this gateway."),
    ("fine_tuning", "Fine-tuning is not offered by this gateway."),
    ("realtime", "The Realtime API is not offered by this gateway: stream with chat/completions and \"stream\": true."),
    ("conversations", "Stored conversations are not offered by this gateway: send the conversation with each request to chat/completions or responses."),
];

pub fn route(e: RouteError, method: &http::Method, path: &str) -> ApiError {
    match e {
        RouteError::NotFound => {
            // The part of the OpenAI API asked for, under either base URL.
            let rest = path.split_once("/v1/").map_or("", |(_, rest)| rest);
            let part = rest.split('/').next().unwrap_or_default();
            let said = match NOT_OFFERED.iter().find(|(p, _)| *p == part) {
                Some((_, instead)) => format!("No route {method} {path}. {instead} {SERVED}"),
                // Stored completions and responses (`GET /v1/chat/completions`, `GET
                // /v1/responses/{id}`): nothing is stored here.
                None if method == http::Method::GET
                    && matches!(part, "chat" | "responses" | "completions") =>
                {
                    format!(
                        "No route {method} {path}. This gateway stores no completions or \
                         responses: each answer comes back in the response to its POST. {SERVED}"
                    )
                }
                None => format!("No route {method} {path}. {SERVED}"),
            };
            ApiError::new(404, "not_found", said)
        }
        RouteError::MethodNotAllowed { allow } => ApiError::method_not_allowed(
            allow,
            format!("{path} does not accept {method}; use {allow}."),
        ),
    }
}

/// The Files and Batch APIs asked under another base URL than `/v1`.
pub fn batch_elsewhere(path: &str) -> ApiError {
    let rest = path
        .find("/v1/")
        .map_or(path, |at| &path[at + "/v1".len()..]);
    ApiError::new(
        404,
        "not_found",
        format!(
            "The OpenAI Files and Batch APIs are served under the /v1 base URL only: use \
             base_url http://HOST/v1 (this call is {rest} there). A batch's lines may name any \
             model you may use."
        ),
    )
}

/// A refusal of the Files and Batch APIs.
pub fn batch(e: crate::batch::BatchError) -> ApiError {
    use crate::batch::BatchError;
    match e {
        BatchError::NotFound(message) => ApiError::new(404, "not_found", message),
        BatchError::Invalid { message, param } => ApiError {
            param,
            ..ApiError::invalid_request(message)
        },
        BatchError::Quota(n) => ApiError::new(
            400,
            "quota_exceeded",
            format!(
                "You have {n} unfinished batches, the most allowed (batch.max_active_per_user); \
                 wait for one to finish, or cancel one."
            ),
        ),
        BatchError::Conflict(message) => ApiError::new(409, "conflict", message),
        BatchError::Coded {
            status,
            code,
            message,
        } => ApiError::new(status, code, message),
        BatchError::Internal => ApiError::new(
            500,
            "internal_error",
            "The batch store failed; the gateway's log says why. Try again later.",
        ),
    }
}

/// A batch line that finds no capacity it may take: the runner tries again later.
pub fn background_busy(d: &Deployment) -> ApiError {
    ApiError::new(
        503,
        "background_busy",
        format!(
            "No hot instance of '{}' has a slot that interactive requests do not need; the \
             batch line waits.",
            d.model
        ),
    )
    .with_retry_after(1)
}

/// A FIRST-layout base URL whose framework the cluster does not have, asked for its models
/// (inference there is FIRST's 400 `unsupported_framework`; a listing is a missing resource).
pub fn framework_not_listed(cluster: &str, framework: &str) -> ApiError {
    ApiError::new(
        404,
        "framework_not_found",
        format!(
            "The framework '{framework}' is not available on cluster '{cluster}'. GET \
             /resource_server/list-endpoints lists what each cluster offers."
        ),
    )
}

/// A cold stream's task reported an error (or its lines never came).
pub fn compute_stream(message: &str, d: &Deployment) -> ApiError {
    log::error!("cold stream of {} on {}: {message}", d.model, d.cluster);
    ApiError::new(
        502,
        "compute_stream_failed",
        format!(
            "Streaming '{}' on cluster '{}' through Globus Compute failed: {}",
            d.model,
            d.cluster,
            match failure::backend_refusal(message) {
                Some(r) => format!("the model's server answered {}: {}", r.status, r.message),
                None => failure::exception_summary(message),
            }
        ),
    )
}

/// A post to the streaming routes of a gateway without `compute.streaming`.
pub fn relay_off() -> ApiError {
    ApiError::new(
        404,
        "not_found",
        "This gateway does not take streamed Compute results (compute.streaming is not set).",
    )
}

/// A refused post of FIRST's inference function (the function logs the status and goes on).
pub fn relay(refusal: RelayRefusal) -> ApiError {
    match refusal {
        RelayRefusal::Secret => {
            ApiError::new(401, "unauthorized", "Missing or wrong X-Internal-Secret.")
        }
        RelayRefusal::Token => ApiError::new(
            403,
            "permission_denied",
            "Missing or wrong X-Stream-Task-Token for this task.",
        ),
        RelayRefusal::UnknownTask => ApiError::new(
            404,
            "task_not_found",
            "No client is waiting for this stream task (it ended or never existed).",
        ),
        RelayRefusal::Behind => ApiError::new(
            503,
            "client_behind",
            "The client of this stream is not reading fast enough; this batch was dropped.",
        ),
        RelayRefusal::Unavailable => ApiError::new(
            503,
            "relay_unavailable",
            "This stream task waits on another replica and the replicas' Redis cannot be reached.",
        )
        .with_retry_after(1),
        RelayRefusal::Body(why) => ApiError::invalid_request(format!(
            "The body must be {{\"task_id\", \"data\" or \"error\", \"type\"}}: {why}"
        )),
    }
}

/// A preflight from a page whose origin may not call the API.
pub fn origin_not_allowed(origin: Option<&http::HeaderValue>) -> ApiError {
    let origin = origin
        .and_then(|o| o.to_str().ok())
        .unwrap_or("(no Origin header)");
    ApiError::new(
        403,
        "origin_not_allowed",
        format!(
            "Pages from {origin} may not call this API from a browser. The operators can allow \
             the origin in edge.cors.allowed_origins."
        ),
    )
}

pub fn lookup(e: LookupError) -> ApiError {
    match e {
        LookupError::ClusterNotFound { cluster } => ApiError::new(
            404,
            "cluster_not_found",
            format!(
                "The cluster '{cluster}' does not exist. GET /resource_server/list-endpoints \
                 lists the clusters and models you can use."
            ),
        ),
        LookupError::FrameworkNotFound { cluster, framework } => ApiError::new(
            400,
            "unsupported_framework",
            format!(
                "The framework '{framework}' is not available on cluster '{cluster}'. \
                 GET /resource_server/list-endpoints lists what each cluster offers."
            ),
        ),
        LookupError::ModelNotFound {
            cluster: Some(cluster),
            model,
        } => ApiError::new(
            404,
            "endpoint_not_found",
            format!(
                "The model '{model}' is not served on cluster '{cluster}'. \
                 GET /resource_server/{cluster}/models lists the models there."
            ),
        )
        .with_param("model"),
        LookupError::ModelNotFound {
            cluster: None,
            model,
        } => ApiError::new(
            404,
            "endpoint_not_found",
            format!(
                "The model '{model}' does not exist. GET /v1/models lists the models you can use."
            ),
        )
        .with_param("model"),
    }
}

/// A rate limit refused the request; with `state.redis.on_error: closed`, Redis could not
/// say (503).
pub fn rate_limited(l: &crate::usage::Limited) -> ApiError {
    if l.limit == crate::usage::UNAVAILABLE {
        return ApiError::new(503, "limits_unavailable", l.message.clone()).with_retry_after(1);
    }
    ApiError {
        limit: Some(l.limit),
        ..ApiError::new(429, "rate_limit_exceeded", l.message.clone())
    }
    .with_retry_after(l.retry_after.as_secs().max(1))
}

/// The process has no file descriptor left for another backend connection.
pub fn at_capacity() -> ApiError {
    ApiError::new(
        503,
        "gateway_at_capacity",
        "The gateway is serving as many requests as it has connections for; retry shortly.",
    )
    .with_retry_after(1)
}

/// The gateway, or the cluster that would serve the request, is under maintenance.
pub fn maintenance(message: String) -> ApiError {
    ApiError::new(503, "cluster_under_maintenance", message)
}

/// The request head is larger than `edge.max_header_bytes`.
pub fn headers_too_large(limit: usize) -> ApiError {
    ApiError::new(
        431,
        "request_header_fields_too_large",
        format!("Request headers are too large: at most {limit} bytes are accepted. Send fewer or shorter headers."),
    )
}

/// The route policy failed (a script error or an exceeded limit).
pub fn policy(e: &crate::policy::PolicyError) -> ApiError {
    ApiError::new(
        500,
        "policy_error",
        format!(
            "The gateway's routing policy failed ({e}). This is a problem of the gateway's \
             configuration, not of your request; please tell the operators."
        ),
    )
}

pub fn policy_index(index: usize) -> ApiError {
    ApiError::new(
        500,
        "policy_error",
        format!("The routing policy chose candidate {index}, which does not exist."),
    )
}

/// The policy chose Globus Compute for a deployment that has no compute fallback.
pub fn compute_unavailable(d: &Deployment) -> ApiError {
    ApiError::new(
        503,
        "compute_unavailable",
        format!(
            "No instance of '{}' is running on cluster '{}', and it cannot run through Globus \
             Compute on this gateway. Try again later.",
            d.model, d.cluster
        ),
    )
    .with_retry_after(30)
}

pub fn endpoint_not_offered(d: &Deployment, endpoint: Endpoint) -> ApiError {
    let offered: Vec<String> = d
        .endpoints
        .iter()
        .map(|e| format!("/v1/{}", e.path()))
        .collect();
    ApiError::new(
        400,
        "unsupported_endpoint",
        format!(
            "'/v1/{}' is not available for model '{}' on cluster '{}'; it offers {}.",
            endpoint.path(),
            d.model,
            d.cluster,
            offered.join(", ")
        ),
    )
}

pub fn pool(e: PoolError, d: &Deployment) -> ApiError {
    match e {
        PoolError::NoHealthyBackend => ApiError::new(
            503,
            "service_unavailable",
            format!(
                "No healthy backend is serving model '{}' on cluster '{}' right now. \
                 Try again shortly.",
                d.model, d.cluster
            ),
        )
        .with_retry_after(5),
        PoolError::AtCapacity => ApiError::new(
            503,
            "backend_busy",
            format!(
                "Every backend of model '{}' on cluster '{}' is at its concurrency limit. \
                 Try again shortly.",
                d.model, d.cluster
            ),
        )
        .with_retry_after(1),
    }
}

/// Maps a proxying failure to the client's error; `None` when there is nobody to answer
/// (the client went away).
pub fn proxy(e: &Error, d: Option<&Deployment>) -> Option<ApiError> {
    let (model, cluster) = d.map_or(("?", "?"), |d| (d.model.as_str(), d.cluster.as_str()));
    if let ErrorType::HTTPStatus(code) = e.etype() {
        return Some(ApiError::new(
            *code,
            "upstream_error",
            "The request failed.",
        ));
    }
    // Beyond the budget `edge::Admission` keeps (an operator set the caps above the limit).
    let out_of_descriptors = e
        .root_cause()
        .downcast_ref::<std::io::Error>()
        .and_then(std::io::Error::raw_os_error)
        .is_some_and(|code| code == 24 || code == 23); // EMFILE, ENFILE
    if out_of_descriptors {
        log::warn!("out of file descriptors for a backend connection: {e}");
        return Some(at_capacity());
    }
    match e.esource() {
        ErrorSource::Downstream => None,
        ErrorSource::Upstream => Some(match e.etype() {
            ErrorType::ConnectTimedout
            | ErrorType::ConnectRefused
            | ErrorType::ConnectNoRoute
            | ErrorType::ConnectError
            | ErrorType::ConnectProxyFailure
            | ErrorType::TLSHandshakeFailure
            | ErrorType::TLSHandshakeTimedout => d.map_or_else(
                || ApiError::new(503, "service_unavailable", "No backend could be reached."),
                |d| pool(PoolError::NoHealthyBackend, d),
            ),
            ErrorType::ReadTimedout | ErrorType::WriteTimedout => ApiError::new(
                504,
                "upstream_timeout",
                format!("The backend of model '{model}' on cluster '{cluster}' stopped answering."),
            ),
            _ => ApiError::new(
                502,
                "upstream_error",
                format!(
                    "The backend of model '{model}' on cluster '{cluster}' failed while \
                     answering. Try again."
                ),
            ),
        }),
        ErrorSource::Internal | ErrorSource::Unset => Some(ApiError::new(
            500,
            "internal_error",
            "The gateway failed to handle the request; the error is logged.",
        )),
    }
}

/// The body is larger than `limits.max_body_bytes`.
pub fn body_too_large(max: usize) -> ApiError {
    ApiError::new(
        413,
        "request_too_large",
        format!("The request body is larger than this gateway's limit of {max} bytes."),
    )
}

/// The body stopped arriving for `edge.client_read_timeout`.
pub fn body_stalled(timeout: std::time::Duration) -> ApiError {
    ApiError::new(
        408,
        "request_timeout",
        format!(
            "The request body stalled: nothing arrived for {}.",
            humantime::format_duration(timeout)
        ),
    )
}

/// The connection broke while the body was read.
pub fn body_incomplete() -> ApiError {
    ApiError::invalid_request("The request body could not be read completely.")
}

/// A body of unknown length too large to replay on a retry.
pub fn length_required(replayable: usize) -> ApiError {
    ApiError::new(
        411,
        "length_required",
        format!(
            "Bodies over {} KiB must be sent with a Content-Length header.",
            replayable / 1024
        ),
    )
}

/// The body of a request sent through Globus Compute is not a JSON object.
pub fn body_not_an_object(parsed: bool) -> ApiError {
    let message = if parsed {
        "The request body must be a JSON object."
    } else {
        "The request body is not valid JSON."
    };
    ApiError::new(400, "invalid_request_error", message)
}

/// The route policy refused the request itself.
pub fn policy_rejected(status: u16, message: String) -> ApiError {
    ApiError::new(status, "policy_rejected", message)
}

/// The model's Globus Compute endpoint is online but runs no node yet, and a task that starts
/// one was already sent (FIRST's 503 "online but not ready"): another would only queue.
pub fn endpoint_not_ready(d: &Deployment) -> ApiError {
    ApiError::new(
        503,
        "endpoint_not_ready",
        format!(
            "The Globus Compute endpoint of '{}' on cluster '{}' is online but not ready to \
             receive tasks: its node is starting. Please try again later.",
            d.model, d.cluster
        ),
    )
    .with_retry_after(30)
}

/// The model's Globus Compute endpoint is offline.
pub fn endpoint_offline(d: &Deployment) -> ApiError {
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
pub fn compute(e: &ComputeError, d: &Deployment) -> ApiError {
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
            // The model's server refused the request: its status where the client has
            // something to fix (400, 404, 413, 422) and its own message, as a direct request
            // would have had them. A 401/403 there is the node's own key, not the user's
            // token: a gateway-side failure (502), like the rest.
            let refusal = failure::backend_refusal(exception);
            let clients = refusal
                .as_ref()
                .is_some_and(|r| matches!(r.status, 400 | 404 | 413 | 422));
            if clients {
                log::info!(
                    "compute task {task} for {} on {}: the model's server refused the \
                     request:\n{exception}",
                    d.model,
                    d.cluster
                );
            } else {
                log::error!(
                    "compute task {task} for {} on {} failed:\n{exception}",
                    d.model,
                    d.cluster
                );
            }
            if let Some(r) = refusal {
                let status = if clients { r.status } else { 502 };
                return ApiError::new(status, "backend_error", r.message);
            }
            ApiError::new(
                502,
                "compute_task_failed",
                format!(
                    "Running '{}' on cluster '{}' failed (Globus Compute task {task}: {}). The \
                     operators have the details.",
                    d.model,
                    d.cluster,
                    failure::exception_summary(exception)
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
        ComputeError::Unreachable(_) | ComputeError::NotSent(_) | ComputeError::Refused { .. } => {
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

/// How to get a fresh token, appended to 401 messages.
const TOKEN_HELP: &str = "Get a fresh access token (for ALCF: `python inference_auth_token.py \
    get_access_token`) and send it as 'Authorization: Bearer <token>'.";

pub fn auth(e: AuthError) -> ApiError {
    match e {
        AuthError::MissingToken => ApiError::new(
            401,
            "unauthorized",
            format!("Missing ('Authorization': 'Bearer <your-access-token>') in request headers. {TOKEN_HELP}"),
        ),
        AuthError::MalformedHeader => ApiError::new(
            401,
            "unauthorized",
            format!("The Authorization header must be 'Bearer <your-access-token>'. {TOKEN_HELP}"),
        ),
        AuthError::InvalidToken => ApiError::new(
            401,
            "unauthorized",
            format!("Token is either not active (expired or revoked) or invalid. {TOKEN_HELP}"),
        ),
        AuthError::Expired => ApiError::new(401, "unauthorized", format!("Access token expired. {TOKEN_HELP}")),
        AuthError::WrongAudience(why) => ApiError::new(
            401,
            "unauthorized",
            format!("The token was not issued for this service: {why}. {TOKEN_HELP}"),
        ),
        AuthError::Forbidden { rule, message } => {
            ApiError::new(403, "permission_denied", format!("{message} (rule: {rule})"))
        }
        AuthError::Unavailable(_) => ApiError::new(
            503,
            "auth_unavailable",
            "The identity provider cannot be reached to check your token. Try again shortly.",
        )
        .with_retry_after(5),
        AuthError::Throttled => ApiError::new(
            503,
            "auth_busy",
            "The gateway is checking many new tokens right now; try again in a second (a \
             token it has checked before is not held up).",
        )
        .with_retry_after(1),
    }
}
