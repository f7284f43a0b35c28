//! Log entries (what the services fan out to every gateway after commit).
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

/// NATS / in-process subject on which entries of partition `part` are published.
pub fn log_subject(part: u16) -> String {
    format!("quickim.log.{part}")
}

/// Subject that matches every partition's entries.
pub const LOG_SUBJECT_ALL: &str = "quickim.log.*";

/// Subject on which message services announce the partition heads (for tail-gap detection).
pub const HEADS_SUBJECT: &str = "quickim.heads";
