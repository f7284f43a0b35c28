//! System messages: the negative message types the server writes itself.
//!
//! A membership change (create, join, leave, kick) or an archive toggle is stored as a system
//! message in the same transaction as the change, so that it has a place in the
//! conversation's msg_id order. Clients see it like any message (it counts as unread), and the
//! delivery path reads membership changes from it, in order.

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

/// Content of a [`CREATED`] message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Created {
    /// The conversation's type.
    pub conversation_type: i32,
    /// The owner, if any.
    pub owner: Option<String>,
    /// Every initial member (owner included).
    pub user_ids: Vec<String>,
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
        Message {
            conversation_id: "c".into(),
            msg_id: 1,
            from: from.into(),
            msg_type,
            content,
            client_msg_id: None,
            send_time: 0,
        }
    }

    #[test]
    fn reads_membership_changes_back() {
        let created =
            content(&Created { conversation_type: 1, owner: Some("a".into()), user_ids: vec!["a".into(), "b".into()] });
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
