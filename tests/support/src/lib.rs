//! Test helpers shared by the crates' tests: real dependencies on ephemeral ports.
//!
//! - [`NatsServer`]: a `nats-server` process on a free port (optionally with a configuration
//!   file, and restartable on the same port), killed on drop;
//! - [`PgDatabase`]: a fresh PostgreSQL database (named `quickim_t_…`), dropped by
//!   [`PgDatabase::drop_db`] (the test script also sweeps leftovers);
//! - [`PgServer`]: a PostgreSQL server of the test's own (for tests that restart it);
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
        Self::create_on(&pg_base()).await
    }

    /// A fresh database on the server at `base` (postgres://user@host:port).
    pub async fn create_on(base: &str) -> PgDatabase {
        let name = format!("quickim_t_{:016x}", rand::random::<u64>());
        let admin = format!("{base}/postgres");
        let mut conn = PgConnection::connect(&admin)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL at {admin} is needed for this test: {e}"));
        conn.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).await.expect("create database");
        conn.close().await.ok();
        PgDatabase { url: format!("{base}/{name}"), name }
    }

    /// Runs `sql` on the database (test set-up that no API offers).
    pub async fn execute(&self, sql: &str) {
        let mut conn = PgConnection::connect(&self.url).await.expect("connect");
        conn.execute(sqlx::AssertSqlSafe(sql.to_string())).await.expect("execute");
        conn.close().await.ok();
    }

    /// The server part of the URL (postgres://user@host:port).
    fn base(&self) -> &str {
        self.url.rsplit_once('/').map_or(&self.url, |(b, _)| b)
    }

    /// Drops the database (after every connection to it is closed).
    pub async fn drop_db(self) {
        let admin = format!("{}/postgres", self.base());
        if let Ok(mut conn) = PgConnection::connect(&admin).await {
            let _ =
                conn.execute(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name))).await;
            conn.close().await.ok();
        }
    }
}

/// A nats-server process on a free port; killed when dropped.
pub struct NatsServer {
    child: Option<Child>,
    pub port: u16,
    pub url: String,
    args: Vec<String>,
    _config: Option<tempfile::TempDir>,
}

impl NatsServer {
    pub fn start() -> NatsServer {
        Self::start_with(&[])
    }

    /// Starts nats-server with extra arguments (e.g. cluster settings).
    pub fn start_with(extra: &[&str]) -> NatsServer {
        Self::launch(extra.iter().map(|s| s.to_string()).collect(), None)
    }

    /// Starts nats-server with a configuration file holding `config` (e.g.
    /// `max_payload: 65536`, `write_deadline: "2s"`) and extra arguments.
    pub fn start_configured(config: &str, extra: &[&str]) -> NatsServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nats.conf");
        std::fs::write(&path, config).expect("nats config");
        let mut args = vec!["-c".to_string(), path.display().to_string()];
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::launch(args, Some(dir))
    }

    fn launch(args: Vec<String>, config: Option<tempfile::TempDir>) -> NatsServer {
        let port = free_port();
        let mut server =
            NatsServer { child: None, port, url: format!("nats://127.0.0.1:{port}"), args, _config: config };
        server.start_again();
        server
    }

    /// Kills the server (a crash: clients lose what was in flight).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same port with the same settings, once it is stopped;
    /// waits until it accepts connections.
    pub fn start_again(&mut self) {
        if self.child.is_some() {
            return;
        }
        let port = self.port.to_string();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut child = Command::new(nats_binary())
                .args(["-a", "127.0.0.1", "-p", &port])
                .args(&self.args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("nats-server must be installed (scripts/test.sh installs it)");
            let started = Instant::now();
            while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // the port is still held by the old process: try again
                }
                assert!(Instant::now() < deadline, "nats-server did not start on port {port}");
                std::thread::sleep(Duration::from_millis(20));
            }
            if started.elapsed() < Duration::from_secs(10) && matches!(child.try_wait(), Ok(None)) {
                self.child = Some(child);
                return;
            }
            assert!(Instant::now() < deadline, "nats-server did not start on port {port}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A PostgreSQL server of the test's own (initdb in a temporary directory, on a free port),
/// so that it can be restarted and have its backends terminated without disturbing other
/// tests. Stopped when dropped.
pub struct PgServer {
    dir: tempfile::TempDir,
    bin: std::path::PathBuf,
    pub port: u16,
    /// postgres://postgres@127.0.0.1:port
    pub base: String,
}

impl PgServer {
    pub fn start() -> PgServer {
        let bin = pg_bin_dir();
        let dir = tempfile::tempdir().expect("tempdir");
        if is_root() {
            // initdb refuses to run as root: the cluster belongs to the postgres user.
            let _ = Command::new("chown").args(["-R", "postgres", &dir.path().display().to_string()]).status();
        }
        let data = dir.path().join("data");
        let status = as_postgres(&bin.join("initdb"))
            .args(["-D", &data.display().to_string(), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("initdb (scripts/test.sh installs PostgreSQL)");
        assert!(status.success(), "initdb failed");
        let port = free_port();
        let server = PgServer { base: format!("postgres://postgres@127.0.0.1:{port}"), dir, bin, port };
        server.ctl(&["start"]);
        server
    }

    fn ctl(&self, action: &[&str]) {
        let data = self.dir.path().join("data");
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
            self.port,
            self.dir.path().display()
        );
        let status = as_postgres(&self.bin.join("pg_ctl"))
            .args(["-D", &data.display().to_string(), "-l", &self.dir.path().join("log").display().to_string()])
            .args(["-w", "-t", "60", "-o", &opts])
            .args(action)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("pg_ctl");
        assert!(status.success(), "pg_ctl {action:?} failed");
    }

    /// Stops the server as a crash would (`immediate`: no checkpoint) and starts it again.
    pub fn restart(&self) {
        self.ctl(&["-m", "immediate", "restart"]);
    }

    /// Stops the server (as a crash would); [`PgServer::start_again`] brings it back.
    pub fn stop(&self) {
        self.ctl(&["-m", "immediate", "stop"]);
    }

    /// Starts the server again after [`PgServer::stop`].
    pub fn start_again(&self) {
        self.ctl(&["start"]);
    }

    /// Terminates every backend connected to `database` (as an operator's
    /// `pg_terminate_backend` would).
    pub async fn terminate_backends(&self, database: &str) -> u64 {
        let admin = format!("{}/postgres", self.base);
        let mut conn = PgConnection::connect(&admin).await.expect("admin connection");
        let row: (i64,) = sqlx::query_as(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(database)
        .fetch_one(&mut conn)
        .await
        .expect("terminate backends");
        conn.close().await.ok();
        row.0 as u64
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let _ = as_postgres(&self.bin.join("pg_ctl"))
            .args(["-D", &data.display().to_string(), "-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn is_root() -> bool {
    std::env::var("USER").is_ok_and(|u| u == "root")
        || Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0"))
}

/// A command run as the postgres user when the tests run as root.
fn as_postgres(program: &std::path::Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// PostgreSQL's server programs (initdb, pg_ctl), newest version installed.
fn pg_bin_dir() -> std::path::PathBuf {
    let mut versions: Vec<u32> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default();
    versions.sort_unstable();
    match versions.last() {
        Some(v) => std::path::PathBuf::from(format!("/usr/lib/postgresql/{v}/bin")),
        None => std::path::PathBuf::from("/usr/bin"),
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
