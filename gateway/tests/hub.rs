//! The hub over a lossy bus: dropped, reordered and lost-at-the-tail log entries still reach
//! connections exactly once, in order, by filling gaps from the store. The store here is a
//! scripted message service on the in-process bus; the hub is the real one.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use quickim_gateway::notify::hub::{Hub, HubConfig, Outgoing, Start};
use quickim_gateway::notify::queue::Closed;
use quickim_shared::bus::Bus;
use quickim_shared::fanout::publish_entries;
use quickim_shared::protocol::api::Message;
use quickim_shared::protocol::event::{HEADS_SUBJECT, LogEntry};
use quickim_shared::protocol::service::{
    Call, GetHeads, GetMemberships, LogHeads, MembershipRow, Memberships, ReadLog, Reply,
};
use quickim_shared::rpc::RpcClient;
use tokio_util::sync::CancellationToken;

type Log = Arc<Mutex<Vec<LogEntry>>>;

fn entry(offset: u64) -> LogEntry {
    LogEntry {
        part: 0,
        offset,
        message: Message {
            conversation_id: "c".into(),
            msg_id: offset,
            from: "bob".into(),
            msg_type: 1,
            content: format!("m{offset}"),
            client_msg_id: None,
            send_time: 0,
        },
    }
}

fn heads(log: &Log) -> LogHeads {
    LogHeads { epoch: 7, heads: vec![log.lock().unwrap().len() as u64] }
}

/// Answers the hub's questions from `log` (one partition, user `u` in conversation `c`).
async fn fake_services(bus: Bus, log: Log, reads: Arc<Mutex<Vec<(u64, u64)>>>) {
    let mut sub = futures::stream::select(
        bus.subscribe("quickim.msg.*", None).await.unwrap(),
        bus.subscribe("quickim.conv.*", None).await.unwrap(),
    );
    tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            let body: Vec<u8> = match msg.subject.as_str() {
                GetHeads::SUBJECT => serde_json::to_vec(&Reply::Ok(heads(&log))).unwrap(),
                GetMemberships::SUBJECT => serde_json::to_vec(&Reply::Ok(Memberships {
                    heads: heads(&log).heads,
                    conversations: vec![MembershipRow { conversation_id: "c".into(), joined_msg_id: 1 }],
                    more: false,
                }))
                .unwrap(),
                ReadLog::SUBJECT => {
                    let r: ReadLog = serde_json::from_slice(&msg.payload).unwrap();
                    reads.lock().unwrap().push((r.after, r.upto));
                    let out: Vec<LogEntry> = log
                        .lock()
                        .unwrap()
                        .iter()
                        .filter(|e| e.offset > r.after && e.offset <= r.upto)
                        .cloned()
                        .collect();
                    serde_json::to_vec(&Reply::Ok(out)).unwrap()
                }
                other => panic!("unexpected request {other}"),
            };
            msg.respond(Vec::new(), Bytes::from(body)).await.unwrap();
        }
    });
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
    let reads = Arc::new(Mutex::new(Vec::new()));
    fake_services(bus.clone(), log.clone(), reads.clone()).await;
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
    fake_services(bus.clone(), log.clone(), Arc::default()).await;
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
