//! One message, one trace: spans and their parent links across the gateway that takes the
//! send, the message service (and its SQL), the bus, and the gateway that delivers it —
//! exported over real OTLP (HTTP/protobuf and gRPC) from real processes, and in-process with
//! an in-memory exporter for the standalone (in-process bus) path.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod export;
mod in_process;
mod logs;
mod metrics;

pub const BIN: &str = env!("CARGO_BIN_EXE_quickim");

use std::collections::HashMap;

/// A span as the tests look at it.
#[derive(Debug, Clone)]
pub struct SeenSpan {
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    pub name: String,
    pub kind: String,
    pub attributes: HashMap<String, String>,
    /// `service.name` / `service.instance.id` of the process that exported it.
    pub service: String,
    pub instance: String,
}

/// Checks the chain of one send, in `spans` (all spans of that trace), and answers a short
/// description of it for failure messages.
pub fn assert_send_trace(spans: &[SeenSpan], delivering_protocol: &str) {
    let by_id: HashMap<&str, &SeenSpan> = spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let find = |pred: &dyn Fn(&SeenSpan) -> bool, what: &str| -> SeenSpan {
        spans
            .iter()
            .find(|s| pred(s))
            .cloned()
            .unwrap_or_else(|| panic!("no {what} span in the trace: {}", describe(spans)))
    };
    let parent_of = |s: &SeenSpan| by_id.get(s.parent_span_id.as_str()).cloned().cloned();
    let http = find(&|s| s.name == "POST /send_msg", "http server");
    assert_eq!(http.kind, "server");
    assert_eq!(http.attributes.get("enduser.id").map(String::as_str), Some("bob"));
    let request = find(&|s| s.name == "quickim.msg.send" && s.kind == "client", "bus client");
    assert_eq!(parent_of(&request).map(|p| p.span_id), Some(http.span_id.clone()), "bus request under the HTTP span");
    let serve = find(&|s| s.name == "quickim.msg.send" && s.kind == "server", "service handler");
    assert_eq!(
        serve.parent_span_id, request.span_id,
        "the service handler is a child of the bus request (across the bus)"
    );
    // PostgreSQL runs each statement on its own; SQLite runs the batch's writes in one round
    // trip, whose span names every statement.
    let sql: Vec<&SeenSpan> = spans.iter().filter(|s| s.name.contains("INSERT messages")).collect();
    assert!(!sql.is_empty(), "an SQL span: {}", describe(spans));
    assert!(sql.iter().all(|s| s.attributes.contains_key("db.system.name")));
    let publish = find(&|s| s.name == "publish quickim.log", "fan-out publish");
    assert_eq!(publish.kind, "producer");
    let deliver = find(&|s| s.name == "deliver quickim.log", "delivery");
    assert_eq!(deliver.kind, "consumer");
    assert_eq!(deliver.parent_span_id, publish.span_id, "delivery is a child of the publish (across the bus)");
    let write = find(&|s| s.name == format!("write {delivering_protocol}"), "socket write");
    assert_eq!(parent_of(&write).map(|p| p.name), Some(deliver.name.clone()), "the write is a child of a delivery");
    assert_eq!(write.attributes.get("enduser.id").map(String::as_str), Some("alice"));
    assert!(write.attributes.contains_key("msg_id") && write.attributes.contains_key("conversation_id"));
    let trace = &http.trace_id;
    assert!(spans.iter().all(|s| &s.trace_id == trace));
}

/// The trace of the (only) send in `spans`, once it has arrived whole: the delivering socket
/// write is there and every span's parent is too. Spans end, and are exported, in no fixed
/// order (the service handler's span ends after the delivery it caused may have been written),
/// so a test waits for this rather than for any one span.
pub fn whole_send_trace(spans: &[SeenSpan], delivering_protocol: &str) -> Option<Vec<SeenSpan>> {
    let trace = &spans.iter().find(|s| s.name == "POST /send_msg")?.trace_id;
    let of: Vec<SeenSpan> = spans.iter().filter(|s| &s.trace_id == trace).cloned().collect();
    let ids: std::collections::HashSet<&str> = of.iter().map(|s| s.span_id.as_str()).collect();
    let is_root = |parent: &str| parent.chars().all(|c| c == '0');
    let parents_there = of.iter().all(|s| is_root(&s.parent_span_id) || ids.contains(s.parent_span_id.as_str()));
    let written = of.iter().any(|s| s.name == format!("write {delivering_protocol}"));
    (parents_there && written).then_some(of)
}

pub fn describe(spans: &[SeenSpan]) -> String {
    spans
        .iter()
        .map(|s| format!("\n  {} [{}] {} span={} parent={}", s.name, s.kind, s.instance, &s.span_id, &s.parent_span_id))
        .collect()
}
