//! The replay window: the log's most recent entries, as this hub dispatched them, so that a
//! resume is answered from memory instead of the store (no bus request, no database read).
//! Every gateway receives the whole log, so this works on any gateway once the user's
//! memberships are installed there (at once when it had a connection there in the last 30 s,
//! else after they are read).
//!
//! The window holds, per partition, every entry from some offset up to the hub's position,
//! without a gap (entries are pushed as they are dispatched, in offset order), indexed per
//! conversation. It is bounded in bytes: the oldest entries go first. A replay from cursor
//! C to the hub's position H is answered from it only when the answer is the store's:
//! - every partition's entries after C are still in the window, and the first of them is
//!   younger than the replay retention (less a margin for clocks apart), so the store would
//!   not answer `expired` either;
//! - none of the user's memberships changed within (C, H] (a join, a leave or a kick of the
//!   user): the membership the hub has at H is then the user's membership for every entry
//!   of the range, which is the store's rule;
//! - none of the entries it would answer was revised since (an edit, recall, deletion or a
//!   stream's end changes the stored row in place): the store answers the row as it is now;
//! - the hub is not behind the log (no entry known to exist that it has not dispatched: a
//!   revision among them would not have marked its message yet);
//! - the answer fits in one replay page (the store reads each page when the previous one has
//!   been written, so a long replay sees revisions made while it is written; one page is read
//!   once either way).
//!
//! Otherwise the session reads the store as before. A revision committed after that reaches
//! the client as a live event after the replay, exactly as it reaches a connected client.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use quickim_shared::position::Position;
use quickim_shared::protocol::event::LogEntry;
use quickim_shared::protocol::system::{self, MembershipChange, Revised};

/// Bytes an entry counts for beyond its strings.
const ENTRY_OVERHEAD: usize = 192;

/// A resume's first missed entry must be at least this much younger than the replay
/// retention (gateway and message service clocks apart).
const CLOCK_MARGIN_MS: i64 = 60_000;

struct Slot {
    entry: Arc<LogEntry>,
    /// Revised in the store since it was dispatched.
    stale: bool,
    /// For a REVISED entry: the message it revises.
    revises: Option<u64>,
}

/// See the module docs.
pub(super) struct Window {
    max_bytes: usize,
    bytes: usize,
    /// Per partition: the window holds every entry with `start < offset <= hub position`.
    start: Vec<u64>,
    /// Per partition, in offset order: each entry's conversation and send time.
    order: Vec<VecDeque<(Arc<str>, i64)>>,
    /// Per conversation, in offset (and msg_id) order.
    conversations: HashMap<Arc<str>, VecDeque<Slot>>,
    /// Per user: where (partition, offset) its memberships changed, within the window.
    changes: HashMap<Arc<str>, Vec<(u16, u64)>>,
}

/// Why a replay is not answered from the window.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Miss {
    /// The window is off, or the cursor is from another layout.
    Off,
    /// Entries after the cursor left the window (or are near the retention's end).
    TooOld,
    /// The user's memberships changed within the range.
    MembershipChanged,
    /// An entry of the range was revised since.
    Revised,
    /// The hub is behind the log.
    Behind,
    /// More than one replay page.
    Long,
    /// The database changed while the connection attached.
    OtherEpoch,
}

impl Miss {
    /// The metric label.
    pub fn name(&self) -> &'static str {
        match self {
            Miss::Off => "off",
            Miss::TooOld => "too_old",
            Miss::MembershipChanged => "membership_changed",
            Miss::Revised => "revised",
            Miss::Behind => "behind",
            Miss::Long => "long",
            Miss::OtherEpoch => "other_epoch",
        }
    }
}

impl Window {
    /// An empty window at `position`, holding at most `max_bytes` (0: off).
    pub fn new(position: &Position, max_bytes: usize) -> Window {
        Window {
            max_bytes,
            bytes: 0,
            start: position.to_vec(),
            order: (0..position.len()).map(|_| VecDeque::new()).collect(),
            conversations: HashMap::new(),
            changes: HashMap::new(),
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Takes the entry just dispatched (the next offset of its partition); `conversation`
    /// is its interned id.
    pub fn push(&mut self, conversation: Arc<str>, entry: LogEntry, change: Option<&MembershipChange>) {
        let p = usize::from(entry.part);
        if self.max_bytes == 0 || p >= self.order.len() {
            return;
        }
        if entry.offset != self.start[p] + self.order[p].len() as u64 + 1 {
            // Not contiguous (cannot happen: the hub dispatches in offset order): start over.
            self.drop_partition(p);
            self.start[p] = entry.offset - 1;
        }
        let message = &entry.message;
        if let Some(MembershipChange::Joined(users) | MembershipChange::Left(users) | MembershipChange::Kicked(users)) =
            change
        {
            for u in users {
                self.changes.entry(Arc::from(u.as_str())).or_default().push((entry.part, entry.offset));
            }
        }
        let revised = (message.msg_type == system::REVISED)
            .then(|| serde_json::from_str::<Revised>(&message.content).ok().map(|r| r.msg_id));
        let revises = revised.flatten();
        let slots = self.conversations.entry(conversation.clone()).or_default();
        if revised == Some(None) {
            // A revision this node cannot read (a newer version's): the store decides.
            for s in slots.iter_mut() {
                s.stale = true;
            }
        }
        if let Some(target) = revises {
            // The stored row changed in place, and so did the earlier revisions of it (a recall
            // removes their content too).
            for s in slots.iter_mut().rev() {
                if s.entry.message.msg_id == target || s.revises == Some(target) {
                    s.stale = true;
                }
                if s.entry.message.msg_id < target {
                    break;
                }
            }
        }
        self.bytes += size(&entry);
        self.order[p].push_back((conversation, message.send_time));
        slots.push_back(Slot { entry: Arc::new(entry), stale: false, revises });
        while self.bytes > self.max_bytes {
            if !self.evict_oldest() {
                break;
            }
        }
    }

    /// Forgets everything; the window starts again at `position`.
    pub fn clear(&mut self, position: &Position) {
        *self = Window::new(position, self.max_bytes);
    }

    /// Forgets entries too near the replay retention's end to answer a replay from.
    pub fn expire(&mut self, now_ms: i64, retention_ms: i64) {
        let before_ms = now_ms - retention_ms + CLOCK_MARGIN_MS;
        for p in 0..self.order.len() {
            while self.order[p].front().is_some_and(|(_, t)| *t < before_ms) {
                self.evict(p);
            }
        }
    }

    /// What `user` (whose memberships as of the hub's `position` are `memberships`:
    /// conversation → first msg_id it gets) missed with `after < offset <= position`, in
    /// (partition, offset) order — if the window can answer exactly what the store would,
    /// in at most `page` entries. Costs the smaller of the user's memberships and the
    /// window's conversations (the hub waits for it).
    #[allow(clippy::too_many_arguments)]
    pub fn replay(
        &self,
        user: &str,
        memberships: &HashMap<Arc<str>, u64>,
        after: &Position,
        position: &Position,
        now_ms: i64,
        retention_ms: i64,
        page: usize,
    ) -> Result<Vec<Arc<LogEntry>>, Miss> {
        if self.max_bytes == 0 || after.len() != self.order.len() || position.len() != self.order.len() {
            return Err(Miss::Off);
        }
        let young = now_ms - retention_ms + CLOCK_MARGIN_MS;
        for p in 0..self.order.len() {
            if after[p] >= position[p] {
                continue;
            }
            if after[p] < self.start[p] {
                return Err(Miss::TooOld);
            }
            let first = usize::try_from(after[p] - self.start[p]).unwrap_or(usize::MAX);
            match self.order[p].get(first) {
                Some((_, sent)) if *sent > young => {}
                _ => return Err(Miss::TooOld),
            }
        }
        let in_range = |part: u16, offset: u64| {
            let p = usize::from(part);
            p < after.len() && offset > after[p] && offset <= position[p]
        };
        if self.changes.get(user).is_some_and(|c| c.iter().any(|(part, offset)| in_range(*part, *offset))) {
            return Err(Miss::MembershipChanged);
        }
        let mut out = Vec::new();
        let mut take = |slots: &VecDeque<Slot>, from: u64| -> Result<(), Miss> {
            let Some(part) = slots.front().map(|s| usize::from(s.entry.part)) else { return Ok(()) };
            if part >= after.len() || after[part] >= position[part] {
                return Ok(());
            }
            let first = slots.partition_point(|s| s.entry.offset <= after[part]);
            for s in slots.range(first..) {
                if s.entry.offset > position[part] {
                    break;
                }
                if s.entry.message.msg_id < from {
                    continue;
                }
                if s.stale {
                    return Err(Miss::Revised);
                }
                if out.len() >= page {
                    return Err(Miss::Long);
                }
                out.push(s.entry.clone());
            }
            Ok(())
        };
        if memberships.len() <= self.conversations.len() {
            for (conversation, from) in memberships {
                if let Some(slots) = self.conversations.get(conversation) {
                    take(slots, *from)?;
                }
            }
        } else {
            for (conversation, slots) in &self.conversations {
                if let Some(from) = memberships.get(conversation) {
                    take(slots, *from)?;
                }
            }
        }
        out.sort_unstable_by_key(|e| (e.part, e.offset));
        Ok(out)
    }

    /// Evicts the oldest entry of the partition holding the most; false when empty.
    fn evict_oldest(&mut self) -> bool {
        let Some(p) = (0..self.order.len()).filter(|p| !self.order[*p].is_empty()).max_by_key(|p| self.order[*p].len())
        else {
            return false;
        };
        self.evict(p);
        true
    }

    /// Evicts partition `p`'s oldest entry.
    fn evict(&mut self, p: usize) {
        let Some((conversation, _)) = self.order[p].pop_front() else { return };
        self.start[p] += 1;
        let offset = self.start[p];
        let Some(slots) = self.conversations.get_mut(&conversation) else { return };
        // A conversation's entries are in offset order: its oldest is this one.
        if slots.front().is_some_and(|s| s.entry.offset == offset)
            && let Some(slot) = slots.pop_front()
        {
            self.bytes = self.bytes.saturating_sub(size(&slot.entry));
            if let Some(
                MembershipChange::Joined(users) | MembershipChange::Left(users) | MembershipChange::Kicked(users),
            ) = MembershipChange::of(&slot.entry.message)
            {
                let part = slot.entry.part;
                for u in users {
                    if let Some(c) = self.changes.get_mut(u.as_str()) {
                        c.retain(|at| *at != (part, offset));
                        if c.is_empty() {
                            self.changes.remove(u.as_str());
                        }
                    }
                }
            }
        }
        if slots.is_empty() {
            self.conversations.remove(&conversation);
        }
    }

    fn drop_partition(&mut self, p: usize) {
        while !self.order[p].is_empty() {
            self.evict(p);
        }
    }
}

fn size(entry: &LogEntry) -> usize {
    let m = &entry.message;
    ENTRY_OVERHEAD
        + m.content.len()
        + m.conversation_id.len()
        + m.from.len()
        + m.client_msg_id.as_ref().map_or(0, String::len)
}

#[cfg(test)]
mod tests {
    use quickim_shared::protocol::api::Message;
    use quickim_shared::protocol::system::{Action, Users, content};

    use super::*;

    const NOW: i64 = 1_000_000_000;
    const DAY: i64 = 86_400_000;

    struct Log {
        w: Window,
        heads: Vec<u64>,
        msg_ids: HashMap<String, u64>,
        page: usize,
    }

    impl Log {
        fn new(max_bytes: usize) -> Log {
            Log { w: Window::new(&Position::zero(2), max_bytes), heads: vec![0, 0], msg_ids: HashMap::new(), page: 500 }
        }

        /// Appends a message to `conversation` (partition 0 for names starting with 'a'..'m').
        fn send(&mut self, conversation: &str, msg_type: i32, text: &str, sent: i64) -> (u16, u64, u64) {
            let part = u16::from(conversation.as_bytes()[0] > b'm');
            self.heads[usize::from(part)] += 1;
            let msg_id = self.msg_ids.entry(conversation.to_string()).or_insert(0);
            *msg_id += 1;
            let message = Message {
                conversation_id: conversation.into(),
                msg_id: *msg_id,
                from: if msg_type < 0 { String::new() } else { "bob".into() },
                msg_type,
                content: text.into(),
                send_time: sent,
                ..Message::default()
            };
            let entry = LogEntry { part, offset: self.heads[usize::from(part)], message };
            let change = MembershipChange::of(&entry.message);
            let out = (part, entry.offset, entry.message.msg_id);
            self.w.push(Arc::from(conversation), entry, change.as_ref());
            out
        }

        fn msg(&mut self, conversation: &str, text: &str) -> (u16, u64, u64) {
            self.send(conversation, 1, text, NOW)
        }

        fn position(&self) -> Position {
            Position::from(self.heads.clone())
        }

        fn replay(&self, user: &str, member_of: &[(&str, u64)], after: &[u64]) -> Result<Vec<String>, Miss> {
            let convs: HashMap<Arc<str>, u64> = member_of.iter().map(|(c, from)| (Arc::from(*c), *from)).collect();
            let got =
                self.w.replay(user, &convs, &Position::from(after.to_vec()), &self.position(), NOW, DAY, self.page)?;
            Ok(got.iter().map(|e| format!("{}{}:{}", e.part, e.message.conversation_id, e.message.content)).collect())
        }
    }

    #[test]
    fn answers_what_a_member_missed_in_partition_then_offset_order() {
        let mut l = Log::new(1 << 20);
        l.msg("a", "a1");
        l.msg("z", "z1");
        l.msg("b", "b1");
        let after = l.heads.clone();
        l.msg("z", "z2");
        l.msg("b", "b2");
        l.msg("a", "a2");
        l.msg("c", "not mine");
        l.msg("a", "a3");
        assert_eq!(l.replay("u", &[("a", 1), ("z", 1)], &after).unwrap(), vec!["0a:a2", "0a:a3", "1z:z2"]);
        // More memberships than conversations in the window: the same answer.
        let many: Vec<(String, u64)> = (0..10).map(|i| (format!("x{i}"), 1)).collect();
        let mut member_of: Vec<(&str, u64)> = many.iter().map(|(c, f)| (c.as_str(), *f)).collect();
        member_of.extend([("a", 1), ("z", 1)]);
        assert_eq!(l.replay("u", &member_of, &after).unwrap(), vec!["0a:a2", "0a:a3", "1z:z2"]);
        // From the first msg_id the user gets.
        assert_eq!(l.replay("u", &[("a", 3)], &after).unwrap(), vec!["0a:a3"]);
        // Nothing missed in a partition the client is level with.
        assert_eq!(l.replay("u", &[("a", 1)], &[l.heads[0], 0]).unwrap(), Vec::<String>::new());
        // One page at most: a longer replay is read from the store page by page.
        l.page = 3;
        assert_eq!(l.replay("u", &[("a", 1), ("z", 1)], &after).unwrap().len(), 3);
        l.page = 2;
        assert_eq!(l.replay("u", &[("a", 1), ("z", 1)], &after), Err(Miss::Long));
    }

    #[test]
    fn entries_that_left_the_window_send_the_replay_to_the_store() {
        let mut l = Log::new(4 * (ENTRY_OVERHEAD + 10));
        for i in 0..8 {
            l.msg("a", &format!("a{i}"));
        }
        assert_eq!(l.replay("u", &[("a", 1)], &[2, 0]), Err(Miss::TooOld));
        assert_eq!(l.replay("u", &[("a", 1)], &[4, 0]).unwrap(), vec!["0a:a4", "0a:a5", "0a:a6", "0a:a7"]);
        assert!(l.w.bytes() <= 4 * (ENTRY_OVERHEAD + 10));
        // Near the retention's end the store decides (it may answer `expired`).
        let mut l = Log::new(1 << 20);
        l.send("a", 1, "old", NOW - DAY + CLOCK_MARGIN_MS / 2);
        l.msg("a", "new");
        assert_eq!(l.replay("u", &[("a", 1)], &[0, 0]), Err(Miss::TooOld));
        assert_eq!(l.replay("u", &[("a", 1)], &[1, 0]).unwrap(), vec!["0a:new"]);
        l.w.expire(NOW, DAY);
        assert_eq!(l.replay("u", &[("a", 1)], &[0, 0]), Err(Miss::TooOld));
        assert_eq!(l.replay("u", &[("a", 1)], &[1, 0]).unwrap(), vec!["0a:new"]);
        // Off.
        let mut l = Log::new(0);
        l.msg("a", "a1");
        assert_eq!(l.replay("u", &[("a", 1)], &[0, 0]), Err(Miss::Off));
    }

    #[test]
    fn a_membership_change_of_the_user_within_the_range_sends_the_replay_to_the_store() {
        let mut l = Log::new(1 << 20);
        let users = |u: &str| content(&Users { user_ids: vec![u.to_string()] });
        l.send("a", system::JOINED, &users("u"), NOW);
        l.msg("a", "a2");
        let after = l.heads.clone();
        l.msg("a", "a3");
        assert_eq!(l.replay("u", &[("a", 1)], &after).unwrap(), vec!["0a:a3"]);
        l.send("b", system::LEFT, &users("u"), NOW);
        assert_eq!(l.replay("u", &[("a", 1)], &after), Err(Miss::MembershipChanged));
        // Another user's change does not matter; the join before the cursor does not either.
        assert_eq!(l.replay("v", &[("a", 1)], &after).unwrap(), vec!["0a:a3"]);
        assert_eq!(l.replay("u", &[("a", 1)], &l.heads.clone()).unwrap(), Vec::<String>::new());
    }

    #[test]
    fn a_revised_entry_of_the_range_sends_the_replay_to_the_store() {
        let mut l = Log::new(1 << 20);
        let revise =
            |msg_id: u64, action: Action| content(&Revised { msg_id, action, content: None, by: "bob".into() });
        let (_, _, before) = l.msg("a", "before");
        let after = l.heads.clone();
        let (_, _, inside) = l.msg("a", "inside");
        l.msg("a", "other");
        // A revision of a message before the cursor: the revision itself is replayed.
        l.send("a", system::REVISED, &revise(before, Action::Edit), NOW);
        assert_eq!(l.replay("u", &[("a", 1)], &after).unwrap().len(), 3);
        l.send("a", system::REVISED, &revise(inside, Action::Recall), NOW);
        assert_eq!(l.replay("u", &[("a", 1)], &after), Err(Miss::Revised));
        // A cursor past the revised message and its revision: from the window again.
        let after = l.heads.clone();
        l.msg("a", "later");
        assert_eq!(l.replay("u", &[("a", 1)], &after).unwrap(), vec!["0a:later"]);
        // A recall after an edit also changes the edit's entry.
        let mut l = Log::new(1 << 20);
        let (_, _, m) = l.msg("a", "m");
        let after = l.heads.clone();
        l.send("a", system::REVISED, &revise(m, Action::Edit), NOW);
        assert_eq!(l.replay("u", &[("a", 1)], &after).unwrap().len(), 1);
        l.send("a", system::REVISED, &revise(m, Action::Recall), NOW);
        assert_eq!(l.replay("u", &[("a", 1)], &after), Err(Miss::Revised));
        // A revision this node cannot read: the store decides for the whole conversation.
        let mut l = Log::new(1 << 20);
        let after = l.heads.clone();
        l.msg("a", "one");
        l.msg("b", "other conversation");
        l.send("a", system::REVISED, r#"{"msg_id":1,"action":"translate","by":""}"#, NOW);
        assert_eq!(l.replay("u", &[("a", 1)], &after), Err(Miss::Revised));
        assert_eq!(l.replay("u", &[("b", 1)], &after).unwrap(), vec!["0b:other conversation"]);
    }
}
