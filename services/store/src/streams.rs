//! Streaming messages (an AI agent's reply): opened empty — its msg_id taken at once, an
//! entry of the log like any message, so ids stay gap-free and resume stays exact — then its
//! text streamed live through the gateways (never stored delta by delta), then finished with
//! its final content or cancelled (revisions.rs). A stream still open `stream_timeout_s`
//! after it was opened is cancelled by the message service, so none stays open for ever.

use tracing::Instrument;

use quickim_shared::error::{ErrorCode, ServiceError};
use quickim_shared::protocol::api::Message;
use quickim_shared::protocol::event::LogEntry;
use quickim_shared::protocol::service::{Origin, StreamInfo};
use sqlx::Row;

use crate::log::NewEntry;
use crate::sql::{STATE_STREAMING, db_int};
use crate::{Result, Store, sql_span};

impl Store {
    /// Opens a streaming message of `msg_type` from `from` ("" for the business system; a
    /// user must be a member, and a client's conversation must not be archived): stored
    /// empty, marked streaming, in one transaction. Answers it and its entry to publish.
    pub async fn open_stream(
        &self,
        origin: Origin,
        conversation_id: &str,
        from: &str,
        msg_type: i32,
    ) -> Result<(Message, Vec<LogEntry>)> {
        let client = origin == Origin::Client;
        write_tx!(self, |tx| {
            let mut convs = self.lock_conversations(tx, &[conversation_id]).await?;
            let Some(conv) = convs.get(conversation_id) else {
                return Err(if client {
                    ServiceError::not_member()
                } else {
                    ServiceError::new(ErrorCode::NotFound, "no such conversation")
                }
                .into());
            };
            if !from.is_empty() {
                self.require_member_in(tx, conversation_id, from).await?;
            }
            if client && conv.archived {
                return Err(ServiceError::new(ErrorCode::ConversationArchived, "the conversation is archived").into());
            }
            let entry = NewEntry {
                conversation_id: conversation_id.to_string(),
                from: from.to_string(),
                msg_type,
                content: String::new(),
                client_msg_id: None,
                count_unread: true,
            };
            let mut entries = self.append(tx, &mut convs, vec![entry]).await?;
            let Some(first) = entries.first_mut() else {
                return Err(ServiceError::internal("a stream's entry was not appended").into());
            };
            sqlx::query("UPDATE messages SET state = $1 WHERE conversation_id = $2 AND msg_id = $3")
                .bind(STATE_STREAMING)
                .bind(conversation_id)
                .bind(db_int(first.message.msg_id))
                .execute(&mut **tx)
                .instrument(sql_span(self.system(), "UPDATE", "messages"))
                .await?;
            first.message.streaming = true;
            let message = first.message.clone();
            Ok((message, entries))
        })
    }

    /// A message's sender and whether it is an open stream (`not_found` if there is none).
    pub async fn stream_info(&self, conversation_id: &str, msg_id: u64) -> Result<StreamInfo> {
        let row = sqlx::query("SELECT sender, state FROM messages WHERE conversation_id = $1 AND msg_id = $2")
            .bind(conversation_id)
            .bind(db_int(msg_id))
            .fetch_optional(self.pool())
            .instrument(sql_span(self.system(), "SELECT", "messages"))
            .await?
            .ok_or_else(|| ServiceError::new(ErrorCode::NotFound, "no such message"))?;
        Ok(StreamInfo { from: row.try_get("sender")?, open: row.try_get::<i64, _>("state")? == STATE_STREAMING })
    }

    /// Streams opened before `opened_before_ms` and still open, oldest first, at most `limit`.
    pub async fn expired_streams(&self, opened_before_ms: i64, limit: u32) -> Result<Vec<(String, u64)>> {
        let rows = sqlx::query(
            "SELECT conversation_id, msg_id FROM messages WHERE state = $1 AND send_time < $2 \
             ORDER BY send_time LIMIT $3",
        )
        .bind(STATE_STREAMING)
        .bind(opened_before_ms)
        .bind(i64::from(limit))
        .fetch_all(self.pool())
        .instrument(sql_span(self.system(), "SELECT", "messages"))
        .await?;
        rows.iter().map(|r| Ok((r.try_get("conversation_id")?, crate::sql::api_int(r.try_get("msg_id")?)))).collect()
    }
}
