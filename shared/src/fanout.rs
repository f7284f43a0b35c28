//! Fan-out of committed log entries to every gateway (called after commit, never before).
//!
//! The entries of one commit go out as one bus message on [`LOG_SUBJECT`] (a batch of 30 sends
//! is one NATS message to each gateway, not 30), each entry carrying the trace context of its
//! own publish span, so every message keeps a trace of its own.
//!
//! Publishing is at-most-once: a lost entry is found as a gap by the gateways' hubs, which
//! read it back from the store. So a publish failure is logged, not retried.

use crate::bus::Bus;
use crate::protocol::event::{BusEntry, LOG_MESSAGE_BYTES, LOG_SUBJECT, LogEntry};
use crate::telemetry;

/// Publishes `entries`, in order, in the current span's trace.
pub async fn publish_entries(bus: &Bus, entries: &[LogEntry]) {
    let current = tracing::Span::current();
    publish_traced(bus, entries.iter().map(|e| (e, &current)).collect()).await;
}

/// Publishes entries, in order, each in the trace of the span paired with it (the span of
/// the request that stored it).
pub async fn publish_traced(bus: &Bus, entries: Vec<(&LogEntry, &tracing::Span)>) {
    let mut payload = Vec::with_capacity(4096);
    let mut first = None;
    for (entry, parent) in entries {
        let span = tracing::info_span!(
            parent: parent,
            "log.publish",
            otel.name = %format_args!("publish {LOG_SUBJECT}"),
            otel.kind = "producer",
            messaging.system = "quickim-bus",
            messaging.destination.name = LOG_SUBJECT,
            messaging.operation.type = "publish",
            log.partition = entry.part,
            conversation_id = %entry.message.conversation_id,
            msg_id = entry.message.msg_id,
        );
        let trace = if span.is_disabled() { Vec::new() } else { span.in_scope(telemetry::inject_context) };
        let at = payload.len();
        payload.push(if at == 0 { b'[' } else { b',' });
        if let Err(e) = serde_json::to_writer(&mut payload, &BusEntry { entry, trace }) {
            tracing::error!(error = %e, "cannot encode a log entry");
            payload.truncate(at);
            continue;
        }
        first.get_or_insert((entry.part, entry.offset));
        if payload.len() >= LOG_MESSAGE_BYTES {
            send(bus, &mut payload, first.take()).await;
        }
    }
    send(bus, &mut payload, first).await;
}

/// Sends the array in `payload` (if any) and empties it.
async fn send(bus: &Bus, payload: &mut Vec<u8>, first: Option<(u16, u64)>) {
    if payload.is_empty() {
        return;
    }
    payload.push(b']');
    let body = std::mem::replace(payload, Vec::with_capacity(4096));
    if let Err(e) = bus.publish(LOG_SUBJECT, Vec::new(), body.into()).await {
        let (part, offset) = first.unwrap_or_default();
        tracing::warn!(error = %e, part, offset, "publish failed; gateways will fill the gap from the store");
    }
}
