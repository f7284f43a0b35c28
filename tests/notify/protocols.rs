//! Each protocol on its own: the event format, ordering, multi-device, WS requests, poll
//! batches, SSE heartbeats, bad requests.

use std::time::{Duration, Instant};

use quickim_testkit::{NotifyClient, Protocol, Standalone};
use serde_json::json;

use crate::{BIN, SOON, contents, messages, send};

#[tokio::test]
async fn every_protocol_starts_with_ready_and_delivers_in_order_to_every_device() {
    let q = Standalone::start(BIN, &[]).await;
    q.api.conversation("c", &["alice", "bob"]).await;
    let alice_web = q.api.token("alice", "web").await;
    let alice_ios = q.api.token("alice", "ios").await;
    let bob = q.api.token("bob", "pc").await;
    let mut clients = Vec::new();
    for (p, t) in
        [(Protocol::Ws, &alice_web), (Protocol::Sse, &alice_ios), (Protocol::Poll, &alice_web), (Protocol::Ws, &bob)]
    {
        let mut c = NotifyClient::connect(&q.api.public, t, p, None).await.unwrap();
        let first = c.next(SOON).await.expect("first event");
        assert_eq!(first["type"], "ready", "{p:?}: {first}");
        assert!(first["cursor"].as_str().is_some_and(|c| !c.is_empty()));
        clients.push(c);
    }
    for i in 0..20 {
        send(&q.api, "c", if i % 2 == 0 { "bob" } else { "alice" }, &format!("m{i}")).await;
    }
    for c in &mut clients {
        let got = messages(c, 20).await;
        let ids: Vec<u64> = got.iter().map(|m| m["msg_id"].as_u64().unwrap()).collect();
        assert_eq!(ids, (2..22).collect::<Vec<_>>(), "{:?}: in msg_id order, own messages included", c.protocol);
        assert_eq!(contents(&got)[0], "m0");
        assert!(got.iter().all(|m| m["conversation_id"] == "c" && m["send_time"].as_i64().unwrap() > 0));
    }
}

#[tokio::test]
async fn ws_clients_send_and_mark_read_over_the_socket() {
    let q = Standalone::start(BIN, &[]).await;
    q.api.conversation("c", &["alice", "bob"]).await;
    q.api.conversation("other", &["bob"]).await;
    let t = q.api.token("alice", "web").await;
    let mut ws = NotifyClient::connect(&q.api.public, &t, Protocol::Ws, None).await.unwrap();
    assert_eq!(ws.next(SOON).await.unwrap()["type"], "ready");
    ws.send_frame(
        json!({"type":"send","req_id":1,"conversation_id":"c","msg_type":1,"content":"hi","client_msg_id":"k1"}),
    )
    .await;
    let mut ack = None;
    let mut delivered = None;
    while ack.is_none() || delivered.is_none() {
        let e = ws.next(SOON).await.expect("ack and delivery");
        match e["type"].as_str() {
            Some("ack") => ack = Some(e),
            Some("message") => delivered = Some(e),
            _ => {}
        }
    }
    let ack = ack.unwrap();
    assert_eq!(ack["req_id"], 1);
    assert_eq!(ack["message"]["msg_id"], 2);
    assert_eq!(delivered.unwrap()["message"], ack["message"], "the sender's own stream gets it too");
    // idempotent retry over the socket
    ws.send_frame(
        json!({"type":"send","req_id":"again","conversation_id":"c","msg_type":1,"content":"hi","client_msg_id":"k1"}),
    )
    .await;
    let e = ws.next(SOON).await.unwrap();
    assert_eq!(
        (e["type"].as_str(), e["req_id"].as_str(), e["message"]["msg_id"].as_u64()),
        (Some("ack"), Some("again"), Some(2))
    );
    // errors answer with the code and the req_id
    ws.send_frame(json!({"type":"send","req_id":3,"conversation_id":"other","msg_type":1,"content":"x"})).await;
    let e = ws.next(SOON).await.unwrap();
    assert_eq!((e["type"].as_str(), e["code"].as_u64(), e["req_id"].as_u64()), (Some("error"), Some(40301), Some(3)));
    assert!(ws.send_text("{not json".into()).await);
    let e = ws.next(SOON).await.unwrap();
    assert_eq!((e["type"].as_str(), e["code"].as_u64()), (Some("error"), Some(40000)));
    ws.send_frame(json!({"type":"send","req_id":4,"conversation_id":"c","msg_type":-1,"content":"x"})).await;
    let e = ws.next(SOON).await.unwrap();
    assert_eq!(e["code"], 40000, "negative types are reserved: {e}");
    ws.send_frame(json!({"type":"mark_read","req_id":5,"conversation_id":"c","msg_id":2})).await;
    let e = ws.next(SOON).await.unwrap();
    assert_eq!((e["type"].as_str(), e["read_msg_id"].as_u64()), (Some("ack"), Some(2)));
    let (_, v) = q.api.client(&t, "/get_joined_conversation", json!({})).await;
    assert_eq!(v["data"]["conversations"][0]["unread"], 0);
}

#[tokio::test]
async fn long_poll_answers_batches_at_once_and_waits_otherwise() {
    let q = Standalone::start(BIN, &[]).await;
    q.api.conversation("c", &["alice", "bob"]).await;
    let t = q.api.token("alice", "web").await;
    let get = |query: String| {
        let (http, base, t) = (q.api.http.clone(), q.api.public.clone(), t.clone());
        async move {
            let r = http.get(format!("{base}/notify?protoc=poll&{query}")).bearer_auth(&t).send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<serde_json::Value>().await.unwrap())
        }
    };
    let started = Instant::now();
    let (s, v) = get(String::new()).await;
    assert_eq!(s, 200);
    assert!(started.elapsed() < Duration::from_secs(2), "no cursor: ready at once");
    assert_eq!(v["data"]["events"][0]["type"], "ready");
    let cursor = v["data"]["cursor"].as_str().unwrap().to_string();
    for i in 0..5 {
        send(&q.api, "c", "bob", &format!("b{i}")).await;
    }
    let started = Instant::now();
    let (_, v) = get(format!("cursor={cursor}&timeout=30")).await;
    assert!(started.elapsed() < Duration::from_secs(2), "pending events: answered at once");
    let events = v["data"]["events"].as_array().unwrap();
    assert_eq!(events.len(), 5, "the whole batch in one answer: {v}");
    let cursor = v["data"]["cursor"].as_str().unwrap().to_string();
    // The answer's cursor is the last event's, tagged with the session (the base64 of a
    // longer byte string: the same text but for its tail).
    let last = events[4]["cursor"].as_str().unwrap();
    assert!(cursor.len() > last.len() && cursor.starts_with(&last[..last.len() - 4]), "{cursor} vs {last}");
    // nothing pending: waits for the timeout, answers no events and a cursor
    let started = Instant::now();
    let (_, v) = get(format!("cursor={cursor}&timeout=1")).await;
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_eq!(v["data"]["events"].as_array().unwrap().len(), 0);
    // a message while waiting ends the wait
    let api = q.api.clone();
    let sender = tokio::spawn(async move {
        // Once the poll is waiting on the node.
        loop {
            let text = api.http.get(format!("{}/metrics", api.inner)).send().await.unwrap().text().await.unwrap();
            let waiting: f64 = text
                .lines()
                .filter(|l| l.starts_with("quickim_notify_connections{") && l.contains("poll"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum();
            if waiting >= 1.0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        send(&api, "c", "bob", "while waiting").await;
    });
    let started = Instant::now();
    let (_, v) = get(format!("cursor={cursor}&timeout=20")).await;
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(v["data"]["events"][0]["message"]["content"], "while waiting");
    sender.await.unwrap();
    for bad in ["timeout=61", "timeout=abc", "cursor=garbage!", "cursor=AAAA"] {
        let (s, v) = get(bad.to_string()).await;
        assert_eq!((s, v["code"].as_u64()), (400, Some(40000)), "{bad}: {v}");
    }
    let r =
        q.api.http.get(format!("{}/notify?protoc=carrier-pigeon", q.api.public)).bearer_auth(&t).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let r = q.api.http.get(format!("{}/notify?protoc=poll", q.api.public)).send().await.unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test]
async fn sse_sends_heartbeats_that_keep_the_cursor_fresh() {
    let q = Standalone::start(BIN, &[("QUICKIM_SSE_HEARTBEAT_S", "1")]).await;
    q.api.conversation("mine", &["alice"]).await;
    q.api.conversation("theirs", &["bob"]).await;
    let t = q.api.token("alice", "web").await;
    let mut resp = q.api.http.get(format!("{}/notify?protoc=sse", q.api.public)).bearer_auth(&t).send().await.unwrap();
    assert_eq!(resp.headers().get("content-type").unwrap(), "text/event-stream");
    // Traffic alice does not see moves the position; the heartbeat carries it as an id.
    send(&q.api, "theirs", "bob", "not for alice").await;
    let mut text = String::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !(text.contains(": heartbeat") && text.matches("id: ").count() >= 2) && Instant::now() < deadline {
        if let Ok(Ok(Some(chunk))) = tokio::time::timeout(Duration::from_secs(3), resp.chunk()).await {
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
    assert!(text.starts_with("retry: 1000\n\n"), "{text}");
    assert!(text.contains(": heartbeat"), "{text}");
    assert!(!text.contains("not for alice"));
    let ids: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("id: ")).collect();
    assert!(ids.len() >= 2 && ids[0] != ids[ids.len() - 1], "the heartbeat moved Last-Event-ID on: {text}");
}

#[tokio::test]
async fn a_token_that_expires_closes_the_stream() {
    let q = Standalone::start(BIN, &[]).await;
    let (_, v) = q.api.inner("/inner/get_token", json!({"user_id":"alice","platform":"web","ttl_s":2})).await;
    let t = v["data"]["token"].as_str().unwrap().to_string();
    let mut ws = NotifyClient::connect(&q.api.public, &t, Protocol::Ws, None).await.unwrap();
    let closed = ws.wait_closed(Duration::from_secs(12)).await;
    assert_eq!(closed, Some(quickim_testkit::Closed::Ws(4001, "token_expired".into())));
}

/// One HTTP/1.1 response with a Content-Length body off `stream` (bytes beyond it stay in `buf`).
async fn read_response(stream: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> (u16, String) {
    read_until(stream, buf, b"\r\n\r\n").await;
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let status: u16 = head[9..12].parse().unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .unwrap_or_else(|| panic!("framed by Content-Length: {head}"))
        .trim()
        .parse()
        .unwrap();
    while buf.len() < end + len {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(SOON, tokio::io::AsyncReadExt::read(stream, &mut chunk))
            .await
            .expect("in time")
            .unwrap();
        assert!(n > 0, "closed inside a body");
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = String::from_utf8_lossy(&buf[end..end + len]).to_string();
    buf.drain(..end + len);
    (status, body)
}

/// Reads from `stream` until `buf` holds `needle` (or fails after SOON).
async fn read_until(stream: &mut tokio::net::TcpStream, buf: &mut Vec<u8>, needle: &[u8]) {
    use tokio::io::AsyncReadExt;
    let deadline = Instant::now() + SOON;
    while !buf.windows(needle.len()).any(|w| w == needle) {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(deadline.saturating_duration_since(Instant::now()), stream.read(&mut chunk))
            .await
            .expect("in time")
            .expect("read");
        assert!(n > 0, "closed before {:?}: {}", String::from_utf8_lossy(needle), String::from_utf8_lossy(buf));
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test]
async fn raw_http_clients_get_the_same_answers_on_every_request_shape() {
    use tokio::io::AsyncWriteExt;
    let q = Standalone::start(BIN, &[]).await;
    q.api.conversation("c", &["alice", "bob"]).await;
    let t = q.api.token("alice", "web").await;
    let host = q.api.public.trim_start_matches("http://").to_string();

    // A WebSocket upgrade without protoc (the Upgrade header picks ws), as browsers' libraries
    // sometimes send it: it takes the general HTTP path, not the /notify fast path.
    let mut ws = tokio::net::TcpStream::connect(&host).await.unwrap();
    ws.write_all(
        format!(
            "GET /notify?token={t} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    read_until(&mut ws, &mut got, b"\r\n\r\n").await;
    let head = String::from_utf8_lossy(&got).to_string();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(head.to_ascii_lowercase().contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="), "{head}");
    read_until(&mut ws, &mut got, b"\"ready\"").await;
    send(&q.api, "c", "bob", "over the general path").await;
    read_until(&mut ws, &mut got, b"over the general path").await;

    // One keep-alive connection: a long-poll (fast path), then /healthz (general path), then
    // a long-poll again: each answered in turn, framed so the next one can follow.
    let mut conn = tokio::net::TcpStream::connect(&host).await.unwrap();
    let poll =
        format!("GET /notify?protoc=poll&timeout=0 HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {t}\r\n\r\n");
    let health = format!("GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n");
    let mut buf = Vec::new();
    for (request, expect) in [(&poll, "\"ready\""), (&health, "\"ok\""), (&poll, "\"ready\"")] {
        conn.write_all(request.as_bytes()).await.unwrap();
        let (status, body) = read_response(&mut conn, &mut buf).await;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains(expect), "{request}: {body}");
    }
    assert!(buf.is_empty(), "nothing beyond the three answers");

    // A malformed head gets a 400 and changes nothing.
    let mut bad = tokio::net::TcpStream::connect(&host).await.unwrap();
    bad.write_all(b"GET /notify?protoc=sse HTTP/1.1\r\nBad Header\r\n\r\n").await.unwrap();
    let mut got = Vec::new();
    read_until(&mut bad, &mut got, b"HTTP/1.1 400").await;
}

#[tokio::test]
async fn long_poll_continuations_lose_nothing_whichever_cursor_comes_back() {
    let q = Standalone::start(BIN, &[]).await;
    q.api.conversation("c", &["alice", "bob"]).await;
    let t = q.api.token("alice", "web").await;
    let poll = |cursor: Option<String>| {
        let (http, base, t) = (q.api.http.clone(), q.api.public.clone(), t.clone());
        async move {
            let mut url = format!("{base}/notify?protoc=poll&timeout=0");
            if let Some(c) = cursor {
                url.push_str(&format!("&cursor={c}"));
            }
            let v: serde_json::Value = http.get(url).bearer_auth(&t).send().await.unwrap().json().await.unwrap();
            let contents: Vec<String> = v["data"]["events"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|e| e["type"] == "message")
                .map(|e| e["message"]["content"].as_str().unwrap().to_string())
                .collect();
            (contents, v["data"]["cursor"].as_str().unwrap().to_string())
        }
    };
    let connects = || {
        let (http, inner) = (q.api.http.clone(), q.api.inner.clone());
        async move {
            let text = http.get(format!("{inner}/metrics")).send().await.unwrap().text().await.unwrap();
            text.lines()
                .filter(|l| l.starts_with("quickim_notify_connects_total{") && l.contains("protocol=\"poll\""))
                .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
                .sum::<u64>()
        }
    };
    // A witness on the same node: once it has m2, so has the parked session (the hub hands an
    // entry to every session in one step).
    let mut witness = NotifyClient::connect(&q.api.public, &t, Protocol::Sse, None).await.unwrap();
    let (_, c0) = poll(None).await;
    send(&q.api, "c", "bob", "m1").await;
    send(&q.api, "c", "bob", "m2").await;
    assert_eq!(contents(&messages(&mut witness, 2).await), ["m1", "m2"]);
    // The next poll continues the parked session: what came in between is there, in order.
    let (got, c1) = poll(Some(c0.clone())).await;
    assert_eq!(got, ["m1", "m2"]);
    send(&q.api, "c", "bob", "m3").await;
    assert_eq!(contents(&messages(&mut witness, 1).await), ["m3"]);
    // The first answer was "lost": the client asks again from the older cursor. Nothing is
    // parked under it any more, so the store replays everything after it.
    let (got, _) = poll(Some(c0)).await;
    assert_eq!(got, ["m1", "m2", "m3"]);
    // The cursor of the second answer still finds its parked session: m3 once.
    let (got, c3) = poll(Some(c1)).await;
    assert_eq!(got, ["m3"]);
    let (got, _) = poll(Some(c3)).await;
    assert!(got.is_empty(), "nothing twice: {got:?}");
    assert_eq!(connects().await, 2, "only the first poll and the retry from an old cursor opened a session");
}
