//! JWT verification for sites with their own OIDC provider: signature against the provider's
//! JWKS (cached; fetched again on an unknown `kid`, at most once per `jwks_min_refresh`),
//! issuer, audience, expiry with a small leeway. Only asymmetric algorithms are accepted.

use super::{AuthError, Identity};
use crate::config::JwtConfig;
use arc_swap::ArcSwap;
use futures_util::future::{BoxFuture, FutureExt, Shared};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// One fetch of the key set, awaited by every request that needs it.
type Fetch = Shared<BoxFuture<'static, Result<(), AuthError>>>;

pub struct JwtVerifier {
    cfg: JwtConfig,
    http: reqwest::Client,
    keys: Arc<ArcSwap<JwkSet>>,
    /// The latest fetch and when it started: requests within `jwks_min_refresh` share it
    /// instead of fetching again (the lock is never held across an await).
    last_fetch: Mutex<Option<(Instant, Fetch)>>,
}

const ASYMMETRIC: [Algorithm; 9] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

impl JwtVerifier {
    pub fn new(cfg: &JwtConfig) -> Result<Self, reqwest::Error> {
        Ok(JwtVerifier {
            cfg: cfg.clone(),
            http: reqwest::Client::builder().timeout(cfg.timeout).build()?,
            keys: Arc::new(ArcSwap::from_pointee(JwkSet { keys: Vec::new() })),
            last_fetch: Mutex::new(None),
        })
    }

    /// Verifies a token and turns its claims into an identity (rules are applied by the caller).
    pub async fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::InvalidToken)?;
        if !ASYMMETRIC.contains(&header.alg) {
            return Err(AuthError::InvalidToken);
        }
        let kid = header.kid.ok_or(AuthError::InvalidToken)?;
        let key = match self.key(&kid) {
            Some(k) => k,
            None => {
                self.refresh().await?;
                self.key(&kid).ok_or(AuthError::InvalidToken)?
            }
        };
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&self.cfg.issuer]);
        validation.set_audience(&[&self.cfg.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.leeway = self.cfg.leeway.as_secs();
        validation.validate_nbf = true;
        let data =
            jsonwebtoken::decode::<Map<String, Value>>(token, &key, &validation).map_err(|e| {
                use jsonwebtoken::errors::ErrorKind;
                match e.kind() {
                    ErrorKind::ExpiredSignature => AuthError::Expired,
                    ErrorKind::InvalidAudience => {
                        AuthError::WrongAudience(format!("audience is not {}", self.cfg.audience))
                    }
                    ErrorKind::InvalidIssuer => {
                        AuthError::WrongAudience(format!("issuer is not {}", self.cfg.issuer))
                    }
                    _ => AuthError::InvalidToken,
                }
            })?;
        self.identity(&data.claims)
    }

    fn identity(&self, claims: &Map<String, Value>) -> Result<Identity, AuthError> {
        let username = claims
            .get(&self.cfg.username_claim)
            .and_then(Value::as_str)
            .ok_or_else(|| {
                AuthError::WrongAudience(format!(
                    "the token has no `{}` claim",
                    self.cfg.username_claim
                ))
            })?
            .to_string();
        let groups = claims
            .get(&self.cfg.groups_claim)
            .and_then(Value::as_array)
            .map(|l| {
                l.iter()
                    .filter_map(|g| g.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        Ok(Identity {
            id: claims
                .get("sub")
                .and_then(Value::as_str)
                .unwrap_or(&username)
                .to_string(),
            name: claims
                .get("name")
                .and_then(Value::as_str)
                .map(str::to_owned),
            domain: Identity::domain_of(&username),
            idp_id: None,
            idp_name: Some(self.cfg.issuer.clone()),
            username,
            groups,
            service_account: false,
            expires_at: claims.get("exp").and_then(Value::as_u64).unwrap_or(0),
            auth_service: "jwt",
        })
    }

    fn key(&self, kid: &str) -> Option<DecodingKey> {
        let keys = self.keys.load();
        let jwk = keys.find(kid)?;
        DecodingKey::from_jwk(jwk).ok()
    }

    /// Fetches the JWKS, or joins the fetch started less than `jwks_min_refresh` ago.
    async fn refresh(&self) -> Result<(), AuthError> {
        let fetch = {
            let mut last = self.last_fetch.lock().unwrap_or_else(|e| e.into_inner());
            match &*last {
                Some((at, fetch)) if at.elapsed() < self.cfg.jwks_min_refresh => fetch.clone(),
                _ => {
                    let fetch = fetch_jwks(
                        self.http.clone(),
                        self.cfg.jwks_url.clone(),
                        self.keys.clone(),
                    )
                    .boxed()
                    .shared();
                    *last = Some((Instant::now(), fetch.clone()));
                    fetch
                }
            }
        };
        fetch.await
    }
}

async fn fetch_jwks(
    http: reqwest::Client,
    url: String,
    keys: Arc<ArcSwap<JwkSet>>,
) -> Result<(), AuthError> {
    let unavailable = |e: String| AuthError::Unavailable(format!("JWKS {url}: {e}"));
    let resp = http
        .get(&url)
        .send()
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    if !resp.status().is_success() {
        return Err(unavailable(format!("HTTP {}", resp.status())));
    }
    let set: JwkSet = resp.json().await.map_err(|e| unavailable(e.to_string()))?;
    log::info!("fetched {} signing keys from {url}", set.keys.len());
    keys.store(Arc::new(set));
    Ok(())
}
