//! The demo chat page and its development token route.
//!
//! - `GET /demo/…` serves the files of `demo_dir` (the page and the browser client, built by
//!   `npm run build` in `clients/js`), when `demo` is on (standalone's default);
//! - `POST /demo/token` gives a token for any user id, without a password, and makes that
//!   user a member of the demo room, when `demo_tokens` is on: standalone only, and by default
//!   only while the public listener is a loopback address (see `Config::load`).

use axum::extract::{Path, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Redirect, Response};
use quickim_shared::error::ErrorCode;
use quickim_shared::protocol::service::{CreateConversation, Join};
use serde::{Deserialize, Serialize};

use super::extract::Body;
use crate::error::{ApiError, ApiResult, Envelope};
use crate::state::AppState;

/// The conversation every demo user is put in.
pub const DEMO_ROOM: &str = "demo-room";

/// GET /demo
pub async fn redirect() -> Redirect {
    Redirect::permanent("/demo/")
}

/// GET /demo/
pub async fn index(State(s): State<AppState>) -> Response {
    file_response(&s, "index.html").await
}

/// GET /demo/{file}
pub async fn file(State(s): State<AppState>, Path(name): Path<String>) -> Response {
    file_response(&s, &name).await
}

fn content_type(name: &str) -> Option<&'static str> {
    let ext = name.rsplit_once('.')?.1;
    Some(match ext {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "map" | "json" => "application/json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        _ => return None,
    })
}

/// A file name of the demo's folder: no path, no hidden files.
fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

async fn file_response(s: &AppState, name: &str) -> Response {
    let Some(kind) = content_type(name).filter(|_| plain_name(name)) else {
        return ApiError::new(ErrorCode::NotFound, "no such file").into_response();
    };
    let path = s.config.demo_dir.join(name);
    let read = tokio::task::spawn_blocking(move || std::fs::read(path)).await;
    match read {
        Ok(Ok(bytes)) => (
            [
                (header::CONTENT_TYPE, HeaderValue::from_static(kind)),
                (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
                (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
                (
                    header::CONTENT_SECURITY_POLICY,
                    HeaderValue::from_static(
                        "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; frame-ancestors 'none'",
                    ),
                ),
            ],
            bytes,
        )
            .into_response(),
        _ if name == "index.html" => ApiError::new(
            ErrorCode::NotFound,
            format!(
                "the demo page is not built ({} has no index.html): run `npm --prefix clients/js ci && npm --prefix clients/js run build`, or set demo_dir",
                s.config.demo_dir.display()
            ),
        )
        .into_response(),
        _ => ApiError::new(ErrorCode::NotFound, "no such file").into_response(),
    }
}

/// Body of POST /demo/token.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DemoTokenRequest {
    /// Whom the token is for (any user id: this route has no password).
    pub user_id: String,
    /// Lifetime in seconds (default `token_ttl_s`).
    #[serde(default)]
    pub ttl_s: Option<u64>,
}

/// Answer of POST /demo/token.
#[derive(Debug, Serialize)]
pub struct DemoTokenAnswer {
    /// The client token (platform `web`).
    pub token: String,
    /// When it expires (ms).
    pub expires_at: i64,
    /// The demo room, of which the user is now a member.
    pub conversation_id: &'static str,
}

/// POST /demo/token: a token for any user, who is put in the demo room.
pub async fn token(State(s): State<AppState>, Body(r): Body<DemoTokenRequest>) -> ApiResult<DemoTokenAnswer> {
    let (token, expires_at) = s.auth.issue(&r.user_id, "web", r.ttl_s)?;
    let join = Join { conversation_id: DEMO_ROOM.into(), user_ids: vec![r.user_id.clone()], self_join: false };
    match s.rpc.call(&join).await {
        Ok(_) => {}
        Err(e) if matches!(e.code, ErrorCode::NotFound | ErrorCode::NotMember) => {
            // The first demo user makes the room (another request may have made it meanwhile).
            let create = CreateConversation {
                conversation_id: Some(DEMO_ROOM.into()),
                conversation_type: 2,
                joinable: true,
                members: vec![r.user_id.clone()],
                owner: None,
                title: Some("Demo room".into()),
                avatar: None,
                ext: None,
                meta_role: None,
                receipts: None,
                presence: Some(true),
            };
            if let Err(e) = s.rpc.call(&create).await
                && e.code != ErrorCode::Conflict
            {
                return Err(e.into());
            }
            s.rpc.call(&join).await?;
        }
        Err(e) => return Err(e.into()),
    }
    Ok(Envelope(DemoTokenAnswer { token, expires_at, conversation_id: DEMO_ROOM }))
}
