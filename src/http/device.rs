//! The device authorization grant over HTTP (SPEC 10): the JSON routes
//! `connect --device` drives (start, watch by long polling, cancel) and
//! the dashboard's small page (`/connect/{provider}/device`). Thin: the
//! flows and their polling live in `crate::device`.
//!
//! Must not: put the device code anywhere (it never reaches this module),
//! or start a flow from a cross-site request (the `/connect/` site check
//! and `/v1/` guards run first).

use std::collections::HashMap;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Json;
use maud::html;

use super::answers::DeviceFlowBody;
use super::api::{check_names, DEFAULT_ACCOUNT};
use super::error::ApiError;
use super::{pages, AppState};
use crate::config::valid_account;
use crate::device::{FlowStatus, FlowView, StartError};
use crate::provider::device::DeviceStartError;

fn body(id: &str, v: FlowView) -> Response {
    let message = v.status.sentence(&v.provider, &v.account);
    let refresh_token = match v.status {
        FlowStatus::Authorized { refresh_token } => Some(refresh_token),
        _ => None,
    };
    let mut r = Json(DeviceFlowBody {
        flow_id: id.to_string(),
        state: v.status.as_str().to_string(),
        provider: v.provider,
        account: v.account,
        user_code: v.user_code,
        verification_uri: v.verification_uri.to_string(),
        verification_uri_complete: v.verification_uri_complete.map(|u| u.to_string()),
        expires_at: v.expires_at,
        interval_secs: v.interval.as_secs_f64(),
        message,
        refresh_token,
    })
    .into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn start_error(e: StartError) -> ApiError {
    let message = e.to_string();
    let refused = |status, code| ApiError::GrantRefused {
        status,
        code,
        message: message.clone(),
    };
    match e {
        StartError::UnknownProvider(p) => ApiError::UnknownProvider(p),
        StartError::TooMany => refused(StatusCode::TOO_MANY_REQUESTS, "too_many_flows"),
        StartError::NothingToAuthorize(_) => refused(
            StatusCode::BAD_REQUEST,
            super::grant_in::NOTHING_TO_AUTHORIZE,
        ),
        StartError::Provider(DeviceStartError::NoEndpoint(_)) => {
            refused(StatusCode::BAD_REQUEST, "device_flow_unavailable")
        }
        StartError::Provider(DeviceStartError::Unreachable(_)) => ApiError::RefreshFailed {
            message,
            retry_after: Duration::from_secs(5),
        },
        StartError::Provider(_) => refused(StatusCode::BAD_GATEWAY, "authorization_failed"),
    }
}

fn unknown_flow() -> ApiError {
    ApiError::GrantRefused {
        status: StatusCode::NOT_FOUND,
        code: "unknown_flow",
        message: "no such device authorization: it ended more than 10 minutes ago, or the daemon restarted; start it again".into(),
    }
}

#[utoipa::path(post, path = "/v1/connections/{provider}/{account}/device", summary = "Start a device authorization (connect --device, RFC 8628)",
    params(("provider" = String, Path, description = "provider name from the config"), ("account" = String, Path, description = "account name")),
    responses(
        (status = 200, description = "codes obtained; the daemon polls the token endpoint until the person approves, denies, or the code expires. The device code never leaves the daemon", body = DeviceFlowBody),
        (status = 400, description = "device_flow_unavailable: the provider has no device authorization endpoint (set device_authorization_url); invalid_request: malformed account name", body = crate::http::error::ErrorBody),
        (status = 401, description = "a bearer credential was presented and is wrong, or API keys are set and none was presented", body = crate::http::error::ErrorBody),
        (status = 403, description = "cross-origin request", body = crate::http::error::ErrorBody),
        (status = 404, description = "unknown_provider", body = crate::http::error::ErrorBody),
        (status = 429, description = "too_many_flows: 32 device authorizations are already waiting", body = crate::http::error::ErrorBody),
        (status = 502, description = "authorization_failed: the device endpoint refused or answered something that is not a device authorization", body = crate::http::error::ErrorBody),
        (status = 503, description = "refresh_failed: the device endpoint could not be reached; try again", body = crate::http::error::ErrorBody)
    ))]
/// `POST /v1/connections/{provider}/{account}/device`.
pub async fn start(
    State(state): State<AppState>,
    Path((provider, account)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    check_names(&provider, &account)?;
    let started = state
        .devices
        .start(&state.engine, &provider, &account, true)
        .await
        .map_err(start_error)?;
    Ok(body(&started.id, started.view))
}

#[utoipa::path(get, path = "/v1/connections/{provider}/{account}/device/{flow_id}", summary = "Watch a device authorization (long poll)",
    params(
        ("provider" = String, Path, description = "provider name from the config"),
        ("account" = String, Path, description = "account name"),
        ("flow_id" = String, Path, description = "from the start answer"),
        ("wait" = Option<u64>, Query, description = "seconds to wait for the flow to end before answering (at most 30; default 0)")
    ),
    responses(
        (status = 200, description = "the flow; state pending until it ends", body = DeviceFlowBody),
        (status = 400, description = "invalid_request: wait is not a whole number of seconds, or a malformed account name", body = crate::http::error::ErrorBody),
        (status = 401, description = "a bearer credential was presented and is wrong, or API keys are set and none was presented", body = crate::http::error::ErrorBody),
        (status = 403, description = "cross-origin request", body = crate::http::error::ErrorBody),
        (status = 404, description = "unknown_flow", body = crate::http::error::ErrorBody)
    ))]
/// `GET /v1/connections/{provider}/{account}/device/{flow_id}?wait=SECS`.
pub async fn watch(
    State(state): State<AppState>,
    Path((provider, account, id)): Path<(String, String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    check_names(&provider, &account)?;
    let wait = match q.get("wait") {
        None => 0,
        Some(w) => w
            .parse::<u64>()
            .map_err(|_| ApiError::BadRequest("wait must be a whole number of seconds".into()))?,
    };
    let view = state
        .devices
        .wait(&id, &provider, &account, Duration::from_secs(wait))
        .await
        .ok_or_else(unknown_flow)?;
    Ok(body(&id, view))
}

#[utoipa::path(delete, path = "/v1/connections/{provider}/{account}/device/{flow_id}", summary = "Cancel a device authorization",
    params(
        ("provider" = String, Path, description = "provider name from the config"),
        ("account" = String, Path, description = "account name"),
        ("flow_id" = String, Path, description = "from the start answer")
    ),
    responses(
        (status = 200, description = "cancelled (state cancelled), or how it had already ended", body = DeviceFlowBody),
        (status = 400, description = "invalid_request: malformed account name", body = crate::http::error::ErrorBody),
        (status = 401, description = "a bearer credential was presented and is wrong, or API keys are set and none was presented", body = crate::http::error::ErrorBody),
        (status = 403, description = "cross-origin request", body = crate::http::error::ErrorBody),
        (status = 404, description = "unknown_flow", body = crate::http::error::ErrorBody)
    ))]
/// `DELETE /v1/connections/{provider}/{account}/device/{flow_id}`.
pub async fn cancel(
    State(state): State<AppState>,
    Path((provider, account, id)): Path<(String, String, String)>,
) -> Result<Response, ApiError> {
    check_names(&provider, &account)?;
    let view = state
        .devices
        .cancel(&id, &provider, &account)
        .ok_or_else(unknown_flow)?;
    Ok(body(&id, view))
}

#[utoipa::path(get, path = "/connect/{provider}/device", summary = "Start a device authorization from the dashboard",
    params(
        ("provider" = String, Path, description = "provider name from the config"),
        ("account" = Option<String>, Query, description = "account name (default: default)")
    ),
    responses(
        (status = 303, description = "to the page showing the code (/connect/{provider}/device/{flow_id}?account=NAME)"),
        (status = 400, description = "invalid account name, or no device endpoint (HTML page)", body = String, content_type = "text/html"),
        (status = 401, description = "API keys are set and neither a key nor a browser session (see /login) was presented", body = crate::http::error::ErrorBody),
        (status = 403, description = "cross-site request", body = crate::http::error::ErrorBody),
        (status = 404, description = "unknown provider (HTML page)", body = String, content_type = "text/html"),
        (status = 429, description = "32 device authorizations are already waiting (HTML page)", body = String, content_type = "text/html"),
        (status = 502, description = "the device endpoint failed (HTML page)", body = String, content_type = "text/html")
    ))]
/// `GET /connect/{provider}/device?account=NAME`: starts a flow and sends
/// the browser to its page, so reloading that page starts nothing new.
pub async fn page_start(
    State(state): State<AppState>,
    Path(provider): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let account = q
        .get("account")
        .map(String::as_str)
        .unwrap_or(DEFAULT_ACCOUNT);
    if !valid_account(account) {
        return pages::problem(
            StatusCode::BAD_REQUEST,
            "Invalid account name",
            "Account names are lowercase letters, digits, '_' and '-', start with a letter or digit, and are at most 63 characters (\"refresh\" is reserved).",
            Some("/"),
        );
    }
    match state
        .devices
        .start(&state.engine, &provider, account, false)
        .await
    {
        Ok(s) => {
            let mut to = url::form_urlencoded::Serializer::new(String::new());
            to.append_pair("account", account);
            Redirect::to(&format!(
                "/connect/{provider}/device/{}?{}",
                s.id,
                to.finish()
            ))
            .into_response()
        }
        Err(e) => {
            let status = match &e {
                StartError::UnknownProvider(_) => StatusCode::NOT_FOUND,
                StartError::Provider(DeviceStartError::NoEndpoint(_))
                | StartError::NothingToAuthorize(_) => StatusCode::BAD_REQUEST,
                StartError::TooMany => StatusCode::TOO_MANY_REQUESTS,
                StartError::Provider(_) => StatusCode::BAD_GATEWAY,
            };
            pages::problem(
                status,
                "Device authorization failed",
                &e.to_string(),
                Some("/"),
            )
        }
    }
}

#[utoipa::path(get, path = "/connect/{provider}/device/{flow_id}", summary = "The page of a device authorization started from the dashboard",
    params(
        ("provider" = String, Path, description = "provider name from the config"),
        ("flow_id" = String, Path, description = "the flow"),
        ("account" = Option<String>, Query, description = "account name (default: default)")
    ),
    responses(
        (status = 200, description = "the code and where to enter it; reloads itself while pending (HTML page)", body = String, content_type = "text/html"),
        (status = 401, description = "API keys are set and neither a key nor a browser session (see /login) was presented", body = crate::http::error::ErrorBody),
        (status = 403, description = "cross-site request", body = crate::http::error::ErrorBody),
        (status = 404, description = "no such flow (HTML page)", body = String, content_type = "text/html")
    ))]
/// `GET /connect/{provider}/device/{flow_id}?account=NAME`.
pub async fn page(
    State(state): State<AppState>,
    Path((provider, id)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let account = q
        .get("account")
        .map(String::as_str)
        .unwrap_or(DEFAULT_ACCOUNT);
    let Some(v) = state.devices.get(&id, &provider, account) else {
        return pages::problem(
            StatusCode::NOT_FOUND,
            "No such device authorization",
            "It ended more than 10 minutes ago, or the daemon restarted. Start it again from the dashboard.",
            Some("/"),
        );
    };
    let pending = v.status == FlowStatus::Pending;
    let sentence = v.status.sentence(&v.provider, &v.account);
    let mut r = pages::page(
        StatusCode::OK,
        "Connect with a device code",
        html! {
            @if pending {
                meta http-equiv="refresh" content="3";
            }
            div class="card" {
                p { strong { (v.provider) "/" (v.account) } }
                @if pending {
                    p { "On any device, open " a href=(v.verification_uri.as_str()) rel="noreferrer" { (v.verification_uri.as_str()) } " and enter this code:" }
                    p { code style="font-size:1.6rem" { (v.user_code) } }
                    @if let Some(c) = &v.verification_uri_complete {
                        p class="muted" { "Or open " a href=(c.as_str()) rel="noreferrer" { (c.as_str()) } ", which has the code in it." }
                    }
                    p class="muted" { "Waiting for approval; the code expires " (pages::relative(v.expires_at, chrono::Utc::now())) ". This page updates itself." }
                } @else if let FlowStatus::Authorized { .. } = v.status {
                    p { span class="badge active" { "active" } " " (sentence.unwrap_or_default()) }
                } @else {
                    p class="error" { (sentence.unwrap_or_default()) }
                    p { a class="button" href={ "/connect/" (v.provider) "/device?account=" (v.account) } { "Try again" } }
                }
            }
        },
    );
    pages::html_headers(r.headers_mut());
    r
}
