//! Fan-out of committed log entries to every gateway (called after commit, never before).
//!
//! Publishing is at-most-once: a lost entry is found as a gap by the gateways' hubs, which
//! read it back from the store. So a publish failure is logged, not retried.

use crate::bus::Bus;
use crate::protocol::event::{LogEntry, log_subject};
use crate::telemetry;

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
        let span = tracing::info_span!(
            "log.publish",
            otel.kind = "producer",
            messaging.system = "quickim-bus",
            messaging.destination.name = %log_subject(entry.part),
            conversation_id = %entry.message.conversation_id,
            msg_id = entry.message.msg_id,
        );
        let _enter = span.enter();
        let headers = telemetry::inject_context();
        drop(_enter);
        if let Err(e) = bus.publish(&log_subject(entry.part), headers, payload.into()).await {
            tracing::warn!(error = %e, part = entry.part, offset = entry.offset, "publish failed; gateways will fill the gap from the store");
        }
    }
}
