//! Limits: slow consumers, connections per user, frame size and rate, dead peers.

use std::time::Duration;

use quickim_testkit::{Closed, NotifyClient, Protocol, Standalone};
use serde_json::json;

use crate::{BIN, SOON, messages};

#[tokio::test]
async fn a_slow_consumer_is_disconnected_and_resumes_without_loss() {
    let q = Standalone::start(BIN, &[("QUICKIM_QUEUE_MAX_EVENTS", "16"), ("QUICKIM_QUEUE_MAX_BYTES", "262144")]).await;
    q.api.conversation("c", &["alice", "bob"]).await;
    let t = q.api.token("alice", "web").await;
    let mut c = NotifyClient::connect(&q.api.public, &t, Protocol::Ws, None).await.unwrap();
    assert_eq!(c.next(SOON).await.unwrap()["type"], "ready");
    // The client stops reading; 300 × 16 KiB fill the socket buffers, then the queue.
    let body = "x".repeat(16 * 1024);
    let total = 300;
    for chunk in 0..(total / 50) {
        let msgs: Vec<_> = (0..50)
            .map(|i| json!({"conversation_id":"c","from":"bob","type":1,"content":format!("{:04}{body}", chunk * 50 + i)}))
            .collect();
        let (s, _) = q.api.inner("/inner/send_msg_batch", json!({ "msgs": msgs })).await;
        assert_eq!(s, 200);
    }
    let mut got = Vec::new();
    while let Some(m) = c.next_message(Duration::from_secs(5)).await {
        got.push(m);
    }
    assert_eq!(c.closed, Some(Closed::Ws(4008, "slow_consumer".into())));
    assert!(got.len() < total, "the queue overflowed before everything was delivered");
    let mut c = c.reconnect(&q.api.public).await.unwrap();
    got.extend(messages(&mut c, total - got.len()).await);
    let order: Vec<String> = got.iter().map(|m| m["content"].as_str().unwrap()[..4].to_string()).collect();
    assert_eq!(order, (0..total).map(|i| format!("{i:04}")).collect::<Vec<_>>(), "each message once, in order");
    let text = q.api.http.get(format!("{}/metrics", q.api.inner)).send().await.unwrap().text().await.unwrap();
    assert!(text.contains("quickim_slow_consumer_disconnects_total 1"), "{text}");
}

#[tokio::test]
async fn connections_per_user_are_limited() {
    let q = Standalone::start(BIN, &[("QUICKIM_MAX_CONNECTIONS_PER_USER", "2")]).await;
    let t = q.api.token("alice", "web").await;
    let other = q.api.token("bob", "web").await;
    let _a = NotifyClient::connect(&q.api.public, &t, Protocol::Ws, None).await.unwrap();
    let _b = NotifyClient::connect(&q.api.public, &t, Protocol::Sse, None).await.unwrap();
    for p in Protocol::ALL {
        let err = NotifyClient::connect(&q.api.public, &t, p, None).await.err().expect("refused");
        assert_eq!((err.status, err.body["code"].as_u64()), (429, Some(42901)), "{p:?}");
    }
    assert!(NotifyClient::connect(&q.api.public, &other, Protocol::Ws, None).await.is_ok());
    drop(_a);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        NotifyClient::connect(&q.api.public, &t, Protocol::Ws, None).await.is_ok(),
        "a closed connection frees its place"
    );
}

#[tokio::test]
async fn oversize_frames_and_frame_floods_close_the_socket() {
    let q = Standalone::start(BIN, &[("QUICKIM_WS_MAX_FRAME_BYTES", "1024"), ("QUICKIM_WS_FRAMES_PER_S", "5")]).await;
    q.api.conversation("c", &["alice"]).await;
    let t = q.api.token("alice", "web").await;
    let mut c = NotifyClient::connect(&q.api.public, &t, Protocol::Ws, None).await.unwrap();
    c.next(SOON).await.unwrap();
    c.send_text("x".repeat(2048)).await;
    assert_eq!(c.wait_closed(SOON).await, Some(Closed::Ws(1009, "frame_too_large".into())));

    let mut c = NotifyClient::connect(&q.api.public, &t, Protocol::Ws, None).await.unwrap();
    c.next(SOON).await.unwrap();
    for i in 0..60 {
        if !c.send_text(json!({"type":"mark_read","req_id":i,"conversation_id":"c","msg_id":1}).to_string()).await {
            break;
        }
    }
    let mut limited = 0;
    while let Some(e) = c.next(SOON).await {
        if e["type"] == "error" && e["code"] == 42900 {
            limited += 1;
        }
    }
    assert!(limited > 0, "frames over the rate get rate_limited errors");
    assert_eq!(c.closed, Some(Closed::Ws(4029, "rate_limited".into())), "a sustained flood closes the socket");
}

#[tokio::test]
async fn a_peer_that_stops_answering_pings_is_closed() {
    let q = Standalone::start(BIN, &[("QUICKIM_WS_PING_S", "1")]).await;
    let t = q.api.token("alice", "web").await;
    let mut c = NotifyClient::connect(&q.api.public, &t, Protocol::Ws, None).await.unwrap();
    c.next(SOON).await.unwrap();
    // Not reading means not answering pings.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(c.wait_closed(SOON).await, Some(Closed::Ws(4002, "ping_timeout".into())));
    // A reading client is kept.
    let mut c = NotifyClient::connect(&q.api.public, &t, Protocol::Ws, None).await.unwrap();
    assert!(c.wait_closed(Duration::from_secs(4)).await.is_none());
}
