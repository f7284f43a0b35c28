//! Group commit for single sends.
//!
//! Senders queue their message (bounded queue: a full queue makes the sender wait, which
//! is backpressure, not loss) and wait for its result. Each writer task takes whatever is
//! queued (up to `max_batch`), stores it in one transaction, answers every sender, then
//! publishes the log entries. Under low load a batch is one message and adds no delay;
//! under high load one commit carries many messages.

use quickim_shared::bus::Bus;
use quickim_shared::error::ServiceError;
use quickim_shared::fanout::publish_entries;
use quickim_shared::protocol::api::Message;
use quickim_shared::protocol::event::LogEntry;
use quickim_store::{SendItem, Store};
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

type Job = (SendItem, oneshot::Sender<Result<Message, ServiceError>>, tracing::Span);

/// Handle to the writer tasks.
#[derive(Clone)]
pub struct Batcher {
    tx: mpsc::Sender<Job>,
}

impl Batcher {
    /// Starts `writers` writer tasks taking up to `max_batch` messages per transaction.
    pub fn start(store: Store, bus: Bus, writers: usize, max_batch: usize) -> Batcher {
        let (tx, rx) = mpsc::channel::<Job>(max_batch * writers * 4);
        let rx = std::sync::Arc::new(tokio::sync::Mutex::new(rx));
        for _ in 0..writers.max(1) {
            let (store, bus, rx) = (store.clone(), bus.clone(), rx.clone());
            tokio::spawn(async move {
                loop {
                    let mut jobs = Vec::with_capacity(max_batch);
                    {
                        let mut rx = rx.lock().await;
                        if rx.recv_many(&mut jobs, max_batch).await == 0 {
                            return;
                        }
                    }
                    write_batch(&store, &bus, jobs).await;
                }
            });
        }
        Batcher { tx }
    }

    /// Stores one message (with others that are waiting) and answers it once committed.
    pub async fn submit(&self, item: SendItem) -> Result<Message, ServiceError> {
        let (done, result) = oneshot::channel();
        self.tx
            .send((item, done, tracing::Span::current()))
            .await
            .map_err(|_| ServiceError::unavailable("message service is stopping"))?;
        result.await.map_err(|_| ServiceError::unavailable("message service is stopping"))?
    }
}

async fn write_batch(store: &Store, bus: &Bus, jobs: Vec<Job>) {
    // The batch's statements belong to the first sender's trace; the others link to it.
    let span =
        tracing::info_span!(parent: jobs.first().and_then(|(_, _, s)| s.id()), "send.batch", batch_size = jobs.len());
    for (_, _, parent) in jobs.iter().skip(1) {
        span.follows_from(parent.id());
    }
    metrics::histogram!("quickim_send_batch_size").record(jobs.len() as f64);
    async {
        let items: Vec<SendItem> = jobs.iter().map(|(item, _, _)| item.clone()).collect();
        match store.send_batch(&items).await {
            Ok((results, entries)) => {
                metrics::counter!("quickim_messages_stored_total").increment(entries.len() as u64);
                let mut entries: std::collections::HashMap<(String, u64), LogEntry> =
                    entries.into_iter().map(|e| ((e.message.conversation_id.clone(), e.message.msg_id), e)).collect();
                let mut publish = Vec::with_capacity(jobs.len());
                for ((_, done, parent), result) in jobs.into_iter().zip(results) {
                    let entry =
                        result.as_ref().ok().and_then(|m| entries.remove(&(m.conversation_id.clone(), m.msg_id)));
                    let _ = done.send(result);
                    if let Some(e) = entry {
                        publish.push((e, parent));
                    }
                }
                // Each entry is published in its own sender's trace, in allocation order.
                for (entry, parent) in publish {
                    publish_entries(bus, std::slice::from_ref(&entry)).instrument(parent).await;
                }
            }
            Err(e) => {
                let err = ServiceError::from(e);
                for (_, done, _) in jobs {
                    let _ = done.send(Err(err.clone()));
                }
            }
        }
    }
    .instrument(span)
    .await
}
