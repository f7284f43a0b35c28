//! Outbound webhooks: the log, delivered to the business system's endpoints.
//!
//! Each endpoint follows the log on its own: a position per partition (stored after every
//! batch its receiver took, so delivery resumes there after any restart, of anything), events
//! in log order — so in order per conversation — many per POST, at least once. One message
//! service at a time delivers to an endpoint (a lease in the database, renewed while it
//! delivers; another takes over once it runs out). A batch the receiver does not take (no
//! answer, not 2xx) is sent again, the same, with a backoff (1 s doubling to 60 s); a
//! receiver down for `webhook_alert_after_s` is reported (an error log, the
//! `quickim_webhook_failing` gauge) and skipped ahead only if `webhook_skip_after_s` says so.
//! Every event has a dedupe key (`id`), every POST the Standard Webhooks headers (a stable
//! `webhook-id` per batch, so a retried batch is recognisable too).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use quickim_shared::bus::Bus;
use quickim_shared::online::Gateways;
use quickim_shared::position::Position;
use quickim_shared::protocol::event::LogEntry;
use quickim_shared::protocol::system::{self, Archived, Created, Revised, Users};
use quickim_store::Store;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::poster::Poster;
use crate::signature;

/// How long a lease lasts; renewed at a third of it.
const LEASE: Duration = Duration::from_secs(6);
/// Longest wait between retries of a batch.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Bytes of log content read per batch at most.
const BATCH_BYTES: usize = 1 << 20;

/// The kinds of events.
pub const EVENT_TYPES: [&str; 11] = [
    "message.created",
    "message.offline",
    "message.revised",
    "member.joined",
    "member.left",
    "member.kicked",
    "conversation.created",
    "conversation.archived",
    "read.updated",
    "user.online",
    "user.offline",
];

/// Read positions and presence changes are read again this far behind the watermark
/// (writes do not become visible in the order of their times); the ones already delivered
/// are recognised (in memory; after a takeover they may come again, with the same keys).
const SIGNALS_MARGIN_MS: i64 = 5_000;
/// How often read positions and presence changes are looked for.
const SIGNALS_EVERY: Duration = Duration::from_millis(500);

/// One endpoint, as configured.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    /// A stable name (its position is stored under it).
    pub id: String,
    /// Where to POST (http://).
    pub url: String,
    /// The event types it gets (all when empty).
    #[serde(default)]
    pub events: Vec<String>,
    /// `whsec_…`: signs its POSTs.
    #[serde(default)]
    pub secret: Option<String>,
    /// Where a new endpoint starts: `now` (the default: what comes from now on) or
    /// `beginning` (the whole log the database holds).
    #[serde(default)]
    pub start: Start,
}

/// Where a new endpoint starts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Start {
    /// At the log's heads.
    #[default]
    Now,
    /// At the log's start.
    Beginning,
}

/// Every endpoint and how batches go out.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// The endpoints.
    pub endpoints: Vec<EndpointConfig>,
    /// Most events per POST.
    pub batch_max: usize,
    /// How long a batch that is not full waits for more events.
    pub linger: Duration,
    /// Longest wait for a receiver's answer.
    pub timeout: Duration,
    /// A receiver failing this long is reported.
    pub alert_after: Duration,
    /// A receiver failing this long is skipped past (None: never).
    pub skip_after: Option<Duration>,
    /// `max_connections_per_user` (sizes the gateways' presence answers).
    pub max_connections_per_user: u32,
    /// More root certificates (PEM) to trust for https:// receivers.
    pub ca_file: Option<std::path::PathBuf>,
}

/// Reads `webhooks` (a JSON array of endpoints); checks ids, URLs, event types and secrets.
pub fn parse_endpoints(text: &str) -> Result<Vec<EndpointConfig>, String> {
    let endpoints: Vec<EndpointConfig> =
        serde_json::from_str(text).map_err(|e| format!("webhooks is not a JSON array of endpoints: {e}"))?;
    let mut ids = HashSet::new();
    for e in &endpoints {
        if e.id.is_empty() || e.id.len() > 64 || !ids.insert(e.id.clone()) {
            return Err(format!("webhook ids are 1–64 characters and unique: {:?}", e.id));
        }
        if !(e.url.starts_with("http://") || e.url.starts_with("https://")) {
            return Err(format!("webhook {}: the url must be http:// or https://", e.id));
        }
        if let Some(t) = e.events.iter().find(|t| !EVENT_TYPES.contains(&t.as_str())) {
            return Err(format!("webhook {}: unknown event type {t:?} (known: {EVENT_TYPES:?})", e.id));
        }
        if e.secret.as_deref().is_some_and(|s| signature::key_of(s).is_none()) {
            return Err(format!("webhook {}: the secret must be whsec_ and the base64 of 16 bytes or more", e.id));
        }
    }
    Ok(endpoints)
}

/// Delivers to every endpoint until `shutdown`; `holder` names this service in leases.
/// `bus` reaches the gateways (who is connected, for `message.offline`).
pub async fn run(store: Store, bus: Bus, config: WebhookConfig, holder: String, shutdown: CancellationToken) {
    let http = match Poster::new(config.timeout, config.ca_file.as_deref()) {
        Ok(h) => h,
        Err(e) => {
            tracing::error!(error = %e, "webhooks cannot start their HTTP client");
            return;
        }
    };
    let gateways = match Gateways::watch(&bus, shutdown.clone()).await {
        Ok(g) => g,
        Err(e) => {
            tracing::error!(error = %e, "webhooks cannot follow the gateways");
            return;
        }
    };
    let mut tasks = tokio::task::JoinSet::new();
    for endpoint in config.endpoints.clone() {
        let delivery = Delivery {
            store: store.clone(),
            http: http.clone(),
            key: endpoint.secret.as_deref().and_then(signature::key_of),
            types: endpoint.events.iter().cloned().collect(),
            endpoint,
            config: config.clone(),
            holder: holder.clone(),
            bus: bus.clone(),
            gateways: gateways.clone(),
        };
        let shutdown = shutdown.clone();
        tasks.spawn(async move { delivery.run(shutdown).await });
    }
    while tasks.join_next().await.is_some() {}
}

/// Where read positions and presence changes were delivered up to.
struct Signals {
    /// (reads, presence), ms.
    watermarks: (i64, i64),
    /// Keys delivered within the margin, with their times.
    seen: HashMap<String, i64>,
    last: Instant,
}

struct Delivery {
    store: Store,
    http: Poster,
    endpoint: EndpointConfig,
    key: Option<Vec<u8>>,
    types: HashSet<String>,
    config: WebhookConfig,
    holder: String,
    bus: Bus,
    gateways: Gateways,
}

/// An event as it is POSTed.
#[derive(Debug, Clone, Serialize)]
struct Event {
    id: String,
    #[serde(rename = "type")]
    kind: &'static str,
    timestamp: i64,
    data: Value,
}

impl Delivery {
    async fn run(&self, shutdown: CancellationToken) {
        loop {
            let leased = tokio::select! {
                _ = shutdown.cancelled() => return,
                l = self.lease() => l,
            };
            match leased {
                Ok(Some(position)) => {
                    tracing::info!(endpoint = %self.endpoint.id, "delivering webhooks");
                    self.deliver(position, &shutdown).await;
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, endpoint = %self.endpoint.id, "cannot take a webhook lease"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(LEASE / 3) => {}
            }
        }
    }

    async fn lease(&self) -> Result<Option<Position>, quickim_store::StoreError> {
        let from_start = self.endpoint.start == Start::Beginning;
        self.store.lease_webhook(&self.endpoint.id, &self.holder, LEASE.as_millis() as i64, from_start).await
    }

    fn wants(&self, kind: &str) -> bool {
        self.types.is_empty() || self.types.contains(kind)
    }

    /// Delivers from `position` while this service holds the lease.
    async fn deliver(&self, mut position: Position, shutdown: &CancellationToken) {
        let mut renewed = Instant::now();
        let mut next_part = 0usize;
        let mut signals = match self.store.webhook_watermarks(&self.endpoint.id).await {
            Ok(w) => Signals { watermarks: w, seen: HashMap::new(), last: Instant::now() },
            Err(e) => {
                tracing::warn!(error = %e, endpoint = %self.endpoint.id, "cannot read webhook watermarks");
                return;
            }
        };
        loop {
            if signals.last.elapsed() >= SIGNALS_EVERY {
                signals.last = Instant::now();
                if !self.deliver_signals(&mut signals, &mut renewed, shutdown).await {
                    return;
                }
            }
            if shutdown.is_cancelled() {
                return;
            }
            if renewed.elapsed() >= LEASE / 3 {
                match self.lease().await {
                    Ok(Some(_)) => renewed = Instant::now(),
                    _ => return,
                }
            }
            let Some((part, entries, upto)) = self.next_batch(&position, &mut next_part).await else {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(self.config.linger.max(Duration::from_millis(50))) => {}
                }
                continue;
            };
            let Some(events) = self.events(&entries).await else { return };
            if !events.is_empty() {
                let id = format!("{}-{}-{}-{}", self.endpoint.id, part, position[part] + 1, upto);
                if !self.post_until_taken(&id, &events, &mut renewed, shutdown).await {
                    return;
                }
            }
            position[part] = upto;
            match self.store.advance_webhook(&self.endpoint.id, &self.holder, &position).await {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) => {
                    tracing::warn!(error = %e, endpoint = %self.endpoint.id, "cannot store a webhook position");
                    return;
                }
            }
        }
    }

    /// Read positions and presence changes since the watermarks, as one batch.
    async fn deliver_signals(&self, s: &mut Signals, renewed: &mut Instant, shutdown: &CancellationToken) -> bool {
        let (reads, presence) = (self.wants("read.updated"), self.wants("user.online") || self.wants("user.offline"));
        if !reads && !presence {
            return true;
        }
        let limit = (self.config.batch_max + s.seen.len()).min(10_000) as u32;
        let max = self.config.batch_max;
        let mut events = Vec::new();
        let (mut reads_at, mut presence_at) = s.watermarks;
        if reads {
            let Ok(rows) = self.store.reads_since(reads_at - SIGNALS_MARGIN_MS, limit).await else { return true };
            for (conversation_id, user_id, read_msg_id, at) in rows {
                let id = format!("read:{conversation_id}:{user_id}:{read_msg_id}");
                if !s.seen.contains_key(&id) {
                    if events.len() == max {
                        break;
                    }
                    let data =
                        json!({"conversation_id": conversation_id, "user_id": user_id, "read_msg_id": read_msg_id});
                    events.push((Event { id: id.clone(), kind: "read.updated", timestamp: at, data }, at));
                }
                reads_at = reads_at.max(at);
            }
        }
        if presence && events.len() < max {
            let Ok(rows) = self.store.presence_since(presence_at - SIGNALS_MARGIN_MS, limit).await else { return true };
            for (user_id, online, at) in rows {
                let kind = if online { "user.online" } else { "user.offline" };
                let id = format!("presence:{user_id}:{at}");
                if self.wants(kind) && !s.seen.contains_key(&id) {
                    if events.len() == max {
                        break;
                    }
                    let data = json!({"user_id": user_id, "online": online, "at": at});
                    events.push((Event { id, kind, timestamp: at, data }, at));
                }
                presence_at = presence_at.max(at);
            }
        }
        if !events.is_empty() {
            let batch = format!("{}-signals-{}-{}", self.endpoint.id, events[0].0.id, events.len());
            let posted: Vec<Event> = events.iter().map(|(e, _)| e.clone()).collect();
            if !self.post_until_taken(&batch, &posted, renewed, shutdown).await {
                return false;
            }
            for (e, at) in events {
                s.seen.insert(e.id, at);
            }
        }
        s.watermarks = (reads_at, presence_at);
        let horizon = reads_at.min(presence_at) - 2 * SIGNALS_MARGIN_MS;
        s.seen.retain(|_, at| *at >= horizon);
        match self.store.advance_webhook_watermarks(&self.endpoint.id, &self.holder, s.watermarks).await {
            Ok(held) => held,
            Err(e) => {
                tracing::warn!(error = %e, endpoint = %self.endpoint.id, "cannot store webhook watermarks");
                false
            }
        }
    }

    /// The next partition with entries after `position` (taking turns), its entries (up to
    /// `batch_max`; a batch not full waits `linger` once for more) and the offset they reach.
    async fn next_batch(&self, position: &Position, next_part: &mut usize) -> Option<(usize, Vec<LogEntry>, u64)> {
        let heads = self.logged(self.store.heads().await)?.heads;
        let parts = heads.len().min(position.len());
        for i in 0..parts {
            let part = (*next_part + i) % parts;
            if heads[part] <= position[part] {
                continue;
            }
            *next_part = (part + 1) % parts;
            let read = |upto: u64| {
                self.store.read_log(part as u16, position[part], upto, self.config.batch_max as u32, BATCH_BYTES)
            };
            let mut entries = self.logged(read(heads[part]).await)?;
            if entries.len() < self.config.batch_max && !self.config.linger.is_zero() {
                tokio::time::sleep(self.config.linger).await;
                let heads = self.logged(self.store.heads().await)?.heads;
                entries = self.logged(read(heads[part]).await)?;
            }
            let upto = entries.last()?.offset;
            return Some((part, entries, upto));
        }
        None
    }

    /// The entries as the events this endpoint wants: each message followed by its
    /// `message.offline` when wanted. None: the gateways could not be asked (try again).
    async fn events(&self, entries: &[LogEntry]) -> Option<Vec<Event>> {
        let offline = if self.wants("message.offline") { Some(self.offline_recipients(entries).await?) } else { None };
        let mut events = Vec::new();
        for e in entries {
            if let Some(event) = self.event(e) {
                events.push(event);
            }
            let m = &e.message;
            if let Some(users) = offline.as_ref().and_then(|o| o.get(&(m.conversation_id.clone(), m.msg_id)))
                && !users.is_empty()
            {
                let data = json!({"message": m, "offline_user_ids": users});
                let id = format!("offline:{}:{}", m.conversation_id, m.msg_id);
                events.push(Event { id, kind: "message.offline", timestamp: m.send_time, data });
            }
        }
        Some(events)
    }

    /// For each user or business message of `entries`: its conversation's members when it
    /// was stored (but its sender) who hold no /notify connection on any gateway now. None:
    /// the store or the gateways could not be asked.
    async fn offline_recipients(&self, entries: &[LogEntry]) -> Option<HashMap<(String, u64), Vec<String>>> {
        let mut members_of: HashMap<(String, u64), Vec<String>> = HashMap::new();
        for e in entries.iter().filter(|e| e.message.msg_type >= 0) {
            let m = &e.message;
            let members = self.logged(self.store.members_at(&m.conversation_id, m.msg_id).await)?;
            members_of.insert((m.conversation_id.clone(), m.msg_id), members);
        }
        let everyone: Vec<String> =
            members_of.values().flatten().cloned().collect::<HashSet<_>>().into_iter().collect();
        if everyone.is_empty() {
            return Some(HashMap::new());
        }
        let (online, _) = match self.gateways.presence(&self.bus, &everyone, self.config.max_connections_per_user).await
        {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, endpoint = %self.endpoint.id, "cannot ask the gateways who is connected");
                return None;
            }
        };
        let mut out = HashMap::new();
        for e in entries.iter().filter(|e| e.message.msg_type >= 0) {
            let m = &e.message;
            let offline: Vec<String> = members_of[&(m.conversation_id.clone(), m.msg_id)]
                .iter()
                .filter(|u| **u != m.from && online.get(*u).is_none_or(|p| p.connections == 0))
                .cloned()
                .collect();
            out.insert((m.conversation_id.clone(), m.msg_id), offline);
        }
        Some(out)
    }

    /// The value, or None with the store's failure logged (delivery tries again shortly).
    fn logged<T>(&self, r: Result<T, quickim_store::StoreError>) -> Option<T> {
        r.map_err(|e| tracing::warn!(error = %e, endpoint = %self.endpoint.id, "webhooks cannot read the store")).ok()
    }

    /// The entry as an event this endpoint wants, if any.
    fn event(&self, entry: &LogEntry) -> Option<Event> {
        let m = &entry.message;
        let (kind, data) = match m.msg_type {
            t if t >= 0 => ("message.created", serde_json::to_value(m).ok()?),
            system::REVISED => {
                let revised: Revised = serde_json::from_str(&m.content).ok()?;
                (
                    "message.revised",
                    json!({"conversation_id": m.conversation_id, "revision": revised, "msg_id": m.msg_id}),
                )
            }
            system::JOINED | system::LEFT | system::KICKED => {
                let users: Users = serde_json::from_str(&m.content).ok()?;
                let kind = match m.msg_type {
                    system::JOINED => "member.joined",
                    system::LEFT => "member.left",
                    _ => "member.kicked",
                };
                (kind, json!({"conversation_id": m.conversation_id, "user_ids": users.user_ids, "msg_id": m.msg_id}))
            }
            system::CREATED => {
                let created: Created = serde_json::from_str(&m.content).ok()?;
                let mut data = serde_json::to_value(created).ok()?;
                data["conversation_id"] = json!(m.conversation_id);
                data["msg_id"] = json!(m.msg_id);
                ("conversation.created", data)
            }
            system::ARCHIVED => {
                let a: Archived = serde_json::from_str(&m.content).ok()?;
                (
                    "conversation.archived",
                    json!({"conversation_id": m.conversation_id, "archived": a.archived, "msg_id": m.msg_id}),
                )
            }
            _ => return None,
        };
        if !self.types.is_empty() && !self.types.contains(kind) {
            return None;
        }
        Some(Event { id: format!("{}:{}", m.conversation_id, m.msg_id), kind, timestamp: m.send_time, data })
    }

    /// POSTs the batch until the receiver takes it (2xx); false if this service must stop
    /// (shut down, or lost the lease while waiting).
    async fn post_until_taken(
        &self,
        id: &str,
        events: &[Event],
        renewed: &mut Instant,
        shutdown: &CancellationToken,
    ) -> bool {
        let Ok(body) = serde_json::to_vec(&json!({ "events": events })) else { return false };
        let endpoint = self.endpoint.id.as_str();
        let mut backoff = Duration::from_secs(1);
        let mut failing_since: Option<Instant> = None;
        let mut reported = false;
        loop {
            let started = Instant::now();
            let outcome = self.post(id, &body).await;
            metrics::histogram!("quickim_webhook_post_seconds", "endpoint" => endpoint.to_string())
                .record(started.elapsed().as_secs_f64());
            match outcome {
                Ok(()) => {
                    metrics::counter!("quickim_webhook_events_total", "endpoint" => endpoint.to_string())
                        .increment(events.len() as u64);
                    if reported {
                        tracing::info!(endpoint, "webhook receiver is taking events again");
                    }
                    metrics::gauge!("quickim_webhook_failing", "endpoint" => endpoint.to_string()).set(0.0);
                    return true;
                }
                Err(e) => {
                    metrics::counter!("quickim_webhook_failures_total", "endpoint" => endpoint.to_string())
                        .increment(1);
                    let since = *failing_since.get_or_insert(started);
                    if since.elapsed() >= self.config.alert_after && !reported {
                        reported = true;
                        metrics::gauge!("quickim_webhook_failing", "endpoint" => endpoint.to_string()).set(1.0);
                        tracing::error!(endpoint, error = %e, failing_s = since.elapsed().as_secs(), "webhook receiver keeps failing");
                    } else {
                        tracing::warn!(endpoint, error = %e, "webhook batch not taken; retrying");
                    }
                    if self.config.skip_after.is_some_and(|s| since.elapsed() >= s) {
                        metrics::counter!("quickim_webhook_skipped_events_total", "endpoint" => endpoint.to_string())
                            .increment(events.len() as u64);
                        tracing::error!(
                            endpoint,
                            events = events.len(),
                            "webhook receiver down too long; skipping these events"
                        );
                        return true;
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
            if renewed.elapsed() >= LEASE / 3 {
                match self.lease().await {
                    Ok(Some(_)) => *renewed = Instant::now(),
                    _ => return false,
                }
            }
        }
    }

    async fn post(&self, id: &str, body: &[u8]) -> Result<(), String> {
        let timestamp = quickim_shared::time::now_ms() / 1000;
        let mut headers = vec![("webhook-id", id.to_string()), ("webhook-timestamp", timestamp.to_string())];
        if let Some(key) = &self.key {
            headers.push(("webhook-signature", signature::sign(key, id, timestamp, body)));
        }
        let (status, _) = self.http.post(&self.endpoint.url, &headers, body.to_vec()).await?;
        if (200..300).contains(&status) { Ok(()) } else { Err(format!("answered {status}")) }
    }
}
