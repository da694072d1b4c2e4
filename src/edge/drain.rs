//! Draining: readiness turns off, in-flight requests finish, then the process leaves.
//!
//! Pingora stops accepting when shutdown starts (SIGTERM, or SIGQUIT after it handed its
//! sockets to a new process) and then sleeps `grace_period_seconds` whatever is in flight.
//! The [`Drainer`] ends that wait early: as soon as no request is in flight it flushes the
//! usage records and exits, so a drain takes as long as the longest stream, at most the
//! configured grace period.

use crate::usage::Accounting;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Whether the process still takes traffic, and how many requests it is serving.
#[derive(Debug, Default)]
pub struct DrainState {
    /// Shutdown started (SIGTERM, or the end of a hand-over): final.
    shutting_down: AtomicBool,
    /// An operator asked for it on the admin listener: undone by `DELETE /drain`.
    requested: AtomicBool,
    /// A new process is taking the sockets over.
    handing_over: AtomicBool,
    active: AtomicUsize,
}

impl DrainState {
    /// Readiness: false once draining started (admin `POST /drain`, SIGTERM, or shutdown after
    /// a hand-over).
    pub fn ready(&self) -> bool {
        self.not_ready_because().is_none()
    }

    /// Why the process is not ready, if it is not.
    pub fn not_ready_because(&self) -> Option<&'static str> {
        if self.shutting_down.load(Ordering::Relaxed) {
            Some("shutting down: in-flight requests are finishing")
        } else if self.requested.load(Ordering::Relaxed) {
            Some("drain requested on the admin listener (DELETE /drain undoes it)")
        } else {
            None
        }
    }

    /// Shutdown started; cannot be undone.
    pub fn start_draining(&self) {
        self.shutting_down.store(true, Ordering::Relaxed);
    }

    /// An operator asks the load balancer to stop sending traffic (ahead of a shutdown).
    pub fn request_drain(&self) {
        self.requested.store(true, Ordering::Relaxed);
    }

    /// Undoes [`Self::request_drain`]; false when shutdown has started (nothing to undo).
    pub fn cancel_drain(&self) -> bool {
        self.requested.store(false, Ordering::Relaxed);
        !self.shutting_down.load(Ordering::Relaxed)
    }

    /// Whether responses may keep their HTTP/1.1 connection open. Off from the moment a
    /// hand-over or a drain starts, so clients reconnect (to the new process, or to another
    /// replica) rather than reuse a connection this process is about to close.
    pub fn keeps_connections(&self) -> bool {
        self.ready() && !self.handing_over.load(Ordering::Relaxed)
    }

    /// A new process is taking the sockets over (SIGQUIT): readiness stays, since the
    /// listening sockets live on in the new process.
    pub fn hand_over(&self) {
        self.handing_over.store(true, Ordering::Relaxed);
    }

    /// Requests in flight.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Counts a request as in flight until the guard is dropped.
    pub fn begin(self: &Arc<Self>) -> ActiveRequest {
        self.active.fetch_add(1, Ordering::Relaxed);
        ActiveRequest(self.clone())
    }
}

/// One request in flight (see [`DrainState::begin`]).
#[derive(Debug)]
pub struct ActiveRequest(Arc<DrainState>);

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Waits for shutdown, then for the last request, then flushes usage and exits.
pub struct Drainer {
    pub state: Arc<DrainState>,
    /// Usage records and access-log lines to write before leaving.
    pub accounting: Arc<Accounting>,
    /// Longest wait for requests in flight (Pingora's grace period ends it anyway).
    pub grace_period: Duration,
}

/// How long the process must have been idle before it leaves: covers a connection accepted
/// just before the listener closed whose request has not been read yet.
const SETTLE: Duration = Duration::from_millis(500);

#[async_trait]
impl BackgroundService for Drainer {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        // Pingora keeps accepting for 5 s after SIGQUIT while the new process starts; stop
        // offering keep-alive at once.
        let mut quit = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::quit()).ok();
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                Some(()) = async { quit.as_mut()?.recv().await } => {
                    log::info!("handing over to a new process: connections close after their response");
                    self.state.hand_over();
                }
            }
        }
        self.state.start_draining();
        log::info!(
            "draining: {} requests in flight, waiting up to {:?}",
            self.state.active(),
            self.grace_period
        );
        let deadline = tokio::time::Instant::now() + self.grace_period;
        let mut idle_since = None;
        while tokio::time::Instant::now() < deadline {
            if self.state.active() == 0 {
                let since = *idle_since.get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() >= SETTLE {
                    break;
                }
            } else {
                idle_since = None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let left = self.state.active();
        if left == 0 {
            let accounting = self.accounting.clone();
            let _ = tokio::task::spawn_blocking(move || accounting.flush(Duration::from_secs(10)))
                .await;
            log::info!("drained: no request in flight, exiting");
            crate::logging::flush_traces();
            std::process::exit(0);
        }
        log::warn!("grace period over with {left} requests in flight; they are cut");
    }
}
