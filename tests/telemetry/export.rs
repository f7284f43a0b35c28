//! Real processes exporting over real OTLP: HTTP/protobuf to a receiver in this test (which
//! also records each span's service), gRPC to a test collector.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use prost::Message as _;
use quickim_testkit::{Distributed, NotifyClient, Protocol};
use serde_json::json;

use crate::{BIN, SeenSpan, assert_send_trace, describe, whole_send_trace};

type Collected = Arc<Mutex<Vec<SeenSpan>>>;

fn text(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        _ => String::new(),
    }
}

async fn receive(State(collected): State<Collected>, body: Bytes) -> Vec<u8> {
    let request = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
    let mut out = collected.lock().unwrap();
    for rs in request.resource_spans {
        let resource: HashMap<String, String> = rs
            .resource
            .map(|r| r.attributes.iter().map(|kv| (kv.key.clone(), text(&kv.value))).collect())
            .unwrap_or_default();
        for ss in rs.scope_spans {
            for s in ss.spans {
                let kind = match s.kind {
                    2 => "server",
                    3 => "client",
                    4 => "producer",
                    5 => "consumer",
                    _ => "internal",
                };
                out.push(SeenSpan {
                    trace_id: hex(&s.trace_id),
                    span_id: hex(&s.span_id),
                    parent_span_id: hex(&s.parent_span_id),
                    name: s.name.clone(),
                    kind: kind.to_string(),
                    attributes: s.attributes.iter().map(|kv| (kv.key.clone(), text(&kv.value))).collect(),
                    service: resource.get("service.name").cloned().unwrap_or_default(),
                    instance: resource.get("service.instance.id").cloned().unwrap_or_default(),
                });
            }
        }
    }
    ExportTraceServiceResponse::default().encode_to_vec()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Sends one message from bob through gateway 0 while alice listens on gateway 1 over
/// `protocol`; answers the msg_id once alice has it.
async fn send_and_receive(d: &Distributed, protocol: Protocol) -> u64 {
    d.api(0).conversation("c", &["alice", "bob"]).await;
    let alice = d.api(0).token("alice", "web").await;
    let bob = d.api(0).token("bob", "web").await;
    let mut client = NotifyClient::connect(&d.api(1).public, &alice, protocol, None).await.unwrap();
    client.next(Duration::from_secs(10)).await.unwrap();
    let (s, v) = d.api(0).client(&bob, "/send_msg", json!({"conversation_id":"c","type":1,"content":"traced"})).await;
    assert_eq!(s, 200, "{v}");
    let m = client.next_message(Duration::from_secs(10)).await.expect("delivered");
    assert_eq!(m["content"], "traced");
    m["msg_id"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_send_is_one_trace_across_processes_over_otlp_http() {
    let collected: Collected = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let app = axum::Router::new().route("/v1/traces", post(receive)).with_state(collected.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let d = Distributed::start(
        BIN,
        1,
        1,
        2,
        &[
            ("QUICKIM_OTLP_ENDPOINT", endpoint.as_str()),
            ("QUICKIM_OTLP_PROTOCOL", "http"),
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
        ],
    )
    .await;
    send_and_receive(&d, Protocol::Ws).await;

    // Wait until the trace of that send has arrived from every process.
    let deadline = Instant::now() + Duration::from_secs(20);
    let trace = loop {
        let spans = collected.lock().unwrap().clone();
        if let Some(of) = whole_send_trace(&spans, "ws") {
            break of;
        }
        assert!(Instant::now() < deadline, "the send's trace did not arrive whole: {}", describe(&spans));
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_send_trace(&trace, "ws");
    // It spans three processes: the sending gateway, the message service, the delivering gateway.
    let instance = |name: &str| trace.iter().find(|s| s.name == name).map(|s| (s.service.clone(), s.instance.clone()));
    assert_eq!(instance("POST /send_msg"), Some(("quickim-gateway".to_string(), "gateway-0".to_string())));
    let serve = trace.iter().find(|s| s.name == "quickim.msg.send" && s.kind == "server").unwrap();
    assert_eq!(serve.service, "quickim-message");
    assert_eq!(instance("write ws"), Some(("quickim-gateway".to_string(), "gateway-1".to_string())));
    let deliveries: Vec<&str> = trace.iter().filter(|s| s.kind == "consumer").map(|s| s.instance.as_str()).collect();
    assert!(
        deliveries.contains(&"gateway-0") && deliveries.contains(&"gateway-1"),
        "every gateway consumed it: {deliveries:?}"
    );
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn spans_are_exported_over_otlp_grpc() {
    let mut collector = fake_opentelemetry_collector::FakeCollectorServer::start().await.unwrap();
    let endpoint = collector.endpoint();
    let d = Distributed::start(
        BIN,
        1,
        1,
        2,
        &[
            ("QUICKIM_OTLP_ENDPOINT", endpoint.as_str()),
            ("QUICKIM_OTLP_PROTOCOL", "grpc"),
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
        ],
    )
    .await;
    send_and_receive(&d, Protocol::Sse).await;
    let mut spans = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !spans.iter().any(|s: &fake_opentelemetry_collector::ExportedSpan| s.name == "POST /send_msg")
        || !spans.iter().any(|s| s.name == "quickim.msg.send" && s.kind == "SPAN_KIND_SERVER")
    {
        assert!(
            Instant::now() < deadline,
            "spans did not come over gRPC: {:?}",
            spans.iter().map(|s| &s.name).collect::<Vec<_>>()
        );
        spans.extend(collector.exported_spans(1, Duration::from_millis(500)).await);
    }
    let http = spans.iter().find(|s| s.name == "POST /send_msg").expect("the HTTP span came over gRPC");
    let serve = spans
        .iter()
        .find(|s| s.name == "quickim.msg.send" && s.kind == "SPAN_KIND_SERVER" && s.trace_id == http.trace_id)
        .expect("the message service's span, in the same trace");
    assert!(!serve.parent_span_id.is_empty());
    d.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_public_client_cannot_force_its_requests_to_be_traced() {
    let collected: Collected = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let app = axum::Router::new().route("/v1/traces", post(receive)).with_state(collected.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    // Nothing is sampled on its own: only a trusted caller's sampled traceparent is followed.
    let q = quickim_testkit::Standalone::start(
        BIN,
        &[
            ("QUICKIM_OTLP_ENDPOINT", endpoint.as_str()),
            ("QUICKIM_OTLP_PROTOCOL", "http"),
            ("QUICKIM_TRACE_SAMPLE_RATIO", "0"),
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
        ],
    )
    .await;
    q.api.conversation("c", &["alice"]).await;
    let token = q.api.token("alice", "web").await;
    let public_trace = "0af7651916cd43dd8448eb211c80319c";
    let inner_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let r = q
        .api
        .http
        .post(format!("{}/send_msg", q.api.public))
        .bearer_auth(&token)
        .header("traceparent", format!("00-{public_trace}-b7ad6b7169203331-01"))
        .body(json!({"conversation_id":"c","type":1,"content":"untrusted"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The business system on /inner is trusted: its sampled trace is followed (and tells us
    // when the exporter has sent what came before).
    let r = q
        .api
        .http
        .post(format!("{}/inner/send_msg", q.api.inner))
        .bearer_auth(&q.api.key)
        .header("traceparent", format!("00-{inner_trace}-00f067aa0ba902b7-01"))
        .body(json!({"conversation_id":"c","from":"alice","type":1,"content":"trusted"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !collected.lock().unwrap().iter().any(|s| s.trace_id == inner_trace && s.name == "POST /inner/send_msg") {
        assert!(Instant::now() < deadline, "the trusted trace was not exported");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let spans = collected.lock().unwrap().clone();
    assert!(!spans.iter().any(|s| s.trace_id == public_trace), "a public client's traceparent forced a trace");
    assert!(!spans.iter().any(|s| s.name == "POST /send_msg"), "{}", describe(&spans));
}
