//! Helpers shared by the queries: numbered placeholders, row decoding, integer conversions.

use quickim_shared::protocol::api::Message;
use quickim_shared::protocol::event::LogEntry;
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::{Result, StoreError};

/// Hands out placeholders in binding order: `$1`, `$2`, ... for PostgreSQL, `?` for SQLite
/// (sqlx looks every named SQLite parameter up by name, a linear scan per parameter, which
/// makes statements with hundreds of parameters quadratic).
pub(crate) struct Params {
    n: usize,
    positional: bool,
}

impl Params {
    /// Placeholders for the database `system` (`sqlite` or `postgresql`).
    pub fn new(system: &str) -> Params {
        Params { n: 0, positional: system == "sqlite" }
    }

    /// The next placeholder.
    pub fn next(&mut self) -> String {
        self.n += 1;
        if self.positional { "?".to_string() } else { format!("${}", self.n) }
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

/// Rows as JSON text, bound as one parameter: a statement over `jsonb_each` (SQLite) or
/// `jsonb_array_elements` (PostgreSQL) keeps one text whatever the number of rows.
pub(crate) fn to_json<T: serde::Serialize>(rows: &T) -> Result<String> {
    serde_json::to_string(rows).map_err(|e| StoreError::Corrupt(format!("cannot encode rows: {e}")))
}

/// Rows a statement answered as one JSON array (`json_group_array`).
pub(crate) fn from_json<T: serde::de::DeserializeOwned>(rows: &str) -> Result<T> {
    serde_json::from_str(rows).map_err(|e| StoreError::Corrupt(format!("cannot decode rows: {e}")))
}

/// Chunks of `items` whose sizes are powers of two (at most `max`, a power of two): the SQL
/// texts built from them repeat, so their prepared statements are reused.
pub(crate) fn pow2_chunks<T>(items: &[T], max: usize) -> Vec<&[T]> {
    let mut out = Vec::new();
    let mut rest = items;
    while !rest.is_empty() {
        let mut size = max;
        while size > rest.len() {
            size /= 2;
        }
        let (chunk, tail) = rest.split_at(size.max(1));
        out.push(chunk);
        rest = tail;
    }
    out
}

/// `items` padded to the next power of two by repeating the last one — for IN lists and CASE
/// arms, where a repeat changes nothing — so that statement texts repeat.
pub(crate) fn padded<T: Clone>(items: &[T]) -> Vec<T> {
    let mut out = items.to_vec();
    if let Some(last) = items.last().cloned() {
        out.resize(items.len().next_power_of_two(), last);
    }
    out
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
pub(crate) const MESSAGE_COLUMNS: &str = "m.conversation_id, m.msg_id, m.sender, m.msg_type, m.content, \
     m.client_msg_id, m.send_time, m.part, m.log_offset, m.edited_at, m.state";

/// `messages.state` of a message as sent (or edited, or a finished stream).
pub(crate) const STATE_SENT: i64 = 0;
/// `messages.state` of a recalled message.
pub(crate) const STATE_RECALLED: i64 = 1;
/// `messages.state` of a deleted message.
pub(crate) const STATE_DELETED: i64 = 2;
/// `messages.state` of a streaming message not finished yet.
pub(crate) const STATE_STREAMING: i64 = 3;

/// SQLite: `sql`, a query answering [`MESSAGE_COLUMNS`], wrapped to answer all its rows as
/// one JSON row named `rows` (SQLite hands rows over one by one, each a thread wake-up).
pub(crate) fn entries_as_json(sql: &str) -> String {
    format!(
        "SELECT json_group_array(json_array(conversation_id, msg_id, sender, msg_type, content, client_msg_id, \
         send_time, part, log_offset, edited_at, state)) AS rows FROM ({sql})"
    )
}

/// The entries of an [`entries_as_json`] row, in (partition, offset) order.
pub(crate) fn entries_from_json(rows: &str) -> Result<Vec<LogEntry>> {
    type Row = (String, i64, String, i64, String, Option<String>, i64, i64, i64, Option<i64>, i64);
    let rows: Vec<Row> = from_json(rows)?;
    let mut entries = rows
        .into_iter()
        .map(
            |(
                conversation_id,
                msg_id,
                from,
                msg_type,
                content,
                client_msg_id,
                send_time,
                part,
                offset,
                edited_at,
                state,
            )| {
                Ok(LogEntry {
                    part: u16::try_from(part).map_err(|_| StoreError::Corrupt("partition out of range".into()))?,
                    offset: api_int(offset),
                    message: Message {
                        conversation_id,
                        msg_id: api_int(msg_id),
                        from,
                        msg_type: i32::try_from(msg_type)
                            .map_err(|_| StoreError::Corrupt("msg_type out of range".into()))?,
                        content,
                        client_msg_id,
                        send_time,
                        edited_at,
                        recalled: state == STATE_RECALLED,
                        deleted: state == STATE_DELETED,
                        streaming: state == STATE_STREAMING,
                    },
                })
            },
        )
        .collect::<Result<Vec<_>>>()?;
    entries.sort_by_key(|e| (e.part, e.offset));
    Ok(entries)
}

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
        edited_at: row.try_get("edited_at")?,
        recalled: row.try_get::<i64, _>("state")? == STATE_RECALLED,
        deleted: row.try_get::<i64, _>("state")? == STATE_DELETED,
        streaming: row.try_get::<i64, _>("state")? == STATE_STREAMING,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_and_padding_keep_statement_shapes_few() {
        let items: Vec<u32> = (0..13).collect();
        let sizes: Vec<usize> = pow2_chunks(&items, 8).iter().map(|c| c.len()).collect();
        assert_eq!(sizes, vec![8, 4, 1]);
        assert_eq!(pow2_chunks(&items, 8).concat(), items);
        assert_eq!(padded(&[1, 2, 3]), vec![1, 2, 3, 3]);
        assert!(padded::<u8>(&[]).is_empty());
        assert_eq!(Params::new("sqlite").list(2), "?, ?");
        assert_eq!(Params::new("postgresql").list(2), "$1, $2");
    }
}
