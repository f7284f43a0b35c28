//! Liveness and readiness.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use quickim_shared::error::ErrorCode;
use quickim_shared::protocol::service::GetHeads;
use serde::Serialize;

use super::error::{ApiError, Envelope};
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

/// GET /readyz: the bus is connected, the services and their database answer, start-up is
/// done and the node is not shutting down.
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
    if !s.is_ready() || !s.hub.is_ready() {
        return not_ready("starting");
    }
    match tokio::time::timeout(Duration::from_secs(2), s.rpc.call(&GetHeads {})).await {
        Ok(Ok(_)) => Envelope(Status { status: "ready", node_id: s.node_id.clone() }).into_response(),
        Ok(Err(e)) => not_ready(&format!("message service: {}", e.message)),
        Err(_) => not_ready("message service did not answer in time"),
    }
}
