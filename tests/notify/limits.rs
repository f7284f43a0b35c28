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
    // A closed connection frees its place (as soon as the server has seen it close).
    let deadline = std::time::Instant::now() + SOON;
    while NotifyClient::connect(&q.api.public, &t, Protocol::Ws, None).await.is_err() {
        assert!(std::time::Instant::now() < deadline, "a closed connection did not free its place");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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
        if e["type"] == "error" && e["code"] == 42902 {
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

/// The sum of a metric's lines on the node.
async fn metric(api: &quickim_testkit::Api, name: &str) -> f64 {
    let text = api.http.get(format!("{}/metrics", api.inner)).send().await.unwrap().text().await.unwrap();
    text.lines().filter(|l| l.starts_with(name)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

/// Waits until the node counts `user` online.
async fn wait_online(api: &quickim_testkit::Api, user: &str) {
    let deadline = std::time::Instant::now() + SOON;
    loop {
        let (_, v) = api.inner("/inner/get_users_online", json!({ "user_ids": [user] })).await;
        if v["data"]["users"][0]["online"] == true {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{user} never online");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Opens `/notify` over a raw socket (the request head only) and never reads an answer.
async fn never_reading(public: &str, token: &str, protocol: Protocol, cursor: Option<&str>) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let addr = public.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let extra = match protocol {
        Protocol::Ws => {
            "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        }
        _ => "",
    };
    let mut query = format!("protoc={}&token={token}", protocol.name());
    if let Some(c) = cursor {
        query.push_str(&format!("&timeout=0&cursor={c}"));
    }
    let head = format!("GET /notify?{query} HTTP/1.1\r\nHost: {addr}\r\n{extra}\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    s
}

#[tokio::test]
async fn a_client_that_never_reads_is_cut_by_the_write_timeout_on_every_transport() {
    let q = Standalone::start(
        BIN,
        &[
            ("QUICKIM_WRITE_TIMEOUT_S", "2"),
            ("QUICKIM_MAX_CONNECTIONS_PER_USER", "1"),
            // Large queues: the write timeout, not the slow-consumer limit, must cut them.
            ("QUICKIM_QUEUE_MAX_BYTES", "268435456"),
            ("QUICKIM_QUEUE_MAX_EVENTS", "100000"),
        ],
    )
    .await;
    q.api.conversation("c", &["alice", "bob", "carol"]).await;
    let body = "x".repeat(60 * 1024);
    let flood = || async {
        // 12 MB: far more than the socket buffers hold.
        for _ in 0..4 {
            let msgs: Vec<_> =
                (0..50).map(|_| json!({"conversation_id":"c","from":"bob","type":1,"content":body})).collect();
            let (s, v) = q.api.inner("/inner/send_msg_batch", json!({ "msgs": msgs })).await;
            assert_eq!(s, 200, "{v}");
        }
    };
    // Streams: the stuck connection is gone within the write timeout (and some slack), and
    // its place under max_connections_per_user = 1 is free.
    for (user, protocol) in [("alice", Protocol::Ws), ("bob", Protocol::Sse)] {
        let t = q.api.token(user, "web").await;
        let stuck = never_reading(&q.api.public, &t, protocol, None).await;
        wait_online(&q.api, user).await;
        flood().await;
        let started = std::time::Instant::now();
        loop {
            match NotifyClient::connect(&q.api.public, &t, Protocol::Sse, None).await {
                Ok(_) => break,
                Err(e) => {
                    assert_eq!(e.status, 429, "{protocol:?}: {e:?}");
                    assert!(started.elapsed() < Duration::from_secs(8), "{protocol:?}: still connected");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        drop(stuck);
    }
    // A long-poll from before the floods: its one answer is a page of the backlog (500
    // messages, 30 MB), which the client never reads. The server closes the connection
    // (an answered poll's session stays parked for its grace period, as any poll's does).
    let t = q.api.token("carol", "web").await;
    let mut c = NotifyClient::connect(&q.api.public, &t, Protocol::Poll, None).await.unwrap();
    assert_eq!(c.next(SOON).await.unwrap()["type"], "ready");
    // The answer's cursor: the one its parked session waits for.
    let cursor = c.drop_connection().unwrap();
    flood().await;
    let cut_before = metric(&q.api, "quickim_write_timeouts_total").await;
    let mut stuck = never_reading(&q.api.public, &t, Protocol::Poll, Some(&cursor)).await;
    // Until the server gives up writing to it.
    let deadline = std::time::Instant::now() + SOON;
    while metric(&q.api, "quickim_write_timeouts_total").await <= cut_before {
        assert!(std::time::Instant::now() < deadline, "the poll's write never timed out");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut buf = vec![0u8; 1 << 16];
    let mut read = 0usize;
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match tokio::io::AsyncReadExt::read(&mut stuck, &mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => read += n,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the poll's connection is still open after {read} bytes");
    assert!(read < 500 * 60 * 1024, "the answer was cut short: {read} bytes");

    let cut = metric(&q.api, "quickim_write_timeouts_total").await;
    assert!(cut >= 2.0, "write timeouts: {cut}");
}

#[tokio::test]
async fn a_websocket_client_with_many_requests_open_is_slowed_down_not_refused() {
    let q = Standalone::start(BIN, &[]).await;
    q.api.conversation("c", &["alice"]).await;
    let t = q.api.token("alice", "web").await;
    let mut c = NotifyClient::connect(&q.api.public, &t, Protocol::Ws, None).await.unwrap();
    c.next(SOON).await.unwrap();
    // 40 requests at once, more than the 16 a connection keeps open: every one is answered.
    for i in 0..40 {
        c.send_frame(json!({"type":"send","req_id":i,"conversation_id":"c","msg_type":1,"content":format!("m{i}")}))
            .await;
    }
    let mut acked = std::collections::BTreeSet::new();
    while acked.len() < 40 {
        let e = c.next(SOON).await.expect("an answer for every request");
        match e["type"].as_str() {
            Some("ack") => {
                acked.insert(e["req_id"].as_u64().unwrap());
            }
            Some("message") | Some("cursor") => {}
            other => panic!("unexpected {other:?}: {e}"),
        }
    }
    assert_eq!(acked, (0..40).collect());
}
