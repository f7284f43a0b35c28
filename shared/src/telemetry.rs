//! Logging, tracing and metrics: set up once per process.
//!
//! - Logs go to stderr (text or JSON), filtered by `log`.
//! - Spans are exported over OTLP (gRPC or HTTP/protobuf) when `otlp_endpoint` is set, with
//!   their own filter (every quickim span at INFO), so a quiet log level does not switch
//!   tracing off. Sampling: `trace_sample_ratio` of new traces, children follow their parent.
//! - The W3C trace context (`traceparent`, `tracestate`) travels in bus headers:
//!   [`inject_context`] on the sending side, [`set_parent`] on the receiving side. So one
//!   message is one trace across the gateway, the services and every delivering gateway.
//! - Metrics: one Prometheus recorder per process, rendered by [`render_metrics`].

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{self, FilterExt, LevelFilter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::bus::Headers;
use crate::config::{Config, ConfigError};

static METRICS: std::sync::OnceLock<Option<metrics_exporter_prometheus::PrometheusHandle>> = std::sync::OnceLock::new();

/// Latency buckets (seconds) for every `_seconds` histogram.
const LATENCY_BUCKETS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Buckets for the histograms that count things (messages per group commit).
const COUNT_BUCKETS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0];

/// Installs the process-wide Prometheus recorder (once; later calls reuse it).
pub fn install_metrics() -> Option<metrics_exporter_prometheus::PrometheusHandle> {
    use metrics_exporter_prometheus::Matcher;
    METRICS
        .get_or_init(|| {
            let recorder = metrics_exporter_prometheus::PrometheusBuilder::new()
                .set_buckets(LATENCY_BUCKETS)
                .ok()?
                .set_buckets_for_metric(Matcher::Full("quickim_send_batch_size".into()), COUNT_BUCKETS)
                .ok()?
                .set_buckets_for_metric(Matcher::Full("quickim_sends_per_request".into()), COUNT_BUCKETS)
                .ok()?
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok()?;
            Some(handle)
        })
        .clone()
}

/// The Prometheus text exposition of every metric of this process.
pub fn render_metrics() -> String {
    install_metrics().map(|h| h.render()).unwrap_or_default()
}

/// Keeps telemetry running; [`Telemetry::shutdown`] flushes what is buffered.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports the spans still buffered and stops the exporter.
    pub async fn shutdown(self) {
        if let Some(provider) = self.provider {
            // Both calls block: keep them off the async threads.
            let _ = tokio::task::spawn_blocking(move || {
                let _ = provider.force_flush();
                let _ = provider.shutdown();
            })
            .await;
        }
    }
}

/// Installs the global subscriber (logs, and spans to OTLP when configured) and the
/// Prometheus recorder. `service_name` is the OpenTelemetry `service.name`.
pub fn init(config: &Config, service_name: &str, node_id: &str) -> Result<Telemetry, ConfigError> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let env_filter =
        EnvFilter::try_new(&config.log).map_err(|e| ConfigError(format!("log filter {:?}: {e}", config.log)))?;
    // Without `log_spans` the log layer takes events only: it then keeps no span of its own,
    // and formatting every request's spans (a large share of a node's CPU under load: see
    // `log_spans` in docs/operations.md) is left to the trace exporter, when there is one.
    let log_spans = config.log_spans;
    // Every filter states the most verbose level it may let through: one without that hint
    // makes the whole subscriber report "everything", and libraries then build (and format)
    // their debug and trace records — the WebSocket library's per frame, through `log` —
    // only for the filters to drop them.
    let log_level = env_filter.max_level_hint().unwrap_or(LevelFilter::TRACE);
    let log_filter =
        env_filter.and(filter::filter_fn(move |meta| log_spans || meta.is_event()).with_max_level_hint(log_level));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = if config.log_format == "json" {
        tracing_subscriber::fmt::layer().json().with_writer(std::io::stderr).with_filter(log_filter).boxed()
    } else {
        tracing_subscriber::fmt::layer().with_ansi(ansi).with_writer(std::io::stderr).with_filter(log_filter).boxed()
    };
    let provider = match &config.otlp_endpoint {
        Some(endpoint) => {
            Some(tracer_provider(endpoint, &config.otlp_protocol, config.trace_sample_ratio, service_name, node_id)?)
        }
        None => None,
    };
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("quickim"))
            .with_filter(EnvFilter::new("warn,quickim=info,quickim_gateway=info,quickim_shared=info,quickim_store=info,quickim_message=info,quickim_conversation=info"))
    });
    // Spans nobody records are not made at all: without a trace exporter and without
    // `log_spans`, the registry would still allocate, enter, exit and close every request's
    // spans (a measurable share of a node's CPU: docs/operations.md, `log_spans`).
    let spans_wanted = log_spans || otel.is_some();
    let level = if otel.is_some() { log_level.max(LevelFilter::INFO) } else { log_level };
    let spans = filter::filter_fn(move |meta| spans_wanted || meta.is_event()).with_max_level_hint(level);
    tracing_subscriber::registry()
        .with(spans)
        .with(fmt)
        .with(otel)
        .try_init()
        .map_err(|e| ConfigError(format!("logging already initialised: {e}")))?;
    install_metrics();
    if let (Some(endpoint), Some(_)) = (&config.otlp_endpoint, &provider) {
        tracing::info!(%endpoint, protocol = %config.otlp_protocol, ratio = config.trace_sample_ratio, "exporting traces over OTLP");
    }
    Ok(Telemetry { provider })
}

/// Builds the OTLP exporter and tracer provider (also used by tests with their own subscriber).
pub fn tracer_provider(
    endpoint: &str,
    protocol: &str,
    sample_ratio: f64,
    service_name: &str,
    node_id: &str,
) -> Result<SdkTracerProvider, ConfigError> {
    let exporter = match protocol {
        "http" => {
            // An endpoint without a path gets the standard one.
            let url = if endpoint.trim_end_matches('/').matches('/').count() <= 2 {
                format!("{}/v1/traces", endpoint.trim_end_matches('/'))
            } else {
                endpoint.to_string()
            };
            opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_endpoint(url)
                .build()
        }
        _ => opentelemetry_otlp::SpanExporter::builder().with_tonic().with_endpoint(endpoint).build(),
    }
    .map_err(|e| ConfigError(format!("otlp_endpoint {endpoint:?}: {e}")))?;
    let resource = Resource::builder()
        .with_service_name(service_name.to_string())
        .with_attribute(KeyValue::new("service.instance.id", node_id.to_string()))
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(sample_ratio))))
        .with_resource(resource)
        .build())
}

struct HeaderInjector<'a>(&'a mut Headers);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.push((key.to_string(), value));
    }
}

struct HeaderExtractor<'a>(&'a Headers);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k.eq_ignore_ascii_case(key)).map(|(_, v)| v.as_str())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_str()).collect()
    }
}

/// Headers carrying the current span's trace context (empty when there is none).
pub fn inject_context() -> Headers {
    let cx = Span::current().context();
    let mut headers = Vec::new();
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(&mut headers));
    }
    headers
}

/// Makes `span` a child of the trace context carried in `headers`, if any.
pub fn set_parent(span: &Span, headers: &Headers) {
    if headers.is_empty() || span.is_disabled() {
        return;
    }
    let cx = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// A trace context captured to parent spans created later, elsewhere (a socket write that
/// happens after the hub dispatched the message).
#[derive(Debug, Clone)]
pub struct TraceContext(Context);

impl TraceContext {
    /// The current span's context, if it is being recorded (sampled and exported).
    pub fn current() -> Option<TraceContext> {
        let cx = Span::current().context();
        let sc = cx.span().span_context().clone();
        (sc.is_valid() && sc.is_sampled()).then_some(TraceContext(cx))
    }

    /// Makes `span` a child of this context.
    pub fn adopt(&self, span: &Span) {
        let _ = span.set_parent(self.0.clone());
    }
}

/// The server-side span of a bus request, child of the caller's context in `headers`.
pub fn server_span(subject: &str, headers: &Headers) -> Span {
    let span = tracing::info_span!(
        "bus.serve",
        otel.name = %subject,
        otel.kind = "server",
        messaging.system = "quickim-bus",
        messaging.destination.name = %subject,
        messaging.operation.type = "process",
    );
    set_parent(&span, headers);
    span
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Libraries that log through the `log` crate (the WebSocket library, per frame) check
    /// its maximum level before they format anything: it must be the configured level, not
    /// "everything" because one of the subscriber's filters gives no hint.
    #[test]
    fn log_records_above_the_configured_level_are_not_made() {
        let config = Config { log: "warn".to_string(), ..Config::default() };
        let _telemetry = init(&config, "quickim-test", "test-node").unwrap();
        assert_eq!(log::max_level(), log::LevelFilter::Warn);
        assert_eq!(tracing::level_filters::LevelFilter::current(), tracing::level_filters::LevelFilter::WARN);
    }
}
