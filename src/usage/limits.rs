//! Rate limits counted in this process (`limits.rs`; `shared_limits.rs` counts them in Redis
//! for several replicas): requests per second per user (FIRST's default 10), per client address on every route,
//! requests in flight per user, and tokens per minute per model and per user of a model
//! (FIRST's `tpm_model` / `tpm_user`). Token limits hold under concurrency: a request reserves
//! its estimate in the same step as the check, and its real tokens replace the estimate when it
//! ends.

use arc_swap::ArcSwap;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A refused request: which limit, and when to try again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limited {
    /// `requests_per_second`, `ip_requests_per_second`, `max_concurrent_per_user`,
    /// `tokens_per_minute`, `tokens_per_minute_per_user`, or `limits_unavailable` (Redis could
    /// not say, with `state.redis.on_error: closed`).
    pub limit: &'static str,
    pub retry_after: Duration,
    pub message: String,
}

impl From<&crate::config::Limits> for LimitSettings {
    fn from(l: &crate::config::Limits) -> Self {
        LimitSettings {
            user_rps: l.requests_per_second,
            ip_rps: l.ip_requests_per_second,
            ip_burst: l.ip_burst,
            window: l.token_window,
            max_in_flight: l.max_concurrent_per_user,
        }
    }
}

/// Who the per-user limits do not apply to (`limits.exempt_users`, `limits.exempt_groups`).
#[derive(Debug, Default)]
pub struct Exemptions {
    users: std::collections::HashSet<String>,
    groups: std::collections::HashSet<String>,
}

impl Exemptions {
    pub fn new(l: &crate::config::Limits) -> Self {
        Exemptions {
            users: l.exempt_users.iter().cloned().collect(),
            groups: l.exempt_groups.iter().cloned().collect(),
        }
    }

    /// Whether the user, or one of their groups, is exempt.
    pub fn covers(&self, username: &str, groups: &[String]) -> bool {
        self.users.contains(username) || groups.iter().any(|g| self.groups.contains(g))
    }
}

/// The per-request caps of `limits:` that the proxy reads: largest body, and the completion
/// tokens assumed for a request without `max_tokens` (replaceable on a reload).
#[derive(Debug)]
pub struct RequestCaps {
    max_body_bytes: AtomicUsize,
    default_max_tokens: AtomicU64,
}

impl RequestCaps {
    pub fn new(max_body_bytes: usize, default_max_tokens: u64) -> Self {
        RequestCaps {
            max_body_bytes: AtomicUsize::new(max_body_bytes),
            default_max_tokens: AtomicU64::new(default_max_tokens),
        }
    }

    pub fn max_body_bytes(&self) -> usize {
        self.max_body_bytes.load(Ordering::Relaxed)
    }

    pub fn default_max_tokens(&self) -> u64 {
        self.default_max_tokens.load(Ordering::Relaxed)
    }

    pub fn set(&self, max_body_bytes: usize, default_max_tokens: u64) {
        self.max_body_bytes.store(max_body_bytes, Ordering::Relaxed);
        self.default_max_tokens
            .store(default_max_tokens, Ordering::Relaxed);
    }
}

/// The configured limits (`limits:`); `0` turns a request limit off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitSettings {
    pub user_rps: u32,
    pub ip_rps: u32,
    /// Requests an address may send at once (at least its rate).
    pub ip_burst: u32,
    /// Length of the token windows.
    pub window: Duration,
    /// Requests one user may have in flight.
    pub max_in_flight: u32,
}

/// Tokens a request reserved, in the window it reserved them.
#[derive(Debug)]
pub struct LocalReservation {
    window: u64,
    keys: Vec<String>,
    tokens: u64,
}

/// Token counts in the current window, per key.
#[derive(Default)]
struct TokenWindows(Mutex<HashMap<String, (u64, u64)>>);

impl TokenWindows {
    /// Adds `tokens` to every key, if each stays within its limit or has nothing counted yet
    /// (a request larger than a whole budget still runs in an empty window); else the index
    /// of the first key that refuses.
    fn reserve(&self, window: u64, keys: &[(String, u64)], tokens: u64) -> Result<(), usize> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() > 100_000 {
            map.retain(|_, (w, _)| *w == window);
        }
        let used = |map: &HashMap<String, (u64, u64)>, key: &str| {
            map.get(key)
                .filter(|(w, _)| *w == window)
                .map_or(0, |(_, n)| *n)
        };
        for (i, (key, limit)) in keys.iter().enumerate() {
            let n = used(&map, key);
            if n > 0 && n.saturating_add(tokens) > *limit {
                return Err(i);
            }
        }
        for (key, _) in keys {
            let e = map.entry(key.clone()).or_insert((window, 0));
            if e.0 != window {
                *e = (window, 0);
            }
            e.1 = e.1.saturating_add(tokens);
        }
        Ok(())
    }

    /// Replaces a reservation by the real count: in its window if that is still the current
    /// one, else the real count goes to the current window.
    fn settle(&self, r: &LocalReservation, now: u64, tokens: u64) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for key in &r.keys {
            let e = map.entry(key.clone()).or_insert((now, 0));
            if e.0 == r.window {
                e.1 = e.1.saturating_sub(r.tokens).saturating_add(tokens);
            } else if e.0 == now {
                e.1 = e.1.saturating_add(tokens);
            } else {
                *e = (now, tokens);
            }
        }
    }
}

/// Requests in flight per user.
type InFlight = Arc<Mutex<HashMap<String, u32>>>;

/// One of a user's requests in flight; dropped when the request ends.
#[derive(Debug)]
pub struct LocalPermit {
    counts: InFlight,
    user: String,
}

impl Drop for LocalPermit {
    fn drop(&mut self) {
        let mut map = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.user);
            }
        }
    }
}

pub struct MemoryLimits {
    rates: ArcSwap<Rates>,
    in_flight: InFlight,
    tokens: TokenWindows,
    checks: AtomicU64,
}

/// The settings and the rate limiters built from them (replaced whole on a reload).
struct Rates {
    settings: LimitSettings,
    per_user: Option<DefaultKeyedRateLimiter<String>>,
    per_ip: Option<DefaultKeyedRateLimiter<IpAddr>>,
}

impl Rates {
    fn new(mut settings: LimitSettings) -> Rates {
        settings.window = settings.window.max(Duration::from_secs(1));
        let ip_quota = |n| {
            let burst = NonZeroU32::new(settings.ip_burst).map_or(n, |b| b.max(n));
            Quota::per_second(n).allow_burst(burst)
        };
        Rates {
            settings,
            per_user: NonZeroU32::new(settings.user_rps)
                .map(|n| RateLimiter::keyed(Quota::per_second(n))),
            per_ip: NonZeroU32::new(settings.ip_rps).map(|n| RateLimiter::keyed(ip_quota(n))),
        }
    }
}

impl MemoryLimits {
    /// `0` turns a request limit off. An address may send `ip_burst` requests at once (at
    /// least its rate).
    pub fn new(
        user_rps: u32,
        ip_rps: u32,
        ip_burst: u32,
        window: Duration,
        max_in_flight: u32,
    ) -> Self {
        MemoryLimits::with(LimitSettings {
            user_rps,
            ip_rps,
            ip_burst,
            window,
            max_in_flight,
        })
    }

    pub fn with(settings: LimitSettings) -> Self {
        MemoryLimits {
            rates: ArcSwap::from_pointee(Rates::new(settings)),
            in_flight: InFlight::default(),
            tokens: TokenWindows::default(),
            checks: AtomicU64::new(0),
        }
    }

    /// Forgets idle keys now and then so memory stays bounded.
    fn tidy(&self, rates: &Rates) {
        if self.checks.fetch_add(1, Ordering::Relaxed) % 4096 == 4095 {
            if let Some(l) = &rates.per_user {
                l.retain_recent();
            }
            if let Some(l) = &rates.per_ip {
                l.retain_recent();
            }
        }
    }
}

/// The refusal of a user over `max_in_flight`.
pub(super) fn too_many_in_flight(max_in_flight: u32) -> Limited {
    Limited {
        limit: "max_concurrent_per_user",
        retry_after: Duration::from_secs(1),
        message: format!(
            "Concurrency limit reached: at most {max_in_flight} requests in flight per user. \
             Wait for one to finish, then retry."
        ),
    }
}

/// The refusal of a user over the per-user rate.
pub(super) fn too_fast(user_rps: u32, retry_after: Duration) -> Limited {
    Limited {
        limit: "requests_per_second",
        retry_after,
        message: format!(
            "Rate limit exceeded: at most {user_rps} requests per second per user. Slow down \
             and retry."
        ),
    }
}

/// The refusal of an address over its rate.
pub(super) fn too_fast_from(ip_rps: u32, retry_after: Duration) -> Limited {
    Limited {
        limit: "ip_requests_per_second",
        retry_after,
        message: format!(
            "Rate limit exceeded: at most {ip_rps} requests per second from one address."
        ),
    }
}

/// The token budgets one request counts against: everyone's of the model (`tokens_per_minute`)
/// and the user's of it (`tokens_per_minute_per_user`), as (key, limit) pairs.
#[derive(Debug, Clone)]
pub struct TokenBudgets(pub(super) Vec<(String, u64)>);

impl TokenBudgets {
    pub fn new(user: &str, model: &str, model_tpm: Option<u64>, user_tpm: Option<u64>) -> Self {
        let mut keys = Vec::with_capacity(2);
        if let Some(limit) = model_tpm {
            keys.push((format!("m\u{0}{model}"), limit));
        }
        if let Some(limit) = user_tpm {
            keys.push((format!("u\u{0}{model}\u{0}{user}"), limit));
        }
        TokenBudgets(keys)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The refusal by budget `i`, which frees up in `left`.
    pub(super) fn refusal(&self, i: usize, left: Duration) -> Limited {
        let (key, limit) = &self.0[i];
        let model = key.split('\u{0}').nth(1).unwrap_or_default();
        let wait = left.as_secs().max(1);
        if key.starts_with('u') {
            Limited {
                limit: "tokens_per_minute_per_user",
                retry_after: left,
                message: format!("Token limit reached: at most {limit} tokens per minute per user of {model}. Retry in {wait} s."),
            }
        } else {
            Limited {
                limit: "tokens_per_minute",
                retry_after: left,
                message: format!("Token limit reached: {model} serves at most {limit} tokens per minute. Retry in {wait} s."),
            }
        }
    }
}

/// The current token window's number and the time left in it.
pub(super) fn window_now(window: Duration) -> (u64, Duration) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let len = window.as_millis().max(1) as u64;
    let n = now.as_millis() as u64 / len;
    let left = Duration::from_millis((n + 1) * len).saturating_sub(now);
    (n, left)
}

fn wait_of<T: governor::clock::Reference>(not_until: governor::NotUntil<T>) -> Duration
where
    DefaultClock: Clock<Instant = T>,
{
    not_until.wait_time_from(DefaultClock::default().now())
}

impl MemoryLimits {
    /// Counts a request of `user` against the per-user rate, or refuses it.
    pub fn check_user(&self, user: &str) -> Result<(), Limited> {
        let rates = self.rates.load();
        self.tidy(&rates);
        let Some(l) = &rates.per_user else {
            return Ok(());
        };
        l.check_key(&user.to_string())
            .map_err(|nu| too_fast(rates.settings.user_rps, wait_of(nu)))
    }

    /// Counts a request from `ip` against the per-address rate, or refuses it.
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), Limited> {
        let rates = self.rates.load();
        self.tidy(&rates);
        let Some(l) = &rates.per_ip else {
            return Ok(());
        };
        l.check_key(&ip)
            .map_err(|nu| too_fast_from(rates.settings.ip_rps, wait_of(nu)))
    }

    /// Before a request: reserves `estimate` tokens against every budget of `keys` at once,
    /// or refuses naming the first budget that is spent. `None` when there is no budget.
    pub fn reserve_tokens(
        &self,
        keys: TokenBudgets,
        estimate: u64,
    ) -> Result<Option<LocalReservation>, Limited> {
        if keys.is_empty() {
            return Ok(None);
        }
        let (window, left) = window_now(self.settings().window);
        match self.tokens.reserve(window, &keys.0, estimate) {
            Ok(()) => Ok(Some(LocalReservation {
                window,
                keys: keys.0.into_iter().map(|(k, _)| k).collect(),
                tokens: estimate,
            })),
            Err(i) => Err(keys.refusal(i, left)),
        }
    }

    /// After a request: its real tokens replace what it reserved.
    pub fn settle_tokens(&self, reservation: LocalReservation, tokens: u64) {
        let (now, _) = window_now(self.settings().window);
        self.tokens.settle(&reservation, now, tokens);
    }

    /// Holds one of the user's requests in flight until the permit is dropped.
    pub fn begin_request(&self, user: &str) -> Result<Option<LocalPermit>, Limited> {
        let max_in_flight = self.settings().max_in_flight;
        if max_in_flight == 0 {
            return Ok(None);
        }
        let mut map = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(user.to_string()).or_insert(0);
        if *n >= max_in_flight {
            return Err(too_many_in_flight(max_in_flight));
        }
        *n += 1;
        Ok(Some(LocalPermit {
            counts: self.in_flight.clone(),
            user: user.to_string(),
        }))
    }

    /// The settings in force.
    pub fn settings(&self) -> LimitSettings {
        self.rates.load().settings
    }

    /// Applies new limits (a configuration reload); requests in flight and tokens counted in
    /// the current window stay counted.
    pub fn reconfigure(&self, settings: LimitSettings) {
        // Unchanged rates keep their limiters (and what they have counted).
        let rates = Rates::new(settings);
        if self.rates.load().settings != rates.settings {
            self.rates.store(Arc::new(rates));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reserve(
        l: &MemoryLimits,
        user: &str,
        model: &str,
        model_tpm: Option<u64>,
        user_tpm: Option<u64>,
        estimate: u64,
    ) -> Result<Option<LocalReservation>, Limited> {
        l.reserve_tokens(
            TokenBudgets::new(user, model, model_tpm, user_tpm),
            estimate,
        )
    }

    fn limits(max_in_flight: u32) -> MemoryLimits {
        MemoryLimits::new(0, 0, 0, Duration::from_secs(3600), max_in_flight)
    }

    #[test]
    fn concurrent_reservations_admit_no_more_than_the_budget() {
        let l = limits(0);
        let admitted: Vec<_> = (0..50)
            .filter_map(|_| reserve(&l, "u", "m", None, Some(1000), 100).ok())
            .collect();
        assert_eq!(admitted.len(), 10);
        // Real usage replaces the estimates: five requests used nothing, so there is room.
        for r in admitted.into_iter().take(5).flatten() {
            l.settle_tokens(r, 0);
        }
        let more = (0..50)
            .filter(|_| reserve(&l, "u", "m", None, Some(1000), 100).is_ok())
            .count();
        assert_eq!(more, 5);
        // Another user of the model has a budget of their own; a model-wide limit counts all.
        assert!(reserve(&l, "v", "m", None, Some(1000), 100).is_ok());
        assert!(reserve(&l, "v", "m", Some(500), None, 400).is_ok());
        let e = reserve(&l, "w", "m", Some(500), None, 200).unwrap_err();
        assert_eq!(e.limit, "tokens_per_minute");
    }

    #[test]
    fn a_request_larger_than_the_budget_runs_in_an_empty_window_and_counts_saturate() {
        let l = limits(0);
        let r = reserve(&l, "u", "m", None, Some(10), 1000).unwrap();
        assert!(reserve(&l, "u", "m", None, Some(10), 1).is_err());
        l.settle_tokens(r.unwrap(), u64::MAX);
        assert!(reserve(&l, "u", "m", None, Some(10), 1).is_err());
        assert!(reserve(&l, "u", "m", None, None, 1).unwrap().is_none());
    }

    #[test]
    fn a_user_holds_at_most_the_requests_in_flight_allowed() {
        let l = limits(2);
        let a = l.begin_request("alice").unwrap();
        let _b = l.begin_request("alice").unwrap();
        let e = l.begin_request("alice").unwrap_err();
        assert_eq!(e.limit, "max_concurrent_per_user");
        assert!(l.begin_request("bob").unwrap().is_some());
        drop(a);
        assert!(l.begin_request("alice").unwrap().is_some());
        assert!(limits(0).begin_request("alice").unwrap().is_none());
    }

    #[test]
    fn a_reconfiguration_keeps_requests_in_flight_counted() {
        let l = limits(1);
        let _first = l.begin_request("u").unwrap();
        let settings = |max_in_flight| LimitSettings {
            user_rps: 5,
            ip_rps: 0,
            ip_burst: 0,
            window: Duration::from_secs(60),
            max_in_flight,
        };
        l.reconfigure(settings(1));
        assert!(l.begin_request("u").is_err(), "still one in flight");
        l.reconfigure(settings(2));
        assert!(l.begin_request("u").is_ok());
        // The new per-user rate applies.
        let refused = (0..20).filter(|_| l.check_user("v").is_err()).count();
        assert!(refused > 0);
    }
}
