//! The local HTTP interface (SPEC 4): routing, shared state and the guards
//! every request passes (Host check, body limit). Handlers live in `api`
//! (JSON), `callback` (browser authorization), `pages` (HTML) and `proxy`
//! (the rate-limited API proxy).

pub mod api;
pub mod auth;
pub mod callback;
pub mod error;
pub mod guard;
pub mod openapi;
pub mod pages;
pub mod proxy;
pub mod tls;

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
        .route("/connect/{provider}", get(callback::connect))
        .route("/callback", get(callback::callback))
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
    guard::CheckLayer::new(Guards {
        allowed_hosts: state.allowed_hosts.clone(),
        v1: auth::V1Guard(state),
    })
    .layer(app)
}

/// Every check made from the request head before routing: sizes and `Host`
/// on all paths (421 for a foreign host), then on `/v1/*` and `/proxy/*`
/// the Origin and bearer checks of [`auth::V1Guard`]; a request that passes
/// them all may be answered by [`api::token_fast_lane`].
#[derive(Clone)]
pub struct Guards {
    allowed_hosts: Arc<Vec<String>>,
    v1: auth::V1Guard,
}

impl guard::RequestCheck for Guards {
    fn check(&self, req: &Request) -> Option<Response> {
        if let Some(refused) = check_host(&self.allowed_hosts, req) {
            return Some(refused);
        }
        let path = req.uri().path();
        if path.starts_with("/v1/") || path.starts_with("/proxy/") {
            return guard::RequestCheck::check(&self.v1, req)
                .or_else(|| api::token_fast_lane(&self.v1.0, req));
        }
        None
    }
}

/// `GET /`: the dashboard.
#[utoipa::path(get, path = "/", summary = "Dashboard: every provider and connection, with Connect buttons", responses(
    (status = 200, description = "HTML page", body = String, content_type = "text/html")
))]
pub async fn dashboard(State(state): State<AppState>) -> Response {
    let settings = state.engine.settings();
    let mut providers: Vec<String> = settings.providers.keys().cloned().collect();
    providers.sort();
    pages::dashboard(&providers, &state.engine.report())
}

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        axum::Json(serde_json::json!({"error": "not_found", "message": "no such endpoint; see GET /openapi.json"})),
    )
        .into_response()
}

/// The host part of a `Host` header, lower-cased, without the port.
fn host_name(value: &str) -> String {
    let v = value.trim().to_ascii_lowercase();
    if let Some(rest) = v.strip_prefix('[') {
        // [::1]:8787 -> [::1]
        return match rest.split_once(']') {
            Some((inner, _)) => format!("[{inner}]"),
            None => v,
        };
    }
    match v.rsplit_once(':') {
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h.to_string(),
        _ => v,
    }
}

/// The slice of a `Host` value that `host_name` lower-cases and returns,
/// without allocating: trimmed, `[...]` kept whole, a numeric port dropped.
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

/// `allowed == host_name(value)`, without allocating.
fn same_host(allowed: &str, host: &str) -> bool {
    allowed.len() == host.len()
        && allowed
            .bytes()
            .zip(host.bytes())
            .all(|(a, h)| a == h.to_ascii_lowercase())
}

/// Whether a `Host` header value names an allowed host: exactly the test
/// below on `host_name(value)`, without allocating on the hot path.
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
    let header_host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok());
    if header_host.is_some_and(|v| host_allowed(allowed_hosts, v)) {
        return None;
    }
    let host = header_host
        .map(host_name)
        .or_else(|| req.uri().host().map(|h| h.to_ascii_lowercase()));
    let allowed = host.as_deref().is_some_and(|h| {
        allowed_hosts
            .iter()
            .any(|a| a == h || (a.trim_start_matches('[').trim_end_matches(']') == h))
    });
    if !allowed {
        tracing::warn!(
            host = host.as_deref().unwrap_or("(none)"),
            "request with a foreign Host header refused"
        );
        return Some((
            StatusCode::MISDIRECTED_REQUEST,
            axum::Json(serde_json::json!({
                "error": "misdirected_request",
                "message": "this Host is not served here; use the address in server.public_url or add the name to server.allowed_hosts"
            })),
        )
            .into_response());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::host_name;

    #[test]
    fn host_names() {
        assert_eq!(host_name("127.0.0.1:8787"), "127.0.0.1");
        assert_eq!(host_name("LocalHost"), "localhost");
        assert_eq!(host_name("[::1]:8787"), "[::1]");
        assert_eq!(host_name("evil.example"), "evil.example");
    }

    /// The allocation-free check agrees with `host_name` + comparison.
    #[test]
    fn host_check_matches_host_name() {
        let allowed: Vec<String> = ["localhost", "127.0.0.1", "[::1]", "::1", "tk.example"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        for v in [
            "127.0.0.1:8787",
            " LocalHost ",
            "localhost:",
            "[::1]:8787",
            "[::1",
            "[::1]x",
            "::1",
            "TK.example:443",
            "tk.example:44a",
            "evil.example",
            "localhost.evil",
            "",
        ] {
            let h = host_name(v);
            let slow = allowed
                .iter()
                .any(|a| *a == h || a.trim_start_matches('[').trim_end_matches(']') == h);
            assert_eq!(super::host_allowed(&allowed, v), slow, "{v:?}");
        }
    }
}
