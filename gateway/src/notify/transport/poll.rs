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
use bytes::Bytes;
use quickim_shared::error::ErrorCode;

use crate::error::ApiError;
use crate::notify::event::{self, Encoded};
use crate::notify::parked::Parked;
use crate::notify::session::{Session, Step};

/// Answers one poll; the session is parked for the next poll after. `in_body`: wait
/// inside the response's body (for the listener's lean path, see `listener::Lean`), else
/// here (hyper frames a later body in chunks). What the client missed is read first, before
/// the status is chosen: a replay that fails before a single event is answered 503, so the
/// client backs off and polls again from its cursor.
pub async fn respond(mut session: Session, timeout: Duration, max: usize, in_body: bool, parked: Parked) -> Response {
    let max = max.max(1);
    let Ok((events, closed)) = replayed(&mut session, max).await else {
        return ApiError::new(ErrorCode::Unavailable, "cannot read what you missed now, try again").into_response();
    };
    let body = if in_body {
        Body::from_stream(futures::stream::once(async move {
            Ok::<Bytes, std::convert::Infallible>(answer(session, events, closed, timeout, max, parked).await)
        }))
    } else {
        Body::from(answer(session, events, closed, timeout, max, parked).await)
    };
    ([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], body).into_response()
}

/// The events the session has ready and what the replay reads from the store, up to `max`;
/// whether the replay stopped short (the store failed after some events). `Err`: it failed
/// before the first one.
async fn replayed(session: &mut Session, max: usize) -> Result<(Vec<Arc<Encoded>>, bool), ()> {
    let mut events: Vec<Arc<Encoded>> = Vec::new();
    loop {
        while let Some(e) = session.try_next() {
            // A resumed poll knows where it is: no `ready` in its answers.
            if !session.is_resumed_ready(&e) {
                events.push(e);
            }
            if events.len() >= max {
                return Ok((events, false));
            }
        }
        if !session.replaying() {
            return Ok((events, false));
        }
        if session.fill().await.is_err() {
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
    parked: Parked,
) -> Bytes {
    // Live events only once the replay is complete: a live event's cursor is past whatever
    // the replay has not read yet.
    let live = session.resumed() && !closed && !session.replaying();
    if live && events.is_empty() {
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        tokio::select! {
            step = session.next() => match step {
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
            match session.try_next() {
                Some(e) => events.push(e),
                None => break,
            }
        }
        if events.is_empty() {
            session.refresh();
        }
    }
    let body = event::poll_body(&events, &session.poll_cursor());
    for e in &events {
        session.written(e, async {}).await;
    }
    if !closed {
        parked.park(session);
    }
    body
}
