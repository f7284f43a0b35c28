//! The load generator against the real binary, small: every mode and protocol delivers
//! everything once, the result lines say so, and the chart is drawn from them.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::PathBuf;
use std::process::Command;

use quickim_testkit::{Standalone, TEST_INNER_KEY, TEST_JWT_SECRET};
use serde_json::Value;

const BENCH: &str = env!("CARGO_BIN_EXE_quickim-bench");

/// The quickim binary of the same build (the workspace's test command builds every binary).
fn quickim() -> String {
    let path = PathBuf::from(BENCH).with_file_name("quickim");
    assert!(path.exists(), "{} is missing: build the workspace's binaries first", path.display());
    path.display().to_string()
}

fn run(q: &Standalone, results: &std::path::Path, args: &[&str]) -> Value {
    let hosts = q.api.public.trim_start_matches("http://").to_string();
    let out = Command::new(BENCH)
        .args(["run", "--target", "quickim", "--hosts", &hosts, "--inner", &q.api.inner])
        .args(["--inner-key", TEST_INNER_KEY, "--jwt-secret", TEST_JWT_SECRET, "--timeout", "20"])
        .args(["--pid-match", &format!("{} standalone", quickim())])
        .arg("--out")
        .arg(results)
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    let line = String::from_utf8(out.stdout).unwrap();
    serde_json::from_str(line.trim()).unwrap_or_else(|e| panic!("one JSON line, not {line:?}: {e}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn every_mode_delivers_everything_once_and_the_chart_is_drawn() {
    let q = Standalone::start(&quickim(), &[("QUICKIM_RATE_LIMIT_PER_S", "0")]).await;
    let results = q.data.path().join("results.jsonl");
    let scenarios: [&[&str]; 5] = [
        &[
            "--scenario",
            "ws",
            "--mode",
            "deliver",
            "--protocol",
            "ws",
            "--subscribers",
            "20",
            "--channels",
            "2",
            "--messages",
            "50",
        ],
        &[
            "--scenario",
            "sse at a rate",
            "--mode",
            "deliver",
            "--protocol",
            "sse",
            "--subscribers",
            "10",
            "--channels",
            "1",
            "--messages",
            "20",
            "--rate",
            "100",
        ],
        &[
            "--scenario",
            "poll",
            "--mode",
            "deliver",
            "--protocol",
            "poll",
            "--subscribers",
            "10",
            "--channels",
            "5",
            "--messages",
            "40",
        ],
        &[
            "--scenario",
            "resume",
            "--mode",
            "resume",
            "--protocol",
            "ws",
            "--subscribers",
            "10",
            "--channels",
            "2",
            "--messages",
            "20",
        ],
        &["--scenario", "idle", "--mode", "idle", "--protocol", "sse", "--subscribers", "50", "--channels", "5"],
    ];
    for args in scenarios {
        let r = run(&q, &results, args);
        let subscribers = r["subscribers"].as_u64().unwrap();
        assert_eq!(r["connected"].as_u64(), Some(subscribers), "{args:?}: {r}");
        assert_eq!((r["lost"].as_u64(), r["duplicated"].as_u64()), (Some(0), Some(0)), "{args:?}: {r}");
        assert_eq!(r["delivered"], r["expected"], "{args:?}: {r}");
        if r["mode"] != "idle" {
            assert!(r["expected"].as_u64().unwrap() > 0, "{args:?}: {r}");
            assert!(r["p99_ms"].as_f64().unwrap() > 0.0, "{args:?}: {r}");
        } else {
            assert!(r["rss_after_kb"].as_u64().unwrap() > 0, "server memory is read: {r}");
        }
        if r["mode"] == "resume" {
            assert!(r["catchup_s"].as_f64().unwrap() > 0.0, "{r}");
        }
    }
    // Connection churn: every subscriber's connection is closed while messages flow (one
    // round of 20 at 40 a second over the half second of publishing), and each resumes from
    // its cursor on its transport: still every message once.
    for protocol in ["ws", "sse", "poll"] {
        let scenario = format!("churn {protocol}");
        let args = [
            "--scenario",
            &scenario,
            "--mode",
            "deliver",
            "--protocol",
            protocol,
            "--subscribers",
            "20",
            "--channels",
            "4",
            "--messages",
            "100",
            "--rate",
            "200",
            "--churn",
            "40",
        ];
        let r = run(&q, &results, &args);
        assert_eq!(r["connected"].as_u64(), Some(20), "{r}");
        assert!(r["reconnects"].as_u64().unwrap() >= 10, "the churn closed connections: {r}");
        assert_eq!((r["lost"].as_u64(), r["duplicated"].as_u64()), (Some(0), Some(0)), "{r}");
        assert_eq!(r["delivered"], r["expected"], "{r}");
    }
    let r = run(&q, &results, &["--scenario", "send", "--mode", "send", "--channels", "4", "--messages", "200"]);
    assert_eq!((r["published"].as_u64(), r["publish_errors"].as_u64()), (Some(200), Some(0)), "{r}");
    // As members through /send_msg, each send with its idempotency key: every one stored (a
    // refused token, membership or key would count as an error).
    let r = run(
        &q,
        &results,
        &[
            "--scenario",
            "member sends",
            "--mode",
            "send",
            "--channels",
            "4",
            "--messages",
            "200",
            "--pub-mode",
            "client",
            "--keys",
        ],
    );
    assert_eq!((r["published"].as_u64(), r["publish_errors"].as_u64()), (Some(200), Some(0)), "{r}");

    let (svg, table) = (q.data.path().join("chart.svg"), q.data.path().join("tables.md"));
    let out = Command::new(BENCH)
        .arg("chart")
        .arg(&results)
        .arg("--svg")
        .arg(&svg)
        .arg("--table")
        .arg(&table)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let svg = std::fs::read_to_string(svg).unwrap();
    assert!(svg.starts_with("<svg") && svg.matches("<rect").count() >= 6, "{svg}");
    let table = std::fs::read_to_string(table).unwrap();
    for scenario in ["ws", "sse at a rate", "poll", "resume", "idle", "send", "churn ws"] {
        assert!(table.contains(&format!("#### {scenario}\n")), "{scenario} missing from\n{table}");
    }
    assert!(table.contains("Connections closed and reopened during the run: quickim "), "{table}");
}
