//! The admin listener: liveness, readiness, Prometheus metrics, draining and the maintenance
//! switch. It has no authentication: keep it on loopback or a private network.
//!
//! - `GET /health`: 200 while the process runs (liveness).
//! - `GET /ready`: 200 while it takes traffic, 503 once draining (readiness).
//! - `POST /drain`: turn not-ready ahead of a shutdown (a Kubernetes preStop hook).
//! - `GET /metrics`: Prometheus text format.
//! - `GET /maintenance`: what is under maintenance.
//! - `PUT /maintenance` `{"message": "...", "cluster": "sophia"}`: switch it on, for one
//!   cluster or (without `cluster`) for everything.
//! - `DELETE /maintenance[?cluster=sophia]`: switch off what `PUT` switched on.

use crate::edge::{DrainState, Maintenance};
use crate::metrics::Metrics;
use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde::Deserialize;
use std::sync::Arc;

pub struct AdminApp {
    metrics: Arc<Metrics>,
    drain: Arc<DrainState>,
    maintenance: Arc<Maintenance>,
    /// The configured clusters, to refuse maintenance for a misspelt one.
    clusters: Vec<String>,
}

impl AdminApp {
    pub fn new(
        metrics: Arc<Metrics>,
        drain: Arc<DrainState>,
        maintenance: Arc<Maintenance>,
        clusters: Vec<String>,
    ) -> Self {
        AdminApp {
            metrics,
            drain,
            maintenance,
            clusters,
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

    fn maintenance_state(&self) -> Response<Vec<u8>> {
        let body = serde_json::to_vec(&self.maintenance.notices()).unwrap_or_default();
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

fn error(status: StatusCode, code: &str, message: &str) -> Response<Vec<u8>> {
    let kind = if status == StatusCode::NOT_FOUND {
        "not_found_error"
    } else {
        "invalid_request_error"
    };
    let body = serde_json::json!({
        "error": {"message": message, "type": kind, "code": code, "param": null}
    });
    reply(status, JSON, body.to_string().into_bytes())
}

fn status(ok: bool, up: &str, down: &str) -> Response<Vec<u8>> {
    let (code, text) = if ok {
        (StatusCode::OK, up)
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, down)
    };
    reply(code, JSON, format!(r#"{{"status":"{text}"}}"#).into_bytes())
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        let method = req.method.clone();
        let path = req.uri.path().to_string();
        let cluster = req.uri.query().and_then(|q| {
            q.split('&')
                .find_map(|kv| kv.strip_prefix("cluster="))
                .map(str::to_owned)
        });
        match (method, path.as_str()) {
            (Method::GET, "/health") => status(true, "ok", ""),
            (Method::GET, "/ready") => status(self.drain.ready(), "ready", "draining"),
            (Method::POST, "/drain") => {
                self.drain.start_draining();
                log::info!("draining requested on the admin listener");
                status(false, "", "draining")
            }
            (Method::GET, "/metrics") => reply(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                self.metrics.render(),
            ),
            (Method::GET, "/maintenance") => self.maintenance_state(),
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
                        self.maintenance.set(on.cluster, on.message);
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
                self.maintenance.clear(cluster.as_deref());
                self.maintenance_state()
            }
            (_, "/health" | "/ready" | "/drain" | "/metrics" | "/maintenance") => error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "Use GET for /health, /ready, /metrics and /maintenance; POST for /drain; PUT or DELETE for /maintenance.",
            ),
            _ => error(
                StatusCode::NOT_FOUND,
                "not_found",
                "Not found. The admin listener serves /health, /ready, /drain, /metrics and /maintenance.",
            ),
        }
    }
}
