//! `ANY /proxy/{provider}[@{account}]/{path}` (SPEC 6): forwards a request
//! to the provider's `api_base_url` with the current access token, within
//! the provider's rate limits ([`crate::ratelimit`]), so an application
//! pointed here never gets blocked and never handles a token.
//!
//! Before anything is spent: the connection's extras decide its base URL
//! and any header its API requires ([`crate::provider::extras::upstream`]:
//! Salesforce `instance_url`, Zoho `api_domain`, Xero `xero-tenant-id`,
//! or a 400 asking the caller to choose a tenant); the upstream URL is
//! built by [`upstream_url`] and must stay under that base (else a local
//! 400, nothing sent), and the connection must exist (else a 404, no
//! limiter entry, no quota).
//!
//! Bodies stream both ways; a request body of known length up to
//! [`REPLAY_MAX_BYTES`] is buffered so that it can be sent again after an
//! upstream 401 (one refresh, one retry, at most one 401-driven refresh per
//! connection per [`UNAUTHORIZED_COOLDOWN`]) or 429 (one pause, one retry).
//! Buffered requests go through [`super::upstream`], whose exchange runs in
//! this handler's task on a pooled connection; streamed ones, and all of
//! them when an outgoing proxy is set in the environment, through reqwest.
//! The incoming `Authorization` has already been checked (SPEC 5) by the
//! route's guard; here it is dropped and replaced, and so are cookies in
//! both directions. Answers are marked inert for browsers (`nosniff`, CSP
//! `sandbox`). Tokens are never logged.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use secrecy::ExposeSecret;
use url::Url;

use super::error::ApiError;
use super::upstream::{self, Upstream};
use super::AppState;
use crate::ratelimit::{Answer, RateLimits};
use crate::refresh::{Engine, IssuedToken};
use crate::store::GrantMeta;

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

/// After an upstream 401 forced a refresh, further 401s of that connection
/// within this time are passed to the client without another rotation:
/// one refresh rules out a stale token, and a provider that refuses the
/// fresh one refuses for another reason (scope, permission, endpoint), so
/// rotating on every call would spend a single-use refresh token and quota
/// per request. A minute still recovers promptly from a token the provider
/// really invalidated again.
pub const UNAUTHORIZED_COOLDOWN: Duration = Duration::from_secs(60);

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

/// The proxy's shared parts: the pooled HTTP clients, the limits, the wait.
pub struct Proxy {
    /// Streamed request bodies, and everything when an outgoing proxy is
    /// configured.
    http: reqwest::Client,
    /// Buffered request bodies (see [`upstream`]); `None` when the
    /// operator set an outgoing proxy ([`outgoing_proxy_set`]).
    upstream: Option<Upstream>,
    /// The limits; the refresh engine takes its slots here too.
    pub limits: Arc<RateLimits>,
    max_wait: Duration,
    /// When a 401 last caused a refresh, per connection (see
    /// [`UNAUTHORIZED_COOLDOWN`]); entries exist only for connections that
    /// were refreshed, and [`Proxy::forget`] drops them.
    unauthorized_refreshes: std::sync::Mutex<HashMap<(String, String), std::time::Instant>>,
    /// Each configured provider's series, registered once: a `counter!`
    /// per request would allocate its labels and look the series up.
    series: std::sync::RwLock<HashMap<String, Arc<Series>>>,
    /// Each connection's base URL as of one snapshot of its grant (only for
    /// presets whose extras may name one): checked and parsed once per
    /// snapshot, not per request.
    bases: std::sync::Mutex<HashMap<String, HashMap<String, CachedBase>>>,
}

/// One provider's proxy series.
struct Series {
    ok: metrics::Counter,
    upstream_429: metrics::Counter,
    limited: metrics::Counter,
    error: metrics::Counter,
    limited_total: metrics::Counter,
    daily_available: metrics::Gauge,
}

impl Series {
    fn new(provider: &str) -> Series {
        let c = |outcome: &'static str| metrics::counter!(PROXY_REQUESTS_TOTAL, "provider" => provider.to_string(), "result" => outcome);
        Series {
            ok: c("ok"),
            upstream_429: c("upstream_429"),
            limited: c("limited"),
            error: c("error"),
            limited_total: metrics::counter!(PROXY_LIMITED_TOTAL, "provider" => provider.to_string()),
            daily_available: metrics::gauge!(PROXY_DAILY_AVAILABLE, "provider" => provider.to_string()),
        }
    }
}

/// A connection's base URL and what it was computed from.
struct CachedBase {
    settings: std::sync::Weak<crate::refresh::Settings>,
    meta: std::sync::Weak<GrantMeta>,
    base: Option<Arc<Url>>,
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
            .connect_timeout(upstream::CONNECT_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .pool_max_idle_per_host(upstream::MAX_IDLE_PER_ORIGIN)
            .tcp_nodelay(true)
            .build()
            .unwrap_or_default();
        let upstream = if outgoing_proxy_set() {
            None
        } else {
            Upstream::new()
                .inspect_err(|e| tracing::warn!(error = %e, "the proxy's pooled upstream client is unavailable; using the general one"))
                .ok()
        };
        Proxy {
            http,
            upstream,
            limits,
            max_wait,
            unauthorized_refreshes: std::sync::Mutex::new(HashMap::new()),
            series: std::sync::RwLock::new(HashMap::new()),
            bases: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// The series of a configured provider (created at its first use).
    fn series(&self, provider: &str) -> Arc<Series> {
        if let Some(s) = self
            .series
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(provider)
        {
            return s.clone();
        }
        self.series
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(provider.to_string())
            .or_insert_with(|| Arc::new(Series::new(provider)))
            .clone()
    }

    /// The base URL of `t`'s connection as of `meta` under `settings`: the
    /// provider's `api_base_url`, or what the connection's extras name
    /// ([`crate::provider::extras::base`]), computed once per snapshot.
    fn base(
        &self,
        settings: &Arc<crate::refresh::Settings>,
        config: &crate::config::ProviderConfig,
        meta: &Arc<GrantMeta>,
        t: &Target,
    ) -> Option<Arc<Url>> {
        if !crate::provider::extras::has_own_base(config) {
            return config.api_base_url.clone().map(Arc::new);
        }
        let mut bases = self.bases.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = bases.get(&t.provider).and_then(|a| a.get(&t.account)) {
            let same_settings = std::ptr::eq(c.settings.as_ptr(), Arc::as_ptr(settings));
            let same_meta = std::ptr::eq(c.meta.as_ptr(), Arc::as_ptr(meta));
            if same_settings && same_meta && c.meta.strong_count() > 0 {
                return c.base.clone();
            }
        }
        let base = crate::provider::extras::base(config, &meta.extra).map(Arc::new);
        bases.entry(t.provider.clone()).or_default().insert(
            t.account.clone(),
            CachedBase {
                settings: Arc::downgrade(settings),
                meta: Arc::downgrade(meta),
                base: base.clone(),
            },
        );
        base
    }

    /// Makes every proxy series of these providers exist from the start,
    /// at 0 (SPEC 4: `rate()` and alerts work on a fresh daemon).
    pub fn register<'a>(providers: impl IntoIterator<Item = &'a str>) {
        for p in providers {
            for outcome in ["ok", "upstream_429", "limited", "error"] {
                metrics::counter!(PROXY_REQUESTS_TOTAL, "provider" => p.to_string(), "result" => outcome)
                    .increment(0);
            }
            metrics::counter!(PROXY_LIMITED_TOTAL, "provider" => p.to_string()).increment(0);
        }
    }

    /// Whether an upstream 401 of `provider/account` may force a refresh
    /// now; if so, the cool-down starts.
    fn take_unauthorized_refresh(&self, provider: &str, account: &str) -> bool {
        let now = std::time::Instant::now();
        let mut map = self
            .unauthorized_refreshes
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        map.retain(|_, at| now.duration_since(*at) < UNAUTHORIZED_COOLDOWN);
        let key = (provider.to_string(), account.to_string());
        if map.contains_key(&key) {
            return false;
        }
        map.insert(key, now);
        true
    }

    /// How many connections' base URLs are cached: bounded by the known
    /// connections.
    pub fn cached_bases(&self) -> usize {
        self.bases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(HashMap::len)
            .sum()
    }

    /// Drops what the proxy keeps for a forgotten connection (its limiter
    /// scope, its cached base URL, its 401 cool-down).
    pub fn forget(&self, provider: &str, account: &str) {
        self.limits.forget(provider, account);
        if let Some(accounts) = self
            .bases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(provider)
        {
            accounts.remove(account);
        }
        self.unauthorized_refreshes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(provider.to_string(), account.to_string()));
    }
}

/// Whether the environment names an outgoing proxy. reqwest honours these
/// (its default system proxy); the pooled upstream client does not speak
/// to proxies, so with any of them set every request goes through reqwest
/// and the setting keeps working.
fn outgoing_proxy_set() -> bool {
    [
        "HTTP_PROXY",
        "http_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
    ]
    .iter()
    .any(|v| std::env::var_os(v).is_some_and(|x| !x.is_empty()))
}

/// An upstream answer from either client.
enum Reply {
    Reqwest(reqwest::Response),
    Pooled(upstream::Answer),
}

impl Reply {
    fn status(&self) -> StatusCode {
        match self {
            Reply::Reqwest(r) => r.status(),
            Reply::Pooled(a) => a.status,
        }
    }

    fn headers(&self) -> &HeaderMap {
        match self {
            Reply::Reqwest(r) => r.headers(),
            Reply::Pooled(a) => &a.headers,
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
    // Counted per configured provider only: a label per name a client
    // makes up would grow the recorder without bound.
    if matches!(result, Err(ApiError::UnknownProvider(_))) {
        return result.unwrap_or_else(IntoResponse::into_response);
    }
    let series = state.proxy.series(&target.provider);
    match &result {
        Ok(r) if r.status() == StatusCode::TOO_MANY_REQUESTS => series.upstream_429.increment(1),
        Ok(_) => series.ok.increment(1),
        Err(ApiError::RateLimited(_)) => {
            series.limited_total.increment(1);
            series.limited.increment(1);
        }
        Err(_) => series.error.increment(1),
    }
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
    /// Path below `api_base_url`, still percent-encoded as received.
    path: String,
    query: Option<String>,
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
        Ok(Target {
            provider: provider.to_string(),
            account: account.to_string(),
            path: rest.to_string(),
            query: uri.query().map(str::to_string),
        })
    }
}

/// Why a request path cannot be forwarded: it would leave `api_base_url`
/// (SPEC 6), or might be read that way by some server on the way.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyPathError {
    /// A `.` or `..` segment, in any spelling (`%2e`, `..;`, after `%2f`
    /// or `\\` decoding to a separator).
    #[error("the path may not contain \".\" or \"..\" segments, in any spelling or encoding")]
    DotSegment,
    /// An empty segment (`//`), which some servers collapse and others
    /// read as the start of an authority.
    #[error("the path may not contain empty segments (\"//\")")]
    EmptySegment,
    /// A backslash, encoded or not: some servers read it as `/`.
    #[error("the path may not contain backslashes (\"\\\" or %5C)")]
    Backslash,
    /// An unencoded `?` or `#` in the path part: it would move the rest
    /// into the query or fragment.
    #[error("the path may not contain an unencoded \"?\" or \"#\"")]
    QueryOrFragment,
    /// The URL built could not be parsed, or left the base (scheme, host,
    /// port or path): refused rather than sent.
    #[error("the path does not stay under the provider's api_base_url")]
    OutsideBase,
}

/// How many rounds of percent-decoding a segment is checked through: a
/// server or framework on the way may decode more than once (`%252e`).
const DECODE_ROUNDS: usize = 4;

/// `api_base_url` + `path` (percent-encoded, relative to the base) +
/// `?query`, verified to stay under the base: same scheme, host and port,
/// and a path whose leading segments are the base's (segment-wise: base
/// `/api` does not admit `/api2`).
///
/// Refused whatever the spelling: `.` and `..` segments (also `%2e`,
/// `%252e`, `..;x`, and after `%2f` or `%5c` decode to a separator),
/// empty segments (`//`, hence absolute URLs in the path) and backslashes.
/// The result is what is sent; it is never normalised again.
pub fn upstream_url(base: &Url, path: &str, query: Option<&str>) -> Result<Url, ProxyPathError> {
    if path.starts_with('/') {
        return Err(ProxyPathError::EmptySegment);
    }
    if path.contains(['?', '#']) {
        return Err(ProxyPathError::QueryOrFragment);
    }
    if !path.is_empty() {
        check_segments(path)?;
    }
    let base_path = base.path().trim_end_matches('/');
    let mut text = String::with_capacity(base.as_str().len() + path.len() + 2);
    text.push_str(base.scheme());
    text.push_str("://");
    text.push_str(&base[url::Position::BeforeUsername..url::Position::AfterPort]);
    text.push_str(base_path);
    text.push('/');
    text.push_str(path);
    if let Some(q) = query {
        text.push('?');
        text.push_str(q);
    }
    let url = Url::parse(&text).map_err(|_| ProxyPathError::OutsideBase)?;
    if !under_base(base, &url) {
        return Err(ProxyPathError::OutsideBase);
    }
    // What is sent, checked again: the parser drops tabs and newlines and
    // re-encodes, so the path it emits is not always the one checked above.
    let sent = url
        .path()
        .strip_prefix(base_path)
        .and_then(|p| p.strip_prefix('/'))
        .ok_or(ProxyPathError::OutsideBase)?;
    if !sent.is_empty() {
        check_segments(sent)?;
    }
    Ok(url)
}

/// Every segment of a raw path, after up to [`DECODE_ROUNDS`] rounds of
/// percent-decoding and splitting at the separators they reveal.
fn check_segments(raw: &str) -> Result<(), ProxyPathError> {
    let segments: Vec<&str> = raw.split('/').collect();
    let last = segments.len() - 1;
    for (i, seg) in segments.iter().enumerate() {
        // A trailing slash is part of many APIs' paths; any other empty
        // segment is not.
        if seg.is_empty() {
            if i == last {
                continue;
            }
            return Err(ProxyPathError::EmptySegment);
        }
        let mut text = std::borrow::Cow::Borrowed(*seg);
        for _ in 0..=DECODE_ROUNDS {
            if text.contains('\\') {
                return Err(ProxyPathError::Backslash);
            }
            for part in text.split('/') {
                // Path parameters: `..;jsessionid=x` is `..` to Tomcat.
                let name = part.split(';').next().unwrap_or(part);
                if name == "." || name == ".." {
                    return Err(ProxyPathError::DotSegment);
                }
                // A decoded `%2F` next to another separator or at an end.
                if part.is_empty() {
                    return Err(ProxyPathError::EmptySegment);
                }
            }
            if !text.contains('%') {
                break;
            }
            let decoded = percent_encoding::percent_decode_str(&text)
                .decode_utf8_lossy()
                .into_owned();
            if decoded == text {
                break;
            }
            text = std::borrow::Cow::Owned(decoded);
        }
    }
    Ok(())
}

/// Whether `url` has the base's scheme, host and port, no credentials and
/// no fragment, and a path whose leading segments are the base's.
fn under_base(base: &Url, url: &Url) -> bool {
    if url.scheme() != base.scheme()
        || url.host_str() != base.host_str()
        || url.port_or_known_default() != base.port_or_known_default()
        || !url.username().is_empty()
        || url.password().is_some()
        || url.fragment().is_some()
    {
        return false;
    }
    // Segment-wise, without collecting: this runs on every request.
    fn segments(u: &Url) -> impl Iterator<Item = &str> {
        u.path_segments().into_iter().flatten()
    }
    let mut base_len = segments(base).count();
    if segments(base).last().is_some_and(str::is_empty) {
        base_len -= 1;
    }
    let mut rest = segments(url);
    for b in segments(base).take(base_len) {
        if rest.next() != Some(b) {
            return false;
        }
    }
    let mut below = 0;
    for s in rest {
        if s == "."
            || s == ".."
            || s.eq_ignore_ascii_case("%2e")
            || s.eq_ignore_ascii_case("%2e%2e")
        {
            return false;
        }
        below += 1;
    }
    below > 0
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
            // The daemon's own cookies (session, flow) are not the API's.
            || name == header::COOKIE
            || (buffered && name == header::CONTENT_LENGTH)
        {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out
}

/// End-to-end response headers; CORS headers are dropped too, since the
/// daemon never sends any (SPEC 4) and must not let a provider's through,
/// and so is `Set-Cookie`: a cookie set on the daemon's origin would reach
/// its pages and every other proxied provider.
fn response_headers(upstream: &HeaderMap) -> HeaderMap {
    let listed = connection_listed(upstream);
    let mut out = HeaderMap::with_capacity(upstream.len());
    for (name, value) in upstream {
        if hop_by_hop(name, &listed)
            || name.as_str().starts_with("access-control-")
            || name == header::SET_COOKIE
            || name == header::CONTENT_SECURITY_POLICY
            || name == header::X_CONTENT_TYPE_OPTIONS
        {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    // The answer is rendered on the daemon's origin if a browser ever
    // loads it: no sniffing it into HTML, no scripts, no same-origin
    // access to the daemon.
    out.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    out.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("sandbox"),
    );
    out
}

/// `Bearer <token>`, marked sensitive.
fn bearer(secret: &str) -> HeaderValue {
    let mut text = Vec::with_capacity(7 + secret.len());
    text.extend_from_slice(b"Bearer ");
    text.extend_from_slice(secret.as_bytes());
    // `from_maybe_shared` keeps the buffer (no second copy) after checking it.
    let mut v = HeaderValue::from_maybe_shared(Bytes::from(text))
        .unwrap_or_else(|_| HeaderValue::from_static("Bearer invalid"));
    // Keeps it out of hyper's debug output and HPACK tables.
    v.set_sensitive(true);
    v
}

/// After an upstream 401 to `used`: whether to send once more, and with
/// which token. The token another request already refreshed is always
/// worth one retry; otherwise a forced refresh (single-flight in the
/// engine), unless one was made for a 401 of this connection within
/// [`UNAUTHORIZED_COOLDOWN`]: then the 401 is the provider's answer to a
/// good token (a missing scope, a revoked app permission, an endpoint that
/// answers 401 for other reasons), and rotating again would only spend
/// the single-use refresh token. `None`: relay the 401.
async fn after_unauthorized(
    state: &AppState,
    t: &Target,
    used: &HeaderValue,
) -> Result<Option<IssuedToken>, ApiError> {
    let to_api = |e| ApiError::from_token_error(e, &state.public_url);
    let engine: &Engine = &state.engine;
    let current = engine
        .token(&t.provider, &t.account)
        .await
        .map_err(to_api)?;
    let used = used.as_bytes().strip_prefix(b"Bearer ").unwrap_or_default();
    if current.access_token.expose_secret().as_bytes() != used {
        return Ok(Some(current));
    }
    if !state
        .proxy
        .take_unauthorized_refresh(&t.provider, &t.account)
    {
        tracing::info!(provider = %t.provider, account = %t.account, "the provider refused a freshly refreshed access token; passing its 401 on without another refresh");
        return Ok(None);
    }
    tracing::info!(provider = %t.provider, account = %t.account, "the provider refused the access token; refreshing once");
    engine
        .force_refresh(&t.provider, &t.account)
        .await
        .map(Some)
        .map_err(to_api)
}

/// Where one request goes for one snapshot of its connection's grant: the
/// upstream URL (checked to stay under the base) and the headers the
/// connection's extras require.
struct Route {
    /// The grant snapshot the extras came from.
    meta: Arc<GrantMeta>,
    url: Url,
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl Route {
    fn new(
        state: &AppState,
        settings: &Arc<crate::refresh::Settings>,
        config: &crate::config::ProviderConfig,
        meta: Arc<GrantMeta>,
        incoming: &HeaderMap,
        t: &Target,
    ) -> Result<Route, ApiError> {
        // A connection's extras may name its own base URL or a header the
        // API requires (SPEC 11).
        let headers = crate::provider::extras::headers(config, &meta.extra, incoming)
            .map_err(|m| ApiError::BadRequest(format!("{m}; nothing was sent")))?;
        let Some(base) = state.proxy.base(settings, config, &meta, t) else {
            return Err(ApiError::BadRequest(format!(
                "provider {:?} has no api_base_url; set providers.{}.api_base_url",
                t.provider, t.provider
            )));
        };
        let url = upstream_url(&base, &t.path, t.query.as_deref())
            .map_err(|e| ApiError::BadRequest(format!("{e}; nothing was sent")))?;
        Ok(Route { meta, url, headers })
    }
}

async fn send(state: &AppState, t: &Target, req: Request) -> Result<Response, ApiError> {
    let proxy = &state.proxy;
    let engine = &state.engine;
    let to_api = |e| ApiError::from_token_error(e, &state.public_url);
    let settings = engine.settings();
    let Some(provider) = settings.providers.get(&t.provider) else {
        return Err(ApiError::UnknownProvider(t.provider.clone()));
    };
    // Refused before anything else is touched (body, limits, token), as the
    // connection is now; checked again below against the grant the token
    // comes from.
    let meta = engine.grant_meta(&t.provider, &t.account);
    // Unknown names cost nothing: no limiter entry, no quota, and no
    // cached base URL (a flood of made-up accounts would grow that cache).
    if meta.is_none() {
        engine
            .check_known(&t.provider, &t.account)
            .map_err(to_api)?;
    }
    let mut route = Route::new(
        state,
        &settings,
        &provider.config,
        meta.unwrap_or_default(),
        req.headers(),
        t,
    )?;

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
    // Moved into the first send; rebuilt only for a retry.
    let mut headers = Some(request_headers(&parts.headers, replay.is_some()));

    // The token to send next, when the previous answer decided it.
    let mut next: Option<IssuedToken> = None;
    let (mut retried_401, mut paused) = (false, false);
    loop {
        // Each send waits up to `proxy_max_wait` for its own slot (SPEC 6).
        let deadline = tokio::time::Instant::now() + proxy.max_wait;
        let permit = proxy
            .limits
            .acquire(&t.provider, &t.account, deadline)
            .await?;
        // Taken after the wait: a refresh that landed meanwhile may have
        // killed the token we would have held (SPEC 7). In place when the
        // engine's fast lane can serve it (no allocation but the header).
        let (authorization, grant) = match next.take() {
            Some(fresh) => (
                bearer(fresh.access_token.expose_secret()),
                Some(fresh.extra),
            ),
            None => {
                let fast = engine.with_fresh_token(
                    &t.provider,
                    &t.account,
                    chrono::Utc::now(),
                    |served| {
                        let same = std::ptr::eq(served.extra, &route.meta.extra)
                            || *served.extra == route.meta.extra;
                        (
                            bearer(served.access_token),
                            (!same).then(|| served.extra.clone()),
                        )
                    },
                );
                match fast {
                    Some((authorization, other)) => (
                        authorization,
                        other.map(|extra| {
                            Arc::new(GrantMeta {
                                extra,
                                ..GrantMeta::default()
                            })
                        }),
                    ),
                    None => match engine.token(&t.provider, &t.account).await {
                        Ok(token) => (
                            bearer(token.access_token.expose_secret()),
                            Some(token.extra),
                        ),
                        Err(e) => {
                            if matches!(e, crate::refresh::TokenError::UnknownConnection { .. }) {
                                // Forgotten during the wait.
                                proxy.forget(&t.provider, &t.account);
                            }
                            return Err(to_api(e));
                        }
                    },
                }
            }
        };
        // The base URL and headers go with the token they were issued
        // with: a grant replaced meanwhile (a new authorization, another
        // Salesforce instance or Xero tenant) must not get the new token
        // sent to the old grant's instance, or the reverse.
        if let Some(grant) = grant {
            if !Arc::ptr_eq(&grant, &route.meta) && grant.extra != route.meta.extra {
                route = Route::new(state, &settings, &provider.config, grant, &parts.headers, t)?;
            }
        }
        let mut upstream_headers = headers
            .take()
            .unwrap_or_else(|| request_headers(&parts.headers, replay.is_some()));
        for (name, value) in &route.headers {
            upstream_headers.insert(name.clone(), value.clone());
        }
        upstream_headers.insert(header::AUTHORIZATION, authorization.clone());
        let resp = match (&proxy.upstream, &replay) {
            (Some(pooled), Some(b)) => Reply::Pooled(
                pooled
                    .send(
                        parts.method.clone(),
                        &route.url,
                        upstream_headers,
                        b.clone(),
                        SMALL_ANSWER_BYTES,
                    )
                    .await
                    .map_err(|e| ApiError::UpstreamUnreachable(Box::new(e)))?,
            ),
            _ => {
                let body = match (&replay, stream.take()) {
                    (Some(b), _) => reqwest::Body::from(b.clone()),
                    (None, Some(s)) => reqwest::Body::wrap_stream(s.into_data_stream()),
                    // A streamed body is sent once; the loop only repeats with `replay`.
                    (None, None) => return Err(body_unreadable(&"already sent")),
                };
                Reply::Reqwest(
                    proxy
                        .http
                        .request(parts.method.clone(), route.url.clone())
                        .headers(upstream_headers)
                        .body(body)
                        .send()
                        .await
                        .map_err(|e| ApiError::UpstreamUnreachable(Box::new(e.without_url())))?,
                )
            }
        };
        let status = resp.status();
        let answer = Answer::from_headers(status.as_u16(), resp.headers());
        permit.learn(&answer);
        if answer.reports_quota() {
            if let Some(q) = proxy.limits.quota(&t.provider, &t.account) {
                if let Some(a) = q.client.daily_available {
                    proxy.series(&t.provider).daily_available.set(a as f64);
                }
            }
        }
        let can_retry = replay.is_some();
        if status == StatusCode::UNAUTHORIZED && can_retry && !retried_401 {
            retried_401 = true;
            if let Some(fresh) = after_unauthorized(state, t, &authorization).await? {
                next = Some(fresh);
                continue;
            }
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

/// The provider's answer: streamed, except that a small one of known
/// length is read first and sent in one piece (one write, and the upstream
/// connection goes back to the pool before the client has read anything).
/// A 429 gains the `Retry-After` of the pause it caused.
async fn relay(resp: Reply, limits: &RateLimits, t: &Target) -> Result<Response, ApiError> {
    let status = resp.status();
    let mut headers = response_headers(resp.headers());
    if status == StatusCode::TOO_MANY_REQUESTS && !headers.contains_key(header::RETRY_AFTER) {
        let secs = limits
            .quota(&t.provider, &t.account)
            .and_then(|q| q.paused_until)
            .map_or(1, |u| (u - chrono::Utc::now()).num_seconds().max(0) + 1);
        headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    let body = match resp {
        Reply::Pooled(a) => match a.body {
            upstream::AnswerBody::Whole(bytes) => Body::from(bytes),
            upstream::AnswerBody::Stream(incoming) => Body::new(incoming),
        },
        Reply::Reqwest(resp) => {
            let small = resp
                .content_length()
                .is_some_and(|n| n <= SMALL_ANSWER_BYTES);
            if small {
                Body::from(
                    resp.bytes()
                        .await
                        .map_err(|e| ApiError::UpstreamUnreachable(Box::new(e.without_url())))?,
                )
            } else {
                Body::from_stream(resp.bytes_stream())
            }
        }
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
        assert_eq!(t.path, "crm/rest/v1/contacts");
        assert_eq!(t.query.as_deref(), Some("limit=5"));
        let t = Target::parse(&"/proxy/keap/x%2Fy".parse().unwrap()).unwrap();
        assert_eq!((t.account.as_str(), t.path.as_str()), ("default", "x%2Fy"));
        assert!(Target::parse(&"/proxy/Bad/x".parse().unwrap()).is_err());
        assert!(Target::parse(&"/proxy/keap@refresh/x".parse().unwrap()).is_err());
    }

    #[test]
    fn upstream_urls_stay_under_the_base() {
        let base = Url::parse("https://api.example.com/api").unwrap();
        let ok = |p: &str, q: Option<&str>| upstream_url(&base, p, q).unwrap().to_string();
        assert_eq!(
            ok("crm/rest/v1/contacts", Some("limit=5")),
            "https://api.example.com/api/crm/rest/v1/contacts?limit=5"
        );
        assert_eq!(ok("", None), "https://api.example.com/api/");
        assert_eq!(ok("a/", None), "https://api.example.com/api/a/");
        assert_eq!(ok("x%2Fy", None), "https://api.example.com/api/x%2Fy");
        assert_eq!(
            ok("@evil.host/x", None),
            "https://api.example.com/api/@evil.host/x"
        );
        assert_eq!(ok("a..b/.x", None), "https://api.example.com/api/a..b/.x");
        for bad in [
            "..",
            "a/../../token",
            "a/%2e%2e/token",
            "%2E%2e/",
            "a/.%2E/b",
            "..%2ftoken",
            "a/..%2Ftoken",
            "%5c..",
            "a\\..\\token",
            "a%5Cb",
            "./x",
            "a/./b",
            "a//b",
            "/token",
            "//evil.host/x",
            "http://evil.host/x",
            "https:%2F%2Fevil.host",
            "%252e%252e/token",
            "..;x/token",
            "a/%2e",
        ] {
            assert!(
                upstream_url(&base, bad, None).is_err(),
                "{bad:?} was accepted"
            );
        }
        // Segment-wise: `/api` does not admit `/api2`, even via the root.
        let root = Url::parse("http://127.0.0.1:9/").unwrap();
        assert_eq!(
            upstream_url(&root, "x", Some("a=b")).unwrap().as_str(),
            "http://127.0.0.1:9/x?a=b"
        );
        let slash = Url::parse("http://127.0.0.1:9/api/").unwrap();
        assert_eq!(
            upstream_url(&slash, "x", None).unwrap().as_str(),
            "http://127.0.0.1:9/api/x"
        );
        assert!(!under_base(
            &base,
            &Url::parse("https://api.example.com/api2/x").unwrap()
        ));
        assert!(!under_base(
            &base,
            &Url::parse("https://api.example.com/api").unwrap()
        ));
        assert!(!under_base(
            &base,
            &Url::parse("https://api.example.com:444/api/x").unwrap()
        ));
        assert!(!under_base(
            &base,
            &Url::parse("http://api.example.com/api/x").unwrap()
        ));
        assert!(!under_base(
            &base,
            &Url::parse("https://u@api.example.com/api/x").unwrap()
        ));
    }

    mod property {
        use super::super::*;
        use proptest::prelude::*;

        /// Fully decoded (as a server decoding repeatedly would see it),
        /// separators `/` and `\\` alike.
        fn decoded_segments(path: &str) -> Vec<String> {
            let mut text = path.to_string();
            for _ in 0..8 {
                let d = percent_encoding::percent_decode_str(&text)
                    .decode_utf8_lossy()
                    .into_owned();
                if d == text {
                    break;
                }
                text = d;
            }
            text.split(['/', '\\']).map(str::to_string).collect()
        }

        fn piece() -> impl Strategy<Value = String> {
            prop_oneof![
                Just(".".to_string()),
                Just("..".to_string()),
                Just("/".to_string()),
                Just("//".to_string()),
                Just("\\".to_string()),
                Just("%2e".to_string()),
                Just("%2E".to_string()),
                Just("%2f".to_string()),
                Just("%2F".to_string()),
                Just("%5c".to_string()),
                Just("%25".to_string()),
                Just("%".to_string()),
                Just(";".to_string()),
                Just("@".to_string()),
                Just(":".to_string()),
                Just("?".to_string()),
                Just("#".to_string()),
                Just("evil.host".to_string()),
                Just("http:".to_string()),
                "[a-z0-9]{1,3}",
                any::<char>().prop_map(String::from),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(10_000))]

            /// The result is always under the base (host, port, scheme,
            /// path segments) with no dot segment however it is decoded,
            /// or the path is refused.
            #[test]
            fn upstream_url_is_under_the_base_or_refused(
                pieces in proptest::collection::vec(piece(), 0..12),
                query in proptest::option::of("[a-z=&%.]{0,8}"),
                base in prop_oneof![
                    Just("https://api.example.com/api"),
                    Just("https://api.example.com/api/v1/"),
                    Just("http://127.0.0.1:8080/"),
                    Just("http://[::1]:9/x"),
                ],
            ) {
                let base = Url::parse(base).unwrap();
                let path: String = pieces.concat();
                if let Ok(url) = upstream_url(&base, &path, query.as_deref()) {
                    prop_assert_eq!(url.scheme(), base.scheme());
                    prop_assert_eq!(url.host_str(), base.host_str());
                    prop_assert_eq!(url.port_or_known_default(), base.port_or_known_default());
                    let base_path = base.path().trim_end_matches('/');
                    let rest = url.path().strip_prefix(base_path);
                    prop_assert!(rest.is_some_and(|r| r.starts_with('/')), "{} not under {}", url, base);
                    let rest = rest.unwrap_or_default();
                    for seg in decoded_segments(&rest[1..]) {
                        let name = seg.split(';').next().unwrap_or_default();
                        prop_assert!(name != "." && name != "..", "{} has a dot segment", url);
                    }
                }
            }
        }
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
        h.insert(header::COOKIE, "tokenkeeper_session=x".parse().unwrap());
        let out = request_headers(&h, true);
        assert_eq!(out.len(), 1);
        assert_eq!(out["x-app"], "2");
        let mut h = HeaderMap::new();
        h.insert("access-control-allow-origin", "*".parse().unwrap());
        h.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
        h.insert(header::SET_COOKIE, "sid=1".parse().unwrap());
        let out = response_headers(&h);
        assert_eq!(out.len(), 3);
        assert!(out.get(header::SET_COOKIE).is_none());
        assert_eq!(out[header::CONTENT_SECURITY_POLICY], "sandbox");
        assert_eq!(out[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
    }
}
