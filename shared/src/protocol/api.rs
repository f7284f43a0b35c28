//! The HTTP API: request bodies and the `data` of successful answers.
//!
//! Every request type denies unknown fields, so a typo is a 400 rather than a silently
//! ignored option.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A stored message, as every read route and every `message` event carries it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Message {
    /// The conversation the message belongs to.
    #[schema(pattern = "^[A-Za-z0-9_.:@-]{1,128}$")]
    pub conversation_id: String,
    /// Gap-free position in the conversation, starting at 1.
    pub msg_id: u64,
    /// Sender's user id; empty for system messages.
    pub from: String,
    /// Opaque to the server; negative values are system messages (see docs/api.md).
    #[serde(rename = "type")]
    pub msg_type: i32,
    /// Opaque to the server (UTF-8 text; JSON for system messages).
    pub content: String,
    /// The sender's idempotency key, if it gave one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^[A-Za-z0-9_.:@-]{1,128}$")]
    pub client_msg_id: Option<String>,
    /// Milliseconds since the epoch, server clock, at commit.
    pub send_time: i64,
    /// When the content was last edited (ms), if ever.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edited_at: Option<i64>,
    /// Recalled by its sender (or the business system): the content is gone.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub recalled: bool,
    /// Deleted: the content is gone; clients hide the message (its msg_id stays).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleted: bool,
    /// A stream still open: its text arrives as `stream` events until it is finished (a -6
    /// `finish` with the final content) or cancelled (a -6 `cancel`, the message deleted).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub streaming: bool,
}

/// Body of `/open_stream`: a message whose text will stream.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OpenStreamRequest {
    /// The conversation.
    #[schema(pattern = "^[A-Za-z0-9_.:@-]{1,128}$")]
    pub conversation_id: String,
    /// Message type (≥ 0).
    #[serde(rename = "type")]
    #[schema(minimum = 0)]
    pub msg_type: i32,
}

/// Body of `/inner/open_stream`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InnerOpenStreamRequest {
    /// The conversation.
    #[schema(pattern = "^[A-Za-z0-9_.:@-]{1,128}$")]
    pub conversation_id: String,
    /// The sender: a member (a bot's user id), or "" for the business system.
    pub from: String,
    /// Message type (≥ 0).
    #[serde(rename = "type")]
    #[schema(minimum = 0)]
    pub msg_type: i32,
}

/// Body of `/stream_delta` and `/inner/stream_delta`: the next piece of an open stream.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StreamDeltaRequest {
    /// The conversation.
    #[schema(pattern = "^[A-Za-z0-9_.:@-]{1,128}$")]
    pub conversation_id: String,
    /// The streaming message.
    pub msg_id: u64,
    /// 1 for the first delta, then 2, 3, … (receivers apply them in this order).
    #[schema(minimum = 1)]
    pub seq: u64,
    /// The text to append (at most `stream_delta_max_bytes`).
    pub delta: String,
}

/// `data` of `/stream_delta`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct StreamDeltaAnswer {
    /// Fanned out to every gateway (live only; the final content comes with the finish).
    pub sent: bool,
}

/// Body of `/finish_stream` and `/inner/finish_stream`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FinishStreamRequest {
    /// The conversation.
    #[schema(pattern = "^[A-Za-z0-9_.:@-]{1,128}$")]
    pub conversation_id: String,
    /// The streaming message.
    pub msg_id: u64,
    /// The final content, stored as the message's.
    pub content: String,
}

/// Body of `/edit_msg` and `/inner/edit_msg`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EditMsgRequest {
    /// The conversation.
    #[schema(pattern = "^[A-Za-z0-9_.:@-]{1,128}$")]
    pub conversation_id: String,
    /// The message to edit.
    #[schema(minimum = 1)]
    pub msg_id: u64,
    /// The new content (same limits as a send).
    pub content: String,
}

/// Body of `/recall_msg` and `/delete_msg` (and their /inner twins).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MsgRequest {
    /// The conversation.
    #[schema(pattern = "^[A-Za-z0-9_.:@-]{1,128}$")]
    pub conversation_id: String,
    /// The message.
    #[schema(minimum = 1)]
    pub msg_id: u64,
}

/// One version of an edited message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MsgVersion {
    /// 0 for the content as sent, then 1, 2, … per edit.
    pub version: u32,
    /// The content of this version.
    pub content: String,
    /// When this version was made (ms): the send time for version 0, else the edit's.
    pub at: i64,
}

/// Body of `/get_msg_versions` and `/inner/get_msg_versions`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VersionsRequest {
    /// The conversation.
    #[schema(pattern = "^[A-Za-z0-9_.:@-]{1,128}$")]
    pub conversation_id: String,
    /// The message.
    #[schema(minimum = 1)]
    pub msg_id: u64,
    /// `next_after_version` of the previous page.
    #[serde(default)]
    pub after_version: Option<u32>,
}

/// `data` of `/get_msg_versions`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VersionsAnswer {
    /// Oldest first; the newest is the current content. A message never edited has one
    /// version; a recalled or deleted one none. At most 1000, and as many as fit in one bus
    /// message.
    pub versions: Vec<MsgVersion>,
    /// More follow: pass it as `after_version`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_after_version: Option<u32>,
}

// ---------------------------------------------------------------- public routes

/// Body of `/send_msg`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SendMsgRequest {
    /// Target conversation; the caller must be a member.
    #[schema(pattern = "^[A-Za-z0-9_.:@-]{1,128}$")]
    pub conversation_id: String,
    /// Message type (≥ 0; negative types are reserved for system messages).
    #[serde(rename = "type")]
    #[schema(minimum = 0)]
    pub msg_type: i32,
    /// Content, at most the configured limit in UTF-8 bytes (64 KiB by default).
    pub content: String,
    /// Idempotency key, scoped to the sender: a retry returns the original message.
    #[schema(pattern = "^[A-Za-z0-9_.:@-]{1,128}$")]
    #[serde(default)]
    pub client_msg_id: Option<String>,
}

/// Body of the routes that only name a conversation.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConversationRequest {
    /// The conversation.
    #[schema(pattern = "^[A-Za-z0-9_.:@-]{1,128}$")]
    pub conversation_id: String,
}

/// Body of `/get_conversation_detail`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DetailRequest {
    /// The conversation.
    #[schema(pattern = "^[A-Za-z0-9_.:@-]{1,128}$")]
    pub conversation_id: String,
    /// Members per page, 1–1000 (default 500); fewer when they would not fit in one bus message.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 1000)]
    pub members_limit: Option<u32>,
    /// `next_members_cursor` of the previous page.
    #[serde(default)]
    pub members_cursor: Option<String>,
}

/// Body of `/get_conversation_last_30_msg`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LastMsgsRequest {
    /// The conversation.
    #[schema(pattern = "^[A-Za-z0-9_.:@-]{1,128}$")]
    pub conversation_id: String,
    /// Newest first when true; ascending by default.
    #[serde(default)]
    pub desc: bool,
}

/// Body of `/get_joined_conversation`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GetJoinedRequest {
    /// Only archived (true) or only active (false) conversations; both when absent.
    #[serde(default)]
    pub archived: Option<bool>,
    /// Page size, 1–100 (default 50).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 100)]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    #[serde(default)]
    pub cursor: Option<String>,
}

/// Body of `/create_conversation`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateConversationRequest {
    /// Opaque small integer chosen by the business.
    pub conversation_type: i32,
    /// Whether other users may join by themselves (default false).
    #[serde(default)]
    pub joinable: bool,
    /// Other members; only accepted where `client_create_members` is enabled.
    #[serde(default)]
    pub members: Vec<String>,
    /// Title (at most `title_max_bytes`).
    #[serde(default)]
    pub title: Option<String>,
    /// Avatar (at most `avatar_max_bytes`).
    #[serde(default)]
    pub avatar: Option<String>,
    /// Free JSON object (at most `ext_max_bytes` as JSON).
    #[serde(default)]
    pub ext: Option<serde_json::Value>,
}

/// Body of `/update_conversation` (and, with `meta_role`, `/inner/update_conversation`):
/// the fields given change, the others stay; `""` (or `{}` for ext) clears one.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateConversationRequest {
    /// The conversation.
    #[schema(pattern = "^[A-Za-z0-9_.:@-]{1,128}$")]
    pub conversation_id: String,
    /// New title.
    #[serde(default)]
    pub title: Option<String>,
    /// New avatar.
    #[serde(default)]
    pub avatar: Option<String>,
    /// New ext (a JSON object).
    #[serde(default)]
    pub ext: Option<serde_json::Value>,
    /// /inner only: who may change the metadata besides the business system.
    #[serde(default)]
    pub meta_role: Option<MetaRole>,
    /// /inner only: whether members get each other's read receipts (`read` events).
    #[serde(default)]
    pub receipts: Option<bool>,
    /// /inner only: whether members get each other's presence (`presence` events).
    #[serde(default)]
    pub presence: Option<bool>,
}

/// `data` of `/update_conversation`: the metadata after the call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ConversationMeta {
    /// The conversation.
    #[schema(pattern = "^[A-Za-z0-9_.:@-]{1,128}$")]
    pub conversation_id: String,
    /// Title, if set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// Avatar, if set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avatar: Option<String>,
    /// ext, if set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ext: Option<serde_json::Value>,
    /// Who may change the metadata besides the business system.
    pub meta_role: MetaRole,
    /// Whether members get each other's read receipts.
    pub receipts: bool,
    /// Whether members get each other's presence.
    pub presence: bool,
    /// msg_id of the system message that recorded the change (absent when nothing changed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub msg_id: Option<u64>,
}

/// Body of `/set_conversation_mute`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MuteRequest {
    /// The conversation.
    #[schema(pattern = "^[A-Za-z0-9_.:@-]{1,128}$")]
    pub conversation_id: String,
    /// Muted or not.
    pub muted: bool,
}

/// `data` of `/set_conversation_mute`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MuteAnswer {
    /// The state after the call.
    pub muted: bool,
}

/// Body of `/mark_read`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MarkReadRequest {
    /// The conversation.
    #[schema(pattern = "^[A-Za-z0-9_.:@-]{1,128}$")]
    pub conversation_id: String,
    /// Everything up to and including this msg_id is read (never moves backwards).
    pub msg_id: u64,
}

/// Body of `/signal`: an ephemeral signal to the conversation's other members.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignalRequest {
    /// The conversation.
    #[schema(pattern = "^[A-Za-z0-9_.:@-]{1,128}$")]
    pub conversation_id: String,
    /// `typing`, `typing_stopped` or `custom`.
    pub kind: super::event::SignalKind,
    /// `custom` only: what it signals (at most `signal_max_bytes`).
    #[serde(default)]
    pub content: Option<String>,
}

/// `data` of `/signal`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SignalAnswer {
    /// Fanned out to every gateway (delivery is live only, to the members connected then).
    pub sent: bool,
}

/// Body of `/get_conversation_msg_by_range`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RangeRequest {
    /// The conversation.
    #[schema(pattern = "^[A-Za-z0-9_.:@-]{1,128}$")]
    pub conversation_id: String,
    /// First msg_id (inclusive).
    pub start_msg_id: u64,
    /// Last msg_id (inclusive); at most `range_max` messages are answered, from the start.
    pub end_msg_id: u64,
    /// Newest first when true.
    #[serde(default)]
    pub desc: bool,
}

/// Body of `/get_conversation_30msg_before_the_id` and `..._after_the_id`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AroundRequest {
    /// The conversation.
    #[schema(pattern = "^[A-Za-z0-9_.:@-]{1,128}$")]
    pub conversation_id: String,
    /// The pivot msg_id (excluded from the answer).
    pub msg_id: u64,
    /// Newest first when true.
    #[serde(default)]
    pub desc: bool,
}

/// `data` of `/check_joined_conversation` and `/join_conversation`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JoinedAnswer {
    /// Whether the caller is (now) a member.
    pub joined: bool,
}

/// `data` of `/leave_conversation`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LeftAnswer {
    /// Always true on success.
    pub left: bool,
}

/// One line of the caller's conversation list: everything a conversation list renders.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ConversationSummary {
    /// The conversation.
    #[schema(pattern = "^[A-Za-z0-9_.:@-]{1,128}$")]
    pub conversation_id: String,
    /// Opaque small integer chosen at creation.
    pub conversation_type: i32,
    /// Title, if set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// Avatar (a URL or an id of the business's choosing), if set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avatar: Option<String>,
    /// Free JSON object of the business's choosing, if set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ext: Option<serde_json::Value>,
    /// The member's role.
    pub role: Role,
    /// Newest msg_id (0 if none), revisions included.
    pub last_msg_id: u64,
    /// The newest message other than a revision, in its latest state (edited, recalled,
    /// deleted); null when there is none (or it was removed by retention).
    pub last_msg: Option<Message>,
    /// What the member has read.
    pub read_msg_id: u64,
    /// Messages after `read_msg_id` that count as unread (docs/api.md, "Unread"), exact.
    pub unread: u64,
    /// The member muted the conversation: unread still counts, badges may leave it out.
    pub muted: bool,
    /// Time of the last activity (ms): the newest message other than a revision, or creation.
    pub last_send_time: i64,
    /// Whether the conversation is archived.
    pub archived: bool,
}

/// `data` of `/get_joined_conversation`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JoinedConversations {
    /// Newest activity first.
    pub conversations: Vec<ConversationSummary>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// A member as `/get_conversation_detail` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MemberInfo {
    /// The member.
    #[schema(pattern = "^[A-Za-z0-9_.:@-]{1,128}$")]
    pub user_id: String,
    /// `owner`, `admin` or `member`.
    pub role: Role,
    /// msg_id of the system message that recorded the (latest) join.
    pub joined_msg_id: u64,
    /// What the member has read.
    pub read_msg_id: u64,
    /// When the member last went offline (ms; absent if never seen offline). Whether it is
    /// online now: `/inner/get_users_online` or `presence` events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<i64>,
}

/// A member's role, lowest first (so roles compare by rank).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Any other member.
    Member,
    /// Named by the business system (or a former owner).
    Admin,
    /// Created the conversation (or was named owner by the business system); at most one.
    Owner,
}

impl Role {
    /// The stored form.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::Admin => "admin",
            Role::Member => "member",
        }
    }

    /// The stored form read back (anything unknown is a plain member).
    pub fn parse(s: &str) -> Role {
        match s {
            "owner" => Role::Owner,
            "admin" => Role::Admin,
            _ => Role::Member,
        }
    }
}

/// Who may change a conversation's title, avatar and ext besides the business system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MetaRole {
    /// Only the business system (/inner): the default.
    None,
    /// Members with this role or a higher one.
    Member,
    /// Admins and the owner.
    Admin,
    /// The owner.
    Owner,
}

impl MetaRole {
    /// The stored form (`None` is stored as NULL).
    pub fn as_str(self) -> &'static str {
        match self {
            MetaRole::None => "none",
            MetaRole::Member => "member",
            MetaRole::Admin => "admin",
            MetaRole::Owner => "owner",
        }
    }

    /// The stored form read back.
    pub fn parse(s: Option<&str>) -> MetaRole {
        match s {
            Some("member") => MetaRole::Member,
            Some("admin") => MetaRole::Admin,
            Some("owner") => MetaRole::Owner,
            _ => MetaRole::None,
        }
    }

    /// The lowest role allowed, if members may change the metadata at all.
    pub fn lowest(self) -> Option<Role> {
        match self {
            MetaRole::None => None,
            MetaRole::Member => Some(Role::Member),
            MetaRole::Admin => Some(Role::Admin),
            MetaRole::Owner => Some(Role::Owner),
        }
    }
}

/// `data` of `/get_conversation_detail`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ConversationDetail {
    /// The conversation.
    #[schema(pattern = "^[A-Za-z0-9_.:@-]{1,128}$")]
    pub conversation_id: String,
    /// Opaque small integer chosen at creation.
    pub conversation_type: i32,
    /// Whether users may join by themselves.
    pub joinable: bool,
    /// Whether the conversation is archived.
    pub archived: bool,
    /// Title, if set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// Avatar, if set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avatar: Option<String>,
    /// Free JSON object, if set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ext: Option<serde_json::Value>,
    /// Who may change title, avatar and ext besides the business system.
    pub meta_role: MetaRole,
    /// Whether members get each other's read receipts (`read` events).
    pub receipts: bool,
    /// Whether members get each other's presence (`presence` events).
    pub presence: bool,
    /// Creation time (ms).
    pub created_at: i64,
    /// Newest msg_id.
    pub last_msg_id: u64,
    /// send_time of the newest message (ms).
    pub last_send_time: i64,
    /// Active members.
    pub member_count: u64,
    /// One page of the active members, by join order (`joined_msg_id`, then `user_id`).
    pub members: Vec<MemberInfo>,
    /// Pass as `members_cursor` for the next page of members; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_members_cursor: Option<String>,
}

/// `data` of `/create_conversation` and `/inner/create_conversation`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreatedConversation {
    /// The new (or, for an idempotent repeat, existing) conversation.
    #[schema(pattern = "^[A-Za-z0-9_.:@-]{1,128}$")]
    pub conversation_id: String,
    /// False when an identical conversation already existed.
    pub created: bool,
}

/// `data` of `/get_lastone_msgid`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MsgIdAnswer {
    /// Newest msg_id of the conversation (0 if it has none).
    pub msg_id: u64,
}

/// `data` of `/mark_read`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ReadAnswer {
    /// The caller's read position after the call.
    pub read_msg_id: u64,
    /// What still counts as unread after it.
    pub unread: u64,
}

/// `data` of the history routes.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MsgsAnswer {
    /// The messages, ascending unless `desc` was set.
    pub msgs: Vec<Message>,
}

/// `data` of `/get_conversation_lastone_msg`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LastOneAnswer {
    /// The newest message, or null for a conversation without messages.
    pub msg: Option<Message>,
}

// ---------------------------------------------------------------- inner routes

/// Body of `/inner/get_token`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GetTokenRequest {
    /// Whom the token is for.
    #[schema(pattern = "^[A-Za-z0-9_.:@-]{1,128}$")]
    pub user_id: String,
    /// The device family (`web`, `ios`, ...).
    #[schema(pattern = "^[A-Za-z0-9_.:@-]{1,32}$")]
    pub platform: String,
    /// Lifetime in seconds (default and maximum from config).
    #[serde(default)]
    #[schema(minimum = 1)]
    pub ttl_s: Option<u64>,
}

/// Body of `/notify_ticket` (empty: the caller is the token's user).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NotifyTicketRequest {}

/// `data` of `/notify_ticket`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct NotifyTicketAnswer {
    /// Put it in the /notify URL as `ticket=` instead of the token: valid once, for
    /// `notify_ticket_ttl_s` seconds.
    pub ticket: String,
    /// Until when the ticket may be used, ms since the epoch.
    pub expires_at: i64,
}

/// `data` of `/inner/get_token`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TokenAnswer {
    /// The JWT to give the client.
    pub token: String,
    /// Expiry, ms since the epoch.
    pub expires_at: i64,
}

/// Body of `/inner/create_conversation`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InnerCreateConversationRequest {
    /// Name it yourself (idempotent re-create), or leave it out for a generated UUIDv7.
    #[serde(default)]
    #[schema(pattern = "^[A-Za-z0-9_.:@-]{1,128}$")]
    pub conversation_id: Option<String>,
    /// Opaque small integer.
    pub conversation_type: i32,
    /// Whether users may join by themselves (default false).
    #[serde(default)]
    pub joinable: bool,
    /// Initial members.
    pub members: Vec<String>,
    /// Owner (added to the members if missing); none if absent.
    #[serde(default)]
    #[schema(pattern = "^[A-Za-z0-9_.:@-]{1,128}$")]
    pub owner: Option<String>,
    /// Title (at most `title_max_bytes`).
    #[serde(default)]
    pub title: Option<String>,
    /// Avatar (at most `avatar_max_bytes`).
    #[serde(default)]
    pub avatar: Option<String>,
    /// Free JSON object (at most `ext_max_bytes` as JSON).
    #[serde(default)]
    pub ext: Option<serde_json::Value>,
    /// Who may change the metadata besides the business system (default `none`).
    #[serde(default)]
    pub meta_role: Option<MetaRole>,
    /// Whether members get each other's read receipts (default true; off for large groups).
    #[serde(default)]
    pub receipts: Option<bool>,
    /// Whether members get each other's online/offline events (default false).
    #[serde(default)]
    pub presence: Option<bool>,
}

/// Body of `/inner/set_member_role`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetMemberRoleRequest {
    /// The conversation.
    #[schema(pattern = "^[A-Za-z0-9_.:@-]{1,128}$")]
    pub conversation_id: String,
    /// An active member.
    #[schema(pattern = "^[A-Za-z0-9_.:@-]{1,128}$")]
    pub user_id: String,
    /// The new role; a new owner makes the former owner an admin.
    pub role: Role,
}

/// `data` of `/inner/set_member_role`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RoleAnswer {
    /// Every role that changed (empty when the member had that role already).
    pub changed: Vec<MemberRole>,
}

/// A member's role.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MemberRole {
    /// The member.
    #[schema(pattern = "^[A-Za-z0-9_.:@-]{1,128}$")]
    pub user_id: String,
    /// Its role.
    pub role: Role,
}

/// Body of `/inner/get_user_conversations`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UserConversationsRequest {
    /// Whose conversations.
    #[schema(pattern = "^[A-Za-z0-9_.:@-]{1,128}$")]
    pub user_id: String,
    /// Only archived (true) or only active (false) conversations; both when absent.
    #[serde(default)]
    pub archived: Option<bool>,
    /// Page size, 1–100 (default 50).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 100)]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    #[serde(default)]
    pub cursor: Option<String>,
}

/// Body of `/inner/get_conversation_members`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConversationMembersRequest {
    /// The conversation.
    #[schema(pattern = "^[A-Za-z0-9_.:@-]{1,128}$")]
    pub conversation_id: String,
    /// Members per page, 1–1000 (default 500); fewer when they would not fit in one bus message.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    #[serde(default)]
    pub cursor: Option<String>,
}

/// `data` of `/inner/get_conversation_members`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MembersPage {
    /// Active members.
    pub member_count: u64,
    /// One page, by join order (`joined_msg_id`, then `user_id`).
    pub members: Vec<MemberInfo>,
    /// Pass as `cursor` for the next page; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// Body of `/inner/join_conversation` and `/inner/kickout_conversation`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InnerMembersRequest {
    /// The conversation.
    #[schema(pattern = "^[A-Za-z0-9_.:@-]{1,128}$")]
    pub conversation_id: String,
    /// Users to add or remove (1–1000).
    pub user_ids: Vec<String>,
}

/// `data` of `/inner/join_conversation`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JoinedUsers {
    /// Users that are members after the call (newly joined or already there).
    pub joined: Vec<String>,
}

/// `data` of `/inner/kickout_conversation`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct KickedUsers {
    /// Users that were members and are removed now.
    pub kicked: Vec<String>,
}

/// Body of `/inner/set_archive_conversations`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetArchiveRequest {
    /// Conversations to change (1–1000).
    pub conversation_ids: Vec<String>,
    /// New state.
    pub archived: bool,
}

/// `data` of `/inner/set_archive_conversations`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ArchiveAnswer {
    /// Conversations whose state changed.
    pub updated: Vec<String>,
}

/// Body of `/inner/send_msg`, and one item of `/inner/send_msg_batch`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InnerSendMsgRequest {
    /// Target conversation.
    #[schema(pattern = "^[A-Za-z0-9_.:@-]{1,128}$")]
    pub conversation_id: String,
    /// A member's user id, or "" for a system message.
    #[schema(pattern = "^([A-Za-z0-9_.:@-]{1,128})?$")]
    pub from: String,
    /// Message type (≥ 0).
    #[serde(rename = "type")]
    #[schema(minimum = 0)]
    pub msg_type: i32,
    /// Content.
    pub content: String,
    /// Idempotency key, scoped to `from`.
    #[schema(pattern = "^[A-Za-z0-9_.:@-]{1,128}$")]
    #[serde(default)]
    pub client_msg_id: Option<String>,
    /// false: the message never counts as unread (a business notice). Default true.
    #[serde(default = "yes")]
    pub count_unread: bool,
}

fn yes() -> bool {
    true
}

/// Body of `/inner/send_msg_batch`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InnerSendBatchRequest {
    /// 1–`send_batch_max` messages, stored in order.
    pub msgs: Vec<InnerSendMsgRequest>,
}

/// One result of `/inner/send_msg_batch`: the envelope of that item.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BatchItemResult {
    /// 0 on success, else the error code.
    pub code: u32,
    /// The stored message on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Message>,
    /// Human text on failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `data` of `/inner/send_msg_batch`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BatchAnswer {
    /// One result per item, in order.
    pub results: Vec<BatchItemResult>,
}

/// Body of `/inner/get_users_online`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UsersOnlineRequest {
    /// Users to look up (1–1000).
    pub user_ids: Vec<String>,
}

/// One user of `/inner/get_users_online`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct UserOnline {
    /// The user.
    #[schema(pattern = "^[A-Za-z0-9_.:@-]{1,128}$")]
    pub user_id: String,
    /// At least one open /notify connection on some gateway.
    pub online: bool,
    /// Platforms with an open connection, sorted.
    pub platforms: Vec<String>,
    /// Open connections across all gateways.
    pub connections: u32,
    /// Offline: when it last went offline (ms), if ever seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<i64>,
}

/// `data` of `/inner/get_users_online`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UsersOnlineAnswer {
    /// In the order asked.
    pub users: Vec<UserOnline>,
    /// How many gateway nodes answered.
    pub nodes: u32,
}

/// Body of `/inner/kick_user`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KickUserRequest {
    /// The user.
    #[schema(pattern = "^[A-Za-z0-9_.:@-]{1,128}$")]
    pub user_id: String,
    /// Only this platform; every platform when absent.
    #[serde(default)]
    pub platform: Option<String>,
}

/// `data` of `/inner/kick_user`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct KickUserAnswer {
    /// Connections closed across all gateways that answered.
    pub closed_connections: u32,
    /// Tokens issued before this time (ms) are rejected from now on.
    pub revoked_before: i64,
    /// Gateway nodes seen alive when the kick went out (each was asked).
    pub nodes_asked: u32,
    /// Gateway nodes that confirmed. A node that did not (cut off, paused) closes the user's
    /// connections once it reads the revocation from the store: within `revocation_poll_s`
    /// of being reachable again.
    pub nodes_confirmed: u32,
}

// ---------------------------------------------------------------- envelope

/// The failure envelope: `{"code":N,"error":"..."}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// Stable numeric code (docs/api.md).
    pub code: u32,
    /// Human text.
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_json_shape_is_stable() {
        let m = Message {
            conversation_id: "c1".into(),
            msg_id: 7,
            from: "alice".into(),
            msg_type: 1,
            content: "hi".into(),
            send_time: 1_700_000_000_000,
            ..Message::default()
        };
        let v = serde_json::to_value(&m).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"conversation_id":"c1","msg_id":7,"from":"alice","type":1,
                "content":"hi","send_time":1_700_000_000_000i64})
        );
        let revised = Message { edited_at: Some(5), recalled: true, deleted: true, ..m };
        let v = serde_json::to_value(&revised).unwrap();
        assert_eq!(
            (v["edited_at"].as_i64(), v["recalled"].as_bool(), v["deleted"].as_bool()),
            (Some(5), Some(true), Some(true))
        );
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let err = serde_json::from_str::<SendMsgRequest>(
            r#"{"conversation_id":"c","type":1,"content":"x","from":"mallory"}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("unknown field `from`"), "{err}");
    }

    #[test]
    fn optional_fields_default() {
        let r: GetJoinedRequest = serde_json::from_str("{}").unwrap();
        assert!(r.archived.is_none() && r.limit.is_none() && r.cursor.is_none());
        let r: LastMsgsRequest = serde_json::from_str(r#"{"conversation_id":"c"}"#).unwrap();
        assert!(!r.desc);
    }
}
