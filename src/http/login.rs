//! Browsers behind API keys (SPEC 2, 4): with `server.api_keys_file` set,
//! a browser cannot send `Authorization: Bearer`, so it gets in through a
//! one-time login link. A client holding a key asks for one
//! (`POST /v1/login-links`, what `tokenkeeper connect` and `tokenkeeper
//! dashboard` do); opening it (`GET /login?token=..`) spends it and sets a
//! short-lived session cookie (`HttpOnly; SameSite=Strict`; over HTTPS
//! `Secure` and named with the `__Host-` prefix, because browsers scope
//! cookies to the host, not the port), then redirects to the page it was
//! made for.
//!
//! Link tokens and session secrets are 256 random bits, kept only as
//! SHA-256 digests, in memory: a restart logs every browser out, which is
//! the safe direction. Both tables are bounded.
//!
//! Each link and session carries the digest of the API key that made it
//! (the session inherits its link's): when a reload (SIGHUP) removes that
//! key, its unspent links and its sessions are dropped and refused, so
//! revoking a key also logs out the browsers it let in.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{SecondsFormat, Utc};
use sha2::{Digest, Sha256};

pub use super::answers::LinkBody;
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

/// The session cookie's name over plain HTTP.
pub const SESSION_COOKIE: &str = "tokenkeeper_session";

/// The session cookie's name over HTTPS: the `__Host-` prefix makes the
/// browser accept it only with `Secure`, `Path=/` and no `Domain`, so a
/// plain-HTTP server on another port of the same host can neither read
/// nor overwrite it (cookies are scoped to the host, not the port).
pub const SECURE_SESSION_COOKIE: &str = "__Host-tokenkeeper_session";

/// The session cookie's name for a daemon whose public URL is `https`
/// (or not).
pub fn session_cookie_name(https: bool) -> &'static str {
    if https {
        SECURE_SESSION_COOKIE
    } else {
        SESSION_COOKIE
    }
}

/// A SHA-256 digest: of a link token, a session secret or an API key.
pub type Digest32 = [u8; 32];

/// The digest under which secrets (and API keys) are kept.
pub fn digest(secret: &str) -> Digest32 {
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
    /// Drops entries whose owner `keep` refuses.
    fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) {
        self.entries.retain(|_, (_, v)| keep(v));
    }

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
    /// Target page and owner (the digest of the key that asked).
    links: Mutex<Table<(String, Digest32)>>,
    /// Owner, inherited from the link.
    sessions: Mutex<Table<Digest32>>,
}

impl Sessions {
    /// A new single-use link token for `next` (a local path), owned by the
    /// key whose digest is `owner`.
    pub fn new_link(&self, next: String, owner: Digest32) -> String {
        let token = random_secret();
        self.links.lock().unwrap_or_else(|e| e.into_inner()).insert(
            digest(&token),
            Instant::now() + LOGIN_LINK_TTL,
            (next, owner),
        );
        token
    }

    /// Spends a link token: its target and owner when it was valid, `None`
    /// when unknown, expired or already used.
    pub fn spend_link(&self, token: &str) -> Option<(String, Digest32)> {
        let (until, next) = self
            .links
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entries
            .remove(&digest(token))?;
        (until > Instant::now()).then_some(next)
    }

    /// Opens a session owned by `owner` (the link's owner); returns its
    /// secret (the cookie value).
    pub fn open_session(&self, owner: Digest32) -> String {
        let secret = random_secret();
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(digest(&secret), Instant::now() + SESSION_TTL, owner);
        secret
    }

    /// The owner of the live session whose cookie the request carries.
    /// [`super::auth::ApiKeys::admits_session`] also checks that the owner
    /// is still a valid key.
    pub fn session_owner(&self, headers: &HeaderMap, name: &str) -> Option<Digest32> {
        let d = cookie_values(headers, name).map(digest);
        let now = Instant::now();
        let mut table = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        for d in d {
            match table.entries.get(&d) {
                Some((until, owner)) if *until > now => return Some(*owner),
                Some(_) => {
                    table.entries.remove(&d);
                }
                None => {}
            }
        }
        None
    }

    /// Drops the links and sessions of keys no longer valid (after a
    /// reload); `live` tells whether a key digest still is.
    pub fn forget_owners_except(&self, live: impl Fn(&Digest32) -> bool) {
        self.links
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(_, owner)| live(owner));
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|owner| live(owner));
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
    cookie_values(headers, name).next()
}

/// Every value sent for cookie `name` (a browser sends two cookies of one
/// name when another local site set one for the same host; at most 8 are
/// looked at).
fn cookie_values<'a, 'n>(
    headers: &'a HeaderMap,
    name: &'n str,
) -> impl Iterator<Item = &'a str> + use<'a, 'n> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .filter(move |(k, _)| *k == name)
        .map(|(_, v)| v.trim())
        .take(8)
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
    headers: HeaderMap,
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
            // The guard has checked the key; the link belongs to it.
            let Some(key) = super::auth::bearer(&headers) else {
                return Err(ApiError::MissingCredentials);
            };
            let token = keys.sessions.new_link(next, digest(key));
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
    let Some((next, owner)) = q
        .get("token")
        .filter(|t| t.len() <= 256)
        .and_then(|t| keys.sessions.spend_link(t))
        .filter(|(_, owner)| keys.is_current(owner))
    else {
        tracing::warn!(
            "a login link was refused (unknown, expired, already used, or its API key was removed)"
        );
        return refused();
    };
    let secret = keys.sessions.open_session(owner);
    let https = state.public_url.scheme() == "https";
    let (name, secure) = (
        session_cookie_name(https),
        if https { "; Secure" } else { "" },
    );
    let cookie = format!(
        "{name}={secret}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
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
        let key = digest("key");
        let t = s.new_link("/connect/keap?account=a".into(), key);
        assert_eq!(s.spend_link("nope"), None);
        assert_eq!(
            s.spend_link(&t),
            Some(("/connect/keap?account=a".to_string(), key))
        );
        assert_eq!(s.spend_link(&t), None, "single use");
        let secret = s.open_session(key);
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            format!("a=b; {SESSION_COOKIE}={secret}").parse().unwrap(),
        );
        assert_eq!(s.session_owner(&h, SESSION_COOKIE), Some(key));
        assert_eq!(s.session_owner(&h, SECURE_SESSION_COOKIE), None);
        // Another local site's cookie of the same name does not hide ours.
        h.insert(
            header::COOKIE,
            format!("{SESSION_COOKIE}=x; {SESSION_COOKIE}={secret}")
                .parse()
                .unwrap(),
        );
        assert_eq!(s.session_owner(&h, SESSION_COOKIE), Some(key));
        // Removing the key drops its sessions and links.
        let unspent = s.new_link("/".into(), key);
        let other = digest("other");
        let kept = s.new_link("/".into(), other);
        s.forget_owners_except(|o| *o == other);
        assert_eq!(s.session_owner(&h, SESSION_COOKIE), None);
        assert_eq!(s.spend_link(&unspent), None);
        assert!(s.spend_link(&kept).is_some());
        h.insert(
            header::COOKIE,
            format!("{SESSION_COOKIE}=x").parse().unwrap(),
        );
        assert_eq!(s.session_owner(&h, SESSION_COOKIE), None);
        // An expired link is refused like a used one.
        if let Some(past) = Instant::now().checked_sub(Duration::from_secs(1)) {
            s.links
                .lock()
                .unwrap()
                .insert(digest("old"), past, ("/".into(), key));
            assert_eq!(s.spend_link("old"), None);
        }
        for _ in 0..(MAX_ENTRIES + 10) {
            s.new_link("/".into(), key);
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
