//! Stable error codes and the error that crosses the service boundary.
//!
//! Every failure a client can see has one [`ErrorCode`]: a stable number (never reused, never
//! renumbered), a stable name and an HTTP status. The number is the HTTP status times 100 plus
//! a small index, so `40301` reads as "403, second kind". docs/api.md lists them all.

use serde::{Deserialize, Serialize};

/// Every kind of failure the API reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Malformed JSON, unknown field, wrong type, value out of range.
    InvalidParam,
    /// A text holds a character the store cannot keep (U+0000).
    InvalidText,
    /// A list holds more items than its limit (users, conversations, messages of a batch).
    TooManyItems,
    /// The message cannot be edited, recalled or deleted (a system message).
    NotRevisable,
    /// Missing, malformed, expired, forged or revoked token (or wrong inner key).
    InvalidToken,
    /// Authenticated, but this action is not allowed (e.g. self-join of a private conversation).
    Forbidden,
    /// The caller is not a member of the conversation, or the conversation does not exist.
    NotMember,
    /// Only the sender may edit, recall or delete a message (or the business system).
    NotSender,
    /// The caller's role in the conversation does not allow this (e.g. changing its title).
    RoleRequired,
    /// The time to edit or recall the message (`edit_window_s`, `recall_window_s`) has passed.
    RevisionWindowClosed,
    /// The `before_send` hook rejected the message (its reason is the message).
    RejectedByHook,
    /// The resource does not exist (unknown route, unknown conversation on /inner).
    NotFound,
    /// The route exists but not with this HTTP method.
    MethodNotAllowed,
    /// The client took longer than `body_read_timeout_s` to send its request body.
    RequestTimeout,
    /// The request conflicts with existing state (idempotency key reused differently, ...).
    Conflict,
    /// The conversation is archived and takes no client messages.
    ConversationArchived,
    /// The conversation has `max_members` active members already.
    ConversationFull,
    /// The message was recalled or deleted: it cannot be changed any more.
    MessageGone,
    /// A delta or finish for a stream that is not open (finished, cancelled, or not a stream).
    StreamClosed,
    /// An edit, recall or delete of a message still streaming: finish or cancel it first.
    StillStreaming,
    /// Body or content larger than the configured limit.
    PayloadTooLarge,
    /// A message that, encoded, would not fit in one message of the cluster's bus (NATS's
    /// `max_payload`), though within `max_content_bytes`.
    TooLargeForBus,
    /// The request body is over `max_body_bytes` (public) or `inner_max_body_bytes` (/inner).
    BodyTooLarge,
    /// A conversation title over `title_max_bytes`.
    TitleTooLarge,
    /// A conversation avatar over `avatar_max_bytes`.
    AvatarTooLarge,
    /// A conversation's `ext` over `ext_max_bytes` (as JSON).
    ExtTooLarge,
    /// A signal's content over `signal_max_bytes`.
    SignalTooLarge,
    /// A stream delta over `stream_delta_max_bytes`.
    DeltaTooLarge,
    /// Request rate above the configured limit; `Retry-After` says when to come back.
    RateLimited,
    /// Too many open /notify connections for this user.
    TooManyConnections,
    /// WebSocket client frames over `ws_frames_per_s`.
    FrameRateLimited,
    /// Too many new connections (or WebSocket handshakes) from one IP address.
    TooManyConnectionsFromIp,
    /// Signals (typing, ...) above `signal_rate_per_s` for this user.
    TooManySignals,
    /// A dependency (bus, database, service) cannot be reached or the node is shutting down.
    Unavailable,
    /// The `before_send` hook failed and is configured to refuse messages then.
    HookUnavailable,
    /// A dependency did not answer in time.
    Timeout,
    /// A bug or an unexpected failure; details are in the server log, never in the answer.
    Internal,
}

impl ErrorCode {
    /// All codes, in documentation order.
    pub const ALL: [ErrorCode; 37] = [
        ErrorCode::InvalidParam,
        ErrorCode::InvalidText,
        ErrorCode::TooManyItems,
        ErrorCode::NotRevisable,
        ErrorCode::InvalidToken,
        ErrorCode::Forbidden,
        ErrorCode::NotMember,
        ErrorCode::NotSender,
        ErrorCode::RoleRequired,
        ErrorCode::RevisionWindowClosed,
        ErrorCode::RejectedByHook,
        ErrorCode::NotFound,
        ErrorCode::MethodNotAllowed,
        ErrorCode::RequestTimeout,
        ErrorCode::Conflict,
        ErrorCode::ConversationArchived,
        ErrorCode::ConversationFull,
        ErrorCode::MessageGone,
        ErrorCode::StreamClosed,
        ErrorCode::StillStreaming,
        ErrorCode::PayloadTooLarge,
        ErrorCode::TooLargeForBus,
        ErrorCode::BodyTooLarge,
        ErrorCode::TitleTooLarge,
        ErrorCode::AvatarTooLarge,
        ErrorCode::ExtTooLarge,
        ErrorCode::SignalTooLarge,
        ErrorCode::DeltaTooLarge,
        ErrorCode::RateLimited,
        ErrorCode::TooManyConnections,
        ErrorCode::FrameRateLimited,
        ErrorCode::TooManyConnectionsFromIp,
        ErrorCode::TooManySignals,
        ErrorCode::Internal,
        ErrorCode::Unavailable,
        ErrorCode::HookUnavailable,
        ErrorCode::Timeout,
    ];

    /// The stable number carried in the `code` field of the envelope.
    pub const fn number(self) -> u32 {
        match self {
            ErrorCode::InvalidParam => 40000,
            ErrorCode::InvalidText => 40001,
            ErrorCode::TooManyItems => 40002,
            ErrorCode::NotRevisable => 40003,
            ErrorCode::InvalidToken => 40100,
            ErrorCode::Forbidden => 40300,
            ErrorCode::NotMember => 40301,
            ErrorCode::NotSender => 40302,
            ErrorCode::RoleRequired => 40303,
            ErrorCode::RevisionWindowClosed => 40304,
            ErrorCode::RejectedByHook => 40305,
            ErrorCode::NotFound => 40400,
            ErrorCode::MethodNotAllowed => 40500,
            ErrorCode::RequestTimeout => 40800,
            ErrorCode::Conflict => 40900,
            ErrorCode::ConversationArchived => 40901,
            ErrorCode::ConversationFull => 40902,
            ErrorCode::MessageGone => 40903,
            ErrorCode::StreamClosed => 40904,
            ErrorCode::StillStreaming => 40905,
            ErrorCode::PayloadTooLarge => 41300,
            ErrorCode::TooLargeForBus => 41301,
            ErrorCode::BodyTooLarge => 41302,
            ErrorCode::TitleTooLarge => 41303,
            ErrorCode::AvatarTooLarge => 41304,
            ErrorCode::ExtTooLarge => 41305,
            ErrorCode::SignalTooLarge => 41306,
            ErrorCode::DeltaTooLarge => 41307,
            ErrorCode::RateLimited => 42900,
            ErrorCode::TooManyConnections => 42901,
            ErrorCode::FrameRateLimited => 42902,
            ErrorCode::TooManyConnectionsFromIp => 42903,
            ErrorCode::TooManySignals => 42904,
            ErrorCode::Internal => 50000,
            ErrorCode::Unavailable => 50300,
            ErrorCode::HookUnavailable => 50301,
            ErrorCode::Timeout => 50400,
        }
    }

    /// The HTTP status that goes with the code.
    pub const fn http_status(self) -> u16 {
        (self.number() / 100) as u16
    }

    /// The stable snake_case name (also the serde form).
    pub const fn name(self) -> &'static str {
        match self {
            ErrorCode::InvalidParam => "invalid_param",
            ErrorCode::InvalidText => "invalid_text",
            ErrorCode::TooManyItems => "too_many_items",
            ErrorCode::NotRevisable => "not_revisable",
            ErrorCode::InvalidToken => "invalid_token",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotMember => "not_member",
            ErrorCode::NotSender => "not_sender",
            ErrorCode::RoleRequired => "role_required",
            ErrorCode::RevisionWindowClosed => "revision_window_closed",
            ErrorCode::RejectedByHook => "rejected_by_hook",
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::RequestTimeout => "request_timeout",
            ErrorCode::Conflict => "conflict",
            ErrorCode::ConversationArchived => "conversation_archived",
            ErrorCode::ConversationFull => "conversation_full",
            ErrorCode::MessageGone => "message_gone",
            ErrorCode::StreamClosed => "stream_closed",
            ErrorCode::StillStreaming => "still_streaming",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::TooLargeForBus => "too_large_for_bus",
            ErrorCode::BodyTooLarge => "body_too_large",
            ErrorCode::TitleTooLarge => "title_too_large",
            ErrorCode::AvatarTooLarge => "avatar_too_large",
            ErrorCode::ExtTooLarge => "ext_too_large",
            ErrorCode::SignalTooLarge => "signal_too_large",
            ErrorCode::DeltaTooLarge => "delta_too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::TooManyConnections => "too_many_connections",
            ErrorCode::FrameRateLimited => "frame_rate_limited",
            ErrorCode::TooManyConnectionsFromIp => "too_many_connections_from_ip",
            ErrorCode::TooManySignals => "too_many_signals",
            ErrorCode::Internal => "internal",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::HookUnavailable => "hook_unavailable",
            ErrorCode::Timeout => "timeout",
        }
    }

    /// Looks a code up by its number.
    pub fn from_number(n: u32) -> Option<ErrorCode> {
        Self::ALL.into_iter().find(|c| c.number() == n)
    }

    /// True for failures that are the server's fault (logged once as errors).
    pub const fn is_server_error(self) -> bool {
        self.http_status() >= 500
    }
}

/// The error a service answers with, and the gateway turns into an HTTP answer.
///
/// `message` is meant for the client: it never carries internal details (those are logged
/// where they happen, with [`ServiceError::internal`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct ServiceError {
    /// What kind of failure.
    pub code: ErrorCode,
    /// Human text for the client.
    pub message: String,
}

impl ServiceError {
    /// A failure of the given kind with a client-facing message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ServiceError { code, message: message.into() }
    }

    /// 400 with a message naming the bad field.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidParam, message)
    }

    /// 403 not_member: also the answer for a conversation that does not exist.
    pub fn not_member() -> Self {
        Self::new(ErrorCode::NotMember, "not a member of this conversation")
    }

    /// 409 with a message.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Conflict, message)
    }

    /// 500: logs `detail` here, once, and answers a generic message.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        tracing::error!(error = %detail, "internal error");
        Self::new(ErrorCode::Internal, "internal error")
    }

    /// 503 with a message.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unavailable, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_unique_and_match_status() {
        let mut seen = std::collections::HashSet::new();
        for code in ErrorCode::ALL {
            assert!(seen.insert(code.number()), "duplicate number for {code:?}");
            assert_eq!(ErrorCode::from_number(code.number()), Some(code));
            assert!((400..600).contains(&code.http_status()));
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.name()));
        }
    }

    #[test]
    fn published_numbers_never_change() {
        // These numbers are in docs/api.md and in clients: changing one is a breaking change.
        assert_eq!(ErrorCode::InvalidParam.number(), 40000);
        assert_eq!(ErrorCode::InvalidToken.number(), 40100);
        assert_eq!(ErrorCode::NotMember.number(), 40301);
        assert_eq!(ErrorCode::Conflict.number(), 40900);
        assert_eq!(ErrorCode::PayloadTooLarge.number(), 41300);
        assert_eq!(ErrorCode::RateLimited.number(), 42900);
        assert_eq!(ErrorCode::Unavailable.number(), 50300);
        assert_eq!(ErrorCode::Timeout.number(), 50400);
    }
}
