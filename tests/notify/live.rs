//! Live signals across two gateway nodes, on each transport: read receipts (coalesced, the
//! latest after a resume, off per conversation) and typing (to the others only, never
//! stored), with their limits.

use std::time::Duration;

use quickim_testkit::{Api, Distributed, NotifyClient, Protocol};
use serde_json::{Value, json};

use crate::{BIN, SOON, send};

/// The `type` events of `client` within `wait` (other events skipped).
async fn events_of(client: &mut NotifyClient, kind: &str, wait: Duration) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut out = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return out;
        }
        match client.next(left).await {
            Some(e) if e["type"] == kind => out.push(e),
            Some(_) => {}
            None => return out,
        }
    }
}

/// Reads events until a `read` event of `user` at `read_msg_id`; answers every `read` event
/// of `user` seen on the way (that one included).
async fn reads_until(client: &mut NotifyClient, user: &str, read_msg_id: u64) -> Vec<u64> {
    let deadline = tokio::time::Instant::now() + SOON;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let e = client
            .next(left)
            .await
            .unwrap_or_else(|| panic!("{:?}: no read event of {user} at {read_msg_id}; saw {seen:?}", client.protocol));
        if e["type"] == "read" && e["user_id"] == user {
            assert!(e.get("cursor").is_none(), "a receipt has no place in the log: {e}");
            let at = e["read_msg_id"].as_u64().unwrap();
            seen.push(at);
            if at == read_msg_id {
                return seen;
            }
        }
    }
}

async fn mark_read(api: &Api, token: &str, conversation: &str, msg_id: u64) {
    let (s, v) = api.client(token, "/mark_read", json!({"conversation_id":conversation,"msg_id":msg_id})).await;
    assert_eq!(s, 200, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn read_receipts_cross_nodes_coalesced_and_the_latest_comes_after_a_resume() {
    let d = Distributed::start(BIN, 1, 2, 2, &[("QUICKIM_RATE_LIMIT_PER_S", "0")]).await;
    let (a, b) = (d.api(0), d.api(1));
    for protocol in Protocol::ALL {
        let conv = format!("receipts-{}", protocol.name());
        let (alice, bob) = (format!("alice-{}", protocol.name()), format!("bob-{}", protocol.name()));
        a.conversation(&conv, &[&alice, &bob]).await;
        let (ta, tb) = (a.token(&alice, "web").await, b.token(&bob, "web").await);
        let mut watcher = NotifyClient::connect(&a.public, &ta, protocol, None).await.unwrap();
        assert_eq!(watcher.next(SOON).await.unwrap()["type"], "ready");
        let first = send(a, &conv, &alice, "m").await;
        for i in 1..10 {
            send(a, &conv, &alice, &format!("m{i}")).await;
        }
        let last = first + 9;

        // Ten moves within a second, on the other node: the first at once, then at most one
        // a second, ending with the latest.
        for id in first..=last {
            mark_read(b, &tb, &conv, id).await;
        }
        let seen = reads_until(&mut watcher, &bob, last).await;
        assert!(seen.len() <= 3, "{protocol:?}: coalesced: {seen:?}");
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "{protocol:?}: never backwards: {seen:?}");
        assert_eq!(seen[0], first, "{protocol:?}: the first move goes at once");

        // Away: three more moves; the resume brings the latest, not the ones in between.
        let cursor = watcher.drop_connection();
        let more: Vec<u64> = [send(a, &conv, &alice, "n1").await, send(a, &conv, &alice, "n2").await].into();
        mark_read(b, &tb, &conv, more[0]).await;
        mark_read(b, &tb, &conv, more[1]).await;
        let mut resumed = NotifyClient::connect(&a.public, &ta, protocol, cursor.as_deref()).await.unwrap();
        let seen = reads_until(&mut resumed, &bob, more[1]).await;
        if protocol == Protocol::Poll {
            // The long-poll's parked session stayed attached and got them live.
            assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
        } else {
            assert_eq!(seen, vec![more[1]], "{protocol:?}: only the latest position");
        }
        let later = events_of(&mut resumed, "read", Duration::from_millis(1500)).await;
        assert!(
            later.iter().all(|e| e["read_msg_id"].as_u64() == Some(more[1])),
            "{protocol:?}: nothing older afterwards: {later:?}"
        );
    }
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn read_receipts_can_be_turned_off_per_conversation() {
    let d = Distributed::start(BIN, 1, 1, 2, &[]).await;
    let (a, b) = (d.api(0), d.api(1));
    let (s, v) = a
        .inner(
            "/inner/create_conversation",
            json!({"conversation_id":"big","conversation_type":2,"members":["alice","bob"],"receipts":false}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let (ta, tb) = (a.token("alice", "web").await, b.token("bob", "web").await);
    let (_, v) = a.client(&ta, "/get_conversation_detail", json!({"conversation_id":"big"})).await;
    assert_eq!(v["data"]["receipts"], false, "{v}");
    let mut watcher = NotifyClient::connect(&a.public, &ta, Protocol::Ws, None).await.unwrap();
    assert_eq!(watcher.next(SOON).await.unwrap()["type"], "ready");
    let m = send(a, "big", "alice", "hello all").await;
    mark_read(b, &tb, "big", m).await;
    assert!(events_of(&mut watcher, "read", Duration::from_millis(1500)).await.is_empty(), "receipts are off");

    // Members cannot turn them on; the business system can, and everyone learns it live.
    let (s, v) = a.client(&ta, "/update_conversation", json!({"conversation_id":"big","receipts":true})).await;
    assert_eq!((s.as_u16(), v["code"].as_u64()), (403, Some(40300)), "{v}");
    let (s, v) = a.inner("/inner/update_conversation", json!({"conversation_id":"big","receipts":true})).await;
    assert_eq!((s.as_u16(), v["data"]["receipts"].as_bool()), (200, Some(true)), "{v}");
    let change = watcher.next_message(SOON).await.unwrap();
    assert_eq!(change["type"], -7);
    let content: Value = serde_json::from_str(change["content"].as_str().unwrap()).unwrap();
    assert_eq!(content["receipts"], true, "{content}");
    mark_read(b, &tb, "big", change["msg_id"].as_u64().unwrap()).await;
    reads_until(&mut watcher, "bob", change["msg_id"].as_u64().unwrap()).await;
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn typing_reaches_the_other_members_on_every_node_and_is_never_stored() {
    let d = Distributed::start(BIN, 1, 1, 2, &[]).await;
    let (a, b) = (d.api(0), d.api(1));
    a.conversation("t", &["alice", "bob"]).await;
    a.conversation("elsewhere", &["carol"]).await;
    let (ta, tb, tc) = (a.token("alice", "web").await, b.token("bob", "web").await, b.token("carol", "web").await);
    let last_before =
        a.client(&ta, "/get_lastone_msgid", json!({"conversation_id":"t"})).await.1["data"]["msg_id"].clone();
    let mut own = NotifyClient::connect(&b.public, &tb, Protocol::Ws, None).await.unwrap();
    assert_eq!(own.next(SOON).await.unwrap()["type"], "ready");
    let mut outsider = NotifyClient::connect(&b.public, &tc, Protocol::Sse, None).await.unwrap();
    assert_eq!(outsider.next(SOON).await.unwrap()["type"], "ready");
    for protocol in Protocol::ALL {
        let mut watcher = NotifyClient::connect(&a.public, &ta, protocol, None).await.unwrap();
        assert_eq!(watcher.next(SOON).await.unwrap()["type"], "ready");
        let (s, v) = b.client(&tb, "/signal", json!({"conversation_id":"t","kind":"typing"})).await;
        assert_eq!((s.as_u16(), &v["data"]), (200, &json!({"sent":true})), "{v}");
        let got = events_of(&mut watcher, "signal", Duration::from_millis(1200)).await;
        assert_eq!(
            got,
            vec![json!({"type":"signal","conversation_id":"t","from":"bob","kind":"typing","expires_in_ms":6000})],
            "{protocol:?}"
        );
        // A WebSocket frame does the same.
        own.send_frame(json!({"type":"signal","req_id":"s1","conversation_id":"t","kind":"typing_stopped"})).await;
        let got = events_of(&mut watcher, "signal", Duration::from_millis(1200)).await;
        assert_eq!(got.len(), 1, "{protocol:?}: {got:?}");
        assert_eq!((got[0]["from"].as_str(), got[0]["kind"].as_str()), (Some("bob"), Some("typing_stopped")));
    }
    // The sender's own connection got its acks, never its own signals; a non-member nothing.
    let own_events: Vec<Value> = {
        let mut v = Vec::new();
        while let Some(e) = own.next(Duration::from_millis(300)).await {
            v.push(e);
        }
        v
    };
    assert!(own_events.iter().all(|e| e["type"] == "ack"), "{own_events:?}");
    assert_eq!(own_events.len(), 3, "one ack per frame: {own_events:?}");
    assert!(events_of(&mut outsider, "signal", Duration::from_millis(300)).await.is_empty());
    // Never stored: the conversation's newest message is the same.
    let last_after =
        a.client(&ta, "/get_lastone_msgid", json!({"conversation_id":"t"})).await.1["data"]["msg_id"].clone();
    assert_eq!(last_before, last_after);

    // Custom signals carry content; bad ones are refused with their codes.
    let mut watcher = NotifyClient::connect(&a.public, &ta, Protocol::Ws, None).await.unwrap();
    assert_eq!(watcher.next(SOON).await.unwrap()["type"], "ready");
    let (s, v) = b.client(&tb, "/signal", json!({"conversation_id":"t","kind":"custom","content":"recording"})).await;
    assert_eq!(s, 200, "{v}");
    let got = events_of(&mut watcher, "signal", Duration::from_millis(1200)).await;
    assert_eq!(got[0]["content"], "recording");
    for (body, status, code) in [
        (json!({"conversation_id":"t","kind":"custom"}), 400, 40000),
        (json!({"conversation_id":"t","kind":"typing","content":"x"}), 400, 40000),
        (json!({"conversation_id":"t","kind":"dance"}), 400, 40000),
        (json!({"conversation_id":"t","kind":"custom","content":"x".repeat(257)}), 413, 41306),
        (json!({"conversation_id":"elsewhere","kind":"typing"}), 403, 40301),
        (json!({"conversation_id":"nope","kind":"typing"}), 403, 40301),
    ] {
        let (s, v) = b.client(&tb, "/signal", body.clone()).await;
        assert_eq!((s.as_u16(), v["code"].as_u64()), (status, Some(code)), "{body}: {v}");
    }
    d.finish().await;
}

#[tokio::test]
async fn signals_have_a_rate_of_their_own() {
    let q = quickim_testkit::Standalone::start(BIN, &[("QUICKIM_SIGNAL_RATE_PER_S", "2")]).await;
    q.api.conversation("t", &["alice", "bob"]).await;
    let t = q.api.token("bob", "web").await;
    let mut codes = Vec::new();
    for _ in 0..8 {
        let (s, v) = q.api.client(&t, "/signal", json!({"conversation_id":"t","kind":"typing"})).await;
        codes.push((s.as_u16(), v["code"].as_u64().unwrap_or(0)));
    }
    assert_eq!(codes.iter().filter(|c| c.0 == 200).count(), 4, "a burst of twice the rate: {codes:?}");
    assert!(codes[4..].iter().all(|c| *c == (429, 42904)), "{codes:?}");
    // Other requests are not limited by it.
    let (s, _) = q.api.client(&t, "/get_joined_conversation", json!({})).await;
    assert_eq!(s, 200);
}

/// The next `presence` event about `user` within `wait`; a presence event about carol (who
/// shares no conversation with presence on) fails the test.
async fn presence_of(client: &mut NotifyClient, user: &str, wait: Duration) -> Option<Value> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let e = client.next(left).await?;
        if e["type"] == "presence" {
            assert_ne!(e["user_id"], "carol", "carol shares no conversation with presence on: {e}");
            if e["user_id"] == user {
                return Some(e);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn presence_flips_with_debounce_across_nodes() {
    let d = Distributed::start(BIN, 1, 1, 2, &[("QUICKIM_PRESENCE_DEBOUNCE_S", "1")]).await;
    let (a, b) = (d.api(0), d.api(1));
    for (id, members, presence) in [("team", ["alice", "bob"], true), ("crowd", ["alice", "carol"], false)] {
        let body = json!({"conversation_id":id,"conversation_type":2,"members":members,"presence":presence});
        let (s, v) = a.inner("/inner/create_conversation", body).await;
        assert_eq!(s, 200, "{v}");
    }
    let (ta, tb, tc) = (a.token("alice", "web").await, b.token("bob", "web").await, b.token("carol", "web").await);
    let mut alice = NotifyClient::connect(&a.public, &ta, Protocol::Ws, None).await.unwrap();
    assert_eq!(alice.next(SOON).await.unwrap()["type"], "ready");

    // Bob's first connection, on the other node: online.
    let bob1 = NotifyClient::connect(&b.public, &tb, Protocol::Ws, None).await.unwrap();
    let e = presence_of(&mut alice, "bob", SOON).await.expect("bob online");
    assert_eq!(e, json!({"type":"presence","user_id":"bob","online":true}));
    // Carol shares only a conversation without presence: nothing about her.
    let carol = NotifyClient::connect(&b.public, &tc, Protocol::Ws, None).await.unwrap();

    // A reconnection within the debounce: nothing.
    bob1.drop_connection();
    let bob2 = NotifyClient::connect(&b.public, &tb, Protocol::Ws, None).await.unwrap();
    assert!(presence_of(&mut alice, "bob", Duration::from_millis(2500)).await.is_none(), "debounced");

    // Connected on both nodes, then gone from one: still online.
    let bob3 = NotifyClient::connect(&a.public, &tb, Protocol::Ws, None).await.unwrap();
    bob2.drop_connection();
    let seen = presence_of(&mut alice, "bob", Duration::from_millis(2500)).await;
    assert!(seen.as_ref().is_none_or(|e| e["online"] == true), "never offline while on a node: {seen:?}");

    // Gone from both: offline, once the debounce is over, with last_seen.
    let before = quickim_shared_now_ms();
    bob3.drop_connection();
    let e = presence_of(&mut alice, "bob", SOON).await.expect("bob offline");
    assert_eq!(e["online"], false, "{e}");
    let last_seen = e["last_seen"].as_i64().unwrap();
    assert!(last_seen >= before + 900, "after the debounce: {last_seen} vs {before}");
    let (_, v) = b.inner("/inner/get_users_online", json!({"user_ids":["bob","nobody"]})).await;
    assert_eq!(v["data"]["users"][0]["online"], false, "{v}");
    assert_eq!(v["data"]["users"][0]["last_seen"], last_seen, "{v}");
    assert!(v["data"]["users"][1].get("last_seen").is_none(), "never seen: {v}");
    let (_, v) = a.client(&ta, "/get_conversation_detail", json!({"conversation_id":"team"})).await;
    assert_eq!(v["data"]["presence"], true);
    let bob_member = v["data"]["members"].as_array().unwrap().iter().find(|m| m["user_id"] == "bob").unwrap().clone();
    assert_eq!(bob_member["last_seen"], last_seen, "{v}");
    assert!(presence_of(&mut alice, "nobody", Duration::from_millis(1500)).await.is_none());
    drop(carol);
    d.finish().await;
}

fn quickim_shared_now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}
