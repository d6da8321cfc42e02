//! `/v1/*`, `/healthz`, `/readyz`: thin handlers over the refresh engine.

use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::Utc;
use secrecy::ExposeSecret;

pub use super::answers::{
    ConnectionJson, ConnectionsBody, EventJson, EventsBody, InspectBody, TokenBody,
};
use super::error::{ApiError, ErrorBody};
use super::AppState;
use crate::config::{valid_account, valid_name};
use crate::refresh::token_json::{TokenFields, TokenJson};
use crate::refresh::{ConnectionReport, IssuedToken, Revocation, TokenIdentity};

/// Default account when a path omits it.
pub const DEFAULT_ACCOUNT: &str = "default";

/// Every answer of the token endpoints (SPEC 4), for the OpenAPI document;
/// handlers build them through `answer_response` and `ApiError`.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
pub enum TokenAnswers {
    #[response(status = 200, description = "a fresh access token")]
    Token(#[to_schema] TokenBody),
    #[response(status = 400, description = "malformed account name")]
    BadRequest(#[to_schema] ErrorBody),
    #[response(
        status = 401,
        description = "a bearer credential was presented and is wrong (SPEC 5)"
    )]
    InvalidToken(#[to_schema] ErrorBody),
    #[response(status = 403, description = "cross-origin request")]
    Forbidden(#[to_schema] ErrorBody),
    #[response(status = 404, description = "unknown_provider or unknown_connection")]
    NotFound(#[to_schema] ErrorBody),
    #[response(
        status = 409,
        description = "authorization_required: the grant is gone; see connect_url"
    )]
    AuthorizationRequired(#[to_schema] ErrorBody),
    #[response(
        status = 503,
        description = "refresh_failed: no valid token left and the provider could not be reached"
    )]
    RefreshFailed(#[to_schema] ErrorBody),
}

fn token_response(t: &IssuedToken) -> Response {
    let answer = TokenJson::render(&TokenFields {
        provider: &t.provider,
        account: &t.account,
        access_token: t.access_token.expose_secret(),
        token_type: &t.token_type,
        expires_at: t.expires_at,
        extra: &t.extra.extra,
    });
    answer_response(&answer, Utc::now())
}

/// The answer carrying an access token: [`TokenBody`] as JSON, copied from
/// its rendering (see `refresh::token_json`) with `expires_in` counted at
/// `now`.
fn answer_response(answer: &TokenJson, now: chrono::DateTime<Utc>) -> Response {
    let mut r = Response::new(axum::body::Body::from(answer.body_at(now)));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// Names as SPEC 3 allows them: an unknown provider or a 400 otherwise.
pub(super) fn check_names(provider: &str, account: &str) -> Result<(), ApiError> {
    if !valid_name(provider) {
        return Err(ApiError::UnknownProvider(provider.to_string()));
    }
    if !valid_account(account) {
        return Err(ApiError::BadRequest(format!(
            "{account:?} is not a valid account name (lowercase letters, digits, '_' and '-'; not \"refresh\")"
        )));
    }
    Ok(())
}

/// The fast lane of `GET /v1/token/{provider}[/{account}]`, taken by the
/// guard service before routing: a fresh token is answered from its
/// snapshot with the body as the only allocation, skipping the router's
/// parameter map and the handler's boxed future. `None` for
/// anything else, which the router then handles: other requests, names
/// that need percent-decoding or are invalid, tokens that need a refresh.
pub fn token_fast_lane(state: &AppState, req: &axum::extract::Request) -> Option<Response> {
    if req.method() != axum::http::Method::GET {
        return None;
    }
    let rest = req.uri().path().strip_prefix("/v1/token/")?;
    let (provider, account) = match rest.split_once('/') {
        None => (rest, DEFAULT_ACCOUNT),
        Some((p, a)) => (p, a),
    };
    // Valid names contain neither '%' nor '/': what passes needs no decoding.
    if check_names(provider, account).is_err() {
        return None;
    }
    let started = std::time::Instant::now();
    let now = Utc::now();
    let answer = state
        .engine
        .with_fresh_token(provider, account, now, |t| answer_response(t.answer, t.at))?;
    TOKEN_LATENCY.record(started.elapsed().as_secs_f64());
    Some(answer)
}

async fn get_token(state: &AppState, provider: &str, account: &str) -> Result<Response, ApiError> {
    let started = std::time::Instant::now();
    let result = get_token_timed(state, provider, account).await;
    TOKEN_LATENCY.record(started.elapsed().as_secs_f64());
    result
}

/// Resolved once: the recorder is installed before the router exists.
static TOKEN_LATENCY: std::sync::LazyLock<metrics::Histogram> =
    std::sync::LazyLock::new(|| metrics::histogram!(crate::metrics::TOKEN_REQUEST_DURATION));

async fn get_token_timed(
    state: &AppState,
    provider: &str,
    account: &str,
) -> Result<Response, ApiError> {
    // A fresh token was answered by `token_fast_lane` before routing; this
    // is the full path: waiting for or running a refresh.
    check_names(provider, account)?;
    let (answer, at) = state
        .engine
        .token_answer(provider, account)
        .await
        .map_err(|e| ApiError::from_token_error(e, &state.public_url))?;
    Ok(answer_response(&answer, at))
}

async fn refresh_token(
    state: &AppState,
    provider: &str,
    account: &str,
) -> Result<Response, ApiError> {
    check_names(provider, account)?;
    let t = state
        .engine
        .force_refresh(provider, account)
        .await
        .map_err(|e| ApiError::from_token_error(e, &state.public_url))?;
    Ok(token_response(&t))
}

#[utoipa::path(get, path = "/v1/token/{provider}", summary = "The current access token of the default account", params(("provider" = String, Path, description = "provider name from the config", example = "demo")), responses(TokenAnswers))]
/// `GET /v1/token/{provider}`.
pub async fn token_default(
    State(state): State<AppState>,
    Path(provider): Path<String>,
) -> Result<Response, ApiError> {
    get_token(&state, &provider, DEFAULT_ACCOUNT).await
}

#[utoipa::path(get, path = "/v1/token/{provider}/{account}", summary = "The current access token of an account", params(("provider" = String, Path, description = "provider name from the config", example = "demo"), ("account" = String, Path, description = "account name", example = "default")), responses(TokenAnswers))]
/// `GET /v1/token/{provider}/{account}`.
pub async fn token(
    State(state): State<AppState>,
    Path((provider, account)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    get_token(&state, &provider, &account).await
}

#[utoipa::path(post, path = "/v1/token/{provider}/refresh", summary = "Force a refresh of the default account", params(("provider" = String, Path, description = "provider name from the config", example = "demo")), responses(TokenAnswers))]
/// `POST /v1/token/{provider}/refresh`.
pub async fn refresh_default(
    State(state): State<AppState>,
    Path(provider): Path<String>,
) -> Result<Response, ApiError> {
    refresh_token(&state, &provider, DEFAULT_ACCOUNT).await
}

#[utoipa::path(post, path = "/v1/token/{provider}/{account}/refresh", summary = "Force a refresh of an account", params(("provider" = String, Path, description = "provider name from the config", example = "demo"), ("account" = String, Path, description = "account name", example = "default")), responses(TokenAnswers))]
/// `POST /v1/token/{provider}/{account}/refresh`.
pub async fn refresh(
    State(state): State<AppState>,
    Path((provider, account)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    refresh_token(&state, &provider, &account).await
}

impl From<ConnectionReport> for ConnectionJson {
    fn from(c: ConnectionReport) -> Self {
        ConnectionJson {
            provider: c.provider,
            account: c.account,
            state: c.state.into(),
            expires_at: c.expires_at,
            refreshed_at: c.refreshed_at,
            next_refresh_at: c.next_refresh_at,
            refresh_token_issued_at: c.refresh_token_issued_at,
            refresh_token_expires_at: c.refresh_token_expires_at,
            last_error: c.last_error,
            quota: None,
        }
    }
}

#[utoipa::path(get, path = "/v1/connections", summary = "Every connection with its state", responses(
         (status = 200, description = "every connection", body = ConnectionsBody),
        (status = 401, description = "a bearer credential was presented and is wrong", body = crate::http::error::ErrorBody),
        (status = 403, description = "cross-origin request", body = crate::http::error::ErrorBody)
    ))]
/// `GET /v1/connections`.
pub async fn connections(State(state): State<AppState>) -> Response {
    let body = ConnectionsBody {
        connections: state
            .engine
            .report()
            .into_iter()
            .map(|c| {
                let quota = state.proxy.limits.quota(&c.provider, &c.account);
                ConnectionJson {
                    quota,
                    ..ConnectionJson::from(c)
                }
            })
            .collect(),
        tls_fingerprint: state.tls_fingerprint.as_deref().map(str::to_string),
    };
    let mut r = Json(body).into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// Query of `DELETE /v1/connections/{provider}/{account}`.
#[derive(serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeleteQuery {
    /// `true`: forget the grant here without revoking it at the provider
    /// (it stays valid there). Default `false`: revoke upstream first, and
    /// keep the grant if that fails.
    #[serde(default)]
    pub local: bool,
}

#[utoipa::path(delete, path = "/v1/connections/{provider}/{account}", summary = "Revoke and forget a grant", params(("provider" = String, Path, description = "provider name from the config", example = "demo"), ("account" = String, Path, description = "account name", example = "default"), DeleteQuery), responses(
        (status = 204, description = "revoked upstream where possible (waiting for a refresh in flight, so the newest token is revoked) and forgotten; with local=true only forgotten"),
        (status = 400, description = "malformed account name or query", body = crate::http::error::ErrorBody),
        (status = 401, description = "a bearer credential was presented and is wrong (SPEC 5)", body = crate::http::error::ErrorBody),
        (status = 403, description = "cross-origin request", body = crate::http::error::ErrorBody),
        (status = 404, description = "unknown_provider or unknown_connection", body = crate::http::error::ErrorBody),
        (status = 502, description = "revocation_failed: the provider did not revoke the grant; it is kept (retry, or use local=true to forget it here only)", body = crate::http::error::ErrorBody),
        (status = 503, description = "refresh_failed: another process held the connection's refresh lease too long; nothing changed, try again", body = crate::http::error::ErrorBody)
    ))]
/// `DELETE /v1/connections/{provider}/{account}[?local=true]`: revoke
/// upstream where possible and forget locally; with `local=true`, forget
/// locally only.
pub async fn delete_connection(
    State(state): State<AppState>,
    Path((provider, account)): Path<(String, String)>,
    query: Result<axum::extract::Query<DeleteQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<StatusCode, ApiError> {
    check_names(&provider, &account)?;
    let axum::extract::Query(query) = query.map_err(|_| {
        ApiError::BadRequest("the only query parameter is local=true or local=false".into())
    })?;
    let mode = if query.local {
        Revocation::LocalOnly
    } else {
        Revocation::Upstream
    };
    let forgotten = state
        .engine
        .forget(&provider, &account, mode)
        .await
        .map_err(|e| ApiError::from_token_error(e, &state.public_url))?;
    if forgotten {
        state.proxy.forget(&provider, &account);
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::UnknownConnection { provider, account })
    }
}

#[utoipa::path(get, path = "/v1/connections/{provider}/{account}/events", summary = "The history of a connection, newest first", params(("provider" = String, Path, description = "provider name", example = "demo"), ("account" = String, Path, description = "account name", example = "default"), ("limit" = Option<u32>, Query, minimum = 1, maximum = 1000, description = "events per page, 1 to 1000 (default 50)", example = 50), ("before" = Option<String>, Query, description = "only older events: an event id, or an RFC 3339 instant", example = "2026-01-02T03:04:05Z"), ("after" = Option<i64>, Query, description = "only events with a larger id than this one", example = 0)), responses(
        (status = 200, description = "a page of events, newest first", body = EventsBody),
        (status = 400, description = "malformed name or query", body = crate::http::error::ErrorBody),
        (status = 401, description = "a bearer credential was presented and is wrong (SPEC 5)", body = crate::http::error::ErrorBody),
        (status = 403, description = "cross-origin request", body = crate::http::error::ErrorBody),
        (status = 404, description = "unknown_connection: not held and without history", body = crate::http::error::ErrorBody),
        (status = 500, description = "internal: the database failed", body = crate::http::error::ErrorBody)
    ))]
/// `GET /v1/connections/{provider}/{account}/events`.
pub async fn events(
    State(state): State<AppState>,
    Path((provider, account)): Path<(String, String)>,
    query: Result<
        axum::extract::Query<crate::history::RawQuery>,
        axum::extract::rejection::QueryRejection,
    >,
) -> Result<Response, ApiError> {
    check_names(&provider, &account)?;
    let axum::extract::Query(raw) = query.map_err(|_| {
        ApiError::BadRequest("the query parameters are limit, before and after".into())
    })?;
    let q = raw
        .parse()
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let known = state.engine.knows(&provider, &account);
    let page = crate::history::page(state.engine.store(), known, (&provider, &account), &q)
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let Some(events) = page else {
        return Err(ApiError::UnknownConnection { provider, account });
    };
    let body = EventsBody {
        events: events.into_iter().map(EventJson::from).collect(),
    };
    let mut r = Json(body).into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(r)
}

#[utoipa::path(get, path = "/healthz", summary = "Liveness", responses(
        (status = 200, description = "the process runs", body = String, content_type = "text/plain")
    ))]
/// `GET /healthz`: the process runs.
pub async fn healthz() -> &'static str {
    "ok\n"
}

#[utoipa::path(get, path = "/readyz", summary = "Readiness", responses(
        (status = 200, description = "database answers, config loaded", body = String, content_type = "text/plain"),
        (status = 503, description = "not ready", body = String, content_type = "text/plain")
    ))]
/// `GET /readyz`: the database answers and takes a write (a full disk or a
/// read-only file must not look ready), and the config is loaded.
pub async fn readyz(State(state): State<AppState>) -> Response {
    match state.engine.store().write_probe().await {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(e) => {
            // An unreachable database is logged once per outage (the
            // store's feed), not at every probe.
            if !e.is_unavailable() && state.engine.store().feed().up() {
                tracing::warn!("readiness check failed: {e}");
            }
            (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}\n")).into_response()
        }
    }
}

/// `POST /v1/inspect`: the body is a token; the answer says what it is.
/// The token travels in the body, never as a credential, so asking about a
/// refresh token is not itself a misuse.
#[utoipa::path(post, path = "/v1/inspect", summary = "Say what a token is", request_body(content = String, content_type = "text/plain", description = "the token"), responses(
        (status = 200, description = "what the token is", body = InspectBody),
        (status = 401, description = "a bearer credential was presented and is wrong", body = crate::http::error::ErrorBody),
        (status = 403, description = "cross-origin request", body = crate::http::error::ErrorBody),
        (status = 413, description = "body over 64 KiB")
    ))]
pub async fn inspect(State(state): State<AppState>, body: String) -> Json<InspectBody> {
    let (kind, who, message) = match state.engine.inspect(body.trim()) {
        TokenIdentity::CurrentAccessToken { provider, account } => (
            "current_access_token",
            Some((provider.clone(), account.clone())),
            format!("the current access token of {provider}/{account}: send it as \"Authorization: Bearer\" to the provider's API"),
        ),
        TokenIdentity::OldAccessToken { provider, account } => (
            "old_access_token",
            Some((provider.clone(), account.clone())),
            format!("an earlier access token of {provider}/{account}; it may have expired: get a fresh one with GET /v1/token/{provider}/{account}"),
        ),
        TokenIdentity::RefreshToken { provider, account } => (
            "refresh_token",
            Some((provider.clone(), account.clone())),
            format!("a refresh token of {provider}/{account}: never send it as a bearer token; it only obtains access tokens, and tokenkeeper does that for you (GET /v1/token/{provider}/{account})"),
        ),
        TokenIdentity::Unknown => ("unknown", None, "not a token this daemon has issued or holds".to_string()),
    };
    let (provider, account) = who.unzip();
    Json(InspectBody {
        kind: kind.to_string(),
        provider,
        account,
        message,
    })
}

#[utoipa::path(get, path = "/metrics", summary = "Prometheus metrics", responses(
        (status = 200, description = "Prometheus text format", body = String, content_type = "text/plain")
    ))]
/// `GET /metrics`: Prometheus text format.
pub async fn metrics(State(state): State<AppState>) -> Response {
    match crate::metrics::render(&state.engine) {
        Some(text) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "metrics recorder unavailable\n",
        )
            .into_response(),
    }
}

#[cfg(test)]
mod json_tests {
    use super::*;
    use proptest::prelude::*;

    fn by_serde(t: &TokenFields<'_>, expires_in: i64) -> Vec<u8> {
        serde_json::to_vec(&TokenBody {
            access_token: t.access_token.into(),
            token_type: t.token_type.into(),
            expires_at: t.expires_at,
            expires_in,
            provider: t.provider.into(),
            account: t.account.into(),
            extra: t.extra.clone(),
        })
        .unwrap()
    }

    proptest! {
        #[test]
        fn token_json_is_what_serde_writes(
            token in prop_oneof![
                "[A-Za-z0-9._~+/=-]{0,64}",
                any::<String>(),
                "[\"\\\\\u{0}-\u{1f}\u{7f}é😀a]{0,8}",
            ],
            name in prop_oneof!["[a-z0-9_-]{1,16}", any::<String>()],
            token_type in prop_oneof![Just("Bearer".to_string()), "[A-Za-z0-9_-]{1,8}"],
            // Stored instants are milliseconds; years -300 to 12000.
            millis in -71_700_000_000_000i64..316_500_000_000_000,
            expires_in in prop_oneof![0i64..100_000, any::<i64>()],
            extra_value in prop_oneof![Just(None), any::<String>().prop_map(Some)],
        ) {
            let mut extra = crate::store::Extras::new();
            if let Some(v) = extra_value {
                extra.insert("instance_url".into(), v.into());
            }
            let t = TokenFields {
                provider: &name,
                account: "default",
                access_token: &token,
                token_type: &token_type,
                expires_at: chrono::DateTime::from_timestamp_millis(millis).unwrap(),
                extra: &extra,
            };
            let fast = TokenJson::render(&t).body(expires_in);
            prop_assert_eq!(
                String::from_utf8(fast).unwrap(),
                String::from_utf8(by_serde(&t, expires_in)).unwrap()
            );
        }
    }
}
