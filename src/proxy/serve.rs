//! The steps every request takes: who the client is, which route, the limits and the
//! maintenance switch, authentication; then a read or an inference, and the answer.

use super::routes::{self, Read, Route};
use super::trace::phase_span;
use super::{errors, respond, Gateway, RequestCtx};
use crate::activity::Refusal;
use crate::auth::{CacheOutcome, Identity};
use crate::edge::{Client, Preflight};
use crate::openai::ApiError;
use crate::usage::Limited;
use bytes::Bytes;
use pingora::http::RequestHeader;
use pingora::proxy::Session;
use std::sync::Arc;
use std::time::Instant;

/// How a request was handled before any upstream phase.
pub enum Outcome {
    /// A body the gateway answers with (200, JSON).
    Answer(Bytes),
    /// The response is written already (the cold path).
    Answered,
    /// Proxy it: an instance is reserved in the context.
    Proxy,
    /// A CORS preflight's answer: 204 with these headers.
    Preflight(Vec<(http::HeaderName, http::HeaderValue)>),
}

impl Gateway {
    /// Applies the edge's client timeouts to the request, ends keep-alive while handing over or
    /// draining, and tells who the client is behind any trusted proxies.
    pub(super) fn take_connection(&self, session: &mut Session) -> Option<Client> {
        session.set_read_timeout(Some(self.edge.client_read_timeout));
        session.set_write_timeout(Some(self.edge.client_write_timeout));
        // The edge layer times idle connections out; here keep-alive is only taken away (the
        // client's own choice, `Connection: close` or HTTP/1.0, stands otherwise).
        if !self.drain.keeps_connections() {
            session.set_keepalive(None);
        }
        let peer = session.client_addr()?.as_inet()?.ip();
        let tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
        Some(
            self.trusted_proxies
                .client(peer, tls, &session.req_header().headers),
        )
    }

    /// The route of the request line, if its head is not too large.
    pub(super) fn match_route(&self, req: &RequestHeader) -> Result<Route, ApiError> {
        if head_len(req) > self.edge.max_header_bytes {
            return Err(errors::headers_too_large(self.edge.max_header_bytes));
        }
        routes::match_route(&req.method, req.uri.path())
            .map_err(|e| errors::route(e, &req.method, req.uri.path()))
    }

    /// Limits, maintenance and authentication, then the route itself.
    pub(super) async fn serve(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        route: Route,
    ) -> Result<Outcome, ApiError> {
        // Compute nodes posting a cold stream's lines: their own credentials, no user limits,
        // and served under maintenance too (the streams are already running).
        if let Route::Relay(kind) = route {
            return self.relay_post(session, kind).await;
        }
        if let Some(ip) = ctx.request.client.as_ref().map(|c| c.ip) {
            self.limited(self.accounting.limits.check_ip(ip).await)?;
        }
        if let Route::Preflight { allow } = route {
            return self.preflight(session.req_header(), allow);
        }
        if route == Route::Read(Read::Health) {
            return Ok(Outcome::Answer(Bytes::from_static(br#"{"status":"ok"}"#)));
        }
        if let Some(message) = self.maintenance.refusal(None) {
            return Err(errors::maintenance(message));
        }
        // A line of a batch this process runs: as its owner; the runner paces the lines.
        let line = self.batch_line_owner(session);
        let identity = match line {
            Some((owner, batch)) => {
                ctx.request.batch_id = Some(batch);
                Arc::new(owner)
            }
            None => self.authenticate(session, ctx).await?,
        };
        let exempt = self.exempt(&identity);
        // Without authentication every client is the same user: no per-user request limits.
        if self.auth.is_enforcing() && !exempt && ctx.request.batch_id.is_none() {
            // An inference request also holds one of the user's requests in flight.
            let slot = matches!(route, Route::Inference { .. });
            let limits = &self.accounting.limits;
            ctx.target.user_slot =
                self.limited(limits.admit_user(&identity.username, slot).await)?;
        }
        // Only those spared the limits may keep their requests out of usage reports.
        ctx.request.loadtest &= exempt;
        ctx.request.identity = Some(identity.clone());
        match route {
            Route::Read(read) => {
                let t = Instant::now();
                let query = session.req_header().uri.query();
                let body = self.read(&read, query, &identity);
                ctx.charge(t);
                body.map(Outcome::Answer)
            }
            Route::Inference {
                cluster,
                framework,
                endpoint,
            } => {
                let asked = (cluster.as_deref(), framework.as_deref(), endpoint);
                self.inference(session, ctx, asked, &identity).await
            }
            // Boxed, as the cold path is: rare, and its future would otherwise make every
            // request's several KiB larger.
            Route::Batch(call) => Box::pin(self.batch_api(session, ctx, call, &identity)).await,
            Route::Preflight { .. } | Route::Relay(_) => {
                unreachable!("answered before authentication")
            }
        }
    }

    /// A browser asks whether a page of its origin may call `allow` on this path; preflights
    /// carry no credentials, so this comes before authentication.
    fn preflight(&self, req: &RequestHeader, allow: &'static str) -> Result<Outcome, ApiError> {
        let Some(cors) = &self.cors else {
            let not_allowed = routes::RouteError::MethodNotAllowed { allow };
            return Err(errors::route(not_allowed, &req.method, req.uri.path()));
        };
        match cors.preflight(&req.headers, allow) {
            Preflight::Allowed(headers) => Ok(Outcome::Preflight(headers)),
            Preflight::Refused => Err(errors::origin_not_allowed(
                req.headers.get(http::header::ORIGIN),
            )),
        }
    }

    /// Authenticates the request (the token cache makes this cheap for a known token).
    async fn authenticate(
        &self,
        session: &Session,
        ctx: &mut RequestCtx,
    ) -> Result<Arc<Identity>, ApiError> {
        let t = Instant::now();
        let span = phase_span!(ctx, "authenticate", cache = tracing::field::Empty);
        let headers = &session.req_header().headers;
        let header = headers.get(http::header::AUTHORIZATION);
        // Anthropic clients may send the token as `x-api-key` instead.
        let anthropic = ctx.request.envelope == crate::openai::Envelope::Anthropic;
        let api_key = (anthropic && header.is_none())
            .then(|| headers.get("x-api-key"))
            .flatten();
        let (result, outcome) = match api_key {
            Some(key) => self.auth.authenticate_api_key(key.as_bytes()).await,
            None => self.auth.authenticate(header.map(|h| h.as_bytes())).await,
        };
        if let Some(outcome) = outcome {
            let label = match outcome {
                CacheOutcome::Hit => {
                    ctx.charge(t);
                    self.metrics.auth_cache_hits.inc();
                    "hit"
                }
                CacheOutcome::Shared => {
                    self.metrics.auth_cache.with_label_values(&["shared"]).inc();
                    "shared"
                }
                CacheOutcome::Miss => {
                    self.metrics.auth_cache.with_label_values(&["miss"]).inc();
                    "miss"
                }
                CacheOutcome::Joined => {
                    self.metrics.auth_cache.with_label_values(&["joined"]).inc();
                    "joined"
                }
            };
            if let Some(span) = &span {
                span.record("cache", label);
            }
        }
        if let Err(crate::auth::AuthError::Throttled) = &result {
            self.metrics
                .rate_limited
                .with_label_values(&["max_introspections_per_second"])
                .inc();
        }
        result.map_err(errors::auth)
    }

    /// Whether `limits.exempt_users` or `exempt_groups` spare this user the per-user limits.
    pub(super) fn exempt(&self, identity: &Identity) -> bool {
        self.accounting
            .is_exempt(&identity.username, &identity.groups)
    }

    /// A rate limit's refusal as a 429 (and counted).
    pub(super) fn limited<T>(&self, check: Result<T, Limited>) -> Result<T, ApiError> {
        check.map_err(|l| {
            self.metrics
                .rate_limited
                .with_label_values(&[l.limit])
                .inc();
            errors::rate_limited(&l)
        })
    }

    /// Keeps a refusal or error the gateway answers, for the operator's page: what, to whom,
    /// with which request id.
    pub(super) fn note_refusal(&self, session: &Session, ctx: &RequestCtx, err: &ApiError) {
        self.metrics.activity.refused(Refusal {
            at: crate::activity::unix_now(),
            status: err.status,
            code: err.limit.unwrap_or(err.code).to_string(),
            request_id: ctx.request.id.clone(),
            user: ctx
                .request
                .identity
                .as_ref()
                .map(|i| i.username.clone())
                .unwrap_or_default(),
            path: session.req_header().uri.path().chars().take(120).collect(),
        });
    }

    /// Writes what the gateway answers itself; `Ok(false)` when the request is to be proxied.
    pub(super) async fn answer(
        &self,
        session: &mut Session,
        ctx: &RequestCtx,
        outcome: Result<Outcome, ApiError>,
    ) -> pingora::Result<bool> {
        match outcome {
            Ok(Outcome::Proxy) => Ok(false),
            Ok(Outcome::Answered) => Ok(true),
            Ok(Outcome::Answer(body)) => {
                respond::send_json(session, ctx, 200, body, &[]).await?;
                Ok(true)
            }
            Ok(Outcome::Preflight(headers)) => {
                respond::send_preflight(session, ctx, headers).await?;
                Ok(true)
            }
            Err(err) => {
                self.note_refusal(session, ctx, &err);
                respond::send_error(session, ctx, &err).await?;
                Ok(true)
            }
        }
    }
}

/// Size of a request head as received: request line and header lines.
fn head_len(req: &RequestHeader) -> usize {
    let target = req.uri.path_and_query().map_or(1, |p| p.as_str().len());
    let line = req.method.as_str().len() + target + 12;
    req.headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum::<usize>()
        + line
}
