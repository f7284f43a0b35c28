//! The public (client) routes. The caller is always the token's user; no route takes the
//! caller's identity from the body.

use axum::extract::State;
use quickim_shared::error::{ErrorCode, ServiceError};
use quickim_shared::protocol::api::{
    AroundRequest, ConversationDetail, ConversationMeta, ConversationRequest, CreateConversationRequest,
    CreatedConversation, DetailRequest, EditMsgRequest, FinishStreamRequest, GetJoinedRequest, JoinedAnswer,
    JoinedConversations, LastMsgsRequest, LastOneAnswer, LeftAnswer, MarkReadRequest, Message, MsgIdAnswer, MsgRequest,
    MsgsAnswer, MuteAnswer, MuteRequest, NotifyTicketAnswer, NotifyTicketRequest, OpenStreamRequest, RangeRequest,
    ReadAnswer, SendMsgRequest, SignalAnswer, SignalRequest, StreamDeltaAnswer, StreamDeltaRequest,
    UpdateConversationRequest, VersionsAnswer, VersionsRequest,
};
use quickim_shared::protocol::service::{
    CheckJoined, CreateConversation, GetDetail, GetVersions, History, HistoryQuery, Join, LastMsgId, Leave, ListJoined,
    SetMute, UpdateConversation,
};
use quickim_shared::protocol::system::Action;

use super::extract::{Body, Deadline};
use crate::actions::{self, NewMessage, Sender};
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult, Envelope};
use crate::state::AppState;

/// POST /send_msg
pub async fn send_msg(
    State(s): State<AppState>,
    Deadline(deadline): Deadline,
    caller: Caller,
    Body(r): Body<SendMsgRequest>,
) -> ApiResult<Message> {
    let send = NewMessage {
        conversation_id: r.conversation_id,
        msg_type: r.msg_type,
        content: r.content,
        client_msg_id: r.client_msg_id,
        count_unread: true,
    };
    let msg = actions::send(&s, Sender::Member(&caller.user_id), send, deadline).await?;
    Ok(Envelope(msg))
}

/// POST /notify_ticket: a single-use ticket for the caller's next /notify connection.
pub async fn notify_ticket(
    State(s): State<AppState>,
    caller: Caller,
    Body(_): Body<NotifyTicketRequest>,
) -> ApiResult<NotifyTicketAnswer> {
    let (ticket, expires_at) = s.auth.issue_ticket(&caller)?;
    Ok(Envelope(NotifyTicketAnswer { ticket, expires_at }))
}

/// POST /check_joined_conversation
pub async fn check_joined_conversation(
    State(s): State<AppState>,
    caller: Caller,
    Body(r): Body<ConversationRequest>,
) -> ApiResult<JoinedAnswer> {
    let joined = s.rpc.call(&CheckJoined { user_id: caller.user_id, conversation_id: r.conversation_id }).await?;
    Ok(Envelope(JoinedAnswer { joined }))
}

/// POST /get_joined_conversation
pub async fn get_joined_conversation(
    State(s): State<AppState>,
    caller: Caller,
    Body(r): Body<GetJoinedRequest>,
) -> ApiResult<JoinedConversations> {
    let limit = r.limit.unwrap_or(50);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::new(ErrorCode::InvalidParam, "limit must be within 1–100"));
    }
    let page =
        s.rpc.call(&ListJoined { user_id: caller.user_id, archived: r.archived, limit, cursor: r.cursor }).await?;
    Ok(Envelope(page))
}

/// POST /get_conversation_detail
pub async fn get_conversation_detail(
    State(s): State<AppState>,
    caller: Caller,
    Body(r): Body<DetailRequest>,
) -> ApiResult<ConversationDetail> {
    let members_limit = r.members_limit.unwrap_or(500);
    if !(1..=1000).contains(&members_limit) {
        return Err(ApiError::new(ErrorCode::InvalidParam, "members_limit must be within 1–1000"));
    }
    let detail = s
        .rpc
        .call(&GetDetail {
            user_id: caller.user_id,
            conversation_id: r.conversation_id,
            members_limit,
            members_cursor: r.members_cursor,
        })
        .await?;
    Ok(Envelope(detail))
}

/// POST /create_conversation: the caller becomes the owner; others only where allowed.
pub async fn create_conversation(
    State(s): State<AppState>,
    caller: Caller,
    Body(r): Body<CreateConversationRequest>,
) -> ApiResult<CreatedConversation> {
    let others: Vec<String> = r.members.into_iter().filter(|m| *m != caller.user_id).collect();
    if !others.is_empty() && !s.config.client_create_members {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            "clients may not name other members here; add them through /inner/join_conversation",
        ));
    }
    let created = s
        .rpc
        .call(&CreateConversation {
            conversation_id: None,
            conversation_type: r.conversation_type,
            joinable: r.joinable,
            members: others,
            owner: Some(caller.user_id),
            title: r.title,
            avatar: r.avatar,
            ext: r.ext,
            meta_role: None,
            receipts: None,
            presence: None,
        })
        .await?;
    Ok(Envelope(created))
}

/// POST /edit_msg: the sender edits its message (within `edit_window_s`).
pub async fn edit_msg(State(s): State<AppState>, caller: Caller, Body(r): Body<EditMsgRequest>) -> ApiResult<Message> {
    let by = Sender::Member(&caller.user_id);
    Ok(Envelope(actions::revise(&s, by, r.conversation_id, r.msg_id, Action::Edit, Some(r.content)).await?))
}

/// POST /open_stream: a message whose text streams (an AI agent's reply), stored empty now.
pub async fn open_stream(
    State(s): State<AppState>,
    caller: Caller,
    Body(r): Body<OpenStreamRequest>,
) -> ApiResult<Message> {
    Ok(Envelope(actions::open_stream(&s, Sender::Member(&caller.user_id), r.conversation_id, r.msg_type).await?))
}

/// POST /stream_delta: the next piece of the caller's open stream, fanned out live.
pub async fn stream_delta(
    State(s): State<AppState>,
    caller: Caller,
    Body(r): Body<StreamDeltaRequest>,
) -> ApiResult<StreamDeltaAnswer> {
    let by = Sender::Member(&caller.user_id);
    Ok(Envelope(actions::stream_delta(&s, by, r.conversation_id, r.msg_id, r.seq, r.delta).await?))
}

/// POST /finish_stream: stores the final content of the caller's stream.
pub async fn finish_stream(
    State(s): State<AppState>,
    caller: Caller,
    Body(r): Body<FinishStreamRequest>,
) -> ApiResult<Message> {
    let by = Sender::Member(&caller.user_id);
    Ok(Envelope(actions::revise(&s, by, r.conversation_id, r.msg_id, Action::Finish, Some(r.content)).await?))
}

/// POST /cancel_stream: abandons the caller's stream (the message is deleted).
pub async fn cancel_stream(State(s): State<AppState>, caller: Caller, Body(r): Body<MsgRequest>) -> ApiResult<Message> {
    let by = Sender::Member(&caller.user_id);
    Ok(Envelope(actions::revise(&s, by, r.conversation_id, r.msg_id, Action::Cancel, None).await?))
}

/// POST /recall_msg: the sender recalls its message (within `recall_window_s`).
pub async fn recall_msg(State(s): State<AppState>, caller: Caller, Body(r): Body<MsgRequest>) -> ApiResult<Message> {
    let by = Sender::Member(&caller.user_id);
    Ok(Envelope(actions::revise(&s, by, r.conversation_id, r.msg_id, Action::Recall, None).await?))
}

/// POST /delete_msg: the sender deletes its message.
pub async fn delete_msg(State(s): State<AppState>, caller: Caller, Body(r): Body<MsgRequest>) -> ApiResult<Message> {
    let by = Sender::Member(&caller.user_id);
    Ok(Envelope(actions::revise(&s, by, r.conversation_id, r.msg_id, Action::Delete, None).await?))
}

/// POST /get_msg_versions: an edited message's versions (members only).
pub async fn get_msg_versions(
    State(s): State<AppState>,
    caller: Caller,
    Body(r): Body<VersionsRequest>,
) -> ApiResult<VersionsAnswer> {
    let q = GetVersions {
        user_id: Some(caller.user_id),
        conversation_id: r.conversation_id,
        msg_id: r.msg_id,
        after_version: r.after_version,
    };
    Ok(Envelope(s.rpc.call(&q).await?))
}

/// POST /update_conversation: title, avatar, ext — for members whose role the conversation's
/// `meta_role` allows.
pub async fn update_conversation(
    State(s): State<AppState>,
    caller: Caller,
    Body(r): Body<UpdateConversationRequest>,
) -> ApiResult<ConversationMeta> {
    Ok(Envelope(s.rpc.call(&UpdateConversation { by: Some(caller.user_id), changes: r }).await?))
}

/// POST /set_conversation_mute
pub async fn set_conversation_mute(
    State(s): State<AppState>,
    caller: Caller,
    Body(r): Body<MuteRequest>,
) -> ApiResult<MuteAnswer> {
    let q = SetMute { user_id: caller.user_id, conversation_id: r.conversation_id, muted: r.muted };
    Ok(Envelope(s.rpc.call(&q).await?))
}

/// POST /join_conversation: self-join, only where the conversation allows it.
pub async fn join_conversation(
    State(s): State<AppState>,
    caller: Caller,
    Body(r): Body<ConversationRequest>,
) -> ApiResult<JoinedAnswer> {
    s.rpc.call(&Join { conversation_id: r.conversation_id, user_ids: vec![caller.user_id], self_join: true }).await?;
    Ok(Envelope(JoinedAnswer { joined: true }))
}

/// POST /leave_conversation
pub async fn leave_conversation(
    State(s): State<AppState>,
    caller: Caller,
    Body(r): Body<ConversationRequest>,
) -> ApiResult<LeftAnswer> {
    Ok(Envelope(s.rpc.call(&Leave { user_id: caller.user_id, conversation_id: r.conversation_id }).await?))
}

/// POST /get_lastone_msgid
pub async fn get_lastone_msgid(
    State(s): State<AppState>,
    caller: Caller,
    Body(r): Body<ConversationRequest>,
) -> ApiResult<MsgIdAnswer> {
    let msg_id = s.rpc.call(&LastMsgId { user_id: caller.user_id, conversation_id: r.conversation_id }).await?;
    Ok(Envelope(MsgIdAnswer { msg_id }))
}

/// POST /signal: typing and other ephemeral signals, never stored.
pub async fn signal(
    State(s): State<AppState>,
    caller: Caller,
    Body(r): Body<SignalRequest>,
) -> ApiResult<SignalAnswer> {
    Ok(Envelope(actions::signal(&s, &caller.user_id, r.conversation_id, r.kind, r.content).await?))
}

/// POST /mark_read
pub async fn mark_read(
    State(s): State<AppState>,
    caller: Caller,
    Body(r): Body<MarkReadRequest>,
) -> ApiResult<ReadAnswer> {
    Ok(Envelope(actions::mark_read(&s, &caller.user_id, r.conversation_id, r.msg_id).await?))
}

async fn history(
    s: &AppState,
    caller: Caller,
    conversation_id: String,
    query: HistoryQuery,
    desc: bool,
) -> Result<Vec<Message>, ServiceError> {
    s.rpc.call(&History { user_id: caller.user_id, conversation_id, query, desc }).await
}

/// POST /get_conversation_msg_by_range
pub async fn get_conversation_msg_by_range(
    State(s): State<AppState>,
    caller: Caller,
    Body(r): Body<RangeRequest>,
) -> ApiResult<MsgsAnswer> {
    let query = HistoryQuery::Range { start: r.start_msg_id, end: r.end_msg_id };
    let msgs = history(&s, caller, r.conversation_id, query, r.desc).await?;
    Ok(Envelope(MsgsAnswer { msgs }))
}

/// POST /get_conversation_30msg_before_the_id
pub async fn get_conversation_30msg_before_the_id(
    State(s): State<AppState>,
    caller: Caller,
    Body(r): Body<AroundRequest>,
) -> ApiResult<MsgsAnswer> {
    let msgs = history(&s, caller, r.conversation_id, HistoryQuery::Before { msg_id: r.msg_id }, r.desc).await?;
    Ok(Envelope(MsgsAnswer { msgs }))
}

/// POST /get_conversation_30msg_after_the_id
pub async fn get_conversation_30msg_after_the_id(
    State(s): State<AppState>,
    caller: Caller,
    Body(r): Body<AroundRequest>,
) -> ApiResult<MsgsAnswer> {
    let msgs = history(&s, caller, r.conversation_id, HistoryQuery::After { msg_id: r.msg_id }, r.desc).await?;
    Ok(Envelope(MsgsAnswer { msgs }))
}

/// POST /get_conversation_last_30_msg
pub async fn get_conversation_last_30_msg(
    State(s): State<AppState>,
    caller: Caller,
    Body(r): Body<LastMsgsRequest>,
) -> ApiResult<MsgsAnswer> {
    let msgs = history(&s, caller, r.conversation_id, HistoryQuery::Last, r.desc).await?;
    Ok(Envelope(MsgsAnswer { msgs }))
}

/// POST /get_conversation_lastone_msg
pub async fn get_conversation_lastone_msg(
    State(s): State<AppState>,
    caller: Caller,
    Body(r): Body<ConversationRequest>,
) -> ApiResult<LastOneAnswer> {
    let msgs = history(&s, caller, r.conversation_id, HistoryQuery::LastOne, false).await?;
    Ok(Envelope(LastOneAnswer { msg: msgs.into_iter().next() }))
}
