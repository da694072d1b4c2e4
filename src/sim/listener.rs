//! Serving a simulator's router with the ability to stop listening and listen again, as a
//! node that goes down and comes back would; over plain HTTP or TLS (optionally requiring
//! client certificates, as a direct API behind mutual TLS would).

use axum::Router;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_rustls::TlsAcceptor;

/// A router served on a fixed address that can stop listening and listen again.
pub struct Listening {
    addr: SocketAddr,
    router: Router,
    tls: Option<TlsAcceptor>,
    serving: Option<Serving>,
}

/// One `axum::serve` run: the signal that stops it and word that its listener is closed.
struct Serving {
    stop: oneshot::Sender<()>,
    listener_closed: oneshot::Receiver<()>,
}

impl Listening {
    /// Binds `addr` (port 0 picks one) and starts serving on the current runtime.
    pub async fn bind(addr: SocketAddr, router: Router) -> std::io::Result<Listening> {
        Listening::bind_tls(addr, router, None).await
    }

    /// Like [`Listening::bind`], over TLS when `tls` is given.
    pub async fn bind_tls(
        addr: SocketAddr,
        router: Router,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> std::io::Result<Listening> {
        let listener = listen(addr)?;
        let addr = listener.local_addr()?;
        let tls = tls.map(TlsAcceptor::from);
        let serving = serve(listener, router.clone(), tls.clone());
        Ok(Listening {
            addr,
            router,
            tls,
            serving: Some(serving),
        })
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
            self.serving = Some(serve(listener, self.router.clone(), self.tls.clone()));
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

/// A listener that reports when axum has dropped it.
struct ReportingListener<L> {
    inner: L,
    _closed: oneshot::Sender<()>,
}

impl<L: axum::serve::Listener> axum::serve::Listener for ReportingListener<L> {
    type Io = L::Io;
    type Addr = L::Addr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        self.inner.accept().await
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
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

fn serve(listener: TcpListener, router: Router, tls: Option<TlsAcceptor>) -> Serving {
    let (stop, stop_rx) = oneshot::channel::<()>();
    let (closed_tx, listener_closed) = oneshot::channel();
    tokio::spawn(async move {
        let signal = async {
            let _ = stop_rx.await;
        };
        let _ = match tls {
            None => {
                let listener = ReportingListener {
                    inner: listener,
                    _closed: closed_tx,
                };
                axum::serve(listener, router)
                    .with_graceful_shutdown(signal)
                    .await
            }
            Some(acceptor) => {
                let listener = ReportingListener {
                    inner: TlsListener {
                        tcp: listener,
                        acceptor,
                    },
                    _closed: closed_tx,
                };
                axum::serve(listener, router)
                    .with_graceful_shutdown(signal)
                    .await
            }
        };
    });
    Serving {
        stop,
        listener_closed,
    }
}
