//! Sends that reach one gateway together travel to the message service together
//! (`gateway/src/sends.rs`): each still gets its own answer — stored, refused or
//! deduplicated — and the conversation's msg_ids stay gap-free.

use std::collections::{HashMap, HashSet};

use quickim_testkit::Standalone;
use reqwest::StatusCode;
use serde_json::json;

use crate::BIN;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_sends_with_different_outcomes_each_get_their_own_answer() {
    let q = Standalone::start(BIN, &[]).await;
    let api = &q.api;
    api.conversation("open", &["alice", "bob"]).await;
    api.conversation("private", &["alice"]).await;
    let alice = api.token("alice", "web").await;
    let bob = api.token("bob", "web").await;

    const N: usize = 400;
    let mut tasks = Vec::new();
    for i in 0..N {
        let (api, alice, bob) = (api.clone(), alice.clone(), bob.clone());
        tasks.push(tokio::spawn(async move {
            let (token, body) = match i % 4 {
                // Not a member: refused, alone.
                0 => (bob, json!({"conversation_id":"private","type":1,"content":format!("m{i}")})),
                // Retries of 20 keys: each key stored once.
                1 => (bob, json!({"conversation_id":"open","type":1,"content":format!("k{}", (i / 4) % 20),"client_msg_id":format!("k{}", (i / 4) % 20)})),
                // Invalid for the message service (negative types are the system's).
                2 => (alice, json!({"conversation_id":"open","type":-3,"content":format!("m{i}")})),
                _ => (alice, json!({"conversation_id":"open","type":1,"content":format!("m{i}")})),
            };
            let (s, v) = api.client(&token, "/send_msg", body).await;
            (i, s, v)
        }));
    }
    let mut stored = Vec::new();
    let mut by_key: HashMap<String, HashSet<u64>> = HashMap::new();
    for t in tasks {
        let (i, s, v) = t.await.unwrap();
        match i % 4 {
            0 => assert_eq!((s, v["code"].as_i64()), (StatusCode::FORBIDDEN, Some(40301)), "send {i}: {v}"),
            2 => assert_eq!(s, StatusCode::BAD_REQUEST, "send {i}: {v}"),
            1 => {
                assert_eq!(s, StatusCode::OK, "send {i}: {v}");
                let key = format!("k{}", (i / 4) % 20);
                assert_eq!(v["data"]["content"], key.as_str(), "send {i} got another send's answer: {v}");
                by_key.entry(key).or_default().insert(v["data"]["msg_id"].as_u64().unwrap());
            }
            _ => {
                assert_eq!(s, StatusCode::OK, "send {i}: {v}");
                assert_eq!(v["data"]["content"], format!("m{i}").as_str(), "send {i} got another send's answer: {v}");
                stored.push(v["data"]["msg_id"].as_u64().unwrap());
            }
        }
    }
    assert_eq!(by_key.len(), 20);
    for (key, ids) in &by_key {
        assert_eq!(ids.len(), 1, "{key} stored once, every retry answered with it: {ids:?}");
        stored.extend(ids);
    }
    // One message per unkeyed send and per key, gap-free after the creation message.
    stored.sort_unstable();
    let expected: Vec<u64> = (2..2 + (N / 4 + 20) as u64).collect();
    assert_eq!(stored, expected);

    // The sends did travel together: fewer bus requests than sends.
    let metrics = api.http.get(format!("{}/metrics", api.inner)).send().await.unwrap().text().await.unwrap();
    let requests: f64 = metrics
        .lines()
        .find(|l| l.starts_with("quickim_bus_request_duration_seconds_count") && l.contains("quickim.msg.send_each"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("send_each requests are counted");
    assert!(requests >= 1.0 && requests < N as f64, "{requests} bus requests for {N} sends");
}
