//! Globus Groups: `GET /v2/groups/my_groups`.

use super::{globus_error, unix_now, Grant, Shared, TokenRecord};
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

pub(super) async fn my_groups(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    s.stats.my_groups.fetch_add(1, Ordering::Relaxed);
    if let Some(r) = s.fault().await {
        return r;
    }
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let user = match token.and_then(|t| s.token(t)) {
        Some(TokenRecord {
            grant: Grant::Groups(user),
            exp,
        }) if exp > unix_now() => user,
        _ => return globus_error(StatusCode::UNAUTHORIZED, "Call must be authenticated"),
    };
    // Every membership of the stand-in is active.
    let wants_active = query
        .get("statuses")
        .is_none_or(|st| st.split(',').any(|x| x.trim() == "active"));
    if !wants_active {
        return Json(json!([])).into_response();
    }
    let identity_id = user.identity_id();
    let groups: Vec<Value> = user
        .groups
        .iter()
        .map(|g| {
            let id = s.seed.group_id(g);
            let name = s
                .seed
                .groups
                .iter()
                .find(|x| x.id == id)
                .map_or(g.as_str(), |x| x.name.as_str());
            json!({
                "name": name, "id": id, "parent_id": null, "group_type": "regular",
                "enforce_session": false, "session_limit": 28800, "session_timeouts": {},
                "my_memberships": [{
                    "group_id": id, "identity_id": identity_id, "username": user.username,
                    "role": "member", "status": "active",
                }],
                "policies": {"group_visibility": "private", "group_members_visibility": "managers"},
            })
        })
        .collect();
    Json(Value::Array(groups)).into_response()
}
