//! The backend side of a proxied request: which instance each attempt goes to, the request it
//! receives, and when a failed attempt may be tried again.

use super::{errors, RequestCtx};
use bytes::Bytes;
use pingora::http::RequestHeader;
use pingora::prelude::HttpPeer;
use pingora::{Error, ErrorType};

/// Request headers that must not travel to a backend: hop-by-hop headers, the client's
/// credentials, and encodings we want to see in plain text.
const STRIPPED_UPSTREAM_HEADERS: [&str; 14] = [
    "authorization",
    "proxy-authorization",
    // Anthropic clients' form of the same token.
    "x-api-key",
    // The batch runner's own credential and bookkeeping (see `crate::batch`).
    crate::batch::LINE_HEADER,
    crate::batch::LINE_BATCH_HEADER,
    "connection",
    "keep-alive",
    "te",
    "upgrade",
    "expect",
    "transfer-encoding",
    "accept-encoding",
    // Client-written claims about the client; the gateway sends its own X-Forwarded-*.
    "forwarded",
    "x-real-ip",
];

/// The peer of this attempt: the reserved instance, or on a retry another one (or the same
/// again when only its pooled connection was stale).
pub fn next_peer(ctx: &mut RequestCtx) -> pingora::Result<Box<HttpPeer>> {
    let t = &mut ctx.target;
    let deployment = t
        .deployment
        .clone()
        .ok_or_else(|| Error::explain(ErrorType::InternalError, "no deployment chosen"))?;
    if !t.tried.is_empty() {
        t.slot = None;
        let mut next = deployment.pool.try_acquire(&t.tried);
        if next.is_err() && t.stale_connection {
            next = deployment.pool.try_acquire(&[]);
        }
        match next {
            Ok(slot) => t.slot = Some(slot),
            Err(e) => {
                t.failure = Some(errors::pool(e, &deployment));
                return Err(Error::explain(
                    ErrorType::HTTPStatus(503),
                    "no backend left to retry",
                ));
            }
        }
    }
    let slot = t
        .slot
        .as_ref()
        .ok_or_else(|| Error::explain(ErrorType::InternalError, "no instance reserved"))?;
    t.tried.push(slot.instance().socket);
    t.instance = Some(slot.instance().id().to_owned());
    Ok(Box::new(deployment.pool.peer(slot.instance())))
}

/// The backend's request: its path, host and credentials, the gateway's `X-Forwarded-*`, and
/// the length of the (rewritten) body.
pub fn rewrite_request(upstream: &mut RequestHeader, ctx: &RequestCtx) -> pingora::Result<()> {
    let (Some(deployment), Some(slot), Some(endpoint)) = (
        &ctx.target.deployment,
        &ctx.target.slot,
        ctx.request.endpoint,
    ) else {
        return Err(Error::explain(
            ErrorType::InternalError,
            "upstream request without a target",
        ));
    };
    let addr = &slot.instance().addr;
    let path = format!("{}/{}", addr.base_path, endpoint.path());
    upstream.set_uri(
        http::Uri::try_from(path)
            .map_err(|_| Error::explain(ErrorType::InternalError, "bad upstream path"))?,
    );
    // One pass over the (few) headers the client sent, instead of a lookup per stripped name.
    let stripped: Vec<http::HeaderName> = upstream
        .headers
        .keys()
        .filter(|k| STRIPPED_UPSTREAM_HEADERS.contains(&k.as_str()))
        .cloned()
        .collect();
    for name in &stripped {
        upstream.remove_header(name);
    }
    upstream.insert_header(http::header::HOST, slot.instance().id())?;
    if let Some(client) = &ctx.request.client {
        upstream.insert_header("x-forwarded-for", client.forwarded_for.as_str())?;
        upstream.insert_header("x-forwarded-proto", client.proto)?;
    }
    if let Some(auth) = &deployment.pool.settings.authorization {
        upstream.insert_header("authorization", auth.clone())?;
    }
    // The backend continues the trace with the gateway as its parent.
    if let Some(t) = &ctx.request.trace {
        upstream.insert_header("traceparent", t.traceparent())?;
        if let Some(state) = &t.state {
            upstream.insert_header("tracestate", state.as_str())?;
        }
    }
    let len = ctx.request.body.as_ref().map_or(0, Bytes::len);
    upstream.insert_header("content-length", len.to_string())
}

/// Uses the request's one retry, if it is left; `stale` when only a pooled connection failed
/// (the same instance may then be tried again).
pub fn retry(ctx: &mut RequestCtx, stale: bool) -> bool {
    let t = &mut ctx.target;
    if t.retries_left == 0 {
        return false;
    }
    t.retries_left -= 1;
    t.stale_connection = stale;
    true
}
