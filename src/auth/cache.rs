//! The token cache: verdicts keyed by the SHA-256 of the token (the token itself is never
//! stored), one verification in flight per token however many requests wait for it.
//!
//! An admitted token lives min(TTL, its expiry); a refused one the negative TTL. Failures to
//! reach the identity provider are not cached, so the next request asks again.

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

struct VerdictExpiry {
    ttl: Duration,
    negative_ttl: Duration,
}

impl Expiry<TokenKey, Verdict> for VerdictExpiry {
    fn expire_after_create(
        &self,
        _key: &TokenKey,
        verdict: &Verdict,
        _now: Instant,
    ) -> Option<Duration> {
        Some(match verdict {
            Verdict::Admitted(id) => {
                let left = Duration::from_secs(id.expires_at.saturating_sub(unix_now()));
                self.ttl.min(left)
            }
            Verdict::Refused(_) => self.negative_ttl,
        })
    }
}

pub struct TokenCache {
    cache: Cache<TokenKey, Verdict>,
}

impl TokenCache {
    pub fn new(cfg: &TokenCacheConfig) -> Self {
        TokenCache {
            cache: Cache::builder()
                .max_capacity(cfg.max_entries)
                .expire_after(VerdictExpiry {
                    ttl: cfg.ttl,
                    negative_ttl: cfg.negative_ttl,
                })
                .build(),
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
        if let Some(v) = self.cache.get(&key).await {
            return (Ok(v), CacheOutcome::Hit);
        }
        let result = self
            .cache
            .try_get_with(key, verify)
            .await
            .map_err(|e: Arc<AuthError>| (*e).clone());
        (result, CacheOutcome::Miss)
    }
}
