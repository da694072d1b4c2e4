//! Globus Auth: `POST /v2/oauth2/token/introspect` and `POST /v2/oauth2/token`.

use super::{unix_now, Grant, Shared, TokenRecord};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Form, Json};
use base64::Engine as _;
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

const COMPUTE_SCOPE: &str =
    "https://auth.globus.org/scopes/facd7ccc-c5f4-42aa-916b-a0e270e2c2a9/all";
const GROUPS_SCOPE: &str =
    "urn:globus:auth:scope:groups.api.globus.org:view_my_groups_and_memberships";
const DEPENDENT_GRANT: &str = "urn:globus:auth:grant_type:dependent_token";

fn oauth_error(status: StatusCode, error: &str) -> Response {
    (status, Json(json!({"error": error}))).into_response()
}

/// The confidential client named by HTTP Basic, if its secret matches.
fn client(s: &Shared, headers: &HeaderMap) -> Option<String> {
    let value = headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(value.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (id, secret) = text.split_once(':')?;
    s.seed
        .clients
        .iter()
        .any(|c| c.id == id && c.secret == secret)
        .then(|| id.to_string())
}

fn invalid_client() -> Response {
    oauth_error(StatusCode::UNAUTHORIZED, "invalid_client")
}

pub(super) async fn introspect(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    s.stats.introspect.fetch_add(1, Ordering::Relaxed);
    if let Some(r) = s.fault().await {
        return r;
    }
    if client(&s, &headers).is_none() {
        return invalid_client();
    }
    let Some(token) = form.get("token") else {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_request");
    };
    let include: Vec<&str> = form
        .get("include")
        .map(|i| i.split(',').map(str::trim).collect())
        .unwrap_or_default();
    let policies: Vec<&str> = form
        .get("authentication_policies")
        .map(|p| {
            p.split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .collect()
        })
        .unwrap_or_default();
    let now = unix_now();
    let inactive = || Json(json!({"active": false})).into_response();
    let Some(TokenRecord { grant, exp }) = s.token(token) else {
        return inactive();
    };
    if exp <= now {
        return inactive();
    }
    let iat = exp.min(now) - 60;
    let mut body = Map::new();
    body.insert("active".into(), json!(true));
    body.insert("token_type".into(), json!("Bearer"));
    body.insert("iss".into(), json!("https://auth.globus.org"));
    body.insert("exp".into(), json!(exp));
    body.insert("iat".into(), json!(iat));
    body.insert("nbf".into(), json!(iat));
    match grant {
        Grant::User(user) if user.active => {
            let id = user.identity_id();
            let gateway = s.default_client();
            let scope = user
                .scope
                .clone()
                .unwrap_or_else(|| format!("https://auth.globus.org/scopes/{gateway}/action_all"));
            let aud = user
                .aud
                .clone()
                .unwrap_or_else(|| vec![gateway.to_string()]);
            let organization = user
                .organization
                .clone()
                .unwrap_or_else(|| user.domain().to_string());
            let name = user.name.clone().unwrap_or_else(|| user.username.clone());
            let email = user.email.clone().unwrap_or_else(|| user.username.clone());
            for (k, v) in [
                ("scope", json!(scope)),
                ("client_id", json!(format!("{:032x}", fastrand::u128(..)))),
                ("sub", json!(id)),
                ("username", json!(user.username)),
                ("name", json!(name)),
                ("email", json!(email)),
                ("aud", json!(aud)),
                ("dependent_tokens_cache_id", json!(format!("dtc-{id}"))),
            ] {
                body.insert(k.into(), v);
            }
            if include.contains(&"identity_set") || include.contains(&"identity_set_detail") {
                body.insert("identity_set".into(), json!([id]));
            }
            if include.contains(&"identity_set_detail") {
                body.insert(
                    "identity_set_detail".into(),
                    json!([{
                        "id": id, "sub": id, "username": user.username, "name": name,
                        "email": email, "organization": organization,
                        "identity_provider": user.idp_id(),
                        "identity_provider_display_name": organization,
                        "last_authentication": iat,
                    }]),
                );
            }
            if include.contains(&"session_info") {
                body.insert(
                    "session_info".into(),
                    json!({"session_id": user.idp_id(), "authentications": {
                        id.clone(): {"acr": null, "amr": null, "idp": user.idp_id(),
                                     "auth_time": iat, "custom_claims": {}}
                    }}),
                );
            }
            if !policies.is_empty() {
                let evaluations: Map<String, Value> = policies
                    .iter()
                    .map(|p| {
                        let ok = user.policies.get(*p).copied().unwrap_or(true);
                        (p.to_string(), json!({"evaluation": ok}))
                    })
                    .collect();
                body.insert("policy_evaluations".into(), Value::Object(evaluations));
            }
        }
        Grant::User(_) => return inactive(),
        Grant::Groups(user) => {
            body.insert("scope".into(), json!(GROUPS_SCOPE));
            body.insert("sub".into(), json!(user.identity_id()));
            body.insert("username".into(), json!(user.username));
            body.insert("aud".into(), json!(["groups.api.globus.org"]));
        }
        Grant::Client {
            client_id,
            scope,
            resource_server,
        } => {
            body.insert("scope".into(), json!(scope));
            body.insert("client_id".into(), json!(client_id));
            body.insert("sub".into(), json!(client_id));
            body.insert(
                "username".into(),
                json!(format!("{client_id}@clients.auth.globus.org")),
            );
            body.insert("aud".into(), json!([resource_server]));
        }
    }
    Json(Value::Object(body)).into_response()
}

/// The resource server a scope belongs to.
fn resource_server(scope: &str) -> String {
    if scope == COMPUTE_SCOPE {
        return "funcx_service".into();
    }
    if let Some(rest) = scope.strip_prefix("urn:globus:auth:scope:") {
        return rest.split(':').next().unwrap_or(rest).to_string();
    }
    if let Some(rest) = scope.strip_prefix("https://auth.globus.org/scopes/") {
        return rest.split('/').next().unwrap_or(rest).to_string();
    }
    scope.to_string()
}

fn mint() -> String {
    format!("Ag{:032x}{:032x}", fastrand::u128(..), fastrand::u128(..))
}

pub(super) async fn token(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let grant_type = form.get("grant_type").map(String::as_str).unwrap_or("");
    match grant_type {
        "client_credentials" => s.stats.client_credentials.fetch_add(1, Ordering::Relaxed),
        DEPENDENT_GRANT => s.stats.dependent_token.fetch_add(1, Ordering::Relaxed),
        _ => 0,
    };
    if let Some(r) = s.fault().await {
        return r;
    }
    let Some(client_id) = client(&s, &headers) else {
        return invalid_client();
    };
    let now = unix_now();
    match grant_type {
        "client_credentials" => {
            let scope = form
                .get("scope")
                .cloned()
                .unwrap_or_else(|| COMPUTE_SCOPE.into());
            let first = scope.split(' ').next().unwrap_or_default().to_string();
            let rs = resource_server(&first);
            let access_token = mint();
            let expires_in = 172_800;
            s.tokens.write().unwrap().insert(
                access_token.clone(),
                TokenRecord {
                    grant: Grant::Client {
                        client_id,
                        scope: first.clone(),
                        resource_server: rs.clone(),
                    },
                    exp: now + expires_in,
                },
            );
            Json(json!({
                "access_token": access_token, "scope": first, "expires_in": expires_in,
                "token_type": "Bearer", "resource_server": rs, "other_tokens": [],
            }))
            .into_response()
        }
        DEPENDENT_GRANT => {
            let user = match form.get("token").and_then(|t| s.token(t)) {
                Some(TokenRecord {
                    grant: Grant::User(user),
                    exp,
                }) if exp > now && user.active => user,
                _ => return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant"),
            };
            if form
                .get("scope")
                .is_some_and(|scope| !scope.split(' ').any(|x| x == GROUPS_SCOPE))
            {
                // The stand-in only has the Groups dependency; other scopes yield nothing.
                return Json(json!([])).into_response();
            }
            let access_token = mint();
            let expires_in = 3600;
            s.tokens.write().unwrap().insert(
                access_token.clone(),
                TokenRecord {
                    grant: Grant::Groups(user),
                    exp: now + expires_in,
                },
            );
            let mut entry = json!({
                "access_token": access_token, "scope": GROUPS_SCOPE,
                "resource_server": "groups.api.globus.org", "token_type": "bearer",
                "expires_in": expires_in,
            });
            if form.get("access_type").map(String::as_str) == Some("offline") {
                entry["refresh_token"] = json!(mint());
            }
            Json(json!([entry])).into_response()
        }
        _ => oauth_error(StatusCode::BAD_REQUEST, "unsupported_grant_type"),
    }
}
