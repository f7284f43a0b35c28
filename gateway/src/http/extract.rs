//! Extractors that turn every malformed request into the project's own 400/401/413 answers:
//! [`Body`] (JSON, size-limited, unknown fields refused), [`Caller`] (the token's user, rate
//! limited) and [`InnerKey`] (the /inner bearer key).

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::header;
use axum::http::request::Parts;
use quickim_shared::error::ErrorCode;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use subtle::ConstantTimeEq;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::state::AppState;

/// When a request arrived (set by the observing middleware, first thing).
#[derive(Debug, Clone, Copy)]
pub struct Arrived(pub tokio::time::Instant);

/// When the request must be answered by: its arrival plus `request_timeout_ms` (time spent
/// reading the body and queued in the gateway counts).
#[derive(Debug, Clone, Copy)]
pub struct Deadline(pub tokio::time::Instant);

impl FromRequestParts<AppState> for Deadline {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let arrived = parts.extensions.get::<Arrived>().map_or_else(tokio::time::Instant::now, |a| a.0);
        Ok(Deadline(arrived + std::time::Duration::from_millis(state.config.request_timeout_ms)))
    }
}

/// The body limits of the router a request came through (set as an extension layer): its
/// size, and how long the client may take to send it.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimit(pub usize, pub std::time::Duration);

/// A JSON body of type `T`.
pub struct Body<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        let (limit, timeout) = req
            .extensions()
            .get::<BodyLimit>()
            .map(|l| (l.0, l.1))
            .unwrap_or((64 * 1024, std::time::Duration::from_secs(10)));
        let read = tokio::time::timeout(timeout, axum::body::to_bytes(req.into_body(), limit)).await.map_err(|_| {
            ApiError::new(ErrorCode::RequestTimeout, format!("the request body took longer than {timeout:?}"))
        })?;
        let bytes = read.map_err(|e| {
            if e.into_inner().is::<http_body_util::LengthLimitError>() {
                ApiError::new(ErrorCode::BodyTooLarge, format!("request body is larger than {limit} bytes"))
            } else {
                ApiError::new(ErrorCode::InvalidParam, "could not read the request body")
            }
        })?;
        serde_json::from_slice(&bytes)
            .map(Body)
            .map_err(|e| ApiError::new(ErrorCode::InvalidParam, format!("invalid JSON body: {e}")))
    }
}

#[derive(Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

/// The bearer token of a request: `Authorization: Bearer …`, else `?token=`.
pub fn bearer(parts: &Parts) -> Option<String> {
    if let Some(v) = parts.headers.get(header::AUTHORIZATION) {
        let v = v.to_str().ok()?;
        let (scheme, token) = v.split_once(' ')?;
        return scheme.eq_ignore_ascii_case("bearer").then(|| token.trim().to_string());
    }
    let q = axum::extract::Query::<TokenQuery>::try_from_uri(&parts.uri).ok()?;
    q.0.token
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let token = bearer(parts).ok_or_else(|| ApiError::new(ErrorCode::InvalidToken, "missing token"))?;
        let caller = state.auth.verify(&token)?;
        tracing::Span::current().record("enduser.id", caller.user_id.as_str());
        if let Err(wait) = state.limiter.check(&caller.user_id) {
            return Err(ApiError::rate_limited(wait));
        }
        Ok(caller)
    }
}

/// Proof that a request carried the /inner key.
pub struct InnerKey;

impl FromRequestParts<AppState> for InnerKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let given = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, key)| key.trim().to_string())
            .ok_or_else(|| ApiError::new(ErrorCode::InvalidToken, "missing inner key"))?;
        if bool::from(given.as_bytes().ct_eq(state.inner_key.expose().as_bytes())) {
            Ok(InnerKey)
        } else {
            Err(ApiError::new(ErrorCode::InvalidToken, "wrong inner key"))
        }
    }
}
