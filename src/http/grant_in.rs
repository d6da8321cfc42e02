//! Grants that enter without the browser reaching the daemon (SPEC 10):
//! `import` (a refresh token another program holds) and the headless
//! authorization of `connect --paste` (`paste_start`, `paste_finish`).
//!
//! A pasted authorization is the browser flow with the cookie replaced by
//! a secret only the starting command holds: the same pending row (state,
//! PKCE verifier, redirect URI), consumed once, and the same exchange and
//! landing as `/callback`. Handlers stay thin: the token checks and the
//! import live in `refresh::import`, the query reading in
//! `callback::read_query`.
//!
//! Must not: put a token, code or flow secret in a log line or an error
//! answer, or store anything when a check fails.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::Utc;
use secrecy::SecretString;
use sha2::{Digest, Sha256};

use super::answers::{
    ImportBody, ImportRequest, PasteFinishBody, PasteFinishRequest, PasteStartBody,
};
use super::api::check_names;
use super::callback::{read_query, CallbackOutcome, CallbackQuery, AUTHORIZATION_TTL};
use super::error::ApiError;
use super::AppState;
use crate::refresh::import::ImportError;
use crate::refresh::AuthorizedBy;
use crate::store::{PendingAuthorization, PendingTake};

/// Longest pasted text read: an address with a 4 KiB code and a state.
const MAX_PASTED: usize = 16 * 1024;

fn refused(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::GrantRefused {
        status,
        code,
        message: message.into(),
    }
}

fn no_store(body: impl serde::Serialize) -> Response {
    let mut r = Json(body).into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// A JSON body; what a parse error says is not echoed, since the body
/// holds a secret.
fn read_json<T: serde::de::DeserializeOwned>(body: &[u8], shape: &str) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|_| ApiError::BadRequest(format!("the body must be a JSON object {shape}")))
}

#[utoipa::path(post, path = "/v1/connections/{provider}/{account}/import", summary = "Adopt a refresh token another program holds",
    params(("provider" = String, Path, description = "provider name from the config"), ("account" = String, Path, description = "account name")),
    request_body = ImportRequest,
    responses(
        (status = 200, description = "the token was redeemed once and the grant stored", body = ImportBody),
        (status = 400, description = "not_a_refresh_token (junk, an access token), refresh_token_rejected by the provider, or nothing_to_authorize (a client-credentials provider): nothing stored", body = crate::http::error::ErrorBody),
        (status = 404, description = "unknown_provider", body = crate::http::error::ErrorBody),
        (status = 401, description = "a bearer credential was presented and is wrong, or API keys are set and none was presented", body = crate::http::error::ErrorBody),
        (status = 403, description = "cross-origin request", body = crate::http::error::ErrorBody),
        (status = 409, description = "connection_exists: the connection has a working grant and replace is false, or another process stored one while the import was at the provider (the imported grant is then kept as ACCOUNT-imported, the message says so)", body = crate::http::error::ErrorBody),
        (status = 502, description = "provider_refused: a configuration problem; nothing stored", body = crate::http::error::ErrorBody),
        (status = 503, description = "refresh_failed: the provider could not be reached; nothing stored, try again", body = crate::http::error::ErrorBody)
    ))]
/// `POST /v1/connections/{provider}/{account}/import`.
pub async fn import(
    State(state): State<AppState>,
    Path((provider, account)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response, ApiError> {
    check_names(&provider, &account)?;
    let req: ImportRequest = read_json(&body, "{\"refresh_token\": \"...\", \"replace\": false}")?;
    let token = SecretString::from(req.refresh_token);
    let done = state
        .engine
        .import(&provider, &account, &token, req.replace)
        .await
        .map_err(|e| import_error(e, &provider, &account))?;
    Ok(no_store(ImportBody {
        provider,
        account,
        rotated: done.rotated,
        replaced: done.replaced,
        expires_at: done.expires_at,
        access_token_usable: done.usable,
    }))
}

fn import_error(e: ImportError, provider: &str, account: &str) -> ApiError {
    let message = e.to_string();
    match e {
        ImportError::UnknownProvider(p) => ApiError::UnknownProvider(p),
        ImportError::Shape(_)
        | ImportError::OurAccessToken { .. }
        | ImportError::OurRefreshToken { .. } => {
            refused(StatusCode::BAD_REQUEST, "not_a_refresh_token", message)
        }
        ImportError::Exists { .. } => refused(StatusCode::CONFLICT, "connection_exists", message),
        ImportError::NothingToAuthorize(_) => {
            refused(StatusCode::BAD_REQUEST, NOTHING_TO_AUTHORIZE, message)
        }
        ImportError::Rejected { .. } => {
            tracing::info!(
                provider,
                account,
                "import refused: the provider rejected the token"
            );
            refused(StatusCode::BAD_REQUEST, "refresh_token_rejected", message)
        }
        ImportError::Refused { .. } => {
            tracing::warn!(provider, account, "import refused: {message}");
            refused(StatusCode::BAD_GATEWAY, "provider_refused", message)
        }
        ImportError::Transient { retry_after, .. } => ApiError::RefreshFailed {
            message,
            retry_after: retry_after.unwrap_or(std::time::Duration::from_secs(5)),
        },
        ImportError::Store(s) => ApiError::Internal(s.to_string()),
        ImportError::StorageDown => ApiError::RefreshFailed {
            message,
            retry_after: std::time::Duration::from_secs(5),
        },
        ImportError::StoredMeanwhile { .. } => {
            refused(StatusCode::CONFLICT, "connection_exists", message)
        }
    }
}

/// Error code of an authorization or import asked of a provider whose
/// tokens the daemon obtains itself (`grant = "client_credentials"`).
pub const NOTHING_TO_AUTHORIZE: &str = "nothing_to_authorize";

/// The secret binding a pasted flow to its command, as stored in the
/// pending row's browser binding; domain-separated from browser cookies.
fn paste_binding(secret: &str) -> String {
    Sha256::digest(format!("paste:{secret}").as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[utoipa::path(post, path = "/v1/connections/{provider}/{account}/paste/start", summary = "Start a headless authorization (connect --paste)",
    params(("provider" = String, Path, description = "provider name from the config"), ("account" = String, Path, description = "account name")),
    responses(
        (status = 200, description = "the authorization URL to open anywhere, and the secret that finishes it", body = PasteStartBody),
        (status = 400, description = "malformed account name, or nothing_to_authorize (a client-credentials provider)", body = crate::http::error::ErrorBody),
        (status = 401, description = "a bearer credential was presented and is wrong, or API keys are set and none was presented", body = crate::http::error::ErrorBody),
        (status = 403, description = "cross-origin request", body = crate::http::error::ErrorBody),
        (status = 404, description = "unknown_provider", body = crate::http::error::ErrorBody)
    ))]
/// `POST /v1/connections/{provider}/{account}/paste/start`.
pub async fn paste_start(
    State(state): State<AppState>,
    Path((provider, account)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    check_names(&provider, &account)?;
    let settings = state.engine.settings();
    let Some(p) = settings.providers.get(&provider) else {
        return Err(ApiError::UnknownProvider(provider));
    };
    if let Some(why) = p.config.authorization_refusal() {
        return Err(refused(StatusCode::BAD_REQUEST, NOTHING_TO_AUTHORIZE, why));
    }
    let redirect_uri = state.redirect_uri();
    let start = p.authorization_start(&redirect_uri);
    let secret = format!("{:032x}", rand::random::<u128>());
    let now = Utc::now();
    let pending = PendingAuthorization {
        state: start.state,
        provider: provider.clone(),
        account: account.clone(),
        pkce_verifier: start.pkce_verifier,
        redirect_uri: redirect_uri.to_string(),
        browser_hash: paste_binding(&secret),
        created_at: now,
        expires_at: now + AUTHORIZATION_TTL,
    };
    state
        .engine
        .store()
        .insert_pending(&pending)
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    tracing::info!(provider = %provider, account = %account, "headless authorization started");
    Ok(no_store(PasteStartBody {
        authorization_url: start.url.to_string(),
        redirect_uri: redirect_uri.to_string(),
        flow_secret: secret,
        expires_at: pending.expires_at,
    }))
}

/// Why a pasted text is not an authorization response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PasteError {
    #[error("nothing was pasted; paste the whole address the browser ended on after you approved")]
    Empty,
    #[error("the pasted text is too long to be the address the browser ended on; paste that address alone")]
    TooLong,
    #[error("the pasted text is not an address tokenkeeper can read; paste the whole address the browser ended on (it contains code= and state=)")]
    Unreadable,
    #[error("the pasted address has no state parameter; paste the whole address the browser ended on (it contains code= and state=)")]
    NoState,
    #[error("the pasted address carries a parameter more than once, so it was not trusted; paste the address the browser ended on, unchanged")]
    Repeated,
}

/// Reads what a person pasted: the full address the browser ended on
/// (query, or fragment for a provider answering there), just its query
/// (`code=...&state=...`, with or without `?`), or the code and the state
/// separated by whitespace. Pure; the query is read by `read_query`, the
/// same parser as `/callback`.
pub fn read_pasted(text: &str) -> Result<CallbackQuery, PasteError> {
    if text.len() > MAX_PASTED {
        return Err(PasteError::TooLong);
    }
    let t = text.trim();
    if t.is_empty() {
        return Err(PasteError::Empty);
    }
    let query = if t.contains("://") {
        let url = url::Url::parse(t).map_err(|_| PasteError::Unreadable)?;
        let has_state =
            |q: &str| url::form_urlencoded::parse(q.as_bytes()).any(|(k, _)| k == "state");
        match (url.query(), url.fragment()) {
            (Some(q), _) if has_state(q) => q.to_string(),
            (_, Some(f)) if has_state(f) => f.to_string(),
            (Some(q), _) => q.to_string(),
            _ => return Err(PasteError::NoState),
        }
    } else if t.contains('=') {
        t.trim_start_matches('?').to_string()
    } else {
        let mut words = t.split_whitespace();
        match (words.next(), words.next(), words.next()) {
            (Some(code), Some(state), None) => url::form_urlencoded::Serializer::new(String::new())
                .append_pair("code", code)
                .append_pair("state", state)
                .finish(),
            _ => return Err(PasteError::Unreadable),
        }
    };
    read_query(&query).map_err(|e| match e {
        super::callback::CallbackQueryError::NoState => PasteError::NoState,
        super::callback::CallbackQueryError::Repeated => PasteError::Repeated,
    })
}

#[utoipa::path(post, path = "/v1/connections/{provider}/{account}/paste/finish", summary = "Finish a headless authorization with the pasted address",
    params(("provider" = String, Path, description = "provider name from the config"), ("account" = String, Path, description = "account name")),
    request_body = PasteFinishRequest,
    responses(
        (status = 200, description = "code exchanged, grant stored", body = PasteFinishBody),
        (status = 400, description = "authorization_failed: unreadable paste, unknown/expired/used state, another flow's state, provider error: nothing stored; invalid_request: malformed body or name", body = crate::http::error::ErrorBody),
        (status = 401, description = "a bearer credential was presented and is wrong, or API keys are set and none was presented", body = crate::http::error::ErrorBody),
        (status = 403, description = "cross-origin request", body = crate::http::error::ErrorBody),
        (status = 404, description = "unknown_provider", body = crate::http::error::ErrorBody),
        (status = 502, description = "authorization_failed: the provider refused the code; nothing stored", body = crate::http::error::ErrorBody)
    ))]
/// `POST /v1/connections/{provider}/{account}/paste/finish`: phase 1
/// checks (state and binding, consumed once), phase 2 exchanges and
/// stores, as `/callback` does.
pub async fn paste_finish(
    State(state): State<AppState>,
    Path((provider, account)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response, ApiError> {
    check_names(&provider, &account)?;
    let req: PasteFinishRequest =
        read_json(&body, "{\"flow_secret\": \"...\", \"pasted\": \"...\"}")?;
    let failed = |m: String| refused(StatusCode::BAD_REQUEST, "authorization_failed", m);
    let q = read_pasted(&req.pasted).map_err(|e| failed(format!("{e}; nothing was stored")))?;
    let again = format!("run `tokenkeeper connect {provider} {account} --paste` again");
    let taken = state
        .engine
        .store()
        .take_pending_for_browser(&q.state, &paste_binding(&req.flow_secret), Utc::now())
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let pending = match taken {
        PendingTake::Taken(p) => p,
        PendingTake::OtherBrowser => {
            tracing::warn!(provider = %provider, account = %account, "a pasted address belongs to another authorization; refused, that one stays pending");
            return Err(failed(format!("the pasted address belongs to another authorization (started in a browser or by another command), not to the one this command started; nothing was stored. Paste the address of the authorization opened from the URL this command printed, or {again}")));
        }
        PendingTake::Unknown => {
            return Err(failed(format!("the pasted address belongs to no pending authorization: it expired (after 10 minutes), was already used, or its state was altered; nothing was stored. {again}")));
        }
    };
    if pending.provider != provider || pending.account != account {
        return Err(failed(format!("the pasted address belongs to the authorization of {}/{}, not {provider}/{account}; nothing was stored. {again}", pending.provider, pending.account)));
    }
    let code = match &q.outcome {
        CallbackOutcome::Code(code) => code,
        CallbackOutcome::Error { error, description } => {
            let desc = description
                .as_ref()
                .map(|d| format!(" ({d})"))
                .unwrap_or_default();
            tracing::info!(provider = %provider, account = %account, error = %error, "headless authorization ended with a provider error");
            return Err(failed(if error == "access_denied" {
                format!("access was denied at the provider{desc}; nothing was stored. If that was a mistake, {again} and approve")
            } else {
                format!("the provider answered with the error \"{error}\"{desc}; nothing was stored. {again}; if it persists, check the provider settings")
            }));
        }
        CallbackOutcome::NoCode => {
            return Err(failed(format!(
                "the pasted address carries no authorization code; nothing was stored. {again}"
            )))
        }
    };
    let settings = state.engine.settings();
    let Some(p) = settings.providers.get(&provider) else {
        return Err(ApiError::UnknownProvider(provider));
    };
    let redirect_uri =
        url::Url::parse(&pending.redirect_uri).unwrap_or_else(|_| state.redirect_uri());
    let mut grant = p
        .exchange_code(code, pending.pkce_verifier.as_ref(), &redirect_uri)
        .await
        .map_err(|e| {
            tracing::warn!(provider = %provider, account = %account, error = %e, "code exchange failed");
            refused(
                StatusCode::BAD_GATEWAY,
                "authorization_failed",
                format!("the provider did not accept the authorization code: {e}; nothing was stored. {again}"),
            )
        })?;
    let pasted_query = req.pasted.trim();
    let pasted_query = pasted_query
        .split_once('?')
        .map_or(pasted_query, |(_, q)| q);
    let pasted_query = pasted_query.split('#').next().unwrap_or_default();
    grant.extra.extend(p.callback_extras(pasted_query));
    state
        .engine
        .authorized_by(&provider, &account, &grant, AuthorizedBy::PastedAddress)
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    // The `authorized` notification logs the landing.
    Ok(no_store(PasteFinishBody {
        provider,
        account,
        refresh_token: grant.refresh_token.is_some(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pasted_text_is_read_in_every_shape() {
        let code = |t: &str| read_pasted(t).map(|q| (q.state, q.outcome));
        let want = Ok(("s1".to_string(), CallbackOutcome::Code("c1".into())));
        assert_eq!(code("https://h.example/callback?code=c1&state=s1"), want);
        assert_eq!(
            code("  http://127.0.0.1:9/callback?state=s1&code=c1\n"),
            want
        );
        assert_eq!(code("https://h.example/callback#code=c1&state=s1"), want);
        assert_eq!(code("code=c1&state=s1"), want);
        assert_eq!(code("?code=c1&state=s1"), want);
        assert_eq!(code("c1 s1"), want);
        assert!(matches!(
            code("https://h.example/cb?error=access_denied&state=s1"),
            Ok((_, CallbackOutcome::Error { .. }))
        ));
        assert_eq!(code(""), Err(PasteError::Empty));
        assert_eq!(code("garbage"), Err(PasteError::Unreadable));
        assert_eq!(code("a b c"), Err(PasteError::Unreadable));
        assert_eq!(code("https://h.example/callback"), Err(PasteError::NoState));
        assert_eq!(code("code=c1"), Err(PasteError::NoState));
        assert_eq!(code("code=a&state=s&state=t"), Err(PasteError::Repeated));
        assert_eq!(code("ht tp://"), Err(PasteError::Unreadable));
        assert_eq!(code(&"x".repeat(MAX_PASTED + 1)), Err(PasteError::TooLong));
    }
}
