//! The one error type of the HTTP API (SPEC 4), and how each variant is
//! answered. Internal causes are logged here, never sent to the client.

use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

pub use super::answers::ErrorBody;
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
    /// 401 without a credential where API keys are required.
    MissingCredentials,
    /// 403 `forbidden_origin`: a cross-origin request.
    Forbidden(String),
    /// 400 `invalid_request`: a malformed name or parameter.
    BadRequest(String),
    /// 500 `internal`: the database failed; details only in the log.
    Internal(String),
    /// 429 `rate_limited` from the proxy, with `Retry-After`: no slot of the
    /// provider's limits within `proxy_max_wait`.
    RateLimited(crate::ratelimit::LimitError),
    /// 502 `upstream_unreachable` from the proxy; the cause (without the
    /// URL) only in the log.
    UpstreamUnreachable(Box<dyn std::error::Error + Send + Sync>),
    /// 502 `revocation_failed`: the provider did not revoke a grant, which
    /// is therefore kept; the message carries the provider's error.
    RevocationFailed(String),
    /// A grant that did not get in (import, pasted authorization), with its
    /// own status and code; the message never carries a secret.
    GrantRefused {
        status: StatusCode,
        code: &'static str,
        message: String,
    },
}

impl From<crate::ratelimit::LimitError> for ApiError {
    fn from(e: crate::ratelimit::LimitError) -> Self {
        ApiError::RateLimited(e)
    }
}

/// SPEC 5: the exact answer to a refresh token presented as a bearer token.
pub const REFRESH_TOKEN_DESCRIPTION: &str = "a refresh token was presented as a bearer token; refresh tokens only obtain new access tokens: use GET /v1/token/{provider}";

impl ApiError {
    /// The answer to a refresh token presented as a bearer token (SPEC 5);
    /// the engine has reported the misuse when it recognised the token.
    pub fn refresh_token_presented() -> ApiError {
        ApiError::InvalidToken {
            message: REFRESH_TOKEN_DESCRIPTION.to_string(),
            www_authenticate: format!(
                "Bearer error=\"invalid_token\", error_description=\"{REFRESH_TOKEN_DESCRIPTION}\""
            ),
        }
    }

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
            TokenError::RevocationFailed { .. } => ApiError::RevocationFailed(e.to_string()),
            TokenError::Busy { .. } => ApiError::RefreshFailed {
                message: e.to_string(),
                retry_after: Duration::from_secs(5),
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
        let mut connect_url = None;
        let mut extra: Option<(header::HeaderName, HeaderValue)> = None;
        let (status, code, message) = match self {
            ApiError::UnknownProvider(p) => (
                StatusCode::NOT_FOUND,
                "unknown_provider",
                format!("no provider named {p:?} is configured; see GET /v1/connections or the config file"),
            ),
            ApiError::UnknownConnection { provider, account } => (
                StatusCode::NOT_FOUND,
                "unknown_connection",
                format!("{provider}/{account} has never been authorized; run `tokenkeeper connect {provider} {account}`"),
            ),
            ApiError::AuthorizationRequired { message, connect_url: url } => {
                let m = format!("{message}; open {url}");
                connect_url = Some(url);
                (StatusCode::CONFLICT, "authorization_required", m)
            }
            ApiError::RefreshFailed { message, retry_after } => {
                extra = Some((header::RETRY_AFTER, HeaderValue::from(retry_after.as_secs().max(1))));
                (StatusCode::SERVICE_UNAVAILABLE, "refresh_failed", format!("{message}; try again later"))
            }
            ApiError::InvalidToken { message, www_authenticate } => {
                extra = HeaderValue::from_str(&www_authenticate)
                    .ok()
                    .map(|v| (header::WWW_AUTHENTICATE, v));
                (StatusCode::UNAUTHORIZED, "invalid_token", message)
            }
            ApiError::MissingCredentials => {
                extra = Some((header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"tokenkeeper\"")));
                (
                    StatusCode::UNAUTHORIZED,
                    "invalid_request",
                    "this endpoint needs \"Authorization: Bearer <API key>\" with a key from server.api_keys_file".into(),
                )
            }
            ApiError::Forbidden(m) => (StatusCode::FORBIDDEN, "forbidden_origin", m),
            ApiError::BadRequest(m) => (StatusCode::BAD_REQUEST, "invalid_request", m),
            ApiError::RateLimited(e) => {
                extra = Some((header::RETRY_AFTER, HeaderValue::from(e.retry_after().as_secs().max(1))));
                (StatusCode::TOO_MANY_REQUESTS, "rate_limited", e.to_string())
            }
            ApiError::UpstreamUnreachable(e) => {
                tracing::warn!(error = %e, "proxied request failed upstream");
                (
                    StatusCode::BAD_GATEWAY,
                    "upstream_unreachable",
                    "the provider's API could not be reached; try again later".into(),
                )
            }
            ApiError::RevocationFailed(m) => (StatusCode::BAD_GATEWAY, "revocation_failed", m),
            ApiError::GrantRefused { status, code, message } => (status, code, message),
            ApiError::Internal(cause) => {
                tracing::error!(error = %cause, "request failed on an internal error");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "tokenkeeper hit an internal error; see its log".to_string(),
                )
            }
        };
        let body = ErrorBody {
            error: code.to_string(),
            message,
            connect_url,
        };
        let mut r = (status, Json(body)).into_response();
        r.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Some((k, v)) = extra {
            r.headers_mut().insert(k, v);
        }
        r
    }
}
