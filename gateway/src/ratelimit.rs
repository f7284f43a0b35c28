//! Request rate limits (token buckets), per gateway node: per user (API requests), per IP
//! address (new connections, new /notify streams).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

const SHARDS: usize = 16;

/// One token bucket (for a single client, e.g. one WebSocket's frames).
pub struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// A full bucket.
    pub fn full(burst: u32) -> Bucket {
        Bucket { tokens: f64::from(burst.max(1)), last: Instant::now() }
    }

    /// Takes one token at `rate` per second up to `burst`; on refusal answers the seconds
    /// to wait. A rate of 0 never refuses.
    pub fn take(&mut self, rate: f64, burst: f64) -> Result<(), u64> {
        if rate <= 0.0 {
            return Ok(());
        }
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * rate).min(burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - self.tokens) / rate).ceil() as u64)
        }
    }
}

/// Token buckets keyed by user; `rate` 0 disables the limit.
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    shards: Vec<Mutex<HashMap<String, Bucket>>>,
}

impl RateLimiter {
    /// `rate` requests per second with bursts up to `burst`.
    pub fn new(rate: u32, burst: u32) -> RateLimiter {
        RateLimiter {
            rate: f64::from(rate),
            burst: f64::from(burst.max(rate).max(1)),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    /// Whether the limit is on.
    pub fn is_on(&self) -> bool {
        self.rate > 0.0
    }

    /// Takes one token for an IP address; on refusal answers the seconds to wait.
    pub fn check_ip(&self, ip: std::net::IpAddr) -> Result<(), u64> {
        if !self.is_on() {
            return Ok(());
        }
        self.check(&ip.to_string())
    }

    /// Takes one token for `key`; on refusal answers the seconds to wait.
    pub fn check(&self, key: &str) -> Result<(), u64> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        let shard = &self.shards[shard_of(key)];
        let mut buckets = shard.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if buckets.len() > 50_000 {
            // Forget users whose bucket has refilled: they are indistinguishable from new ones.
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, b| b.tokens + now.duration_since(b.last).as_secs_f64() * rate < burst);
        }
        let bucket = buckets.entry(key.to_string()).or_insert(Bucket { tokens: self.burst, last: now });
        bucket.take(self.rate, self.burst)
    }
}

fn shard_of(key: &str) -> usize {
    key.bytes().fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(usize::from(b))) % SHARDS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_the_burst_then_refuses_with_a_wait() {
        let l = RateLimiter::new(1, 3);
        for _ in 0..3 {
            assert!(l.check("a").is_ok());
        }
        assert_eq!(l.check("a"), Err(1));
        assert!(l.check("b").is_ok(), "users have their own buckets");
    }

    #[test]
    fn zero_rate_is_unlimited() {
        let l = RateLimiter::new(0, 0);
        for _ in 0..1000 {
            assert!(l.check("a").is_ok());
        }
    }
}
