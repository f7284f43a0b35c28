//! Fan-out across gateway nodes, on every protocol at once, to every device.

use quickim_testkit::{Distributed, NotifyClient, Protocol};
use serde_json::json;

use crate::{BIN, SOON, contents, messages};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_message_sent_through_one_node_reaches_every_device_on_every_node() {
    let d = Distributed::start(BIN, 1, 2, 3, &[]).await;
    d.api(0).conversation("c", &["alice", "bob"]).await;
    let tokens = [
        d.api(0).token("alice", "web").await,
        d.api(0).token("alice", "ios").await,
        d.api(0).token("alice", "android").await,
    ];
    let mut clients = Vec::new();
    for (node, p) in Protocol::ALL.into_iter().enumerate() {
        for t in &tokens {
            let mut c = NotifyClient::connect(&d.api(node).public, t, p, None).await.unwrap();
            c.next(SOON).await.unwrap();
            clients.push((node, c));
        }
    }
    let bob = d.api(0).token("bob", "web").await;
    for i in 0..10 {
        let (s, v) = d
            .api(i % 3)
            .client(&bob, "/send_msg", json!({"conversation_id":"c","type":1,"content":format!("m{i}")}))
            .await;
        assert_eq!(s, 200, "{v}");
    }
    for (node, c) in &mut clients {
        let got = messages(c, 10).await;
        assert_eq!(
            contents(&got),
            (0..10).map(|i| format!("m{i}")).collect::<Vec<_>>(),
            "node {node} {:?}",
            c.protocol
        );
    }
    let (_, v) = d.api(2).inner("/inner/get_users_online", json!({"user_ids":["alice"]})).await;
    assert_eq!(v["data"]["nodes"], 3);
    assert_eq!(v["data"]["users"][0]["platforms"], json!(["android", "ios", "web"]));
    // Poll clients count while a poll is open; the WS and SSE ones stay connected.
    assert!(v["data"]["users"][0]["connections"].as_u64().unwrap() >= 6, "{v}");
    d.finish().await;
}
