//! The before_send hook against a real HTTP receiver started here: accept, reject, rewrite,
//! a receiver too slow (fail open, and fail closed), signatures checked by an independent
//! implementation (Python's hmac), /inner sends never asked; on both deployments.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use quickim_testkit::{Api, Distributed, NotifyClient, Protocol, Standalone};
use serde_json::{Value, json};

use crate::BIN;
use crate::receiver::{Got, receiver};

pub const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// The hook's verdicts: by content ("slow" answers after the hook's timeout).
fn verdict(got: &Got) -> (u16, String, Option<Duration>) {
    let content = got.json()["content"].as_str().unwrap_or_default().to_string();
    let (body, delay) = match content.as_str() {
        "spam" => (json!({"action":"reject","reason":"no spam here"}), None),
        "darn" => (json!({"action":"rewrite","content":"d**n"}), None),
        "slow" => (json!({"action":"accept"}), Some(Duration::from_millis(1500))),
        _ => (json!({"action":"accept"}), None),
    };
    (200, body.to_string(), delay)
}

/// Checks a signature with Python's hmac: an implementation independent of ours.
pub fn python_signature(id: &str, timestamp: &str, body: &[u8]) -> String {
    let script = "import base64,hashlib,hmac,sys\n\
        key = base64.b64decode(sys.argv[1].split('_', 1)[1])\n\
        msg = sys.argv[2].encode() + b'.' + sys.argv[3].encode() + b'.' + sys.stdin.buffer.read()\n\
        print('v1,' + base64.b64encode(hmac.new(key, msg, hashlib.sha256).digest()).decode())";
    let mut child = std::process::Command::new("python3")
        .args(["-c", script, SECRET, id, timestamp])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), body).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn hook_env(url: &str, fail_open: bool) -> Vec<(&'static str, String)> {
    vec![
        ("QUICKIM_BEFORE_SEND_URL", url.to_string()),
        ("QUICKIM_BEFORE_SEND_TIMEOUT_MS", "500".to_string()),
        ("QUICKIM_BEFORE_SEND_FAIL_OPEN", fail_open.to_string()),
        ("QUICKIM_HOOK_SECRET", SECRET.to_string()),
    ]
}

async fn send(api: &Api, token: &str, content: &str) -> (u16, Value) {
    let (s, v) = api.client(token, "/send_msg", json!({"conversation_id":"h","type":1,"content":content})).await;
    (s.as_u16(), v)
}

async fn accept_reject_rewrite(api: &Api, got: &Arc<Mutex<Vec<Got>>>) {
    api.conversation("h", &["alice", "bob"]).await;
    let t = api.token("alice", "web").await;
    let (s, v) = send(api, &t, "hello").await;
    assert_eq!((s, v["data"]["content"].as_str()), (200, Some("hello")), "{v}");
    let asked = got.lock().unwrap().last().cloned().expect("the hook was asked");
    assert_eq!(
        asked.json(),
        json!({"conversation_id":"h","from":"alice","type":1,"content":"hello"}),
        "what the hook is asked"
    );
    let (id, timestamp) = (asked.header("webhook-id"), asked.header("webhook-timestamp"));
    assert!(!id.is_empty(), "{asked:?}");
    assert_eq!(asked.header("webhook-signature"), python_signature(id, timestamp, &asked.body), "signed as specified");

    let (s, v) = send(api, &t, "spam").await;
    assert_eq!((s, v["code"].as_u64(), v["error"].as_str()), (403, Some(40305), Some("no spam here")), "{v}");
    let (s, v) = send(api, &t, "darn").await;
    assert_eq!((s, v["data"]["content"].as_str()), (200, Some("d**n")), "{v}");
    let (s, v) = send(api, &t, "slow").await;
    assert_eq!((s, v["data"]["content"].as_str()), (200, Some("slow")), "fail open: {v}");

    // A WebSocket send is asked too; the business system's sends are not.
    let mut ws = NotifyClient::connect(&api.public, &t, Protocol::Ws, None).await.unwrap();
    ws.next(Duration::from_secs(10)).await.unwrap();
    ws.send_frame(json!({"type":"send","req_id":1,"conversation_id":"h","msg_type":1,"content":"spam"})).await;
    let answer = loop {
        let e = ws.next(Duration::from_secs(10)).await.unwrap();
        if e["type"] == "error" || e["type"] == "ack" {
            break e;
        }
    };
    assert_eq!(answer["code"], 40305, "{answer}");
    let before = got.lock().unwrap().len();
    let (s, v) =
        api.inner("/inner/send_msg", json!({"conversation_id":"h","from":"bob","type":1,"content":"spam"})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(got.lock().unwrap().len(), before, "/inner sends are not asked");
    // What was stored: the rejected ones never.
    let (_, v) = api.client(&t, "/get_conversation_last_30_msg", json!({"conversation_id":"h"})).await;
    let contents: Vec<&str> =
        v["data"]["msgs"].as_array().unwrap().iter().filter_map(|m| m["content"].as_str()).collect();
    assert_eq!(&contents[1..], ["hello", "d**n", "slow", "spam"], "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn before_send_accepts_rejects_and_rewrites_standalone() {
    let (url, got) = receiver("/hooks/before-send", verdict).await;
    let env = hook_env(&url, true);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let q = Standalone::start(BIN, &env).await;
    accept_reject_rewrite(&q.api, &got).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn before_send_accepts_rejects_and_rewrites_distributed() {
    let (url, got) = receiver("/hooks/before-send", verdict).await;
    let env = hook_env(&url, true);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let d = Distributed::start(BIN, 1, 2, 1, &env).await;
    accept_reject_rewrite(d.api(0), &got).await;
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_hook_refuses_when_it_fails_closed() {
    let (url, _got) = receiver("/hooks/before-send", verdict).await;
    let env = hook_env(&url, false);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let q = Standalone::start(BIN, &env).await;
    q.api.conversation("h", &["alice"]).await;
    let t = q.api.token("alice", "web").await;
    let (s, v) = send(&q.api, &t, "slow").await;
    assert_eq!((s, v["code"].as_u64()), (503, Some(50301)), "{v}");
    let (s, _) = send(&q.api, &t, "fine").await;
    assert_eq!(s, 200);
    // A hook that cannot be reached at all fails the same way.
    let q2 = Standalone::start(
        BIN,
        &[("QUICKIM_BEFORE_SEND_URL", "http://127.0.0.1:9/nowhere"), ("QUICKIM_BEFORE_SEND_FAIL_OPEN", "false")],
    )
    .await;
    q2.api.conversation("h", &["alice"]).await;
    let t2 = q2.api.token("alice", "web").await;
    let (s, v) = send(&q2.api, &t2, "x").await;
    assert_eq!((s, v["code"].as_u64()), (503, Some(50301)), "{v}");
}

/// Over https, with a certificate of a CA configured with `hook_ca_file`: the hook and a
/// webhook both work; without that CA the hook fails (and fails open).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hooks_and_webhooks_over_https() {
    let dir = tempfile::tempdir().unwrap();
    let (url, got, ca) = crate::receiver::tls_receiver("/hooks", dir.path(), |got| {
        let body = if got.json().get("events").is_some() { "{}".to_string() } else { verdict(got).1 };
        (200, body, None)
    })
    .await;
    let webhooks = json!([{"id":"tls","url":url,"events":["message.created"],"start":"beginning"}]).to_string();
    let ca = ca.to_string_lossy().to_string();
    let q = Standalone::start(
        BIN,
        &[
            ("QUICKIM_BEFORE_SEND_URL", url.as_str()),
            ("QUICKIM_BEFORE_SEND_FAIL_OPEN", "false"),
            ("QUICKIM_HOOK_CA_FILE", ca.as_str()),
            ("QUICKIM_WEBHOOKS", webhooks.as_str()),
            ("QUICKIM_WEBHOOK_LINGER_MS", "50"),
        ],
    )
    .await;
    q.api.conversation("h", &["alice"]).await;
    let t = q.api.token("alice", "web").await;
    let (s, v) = send(&q.api, &t, "darn").await;
    assert_eq!((s, v["data"]["content"].as_str()), (200, Some("d**n")), "the hook rewrote it over TLS: {v}");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let delivered =
            got.lock().unwrap().iter().any(|g| {
                g.json()["events"].as_array().is_some_and(|e| e.iter().any(|e| e["data"]["content"] == "d**n"))
            });
        if delivered {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the webhook never delivered over TLS");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Without the CA the certificate is not trusted: the hook fails, and here refuses.
    let q2 = Standalone::start(
        BIN,
        &[("QUICKIM_BEFORE_SEND_URL", url.as_str()), ("QUICKIM_BEFORE_SEND_FAIL_OPEN", "false")],
    )
    .await;
    q2.api.conversation("h", &["alice"]).await;
    let t2 = q2.api.token("alice", "web").await;
    let (s, v) = send(&q2.api, &t2, "x").await;
    assert_eq!((s, v["code"].as_u64()), (503, Some(50301)), "an untrusted certificate: {v}");
}
