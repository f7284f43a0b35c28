//! Tokens out of URLs: a single-use /notify ticket, good on any gateway, once.

use std::time::Duration;

use quickim_testkit::{Distributed, NotifyClient, Protocol, Standalone};
use serde_json::json;

use crate::{BIN, SOON, send};

async fn ticket(api: &quickim_testkit::Api, token: &str) -> String {
    let (s, v) = api.client(token, "/notify_ticket", json!({})).await;
    assert_eq!(s, 200, "{v}");
    assert!(v["data"]["expires_at"].as_i64().unwrap() > 0);
    v["data"]["ticket"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_ticket_opens_one_stream_on_any_gateway() {
    let d = Distributed::start(BIN, 1, 1, 2, &[]).await;
    d.api(0).conversation("c", &["alice", "bob"]).await;
    let token = d.api(0).token("alice", "web").await;
    for protocol in [Protocol::Ws, Protocol::Sse] {
        // Issued by gateway 0, used on gateway 1.
        let t = ticket(d.api(0), &token).await;
        let mut c = NotifyClient::connect_with_ticket(&d.api(1).public, &t, protocol, None).await.unwrap();
        assert_eq!(c.next(SOON).await.unwrap()["type"], "ready");
        send(d.api(0), "c", "bob", &format!("over {protocol:?}")).await;
        assert_eq!(c.next_message(SOON).await.unwrap()["content"], format!("over {protocol:?}"));
        // Once: on either gateway.
        for g in 0..2 {
            let err =
                NotifyClient::connect_with_ticket(&d.api(g).public, &t, protocol, None).await.err().expect("used");
            assert_eq!((err.status, err.body["code"].as_u64()), (401, Some(40100)), "{:?}", err.body);
            assert_eq!(err.body["error"], "ticket already used: get a new one");
        }
    }
    // A ticket is no token, and a token no ticket.
    let t = ticket(d.api(0), &token).await;
    let (s, v) = d.api(0).client(&t, "/get_joined_conversation", json!({})).await;
    assert_eq!((s.as_u16(), v["code"].as_u64()), (401, Some(40100)), "{v}");
    let err = NotifyClient::connect_with_ticket(&d.api(0).public, &token, Protocol::Ws, None).await.err().unwrap();
    assert_eq!(err.status, 401);
    // A kick revokes the tickets of the tokens it revokes.
    let (s, _) = d.api(0).inner("/inner/kick_user", json!({"user_id":"alice"})).await;
    assert_eq!(s, 200);
    let err = NotifyClient::connect_with_ticket(&d.api(1).public, &t, Protocol::Sse, None).await.err().unwrap();
    assert_eq!((err.status, err.body["error"].as_str()), (401, Some("token revoked")), "{:?}", err.body);
    d.finish().await;
}

#[tokio::test]
async fn a_ticket_expires() {
    let q = Standalone::start(BIN, &[("QUICKIM_NOTIFY_TICKET_TTL_S", "1")]).await;
    let token = q.api.token("alice", "web").await;
    let t = ticket(&q.api, &token).await;
    // Tickets live in whole seconds: past the next second boundary plus one, it has expired.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let err = NotifyClient::connect_with_ticket(&q.api.public, &t, Protocol::Ws, None).await.err().unwrap();
    assert_eq!((err.status, err.body["error"].as_str()), (401, Some("ticket expired")), "{:?}", err.body);
}
