//! /notify through the real binary: every protocol, exact resume (after a dropped
//! connection, a restarted or killed gateway, across nodes), kicks, limits, graceful
//! shutdown, a soak test with random reconnects, and a real browser.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod browser;
mod bus_limits;
mod cluster;
mod kick;
mod limits;
mod live;
mod protocols;
mod resume;
mod shutdown;
mod soak;
mod streams;
mod tickets;

use std::time::Duration;

use quickim_testkit::{Api, NotifyClient};
use serde_json::{Value, json};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_quickim");

/// Patience for an event that should come.
pub const SOON: Duration = Duration::from_secs(10);

/// Sends `content` to `conversation` as `from` through /inner; answers the msg_id.
pub async fn send(api: &Api, conversation: &str, from: &str, content: &str) -> u64 {
    let (s, v) = api
        .inner("/inner/send_msg", json!({"conversation_id":conversation,"from":from,"type":1,"content":content}))
        .await;
    assert_eq!(s, 200, "{v}");
    v["data"]["msg_id"].as_u64().unwrap()
}

/// One client of `token` per protocol, each past its `ready` event.
pub async fn connect_every_protocol(public: &str, token: &str) -> Vec<NotifyClient> {
    let mut clients = Vec::new();
    for p in quickim_testkit::Protocol::ALL {
        let mut c = NotifyClient::connect(public, token, p, None).await.unwrap();
        assert_eq!(c.next(SOON).await.expect("ready")["type"], "ready", "{p:?}");
        clients.push(c);
    }
    clients
}

/// The next `n` messages of a client (panics if they do not come).
pub async fn messages(client: &mut NotifyClient, n: usize) -> Vec<Value> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        match client.next_message(SOON).await {
            Some(m) => out.push(m),
            None => panic!(
                "{:?}: got {} of {n} messages: {out:?} (closed: {:?})",
                client.protocol,
                out.len(),
                client.closed
            ),
        }
    }
    out
}

/// Asserts that no message comes within `wait`.
pub async fn no_message(client: &mut NotifyClient, wait: Duration) {
    if let Some(m) = client.next_message(wait).await {
        panic!("{:?}: unexpected message {m}", client.protocol);
    }
}

pub fn contents(msgs: &[Value]) -> Vec<String> {
    msgs.iter().map(|m| m["content"].as_str().unwrap_or_default().to_string()).collect()
}
