//! The admin listener: `GET /health` and `GET /metrics` (Prometheus text format).

use crate::metrics::Metrics;
use async_trait::async_trait;
use http::{Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use std::sync::Arc;

pub struct AdminApp {
    metrics: Arc<Metrics>,
}

impl AdminApp {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        AdminApp { metrics }
    }
}

fn reply(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .header("content-length", body.len())
        .body(body)
        .expect("static response parts are valid")
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        let path = req.uri.path();
        if req.method != http::Method::GET {
            return reply(
                StatusCode::METHOD_NOT_ALLOWED,
                "application/json",
                br#"{"error":{"message":"Use GET.","type":"invalid_request_error","code":"method_not_allowed","param":null}}"#.to_vec(),
            );
        }
        match path {
            "/health" => reply(StatusCode::OK, "application/json", br#"{"status":"ok"}"#.to_vec()),
            "/metrics" => reply(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                self.metrics.render(),
            ),
            _ => reply(
                StatusCode::NOT_FOUND,
                "application/json",
                br#"{"error":{"message":"Not found. The admin listener serves /health and /metrics.","type":"not_found_error","code":"not_found","param":null}}"#.to_vec(),
            ),
        }
    }
}
