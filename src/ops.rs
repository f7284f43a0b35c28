//! The service roles' operations listener: /healthz, /readyz (bus connected, database
//! answers, not stopping) and /metrics. (Gateways serve the same on their listeners.)

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use quickim_shared::bus::Bus;
use quickim_shared::telemetry::render_metrics;
use quickim_store::Store;
use tokio_util::sync::CancellationToken;

#[derive(Clone)]
struct Ops {
    bus: Bus,
    store: Store,
    shutdown: CancellationToken,
}

async fn healthz() -> impl IntoResponse {
    (StatusCode::OK, axum::Json(serde_json::json!({"code": 0, "data": {"status": "ok"}})))
}

async fn readyz(State(ops): State<Ops>) -> impl IntoResponse {
    let why = if ops.shutdown.is_cancelled() {
        Some("shutting down")
    } else if !ops.bus.is_connected() {
        Some("bus disconnected")
    } else if !tokio::time::timeout(Duration::from_secs(2), ops.store.ping()).await.unwrap_or(false) {
        Some("database unreachable")
    } else {
        None
    };
    match why {
        None => (StatusCode::OK, axum::Json(serde_json::json!({"code": 0, "data": {"status": "ready"}}))),
        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, axum::Json(serde_json::json!({"code": 50300, "error": why}))),
    }
}

async fn metrics() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], render_metrics())
}

/// Binds `addr` and serves until `shutdown`.
pub async fn serve(
    addr: SocketAddr,
    bus: Bus,
    store: Store,
    shutdown: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener =
        tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr} (ops_addr)"))?;
    let router = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(Ops { bus, store, shutdown: shutdown.clone() });
    tracing::info!(%addr, "ops listener: /healthz /readyz /metrics");
    Ok(tokio::spawn(async move {
        let _ = axum::serve(listener, router).with_graceful_shutdown(shutdown.cancelled_owned()).await;
    }))
}

/// Publishes the database pool's usage as gauges every few seconds.
pub fn pool_gauges(store: Store, shutdown: CancellationToken) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {
                    let (size, idle) = store.pool_usage();
                    metrics::gauge!("quickim_db_pool_connections", "state" => "idle").set(idle as f64);
                    metrics::gauge!("quickim_db_pool_connections", "state" => "used").set(f64::from(size).max(idle as f64) - idle as f64);
                }
            }
        }
    });
}
