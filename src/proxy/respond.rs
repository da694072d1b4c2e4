//! Writing responses the gateway answers itself (errors and listings).

use super::RequestCtx;
use crate::openai::ApiError;
use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;

/// Sends a complete JSON response, with the request's id and trace.
pub async fn send_json(
    session: &mut Session,
    ctx: &RequestCtx,
    status: u16,
    body: Bytes,
    headers: &[(&'static str, String)],
) -> pingora::Result<()> {
    send_body(session, ctx, status, "application/json", body, headers).await
}

/// Sends a complete response of `content_type`, with the request's id and trace.
pub async fn send_body(
    session: &mut Session,
    ctx: &RequestCtx,
    status: u16,
    content_type: &str,
    body: Bytes,
    headers: &[(&'static str, String)],
) -> pingora::Result<()> {
    let mut resp = ResponseHeader::build(status, Some(8 + headers.len()))?;
    resp.insert_header("content-type", content_type)?;
    resp.insert_header("content-length", body.len().to_string())?;
    tag(&mut resp, ctx)?;
    for (name, value) in headers {
        resp.insert_header(*name, value.as_str())?;
    }
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(body), true).await
}

/// Adds what every answer carries: the request's id, its trace context, and the CORS headers
/// when a page of an allowed origin asked.
pub fn tag(resp: &mut ResponseHeader, ctx: &RequestCtx) -> pingora::Result<()> {
    resp.insert_header("x-request-id", ctx.request.id.as_str())?;
    if let Some(t) = &ctx.request.trace {
        resp.insert_header("traceparent", t.traceparent())?;
    }
    if let Some(cors) = &ctx.request.cors {
        for (name, value) in cors.headers() {
            resp.insert_header(name, value)?;
        }
    }
    Ok(())
}

/// Answers a browser's preflight: 204 with the CORS headers.
pub async fn send_preflight(
    session: &mut Session,
    ctx: &RequestCtx,
    headers: Vec<(&'static str, http::HeaderValue)>,
) -> pingora::Result<()> {
    let mut resp = ResponseHeader::build(204, Some(3 + headers.len()))?;
    resp.insert_header("x-request-id", ctx.request.id.as_str())?;
    for (name, value) in headers {
        resp.insert_header(name, value)?;
    }
    session.write_response_header(Box::new(resp), true).await
}

/// Sends an error in the envelope of the request's route (OpenAI's, Anthropic's on the
/// Messages API, FIRST's on FIRST's batch and relay routes).
pub async fn send_error(
    session: &mut Session,
    ctx: &RequestCtx,
    err: &ApiError,
) -> pingora::Result<()> {
    let retry = err.retry_after.map(|s| ("retry-after", s.to_string()));
    let allow = err.allow.map(|a| ("allow", a.to_string()));
    let limit = err.limit.map(|l| ("x-firstgate-limit", l.to_string()));
    let headers: Vec<_> = retry.into_iter().chain(allow).chain(limit).collect();
    let body = err.body_for(ctx.request.envelope);
    send_json(session, ctx, err.status, body, &headers).await
}
