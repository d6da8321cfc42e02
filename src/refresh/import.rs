//! Adopting a grant another program holds (SPEC 10, `tokenkeeper import`):
//! the refresh token is checked for shape ([`check_refresh_token`], pure,
//! also run by the CLI before anything is sent), redeemed once at the
//! provider, and only then stored exactly like a new authorization
//! (`registry::land`).
//!
//! Must not: store anything the provider did not just prove, log or echo
//! the token, or overwrite an active connection unless told to.

use std::time::Duration;

use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};

use super::registry;
use super::shared::Shared;
use crate::provider::{ProviderError, TokenGrant};
use crate::store::{ConnState, StoreError, TokenKind};

/// Longest refresh token accepted: real ones are well under 2 KiB (a
/// Keycloak JWT refresh token is about 1 KiB); more is a wrong file.
pub const MAX_REFRESH_TOKEN_BYTES: usize = 8 * 1024;

/// Why a text is not a refresh token; each message says what to give
/// instead and never quotes the text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenShapeError {
    #[error("the refresh token file is empty; put the refresh token in it, alone on one line")]
    Empty,
    #[error("the refresh token file is larger than {MAX_REFRESH_TOKEN_BYTES} bytes, so it is not a refresh token; put the refresh token in it, alone on one line")]
    TooLong,
    #[error("the refresh token file holds several lines; put the refresh token in it, alone on one line")]
    MultipleLines,
    #[error("the refresh token file holds spaces or control characters inside the token; put the refresh token in it alone, without \"Bearer\" or other words")]
    NotPrintable,
    #[error("the refresh token file holds JSON; copy the value of its \"refresh_token\" member into the file, alone on one line")]
    Json,
    #[error("this looks like an access token (a JWT), not a refresh token; import needs the refresh token the program holds (the long-lived one it sends to the token endpoint with grant_type=refresh_token)")]
    AccessTokenJwt,
}

/// The refresh token in `text` (surrounding whitespace trimmed), or why
/// `text` is not one. Pure: runs on anything a person may put in a file.
pub fn check_refresh_token(text: &str) -> Result<&str, TokenShapeError> {
    if text.len() > MAX_REFRESH_TOKEN_BYTES {
        return Err(TokenShapeError::TooLong);
    }
    let t = text.trim();
    if t.is_empty() {
        return Err(TokenShapeError::Empty);
    }
    if t.contains(['\n', '\r']) {
        return Err(TokenShapeError::MultipleLines);
    }
    if t.starts_with('{') {
        return Err(TokenShapeError::Json);
    }
    // RFC 6749 A.17 allows a space too, but no provider issues one, and a
    // space here is almost always "Bearer xyz" or two tokens in one line.
    if !t.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err(TokenShapeError::NotPrintable);
    }
    if looks_like_access_jwt(t) {
        return Err(TokenShapeError::AccessTokenJwt);
    }
    Ok(t)
}

/// A JWT is an access or ID token unless its payload says it is a refresh
/// token (Keycloak's refresh tokens are JWTs with `"typ": "Refresh"` or
/// `"Offline"`); every other provider's refresh tokens are opaque.
fn looks_like_access_jwt(t: &str) -> bool {
    use base64::Engine as _;
    let mut parts = t.split('.');
    let (Some(header), Some(payload), Some(_sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let decode = |s: &str| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(s.trim_end_matches('='))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
    };
    let Some(header) = decode(header) else {
        return false;
    };
    if header.get("alg").is_none() {
        return false;
    }
    let typ =
        decode(payload).and_then(|p| p.get("typ").and_then(|v| v.as_str()).map(str::to_lowercase));
    !matches!(typ.as_deref(), Some("refresh" | "offline"))
}

/// Why an import stored nothing.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("no provider named {0:?} is configured")]
    UnknownProvider(String),
    /// The provider's grant has no person and no refresh token
    /// (`grant = "client_credentials"`).
    #[error("{0}")]
    NothingToAuthorize(String),
    #[error("{0}")]
    Shape(#[from] TokenShapeError),
    #[error("this is an access token tokenkeeper issued for {provider}/{account}, not a refresh token; import needs the refresh token the other program holds")]
    OurAccessToken { provider: String, account: String },
    #[error("this is a refresh token of {provider}/{account} that tokenkeeper holds or has rotated out; there is nothing to import: tokenkeeper keeps that grant itself")]
    OurRefreshToken { provider: String, account: String },
    #[error("{provider}/{account} already has a working grant; nothing was stored. Add --replace to replace it with the imported one (the current grant is then revoked)")]
    Exists { provider: String, account: String },
    #[error("{provider}/{account} received a working grant from another process while this import was at the provider; that grant was kept and nothing was overwritten. The provider has already rotated the imported refresh token, so the other program's copy no longer works and the new pair is that grant's only live copy: {}", stored_meanwhile_advice(provider, account, kept))]
    StoredMeanwhile {
        provider: String,
        account: String,
        /// The account the imported grant was stored under instead, or
        /// why it could not be.
        kept: Result<String, String>,
    },
    #[error("the provider rejected this refresh token ({message}); nothing was stored. It is expired, revoked, already used, an access token rather than the refresh token, or belongs to another client id: give the refresh token the program holds now, or authorize with `tokenkeeper connect` instead")]
    Rejected { message: String },
    #[error("the provider refused the request ({message}); nothing was stored. This is a configuration problem (client id, secret, token_url): fix it and import again")]
    Refused { message: String },
    #[error("the provider could not be reached ({message}); nothing was stored and the token was not used: try again")]
    Transient {
        message: String,
        retry_after: Option<Duration>,
    },
    #[error("the provider proved the token but tokenkeeper could not store the grant: {0}")]
    Store(#[from] StoreError),
    /// Refused before the provider is asked: redeeming the token now would
    /// rotate it with nowhere to keep the new one.
    #[error("tokenkeeper cannot reach its database right now; nothing was sent to the provider and the other program's copy still works: import again once the database answers (see /readyz)")]
    StorageDown,
}

/// Appended to an account whose import lost to a grant stored meanwhile.
const PARKED_SUFFIX: &str = "-imported";

/// The account an import that lost keeps its grant under, if the name is
/// a valid one.
fn parked_account(account: &str) -> Option<String> {
    let name = format!("{account}{PARKED_SUFFIX}");
    crate::config::valid_account(&name).then_some(name)
}

fn stored_meanwhile_advice(provider: &str, account: &str, kept: &Result<String, String>) -> String {
    match kept {
        Ok(name) => format!(
            "it was stored as {provider}/{name} instead. Keep the grant you want: `tokenkeeper revoke {provider} {name}` ends the imported one, or have your programs use account {name} and revoke {provider}/{account}"
        ),
        Err(why) => format!(
            "it could not be stored under another name ({why}), so it lapses unused at the provider. If {provider}/{account}'s grant is the one you want, nothing more is needed; otherwise authorize again with `tokenkeeper connect {provider} {account}`"
        ),
    }
}

/// What an import did.
#[derive(Debug, Clone)]
pub struct Imported {
    /// The provider issued a new refresh token: the copy the other program
    /// holds is now spent.
    pub rotated: bool,
    /// When the access token obtained by the proving refresh expires.
    pub expires_at: DateTime<Utc>,
    /// An existing connection was replaced.
    pub replaced: bool,
    /// The answer carried a usable access token; when not, the rotated
    /// refresh token is stored and the first request refreshes it.
    pub usable: bool,
}

/// Checks `token`, redeems it once at `provider`, and stores the result as
/// `provider/account`'s grant. A connection in another state than
/// `authorization_required` is replaced only when `replace` is set.
pub async fn import(
    shared: &Shared,
    provider: &str,
    account: &str,
    token: &SecretString,
    replace: bool,
) -> Result<Imported, ImportError> {
    let settings = shared.settings();
    let Some(p) = settings.providers.get(provider) else {
        return Err(ImportError::UnknownProvider(provider.to_string()));
    };
    if let Some(why) = p.config.authorization_refusal() {
        return Err(ImportError::NothingToAuthorize(why));
    }
    let text = check_refresh_token(token.expose_secret())?;
    if let Some((kind, id)) = shared.recognizer.lookup(text) {
        let (provider, account) = shared
            .slots
            .by_id(id)
            .map(|s| (s.provider.clone(), s.account.clone()))
            .unwrap_or_else(|| ("another provider".into(), "an earlier account".into()));
        return Err(match kind {
            TokenKind::Access => ImportError::OurAccessToken { provider, account },
            TokenKind::Refresh => ImportError::OurRefreshToken { provider, account },
        });
    }
    let existing = shared.slots.get(provider, account);
    if let Some(slot) = &existing {
        let dead = slot.snapshot().state() == ConnState::AuthorizationRequired;
        if !dead && !replace {
            return Err(ImportError::Exists {
                provider: provider.to_string(),
                account: account.to_string(),
            });
        }
    }
    if !shared.store.feed().up() {
        return Err(ImportError::StorageDown);
    }
    let token = SecretString::from(text.to_string());
    shared.rate_slot(p, account).await;
    let mut usable = true;
    let grant = match p.refresh(&token).await {
        Ok(mut g) => {
            // A provider that does not rotate keeps the imported token valid.
            if g.refresh_token.is_none() {
                g.refresh_token = Some(token.clone());
            }
            g
        }
        Err(ProviderError::Unusable { refresh_token, .. }) => {
            // The provider rotated but its access token is unusable: the
            // new refresh token is the grant now and must not be dropped.
            // Stored with an access token already expired, so the first
            // caller's request refreshes it.
            usable = false;
            TokenGrant::refresh_token_only(refresh_token, Utc::now())
        }
        Err(ProviderError::Rejected { message }) => return Err(ImportError::Rejected { message }),
        Err(ProviderError::Refused { message }) => return Err(ImportError::Refused { message }),
        Err(ProviderError::Transient {
            message,
            retry_after,
        }) => {
            return Err(ImportError::Transient {
                message,
                retry_after,
            })
        }
    };
    let rotated = grant
        .refresh_token
        .as_ref()
        .is_some_and(|r| r.expose_secret() != token.expose_secret());
    const HOW: &str = "imported from another program; that program's copy of the refresh token must no longer be used";
    // The look above was before the provider call: another process may
    // have stored a grant since. Without --replace the store compares
    // again in its transaction, so that grant is never overwritten.
    let landed = registry::land(
        shared,
        provider,
        account,
        &grant,
        crate::store::EventKind::Imported,
        HOW,
        !replace,
    )
    .await;
    match landed {
        Ok(()) => {}
        Err(StoreError::WorkingGrantExists { .. }) => {
            // The provider has rotated the imported token: the new pair is
            // the only live copy of the other program's grant. Dropping it
            // would lose that grant, revoking it may end the kept one too
            // at providers that revoke per user and client, so it is kept
            // under a name of its own for the operator to decide.
            let parked = parked_account(account);
            let kept = match &parked {
                Some(name) => registry::land(
                    shared,
                    provider,
                    name,
                    &grant,
                    crate::store::EventKind::Imported,
                    HOW,
                    true,
                )
                .await
                .map(|()| name.clone())
                .map_err(|e| e.to_string()),
                None => Err(format!(
                    "{account}{PARKED_SUFFIX} is not a valid account name"
                )),
            };
            tracing::warn!(
                provider,
                account,
                kept_as = kept.as_deref().unwrap_or("nothing"),
                "an import lost to a grant stored meanwhile; the stored grant was kept"
            );
            return Err(ImportError::StoredMeanwhile {
                provider: provider.to_string(),
                account: account.to_string(),
                kept,
            });
        }
        Err(e) => return Err(e.into()),
    }
    tracing::info!(provider, account, rotated, "grant imported");
    Ok(Imported {
        rotated,
        expires_at: grant.expires_at,
        replaced: existing.is_some(),
        usable,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    fn jwt(header: &str, payload: &str) -> String {
        let e = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!("{}.{}.sig", e(header), e(payload))
    }

    #[test]
    fn a_refresh_token_is_told_from_junk_and_access_tokens() {
        assert_eq!(
            check_refresh_token("  abc.DEF-123_~+/=\n"),
            Ok("abc.DEF-123_~+/=")
        );
        assert_eq!(check_refresh_token(" \n\t"), Err(TokenShapeError::Empty));
        assert_eq!(
            check_refresh_token("a\nb"),
            Err(TokenShapeError::MultipleLines)
        );
        assert_eq!(
            check_refresh_token("a\r\nb"),
            Err(TokenShapeError::MultipleLines)
        );
        assert_eq!(
            check_refresh_token("Bearer abc"),
            Err(TokenShapeError::NotPrintable)
        );
        assert_eq!(
            check_refresh_token("ab\u{0}c"),
            Err(TokenShapeError::NotPrintable)
        );
        assert_eq!(
            check_refresh_token("abé"),
            Err(TokenShapeError::NotPrintable)
        );
        assert_eq!(
            check_refresh_token("{\"refresh_token\":1}"),
            Err(TokenShapeError::Json)
        );
        assert_eq!(
            check_refresh_token(&"a".repeat(MAX_REFRESH_TOKEN_BYTES + 1)),
            Err(TokenShapeError::TooLong)
        );
        let access = jwt(r#"{"alg":"RS256","typ":"at+jwt"}"#, r#"{"scp":"x"}"#);
        assert_eq!(
            check_refresh_token(&access),
            Err(TokenShapeError::AccessTokenJwt)
        );
        let id = jwt(r#"{"alg":"RS256"}"#, "not json");
        assert_eq!(
            check_refresh_token(&id),
            Err(TokenShapeError::AccessTokenJwt)
        );
        // Keycloak's refresh tokens are JWTs that say so.
        let keycloak = jwt(r#"{"alg":"HS512"}"#, r#"{"typ":"Refresh"}"#);
        assert!(check_refresh_token(&keycloak).is_ok());
        let offline = jwt(r#"{"alg":"HS512"}"#, r#"{"typ":"Offline"}"#);
        assert!(check_refresh_token(&offline).is_ok());
        // Dotted opaque tokens are not JWTs.
        assert!(check_refresh_token("a.b.c").is_ok());
        // No message quotes the token.
        for e in [
            TokenShapeError::Empty,
            TokenShapeError::TooLong,
            TokenShapeError::MultipleLines,
            TokenShapeError::NotPrintable,
            TokenShapeError::Json,
            TokenShapeError::AccessTokenJwt,
        ] {
            assert!(e.to_string().contains("refresh token"));
        }
    }
}
