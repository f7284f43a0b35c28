//! The log: the one place where messages are written, and the reads that follow it.
//!
//! Appending to a conversation allocates, under the conversation's row lock, the next
//! msg_ids (gap-free per conversation), and under its partition's row lock the next offsets
//! of that partition (gap-free per partition). Both locks are held until commit, so in each
//! partition entries become visible in offset order: a reader that has seen offset N has
//! seen every offset below N. That is what makes a cursor (one offset per partition) exact.

use std::collections::{BTreeMap, HashMap};
use tracing::Instrument;

use quickim_shared::protocol::api::Message;
use quickim_shared::protocol::event::LogEntry;
use quickim_shared::protocol::service::{LogHeads, ReplayPage};
use quickim_shared::time::now_ms;
use sqlx::AnyPool;
use sqlx::{AnyConnection, Row};

use crate::sql::{Arg, MESSAGE_COLUMNS, Params, Script, api_int, db_int, get_bool, log_entry, padded, pow2_chunks};
use crate::{Dialect, Result, Store, StoreError, partition_of, sql_span};

/// Creates the meta rows and partitions of a new database; answers (partitions, epoch).
pub(crate) async fn init_meta(system: &'static str, pool: &AnyPool, partitions_if_new: u16) -> Result<(u16, u32)> {
    let mut tx = pool.begin().await?;
    let epoch: u32 = rand::random::<u32>() | 1;
    for (key, value) in [("partitions", partitions_if_new.to_string()), ("epoch", epoch.to_string())] {
        sqlx::query("INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING")
            .bind(key)
            .bind(value)
            .execute(&mut *tx)
            .instrument(sql_span(system, "INSERT", "meta"))
            .await?;
    }
    let rows = sqlx::query("SELECT key, value FROM meta")
        .fetch_all(&mut *tx)
        .instrument(sql_span(system, "SELECT", "meta"))
        .await?;
    let mut meta = HashMap::new();
    for row in rows {
        meta.insert(row.try_get::<String, _>("key")?, row.try_get::<String, _>("value")?);
    }
    let parse = |k: &str| -> Result<u64> {
        meta.get(k)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| StoreError::Corrupt(format!("meta {k} missing or unreadable")))
    };
    let partitions = u16::try_from(parse("partitions")?).map_err(|_| StoreError::Corrupt("meta partitions".into()))?;
    let epoch = u32::try_from(parse("epoch")?).map_err(|_| StoreError::Corrupt("meta epoch".into()))?;
    for part in 0..partitions {
        sqlx::query("INSERT INTO log_partitions (part, head) VALUES ($1, 0) ON CONFLICT (part) DO NOTHING")
            .bind(i32::from(part))
            .execute(&mut *tx)
            .instrument(sql_span(system, "INSERT", "log_partitions"))
            .await?;
    }
    tx.commit().await?;
    Ok((partitions, epoch))
}

/// A conversation's row, locked for this transaction.
#[derive(Debug, Clone)]
pub(crate) struct LockedConversation {
    pub joinable: bool,
    pub archived: bool,
    pub last_msg_id: i64,
    pub last_send_time: i64,
    pub part: u16,
}

/// A message to append (its conversation must be locked in the same transaction).
#[derive(Debug, Clone)]
pub(crate) struct NewEntry {
    pub conversation_id: String,
    pub from: String,
    pub msg_type: i32,
    pub content: String,
    pub client_msg_id: Option<String>,
}

impl Store {
    /// Locks the given conversations (in id order) and answers the ones that exist.
    pub(crate) async fn lock_conversations(
        &self,
        tx: &mut AnyConnection,
        ids: &[&str],
    ) -> Result<BTreeMap<String, LockedConversation>> {
        let mut ids: Vec<&str> = ids.to_vec();
        ids.sort_unstable();
        ids.dedup();
        let mut out = BTreeMap::new();
        for chunk in ids.chunks(512).map(padded) {
            let mut p = Params::new(self.system());
            let sql = format!(
                "SELECT conversation_id, joinable, archived, last_msg_id, \
                 last_send_time, part FROM conversations WHERE conversation_id IN ({}) \
                 ORDER BY conversation_id{}",
                p.list(chunk.len()),
                self.for_update()
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for id in &chunk {
                q = q.bind(*id);
            }
            for row in q.fetch_all(&mut *tx).instrument(sql_span(self.system(), "SELECT", "conversations")).await? {
                out.insert(
                    row.try_get("conversation_id")?,
                    LockedConversation {
                        joinable: get_bool(&row, "joinable")?,
                        archived: get_bool(&row, "archived")?,
                        last_msg_id: row.try_get("last_msg_id")?,
                        last_send_time: row.try_get("last_send_time")?,
                        part: u16::try_from(row.try_get::<i64, _>("part")?)
                            .map_err(|_| StoreError::Corrupt("partition out of range".into()))?,
                    },
                );
            }
        }
        Ok(out)
    }

    /// The msg_ids `entries` will get, in order, given the locked conversations.
    pub(crate) fn plan_msg_ids(convs: &BTreeMap<String, LockedConversation>, entries: &[NewEntry]) -> Result<Vec<i64>> {
        let mut next: HashMap<&str, i64> = HashMap::new();
        let mut out = Vec::with_capacity(entries.len());
        for e in entries {
            let conv = convs
                .get(&e.conversation_id)
                .ok_or_else(|| StoreError::Corrupt(format!("conversation {} not locked", e.conversation_id)))?;
            let n = next.entry(e.conversation_id.as_str()).or_insert(conv.last_msg_id);
            *n += 1;
            out.push(*n);
        }
        Ok(out)
    }

    /// Appends `entries` (in order) to their locked conversations: allocates msg_ids and
    /// partition offsets, inserts the messages, moves the conversations' heads. Answers the
    /// log entries, to be published after commit.
    pub(crate) async fn append(
        &self,
        tx: &mut AnyConnection,
        convs: &mut BTreeMap<String, LockedConversation>,
        entries: Vec<NewEntry>,
    ) -> Result<Vec<LogEntry>> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let now = now_ms();
        let msg_ids = Self::plan_msg_ids(convs, &entries)?;
        // Offsets: lock each partition once, in partition order, for all its entries.
        let mut per_part: BTreeMap<u16, i64> = BTreeMap::new();
        for e in &entries {
            let part = convs.get(&e.conversation_id).map(|c| c.part).unwrap_or(0);
            *per_part.entry(part).or_insert(0) += 1;
        }
        let mut next_offset: HashMap<u16, i64> = HashMap::new();
        // PostgreSQL: lock the partitions' rows in partition order (FOR UPDATE takes the locks
        // after the sort) and read their heads, in one round trip; the locks are held until
        // commit, so the fewer round trips after this point the better. SQLite: the write
        // transaction already holds the only write lock; read the heads. Either way the new
        // heads are written with the other writes below, in one round trip.
        let rows = match self.dialect() {
            Dialect::Postgres => {
                let mut p = Params::new(self.system());
                let sql = format!(
                    "SELECT part, head FROM log_partitions WHERE part IN ({}) ORDER BY part FOR UPDATE",
                    p.list(per_part.len())
                );
                let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
                for part in per_part.keys() {
                    q = q.bind(i32::from(*part));
                }
                q.fetch_all(&mut *tx).instrument(sql_span(self.system(), "SELECT", "log_partitions")).await?
            }
            Dialect::Sqlite => {
                sqlx::query("SELECT part, head FROM log_partitions")
                    .fetch_all(&mut *tx)
                    .instrument(sql_span(self.system(), "SELECT", "log_partitions"))
                    .await?
            }
        };
        let mut heads: HashMap<u16, i64> = HashMap::new();
        for row in rows {
            let part = u16::try_from(row.try_get::<i64, _>("part")?)
                .map_err(|_| StoreError::Corrupt("partition out of range".into()))?;
            heads.insert(part, row.try_get("head")?);
        }
        // New heads, in partition order.
        let mut new_heads: Vec<(u16, i64)> = Vec::with_capacity(per_part.len());
        for (part, count) in &per_part {
            let head = heads.get(part).copied().ok_or_else(|| StoreError::Corrupt("partition missing".into()))?;
            next_offset.insert(*part, head + 1);
            new_heads.push((*part, head + count));
        }
        let mut out = Vec::with_capacity(entries.len());
        for (e, msg_id) in entries.into_iter().zip(msg_ids) {
            let conv = convs
                .get_mut(&e.conversation_id)
                .ok_or_else(|| StoreError::Corrupt("conversation not locked".into()))?;
            let offset = next_offset.get_mut(&conv.part).ok_or_else(|| StoreError::Corrupt("partition".into()))?;
            let entry = LogEntry {
                part: conv.part,
                offset: api_int(*offset),
                message: Message {
                    conversation_id: e.conversation_id,
                    msg_id: api_int(msg_id),
                    from: e.from,
                    msg_type: e.msg_type,
                    content: e.content,
                    client_msg_id: e.client_msg_id,
                    send_time: now,
                },
            };
            *offset += 1;
            conv.last_msg_id = msg_id;
            conv.last_send_time = now;
            out.push(entry);
        }
        match self.dialect() {
            Dialect::Sqlite => {
                let mut script = Script::new();
                update_partitions(&mut script, &new_heads);
                insert_messages(&mut script, &out);
                update_heads(&mut script, &out);
                script.run(tx).await?;
            }
            Dialect::Postgres => write_postgres(tx, &new_heads, &out).await?,
        }
        Ok(out)
    }

    /// Current heads of every partition.
    pub async fn heads(&self) -> Result<LogHeads> {
        let mut conn = self.pool().acquire().await?;
        Ok(LogHeads { epoch: self.epoch(), heads: read_heads(self.system(), &mut conn).await? })
    }

    /// Entries of `part` with `after < offset <= upto`, in offset order, at most `limit`.
    pub async fn read_log(&self, part: u16, after: u64, upto: u64, limit: u32) -> Result<Vec<LogEntry>> {
        let sql = format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages m WHERE m.part = $1 AND m.log_offset > $2 \
             AND m.log_offset <= $3 ORDER BY m.log_offset LIMIT $4"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(i32::from(part))
            .bind(db_int(after))
            .bind(db_int(upto))
            .bind(i64::from(limit))
            .fetch_all(self.pool())
            .instrument(sql_span(self.system(), "SELECT", "messages"))
            .await?;
        rows.iter().map(log_entry).collect()
    }

    /// Within a conversation msg_ids and offsets grow together, so the messages after the
    /// cursor are found by walking the conversation's primary key back from its newest
    /// message to the first one at or below the cursor: the cost is the backlog, and no
    /// index by offset is needed (one index fewer to write per message).
    ///
    /// One page of what `user_id` missed with `after < offset <= upto` (per partition), in
    /// (partition, offset) order: messages of conversations it is a member of, from its join
    /// on, and for conversations it left or was removed from, up to the message that recorded
    /// it. A page holds at most `limit` entries and stops after `max_bytes` of content.
    /// Nothing is answered (`expired`) when `after` is older than the retention horizon.
    pub async fn replay(
        &self,
        user_id: &str,
        after: &[u64],
        upto: &[u64],
        limit: u32,
        max_bytes: usize,
        retention_ms: i64,
    ) -> Result<ReplayPage> {
        let parts = usize::from(self.partitions());
        let expired = ReplayPage { entries: Vec::new(), more: false, expired: true };
        if after.len() != parts || upto.len() != parts {
            return Ok(expired);
        }
        if let Some(h) = self.horizon(retention_ms).await?
            && after.iter().zip(&h).any(|(a, h)| a < h)
        {
            return Ok(expired);
        }
        let ranges: Vec<(u16, u64, u64)> = (0..self.partitions())
            .map(|p| (p, after[usize::from(p)], upto[usize::from(p)]))
            .filter(|(_, a, u)| u > a)
            .collect();
        if ranges.is_empty() {
            return Ok(ReplayPage::default());
        }
        let mut p = Params::new(self.system());
        let values = ranges.iter().map(|_| p.row(3)).collect::<Vec<_>>().join(", ");
        let user = p.next();
        let lim = p.next();
        let sql = format!(
            "WITH cur (p, a, u) AS (VALUES {values}) \
             SELECT {MESSAGE_COLUMNS} FROM members mb \
             JOIN conversations c ON c.conversation_id = mb.conversation_id \
             JOIN cur ON cur.p = c.part \
             JOIN messages m ON m.conversation_id = mb.conversation_id \
               AND m.msg_id > COALESCE((SELECT m2.msg_id FROM messages m2 \
                   WHERE m2.conversation_id = mb.conversation_id AND m2.log_offset <= cur.a \
                   ORDER BY m2.msg_id DESC LIMIT 1), 0) \
             WHERE mb.user_id = {user} AND c.last_offset > cur.a \
               AND m.log_offset > cur.a AND m.log_offset <= cur.u \
               AND m.msg_id >= mb.joined_msg_id \
               AND (mb.active = 1 OR m.msg_id <= mb.left_msg_id) \
             ORDER BY m.part, m.log_offset LIMIT {lim}"
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for (part, a, u) in &ranges {
            q = q.bind(i32::from(*part)).bind(db_int(*a)).bind(db_int(*u));
        }
        q = q.bind(user_id).bind(i64::from(limit.max(1)) + 1);
        let rows = q.fetch_all(self.pool()).instrument(sql_span(self.system(), "SELECT", "members")).await?;
        let mut more = rows.len() > limit.max(1) as usize;
        let mut entries = Vec::with_capacity(rows.len().min(limit.max(1) as usize));
        let mut bytes = 0;
        for row in rows.iter().take(limit.max(1) as usize) {
            let entry = log_entry(row)?;
            bytes += entry.message.content.len();
            entries.push(entry);
            if bytes >= max_bytes {
                more = more || entries.len() < rows.len();
                break;
            }
        }
        Ok(ReplayPage { entries, more, expired: false })
    }

    /// Records the current heads (called periodically); forgets checkpoints older than
    /// twice `retention_ms`.
    pub async fn record_checkpoint(&self, retention_ms: i64) -> Result<()> {
        let heads = self.heads().await?;
        let now = now_ms();
        let text = serde_json::to_string(&heads.heads).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        sqlx::query("INSERT INTO log_checkpoints (taken_at, heads) VALUES ($1, $2) ON CONFLICT (taken_at) DO NOTHING")
            .bind(now)
            .bind(text)
            .execute(self.pool())
            .instrument(sql_span(self.system(), "INSERT", "log_checkpoints"))
            .await?;
        sqlx::query("DELETE FROM log_checkpoints WHERE taken_at < $1")
            .bind(now - 2 * retention_ms.max(1))
            .execute(self.pool())
            .instrument(sql_span(self.system(), "DELETE", "log_checkpoints"))
            .await?;
        Ok(())
    }

    /// The heads of `retention_ms` ago (the newest checkpoint at least that old), if any:
    /// positions below them are outside the replay window.
    pub async fn horizon(&self, retention_ms: i64) -> Result<Option<Vec<u64>>> {
        let row = sqlx::query("SELECT heads FROM log_checkpoints WHERE taken_at <= $1 ORDER BY taken_at DESC LIMIT 1")
            .bind(now_ms() - retention_ms)
            .fetch_optional(self.pool())
            .instrument(sql_span(self.system(), "SELECT", "log_checkpoints"))
            .await?;
        match row {
            None => Ok(None),
            Some(row) => {
                let text: String = row.try_get("heads")?;
                let heads: Vec<u64> = serde_json::from_str(&text).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                Ok((heads.len() == usize::from(self.partitions())).then_some(heads))
            }
        }
    }

    /// The partition a new conversation goes to.
    pub(crate) fn partition_for(&self, conversation_id: &str) -> u16 {
        partition_of(conversation_id, self.partitions())
    }
}

pub(crate) async fn read_heads(system: &'static str, conn: &mut AnyConnection) -> Result<Vec<u64>> {
    let rows = sqlx::query("SELECT head FROM log_partitions ORDER BY part")
        .fetch_all(&mut *conn)
        .instrument(sql_span(system, "SELECT", "log_partitions"))
        .await?;
    rows.iter().map(|r| Ok(api_int(r.try_get("head")?))).collect()
}

/// Adds the inserts of `entries` to `script` (chunks of fixed sizes, so texts repeat).
fn insert_messages<'a>(script: &mut Script<'a>, entries: &'a [LogEntry]) {
    for chunk in pow2_chunks(entries, 64) {
        let mut p = script.params();
        let rows = chunk.iter().map(|_| p.row(9)).collect::<Vec<_>>().join(", ");
        let sql = format!(
            "INSERT INTO messages (conversation_id, msg_id, part, log_offset, sender, msg_type, content, \
             client_msg_id, send_time) VALUES {rows}"
        );
        let mut args = Vec::with_capacity(chunk.len() * 9);
        for e in chunk {
            let m = &e.message;
            args.extend([
                Arg::Text(&m.conversation_id),
                Arg::I64(db_int(m.msg_id)),
                Arg::I32(i32::from(e.part)),
                Arg::I64(db_int(e.offset)),
                Arg::Text(&m.from),
                Arg::I32(m.msg_type),
                Arg::Text(&m.content),
                Arg::OptText(m.client_msg_id.as_deref()),
                Arg::I64(m.send_time),
            ]);
        }
        script.push(sql, args, "INSERT", "messages");
    }
}

/// Adds the partitions' new heads to `script` (SQLite).
fn update_partitions(script: &mut Script<'_>, new_heads: &[(u16, i64)]) {
    let mut p = script.params();
    let mut case = String::new();
    let mut args = Vec::with_capacity(new_heads.len() * 3);
    for (part, head) in new_heads {
        case.push_str(&format!(" WHEN {} THEN {}", p.next(), p.next()));
        args.push(Arg::I32(i32::from(*part)));
        args.push(Arg::I64(*head));
    }
    let parts = p.list(new_heads.len());
    args.extend(new_heads.iter().map(|(part, _)| Arg::I32(i32::from(*part))));
    script.push(
        format!("UPDATE log_partitions SET head = CASE part{case} END WHERE part IN ({parts})"),
        args,
        "UPDATE",
        "log_partitions",
    );
}

/// PostgreSQL: the partitions' new heads, the messages and the conversations' new heads in
/// one statement — one round trip while the partition locks are held, where one statement
/// per table (and per chunk of rows) took five or more. The rows travel as three JSON
/// arrays, so the statement's text never changes and stays prepared.
const APPEND_POSTGRES: &str = "\
WITH parts AS (
  UPDATE log_partitions p SET head = v.head
  FROM json_to_recordset($1::json) AS v(part INTEGER, head BIGINT)
  WHERE p.part = v.part RETURNING 1
), msgs AS (
  INSERT INTO messages (conversation_id, msg_id, part, log_offset, sender, msg_type, content, client_msg_id, send_time)
  SELECT m.conversation_id, m.msg_id, m.part, m.log_offset, m.sender, m.msg_type, m.content, m.client_msg_id, m.send_time
  FROM json_to_recordset($2::json) AS m(conversation_id TEXT, msg_id BIGINT, part INTEGER, log_offset BIGINT,
    sender TEXT, msg_type INTEGER, content TEXT, client_msg_id TEXT, send_time BIGINT)
  RETURNING 1
), convs AS (
  UPDATE conversations c SET last_msg_id = v.last_msg_id, last_offset = v.last_offset, last_send_time = v.send_time
  FROM json_to_recordset($3::json) AS v(conversation_id TEXT, last_msg_id BIGINT, last_offset BIGINT, send_time BIGINT)
  WHERE c.conversation_id = v.conversation_id RETURNING 1
)
SELECT (SELECT count(*) FROM parts) AS parts, (SELECT count(*) FROM msgs) AS msgs, (SELECT count(*) FROM convs) AS convs";

async fn write_postgres(tx: &mut AnyConnection, new_heads: &[(u16, i64)], appended: &[LogEntry]) -> Result<()> {
    use serde_json::json;
    let parts: Vec<serde_json::Value> =
        new_heads.iter().map(|(part, head)| json!({"part": part, "head": head})).collect();
    let messages: Vec<serde_json::Value> = appended
        .iter()
        .map(|e| {
            let m = &e.message;
            json!({
                "conversation_id": m.conversation_id,
                "msg_id": db_int(m.msg_id),
                "part": e.part,
                "log_offset": db_int(e.offset),
                "sender": m.from,
                "msg_type": m.msg_type,
                "content": m.content,
                "client_msg_id": m.client_msg_id,
                "send_time": m.send_time,
            })
        })
        .collect();
    let mut newest: BTreeMap<&str, &LogEntry> = BTreeMap::new();
    for e in appended {
        newest.insert(&e.message.conversation_id, e);
    }
    let conversations: Vec<serde_json::Value> = newest
        .into_iter()
        .map(|(id, e)| {
            json!({
                "conversation_id": id,
                "last_msg_id": db_int(e.message.msg_id),
                "last_offset": db_int(e.offset),
                "send_time": e.message.send_time,
            })
        })
        .collect();
    let encode = |v: &Vec<serde_json::Value>| {
        serde_json::to_string(v).map_err(|e| StoreError::Corrupt(format!("cannot encode rows: {e}")))
    };
    let row = sqlx::query(APPEND_POSTGRES)
        .bind(encode(&parts)?)
        .bind(encode(&messages)?)
        .bind(encode(&conversations)?)
        .fetch_one(&mut *tx)
        .instrument(sql_span("postgresql", "INSERT", "messages"))
        .await?;
    let written = (row.try_get::<i64, _>("parts")?, row.try_get::<i64, _>("msgs")?, row.try_get::<i64, _>("convs")?);
    if written != (parts.len() as i64, messages.len() as i64, conversations.len() as i64) {
        return Err(StoreError::Corrupt(format!("append wrote {written:?} rows")));
    }
    Ok(())
}

/// Adds the moves of the conversations' heads (newest msg_id and offset) to `script`.
fn update_heads<'a>(script: &mut Script<'a>, appended: &'a [LogEntry]) {
    let mut newest: BTreeMap<&str, &LogEntry> = BTreeMap::new();
    for e in appended {
        newest.insert(&e.message.conversation_id, e);
    }
    let newest: Vec<(&str, &LogEntry)> = newest.into_iter().collect();
    for chunk in newest.chunks(256).map(padded) {
        let mut p = script.params();
        let mut msg_case = String::new();
        let mut off_case = String::new();
        let mut args = Vec::with_capacity(chunk.len() * 5 + 1);
        for (id, e) in &chunk {
            msg_case.push_str(&format!(" WHEN {} THEN {}", p.next(), p.next()));
            args.extend([Arg::Text(id), Arg::I64(db_int(e.message.msg_id))]);
        }
        for (id, e) in &chunk {
            off_case.push_str(&format!(" WHEN {} THEN {}", p.next(), p.next()));
            args.extend([Arg::Text(id), Arg::I64(db_int(e.offset))]);
        }
        let time = p.next();
        args.push(Arg::I64(chunk.first().map(|(_, e)| e.message.send_time).unwrap_or_else(now_ms)));
        let ids = p.list(chunk.len());
        args.extend(chunk.iter().map(|(id, _)| Arg::Text(id)));
        script.push(
            format!(
                "UPDATE conversations SET last_msg_id = CASE conversation_id{msg_case} END, \
                 last_offset = CASE conversation_id{off_case} END, last_send_time = {time} \
                 WHERE conversation_id IN ({ids})"
            ),
            args,
            "UPDATE",
            "conversations",
        );
    }
}
