//! Serving a simulator's router with the ability to stop listening and listen again, as a
//! node that goes down and comes back would.

use axum::Router;
use std::net::SocketAddr;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// A router served on a fixed address that can stop listening and listen again.
pub struct Listening {
    addr: SocketAddr,
    router: Router,
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
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let serving = serve(listener, router.clone());
        Ok(Listening {
            addr,
            router,
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
            let listener = TcpListener::bind(self.addr).await?;
            self.serving = Some(serve(listener, self.router.clone()));
        }
        Ok(())
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        if let Some(serving) = self.serving.take() {
            let _ = serving.stop.send(());
        }
    }
}

/// A listener that reports when axum has dropped it.
struct ReportingListener {
    inner: TcpListener,
    _closed: oneshot::Sender<()>,
}

impl axum::serve::Listener for ReportingListener {
    type Io = tokio::net::TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        axum::serve::Listener::accept(&mut self.inner).await
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

fn serve(listener: TcpListener, router: Router) -> Serving {
    let (stop, stop_rx) = oneshot::channel::<()>();
    let (closed_tx, listener_closed) = oneshot::channel();
    let listener = ReportingListener {
        inner: listener,
        _closed: closed_tx,
    };
    tokio::spawn(async move {
        let signal = async {
            let _ = stop_rx.await;
        };
        let _ = axum::serve(listener, router)
            .with_graceful_shutdown(signal)
            .await;
    });
    Serving {
        stop,
        listener_closed,
    }
}
