//! W3C trace context (`traceparent`, `tracestate`): taken from the client, or started when it
//! sent none (or a malformed one), passed to backends with the gateway as the parent, returned
//! to the client, and written with the request's usage record and log lines.

use http::{HeaderMap, HeaderName};

/// One request's place in a trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    /// The gateway's span for this request: what backends see as their parent.
    pub span_id: [u8; 8],
    /// The client's span, if it sent a `traceparent`.
    pub parent: Option<[u8; 8]>,
    /// The trace flags (bit 0: sampled).
    pub flags: u8,
    /// The client's `tracestate`, passed on unchanged.
    pub state: Option<String>,
}

/// The W3C header of the trace and the span a request continues.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// The W3C header of vendors' own trace data, passed on unchanged.
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

impl TraceContext {
    /// The trace the request's headers name, or a new one.
    pub fn from_headers(headers: &HeaderMap) -> TraceContext {
        let state = headers
            .get(TRACESTATE)
            .and_then(|v| v.to_str().ok())
            .filter(|s| s.len() <= 512)
            .map(str::to_owned);
        match headers
            .get(TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .and_then(parse)
        {
            Some((trace_id, parent, flags)) => TraceContext {
                trace_id,
                span_id: random_span_id(),
                parent: Some(parent),
                flags,
                state,
            },
            None => TraceContext {
                trace_id: loop {
                    let id = fastrand::u128(..).to_be_bytes();
                    if id != [0; 16] {
                        break id;
                    }
                },
                span_id: random_span_id(),
                parent: None,
                flags: 1,
                state: None,
            },
        }
    }

    /// The trace id as 32 lowercase hex digits.
    pub fn trace_id_hex(&self) -> String {
        let mut out = [0; 32];
        hex::encode_to_slice(self.trace_id, &mut out).expect("32 digits for 16 bytes");
        String::from_utf8(out.to_vec()).expect("hex digits are ASCII")
    }

    /// The `traceparent` naming the gateway's span.
    pub fn traceparent(&self) -> String {
        // `00-` trace id `-` span id `-` flags: 55 bytes, written in place.
        let mut out = *b"00-00000000000000000000000000000000-0000000000000000-00";
        let digits = hex::encode_to_slice(self.trace_id, &mut out[3..35])
            .and_then(|()| hex::encode_to_slice(self.span_id, &mut out[36..52]))
            .and_then(|()| hex::encode_to_slice([self.flags], &mut out[53..55]));
        digits.expect("the lengths match");
        String::from_utf8(out.to_vec()).expect("hex digits are ASCII")
    }
}

fn random_span_id() -> [u8; 8] {
    loop {
        let id = fastrand::u64(..).to_be_bytes();
        if id != [0; 8] {
            return id;
        }
    }
}

/// `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`, ids not all zero (a later version
/// may add fields after the flags).
fn parse(v: &str) -> Option<([u8; 16], [u8; 8], u8)> {
    let mut parts = v.trim().split('-');
    let version = parts.next()?;
    if version.len() != 2 || version == "ff" || !is_lower_hex(version) {
        return None;
    }
    let (trace, parent, flags) = (parts.next()?, parts.next()?, parts.next()?);
    if version == "00" && parts.next().is_some() {
        return None;
    }
    let all = [trace, parent, flags];
    if trace.len() != 32
        || parent.len() != 16
        || flags.len() != 2
        || !all.iter().all(|p| is_lower_hex(p))
    {
        return None;
    }
    let trace_id: [u8; 16] = hex::decode(trace).ok()?.try_into().ok()?;
    let parent_id: [u8; 8] = hex::decode(parent).ok()?.try_into().ok()?;
    if trace_id == [0; 16] || parent_id == [0; 8] {
        return None;
    }
    Some((trace_id, parent_id, u8::from_str_radix(flags, 16).ok()?))
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(tp: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("traceparent", tp.parse().unwrap());
        h.insert("tracestate", "vendor=abc".parse().unwrap());
        h
    }

    #[test]
    fn a_clients_trace_is_continued_with_the_gateway_as_parent() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let t = TraceContext::from_headers(&headers(tp));
        assert_eq!(t.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(
            t.parent,
            Some(hex::decode("00f067aa0ba902b7").unwrap().try_into().unwrap())
        );
        assert_eq!(t.state.as_deref(), Some("vendor=abc"));
        let ours = t.traceparent();
        assert!(ours.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        assert!(ours.ends_with("-01"));
        assert_ne!(ours, tp, "the backend's parent is the gateway's span");
    }

    #[test]
    fn a_missing_or_malformed_traceparent_starts_a_trace() {
        for bad in [
            "",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        ] {
            let h = if bad.is_empty() {
                HeaderMap::new()
            } else {
                headers(bad)
            };
            let t = TraceContext::from_headers(&h);
            assert_eq!(t.parent, None, "{bad}");
            assert_eq!(t.traceparent().len(), 55);
        }
    }
}
