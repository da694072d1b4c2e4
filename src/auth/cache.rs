//! The token cache: verdicts keyed by the SHA-256 of the token (the token itself is never
//! stored), one verification in flight per token however many requests wait for it.
//!
//! An admitted token lives min(TTL, its expiry); a refused one the negative TTL. Failures to
//! reach the identity provider are not cached, so the next request asks again. The verdicts
//! can be taken out and put back (with their expiry), to outlive a restart (`persist`).

use super::{AuthError, Identity};
use crate::config::TokenCacheConfig;
use moka::future::Cache;
use moka::Expiry;
use sha2::{Digest, Sha256};
use std::future::Future;
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
    Miss,
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
        }
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

    /// The cached verdict, or the one `verify` reaches (shared by every concurrent caller
    /// with the same key). An `Err` from `verify` is returned to all of them and not cached.
    pub async fn get_or_verify<F>(
        &self,
        key: TokenKey,
        verify: F,
    ) -> (Result<Verdict, AuthError>, CacheOutcome)
    where
        F: Future<Output = Result<Verdict, AuthError>>,
    {
        if let Some(c) = self.cache.get(&key).await {
            return (Ok(c.verdict), CacheOutcome::Hit);
        }
        let result = self
            .cache
            .try_get_with(key, async {
                let verdict = verify.await?;
                let until = self.until(&verdict);
                Ok(Cached { verdict, until })
            })
            .await
            .map(|c| c.verdict)
            .map_err(|e: Arc<AuthError>| (*e).clone());
        (result, CacheOutcome::Miss)
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
