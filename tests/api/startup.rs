//! Start-up: configuration errors stop the binary with a clear message.

use std::process::Command;

use crate::BIN;

fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let out = Command::new(BIN)
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .env("QUICKIM_DATA_DIR", std::env::temp_dir().join("quickim-startup-test"))
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout),
    )
}

#[test]
fn distributed_roles_refuse_to_start_without_their_settings() {
    let (code, err) = run(&["gateway"], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("nats_url"), "{err}");
    let (code, err) = run(&["gateway", "--nats-url", "nats://127.0.0.1:1"], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("jwt_secret") && err.contains("no default secret"), "{err}");
    let (code, err) =
        run(&["gateway"], &[("QUICKIM_NATS_URL", "nats://127.0.0.1:1"), ("QUICKIM_JWT_SECRET", "too-short")]);
    assert_eq!(code, 2);
    assert!(err.contains("at least 32"), "{err}");
    let (code, err) = run(&["message", "--nats-url", "nats://127.0.0.1:1"], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("database_url"), "{err}");
}

#[test]
fn bad_values_stop_start_up_with_the_key_named() {
    let (code, err) = run(&["--public-addr", "not-an-address"], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("--public-addr"), "{err}");
    let (code, err) = run(&[], &[("QUICKIM_RANGE_MAX", "lots")]);
    assert_eq!(code, 2);
    assert!(err.contains("QUICKIM_RANGE_MAX") || err.contains("range-max"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("q.toml");
    std::fs::write(&file, "publik_addr = \"127.0.0.1:1\"\n").unwrap();
    let (code, err) = run(&["--config", file.to_str().unwrap()], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("publik_addr"), "{err}");
    let (code, err) = run(&["--config", "/nonexistent/q.toml"], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("does not exist"), "{err}");
}

#[test]
fn help_documents_every_role_and_key() {
    let (code, out) = run(&["--help"], &[]);
    assert_eq!(code, 0);
    for role in ["standalone", "gateway", "conversation", "message"] {
        assert!(out.contains(role), "--help names the {role} role");
    }
    for key in [
        "public-addr",
        "inner-addr",
        "inner-key",
        "jwt-secret",
        "data-dir",
        "database-url",
        "nats-url",
        "otlp-endpoint",
        "cors-origins",
    ] {
        assert!(out.contains(&format!("--{key}")), "--help lists --{key}");
        let env = format!("QUICKIM_{}", key.replace('-', "_").to_uppercase());
        assert!(out.contains(&env), "--help names {env}");
    }
}

#[test]
fn the_listeners_must_be_free() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let (code, err) =
        run(&["--public-addr", &addr, "--inner-addr", "127.0.0.1:0", "--data-dir", dir.path().to_str().unwrap()], &[]);
    assert_ne!(code, 0);
    assert!(err.contains(&addr), "{err}");
}
