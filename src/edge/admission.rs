//! Admission at accept: how many client connections the gateway holds, overall and per
//! address, so that a flood waits in the listen backlog instead of using up the file
//! descriptors that proxied requests need for their backend connections.
//!
//! - Overall (`edge.max_connections`): at the cap the accept loop pauses (Pingora's connection
//!   filter waits for a free slot), so new clients wait in the kernel's backlog, which costs no
//!   descriptor, and idle keep-alive connections are closed to make room, as nginx does.
//! - Per address (`edge.max_connections_per_ip`): one more is closed as soon as it is accepted.
//!   Trusted proxies are exempt: many clients stand behind them.
//! - Per request: a proxied request takes a second descriptor for its backend, and one HTTP/2
//!   connection carries many requests; a request that would go beyond the descriptor budget is
//!   answered 503 with `Retry-After` rather than failing its backend connect.

use super::TrustedProxies;
use crate::metrics::Metrics;
use async_trait::async_trait;
use pingora::listeners::ConnectionFilter;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// Raises the soft limit on open files to the hard limit and returns the limit in force.
pub fn raise_descriptor_limit() -> u64 {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(e) => {
            log::warn!("cannot raise the open-file limit: {e}");
            rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft)
        }
    }
}

/// Descriptors kept for everything but client connections and their backend connections:
/// listeners, health checks, Globus and status clients, idle pooled backend connections, the
/// usage store, logs.
pub fn descriptor_reserve(limit: u64) -> u64 {
    256 + limit / 32
}

/// Connections and their backend connections that fit in `limit` descriptors.
pub fn descriptor_budget(limit: u64) -> usize {
    usize::try_from(limit.saturating_sub(descriptor_reserve(limit)))
        .unwrap_or(usize::MAX)
        .max(2)
}

/// The default `edge.max_connections`: every connection proxying a request holds two
/// descriptors, its own and its backend's.
pub fn default_max_connections(limit: u64) -> usize {
    descriptor_budget(limit) / 2
}

/// The connection budget of the API listeners, shared by all of them.
pub struct Admission {
    slots: Arc<Semaphore>,
    /// Slots the accept loop took for connections whose task has not started yet; any such
    /// task takes one (slots are alike), so a connection dropped in between leaks nothing.
    reserved: Mutex<Vec<OwnedSemaphorePermit>>,
    max: usize,
    per_ip_max: usize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    trusted: TrustedProxies,
    /// Descriptors for client connections and backend connections together.
    budget: usize,
    upstream: AtomicUsize,
    /// Idle keep-alive connections asked to close because new ones wait for a slot; `reclaim`
    /// wakes the idle ones to take a request.
    reclaim_wanted: AtomicUsize,
    reclaim: Notify,
    metrics: Arc<Metrics>,
    last_warning: AtomicU64,
}

/// What admission was configured with, after defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdmissionLimits {
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    /// Descriptors for client and backend connections together.
    pub descriptor_budget: usize,
}

impl AdmissionLimits {
    /// The limits for `edge` given `descriptors` open files; warns when a configured
    /// `max_connections` does not fit.
    pub fn new(edge: &crate::config::Edge, descriptors: u64) -> Self {
        let budget = descriptor_budget(descriptors);
        let max_connections = edge
            .max_connections
            .unwrap_or_else(|| default_max_connections(descriptors));
        if max_connections * 2 > budget {
            log::warn!(
                "edge.max_connections {max_connections} needs up to {} descriptors with their \
                 backend connections, but the open-file limit is {descriptors}: requests beyond \
                 the limit get 503; raise LimitNOFILE or lower edge.max_connections",
                max_connections * 2 + descriptor_reserve(descriptors) as usize
            );
        }
        AdmissionLimits {
            max_connections,
            max_connections_per_ip: edge.max_connections_per_ip,
            descriptor_budget: budget,
        }
    }
}

/// One admitted client connection; gives its slot back when dropped.
pub struct ConnectionPermit {
    admission: Arc<Admission>,
    ip: Option<IpAddr>,
    _slot: OwnedSemaphorePermit,
}

impl ConnectionPermit {
    /// Resolves when the gateway is full and asks an idle keep-alive connection to close (one
    /// per connection waiting to be accepted).
    pub async fn reclaimed(&self) {
        let admission = &self.admission;
        loop {
            let woken = admission.reclaim.notified();
            tokio::pin!(woken);
            // Registered before the check, so a request made in between is not missed.
            woken.as_mut().enable();
            let taken =
                admission
                    .reclaim_wanted
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
            if taken.is_ok() {
                return;
            }
            woken.await;
        }
    }
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        if let Some(ip) = self.ip {
            let mut per_ip = self.admission.per_ip.lock().expect("per-address counts");
            if let Some(n) = per_ip.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    per_ip.remove(&ip);
                }
            }
        }
        self.admission.metrics.connections.dec();
    }
}

/// One proxied request holding a backend connection's descriptor.
pub struct UpstreamPermit(Arc<Admission>);

impl Drop for UpstreamPermit {
    fn drop(&mut self) {
        self.0.upstream.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Admission {
    pub fn new(limits: AdmissionLimits, trusted: TrustedProxies, metrics: Arc<Metrics>) -> Self {
        Admission {
            slots: Arc::new(Semaphore::new(limits.max_connections)),
            reserved: Mutex::new(Vec::new()),
            max: limits.max_connections,
            per_ip_max: limits.max_connections_per_ip,
            per_ip: Mutex::new(HashMap::new()),
            trusted,
            budget: limits.descriptor_budget,
            upstream: AtomicUsize::new(0),
            reclaim_wanted: AtomicUsize::new(0),
            reclaim: Notify::new(),
            metrics,
            last_warning: AtomicU64::new(0),
        }
    }

    /// Client connections open now.
    pub fn open(&self) -> usize {
        self.max - self.slots.available_permits()
    }

    /// Admits a connection from `ip` with the slot the accept loop reserved for it (or, if it
    /// came another way, the next free one). `None`: the address holds its share already;
    /// close it.
    pub async fn admit(self: &Arc<Self>, ip: Option<IpAddr>) -> Option<ConnectionPermit> {
        let reserved = self.reserved.lock().expect("reserved slots").pop();
        let counted_ip = ip.filter(|ip| self.per_ip_max > 0 && !self.trusted.trusts(ip));
        if let Some(ip) = counted_ip {
            let mut per_ip = self.per_ip.lock().expect("per-address counts");
            let n = per_ip.entry(ip).or_insert(0);
            if *n >= self.per_ip_max {
                drop(per_ip);
                self.refused(ip);
                return None;
            }
            *n += 1;
        }
        let slot = match reserved {
            Some(slot) => slot,
            None => self.take_slot().await,
        };
        self.metrics.connections.inc();
        Some(ConnectionPermit {
            admission: self.clone(),
            ip: counted_ip,
            _slot: slot,
        })
    }

    fn refused(&self, ip: IpAddr) {
        self.metrics
            .connections_closed
            .with_label_values(&["max_connections_per_ip"])
            .inc();
        // One warning per 10 s at most: a flood must not flood the log too.
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = self.last_warning.load(Ordering::Relaxed);
        if now >= last + 10
            && self
                .last_warning
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            log::warn!(
                "closed a connection from {ip}: it holds edge.max_connections_per_ip ({}) \
                 already (further refusals for 10 s are only counted in \
                 firstgate_client_connections_closed_total)",
                self.per_ip_max
            );
        }
    }

    /// Reserves a backend connection's descriptor for a proxied request; `None` when the
    /// descriptors are spoken for (answer 503 with `Retry-After`).
    pub fn reserve_upstream(self: &Arc<Self>) -> Option<UpstreamPermit> {
        let taken = self.upstream.fetch_add(1, Ordering::Relaxed);
        let permit = UpstreamPermit(self.clone());
        (taken + self.open() < self.budget).then_some(permit)
    }

    /// Asks `n` idle keep-alive connections to close, now or as they turn idle, until the
    /// returned request is dropped.
    fn ask_for_room(&self, n: usize) -> RoomRequest<'_> {
        self.reclaim_wanted.fetch_add(n, Ordering::Relaxed);
        self.reclaim.notify_waiters();
        RoomRequest(self, n)
    }

    /// Takes a connection slot, waiting for one if the gateway is full and asking idle
    /// connections to make room meanwhile: a batch at a time, as nginx frees up to 32 reusable
    /// connections when it runs out, so a burst is not accepted one closed connection at a time.
    async fn take_slot(&self) -> OwnedSemaphorePermit {
        if let Ok(slot) = self.slots.clone().try_acquire_owned() {
            return slot;
        }
        self.metrics.accept_waits.inc();
        loop {
            let _asking = self.ask_for_room(RECLAIM_BATCH);
            // Fair: queued behind connections already waiting for a slot.
            let wait = self.slots.clone().acquire_owned();
            if let Ok(slot) = tokio::time::timeout(Duration::from_secs(1), wait).await {
                return slot.expect("the connection slots are never closed");
            }
            // Still full after a second: ask again (few connections may have been idle).
        }
    }

    /// Reserves a slot for a connection being accepted (waiting while the gateway is full).
    async fn reserve_slot(&self) {
        let slot = self.take_slot().await;
        self.reserved.lock().expect("reserved slots").push(slot);
    }
}

/// Idle connections asked to close at once when the accept loop finds the gateway full.
const RECLAIM_BATCH: usize = 32;

/// A wait for a connection slot; withdraws what is left of its request for room when it ends.
struct RoomRequest<'a>(&'a Admission, usize);

impl Drop for RoomRequest<'_> {
    fn drop(&mut self) {
        let asked = self.1;
        let _ = self
            .0
            .reclaim_wanted
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(asked))
            });
    }
}

/// Pingora's accept-time filter: takes a slot for each connection as it is accepted (the
/// connection's own task starts later) and holds the accept loop while the gateway is full, so
/// new connections wait in the backlog.
pub struct AcceptGate(pub Arc<Admission>);

impl std::fmt::Debug for AcceptGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcceptGate")
            .field("open", &self.0.open())
            .field("max", &self.0.max)
            .finish()
    }
}

#[async_trait]
impl ConnectionFilter for AcceptGate {
    async fn should_accept(&self, _addr: Option<&SocketAddr>) -> bool {
        self.0.reserve_slot().await;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(max: usize, per_ip: usize, budget: usize) -> Arc<Admission> {
        Arc::new(Admission::new(
            AdmissionLimits {
                max_connections: max,
                max_connections_per_ip: per_ip,
                descriptor_budget: budget,
            },
            TrustedProxies::new(vec!["10.0.0.0/8".parse().unwrap()]),
            Arc::new(Metrics::new()),
        ))
    }

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[tokio::test]
    async fn an_address_holds_its_share_and_no_more_until_one_closes() {
        let a = admission(10, 2, 100);
        let first = a.admit(ip("192.0.2.1")).await.unwrap();
        let _second = a.admit(ip("192.0.2.1")).await.unwrap();
        assert!(a.admit(ip("192.0.2.1")).await.is_none());
        // Another address, and a trusted proxy beyond the share, are admitted.
        let _other = a.admit(ip("192.0.2.2")).await.unwrap();
        let proxies: Vec<_> =
            futures_util::future::join_all((0..3).map(|_| a.admit(ip("10.1.1.1")))).await;
        assert!(proxies.iter().all(Option::is_some));
        assert_eq!(a.open(), 6);
        drop(first);
        let _again = a.admit(ip("192.0.2.1")).await.unwrap();
        drop(proxies);
        assert_eq!(
            a.open(),
            3,
            "refused and dropped connections give their slots back"
        );
    }

    #[tokio::test]
    async fn at_the_cap_a_connection_waits_for_a_slot_and_idle_ones_are_asked_to_close() {
        let a = admission(1, 0, 100);
        let held = a.admit(ip("192.0.2.1")).await.unwrap();
        let waiting = tokio::spawn({
            let a = a.clone();
            async move { a.admit(ip("192.0.2.2")).await.is_some() }
        });
        // The held connection is told to make room (it would if it were idle).
        tokio::time::timeout(Duration::from_secs(5), held.reclaimed())
            .await
            .expect("asked to close");
        assert!(!waiting.is_finished());
        drop(held);
        assert!(waiting.await.unwrap());
    }

    #[tokio::test]
    async fn slots_reserved_at_accept_are_taken_by_the_connections_accepted() {
        let a = admission(2, 1, 100);
        assert!(AcceptGate(a.clone()).should_accept(None).await);
        assert!(AcceptGate(a.clone()).should_accept(None).await);
        assert_eq!(a.open(), 2, "reserved slots count");
        // The accept loop holds the third connection while the gateway is full.
        let third = tokio::spawn({
            let a = a.clone();
            async move { AcceptGate(a).should_accept(None).await }
        });
        let first = a.admit(ip("192.0.2.1")).await.unwrap();
        assert!(!third.is_finished());
        // A connection refused for its address gives its reserved slot back, which lets the
        // accept loop go on.
        assert!(a.admit(ip("192.0.2.1")).await.is_none());
        assert!(third.await.unwrap());
        assert_eq!(a.open(), 2);
        drop(first);
        assert_eq!(a.open(), 1);
    }

    #[tokio::test]
    async fn backend_descriptors_are_refused_beyond_the_budget() {
        let a = admission(10, 0, 4);
        let _c1 = a.admit(ip("192.0.2.1")).await.unwrap();
        let _c2 = a.admit(ip("192.0.2.2")).await.unwrap();
        let u1 = a.reserve_upstream().unwrap();
        let _u2 = a.reserve_upstream().unwrap();
        assert!(a.reserve_upstream().is_none());
        drop(u1);
        assert!(a.reserve_upstream().is_some());
    }

    #[test]
    fn the_default_cap_leaves_two_descriptors_per_connection_and_a_reserve() {
        let max = default_max_connections(20_000);
        assert!(max * 2 + descriptor_reserve(20_000) as usize <= 20_000);
        assert!(max > 9_000, "{max}");
        assert!(default_max_connections(1024) >= 300);
    }
}
