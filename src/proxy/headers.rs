//! Header writes on `http`'s own map.
//!
//! Pingora's `insert_header` parses the name again on every write and writes a second map that
//! keeps each name's original case; the maps of a parsed response or a cloned request are at
//! exactly their size, so the first write grows both. That came to 1,100-2,500 instructions
//! per header, eight headers per proxied request (docs/benchmarks.md). Taken apart into
//! `http`'s parts, a head is one map, written with names made at compile time. The price:
//! names then go out in lowercase, or in title case for the common ones (Pingora's rule for a
//! head without its case map). HTTP's names are case-insensitive, and HTTP/2's all lowercase.

use http::{request, HeaderMap, HeaderName, HeaderValue, StatusCode};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::{Error, ErrorType};

pub use crate::trace_context::{TRACEPARENT, TRACESTATE};

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// How the gateway answered: `direct` (a backend) or `compute` (Globus Compute).
pub const ROUTE: HeaderName = HeaderName::from_static("x-firstgate-route");
/// The gateway's own time on a direct answer, in milliseconds.
pub const OVERHEAD: HeaderName = HeaderName::from_static("x-firstgate-overhead-ms");
/// The Globus Compute task of a cold answer.
pub const TASK: HeaderName = HeaderName::from_static("x-firstgate-task");
/// Which limit refused a request.
pub const LIMIT: HeaderName = HeaderName::from_static("x-firstgate-limit");

/// Room made for the gateway's own headers before an edit (the usual four): a parsed or
/// cloned map is at its exact size, and growing it a header at a time reallocates it twice.
const ROOM: usize = 4;

/// `text` as a header value, or Pingora's error for a bad header.
pub fn value(text: impl TryInto<HeaderValue>) -> pingora::Result<HeaderValue> {
    text.try_into()
        .map_err(|_| Error::explain(ErrorType::InvalidHTTPHeader, "invalid header value"))
}

/// `us` microseconds as milliseconds with three decimals (`12.345`), without the formatting
/// machinery (some 500 instructions less on every answer's overhead header).
pub fn millis(us: u64) -> HeaderValue {
    let mut text = [0u8; 24];
    let (mut pos, mut n) = (text.len(), us);
    for digit in 0.. {
        if digit == 3 {
            pos -= 1;
            text[pos] = b'.';
        }
        pos -= 1;
        text[pos] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 && digit >= 3 {
            break;
        }
    }
    HeaderValue::from_bytes(&text[pos..]).expect("digits and a point")
}

/// A head the gateway writes itself.
pub fn response(status: u16, headers: HeaderMap) -> pingora::Result<ResponseHeader> {
    let mut parts = http::Response::new(()).into_parts().0;
    parts.status = StatusCode::from_u16(status)
        .map_err(|_| Error::explain(ErrorType::InternalError, "invalid status"))?;
    parts.headers = headers;
    Ok(ResponseHeader::from(parts))
}

/// Edits the headers of a response's head (a backend's keeps its reason phrase).
pub fn edit_response<R>(head: &mut ResponseHeader, edit: impl FnOnce(&mut HeaderMap) -> R) -> R {
    let reason = head
        .get_reason_phrase()
        .filter(|r| Some(*r) != head.status.canonical_reason())
        .map(str::to_owned);
    let empty = ResponseHeader::from(http::Response::new(()).into_parts().0);
    let mut parts = http::response::Parts::from(std::mem::replace(head, empty));
    parts.headers.reserve(ROOM);
    let out = edit(&mut parts.headers);
    *head = ResponseHeader::from(parts);
    if reason.is_some() {
        // Only a status's canonical phrase can be refused, and that one is not kept.
        let _ = head.set_reason_phrase(reason.as_deref());
    }
    out
}

/// Readies a client's request head for the copy Pingora makes of it for the backend: without
/// its case map, which the copy would clone and [`edit_request`] then drop (and which the
/// request would hold while it lasts). Its target is then its URI, as the backend's is.
pub fn ready_for_copy(head: &mut RequestHeader) {
    as_parts(head, |_| ());
}

/// Edits a request's head, with room for the gateway's headers; its target is then its URI
/// (`edit` sets the one it needs).
pub fn edit_request<R>(head: &mut RequestHeader, edit: impl FnOnce(&mut request::Parts) -> R) -> R {
    as_parts(head, |parts| {
        parts.headers.reserve(ROOM);
        edit(parts)
    })
}

/// `head` taken apart for `edit`, and put back without its case map.
fn as_parts<R>(head: &mut RequestHeader, edit: impl FnOnce(&mut request::Parts) -> R) -> R {
    let empty = RequestHeader::from(http::Request::new(()).into_parts().0);
    let mut parts = request::Parts::from(std::mem::replace(head, empty));
    let out = edit(&mut parts);
    *head = RequestHeader::from(parts);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overhead_is_written_in_milliseconds_with_three_decimals() {
        for (us, text) in [
            (0, "0.000"),
            (5, "0.005"),
            (999, "0.999"),
            (1_000, "1.000"),
            (12_345, "12.345"),
            (u64::MAX, "18446744073709551.615"),
        ] {
            assert_eq!(millis(us), text);
        }
    }

    #[test]
    fn an_edited_response_keeps_status_reason_and_other_headers() {
        let mut head = ResponseHeader::build(429, None).unwrap();
        head.set_reason_phrase(Some("Slow Down")).unwrap();
        head.insert_header("Content-Type", "application/json")
            .unwrap();
        edit_response(&mut head, |h| {
            h.insert(ROUTE, HeaderValue::from_static("direct"))
        });
        assert_eq!(head.status, 429);
        assert_eq!(head.get_reason_phrase(), Some("Slow Down"));
        assert_eq!(head.headers["content-type"], "application/json");
        assert_eq!(head.headers["x-firstgate-route"], "direct");
        let mut wire = Vec::new();
        head.header_to_h1_wire(&mut wire);
        let wire = String::from_utf8(wire).unwrap();
        assert!(
            wire.contains("Content-Type: application/json\r\n"),
            "{wire}"
        );
        assert!(wire.contains("x-firstgate-route: direct\r\n"), "{wire}");
    }

    #[test]
    fn an_edited_request_is_sent_to_its_new_uri() {
        let mut head = RequestHeader::build("POST", b"/v1/chat/completions?x=1", None).unwrap();
        head.insert_header("Host", "gateway").unwrap();
        edit_request(&mut head, |p| {
            p.uri = "/v2/chat".parse().unwrap();
            p.headers
                .insert(http::header::HOST, HeaderValue::from_static("node:8000"));
        });
        assert_eq!(head.method, "POST");
        assert_eq!(head.raw_path(), b"/v2/chat");
        assert_eq!(head.headers["host"], "node:8000");
        assert_eq!(head.headers.len(), 1);
    }
}
