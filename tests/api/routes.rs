//! Every route of SPEC section 3, standalone, end to end.

use std::time::Duration;

use quickim_testkit::Standalone;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::BIN;

fn code(v: &Value) -> i64 {
    v["code"].as_i64().unwrap_or(-1)
}

#[tokio::test]
async fn client_and_inner_routes_work_end_to_end() {
    let q = Standalone::start(BIN, &[]).await;
    let api = &q.api;
    let alice = api.token("alice", "web").await;
    let bob = api.token("bob", "ios").await;
    let carol = api.token("carol", "web").await;

    // inner create: alice owns it, bob is a member.
    let (s, v) = api
        .inner(
            "/inner/create_conversation",
            json!({"conversation_id":"c1","conversation_type":3,"members":["bob"],"owner":"alice"}),
        )
        .await;
    assert_eq!((s, v["data"]["created"].as_bool()), (StatusCode::OK, Some(true)), "{v}");
    let (_, v) = api
        .inner(
            "/inner/create_conversation",
            json!({"conversation_id":"c1","conversation_type":3,"members":["bob"],"owner":"alice"}),
        )
        .await;
    assert_eq!(v["data"]["created"], false, "same members again is idempotent: {v}");
    let (s, v) = api
        .inner("/inner/create_conversation", json!({"conversation_id":"c1","conversation_type":3,"members":["carol"]}))
        .await;
    assert_eq!((s, code(&v)), (StatusCode::CONFLICT, 40900));

    // detail and membership checks
    let (s, v) = api.client(&bob, "/get_conversation_detail", json!({"conversation_id":"c1"})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["data"]["conversation_type"], 3);
    let members: Vec<&str> =
        v["data"]["members"].as_array().unwrap().iter().map(|m| m["user_id"].as_str().unwrap()).collect();
    assert_eq!(members.len(), 2);
    assert!(members.contains(&"alice") && members.contains(&"bob"));
    let (_, v) = api.client(&carol, "/check_joined_conversation", json!({"conversation_id":"c1"})).await;
    assert_eq!(v["data"]["joined"], false);
    let (_, v) = api.client(&alice, "/check_joined_conversation", json!({"conversation_id":"c1"})).await;
    assert_eq!(v["data"]["joined"], true);

    // send, idempotent retry, non-member send
    let (s, v) = api
        .client(&alice, "/send_msg", json!({"conversation_id":"c1","type":1,"content":"hello","client_msg_id":"k1"}))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let first = v["data"].clone();
    assert_eq!(first["msg_id"], 2);
    assert_eq!(first["from"], "alice");
    assert!(first["send_time"].as_i64().unwrap() > 0);
    let (_, v) = api
        .client(&alice, "/send_msg", json!({"conversation_id":"c1","type":1,"content":"hello","client_msg_id":"k1"}))
        .await;
    assert_eq!(v["data"], first, "a retry answers the original");
    let (s, v) = api
        .client(&alice, "/send_msg", json!({"conversation_id":"c1","type":1,"content":"other","client_msg_id":"k1"}))
        .await;
    assert_eq!((s, code(&v)), (StatusCode::CONFLICT, 40900));
    let (s, v) = api.client(&carol, "/send_msg", json!({"conversation_id":"c1","type":1,"content":"x"})).await;
    assert_eq!((s, code(&v)), (StatusCode::FORBIDDEN, 40301));
    for i in 0..40 {
        let (s, _) =
            api.client(&bob, "/send_msg", json!({"conversation_id":"c1","type":2,"content":format!("m{i}")})).await;
        assert_eq!(s, StatusCode::OK);
    }
    // msg ids: 1 created, 2 hello, 3..=42 bob's

    // history routes
    let ids = |v: &Value| {
        v["data"]["msgs"].as_array().unwrap().iter().map(|m| m["msg_id"].as_u64().unwrap()).collect::<Vec<_>>()
    };
    let (_, v) = api
        .client(&bob, "/get_conversation_msg_by_range", json!({"conversation_id":"c1","start_msg_id":2,"end_msg_id":4}))
        .await;
    assert_eq!(ids(&v), vec![2, 3, 4]);
    let (_, v) = api
        .client(
            &bob,
            "/get_conversation_msg_by_range",
            json!({"conversation_id":"c1","start_msg_id":2,"end_msg_id":4,"desc":true}),
        )
        .await;
    assert_eq!(ids(&v), vec![4, 3, 2]);
    let (_, v) =
        api.client(&bob, "/get_conversation_30msg_before_the_id", json!({"conversation_id":"c1","msg_id":10})).await;
    assert_eq!(ids(&v), (1..10).collect::<Vec<_>>());
    let (_, v) =
        api.client(&bob, "/get_conversation_30msg_after_the_id", json!({"conversation_id":"c1","msg_id":2})).await;
    assert_eq!(ids(&v), (3..33).collect::<Vec<_>>());
    let (_, v) = api
        .client(&bob, "/get_conversation_30msg_after_the_id", json!({"conversation_id":"c1","msg_id":2,"desc":true}))
        .await;
    assert_eq!(ids(&v), (3..33).rev().collect::<Vec<_>>());
    let (_, v) = api.client(&bob, "/get_conversation_last_30_msg", json!({"conversation_id":"c1"})).await;
    assert_eq!(ids(&v), (13..=42).collect::<Vec<_>>());
    let (_, v) = api.client(&bob, "/get_conversation_lastone_msg", json!({"conversation_id":"c1"})).await;
    assert_eq!(v["data"]["msg"]["content"], "m39");
    let (_, v) = api.client(&bob, "/get_lastone_msgid", json!({"conversation_id":"c1"})).await;
    assert_eq!(v["data"]["msg_id"], 42);

    // unread and mark_read
    let (_, v) = api.client(&alice, "/get_joined_conversation", json!({})).await;
    let c1 = &v["data"]["conversations"][0];
    assert_eq!(
        (c1["last_msg_id"].as_u64(), c1["read_msg_id"].as_u64(), c1["unread"].as_u64()),
        (Some(42), Some(2), Some(40)),
        "her own send moved her read position; bob's 40 are unread"
    );
    let (_, v) = api.client(&alice, "/mark_read", json!({"conversation_id":"c1","msg_id":40})).await;
    assert_eq!(v["data"]["read_msg_id"], 40);
    let (_, v) = api.client(&alice, "/get_joined_conversation", json!({"archived":false,"limit":10})).await;
    assert_eq!(v["data"]["conversations"][0]["unread"], 2);

    // client create: alone by default, others refused
    let (s, v) = api.client(&carol, "/create_conversation", json!({"conversation_type":1})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let own = v["data"]["conversation_id"].as_str().unwrap().to_string();
    let (_, v) = api.client(&carol, "/get_conversation_detail", json!({"conversation_id":own})).await;
    assert_eq!(v["data"]["members"][0]["role"], "owner");
    let (s, v) = api.client(&carol, "/create_conversation", json!({"conversation_type":1,"members":["alice"]})).await;
    assert_eq!((s, code(&v)), (StatusCode::FORBIDDEN, 40300));

    // self-join: joinable yes, private no
    api.inner(
        "/inner/create_conversation",
        json!({"conversation_id":"open","conversation_type":1,"joinable":true,"members":["alice"]}),
    )
    .await;
    let (s, v) = api.client(&carol, "/join_conversation", json!({"conversation_id":"open"})).await;
    assert_eq!((s, v["data"]["joined"].as_bool()), (StatusCode::OK, Some(true)));
    let (s, v) = api.client(&carol, "/join_conversation", json!({"conversation_id":"c1"})).await;
    assert_eq!((s, code(&v)), (StatusCode::FORBIDDEN, 40301));
    let (s, v) = api.client(&carol, "/leave_conversation", json!({"conversation_id":"open"})).await;
    assert_eq!((s, v["data"]["left"].as_bool()), (StatusCode::OK, Some(true)));
    let (s, _) = api.client(&carol, "/get_conversation_last_30_msg", json!({"conversation_id":"open"})).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "a member who left reads nothing");

    // inner join, kickout
    let (_, v) =
        api.inner("/inner/join_conversation", json!({"conversation_id":"c1","user_ids":["carol","alice"]})).await;
    assert_eq!(v["data"]["joined"], json!(["carol", "alice"]));
    let (_, v) = api.client(&carol, "/get_joined_conversation", json!({})).await;
    let c1 =
        v["data"]["conversations"].as_array().unwrap().iter().find(|c| c["conversation_id"] == "c1").unwrap().clone();
    assert_eq!(c1["unread"], 0, "a new member's unread starts at the join");
    let (_, v) = api
        .client(
            &carol,
            "/get_conversation_msg_by_range",
            json!({"conversation_id":"c1","start_msg_id":1,"end_msg_id":3}),
        )
        .await;
    assert_eq!(ids(&v), vec![1, 2, 3], "a new member reads the whole history");
    let (_, v) =
        api.inner("/inner/kickout_conversation", json!({"conversation_id":"c1","user_ids":["bob","nobody"]})).await;
    assert_eq!(v["data"]["kicked"], json!(["bob"]));
    let (s, _) = api.client(&bob, "/get_conversation_last_30_msg", json!({"conversation_id":"c1"})).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "a kicked member reads nothing");
    let (_, v) = api.client(&bob, "/check_joined_conversation", json!({"conversation_id":"c1"})).await;
    assert_eq!(v["data"]["joined"], false);

    // archive: clients can no longer send; /inner still can (system messages too)
    let (_, v) =
        api.inner("/inner/set_archive_conversations", json!({"conversation_ids":["c1","nope"],"archived":true})).await;
    assert_eq!(v["data"]["updated"], json!(["c1"]));
    let (s, v) = api.client(&alice, "/send_msg", json!({"conversation_id":"c1","type":1,"content":"late"})).await;
    assert_eq!((s, code(&v)), (StatusCode::CONFLICT, 40901));
    let (_, v) = api.client(&alice, "/get_joined_conversation", json!({"archived":true})).await;
    assert_eq!(v["data"]["conversations"].as_array().unwrap().len(), 1);
    let (s, v) = api
        .inner("/inner/send_msg", json!({"conversation_id":"c1","from":"","type":7,"content":"closed by agent"}))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["data"]["from"], "");

    // batch: one result per item, in order
    let (s, v) = api
        .inner(
            "/inner/send_msg_batch",
            json!({"msgs":[
                {"conversation_id":"c1","from":"alice","type":1,"content":"b1"},
                {"conversation_id":"c1","from":"bob","type":1,"content":"kicked"},
                {"conversation_id":"c1","from":"alice","type":-3,"content":"reserved"},
                {"conversation_id":"c1","from":"alice","type":1,"content":"b2","client_msg_id":"bk"}
            ]}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let r = v["data"]["results"].as_array().unwrap();
    assert_eq!(r.len(), 4);
    assert_eq!(
        (r[0]["code"].as_i64(), r[1]["code"].as_i64(), r[2]["code"].as_i64(), r[3]["code"].as_i64()),
        (Some(0), Some(40301), Some(40000), Some(0))
    );
    assert_eq!(r[3]["data"]["msg_id"].as_u64().unwrap(), r[0]["data"]["msg_id"].as_u64().unwrap() + 1);

    // presence and kick_user
    let (_, v) = api.inner("/inner/get_users_online", json!({"user_ids":["alice","zed"]})).await;
    assert_eq!(v["data"]["users"][0], json!({"user_id":"alice","online":false,"platforms":[],"connections":0}));
    assert_eq!(v["data"]["nodes"], 1);
    let (s, v) = api.inner("/inner/kick_user", json!({"user_id":"alice","platform":"web"})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let revoked_before = v["data"]["revoked_before"].as_i64().unwrap();
    let (s, v) = api.client(&alice, "/get_joined_conversation", json!({})).await;
    assert_eq!((s, code(&v)), (StatusCode::UNAUTHORIZED, 40100));
    // Tokens issued from `revoked_before` on are good (the kick's own millisecond is revoked).
    while quickim_shared_now_ms() < revoked_before {
        tokio::task::yield_now().await;
    }
    let fresh = api.token("alice", "web").await;
    let (s, _) = api.client(&fresh, "/get_joined_conversation", json!({})).await;
    assert_eq!(s, StatusCode::OK, "tokens issued after the kick work");

    // metrics: on the inner listener only, counted by route template
    let text = api.http.get(format!("{}/metrics", api.inner)).send().await.unwrap().text().await.unwrap();
    assert!(text.contains(r#"quickim_http_requests_total{route="/send_msg",status="200"}"#), "{text}");
    assert!(text.contains("quickim_http_request_duration_seconds_bucket"), "{text}");
    let public = api.http.get(format!("{}/metrics", api.public)).send().await.unwrap();
    assert_eq!(public.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn unknown_conversation_and_non_member_answer_alike() {
    let q = Standalone::start(BIN, &[]).await;
    let api = &q.api;
    api.conversation("private", &["alice"]).await;
    let mallory = api.token("mallory", "web").await;
    for id in ["private", "does-not-exist"] {
        for (path, body) in [
            ("/get_conversation_detail", json!({"conversation_id":id})),
            ("/get_conversation_last_30_msg", json!({"conversation_id":id})),
            ("/get_lastone_msgid", json!({"conversation_id":id})),
            ("/mark_read", json!({"conversation_id":id,"msg_id":1})),
            ("/send_msg", json!({"conversation_id":id,"type":1,"content":"x"})),
            ("/join_conversation", json!({"conversation_id":id})),
            ("/leave_conversation", json!({"conversation_id":id})),
        ] {
            let (s, v) = api.client(&mallory, path, body).await;
            assert_eq!((s, code(&v)), (StatusCode::FORBIDDEN, 40301), "{path} on {id}: {v}");
        }
        let (_, v) = api.client(&mallory, "/check_joined_conversation", json!({"conversation_id":id})).await;
        assert_eq!(v["data"]["joined"], false);
    }
}

#[tokio::test]
async fn openapi_is_served_and_every_documented_route_exists() {
    let q = Standalone::start(BIN, &[]).await;
    let api = &q.api;
    let served: Value =
        api.http.get(format!("{}/openapi.json", api.public)).send().await.unwrap().json().await.unwrap();
    let checked_in: Value = serde_json::from_str(include_str!("../../docs/openapi.json")).unwrap();
    assert_eq!(served, checked_in);
    let paths = served["paths"].as_object().unwrap();
    for (path, item) in paths {
        if item.get("post").is_none() {
            continue;
        }
        let base = if path.starts_with("/inner/") { &api.inner } else { &api.public };
        let resp = api.http.post(format!("{base}{path}")).body("{}").send().await.unwrap();
        assert_ne!(resp.status(), StatusCode::NOT_FOUND, "{path} is documented but not served");
        assert!(resp.status().is_client_error(), "{path} without credentials: {}", resp.status());
    }
    // The public listener does not serve /inner routes.
    let resp = api.http.post(format!("{}/inner/get_token", api.public)).body("{}").send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn restart_keeps_messages_and_sequences() {
    let mut q = Standalone::start(BIN, &[]).await;
    q.api.conversation("c", &["a"]).await;
    let a = q.api.token("a", "web").await;
    for i in 0..5 {
        q.api.client(&a, "/send_msg", json!({"conversation_id":"c","type":1,"content":format!("{i}")})).await;
    }
    q.restart().await;
    let (_, v) = q.api.client(&a, "/get_lastone_msgid", json!({"conversation_id":"c"})).await;
    assert_eq!(v["data"]["msg_id"], 6, "the token and the data survive a restart");
    let (_, v) = q.api.client(&a, "/send_msg", json!({"conversation_id":"c","type":1,"content":"after"})).await;
    assert_eq!(v["data"]["msg_id"], 7);
}

#[tokio::test]
async fn standalone_generates_and_keeps_its_secrets() {
    let data = tempfile::tempdir().unwrap();
    let public = format!("127.0.0.1:{}", quickim_testkit::free_port());
    let inner = format!("127.0.0.1:{}", quickim_testkit::free_port());
    let env: std::collections::HashMap<String, String> = [
        ("QUICKIM_DATA_DIR", data.path().display().to_string()),
        ("QUICKIM_PUBLIC_ADDR", public.clone()),
        ("QUICKIM_INNER_ADDR", inner.clone()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let mut p = quickim_testkit::Process::spawn(BIN, "gen-secrets", &[], &env, data.path());
    let key_path = data.path().join("inner_key");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !key_path.exists() {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let key = std::fs::read_to_string(&key_path).unwrap();
    let api = quickim_testkit::Api::new(&public, &inner, key.trim());
    api.wait_ready(Duration::from_secs(20)).await;
    assert!(p.log_text().contains(key.trim()), "the generated inner key is printed at start");
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key_path).unwrap().permissions());
    assert_eq!(mode & 0o077, 0, "secrets are private to the owner");
    let token = api.token("u", "web").await;
    assert_eq!(p.terminate(Duration::from_secs(20)), Some(0));
    let _p = quickim_testkit::Process::spawn(BIN, "gen-secrets-2", &[], &env, data.path());
    api.wait_ready(Duration::from_secs(20)).await;
    assert_eq!(std::fs::read_to_string(&key_path).unwrap(), key, "kept across restarts");
    let (s, _) = api.client(&token, "/get_joined_conversation", json!({})).await;
    assert_eq!(s, StatusCode::OK, "tokens stay valid: the JWT secret is kept too");
}

#[tokio::test]
async fn cors_allows_only_configured_origins() {
    let q = Standalone::start(BIN, &[("QUICKIM_CORS_ORIGINS", "https://app.example,https://desk.example")]).await;
    let api = &q.api;
    let preflight = |origin: &'static str| {
        api.http
            .request(reqwest::Method::OPTIONS, format!("{}/send_msg", api.public))
            .header("Origin", origin)
            .header("Access-Control-Request-Method", "POST")
            .header("Access-Control-Request-Headers", "authorization,content-type")
            .send()
    };
    let ok = preflight("https://desk.example").await.unwrap();
    assert_eq!(ok.headers().get("access-control-allow-origin").unwrap(), "https://desk.example");
    assert!(ok.headers().get("access-control-allow-credentials").is_none());
    let other = preflight("https://evil.example").await.unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none());
}

#[tokio::test]
async fn request_rate_is_limited_per_user() {
    let q = Standalone::start(BIN, &[("QUICKIM_RATE_LIMIT_PER_S", "1"), ("QUICKIM_RATE_LIMIT_BURST", "3")]).await;
    let api = &q.api;
    let a = api.token("a", "web").await;
    let b = api.token("b", "web").await;
    for _ in 0..3 {
        let (s, _) = api.client(&a, "/get_joined_conversation", json!({})).await;
        assert_eq!(s, StatusCode::OK);
    }
    let resp = api
        .http
        .post(format!("{}/get_joined_conversation", api.public))
        .bearer_auth(&a)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(resp.headers().get("retry-after").unwrap(), "1");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(code(&v), 42900);
    let (s, _) = api.client(&b, "/get_joined_conversation", json!({})).await;
    assert_eq!(s, StatusCode::OK, "another user is not limited");
}

fn quickim_shared_now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// The demo page's token route gives anyone a token: standalone on loopback only, never on a
/// distributed gateway (which serves no demo unless `demo` is set, and then without tokens).
#[tokio::test]
async fn demo_tokens_are_standalone_only() {
    let q = Standalone::start(BIN, &[]).await;
    let (s, v) = q.api.raw(None, "/demo/token", r#"{"user_id":"dora"}"#).await;
    assert_eq!((s, code(&v)), (StatusCode::OK, 0), "{v}");
    assert_eq!(v["data"]["conversation_id"], "demo-room");
    let token = v["data"]["token"].as_str().unwrap_or_default().to_string();
    let (_, v) = q.api.client(&token, "/check_joined_conversation", json!({"conversation_id":"demo-room"})).await;
    assert_eq!(v["data"]["joined"], true, "{v}");
    let (s, v) = q.api.raw(None, "/demo/token", r#"{"user_id":"bad id!"}"#).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    drop(q);

    let q = Standalone::start(BIN, &[("QUICKIM_DEMO", "false")]).await;
    let (s, _) = q.api.raw(None, "/demo/token", r#"{"user_id":"dora"}"#).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    drop(q);

    let pages = tempfile::tempdir().expect("tempdir");
    std::fs::write(pages.path().join("index.html"), "<!doctype html><title>demo</title>").expect("write");
    let dir = pages.path().to_string_lossy().to_string();
    let d = quickim_testkit::Distributed::start(BIN, 1, 1, 1, &[("QUICKIM_DEMO", "true"), ("QUICKIM_DEMO_DIR", &dir)])
        .await;
    let (s, _) = d.api(0).raw(None, "/demo/token", r#"{"user_id":"dora"}"#).await;
    // Only the page's files (GET /demo/{file}) are served there: no token route.
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED, "a distributed gateway gives no demo tokens");
    let get = |path: &str| d.api(0).http.get(format!("{}{path}", d.api(0).public)).send();
    let page = get("/demo/").await.expect("page");
    assert_eq!(page.status(), StatusCode::OK);
    assert_eq!(page.headers()["content-type"], "text/html; charset=utf-8");
    assert!(page.headers().contains_key("content-security-policy"));
    assert_eq!(page.text().await.unwrap_or_default(), "<!doctype html><title>demo</title>");
    for missing in ["/demo/nothing.js", "/demo/..%2Fsecret.js", "/demo/.hidden.js", "/demo/index.exe"] {
        assert_eq!(get(missing).await.expect("get").status(), StatusCode::NOT_FOUND, "{missing}");
    }
    d.finish().await;
}
