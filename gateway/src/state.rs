//! The gateway's shared state: a cheap `Clone` handle passed to every handler.

use std::ops::Deref;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use quickim_shared::config::{Config, Secret};
use quickim_shared::rpc::RpcClient;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Auth;
use crate::cluster::Cluster;
use crate::notify::hub::Hub;
use crate::notify::parked::Parked;
use crate::notify::registry::Registry;
use crate::ratelimit::RateLimiter;
use crate::sends::Sends;

/// Everything a handler needs (behind [`AppState`]).
pub struct App {
    /// Typed calls to the services.
    pub rpc: RpcClient,
    /// Sends to the message services, coalesced.
    pub sends: Sends,
    /// Token issuing and checking.
    pub auth: Arc<Auth>,
    /// Per-user request rate.
    pub limiter: RateLimiter,
    /// New /notify streams per IP address.
    pub handshakes: RateLimiter,
    /// Per-user signal rate (typing, ...).
    pub signals: RateLimiter,
    /// Open /notify connections of this node.
    pub registry: Arc<Registry>,
    /// The other gateways.
    pub cluster: Cluster,
    /// Delivery to this node's connections.
    pub hub: Hub,
    /// Cancelled when the node shuts down.
    pub shutdown: CancellationToken,
    /// Answered long-polls' sessions, waiting for the same client's next poll.
    pub parked: Parked,
    /// Upgraded WebSocket connections (the HTTP server does not wait for them).
    pub connections: TaskTracker,
    /// Key of the /inner API.
    pub inner_key: Secret,
    /// The configuration.
    pub config: Arc<Config>,
    /// This node's name.
    pub node_id: String,
    ready: AtomicBool,
    draining: AtomicBool,
}

/// Cheap handle to [`App`].
#[derive(Clone)]
pub struct AppState(Arc<App>);

impl Deref for AppState {
    type Target = App;
    fn deref(&self) -> &App {
        &self.0
    }
}

impl AppState {
    /// Wraps the parts.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        rpc: RpcClient,
        auth: Arc<Auth>,
        registry: Arc<Registry>,
        cluster: Cluster,
        hub: Hub,
        shutdown: CancellationToken,
        inner_key: Secret,
        config: Arc<Config>,
        node_id: String,
    ) -> AppState {
        let limiter = RateLimiter::new(config.rate_limit_per_s, config.rate_limit_burst);
        let handshakes = RateLimiter::new(config.handshake_rate_per_ip, config.handshake_rate_per_ip.saturating_mul(2));
        let signals = RateLimiter::new(config.signal_rate_per_s, config.signal_rate_per_s.saturating_mul(2));
        AppState(Arc::new(App {
            sends: Sends::start(rpc.clone()),
            rpc,
            auth,
            limiter,
            handshakes,
            signals,
            registry,
            cluster,
            hub,
            parked: Parked::new(shutdown.clone()),
            shutdown,
            connections: TaskTracker::new(),
            inner_key,
            config,
            node_id,
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
        }))
    }

    /// Marks start-up work (revocations loaded) as done.
    pub fn set_ready(&self) {
        self.0.ready.store(true, Ordering::Relaxed);
    }

    /// Whether start-up work is done.
    pub fn is_ready(&self) -> bool {
        self.0.ready.load(Ordering::Relaxed)
    }

    /// Marks the node as shutting down: /readyz answers 503, new streams are refused.
    pub fn set_draining(&self) {
        self.0.draining.store(true, Ordering::Relaxed);
    }

    /// Whether the node is shutting down.
    pub fn is_draining(&self) -> bool {
        self.0.draining.load(Ordering::Relaxed)
    }
}
