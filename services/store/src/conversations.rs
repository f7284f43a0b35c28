//! Conversations and membership. Every change is written together with the system message
//! that records it (through [`Store::append`]), so a change has a place in the conversation's
//! msg_id order and in the log that /notify follows.

use std::collections::{HashMap, HashSet};
use tracing::Instrument;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use quickim_shared::bus::size;
use quickim_shared::error::{ErrorCode, ServiceError};
use quickim_shared::protocol::api::{
    ConversationDetail, ConversationMeta, ConversationSummary, JoinedConversations, MemberInfo, MemberRole,
    MembersPage, Message, MetaRole, Role, UpdateConversationRequest,
};
use quickim_shared::protocol::event::LogEntry;
use quickim_shared::protocol::service::{
    ConversationIdsPage, MembershipRow, Memberships, PresenceChange, Receipt, ReceiptsPage,
};
use quickim_shared::protocol::system;
use quickim_shared::time::now_ms;
use sqlx::{AnyConnection, Row};

use crate::log::{NewEntry, read_heads};
use crate::sql::{MESSAGE_COLUMNS, Params, api_int, db_int, get_bool, message, padded, pow2_chunks};
use crate::{Result, Store, StoreError, sql_span};

/// A conversation to create.
#[derive(Debug, Clone)]
pub struct NewConversation {
    /// Given id, or None to generate a UUIDv7.
    pub conversation_id: Option<String>,
    /// Opaque small integer.
    pub conversation_type: i32,
    /// Whether users may join by themselves.
    pub joinable: bool,
    /// Initial members (owner included or not).
    pub members: Vec<String>,
    /// Owner, if any.
    pub owner: Option<String>,
    /// Title.
    pub title: Option<String>,
    /// Avatar.
    pub avatar: Option<String>,
    /// Free JSON object.
    pub ext: Option<serde_json::Value>,
    /// Who may change the metadata besides the business system.
    pub meta_role: MetaRole,
    /// Whether members get each other's read receipts.
    pub receipts: bool,
    /// Whether members get each other's presence.
    pub presence: bool,
}

/// Where a mark_read left the member's read position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadMark {
    /// The read position after the call.
    pub read_msg_id: u64,
    /// What still counts as unread.
    pub unread: u64,
    /// Whether this call moved it.
    pub moved: bool,
    /// Whether the conversation has read receipts on.
    pub receipts: bool,
}

/// What creating a conversation did.
#[derive(Debug, Clone)]
pub struct CreateOutcome {
    /// The conversation.
    pub conversation_id: String,
    /// False when an identical conversation existed (idempotent repeat).
    pub created: bool,
    /// Log entries to publish (the CREATED message), empty for a repeat.
    pub entries: Vec<LogEntry>,
}

fn dedup(users: &[String]) -> Vec<String> {
    let mut seen = HashSet::new();
    users.iter().filter(|u| seen.insert(u.as_str())).cloned().collect()
}

impl Store {
    /// Creates a conversation with its members and its CREATED message (msg_id 1). Creating
    /// an existing id again with the same type, owner and members is a no-op; anything else
    /// is a conflict.
    pub async fn create_conversation(&self, new: NewConversation) -> Result<CreateOutcome> {
        let id = new.conversation_id.clone().unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
        let mut members = new.members.clone();
        if let Some(owner) = &new.owner {
            members.insert(0, owner.clone());
        }
        let members = dedup(&members);
        let mut sorted = members.clone();
        sorted.sort();
        let meta_role = (new.meta_role != MetaRole::None).then(|| new.meta_role.as_str().to_string());
        let created = system::Created {
            conversation_type: new.conversation_type,
            owner: new.owner.clone(),
            user_ids: sorted,
            title: new.title.clone().filter(|t| !t.is_empty()),
            avatar: new.avatar.clone().filter(|a| !a.is_empty()),
            ext: new.ext.clone().filter(|e| !is_empty_ext(e)),
            meta_role: meta_role.clone(),
            receipts: (!new.receipts).then_some(false),
            presence: new.presence.then_some(true),
        };
        let ext_text = created.ext.as_ref().map(|e| e.to_string());
        let part = self.partition_for(&id);
        write_tx!(self, |tx| {
            let now = now_ms();
            let inserted = sqlx::query(
                "INSERT INTO conversations (conversation_id, conversation_type, joinable, archived, created_at, \
                 last_msg_id, last_send_time, part, last_offset, title, avatar, ext, meta_role, receipts, presence) \
                 VALUES ($1, $2, $3, $4, $5, 0, $6, $7, 0, $8, $9, $10, $11, $12, $13) \
                 ON CONFLICT (conversation_id) DO NOTHING",
            )
            .bind(id.as_str())
            .bind(new.conversation_type)
            .bind(i32::from(new.joinable))
            .bind(0i32)
            .bind(now)
            .bind(now)
            .bind(i32::from(part))
            .bind(created.title.as_deref())
            .bind(created.avatar.as_deref())
            .bind(ext_text.as_deref())
            .bind(meta_role.as_deref())
            .bind(i32::from(new.receipts))
            .bind(i32::from(new.presence))
            .execute(&mut **tx)
            .instrument(sql_span(self.system(), "INSERT", "conversations"))
            .await?
            .rows_affected();
            if inserted == 0 {
                return self.same_creation(tx, &id, &created, new.joinable).await;
            }
            let mut convs = self.lock_conversations(tx, &[id.as_str()]).await?;
            let entries = self
                .append(tx, &mut convs, vec![NewEntry::system(&id, system::CREATED, system::content(&created))])
                .await?;
            let msg_id = entries.first().map(|e| e.message.msg_id).unwrap_or(1);
            let counted = convs.get(id.as_str()).map_or(0, |c| c.counted);
            let rows: Vec<(String, Role)> = members
                .iter()
                .map(|u| {
                    let role = if Some(u) == new.owner.as_ref() { Role::Owner } else { Role::Member };
                    (u.clone(), role)
                })
                .collect();
            upsert_members(self.system(), tx, &id, &rows, msg_id, counted).await?;
            Ok(CreateOutcome { conversation_id: id.clone(), created: true, entries })
        })
    }

    async fn same_creation(
        &self,
        tx: &mut AnyConnection,
        id: &str,
        wanted: &system::Created,
        joinable: bool,
    ) -> Result<CreateOutcome> {
        let convs = self.lock_conversations(tx, &[id]).await?;
        let row =
            sqlx::query("SELECT content FROM messages WHERE conversation_id = $1 AND msg_id = 1 AND msg_type = $2")
                .bind(id)
                .bind(system::CREATED)
                .fetch_optional(&mut *tx)
                .instrument(sql_span(self.system(), "SELECT", "messages"))
                .await?;
        let existing: Option<system::Created> = match row {
            Some(r) => serde_json::from_str(&r.try_get::<String, _>("content")?).ok(),
            None => None,
        };
        let same = existing.as_ref() == Some(wanted) && convs.get(id).map(|c| c.joinable) == Some(joinable);
        if same {
            Ok(CreateOutcome { conversation_id: id.to_string(), created: false, entries: Vec::new() })
        } else {
            Err(ServiceError::conflict("a different conversation with this conversation_id exists").into())
        }
    }

    /// Adds members (writing one JOINED message for those not already members). With
    /// `self_join`, the conversation must be joinable: a private or unknown conversation is
    /// `not_member` either way. For /inner, an unknown conversation is `not_found`.
    pub async fn join(
        &self,
        conversation_id: &str,
        user_ids: &[String],
        self_join: bool,
        max_members: u64,
    ) -> Result<(Vec<String>, Vec<LogEntry>)> {
        let users = dedup(user_ids);
        write_tx!(self, |tx| {
            let mut convs = self.lock_conversations(tx, &[conversation_id]).await?;
            let Some(conv) = convs.get(conversation_id) else {
                return Err(missing(self_join));
            };
            if self_join && !conv.joinable {
                return Err(ServiceError::not_member().into());
            }
            let active = active_members(self.system(), tx, conversation_id, &users).await?;
            let new: Vec<String> = users.iter().filter(|u| !active.contains(*u)).cloned().collect();
            if new.is_empty() {
                return Ok((users.clone(), Vec::new()));
            }
            let count: i64 =
                sqlx::query("SELECT count(*) AS n FROM members WHERE conversation_id = $1 AND active = $2")
                    .bind(conversation_id)
                    .bind(1i32)
                    .fetch_one(&mut **tx)
                    .instrument(sql_span(self.system(), "SELECT", "members"))
                    .await?
                    .try_get("n")?;
            if api_int(count) + new.len() as u64 > max_members {
                return Err(ServiceError::new(
                    ErrorCode::ConversationFull,
                    format!("the conversation has {count} members; it takes at most {max_members}"),
                )
                .into());
            }
            let entries =
                self.append(tx, &mut convs, vec![system_entry(conversation_id, system::JOINED, &new)]).await?;
            let msg_id = entries.first().map(|e| e.message.msg_id).unwrap_or_default();
            let counted = convs.get(conversation_id).map_or(0, |c| c.counted);
            let rows: Vec<(String, Role)> = new.iter().map(|u| (u.clone(), Role::Member)).collect();
            upsert_members(self.system(), tx, conversation_id, &rows, msg_id, counted).await?;
            Ok((users.clone(), entries))
        })
    }

    /// The member leaves (writing a LEFT message).
    pub async fn leave(&self, conversation_id: &str, user_id: &str) -> Result<Vec<LogEntry>> {
        let user = vec![user_id.to_string()];
        write_tx!(self, |tx| {
            let mut convs = self.lock_conversations(tx, &[conversation_id]).await?;
            if !convs.contains_key(conversation_id)
                || active_members(self.system(), tx, conversation_id, &user).await?.is_empty()
            {
                return Err(ServiceError::not_member().into());
            }
            let entries = self.append(tx, &mut convs, vec![system_entry(conversation_id, system::LEFT, &user)]).await?;
            deactivate(self.system(), tx, conversation_id, &user, &entries).await?;
            Ok(entries)
        })
    }

    /// Removes members (writing one KICKED message for those who were members).
    pub async fn kick(&self, conversation_id: &str, user_ids: &[String]) -> Result<(Vec<String>, Vec<LogEntry>)> {
        let users = dedup(user_ids);
        write_tx!(self, |tx| {
            let mut convs = self.lock_conversations(tx, &[conversation_id]).await?;
            if !convs.contains_key(conversation_id) {
                return Err(missing(false));
            }
            let active = active_members(self.system(), tx, conversation_id, &users).await?;
            let kicked: Vec<String> = users.iter().filter(|u| active.contains(*u)).cloned().collect();
            if kicked.is_empty() {
                return Ok((kicked, Vec::new()));
            }
            let entries =
                self.append(tx, &mut convs, vec![system_entry(conversation_id, system::KICKED, &kicked)]).await?;
            deactivate(self.system(), tx, conversation_id, &kicked, &entries).await?;
            Ok((kicked, entries))
        })
    }

    /// Sets the archived flag (writing an ARCHIVED message for each conversation that
    /// changes). Unknown ids are skipped; the answer lists the changed ones.
    pub async fn set_archived(
        &self,
        conversation_ids: &[String],
        archived: bool,
    ) -> Result<(Vec<String>, Vec<LogEntry>)> {
        let ids = dedup(conversation_ids);
        write_tx!(self, |tx| {
            let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
            let mut convs = self.lock_conversations(tx, &refs).await?;
            let changed: Vec<String> = ids
                .iter()
                .filter(|id| convs.get(id.as_str()).is_some_and(|c| c.archived != archived))
                .cloned()
                .collect();
            if changed.is_empty() {
                return Ok((changed, Vec::new()));
            }
            let mut p = Params::new(self.system());
            let flag = p.next();
            let sql = format!(
                "UPDATE conversations SET archived = {flag} WHERE conversation_id IN ({})",
                p.list(changed.len())
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(i32::from(archived));
            for id in &changed {
                q = q.bind(id.as_str());
            }
            q.execute(&mut **tx).instrument(sql_span(self.system(), "UPDATE", "conversations")).await?;
            let content = system::content(&system::Archived { archived });
            let new: Vec<NewEntry> =
                changed.iter().map(|id| NewEntry::system(id, system::ARCHIVED, content.clone())).collect();
            for id in &changed {
                if let Some(c) = convs.get_mut(id) {
                    c.archived = archived;
                }
            }
            let entries = self.append(tx, &mut convs, new).await?;
            Ok((changed.clone(), entries))
        })
    }

    /// Whether `user_id` is an active member.
    pub async fn is_member(&self, conversation_id: &str, user_id: &str) -> Result<bool> {
        let row =
            sqlx::query("SELECT 1 AS one FROM members WHERE conversation_id = $1 AND user_id = $2 AND active = $3")
                .bind(conversation_id)
                .bind(user_id)
                .bind(1i32)
                .fetch_optional(self.pool())
                .instrument(sql_span(self.system(), "SELECT", "members"))
                .await?;
        Ok(row.is_some())
    }

    /// Fails with `not_member` unless `user_id` is an active member.
    pub async fn require_member(&self, conversation_id: &str, user_id: &str) -> Result<()> {
        if self.is_member(conversation_id, user_id).await? { Ok(()) } else { Err(ServiceError::not_member().into()) }
    }

    /// The conversation and one page of its active members, in join order, after `cursor`
    /// (from the previous page): at most `limit`, and no more than fit in `max_bytes` of
    /// JSON with the rest of the answer (caller must be a member).
    pub async fn detail(
        &self,
        conversation_id: &str,
        user_id: &str,
        cursor: Option<&str>,
        limit: u32,
        max_bytes: usize,
    ) -> Result<ConversationDetail> {
        let after = members_cursor(cursor)?;
        self.require_member(conversation_id, user_id).await?;
        let conv = sqlx::query(
            "SELECT conversation_type, joinable, archived, created_at, last_msg_id, last_send_time, title, avatar, ext, \
             meta_role, receipts, presence, \
             (SELECT count(*) FROM members WHERE conversation_id = $1 AND active = $2) AS member_count \
             FROM conversations WHERE conversation_id = $1",
        )
        .bind(conversation_id)
        .bind(1i32)
        .fetch_optional(self.pool())
        .instrument(sql_span(self.system(), "SELECT", "conversations"))
        .await?
        .ok_or_else(ServiceError::not_member)?;
        let meta = meta_of(conversation_id, &conv)?;
        // The rest of the answer takes at most this much (ids of 128 characters, numbers).
        let budget = max_bytes.saturating_sub(512 + size::encoded_len(&meta));
        let (members, next_members_cursor) = self.members_after(conversation_id, after, limit, budget).await?;
        Ok(ConversationDetail {
            conversation_id: conversation_id.to_string(),
            conversation_type: conv.try_get::<i64, _>("conversation_type")? as i32,
            joinable: get_bool(&conv, "joinable")?,
            archived: get_bool(&conv, "archived")?,
            title: meta.title,
            avatar: meta.avatar,
            ext: meta.ext,
            meta_role: meta.meta_role,
            receipts: meta.receipts,
            presence: meta.presence,
            created_at: conv.try_get("created_at")?,
            last_msg_id: api_int(conv.try_get("last_msg_id")?),
            last_send_time: conv.try_get("last_send_time")?,
            member_count: api_int(conv.try_get("member_count")?),
            members,
            next_members_cursor,
        })
    }

    /// One page of a conversation's active members, for the business system (no membership
    /// check; an unknown conversation is `not_found`).
    pub async fn members_page(
        &self,
        conversation_id: &str,
        cursor: Option<&str>,
        limit: u32,
        max_bytes: usize,
    ) -> Result<MembersPage> {
        let after = members_cursor(cursor)?;
        let count = sqlx::query(
            "SELECT (SELECT count(*) FROM members WHERE conversation_id = $1 AND active = $2) AS member_count \
             FROM conversations WHERE conversation_id = $1",
        )
        .bind(conversation_id)
        .bind(1i32)
        .fetch_optional(self.pool())
        .instrument(sql_span(self.system(), "SELECT", "conversations"))
        .await?
        .ok_or_else(|| ServiceError::new(ErrorCode::NotFound, "no such conversation"))?;
        let (members, next_cursor) =
            self.members_after(conversation_id, after, limit, max_bytes.saturating_sub(512)).await?;
        Ok(MembersPage { member_count: api_int(count.try_get("member_count")?), members, next_cursor })
    }

    /// Active members after `after` (joined_msg_id, user_id) in join order: at most `limit`
    /// and `max_bytes` of JSON (at least one); answers them and the cursor of the next page.
    async fn members_after(
        &self,
        conversation_id: &str,
        (after_joined, after_user): (i64, String),
        limit: u32,
        max_bytes: usize,
    ) -> Result<(Vec<MemberInfo>, Option<String>)> {
        let rows = sqlx::query(
            "SELECT m.user_id, m.role, m.joined_msg_id, m.read_msg_id, NULLIF(p.last_seen, 0) AS last_seen FROM members m \
             LEFT JOIN user_presence p ON p.user_id = m.user_id \
             WHERE m.conversation_id = $1 AND m.active = $2 AND (m.joined_msg_id, m.user_id) > ($3, $4) \
             ORDER BY m.joined_msg_id, m.user_id LIMIT $5",
        )
        .bind(conversation_id)
        .bind(1i32)
        .bind(after_joined)
        .bind(after_user)
        .bind(i64::from(limit.max(1)) + 1)
        .fetch_all(self.pool())
        .instrument(sql_span(self.system(), "SELECT", "members"))
        .await?;
        let mut members = rows
            .iter()
            .map(|r| {
                Ok(MemberInfo {
                    user_id: r.try_get("user_id")?,
                    role: Role::parse(&r.try_get::<String, _>("role")?),
                    joined_msg_id: api_int(r.try_get("joined_msg_id")?),
                    read_msg_id: api_int(r.try_get("read_msg_id")?),
                    last_seen: r.try_get("last_seen")?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut more = members.len() > limit.max(1) as usize;
        members.truncate(limit.max(1) as usize);
        let fits = size::fitting(&members, max_bytes, 0).max(1).min(members.len());
        if fits < members.len() {
            members.truncate(fits);
            more = true;
        }
        let next =
            if more { members.last().map(|m| encode_page_cursor(db_int(m.joined_msg_id), &m.user_id)) } else { None };
        Ok((members, next))
    }

    /// One page of the user's conversations, newest activity first, each with its metadata,
    /// its last message, the user's read position and unread count: at most `limit`, and no
    /// more than fit in `max_bytes` of JSON.
    pub async fn list_joined(
        &self,
        user_id: &str,
        archived: Option<bool>,
        limit: u32,
        cursor: Option<&str>,
        max_bytes: usize,
    ) -> Result<JoinedConversations> {
        let after = match cursor {
            None => None,
            Some(c) => Some(
                decode_page_cursor(c).ok_or_else(|| ServiceError::invalid("cursor is not a cursor from this API"))?,
            ),
        };
        let mut p = Params::new(self.system());
        let mut sql = format!(
            "SELECT c.conversation_id, c.conversation_type, c.last_msg_id, c.last_send_time, c.archived, c.title, \
             c.avatar, c.ext, c.counted, c.preview_msg_id, m.read_msg_id, m.read_counted, m.role, m.muted \
             FROM members m JOIN conversations c ON c.conversation_id = m.conversation_id \
             WHERE m.user_id = {} AND m.active = {}",
            p.next(),
            p.next()
        );
        if archived.is_some() {
            sql.push_str(&format!(" AND c.archived = {}", p.next()));
        }
        if after.is_some() {
            let (t1, t2, id) = (p.next(), p.next(), p.next());
            sql.push_str(&format!(
                " AND (c.last_send_time < {t1} OR (c.last_send_time = {t2} AND c.conversation_id > {id}))"
            ));
        }
        sql.push_str(&format!(" ORDER BY c.last_send_time DESC, c.conversation_id ASC LIMIT {}", p.next()));
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(user_id).bind(1i32);
        if let Some(a) = archived {
            q = q.bind(i32::from(a));
        }
        if let Some((t, id)) = &after {
            q = q.bind(*t).bind(*t).bind(id.as_str());
        }
        q = q.bind(i64::from(limit) + 1);
        let rows = q.fetch_all(self.pool()).instrument(sql_span(self.system(), "SELECT", "members")).await?;
        let mut conversations = Vec::with_capacity(rows.len());
        let mut previews = Vec::with_capacity(rows.len());
        for r in &rows {
            let counted: i64 = r.try_get("counted")?;
            let read_counted: i64 = r.try_get("read_counted")?;
            let ext: Option<String> = r.try_get("ext")?;
            conversations.push(ConversationSummary {
                conversation_id: r.try_get("conversation_id")?,
                conversation_type: r.try_get::<i64, _>("conversation_type")? as i32,
                title: r.try_get("title")?,
                avatar: r.try_get("avatar")?,
                ext: ext.and_then(|e| serde_json::from_str(&e).ok()),
                role: Role::parse(&r.try_get::<String, _>("role")?),
                last_msg_id: api_int(r.try_get("last_msg_id")?),
                last_msg: None,
                read_msg_id: api_int(r.try_get("read_msg_id")?),
                unread: api_int(counted - read_counted),
                muted: get_bool(r, "muted")?,
                last_send_time: r.try_get("last_send_time")?,
                archived: get_bool(r, "archived")?,
            });
            previews.push(r.try_get::<i64, _>("preview_msg_id")?);
        }
        let page = conversations.len().min(limit as usize);
        let mut last = self.messages_at(&conversations[..page], &previews[..page]).await?;
        for c in &mut conversations {
            c.last_msg = last.remove(&c.conversation_id);
        }
        let fits = size::fitting(&conversations, max_bytes.saturating_sub(512), 0).max(1);
        let next_cursor = if conversations.len() > (limit as usize).min(fits) {
            conversations.truncate((limit as usize).min(fits));
            conversations.last().map(|c| encode_page_cursor(c.last_send_time, &c.conversation_id))
        } else {
            None
        };
        Ok(JoinedConversations { conversations, next_cursor })
    }

    /// The messages `msg_ids[i]` of `conversations[i]` (0: none), by conversation.
    async fn messages_at(
        &self,
        conversations: &[ConversationSummary],
        msg_ids: &[i64],
    ) -> Result<HashMap<String, Message>> {
        let wanted: Vec<(&str, i64)> = conversations
            .iter()
            .zip(msg_ids)
            .filter(|(_, id)| **id > 0)
            .map(|(c, id)| (c.conversation_id.as_str(), *id))
            .collect();
        let mut out = HashMap::new();
        for chunk in wanted.chunks(128).map(padded) {
            let mut p = Params::new(self.system());
            let list = chunk.iter().map(|_| p.row(2)).collect::<Vec<_>>().join(", ");
            let sql = format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages m WHERE (m.conversation_id, m.msg_id) IN (VALUES {list})"
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for (c, id) in &chunk {
                q = q.bind(*c).bind(*id);
            }
            for row in q.fetch_all(self.pool()).instrument(sql_span(self.system(), "SELECT", "messages")).await? {
                let m = message(&row)?;
                out.insert(m.conversation_id.clone(), m);
            }
        }
        Ok(out)
    }

    /// Moves the member's read position forward to `msg_id` (clamped to the newest message):
    /// where it is after the call, what still counts as unread, whether this call moved it
    /// and whether the conversation has read receipts on.
    pub async fn mark_read(&self, conversation_id: &str, user_id: &str, msg_id: u64) -> Result<ReadMark> {
        let row = sqlx::query(
            "SELECT c.last_msg_id, c.counted, c.receipts, m.read_msg_id, m.read_counted FROM members m \
             JOIN conversations c ON c.conversation_id = m.conversation_id \
             WHERE m.conversation_id = $1 AND m.user_id = $2 AND m.active = $3",
        )
        .bind(conversation_id)
        .bind(user_id)
        .bind(1i32)
        .fetch_optional(self.pool())
        .instrument(sql_span(self.system(), "SELECT", "members"))
        .await?
        .ok_or_else(ServiceError::not_member)?;
        let last: i64 = row.try_get("last_msg_id")?;
        let counted: i64 = row.try_get("counted")?;
        let read: i64 = row.try_get("read_msg_id")?;
        let mut read_counted: i64 = row.try_get("read_counted")?;
        let receipts = get_bool(&row, "receipts")?;
        let target = db_int(msg_id).min(last);
        if target > read {
            // Messages up to the target that count (a message removed by retention: what the
            // newest one left before it counted).
            let at = sqlx::query(
                "SELECT counted FROM messages WHERE conversation_id = $1 AND msg_id <= $2 ORDER BY msg_id DESC LIMIT 1",
            )
            .bind(conversation_id)
            .bind(target)
            .fetch_optional(self.pool())
            .instrument(sql_span(self.system(), "SELECT", "messages"))
            .await?;
            if let Some(at) = at {
                read_counted = read_counted.max(at.try_get("counted")?);
            }
            let moved = sqlx::query(
                "UPDATE members SET read_msg_id = $1, read_counted = $2, read_at = $3 \
                 WHERE conversation_id = $4 AND user_id = $5 AND read_msg_id < $6",
            )
            .bind(target)
            .bind(read_counted)
            .bind(now_ms())
            .bind(conversation_id)
            .bind(user_id)
            .bind(target)
            .execute(self.pool())
            .instrument(sql_span(self.system(), "UPDATE", "members"))
            .await?
            .rows_affected();
            if moved == 0 {
                // A later position was written meanwhile (another mark_read, an own send).
                return Box::pin(self.mark_read(conversation_id, user_id, 0)).await;
            }
            return Ok(ReadMark {
                read_msg_id: api_int(target),
                unread: api_int(counted - read_counted),
                moved: true,
                receipts,
            });
        }
        Ok(ReadMark { read_msg_id: api_int(read), unread: api_int(counted - read_counted), moved: false, receipts })
    }

    /// The user's conversations with presence on, in id order after `after`: at most
    /// `limit`, and what fits in `max_bytes` as JSON.
    pub async fn presence_conversations(
        &self,
        user_id: &str,
        after: Option<&str>,
        limit: u32,
        max_bytes: usize,
    ) -> Result<ConversationIdsPage> {
        let rows = sqlx::query(
            "SELECT m.conversation_id FROM members m JOIN conversations c ON c.conversation_id = m.conversation_id \
             WHERE m.user_id = $1 AND m.active = $2 AND c.presence = $3 AND m.conversation_id > $4 \
             ORDER BY m.conversation_id LIMIT $5",
        )
        .bind(user_id)
        .bind(1i32)
        .bind(1i32)
        .bind(after.unwrap_or(""))
        .bind(i64::from(limit) + 1)
        .fetch_all(self.pool())
        .instrument(sql_span(self.system(), "SELECT", "members"))
        .await?;
        let mut page = ConversationIdsPage::default();
        let mut bytes = 256;
        for row in &rows {
            let id: String = row.try_get("conversation_id")?;
            if page.conversation_ids.len() as u32 == limit
                || (bytes + id.len() + 3 > max_bytes && !page.conversation_ids.is_empty())
            {
                page.more = true;
                break;
            }
            bytes += id.len() + 3;
            page.conversation_ids.push(id);
        }
        Ok(page)
    }

    /// Whether any conversation has presence on.
    pub async fn presence_in_use(&self) -> Result<bool> {
        let row = sqlx::query("SELECT 1 AS one FROM conversations WHERE presence = $1 LIMIT 1")
            .bind(1i32)
            .fetch_optional(self.pool())
            .instrument(sql_span(self.system(), "SELECT", "conversations"))
            .await?;
        Ok(row.is_some())
    }

    /// Records users coming online or going offline (each at a later time than the one
    /// recorded only), in one transaction.
    pub async fn record_presence(&self, changes: &[PresenceChange]) -> Result<()> {
        if changes.is_empty() {
            return Ok(());
        }
        write_tx!(self, |tx| {
            for c in changes {
                let sql = if c.online {
                    "INSERT INTO user_presence (user_id, last_seen, online_at, changed_at) VALUES ($1, 0, $2, $3) \
                     ON CONFLICT (user_id) DO UPDATE SET online_at = excluded.online_at, changed_at = excluded.changed_at \
                     WHERE user_presence.online_at < excluded.online_at"
                } else {
                    "INSERT INTO user_presence (user_id, last_seen, online_at, changed_at) VALUES ($1, $2, 0, $3) \
                     ON CONFLICT (user_id) DO UPDATE SET last_seen = excluded.last_seen, changed_at = excluded.changed_at \
                     WHERE user_presence.last_seen < excluded.last_seen"
                };
                sqlx::query(sql)
                    .bind(c.user_id.as_str())
                    .bind(c.at_ms)
                    .bind(c.at_ms)
                    .execute(&mut **tx)
                    .instrument(sql_span(self.system(), "INSERT", "user_presence"))
                    .await?;
            }
            Ok(())
        })
    }

    /// Records that `user_id` came online (`online`) or went offline at `at_ms`.
    pub async fn record_seen(&self, user_id: &str, online: bool, at_ms: i64) -> Result<()> {
        self.record_presence(&[PresenceChange { user_id: user_id.to_string(), online, at_ms }]).await
    }

    /// The members of a conversation when message `msg_id` was stored: joined at or before
    /// it and not gone before it (a member who left and rejoined since counts from the
    /// rejoin).
    pub async fn members_at(&self, conversation_id: &str, msg_id: u64) -> Result<Vec<String>> {
        let rows = sqlx::query(
            "SELECT user_id FROM members WHERE conversation_id = $1 AND joined_msg_id <= $2 \
             AND (active = $3 OR left_msg_id > $4) ORDER BY user_id",
        )
        .bind(conversation_id)
        .bind(db_int(msg_id))
        .bind(1i32)
        .bind(db_int(msg_id))
        .fetch_all(self.pool())
        .instrument(sql_span(self.system(), "SELECT", "members"))
        .await?;
        rows.iter().map(|r| Ok(r.try_get("user_id")?)).collect()
    }

    /// Read positions that moved (by a mark_read) at or after `since_ms`, oldest move first,
    /// at most `limit`: (conversation, user, read_msg_id, when).
    pub async fn reads_since(&self, since_ms: i64, limit: u32) -> Result<Vec<(String, String, u64, i64)>> {
        let rows = sqlx::query(
            "SELECT conversation_id, user_id, read_msg_id, read_at FROM members WHERE read_at >= $1 \
             ORDER BY read_at LIMIT $2",
        )
        .bind(since_ms.max(1))
        .bind(i64::from(limit))
        .fetch_all(self.pool())
        .instrument(sql_span(self.system(), "SELECT", "members"))
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get("conversation_id")?,
                    r.try_get("user_id")?,
                    api_int(r.try_get("read_msg_id")?),
                    r.try_get("read_at")?,
                ))
            })
            .collect()
    }

    /// Presence changes at or after `since_ms`, oldest first, at most `limit`: (user, online
    /// now, when it changed).
    pub async fn presence_since(&self, since_ms: i64, limit: u32) -> Result<Vec<(String, bool, i64)>> {
        let rows = sqlx::query(
            "SELECT user_id, online_at, last_seen, changed_at FROM user_presence WHERE changed_at >= $1 \
             ORDER BY changed_at LIMIT $2",
        )
        .bind(since_ms.max(1))
        .bind(i64::from(limit))
        .fetch_all(self.pool())
        .instrument(sql_span(self.system(), "SELECT", "user_presence"))
        .await?;
        rows.iter()
            .map(|r| {
                let (online_at, last_seen): (i64, i64) = (r.try_get("online_at")?, r.try_get("last_seen")?);
                Ok((r.try_get("user_id")?, online_at > last_seen, r.try_get("changed_at")?))
            })
            .collect()
    }

    /// When each of `user_ids` last went offline (those never seen are left out).
    pub async fn last_seen(&self, user_ids: &[String]) -> Result<Vec<(String, i64)>> {
        let mut out = Vec::new();
        for chunk in user_ids.chunks(500) {
            let mut params = Params::new(self.system());
            let sql = format!(
                "SELECT user_id, last_seen FROM user_presence WHERE last_seen > 0 AND user_id IN ({})",
                params.list(chunk.len())
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for u in chunk {
                q = q.bind(u.as_str());
            }
            for row in q.fetch_all(self.pool()).instrument(sql_span(self.system(), "SELECT", "user_presence")).await? {
                out.push((row.try_get("user_id")?, row.try_get("last_seen")?));
            }
        }
        Ok(out)
    }

    /// The read positions that moved at or after `since_ms` (by a mark_read) in the
    /// conversations with receipts on where `user_id` is a member, the user's own included:
    /// the latest of each member, ordered by (conversation, member), from after `after`,
    /// at most `limit` and what fits in `max_bytes` as JSON.
    pub async fn receipts_since(
        &self,
        user_id: &str,
        since_ms: i64,
        after: Option<(&str, &str)>,
        limit: u32,
        max_bytes: usize,
    ) -> Result<ReceiptsPage> {
        let (after_conv, after_user) = after.unwrap_or(("", ""));
        let rows = sqlx::query(
            "SELECT m.conversation_id, m.user_id, m.read_msg_id FROM members me \
             JOIN conversations c ON c.conversation_id = me.conversation_id \
             JOIN members m ON m.conversation_id = me.conversation_id \
             WHERE me.user_id = $1 AND me.active = $2 AND c.receipts = $3 AND m.active = $4 AND m.read_at >= $5 \
               AND (m.conversation_id > $6 OR (m.conversation_id = $7 AND m.user_id > $8)) \
             ORDER BY m.conversation_id, m.user_id LIMIT $9",
        )
        .bind(user_id)
        .bind(1i32)
        .bind(1i32)
        .bind(1i32)
        .bind(since_ms)
        .bind(after_conv)
        .bind(after_conv)
        .bind(after_user)
        .bind(i64::from(limit) + 1)
        .fetch_all(self.pool())
        .instrument(sql_span(self.system(), "SELECT", "members"))
        .await?;
        let mut page = ReceiptsPage::default();
        let mut bytes = 64;
        for row in &rows {
            let r = Receipt {
                conversation_id: row.try_get("conversation_id")?,
                user_id: row.try_get("user_id")?,
                read_msg_id: api_int(row.try_get("read_msg_id")?),
            };
            let len = size::encoded_len(&r) + 1;
            if page.receipts.len() as u32 == limit || (bytes + len > max_bytes && !page.receipts.is_empty()) {
                page.more = true;
                break;
            }
            bytes += len;
            page.receipts.push(r);
        }
        Ok(page)
    }

    /// Changes a conversation's metadata: `by` a member (whose role must be at least the
    /// conversation's `meta_role`) or the business system (None). Fields equal to the stored
    /// ones change nothing; the changed ones are recorded in one META_CHANGED message.
    pub async fn update_conversation(
        &self,
        by: Option<&str>,
        changes: &UpdateConversationRequest,
    ) -> Result<(ConversationMeta, Vec<LogEntry>)> {
        let id = changes.conversation_id.as_str();
        write_tx!(self, |tx| {
            let mut convs = self.lock_conversations(tx, &[id]).await?;
            let Some(conv) = convs.get(id) else {
                return Err(missing(by.is_some()));
            };
            let archived = conv.archived;
            let row = sqlx::query(
                "SELECT title, avatar, ext, meta_role, receipts, presence FROM conversations WHERE conversation_id = $1",
            )
            .bind(id)
            .fetch_one(&mut **tx)
            .instrument(sql_span(self.system(), "SELECT", "conversations"))
            .await?;
            let mut meta = meta_of(id, &row)?;
            if let Some(user) = by {
                let role = self.role_in(tx, id, user).await?.ok_or_else(ServiceError::not_member)?;
                if archived {
                    return Err(
                        ServiceError::new(ErrorCode::ConversationArchived, "the conversation is archived").into()
                    );
                }
                match meta.meta_role.lowest() {
                    Some(lowest) if role >= lowest => {}
                    Some(lowest) => {
                        return Err(ServiceError::new(
                            ErrorCode::RoleRequired,
                            format!("changing this conversation takes the role {}", lowest.as_str()),
                        )
                        .into());
                    }
                    None => {
                        return Err(ServiceError::new(
                            ErrorCode::RoleRequired,
                            "only the business system changes this conversation",
                        )
                        .into());
                    }
                }
            }
            let mut changed = system::MetaChanged { by: by.unwrap_or_default().to_string(), ..Default::default() };
            if let Some(t) = &changes.title
                && meta.title.as_deref().unwrap_or("") != t
            {
                changed.title = Some(t.clone());
                meta.title = Some(t.clone()).filter(|t| !t.is_empty());
            }
            if let Some(a) = &changes.avatar
                && meta.avatar.as_deref().unwrap_or("") != a
            {
                changed.avatar = Some(a.clone());
                meta.avatar = Some(a.clone()).filter(|a| !a.is_empty());
            }
            if let Some(e) = &changes.ext {
                let new = Some(e.clone()).filter(|e| !is_empty_ext(e));
                if new != meta.ext {
                    changed.ext = Some(new.clone().unwrap_or_else(|| serde_json::json!({})));
                    meta.ext = new;
                }
            }
            if let Some(r) = changes.meta_role
                && r != meta.meta_role
            {
                changed.meta_role = Some(r.as_str().to_string());
                meta.meta_role = r;
            }
            if let Some(r) = changes.receipts
                && r != meta.receipts
            {
                changed.receipts = Some(r);
                meta.receipts = r;
            }
            if let Some(p) = changes.presence
                && p != meta.presence
            {
                changed.presence = Some(p);
                meta.presence = p;
            }
            if changed == (system::MetaChanged { by: changed.by.clone(), ..Default::default() }) {
                return Ok((meta, Vec::new()));
            }
            let ext_text = meta.ext.as_ref().map(|e| e.to_string());
            sqlx::query(
                "UPDATE conversations SET title = $1, avatar = $2, ext = $3, meta_role = $4, receipts = $5, \
                 presence = $6 WHERE conversation_id = $7",
            )
            .bind(meta.title.as_deref())
            .bind(meta.avatar.as_deref())
            .bind(ext_text.as_deref())
            .bind((meta.meta_role != MetaRole::None).then(|| meta.meta_role.as_str()))
            .bind(i32::from(meta.receipts))
            .bind(i32::from(meta.presence))
            .bind(id)
            .execute(&mut **tx)
            .instrument(sql_span(self.system(), "UPDATE", "conversations"))
            .await?;
            let entries = self
                .append(tx, &mut convs, vec![NewEntry::system(id, system::META_CHANGED, system::content(&changed))])
                .await?;
            meta.msg_id = entries.first().map(|e| e.message.msg_id);
            Ok((meta, entries))
        })
    }

    /// Sets a member's role (a new owner makes the former owner an admin); answers the roles
    /// that changed, recorded in one ROLES_CHANGED message.
    pub async fn set_member_role(
        &self,
        conversation_id: &str,
        user_id: &str,
        role: Role,
    ) -> Result<(Vec<MemberRole>, Vec<LogEntry>)> {
        write_tx!(self, |tx| {
            let mut convs = self.lock_conversations(tx, &[conversation_id]).await?;
            if !convs.contains_key(conversation_id) {
                return Err(missing(false));
            }
            let current = self
                .role_in(tx, conversation_id, user_id)
                .await?
                .ok_or_else(|| ServiceError::new(ErrorCode::NotMember, format!("{user_id} is not a member")))?;
            if current == role {
                return Ok((Vec::new(), Vec::new()));
            }
            let mut changed = vec![MemberRole { user_id: user_id.to_string(), role }];
            if role == Role::Owner {
                let owners = sqlx::query(
                    "SELECT user_id FROM members WHERE conversation_id = $1 AND active = $2 AND role = $3 AND user_id <> $4",
                )
                .bind(conversation_id)
                .bind(1i32)
                .bind(Role::Owner.as_str())
                .bind(user_id)
                .fetch_all(&mut **tx)
                .instrument(sql_span(self.system(), "SELECT", "members"))
                .await?;
                for o in owners {
                    changed.push(MemberRole { user_id: o.try_get("user_id")?, role: Role::Admin });
                }
            }
            for c in &changed {
                sqlx::query("UPDATE members SET role = $1 WHERE conversation_id = $2 AND user_id = $3")
                    .bind(c.role.as_str())
                    .bind(conversation_id)
                    .bind(c.user_id.as_str())
                    .execute(&mut **tx)
                    .instrument(sql_span(self.system(), "UPDATE", "members"))
                    .await?;
            }
            let content = system::RolesChanged {
                roles: changed
                    .iter()
                    .map(|c| system::RoleChange { user_id: c.user_id.clone(), role: c.role.as_str().to_string() })
                    .collect(),
            };
            let entries = self
                .append(
                    tx,
                    &mut convs,
                    vec![NewEntry::system(conversation_id, system::ROLES_CHANGED, system::content(&content))],
                )
                .await?;
            Ok((changed.clone(), entries))
        })
    }

    /// Mutes or unmutes a conversation for one of its members (unread still counts).
    pub async fn set_mute(&self, conversation_id: &str, user_id: &str, muted: bool) -> Result<bool> {
        let done =
            sqlx::query("UPDATE members SET muted = $1 WHERE conversation_id = $2 AND user_id = $3 AND active = $4")
                .bind(i32::from(muted))
                .bind(conversation_id)
                .bind(user_id)
                .bind(1i32)
                .execute(self.pool())
                .instrument(sql_span(self.system(), "UPDATE", "members"))
                .await?;
        if done.rows_affected() == 0 {
            return Err(ServiceError::not_member().into());
        }
        Ok(muted)
    }

    /// An active member's role, if it is one.
    async fn role_in(&self, tx: &mut AnyConnection, conversation_id: &str, user_id: &str) -> Result<Option<Role>> {
        let row = sqlx::query("SELECT role FROM members WHERE conversation_id = $1 AND user_id = $2 AND active = $3")
            .bind(conversation_id)
            .bind(user_id)
            .bind(1i32)
            .fetch_optional(&mut *tx)
            .instrument(sql_span(self.system(), "SELECT", "members"))
            .await?;
        row.map(|r| Ok(Role::parse(&r.try_get::<String, _>("role")?))).transpose()
    }

    /// One page of the user's active memberships (in conversation_id order, after `after`,
    /// at most `limit`) and the log heads, from one consistent snapshot.
    pub async fn memberships(&self, user_id: &str, after: Option<&str>, limit: u32) -> Result<Memberships> {
        let mut tx = self.snapshot().await?;
        let heads = read_heads(self.system(), &mut tx).await?;
        let rows = sqlx::query(
            "SELECT conversation_id, joined_msg_id FROM members WHERE user_id = $1 AND active = $2 \
             AND conversation_id > $3 ORDER BY conversation_id LIMIT $4",
        )
        .bind(user_id)
        .bind(1i32)
        .bind(after.unwrap_or(""))
        .bind(i64::from(limit.max(1)) + 1)
        .fetch_all(&mut *tx)
        .instrument(sql_span(self.system(), "SELECT", "members"))
        .await?;
        tx.commit().await?;
        let mut conversations = rows
            .iter()
            .map(|r| {
                Ok(MembershipRow {
                    conversation_id: r.try_get("conversation_id")?,
                    joined_msg_id: api_int(r.try_get("joined_msg_id")?),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let more = conversations.len() > limit.max(1) as usize;
        conversations.truncate(limit.max(1) as usize);
        Ok(Memberships { heads, conversations, more })
    }
}

fn missing(self_join: bool) -> StoreError {
    if self_join {
        ServiceError::not_member().into()
    } else {
        ServiceError::new(ErrorCode::NotFound, "no such conversation").into()
    }
}

fn system_entry(conversation_id: &str, msg_type: i32, users: &[String]) -> NewEntry {
    NewEntry::system(conversation_id, msg_type, system::content(&system::Users { user_ids: users.to_vec() }))
}

/// An ext that holds nothing (`{}` or null): stored as none.
fn is_empty_ext(ext: &serde_json::Value) -> bool {
    ext.is_null() || ext.as_object().is_some_and(|o| o.is_empty())
}

/// Which of `users` are active members.
async fn active_members(
    system: &'static str,
    tx: &mut AnyConnection,
    conversation_id: &str,
    users: &[String],
) -> Result<HashSet<String>> {
    let mut out = HashSet::new();
    for chunk in users.chunks(512).map(padded) {
        let mut p = Params::new(system);
        let sql = format!(
            "SELECT user_id FROM members WHERE conversation_id = {} AND active = {} AND user_id IN ({})",
            p.next(),
            p.next(),
            p.list(chunk.len())
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(conversation_id).bind(1i32);
        for u in &chunk {
            q = q.bind(u.as_str());
        }
        for row in q.fetch_all(&mut *tx).instrument(sql_span(system, "SELECT", "members")).await? {
            out.insert(row.try_get::<String, _>("user_id")?);
        }
    }
    Ok(out)
}

/// Makes `users` active members from `msg_id` on (their read position starts there, where
/// `counted` messages counted as unread).
async fn upsert_members(
    system: &'static str,
    tx: &mut AnyConnection,
    conversation_id: &str,
    users: &[(String, Role)],
    msg_id: u64,
    counted: i64,
) -> Result<()> {
    for chunk in pow2_chunks(users, 64) {
        let mut p = Params::new(system);
        let rows = chunk.iter().map(|_| p.row(7)).collect::<Vec<_>>().join(", ");
        let sql = format!(
            "INSERT INTO members (conversation_id, user_id, role, active, joined_msg_id, read_msg_id, read_counted) \
             VALUES {rows} ON CONFLICT (conversation_id, user_id) DO UPDATE SET active = excluded.active, \
             role = excluded.role, joined_msg_id = excluded.joined_msg_id, read_msg_id = excluded.read_msg_id, \
             read_counted = excluded.read_counted, left_msg_id = NULL"
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for (user, role) in chunk {
            q = q
                .bind(conversation_id)
                .bind(user.as_str())
                .bind(role.as_str())
                .bind(1i32)
                .bind(db_int(msg_id))
                .bind(db_int(msg_id))
                .bind(counted);
        }
        q.execute(&mut *tx).instrument(sql_span(system, "INSERT", "members")).await?;
    }
    Ok(())
}

/// Marks `users` as former members, as of the message in `entries`.
async fn deactivate(
    system: &'static str,
    tx: &mut AnyConnection,
    conversation_id: &str,
    users: &[String],
    entries: &[LogEntry],
) -> Result<()> {
    let msg_id = entries.first().map(|e| db_int(e.message.msg_id)).unwrap_or_default();
    for chunk in users.chunks(512).map(padded) {
        let mut p = Params::new(system);
        let sql = format!(
            "UPDATE members SET active = {}, left_msg_id = {} WHERE conversation_id = {} AND user_id IN ({})",
            p.next(),
            p.next(),
            p.next(),
            p.list(chunk.len())
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(0i32).bind(msg_id).bind(conversation_id);
        for u in &chunk {
            q = q.bind(u.as_str());
        }
        q.execute(&mut *tx).instrument(sql_span(system, "UPDATE", "members")).await?;
    }
    Ok(())
}

/// The position after which a members page starts.
fn members_cursor(cursor: Option<&str>) -> Result<(i64, String)> {
    match cursor {
        None => Ok((-1, String::new())),
        Some(c) => decode_page_cursor(c)
            .ok_or_else(|| StoreError::from(ServiceError::invalid("members cursor is not a cursor from this service"))),
    }
}

/// A conversation's metadata from a row with `title`, `avatar`, `ext`, `meta_role`,
/// `receipts` and `presence`.
fn meta_of(conversation_id: &str, row: &sqlx::any::AnyRow) -> Result<ConversationMeta> {
    let ext: Option<String> = row.try_get("ext")?;
    Ok(ConversationMeta {
        conversation_id: conversation_id.to_string(),
        title: row.try_get("title")?,
        avatar: row.try_get("avatar")?,
        ext: ext.and_then(|e| serde_json::from_str(&e).ok()),
        meta_role: MetaRole::parse(row.try_get::<Option<String>, _>("meta_role")?.as_deref()),
        receipts: get_bool(row, "receipts")?,
        presence: get_bool(row, "presence")?,
        msg_id: None,
    })
}

fn encode_page_cursor(last_send_time: i64, conversation_id: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("{last_send_time}|{conversation_id}"))
}

fn decode_page_cursor(cursor: &str) -> Option<(i64, String)> {
    let bytes = URL_SAFE_NO_PAD.decode(cursor).ok()?;
    let text = String::from_utf8(bytes).ok()?;
    let (t, id) = text.split_once('|')?;
    Some((t.parse().ok()?, id.to_string()))
}
