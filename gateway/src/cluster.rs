//! The gateways' control plane: they find each other by heartbeat and answer questions
//! about the connections they hold (presence, kick).
//!
//! Subjects (every gateway subscribes, no queue group):
//! - `quickim.ctl.heartbeat`: `{node_id}` every 2 s; a node unseen for 6 s is gone;
//! - `quickim.ctl.presence`: `{user_ids}` → each node's connections of those users;
//! - `quickim.ctl.kick_user`: `{user_id, platform, before_ms}` → each node records the
//!   revocation and closes the connections; answers how many it closed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use quickim_shared::bus::{Bus, BusError, Incoming};
use quickim_shared::protocol::service::Revocation;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::auth::Auth;
use crate::notify::registry::Registry;

const HEARTBEAT: &str = "quickim.ctl.heartbeat";
const PRESENCE: &str = "quickim.ctl.presence";
const KICK_USER: &str = "quickim.ctl.kick_user";
const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);
const NODE_TTL: Duration = Duration::from_secs(6);
const GATHER_TIMEOUT: Duration = Duration::from_millis(800);

#[derive(Serialize, Deserialize)]
struct Heartbeat {
    node_id: String,
    /// A node that just joined asks the others to beat back at once, so that everyone knows
    /// everyone within milliseconds instead of one heartbeat period.
    #[serde(default)]
    hello: bool,
}

#[derive(Serialize, Deserialize)]
struct PresenceQuery {
    user_ids: Vec<String>,
}

/// One node's answer about one user.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodePresence {
    /// Platforms with a connection.
    pub platforms: Vec<String>,
    /// Connections.
    pub connections: u32,
}

#[derive(Serialize, Deserialize)]
struct PresenceAnswer {
    node_id: String,
    users: HashMap<String, NodePresence>,
}

#[derive(Serialize, Deserialize)]
struct KickAnswer {
    node_id: String,
    closed: u32,
}

/// What a kick broadcast achieved.
#[derive(Debug, Clone, Copy)]
pub struct KickOutcome {
    /// Connections closed on the nodes that answered.
    pub closed: u32,
    /// Gateways seen alive when the kick went out.
    pub asked: u32,
    /// Gateways that answered.
    pub confirmed: u32,
}

/// Handle to the control plane.
#[derive(Clone)]
pub struct Cluster {
    bus: Bus,
    node_id: String,
    nodes: Arc<Mutex<HashMap<String, Instant>>>,
}

impl Cluster {
    /// Joins the control plane: answers questions about `registry`, applies revocations to
    /// `auth`, and sends heartbeats until `shutdown`.
    pub async fn start(
        bus: Bus,
        node_id: String,
        registry: Arc<Registry>,
        auth: Arc<Auth>,
        shutdown: CancellationToken,
    ) -> Result<Cluster, BusError> {
        let cluster = Cluster { bus: bus.clone(), node_id: node_id.clone(), nodes: Arc::default() };
        let mut subs = futures::stream::select_all([
            bus.subscribe(HEARTBEAT, None).await?,
            bus.subscribe(PRESENCE, None).await?,
            bus.subscribe(KICK_USER, None).await?,
        ]);
        let me = cluster.clone();
        cluster.beat(true).await;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + HEARTBEAT_EVERY, HEARTBEAT_EVERY);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tick.tick() => me.beat(false).await,
                    msg = subs.next() => match msg {
                        Some(msg) => me.answer(msg, &registry, &auth).await,
                        None => break,
                    },
                }
            }
        });
        Ok(cluster)
    }

    async fn beat(&self, hello: bool) {
        self.seen(&self.node_id);
        if let Ok(payload) = serde_json::to_vec(&Heartbeat { node_id: self.node_id.clone(), hello }) {
            let _ = self.bus.publish(HEARTBEAT, Vec::new(), payload.into()).await;
        }
    }

    fn seen(&self, node: &str) {
        let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        nodes.insert(node.to_string(), Instant::now());
        nodes.retain(|_, t| t.elapsed() < NODE_TTL);
    }

    /// Gateways seen alive (this one included).
    pub fn alive(&self) -> usize {
        let nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        nodes.values().filter(|t| t.elapsed() < NODE_TTL).count().max(1)
    }

    async fn answer(&self, msg: Incoming, registry: &Registry, auth: &Auth) {
        let reply: Option<Vec<u8>> = match msg.subject.as_str() {
            HEARTBEAT => {
                if let Ok(h) = serde_json::from_slice::<Heartbeat>(&msg.payload) {
                    self.seen(&h.node_id);
                    if h.hello && h.node_id != self.node_id {
                        self.beat(false).await;
                    }
                }
                None
            }

            PRESENCE => serde_json::from_slice::<PresenceQuery>(&msg.payload).ok().and_then(|q| {
                let users = q
                    .user_ids
                    .into_iter()
                    .filter_map(|u| {
                        let (platforms, connections) = registry.presence(&u);
                        (connections > 0).then_some((u, NodePresence { platforms, connections }))
                    })
                    .collect();
                serde_json::to_vec(&PresenceAnswer { node_id: self.node_id.clone(), users }).ok()
            }),
            KICK_USER => serde_json::from_slice::<Revocation>(&msg.payload).ok().and_then(|r| {
                auth.revoke(&r);
                let closed = registry.kick(&r.user_id, r.platform.as_deref(), r.before_ms);
                serde_json::to_vec(&KickAnswer { node_id: self.node_id.clone(), closed }).ok()
            }),
            _ => None,
        };
        if let Some(reply) = reply
            && msg.expects_reply()
        {
            let _ = msg.respond(Vec::new(), Bytes::from(reply)).await;
        }
    }

    /// Every node's connections of `user_ids`; answers them merged, with the number of
    /// nodes that answered (the fewest of any chunk). The users are asked about in chunks
    /// whose every node's answer fits in one bus message, however many platforms each user
    /// is connected on (at most `max_connections` each).
    pub async fn presence(
        &self,
        user_ids: &[String],
        max_connections: u32,
    ) -> Result<(HashMap<String, NodePresence>, u32), BusError> {
        // A user's entry in an answer: its id, and up to `max_connections` platforms of at
        // most 32 characters (quoted, with commas), and the count.
        let per_user = 128 + 8 + 64 + max_connections as usize * (32 + 3);
        let per_chunk = (self.bus.payload_budget().saturating_sub(256) / per_user).max(1);
        let mut merged: HashMap<String, NodePresence> = HashMap::new();
        let mut nodes = u32::MAX;
        for chunk in user_ids.chunks(per_chunk) {
            let answered = self.presence_chunk(chunk, &mut merged).await?;
            nodes = nodes.min(answered);
        }
        Ok((merged, if nodes == u32::MAX { 0 } else { nodes }))
    }

    async fn presence_chunk(
        &self,
        user_ids: &[String],
        merged: &mut HashMap<String, NodePresence>,
    ) -> Result<u32, BusError> {
        let payload = serde_json::to_vec(&PresenceQuery { user_ids: user_ids.to_vec() }).unwrap_or_default();
        let replies = self.bus.gather(PRESENCE, Vec::new(), payload.into(), GATHER_TIMEOUT, self.alive()).await?;
        let mut nodes = 0;
        for r in replies {
            let Ok(answer) = serde_json::from_slice::<PresenceAnswer>(&r.payload) else {
                continue;
            };
            nodes += 1;
            for (user, p) in answer.users {
                let e = merged.entry(user).or_insert(NodePresence { platforms: Vec::new(), connections: 0 });
                e.connections += p.connections;
                e.platforms.extend(p.platforms);
                e.platforms.sort();
                e.platforms.dedup();
            }
        }
        Ok(nodes)
    }

    /// Tells every node to revoke and close; answers connections closed, the nodes asked (the
    /// gateways seen alive) and the nodes that confirmed.
    pub async fn kick_user(&self, revocation: &Revocation) -> Result<KickOutcome, BusError> {
        let payload = serde_json::to_vec(revocation).unwrap_or_default();
        let asked = self.alive();
        let replies = self.bus.gather(KICK_USER, Vec::new(), payload.into(), GATHER_TIMEOUT, asked).await?;
        let mut outcome = KickOutcome { closed: 0, asked: asked as u32, confirmed: 0 };
        for r in replies {
            if let Ok(a) = serde_json::from_slice::<KickAnswer>(&r.payload) {
                outcome.closed += a.closed;
                outcome.confirmed += 1;
            }
        }
        Ok(outcome)
    }
}
