//! The API against its own document: schemathesis (installed by scripts/test.sh into
//! target/venv) generates requests from the served /openapi.json for every route of both
//! listeners and checks that no answer is a 5xx and every answer matches the document
//! (status codes, content types, bodies, headers, methods).

use std::process::Command;

use quickim_testkit::Standalone;

use crate::BIN;

const CHECKS: &str = "not_a_server_error,status_code_conformance,content_type_conformance,\
response_schema_conformance,response_headers_conformance,unsupported_method";

fn schemathesis() -> std::path::PathBuf {
    let st = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/venv/bin/st");
    assert!(st.exists(), "schemathesis is missing: scripts/test.sh installs it into target/venv");
    st
}

fn run(st: &std::path::Path, schema: &str, auth: &str, filter: [&str; 2]) {
    let dir = tempfile::tempdir().unwrap();
    // One worker: schemathesis's worker threads parse generator sources concurrently, which
    // the Python 3.11 parser does not survive ("AST constructor recursion depth mismatch").
    let out = Command::new(st)
        .current_dir(dir.path())
        .args(["run", schema, "--checks", CHECKS, "--max-examples", "30", "--workers", "1"])
        .args(["-H", &format!("Authorization: Bearer {auth}")])
        .args(filter)
        .output()
        .expect("schemathesis runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "schemathesis found failures on {schema}:\n{text}");
    assert!(text.contains(" passed"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_matches_the_document_on_both_listeners() {
    let st = schemathesis();
    let q = Standalone::start(BIN, &[("QUICKIM_RATE_LIMIT_PER_S", "0")]).await;
    q.api.conversation("c", &["alice"]).await;
    let token = q.api.token("alice", "web").await;
    let (public, inner, key) = (q.api.public.clone(), q.api.inner.clone(), q.api.key.clone());
    // /notify streams (SSE never ends) are tested by the /notify suites.
    tokio::task::spawn_blocking(move || {
        run(&st, &format!("{public}/openapi.json"), &token, ["--exclude-path-regex", "^/(inner|metrics|notify$)"]);
        run(&st, &format!("{inner}/openapi.json"), &key, ["--include-path-regex", "^/(inner|metrics|healthz|readyz)"]);
    })
    .await
    .unwrap();
}
