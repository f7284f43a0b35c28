//! Log entries (what the services fan out to every gateway after commit), and the events and
//! frames of /notify (see docs/protocol.md).
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

/// An event sent to a /notify client (the same JSON on WebSocket, SSE and long-poll).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// First event of every connection: where this connection starts.
    Ready {
        /// The position the stream starts from (the client's own on resume).
        cursor: String,
    },
    /// A message of one of the client's conversations.
    Message {
        /// Position after this message.
        cursor: String,
        /// The message.
        message: Message,
    },
    /// The position moved without a message for this client (quiet periods), so that a
    /// reconnect stays within the replay window.
    Cursor {
        /// The new position.
        cursor: String,
    },
    /// The client's tokens were revoked (/inner/kick_user); the connection closes.
    Kicked {
        /// Why.
        reason: String,
    },
    /// The client cannot be resumed exactly (cursor too old or from another database): reload
    /// state over HTTP, then continue from `cursor`.
    Resync {
        /// Where to continue from.
        cursor: String,
        /// Why.
        reason: String,
    },
    /// WebSocket: answer to a client frame.
    Ack {
        /// The frame's `req_id`.
        req_id: serde_json::Value,
        /// For `send`: the stored message.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<Message>,
        /// For `mark_read`: the read position.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        read_msg_id: Option<u64>,
    },
    /// WebSocket: a client frame failed.
    Error {
        /// The frame's `req_id`, if it could be read.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        req_id: Option<serde_json::Value>,
        /// Stable error code (docs/api.md).
        code: u32,
        /// Human text.
        error: String,
    },
}

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

    fn message() -> Message {
        Message {
            conversation_id: "c1".into(),
            msg_id: 3,
            from: "alice".into(),
            msg_type: 1,
            content: "hi".into(),
            client_msg_id: None,
            send_time: 1_700_000_000_000,
        }
    }

    /// The wire format is a contract: these strings are what clients parse.
    #[test]
    fn golden_events() {
        let cases = [
            (Event::Ready { cursor: "AQ".into() }, r#"{"type":"ready","cursor":"AQ"}"#),
            (
                Event::Message { cursor: "AQ".into(), message: message() },
                r#"{"type":"message","cursor":"AQ","message":{"conversation_id":"c1","msg_id":3,"from":"alice","type":1,"content":"hi","send_time":1700000000000}}"#,
            ),
            (Event::Cursor { cursor: "AQ".into() }, r#"{"type":"cursor","cursor":"AQ"}"#),
            (Event::Kicked { reason: "kick_user".into() }, r#"{"type":"kicked","reason":"kick_user"}"#),
            (
                Event::Resync { cursor: "AQ".into(), reason: "cursor_expired".into() },
                r#"{"type":"resync","cursor":"AQ","reason":"cursor_expired"}"#,
            ),
            (
                Event::Ack { req_id: serde_json::json!(7), message: None, read_msg_id: Some(3) },
                r#"{"type":"ack","req_id":7,"read_msg_id":3}"#,
            ),
            (
                Event::Error { req_id: Some(serde_json::json!("a")), code: 40301, error: "not a member".into() },
                r#"{"type":"error","req_id":"a","code":40301,"error":"not a member"}"#,
            ),
        ];
        for (event, json) in cases {
            assert_eq!(serde_json::to_string(&event).unwrap(), json);
            assert_eq!(serde_json::from_str::<Event>(json).unwrap(), event);
        }
    }

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
