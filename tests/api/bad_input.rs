//! Every class of bad input gets a clear 4xx with its code, and changes nothing.

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use quickim_testkit::{Standalone, TEST_JWT_SECRET};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::BIN;

fn code(v: &Value) -> i64 {
    v["code"].as_i64().unwrap_or(-1)
}

fn token_with(secret: &str, claims: Value) -> String {
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret.as_bytes())).unwrap()
}

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

#[tokio::test]
async fn malformed_requests_are_400_and_change_nothing() {
    let q = Standalone::start(BIN, &[]).await;
    let api = &q.api;
    api.conversation("c", &["alice"]).await;
    let t = api.token("alice", "web").await;
    let long = "x".repeat(129);
    let cases: Vec<(&str, String)> = vec![
        ("malformed JSON", "{\"conversation_id\":".into()),
        ("empty body", "".into()),
        ("not an object", "[1,2]".into()),
        ("unknown field", json!({"conversation_id":"c","type":1,"content":"x","from":"mallory"}).to_string()),
        ("wrong type", json!({"conversation_id":"c","type":"one","content":"x"}).to_string()),
        ("missing field", json!({"conversation_id":"c","type":1}).to_string()),
        ("null field", json!({"conversation_id":null,"type":1,"content":"x"}).to_string()),
        ("over-long id", json!({"conversation_id":long,"type":1,"content":"x"}).to_string()),
        ("bad id characters", json!({"conversation_id":"a/b","type":1,"content":"x"}).to_string()),
        ("empty id", json!({"conversation_id":"","type":1,"content":"x"}).to_string()),
        ("negative type", json!({"conversation_id":"c","type":-1,"content":"x"}).to_string()),
        ("type out of i32", json!({"conversation_id":"c","type":4_294_967_296i64,"content":"x"}).to_string()),
        (
            "bad client_msg_id",
            json!({"conversation_id":"c","type":1,"content":"x","client_msg_id":"has space"}).to_string(),
        ),
        (
            "over-long client_msg_id",
            json!({"conversation_id":"c","type":1,"content":"x","client_msg_id":long}).to_string(),
        ),
    ];
    for (what, body) in cases {
        let (s, v) = api.raw(Some(&t), "/send_msg", body).await;
        assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, 40000), "{what}: {v}");
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{what}: a human message");
    }
    for (path, body) in [
        ("/get_joined_conversation", json!({"limit":0})),
        ("/get_joined_conversation", json!({"limit":101})),
        ("/get_joined_conversation", json!({"cursor":"not-a-cursor"})),
        ("/get_conversation_msg_by_range", json!({"conversation_id":"c","start_msg_id":5,"end_msg_id":4})),
        ("/get_conversation_msg_by_range", json!({"conversation_id":"c","start_msg_id":-1,"end_msg_id":4})),
        ("/mark_read", json!({"conversation_id":"c","msg_id":"3"})),
        ("/create_conversation", json!({"conversation_type":1.5})),
    ] {
        let (s, v) = api.client(&t, path, body.clone()).await;
        assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, 40000), "{path} {body}: {v}");
    }
    let (_, v) = api.client(&t, "/get_lastone_msgid", json!({"conversation_id":"c"})).await;
    assert_eq!(v["data"]["msg_id"], 1, "nothing was written");
}

#[tokio::test]
async fn oversize_content_and_bodies_are_413() {
    let q = Standalone::start(BIN, &[("QUICKIM_MAX_CONTENT_BYTES", "1000"), ("QUICKIM_MAX_BODY_BYTES", "4000")]).await;
    let api = &q.api;
    api.conversation("c", &["alice"]).await;
    let t = api.token("alice", "web").await;
    // exactly at the limit, in UTF-8 bytes (500 × "é" = 1000 bytes)
    let (s, _) = api.client(&t, "/send_msg", json!({"conversation_id":"c","type":1,"content":"é".repeat(500)})).await;
    assert_eq!(s, StatusCode::OK);
    let (s, v) = api.client(&t, "/send_msg", json!({"conversation_id":"c","type":1,"content":"é".repeat(501)})).await;
    assert_eq!((s, code(&v)), (StatusCode::PAYLOAD_TOO_LARGE, 41300), "{v}");
    let (s, v) = api.client(&t, "/send_msg", json!({"conversation_id":"c","type":1,"content":"x".repeat(5000)})).await;
    assert_eq!((s, code(&v)), (StatusCode::PAYLOAD_TOO_LARGE, 41302), "body limit: {v}");
    let (_, v) = api.client(&t, "/get_lastone_msgid", json!({"conversation_id":"c"})).await;
    assert_eq!(v["data"]["msg_id"], 2, "only the message within the limit was stored");
}

#[tokio::test]
async fn bad_tokens_are_401() {
    let q = Standalone::start(BIN, &[]).await;
    let api = &q.api;
    api.conversation("c", &["alice"]).await;
    let forged = token_with("some-other-secret-some-other-secret", json!({"sub":"alice","plt":"web","exp":now()+600}));
    let expired = token_with(TEST_JWT_SECRET, json!({"sub":"alice","plt":"web","iat":now()-7200,"exp":now()-3600}));
    let no_exp = token_with(TEST_JWT_SECRET, json!({"sub":"alice","plt":"web"}));
    let bad_sub = token_with(TEST_JWT_SECRET, json!({"sub":"a b","plt":"web","exp":now()+600}));
    let good = token_with(TEST_JWT_SECRET, json!({"sub":"alice","plt":"web","iat":now(),"exp":now()+600}));
    for (what, token) in [
        ("forged", forged.as_str()),
        ("expired", expired.as_str()),
        ("without exp", no_exp.as_str()),
        ("bad subject", bad_sub.as_str()),
        ("garbage", "abc.def.ghi"),
        ("alg none", "eyJhbGciOiJub25lIn0.eyJzdWIiOiJhbGljZSIsImV4cCI6OTk5OTk5OTk5OX0."),
    ] {
        let (s, v) = api.client(token, "/send_msg", json!({"conversation_id":"c","type":1,"content":"x"})).await;
        assert_eq!((s, code(&v)), (StatusCode::UNAUTHORIZED, 40100), "{what}: {v}");
    }
    let (s, v) = api.raw(None, "/send_msg", json!({"conversation_id":"c","type":1,"content":"x"}).to_string()).await;
    assert_eq!((s, code(&v)), (StatusCode::UNAUTHORIZED, 40100));
    assert_eq!(v["error"], "missing token");
    // ?token= works where headers cannot be set; the header wins when both are given.
    let resp = api
        .http
        .post(format!("{}/get_lastone_msgid?token={good}", api.public))
        .body(json!({"conversation_id":"c"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let (_, v) = api.client(&good, "/get_lastone_msgid", json!({"conversation_id":"c"})).await;
    assert_eq!(v["data"]["msg_id"], 1, "none of the bad requests stored anything");
}

#[tokio::test]
async fn inner_routes_need_the_inner_key_and_valid_lists() {
    let q = Standalone::start(BIN, &[]).await;
    let api = &q.api;
    for key in [None, Some("wrong-key-wrong-key"), Some("")] {
        let mut req = api
            .http
            .post(format!("{}/inner/get_token", api.inner))
            .body(json!({"user_id":"a","platform":"web"}).to_string());
        if let Some(k) = key {
            req = req.header("Authorization", format!("Bearer {k}"));
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "key {key:?}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(code(&v), 40100);
    }
    // A client token is not an inner key.
    let t = api.token("a", "web").await;
    let resp = api.http.post(format!("{}/inner/get_token", api.inner)).bearer_auth(&t).body("{}").send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let too_many: Vec<String> = (0..1001).map(|i| format!("u{i}")).collect();
    for (path, body) in [
        ("/inner/get_token", json!({"user_id":"a","platform":"web","ttl_s":0})),
        ("/inner/get_token", json!({"user_id":"bad id","platform":"web"})),
        ("/inner/get_token", json!({"user_id":"a","platform":"p".repeat(33)})),
        ("/inner/create_conversation", json!({"conversation_type":1,"members":[]})),
        ("/inner/create_conversation", json!({"conversation_type":1,"members":["ok","bad id"]})),
        ("/inner/join_conversation", json!({"conversation_id":"c","user_ids":[]})),
        ("/inner/kickout_conversation", json!({"conversation_id":"c","user_ids":[]})),
        ("/inner/set_archive_conversations", json!({"conversation_ids":[],"archived":true})),
        ("/inner/send_msg_batch", json!({"msgs":[]})),
        ("/inner/kick_user", json!({"user_id":""})),
        ("/inner/send_msg", json!({"conversation_id":"c","from":"a","type":1,"content":"x","extra":1})),
    ] {
        let (s, v) = api.inner(path, body).await;
        assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, 40000), "{path}: {v}");
    }
    let (s, v) = api.inner("/inner/join_conversation", json!({"conversation_id":"nope","user_ids":["a"]})).await;
    assert_eq!((s, code(&v)), (StatusCode::NOT_FOUND, 40400), "{v}");
    // Lists over their limits: too_many_items, whichever list.
    let batch: Vec<Value> =
        (0..501).map(|_| json!({"conversation_id":"c","from":"a","type":1,"content":"x"})).collect();
    let conversations: Vec<String> = (0..1001).map(|i| format!("c{i}")).collect();
    for (path, body) in [
        ("/inner/get_users_online", json!({"user_ids":too_many})),
        ("/inner/create_conversation", json!({"conversation_type":1,"members":too_many})),
        ("/inner/join_conversation", json!({"conversation_id":"c","user_ids":too_many})),
        ("/inner/kickout_conversation", json!({"conversation_id":"c","user_ids":too_many})),
        ("/inner/set_archive_conversations", json!({"conversation_ids":conversations,"archived":true})),
        ("/inner/send_msg_batch", json!({"msgs":batch})),
    ] {
        let (s, v) = api.inner(path, body).await;
        assert_eq!((s, code(&v)), (StatusCode::BAD_REQUEST, 40002), "{path}: {v}");
    }
}

/// 41 members send at once, one of them a content with U+0000 (which PostgreSQL cannot
/// keep): 40 × 200 and one 400, on both stores; the same inside a batch.
async fn one_bad_send_among_many(api: &quickim_testkit::Api) {
    let users: Vec<String> = (0..41).map(|i| format!("m{i}")).collect();
    let members: Vec<&str> = users.iter().map(String::as_str).collect();
    api.conversation("crowd", &members).await;
    let mut tokens = Vec::new();
    for u in &users {
        tokens.push(api.token(u, "web").await);
    }
    let sends = tokens.iter().enumerate().map(|(i, t)| {
        let content = if i == 20 { "bad\u{0}nul".to_string() } else { format!("fine {i}") };
        async move { api.client(t, "/send_msg", json!({"conversation_id":"crowd","type":1,"content":content})).await }
    });
    let answers = futures::future::join_all(sends).await;
    for (i, (s, v)) in answers.iter().enumerate() {
        if i == 20 {
            assert_eq!((*s, code(v)), (StatusCode::BAD_REQUEST, 40001), "{v}");
        } else {
            assert_eq!(*s, StatusCode::OK, "an innocent send failed: {v}");
        }
    }
    let msgs: Vec<Value> = (0..5)
        .map(|i| {
            let content = if i == 2 { "x\u{0}".to_string() } else { format!("b{i}") };
            json!({"conversation_id":"crowd","from":"m0","type":1,"content":content})
        })
        .collect();
    let (s, v) = api.inner("/inner/send_msg_batch", json!({ "msgs": msgs })).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let codes: Vec<i64> = v["data"]["results"].as_array().unwrap().iter().map(code).collect();
    assert_eq!(codes, vec![0, 0, 40001, 0, 0]);
    let (_, v) = api.client(&tokens[0], "/get_lastone_msgid", json!({"conversation_id":"crowd"})).await;
    assert_eq!(v["data"]["msg_id"], 1 + 40 + 4, "the 44 valid messages, gap-free");
}

#[tokio::test]
async fn one_bad_send_never_fails_another_users_send_standalone() {
    let q = Standalone::start(BIN, &[]).await;
    one_bad_send_among_many(&q.api).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_bad_send_never_fails_another_users_send_distributed() {
    let d = quickim_testkit::Distributed::start(BIN, 1, 2, 1, &[]).await;
    one_bad_send_among_many(d.api(0)).await;
    d.finish().await;
}

/// Every public route that names a conversation answers a non-member 403 `not_member`,
/// whatever the conversation's state — or that it does not exist.
#[tokio::test]
async fn non_members_get_not_member_whatever_the_state() {
    let q = Standalone::start(BIN, &[("QUICKIM_MAX_MEMBERS", "2")]).await;
    let api = &q.api;
    api.conversation("active", &["owner"]).await;
    api.conversation("archived", &["owner", "left"]).await;
    api.conversation("full", &["owner", "kicked"]).await;
    let (s, _) =
        api.inner("/inner/set_archive_conversations", json!({"conversation_ids":["archived"],"archived":true})).await;
    assert_eq!(s, 200);
    let left = api.token("left", "web").await;
    let (s, _) = api.client(&left, "/leave_conversation", json!({"conversation_id":"archived"})).await;
    assert_eq!(s, 200);
    let (s, _) =
        api.inner("/inner/kickout_conversation", json!({"conversation_id":"full","user_ids":["kicked"]})).await;
    assert_eq!(s, 200);
    let (s, _) = api.inner("/inner/join_conversation", json!({"conversation_id":"full","user_ids":["second"]})).await;
    assert_eq!(s, 200);
    let (s, v) = api.inner("/inner/join_conversation", json!({"conversation_id":"full","user_ids":["third"]})).await;
    assert_eq!((s, code(&v)), (StatusCode::CONFLICT, 40902), "full: {v}");

    let stranger = api.token("stranger", "web").await;
    let kicked = api.token("kicked", "web").await;
    let routes: Vec<(&str, Value)> = vec![
        ("/send_msg", json!({"type":1,"content":"x"})),
        ("/get_conversation_detail", json!({})),
        ("/join_conversation", json!({})),
        ("/leave_conversation", json!({})),
        ("/get_lastone_msgid", json!({})),
        ("/mark_read", json!({"msg_id":1})),
        ("/get_conversation_msg_by_range", json!({"start_msg_id":1,"end_msg_id":5})),
        ("/get_conversation_30msg_before_the_id", json!({"msg_id":5})),
        ("/get_conversation_30msg_after_the_id", json!({"msg_id":0})),
        ("/get_conversation_last_30_msg", json!({})),
        ("/get_conversation_lastone_msg", json!({})),
    ];
    for (who, token) in [("never a member", &stranger), ("left", &left), ("kicked", &kicked)] {
        for conversation in ["active", "archived", "full", "unknown"] {
            for (path, body) in &routes {
                let mut body = body.clone();
                body["conversation_id"] = json!(conversation);
                let (s, v) = api.client(token, path, body).await;
                assert_eq!((s, code(&v)), (StatusCode::FORBIDDEN, 40301), "{who}, {conversation}, {path}: {v}");
            }
            let (s, v) = api.client(token, "/check_joined_conversation", json!({"conversation_id":conversation})).await;
            assert_eq!((s, v["data"]["joined"].as_bool()), (StatusCode::OK, Some(false)), "{who}, {conversation}");
            // Over WebSocket too.
            let mut ws =
                quickim_testkit::NotifyClient::connect(&api.public, token, quickim_testkit::Protocol::Ws, None)
                    .await
                    .unwrap();
            ws.next(std::time::Duration::from_secs(10)).await.unwrap();
            ws.send_frame(json!({"type":"send","req_id":1,"conversation_id":conversation,"msg_type":1,"content":"x"}))
                .await;
            ws.send_frame(json!({"type":"mark_read","req_id":2,"conversation_id":conversation,"msg_id":1})).await;
            for _ in 0..2 {
                let e = ws.next(std::time::Duration::from_secs(10)).await.unwrap();
                assert_eq!(
                    (e["type"].as_str(), e["code"].as_i64()),
                    (Some("error"), Some(40301)),
                    "{who}, {conversation}: {e}"
                );
            }
        }
    }
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_in_the_envelope() {
    let q = Standalone::start(BIN, &[]).await;
    let api = &q.api;
    let resp = api.http.post(format!("{}/no_such_route", api.public)).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(code(&resp.json::<Value>().await.unwrap()), 40400);
    let resp = api.http.get(format!("{}/send_msg", api.public)).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(code(&resp.json::<Value>().await.unwrap()), 40500);
}
