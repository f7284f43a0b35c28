//! Results (JSON lines) to an SVG chart and Markdown tables, for docs/benchmarks.md.
//! Written by hand: a few rectangles need no plotting library.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde_json::Value;

/// A metric worth charting, and whether more is better.
const METRICS: &[(&str, &str, bool)] = &[
    ("deliveries_per_s", "deliveries/s", true),
    ("p99_ms", "p99 latency (ms)", false),
    ("rss_per_conn_kb", "memory per connection (KiB)", false),
    ("publish_per_s", "sends/s", true),
    ("catchup_s", "catch-up (s)", false),
];

/// Reads `results` and writes the chart and the tables.
pub fn write(results: &Path, svg: &Path, table: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(results)?;
    let rows: Vec<Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    // scenario -> target -> last row
    let mut by: BTreeMap<String, BTreeMap<String, Value>> = BTreeMap::new();
    for r in rows {
        let scenario = r["scenario"].as_str().unwrap_or("?").to_string();
        let target = r["target"].as_str().unwrap_or("?").to_string();
        by.entry(scenario).or_default().insert(target, r);
    }
    std::fs::write(table, tables(&by))?;
    std::fs::write(svg, chart(&by))?;
    Ok(())
}

fn num(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or(0.0)
}

fn primary(rows: &BTreeMap<String, Value>) -> Option<(&'static str, &'static str, bool)> {
    let any = rows.values().next()?;
    let mode = any["mode"].as_str().unwrap_or("");
    let key = match mode {
        "idle" => "rss_per_conn_kb",
        "resume" => "catchup_s",
        "send" => "publish_per_s",
        _ if any["rate"].is_number() => "p99_ms",
        _ => "deliveries_per_s",
    };
    METRICS.iter().find(|(k, _, _)| *k == key).copied()
}

/// One table per scenario: the latest run of each server, the columns that scenario is
/// about, and each server's primary metric as a ratio to each peer's (nchan, Pushpin).
fn tables(by: &BTreeMap<String, BTreeMap<String, Value>>) -> String {
    let mut out = String::new();
    for (scenario, rows) in by {
        let Some(any) = rows.values().next() else { continue };
        let mode = any["mode"].as_str().unwrap_or("");
        let churn = rows.values().any(|r| r["reconnects"].as_u64().unwrap_or(0) > 0);
        let cols: Vec<(&str, &str)> = match mode {
            "idle" => vec![("connected", "connected"), ("rss_per_conn_kb", "KiB/conn")],
            "resume" => vec![
                ("delivered", "delivered"),
                ("lost", "lost"),
                ("duplicated", "dup"),
                ("catchup_s", "catch-up s"),
                ("deliveries_per_s", "deliveries/s"),
                ("catchup_p50_ms", "p50 ms after reconnect"),
                ("catchup_p99_ms", "p99 ms after reconnect"),
            ],
            "send" => vec![
                ("published", "sent"),
                ("publish_errors", "errors"),
                ("publish_per_s", "sends/s"),
                ("publish_p50_ms", "p50 ms"),
                ("publish_p99_ms", "p99 ms"),
            ],
            _ => {
                let mut c = vec![
                    ("delivered", "delivered"),
                    ("lost", "lost"),
                    ("duplicated", "dup"),
                    ("deliveries_per_s", "deliveries/s"),
                    ("p50_ms", "p50 ms"),
                    ("p99_ms", "p99 ms"),
                ];
                if churn {
                    c.push(("reconnects", "reconnects"));
                }
                c
            }
        };
        let primary = primary(rows);
        let peers: Vec<(&str, f64)> = ["nchan", "pushpin"]
            .iter()
            .filter_map(|p| {
                let (key, _, _) = primary?;
                rows.get(*p).map(|r| (*p, num(r, key))).filter(|(_, v)| *v > 0.0)
            })
            .collect();
        let _ = writeln!(out, "\n#### {scenario}\n");
        let mut head = String::from("| server |");
        let mut rule = String::from("|---|");
        for (_, label) in &cols {
            head.push_str(&format!(" {label} |"));
            rule.push_str("---:|");
        }
        for (peer, _) in &peers {
            head.push_str(&format!(" vs {peer} |"));
            rule.push_str("---:|");
        }
        let _ = writeln!(out, "{head}\n{rule}");
        for (target, r) in rows {
            let mut line = format!("| {target} |");
            for (key, _) in &cols {
                let v = num(r, key);
                let cell = if r[*key].is_u64() || v >= 1000.0 {
                    format!("{v:.0}")
                } else if v >= 10.0 {
                    format!("{v:.1}")
                } else {
                    format!("{v:.2}")
                };
                line.push_str(&format!(" {cell} |"));
            }
            for (peer, pv) in &peers {
                let cell = match primary {
                    Some((key, _, higher)) if target != peer => {
                        let ratio = num(r, key) / pv;
                        let better = if higher { ratio >= 1.0 } else { ratio <= 1.0 };
                        format!("{ratio:.2}× {}", if better { "✓" } else { "✗" })
                    }
                    _ => "—".to_string(),
                };
                line.push_str(&format!(" {cell} |"));
            }
            let _ = writeln!(out, "{line}");
        }
        if churn {
            let counts: Vec<String> =
                rows.iter().map(|(t, r)| format!("{t} {}", r["reconnects"].as_u64().unwrap_or(0))).collect();
            let _ = writeln!(out, "\nConnections closed and reopened during the run: {}", counts.join(", "));
        }
        if let Some((_, label, higher)) = primary
            && !peers.is_empty()
        {
            let _ = writeln!(
                out,
                "\nRatios: {label} of the row's server / the peer's ({}; ✓ = the row's server ahead or even).",
                if higher { "higher is better" } else { "lower is better" }
            );
        }
    }
    out
}

/// (metric key, label, higher is better)
type Metric = (&'static str, &'static str, bool);

fn chart(by: &BTreeMap<String, BTreeMap<String, Value>>) -> String {
    let panels: Vec<(&String, &BTreeMap<String, Value>, Metric)> =
        by.iter().filter_map(|(s, rows)| primary(rows).map(|p| (s, rows, p))).collect();
    let (w, panel_h) = (900.0, 150.0);
    let h = 40.0 + panel_h * panels.len() as f64;
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="10" y="22" font-size="16" font-weight="bold">quickim vs nchan and Pushpin (same machine, latest run of each)</text>
"#
    );
    let colors = |t: &str| {
        if t.starts_with("nchan") {
            "#9e9e9e"
        } else if t.starts_with("pushpin") {
            "#ef6c00"
        } else if t.contains("distributed") {
            "#1565c0"
        } else {
            "#2e7d32"
        }
    };
    for (i, (scenario, rows, (key, label, higher))) in panels.iter().enumerate() {
        let y0 = 40.0 + i as f64 * panel_h;
        let max = rows.values().map(|r| num(r, key)).fold(0.0, f64::max).max(1e-9);
        let _ = writeln!(
            svg,
            r#"<text x="10" y="{}" font-weight="bold">{scenario} — {label} ({})</text>"#,
            y0 + 14.0,
            if *higher { "higher is better" } else { "lower is better" }
        );
        for (k, (target, r)) in rows.iter().enumerate() {
            let v = num(r, key);
            let bar = (v / max) * (w - 330.0);
            let y = y0 + 24.0 + k as f64 * 30.0;
            let _ = writeln!(
                svg,
                r#"<text x="10" y="{}">{target}</text><rect x="200" y="{}" width="{bar:.1}" height="20" fill="{}"/><text x="{}" y="{}">{}</text>"#,
                y + 14.0,
                y,
                colors(target),
                205.0 + bar,
                y + 14.0,
                if v >= 100.0 { format!("{v:.0}") } else { format!("{v:.2}") }
            );
        }
    }
    svg.push_str("</svg>\n");
    svg
}
