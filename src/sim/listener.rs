//! Serving a simulator's router with the ability to stop listening and listen again, as a
//! node that goes down and comes back would; over plain HTTP or TLS (optionally requiring
//! client certificates, as a direct API behind mutual TLS would); closing kept-alive
//! connections left idle, as the real server does when it has a keep-alive timeout.

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio_rustls::TlsAcceptor;

/// A router served on a fixed address that can stop listening and listen again.
pub struct Listening {
    addr: SocketAddr,
    router: Router,
    tls: Option<TlsAcceptor>,
    keep_alive: Option<Duration>,
    /// Connections open now.
    open: Arc<AtomicU64>,
    serving: Option<Serving>,
}

/// One run of [`serve`]: the signal that stops it and word that its listener is closed.
struct Serving {
    stop: oneshot::Sender<()>,
    listener_closed: oneshot::Receiver<()>,
}

impl Listening {
    /// Binds `addr` (port 0 picks one) and starts serving on the current runtime.
    /// Connections stay open until the client closes them.
    pub async fn bind(addr: SocketAddr, router: Router) -> std::io::Result<Listening> {
        Listening::bind_with(addr, router, None, None).await
    }

    /// Like [`Listening::bind`], over TLS when `tls` is given, and closing a connection that
    /// waits `keep_alive` for its next request (uvicorn's `timeout_keep_alive`).
    pub async fn bind_with(
        addr: SocketAddr,
        router: Router,
        tls: Option<Arc<rustls::ServerConfig>>,
        keep_alive: Option<Duration>,
    ) -> std::io::Result<Listening> {
        let listener = listen(addr)?;
        let addr = listener.local_addr()?;
        let tls = tls.map(TlsAcceptor::from);
        let open = Arc::new(AtomicU64::new(0));
        let serving = serve(
            listener,
            router.clone(),
            tls.clone(),
            keep_alive,
            open.clone(),
        );
        Ok(Listening {
            addr,
            router,
            tls,
            keep_alive,
            open,
            serving: Some(serving),
        })
    }

    /// Client connections open now.
    pub fn connections(&self) -> u64 {
        self.open.load(Ordering::Relaxed)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes the listening socket and idle keep-alive connections (new connections are
    /// refused); requests in flight finish. Returns once the socket is closed.
    pub async fn stop(&mut self) {
        if let Some(serving) = self.serving.take() {
            let _ = serving.stop.send(());
            let _ = serving.listener_closed.await;
        }
    }

    /// Listens again on the same address.
    pub async fn resume(&mut self) -> std::io::Result<()> {
        if self.serving.is_none() {
            let listener = listen(self.addr)?;
            self.serving = Some(serve(
                listener,
                self.router.clone(),
                self.tls.clone(),
                self.keep_alive,
                self.open.clone(),
            ));
        }
        Ok(())
    }
}

/// A listening socket with a backlog as deep as the system allows (tokio's `bind` asks for
/// 1,024): a real vLLM node behind uvicorn asks for 2,048, and thousands of streams opened at
/// once must queue, not have their handshakes dropped and retried seconds later.
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(65_535)
}

impl Drop for Listening {
    fn drop(&mut self) {
        if let Some(serving) = self.serving.take() {
            let _ = serving.stop.send(());
        }
    }
}

/// Accepts TCP connections and completes their TLS handshake; failed handshakes (a client
/// without the required certificate) are dropped, as a TLS server would.
struct TlsListener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (stream, addr) = axum::serve::Listener::accept(&mut self.tcp).await;
            match self.acceptor.accept(stream).await {
                Ok(tls) => return (tls, addr),
                Err(e) => log::debug!("simulator: TLS handshake from {addr} failed: {e}"),
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

/// Serves `router` on `listener` until `stop`: each connection on its own task, over HTTP/1 as
/// axum's `serve` does, with hyper's timer closing a connection that has waited `keep_alive`
/// for its next request's head. Stopping drops the listener (new connections are refused) and
/// tells the connections to close once their request in flight is answered.
fn serve(
    listener: TcpListener,
    router: Router,
    tls: Option<TlsAcceptor>,
    keep_alive: Option<Duration>,
    open: Arc<AtomicU64>,
) -> Serving {
    let (stop, stop_rx) = oneshot::channel::<()>();
    let (closed_tx, listener_closed) = oneshot::channel();
    let mut http = hyper::server::conn::http1::Builder::new();
    if let Some(idle) = keep_alive {
        http.timer(TokioTimer::new()).header_read_timeout(idle);
    }
    let (closing, closing_rx) = watch::channel(false);
    let accepting = async move {
        match tls {
            None => accept_loop(listener, http, router, closing_rx, open).await,
            Some(acceptor) => {
                let listener = TlsListener {
                    tcp: listener,
                    acceptor,
                };
                accept_loop(listener, http, router, closing_rx, open).await
            }
        }
    };
    tokio::spawn(async move {
        // Stopping drops `accepting`, and the listener with it.
        tokio::select! {
            _ = stop_rx => {}
            () = accepting => {}
        }
        let _ = closing.send(true);
        drop(closed_tx);
    });
    Serving {
        stop,
        listener_closed,
    }
}

/// Accepts connections and serves each on its own task until it ends, or until `closing` says
/// so (then after its request in flight, if any).
async fn accept_loop<L: axum::serve::Listener>(
    mut listener: L,
    http: hyper::server::conn::http1::Builder,
    router: Router,
    closing: watch::Receiver<bool>,
    open: Arc<AtomicU64>,
) {
    loop {
        let (io, _) = listener.accept().await;
        let conn = http
            .serve_connection(TokioIo::new(io), TowerToHyperService::new(router.clone()))
            .with_upgrades();
        let (mut closing, open) = (closing.clone(), open.clone());
        open.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            tokio::pin!(conn);
            let ended = tokio::select! {
                _ = conn.as_mut() => true,
                _ = closing.wait_for(|c| *c) => false,
            };
            if !ended {
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
            }
            open.fetch_sub(1, Ordering::Relaxed);
        });
    }
}
