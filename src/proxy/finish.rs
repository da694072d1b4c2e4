//! The end of a request: its usage record (with the access-log line) and its metrics.

use super::{Gateway, RequestCtx};
use crate::auth::Identity;
use crate::catalog::Deployment;
use crate::metrics::{status_label, DeploymentMetrics};
use crate::usage::{Accounting, Ending, Tokens, UsageRecord};
use pingora::{Error, ErrorSource};

impl Gateway {
    /// Records a finished request; `error` is what cut it, if anything did.
    pub(super) fn finish(&self, ctx: &mut RequestCtx, status: u16, error: Option<&Error>) {
        ctx.target.slot = None;
        ctx.target.accounting = None;
        // A client that closes its connection right after the stream's end marker (as SDKs
        // do) got everything: that is no cancel.
        let completed = ctx.meter.scanner.as_ref().is_some_and(|s| s.completed());
        let ending = match error {
            Some(e) if e.esource() == &ErrorSource::Downstream && completed => Ending::Complete,
            Some(e) if e.esource() == &ErrorSource::Downstream => Ending::ClientLeft,
            Some(_) => Ending::Failed,
            None if ctx.meter.client_left => Ending::ClientLeft,
            None => Ending::Complete,
        };
        if ctx.meter.scanner.as_ref().is_some_and(|s| s.unscanned()) {
            self.metrics.usage_unscanned.inc();
        }
        let tokens = ctx.meter.tokens();
        if let Some(reserved) = ctx.target.tokens.take() {
            self.accounting.limits.settle_tokens(reserved, tokens.total);
        }
        let m = &self.metrics;
        m.observe_overhead(ctx.target.route, ctx.overhead.as_secs_f64());
        // Requests without a deployment (listings, refusals) have no record either.
        let Some(d) = ctx.target.deployment.as_deref() else {
            m.requests
                .with_label_values(&["", "", status_label(status)])
                .inc();
            return;
        };
        let series = self.series(d);
        if let Some(identity) = ctx.request.identity.as_deref() {
            series.prompt_tokens.inc_by(tokens.prompt);
            series.completion_tokens.inc_by(tokens.completion);
            let prompt = ctx.request.body.as_deref();
            account(
                &self.accounting,
                ctx,
                (d, identity, tokens),
                (status, ending),
                prompt,
            );
        }
        match status {
            200 => series.answered_ok.inc(),
            _ => m
                .requests
                .with_label_values(&[&d.cluster, &d.model, status_label(status)])
                .inc(),
        }
        let meter = &ctx.meter;
        series
            .duration
            .observe(meter.started.elapsed().as_secs_f64());
        if let Some(first) = meter.first_byte {
            series
                .time_to_first_byte
                .observe((first - meter.started).as_secs_f64());
        }
        if ctx.target.in_flight {
            series.in_flight.dec();
        }
    }

    /// The deployment's metric series (resolved on its first request).
    pub(super) fn series<'d>(&self, d: &'d Deployment) -> &'d DeploymentMetrics {
        d.metrics
            .get_or_init(|| self.metrics.deployment(&d.cluster, &d.model))
    }

    pub(super) fn count_retry(&self, ctx: &RequestCtx) {
        if let Some(d) = &ctx.target.deployment {
            self.metrics
                .retries
                .with_label_values(&[&d.cluster, &d.model])
                .inc();
        }
    }
}

/// A request dropped before it finished (cut when the process exits after its grace period):
/// its record says the gateway broke it off.
pub(super) fn cut(ctx: &mut RequestCtx) {
    let Some(accounting) = ctx.target.accounting.take() else {
        return;
    };
    let started = ctx.meter.first_byte.is_some() || ctx.target.answered;
    let status = if started { 200 } else { 0 };
    let (Some(d), Some(identity)) = (&ctx.target.deployment, &ctx.request.identity) else {
        return;
    };
    let tokens = ctx.meter.tokens();
    account(
        &accounting,
        ctx,
        (d, identity, tokens),
        (status, Ending::Failed),
        None,
    );
}

/// Hands a finished request to the usage accounting: its totals, and its record (built only
/// if a store or the access log keeps it).
fn account(
    accounting: &Accounting,
    ctx: &RequestCtx,
    (d, identity, tokens): (&Deployment, &Identity, Tokens),
    (status, ending): (u16, Ending),
    prompt: Option<&[u8]>,
) {
    let client = ctx.request.client.as_ref().map(|c| c.ip);
    accounting.finish(
        (&identity.username, &d.model, tokens),
        || usage_record(ctx, (d, identity, tokens), status, ending),
        prompt,
        client,
    );
}

/// The usage record of a finished inference request: who asked, where it went, what it used
/// (the tokens as the caller already counted them).
fn usage_record(
    ctx: &RequestCtx,
    (d, identity, tokens): (&Deployment, &Identity, Tokens),
    status: u16,
    ending: Ending,
) -> UsageRecord {
    let meter = &ctx.meter;
    UsageRecord {
        request_id: ctx.request.id.clone(),
        trace_id: ctx
            .request
            .trace
            .as_ref()
            .map(|t| t.trace_id_hex())
            .unwrap_or_default(),
        time_ms: meter.arrived_ms,
        user_id: identity.id.clone(),
        username: identity.username.clone(),
        cluster: d.cluster.clone(),
        framework: d.framework.clone(),
        model: d.model.clone(),
        endpoint: ctx
            .request
            .endpoint
            .map(|e| e.path().to_string())
            .unwrap_or_default(),
        route: ctx.target.route.to_string(),
        status,
        prompt_tokens: tokens.prompt,
        completion_tokens: tokens.completion,
        total_tokens: tokens.total,
        ttft_ms: meter.ttft_ms(),
        duration_ms: meter.started.elapsed().as_millis() as u64,
        bytes_in: meter.bytes_in,
        bytes_out: meter.bytes_out,
        instance: ctx.target.instance.clone().unwrap_or_default(),
        cancelled: status == 200 && ending == Ending::ClientLeft,
        failed: ending == Ending::Failed,
        tokens_unknown: status == 200
            && !meter.tokens_known()
            && ctx.request.endpoint.is_some_and(|e| e.reports_usage()),
        loadtest: ctx.request.loadtest,
        batch_id: ctx.request.batch_id.clone(),
    }
}
