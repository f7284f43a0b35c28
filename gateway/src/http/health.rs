//! Liveness and readiness.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use quickim_shared::error::ErrorCode;
use serde::Serialize;

use crate::error::{ApiError, Envelope};
use crate::state::AppState;

#[derive(Serialize)]
struct Status {
    status: &'static str,
    node_id: String,
}

/// GET /healthz: the process runs.
pub async fn healthz(State(s): State<AppState>) -> Response {
    Envelope(Status { status: "ok", node_id: s.node_id.clone() }).into_response()
}

/// How recently the log's heads must have been heard of (they come every second).
const HEADS_FRESH: Duration = Duration::from_secs(5);

/// GET /readyz: the bus is connected, the message services and their database answer (their
/// heads announcements, every second, arrive), start-up is done, the hub keeps up with the
/// log and the node is not shutting down. Answered from state: no bus request per call.
pub async fn readyz(State(s): State<AppState>) -> Response {
    let not_ready = |why: &str| {
        let mut r = ApiError::new(ErrorCode::Unavailable, why.to_string()).into_response();
        *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        r
    };
    if s.is_draining() {
        return not_ready("shutting down");
    }
    if !s.rpc.bus().is_connected() {
        return not_ready("bus disconnected");
    }
    if s.hub.is_stalled() {
        return not_ready("behind the log; catching up");
    }
    if !s.is_ready() || !s.hub.is_ready() {
        return not_ready("starting");
    }
    match s.hub.heads_age() {
        Some(age) if age <= HEADS_FRESH => {
            Envelope(Status { status: "ready", node_id: s.node_id.clone() }).into_response()
        }
        _ => not_ready("no message service has announced the log for 5 s"),
    }
}
