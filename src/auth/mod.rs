//! Authentication and authorization: the bearer token is checked once (Globus introspection
//! or JWT verification), the verdict cached under the token's SHA-256, and the facility's
//! rules applied in FIRST's order. Fails closed: when the identity provider cannot be asked,
//! tokens not in the cache are refused with 503; cached ones keep working.

mod cache;
mod error;
mod globus;
mod identity;
mod jwt;
pub mod persist;
pub mod rules;

pub use cache::{token_key, CacheOutcome, TokenKey};
pub use error::AuthError;
pub use globus::{GlobusClient, GlobusError};
pub use identity::Identity;

use crate::config::{AccessRules, AuthConfig, AuthMode};
use cache::{unix_now, TokenCache, Verdict};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use std::num::NonZeroU32;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// A problem with the `auth:` configuration found at start-up.
#[derive(Debug, thiserror::Error)]
#[error("auth.{field}: {message}")]
pub struct AuthSetupError {
    pub field: &'static str,
    pub message: String,
}

enum Verifier {
    None,
    Globus {
        client: GlobusClient,
        /// Introspections started per second, across the process.
        introspections: DefaultDirectRateLimiter,
        /// Longest wait for an introspection slot.
        wait: Duration,
        policies: Vec<String>,
        required_scope: Option<String>,
        audience: Option<String>,
        /// Group memberships are fetched only when a rule needs them.
        needs_groups: bool,
    },
    Jwt(jwt::JwtVerifier),
}

/// Checks tokens and applies the facility's rules.
pub struct Authenticator {
    verifier: Verifier,
    cache: TokenCache,
    rules: AccessRules,
}

impl Authenticator {
    /// Builds the authenticator; `uses_acl_groups` says whether any cluster or model restricts
    /// by group (then memberships are needed even without a global group rule).
    pub fn new(cfg: &AuthConfig, uses_acl_groups: bool) -> Result<Self, AuthSetupError> {
        let verifier = match cfg.mode {
            AuthMode::None => Verifier::None,
            AuthMode::Globus => {
                let g = cfg.globus.as_ref().ok_or_else(|| AuthSetupError {
                    field: "globus",
                    message: "mode is globus but the `globus:` section is missing".into(),
                })?;
                let secret = std::env::var(&g.client_secret_env).map_err(|_| AuthSetupError {
                    field: "globus.client_secret_env",
                    message: format!(
                        "the environment variable {} is not set; export the Globus client secret in it",
                        g.client_secret_env
                    ),
                })?;
                let client = GlobusClient::new(g, secret).map_err(|e| AuthSetupError {
                    field: "globus",
                    message: e.to_string(),
                })?;
                let per_second =
                    NonZeroU32::new(g.max_introspections_per_second).unwrap_or(NonZeroU32::MIN);
                Verifier::Globus {
                    client,
                    introspections: RateLimiter::direct(Quota::per_second(per_second)),
                    wait: g.introspection_wait,
                    policies: g.policies.clone(),
                    required_scope: g.required_scope.clone(),
                    audience: g.audience.clone(),
                    needs_groups: uses_acl_groups || cfg.rules.uses_groups(),
                }
            }
            AuthMode::Jwt => {
                let j = cfg.jwt.as_ref().ok_or_else(|| AuthSetupError {
                    field: "jwt",
                    message: "mode is jwt but the `jwt:` section is missing".into(),
                })?;
                Verifier::Jwt(jwt::JwtVerifier::new(j).map_err(|e| AuthSetupError {
                    field: "jwt",
                    message: e.to_string(),
                })?)
            }
        };
        Ok(Authenticator {
            verifier,
            cache: TokenCache::new(&cfg.cache),
            rules: cfg.rules.clone(),
        })
    }

    /// Shares token verdicts with the other replicas through Redis (`state.redis`).
    pub fn share_verdicts(&mut self, state: std::sync::Arc<crate::state::SharedState>) {
        self.cache.share(state);
    }

    /// Whether tokens are checked at all (`mode: none` accepts anything).
    pub fn is_enforcing(&self) -> bool {
        !matches!(self.verifier, Verifier::None)
    }

    /// Authenticates the `Authorization` header value of a request.
    pub async fn authenticate(
        &self,
        authorization: Option<&[u8]>,
    ) -> (Result<Arc<Identity>, AuthError>, Option<CacheOutcome>) {
        self.authenticate_token(bearer_token(authorization)).await
    }

    /// Authenticates an `x-api-key` header value (how older Anthropic clients send the same
    /// token): the token itself, without a scheme.
    pub async fn authenticate_api_key(
        &self,
        key: &[u8],
    ) -> (Result<Arc<Identity>, AuthError>, Option<CacheOutcome>) {
        let token = std::str::from_utf8(key)
            .map(str::trim)
            .ok()
            .filter(|t| !t.is_empty() && !t.contains(' '))
            .ok_or(AuthError::MalformedHeader);
        self.authenticate_token(token).await
    }

    async fn authenticate_token(
        &self,
        token: Result<&str, AuthError>,
    ) -> (Result<Arc<Identity>, AuthError>, Option<CacheOutcome>) {
        if let Verifier::None = self.verifier {
            return (Ok(anonymous()), None);
        }
        let token =
            match token.and_then(|t| plausible(t, matches!(self.verifier, Verifier::Jwt(_)))) {
                Ok(t) => t,
                Err(e) => return (Err(e), None),
            };
        let (verdict, outcome) = self
            .cache
            .get_or_verify(token_key(token), || self.verify(token))
            .await;
        let result = match verdict {
            Ok(Verdict::Admitted(identity)) if identity.expires_at <= unix_now() => {
                Err(AuthError::Expired)
            }
            Ok(Verdict::Admitted(identity)) => Ok(identity),
            Ok(Verdict::Refused(e)) | Err(e) => Err(e),
        };
        (result, Some(outcome))
    }

    /// The full check of one token (a cache miss).
    async fn verify(&self, token: &str) -> Result<Verdict, AuthError> {
        let identity = match &self.verifier {
            Verifier::None => return Ok(Verdict::Admitted(anonymous())),
            Verifier::Jwt(v) => match v.verify(token).await {
                Ok(mut id) => match rules::check_jwt_identity(&mut id, &self.rules) {
                    Ok(()) => id,
                    Err(e) => return Ok(Verdict::Refused(e)),
                },
                Err(e @ AuthError::Unavailable(_)) => return Err(e),
                Err(e) => return Ok(Verdict::Refused(e)),
            },
            Verifier::Globus {
                client,
                introspections,
                wait,
                policies,
                required_scope,
                audience,
                needs_groups,
            } => {
                tokio::time::timeout(*wait, introspections.until_ready())
                    .await
                    .map_err(|_| AuthError::Throttled)?;
                let intro = client.introspect(token).await.map_err(unavailable)?;
                if let Some(refused) =
                    check_introspection(&intro, required_scope.as_deref(), audience.as_deref())
                {
                    return Ok(Verdict::Refused(refused));
                }
                let mut identity = match rules::identify_globus(&intro, &self.rules, policies) {
                    Ok(id) => id,
                    Err(e) => return Ok(Verdict::Refused(e)),
                };
                if *needs_groups {
                    identity.groups = match client.groups(token).await {
                        Ok(g) => g,
                        Err(GlobusError::GrantRefused) => {
                            return Ok(Verdict::Refused(AuthError::forbidden(
                                "groups",
                                "Globus would not share your group memberships with this gateway \
                                 (dependent-token grant refused). Log in again and consent.",
                            )))
                        }
                        Err(e) => return Err(unavailable(e)),
                    };
                }
                identity
            }
        };
        Ok(match rules::check_groups_and_name(&identity, &self.rules) {
            Ok(()) => Verdict::Admitted(Arc::new(identity)),
            Err(e) => Verdict::Refused(e),
        })
    }
}

impl Authenticator {
    /// Writes the verdicts in force to `path` (see `persist`).
    pub fn save_verdicts(&self, path: &Path) -> std::io::Result<usize> {
        let entries = self.cache.entries();
        persist::save(path, &entries)?;
        Ok(entries.len())
    }

    /// Puts back the verdicts `path` holds that still hold.
    pub async fn restore_verdicts(&self, path: &Path) -> std::io::Result<usize> {
        let entries = persist::load(path)?;
        Ok(self.cache.restore(entries).await)
    }
}

/// A bearer string that can be a token at all: the characters of RFC 6750's `b64token`, at
/// most 4 KiB, and for JWT three dot-separated parts. Anything else is refused before any
/// call to the identity provider.
fn plausible(token: &str, jwt: bool) -> Result<&str, AuthError> {
    let b64token = |c: u8| c.is_ascii_alphanumeric() || b"-._~+/=".contains(&c);
    let shaped = token.len() <= 4096
        && token.bytes().all(b64token)
        && (!jwt || token.bytes().filter(|c| *c == b'.').count() == 2);
    shaped.then_some(token).ok_or(AuthError::InvalidToken)
}

fn anonymous() -> Arc<Identity> {
    static ANON: std::sync::OnceLock<Arc<Identity>> = std::sync::OnceLock::new();
    ANON.get_or_init(|| Arc::new(Identity::anonymous())).clone()
}

fn unavailable(e: GlobusError) -> AuthError {
    log::error!("Globus call failed: {e}");
    AuthError::Unavailable(e.to_string())
}

/// Active, not expired, and (when configured) for our scope and audience.
fn check_introspection(
    intro: &globus::Introspection,
    required_scope: Option<&str>,
    audience: Option<&str>,
) -> Option<AuthError> {
    if !intro.active {
        return Some(AuthError::InvalidToken);
    }
    if intro.exp.is_none_or(|exp| exp <= unix_now()) {
        return Some(AuthError::Expired);
    }
    if let Some(scope) = required_scope {
        let has = intro
            .scope
            .as_deref()
            .is_some_and(|s| s.split(' ').any(|x| x == scope));
        if !has {
            return Some(AuthError::WrongAudience(format!(
                "it lacks the scope {scope}"
            )));
        }
    }
    if let Some(aud) = audience {
        if !intro.aud.as_ref().is_some_and(|a| a.contains(aud)) {
            return Some(AuthError::WrongAudience(format!(
                "its audience does not include {aud}"
            )));
        }
    }
    None
}

/// `Bearer <token>` (scheme case-insensitive).
fn bearer_token(header: Option<&[u8]>) -> Result<&str, AuthError> {
    let value = header.ok_or(AuthError::MissingToken)?;
    let value = std::str::from_utf8(value)
        .map_err(|_| AuthError::MalformedHeader)?
        .trim();
    let (scheme, token) = value.split_once(' ').ok_or(AuthError::MalformedHeader)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() || token.contains(' ') {
        return Err(AuthError::MalformedHeader);
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn implausible_tokens_are_refused_before_any_call() {
        assert_eq!(plausible("AgXy12_z-3.0+/=", false), Ok("AgXy12_z-3.0+/="));
        for bad in ["tok\"en", "t\u{e9}", "a;b", &"x".repeat(5000)] {
            assert_eq!(plausible(bad, false), Err(AuthError::InvalidToken), "{bad}");
        }
        assert!(plausible("aaa.bbb.ccc", true).is_ok());
        assert_eq!(plausible("aaabbbccc", true), Err(AuthError::InvalidToken));
    }

    #[test]
    fn bearer_headers() {
        assert_eq!(bearer_token(Some(b"Bearer abc")), Ok("abc"));
        assert_eq!(bearer_token(Some(b"bearer  abc ")), Ok("abc"));
        assert_eq!(bearer_token(None), Err(AuthError::MissingToken));
        for bad in [&b"Basic abc"[..], b"Bearer", b"Bearer a b", b"abc"] {
            assert_eq!(bearer_token(Some(bad)), Err(AuthError::MalformedHeader));
        }
    }
}
