//! Every client connection of the API listeners, from accept to close: admission, the TLS
//! handshake, and each HTTP/1 request head, before Pingora's HTTP machinery takes the request.
//!
//! Pingora 0.9 leaves the ways a client can stall before a request is read unbounded or bounded
//! per read (its h2c check waits for 24 bytes; head reads time out per read; the TLS handshake
//! after a fixed 60 s), so this layer owns the connection and hands Pingora complete request
//! heads (as the "pipelined prefix" of an HTTP/1 session) or HTTP/2 connections whose header
//! blocks run on a deadline. Pingora's `http_proxy` documents this use: an application-owned
//! accept path that calls `process_new_http`.

use super::admission::{Admission, ConnectionPermit};
use super::h2::HeaderDeadlineStream;
use super::head::{read_head, refuse, Head, HeadRules};
use crate::metrics::Metrics;
use crate::openai::ApiError;
use async_trait::async_trait;
use bytes::BytesMut;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ServerApp};
use pingora::listeners::tls::Acceptor;
use pingora::protocols::http::ServerSession;
use pingora::protocols::l4::stream::Stream as TcpStream;
use pingora::protocols::{Stream, ALPN};
use pingora::server::ShutdownWatch;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// How long a kept-alive connection must have been idle before it may be closed to make room
/// for new connections.
const RECLAIM_AFTER_IDLE: Duration = Duration::from_millis(250);

/// How long a new connection may stay silent (no byte of a request) before it may be closed
/// to make room. A real client's request is usually in the socket before the connection is
/// accepted; what stays silent is a speculative preconnect or a socket held to starve others.
const RECLAIM_AFTER_SILENT: Duration = Duration::from_millis(100);

/// How long an HTTPS connection's handshake may take before it may be closed to make room
/// (a handshake takes a round trip or two).
const RECLAIM_HANDSHAKE_AFTER: Duration = Duration::from_secs(1);

/// How long a client may take, and how much it may send, before its request is read.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionTimeouts {
    pub header: Duration,
    pub tls_handshake: Duration,
    pub keepalive: Duration,
    pub max_header_bytes: usize,
}

impl From<&crate::config::Edge> for ConnectionTimeouts {
    fn from(edge: &crate::config::Edge) -> Self {
        ConnectionTimeouts {
            header: edge.client_header_timeout,
            tls_handshake: edge.tls_handshake_timeout,
            keepalive: edge.keepalive_timeout,
            max_header_bytes: edge.max_header_bytes,
        }
    }
}

/// The HTTPS listener: connections accepted on `listen` are TLS.
pub struct TlsEndpoint {
    pub listen: SocketAddr,
    pub acceptor: Acceptor,
}

impl TlsEndpoint {
    fn serves(&self, local: SocketAddr) -> bool {
        local.port() == self.listen.port()
            && (self.listen.ip().is_unspecified() || self.listen.ip() == local.ip())
    }
}

/// The API listeners' application: wraps Pingora's HTTP application `A` (the proxy).
pub struct EdgeApp<A> {
    app: Arc<A>,
    tls: Option<TlsEndpoint>,
    admission: Arc<Admission>,
    timeouts: ConnectionTimeouts,
    metrics: Arc<Metrics>,
}

impl<A> EdgeApp<A> {
    pub fn new(
        app: A,
        tls: Option<TlsEndpoint>,
        admission: Arc<Admission>,
        timeouts: ConnectionTimeouts,
        metrics: Arc<Metrics>,
    ) -> Self {
        EdgeApp {
            app: Arc::new(app),
            tls,
            admission,
            timeouts,
            metrics,
        }
    }

    fn closed(&self, reason: &str) {
        self.metrics
            .connections_closed
            .with_label_values(&[reason])
            .inc();
    }
}

impl<A: HttpServerApp + Send + Sync + 'static> EdgeApp<A> {
    async fn tls_handshake(
        &self,
        stream: Stream,
        tls: &TlsEndpoint,
        permit: &ConnectionPermit,
    ) -> Option<Stream> {
        // Pingora's TLS stream is built over its own TCP stream type.
        let tcp = match stream.into_any().downcast::<TcpStream>() {
            Ok(tcp) => *tcp,
            Err(_) => {
                log::error!("a connection on the HTTPS listener is not a TCP stream");
                return None;
            }
        };
        let handshake =
            tokio::time::timeout(self.timeouts.tls_handshake, tls.acceptor.tls_handshake(tcp));
        let reclaimed = async {
            tokio::time::sleep(RECLAIM_HANDSHAKE_AFTER).await;
            permit.reclaimed().await;
        };
        tokio::select! {
            done = handshake => match done {
                Ok(Ok(tls)) => Some(Box::new(tls)),
                Ok(Err(e)) => {
                    log::debug!("TLS handshake failed: {e}");
                    self.closed("tls_handshake_failed");
                    None
                }
                Err(_) => {
                    self.closed("tls_handshake_timeout");
                    None
                }
            },
            () = reclaimed => {
                self.closed("reclaimed_silent");
                None
            }
        }
    }

    /// HTTP/2 from the preface on (`read` holds what was read of it already).
    async fn serve_h2(&self, stream: Stream, read: BytesMut, shutdown: &ShutdownWatch) {
        let timeouts = self
            .metrics
            .connections_closed
            .with_label_values(&["header_timeout"]);
        let stream =
            HeaderDeadlineStream::new(stream, read.freeze(), self.timeouts.header, timeouts);
        ServerApp::process_new(&self.app, Box::new(stream), shutdown).await;
    }

    /// HTTP/1 requests, one head at a time, until the connection closes; switches to HTTP/2
    /// when `h2c` allows and the client sends the preface.
    async fn serve_http1(
        &self,
        mut stream: Stream,
        h2c: bool,
        permit: &ConnectionPermit,
        shutdown: &ShutdownWatch,
    ) {
        let mut settings: Option<HttpPersistentSettings> = None;
        let mut buf = BytesMut::with_capacity(4096);
        let mut rules = HeadRules {
            total: self.timeouts.header,
            start: Instant::now(),
            h2c,
            max_bytes: self.timeouts.max_header_bytes,
        };
        // The wait for a head's first byte: the header timeout on a new connection (silence is
        // then a timeout), the keep-alive time on a kept-alive one (silence is its end).
        let mut first_byte = self.timeouts.header;
        let mut new_connection = true;
        let mut stopping = shutdown.clone();
        loop {
            let idle = async {
                let timed_out = || match new_connection {
                    true => Head::TimedOut { http1: false },
                    false => Head::Closed,
                };
                if *stopping.borrow() {
                    return Head::Closed;
                }
                // Not at once: a client that reuses a connection does so right after its
                // answer, and must not race its close.
                let (wait, reason) = if new_connection {
                    (RECLAIM_AFTER_SILENT, "reclaimed_silent")
                } else {
                    (RECLAIM_AFTER_IDLE, "reclaimed_idle")
                };
                // Most heads come sooner: until then one timer is all the wait holds (a
                // shutdown meanwhile closes the connection when it ends, at most `wait` late).
                let limit = rules.start + first_byte;
                tokio::time::sleep_until(limit.min(rules.start + wait)).await;
                if Instant::now() >= limit {
                    return timed_out();
                }
                if *stopping.borrow() {
                    return Head::Closed;
                }
                let reclaimed = async {
                    permit.reclaimed().await;
                    self.closed(reason);
                };
                tokio::select! {
                    _ = stopping.changed() => Head::Closed,
                    () = reclaimed => Head::Closed,
                    () = tokio::time::sleep_until(limit) => timed_out(),
                }
            };
            match read_head(&mut stream, &mut buf, &rules, idle).await {
                Head::Http1 => {}
                Head::H2c => return self.serve_h2(stream, buf, shutdown).await,
                Head::Closed => return,
                Head::TimedOut { http1 } => {
                    self.closed("header_timeout");
                    if http1 {
                        let message = format!(
                            "The request head did not arrive within {}; send the request line \
                             and headers at once.",
                            humantime::format_duration(self.timeouts.header)
                        );
                        refuse(&mut stream, &ApiError::new(408, "request_timeout", message)).await;
                    }
                    return;
                }
                Head::TooLarge => {
                    self.closed("header_too_large");
                    let message = format!(
                        "The request head (request line and headers) must be at most {} bytes.",
                        self.timeouts.max_header_bytes
                    );
                    refuse(
                        &mut stream,
                        &ApiError::new(431, "request_header_fields_too_large", message),
                    )
                    .await;
                    return;
                }
            }
            let mut session = ServerSession::new_http1(stream);
            match settings.take() {
                Some(previous) => previous.apply_to_session(&mut session),
                None => session.set_keepalive(Some(self.timeouts.keepalive.as_secs())),
            }
            session.set_pipelined_prefix(std::mem::take(&mut buf));
            let Some(reused) = self.app.process_new_http(session, shutdown).await else {
                return;
            };
            (stream, settings) = reused.consume();
            buf.reserve(4096);
            rules = HeadRules {
                start: Instant::now(),
                h2c: false,
                ..rules
            };
            first_byte = self.timeouts.keepalive;
            new_connection = false;
        }
    }
}

#[async_trait]
impl<A: HttpServerApp + Send + Sync + 'static> ServerApp for EdgeApp<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let socket = stream.get_socket_digest();
        let inet = |addr: Option<&pingora::protocols::l4::socket::SocketAddr>| {
            addr.and_then(|a| a.as_inet()).copied()
        };
        let peer = socket.as_ref().and_then(|d| inet(d.peer_addr()));
        let permit = self.admission.admit(peer.map(|p| p.ip())).await?;
        // The address a connection arrived on is asked of the kernel only where it decides
        // something: which listener, with TLS configured.
        let local = || socket.as_ref().and_then(|d| inet(d.local_addr()));
        match &self.tls {
            Some(tls) if local().is_some_and(|l| tls.serves(l)) => {
                // Boxed: the handshake's state (7.5 KB) would otherwise be part of every
                // connection's future, plain ones included.
                let stream = Box::pin(self.tls_handshake(stream, tls, &permit)).await?;
                if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
                    self.serve_h2(stream, BytesMut::new(), shutdown).await;
                } else {
                    self.serve_http1(stream, false, &permit, shutdown).await;
                }
            }
            _ => self.serve_http1(stream, true, &permit, shutdown).await,
        }
        None
    }

    async fn cleanup(&self) {
        ServerApp::cleanup(&*self.app).await;
    }
}
