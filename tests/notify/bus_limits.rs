//! Every message between the roles stays within the NATS server's `max_payload`: a cluster on
//! a server that takes 64 KiB at most still delivers every message exactly once, in order,
//! however much each kind of bus message would carry unpaged (issue: a gap of 60 MB that
//! could never be filled).

use std::time::Duration;

use futures::StreamExt;
use quickim_testkit::{Distributed, NatsServer, NotifyClient, PgDatabase, Protocol};
use serde_json::json;

use crate::{BIN, SOON, messages};

const MAX_PAYLOAD: usize = 64 * 1024;

/// A cluster of `gateways` gateways and two message services on a NATS server that takes at
/// most 64 KiB per message and cuts a client whose outbound buffer passes 1 MiB (a paused
/// gateway is a slow consumer within a second).
async fn small_bus_cluster(gateways: usize) -> Distributed {
    let nats = NatsServer::start_configured(
        &format!("max_payload: {MAX_PAYLOAD}\nmax_pending: 1048576\nwrite_deadline: \"1s\"\n"),
        &[],
    );
    Distributed::start_on(
        BIN,
        nats,
        PgDatabase::create().await,
        1,
        2,
        gateways,
        &[("QUICKIM_MAX_CONTENT_BYTES", "16384"), ("QUICKIM_GAP_FILL_MS", "100")],
    )
    .await
}

async fn metric(api: &quickim_testkit::Api, name: &str) -> f64 {
    let text = api.http.get(format!("{}/metrics", api.inner)).send().await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sends_gap_fills_and_replays_stay_under_max_payload() {
    let d = small_bus_cluster(2).await;
    d.api(0).conversation("c", &["alice", "bob"]).await;
    let alice = d.api(0).token("alice", "web").await;
    let bob = d.api(0).token("bob", "web").await;

    // One message that could not cross the bus (control characters are escaped six-fold),
    // though within max_content_bytes: refused before it is stored, with its own code.
    let (s, v) = d
        .api(0)
        .inner("/inner/send_msg", json!({"conversation_id":"c","from":"bob","type":1,"content":"\u{1}".repeat(16_000)}))
        .await;
    assert_eq!((s.as_u16(), v["code"].as_u64()), (413, Some(41301)), "{v}");

    // A batch of 40 × 12 KiB (480 KiB): stored in order, in chunks that fit.
    let big = |i: usize| format!("{i:05}{}", "x".repeat(12 * 1024));
    let msgs: Vec<_> = (0..40).map(|i| json!({"conversation_id":"c","from":"bob","type":1,"content":big(i)})).collect();
    let (s, v) = d.api(0).inner("/inner/send_msg_batch", json!({ "msgs": msgs })).await;
    assert_eq!(s, 200, "{v}");
    let ids: Vec<u64> =
        v["data"]["results"].as_array().unwrap().iter().map(|r| r["data"]["msg_id"].as_u64().unwrap()).collect();
    assert_eq!(ids, (2..42).collect::<Vec<_>>());

    let mut live = NotifyClient::connect(&d.api(1).public, &alice, Protocol::Sse, None).await.unwrap();
    assert_eq!(live.next(SOON).await.unwrap()["type"], "ready");
    let mut away = NotifyClient::connect(&d.api(0).public, &bob, Protocol::Ws, None).await.unwrap();
    away.next(SOON).await.unwrap();
    let away_cursor = away.drop_connection().unwrap();

    // Gateway 1 stalls while 800 × 12 KiB (9.6 MB) go through gateway 0: NATS cuts it as a
    // slow consumer, and it must read what it missed from the store, page by page.
    d.gateways[1].0.pause();
    let api = d.api(0).clone();
    let sent: Vec<u64> = futures::stream::iter(0..800)
        .map(|i| {
            let api = api.clone();
            async move {
                let (s, v) = api
                    .inner(
                        "/inner/send_msg",
                        json!({"conversation_id":"c","from":"bob","type":1,"content":big(100 + i)}),
                    )
                    .await;
                assert_eq!(s, 200, "{v}");
                v["data"]["msg_id"].as_u64().unwrap()
            }
        })
        .buffered(16)
        .collect()
        .await;
    assert_eq!(sent.len(), 800);
    tokio::time::sleep(Duration::from_secs(2)).await;
    d.gateways[1].0.resume();

    // Every message, once, in order, on the stalled node.
    let mut next = 42;
    while next <= 841 {
        let m = live.next_message(Duration::from_secs(60)).await.unwrap_or_else(|| panic!("stuck before {next}"));
        assert_eq!(m["msg_id"], next, "in order, once");
        next += 1;
    }
    assert!(metric(d.api(1), "quickim_hub_gap_filled_entries_total").await > 0.0, "the node filled a gap");
    d.api(1).wait_ready(SOON).await;
    let (s, _) = d.api(0).client(&bob, "/send_msg", json!({"conversation_id":"c","type":1,"content":"small"})).await;
    assert_eq!(s, 200);
    assert_eq!(live.next_message(SOON).await.unwrap()["content"], "small", "the node delivers live again");

    // A resume over the 800 large messages: replay pages within the bus's limit.
    let mut back = NotifyClient::connect(&d.api(1).public, &bob, Protocol::Poll, Some(&away_cursor)).await.unwrap();
    let replayed = messages(&mut back, 801).await;
    let ids: Vec<u64> = replayed.iter().map(|m| m["msg_id"].as_u64().unwrap()).collect();
    assert_eq!(ids, (42..=842).collect::<Vec<_>>());
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memberships_revocations_and_presence_are_paged() {
    let mut d = small_bus_cluster(2).await;
    let long = |i: usize| format!("{i:04}-{}", "c".repeat(110));

    // A user in 700 conversations whose ids take 115 characters: ≈ 90 KiB of memberships.
    let api = d.api(0).clone();
    futures::stream::iter(0..700)
        .for_each_concurrent(16, |i| {
            let api = api.clone();
            async move {
                api.conversation(&long(i), &["many", "bob"]).await;
            }
        })
        .await;
    let many = d.api(1).token("many", "web").await;
    let mut c = NotifyClient::connect(&d.api(1).public, &many, Protocol::Ws, None).await.unwrap();
    assert_eq!(c.next(SOON).await.unwrap()["type"], "ready");
    for i in [0, 350, 699] {
        crate::send(d.api(0), &long(i), "bob", &format!("to {i}")).await;
        assert_eq!(c.next_message(SOON).await.unwrap()["content"], format!("to {i}"));
    }

    // A membership change naming more users than its system message could carry over the
    // bus: refused, nothing stored.
    let crowd: Vec<String> = (0..600).map(|i| format!("{i:04}-{}", "m".repeat(110))).collect();
    let (s, v) = d
        .api(0)
        .inner("/inner/create_conversation", json!({"conversation_id":"crowd","conversation_type":1,"members":crowd}))
        .await;
    assert_eq!((s.as_u16(), v["code"].as_u64()), (413, Some(41301)), "{v}");
    let (s, v) = d
        .api(0)
        .inner("/inner/create_conversation", json!({"conversation_id":"crowd","conversation_type":1,"members":["a"]}))
        .await;
    assert_eq!((s.as_u16(), v["data"]["created"].as_bool()), (200, Some(true)), "nothing was stored: {v}");

    // 600 users online with 120-character ids (≈ 90 KiB of presence in one answer).
    let user = |i: usize| format!("{i:04}-{}", "u".repeat(115));
    let mut online = Vec::new();
    for i in 0..600 {
        let t = d.api(0).token(&user(i), "web").await;
        let mut s = NotifyClient::connect(&d.api(i % 2).public, &t, Protocol::Sse, None).await.unwrap();
        s.next(SOON).await.unwrap();
        online.push(s);
    }
    let ids: Vec<String> = (0..600).map(user).chain(["offline".to_string()]).collect();
    let (s, v) = d.api(0).inner("/inner/get_users_online", json!({ "user_ids": ids })).await;
    assert_eq!(s, 200, "{v}");
    let users = v["data"]["users"].as_array().unwrap();
    assert_eq!(users.len(), 601);
    assert!(users[..600].iter().all(|u| u["online"] == true && u["connections"] == 1), "{v}");
    assert_eq!(users[600]["online"], false);
    assert_eq!(v["data"]["nodes"], 2);
    drop(online);

    // 900 users seen offline, with 120-character ids (≈ 130 KiB of last_seen): asked in pages.
    let gone = |i: usize| format!("{i:04}-{}", "g".repeat(115));
    d.pg.as_ref()
        .unwrap()
        .execute(
            "INSERT INTO user_presence (user_id, last_seen, online_at, changed_at) \
             SELECT lpad(g::text, 4, '0') || '-' || repeat('g', 115), 1000 + g, 0, 1000 + g FROM generate_series(0, 899) g",
        )
        .await;
    let ids: Vec<String> = (0..900).map(gone).collect();
    let (s, v) = d.api(1).inner("/inner/get_users_online", json!({ "user_ids": ids })).await;
    assert_eq!(s, 200, "{v}");
    let users = v["data"]["users"].as_array().unwrap();
    assert!(users.iter().enumerate().all(|(i, u)| u["last_seen"] == 1000 + i as i64), "{v}");

    // 100,000 revoked users (≈ 5 MB of revocations) and a real kick: a new gateway loads
    // them all before it is ready, and refuses the kicked token.
    let old = d.api(0).token("kicked", "web").await;
    let (s, v) = d.api(0).inner("/inner/kick_user", json!({"user_id":"kicked"})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!((v["data"]["nodes_asked"].as_u64(), v["data"]["nodes_confirmed"].as_u64()), (Some(2), Some(2)));
    let pg = d.pg.as_ref().unwrap();
    pg.execute(
        "INSERT INTO revocations (user_id, platform, before_ms) SELECT 'revoked-user-' || g, '', \
         (extract(epoch from now()) * 1000)::bigint FROM generate_series(1, 100000) g",
    )
    .await;
    let i = d.add_gateway().await;
    let (s, v) = d.api(i).client(&old, "/get_joined_conversation", json!({})).await;
    assert_eq!((s.as_u16(), v["error"].as_str()), (401, Some("token revoked")), "{v}");
    let fresh = d.api(i).token("kicked", "web").await;
    let (s, _) = d.api(i).client(&fresh, "/get_joined_conversation", json!({})).await;
    assert_eq!(s, 200);
    d.finish().await;
}
