//! Exact resume: after a dropped connection, a restarted gateway, a killed gateway, across
//! nodes; with memberships that changed while away; retention and foreign cursors.

use std::time::Duration;

use quickim_testkit::{Distributed, NotifyClient, Protocol, Standalone};
use serde_json::json;

use crate::{BIN, SOON, connect_every_protocol, contents, messages, no_message, send};

async fn resume_after_a_dropped_connection(p: Protocol) {
    let q = Standalone::start(BIN, &[]).await;
    q.api.conversation("c", &["alice", "bob"]).await;
    let t = q.api.token("alice", "web").await;
    let mut c = NotifyClient::connect(&q.api.public, &t, p, None).await.unwrap();
    for i in 0..3 {
        send(&q.api, "c", "bob", &format!("before{i}")).await;
    }
    assert_eq!(contents(&messages(&mut c, 3).await), vec!["before0", "before1", "before2"]);
    let cursor = c.drop_connection().unwrap();
    for i in 0..5 {
        send(&q.api, "c", "bob", &format!("away{i}")).await;
    }
    let mut c = NotifyClient::connect(&q.api.public, &t, p, Some(&cursor)).await.unwrap();
    let got = messages(&mut c, 5).await;
    assert_eq!(contents(&got), vec!["away0", "away1", "away2", "away3", "away4"], "{p:?}");
    send(&q.api, "c", "bob", "live").await;
    assert_eq!(contents(&messages(&mut c, 1).await), vec!["live"]);
    no_message(&mut c, Duration::from_millis(300)).await;
}

#[tokio::test]
async fn ws_resumes_after_a_dropped_connection() {
    resume_after_a_dropped_connection(Protocol::Ws).await;
}

#[tokio::test]
async fn sse_resumes_after_a_dropped_connection() {
    resume_after_a_dropped_connection(Protocol::Sse).await;
}

#[tokio::test]
async fn poll_resumes_after_a_dropped_connection() {
    resume_after_a_dropped_connection(Protocol::Poll).await;
}

#[tokio::test]
async fn sse_takes_the_cursor_from_the_query_when_headers_cannot_be_set() {
    let q = Standalone::start(BIN, &[]).await;
    q.api.conversation("c", &["alice", "bob"]).await;
    let t = q.api.token("alice", "web").await;
    let mut c = NotifyClient::connect(&q.api.public, &t, Protocol::Sse, None).await.unwrap();
    send(&q.api, "c", "bob", "one").await;
    messages(&mut c, 1).await;
    let cursor = c.drop_connection().unwrap();
    send(&q.api, "c", "bob", "two").await;
    let mut resp = q
        .api
        .http
        .get(format!("{}/notify?protoc=sse&token={t}&last_event_id={cursor}", q.api.public))
        .send()
        .await
        .unwrap();
    let mut text = String::new();
    while !text.contains("\"two\"") {
        let chunk = tokio::time::timeout(SOON, resp.chunk()).await.unwrap().unwrap().unwrap();
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(!text.contains("\"one\""), "nothing twice: {text}");
}

#[tokio::test]
async fn every_protocol_resumes_after_the_gateway_restarts() {
    let mut q = Standalone::start(BIN, &[]).await;
    q.api.conversation("c", &["alice", "bob"]).await;
    let t = q.api.token("alice", "web").await;
    let mut clients = connect_every_protocol(&q.api.public, &t).await;
    send(&q.api, "c", "bob", "before").await;
    for c in &mut clients {
        assert_eq!(contents(&messages(c, 1).await), vec!["before"]);
    }
    q.restart().await;
    for i in 0..4 {
        send(&q.api, "c", "bob", &format!("after{i}")).await;
    }
    for c in clients {
        let p = c.protocol;
        let mut c = c.reconnect(&q.api.public).await.unwrap();
        assert_eq!(contents(&messages(&mut c, 4).await), vec!["after0", "after1", "after2", "after3"], "{p:?}");
        no_message(&mut c, Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn resume_on_another_node_after_a_gateway_is_killed() {
    let mut d = Distributed::start(BIN, 1, 1, 2, &[]).await;
    d.api(0).conversation("c", &["alice", "bob"]).await;
    let t = d.api(0).token("alice", "web").await;
    let mut clients = connect_every_protocol(&d.api(0).public, &t).await;
    send(d.api(0), "c", "bob", "seen").await;
    for c in &mut clients {
        messages(c, 1).await;
    }
    d.gateways[0].0.kill();
    for i in 0..6 {
        send(d.api(1), "c", "bob", &format!("missed{i}")).await;
    }
    let other = d.api(1).public.clone();
    let mut resumed = Vec::new();
    for c in clients {
        let p = c.protocol;
        let mut c = c.reconnect(&other).await.unwrap();
        let got = messages(&mut c, 6).await;
        assert_eq!(contents(&got), (0..6).map(|i| format!("missed{i}")).collect::<Vec<_>>(), "{p:?}");
        resumed.push(c);
    }
    send(d.api(1), "c", "bob", "live").await;
    for c in &mut resumed {
        assert_eq!(contents(&messages(c, 1).await), vec!["live"], "{:?}", c.protocol);
        no_message(c, std::time::Duration::from_millis(300)).await;
    }

    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hopping_between_nodes_never_duplicates() {
    let d = Distributed::start(BIN, 1, 1, 2, &[]).await;
    d.api(0).conversation("c", &["alice", "bob"]).await;
    let t = d.api(0).token("alice", "web").await;
    let mut c = NotifyClient::connect(&d.api(0).public, &t, Protocol::Ws, None).await.unwrap();
    c.next(SOON).await.unwrap();
    let mut got = Vec::new();
    for round in 0..10 {
        for i in 0..5 {
            send(d.api(round % 2), "c", "bob", &format!("{round}-{i}")).await;
        }
        // Take what arrived, then move to the other node with the last cursor at once: the
        // other node may not have seen these entries yet (its copy of the log is behind).
        got.extend(messages(&mut c, 2).await);
        c = c.reconnect(&d.api((round + 1) % 2).public).await.unwrap();
        assert_eq!(c.next(SOON).await.unwrap()["type"], "ready");
    }
    while let Some(m) = c.next_message(Duration::from_secs(2)).await {
        got.push(m);
    }
    let ids: Vec<u64> = got.iter().map(|m| m["msg_id"].as_u64().unwrap()).collect();
    assert_eq!(ids, (2..52).collect::<Vec<_>>(), "every message once, in order");
    d.finish().await;
}

#[tokio::test]
async fn resume_follows_membership_changes_made_while_away() {
    let q = Standalone::start(BIN, &[]).await;
    q.api.conversation("stay", &["alice", "bob"]).await;
    q.api.conversation("leave", &["alice", "bob"]).await;
    let t = q.api.token("alice", "web").await;
    for p in Protocol::ALL {
        let mut c = NotifyClient::connect(&q.api.public, &t, p, None).await.unwrap();
        c.next(SOON).await.unwrap();
        let cursor = c.drop_connection().unwrap();
        let new_conv = format!("new-{}", p.name());
        q.api.conversation(&new_conv, &["bob"]).await;
        send(&q.api, &new_conv, "bob", "before alice joined").await;
        q.api.inner("/inner/join_conversation", json!({"conversation_id":new_conv,"user_ids":["alice"]})).await;
        send(&q.api, &new_conv, "bob", "after alice joined").await;
        send(&q.api, "leave", "bob", &format!("before kick {}", p.name())).await;
        if p == Protocol::Ws {
            q.api.inner("/inner/kickout_conversation", json!({"conversation_id":"leave","user_ids":["alice"]})).await;
        }
        send(&q.api, "leave", "bob", &format!("after kick {}", p.name())).await;
        send(&q.api, "stay", "bob", &format!("stay {}", p.name())).await;
        let mut c = NotifyClient::connect(&q.api.public, &t, p, Some(&cursor)).await.unwrap();
        let mut got = Vec::new();
        while let Some(m) = c.next_message(Duration::from_secs(2)).await {
            got.push(m);
        }
        let of = |conv: &str| got.iter().filter(|m| m["conversation_id"] == conv).cloned().collect::<Vec<_>>();
        let joined = of(&new_conv);
        assert_eq!(joined.len(), 2, "{p:?}: the join message and what followed, not what came before: {got:?}");
        assert_eq!(joined[0]["type"], -2);
        assert_eq!(joined[1]["content"], "after alice joined");
        assert_eq!(contents(&of("stay")), vec![format!("stay {}", p.name())]);
        let left = of("leave");
        if p == Protocol::Ws {
            // the backlog before the kick, the kick itself, nothing after
            assert_eq!(left.len(), 2, "{got:?}");
            assert_eq!(left[0]["content"], "before kick ws");
            assert_eq!(left[1]["type"], -4);
        } else {
            assert!(left.is_empty(), "{p:?}: kicked earlier, nothing from it: {got:?}");
        }
    }
}

#[tokio::test]
async fn a_cursor_beyond_the_retention_window_gets_resync() {
    let q = Standalone::start(BIN, &[("QUICKIM_REPLAY_RETENTION_S", "1")]).await;
    q.api.conversation("c", &["alice", "bob"]).await;
    let t = q.api.token("alice", "web").await;
    let mut c = NotifyClient::connect(&q.api.public, &t, Protocol::Ws, None).await.unwrap();
    c.next(SOON).await.unwrap();
    let old = c.drop_connection().unwrap();
    // Traffic until a checkpoint older than the window lies beyond the old cursor: the old
    // cursor is then answered with resync (observed on a long-poll, which changes nothing).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut i = 0;
    loop {
        send(&q.api, "c", "bob", &format!("{i}")).await;
        i += 1;
        let v: serde_json::Value = q
            .api
            .http
            .get(format!("{}/notify?protoc=poll&timeout=0&cursor={old}", q.api.public))
            .bearer_auth(&t)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if v["data"]["events"].as_array().is_some_and(|e| e.iter().any(|e| e["type"] == "resync")) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the old cursor never fell out of the window");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for p in Protocol::ALL {
        let mut c = NotifyClient::connect(&q.api.public, &t, p, Some(&old)).await.unwrap();
        let mut first = c.next(SOON).await.unwrap();
        if first["type"] == "ready" {
            first = c.next(SOON).await.unwrap();
        }
        assert_eq!(first["type"], "resync", "{p:?}: {first}");
        assert_eq!(first["reason"], "cursor_expired");
        let fresh = first["cursor"].as_str().unwrap().to_string();
        no_message(&mut c, Duration::from_millis(300)).await;
        // continuing from the resync cursor works
        send(&q.api, "c", "bob", "next").await;
        assert_eq!(contents(&messages(&mut c, 1).await), vec!["next"]);
        assert_ne!(fresh, old);
    }
}

#[tokio::test]
async fn a_cursor_from_another_database_gets_resync_and_garbage_is_400() {
    let a = Standalone::start(BIN, &[]).await;
    let b = Standalone::start(BIN, &[]).await;
    let ta = a.api.token("alice", "web").await;
    let tb = b.api.token("alice", "web").await;
    let mut c = NotifyClient::connect(&a.api.public, &ta, Protocol::Ws, None).await.unwrap();
    let foreign = c.next(SOON).await.unwrap()["cursor"].as_str().unwrap().to_string();
    for p in Protocol::ALL {
        let mut c = NotifyClient::connect(&b.api.public, &tb, p, Some(&foreign)).await.unwrap();
        let mut e = c.next(SOON).await.unwrap();
        if e["type"] == "ready" {
            e = c.next(SOON).await.unwrap();
        }
        assert_eq!(
            (e["type"].as_str(), e["reason"].as_str()),
            (Some("resync"), Some("cursor_from_another_database")),
            "{p:?}"
        );
    }
    for p in Protocol::ALL {
        let err = NotifyClient::connect(&b.api.public, &tb, p, Some("not-a-cursor")).await.err().expect("refused");
        assert_eq!((err.status, err.body["code"].as_u64()), (400, Some(40000)), "{p:?}");
    }
}

/// What alice gets when she resumes after a story of sends, an edit and a recall made while
/// she was away, and which answer the gateway's replay window gave (its metric).
async fn resume_story(p: Protocol, window_bytes: &str) -> (Vec<serde_json::Value>, Vec<serde_json::Value>, String) {
    let q = Standalone::start(BIN, &[("QUICKIM_HUB_REPLAY_WINDOW_BYTES", window_bytes)]).await;
    q.api.conversation("c", &["alice", "bob"]).await;
    q.api.conversation("d", &["alice", "bob"]).await;
    q.api.conversation("e", &["bob", "carol"]).await;
    let t = q.api.token("alice", "web").await;
    let mut c = NotifyClient::connect(&q.api.public, &t, p, None).await.unwrap();
    let early = send(&q.api, "c", "bob", "early").await;
    messages(&mut c, 1).await;
    let cursor = c.drop_connection().unwrap();
    // While away: messages in her conversations and in another, an edit of a message she had.
    for i in 0..20 {
        send(&q.api, ["c", "d", "e"][i % 3], "bob", &format!("away{i}")).await;
    }
    let (s, v) =
        q.api.inner("/inner/edit_msg", json!({"conversation_id":"c","msg_id":early,"content":"early, edited"})).await;
    assert_eq!(s, 200, "{v}");
    let mut c = NotifyClient::connect(&q.api.public, &t, p, Some(&cursor)).await.unwrap();
    let first = messages(&mut c, 15).await;
    no_message(&mut c, Duration::from_millis(300)).await;
    // Again from the same cursor after a recall of a message of the range.
    let recalled = first.iter().find(|m| m["content"] == "away4").unwrap()["msg_id"].as_u64().unwrap();
    let (s, v) = q.api.inner("/inner/recall_msg", json!({"conversation_id":"d","msg_id":recalled})).await;
    assert_eq!(s, 200, "{v}");
    let mut c = NotifyClient::connect(&q.api.public, &t, p, Some(&cursor)).await.unwrap();
    let second = messages(&mut c, 16).await;
    no_message(&mut c, Duration::from_millis(300)).await;
    let text = q.api.http.get(format!("{}/metrics", q.api.inner)).send().await.unwrap().text().await.unwrap();
    let answers = text.lines().filter(|l| l.starts_with("quickim_hub_window_replays_total")).collect::<Vec<_>>();
    // Two runs differ in their send times only.
    let timeless = |mut msgs: Vec<serde_json::Value>| {
        for m in &mut msgs {
            m.as_object_mut().unwrap().remove("send_time");
        }
        msgs
    };
    (timeless(first), timeless(second), answers.join("\n"))
}

async fn the_replay_window_answers_exactly_what_the_store_does(p: Protocol) {
    let (first, second, answers) = resume_story(p, "33554432").await;
    // A long-poll's first resume continues its parked session (nothing to replay); the
    // second, from the same old cursor, is a replay.
    let (window, store) = if p == Protocol::Poll { (0, 1) } else { (1, 2) };
    assert_eq!(answers.contains(r#"answer="window"} 1"#), window == 1, "{p:?}: {answers}");
    assert!(answers.contains(r#"answer="revised"} 1"#), "{p:?}: {answers}");
    let (store_first, store_second, store_answers) = resume_story(p, "0").await;
    assert!(store_answers.contains(&format!(r#"answer="off"}} {store}"#)), "{p:?}: {store_answers}");
    assert_eq!(first, store_first, "{p:?}: the window's replay is the store's");
    assert_eq!(second, store_second, "{p:?}");
    let of = |msgs: &[serde_json::Value]| contents(msgs).into_iter().filter(|c| c.starts_with("away")).count();
    assert_eq!(of(&first), 14, "{first:?}");
    assert_eq!(first.iter().filter(|m| m["type"] == -6).count(), 1, "the edit: {first:?}");
    let recalled = second.iter().find(|m| m["recalled"] == true).expect("recalled in the second replay");
    assert_eq!(recalled["content"], "", "{second:?}");
}

#[tokio::test]
async fn ws_replay_window_answers_exactly_what_the_store_does() {
    the_replay_window_answers_exactly_what_the_store_does(Protocol::Ws).await;
}

#[tokio::test]
async fn sse_replay_window_answers_exactly_what_the_store_does() {
    the_replay_window_answers_exactly_what_the_store_does(Protocol::Sse).await;
}

#[tokio::test]
async fn poll_replay_window_answers_exactly_what_the_store_does() {
    the_replay_window_answers_exactly_what_the_store_does(Protocol::Poll).await;
}

/// A resume on a gateway the user has never been connected to: its memberships are read
/// there first, then what it missed comes from that gateway's replay window (every gateway
/// receives the whole log).
#[tokio::test]
async fn a_resume_on_another_gateway_is_answered_from_its_replay_window() {
    let d = Distributed::start(BIN, 1, 1, 2, &[]).await;
    d.api(0).conversation("c", &["bob"]).await;
    d.api(0).conversation("other", &["bob", "carol"]).await;
    for p in [Protocol::Ws, Protocol::Sse] {
        let user = format!("{}-user", p.name());
        d.api(0).inner("/inner/join_conversation", json!({"conversation_id":"c","user_ids":[user]})).await;
        let t = d.api(0).token(&user, "web").await;
        let mut c = NotifyClient::connect(&d.api(0).public, &t, p, None).await.unwrap();
        send(d.api(0), "c", "bob", &format!("seen {}", p.name())).await;
        messages(&mut c, 1).await;
        let cursor = c.drop_connection().unwrap();
        for i in 0..4 {
            send(d.api(0), "c", "bob", &format!("missed{i}")).await;
            send(d.api(0), "other", "bob", "not hers").await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut c = NotifyClient::connect(&d.api(1).public, &t, p, Some(&cursor)).await.unwrap();
        let got = messages(&mut c, 4).await;
        assert_eq!(contents(&got), (0..4).map(|i| format!("missed{i}")).collect::<Vec<_>>(), "{p:?}");
        no_message(&mut c, Duration::from_millis(300)).await;
    }
    let text = d.api(1).http.get(format!("{}/metrics", d.api(1).inner)).send().await.unwrap().text().await.unwrap();
    assert!(text.contains(r#"quickim_hub_window_replays_total{answer="window"} 2"#), "{text}");
    d.finish().await;
}
