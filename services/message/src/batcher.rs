//! Group commit for single sends.
//!
//! Senders queue their message (bounded queue: a full queue makes the sender wait, which
//! is backpressure, not loss) and wait for its result. The writer takes whatever is queued
//! (up to `max_batch`), stores it in one transaction, answers every sender, then hands the
//! log entries over for publishing. Under low load a batch is one message and adds no delay;
//! under high load one commit carries many messages. Log entries are published by a task of
//! their own, in commit order (one bus message for all that has been committed meanwhile), so
//! the next batch does not wait for the previous one's publishing (a bounded hand-over: a
//! publisher that falls behind slows the writer down).

use quickim_shared::bus::Bus;
use quickim_shared::error::ServiceError;
use quickim_shared::fanout::publish_traced;
use quickim_shared::protocol::api::Message;
use quickim_shared::protocol::event::LogEntry;
use quickim_store::{SendItem, Store};
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

type Job = (SendItem, oneshot::Sender<Result<Message, ServiceError>>, tracing::Span);

/// Committed entries waiting to be published, each with its sender's span.
type Committed = Vec<(LogEntry, tracing::Span)>;

/// Committed batches the publisher may lag behind by.
const PUBLISH_BACKLOG: usize = 64;

/// Handle to the writer.
#[derive(Clone)]
pub struct Batcher {
    tx: mpsc::Sender<Job>,
}

impl Batcher {
    /// Starts the writer, taking up to `max_batch` messages per transaction. One batch at a
    /// time: SQLite has one writer anyway, and on PostgreSQL every batch locks the log
    /// partitions it appends to until it commits, so parallel batches of one service mostly
    /// wait for each other while one writer gets bigger batches (docs/benchmarks.md, "Sends
    /// (distributed)", has the measurements).
    pub fn start(store: Store, bus: Bus, max_batch: usize) -> Batcher {
        let (tx, mut rx) = mpsc::channel::<Job>(max_batch * 4);
        let (publish_tx, mut publish_rx) = mpsc::channel::<Committed>(PUBLISH_BACKLOG);
        tokio::spawn(async move {
            // Ends once the writer has stopped and everything committed is published. What
            // has been committed meanwhile goes out together, as one bus message; each entry
            // in its own sender's trace, in commit order.
            let mut batches = Vec::with_capacity(PUBLISH_BACKLOG);
            while publish_rx.recv_many(&mut batches, PUBLISH_BACKLOG).await > 0 {
                publish_traced(&bus, batches.iter().flatten().map(|(entry, parent)| (entry, parent)).collect()).await;
                batches.clear();
            }
        });
        run_writer(async move {
            loop {
                let mut jobs = Vec::with_capacity(max_batch);
                if rx.recv_many(&mut jobs, max_batch).await == 0 {
                    return;
                }
                write_batch(&store, &publish_tx, jobs).await;
            }
        });
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

/// Runs the writer on a thread of its own. On SQLite the batch's statements run right here,
/// on this thread (`Store::send_batch`): no wake-up between them at all. On PostgreSQL a
/// batch awaits the database many times (the connection, each statement, the commit); on
/// the shared runtime every one of those wake-ups queued behind the request tasks of a busy
/// node, and the writer is the send path's critical section. Falls back to the shared
/// runtime if no thread can be made (SQLite then tells the runtime its worker blocks).
fn run_writer<F>(writer: F)
where
    F: std::future::Future + Send + 'static,
{
    let slot = std::sync::Arc::new(std::sync::Mutex::new(Some(writer)));
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
    if let Ok(runtime) = runtime {
        let theirs = slot.clone();
        let spawned = std::thread::Builder::new().name("quickim-writer".into()).spawn(move || {
            let writer = theirs.lock().ok().and_then(|mut w| w.take());
            if let Some(writer) = writer {
                runtime.block_on(writer);
            }
        });
        if spawned.is_ok() {
            return;
        }
    }
    tracing::warn!("no thread for the message writer; it shares the runtime");
    if let Some(writer) = slot.lock().ok().and_then(|mut w| w.take()) {
        tokio::spawn(async move {
            writer.await;
        });
    }
}

async fn write_batch(store: &Store, publish: &mpsc::Sender<Committed>, jobs: Vec<Job>) {
    // The batch's statements belong to the first sender's trace; the others link to it.
    let span =
        tracing::info_span!(parent: jobs.first().and_then(|(_, _, s)| s.id()), "send.batch", batch_size = jobs.len());
    for (_, _, parent) in jobs.iter().skip(1) {
        span.follows_from(parent.id());
    }
    metrics::histogram!("quickim_send_batch_size").record(jobs.len() as f64);
    async {
        let items: Vec<SendItem> = jobs.iter().map(|(item, _, _)| item.clone()).collect();
        let started = std::time::Instant::now();
        let written = store.send_batch(&items).await;
        metrics::histogram!("quickim_send_batch_seconds").record(started.elapsed().as_secs_f64());
        match written {
            Ok((results, entries)) => {
                metrics::counter!("quickim_messages_stored_total").increment(entries.len() as u64);
                let mut entries: std::collections::HashMap<(String, u64), LogEntry> =
                    entries.into_iter().map(|e| ((e.message.conversation_id.clone(), e.message.msg_id), e)).collect();
                let mut committed = Vec::with_capacity(jobs.len());
                for ((_, done, parent), result) in jobs.into_iter().zip(results) {
                    let entry =
                        result.as_ref().ok().and_then(|m| entries.remove(&(m.conversation_id.clone(), m.msg_id)));
                    let _ = done.send(result);
                    if let Some(e) = entry {
                        committed.push((e, parent));
                    }
                }
                if !committed.is_empty() && publish.send(committed).await.is_err() {
                    tracing::warn!("log publisher stopped; gateways will fill the gap from the store");
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
