//! Kicks: from a conversation (delivery stops at once on every node) and from the service
//! (every connection closes, older tokens are refused).

use std::time::Duration;

use quickim_testkit::{Closed, Distributed, NotifyClient, Protocol};
use serde_json::json;

use crate::{BIN, SOON, contents, messages, send};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kickout_stops_delivery_of_that_conversation_on_every_node() {
    let d = Distributed::start(BIN, 1, 1, 2, &[]).await;
    d.api(0).conversation("c", &["alice", "bob"]).await;
    d.api(0).conversation("other", &["alice", "bob"]).await;
    let alice = d.api(0).token("alice", "web").await;
    let bob = d.api(0).token("bob", "web").await;
    let mut alices = Vec::new();
    for (i, p) in Protocol::ALL.into_iter().enumerate() {
        let mut c = NotifyClient::connect(&d.api(i % 2).public, &alice, p, None).await.unwrap();
        c.next(SOON).await.unwrap();
        alices.push(c);
    }
    let mut bobc = NotifyClient::connect(&d.api(1).public, &bob, Protocol::Ws, None).await.unwrap();
    bobc.next(SOON).await.unwrap();
    send(d.api(0), "c", "bob", "m1").await;
    for c in alices.iter_mut().chain(std::iter::once(&mut bobc)) {
        assert_eq!(contents(&messages(c, 1).await), vec!["m1"]);
    }
    let (_, v) =
        d.api(1).inner("/inner/kickout_conversation", json!({"conversation_id":"c","user_ids":["alice"]})).await;
    assert_eq!(v["data"]["kicked"], json!(["alice"]));
    // Each of alice's streams gets the kick message (type -4 naming her), then nothing more
    // from that conversation.
    for c in &mut alices {
        let kick = messages(c, 1).await.remove(0);
        assert_eq!(
            (kick["conversation_id"].as_str(), kick["type"].as_i64()),
            (Some("c"), Some(-4)),
            "{:?}",
            c.protocol
        );
        assert!(kick["content"].as_str().unwrap().contains("alice"));
    }
    send(d.api(0), "c", "bob", "after the kick").await;
    send(d.api(1), "other", "bob", "other conversation").await;
    let got = messages(&mut bobc, 3).await;
    assert_eq!(contents(&got)[1..], ["after the kick".to_string(), "other conversation".to_string()]);
    for c in &mut alices {
        let mut seen = Vec::new();
        while let Some(m) = c.next_message(Duration::from_millis(800)).await {
            seen.push(m);
        }
        assert_eq!(contents(&seen), vec!["other conversation"], "{:?}: the stream lives on, without c", c.protocol);
    }
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kick_user_closes_every_connection_and_refuses_old_tokens() {
    let d = Distributed::start(BIN, 1, 1, 2, &[]).await;
    let web = d.api(0).token("alice", "web").await;
    let ios = d.api(0).token("alice", "ios").await;
    let mut ws = NotifyClient::connect(&d.api(0).public, &web, Protocol::Ws, None).await.unwrap();
    let mut sse = NotifyClient::connect(&d.api(1).public, &ios, Protocol::Sse, None).await.unwrap();
    ws.next(SOON).await.unwrap();
    sse.next(SOON).await.unwrap();
    let (_, v) = d.api(0).inner("/inner/get_users_online", json!({"user_ids":["alice","bob"]})).await;
    assert_eq!(
        v["data"]["users"][0],
        json!({"user_id":"alice","online":true,"platforms":["ios","web"],"connections":2})
    );
    assert_eq!(v["data"]["users"][1]["online"], false);
    let (s, v) = d.api(1).inner("/inner/kick_user", json!({"user_id":"alice"})).await;
    assert_eq!(s, 200);
    assert_eq!(v["data"]["closed_connections"], 2, "{v}");
    let e = ws.next(SOON).await.unwrap();
    assert_eq!((e["type"].as_str(), e["reason"].as_str()), (Some("kicked"), Some("kick_user")));
    assert_eq!(ws.wait_closed(SOON).await, Some(Closed::Ws(4000, "kicked".into())));
    assert_eq!(sse.next(SOON).await.unwrap()["type"], "kicked");
    assert_eq!(sse.wait_closed(SOON).await, Some(Closed::Ended));
    for (api, token) in [(d.api(0), &web), (d.api(1), &ios)] {
        let err = NotifyClient::connect(&api.public, token, Protocol::Sse, None).await.err().expect("refused");
        assert_eq!((err.status, err.body["code"].as_u64()), (401, Some(40100)));
    }
    let (_, v) = d.api(1).inner("/inner/get_users_online", json!({"user_ids":["alice"]})).await;
    assert_eq!(v["data"]["users"][0]["online"], false);
    // A new token works.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let fresh = d.api(0).token("alice", "web").await;
    assert!(NotifyClient::connect(&d.api(1).public, &fresh, Protocol::Ws, None).await.is_ok());
    d.finish().await;
}
