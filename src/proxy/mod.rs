//! The Pingora `ProxyHttp` implementation: one request's trip through the phases.
//!
//! Each phase is a short step that calls into the domain modules: `routes` (which route),
//! `body` + `openai` (read and check the body), `catalog` (which model, which instance),
//! `policy` (which deployment), `errors` (what the client is told), `admin::listings` (reads).

mod body;
mod cold;
mod ctx;
mod errors;
mod respond;
mod routes;
mod routing;

pub use cold::ColdPath;
pub use ctx::RequestCtx;

use crate::admin::listings;
use crate::auth::{rules, Authenticator, CacheOutcome, Identity};
use crate::catalog::{Catalog, Deployment, PoolError};
use crate::edge::{Admission, DrainState, Maintenance, TrustedProxies};
use crate::metrics::Metrics;
use crate::openai::{parse_control_fields, ApiError};
use crate::policy::PolicyStore;
use crate::usage::{Accounting, Limited, UsageRecord, UsageScanner};
use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{Error, ErrorSource, ErrorType};
use routes::{Read, Route};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Request headers that must not travel to a backend: hop-by-hop headers, the client's
/// credentials, and encodings we want to see in plain text.
const STRIPPED_UPSTREAM_HEADERS: [&str; 11] = [
    "authorization",
    "proxy-authorization",
    "connection",
    "keep-alive",
    "te",
    "upgrade",
    "expect",
    "transfer-encoding",
    "accept-encoding",
    // Client-written claims about the client; the gateway sends its own X-Forwarded-*.
    "forwarded",
    "x-real-ip",
];

/// What the gateway is built from.
pub struct GatewayParts {
    pub catalog: Arc<Catalog>,
    pub auth: Arc<Authenticator>,
    pub metrics: Arc<Metrics>,
    pub policies: Arc<PolicyStore>,
    /// Globus Compute for cold models, if configured.
    pub cold: Option<ColdPath>,
    /// Wakes the scale policy (a request found no hot instance).
    pub scale_wake: Arc<tokio::sync::Notify>,
    pub accounting: Arc<Accounting>,
    pub max_body_bytes: usize,
    pub edge: crate::config::Edge,
    pub maintenance: Arc<Maintenance>,
    /// Counts requests in flight, for the drain on shutdown.
    pub drain: Arc<DrainState>,
    /// Connection and descriptor budget (a proxied request needs a backend connection).
    pub admission: Arc<Admission>,
}

/// The gateway's proxy logic.
pub struct Gateway {
    catalog: Arc<Catalog>,
    auth: Arc<Authenticator>,
    metrics: Arc<Metrics>,
    policies: Arc<PolicyStore>,
    cold: Option<ColdPath>,
    scale_wake: Arc<tokio::sync::Notify>,
    accounting: Arc<Accounting>,
    max_body_bytes: usize,
    trusted_proxies: TrustedProxies,
    edge: crate::config::Edge,
    maintenance: Arc<Maintenance>,
    drain: Arc<DrainState>,
    admission: Arc<Admission>,
    /// Unix time of start-up, reported as `created` in model listings.
    started_unix: u64,
}

impl Gateway {
    pub fn new(p: GatewayParts) -> Self {
        let started_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Gateway {
            catalog: p.catalog,
            auth: p.auth,
            metrics: p.metrics,
            policies: p.policies,
            cold: p.cold,
            scale_wake: p.scale_wake,
            accounting: p.accounting,
            max_body_bytes: p.max_body_bytes,
            trusted_proxies: TrustedProxies::new(p.edge.trusted_proxies.clone()),
            edge: p.edge,
            maintenance: p.maintenance,
            drain: p.drain,
            admission: p.admission,
            started_unix,
        }
    }

    /// Authenticates the request (the token cache makes this cheap for a known token).
    async fn authenticate(
        &self,
        session: &Session,
        ctx: &mut RequestCtx,
    ) -> Result<Arc<Identity>, ApiError> {
        let t = Instant::now();
        let header = session
            .req_header()
            .headers
            .get(http::header::AUTHORIZATION);
        let (result, outcome) = self.auth.authenticate(header.map(|h| h.as_bytes())).await;
        if let Some(outcome) = outcome {
            let label = match outcome {
                CacheOutcome::Hit => {
                    ctx.charge(t);
                    "hit"
                }
                CacheOutcome::Miss => "miss",
            };
            self.metrics.auth_cache.with_label_values(&[label]).inc();
        }
        result.map_err(errors::auth)
    }

    /// Answers a read route for `identity`, showing only what it may use.
    fn read(
        &self,
        read: &Read,
        query: Option<&str>,
        identity: &Identity,
    ) -> Result<Bytes, ApiError> {
        let visible = |d: &Deployment| {
            rules::may_see(identity, &d.cluster_access) && rules::may_see(identity, &d.model_access)
        };
        Ok(match read {
            Read::Models => listings::models(&self.catalog, self.started_unix, visible),
            Read::ListEndpoints => listings::list_endpoints(&self.catalog, visible),
            Read::Health => Bytes::from_static(br#"{"status":"ok"}"#),
            Read::Whoami => Bytes::from(identity.whoami().to_string()),
            Read::Usage => {
                let models = self.accounting.totals.of(&identity.username);
                let sum = |f: fn(&crate::usage::Totals) -> u64| models.iter().map(f).sum::<u64>();
                let total = serde_json::json!({
                    "requests": sum(|t| t.requests), "prompt_tokens": sum(|t| t.prompt_tokens),
                    "completion_tokens": sum(|t| t.completion_tokens), "total_tokens": sum(|t| t.total_tokens),
                });
                Bytes::from(
                    serde_json::json!({"username": identity.username, "models": models, "total": total})
                        .to_string(),
                )
            }
            Read::Jobs { cluster } => {
                listings::jobs(&self.catalog, cluster, visible).ok_or_else(|| {
                    errors::lookup(crate::catalog::LookupError::ClusterNotFound {
                        cluster: cluster.clone(),
                    })
                })?
            }
            Read::ClusterModels { cluster } => {
                let model_id = query.and_then(|q| {
                    q.split('&')
                        .find_map(|kv| kv.strip_prefix("model_id="))
                        .filter(|v| !v.is_empty())
                });
                listings::cluster_models(&self.catalog, cluster, model_id, visible).ok_or_else(
                    || match model_id {
                        Some(m) if self.catalog.cluster(cluster).is_some() => {
                            errors::lookup(crate::catalog::LookupError::ModelNotFound {
                                cluster: Some(cluster.clone()),
                                model: m.to_string(),
                            })
                        }
                        _ => errors::lookup(crate::catalog::LookupError::ClusterNotFound {
                            cluster: cluster.clone(),
                        }),
                    },
                )?
            }
        })
    }

    /// Routes, authenticates, and either answers (`Some(body)`) or prepares the proxying (`None`).
    async fn serve(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        route: Route,
        query: Option<&str>,
    ) -> Result<Option<Bytes>, ApiError> {
        if let Some(ip) = ctx.client.as_ref().map(|c| c.ip) {
            self.limited(self.accounting.limits.check_ip(ip))?;
        }
        if route == Route::Read(Read::Health) {
            return Ok(Some(Bytes::from_static(br#"{"status":"ok"}"#)));
        }
        if let Some(message) = self.maintenance.refusal(None) {
            return Err(errors::maintenance(message));
        }
        let identity = self.authenticate(session, ctx).await?;
        if self.auth.is_enforcing() {
            self.limited(self.accounting.limits.check_user(&identity.username))?;
        }
        ctx.identity = Some(identity.clone());
        match route {
            Route::Read(read) => {
                let t = Instant::now();
                let body = self.read(&read, query, &identity);
                ctx.charge(t);
                body.map(Some)
            }
            route => {
                let cold = self
                    .prepare_inference(session, ctx, route, &identity)
                    .await?;
                match cold {
                    None => Ok(None),
                    Some(cold) => self.answer_cold(session, ctx, cold).await.map(|()| None),
                }
            }
        }
    }

    /// Runs the request through Globus Compute and answers it (the response is written here,
    /// so `ctx.answered` is set).
    async fn answer_cold(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        req: ColdRequest,
    ) -> Result<(), ApiError> {
        let Some(cold_path) = &self.cold else {
            return Err(errors::compute_unavailable(&req.deployment));
        };
        // Counts as waiting demand, and asks the scale policy now rather than at its next run.
        let _cold = req.deployment.demand.cold();
        self.scale_wake.notify_one();
        let task = cold::submit(cold_path, &req.deployment, req.endpoint, &req.body).await?;
        ctx.answered = true;
        let written = if req.stream {
            cold::answer_stream(
                session,
                cold_path,
                &req.deployment,
                &task,
                req.endpoint,
                req.include_usage,
            )
            .await
            .map(|tokens| ctx.cold_tokens = tokens)
        } else {
            match cold::completion(cold_path, &req.deployment, &task).await {
                Ok(c) => {
                    ctx.cold_tokens = Some(cold::tokens_of(&c));
                    cold::answer_json(session, &task, &c).await
                }
                Err(e) => {
                    ctx.answered = false;
                    return Err(e);
                }
            }
        };
        if let Err(e) = written {
            // The client went away while the task ran.
            log::debug!("cold answer for task {task} not delivered: {e}");
        }
        Ok(())
    }

    /// Reads and checks the body, finds the deployment and reserves an instance; or, when the
    /// policy chose Globus Compute, returns what the cold path needs.
    async fn prepare_inference(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        route: Route,
        identity: &Identity,
    ) -> Result<Option<ColdRequest>, ApiError> {
        let Route::Inference {
            cluster,
            framework,
            endpoint,
        } = route
        else {
            unreachable!("only inference routes are prepared");
        };
        let body =
            body::read_body(session, self.max_body_bytes, self.edge.client_read_timeout).await?;
        let t = Instant::now();
        let control = parse_control_fields(&body, endpoint)?;
        // The request keeps the policy version it started with, whatever reloads meanwhile.
        let policies = self.policies.current();
        let routing::Routed {
            deployment,
            instance,
            via_compute,
        } = routing::route(
            &self.catalog,
            &policies,
            &self.metrics,
            identity,
            session.req_header(),
            &routing::Asked {
                cluster: cluster.as_deref(),
                framework: framework.as_deref(),
                endpoint,
                model: &control.model,
                stream: control.stream,
                body_len: body.len(),
            },
        )?;
        if let Some(message) = self.maintenance.refusal(Some(&deployment.cluster)) {
            return Err(errors::maintenance(message));
        }
        self.limited(self.accounting.limits.check_tokens(
            &identity.username,
            &deployment.model,
            deployment.tokens_per_minute,
            deployment.tokens_per_minute_per_user,
        ))?;
        deployment.demand.requests.fetch_add(1, Ordering::Relaxed);
        deployment
            .demand
            .prompt_bytes
            .fetch_add(body.len() as u64, Ordering::Relaxed);
        ctx.bytes_in = body.len() as u64;
        let rename = (control.model != deployment.backend_model)
            .then_some(deployment.backend_model.as_str());
        ctx.endpoint = Some(endpoint);
        ctx.stream = control.stream;
        let first_try = (!via_compute).then(|| {
            match instance.and_then(|i| deployment.pool.try_acquire_at(i)) {
                Some(slot) => Ok(slot),
                None => deployment.pool.try_acquire(&[]),
            }
        });
        // The policy's choice, or the last instance went away since it chose: the cold path.
        let lost_instances = matches!(first_try, Some(Err(PoolError::NoHealthyBackend)))
            && deployment.compute.is_some()
            && self.cold.is_some();
        let Some(first_try) = first_try.filter(|_| !lost_instances) else {
            ctx.route_kind = "compute";
            ctx.deployment = Some(deployment.clone());
            ctx.charge(t);
            let body = match rename {
                Some(_) => control.rewrite(&body, rename, false),
                None => body,
            };
            return Ok(Some(ColdRequest {
                deployment,
                endpoint,
                body,
                stream: control.stream,
                include_usage: control.include_usage,
            }));
        };
        // Streams report usage in a last chunk only when asked: ask for clients that did not
        // (and hide that chunk from them); respect clients that set stream_options themselves.
        let inject = control.stream && !control.has_stream_options;
        let body = if rename.is_some() || inject {
            control.rewrite(&body, rename, inject)
        } else {
            body
        };
        ctx.body = Some(body);
        ctx.usage = Some(UsageScanner::new(control.stream, inject));
        ctx.route_kind = "direct";
        ctx.charge(t);
        ctx.descriptor = Some(
            self.admission
                .reserve_upstream()
                .ok_or_else(errors::at_capacity)?,
        );
        let slot = match first_try {
            Err(PoolError::AtCapacity) => {
                let _waiting = deployment.demand.waiting();
                deployment.pool.acquire(&[]).await
            }
            other => other,
        }
        .map_err(|e| errors::pool(e, &deployment))?;
        ctx.slot = Some(slot);
        self.metrics
            .in_flight
            .with_label_values(&[&deployment.cluster, &deployment.model])
            .inc();
        ctx.counted_in_flight = true;
        ctx.deployment = Some(deployment);
        Ok(None)
    }
}

/// A request the policy sent through Globus Compute.
struct ColdRequest {
    deployment: Arc<Deployment>,
    endpoint: crate::config::Endpoint,
    /// The body with the backend's model name.
    body: Bytes,
    stream: bool,
    /// The client asked for the usage chunk.
    include_usage: bool,
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        let mut ctx = RequestCtx::new();
        ctx.active = Some(self.drain.begin());
        ctx
    }

    async fn request_filter(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<bool> {
        let t = Instant::now();
        ctx.client = self.take_connection(session);
        let req = session.req_header();
        let matched = if head_len(req) > self.edge.max_header_bytes {
            Err(errors::headers_too_large(self.edge.max_header_bytes))
        } else {
            routes::match_route(&req.method, req.uri.path())
                .map_err(|e| errors::route(e, &req.method, req.uri.path()))
        };
        let query = req.uri.query().map(str::to_owned);
        ctx.charge(t);
        let outcome = match matched {
            Ok(route) => self.serve(session, ctx, route, query.as_deref()).await,
            Err(e) => Err(e),
        };
        match outcome {
            Ok(None) if ctx.answered => Ok(true),
            Ok(None) => Ok(false),
            Ok(Some(body)) => {
                respond::send_json(session, 200, body, &[]).await?;
                Ok(true)
            }
            Err(err) => {
                respond::send_error(session, &err).await?;
                Ok(true)
            }
        }
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<Box<HttpPeer>> {
        let t = Instant::now();
        let deployment = ctx
            .deployment
            .clone()
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "no deployment chosen"))?;
        if !ctx.tried.is_empty() {
            // A retry: free the failed slot and take another instance, or the same one again
            // when only its pooled connection was stale.
            ctx.slot = None;
            let mut next = deployment.pool.try_acquire(&ctx.tried);
            if next.is_err() && ctx.stale_connection {
                next = deployment.pool.try_acquire(&[]);
            }
            match next {
                Ok(slot) => ctx.slot = Some(slot),
                Err(e) => {
                    ctx.failure = Some(errors::pool(e, &deployment));
                    return Err(Error::explain(
                        ErrorType::HTTPStatus(503),
                        "no backend left to retry",
                    ));
                }
            }
        }
        let slot = ctx
            .slot
            .as_ref()
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "no instance reserved"))?;
        ctx.tried.push(slot.instance().socket);
        ctx.instance = Some(slot.instance().id());
        let peer = deployment.pool.peer(slot.instance());
        ctx.charge(t);
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        let t = Instant::now();
        let (Some(deployment), Some(slot), Some(endpoint)) =
            (&ctx.deployment, &ctx.slot, ctx.endpoint)
        else {
            return Err(Error::explain(
                ErrorType::InternalError,
                "upstream request without a target",
            ));
        };
        let addr = &slot.instance().addr;
        let path = format!("{}/{}", addr.base_path, endpoint.path());
        upstream.set_uri(
            http::Uri::try_from(path)
                .map_err(|_| Error::explain(ErrorType::InternalError, "bad upstream path"))?,
        );
        for name in STRIPPED_UPSTREAM_HEADERS {
            upstream.remove_header(name);
        }
        upstream.insert_header("host", addr.authority())?;
        if let Some(client) = &ctx.client {
            upstream.insert_header("x-forwarded-for", client.forwarded_for.as_str())?;
            upstream.insert_header("x-forwarded-proto", client.proto)?;
        }
        if let Some(auth) = &deployment.pool.settings.authorization {
            upstream.insert_header("authorization", auth.clone())?;
        }
        let len = ctx.body.as_ref().map_or(0, Bytes::len);
        upstream.insert_header("content-length", len.to_string())?;
        ctx.charge(t);
        Ok(())
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        // Pingora replays only the buffered tail; put the whole (rewritten) body back.
        if body.is_some() {
            if let Some(full) = &ctx.body {
                *body = Some(full.clone());
            }
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        if ctx.deployment.is_some() {
            ctx.first_byte.get_or_insert_with(Instant::now);
            response.insert_header("x-firstgate-route", "direct")?;
            let overhead = format!("{:.3}", ctx.overhead.as_secs_f64() * 1000.0);
            response.insert_header("x-firstgate-overhead-ms", overhead)?;
            if ctx.usage.as_ref().is_some_and(|u| u.strips()) {
                // The body changes length when the usage chunk is removed.
                response.remove_header("content-length");
            }
        }
        response.insert_header("x-request-id", ctx.request_id.as_str())?;
        Ok(())
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        // Nothing reached the backend: safe to try another one.
        if ctx.retries_left > 0 {
            ctx.retries_left -= 1;
            ctx.stale_connection = false;
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
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("peer {peer}"));
        // Retry only a pooled connection the backend had already closed, before any response
        // byte: the request never ran. Anything else may have run and is not repeated.
        let retry = client_reused
            && session.response_written().is_none()
            && ctx.first_byte.is_none()
            && ctx.retries_left > 0
            && e.esource() == &ErrorSource::Upstream;
        if retry {
            ctx.retries_left -= 1;
            ctx.stale_connection = true;
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
        ctx: &mut RequestCtx,
    ) -> pingora::Result<Option<std::time::Duration>> {
        let t = Instant::now();
        if let Some(scanner) = ctx.usage.as_mut() {
            let chunk = body.take().unwrap_or_default();
            let out = scanner.feed(&chunk, end_of_stream).unwrap_or(chunk);
            // An empty chunk would end a chunked body early: send nothing instead.
            *body = (!out.is_empty()).then_some(out);
        }
        ctx.bytes_out += body.as_ref().map_or(0, |b| b.len() as u64);
        ctx.charge(t);
        Ok(None)
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let err = ctx
            .failure
            .take()
            .or_else(|| errors::proxy(e, ctx.deployment.as_deref()));
        let code = match err {
            Some(err) if session.response_written().is_none() => {
                if let Err(write) = respond::send_error(session, &err).await {
                    log::debug!("could not send error response: {write}");
                }
                err.status
            }
            Some(err) => err.status,
            None => 0,
        };
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    fn suppress_error_log(&self, _session: &Session, _ctx: &RequestCtx, error: &Error) -> bool {
        // A client that hangs up mid-stream is normal for LLM traffic, not an error.
        error.esource() == &ErrorSource::Downstream
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        ctx.slot = None;
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        if let Some(record) = self.usage_record(ctx, status, e.is_some()) {
            let kinds = [
                ("prompt", record.prompt_tokens),
                ("completion", record.completion_tokens),
            ];
            for (kind, n) in kinds {
                self.metrics
                    .tokens
                    .with_label_values(&[&record.cluster, &record.model, kind])
                    .inc_by(n);
            }
            let prompt = ctx.body.as_deref();
            let client = ctx.client.as_ref().map(|c| c.ip);
            self.accounting.finish(record, prompt, client);
        }
        let (cluster, model) = ctx
            .deployment
            .as_deref()
            .map_or(("", ""), |d| (d.cluster.as_str(), d.model.as_str()));
        let m = &self.metrics;
        m.requests
            .with_label_values(&[cluster, model, status_label(status)])
            .inc();
        m.overhead
            .with_label_values(&[ctx.route_kind])
            .observe(ctx.overhead.as_secs_f64());
        if ctx.deployment.is_some() {
            let labels = [cluster, model];
            m.request_duration
                .with_label_values(&labels)
                .observe(ctx.started.elapsed().as_secs_f64());
            if let Some(first) = ctx.first_byte {
                m.time_to_first_byte
                    .with_label_values(&labels)
                    .observe((first - ctx.started).as_secs_f64());
            }
            if ctx.counted_in_flight {
                m.in_flight.with_label_values(&labels).dec();
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

impl Gateway {
    /// Applies the edge's client timeouts to the request, ends keep-alive while handing over or
    /// draining, and tells who the client is behind any trusted proxies.
    fn take_connection(&self, session: &mut Session) -> Option<crate::edge::Client> {
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

    /// A rate limit's refusal as a 429 (and counted).
    fn limited(&self, check: Result<(), Limited>) -> Result<(), ApiError> {
        check.map_err(|l| {
            self.metrics
                .rate_limited
                .with_label_values(&[l.limit])
                .inc();
            errors::rate_limited(&l)
        })
    }

    /// The usage record of a finished inference request.
    fn usage_record(&self, ctx: &RequestCtx, status: u16, error: bool) -> Option<UsageRecord> {
        let d = ctx.deployment.as_ref()?;
        let identity = ctx.identity.as_ref()?;
        let scanned = ctx.usage.as_ref();
        let tokens = ctx
            .cold_tokens
            .or_else(|| scanned.map(UsageScanner::tokens))
            .unwrap_or_default();
        // A stream that stopped before its end (or any answer cut by an error) was cancelled.
        let cancelled =
            status == 200 && (error || (ctx.stream && !scanned.is_some_and(|s| s.finished)));
        Some(UsageRecord {
            request_id: ctx.request_id.clone(),
            time_ms: ctx.arrived_ms,
            user_id: identity.id.clone(),
            username: identity.username.clone(),
            cluster: d.cluster.clone(),
            framework: d.framework.clone(),
            model: d.model.clone(),
            endpoint: ctx
                .endpoint
                .map(|e| e.path().to_string())
                .unwrap_or_default(),
            route: ctx.route_kind.to_string(),
            status,
            prompt_tokens: tokens.prompt,
            completion_tokens: tokens.completion,
            total_tokens: tokens.total,
            ttft_ms: ctx.first_byte.map(|f| (f - ctx.started).as_millis() as u64),
            duration_ms: ctx.started.elapsed().as_millis() as u64,
            bytes_in: ctx.bytes_in,
            bytes_out: ctx.bytes_out,
            instance: ctx.instance.clone().unwrap_or_default(),
            cancelled,
        })
    }

    fn count_retry(&self, ctx: &RequestCtx) {
        if let Some(d) = &ctx.deployment {
            self.metrics
                .retries
                .with_label_values(&[&d.cluster, &d.model])
                .inc();
        }
    }
}

/// Status codes as static label values (no allocation per request).
fn status_label(status: u16) -> &'static str {
    match status {
        200 => "200",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        405 => "405",
        408 => "408",
        411 => "411",
        413 => "413",
        422 => "422",
        429 => "429",
        431 => "431",
        500 => "500",
        502 => "502",
        503 => "503",
        504 => "504",
        0 => "0",
        s if s < 300 => "2xx",
        s if s < 400 => "3xx",
        s if s < 500 => "4xx",
        _ => "5xx",
    }
}
