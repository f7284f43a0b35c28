//! The open /notify connections of this node, by user: for the connections-per-user limit,
//! presence (/inner/get_users_online, and the users whose first connection opened or last
//! one closed, for `presence.rs`) and /inner/kick_user.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio_util::sync::CancellationToken;

/// Why a connection was told to close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KickReason {
    /// /inner/kick_user named this user (and platform).
    Kicked,
}

struct Entry {
    id: u64,
    platform: String,
    /// When the connection's token was issued (ms): a revocation closes older ones only.
    issued_ms: i64,
    kick: CancellationToken,
}

/// Registry of open connections.
#[derive(Default)]
pub struct Registry {
    users: Mutex<HashMap<String, Vec<Entry>>>,
    next_id: AtomicU64,
    total: AtomicU64,
    /// Users whose first connection opened or last one closed since last taken (bounded by
    /// the users of this node).
    changed: Mutex<HashSet<String>>,
    change: tokio::sync::Notify,
}

/// A registered connection; unregisters on drop.
pub struct Registration {
    registry: Arc<Registry>,
    user_id: String,
    id: u64,
    /// Cancelled when the connection is kicked.
    pub kicked: CancellationToken,
}

/// The user has too many connections on this node.
#[derive(Debug)]
pub struct TooManyConnections;

impl Registry {
    fn users(&self) -> MutexGuard<'_, HashMap<String, Vec<Entry>>> {
        self.users.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a connection of `user_id` on `platform` with a token issued at `issued_ms`,
    /// unless the user already has `max`.
    pub fn register(
        self: &Arc<Self>,
        user_id: &str,
        platform: &str,
        issued_ms: i64,
        max: u32,
    ) -> Result<Registration, TooManyConnections> {
        let mut users = self.users();
        let list = users.entry(user_id.to_string()).or_default();
        if list.len() >= max as usize {
            return Err(TooManyConnections);
        }
        if list.is_empty() {
            self.mark(user_id);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let kick = CancellationToken::new();
        list.push(Entry { id, platform: platform.to_string(), issued_ms, kick: kick.clone() });
        self.total.fetch_add(1, Ordering::Relaxed);
        Ok(Registration { registry: self.clone(), user_id: user_id.to_string(), id, kicked: kick })
    }

    /// Platforms (sorted, distinct) and connection count of `user_id` on this node.
    pub fn presence(&self, user_id: &str) -> (Vec<String>, u32) {
        let users = self.users();
        let Some(list) = users.get(user_id) else {
            return (Vec::new(), 0);
        };
        // A kicked connection is on its way out: it no longer counts.
        let live: Vec<&Entry> = list.iter().filter(|e| !e.kick.is_cancelled()).collect();
        let mut platforms: Vec<String> = live.iter().map(|e| e.platform.clone()).collect();
        platforms.sort();
        platforms.dedup();
        (platforms, live.len() as u32)
    }

    /// Tells the user's connections (of `platform`, or all) whose tokens were issued before
    /// `before_ms` to close; answers how many.
    pub fn kick(&self, user_id: &str, platform: Option<&str>, before_ms: i64) -> u32 {
        let users = self.users();
        let Some(list) = users.get(user_id) else {
            return 0;
        };
        let mut n = 0;
        for e in list.iter().filter(|e| platform.is_none_or(|p| p == e.platform) && e.issued_ms < before_ms) {
            if !e.kick.is_cancelled() {
                e.kick.cancel();
                n += 1;
            }
        }
        n
    }

    /// Open connections on this node.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    fn mark(&self, user_id: &str) {
        self.changed.lock().unwrap_or_else(|e| e.into_inner()).insert(user_id.to_string());
        self.change.notify_one();
    }

    /// Waits until a user's first connection opened or last one closed (returns at once if
    /// one did since the last [`Registry::take_changed`]).
    pub async fn changed(&self) {
        self.change.notified().await;
    }

    /// The users whose first connection opened or last one closed since the last call.
    pub fn take_changed(&self) -> Vec<String> {
        self.changed.lock().unwrap_or_else(|e| e.into_inner()).drain().collect()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut users = self.registry.users();
        if let Some(list) = users.get_mut(&self.user_id) {
            list.retain(|e| e.id != self.id);
            if list.is_empty() {
                users.remove(&self.user_id);
                self.registry.mark(&self.user_id);
            }
        }
        self.registry.total.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_counts_and_kicks() {
        let r = Arc::new(Registry::default());
        let a = r.register("u", "web", 10, 2).unwrap();
        let b = r.register("u", "ios", 20, 2).unwrap();
        assert!(r.register("u", "web", 30, 2).is_err());
        assert_eq!(r.presence("u"), (vec!["ios".to_string(), "web".to_string()], 2));
        assert_eq!(r.kick("u", None, 10), 0, "tokens issued at or after the revocation stay");
        assert_eq!(r.kick("u", Some("web"), 11), 1);
        assert!(a.kicked.is_cancelled() && !b.kicked.is_cancelled());
        assert_eq!(r.presence("u"), (vec!["ios".to_string()], 1), "kicked connections do not count");

        drop(a);
        assert_eq!(r.presence("u").1, 1);
        drop(b);
        assert_eq!(r.presence("u"), (Vec::new(), 0));
        assert_eq!(r.total(), 0);
    }
}
