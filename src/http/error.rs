//! The one error type of the HTTP API (SPEC 4), and how each variant is
//! answered. Internal causes are logged here, never sent to the client.

use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::refresh::TokenError;

/// Errors answered on `/v1/*`.
#[derive(Debug)]
pub enum ApiError {
    /// 404 `unknown_provider`.
    UnknownProvider(String),
    /// 404 `unknown_connection`.
    UnknownConnection { provider: String, account: String },
    /// 409 `authorization_required`, with the URL that fixes it.
    AuthorizationRequired {
        message: String,
        connect_url: String,
    },
    /// 503 `refresh_failed`, with `Retry-After`.
    RefreshFailed {
        message: String,
        retry_after: Duration,
    },
    /// 401 `invalid_token`.
    InvalidToken {
        message: String,
        www_authenticate: String,
    },
    /// 400 `invalid_request`: a malformed name or parameter.
    BadRequest(String),
    /// 500 `internal`: the database failed; details only in the log.
    Internal(String),
}

impl ApiError {
    /// Maps an engine error, given the daemon's public URL for `connect_url`.
    pub fn from_token_error(e: TokenError, public_url: &url::Url) -> ApiError {
        match e {
            TokenError::UnknownProvider(p) => ApiError::UnknownProvider(p),
            TokenError::UnknownConnection { provider, account } => {
                ApiError::UnknownConnection { provider, account }
            }
            TokenError::AuthorizationRequired {
                ref provider,
                ref account,
                ..
            } => ApiError::AuthorizationRequired {
                connect_url: connect_url(public_url, provider, account),
                message: e.to_string(),
            },
            TokenError::RefreshFailed { retry_after, .. } => ApiError::RefreshFailed {
                message: e.to_string(),
                retry_after,
            },
            TokenError::Store(s) => ApiError::Internal(s.to_string()),
        }
    }
}

/// `{public_url}/connect/{provider}?account={account}`.
pub fn connect_url(public_url: &url::Url, provider: &str, account: &str) -> String {
    let base = public_url.as_str().trim_end_matches('/');
    format!("{base}/connect/{provider}?account={account}")
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, message, extra) = match self {
            ApiError::UnknownProvider(p) => (
                StatusCode::NOT_FOUND,
                "unknown_provider",
                format!("no provider named {p:?} is configured; see GET /v1/connections or the config file"),
                None,
            ),
            ApiError::UnknownConnection { provider, account } => (
                StatusCode::NOT_FOUND,
                "unknown_connection",
                format!("{provider}/{account} has never been authorized; run `tokenkeeper connect {provider} {account}`"),
                None,
            ),
            ApiError::AuthorizationRequired { message, connect_url } => {
                (StatusCode::CONFLICT, "authorization_required", format!("{message}; open {connect_url}"), Some(connect_url))
            }
            ApiError::RefreshFailed { message, retry_after } => {
                let mut r = (
                    StatusCode::SERVICE_UNAVAILABLE,
                    Json(json!({"error": "refresh_failed", "message": format!("{message}; try again later")})),
                )
                    .into_response();
                r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(retry_after.as_secs().max(1)));
                r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
                return r;
            }
            ApiError::InvalidToken { message, www_authenticate } => {
                let mut r = (
                    StatusCode::UNAUTHORIZED,
                    Json(json!({"error": "invalid_token", "message": message})),
                )
                    .into_response();
                if let Ok(v) = HeaderValue::from_str(&www_authenticate) {
                    r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
                }
                return r;
            }
            ApiError::BadRequest(m) => (StatusCode::BAD_REQUEST, "invalid_request", m, None),
            ApiError::Internal(cause) => {
                tracing::error!(error = %cause, "request failed on an internal error");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "tokenkeeper hit an internal error; see its log".to_string(),
                    None,
                )
            }
        };
        let body = match extra {
            Some(url) => json!({"error": code, "message": message, "connect_url": url}),
            None => json!({"error": code, "message": message}),
        };
        let mut r = (status, Json(body)).into_response();
        r.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        r
    }
}
