//! Browser authorization: `/connect/{provider}` starts it, `/callback`
//! finishes it.
//!
//! The callback has two named phases: `check` (the state is consumed only
//! together with the browser cookie that started it; nothing else changes) and
//! `exchange_and_store` (the code is redeemed and the grant committed).
//! A failure in either leaves nothing half-written.

use std::collections::HashMap;

use axum::extract::{Path, Query, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use sha2::{Digest, Sha256};

use super::api::DEFAULT_ACCOUNT;
use super::pages;
use super::AppState;
use crate::config::valid_account;
use crate::store::{PendingAuthorization, PendingTake};

/// How long a started authorization may take: long enough to log in and
/// consent, short enough that a leaked state is soon worthless.
pub(super) const AUTHORIZATION_TTL: chrono::Duration = chrono::Duration::minutes(10);

/// Cookie binding a flow to the browser that started it.
const FLOW_COOKIE: &str = "tokenkeeper_flow";

fn sha256_hex(s: &str) -> String {
    Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `GET /connect/{provider}?account=NAME`.
#[utoipa::path(get, path = "/connect/{provider}", summary = "Start a browser authorization",
    params(
        ("provider" = String, Path, description = "provider name from the config"),
        ("account" = Option<String>, Query, description = "account name (default: default)")
    ),
    responses(
        (status = 302, description = "to the provider's authorization page (state, PKCE S256)"),
        (status = 400, description = "invalid account name, or a client-credentials provider: nothing to authorize (HTML page)", body = String, content_type = "text/html"),
        (status = 401, description = "API keys are set and neither a key nor a browser session (see /login) was presented", body = crate::http::error::ErrorBody),
        (status = 403, description = "cross-site request (Sec-Fetch-Site cross-site or same-site, or a foreign Origin)", body = crate::http::error::ErrorBody),
        (status = 404, description = "unknown provider (HTML page)", body = String, content_type = "text/html")
    )
)]
pub async fn connect(
    State(state): State<AppState>,
    Path(provider): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let settings = state.engine.settings();
    let Some(p) = settings.providers.get(&provider) else {
        return pages::problem(
            StatusCode::NOT_FOUND,
            "Unknown provider",
            &format!("No provider named \"{provider}\" is configured. Add a [providers.{provider}] table to the config, or pick one on the start page."),
            Some("/"),
        );
    };
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
    if let Some(why) = p.config.authorization_refusal() {
        return pages::problem(
            StatusCode::BAD_REQUEST,
            "Nothing to authorize",
            &format!("{why}."),
            Some("/"),
        );
    }
    let redirect_uri = state.redirect_uri();
    let start = p.authorization_start(&redirect_uri);
    let browser_secret = format!("{:032x}", rand::random::<u128>());
    let now = Utc::now();
    let pending = PendingAuthorization {
        state: start.state.clone(),
        provider: provider.clone(),
        account: account.to_string(),
        pkce_verifier: start.pkce_verifier,
        redirect_uri: redirect_uri.to_string(),
        browser_hash: sha256_hex(&browser_secret),
        created_at: now,
        expires_at: now + AUTHORIZATION_TTL,
    };
    if let Err(e) = state.engine.store().insert_pending(&pending).await {
        tracing::error!(error = %e, "cannot store a pending authorization");
        return pages::problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Cannot start the authorization",
            "tokenkeeper could not write to its database; see its log, then try again.",
            None,
        );
    }
    tracing::info!(provider = %provider, account, "authorization started");
    let secure = if state.public_url.scheme() == "https" {
        "; Secure"
    } else {
        ""
    };
    let cookie = format!(
        "{FLOW_COOKIE}={browser_secret}; Path=/; HttpOnly; SameSite=Lax; Max-Age={}{secure}",
        AUTHORIZATION_TTL.num_seconds()
    );
    let mut r = StatusCode::FOUND.into_response();
    let h = r.headers_mut();
    if let Ok(v) = HeaderValue::from_str(start.url.as_str()) {
        h.insert(header::LOCATION, v);
    }
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        h.insert(header::SET_COOKIE, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn flow_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == FLOW_COOKIE)
        .map(|(_, v)| v.to_string())
}

/// `GET /callback?code=..&state=..` (or `?error=..&state=..`).
#[utoipa::path(get, path = "/callback", summary = "Finish a browser authorization",
    params(
        ("code" = Option<String>, Query, description = "authorization code"),
        ("state" = Option<String>, Query, description = "the state sent to the provider"),
        ("error" = Option<String>, Query, description = "provider error, e.g. access_denied"),
        ("error_description" = Option<String>, Query, description = "provider error text")
    ),
    responses(
        (status = 200, description = "authorized; grant stored (HTML page)", body = String, content_type = "text/html"),
        (status = 400, description = "bad, expired or reused state, other browser, provider error: nothing stored (HTML page)", body = String, content_type = "text/html"),
        (status = 502, description = "the provider refused the code: nothing stored (HTML page)", body = String, content_type = "text/html")
    )
)]
pub async fn callback(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Response {
    let q = match read_query(raw.as_deref().unwrap_or_default()) {
        Ok(q) => q,
        Err(problem) => {
            return pages::problem(
                StatusCode::BAD_REQUEST,
                "Authorization failed",
                &problem.to_string(),
                Some("/"),
            )
        }
    };
    let pending = match check(&state, &headers, &q).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    let raw = raw.unwrap_or_default();
    exchange_and_store(&state, pending, &q.outcome, &raw).await
}

/// Longest `state` accepted (ours are 43 characters).
const MAX_STATE: usize = 512;
/// Longest authorization code accepted.
const MAX_CODE: usize = 4096;
/// How much of a provider's `error` / `error_description` is shown: they
/// come from the URL, so anyone can put anything there.
const MAX_ERROR_TEXT: usize = 300;

/// The provider's redirect to `/callback` (RFC 6749 4.1.2, 4.1.2.1), read
/// and checked for shape before anything is looked up or spent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallbackQuery {
    /// Matches the pending authorization.
    pub state: String,
    pub outcome: CallbackOutcome,
}

/// What the provider sent back beside the state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallbackOutcome {
    /// An authorization code to redeem.
    Code(String),
    /// The provider's `error` (e.g. `access_denied`), shortened to one line.
    Error {
        error: String,
        description: Option<String>,
    },
    /// Neither a code nor an error (or a code too long to be real).
    NoCode,
}

/// Why a callback query cannot be matched to any authorization.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallbackQueryError {
    #[error("The callback has no state parameter, so it cannot be matched to an authorization started here. Start again from the tokenkeeper page.")]
    NoState,
    #[error("The callback carries a parameter more than once (RFC 6749 forbids it), so it was not trusted. Start again from the tokenkeeper page.")]
    Repeated,
}

/// Reads the raw query of a callback (or the query of an address pasted by
/// a person). Pure: the fuzz target `callback_query` runs it on any input.
pub fn read_query(raw: &str) -> Result<CallbackQuery, CallbackQueryError> {
    let mut state = None;
    let mut code = None;
    let mut error = None;
    let mut description = None;
    for (k, v) in url::form_urlencoded::parse(raw.as_bytes()) {
        let slot = match &*k {
            "state" => &mut state,
            "code" => &mut code,
            "error" => &mut error,
            "error_description" => &mut description,
            _ => continue,
        };
        if slot.replace(v.into_owned()).is_some() {
            return Err(CallbackQueryError::Repeated);
        }
    }
    let state = state
        .filter(|s| !s.is_empty() && s.len() <= MAX_STATE)
        .ok_or(CallbackQueryError::NoState)?;
    let outcome = match (error, code) {
        (Some(error), _) => CallbackOutcome::Error {
            error: one_line(&error),
            description: description.map(|d| one_line(&d)),
        },
        (None, Some(code)) if !code.is_empty() && code.len() <= MAX_CODE => {
            CallbackOutcome::Code(code)
        }
        (None, _) => CallbackOutcome::NoCode,
    };
    Ok(CallbackQuery { state, outcome })
}

/// `text` on one line, at most [`MAX_ERROR_TEXT`] characters.
fn one_line(text: &str) -> String {
    let mut out: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_ERROR_TEXT)
        .collect();
    if text.chars().count() > MAX_ERROR_TEXT {
        out.push('…');
    }
    out
}

/// Phase 1: consume the state if it belongs to this browser. Once taken it
/// is gone whatever the outcome (single use); a callback without the
/// right cookie leaves it for the browser that started the flow.
async fn check(
    state: &AppState,
    headers: &HeaderMap,
    q: &CallbackQuery,
) -> Result<PendingAuthorization, Response> {
    let st = &q.state;
    // The cookie is checked before the state is spent: someone holding
    // the callback URL without the cookie must not burn the pending
    // authorization of the browser that started it.
    let browser_hash = flow_cookie(headers)
        .map(|c| sha256_hex(&c))
        .unwrap_or_default();
    let taken = state
        .engine
        .store()
        .take_pending_for_browser(st, &browser_hash, Utc::now())
        .await;
    let pending = match taken {
        Ok(PendingTake::Taken(p)) => p,
        Ok(PendingTake::OtherBrowser) => {
            tracing::warn!("callback arrived without the cookie of the browser that started it; refused, the authorization stays pending for that browser");
            return Err(pages::problem(
                StatusCode::BAD_REQUEST,
                "Authorization failed",
                "This authorization was started in another browser (or cookies are blocked), so it was not accepted here. Finish it in the browser that started it, or start again in this one. If it was started with `tokenkeeper connect --paste`, paste this page's address at that command's prompt.",
                Some("/"),
            ));
        }
        Ok(PendingTake::Unknown) => {
            return Err(pages::problem(
                StatusCode::BAD_REQUEST,
                "Authorization failed",
                "This authorization link is unknown, expired (after 10 minutes) or was already used. Start again from the tokenkeeper page.",
                Some("/"),
            ))
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot read pending authorizations");
            return Err(pages::problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Authorization failed",
                "tokenkeeper could not read its database; see its log.",
                None,
            ));
        }
    };
    let retry = format!("/connect/{}?account={}", pending.provider, pending.account);
    if let CallbackOutcome::Error {
        error: err,
        description,
    } = &q.outcome
    {
        let desc = description
            .as_ref()
            .map(|d| format!(" ({d})"))
            .unwrap_or_default();
        let what = if err == "access_denied" {
            format!("Access was denied at the provider{desc}. Nothing was stored. If that was a mistake, connect again and approve.")
        } else {
            format!("The provider answered with the error \"{err}\"{desc}. Nothing was stored. Try again; if it persists, check the provider settings.")
        };
        tracing::info!(provider = %pending.provider, account = %pending.account, error = %err, "authorization ended with a provider error");
        return Err(pages::problem(
            StatusCode::BAD_REQUEST,
            "Authorization not completed",
            &what,
            Some(&retry),
        ));
    }
    Ok(pending)
}

/// Phase 2: redeem the code and commit the grant.
async fn exchange_and_store(
    state: &AppState,
    pending: PendingAuthorization,
    outcome: &CallbackOutcome,
    raw_query: &str,
) -> Response {
    let retry = format!("/connect/{}?account={}", pending.provider, pending.account);
    let CallbackOutcome::Code(code) = outcome else {
        return pages::problem(
            StatusCode::BAD_REQUEST,
            "Authorization failed",
            "The callback carries no authorization code. Nothing was stored. Start again.",
            Some(&retry),
        );
    };
    let settings = state.engine.settings();
    let Some(provider) = settings.providers.get(&pending.provider) else {
        return pages::problem(
            StatusCode::BAD_REQUEST,
            "Authorization failed",
            "The provider of this authorization is no longer configured.",
            Some("/"),
        );
    };
    let redirect_uri = match url::Url::parse(&pending.redirect_uri) {
        Ok(u) => u,
        Err(_) => state.redirect_uri(),
    };
    let mut grant = match provider
        .exchange_code(code, pending.pkce_verifier.as_ref(), &redirect_uri)
        .await
    {
        Ok(g) => g,
        Err(e) => {
            tracing::warn!(provider = %pending.provider, account = %pending.account, error = %e, "code exchange failed");
            return pages::problem(
                StatusCode::BAD_GATEWAY,
                "Authorization failed",
                &format!("The provider did not accept the authorization code: {e}. Nothing was stored. Start again."),
                Some(&retry),
            );
        }
    };
    grant.extra.extend(provider.callback_extras(raw_query));
    match state
        .engine
        .authorized(&pending.provider, &pending.account, &grant)
        .await
    {
        Ok(()) => {
            tracing::info!(provider = %pending.provider, account = %pending.account, "authorized; grant stored");
            pages::connected(
                &pending.provider,
                &pending.account,
                grant.refresh_token.is_some(),
            )
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot store the new grant");
            pages::problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Authorization failed",
                "The provider accepted, but tokenkeeper could not store the grant; see its log, then connect again.",
                Some(&retry),
            )
        }
    }
}

#[cfg(test)]
mod query_tests {
    use super::*;

    #[test]
    fn a_callback_query_is_read_by_shape() {
        let q = read_query("code=abc&state=s1&extra=1").unwrap();
        assert_eq!(q.state, "s1");
        assert_eq!(q.outcome, CallbackOutcome::Code("abc".into()));
        let q = read_query("state=s1&error=access_denied&error_description=no%0Athanks").unwrap();
        assert_eq!(
            q.outcome,
            CallbackOutcome::Error {
                error: "access_denied".into(),
                description: Some("no thanks".into())
            }
        );
        assert_eq!(
            read_query("state=s1").unwrap().outcome,
            CallbackOutcome::NoCode
        );
        assert_eq!(read_query("code=abc"), Err(CallbackQueryError::NoState));
        assert_eq!(
            read_query("code=a&state="),
            Err(CallbackQueryError::NoState)
        );
        assert_eq!(
            read_query("code=a&state=s&state=t"),
            Err(CallbackQueryError::Repeated)
        );
        let long = "x".repeat(5000);
        assert_eq!(
            read_query(&format!("state=s&code={long}")).unwrap().outcome,
            CallbackOutcome::NoCode
        );
        let CallbackOutcome::Error { error, .. } = read_query(&format!("state=s&error={long}"))
            .unwrap()
            .outcome
        else {
            panic!("an error outcome");
        };
        assert!(error.chars().count() <= MAX_ERROR_TEXT + 1);
    }
}
