//! The quickim binary in its roles, and an HTTP client for its API.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::{NatsServer, PgDatabase, free_port};

/// A JWT secret for tests (distributed roles need one).
pub const TEST_JWT_SECRET: &str = "test-secret-test-secret-test-secret-0001";
/// An inner key for tests.
pub const TEST_INNER_KEY: &str = "test-inner-key-0001";

/// A running quickim process; killed on drop. When the test panicked, the end of its log is
/// printed.
pub struct Process {
    child: Option<Child>,
    pub name: String,
    pub log: PathBuf,
}

impl Process {
    pub fn spawn(bin: &str, name: &str, args: &[&str], env: &HashMap<String, String>, log_dir: &Path) -> Process {
        let log = log_dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(bin)
            .args(args)
            .envs(env)
            .env("QUICKIM_LOG", env.get("QUICKIM_LOG").map(String::as_str).unwrap_or("info"))
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn quickim");
        Process { child: Some(child), name: name.to_string(), log }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Sends SIGTERM and waits (bounded) for the exit; answers the exit code.
    pub fn terminate(&mut self, wait: Duration) -> Option<i32> {
        let child = self.child.as_mut()?;
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        let deadline = Instant::now() + wait;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return status.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGSTOP: the process stops running (a stall), its sockets stay open.
    pub fn pause(&self) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill").args(["-STOP", &c.id().to_string()]).status();
        }
    }

    /// SIGCONT after [`Process::pause`].
    pub fn resume(&self) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill").args(["-CONT", &c.id().to_string()]).status();
        }
    }

    /// SIGKILL: a crash.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Whether the process has exited (and its code).
    pub fn exited(&mut self) -> Option<Option<i32>> {
        let child = self.child.as_mut()?;
        child.try_wait().ok().flatten().map(|s| s.code())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let text = self.log_text();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            eprintln!("---- last log lines of {} ----", self.name);
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// HTTP client for one gateway's public and inner listeners.
#[derive(Clone)]
pub struct Api {
    pub http: reqwest::Client,
    pub public: String,
    pub inner: String,
    pub key: String,
}

impl Api {
    pub fn new(public: &str, inner: &str, key: &str) -> Api {
        Api {
            http: reqwest::Client::builder().timeout(Duration::from_secs(30)).build().expect("client"),
            public: format!("http://{public}"),
            inner: format!("http://{inner}"),
            key: key.to_string(),
        }
    }

    async fn decode(resp: reqwest::Response) -> (StatusCode, Value) {
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let value = serde_json::from_str(&text).unwrap_or_else(|_| json!({ "raw": text }));
        (status, value)
    }

    /// POST to an /inner route with the inner key.
    pub async fn inner(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let resp = self
            .http
            .post(format!("{}{path}", self.inner))
            .bearer_auth(&self.key)
            .json(&body)
            .send()
            .await
            .expect("inner request");
        Self::decode(resp).await
    }

    /// POST to a public route as the token's user.
    pub async fn client(&self, token: &str, path: &str, body: Value) -> (StatusCode, Value) {
        let resp = self
            .http
            .post(format!("{}{path}", self.public))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .expect("client request");
        Self::decode(resp).await
    }

    /// POST a raw body to a public route.
    pub async fn raw(&self, token: Option<&str>, path: &str, body: impl Into<reqwest::Body>) -> (StatusCode, Value) {
        let mut req = self.http.post(format!("{}{path}", self.public)).body(body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        Self::decode(req.send().await.expect("raw request")).await
    }

    /// A token for `user` on `platform`.
    pub async fn token(&self, user: &str, platform: &str) -> String {
        let (status, v) = self.inner("/inner/get_token", json!({ "user_id": user, "platform": platform })).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        v["data"]["token"].as_str().expect("token").to_string()
    }

    /// Creates a conversation through /inner and answers its id.
    pub async fn conversation(&self, id: &str, members: &[&str]) -> String {
        let (status, v) = self
            .inner(
                "/inner/create_conversation",
                json!({ "conversation_id": id, "conversation_type": 1, "members": members }),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{v}");
        v["data"]["conversation_id"].as_str().expect("id").to_string()
    }

    /// Whether /readyz answers 200.
    pub async fn is_ready(&self) -> bool {
        matches!(self.http.get(format!("{}/readyz", self.public)).send().await, Ok(r) if r.status() == StatusCode::OK)
    }

    /// Waits until /readyz answers 200.
    pub async fn wait_ready(&self, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.is_ready().await {
            assert!(Instant::now() < deadline, "gateway at {} not ready within {within:?}", self.public);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Starts a process on the ports `start` picks (afresh at each call) and waits until its API
/// is ready. A port found free can still be taken before the process binds it; the process
/// then exits at once, and is started again on other ports.
async fn start_ready<T>(within: Duration, mut start: impl FnMut() -> (Process, Api, T)) -> (Process, Api, T) {
    for _ in 0..3 {
        let (mut p, api, extra) = start();
        let deadline = Instant::now() + within;
        loop {
            if api.is_ready().await {
                return (p, api, extra);
            }
            if p.exited().is_some() {
                let log = p.log_text();
                assert!(log.contains("Address already in use"), "{} exited before it was ready:\n{log}", p.name);
                break;
            }
            assert!(Instant::now() < deadline, "{} at {} not ready within {within:?}", p.name, api.public);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    panic!("no free ports found in 3 tries");
}

/// `quickim standalone` in a temporary data directory.
pub struct Standalone {
    pub process: Process,
    pub api: Api,
    pub data: tempfile::TempDir,
    pub env: HashMap<String, String>,
    bin: String,
}

impl Standalone {
    /// Starts with the test secrets and any extra `QUICKIM_*` settings.
    pub async fn start(bin: &str, extra: &[(&str, &str)]) -> Standalone {
        let data = tempfile::tempdir().expect("tempdir");
        let (process, api, env) = start_ready(Duration::from_secs(30), || {
            let (public, inner) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
            let mut env: HashMap<String, String> = HashMap::from([
                ("QUICKIM_DATA_DIR".into(), data.path().display().to_string()),
                ("QUICKIM_PUBLIC_ADDR".into(), public.clone()),
                ("QUICKIM_INNER_ADDR".into(), inner.clone()),
                ("QUICKIM_JWT_SECRET".into(), TEST_JWT_SECRET.into()),
                ("QUICKIM_INNER_KEY".into(), TEST_INNER_KEY.into()),
                // Every test client is 127.0.0.1: the per-address limits are off unless a
                // test of them sets them.
                ("QUICKIM_CONN_RATE_PER_IP".into(), "0".into()),
                ("QUICKIM_HANDSHAKE_RATE_PER_IP".into(), "0".into()),
            ]);
            for (k, v) in extra {
                env.insert(k.to_string(), v.to_string());
            }
            let process = Process::spawn(bin, "standalone", &["standalone"], &env, data.path());
            let key = env.get("QUICKIM_INNER_KEY").map(String::as_str).unwrap_or(TEST_INNER_KEY);
            let api = Api::new(&public, &inner, key);
            (process, api, env)
        })
        .await;
        Standalone { process, api, data, env, bin: bin.to_string() }
    }

    /// Stops (SIGTERM) and starts again on the same data directory and ports.
    pub async fn restart(&mut self) {
        let code = self.process.terminate(Duration::from_secs(20));
        assert_eq!(code, Some(0), "standalone did not stop cleanly");
        self.process = Process::spawn(&self.bin, "standalone-restarted", &["standalone"], &self.env, self.data.path());
        self.api.wait_ready(Duration::from_secs(30)).await;
    }
}

/// NATS + PostgreSQL + any number of each distributed role.
pub struct Distributed {
    pub nats: NatsServer,
    pub pg: Option<PgDatabase>,
    pub logs: tempfile::TempDir,
    pub conversation: Vec<Process>,
    pub message: Vec<Process>,
    pub gateways: Vec<(Process, Api)>,
    gateway_env: Vec<HashMap<String, String>>,
    /// The environment of each service, in start order (conversation and message).
    service_env: Vec<(String, HashMap<String, String>)>,
    /// The ops listener (host:port) of each service, in start order.
    pub service_ops: Vec<String>,
    bin: String,
    base_env: HashMap<String, String>,
}

impl Distributed {
    /// Starts `conv` conversation services, `msg` message services and `gw` gateways.
    pub async fn start(bin: &str, conv: usize, msg: usize, gw: usize, extra: &[(&str, &str)]) -> Distributed {
        Self::start_on(bin, NatsServer::start(), PgDatabase::create().await, conv, msg, gw, extra).await
    }

    /// As [`Distributed::start`], on the given NATS server and database.
    pub async fn start_on(
        bin: &str,
        nats: NatsServer,
        pg: PgDatabase,
        conv: usize,
        msg: usize,
        gw: usize,
        extra: &[(&str, &str)],
    ) -> Distributed {
        let logs = tempfile::tempdir().expect("tempdir");
        let mut base_env: HashMap<String, String> = HashMap::from([
            ("QUICKIM_NATS_URL".into(), nats.url.clone()),
            ("QUICKIM_DATABASE_URL".into(), pg.url.clone()),
            ("QUICKIM_JWT_SECRET".into(), TEST_JWT_SECRET.into()),
            ("QUICKIM_INNER_KEY".into(), TEST_INNER_KEY.into()),
            ("QUICKIM_DB_MAX_CONNECTIONS".into(), "8".into()),
            ("QUICKIM_CONN_RATE_PER_IP".into(), "0".into()),
            ("QUICKIM_HANDSHAKE_RATE_PER_IP".into(), "0".into()),
        ]);
        for (k, v) in extra {
            base_env.insert(k.to_string(), v.to_string());
        }
        let mut d = Distributed {
            nats,
            pg: Some(pg),
            logs,
            conversation: Vec::new(),
            message: Vec::new(),
            gateways: Vec::new(),
            gateway_env: Vec::new(),
            service_env: Vec::new(),
            service_ops: Vec::new(),
            bin: bin.to_string(),
            base_env,
        };
        for _ in 0..conv {
            d.add_service("conversation");
        }
        for _ in 0..msg {
            d.add_service("message");
        }
        for _ in 0..gw {
            d.add_gateway().await;
        }
        d
    }

    pub fn add_service(&mut self, role: &str) {
        self.add_service_with(role, &[]);
    }

    /// As [`Distributed::add_service`], with extra (or overriding) `QUICKIM_*` settings.
    pub fn add_service_with(&mut self, role: &str, extra: &[(&str, &str)]) {
        let n = self.conversation.len() + self.message.len();
        let mut env = self.base_env.clone();
        for (k, v) in extra {
            env.insert(k.to_string(), v.to_string());
        }
        env.insert("QUICKIM_NODE_ID".into(), format!("{role}-{n}"));
        let ops = format!("127.0.0.1:{}", free_port());
        env.insert("QUICKIM_OPS_ADDR".into(), ops.clone());
        self.service_ops.push(ops);
        let p = Process::spawn(&self.bin, &format!("{role}-{n}"), &[role], &env, self.logs.path());
        self.service_env.push((role.to_string(), env));
        if role == "conversation" { self.conversation.push(p) } else { self.message.push(p) }
    }

    /// Kills message service `i` (SIGKILL: a crash) and starts it again at once.
    pub fn restart_message_service(&mut self, i: usize) {
        let (_, env) = self.service_env.iter().filter(|(r, _)| r == "message").nth(i).expect("message service").clone();
        self.message[i].kill();
        let name = format!("{}-again", env.get("QUICKIM_NODE_ID").map(String::as_str).unwrap_or("message"));
        self.message[i] = Process::spawn(&self.bin, &name, &["message"], &env, self.logs.path());
    }

    /// Kills gateway `i` (SIGKILL: a crash) and starts it again on the same addresses; waits
    /// until it is ready.
    pub async fn crash_gateway(&mut self, i: usize) {
        self.gateways[i].0.kill();
        self.start_gateway_again(i).await;
    }

    /// Starts one more gateway and waits until it is ready; answers its index.
    pub async fn add_gateway(&mut self) -> usize {
        self.add_gateway_with(&[]).await
    }

    /// As [`Distributed::add_gateway`], with extra (or overriding) `QUICKIM_*` settings.
    pub async fn add_gateway_with(&mut self, extra: &[(&str, &str)]) -> usize {
        let i = self.gateways.len();
        let (p, api, env) = start_ready(Duration::from_secs(60), || {
            let (public, inner) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
            let mut env = self.base_env.clone();
            for (k, v) in extra {
                env.insert(k.to_string(), v.to_string());
            }
            env.insert("QUICKIM_PUBLIC_ADDR".into(), public.clone());
            env.insert("QUICKIM_INNER_ADDR".into(), inner.clone());
            env.insert("QUICKIM_NODE_ID".into(), format!("gateway-{i}"));
            let p = Process::spawn(&self.bin, &format!("gateway-{i}"), &["gateway"], &env, self.logs.path());
            (p, Api::new(&public, &inner, TEST_INNER_KEY), env)
        })
        .await;
        self.gateways.push((p, api));
        self.gateway_env.push(env);
        i
    }

    /// Stops gateway `i` (SIGTERM) and leaves it stopped.
    pub fn stop_gateway(&mut self, i: usize) -> Option<i32> {
        self.gateways[i].0.terminate(Duration::from_secs(20))
    }

    /// Starts gateway `i` again on the same addresses and waits until it is ready.
    pub async fn start_gateway_again(&mut self, i: usize) {
        let p = Process::spawn(
            &self.bin,
            &format!("gateway-{i}-again"),
            &["gateway"],
            &self.gateway_env[i],
            self.logs.path(),
        );
        self.gateways[i].0 = p;
        self.gateways[i].1.wait_ready(Duration::from_secs(60)).await;
    }

    pub fn api(&self, i: usize) -> &Api {
        &self.gateways[i].1
    }

    /// Stops every process and drops the database.
    pub async fn finish(mut self) {
        for (p, _) in &mut self.gateways {
            p.kill();
        }
        for p in self.conversation.iter_mut().chain(self.message.iter_mut()) {
            p.kill();
        }
        if let Some(pg) = self.pg.take() {
            pg.drop_db().await;
        }
    }
}
