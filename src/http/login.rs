//! Browsers behind API keys (SPEC 2, 4): with `server.api_keys_file` set,
//! a browser cannot send `Authorization: Bearer`, so it gets in through a
//! one-time login link. A client holding a key asks for one
//! (`POST /v1/login-links`, what `tokenkeeper connect` and `tokenkeeper
//! dashboard` do); opening it (`GET /login?token=..`) spends it and sets a
//! short-lived session cookie (`HttpOnly; SameSite=Strict`, `Secure` over
//! HTTPS), then redirects to the page it was made for.
//!
//! Link tokens and session secrets are 256 random bits, kept only as
//! SHA-256 digests, in memory: a restart logs every browser out, which is
//! the safe direction. Both tables are bounded.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{SecondsFormat, Utc};
use sha2::{Digest, Sha256};

use super::error::ApiError;
use super::{pages, AppState};

/// How long a login link can be opened: the time to copy it from a
/// terminal into a browser, short enough that one found later in a
/// scroll-back or a shell history is worthless.
pub const LOGIN_LINK_TTL: Duration = Duration::from_secs(5 * 60);

/// How long a browser session lasts: long enough to authorize at a
/// provider (log in, consent) and look at the dashboard, short enough that
/// a stolen cookie soon stops working. A new link is one command away.
pub const SESSION_TTL: Duration = Duration::from_secs(60 * 60);

/// At most this many unused links and live sessions are kept each; the
/// oldest goes first. Only key holders create them.
const MAX_ENTRIES: usize = 1024;

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "tokenkeeper_session";

type Digest32 = [u8; 32];

fn digest(secret: &str) -> Digest32 {
    Sha256::digest(secret.as_bytes()).into()
}

fn random_secret() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A table of secret digests with their expiry (and payload).
struct Table<T> {
    entries: HashMap<Digest32, (Instant, T)>,
}

impl<T> Table<T> {
    fn insert(&mut self, key: Digest32, until: Instant, value: T) {
        let now = Instant::now();
        self.entries.retain(|_, (u, _)| *u > now);
        if self.entries.len() >= MAX_ENTRIES {
            if let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, (u, _))| *u)
                .map(|(k, _)| *k)
            {
                self.entries.remove(&oldest);
            }
        }
        self.entries.insert(key, (until, value));
    }
}

impl<T> Default for Table<T> {
    fn default() -> Self {
        Table {
            entries: HashMap::new(),
        }
    }
}

/// Unused login links and live browser sessions.
#[derive(Default)]
pub struct Sessions {
    /// std Mutex: held for a map operation, never across `.await`.
    links: Mutex<Table<String>>,
    sessions: Mutex<Table<()>>,
}

impl Sessions {
    /// A new single-use link token for `next` (a local path).
    pub fn new_link(&self, next: String) -> String {
        let token = random_secret();
        self.links.lock().unwrap_or_else(|e| e.into_inner()).insert(
            digest(&token),
            Instant::now() + LOGIN_LINK_TTL,
            next,
        );
        token
    }

    /// Spends a link token: its target when it was valid, `None` when
    /// unknown, expired or already used.
    pub fn spend_link(&self, token: &str) -> Option<String> {
        let (until, next) = self
            .links
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entries
            .remove(&digest(token))?;
        (until > Instant::now()).then_some(next)
    }

    /// Opens a session; returns its secret (the cookie value).
    pub fn open_session(&self) -> String {
        let secret = random_secret();
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(digest(&secret), Instant::now() + SESSION_TTL, ());
        secret
    }

    /// Whether the request carries a live session cookie.
    pub fn admits(&self, headers: &HeaderMap) -> bool {
        let Some(secret) = cookie(headers, SESSION_COOKIE) else {
            return false;
        };
        let d = digest(secret);
        let now = Instant::now();
        let mut table = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        match table.entries.get(&d) {
            Some((until, ())) if *until > now => true,
            Some(_) => {
                table.entries.remove(&d);
                false
            }
            None => false,
        }
    }

    /// Unused links and live sessions, for tests and bounds checks.
    pub fn counts(&self) -> (usize, usize) {
        let now = Instant::now();
        let links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        let sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        (
            links.entries.values().filter(|(u, _)| *u > now).count(),
            sessions.entries.values().filter(|(u, _)| *u > now).count(),
        )
    }
}

/// The value of cookie `name`, if sent.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim())
}

/// Whether `next` is a path on this daemon (not `//host`, not a scheme,
/// not back to `/login`): a login link never sends a browser elsewhere.
pub fn local_target(next: &str) -> bool {
    next.starts_with('/')
        && !next.starts_with("//")
        && !next.contains(['\\', '\r', '\n', '#'])
        && !next.starts_with("/login")
        && next.len() <= 2048
        && next.chars().all(|c| c.is_ascii_graphic())
}

/// The body of `POST /v1/login-links`.
#[derive(serde::Deserialize, utoipa::ToSchema, Default)]
pub struct LinkRequest {
    /// Page the link opens, a path on this daemon (default `/`), e.g.
    /// `/connect/keap?account=acme`.
    #[serde(default)]
    pub next: Option<String>,
}

/// The answer of `POST /v1/login-links`.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct LinkBody {
    /// Open this in a browser; it works once, until `expires_at`.
    pub url: String,
    /// RFC 3339 UTC; absent when the daemon has no API keys (the URL is
    /// then the page itself).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
}

/// `POST /v1/login-links`: a one-time login link for a browser.
#[utoipa::path(post, path = "/v1/login-links", summary = "A one-time login link for a browser (with API keys)",
    request_body(content = LinkRequest, description = "the page to open (default /)"),
    responses(
        (status = 200, description = "the link; it works once, within 5 minutes, and sets a 1-hour HttpOnly, SameSite=Strict session cookie", body = LinkBody),
        (status = 400, description = "next is not a path on this daemon", body = crate::http::error::ErrorBody),
        (status = 401, description = "no or wrong API key", body = crate::http::error::ErrorBody),
        (status = 403, description = "cross-site request", body = crate::http::error::ErrorBody)
    )
)]
pub async fn create_link(
    State(state): State<AppState>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    // Parsed here so a malformed body is the documented JSON 400, whatever
    // its content type says.
    let request: LinkRequest = if body.iter().all(u8::is_ascii_whitespace) {
        LinkRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::BadRequest(format!(
                "the body must be JSON like {{\"next\": \"/\"}} ({e})"
            ))
        })?
    };
    let next = request.next.unwrap_or_else(|| "/".to_string());
    if !local_target(&next) {
        return Err(ApiError::BadRequest(
            "next must be a path on this daemon, e.g. \"/\" or \"/connect/keap?account=acme\""
                .into(),
        ));
    }
    let base = state.public_url.as_str().trim_end_matches('/');
    let body = match &state.api_keys {
        Some(keys) => {
            let token = keys.sessions.new_link(next);
            let expires =
                Utc::now() + chrono::Duration::from_std(LOGIN_LINK_TTL).unwrap_or_default();
            LinkBody {
                url: format!("{base}/login?token={token}"),
                expires_at: Some(expires.to_rfc3339_opts(SecondsFormat::Secs, true)),
            }
        }
        // Without keys every page is open: the link is the page.
        None => LinkBody {
            url: format!("{base}{next}"),
            expires_at: None,
        },
    };
    let mut r = Json(body).into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(r)
}

/// `GET /login?token=..`: spends a login link, sets the session cookie and
/// redirects to the page the link was made for.
#[utoipa::path(get, path = "/login", summary = "Open a one-time login link",
    params(("token" = String, Query, description = "the link's single-use token")),
    responses(
        (status = 303, description = "to the page the link was made for, with the session cookie set"),
        (status = 403, description = "unknown, expired or used link (HTML page)", body = String, content_type = "text/html")
    )
)]
pub async fn login(
    State(state): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let refused = || {
        pages::problem(
            StatusCode::FORBIDDEN,
            "Login link not valid",
            "This login link is unknown, expired (links last 5 minutes) or was already used. Run `tokenkeeper dashboard` (or `tokenkeeper connect PROVIDER ACCOUNT`) for a new one.",
            None,
        )
    };
    let Some(keys) = &state.api_keys else {
        // Nothing to log in to: every page is open.
        return redirect("/", None);
    };
    let Some(next) = q
        .get("token")
        .filter(|t| t.len() <= 256)
        .and_then(|t| keys.sessions.spend_link(t))
    else {
        tracing::warn!("a login link was refused (unknown, expired or already used)");
        return refused();
    };
    let secret = keys.sessions.open_session();
    let secure = if state.public_url.scheme() == "https" {
        "; Secure"
    } else {
        ""
    };
    let cookie = format!(
        "{SESSION_COOKIE}={secret}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
        SESSION_TTL.as_secs()
    );
    tracing::info!("a login link was used; browser session opened");
    redirect(&next, Some(&cookie))
}

fn redirect(to: &str, cookie: Option<&str>) -> Response {
    let mut r = StatusCode::SEE_OTHER.into_response();
    let h = r.headers_mut();
    if let Ok(v) = HeaderValue::from_str(to) {
        h.insert(header::LOCATION, v);
    }
    if let Some(v) = cookie.and_then(|c| HeaderValue::from_str(c).ok()) {
        h.insert(header::SET_COOKIE, v);
    }
    pages::html_headers(h);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_are_single_use_and_sessions_admit() {
        let s = Sessions::default();
        let t = s.new_link("/connect/keap?account=a".into());
        assert_eq!(s.spend_link("nope"), None);
        assert_eq!(s.spend_link(&t).as_deref(), Some("/connect/keap?account=a"));
        assert_eq!(s.spend_link(&t), None, "single use");
        let secret = s.open_session();
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            format!("a=b; {SESSION_COOKIE}={secret}").parse().unwrap(),
        );
        assert!(s.admits(&h));
        h.insert(
            header::COOKIE,
            format!("{SESSION_COOKIE}=x").parse().unwrap(),
        );
        assert!(!s.admits(&h));
        // An expired link is refused like a used one.
        if let Some(past) = Instant::now().checked_sub(Duration::from_secs(1)) {
            s.links
                .lock()
                .unwrap()
                .insert(digest("old"), past, "/".into());
            assert_eq!(s.spend_link("old"), None);
        }
        for _ in 0..(MAX_ENTRIES + 10) {
            s.new_link("/".into());
        }
        assert!(s.counts().0 <= MAX_ENTRIES);
    }

    #[test]
    fn targets_stay_local() {
        for ok in ["/", "/connect/keap?account=a", "/metrics"] {
            assert!(local_target(ok), "{ok}");
        }
        for bad in [
            "",
            "//evil",
            "https://evil",
            "/\\evil",
            "/login?token=x",
            "/a b",
            "evil",
        ] {
            assert!(!local_target(bad), "{bad}");
        }
    }
}
