//! /notify: realtime delivery over WebSocket, SSE and long-poll.
//!
//! - `hub/`: consumes the log in order (filling gaps from the store), keeps who gets what,
//!   and delivers to connections through bounded queues;
//! - `event.rs`: the event format — one constructor per event kind, SSE and long-poll framing;
//! - `queue.rs`: a connection's bounded outbound queue (events and bytes), empty = no buffer;
//! - `session.rs`: the one session core: authentication, attach, replay from a cursor, then
//!   live events;
//! - `transport/`: `ws.rs`, `sse.rs`, `poll.rs` — thin adapters from the session to a wire;
//! - `cursor.rs`: the opaque cursor (one log offset per partition);
//! - `disconnect.rs`: why a connection closes, its close code and reconnect policy;
//! - `registry.rs`: the open connections of this node, by user;
//! - `parked.rs`: answered long-polls' sessions, kept for the next poll of the same client.

pub mod cursor;
pub mod disconnect;
pub mod event;
pub mod hub;
pub mod parked;
pub mod queue;
pub mod registry;
pub mod session;
pub mod transport;

use axum::extract::{FromRequestParts, Query, Request, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use quickim_shared::config::Config;
use quickim_shared::error::ErrorCode;
use quickim_shared::protocol::service::ConsumeTicket;
use serde::Deserialize;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::listener::{Lean, Peer, Switch};
use crate::state::AppState;
use cursor::Cursor;
use event::Transport;
use session::Session;

/// The query of a /notify request.
#[derive(Debug, Deserialize)]
pub struct NotifyQuery {
    protoc: Option<String>,
    cursor: Option<String>,
    last_event_id: Option<String>,
    timeout: Option<String>,
    #[serde(rename = "token")]
    _token: Option<String>,
    ticket: Option<String>,
}

/// Reads a /notify request's query (a malformed one is 400 `invalid_param`).
pub fn query_of(uri: &axum::http::Uri) -> Result<NotifyQuery, ApiError> {
    Ok(Query::<NotifyQuery>::try_from_uri(uri)
        .map_err(|e| ApiError::new(ErrorCode::InvalidParam, format!("bad query: {e}")))?
        .0)
}

/// GET /notify?protoc=ws|sse|poll — see docs/protocol.md.
pub async fn notify(State(state): State<AppState>, request: Request) -> Response {
    match open(state, request).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn open(state: AppState, request: Request) -> Result<Response, ApiError> {
    let (mut parts, _body) = request.into_parts();
    let query = query_of(&parts.uri)?;
    let transport = match query.protoc.as_deref() {
        Some(p) => Transport::parse(p),
        None if parts.headers.get(header::UPGRADE).is_some() => Some(Transport::Ws),
        None => None,
    }
    .ok_or_else(|| ApiError::new(ErrorCode::InvalidParam, "protoc must be ws, sse or poll"))?;
    let caller = match &query.ticket {
        Some(ticket) => caller_of_ticket(&state, ticket).await?,
        None => Caller::from_request_parts(&mut parts, &state).await?,
    };
    // Served by the listener itself: a long-poll may wait inside its response body.
    let lean = parts.extensions.get::<Lean>().is_some();
    let cursor_text = if transport == Transport::Sse {
        parts
            .headers
            .get("last-event-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .or(query.last_event_id)
            .or(query.cursor)
    } else {
        query.cursor
    };
    let cursor_text = cursor_text.filter(|c| !c.is_empty());
    let config = &state.config;
    let max_events = config.replay_page as usize;
    // A poll that continues where this node's last answer to the same client left off.
    if transport == Transport::Poll
        && let Some(c) = &cursor_text
        && let timeout = poll_timeout(query.timeout.as_deref(), config)?
        && !state.is_draining()
        && let Some(session) = state.parked.take(&caller, c)
    {
        let wait = std::time::Duration::from_secs(timeout);
        return Ok(transport::poll::respond(session, wait, max_events, lean, state.parked.clone()).await);
    }
    // A new stream (not a parked poll's continuation): counted against its address's rate.
    if let Some(Peer(ip)) = parts.extensions.get::<Peer>()
        && let Err(wait) = state.handshakes.check_ip(*ip)
    {
        metrics::counter!("quickim_connections_refused_total", "reason" => "handshake_rate").increment(1);
        return Err(ApiError::ip_rate_limited(wait));
    }
    let resume = match cursor_text {
        Some(c) => Some(
            Cursor::decode(&c)
                .map_err(|_| ApiError::new(ErrorCode::InvalidParam, "cursor is not a cursor from this service"))?,
        ),
        None => None,
    };
    let cx = session::Context {
        hub: &state.hub,
        rpc: &state.rpc,
        registry: &state.registry,
        shutdown: &state.shutdown,
        draining: state.is_draining(),
        max_connections_per_user: config.max_connections_per_user,
        queue: (config.queue_max_events, config.queue_max_bytes),
        replay_page: config.replay_page,
    };
    match transport {
        Transport::Ws => {
            if !origin_allowed(&parts.headers, config) {
                return Err(ApiError::new(ErrorCode::Forbidden, "origin not allowed"));
            }
            let response = transport::ws::handshake(&parts.headers)?;
            let switch = Switch::of(&mut parts, &state.connections)
                .ok_or_else(|| ApiError::new(ErrorCode::InvalidParam, "this connection cannot switch protocols"))?;
            let session = Box::pin(Session::open(cx, caller, transport, resume)).await?;
            let state = state.clone();
            switch.run(move |conn, ahead| transport::ws::serve(conn, ahead, session, state));
            Ok(response)
        }
        Transport::Sse => {
            let session = Box::pin(Session::open(cx, caller, transport, resume)).await?;
            Ok(transport::sse::respond(session, std::time::Duration::from_secs(config.sse_heartbeat_s)))
        }
        Transport::Poll => {
            let timeout = std::time::Duration::from_secs(poll_timeout(query.timeout.as_deref(), config)?);
            let session = Box::pin(Session::open(cx, caller, transport, resume)).await?;
            Ok(transport::poll::respond(session, timeout, max_events, lean, state.parked.clone()).await)
        }
    }
}

/// The caller a /notify ticket stands for, once the ticket is used up (on any node).
async fn caller_of_ticket(state: &AppState, ticket: &str) -> Result<Caller, ApiError> {
    let ticket = state.auth.verify_ticket(ticket)?;
    let first = state.rpc.call(&ConsumeTicket { ticket_id: ticket.id, expires_ms: ticket.expires_ms }).await?;
    if !first {
        return Err(ApiError::new(ErrorCode::InvalidToken, "ticket already used: get a new one"));
    }
    tracing::Span::current().record("enduser.id", ticket.caller.user_id.as_str());
    if let Err(wait) = state.limiter.check(&ticket.caller.user_id) {
        return Err(ApiError::rate_limited(wait));
    }
    Ok(ticket.caller)
}

/// The long-poll wait asked for (or the default).
fn poll_timeout(asked: Option<&str>, config: &Config) -> Result<u64, ApiError> {
    match asked {
        None | Some("") => Ok(config.poll_timeout_s),
        Some(t) => t.parse::<u64>().ok().filter(|t| *t <= config.poll_max_timeout_s).ok_or_else(|| {
            ApiError::new(ErrorCode::InvalidParam, format!("timeout must be 0–{} seconds", config.poll_max_timeout_s))
        }),
    }
}

/// A browser's WebSocket must come from an allowed origin (`cors_origins`) or from the
/// gateway's own origin; clients that send no Origin are not browsers and pass.
fn origin_allowed(headers: &HeaderMap, config: &Config) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()) else {
        return true;
    };
    if config.cors_origins.iter().any(|o| o == origin) {
        return true;
    }
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let origin_host = origin.strip_prefix("http://").or_else(|| origin.strip_prefix("https://"));
    host.is_some() && origin_host == host
}
