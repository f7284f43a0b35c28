//! Helpers shared by the queries: numbered placeholders, row decoding, integer conversions.

use quickim_shared::protocol::api::Message;
use quickim_shared::protocol::event::LogEntry;
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::{Result, StoreError};

/// Hands out `$1`, `$2`, ... in binding order (both databases bind `$N` by number).
#[derive(Default)]
pub(crate) struct Params {
    n: usize,
}

impl Params {
    /// The next placeholder.
    pub fn next(&mut self) -> String {
        self.n += 1;
        format!("${}", self.n)
    }

    /// `count` placeholders separated by commas.
    pub fn list(&mut self, count: usize) -> String {
        (0..count).map(|_| self.next()).collect::<Vec<_>>().join(", ")
    }

    /// A parenthesized row of `width` placeholders.
    pub fn row(&mut self, width: usize) -> String {
        format!("({})", self.list(width))
    }
}

/// A client-supplied u64 as a database BIGINT (values beyond i64 saturate: no row has them).
pub(crate) fn db_int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A stored BIGINT as u64 (every stored id and offset is ≥ 0).
pub(crate) fn api_int(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// Reads a flag (stored as INTEGER 0/1: SQLite's BOOLEAN does not pass through `Any`).
pub(crate) fn get_bool(row: &AnyRow, col: &str) -> Result<bool> {
    Ok(row.try_get::<i64, _>(col)? != 0)
}

/// The columns [`message`] reads, for a table aliased `m`.
pub(crate) const MESSAGE_COLUMNS: &str =
    "m.conversation_id, m.msg_id, m.sender, m.msg_type, m.content, m.client_msg_id, m.send_time, m.part, m.log_offset";

pub(crate) fn message(row: &AnyRow) -> Result<Message> {
    Ok(Message {
        conversation_id: row.try_get("conversation_id")?,
        msg_id: api_int(row.try_get("msg_id")?),
        from: row.try_get("sender")?,
        msg_type: i32::try_from(row.try_get::<i64, _>("msg_type")?)
            .map_err(|_| StoreError::Corrupt("msg_type out of range".into()))?,
        content: row.try_get("content")?,
        client_msg_id: row.try_get("client_msg_id")?,
        send_time: row.try_get("send_time")?,
    })
}

pub(crate) fn log_entry(row: &AnyRow) -> Result<LogEntry> {
    Ok(LogEntry {
        part: u16::try_from(row.try_get::<i64, _>("part")?)
            .map_err(|_| StoreError::Corrupt("partition out of range".into()))?,
        offset: api_int(row.try_get("log_offset")?),
        message: message(row)?,
    })
}
