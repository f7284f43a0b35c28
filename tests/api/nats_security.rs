//! NATS secured as an operator would: every role with its own user and the least
//! permissions it needs (docs/operations.md), every subject behind a deployment prefix.

use std::time::Duration;

use quickim_testkit::{Distributed, NatsServer, NotifyClient, PgDatabase, Protocol};
use serde_json::json;

use crate::BIN;

/// The permissions docs/operations.md lists, for the prefix `prod`.
const NATS_CONFIG: &str = r#"
authorization {
  users = [
    { user: gateway, password: gateway-secret, permissions: {
        publish: { allow: ["prod.quickim.msg.*", "prod.quickim.conv.*", "prod.quickim.ctl.>", "prod.quickim.live"] }
        subscribe: { allow: ["prod.quickim.log", "prod.quickim.heads", "prod.quickim.live", "prod.quickim.ctl.>", "prod._INBOX.>"] }
        allow_responses: true
    } }
    { user: conversation, password: conversation-secret, permissions: {
        publish: { allow: ["prod.quickim.log", "prod.quickim.live"] }
        subscribe: { allow: ["prod.quickim.conv.*"] }
        allow_responses: true
    } }
    { user: message, password: message-secret, permissions: {
        publish: { allow: ["prod.quickim.log", "prod.quickim.heads", "prod.quickim.ctl.presence"] }
        subscribe: { allow: ["prod.quickim.msg.*", "prod.quickim.ctl.heartbeat", "prod._INBOX.>"] }
        allow_responses: true
    } }
  ]
}
"#;

fn creds(user: &str) -> [(&'static str, String); 3] {
    [
        ("QUICKIM_NATS_USER", user.to_string()),
        ("QUICKIM_NATS_PASSWORD", format!("{user}-secret")),
        ("QUICKIM_NATS_SUBJECT_PREFIX", "prod".to_string()),
    ]
}

fn pairs<'a>(c: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    c.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_role_works_with_its_own_user_and_least_permissions() {
    let nats = NatsServer::start_configured(NATS_CONFIG, &[]);
    let mut d = Distributed::start_on(BIN, nats, PgDatabase::create().await, 0, 0, 0, &[]).await;
    d.add_service_with("conversation", &pairs(&creds("conversation")));
    d.add_service_with("message", &pairs(&creds("message")));
    d.add_gateway_with(&pairs(&creds("gateway"))).await;
    d.add_gateway_with(&pairs(&creds("gateway"))).await;
    // Everything works: create, tokens, sends through one gateway delivered on the other,
    // presence and kicks across gateways.
    d.api(0).conversation("c", &["alice", "bob"]).await;
    let alice = d.api(0).token("alice", "web").await;
    let bob = d.api(0).token("bob", "web").await;
    let mut c = NotifyClient::connect(&d.api(1).public, &alice, Protocol::Ws, None).await.unwrap();
    c.next(Duration::from_secs(10)).await.unwrap();
    let (s, v) = d.api(0).client(&bob, "/send_msg", json!({"conversation_id":"c","type":1,"content":"secured"})).await;
    assert_eq!(s, 200, "{v}");
    let m = c.next_message(Duration::from_secs(10)).await.unwrap();
    assert_eq!(m["content"], "secured");
    // Live signals cross on quickim.live: bob's typing, and alice's receipt (to her own
    // devices too).
    let (s, v) = d.api(0).client(&bob, "/signal", json!({"conversation_id":"c","kind":"typing"})).await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = d.api(0).client(&alice, "/mark_read", json!({"conversation_id":"c","msg_id":m["msg_id"]})).await;
    assert_eq!(s, 200, "{v}");
    let mut live = Vec::new();
    while live.len() < 2 {
        let e = c.next(Duration::from_secs(10)).await.expect("a signal and a receipt");
        if e["type"] == "signal" || e["type"] == "read" {
            live.push(e["type"].as_str().unwrap().to_string());
        }
    }
    live.sort();
    assert_eq!(live, ["read", "signal"]);
    let (_, v) = d.api(0).inner("/inner/get_users_online", json!({"user_ids":["alice"]})).await;
    assert_eq!((v["data"]["nodes"].as_u64(), v["data"]["users"][0]["online"].as_bool()), (Some(2), Some(true)), "{v}");
    let (_, v) = d.api(0).inner("/inner/kick_user", json!({"user_id":"alice"})).await;
    assert_eq!(v["data"]["nodes_confirmed"], 2, "{v}");

    // A wrong password: the role stops at start with a clear message.
    d.add_service_with("message", &[("QUICKIM_NATS_USER", "message"), ("QUICKIM_NATS_PASSWORD", "wrong")]);
    let p = d.message.last_mut().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let code = loop {
        if let Some(code) = p.exited() {
            break code;
        }
        assert!(std::time::Instant::now() < deadline, "a role with a wrong NATS password kept running");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_ne!(code, Some(0));
    assert!(p.log_text().contains("NATS"), "{}", p.log_text());
    d.finish().await;
}
