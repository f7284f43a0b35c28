//! WebSocket: JSON text frames. A reader loop (client frames: `send`, `mark_read`; pongs) and
//! a writer loop (session events, acks, pings) per connection. The server pings every
//! `ws_ping_s` and closes a peer silent for two intervals; close codes come from
//! [`Disconnect`].

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message as WsMessage, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use quickim_shared::error::{ErrorCode, ServiceError};
use quickim_shared::protocol::event::{ClientFrame, Event};
use quickim_shared::protocol::service::{MarkRead, Origin, SendMessage};
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite;

use crate::notify::disconnect::Disconnect;
use crate::notify::session::{Session, Step};
use crate::ratelimit::Bucket;
use crate::state::AppState;

/// Client requests in flight per connection.
const IN_FLIGHT: usize = 16;

/// Completes the upgrade and runs the connection.
pub fn respond(upgrade: WebSocketUpgrade, session: Session, state: AppState) -> Response {
    let max = state.config.ws_max_frame_bytes;
    upgrade.read_buffer_size(1024).write_buffer_size(0).max_message_size(max).max_frame_size(max).on_upgrade(
        move |socket| {
            let tracker = state.connections.clone();
            tracker.track_future(run(socket, session, state))
        },
    )
}

enum ReaderEnd {
    ClientClosed,
    Failed(Disconnect),
}

async fn run(socket: WebSocket, mut session: Session, state: AppState) {
    let (mut sink, mut stream) = socket.split();
    let (acks_tx, mut acks_rx) = mpsc::channel::<String>(IN_FLIGHT * 2);
    let (end_tx, mut end_rx) = mpsc::channel::<ReaderEnd>(1);
    let (seen_tx, seen_rx) = tokio::sync::watch::channel(Instant::now());
    let caller_id = session.caller().user_id.clone();
    let reader_state = state.clone();
    let reader = tokio::spawn(async move {
        let end = read_loop(&mut stream, &reader_state, &caller_id, acks_tx, seen_tx).await;
        let failed = matches!(end, ReaderEnd::Failed(_));
        let _ = end_tx.send(end).await;
        if failed {
            // Keep reading (and discarding) until the client answers our close frame: closing
            // a socket with unread data makes TCP reset it, and the close frame would be lost.
            while let Some(Ok(frame)) = stream.next().await {
                if matches!(frame, WsMessage::Close(_)) {
                    break;
                }
            }
        }
    });

    let ping_every = Duration::from_secs(state.config.ws_ping_s);
    let mut ping = tokio::time::interval_at(Instant::now() + ping_every, ping_every);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let page = state.config.replay_page;
    let close = loop {
        // Ready and replay first (not cancel-safe: no select around them).
        if let Some(e) = session.pop() {
            if session.written(&e, sink.send(text(&e.json))).await.is_err() {
                break None;
            }
            continue;
        }
        if session.replaying() {
            // Boxed: the replay's future is large and rare; inline it would make every idle
            // connection's task as large.
            if let Err(d) = Box::pin(session.fill(page)).await {
                break Some(d);
            }
            continue;
        }
        tokio::select! {
            step = session.live() => match step {
                Step::Event(e) => {
                    if session.written(&e, sink.send(text(&e.json))).await.is_err() {
                        break None;
                    }
                }
                Step::Close(d) => {
                    if let Some(e) = d.final_event() {
                        let _ = sink.send(text(&e.json)).await;
                    }
                    break Some(d);
                }
            },
            Some(ack) = acks_rx.recv() => {
                if sink.send(WsMessage::Text(Utf8Bytes::from(ack))).await.is_err() {
                    break None;
                }
            }
            end = end_rx.recv() => match end {
                Some(ReaderEnd::Failed(d)) => {
                    // The errors the reader queued before giving up explain the close.
                    while let Ok(ack) = acks_rx.try_recv() {
                        if sink.send(WsMessage::Text(Utf8Bytes::from(ack))).await.is_err() {
                            break;
                        }
                    }
                    break Some(d);
                }
                _ => break None,
            },
            _ = ping.tick() => {
                if seen_rx.borrow().elapsed() > ping_every * 2 {
                    break Some(Disconnect::PingTimeout);
                }
                if let Some(c) = session.refresh()
                    && sink.send(text(&c.json)).await.is_err()
                {
                    break None;
                }

                if sink.send(WsMessage::Ping(Bytes::new())).await.is_err() {
                    break None;
                }
            }
        }
    };
    // Out of delivery and presence before the closing handshake.
    drop(session);
    if let Some(d) = close {
        let frame = CloseFrame { code: d.ws_code(), reason: Utf8Bytes::from_static(d.reason()) };
        let _ = tokio::time::timeout(Duration::from_secs(2), sink.send(WsMessage::Close(Some(frame)))).await;
        metrics::counter!("quickim_notify_closed_total", "protocol" => "ws", "reason" => d.reason()).increment(1);
        // The closing handshake: give the client a moment to answer with its close frame.
        let abort = reader.abort_handle();
        if tokio::time::timeout(Duration::from_secs(2), reader).await.is_err() {
            abort.abort();
        }
    } else {
        reader.abort();
    }
}

fn text(json: &Bytes) -> WsMessage {
    // The hub encodes JSON, which is UTF-8.
    WsMessage::Text(Utf8Bytes::try_from(json.clone()).unwrap_or_default())
}

async fn read_loop(
    stream: &mut futures::stream::SplitStream<WebSocket>,
    state: &AppState,
    user_id: &str,
    acks: mpsc::Sender<String>,
    seen: tokio::sync::watch::Sender<Instant>,
) -> ReaderEnd {
    let rate = state.config.ws_frames_per_s;
    let mut frames = Bucket::full(rate.saturating_mul(2));
    let burst = f64::from(rate.saturating_mul(2).max(1));
    let in_flight = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut refused = 0u32;
    while let Some(frame) = stream.next().await {
        let _ = seen.send(Instant::now());
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                let capacity = matches!(
                    e.into_inner().downcast_ref::<tungstenite::Error>(),
                    Some(tungstenite::Error::Capacity(_))
                );
                return if capacity { ReaderEnd::Failed(Disconnect::FrameTooLarge) } else { ReaderEnd::ClientClosed };
            }
        };
        let body = match frame {
            WsMessage::Text(t) => t,
            WsMessage::Binary(_) => {
                let _ = acks.try_send(error(
                    None,
                    ErrorCode::InvalidParam,
                    "binary frames are not accepted; send JSON text",
                ));
                continue;
            }
            WsMessage::Close(_) => return ReaderEnd::ClientClosed,
            WsMessage::Ping(_) | WsMessage::Pong(_) => continue,
        };
        if frames.take(f64::from(rate), burst).is_err() {
            refused += 1;
            if refused > rate.saturating_mul(2).max(10) {
                return ReaderEnd::Failed(Disconnect::RateLimited);
            }
            let _ = acks.try_send(error(req_id_of(&body), ErrorCode::RateLimited, "too many frames"));
            continue;
        }
        refused = 0;
        let request = match serde_json::from_str::<ClientFrame>(&body) {
            Ok(r) => r,
            Err(e) => {
                let _ = acks.try_send(error(req_id_of(&body), ErrorCode::InvalidParam, &format!("bad frame: {e}")));
                continue;
            }
        };
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            let _ = acks.try_send(error(req_id_of(&body), ErrorCode::RateLimited, "too many requests in flight"));
            continue;
        };
        let (state, user_id, acks) = (state.clone(), user_id.to_string(), acks.clone());
        tokio::spawn(async move {
            let answer = handle(&state, &user_id, request).await;
            let _ = acks.send(answer).await;
            drop(permit);
        });
    }
    ReaderEnd::ClientClosed
}

async fn handle(state: &AppState, user_id: &str, frame: ClientFrame) -> String {
    let (req_id, result) = match frame {
        ClientFrame::Send { req_id, conversation_id, msg_type, content, client_msg_id } => {
            let r = state
                .rpc
                .call(&SendMessage {
                    origin: Origin::Client,
                    conversation_id,
                    from: user_id.to_string(),
                    msg_type,
                    content,
                    client_msg_id,
                })
                .await
                .map(|m| Event::Ack { req_id: req_id.clone(), message: Some(m), read_msg_id: None });
            (req_id, r)
        }
        ClientFrame::MarkRead { req_id, conversation_id, msg_id } => {
            let r = state
                .rpc
                .call(&MarkRead { user_id: user_id.to_string(), conversation_id, msg_id })
                .await
                .map(|a| Event::Ack { req_id: req_id.clone(), message: None, read_msg_id: Some(a.read_msg_id) });
            (req_id, r)
        }
    };
    match result {
        Ok(event) => serde_json::to_string(&event).unwrap_or_default(),
        Err(ServiceError { code, message }) => error(Some(req_id), code, &message),
    }
}

fn req_id_of(body: &str) -> Option<serde_json::Value> {
    serde_json::from_str::<serde_json::Value>(body).ok().and_then(|v| v.get("req_id").cloned())
}

fn error(req_id: Option<serde_json::Value>, code: ErrorCode, message: &str) -> String {
    serde_json::to_string(&Event::Error { req_id, code: code.number(), error: message.to_string() }).unwrap_or_default()
}
