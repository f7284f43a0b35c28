//! Every role serves Prometheus metrics (and health) with the documented names.

use std::time::Duration;

use quickim_testkit::{Distributed, NotifyClient, Protocol};
use serde_json::json;

use crate::BIN;

async fn scrape(http: &reqwest::Client, url: String) -> String {
    let r = http.get(url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    r.text().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_role_serves_its_metrics_and_health() {
    let d = Distributed::start(BIN, 1, 1, 1, &[]).await;
    let api = d.api(0);
    api.conversation("c", &["alice", "bob"]).await;
    let alice = api.token("alice", "web").await;
    let bob = api.token("bob", "web").await;
    let mut ws = NotifyClient::connect(&api.public, &alice, Protocol::Ws, None).await.unwrap();
    ws.next(Duration::from_secs(10)).await.unwrap();
    for i in 0..3 {
        api.client(&bob, "/send_msg", json!({"conversation_id":"c","type":1,"content":format!("{i}")})).await;
    }
    for _ in 0..3 {
        ws.next_message(Duration::from_secs(10)).await.unwrap();
    }
    let cursor = ws.cursor.clone().unwrap();
    drop(ws);
    api.client(&bob, "/send_msg", json!({"conversation_id":"c","type":1,"content":"missed"})).await;
    let mut sse = NotifyClient::connect(&api.public, &alice, Protocol::Sse, Some(&cursor)).await.unwrap();
    assert_eq!(sse.next_message(Duration::from_secs(10)).await.unwrap()["content"], "missed");

    let gateway = scrape(&api.http, format!("{}/metrics", api.inner)).await;
    for name in [
        "quickim_http_requests_total{route=\"/send_msg\",status=\"200\"}",
        "quickim_http_request_duration_seconds_bucket",
        "quickim_bus_request_duration_seconds_bucket{subject=\"quickim.msg.send_each\"",
        "quickim_sends_per_request_bucket{le=\"1\"}",
        "quickim_notify_connections{protocol=\"sse\"} 1",
        "quickim_notify_connections{protocol=\"ws\"} 0",
        "quickim_notify_events_delivered_total{protocol=\"ws\"} 3",
        "quickim_notify_events_delivered_total{protocol=\"sse\"} 1",
        "quickim_delivery_lag_seconds_bucket{protocol=\"ws\"",
        "quickim_notify_connects_total{protocol=\"sse\",resume=\"yes\"} 1",
        "quickim_notify_replayed_messages_total 1",
        "quickim_hub_deliveries_total",
    ] {
        assert!(gateway.contains(name), "gateway /metrics lacks {name}:\n{gateway}");
    }
    // The services serve /metrics, /healthz and /readyz on their ops listeners.
    let conversation = scrape(&api.http, format!("http://{}/metrics", d.service_ops[0])).await;
    assert!(
        conversation.contains("quickim_service_request_duration_seconds_bucket{subject=\"quickim.conv.create\""),
        "{conversation}"
    );
    assert!(conversation.contains("quickim_db_pool_connections{state=\"idle\"}"), "{conversation}");
    let message = scrape(&api.http, format!("http://{}/metrics", d.service_ops[1])).await;
    for name in [
        "quickim_send_batch_size_bucket",
        "quickim_messages_stored_total",
        "quickim_service_request_duration_seconds_bucket{subject=\"quickim.msg.send_each\"",
    ] {
        assert!(message.contains(name), "message /metrics lacks {name}:\n{message}");
    }
    // Batch sizes are counted in messages, not in the latency buckets of the `_seconds` ones.
    assert!(message.contains("quickim_send_batch_size_bucket{le=\"1\"}"), "{message}");
    assert!(!message.contains("quickim_send_batch_size_bucket{le=\"0.0005\"}"), "{message}");
    // Every metric any role emits is documented.
    let doc = include_str!("../../docs/operations.md");
    for text in [&gateway, &conversation, &message] {
        for line in text.lines().filter(|l| l.starts_with("quickim_")) {
            let name = line.split(['{', ' ']).next().unwrap();
            let base = name.trim_end_matches("_bucket").trim_end_matches("_sum").trim_end_matches("_count");
            assert!(doc.contains(&format!("`{base}`")), "docs/operations.md does not document {base}");
        }
    }
    for ops in &d.service_ops {
        for path in ["healthz", "readyz"] {
            let r = api.http.get(format!("http://{ops}/{path}")).send().await.unwrap();
            assert_eq!(r.status(), 200, "{ops}/{path}");
        }
    }
    d.finish().await;
}
