//! Presence: debounced `presence` events (online, offline with `last_seen`) for the members
//! of a user's conversations with presence on, consistent across gateway nodes.
//!
//! Each node watches its own connections (the registry marks users whose first connection
//! opened or last one closed). A user's first connection here announces it online at once (a
//! user already online on another node is announced again: receivers keep a state, and an
//! event twice changes nothing). When its last connection here closes, the node waits
//! `presence_debounce_s`: a reconnection here meanwhile announces nothing; otherwise the node
//! asks every node (the cluster's presence query) and, if none holds a connection of the
//! user, records `last_seen` and announces it offline. Of nodes closing at the same time at
//! least the last one announces. Announcements cross the bus (`quickim.live`) with a page of
//! the user's presence-on conversations; each gateway's hub delivers them to those
//! conversations' members connected there. The changes are recorded in the store (for
//! `last_seen` and the webhooks) a crowd at a time, in one write.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use quickim_shared::protocol::event::{LIVE_SUBJECT, Live};
use quickim_shared::protocol::service::{PresenceChange, PresenceConversations, RecordPresence};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::state::AppState;

/// Announcements in flight at once (each a cluster query and a few service calls).
const CONCURRENCY: usize = 64;

/// Presence changes waiting to be recorded (announcements wait when it is full).
const RECORD_QUEUE: usize = 10_000;

/// How long the recorder gathers changes into one write.
const RECORD_LINGER: Duration = Duration::from_millis(100);

/// Watches this node's connections until shutdown; see the module docs.
pub async fn run(state: AppState, shutdown: CancellationToken) {
    let debounce = Duration::from_secs(state.config.presence_debounce_s);
    let permits = Arc::new(Semaphore::new(CONCURRENCY));
    let recorder = start_recorder(state.clone(), shutdown.clone());
    let mut offline_since: HashMap<String, Instant> = HashMap::new();
    // Users announced online by this node and not announced offline since: a close and a
    // reopen seen together (both between two looks) announce nothing.
    let mut online_here: HashSet<String> = HashSet::new();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = state.registry.changed() => {}
            _ = tick.tick() => {}
        }
        let now = Instant::now();
        for user in state.registry.take_changed() {
            if state.registry.presence(&user).1 > 0 {
                // Back within the debounce: it never went offline.
                offline_since.remove(&user);
                if online_here.insert(user.clone()) {
                    announce(&state, &permits, &recorder, user, true);
                }
            } else {
                offline_since.entry(user).or_insert(now);
            }
        }
        let due: Vec<String> = offline_since
            .iter()
            .filter(|(_, since)| now.duration_since(**since) >= debounce)
            .map(|(u, _)| u.clone())
            .collect();
        for user in due {
            offline_since.remove(&user);
            online_here.remove(&user);
            announce(&state, &permits, &recorder, user, false);
        }
    }
}

/// A change to record, and who waits for it to be written.
type Record = (PresenceChange, oneshot::Sender<()>);

/// Records presence changes in the store, many users' in one write (a node's connections come
/// and go in crowds: a restart, a network blip), each write within one bus message.
fn start_recorder(state: AppState, shutdown: CancellationToken) -> mpsc::Sender<Record> {
    let (tx, mut rx) = mpsc::channel::<Record>(RECORD_QUEUE);
    let per_write = (state.rpc.bus().payload_budget().saturating_sub(256) / 200).clamp(1, 1000);
    tokio::spawn(async move {
        loop {
            let first = tokio::select! {
                _ = shutdown.cancelled() => return,
                c = rx.recv() => match c { Some(c) => c, None => return },
            };
            let mut changes = vec![first];
            let until = tokio::time::sleep(RECORD_LINGER);
            tokio::pin!(until);
            while changes.len() < per_write {
                tokio::select! {
                    _ = &mut until => break,
                    c = rx.recv() => match c { Some(c) => changes.push(c), None => break },
                }
            }
            let n = changes.len();
            let (changes, done): (Vec<PresenceChange>, Vec<oneshot::Sender<()>>) = changes.into_iter().unzip();
            if let Err(e) = state.rpc.call(&RecordPresence { changes }).await {
                tracing::warn!(error = %e.message, changes = n, "cannot record presence changes");
            }
            for d in done {
                let _ = d.send(());
            }
        }
    });
    tx
}

fn announce(state: &AppState, permits: &Arc<Semaphore>, recorder: &mpsc::Sender<Record>, user: String, online: bool) {
    let (state, permits, recorder) = (state.clone(), permits.clone(), recorder.clone());
    tokio::spawn(async move {
        let Ok(_permit) = permits.acquire_owned().await else { return };
        let last_seen = if online {
            // Recorded for the webhooks' user.online (the time a user came online).
            let at_ms = quickim_shared::time::now_ms();
            record(&recorder, PresenceChange { user_id: user.clone(), online: true, at_ms }).await;
            None
        } else {
            match state.cluster.presence(std::slice::from_ref(&user), state.config.max_connections_per_user).await {
                Ok((p, _)) if p.get(&user).is_some_and(|p| p.connections > 0) => return,
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, %user, "cannot ask the other nodes about a user; not announcing it offline");
                    return;
                }
            }
            let at_ms = quickim_shared::time::now_ms();
            record(&recorder, PresenceChange { user_id: user.clone(), online: false, at_ms }).await;
            Some(at_ms)
        };
        publish(&state, user, online, last_seen).await;
    });
}

/// Records `change`, waiting until it is written (so a receiver of the event can read it).
async fn record(recorder: &mpsc::Sender<Record>, change: PresenceChange) {
    let (done, written) = oneshot::channel();
    if recorder.send((change, done)).await.is_ok() {
        let _ = written.await;
    }
}

/// One `Live::Presence` per page of the user's presence-on conversations.
async fn publish(state: &AppState, user: String, online: bool, last_seen: Option<i64>) {
    let mut after = None;
    loop {
        let page = match state.rpc.call(&PresenceConversations { user_id: user.clone(), after: after.take() }).await {
            Ok(page) => page,
            Err(e) => {
                tracing::warn!(error = %e.message, %user, "cannot read a user's presence conversations");
                return;
            }
        };
        let next = page.conversation_ids.last().cloned().filter(|_| page.more);
        if page.conversation_ids.is_empty() {
            return;
        }
        let live = Live::Presence { user_id: user.clone(), online, last_seen, conversations: page.conversation_ids };
        match serde_json::to_vec(&live) {
            Ok(body) => {
                if let Err(e) = state.rpc.bus().publish(LIVE_SUBJECT, Vec::new(), body.into()).await {
                    tracing::warn!(error = %e, %user, "cannot publish presence");
                    return;
                }
                metrics::counter!("quickim_presence_announced_total", "online" => if online { "yes" } else { "no" })
                    .increment(1);
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot encode presence");
                return;
            }
        }
        match next {
            Some(n) => after = Some(n),
            None => return,
        }
    }
}
