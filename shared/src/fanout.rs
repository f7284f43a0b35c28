//! Fan-out of committed log entries to every gateway (called after commit, never before).
//!
//! Publishing is at-most-once: a lost entry is found as a gap by the gateways' hubs, which
//! read it back from the store. So a publish failure is logged, not retried.

use crate::bus::Bus;
use crate::protocol::event::{LogEntry, log_subject};
use crate::telemetry;
use tracing::Instrument;

/// Publishes each entry on its partition's subject, in order.
pub async fn publish_entries(bus: &Bus, entries: &[LogEntry]) {
    for entry in entries {
        let payload = match serde_json::to_vec(entry) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode a log entry");
                continue;
            }
        };
        let subject = log_subject(entry.part);
        let span = tracing::info_span!(
            "log.publish",
            otel.name = %format_args!("publish {subject}"),
            otel.kind = "producer",
            messaging.system = "quickim-bus",
            messaging.destination.name = %subject,
            messaging.operation.type = "publish",
            conversation_id = %entry.message.conversation_id,
            msg_id = entry.message.msg_id,
        );
        async {
            let headers = telemetry::inject_context();
            if let Err(e) = bus.publish(&subject, headers, payload.into()).await {
                tracing::warn!(error = %e, part = entry.part, offset = entry.offset, "publish failed; gateways will fill the gap from the store");
            }
        }
        .instrument(span)
        .await;
    }
}
