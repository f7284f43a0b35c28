//! Server-Sent Events: `id: <cursor>`, `event: <type>`, `data: <json>` per event; a comment
//! heartbeat every `sse_heartbeat_s`, carrying an `id:` line when the position moved (so the
//! browser's Last-Event-ID stays fresh in quiet periods); `retry: 1000` first. Events
//! already queued go out together, as one chunk.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::Response;
use bytes::{BufMut, Bytes, BytesMut};
use futures::StreamExt;

use crate::notify::hub::Encoded;
use crate::notify::session::{Session, Step};
use crate::notify::transport::coalesce::{BURST, BURST_BYTES};

struct Stream {
    session: Session,
    heartbeat: tokio::time::Interval,
    page: u32,
    done: bool,
}

fn frame(e: &Encoded) -> Bytes {
    let mut b = BytesMut::with_capacity(e.json.len() + e.cursor.len() + 32);
    put_frame(&mut b, e);
    b.freeze()
}

fn put_frame(b: &mut BytesMut, e: &Encoded) {
    if !e.cursor.is_empty() {
        b.put_slice(b"id: ");
        b.put_slice(e.cursor.as_bytes());
        b.put_u8(b'\n');
    }
    b.put_slice(b"event: ");
    b.put_slice(e.kind.as_bytes());
    b.put_slice(b"\ndata: ");
    b.put_slice(&e.json);
    b.put_slice(b"\n\n");
}

/// Frames `first` and the events `next` hands out after it (at most [`BURST`] events or
/// about [`BURST_BYTES`]) as one piece of the body: one chunk and one system call for the
/// burst, where a chunk per event made a catch-up of 100 events 100 socket writes.
async fn burst(session: &mut Session, first: Arc<Encoded>, next: fn(&mut Session) -> Option<Arc<Encoded>>) -> Bytes {
    let mut out = BytesMut::with_capacity(first.json.len() + first.cursor.len() + 32);
    session.written(&first, async { put_frame(&mut out, &first) }).await;
    let mut count = 1;
    while count < BURST && out.len() < BURST_BYTES {
        let Some(e) = next(session) else { break };
        session.written(&e, async { put_frame(&mut out, &e) }).await;
        count += 1;
    }
    out.freeze()
}

impl Stream {
    async fn next(&mut self) -> Option<Bytes> {
        if self.done {
            return None;
        }
        loop {
            if let Some(e) = self.session.pop() {
                return Some(burst(&mut self.session, e, Session::pop).await);
            }
            if self.session.replaying() {
                if Box::pin(self.session.fill(self.page)).await.is_err() {
                    self.done = true;
                    return None;
                }
                continue;
            }
            return tokio::select! {
                step = self.session.live() => match step {
                    Step::Event(e) => Some(burst(&mut self.session, e, Session::try_live).await),
                    Step::Close(reason) => {
                        self.done = true;
                        tracing::debug!(reason = reason.reason(), "sse stream closes");
                        reason.final_event().map(|e| frame(&e))
                    }
                },
                _ = self.heartbeat.tick() => Some(match self.session.refresh() {
                    Some(c) => Bytes::from(format!("id: {}\n: heartbeat\n\n", c.cursor)),
                    None => Bytes::from_static(b": heartbeat\n\n"),
                }),
            };
        }
    }
}

/// Streams `session` as `text/event-stream`.
pub fn respond(session: Session, heartbeat: Duration, page: u32) -> Response {
    let mut interval = tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stream = Stream { session, heartbeat: interval, page, done: false };
    let body =
        futures::stream::once(async { Ok::<Bytes, std::convert::Infallible>(Bytes::from_static(b"retry: 1000\n\n")) })
            .chain(futures::stream::unfold(stream, |mut s| async move { s.next().await.map(|b| (Ok(b), s)) }));
    let mut response = Response::new(Body::from_stream(body));
    *response.status_mut() = StatusCode::OK;
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}
