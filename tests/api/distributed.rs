//! The distributed roles on a real nats-server and a fresh PostgreSQL database.

use std::collections::HashSet;
use std::time::Duration;

use quickim_testkit::Distributed;
use reqwest::StatusCode;
use serde_json::json;

use crate::BIN;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn any_gateway_serves_any_request() {
    let d = Distributed::start(BIN, 1, 1, 2, &[]).await;
    let (a, b) = (d.api(0), d.api(1));
    a.conversation("room", &["alice", "bob"]).await;
    let alice = a.token("alice", "web").await;
    let bob = b.token("bob", "web").await;
    let (s, v) = b.client(&alice, "/send_msg", json!({"conversation_id":"room","type":1,"content":"via b"})).await;
    assert_eq!(s, StatusCode::OK, "a token from gateway 0 works on gateway 1: {v}");
    let (_, v) = a.client(&bob, "/get_conversation_lastone_msg", json!({"conversation_id":"room"})).await;
    assert_eq!(v["data"]["msg"]["content"], "via b");
    let (_, v) = a.inner("/inner/get_users_online", json!({"user_ids":["alice"]})).await;
    assert_eq!(v["data"]["nodes"], 2, "presence asks every gateway: {v}");
    // kick_user revokes on every gateway
    let (s, _) = a.inner("/inner/kick_user", json!({"user_id":"alice"})).await;
    assert_eq!(s, StatusCode::OK);
    for api in [a, b] {
        let (s, _) = api.client(&alice, "/get_joined_conversation", json!({})).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
    }
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn msg_ids_are_gap_free_with_two_message_services() {
    let d = Distributed::start(BIN, 1, 2, 2, &[]).await;
    for c in ["hot", "warm"] {
        d.api(0).conversation(c, &["a", "b", "c", "d"]).await;
    }
    let mut tasks = Vec::new();
    for w in 0..16usize {
        let api = d.api(w % 2).clone();
        let user = ["a", "b", "c", "d"][w % 4];
        tasks.push(tokio::spawn(async move {
            let t = api.token(user, "web").await;
            let mut got = Vec::new();
            for i in 0..40usize {
                let conv = if (w + i) % 3 == 0 { "warm" } else { "hot" };
                let (s, v) = api
                    .client(&t, "/send_msg", json!({"conversation_id":conv,"type":1,"content":format!("{w}-{i}")}))
                    .await;
                assert_eq!(s, StatusCode::OK, "{v}");
                got.push((conv.to_string(), v["data"]["msg_id"].as_u64().unwrap()));
            }
            got
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    assert_eq!(all.len(), 640);
    let reader = d.api(0).token("a", "web").await;
    for c in ["hot", "warm"] {
        let mut ids: Vec<u64> = all.iter().filter(|(cc, _)| cc == c).map(|(_, id)| *id).collect();
        ids.sort_unstable();
        let expected: Vec<u64> = (2..2 + ids.len() as u64).collect();
        assert_eq!(ids, expected, "{c}: unique and gap-free");
        let (_, v) = d.api(1).client(&reader, "/get_lastone_msgid", json!({"conversation_id":c})).await;
        assert_eq!(v["data"]["msg_id"].as_u64().unwrap(), 1 + ids.len() as u64);
    }
    // Both message services took part.
    let served: usize = d.message.iter().filter(|p| p.log_text().contains("service running")).count();
    assert_eq!(served, 2);
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_retries_across_gateways_store_once() {
    let d = Distributed::start(BIN, 1, 2, 2, &[]).await;
    d.api(0).conversation("c", &["a"]).await;
    let t = d.api(0).token("a", "web").await;
    let mut tasks = Vec::new();
    for i in 0..24usize {
        let api = d.api(i % 2).clone();
        let t = t.clone();
        tasks.push(tokio::spawn(async move {
            let (s, v) = api
                .client(
                    &t,
                    "/send_msg",
                    json!({"conversation_id":"c","type":1,"content":"once","client_msg_id":"same"}),
                )
                .await;
            assert_eq!(s, StatusCode::OK, "{v}");
            v["data"].clone()
        }));
    }
    let mut answers = HashSet::new();
    for task in tasks {
        answers.insert(task.await.unwrap().to_string());
    }
    assert_eq!(answers.len(), 1, "every retry answers the same message");
    let (_, v) = d.api(1).client(&t, "/get_lastone_msgid", json!({"conversation_id":"c"})).await;
    assert_eq!(v["data"]["msg_id"], 2, "stored once");
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_missing_service_is_503_and_recovers() {
    let mut d = Distributed::start(BIN, 1, 1, 1, &[("QUICKIM_REQUEST_TIMEOUT_MS", "2000")]).await;
    d.api(0).conversation("c", &["a"]).await;
    let t = d.api(0).token("a", "web").await;
    d.message[0].kill();
    // Until NATS has seen the process go, a request may still be routed to it and time out
    // (504); then there is no responder: 503 at once.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (s, v) = d.api(0).client(&t, "/send_msg", json!({"conversation_id":"c","type":1,"content":"x"})).await;
        if (s, v["code"].as_i64()) == (StatusCode::SERVICE_UNAVAILABLE, Some(50300)) {
            break;
        }
        assert_eq!((s, v["code"].as_i64()), (StatusCode::GATEWAY_TIMEOUT, Some(50400)), "{v}");
        assert!(std::time::Instant::now() < deadline, "never 503 without a message service: {v}");
    }
    // Readiness is answered from state: within a few seconds of the last heads announcement.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while d.api(0).is_ready().await {
        assert!(std::time::Instant::now() < deadline, "still ready without a message service");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    d.add_service("message");
    d.api(0).wait_ready(Duration::from_secs(30)).await;
    let (s, v) = d.api(0).client(&t, "/send_msg", json!({"conversation_id":"c","type":1,"content":"x"})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["data"]["msg_id"], 2, "the failed send stored nothing");
    d.finish().await;
}
