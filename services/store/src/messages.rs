//! Sending and reading messages.
//!
//! A send batch runs in one transaction: lock the conversations, look up idempotency keys
//! already used, check membership and archive state, claim the new keys, append. A key that
//! is claimed concurrently by a transaction for another conversation makes that item a
//! conflict (the batch is re-run without it, so msg_ids stay gap-free).

use std::collections::{BTreeMap, HashMap, HashSet};
use tracing::Instrument;

use quickim_shared::error::{ErrorCode, ServiceError};
use quickim_shared::protocol::api::Message;
use quickim_shared::protocol::event::LogEntry;
use quickim_shared::protocol::service::{HistoryQuery, Origin};
use quickim_shared::time::now_ms;
use sqlx::{AnyConnection, Row};

use crate::log::{LockedConversation, NewEntry, UnreadRule, plan_append};
use crate::sql::{MESSAGE_COLUMNS, Params, db_int, message, pow2_chunks, to_json};
use crate::{Dialect, Result, Store, StoreError, messages_sqlite, sql_span};

/// One message to store (already validated for shape by the message service).
#[derive(Debug, Clone)]
pub struct SendItem {
    /// Client or inner.
    pub origin: Origin,
    /// Target conversation.
    pub conversation_id: String,
    /// Sender ("" for a system message from /inner).
    pub from: String,
    /// Message type.
    pub msg_type: i32,
    /// Content.
    pub content: String,
    /// Idempotency key, scoped to the sender.
    pub client_msg_id: Option<String>,
    /// false: never counts as unread (a business notice).
    pub count_unread: bool,
}

pub(crate) type Key = (String, String);

impl SendItem {
    fn key(&self) -> Option<Key> {
        self.client_msg_id.as_ref().map(|k| (self.from.clone(), k.clone()))
    }

    /// The answer to a retry that finds `m` stored under its key: `m` when it is the same
    /// message (content compared unless `m` was revised since), else a conflict.
    fn same_as(&self, m: &Message) -> std::result::Result<Message, ServiceError> {
        let revised = m.edited_at.is_some() || m.recalled || m.deleted;
        if m.conversation_id == self.conversation_id
            && m.msg_type == self.msg_type
            && (revised || m.content == self.content)
        {
            Ok(m.clone())
        } else {
            Err(ServiceError::conflict("client_msg_id was already used for a different message"))
        }
    }
}

pub(crate) enum Attempt {
    Done(Vec<std::result::Result<Message, ServiceError>>, Vec<LogEntry>),
    /// These keys were claimed concurrently for another conversation: run again without them.
    Conflicts(Vec<Key>),
}

/// What a batch decided from its reads, before writing anything.
pub(crate) struct Verdicts {
    /// Each item's answer, where already known (a refusal, or the message an idempotency
    /// key already stored).
    results: Vec<Option<std::result::Result<Message, ServiceError>>>,
    /// Items to store, in order.
    accepted: Vec<usize>,
    /// (item, earlier item of the batch with the same key): answered as that one.
    alias: Vec<(usize, usize)>,
}

impl Verdicts {
    /// Judges every item: membership, archive state, idempotency keys (`existing`: stored
    /// already; `conflicted`: claimed concurrently for another message).
    pub(crate) fn judge(
        items: &[SendItem],
        convs: &BTreeMap<String, LockedConversation>,
        members: &HashSet<(String, String)>,
        existing: &HashMap<Key, Message>,
        conflicted: &HashSet<Key>,
    ) -> Verdicts {
        let mut results: Vec<Option<std::result::Result<Message, ServiceError>>> = vec![None; items.len()];
        let mut alias: Vec<(usize, usize)> = Vec::new();
        let mut first_with_key: HashMap<Key, usize> = HashMap::new();
        let mut accepted: Vec<usize> = Vec::new();
        for (i, item) in items.iter().enumerate() {
            if let Some(key) = item.key() {
                if let Some(m) = existing.get(&key) {
                    results[i] = Some(item.same_as(m));
                    continue;
                }
                if conflicted.contains(&key) {
                    results[i] =
                        Some(Err(ServiceError::conflict("client_msg_id was already used for a different message")));
                    continue;
                }
                if let Some(&first) = first_with_key.get(&key) {
                    alias.push((i, first));
                    continue;
                }
                first_with_key.insert(key, i);
            }
            // Membership first: a non-member learns nothing about the conversation (whether
            // it exists, whether it is archived).
            let verdict = match convs.get(&item.conversation_id) {
                None => Err(ServiceError::not_member()),
                Some(_) if item.from.is_empty() => {
                    if item.origin == Origin::Inner {
                        Ok(())
                    } else {
                        Err(ServiceError::invalid("from must be a user"))
                    }
                }
                Some(_) if !members.contains(&(item.conversation_id.clone(), item.from.clone())) => {
                    Err(ServiceError::not_member())
                }
                Some(c) if c.archived && item.origin == Origin::Client => {
                    Err(ServiceError::new(ErrorCode::ConversationArchived, "the conversation is archived"))
                }
                Some(_) => Ok(()),
            };
            match verdict {
                Ok(()) => accepted.push(i),
                Err(e) => {
                    // A rejected first use of a key does not reserve it for its repeats.
                    if let Some(key) = item.key() {
                        first_with_key.remove(&key);
                    }
                    results[i] = Some(Err(e));
                }
            }
        }
        Verdicts { results, accepted, alias }
    }

    /// The log entries of the accepted items, in order.
    pub(crate) fn new_entries(&self, items: &[SendItem]) -> Vec<NewEntry> {
        self.accepted
            .iter()
            .map(|&i| {
                let it = &items[i];
                NewEntry {
                    conversation_id: it.conversation_id.clone(),
                    from: it.from.clone(),
                    msg_type: it.msg_type,
                    content: it.content.clone(),
                    client_msg_id: it.client_msg_id.clone(),
                    count_unread: it.count_unread,
                }
            })
            .collect()
    }

    /// The idempotency keys the accepted items claim, with the (conversation, msg_id) each
    /// will get (`msg_ids`, in the order of [`Verdicts::new_entries`]).
    pub(crate) fn claims<'a>(&self, items: &'a [SendItem], msg_ids: &[i64]) -> Vec<(Key, &'a str, i64)> {
        self.accepted
            .iter()
            .zip(msg_ids)
            .filter_map(|(&i, &id)| items[i].key().map(|k| (k, items[i].conversation_id.as_str(), id)))
            .collect()
    }

    /// Every item's answer, once the accepted items were appended as `entries` (in order).
    pub(crate) fn results(
        mut self,
        items: &[SendItem],
        entries: &[LogEntry],
    ) -> Vec<std::result::Result<Message, ServiceError>> {
        for (&i, e) in self.accepted.iter().zip(entries) {
            self.results[i] = Some(Ok(e.message.clone()));
        }
        for (i, first) in self.alias {
            self.results[i] = Some(match &self.results[first] {
                Some(Ok(m)) => items[i].same_as(m),
                Some(Err(e)) => Err(e.clone()),
                None => Err(ServiceError::internal("batch alias without result")),
            });
        }
        self.results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(ServiceError::internal("batch item without result"))))
            .collect()
    }
}

/// SQLite: one attempt at the batch in one transaction on `conn` (the direct connection):
/// `BEGIN IMMEDIATE` with every read of the batch, the idempotency keys, the append, then
/// `COMMIT`. Everything but a committed batch is rolled back.
fn send_attempt_sqlite(
    conn: &rusqlite::Connection,
    items: &[SendItem],
    conflicted: &HashSet<Key>,
    rule: &UnreadRule,
) -> Result<Attempt> {
    let (mut convs, members, heads) = match messages_sqlite::begin_with_reads(conn, items) {
        Ok(reads) => reads,
        Err(e) => return messages_sqlite::end(conn, Err(e)),
    };
    let attempt = (|| {
        let keys: Vec<Key> = items.iter().filter_map(SendItem::key).collect();
        let existing = messages_sqlite::existing_keys(conn, &keys)?;
        let verdicts = Verdicts::judge(items, &convs, &members, &existing, conflicted);
        let new = verdicts.new_entries(items);
        let msg_ids = Store::plan_msg_ids(&convs, &new)?;
        let lost = messages_sqlite::claim_keys(conn, &verdicts.claims(items, &msg_ids))?;
        if !lost.is_empty() {
            return Ok(Attempt::Conflicts(lost));
        }
        let entries = if new.is_empty() {
            Vec::new()
        } else {
            let (entries, rows) = plan_append(&mut convs, new, &heads, rule)?;
            messages_sqlite::write_append(conn, &rows)?;
            entries
        };
        Ok(Attempt::Done(verdicts.results(items, &entries), entries))
    })();
    messages_sqlite::end(conn, attempt)
}

/// One result per item of a batch, and the log entries to publish.
type BatchOutcome = (Vec<std::result::Result<Message, ServiceError>>, Vec<LogEntry>);

impl Store {
    /// Stores `items` in one transaction; answers one result per item, in order, and the
    /// log entries to publish once this returns (the commit is done by then). On SQLite the
    /// statements run on the calling thread (see [`Store::with_direct`]).
    ///
    /// One item the database refuses never fails the others: a batch that fails for a reason
    /// other than the database being unreachable is split in halves, each stored (in order)
    /// in a transaction of its own, down to the item at fault, which gets the error alone.
    pub async fn send_batch(&self, items: &[SendItem]) -> Result<BatchOutcome> {
        match self.send_batch_once(items).await {
            Ok(done) => Ok(done),
            Err(e) if is_isolatable(&e) => {
                if items.len() == 1 {
                    tracing::error!(error = %e, conversation_id = %items[0].conversation_id, "the database refused a message");
                    return Ok((vec![Err(ServiceError::from(e))], Vec::new()));
                }
                let (first, second) = items.split_at(items.len() / 2);
                let (mut results, mut entries) = Box::pin(self.send_batch(first)).await?;
                let (more, more_entries) = Box::pin(self.send_batch(second)).await?;
                results.extend(more);
                entries.extend(more_entries);
                Ok((results, entries))
            }
            Err(e) => Err(e),
        }
    }

    async fn send_batch_once(&self, items: &[SendItem]) -> Result<BatchOutcome> {
        let mut conflicted: HashSet<Key> = HashSet::new();
        for _ in 0..8 {
            let attempt = match self.dialect() {
                Dialect::Sqlite => {
                    let rule = self.unread_rule();
                    self.with_direct(|conn| send_attempt_sqlite(conn, items, &conflicted, rule)).await?
                }
                // Keys lost to a concurrent batch: the attempt is rolled back (so the keys it
                // claimed are free again) and run without them.
                Dialect::Postgres => match write_tx!(self, |tx| {
                    match self.try_send_batch(tx, items, &conflicted).await? {
                        Attempt::Conflicts(keys) => return Err(StoreError::KeysTaken(keys)),
                        done => Ok(done),
                    }
                }) {
                    Err(StoreError::KeysTaken(keys)) => Attempt::Conflicts(keys),
                    other => other?,
                },
            };
            match attempt {
                Attempt::Done(results, entries) => return Ok((results, entries)),
                Attempt::Conflicts(keys) => conflicted.extend(keys),
            }
        }
        Err(StoreError::Rejected(ServiceError::new(
            ErrorCode::Unavailable,
            "too much contention on idempotency keys, try again",
        )))
    }

    /// PostgreSQL: one attempt at the batch, in the caller's transaction.
    async fn try_send_batch(
        &self,
        tx: &mut AnyConnection,
        items: &[SendItem],
        conflicted: &HashSet<Key>,
    ) -> Result<Attempt> {
        let conv_ids: Vec<&str> = items.iter().map(|i| i.conversation_id.as_str()).collect();
        let mut convs = self.lock_conversations(tx, &conv_ids).await?;
        // The memberships are read by a statement of their own, after the locks are held: at
        // READ COMMITTED a statement reads with the snapshot it took when it began, so read in
        // the locking statement they could miss a removal committed by the transaction whose
        // lock it waited for (membership changes lock the conversation too).
        let members = active_pairs(self.system(), tx, items).await?;
        let keys: Vec<Key> = items.iter().filter_map(SendItem::key).collect();
        let existing = existing_keys(self.system(), tx, &keys).await?;
        let verdicts = Verdicts::judge(items, &convs, &members, &existing, conflicted);
        let new = verdicts.new_entries(items);
        // Claim the keys before the partitions are locked (the lock order of lib.rs).
        let msg_ids = Self::plan_msg_ids(&convs, &new)?;
        let lost = claim_keys(self.system(), tx, &verdicts.claims(items, &msg_ids)).await?;
        if !lost.is_empty() {
            return Ok(Attempt::Conflicts(lost));
        }
        let entries = self.append(tx, &mut convs, new).await?;
        Ok(Attempt::Done(verdicts.results(items, &entries), entries))
    }

    /// History of a conversation for an active member: at most `range_max` messages, and
    /// no more than fit in `max_bytes` of JSON — the ones nearest where the query starts
    /// (`start` of an ascending range, `end` of a descending one, the pivot, the newest).
    pub async fn history(
        &self,
        conversation_id: &str,
        user_id: &str,
        query: HistoryQuery,
        desc: bool,
        range_max: u32,
        max_bytes: usize,
    ) -> Result<Vec<Message>> {
        self.require_member(conversation_id, user_id).await?;
        let page = i64::from(range_max.min(30));
        let max = i64::from(range_max);
        // (condition, bounds, newest-first scan, limit)
        let (cond, a, b, scan_desc, limit) = match query {
            HistoryQuery::Range { start, end } => {
                if start > end {
                    return Err(ServiceError::invalid("start_msg_id must not be greater than end_msg_id").into());
                }
                // Ascending answers start from `start`; descending ones from `end`.
                ("m.msg_id >= $2 AND m.msg_id <= $3", db_int(start), db_int(end), desc, max)
            }
            HistoryQuery::Before { msg_id } => ("m.msg_id < $2 AND $3 = $3", db_int(msg_id), 0, true, page),
            HistoryQuery::After { msg_id } => ("m.msg_id > $2 AND $3 = $3", db_int(msg_id), 0, false, page),
            HistoryQuery::Last => ("$2 = $2 AND $3 = $3", 0, 0, true, page),
            HistoryQuery::LastOne => ("$2 = $2 AND $3 = $3", 0, 0, true, 1),
        };
        let sql = format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages m WHERE m.conversation_id = $1 AND {cond} \
             ORDER BY m.msg_id {} LIMIT $4",
            if scan_desc { "DESC" } else { "ASC" }
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(conversation_id)
            .bind(a)
            .bind(b)
            .bind(limit)
            .fetch_all(self.pool())
            .instrument(sql_span(self.system(), "SELECT", "messages"))
            .await?;
        let mut msgs = rows.iter().map(message).collect::<Result<Vec<_>>>()?;
        // At least one: a single message always fits (sends are refused otherwise).
        msgs.truncate(quickim_shared::bus::size::fitting(&msgs, max_bytes, 0).max(1));
        if scan_desc != desc {
            msgs.reverse();
        }
        Ok(msgs)
    }

    /// Newest msg_id of a conversation, for an active member.
    pub async fn last_msg_id(&self, conversation_id: &str, user_id: &str) -> Result<u64> {
        let row = sqlx::query(
            "SELECT c.last_msg_id FROM conversations c JOIN members m ON m.conversation_id = c.conversation_id \
             WHERE c.conversation_id = $1 AND m.user_id = $2 AND m.active = $3",
        )
        .bind(conversation_id)
        .bind(user_id)
        .bind(1i32)
        .fetch_optional(self.pool())
        .instrument(sql_span(self.system(), "SELECT", "conversations"))
        .await?
        .ok_or_else(ServiceError::not_member)?;
        Ok(crate::sql::api_int(row.try_get("last_msg_id")?))
    }
}

/// Claims `n` idempotency keys, each bound as (sender, client_msg_id, conversation_id, msg_id,
/// created_at); answers the keys it claimed (a key held already is left alone).
pub(crate) fn claim_keys_sql(system: &str, n: usize) -> String {
    let mut p = Params::new(system);
    let rows = (0..n).map(|_| p.row(5)).collect::<Vec<_>>().join(", ");
    format!(
        "INSERT INTO idempotency (sender, client_msg_id, conversation_id, msg_id, created_at) VALUES {rows} \
         ON CONFLICT (sender, client_msg_id) DO NOTHING RETURNING sender, client_msg_id"
    )
}

/// PostgreSQL: the messages stored under a JSON array of keys (`[sender, client_msg_id]`),
/// each looked up by its key. One statement for any number of keys: with a list of
/// parameters, each length was a statement of its own, planned again at every call, and
/// planned as a scan of the whole table once the list was long against the table's size.
/// `OFFSET 0` keeps the lookup a lookup per key (the planner may not merge it into a join).
/// Its text is made once.
pub(crate) static EXISTING_KEYS_POSTGRES: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "SELECT k.* FROM jsonb_array_elements($1::jsonb) AS v(e) CROSS JOIN LATERAL (\
         SELECT i.sender AS key_sender, i.client_msg_id AS key_id, {MESSAGE_COLUMNS} FROM idempotency i \
         JOIN messages m ON m.conversation_id = i.conversation_id AND m.msg_id = i.msg_id \
         WHERE i.sender = v.e ->> 0 AND i.client_msg_id = v.e ->> 1 OFFSET 0) k"
    )
});

/// PostgreSQL: which of a JSON array of (conversation, user) pairs are active members, each
/// looked up by its key (see [`EXISTING_KEYS_POSTGRES`]).
pub(crate) const ACTIVE_PAIRS_POSTGRES: &str = "\
SELECT m.conversation_id, m.user_id FROM jsonb_array_elements($1::jsonb) AS v(e) CROSS JOIN LATERAL (
  SELECT conversation_id, user_id FROM members
  WHERE conversation_id = v.e ->> 0 AND user_id = v.e ->> 1 AND active = 1 OFFSET 0
) m";

/// Messages already stored under any of `keys` (PostgreSQL; SQLite reads them in
/// `messages_sqlite::existing_keys`).
async fn existing_keys(system: &'static str, tx: &mut AnyConnection, keys: &[Key]) -> Result<HashMap<Key, Message>> {
    let mut out = HashMap::new();
    let mut keys: Vec<&Key> = keys.iter().collect();
    keys.sort();
    keys.dedup();
    if keys.is_empty() {
        return Ok(out);
    }
    let rows = sqlx::query(EXISTING_KEYS_POSTGRES.as_str())
        .bind(to_json(&keys)?)
        .fetch_all(&mut *tx)
        .instrument(sql_span(system, "SELECT", "idempotency"))
        .await?;
    for row in rows {
        let key = (row.try_get::<String, _>("key_sender")?, row.try_get::<String, _>("key_id")?);
        out.insert(key, message(&row)?);
    }
    Ok(out)
}

/// (conversation, user) pairs among the items' senders that are active members (PostgreSQL;
/// SQLite reads them with the batch's other reads, in `messages_sqlite::begin_with_reads`).
async fn active_pairs(
    system: &'static str,
    tx: &mut AnyConnection,
    items: &[SendItem],
) -> Result<HashSet<(String, String)>> {
    let mut pairs: Vec<(&str, &str)> =
        items.iter().filter(|i| !i.from.is_empty()).map(|i| (i.conversation_id.as_str(), i.from.as_str())).collect();
    pairs.sort_unstable();
    pairs.dedup();
    let mut out = HashSet::new();
    if pairs.is_empty() {
        return Ok(out);
    }
    let rows = sqlx::query(ACTIVE_PAIRS_POSTGRES)
        .bind(to_json(&pairs)?)
        .fetch_all(&mut *tx)
        .instrument(sql_span(system, "SELECT", "members"))
        .await?;
    for row in rows {
        out.insert((row.try_get("conversation_id")?, row.try_get("user_id")?));
    }
    Ok(out)
}

/// Claims idempotency keys (in key order); answers the keys someone else holds.
async fn claim_keys(system: &'static str, tx: &mut AnyConnection, claims: &[(Key, &str, i64)]) -> Result<Vec<Key>> {
    let mut sorted: Vec<&(Key, &str, i64)> = claims.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let now = now_ms();
    let mut lost = Vec::new();
    for chunk in pow2_chunks(&sorted, 64) {
        let mut q = sqlx::query(sqlx::AssertSqlSafe(claim_keys_sql(system, chunk.len())));
        for ((sender, key), conv, msg_id) in chunk.iter().map(|c| (&c.0, c.1, c.2)) {
            q = q.bind(sender.as_str()).bind(key.as_str()).bind(conv).bind(msg_id).bind(now);
        }
        let won: HashSet<Key> = q
            .fetch_all(&mut *tx)
            .instrument(sql_span(system, "INSERT", "idempotency"))
            .await?
            .iter()
            .map(|r| Ok((r.try_get::<String, _>("sender")?, r.try_get::<String, _>("client_msg_id")?)))
            .collect::<Result<_>>()?;
        lost.extend(chunk.iter().map(|c| c.0.clone()).filter(|k| !won.contains(k)));
    }
    Ok(lost)
}

/// Whether a failed batch may be split to find the item at fault: the database answered
/// and refused something (not unreachable, not a refusal meant for the client).
fn is_isolatable(e: &StoreError) -> bool {
    match e {
        StoreError::Database(db) => !crate::is_unavailable(db),
        StoreError::Sqlite(rusqlite::Error::SqliteFailure(f, _)) => {
            !matches!(f.code, rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
        }
        StoreError::Sqlite(_) | StoreError::Corrupt(_) => true,
        StoreError::Rejected(_) | StoreError::KeysTaken(_) => false,
    }
}

impl Store {
    /// Deletes at most `batch` idempotency keys claimed before `before_ms`; answers how many.
    /// A send retried with an expired key is stored again.
    ///
    /// The keys are found by scanning the table from its oldest rows (no index by age: it
    /// would cost every keyed send a write). PostgreSQL: a statement meant to scan, so it
    /// allows the planner the scan the store's connections otherwise refuse (see
    /// `postgres::open`); walked in key order instead, the old keys are spread over the table.
    pub async fn prune_keys(&self, before_ms: i64, batch: u32) -> Result<u64> {
        let sql = "DELETE FROM idempotency WHERE (sender, client_msg_id) IN \
                   (SELECT sender, client_msg_id FROM idempotency WHERE created_at < $1 LIMIT $2)";
        let query = sqlx::query(sql).bind(before_ms).bind(i64::from(batch));
        let span = sql_span(self.system(), "DELETE", "idempotency");
        let done = match self.dialect() {
            Dialect::Sqlite => query.execute(self.pool()).instrument(span).await?,
            Dialect::Postgres => {
                let mut tx = self.pool().begin().await?;
                sqlx::raw_sql("SET LOCAL enable_seqscan = on").execute(&mut *tx).await?;
                let done = query.execute(&mut *tx).instrument(span).await?;
                tx.commit().await?;
                done
            }
        };
        Ok(done.rows_affected())
    }
}
