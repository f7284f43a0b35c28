//! The /inner routes, for business systems, on their own listener and key.

use axum::extract::State;
use quickim_shared::bus::size;
use quickim_shared::error::{ErrorCode, ServiceError};
use quickim_shared::ids::{check_platform, check_user_id};
use quickim_shared::protocol::api::{
    ArchiveAnswer, BatchAnswer, BatchItemResult, CreatedConversation, GetTokenRequest, InnerCreateConversationRequest,
    InnerMembersRequest, InnerSendBatchRequest, InnerSendMsgRequest, JoinedUsers, KickUserAnswer, KickUserRequest,
    KickedUsers, Message, SetArchiveRequest, TokenAnswer, UserOnline, UsersOnlineAnswer, UsersOnlineRequest,
};
use quickim_shared::protocol::service::{
    CreateConversation, Join, Kick, Origin, Revocation, RevokeTokens, SendBatch, SendMessage, SetArchived,
};
use quickim_shared::rpc::bus_error;
use quickim_shared::time::now_ms;

use super::error::{ApiError, ApiResult, Envelope};
use super::extract::{Body, Deadline, InnerKey};
use crate::state::AppState;

/// Most users or conversations an /inner list may name.
pub const MAX_LIST: usize = 1000;

/// Bytes a stored message's answer may take beyond the send it answers.
const ANSWER_OVERHEAD: usize = 256;

/// POST /inner/get_token
pub async fn get_token(
    State(s): State<AppState>,
    _: InnerKey,
    Body(r): Body<GetTokenRequest>,
) -> ApiResult<TokenAnswer> {
    let (token, expires_at) = s.auth.issue(&r.user_id, &r.platform, r.ttl_s)?;
    Ok(Envelope(TokenAnswer { token, expires_at }))
}

/// POST /inner/create_conversation
pub async fn create_conversation(
    State(s): State<AppState>,
    _: InnerKey,
    Body(r): Body<InnerCreateConversationRequest>,
) -> ApiResult<CreatedConversation> {
    let created = s
        .rpc
        .call(&CreateConversation {
            conversation_id: r.conversation_id,
            conversation_type: r.conversation_type,
            joinable: r.joinable,
            members: r.members,
            owner: r.owner,
        })
        .await?;
    Ok(Envelope(created))
}

/// POST /inner/join_conversation
pub async fn join_conversation(
    State(s): State<AppState>,
    _: InnerKey,
    Body(r): Body<InnerMembersRequest>,
) -> ApiResult<JoinedUsers> {
    let joined =
        s.rpc.call(&Join { conversation_id: r.conversation_id, user_ids: r.user_ids, self_join: false }).await?;
    Ok(Envelope(joined))
}

/// POST /inner/kickout_conversation
pub async fn kickout_conversation(
    State(s): State<AppState>,
    _: InnerKey,
    Body(r): Body<InnerMembersRequest>,
) -> ApiResult<KickedUsers> {
    Ok(Envelope(s.rpc.call(&Kick { conversation_id: r.conversation_id, user_ids: r.user_ids }).await?))
}

/// POST /inner/set_archive_conversations
pub async fn set_archive_conversations(
    State(s): State<AppState>,
    _: InnerKey,
    Body(r): Body<SetArchiveRequest>,
) -> ApiResult<ArchiveAnswer> {
    Ok(Envelope(s.rpc.call(&SetArchived { conversation_ids: r.conversation_ids, archived: r.archived }).await?))
}

fn inner_send(r: InnerSendMsgRequest) -> SendMessage {
    SendMessage {
        origin: Origin::Inner,
        conversation_id: r.conversation_id,
        from: r.from,
        msg_type: r.msg_type,
        content: r.content,
        client_msg_id: r.client_msg_id,
    }
}

/// POST /inner/send_msg
pub async fn send_msg(
    State(s): State<AppState>,
    _: InnerKey,
    Deadline(deadline): Deadline,
    Body(r): Body<InnerSendMsgRequest>,
) -> ApiResult<Message> {
    Ok(Envelope(s.sends.send(inner_send(r), deadline).await?))
}

/// POST /inner/send_msg_batch: stored in order, one result per item.
pub async fn send_msg_batch(
    State(s): State<AppState>,
    _: InnerKey,
    Body(r): Body<InnerSendBatchRequest>,
) -> ApiResult<BatchAnswer> {
    if r.msgs.is_empty() {
        return Err(ApiError::new(ErrorCode::InvalidParam, "msgs must not be empty"));
    }
    if r.msgs.len() > s.config.send_batch_max {
        return Err(ApiError::new(
            ErrorCode::TooManyItems,
            format!("msgs holds {} messages; send_batch_max is {}", r.msgs.len(), s.config.send_batch_max),
        ));
    }
    // Chunks whose request and answer each fit in one bus message, sent one after the other
    // to keep the order. An item that could not cross the bus alone gets its own error.
    let budget = s.rpc.bus().payload_budget();
    let mut results = Vec::with_capacity(r.msgs.len());
    let mut chunk: Vec<SendMessage> = Vec::new();
    let mut bytes = 0;
    let mut items = r.msgs.into_iter().map(inner_send).peekable();
    while let Some(item) = items.next() {
        let len = size::encoded_len(&item) + ANSWER_OVERHEAD;
        if len + ANSWER_OVERHEAD > budget {
            flush(&s, &mut chunk, &mut results).await?;
            bytes = 0;
            let e =
                ServiceError::new(ErrorCode::TooLargeForBus, format!("this message is over the bus's {budget} bytes"));
            results.push(BatchItemResult { code: e.code.number(), data: None, error: Some(e.message) });
            continue;
        }
        if bytes + len > budget {
            flush(&s, &mut chunk, &mut results).await?;
            bytes = 0;
        }
        bytes += len;
        chunk.push(item);
        if items.peek().is_none() {
            flush(&s, &mut chunk, &mut results).await?;
        }
    }
    Ok(Envelope(BatchAnswer { results }))
}

/// Stores `chunk` (if any) as one batch and appends its results.
async fn flush(s: &AppState, chunk: &mut Vec<SendMessage>, results: &mut Vec<BatchItemResult>) -> Result<(), ApiError> {
    if chunk.is_empty() {
        return Ok(());
    }
    let answers = s.rpc.call(&SendBatch { items: std::mem::take(chunk) }).await?;
    results.extend(answers.into_iter().map(|a| match a {
        Ok(m) => BatchItemResult { code: 0, data: Some(m), error: None },
        Err(e) => BatchItemResult { code: e.code.number(), data: None, error: Some(e.message) },
    }));
    Ok(())
}

fn check_user_list(users: &[String]) -> Result<(), ServiceError> {
    if users.is_empty() {
        return Err(ServiceError::invalid("user_ids must not be empty"));
    }
    if users.len() > MAX_LIST {
        return Err(ServiceError::new(ErrorCode::TooManyItems, format!("user_ids may name at most {MAX_LIST} users")));
    }
    users.iter().try_for_each(|u| check_user_id("user_ids", u))
}

/// POST /inner/get_users_online: asks every gateway node.
pub async fn get_users_online(
    State(s): State<AppState>,
    _: InnerKey,
    Body(r): Body<UsersOnlineRequest>,
) -> ApiResult<UsersOnlineAnswer> {
    check_user_list(&r.user_ids)?;
    let (presence, nodes) =
        s.cluster.presence(&r.user_ids, s.config.max_connections_per_user).await.map_err(bus_error)?;
    let users = r
        .user_ids
        .into_iter()
        .map(|u| match presence.get(&u) {
            Some(p) => UserOnline {
                online: p.connections > 0,
                platforms: p.platforms.clone(),
                connections: p.connections,
                user_id: u,
            },
            None => UserOnline { user_id: u, online: false, platforms: Vec::new(), connections: 0 },
        })
        .collect();
    Ok(Envelope(UsersOnlineAnswer { users, nodes }))
}

/// POST /inner/kick_user: revokes the user's tokens issued before now (durably) and closes
/// the user's connections on every node.
pub async fn kick_user(
    State(s): State<AppState>,
    _: InnerKey,
    Body(r): Body<KickUserRequest>,
) -> ApiResult<KickUserAnswer> {
    check_user_id("user_id", &r.user_id)?;
    if let Some(p) = &r.platform {
        check_platform(p)?;
    }
    let before_ms = now_ms() + 1;
    s.rpc.call(&RevokeTokens { user_id: r.user_id.clone(), platform: r.platform.clone(), before_ms }).await?;
    let revocation = Revocation { user_id: r.user_id, platform: r.platform, before_ms };
    s.auth.revoke(&revocation);
    let kick = s.cluster.kick_user(&revocation).await.map_err(bus_error)?;
    Ok(Envelope(KickUserAnswer {
        closed_connections: kick.closed,
        revoked_before: before_ms,
        nodes_asked: kick.asked,
        nodes_confirmed: kick.confirmed,
    }))
}
