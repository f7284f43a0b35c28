//! Streaming messages at this node: the text so far of every open stream whose opening entry
//! the log has brought here, built from the deltas in `seq` order — so a connection that
//! arrives mid-stream gets a snapshot, then the live deltas. Deltas that arrive before their
//! stream's opening entry has been dispatched here are held briefly; a stream ends with its
//! finish or cancel entry. Deltas are live only: one lost on the bus stalls the stream at
//! this node (later ones are held), and the finish brings the final content to everyone.
//! Bounded: a stream's text by `max_content_bytes` (past it, no snapshot), held deltas per
//! stream, streams tracked, and early deltas' age.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Deltas held per stream (out of order, or before its opening entry).
const MAX_HELD: usize = 256;
/// Streams tracked at once.
const MAX_STREAMS: usize = 10_000;
/// How long deltas wait for their stream's opening entry.
const EARLY_FOR: Duration = Duration::from_secs(10);

type Key = (Arc<str>, u64);

struct Stream {
    /// The next seq to apply.
    next: u64,
    text: String,
    /// Over the size bound: no snapshot (live deltas still go out).
    overflowed: bool,
    held: BTreeMap<u64, String>,
}

struct Early {
    since: Instant,
    deltas: BTreeMap<u64, String>,
}

/// See the module docs.
#[derive(Default)]
pub(super) struct Streams {
    open: HashMap<Key, Stream>,
    early: HashMap<Key, Early>,
    max_bytes: usize,
}

/// A delta to deliver: its seq and text.
pub(super) type Ready = Vec<(u64, String)>;

impl Streams {
    /// Tracks streams of at most `max_bytes` of text.
    pub fn new(max_bytes: usize) -> Streams {
        Streams { max_bytes, ..Streams::default() }
    }

    /// The opening entry of a stream was dispatched: answers the early deltas now in order.
    pub fn opened(&mut self, conversation: &Arc<str>, msg_id: u64) -> Ready {
        if self.open.len() >= MAX_STREAMS {
            return Vec::new();
        }
        let key = (conversation.clone(), msg_id);
        let stream = Stream { next: 1, text: String::new(), overflowed: false, held: BTreeMap::new() };
        self.open.insert(key.clone(), stream);
        let mut ready = Vec::new();
        if let Some(early) = self.early.remove(&key) {
            for (seq, delta) in early.deltas {
                ready.extend(self.delta(conversation, msg_id, seq, delta, Instant::now()));
            }
        }
        ready
    }

    /// Streams open (their opening entry dispatched here, no end yet).
    pub fn len(&self) -> usize {
        self.open.len()
    }

    /// The stream's finish or cancel entry was dispatched.
    pub fn ended(&mut self, conversation: &str, msg_id: u64) {
        let key: Key = (Arc::from(conversation), msg_id);
        self.open.remove(&key);
        self.early.remove(&key);
    }

    /// A delta arrived: answers the deltas now deliverable, in order (none if it is early,
    /// out of order, or seen before).
    pub fn delta(&mut self, conversation: &Arc<str>, msg_id: u64, seq: u64, delta: String, now: Instant) -> Ready {
        let key = (conversation.clone(), msg_id);
        let Some(stream) = self.open.get_mut(&key) else {
            if self.early.len() < MAX_STREAMS {
                let early = self.early.entry(key).or_insert_with(|| Early { since: now, deltas: BTreeMap::new() });
                if early.deltas.len() < MAX_HELD {
                    early.deltas.insert(seq, delta);
                }
            }
            return Vec::new();
        };
        if seq < stream.next {
            return Vec::new();
        }
        if seq > stream.next {
            if stream.held.len() < MAX_HELD {
                stream.held.insert(seq, delta);
            }
            return Vec::new();
        }
        let mut ready = vec![(seq, delta)];
        stream.next += 1;
        while let Some(d) = stream.held.remove(&stream.next) {
            ready.push((stream.next, d));
            stream.next += 1;
        }
        for (_, d) in &ready {
            if stream.text.len() + d.len() > self.max_bytes {
                stream.overflowed = true;
                stream.text = String::new();
            }
            if !stream.overflowed {
                stream.text.push_str(d);
            }
        }
        ready
    }

    /// Snapshots (conversation, msg_id, last seq, text so far) of the open streams in the
    /// conversations `member_of` accepts that have streamed something.
    pub fn snapshots(&self, member_of: impl Fn(&str) -> bool) -> Vec<(Arc<str>, u64, u64, String)> {
        self.open
            .iter()
            .filter(|((c, _), s)| s.next > 1 && !s.overflowed && member_of(c))
            .map(|((c, m), s)| (c.clone(), *m, s.next - 1, s.text.clone()))
            .collect()
    }

    /// Forgets early deltas whose stream never opened here.
    pub fn sweep(&mut self, now: Instant) {
        self.early.retain(|_, e| now.duration_since(e.since) < EARLY_FOR);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c() -> Arc<str> {
        Arc::from("c")
    }

    #[test]
    fn deltas_in_order_whatever_order_they_come_in() {
        let mut s = Streams::new(1000);
        let now = Instant::now();
        assert!(s.opened(&c(), 7).is_empty());
        assert_eq!(s.delta(&c(), 7, 1, "a".into(), now), vec![(1, "a".to_string())]);
        assert!(s.delta(&c(), 7, 3, "c".into(), now).is_empty(), "held until 2");
        assert_eq!(s.delta(&c(), 7, 2, "b".into(), now), vec![(2, "b".to_string()), (3, "c".to_string())]);
        assert!(s.delta(&c(), 7, 2, "b".into(), now).is_empty(), "seen before");
        assert_eq!(s.snapshots(|_| true), vec![(c(), 7, 3, "abc".to_string())]);
        assert!(s.snapshots(|conv| conv != "c").is_empty(), "only the member's conversations");
        s.ended("c", 7);
        assert!(s.snapshots(|_| true).is_empty());
    }

    #[test]
    fn early_deltas_wait_for_the_opening_entry() {
        let mut s = Streams::new(1000);
        let now = Instant::now();
        assert!(s.delta(&c(), 7, 2, "b".into(), now).is_empty());
        assert!(s.delta(&c(), 7, 1, "a".into(), now).is_empty());
        assert_eq!(s.opened(&c(), 7), vec![(1, "a".to_string()), (2, "b".to_string())]);
        s.delta(&c(), 8, 1, "x".into(), now);
        s.sweep(now + EARLY_FOR);
        assert!(s.opened(&c(), 8).is_empty(), "too late: forgotten");
    }

    #[test]
    fn a_stream_over_the_size_bound_has_no_snapshot() {
        let mut s = Streams::new(3);
        let now = Instant::now();
        s.opened(&c(), 7);
        s.delta(&c(), 7, 1, "ab".into(), now);
        assert_eq!(s.delta(&c(), 7, 2, "cd".into(), now).len(), 1, "still delivered live");
        assert!(s.snapshots(|_| true).is_empty());
    }
}
