//! Globus Auth and Groups client: token introspection, the dependent-token grant and
//! `my_groups`, on the gateway's own runtime (never blocking). Base URLs are configurable so
//! the same code talks to Globus or to the local stand-in. Retries follow the Globus SDK:
//! 429, 5xx and connection errors, back-off `(0.25 + 0.5·rand)·2^attempt`, `Retry-After`
//! honoured, bounded because a request is waiting.

use crate::config::GlobusAuthConfig;
use crate::outbound::describe;
use serde::Deserialize;
use std::collections::HashMap;
use std::time::Duration;

const GROUPS_SCOPE: &str =
    "urn:globus:auth:scope:groups.api.globus.org:view_my_groups_and_memberships";
const GROUPS_RESOURCE_SERVER: &str = "groups.api.globus.org";
/// Longest single back-off while a client request waits.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// A failed call to Globus. Texts never include tokens or the client secret.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GlobusError {
    #[error("{service} unreachable: {reason}")]
    Unreachable {
        service: &'static str,
        reason: String,
    },
    #[error("{service} answered HTTP {status}")]
    Status { service: &'static str, status: u16 },
    #[error("{service} answered with an unexpected body: {reason}")]
    BadBody {
        service: &'static str,
        reason: String,
    },
    /// The dependent-token grant was refused (`invalid_grant`): the user must consent again.
    #[error("Globus refused the dependent-token grant")]
    GrantRefused,
}

/// The fields of an introspection response the gateway uses (Globus may add others).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Introspection {
    pub active: bool,
    #[serde(default)]
    pub scope: Option<String>,
    #[serde(default)]
    pub sub: Option<String>,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub aud: Option<OneOrMany>,
    #[serde(default)]
    pub exp: Option<u64>,
    #[serde(default)]
    pub identity_set_detail: Vec<IdentityDetail>,
    #[serde(default)]
    pub session_info: Option<SessionInfo>,
    #[serde(default)]
    pub policy_evaluations: Option<HashMap<String, PolicyEvaluation>>,
}

/// `aud` is a list in Globus's responses; accept a single string too.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn contains(&self, v: &str) -> bool {
        match self {
            OneOrMany::One(s) => s == v,
            OneOrMany::Many(l) => l.iter().any(|s| s == v),
        }
    }
}

/// One entry of `identity_set_detail`. Globus sends the identity id as `id`, `sub` or both
/// (a serde alias would refuse the duplicate), so both are kept.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct IdentityDetail {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub identity_provider: Option<String>,
    #[serde(default)]
    pub identity_provider_display_name: Option<String>,
}

impl IdentityDetail {
    /// The identity's uuid, from `id` or else `sub`.
    pub fn identity_id(&self) -> Option<&str> {
        self.id.as_deref().or(self.sub.as_deref())
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct SessionInfo {
    #[serde(default)]
    pub authentications: HashMap<String, Authentication>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Authentication {
    #[serde(default)]
    pub idp: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PolicyEvaluation {
    pub evaluation: bool,
}

#[derive(Deserialize)]
struct DependentToken {
    access_token: String,
    resource_server: String,
}

#[derive(Deserialize)]
struct Group {
    id: String,
    #[serde(default)]
    my_memberships: Vec<Membership>,
}

#[derive(Deserialize)]
struct Membership {
    #[serde(default)]
    status: Option<String>,
}

pub struct GlobusClient {
    http: reqwest::Client,
    auth_url: String,
    groups_url: String,
    client_id: String,
    client_secret: String,
    policies: String,
    retries: u32,
}

impl std::fmt::Debug for GlobusClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GlobusClient")
            .field("auth_url", &self.auth_url)
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

impl GlobusClient {
    pub fn new(cfg: &GlobusAuthConfig, client_secret: String) -> Result<Self, reqwest::Error> {
        Ok(GlobusClient {
            http: reqwest::Client::builder()
                .timeout(cfg.timeout)
                .connect_timeout(cfg.timeout)
                .build()?,
            auth_url: cfg.auth_url.trim_end_matches('/').to_string(),
            groups_url: cfg.groups_url.trim_end_matches('/').to_string(),
            client_id: cfg.client_id.clone(),
            client_secret,
            policies: cfg.policies.join(","),
            retries: cfg.retries,
        })
    }

    /// `POST /v2/oauth2/token/introspect`.
    pub async fn introspect(&self, token: &str) -> Result<Introspection, GlobusError> {
        const SERVICE: &str = "Globus Auth introspection";
        let url = format!("{}/v2/oauth2/token/introspect", self.auth_url);
        let mut form = vec![
            ("token", token),
            ("include", "session_info,identity_set_detail"),
        ];
        if !self.policies.is_empty() {
            form.push(("authentication_policies", &self.policies));
        }
        let resp = self
            .send(SERVICE, || {
                self.http
                    .post(&url)
                    .basic_auth(&self.client_id, Some(&self.client_secret))
                    .form(&form)
            })
            .await?;
        json(SERVICE, resp).await
    }

    /// The user's active group ids: a dependent-token grant for Groups, then `my_groups`.
    pub async fn groups(&self, token: &str) -> Result<Vec<String>, GlobusError> {
        const GRANT: &str = "Globus Auth dependent-token grant";
        const GROUPS: &str = "Globus Groups";
        let url = format!("{}/v2/oauth2/token", self.auth_url);
        let form = [
            ("grant_type", "urn:globus:auth:grant_type:dependent_token"),
            ("token", token),
            ("scope", GROUPS_SCOPE),
        ];
        let resp = self
            .send_allowing(GRANT, &[400], || {
                self.http
                    .post(&url)
                    .basic_auth(&self.client_id, Some(&self.client_secret))
                    .form(&form)
            })
            .await?;
        if resp.status() == 400 {
            return Err(GlobusError::GrantRefused);
        }
        let tokens: Vec<DependentToken> = json(GRANT, resp).await?;
        let groups_token = tokens
            .into_iter()
            .find(|t| t.resource_server == GROUPS_RESOURCE_SERVER)
            .ok_or(GlobusError::BadBody {
                service: GRANT,
                reason: "no token for groups.api.globus.org".into(),
            })?
            .access_token;
        let url = format!("{}/v2/groups/my_groups?statuses=active", self.groups_url);
        let resp = self
            .send(GROUPS, || self.http.get(&url).bearer_auth(&groups_token))
            .await?;
        let groups: Vec<Group> = json(GROUPS, resp).await?;
        Ok(groups
            .into_iter()
            .filter(|g| {
                g.my_memberships.is_empty()
                    || g.my_memberships
                        .iter()
                        .any(|m| m.status.as_deref().is_none_or(|s| s == "active"))
            })
            .map(|g| g.id)
            .collect())
    }

    async fn send<F>(
        &self,
        service: &'static str,
        request: F,
    ) -> Result<reqwest::Response, GlobusError>
    where
        F: Fn() -> reqwest::RequestBuilder,
    {
        self.send_allowing(service, &[], request).await
    }

    /// Sends with retries; statuses in `accepted` (besides 2xx) are returned to the caller.
    async fn send_allowing<F>(
        &self,
        service: &'static str,
        accepted: &[u16],
        request: F,
    ) -> Result<reqwest::Response, GlobusError>
    where
        F: Fn() -> reqwest::RequestBuilder,
    {
        let mut attempt = 0;
        loop {
            let retry_in = match request().send().await {
                Ok(resp)
                    if resp.status().is_success() || accepted.contains(&resp.status().as_u16()) =>
                {
                    return Ok(resp)
                }
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    if !matches!(status, 429 | 500 | 502 | 503 | 504) || attempt >= self.retries {
                        return Err(GlobusError::Status { service, status });
                    }
                    retry_after(&resp).unwrap_or_else(|| backoff(attempt))
                }
                Err(e) => {
                    if attempt >= self.retries {
                        return Err(GlobusError::Unreachable {
                            service,
                            reason: describe(&e),
                        });
                    }
                    backoff(attempt)
                }
            };
            log::warn!(
                "{service}: retrying in {retry_in:?} (attempt {})",
                attempt + 1
            );
            tokio::time::sleep(retry_in.min(MAX_BACKOFF)).await;
            attempt += 1;
        }
    }
}

fn backoff(attempt: u32) -> Duration {
    Duration::from_secs_f64((0.25 + 0.5 * fastrand::f64()) * 2f64.powi(attempt as i32))
}

fn retry_after(resp: &reqwest::Response) -> Option<Duration> {
    let secs: u64 = resp
        .headers()
        .get("retry-after")?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(secs))
}

async fn json<T: serde::de::DeserializeOwned>(
    service: &'static str,
    resp: reqwest::Response,
) -> Result<T, GlobusError> {
    let bytes = resp.bytes().await.map_err(|e| GlobusError::Unreachable {
        service,
        reason: describe(&e),
    })?;
    serde_json::from_slice(&bytes).map_err(|e| GlobusError::BadBody {
        service,
        reason: e.to_string(),
    })
}
