//! The Pingora `ProxyHttp` implementation: one request's trip through the phases.
//!
//! Each phase is a few steps that call into the domain modules; the steps live beside this
//! file, in the order a request meets them:
//!
//! - `serve`: the client behind proxies, the route, limits, authentication (`routes`, `edge`,
//!   `auth`, `usage`);
//! - `reads`: listings and the caller's usage (`admin::listings`);
//! - `inference`: the body (`body`, `openai`), the deployment (`routing`: `catalog` and
//!   `policy`), admission, and the instance to use; or `cold`, through Globus Compute
//!   (`compute`);
//! - `upstream`: the backend request, retries;
//! - `finish`: the usage record and the metrics (`usage`, `metrics`).
//!
//! What the client is told when anything fails is decided in `errors` and written by
//! `respond`.

mod batch;
mod body;
mod cold;
mod ctx;
mod errors;
mod finish;
mod headers;
mod inference;
mod reads;
mod relay;
mod respond;
mod routes;
mod routing;
mod serve;
mod trace;
mod upstream;

pub use cold::ColdPath;
pub use ctx::RequestCtx;

use crate::auth::Authenticator;
use crate::catalog::SharedCatalog;
use crate::config::Edge;
use crate::edge::{Admission, Cors, DrainState, Maintenance, TrustedProxies};
use crate::metrics::Metrics;
use crate::policy::PolicyStore;
use crate::usage::Accounting;
use async_trait::async_trait;
use bytes::Bytes;
use http::HeaderValue;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{Error, ErrorSource};
use std::sync::Arc;
use std::time::Instant;

/// The gateway's proxy logic, and everything it asks.
pub struct Gateway {
    pub catalog: SharedCatalog,
    pub auth: Arc<Authenticator>,
    pub metrics: Arc<Metrics>,
    pub policies: Arc<PolicyStore>,
    /// Globus Compute for cold models, if configured.
    pub cold: Option<ColdPath>,
    /// Wakes the scale policy (a request found no hot instance).
    pub scale_wake: Arc<tokio::sync::Notify>,
    pub accounting: Arc<Accounting>,
    pub edge: Edge,
    pub trusted_proxies: TrustedProxies,
    pub maintenance: Arc<Maintenance>,
    /// Counts requests in flight, for the drain on shutdown.
    pub drain: Arc<DrainState>,
    /// Connection and descriptor budget (a proxied request needs a backend connection).
    pub admission: Arc<Admission>,
    /// Unix time of start-up, reported as `created` in model listings.
    pub started_unix: u64,
    /// Which browser pages may call the API (none: CORS off).
    pub cors: Option<Cors>,
    /// The OpenAI Files and Batch APIs (none: `batch:` is not configured).
    pub batches: Option<Arc<crate::batch::Batches>>,
}

#[async_trait]
impl ProxyHttp for Gateway {
    /// Boxed: Pingora keeps the context in its per-request future, which it moves into a box of
    /// its own on every request (a 1 KiB context there is a 1 KiB copy more per request).
    type CTX = Box<RequestCtx>;

    fn new_ctx(&self) -> Box<RequestCtx> {
        Box::new(RequestCtx::new(self.drain.begin()))
    }

    /// Everything up to the choice of an instance; answers itself unless the request is
    /// proxied (`Ok(false)`).
    async fn request_filter(
        &self,
        session: &mut Session,
        ctx: &mut Self::CTX,
    ) -> pingora::Result<bool> {
        // From the context's creation, just before: one clock read less per request.
        let t = ctx.meter.started;
        trace::start(ctx, session.req_header());
        ctx.request.client = self.take_connection(session);
        ctx.request.cors = self
            .cors
            .as_ref()
            .and_then(|c| c.allow_origin(&session.req_header().headers));
        ctx.request.loadtest = session
            .req_header()
            .headers
            .contains_key(crate::usage::LOADTEST_HEADER);
        let route = self.match_route(session.req_header());
        // Known before anything can fail, so that every error takes the route's envelope.
        if let Ok(route) = &route {
            ctx.request.envelope = route.envelope();
            if let routes::Route::Inference { endpoint, .. } = route {
                ctx.request.endpoint = Some(*endpoint);
            }
        }
        ctx.charge(t);
        let outcome = match route {
            Ok(route) => self.serve(session, ctx, route).await,
            Err(e) => Err(e),
        };
        self.answer(session, ctx, outcome).await
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut Self::CTX,
    ) -> pingora::Result<Box<HttpPeer>> {
        let t = Instant::now();
        let peer = upstream::next_peer(ctx);
        trace::open_between(ctx, trace::phase_span!(ctx, "upstream_connect"));
        ctx.charge(t);
        peer
    }

    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        _reused: bool,
        _peer: &HttpPeer,
        #[cfg(unix)] _fd: std::os::unix::io::RawFd,
        #[cfg(windows)] _sock: std::os::windows::io::RawSocket,
        _digest: Option<&pingora::protocols::Digest>,
        ctx: &mut Self::CTX,
    ) -> pingora::Result<()> {
        trace::open_between(ctx, trace::phase_span!(ctx, "upstream_first_byte"));
        Ok(())
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut Self::CTX,
    ) -> pingora::Result<()> {
        let t = Instant::now();
        let rewritten = upstream::rewrite_request(upstream, ctx);
        ctx.charge(t);
        rewritten
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut Self::CTX,
    ) -> pingora::Result<()> {
        // Pingora replays only the buffered tail; put the whole (rewritten) body back.
        if let (Some(_), Some(full)) = (body.as_ref(), &ctx.request.body) {
            *body = Some(full.clone());
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut Self::CTX,
    ) -> pingora::Result<()> {
        let direct = ctx.target.deployment.is_some();
        if direct {
            ctx.meter.first_byte.get_or_insert_with(Instant::now);
            trace::close_between(ctx);
        }
        headers::edit_response(response, |h| {
            if direct {
                h.insert(headers::ROUTE, HeaderValue::from_static("direct"));
                let us = u64::try_from(ctx.overhead.as_micros()).unwrap_or(u64::MAX);
                h.insert(headers::OVERHEAD, headers::millis(us));
                if ctx.meter.scanner.as_ref().is_some_and(|u| u.strips()) {
                    // The body changes length when the usage chunk is removed.
                    h.remove(http::header::CONTENT_LENGTH);
                }
            }
            respond::tag(h, ctx)
        })
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Self::CTX,
        mut e: Box<Error>,
    ) -> Box<Error> {
        // Nothing reached the backend: safe to try another one.
        if upstream::retry(ctx, false) {
            e.set_retry(true);
            self.count_retry(ctx);
        }
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut Self::CTX,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("peer {peer}"));
        // Retry only a pooled connection the backend had already closed, before any response
        // byte: the request never ran. Anything else may have run and is not repeated.
        let never_ran = client_reused
            && session.response_written().is_none()
            && ctx.meter.first_byte.is_none()
            && e.esource() == &ErrorSource::Upstream;
        let retry = never_ran && upstream::retry(ctx, true);
        if retry {
            self.count_retry(ctx);
        }
        e.set_retry(retry);
        e
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Self::CTX,
    ) -> pingora::Result<Option<std::time::Duration>> {
        let t = Instant::now();
        if let Some(scanner) = ctx.meter.scanner.as_mut() {
            let chunk = body.take().unwrap_or_default();
            let out = scanner.feed(&chunk, end_of_stream).unwrap_or(chunk);
            // An empty chunk would end a chunked body early: send nothing instead.
            *body = (!out.is_empty()).then_some(out);
        }
        ctx.meter.bytes_out += body.as_ref().map_or(0, |b| b.len() as u64);
        ctx.charge(t);
        Ok(None)
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut Self::CTX,
    ) -> FailToProxy {
        let err = ctx
            .target
            .failure
            .take()
            .or_else(|| errors::proxy(e, ctx.target.deployment.as_deref()));
        if let Some(err) = &err {
            self.note_refusal(session, ctx, err);
        }
        let error_code = match err {
            Some(err) if session.response_written().is_none() => {
                if let Err(write) = respond::send_error(session, ctx, &err).await {
                    log::debug!("could not send error response: {write}");
                }
                err.status
            }
            Some(err) => err.status,
            None => 0,
        };
        FailToProxy {
            error_code,
            can_reuse_downstream: false,
        }
    }

    fn suppress_error_log(&self, _session: &Session, _ctx: &Self::CTX, _error: &Error) -> bool {
        // `logging` says it, with the request's id and trace.
        true
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Self::CTX) {
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        // A client that hangs up mid-stream is normal for LLM traffic, not an error.
        if let Some(e) = e.filter(|e| e.esource() != &ErrorSource::Downstream) {
            let trace = ctx.request.trace.as_ref().map(|t| t.trace_id_hex());
            log::error!(
                "{} failed: {e} (status {status}, request {}, trace {})",
                session.request_summary(),
                ctx.request.id,
                trace.as_deref().unwrap_or("-")
            );
        }
        self.finish(ctx, status, e);
    }
}
