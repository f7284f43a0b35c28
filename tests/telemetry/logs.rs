//! Log lines name their spans only when `log_spans` says so: by default the log layer takes
//! events alone (the spans go to the trace exporter, when there is one).

use quickim_testkit::Standalone;

use crate::BIN;

/// The gateway logs every request at debug ("answered", target `quickim_gateway::http`) inside
/// the request's `http.request` span (info).
async fn request_log_lines(log_spans: &str) -> Vec<String> {
    let q = Standalone::start(BIN, &[("QUICKIM_LOG", "warn,quickim_gateway=debug"), ("QUICKIM_LOG_SPANS", log_spans)])
        .await;
    q.api.conversation("c", &["alice", "bob"]).await;
    let text = q.process.log_text();
    text.lines().filter(|l| l.contains("answered")).map(str::to_string).collect()
}

#[tokio::test]
async fn log_lines_name_their_spans_only_when_asked() {
    let plain = request_log_lines("false").await;
    assert!(!plain.is_empty(), "requests are logged");
    assert!(plain.iter().all(|l| !l.contains("http.request")), "no span in: {plain:?}");

    let with_spans = request_log_lines("true").await;
    assert!(
        with_spans.iter().any(|l| l.contains("http.request{") && l.contains("/inner/create_conversation")),
        "spans named in: {with_spans:?}"
    );
}
