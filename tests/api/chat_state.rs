//! What a chat product needs around each message, through the real binary on both
//! deployments: edit, recall and delete (live, on resume over every transport, racing a
//! resume), conversation metadata and roles, the conversation list, unread by rule.

use std::collections::HashMap;
use std::time::Duration;

use quickim_testkit::{Api, Distributed, NotifyClient, Protocol, Standalone};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::BIN;

const WAIT: Duration = Duration::from_secs(15);

fn code(v: &Value) -> i64 {
    v["code"].as_i64().unwrap_or(-1)
}

async fn ok(answer: (StatusCode, Value)) -> Value {
    let (s, v) = answer;
    assert_eq!(s, StatusCode::OK, "{v}");
    v["data"].clone()
}

async fn send(api: &Api, token: &str, conversation: &str, content: &str) -> Value {
    ok(api.client(token, "/send_msg", json!({"conversation_id":conversation,"type":1,"content":content})).await).await
}

async fn history(api: &Api, token: &str, conversation: &str) -> Vec<Value> {
    let v = ok(api
        .client(
            token,
            "/get_conversation_msg_by_range",
            json!({"conversation_id":conversation,"start_msg_id":1,"end_msg_id":100}),
        )
        .await)
    .await;
    v["msgs"].as_array().unwrap().clone()
}

/// The revision entries (-6) of a history, as (msg_id, action, content).
fn revisions(msgs: &[Value]) -> Vec<(u64, String, Option<String>)> {
    msgs.iter()
        .filter(|m| m["type"] == -6)
        .map(|m| {
            let c: Value = serde_json::from_str(m["content"].as_str().unwrap()).unwrap();
            (
                c["msg_id"].as_u64().unwrap(),
                c["action"].as_str().unwrap().to_string(),
                c["content"].as_str().map(String::from),
            )
        })
        .collect()
}

async fn unread_of(api: &Api, token: &str, conversation: &str) -> u64 {
    let v = ok(api.client(token, "/get_joined_conversation", json!({"limit":100})).await).await;
    let c = v["conversations"].as_array().unwrap().iter().find(|c| c["conversation_id"] == conversation).cloned();
    c.unwrap_or_else(|| panic!("{conversation} not listed: {v}"))["unread"].as_u64().unwrap()
}

// ------------------------------------------------------------------ revisions

async fn edit_recall_delete(api: &Api) {
    let (alice, bob, carol) =
        (api.token("alice", "web").await, api.token("bob", "web").await, api.token("carol", "web").await);
    ok(api
        .inner(
            "/inner/create_conversation",
            json!({"conversation_id":"rev","conversation_type":1,"members":["bob"],"owner":"alice"}),
        )
        .await)
    .await;
    let m2 = send(api, &alice, "rev", "first draft").await;
    assert_eq!(m2["msg_id"], 2);
    send(api, &bob, "rev", "bob's").await;

    // Edit: the sender only, a user message only, an existing one.
    let edited =
        ok(api.client(&alice, "/edit_msg", json!({"conversation_id":"rev","msg_id":2,"content":"second draft"})).await)
            .await;
    assert_eq!((edited["content"].as_str(), edited["msg_id"].as_u64()), (Some("second draft"), Some(2)));
    assert!(edited["edited_at"].as_i64().unwrap() >= m2["send_time"].as_i64().unwrap());
    for (who, token, msg_id, want, wcode) in [
        ("someone else's", &bob, 2, StatusCode::FORBIDDEN, 40302),
        ("a non-member", &carol, 2, StatusCode::FORBIDDEN, 40301),
        ("a system message", &alice, 1, StatusCode::BAD_REQUEST, 40003),
        ("a message that does not exist", &alice, 999, StatusCode::NOT_FOUND, 40400),
    ] {
        let (s, v) =
            api.client(token, "/edit_msg", json!({"conversation_id":"rev","msg_id":msg_id,"content":"x"})).await;
        assert_eq!((s, code(&v)), (want, wcode), "editing {who}: {v}");
    }
    let (s, v) =
        api.client(&alice, "/edit_msg", json!({"conversation_id":"rev","msg_id":2,"content":"nul\u{0}"})).await;
    assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, 40001), "{v}");
    ok(api.client(&alice, "/edit_msg", json!({"conversation_id":"rev","msg_id":2,"content":"final"})).await).await;

    // Versions, to members only.
    let v = ok(api.client(&bob, "/get_msg_versions", json!({"conversation_id":"rev","msg_id":2})).await).await;
    let versions: Vec<(u64, &str)> = v["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| (x["version"].as_u64().unwrap(), x["content"].as_str().unwrap()))
        .collect();
    assert_eq!(versions, vec![(0, "first draft"), (1, "second draft"), (2, "final")]);
    let v = ok(api.client(&bob, "/get_msg_versions", json!({"conversation_id":"rev","msg_id":3})).await).await;
    assert_eq!(v["versions"].as_array().unwrap().len(), 1, "never edited: one version: {v}");
    let (s, v) = api.client(&carol, "/get_msg_versions", json!({"conversation_id":"rev","msg_id":2})).await;
    assert_eq!((s, code(&v)), (StatusCode::FORBIDDEN, 40301));
    let v = ok(api.inner("/inner/get_msg_versions", json!({"conversation_id":"rev","msg_id":2})).await).await;
    assert_eq!(v["versions"].as_array().unwrap().len(), 3);

    // History answers the latest state; each edit is an entry of its own.
    let msgs = history(api, &bob, "rev").await;
    assert_eq!(msgs[1]["content"], "final");
    assert_eq!(
        revisions(&msgs),
        vec![(2, "edit".into(), Some("second draft".into())), (2, "edit".into(), Some("final".into()))]
    );
    let ids: Vec<u64> = msgs.iter().map(|m| m["msg_id"].as_u64().unwrap()).collect();
    assert_eq!(ids, (1..=5).collect::<Vec<_>>(), "revisions take msg_ids, gap-free");

    // Recall: the content is gone from the store — the message, its versions, its edits.
    let recalled = ok(api.client(&alice, "/recall_msg", json!({"conversation_id":"rev","msg_id":2})).await).await;
    assert_eq!((recalled["recalled"].as_bool(), recalled["content"].as_str()), (Some(true), Some("")));
    let again = ok(api.client(&alice, "/recall_msg", json!({"conversation_id":"rev","msg_id":2})).await).await;
    assert_eq!(again, recalled, "a repeated recall answers the message unchanged");
    let (s, v) = api.client(&alice, "/edit_msg", json!({"conversation_id":"rev","msg_id":2,"content":"back"})).await;
    assert_eq!((s, code(&v)), (StatusCode::CONFLICT, 40903), "{v}");
    let (s, v) = api.client(&alice, "/delete_msg", json!({"conversation_id":"rev","msg_id":2})).await;
    assert_eq!((s, code(&v)), (StatusCode::CONFLICT, 40903), "{v}");
    let v = ok(api.client(&bob, "/get_msg_versions", json!({"conversation_id":"rev","msg_id":2})).await).await;
    assert!(v["versions"].as_array().unwrap().is_empty(), "{v}");
    let msgs = history(api, &bob, "rev").await;
    let all = serde_json::to_string(&msgs).unwrap();
    for gone in ["first draft", "second draft", "final"] {
        assert!(!all.contains(gone), "{gone:?} is still in the store: {all}");
    }
    assert_eq!(msgs[1]["recalled"], true);
    assert_eq!(
        revisions(&msgs),
        vec![(2, "edit".into(), None), (2, "edit".into(), None), (2, "recall".into(), None)],
        "the edit entries lost their content"
    );

    // Delete: a tombstone, any time, by the sender.
    let deleted = ok(api.client(&bob, "/delete_msg", json!({"conversation_id":"rev","msg_id":3})).await).await;
    assert_eq!(
        (deleted["deleted"].as_bool(), deleted["content"].as_str(), deleted["from"].as_str()),
        (Some(true), Some(""), Some("bob"))
    );
    ok(api.client(&bob, "/delete_msg", json!({"conversation_id":"rev","msg_id":3})).await).await;
    let (s, v) = api.client(&bob, "/recall_msg", json!({"conversation_id":"rev","msg_id":3})).await;
    assert_eq!((s, code(&v)), (StatusCode::CONFLICT, 40903), "{v}");

    // The business system revises any message, e.g. an approval card.
    let card = ok(api
        .inner(
            "/inner/send_msg",
            json!({"conversation_id":"rev","from":"","type":7,"content":"{\"state\":\"pending\"}"}),
        )
        .await)
    .await;
    let id = card["msg_id"].as_u64().unwrap();
    let v = ok(api
        .inner("/inner/edit_msg", json!({"conversation_id":"rev","msg_id":id,"content":"{\"state\":\"approved\"}"}))
        .await)
    .await;
    assert_eq!(v["content"], "{\"state\":\"approved\"}");
    let (s, v) = api.client(&alice, "/edit_msg", json!({"conversation_id":"rev","msg_id":id,"content":"x"})).await;
    assert_eq!((s, code(&v)), (StatusCode::FORBIDDEN, 40302), "not alice's: {v}");
    let (s, v) = api.inner("/inner/edit_msg", json!({"conversation_id":"nope","msg_id":1,"content":"x"})).await;
    assert_eq!((s, code(&v)), (StatusCode::NOT_FOUND, 40400), "{v}");
    let (s, v) = api.inner("/inner/recall_msg", json!({"conversation_id":"rev","msg_id":1})).await;
    assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, 40003), "{v}");

    // Archived: members may not revise; the business system may.
    let mine = send(api, &alice, "rev", "before archiving").await;
    ok(api.inner("/inner/set_archive_conversations", json!({"conversation_ids":["rev"],"archived":true})).await).await;
    let (s, v) =
        api.client(&alice, "/edit_msg", json!({"conversation_id":"rev","msg_id":mine["msg_id"],"content":"x"})).await;
    assert_eq!((s, code(&v)), (StatusCode::CONFLICT, 40901), "{v}");
    ok(api.inner("/inner/delete_msg", json!({"conversation_id":"rev","msg_id":mine["msg_id"]})).await).await;
}

#[tokio::test]
async fn edit_recall_delete_standalone() {
    let q = Standalone::start(BIN, &[]).await;
    edit_recall_delete(&q.api).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn edit_recall_delete_distributed() {
    let d = Distributed::start(BIN, 1, 2, 1, &[]).await;
    edit_recall_delete(d.api(0)).await;
    d.finish().await;
}

#[tokio::test]
async fn revision_windows_close() {
    let q = Standalone::start(BIN, &[("QUICKIM_EDIT_WINDOW_S", "1"), ("QUICKIM_RECALL_WINDOW_S", "1")]).await;
    let api = &q.api;
    api.conversation("w", &["alice"]).await;
    let alice = api.token("alice", "web").await;
    let m = send(api, &alice, "w", "quick").await;
    ok(api.client(&alice, "/edit_msg", json!({"conversation_id":"w","msg_id":m["msg_id"],"content":"fixed"})).await)
        .await;
    // The windows are measured on the server's clock from the send: wait past one second.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    for (path, body) in [
        ("/edit_msg", json!({"conversation_id":"w","msg_id":m["msg_id"],"content":"late"})),
        ("/recall_msg", json!({"conversation_id":"w","msg_id":m["msg_id"]})),
    ] {
        let (s, v) = api.client(&alice, path, body).await;
        assert_eq!((s, code(&v)), (StatusCode::FORBIDDEN, 40304), "{path}: {v}");
        assert!(v["error"].as_str().unwrap().contains("within 1 s"), "{v}");
    }
    // Deleting has no window; the business system has none either.
    ok(api
        .inner("/inner/edit_msg", json!({"conversation_id":"w","msg_id":m["msg_id"],"content":"by the system"}))
        .await)
    .await;
    ok(api.client(&alice, "/delete_msg", json!({"conversation_id":"w","msg_id":m["msg_id"]})).await).await;
}

// ------------------------------------------------------------------ live and resume

/// Reads `n` message events; answers their messages.
async fn messages(client: &mut NotifyClient, n: usize) -> Vec<Value> {
    let mut out = Vec::new();
    while out.len() < n {
        let m = client
            .next_message(WAIT)
            .await
            .unwrap_or_else(|| panic!("{:?}: {} of {n} messages", client.protocol, out.len()));
        out.push(m);
    }
    out
}

async fn revisions_live_and_on_resume(api: &Api) {
    let alice = api.token("alice", "web").await;
    for protocol in Protocol::ALL {
        let conv = format!("live-{}", protocol.name());
        let bob = api.token(&format!("bob-{}", protocol.name()), "web").await;
        api.conversation(&conv, &["alice", &format!("bob-{}", protocol.name())]).await;
        let mut client = NotifyClient::connect(&api.public, &bob, protocol, None).await.unwrap();
        assert_eq!(client.next(WAIT).await.unwrap()["type"], "ready");

        // Live: the message, then its edit, in order.
        let m = send(api, &alice, &conv, "v1").await;
        let id = m["msg_id"].as_u64().unwrap();
        ok(api.client(&alice, "/edit_msg", json!({"conversation_id":conv,"msg_id":id,"content":"v2"})).await).await;
        let got = messages(&mut client, 2).await;
        assert_eq!((got[0]["msg_id"].as_u64(), got[0]["content"].as_str()), (Some(id), Some("v1")));
        assert_eq!(revisions(&got[1..]), vec![(id, "edit".into(), Some("v2".into()))], "{protocol:?}");

        // Away: a message edited then recalled, another edited; on resume each comes in its
        // latest state, followed by the revisions, exactly once and in order.
        let cursor = client.drop_connection();
        let a = send(api, &alice, &conv, "a1").await["msg_id"].as_u64().unwrap();
        let b = send(api, &alice, &conv, "b1").await["msg_id"].as_u64().unwrap();
        ok(api.client(&alice, "/edit_msg", json!({"conversation_id":conv,"msg_id":a,"content":"a2"})).await).await;
        ok(api.client(&alice, "/edit_msg", json!({"conversation_id":conv,"msg_id":b,"content":"b2"})).await).await;
        ok(api.client(&alice, "/recall_msg", json!({"conversation_id":conv,"msg_id":a})).await).await;
        let mut client = NotifyClient::connect(&api.public, &bob, protocol, cursor.as_deref()).await.unwrap();
        let got = messages(&mut client, 5).await;
        let ids: Vec<u64> = got.iter().map(|m| m["msg_id"].as_u64().unwrap()).collect();
        assert_eq!(ids, (a..a + 5).collect::<Vec<_>>(), "{protocol:?}: every entry once, in order");
        if protocol == Protocol::Poll {
            // The long-poll's session stays parked on the node (for a while) and holds the
            // entries as sent; the revisions after them bring the same state.
            assert!(got[0]["content"] == "a1" || got[0]["recalled"] == true, "{}", got[0]);
            assert!(got[1]["content"] == "b1" || got[1]["content"] == "b2", "{}", got[1]);
        } else {
            // Read from the store: each message in its latest state.
            assert_eq!(
                (got[0]["recalled"].as_bool(), got[0]["content"].as_str()),
                (Some(true), Some("")),
                "{protocol:?}"
            );
            assert_eq!((got[1]["content"].as_str(), got[1]["edited_at"].is_i64()), (Some("b2"), true), "{protocol:?}");
        }
        // The recall scrubbed the earlier edit's content from the store; held entries keep it.
        let mut revised = revisions(&got[2..]);
        if protocol == Protocol::Poll && revised[0].2.as_deref() == Some("a2") {
            revised[0].2 = None;
        }
        assert_eq!(
            revised,
            vec![(a, "edit".into(), None), (b, "edit".into(), Some("b2".into())), (a, "recall".into(), None)],
            "{protocol:?}"
        );
        assert!(client.next_message(Duration::from_millis(300)).await.is_none(), "{protocol:?}: nothing twice");
    }
}

#[tokio::test]
async fn revisions_live_and_on_resume_standalone() {
    let q = Standalone::start(BIN, &[]).await;
    revisions_live_and_on_resume(&q.api).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn revisions_live_and_on_resume_distributed() {
    let d = Distributed::start(BIN, 1, 2, 2, &[]).await;
    revisions_live_and_on_resume(d.api(1)).await;
    d.finish().await;
}

/// A recall committed while a client replays what it missed: whichever side of the recall
/// the replay read the message on, the client gets every entry once, in order, the recall
/// entry after the message, and ends with the message recalled.
async fn recall_racing_a_resume(api: &Api) {
    let alice = api.token("alice", "web").await;
    for protocol in Protocol::ALL {
        let user = format!("reader-{}", protocol.name());
        let conv = format!("race-{}", protocol.name());
        api.conversation(&conv, &["alice", &user]).await;
        let token = api.token(&user, "web").await;
        let mut client = NotifyClient::connect(&api.public, &token, protocol, None).await.unwrap();
        assert_eq!(client.next(WAIT).await.unwrap()["type"], "ready");
        let cursor = client.drop_connection();
        let mut sent = Vec::new();
        for i in 0..300 {
            sent.push(send(api, &alice, &conv, &format!("m{i}")).await["msg_id"].as_u64().unwrap());
        }
        let target = sent[150];
        let (resumed, recall) = tokio::join!(
            NotifyClient::connect(&api.public, &token, protocol, cursor.as_deref()),
            api.client(&alice, "/recall_msg", json!({"conversation_id":conv,"msg_id":target})),
        );
        assert_eq!(recall.0, StatusCode::OK, "{}", recall.1);
        let mut client = resumed.unwrap();
        let got = messages(&mut client, 301).await;
        let ids: Vec<u64> = got.iter().map(|m| m["msg_id"].as_u64().unwrap()).collect();
        assert_eq!(ids, (sent[0]..=sent[299] + 1).collect::<Vec<_>>(), "{protocol:?}: once each, in order");
        let at = got.iter().position(|m| m["msg_id"] == target).unwrap();
        let original = &got[at];
        assert!(
            original["content"] == format!("m{}", 150) || original["recalled"] == true,
            "{protocol:?}: the message as sent or as recalled: {original}"
        );
        assert_eq!(revisions(&got[at + 1..]), vec![(target, "recall".into(), None)], "{protocol:?}: then its recall");
    }
}

#[tokio::test]
async fn recall_racing_a_resume_standalone() {
    let q = Standalone::start(BIN, &[("QUICKIM_RATE_LIMIT_PER_S", "0")]).await;
    recall_racing_a_resume(&q.api).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn recall_racing_a_resume_distributed() {
    let d = Distributed::start(BIN, 1, 2, 1, &[("QUICKIM_RATE_LIMIT_PER_S", "0")]).await;
    recall_racing_a_resume(d.api(0)).await;
    d.finish().await;
}

// ------------------------------------------------------------------ metadata and roles

async fn metadata_and_roles(api: &Api) {
    let (alice, bob) = (api.token("alice", "web").await, api.token("bob", "web").await);
    let create = json!({"conversation_id":"meta","conversation_type":2,"members":["bob","carol"],"owner":"alice",
        "title":"Support #1","avatar":"https://example.test/a.png","ext":{"ticket":42},"meta_role":"admin"});
    ok(api.inner("/inner/create_conversation", create.clone()).await).await;
    assert_eq!(ok(api.inner("/inner/create_conversation", create.clone()).await).await["created"], false);
    let mut other = create.clone();
    other["title"] = json!("Another");
    let (s, v) = api.inner("/inner/create_conversation", other).await;
    assert_eq!((s, code(&v)), (StatusCode::CONFLICT, 40900), "{v}");

    let d = ok(api.client(&bob, "/get_conversation_detail", json!({"conversation_id":"meta"})).await).await;
    assert_eq!(
        (d["title"].as_str(), d["avatar"].as_str(), d["ext"]["ticket"].as_i64(), d["meta_role"].as_str()),
        (Some("Support #1"), Some("https://example.test/a.png"), Some(42), Some("admin"))
    );
    let roles: HashMap<String, String> = d["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["user_id"].as_str().unwrap().to_string(), m["role"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(roles["alice"], "owner");
    assert_eq!(roles["bob"], "member");

    // A live client learns every change.
    let mut watcher =
        NotifyClient::connect(&api.public, &api.token("carol", "web").await, Protocol::Ws, None).await.unwrap();
    assert_eq!(watcher.next(WAIT).await.unwrap()["type"], "ready");

    let (s, v) = api.client(&bob, "/update_conversation", json!({"conversation_id":"meta","title":"mine"})).await;
    assert_eq!((s, code(&v)), (StatusCode::FORBIDDEN, 40303), "a member under meta_role admin: {v}");
    let v =
        ok(api.inner("/inner/set_member_role", json!({"conversation_id":"meta","user_id":"bob","role":"admin"})).await)
            .await;
    assert_eq!(v["changed"], json!([{"user_id":"bob","role":"admin"}]));
    let v =
        ok(api.inner("/inner/set_member_role", json!({"conversation_id":"meta","user_id":"bob","role":"admin"})).await)
            .await;
    assert_eq!(v["changed"], json!([]), "no change, no message");
    let m = ok(api
        .client(
            &bob,
            "/update_conversation",
            json!({"conversation_id":"meta","title":"Support #1 (urgent)","ext":{"ticket":42,"prio":1}}),
        )
        .await)
    .await;
    assert_eq!((m["title"].as_str(), m["ext"]["prio"].as_i64()), (Some("Support #1 (urgent)"), Some(1)));
    assert!(m["msg_id"].is_u64(), "{m}");
    let same = ok(api
        .client(&bob, "/update_conversation", json!({"conversation_id":"meta","title":"Support #1 (urgent)"}))
        .await)
    .await;
    assert!(same.get("msg_id").is_none(), "nothing changed, no message: {same}");
    let (s, v) = api.client(&bob, "/update_conversation", json!({"conversation_id":"meta","meta_role":"member"})).await;
    assert_eq!((s, code(&v)), (StatusCode::FORBIDDEN, 40300), "meta_role is the business system's: {v}");

    let live = messages(&mut watcher, 2).await;
    assert_eq!(live[0]["type"], -8);
    let roles: Value = serde_json::from_str(live[0]["content"].as_str().unwrap()).unwrap();
    assert_eq!(roles["roles"], json!([{"user_id":"bob","role":"admin"}]));
    assert_eq!(live[1]["type"], -7);
    let changed: Value = serde_json::from_str(live[1]["content"].as_str().unwrap()).unwrap();
    assert_eq!(changed, json!({"title":"Support #1 (urgent)","ext":{"ticket":42,"prio":1},"by":"bob"}));

    // A new owner makes the former one an admin.
    let v = ok(api
        .inner("/inner/set_member_role", json!({"conversation_id":"meta","user_id":"carol","role":"owner"}))
        .await)
    .await;
    assert_eq!(v["changed"], json!([{"user_id":"carol","role":"owner"},{"user_id":"alice","role":"admin"}]));
    let (s, v) =
        api.inner("/inner/set_member_role", json!({"conversation_id":"meta","user_id":"dave","role":"admin"})).await;
    assert_eq!((s, code(&v)), (StatusCode::FORBIDDEN, 40301), "{v}");
    let (s, v) =
        api.inner("/inner/set_member_role", json!({"conversation_id":"nope","user_id":"bob","role":"admin"})).await;
    assert_eq!((s, code(&v)), (StatusCode::NOT_FOUND, 40400), "{v}");

    // Limits, each with its code; nothing changes.
    for (body, want, wcode) in [
        (json!({"title":"t".repeat(257)}), StatusCode::PAYLOAD_TOO_LARGE, 41303),
        (json!({"avatar":"a".repeat(2049)}), StatusCode::PAYLOAD_TOO_LARGE, 41304),
        (json!({"ext":{"blob":"x".repeat(5000)}}), StatusCode::PAYLOAD_TOO_LARGE, 41305),
        (json!({"ext":[1,2]}), StatusCode::BAD_REQUEST, 40000),
        (json!({"title":"nul\u{0}"}), StatusCode::BAD_REQUEST, 40001),
        (json!({"ext":{"k":"nul\u{0}"}}), StatusCode::BAD_REQUEST, 40001),
    ] {
        let mut body = body;
        body["conversation_id"] = json!("meta");
        let (s, v) = api.inner("/inner/update_conversation", body.clone()).await;
        assert_eq!((s, code(&v)), (want, wcode), "{body}: {v}");
    }
    let (s, v) =
        api.client(&alice, "/create_conversation", json!({"conversation_type":1,"title":"t".repeat(300)})).await;
    assert_eq!((s, code(&v)), (StatusCode::PAYLOAD_TOO_LARGE, 41303), "{v}");
    let d = ok(api.client(&bob, "/get_conversation_detail", json!({"conversation_id":"meta"})).await).await;
    assert_eq!(d["title"], "Support #1 (urgent)", "refused changes changed nothing");

    // Only the business system again: members with any role are refused; clearing works.
    ok(api
        .inner("/inner/update_conversation", json!({"conversation_id":"meta","meta_role":"none","avatar":"","ext":{}}))
        .await)
    .await;
    let (s, v) = api.client(&bob, "/update_conversation", json!({"conversation_id":"meta","title":"x"})).await;
    assert_eq!((s, code(&v)), (StatusCode::FORBIDDEN, 40303), "{v}");
    let d = ok(api.client(&bob, "/get_conversation_detail", json!({"conversation_id":"meta"})).await).await;
    assert!(d.get("avatar").is_none() && d.get("ext").is_none(), "cleared: {d}");
    assert_eq!(d["meta_role"], "none");
    let (s, v) = api
        .client(
            &api.token("stranger", "web").await,
            "/update_conversation",
            json!({"conversation_id":"meta","title":"x"}),
        )
        .await;
    assert_eq!((s, code(&v)), (StatusCode::FORBIDDEN, 40301), "{v}");

    // A client's own conversation carries its metadata from the start.
    let c = ok(api
        .client(&alice, "/create_conversation", json!({"conversation_type":1,"title":"Notes","ext":{"pinned":true}}))
        .await)
    .await;
    let d =
        ok(api.client(&alice, "/get_conversation_detail", json!({"conversation_id":c["conversation_id"]})).await).await;
    assert_eq!((d["title"].as_str(), d["ext"]["pinned"].as_bool()), (Some("Notes"), Some(true)));
}

#[tokio::test]
async fn metadata_and_roles_standalone() {
    let q = Standalone::start(BIN, &[]).await;
    metadata_and_roles(&q.api).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metadata_and_roles_distributed() {
    let d = Distributed::start(BIN, 1, 1, 1, &[]).await;
    metadata_and_roles(d.api(0)).await;
    d.finish().await;
}

// ------------------------------------------------------------------ list and unread

async fn list_and_unread(api: &Api) {
    let (alice, bob) = (api.token("alice", "web").await, api.token("bob", "web").await);
    for c in ["u1", "u2", "u3"] {
        ok(api
            .inner(
                "/inner/create_conversation",
                json!({"conversation_id":c,"conversation_type":1,"members":["alice","bob"],"title":format!("T {c}")}),
            )
            .await)
        .await;
    }
    assert_eq!(unread_of(api, &alice, "u1").await, 0, "the creation message does not count");
    for i in 0..3 {
        send(api, &bob, "u1", &format!("b{i}")).await;
    }
    assert_eq!(unread_of(api, &alice, "u1").await, 3);
    assert_eq!(unread_of(api, &bob, "u1").await, 0, "one's own messages never count");
    let reply = send(api, &alice, "u1", "a reply").await;
    assert_eq!(unread_of(api, &alice, "u1").await, 0, "replying moves the read position");
    let v = ok(api.client(&alice, "/get_joined_conversation", json!({})).await).await;
    let u1 = v["conversations"].as_array().unwrap().iter().find(|c| c["conversation_id"] == "u1").unwrap().clone();
    assert_eq!(u1["read_msg_id"], reply["msg_id"]);
    let b3 = send(api, &bob, "u1", "b3").await;
    send(api, &bob, "u1", "b4").await;
    assert_eq!(unread_of(api, &alice, "u1").await, 2);

    // System messages and business notices by rule.
    ok(api.inner("/inner/join_conversation", json!({"conversation_id":"u1","user_ids":["carol"]})).await).await;
    ok(api.inner("/inner/kickout_conversation", json!({"conversation_id":"u1","user_ids":["carol"]})).await).await;
    ok(api
        .client(&bob, "/edit_msg", json!({"conversation_id":"u1","msg_id":b3["msg_id"],"content":"b3 (edited)"}))
        .await)
    .await;
    ok(api.inner("/inner/update_conversation", json!({"conversation_id":"u1","title":"renamed"})).await).await;
    ok(api
        .inner(
            "/inner/send_msg",
            json!({"conversation_id":"u1","from":"","type":9,"content":"quiet","count_unread":false}),
        )
        .await)
    .await;
    assert_eq!(unread_of(api, &alice, "u1").await, 2, "joins, kicks, edits, metadata and quiet notices do not count");
    ok(api.inner("/inner/send_msg", json!({"conversation_id":"u1","from":"","type":9,"content":"notice"})).await).await;
    assert_eq!(unread_of(api, &alice, "u1").await, 3, "a business notice counts");
    ok(api
        .inner("/inner/send_msg", json!({"conversation_id":"u1","from":"alice","type":1,"content":"in alice's name"}))
        .await)
    .await;
    assert_eq!(unread_of(api, &alice, "u1").await, 0, "a send in her name is hers");
    send(api, &bob, "u1", "b5").await;
    let r = ok(api.client(&alice, "/mark_read", json!({"conversation_id":"u1","msg_id":1})).await).await;
    assert_eq!(r["unread"], 1, "never moves back: {r}");
    let v = ok(api.client(&alice, "/get_lastone_msgid", json!({"conversation_id":"u1"})).await).await;
    let r = ok(api.client(&alice, "/mark_read", json!({"conversation_id":"u1","msg_id":v["msg_id"]})).await).await;
    assert_eq!((r["read_msg_id"].clone(), r["unread"].as_u64()), (v["msg_id"].clone(), Some(0)));
    let (s, v) = api.client(&alice, "/set_conversation_mute", json!({"conversation_id":"u1","muted":true})).await;
    assert_eq!((s, v["data"]["muted"].as_bool()), (StatusCode::OK, Some(true)));
    send(api, &bob, "u1", "b6").await;

    // The list renders in one call: metadata, last message in its latest state, unread,
    // mute, newest activity first; an edit is no activity.
    send(api, &bob, "u2", "u2 news").await;
    let v = ok(api.client(&alice, "/get_joined_conversation", json!({})).await).await;
    let list = v["conversations"].as_array().unwrap();
    let order: Vec<&str> = list.iter().map(|c| c["conversation_id"].as_str().unwrap()).collect();
    assert_eq!(order, vec!["u2", "u1", "u3"]);
    let u1 = &list[1];
    assert_eq!(
        (u1["title"].as_str(), u1["role"].as_str(), u1["muted"].as_bool(), u1["unread"].as_u64()),
        (Some("renamed"), Some("member"), Some(true), Some(1)),
        "{u1}"
    );
    assert_eq!(u1["last_msg"]["content"], "b6");
    let last_id = u1["last_msg"]["msg_id"].clone();
    ok(api.client(&bob, "/edit_msg", json!({"conversation_id":"u1","msg_id":last_id,"content":"b6 (edited)"})).await)
        .await;
    let v = ok(api.client(&alice, "/get_joined_conversation", json!({})).await).await;
    let list = v["conversations"].as_array().unwrap();
    assert_eq!(list[0]["conversation_id"], "u2", "the edit did not move u1 up");
    assert_eq!(
        (list[1]["last_msg"]["content"].as_str(), list[1]["last_msg"]["msg_id"].clone()),
        (Some("b6 (edited)"), last_id.clone()),
        "the last message in its latest state, not the revision"
    );
    ok(api.client(&bob, "/recall_msg", json!({"conversation_id":"u1","msg_id":last_id})).await).await;
    let v = ok(api.client(&alice, "/get_joined_conversation", json!({})).await).await;
    assert_eq!(v["conversations"][1]["last_msg"]["recalled"], true);
    assert_eq!(v["conversations"][2]["last_msg"]["type"], -1, "a conversation without messages shows its creation");

    // Paging, and the business system's views.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut body = json!({"limit":1});
        if let Some(c) = &cursor {
            body["cursor"] = json!(c);
        }
        let v = ok(api.client(&alice, "/get_joined_conversation", body).await).await;
        seen.extend(
            v["conversations"].as_array().unwrap().iter().map(|c| c["conversation_id"].as_str().unwrap().to_string()),
        );
        match v["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!(seen, vec!["u2", "u1", "u3"]);
    let mine = ok(api.client(&alice, "/get_joined_conversation", json!({})).await).await;
    let theirs = ok(api.inner("/inner/get_user_conversations", json!({"user_id":"alice"})).await).await;
    assert_eq!(mine, theirs, "/inner sees the user's list as the user does");
    let page = ok(api.inner("/inner/get_conversation_members", json!({"conversation_id":"u1","limit":1})).await).await;
    assert_eq!((page["member_count"].as_u64(), page["members"].as_array().unwrap().len()), (Some(2), 1));
    let next = ok(api
        .inner(
            "/inner/get_conversation_members",
            json!({"conversation_id":"u1","limit":1,"cursor":page["next_cursor"]}),
        )
        .await)
    .await;
    assert!(next.get("next_cursor").is_none(), "{next}");
    let both: Vec<Value> = [page["members"][0]["user_id"].clone(), next["members"][0]["user_id"].clone()].into();
    assert_eq!(both, vec![json!("alice"), json!("bob")]);
    let (s, v) = api.inner("/inner/get_conversation_members", json!({"conversation_id":"nope"})).await;
    assert_eq!((s, code(&v)), (StatusCode::NOT_FOUND, 40400), "{v}");
    let (s, v) = api
        .client(
            &api.token("stranger", "web").await,
            "/set_conversation_mute",
            json!({"conversation_id":"u1","muted":true}),
        )
        .await;
    assert_eq!((s, code(&v)), (StatusCode::FORBIDDEN, 40301), "{v}");
}

#[tokio::test]
async fn list_and_unread_standalone() {
    let q = Standalone::start(BIN, &[]).await;
    list_and_unread(&q.api).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn list_and_unread_distributed() {
    let d = Distributed::start(BIN, 1, 2, 1, &[]).await;
    list_and_unread(d.api(0)).await;
    d.finish().await;
}

#[tokio::test]
async fn configured_system_types_count_as_unread() {
    let q = Standalone::start(BIN, &[("QUICKIM_UNREAD_SYSTEM_TYPES", "-2,-6")]).await;
    let api = &q.api;
    api.conversation("cfg", &["alice", "bob"]).await;
    let (alice, bob) = (api.token("alice", "web").await, api.token("bob", "web").await);
    ok(api.inner("/inner/join_conversation", json!({"conversation_id":"cfg","user_ids":["carol"]})).await).await;
    assert_eq!(unread_of(api, &alice, "cfg").await, 1, "joins count when configured");
    let m = send(api, &bob, "cfg", "x").await;
    ok(api.client(&bob, "/edit_msg", json!({"conversation_id":"cfg","msg_id":m["msg_id"],"content":"y"})).await).await;
    assert_eq!(unread_of(api, &alice, "cfg").await, 3, "the message and its edit");
    ok(api.inner("/inner/kickout_conversation", json!({"conversation_id":"cfg","user_ids":["carol"]})).await).await;
    assert_eq!(unread_of(api, &alice, "cfg").await, 3, "kicks are not listed");
}

#[tokio::test]
async fn a_non_system_type_in_the_unread_rule_stops_the_start() {
    let data = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(BIN)
        .args(["standalone"])
        .env("QUICKIM_DATA_DIR", data.path())
        .env("QUICKIM_UNREAD_SYSTEM_TYPES", "-2,5")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unread_system_types"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
