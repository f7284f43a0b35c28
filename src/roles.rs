//! What each role starts, and how it stops.
//!
//! Every role stops on SIGTERM or ctrl-c: the shutdown token is cancelled, listeners stop
//! accepting, work in flight finishes within `shutdown_grace_s`, then the bus is drained.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use quickim_conversation::{ConversationLimits, ConversationService};
use quickim_gateway::Gateway;
use quickim_message::{BeforeSend, BeforeSendConfig, MessageLimits, MessageService};
use quickim_shared::bus::Bus;
use quickim_shared::bus::nats::NatsOptions;
use quickim_shared::config::{Config, Role, Secret};
use quickim_shared::telemetry;
use quickim_store::{Store, UnreadRule};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Log partitions of a new standalone database: partitions let several message services
/// write at once, standalone has one writer, and every partition a commit touches is one
/// more page in the WAL (with 8, a commit of a few dozen sends wrote about 7 more pages).
const STANDALONE_PARTITIONS: u16 = 1;
/// Log partitions of a new PostgreSQL database: message services writing at once lock
/// different partitions.
const DISTRIBUTED_PARTITIONS: u16 = 8;

/// Runs `role` until a stop signal.
pub async fn run(role: Role, mut config: Config) -> anyhow::Result<()> {
    let node_id = config.node_name(role);
    let grace = Duration::from_secs(config.shutdown_grace_s);
    let telemetry = telemetry::init(&config, &format!("quickim-{}", role.name()), &node_id)?;
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    let mut tasks: JoinSet<anyhow::Result<()>> = JoinSet::new();

    let bus = match role {
        Role::Standalone => {
            let generated = standalone_secrets(&mut config)?;
            let store = Store::open_sqlite(
                &config.data_dir.join("quickim.db"),
                config.db_max_connections,
                config.log_partitions.unwrap_or(STANDALONE_PARTITIONS),
            )
            .await
            .context("opening the SQLite database")?;
            let bus = Bus::local(8192);
            crate::ops::pool_gauges(store.clone(), shutdown.clone());
            start_services(&mut tasks, &config, store, &bus, true, true, &shutdown).await?;
            let config = Arc::new(config);
            let gateway = Gateway::start(config.clone(), bus.clone(), node_id.clone(), shutdown.clone()).await?;
            eprintln!(
                "quickim standalone: public http://{}  inner http://{}  data {}",
                gateway.public_addr(),
                gateway.inner_addr(),
                config.data_dir.display()
            );
            if config.demo == Some(true) {
                let tokens = if config.demo_tokens == Some(true) { ", pick any user" } else { "" };
                eprintln!("quickim standalone: demo chat http://{}/demo/{tokens}", gateway.public_addr());
            }
            if let (Some(key), true) = (&config.inner_key, generated) {
                eprintln!(
                    "quickim standalone: inner key (kept in {}): {}",
                    config.data_dir.join("inner_key").display(),
                    key.expose()
                );
            }
            tasks.spawn(async move { gateway.run().await.map_err(Into::into) });
            bus
        }
        Role::Gateway => {
            let bus = connect_nats(&config, &node_id).await?;
            let gateway = Gateway::start(Arc::new(config), bus.clone(), node_id.clone(), shutdown.clone()).await?;
            tracing::info!(public = %gateway.public_addr(), inner = %gateway.inner_addr(), "gateway listening");
            tasks.spawn(async move { gateway.run().await.map_err(Into::into) });
            bus
        }
        Role::Conversation | Role::Message => {
            let bus = connect_nats(&config, &node_id).await?;
            let url = config.database_url.clone().unwrap_or_default();
            let partitions = config.log_partitions.unwrap_or(DISTRIBUTED_PARTITIONS);
            // Below the gateways' request timeout: an unreachable database answers
            // `unavailable` in time.
            let acquire = Duration::from_millis((config.request_timeout_ms / 2).clamp(200, 10_000));
            let store = Store::open_postgres(&url, config.db_max_connections, partitions, acquire)
                .await
                .context("connecting to PostgreSQL")?;
            let ops =
                crate::ops::serve(config.ops_addr_for(role), bus.clone(), store.clone(), shutdown.clone()).await?;
            tasks.spawn(async move { ops.await.map_err(|e| anyhow::anyhow!("ops listener: {e}")) });
            crate::ops::pool_gauges(store.clone(), shutdown.clone());
            start_services(
                &mut tasks,
                &config,
                store,
                &bus,
                role == Role::Conversation,
                role == Role::Message,
                &shutdown,
            )
            .await?;

            tracing::info!(role = role.name(), node = %node_id, "service running");
            bus
        }
    };

    // Run until a task fails or a stop signal; then give the rest a bounded grace.
    let first = tokio::select! {
        _ = shutdown.cancelled() => None,
        r = tasks.join_next() => r,
    };
    shutdown.cancel();
    let mut result = match first {
        Some(Ok(Err(e))) => Err(e),
        Some(Err(e)) => Err(anyhow::anyhow!("a task panicked: {e}")),
        _ => Ok(()),
    };
    let drained = tokio::time::timeout(grace, async {
        while let Some(r) = tasks.join_next().await {
            if let (Ok(Err(e)), Ok(())) = (r, &result) {
                result = Err(e);
            }
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(grace_s = grace.as_secs(), "grace period over; stopping the remaining work");
        tasks.abort_all();
    }
    bus.drain().await;
    telemetry.shutdown().await;
    result
}

async fn start_services(
    tasks: &mut JoinSet<anyhow::Result<()>>,
    config: &Config,
    store: Store,
    bus: &Bus,
    conversation: bool,
    message: bool,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    store.set_unread_rule(UnreadRule::new(config.unread_system_types.clone()));
    if conversation {
        let limits = ConversationLimits {
            max_members: config.max_members,
            title_max_bytes: config.title_max_bytes,
            avatar_max_bytes: config.avatar_max_bytes,
            ext_max_bytes: config.ext_max_bytes,
        };
        let serving = ConversationService::new(store.clone(), bus.clone(), limits).start(shutdown.clone()).await?;
        tasks.spawn(async move { serving.await.map_err(|e| anyhow::anyhow!("conversation service: {e}")) });
    }
    if message {
        let limits = MessageLimits {
            max_content_bytes: config.max_content_bytes,
            range_max: config.range_max,
            replay_page: config.replay_page,
            retention_ms: (config.replay_retention_s as i64).saturating_mul(1000),
            key_ttl_ms: (config.idempotency_ttl_s as i64).saturating_mul(1000),
            message_retention_ms: (config.message_retention_s as i64).saturating_mul(1000),
            send_batch_max: config.send_batch_max,
            edit_window_ms: (config.edit_window_s as i64).saturating_mul(1000),
            recall_window_ms: (config.recall_window_s as i64).saturating_mul(1000),
            stream_timeout_ms: (config.stream_timeout_s as i64).saturating_mul(1000),
        };
        let store_for_hooks = store.clone();
        let mut service = MessageService::new(store, bus.clone(), limits);
        if let Some(url) = &config.before_send_url {
            let secret =
                match &config.hook_secret {
                    Some(s) => Some(quickim_message::signing_key(s.expose()).ok_or_else(|| {
                        anyhow::anyhow!("hook_secret is not whsec_ and the base64 of 16 bytes or more")
                    })?),
                    None => None,
                };
            let hook = BeforeSend::new(BeforeSendConfig {
                url: url.clone(),
                timeout: std::time::Duration::from_millis(config.before_send_timeout_ms),
                fail_open: config.before_send_fail_open,
                secret,
                ca_file: config.hook_ca_file.as_ref().map(std::path::PathBuf::from),
            })
            .map_err(|e| anyhow::anyhow!("before_send hook: {e}"))?;
            service = service.with_before_send(hook);
        }
        if let Some(text) = &config.webhooks {
            let endpoints = quickim_message::webhooks::parse_endpoints(text).map_err(|e| anyhow::anyhow!("{e}"))?;
            let webhooks = quickim_message::webhooks::WebhookConfig {
                endpoints,
                batch_max: config.webhook_batch_max,
                linger: std::time::Duration::from_millis(config.webhook_linger_ms),
                timeout: std::time::Duration::from_millis(config.webhook_timeout_ms),
                alert_after: std::time::Duration::from_secs(config.webhook_alert_after_s),
                skip_after: (config.webhook_skip_after_s > 0)
                    .then(|| std::time::Duration::from_secs(config.webhook_skip_after_s)),
                max_connections_per_user: config.max_connections_per_user,
                ca_file: config.hook_ca_file.as_ref().map(std::path::PathBuf::from),
            };
            let holder = format!("message-{}-{}", std::process::id(), quickim_shared::time::now_ms());
            let run = quickim_message::webhooks::run(
                store_for_hooks.clone(),
                bus.clone(),
                webhooks,
                holder,
                shutdown.clone(),
            );
            tasks.spawn(async move {
                run.await;
                Ok(())
            });
        }
        let serving = service.start(shutdown.clone()).await?;
        tasks.spawn(async move { serving.await.map_err(|e| anyhow::anyhow!("message service: {e}")) });
    }
    Ok(())
}

async fn connect_nats(config: &Config, node_id: &str) -> anyhow::Result<Bus> {
    let options = NatsOptions {
        url: config.nats_url.clone().unwrap_or_default(),
        name: node_id.to_string(),
        user: config.nats_user.clone().zip(config.nats_password.as_ref().map(|p| p.expose().to_string())),
        token: config.nats_token.as_ref().map(|t| t.expose().to_string()),
        nkey_seed: config.nats_nkey_seed.as_ref().map(|t| t.expose().to_string()),
        creds_file: config.nats_creds_file.clone(),
        tls_ca: config.nats_tls_ca.clone(),
        tls_client: config.nats_tls_cert.clone().zip(config.nats_tls_key.clone()),
        require_tls: config.nats_require_tls,
        inbox_prefix: None,
    };
    Ok(Bus::connect_nats_with(&options, &config.nats_subject_prefix).await?)
}

/// Fills `jwt_secret` and `inner_key` from the data directory, generating them on first
/// start. Answers whether the inner key came from the data directory.
fn standalone_secrets(config: &mut Config) -> anyhow::Result<bool> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating the data directory {}", config.data_dir.display()))?;
    if config.jwt_secret.is_none() {
        config.jwt_secret = Some(Secret::new(kept_secret(&config.data_dir.join("jwt_secret"))?));
    }
    if config.inner_key.is_none() {
        config.inner_key = Some(Secret::new(kept_secret(&config.data_dir.join("inner_key"))?));
        return Ok(true);
    }
    Ok(false)
}

fn kept_secret(path: &Path) -> anyhow::Result<String> {
    if let Ok(existing) = std::fs::read_to_string(path) {
        let existing = existing.trim().to_string();
        if existing.len() >= 32 {
            return Ok(existing);
        }
    }
    let secret: String = (0..32).map(|_| format!("{:02x}", rand::random::<u8>())).collect();
    write_private(path, &secret).with_context(|| format!("writing {}", path.display()))?;
    Ok(secret)
}

fn write_private(path: &Path, content: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    f.write_all(content.as_bytes())
}

async fn stop_on_signal(shutdown: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
    tracing::info!("stop signal received; shutting down");
    shutdown.cancel();
}
