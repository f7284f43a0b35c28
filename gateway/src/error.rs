//! The one place where failures become HTTP answers: status + `{"code":N,"error":"..."}`.
//!
//! Internal details never reach the client: 5xx were logged where they happened (see
//! `ServiceError::internal` and the bus error mapping); 4xx are not logged as errors.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use quickim_shared::error::{ErrorCode, ServiceError};
use quickim_shared::protocol::api::ErrorBody;
use serde::Serialize;

/// A failed API call.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// Kind of failure.
    pub code: ErrorCode,
    /// Human text.
    pub message: String,
    /// For 429: seconds until the client may retry.
    pub retry_after_s: Option<u64>,
}

impl ApiError {
    /// A failure of `code` with `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError { code, message: message.into(), retry_after_s: None }
    }

    /// 429 with a Retry-After.
    pub fn rate_limited(retry_after_s: u64) -> ApiError {
        ApiError {
            code: ErrorCode::RateLimited,
            message: "too many requests".into(),
            retry_after_s: Some(retry_after_s.max(1)),
        }
    }

    /// 429 `too_many_connections_from_ip` with `Retry-After`.
    pub fn ip_rate_limited(retry_after_s: u64) -> ApiError {
        ApiError {
            code: ErrorCode::TooManyConnectionsFromIp,
            message: "too many new streams from this address".into(),
            retry_after_s: Some(retry_after_s.max(1)),
        }
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> ApiError {
        ApiError::new(e.code, e.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = ErrorBody { code: self.code.number(), error: self.message };
        let mut response = (status, Json(body)).into_response();
        if let Some(s) = self.retry_after_s
            && let Ok(v) = HeaderValue::from_str(&s.to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, v);
        }
        response
    }
}

/// A successful answer: `{"code":0,"data":...}`.
pub struct Envelope<T>(pub T);

#[derive(Serialize)]
struct Success<'a, T> {
    code: u32,
    data: &'a T,
}

impl<T: Serialize> IntoResponse for Envelope<T> {
    fn into_response(self) -> Response {
        Json(Success { code: 0, data: &self.0 }).into_response()
    }
}

/// What a route handler answers.
pub type ApiResult<T> = Result<Envelope<T>, ApiError>;

/// Answer for routes that do not exist.
pub async fn not_found() -> ApiError {
    ApiError::new(ErrorCode::NotFound, "no such route")
}

/// Answer for a known route with the wrong method.
pub async fn method_not_allowed() -> ApiError {
    ApiError::new(ErrorCode::MethodNotAllowed, "method not allowed on this route")
}
