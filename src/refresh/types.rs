//! What the engine's callers see, and what every layer of it shares:
//! errors ([`TokenError`]), why a refresh runs ([`Trigger`]), the reloadable
//! [`Settings`], the tokens handed out and the connection reports.
//!
//! Must not: depend on any other part of the engine (this is its bottom
//! layer), or hold state.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use secrecy::SecretString;

use crate::config::RefreshConfig;
use crate::notify::Notifier;
use crate::provider::Provider;
use crate::store::{ConnState, StoreError};

/// Errors a token request can end in (mapped to SPEC 4 statuses by `http`).
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("no provider named {0:?} is configured")]
    UnknownProvider(String),
    #[error("{provider}/{account} has never been authorized")]
    UnknownConnection { provider: String, account: String },
    #[error("{provider}/{account} needs a new authorization: {reason}")]
    AuthorizationRequired {
        provider: String,
        account: String,
        reason: String,
    },
    #[error("{}", refresh_failed_text(provider, account, reason, still_valid_until.as_ref()))]
    RefreshFailed {
        provider: String,
        account: String,
        reason: String,
        retry_after: Duration,
        /// The access token still served, if one is: then the message says
        /// so instead of claiming none is left.
        still_valid_until: Option<DateTime<Utc>>,
    },
    /// The provider refused or failed the revocation; nothing was forgotten.
    #[error("the provider did not revoke the grant of {provider}/{account} ({reason}); it is kept, so the revocation can be retried; to forget it here without revoking it upstream, use `tokenkeeper revoke {provider} {account} --local` (DELETE ...?local=true)")]
    RevocationFailed {
        provider: String,
        account: String,
        reason: String,
    },
    /// Another process held the connection's lease for longer than a
    /// revocation waits.
    #[error("another tokenkeeper process is refreshing {provider}/{account} and did not finish in time; nothing was revoked or forgotten; try again")]
    Busy { provider: String, account: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn refresh_failed_text(
    provider: &str,
    account: &str,
    reason: &str,
    still_valid_until: Option<&DateTime<Utc>>,
) -> String {
    match still_valid_until {
        Some(t) => format!(
            "the refresh of {provider}/{account} did not produce a new access token: {reason}; the current one stays valid until {} and is still served",
            t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        ),
        None => format!(
            "no valid access token is left for {provider}/{account} and the provider could not be reached: {reason}"
        ),
    }
}

/// Whether `forget` also revokes upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revocation {
    /// Revoke the newest refresh token at the provider (where it offers
    /// revocation); if that fails, keep the grant.
    Upstream,
    /// Forget locally only; the grant stays valid at the provider.
    LocalOnly,
}

/// How a new grant was authorized: what its `authorized` notification
/// (and the log line it makes) says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthorizedBy {
    /// `/connect` then `/callback` in the browser.
    Browser,
    /// `connect --paste`: the callback's address pasted at the command.
    PastedAddress,
    /// `connect --device` or the dashboard's device page (RFC 8628).
    DeviceCode,
}

impl AuthorizedBy {
    /// The notification's message.
    pub fn message(self) -> &'static str {
        match self {
            AuthorizedBy::Browser => "authorized in the browser; the grant is stored",
            AuthorizedBy::PastedAddress => {
                "authorized through a pasted address; the grant is stored"
            }
            AuthorizedBy::DeviceCode => "authorized with a device code; the grant is stored",
        }
    }
}

/// What a caller gets: the access token and when it expires.
#[derive(Clone)]
pub struct IssuedToken {
    pub provider: String,
    pub account: String,
    pub access_token: SecretString,
    pub token_type: String,
    pub expires_at: DateTime<Utc>,
    /// The connection's extras (under `"extra"` in `/v1/token`).
    pub extra: std::sync::Arc<crate::store::GrantMeta>,
}

/// A token served in place by [`crate::refresh::Engine::with_fresh_token`]:
/// the rendered answer (all a `/v1/token` caller needs), and the two parts
/// the proxy sends on (the bearer, and the extras that pick its base URL).
pub struct ServedToken<'a> {
    pub access_token: &'a str,
    /// The connection's extras (SPEC 11), empty when none.
    pub extra: &'a crate::store::Extras,
    /// The `/v1/token` answer, rendered once per snapshot.
    pub answer: &'a super::token_json::TokenJson,
    /// The instant the token was judged fresh at: the later of the wall
    /// clock and the token's anchored clock, so `expires_in` counted from
    /// it is not overstated after the wall clock stepped back.
    pub at: DateTime<Utc>,
}

/// A connection as reported by `/v1/connections` and `status`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ConnectionReport {
    pub provider: String,
    pub account: String,
    pub state: ConnState,
    pub expires_at: DateTime<Utc>,
    pub refreshed_at: Option<DateTime<Utc>>,
    pub next_refresh_at: Option<DateTime<Utc>>,
    pub refresh_token_issued_at: DateTime<Utc>,
    pub last_error: Option<String>,
    /// When the refresh token dies, if known (SPEC 11).
    pub refresh_token_expires_at: Option<DateTime<Utc>>,
    /// Whether that end is one refreshing cannot push back.
    #[serde(skip)]
    pub refresh_token_end_fixed: bool,
    /// Access tokens handed out since the daemon started.
    pub served: u64,
    /// Refresh attempts since start by result, in the order of
    /// [`crate::metrics::REFRESH_RESULTS`] (for `/metrics` only).
    #[serde(skip)]
    pub refreshes: [u64; 4],
}

/// Reloadable part of the engine's configuration.
pub struct Settings {
    pub refresh: RefreshConfig,
    pub providers: HashMap<String, Provider>,
    pub notifier: Notifier,
}

/// Why a refresh is being attempted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// The scheduler found it due.
    Scheduled,
    /// A caller would get less than `min_validity`.
    OnDemand,
    /// `POST .../refresh` or `tokenkeeper refresh`.
    Forced,
}

/// What `inspect` found a token to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenIdentity {
    /// The access token this daemon currently hands out.
    CurrentAccessToken {
        provider: String,
        account: String,
    },
    /// An access token this daemon handed out before.
    OldAccessToken {
        provider: String,
        account: String,
    },
    /// A refresh token: never to be sent as a bearer token.
    RefreshToken {
        provider: String,
        account: String,
    },
    Unknown,
}

/// A std duration as a chrono one, saturating.
pub(crate) fn chrono_dur(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}
