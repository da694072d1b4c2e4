//! Writing responses the gateway answers itself (errors and listings).

use super::headers::{self, REQUEST_ID, TRACEPARENT};
use super::RequestCtx;
use crate::openai::ApiError;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use pingora::proxy::Session;

/// Sends a complete JSON response, with the request's id and trace.
pub async fn send_json(
    session: &mut Session,
    ctx: &RequestCtx,
    status: u16,
    body: Bytes,
    extra: &[(HeaderName, String)],
) -> pingora::Result<()> {
    send_body(session, ctx, status, "application/json", body, extra).await
}

/// Sends a complete response of `content_type`, with the request's id and trace.
pub async fn send_body(
    session: &mut Session,
    ctx: &RequestCtx,
    status: u16,
    content_type: &'static str,
    body: Bytes,
    extra: &[(HeaderName, String)],
) -> pingora::Result<()> {
    let mut h = HeaderMap::with_capacity(8 + extra.len());
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static(content_type),
    );
    h.insert(http::header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    tag(&mut h, ctx)?;
    for (name, value) in extra {
        h.insert(name.clone(), headers::value(value.as_str())?);
    }
    let resp = headers::response(status, h)?;
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(body), true).await
}

/// Adds what every answer carries: the request's id, its trace context, and the CORS headers
/// when a page of an allowed origin asked.
pub fn tag(h: &mut HeaderMap, ctx: &RequestCtx) -> pingora::Result<()> {
    h.insert(REQUEST_ID, headers::value(ctx.request.id.as_str())?);
    if let Some(t) = &ctx.request.traceparent {
        h.insert(TRACEPARENT, t.clone());
    }
    if let Some(cors) = &ctx.request.cors {
        // In place of a backend's own CORS headers, if it sent any.
        for (name, value) in cors.headers() {
            h.insert(name, value);
        }
    }
    Ok(())
}

/// Answers a browser's preflight: 204 with the CORS headers.
pub async fn send_preflight(
    session: &mut Session,
    ctx: &RequestCtx,
    cors: Vec<(HeaderName, HeaderValue)>,
) -> pingora::Result<()> {
    let mut h = HeaderMap::with_capacity(1 + cors.len());
    h.insert(REQUEST_ID, headers::value(ctx.request.id.as_str())?);
    h.extend(cors);
    let resp = headers::response(204, h)?;
    session.write_response_header(Box::new(resp), true).await
}

/// Sends an error in the envelope of the request's route (OpenAI's, Anthropic's on the
/// Messages API, FIRST's on FIRST's batch and relay routes).
pub async fn send_error(
    session: &mut Session,
    ctx: &RequestCtx,
    err: &ApiError,
) -> pingora::Result<()> {
    let retry = err
        .retry_after
        .map(|s| (http::header::RETRY_AFTER, s.to_string()));
    let allow = err.allow.map(|a| (http::header::ALLOW, a.to_string()));
    let limit = err.limit.map(|l| (headers::LIMIT, l.to_string()));
    let extra: Vec<_> = retry.into_iter().chain(allow).chain(limit).collect();
    let body = err.body_for(ctx.request.envelope);
    send_json(session, ctx, err.status, body, &extra).await
}
