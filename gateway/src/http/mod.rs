//! The HTTP side of the gateway: two routers, one per listener.
//!
//! - `public.rs`: client routes (JWT) — and /notify, mounted from `crate::notify`;
//! - `inner.rs`: /inner routes (inner key);
//! - `health.rs`: /healthz, /readyz (and /metrics, on the inner listener, is rendered here);
//! - `openapi.rs`: the OpenAPI document;
//! - `demo.rs`: the demo chat page (`/demo`) and its development token route;
//! - `extract.rs`: body, token and key extractors (bad input → 4xx in the project's format).
//!
//! The errors' one mapping to HTTP answers is `crate::error`; the accept loop that serves
//! these routers is `crate::listener`.

pub mod demo;
pub mod extract;
pub mod health;
pub mod inner;
pub mod openapi;
pub mod public;

use axum::Router;
use axum::body::Body;
use axum::extract::Extension;
use axum::http::Request;
use axum::http::{HeaderName, HeaderValue, Method, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use tower_http::cors::{AllowOrigin, CorsLayer};
use tracing::Instrument;

use crate::state::AppState;
use extract::BodyLimit;

async fn metrics() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], quickim_shared::telemetry::render_metrics())
}

fn body_timeout(state: &AppState) -> std::time::Duration {
    std::time::Duration::from_secs(state.config.body_read_timeout_s)
}

/// [`observe`] for callers whose `traceparent` is trusted (the business system on /inner).
async fn observe_trusted(req: Request<Body>, next: axum::middleware::Next) -> axum::response::Response {
    observe(req, next, true).await
}

/// [`observe`] for public clients: unless `trust_client_traceparent`, their `traceparent`
/// neither parents the request's span nor decides its sampling (a client asking for every
/// trace cannot make the node record them all); it is recorded as an attribute.
async fn observe_public(
    axum::extract::State(trusted): axum::extract::State<bool>,
    req: Request<Body>,
    next: axum::middleware::Next,
) -> axum::response::Response {
    observe(req, next, trusted).await
}

/// One server span per request (child of the caller's `traceparent` if it sent one and is
/// `trusted`), counted and timed by route (the matched path, never the raw URL).
async fn observe(mut req: Request<Body>, next: axum::middleware::Next, trusted: bool) -> axum::response::Response {
    req.extensions_mut().insert(extract::Arrived(tokio::time::Instant::now()));
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let method = req.method().clone();
    let span = tracing::info_span!(
        "http.request",
        otel.name = %format!("{method} {route}"),
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        http.request.method = %method,
        http.route = %route,
        url.path = %req.uri().path(),
        http.response.status_code = tracing::field::Empty,
        enduser.id = tracing::field::Empty,
        client.traceparent = tracing::field::Empty,
    );
    if trusted {
        let incoming: quickim_shared::bus::Headers = ["traceparent", "tracestate"]
            .iter()
            .filter_map(|k| req.headers().get(*k).and_then(|v| v.to_str().ok()).map(|v| (k.to_string(), v.to_string())))
            .collect();
        quickim_shared::telemetry::set_parent(&span, &incoming);
    } else if let Some(tp) = req.headers().get("traceparent").and_then(|v| v.to_str().ok()) {
        span.record("client.traceparent", tp.get(..64).unwrap_or(tp));
    }
    let start = std::time::Instant::now();
    let response = next.run(req).instrument(span.clone()).await;
    let status = response.status().as_u16();
    span.record("http.response.status_code", status);
    if status >= 500 {
        span.record("otel.status_code", "ERROR");
    }
    // Every request, at debug (an access log); `log_spans` adds the request's span to it.
    span.in_scope(|| tracing::debug!(status, "answered"));
    metrics::counter!("quickim_http_requests_total", "route" => route.clone(), "status" => status.to_string())
        .increment(1);
    metrics::histogram!("quickim_http_request_duration_seconds", "route" => route)
        .record(start.elapsed().as_secs_f64());
    response
}

async fn openapi_json() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], openapi::document_json())
}

fn common(router: Router<AppState>) -> Router<AppState> {
    router
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/openapi.json", get(openapi_json))
        .fallback(crate::error::not_found)
        .method_not_allowed_fallback(crate::error::method_not_allowed)
}

/// The public listener's routes.
pub fn public_router(state: AppState) -> Router {
    let cors = cors_layer(&state.config.cors_origins);
    let mut routes = Router::new();
    if state.config.demo == Some(true) {
        routes = routes
            .route("/demo", get(demo::redirect))
            .route("/demo/", get(demo::index))
            .route("/demo/{file}", get(demo::file));
    }
    if state.config.demo_tokens == Some(true) {
        routes = routes.route("/demo/token", post(demo::token));
    }
    let mut router = common(
        routes
            .route("/send_msg", post(public::send_msg))
            .route("/check_joined_conversation", post(public::check_joined_conversation))
            .route("/get_joined_conversation", post(public::get_joined_conversation))
            .route("/get_conversation_detail", post(public::get_conversation_detail))
            .route("/create_conversation", post(public::create_conversation))
            .route("/join_conversation", post(public::join_conversation))
            .route("/leave_conversation", post(public::leave_conversation))
            .route("/get_lastone_msgid", post(public::get_lastone_msgid))
            .route("/mark_read", post(public::mark_read))
            .route("/signal", post(public::signal))
            .route("/get_conversation_msg_by_range", post(public::get_conversation_msg_by_range))
            .route("/get_conversation_30msg_before_the_id", post(public::get_conversation_30msg_before_the_id))
            .route("/get_conversation_30msg_after_the_id", post(public::get_conversation_30msg_after_the_id))
            .route("/get_conversation_last_30_msg", post(public::get_conversation_last_30_msg))
            .route("/get_conversation_lastone_msg", post(public::get_conversation_lastone_msg))
            .route("/notify_ticket", post(public::notify_ticket))
            .route("/edit_msg", post(public::edit_msg))
            .route("/recall_msg", post(public::recall_msg))
            .route("/delete_msg", post(public::delete_msg))
            .route("/open_stream", post(public::open_stream))
            .route("/stream_delta", post(public::stream_delta))
            .route("/finish_stream", post(public::finish_stream))
            .route("/cancel_stream", post(public::cancel_stream))
            .route("/get_msg_versions", post(public::get_msg_versions))
            .route("/update_conversation", post(public::update_conversation))
            .route("/set_conversation_mute", post(public::set_conversation_mute))
            .route("/notify", get(crate::notify::notify)),
    )
    .layer(Extension(BodyLimit(state.config.max_body_bytes, body_timeout(&state))))
    .route_layer(axum::middleware::from_fn_with_state(state.config.trust_client_traceparent, observe_public));
    if let Some(cors) = cors {
        router = router.layer(cors);
    }
    router.with_state(state)
}

/// The inner listener's routes.
pub fn inner_router(state: AppState) -> Router {
    common(
        Router::new()
            .route("/inner/get_token", post(inner::get_token))
            .route("/inner/create_conversation", post(inner::create_conversation))
            .route("/inner/join_conversation", post(inner::join_conversation))
            .route("/inner/kickout_conversation", post(inner::kickout_conversation))
            .route("/inner/set_archive_conversations", post(inner::set_archive_conversations))
            .route("/inner/send_msg", post(inner::send_msg))
            .route("/inner/send_msg_batch", post(inner::send_msg_batch))
            .route("/inner/get_users_online", post(inner::get_users_online))
            .route("/inner/kick_user", post(inner::kick_user))
            .route("/inner/edit_msg", post(inner::edit_msg))
            .route("/inner/recall_msg", post(inner::recall_msg))
            .route("/inner/delete_msg", post(inner::delete_msg))
            .route("/inner/open_stream", post(inner::open_stream))
            .route("/inner/stream_delta", post(inner::stream_delta))
            .route("/inner/finish_stream", post(inner::finish_stream))
            .route("/inner/cancel_stream", post(inner::cancel_stream))
            .route("/inner/get_msg_versions", post(inner::get_msg_versions))
            .route("/inner/update_conversation", post(inner::update_conversation))
            .route("/inner/set_member_role", post(inner::set_member_role))
            .route("/inner/get_user_conversations", post(inner::get_user_conversations))
            .route("/inner/get_conversation_members", post(inner::get_conversation_members))
            .route("/metrics", get(metrics)),
    )
    .layer(Extension(BodyLimit(state.config.inner_max_body_bytes, body_timeout(&state))))
    .route_layer(axum::middleware::from_fn(observe_trusted))
    .with_state(state)
}

/// CORS for the configured origins only (none configured: no CORS headers at all).
fn cors_layer(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let list: Vec<HeaderValue> = origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()).collect();
    Some(
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(list))
            .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
            .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE, HeaderName::from_static("last-event-id")])
            .max_age(std::time::Duration::from_secs(600)),
    )
}
