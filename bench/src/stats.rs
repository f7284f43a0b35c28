//! What a run measures: a mergeable latency histogram and per-subscriber delivery accounting
//! (lost and duplicated messages).

use serde::{Deserialize, Serialize};

/// Log-scale histogram of latencies in microseconds: 1 % resolution, mergeable across
/// processes.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Histogram {
    buckets: Vec<u64>,
    count: u64,
    max_us: u64,
}

const GROWTH: f64 = 1.01;

fn bucket_of(us: u64) -> usize {
    if us <= 1 { 0 } else { ((us as f64).ln() / GROWTH.ln()).ceil() as usize }
}

fn value_of(bucket: usize) -> f64 {
    GROWTH.powi(bucket as i32)
}

impl Histogram {
    /// Records one latency.
    pub fn record(&mut self, us: u64) {
        let b = bucket_of(us);
        if self.buckets.len() <= b {
            self.buckets.resize(b + 1, 0);
        }
        self.buckets[b] += 1;
        self.count += 1;
        self.max_us = self.max_us.max(us);
    }

    /// Adds another histogram.
    pub fn merge(&mut self, other: &Histogram) {
        if self.buckets.len() < other.buckets.len() {
            self.buckets.resize(other.buckets.len(), 0);
        }
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *a += b;
        }
        self.count += other.count;
        self.max_us = self.max_us.max(other.max_us);
    }

    /// Samples recorded.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The `q` quantile (0–1) in milliseconds.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        let target = ((self.count as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (b, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= target {
                return (value_of(b).min(self.max_us as f64)) / 1000.0;
            }
        }
        self.max_us as f64 / 1000.0
    }

    /// The largest latency in milliseconds.
    pub fn max_ms(&self) -> f64 {
        self.max_us as f64 / 1000.0
    }
}

/// What one subscriber received of one channel: counts per sequence number.
#[derive(Debug, Clone, Default)]
pub struct Received {
    counts: Vec<u8>,
}

impl Received {
    /// Notes message `seq` (1-based); answers false for a duplicate.
    pub fn note(&mut self, seq: u32) -> bool {
        let i = seq as usize;
        if self.counts.len() <= i {
            self.counts.resize(i + 1, 0);
        }
        self.counts[i] = self.counts[i].saturating_add(1);
        self.counts[i] == 1
    }

    /// (lost, duplicated) against messages 1..=expected.
    pub fn tally(&self, expected: u32) -> (u64, u64) {
        let mut lost = 0;
        let mut dup = 0;
        for seq in 1..=expected as usize {
            match self.counts.get(seq).copied().unwrap_or(0) {
                0 => lost += 1,
                1 => {}
                n => dup += u64::from(n - 1),
            }
        }
        dup += self.counts.iter().skip(expected as usize + 1).map(|n| u64::from(*n)).sum::<u64>();
        (lost, dup)
    }

    /// Distinct messages received.
    pub fn distinct(&self) -> u64 {
        self.counts.iter().filter(|n| **n > 0).count() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_within_a_percent() {
        let mut h = Histogram::default();
        for us in 1..=10_000 {
            h.record(us);
        }
        assert!((h.quantile_ms(0.5) - 5.0).abs() < 0.06, "{}", h.quantile_ms(0.5));
        assert!((h.quantile_ms(0.99) - 9.9).abs() < 0.11);
        assert_eq!(h.max_ms(), 10.0);
        let mut other = Histogram::default();
        other.record(20_000);
        h.merge(&other);
        assert_eq!(h.count(), 10_001);
        assert_eq!(h.max_ms(), 20.0);
    }

    #[test]
    fn tallies_loss_and_duplicates() {
        let mut r = Received::default();
        assert!(r.note(1));
        assert!(r.note(3));
        assert!(!r.note(3));
        assert_eq!(r.tally(3), (1, 1));
        assert_eq!(r.distinct(), 2);
    }
}
