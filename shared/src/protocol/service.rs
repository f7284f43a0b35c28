//! Requests between the gateway and the services, one type per operation.
//!
//! Each request type names its bus subject and its reply type through [`Call`]. The
//! conversation service serves `quickim.conv.*`, the message service `quickim.msg.*`; a reply
//! is `Result<Reply, ServiceError>` as JSON. Identity is always explicit (`user_id`): the
//! gateway fills it from the token, never from the client's body.

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use super::api::{
    ArchiveAnswer, ConversationDetail, ConversationMeta, CreatedConversation, JoinedConversations, JoinedUsers,
    KickedUsers, LeftAnswer, MembersPage, Message, MetaRole, MuteAnswer, ReadAnswer, Role, RoleAnswer,
    UpdateConversationRequest, VersionsAnswer,
};
use super::event::LogEntry;
use super::system::Action;
use crate::error::ServiceError;
use crate::position::Position;

/// A request with a fixed subject and reply type.
pub trait Call: Serialize + DeserializeOwned + Send + 'static {
    /// Bus subject the owning service listens on.
    const SUBJECT: &'static str;
    /// What a successful call answers.
    type Reply: Serialize + DeserializeOwned + Send + 'static;
}

/// What a service answers on the bus.
pub type Reply<T> = Result<T, ServiceError>;

/// Subject prefix (wildcard) of the conversation service.
pub const CONVERSATION_SUBJECTS: &str = "quickim.conv.*";
/// Queue group of the conversation service (one instance answers each request).
pub const CONVERSATION_QUEUE: &str = "quickim-conversation";
/// Subject prefix (wildcard) of the message service.
pub const MESSAGE_SUBJECTS: &str = "quickim.msg.*";
/// Queue group of the message service.
pub const MESSAGE_QUEUE: &str = "quickim-message";

macro_rules! call {
    ($ty:ty, $subject:literal, $reply:ty) => {
        impl Call for $ty {
            const SUBJECT: &'static str = $subject;
            type Reply = $reply;
        }
    };
}

// ---------------------------------------------------------------- conversation service

/// Create a conversation (client: `owner` is the caller; inner: as given).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateConversation {
    /// Given by the business system, or None for a generated UUIDv7.
    pub conversation_id: Option<String>,
    /// Opaque small integer.
    pub conversation_type: i32,
    /// Whether users may join by themselves.
    pub joinable: bool,
    /// Initial members (the owner is added if missing).
    pub members: Vec<String>,
    /// Owner, if any.
    pub owner: Option<String>,
    /// Title.
    #[serde(default)]
    pub title: Option<String>,
    /// Avatar.
    #[serde(default)]
    pub avatar: Option<String>,
    /// Free JSON object.
    #[serde(default)]
    pub ext: Option<serde_json::Value>,
    /// Who may change the metadata besides the business system.
    #[serde(default)]
    pub meta_role: Option<MetaRole>,
    /// Read receipts on (default) or off.
    #[serde(default)]
    pub receipts: Option<bool>,
    /// Presence events on or off (default).
    #[serde(default)]
    pub presence: Option<bool>,
}
call!(CreateConversation, "quickim.conv.create", CreatedConversation);

/// Change a conversation's title, avatar, ext (and, from /inner, `meta_role`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UpdateConversation {
    /// The member asking (its role is checked against the conversation's `meta_role`), or
    /// None for the business system.
    pub by: Option<String>,
    /// What to change.
    pub changes: UpdateConversationRequest,
}
call!(UpdateConversation, "quickim.conv.update", ConversationMeta);

/// Set a member's role (inner).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SetMemberRole {
    /// The conversation.
    pub conversation_id: String,
    /// The member.
    pub user_id: String,
    /// The new role.
    pub role: Role,
}
call!(SetMemberRole, "quickim.conv.set_role", RoleAnswer);

/// Mute or unmute a conversation for one member.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SetMute {
    /// The member.
    pub user_id: String,
    /// The conversation.
    pub conversation_id: String,
    /// New state.
    pub muted: bool,
}
call!(SetMute, "quickim.conv.set_mute", MuteAnswer);

/// One page of a conversation's members (inner: no membership check).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ListMembers {
    /// The conversation.
    pub conversation_id: String,
    /// Members per page (already checked by the gateway).
    pub limit: u32,
    /// Opaque cursor.
    #[serde(default)]
    pub cursor: Option<String>,
}
call!(ListMembers, "quickim.conv.members", MembersPage);

/// Is `user_id` an active member of the conversation?
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckJoined {
    /// The caller.
    pub user_id: String,
    /// The conversation.
    pub conversation_id: String,
}
call!(CheckJoined, "quickim.conv.check_joined", bool);

/// One page of the caller's conversations.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ListJoined {
    /// The caller.
    pub user_id: String,
    /// Filter on the archived flag.
    pub archived: Option<bool>,
    /// Page size (already clamped by the gateway).
    pub limit: u32,
    /// Opaque page cursor.
    pub cursor: Option<String>,
}
call!(ListJoined, "quickim.conv.list_joined", JoinedConversations);

/// A conversation with one page of its members (caller must be a member).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GetDetail {
    /// The caller.
    pub user_id: String,
    /// The conversation.
    pub conversation_id: String,
    /// Members per page (already checked by the gateway).
    #[serde(default = "default_members")]
    pub members_limit: u32,
    /// Opaque cursor of the members page.
    #[serde(default)]
    pub members_cursor: Option<String>,
}

fn default_members() -> u32 {
    500
}
call!(GetDetail, "quickim.conv.detail", ConversationDetail);

/// Add members (inner), or self-join a joinable conversation (client).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Join {
    /// The conversation.
    pub conversation_id: String,
    /// Users to add.
    pub user_ids: Vec<String>,
    /// True for a client joining by itself: only allowed on joinable conversations.
    pub self_join: bool,
}
call!(Join, "quickim.conv.join", JoinedUsers);

/// The caller leaves.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Leave {
    /// The caller.
    pub user_id: String,
    /// The conversation.
    pub conversation_id: String,
}
call!(Leave, "quickim.conv.leave", LeftAnswer);

/// Remove members (inner).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Kick {
    /// The conversation.
    pub conversation_id: String,
    /// Users to remove.
    pub user_ids: Vec<String>,
}
call!(Kick, "quickim.conv.kick", KickedUsers);

/// Archive or unarchive conversations (inner).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SetArchived {
    /// The conversations.
    pub conversation_ids: Vec<String>,
    /// New state.
    pub archived: bool,
}
call!(SetArchived, "quickim.conv.set_archived", ArchiveAnswer);

/// Move the caller's read position forward.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MarkRead {
    /// The caller.
    pub user_id: String,
    /// The conversation.
    pub conversation_id: String,
    /// New read position (clamped to the newest message; never moves back).
    pub msg_id: u64,
}
call!(MarkRead, "quickim.conv.mark_read", ReadAnswer);

/// The read positions that moved (by a mark_read) at or after `since_ms` in the user's
/// conversations with receipts on, the user's own included: what a resuming client missed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GetReceipts {
    /// The resuming user.
    pub user_id: String,
    /// Moved at or after this time (ms).
    pub since_ms: i64,
    /// Continue after this (conversation, member) of the previous page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<(String, String)>,
}
call!(GetReceipts, "quickim.conv.receipts", ReceiptsPage);

/// Open a streaming message: stored empty (its msg_id taken now), its text to come.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OpenStream {
    /// Client (a member, checked) or inner.
    pub origin: Origin,
    /// The conversation.
    pub conversation_id: String,
    /// The sender ("" for the business system).
    pub from: String,
    /// Message type (≥ 0).
    pub msg_type: i32,
}
call!(OpenStream, "quickim.msg.open_stream", Message);

/// Who may append to a stream: its sender, while it is open.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GetStream {
    /// The conversation.
    pub conversation_id: String,
    /// The message.
    pub msg_id: u64,
}
call!(GetStream, "quickim.msg.stream", StreamInfo);

/// A message's stream state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamInfo {
    /// Its sender.
    pub from: String,
    /// Still streaming.
    pub open: bool,
}

/// The user's conversations with presence on, a page at a time (for a presence event).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PresenceConversations {
    /// The user.
    pub user_id: String,
    /// Continue after this conversation id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
}
call!(PresenceConversations, "quickim.conv.presence_conversations", ConversationIdsPage);

/// A page of conversation ids, in id order, bounded in count and bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConversationIdsPage {
    /// The ids.
    pub conversation_ids: Vec<String>,
    /// More follow: ask again after the last one.
    #[serde(default)]
    pub more: bool,
}

/// Record when users came online (a first connection on a node) or went offline (the last
/// connection on any node closed): a gateway's changes of a moment, in one write.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecordPresence {
    /// The changes, in the order they happened (at most 1000, as many as fit in one bus
    /// message).
    pub changes: Vec<PresenceChange>,
}
call!(RecordPresence, "quickim.conv.record_presence", ());

/// A user came online or went offline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceChange {
    /// The user.
    pub user_id: String,
    /// It came online (else it went offline).
    #[serde(default)]
    pub online: bool,
    /// When (ms).
    pub at_ms: i64,
}

/// When each of the users last went offline (users never seen offline are left out).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GetLastSeen {
    /// The users (at most 1000).
    pub user_ids: Vec<String>,
}
call!(GetLastSeen, "quickim.conv.last_seen", Vec<(String, i64)>);

/// A member's read position in a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// The conversation.
    pub conversation_id: String,
    /// The member.
    pub user_id: String,
    /// Its read position.
    pub read_msg_id: u64,
}

/// A page of [`Receipt`]s, ordered by (conversation, member), bounded in count and bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiptsPage {
    /// The receipts.
    pub receipts: Vec<Receipt>,
    /// More follow: ask again after the last one.
    #[serde(default)]
    pub more: bool,
}

/// Revoke a user's tokens issued before `before_ms` (optionally one platform only).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RevokeTokens {
    /// The user.
    pub user_id: String,
    /// One platform, or all.
    pub platform: Option<String>,
    /// Tokens issued before this time (ms) are rejected.
    pub before_ms: i64,
}
call!(RevokeTokens, "quickim.conv.revoke_tokens", ());

/// One page of the revocations made at or after `since_ms`, in (before_ms, user_id,
/// platform) order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ListRevocations {
    /// Revocations older than this (ms) are not asked for (at start: their tokens have
    /// expired; later: they were read before).
    pub since_ms: i64,
    /// The page starts after this revocation (the last of the previous page).
    #[serde(default)]
    pub after: Option<Revocation>,
    /// Most revocations in the page (the service also bounds it by bytes).
    #[serde(default = "default_page")]
    pub limit: u32,
}
call!(ListRevocations, "quickim.conv.revocations", RevocationPage);

fn default_page() -> u32 {
    1000
}

/// Answer to [`ListRevocations`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RevocationPage {
    /// The revocations, in (before_ms, user_id, platform) order.
    pub revocations: Vec<Revocation>,
    /// More follow: ask again after the last one.
    pub more: bool,
}

/// Uses up a /notify ticket: answers true the first time a ticket id is presented, false
/// after (on any gateway).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConsumeTicket {
    /// The ticket's random id.
    pub ticket_id: String,
    /// When the ticket expires (ms): its record may go after.
    pub expires_ms: i64,
}
call!(ConsumeTicket, "quickim.conv.consume_ticket", bool);

/// One token revocation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// The user.
    pub user_id: String,
    /// One platform, or all ("" in storage).
    pub platform: Option<String>,
    /// Tokens issued before this time (ms) are rejected.
    pub before_ms: i64,
}

/// One page of the user's memberships (in conversation_id order) with the log heads, read
/// in one snapshot (for /notify sessions). A user in many conversations takes several
/// pages, each its own snapshot: the hub applies the membership changes it saw after the
/// first page's heads on top of them all.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GetMemberships {
    /// The user.
    pub user_id: String,
    /// The page starts after this conversation (the last of the previous page).
    #[serde(default)]
    pub after: Option<String>,
}
call!(GetMemberships, "quickim.conv.memberships", Memberships);

/// A consistent snapshot of one page of one user's memberships.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Memberships {
    /// Log heads (one offset per partition) at the snapshot.
    pub heads: Position,
    /// Active memberships, in conversation_id order.
    pub conversations: Vec<MembershipRow>,
    /// More follow: ask again after the last conversation.
    #[serde(default)]
    pub more: bool,
}

/// One active membership.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembershipRow {
    /// The conversation.
    pub conversation_id: String,
    /// msg_id from which the user receives the conversation.
    pub joined_msg_id: u64,
}

// ---------------------------------------------------------------- message service

/// Who is sending, which decides the rules that apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// A client through the public API: no archived conversations.
    Client,
    /// The business system through /inner: may send system messages (`from` empty).
    Inner,
}

/// Store one message.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SendMessage {
    /// Client or inner.
    pub origin: Origin,
    /// Target conversation.
    pub conversation_id: String,
    /// Sender ("" for a system message from /inner).
    pub from: String,
    /// Message type (≥ 0).
    pub msg_type: i32,
    /// Content.
    pub content: String,
    /// Idempotency key, scoped to `from`.
    pub client_msg_id: Option<String>,
    /// false: never counts as unread (a business notice; /inner only).
    #[serde(default = "counts_by_default", skip_serializing_if = "is_true")]
    pub count_unread: bool,
}
call!(SendMessage, "quickim.msg.send", Message);

fn counts_by_default() -> bool {
    true
}

fn is_true(v: &bool) -> bool {
    *v
}

/// Edit, recall or delete a message.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReviseMessage {
    /// Client (only its own messages, within the configured windows) or inner (any
    /// message).
    pub origin: Origin,
    /// The caller (a client's user id; "" for the business system).
    pub by: String,
    /// The conversation.
    pub conversation_id: String,
    /// The message.
    pub msg_id: u64,
    /// What to do.
    pub action: Action,
    /// The new content (edit only).
    #[serde(default)]
    pub content: Option<String>,
}
call!(ReviseMessage, "quickim.msg.revise", Message);

/// The versions of a message (a client must be an active member).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GetVersions {
    /// The caller, or None for the business system.
    pub user_id: Option<String>,
    /// The conversation.
    pub conversation_id: String,
    /// The message.
    pub msg_id: u64,
    /// Versions after this one (paging).
    #[serde(default)]
    pub after_version: Option<u32>,
}
call!(GetVersions, "quickim.msg.versions", VersionsAnswer);

/// Store several messages, each with its own result, in order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SendBatch {
    /// The messages.
    pub items: Vec<SendMessage>,
}
call!(SendBatch, "quickim.msg.send_batch", Vec<Reply<Message>>);

/// Sends that reached one gateway at about the same time, carried by one bus request: each is
/// stored as if it had come alone (with its own result, in the message service's group commit
/// like any other send), and each keeps its own trace.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SendEach {
    /// At most [`SEND_EACH_MAX`] sends.
    pub items: Vec<TracedSend>,
}
call!(SendEach, "quickim.msg.send_each", Vec<Reply<Message>>);

/// Most sends one [`SendEach`] carries.
pub const SEND_EACH_MAX: usize = 256;

/// One send of a [`SendEach`], with the trace context of its own bus request span.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TracedSend {
    /// The send.
    pub send: SendMessage,
    /// W3C trace-context headers (`traceparent`, `tracestate`); empty when not traced.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trace: Vec<(String, String)>,
}

/// Which messages a history read wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum HistoryQuery {
    /// start..=end, at most `range_max` from `start`.
    Range {
        /// First msg_id.
        start: u64,
        /// Last msg_id.
        end: u64,
    },
    /// Up to 30 messages with msg_id < the given one (the nearest ones).
    Before {
        /// Pivot.
        msg_id: u64,
    },
    /// Up to 30 messages with msg_id > the given one (the nearest ones).
    After {
        /// Pivot.
        msg_id: u64,
    },
    /// The newest 30 messages.
    Last,
    /// The newest message.
    LastOne,
}

/// Read history (caller must be an active member).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct History {
    /// The caller.
    pub user_id: String,
    /// The conversation.
    pub conversation_id: String,
    /// Which messages.
    pub query: HistoryQuery,
    /// Newest first.
    pub desc: bool,
}
call!(History, "quickim.msg.history", Vec<Message>);

/// Newest msg_id of a conversation (caller must be an active member).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LastMsgId {
    /// The caller.
    pub user_id: String,
    /// The conversation.
    pub conversation_id: String,
}
call!(LastMsgId, "quickim.msg.last_msg_id", u64);

/// Current log heads, one offset per partition.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GetHeads {}
call!(GetHeads, "quickim.msg.heads", LogHeads);

/// The log's position: one head offset per partition, and the database's epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogHeads {
    /// The database's epoch (a random number fixed at creation, carried in cursors).
    pub epoch: u32,
    /// Newest offset of each partition (index = partition).
    pub heads: Position,
}

/// Entries of one partition with `after < offset <= upto` (gap fill), in offset order, at
/// most `limit` and as many as fit in one bus message: an answer that stops before `upto`
/// is a page; ask again after its last entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReadLog {
    /// Partition.
    pub part: u16,
    /// Exclusive lower bound.
    pub after: u64,
    /// Inclusive upper bound.
    pub upto: u64,
    /// Most entries to answer.
    pub limit: u32,
}
call!(ReadLog, "quickim.msg.read_log", Vec<LogEntry>);

/// One page of what a user missed between two log positions (resume).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Replay {
    /// The user.
    pub user_id: String,
    /// Exclusive lower bounds, one per partition (the client's cursor).
    pub after: Position,
    /// Inclusive upper bounds, one per partition.
    pub upto: Position,
    /// Most entries in this page.
    pub limit: u32,
}
call!(Replay, "quickim.msg.replay", ReplayPage);

/// Answer to [`Replay`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ReplayPage {
    /// Entries in (partition, offset) order. The next page starts after the last one: for
    /// its partition at its offset, for the partitions before it at `upto`.
    pub entries: Vec<LogEntry>,
    /// More entries follow.
    pub more: bool,
    /// `after` is older than the retention window (or not of this database's shape):
    /// nothing is answered; the client must resync.
    pub expired: bool,
}
