//! The log: the one place where messages are written, and the reads that follow it.
//!
//! Appending to a conversation allocates, under the conversation's row lock, the next
//! msg_ids (gap-free per conversation), and under its partition's row lock the next offsets
//! of that partition (gap-free per partition). Both locks are held until commit, so in each
//! partition entries become visible in offset order: a reader that has seen offset N has
//! seen every offset below N. That is what makes a cursor (one offset per partition) exact.

use std::collections::{BTreeMap, HashMap};
use tracing::Instrument;

use quickim_shared::position::Position;
use quickim_shared::protocol::api::Message;
use quickim_shared::protocol::event::LogEntry;
use quickim_shared::protocol::service::{LogHeads, ReplayPage};
use quickim_shared::protocol::system;
use quickim_shared::time::now_ms;
use sqlx::AnyPool;
use sqlx::{AnyConnection, Row};

use crate::sql::{
    MESSAGE_COLUMNS, Params, api_int, db_int, entries_as_json, entries_from_json, from_json, get_bool, log_entry,
    to_json,
};
use crate::{Dialect, Result, Store, StoreError, partition_of, sql_span};

/// Rows of a replay's first chunk (later chunks are sized by the bytes per row seen). Each
/// chunk walks the user's conversations back to the cursor again, so this is large enough
/// that a typical resume reads once (docs/benchmarks.md has the before/after). A page of the
/// largest messages (64 KiB) reads at most this many rows to answer the bus budget's worth.
const REPLAY_FIRST_CHUNK: usize = 128;

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
    /// Messages that count as unread, up to `last_msg_id`.
    pub counted: i64,
    /// The newest message other than a revision.
    pub preview_msg_id: i64,
}

/// SQLite: the conversations whose ids are in the JSON array bound to `?`, as one JSON value
/// (read back with [`locked_from_json`]).
macro_rules! sqlite_conversations_json {
    () => {
        "SELECT json_group_array(json_array(conversation_id, joinable, archived, last_msg_id, \
         last_send_time, part, counted, preview_msg_id)) FROM conversations \
         WHERE conversation_id IN (SELECT value FROM jsonb_each(?))"
    };
}
pub(crate) use sqlite_conversations_json;

/// SQLite: every partition's head as one JSON value (read back with [`heads_from_json`]).
macro_rules! sqlite_heads_json {
    () => {
        "SELECT json_group_array(json_array(part, head)) FROM log_partitions"
    };
}
pub(crate) use sqlite_heads_json;

/// Partition heads as read on SQLite: `[[part, head], ...]`.
pub(crate) fn heads_from_json(json: &str) -> Result<HashMap<u16, i64>> {
    Ok(from_json::<Vec<(u16, i64)>>(json)?.into_iter().collect())
}

/// Conversations as read on SQLite: `[[id, joinable, archived, last_msg_id, last_send_time,
/// part, counted, preview_msg_id], ...]`.
pub(crate) fn locked_from_json(json: &str) -> Result<BTreeMap<String, LockedConversation>> {
    type Row = (String, i64, i64, i64, i64, i64, i64, i64);
    let rows: Vec<Row> = from_json(json)?;
    let mut out = BTreeMap::new();
    for (id, joinable, archived, last_msg_id, last_send_time, part, counted, preview_msg_id) in rows {
        let part = u16::try_from(part).map_err(|_| StoreError::Corrupt("partition out of range".into()))?;
        out.insert(
            id,
            LockedConversation {
                joinable: joinable != 0,
                archived: archived != 0,
                last_msg_id,
                last_send_time,
                part,
                counted,
                preview_msg_id,
            },
        );
    }
    Ok(out)
}

/// PostgreSQL: locks the conversations of a JSON array of ids, in id order (FOR UPDATE locks
/// the rows after the sort), and answers the ones that exist.
pub(crate) const LOCK_CONVERSATIONS_POSTGRES: &str = "\
SELECT conversation_id, joinable, archived, last_msg_id, last_send_time, part, counted, preview_msg_id
FROM conversations WHERE conversation_id = ANY (ARRAY(SELECT jsonb_array_elements_text($1::jsonb)))
ORDER BY conversation_id FOR UPDATE";

/// A message to append (its conversation must be locked in the same transaction).
#[derive(Debug, Clone)]
pub(crate) struct NewEntry {
    pub conversation_id: String,
    pub from: String,
    pub msg_type: i32,
    pub content: String,
    pub client_msg_id: Option<String>,
    /// false: never counts as unread (`count_unread: false` of /inner); otherwise the
    /// store's [`UnreadRule`] decides.
    pub count_unread: bool,
}

impl NewEntry {
    /// A system message (from nobody) of `msg_type` with `content`.
    pub(crate) fn system(conversation_id: &str, msg_type: i32, content: String) -> NewEntry {
        NewEntry {
            conversation_id: conversation_id.to_string(),
            from: String::new(),
            msg_type,
            content,
            client_msg_id: None,
            count_unread: true,
        }
    }
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
        if self.dialect() == Dialect::Sqlite {
            // The write transaction holds SQLite's one write lock already. One row, the
            // conversations as a JSON array: SQLite hands a statement's rows over one by one,
            // each a wake-up of the writer, which cost more than the rows themselves.
            let row = sqlx::query(concat!("SELECT (", sqlite_conversations_json!(), ") AS rows"))
                .bind(to_json(&ids)?)
                .fetch_one(&mut *tx)
                .instrument(sql_span(self.system(), "SELECT", "conversations"))
                .await?;
            return locked_from_json(&row.try_get::<String, _>("rows")?);
        }
        // PostgreSQL: one statement for any number of ids (a JSON array), looked up by key.
        // With a list of parameters instead, each list length was a statement of its own,
        // planned again at every call, and from a few dozen ids planned as a scan of the
        // whole table (docs/benchmarks.md has the measurements).
        let rows = sqlx::query(LOCK_CONVERSATIONS_POSTGRES)
            .bind(to_json(&ids)?)
            .fetch_all(&mut *tx)
            .instrument(sql_span(self.system(), "SELECT", "conversations"))
            .await?;
        for row in rows {
            out.insert(
                row.try_get("conversation_id")?,
                LockedConversation {
                    joinable: get_bool(&row, "joinable")?,
                    archived: get_bool(&row, "archived")?,
                    last_msg_id: row.try_get("last_msg_id")?,
                    last_send_time: row.try_get("last_send_time")?,
                    part: u16::try_from(row.try_get::<i64, _>("part")?)
                        .map_err(|_| StoreError::Corrupt("partition out of range".into()))?,
                    counted: row.try_get("counted")?,
                    preview_msg_id: row.try_get("preview_msg_id")?,
                },
            );
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
        // PostgreSQL: lock the partitions' rows in partition order (FOR UPDATE takes the locks
        // after the sort) and read their heads, in one round trip; the locks are held until
        // commit, so the fewer round trips after this point the better. SQLite: the write
        // transaction already holds the only write lock; read the heads. Either way the new
        // heads are written with the other writes below, in one round trip.
        let mut heads: HashMap<u16, i64> = HashMap::new();
        match self.dialect() {
            Dialect::Postgres => {
                let parts = entries_per_part(convs, &entries);
                let mut p = Params::new(self.system());
                let sql = format!(
                    "SELECT part, head FROM log_partitions WHERE part IN ({}) ORDER BY part FOR UPDATE",
                    p.list(parts.len())
                );
                let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
                for part in parts.keys() {
                    q = q.bind(i32::from(*part));
                }
                let rows =
                    q.fetch_all(&mut *tx).instrument(sql_span(self.system(), "SELECT", "log_partitions")).await?;
                for row in rows {
                    let part = u16::try_from(row.try_get::<i64, _>("part")?)
                        .map_err(|_| StoreError::Corrupt("partition out of range".into()))?;
                    heads.insert(part, row.try_get("head")?);
                }
            }
            Dialect::Sqlite => {
                let row = sqlx::query(concat!("SELECT (", sqlite_heads_json!(), ") AS rows"))
                    .fetch_one(&mut *tx)
                    .instrument(sql_span(self.system(), "SELECT", "log_partitions"))
                    .await?;
                heads = heads_from_json(&row.try_get::<String, _>("rows")?)?;
            }
        }
        let (out, rows) = plan_append(convs, entries, &heads, self.unread_rule())?;
        match self.dialect() {
            Dialect::Sqlite => write_sqlite(tx, &rows).await?,
            Dialect::Postgres => write_postgres(tx, &rows).await?,
        }
        Ok(out)
    }

    /// Current heads of every partition.
    pub async fn heads(&self) -> Result<LogHeads> {
        let mut conn = self.pool().acquire().await?;
        Ok(LogHeads { epoch: self.epoch(), heads: read_heads(self.system(), &mut conn).await? })
    }

    /// Entries of `part` with `after < offset <= upto`, in offset order: at most `limit`,
    /// and no more once their contents hold `max_bytes` (at least one entry). Read in chunks
    /// sized by the bytes per row seen, so a page of large messages does not read a thousand
    /// of them to answer a few.
    pub async fn read_log(
        &self,
        part: u16,
        after: u64,
        upto: u64,
        limit: u32,
        max_bytes: usize,
    ) -> Result<Vec<LogEntry>> {
        const CHUNK: u32 = 64;
        let sqlite = self.dialect() == Dialect::Sqlite;
        let sql: &str = if sqlite { &READ_LOG_SQLITE } else { &READ_LOG };
        let mut out: Vec<LogEntry> = Vec::new();
        let mut bytes = 0;
        let mut from = after;
        // The first chunk is small; later ones are sized by the bytes per row seen.
        let mut want = (CHUNK / 4).min(limit);
        while (out.len() as u32) < limit && from < upto && bytes < max_bytes {
            let q = sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(i32::from(part))
                .bind(db_int(from))
                .bind(db_int(upto))
                .bind(i64::from(want));
            let span = sql_span(self.system(), "SELECT", "messages");
            let chunk = if sqlite {
                let row = q.fetch_one(self.pool()).instrument(span).await?;
                entries_from_json(&row.try_get::<String, _>("rows")?)?
            } else {
                q.fetch_all(self.pool()).instrument(span).await?.iter().map(log_entry).collect::<Result<Vec<_>>>()?
            };
            let got = chunk.len() as u32;
            for entry in chunk {
                if bytes >= max_bytes {
                    break;
                }
                bytes += entry.message.content.len();
                from = entry.offset;
                out.push(entry);
            }
            if got < want {
                break;
            }
            let per_row = (bytes / out.len().max(1)).max(1);
            let rows = (max_bytes.saturating_sub(bytes) / per_row + 1).min(CHUNK as usize) as u32;
            want = rows.clamp(1, (limit - out.len() as u32).max(1));
        }
        Ok(out)
    }

    /// Within a conversation msg_ids and offsets grow together, so the messages after the
    /// cursor are found by walking the conversation's primary key back from its newest
    /// message to the first one at or below the cursor: the cost is the backlog, and no
    /// index by offset is needed (one index fewer to write per message). That walk runs once
    /// per conversation (`mine`, materialized): written as a condition of the messages' join,
    /// PostgreSQL with fresh statistics ran it once per message, the backlog squared. `mine`
    /// starts from the user's memberships and looks each conversation up by its key: joined
    /// to `conversations`, PostgreSQL scanned the whole table for every replay until its
    /// statistics said the table was large.
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
        // Read in chunks sized by what the previous ones weighed: a page of large messages
        // reads a few rows beyond what it answers, not hundreds.
        let limit = limit.max(1) as usize;
        let mut after = after.to_vec();
        let mut entries: Vec<LogEntry> = Vec::new();
        let mut bytes = 0usize;
        let mut want = limit.min(REPLAY_FIRST_CHUNK);
        loop {
            let chunk = self.replay_chunk(user_id, &after, upto, want + 1).await?;
            let more_rows = chunk.len() > want;
            let taken = chunk.len().min(want);
            for (i, entry) in chunk.into_iter().take(want).enumerate() {
                let p = usize::from(entry.part);
                // Partitions before this one are complete; this one is at the entry.
                for q in 0..p.min(after.len()) {
                    after[q] = after[q].max(upto[q]);
                }
                if let Some(a) = after.get_mut(p) {
                    *a = entry.offset;
                }
                bytes += entry.message.content.len();
                entries.push(entry);
                if entries.len() >= limit || bytes >= max_bytes {
                    let more = more_rows || i + 1 < taken;
                    return Ok(ReplayPage { entries, more, expired: false });
                }
            }
            if !more_rows {
                return Ok(ReplayPage { entries, more: false, expired: false });
            }
            let per_row = (bytes / entries.len().max(1)).max(1);
            want = ((max_bytes - bytes) / per_row + 1).clamp(1, limit - entries.len());
        }
    }

    /// At most `limit` entries of the replay from `after` to `upto`, in (partition, offset)
    /// order.
    async fn replay_chunk(&self, user_id: &str, after: &[u64], upto: &[u64], limit: usize) -> Result<Vec<LogEntry>> {
        let ranges: Vec<(u16, u64, u64)> = (0..self.partitions())
            .map(|p| (p, after[usize::from(p)], upto[usize::from(p)]))
            .filter(|(_, a, u)| u > a)
            .collect();
        if ranges.is_empty() {
            return Ok(Vec::new());
        }
        let sql = replay_chunk_sql(self.system(), ranges.len());
        let sqlite = self.dialect() == Dialect::Sqlite;
        let sql = if sqlite { entries_as_json(&sql) } else { sql };
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for (part, a, u) in &ranges {
            q = q.bind(i32::from(*part)).bind(db_int(*a)).bind(db_int(*u));
        }
        q = q.bind(user_id).bind(limit as i64);
        let span = sql_span(self.system(), "SELECT", "members");
        let found = if sqlite {
            let row = q.fetch_one(self.pool()).instrument(span).await?;
            entries_from_json(&row.try_get::<String, _>("rows")?)?
        } else {
            q.fetch_all(self.pool()).instrument(span).await?.iter().map(log_entry).collect::<Result<Vec<_>>>()?
        };
        Ok(found)
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
    pub async fn horizon(&self, retention_ms: i64) -> Result<Option<Position>> {
        let row = sqlx::query("SELECT heads FROM log_checkpoints WHERE taken_at <= $1 ORDER BY taken_at DESC LIMIT 1")
            .bind(now_ms() - retention_ms)
            .fetch_optional(self.pool())
            .instrument(sql_span(self.system(), "SELECT", "log_checkpoints"))
            .await?;
        match row {
            None => Ok(None),
            Some(row) => {
                let text: String = row.try_get("heads")?;
                let heads: Position = serde_json::from_str(&text).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                Ok((heads.partitions() == usize::from(self.partitions())).then_some(heads))
            }
        }
    }

    /// The partition a new conversation goes to.
    pub(crate) fn partition_for(&self, conversation_id: &str) -> u16 {
        partition_of(conversation_id, self.partitions())
    }
}

/// A replay chunk's statement for `ranges` partitions: (part, after, upto) per partition, then
/// the user and the limit.
pub(crate) fn replay_chunk_sql(system: &str, ranges: usize) -> String {
    let mut p = Params::new(system);
    let values = (0..ranges).map(|_| p.row(3)).collect::<Vec<_>>().join(", ");
    let user = p.next();
    let lim = p.next();
    format!(
        "WITH cur (p, a, u) AS (VALUES {values}), \
         mine AS MATERIALIZED (SELECT mb.conversation_id, mb.joined_msg_id, mb.active, \
           mb.left_msg_id, cur.a, cur.u, COALESCE((SELECT m2.msg_id FROM messages m2 \
             WHERE m2.conversation_id = mb.conversation_id AND m2.log_offset <= cur.a \
             ORDER BY m2.msg_id DESC LIMIT 1), 0) AS start \
           FROM members mb JOIN cur ON cur.p = (SELECT c.part FROM conversations c \
             WHERE c.conversation_id = mb.conversation_id) \
           WHERE mb.user_id = {user} AND (SELECT c.last_offset FROM conversations c \
             WHERE c.conversation_id = mb.conversation_id) > cur.a) \
         SELECT {MESSAGE_COLUMNS} FROM mine \
         JOIN messages m ON m.conversation_id = mine.conversation_id AND m.msg_id > mine.start \
         WHERE m.log_offset > mine.a AND m.log_offset <= mine.u \
           AND m.msg_id >= mine.joined_msg_id \
           AND (mine.active = 1 OR m.msg_id <= mine.left_msg_id) \
         ORDER BY m.part, m.log_offset LIMIT {lim}"
    )
}

/// One chunk of a partition's log: (part, after, upto, limit). Its text is made once.
pub(crate) static READ_LOG: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "SELECT {MESSAGE_COLUMNS} FROM messages m WHERE m.part = $1 AND m.log_offset > $2 \
         AND m.log_offset <= $3 ORDER BY m.log_offset LIMIT $4"
    )
});

/// SQLite: [`READ_LOG`] answering all its rows as one JSON value.
static READ_LOG_SQLITE: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| entries_as_json(&READ_LOG));

pub(crate) async fn read_heads(system: &'static str, conn: &mut AnyConnection) -> Result<Position> {
    let rows = sqlx::query("SELECT head FROM log_partitions ORDER BY part")
        .fetch_all(&mut *conn)
        .instrument(sql_span(system, "SELECT", "log_partitions"))
        .await?;
    let heads: Result<Vec<u64>> = rows.iter().map(|r| Ok(api_int(r.try_get("head")?))).collect();
    heads.map(Position::from)
}

/// How many of `entries` go to each partition (by their locked conversations).
fn entries_per_part(convs: &BTreeMap<String, LockedConversation>, entries: &[NewEntry]) -> BTreeMap<u16, i64> {
    let mut per_part: BTreeMap<u16, i64> = BTreeMap::new();
    for e in entries {
        let part = convs.get(&e.conversation_id).map(|c| c.part).unwrap_or(0);
        *per_part.entry(part).or_insert(0) += 1;
    }
    per_part
}

/// The in-memory half of an append, given the partitions' current `heads`: allocates the
/// entries' msg_ids and offsets (moving the locked conversations' heads along) and answers
/// the log entries with the rows that write them.
pub(crate) fn plan_append(
    convs: &mut BTreeMap<String, LockedConversation>,
    entries: Vec<NewEntry>,
    heads: &HashMap<u16, i64>,
    rule: &UnreadRule,
) -> Result<(Vec<LogEntry>, AppendRows)> {
    let now = now_ms();
    let msg_ids = Store::plan_msg_ids(convs, &entries)?;
    // Offsets: each partition's entries follow its head, in order.
    let per_part = entries_per_part(convs, &entries);
    let mut next_offset: HashMap<u16, i64> = HashMap::new();
    let mut new_heads: Vec<(u16, i64)> = Vec::with_capacity(per_part.len());
    for (part, count) in &per_part {
        let head = heads.get(part).copied().ok_or_else(|| StoreError::Corrupt("partition missing".into()))?;
        next_offset.insert(*part, head + 1);
        new_heads.push((*part, head + count));
    }
    let mut out = Vec::with_capacity(entries.len());
    let mut counted = Vec::with_capacity(entries.len());
    for (e, msg_id) in entries.into_iter().zip(msg_ids) {
        let conv =
            convs.get_mut(&e.conversation_id).ok_or_else(|| StoreError::Corrupt("conversation not locked".into()))?;
        let offset = next_offset.get_mut(&conv.part).ok_or_else(|| StoreError::Corrupt("partition".into()))?;
        if rule.counts(e.msg_type, e.count_unread) {
            conv.counted += 1;
        }
        counted.push(conv.counted);
        conv.last_msg_id = msg_id;
        // A revision changes another message: it is neither what a conversation list shows
        // nor activity that moves the conversation up.
        if e.msg_type != system::REVISED {
            conv.last_send_time = now;
            conv.preview_msg_id = msg_id;
        }
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
                ..Message::default()
            },
        };
        *offset += 1;
        out.push(entry);
    }
    let rows = AppendRows::of(&new_heads, &out, &counted, convs)?;
    Ok((out, rows))
}

/// Which messages count as unread: user and business messages unless sent with
/// `count_unread: false`, and the system types configured (`unread_system_types`; none by
/// default). A sender's own message never counts for it: sending moves its read position.
/// The rule applies when a message is stored; changing it changes nothing stored before.
#[derive(Debug, Clone, Default)]
pub struct UnreadRule {
    system_types: Vec<i32>,
}

impl UnreadRule {
    /// System types listed in `system_types` count too.
    pub fn new(system_types: Vec<i32>) -> UnreadRule {
        UnreadRule { system_types }
    }

    /// Whether a message of `msg_type` sent with `count_unread` counts.
    pub fn counts(&self, msg_type: i32, count_unread: bool) -> bool {
        count_unread && (msg_type >= 0 || self.system_types.contains(&msg_type))
    }
}

/// The rows an append writes, as JSON arrays bound as one parameter per table: the
/// statements' texts never change (they stay prepared however many rows a batch has), and a
/// batch is written in one round trip.
pub(crate) struct AppendRows {
    /// `[[part, head], ...]`
    pub(crate) parts: String,
    /// `[[conversation_id, msg_id, part, log_offset, sender, msg_type, content,
    /// client_msg_id, send_time, counted], ...]`
    pub(crate) messages: String,
    /// `[[conversation_id, last_msg_id, last_offset, last_send_time, counted,
    /// preview_msg_id], ...]` (one per conversation)
    pub(crate) conversations: String,
    /// `[[conversation_id, user_id, msg_id, counted], ...]`: each sender has read up to its
    /// own newest message (one per conversation and sender).
    pub(crate) reads: String,
    /// Rows of each: (partitions, messages, conversations).
    pub(crate) counts: (i64, i64, i64),
    /// Rows of `reads`.
    pub(crate) read_rows: i64,
}

impl AppendRows {
    fn of(
        new_heads: &[(u16, i64)],
        appended: &[LogEntry],
        counted: &[i64],
        convs: &BTreeMap<String, LockedConversation>,
    ) -> Result<AppendRows> {
        let messages: Vec<_> = appended
            .iter()
            .zip(counted)
            .map(|(e, counted)| {
                let m = &e.message;
                (
                    &m.conversation_id,
                    db_int(m.msg_id),
                    e.part,
                    db_int(e.offset),
                    &m.from,
                    m.msg_type,
                    &m.content,
                    &m.client_msg_id,
                    m.send_time,
                    counted,
                )
            })
            .collect();
        let mut newest: BTreeMap<&str, &LogEntry> = BTreeMap::new();
        let mut reads: BTreeMap<(&str, &str), (i64, i64)> = BTreeMap::new();
        for (e, counted) in appended.iter().zip(counted) {
            newest.insert(&e.message.conversation_id, e);
            if !e.message.from.is_empty() {
                reads.insert((&e.message.conversation_id, &e.message.from), (db_int(e.message.msg_id), *counted));
            }
        }
        let mut conversations = Vec::with_capacity(newest.len());
        for (id, e) in newest {
            let c = convs.get(id).ok_or_else(|| StoreError::Corrupt("conversation not locked".into()))?;
            conversations.push((
                id,
                db_int(e.message.msg_id),
                db_int(e.offset),
                c.last_send_time,
                c.counted,
                c.preview_msg_id,
            ));
        }
        let reads: Vec<_> = reads.into_iter().map(|((c, u), (msg_id, counted))| (c, u, msg_id, counted)).collect();
        Ok(AppendRows {
            parts: to_json(&new_heads)?,
            messages: to_json(&messages)?,
            conversations: to_json(&conversations)?,
            reads: to_json(&reads)?,
            counts: (new_heads.len() as i64, messages.len() as i64, conversations.len() as i64),
            read_rows: reads.len() as i64,
        })
    }
}

/// SQLite: the partitions' new heads (`AppendRows::parts`).
macro_rules! append_parts_sqlite {
    () => {
        "UPDATE log_partitions SET head = v.value ->> 1 FROM jsonb_each(?) AS v WHERE log_partitions.part = v.value ->> 0"
    };
}
pub(crate) const APPEND_PARTS_SQLITE: &str = append_parts_sqlite!();

/// SQLite: the messages (`AppendRows::messages`).
macro_rules! append_messages_sqlite {
    () => {
        "INSERT INTO messages (conversation_id, msg_id, part, log_offset, sender, msg_type, content, client_msg_id, \
         send_time, counted) SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5, \
         value ->> 6, value ->> 7, value ->> 8, value ->> 9 FROM jsonb_each(?)"
    };
}
pub(crate) const APPEND_MESSAGES_SQLITE: &str = append_messages_sqlite!();

/// SQLite: the conversations' new heads (`AppendRows::conversations`).
macro_rules! append_conversations_sqlite {
    () => {
        "UPDATE conversations SET last_msg_id = v.value ->> 1, last_offset = v.value ->> 2, \
         last_send_time = v.value ->> 3, counted = v.value ->> 4, preview_msg_id = v.value ->> 5 \
         FROM jsonb_each(?) AS v WHERE conversations.conversation_id = v.value ->> 0"
    };
}
pub(crate) const APPEND_CONVERSATIONS_SQLITE: &str = append_conversations_sqlite!();

/// SQLite: the senders' read positions (`AppendRows::reads`).
macro_rules! append_reads_sqlite {
    () => {
        "UPDATE members SET read_msg_id = v.value ->> 2, read_counted = v.value ->> 3 FROM jsonb_each(?) AS v \
         WHERE members.conversation_id = v.value ->> 0 AND members.user_id = v.value ->> 1 \
         AND members.read_msg_id < v.value ->> 2"
    };
}
pub(crate) const APPEND_READS_SQLITE: &str = append_reads_sqlite!();

/// SQLite: the statements of an append in one round trip to the connection's worker thread
/// (for the writes of conversation changes and revisions; send batches run them one by one
/// on the direct connection).
const APPEND_SQLITE: &str = concat!(
    append_parts_sqlite!(),
    ";\n",
    append_messages_sqlite!(),
    ";\n",
    append_conversations_sqlite!(),
    ";\n",
    append_reads_sqlite!(),
    ";"
);

async fn write_sqlite(tx: &mut AnyConnection, rows: &AppendRows) -> Result<()> {
    let span = tracing::info_span!(
        "db.query",
        otel.name = "UPDATE log_partitions; INSERT messages; UPDATE conversations; UPDATE members",
        otel.kind = "client",
        db.system.name = "sqlite",
        db.operation.name = "BATCH",
        db.operation.batch.size = 4,
    );
    let done = sqlx::query(APPEND_SQLITE)
        .bind(rows.parts.as_str())
        .bind(rows.messages.as_str())
        .bind(rows.conversations.as_str())
        .bind(rows.reads.as_str())
        .execute(&mut *tx)
        .instrument(span)
        .await?;
    // sqlx sums sqlite3_changes() over the statements.
    let (parts, msgs, convs) = rows.counts;
    let expected = parts + msgs + convs + rows.read_rows;
    if done.rows_affected() != expected as u64 {
        return Err(StoreError::Corrupt(format!("append wrote {} rows of {expected}", done.rows_affected())));
    }
    Ok(())
}

/// PostgreSQL: the same writes in one statement — one round trip while the partition locks
/// are held, where one statement per table (and per chunk of rows) took five or more.
///
/// The conversations and the senders' member rows are found through their keys (`= ANY` of
/// the batch's ids): joined to `jsonb_array_elements` alone (which the planner takes for 100
/// rows), an update was planned as a hash join over a scan of the whole table, per batch,
/// growing with the table (docs/benchmarks.md).
pub(crate) const APPEND_POSTGRES: &str = "\
WITH parts AS (
  UPDATE log_partitions p SET head = (v.e ->> 1)::bigint
  FROM jsonb_array_elements($1::jsonb) AS v(e)
  WHERE p.part = (v.e ->> 0)::integer RETURNING 1
), msgs AS (
  INSERT INTO messages (conversation_id, msg_id, part, log_offset, sender, msg_type, content, client_msg_id, send_time,
    counted)
  SELECT e ->> 0, (e ->> 1)::bigint, (e ->> 2)::integer, (e ->> 3)::bigint, e ->> 4, (e ->> 5)::integer, e ->> 6,
    e ->> 7, (e ->> 8)::bigint, (e ->> 9)::bigint
  FROM jsonb_array_elements($2::jsonb) AS v(e)
  RETURNING 1
), convs AS (
  UPDATE conversations c SET last_msg_id = (v.e ->> 1)::bigint, last_offset = (v.e ->> 2)::bigint,
    last_send_time = (v.e ->> 3)::bigint, counted = (v.e ->> 4)::bigint, preview_msg_id = (v.e ->> 5)::bigint
  FROM jsonb_array_elements($3::jsonb) AS v(e)
  WHERE c.conversation_id = v.e ->> 0
    AND c.conversation_id = ANY (ARRAY(SELECT w.e ->> 0 FROM jsonb_array_elements($3::jsonb) AS w(e)))
  RETURNING 1
), reads AS (
  UPDATE members m SET read_msg_id = (v.e ->> 2)::bigint, read_counted = (v.e ->> 3)::bigint
  FROM jsonb_array_elements($4::jsonb) AS v(e)
  WHERE m.conversation_id = v.e ->> 0 AND m.user_id = v.e ->> 1 AND m.read_msg_id < (v.e ->> 2)::bigint
    AND m.conversation_id = ANY (ARRAY(SELECT w.e ->> 0 FROM jsonb_array_elements($4::jsonb) AS w(e)))
  RETURNING 1
)
SELECT (SELECT count(*) FROM parts) AS parts, (SELECT count(*) FROM msgs) AS msgs, (SELECT count(*) FROM convs) AS convs,
  (SELECT count(*) FROM reads) AS reads";

async fn write_postgres(tx: &mut AnyConnection, rows: &AppendRows) -> Result<()> {
    let row = sqlx::query(APPEND_POSTGRES)
        .bind(rows.parts.as_str())
        .bind(rows.messages.as_str())
        .bind(rows.conversations.as_str())
        .bind(rows.reads.as_str())
        .fetch_one(&mut *tx)
        .instrument(sql_span("postgresql", "INSERT", "messages"))
        .await?;
    let written = (row.try_get::<i64, _>("parts")?, row.try_get::<i64, _>("msgs")?, row.try_get::<i64, _>("convs")?);
    if written != rows.counts {
        return Err(StoreError::Corrupt(format!("append wrote {written:?} rows")));
    }
    Ok(())
}

impl Store {
    /// Deletes at most `batch` messages at or below `horizon` (one offset per partition: the
    /// log's heads of the retention period ago), through the log's index; answers how many.
    /// The conversations, their msg_id counters and memberships stay.
    pub async fn prune_messages(&self, horizon: &[u64], batch: u32) -> Result<u64> {
        let mut deleted = 0;
        for (part, head) in horizon.iter().enumerate() {
            if deleted >= u64::from(batch) {
                break;
            }
            let left = i64::from(batch) - deleted as i64;
            let done = sqlx::query(
                "DELETE FROM messages WHERE part = $1 AND log_offset IN \
                 (SELECT log_offset FROM messages WHERE part = $2 AND log_offset <= $3 ORDER BY log_offset LIMIT $4)",
            )
            .bind(part as i32)
            .bind(part as i32)
            .bind(db_int(*head))
            .bind(left)
            .execute(self.pool())
            .instrument(sql_span(self.system(), "DELETE", "messages"))
            .await?;
            deleted += done.rows_affected();
        }
        Ok(deleted)
    }
}
