//! `quickim-bench`: a load generator that drives any realtime server through URL templates and
//! headers (presets for quickim and nchan), and prints one machine-readable JSON line per run.
//!
//! - `main.rs` (here): the command line and the parent side of a run (workers, publisher,
//!   the result line);
//! - `worker.rs`: subscriber processes (WebSocket, SSE, long-poll);
//! - `target.rs`: URL templates, presets, quickim set-up;
//! - `http.rs`: a minimal HTTP/1.1 client for SSE and long-poll;
//! - `marker.rs`: the timestamped payload; `stats.rs`: histograms and loss accounting;
//! - `sys.rs`: memory and CPU readings from /proc; `chart.rs`: results to SVG and Markdown.
//!
//! See docs/benchmarks.md for the scenarios and `bench/run.sh` for the suite.

// Standard output is this tool's interface (result lines, and the worker protocol).
#![allow(clippy::print_stdout)]

mod chart;
mod http;
mod marker;
mod stats;
mod sys;
mod target;
mod worker;

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};

use stats::Histogram;
use target::{Kind, Names, Target};

#[derive(Parser)]
#[command(name = "quickim-bench", version, about = "Load generator for quickim and other realtime servers")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one scenario against one target and print its result line
    Run(Box<RunArgs>),
    /// (internal) a subscriber worker process
    #[command(hide = true)]
    Worker { spec: String },
    /// Turn a results file (JSON lines) into an SVG chart and a Markdown table
    Chart {
        /// Results file
        results: PathBuf,
        /// Where to write the SVG
        #[arg(long)]
        svg: PathBuf,
        /// Where to write the Markdown tables
        #[arg(long)]
        table: PathBuf,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
enum Mode {
    /// Connect the subscribers, measure server memory, disconnect
    Idle,
    /// Connect the subscribers, publish, measure delivery
    Deliver,
    /// Connect, drop every connection, publish, reconnect with cursors, measure the catch-up
    Resume,
    /// Publish only (persisted sends), measure throughput and latency
    Send,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
enum PubMode {
    /// Publish through the target's publish template (quickim: /inner/send_msg)
    Inner,
    /// quickim: publish as a member client through /send_msg
    Client,
}

#[derive(Debug, Clone, clap::Args)]
struct RunArgs {
    /// Scenario label in the result line
    #[arg(long)]
    scenario: String,
    #[arg(long, value_enum)]
    mode: Mode,
    /// Preset for the target's templates
    #[arg(long, value_enum)]
    target: Kind,
    /// Target label (default: the preset's name)
    #[arg(long)]
    name: Option<String>,
    /// The target's public nodes, host:port (subscribers are spread over them)
    #[arg(long, value_delimiter = ',', required = true)]
    hosts: Vec<String>,
    /// quickim: /inner base URL (http://host:port)
    #[arg(long)]
    inner: Option<String>,
    /// quickim: inner key
    #[arg(long)]
    inner_key: Option<String>,
    /// quickim: JWT secret (tokens are signed locally)
    #[arg(long)]
    jwt_secret: Option<String>,
    /// pushpin: its HTTP publish endpoint (host:port)
    #[arg(long)]
    publish: Option<String>,
    /// Server processes to measure: every process whose command line contains this text
    #[arg(long)]
    pid_match: Option<String>,
    /// Override: WebSocket subscriber URL template
    #[arg(long)]
    ws_url: Option<String>,
    /// Override: SSE subscriber URL template
    #[arg(long)]
    sse_url: Option<String>,
    /// Override: long-poll subscriber URL template
    #[arg(long)]
    poll_url: Option<String>,
    /// Override: publish URL template
    #[arg(long)]
    pub_url: Option<String>,
    /// Override: publish body template
    #[arg(long)]
    pub_body: Option<String>,
    /// Override: publish headers ("Name: value"), repeatable
    #[arg(long)]
    pub_header: Vec<String>,
    /// ws, sse or poll
    #[arg(long, default_value = "ws")]
    protocol: String,
    #[arg(long, default_value_t = 0)]
    subscribers: u32,
    #[arg(long, default_value_t = 1)]
    channels: u32,
    #[arg(long, default_value_t = 0)]
    messages: u64,
    /// Messages per second (default: as fast as the target answers)
    #[arg(long)]
    rate: Option<f64>,
    /// Publishes in flight
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Subscribers connecting at once in each worker process
    #[arg(long, default_value_t = 256)]
    connecting: u32,
    /// Connection churn while publishing (deliver mode): subscribers' connections closed per
    /// second, in turn, each reopened at once from where it was (its cursor; nchan: its
    /// Last-Event-ID or long-poll position, none over WebSocket)
    #[arg(long, default_value_t = 0.0)]
    churn: f64,
    /// Payload size in bytes
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Worker processes (default: one per 15,000 subscribers)
    #[arg(long)]
    workers: Option<u32>,
    #[arg(long, value_enum, default_value = "inner")]
    pub_mode: PubMode,
    /// With `--pub-mode client`: each send carries its own `client_msg_id` (an idempotency key,
    /// as a client that retries safely sends), which the server looks up and claims
    #[arg(long)]
    keys: bool,
    /// Give up waiting for deliveries after this many seconds without progress
    #[arg(long, default_value_t = 20)]
    timeout: u64,
    /// Append the result line to this file too
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Debug, Default, Serialize)]
struct RunResult {
    scenario: String,
    target: String,
    mode: String,
    protocol: String,
    subscribers: u32,
    channels: u32,
    messages: u64,
    rate: Option<f64>,
    connected: u64,
    failed: u64,
    connect_s: f64,
    published: u64,
    publish_errors: u64,
    publish_per_s: f64,
    publish_p50_ms: f64,
    publish_p99_ms: f64,
    publish_max_ms: f64,
    expected: u64,
    delivered: u64,
    lost: u64,
    duplicated: u64,
    p50_ms: f64,
    p95_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// Deliveries a second: from the first publish to the last delivery (deliver), or over
    /// the catch-up (resume: what was missed, from the reconnect to the last delivery).
    deliveries_per_s: f64,
    catchup_s: f64,
    /// Resume: each missed message's delivery time after the reconnect, p50 and p99.
    catchup_p50_ms: f64,
    catchup_p99_ms: f64,
    rss_before_kb: u64,
    rss_after_kb: u64,
    rss_per_conn_kb: f64,
    client_cpu_s: f64,
    /// Connections closed and reopened by the churn.
    reconnects: u64,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match cli.command {
        Cmd::Worker { spec } => runtime.block_on(worker::run(serde_json::from_str(&spec)?)),
        Cmd::Run(args) => runtime.block_on(run(*args)),
        Cmd::Chart { results, svg, table } => chart::write(&results, &svg, &table),
    }
}

fn build_target(a: &RunArgs) -> anyhow::Result<Target> {
    let mut t = match a.target {
        Kind::Quickim => Target::quickim(
            a.name.as_deref().unwrap_or("quickim"),
            a.hosts.clone(),
            a.inner.clone().context("--inner is needed for quickim")?,
            a.inner_key.clone().context("--inner-key is needed for quickim")?,
            a.jwt_secret.clone().context("--jwt-secret is needed for quickim")?,
        ),
        Kind::Nchan => Target::nchan(a.name.as_deref().unwrap_or("nchan"), a.hosts.clone()),
        Kind::Pushpin => Target::pushpin(
            a.name.as_deref().unwrap_or("pushpin"),
            a.hosts.clone(),
            a.publish.as_deref().context("--publish is needed for pushpin")?,
        ),
    };
    if let Some(v) = &a.ws_url {
        t.ws_url = v.clone();
    }
    if let Some(v) = &a.sse_url {
        t.sse_url = v.clone();
    }
    if let Some(v) = &a.poll_url {
        t.poll_url = v.clone();
    }
    if let Some(v) = &a.pub_url {
        t.pub_url = v.clone();
    }
    if let Some(v) = &a.pub_body {
        t.pub_body = v.clone();
    }
    if !a.pub_header.is_empty() {
        t.pub_headers = a.pub_header.clone();
    }
    if let Some(m) = &a.pid_match {
        t.pids = sys::pids_matching(m);
        if t.pids.is_empty() {
            bail!("no process matches {m:?}");
        }
    }
    Ok(t)
}

struct Worker {
    child: Child,
    stdin: ChildStdin,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl Worker {
    async fn expect(&mut self, word: &str) -> anyhow::Result<String> {
        loop {
            let line = self.lines.next_line().await?.context("worker exited")?;
            if let Some(rest) = line.strip_prefix(word) {
                return Ok(rest.trim().to_string());
            }
        }
    }

    async fn send(&mut self, line: &str) -> anyhow::Result<()> {
        self.stdin.write_all(format!("{line}\n").as_bytes()).await?;
        Ok(self.stdin.flush().await?)
    }
}

async fn spawn_workers(target: &Target, names: &Names, a: &RunArgs, n: u32) -> anyhow::Result<Vec<Worker>> {
    let exe = std::env::current_exe()?;
    let mut out = Vec::new();
    let per = a.subscribers.div_ceil(n.max(1));
    for i in 0..n {
        let (first, last) = (i * per, ((i + 1) * per).min(a.subscribers));
        if first >= last {
            break;
        }
        let spec = worker::Spec {
            target: target.clone(),
            names: names.clone(),
            protocol: a.protocol.clone(),
            first,
            last,
            channels: a.channels,
            index: i,
            connecting: a.connecting,
        };
        let mut child = Command::new(&exe)
            .arg("worker")
            .arg(serde_json::to_string(&spec)?)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?;
        let stdin = child.stdin.take().context("stdin")?;
        let lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
        out.push(Worker { child, stdin, lines });
    }
    Ok(out)
}

/// (connected, failed, slowest connect seconds)
async fn ready(workers: &mut [Worker]) -> anyhow::Result<(u64, u64, f64)> {
    let mut totals = (0, 0, 0.0f64);
    for w in workers.iter_mut() {
        let line = w.expect("READY").await?;
        let f: Vec<&str> = line.split_whitespace().collect();
        totals.0 += f.first().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        totals.1 += f.get(1).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        totals.2 = totals.2.max(f.get(2).and_then(|v| v.parse().ok()).unwrap_or(0.0));
    }
    Ok(totals)
}

async fn collect(workers: &mut [Worker], command: &str) -> anyhow::Result<Vec<worker::Report>> {
    for w in workers.iter_mut() {
        w.send(command).await?;
    }
    let mut out = Vec::new();
    for w in workers.iter_mut() {
        out.push(serde_json::from_str(&w.expect("RESULT").await?)?);
    }
    Ok(out)
}

struct Published {
    latency: Histogram,
    errors: u64,
    started_ns: u64,
    elapsed: Duration,
}

/// Publishes messages `from..to` (message k goes to channel k % channels as sequence
/// k / channels + 1), at `rate` per second or as fast as the target answers. Each of the
/// `concurrency` publishers keeps one raw HTTP/1.1 keep-alive connection (a full HTTP client
/// costs more CPU per request than the servers under test spend).
async fn publish(target: &Target, names: &Names, a: &RunArgs, from: u64, to: u64) -> anyhow::Result<Published> {
    let client_mode = a.pub_mode == PubMode::Client && target.kind == Kind::Quickim;
    let tokens: Arc<Vec<String>> = Arc::new(if client_mode {
        (0..a.channels).map(|i| target.token(&names.publisher(i))).collect()
    } else {
        Vec::new()
    });
    let next = Arc::new(AtomicU64::new(from));
    let started = Instant::now();
    let started_ns = marker::now_ns();
    let mut tasks = Vec::new();
    for t in 0..a.concurrency.max(1) {
        let (target, names, next, tokens) = (target.clone(), names.clone(), next.clone(), tokens.clone());
        let (channels, size, rate, keys) = (a.channels.max(1), a.size, a.rate, a.keys);
        tasks.push(tokio::spawn(async move {
            let mut latency = Histogram::default();
            let mut errors = 0u64;
            let mut conn: Option<(String, http::Conn)> = None;
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= to {
                    break;
                }
                if let Some(rate) = rate {
                    let due = started + Duration::from_secs_f64((k - from) as f64 / rate);
                    tokio::time::sleep_until(due.into()).await;
                }
                let channel = (k % u64::from(channels)) as u32;
                let seq = (k / u64::from(channels)) as u32 + 1;
                let payload = marker::encode(channel, seq, size);
                let channel_name = names.channel(channel);
                let (url, body, headers) = if client_mode {
                    let host = &target.hosts[t % target.hosts.len()];
                    let key = if keys { format!(r#","client_msg_id":"m{k}""#) } else { String::new() };
                    (
                        format!("http://{host}/send_msg"),
                        format!(r#"{{"conversation_id":"{channel_name}","type":1,"content":"{payload}"{key}}}"#),
                        vec![
                            ("Authorization".to_string(), format!("Bearer {}", tokens[channel as usize])),
                            ("Content-Type".to_string(), "application/json".to_string()),
                        ],
                    )
                } else {
                    let headers = target
                        .pub_headers
                        .iter()
                        .filter_map(|h| h.split_once(':').map(|(k, v)| (k.trim().to_string(), v.trim().to_string())))
                        .collect();
                    (
                        target.pub_url.replace("{channel}", &channel_name),
                        target
                            .pub_body
                            .replace("{channel}", &channel_name)
                            .replace("{payload}", &payload)
                            .replace("{from}", &names.publisher(channel)),
                        headers,
                    )
                };
                let (host, path) = http::split_url(&url);
                let t0 = Instant::now();
                let outcome: anyhow::Result<u16> = async {
                    if conn.as_ref().is_none_or(|(h, _)| *h != host) {
                        let addr = tokio::net::lookup_host(&host).await?.next().context("address")?;
                        let socket = tokio::net::TcpSocket::new_v4()?;
                        socket.bind(std::net::SocketAddr::from((
                            [127, 2, (t / 250) as u8 % 250 + 1, (t % 250) as u8 + 1],
                            0,
                        )))?;
                        socket.set_nodelay(true)?;
                        conn = Some((host.clone(), http::Conn::new(socket.connect(addr).await?)));
                    }
                    let (_, c) = conn.as_mut().context("connection")?;
                    let head = c.request("POST", &host, &path, &headers, body.as_bytes()).await?;
                    c.body().await?;
                    // A server that closes after each answer (Pushpin's publish endpoint).
                    if head.header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close")) {
                        conn = None;
                    }
                    Ok(head.status)
                }
                .await;
                match outcome {
                    Ok(status) if (200..300).contains(&status) => latency.record(t0.elapsed().as_micros() as u64),
                    Ok(status) => {
                        errors += 1;
                        if errors <= 3 {
                            eprintln!("publish: status {status}");
                        }
                    }
                    Err(e) => {
                        errors += 1;
                        conn = None;
                        if errors <= 3 {
                            eprintln!("publish: {e:#}");
                        }
                    }
                }
            }
            (latency, errors)
        }));
    }
    let mut out = Published { latency: Histogram::default(), errors: 0, started_ns, elapsed: Duration::ZERO };
    for t in tasks {
        let (h, e) = t.await?;
        out.latency.merge(&h);
        out.errors += e;
    }
    out.elapsed = started.elapsed();
    Ok(out)
}

async fn run(a: RunArgs) -> anyhow::Result<()> {
    let target = build_target(&a)?;
    let names = Names { run: format!("{:x}", marker::now_ns() % 0xff_ffff) };
    let mut result = RunResult {
        scenario: a.scenario.clone(),
        target: target.name.clone(),
        mode: format!("{:?}", a.mode).to_lowercase(),
        protocol: if a.mode == Mode::Send { "http".into() } else { a.protocol.clone() },
        subscribers: a.subscribers,
        channels: a.channels,
        messages: a.messages,
        rate: a.rate,
        ..RunResult::default()
    };
    if target.kind == Kind::Quickim {
        let mut members: Vec<Vec<u32>> = vec![Vec::new(); a.channels.max(1) as usize];
        for j in 0..a.subscribers {
            members[(j % a.channels.max(1)) as usize].push(j);
        }
        target::setup_quickim(&target, &names, &members).await?;
    }
    let cpu_before = sys::cpu_seconds();
    result.rss_before_kb = sys::total_rss_kb(&target.pids);
    let n_workers = a.workers.unwrap_or_else(|| a.subscribers.div_ceil(15_000)).max(u32::from(a.subscribers > 0));
    let mut workers = if a.subscribers > 0 { spawn_workers(&target, &names, &a, n_workers).await? } else { Vec::new() };
    if !workers.is_empty() {
        let (connected, failed, connect_s) = ready(&mut workers).await?;
        (result.connected, result.failed, result.connect_s) = (connected, failed, connect_s);
        // Let the last subscriptions settle (nchan registers long-polls asynchronously).
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let mut reports = Vec::new();
    let mut published: Option<Published> = None;
    match a.mode {
        Mode::Idle => {
            tokio::time::sleep(Duration::from_secs(2)).await;
            result.rss_after_kb = sys::total_rss_kb(&target.pids);
            reports = collect(&mut workers, "STOP").await?;
        }
        Mode::Deliver | Mode::Send => {
            result.rss_after_kb = sys::total_rss_kb(&target.pids);
            let churn = a.churn > 0.0 && a.mode == Mode::Deliver && !workers.is_empty();
            if churn {
                let share = a.churn / workers.len() as f64;
                for w in workers.iter_mut() {
                    w.send(&format!("CHURN {share}")).await?;
                }
            }
            published = Some(publish(&target, &names, &a, 0, a.messages).await?);
            if churn {
                for w in workers.iter_mut() {
                    w.send("CHURN 0").await?;
                }
            }
            if !workers.is_empty() {
                reports = collect(&mut workers, &format!("WAIT {} {}", a.messages, a.timeout)).await?;
            }
        }
        Mode::Resume => {
            let warm = u64::from(a.channels.max(1));
            publish(&target, &names, &a, 0, warm).await?;
            collect(&mut workers, &format!("WAIT {warm} {}", a.timeout)).await?;
            for w in workers.iter_mut() {
                w.send("DROP").await?;
            }
            for w in workers.iter_mut() {
                w.expect("DROPPED").await?;
            }
            published = Some(publish(&target, &names, &a, warm, warm + a.messages).await?);
            let reconnect_ns = marker::now_ns();
            for w in workers.iter_mut() {
                w.send("RECONNECT").await?;
            }
            let (connected, failed, _) = ready(&mut workers).await?;
            (result.connected, result.failed) = (connected, failed);
            reports = collect(&mut workers, &format!("WAIT {} {}", warm + a.messages, a.timeout)).await?;
            let last = reports.iter().map(|r| r.last_ns).max().unwrap_or(reconnect_ns);
            result.catchup_s = last.saturating_sub(reconnect_ns) as f64 / 1e9;
        }
    }
    for w in workers.iter_mut() {
        let _ = w.send("STOP").await;
    }
    for mut w in workers {
        let _ = tokio::time::timeout(Duration::from_secs(10), w.child.wait()).await;
    }
    // Merge.
    let mut latency = Histogram::default();
    let mut catchup = Histogram::default();
    let mut last_ns = 0;
    for r in &reports {
        catchup.merge(&r.catchup);
        result.expected += r.expected;
        result.delivered += r.delivered;
        result.lost += r.lost;
        result.duplicated += r.duplicated;
        result.client_cpu_s += r.cpu_s;
        result.reconnects += r.reconnects;
        latency.merge(&r.latency);
        last_ns = last_ns.max(r.last_ns);
    }
    if a.mode == Mode::Resume {
        // Count only what the resume had to deliver (the warm-up came before the drop).
        let warm = u64::from(a.subscribers);
        result.expected = result.expected.saturating_sub(warm);
        result.delivered = result.delivered.saturating_sub(warm);
        result.catchup_p50_ms = catchup.quantile_ms(0.5);
        result.catchup_p99_ms = catchup.quantile_ms(0.99);
        if result.catchup_s > 0.0 {
            result.deliveries_per_s = result.delivered as f64 / result.catchup_s;
        }
    }
    result.p50_ms = latency.quantile_ms(0.5);
    result.p95_ms = latency.quantile_ms(0.95);
    result.p99_ms = latency.quantile_ms(0.99);
    result.max_ms = latency.max_ms();
    if let Some(p) = &published {
        result.published = p.latency.count();
        result.publish_errors = p.errors;
        result.publish_per_s = p.latency.count() as f64 / p.elapsed.as_secs_f64().max(1e-9);
        result.publish_p50_ms = p.latency.quantile_ms(0.5);
        result.publish_p99_ms = p.latency.quantile_ms(0.99);
        result.publish_max_ms = p.latency.max_ms();
        if last_ns > p.started_ns && a.mode == Mode::Deliver {
            result.deliveries_per_s = result.delivered as f64 / ((last_ns - p.started_ns) as f64 / 1e9);
        }
    }
    if a.mode == Mode::Idle && a.subscribers > 0 {
        result.rss_per_conn_kb =
            result.rss_after_kb.saturating_sub(result.rss_before_kb) as f64 / result.connected.max(1) as f64;
    }
    result.client_cpu_s += sys::cpu_seconds() - cpu_before;
    let line = serde_json::to_string(&result)?;
    println!("{line}");
    if let Some(path) = &a.out {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        writeln!(f, "{line}")?;
    }
    Ok(())
}
