//! Byte bounds for bus messages.
//!
//! NATS refuses a message larger than the server's `max_payload` (1 MiB by default, announced
//! in its INFO; payload and headers count). A count bound is not a byte bound: every request
//! and answer that carries a list is paged so that each bus message stays within
//! [`Bus::payload_budget`](super::Bus::payload_budget), measured on the JSON actually sent.

use serde::Serialize;

/// Bytes kept free in every bus message for headers (trace context) and the answer's
/// envelope around a page.
pub const HEADROOM: usize = 2048;

/// The length of `value`'s JSON encoding, without building it.
pub fn encoded_len<T: Serialize + ?Sized>(value: &T) -> usize {
    let mut counter = Counter(0);
    match serde_json::to_writer(&mut counter, value) {
        Ok(()) => counter.0,
        // A value that cannot be encoded cannot be sent either: never fits.
        Err(_) => usize::MAX,
    }
}

struct Counter(usize);

impl std::io::Write for Counter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 = self.0.saturating_add(buf.len());
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// How many of `items`, from the front, fit as elements of one JSON array within `budget`
/// bytes (`extra` is added per element for fields that travel beside it). Answers 0 only
/// when the first item alone is over the budget (or there is none).
pub fn fitting<T: Serialize>(items: &[T], budget: usize, extra: usize) -> usize {
    let mut used = 2; // []
    for (i, item) in items.iter().enumerate() {
        let len = encoded_len(item).saturating_add(extra).saturating_add(1);
        if used + len > budget {
            return i;
        }
        used += len;
    }
    items.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_are_the_encoded_ones() {
        for v in [serde_json::json!({"a": "x\u{0}y", "b": [1, 2, 3]}), serde_json::json!("é\n\"")] {
            assert_eq!(encoded_len(&v), serde_json::to_vec(&v).unwrap().len());
        }
    }

    #[test]
    fn fitting_counts_whole_elements() {
        let items = vec!["a".repeat(10); 10]; // 12 bytes each, plus a comma
        assert_eq!(fitting(&items, 2 + 13 * 3, 0), 3);
        assert_eq!(fitting(&items, 2 + 13 * 3 - 1, 0), 2);
        assert_eq!(fitting(&items, 10, 0), 0, "the first alone is over");
        assert_eq!(fitting(&items, 10_000, 0), 10);
        assert_eq!(fitting(&items, 2 + 23 * 2, 10), 2, "extra bytes per element count");
        let serialized = serde_json::to_vec(&items[..3]).unwrap().len();
        assert!(serialized <= 2 + 13 * 3);
    }
}
