//! Every input the fuzzers kept (fuzz/corpus) and every crash they found (fuzz/regressions)
//! runs through the same code as the fuzz targets, on every test run.

use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut n = 0;
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else { continue };
        for entry in entries.flatten() {
            let data = std::fs::read(entry.path()).unwrap();
            run(&data);
            n += 1;
        }
    }
    assert!(n > 0, "no inputs kept for {target}");
}

#[test]
fn request_head_inputs() {
    replay("request_head", quickim_gateway::fuzzing::request_head);
}

#[test]
fn cursor_inputs() {
    replay("cursor", quickim_gateway::fuzzing::cursor);
}

#[test]
fn ws_frame_inputs() {
    replay("ws_frame", quickim_gateway::fuzzing::ws_frame);
}

#[test]
fn json_body_inputs() {
    replay("json_body", quickim_gateway::fuzzing::json_body);
}
