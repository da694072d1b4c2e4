//! Rate limits, in memory behind a trait (state shared across replicas can come later):
//! requests per second per user (FIRST's default 10), per client address on every route, and
//! tokens per minute per model and per user of a model (FIRST's `tpm_model` / `tpm_user`:
//! checked before a request, counted after it).

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
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
    /// Before a request: `model_tpm` for everyone, `user_tpm` per user of the model.
    fn check_tokens(
        &self,
        user: &str,
        model: &str,
        model_tpm: Option<u64>,
        user_tpm: Option<u64>,
    ) -> Result<(), Limited>;
    /// After a request: its tokens.
    fn add_tokens(&self, user: &str, model: &str, tokens: u64);
}

/// Token counts in the current window, per key.
#[derive(Default)]
struct TokenWindows(Mutex<HashMap<String, (u64, u64)>>);

impl TokenWindows {
    fn used(&self, key: &str, window: u64) -> u64 {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.get(key)
            .filter(|(m, _)| *m == window)
            .map_or(0, |(_, n)| *n)
    }

    fn add(&self, key: String, window: u64, tokens: u64) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() > 100_000 {
            map.retain(|_, (m, _)| *m == window);
        }
        let e = map.entry(key).or_insert((window, 0));
        if e.0 != window {
            *e = (window, 0);
        }
        e.1 += tokens;
    }
}

pub struct MemoryLimits {
    per_user: Option<DefaultKeyedRateLimiter<String>>,
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
    pub fn new(user_rps: u32, ip_rps: u32, ip_burst: u32, window: Duration) -> Self {
        let ip_quota = |n| {
            let burst = NonZeroU32::new(ip_burst).map_or(n, |b| b.max(n));
            Quota::per_second(n).allow_burst(burst)
        };
        MemoryLimits {
            per_user: NonZeroU32::new(user_rps).map(|n| RateLimiter::keyed(Quota::per_second(n))),
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

    fn check_tokens(
        &self,
        user: &str,
        model: &str,
        model_tpm: Option<u64>,
        user_tpm: Option<u64>,
    ) -> Result<(), Limited> {
        let (window, left) = window_now(self.window);
        if let Some(limit) = model_tpm {
            if self.tokens.used(&format!("m\u{0}{model}"), window) >= limit {
                return Err(Limited {
                    limit: "tokens_per_minute",
                    retry_after: left,
                    message: format!("Token limit reached: {model} serves at most {limit} tokens per minute. Retry in {} s.", left.as_secs().max(1)),
                });
            }
        }
        if let Some(limit) = user_tpm {
            if self
                .tokens
                .used(&format!("u\u{0}{model}\u{0}{user}"), window)
                >= limit
            {
                return Err(Limited {
                    limit: "tokens_per_minute_per_user",
                    retry_after: left,
                    message: format!("Token limit reached: at most {limit} tokens per minute per user of {model}. Retry in {} s.", left.as_secs().max(1)),
                });
            }
        }
        Ok(())
    }

    fn add_tokens(&self, user: &str, model: &str, tokens: u64) {
        if tokens == 0 {
            return;
        }
        let (window, _) = window_now(self.window);
        self.tokens.add(format!("m\u{0}{model}"), window, tokens);
        self.tokens
            .add(format!("u\u{0}{model}\u{0}{user}"), window, tokens);
    }
}
