//! The admin listener: liveness, readiness, Prometheus metrics, draining and the maintenance
//! switch. Keep it on loopback or a private network.
//!
//! - `GET /health`: 200 while the process runs (liveness).
//! - `GET /ready`: 200 while it takes traffic, 503 once draining, with the reason (readiness).
//! - `POST /drain`: turn not-ready ahead of a shutdown (a Kubernetes preStop hook);
//!   `DELETE /drain` undoes it (not once shutdown started).
//! - `GET /`: the operator's page; `GET /api/state`, `GET /api/usage?window=`: its JSON
//!   (see `page.rs`).
//! - `GET /metrics`: Prometheus text format.
//! - `GET /maintenance`: what is under maintenance.
//! - `PUT /maintenance` `{"message": "...", "cluster": "sophia"}`: switch it on, for one
//!   cluster or (without `cluster`) for everything.
//! - `DELETE /maintenance[?cluster=sophia]`: switch off what `PUT` switched on.
//!
//! What a browser page could make it do is refused first (see `guard.rs`): requests
//! addressed to foreign names or sent by other sites' pages, and changes without a tool's
//! marker or the admin token.

use super::guard::AdminGuard;
use super::page::{OperatorPage, PAGE};
use crate::reload::ConfigReloader;
use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde::Deserialize;
use std::sync::Arc;

pub struct AdminApp {
    /// The gateway's parts the page shows, which the routes below also act on (the drain
    /// state, the maintenance switch, the metrics).
    page: OperatorPage,
    /// The configured clusters, to refuse maintenance for a misspelt one.
    clusters: Vec<String>,
    /// Which requests are answered at all.
    guard: AdminGuard,
    /// `POST /reload`.
    reloader: Arc<ConfigReloader>,
}

impl AdminApp {
    pub fn new(
        page: OperatorPage,
        clusters: Vec<String>,
        guard: AdminGuard,
        reloader: Arc<ConfigReloader>,
    ) -> Self {
        AdminApp {
            page,
            clusters,
            guard,
            reloader,
        }
    }

    fn unknown_cluster(&self, cluster: Option<&str>) -> Option<Response<Vec<u8>>> {
        let c = cluster.filter(|c| !self.clusters.iter().any(|k| k == c))?;
        Some(error(
            StatusCode::NOT_FOUND,
            "cluster_not_found",
            &format!(
                "There is no cluster '{c}'. Clusters: {}.",
                self.clusters.join(", ")
            ),
        ))
    }

    /// 200 `{"status": "ready"}`, or 503 with the reason.
    fn readiness(&self) -> Response<Vec<u8>> {
        match self.page.drain.not_ready_because() {
            None => status(StatusCode::OK, serde_json::json!({"status": "ready"})),
            Some(reason) => status(
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({"status": "draining", "reason": reason}),
            ),
        }
    }

    fn maintenance_state(&self) -> Response<Vec<u8>> {
        let body = serde_json::to_vec(&self.page.maintenance.notices()).unwrap_or_default();
        reply(StatusCode::OK, JSON, body)
    }
}

/// The body of `PUT /maintenance`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MaintenanceOn {
    message: Option<String>,
    cluster: Option<String>,
}

const JSON: &str = "application/json";

fn reply(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .header("content-length", body.len())
        .body(body)
        .expect("static response parts are valid")
}

pub(super) fn error(status: StatusCode, code: &str, message: &str) -> Response<Vec<u8>> {
    let kind = match status {
        StatusCode::NOT_FOUND => "not_found_error",
        StatusCode::UNAUTHORIZED => "authentication_error",
        StatusCode::FORBIDDEN => "permission_error",
        _ => "invalid_request_error",
    };
    let body = serde_json::json!({
        "error": {"message": message, "type": kind, "code": code, "param": null}
    });
    reply(status, JSON, body.to_string().into_bytes())
}

/// The query parameter `name`, decoded.
fn req_query(query: &str, name: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

fn status(code: StatusCode, body: serde_json::Value) -> Response<Vec<u8>> {
    reply(code, JSON, body.to_string().into_bytes())
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        let method = req.method.clone();
        let path = req.uri.path().to_string();
        let query = req.uri.query().unwrap_or_default().to_string();
        let cluster = req_query(&query, "cluster");
        let changes = matches!(method, Method::POST | Method::PUT | Method::DELETE)
            && matches!(path.as_str(), "/drain" | "/maintenance" | "/reload");
        let local = session
            .server_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        if let Some(refusal) = self.guard.refuse(req, local, changes) {
            return refusal;
        }
        match (method, path.as_str()) {
            (Method::GET, "/") => {
                let mut page = reply(StatusCode::OK, "text/html; charset=utf-8", PAGE.into());
                // Its own script and styles only; never framed (its buttons change state).
                let headers = page.headers_mut();
                headers.insert(
                    "content-security-policy",
                    http::HeaderValue::from_static(
                        "default-src 'self'; script-src 'unsafe-inline'; \
                         style-src 'unsafe-inline'; frame-ancestors 'none'",
                    ),
                );
                headers.insert("x-frame-options", http::HeaderValue::from_static("DENY"));
                page
            }
            (Method::GET, "/api/state") => status(StatusCode::OK, self.page.state()),
            (Method::GET, "/api/usage") => {
                let window = req_query(&query, "window");
                match self.page.usage(window.as_deref()).await {
                    Ok(v) => status(StatusCode::OK, v),
                    Err(e) => error(StatusCode::BAD_REQUEST, "invalid_window", &e),
                }
            }
            (Method::GET, "/health") => status(StatusCode::OK, serde_json::json!({"status": "ok"})),
            (Method::GET, "/ready") => self.readiness(),
            (Method::POST, "/drain") => {
                self.page.drain.request_drain();
                log::info!("draining requested on the admin listener");
                self.readiness()
            }
            (Method::DELETE, "/drain") => {
                if !self.page.drain.cancel_drain() {
                    return error(
                        StatusCode::CONFLICT,
                        "shutting_down",
                        "The gateway is shutting down; draining cannot be undone.",
                    );
                }
                log::info!("draining undone on the admin listener");
                self.readiness()
            }
            (Method::GET, "/metrics") => reply(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                self.page.metrics.render(),
            ),
            (Method::GET, "/maintenance") => self.maintenance_state(),
            (Method::POST, "/reload") => match self.reloader.reload().await {
                Ok(done) => status(
                    StatusCode::OK,
                    serde_json::json!({"status": "reloaded", "needs_upgrade": done.needs_upgrade}),
                ),
                Err(e) => error(StatusCode::CONFLICT, "reload_refused", &e),
            },
            (Method::PUT, "/maintenance") => {
                let mut body = Vec::new();
                while let Ok(Some(chunk)) = session.read_request_body().await {
                    body.extend_from_slice(&chunk);
                    if body.len() > 64 * 1024 {
                        break;
                    }
                }
                match serde_json::from_slice::<MaintenanceOn>(&body) {
                    Ok(on) => {
                        if let Some(refusal) = self.unknown_cluster(on.cluster.as_deref()) {
                            return refusal;
                        }
                        log::warn!(
                            "maintenance switched on for {} on the admin listener",
                            on.cluster.as_deref().unwrap_or("everything")
                        );
                        self.page.maintenance.set(on.cluster, on.message);
                        self.maintenance_state()
                    }
                    Err(e) => error(
                        StatusCode::BAD_REQUEST,
                        "invalid_request",
                        &format!(
                            "Send JSON {{\"message\": \"...\", \"cluster\": \"name\"}} (both optional): {e}"
                        ),
                    ),
                }
            }
            (Method::DELETE, "/maintenance") => {
                if let Some(refusal) = self.unknown_cluster(cluster.as_deref()) {
                    return refusal;
                }
                log::warn!(
                    "maintenance switched off for {} on the admin listener",
                    cluster.as_deref().unwrap_or("everything")
                );
                self.page.maintenance.clear(cluster.as_deref());
                self.maintenance_state()
            }
            (_, "/health" | "/ready" | "/drain" | "/metrics" | "/maintenance" | "/reload") => error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "Use GET for /health, /ready, /metrics and /maintenance; POST or DELETE for /drain; PUT or DELETE for /maintenance; POST for /reload.",
            ),
            _ => error(
                StatusCode::NOT_FOUND,
                "not_found",
                "Not found. The admin listener serves / (the operator's page), /api/state, /api/usage, /health, /ready, /drain, /metrics, /maintenance and /reload.",
            ),
        }
    }
}
