//! Abuse: slow-header and slow-body clients, connection and handshake floods from one
//! address, /readyz answered from state.

use std::time::{Duration, Instant};

use quickim_testkit::{NotifyClient, Protocol, Standalone};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::BIN;

fn addr(url: &str) -> &str {
    url.trim_start_matches("http://")
}

/// Reads until the server closes the connection (or `within` passes); answers what came.
async fn until_closed(s: &mut tokio::net::TcpStream, within: Duration) -> Option<String> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(within, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .ok()?;
    Some(String::from_utf8_lossy(&out).to_string())
}

#[tokio::test]
async fn slow_headers_and_slow_bodies_are_cut_on_both_listeners() {
    let q =
        Standalone::start(BIN, &[("QUICKIM_HEADER_READ_TIMEOUT_S", "2"), ("QUICKIM_BODY_READ_TIMEOUT_S", "2")]).await;
    q.api.conversation("c", &["alice"]).await;
    let token = q.api.token("alice", "web").await;
    // A head that never ends, a byte a second: cut after the header timeout, on the lean
    // /notify path, on the public API and on /inner.
    for (listener, first_line) in [
        (&q.api.public, "GET /notify?protoc=sse HTTP/1.1\r\n"),
        (&q.api.public, "POST /send_msg HTTP/1.1\r\n"),
        (&q.api.inner, "POST /inner/send_msg HTTP/1.1\r\n"),
    ] {
        let mut s = tokio::net::TcpStream::connect(addr(listener)).await.unwrap();
        s.write_all(first_line.as_bytes()).await.unwrap();
        let started = Instant::now();
        let dribble = async {
            for i in 0..30 {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if s.write_all(format!("X-Slow-{i}: x\r\n").as_bytes()).await.is_err() {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(8), dribble).await;
        assert!(
            started.elapsed() < Duration::from_secs(7),
            "{first_line:?}: still reading the head after {:?}",
            started.elapsed()
        );
    }
    // A body that never ends: 408 request_timeout.
    for (listener, path, auth) in
        [(&q.api.public, "/send_msg", token.clone()), (&q.api.inner, "/inner/send_msg", q.api.key.clone())]
    {
        let mut s = tokio::net::TcpStream::connect(addr(listener)).await.unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {auth}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"conversation_id\":"
        );
        s.write_all(head.as_bytes()).await.unwrap();
        let started = Instant::now();
        let answer = until_closed(&mut s, Duration::from_secs(8)).await.unwrap_or_default();
        assert!(answer.starts_with("HTTP/1.1 408"), "{path}: {answer}");
        assert!(answer.contains("40800"), "{path}: {answer}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
    let (_, v) = q.api.client(&token, "/get_lastone_msgid", serde_json::json!({"conversation_id":"c"})).await;
    assert_eq!(v["data"]["msg_id"], 1, "nothing was stored");
}

#[tokio::test]
async fn floods_of_connections_and_handshakes_from_one_address_are_refused() {
    let q = Standalone::start(BIN, &[("QUICKIM_CONN_RATE_PER_IP", "5")]).await;
    // New connections: a burst of 10 passes, then 429 too_many_connections_from_ip.
    let mut refused = None;
    let mut held = Vec::new();
    for _ in 0..40 {
        let mut s = tokio::net::TcpStream::connect(addr(&q.api.public)).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut buf = vec![0u8; 1024];
        let n = s.read(&mut buf).await.unwrap_or(0);
        let text = String::from_utf8_lossy(&buf[..n]).to_string();
        if text.starts_with("HTTP/1.1 429") {
            refused = Some(text);
            break;
        }
        held.push(s);
    }
    let refused = refused.expect("a flood of connections is refused");
    assert!(refused.contains("42903") && refused.to_ascii_lowercase().contains("retry-after"), "{refused}");
    assert!(held.len() >= 3, "the burst passed (less what start-up used): {}", held.len());
    drop(held);

    // New /notify streams (here with no limit on connections): a burst of 6, then 429.
    let q = Standalone::start(BIN, &[("QUICKIM_CONN_RATE_PER_IP", "0"), ("QUICKIM_HANDSHAKE_RATE_PER_IP", "3")]).await;
    let token = q.api.token("alice", "web").await;
    let mut codes = Vec::new();
    for _ in 0..12 {
        match NotifyClient::connect(&q.api.public, &token, Protocol::Sse, None).await {
            Ok(c) => drop(c),
            Err(e) => codes.push((e.status, e.body["code"].clone())),
        }
    }
    assert!(!codes.is_empty(), "a flood of handshakes is refused");
    assert!(codes.iter().all(|(s, c)| *s == 429 && *c == 42903), "{codes:?}");
}

#[tokio::test]
async fn readyz_answers_from_state() {
    let q = Standalone::start(BIN, &[]).await;
    let metrics = || async {
        let text = q.api.http.get(format!("{}/metrics", q.api.inner)).send().await.unwrap().text().await.unwrap();
        text.lines()
            .filter(|l| l.starts_with("quickim_bus_request_duration_seconds_count") && l.contains("quickim.msg.heads"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    let before = metrics().await;
    for _ in 0..200 {
        let r = q.api.http.get(format!("{}/readyz", q.api.public)).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["data"]["status"], "ready");
    }
    assert_eq!(metrics().await, before, "200 readiness checks made no bus request");
}
