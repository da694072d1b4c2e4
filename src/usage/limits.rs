//! Rate limits, in memory behind a trait (state shared across replicas can come later):
//! requests per second per user (FIRST's default 10), per client address on every route,
//! requests in flight per user, and tokens per minute per model and per user of a model
//! (FIRST's `tpm_model` / `tpm_user`). Token limits hold under concurrency: a request reserves
//! its estimate in the same step as the check, and its real tokens replace the estimate when it
//! ends.

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A refused request: which limit, and when to try again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limited {
    /// `requests_per_second`, `ip_requests_per_second`, `tokens_per_minute`, or
    /// `tokens_per_minute_per_user`.
    pub limit: &'static str,
    pub retry_after: Duration,
    pub message: String,
}

/// The limits a request passes.
pub trait Limits: Send + Sync {
    fn check_user(&self, user: &str) -> Result<(), Limited>;
    fn check_ip(&self, ip: IpAddr) -> Result<(), Limited>;
    /// Before a request: reserves `estimate` tokens against `model_tpm` (everyone's) and
    /// `user_tpm` (this user's of the model) at once, or refuses. `None` when neither applies.
    fn reserve_tokens(
        &self,
        user: &str,
        model: &str,
        model_tpm: Option<u64>,
        user_tpm: Option<u64>,
        estimate: u64,
    ) -> Result<Option<TokenReservation>, Limited>;
    /// After a request: its real tokens replace what it reserved.
    fn settle_tokens(&self, reservation: TokenReservation, tokens: u64);
    /// Holds one of the user's requests in flight until the permit is dropped.
    fn begin_request(&self, user: &str) -> Result<Option<InFlightPermit>, Limited>;
}

/// Tokens a request reserved, in the window it reserved them.
#[derive(Debug)]
pub struct TokenReservation {
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
    fn settle(&self, r: &TokenReservation, now: u64, tokens: u64) {
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
pub struct InFlightPermit {
    counts: InFlight,
    user: String,
}

impl Drop for InFlightPermit {
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
    per_user: Option<DefaultKeyedRateLimiter<String>>,
    /// Requests one user may have in flight (0: no limit).
    max_in_flight: u32,
    in_flight: InFlight,
    per_ip: Option<DefaultKeyedRateLimiter<IpAddr>>,
    user_rps: u32,
    ip_rps: u32,
    tokens: TokenWindows,
    /// Length of the token windows.
    window: Duration,
    checks: AtomicU64,
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
        let ip_quota = |n| {
            let burst = NonZeroU32::new(ip_burst).map_or(n, |b| b.max(n));
            Quota::per_second(n).allow_burst(burst)
        };
        MemoryLimits {
            per_user: NonZeroU32::new(user_rps).map(|n| RateLimiter::keyed(Quota::per_second(n))),
            max_in_flight,
            in_flight: InFlight::default(),
            per_ip: NonZeroU32::new(ip_rps).map(|n| RateLimiter::keyed(ip_quota(n))),
            user_rps,
            ip_rps,
            tokens: TokenWindows::default(),
            window: window.max(Duration::from_secs(1)),
            checks: AtomicU64::new(0),
        }
    }

    /// Forgets idle keys now and then so memory stays bounded.
    fn tidy(&self) {
        if self.checks.fetch_add(1, Ordering::Relaxed) % 4096 == 4095 {
            if let Some(l) = &self.per_user {
                l.retain_recent();
            }
            if let Some(l) = &self.per_ip {
                l.retain_recent();
            }
        }
    }
}

/// The current token window's number and the time left in it.
fn window_now(window: Duration) -> (u64, Duration) {
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

impl Limits for MemoryLimits {
    fn check_user(&self, user: &str) -> Result<(), Limited> {
        self.tidy();
        let Some(l) = &self.per_user else {
            return Ok(());
        };
        l.check_key(&user.to_string()).map_err(|nu| Limited {
            limit: "requests_per_second",
            retry_after: wait_of(nu),
            message: format!(
                "Rate limit exceeded: at most {} requests per second per user. Slow down and retry.",
                self.user_rps
            ),
        })
    }

    fn check_ip(&self, ip: IpAddr) -> Result<(), Limited> {
        self.tidy();
        let Some(l) = &self.per_ip else { return Ok(()) };
        l.check_key(&ip).map_err(|nu| Limited {
            limit: "ip_requests_per_second",
            retry_after: wait_of(nu),
            message: format!(
                "Rate limit exceeded: at most {} requests per second from one address.",
                self.ip_rps
            ),
        })
    }

    fn reserve_tokens(
        &self,
        user: &str,
        model: &str,
        model_tpm: Option<u64>,
        user_tpm: Option<u64>,
        estimate: u64,
    ) -> Result<Option<TokenReservation>, Limited> {
        if model_tpm.is_none() && user_tpm.is_none() {
            return Ok(None);
        }
        let (window, left) = window_now(self.window);
        let mut keys = Vec::with_capacity(2);
        if let Some(limit) = model_tpm {
            keys.push((format!("m\u{0}{model}"), limit));
        }
        if let Some(limit) = user_tpm {
            keys.push((format!("u\u{0}{model}\u{0}{user}"), limit));
        }
        match self.tokens.reserve(window, &keys, estimate) {
            Ok(()) => Ok(Some(TokenReservation {
                window,
                keys: keys.into_iter().map(|(k, _)| k).collect(),
                tokens: estimate,
            })),
            Err(i) => {
                let limit = keys[i].1;
                let wait = left.as_secs().max(1);
                let per_user = keys[i].0.starts_with('u');
                Err(Limited {
                    limit: if per_user {
                        "tokens_per_minute_per_user"
                    } else {
                        "tokens_per_minute"
                    },
                    retry_after: left,
                    message: if per_user {
                        format!("Token limit reached: at most {limit} tokens per minute per user of {model}. Retry in {wait} s.")
                    } else {
                        format!("Token limit reached: {model} serves at most {limit} tokens per minute. Retry in {wait} s.")
                    },
                })
            }
        }
    }

    fn settle_tokens(&self, reservation: TokenReservation, tokens: u64) {
        let (now, _) = window_now(self.window);
        self.tokens.settle(&reservation, now, tokens);
    }

    fn begin_request(&self, user: &str) -> Result<Option<InFlightPermit>, Limited> {
        if self.max_in_flight == 0 {
            return Ok(None);
        }
        let mut map = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(user.to_string()).or_insert(0);
        if *n >= self.max_in_flight {
            return Err(Limited {
                limit: "max_concurrent_per_user",
                retry_after: Duration::from_secs(1),
                message: format!(
                    "Concurrency limit reached: at most {} requests in flight per user. Wait for \
                     one to finish, then retry.",
                    self.max_in_flight
                ),
            });
        }
        *n += 1;
        Ok(Some(InFlightPermit {
            counts: self.in_flight.clone(),
            user: user.to_string(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_in_flight: u32) -> MemoryLimits {
        MemoryLimits::new(0, 0, 0, Duration::from_secs(3600), max_in_flight)
    }

    #[test]
    fn concurrent_reservations_admit_no_more_than_the_budget() {
        let l = limits(0);
        let admitted: Vec<_> = (0..50)
            .filter_map(|_| l.reserve_tokens("u", "m", None, Some(1000), 100).ok())
            .collect();
        assert_eq!(admitted.len(), 10);
        // Real usage replaces the estimates: five requests used nothing, so there is room.
        for r in admitted.into_iter().take(5).flatten() {
            l.settle_tokens(r, 0);
        }
        let more = (0..50)
            .filter(|_| l.reserve_tokens("u", "m", None, Some(1000), 100).is_ok())
            .count();
        assert_eq!(more, 5);
        // Another user of the model has a budget of their own; a model-wide limit counts all.
        assert!(l.reserve_tokens("v", "m", None, Some(1000), 100).is_ok());
        assert!(l.reserve_tokens("v", "m", Some(500), None, 400).is_ok());
        let e = l
            .reserve_tokens("w", "m", Some(500), None, 200)
            .unwrap_err();
        assert_eq!(e.limit, "tokens_per_minute");
    }

    #[test]
    fn a_request_larger_than_the_budget_runs_in_an_empty_window_and_counts_saturate() {
        let l = limits(0);
        let r = l.reserve_tokens("u", "m", None, Some(10), 1000).unwrap();
        assert!(l.reserve_tokens("u", "m", None, Some(10), 1).is_err());
        l.settle_tokens(r.unwrap(), u64::MAX);
        assert!(l.reserve_tokens("u", "m", None, Some(10), 1).is_err());
        assert!(l.reserve_tokens("u", "m", None, None, 1).unwrap().is_none());
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
}
