//! The `auth:` section: how tokens are checked (Globus introspection, JWT, or nothing for
//! local development) and the facility's access rules, applied in FIRST's order.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::time::Duration;

/// How clients authenticate.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// `globus` (introspect Globus access tokens), `jwt` (verify OIDC JWTs against a JWKS), or
    /// `none` (accept any bearer token: local development only).
    pub mode: AuthMode,
    #[serde(default)]
    pub globus: Option<GlobusAuthConfig>,
    #[serde(default)]
    pub jwt: Option<JwtConfig>,
    #[serde(default)]
    pub cache: TokenCacheConfig,
    #[serde(default)]
    pub rules: AccessRules,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    Globus,
    Jwt,
    None,
}

/// The gateway's Globus confidential client and the services it calls.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GlobusAuthConfig {
    /// The gateway's Globus client id (introspection is authenticated as this client).
    pub client_id: String,
    /// Environment variable holding the client secret.
    pub client_secret_env: String,
    /// Globus Auth base URL.
    #[serde(default = "defaults::auth_url")]
    pub auth_url: String,
    /// Globus Groups base URL.
    #[serde(default = "defaults::groups_url")]
    pub groups_url: String,
    /// A scope every token must carry, e.g. `https://auth.globus.org/scopes/<client_id>/action_all`.
    #[serde(default)]
    pub required_scope: Option<String>,
    /// A value `aud` must contain (commonly the gateway's client id).
    #[serde(default)]
    pub audience: Option<String>,
    /// Globus Auth policy ids (e.g. high assurance) that every token's session must satisfy.
    #[serde(default)]
    pub policies: Vec<String>,
    /// Timeout of each call to Globus.
    #[serde(default = "defaults::globus_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Retries of a failed call (429, 5xx, connection errors), with Globus SDK back-off.
    #[serde(default = "defaults::globus_retries")]
    pub retries: u32,
    /// Most introspections started per second, whatever the traffic: unknown tokens beyond it
    /// wait up to `introspection_wait`, then get 503 with `Retry-After`, so a flood of made-up
    /// tokens cannot drive Globus (nor exhaust the gateway's Globus rate limit). Default 20.
    #[serde(default = "defaults::max_introspections_per_second")]
    pub max_introspections_per_second: u32,
    /// Longest wait for an introspection slot. Default 1 s.
    #[serde(default = "defaults::introspection_wait", with = "humantime_serde")]
    pub introspection_wait: Duration,
}

/// OIDC/JWT verification for sites with their own identity provider.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// Where the signing keys are published.
    pub jwks_url: String,
    /// Required `iss`.
    pub issuer: String,
    /// Required `aud`.
    pub audience: String,
    /// Claim holding the username (its text after the last `@` is the domain).
    #[serde(default = "defaults::username_claim")]
    pub username_claim: String,
    /// Claim holding the list of groups.
    #[serde(default = "defaults::groups_claim")]
    pub groups_claim: String,
    /// Clock skew allowed on `exp` and `nbf`.
    #[serde(default = "defaults::leeway", with = "humantime_serde")]
    pub leeway: Duration,
    /// Least time between two fetches of the JWKS (an unknown `kid` triggers a fetch).
    #[serde(default = "defaults::jwks_min_refresh", with = "humantime_serde")]
    pub jwks_min_refresh: Duration,
    #[serde(default = "defaults::globus_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

/// The token cache (key: SHA-256 of the token; the token itself is never stored).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenCacheConfig {
    /// Longest a valid token's verdict is kept (also never past the token's expiry).
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// How long an invalid token's verdict is kept.
    #[serde(with = "humantime_serde")]
    pub negative_ttl: Duration,
    pub max_entries: u64,
    /// The verdicts are written here (token hashes, identities and expiries; never a token)
    /// every `save_interval` and at shutdown, and read at start, so a restart or an upgrade
    /// does not send every active user's token to the identity provider again. Relative to the
    /// configuration file; `null` keeps them in memory only. Default `firstgate-auth-cache.json`.
    pub file: Option<std::path::PathBuf>,
    #[serde(with = "humantime_serde")]
    pub save_interval: Duration,
}

impl Default for TokenCacheConfig {
    fn default() -> Self {
        TokenCacheConfig {
            ttl: Duration::from_secs(600),
            negative_ttl: Duration::from_secs(60),
            max_entries: 100_000,
            file: Some(std::path::PathBuf::from("firstgate-auth-cache.json")),
            save_interval: Duration::from_secs(30),
        }
    }
}

/// Who may use the gateway at all, in FIRST's order: service accounts, identity-provider
/// domains, policies, groups per domain, global groups. Per-cluster and per-model lists
/// (`allowed_groups`, `allowed_domains`) then narrow it further.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessRules {
    /// Usernames of service accounts (`<client_id>@clients.auth.globus.org`) admitted without
    /// the domain and policy checks.
    pub service_accounts: Vec<String>,
    /// Identity-provider domains a user must have authenticated with in this session
    /// (`anl.gov`). Empty: any.
    pub allowed_domains: Vec<String>,
    /// Domain → groups; users of that domain must be in one of them.
    pub groups_per_domain: BTreeMap<String, Vec<String>>,
    /// Every user must be in at least one of these groups. Empty: no requirement.
    pub groups: Vec<String>,
    /// Group id → a name users know it by, used in refusals ("members of the Globus groups
    /// ALCF Inference users (2f6c...)"); a group without a name is named by its id.
    pub group_names: BTreeMap<String, String>,
}

impl AccessRules {
    /// Whether any rule needs the user's group memberships.
    pub fn uses_groups(&self) -> bool {
        !self.groups.is_empty() || self.groups_per_domain.values().any(|g| !g.is_empty())
    }
}

/// Who may use one cluster or model. Empty lists are open.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessList {
    /// The user must be in one of these groups.
    pub allowed_groups: Vec<String>,
    /// The user's domain must be one of these.
    pub allowed_domains: Vec<String>,
    /// `auth.rules.group_names`, to name `allowed_groups` in refusals.
    #[serde(skip)]
    pub group_names: std::sync::Arc<BTreeMap<String, String>>,
}

mod defaults {
    use std::time::Duration;
    pub fn auth_url() -> String {
        "https://auth.globus.org".into()
    }
    pub fn groups_url() -> String {
        "https://groups.api.globus.org".into()
    }
    pub fn globus_timeout() -> Duration {
        Duration::from_secs(5)
    }
    pub fn globus_retries() -> u32 {
        2
    }
    pub fn max_introspections_per_second() -> u32 {
        20
    }
    pub fn introspection_wait() -> Duration {
        Duration::from_secs(1)
    }
    pub fn username_claim() -> String {
        "preferred_username".into()
    }
    pub fn groups_claim() -> String {
        "groups".into()
    }
    pub fn leeway() -> Duration {
        Duration::from_secs(30)
    }
    pub fn jwks_min_refresh() -> Duration {
        Duration::from_secs(10)
    }
}
