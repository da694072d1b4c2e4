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
    let mut resp = ResponseHeader::build(status, Some(5 + headers.len()))?;
    resp.insert_header("content-type", "application/json")?;
    resp.insert_header("content-length", body.len().to_string())?;
    resp.insert_header("x-request-id", ctx.request.id.as_str())?;
    if let Some(t) = &ctx.request.trace {
        resp.insert_header("traceparent", t.traceparent())?;
    }
    for (name, value) in headers {
        resp.insert_header(*name, value.as_str())?;
    }
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(body), true).await
}

/// Sends an error in the OpenAI envelope.
pub async fn send_error(
    session: &mut Session,
    ctx: &RequestCtx,
    err: &ApiError,
) -> pingora::Result<()> {
    let retry = err.retry_after.map(|s| ("retry-after", s.to_string()));
    let allow = err.allow.map(|a| ("allow", a.to_string()));
    let headers: Vec<_> = retry.into_iter().chain(allow).collect();
    send_json(session, ctx, err.status, err.body(), &headers).await
}
