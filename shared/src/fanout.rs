//! Fan-out of committed log entries to every gateway (called after commit, never before).
//!
//! The entries of one commit go out as one bus message on [`LOG_SUBJECT`] (a batch of 30 sends
//! is one NATS message to each gateway, not 30), each entry carrying the trace context of its
//! own publish span, so every message keeps a trace of its own.
//!
//! A bus message is closed once it holds [`LOG_MESSAGE_BYTES`], and never grows past the
//! bus's [`payload budget`](Bus::payload_budget): an entry that would take it over goes in the
//! next one.
//!
//! Publishing is at-most-once: a lost entry is found as a gap by the gateways' hubs, which
//! read it back from the store. So a publish failure is logged, not retried.

use crate::bus::{Bus, size};
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
    let budget = bus.payload_budget();
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
        let bus_entry = BusEntry { entry, trace };
        let len = size::encoded_len(&bus_entry);
        if len.saturating_add(2) > budget {
            // Sends are refused before they are stored when they could not cross the bus
            // (`too_large_for_bus`); an entry stored under a larger limit can still be read
            // from the store, by replays.
            tracing::error!(
                part = entry.part,
                offset = entry.offset,
                len,
                budget,
                "a log entry is over the bus's limit"
            );
            continue;
        }
        if !payload.is_empty() && payload.len() + len + 2 > budget {
            send(bus, &mut payload, first.take()).await;
        }
        let at = payload.len();
        payload.push(if at == 0 { b'[' } else { b',' });
        if let Err(e) = serde_json::to_writer(&mut payload, &bus_entry) {
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::protocol::api::Message;
    use futures::StreamExt;

    fn entry(offset: u64, content_bytes: usize) -> LogEntry {
        LogEntry {
            part: (offset % 3) as u16,
            offset,
            message: Message {
                conversation_id: format!("c{offset}"),
                msg_id: 1,
                from: "bob".into(),
                msg_type: 1,
                content: "x".repeat(content_bytes),
                client_msg_id: None,
                send_time: 0,
                ..Default::default()
            },
        }
    }

    #[tokio::test]
    async fn a_commit_is_one_bus_message_until_it_is_too_big_then_its_parts_keep_the_order() {
        let bus = Bus::local(64);
        let mut sub = bus.subscribe(LOG_SUBJECT, None).await.unwrap();
        let read = |payload: &[u8]| serde_json::from_slice::<Vec<BusEntry>>(payload).unwrap();

        // Small entries: all in one message, in order.
        let small: Vec<LogEntry> = (1..=30).map(|o| entry(o, 100)).collect();
        publish_entries(&bus, &small).await;
        let one = sub.next().await.unwrap();
        let got: Vec<LogEntry> = read(&one.payload).into_iter().map(|b| b.entry).collect();
        assert_eq!(got, small);

        // 40 entries of 20 KiB (800 KiB): split into messages that close past the limit,
        // every entry once, in order.
        let big: Vec<LogEntry> = (31..=70).map(|o| entry(o, 20 * 1024)).collect();
        publish_entries(&bus, &big).await;
        let mut got = Vec::new();
        let mut messages = 0;
        while got.len() < big.len() {
            let msg = tokio::time::timeout(std::time::Duration::from_secs(5), sub.next()).await.unwrap().unwrap();
            assert!(msg.payload.len() < LOG_MESSAGE_BYTES + 32 * 1024, "{} bytes", msg.payload.len());
            got.extend(read(&msg.payload).into_iter().map(|b| b.entry));
            messages += 1;
        }
        assert_eq!(got, big);
        assert!((3..=4).contains(&messages), "{messages} messages");
        // Untraced entries carry no trace field at all.
        assert!(!String::from_utf8_lossy(&one.payload).contains("\"trace\""));
    }

    #[tokio::test]
    async fn no_bus_message_is_over_the_bus_limit() {
        // A 64 KiB bus: 20 entries of 20 KiB (each escaped to about 30 KiB) go two at most
        // to a message, every one under the limit, in order.
        let bus = Bus::local_with_max_payload(64, 64 * 1024);
        let mut sub = bus.subscribe(LOG_SUBJECT, None).await.unwrap();
        let big: Vec<LogEntry> = (1..=20)
            .map(|o| {
                let mut e = entry(o, 0);
                e.message.content = "\"é".repeat(7 * 1024);
                e
            })
            .collect();
        publish_entries(&bus, &big).await;
        let mut got = Vec::new();
        while got.len() < big.len() {
            let msg = tokio::time::timeout(std::time::Duration::from_secs(5), sub.next()).await.unwrap().unwrap();
            assert!(msg.payload.len() <= bus.payload_budget(), "{} bytes", msg.payload.len());
            got.extend(serde_json::from_slice::<Vec<BusEntry>>(&msg.payload).unwrap().into_iter().map(|b| b.entry));
        }
        assert_eq!(got, big);
    }
}
