//! A connection's outbound queue: the hub pushes, the connection pops.
//!
//! Bounded by events and by bytes (a full queue means a slow consumer: the queue closes and
//! the client resumes from its cursor), and cheap while idle: an empty queue holds no buffer,
//! so a hundred thousand quiet connections cost a few dozen bytes each here.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use super::hub::Outgoing;

/// Capacity kept after the queue drains; a burst's larger buffer is given back.
const KEEP_CAPACITY: usize = 16;

/// Why a queue stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// It overflowed (or the hub dropped the connection from delivery): undelivered events
    /// are abandoned and the client resumes from its cursor.
    Overflow,
    /// The hub is gone (after everything queued was taken).
    HubGone,
    /// This node fell too far behind the log: undelivered events are abandoned and the
    /// client resumes from its cursor, on another node.
    Behind,
}

struct Contents {
    items: VecDeque<Outgoing>,
    bytes: usize,
    closed: Option<Closed>,
}

struct Shared {
    state: Mutex<Contents>,
    notify: Notify,
    max_events: usize,
    max_bytes: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Contents> {
        // A panic while holding this lock leaves the queue consistent (every change is one
        // field write), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A new queue holding at most `max_events` events and `max_bytes` bytes of JSON.
pub fn queue(max_events: usize, max_bytes: usize) -> (Outbox, Inbox) {
    let shared = Arc::new(Shared {
        state: Mutex::new(Contents { items: VecDeque::new(), bytes: 0, closed: None }),
        notify: Notify::new(),
        max_events: max_events.max(1),
        max_bytes,
    });
    (Outbox { shared: shared.clone() }, Inbox { shared })
}

/// The hub's end.
pub struct Outbox {
    shared: Arc<Shared>,
}

impl Outbox {
    /// Queues a message event; false (and the queue closes) when it would overflow, false
    /// when the queue is already closed.
    pub fn push_event(&self, event: Arc<super::event::Encoded>) -> bool {
        let len = event.json.len();
        let mut s = self.shared.lock();
        if s.closed.is_some() {
            return false;
        }
        if s.items.len() >= self.shared.max_events || s.bytes + len > self.shared.max_bytes {
            s.closed = Some(Closed::Overflow);
            drop(s);
            self.shared.notify.notify_one();
            return false;
        }
        s.bytes += len;
        s.items.push_back(Outgoing::Event(event));
        drop(s);
        self.shared.notify.notify_one();
        true
    }

    /// Queues a live signal (receipt, typing): only while the queue is at most half full,
    /// else it is dropped (false) — a signal never makes a connection a slow consumer nor
    /// takes the room its messages need.
    pub fn push_live(&self, event: Arc<super::event::Encoded>) -> bool {
        let len = event.json.len();
        let mut s = self.shared.lock();
        if s.closed.is_some()
            || s.items.len() >= self.shared.max_events / 2
            || s.bytes + len > self.shared.max_bytes / 2
        {
            return false;
        }
        s.bytes += len;
        s.items.push_back(Outgoing::Event(event));
        drop(s);
        self.shared.notify.notify_one();
        true
    }

    /// Queues a control item (installed, install failed): not counted against the bounds.
    pub fn push_control(&self, item: Outgoing) {
        let mut s = self.shared.lock();
        if s.closed.is_none() {
            s.items.push_back(item);
        }
        drop(s);
        self.shared.notify.notify_one();
    }

    /// Cuts the connection off (as an overflow does).
    pub fn close(&self) {
        self.close_with(Closed::Overflow);
    }

    /// Cuts the connection off for `why` (queued events are abandoned).
    pub fn close_with(&self, why: Closed) {
        let mut s = self.shared.lock();
        if s.closed.is_none() {
            s.closed = Some(why);
        }
        drop(s);
        self.shared.notify.notify_one();
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        let mut s = self.shared.lock();
        if s.closed.is_none() {
            s.closed = Some(Closed::HubGone);
        }
        drop(s);
        self.shared.notify.notify_one();
    }
}

/// The connection's end.
pub struct Inbox {
    shared: Arc<Shared>,
}

impl Inbox {
    /// The next item; cancel-safe (nothing is taken unless it is returned). An overflow is
    /// reported at once, even with events still queued; the hub's end going away only after
    /// everything queued was taken.
    pub async fn recv(&mut self) -> Result<Outgoing, Closed> {
        loop {
            if let Some(next) = self.take() {
                return next;
            }
            // notify_one keeps a permit when nobody waits: a push between `take` and here is
            // not missed.
            self.shared.notify.notified().await;
        }
    }

    /// The next item if one is queued (None also when closed).
    pub fn try_recv(&mut self) -> Option<Outgoing> {
        self.take().and_then(Result::ok)
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.shared.lock().items.is_empty()
    }

    fn take(&self) -> Option<Result<Outgoing, Closed>> {
        let mut s = self.shared.lock();
        if let Some(why @ (Closed::Overflow | Closed::Behind)) = s.closed {
            s.items = VecDeque::new();
            s.bytes = 0;
            return Some(Err(why));
        }
        match s.items.pop_front() {
            Some(item) => {
                if let Outgoing::Event(e) = &item {
                    s.bytes = s.bytes.saturating_sub(e.json.len());
                }
                if s.items.is_empty() && s.items.capacity() > KEEP_CAPACITY {
                    s.items = VecDeque::new();
                }
                Some(Ok(item))
            }
            None => s.closed.map(Err),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notify::event::{Encoded, EventKind};
    use bytes::Bytes;

    fn event(n: usize) -> Arc<Encoded> {
        Arc::new(Encoded {
            kind: EventKind::Message,
            cursor: Arc::from("c"),
            json: Bytes::from(vec![b'x'; n]),
            meta: None,
        })
    }

    #[tokio::test]
    async fn delivers_in_order_then_reports_the_hub_gone() {
        let (outbox, mut inbox) = queue(10, 1000);
        assert!(outbox.push_event(event(1)));
        outbox.push_control(Outgoing::InstallFailed);
        assert!(outbox.push_event(event(2)));
        drop(outbox);
        assert!(matches!(inbox.recv().await, Ok(Outgoing::Event(e)) if e.json.len() == 1));
        assert!(matches!(inbox.recv().await, Ok(Outgoing::InstallFailed)));
        assert!(matches!(inbox.recv().await, Ok(Outgoing::Event(e)) if e.json.len() == 2));
        assert_eq!(inbox.recv().await.err(), Some(Closed::HubGone));
    }

    #[tokio::test]
    async fn live_signals_use_half_the_room_and_never_close_the_queue() {
        let (outbox, mut inbox) = queue(4, 1000);
        assert!(outbox.push_live(event(1)));
        assert!(outbox.push_live(event(1)));
        assert!(!outbox.push_live(event(1)), "past half the events: dropped");
        assert!(outbox.push_event(event(1)) && outbox.push_event(event(1)), "messages still fit");
        for _ in 0..4 {
            assert!(matches!(inbox.recv().await, Ok(Outgoing::Event(_))));
        }
        let (outbox, _inbox) = queue(100, 10);
        assert!(!outbox.push_live(event(6)), "past half the bytes: dropped");
        assert!(outbox.push_event(event(6)), "and the queue is still open");
    }

    #[tokio::test]
    async fn overflow_by_events_or_bytes_closes_at_once() {
        let (outbox, mut inbox) = queue(2, 1000);
        assert!(outbox.push_event(event(1)));
        assert!(outbox.push_event(event(1)));
        assert!(!outbox.push_event(event(1)), "a third event overflows");
        assert!(!outbox.push_event(event(1)), "a closed queue takes nothing");
        assert_eq!(inbox.recv().await.err(), Some(Closed::Overflow), "queued events are abandoned");

        let (outbox, mut inbox) = queue(100, 10);
        assert!(outbox.push_event(event(6)));
        assert!(!outbox.push_event(event(6)), "12 bytes overflow 10");
        assert_eq!(inbox.recv().await.err(), Some(Closed::Overflow));
    }

    #[tokio::test]
    async fn taking_frees_room_and_a_waiting_receiver_wakes() {
        let (outbox, mut inbox) = queue(1, 1000);
        assert!(outbox.push_event(event(5)));
        assert!(inbox.recv().await.is_ok());
        assert!(outbox.push_event(event(5)), "room again once taken");
        assert!(inbox.try_recv().is_some());
        assert!(inbox.is_empty());

        let waiter = tokio::spawn(async move { inbox.recv().await.is_ok() });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(outbox.push_event(event(5)));
        let woke = tokio::time::timeout(std::time::Duration::from_secs(5), waiter).await;
        assert!(matches!(woke, Ok(Ok(true))), "the waiting receiver got the event");
    }
}
