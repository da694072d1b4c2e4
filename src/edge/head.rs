//! Reading a request head on a client connection before Pingora parses it: within a total
//! deadline, bounded in size, and telling an HTTP/2 preface (h2c) from HTTP/1 as soon as the
//! bytes differ, so a complete request shorter than the preface is answered.

use super::h2::PREFACE;
use crate::openai::ApiError;
use bytes::BytesMut;
use pingora::protocols::Stream;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

/// What arrived on the connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Head {
    /// A complete HTTP/1 request head (maybe followed by body bytes), in the buffer.
    Http1,
    /// The HTTP/2 connection preface, in the buffer.
    H2c,
    /// The client closed the connection, or left it idle past the keep-alive time.
    Closed,
    /// The head did not arrive in time; `http1` when part of an HTTP/1 head did, which a 408
    /// answer can then explain.
    TimedOut { http1: bool },
    /// The head grew beyond the limit without ending.
    TooLarge,
}

/// How one head is read.
pub struct HeadRules {
    /// Longest time for the whole head, from `start`.
    pub total: Duration,
    pub start: Instant,
    /// Whether an HTTP/2 preface may come instead (first request on the plain listener).
    pub h2c: bool,
    pub max_bytes: usize,
}

/// Finds the end of a head as bytes arrive: the blank line after the headers (CRLF or bare LF
/// line endings, as Pingora's parser accepts), after any empty lines before the request line
/// (RFC 9112 §2.2). Each byte is looked at once, however slowly the head drips in.
#[derive(Default)]
struct HeadScan {
    pos: usize,
    started: bool,
}

impl HeadScan {
    fn complete(&mut self, buf: &[u8]) -> bool {
        while self.pos < buf.len() {
            let p = self.pos;
            self.pos += 1;
            let b = buf[p];
            if !self.started {
                self.started = b != b'\r' && b != b'\n';
            } else if b == b'\n'
                && (buf[p - 1] == b'\n' || (buf[p - 1] == b'\r' && p >= 2 && buf[p - 2] == b'\n'))
            {
                return true;
            }
        }
        false
    }
}

/// Reads into `buf` (which may already hold bytes) until one of [`Head`]'s outcomes. `idle`
/// ends the wait for the first byte with its outcome (the wait's time limit, a shutdown, room
/// needed for new connections).
pub async fn read_head(
    stream: &mut Stream,
    buf: &mut BytesMut,
    rules: &HeadRules,
    idle: impl std::future::Future<Output = Head>,
) -> Head {
    if buf.is_empty() {
        tokio::select! {
            biased;
            read = stream.read_buf(buf) => {
                if !matches!(read, Ok(n) if n > 0) {
                    return Head::Closed;
                }
            }
            outcome = idle => return outcome,
        }
    }
    let deadline = rules.start + rules.total;
    let mut scan = HeadScan::default();
    loop {
        let preface = rules.h2c && PREFACE.starts_with(&buf[..buf.len().min(PREFACE.len())]);
        if preface {
            if buf.len() >= PREFACE.len() {
                return Head::H2c;
            }
        } else if scan.complete(buf) {
            return Head::Http1;
        } else if buf.len() > rules.max_bytes {
            return Head::TooLarge;
        }
        match tokio::time::timeout_at(deadline, stream.read_buf(buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            Ok(_) => return Head::Closed,
            Err(_) => return Head::TimedOut { http1: !preface },
        }
    }
}

/// Answers `err` on a connection Pingora has not taken yet, and closes it.
pub async fn refuse(stream: &mut Stream, err: &ApiError) {
    let body = err.body();
    let reason = http::StatusCode::from_u16(err.status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error");
    let head = format!(
        "HTTP/1.1 {} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n",
        err.status,
        body.len()
    );
    let write = async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(&body).await?;
        stream.flush().await
    };
    // A client that does not read its answer does not hold the connection either.
    if let Ok(Ok(())) = tokio::time::timeout(Duration::from_secs(5), write).await {
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            pingora::protocols::Shutdown::shutdown(&mut **stream),
        )
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(buf: &[u8]) -> bool {
        HeadScan::default().complete(buf)
    }

    #[test]
    fn heads_are_complete_at_the_blank_line_whatever_the_line_endings() {
        assert!(complete(b"GET / HTTP/1.0\r\n\r\n"));
        assert!(complete(b"GET / HTTP/1.1\nHost: a\n\n"));
        assert!(complete(b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\nbody"));
        assert!(!complete(b"\r\n\r\nGET / HTTP/1.1\r\n"));
        assert!(!complete(b"POST "));
        assert!(!complete(b"GET / HTTP/1.1\r\nHost: a\r\n"));
    }

    #[test]
    fn a_head_dripping_in_byte_by_byte_is_found_complete_once_it_is() {
        let head = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        let mut scan = HeadScan::default();
        for n in 1..head.len() {
            assert!(!scan.complete(&head[..n]), "{n}");
        }
        assert!(scan.complete(head));
    }
}
