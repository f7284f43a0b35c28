//! Edits, recalls and deletions of messages.
//!
//! A revision changes the message's row in place (so every read answers the latest state)
//! and appends a [`REVISED`](system::REVISED) entry in the same transaction, with a msg_id of
//! its own: clients learn of it live and on resume, in order, like of any message. An edit
//! keeps the earlier contents as versions; a recall or a deletion removes the content, the
//! versions and the content of the earlier edit entries, so nothing of it stays in the store.
//! Streaming messages end here too: a finish sets the final content, a cancel deletes it.

use tracing::Instrument;

use quickim_shared::error::{ErrorCode, ServiceError};
use quickim_shared::protocol::api::{Message, MsgVersion, VersionsAnswer};
use quickim_shared::protocol::event::LogEntry;
use quickim_shared::protocol::service::Origin;
use quickim_shared::protocol::system::{self, Action, Revised};
use quickim_shared::time::now_ms;
use sqlx::{AnyConnection, Row};

use crate::log::NewEntry;
use crate::sql::{MESSAGE_COLUMNS, STATE_DELETED, STATE_RECALLED, STATE_SENT, db_int, message};
use crate::{Result, Store, sql_span};

/// A revision to make.
#[derive(Debug, Clone)]
pub struct Revision {
    /// Client (its own messages only, within `window_ms`) or inner (any message).
    pub origin: Origin,
    /// The client's user id ("" for the business system).
    pub by: String,
    /// The conversation.
    pub conversation_id: String,
    /// The message.
    pub msg_id: u64,
    /// What to do.
    pub action: Action,
    /// The new content (edit).
    pub content: Option<String>,
    /// Client edits and recalls: how long after sending they are allowed, ms (0 = always).
    pub window_ms: i64,
}

impl Store {
    /// Makes a revision; answers the message in its new state and the entries to publish.
    /// Recalling a recalled message (or deleting a deleted one) again changes nothing and
    /// answers it as it is, so a retry is safe.
    pub async fn revise(&self, r: Revision) -> Result<(Message, Vec<LogEntry>)> {
        let id = r.conversation_id.as_str();
        let client = r.origin == Origin::Client;
        write_tx!(self, |tx| {
            let mut convs = self.lock_conversations(tx, &[id]).await?;
            let Some(conv) = convs.get(id) else {
                return Err(if client {
                    ServiceError::not_member()
                } else {
                    ServiceError::new(ErrorCode::NotFound, "no such conversation")
                }
                .into());
            };
            if client {
                // Membership first: a non-member learns nothing about the conversation.
                self.require_member_in(tx, id, &r.by).await?;
                if conv.archived {
                    return Err(
                        ServiceError::new(ErrorCode::ConversationArchived, "the conversation is archived").into()
                    );
                }
            }
            let mut msg = self.message_in(tx, id, r.msg_id).await?;
            if msg.msg_type < 0 {
                return Err(ServiceError::new(
                    ErrorCode::NotRevisable,
                    "system messages cannot be edited, recalled or deleted",
                )
                .into());
            }
            if client && msg.from != r.by {
                return Err(ServiceError::new(
                    ErrorCode::NotSender,
                    format!("only its sender may {} a message", r.action.name()),
                )
                .into());
            }
            let ends_stream = matches!(r.action, Action::Finish | Action::Cancel);
            if ends_stream && !msg.streaming {
                // A retry of the finish (or cancel) that ended it answers the message as it is.
                let again = (r.action == Action::Finish
                    && !msg.deleted
                    && !msg.recalled
                    && r.content.as_deref() == Some(msg.content.as_str()))
                    || (r.action == Action::Cancel && msg.deleted);
                if again {
                    return Ok((msg, Vec::new()));
                }
                return Err(ServiceError::new(ErrorCode::StreamClosed, "the message is not an open stream").into());
            }
            if msg.streaming && !ends_stream {
                return Err(ServiceError::new(
                    ErrorCode::StillStreaming,
                    "the message is still streaming: finish or cancel it first",
                )
                .into());
            }
            if msg.recalled || msg.deleted {
                let again = (r.action == Action::Recall && msg.recalled) || (r.action == Action::Delete && msg.deleted);
                if again {
                    return Ok((msg, Vec::new()));
                }
                return Err(ServiceError::new(
                    ErrorCode::MessageGone,
                    format!("the message was {}", if msg.recalled { "recalled" } else { "deleted" }),
                )
                .into());
            }
            if client
                && r.window_ms > 0
                && matches!(r.action, Action::Edit | Action::Recall)
                && now_ms() - msg.send_time > r.window_ms
            {
                return Err(ServiceError::new(
                    ErrorCode::RevisionWindowClosed,
                    format!("a message may be {} within {} s of sending", past(r.action), r.window_ms / 1000),
                )
                .into());
            }
            let by = if client { r.by.clone() } else { String::new() };
            let entries = match r.action {
                Action::Edit => {
                    let content = r.content.clone().unwrap_or_default();
                    let version = self.next_version(tx, &msg).await?;
                    let revised =
                        Revised { msg_id: r.msg_id, action: Action::Edit, content: Some(content.clone()), by };
                    let entries = self
                        .append(tx, &mut convs, vec![NewEntry::system(id, system::REVISED, system::content(&revised))])
                        .await?;
                    let (entry_msg_id, at) =
                        entries.first().map(|e| (e.message.msg_id, e.message.send_time)).unwrap_or((0, now_ms()));
                    sqlx::query(
                        "INSERT INTO message_versions (conversation_id, msg_id, version, content, made_at, entry_msg_id) \
                         VALUES ($1, $2, $3, $4, $5, $6)",
                    )
                    .bind(id)
                    .bind(db_int(r.msg_id))
                    .bind(version)
                    .bind(content.as_str())
                    .bind(at)
                    .bind(db_int(entry_msg_id))
                    .execute(&mut **tx)
                    .instrument(sql_span(self.system(), "INSERT", "message_versions"))
                    .await?;
                    sqlx::query(
                        "UPDATE messages SET content = $1, edited_at = $2 WHERE conversation_id = $3 AND msg_id = $4",
                    )
                    .bind(content.as_str())
                    .bind(at)
                    .bind(id)
                    .bind(db_int(r.msg_id))
                    .execute(&mut **tx)
                    .instrument(sql_span(self.system(), "UPDATE", "messages"))
                    .await?;
                    msg.content = content;
                    msg.edited_at = Some(at);
                    entries
                }
                Action::Finish => {
                    let content = r.content.clone().unwrap_or_default();
                    let revised =
                        Revised { msg_id: r.msg_id, action: Action::Finish, content: Some(content.clone()), by };
                    let entries = self
                        .append(tx, &mut convs, vec![NewEntry::system(id, system::REVISED, system::content(&revised))])
                        .await?;
                    self.set_content(tx, id, r.msg_id, &content, STATE_SENT).await?;
                    msg.content = content;
                    msg.streaming = false;
                    entries
                }
                Action::Recall | Action::Delete | Action::Cancel => {
                    self.erase_versions(tx, id, r.msg_id).await?;
                    let revised = Revised { msg_id: r.msg_id, action: r.action, content: None, by };
                    let entries = self
                        .append(tx, &mut convs, vec![NewEntry::system(id, system::REVISED, system::content(&revised))])
                        .await?;
                    let state = if r.action == Action::Recall { STATE_RECALLED } else { STATE_DELETED };
                    self.set_content(tx, id, r.msg_id, "", state).await?;
                    msg.content = String::new();
                    msg.recalled = r.action == Action::Recall;
                    msg.deleted = r.action != Action::Recall;
                    msg.streaming = false;
                    entries
                }
            };
            Ok((msg, entries))
        })
    }

    /// The versions of a message, oldest first, after `after_version`, as many as fit in
    /// `max_bytes` of JSON (at least one); `user_id` must be an active member (None: the
    /// business system). Answers the versions and whether more follow.
    pub async fn versions(
        &self,
        conversation_id: &str,
        user_id: Option<&str>,
        msg_id: u64,
        after_version: Option<u32>,
        max_bytes: usize,
    ) -> Result<VersionsAnswer> {
        let mut conn = self.pool().acquire().await?;
        match user_id {
            Some(user) => self.require_member_in(&mut conn, conversation_id, user).await?,
            None => {
                let exists = sqlx::query("SELECT 1 AS one FROM conversations WHERE conversation_id = $1")
                    .bind(conversation_id)
                    .fetch_optional(&mut *conn)
                    .instrument(sql_span(self.system(), "SELECT", "conversations"))
                    .await?;
                if exists.is_none() {
                    return Err(ServiceError::new(ErrorCode::NotFound, "no such conversation").into());
                }
            }
        }
        let msg = self.message_in(&mut conn, conversation_id, msg_id).await?;
        if msg.recalled || msg.deleted {
            return Ok(VersionsAnswer { versions: Vec::new(), next_after_version: None });
        }
        let rows = sqlx::query(
            "SELECT version, content, made_at FROM message_versions \
             WHERE conversation_id = $1 AND msg_id = $2 AND version > $3 ORDER BY version LIMIT 1001",
        )
        .bind(conversation_id)
        .bind(db_int(msg_id))
        .bind(after_version.map_or(-1, i64::from))
        .fetch_all(&mut *conn)
        .instrument(sql_span(self.system(), "SELECT", "message_versions"))
        .await?;
        let mut versions = rows
            .iter()
            .map(|r| {
                Ok(MsgVersion {
                    version: u32::try_from(r.try_get::<i64, _>("version")?).unwrap_or(0),
                    content: r.try_get("content")?,
                    at: r.try_get("made_at")?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        if versions.is_empty() && after_version.is_none() {
            versions.push(MsgVersion { version: 0, content: msg.content, at: msg.send_time });
        }
        let fits = quickim_shared::bus::size::fitting(&versions, max_bytes.saturating_sub(64), 0).max(1);
        let more = versions.len() > fits.min(1000);
        versions.truncate(fits.min(1000));
        let next_after_version = if more { versions.last().map(|v| v.version) } else { None };
        Ok(VersionsAnswer { versions, next_after_version })
    }

    /// Sets a message's content and state.
    async fn set_content(
        &self,
        tx: &mut AnyConnection,
        conversation_id: &str,
        msg_id: u64,
        content: &str,
        state: i64,
    ) -> Result<()> {
        sqlx::query("UPDATE messages SET content = $1, state = $2 WHERE conversation_id = $3 AND msg_id = $4")
            .bind(content)
            .bind(state)
            .bind(conversation_id)
            .bind(db_int(msg_id))
            .execute(&mut *tx)
            .instrument(sql_span(self.system(), "UPDATE", "messages"))
            .await?;
        Ok(())
    }

    /// The message `msg_id` of a conversation, or `not_found`.
    async fn message_in(&self, conn: &mut AnyConnection, conversation_id: &str, msg_id: u64) -> Result<Message> {
        let sql = format!("SELECT {MESSAGE_COLUMNS} FROM messages m WHERE m.conversation_id = $1 AND m.msg_id = $2");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(conversation_id)
            .bind(db_int(msg_id))
            .fetch_optional(&mut *conn)
            .instrument(sql_span(self.system(), "SELECT", "messages"))
            .await?
            .ok_or_else(|| ServiceError::new(ErrorCode::NotFound, "no such message"))?;
        message(&row)
    }

    /// The version number an edit of `msg` makes, keeping the content as sent as version 0
    /// at the first edit.
    async fn next_version(&self, tx: &mut AnyConnection, msg: &Message) -> Result<i64> {
        let row = sqlx::query(
            "SELECT COALESCE(MAX(version), -1) AS v FROM message_versions WHERE conversation_id = $1 AND msg_id = $2",
        )
        .bind(msg.conversation_id.as_str())
        .bind(db_int(msg.msg_id))
        .fetch_one(&mut *tx)
        .instrument(sql_span(self.system(), "SELECT", "message_versions"))
        .await?;
        let newest: i64 = row.try_get("v")?;
        if newest >= 0 {
            return Ok(newest + 1);
        }
        sqlx::query(
            "INSERT INTO message_versions (conversation_id, msg_id, version, content, made_at, entry_msg_id) \
             VALUES ($1, $2, 0, $3, $4, NULL)",
        )
        .bind(msg.conversation_id.as_str())
        .bind(db_int(msg.msg_id))
        .bind(msg.content.as_str())
        .bind(msg.send_time)
        .execute(&mut *tx)
        .instrument(sql_span(self.system(), "INSERT", "message_versions"))
        .await?;
        Ok(1)
    }

    /// Removes a message's versions and the content its edit entries carry.
    async fn erase_versions(&self, tx: &mut AnyConnection, conversation_id: &str, msg_id: u64) -> Result<()> {
        let rows = sqlx::query(
            "SELECT m.msg_id, m.content FROM message_versions v JOIN messages m \
             ON m.conversation_id = v.conversation_id AND m.msg_id = v.entry_msg_id \
             WHERE v.conversation_id = $1 AND v.msg_id = $2",
        )
        .bind(conversation_id)
        .bind(db_int(msg_id))
        .fetch_all(&mut *tx)
        .instrument(sql_span(self.system(), "SELECT", "messages"))
        .await?;
        for row in rows {
            let entry: i64 = row.try_get("msg_id")?;
            let content: String = row.try_get("content")?;
            let Ok(mut revised) = serde_json::from_str::<Revised>(&content) else { continue };
            revised.content = None;
            sqlx::query("UPDATE messages SET content = $1 WHERE conversation_id = $2 AND msg_id = $3")
                .bind(system::content(&revised))
                .bind(conversation_id)
                .bind(entry)
                .execute(&mut *tx)
                .instrument(sql_span(self.system(), "UPDATE", "messages"))
                .await?;
        }
        sqlx::query("DELETE FROM message_versions WHERE conversation_id = $1 AND msg_id = $2")
            .bind(conversation_id)
            .bind(db_int(msg_id))
            .execute(&mut *tx)
            .instrument(sql_span(self.system(), "DELETE", "message_versions"))
            .await?;
        Ok(())
    }

    /// Fails with `not_member` unless `user_id` is an active member (on `conn`).
    pub(crate) async fn require_member_in(
        &self,
        conn: &mut AnyConnection,
        conversation_id: &str,
        user_id: &str,
    ) -> Result<()> {
        let row =
            sqlx::query("SELECT 1 AS one FROM members WHERE conversation_id = $1 AND user_id = $2 AND active = $3")
                .bind(conversation_id)
                .bind(user_id)
                .bind(1i32)
                .fetch_optional(&mut *conn)
                .instrument(sql_span(self.system(), "SELECT", "members"))
                .await?;
        if row.is_some() { Ok(()) } else { Err(ServiceError::not_member().into()) }
    }
}

fn past(action: Action) -> &'static str {
    match action {
        Action::Edit => "edited",
        Action::Recall => "recalled",
        Action::Delete => "deleted",
        Action::Finish => "finished",
        Action::Cancel => "cancelled",
    }
}
