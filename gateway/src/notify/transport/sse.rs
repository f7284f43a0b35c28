//! Server-Sent Events: the session's events framed as `id:`/`event:`/`data:` blocks
//! (`notify::event`), events already queued going out together as one chunk; a heartbeat
//! comment every `sse_heartbeat_s`, carrying an `id:` line when the position moved (so the
//! browser's Last-Event-ID stays fresh in quiet periods); `retry: 1000` first.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;

use crate::notify::event::{self, Encoded};
use crate::notify::session::{Session, Step};
use crate::notify::transport::coalesce::{BURST, BURST_BYTES};

struct Stream {
    session: Session,
    heartbeat: tokio::time::Interval,
    done: bool,
}

/// Frames `first` and the events ready after it (at most [`BURST`] events or about
/// [`BURST_BYTES`]) as one piece of the body: one chunk and one system call for the burst,
/// where a chunk per event made a catch-up of 100 events 100 socket writes.
async fn burst(session: &mut Session, first: Arc<Encoded>) -> Bytes {
    let mut out = BytesMut::with_capacity(first.json.len() + first.cursor.len() + 32);
    session.written(&first, async { event::sse_frame(&mut out, &first) }).await;
    let mut count = 1;
    while count < BURST && out.len() < BURST_BYTES {
        let Some(e) = session.try_next() else { break };
        session.written(&e, async { event::sse_frame(&mut out, &e) }).await;
        count += 1;
    }
    out.freeze()
}

impl Stream {
    async fn next(&mut self) -> Option<Bytes> {
        if self.done {
            return None;
        }
        tokio::select! {
            step = self.session.next() => match step {
                Step::Event(e) => Some(burst(&mut self.session, e).await),
                Step::Close(reason) => {
                    self.done = true;
                    tracing::debug!(reason = reason.reason(), "sse stream closes");
                    reason.final_event().map(|e| {
                        let mut out = BytesMut::new();
                        event::sse_frame(&mut out, &e);
                        out.freeze()
                    })
                }
            },
            _ = self.heartbeat.tick() => Some(event::sse_heartbeat(self.session.refresh().as_deref().map(|c| &*c.cursor))),
        }
    }
}

/// Streams `session` as `text/event-stream`.
pub fn respond(session: Session, heartbeat: Duration) -> Response {
    let mut interval = tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stream = Stream { session, heartbeat: interval, done: false };
    let body =
        futures::stream::once(async { Ok::<Bytes, std::convert::Infallible>(Bytes::from_static(event::SSE_PREAMBLE)) })
            .chain(futures::stream::unfold(stream, |mut s| async move { s.next().await.map(|b| (Ok(b), s)) }));
    let mut response = Response::new(Body::from_stream(body));
    *response.status_mut() = StatusCode::OK;
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}
