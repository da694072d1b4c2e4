//! Who a request is from, once its token has been checked.

use serde_json::json;

/// An authenticated user (or service account). Never holds the token itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Identity id (Globus identity uuid, or the JWT `sub`).
    pub id: String,
    pub username: String,
    pub name: Option<String>,
    /// Text after the last `@` of the username (`anl.gov`).
    pub domain: String,
    pub idp_id: Option<String>,
    pub idp_name: Option<String>,
    /// Group ids the user is an active member of (empty unless a rule needs them).
    pub groups: Vec<String>,
    /// Admitted through the service-account allow-list.
    pub service_account: bool,
    /// Unix time the token expires.
    pub expires_at: u64,
    /// `globus`, `jwt` or `none`.
    pub auth_service: &'static str,
}

impl Identity {
    /// The domain of a username: the text after the last `@` (a username may contain several).
    pub fn domain_of(username: &str) -> String {
        username
            .rsplit_once('@')
            .map(|(_, d)| d.to_ascii_lowercase())
            .unwrap_or_default()
    }

    /// The anonymous identity of `auth.mode: none`.
    pub fn anonymous() -> Identity {
        Identity {
            id: "anonymous".into(),
            username: "anonymous".into(),
            name: None,
            domain: String::new(),
            idp_id: None,
            idp_name: None,
            groups: Vec::new(),
            service_account: false,
            expires_at: u64::MAX,
            auth_service: "none",
        }
    }

    /// `GET /resource_server/whoami` in FIRST's shape.
    pub fn whoami(&self) -> serde_json::Value {
        json!({
            "id": self.id,
            "name": self.name,
            "username": self.username,
            "user_group_uuids": self.groups,
            "idp_id": self.idp_id,
            "idp_name": self.idp_name,
            "auth_service": self.auth_service,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_is_after_the_last_at() {
        assert_eq!(Identity::domain_of("alice@ANL.gov"), "anl.gov");
        assert_eq!(
            Identity::domain_of("willy@wonka.com@accounts.google.com"),
            "accounts.google.com"
        );
        assert_eq!(Identity::domain_of("nobody"), "");
    }
}
