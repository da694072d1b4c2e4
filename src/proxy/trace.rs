//! A request's trace: its W3C context, and when spans are exported, the request's span and the
//! spans of the phases a person chasing latency needs (authentication, the route decision, the
//! wait for an instance, the backend connect, the backend's first byte, Globus Compute's submit
//! and poll). Without export no span is created.

use super::RequestCtx;
use crate::logging::SPAN_TARGET;
use crate::trace_context::TraceContext;
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use pingora::http::RequestHeader;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The exported spans of one request.
pub struct Spans {
    pub request: tracing::Span,
    /// The phase span open between two Pingora phases (connect, first byte).
    pub between: Option<tracing::Span>,
}

/// A child span of the request's, when spans are exported.
macro_rules! phase_span {
    ($ctx:expr, $name:literal $(, $field:ident = $value:expr)*) => {
        $ctx.request.spans.as_ref().map(|s| {
            tracing::info_span!(
                target: crate::logging::SPAN_TARGET,
                parent: &s.request,
                $name
                $(, $field = $value)*
            )
        })
    };
}
pub(crate) use phase_span;

/// The request's trace, from its headers; with export on, its span, which then names the
/// gateway's part of the trace.
pub fn start(ctx: &mut RequestCtx, req: &RequestHeader) {
    let mut trace = TraceContext::from_headers(&req.headers);
    if crate::logging::exporting() {
        let span = tracing::info_span!(
            target: SPAN_TARGET,
            "request",
            http.request.method = %req.method,
            url.path = %req.uri.path(),
            firstgate.request_id = %ctx.request.id,
        );
        if let Some(parent) = trace.parent {
            let remote = SpanContext::new(
                TraceId::from_bytes(trace.trace_id),
                SpanId::from_bytes(parent),
                TraceFlags::new(trace.flags),
                true,
                TraceState::default(),
            );
            let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
        }
        let otel = span.context();
        let own = otel.span().span_context().clone();
        if own.is_valid() {
            trace.trace_id = own.trace_id().to_bytes();
            trace.span_id = own.span_id().to_bytes();
        }
        ctx.request.spans = Some(Spans {
            request: span,
            between: None,
        });
    }
    // Made once: the backend's request and the answer both carry it.
    ctx.request.traceparent = http::HeaderValue::try_from(trace.traceparent()).ok();
    ctx.request.trace = Some(trace);
}

/// Opens a span that a later phase closes (the backend connect, its first byte).
pub fn open_between(ctx: &mut RequestCtx, span: Option<tracing::Span>) {
    if let (Some(spans), Some(span)) = (ctx.request.spans.as_mut(), span) {
        spans.between = Some(span);
    }
}

/// Closes the span [`open_between`] opened.
pub fn close_between(ctx: &mut RequestCtx) {
    if let Some(spans) = ctx.request.spans.as_mut() {
        spans.between = None;
    }
}
