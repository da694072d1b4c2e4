//! The facility's access rules, in FIRST's order: service accounts, the session's
//! identity-provider domain, authentication policies, groups per domain, global groups, a
//! sane username; then per-cluster and per-model lists.

use super::globus::Introspection;
use super::{AuthError, Identity};
use crate::config::{AccessList, AccessRules};

/// Steps 1–3 for a Globus token: which identity the request is from, if the session admits one.
pub fn identify_globus(
    intro: &Introspection,
    rules: &AccessRules,
    policies: &[String],
) -> Result<Identity, AuthError> {
    let username = intro.username.clone().unwrap_or_default();
    let expires_at = intro.exp.unwrap_or(0);
    let base = |username: String,
                id: Option<String>,
                detail: Option<&super::globus::IdentityDetail>| Identity {
        id: id.or_else(|| intro.sub.clone()).unwrap_or_default(),
        domain: Identity::domain_of(&username),
        name: detail
            .and_then(|d| d.name.clone())
            .or_else(|| intro.name.clone()),
        idp_id: detail.and_then(|d| d.identity_provider.clone()),
        idp_name: detail.and_then(|d| d.identity_provider_display_name.clone()),
        username,
        groups: Vec::new(),
        service_account: false,
        expires_at,
        auth_service: "globus",
    };

    // 1. Service accounts skip the domain and policy checks.
    if rules.service_accounts.contains(&username) {
        return Ok(Identity {
            service_account: true,
            ..base(username, None, None)
        });
    }

    // 2. The first identity this session authenticated with whose domain is allowed.
    let identity = if rules.allowed_domains.is_empty() {
        let detail = intro
            .identity_set_detail
            .iter()
            .find(|d| d.identity_id().is_some() && d.identity_id() == intro.sub.as_deref());
        base(username.clone(), None, detail)
    } else {
        let mut session_identities = Vec::new();
        let auths = intro.session_info.as_ref().map(|s| &s.authentications);
        for (identity_id, auth) in auths.into_iter().flatten() {
            let detail = intro.identity_set_detail.iter().find(|d| {
                d.identity_id() == Some(identity_id.as_str())
                    || (d.identity_provider.is_some() && d.identity_provider == auth.idp)
            });
            if let Some(d) = detail {
                let name = d.username.clone().unwrap_or_default();
                if rules
                    .allowed_domains
                    .iter()
                    .any(|a| a.eq_ignore_ascii_case(&Identity::domain_of(&name)))
                {
                    return finish_policies(
                        base(name, d.identity_id().map(str::to_owned), Some(d)),
                        intro,
                        policies,
                    );
                }
                session_identities.push(name);
            }
        }
        let current = if session_identities.is_empty() {
            username
        } else {
            session_identities.join(", ")
        };
        return Err(AuthError::forbidden(
            "allowed_domains",
            format!(
                "Permission denied. You must authenticate with an identity from {}. You are \
                 currently authenticated as {current}: log out at https://app.globus.org/logout \
                 and log in again with an allowed identity provider.",
                rules.allowed_domains.join(" or ")
            ),
        ));
    };
    finish_policies(identity, intro, policies)
}

/// Steps 1–2 for an identity from a JWT: service accounts pass; otherwise the username's
/// domain must be allowed (the token's issuer vouches for it; there is no session detail).
pub fn check_jwt_identity(identity: &mut Identity, rules: &AccessRules) -> Result<(), AuthError> {
    if rules.service_accounts.contains(&identity.username) {
        identity.service_account = true;
        return Ok(());
    }
    if !rules.allowed_domains.is_empty()
        && !rules
            .allowed_domains
            .iter()
            .any(|a| a.eq_ignore_ascii_case(&identity.domain))
    {
        return Err(AuthError::forbidden(
            "allowed_domains",
            format!(
                "Permission denied. You must authenticate with an identity from {}; you are \
                 authenticated as {}.",
                rules.allowed_domains.join(" or "),
                identity.username
            ),
        ));
    }
    Ok(())
}

/// 3. Every configured policy evaluated, and true.
fn finish_policies(
    identity: Identity,
    intro: &Introspection,
    policies: &[String],
) -> Result<Identity, AuthError> {
    if policies.is_empty() {
        return Ok(identity);
    }
    let evaluations = intro.policy_evaluations.as_ref();
    let all_true = evaluations.is_some_and(|e| {
        e.len() == policies.len()
            && policies
                .iter()
                .all(|p| e.get(p).is_some_and(|v| v.evaluation))
    });
    if all_true {
        Ok(identity)
    } else {
        Err(AuthError::forbidden(
            "policies",
            "Your Globus session does not meet this facility's authentication policy (for \
             example a high-assurance session that timed out). Log in again to refresh it.",
        ))
    }
}

/// Steps 4–6, for every identity (Globus or JWT): groups per domain, global groups, username.
pub fn check_groups_and_name(identity: &Identity, rules: &AccessRules) -> Result<(), AuthError> {
    if !identity.service_account {
        if let Some(required) = rules.groups_per_domain.get(&identity.domain) {
            if !required.is_empty() && !in_any(identity, required) {
                return Err(AuthError::forbidden(
                    "groups_per_domain",
                    format!(
                        "Permission denied: users from {} must be members of one of the Globus \
                         groups {}.",
                        identity.domain,
                        group_list(required, &rules.group_names)
                    ),
                ));
            }
        }
    }
    if !rules.groups.is_empty() && !in_any(identity, &rules.groups) {
        return Err(AuthError::forbidden(
            "groups",
            format!(
                "Permission denied: you must be a member of one of the Globus groups {}.",
                group_list(&rules.groups, &rules.group_names)
            ),
        ));
    }
    if identity.username.is_empty() || identity.username.contains(['<', '>']) {
        return Err(AuthError::forbidden(
            "username",
            "Permission denied: the token's username is not acceptable.",
        ));
    }
    Ok(())
}

/// The rule of `acl` that refuses `identity`, if any (no allocation: the request path calls
/// this for every candidate deployment).
fn refusal(identity: &Identity, acl: &AccessList) -> Option<&'static str> {
    if !acl.allowed_domains.is_empty()
        && !acl
            .allowed_domains
            .iter()
            .any(|d| d.eq_ignore_ascii_case(&identity.domain))
    {
        return Some("allowed_domains");
    }
    if !acl.allowed_groups.is_empty() && !in_any(identity, &acl.allowed_groups) {
        return Some("allowed_groups");
    }
    None
}

/// Per-cluster or per-model access list; `what` names the resource in the refusal.
pub fn check_access(
    identity: &Identity,
    acl: &AccessList,
    what: impl FnOnce() -> String,
) -> Result<(), AuthError> {
    let Some(rule) = refusal(identity, acl) else {
        return Ok(());
    };
    let message = if rule == "allowed_domains" {
        format!(
            "Permission denied: {} is restricted to users from {}.",
            what(),
            acl.allowed_domains.join(", ")
        )
    } else {
        format!(
            "Permission denied: {} is restricted to members of the Globus groups {}.",
            what(),
            group_list(&acl.allowed_groups, &acl.group_names)
        )
    };
    Err(AuthError::forbidden(rule, message))
}

/// Whether the identity passes a list (for filtering listings).
pub fn may_see(identity: &Identity, acl: &AccessList) -> bool {
    refusal(identity, acl).is_none()
}

/// Groups as a refusal names them: "name (id)" where the configuration names a group.
fn group_list(groups: &[String], names: &std::collections::BTreeMap<String, String>) -> String {
    groups
        .iter()
        .map(|id| match names.get(id) {
            Some(name) => format!("{name} ({id})"),
            None => id.clone(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn in_any(identity: &Identity, groups: &[String]) -> bool {
    identity.groups.iter().any(|g| groups.contains(g))
}
