//! The hub: one task per gateway that turns the log into deliveries. Its jobs, each in a
//! module of its own with its own tests:
//!
//! - `order.rs` — the log in order: every partition consumed in offset order. Entries arrive
//!   over the bus (at-most-once, possibly out of order between message-service instances);
//!   early ones are held back (bounded in bytes), and when a gap stays open for `gap_fill_ms`
//!   — or a heads announcement shows entries never received — the missing ones are read from
//!   the store, page after page (each page one bus message) until the gap is closed. So live
//!   delivery never depends on the bus losing nothing, and each partition's position means
//!   "every entry up to here has been dispatched". A partition that stays behind its known
//!   head for `hub_stall_s` stalls the node: it reports not ready, closes its connections
//!   with `node_behind` (clients resume on another node, from their cursors) and refuses new
//!   ones until every partition has caught up again.
//! - `members.rs` — the membership index, per user (shared by that user's connections):
//!   installed from a snapshot of the store at the user's first connection (read in pages,
//!   each a snapshot of its own; changes arriving meanwhile are applied on top when newer than
//!   the first page), then kept current by the log itself (a JOINED entry subscribes the user
//!   from that message on, a LEFT/KICKED entry is delivered to the user and then unsubscribes
//!   it). A snapshot read ahead of the hub (its heads past the hub's position) is installed
//!   only once the hub has reached those heads: the connection then goes live there, and
//!   everything before comes from the store's replay, so a leave the snapshot already shows
//!   still reaches the user in order.
//! - `slots.rs` — delivery: one bounded queue per connection (events and bytes), a message
//!   event encoded once and shared by every connection that gets it; a full queue means a slow
//!   consumer, dropped from delivery and told (the client resumes from its last cursor).
//! - `live.rs` — live signals (never stored, no place in the log): read receipts coalesced
//!   per member and conversation; typing and other signals, and presence, go to the members
//!   connected here as they come, into the room a queue has to spare (never making a slow
//!   consumer).
//! - `window.rs` — the replay window: the most recent entries in memory, bounded in bytes, so
//!   that a resume is answered without the store whenever that answer is
//!   exactly the store's (see its docs for when it is).
//! - `streams.rs` — streaming messages: the text so far of each open stream, from its deltas
//!   in order, for snapshots to connections that arrive mid-stream.
//!
//! This file: the handle ([`Hub`]) and the task that owns the six and runs their I/O.

mod live;
mod members;
mod order;
mod slots;
mod streams;
mod window;

use std::sync::Arc;
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use quickim_shared::bus::{Bus, BusError, Headers, Incoming};
use quickim_shared::error::ServiceError;
use quickim_shared::position::Position;
use quickim_shared::protocol::event::{BusEntry, HEADS_SUBJECT, LIVE_SUBJECT, LOG_SUBJECT, Live, LogEntry};
use quickim_shared::protocol::service::{GetHeads, GetMemberships, LogHeads, ReadLog};
use quickim_shared::protocol::system::MembershipChange;
use quickim_shared::rpc::RpcClient;
use quickim_shared::telemetry::{TraceContext, set_parent};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::cursor;
use super::event::Encoded;
use super::queue::{self, Closed, Inbox, Outbox};
use live::Receipts;
use members::{Change, Installed, Joined, Members, Snapshot};
use order::{Heads, LogOrder, Stall};
use slots::Slots;
use streams::Streams;
use window::Window;

/// Identifies a connection to the hub.
pub type SessionId = u64;

/// Snapshots fetched at once.
const SNAPSHOT_CONCURRENCY: usize = 64;

/// How the hub follows the log.
#[derive(Debug, Clone, Copy)]
pub struct HubConfig {
    /// How long a gap may stay open before it is filled from the store.
    pub gap_fill: Duration,
    /// How long a partition may stay behind its known head before the node stalls.
    pub stall_after: Duration,
    /// Most bytes of early entries held back, all partitions together.
    pub max_held_bytes: usize,
    /// `typing` events tell receivers to show it this long (ms).
    pub typing_ttl_ms: u64,
    /// Longest text of a streaming message kept for snapshots.
    pub max_content_bytes: usize,
    /// Most bytes of recent entries kept to answer resumes (0: off).
    pub replay_window_bytes: usize,
    /// Cursors older than this get `resync` (ms).
    pub replay_retention_ms: i64,
    /// Most entries per replay page.
    pub replay_page: usize,
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
            typing_ttl_ms: config.typing_ttl_s * 1000,
            max_content_bytes: config.max_content_bytes,
            replay_window_bytes: config.hub_replay_window_bytes,
            replay_retention_ms: i64::try_from(config.replay_retention_s.saturating_mul(1000)).unwrap_or(i64::MAX),
            replay_page: config.replay_page as usize,
        }
    }
}

/// What the hub sends a connection.
#[derive(Debug)]
pub enum Outgoing {
    /// A message event.
    Event(Arc<Encoded>),
    /// Before [`Outgoing::Installed`], to a connection that resumes: what it missed up to
    /// that position, from the replay window (without it: read the store).
    Replayed(Box<Vec<Arc<LogEntry>>>),
    /// The connection is live: it gets every entry after this position.
    Installed(Arc<Position>),
    /// The user's memberships could not be read; the connection should close and retry.
    InstallFailed,
}

/// How an attached connection starts.
#[derive(Debug)]
pub enum Start {
    /// Live at once, from this position.
    Live(Arc<Position>),
    /// Wait for [`Outgoing::Installed`] (the user's memberships are being read).
    Waiting,
}

/// A connection attached to the hub; detaches on drop.
pub struct Attachment {
    /// Its id.
    pub id: SessionId,
    /// How it starts.
    pub start: Start,
    /// When it resumes and starts live: what it missed, from the replay window (None: read
    /// the store).
    pub replayed: Option<Box<Vec<Arc<LogEntry>>>>,
    hub: Hub,
}

impl Drop for Attachment {
    fn drop(&mut self) {
        self.hub.detach(self.id);
    }
}

enum Command {
    Attach { user: String, client: Option<(u32, Position)>, outbox: Outbox, reply: oneshot::Sender<Attached> },
    Detach { id: SessionId },
    Install { user: Arc<str>, snapshot: Option<Snapshot> },
    Filled { part: u16, result: Result<Vec<LogEntry>, String> },
    Snapshots { user: String, reply: oneshot::Sender<Vec<Arc<Encoded>>> },
}

/// The hub's answer to an attach: the session's id, how it starts, what it missed (from the
/// replay window).
type Attached = (SessionId, Start, Option<Box<Vec<Arc<LogEntry>>>>);

/// What every connection may read without asking the hub.
struct Published {
    ready: AtomicBool,
    /// A partition stayed behind too long (see the module docs).
    stalled: AtomicBool,
    /// When the log's heads were last heard of (ms since the epoch): the message services
    /// announce them every second, read from the database.
    heads_at: AtomicI64,
    /// Streams open at this node: while none is, a new connection asks for no snapshots.
    open_streams: std::sync::atomic::AtomicUsize,
    /// (epoch, position, encoded cursor) after the last dispatched entry.
    position: RwLock<(u32, Arc<Position>, Arc<str>)>,
}

/// Handle to the hub task.
#[derive(Clone)]
pub struct Hub {
    cmds: mpsc::Sender<Command>,
    published: Arc<Published>,
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
        let live = bus.subscribe(LIVE_SUBJECT, None).await?;
        let (cmds, cmd_rx) = mpsc::channel(8192);
        let published = Arc::new(Published {
            ready: AtomicBool::new(false),
            stalled: AtomicBool::new(false),
            heads_at: AtomicI64::new(0),
            open_streams: std::sync::atomic::AtomicUsize::new(0),
            position: RwLock::new((0, Arc::new(Position::default()), Arc::from(""))),
        });
        let hub = Hub { cmds: cmds.clone(), published: published.clone() };
        tokio::spawn(async move {
            let Some(start) = initial_heads(&rpc, &shutdown).await else {
                return;
            };
            let mut task = HubTask::new(start, rpc, cmds, published, config);
            task.run(futures::stream::select(futures::stream::select(log, heads), live), cmd_rx, shutdown).await;
        });
        Ok(hub)
    }

    /// Whether the hub knows where the log is and keeps up with it.
    pub fn is_ready(&self) -> bool {
        self.published.ready.load(Ordering::Relaxed) && !self.is_stalled()
    }

    /// How long ago the log's heads were last heard of (a message service and its database
    /// answer every second), if ever.
    pub fn heads_age(&self) -> Option<Duration> {
        let at = self.published.heads_at.load(Ordering::Relaxed);
        (at > 0).then(|| Duration::from_millis(u64::try_from(quickim_shared::time::now_ms() - at).unwrap_or(0)))
    }

    /// Whether a partition stayed behind the log too long (the node serves no connection
    /// until it has caught up).
    pub fn is_stalled(&self) -> bool {
        self.published.stalled.load(Ordering::Relaxed)
    }

    /// The database epoch, the position every connection has been served up to, and its
    /// encoded cursor.
    pub fn position(&self) -> (u32, Arc<Position>, Arc<str>) {
        self.published.position.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Attaches a connection of `user_id` that resumes from `client` (if any: the epoch and
    /// position of its cursor); its queue holds at most `max_events` events and `max_bytes`
    /// bytes.
    pub async fn attach(
        &self,
        user_id: &str,
        client: Option<(u32, Position)>,
        max_events: usize,
        max_bytes: usize,
    ) -> Result<(Attachment, Inbox), HubGone> {
        let (outbox, inbox) = queue::queue(max_events, max_bytes);
        let (reply, answer) = oneshot::channel();
        self.cmds
            .send(Command::Attach { user: user_id.to_string(), client, outbox, reply })
            .await
            .map_err(|_| HubGone)?;
        let (id, start, replayed) = answer.await.map_err(|_| HubGone)?;
        Ok((Attachment { id, start, replayed, hub: self.clone() }, inbox))
    }

    /// Snapshots of the open streams in `user_id`'s conversations that have streamed
    /// something (for a connection that arrives mid-stream).
    pub async fn stream_snapshots(&self, user_id: &str) -> Result<Vec<Arc<Encoded>>, HubGone> {
        // The common case — no stream open here — costs a connection no round trip.
        if self.published.open_streams.load(Ordering::Relaxed) == 0 {
            return Ok(Vec::new());
        }
        let (reply, answer) = oneshot::channel();
        self.cmds.send(Command::Snapshots { user: user_id.to_string(), reply }).await.map_err(|_| HubGone)?;
        answer.await.map_err(|_| HubGone)
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

/// The hub task: the log in order, the membership index and the delivery slots, and the
/// reads (snapshots, gap fills) they ask for.
struct HubTask {
    order: LogOrder,
    members: Members,
    slots: Slots,
    receipts: Receipts,
    streams: Streams,
    window: Window,
    rpc: RpcClient,
    cmds: mpsc::Sender<Command>,
    published: Arc<Published>,
    config: HubConfig,
    snapshots: Arc<Semaphore>,
}

impl HubTask {
    fn new(
        heads: LogHeads,
        rpc: RpcClient,
        cmds: mpsc::Sender<Command>,
        published: Arc<Published>,
        config: HubConfig,
    ) -> HubTask {
        let n = heads.heads.len();
        let task = HubTask {
            window: Window::new(&heads.heads, config.replay_window_bytes),
            order: LogOrder::new(heads, config),
            members: Members::default(),
            slots: Slots::default(),
            receipts: Receipts::default(),
            streams: Streams::new(config.max_content_bytes),
            rpc,
            cmds,
            published,
            config,
            snapshots: Arc::new(Semaphore::new(SNAPSHOT_CONCURRENCY)),
        };
        task.publish_position();
        task.published.heads_at.store(quickim_shared::time::now_ms(), Ordering::Relaxed);
        task.published.ready.store(true, Ordering::Relaxed);
        tracing::info!(epoch = task.order.epoch, partitions = n, "hub ready");
        task
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
        let mut held_receipts = tokio::time::interval(live::RECEIPT_INTERVAL / 5);
        held_receipts.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(cmd) = cmds.recv() => self.command(cmd),
                Some(msg) = bus.next() => self.incoming(msg),
                _ = tick.tick() => {
                    for read in self.order.due_fills(Instant::now()) {
                        self.fill(read);
                    }
                    self.watch_lag();
                }
                _ = sweep.tick() => {
                    self.members.sweep();
                    self.streams.sweep(Instant::now());
                    self.window.expire(quickim_shared::time::now_ms(), self.config.replay_retention_ms);
                    metrics::gauge!("quickim_hub_window_bytes").set(self.window.bytes() as f64);
                }
                _ = held_receipts.tick() => {
                    for (conversation, user, read) in self.receipts.due(Instant::now()) {
                        self.deliver_read(&conversation, &user, read);
                    }
                }
            }
        }
        self.published.ready.store(false, Ordering::Relaxed);
    }

    fn publish_position(&self) {
        let position = &self.order.position;
        let cursor: Arc<str> = Arc::from(cursor::encode(self.order.epoch, position));
        let mut published = self.published.position.write().unwrap_or_else(|e| e.into_inner());
        *published = (self.order.epoch, Arc::new(position.clone()), cursor);
    }

    // ------------------------------------------------------------ connections

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Attach { user, client, outbox, reply } => self.attach(user, client, outbox, reply),
            Command::Detach { id } => self.detach(id),
            Command::Install { user, snapshot } => {
                let installed = self.members.install(&user, snapshot, &self.order.position);
                self.installed(installed);
            }
            Command::Filled { part, result } => self.filled(part, result),
            Command::Snapshots { user, reply } => {
                let members = &self.members;
                let snapshots = self
                    .streams
                    .snapshots(|c| members.member_of(&user, c))
                    .into_iter()
                    .map(|(c, msg_id, seq, text)| Encoded::stream_snapshot(&c, msg_id, seq, &text))
                    .collect();
                let _ = reply.send(snapshots);
            }
        }
    }

    fn attach(
        &mut self,
        user: String,
        client: Option<(u32, Position)>,
        outbox: Outbox,
        reply: oneshot::Sender<Attached>,
    ) {
        let user = self.members.key(&user);
        let (epoch, resume) = client.unzip();
        // A cursor of another database (replaced meanwhile) is no position here.
        let slot_client = resume.clone().filter(|_| epoch == Some(self.order.epoch));
        let id = self.slots.add(user.clone(), outbox, slot_client);
        let mut replayed = None;
        let start = match self.members.connect(&user, id) {
            Joined::Installed => {
                self.slots.go_live(id, &self.order.position);
                if let Some(after) = resume.filter(|c| self.order.position.ahead_of(c)) {
                    replayed = self.window_replay(&user, epoch, &after).map(Box::new);
                }
                Start::Live(Arc::new(self.order.position.clone()))
            }
            Joined::Waiting { fetch } => {
                if fetch {
                    self.fetch_snapshot(user);
                }
                Start::Waiting
            }
        };
        if reply.send((id, start, replayed)).is_err() {
            self.detach(id);
        }
    }

    /// What `user` (installed) missed after `after`, up to the hub's position, if the replay
    /// window can answer it exactly.
    fn window_replay(&self, user: &Arc<str>, epoch: Option<u32>, after: &Position) -> Option<Vec<Arc<LogEntry>>> {
        let memberships = self.members.memberships(user)?;
        let answer = if epoch != Some(self.order.epoch) {
            Err(window::Miss::OtherEpoch)
        } else if self.order.lag().any(|behind| behind > 0) {
            Err(window::Miss::Behind)
        } else {
            self.window.replay(
                user,
                memberships,
                after,
                &self.order.position,
                quickim_shared::time::now_ms(),
                self.config.replay_retention_ms,
                self.config.replay_page,
            )
        };
        let source = match &answer {
            Ok(_) => "window",
            Err(miss) => miss.name(),
        };
        metrics::counter!("quickim_hub_window_replays_total", "answer" => source).increment(1);
        answer.ok()
    }

    fn detach(&mut self, id: SessionId) {
        if let Some(user) = self.slots.remove(id) {
            self.members.disconnect(&user, id);
        }
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

    fn installed(&mut self, installed: Installed) {
        match installed {
            Installed::Now(sessions) => self.go_live(&sessions),
            Installed::Failed(sessions) => self.slots.install_failed(&sessions),
            Installed::Later | Installed::Nobody => {}
        }
    }

    // ------------------------------------------------------------ the log

    fn incoming(&mut self, msg: Incoming) {
        if msg.subject == LIVE_SUBJECT {
            self.live(&msg.payload);
            return;
        }
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
                    self.take(e.entry, e.trace);
                }
                self.after_entries();
            }
            Err(e) => tracing::warn!(error = %e, subject = %msg.subject, "undecodable log entries"),
        }
    }

    // ------------------------------------------------------------ live signals

    fn live(&mut self, payload: &[u8]) {
        match serde_json::from_slice::<Live>(payload) {
            Ok(Live::Read { conversation_id, user_id, read_msg_id }) => {
                if let Some(read) = self.receipts.note(&conversation_id, &user_id, read_msg_id, Instant::now()) {
                    self.deliver_read(&conversation_id, &user_id, read);
                }
            }
            Ok(Live::Signal { conversation_id, from, kind, content }) => {
                let event =
                    Encoded::signal(&conversation_id, &from, kind, content.as_deref(), self.config.typing_ttl_ms);
                let n = self.slots.deliver_live(self.members.connected(&conversation_id), &event, Some(&from));
                metrics::counter!("quickim_live_signals_delivered_total", "kind" => kind.name()).increment(n);
            }
            Ok(Live::Delta { conversation_id, msg_id, seq, delta }) => {
                let conversation = self.members.conversation(&conversation_id);
                let ready = self.streams.delta(&conversation, msg_id, seq, delta, Instant::now());
                deliver_deltas(&self.members, &self.slots, &conversation, msg_id, ready);
            }
            Ok(Live::Presence { user_id, online, last_seen, conversations }) => {
                let event = Encoded::presence(&user_id, online, last_seen);
                let ids: std::collections::HashSet<SessionId> =
                    conversations.iter().flat_map(|c| self.members.connected(c)).collect();
                let n = self.slots.deliver_live(ids.into_iter(), &event, Some(&user_id));
                metrics::counter!("quickim_live_signals_delivered_total", "kind" => "presence").increment(n);
            }
            Err(e) => tracing::warn!(error = %e, "undecodable live signal"),
        }
    }

    /// A `read` event to every connection of the conversation's members here (the reader's
    /// other devices included).
    fn deliver_read(&self, conversation: &str, user: &str, read: u64) {
        let event = Encoded::read(conversation, user, read);
        let n = self.slots.deliver_live(self.members.connected(conversation), &event, None);
        metrics::counter!("quickim_live_signals_delivered_total", "kind" => "read").increment(n);
    }

    /// Entries were taken: the position is published, snapshots it reached installed.
    fn after_entries(&mut self) {
        self.publish_position();
        for sessions in self.members.install_reached(&self.order.position) {
            self.go_live(&sessions);
        }
    }

    /// Connections whose user's memberships were just installed go live at the hub's
    /// position; those that resume get what they missed from the replay window first, when
    /// it has it.
    fn go_live(&mut self, sessions: &[SessionId]) {
        for &id in sessions {
            let Some((user, Some(after))) = self.slots.resume_of(id) else { continue };
            if !self.order.position.ahead_of(&after) {
                continue;
            }
            if let Some(entries) = self.window_replay(&user, Some(self.order.epoch), &after) {
                self.slots.push_control(id, Outgoing::Replayed(Box::new(entries)));
            }
        }
        self.slots.installed(sessions, &self.order.position);
    }

    fn heads(&mut self, heads: LogHeads) {
        match self.order.heads(&heads) {
            Heads::Noted => self.published.heads_at.store(quickim_shared::time::now_ms(), Ordering::Relaxed),
            Heads::Replaced => {
                tracing::error!(
                    old = self.order.epoch,
                    new = heads.epoch,
                    "the database changed under the gateway; restarting delivery"
                );
                // Every connection starts over (its cursor gets resync).
                self.slots.clear();
                self.members.clear();
                self.window.clear(&heads.heads);
                self.order = LogOrder::new(heads, self.config);
                self.publish_position();
            }
        }
    }

    /// Takes one entry; whatever it makes dispatchable is delivered.
    fn take(&mut self, entry: LogEntry, headers: Headers) {
        let (members, slots, streams, window, epoch) =
            (&mut self.members, &mut self.slots, &mut self.streams, &mut self.window, self.order.epoch);
        self.order.take(entry, headers, |position, entry, headers| {
            let stream = stream_change(&entry.message);
            let conversation = members.conversation(&entry.message.conversation_id);
            let change = dispatch(members, slots, epoch, position, &entry, headers);
            window.push(conversation.clone(), entry, change.as_ref());
            match stream {
                Some(StreamChange::Opened(msg_id)) => {
                    let ready = streams.opened(&conversation, msg_id);
                    deliver_deltas(members, slots, &conversation, msg_id, ready);
                }
                Some(StreamChange::Ended(msg_id)) => streams.ended(&conversation, msg_id),
                None => {}
            }
        });
        self.published.open_streams.store(self.streams.len(), Ordering::Relaxed);
    }

    /// Reads a page of a gap from the store.
    fn fill(&self, read: ReadLog) {
        metrics::counter!("quickim_hub_gap_fills_total").increment(1);
        let (rpc, cmds) = (self.rpc.clone(), self.cmds.clone());
        tokio::spawn(async move {
            let result = match rpc.call(&read).await {
                Ok(entries) if entries.is_empty() => {
                    Err(format!("the store has no entries after {} up to {}", read.after, read.upto))
                }
                Ok(entries) => Ok(entries),
                Err(e) => Err(e.message),
            };
            let _ = cmds.send(Command::Filled { part: read.part, result }).await;
        });
    }

    /// A gap-fill page came back: taken, then the next page read at once while the gap stays
    /// open (as fast as the store answers, not a page per tick).
    fn filled(&mut self, part: u16, result: Result<Vec<LogEntry>, String>) {
        let ok = match result {
            Ok(entries) => {
                metrics::counter!("quickim_hub_gap_filled_entries_total").increment(entries.len() as u64);
                for e in entries {
                    self.take(e, Headers::new());
                }
                self.after_entries();
                true
            }
            Err(error) => {
                metrics::counter!("quickim_hub_gap_fill_failures_total").increment(1);
                let failures = self.order.failures(part) + 1;
                tracing::warn!(part, failures, %error, "gap fill failed; retrying");
                false
            }
        };
        if let Some(next) = self.order.filled(part, ok) {
            self.fill(next);
        }
    }

    /// Measures how far behind the log each partition is, and stalls or resumes the node.
    fn watch_lag(&mut self) {
        for (p, lag) in self.order.lag().enumerate() {
            metrics::gauge!("quickim_hub_lag_entries", "partition" => p.to_string()).set(lag as f64);
        }
        metrics::gauge!("quickim_hub_held_bytes").set(self.order.held_bytes() as f64);
        match self.order.watch(Instant::now()) {
            Stall::Began => {
                tracing::error!(
                    behind = ?self.order.lag().collect::<Vec<_>>(),
                    "the hub fell behind the log; closing connections until it has caught up"
                );
                self.published.stalled.store(true, Ordering::Relaxed);
                metrics::gauge!("quickim_hub_stalled").set(1.0);
                metrics::counter!("quickim_hub_stalls_total").increment(1);
                self.slots.close_all(Closed::Behind);
            }
            Stall::Ended => {
                tracing::info!("the hub has caught up with the log; serving again");
                self.published.stalled.store(false, Ordering::Relaxed);
                metrics::gauge!("quickim_hub_stalled").set(0.0);
            }
            Stall::Same => {}
        }
    }
}

/// Delivers one entry (the hub now at `position`): a membership change is applied around its
/// delivery (a joiner gets its JOINED entry, a leaver its LEFT entry, and nothing after).
/// What a log entry does to streaming messages.
enum StreamChange {
    Opened(u64),
    Ended(u64),
}

fn stream_change(message: &quickim_shared::protocol::api::Message) -> Option<StreamChange> {
    if message.streaming && message.msg_type >= 0 {
        return Some(StreamChange::Opened(message.msg_id));
    }
    if message.msg_type != quickim_shared::protocol::system::REVISED {
        return None;
    }
    let revised: quickim_shared::protocol::system::Revised = serde_json::from_str(&message.content).ok()?;
    use quickim_shared::protocol::system::Action;
    matches!(revised.action, Action::Finish | Action::Cancel).then_some(StreamChange::Ended(revised.msg_id))
}

/// Stream deltas, in order, to the connections of the conversation's members here.
fn deliver_deltas(members: &Members, slots: &Slots, conversation: &str, msg_id: u64, ready: streams::Ready) {
    for (seq, delta) in ready {
        let event = Encoded::stream_delta(conversation, msg_id, seq, &delta);
        let n = slots.deliver_live(members.connected(conversation), &event, None);
        metrics::counter!("quickim_live_signals_delivered_total", "kind" => "stream").increment(n);
    }
}

fn dispatch(
    members: &mut Members,
    slots: &mut Slots,
    epoch: u32,
    position: &Position,
    entry: &LogEntry,
    headers: &Headers,
) -> Option<MembershipChange> {
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
    let message = &entry.message;
    let msg_id = message.msg_id;
    let change = MembershipChange::of(message);
    let conversation = members.conversation(&message.conversation_id);

    if let Some(MembershipChange::Joined(users)) = &change {
        for u in users {
            members.change(u, p, entry.offset, &conversation, msg_id, Change::Join);
        }
    }
    let delivered =
        slots.deliver(members.recipients(&conversation, msg_id), message, (epoch, p, entry.offset), position, &trace);
    metrics::counter!("quickim_hub_deliveries_total").increment(delivered.queued);
    span.record("deliveries", delivered.queued);
    if let Some(MembershipChange::Left(users) | MembershipChange::Kicked(users)) = &change {
        for u in users {
            members.change(u, p, entry.offset, &conversation, msg_id, Change::Leave);
        }
    }
    for id in delivered.overflowed {
        metrics::counter!("quickim_slow_consumer_disconnects_total").increment(1);
        if let Some(user) = slots.remove(id) {
            members.disconnect(&user, id);
        }
    }
    slots.catch_up(position);
    change
}

/// Reads all of a user's memberships, page by page.
async fn read_snapshot(rpc: &RpcClient, user: &str) -> Result<Snapshot, ServiceError> {
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
