//! The statements of a send batch on SQLite, run on the direct connection (see
//! `sqlite::open_direct`) by the thread that holds the batch: no hand-over to a connection's
//! worker thread between them. `messages.rs` decides what to write; this file reads and
//! writes. Each statement keeps its prepared form in the connection's cache.

use std::collections::{BTreeMap, HashMap, HashSet};

use quickim_shared::protocol::api::Message;
use quickim_shared::time::now_ms;
use rusqlite::types::Value;
use rusqlite::{Connection, params_from_iter};

use crate::log::{
    APPEND_CONVERSATIONS_SQLITE, APPEND_MESSAGES_SQLITE, APPEND_PARTS_SQLITE, APPEND_READS_SQLITE, AppendRows,
    LockedConversation, heads_from_json, locked_from_json, sqlite_conversations_json, sqlite_heads_json,
};
use crate::messages::{Attempt, Key, claim_keys_sql};
use crate::sql::{
    MESSAGE_COLUMNS, Params, STATE_DELETED, STATE_RECALLED, STATE_STREAMING, api_int, from_json, padded, pow2_chunks,
    to_json,
};
use crate::{Result, SendItem, StoreError, sql_span};

/// The batch's reads in one statement answering one row: its conversations (as
/// `lock_conversations`), which (conversation, sender) pairs are active members, and the
/// partition heads.
const READS: &str = concat!(
    "SELECT (",
    sqlite_conversations_json!(),
    ") AS convs, (SELECT json_group_array(json_array(m.conversation_id, m.user_id)) FROM jsonb_each(?) j \
     JOIN members m ON m.conversation_id = j.value ->> 0 AND m.user_id = j.value ->> 1 WHERE m.active = 1) \
     AS members, (",
    sqlite_heads_json!(),
    ") AS heads"
);

/// What [`begin_with_reads`] answers: the conversations, the active (conversation, sender)
/// pairs, the partition heads.
pub(crate) type Reads = (BTreeMap<String, LockedConversation>, HashSet<(String, String)>, HashMap<u16, i64>);

/// Opens the write transaction (`BEGIN IMMEDIATE`: the write lock at once, so the reads see
/// what the writes will build on) and reads what the batch needs. The caller ends the
/// transaction with [`end`] in every case.
pub(crate) fn begin_with_reads(conn: &Connection, items: &[SendItem]) -> Result<Reads> {
    if !conn.is_autocommit() {
        // A transaction left open by a batch whose ROLLBACK failed: end it before this one.
        conn.execute_batch("ROLLBACK")?;
    }
    {
        let _span = sql_span("sqlite", "BEGIN IMMEDIATE", "").entered();
        conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
    }
    let mut ids: Vec<&str> = items.iter().map(|i| i.conversation_id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    let mut pairs: Vec<(&str, &str)> =
        items.iter().filter(|i| !i.from.is_empty()).map(|i| (i.conversation_id.as_str(), i.from.as_str())).collect();
    pairs.sort_unstable();
    pairs.dedup();
    let _span = sql_span("sqlite", "SELECT", "conversations, members, log_partitions").entered();
    let (convs, members, heads): (String, String, String) = conn
        .prepare_cached(READS)?
        .query_row([to_json(&ids)?, to_json(&pairs)?], |r| Ok((r.get("convs")?, r.get("members")?, r.get("heads")?)))?;
    let members: HashSet<(String, String)> = from_json::<Vec<(String, String)>>(&members)?.into_iter().collect();
    Ok((locked_from_json(&convs)?, members, heads_from_json(&heads)?))
}

/// The messages stored under `n` idempotency keys, each key bound as (sender, client_msg_id);
/// answers `key_sender`, `key_id` and [`MESSAGE_COLUMNS`] (PostgreSQL, one statement for any
/// number of keys: `messages::EXISTING_KEYS_POSTGRES`).
fn existing_keys_sql(n: usize) -> String {
    let mut p = Params::new("sqlite");
    let list = (0..n).map(|_| p.row(2)).collect::<Vec<_>>().join(", ");
    format!(
        "SELECT i.sender AS key_sender, i.client_msg_id AS key_id, {MESSAGE_COLUMNS} FROM idempotency i \
         JOIN messages m ON m.conversation_id = i.conversation_id AND m.msg_id = i.msg_id \
         WHERE (i.sender, i.client_msg_id) IN (VALUES {list})"
    )
}

/// Messages already stored under any of `keys`.
pub(crate) fn existing_keys(conn: &Connection, keys: &[Key]) -> Result<HashMap<Key, Message>> {
    let mut out = HashMap::new();
    let mut keys: Vec<&Key> = keys.iter().collect();
    keys.sort();
    keys.dedup();
    for chunk in keys.chunks(256).map(padded) {
        let _span = sql_span("sqlite", "SELECT", "idempotency").entered();
        let mut stmt = conn.prepare_cached(&existing_keys_sql(chunk.len()))?;
        let mut rows = stmt.query(params_from_iter(chunk.iter().flat_map(|(s, k)| [s.as_str(), k.as_str()])))?;
        while let Some(row) = rows.next()? {
            let key = (row.get("key_sender")?, row.get("key_id")?);
            out.insert(key, message(row)?);
        }
    }
    Ok(out)
}

/// Claims idempotency keys (in key order); answers the keys someone else holds.
pub(crate) fn claim_keys(conn: &Connection, claims: &[(Key, &str, i64)]) -> Result<Vec<Key>> {
    let mut sorted: Vec<&(Key, &str, i64)> = claims.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let now = now_ms();
    let mut lost = Vec::new();
    for chunk in pow2_chunks(&sorted, 64) {
        let values = chunk.iter().flat_map(|((sender, key), conv, msg_id)| {
            [
                Value::Text(sender.clone()),
                Value::Text(key.clone()),
                Value::Text((*conv).to_string()),
                Value::Integer(*msg_id),
                Value::Integer(now),
            ]
        });
        let _span = sql_span("sqlite", "INSERT", "idempotency").entered();
        let mut stmt = conn.prepare_cached(&claim_keys_sql("sqlite", chunk.len()))?;
        let won: HashSet<Key> = stmt
            .query_map(params_from_iter(values), |r| Ok((r.get("sender")?, r.get("client_msg_id")?)))?
            .collect::<rusqlite::Result<_>>()?;
        lost.extend(chunk.iter().map(|c| c.0.clone()).filter(|k| !won.contains(k)));
    }
    Ok(lost)
}

/// Writes an append: the partitions' new heads, the messages, the conversations' new heads,
/// the senders' read positions. Every statement but the last must change exactly the rows it
/// was given (checked before the commit); a read position already past a message stays.
pub(crate) fn write_append(conn: &Connection, rows: &AppendRows) -> Result<()> {
    let (parts, msgs, convs) = rows.counts;
    for (sql, json, expected, table, operation) in [
        (APPEND_PARTS_SQLITE, &rows.parts, parts, "log_partitions", "UPDATE"),
        (APPEND_MESSAGES_SQLITE, &rows.messages, msgs, "messages", "INSERT"),
        (APPEND_CONVERSATIONS_SQLITE, &rows.conversations, convs, "conversations", "UPDATE"),
    ] {
        let _span = sql_span("sqlite", operation, table).entered();
        let changed = conn.prepare_cached(sql)?.execute([json])?;
        if changed as i64 != expected {
            return Err(StoreError::Corrupt(format!("append wrote {changed} rows of {expected} in {table}")));
        }
    }
    let _span = sql_span("sqlite", "UPDATE", "members").entered();
    conn.prepare_cached(APPEND_READS_SQLITE)?.execute([&rows.reads])?;
    Ok(())
}

/// Ends the transaction [`begin_with_reads`] opened: commits a finished batch, rolls back
/// anything else (an error, or keys to run again without). A failed commit is rolled back
/// too and answered as the error it is.
pub(crate) fn end(conn: &Connection, attempt: Result<Attempt>) -> Result<Attempt> {
    let attempt = match attempt {
        Ok(Attempt::Done(results, entries)) => {
            let _span = sql_span("sqlite", "COMMIT", "").entered();
            match conn.prepare_cached("COMMIT").and_then(|mut s| s.execute([])) {
                Ok(_) => return Ok(Attempt::Done(results, entries)),
                Err(e) => Err(StoreError::from(e)),
            }
        }
        other => other,
    };
    if !conn.is_autocommit() {
        let _span = sql_span("sqlite", "ROLLBACK", "").entered();
        if let Err(e) = conn.execute_batch("ROLLBACK") {
            tracing::error!(error = %e, "ROLLBACK of a send batch failed");
        }
    }
    attempt
}

/// A message read with `crate::sql::MESSAGE_COLUMNS`.
fn message(row: &rusqlite::Row<'_>) -> Result<Message> {
    Ok(Message {
        conversation_id: row.get("conversation_id")?,
        msg_id: api_int(row.get("msg_id")?),
        from: row.get("sender")?,
        msg_type: i32::try_from(row.get::<_, i64>("msg_type")?)
            .map_err(|_| StoreError::Corrupt("msg_type out of range".into()))?,
        content: row.get("content")?,
        client_msg_id: row.get("client_msg_id")?,
        send_time: row.get("send_time")?,
        edited_at: row.get("edited_at")?,
        recalled: row.get::<_, i64>("state")? == STATE_RECALLED,
        deleted: row.get::<_, i64>("state")? == STATE_DELETED,
        streaming: row.get::<_, i64>("state")? == STATE_STREAMING,
    })
}
