//! Configuration: typed, layered, fail-fast.
//!
//! Layers, later ones win: built-in defaults → TOML file (`--config` / `QUICKIM_CONFIG`) →
//! `QUICKIM_*` environment → command-line flags. Every key exists in all three forms, because
//! one table below generates both [`Config`] and the flags ([`ConfigArgs`], whose values clap
//! also reads from the environment). A bad value stops start-up with a message naming the key.
//! Secrets are [`Secret`]s: never printed, not even by `Debug`.

use std::net::SocketAddr;
use std::path::PathBuf;

use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// A string that is never shown in logs or `Debug` output.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }
    /// The secret itself; only for use, never for display.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

macro_rules! config_keys {
    ($(
        $(#[doc = $doc:literal])+
        $(#[arg($($arg:tt)*)])*
        $name:ident : $ty:ty => $argty:ty = $default:expr, env $env:literal;
    )*) => {
        /// The whole configuration of every role (see docs/operations.md for each key).
        #[derive(Debug, Clone, Serialize, Deserialize)]
        #[serde(deny_unknown_fields, default)]
        pub struct Config {
            $( $(#[doc = $doc])+ pub $name: $ty, )*
        }

        impl Default for Config {
            fn default() -> Self {
                Config { $( $name: $default, )* }
            }
        }

        /// Command-line flags for every key; each also reads its `QUICKIM_*` variable.
        #[derive(Debug, Clone, Default, clap::Args, Serialize)]
        pub struct ConfigArgs {
            /// TOML configuration file (keys as below, snake_case)
            #[arg(long, env = "QUICKIM_CONFIG", global = true)]
            #[serde(skip)]
            pub config: Option<PathBuf>,
            $(
                $(#[doc = $doc])+
                #[arg(long, env = $env, global = true, hide_env_values = true $(, $($arg)*)*)]
                #[serde(skip_serializing_if = "Option::is_none")]
                pub $name: Option<$argty>,
            )*
        }

        /// Every key with its environment variable, for docs and tests.
        pub const KEYS: &[(&str, &str)] = &[ $( (stringify!($name), $env), )* ];
    };
}

config_keys! {
    /// Public listener: client API and /notify
    public_addr: SocketAddr => SocketAddr = SocketAddr::from(([127, 0, 0, 1], 8080)), env "QUICKIM_PUBLIC_ADDR";
    /// /inner listener for business systems
    inner_addr: SocketAddr => SocketAddr = SocketAddr::from(([127, 0, 0, 1], 8081)), env "QUICKIM_INNER_ADDR";
    /// Bearer key for /inner (standalone: generated in the data dir if unset)
    inner_key: Option<Secret> => String = None, env "QUICKIM_INNER_KEY";
    /// HS256 secret for client tokens, at least 32 bytes (standalone: generated if unset)
    jwt_secret: Option<Secret> => String = None, env "QUICKIM_JWT_SECRET";
    /// PEM public keys (RSA → RS256, Ed25519 → EdDSA) also accepted for client tokens, comma-separated paths
    #[arg(value_delimiter = ',')]
    jwt_public_keys: Vec<PathBuf> => Vec<PathBuf> = Vec::new(), env "QUICKIM_JWT_PUBLIC_KEYS";
    /// Default lifetime of tokens from /inner/get_token, seconds
    token_ttl_s: u64 => u64 = 86_400, env "QUICKIM_TOKEN_TTL_S";
    /// Longest lifetime /inner/get_token grants, seconds
    token_max_ttl_s: u64 => u64 = 30 * 86_400, env "QUICKIM_TOKEN_MAX_TTL_S";
    /// How long a /notify ticket (POST /notify_ticket) may be used, seconds
    notify_ticket_ttl_s: u64 => u64 = 30, env "QUICKIM_NOTIFY_TICKET_TTL_S";
    /// Service roles: listener for /healthz, /readyz and /metrics (default 127.0.0.1:9090 for conversation, :9091 for message)
    ops_addr: Option<SocketAddr> => SocketAddr = None, env "QUICKIM_OPS_ADDR";
    /// Standalone SQLite file and generated secrets
    data_dir: PathBuf => PathBuf = PathBuf::from("./data"), env "QUICKIM_DATA_DIR";
    /// postgres://… for the distributed services
    database_url: Option<String> => String = None, env "QUICKIM_DATABASE_URL";
    /// Most database connections per process
    db_max_connections: u32 => u32 = 16, env "QUICKIM_DB_MAX_CONNECTIONS";
    /// nats://… for every distributed role
    nats_url: Option<String> => String = None, env "QUICKIM_NATS_URL";
    /// NATS user (with nats_password)
    nats_user: Option<String> => String = None, env "QUICKIM_NATS_USER";
    /// NATS password (with nats_user)
    nats_password: Option<Secret> => String = None, env "QUICKIM_NATS_PASSWORD";
    /// NATS token
    nats_token: Option<Secret> => String = None, env "QUICKIM_NATS_TOKEN";
    /// NATS NKey seed (SU…)
    nats_nkey_seed: Option<Secret> => String = None, env "QUICKIM_NATS_NKEY_SEED";
    /// NATS credentials file (.creds: JWT and NKey seed)
    nats_creds_file: Option<PathBuf> => PathBuf = None, env "QUICKIM_NATS_CREDS_FILE";
    /// CA certificate (PEM) to verify the NATS server with; turns TLS on
    nats_tls_ca: Option<PathBuf> => PathBuf = None, env "QUICKIM_NATS_TLS_CA";
    /// Client certificate (PEM) for NATS servers that verify clients (with nats_tls_key)
    nats_tls_cert: Option<PathBuf> => PathBuf = None, env "QUICKIM_NATS_TLS_CERT";
    /// Client key (PEM) for nats_tls_cert
    nats_tls_key: Option<PathBuf> => PathBuf = None, env "QUICKIM_NATS_TLS_KEY";
    /// Refuse a NATS server that does not offer TLS
    nats_require_tls: bool => bool = false, env "QUICKIM_NATS_REQUIRE_TLS";
    /// Put every NATS subject behind this prefix (e.g. `prod` → `prod.quickim.msg.send`) so that several deployments share one NATS; every role of a deployment needs the same
    nats_subject_prefix: String => String = String::new(), env "QUICKIM_NATS_SUBJECT_PREFIX";
    /// Name of this node in logs, traces and presence (default: role-host-pid)
    node_id: Option<String> => String = None, env "QUICKIM_NODE_ID";
    /// OTLP endpoint; trace export is off when unset
    otlp_endpoint: Option<String> => String = None, env "QUICKIM_OTLP_ENDPOINT";
    /// OTLP transport: grpc or http (protobuf)
    otlp_protocol: String => String = "grpc".to_string(), env "QUICKIM_OTLP_PROTOCOL";
    /// Fraction of traces sampled, 0.0–1.0
    trace_sample_ratio: f64 => f64 = 1.0, env "QUICKIM_TRACE_SAMPLE_RATIO";
    /// Log filter (RUST_LOG syntax)
    log: String => String = "info".to_string(), env "QUICKIM_LOG";
    /// Log format: text or json
    log_format: String => String = "text".to_string(), env "QUICKIM_LOG_FORMAT";
    /// Log lines name the spans they happen in (costs every request its spans' formatting)
    log_spans: bool => bool = false, env "QUICKIM_LOG_SPANS";
    /// Allowed browser origins (CORS and WebSocket Origin check), comma-separated
    #[arg(value_delimiter = ',')]
    cors_origins: Vec<String> => Vec<String> = Vec::new(), env "QUICKIM_CORS_ORIGINS";
    /// Serve the demo chat page at /demo (default: on in standalone, off for the gateway role)
    demo: Option<bool> => bool = None, env "QUICKIM_DEMO";
    /// The demo page's files (built by `npm run build` in clients/js)
    demo_dir: PathBuf => PathBuf = PathBuf::from("clients/js/dist/demo"), env "QUICKIM_DEMO_DIR";
    /// POST /demo/token: a token for any user id, no password (standalone only; default: on while demo is on and the public listener is a loopback address)
    demo_tokens: Option<bool> => bool = None, env "QUICKIM_DEMO_TOKENS";
    /// Largest message content, UTF-8 bytes
    max_content_bytes: usize => usize = 64 * 1024, env "QUICKIM_MAX_CONTENT_BYTES";
    /// Largest public request body, bytes
    max_body_bytes: usize => usize = 80 * 1024, env "QUICKIM_MAX_BODY_BYTES";
    /// Largest /inner request body, bytes (batches)
    inner_max_body_bytes: usize => usize = 8 * 1024 * 1024, env "QUICKIM_INNER_MAX_BODY_BYTES";
    /// Most items in /inner/send_msg_batch
    send_batch_max: usize => usize = 500, env "QUICKIM_SEND_BATCH_MAX";
    /// Most messages per history answer
    range_max: u32 => u32 = 100, env "QUICKIM_RANGE_MAX";
    /// Most active members of one conversation (joins past it: 409 conversation_full)
    max_members: u64 => u64 = 100_000, env "QUICKIM_MAX_MEMBERS";
    /// Whether clients may name other members in /create_conversation
    client_create_members: bool => bool = false, env "QUICKIM_CLIENT_CREATE_MEMBERS";
    /// How long after sending a member may edit its message, seconds; 0 = no limit (/inner has none)
    edit_window_s: u64 => u64 = 86_400, env "QUICKIM_EDIT_WINDOW_S";
    /// How long after sending a member may recall its message, seconds; 0 = no limit (/inner has none)
    recall_window_s: u64 => u64 = 86_400, env "QUICKIM_RECALL_WINDOW_S";
    /// System message types (negative) that count as unread, comma-separated; none by default
    #[arg(value_delimiter = ',', allow_negative_numbers = true)]
    unread_system_types: Vec<i32> => Vec<i32> = Vec::new(), env "QUICKIM_UNREAD_SYSTEM_TYPES";
    /// Longest conversation title, UTF-8 bytes
    title_max_bytes: usize => usize = 256, env "QUICKIM_TITLE_MAX_BYTES";
    /// Longest conversation avatar (URL or id), UTF-8 bytes
    avatar_max_bytes: usize => usize = 2048, env "QUICKIM_AVATAR_MAX_BYTES";
    /// Largest conversation ext (a JSON object), bytes as JSON
    ext_max_bytes: usize => usize = 4096, env "QUICKIM_EXT_MAX_BYTES";
    /// The before_send hook: an http:// or https:// URL asked about every member's message before it is stored (accept, reject or rewrite); unset: none
    before_send_url: Option<String> => String = None, env "QUICKIM_BEFORE_SEND_URL";
    /// Longest wait for the before_send hook's answer, ms
    before_send_timeout_ms: u64 => u64 = 1_000, env "QUICKIM_BEFORE_SEND_TIMEOUT_MS";
    /// When the before_send hook fails (no answer in time, an error): accept the message (true) or refuse it with 503 hook_unavailable (false)
    before_send_fail_open: bool => bool = true, env "QUICKIM_BEFORE_SEND_FAIL_OPEN";
    /// More root certificates (a PEM file) trusted for https:// hook and webhook URLs, besides the system's
    hook_ca_file: Option<String> => String = None, env "QUICKIM_HOOK_CA_FILE";
    /// Secret that signs hook calls (Standard Webhooks: whsec_ and the base64 of at least 16 bytes); unset: unsigned
    hook_secret: Option<Secret> => String = None, env "QUICKIM_HOOK_SECRET";
    /// Outbound webhooks: a JSON array of endpoints, each {"id","url" (http:// or https://),"events"?:[…],"secret"?:"whsec_…","start"?:"now"|"beginning"} (docs/hooks.md); unset: none
    webhooks: Option<String> => String = None, env "QUICKIM_WEBHOOKS";
    /// Most events per webhook POST
    webhook_batch_max: usize => usize = 100, env "QUICKIM_WEBHOOK_BATCH_MAX";
    /// How long a webhook batch that is not full waits for more events, ms
    webhook_linger_ms: u64 => u64 = 200, env "QUICKIM_WEBHOOK_LINGER_MS";
    /// Longest wait for a webhook receiver's answer, ms
    webhook_timeout_ms: u64 => u64 = 5_000, env "QUICKIM_WEBHOOK_TIMEOUT_MS";
    /// A webhook receiver failing this long is reported (error log, quickim_webhook_failing), seconds
    webhook_alert_after_s: u64 => u64 = 300, env "QUICKIM_WEBHOOK_ALERT_AFTER_S";
    /// A webhook receiver failing this long is skipped past (its events dropped), seconds; 0: never
    webhook_skip_after_s: u64 => u64 = 0, env "QUICKIM_WEBHOOK_SKIP_AFTER_S";
    /// Signals (typing, ...) per second per user (per gateway node; burst: twice that); 0 = unlimited
    signal_rate_per_s: u32 => u32 = 5, env "QUICKIM_SIGNAL_RATE_PER_S";
    /// Largest content of a signal, UTF-8 bytes
    signal_max_bytes: usize => usize = 256, env "QUICKIM_SIGNAL_MAX_BYTES";
    /// How long receivers show "typing" unless it is renewed, seconds (sent with each typing event)
    typing_ttl_s: u64 => u64 = 6, env "QUICKIM_TYPING_TTL_S";
    /// A user whose last connection closed is announced offline only after this long without one, seconds (0: at once)
    presence_debounce_s: u64 => u64 = 5, env "QUICKIM_PRESENCE_DEBOUNCE_S";
    /// A stream not finished this long after it was opened is cancelled, seconds
    stream_timeout_s: u64 => u64 = 600, env "QUICKIM_STREAM_TIMEOUT_S";
    /// Largest stream delta, UTF-8 bytes
    stream_delta_max_bytes: usize => usize = 4096, env "QUICKIM_STREAM_DELTA_MAX_BYTES";
    /// Public API requests per second per user (per gateway node); 0 = unlimited
    rate_limit_per_s: u32 => u32 = 100, env "QUICKIM_RATE_LIMIT_PER_S";
    /// Burst above the rate
    rate_limit_burst: u32 => u32 = 200, env "QUICKIM_RATE_LIMIT_BURST";
    /// How long the gateway waits for a service answer, ms
    request_timeout_ms: u64 => u64 = 5_000, env "QUICKIM_REQUEST_TIMEOUT_MS";
    /// Log partitions of a new database, fixed once it exists (default: 1 standalone, 8 distributed)
    log_partitions: Option<u16> => u16 = None, env "QUICKIM_LOG_PARTITIONS";
    /// Cursors older than this are answered with resync, seconds
    replay_retention_s: u64 => u64 = 86_400, env "QUICKIM_REPLAY_RETENTION_S";
    /// How long idempotency keys (client_msg_id) are kept, seconds (at least a day); a send retried after is stored again
    idempotency_ttl_s: u64 => u64 = 7 * 86_400, env "QUICKIM_IDEMPOTENCY_TTL_S";
    /// Delete messages older than this, seconds; 0 keeps them forever. At least idempotency_ttl_s and replay_retention_s
    message_retention_s: u64 => u64 = 0, env "QUICKIM_MESSAGE_RETENTION_S";
    /// Messages per replay page on resume (and most events per long-poll answer)
    replay_page: u32 => u32 = 500, env "QUICKIM_REPLAY_PAGE";
    /// How often a gateway reads recent token revocations from the store (closing the streams of a kick it missed), seconds
    revocation_poll_s: u64 => u64 = 5, env "QUICKIM_REVOCATION_POLL_S";
    /// Open /notify connections per user per gateway node
    max_connections_per_user: u32 => u32 = 32, env "QUICKIM_MAX_CONNECTIONS_PER_USER";
    /// Events queued per connection before it counts as a slow consumer
    queue_max_events: usize => usize = 1024, env "QUICKIM_QUEUE_MAX_EVENTS";
    /// Bytes queued per connection before it counts as a slow consumer
    queue_max_bytes: usize => usize = 4 * 1024 * 1024, env "QUICKIM_QUEUE_MAX_BYTES";
    /// Longest a client may take to send a request head once it has begun (slow-header clients are cut), seconds
    header_read_timeout_s: u64 => u64 = 10, env "QUICKIM_HEADER_READ_TIMEOUT_S";
    /// Longest a client may take to send a request body (slow-body clients get 408), seconds
    body_read_timeout_s: u64 => u64 = 10, env "QUICKIM_BODY_READ_TIMEOUT_S";
    /// New connections per second from one IP address on the public listener (burst: twice that); 0 = unlimited
    conn_rate_per_ip: u32 => u32 = 200, env "QUICKIM_CONN_RATE_PER_IP";
    /// New /notify streams (WebSocket handshakes, SSE, a long-poll without a parked session) per second from one IP address (burst: twice that); 0 = unlimited
    handshake_rate_per_ip: u32 => u32 = 100, env "QUICKIM_HANDSHAKE_RATE_PER_IP";
    /// Whether a public client's `traceparent` header joins its request to the client's trace (and its sampling decision); off, it is only recorded as an attribute
    trust_client_traceparent: bool => bool = false, env "QUICKIM_TRUST_CLIENT_TRACEPARENT";
    /// Pending connections the kernel queues for each listener before the node accepts them (capped by net.core.somaxconn); a burst of reconnects beyond it waits a SYN retransmit (1 s)
    listen_backlog: u32 => u32 = 4096, env "QUICKIM_LISTEN_BACKLOG";
    /// A client connection whose writes make no progress this long (it stopped reading) is closed, on every transport, seconds
    write_timeout_s: u64 => u64 = 10, env "QUICKIM_WRITE_TIMEOUT_S";
    /// SSE heartbeat comment interval, seconds (≤ 15)
    sse_heartbeat_s: u64 => u64 = 15, env "QUICKIM_SSE_HEARTBEAT_S";
    /// WebSocket ping interval, seconds; a peer silent for two intervals is closed
    ws_ping_s: u64 => u64 = 20, env "QUICKIM_WS_PING_S";
    /// Largest WebSocket frame a client may send, bytes
    ws_max_frame_bytes: usize => usize = 96 * 1024, env "QUICKIM_WS_MAX_FRAME_BYTES";
    /// Frames per second a WebSocket client may send (burst: twice that)
    ws_frames_per_s: u32 => u32 = 50, env "QUICKIM_WS_FRAMES_PER_S";
    /// Default long-poll wait, seconds
    poll_timeout_s: u64 => u64 = 30, env "QUICKIM_POLL_TIMEOUT_S";
    /// Longest long-poll wait a client may ask for, seconds
    poll_max_timeout_s: u64 => u64 = 60, env "QUICKIM_POLL_MAX_TIMEOUT_S";
    /// How long a gap in a log partition may stay open before it is filled from the store, ms
    gap_fill_ms: u64 => u64 = 200, env "QUICKIM_GAP_FILL_MS";
    /// A gateway whose log partition stays behind its head this long stops serving /notify (not ready, streams closed with node_behind) until it has caught up, seconds
    hub_stall_s: u64 => u64 = 20, env "QUICKIM_HUB_STALL_S";
    /// Most bytes of early log entries a gateway holds back while a gap is open (more are read from the store)
    hub_max_held_bytes: usize => usize = 64 * 1024 * 1024, env "QUICKIM_HUB_MAX_HELD_BYTES";
    /// Most bytes of recent log entries a gateway keeps in memory to answer resumes without reading the store; 0 = off
    hub_replay_window_bytes: usize => usize = 32 * 1024 * 1024, env "QUICKIM_HUB_REPLAY_WINDOW_BYTES";
    /// Graceful shutdown: longest wait for streams and requests to finish, seconds
    shutdown_grace_s: u64 => u64 = 10, env "QUICKIM_SHUTDOWN_GRACE_S";
}

/// Which process this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// Everything in one process, SQLite, in-process bus.
    Standalone,
    /// Public + inner API and /notify, over NATS.
    Gateway,
    /// Conversation service, over NATS + PostgreSQL.
    Conversation,
    /// Message service, over NATS + PostgreSQL.
    Message,
}

impl Role {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Role::Standalone => "standalone",
            Role::Gateway => "gateway",
            Role::Conversation => "conversation",
            Role::Message => "message",
        }
    }
}

/// A configuration that cannot be used; the message names the key.
#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(pub String);

/// The shortest accepted HS256 secret.
pub const MIN_SECRET_LEN: usize = 32;

impl Config {
    /// Builds the configuration from the layers and checks it for `role`.
    pub fn load(args: &ConfigArgs, role: Role) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = &args.config {
            if !path.is_file() {
                return Err(ConfigError(format!("config file {} does not exist", path.display())));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        figment = figment.merge(Serialized::globals(args));
        let mut config: Config = figment.extract().map_err(|e| ConfigError(e.to_string()))?;
        config.validate(role)?;
        config.resolve_demo(role);
        Ok(config)
    }

    /// Checks values and the keys `role` requires.
    pub fn validate(&self, role: Role) -> Result<(), ConfigError> {
        let fail = |m: String| Err(ConfigError(m));
        if !(0.0..=1.0).contains(&self.trace_sample_ratio) {
            return fail(format!("trace_sample_ratio must be within 0.0–1.0, not {}", self.trace_sample_ratio));
        }
        if !matches!(self.otlp_protocol.as_str(), "grpc" | "http") {
            return fail(format!("otlp_protocol must be grpc or http, not {:?}", self.otlp_protocol));
        }
        if !matches!(self.log_format.as_str(), "text" | "json") {
            return fail(format!("log_format must be text or json, not {:?}", self.log_format));
        }
        if let Some(n) = self.log_partitions.filter(|n| *n == 0 || *n > 256) {
            return fail(format!("log_partitions must be within 1–256, not {n}"));
        }
        if self.max_content_bytes == 0 || self.max_body_bytes < self.max_content_bytes {
            return fail("max_body_bytes must be at least max_content_bytes (> 0)".into());
        }
        if self.range_max == 0 || self.range_max > 1000 {
            return fail(format!("range_max must be within 1–1000, not {}", self.range_max));
        }
        if self.send_batch_max == 0 {
            return fail("send_batch_max must be at least 1".into());
        }
        if let Some(t) = self.unread_system_types.iter().find(|t| !crate::protocol::system::ALL.contains(t)) {
            return fail(format!(
                "unread_system_types lists {t}, which is not a system type ({:?})",
                crate::protocol::system::ALL
            ));
        }
        if self.signal_max_bytes > 4096 {
            return fail(format!("signal_max_bytes must be at most 4096, not {}", self.signal_max_bytes));
        }
        if let Some(u) = &self.before_send_url
            && !(u.starts_with("http://") || u.starts_with("https://"))
        {
            return fail(format!("before_send_url must be an http:// or https:// URL, not {u:?}"));
        }
        if self.before_send_timeout_ms == 0 || self.before_send_timeout_ms > 30_000 {
            return fail(format!("before_send_timeout_ms must be within 1–30000, not {}", self.before_send_timeout_ms));
        }
        if let Some(s) = &self.hook_secret
            && !s.expose().starts_with("whsec_")
        {
            return fail("hook_secret must be whsec_ followed by the base64 of at least 16 bytes".into());
        }
        if self.webhook_batch_max == 0 || self.webhook_batch_max > 1000 {
            return fail(format!("webhook_batch_max must be within 1–1000, not {}", self.webhook_batch_max));
        }
        if self.webhook_timeout_ms == 0 || self.webhook_linger_ms > 10_000 {
            return fail("webhook_timeout_ms must be > 0 and webhook_linger_ms at most 10000".into());
        }
        if self.stream_timeout_s == 0 {
            return fail("stream_timeout_s must be at least 1".into());
        }
        if self.stream_delta_max_bytes == 0 || self.stream_delta_max_bytes > 65_536 {
            return fail(format!("stream_delta_max_bytes must be within 1–65536, not {}", self.stream_delta_max_bytes));
        }
        if self.presence_debounce_s > 600 {
            return fail(format!("presence_debounce_s must be at most 600, not {}", self.presence_debounce_s));
        }
        if self.typing_ttl_s == 0 || self.typing_ttl_s > 60 {
            return fail(format!("typing_ttl_s must be within 1–60, not {}", self.typing_ttl_s));
        }
        if self.sse_heartbeat_s == 0 || self.sse_heartbeat_s > 15 {
            return fail(format!("sse_heartbeat_s must be within 1–15, not {}", self.sse_heartbeat_s));
        }
        if self.ws_ping_s == 0 {
            return fail("ws_ping_s must be at least 1".into());
        }
        if self.poll_max_timeout_s == 0 || self.poll_max_timeout_s > 60 || self.poll_timeout_s > self.poll_max_timeout_s
        {
            return fail("poll_timeout_s must be ≤ poll_max_timeout_s ≤ 60 (and > 0)".into());
        }
        if self.queue_max_events == 0 || self.queue_max_bytes == 0 {
            return fail("queue_max_events and queue_max_bytes must be > 0".into());
        }
        if self.token_ttl_s == 0 || self.token_ttl_s > self.token_max_ttl_s {
            return fail("token_ttl_s must be > 0 and ≤ token_max_ttl_s".into());
        }
        if self.idempotency_ttl_s < 86_400 {
            return fail(format!("idempotency_ttl_s must be at least 86400 (a day), not {}", self.idempotency_ttl_s));
        }
        if self.message_retention_s > 0
            && (self.message_retention_s < self.idempotency_ttl_s || self.message_retention_s < self.replay_retention_s)
        {
            return fail(format!(
                "message_retention_s ({}) must be 0 (off) or at least idempotency_ttl_s ({}) and replay_retention_s ({})",
                self.message_retention_s, self.idempotency_ttl_s, self.replay_retention_s
            ));
        }
        if !self.nats_subject_prefix.is_empty()
            && !self
                .nats_subject_prefix
                .split('.')
                .all(|t| !t.is_empty() && t.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'))
        {
            return fail(format!(
                "nats_subject_prefix must be dot-separated tokens of [A-Za-z0-9_-], not {:?}",
                self.nats_subject_prefix
            ));
        }
        if self.nats_user.is_some() != self.nats_password.is_some() {
            return fail("nats_user and nats_password go together".into());
        }
        if self.nats_tls_cert.is_some() != self.nats_tls_key.is_some() {
            return fail("nats_tls_cert and nats_tls_key go together".into());
        }
        if self.revocation_poll_s == 0
            || self.hub_stall_s == 0
            || self.hub_max_held_bytes == 0
            || self.write_timeout_s == 0
        {
            return fail(
                "revocation_poll_s, hub_stall_s, hub_max_held_bytes, write_timeout_s, header_read_timeout_s, \
                 body_read_timeout_s and notify_ticket_ttl_s must be > 0"
                    .into(),
            );
        }
        if self.listen_backlog == 0 || self.listen_backlog > 65_535 {
            return fail(format!("listen_backlog must be within 1–65535, not {}", self.listen_backlog));
        }
        if self.replay_page == 0 || self.replay_page > 10_000 {
            return fail(format!("replay_page must be within 1–10000, not {}", self.replay_page));
        }
        for origin in &self.cors_origins {
            if origin == "*" {
                return fail("cors_origins must list origins; \"*\" is not accepted".into());
            }
            if !(origin.starts_with("http://") || origin.starts_with("https://")) || origin.ends_with('/') {
                return fail(format!("cors_origins entry {origin:?} must look like https://host[:port]"));
            }
        }
        if let Some(secret) = &self.jwt_secret {
            if secret.expose().len() < MIN_SECRET_LEN {
                return fail(format!("jwt_secret must be at least {MIN_SECRET_LEN} bytes"));
            }
            if secret.expose().starts_with("change-me") {
                return fail("jwt_secret is still the example value; set your own".into());
            }
        }
        if let Some(key) = &self.inner_key {
            if key.expose().len() < 16 {
                return fail("inner_key must be at least 16 bytes".into());
            }
            if key.expose().starts_with("change-me") {
                return fail("inner_key is still the example value; set your own".into());
            }
        }
        let need = |present: bool, key: &str| -> Result<(), ConfigError> {
            if present { Ok(()) } else { Err(ConfigError(format!("`quickim {}` needs {key}", role.name()))) }
        };
        if role != Role::Standalone && self.demo_tokens == Some(true) {
            return fail("demo_tokens (a token for anyone, no password) is for standalone only".into());
        }
        match role {
            Role::Standalone => {}
            Role::Gateway => {
                need(self.nats_url.is_some(), "nats_url (QUICKIM_NATS_URL)")?;
                need(
                    self.jwt_secret.is_some(),
                    "jwt_secret (QUICKIM_JWT_SECRET); the distributed gateway has no default secret",
                )?;
                need(self.inner_key.is_some(), "inner_key (QUICKIM_INNER_KEY)")?;
            }
            Role::Conversation | Role::Message => {
                need(self.nats_url.is_some(), "nats_url (QUICKIM_NATS_URL)")?;
                need(self.database_url.is_some(), "database_url (QUICKIM_DATABASE_URL)")?;
            }
        }
        if let Some(url) = &self.database_url
            && role != Role::Standalone
            && !url.starts_with("postgres://")
            && !url.starts_with("postgresql://")
        {
            return fail("database_url must be a postgres:// URL for the distributed services".into());
        }
        Ok(())
    }

    /// The demo page's defaults: on in standalone; its token route only there, and by
    /// default only while nobody but this machine can reach the public listener.
    fn resolve_demo(&mut self, role: Role) {
        let demo = *self.demo.get_or_insert(role == Role::Standalone);
        let loopback = self.public_addr.ip().is_loopback();
        self.demo_tokens.get_or_insert(role == Role::Standalone && demo && loopback);
    }

    /// Where a service role serves /healthz, /readyz and /metrics.
    pub fn ops_addr_for(&self, role: Role) -> SocketAddr {
        self.ops_addr.unwrap_or_else(|| {
            let port = if role == Role::Message { 9091 } else { 9090 };
            SocketAddr::from(([127, 0, 0, 1], port))
        })
    }

    /// This node's name: `node_id`, or role-host-pid.
    pub fn node_name(&self, role: Role) -> String {
        self.node_id.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
            format!("{}-{}-{}", role.name(), if host.is_empty() { "host" } else { &host }, std::process::id())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ConfigArgs,
    }

    fn parse(argv: &[&str]) -> ConfigArgs {
        let mut full = vec!["quickim"];
        full.extend_from_slice(argv);
        Cli::try_parse_from(full).unwrap().args
    }

    #[test]
    fn defaults_match_the_spec() {
        let c = Config::load(&ConfigArgs::default(), Role::Standalone).unwrap();
        assert_eq!(c.public_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(c.inner_addr.to_string(), "127.0.0.1:8081");
        assert_eq!(c.data_dir, PathBuf::from("./data"));
        assert_eq!(c.max_content_bytes, 65536);
        assert!(c.otlp_endpoint.is_none());
        assert!(c.cors_origins.is_empty());
    }

    #[test]
    fn flags_override_file_which_overrides_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("q.toml");
        std::fs::write(
            &file,
            "public_addr = \"127.0.0.1:9000\"\nrange_max = 50\ncors_origins = [\"https://a.example\"]\n",
        )
        .unwrap();
        let args = parse(&["--config", file.to_str().unwrap(), "--range-max", "70"]);
        let c = Config::load(&args, Role::Standalone).unwrap();
        assert_eq!(c.public_addr.to_string(), "127.0.0.1:9000");
        assert_eq!(c.range_max, 70);
        assert_eq!(c.cors_origins, vec!["https://a.example".to_string()]);
    }

    #[test]
    fn bad_values_stop_with_the_key_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("q.toml");
        std::fs::write(&file, "range_maxx = 5\n").unwrap();
        let err = Config::load(&parse(&["--config", file.to_str().unwrap()]), Role::Standalone).unwrap_err();
        assert!(err.0.contains("range_maxx"), "{err}");

        std::fs::write(&file, "range_max = \"many\"\n").unwrap();
        let err = Config::load(&parse(&["--config", file.to_str().unwrap()]), Role::Standalone).unwrap_err();
        assert!(err.0.contains("range_max"), "{err}");

        let err = Config::load(&parse(&["--poll-timeout-s", "90"]), Role::Standalone).unwrap_err();
        assert!(err.0.contains("poll_timeout_s"), "{err}");

        let err = Config::load(&parse(&["--cors-origins", "*"]), Role::Standalone).unwrap_err();
        assert!(err.0.contains("cors_origins"), "{err}");

        // Keys live at least a day; messages at least as long as keys and the resume window.
        let err = Config::load(&parse(&["--idempotency-ttl-s", "3600"]), Role::Standalone).unwrap_err();
        assert!(err.0.contains("idempotency_ttl_s"), "{err}");
        let err = Config::load(&parse(&["--message-retention-s", "86400"]), Role::Standalone).unwrap_err();
        assert!(err.0.contains("message_retention_s"), "{err}");
        assert!(Config::load(&parse(&["--message-retention-s", "604800"]), Role::Standalone).is_ok());
        let err = Config::load(&parse(&["--listen-backlog", "0"]), Role::Standalone).unwrap_err();
        assert!(err.0.contains("listen_backlog"), "{err}");
        assert_eq!(Config::load(&ConfigArgs::default(), Role::Standalone).unwrap().listen_backlog, 4096);
        let err = Config::load(&parse(&["--nats-subject-prefix", "a..b"]), Role::Standalone).unwrap_err();
        assert!(err.0.contains("nats_subject_prefix"), "{err}");

        assert!(Cli::try_parse_from(["quickim", "--public-addr", "nowhere"]).is_err());
    }

    #[test]
    fn the_demo_is_standalone_and_its_tokens_only_on_loopback() {
        let c = Config::load(&ConfigArgs::default(), Role::Standalone).unwrap();
        assert_eq!((c.demo, c.demo_tokens), (Some(true), Some(true)));
        let c = Config::load(&parse(&["--public-addr", "0.0.0.0:8080"]), Role::Standalone).unwrap();
        assert_eq!((c.demo, c.demo_tokens), (Some(true), Some(false)));
        let c = Config::load(&parse(&["--public-addr", "0.0.0.0:8080", "--demo-tokens", "true"]), Role::Standalone)
            .unwrap();
        assert_eq!(c.demo_tokens, Some(true));
        let c = Config::load(&parse(&["--demo", "false"]), Role::Standalone).unwrap();
        assert_eq!((c.demo, c.demo_tokens), (Some(false), Some(false)));
        let gateway = [
            "--nats-url",
            "nats://127.0.0.1:4222",
            "--jwt-secret",
            "0123456789abcdef0123456789abcdef",
            "--inner-key",
            "0123456789abcdef",
        ];
        let c = Config::load(&parse(&gateway), Role::Gateway).unwrap();
        assert_eq!((c.demo, c.demo_tokens), (Some(false), Some(false)));
        let c = Config::load(&parse(&[&gateway[..], &["--demo", "true"]].concat()), Role::Gateway).unwrap();
        assert_eq!((c.demo, c.demo_tokens), (Some(true), Some(false)));
        let err =
            Config::load(&parse(&[&gateway[..], &["--demo-tokens", "true"]].concat()), Role::Gateway).unwrap_err();
        assert!(err.0.contains("standalone only"), "{err}");
    }

    #[test]
    fn distributed_roles_need_their_keys_and_refuse_weak_secrets() {
        let err = Config::load(&ConfigArgs::default(), Role::Gateway).unwrap_err();
        assert!(err.0.contains("nats_url"), "{err}");
        let err = Config::load(&parse(&["--nats-url", "nats://127.0.0.1:4222"]), Role::Gateway).unwrap_err();
        assert!(err.0.contains("jwt_secret"), "{err}");
        let err = Config::load(&parse(&["--jwt-secret", "short"]), Role::Standalone).unwrap_err();
        assert!(err.0.contains("32"), "{err}");
        let err = Config::load(&parse(&["--jwt-secret", "change-me-change-me-change-me-change-me"]), Role::Standalone)
            .unwrap_err();
        assert!(err.0.contains("example"), "{err}");
        let ok = parse(&[
            "--nats-url",
            "nats://127.0.0.1:4222",
            "--jwt-secret",
            "0123456789abcdef0123456789abcdef",
            "--inner-key",
            "0123456789abcdef",
        ]);
        assert!(Config::load(&ok, Role::Gateway).is_ok());
        let err = Config::load(&parse(&["--nats-url", "nats://x", "--database-url", "sqlite://x"]), Role::Message)
            .unwrap_err();
        assert!(err.0.contains("postgres"), "{err}");
    }

    #[test]
    fn secrets_do_not_show_in_debug() {
        let c = Config { jwt_secret: Some(Secret::new("super-secret-value-123456789012345")), ..Config::default() };
        assert!(!format!("{c:?}").contains("super-secret"));
    }

    #[test]
    fn every_key_has_a_quickim_env_name() {
        for (key, env) in KEYS {
            assert_eq!(*env, format!("QUICKIM_{}", key.to_uppercase()));
        }
    }
}

#[cfg(test)]
mod docs_tests {
    #[test]
    fn operations_md_lists_every_key() {
        let doc = include_str!("../../docs/operations.md");
        for (key, env) in super::KEYS {
            assert!(doc.contains(&format!("| `{key}` | `{env}` |")), "docs/operations.md lacks {key}");
        }
    }
}
