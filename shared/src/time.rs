//! Wall-clock helpers. Only for timestamps shown to users and token lifetimes: correctness
//! of ordering and resume never depends on clocks.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}
