//! The stand-in's users, groups and confidential clients, read from YAML
//! (`conf/demo-users.yaml` is the demo's).

use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::Path;

/// Everything the stand-in knows at start.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Seed {
    /// Confidential clients allowed to introspect and to request grants (the gateway).
    #[serde(default)]
    pub clients: Vec<FakeClient>,
    #[serde(default)]
    pub groups: Vec<FakeGroup>,
    #[serde(default)]
    pub users: Vec<FakeUser>,
    /// Globus Compute endpoints, functions and the simulated facility behind them.
    #[serde(default)]
    pub compute: super::ComputeSeed,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FakeClient {
    pub id: String,
    pub secret: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FakeGroup {
    /// The group's uuid, as rules name it.
    pub id: String,
    pub name: String,
}

/// A user and the access token they hold.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FakeUser {
    /// The bearer token (a fixed development value).
    pub token: String,
    /// `alice@anl.gov`; the identity-provider domain is the text after the last `@`.
    pub username: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub email: Option<String>,
    /// Shown as the identity provider's display name (default: the domain).
    #[serde(default)]
    pub organization: Option<String>,
    /// Group names or ids the user is an active member of.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Seconds from the stand-in's start until the token expires; negative: already expired.
    #[serde(default = "default_expires_in")]
    pub expires_in: i64,
    /// `false` makes a revoked token (introspection answers `active: false`).
    #[serde(default = "yes")]
    pub active: bool,
    /// Space-separated scopes (default: the first client's `action_all` scope).
    #[serde(default)]
    pub scope: Option<String>,
    /// Audiences (default: the first client's id).
    #[serde(default)]
    pub aud: Option<Vec<String>>,
    /// Authentication-policy id → evaluation (policies not listed evaluate to true).
    #[serde(default)]
    pub policies: BTreeMap<String, bool>,
    /// What this user is for (shown by the demo banner).
    #[serde(default)]
    pub note: Option<String>,
}

fn default_expires_in() -> i64 {
    172_800
}

fn yes() -> bool {
    true
}

impl FakeUser {
    /// A user with defaults for everything but the token and username.
    pub fn new(token: &str, username: &str) -> FakeUser {
        FakeUser {
            token: token.into(),
            username: username.into(),
            name: None,
            email: None,
            organization: None,
            groups: Vec::new(),
            expires_in: default_expires_in(),
            active: true,
            scope: None,
            aud: None,
            policies: BTreeMap::new(),
            note: None,
        }
    }

    /// The identity's uuid, stable across runs (derived from the username).
    pub fn identity_id(&self) -> String {
        uuid_from(&self.username)
    }

    /// The identity provider's uuid, stable across runs (derived from the domain).
    pub fn idp_id(&self) -> String {
        uuid_from(&format!("idp:{}", self.domain()))
    }

    pub fn domain(&self) -> &str {
        self.username.rsplit_once('@').map_or("", |(_, d)| d)
    }
}

impl Seed {
    pub fn from_yaml(text: &str) -> Result<Seed, serde_yaml_ng::Error> {
        serde_yaml_ng::from_str(text)
    }

    pub fn from_file(path: &Path) -> anyhow::Result<Seed> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        Seed::from_yaml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    /// The group id a user's `groups` entry means (a name or an id).
    pub fn group_id(&self, name_or_id: &str) -> String {
        self.groups
            .iter()
            .find(|g| g.name == name_or_id || g.id == name_or_id)
            .map_or_else(|| name_or_id.to_string(), |g| g.id.clone())
    }
}

/// A uuid-shaped id derived from `text`.
fn uuid_from(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    let bits = u128::from_be_bytes(digest[..16].try_into().expect("16 bytes"));
    crate::compute::uuid_from_bits(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_users_parse_and_name_known_groups() {
        let seed = Seed::from_yaml(include_str!("../../../conf/demo-users.yaml")).unwrap();
        let tokens: Vec<&str> = seed.users.iter().map(|u| u.token.as_str()).collect();
        assert_eq!(
            tokens,
            [
                "demo-alice",
                "demo-bob",
                "demo-ops",
                "demo-mallory",
                "demo-expired"
            ]
        );
        let alice = &seed.users[0];
        assert_eq!(seed.group_id(&alice.groups[0]), seed.groups[0].id);
        // The demo configuration restricts a model to that group.
        assert!(include_str!("../../../conf/demo.yaml").contains(&seed.groups[0].id));
        assert!(seed.users[4].expires_in < 0);
    }

    #[test]
    fn identity_ids_are_stable_and_uuid_shaped() {
        let u = FakeUser::new("t", "alice@anl.gov");
        assert_eq!(
            u.identity_id(),
            FakeUser::new("other", "alice@anl.gov").identity_id()
        );
        assert_eq!(u.identity_id().len(), 36);
        assert_eq!(u.domain(), "anl.gov");
    }
}
