//! The payload every published message carries, so that any server's delivery can be checked
//! and timed the same way: `QB1:<channel>:<seq>:<sent_ns>;` followed by padding.

use std::time::{SystemTime, UNIX_EPOCH};

const TAG: &str = "QB1:";

/// Nanoseconds since the epoch (publisher and subscribers share the machine's clock).
pub fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

/// The payload for message `seq` of `channel`, padded to at least `size` bytes.
pub fn encode(channel: u32, seq: u32, size: usize) -> String {
    let mut s = format!("{TAG}{channel}:{seq}:{};", now_ns());
    while s.len() < size {
        s.push('x');
    }
    s
}

/// Every marker in `text`: (channel, seq, sent_ns).
pub fn scan(text: &str, mut found: impl FnMut(u32, u32, u64)) {
    let mut rest = text;
    while let Some(i) = rest.find(TAG) {
        rest = &rest[i + TAG.len()..];
        let Some(end) = rest.find(';') else { return };
        let mut parts = rest[..end].split(':');
        if let (Some(c), Some(s), Some(t)) = (parts.next(), parts.next(), parts.next())
            && let (Ok(c), Ok(s), Ok(t)) = (c.parse(), s.parse(), t.parse())
        {
            found(c, s, t);
        }
        rest = &rest[end..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_any_framing() {
        let a = encode(3, 17, 64);
        assert!(a.len() >= 64);
        let b = encode(4, 1, 0);
        let framed = format!("{{\"content\":\"{a}\"}}\ndata: {b}\n");
        let mut seen = Vec::new();
        scan(&framed, |c, s, _| seen.push((c, s)));
        assert_eq!(seen, vec![(3, 17), (4, 1)]);
    }
}
