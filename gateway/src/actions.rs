//! What a member or the business system does, however it asks — a public HTTP request
//! (`/send_msg`, `/mark_read`, `/signal`, `/edit_msg`, ...), an /inner one
//! (`/inner/send_msg`, `/inner/edit_msg`, ...) or a WebSocket frame (`send`, `mark_read`,
//! `signal`): one function each, so coalescing, deadlines and everything after apply to all
//! alike. (Rate limits apply per request before: the token extractor for HTTP,
//! the WebSocket transport for frames, with the same per-user limiter.)

use quickim_shared::error::{ErrorCode, ServiceError};
use quickim_shared::ids::check_conversation_id;
use quickim_shared::protocol::api::{Message, ReadAnswer, SignalAnswer, StreamDeltaAnswer};
use quickim_shared::protocol::event::{LIVE_SUBJECT, Live, SignalKind};
use quickim_shared::protocol::service::{
    CheckJoined, GetStream, MarkRead, OpenStream, Origin, ReviseMessage, SendMessage,
};
use quickim_shared::protocol::system::Action;
use quickim_shared::rpc::bus_error;
use tokio::time::Instant;

use crate::state::AppState;

/// Who sends a message.
#[derive(Clone, Copy)]
pub enum Sender<'a> {
    /// A member, by token or WebSocket: membership and archive are checked.
    Member(&'a str),
    /// The business system (/inner), in the name of `from`.
    Inner(&'a str),
}

/// A message to store.
pub struct NewMessage {
    /// Target conversation.
    pub conversation_id: String,
    /// Message type (≥ 0).
    pub msg_type: i32,
    /// Content.
    pub content: String,
    /// Idempotency key.
    pub client_msg_id: Option<String>,
    /// false: never counts as unread (/inner only).
    pub count_unread: bool,
}

/// Stores a message (through the gateway's coalesced sends) and answers it, by `deadline`.
pub async fn send(
    state: &AppState,
    sender: Sender<'_>,
    send: NewMessage,
    deadline: Instant,
) -> Result<Message, ServiceError> {
    let (origin, from) = match sender {
        Sender::Member(user) => (Origin::Client, user),
        Sender::Inner(from) => (Origin::Inner, from),
    };
    let message = SendMessage {
        origin,
        conversation_id: send.conversation_id,
        from: from.to_string(),
        msg_type: send.msg_type,
        content: send.content,
        client_msg_id: send.client_msg_id,
        count_unread: send.count_unread,
    };
    state.sends.send(message, deadline).await
}

/// Edits, recalls or deletes a message: a member its own (within the configured windows),
/// the business system any.
pub async fn revise(
    state: &AppState,
    by: Sender<'_>,
    conversation_id: String,
    msg_id: u64,
    action: Action,
    content: Option<String>,
) -> Result<Message, ServiceError> {
    let (origin, by) = match by {
        Sender::Member(user) => (Origin::Client, user.to_string()),
        Sender::Inner(_) => (Origin::Inner, String::new()),
    };
    state.rpc.call(&ReviseMessage { origin, by, conversation_id, msg_id, action, content }).await
}

/// Moves `user`'s read position in a conversation forward; answers where it is.
pub async fn mark_read(
    state: &AppState,
    user: &str,
    conversation_id: String,
    msg_id: u64,
) -> Result<ReadAnswer, ServiceError> {
    state.rpc.call(&MarkRead { user_id: user.to_string(), conversation_id, msg_id }).await
}

/// An ephemeral signal from a member to the conversation's other members, on every node:
/// checked (content by kind, size, rate, membership), then fanned out, never stored.
pub async fn signal(
    state: &AppState,
    user: &str,
    conversation_id: String,
    kind: SignalKind,
    content: Option<String>,
) -> Result<SignalAnswer, ServiceError> {
    check_conversation_id(&conversation_id)?;
    let content = match (kind, content) {
        (SignalKind::Custom, Some(c)) if !c.is_empty() => Some(c),
        (SignalKind::Custom, _) => return Err(ServiceError::invalid("a custom signal carries content")),
        (_, Some(_)) => return Err(ServiceError::invalid("only custom signals carry content")),
        (_, None) => None,
    };
    if let Some(c) = &content {
        let max = state.config.signal_max_bytes;
        if c.len() > max {
            return Err(ServiceError::new(ErrorCode::SignalTooLarge, format!("signal content over {max} bytes")));
        }
        if c.contains('\0') {
            return Err(ServiceError::new(ErrorCode::InvalidText, "signal content holds a NUL character"));
        }
    }
    if let Err(wait) = state.signals.check(user) {
        return Err(ServiceError::new(ErrorCode::TooManySignals, format!("too many signals; retry in {wait} s")));
    }
    let joined =
        state.rpc.call(&CheckJoined { user_id: user.to_string(), conversation_id: conversation_id.clone() }).await?;
    if !joined {
        return Err(ServiceError::not_member());
    }
    let live = Live::Signal { conversation_id, from: user.to_string(), kind, content };
    let body = serde_json::to_vec(&live).map_err(ServiceError::internal)?;
    state.rpc.bus().publish(LIVE_SUBJECT, Vec::new(), body.into()).await.map_err(bus_error)?;
    metrics::counter!("quickim_live_signals_sent_total", "kind" => kind.name()).increment(1);
    Ok(SignalAnswer { sent: true })
}

/// Opens a streaming message: stored empty at once (its msg_id taken, delivered like any
/// message with `streaming: true`); its text follows with [`stream_delta`].
pub async fn open_stream(
    state: &AppState,
    sender: Sender<'_>,
    conversation_id: String,
    msg_type: i32,
) -> Result<Message, ServiceError> {
    let (origin, from) = match sender {
        Sender::Member(user) => (Origin::Client, user),
        Sender::Inner(from) => (Origin::Inner, from),
    };
    state.rpc.call(&OpenStream { origin, conversation_id, from: from.to_string(), msg_type }).await
}

/// The next piece of an open stream, from its sender (or the business system): checked,
/// then fanned out live to every gateway; never stored (the finish stores the whole).
pub async fn stream_delta(
    state: &AppState,
    sender: Sender<'_>,
    conversation_id: String,
    msg_id: u64,
    seq: u64,
    delta: String,
) -> Result<StreamDeltaAnswer, ServiceError> {
    check_conversation_id(&conversation_id)?;
    if seq == 0 || msg_id == 0 {
        return Err(ServiceError::invalid("msg_id and seq start at 1"));
    }
    let max = state.config.stream_delta_max_bytes;
    if delta.len() > max {
        return Err(ServiceError::new(ErrorCode::DeltaTooLarge, format!("a delta holds at most {max} bytes")));
    }
    if delta.contains('\0') {
        return Err(ServiceError::new(ErrorCode::InvalidText, "a delta holds a NUL character"));
    }
    let info = match state.rpc.call(&GetStream { conversation_id: conversation_id.clone(), msg_id }).await {
        Ok(info) => Some(info),
        Err(e) if e.code == ErrorCode::NotFound => None,
        Err(e) => return Err(e),
    };
    if let Sender::Member(user) = sender {
        // The same answer for someone else's message and for none: nothing to learn here.
        if info.as_ref().is_none_or(|i| i.from != user) {
            return Err(ServiceError::new(ErrorCode::NotSender, "only the stream's sender appends to it"));
        }
    }
    match info {
        None => return Err(ServiceError::new(ErrorCode::NotFound, "no such message")),
        Some(i) if !i.open => {
            return Err(ServiceError::new(ErrorCode::StreamClosed, "the stream was finished or cancelled"));
        }
        Some(_) => {}
    }
    let live = Live::Delta { conversation_id, msg_id, seq, delta };
    let body = serde_json::to_vec(&live).map_err(ServiceError::internal)?;
    let budget = state.rpc.bus().payload_budget();
    if body.len() > budget {
        return Err(ServiceError::new(
            ErrorCode::TooLargeForBus,
            format!("this delta is over the bus's {budget} bytes; send it in smaller pieces"),
        ));
    }
    state.rpc.bus().publish(LIVE_SUBJECT, Vec::new(), body.into()).await.map_err(bus_error)?;
    metrics::counter!("quickim_stream_deltas_total").increment(1);
    Ok(StreamDeltaAnswer { sent: true })
}
