//! The rate limits, counted in Redis when replicas share them (`state.redis`), in this process
//! otherwise. Each check is one round trip: a Lua script that reads, decides and counts in one
//! step, on Redis's clock, so replicas on several hosts agree.
//!
//! - requests per second (per user, per address): GCRA, one key per user or address holding
//!   its "theoretical arrival time"; the same burst as the in-process limiter;
//! - requests in flight per user: a sorted set of slots scored by their expiry, taken in the
//!   same script as the user's rate check (one round trip per request for both); a replica
//!   renews the slots it holds every third of `slot_ttl`, so a replica killed with `kill -9`
//!   leaks its slots for at most `slot_ttl`;
//! - tokens per minute: one counter per budget and window, expiring after two windows; a
//!   request reserves its estimate and settles with its real count, as in one process.
//!
//! While Redis cannot answer, `state.redis.on_error` decides: `open` counts in this process
//! (so each replica allows the whole limit meanwhile), `closed` refuses with 503.

use super::limits::{
    too_fast, too_fast_from, too_many_in_flight, window_now, LimitSettings, Limited, LocalPermit,
    LocalReservation, MemoryLimits, TokenBudgets,
};
use crate::config::OnRedisError;
use crate::state::{SharedState, Unavailable};
use redis::Script;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

/// A request: GCRA on a rate (when KEYS[1], the key holding the "theoretical arrival time",
/// is given), then a request-in-flight slot (when KEYS[2] is given: the user's set). ARGV:
/// emission interval (µs) and burst, the most slots, the slot's name, its time to live in
/// ms. Returns 0 when admitted, -1 when the user holds the most slots, else the µs to wait for
/// the rate.
static ADMIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
if KEYS[1] ~= '' then
  local interval = tonumber(ARGV[1])
  local tat = tonumber(redis.call('GET', KEYS[1]) or now)
  if tat < now then tat = now end
  local new_tat = tat + interval
  local over = new_tat - now - tonumber(ARGV[2]) * interval
  if over > 0 then return over end
  redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
end
if KEYS[2] ~= '' then
  local ms = math.floor(now / 1000)
  local ttl = tonumber(ARGV[5])
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ms)
  if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[3]) then return -1 end
  redis.call('ZADD', KEYS[2], ms + ttl, ARGV[4])
  redis.call('PEXPIRE', KEYS[2], ttl)
end
return 0
",
    )
});

/// Renews held slots. KEYS: the sets; ARGV[1]: time to live in ms, then one slot name per key.
static RENEW_SLOTS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
for i, k in ipairs(KEYS) do
  redis.call('ZADD', k, 'XX', now + ttl, ARGV[i + 1])
  redis.call('PEXPIRE', k, ttl)
end
return 0
",
    )
});

/// Reserves tokens against budgets. KEYS: the window's counters. ARGV: the estimate, the
/// counters' time to live in ms, then one limit per key. Returns 0, or the 1-based index of
/// the first budget spent (a budget with nothing counted admits any request).
static RESERVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local est = tonumber(ARGV[1])
for i, k in ipairs(KEYS) do
  local n = tonumber(redis.call('GET', k) or '0')
  if n > 0 and n + est > tonumber(ARGV[i + 2]) then return i end
end
for i, k in ipairs(KEYS) do
  redis.call('INCRBY', k, est)
  redis.call('PEXPIRE', k, tonumber(ARGV[2]))
end
return 0
",
    )
});

/// Adds ARGV[1] (negative to give back) to every counter of KEYS, never below 0; ARGV[2]: the
/// counters' time to live in ms.
static ADJUST: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
for _, k in ipairs(KEYS) do
  if redis.call('INCRBY', k, ARGV[1]) < 0 then redis.call('SET', k, 0) end
  redis.call('PEXPIRE', k, tonumber(ARGV[2]))
end
return 0
",
    )
});

/// The limits a request passes, in Redis or in this process.
pub struct Limiter {
    /// The settings, and the counts while there is no Redis (or it cannot answer).
    local: MemoryLimits,
    shared: Option<Arc<RedisLimits>>,
}

/// Tokens a request reserved.
#[derive(Debug)]
pub enum TokenReservation {
    Local(LocalReservation),
    Shared(SharedReservation),
}

/// One of a user's requests in flight, given back when dropped.
#[derive(Debug)]
pub enum InFlightPermit {
    Local(LocalPermit),
    Shared(SharedSlot),
}

impl Limiter {
    /// Limits counted in this process.
    pub fn local(settings: LimitSettings) -> Limiter {
        Limiter {
            local: MemoryLimits::with(settings),
            shared: None,
        }
    }

    /// Limits counted in the replicas' Redis.
    pub fn shared(settings: LimitSettings, state: Arc<SharedState>) -> Limiter {
        Limiter {
            local: MemoryLimits::with(settings),
            shared: Some(Arc::new(RedisLimits::new(state))),
        }
    }

    /// Redis's answer, or, when it has none, what `on_error` says: `Ok(None)` to count in this
    /// process, or a refusal.
    fn or_local<T>(
        &self,
        state: &SharedState,
        answer: Result<T, Unavailable>,
    ) -> Result<Option<T>, Limited> {
        match answer {
            Ok(t) => Ok(Some(t)),
            Err(Unavailable) if state.on_error == OnRedisError::Open => Ok(None),
            Err(Unavailable) => Err(Limited {
                limit: UNAVAILABLE,
                retry_after: Duration::from_secs(1),
                message: "The gateway cannot reach the store of its rate limits; retry shortly."
                    .into(),
            }),
        }
    }

    /// Counts a request of `user` against the per-user rate and, with `slot`, holds one of
    /// their requests in flight until the permit is dropped; or refuses (in Redis: one round
    /// trip for both).
    pub async fn admit_user(
        &self,
        user: &str,
        slot: bool,
    ) -> Result<Option<InFlightPermit>, Limited> {
        let s = self.local.settings();
        let max = if slot { s.max_in_flight } else { 0 };
        if s.user_rps == 0 && max == 0 {
            return Ok(None);
        }
        if let Some(shared) = &self.shared {
            let rate = (s.user_rps > 0).then(|| (format!("rps:u:{user}"), s.user_rps, s.user_rps));
            let slot = (max > 0).then(|| (format!("inflight:{user}"), max));
            let answer = shared.admit(rate, slot).await;
            if let Some(admitted) = self.or_local(&shared.state, answer)? {
                return match admitted {
                    Admitted::Yes(slot) => Ok(slot.map(InFlightPermit::Shared)),
                    Admitted::TooFast(wait) => Err(too_fast(s.user_rps, wait)),
                    Admitted::TooMany => Err(too_many_in_flight(max)),
                };
            }
        }
        self.local.check_user(user)?;
        if max == 0 {
            return Ok(None);
        }
        Ok(self.local.begin_request(user)?.map(InFlightPermit::Local))
    }

    /// Counts a request from `ip` against the per-address rate, or refuses it.
    pub async fn check_ip(&self, ip: IpAddr) -> Result<(), Limited> {
        let s = self.local.settings();
        if let (Some(shared), true) = (&self.shared, s.ip_rps > 0) {
            let rate = (format!("rps:a:{ip}"), s.ip_rps, s.ip_burst.max(s.ip_rps));
            let answer = shared.admit(Some(rate), None).await;
            if let Some(admitted) = self.or_local(&shared.state, answer)? {
                return match admitted {
                    Admitted::TooFast(wait) => Err(too_fast_from(s.ip_rps, wait)),
                    _ => Ok(()),
                };
            }
        }
        self.local.check_ip(ip)
    }

    /// Before a request: reserves `estimate` tokens against `model_tpm` (everyone's) and
    /// `user_tpm` (this user's of the model) at once, or refuses. `None` when neither applies.
    pub async fn reserve_tokens(
        &self,
        user: &str,
        model: &str,
        model_tpm: Option<u64>,
        user_tpm: Option<u64>,
        estimate: u64,
    ) -> Result<Option<TokenReservation>, Limited> {
        let budgets = TokenBudgets::new(user, model, model_tpm, user_tpm);
        if budgets.is_empty() {
            return Ok(None);
        }
        if let Some(shared) = &self.shared {
            let window = self.local.settings().window;
            let answer = shared.reserve(&budgets, estimate, window).await;
            if let Some(reserved) = self.or_local(&shared.state, answer)? {
                return reserved.map(|r| Some(TokenReservation::Shared(r)));
            }
        }
        Ok(self
            .local
            .reserve_tokens(budgets, estimate)?
            .map(TokenReservation::Local))
    }

    /// After a request: its real tokens replace what it reserved (in Redis, by a task of its
    /// own, so that the end of a request never waits on Redis).
    pub fn settle_tokens(&self, reservation: TokenReservation, tokens: u64) {
        match (reservation, &self.shared) {
            (TokenReservation::Local(r), _) => self.local.settle_tokens(r, tokens),
            (TokenReservation::Shared(r), Some(shared)) => {
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    let (shared, window) = (shared.clone(), self.local.settings().window);
                    runtime.spawn(async move { shared.settle(r, tokens, window).await });
                }
            }
            (TokenReservation::Shared(_), None) => {}
        }
    }

    /// Applies new limits (a configuration reload); requests in flight and tokens counted in
    /// the current window stay counted.
    pub fn reconfigure(&self, settings: LimitSettings) {
        self.local.reconfigure(settings);
    }

    /// Keeps this replica's request-in-flight slots alive in Redis until `stop` (a background
    /// loop; nothing to do without Redis).
    pub async fn renew_slots(&self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let Some(shared) = &self.shared else {
            return;
        };
        let mut tick = tokio::time::interval(shared.state.slot_ttl / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => shared.renew().await,
                _ = stop.changed() => return,
            }
        }
    }
}

/// The `limit` of a refusal because Redis cannot answer (`on_error: closed`): a 503.
pub const UNAVAILABLE: &str = "limits_unavailable";

/// Redis's answer to a user's request.
enum Admitted {
    /// Admitted, with its slot when one was asked for.
    Yes(Option<SharedSlot>),
    /// Over the rate: the time to wait.
    TooFast(Duration),
    /// Holding the most requests in flight.
    TooMany,
}

/// The counters in Redis.
struct RedisLimits {
    state: Arc<SharedState>,
    /// The slots this replica holds: name → set.
    held: Arc<Mutex<HashMap<String, String>>>,
    /// Names slots uniquely across replicas.
    replica: String,
    next_slot: AtomicU64,
}

/// Tokens reserved in Redis: the counters, their window and the estimate.
#[derive(Debug)]
pub struct SharedReservation {
    keys: Vec<String>,
    window: u64,
    tokens: u64,
    budgets: TokenBudgets,
}

/// A request-in-flight slot in Redis; removed when dropped.
pub struct SharedSlot {
    name: String,
    set: String,
    held: Arc<Mutex<HashMap<String, String>>>,
    state: Arc<SharedState>,
}

impl std::fmt::Debug for SharedSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedSlot")
            .field("name", &self.name)
            .finish()
    }
}

impl Drop for SharedSlot {
    fn drop(&mut self) {
        self.held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.name);
        // Outside a runtime (never on the request path) the slot just expires.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (state, set, name) = (self.state.clone(), self.set.clone(), self.name.clone());
            runtime.spawn(async move {
                let _ = state
                    .call("release_slot", |mut conn| async move {
                        redis::cmd("ZREM")
                            .arg(&set)
                            .arg(&name)
                            .query_async::<i64>(&mut conn)
                            .await
                    })
                    .await;
            });
        }
    }
}

impl RedisLimits {
    fn new(state: Arc<SharedState>) -> RedisLimits {
        RedisLimits {
            state,
            held: Arc::default(),
            replica: format!("{:016x}", fastrand::u64(..)),
            next_slot: AtomicU64::new(0),
        }
    }

    /// A request: counted against `rate` (key, requests per second, burst), and given a slot
    /// in `slot` (the user's set, the most they may hold), each when given.
    async fn admit(
        &self,
        rate: Option<(String, u32, u32)>,
        slot: Option<(String, u32)>,
    ) -> Result<Admitted, Unavailable> {
        let (rate_key, rps, burst) = rate.map_or((String::new(), 0, 0), |(k, r, b)| {
            (self.state.key(&k), r, b)
        });
        let (set, max) = slot.map_or((String::new(), 0), |(k, m)| (self.state.key(&k), m));
        let name = format!(
            "{}:{}",
            self.replica,
            self.next_slot.fetch_add(1, Ordering::Relaxed)
        );
        let interval = 1_000_000 / u64::from(rps.max(1));
        let ttl = self.state.slot_ttl.as_millis() as u64;
        let (s, n) = (set.clone(), name.clone());
        let answer: i64 = self
            .state
            .call("admit", |mut conn| async move {
                ADMIT
                    .key(rate_key)
                    .key(s)
                    .arg(interval)
                    .arg(burst)
                    .arg(max)
                    .arg(n)
                    .arg(ttl)
                    .invoke_async(&mut conn)
                    .await
            })
            .await?;
        Ok(match answer {
            -1 => Admitted::TooMany,
            0 if max == 0 => Admitted::Yes(None),
            0 => {
                self.held
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(name.clone(), set.clone());
                Admitted::Yes(Some(SharedSlot {
                    name,
                    set,
                    held: self.held.clone(),
                    state: self.state.clone(),
                }))
            }
            wait => Admitted::TooFast(Duration::from_micros(wait.unsigned_abs())),
        })
    }

    /// Renews every slot this replica holds (one call).
    async fn renew(&self) {
        let held: Vec<(String, String)> = self
            .held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(n, s)| (n.clone(), s.clone()))
            .collect();
        if held.is_empty() {
            return;
        }
        let ttl = self.state.slot_ttl.as_millis() as u64;
        let _ = self
            .state
            .call("renew_slots", |mut conn| async move {
                let mut call = RENEW_SLOTS.prepare_invoke();
                call.arg(ttl);
                for (name, set) in &held {
                    call.key(set).arg(name);
                }
                call.invoke_async::<i64>(&mut conn).await
            })
            .await;
    }

    /// The Redis counters of `budgets` in window `window`.
    fn counters(&self, budgets: &TokenBudgets, window: u64) -> Vec<String> {
        budgets
            .0
            .iter()
            .map(|(k, _)| self.state.key(&format!("tpm:{window}:{k}")))
            .collect()
    }

    /// Reserves `estimate` against every budget, or names the first one spent.
    async fn reserve(
        &self,
        budgets: &TokenBudgets,
        estimate: u64,
        window: Duration,
    ) -> Result<Result<SharedReservation, Limited>, Unavailable> {
        let (n, left) = window_now(window);
        let keys = self.counters(budgets, n);
        let ttl = 2 * window.as_millis() as u64;
        let (k, limits) = (
            keys.clone(),
            budgets.0.iter().map(|(_, l)| *l).collect::<Vec<_>>(),
        );
        let refused: usize = self
            .state
            .call("reserve_tokens", |mut conn| async move {
                let mut call = RESERVE.prepare_invoke();
                call.arg(estimate).arg(ttl);
                for (key, limit) in k.iter().zip(&limits) {
                    call.key(key).arg(limit);
                }
                call.invoke_async(&mut conn).await
            })
            .await?;
        if refused > 0 {
            return Ok(Err(budgets.refusal(refused - 1, left)));
        }
        Ok(Ok(SharedReservation {
            keys,
            window: n,
            tokens: estimate,
            budgets: budgets.clone(),
        }))
    }

    /// Replaces the estimate by the real count: in the reservation's window if it is still
    /// the current one, else the real count goes to the current window.
    async fn settle(&self, r: SharedReservation, tokens: u64, window: Duration) {
        let (now, _) = window_now(window);
        let (keys, delta) = if now == r.window {
            (r.keys, signed(tokens) - signed(r.tokens))
        } else {
            (self.counters(&r.budgets, now), signed(tokens))
        };
        if delta == 0 {
            return;
        }
        let ttl = 2 * window.as_millis() as u64;
        let _ = self
            .state
            .call("settle_tokens", |mut conn| async move {
                let mut call = ADJUST.prepare_invoke();
                call.arg(delta).arg(ttl);
                for key in &keys {
                    call.key(key);
                }
                call.invoke_async::<i64>(&mut conn).await
            })
            .await;
    }
}

/// Counts as Redis integers (absurd ones saturate).
fn signed(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
