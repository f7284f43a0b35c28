//! Log entries (what the services fan out to every gateway after commit), and the frames a
//! /notify WebSocket client may send (see docs/protocol.md; the events the gateway sends are
//! encoded in one place, the gateway's `notify::event`).
//!
//! Every committed message has a place in the log: its conversation maps to one of the
//! database's log partitions, and each partition numbers its messages 1, 2, 3, ... without
//! gaps (`offset`). Gateways consume each partition in offset order; a cursor is a vector of
//! partition offsets (see docs/protocol.md).

use serde::{Deserialize, Serialize};

use super::api::Message;

/// A committed message with its place in the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    /// Log partition of the message's conversation.
    pub part: u16,
    /// Gap-free position in the partition, starting at 1.
    pub offset: u64,
    /// The message.
    pub message: Message,
}

/// NATS / in-process subject on which committed entries are published: one bus message per
/// committed batch (split only past [`LOG_MESSAGE_BYTES`]), a JSON array of [`BusEntry`] in
/// commit order, whatever partitions they belong to.
pub const LOG_SUBJECT: &str = "quickim.log";

/// A bus message of [`LOG_SUBJECT`] is closed once it holds this many bytes; it never grows
/// past the bus's payload budget (NATS's `max_payload` less headroom) either.
pub const LOG_MESSAGE_BYTES: usize = 256 * 1024;

/// A log entry as it crosses the bus, with the trace context of the request that stored it
/// (`traceparent`, `tracestate`; empty when that request was not traced): one message, one
/// trace, though many messages share a bus message. `E` is `&LogEntry` when publishing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BusEntry<E = LogEntry> {
    /// The entry.
    pub entry: E,
    /// W3C trace-context headers of the entry's publish span.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trace: Vec<(String, String)>,
}

/// Subject on which message services announce the partition heads (for tail-gap detection).
pub const HEADS_SUBJECT: &str = "quickim.heads";

// ---------------------------------------------------------------- /notify

/// A frame a WebSocket client may send.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientFrame {
    /// Send a message (as /send_msg).
    Send {
        /// Echoed in the answer.
        req_id: serde_json::Value,
        /// Target conversation.
        conversation_id: String,
        /// The message's type (`type` names the frame).
        msg_type: i32,
        /// Content.
        content: String,
        /// Idempotency key.
        #[serde(default)]
        client_msg_id: Option<String>,
    },
    /// Move the read position (as /mark_read).
    MarkRead {
        /// Echoed in the answer.
        req_id: serde_json::Value,
        /// The conversation.
        conversation_id: String,
        /// New read position.
        msg_id: u64,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_client_frames() {
        let f: ClientFrame = serde_json::from_str(
            r#"{"type":"send","req_id":1,"conversation_id":"c","msg_type":1,"content":"x","client_msg_id":"k"}"#,
        )
        .unwrap();
        assert!(matches!(f, ClientFrame::Send { msg_type: 1, .. }));
        let f: ClientFrame =
            serde_json::from_str(r#"{"type":"mark_read","req_id":"r","conversation_id":"c","msg_id":9}"#).unwrap();
        assert!(matches!(f, ClientFrame::MarkRead { msg_id: 9, .. }));
        assert!(
            serde_json::from_str::<ClientFrame>(
                r#"{"type":"send","req_id":1,"conversation_id":"c","msg_type":1,"content":"x","from":"m"}"#
            )
            .is_err()
        );
        assert!(serde_json::from_str::<ClientFrame>(r#"{"type":"subscribe"}"#).is_err());
    }
}
