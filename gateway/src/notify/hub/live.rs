//! Read receipts at this node, coalesced: at most one `read` event per member per
//! conversation per [`RECEIPT_INTERVAL`], the latest position winning. A position that moves
//! again within the interval is held and delivered when it ends (so the last one always
//! arrives, at most one interval late). Positions never move back: one not past what was
//! delivered (receipts from different service instances may cross) is dropped.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// At most one receipt per member per conversation this often.
pub const RECEIPT_INTERVAL: Duration = Duration::from_secs(1);

/// Pairs tracked at most; past it receipts go out uncoalesced rather than grow the map.
const MAX_TRACKED: usize = 200_000;

struct Pace {
    sent_at: Instant,
    sent: u64,
    held: Option<u64>,
}

/// See the module docs.
#[derive(Default)]
pub(super) struct Receipts {
    pairs: HashMap<(Arc<str>, Arc<str>), Pace>,
}

impl Receipts {
    /// `user`'s position in `conversation` moved to `read` at `now`: the position to deliver
    /// now, if any (else it is held or dropped).
    pub fn note(&mut self, conversation: &str, user: &str, read: u64, now: Instant) -> Option<u64> {
        let key = (Arc::from(conversation), Arc::from(user));
        let full = self.pairs.len() >= MAX_TRACKED;
        match self.pairs.get_mut(&key) {
            Some(p) if read <= p.sent || p.held.is_some_and(|h| read <= h) => None,
            Some(p) if now.duration_since(p.sent_at) < RECEIPT_INTERVAL => {
                p.held = Some(read);
                None
            }
            Some(p) => {
                *p = Pace { sent_at: now, sent: read, held: None };
                Some(read)
            }
            None if full => Some(read),
            None => {
                self.pairs.insert(key, Pace { sent_at: now, sent: read, held: None });
                Some(read)
            }
        }
    }

    /// The held positions whose interval has ended, to deliver now; forgets pairs quiet for
    /// a whole interval.
    pub fn due(&mut self, now: Instant) -> Vec<(Arc<str>, Arc<str>, u64)> {
        let mut out = Vec::new();
        self.pairs.retain(|(conversation, user), p| {
            if now.duration_since(p.sent_at) < RECEIPT_INTERVAL {
                return true;
            }
            match p.held.take() {
                Some(read) => {
                    out.push((conversation.clone(), user.clone(), read));
                    *p = Pace { sent_at: now, sent: read, held: None };
                    true
                }
                None => false,
            }
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_per_second_and_the_latest_wins() {
        let mut r = Receipts::default();
        let t0 = Instant::now();
        assert_eq!(r.note("c", "bob", 5, t0), Some(5), "the first goes at once");
        for (i, read) in (6..=9).enumerate() {
            assert_eq!(r.note("c", "bob", read, t0 + Duration::from_millis(100 * (i as u64 + 1))), None, "held");
        }
        assert_eq!(r.note("c", "alice", 3, t0), Some(3), "another member is paced apart");
        assert!(r.due(t0 + Duration::from_millis(900)).is_empty(), "not before the second is over");
        let due = r.due(t0 + RECEIPT_INTERVAL);
        assert_eq!(due, vec![(Arc::from("c"), Arc::from("bob"), 9)], "only the latest of the held ones");
        assert_eq!(r.note("c", "bob", 10, t0 + RECEIPT_INTERVAL), None, "paced from that delivery");
        assert_eq!(r.due(t0 + 2 * RECEIPT_INTERVAL).len(), 1);
    }

    #[test]
    fn positions_never_move_back_and_quiet_pairs_are_forgotten() {
        let mut r = Receipts::default();
        let t0 = Instant::now();
        assert_eq!(r.note("c", "bob", 5, t0), Some(5));
        assert_eq!(r.note("c", "bob", 4, t0 + 2 * RECEIPT_INTERVAL), None, "older than what was delivered");
        assert!(r.due(t0 + 2 * RECEIPT_INTERVAL).is_empty());
        assert!(r.pairs.is_empty(), "a quiet pair is forgotten");
        assert_eq!(r.note("c", "bob", 6, t0 + 3 * RECEIPT_INTERVAL), Some(6));
    }
}
