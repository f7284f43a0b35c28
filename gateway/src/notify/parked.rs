//! Long-poll continuations. After a poll is answered its session stays attached for a short
//! while (`GRACE`), parked under the user, the device and the cursor the answer handed out
//! (tagged with the session, so two clients never share one).
//! The next poll that brings exactly that cursor takes the session over: whatever came in
//! between is already queued, so the poll needs no replay from the store and no membership
//! read. Any other poll (another cursor, after the grace period, on another node) opens a
//! session as before, so parking changes how fast a poll is answered, never what it answers.
//!
//! A parked session keeps its place in the registry (the user stays online for the grace
//! period, and it counts against the per-user connection limit) and its bounded queue (if
//! that overflows, the next poll is answered with the slow-consumer event, and the one after
//! it replays from its cursor, as after any closed stream).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::session::Session;
use crate::auth::Caller;

/// How long an answered poll's session waits for the next poll.
pub const GRACE: Duration = Duration::from_secs(10);

type Key = (String, String, Arc<str>);
type Map = HashMap<Key, (Session, Instant)>;

/// The parked sessions of this node (a cheap `Clone` handle).
#[derive(Clone)]
pub struct Parked {
    sessions: Arc<Mutex<Map>>,
}

impl Parked {
    /// An empty lot; a sweeper drops sessions whose grace period ran out (and every one once
    /// `shutdown` is cancelled). Needs a Tokio runtime.
    pub fn new(shutdown: CancellationToken) -> Parked {
        let sessions: Arc<Mutex<Map>> = Arc::default();
        let weak = Arc::downgrade(&sessions);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(sweep(weak, shutdown));
        }
        Parked { sessions }
    }

    /// Parks `session` under its caller and the cursor it last handed out.
    pub fn park(&self, session: Session) {
        let caller = session.caller();
        let key = (caller.user_id.clone(), caller.platform.clone(), session.poll_cursor());
        if let Ok(mut sessions) = self.sessions.lock() {
            // A session parked earlier under the same key is replaced (and so closed).
            sessions.insert(key, (session, Instant::now() + GRACE));
        }
    }

    /// The session parked for `caller` at `cursor`, if any, renewed for the new request.
    pub fn take(&self, caller: &Caller, cursor: &str) -> Option<Session> {
        let key = (caller.user_id.clone(), caller.platform.clone(), Arc::<str>::from(cursor));
        let (mut session, _) = self.sessions.lock().ok()?.remove(&key)?;
        if session.is_kicked() {
            return None;
        }
        session.renew(caller.clone());
        Some(session)
    }

    /// How many sessions are parked.
    pub fn len(&self) -> usize {
        self.sessions.lock().map(|s| s.len()).unwrap_or(0)
    }

    /// Whether no session is parked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

async fn sweep(sessions: Weak<Mutex<Map>>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => {
                // Dropped: their hub attachments and registrations go with them.
                if let Some(sessions) = sessions.upgrade() {
                    let gone: Vec<_> = sessions.lock().map(|mut s| s.drain().collect()).unwrap_or_default();
                    drop(gone);
                }
                return;
            }
        }
        let Some(sessions) = sessions.upgrade() else { return };
        let now = Instant::now();
        // Dropped outside the lock: dropping a session detaches it from the hub.
        let expired: Vec<(Session, Instant)> = match sessions.lock() {
            Ok(mut s) => {
                let keys: Vec<Key> = s.iter().filter(|(_, (_, until))| *until <= now).map(|(k, _)| k.clone()).collect();
                keys.into_iter().filter_map(|k| s.remove(&k)).collect()
            }
            Err(_) => Vec::new(),
        };
        drop(expired);
    }
}
