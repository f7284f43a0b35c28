//! System messages: the negative message types the server writes itself.
//!
//! A membership change (create, join, leave, kick), an archive toggle, a revision of a message
//! (edit, recall, delete), a change of the conversation's metadata or of a member's role is
//! stored as a system message in the same transaction as the change, so that it has a place
//! in the conversation's msg_id order and reaches clients live and on resume like any message.
//! Whether one counts as unread is configured per type (`unread_system_types`; none does by
//! default), and the delivery path reads membership changes from it, in order.

use serde::{Deserialize, Serialize};

use super::api::Message;

/// Conversation created; content: [`Created`].
pub const CREATED: i32 = -1;
/// Members joined; content: [`Users`].
pub const JOINED: i32 = -2;
/// A member left; content: [`Users`].
pub const LEFT: i32 = -3;
/// Members kicked; content: [`Users`].
pub const KICKED: i32 = -4;
/// Archive state changed; content: [`Archived`].
pub const ARCHIVED: i32 = -5;
/// A message was edited, recalled or deleted; content: [`Revised`].
pub const REVISED: i32 = -6;
/// The conversation's title, avatar, ext or `meta_role` changed; content: [`MetaChanged`].
pub const META_CHANGED: i32 = -7;
/// Members' roles changed; content: [`RolesChanged`].
pub const ROLES_CHANGED: i32 = -8;

/// Every system type, for docs and checks.
pub const ALL: [i32; 8] = [CREATED, JOINED, LEFT, KICKED, ARCHIVED, REVISED, META_CHANGED, ROLES_CHANGED];

/// What a revision does to a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// New content; the earlier versions are kept (`/get_msg_versions`).
    Edit,
    /// Withdrawn by its sender: content and versions removed, shown as recalled.
    Recall,
    /// Removed: content and versions removed, the msg_id stays as a tombstone clients hide.
    Delete,
    /// A streaming message finished: its final content.
    Finish,
    /// A streaming message cancelled (by its sender, or past `stream_timeout_s`): deleted.
    Cancel,
}

impl Action {
    /// The wire name.
    pub fn name(self) -> &'static str {
        match self {
            Action::Edit => "edit",
            Action::Recall => "recall",
            Action::Delete => "delete",
            Action::Finish => "finish",
            Action::Cancel => "cancel",
        }
    }
}

/// Content of a [`REVISED`] message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revised {
    /// The message revised.
    pub msg_id: u64,
    /// What was done.
    pub action: Action,
    /// The new content (edit only; absent once the message has been recalled or deleted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// Who did it: the sender's user id, or "" for the business system.
    pub by: String,
}

/// Content of a [`META_CHANGED`] message: the fields that changed, with their new values
/// (`""` or `{}` = cleared).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaChanged {
    /// New title.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// New avatar.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avatar: Option<String>,
    /// New ext (a JSON object).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ext: Option<serde_json::Value>,
    /// New lowest role that may change the metadata (`none` = only the business system).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta_role: Option<String>,
    /// Read receipts turned on or off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receipts: Option<bool>,
    /// Presence events turned on or off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence: Option<bool>,
    /// Who changed it: a member's user id, or "" for the business system.
    pub by: String,
}

/// One member's new role.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleChange {
    /// The member.
    pub user_id: String,
    /// `owner`, `admin` or `member`.
    pub role: String,
}

/// Content of a [`ROLES_CHANGED`] message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolesChanged {
    /// The new roles (naming a new owner also lists the former owner, now `admin`).
    pub roles: Vec<RoleChange>,
}

/// Content of a [`CREATED`] message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Created {
    /// The conversation's type.
    pub conversation_type: i32,
    /// The owner, if any.
    pub owner: Option<String>,
    /// Every initial member (owner included).
    pub user_ids: Vec<String>,
    /// Title given at creation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// Avatar given at creation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avatar: Option<String>,
    /// ext given at creation (a JSON object).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ext: Option<serde_json::Value>,
    /// Lowest role that may change the metadata, if members may.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta_role: Option<String>,
    /// `false` when read receipts are off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receipts: Option<bool>,
    /// `true` when presence events are on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence: Option<bool>,
}

/// Content of [`JOINED`], [`LEFT`] and [`KICKED`] messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Users {
    /// The users concerned.
    pub user_ids: Vec<String>,
}

/// Content of an [`ARCHIVED`] message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Archived {
    /// The new state.
    pub archived: bool,
}

/// What a message changes in membership, read back from a system message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MembershipChange {
    /// These users are members from this message on (it is delivered to them).
    Joined(Vec<String>),
    /// These users left by themselves; this message is the last they receive.
    Left(Vec<String>),
    /// These users were removed; this message is the last they receive.
    Kicked(Vec<String>),
}

impl MembershipChange {
    /// The membership change a message records, if any.
    pub fn of(message: &Message) -> Option<MembershipChange> {
        if !message.from.is_empty() {
            return None;
        }
        match message.msg_type {
            CREATED => {
                serde_json::from_str::<Created>(&message.content).ok().map(|c| MembershipChange::Joined(c.user_ids))
            }
            JOINED => users(message).map(MembershipChange::Joined),
            LEFT => users(message).map(MembershipChange::Left),
            KICKED => users(message).map(MembershipChange::Kicked),
            _ => None,
        }
    }
}

fn users(message: &Message) -> Option<Vec<String>> {
    serde_json::from_str::<Users>(&message.content).ok().map(|u| u.user_ids)
}

/// Serializes system content (these types cannot fail to serialize).
pub fn content<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(msg_type: i32, from: &str, content: String) -> Message {
        Message { conversation_id: "c".into(), msg_id: 1, from: from.into(), msg_type, content, ..Message::default() }
    }

    #[test]
    fn reads_membership_changes_back() {
        let created = content(&Created {
            conversation_type: 1,
            owner: Some("a".into()),
            user_ids: vec!["a".into(), "b".into()],
            title: None,
            avatar: None,
            ext: None,
            meta_role: None,
            receipts: None,
            presence: None,
        });
        assert!(!created.contains("title"), "absent metadata is not written: {created}");
        assert_eq!(
            MembershipChange::of(&msg(CREATED, "", created)),
            Some(MembershipChange::Joined(vec!["a".into(), "b".into()]))
        );
        let kicked = content(&Users { user_ids: vec!["b".into()] });
        assert_eq!(
            MembershipChange::of(&msg(KICKED, "", kicked.clone())),
            Some(MembershipChange::Kicked(vec!["b".into()]))
        );
        // A user message with the same shape is not a membership change.
        assert_eq!(MembershipChange::of(&msg(KICKED, "mallory", kicked)), None);
        assert_eq!(MembershipChange::of(&msg(1, "", "{}".into())), None);
    }
}
