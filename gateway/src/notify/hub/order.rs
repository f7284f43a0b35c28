//! Partition ordering and gap fill: the log's entries arrive over the bus at most once and
//! possibly out of order; this takes them in offset order per partition, holds early ones back
//! (bounded in bytes and count), and decides which gaps to read from the store and when —
//! page after page while a gap stays open, with a growing delay after failures. It also
//! measures how far behind each partition is, which decides the node's stall (see the hub's
//! module docs). No I/O here: the hub task runs the reads this asks for.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use quickim_shared::bus::Headers;
use quickim_shared::position::Position;
use quickim_shared::protocol::event::LogEntry;
use quickim_shared::protocol::service::{LogHeads, ReadLog};

use super::HubConfig;

/// Most early entries held back per partition (they are also bounded in bytes).
const MAX_HELD: usize = 100_000;
/// Bytes an entry held back counts for beyond its content.
const HELD_OVERHEAD: usize = 256;
/// Most entries asked for in one gap-fill page (the page is also bounded by the bus).
const FILL_PAGE: u32 = 1000;
/// Longest wait between two attempts of a gap fill that keeps failing.
const FILL_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// What a heads announcement means for the hub.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Heads {
    /// Noted: gaps it reveals will be filled.
    Noted,
    /// The database was replaced (another epoch or partition count): start over.
    Replaced,
}

/// How the node's stall changed (see the hub's module docs).
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Stall {
    /// No change.
    Same,
    /// A partition stayed behind for `stall_after`: the node stops serving.
    Began,
    /// Every partition has caught up since: the node serves again.
    Ended,
}

/// Where the hub is in each partition of the log.
pub(super) struct LogOrder {
    /// The database's epoch.
    pub epoch: u32,
    /// Every entry up to here has been dispatched, per partition.
    pub position: Position,
    /// Highest offset known to exist, per partition.
    known: Position,
    held: Vec<BTreeMap<u64, (LogEntry, Headers)>>,
    /// Bytes of the entries in `held`, all partitions.
    held_bytes: usize,
    gap_since: Vec<Option<Instant>>,
    filling: Vec<bool>,
    /// Gap fills of the partition that failed in a row, and when to try again.
    fill_failures: Vec<u32>,
    retry_at: Vec<Option<Instant>>,
    /// Since when the partition has been behind its known head (None: caught up).
    behind_since: Vec<Option<Instant>>,
    /// While stalled: the partitions that have caught up since.
    caught_up: Vec<bool>,
    stalled: bool,
    config: HubConfig,
}

impl LogOrder {
    /// Starts at `heads`.
    pub fn new(heads: LogHeads, config: HubConfig) -> LogOrder {
        let n = heads.heads.len();
        LogOrder {
            epoch: heads.epoch,
            position: heads.heads.clone(),
            known: heads.heads,
            held: (0..n).map(|_| BTreeMap::new()).collect(),
            held_bytes: 0,
            gap_since: vec![None; n],
            filling: vec![false; n],
            fill_failures: vec![0; n],
            retry_at: vec![None; n],
            behind_since: vec![None; n],
            caught_up: vec![true; n],
            stalled: false,
            config,
        }
    }

    /// Takes one entry: dispatches it, in order, with the held entries it unblocks
    /// (`dispatch` gets the position just after each), holds it back when early, drops it
    /// when already dispatched.
    pub fn take(&mut self, entry: LogEntry, headers: Headers, mut dispatch: impl FnMut(&Position, LogEntry, &Headers)) {
        let p = usize::from(entry.part);
        if p >= self.position.len() || entry.offset <= self.position[p] {
            return;
        }
        if entry.offset > self.known[p] {
            self.known[p] = entry.offset;
        }
        if entry.offset != self.position[p] + 1 {
            let size = held_size(&entry);
            // Past the bounds an early entry is not kept: the gap fill reads it again.
            if self.held[p].len() < MAX_HELD
                && self.held_bytes + size <= self.config.max_held_bytes
                && !self.held[p].contains_key(&entry.offset)
            {
                self.held_bytes += size;
                self.held[p].insert(entry.offset, (entry, headers));
            }
            let now = Instant::now();
            self.gap_since[p].get_or_insert(now);
            self.behind_since[p].get_or_insert(now);
            return;
        }
        self.position[p] = entry.offset;
        dispatch(&self.position, entry, &headers);
        while let Some((next, headers)) = self.held[p].remove(&(self.position[p] + 1)) {
            self.held_bytes = self.held_bytes.saturating_sub(held_size(&next));
            self.position[p] = next.offset;
            dispatch(&self.position, next, &headers);
        }
        while let Some(held) = self.held[p].first_entry() {
            if *held.key() > self.position[p] {
                break;
            }
            let (e, _) = held.remove();
            self.held_bytes = self.held_bytes.saturating_sub(held_size(&e));
        }
        if self.known[p] > self.position[p] {
            let now = Instant::now();
            self.gap_since[p] = Some(now);
            self.behind_since[p].get_or_insert(now);
        } else {
            self.gap_since[p] = None;
            self.behind_since[p] = None;
            self.caught_up[p] = true;
        }
    }

    /// A heads announcement: what exists, per partition.
    pub fn heads(&mut self, heads: &LogHeads) -> Heads {
        if heads.epoch != self.epoch || heads.heads.len() != self.position.len() {
            return Heads::Replaced;
        }
        let now = Instant::now();
        for (p, &h) in heads.heads.iter().enumerate() {
            if h > self.known[p] {
                self.known[p] = h;
            }
            if self.known[p] > self.position[p] {
                self.gap_since[p].get_or_insert(now);
                self.behind_since[p].get_or_insert(now);
            }
        }
        Heads::Noted
    }

    /// The gap-fill reads due now (gaps open for `gap_fill`, not in flight, not waiting
    /// after a failure); each is marked in flight.
    pub fn due_fills(&mut self, now: Instant) -> Vec<ReadLog> {
        (0..self.position.len())
            .filter(|&p| {
                self.gap_since[p].is_some_and(|since| now.duration_since(since) >= self.config.gap_fill)
                    && !self.filling[p]
                    && self.retry_at[p].is_none_or(|t| now >= t)
            })
            .collect::<Vec<_>>()
            .into_iter()
            .filter_map(|p| self.fill(p))
            .collect()
    }

    /// The next page of partition `p`'s gap, marked in flight; None when the gap is closed.
    fn fill(&mut self, p: usize) -> Option<ReadLog> {
        let upto = self.held[p].keys().next().map(|first| first - 1).unwrap_or(self.known[p]);
        if upto <= self.position[p] {
            self.gap_since[p] = None;
            return None;
        }
        self.filling[p] = true;
        Some(ReadLog { part: p as u16, after: self.position[p], upto, limit: FILL_PAGE })
    }

    /// A fill of `part` came back (its entries already taken when `ok`): answers the next
    /// page to read at once while the gap stays open; after a failure, waits a growing delay.
    pub fn filled(&mut self, part: u16, ok: bool) -> Option<ReadLog> {
        let p = usize::from(part);
        if p >= self.filling.len() {
            return None;
        }
        self.filling[p] = false;
        if ok {
            self.fill_failures[p] = 0;
            self.retry_at[p] = None;
            return self.gap_since[p].is_some().then(|| self.fill(p)).flatten();
        }
        self.fill_failures[p] += 1;
        let failures = self.fill_failures[p];
        let backoff = (self.config.gap_fill * 2u32.saturating_pow(failures.min(16))).min(FILL_BACKOFF_MAX);
        self.retry_at[p] = Some(Instant::now() + backoff);
        None
    }

    /// Fills of `part` that failed in a row.
    pub fn failures(&self, part: u16) -> u32 {
        self.fill_failures.get(usize::from(part)).copied().unwrap_or(0)
    }

    /// Entries known to exist but not dispatched yet, per partition.
    pub fn lag(&self) -> impl Iterator<Item = u64> + '_ {
        self.known.iter().zip(&self.position).map(|(k, p)| k.saturating_sub(*p))
    }

    /// Bytes of early entries held back.
    pub fn held_bytes(&self) -> usize {
        self.held_bytes
    }

    /// Whether the node is stalled.
    #[cfg(test)]
    pub fn is_stalled(&self) -> bool {
        self.stalled
    }

    /// Decides the stall: it begins when a partition has stayed behind for `stall_after`, and
    /// ends once every partition has caught up since.
    pub fn watch(&mut self, now: Instant) -> Stall {
        let lagging =
            self.behind_since.iter().any(|t| t.is_some_and(|t| now.duration_since(t) > self.config.stall_after));
        if lagging && !self.stalled {
            self.stalled = true;
            for (p, caught_up) in self.caught_up.iter_mut().enumerate() {
                *caught_up = self.known[p] <= self.position[p];
            }
            return Stall::Began;
        }
        if self.stalled && !lagging && self.caught_up.iter().all(|c| *c) {
            self.stalled = false;
            return Stall::Ended;
        }
        Stall::Same
    }
}

/// What an entry held back counts for against `max_held_bytes`.
fn held_size(entry: &LogEntry) -> usize {
    entry.message.content.len() + entry.message.conversation_id.len() + HELD_OVERHEAD
}

#[cfg(test)]
mod tests {
    use super::*;
    use quickim_shared::protocol::api::Message;

    fn entry(part: u16, offset: u64) -> LogEntry {
        LogEntry {
            part,
            offset,
            message: Message {
                conversation_id: "c".into(),
                msg_id: offset,
                from: "a".into(),
                msg_type: 1,
                content: "x".into(),
                client_msg_id: None,
                send_time: 0,
                ..Default::default()
            },
        }
    }

    fn order(max_held_bytes: usize) -> LogOrder {
        let config = HubConfig {
            gap_fill: Duration::from_millis(100),
            stall_after: Duration::from_secs(60),
            max_held_bytes,
            ..HubConfig::default()
        };
        LogOrder::new(LogHeads { epoch: 1, heads: Position::zero(2) }, config)
    }

    fn take(o: &mut LogOrder, part: u16, offset: u64) -> Vec<(u16, u64)> {
        let mut out = Vec::new();
        o.take(entry(part, offset), Headers::new(), |pos, e, _| {
            assert_eq!(pos[usize::from(e.part)], e.offset, "the position is the entry's");
            out.push((e.part, e.offset));
        });
        out
    }

    #[test]
    fn entries_go_out_in_order_per_partition_once() {
        let mut o = order(1 << 20);
        assert_eq!(take(&mut o, 0, 2), vec![], "early: held");
        assert_eq!(take(&mut o, 1, 1), vec![(1, 1)], "partitions are independent");
        assert_eq!(take(&mut o, 0, 3), vec![]);
        assert_eq!(take(&mut o, 0, 1), vec![(0, 1), (0, 2), (0, 3)], "the gap closes: the held ones follow");
        assert_eq!(take(&mut o, 0, 2), vec![], "already dispatched");
        assert_eq!(take(&mut o, 5, 1), vec![], "no such partition");
        assert_eq!(o.position[..], [3, 1]);
        assert_eq!(o.held_bytes(), 0);
    }

    #[test]
    fn gaps_are_read_page_after_page_and_failures_wait() {
        let mut o = order(1 << 20);
        take(&mut o, 0, 5);
        assert!(o.due_fills(Instant::now()).is_empty(), "a gap is given gap_fill to close by itself");
        let now = Instant::now() + Duration::from_millis(150);
        let reads = o.due_fills(now);
        assert_eq!(reads.len(), 1);
        assert_eq!((reads[0].part, reads[0].after, reads[0].upto), (0, 0, 4), "up to the first held entry");
        assert!(o.due_fills(now).is_empty(), "one read in flight per partition");
        // A page of 1..=2 came back: the next page at once.
        take(&mut o, 0, 1);
        take(&mut o, 0, 2);
        let next = o.filled(0, true).expect("the rest of the gap");
        assert_eq!((next.after, next.upto), (2, 4));
        // It fails: not again before the backoff (2 × gap_fill after the first failure).
        assert!(o.filled(0, false).is_none());
        assert_eq!(o.failures(0), 1);
        assert!(o.due_fills(Instant::now() + Duration::from_millis(150)).is_empty(), "waiting after a failure");
        assert_eq!(o.due_fills(Instant::now() + Duration::from_secs(6)).len(), 1);
        take(&mut o, 0, 3);
        take(&mut o, 0, 4);
        assert_eq!(o.position[0], 5, "4 unblocked the held 5");
        assert!(o.filled(0, true).is_none(), "the gap is closed");
        assert_eq!(o.lag().collect::<Vec<_>>(), vec![0, 0]);
    }

    #[test]
    fn heads_reveal_lost_tails_and_other_databases() {
        let mut o = order(1 << 20);
        assert_eq!(o.heads(&LogHeads { epoch: 1, heads: vec![3, 0].into() }), Heads::Noted);
        assert_eq!(o.lag().collect::<Vec<_>>(), vec![3, 0]);
        let reads = o.due_fills(Instant::now() + Duration::from_secs(1));
        assert_eq!((reads[0].after, reads[0].upto), (0, 3));
        assert_eq!(o.heads(&LogHeads { epoch: 2, heads: vec![3, 0].into() }), Heads::Replaced);
        assert_eq!(o.heads(&LogHeads { epoch: 1, heads: vec![3].into() }), Heads::Replaced);
    }

    #[test]
    fn early_entries_are_held_within_their_bytes() {
        // Each entry counts 1 + 1 + 256 bytes: two fit in 600.
        let mut o = order(600);
        for offset in 2..=5 {
            take(&mut o, 0, offset);
        }
        assert_eq!(o.held_bytes(), 2 * 258);
        // 1 arrives: 2 and 3 were held, 4 and 5 must be read again.
        assert_eq!(take(&mut o, 0, 1), vec![(0, 1), (0, 2), (0, 3)]);
        let reads = o.due_fills(Instant::now() + Duration::from_secs(1));
        assert_eq!((reads[0].after, reads[0].upto), (3, 5));
    }

    #[test]
    fn a_partition_behind_too_long_stalls_the_node_until_all_caught_up() {
        let config = HubConfig {
            gap_fill: Duration::ZERO,
            stall_after: Duration::from_millis(10),
            max_held_bytes: 1 << 20,
            ..HubConfig::default()
        };
        let mut o = LogOrder::new(LogHeads { epoch: 1, heads: Position::zero(2) }, config);
        o.heads(&LogHeads { epoch: 1, heads: vec![2, 1].into() });
        assert_eq!(o.watch(Instant::now()), Stall::Same);
        let later = Instant::now() + Duration::from_millis(50);
        assert_eq!(o.watch(later), Stall::Began);
        assert!(o.is_stalled());
        take(&mut o, 1, 1);
        assert_eq!(o.watch(later), Stall::Same, "partition 0 is still behind");
        take(&mut o, 0, 1);
        take(&mut o, 0, 2);
        assert_eq!(o.watch(later), Stall::Ended);
        assert!(!o.is_stalled());
    }
}
