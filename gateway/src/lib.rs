//! The gateway: terminates client connections and serves the HTTP API.
//!
//! Where each piece lives (docs/architecture.md draws the paths through them):
//! - `listener/`: accepting connections and reading requests (the lean /notify path, hyper
//!   for the rest), write timeouts, protocol switches;
//! - `http/`: the public and /inner routers, extractors, OpenAPI;
//! - `notify/`: /notify — the hub, the session core, the event format, the ws/sse/poll
//!   transports;
//! - `actions.rs`: what a client does (send, mark_read) whether by HTTP or WebSocket frame;
//! - `sends.rs`: sends on their way to the message services, coalesced;
//! - `error.rs`: the one mapping from failures to HTTP answers;
//! - `auth.rs`: tokens (issue, verify, revoke), /notify tickets;
//! - `cluster.rs`: the control plane between gateways (presence, kick, heartbeats);
//! - `fuzzing.rs`: what the fuzz targets (`fuzz/`) exercise;
//! - `ratelimit.rs`: request rates per user and per address;
//! - `state.rs`: the shared state handed to handlers.
//!
//! The gateway holds no conversation state: every request goes to the conversation or
//! message service over the bus.

pub mod actions;
pub mod auth;
pub mod cluster;
pub mod error;
pub mod fuzzing;
pub mod http;
pub mod listener;
pub mod notify;
pub mod presence;
pub mod ratelimit;
pub mod sends;
pub mod state;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quickim_shared::bus::{Bus, BusError};
use quickim_shared::config::{Config, ConfigError};
use quickim_shared::protocol::service::ListRevocations;
use quickim_shared::rpc::RpcClient;
use tokio::net::{TcpListener, TcpSocket};
use tokio_util::sync::CancellationToken;

use crate::auth::Auth;
use crate::cluster::Cluster;
use crate::notify::hub::{Hub, HubConfig};
use crate::notify::registry::Registry;
use crate::state::AppState;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A listener could not bind.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The bus failed.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// Serving failed.
    #[error("serving: {0}")]
    Io(#[from] std::io::Error),
}

/// A bound, ready-to-run gateway.
pub struct Gateway {
    state: AppState,
    public: TcpListener,
    inner: TcpListener,
    shutdown: CancellationToken,
}

impl Gateway {
    /// Binds both listeners and joins the cluster. `config` must hold `jwt_secret` and
    /// `inner_key` (standalone fills them in before).
    pub async fn start(
        config: Arc<Config>,
        bus: Bus,
        node_id: String,
        shutdown: CancellationToken,
    ) -> Result<Gateway, GatewayError> {
        let inner_key = config.inner_key.clone().ok_or_else(|| ConfigError("inner_key is not set".into()))?;
        let auth = Arc::new(Auth::from_config(&config)?);
        let registry = Arc::new(Registry::default());
        let cluster =
            Cluster::start(bus.clone(), node_id.clone(), registry.clone(), auth.clone(), shutdown.clone()).await?;
        let rpc = RpcClient::new(bus.clone(), Duration::from_millis(config.request_timeout_ms));
        let hub = Hub::start(bus, rpc.clone(), HubConfig::from_config(&config), shutdown.clone()).await?;
        let state =
            AppState::new(rpc, auth, registry, cluster, hub, shutdown.clone(), inner_key, config.clone(), node_id);
        let public = bind(config.public_addr, config.listen_backlog)?;
        let inner = bind(config.inner_addr, config.listen_backlog)?;
        tokio::spawn(follow_revocations(state.clone(), shutdown.clone()));
        tokio::spawn(presence::run(state.clone(), shutdown.clone()));
        Ok(Gateway { state, public, inner, shutdown })
    }

    /// Where the public listener listens.
    pub fn public_addr(&self) -> SocketAddr {
        self.public.local_addr().unwrap_or_else(|_| self.state.config.public_addr)
    }

    /// Where the inner listener listens.
    pub fn inner_addr(&self) -> SocketAddr {
        self.inner.local_addr().unwrap_or_else(|_| self.state.config.inner_addr)
    }

    /// The shared state (for in-process tests).
    pub fn state(&self) -> AppState {
        self.state.clone()
    }

    /// Serves until the shutdown token is cancelled, then stops accepting and lets requests
    /// in flight finish.
    pub async fn run(self) -> Result<(), GatewayError> {
        let Gateway { state, public, inner, shutdown } = self;
        let stop = shutdown.clone();
        let draining = state.clone();
        tokio::spawn(async move {
            stop.cancelled().await;
            draining.set_draining();
        });
        let config = &state.config;
        let limits = listener::Limits {
            write_timeout: Duration::from_secs(config.write_timeout_s),
            header_timeout: Duration::from_secs(config.header_read_timeout_s),
            per_ip: None,
        };
        let public_limits = listener::Limits {
            per_ip: (config.conn_rate_per_ip > 0).then(|| {
                Arc::new(ratelimit::RateLimiter::new(
                    config.conn_rate_per_ip,
                    config.conn_rate_per_ip.saturating_mul(2),
                ))
            }),
            ..limits.clone()
        };
        let public = listener::serve(public, http::public_router(state.clone()), true, public_limits, shutdown.clone());
        let inner = listener::serve(inner, http::inner_router(state.clone()), false, limits, shutdown);
        tokio::join!(public, inner);
        // Upgraded WebSockets are not the server's: wait for them too (they close on shutdown).
        state.connections.close();
        state.connections.wait().await;
        Ok(())
    }
}

/// Listens on `addr` with a queue of `backlog` pending connections (`TcpListener::bind`
/// asks for 128, which a crowd reconnecting at once overflows: the rest wait a SYN
/// retransmit).
fn bind(addr: SocketAddr, backlog: u32) -> Result<TcpListener, GatewayError> {
    let listen = || {
        let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(backlog)
    };
    listen().map_err(|source| GatewayError::Bind { addr, source })
}

/// Revocations older than the last poll by this much are read again at the next one (kicks
/// recorded with the clock of another gateway, or committed late).
const REVOCATION_OVERLAP_MS: i64 = 60_000;

/// Follows token revocations: loads every one still relevant at start (the node is not ready
/// until it has), then every `revocation_poll_s` reads the recent ones and closes the
/// connections of tokens they revoke. A node that missed a kick broadcast (paused, cut off
/// from NATS) so closes the user's streams within one poll of reaching the store again.
async fn follow_revocations(state: AppState, shutdown: CancellationToken) {
    let poll = Duration::from_secs(state.config.revocation_poll_s);
    let mut since = state.auth.revocation_horizon_ms();
    loop {
        let started = quickim_shared::time::now_ms();
        let wait = match read_revocations(&state, since).await {
            Ok(closed) => {
                if closed > 0 {
                    tracing::info!(closed, "closed connections of tokens revoked on another node");
                }
                state.auth.prune();
                state.set_ready();
                since = started - REVOCATION_OVERLAP_MS;
                poll
            }
            Err(e) => {
                tracing::warn!(error = %e.message, "cannot read token revocations");
                if state.is_ready() { poll } else { Duration::from_secs(1) }
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Reads the revocations made at or after `since_ms`, page by page, and applies each new
/// one; answers the connections closed.
async fn read_revocations(state: &AppState, since_ms: i64) -> Result<u32, quickim_shared::error::ServiceError> {
    let mut after = None;
    let mut closed = 0;
    loop {
        let page = state.rpc.call(&ListRevocations { since_ms, after: after.take(), limit: 1000 }).await?;
        for r in &page.revocations {
            if state.auth.revoke(r) {
                closed += state.registry.kick(&r.user_id, r.platform.as_deref(), r.before_ms);
            }
        }
        if !page.more {
            return Ok(closed);
        }
        after = page.revocations.last().cloned();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::time::Duration;

    /// A crowd connecting at once while the node accepts nothing: with the backlog asked for,
    /// every handshake completes at once (with the 128 of `TcpListener::bind`, those beyond it
    /// would wait a SYN retransmit, a second).
    #[tokio::test]
    async fn a_crowd_of_connects_fits_the_listen_backlog() {
        let listener = super::bind("127.0.0.1:0".parse().unwrap(), 1024).unwrap();
        let addr = listener.local_addr().unwrap();
        let connects: Vec<_> = (0..600)
            .map(|_| {
                tokio::spawn(tokio::time::timeout(Duration::from_millis(700), tokio::net::TcpStream::connect(addr)))
            })
            .collect();
        let mut open = Vec::new();
        for c in connects {
            open.push(c.await.unwrap().expect("a connect waited for a SYN retransmit").unwrap());
        }
        assert_eq!(open.len(), 600);
        drop(listener);
    }
}
