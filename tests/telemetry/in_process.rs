//! Standalone assembled in this process, with an in-memory span exporter: the trace context
//! crosses the in-process bus as it crosses NATS.

use std::sync::Arc;
use std::time::Duration;

use opentelemetry::trace::{SpanKind, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use quickim_conversation::ConversationService;
use quickim_gateway::Gateway;
use quickim_message::{MessageLimits, MessageService};
use quickim_shared::bus::Bus;
use quickim_shared::config::{Config, Secret};
use quickim_store::Store;
use quickim_testkit::{Api, NotifyClient, Protocol};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::{SeenSpan, assert_send_trace, describe, whole_send_trace};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standalone_send_is_one_trace_over_the_in_process_bus() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder().with_simple_exporter(exporter.clone()).build();
    tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")))
        .try_init()
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let store = Store::open_sqlite(&dir.path().join("q.db"), 4, 8).await.unwrap();
    let bus = Bus::local(1024);
    let limits = quickim_conversation::ConversationLimits {
        max_members: 1000,
        title_max_bytes: 256,
        avatar_max_bytes: 2048,
        ext_max_bytes: 4096,
    };
    let _conv = ConversationService::new(store.clone(), bus.clone(), limits).start(shutdown.clone()).await.unwrap();
    let limits = MessageLimits {
        max_content_bytes: 65536,
        range_max: 100,
        replay_page: 500,
        retention_ms: 86_400_000,
        key_ttl_ms: 7 * 86_400_000,
        message_retention_ms: 0,
        send_batch_max: 500,
        edit_window_ms: 0,
        recall_window_ms: 0,
        stream_timeout_ms: 600_000,
    };
    let _msg = MessageService::new(store, bus.clone(), limits).start(shutdown.clone()).await.unwrap();
    let config = Config {
        public_addr: "127.0.0.1:0".parse().unwrap(),
        inner_addr: "127.0.0.1:0".parse().unwrap(),
        jwt_secret: Some(Secret::new("in-process-secret-in-process-secret")),
        inner_key: Some(Secret::new("in-process-inner-key")),
        ..Config::default()
    };
    let gateway = Gateway::start(Arc::new(config), bus, "standalone-test".into(), shutdown.clone()).await.unwrap();
    let api = Api::new(&gateway.public_addr().to_string(), &gateway.inner_addr().to_string(), "in-process-inner-key");
    tokio::spawn(gateway.run());
    api.wait_ready(Duration::from_secs(20)).await;

    api.conversation("c", &["alice", "bob"]).await;
    let alice = api.token("alice", "web").await;
    let bob = api.token("bob", "web").await;
    let mut ws = NotifyClient::connect(&api.public, &alice, Protocol::Ws, None).await.unwrap();
    ws.next(Duration::from_secs(10)).await.unwrap();
    let (s, _) = api.client(&bob, "/send_msg", json!({"conversation_id":"c","type":1,"content":"traced"})).await;
    assert_eq!(s, 200);
    assert_eq!(ws.next_message(Duration::from_secs(10)).await.unwrap()["content"], "traced");

    // Spans end in no fixed order: wait for the whole trace.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let spans = loop {
        let _ = provider.force_flush();
        let spans: Vec<SeenSpan> = exporter
            .get_finished_spans()
            .unwrap()
            .into_iter()
            .map(|s| SeenSpan {
                trace_id: s.span_context.trace_id().to_string(),
                span_id: s.span_context.span_id().to_string(),
                parent_span_id: s.parent_span_id.to_string(),
                name: s.name.to_string(),
                kind: match s.span_kind {
                    SpanKind::Server => "server",
                    SpanKind::Client => "client",
                    SpanKind::Producer => "producer",
                    SpanKind::Consumer => "consumer",
                    SpanKind::Internal => "internal",
                }
                .to_string(),
                attributes: s.attributes.iter().map(|kv| (kv.key.to_string(), kv.value.to_string())).collect(),
                service: String::new(),
                instance: String::new(),
            })
            .collect();
        if let Some(of) = whole_send_trace(&spans, "ws") {
            break of;
        }
        assert!(std::time::Instant::now() < deadline, "incomplete trace: {}", describe(&spans));
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_send_trace(&spans, "ws");
    // The connection had its own spans too.
    let all = exporter.get_finished_spans().unwrap();
    assert!(all.iter().any(|s| s.name == "notify.connect"));
    shutdown.cancel();
}
