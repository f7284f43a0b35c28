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

/// Subject of live signals between nodes ([`Live`]): never stored, never replayed; every
/// gateway delivers them to the members connected to it.
pub const LIVE_SUBJECT: &str = "quickim.live";

/// A live signal as it crosses the bus (bounded: ids and a signal's content are limited).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Live {
    /// A member's read position moved (read receipts are on in the conversation).
    Read {
        /// The conversation.
        conversation_id: String,
        /// The member who read.
        user_id: String,
        /// Its read position now.
        read_msg_id: u64,
    },
    /// A member's ephemeral signal (typing, ...).
    Signal {
        /// The conversation.
        conversation_id: String,
        /// The member who signals.
        from: String,
        /// What it signals.
        kind: SignalKind,
        /// Free content (`custom`), size-limited.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        content: Option<String>,
    },
    /// The next piece of a streaming message's text (its sender checked by the gateway).
    Delta {
        /// The conversation.
        conversation_id: String,
        /// The streaming message.
        msg_id: u64,
        /// 1, 2, 3, … in the order the text is made.
        seq: u64,
        /// The text to append.
        delta: String,
    },
    /// A user came online (its first connection on any node) or went offline (its last one
    /// closed, after the debounce): for the members of `conversations` (those of the user's
    /// with presence on; one page, bounded in bytes).
    Presence {
        /// The user.
        user_id: String,
        /// Online now, or not.
        online: bool,
        /// When it went offline (ms).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        last_seen: Option<i64>,
        /// The user's conversations with presence on (a page of them).
        conversations: Vec<String>,
    },
}

/// The kinds of ephemeral signals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SignalKind {
    /// The member is typing: receivers show it until `expires_in_ms` unless renewed.
    Typing,
    /// The member stopped typing (without sending).
    TypingStopped,
    /// Anything else the application defines, in `content` (e.g. "recording audio").
    Custom,
}

impl SignalKind {
    /// The `kind` field.
    pub const fn name(self) -> &'static str {
        match self {
            SignalKind::Typing => "typing",
            SignalKind::TypingStopped => "typing_stopped",
            SignalKind::Custom => "custom",
        }
    }
}

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
    /// The next piece of an open stream (as /stream_delta).
    StreamDelta {
        /// Echoed in the answer.
        req_id: serde_json::Value,
        /// The conversation.
        conversation_id: String,
        /// The streaming message.
        msg_id: u64,
        /// 1, 2, 3, …
        seq: u64,
        /// The text to append.
        delta: String,
    },
    /// An ephemeral signal to the conversation's other members (as /signal).
    Signal {
        /// Echoed in the answer.
        req_id: serde_json::Value,
        /// The conversation.
        conversation_id: String,
        /// What it signals.
        kind: SignalKind,
        /// Free content (`custom`).
        #[serde(default)]
        content: Option<String>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_live_signals() {
        let read = Live::Read { conversation_id: "c".into(), user_id: "bob".into(), read_msg_id: 7 };
        assert_eq!(
            serde_json::to_string(&read).unwrap(),
            r#"{"type":"read","conversation_id":"c","user_id":"bob","read_msg_id":7}"#
        );
        let typing =
            Live::Signal { conversation_id: "c".into(), from: "bob".into(), kind: SignalKind::Typing, content: None };
        assert_eq!(
            serde_json::to_string(&typing).unwrap(),
            r#"{"type":"signal","conversation_id":"c","from":"bob","kind":"typing"}"#
        );
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
        let f: ClientFrame =
            serde_json::from_str(r#"{"type":"signal","req_id":2,"conversation_id":"c","kind":"typing"}"#).unwrap();
        assert!(matches!(f, ClientFrame::Signal { kind: SignalKind::Typing, content: None, .. }));
        assert!(
            serde_json::from_str::<ClientFrame>(r#"{"type":"signal","req_id":2,"conversation_id":"c","kind":"dance"}"#)
                .is_err()
        );
    }
}
