//! Periodic work of the message service: announcing the log heads (a gateway that missed
//! the last entries of a partition learns of them within a second and reads them from the
//! store) and recording retention checkpoints.

use std::time::Duration;

use quickim_shared::bus::Bus;
use quickim_shared::protocol::event::HEADS_SUBJECT;
use quickim_store::Store;
use tokio_util::sync::CancellationToken;

pub(crate) async fn run(
    store: Store,
    bus: Bus,
    retention_ms: i64,
    heads_every: Duration,
    checkpoint_every: Duration,
    shutdown: CancellationToken,
) {
    let mut heads_tick = tokio::time::interval(heads_every);
    let mut checkpoint_tick = tokio::time::interval(checkpoint_every);
    heads_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    checkpoint_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
                if let Err(e) = store.record_checkpoint(retention_ms).await {
                    tracing::warn!(error = %e, "cannot record a retention checkpoint");
                }
            }
        }
    }
}
