//! The backend side of a proxied request: which instance each attempt goes to, the request it
//! receives, and when a failed attempt may be tried again.

use super::{errors, headers, RequestCtx};
use bytes::Bytes;
use http::{HeaderName, HeaderValue};
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
    let instance = slot.instance();
    let bad = |what| Error::explain(ErrorType::InternalError, what);
    let uri = instance
        .path(endpoint)
        .ok_or_else(|| bad("bad upstream path"))?;
    let host = instance.host().ok_or_else(|| bad("bad upstream host"))?;
    headers::edit_request(upstream, |parts| {
        parts.uri = uri;
        let h = &mut parts.headers;
        // One pass over the (few) headers the client sent, instead of a lookup per stripped name.
        let stripped: Vec<HeaderName> = h
            .keys()
            .filter(|k| STRIPPED_UPSTREAM_HEADERS.contains(&k.as_str()))
            .cloned()
            .collect();
        for name in &stripped {
            h.remove(name);
        }
        h.insert(http::header::HOST, host);
        if let Some(client) = &ctx.request.client {
            h.insert(
                headers::X_FORWARDED_FOR,
                headers::value(client.forwarded_for.as_str())?,
            );
            h.insert(
                headers::X_FORWARDED_PROTO,
                HeaderValue::from_static(client.proto),
            );
        }
        if let Some(auth) = &deployment.pool.settings.authorization {
            h.insert(http::header::AUTHORIZATION, auth.clone());
        }
        // The backend continues the trace with the gateway as its parent.
        if let Some(parent) = &ctx.request.traceparent {
            h.insert(headers::TRACEPARENT, parent.clone());
        }
        if let Some(state) = ctx.request.trace.as_ref().and_then(|t| t.state.as_ref()) {
            h.insert(headers::TRACESTATE, headers::value(state.as_str())?);
        }
        let len = ctx.request.body.as_ref().map_or(0, Bytes::len);
        // The client's length stands when the body kept it (the model name unchanged).
        let mut lengths = h.get_all(http::header::CONTENT_LENGTH).iter();
        if !matches!((lengths.next(), lengths.next()), (Some(sent), None) if is_decimal(sent.as_bytes(), len))
        {
            h.insert(http::header::CONTENT_LENGTH, HeaderValue::from(len));
        }
        Ok(())
    })
}

/// `text` is `n` written in decimal, as a `Content-Length` is (no sign, no leading zero).
fn is_decimal(text: &[u8], n: usize) -> bool {
    let canonical = text.first() != Some(&b'0') || text.len() == 1;
    canonical
        && text.iter().all(u8::is_ascii_digit)
        && std::str::from_utf8(text).is_ok_and(|t| t.parse() == Ok(n))
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

#[cfg(test)]
mod tests {
    use super::is_decimal;

    #[test]
    fn only_the_plain_decimal_form_of_the_length_is_kept() {
        assert!(is_decimal(b"120", 120));
        assert!(is_decimal(b"0", 0));
        assert!(!is_decimal(b"121", 120));
        assert!(!is_decimal(b"0120", 120));
        assert!(!is_decimal(b"+120", 120));
        assert!(!is_decimal(b"", 0));
        assert!(!is_decimal(b"99999999999999999999999", 0));
    }
}
