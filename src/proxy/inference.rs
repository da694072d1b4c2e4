//! An inference request up to its backend: the body and its control fields, the deployment
//! (the route policy), admission (maintenance, token limits, demand), then an instance to
//! proxy to, or the cold path through Globus Compute.

use super::cold::ColdRequest;
use super::routing::Pick;
use super::serve::Outcome;
use super::trace::phase_span;
use super::{body, errors, headers, routing, Gateway, RequestCtx};
use crate::auth::Identity;
use crate::catalog::{Deployment, InstanceGuard, PoolError};
use crate::openai::Endpoint;
use crate::openai::{parse_control_fields, ApiError, ControlFields};
use crate::usage::UsageScanner;
use bytes::Bytes;
use pingora::proxy::Session;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

/// What the URL asks for: cluster and framework (FIRST's layout), and the endpoint.
pub type Asked<'a> = (Option<&'a str>, Option<&'a str>, Endpoint);

impl Gateway {
    /// Reads and checks the body, finds the deployment, admits the request, and reserves an
    /// instance (`Outcome::Proxy`) or answers through Globus Compute.
    pub(super) async fn inference(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        asked: Asked<'_>,
        identity: &Identity,
    ) -> Result<Outcome, ApiError> {
        let (cluster, framework, endpoint) = asked;
        let max_body = self.accounting.caps.max_body_bytes();
        let body = body::read_body(session, max_body, self.edge.client_read_timeout).await?;
        let t = Instant::now();
        let control = parse_control_fields(&body, endpoint)?;
        // The request keeps the policy version it started with, whatever reloads meanwhile.
        let routing_span = phase_span!(ctx, "route");
        let routed = routing::route(
            &self.catalog.load_full(),
            &self.policies.current(),
            &self.metrics,
            identity,
            session.req_header(),
            &routing::Asked {
                cluster,
                framework,
                endpoint,
                model: &control.model,
                stream: control.stream,
                body_len: body.len(),
                batch: ctx.request.batch_id.is_some(),
                prompt: (&control, &body),
            },
        )?;
        drop(routing_span);
        let deployment = routed.deployment.clone();
        self.admit(ctx, identity, &deployment, &control, body.len())
            .await?;
        ctx.request.endpoint = Some(endpoint);
        ctx.request.stream = control.stream;
        ctx.meter.bytes_in = body.len() as u64;
        let first_try = match &ctx.request.batch_id {
            // Batch lines run on hot instances only, never while an interactive request waits
            // for a slot, and leave some of each instance's slots free.
            Some(_)
                if routed.via_compute || deployment.demand.waiting.load(Ordering::Relaxed) > 0 =>
            {
                return Err(errors::background_busy(&deployment))
            }
            Some(_) => match deployment.pool.try_acquire_spare() {
                Ok(slot) => Some(Ok(slot)),
                Err(_) => return Err(errors::background_busy(&deployment)),
            },
            None => self.first_instance(&routed),
        };
        let Some(first_try) = first_try else {
            ctx.target.route = "compute";
            ctx.target.deployment = Some(deployment.clone());
            ctx.charge(t);
            let cold = ColdRequest::new(deployment, endpoint, &control, body);
            // Boxed: the cold path's future (Compute's calls) is several KiB, and held inline
            // it would make every hot request's future that much larger to build and move.
            return Box::pin(self.answer_cold(session, ctx, cold)).await;
        };
        ctx.target.route = "direct";
        headers::ready_for_copy(session.req_header_mut());
        forward(ctx, endpoint, &control, body, &deployment);
        ctx.charge(t);
        self.reserve_instance(ctx, &deployment, first_try).await?;
        Ok(Outcome::Proxy)
    }

    /// What may still refuse a request its deployment could serve (maintenance, the token
    /// limits; the user's rate and requests in flight were counted before routing); then it
    /// counts as the model's demand.
    async fn admit(
        &self,
        ctx: &mut RequestCtx,
        identity: &Identity,
        d: &Deployment,
        control: &ControlFields,
        body_len: usize,
    ) -> Result<(), ApiError> {
        if let Some(message) = self.maintenance.refusal(Some(&d.cluster)) {
            return Err(errors::maintenance(message));
        }
        let limits = &self.accounting.limits;
        let exempt = self.exempt(identity);
        // About four bytes of prompt per token, plus what the answer may use.
        let estimate = (body_len as u64 / 4).saturating_add(
            control
                .max_tokens
                .unwrap_or(self.accounting.caps.default_max_tokens()),
        );
        ctx.target.tokens = self.limited(
            limits
                .reserve_tokens(
                    &identity.username,
                    &d.model,
                    d.tokens_per_minute,
                    d.tokens_per_minute_per_user.filter(|_| !exempt),
                    estimate,
                )
                .await,
        )?;
        ctx.target.accounting = Some(self.accounting.clone());
        d.demand.requests.fetch_add(1, Ordering::Relaxed);
        d.demand
            .prompt_bytes
            .fetch_add(body_len as u64, Ordering::Relaxed);
        Ok(())
    }

    /// The first try at an instance, or `None` for the cold path: the policy chose it, or the
    /// last instance went away since the policy chose and the model can run through Compute.
    fn first_instance(&self, routed: &routing::Routed) -> Option<Result<InstanceGuard, PoolError>> {
        if routed.via_compute {
            return None;
        }
        let d = &routed.deployment;
        let picked = routed.instance.as_ref().and_then(|pick| match pick {
            Pick::Named(socket) => d.pool.try_acquire_at(*socket),
            Pick::Serving(instance) => d.pool.try_reserve(instance),
        });
        let first = match picked {
            Some(slot) => Ok(slot),
            None => d.pool.try_acquire(&[]),
        };
        let lost = matches!(first, Err(PoolError::NoHealthyBackend))
            && d.compute.is_some()
            && self.cold.is_some();
        (!lost).then_some(first)
    }

    /// Holds a backend connection's descriptor and an instance slot, waiting for one when
    /// every instance is at its cap.
    async fn reserve_instance(
        &self,
        ctx: &mut RequestCtx,
        d: &Arc<Deployment>,
        first_try: Result<InstanceGuard, PoolError>,
    ) -> Result<(), ApiError> {
        let descriptor = self.admission.reserve_upstream();
        ctx.target.descriptor = Some(descriptor.ok_or_else(errors::at_capacity)?);
        let slot = match first_try {
            Err(PoolError::AtCapacity) => {
                let _waiting = d.demand.waiting();
                let _span = phase_span!(ctx, "admission_wait");
                d.pool.acquire(&[]).await
            }
            other => other,
        }
        .map_err(|e| errors::pool(e, d))?;
        ctx.target.slot = Some(slot);
        self.series(d).in_flight.inc();
        ctx.target.in_flight = true;
        ctx.target.deployment = Some(d.clone());
        Ok(())
    }
}

/// The body to forward (the backend's model name; streams asked for their usage) and the
/// scanner of the response.
fn forward(
    ctx: &mut RequestCtx,
    endpoint: Endpoint,
    control: &ControlFields,
    body: Bytes,
    d: &Deployment,
) {
    let rename = (control.model != d.backend_model).then_some(d.backend_model.as_str());
    // OpenAI chunk streams report usage in a last chunk only when asked: ask for every stream,
    // and hide that chunk from clients that did not ask for it themselves. (Typed-event
    // streams always end with their usage.)
    let ask_usage = control.stream && !control.include_usage && endpoint.usage_on_request();
    let body = if rename.is_some() || ask_usage {
        control.rewrite(&body, rename, ask_usage)
    } else {
        body
    };
    ctx.request.body = Some(body);
    ctx.meter.scanner = Some(UsageScanner::new(control.stream, ask_usage));
}
