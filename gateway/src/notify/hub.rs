//! The hub: one task per gateway that turns the log into deliveries.
//!
//! It consumes every log partition in offset order. Entries arrive over the bus
//! (at-most-once, possibly out of order between message-service instances); the hub holds
//! early ones back (bounded in bytes), and when a gap stays open for `gap_fill_ms` — or a
//! heads announcement shows entries it never got — it reads the missing ones from the store,
//! page after page (each page one bus message) until the gap is closed. So live delivery
//! never depends on the bus not losing anything, and each partition's `position` means
//! "every entry up to here has been dispatched".
//!
//! A partition that stays behind its known head for `hub_stall_s` (the store does not answer,
//! or pages come slower than the log grows) stalls the node: it reports not ready, closes
//! its connections with `node_behind` (clients resume on another node, from their cursor) and
//! refuses new ones until every partition has caught up again.
//!
//! Membership for delivery is kept per user (shared by that user's connections on this
//! node) and is updated by the log itself: a JOINED entry subscribes the user from that
//! message on, a LEFT/KICKED entry is delivered to the user and then unsubscribes it. A
//! user's first connection installs a snapshot of its memberships read from the store (in
//! pages, each a snapshot of its own); membership entries that arrive meanwhile are kept and
//! applied on top of it when they are newer than the first page. A snapshot read ahead of
//! the hub (its heads past the hub's position) is installed only once the hub has reached
//! those heads: the connection then goes live there, and everything before comes from the
//! store's replay, so a leave the snapshot already shows still reaches the user in order.
//!
//! Each connection has a bounded queue (events and bytes). A message event is encoded once
//! and shared by every connection that gets it. A full queue means a slow consumer: the hub
//! drops the connection from delivery and signals it, and the client resumes from its last
//! cursor.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use quickim_shared::bus::{Bus, BusError, Headers, Incoming};
use quickim_shared::protocol::api::Message;
use quickim_shared::protocol::event::{BusEntry, HEADS_SUBJECT, LOG_SUBJECT, LogEntry};
use quickim_shared::protocol::service::{GetHeads, GetMemberships, LogHeads, MembershipRow, ReadLog};
use quickim_shared::protocol::system::MembershipChange;
use quickim_shared::rpc::RpcClient;
use quickim_shared::telemetry::{TraceContext, set_parent};
use serde::Serialize;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::cursor;
use super::queue::{self, Closed, Inbox, Outbox};

/// Identifies a connection to the hub.
pub type SessionId = u64;

/// How long a user's membership is kept after its last connection closed (so that the next
/// long-poll of the same user needs no snapshot).
const LINGER: Duration = Duration::from_secs(30);
/// Most membership changes kept for a user whose snapshot is in flight (past it, the
/// snapshot is read again).
const MAX_PENDING: usize = 10_000;
/// Most early entries held back per partition (they are also bounded in bytes).
const MAX_HELD: usize = 100_000;
/// Bytes an entry held back counts for beyond its content.
const HELD_OVERHEAD: usize = 256;
/// Snapshots fetched at once.
const SNAPSHOT_CONCURRENCY: usize = 64;
/// Most entries asked for in one gap-fill page (the page is also bounded by the bus).
const FILL_PAGE: u32 = 1000;
/// Longest wait between two attempts of a gap fill that keeps failing.
const FILL_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// How the hub follows the log.
#[derive(Debug, Clone, Copy)]
pub struct HubConfig {
    /// How long a gap may stay open before it is filled from the store.
    pub gap_fill: Duration,
    /// How long a partition may stay behind its known head before the node stalls.
    pub stall_after: Duration,
    /// Most bytes of early entries held back, all partitions together.
    pub max_held_bytes: usize,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig::from_config(&quickim_shared::config::Config::default())
    }
}

impl HubConfig {
    /// The defaults, with gaps filled after `gap_fill`.
    pub fn gap_fill(gap_fill: Duration) -> HubConfig {
        HubConfig { gap_fill, ..HubConfig::default() }
    }

    /// The hub's settings from the configuration.
    pub fn from_config(config: &quickim_shared::config::Config) -> HubConfig {
        HubConfig {
            gap_fill: Duration::from_millis(config.gap_fill_ms),
            stall_after: Duration::from_secs(config.hub_stall_s),
            max_held_bytes: config.hub_max_held_bytes,
        }
    }
}

/// An event encoded once, ready for any transport.
#[derive(Debug)]
pub struct Encoded {
    /// `message`, `cursor`, ...
    pub kind: &'static str,
    /// The position after this event.
    pub cursor: Arc<str>,
    /// The whole event as JSON.
    pub json: Bytes,
    /// For message events: what the socket write records.
    pub meta: Option<Meta>,
}

/// What a transport needs to trace and measure the write of a message event.
#[derive(Debug, Clone)]
pub struct Meta {
    /// The message's conversation.
    pub conversation_id: Arc<str>,
    /// The message's msg_id.
    pub msg_id: u64,
    /// When it was committed (ms), for the delivery-lag histogram.
    pub send_time: i64,
    /// The delivery's trace context, when the trace is recorded.
    pub trace: Option<TraceContext>,
}

impl Encoded {
    /// Encodes a message event.
    pub fn message(cursor: Arc<str>, message: &Message) -> Encoded {
        Self::traced(cursor, message, None)
    }

    /// Encodes a message event whose write belongs to the trace `trace`.
    pub fn traced(cursor: Arc<str>, message: &Message, trace: Option<TraceContext>) -> Encoded {
        #[derive(Serialize)]
        struct Wire<'a> {
            #[serde(rename = "type")]
            kind: &'static str,
            cursor: &'a str,
            message: &'a Message,
        }
        let json = serde_json::to_vec(&Wire { kind: "message", cursor: &cursor, message }).unwrap_or_default();
        let meta = Meta {
            conversation_id: Arc::from(message.conversation_id.as_str()),
            msg_id: message.msg_id,
            send_time: message.send_time,
            trace,
        };
        Encoded { kind: "message", cursor, json: json.into(), meta: Some(meta) }
    }
}

/// What the hub sends a connection.
#[derive(Debug)]
pub enum Outgoing {
    /// A message event.
    Event(Arc<Encoded>),
    /// The connection is live: it gets every entry after this position.
    Installed(Arc<[u64]>),
    /// The user's memberships could not be read; the connection should close and retry.
    InstallFailed,
}

/// How an attached connection starts.
#[derive(Debug)]
pub enum Start {
    /// Live at once, from this position.
    Live(Arc<[u64]>),
    /// Wait for [`Outgoing::Installed`] (the user's memberships are being read).
    Waiting,
}

/// A connection attached to the hub; detaches on drop.
pub struct Attachment {
    /// Its id.
    pub id: SessionId,
    /// How it starts.
    pub start: Start,
    hub: Hub,
}

impl Drop for Attachment {
    fn drop(&mut self) {
        self.hub.detach(self.id);
    }
}

enum Command {
    Attach { user: String, client: Option<Vec<u64>>, outbox: Outbox, reply: oneshot::Sender<(SessionId, Start)> },
    Detach { id: SessionId },
    Install { user: Arc<str>, snapshot: Option<Snapshot> },
    Filled { part: u16, result: Result<Vec<LogEntry>, String> },
}

/// A user's memberships as read from the store, page by page.
struct Snapshot {
    /// The log heads of the first page: changes after them are applied on top.
    first: Vec<u64>,
    /// The log heads of the last page: the snapshot is installed once the hub is there.
    last: Vec<u64>,
    conversations: Vec<MembershipRow>,
}

/// What every connection may read without asking the hub.
struct Shared {
    ready: AtomicBool,
    /// A partition stayed behind too long (see the module docs).
    stalled: AtomicBool,
    /// When the log's heads were last heard of (ms since the epoch): the message services
    /// announce them every second, read from the database.
    heads_at: std::sync::atomic::AtomicI64,
    /// (epoch, position, encoded cursor) after the last dispatched entry.
    position: RwLock<(u32, Arc<[u64]>, Arc<str>)>,
}

/// Handle to the hub task.
#[derive(Clone)]
pub struct Hub {
    cmds: mpsc::Sender<Command>,
    shared: Arc<Shared>,
}

/// The hub stopped (the gateway is shutting down).
#[derive(Debug)]
pub struct HubGone;

impl Hub {
    /// Subscribes to the log and starts the hub task; it becomes ready once it has read the
    /// log heads from the message service.
    pub async fn start(
        bus: Bus,
        rpc: RpcClient,
        config: HubConfig,
        shutdown: CancellationToken,
    ) -> Result<Hub, BusError> {
        let log = bus.subscribe(LOG_SUBJECT, None).await?;
        let heads = bus.subscribe(HEADS_SUBJECT, None).await?;
        let (cmds, cmd_rx) = mpsc::channel(8192);
        let shared = Arc::new(Shared {
            ready: AtomicBool::new(false),
            stalled: AtomicBool::new(false),
            heads_at: std::sync::atomic::AtomicI64::new(0),
            position: RwLock::new((0, Arc::from(Vec::new()), Arc::from(""))),
        });
        let hub = Hub { cmds: cmds.clone(), shared: shared.clone() };
        tokio::spawn(async move {
            let Some(start) = initial_heads(&rpc, &shutdown).await else {
                return;
            };
            let mut state = State::new(start, rpc, cmds, shared, config);
            state.run(futures::stream::select(log, heads), cmd_rx, shutdown).await;
        });
        Ok(hub)
    }

    /// Whether the hub knows where the log is and keeps up with it.
    pub fn is_ready(&self) -> bool {
        self.shared.ready.load(Ordering::Relaxed) && !self.is_stalled()
    }

    /// How long ago the log's heads were last heard of (a message service and its database
    /// answer every second), if ever.
    pub fn heads_age(&self) -> Option<Duration> {
        let at = self.shared.heads_at.load(Ordering::Relaxed);
        (at > 0).then(|| Duration::from_millis(u64::try_from(quickim_shared::time::now_ms() - at).unwrap_or(0)))
    }

    /// Whether a partition stayed behind the log too long (the node serves no connection
    /// until it has caught up).
    pub fn is_stalled(&self) -> bool {
        self.shared.stalled.load(Ordering::Relaxed)
    }

    /// The database epoch, the position every connection has been served up to, and its
    /// encoded cursor.
    pub fn position(&self) -> (u32, Arc<[u64]>, Arc<str>) {
        self.shared.position.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Attaches a connection of `user_id` that resumes from `client` (if any); its queue holds
    /// at most `max_events` events and `max_bytes` bytes.
    pub async fn attach(
        &self,
        user_id: &str,
        client: Option<Vec<u64>>,
        max_events: usize,
        max_bytes: usize,
    ) -> Result<(Attachment, Inbox), HubGone> {
        let (outbox, inbox) = queue::queue(max_events, max_bytes);
        let (reply, answer) = oneshot::channel();
        self.cmds
            .send(Command::Attach { user: user_id.to_string(), client, outbox, reply })
            .await
            .map_err(|_| HubGone)?;
        let (id, start) = answer.await.map_err(|_| HubGone)?;
        Ok((Attachment { id, start, hub: self.clone() }, inbox))
    }

    fn detach(&self, id: SessionId) {
        if let Err(mpsc::error::TrySendError::Full(cmd)) = self.cmds.try_send(Command::Detach { id })
            // Without a runtime the hub's task is gone too: nothing to detach from.
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let cmds = self.cmds.clone();
            runtime.spawn(async move {
                let _ = cmds.send(cmd).await;
            });
        }
    }
}

async fn initial_heads(rpc: &RpcClient, shutdown: &CancellationToken) -> Option<LogHeads> {
    loop {
        match rpc.call(&GetHeads {}).await {
            Ok(h) => return Some(h),
            Err(e) => tracing::warn!(error = %e.message, "hub waiting for the message service"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Change {
    Join,
    Leave,
}

struct PendingChange {
    part: usize,
    offset: u64,
    conversation: Arc<str>,
    msg_id: u64,
    change: Change,
}

#[derive(Default)]
struct UserState {
    /// Conversation → the msg_id from which the user gets it.
    conversations: HashMap<Arc<str>, u64>,
    sessions: Vec<SessionId>,
    installed: bool,
    installing: bool,
    pending: Vec<PendingChange>,
    /// More changes came than `pending` keeps: the snapshot must be read again.
    pending_overflow: bool,
    /// A snapshot read ahead of the hub, waiting for the hub to reach its heads.
    deferred: Option<Snapshot>,
    idle_since: Option<Instant>,
}

struct Slot {
    user: Arc<str>,
    outbox: Outbox,
    live: bool,
    /// The client's cursor where it is ahead of the hub (it came from another node):
    /// entries up to it are not sent again.
    skip: Option<Vec<u64>>,
    client: Option<Vec<u64>>,
}

struct State {
    epoch: u32,
    position: Vec<u64>,
    /// Highest offset known to exist, per partition.
    known: Vec<u64>,
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
    /// Users whose snapshot waits for the hub to reach its heads.
    deferred: HashSet<Arc<str>>,
    users: HashMap<Arc<str>, UserState>,
    sessions: HashMap<SessionId, Slot>,
    by_conversation: HashMap<Arc<str>, HashSet<Arc<str>>>,
    /// Connections with a `skip` (few, briefly).
    skipping: HashSet<SessionId>,
    next_id: SessionId,
    rpc: RpcClient,
    cmds: mpsc::Sender<Command>,
    shared: Arc<Shared>,
    config: HubConfig,
    snapshots: Arc<Semaphore>,
}

impl State {
    fn new(
        heads: LogHeads,
        rpc: RpcClient,
        cmds: mpsc::Sender<Command>,
        shared: Arc<Shared>,
        config: HubConfig,
    ) -> State {
        let n = heads.heads.len();
        let state = State {
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
            deferred: HashSet::new(),
            users: HashMap::new(),
            sessions: HashMap::new(),
            by_conversation: HashMap::new(),
            skipping: HashSet::new(),
            next_id: 1,
            rpc,
            cmds,
            shared,
            config,
            snapshots: Arc::new(Semaphore::new(SNAPSHOT_CONCURRENCY)),
        };
        state.publish_position();
        state.shared.heads_at.store(quickim_shared::time::now_ms(), Ordering::Relaxed);
        state.shared.ready.store(true, Ordering::Relaxed);
        tracing::info!(epoch = state.epoch, partitions = n, "hub ready");
        state
    }

    async fn run(
        &mut self,
        mut bus: impl futures::Stream<Item = Incoming> + Unpin,
        mut cmds: mpsc::Receiver<Command>,
        shutdown: CancellationToken,
    ) {
        let mut tick = tokio::time::interval((self.config.gap_fill / 2).max(Duration::from_millis(10)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sweep = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(cmd) = cmds.recv() => self.command(cmd),
                Some(msg) = bus.next() => self.incoming(msg),
                _ = tick.tick() => {
                    self.fill_gaps();
                    self.watch_lag();
                }
                _ = sweep.tick() => self.sweep(),
            }
        }
        self.shared.ready.store(false, Ordering::Relaxed);
    }

    fn publish_position(&self) {
        let cursor: Arc<str> = Arc::from(cursor::encode(self.epoch, &self.position));
        let mut shared = self.shared.position.write().unwrap_or_else(|e| e.into_inner());
        *shared = (self.epoch, Arc::from(self.position.clone()), cursor);
    }

    // ------------------------------------------------------------ commands

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Attach { user, client, outbox, reply } => self.attach(user, client, outbox, reply),
            Command::Detach { id } => self.detach(id),
            Command::Install { user, snapshot } => self.install(user, snapshot),
            Command::Filled { part, result } => self.filled(part, result),
        }
    }

    fn attach(
        &mut self,
        user: String,
        client: Option<Vec<u64>>,
        outbox: Outbox,
        reply: oneshot::Sender<(SessionId, Start)>,
    ) {
        let id = self.next_id;
        self.next_id += 1;
        let user: Arc<str> = match self.users.get_key_value(user.as_str()) {
            Some((k, _)) => k.clone(),
            None => Arc::from(user),
        };
        let us = self.users.entry(user.clone()).or_default();
        us.sessions.push(id);
        us.idle_since = None;
        let mut slot = Slot { user: user.clone(), outbox, live: false, skip: None, client };
        let start = if us.installed {
            slot.live = true;
            slot.skip = skip_for(slot.client.as_deref(), &self.position);
            if slot.skip.is_some() {
                self.skipping.insert(id);
            }
            Start::Live(Arc::from(self.position.clone()))
        } else {
            if !us.installing {
                us.installing = true;
                self.fetch_snapshot(user);
            }
            Start::Waiting
        };
        self.sessions.insert(id, slot);
        if reply.send((id, start)).is_err() {
            self.detach(id);
        }
        metrics::gauge!("quickim_hub_sessions").set(self.sessions.len() as f64);
    }

    fn fetch_snapshot(&self, user: Arc<str>) {
        let (rpc, cmds, permits) = (self.rpc.clone(), self.cmds.clone(), self.snapshots.clone());
        tokio::spawn(async move {
            let _permit = permits.acquire_owned().await;
            let snapshot = match read_snapshot(&rpc, &user).await {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!(error = %e.message, "cannot read memberships");
                    None
                }
            };
            let _ = cmds.send(Command::Install { user, snapshot }).await;
        });
    }

    fn detach(&mut self, id: SessionId) {
        self.skipping.remove(&id);
        let Some(slot) = self.sessions.remove(&id) else { return };
        if let Some(us) = self.users.get_mut(&slot.user) {
            us.sessions.retain(|s| *s != id);
            if us.sessions.is_empty() {
                if us.installed {
                    us.idle_since = Some(Instant::now());
                } else if !us.installing || us.deferred.is_some() {
                    self.forget_user(&slot.user);
                }
            }
        }
        metrics::gauge!("quickim_hub_sessions").set(self.sessions.len() as f64);
    }

    fn install(&mut self, user: Arc<str>, snapshot: Option<Snapshot>) {
        let n = self.position.len();
        let Some(us) = self.users.get_mut(&user) else { return };
        let snapshot = snapshot.filter(|s| s.first.len() == n && s.last.len() == n && !us.pending_overflow);
        let Some(snapshot) = snapshot else {
            us.installing = false;
            us.pending.clear();
            us.pending_overflow = false;
            let sessions = us.sessions.clone();
            for id in &sessions {
                if let Some(slot) = self.sessions.get(id) {
                    slot.outbox.push_control(Outgoing::InstallFailed);
                }
            }
            if sessions.is_empty() {
                self.forget_user(&user);
            }
            return;
        };
        if snapshot.last.iter().zip(&self.position).any(|(s, p)| s > p) {
            // Read ahead of the hub: installed once the hub is there (see the module docs).
            us.deferred = Some(snapshot);
            self.deferred.insert(user);
            return;
        }
        let conversations: HashMap<Arc<str>, u64> =
            snapshot.conversations.iter().map(|row| (self.intern(&row.conversation_id), row.joined_msg_id)).collect();
        let Some(us) = self.users.get_mut(&user) else { return };
        us.installing = false;
        let pending = std::mem::take(&mut us.pending);
        us.conversations = conversations;
        us.installed = true;
        for change in pending {
            if change.offset > snapshot.first[change.part] {
                apply(us, &change.conversation, change.msg_id, change.change);
            }
        }
        let convs: Vec<Arc<str>> = us.conversations.keys().cloned().collect();
        let sessions = us.sessions.clone();
        if sessions.is_empty() {
            us.idle_since = Some(Instant::now());
        }
        for c in convs {
            self.by_conversation.entry(c).or_default().insert(user.clone());
        }
        let position: Arc<[u64]> = Arc::from(self.position.clone());
        for id in sessions {
            if let Some(slot) = self.sessions.get_mut(&id) {
                slot.live = true;
                slot.skip = skip_for(slot.client.as_deref(), &self.position);
                if slot.skip.is_some() {
                    self.skipping.insert(id);
                }
                slot.outbox.push_control(Outgoing::Installed(position.clone()));
            }
        }
    }

    /// Installs the snapshots whose heads the hub has now reached.
    fn install_deferred(&mut self) {
        if self.deferred.is_empty() {
            return;
        }
        let position = &self.position;
        let users = &mut self.users;
        let ready: Vec<(Arc<str>, Snapshot)> = self
            .deferred
            .iter()
            .filter_map(|u| {
                let us = users.get_mut(u)?;
                let reached = us.deferred.as_ref().is_some_and(|s| s.last.iter().zip(position).all(|(s, p)| s <= p));
                if reached { us.deferred.take().map(|s| (u.clone(), s)) } else { None }
            })
            .collect();
        for (user, snapshot) in ready {
            self.deferred.remove(&user);
            self.install(user, Some(snapshot));
        }
    }

    fn intern(&self, conversation: &str) -> Arc<str> {
        match self.by_conversation.get_key_value(conversation) {
            Some((k, _)) => k.clone(),
            None => Arc::from(conversation),
        }
    }

    fn forget_user(&mut self, user: &Arc<str>) {
        self.deferred.remove(user);
        if let Some(us) = self.users.remove(user) {
            for c in us.conversations.keys() {
                if let Some(set) = self.by_conversation.get_mut(c) {
                    set.remove(user);
                    if set.is_empty() {
                        self.by_conversation.remove(c);
                    }
                }
            }
        }
    }

    fn sweep(&mut self) {
        let now = Instant::now();
        let idle: Vec<Arc<str>> = self
            .users
            .iter()
            .filter(|(_, u)| {
                u.sessions.is_empty() && !u.installing && u.idle_since.is_none_or(|t| now.duration_since(t) > LINGER)
            })
            .map(|(k, _)| k.clone())
            .collect();
        for u in idle {
            self.forget_user(&u);
        }
    }

    // ------------------------------------------------------------ the log

    fn incoming(&mut self, msg: Incoming) {
        if msg.subject == HEADS_SUBJECT {
            if let Ok(heads) = serde_json::from_slice::<LogHeads>(&msg.payload) {
                self.heads(heads);
            }
            return;
        }
        // One bus message is a committed batch: the position is published once, after it.
        match serde_json::from_slice::<Vec<BusEntry>>(&msg.payload) {
            Ok(entries) => {
                for e in entries {
                    self.entry(e.entry, e.trace);
                }
                self.publish_position();
                self.install_deferred();
            }
            Err(e) => tracing::warn!(error = %e, subject = %msg.subject, "undecodable log entries"),
        }
    }

    fn heads(&mut self, heads: LogHeads) {
        if heads.epoch != self.epoch || heads.heads.len() != self.position.len() {
            tracing::error!(
                old = self.epoch,
                new = heads.epoch,
                "the database changed under the gateway; restarting delivery"
            );
            self.reset(heads);
            return;
        }
        self.shared.heads_at.store(quickim_shared::time::now_ms(), Ordering::Relaxed);
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
    }

    /// The database was replaced: every connection starts over (its cursor gets resync).
    fn reset(&mut self, heads: LogHeads) {
        for slot in self.sessions.values() {
            slot.outbox.close();
        }
        self.sessions.clear();
        self.skipping.clear();
        self.users.clear();
        self.deferred.clear();
        self.by_conversation.clear();
        let n = heads.heads.len();
        self.epoch = heads.epoch;
        self.position = heads.heads.clone();
        self.known = heads.heads;
        self.held = (0..n).map(|_| BTreeMap::new()).collect();
        self.held_bytes = 0;
        self.gap_since = vec![None; n];
        self.filling = vec![false; n];
        self.fill_failures = vec![0; n];
        self.retry_at = vec![None; n];
        self.behind_since = vec![None; n];
        self.caught_up = vec![true; n];
        self.publish_position();
    }

    /// Takes one entry (in order, held back, or already seen); the caller publishes the
    /// position once it has taken all it has.
    fn entry(&mut self, entry: LogEntry, headers: Headers) {
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
        self.dispatch(entry, &headers);
        while let Some((next, headers)) = self.held[p].remove(&(self.position[p] + 1)) {
            self.held_bytes = self.held_bytes.saturating_sub(held_size(&next));
            self.dispatch(next, &headers);
        }
        while let Some(entry) = self.held[p].first_entry() {
            if *entry.key() > self.position[p] {
                break;
            }
            let (e, _) = entry.remove();
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

    /// Starts reading the gaps that have stayed open long enough (one page per partition at
    /// a time; a partition whose fills fail waits a growing delay).
    fn fill_gaps(&mut self) {
        let now = Instant::now();
        for p in 0..self.position.len() {
            let Some(since) = self.gap_since[p] else { continue };
            if self.filling[p]
                || now.duration_since(since) < self.config.gap_fill
                || self.retry_at[p].is_some_and(|t| now < t)
            {
                continue;
            }
            self.fill(p);
        }
    }

    /// Reads the next page of partition `p`'s gap from the store.
    fn fill(&mut self, p: usize) {
        let upto = self.held[p].keys().next().map(|first| first - 1).unwrap_or(self.known[p]);
        if upto <= self.position[p] {
            self.gap_since[p] = None;
            return;
        }
        self.filling[p] = true;
        metrics::counter!("quickim_hub_gap_fills_total").increment(1);
        let request = ReadLog { part: p as u16, after: self.position[p], upto, limit: FILL_PAGE };
        let (rpc, cmds) = (self.rpc.clone(), self.cmds.clone());
        tokio::spawn(async move {
            let result = match rpc.call(&request).await {
                Ok(entries) if entries.is_empty() => {
                    Err(format!("the store has no entries after {} up to {}", request.after, request.upto))
                }
                Ok(entries) => Ok(entries),
                Err(e) => Err(e.message),
            };
            let _ = cmds.send(Command::Filled { part: request.part, result }).await;
        });
    }

    /// A gap-fill page came back: take it, then read the next page at once while the gap
    /// stays open (as fast as the store answers, not a page per tick).
    fn filled(&mut self, part: u16, result: Result<Vec<LogEntry>, String>) {
        let p = usize::from(part);
        if p >= self.filling.len() {
            return;
        }
        self.filling[p] = false;
        match result {
            Ok(entries) => {
                self.fill_failures[p] = 0;
                self.retry_at[p] = None;
                metrics::counter!("quickim_hub_gap_filled_entries_total").increment(entries.len() as u64);
                for e in entries {
                    self.entry(e, Headers::new());
                }
                self.publish_position();
                self.install_deferred();
                if self.gap_since[p].is_some() {
                    self.fill(p);
                }
            }
            Err(error) => {
                self.fill_failures[p] += 1;
                let failures = self.fill_failures[p];
                let backoff = (self.config.gap_fill * 2u32.saturating_pow(failures.min(16))).min(FILL_BACKOFF_MAX);
                self.retry_at[p] = Some(Instant::now() + backoff);
                metrics::counter!("quickim_hub_gap_fill_failures_total").increment(1);
                tracing::warn!(part, after = self.position[p], failures, %error, "gap fill failed; retrying");
            }
        }
    }

    /// Measures how far behind the log each partition is, and stalls or resumes the node
    /// (see the module docs).
    fn watch_lag(&mut self) {
        let now = Instant::now();
        let mut lagging = false;
        for p in 0..self.position.len() {
            let lag = self.known[p].saturating_sub(self.position[p]);
            metrics::gauge!("quickim_hub_lag_entries", "partition" => p.to_string()).set(lag as f64);
            if self.behind_since[p].is_some_and(|t| now.duration_since(t) > self.config.stall_after) {
                lagging = true;
            }
        }
        metrics::gauge!("quickim_hub_held_bytes").set(self.held_bytes as f64);
        let stalled = self.shared.stalled.load(Ordering::Relaxed);
        if lagging && !stalled {
            tracing::error!(
                behind = ?self.known.iter().zip(&self.position).map(|(k, p)| k - p).collect::<Vec<_>>(),
                "the hub fell behind the log; closing connections until it has caught up"
            );
            self.shared.stalled.store(true, Ordering::Relaxed);
            metrics::gauge!("quickim_hub_stalled").set(1.0);
            metrics::counter!("quickim_hub_stalls_total").increment(1);
            for (p, caught_up) in self.caught_up.iter_mut().enumerate() {
                *caught_up = self.known[p] <= self.position[p];
            }
            for slot in self.sessions.values() {
                slot.outbox.close_with(Closed::Behind);
            }
        } else if stalled && !lagging && self.caught_up.iter().all(|c| *c) {
            tracing::info!("the hub has caught up with the log; serving again");
            self.shared.stalled.store(false, Ordering::Relaxed);
            metrics::gauge!("quickim_hub_stalled").set(0.0);
        }
    }

    // ------------------------------------------------------------ delivery

    fn dispatch(&mut self, entry: LogEntry, headers: &Headers) {
        let p = usize::from(entry.part);
        let span = tracing::info_span!(
            "log.deliver",
            otel.name = %format_args!("deliver {LOG_SUBJECT}"),
            otel.kind = "consumer",
            messaging.system = "quickim-bus",
            messaging.destination.name = LOG_SUBJECT,
            log.partition = entry.part,
            messaging.operation.type = "process",
            conversation_id = %entry.message.conversation_id,
            msg_id = entry.message.msg_id,
            deliveries = tracing::field::Empty,
        );
        set_parent(&span, headers);
        let _enter = span.enter();
        let trace = TraceContext::current();
        self.position[p] = entry.offset;
        let message = &entry.message;
        let msg_id = message.msg_id;
        let change = MembershipChange::of(message);
        let conversation = self.intern(&message.conversation_id);

        if let Some(MembershipChange::Joined(users)) = &change {
            for u in users {
                self.change(u, p, entry.offset, &conversation, msg_id, Change::Join);
            }
        }

        let mut shared: Option<Arc<Encoded>> = None;
        let mut overflowed = Vec::new();
        let mut delivered = 0u64;
        if let Some(users) = self.by_conversation.get(&conversation) {
            for user in users {
                let Some(us) = self.users.get(user) else { continue };
                if us.conversations.get(&conversation).is_none_or(|from| *from > msg_id) {
                    continue;
                }
                for id in &us.sessions {
                    let Some(slot) = self.sessions.get_mut(id) else {
                        continue;
                    };
                    if !slot.live {
                        continue;
                    }
                    let event = match &slot.skip {
                        Some(skip) if entry.offset <= skip[p] => continue,
                        Some(skip) => {
                            let own = cursor::max_position(skip, &self.position);
                            let cursor = Arc::from(cursor::encode(self.epoch, &own));
                            Arc::new(Encoded::traced(cursor, message, trace.clone()))
                        }
                        None => shared
                            .get_or_insert_with(|| {
                                let cursor = Arc::from(cursor::encode(self.epoch, &self.position));
                                Arc::new(Encoded::traced(cursor, message, trace.clone()))
                            })
                            .clone(),
                    };
                    if slot.outbox.push_event(event) {
                        delivered += 1;
                    } else {
                        overflowed.push(*id);
                    }
                }
            }
        }
        metrics::counter!("quickim_hub_deliveries_total").increment(delivered);
        span.record("deliveries", delivered);

        if let Some(MembershipChange::Left(users) | MembershipChange::Kicked(users)) = &change {
            for u in users {
                self.change(u, p, entry.offset, &conversation, msg_id, Change::Leave);
            }
        }
        for id in overflowed {
            metrics::counter!("quickim_slow_consumer_disconnects_total").increment(1);
            self.detach(id);
        }
        // Connections that came from a node ahead of this one catch up.
        if !self.skipping.is_empty() {
            let position = &self.position;
            let sessions = &mut self.sessions;
            self.skipping.retain(|id| match sessions.get_mut(id) {
                Some(slot) if slot.skip.as_ref().is_some_and(|s| s.iter().zip(position).all(|(s, p)| p >= s)) => {
                    slot.skip = None;
                    false
                }
                Some(_) => true,
                None => false,
            });
        }
    }

    fn change(&mut self, user: &str, part: usize, offset: u64, conversation: &Arc<str>, msg_id: u64, change: Change) {
        let Some(us) = self.users.get_mut(user) else { return };
        if !us.installed {
            if us.installing {
                if us.pending.len() < MAX_PENDING {
                    us.pending.push(PendingChange { part, offset, conversation: conversation.clone(), msg_id, change });
                } else {
                    us.pending_overflow = true;
                }
            }
            return;
        }
        let Some(key) = self.users.get_key_value(user).map(|(k, _)| k.clone()) else {
            return;
        };
        let Some(us) = self.users.get_mut(&key) else { return };
        let before = us.conversations.contains_key(conversation);
        apply(us, conversation, msg_id, change);
        let after = us.conversations.contains_key(conversation);
        if after && !before {
            self.by_conversation.entry(conversation.clone()).or_default().insert(key);
        } else if before
            && !after
            && let Some(set) = self.by_conversation.get_mut(conversation)
        {
            set.remove(&key);
            if set.is_empty() {
                self.by_conversation.remove(conversation);
            }
        }
    }
}

/// Applies one membership change to an installed user. Changes are ordered per conversation
/// (one partition), but the snapshot may already include a later state: a join never moves
/// the start back, a leave only ends a membership that began before it.
fn apply(us: &mut UserState, conversation: &Arc<str>, msg_id: u64, change: Change) {
    match change {
        Change::Join => {
            let from = us.conversations.entry(conversation.clone()).or_insert(msg_id);
            *from = (*from).max(msg_id);
        }
        Change::Leave => {
            if us.conversations.get(conversation).is_some_and(|from| *from <= msg_id) {
                us.conversations.remove(conversation);
            }
        }
    }
}

/// The client's cursor, where it is ahead of `position` in some partition.
fn skip_for(client: Option<&[u64]>, position: &[u64]) -> Option<Vec<u64>> {
    let client = client?;
    (client.len() == position.len() && client.iter().zip(position).any(|(c, p)| c > p)).then(|| client.to_vec())
}

/// What an entry held back counts for against `max_held_bytes`.
fn held_size(entry: &LogEntry) -> usize {
    entry.message.content.len() + entry.message.conversation_id.len() + HELD_OVERHEAD
}

/// Reads all of a user's memberships, page after page.
async fn read_snapshot(rpc: &RpcClient, user: &str) -> Result<Snapshot, quickim_shared::error::ServiceError> {
    let mut page = rpc.call(&GetMemberships { user_id: user.to_string(), after: None }).await?;
    let first = page.heads.clone();
    let mut conversations = std::mem::take(&mut page.conversations);
    while page.more {
        let after = conversations.last().map(|r| r.conversation_id.clone());
        page = rpc.call(&GetMemberships { user_id: user.to_string(), after }).await?;
        conversations.append(&mut page.conversations);
    }
    Ok(Snapshot { first, last: page.heads, conversations })
}
