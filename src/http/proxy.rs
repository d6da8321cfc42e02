//! `ANY /proxy/{provider}[@{account}]/{path}` (SPEC 6): forwards a request
//! to the provider's `api_base_url` with the current access token, within
//! the provider's rate limits ([`crate::ratelimit`]), so an application
//! pointed here never gets blocked and never handles a token.
//!
//! Bodies stream both ways; a request body of known length up to
//! [`REPLAY_MAX_BYTES`] is buffered so that it can be sent again after an
//! upstream 401 (one refresh, one retry) or 429 (one pause, one retry).
//! The incoming `Authorization` has already been checked (SPEC 5) by the
//! route's guard; here it is dropped and replaced. Tokens are never logged.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use secrecy::ExposeSecret;

use super::error::ApiError;
use super::AppState;
use crate::ratelimit::{Answer, RateLimits};
use crate::refresh::{Engine, IssuedToken};

/// Request bodies up to this size (with a known length) are buffered so
/// they can be replayed after a refresh or a 429; larger or chunked ones
/// stream through once. Typical API writes are a few kilobytes.
pub const REPLAY_MAX_BYTES: u64 = 1024 * 1024;

/// Answers up to this size with a known length are read whole before they
/// are relayed; larger ones stream. Typical API answers are a few kilobytes.
pub const SMALL_ANSWER_BYTES: u64 = 64 * 1024;

/// Counter: proxied requests by `result` = ok | upstream_429 | limited | error.
pub const PROXY_REQUESTS_TOTAL: &str = "tokenkeeper_proxy_requests_total";
/// Counter: requests answered with a local 429 (no slot within `proxy_max_wait`).
pub const PROXY_LIMITED_TOTAL: &str = "tokenkeeper_proxy_limited_total";
/// Gauge: requests left today as last known (reported by the provider or counted).
pub const PROXY_DAILY_AVAILABLE: &str = "tokenkeeper_proxy_daily_available";

/// Headers that describe one hop, never forwarded (RFC 9110 7.6.1), plus
/// the ones the proxy sets itself.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// The proxy's shared parts: one pooled HTTP client, the limits, the wait.
pub struct Proxy {
    http: reqwest::Client,
    /// The limits; the refresh engine takes its slots here too.
    pub limits: Arc<RateLimits>,
    max_wait: Duration,
}

impl Proxy {
    /// `max_wait` is `server.proxy_max_wait`.
    pub fn new(limits: Arc<RateLimits>, max_wait: Duration) -> Proxy {
        metrics::describe_counter!(
            PROXY_REQUESTS_TOTAL,
            "Proxied requests by result (ok, upstream_429, limited, error)"
        );
        metrics::describe_counter!(
            PROXY_LIMITED_TOTAL,
            "Proxied requests refused locally for rate (429 with Retry-After)"
        );
        metrics::describe_gauge!(
            PROXY_DAILY_AVAILABLE,
            "Requests left today per provider, as last reported or counted"
        );
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .pool_max_idle_per_host(256)
            .tcp_nodelay(true)
            .build()
            .unwrap_or_default();
        Proxy {
            http,
            limits,
            max_wait,
        }
    }
}

/// `ANY /proxy/{provider}[@{account}]/{path}`.
pub async fn forward(State(state): State<AppState>, req: Request) -> Response {
    let target = match Target::parse(req.uri()) {
        Ok(t) => t,
        Err(e) => return e.into_response(),
    };
    let result = send(&state, &target, req).await;
    let outcome = match &result {
        Ok(r) if r.status() == StatusCode::TOO_MANY_REQUESTS => "upstream_429",
        Ok(_) => "ok",
        Err(ApiError::RateLimited(_)) => {
            metrics::counter!(PROXY_LIMITED_TOTAL, "provider" => target.provider.clone())
                .increment(1);
            "limited"
        }
        Err(_) => "error",
    };
    metrics::counter!(PROXY_REQUESTS_TOTAL, "provider" => target.provider.clone(), "result" => outcome)
        .increment(1);
    match result {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

fn body_unreadable(e: &dyn std::fmt::Display) -> ApiError {
    ApiError::BadRequest(format!("the request body could not be read: {e}"))
}

/// Where a proxied request goes.
struct Target {
    provider: String,
    account: String,
    /// Path below `api_base_url`, still percent-encoded, plus `?query`.
    rest: String,
}

impl Target {
    fn parse(uri: &axum::http::Uri) -> Result<Target, ApiError> {
        let path = uri.path().strip_prefix("/proxy/").unwrap_or_default();
        let (who, rest) = path.split_once('/').unwrap_or((path, ""));
        let who = who.replace("%40", "@");
        let (provider, account) = who
            .split_once('@')
            .unwrap_or((who.as_str(), super::api::DEFAULT_ACCOUNT));
        super::api::check_names(provider, account)?;
        // `..` would climb out of api_base_url once the URL is normalised
        // (e.g. to the token endpoint on the same host).
        let dot = |seg: &str| {
            let s = seg.to_ascii_lowercase().replace("%2e", ".");
            s == "." || s == ".."
        };
        if rest.split('/').any(dot) {
            return Err(ApiError::BadRequest(
                "the path may not contain \".\" or \"..\" segments".into(),
            ));
        }
        let rest = match uri.query() {
            Some(q) => format!("{rest}?{q}"),
            None => rest.to_string(),
        };
        Ok(Target {
            provider: provider.to_string(),
            account: account.to_string(),
            rest,
        })
    }
}

/// Whether an incoming or upstream header stays on this hop.
fn hop_by_hop(name: &HeaderName, connection: &[String]) -> bool {
    HOP_BY_HOP.contains(&name.as_str()) || connection.iter().any(|c| c == name.as_str())
}

/// Names listed in `Connection` are hop-by-hop too.
fn connection_listed(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect()
}

/// End-to-end request headers: hop-by-hop ones, `Host`, `Authorization`
/// and (for buffered bodies, where the client sets it) `Content-Length` go.
fn request_headers(incoming: &HeaderMap, buffered: bool) -> HeaderMap {
    let listed = connection_listed(incoming);
    let mut out = HeaderMap::with_capacity(incoming.len());
    for (name, value) in incoming {
        if hop_by_hop(name, &listed)
            || name == header::HOST
            || name == header::AUTHORIZATION
            || (buffered && name == header::CONTENT_LENGTH)
        {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out
}

/// End-to-end response headers; CORS headers are dropped too, since the
/// daemon never sends any (SPEC 4) and must not let a provider's through.
fn response_headers(upstream: &HeaderMap) -> HeaderMap {
    let listed = connection_listed(upstream);
    let mut out = HeaderMap::with_capacity(upstream.len());
    for (name, value) in upstream {
        if hop_by_hop(name, &listed) || name.as_str().starts_with("access-control-") {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out
}

fn bearer(token: &IssuedToken) -> HeaderValue {
    let mut v = HeaderValue::from_str(&format!("Bearer {}", token.access_token.expose_secret()))
        .unwrap_or_else(|_| HeaderValue::from_static("Bearer invalid"));
    // Keeps it out of hyper's debug output and HPACK tables.
    v.set_sensitive(true);
    v
}

/// After an upstream 401: the token another request already refreshed, or
/// a forced refresh (single-flight in the engine).
async fn fresh_token(
    state: &AppState,
    t: &Target,
    used: &IssuedToken,
) -> Result<IssuedToken, ApiError> {
    let to_api = |e| ApiError::from_token_error(e, &state.public_url);
    let engine: &Engine = &state.engine;
    let current = engine
        .token(&t.provider, &t.account)
        .await
        .map_err(to_api)?;
    if current.access_token.expose_secret() != used.access_token.expose_secret() {
        return Ok(current);
    }
    tracing::info!(provider = %t.provider, account = %t.account, "the provider refused the access token; refreshing once");
    engine
        .force_refresh(&t.provider, &t.account)
        .await
        .map_err(to_api)
}

async fn send(state: &AppState, t: &Target, req: Request) -> Result<Response, ApiError> {
    let proxy = &state.proxy;
    let engine = &state.engine;
    let to_api = |e| ApiError::from_token_error(e, &state.public_url);
    let settings = engine.settings();
    let Some(provider) = settings.providers.get(&t.provider) else {
        return Err(ApiError::UnknownProvider(t.provider.clone()));
    };
    let Some(base) = &provider.config.api_base_url else {
        return Err(ApiError::BadRequest(format!(
            "provider {:?} has no api_base_url; set providers.{}.api_base_url",
            t.provider, t.provider
        )));
    };
    let url = format!("{}/{}", base.as_str().trim_end_matches('/'), t.rest);

    let (parts, body) = req.into_parts();
    let replayable = body
        .size_hint()
        .exact()
        .is_some_and(|n| n <= REPLAY_MAX_BYTES);
    let (replay, mut stream): (Option<Bytes>, Option<Body>) = if replayable {
        let bytes = axum::body::to_bytes(body, REPLAY_MAX_BYTES as usize)
            .await
            .map_err(|e| body_unreadable(&e))?;
        (Some(bytes), None)
    } else {
        (None, Some(body))
    };
    let headers = request_headers(&parts.headers, replay.is_some());

    // The token the provider refused with a 401, to be replaced once.
    let mut refused: Option<IssuedToken> = None;
    let (mut refreshed, mut paused) = (false, false);
    loop {
        // Each send waits up to `proxy_max_wait` for its own slot (SPEC 6).
        let deadline = tokio::time::Instant::now() + proxy.max_wait;
        let permit = proxy
            .limits
            .acquire(&t.provider, &t.account, deadline)
            .await?;
        // Taken after the wait: a refresh that landed meanwhile may have
        // killed the token we would have held (SPEC 7).
        let token = match refused.take() {
            Some(old) => fresh_token(state, t, &old).await?,
            None => engine
                .token(&t.provider, &t.account)
                .await
                .map_err(to_api)?,
        };
        let body = match (&replay, stream.take()) {
            (Some(b), _) => reqwest::Body::from(b.clone()),
            (None, Some(s)) => reqwest::Body::wrap_stream(s.into_data_stream()),
            // A streamed body is sent once; the loop only repeats with `replay`.
            (None, None) => return Err(body_unreadable(&"already sent")),
        };
        let mut upstream_headers = headers.clone();
        upstream_headers.insert(header::AUTHORIZATION, bearer(&token));
        let resp = proxy
            .http
            .request(parts.method.clone(), &url)
            .headers(upstream_headers)
            .body(body)
            .send()
            .await
            .map_err(|e| ApiError::UpstreamUnreachable(e.without_url()))?;
        let status = resp.status();
        let answer = Answer::from_headers(status.as_u16(), resp.headers());
        permit.learn(&answer);
        if answer_has_quota(resp.headers()) {
            if let Some(q) = proxy.limits.quota(&t.provider, &t.account) {
                if let Some(a) = q.client.daily_available {
                    metrics::gauge!(PROXY_DAILY_AVAILABLE, "provider" => t.provider.clone())
                        .set(a as f64);
                }
            }
        }
        let can_retry = replay.is_some();
        if status == StatusCode::UNAUTHORIZED && can_retry && !refreshed {
            refreshed = true;
            refused = Some(token);
            continue;
        }
        if status == StatusCode::TOO_MANY_REQUESTS {
            tracing::warn!(provider = %t.provider, "the provider answered 429; pausing it");
            if can_retry && !paused {
                paused = true;
                continue;
            }
        }
        return relay(resp, &proxy.limits, t).await;
    }
}

fn answer_has_quota(h: &HeaderMap) -> bool {
    h.contains_key("x-keap-product-quota-available")
}

/// The provider's answer: streamed, except that a small one of known
/// length is read first and sent in one piece (one write, and the upstream
/// connection goes back to the pool before the client has read anything).
/// A 429 gains the `Retry-After` of the pause it caused.
async fn relay(
    resp: reqwest::Response,
    limits: &RateLimits,
    t: &Target,
) -> Result<Response, ApiError> {
    let status = resp.status();
    let mut headers = response_headers(resp.headers());
    if status == StatusCode::TOO_MANY_REQUESTS && !headers.contains_key(header::RETRY_AFTER) {
        let secs = limits
            .quota(&t.provider, &t.account)
            .and_then(|q| q.paused_until)
            .map_or(1, |u| (u - chrono::Utc::now()).num_seconds().max(0) + 1);
        headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    let small = resp
        .content_length()
        .is_some_and(|n| n <= SMALL_ANSWER_BYTES);
    let body = if small {
        Body::from(
            resp.bytes()
                .await
                .map_err(|e| ApiError::UpstreamUnreachable(e.without_url()))?,
        )
    } else {
        Body::from_stream(resp.bytes_stream())
    };
    let mut out = Response::new(body);
    *out.status_mut() = status;
    *out.headers_mut() = headers;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        let uri: axum::http::Uri = "/proxy/keap@acme/crm/rest/v1/contacts?limit=5"
            .parse()
            .unwrap();
        let t = Target::parse(&uri).unwrap();
        assert_eq!((t.provider.as_str(), t.account.as_str()), ("keap", "acme"));
        assert_eq!(t.rest, "crm/rest/v1/contacts?limit=5");
        let t = Target::parse(&"/proxy/keap/x%2Fy".parse().unwrap()).unwrap();
        assert_eq!((t.account.as_str(), t.rest.as_str()), ("default", "x%2Fy"));
        assert!(Target::parse(&"/proxy/keap/a/../token".parse().unwrap()).is_err());
        assert!(Target::parse(&"/proxy/keap/a/%2E%2e/token".parse().unwrap()).is_err());
        assert!(Target::parse(&"/proxy/Bad/x".parse().unwrap()).is_err());
        assert!(Target::parse(&"/proxy/keap@refresh/x".parse().unwrap()).is_err());
    }

    #[test]
    fn hop_by_hop_headers_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "keep-alive, x-private".parse().unwrap());
        h.insert("x-private", "1".parse().unwrap());
        h.insert("x-app", "2".parse().unwrap());
        h.insert(header::AUTHORIZATION, "Bearer key".parse().unwrap());
        h.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        h.insert(header::HOST, "127.0.0.1".parse().unwrap());
        let out = request_headers(&h, true);
        assert_eq!(out.len(), 1);
        assert_eq!(out["x-app"], "2");
        let mut h = HeaderMap::new();
        h.insert("access-control-allow-origin", "*".parse().unwrap());
        h.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
        let out = response_headers(&h);
        assert_eq!(out.len(), 1);
    }
}
