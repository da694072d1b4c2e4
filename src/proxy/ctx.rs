//! What one request carries from phase to phase.

use crate::auth::Identity;
use crate::catalog::{Deployment, InstanceGuard};
use crate::config::Endpoint;
use crate::openai::ApiError;
use bytes::Bytes;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Per-request state.
pub struct RequestCtx {
    pub started: Instant,
    /// Time spent in the gateway's own work (see `firstgate_gateway_overhead_seconds`).
    pub overhead: Duration,
    /// `direct` for proxied inference, `local` for answers from the gateway.
    pub route_kind: &'static str,
    /// Who the request is from, once authenticated.
    pub identity: Option<Arc<Identity>>,
    pub endpoint: Option<Endpoint>,
    pub deployment: Option<Arc<Deployment>>,
    /// The body to forward (model already rewritten).
    pub body: Option<Bytes>,
    pub stream: bool,
    /// The slot on the instance of the current upstream attempt.
    pub slot: Option<InstanceGuard>,
    /// Instances tried so far.
    pub tried: Vec<SocketAddr>,
    /// Retries still allowed (one: another backend, or a fresh connection after a stale one).
    pub retries_left: u8,
    /// The last attempt failed on a reused (pooled) connection.
    pub stale_connection: bool,
    /// An error decided in a phase that cannot answer by itself (`upstream_peer`).
    pub failure: Option<ApiError>,
    pub first_byte: Option<Instant>,
    /// The in-flight gauge was raised for this request.
    pub counted_in_flight: bool,
    /// The cold path already wrote the response.
    pub answered: bool,
    /// Unique id of the request (also sent as `x-request-id`).
    pub request_id: String,
    /// Unix time of arrival in milliseconds.
    pub arrived_ms: i64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Reads the response's usage (inference requests).
    pub usage: Option<crate::usage::UsageScanner>,
    /// Usage of a cold-path answer.
    pub cold_tokens: Option<crate::usage::Tokens>,
    /// The backend instance of the last attempt.
    pub instance: Option<String>,
    /// The client behind any trusted proxies (none on a Unix socket).
    pub client: Option<crate::edge::Client>,
    /// Counts the request as in flight while it lives.
    pub active: Option<crate::edge::ActiveRequest>,
    /// The descriptor budget of the backend connection, held while proxying.
    pub descriptor: Option<crate::edge::UpstreamPermit>,
}

impl RequestCtx {
    pub fn new() -> Self {
        RequestCtx {
            started: Instant::now(),
            overhead: Duration::ZERO,
            route_kind: "local",
            identity: None,
            endpoint: None,
            deployment: None,
            body: None,
            stream: false,
            slot: None,
            tried: Vec::new(),
            retries_left: 1,
            stale_connection: false,
            failure: None,
            first_byte: None,
            counted_in_flight: false,
            answered: false,
            request_id: crate::compute::uuid(),
            arrived_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64),
            bytes_in: 0,
            bytes_out: 0,
            usage: None,
            cold_tokens: None,
            instance: None,
            client: None,
            active: None,
            descriptor: None,
        }
    }

    /// Adds the time since `since` to the gateway's own overhead.
    pub fn charge(&mut self, since: Instant) {
        self.overhead += since.elapsed();
    }
}

impl Default for RequestCtx {
    fn default() -> Self {
        Self::new()
    }
}
