//! Long-poll: answers at once with every pending event (up to `replay_page`), else waits up
//! to `timeout` for the first one and answers with it and whatever else is queued by then.
//! Stateless: the answer's cursor is all the next poll needs, on any node. The answered
//! session is parked (`notify/parked.rs`) so that the same client's next poll on this node
//! continues it without a replay. On the listener's lean path the wait happens inside the
//! response's body: the request's router and middleware state is gone by then, and a
//! waiting poll holds little more than its session.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use bytes::{BufMut, Bytes, BytesMut};

use quickim_shared::error::ErrorCode;

use crate::http::error::ApiError;
use crate::notify::hub::Encoded;
use crate::notify::session::{Session, Step};

/// Answers one poll. `in_body`: wait inside the response's body (for the listener's lean
/// path, see `http::server::Lean`), else here (hyper frames a later body in chunks). What
/// the client missed is read first, before the status is chosen: a replay that fails before
/// a single event is answered 503, so the client backs off and polls again from its cursor.
pub async fn respond(mut session: Session, timeout: Duration, page: u32, in_body: bool) -> Response {
    let max = page.max(1) as usize;
    let Ok((events, closed)) = replayed(&mut session, page, max).await else {
        return ApiError::new(ErrorCode::Unavailable, "cannot read what you missed now, try again").into_response();
    };
    let body = if in_body {
        Body::from_stream(futures::stream::once(async move {
            Ok::<Bytes, std::convert::Infallible>(answer(session, events, closed, timeout, max).await)
        }))
    } else {
        Body::from(answer(session, events, closed, timeout, max).await)
    };
    ([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], body).into_response()
}

/// The events the session has ready and what the replay reads from the store, up to `max`;
/// whether the replay stopped short (the store failed after some events). `Err`: it failed
/// before the first one.
async fn replayed(session: &mut Session, page: u32, max: usize) -> Result<(Vec<Arc<Encoded>>, bool), ()> {
    let mut events: Vec<Arc<Encoded>> = Vec::new();
    let resumed = session.resumed();
    loop {
        while let Some(e) = session.pop() {
            // A resumed poll knows where it is: no `ready` in its answers.
            if !(resumed && e.kind == "ready") {
                events.push(e);
            }
            if events.len() >= max {
                return Ok((events, false));
            }
        }
        if !session.replaying() {
            return Ok((events, false));
        }
        if Box::pin(session.fill(page)).await.is_err() {
            return if events.is_empty() { Err(()) } else { Ok((events, true)) };
        }
    }
}

/// The poll's answer: `events`, or (none yet, the replay done) the first live event within
/// `timeout` and whatever else is queued by then.
async fn answer(
    mut session: Session,
    mut events: Vec<Arc<Encoded>>,
    mut closed: bool,
    timeout: Duration,
    max: usize,
) -> Bytes {
    let resumed = session.resumed();
    // Live events only once the replay is complete: a live event's cursor is past whatever
    // the replay has not read yet.
    let live = resumed && !closed && !session.replaying();
    if live && events.is_empty() {
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        tokio::select! {
            step = session.live() => match step {
                Step::Event(e) => events.push(e),
                Step::Close(reason) => {
                    closed = true;
                    events.extend(reason.final_event());
                }
            },
            _ = &mut deadline => {}
        }
    }
    if live && !closed {
        while events.len() < max {
            match session.try_live() {
                Some(e) => events.push(e),
                None => break,
            }
        }
        if events.is_empty() {
            session.refresh();
        }
    }
    let cursor = session.cursor().clone();
    let mut body = BytesMut::with_capacity(64 + events.iter().map(|e| e.json.len() + 1).sum::<usize>());
    body.put_slice(br#"{"code":0,"data":{"events":["#);
    for (i, e) in events.iter().enumerate() {
        if i > 0 {
            body.put_u8(b',');
        }
        session.written(e, async { body.put_slice(&e.json) }).await;
    }
    body.put_slice(br#"],"cursor":"#);
    body.put_slice(serde_json::to_string(&*cursor).unwrap_or_default().as_bytes());
    body.put_slice(b"}}");
    if !closed {
        session.park();
    }
    body.freeze()
}
