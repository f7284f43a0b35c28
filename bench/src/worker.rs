//! A worker process: holds a slice of the subscribers (a process may open at most 20,000
//! files), each on its own connection from a 127.x source address, and reports what they
//! received. The parent drives it over stdin/stdout, one line per step:
//!
//! - worker → `READY <connected> <failed> <connect_s>` once every subscriber is subscribed;
//! - parent → `WAIT <messages> <timeout_s>`: wait until every subscriber has the messages of
//!   its channel (message k went to channel k % channels, as sequence k / channels + 1), or
//!   until nothing arrived for `timeout_s`; then `RESULT <json>`;
//! - parent → `DROP`: close every connection, keeping each subscriber's cursor; `DROPPED`;
//! - parent → `RECONNECT`: resume every subscriber from its cursor; `READY ...` again;
//! - parent → `CHURN <per_second>`: from now on, close that many subscribers' connections a
//!   second, in turn, each reopened at once from where it was (`CHURN 0` stops);
//! - parent → `STOP`: close everything, `RESULT <json>`, exit.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::http::{Conn, split_url};
use crate::marker;
use crate::stats::{Histogram, Received};
use crate::target::{Kind, Names, Target};

/// What a worker does.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Spec {
    pub target: Target,
    pub names: Names,
    pub protocol: String,
    /// Subscribers `first..last` (global numbering).
    pub first: u32,
    pub last: u32,
    pub channels: u32,
    /// Worker number (picks its source addresses).
    pub index: u32,
    /// Subscribers connecting at once.
    #[serde(default = "default_connecting")]
    pub connecting: u32,
}

fn default_connecting() -> u32 {
    256
}

/// What a worker reports.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    pub subscribers: u64,
    pub expected: u64,
    pub delivered: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub latency: Histogram,
    pub first_ns: u64,
    pub last_ns: u64,
    pub cpu_s: f64,
    pub failed: u64,
    /// Connections closed and reopened by the churn.
    #[serde(default)]
    pub reconnects: u64,
    /// Resume: each delivery's time since the `RECONNECT` command (the catch-up as a
    /// client sees it; the send-time latency also counts how long the publishing took).
    #[serde(default)]
    pub catchup: Histogram,
}

struct Sub {
    global: u32,
    channel: u32,
    state: Mutex<SubState>,
    /// Closes the connection, which is reopened at once from where it was (churn).
    kick: tokio::sync::Notify,
}

#[derive(Default)]
struct SubState {
    received: Received,
    latency: Histogram,
    /// Time since the reconnect, for deliveries after a `RECONNECT`.
    catchup: Histogram,
    /// quickim: last cursor; nchan SSE and WebSocket (`ws+meta.nchan`): last message id.
    cursor: Option<String>,
    /// nchan long-poll: the last answer's `Last-Modified` / `ETag`, sent back as
    /// `If-Modified-Since` / `If-None-Match` (its resume position).
    poll_cache: Vec<(String, String)>,
}

struct Shared {
    spec: Spec,
    ready: AtomicUsize,
    failed: AtomicUsize,
    first_ns: AtomicU64,
    last_ns: AtomicU64,
    /// Bumped to close every connection.
    generation: watch::Sender<u64>,
    reconnects: AtomicU64,
    /// When the last `RECONNECT` came (0: none yet).
    resumed_ns: AtomicU64,
}

/// The worker's main loop (reads commands from stdin).
pub async fn run(spec: Spec) -> anyhow::Result<()> {
    let subs: Vec<Arc<Sub>> = (spec.first..spec.last)
        .map(|j| {
            let channel = j % spec.channels.max(1);
            Arc::new(Sub { global: j, channel, state: Mutex::default(), kick: tokio::sync::Notify::new() })
        })
        .collect();
    let shared = Arc::new(Shared {
        spec,
        ready: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
        first_ns: AtomicU64::new(u64::MAX),
        last_ns: AtomicU64::new(0),
        generation: watch::channel(0).0,
        reconnects: AtomicU64::new(0),
        resumed_ns: AtomicU64::new(0),
    });
    let subs: Arc<[Arc<Sub>]> = subs.into();
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut churn: Option<tokio::task::JoinHandle<()>> = None;
    connect_all(&shared, &subs).await;
    while let Some(line) = lines.next_line().await? {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("WAIT") => {
                let messages: u64 = words.next().context("messages")?.parse()?;
                let timeout: u64 = words.next().context("timeout")?.parse()?;
                wait(&shared, &subs, messages, Duration::from_secs(timeout)).await;
                println!("RESULT {}", serde_json::to_string(&report(&shared, &subs, messages))?);
            }
            Some("DROP") => {
                shared.generation.send_modify(|g| *g += 1);
                tokio::time::sleep(Duration::from_millis(300)).await;
                println!("DROPPED");
            }
            Some("RECONNECT") => {
                shared.resumed_ns.store(marker::now_ns(), Ordering::Relaxed);
                connect_all(&shared, &subs).await
            }
            Some("CHURN") => {
                let per_second: f64 = words.next().context("per second")?.parse()?;
                if let Some(task) = churn.take() {
                    task.abort();
                }
                if per_second > 0.0 && !subs.is_empty() {
                    churn = Some(tokio::spawn(kick_in_turn(subs.clone(), per_second)));
                }
            }
            Some("STOP") => {
                shared.generation.send_modify(|g| *g += 1);
                println!("RESULT {}", serde_json::to_string(&report(&shared, &subs, 0))?);
                return Ok(());
            }
            _ => {}
        }
    }
    Ok(())
}

/// Closes `per_second` subscribers' connections a second, every subscriber in turn (one
/// after another spans the channels: subscriber j listens on channel j % channels).
async fn kick_in_turn(subs: Arc<[Arc<Sub>]>, per_second: f64) {
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / per_second));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for s in subs.iter().cycle() {
        tick.tick().await;
        s.kick.notify_one();
    }
}

fn expected_for(channel: u32, channels: u32, messages: u64) -> u64 {
    let channels = u64::from(channels.max(1));
    messages / channels + u64::from(u64::from(channel) < messages % channels)
}

async fn wait(shared: &Shared, subs: &[Arc<Sub>], messages: u64, idle: Duration) {
    let mut last_total = u64::MAX;
    let mut last_change = Instant::now();
    loop {
        let mut total = 0;
        let mut complete = true;
        for s in subs {
            let have = s.state.lock().map(|st| st.received.distinct()).unwrap_or(0);
            total += have;
            if have < expected_for(s.channel, shared.spec.channels, messages) {
                complete = false;
            }
        }
        if complete {
            return;
        }
        if total != last_total {
            last_total = total;
            last_change = Instant::now();
        } else if last_change.elapsed() > idle {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn report(shared: &Shared, subs: &[Arc<Sub>], messages: u64) -> Report {
    let mut r = Report {
        subscribers: subs.len() as u64,
        failed: shared.failed.load(Ordering::Relaxed) as u64,
        ..Report::default()
    };
    for s in subs {
        let Ok(st) = s.state.lock() else { continue };
        let expected = expected_for(s.channel, shared.spec.channels, messages);
        let (lost, dup) = st.received.tally(expected as u32);
        r.expected += expected;
        r.delivered += st.received.distinct();
        r.lost += lost;
        r.duplicated += dup;
        r.latency.merge(&st.latency);
        r.catchup.merge(&st.catchup);
    }
    r.reconnects = shared.reconnects.load(Ordering::Relaxed);
    r.first_ns = shared.first_ns.load(Ordering::Relaxed);
    r.last_ns = shared.last_ns.load(Ordering::Relaxed);
    r.cpu_s = crate::sys::cpu_seconds();
    r
}

async fn connect_all(shared: &Arc<Shared>, subs: &[Arc<Sub>]) {
    let started = Instant::now();
    shared.ready.store(0, Ordering::Relaxed);
    shared.failed.store(0, Ordering::Relaxed);
    let permits = Arc::new(tokio::sync::Semaphore::new(shared.spec.connecting.max(1) as usize));
    for s in subs {
        let (shared, s, permits) = (shared.clone(), s.clone(), permits.clone());
        tokio::spawn(async move {
            let mut permit = Some(permits.acquire_owned().await.ok());
            let mut generation = shared.generation.subscribe();
            generation.mark_unchanged();
            // The first connection counts towards READY (it holds the permit); a connection
            // closed by the churn is reopened at once from the subscriber's position.
            let result = loop {
                tokio::select! {
                    r = subscribe(&shared, &s, permit.take()) => break r,
                    _ = generation.changed() => break Ok(()),
                    _ = s.kick.notified() => {
                        shared.reconnects.fetch_add(1, Ordering::Relaxed);
                    }
                }
            };
            if let Err(e) = result
                && shared.failed.fetch_add(1, Ordering::Relaxed) < 3
            {
                eprintln!("subscriber {}: {e:#}", s.global);
            }
        });
    }
    // Every subscriber is ready or failed.
    loop {
        let done = shared.ready.load(Ordering::Relaxed) + shared.failed.load(Ordering::Relaxed);
        if done >= subs.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "READY {} {} {:.3}",
        shared.ready.load(Ordering::Relaxed),
        shared.failed.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64()
    );
}

fn source_address(spec: &Spec, j: u32) -> Ipv4Addr {
    // At most 16,000 connections per source address (ephemeral ports are per address), and
    // a different address each run: the last run's ports linger in TIME_WAIT, and binding
    // among them makes every connect scan the port range.
    let run = u32::from_str_radix(&spec.names.run, 16).unwrap_or(0);
    Ipv4Addr::new(127, 1 + ((j / 16_000) % 200) as u8, (spec.index % 250) as u8 + 1, (run % 250) as u8 + 1)
}

async fn connect_tcp(spec: &Spec, j: u32, host: &str) -> anyhow::Result<TcpStream> {
    let addr: SocketAddr = tokio::net::lookup_host(host).await?.next().context("address")?;
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((source_address(spec, j), 0)))?;
    socket.set_nodelay(true)?;
    Ok(socket.connect(addr).await?)
}

/// Notes a message in the subscriber's state.
fn deliver(shared: &Shared, s: &Sub, text: &str) {
    let now = marker::now_ns();
    let resumed = shared.resumed_ns.load(Ordering::Relaxed);
    let mut got = false;
    if let Ok(mut st) = s.state.lock() {
        marker::scan(text, |channel, seq, sent| {
            if channel == s.channel {
                st.received.note(seq);
                st.latency.record(now.saturating_sub(sent) / 1000);
                if resumed > 0 {
                    st.catchup.record(now.saturating_sub(resumed) / 1000);
                }
                got = true;
            }
        });
    }
    if got {
        shared.first_ns.fetch_min(now, Ordering::Relaxed);
        shared.last_ns.fetch_max(now, Ordering::Relaxed);
    }
}

/// The message id of an nchan `ws+meta.nchan` frame: its `id:` header line.
fn nchan_meta_id(frame: &str) -> Option<String> {
    let head = frame.split("\n\n").next()?;
    head.lines().find_map(|l| l.strip_prefix("id:").map(|id| id.trim().to_string()))
}

/// Percent-encodes a query value (nchan ids hold `:`, `,` and `[]`).
fn encode_query(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn cursor_of(text: &str) -> Option<String> {
    let i = text.find("\"cursor\":\"")? + 10;
    let end = text[i..].find('"')?;
    Some(text[i..i + end].to_string())
}

async fn subscribe(
    shared: &Shared,
    s: &Sub,
    mut permit: Option<Option<tokio::sync::OwnedSemaphorePermit>>,
) -> anyhow::Result<()> {
    let spec = &shared.spec;
    let host = &spec.target.hosts[s.global as usize % spec.target.hosts.len()];
    let token = spec.target.token(&spec.names.user(s.global));
    let channel = spec.names.channel(s.channel);
    let mut url = spec.target.sub_url(&spec.protocol, host, &channel, &token);
    let cursor = s.state.lock().ok().and_then(|st| st.cursor.clone());
    let quickim = spec.target.kind == Kind::Quickim;
    let mut mark_ready = |shared: &Shared| {
        if permit.take().is_some() {
            shared.ready.fetch_add(1, Ordering::Relaxed);
        }
    };
    match spec.protocol.as_str() {
        "ws" => {
            // nchan: the `ws+meta.nchan` subprotocol puts each message's id in its frame
            // ("id: ..." lines, a blank line, the data), and a reconnect resumes after the
            // last one with `last_event_id` (nchan's README, "Websocket" and
            // `nchan_subscriber_last_message_id`).
            match (&cursor, quickim) {
                (Some(c), true) => url.push_str(&format!("&cursor={c}")),
                (Some(c), false) if spec.target.kind == Kind::Nchan => {
                    url.push(if url.contains('?') { '&' } else { '?' });
                    url.push_str("last_event_id=");
                    url.push_str(&encode_query(c));
                }
                _ => {}
            }
            let stream = connect_tcp(spec, s.global, host).await?;
            let config = WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0);
            let mut request = url.into_client_request()?;
            if spec.target.kind == Kind::Nchan {
                request.headers_mut().insert("Sec-WebSocket-Protocol", "ws+meta.nchan".parse()?);
            }
            let (mut ws, _) = tokio_tungstenite::client_async_with_config(request, stream, Some(config)).await?;
            if !quickim {
                mark_ready(shared);
            }
            while let Some(frame) = ws.next().await {
                match frame? {
                    WsMessage::Text(t) => {
                        let t = t.as_str();
                        let position = match spec.target.kind {
                            Kind::Quickim => cursor_of(t),
                            Kind::Nchan => nchan_meta_id(t),
                            Kind::Pushpin => None,
                        };
                        if let Some(c) = position
                            && let Ok(mut st) = s.state.lock()
                        {
                            st.cursor = Some(c);
                        }
                        if quickim && t.contains("\"type\":\"ready\"") {
                            mark_ready(shared);
                        }
                        deliver(shared, s, t);
                    }
                    WsMessage::Close(_) => break,
                    _ => {}
                }
            }
            anyhow::bail!("websocket closed")
        }
        "sse" => {
            let (host_port, path) = split_url(&url);
            let mut conn = Conn::new(connect_tcp(spec, s.global, host).await?);
            let mut headers = vec![("Accept".to_string(), "text/event-stream".to_string())];
            if let Some(c) = &cursor {
                headers.push(("Last-Event-ID".to_string(), c.clone()));
            }
            let head = conn.get(&host_port, &path, &headers).await?;
            anyhow::ensure!(head.status == 200, "sse status {}", head.status);
            if !quickim {
                mark_ready(shared);
            }
            let mut pending = String::new();
            while let Some(piece) = conn.next_body().await? {
                pending.push_str(&String::from_utf8_lossy(&piece));
                while let Some(end) = pending.find('\n') {
                    let line: String = pending.drain(..=end).collect();
                    if let Some(id) = line.strip_prefix("id: ").or_else(|| line.strip_prefix("id:")) {
                        if let Ok(mut st) = s.state.lock() {
                            st.cursor = Some(id.trim().to_string());
                        }
                    } else if line.starts_with("event: ready") {
                        mark_ready(shared);
                    } else if line.starts_with("data:") {
                        deliver(shared, s, &line);
                    }
                }
            }
            anyhow::bail!("sse stream ended")
        }
        _ => {
            let (host_port, path) = split_url(&url);
            let mut conn = Conn::new(connect_tcp(spec, s.global, host).await?);
            let mut cache: Vec<(String, String)> = s.state.lock().map(|st| st.poll_cache.clone()).unwrap_or_default();
            let mut cursor = cursor;
            loop {
                let (p, headers) = if quickim {
                    let p = match &cursor {
                        Some(c) => format!("{path}&timeout=30&cursor={c}"),
                        None => format!("{path}&timeout=0"),
                    };
                    (p, Vec::new())
                } else {
                    (path.clone(), cache.clone())
                };
                if !quickim {
                    // The request is on its way: nchan holds it until a message comes.
                    mark_ready(shared);
                }
                let head = conn.get(&host_port, &p, &headers).await?;
                let body = conn.body().await?;
                let text = String::from_utf8_lossy(&body);
                match head.status {
                    200 => {
                        deliver(shared, s, &text);
                        if quickim {
                            let v: serde_json::Value = serde_json::from_str(&text).context("poll answer")?;
                            cursor = v["data"]["cursor"].as_str().map(str::to_string);
                            if let Ok(mut st) = s.state.lock() {
                                st.cursor = cursor.clone();
                            }
                            mark_ready(shared);
                        } else {
                            cache.clear();
                            if let Some(v) = head.header("last-modified") {
                                cache.push(("If-Modified-Since".into(), v.to_string()));
                            }
                            if let Some(v) = head.header("etag") {
                                cache.push(("If-None-Match".into(), v.to_string()));
                            }
                            if let Ok(mut st) = s.state.lock() {
                                st.poll_cache = cache.clone();
                            }
                        }
                    }
                    304 | 408 => {}
                    other => anyhow::bail!("poll status {other}: {text}"),
                }
            }
        }
    }
}
