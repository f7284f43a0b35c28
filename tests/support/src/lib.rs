//! Test helpers shared by the crates' tests: real dependencies on ephemeral ports.
//!
//! - [`NatsServer`]: a `nats-server` process on a free port, killed on drop;
//! - [`PgDatabase`]: a fresh PostgreSQL database (named `quickim_t_…`), dropped by
//!   [`PgDatabase::drop_db`] (the test script also sweeps leftovers);
//! - [`free_port`]: a port nobody listens on;
//! - [`Standalone`], [`Distributed`]: the `quickim` binary in its roles, with an [`Api`]
//!   client for the public and inner routes.
//!
//! PostgreSQL is found at `QUICKIM_TEST_PG` (default `postgres://postgres@127.0.0.1:5432`).
#![allow(clippy::expect_used, clippy::unwrap_used, missing_docs)]

mod clients;
mod quickim;
pub use clients::*;
pub use quickim::*;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sqlx::{Connection, Executor, PgConnection};

/// A port that was free a moment ago, chosen below the kernel's ephemeral range: a port from
/// that range (what binding port 0 gives) can be taken by any outgoing connection of the
/// test run before the process under test binds it (seen: a gateway that could not listen).
pub fn free_port() -> u16 {
    let first_ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next().and_then(|p| p.parse::<u16>().ok()))
        .unwrap_or(32768);
    if first_ephemeral > 12000 {
        for _ in 0..100 {
            let port = rand::random_range(10000..first_ephemeral);
            if TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// Base URL of the PostgreSQL server used by tests.
pub fn pg_base() -> String {
    std::env::var("QUICKIM_TEST_PG").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_string())
}

/// A database created for one test.
pub struct PgDatabase {
    pub url: String,
    pub name: String,
}

impl PgDatabase {
    pub async fn create() -> PgDatabase {
        let name = format!("quickim_t_{:016x}", rand::random::<u64>());
        let admin = format!("{}/postgres", pg_base());
        let mut conn = PgConnection::connect(&admin)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL at {admin} is needed for this test: {e}"));
        conn.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).await.expect("create database");
        conn.close().await.ok();
        PgDatabase { url: format!("{}/{name}", pg_base()), name }
    }

    /// Drops the database (after every connection to it is closed).
    pub async fn drop_db(self) {
        let admin = format!("{}/postgres", pg_base());
        if let Ok(mut conn) = PgConnection::connect(&admin).await {
            let _ =
                conn.execute(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name))).await;
            conn.close().await.ok();
        }
    }
}

/// A nats-server process on a free port; killed when dropped.
pub struct NatsServer {
    child: Child,
    pub port: u16,
    pub url: String,
}

impl NatsServer {
    pub fn start() -> NatsServer {
        Self::start_with(&[])
    }

    /// Starts nats-server with extra arguments (e.g. cluster settings).
    pub fn start_with(extra: &[&str]) -> NatsServer {
        let port = free_port();
        let child = Command::new(nats_binary())
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server must be installed (scripts/test.sh installs it)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not start on port {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        NatsServer { child, port, url: format!("nats://127.0.0.1:{port}") }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn nats_binary() -> String {
    std::env::var("QUICKIM_NATS_SERVER").unwrap_or_else(|_| {
        for p in ["/usr/sbin/nats-server", "/usr/bin/nats-server", "/usr/local/bin/nats-server"] {
            if std::path::Path::new(p).exists() {
                return p.to_string();
            }
        }
        "nats-server".to_string()
    })
}
