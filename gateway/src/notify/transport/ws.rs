//! WebSocket: JSON text frames. One task per connection drives everything: session events
//! out, client frames in (`send`, `mark_read`, answered by acks as they complete), and pings.
//! At most [`IN_FLIGHT`] client requests run at once: with that many open, the connection
//! stops reading the client's frames until one completes (backpressure, not refusal). The
//! server pings every `ws_ping_s` and closes a peer silent for two intervals; close codes
//! come from [`Disconnect`].
//!
//! One task (no reader task, no channels between halves) keeps an idle connection small.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use futures::stream::FuturesUnordered;
use futures::{SinkExt, StreamExt};
use quickim_shared::error::{ErrorCode, ServiceError};
use quickim_shared::protocol::event::ClientFrame;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Message as WsMessage, Utf8Bytes};
use tracing::Instrument;

use crate::actions::{self, NewMessage, Sender};
use crate::error::ApiError;
use crate::listener::Conn;
use crate::notify::disconnect::Disconnect;
use crate::notify::event::{self, Encoded, Transport};
use crate::notify::session::{Session, Step};
use crate::notify::transport::coalesce::{BURST, BURST_BYTES, Coalesce};
use crate::ratelimit::Bucket;
use crate::state::AppState;

/// Client requests in flight per connection (docs/protocol.md, "Limits").
pub const IN_FLIGHT: usize = 16;

/// How long the closing handshake may take.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// The answer to a valid opening handshake (RFC 6455 section 4.2.2): `101` with the
/// `Sec-WebSocket-Accept` for the client's key.
pub fn handshake(headers: &HeaderMap) -> Result<Response, ApiError> {
    let has_token = |name: header::HeaderName, token: &str| {
        headers
            .get_all(name)
            .iter()
            .any(|v| v.to_str().is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token))))
    };
    let bad = |what: &str| ApiError::new(ErrorCode::InvalidParam, format!("not a WebSocket request: {what}"));
    if !has_token(header::UPGRADE, "websocket") {
        return Err(bad("Upgrade: websocket is missing"));
    }
    if !has_token(header::CONNECTION, "upgrade") {
        return Err(bad("Connection: upgrade is missing"));
    }
    if headers.get(header::SEC_WEBSOCKET_VERSION).map(HeaderValue::as_bytes) != Some(b"13") {
        return Err(bad("Sec-WebSocket-Version must be 13"));
    }
    let key = headers.get(header::SEC_WEBSOCKET_KEY).ok_or_else(|| bad("Sec-WebSocket-Key is missing"))?;
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::SEC_WEBSOCKET_ACCEPT, HeaderValue::try_from(accept).map_err(|_| bad("key"))?);
    Ok(response)
}

/// The socket's limits (frame size from `ws_max_frame_bytes`; small buffers: most sockets
/// are idle).
pub fn config(state: &AppState) -> WebSocketConfig {
    let max = state.config.ws_max_frame_bytes;
    WebSocketConfig::default()
        .read_buffer_size(1024)
        .write_buffer_size(0)
        .max_message_size(Some(max))
        .max_frame_size(Some(max))
}

/// Runs the connection on `io` after the handshake; `ahead`: bytes the client sent after
/// its request head. (`state`: for the client's `send` and `mark_read` frames.)
pub async fn serve(io: Conn, ahead: Vec<u8>, session: Session, state: AppState) {
    let config = Some(config(&state));
    let io = Coalesce::new(io);
    let socket = if ahead.is_empty() {
        WebSocketStream::from_raw_socket(io, Role::Server, config).await
    } else {
        WebSocketStream::from_partially_read(io, ahead, Role::Server, config).await
    };
    run(socket, session, state).await;
}

type Answer = Pin<Box<dyn Future<Output = String> + Send>>;

/// What a client frame asks for.
enum Inbound {
    /// Nothing to do (pings, pongs).
    Nothing,
    /// Write this frame back (an error).
    Reply(String),
    /// Run this request; its answer is written when it completes.
    Request(ClientFrame),
    /// The client closed (or the socket failed).
    ClientClosed,
    /// Close with this reason.
    Close(Disconnect),
}

/// The client-frame side's limits: frame rate and requests in flight.
struct Limits {
    rate: u32,
    frames: Bucket,
    refused: u32,
}

impl Limits {
    fn new(rate: u32) -> Limits {
        Limits { rate, frames: Bucket::full(rate.saturating_mul(2)), refused: 0 }
    }

    fn inbound(&mut self, frame: Option<Result<WsMessage, tungstenite::Error>>) -> Inbound {
        let frame = match frame {
            Some(Ok(f)) => f,
            Some(Err(tungstenite::Error::Capacity(_))) => return Inbound::Close(Disconnect::FrameTooLarge),
            Some(Err(_)) | None => return Inbound::ClientClosed,
        };
        let body = match frame {
            WsMessage::Text(t) => t,
            WsMessage::Binary(_) => {
                return Inbound::Reply(error(
                    None,
                    ErrorCode::InvalidParam,
                    "binary frames are not accepted; send JSON text",
                ));
            }
            WsMessage::Close(_) => return Inbound::ClientClosed,
            WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_) => return Inbound::Nothing,
        };
        let burst = f64::from(self.rate.saturating_mul(2).max(1));
        if self.frames.take(f64::from(self.rate), burst).is_err() {
            self.refused += 1;
            if self.refused > self.rate.saturating_mul(2).max(10) {
                return Inbound::Close(Disconnect::RateLimited);
            }
            return Inbound::Reply(error(
                req_id_of(&body),
                ErrorCode::FrameRateLimited,
                &format!("more than {} frames per second", self.rate),
            ));
        }
        self.refused = 0;
        match serde_json::from_str::<ClientFrame>(&body) {
            Ok(request) => Inbound::Request(request),
            Err(e) => Inbound::Reply(error(req_id_of(&body), ErrorCode::InvalidParam, &format!("bad frame: {e}"))),
        }
    }
}

type Socket = WebSocketStream<Coalesce<Conn>>;

async fn run(mut socket: Socket, mut session: Session, state: AppState) {
    let ping_every = Duration::from_secs(state.config.ws_ping_s);
    let mut ping = tokio::time::interval_at(Instant::now() + ping_every, ping_every);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut limits = Limits::new(state.config.ws_frames_per_s);
    // Created at the first request: most connections never send one.
    let mut requests: Option<FuturesUnordered<Answer>> = None;
    let mut seen = Instant::now();
    let close = loop {
        let pending = requests.as_ref().map_or(0, FuturesUnordered::len);
        tokio::select! {
            step = session.next() => match step {
                Step::Event(e) => {
                    if write_burst(&mut socket, &mut session, e).await.is_err() {
                        break None;
                    }
                }
                Step::Close(d) => {
                    if let Some(e) = d.final_event() {
                        let _ = tokio::time::timeout(CLOSE_WAIT, socket.send(text(&e.json))).await;
                    }
                    break Some(d);
                }
            },
            // With IN_FLIGHT requests open, the client's frames wait in its socket.
            frame = socket.next(), if pending < IN_FLIGHT => {
                seen = Instant::now();
                match limits.inbound(frame) {
                    Inbound::Nothing => {}
                    Inbound::Reply(reply) => {
                        if socket.send(WsMessage::Text(Utf8Bytes::from(reply))).await.is_err() {
                            break None;
                        }
                    }
                    Inbound::Request(request) => {
                        let (state, user_id) = (state.clone(), session.caller().user_id.clone());
                        requests
                            .get_or_insert_with(FuturesUnordered::new)
                            .push(Box::pin(async move { handle(&state, &user_id, request).await }));
                    }
                    Inbound::ClientClosed => break None,
                    Inbound::Close(d) => break Some(d),
                }
            }
            Some(answer) = next_answer(&mut requests), if pending > 0 => {
                if socket.send(WsMessage::Text(Utf8Bytes::from(answer))).await.is_err() {
                    break None;
                }
            }
            _ = ping.tick() => {
                if seen.elapsed() > ping_every * 2 {
                    break Some(Disconnect::PingTimeout);
                }
                if let Some(c) = session.refresh()
                    && socket.send(text(&c.json)).await.is_err()
                {
                    break None;
                }
                if socket.send(WsMessage::Ping(Bytes::new())).await.is_err() {
                    break None;
                }
            }
        }
    };
    // Out of delivery and presence before the closing handshake.
    drop(session);
    let Some(d) = close else { return };
    let frame = CloseFrame { code: CloseCode::from(d.ws_code()), reason: Utf8Bytes::from_static(d.reason()) };
    metrics::counter!("quickim_notify_closed_total", "protocol" => Transport::Ws.name(), "reason" => d.reason())
        .increment(1);
    let _ = tokio::time::timeout(CLOSE_WAIT, socket.send(WsMessage::Close(Some(frame)))).await;
    // The closing handshake: read (and discard) until the client answers with its close
    // frame. Closing a socket with unread data makes TCP reset it, and the close frame would
    // be lost.
    let _ = tokio::time::timeout(CLOSE_WAIT, async {
        while let Some(Ok(frame)) = socket.next().await {
            if matches!(frame, WsMessage::Close(_)) {
                break;
            }
        }
    })
    .await;
}

/// Writes `first` and the events ready after it (at most [`BURST`] events or about
/// [`BURST_BYTES`]) with one system call.
async fn write_burst(
    socket: &mut Socket,
    session: &mut Session,
    first: Arc<Encoded>,
) -> Result<(), tungstenite::Error> {
    socket.get_mut().hold(true);
    let mut written = session.written(&first, socket.feed(text(&first.json))).await;
    let mut count = 1;
    while written.is_ok() && count < BURST && socket.get_ref().held() < BURST_BYTES {
        let Some(e) = session.try_next() else { break };
        written = session.written(&e, socket.feed(text(&e.json))).await;
        count += 1;
    }
    socket.get_mut().hold(false);
    written?;
    socket.flush().await
}

async fn next_answer(requests: &mut Option<FuturesUnordered<Answer>>) -> Option<String> {
    requests.as_mut()?.next().await
}

fn text(json: &Bytes) -> WsMessage {
    // The hub encodes JSON, which is UTF-8.
    WsMessage::Text(Utf8Bytes::try_from(json.clone()).unwrap_or_default())
}

/// Answers a client frame, as the same request over HTTP would be answered: the same
/// per-user rate limit, then the same action.
async fn handle(state: &AppState, user_id: &str, frame: ClientFrame) -> String {
    let (name, req_id) = match &frame {
        ClientFrame::Send { req_id, .. } => ("send", req_id.clone()),
        ClientFrame::MarkRead { req_id, .. } => ("mark_read", req_id.clone()),
        ClientFrame::Signal { req_id, .. } => ("signal", req_id.clone()),
        ClientFrame::StreamDelta { req_id, .. } => ("stream_delta", req_id.clone()),
    };
    let span = tracing::info_span!(
        "ws.request",
        otel.name = %format_args!("ws {name}"),
        otel.kind = "server",
        enduser.id = %user_id,
    );
    async {
        // Signals have a rate of their own (checked by the action).
        let limited = if matches!(frame, ClientFrame::Signal { .. }) { Ok(()) } else { state.limiter.check(user_id) };
        if let Err(wait) = limited {
            return event::error(
                Some(&req_id),
                ErrorCode::RateLimited,
                &format!("too many requests; retry in {wait} s"),
            );
        }
        match frame {
            ClientFrame::Send { conversation_id, msg_type, content, client_msg_id, .. } => {
                let deadline = tokio::time::Instant::now() + state.rpc.timeout();
                let send = NewMessage { conversation_id, msg_type, content, client_msg_id, count_unread: true };
                match actions::send(state, Sender::Member(user_id), send, deadline).await {
                    Ok(m) => event::ack_send(&req_id, &m),
                    Err(ServiceError { code, message }) => event::error(Some(&req_id), code, &message),
                }
            }
            ClientFrame::MarkRead { conversation_id, msg_id, .. } => {
                match actions::mark_read(state, user_id, conversation_id, msg_id).await {
                    Ok(a) => event::ack_read(&req_id, a.read_msg_id),
                    Err(ServiceError { code, message }) => event::error(Some(&req_id), code, &message),
                }
            }
            ClientFrame::StreamDelta { conversation_id, msg_id, seq, delta, .. } => {
                match actions::stream_delta(state, Sender::Member(user_id), conversation_id, msg_id, seq, delta).await {
                    Ok(_) => event::ack(&req_id),
                    Err(ServiceError { code, message }) => event::error(Some(&req_id), code, &message),
                }
            }
            ClientFrame::Signal { conversation_id, kind, content, .. } => {
                match actions::signal(state, user_id, conversation_id, kind, content).await {
                    Ok(_) => event::ack(&req_id),
                    Err(ServiceError { code, message }) => event::error(Some(&req_id), code, &message),
                }
            }
        }
    }
    .instrument(span)
    .await
}

fn req_id_of(body: &str) -> Option<serde_json::Value> {
    serde_json::from_str::<serde_json::Value>(body).ok().and_then(|v| v.get("req_id").cloned())
}

fn error(req_id: Option<serde_json::Value>, code: ErrorCode, message: &str) -> String {
    event::error(req_id.as_ref(), code, message)
}
