//! Typed calls over the bus, and the loop that serves them.
//!
//! The gateway calls `rpc.call(&SendMessage{..})`; the message service's [`serve`] loop
//! receives it, decodes it and answers `Result<Message, ServiceError>`. Bus failures become
//! service errors here, in one place: no responders → 503 `unavailable`, timeout → 504
//! `timeout`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::bus::{Bus, BusError, Incoming};
use crate::error::{ErrorCode, ServiceError};
use crate::protocol::service::{Call, Reply};
use crate::telemetry;

/// Makes typed calls to the services.
#[derive(Clone)]
pub struct RpcClient {
    bus: Bus,
    timeout: Duration,
}

impl RpcClient {
    /// Calls over `bus`, waiting at most `timeout` for each answer.
    pub fn new(bus: Bus, timeout: Duration) -> RpcClient {
        RpcClient { bus, timeout }
    }

    /// The bus underneath.
    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    /// Sends `request` to its service and decodes the answer.
    pub async fn call<C: Call>(&self, request: &C) -> Result<C::Reply, ServiceError> {
        self.call_within(request, self.timeout).await
    }

    /// The configured timeout of a call.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// As [`RpcClient::call`], waiting at most `timeout` for the answer.
    pub async fn call_within<C: Call>(&self, request: &C, timeout: Duration) -> Result<C::Reply, ServiceError> {
        let span = client_span(C::SUBJECT, C::SUBJECT);
        let start = std::time::Instant::now();
        let result = async {
            let payload = serde_json::to_vec(request).map_err(ServiceError::internal)?;
            let headers = telemetry::inject_context();
            let reply = match self.bus.request(C::SUBJECT, headers, payload.into(), timeout).await {
                Ok(r) => r,
                Err(e) => {
                    let kind = match &e {
                        BusError::NoResponders(_) => "no_responders",
                        BusError::TimedOut(_) => "timeout",
                        BusError::Unavailable(_) => "unavailable",
                        BusError::TooLarge { .. } => "too_large",
                    };
                    metrics::counter!("quickim_bus_request_errors_total", "subject" => C::SUBJECT, "kind" => kind)
                        .increment(1);
                    tracing::Span::current().record("otel.status_code", "ERROR");
                    return Err(bus_error(e));
                }
            };
            let answer: Reply<C::Reply> = serde_json::from_slice(&reply.payload)
                .map_err(|e| ServiceError::internal(format!("undecodable answer on {}: {e}", C::SUBJECT)))?;
            answer
        }
        .instrument(span)
        .await;
        metrics::histogram!("quickim_bus_request_duration_seconds", "subject" => C::SUBJECT)
            .record(start.elapsed().as_secs_f64());
        result
    }
}

/// The client span of a bus request named `name` (a send carried inside a `send_each`
/// request is named `quickim.msg.send`) to `subject`.
pub fn client_span(name: &'static str, subject: &'static str) -> tracing::Span {
    tracing::info_span!(
        "bus.request",
        otel.name = name,
        otel.kind = "client",
        otel.status_code = tracing::field::Empty,
        messaging.system = "quickim-bus",
        messaging.destination.name = subject,
        messaging.operation.type = "send",
    )
}

/// Maps a bus failure to what the client sees.
pub fn bus_error(e: BusError) -> ServiceError {
    match e {
        BusError::NoResponders(subject) => {
            tracing::warn!(%subject, "no service answers");
            ServiceError::unavailable("service unavailable, try again")
        }
        BusError::TimedOut(subject) => {
            tracing::warn!(%subject, "service did not answer in time");
            ServiceError::new(ErrorCode::Timeout, "service did not answer in time")
        }
        BusError::Unavailable(detail) => {
            tracing::warn!(%detail, "bus unavailable");
            ServiceError::unavailable("service unavailable, try again")
        }
        BusError::TooLarge { subject, size, max } => {
            tracing::error!(%subject, size, max, "a request does not fit in one bus message");
            ServiceError::new(ErrorCode::TooLargeForBus, format!("the request is too large for the bus ({max} bytes)"))
        }
    }
}

/// Serializes an answer (these types cannot fail to serialize; a failure would be a bug).
pub fn encode<T: Serialize>(reply: &Reply<T>) -> Bytes {
    match serde_json::to_vec(reply) {
        Ok(v) => v.into(),
        Err(e) => {
            let err: Reply<()> = Err(ServiceError::internal(e));
            serde_json::to_vec(&err).unwrap_or_default().into()
        }
    }
}

/// Decodes a request of type `C` and answers it with `f`.
pub async fn answer<C, F, Fut>(payload: &[u8], f: F) -> Bytes
where
    C: Call,
    F: FnOnce(C) -> Fut,
    Fut: Future<Output = Reply<C::Reply>>,
{
    let reply = match serde_json::from_slice::<C>(payload) {
        Ok(request) => f(request).await,
        Err(e) => Err(ServiceError::invalid(format!("malformed {} request: {e}", C::SUBJECT))),
    };
    encode(&reply)
}

/// The answer for a subject nobody handles.
pub fn unknown_operation(subject: &str) -> Bytes {
    encode::<()>(&Err(ServiceError::new(ErrorCode::NotFound, format!("unknown operation {subject}"))))
}

/// Something that answers requests by subject.
pub trait Handler: Send + Sync + 'static {
    /// Answers one request (the payload of a `Result<Reply, ServiceError>`).
    fn handle(&self, subject: &str, payload: &[u8]) -> impl Future<Output = Bytes> + Send;
}

/// Subscribes `handler` to `subject` (in `queue`) and serves it in a task until `shutdown`;
/// at most `max_in_flight` requests run at once (further ones wait in the subscription's
/// bounded buffer). Returns once subscribed, so requests sent afterwards are served. On
/// shutdown the task stops taking requests and waits for the ones in flight.
pub async fn serve<H: Handler>(
    bus: &Bus,
    subject: &str,
    queue: &str,
    max_in_flight: usize,
    handler: Arc<H>,
    shutdown: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, BusError> {
    let sub = bus.subscribe(subject, Some(queue)).await?;
    Ok(tokio::spawn(serve_loop(sub, max_in_flight, handler, shutdown)))
}

async fn serve_loop<H: Handler>(
    mut sub: crate::bus::Subscription,
    max_in_flight: usize,
    handler: Arc<H>,
    shutdown: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(max_in_flight.max(1)));
    let tasks = TaskTracker::new();
    loop {
        let msg: Incoming = tokio::select! {
            _ = shutdown.cancelled() => break,
            msg = sub.next() => match msg { Some(m) => m, None => break },
        };
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let handler = handler.clone();
        tasks.spawn(async move {
            let span = telemetry::server_span(&msg.subject, &msg.headers);
            async move {
                let start = std::time::Instant::now();
                let answer = handler.handle(&msg.subject, &msg.payload).await;
                metrics::histogram!("quickim_service_request_duration_seconds", "subject" => msg.subject.clone())
                    .record(start.elapsed().as_secs_f64());
                let subject = msg.subject.clone();
                let max = msg.max_payload();
                let answer = if answer.len() > max {
                    // Every answer that carries a list is paged under the bus's limit; this
                    // is the last guard, so the caller learns why at once instead of timing out.
                    tracing::error!(%subject, size = answer.len(), max, "an answer does not fit in one bus message");
                    encode::<()>(&Err(ServiceError::new(
                        ErrorCode::TooLargeForBus,
                        format!("the answer on {subject} is over the bus's limit of {max} bytes"),
                    )))
                } else {
                    answer
                };
                if let Err(e) = msg.respond(Vec::new(), answer).await {
                    tracing::warn!(error = %e, %subject, "could not send an answer");
                }
            }
            .instrument(span)
            .await;
            drop(permit);
        });
    }
    drop(sub);
    tasks.close();
    tasks.wait().await;
}
