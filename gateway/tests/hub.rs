//! The hub over a lossy bus: dropped, reordered and lost-at-the-tail log entries still reach
//! connections exactly once, in order, by filling gaps from the store. The store here is a
//! scripted message service on the in-process bus; the hub is the real one.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use quickim_gateway::notify::hub::{Hub, HubConfig, Outgoing, Start};
use quickim_gateway::notify::queue::Closed;
use quickim_shared::bus::Bus;
use quickim_shared::error::ServiceError;
use quickim_shared::fanout::publish_entries;
use quickim_shared::position::Position;
use quickim_shared::protocol::api::Message;
use quickim_shared::protocol::event::{HEADS_SUBJECT, LogEntry};
use quickim_shared::protocol::service::{
    Call, GetHeads, GetMemberships, LogHeads, MembershipRow, Memberships, ReadLog, Reply,
};
use quickim_shared::protocol::system::{self, LEFT};
use quickim_shared::rpc::RpcClient;
use tokio_util::sync::CancellationToken;

type Log = Arc<Mutex<Vec<LogEntry>>>;

fn entry(offset: u64) -> LogEntry {
    message_in("c", offset, offset, format!("m{offset}"))
}

fn message_in(conversation: &str, offset: u64, msg_id: u64, content: String) -> LogEntry {
    LogEntry {
        part: 0,
        offset,
        message: Message {
            conversation_id: conversation.into(),
            msg_id,
            from: "bob".into(),
            msg_type: 1,
            content,
            client_msg_id: None,
            send_time: 0,
            ..Default::default()
        },
    }
}

fn heads(log: &Log) -> LogHeads {
    LogHeads { epoch: 7, heads: vec![log.lock().unwrap().len() as u64].into() }
}

/// What the scripted services answer, beyond the log itself.
#[derive(Default)]
struct Script {
    /// Gap-fill reads asked for: (after, upto).
    reads: Mutex<Vec<(u64, u64)>>,
    /// Most entries a read answers (0: all).
    page: AtomicUsize,
    /// Reads fail while set.
    failing: AtomicBool,
    /// The memberships answered: (heads, conversations) — default: heads of the log, `c`.
    memberships: Mutex<Option<(Position, Vec<&'static str>)>>,
    /// Conversations per membership page (0: all).
    membership_page: AtomicUsize,
}

/// Answers the hub's questions from `log` (one partition, user `u` in conversation `c`).
async fn fake_services(bus: Bus, log: Log) -> Arc<Script> {
    let script = Arc::new(Script::default());
    scripted_services(bus, log, script.clone()).await;
    script
}

async fn scripted_services(bus: Bus, log: Log, script: Arc<Script>) {
    let mut sub = futures::stream::select(
        bus.subscribe("quickim.msg.*", None).await.unwrap(),
        bus.subscribe("quickim.conv.*", None).await.unwrap(),
    );
    tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            let body: Vec<u8> = match msg.subject.as_str() {
                GetHeads::SUBJECT => serde_json::to_vec(&Reply::Ok(heads(&log))).unwrap(),
                GetMemberships::SUBJECT => {
                    let r: GetMemberships = serde_json::from_slice(&msg.payload).unwrap();
                    let (h, all) =
                        script.memberships.lock().unwrap().clone().unwrap_or_else(|| (heads(&log).heads, vec!["c"]));
                    let rest: Vec<&str> =
                        all.into_iter().filter(|c| r.after.as_deref().is_none_or(|a| *c > a)).collect();
                    let page = match script.membership_page.load(Ordering::Relaxed) {
                        0 => rest.len(),
                        n => n,
                    };
                    let conversations: Vec<MembershipRow> = rest
                        .iter()
                        .take(page)
                        .map(|c| MembershipRow { conversation_id: c.to_string(), joined_msg_id: 1 })
                        .collect();
                    serde_json::to_vec(&Reply::Ok(Memberships { heads: h, conversations, more: rest.len() > page }))
                        .unwrap()
                }
                ReadLog::SUBJECT => {
                    let r: ReadLog = serde_json::from_slice(&msg.payload).unwrap();
                    script.reads.lock().unwrap().push((r.after, r.upto));
                    if script.failing.load(Ordering::Relaxed) {
                        serde_json::to_vec(&Reply::<()>::Err(ServiceError::unavailable("database down"))).unwrap()
                    } else {
                        let page = match script.page.load(Ordering::Relaxed) {
                            0 => usize::MAX,
                            n => n,
                        };
                        let out: Vec<LogEntry> = log
                            .lock()
                            .unwrap()
                            .iter()
                            .filter(|e| e.offset > r.after && e.offset <= r.upto)
                            .take(page)
                            .cloned()
                            .collect();
                        serde_json::to_vec(&Reply::Ok(out)).unwrap()
                    }
                }
                other => panic!("unexpected request {other}"),
            };
            msg.respond(Vec::new(), Bytes::from(body)).await.unwrap();
        }
    });
}

async fn ready_hub(bus: &Bus, config: HubConfig) -> Hub {
    let rpc = RpcClient::new(bus.clone(), Duration::from_secs(2));
    let hub = Hub::start(bus.clone(), rpc, config, CancellationToken::new()).await.unwrap();
    while !hub.is_ready() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    hub
}

async fn announce_heads(bus: &Bus, log: &Log) {
    bus.publish(HEADS_SUBJECT, Vec::new(), serde_json::to_vec(&heads(log)).unwrap().into()).await.unwrap();
}

async fn append(bus: &Bus, log: &Log, offset: u64, publish: bool) {
    let e = entry(offset);
    log.lock().unwrap().push(e.clone());
    if publish {
        publish_entries(bus, std::slice::from_ref(&e)).await;
    }
}

async fn next_message(inbox: &mut quickim_gateway::notify::queue::Inbox) -> String {
    loop {
        match tokio::time::timeout(Duration::from_secs(5), inbox.recv()).await.expect("an event in time") {
            Ok(Outgoing::Event(e)) => {
                let v: serde_json::Value = serde_json::from_slice(&e.json).unwrap();
                return v["message"]["content"].as_str().unwrap().to_string();
            }
            Ok(Outgoing::Installed(_)) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn gaps_reordering_and_lost_tails_are_repaired_from_the_store() {
    let bus = Bus::local(1024);
    let log: Log = Arc::default();
    let script = fake_services(bus.clone(), log.clone()).await;
    let reads = &script.reads;
    let rpc = RpcClient::new(bus.clone(), Duration::from_secs(2));
    let hub = Hub::start(bus.clone(), rpc, HubConfig::gap_fill(Duration::from_millis(50)), CancellationToken::new())
        .await
        .unwrap();
    while !hub.is_ready() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (attachment, mut inbox) = hub.attach("u", None, 1000, 1 << 20).await.unwrap();
    if let Start::Waiting = attachment.start {
        assert!(matches!(inbox.recv().await, Ok(Outgoing::Installed(_))));
    }

    // 3 is lost on the bus: 1 and 2 come at once, 3 is read from the store, then 4 and 5.
    for (o, publish) in [(1, true), (2, true), (3, false), (4, true), (5, true)] {
        append(&bus, &log, o, publish).await;
    }
    let mut got = Vec::new();
    for _ in 0..5 {
        got.push(next_message(&mut inbox).await);
    }
    assert_eq!(got, ["m1", "m2", "m3", "m4", "m5"]);
    assert!(reads.lock().unwrap().contains(&(2, 3)), "the gap was read from the store: {:?}", reads.lock().unwrap());

    // Out of order on the bus: delivered in order.
    append(&bus, &log, 6, false).await;
    append(&bus, &log, 7, true).await;
    publish_entries(&bus, std::slice::from_ref(&entry(6))).await;
    assert_eq!(next_message(&mut inbox).await, "m6");
    assert_eq!(next_message(&mut inbox).await, "m7");

    // The last entries are lost: only the heads announcement tells; they are read back.
    append(&bus, &log, 8, false).await;
    append(&bus, &log, 9, false).await;
    bus.publish(HEADS_SUBJECT, Vec::new(), serde_json::to_vec(&heads(&log)).unwrap().into()).await.unwrap();
    assert_eq!(next_message(&mut inbox).await, "m8");
    assert_eq!(next_message(&mut inbox).await, "m9");

    // Nothing twice: duplicates on the bus are ignored.
    publish_entries(&bus, std::slice::from_ref(&entry(9))).await;
    append(&bus, &log, 10, true).await;
    assert_eq!(next_message(&mut inbox).await, "m10");
    let (_, position, _) = hub.position();
    assert_eq!(&position[..], &[10]);
}

#[tokio::test]
async fn a_full_queue_cuts_the_connection_off() {
    let bus = Bus::local(1024);
    let log: Log = Arc::default();
    fake_services(bus.clone(), log.clone()).await;
    let rpc = RpcClient::new(bus.clone(), Duration::from_secs(2));
    let hub = Hub::start(bus.clone(), rpc, HubConfig::gap_fill(Duration::from_millis(50)), CancellationToken::new())
        .await
        .unwrap();
    while !hub.is_ready() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (_attachment, mut inbox) = hub.attach("u", None, 4, 1 << 20).await.unwrap();
    for o in 1..=10 {
        append(&bus, &log, o, true).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut taken = 0;
    let closed = loop {
        match tokio::time::timeout(Duration::from_secs(5), inbox.recv()).await.expect("the slow connection is cut off")
        {
            Ok(_) => taken += 1,
            Err(closed) => break closed,
        }
    };
    assert_eq!(closed, Closed::Overflow);
    assert!(taken <= 4, "an overflowed queue hands out nothing more: {taken}");
}

#[tokio::test]
async fn a_gap_of_many_pages_is_read_back_to_back() {
    let bus = Bus::local(1024);
    let log: Log = Arc::default();
    let script = Arc::new(Script::default());
    script.page.store(100, Ordering::Relaxed);
    scripted_services(bus.clone(), log.clone(), script.clone()).await;
    // A gap is filled a second after it opens, and ticks come every half second: one page
    // per tick would take 15 s for 30 pages.
    let hub = ready_hub(&bus, HubConfig::gap_fill(Duration::from_secs(1))).await;
    let (attachment, mut inbox) = hub.attach("u", None, 10_000, 1 << 24).await.unwrap();
    if let Start::Waiting = attachment.start {
        assert!(matches!(inbox.recv().await, Ok(Outgoing::Installed(_))));
    }
    for o in 1..=3000 {
        append(&bus, &log, o, false).await;
    }
    let started = Instant::now();
    announce_heads(&bus, &log).await;
    for o in 1..=3000 {
        assert_eq!(next_message(&mut inbox).await, format!("m{o}"));
    }
    let took = started.elapsed();
    let reads = script.reads.lock().unwrap().len();
    assert!(reads >= 30, "{reads} pages");
    assert!(took < Duration::from_secs(5), "30 pages took {took:?}: not back to back");
}

#[tokio::test]
async fn a_hub_that_cannot_catch_up_stalls_then_recovers_by_itself() {
    let bus = Bus::local(1024);
    let log: Log = Arc::default();
    let script = Arc::new(Script::default());
    scripted_services(bus.clone(), log.clone(), script.clone()).await;
    let config =
        HubConfig { gap_fill: Duration::from_millis(50), stall_after: Duration::from_secs(1), ..HubConfig::default() };
    let hub = ready_hub(&bus, config).await;
    let (attachment, mut inbox) = hub.attach("u", None, 1000, 1 << 20).await.unwrap();
    if let Start::Waiting = attachment.start {
        assert!(matches!(inbox.recv().await, Ok(Outgoing::Installed(_))));
    }
    // The store cannot answer: the entries the heads announce stay out of reach.
    script.failing.store(true, Ordering::Relaxed);
    for o in 1..=5 {
        append(&bus, &log, o, false).await;
    }
    announce_heads(&bus, &log).await;
    let closed = loop {
        match tokio::time::timeout(Duration::from_secs(10), inbox.recv()).await.expect("closed in time") {
            Ok(Outgoing::Event(e)) => panic!("nothing can be delivered: {e:?}"),
            Ok(_) => continue,
            Err(closed) => break closed,
        }
    };
    assert_eq!(closed, Closed::Behind, "the connection is told to go elsewhere");
    assert!(hub.is_stalled() && !hub.is_ready());
    let failures = script.reads.lock().unwrap().len();
    assert!((2..40).contains(&failures), "retried with a backoff: {failures} attempts in a second");
    drop(attachment);

    // The store answers again: the hub catches up and serves again, by itself.
    script.failing.store(false, Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !hub.is_ready() {
        assert!(Instant::now() < deadline, "the hub did not recover");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(&hub.position().1[..], &[5]);
    let (attachment, mut inbox) = hub.attach("u", None, 1000, 1 << 20).await.unwrap();
    if let Start::Waiting = attachment.start {
        assert!(matches!(inbox.recv().await, Ok(Outgoing::Installed(_))));
    }
    append(&bus, &log, 6, true).await;
    assert_eq!(next_message(&mut inbox).await, "m6");
}

#[tokio::test]
async fn a_snapshot_read_ahead_of_the_hub_goes_live_where_it_was_read() {
    let bus = Bus::local(1024);
    let log: Log = Arc::default();
    let script = Arc::new(Script::default());
    scripted_services(bus.clone(), log.clone(), script.clone()).await;
    // The hub fills gaps only after 10 s: nothing but the bus moves it in this test.
    let hub = ready_hub(&bus, HubConfig::gap_fill(Duration::from_secs(10))).await;
    for o in 1..=3 {
        append(&bus, &log, o, true).await;
    }
    while hub.position().1[0] < 3 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // m4, then u leaves c (5): committed, but not yet on the bus when u's first connection
    // reads its memberships — which already show the leave.
    append(&bus, &log, 4, false).await;
    let left = LogEntry {
        part: 0,
        offset: 5,
        message: Message {
            conversation_id: "c".into(),
            msg_id: 5,
            from: String::new(),
            msg_type: LEFT,
            content: system::content(&system::Users { user_ids: vec!["u".into()] }),
            client_msg_id: None,
            send_time: 0,
            ..Default::default()
        },
    };
    log.lock().unwrap().push(left.clone());
    *script.memberships.lock().unwrap() = Some((vec![5].into(), vec![]));
    let (attachment, mut inbox) = hub.attach("u", Some((7, vec![3].into())), 1000, 1 << 20).await.unwrap();
    assert!(matches!(attachment.start, Start::Waiting));
    assert!(
        tokio::time::timeout(Duration::from_millis(300), inbox.recv()).await.is_err(),
        "not live before the hub has reached the snapshot"
    );
    // The entries arrive: the connection goes live at 5, so that its replay (3, 5] gives it
    // m4 and the leave from the store, in order, once each.
    publish_entries(&bus, &[entry(4), left]).await;
    match tokio::time::timeout(Duration::from_secs(5), inbox.recv()).await.expect("installed") {
        Ok(Outgoing::Installed(at)) => assert_eq!(&at[..], &[5]),
        other => panic!("unexpected {other:?}"),
    }
    append(&bus, &log, 6, true).await;
    assert!(tokio::time::timeout(Duration::from_millis(300), inbox.recv()).await.is_err(), "nothing after the leave");
}

#[tokio::test]
async fn memberships_read_in_pages_all_count() {
    let bus = Bus::local(1024);
    let log: Log = Arc::default();
    let script = Arc::new(Script::default());
    script.membership_page.store(1, Ordering::Relaxed);
    *script.memberships.lock().unwrap() = Some((vec![0].into(), vec!["a", "b", "c"]));
    scripted_services(bus.clone(), log.clone(), script.clone()).await;
    let hub = ready_hub(&bus, HubConfig::gap_fill(Duration::from_millis(50))).await;
    let (attachment, mut inbox) = hub.attach("u", None, 1000, 1 << 20).await.unwrap();
    if let Start::Waiting = attachment.start {
        assert!(matches!(inbox.recv().await, Ok(Outgoing::Installed(_))));
    }
    for (o, c) in [(1, "a"), (2, "b"), (3, "c"), (4, "z")] {
        let e = message_in(c, o, 1, format!("in {c}"));
        log.lock().unwrap().push(e.clone());
        publish_entries(&bus, &[e]).await;
    }
    for c in ["a", "b", "c"] {
        assert_eq!(next_message(&mut inbox).await, format!("in {c}"));
    }
    assert!(tokio::time::timeout(Duration::from_millis(300), inbox.recv()).await.is_err(), "not a member of z");
}

#[tokio::test]
async fn early_entries_past_the_held_bytes_are_read_from_the_store() {
    let bus = Bus::local(1024);
    let log: Log = Arc::default();
    let script = Arc::new(Script::default());
    scripted_services(bus.clone(), log.clone(), script.clone()).await;
    let config = HubConfig { gap_fill: Duration::from_millis(50), max_held_bytes: 2048, ..HubConfig::default() };
    let hub = ready_hub(&bus, config).await;
    let (attachment, mut inbox) = hub.attach("u", None, 1000, 1 << 20).await.unwrap();
    if let Start::Waiting = attachment.start {
        assert!(matches!(inbox.recv().await, Ok(Outgoing::Installed(_))));
    }
    // 1 is lost; 2..=50 (each counted at ≥ 256 bytes) arrive early: a few are held, the rest
    // dropped and read back.
    append(&bus, &log, 1, false).await;
    for o in 2..=50 {
        append(&bus, &log, o, true).await;
    }
    for o in 1..=50 {
        assert_eq!(next_message(&mut inbox).await, format!("m{o}"));
    }
}

/// A resume of an installed user is answered from the replay window (the entries as the hub
/// dispatched them), except while the hub is behind the log: a revision among the entries it
/// has not dispatched yet could not have marked its message.
#[tokio::test]
async fn a_resume_is_answered_from_the_window_unless_the_hub_is_behind() {
    let bus = Bus::local(1024);
    let log: Log = Arc::default();
    fake_services(bus.clone(), log.clone()).await;
    // Gaps are filled only after a long wait: the hub stays behind while the test looks.
    let hub = ready_hub(&bus, HubConfig::gap_fill(Duration::from_secs(30))).await;
    let (first, mut inbox) = hub.attach("u", None, 1000, 1 << 20).await.unwrap();
    if let Start::Waiting = first.start {
        assert!(matches!(inbox.recv().await, Ok(Outgoing::Installed(_))));
    }
    // Entries sent now (the window answers only well inside the replay retention).
    let sent_now = |o: u64| {
        let mut e = entry(o);
        e.message.send_time = quickim_shared::time::now_ms();
        e
    };
    for o in 1..=4 {
        let e = sent_now(o);
        log.lock().unwrap().push(e.clone());
        publish_entries(&bus, std::slice::from_ref(&e)).await;
    }
    for _ in 0..4 {
        next_message(&mut inbox).await;
    }
    let (attachment, _inbox) = hub.attach("u", Some((7, vec![1].into())), 1000, 1 << 20).await.unwrap();
    assert!(matches!(attachment.start, Start::Live(ref p) if p[..] == [4]));
    let replayed: Vec<(u64, String)> = attachment
        .replayed
        .as_ref()
        .expect("from the window")
        .iter()
        .map(|e| (e.offset, e.message.content.clone()))
        .collect();
    assert_eq!(replayed, [(2, "m2".to_string()), (3, "m3".to_string()), (4, "m4".to_string())]);
    // A cursor of another database: not from the window.
    let (attachment, _inbox) = hub.attach("u", Some((8, vec![1].into())), 1000, 1 << 20).await.unwrap();
    assert!(attachment.replayed.is_none());
    // 5 is lost on the bus, 6 arrives: the hub is behind (at 4, 6 known).
    log.lock().unwrap().push(sent_now(5));
    let six = sent_now(6);
    log.lock().unwrap().push(six.clone());
    publish_entries(&bus, std::slice::from_ref(&six)).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (attachment, _inbox) = hub.attach("u", Some((7, vec![1].into())), 1000, 1 << 20).await.unwrap();
    assert!(matches!(attachment.start, Start::Live(ref p) if p[..] == [4]));
    assert!(attachment.replayed.is_none(), "behind the log: the store answers");
}
