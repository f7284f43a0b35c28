//! Sends coalesced on their way to the message service, against a scripted message service on
//! the in-process bus: every caller gets the answer to its own send, sends that arrive together
//! share bus requests, and a message service that does not know `send_each` (an earlier
//! version, mid-upgrade) still gets every send, one request each. Over NATS (a real
//! nats-server) fewer requests are out at once than over the in-process bus.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use quickim_gateway::sends::{IN_FLIGHT_LOCAL, IN_FLIGHT_NATS, Sends};
use quickim_shared::bus::Bus;
use quickim_shared::error::ServiceError;
use quickim_shared::protocol::api::Message;
use quickim_shared::protocol::service::{Call, Origin, Reply, SendEach, SendMessage};
use quickim_shared::rpc::{RpcClient, encode, unknown_operation};
use quickim_testkit::NatsServer;

#[derive(Default)]
struct Counts {
    send_each: AtomicU64,
    send: AtomicU64,
    stored: AtomicU64,
    /// Requests received and not yet answered, and the most there were at once.
    open: AtomicU64,
    most_open: AtomicU64,
}

fn store(counts: &Counts, send: &SendMessage) -> Reply<Message> {
    if send.content == "refuse" {
        return Err(ServiceError::invalid("refused"));
    }
    Ok(Message {
        conversation_id: send.conversation_id.clone(),
        msg_id: counts.stored.fetch_add(1, Ordering::SeqCst) + 1,
        from: send.from.clone(),
        msg_type: send.msg_type,
        content: send.content.clone(),
        client_msg_id: None,
        send_time: 0,
        ..Default::default()
    })
}

/// A message service answering after `delay`; `knows_send_each: false` answers it as an
/// unknown operation.
async fn fake_message_service(bus: &Bus, knows_send_each: bool) -> Arc<Counts> {
    fake_message_service_answering_after(bus, knows_send_each, Duration::from_millis(5)).await
}

async fn fake_message_service_answering_after(bus: &Bus, knows_send_each: bool, delay: Duration) -> Arc<Counts> {
    let counts = Arc::new(Counts::default());
    let mut sub = bus.subscribe("quickim.msg.*", None).await.unwrap();
    let c = counts.clone();
    tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            let c = c.clone();
            // Answer later, as a commit would: requests pile up meanwhile.
            tokio::spawn(async move {
                let open = c.open.fetch_add(1, Ordering::SeqCst) + 1;
                c.most_open.fetch_max(open, Ordering::SeqCst);
                tokio::time::sleep(delay).await;
                let body = match msg.subject.as_str() {
                    SendEach::SUBJECT if knows_send_each => {
                        c.send_each.fetch_add(1, Ordering::SeqCst);
                        let r: SendEach = serde_json::from_slice(&msg.payload).unwrap();
                        encode(&Ok(r.items.iter().map(|i| store(&c, &i.send)).collect::<Vec<_>>()))
                    }
                    SendMessage::SUBJECT => {
                        c.send.fetch_add(1, Ordering::SeqCst);
                        let r: SendMessage = serde_json::from_slice(&msg.payload).unwrap();
                        encode(&store(&c, &r))
                    }
                    other => unknown_operation(other),
                };
                c.open.fetch_sub(1, Ordering::SeqCst);
                msg.respond(Vec::new(), body).await.unwrap();
            });
        }
    });
    counts
}

fn send(i: usize) -> SendMessage {
    SendMessage {
        origin: Origin::Client,
        conversation_id: "c".into(),
        from: "bob".into(),
        msg_type: 1,
        content: if i.is_multiple_of(5) { "refuse".into() } else { format!("m{i}") },
        client_msg_id: None,
        count_unread: true,
    }
}

/// A coalescer over the in-process bus, and the scripted service it talks to.
async fn coalescer_and_service(knows_send_each: bool) -> (Sends, Arc<Counts>) {
    let bus = Bus::local(1024);
    let counts = fake_message_service(&bus, knows_send_each).await;
    (Sends::start(RpcClient::new(bus, Duration::from_secs(5))), counts)
}

async fn send_all(sends: &Sends, n: usize) {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let sends = sends.clone();
            tokio::spawn(async move {
                (i, sends.send(send(i), tokio::time::Instant::now() + Duration::from_secs(30)).await)
            })
        })
        .collect();
    for t in tasks {
        let (i, answer) = t.await.unwrap();
        match answer {
            Ok(m) => assert_eq!(m.content, format!("m{i}"), "send {i} got another send's answer"),
            Err(e) => assert_eq!((i % 5, e.message.as_str()), (0, "refused"), "send {i}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_send_gets_its_own_answer_and_sends_share_requests() {
    let (sends, counts) = coalescer_and_service(true).await;
    send_all(&sends, 300).await;
    let requests = counts.send_each.load(Ordering::SeqCst);
    assert!((1..300).contains(&requests), "{requests} requests for 300 sends");
    assert_eq!(counts.send.load(Ordering::SeqCst), 0);
    assert_eq!(counts.stored.load(Ordering::SeqCst), 240);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_without_send_each_gets_one_request_per_send() {
    let (sends, counts) = coalescer_and_service(false).await;
    send_all(&sends, 100).await;
    assert_eq!(counts.send.load(Ordering::SeqCst), 100);
    assert_eq!(counts.stored.load(Ordering::SeqCst), 80);
}

/// Sends trickling in (one every half millisecond) while each answer takes 20 ms: every send
/// finds the requests out and waits for one to come back, so the requests out at once reach
/// the coalescer's limit. Answers the most requests the service saw open at once.
async fn most_requests_open(bus: Bus) -> u64 {
    let counts = fake_message_service_answering_after(&bus, true, Duration::from_millis(20)).await;
    let sends = Sends::start(RpcClient::new(bus, Duration::from_secs(5)));
    let mut tasks = Vec::new();
    for i in 0..200 {
        let sends = sends.clone();
        tasks.push(tokio::spawn(async move {
            (i, sends.send(send(i), tokio::time::Instant::now() + Duration::from_secs(30)).await)
        }));
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
    for t in tasks {
        let (i, answer) = t.await.unwrap();
        assert!(answer.is_ok() || i % 5 == 0, "send {i}: {answer:?}");
    }
    assert_eq!(counts.stored.load(Ordering::SeqCst), 160);
    counts.most_open.load(Ordering::SeqCst)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fewer_requests_are_out_at_once_over_nats_than_in_process() {
    let local = most_requests_open(Bus::local(1024)).await;
    assert!(
        local > IN_FLIGHT_NATS as u64 && local <= IN_FLIGHT_LOCAL as u64,
        "{local} requests open at once over the in-process bus"
    );

    let nats = NatsServer::start();
    let bus = Bus::connect_nats(&nats.url, "sends-test").await.unwrap();
    let over_nats = most_requests_open(bus).await;
    assert!((1..=IN_FLIGHT_NATS as u64).contains(&over_nats), "{over_nats} requests open at once over NATS");
}
