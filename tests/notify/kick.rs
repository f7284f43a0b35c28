//! Kicks: from a conversation (delivery stops at once on every node) and from the service
//! (every connection closes, older tokens are refused).

use std::time::Duration;

use quickim_testkit::{Closed, Distributed, NatsServer, NotifyClient, PgDatabase, Protocol, free_port};
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
    // A new token works, issued right after the kick (tokens carry milliseconds).
    let fresh = d.api(0).token("alice", "web").await;
    assert!(NotifyClient::connect(&d.api(1).public, &fresh, Protocol::Ws, None).await.is_ok());
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_that_missed_the_kick_closes_the_streams_once_it_reads_the_revocation() {
    // Two NATS servers in a cluster: gateway 1 alone on the second, which goes down while
    // the kick is broadcast.
    let (route_a, route_b) = (free_port(), free_port());
    let cluster = |me: u16, other: u16| {
        [
            "--cluster_name".to_string(),
            "q".to_string(),
            "--cluster".to_string(),
            format!("nats://127.0.0.1:{me}"),
            "--routes".to_string(),
            format!("nats://127.0.0.1:{other}"),
            // Clients stay on the server they were given (they would learn the other).
            "--no_advertise".to_string(),
        ]
    };
    let args_a = cluster(route_a, route_b);
    let args_b = cluster(route_b, route_a);
    let nats_a = NatsServer::start_with(&args_a.iter().map(String::as_str).collect::<Vec<_>>());
    let mut nats_b = NatsServer::start_with(&args_b.iter().map(String::as_str).collect::<Vec<_>>());
    let mut d =
        Distributed::start_on(BIN, nats_a, PgDatabase::create().await, 1, 1, 1, &[("QUICKIM_REVOCATION_POLL_S", "1")])
            .await;
    let b = d.add_gateway_with(&[("QUICKIM_NATS_URL", &nats_b.url)]).await;
    let alice = d.api(0).token("alice", "web").await;
    let mut sse = NotifyClient::connect(&d.api(b).public, &alice, Protocol::Sse, None).await.unwrap();
    assert_eq!(sse.next(SOON).await.unwrap()["type"], "ready");

    nats_b.stop();
    let (s, v) = d.api(0).inner("/inner/kick_user", json!({"user_id":"alice"})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["data"]["nodes_asked"], 2, "gateway 1 was seen alive: {v}");
    assert_eq!(v["data"]["nodes_confirmed"], 1, "and could not answer: {v}");
    assert!(sse.next(Duration::from_millis(500)).await.is_none(), "gateway 1 does not know yet");

    // Back on NATS, gateway 1 reads the revocation within a poll and closes the stream.
    let back = std::time::Instant::now();
    nats_b.start_again();
    let e = sse.next(Duration::from_secs(30)).await.expect("the stream is closed once the node learns of the kick");
    assert_eq!(e["type"], "kicked");
    assert_eq!(sse.wait_closed(SOON).await, Some(Closed::Ended));
    eprintln!("closed {:?} after NATS came back", back.elapsed());
    let err = NotifyClient::connect(&d.api(b).public, &alice, Protocol::Sse, None).await.err().expect("refused");
    assert_eq!(err.status, 401);
    d.finish().await;
}
