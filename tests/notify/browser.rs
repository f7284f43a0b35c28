//! A real browser: headless Chromium loads a page whose native EventSource and WebSocket
//! receive messages; when the page's gateway goes away and comes back, the EventSource's own
//! reconnect resumes through Last-Event-ID and gets what was sent while it was down.

use std::sync::Arc;
use std::time::{Duration, Instant};

use quickim_testkit::Distributed;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Mutex;

use crate::{BIN, send};

const PAGE: &str = r#"<!doctype html><html><body><script>
const q = new URLSearchParams(location.search);
const gw = q.get('gw'), token = q.get('token');
let seq = 0;
function report(o) { o.seq = seq++; fetch('/report', {method: 'POST', body: JSON.stringify(o)}); }
const es = new EventSource(gw + '/notify?protoc=sse&token=' + token);
es.addEventListener('ready', e => report({src: 'sse', type: 'ready', id: e.lastEventId}));
es.addEventListener('message', e => {
  const d = JSON.parse(e.data);
  report({src: 'sse', type: 'message', content: d.message.content, id: e.lastEventId});
});
es.onerror = () => report({src: 'sse', type: 'error', state: es.readyState});
const ws = new WebSocket(gw.replace('http', 'ws') + '/notify?protoc=ws&token=' + token);
ws.onmessage = e => {
  const d = JSON.parse(e.data);
  report({src: 'ws', type: d.type, content: d.message ? d.message.content : null});
};
ws.onclose = e => report({src: 'ws', type: 'close', code: e.code});
</script></body></html>"#;

/// Serves the page and collects what it reports.
async fn page_server(listener: TcpListener, reports: Arc<Mutex<Vec<Value>>>) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else { return };
        let reports = reports.clone();
        tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut tmp = [0u8; 4096];
            let header_end = loop {
                let Ok(n) = sock.read(&mut tmp).await else { return };
                if n == 0 {
                    return;
                }
                buf.extend_from_slice(&tmp[..n]);
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i + 4;
                }
            };
            let head = String::from_utf8_lossy(&buf[..header_end]).to_string();
            let length: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0))
                })
                .unwrap_or(0);
            while buf.len() < header_end + length {
                let Ok(n) = sock.read(&mut tmp).await else { return };
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&tmp[..n]);
            }
            let body = if head.starts_with("POST /report") {
                if let Ok(v) = serde_json::from_slice::<Value>(&buf[header_end..]) {
                    // Reports are separate requests and may arrive out of order: keep the
                    // page's order.
                    let mut r = reports.lock().await;
                    r.push(v);
                    r.sort_by_key(|v| v["seq"].as_u64().unwrap_or(0));
                }

                String::new()
            } else {
                PAGE.to_string()
            };
            let response = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(response.as_bytes()).await;
        });
    }
}

struct Browser {
    child: std::process::Child,
    _profile: tempfile::TempDir,
}
impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn wait_for(reports: &Arc<Mutex<Vec<Value>>>, what: &str, ok: impl Fn(&[Value]) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        {
            let r = reports.lock().await;
            if ok(&r) {
                return;
            }
            assert!(Instant::now() < deadline, "browser: waited for {what}; reports so far: {r:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn sse_messages(r: &[Value]) -> Vec<String> {
    r.iter()
        .filter(|v| v["src"] == "sse" && v["type"] == "message")
        .map(|v| v["content"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chromium_eventsource_reconnects_with_last_event_id_and_misses_nothing() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = format!("http://{}", listener.local_addr().unwrap());
    let reports = Arc::new(Mutex::new(Vec::new()));
    tokio::spawn(page_server(listener, reports.clone()));

    let mut d = Distributed::start(BIN, 1, 1, 2, &[("QUICKIM_CORS_ORIGINS", origin.as_str())]).await;
    d.api(0).conversation("c", &["alice", "bob"]).await;
    let token = d.api(0).token("alice", "web").await;
    let gw = d.api(0).public.clone();
    let profile = tempfile::tempdir().unwrap();
    let chromium = std::process::Command::new(if std::path::Path::new("/usr/bin/chromium").exists() {
        "/usr/bin/chromium"
    } else {
        "chromium"
    })
    .args([
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        &format!("--user-data-dir={}", profile.path().display()),
        &format!("{origin}/?gw={gw}&token={token}"),
    ])
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null())
    .spawn()
    .expect("chromium must be installed (scripts/test.sh installs it)");
    let _browser = Browser { child: chromium, _profile: profile };

    wait_for(&reports, "both streams ready", |r| {
        r.iter().any(|v| v["src"] == "sse" && v["type"] == "ready")
            && r.iter().any(|v| v["src"] == "ws" && v["type"] == "ready")
    })
    .await;
    for i in 1..=3 {
        send(d.api(1), "c", "bob", &format!("m{i}")).await;
    }
    wait_for(&reports, "m1..m3 on both", |r| {
        sse_messages(r).len() == 3 && r.iter().filter(|v| v["src"] == "ws" && v["type"] == "message").count() == 3
    })
    .await;

    // The page's gateway goes away; messages are sent while it is down; it comes back.
    assert_eq!(d.stop_gateway(0), Some(0));
    wait_for(&reports, "the EventSource noticed", |r| r.iter().any(|v| v["src"] == "sse" && v["type"] == "error"))
        .await;
    for i in 4..=6 {
        send(d.api(1), "c", "bob", &format!("m{i}")).await;
    }
    d.start_gateway_again(0).await;
    wait_for(&reports, "m4..m6 through the EventSource's own reconnect", |r| sse_messages(r).len() >= 6).await;
    // A last message: delivery is in order, so any duplicate of m1..m6 would come before it.
    send(d.api(1), "c", "bob", "m7").await;
    wait_for(&reports, "m7", |r| sse_messages(r).iter().any(|m| m == "m7")).await;
    let r = reports.lock().await;
    assert_eq!(sse_messages(&r), (1..=7).map(|i| format!("m{i}")).collect::<Vec<_>>(), "exactly once, in order: {r:?}");
    let ws_closed = r.iter().find(|v| v["src"] == "ws" && v["type"] == "close").cloned();
    assert_eq!(
        ws_closed.map(|v| v["code"].clone()),
        Some(Value::from(1001)),
        "the WebSocket was closed with going-away"
    );
    drop(r);
    d.finish().await;
}
