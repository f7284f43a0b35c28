//! The gateways' control plane: they find each other by heartbeat and answer questions
//! about the connections they hold (presence, kick).
//!
//! Subjects (every gateway subscribes, no queue group):
//! - `quickim.ctl.heartbeat`: `{node_id}` every 2 s; a node unseen for 6 s is gone;
//! - `quickim.ctl.presence`: `{user_ids}` → each node's connections of those users;
//! - `quickim.ctl.kick_user`: `{user_id, platform, before_ms}` → each node records the
//!   revocation and closes the connections; answers how many it closed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use quickim_shared::bus::{Bus, BusError, Incoming};
use quickim_shared::online::{
    GATHER_TIMEOUT, Gateways, HEARTBEAT, Heartbeat, NodePresence, PRESENCE, PresenceAnswer, PresenceQuery,
};
use quickim_shared::protocol::service::Revocation;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::auth::Auth;
use crate::notify::registry::Registry;

const KICK_USER: &str = "quickim.ctl.kick_user";
const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);

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
    gateways: Gateways,
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
        let cluster = Cluster { bus: bus.clone(), node_id: node_id.clone(), gateways: Gateways::default() };
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
        self.gateways.seen(&self.node_id);
        if let Ok(payload) = serde_json::to_vec(&Heartbeat { node_id: self.node_id.clone(), hello }) {
            let _ = self.bus.publish(HEARTBEAT, Vec::new(), payload.into()).await;
        }
    }

    /// Gateways seen alive (this one included).
    pub fn alive(&self) -> usize {
        self.gateways.alive()
    }

    async fn answer(&self, msg: Incoming, registry: &Registry, auth: &Auth) {
        let reply: Option<Vec<u8>> = match msg.subject.as_str() {
            HEARTBEAT => {
                if let Ok(h) = serde_json::from_slice::<Heartbeat>(&msg.payload) {
                    self.gateways.seen(&h.node_id);
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
    /// nodes that answered (see [`Gateways::presence`]).
    pub async fn presence(
        &self,
        user_ids: &[String],
        max_connections: u32,
    ) -> Result<(HashMap<String, NodePresence>, u32), BusError> {
        self.gateways.presence(&self.bus, user_ids, max_connections).await
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
