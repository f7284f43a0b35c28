//! Streaming messages across two gateway nodes, on each transport: seen live, seen by a
//! late joiner and a resumer as a snapshot plus the live deltas, stored once at the finish;
//! cancelled when abandoned; their errors; and what a stream costs (figures printed).

use std::time::Instant;

use quickim_testkit::{Api, Distributed, NotifyClient, Protocol};
use serde_json::{Value, json};

use crate::{BIN, SOON};

async fn ok(api: &Api, path: &str, body: Value) -> Value {
    let (s, v) = api.inner(path, body).await;
    assert_eq!(s, 200, "{path}: {v}");
    v["data"].clone()
}

/// Events of `client` until `until` holds for one (that one included), skipping `cursor`
/// events and other users' presence noise.
async fn until(client: &mut NotifyClient, what: &str, until: impl Fn(&Value) -> bool) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + SOON;
    let mut out = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let e = client.next(left).await.unwrap_or_else(|| panic!("{:?}: no {what}; saw {out:?}", client.protocol));
        if e["type"] == "cursor" {
            continue;
        }
        let done = until(&e);
        out.push(e);
        if done {
            return out;
        }
    }
}

fn stream_texts(events: &[Value]) -> Vec<(u64, String)> {
    events
        .iter()
        .filter(|e| e["type"] == "stream")
        .map(|e| {
            let text = e.get("delta").or(e.get("content")).and_then(Value::as_str).unwrap().to_string();
            (e["seq"].as_u64().unwrap(), text)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_is_seen_live_as_a_snapshot_mid_way_and_stored_once() {
    let d = Distributed::start(BIN, 1, 2, 2, &[("QUICKIM_RATE_LIMIT_PER_S", "0")]).await;
    let (a, b) = (d.api(0), d.api(1));
    for protocol in Protocol::ALL {
        let conv = format!("ai-{}", protocol.name());
        let alice = format!("alice-{}", protocol.name());
        a.conversation(&conv, &[&alice, "bot"]).await;
        let ta = a.token(&alice, "web").await;
        // A connection that leaves before the stream opens (to resume mid-stream), and one
        // that goes away before it opens and comes back after the finish.
        let mut early = NotifyClient::connect(&a.public, &ta, protocol, None).await.unwrap();
        assert_eq!(early.next(SOON).await.unwrap()["type"], "ready");
        let away = early.drop_connection();
        let mut watcher = NotifyClient::connect(&a.public, &ta, protocol, None).await.unwrap();
        assert_eq!(watcher.next(SOON).await.unwrap()["type"], "ready");

        let open = ok(b, "/inner/open_stream", json!({"conversation_id":conv,"from":"bot","type":1})).await;
        let m = open["msg_id"].as_u64().unwrap();
        assert_eq!((open["streaming"].as_bool(), open["content"].as_str()), (Some(true), Some("")));
        let got = until(&mut watcher, "the open", |e| e["type"] == "message").await;
        assert_eq!(got.last().unwrap()["message"]["streaming"], true);

        // Deltas through both nodes, one after another: live, in order.
        for seq in 1..=5u64 {
            let api = if seq % 2 == 0 { a } else { b };
            let body = json!({"conversation_id":conv,"msg_id":m,"seq":seq,"delta":format!("w{seq} ")});
            ok(api, "/inner/stream_delta", body).await;
        }
        let got = until(&mut watcher, "delta 5", |e| e["type"] == "stream" && e["seq"] == 5).await;
        let texts = stream_texts(&got);
        assert_eq!(texts, (1..=5).map(|i| (i, format!("w{i} "))).collect::<Vec<_>>(), "{protocol:?}");

        // A late joiner (another node) and a resumer: the text so far, then what follows.
        let mut late = NotifyClient::connect(&b.public, &ta, protocol, None).await.unwrap();
        let got = until(&mut late, "a snapshot", |e| e["type"] == "stream").await;
        assert_eq!(got[0]["type"], "ready");
        assert_eq!(stream_texts(&got), vec![(5, "w1 w2 w3 w4 w5 ".to_string())], "{protocol:?}");
        let mut resumed = NotifyClient::connect(&b.public, &ta, protocol, away.as_deref()).await.unwrap();
        let got = until(&mut resumed, "a snapshot", |e| e["type"] == "stream").await;
        let open_event = got.iter().find(|e| e["type"] == "message").expect("the open, replayed");
        assert_eq!(open_event["message"]["msg_id"], m);
        assert_eq!(stream_texts(&got), vec![(5, "w1 w2 w3 w4 w5 ".to_string())], "{protocol:?}");
        for seq in 6..=7u64 {
            let body = json!({"conversation_id":conv,"msg_id":m,"seq":seq,"delta":format!("w{seq} ")});
            ok(a, "/inner/stream_delta", body).await;
        }
        for (name, client) in [("watcher", &mut watcher), ("late", &mut late), ("resumed", &mut resumed)] {
            let got = until(client, &format!("delta 7 at {name}"), |e| e["type"] == "stream" && e["seq"] == 7).await;
            let texts = stream_texts(&got);
            assert_eq!(texts.last(), Some(&(7, "w7 ".to_string())), "{protocol:?}: {texts:?}");
        }

        // The finish stores the whole, once; everyone learns it live.
        let final_text = "w1 w2 w3 w4 w5 w6 w7";
        let done = ok(b, "/inner/finish_stream", json!({"conversation_id":conv,"msg_id":m,"content":final_text})).await;
        assert_eq!((done["streaming"].as_bool(), done["content"].as_str()), (None, Some(final_text)));
        let again =
            ok(a, "/inner/finish_stream", json!({"conversation_id":conv,"msg_id":m,"content":final_text})).await;
        assert_eq!(again, done, "a retried finish answers it as it is");
        for client in [&mut watcher, &mut late, &mut resumed] {
            let got = until(client, "the finish", |e| e["type"] == "message" && e["message"]["type"] == -6).await;
            let content: Value =
                serde_json::from_str(got.last().unwrap()["message"]["content"].as_str().unwrap()).unwrap();
            assert_eq!((content["action"].as_str(), content["content"].as_str()), (Some("finish"), Some(final_text)));
        }

        // Back after the finish: the final message only, and its finish; no stream events.
        let mut back = NotifyClient::connect(&a.public, &ta, protocol, away.as_deref()).await.unwrap();
        let got = until(&mut back, "the finish", |e| e["type"] == "message" && e["message"]["type"] == -6).await;
        let message = got.iter().find(|e| e["type"] == "message" && e["message"]["msg_id"] == m).unwrap();
        if protocol == Protocol::Poll {
            // The long-poll that left was still parked on the node: it held what came, as it
            // came (the open, the deltas, then the finish with the final text).
            assert_eq!(stream_texts(&got).len(), 7, "{got:?}");
        } else {
            assert!(stream_texts(&got).is_empty(), "{got:?}");
            assert_eq!(
                (message["message"]["content"].as_str(), message["message"].get("streaming")),
                (Some(final_text), None)
            );
        }
        let (_, v) = a.client(&ta, "/get_conversation_last_30_msg", json!({"conversation_id":conv})).await;
        let ids: Vec<u64> =
            v["data"]["msgs"].as_array().unwrap().iter().map(|x| x["msg_id"].as_u64().unwrap()).collect();
        assert_eq!(ids, (1..=m + 1).collect::<Vec<_>>(), "the stream is one message, then its finish: gap-free");
    }
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_streams_over_a_websocket_and_abandoned_streams_are_cancelled() {
    let d = Distributed::start(BIN, 1, 1, 2, &[("QUICKIM_STREAM_TIMEOUT_S", "1")]).await;
    let (a, b) = (d.api(0), d.api(1));
    a.conversation("s", &["alice", "bob"]).await;
    let (ta, tb) = (a.token("alice", "web").await, b.token("bob", "web").await);
    let mut bob = NotifyClient::connect(&b.public, &tb, Protocol::Ws, None).await.unwrap();
    assert_eq!(bob.next(SOON).await.unwrap()["type"], "ready");
    let mut alice = NotifyClient::connect(&a.public, &ta, Protocol::Ws, None).await.unwrap();
    assert_eq!(alice.next(SOON).await.unwrap()["type"], "ready");
    let (s, v) = a.client(&ta, "/open_stream", json!({"conversation_id":"s","type":1})).await;
    assert_eq!(s, 200, "{v}");
    let m = v["data"]["msg_id"].as_u64().unwrap();
    alice
        .send_frame(json!({"type":"stream_delta","req_id":1,"conversation_id":"s","msg_id":m,"seq":1,"delta":"hi"}))
        .await;
    let got = until(&mut bob, "the delta", |e| e["type"] == "stream").await;
    assert_eq!(stream_texts(&got), vec![(1, "hi".to_string())]);

    // Errors, each with its code.
    let delta = |seq: u64, text: &str| json!({"conversation_id":"s","msg_id":m,"seq":seq,"delta":text});
    for (token, path, body, status, code) in [
        (&tb, "/stream_delta", delta(2, "not mine"), 403, 40302),
        (&tb, "/stream_delta", json!({"conversation_id":"s","msg_id":999,"seq":1,"delta":"x"}), 403, 40302),
        (&ta, "/stream_delta", delta(2, &"x".repeat(4097)), 413, 41307),
        (&ta, "/stream_delta", delta(0, "x"), 400, 40000),
        (&ta, "/edit_msg", json!({"conversation_id":"s","msg_id":m,"content":"x"}), 409, 40905),
        (&tb, "/finish_stream", json!({"conversation_id":"s","msg_id":m,"content":"x"}), 403, 40302),
        (&ta, "/open_stream", json!({"conversation_id":"elsewhere","type":1}), 403, 40301),
    ] {
        let (s, v) = a.client(token, path, body.clone()).await;
        assert_eq!((s.as_u16(), v["code"].as_u64()), (status, Some(code)), "{path} {body}: {v}");
    }
    let (s, v) = a.client(&ta, "/finish_stream", json!({"conversation_id":"s","msg_id":m,"content":"hi there"})).await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = a.client(&ta, "/stream_delta", delta(2, "late")).await;
    assert_eq!((s.as_u16(), v["code"].as_u64()), (409, Some(40904)), "after the finish: {v}");
    let (s, v) = a.client(&ta, "/cancel_stream", json!({"conversation_id":"s","msg_id":m})).await;
    assert_eq!((s.as_u16(), v["code"].as_u64()), (409, Some(40904)), "a finished stream: {v}");

    // Abandoned: cancelled after stream_timeout_s, the message deleted, no hole in the ids.
    let (_, v) = a.client(&ta, "/open_stream", json!({"conversation_id":"s","type":1})).await;
    let left = v["data"]["msg_id"].as_u64().unwrap();
    let got = until(&mut bob, "the cancel", |e| {
        e["type"] == "message" && e["message"]["type"] == -6 && {
            let c: Value = serde_json::from_str(e["message"]["content"].as_str().unwrap()).unwrap();
            c["action"] == "cancel"
        }
    })
    .await;
    assert!(got.iter().any(|e| e["message"]["msg_id"] == left), "the open came first");
    let (_, v) = a
        .client(
            &ta,
            "/get_conversation_msg_by_range",
            json!({"conversation_id":"s","start_msg_id":left,"end_msg_id":left}),
        )
        .await;
    assert_eq!(v["data"]["msgs"][0]["deleted"], true, "{v}");
    d.finish().await;
}

/// What a stream costs: deltas per second one sender gets through (each checked and fanned
/// out to both nodes), and how long a delta takes to reach a member on the other node.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stream_figures() {
    let d = Distributed::start(BIN, 1, 1, 2, &[("QUICKIM_RATE_LIMIT_PER_S", "0")]).await;
    let (a, b) = (d.api(0), d.api(1));
    a.conversation("f", &["reader", "bot"]).await;
    let tr = b.token("reader", "web").await;
    let mut reader = NotifyClient::connect(&b.public, &tr, Protocol::Ws, None).await.unwrap();
    assert_eq!(reader.next(SOON).await.unwrap()["type"], "ready");
    let m = ok(a, "/inner/open_stream", json!({"conversation_id":"f","from":"bot","type":1})).await["msg_id"]
        .as_u64()
        .unwrap();
    const N: u64 = 500;
    let epoch = Instant::now();
    let sender = {
        let a = a.clone();
        tokio::spawn(async move {
            for seq in 1..=N {
                let sent_us = epoch.elapsed().as_micros();
                let body = json!({"conversation_id":"f","msg_id":m,"seq":seq,"delta":format!("{sent_us} ")});
                let (s, v) = a.inner("/inner/stream_delta", body).await;
                assert_eq!(s, 200, "{v}");
            }
            epoch.elapsed()
        })
    };
    let mut latencies = Vec::new();
    let mut next = 1;
    while next <= N {
        let e = reader.next(SOON).await.expect("every delta");
        if e["type"] != "stream" {
            continue;
        }
        assert_eq!(e["seq"], next, "in order");
        let sent_us: u128 = e["delta"].as_str().unwrap().trim().parse().unwrap();
        latencies.push((epoch.elapsed().as_micros() - sent_us) as f64 / 1000.0);
        next += 1;
    }
    let took = sender.await.unwrap();
    latencies.sort_by(|x, y| x.total_cmp(y));
    let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p) as usize];
    println!(
        "stream figures: {N} deltas from one sender in {:.2} s = {:.0} deltas/s; fan-out to the other node p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        took.as_secs_f64(),
        N as f64 / took.as_secs_f64(),
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
    d.finish().await;
}
