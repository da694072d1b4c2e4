//! Reading the request body before choosing the upstream.
//!
//! Pingora 0.9 forwards a body that a filter consumed only from its retry buffer, which holds
//! at most 64 KiB. So we arm the retry buffer once at most 64 KiB remain (the "tail"), keep the
//! whole body ourselves, and swap it back in `request_body_filter` on every upstream attempt.
//! Bodies of unknown length over 64 KiB cannot be replayed: those get 411.

use super::errors;
use crate::openai::ApiError;
use bytes::{Bytes, BytesMut};
use pingora::proxy::Session;
use pingora::{Error, ErrorType};
use std::time::Duration;

/// Mirrors pingora-core's `BODY_BUF_LIMIT` (not configurable in 0.9).
const RETRY_BUFFER_LIMIT: usize = 64 * 1024;

/// Reads a whole body the gateway answers itself (never forwarded, so no retry buffer): at
/// most `max` bytes, each read within `read_timeout`.
pub async fn read_whole(
    session: &mut Session,
    max: usize,
    read_timeout: Duration,
) -> Result<Bytes, ApiError> {
    let length: Option<usize> = session
        .req_header()
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse().ok());
    if length.is_some_and(|n| n > max) {
        return Err(errors::body_too_large(max));
    }
    let mut buf = BytesMut::with_capacity(length.unwrap_or(16 * 1024).min(max));
    loop {
        let read = tokio::time::timeout(read_timeout, session.read_request_body())
            .await
            .unwrap_or_else(|_| Error::e_explain(ErrorType::ReadTimedout, "body read"));
        match read.map_err(|e| match e.etype() {
            ErrorType::ReadTimedout => errors::body_stalled(read_timeout),
            _ => errors::body_incomplete(),
        })? {
            Some(chunk) if buf.len() + chunk.len() > max => {
                return Err(errors::body_too_large(max))
            }
            Some(chunk) => buf.extend_from_slice(&chunk),
            None => return Ok(buf.freeze()),
        }
    }
}

/// Reads the whole body, at most `max` bytes, each read within `read_timeout` (Pingora bounds
/// HTTP/1 reads itself, with the same value; HTTP/2 reads are bounded here).
pub async fn read_body(
    session: &mut Session,
    max: usize,
    read_timeout: Duration,
) -> Result<Bytes, ApiError> {
    let headers = &session.req_header().headers;
    let length: Option<usize> = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse().ok());
    if length.is_some_and(|n| n > max) {
        return Err(errors::body_too_large(max));
    }
    let expects_continue = headers
        .get(http::header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if expects_continue {
        // Nobody else sends it once we read the body ourselves; clients would stall ~1 s.
        session
            .write_continue_response()
            .await
            .map_err(|_| errors::body_incomplete())?;
    }

    // The usual body arrives in one read: that chunk is kept as it came; more are gathered.
    let mut first: Option<Bytes> = None;
    let mut buf = BytesMut::new();
    let mut read_len = 0;
    let mut armed = false;
    // Bytes read since the retry buffer was armed: what it holds unless it overflowed.
    let mut tail = 0;
    loop {
        if !armed && length.is_none_or(|n| n - read_len <= RETRY_BUFFER_LIMIT) {
            session.enable_retry_buffering();
            armed = true;
        }
        let read = if session.is_http2() {
            tokio::time::timeout(read_timeout, session.read_request_body())
                .await
                .unwrap_or_else(|_| Error::e_explain(ErrorType::ReadTimedout, "body read"))
        } else {
            session.read_request_body().await
        };
        let chunk = read.map_err(|e| match e.etype() {
            ErrorType::ReadTimedout => errors::body_stalled(read_timeout),
            _ => errors::body_incomplete(),
        })?;
        let Some(chunk) = chunk else { break };
        read_len += chunk.len();
        if read_len > max {
            return Err(errors::body_too_large(max));
        }
        if armed {
            tail += chunk.len();
        }
        if read_len == chunk.len() {
            first = Some(chunk);
        } else {
            if let Some(first) = first.take() {
                buf.reserve(length.unwrap_or(16 * 1024).min(max));
                buf.extend_from_slice(&first);
            }
            buf.extend_from_slice(&chunk);
        }
        // Not one more read (and its timer) only to be told the body ended.
        if session.is_body_done() {
            break;
        }
    }
    let body = first.unwrap_or_else(|| buf.freeze());
    // (Not `get_retry_buffer()`: it copies the buffer to answer.)
    let replayable = armed && tail > 0 && !session.retry_buffer_truncated();
    if !body.is_empty() && !replayable {
        return Err(errors::length_required(RETRY_BUFFER_LIMIT));
    }
    Ok(body)
}
