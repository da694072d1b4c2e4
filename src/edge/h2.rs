//! An HTTP/2 client connection with a deadline on every header block.
//!
//! Pingora hands a stream to the application once its whole header block has arrived, and
//! bounds only idle connections; a client that sends the connection preface slowly, or a
//! `HEADERS` frame without `END_HEADERS` and then nothing, would hold the connection for as
//! long as it keeps other streams busy. This wrapper watches the frame headers as they pass (it
//! reads nothing the HTTP/2 codec does not read) and fails the connection when the preface or a
//! header block is not complete within `client_header_timeout`. It also replays bytes already
//! read while telling HTTP/2 from HTTP/1.

use bytes::{Buf, Bytes};
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, SocketDigest, TimingDigest,
};
use pingora::protocols::{Peek, Shutdown, Ssl, Stream, UniqueID, UniqueIDType};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The client connection preface (RFC 9113 §3.4).
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const PUSH_PROMISE: u8 = 0x5;
const CONTINUATION: u8 = 0x9;
const END_HEADERS: u8 = 0x4;

/// Follows frame boundaries in the bytes a client sends, to know when a header block is open.
#[derive(Debug)]
struct FrameWatch {
    /// Preface bytes still to pass.
    preface_left: usize,
    header: [u8; FRAME_HEADER],
    header_len: usize,
    payload_left: usize,
    /// A header block (or the preface) is incomplete.
    open: bool,
}

impl FrameWatch {
    fn new() -> Self {
        FrameWatch {
            preface_left: PREFACE.len(),
            header: [0; FRAME_HEADER],
            header_len: 0,
            payload_left: 0,
            open: true,
        }
    }

    /// Follows `bytes`; returns whether a header block opened (the deadline starts again).
    fn feed(&mut self, mut bytes: &[u8]) -> bool {
        let mut opened = false;
        while !bytes.is_empty() {
            if self.preface_left > 0 {
                let n = self.preface_left.min(bytes.len());
                self.preface_left -= n;
                bytes = &bytes[n..];
                self.open = self.preface_left > 0;
            } else if self.payload_left > 0 {
                let n = self.payload_left.min(bytes.len());
                self.payload_left -= n;
                bytes = &bytes[n..];
            } else {
                let n = (FRAME_HEADER - self.header_len).min(bytes.len());
                self.header[self.header_len..self.header_len + n].copy_from_slice(&bytes[..n]);
                self.header_len += n;
                bytes = &bytes[n..];
                if self.header_len == FRAME_HEADER {
                    self.header_len = 0;
                    let h = &self.header;
                    self.payload_left =
                        usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
                    let (kind, flags) = (h[3], h[4]);
                    let ends = flags & END_HEADERS != 0;
                    match kind {
                        HEADERS | PUSH_PROMISE => {
                            opened |= !ends && !self.open;
                            self.open = !ends;
                        }
                        CONTINUATION => self.open = !ends,
                        _ => {}
                    }
                }
            }
        }
        opened
    }
}

/// A client connection speaking HTTP/2 (see the module comment).
#[derive(Debug)]
pub struct HeaderDeadlineStream {
    inner: Stream,
    replay: Bytes,
    watch: FrameWatch,
    limit: Duration,
    deadline: Pin<Box<Sleep>>,
    /// Counts the connection when the deadline passes.
    timeouts: Option<prometheus::IntCounter>,
}

impl HeaderDeadlineStream {
    /// Wraps `inner`, which already gave `replay` (the start of the preface, possibly empty);
    /// the preface is due within `limit` from now.
    /// `timeouts` counts it if the deadline passes.
    pub fn new(
        inner: Stream,
        replay: Bytes,
        limit: Duration,
        timeouts: prometheus::IntCounter,
    ) -> Self {
        let mut watch = FrameWatch::new();
        watch.feed(&replay);
        HeaderDeadlineStream {
            inner,
            replay,
            watch,
            limit,
            deadline: Box::pin(tokio::time::sleep(limit)),
            timeouts: Some(timeouts),
        }
    }
}

impl AsyncRead for HeaderDeadlineStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if !this.replay.is_empty() {
            let n = this.replay.len().min(buf.remaining());
            buf.put_slice(&this.replay[..n]);
            this.replay.advance(n);
            return Poll::Ready(Ok(()));
        }
        if this.watch.open && this.deadline.as_mut().poll(cx).is_ready() {
            if let Some(counter) = this.timeouts.take() {
                counter.inc();
            }
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "HTTP/2 header block not complete within edge.client_header_timeout",
            )));
        }
        let before = buf.filled().len();
        let read = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = read {
            if this.watch.feed(&buf.filled()[before..]) {
                let at = Instant::now() + this.limit;
                this.deadline.as_mut().reset(at);
            }
        }
        read
    }
}

impl AsyncWrite for HeaderDeadlineStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[async_trait::async_trait]
impl Shutdown for HeaderDeadlineStream {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await;
    }
}

impl UniqueID for HeaderDeadlineStream {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for HeaderDeadlineStream {
    fn get_ssl(&self) -> Option<&pingora::protocols::tls::TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<std::sync::Arc<pingora::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<pingora::protocols::ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for HeaderDeadlineStream {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for HeaderDeadlineStream {
    fn get_proxy_digest(
        &self,
    ) -> Option<std::sync::Arc<pingora::protocols::raw_connect::ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
}

impl GetSocketDigest for HeaderDeadlineStream {
    fn get_socket_digest(&self) -> Option<std::sync::Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }
}

/// Peeking is not offered: Pingora then takes a plain-text connection handed to it as HTTP/2
/// (h2c), which is what this stream carries.
impl Peek for HeaderDeadlineStream {}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, payload: usize) -> Vec<u8> {
        let mut f = vec![
            (payload >> 16) as u8,
            (payload >> 8) as u8,
            payload as u8,
            kind,
            flags,
            0,
            0,
            0,
            1,
        ];
        f.resize(FRAME_HEADER + payload, 0xAB);
        f
    }

    #[test]
    fn the_preface_and_unfinished_header_blocks_are_open() {
        let mut w = FrameWatch::new();
        assert!(w.open);
        w.feed(&PREFACE[..10]);
        assert!(w.open, "half a preface");
        w.feed(&PREFACE[10..]);
        assert!(!w.open);
        // SETTINGS, then HEADERS with END_HEADERS: closed.
        w.feed(&frame(0x4, 0, 12));
        w.feed(&frame(HEADERS, END_HEADERS, 30));
        assert!(!w.open);
        // HEADERS without END_HEADERS opens a block, fed one byte at a time.
        let mut opened = false;
        for b in frame(HEADERS, 0, 20) {
            opened |= w.feed(&[b]);
        }
        assert!(opened && w.open);
        // A CONTINUATION without END_HEADERS keeps it open; with it, closes it.
        assert!(!w.feed(&frame(CONTINUATION, 0, 5)));
        assert!(w.open);
        w.feed(&frame(CONTINUATION, END_HEADERS, 5));
        assert!(!w.open);
        // DATA frames whose payload looks like frame headers change nothing.
        let mut data = frame(0x0, 0, 9);
        data[FRAME_HEADER + 3] = HEADERS;
        w.feed(&data);
        assert!(!w.open);
    }
}
