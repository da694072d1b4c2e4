//! The end of a request: its usage record (with the access-log line) and its metrics.

use super::{Gateway, RequestCtx};
use crate::metrics::status_label;
use crate::usage::UsageRecord;

impl Gateway {
    /// Records a finished request; `failed` when an error cut it.
    pub(super) fn finish(&self, ctx: &mut RequestCtx, status: u16, failed: bool) {
        ctx.target.slot = None;
        if let Some(record) = usage_record(ctx, status, failed) {
            for (kind, n) in [
                ("prompt", record.prompt_tokens),
                ("completion", record.completion_tokens),
            ] {
                self.metrics
                    .tokens
                    .with_label_values(&[&record.cluster, &record.model, kind])
                    .inc_by(n);
            }
            let client = ctx.request.client.as_ref().map(|c| c.ip);
            let prompt = ctx.request.body.as_deref();
            self.accounting.finish(record, prompt, client);
        }
        let (cluster, model) = ctx
            .target
            .deployment
            .as_deref()
            .map_or(("", ""), |d| (d.cluster.as_str(), d.model.as_str()));
        let m = &self.metrics;
        m.requests
            .with_label_values(&[cluster, model, status_label(status)])
            .inc();
        m.overhead
            .with_label_values(&[ctx.target.route])
            .observe(ctx.overhead.as_secs_f64());
        if ctx.target.deployment.is_none() {
            return;
        }
        let labels = [cluster, model];
        let meter = &ctx.meter;
        m.request_duration
            .with_label_values(&labels)
            .observe(meter.started.elapsed().as_secs_f64());
        if let Some(first) = meter.first_byte {
            m.time_to_first_byte
                .with_label_values(&labels)
                .observe((first - meter.started).as_secs_f64());
        }
        if ctx.target.in_flight {
            m.in_flight.with_label_values(&labels).dec();
        }
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

/// The usage record of a finished inference request: who asked, where it went, what it used.
fn usage_record(ctx: &RequestCtx, status: u16, failed: bool) -> Option<UsageRecord> {
    let d = ctx.target.deployment.as_ref()?;
    let identity = ctx.request.identity.as_ref()?;
    let meter = &ctx.meter;
    let tokens = meter.tokens();
    Some(UsageRecord {
        request_id: ctx.request.id.clone(),
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
        cancelled: meter.cancelled(status, failed, ctx.request.stream),
    })
}
