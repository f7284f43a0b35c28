//! Periodic work of the message service: announcing the log heads (a gateway that missed
//! the last entries of a partition learns of them within a second and reads them from the
//! store), recording retention checkpoints, expiring idempotency keys, cancelling streams
//! left open past `stream_timeout_s` and — when `message_retention_s` is set — deleting
//! messages older than it.

use std::time::Duration;

use quickim_shared::bus::Bus;
use quickim_shared::fanout::publish_entries;
use quickim_shared::protocol::event::HEADS_SUBJECT;
use quickim_shared::protocol::service::Origin;
use quickim_shared::protocol::system::Action;
use quickim_shared::time::now_ms;
use quickim_store::{Revision, Store};
use tokio_util::sync::CancellationToken;

/// Rows deleted per statement when pruning (keys, messages): short transactions.
const PRUNE_BATCH: u32 = 10_000;

/// What the housekeeping keeps, and for how long.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Periods {
    /// Resume window (cursors older get resync).
    pub replay_retention_ms: i64,
    /// Idempotency keys are kept this long.
    pub key_ttl_ms: i64,
    /// Messages are kept this long (0: forever).
    pub message_retention_ms: i64,
    /// How often the log heads are announced.
    pub heads_every: Duration,
    /// How often a checkpoint is recorded.
    pub checkpoint_every: Duration,
    /// How often keys (and messages) are pruned.
    pub prune_every: Duration,
    /// Streams open longer are cancelled.
    pub stream_timeout_ms: i64,
    /// How often abandoned streams are looked for.
    pub streams_every: Duration,
}

pub(crate) async fn run(store: Store, bus: Bus, periods: Periods, shutdown: CancellationToken) {
    let mut heads_tick = tokio::time::interval(periods.heads_every);
    let mut checkpoint_tick = tokio::time::interval(periods.checkpoint_every);
    let mut prune_tick = tokio::time::interval(periods.prune_every);
    let mut streams_tick = tokio::time::interval(periods.streams_every);
    streams_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    heads_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    checkpoint_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    prune_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Checkpoints are kept for twice the longest period that needs a horizon.
    let keep = periods.replay_retention_ms.max(periods.message_retention_ms);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = heads_tick.tick() => {
                match store.heads().await {
                    Ok(h) => {
                        if let Ok(payload) = serde_json::to_vec(&h) {
                            let _ = bus.publish(HEADS_SUBJECT, Vec::new(), payload.into()).await;
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot read log heads"),
                }
            }
            _ = checkpoint_tick.tick() => {
                if let Err(e) = store.record_checkpoint(keep).await {
                    tracing::warn!(error = %e, "cannot record a retention checkpoint");
                }
            }
            _ = prune_tick.tick() => prune(&store, periods, &shutdown).await,
            _ = streams_tick.tick() => cancel_abandoned_streams(&store, &bus, periods.stream_timeout_ms).await,
        }
    }
}

/// Expired idempotency keys, then (with a message retention) old messages, in batches.
async fn prune(store: &Store, periods: Periods, shutdown: &CancellationToken) {
    let before = now_ms() - periods.key_ttl_ms;
    let mut keys = 0;
    while !shutdown.is_cancelled() {
        match store.prune_keys(before, PRUNE_BATCH).await {
            Ok(n) => {
                keys += n;
                if n < u64::from(PRUNE_BATCH) {
                    break;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot prune idempotency keys");
                break;
            }
        }
    }
    metrics::counter!("quickim_pruned_keys_total").increment(keys);
    if periods.message_retention_ms <= 0 {
        return;
    }
    let horizon = match store.horizon(periods.message_retention_ms).await {
        Ok(Some(h)) => h,
        Ok(None) => return, // not running that long yet
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the message retention horizon");
            return;
        }
    };
    let mut messages = 0;
    while !shutdown.is_cancelled() {
        match store.prune_messages(&horizon, PRUNE_BATCH).await {
            Ok(n) => {
                messages += n;
                if n < u64::from(PRUNE_BATCH) {
                    break;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot prune messages");
                break;
            }
        }
    }
    metrics::counter!("quickim_pruned_messages_total").increment(messages);
    if keys + messages > 0 {
        tracing::info!(keys, messages, "pruned");
    }
}

/// Cancels the streams opened more than `timeout_ms` ago and never finished (any message
/// service may; the store cancels each once, the others' attempts answer it as it is).
async fn cancel_abandoned_streams(store: &Store, bus: &Bus, timeout_ms: i64) {
    let expired = match store.expired_streams(now_ms() - timeout_ms, 100).await {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(error = %e, "cannot look for abandoned streams");
            return;
        }
    };
    for (conversation_id, msg_id) in expired {
        let revision = Revision {
            origin: Origin::Inner,
            by: String::new(),
            conversation_id,
            msg_id,
            action: Action::Cancel,
            content: None,
            window_ms: 0,
        };
        match store.revise(revision).await {
            Ok((_, entries)) => {
                publish_entries(bus, &entries).await;
                metrics::counter!("quickim_streams_timed_out_total").increment(1);
            }
            Err(e) => tracing::warn!(error = %e, msg_id, "cannot cancel an abandoned stream"),
        }
    }
}
