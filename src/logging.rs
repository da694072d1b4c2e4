//! The application log and trace export.
//!
//! The log goes to standard error as text or JSON lines (`log.format`), filtered by `RUST_LOG`
//! (default `info`); text is coloured only when standard error is a terminal and `NO_COLOR` is
//! not set, so files and the journal get plain lines. With `tracing.otlp_endpoint`, spans of
//! target [`SPAN_TARGET`] (one per request, with children for its phases) go to an
//! OpenTelemetry collector over OTLP/HTTP, in batches from a thread of their own; they never
//! appear in the log.

use crate::config::{LogFormat, Tracing};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::SdkTracerProvider;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::prelude::*;
use tracing_subscriber::EnvFilter;

/// The target of the spans that are exported (and kept out of the log).
pub const SPAN_TARGET: &str = "firstgate::span";

static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// The log is written as JSON (else as text); a reload may switch it.
static JSON: AtomicBool = AtomicBool::new(false);

/// Sets up the log (and the export, if configured). Call once, after any fork: the exporter
/// runs a thread.
pub fn init(format: LogFormat, tracing: &Tracing) -> anyhow::Result<()> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    // Pingora's TRACE events dump raw headers (tokens); our spans are for the exporter only.
    let for_the_log = filter_fn(|meta| {
        !(*meta.level() == tracing::Level::TRACE && meta.target().starts_with("pingora"))
            && meta.target() != SPAN_TARGET
    });
    JSON.store(format == LogFormat::Json, Ordering::Relaxed);
    // Both layers are installed; the switch picks one. Filters cache their verdict per
    // call site, so `set_format` has the caches rebuilt.
    let text = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(colour)
        .with_filter(for_the_log.clone())
        .with_filter(filter_fn(|_| !JSON.load(Ordering::Relaxed)));
    let json = tracing_subscriber::fmt::layer()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_span_list(false)
        .with_writer(std::io::stderr)
        .with_filter(for_the_log)
        .with_filter(filter_fn(|_| JSON.load(Ordering::Relaxed)));
    let export = match &tracing.otlp_endpoint {
        Some(endpoint) => {
            let provider = provider(endpoint, &tracing.service_name)?;
            let tracer = provider.tracer("firstgate");
            let _ = PROVIDER.set(provider);
            Some(
                tracing_opentelemetry::layer()
                    .with_tracer(tracer)
                    .with_filter(filter_fn(|meta| meta.target() == SPAN_TARGET)),
            )
        }
        None => None,
    };
    let filter = filter.add_directive(format!("{SPAN_TARGET}=info").parse()?);
    let most = filter.max_level_hint();
    tracing_subscriber::registry()
        .with(filter)
        .with(text)
        .with(json)
        .with(export)
        .try_init()?;
    // The `log` bridge lets every record through when the layers give no hint (the
    // `filter_fn` ones do not): Pingora's debug records were each built and then dropped, on
    // every request. The filter's own most verbose level stops them at the macro.
    if let Some(most) = most {
        log::set_max_level(match most {
            l if l == LevelFilter::OFF => log::LevelFilter::Off,
            l if l == LevelFilter::ERROR => log::LevelFilter::Error,
            l if l == LevelFilter::WARN => log::LevelFilter::Warn,
            l if l == LevelFilter::INFO => log::LevelFilter::Info,
            l if l == LevelFilter::DEBUG => log::LevelFilter::Debug,
            _ => log::LevelFilter::Trace,
        });
    }
    Ok(())
}

/// Switches the log between text and JSON lines (a reload).
pub fn set_format(format: LogFormat) {
    let json = format == LogFormat::Json;
    if JSON.swap(json, Ordering::Relaxed) != json {
        tracing::callsite::rebuild_interest_cache();
    }
}

/// The plain text log, for the commands that do not serve.
pub fn init_text() {
    let _ = init(LogFormat::Text, &Tracing::default());
}

/// Whether spans are exported (otherwise the proxy creates none).
pub fn exporting() -> bool {
    PROVIDER.get().is_some()
}

/// Sends the spans still buffered (at exit).
pub fn flush_traces() {
    if let Some(p) = PROVIDER.get() {
        let _ = p.force_flush();
    }
}

fn provider(endpoint: &str, service: &str) -> anyhow::Result<SdkTracerProvider> {
    let endpoint = endpoint.trim_end_matches('/');
    let url = if endpoint.ends_with("/v1/traces") {
        endpoint.to_string()
    } else {
        format!("{endpoint}/v1/traces")
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpJson)
        .with_endpoint(url)
        .build()
        .map_err(|e| anyhow::anyhow!("tracing.otlp_endpoint: {e}"))?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service.to_string())
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}
