//! Outbound webhooks against a real HTTP receiver: every event type, in log order, signed
//! (checked with Python's hmac); a receiver down for a while, then back — every event
//! arrives, in order per conversation, duplicates only where a batch was sent again (same
//! `webhook-id`), each recognisable by its key; delivery resumes from the stored position
//! after a restart; in a cluster one message service delivers and another takes over when it
//! is killed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quickim_testkit::{Api, Distributed, Standalone};
use serde_json::{Value, json};

use crate::BIN;
use crate::hooks::{SECRET, python_signature};
use crate::receiver::{Got, receiver};

/// A receiver answering the status in `status` (200 up, 503 down).
async fn webhook_receiver() -> (String, Arc<Mutex<Vec<Got>>>, Arc<AtomicU16>) {
    let status = Arc::new(AtomicU16::new(200));
    let s = status.clone();
    let (url, got) = receiver("/hooks/quickim", move |_| (s.load(Ordering::SeqCst), "{}".into(), None)).await;
    (url, got, status)
}

fn env(url: &str) -> Vec<(&'static str, String)> {
    let endpoints = json!([{"id":"crm","url":url,"secret":SECRET,"start":"beginning"}]);
    vec![("QUICKIM_WEBHOOKS", endpoints.to_string()), ("QUICKIM_WEBHOOK_LINGER_MS", "50".to_string())]
}

fn pairs<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// Every event of every POST the receiver took (status 200 at the time), with the POST's
/// `webhook-id`, in arrival order.
fn taken(got: &Arc<Mutex<Vec<Got>>>, taken_from: usize) -> Vec<(String, Value)> {
    let got = got.lock().unwrap();
    got[taken_from..]
        .iter()
        .flat_map(|g| {
            let id = g.header("webhook-id").to_string();
            g.json()["events"].as_array().cloned().unwrap_or_default().into_iter().map(move |e| (id.clone(), e))
        })
        .collect()
}

/// Waits until the events taken so far hold every key in `keys`.
async fn wait_for_keys(got: &Arc<Mutex<Vec<Got>>>, from: usize, keys: &[String]) -> Vec<(String, Value)> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let events = taken(got, from);
        let have: std::collections::HashSet<&str> = events.iter().map(|(_, e)| e["id"].as_str().unwrap()).collect();
        if keys.iter().all(|k| have.contains(k.as_str())) {
            return events;
        }
        let missing: Vec<&String> = keys.iter().filter(|k| !have.contains(k.as_str())).collect();
        assert!(std::time::Instant::now() < deadline, "webhooks never delivered {missing:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// In order per conversation (by msg_id, first arrival of each key), and any key seen twice
/// came again in a batch sent again (the same webhook-id).
fn check_order_and_duplicates(events: &[(String, Value)]) {
    let mut first: HashMap<String, String> = HashMap::new();
    let mut last_per_conversation: HashMap<String, u64> = HashMap::new();
    for (batch, e) in events {
        let key = e["id"].as_str().unwrap().to_string();
        if let Some(batch_before) = first.get(&key) {
            assert_eq!(batch_before, batch, "{key} came twice, not as a retry of its batch");
            continue;
        }
        first.insert(key.clone(), batch.clone());
        let (conversation, msg_id) = key.rsplit_once(':').unwrap();
        let msg_id: u64 = msg_id.parse().unwrap();
        let last = last_per_conversation.entry(conversation.to_string()).or_insert(0);
        assert!(msg_id > *last, "{key} after msg_id {last}: out of order");
        *last = msg_id;
    }
}

/// Sends as a client of quickim does: retried with the same key while a killed service's
/// absence is noticed (503/504), so it is stored once.
async fn send(api: &Api, conversation: &str, from: &str, content: &str) -> u64 {
    let key = content.replace(' ', "_");
    let body = json!({"conversation_id":conversation,"from":from,"type":1,"content":content,"client_msg_id":key});
    for _ in 0..50 {
        let (s, v) = api.inner("/inner/send_msg", body.clone()).await;
        if s == 200 {
            return v["data"]["msg_id"].as_u64().unwrap();
        }
        assert!(s == 503 || s == 504, "{v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("{content} was never stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_type_arrives_signed_and_in_order() {
    let (url, got, _) = webhook_receiver().await;
    let env = env(&url);
    let q = Standalone::start(BIN, &pairs(&env)).await;
    let api = &q.api;
    let inner = |path: &'static str, body: Value| async move {
        let (s, v) = api.inner(path, body).await;
        assert_eq!(s, 200, "{path}: {v}");
    };
    inner(
        "/inner/create_conversation",
        json!({"conversation_id":"w","conversation_type":1,"members":["alice","bob","carol"]}),
    )
    .await; // 1
    let m = send(api, "w", "alice", "hello").await; // 2
    inner("/inner/edit_msg", json!({"conversation_id":"w","msg_id":m,"content":"hello!"})).await; // 3
    inner("/inner/kickout_conversation", json!({"conversation_id":"w","user_ids":["carol"]})).await; // 4
    let tb = api.token("bob", "web").await;
    let (s, _) = api.client(&tb, "/leave_conversation", json!({"conversation_id":"w"})).await; // 5
    assert_eq!(s, 200);
    inner("/inner/join_conversation", json!({"conversation_id":"w","user_ids":["dave"]})).await; // 6
    inner("/inner/set_archive_conversations", json!({"conversation_ids":["w"],"archived":true})).await; // 7
    let keys: Vec<String> = (1..=7).map(|i| format!("w:{i}")).collect();
    let events = wait_for_keys(&got, 0, &keys).await;
    check_order_and_duplicates(&events);
    let types: Vec<&str> = events.iter().map(|(_, e)| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        [
            "conversation.created",
            "message.created",
            "message.offline",
            "message.revised",
            "member.kicked",
            "member.left",
            "member.joined",
            "conversation.archived"
        ]
    );
    let data: Vec<&Value> = events.iter().map(|(_, e)| &e["data"]).collect();
    // The message as it is when delivered: as sent, or already edited (its revision follows).
    assert!(data[1]["content"] == "hello" || data[1]["content"] == "hello!", "{}", data[1]);
    assert_eq!(data[1]["from"], "alice");
    assert_eq!(
        (data[3]["revision"]["action"].as_str(), data[3]["revision"]["content"].as_str()),
        (Some("edit"), Some("hello!"))
    );
    assert_eq!(data[2]["offline_user_ids"], json!(["bob", "carol"]), "nobody is connected");
    assert_eq!(data[4]["user_ids"], json!(["carol"]));
    assert_eq!(data[7]["archived"], true);
    for g in got.lock().unwrap().iter() {
        let (id, ts) = (g.header("webhook-id"), g.header("webhook-timestamp"));
        assert_eq!(g.header("webhook-signature"), python_signature(id, ts, &g.body), "signed as specified");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_down_for_a_while_then_a_restart_loses_nothing() {
    let (url, got, status) = webhook_receiver().await;
    let env = env(&url);
    let mut q = Standalone::start(BIN, &pairs(&env)).await;
    q.api.conversation("a", &["alice"]).await;
    q.api.conversation("b", &["bob"]).await;
    status.store(503, Ordering::SeqCst);
    let mut keys = vec!["a:1".to_string(), "b:1".to_string()];
    for i in 0..20 {
        let (c, from) = if i % 2 == 0 { ("a", "alice") } else { ("b", "bob") };
        keys.push(format!("{c}:{}", send(&q.api, c, from, &format!("m{i}")).await));
    }
    // Down: batches are tried and tried again, none taken.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let tries = got.lock().unwrap().len();
    assert!(tries >= 2, "the batch was retried while the receiver was down: {tries}");
    status.store(200, Ordering::SeqCst);
    let events = wait_for_keys(&got, tries, &keys).await;
    check_order_and_duplicates(&events);

    // A restart resumes from the stored position: what comes after arrives, what came before
    // does not come again.
    let before_restart = got.lock().unwrap().len();
    q.restart().await;
    let more = vec![format!("a:{}", send(&q.api, "a", "alice", "after").await)];
    let events = wait_for_keys(&got, before_restart, &more).await;
    let again: Vec<&str> =
        events.iter().map(|(_, e)| e["id"].as_str().unwrap()).filter(|k| keys.iter().any(|x| x == k)).collect();
    assert!(again.is_empty(), "delivered again after a restart: {again:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn in_a_cluster_one_service_delivers_and_another_takes_over() {
    let (url, got, _) = webhook_receiver().await;
    let env = env(&url);
    let mut d = Distributed::start(BIN, 1, 2, 1, &pairs(&env)).await;
    let api = d.api(0).clone();
    api.conversation("c", &["alice"]).await;
    let mut keys = vec!["c:1".to_string()];
    for i in 0..30 {
        keys.push(format!("c:{}", send(&api, "c", "alice", &format!("m{i}")).await));
    }
    let events = wait_for_keys(&got, 0, &keys).await;
    let ids: Vec<&str> = events.iter().map(|(_, e)| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), keys.len(), "two message services, each event once: {ids:?}");
    // Kill one service, then (a new one started) the other: whichever delivered, another
    // takes over from the stored position and nothing is lost.
    for victim in 0..2 {
        d.message[victim].kill();
        for i in 0..10 {
            keys.push(format!("c:{}", send(&api, "c", "alice", &format!("k{victim}-{i}")).await));
        }
        if victim == 0 {
            d.add_service_with("message", &pairs(&env));
        }
    }
    let events = wait_for_keys(&got, 0, &keys).await;
    check_order_and_duplicates(&events);
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_positions_and_presence_arrive_too() {
    let (url, got, _) = webhook_receiver().await;
    let mut env = env(&url);
    env.push(("QUICKIM_PRESENCE_DEBOUNCE_S", "0".to_string()));
    let q = Standalone::start(BIN, &pairs(&env)).await;
    q.api.conversation("r", &["alice", "bob"]).await;
    let m = send(&q.api, "r", "bob", "read me").await;
    let ta = q.api.token("alice", "web").await;
    let (s, v) = q.api.client(&ta, "/mark_read", json!({"conversation_id":"r","msg_id":m})).await;
    assert_eq!(s, 200, "{v}");
    let alice =
        quickim_testkit::NotifyClient::connect(&q.api.public, &ta, quickim_testkit::Protocol::Ws, None).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut dropped = Some(alice);
    loop {
        let events = taken(&got, 0);
        let kinds: Vec<&str> = events.iter().map(|(_, e)| e["type"].as_str().unwrap()).collect();
        if kinds.contains(&"user.online") && dropped.is_some() {
            // Online seen: now go.
            dropped.take().unwrap().drop_connection();
        }
        if kinds.contains(&"read.updated") && kinds.contains(&"user.offline") {
            let read = events.iter().find(|(_, e)| e["type"] == "read.updated").unwrap();
            assert_eq!(read.1["id"], format!("read:r:alice:{m}"));
            assert_eq!(read.1["data"], json!({"conversation_id":"r","user_id":"alice","read_msg_id":m}));
            let online = events.iter().position(|(_, e)| e["type"] == "user.online").unwrap();
            let offline = events.iter().position(|(_, e)| e["type"] == "user.offline").unwrap();
            assert!(online < offline, "{events:?}");
            assert_eq!(events[offline].1["data"]["user_id"], "alice");
            let keys: Vec<&str> = events.iter().map(|(_, e)| e["id"].as_str().unwrap()).collect();
            let unique: std::collections::HashSet<&&str> = keys.iter().collect();
            assert_eq!(unique.len(), keys.len(), "each once while nothing failed: {keys:?}");
            return;
        }
        assert!(std::time::Instant::now() < deadline, "not every signal arrived: {kinds:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_names_the_members_with_no_connection() {
    let (url, got, _) = webhook_receiver().await;
    let env = env(&url);
    let q = Standalone::start(BIN, &pairs(&env)).await;
    q.api.conversation("o", &["alice", "bob", "carol"]).await;
    let tb = q.api.token("bob", "web").await;
    let mut bob =
        quickim_testkit::NotifyClient::connect(&q.api.public, &tb, quickim_testkit::Protocol::Ws, None).await.unwrap();
    assert_eq!(bob.next(Duration::from_secs(10)).await.unwrap()["type"], "ready");
    let m = send(&q.api, "o", "alice", "anyone there").await;
    let key = format!("offline:o:{m}");
    let events = wait_for_keys(&got, 0, std::slice::from_ref(&key)).await;
    let offline = events.iter().find(|(_, e)| e["id"] == key.as_str()).unwrap();
    assert_eq!(offline.1["type"], "message.offline");
    assert_eq!(offline.1["data"]["offline_user_ids"], json!(["carol"]), "not the sender, not bob who is connected");
    assert_eq!(offline.1["data"]["message"]["content"], "anyone there");
    let created = events.iter().position(|(_, e)| e["id"] == format!("o:{m}")).unwrap();
    let after = events.iter().position(|(_, e)| e["id"] == key.as_str()).unwrap();
    assert_eq!(after, created + 1, "right after its message.created");
}

/// What webhooks cost: events per second one endpoint gets, and how long after its commit an
/// event reaches the receiver (figures printed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_figures() {
    let (url, got, _) = webhook_receiver().await;
    let endpoints = json!([{"id":"fig","url":url,"events":["message.created"]}]);
    let q = Standalone::start(BIN, &[("QUICKIM_WEBHOOKS", &endpoints.to_string()), ("QUICKIM_RATE_LIMIT_PER_S", "0")])
        .await;
    q.api.conversation("f", &["alice"]).await;
    // Let the endpoint start (at the log's heads) before the messages.
    tokio::time::sleep(Duration::from_millis(500)).await;
    const N: usize = 2_000;
    let started = std::time::Instant::now();
    for batch in 0..N / 500 {
        let msgs: Vec<Value> = (0..500)
            .map(|i| json!({"conversation_id":"f","from":"alice","type":1,"content":format!("m{batch}-{i}")}))
            .collect();
        let (s, v) = q.api.inner("/inner/send_msg_batch", json!({ "msgs": msgs })).await;
        assert_eq!(s, 200, "{v}");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let n = taken(&got, 0).len();
        if n >= N {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "only {n} of {N} delivered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = started.elapsed();
    let posts = got.lock().unwrap().len();
    println!(
        "webhook figures: {N} messages delivered in {:.2} s = {:.0} events/s, in {posts} POSTs",
        took.as_secs_f64(),
        N as f64 / took.as_secs_f64()
    );
}

/// A gateway killed while messages stream through it: every message acknowledged before (on
/// either gateway) reaches the receiver; nothing acknowledged is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gateway_killed_mid_stream_loses_no_acknowledged_message() {
    let (url, got, _) = webhook_receiver().await;
    let env = env(&url);
    let mut d = Distributed::start(BIN, 1, 1, 2, &pairs(&env)).await;
    let (a, b) = (d.api(0).clone(), d.api(1).clone());
    a.conversation("g", &["alice"]).await;
    let sender = tokio::spawn(async move {
        let mut acked = Vec::new();
        for i in 0..300 {
            let api = if i % 2 == 0 { &a } else { &b };
            let body = json!({"conversation_id":"g","from":"alice","type":1,"content":format!("g{i}"),"client_msg_id":format!("g{i}")});
            // A request to the killed gateway fails: not acknowledged, so not promised.
            let request = api.http.post(format!("{}/inner/send_msg", api.inner)).bearer_auth(&api.key).json(&body);
            if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(5), request.send()).await
                && r.status() == 200
                && let Ok(v) = r.json::<Value>().await
            {
                acked.push(format!("g:{}", v["data"]["msg_id"]));
            }
        }
        acked
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    d.gateways[1].0.kill();
    let acked = sender.await.unwrap();
    assert!(acked.len() >= 150, "the other gateway kept taking sends: {}", acked.len());
    let events = wait_for_keys(&got, 0, &acked).await;
    check_order_and_duplicates(&events);
}
