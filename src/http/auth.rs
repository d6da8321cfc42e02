//! Guards made from the request head: the site check that keeps web pages
//! out of `/v1/*`, `/proxy/*` and `/connect/*` (`Sec-Fetch-Site`, `Origin`),
//! and, when `server.api_keys_file` is set, the key (or, for browsers, the
//! session cookie of [`super::login`]) every other path but `/healthz`,
//! `/readyz`, `/callback` and `/login` needs. Keys are kept only as
//! SHA-256 digests and compared in constant time.

use std::path::Path;

use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderName};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::error::ApiError;
use super::AppState;

/// The keys allowed on `/v1/*` (and `/proxy/*`), as digests, and the
/// browser sessions opened with login links. The digests are replaced as a
/// whole on reload (SIGHUP; a std RwLock, held only to compare digests);
/// the links and sessions of a key that a reload removes are dropped, and
/// each use checks that its key is still valid.
pub struct ApiKeys {
    digests: std::sync::RwLock<Vec<[u8; 32]>>,
    /// Login links and browser sessions (only meaningful with keys).
    pub sessions: super::login::Sessions,
}

impl ApiKeys {
    /// One key per line; blank lines and `#` comments are ignored.
    pub fn load(path: &Path) -> std::io::Result<ApiKeys> {
        Ok(ApiKeys {
            digests: std::sync::RwLock::new(Self::read(path)?),
            sessions: Default::default(),
        })
    }

    /// Re-reads `path` and, if it holds keys, makes them the only valid
    /// ones; on error the current keys stay. Returns how many keys there are.
    pub fn reload(&self, path: &Path) -> std::io::Result<usize> {
        let fresh = Self::read(path)?;
        let n = fresh.len();
        *self.digests.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        self.sessions.forget_owners_except(|d| self.is_current(d));
        Ok(n)
    }

    fn read(path: &Path) -> std::io::Result<Vec<[u8; 32]>> {
        let text = std::fs::read_to_string(path)?;
        let digests: Vec<[u8; 32]> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|k| Sha256::digest(k.as_bytes()).into())
            .collect();
        if digests.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the file holds no key (one key per line)",
            ));
        }
        Ok(digests)
    }

    /// Constant time in the key and across all keys.
    pub fn matches(&self, presented: &str) -> bool {
        self.is_current(&Sha256::digest(presented.as_bytes()).into())
    }

    /// Whether `d` is the digest of a currently valid key (constant time
    /// across all keys).
    pub fn is_current(&self, d: &[u8; 32]) -> bool {
        let mut any = subtle::Choice::from(0u8);
        for k in self
            .digests
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            any |= k.ct_eq(d);
        }
        any.into()
    }
}

impl ApiKeys {
    /// Whether the request carries a live session cookie whose key is still
    /// valid (`https`: the daemon's public URL is HTTPS, which names the
    /// cookie).
    pub fn admits_session(&self, headers: &HeaderMap, https: bool) -> bool {
        self.sessions
            .session_owner(headers, super::login::session_cookie_name(https))
            .is_some_and(|owner| self.is_current(&owner))
    }
}

/// The bearer credential of a request, if any (`None` also for other schemes).
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
}

/// The daemon's own origins: what a same-origin request from the dashboard
/// would send.
fn own_origin(state: &AppState, origin: &str) -> bool {
    let public = state.public_url.origin().ascii_serialization();
    origin == public
        || url::Url::parse(origin).is_ok_and(|u| {
            u.port_or_known_default() == state.public_url.port_or_known_default()
                && u.host_str()
                    .is_some_and(|h| state.allowed_hosts.iter().any(|a| a == h))
        })
}

/// Fetch Metadata: where a browser says the request comes from.
const SEC_FETCH_SITE: HeaderName = HeaderName::from_static("sec-fetch-site");

/// SPEC 4, on `/v1/*`, `/proxy/*` and `/connect/*`: requests a browser
/// marks as coming from another site are refused. Browsers omit `Origin`
/// on GET navigations and subresources (`<img src=.../proxy/...>`), but
/// send `Sec-Fetch-Site` on all of them; programs send neither. Two header
/// lookups: this runs on the token fast path.
pub fn check_site(state: &AppState, req: &Request) -> Option<Response> {
    let headers = req.headers();
    if let Some(site) = headers.get(SEC_FETCH_SITE) {
        let site = site.as_bytes();
        if site.eq_ignore_ascii_case(b"cross-site") || site.eq_ignore_ascii_case(b"same-site") {
            tracing::warn!(
                path = req.uri().path(),
                "cross-site request refused (Sec-Fetch-Site)"
            );
            return Some(forbidden());
        }
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        if !origin.to_str().is_ok_and(|o| own_origin(state, o)) {
            tracing::warn!(
                path = req.uri().path(),
                "cross-origin request refused (Origin)"
            );
            return Some(forbidden());
        }
    }
    None
}

fn forbidden() -> Response {
    ApiError::Forbidden(
        "requests from other web sites are refused; call the API from a local program, or open the daemon's own pages".into(),
    )
    .into_response()
}

/// `/v1/*` and `/proxy/*` guard: cross-site requests are refused (a
/// browser page must not read tokens, whatever DNS says), then the bearer
/// credential is checked (SPEC 5, API keys). `Some` is the refusal.
pub fn check_v1(state: &AppState, req: &Request) -> Option<Response> {
    if let Some(refused) = check_site(state, req) {
        return Some(refused);
    }
    check_bearer(state, req.headers())
        .err()
        .map(IntoResponse::into_response)
}

/// Paths open without a key even when API keys are set: probes, the
/// provider's redirect (bound to its browser by the flow cookie), and the
/// login link itself.
fn open_path(path: &str) -> bool {
    matches!(path, "/healthz" | "/readyz" | "/callback" | "/login")
}

/// Every path but `/v1/*` and `/proxy/*` (checked by [`check_v1`]): with
/// API keys set, a key or a browser session is needed, except on
/// `/healthz`, `/readyz`, `/callback` and `/login`. Browsers asking for
/// HTML get a page saying how to log in; others the JSON 401.
pub fn check_page(state: &AppState, req: &Request) -> Option<Response> {
    let keys = state.api_keys.as_ref()?;
    let path = req.uri().path();
    if open_path(path) {
        return None;
    }
    if bearer(req.headers()).is_some() {
        return check_bearer(state, req.headers())
            .err()
            .map(IntoResponse::into_response);
    }
    let https = state.public_url.scheme() == "https";
    if keys.admits_session(req.headers(), https) {
        return None;
    }
    let wants_html = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/html"));
    if wants_html {
        let mut r = super::pages::problem(
            axum::http::StatusCode::UNAUTHORIZED,
            "Login needed",
            "This tokenkeeper requires an API key. Run `tokenkeeper dashboard` (or `tokenkeeper connect PROVIDER ACCOUNT`) on the daemon's machine and open the one-time link it prints.",
            None,
        );
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            axum::http::HeaderValue::from_static("Bearer realm=\"tokenkeeper\""),
        );
        return Some(r);
    }
    Some(ApiError::MissingCredentials.into_response())
}

/// Checks the bearer credential where one is accepted (SPEC 5).
pub fn check_bearer(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let presented = bearer(headers);
    if let Some(token) = presented {
        if state.engine.refuse_refresh_token_as_bearer(token) {
            return Err(ApiError::refresh_token_presented());
        }
    }
    let Some(keys) = &state.api_keys else {
        return Ok(());
    };
    match presented {
        None => Err(ApiError::MissingCredentials),
        Some(k) if keys.matches(k) => Ok(()),
        Some(_) => Err(ApiError::InvalidToken {
            message: "the API key is not valid; use a key from server.api_keys_file".into(),
            www_authenticate: "Bearer realm=\"tokenkeeper\", error=\"invalid_token\"".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("keys");
        std::fs::write(&p, "# comment\nalpha\n\n  beta  \n").unwrap();
        let k = ApiKeys::load(&p).unwrap();
        assert!(k.matches("alpha"));
        assert!(k.matches("beta"));
        assert!(!k.matches("alph"));
        assert!(!k.matches(""));
        std::fs::write(&p, "\n# none\n").unwrap();
        assert!(ApiKeys::load(&p).is_err());
    }

    #[test]
    fn bearer_parsing() {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "Bearer abc".parse().unwrap());
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer(&h), None);
    }
}
