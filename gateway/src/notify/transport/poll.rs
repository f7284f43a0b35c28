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

use crate::notify::hub::Encoded;
use crate::notify::session::{Session, Step};

/// Answers one poll. `in_body`: wait inside the response's body (for the listener's lean
/// path, see `http::server::Lean`), else here (hyper frames a later body in chunks).
pub async fn respond(session: Session, timeout: Duration, page: u32, in_body: bool) -> Response {
    let body = if in_body {
        Body::from_stream(futures::stream::once(async move {
            Ok::<Bytes, std::convert::Infallible>(answer(session, timeout, page).await)
        }))
    } else {
        Body::from(answer(session, timeout, page).await)
    };
    ([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], body).into_response()
}

/// The poll's answer, once there is one.
async fn answer(mut session: Session, timeout: Duration, page: u32) -> Bytes {
    let max = page.max(1) as usize;
    let mut events: Vec<Arc<Encoded>> = Vec::new();
    let resumed = session.resumed();
    let mut closed = false;
    'replay: loop {
        while let Some(e) = session.pop() {
            // A resumed poll knows where it is: no `ready` in its answers.
            if !(resumed && e.kind == "ready") {
                events.push(e);
            }
            if events.len() >= max {
                break 'replay;
            }
        }
        if !session.replaying() {
            break;
        }
        if Box::pin(session.fill(page)).await.is_err() {
            closed = true;
            break;
        }
    }
    if resumed && events.is_empty() {
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
    if resumed && !session.replaying() {
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
