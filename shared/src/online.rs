//! Who holds a /notify connection, asked of the gateways over their control plane: each
//! gateway beats on [`HEARTBEAT`] every 2 s (a node unseen for 6 s is gone) and answers a
//! query on [`PRESENCE`] with its own connections of the users asked about. The gateways ask
//! for /inner/get_users_online; the message services for the webhooks' `message.offline`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::bus::{Bus, BusError};

/// Gateways' heartbeats.
pub const HEARTBEAT: &str = "quickim.ctl.heartbeat";
/// Presence queries to every gateway.
pub const PRESENCE: &str = "quickim.ctl.presence";
/// A gateway unseen this long is gone.
pub const NODE_TTL: Duration = Duration::from_secs(6);
/// Longest wait for the gateways' answers.
pub const GATHER_TIMEOUT: Duration = Duration::from_millis(800);

/// A gateway's heartbeat.
#[derive(Debug, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The gateway.
    pub node_id: String,
    /// A node that just joined asks the others to beat back at once, so that everyone knows
    /// everyone within milliseconds instead of one heartbeat period.
    #[serde(default)]
    pub hello: bool,
}

/// A presence query.
#[derive(Debug, Serialize, Deserialize)]
pub struct PresenceQuery {
    /// The users asked about.
    pub user_ids: Vec<String>,
}

/// One node's answer about one user.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodePresence {
    /// Platforms with a connection.
    pub platforms: Vec<String>,
    /// Connections.
    pub connections: u32,
}

/// One gateway's answer: its connections of the users asked about (those with none left out).
#[derive(Debug, Serialize, Deserialize)]
pub struct PresenceAnswer {
    /// The gateway.
    pub node_id: String,
    /// Users with connections there.
    pub users: HashMap<String, NodePresence>,
}

/// The gateways seen alive, from their heartbeats.
#[derive(Clone, Default)]
pub struct Gateways {
    nodes: Arc<Mutex<HashMap<String, Instant>>>,
}

impl Gateways {
    /// Notes a heartbeat of `node`.
    pub fn seen(&self, node: &str) {
        let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        nodes.insert(node.to_string(), Instant::now());
        nodes.retain(|_, t| t.elapsed() < NODE_TTL);
    }

    /// Gateways seen alive (at least 1).
    pub fn alive(&self) -> usize {
        let nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        nodes.values().filter(|t| t.elapsed() < NODE_TTL).count().max(1)
    }

    /// Follows the gateways' heartbeats on `bus` until `shutdown` (for a role that is not a
    /// gateway itself).
    pub async fn watch(bus: &Bus, shutdown: CancellationToken) -> Result<Gateways, BusError> {
        let gateways = Gateways::default();
        let mut beats = bus.subscribe(HEARTBEAT, None).await?;
        let g = gateways.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    msg = beats.next() => match msg {
                        Some(msg) => {
                            if let Ok(h) = serde_json::from_slice::<Heartbeat>(&msg.payload) {
                                g.seen(&h.node_id);
                            }
                        }
                        None => return,
                    },
                }
            }
        });
        Ok(gateways)
    }

    /// Every gateway's connections of `user_ids`, merged, with the number of gateways that
    /// answered (the fewest of any chunk). Asked in chunks whose every answer fits in one bus
    /// message, however many platforms each user is connected on (at most `max_connections`).
    pub async fn presence(
        &self,
        bus: &Bus,
        user_ids: &[String],
        max_connections: u32,
    ) -> Result<(HashMap<String, NodePresence>, u32), BusError> {
        // A user's entry in an answer: its id, and up to `max_connections` platforms of at
        // most 32 characters (quoted, with commas), and the count.
        let per_user = 128 + 8 + 64 + max_connections as usize * (32 + 3);
        let per_chunk = (bus.payload_budget().saturating_sub(256) / per_user).max(1);
        let mut merged: HashMap<String, NodePresence> = HashMap::new();
        let mut nodes = u32::MAX;
        for chunk in user_ids.chunks(per_chunk) {
            let payload = serde_json::to_vec(&PresenceQuery { user_ids: chunk.to_vec() }).unwrap_or_default();
            let replies = bus.gather(PRESENCE, Vec::new(), payload.into(), GATHER_TIMEOUT, self.alive()).await?;
            let mut answered = 0;
            for r in replies {
                let Ok(answer) = serde_json::from_slice::<PresenceAnswer>(&r.payload) else { continue };
                answered += 1;
                for (user, p) in answer.users {
                    let e = merged.entry(user).or_insert(NodePresence { platforms: Vec::new(), connections: 0 });
                    e.connections += p.connections;
                    e.platforms.extend(p.platforms);
                    e.platforms.sort();
                    e.platforms.dedup();
                }
            }
            nodes = nodes.min(answered);
        }
        Ok((merged, if nodes == u32::MAX { 0 } else { nodes }))
    }
}
