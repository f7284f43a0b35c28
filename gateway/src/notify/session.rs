//! The session core: every /notify connection, whatever its transport, is one of these.
//!
//! Opening a session: register the connection (per-user limit, kick handle), attach it to
//! the hub and wait until it is live at hub position H. Then the session produces, in order:
//! 1. `ready` — with the client's cursor when resuming, else the cursor of H;
//! 2. when resuming from cursor C: every message the user missed with C < offset ≤ H, read
//!    from the store page by page (or `resync` when C is older than the retention window or
//!    from another database);
//! 3. live events from the hub: everything after H.
//!
//! Replay and live meet exactly at H, so nothing is lost or sent twice. Transports call
//! [`Session::pop`] and [`Session::fill`] until the replay is done, then [`Session::live`]
//! (which is cancel-safe, so it can sit in a `select!` with pings and acks).

use std::collections::VecDeque;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use quickim_shared::error::ErrorCode;
use quickim_shared::protocol::service::Replay;
use quickim_shared::telemetry::TraceContext;
use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::cursor::{self, Cursor};
use super::disconnect::Disconnect;
use super::hub::{Attachment, Encoded, Outgoing, Start};
use super::queue::{Closed, Inbox};
use super::registry::Registration;
use crate::auth::Caller;
use crate::http::error::ApiError;
use crate::state::AppState;

/// How long a new connection may wait for its memberships to be read.
const INSTALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The next thing a transport should do.
pub enum Step {
    /// Write this event.
    Event(Arc<Encoded>),
    /// Write the disconnect's final event (if any) and close.
    Close(Disconnect),
}

/// A replay in progress: entries with `after < offset <= upto` remain.
struct ReplayState {
    after: Vec<u64>,
    upto: Vec<u64>,
}

/// One client connection.
pub struct Session {
    protocol: &'static str,
    /// The connect span's context: replay pages are its children.
    trace: Option<TraceContext>,
    state: AppState,
    caller: Caller,
    _registration: Registration,
    kicked: CancellationToken,
    _attachment: Attachment,
    inbox: Inbox,
    epoch: u32,
    buffered: VecDeque<Arc<Encoded>>,
    replay: Option<ReplayState>,
    /// Where the client is ahead of the hub (it came from a node further along).
    ahead: Option<Vec<u64>>,
    /// The last cursor the client was given.
    cursor: Arc<str>,
    /// Whether a resume was asked for.
    resumed: bool,
    expires: Instant,
    shutdown: CancellationToken,
    replayed: u64,
}

#[derive(Serialize)]
struct CursorWire<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    cursor: &'a str,
}

#[derive(Serialize)]
struct ResyncWire<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    cursor: &'a str,
    reason: &'a str,
}

fn simple(kind: &'static str, cursor: Arc<str>) -> Arc<Encoded> {
    let json = serde_json::to_vec(&CursorWire { kind, cursor: &cursor }).unwrap_or_default();
    Arc::new(Encoded { kind, cursor, json: Bytes::from(json), meta: None })
}

fn resync(cursor: Arc<str>, reason: &str) -> Arc<Encoded> {
    let json = serde_json::to_vec(&ResyncWire { kind: "resync", cursor: &cursor, reason }).unwrap_or_default();
    Arc::new(Encoded { kind: "resync", cursor, json: Bytes::from(json), meta: None })
}

impl Session {
    /// Opens a session for `caller`, resuming after `resume` if given.
    pub async fn open(
        state: &AppState,
        caller: Caller,
        protocol: &'static str,
        resume: Option<Cursor>,
    ) -> Result<Session, ApiError> {
        let span = tracing::info_span!(
            "notify.connect",
            otel.kind = "server",
            network.protocol.name = protocol,
            enduser.id = %caller.user_id,
            resumed = resume.is_some(),
        );
        Self::open_in(state, caller, protocol, resume).instrument(span).await
    }

    async fn open_in(
        state: &AppState,
        caller: Caller,
        protocol: &'static str,
        resume: Option<Cursor>,
    ) -> Result<Session, ApiError> {
        if state.is_draining() {
            return Err(ApiError::new(ErrorCode::Unavailable, "this node is shutting down; connect to another"));
        }
        if !state.hub.is_ready() {
            return Err(ApiError::new(ErrorCode::Unavailable, "not ready yet, try again"));
        }
        let registration = state
            .registry
            .register(&caller.user_id, &caller.platform, caller.issued_ms, state.config.max_connections_per_user)
            .map_err(|_| {
                ApiError::new(
                    ErrorCode::TooManyConnections,
                    format!("at most {} connections per user", state.config.max_connections_per_user),
                )
            })?;
        let (epoch, position, _) = state.hub.position();
        let mut resync_reason = None;
        let client = match &resume {
            Some(c) if c.epoch == epoch && c.offsets.len() == position.len() => Some(c.offsets.clone()),
            Some(_) => {
                resync_reason = Some("cursor_from_another_database");
                None
            }
            None => None,
        };
        let (attachment, mut inbox) = state
            .hub
            .attach(&caller.user_id, client.clone(), state.config.queue_max_events, state.config.queue_max_bytes)
            .await
            .map_err(|_| ApiError::new(ErrorCode::Unavailable, "shutting down"))?;
        let live_from: Arc<[u64]> = match &attachment.start {
            Start::Live(p) => p.clone(),
            Start::Waiting => match tokio::time::timeout(INSTALL_TIMEOUT, inbox.recv()).await {
                Ok(Ok(Outgoing::Installed(p))) => p,
                _ => {
                    return Err(ApiError::new(ErrorCode::Unavailable, "cannot read memberships, try again"));
                }
            },
        };
        let live_cursor: Arc<str> = Arc::from(cursor::encode(epoch, &live_from));
        let mut buffered = VecDeque::new();
        let mut replay = None;
        let mut ahead = None;
        let cursor = match (&client, resync_reason) {
            (Some(c), _) => {
                let given: Arc<str> = Arc::from(cursor::encode(epoch, c));
                buffered.push_back(simple("ready", given.clone()));
                if c.iter().zip(live_from.iter()).any(|(c, h)| c < h) {
                    replay = Some(ReplayState { after: c.clone(), upto: live_from.to_vec() });
                }
                if c.iter().zip(live_from.iter()).any(|(c, h)| c > h) {
                    ahead = Some(c.clone());
                }
                given
            }
            (None, Some(reason)) => {
                buffered.push_back(simple("ready", live_cursor.clone()));
                buffered.push_back(resync(live_cursor.clone(), reason));
                live_cursor
            }
            (None, None) => {
                buffered.push_back(simple("ready", live_cursor.clone()));
                live_cursor
            }
        };
        let expires = Instant::now()
            + Duration::from_millis(u64::try_from(caller.expires_ms - quickim_shared::time::now_ms()).unwrap_or(0));
        metrics::counter!("quickim_notify_connects_total", "protocol" => protocol, "resume" => if resume.is_some() { "yes" } else { "no" })
            .increment(1);
        metrics::gauge!("quickim_notify_connections", "protocol" => protocol).increment(1.0);
        Ok(Session {
            protocol,
            trace: TraceContext::current(),
            state: state.clone(),
            kicked: registration.kicked.clone(),
            _registration: registration,
            _attachment: attachment,
            inbox,
            epoch,
            buffered,
            replay,
            ahead,
            cursor,
            resumed: resume.is_some(),
            caller,
            expires,
            shutdown: state.shutdown.clone(),
            replayed: 0,
        })
    }

    /// The transport's name (`ws`, `sse`, `poll`).
    pub fn protocol(&self) -> &'static str {
        self.protocol
    }

    /// Records that `event` was written to the client: counted by protocol, the delivery lag
    /// measured, and — when its trace is recorded — a `notify.write` span, child of the hub's
    /// delivery, around `write`.
    pub async fn written<R>(&self, event: &Encoded, write: impl Future<Output = R>) -> R {
        let Some(meta) = &event.meta else { return write.await };
        let result = match &meta.trace {
            Some(trace) => {
                let span = tracing::info_span!(
                    "notify.write",
                    otel.name = %format_args!("write {}", self.protocol),
                    otel.kind = "producer",
                    network.protocol.name = self.protocol,
                    enduser.id = %self.caller.user_id,
                    conversation_id = %meta.conversation_id,
                    msg_id = meta.msg_id,
                );
                trace.adopt(&span);
                write.instrument(span).await
            }
            None => write.await,
        };
        let (delivered, lag) = delivery_metrics(self.protocol);
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

    /// Parks this long-poll session for the same client's next poll (see `parked.rs`).
    pub fn park(self) {
        let state = self.state.clone();
        state.parked.park(self);
    }

    /// The authenticated user.
    pub fn caller(&self) -> &Caller {
        &self.caller
    }

    /// The last cursor handed to the client.
    pub fn cursor(&self) -> &Arc<str> {
        &self.cursor
    }

    /// Whether the client asked to resume.
    pub fn resumed(&self) -> bool {
        self.resumed
    }

    /// The next event produced so far without waiting (ready, replayed messages).
    pub fn pop(&mut self) -> Option<Arc<Encoded>> {
        let e = self.buffered.pop_front()?;
        if !e.cursor.is_empty() {
            self.cursor = e.cursor.clone();
        }
        Some(e)
    }

    /// Whether a replay is still to be read from the store.
    pub fn replaying(&self) -> bool {
        self.replay.is_some()
    }

    /// Reads the next replay page into the buffer (not cancel-safe: await it on its own).
    pub async fn fill(&mut self, page: u32) -> Result<(), Disconnect> {
        let Some(r) = self.replay.as_mut() else { return Ok(()) };
        let request =
            Replay { user_id: self.caller.user_id.clone(), after: r.after.clone(), upto: r.upto.clone(), limit: page };
        let span = tracing::info_span!(
            "notify.replay",
            otel.kind = "internal",
            network.protocol.name = self.protocol,
            enduser.id = %self.caller.user_id,
            messages = tracing::field::Empty,
        );
        if let Some(trace) = &self.trace {
            trace.adopt(&span);
        }
        let answer = self.state.rpc.call(&request).instrument(span.clone()).await.map_err(|e| {
            tracing::warn!(error = %e.message, "replay failed");
            Disconnect::Unavailable
        })?;
        span.record("messages", answer.entries.len());
        if answer.expired {
            let upto: Arc<str> = Arc::from(cursor::encode(self.epoch, &r.upto));
            self.buffered.push_back(resync(upto, "cursor_expired"));
            self.replay = None;
            metrics::counter!("quickim_notify_resyncs_total").increment(1);
            return Ok(());
        }
        for entry in &answer.entries {
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
            self.buffered.push_back(Arc::new(Encoded::message(c, &entry.message)));
        }
        self.replayed += answer.entries.len() as u64;
        if !answer.more {
            self.replay = None;
            metrics::counter!("quickim_notify_replayed_messages_total").increment(self.replayed);
            tracing::debug!(user = %self.caller.user_id, replayed = self.replayed, "replay done");
        }
        Ok(())
    }

    /// The next live step (cancel-safe).
    pub async fn live(&mut self) -> Step {
        loop {
            // Under load the next event is usually queued already: take it without arming a
            // timer and two cancellation waiters (a measurable cost per delivery), but not past
            // a kick, a shutdown or the token's expiry.
            let item = if self.kicked.is_cancelled() {
                return Step::Close(Disconnect::Kicked);
            } else if self.shutdown.is_cancelled() {
                return Step::Close(Disconnect::Shutdown);
            } else if Instant::now() >= self.expires {
                return Step::Close(Disconnect::TokenExpired);
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
                    self.cursor = e.cursor.clone();
                    return Step::Event(e);
                }
                Ok(Outgoing::Installed(_)) => continue,
                Err(Closed::Overflow) => return Step::Close(Disconnect::SlowConsumer),
                Err(Closed::Behind) => return Step::Close(Disconnect::NodeBehind),
                Ok(Outgoing::InstallFailed) | Err(Closed::HubGone) => return Step::Close(Disconnect::Unavailable),
            }
        }
    }

    /// A live event if one is queued (for long-poll batches).
    pub fn try_live(&mut self) -> Option<Arc<Encoded>> {
        loop {
            match self.inbox.try_recv()? {
                Outgoing::Event(e) => {
                    self.cursor = e.cursor.clone();
                    return Some(e);
                }
                _ => continue,
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
        let (epoch, position, encoded) = self.state.hub.position();
        if epoch != self.epoch || !self.inbox.is_empty() {
            return None;
        }
        let cursor: Arc<str> = match &self.ahead {
            Some(ahead) if ahead.iter().zip(position.iter()).any(|(a, p)| a > p) => {
                Arc::from(cursor::encode(epoch, &cursor::max_position(ahead, &position)))
            }
            _ => {
                self.ahead = None;
                encoded
            }
        };
        if cursor == self.cursor {
            return None;
        }
        self.cursor = cursor.clone();
        Some(simple("cursor", cursor))
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        metrics::counter!("quickim_notify_disconnects_total", "protocol" => self.protocol).increment(1);
        metrics::gauge!("quickim_notify_connections", "protocol" => self.protocol).decrement(1.0);
    }
}

/// The per-protocol delivery metrics, looked up once: a registry lookup per delivery was a
/// measurable share of fan-out.
fn delivery_metrics(protocol: &'static str) -> &'static (metrics::Counter, metrics::Histogram) {
    static WS: OnceLock<(metrics::Counter, metrics::Histogram)> = OnceLock::new();
    static SSE: OnceLock<(metrics::Counter, metrics::Histogram)> = OnceLock::new();
    static POLL: OnceLock<(metrics::Counter, metrics::Histogram)> = OnceLock::new();
    let cell = match protocol {
        "ws" => &WS,
        "sse" => &SSE,
        _ => &POLL,
    };
    cell.get_or_init(|| {
        (
            metrics::counter!("quickim_notify_events_delivered_total", "protocol" => protocol),
            metrics::histogram!("quickim_delivery_lag_seconds", "protocol" => protocol),
        )
    })
}
