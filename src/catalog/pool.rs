//! A deployment's backend instances: membership and health through pingora-load-balancing,
//! least-in-flight choice, and admission control (a cap on concurrent requests per instance,
//! with a bounded wait when every healthy instance is full).

use super::backend_metrics::{BackendLoad, BackendMetrics};
use super::discovery::ResolvingDiscovery;
use super::selection::LeastInFlight;
use crate::config::{self, BackendAddr};
use crate::openai::Endpoint;
use pingora::lb::health_check::HttpHealthCheck;
use pingora::lb::{Backends, LoadBalancer};
use pingora::prelude::HttpPeer;
use pingora::utils::tls::{parse_x509, CertKey, WrappedX509};
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// TLS towards a deployment's backends beyond the system's roots: a private CA, a client
/// certificate for mutual TLS.
#[derive(Clone, Default)]
pub struct UpstreamTls {
    ca: Option<Arc<pingora::protocols::tls::CaType>>,
    client: Option<Arc<CertKey>>,
    /// An HTTP client with the same trust and client certificate, for the backends' metrics.
    pub scraper: reqwest::Client,
}

impl UpstreamTls {
    /// Reads the model's `tls_*` files; errors name the file.
    pub fn load(m: &config::Model) -> anyhow::Result<Self> {
        let der = |certs: Vec<rustls_pki_types::CertificateDer<'static>>| {
            certs.into_iter().map(|c| c.to_vec()).collect::<Vec<_>>()
        };
        let ca = match &m.tls_ca {
            Some(path) => {
                let certs = der(crate::pem::read_certificates(path)?);
                let wrapped: Vec<WrappedX509> = certs
                    .into_iter()
                    .map(|c| WrappedX509::new(c, parse_x509))
                    .collect();
                Some(Arc::from(wrapped.into_boxed_slice()))
            }
            None => None,
        };
        let mut scraper = reqwest::Client::builder()
            .use_rustls_tls()
            .pool_max_idle_per_host(1);
        if let Some(path) = &m.tls_ca {
            for cert in crate::pem::read_certificates(path)? {
                scraper = scraper.add_root_certificate(reqwest::Certificate::from_der(&cert)?);
            }
        }
        let client = match (&m.tls_client_cert, &m.tls_client_key) {
            (Some(cert), Some(key)) => {
                let mut pem = std::fs::read(cert)?;
                pem.push(b'\n');
                pem.extend(std::fs::read(key)?);
                scraper = scraper.identity(reqwest::Identity::from_pem(&pem)?);
                let chain = der(crate::pem::read_certificates(cert)?);
                let key = crate::pem::read_private_key(key)?;
                Some(Arc::new(CertKey::new(chain, key.secret_der().to_vec())))
            }
            _ => None,
        };
        Ok(UpstreamTls {
            ca,
            client,
            scraper: scraper.build()?,
        })
    }

    fn apply(&self, peer: &mut HttpPeer) {
        peer.options.ca.clone_from(&self.ca);
        peer.client_cert_key.clone_from(&self.client);
    }
}

/// How to talk to a deployment's backends.
#[derive(Clone)]
pub struct UpstreamSettings {
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub write_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_concurrent: usize,
    pub admission_wait: Duration,
    /// `Bearer <key>` for direct APIs; marked sensitive so it is never printed.
    pub authorization: Option<http::HeaderValue>,
    pub tls: UpstreamTls,
    /// How requests spread over the instances (the model's override, else the default).
    pub routing: config::Routing,
    /// Prefix affinity: bytes of the prompt's start that make its key (tokens × 4).
    pub prefix_bytes: usize,
    /// Prefix affinity: the load bound's slack over the average.
    pub affinity_slack: f64,
    /// Where the instances serve their metrics, and the per-scrape timeout.
    pub metrics_path: String,
    pub metrics_timeout: Duration,
}

impl UpstreamSettings {
    pub fn new(
        d: &config::UpstreamDefaults,
        m: &config::Model,
        api_key: Option<String>,
        tls: UpstreamTls,
    ) -> Self {
        let authorization = api_key.and_then(|k| {
            let mut v = http::HeaderValue::from_str(&format!("Bearer {k}")).ok()?;
            v.set_sensitive(true);
            Some(v)
        });
        UpstreamSettings {
            connect_timeout: m.connect_timeout.unwrap_or(d.connect_timeout),
            read_timeout: m.read_timeout.unwrap_or(d.read_timeout),
            write_timeout: d.write_timeout,
            idle_timeout: d.idle_timeout,
            max_concurrent: m
                .max_concurrent_per_backend
                .unwrap_or(d.max_concurrent_per_backend),
            admission_wait: d.admission_wait,
            authorization,
            tls,
            routing: m.routing.unwrap_or(d.routing),
            prefix_bytes: d.prefix_tokens.saturating_mul(4),
            affinity_slack: d.affinity_slack,
            metrics_path: d.metrics_path.clone(),
            metrics_timeout: d.metrics_timeout,
        }
    }
}

impl fmt::Debug for UpstreamSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamSettings")
            .field("read_timeout", &self.read_timeout)
            .field("max_concurrent", &self.max_concurrent)
            .field("routing", &self.routing)
            .field("has_api_key", &self.authorization.is_some())
            .field("tls_ca", &self.tls.ca.is_some())
            .field("tls_client_cert", &self.tls.client.is_some())
            .finish_non_exhaustive()
    }
}

/// One backend instance (one resolved address) and its live counters.
#[derive(Debug)]
pub struct Instance {
    pub addr: BackendAddr,
    pub socket: SocketAddr,
    /// `host:port` (the policy's instance id, and the `Host` of its requests).
    id: String,
    /// The request path of each endpoint here (by `Endpoint as usize`), and the `Host` value:
    /// made once, not per request.
    paths: [Option<http::Uri>; Endpoint::ALL.len()],
    host: Option<http::HeaderValue>,
    in_flight: AtomicUsize,
    released: Arc<Notify>,
    /// Moving average of request durations on this instance, in microseconds (0: none yet).
    latency_ewma_us: AtomicU64,
    /// When a request on this instance last finished (or the instance appeared).
    last_active: AtomicU64,
    /// When the gateway first saw this instance.
    since: Instant,
    /// May receive requests: configured backends at once, reported ones once a health check
    /// has passed.
    admitted: AtomicBool,
    /// Gets no new requests (its job ends soon); requests in flight finish.
    draining: AtomicBool,
    /// The scale policy released it and its stop is under way: like draining, and out of the
    /// scale policy's view, so it is not stopped twice.
    stopping: AtomicBool,
    /// What the instance reports about itself (vLLM's `/metrics`), read by the monitor.
    pub backend: BackendMetrics,
}

impl Instance {
    pub(super) fn new(
        addr: BackendAddr,
        socket: SocketAddr,
        released: Arc<Notify>,
        admitted: bool,
    ) -> Self {
        let mut paths = [const { None }; Endpoint::ALL.len()];
        for e in Endpoint::ALL {
            paths[e as usize] =
                http::Uri::try_from(format!("{}/{}", addr.base_path, e.path())).ok();
        }
        let id = addr.authority();
        Instance {
            host: http::HeaderValue::try_from(id.as_str()).ok(),
            id,
            paths,
            addr,
            socket,
            in_flight: AtomicUsize::new(0),
            released,
            latency_ewma_us: AtomicU64::new(0),
            last_active: AtomicU64::new(0),
            since: Instant::now(),
            admitted: AtomicBool::new(admitted),
            draining: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            backend: BackendMetrics::default(),
        }
    }

    /// The path of `endpoint`'s requests here (none if the base path makes no valid one).
    pub fn path(&self, endpoint: Endpoint) -> Option<http::Uri> {
        self.paths[endpoint as usize].clone()
    }

    /// The `Host` of its requests (none if its address is no valid header value).
    pub fn host(&self) -> Option<http::HeaderValue> {
        self.host.clone()
    }

    /// Whether new requests may go here (given its health).
    fn serves(&self, healthy: bool) -> bool {
        healthy && self.admitted.load(Ordering::Relaxed) && !self.is_draining()
    }

    pub fn set_draining(&self, draining: bool) {
        self.draining.store(draining, Ordering::Relaxed);
    }

    /// Whether it takes no new requests because its job ends soon or it is being stopped.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed) || self.is_stopping()
    }

    /// Marks it as being stopped (or, `false`, no longer: the stop failed). Returns whether
    /// that changed anything.
    pub fn set_stopping(&self, stopping: bool) -> bool {
        self.stopping.swap(stopping, Ordering::Relaxed) != stopping
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    /// Recent request duration (moving average), if any request finished yet.
    pub fn recent_latency(&self) -> Option<Duration> {
        match self.latency_ewma_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    /// How long the gateway has known this instance.
    pub fn age(&self) -> Duration {
        self.since.elapsed()
    }

    /// Lets requests come here (its health check passed); it is idle from now, unless a request
    /// already finished here.
    fn admit(&self) {
        if !self.admitted.swap(true, Ordering::Relaxed) {
            let now = self.since.elapsed().as_micros().max(1) as u64;
            let _ = self
                .last_active
                .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
        }
    }

    /// How long since a request last finished here, or since it was admitted. An instance still
    /// loading its model is not idle: counted from its appearance, a load longer than the
    /// model's `idle_release` had it released before it served anything.
    pub fn idle(&self) -> Duration {
        if self.in_flight() > 0 || !self.admitted.load(Ordering::Relaxed) {
            return Duration::ZERO;
        }
        let last = self.last_active.load(Ordering::Relaxed);
        let since_start = self.since.elapsed();
        if last == 0 {
            return since_start;
        }
        since_start.saturating_sub(Duration::from_micros(last))
    }

    fn record_finished(&self, took: Duration) {
        let sample = took.as_micros().clamp(1, u64::MAX as u128) as u64;
        // Lost updates under contention only blur an average.
        let old = self.latency_ewma_us.load(Ordering::Relaxed);
        let new = if old == 0 {
            sample
        } else {
            (old * 4 + sample) / 5
        };
        self.latency_ewma_us.store(new.max(1), Ordering::Relaxed);
        let at = self.since.elapsed().as_micros().max(1) as u64;
        self.last_active.store(at, Ordering::Relaxed);
    }

    /// The instance's own figures (vLLM's queue, KV cache, prefix-cache hits) from its last
    /// successful scrape, if any.
    pub fn reported(&self) -> Option<BackendLoad> {
        self.backend.load()
    }

    /// The URL of the instance's metrics.
    pub fn metrics_url(&self, path: &str) -> String {
        let scheme = if self.addr.tls() { "https" } else { "http" };
        format!("{scheme}://{}{path}", self.id)
    }

    /// Requests the gateway has sent to this instance that have not finished.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// A stable name for logs and metric labels: `host:port`.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Takes a slot if fewer than `cap` requests are in flight.
    pub(super) fn try_reserve(&self, cap: usize) -> bool {
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
                (n < cap).then_some(n + 1)
            })
            .is_ok()
    }
}

/// A reserved slot on an instance; dropping it frees the slot and wakes a waiting request.
#[derive(Debug)]
pub struct InstanceGuard {
    instance: Arc<Instance>,
    acquired: Instant,
}

impl InstanceGuard {
    fn new(instance: Arc<Instance>) -> Self {
        InstanceGuard {
            instance,
            acquired: Instant::now(),
        }
    }

    pub fn instance(&self) -> &Arc<Instance> {
        &self.instance
    }
}

impl Drop for InstanceGuard {
    fn drop(&mut self) {
        self.instance.record_finished(self.acquired.elapsed());
        self.instance.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.instance.released.notify_one();
    }
}

/// Why no instance could be given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolError {
    /// No instance is healthy (or every healthy one was already tried).
    NoHealthyBackend,
    /// Every healthy instance stayed at its concurrency cap for the whole admission wait.
    AtCapacity,
}

/// An instance and its load: requests in flight, then recent latency in milliseconds.
pub type Loaded = ((i64, i64), Arc<Instance>);

/// A pool's instances at a glance ([`BackendPool::survey`]).
pub struct Survey {
    pub instances: usize,
    /// Those that take new requests (healthy, admitted, not draining).
    pub serving: usize,
    /// The serving one with the fewest requests in flight, then the lowest recent latency in
    /// milliseconds (the first such), and that load.
    pub least: Option<Loaded>,
}

/// The instances of one deployment.
pub struct BackendPool {
    lb: LoadBalancer<LeastInFlight>,
    /// Addresses reported at run time, read by the discovery.
    dynamic: Arc<std::sync::Mutex<Vec<BackendAddr>>>,
    pub settings: UpstreamSettings,
    released: Arc<Notify>,
}

impl fmt::Debug for BackendPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackendPool")
            .field("instances", &self.instances().len())
            .field("settings", &self.settings)
            .finish()
    }
}

impl BackendPool {
    pub fn new(
        addrs: Vec<BackendAddr>,
        settings: UpstreamSettings,
        health_path: Option<&str>,
        hc: &config::HealthCheck,
    ) -> Self {
        let released = Arc::new(Notify::new());
        let tls = addrs.first().is_some_and(BackendAddr::tls);
        let host = addrs
            .first()
            .map(|a| a.host.clone())
            .unwrap_or_else(|| "localhost".into());
        let dynamic = Arc::new(std::sync::Mutex::new(Vec::new()));
        let discovery = ResolvingDiscovery::new(addrs, dynamic.clone(), released.clone());
        let mut lb = LoadBalancer::from_backends(Backends::new(Box::new(discovery)));
        if let Some(path) = health_path {
            let mut check = HttpHealthCheck::new(&host, tls);
            check.req.set_uri(
                path.parse()
                    .unwrap_or_else(|_| http::Uri::from_static("/health")),
            );
            check.peer_template.options.connection_timeout = Some(hc.timeout);
            check.peer_template.options.read_timeout = Some(hc.timeout);
            settings.tls.apply(&mut check.peer_template);
            check.consecutive_failure = hc.failures_to_down.max(1);
            check.consecutive_success = hc.successes_to_up.max(1);
            check.reuse_connection = true;
            lb.set_health_check(Box::new(check));
        }
        BackendPool {
            lb,
            dynamic,
            settings,
            released,
        }
    }

    /// Re-resolves host names and updates membership.
    pub async fn discover(&self) {
        if let Err(e) = self.lb.update().await {
            log::warn!("backend discovery failed: {e}");
        }
    }

    /// Runs one round of health checks (all instances in parallel), then admits reported
    /// instances that were present for the whole round and passed it.
    pub async fn check_health(&self) {
        let before: Vec<SocketAddr> = self.all_instances().iter().map(|(i, _)| i.socket).collect();
        self.lb.backends().run_health_check(true).await;
        for (i, healthy) in self.all_instances() {
            if healthy && before.contains(&i.socket) {
                i.admit();
            }
        }
    }

    /// Replaces the instances reported at run time; returns whether they changed (then call
    /// [`Self::discover`]).
    pub fn set_dynamic(&self, addrs: Vec<BackendAddr>) -> bool {
        let mut current = self.dynamic.lock().unwrap_or_else(|e| e.into_inner());
        if *current == addrs {
            return false;
        }
        *current = addrs;
        true
    }

    fn all_instances(&self) -> Vec<(Arc<Instance>, bool)> {
        self.instances_with(|_, healthy| healthy)
    }

    /// Every instance, and whether it takes new requests (healthy, admitted, not draining).
    pub fn instances(&self) -> Vec<(Arc<Instance>, bool)> {
        self.instances_with(|i, healthy| i.serves(healthy))
    }

    fn instances_with(&self, flag: impl Fn(&Instance, bool) -> bool) -> Vec<(Arc<Instance>, bool)> {
        let backends = self.lb.backends();
        backends
            .get_backend()
            .iter()
            .filter_map(|b| {
                let i = b.ext.get::<Arc<Instance>>()?;
                Some((i.clone(), flag(i, backends.ready(b))))
            })
            .collect()
    }

    /// The serving instance with the fewest requests in flight, then the lowest recent latency
    /// in milliseconds (the first such, in the pool's order): the order of the built-in route
    /// rule, read without copying the instances.
    pub fn least_in_flight(&self) -> Option<Loaded> {
        self.survey().least
    }

    /// In one pass: how many instances there are and how many take new requests (what a route
    /// policy sees of them besides their loads), and [`Self::least_in_flight`].
    pub fn survey(&self) -> Survey {
        let backends = self.lb.backends();
        let mut survey = Survey {
            instances: 0,
            serving: 0,
            least: None,
        };
        for b in backends.get_backend().iter() {
            let Some(i) = b.ext.get::<Arc<Instance>>() else {
                continue;
            };
            survey.instances += 1;
            if !i.serves(backends.ready(b)) {
                continue;
            }
            survey.serving += 1;
            let load = (
                i.in_flight() as i64,
                i.recent_latency().map_or(0, |l| l.as_millis() as i64),
            );
            if survey.least.as_ref().is_none_or(|(least, _)| load < *least) {
                survey.least = Some((load, i.clone()));
            }
        }
        survey
    }

    /// Reserves a slot on `instance`, found serving just now, if it has one (its health is
    /// not looked up a second time).
    pub fn try_reserve(&self, instance: &Arc<Instance>) -> Option<InstanceGuard> {
        (instance.serves(true) && instance.try_reserve(self.settings.max_concurrent))
            .then(|| InstanceGuard::new(instance.clone()))
    }

    pub fn has_healthy(&self) -> bool {
        self.instances().iter().any(|(_, serves)| *serves)
    }

    /// Reserves the healthy instance with the fewest requests in flight, skipping `exclude`
    /// (instances already tried for this request). Does not wait.
    pub fn try_acquire(&self, exclude: &[SocketAddr]) -> Result<InstanceGuard, PoolError> {
        self.try_acquire_below(exclude, self.settings.max_concurrent)
    }

    /// A slot for background work (batch lines): only where a quarter of the instance's
    /// slots (at least one) stays free for interactive requests.
    pub fn try_acquire_spare(&self) -> Result<InstanceGuard, PoolError> {
        let cap = self.settings.max_concurrent;
        self.try_acquire_below(&[], cap.saturating_sub((cap / 4).max(1)))
    }

    fn try_acquire_below(
        &self,
        exclude: &[SocketAddr],
        cap: usize,
    ) -> Result<InstanceGuard, PoolError> {
        let saw_healthy = std::cell::Cell::new(false);
        let picked = self.lb.select_with(b"", usize::MAX, |b, healthy| {
            let Some(inst) = b.ext.get::<Arc<Instance>>() else {
                return false;
            };
            if !inst.serves(healthy) || exclude.contains(&inst.socket) {
                return false;
            }
            saw_healthy.set(true);
            inst.try_reserve(cap)
        });
        match picked.and_then(|b| b.ext.get::<Arc<Instance>>().cloned()) {
            Some(instance) => Ok(InstanceGuard::new(instance)),
            None if saw_healthy.get() => Err(PoolError::AtCapacity),
            None => Err(PoolError::NoHealthyBackend),
        }
    }

    /// Reserves `socket` if it is a healthy instance of this pool with a free slot.
    pub fn try_acquire_at(&self, socket: SocketAddr) -> Option<InstanceGuard> {
        let backends = self.lb.backends();
        let all = backends.get_backend();
        let backend = all.iter().find(|b| {
            b.ext
                .get::<Arc<Instance>>()
                .is_some_and(|i| i.socket == socket)
        })?;
        let instance = backend.ext.get::<Arc<Instance>>()?;
        (instance.serves(backends.ready(backend))
            && instance.try_reserve(self.settings.max_concurrent))
        .then(|| InstanceGuard::new(instance.clone()))
    }

    /// Like [`Self::try_acquire`], but when every healthy instance is full, waits up to the
    /// admission wait for a slot to free.
    pub async fn acquire(&self, exclude: &[SocketAddr]) -> Result<InstanceGuard, PoolError> {
        let deadline = tokio::time::Instant::now() + self.settings.admission_wait;
        loop {
            // Register interest before looking, so a release in between is not missed.
            let notified = self.released.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.try_acquire(exclude) {
                Err(PoolError::AtCapacity) => {}
                done => return done,
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(PoolError::AtCapacity);
            }
        }
    }

    /// The Pingora peer for an instance, with this deployment's timeouts.
    pub fn peer(&self, instance: &Instance) -> HttpPeer {
        let tls = instance.addr.tls();
        // Also for an IP address: the certificate is then checked against it (Pingora skips
        // verification when the name is empty).
        let sni = if tls {
            instance.addr.host.clone()
        } else {
            String::new()
        };
        let mut peer = HttpPeer::new(instance.socket, tls, sni);
        self.settings.tls.apply(&mut peer);
        let s = &self.settings;
        peer.options.connection_timeout = Some(s.connect_timeout);
        peer.options.read_timeout = Some(s.read_timeout);
        peer.options.write_timeout = Some(s.write_timeout);
        peer.options.idle_timeout = Some(s.idle_timeout);
        peer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_instance_is_idle_from_its_admission_not_while_it_loads() {
        let addr = BackendAddr::parse("127.0.0.1:9", false).unwrap();
        let i = Instance::new(
            addr,
            "127.0.0.1:9".parse().unwrap(),
            Arc::new(Notify::new()),
            false,
        );
        // Loading (health check not passed yet): not idle, however long it takes.
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(i.idle(), Duration::ZERO);
        i.admit();
        assert!(
            i.idle() < i.age(),
            "idle counts from the admission, not the appearance"
        );
        // A configured backend is admitted from the start.
        let fixed = Instance::new(
            BackendAddr::parse("127.0.0.1:10", false).unwrap(),
            "127.0.0.1:10".parse().unwrap(),
            Arc::new(Notify::new()),
            true,
        );
        std::thread::sleep(Duration::from_millis(5));
        assert!(fixed.idle() > Duration::ZERO);
    }
}
