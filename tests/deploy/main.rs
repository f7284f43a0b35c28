//! deploy/: the local cluster script runs the compose topology from the built binary, and the
//! compose file and Kubernetes manifests hold what operators rely on.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use quickim_testkit::{Api, NotifyClient, Protocol, pg_base};
use serde_json::json;
use serde_norway::Value;

const BIN: &str = env!("CARGO_BIN_EXE_quickim");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn try_script(args: &[&str]) -> Result<String, String> {
    let out =
        Command::new(format!("{ROOT}/deploy/local-cluster.sh")).args(args).env("PG_URL", pg_base()).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if out.status.success() { Ok(text) } else { Err(format!("local-cluster.sh {args:?} failed:\n{text}")) }
}

fn script(args: &[&str]) -> String {
    try_script(args).unwrap_or_else(|e| panic!("{e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_local_cluster_sends_through_one_gateway_and_delivers_through_the_other() {
    let dir = tempfile::tempdir().unwrap();
    let dir_s = dir.path().to_str().unwrap().to_string();
    // Fixed ports below the ephemeral range, spread by process id to keep parallel runs apart.
    // Other tests take free ports from the same range, one of which may be in this cluster's
    // block by the time a process binds it (seen once: a gateway that exited at start): the
    // cluster is then stopped and started on another block.
    let database = format!("quickim_t_cluster_{}", std::process::id());
    let mut started = Err(String::new());
    for attempt in 0..3 {
        let base = (20_000 + ((std::process::id() + attempt * 67) % 200) * 50).to_string();
        started =
            try_script(&["start", "--dir", &dir_s, "--base-port", &base, "--binary", BIN, "--database", &database]);
        if started.is_ok() {
            break;
        }
        for log in
            std::fs::read_dir(dir.path()).unwrap().flatten().filter(|f| f.path().extension() == Some("log".as_ref()))
        {
            let text = std::fs::read_to_string(log.path()).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(10).collect::<Vec<_>>().into_iter().rev().collect();
            eprintln!("attempt {attempt}, {}:\n{}", log.path().display(), tail.join("\n"));
        }
        script(&["stop", "--dir", &dir_s]);
    }
    if let Err(e) = started {
        panic!("{e}");
    }
    let stop = || script(&["stop", "--dir", &dir_s, "--drop-database"]);
    let env: HashMap<String, String> = std::fs::read_to_string(dir.path().join("cluster.env"))
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect();
    let one = Api::new(&env["GATEWAY_1_PUBLIC"], &env["GATEWAY_1_INNER"], &env["INNER_KEY"]);
    let two = Api::new(&env["GATEWAY_2_PUBLIC"], &env["GATEWAY_2_INNER"], &env["INNER_KEY"]);
    one.conversation("deploy-check", &["alice", "bob"]).await;
    let alice = one.token("alice", "web").await;
    let bob = two.token("bob", "web").await;
    let mut ws = NotifyClient::connect(&two.public, &alice, Protocol::Ws, None).await.unwrap();
    let mut sse = NotifyClient::connect(&one.public, &bob, Protocol::Sse, None).await.unwrap();
    ws.next(Duration::from_secs(10)).await.unwrap();
    sse.next(Duration::from_secs(10)).await.unwrap();
    let (s, v) = one
        .client(&bob, "/send_msg", json!({"conversation_id":"deploy-check","type":1,"content":"via gateway 1"}))
        .await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = two
        .client(&alice, "/send_msg", json!({"conversation_id":"deploy-check","type":1,"content":"via gateway 2"}))
        .await;
    assert_eq!(s, 200, "{v}");
    for c in [&mut ws, &mut sse] {
        let a = c.next_message(Duration::from_secs(10)).await.unwrap();
        let b = c.next_message(Duration::from_secs(10)).await.unwrap();
        assert_eq!((a["content"].as_str(), b["content"].as_str()), (Some("via gateway 1"), Some("via gateway 2")));
    }
    for key in ["CONVERSATION_1_OPS", "CONVERSATION_2_OPS", "MESSAGE_1_OPS", "MESSAGE_2_OPS"] {
        let r = one.http.get(format!("http://{}/readyz", env[key])).send().await.unwrap();
        assert_eq!(r.status(), 200, "{key}");
    }
    drop((ws, sse));
    stop();
    let status = script(&["status", "--dir", &dir_s]);
    assert!(!status.contains("running"), "{status}");
}

fn yaml(path: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(format!("{ROOT}/{path}")).unwrap();
    serde_norway::Deserializer::from_str(&text)
        .map(|d| {
            let mut v: Value = serde::Deserialize::deserialize(d).unwrap();
            // `<<: *anchor` merges, as Docker Compose applies them.
            v.apply_merge().unwrap();
            v
        })
        .collect()
}

#[test]
fn compose_runs_the_whole_topology_with_tracing_and_metrics() {
    let compose = yaml("deploy/compose.yaml").remove(0);
    let services = compose["services"].as_mapping().unwrap();
    let names: Vec<&str> = services.keys().filter_map(|k| k.as_str()).collect();
    for s in [
        "nats",
        "postgres",
        "jaeger",
        "prometheus",
        "gateway-1",
        "gateway-2",
        "conversation-1",
        "conversation-2",
        "message-1",
        "message-2",
    ] {
        assert!(names.contains(&s), "compose lacks {s}");
    }
    let nats = services["nats"]["command"].as_sequence().unwrap();
    assert!(nats.iter().any(|a| a.as_str() == Some("--jetstream")), "JetStream on");
    let jaeger_ports: Vec<&str> =
        services["jaeger"]["ports"].as_sequence().unwrap().iter().filter_map(|p| p.as_str()).collect();
    assert!(jaeger_ports.iter().any(|p| p.contains("4317")) && jaeger_ports.iter().any(|p| p.contains("16686")));
    for role in ["gateway-1", "conversation-1", "message-2"] {
        let s = &services[role];
        let role_name = role.trim_end_matches(char::is_numeric).trim_end_matches('-');
        assert_eq!(s["command"][0].as_str(), Some(role_name));
        assert_eq!(s["environment"]["QUICKIM_OTLP_ENDPOINT"].as_str(), Some("http://jaeger:4317"));
        assert!(s["environment"]["QUICKIM_JWT_SECRET"].as_str().unwrap().contains(":?"), "no default secret");
    }
    let prometheus = yaml("deploy/prometheus.yml").remove(0);
    let targets = serde_json::to_string(&serde_json::to_value(&prometheus).unwrap()).unwrap();
    for t in ["gateway-1:8081", "gateway-2:8081", "conversation-1:9090", "message-2:9090"] {
        assert!(targets.contains(t), "prometheus scrapes {t}");
    }
}

#[test]
fn kubernetes_manifests_probe_drain_and_take_config_from_secrets() {
    let docs = yaml("deploy/k8s/quickim.yaml");
    let kinds = |k: &str| docs.iter().filter(|d| d["kind"].as_str() == Some(k)).collect::<Vec<_>>();
    let deployments = kinds("Deployment");
    assert_eq!(deployments.len(), 3);
    let config = kinds("ConfigMap")[0];
    let grace: u64 = config["data"]["QUICKIM_SHUTDOWN_GRACE_S"].as_str().unwrap().parse().unwrap();
    for d in &deployments {
        let spec = &d["spec"]["template"]["spec"];
        assert!(
            spec["terminationGracePeriodSeconds"].as_u64().unwrap() > grace + 5,
            "{}",
            d["metadata"]["name"].as_str().unwrap()
        );
        let c = &spec["containers"][0];
        assert_eq!(c["readinessProbe"]["httpGet"]["path"].as_str(), Some("/readyz"));
        assert_eq!(c["livenessProbe"]["httpGet"]["path"].as_str(), Some("/healthz"));
        let env = serde_json::to_string(&serde_json::to_value(&c["env"]).unwrap()).unwrap();
        assert!(env.contains("secretKeyRef"), "secrets come from the Secret");
    }
    let services: Vec<&str> = kinds("Service").iter().filter_map(|s| s["metadata"]["name"].as_str()).collect();
    for s in ["quickim-gateway", "quickim-conversation", "quickim-message"] {
        assert!(services.contains(&s), "a Service for {s}");
    }
    let secret = kinds("Secret")[0];
    assert!(
        secret["stringData"]["jwt-secret"].as_str().unwrap().starts_with("change-me"),
        "the placeholder is one quickim refuses at start-up"
    );
    assert_eq!(yaml("deploy/k8s/dependencies.yaml").len(), 4);
}
