//! Sends on their way to the message services, coalesced per gateway.
//!
//! Every send (`/send_msg`, `/inner/send_msg`, a WebSocket `send` frame) is queued here
//! (bounded: a full queue makes the request wait, which is backpressure, not loss). A task
//! takes what is queued — at most [`SEND_EACH_MAX`] sends and [`REQUEST_BYTES`], never more
//! than fits in one bus message with its answer — and makes one bus request of it
//! ([`SendEach`]), with at most [`IN_FLIGHT_NATS`] requests out at once over NATS and
//! [`IN_FLIGHT_LOCAL`] over the in-process bus. Under low load a request carries one send and
//! adds no delay; under load one request and one reply carry many sends, where each send cost
//! a bus request and reply of its own (on NATS: four message deliveries). The message service
//! stores each as if it came alone, in its group commit.
//!
//! Each send keeps its own trace: its bus client span is made here, in the HTTP request's
//! span, and its context travels with the send to the service's server span for it. The bus
//! request that carries several sends belongs to the first one's trace.
//!
//! Each send has a deadline: `request_timeout_ms` from the request's arrival, time queued
//! here included. A send past its deadline is answered `timeout` (it may still be stored:
//! a retry with the same `client_msg_id` is safe); one whose caller has gone is not sent.

use std::sync::Arc;

use quickim_shared::bus::size;
use quickim_shared::error::{ErrorCode, ServiceError};
use quickim_shared::protocol::api::Message;
use quickim_shared::protocol::service::{Call, SEND_EACH_MAX, SendEach, SendMessage, TracedSend};
use quickim_shared::rpc::{self, RpcClient};
use quickim_shared::telemetry;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::Instant;
use tracing::Instrument;

/// Sends waiting for a bus request.
const QUEUE: usize = 4096;

/// Bus requests out at once over NATS; while they are, sends gather for the next ones. A
/// request costs NATS four message deliveries and the message service a request of its own,
/// so fewer, fuller requests pay off (docs/benchmarks.md has the measurements).
pub const IN_FLIGHT_NATS: usize = 4;

/// Bus requests out at once over the in-process bus (standalone), where a request is a few
/// channel hand-overs: more out at once keeps the writer fed (4 sent no faster there).
pub const IN_FLIGHT_LOCAL: usize = 16;

/// A request is closed once its sends hold this many bytes of JSON (or fewer: what fits in
/// one bus message with its answer).
const REQUEST_BYTES: usize = 512 * 1024;

/// Bytes a send's answer (the stored message) may take beyond the send itself, and a log
/// entry beyond the message: ids, times, envelopes.
const ANSWER_OVERHEAD: usize = 256;

struct Queued {
    send: TracedSend,
    bytes: usize,
    deadline: Instant,
    span: tracing::Span,
    done: oneshot::Sender<Result<Message, ServiceError>>,
}

/// Handle to the coalescing task.
#[derive(Clone)]
pub struct Sends {
    tx: mpsc::Sender<Queued>,
    rpc: RpcClient,
}

impl Sends {
    /// Starts the task that makes the bus requests over `rpc`.
    pub fn start(rpc: RpcClient) -> Sends {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(rpc.clone(), rx));
        Sends { tx, rpc }
    }

    /// Stores `send` through a message service and answers the stored message; `deadline`:
    /// when the request that asked arrived, plus the request timeout.
    pub async fn send(&self, send: SendMessage, deadline: Instant) -> Result<Message, ServiceError> {
        let span = rpc::client_span(SendMessage::SUBJECT, SendEach::SUBJECT);
        let trace = if span.is_disabled() { Vec::new() } else { span.in_scope(telemetry::inject_context) };
        let send = TracedSend { send, trace };
        let bytes = size::encoded_len(&send) + ANSWER_OVERHEAD;
        // Alone in a request, as an answer, as a log entry, in a page: it must fit them all.
        let budget = self.rpc.bus().payload_budget();
        if bytes + ANSWER_OVERHEAD > budget {
            return Err(ServiceError::new(
                ErrorCode::TooLargeForBus,
                format!("this message takes {bytes} bytes encoded; the cluster's bus carries {budget}"),
            ));
        }
        let (done, answer) = oneshot::channel();
        let queued = Queued { send, bytes, deadline, span: span.clone(), done };
        let sent = async {
            self.tx.send(queued).await.map_err(|_| ServiceError::unavailable("gateway is stopping"))?;
            answer.await.map_err(|_| ServiceError::unavailable("gateway is stopping"))?
        };
        match tokio::time::timeout_at(deadline, sent).instrument(span).await {
            Ok(result) => result,
            Err(_) => {
                metrics::counter!("quickim_send_timeouts_total").increment(1);
                Err(timed_out())
            }
        }
    }
}

/// The answer to a send past its deadline.
pub fn timed_out() -> ServiceError {
    ServiceError::new(
        ErrorCode::Timeout,
        "the message service did not answer in time; the message may still be stored: \
         retry with the same client_msg_id to find out (it is stored once)",
    )
}

async fn run(rpc: RpcClient, mut rx: mpsc::Receiver<Queued>) {
    let in_flight = if rpc.bus().is_local() { IN_FLIGHT_LOCAL } else { IN_FLIGHT_NATS };
    let permits = Arc::new(Semaphore::new(in_flight));
    let mut carried: Option<Queued> = None;
    loop {
        let first = match carried.take() {
            Some(q) => q,
            None => match rx.recv().await {
                Some(q) => q,
                None => return,
            },
        };
        // Wait for a free request first: what arrives meanwhile joins this one.
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        // The bus's limit can change with the server connected to: read it per request.
        let max_bytes = REQUEST_BYTES.min(rpc.bus().payload_budget());
        let mut bytes = first.bytes;
        let mut batch = vec![first];
        while batch.len() < SEND_EACH_MAX {
            let Ok(next) = rx.try_recv() else { break };
            if bytes + next.bytes > max_bytes {
                carried = Some(next);
                break;
            }
            bytes += next.bytes;
            batch.push(next);
        }
        // Sends whose callers gave up (timed out, disconnected) are not sent.
        batch.retain(|q| !q.done.is_closed());
        if batch.is_empty() {
            continue;
        }
        let rpc = rpc.clone();
        tokio::spawn(async move {
            request(&rpc, batch).await;
            drop(permit);
        });
    }
}

/// One bus request for `batch`; every send gets its own answer.
async fn request(rpc: &RpcClient, batch: Vec<Queued>) {
    metrics::histogram!("quickim_sends_per_request").record(batch.len() as f64);
    let parent = batch.first().map(|q| q.span.clone()).unwrap_or_else(tracing::Span::none);
    let mut waiting = Vec::with_capacity(batch.len());
    let mut spans = Vec::with_capacity(batch.len());
    let mut items = Vec::with_capacity(batch.len());
    // The request may take as long as the send with the latest deadline may wait.
    let latest = batch.iter().map(|q| q.deadline).max().unwrap_or_else(Instant::now);
    for q in batch {
        items.push(q.send);
        spans.push(q.span);
        waiting.push(q.done);
    }
    let request = SendEach { items };
    let timeout = latest.saturating_duration_since(Instant::now()).max(std::time::Duration::from_millis(1));
    let answers = match rpc.call_within(&request, timeout).instrument(parent).await {
        // A message service of an earlier version does not know `send_each` (a rolling
        // upgrade that reached the gateways first): one request per send, as it expects.
        Err(e) if e.code == ErrorCode::NotFound => {
            let sends = request
                .items
                .into_iter()
                .zip(spans)
                .map(|(item, span)| async move { rpc.call(&item.send).await }.instrument(span));
            Ok(futures::future::join_all(sends).await)
        }
        other => other,
    };
    match answers {
        Ok(answers) => {
            let mut answers = answers.into_iter();
            for done in waiting {
                let answer =
                    answers.next().unwrap_or_else(|| Err(ServiceError::internal("the message service skipped a send")));
                let _ = done.send(answer);
            }
        }
        Err(e) => {
            // A send whose request timed out may still be stored: say how to find out.
            let e = if e.code == ErrorCode::Timeout { timed_out() } else { e };
            for done in waiting {
                let _ = done.send(Err(e.clone()));
            }
        }
    }
}
