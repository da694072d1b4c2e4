//! Writing responses the gateway answers itself (errors and listings).

use crate::openai::ApiError;
use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;

/// Sends a complete JSON response.
pub async fn send_json(
    session: &mut Session,
    status: u16,
    body: Bytes,
    headers: &[(&'static str, String)],
) -> pingora::Result<()> {
    let mut resp = ResponseHeader::build(status, Some(3 + headers.len()))?;
    resp.insert_header("content-type", "application/json")?;
    resp.insert_header("content-length", body.len().to_string())?;
    for (name, value) in headers {
        resp.insert_header(*name, value.as_str())?;
    }
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(body), true).await
}

/// Sends an error in the OpenAI envelope.
pub async fn send_error(session: &mut Session, err: &ApiError) -> pingora::Result<()> {
    let retry = err.retry_after.map(|s| ("retry-after", s.to_string()));
    let allow = err.allow.map(|a| ("allow", a.to_string()));
    let headers: Vec<_> = retry.into_iter().chain(allow).collect();
    send_json(session, err.status, err.body(), &headers).await
}
