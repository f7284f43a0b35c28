//! The chaos suite: a cluster (2 gateways, 2 message services, 1 conversation service, NATS,
//! PostgreSQL) under load while, in turn, a gateway is killed, a gateway is paused past NATS's
//! slow-consumer deadline, a message service is killed, NATS restarts, PostgreSQL restarts
//! and PostgreSQL's backends are terminated. Clients on WebSocket, SSE and long-poll on every
//! gateway reconnect with their cursors, as real clients do; the sender retries every failed
//! send with the same client_msg_id until it is acknowledged.
//!
//! At the end: every client holds every acknowledged message exactly once and in order, the
//! history is gap-free, no answer was a 500, and every retried send stored one copy.
//!
//! The test command runs one round of faults (about two minutes); `QUICKIM_CHAOS_ROUNDS=N`
//! (`scripts/test.sh --chaos-rounds N`) runs N. The figures of the run are printed and written
//! to `target/chaos-report.md` (docs/reliability.md carries those of the last run);
//! `QUICKIM_CHAOS_DEBUG=1` prints every client's reconnections.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs, clippy::print_stdout)]

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quickim_testkit::{Api, Distributed, NatsServer, NotifyClient, PgDatabase, PgServer, Protocol};
use serde_json::{Value, json};
use tokio::sync::Semaphore;

const BIN: &str = env!("CARGO_BIN_EXE_quickim");

/// The content limit of the cluster; every tenth message is this large.
const MAX_CONTENT: usize = 32 * 1024;
const CONVERSATIONS: usize = 3;
/// Sends per second, in the background of every fault.
const RATE: u64 = 40;
/// How long every client may take to hold every acknowledged message after a fault.
const RECOVERY_BOUND: Duration = Duration::from_secs(60);

/// What happened to the sends and the clients during one phase (a fault and its recovery).
#[derive(Default, Clone)]
struct PhaseFigures {
    attempts: u64,
    acked: u64,
    /// Answers other than 200, by status (0: no answer within the client's own timeout).
    failed: BTreeMap<u16, u64>,
    /// Longest time from a message's first attempt to its acknowledgement.
    max_ack: Duration,
    reconnects: u64,
    recovery: Duration,
    gap_filled: f64,
}

struct Ledger {
    phase: AtomicUsize,
    phases: Mutex<Vec<(String, PhaseFigures)>>,
    /// seq → (conversation, msg_id) once acknowledged.
    acked: Mutex<BTreeMap<u64, (String, u64)>>,
    /// Every non-200 answer's body for a 5xx other than 503/504 (must stay empty).
    internal: Mutex<Vec<String>>,
    /// Messages acknowledged at the content limit.
    large: AtomicU64,
}

impl Ledger {
    fn with_phase(&self, f: impl FnOnce(&mut PhaseFigures)) {
        let i = self.phase.load(Ordering::Relaxed);
        let mut phases = self.phases.lock().unwrap();
        f(&mut phases[i].1);
    }

    fn start_phase(&self, name: &str) {
        let mut phases = self.phases.lock().unwrap();
        phases.push((name.to_string(), PhaseFigures::default()));
        self.phase.store(phases.len() - 1, Ordering::Relaxed);
    }
}

/// One /notify client: its messages (conversation, msg_id, seq), in arrival order.
struct Client {
    name: String,
    received: Mutex<Vec<(String, u64, u64)>>,
    reconnects: AtomicU64,
}

fn content(seq: u64) -> String {
    let len = if seq.is_multiple_of(10) { MAX_CONTENT } else { 20 + (seq as usize * 37) % 300 };
    let head = format!("{seq:08}|");
    let mut s = head.clone();
    s.push_str(&"é".repeat((len - head.len()) / 2));
    while s.len() < len {
        s.push('x');
    }
    s
}

fn seq_of(content: &str) -> u64 {
    content.split('|').next().and_then(|s| s.parse().ok()).unwrap_or(u64::MAX)
}

async fn run_client(
    client: Arc<Client>,
    gateways: Vec<String>,
    home: usize,
    token: String,
    protocol: Protocol,
    stop: Arc<AtomicBool>,
) {
    let mut cursor: Option<String> = None;
    let mut g = home;
    let mut first = true;
    while !stop.load(Ordering::Relaxed) {
        let connect = NotifyClient::connect(&gateways[g], &token, protocol, cursor.as_deref());
        let last = client.received.lock().unwrap().last().cloned();
        match tokio::time::timeout(Duration::from_secs(5), connect).await {
            Ok(Ok(mut c)) => {
                if std::env::var("QUICKIM_CHAOS_DEBUG").is_ok() {
                    eprintln!("{} connected to gateway {g} with {cursor:?}, last message {last:?}", client.name);
                }
                if !first {
                    client.reconnects.fetch_add(1, Ordering::Relaxed);
                }
                first = false;
                while !stop.load(Ordering::Relaxed) {
                    // A stalled node (paused) keeps a request open: the client moves on after a
                    // while, as a client with a heartbeat check would.
                    match tokio::time::timeout(Duration::from_secs(8), c.next(Duration::from_secs(1))).await {
                        Ok(Some(e)) => {
                            if e["type"] == "message" {
                                let m = &e["message"];
                                client.received.lock().unwrap().push((
                                    m["conversation_id"].as_str().unwrap_or_default().to_string(),
                                    m["msg_id"].as_u64().unwrap_or(0),
                                    seq_of(m["content"].as_str().unwrap_or_default()),
                                ));
                            }
                            if let Some(cur) = c.cursor.clone() {
                                cursor = Some(cur);
                            }
                        }
                        Ok(None) if c.closed.is_none() => {
                            if let Some(cur) = c.cursor.clone() {
                                cursor = Some(cur);
                            }
                        }
                        _ => break,
                    }
                }
            }
            _ => g = (g + 1) % gateways.len(),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Sends message `seq` until it is acknowledged, through the gateways in turn, always with
/// the same client_msg_id.
async fn send_until_acked(http: reqwest::Client, gateways: Vec<Api>, seq: u64, ledger: Arc<Ledger>) {
    let conversation = format!("c{}", seq as usize % CONVERSATIONS);
    let body = json!({
        "conversation_id": conversation, "from": "sender", "type": 1, "content": content(seq),
        "client_msg_id": format!("k{seq}"),
    });
    let started = Instant::now();
    let mut attempt = 0usize;
    loop {
        let api = &gateways[(seq as usize + attempt) % gateways.len()];
        attempt += 1;
        ledger.with_phase(|p| p.attempts += 1);
        let answer = http.post(format!("{}/inner/send_msg", api.inner)).bearer_auth(&api.key).json(&body).send().await;
        let (status, v) = match answer {
            Ok(r) => {
                let status = r.status().as_u16();
                (status, r.json::<Value>().await.unwrap_or(Value::Null))
            }
            Err(_) => (0, Value::Null),
        };
        if status == 200 {
            let msg_id = v["data"]["msg_id"].as_u64().unwrap();
            if body["content"].as_str().is_some_and(|c| c.len() == MAX_CONTENT) {
                ledger.large.fetch_add(1, Ordering::Relaxed);
            }
            ledger.acked.lock().unwrap().insert(seq, (conversation, msg_id));
            let took = started.elapsed();
            ledger.with_phase(|p| {
                p.acked += 1;
                p.max_ack = p.max_ack.max(took);
            });
            return;
        }
        ledger.with_phase(|p| *p.failed.entry(status).or_default() += 1);
        if status >= 500 && status != 503 && status != 504 || (400..500).contains(&status) {
            ledger.internal.lock().unwrap().push(format!("k{seq}: {status} {v}"));
        }
        tokio::time::sleep(Duration::from_millis(100 + 100 * attempt.min(10) as u64)).await;
    }
}

async fn metric(api: &Api, name: &str) -> f64 {
    let Ok(r) = api.http.get(format!("{}/metrics", api.inner)).timeout(Duration::from_secs(2)).send().await else {
        return 0.0;
    };
    let text = r.text().await.unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits until every client holds every message acknowledged so far; answers how long.
async fn caught_up(clients: &[Arc<Client>], ledger: &Ledger) -> Duration {
    let started = Instant::now();
    let want: HashMap<String, u64> = {
        let mut w = HashMap::new();
        for (conv, msg_id) in ledger.acked.lock().unwrap().values() {
            let e = w.entry(conv.clone()).or_insert(0);
            *e = (*e).max(*msg_id);
        }
        w
    };
    loop {
        let behind: Vec<String> = clients
            .iter()
            .filter(|c| {
                let got = c.received.lock().unwrap();
                want.iter().any(|(conv, max)| !got.iter().any(|(cc, id, _)| cc == conv && id >= max))
            })
            .map(|c| c.name.clone())
            .collect();
        if behind.is_empty() {
            return started.elapsed();
        }
        assert!(started.elapsed() < RECOVERY_BOUND, "clients still behind after {RECOVERY_BOUND:?}: {behind:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_client_gets_every_acknowledged_message_once_whatever_fails() {
    let rounds: usize = std::env::var("QUICKIM_CHAOS_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(1);
    let pg = PgServer::start();
    let db = PgDatabase::create_on(&pg.base).await;
    let db_name = db.name.clone();
    // NATS as deployed, with a smaller max_payload (every kind of bus message is paged) and
    // a quicker slow-consumer cut (so the pause fault takes seconds, not minutes).
    let nats = NatsServer::start_configured("max_payload: 262144\nmax_pending: 2097152\nwrite_deadline: \"2s\"\n", &[]);
    let mut d = Distributed::start_on(
        BIN,
        nats,
        db,
        1,
        2,
        2,
        &[
            ("QUICKIM_MAX_CONTENT_BYTES", "32768"),
            ("QUICKIM_REQUEST_TIMEOUT_MS", "3000"),
            ("QUICKIM_HUB_STALL_S", "10"),
            ("QUICKIM_LOG", "warn"),
        ],
    )
    .await;
    let users: Vec<String> = (0..2).flat_map(|g| Protocol::ALL.map(|p| format!("u{g}{}", p.name()))).collect();
    let mut members: Vec<&str> = users.iter().map(String::as_str).collect();
    members.push("sender");
    for c in 0..CONVERSATIONS {
        d.api(0).conversation(&format!("c{c}"), &members).await;
    }

    let ledger = Arc::new(Ledger {
        phase: AtomicUsize::new(0),
        phases: Mutex::new(Vec::new()),
        acked: Mutex::new(BTreeMap::new()),
        internal: Mutex::new(Vec::new()),
        large: AtomicU64::new(0),
    });
    ledger.start_phase("steady load");
    let publics: Vec<String> = (0..2).map(|g| d.api(g).public.clone()).collect();
    let stop_clients = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    let mut client_tasks = Vec::new();
    for g in 0..2 {
        for p in Protocol::ALL {
            let name = format!("u{g}{}", p.name());
            let token = d.api(0).token(&name, "web").await;
            let client =
                Arc::new(Client { name: name.clone(), received: Mutex::default(), reconnects: AtomicU64::new(0) });
            // Connected (ready) before the first message: each must get every message.
            let mut c = NotifyClient::connect(&publics[g], &token, p, None).await.unwrap();
            assert_eq!(c.next(Duration::from_secs(10)).await.unwrap()["type"], "ready");
            drop(c.drop_connection());
            clients.push(client.clone());
            client_tasks.push(tokio::spawn(run_client(client, publics.clone(), g, token, p, stop_clients.clone())));
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The clients hold no cursor yet at their first connection: they start "from now" before
    // any message. Make sure they are all live before sending.
    let apis: Vec<Api> = (0..2).map(|g| d.api(g).clone()).collect();
    let http = reqwest::Client::builder().timeout(Duration::from_secs(4)).build().unwrap();
    let next_seq = Arc::new(AtomicU64::new(0));
    let stop_sending = Arc::new(AtomicBool::new(false));
    let in_flight = Arc::new(Semaphore::new(64));
    let sender = {
        let (http, apis, ledger, next_seq, stop, in_flight) =
            (http.clone(), apis.clone(), ledger.clone(), next_seq.clone(), stop_sending.clone(), in_flight.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(1000 / RATE));
            let mut tasks = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let permit = in_flight.clone().acquire_owned().await.unwrap();
                let seq = next_seq.fetch_add(1, Ordering::Relaxed);
                let (http, apis, ledger) = (http.clone(), apis.clone(), ledger.clone());
                tasks.push(tokio::spawn(async move {
                    send_until_acked(http, apis, seq, ledger).await;
                    drop(permit);
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(5)).await;
    let r = caught_up(&clients, &ledger).await;
    ledger.with_phase(|p| p.recovery = r);

    let started = Instant::now();
    for round in 0..rounds {
        let tag = |name: &str| if rounds > 1 { format!("{name} (round {})", round + 1) } else { name.to_string() };
        let reconnects =
            |clients: &[Arc<Client>]| clients.iter().map(|c| c.reconnects.load(Ordering::Relaxed)).sum::<u64>();
        // Per gateway: a restarted gateway's counter starts again from 0.
        let gap_filled = |d: &Distributed| {
            let apis: Vec<Api> = (0..2).map(|g| d.api(g).clone()).collect();
            async move {
                let mut each = Vec::new();
                for a in &apis {
                    each.push(metric(a, "quickim_hub_gap_filled_entries_total").await);
                }
                each
            }
        };

        for fault in 0..6 {
            let before = (reconnects(&clients), gap_filled(&d).await);
            match fault {
                0 => {
                    ledger.start_phase(&tag("gateway 0 killed (SIGKILL), restarted after 2 s"));
                    d.gateways[0].0.kill();
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    d.start_gateway_again(0).await;
                }
                1 => {
                    ledger.start_phase(&tag("gateway 1 paused 8 s (SIGSTOP) under 9.6 MB of sends: NATS cuts it"));
                    d.gateways[1].0.pause();
                    // 300 messages at the content limit through gateway 0, in batches.
                    for b in 0..30 {
                        let seqs: Vec<u64> = (0..10).map(|_| next_seq.fetch_add(1, Ordering::Relaxed)).collect();
                        let msgs: Vec<Value> = seqs
                            .iter()
                            .map(|s| {
                                let mut c = format!("{s:08}|");
                                c.push_str(&"y".repeat(MAX_CONTENT - c.len()));
                                json!({"conversation_id": format!("c{}", *s as usize % CONVERSATIONS), "from": "sender",
                                       "type": 1, "content": c, "client_msg_id": format!("k{s}")})
                            })
                            .collect();
                        let (s, v) = apis[0].inner("/inner/send_msg_batch", json!({ "msgs": msgs })).await;
                        assert_eq!(s, 200, "batch {b}: {v}");
                        for (seq, r) in seqs.iter().zip(v["data"]["results"].as_array().unwrap()) {
                            assert_eq!(r["code"], 0, "{r}");
                            let conv = format!("c{}", *seq as usize % CONVERSATIONS);
                            ledger.acked.lock().unwrap().insert(*seq, (conv, r["data"]["msg_id"].as_u64().unwrap()));
                            ledger.large.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    tokio::time::sleep(Duration::from_secs(8)).await;
                    d.gateways[1].0.resume();
                }
                2 => {
                    ledger.start_phase(&tag("message service 0 killed (SIGKILL), restarted after 2 s"));
                    d.message[0].kill();
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    d.restart_message_service(0);
                }
                3 => {
                    ledger.start_phase(&tag("NATS killed, restarted after 1 s"));
                    d.nats.stop();
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    d.nats.start_again();
                }
                4 => {
                    ledger.start_phase(&tag("PostgreSQL crashed and restarted (immediate)"));
                    pg.restart();
                }
                _ => {
                    ledger.start_phase(&tag("PostgreSQL backends terminated, 3 times 1 s apart"));
                    for _ in 0..3 {
                        pg.terminate_backends(&db_name).await;
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
            // Recovery: from the fault's end until every client holds everything acknowledged
            // by then (with the sends still going on).
            tokio::time::sleep(Duration::from_millis(500)).await;
            let r = caught_up(&clients, &ledger).await + Duration::from_millis(500);
            let after = (reconnects(&clients), gap_filled(&d).await);
            ledger.with_phase(|p| {
                p.recovery = r;
                p.reconnects = after.0 - before.0;
                p.gap_filled = after.1.iter().zip(&before.1).map(|(a, b)| if a >= b { a - b } else { *a }).sum::<f64>();
            });
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
    }

    // The end: stop sending, let every send be acknowledged and every client catch up.
    ledger.start_phase("drain");
    stop_sending.store(true, Ordering::Relaxed);
    tokio::time::timeout(Duration::from_secs(120), sender).await.expect("every send acknowledged").unwrap();
    caught_up(&clients, &ledger).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop_clients.store(true, Ordering::Relaxed);
    for t in client_tasks {
        let _ = tokio::time::timeout(Duration::from_secs(20), t).await;
    }
    let elapsed = started.elapsed();

    // 1. No answer was a 500 (nor any 4xx: every send was valid).
    let internal = ledger.internal.lock().unwrap().clone();
    assert!(internal.is_empty(), "answers other than 200/503/504: {internal:?}");

    // 2. The history of each conversation is gap-free, each acknowledged message at its
    // msg_id, each seq once (a retried send stored one copy).
    let acked = ledger.acked.lock().unwrap().clone();
    let reader = d.api(0).token("sender", "web").await;
    let mut by_conv: HashMap<String, BTreeMap<u64, u64>> = HashMap::new();
    for (seq, (conv, msg_id)) in &acked {
        let previous = by_conv.entry(conv.clone()).or_default().insert(*msg_id, *seq);
        assert!(previous.is_none(), "msg_id {msg_id} of {conv} acknowledged for two sends");
    }
    for c in 0..CONVERSATIONS {
        let conv = format!("c{c}");
        let expected = &by_conv[&conv];
        let last = *expected.keys().last().unwrap();
        let mut history = Vec::new();
        let mut start = 1;
        while start <= last {
            let range = json!({"conversation_id": conv, "start_msg_id": start, "end_msg_id": (start + 99).min(last)});
            let (s, v) = apis[0].client(&reader, "/get_conversation_msg_by_range", range).await;
            assert_eq!(s, 200, "{v}");
            let msgs = v["data"]["msgs"].as_array().unwrap().clone();
            assert!(!msgs.is_empty());
            start += msgs.len() as u64;
            history.extend(msgs);
        }
        let ids: Vec<u64> = history.iter().map(|m| m["msg_id"].as_u64().unwrap()).collect();
        assert_eq!(ids, (1..=last).collect::<Vec<_>>(), "{conv}: gap-free history");
        for m in &history[1..] {
            let id = m["msg_id"].as_u64().unwrap();
            let seq = seq_of(m["content"].as_str().unwrap());
            assert_eq!(expected.get(&id), Some(&seq), "{conv} msg_id {id}: stored once, as acknowledged");
        }
        assert_eq!(expected.len() as u64, last - 1, "{conv}: every stored message was acknowledged");
    }

    // 3. Every client holds every message exactly once, in order.
    let mut deliveries = 0;
    for client in &clients {
        let got = client.received.lock().unwrap();
        deliveries += got.len();
        for c in 0..CONVERSATIONS {
            let conv = format!("c{c}");
            let ids: Vec<u64> = got.iter().filter(|(cc, _, _)| *cc == conv).map(|(_, id, _)| *id).collect();
            let last = *by_conv[&conv].keys().last().unwrap();
            assert_eq!(ids, (2..=last).collect::<Vec<_>>(), "{}: {conv} exactly once, in order", client.name);
        }
    }

    // The report.
    let phases = ledger.phases.lock().unwrap().clone();
    let mut report = format!(
        "Chaos run: {} round(s) of 6 faults in {:.0} s; {} messages acknowledged ({} at the 32 KiB content limit), \
         {} deliveries to 6 clients (WS, SSE, long-poll on each of 2 gateways): 0 lost, 0 duplicated, 0 out of order; \
         0 answers 500.\n\n\
         | phase | send attempts | acknowledged | failed answers (status: count) | longest send until acknowledged | client reconnects | entries gap-filled | every client caught up after |\n\
         |---|---|---|---|---|---|---|---|\n",
        rounds,
        elapsed.as_secs_f64(),
        acked.len(),
        ledger.large.load(Ordering::Relaxed),
        deliveries,
    );
    for (name, p) in &phases {
        let failed = if p.failed.is_empty() {
            "none".to_string()
        } else {
            p.failed
                .iter()
                .map(|(s, n)| format!("{}: {n}", if *s == 0 { "no answer".to_string() } else { s.to_string() }))
                .collect::<Vec<_>>()
                .join(", ")
        };
        report.push_str(&format!(
            "| {name} | {} | {} | {failed} | {:.1} s | {} | {:.0} | {:.1} s |\n",
            p.attempts,
            p.acked,
            p.max_ack.as_secs_f64(),
            p.reconnects,
            p.gap_filled,
            p.recovery.as_secs_f64()
        ));
    }
    println!("{report}");
    let target = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target");
    let _ = std::fs::create_dir_all(&target);
    let _ = std::fs::write(target.join("chaos-report.md"), &report);
    d.finish().await;
}
