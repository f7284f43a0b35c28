//! Micro benchmarks of the delivery hot paths: encoding a message event once, the hub fanning
//! one log entry out to N local sessions, and cursor encode/decode.
//!
//!     cargo bench -p quickim-gateway --bench hot_paths
//!
//! The fan-out benchmark runs the real hub on the in-process bus, with a scripted message and
//! conversation service answering its start-up questions (every user is a member of "c").
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use futures::StreamExt;
use quickim_gateway::notify::cursor::{self, Cursor};
use quickim_gateway::notify::event::Encoded;
use quickim_gateway::notify::hub::{Hub, HubConfig, Outgoing, Start};
use quickim_gateway::notify::queue::Inbox;
use quickim_shared::bus::Bus;
use quickim_shared::fanout::publish_entries;
use quickim_shared::protocol::api::Message;
use quickim_shared::protocol::event::LogEntry;
use quickim_shared::protocol::service::{Call, GetHeads, GetMemberships, LogHeads, MembershipRow, Memberships, Reply};
use quickim_shared::rpc::RpcClient;
use tokio_util::sync::CancellationToken;

fn message(msg_id: u64) -> Message {
    Message {
        conversation_id: "c".into(),
        msg_id,
        from: "bob".into(),
        msg_type: 1,
        content: "a message of about sixty-four bytes, as chat messages often are".into(),
        client_msg_id: Some("k-1234".into()),
        send_time: 1_790_000_000_000,
        ..Default::default()
    }
}

fn event_encode(c: &mut Criterion) {
    let m = message(123_456);
    let position = cursor::encode(7, &[1_000_000, 2_000_000, 3_000_000, 4_000_000, 5, 6, 7, 8]);
    let cursor: Arc<str> = Arc::from(position.as_str());
    c.bench_function("event encode (message, 8-partition cursor)", |b| {
        b.iter(|| Encoded::message(black_box(cursor.clone()), black_box(&m), None))
    });
}

fn cursors(c: &mut Criterion) {
    let offsets = [1_000_000u64, 2_000_000, 3_000_000, 4_000_000, 5, 6, 7, 8];
    let text = cursor::encode(7, &offsets);
    c.bench_function("cursor encode (8 partitions)", |b| b.iter(|| cursor::encode(black_box(7), black_box(&offsets))));
    c.bench_function("cursor decode (8 partitions)", |b| b.iter(|| Cursor::decode(black_box(&text)).unwrap()));
}

/// Answers the hub's start-up questions: the log is empty, every user is a member of "c".
async fn scripted_services(bus: Bus) {
    let mut sub = futures::stream::select(
        bus.subscribe("quickim.msg.*", None).await.unwrap(),
        bus.subscribe("quickim.conv.*", None).await.unwrap(),
    );
    tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            let body = match msg.subject.as_str() {
                GetHeads::SUBJECT => {
                    serde_json::to_vec(&Reply::Ok(LogHeads { epoch: 1, heads: vec![0].into() })).unwrap()
                }
                GetMemberships::SUBJECT => serde_json::to_vec(&Reply::Ok(Memberships {
                    heads: vec![0].into(),
                    conversations: vec![MembershipRow { conversation_id: "c".into(), joined_msg_id: 1 }],
                    more: false,
                }))
                .unwrap(),
                _ => continue,
            };
            let _ = msg.respond(Vec::new(), Bytes::from(body)).await;
        }
    });
}

/// A hub with `n` sessions (of `n` users) in conversation "c".
async fn hub_with_sessions(n: usize) -> (Bus, Hub, Vec<Inbox>, Vec<quickim_gateway::notify::hub::Attachment>) {
    let bus = Bus::local(65_536);
    scripted_services(bus.clone()).await;
    let rpc = RpcClient::new(bus.clone(), Duration::from_secs(5));
    let hub = Hub::start(bus.clone(), rpc, HubConfig::gap_fill(Duration::from_millis(200)), CancellationToken::new())
        .await
        .unwrap();
    while !hub.is_ready() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut inboxes = Vec::with_capacity(n);
    let mut attachments = Vec::with_capacity(n);
    for i in 0..n {
        let (attachment, mut inbox) = hub.attach(&format!("u{i}"), None, 1 << 16, 1 << 30).await.unwrap();
        if let Start::Waiting = attachment.start {
            assert!(matches!(inbox.recv().await, Ok(Outgoing::Installed(_))));
        }
        inboxes.push(inbox);
        attachments.push(attachment);
    }
    (bus, hub, inboxes, attachments)
}

fn fan_out(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    // Sessions detach from the hub when dropped, which needs the runtime.
    let _runtime = runtime.enter();
    let mut group = c.benchmark_group("hub fan-out of one log entry");
    group.sample_size(20).measurement_time(Duration::from_secs(5));
    for n in [1usize, 100, 1_000, 10_000] {
        let (bus, _hub, mut inboxes, _attachments) = runtime.block_on(hub_with_sessions(n));
        let mut offset = 0u64;
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::from_parameter(format!("{n} sessions")), &n, |b, _| {
            b.iter_custom(|iters| {
                runtime.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        offset += 1;
                        let entry = LogEntry { part: 0, offset, message: message(offset) };
                        publish_entries(&bus, std::slice::from_ref(&entry)).await;
                        for inbox in inboxes.iter_mut() {
                            match inbox.recv().await {
                                Ok(Outgoing::Event(e)) => {
                                    black_box(e);
                                }
                                other => panic!("unexpected {other:?}"),
                            }
                        }
                    }
                    start.elapsed()
                })
            })
        });
    }
    group.finish();
}

criterion_group!(benches, event_encode, cursors, fan_out);
criterion_main!(benches);
