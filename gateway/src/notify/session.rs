//! The session core: every /notify connection, whatever its transport, is one of these.
//!
//! Opening a session: register the connection (per-user limit, kick handle), attach it to
//! the hub and wait until it is live at hub position H. Then the session produces, in order:
//! 1. `ready` — with the client's cursor when resuming, else the cursor of H; then, when
//!    resuming, the read receipts that moved since about when that cursor was made;
//! 2. when resuming from cursor C: every message the user missed with C < offset ≤ H, read
//!    from the store page by page (or `resync` when C is older than the retention window or
//!    from another database);
//! 3. snapshots of the streaming messages in progress (their text so far);
//! 4. live events from the hub: everything after H.
//!
//! Replay and live meet exactly at H, so nothing is lost or sent twice. Transports take
//! events with [`Session::next`] (cancel-safe: a store read in flight survives a cancelled
//! call, so it can sit in a `select!` with pings and client frames) and batch what is ready
//! with [`Session::try_next`]. A session holds what it uses — the hub, the services, its
//! registration — never the gateway's whole state.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use quickim_shared::error::{ErrorCode, ServiceError};
use quickim_shared::position::Position;
use quickim_shared::protocol::event::LogEntry;
use quickim_shared::protocol::service::{GetReceipts, Replay, ReplayPage};
use quickim_shared::rpc::RpcClient;
use quickim_shared::telemetry::TraceContext;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::cursor::{self, Cursor};
use super::disconnect::Disconnect;
use super::event::{Encoded, EventKind, ResyncReason, Transport};
use super::hub::{Attachment, Hub, Outgoing, Start};
use super::queue::{Closed, Inbox};
use super::registry::{Registration, Registry};
use crate::auth::Caller;
use crate::error::ApiError;

/// How long a new connection may wait for its memberships to be read.
const INSTALL_TIMEOUT: Duration = Duration::from_secs(10);

/// A resume gets the read receipts that moved from this long before its cursor was made
/// (covers the hub's coalescing, the bus and clocks apart; a receipt is a position, so one
/// seen twice changes nothing).
const RECEIPTS_MARGIN_MS: i64 = 60_000;

/// Most receipts a resume gets (pages of the conversation service); past it the client
/// reloads read positions over HTTP (docs/protocol.md).
const RESUME_RECEIPTS_MAX: usize = 5_000;

/// The next thing a transport should do.
pub enum Step {
    /// Write this event.
    Event(Arc<Encoded>),
    /// Write the disconnect's final event (if any) and close.
    Close(Disconnect),
}

/// What a session needs from the gateway to open.
pub struct Context<'a> {
    /// Delivery.
    pub hub: &'a Hub,
    /// The services (replays).
    pub rpc: &'a RpcClient,
    /// Open connections (per-user limit, kicks, presence).
    pub registry: &'a Arc<Registry>,
    /// Cancelled when the node shuts down.
    pub shutdown: &'a CancellationToken,
    /// Whether the node refuses new streams (shutting down).
    pub draining: bool,
    /// `max_connections_per_user`.
    pub max_connections_per_user: u32,
    /// `queue_max_events`, `queue_max_bytes`.
    pub queue: (usize, usize),
    /// `replay_page`.
    pub replay_page: u32,
}

/// A replay in progress: entries with `after < offset <= upto` remain.
struct ReplayState {
    after: Position,
    upto: Position,
    /// All of them (at most one page), when the hub's replay window had them (else they are
    /// read from the store).
    window: Option<Vec<Arc<LogEntry>>>,
}

type PageRead = Pin<Box<dyn Future<Output = Result<ReplayPage, ServiceError>> + Send>>;

/// One client connection.
pub struct Session {
    transport: Transport,
    /// The connect span's context: replay pages are its children.
    trace: Option<TraceContext>,
    hub: Hub,
    rpc: RpcClient,
    caller: Caller,
    _registration: Registration,
    kicked: CancellationToken,
    _attachment: Attachment,
    inbox: Inbox,
    epoch: u32,
    buffered: VecDeque<Arc<Encoded>>,
    /// Boxed: a connection carries it only while it replays.
    replay: Option<Box<ReplayState>>,
    /// The replay page being read (kept across cancelled calls of `next`).
    reading: Option<PageRead>,
    replay_page: u32,
    /// Where the client is ahead of the hub (it came from a node further along).
    ahead: Option<Position>,
    /// Snapshots of streams in progress, given once the replay is done (after the messages
    /// that opened them).
    after_replay: Vec<Arc<Encoded>>,
    /// The last cursor the client was given.
    cursor: Arc<str>,
    /// Whether a resume was asked for.
    resumed: bool,
    expires: Instant,
    shutdown: CancellationToken,
    replayed: u64,
}

impl Session {
    /// Opens a session for `caller`, resuming after `resume` if given.
    pub async fn open(
        cx: Context<'_>,
        caller: Caller,
        transport: Transport,
        resume: Option<Cursor>,
    ) -> Result<Session, ApiError> {
        let span = tracing::info_span!(
            "notify.connect",
            otel.kind = "server",
            network.protocol.name = transport.name(),
            enduser.id = %caller.user_id,
            resumed = resume.is_some(),
        );
        Self::open_in(cx, caller, transport, resume).instrument(span).await
    }

    async fn open_in(
        cx: Context<'_>,
        caller: Caller,
        transport: Transport,
        resume: Option<Cursor>,
    ) -> Result<Session, ApiError> {
        if cx.draining {
            return Err(ApiError::new(ErrorCode::Unavailable, "this node is shutting down; connect to another"));
        }
        if !cx.hub.is_ready() {
            return Err(ApiError::new(ErrorCode::Unavailable, "not ready yet, try again"));
        }
        let registration = cx
            .registry
            .register(&caller.user_id, &caller.platform, caller.issued_ms, cx.max_connections_per_user)
            .map_err(|_| {
                ApiError::new(
                    ErrorCode::TooManyConnections,
                    format!("at most {} connections per user", cx.max_connections_per_user),
                )
            })?;
        let (epoch, position, _) = cx.hub.position();
        let mut resync_reason = None;
        let client = match &resume {
            Some(c) if c.epoch == epoch && c.position.partitions() == position.partitions() => Some(c.position.clone()),
            Some(_) => {
                resync_reason = Some(ResyncReason::CursorFromAnotherDatabase);
                None
            }
            None => None,
        };
        let (mut attachment, mut inbox) = cx
            .hub
            .attach(&caller.user_id, client.clone().map(|c| (epoch, c)), cx.queue.0, cx.queue.1)
            .await
            .map_err(|_| ApiError::new(ErrorCode::Unavailable, "shutting down"))?;
        let mut replayed = attachment.replayed.take();
        let live_from: Arc<Position> = match &attachment.start {
            Start::Live(p) => p.clone(),
            Start::Waiting => {
                let deadline = Instant::now() + INSTALL_TIMEOUT;
                loop {
                    match tokio::time::timeout_at(deadline, inbox.recv()).await {
                        Ok(Ok(Outgoing::Replayed(entries))) => replayed = Some(entries),
                        Ok(Ok(Outgoing::Installed(p))) => break p,
                        _ => {
                            return Err(ApiError::new(ErrorCode::Unavailable, "cannot read memberships, try again"));
                        }
                    }
                }
            }
        };
        let live_cursor: Arc<str> = Arc::from(cursor::encode(epoch, &live_from));
        let mut buffered = VecDeque::new();
        let mut replay = None;
        let mut ahead = None;
        let cursor = match (&client, resync_reason) {
            (Some(c), _) => {
                let made_s = resume.as_ref().map_or(0, |r| r.made_s);
                let given: Arc<str> = Arc::from(cursor::encode_made(epoch, c, made_s));
                buffered.push_back(Encoded::ready(given.clone()));
                if made_s > 0 {
                    let since_ms = i64::try_from(made_s).unwrap_or(i64::MAX / 1000) * 1000 - RECEIPTS_MARGIN_MS;
                    missed_receipts(cx.rpc, &caller.user_id, since_ms, &mut buffered).await;
                }
                if live_from.ahead_of(c) {
                    let window = replayed.take().map(|entries| *entries);
                    replay = Some(Box::new(ReplayState { after: c.clone(), upto: (*live_from).clone(), window }));
                }
                if c.ahead_of(&live_from) {
                    ahead = Some(c.clone());
                }
                given
            }
            (None, Some(reason)) => {
                buffered.push_back(Encoded::ready(live_cursor.clone()));
                buffered.push_back(Encoded::resync(live_cursor.clone(), reason));
                live_cursor
            }
            (None, None) => {
                buffered.push_back(Encoded::ready(live_cursor.clone()));
                live_cursor
            }
        };
        // Streams in progress: their text so far, after the replay (live deltas queue from now).
        let mut after_replay = cx
            .hub
            .stream_snapshots(&caller.user_id)
            .await
            .map_err(|_| ApiError::new(ErrorCode::Unavailable, "shutting down"))?;
        if replay.is_none() {
            buffered.extend(after_replay.drain(..));
        }
        let expires = Instant::now()
            + Duration::from_millis(u64::try_from(caller.expires_ms - quickim_shared::time::now_ms()).unwrap_or(0));
        metrics::counter!("quickim_notify_connects_total", "protocol" => transport.name(), "resume" => if resume.is_some() { "yes" } else { "no" })
            .increment(1);
        metrics::gauge!("quickim_notify_connections", "protocol" => transport.name()).increment(1.0);
        Ok(Session {
            transport,
            trace: TraceContext::current(),
            hub: cx.hub.clone(),
            rpc: cx.rpc.clone(),
            kicked: registration.kicked.clone(),
            _registration: registration,
            _attachment: attachment,
            inbox,
            epoch,
            buffered,
            replay,
            reading: None,
            replay_page: cx.replay_page,
            ahead,
            after_replay,
            cursor,
            resumed: resume.is_some(),
            caller,
            expires,
            shutdown: cx.shutdown.clone(),
            replayed: 0,
        })
    }

    /// The session's transport.
    pub fn transport(&self) -> Transport {
        self.transport
    }

    /// Records that `event` was written to the client: counted by transport, the delivery
    /// lag measured, and — when its trace is recorded — a `notify.write` span, child of the
    /// hub's delivery, around `write`.
    pub async fn written<R>(&mut self, event: &Encoded, write: impl Future<Output = R>) -> R {
        let Some(meta) = &event.meta else { return write.await };
        let result = match &meta.trace {
            Some(trace) => {
                let span = tracing::info_span!(
                    "notify.write",
                    otel.name = %format_args!("write {}", self.transport.name()),
                    otel.kind = "producer",
                    network.protocol.name = self.transport.name(),
                    enduser.id = %self.caller.user_id,
                    conversation_id = %meta.conversation_id,
                    msg_id = meta.msg_id,
                );
                trace.adopt(&span);
                write.instrument(span).await
            }
            None => write.await,
        };
        let (delivered, lag) = delivery_metrics(self.transport);
        delivered.increment(1);
        lag.record((quickim_shared::time::now_ms() - meta.send_time).max(0) as f64 / 1000.0);
        result
    }

    /// Continues a parked long-poll session for a new request of the same client (whose
    /// token may be a newer one).
    pub fn renew(&mut self, caller: Caller) {
        self.expires = Instant::now()
            + Duration::from_millis(u64::try_from(caller.expires_ms - quickim_shared::time::now_ms()).unwrap_or(0));
        self.caller = caller;
        self.resumed = true;
    }

    /// Whether the user's connections were kicked.
    pub fn is_kicked(&self) -> bool {
        self.kicked.is_cancelled()
    }

    /// The authenticated user.
    pub fn caller(&self) -> &Caller {
        &self.caller
    }

    /// The last cursor handed to the client.
    pub fn cursor(&self) -> &Arc<str> {
        &self.cursor
    }

    /// The last cursor handed out, tagged with this session: a long-poll answer's cursor,
    /// under which the session is parked (another client of the same user at the same
    /// position gets a cursor of its own, so it never takes this session over).
    pub fn poll_cursor(&self) -> Arc<str> {
        Arc::from(cursor::tagged(&self.cursor, self._attachment.id))
    }

    /// Whether the client asked to resume.
    pub fn resumed(&self) -> bool {
        self.resumed
    }

    /// Whether a replay is still to be read from the store.
    pub fn replaying(&self) -> bool {
        self.replay.is_some()
    }

    /// The next step, waiting for it (cancel-safe): what is buffered (ready, replayed
    /// messages), then the replay's next page from the store, then live events — never a
    /// live event before the replay is done (a live event's cursor is past what the replay
    /// has not read).
    pub async fn next(&mut self) -> Step {
        loop {
            if let Some(close) = self.closing() {
                return Step::Close(close);
            }
            if let Some(e) = self.pop() {
                return Step::Event(e);
            }
            if self.replay.is_some() {
                if let Err(d) = self.fill().await {
                    return Step::Close(d);
                }
                continue;
            }
            return self.live().await;
        }
    }

    /// The next event if one is ready without waiting (never starts a store read): for
    /// writing what is ready in one go.
    pub fn try_next(&mut self) -> Option<Arc<Encoded>> {
        if let Some(e) = self.pop() {
            return Some(e);
        }
        if self.replay.is_some() {
            return None;
        }
        loop {
            match self.inbox.try_recv()? {
                Outgoing::Event(e) => {
                    if !e.cursor.is_empty() {
                        self.cursor = e.cursor.clone();
                    }
                    return Some(e);
                }
                _ => continue,
            }
        }
    }

    /// Reads the replay's next page into the buffer (cancel-safe: the read in flight is kept
    /// for the next call).
    pub async fn fill(&mut self) -> Result<(), Disconnect> {
        if let Some(entries) = self.replay.as_mut().and_then(|r| r.window.take()) {
            self.take_entries(entries.iter().map(|e| &**e), false);
            return Ok(());
        }
        if self.reading.is_none() {
            let Some(r) = self.replay.as_ref() else { return Ok(()) };
            let request = Replay {
                user_id: self.caller.user_id.clone(),
                after: r.after.clone(),
                upto: r.upto.clone(),
                limit: self.replay_page,
            };
            let span = tracing::info_span!(
                "notify.replay",
                otel.kind = "internal",
                network.protocol.name = self.transport.name(),
                enduser.id = %self.caller.user_id,
            );
            if let Some(trace) = &self.trace {
                trace.adopt(&span);
            }
            let rpc = self.rpc.clone();
            self.reading = Some(Box::pin(async move { rpc.call(&request).await }.instrument(span)));
        }
        let Some(read) = self.reading.as_mut() else { return Ok(()) };
        let answer = read.await;
        self.reading = None;
        let page = answer.map_err(|e| {
            tracing::warn!(error = %e.message, "replay failed");
            Disconnect::Unavailable
        })?;
        self.take_page(page);
        Ok(())
    }

    fn take_page(&mut self, page: ReplayPage) {
        let Some(r) = self.replay.as_mut() else { return };
        if page.expired {
            let upto: Arc<str> = Arc::from(cursor::encode(self.epoch, &r.upto));
            self.buffered.push_back(Encoded::resync(upto, ResyncReason::CursorExpired));
            self.replay = None;
            self.buffered.extend(self.after_replay.drain(..));
            metrics::counter!("quickim_notify_resyncs_total").increment(1);
            return;
        }
        self.take_entries(page.entries.iter(), page.more);
    }

    /// Buffers replayed entries, each with the cursor just past it; `more`: the replay goes on.
    fn take_entries<'a>(&mut self, entries: impl Iterator<Item = &'a LogEntry>, more: bool) {
        let Some(r) = self.replay.as_mut() else { return };
        for entry in entries {
            let p = usize::from(entry.part);
            if p >= r.after.len() {
                continue;
            }
            // Partitions before this one are complete; this one is at the entry.
            for q in 0..p {
                r.after[q] = r.after[q].max(r.upto[q]);
            }
            r.after[p] = entry.offset;
            let c: Arc<str> = Arc::from(cursor::encode(self.epoch, &r.after));
            self.buffered.push_back(Encoded::message(c, &entry.message, None));
            self.replayed += 1;
        }
        if !more {
            self.replay = None;
            self.buffered.extend(self.after_replay.drain(..));
            metrics::counter!("quickim_notify_replayed_messages_total").increment(self.replayed);
            tracing::debug!(user = %self.caller.user_id, replayed = self.replayed, "replay done");
        }
    }

    /// A buffered event (ready, replayed messages), if any.
    fn pop(&mut self) -> Option<Arc<Encoded>> {
        let e = self.buffered.pop_front()?;
        if !e.cursor.is_empty() {
            self.cursor = e.cursor.clone();
        }
        Some(e)
    }

    /// Why the session must end now, if it must: kicked, shutting down, token expired.
    fn closing(&self) -> Option<Disconnect> {
        if self.kicked.is_cancelled() {
            Some(Disconnect::Kicked)
        } else if self.shutdown.is_cancelled() {
            Some(Disconnect::Shutdown)
        } else if Instant::now() >= self.expires {
            Some(Disconnect::TokenExpired)
        } else {
            None
        }
    }

    /// The next live step (cancel-safe).
    async fn live(&mut self) -> Step {
        loop {
            // Under load the next event is usually queued already: take it without arming a
            // timer and two cancellation waiters (a measurable cost per delivery).
            let item = if let Some(close) = self.closing() {
                return Step::Close(close);
            } else if let Some(item) = self.inbox.try_recv() {
                Ok(item)
            } else {
                tokio::select! {
                biased;
                _ = self.kicked.cancelled() => return Step::Close(Disconnect::Kicked),
                _ = self.shutdown.cancelled() => return Step::Close(Disconnect::Shutdown),
                _ = tokio::time::sleep_until(self.expires) => return Step::Close(Disconnect::TokenExpired),
                    item = self.inbox.recv() => item,
                }
            };
            match item {
                Ok(Outgoing::Event(e)) => {
                    if !e.cursor.is_empty() {
                        self.cursor = e.cursor.clone();
                    }
                    return Step::Event(e);
                }
                Ok(Outgoing::Installed(_) | Outgoing::Replayed(_)) => continue,
                Err(Closed::Overflow) => return Step::Close(Disconnect::SlowConsumer),
                Err(Closed::Behind) => return Step::Close(Disconnect::NodeBehind),
                Ok(Outgoing::InstallFailed) | Err(Closed::HubGone) => return Step::Close(Disconnect::Unavailable),
            }
        }
    }

    /// In the live phase with nothing queued: the hub's position as a `cursor` event, if it
    /// moved past the client's cursor (keeps quiet clients inside the replay window).
    pub fn refresh(&mut self) -> Option<Arc<Encoded>> {
        if self.replaying() || !self.buffered.is_empty() {
            return None;
        }
        // Read the position first, then check the queue: every event up to the position is
        // then either delivered or still queued.
        let (epoch, position, encoded) = self.hub.position();
        if epoch != self.epoch || !self.inbox.is_empty() {
            return None;
        }
        let cursor: Arc<str> = match &self.ahead {
            Some(ahead) if ahead.ahead_of(&position) => Arc::from(cursor::encode(epoch, &ahead.max(&position))),
            _ => {
                self.ahead = None;
                encoded
            }
        };
        if cursor == self.cursor {
            return None;
        }
        self.cursor = cursor.clone();
        Some(Encoded::cursor(cursor))
    }

    /// Whether `e` is the `ready` of a resumed session (a resumed long-poll knows where it
    /// is and gets none).
    pub fn is_resumed_ready(&self, e: &Encoded) -> bool {
        self.resumed && e.kind == EventKind::Ready
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let name = self.transport.name();
        metrics::counter!("quickim_notify_disconnects_total", "protocol" => name).increment(1);
        metrics::gauge!("quickim_notify_connections", "protocol" => name).decrement(1.0);
    }
}

/// The per-transport delivery metrics, looked up once: a registry lookup per delivery was a
/// measurable share of fan-out.
/// Buffers the read receipts of `user`'s conversations that moved at or after `since_ms`.
/// A receipt is a live signal: if they cannot be read the resume goes on without them.
async fn missed_receipts(rpc: &RpcClient, user: &str, since_ms: i64, out: &mut VecDeque<Arc<Encoded>>) {
    let mut after = None;
    let mut taken = 0;
    while taken < RESUME_RECEIPTS_MAX {
        let page = match rpc.call(&GetReceipts { user_id: user.to_string(), since_ms, after: after.take() }).await {
            Ok(page) => page,
            Err(e) => {
                metrics::counter!("quickim_notify_receipt_read_failures_total").increment(1);
                tracing::warn!(error = %e.message, "cannot read the receipts a resume missed");
                return;
            }
        };
        taken += page.receipts.len();
        for r in &page.receipts {
            out.push_back(Encoded::read(&r.conversation_id, &r.user_id, r.read_msg_id));
        }
        match page.receipts.last() {
            Some(last) if page.more => after = Some((last.conversation_id.clone(), last.user_id.clone())),
            _ => return,
        }
    }
}

fn delivery_metrics(transport: Transport) -> &'static (metrics::Counter, metrics::Histogram) {
    static CELLS: [OnceLock<(metrics::Counter, metrics::Histogram)>; 3] =
        [OnceLock::new(), OnceLock::new(), OnceLock::new()];
    let cell = &CELLS[transport as usize];
    cell.get_or_init(|| {
        (
            metrics::counter!("quickim_notify_events_delivered_total", "protocol" => transport.name()),
            metrics::histogram!("quickim_delivery_lag_seconds", "protocol" => transport.name()),
        )
    })
}
