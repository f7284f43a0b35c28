//! Delivery slots: one per attached connection, with its bounded queue. A message event is
//! encoded once and shared by every connection that gets it; a connection that came from a
//! node further along the log (its cursor ahead of the hub somewhere) skips what it already
//! has and gets events carrying its own cursor until the hub has passed it. A full queue
//! means a slow consumer: the slot is dropped from delivery and the connection told.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use quickim_shared::position::Position;
use quickim_shared::protocol::api::Message;
use quickim_shared::telemetry::TraceContext;

use super::{Outgoing, SessionId};
use crate::notify::cursor;
use crate::notify::event::Encoded;
use crate::notify::queue::{Closed, Outbox};

struct Slot {
    user: Arc<str>,
    outbox: Outbox,
    live: bool,
    /// The client's cursor where it is ahead of the hub (it came from another node):
    /// entries up to it are not sent again.
    skip: Option<Position>,
    /// The cursor it resumes from, if any.
    client: Option<Position>,
}

/// See the module docs.
pub(super) struct Slots {
    slots: HashMap<SessionId, Slot>,
    /// Connections with a `skip` (few, briefly).
    skipping: HashSet<SessionId>,
    next_id: SessionId,
}

impl Default for Slots {
    fn default() -> Slots {
        Slots { slots: HashMap::new(), skipping: HashSet::new(), next_id: 1 }
    }
}

/// What one delivery achieved.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Delivered {
    /// Events queued.
    pub queued: u64,
    /// Connections whose queue overflowed (to drop).
    pub overflowed: Vec<SessionId>,
}

impl Slots {
    /// A new slot for a connection of `user` resuming from `client`, not live yet.
    pub fn add(&mut self, user: Arc<str>, outbox: Outbox, client: Option<Position>) -> SessionId {
        let id = self.next_id;
        self.next_id += 1;
        self.slots.insert(id, Slot { user, outbox, live: false, skip: None, client });
        metrics::gauge!("quickim_hub_sessions").set(self.slots.len() as f64);
        id
    }

    /// The slot goes live at `position` (without telling the connection: it was answered
    /// with the position already).
    pub fn go_live(&mut self, id: SessionId, position: &Position) {
        if let Some(slot) = self.slots.get_mut(&id) {
            slot.live = true;
            slot.skip = slot.client.as_ref().filter(|c| c.ahead_of(position)).cloned();
            if slot.skip.is_some() {
                self.skipping.insert(id);
            }
        }
    }

    /// The user of a slot and the cursor it resumes from.
    pub fn resume_of(&self, id: SessionId) -> Option<(Arc<str>, Option<Position>)> {
        self.slots.get(&id).map(|s| (s.user.clone(), s.client.clone()))
    }

    /// Tells a connection something outside its queue's bounds (it is not an event).
    pub fn push_control(&self, id: SessionId, item: Outgoing) {
        if let Some(slot) = self.slots.get(&id) {
            slot.outbox.push_control(item);
        }
    }

    /// The slots go live at `position`, each told so.
    pub fn installed(&mut self, ids: &[SessionId], position: &Position) {
        let at = Arc::new(position.clone());
        for &id in ids {
            self.go_live(id, position);
            if let Some(slot) = self.slots.get(&id) {
                slot.outbox.push_control(Outgoing::Installed(at.clone()));
            }
        }
    }

    /// The connections are told their memberships could not be read.
    pub fn install_failed(&self, ids: &[SessionId]) {
        for id in ids {
            if let Some(slot) = self.slots.get(id) {
                slot.outbox.push_control(Outgoing::InstallFailed);
            }
        }
    }

    /// Removes a slot; answers its user.
    pub fn remove(&mut self, id: SessionId) -> Option<Arc<str>> {
        self.skipping.remove(&id);
        let slot = self.slots.remove(&id)?;
        metrics::gauge!("quickim_hub_sessions").set(self.slots.len() as f64);
        Some(slot.user)
    }

    /// Closes every connection for `why`.
    pub fn close_all(&self, why: Closed) {
        for slot in self.slots.values() {
            slot.outbox.close_with(why);
        }
    }

    /// Removes every slot, closing its connection as after an overflow (it resumes).
    pub fn clear(&mut self) {
        for slot in self.slots.values() {
            slot.outbox.close();
        }
        self.slots.clear();
        self.skipping.clear();
    }

    /// Queues `message` — entry `offset` of partition `part`, the hub now at `position` of
    /// database `epoch` — for the live connections among `ids`.
    pub fn deliver(
        &mut self,
        ids: impl Iterator<Item = SessionId>,
        message: &Message,
        (epoch, part, offset): (u32, usize, u64),
        position: &Position,
        trace: &Option<TraceContext>,
    ) -> Delivered {
        let mut shared: Option<Arc<Encoded>> = None;
        let mut out = Delivered::default();
        for id in ids {
            let Some(slot) = self.slots.get_mut(&id) else { continue };
            if !slot.live {
                continue;
            }
            let event = match &slot.skip {
                Some(skip) if offset <= skip[part] => continue,
                Some(skip) => {
                    let own = skip.max(position);
                    Encoded::message(Arc::from(cursor::encode(epoch, &own)), message, trace.clone())
                }
                None => shared
                    .get_or_insert_with(|| {
                        Encoded::message(Arc::from(cursor::encode(epoch, position)), message, trace.clone())
                    })
                    .clone(),
            };
            if slot.outbox.push_event(event) {
                out.queued += 1;
            } else {
                out.overflowed.push(id);
            }
        }
        out
    }

    /// Queues a live signal for the live connections among `ids`, except those of `except`
    /// (the user who sent it); a connection without room is skipped, never dropped.
    /// Answers how many got it.
    pub fn deliver_live(
        &self,
        ids: impl Iterator<Item = SessionId>,
        event: &Arc<Encoded>,
        except: Option<&str>,
    ) -> u64 {
        let mut queued = 0;
        for id in ids {
            let Some(slot) = self.slots.get(&id) else { continue };
            if !slot.live || except.is_some_and(|u| *slot.user == *u) {
                continue;
            }
            if slot.outbox.push_live(event.clone()) {
                queued += 1;
            } else {
                metrics::counter!("quickim_live_signals_dropped_total").increment(1);
            }
        }
        queued
    }

    /// Connections that came from a node ahead of this one stop skipping once the hub,
    /// now at `position`, has passed them.
    pub fn catch_up(&mut self, position: &Position) {
        if self.skipping.is_empty() {
            return;
        }
        let slots = &mut self.slots;
        self.skipping.retain(|id| match slots.get_mut(id) {
            Some(slot) if slot.skip.as_ref().is_some_and(|s| !s.ahead_of(position)) => {
                slot.skip = None;
                false
            }
            Some(_) => true,
            None => false,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(offsets: &[u64]) -> Position {
        Position::from(offsets)
    }
    use crate::notify::queue;

    fn message(msg_id: u64) -> Message {
        Message {
            conversation_id: "c".into(),
            msg_id,
            from: "a".into(),
            msg_type: 1,
            content: "x".into(),
            client_msg_id: None,
            send_time: 0,
            ..Default::default()
        }
    }

    fn position_of(inbox: &mut queue::Inbox) -> Option<Position> {
        match inbox.try_recv()? {
            Outgoing::Event(e) => cursor::Cursor::decode(&e.cursor).ok().map(|c| c.position),
            _ => position_of(inbox),
        }
    }

    #[test]
    fn one_encoding_for_every_live_connection() {
        let mut s = Slots::default();
        let (o1, mut i1) = queue::queue(10, 1 << 20);
        let (o2, mut i2) = queue::queue(10, 1 << 20);
        let (o3, mut i3) = queue::queue(10, 1 << 20);
        let a = s.add(Arc::from("u"), o1, None);
        let b = s.add(Arc::from("u"), o2, None);
        let waiting = s.add(Arc::from("v"), o3, None);
        s.go_live(a, &at(&[1]));
        s.installed(&[b], &at(&[1]));
        let d = s.deliver([a, b, waiting].into_iter(), &message(2), (7, 0, 2), &at(&[2]), &None);
        assert_eq!(d, Delivered { queued: 2, overflowed: vec![] });
        let e1 = match i1.try_recv() {
            Some(Outgoing::Event(e)) => e,
            other => panic!("{other:?}"),
        };
        assert!(matches!(i2.try_recv(), Some(Outgoing::Installed(_))));
        let e2 = match i2.try_recv() {
            Some(Outgoing::Event(e)) => e,
            other => panic!("{other:?}"),
        };
        assert!(Arc::ptr_eq(&e1, &e2), "encoded once");
        assert!(i3.try_recv().is_none(), "not live yet");
    }

    #[test]
    fn a_connection_ahead_of_the_hub_skips_what_it_has() {
        let mut s = Slots::default();
        let (o, mut i) = queue::queue(10, 1 << 20);
        let id = s.add(Arc::from("u"), o, Some(vec![5, 0].into()));
        s.go_live(id, &at(&[3, 1]));
        for offset in 4..=5 {
            s.deliver([id].into_iter(), &message(offset), (1, 0, offset), &at(&[offset, 1]), &None);
        }
        assert!(i.try_recv().is_none(), "4 and 5 came from the other node");
        s.deliver([id].into_iter(), &message(6), (1, 1, 2), &at(&[5, 2]), &None);
        assert_eq!(position_of(&mut i), Some(at(&[5, 2])), "its own cursor: the larger of both");
        s.catch_up(&at(&[5, 2]));
        s.deliver([id].into_iter(), &message(6), (1, 0, 6), &at(&[6, 2]), &None);
        assert_eq!(position_of(&mut i), Some(at(&[6, 2])), "the hub's cursor once passed");
    }

    #[test]
    fn a_full_queue_is_reported_for_dropping() {
        let mut s = Slots::default();
        let (o, _i) = queue::queue(1, 1 << 20);
        let id = s.add(Arc::from("u"), o, None);
        s.go_live(id, &at(&[0]));
        assert_eq!(s.deliver([id].into_iter(), &message(1), (1, 0, 1), &at(&[1]), &None).queued, 1);
        assert_eq!(s.deliver([id].into_iter(), &message(2), (1, 0, 2), &at(&[2]), &None).overflowed, vec![id]);
        assert_eq!(s.remove(id).as_deref(), Some("u"));
    }
}
