//! The token cache: verdicts keyed by the SHA-256 of the token (the token itself is never
//! stored), one verification in flight per token however many requests wait for it.
//!
//! An admitted token lives min(TTL, its expiry); a refused one the negative TTL. Failures to
//! reach the identity provider are not cached, so the next request asks again. The verdicts
//! can be taken out and put back (with their expiry), to outlive a restart (`persist`).
//!
//! With `state.redis` the replicas share their verdicts too: a local miss asks Redis (same
//! format as the file, under the token's SHA-256) before the identity provider, and a new
//! verdict is written there. Redis failing only means asking the identity provider: a token is
//! never admitted without a verdict.

use super::persist::StoredVerdict;
use super::{AuthError, Identity};
use crate::config::TokenCacheConfig;
use crate::state::SharedState;
use moka::future::Cache;
use moka::Expiry;
use sha2::{Digest, Sha256};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// SHA-256 of a token: the only form in which a token is kept.
pub type TokenKey = [u8; 32];

pub fn token_key(token: &str) -> TokenKey {
    Sha256::digest(token.as_bytes()).into()
}

/// What was decided about a token.
#[derive(Debug, Clone)]
pub enum Verdict {
    Admitted(Arc<Identity>),
    Refused(AuthError),
}

/// A verdict and the Unix time it stops holding.
#[derive(Debug, Clone)]
pub struct Cached {
    pub verdict: Verdict,
    pub until: u64,
}

/// Whether a lookup was answered from the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    Hit,
    /// Found in the replicas' shared cache (Redis).
    Shared,
    /// This request verified the token (one introspection or JWT verification).
    Miss,
    /// Another request was verifying the same token; this one waited for its verdict.
    Joined,
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

struct UntilExpiry;

impl Expiry<TokenKey, Cached> for UntilExpiry {
    fn expire_after_create(&self, _key: &TokenKey, c: &Cached, _now: Instant) -> Option<Duration> {
        Some(Duration::from_secs(c.until.saturating_sub(unix_now())))
    }
}

pub struct TokenCache {
    cache: Cache<TokenKey, Cached>,
    ttl: Duration,
    negative_ttl: Duration,
    /// The replicas' verdicts, when they share them.
    shared: Option<Arc<SharedState>>,
}

impl TokenCache {
    pub fn new(cfg: &TokenCacheConfig) -> Self {
        TokenCache {
            cache: Cache::builder()
                .max_capacity(cfg.max_entries)
                .expire_after(UntilExpiry)
                .build(),
            ttl: cfg.ttl,
            negative_ttl: cfg.negative_ttl,
            shared: None,
        }
    }

    /// Shares verdicts with the other replicas through Redis.
    pub fn share(&mut self, state: Arc<SharedState>) {
        self.shared = Some(state);
    }

    /// The verdict another replica reached, if Redis holds one still holding.
    async fn shared_verdict(&self, state: &SharedState, key: &TokenKey) -> Option<Cached> {
        let redis_key = state.key(&format!("auth:{}", hex::encode(key)));
        let text = state
            .call("auth_get", |mut conn| async move {
                redis::cmd("GET")
                    .arg(redis_key)
                    .query_async::<Option<String>>(&mut conn)
                    .await
            })
            .await
            .ok()??;
        let stored: StoredVerdict = serde_json::from_str(&text).ok()?;
        let (stored_key, cached) = stored.into_cached()?;
        (stored_key == *key && cached.until > unix_now()).then_some(cached)
    }

    /// Hands a new verdict to the other replicas (by a task of its own: nobody waits on it).
    fn publish(&self, state: &Arc<SharedState>, key: &TokenKey, cached: &Cached) {
        let left = cached.until.saturating_sub(unix_now());
        let Some(stored) = StoredVerdict::of(key, cached).filter(|_| left > 0) else {
            return;
        };
        let Ok(text) = serde_json::to_string(&stored) else {
            return;
        };
        let (state, redis_key) = (state.clone(), state.key(&format!("auth:{}", stored.key)));
        tokio::spawn(async move {
            let _ = state
                .call("auth_set", |mut conn| async move {
                    redis::cmd("SET")
                        .arg(redis_key)
                        .arg(text)
                        .arg("EX")
                        .arg(left)
                        .query_async::<()>(&mut conn)
                        .await
                })
                .await;
        });
    }

    /// How long a new verdict holds: an admission min(TTL, the token's expiry), a refusal the
    /// negative TTL.
    fn until(&self, verdict: &Verdict) -> u64 {
        let now = unix_now();
        match verdict {
            Verdict::Admitted(id) => id.expires_at.min(now.saturating_add(self.ttl.as_secs())),
            Verdict::Refused(_) => now.saturating_add(self.negative_ttl.as_secs()),
        }
    }

    /// The cached verdict, or the one `verify()` reaches (shared by every concurrent caller
    /// with the same key). An `Err` from it is returned to all of them and not cached.
    ///
    /// `verify` is called only on a miss, and the miss runs boxed: an introspection's future
    /// is several KiB, and held inline it would make every request's future (moved and copied
    /// on each request) that much larger for the cache hit nearly all of them are.
    pub async fn get_or_verify<F>(
        &self,
        key: TokenKey,
        verify: impl FnOnce() -> F,
    ) -> (Result<Verdict, AuthError>, CacheOutcome)
    where
        F: Future<Output = Result<Verdict, AuthError>>,
    {
        if let Some(c) = self.cache.get(&key).await {
            return (Ok(c.verdict), CacheOutcome::Hit);
        }
        Box::pin(async move {
            let from_shared = AtomicBool::new(false);
            // Only the request whose lookup runs is a miss; the others waiting on it joined it.
            let ran = AtomicBool::new(false);
            let result = self
                .cache
                .try_get_with(key, async {
                    ran.store(true, Ordering::Relaxed);
                    if let Some(state) = &self.shared {
                        if let Some(cached) = self.shared_verdict(state, &key).await {
                            from_shared.store(true, Ordering::Relaxed);
                            return Ok(cached);
                        }
                    }
                    let verdict = verify().await?;
                    let until = self.until(&verdict);
                    let cached = Cached { verdict, until };
                    if let Some(state) = &self.shared {
                        self.publish(state, &key, &cached);
                    }
                    Ok(cached)
                })
                .await
                .map(|c| c.verdict)
                .map_err(|e: Arc<AuthError>| (*e).clone());
            let outcome = if !ran.load(Ordering::Relaxed) {
                CacheOutcome::Joined
            } else if from_shared.load(Ordering::Relaxed) {
                CacheOutcome::Shared
            } else {
                CacheOutcome::Miss
            };
            (result, outcome)
        })
        .await
    }

    /// Every verdict still holding.
    pub fn entries(&self) -> Vec<(TokenKey, Cached)> {
        let now = unix_now();
        self.cache
            .iter()
            .filter(|(_, c)| c.until > now)
            .map(|(k, c)| (*k, c))
            .collect()
    }

    /// Puts verdicts back (those still holding).
    pub async fn restore(&self, entries: Vec<(TokenKey, Cached)>) -> usize {
        let now = unix_now();
        let mut restored = 0;
        for (key, c) in entries.into_iter().filter(|(_, c)| c.until > now) {
            self.cache.insert(key, c).await;
            restored += 1;
        }
        restored
    }
}
