//! The /inner routes, for business systems, on their own listener and key.

use axum::extract::State;
use quickim_shared::bus::size;
use quickim_shared::error::{ErrorCode, ServiceError};
use quickim_shared::ids::{check_platform, check_user_id};
use quickim_shared::protocol::api::{
    ArchiveAnswer, BatchAnswer, BatchItemResult, ConversationMembersRequest, ConversationMeta, CreatedConversation,
    EditMsgRequest, FinishStreamRequest, GetTokenRequest, InnerCreateConversationRequest, InnerMembersRequest,
    InnerOpenStreamRequest, InnerSendBatchRequest, InnerSendMsgRequest, JoinedConversations, JoinedUsers,
    KickUserAnswer, KickUserRequest, KickedUsers, MembersPage, Message, MsgRequest, RoleAnswer, SetArchiveRequest,
    SetMemberRoleRequest, StreamDeltaAnswer, StreamDeltaRequest, TokenAnswer, UpdateConversationRequest,
    UserConversationsRequest, UserOnline, UsersOnlineAnswer, UsersOnlineRequest, VersionsAnswer, VersionsRequest,
};
use quickim_shared::protocol::service::{
    CreateConversation, GetLastSeen, GetVersions, Join, Kick, ListJoined, ListMembers, Origin, Revocation,
    RevokeTokens, SendBatch, SendMessage, SetArchived, SetMemberRole, UpdateConversation,
};
use quickim_shared::protocol::system::Action;
use quickim_shared::rpc::bus_error;
use quickim_shared::time::now_ms;

use super::extract::{Body, Deadline, InnerKey};
use crate::actions::{self, NewMessage, Sender};
use crate::error::{ApiError, ApiResult, Envelope};
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
            title: r.title,
            avatar: r.avatar,
            ext: r.ext,
            meta_role: r.meta_role,
            receipts: r.receipts,
            presence: r.presence,
        })
        .await?;
    Ok(Envelope(created))
}

/// POST /inner/edit_msg: any message (e.g. updating an approval card).
pub async fn edit_msg(State(s): State<AppState>, _: InnerKey, Body(r): Body<EditMsgRequest>) -> ApiResult<Message> {
    let by = Sender::Inner("");
    Ok(Envelope(actions::revise(&s, by, r.conversation_id, r.msg_id, Action::Edit, Some(r.content)).await?))
}

/// POST /inner/recall_msg
pub async fn recall_msg(State(s): State<AppState>, _: InnerKey, Body(r): Body<MsgRequest>) -> ApiResult<Message> {
    let by = Sender::Inner("");
    Ok(Envelope(actions::revise(&s, by, r.conversation_id, r.msg_id, Action::Recall, None).await?))
}

/// POST /inner/delete_msg
pub async fn delete_msg(State(s): State<AppState>, _: InnerKey, Body(r): Body<MsgRequest>) -> ApiResult<Message> {
    let by = Sender::Inner("");
    Ok(Envelope(actions::revise(&s, by, r.conversation_id, r.msg_id, Action::Delete, None).await?))
}

/// POST /inner/open_stream: a streaming message from a bot (a member) or the business system.
pub async fn open_stream(
    State(s): State<AppState>,
    _: InnerKey,
    Body(r): Body<InnerOpenStreamRequest>,
) -> ApiResult<Message> {
    Ok(Envelope(actions::open_stream(&s, Sender::Inner(&r.from), r.conversation_id, r.msg_type).await?))
}

/// POST /inner/stream_delta: the next piece of any open stream.
pub async fn stream_delta(
    State(s): State<AppState>,
    _: InnerKey,
    Body(r): Body<StreamDeltaRequest>,
) -> ApiResult<StreamDeltaAnswer> {
    Ok(Envelope(actions::stream_delta(&s, Sender::Inner(""), r.conversation_id, r.msg_id, r.seq, r.delta).await?))
}

/// POST /inner/finish_stream
pub async fn finish_stream(
    State(s): State<AppState>,
    _: InnerKey,
    Body(r): Body<FinishStreamRequest>,
) -> ApiResult<Message> {
    let by = Sender::Inner("");
    Ok(Envelope(actions::revise(&s, by, r.conversation_id, r.msg_id, Action::Finish, Some(r.content)).await?))
}

/// POST /inner/cancel_stream
pub async fn cancel_stream(State(s): State<AppState>, _: InnerKey, Body(r): Body<MsgRequest>) -> ApiResult<Message> {
    let by = Sender::Inner("");
    Ok(Envelope(actions::revise(&s, by, r.conversation_id, r.msg_id, Action::Cancel, None).await?))
}

/// POST /inner/get_msg_versions
pub async fn get_msg_versions(
    State(s): State<AppState>,
    _: InnerKey,
    Body(r): Body<VersionsRequest>,
) -> ApiResult<VersionsAnswer> {
    let q = GetVersions {
        user_id: None,
        conversation_id: r.conversation_id,
        msg_id: r.msg_id,
        after_version: r.after_version,
    };
    Ok(Envelope(s.rpc.call(&q).await?))
}

/// POST /inner/update_conversation: title, avatar, ext and who else may change them.
pub async fn update_conversation(
    State(s): State<AppState>,
    _: InnerKey,
    Body(r): Body<UpdateConversationRequest>,
) -> ApiResult<ConversationMeta> {
    Ok(Envelope(s.rpc.call(&UpdateConversation { by: None, changes: r }).await?))
}

/// POST /inner/set_member_role
pub async fn set_member_role(
    State(s): State<AppState>,
    _: InnerKey,
    Body(r): Body<SetMemberRoleRequest>,
) -> ApiResult<RoleAnswer> {
    let q = SetMemberRole { conversation_id: r.conversation_id, user_id: r.user_id, role: r.role };
    Ok(Envelope(s.rpc.call(&q).await?))
}

/// POST /inner/get_user_conversations: a user's conversation list, as that user sees it.
pub async fn get_user_conversations(
    State(s): State<AppState>,
    _: InnerKey,
    Body(r): Body<UserConversationsRequest>,
) -> ApiResult<JoinedConversations> {
    check_user_id("user_id", &r.user_id)?;
    let limit = r.limit.unwrap_or(50);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::new(ErrorCode::InvalidParam, "limit must be within 1–100"));
    }
    let q = ListJoined { user_id: r.user_id, archived: r.archived, limit, cursor: r.cursor };
    Ok(Envelope(s.rpc.call(&q).await?))
}

/// POST /inner/get_conversation_members
pub async fn get_conversation_members(
    State(s): State<AppState>,
    _: InnerKey,
    Body(r): Body<ConversationMembersRequest>,
) -> ApiResult<MembersPage> {
    let limit = r.limit.unwrap_or(500);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::new(ErrorCode::InvalidParam, "limit must be within 1–1000"));
    }
    let q = ListMembers { conversation_id: r.conversation_id, limit, cursor: r.cursor };
    Ok(Envelope(s.rpc.call(&q).await?))
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
        count_unread: r.count_unread,
    }
}

/// POST /inner/send_msg
pub async fn send_msg(
    State(s): State<AppState>,
    _: InnerKey,
    Deadline(deadline): Deadline,
    Body(r): Body<InnerSendMsgRequest>,
) -> ApiResult<Message> {
    let send = NewMessage {
        conversation_id: r.conversation_id,
        msg_type: r.msg_type,
        content: r.content,
        client_msg_id: r.client_msg_id,
        count_unread: r.count_unread,
    };
    Ok(Envelope(actions::send(&s, Sender::Inner(&r.from), send, deadline).await?))
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
    let mut users = r
        .user_ids
        .into_iter()
        .map(|u| match presence.get(&u) {
            Some(p) => UserOnline {
                online: p.connections > 0,
                platforms: p.platforms.clone(),
                connections: p.connections,
                user_id: u,
                last_seen: None,
            },
            None => UserOnline { user_id: u, online: false, platforms: Vec::new(), connections: 0, last_seen: None },
        })
        .collect::<Vec<_>>();
    let offline: Vec<String> = users.iter().filter(|u| !u.online).map(|u| u.user_id.clone()).collect();
    // Asked in chunks whose question and answer fit in one bus message (ids of 128
    // characters and a time each).
    let per_chunk = (s.rpc.bus().payload_budget().saturating_sub(256) / 160).clamp(1, 1000);
    let mut seen: std::collections::HashMap<String, i64> = std::collections::HashMap::new();
    for chunk in offline.chunks(per_chunk) {
        seen.extend(s.rpc.call(&GetLastSeen { user_ids: chunk.to_vec() }).await?);
    }
    for u in users.iter_mut().filter(|u| !u.online) {
        u.last_seen = seen.get(&u.user_id).copied();
    }
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
