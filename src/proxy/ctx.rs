//! What one request carries from phase to phase, by concern: the request as it came, where it
//! goes, and what it used.

use super::trace::Spans;
use crate::auth::Identity;
use crate::catalog::{Deployment, InstanceGuard};
use crate::edge::{ActiveRequest, AllowedOrigin, Client, UpstreamPermit};
use crate::openai::ApiError;
use crate::openai::Endpoint;
use crate::trace_context::TraceContext;
use crate::usage::{Accounting, InFlightPermit, Meter, TokenReservation};
use bytes::Bytes;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Per-request state.
pub struct RequestCtx {
    pub request: Request,
    pub target: Target,
    /// Tokens, bytes and times, for the usage record and the metrics.
    pub meter: Meter,
    /// Time spent in the gateway's own work (see `firstgate_gateway_overhead_seconds`).
    pub overhead: Duration,
}

/// The request as it came: who sent it and what it asks for.
pub struct Request {
    /// Unique id of the request (also sent as `x-request-id`).
    pub id: String,
    /// The client behind any trusted proxies (none on a Unix socket).
    pub client: Option<Client>,
    /// Who the request is from, once authenticated.
    pub identity: Option<Arc<Identity>>,
    pub endpoint: Option<Endpoint>,
    /// The error envelope its clients read (from the route, before anything can fail).
    pub envelope: crate::openai::Envelope,
    pub stream: bool,
    /// The body to forward (model already rewritten).
    pub body: Option<Bytes>,
    /// The request's place in a trace (set as soon as its head is read).
    pub trace: Option<TraceContext>,
    /// Its `traceparent`, naming the gateway's span.
    pub traceparent: Option<http::HeaderValue>,
    /// Its exported spans, when spans are exported.
    pub spans: Option<Spans>,
    /// Sent by a load test (the `x-firstgate-loadtest` header) of an exempt user or group.
    pub loadtest: bool,
    /// A line of this batch (sent by this process's batch runner): background priority.
    pub batch_id: Option<String>,
    /// The CORS headers its answer carries (a page of an allowed origin asked).
    pub cors: Option<AllowedOrigin>,
    /// Counts the request as in flight (for draining) while it lives.
    _active: ActiveRequest,
}

/// Where the request goes.
pub struct Target {
    /// `local` (answered by the gateway: listings and errors), `direct` (proxied to an
    /// instance) or `compute` (run through Globus Compute).
    pub route: &'static str,
    pub deployment: Option<Arc<Deployment>>,
    /// The slot on the instance of the current upstream attempt.
    pub slot: Option<InstanceGuard>,
    /// The backend instance of the last attempt (`host:port`).
    pub instance: Option<String>,
    /// Instances tried so far.
    pub tried: Vec<SocketAddr>,
    /// Retries still allowed (one: another backend, or a fresh connection after a stale one).
    pub retries_left: u8,
    /// The last attempt failed on a reused (pooled) connection.
    pub stale_connection: bool,
    /// An error decided in a phase that cannot answer by itself (`upstream_peer`).
    pub failure: Option<ApiError>,
    /// The descriptor budget of the backend connection, held while proxying.
    pub descriptor: Option<UpstreamPermit>,
    /// `firstgate_in_flight_requests` was raised for this request.
    pub in_flight: bool,
    /// Tokens reserved against the deployment's token limits, settled when the request ends.
    pub tokens: Option<TokenReservation>,
    /// Counts against the user's requests in flight.
    pub user_slot: Option<InFlightPermit>,
    /// The gateway already wrote the response (the cold path).
    pub answered: bool,
    /// Where the request's usage record goes; taken when the request finishes, so a request
    /// dropped unfinished (cut when the process exits) still leaves its record.
    pub accounting: Option<Arc<Accounting>>,
}

impl RequestCtx {
    /// A request that arrived now; `active` counts it in flight.
    pub fn new(active: ActiveRequest) -> Self {
        let meter = Meter::start();
        RequestCtx {
            request: Request {
                id: request_id(meter.arrived_ms),
                client: None,
                identity: None,
                endpoint: None,
                envelope: crate::openai::Envelope::OpenAi,
                stream: false,
                body: None,
                trace: None,
                traceparent: None,
                spans: None,
                loadtest: false,
                batch_id: None,
                cors: None,
                _active: active,
            },
            target: Target {
                route: "local",
                deployment: None,
                slot: None,
                instance: None,
                tried: Vec::new(),
                retries_left: 1,
                stale_connection: false,
                failure: None,
                descriptor: None,
                in_flight: false,
                tokens: None,
                user_slot: None,
                answered: false,
                accounting: None,
            },
            meter,
            overhead: Duration::ZERO,
        }
    }

    /// Adds the time since `since` to the gateway's own overhead.
    pub fn charge(&mut self, since: Instant) {
        self.overhead += since.elapsed();
    }
}

/// A request id: a UUIDv7 of the arrival time, so ids sort by time and the usage store's index
/// on them grows at one end instead of touching a random page per record.
fn request_id(arrived_ms: i64) -> String {
    let random = fastrand::u128(..).to_le_bytes();
    let random: &[u8; 10] = random[..10].try_into().expect("16 bytes have 10");
    uuid::Builder::from_unix_timestamp_millis(arrived_ms.max(0) as u64, random)
        .into_uuid()
        .hyphenated()
        .to_string()
}

impl Drop for RequestCtx {
    fn drop(&mut self) {
        super::finish::cut(self);
    }
}
