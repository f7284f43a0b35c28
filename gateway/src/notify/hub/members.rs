//! The membership index: which users on this node get which conversation, from which
//! msg_id. One entry per user, shared by that user's connections. A user's first connection
//! installs a snapshot of its memberships read from the store; after that the log itself keeps
//! it current (a JOINED entry subscribes, a LEFT/KICKED entry unsubscribes once delivered).
//! Changes seen while the snapshot is in flight are kept and applied on top of it when they
//! are newer than its first page; a snapshot read ahead of the hub waits until the hub has
//! reached its heads (see the hub's module docs).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quickim_shared::position::Position;
use quickim_shared::protocol::service::MembershipRow;

use super::SessionId;

/// How long a user's memberships are kept after its last connection closed (so that the
/// next long-poll of the same user needs no snapshot).
const LINGER: Duration = Duration::from_secs(30);
/// Most membership changes kept for a user whose snapshot is in flight (past it, the
/// snapshot is read again).
const MAX_PENDING: usize = 10_000;

/// A membership change read from the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Change {
    /// The user gets the conversation from this message on.
    Join,
    /// The user gets nothing after this message.
    Leave,
}

/// A user's memberships as read from the store, page by page.
#[derive(Debug)]
pub(super) struct Snapshot {
    /// The log heads of the first page: changes after them are applied on top.
    pub first: Position,
    /// The log heads of the last page: the snapshot is installed once the hub is there.
    pub last: Position,
    /// The active memberships.
    pub conversations: Vec<MembershipRow>,
}

/// What became of a snapshot.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Installed {
    /// In place: these connections go live.
    Now(Vec<SessionId>),
    /// Read ahead of the hub: installed once the hub has reached it.
    Later,
    /// Could not be used (unreadable, or too many changes meanwhile): these connections
    /// are told to retry.
    Failed(Vec<SessionId>),
    /// Nobody waits for it any more.
    Nobody,
}

#[derive(Debug)]
struct PendingChange {
    part: usize,
    offset: u64,
    conversation: Arc<str>,
    msg_id: u64,
    change: Change,
}

#[derive(Default)]
struct User {
    /// Conversation → the msg_id from which the user gets it.
    conversations: HashMap<Arc<str>, u64>,
    sessions: Vec<SessionId>,
    installed: bool,
    installing: bool,
    pending: Vec<PendingChange>,
    /// More changes came than `pending` keeps: the snapshot must be read again.
    pending_overflow: bool,
    /// A snapshot read ahead of the hub, waiting for the hub to reach its heads.
    deferred: Option<Snapshot>,
    idle_since: Option<Instant>,
}

/// See the module docs.
#[derive(Default)]
pub(super) struct Members {
    users: HashMap<Arc<str>, User>,
    by_conversation: HashMap<Arc<str>, HashSet<Arc<str>>>,
    /// Users whose snapshot waits for the hub to reach its heads.
    deferred: HashSet<Arc<str>>,
}

/// How a connection of a user starts.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Joined {
    /// The user's memberships are installed: live at once.
    Installed,
    /// Wait; `fetch`: read the user's memberships (the first connection asking).
    Waiting { fetch: bool },
}

impl Members {
    /// The interned name of `user` (one allocation per user, however many connections).
    pub fn key(&self, user: &str) -> Arc<str> {
        match self.users.get_key_value(user) {
            Some((k, _)) => k.clone(),
            None => Arc::from(user),
        }
    }

    /// The interned name of a conversation.
    pub fn conversation(&self, conversation: &str) -> Arc<str> {
        match self.by_conversation.get_key_value(conversation) {
            Some((k, _)) => k.clone(),
            None => Arc::from(conversation),
        }
    }

    /// A connection of `user` opens.
    pub fn connect(&mut self, user: &Arc<str>, id: SessionId) -> Joined {
        let u = self.users.entry(user.clone()).or_default();
        u.sessions.push(id);
        u.idle_since = None;
        if u.installed {
            return Joined::Installed;
        }
        let fetch = !u.installing;
        u.installing = true;
        Joined::Waiting { fetch }
    }

    /// A connection of `user` closed.
    pub fn disconnect(&mut self, user: &Arc<str>, id: SessionId) {
        let Some(u) = self.users.get_mut(user) else { return };
        u.sessions.retain(|s| *s != id);
        if !u.sessions.is_empty() {
            return;
        }
        if u.installed {
            u.idle_since = Some(Instant::now());
        } else if !u.installing || u.deferred.is_some() {
            self.forget(user);
        }
    }

    /// A snapshot of `user`'s memberships came back (None: it could not be read); the hub
    /// is at `position`.
    pub fn install(&mut self, user: &Arc<str>, snapshot: Option<Snapshot>, position: &Position) -> Installed {
        let n = position.len();
        let Some(u) = self.users.get_mut(user) else { return Installed::Nobody };
        let snapshot = snapshot.filter(|s| s.first.len() == n && s.last.len() == n && !u.pending_overflow);
        let Some(snapshot) = snapshot else {
            u.installing = false;
            u.pending.clear();
            u.pending_overflow = false;
            let sessions = u.sessions.clone();
            if sessions.is_empty() {
                self.forget(user);
                return Installed::Nobody;
            }
            return Installed::Failed(sessions);
        };
        if snapshot.last.ahead_of(position) {
            u.deferred = Some(snapshot);
            self.deferred.insert(user.clone());
            return Installed::Later;
        }
        let conversations: HashMap<Arc<str>, u64> = snapshot
            .conversations
            .iter()
            .map(|row| (self.conversation(&row.conversation_id), row.joined_msg_id))
            .collect();
        let Some(u) = self.users.get_mut(user) else { return Installed::Nobody };
        u.installing = false;
        u.installed = true;
        u.conversations = conversations;
        for change in std::mem::take(&mut u.pending) {
            if change.offset > snapshot.first[change.part] {
                apply(u, &change.conversation, change.msg_id, change.change);
            }
        }
        if u.sessions.is_empty() {
            u.idle_since = Some(Instant::now());
        }
        let sessions = u.sessions.clone();
        let convs: Vec<Arc<str>> = u.conversations.keys().cloned().collect();
        for c in convs {
            self.by_conversation.entry(c).or_default().insert(user.clone());
        }
        Installed::Now(sessions)
    }

    /// The deferred snapshots the hub, now at `position`, has reached: installed.
    pub fn install_reached(&mut self, position: &Position) -> Vec<Vec<SessionId>> {
        if self.deferred.is_empty() {
            return Vec::new();
        }
        let users = &mut self.users;
        let reached: Vec<(Arc<str>, Snapshot)> = self
            .deferred
            .iter()
            .filter_map(|name| {
                let u = users.get_mut(name)?;
                let there = u.deferred.as_ref().is_some_and(|s| !s.last.ahead_of(position));
                if there { u.deferred.take().map(|s| (name.clone(), s)) } else { None }
            })
            .collect();
        let mut live = Vec::new();
        for (user, snapshot) in reached {
            self.deferred.remove(&user);
            if let Installed::Now(sessions) = self.install(&user, Some(snapshot), position) {
                live.push(sessions);
            }
        }
        live
    }

    /// Applies a membership change read from the log at (`part`, `offset`).
    pub fn change(
        &mut self,
        user: &str,
        part: usize,
        offset: u64,
        conversation: &Arc<str>,
        msg_id: u64,
        change: Change,
    ) {
        let Some((key, u)) = self.users.get_key_value(user).map(|(k, _)| k.clone()).and_then(|k| {
            let u = self.users.get_mut(&k)?;
            Some((k, u))
        }) else {
            return;
        };
        if !u.installed {
            if u.installing {
                if u.pending.len() < MAX_PENDING {
                    u.pending.push(PendingChange { part, offset, conversation: conversation.clone(), msg_id, change });
                } else {
                    u.pending_overflow = true;
                }
            }
            return;
        }
        let before = u.conversations.contains_key(conversation);
        apply(u, conversation, msg_id, change);
        let after = u.conversations.contains_key(conversation);
        if after && !before {
            self.by_conversation.entry(conversation.clone()).or_default().insert(key);
        } else if before
            && !after
            && let Some(set) = self.by_conversation.get_mut(conversation)
        {
            set.remove(&key);
            if set.is_empty() {
                self.by_conversation.remove(conversation);
            }
        }
    }

    /// The connections that get message `msg_id` of `conversation`.
    pub fn recipients<'a>(&'a self, conversation: &'a str, msg_id: u64) -> impl Iterator<Item = SessionId> + 'a {
        self.by_conversation
            .get(conversation)
            .into_iter()
            .flatten()
            .filter_map(move |user| {
                let u = self.users.get(user)?;
                u.conversations.get(conversation).is_some_and(|from| *from <= msg_id).then_some(&u.sessions)
            })
            .flatten()
            .copied()
    }

    /// An installed user's memberships now: conversation → the msg_id it gets it from.
    pub fn memberships(&self, user: &str) -> Option<&HashMap<Arc<str>, u64>> {
        self.users.get(user).filter(|u| u.installed).map(|u| &u.conversations)
    }

    /// Whether `user` (installed here) is a member of `conversation` now.
    pub fn member_of(&self, user: &str, conversation: &str) -> bool {
        self.users.get(user).is_some_and(|u| u.conversations.contains_key(conversation))
    }

    /// The connections of the conversation's members now (for live signals).
    pub fn connected<'a>(&'a self, conversation: &'a str) -> impl Iterator<Item = SessionId> + 'a {
        self.recipients(conversation, u64::MAX)
    }

    /// Forgets users without connections whose linger period ran out.
    pub fn sweep(&mut self) {
        let now = Instant::now();
        let idle: Vec<Arc<str>> = self
            .users
            .iter()
            .filter(|(_, u)| {
                u.sessions.is_empty() && !u.installing && u.idle_since.is_none_or(|t| now.duration_since(t) > LINGER)
            })
            .map(|(k, _)| k.clone())
            .collect();
        for u in idle {
            self.forget(&u);
        }
    }

    /// Forgets everything (the database was replaced).
    pub fn clear(&mut self) {
        self.users.clear();
        self.by_conversation.clear();
        self.deferred.clear();
    }

    fn forget(&mut self, user: &Arc<str>) {
        self.deferred.remove(user);
        if let Some(u) = self.users.remove(user) {
            for c in u.conversations.keys() {
                if let Some(set) = self.by_conversation.get_mut(c) {
                    set.remove(user);
                    if set.is_empty() {
                        self.by_conversation.remove(c);
                    }
                }
            }
        }
    }
}

/// Applies one membership change to an installed user. Changes are ordered per conversation
/// (one partition), but the snapshot may already include a later state: a join never moves
/// the start back, a leave only ends a membership that began before it.
fn apply(u: &mut User, conversation: &Arc<str>, msg_id: u64, change: Change) {
    match change {
        Change::Join => {
            let from = u.conversations.entry(conversation.clone()).or_insert(msg_id);
            *from = (*from).max(msg_id);
        }
        Change::Leave => {
            if u.conversations.get(conversation).is_some_and(|from| *from <= msg_id) {
                u.conversations.remove(conversation);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(offsets: &[u64]) -> Position {
        Position::from(offsets)
    }

    fn snapshot(first: u64, last: u64, conversations: &[(&str, u64)]) -> Snapshot {
        Snapshot {
            first: vec![first].into(),
            last: vec![last].into(),
            conversations: conversations
                .iter()
                .map(|(c, from)| MembershipRow { conversation_id: c.to_string(), joined_msg_id: *from })
                .collect(),
        }
    }

    fn recipients(m: &Members, conversation: &str, msg_id: u64) -> Vec<SessionId> {
        let mut r: Vec<SessionId> = m.recipients(conversation, msg_id).collect();
        r.sort_unstable();
        r
    }

    #[test]
    fn a_snapshot_then_the_log_keep_memberships_current() {
        let mut m = Members::default();
        let u = m.key("u");
        assert_eq!(m.connect(&u, 1), Joined::Waiting { fetch: true });
        assert_eq!(m.connect(&u, 2), Joined::Waiting { fetch: false }, "one snapshot per user");
        assert_eq!(m.install(&u, Some(snapshot(5, 5, &[("a", 1)])), &at(&[5])), Installed::Now(vec![1, 2]));
        assert_eq!(recipients(&m, "a", 1), vec![1, 2]);
        assert!(recipients(&m, "b", 1).is_empty());
        let b = m.conversation("b");
        m.change("u", 0, 6, &b, 4, Change::Join);
        assert!(recipients(&m, "b", 3).is_empty(), "from the join on");
        assert_eq!(recipients(&m, "b", 4), vec![1, 2]);
        let a = m.conversation("a");
        m.change("u", 0, 7, &a, 9, Change::Leave);
        assert!(recipients(&m, "a", 10).is_empty());
        m.disconnect(&u, 1);
        assert_eq!(m.connect(&u, 3), Joined::Installed, "kept while connections remain");
    }

    #[test]
    fn changes_while_the_snapshot_is_in_flight_apply_on_top_when_newer() {
        let mut m = Members::default();
        let u = m.key("u");
        m.connect(&u, 1);
        let (a, b) = (m.conversation("a"), m.conversation("b"));
        m.change("u", 0, 3, &a, 2, Change::Leave); // before the snapshot: it shows it already
        m.change("u", 0, 8, &b, 6, Change::Join); // after the snapshot
        assert_eq!(m.install(&u, Some(snapshot(5, 5, &[("a", 4)])), &at(&[5])), Installed::Now(vec![1]));
        assert_eq!(recipients(&m, "a", 4), vec![1], "a rejoin the snapshot shows is kept");
        assert_eq!(recipients(&m, "b", 6), vec![1], "the later join applies");
    }

    #[test]
    fn a_snapshot_ahead_of_the_hub_waits_for_it() {
        let mut m = Members::default();
        let u = m.key("u");
        m.connect(&u, 1);
        assert_eq!(m.install(&u, Some(snapshot(5, 5, &[])), &at(&[3])), Installed::Later);
        assert!(m.install_reached(&at(&[4])).is_empty());
        assert_eq!(m.install_reached(&at(&[5])), vec![vec![1]]);
        assert!(m.install_reached(&at(&[6])).is_empty(), "once");
    }

    #[test]
    fn a_failed_snapshot_tells_the_connections_and_is_read_again_next_time() {
        let mut m = Members::default();
        let u = m.key("u");
        m.connect(&u, 1);
        assert_eq!(m.install(&u, None, &at(&[0])), Installed::Failed(vec![1]));
        m.disconnect(&u, 1);
        assert_eq!(m.connect(&u, 2), Joined::Waiting { fetch: true });
        // Another database's shape: refused too.
        assert_eq!(m.install(&u, Some(snapshot(1, 1, &[])), &at(&[0, 0])), Installed::Failed(vec![2]));
        // Nobody waits any more.
        let v = m.key("v");
        m.connect(&v, 3);
        m.disconnect(&v, 3);
        assert_eq!(m.install(&v, None, &at(&[0])), Installed::Nobody);
    }
}
