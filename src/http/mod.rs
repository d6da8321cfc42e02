//! The local HTTP interface (SPEC 4): routing, shared state and the guards
//! every request passes (sizes, Host, site checks, API keys or a browser
//! session; see [`Guards`]). Handlers live in `api` (JSON), `callback`
//! (browser authorization), `login` (one-time login links), `dashboard`
//! (the dashboard page and its script), `pages` (the other HTML)
//! and `proxy` (the rate-limited API proxy); `server` serves connections;
//! `answers` holds the JSON bodies, which the CLI reads with the same types.

pub mod answers;
pub mod api;
pub mod auth;
pub mod backup;
pub mod callback;
pub mod dashboard;
pub mod device;
pub mod error;
pub mod grant_in;
pub mod guard;
pub mod login;
pub mod openapi;
pub mod pages;
pub mod proxy;
pub mod server;
pub mod tls;
pub mod upstream;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, delete, get, post};
use axum::Router;
use tower_layer::Layer;
use url::Url;

use crate::refresh::Engine;

/// Largest request body accepted outside the proxy.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Largest sum of header names and values: real clients send a few hundred
/// bytes; hyper alone would buffer hundreds of kilobytes.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

/// Longest path and query accepted.
pub const MAX_URI_BYTES: usize = 8 * 1024;

/// What handlers share: one `Arc`, because extractors and layers clone it
/// on every request, and one reference count is cheaper than one per field
/// (their cache lines would bounce between worker threads).
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl AppState {
    pub fn new(shared: Shared) -> AppState {
        AppState(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// The fields of [`AppState`].
pub struct Shared {
    pub engine: Engine,
    /// What the browser reaches: `redirect_uri = public_url + "/callback"`.
    pub public_url: Url,
    /// Lower-case host names accepted in `Host` (DNS-rebinding defence).
    pub allowed_hosts: Arc<Vec<String>>,
    /// Keys required on `/v1/*` when `server.api_keys_file` is set.
    pub api_keys: Option<Arc<auth::ApiKeys>>,
    /// SHA-256 of the served certificate, when serving HTTPS.
    pub tls_fingerprint: Option<Arc<str>>,
    /// `/proxy/*`: HTTP client, rate limits, `proxy_max_wait`.
    pub proxy: Arc<proxy::Proxy>,
    /// Device authorizations in flight (`connect --device`).
    pub devices: crate::device::DeviceFlows,
}

impl AppState {
    /// `{public_url}/callback`.
    pub fn redirect_uri(&self) -> Url {
        let base = self.public_url.as_str().trim_end_matches('/');
        Url::parse(&format!("{base}/callback")).unwrap_or_else(|_| self.public_url.clone())
    }
}

/// What the daemon serves: the router behind one guard service.
pub type App = guard::Checked<Router, Guards>;

/// The whole application; `extra` is merged in (the dev-mode simulator).
///
/// The guards wrap the router once, as one service, rather than as
/// `Router::layer`s: those wrap every route in its own boxed service, each
/// cloned on every request, which cost about 4% of the token endpoint's CPU
/// (`BENCH_PROFILE=1 bench/run.sh`).
pub fn router(state: AppState, extra: Option<Router>) -> App {
    let mut app = Router::new()
        .route("/", get(dashboard))
        .route(dashboard::SCRIPT_PATH, get(dashboard::script))
        .route("/connect/{provider}", get(callback::connect))
        .route("/connect/{provider}/device", get(device::page_start))
        .route("/connect/{provider}/device/{flow_id}", get(device::page))
        .route("/callback", get(callback::callback))
        .route("/login", get(login::login))
        .route(
            "/v1/login-links",
            post(login::create_link).layer(DefaultBodyLimit::max(MAX_BODY_BYTES)),
        )
        .route("/v1/token/{provider}", get(api::token_default))
        .route("/v1/token/{provider}/refresh", post(api::refresh_default))
        .route("/v1/token/{provider}/{account}", get(api::token))
        .route("/v1/token/{provider}/{account}/refresh", post(api::refresh))
        .route("/v1/connections", get(api::connections))
        .route(
            "/v1/connections/{provider}/{account}",
            delete(api::delete_connection),
        )
        .route(
            "/v1/connections/{provider}/{account}/import",
            post(grant_in::import).layer(DefaultBodyLimit::max(MAX_BODY_BYTES)),
        )
        .route(
            "/v1/connections/{provider}/{account}/paste/start",
            post(grant_in::paste_start),
        )
        .route(
            "/v1/connections/{provider}/{account}/paste/finish",
            post(grant_in::paste_finish).layer(DefaultBodyLimit::max(MAX_BODY_BYTES)),
        )
        .route(
            "/v1/connections/{provider}/{account}/device",
            post(device::start),
        )
        .route(
            "/v1/connections/{provider}/{account}/device/{flow_id}",
            get(device::watch).delete(device::cancel),
        )
        .route(
            "/v1/connections/{provider}/{account}/events",
            get(api::events),
        )
        .route(
            "/v1/inspect",
            post(api::inspect).layer(DefaultBodyLimit::max(MAX_BODY_BYTES)),
        )
        // No body limit on the proxy: bodies stream, and only small ones
        // are buffered.
        .route("/proxy/{target}", any(proxy::forward))
        .route("/proxy/{target}/{*path}", any(proxy::forward))
        .route("/healthz", get(api::healthz))
        .route("/readyz", get(api::readyz))
        .route("/metrics", get(api::metrics))
        .route("/openapi.json", get(openapi::openapi_json))
        .fallback(not_found)
        .with_state(state.clone());
    if let Some(extra) = extra {
        app = app.merge(extra);
    }
    guard::CheckLayer::new(Guards(state)).layer(app)
}

/// Every check made from the request head before routing: sizes and `Host`
/// on all paths (421 for a foreign host), then on `/v1/*` and `/proxy/*`
/// the site and bearer checks of [`auth::check_v1`] (a request that passes
/// them all may be answered by [`api::token_fast_lane`]); on `/connect/*`
/// the site check; and with API keys set, on every other path but the
/// open ones, a key or a browser session ([`auth::check_page`]).
#[derive(Clone)]
pub struct Guards(AppState);

impl guard::RequestCheck for Guards {
    fn check(&self, req: &Request) -> Option<Response> {
        let state = &self.0;
        if let Some(refused) = check_host(&state.allowed_hosts, req) {
            return Some(refused);
        }
        let path = req.uri().path();
        if path.starts_with("/v1/") || path.starts_with("/proxy/") {
            return auth::check_v1(state, req).or_else(|| api::token_fast_lane(state, req));
        }
        if path.starts_with("/connect/") {
            if let Some(refused) = auth::check_site(state, req) {
                return Some(refused);
            }
        }
        auth::check_page(state, req)
    }
}

/// `GET /`: the dashboard (see [`mod@dashboard`]).
#[utoipa::path(get, path = "/", summary = "Dashboard: every provider and connection, with Connect buttons", responses(
    (status = 200, description = "HTML page", body = String, content_type = "text/html")
))]
pub async fn dashboard(State(state): State<AppState>) -> Response {
    let settings = state.engine.settings();
    let mut providers: Vec<String> = settings
        .providers
        .values()
        .filter(|p| p.config.authorization_refusal().is_none())
        .map(|p| p.config.name.clone())
        .collect();
    providers.sort();
    let device: Vec<String> = providers
        .iter()
        .filter(|p| {
            settings
                .providers
                .get(*p)
                .is_some_and(|p| p.config.device_authorization_url.is_some())
        })
        .cloned()
        .collect();
    let panels = dashboard::gather(&state).await;
    dashboard::page(&providers, &device, &panels, chrono::Utc::now())
}

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        axum::Json(serde_json::json!({"error": "not_found", "message": "no such endpoint; see GET /openapi.json"})),
    )
        .into_response()
}

/// The host part of a `Host` value, without allocating: trimmed, `[...]`
/// kept whole, a numeric port dropped.
fn host_slice(value: &str) -> &str {
    let v = value.trim();
    if v.starts_with('[') {
        return match v.find(']') {
            Some(i) => &v[..=i],
            None => v,
        };
    }
    match v.rsplit_once(':') {
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
        _ => v,
    }
}

/// `allowed == host.to_ascii_lowercase()`, without allocating.
fn same_host(allowed: &str, host: &str) -> bool {
    allowed.len() == host.len()
        && allowed
            .bytes()
            .zip(host.bytes())
            .all(|(a, h)| a == h.to_ascii_lowercase())
}

/// Whether a `Host` value (header, or the URI's authority) names an allowed
/// host, IPv6 literals with or without brackets; no allocation on the hot
/// path.
fn host_allowed(allowed_hosts: &[String], value: &str) -> bool {
    let h = host_slice(value);
    allowed_hosts
        .iter()
        .any(|a| same_host(a, h) || same_host(a.trim_start_matches('[').trim_end_matches(']'), h))
}

/// Refuses oversized requests (431, 414), then requests whose `Host` is not
/// ours with 421: a web page that rebinds its DNS name to 127.0.0.1 still
/// sends its own name.
fn check_host(allowed_hosts: &[String], req: &Request) -> Option<Response> {
    let header_bytes: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len())
        .sum();
    if header_bytes > MAX_HEADER_BYTES {
        return Some(
            (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "request headers too large\n",
            )
                .into_response(),
        );
    }
    if req.uri().path_and_query().map_or(0, |p| p.as_str().len()) > MAX_URI_BYTES {
        return Some((StatusCode::URI_TOO_LONG, "request URI too long\n").into_response());
    }
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| req.uri().host());
    if host.is_some_and(|h| host_allowed(allowed_hosts, h)) {
        return None;
    }
    tracing::warn!(
        host = host.unwrap_or("(none)"),
        "request with a foreign Host header refused"
    );
    Some(
        (
            StatusCode::MISDIRECTED_REQUEST,
            axum::Json(serde_json::json!({
                "error": "misdirected_request",
                "message": "this Host is not served here; use the address in server.public_url or add the name to server.allowed_hosts"
            })),
        )
            .into_response(),
    )
}

#[cfg(test)]
mod tests {
    use super::host_allowed;

    #[test]
    fn host_check() {
        let allowed: Vec<String> = ["localhost", "127.0.0.1", "[::1]", "tk.example"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        for (value, expected) in [
            ("127.0.0.1:8787", true),
            ("127.0.0.1", true),
            (" LocalHost ", true),
            ("localhost:", true),
            ("[::1]:8787", true),
            ("[::1]", true),
            ("[::1]x", true),
            ("TK.example:443", true),
            ("[::1", false),
            ("::1", false),
            ("tk.example:44a", false),
            ("evil.example", false),
            ("evil.example:8787", false),
            ("localhost.evil", false),
            ("127.0.0.1.evil:8787", false),
            ("", false),
        ] {
            assert_eq!(host_allowed(&allowed, value), expected, "{value:?}");
        }
    }
}
