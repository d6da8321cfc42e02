//! The JSON bodies of the HTTP API (SPEC 4), one type per answer, shared by
//! the server, which writes them, and the CLI, which reads them: what one
//! writes the other can read, and the OpenAPI document describes both.
//!
//! The wire format is fixed by SPEC 4 and checked against `openapi.json`
//! (schemathesis in `tests/openapi`): fields keep their names and order,
//! instants are RFC 3339 UTC to the second (`2026-01-02T03:04:05Z`), and
//! optional members are left out or `null` exactly as before. Reading is
//! forgiving where a newer daemon may say more: unknown members are
//! ignored, and a state this build does not know is kept as text.
//!
//! This module holds data only: no handler logic, no I/O.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::store::{ConnState, Event};

// The server renders it once per snapshot (`refresh::token_json`,
// compared byte for byte with this type's serde output); the CLI reads it.
// No `Debug`: it holds an access token. (Doc comments here become the
// OpenAPI description.)
/// SPEC 4: the answer carrying an access token.
#[derive(Serialize, Deserialize, utoipa::ToSchema)]
pub struct TokenBody {
    pub access_token: String,
    /// The scheme to send it with: "Bearer" unless the provider issued
    /// another type (e.g. "DPoP").
    pub token_type: String,
    #[serde(with = "rfc3339_secs")]
    #[schema(value_type = String)]
    pub expires_at: DateTime<Utc>,
    pub expires_in: i64,
    pub provider: String,
    pub account: String,
    /// What the provider returned beside the tokens that an API needs
    /// (SPEC 11), kept per connection: Intuit `realmId`, Salesforce
    /// `instance_url`, Zoho `api_domain`, Xero `tenants` (a list of
    /// `{"id", "name"}`). Left out when the connection has none.
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    #[schema(value_type = Object)]
    pub extra: crate::store::Extras,
}

/// SPEC 13: `GET /v1/connections/{provider}/{account}/events`, newest
/// first.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EventsBody {
    pub events: Vec<EventJson>,
}

/// One event of a connection's history. Never holds a secret.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EventJson {
    /// Increasing in the order events were recorded: pass the last one
    /// seen as `before` for the next (older) page, or as `after` to see
    /// only newer ones.
    pub id: i64,
    pub provider: String,
    pub account: String,
    /// When it happened, RFC 3339 UTC to the millisecond.
    #[schema(value_type = String)]
    pub at: DateTime<Utc>,
    /// authorized, imported, refreshed, refresh_failed, rotated,
    /// authorization_required, revoked, forgotten, bearer_misuse or
    /// interrupted (kept as text, so a newer daemon's kinds still read).
    pub kind: String,
    /// A reason (a failure's class and cause), without secrets.
    #[serde(default)]
    pub detail: Option<String>,
    /// How long it took (a refresh's round trip), in milliseconds.
    #[serde(default)]
    pub duration_ms: Option<i64>,
}

impl From<Event> for EventJson {
    fn from(e: Event) -> EventJson {
        EventJson {
            id: e.id,
            provider: e.provider,
            account: e.account,
            at: e.at,
            kind: e.kind.as_str().to_owned(),
            detail: e.detail,
            duration_ms: e.duration_ms,
        }
    }
}

/// SPEC 4: `GET /v1/connections`.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ConnectionsBody {
    pub connections: Vec<ConnectionJson>,
    /// SHA-256 of the HTTPS certificate, for `tokenkeeper status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_fingerprint: Option<String>,
}

/// One connection in `GET /v1/connections`.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ConnectionJson {
    pub provider: String,
    pub account: String,
    #[schema(value_type = String)]
    pub state: StateName,
    #[serde(with = "rfc3339_secs")]
    #[schema(value_type = String)]
    pub expires_at: DateTime<Utc>,
    #[serde(default, with = "rfc3339_secs::option")]
    #[schema(value_type = Option<String>)]
    pub refreshed_at: Option<DateTime<Utc>>,
    #[serde(default, with = "rfc3339_secs::option")]
    #[schema(value_type = Option<String>)]
    pub next_refresh_at: Option<DateTime<Utc>>,
    #[serde(with = "rfc3339_secs")]
    #[schema(value_type = String)]
    pub refresh_token_issued_at: DateTime<Utc>,
    /// When the refresh token dies (SPEC 11): stated by the provider, or
    /// its preset's or `refresh_token_lifetime`; `null` when unknown.
    #[serde(default, with = "rfc3339_secs::option")]
    #[schema(value_type = Option<String>)]
    pub refresh_token_expires_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub last_error: Option<String>,
    /// Rate-limit figures of the provider (and tenant) as the proxy knows
    /// them: `daily_limit`, `daily_available`, `daily_used`, `resets_at`,
    /// `reported`, `throttle_limit`, `throttle_available`, `paused_until`,
    /// `tenant`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub quota: Option<crate::ratelimit::ConnectionQuota>,
}

/// A connection's `state` as the API names it (SPEC 7): one this build
/// knows, or, read from a newer daemon, a name it does not (kept as text,
/// so it can still be shown).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StateName {
    Known(ConnState),
    Other(String),
}

impl StateName {
    /// The state, when this build knows it.
    pub fn known(&self) -> Option<ConnState> {
        match self {
            StateName::Known(s) => Some(*s),
            StateName::Other(_) => None,
        }
    }
}

impl From<ConnState> for StateName {
    fn from(s: ConnState) -> Self {
        StateName::Known(s)
    }
}

impl std::fmt::Display for StateName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StateName::Known(s) => s.fmt(f),
            StateName::Other(s) => f.write_str(s),
        }
    }
}

/// The answer of `POST /v1/inspect` (provider and account only when known).
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct InspectBody {
    /// current_access_token | old_access_token | refresh_token | unknown
    pub kind: String,
    #[serde(default)]
    pub provider: Option<String>,
    #[serde(default)]
    pub account: Option<String>,
    pub message: String,
}

// No `Debug`: the URL is a one-time credential.
/// The answer of `POST /v1/login-links`.
#[derive(Serialize, Deserialize, utoipa::ToSchema)]
pub struct LinkBody {
    /// Open this in a browser; it works once, until `expires_at`.
    pub url: String,
    /// RFC 3339 UTC; absent when the daemon has no API keys (the URL is
    /// then the page itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
}

// No `Debug`: it carries a refresh token.
/// The body of `POST /v1/connections/{provider}/{account}/import` (SPEC 10).
#[derive(Serialize, Deserialize, utoipa::ToSchema)]
pub struct ImportRequest {
    /// The refresh token another program holds today.
    pub refresh_token: String,
    /// Replace a connection that has a working grant.
    #[serde(default)]
    pub replace: bool,
}

/// The answer of a successful import.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ImportBody {
    pub provider: String,
    pub account: String,
    /// The provider issued a new refresh token: the imported copy is spent.
    pub rotated: bool,
    /// An existing connection was replaced.
    pub replaced: bool,
    /// When the access token the proving refresh obtained expires.
    #[serde(with = "rfc3339_secs")]
    #[schema(value_type = String)]
    pub expires_at: DateTime<Utc>,
    /// `false`: the provider's answer had no usable access token; its new
    /// refresh token is stored and the first request refreshes it.
    pub access_token_usable: bool,
}

// No `Debug`: `flow_secret` binds the flow to the command that started it.
/// The answer of `POST /v1/connections/{provider}/{account}/paste/start`.
#[derive(Serialize, Deserialize, utoipa::ToSchema)]
pub struct PasteStartBody {
    /// Open this in any browser and approve.
    pub authorization_url: String,
    /// Where the provider sends the browser; the address it ends on is
    /// what to paste, even if that page does not load.
    pub redirect_uri: String,
    /// Sent back with the pasted address; only the starting command holds it.
    pub flow_secret: String,
    #[serde(with = "rfc3339_secs")]
    #[schema(value_type = String)]
    pub expires_at: DateTime<Utc>,
}

// No `Debug`: it carries the flow secret and an authorization code.
/// The body of `POST /v1/connections/{provider}/{account}/paste/finish`.
#[derive(Serialize, Deserialize, utoipa::ToSchema)]
pub struct PasteFinishRequest {
    pub flow_secret: String,
    /// The address the browser ended on, or its query
    /// (`code=...&state=...`), or the code and the state separated by a space.
    pub pasted: String,
}

/// The answer of a finished pasted authorization.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PasteFinishBody {
    pub provider: String,
    pub account: String,
    /// The provider issued a refresh token (without one the grant ends
    /// with its access token).
    pub refresh_token: bool,
}

// No `Debug`: `flow_id` is the handle that watches and cancels the flow.
/// The answer of `POST /v1/connections/{provider}/{account}/device` and
/// of `GET`/`DELETE .../device/{flow_id}`: a device authorization (RFC
/// 8628) the daemon polls for. The device code never leaves the daemon.
#[derive(Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeviceFlowBody {
    /// Watches (`GET .../device/{flow_id}?wait=SECS`) and cancels
    /// (`DELETE`) the flow.
    pub flow_id: String,
    pub provider: String,
    pub account: String,
    /// What the person enters at `verification_uri`.
    pub user_code: String,
    /// Where the person goes, on any device.
    pub verification_uri: String,
    /// The same address with the code in it, when the provider gives one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification_uri_complete: Option<String>,
    /// When the codes die.
    #[serde(with = "rfc3339_secs")]
    #[schema(value_type = String)]
    pub expires_at: DateTime<Utc>,
    /// Seconds between the daemon's polls now (grows on `slow_down`).
    pub interval_secs: f64,
    /// pending | authorized | expired | denied | cancelled | failed
    pub state: String,
    /// Once ended: one sentence saying what happened and what to do next.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Once authorized: whether the provider issued a refresh token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<bool>,
}

/// SPEC 4: the body of every `/v1/*` error.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// unknown_provider | unknown_connection | authorization_required | refresh_failed | invalid_token | invalid_request | forbidden_origin | internal; from the proxy also rate_limited | upstream_unreachable; from DELETE also revocation_failed
    pub error: String,
    /// One sentence saying what to do next.
    pub message: String,
    /// With authorization_required: where a person re-authorizes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_url: Option<String>,
}

/// Instants as SPEC 4 writes them: RFC 3339 UTC to the second, `Z` for
/// UTC (chrono's own serde form would add fractions and differ for stored
/// millisecond instants). Any RFC 3339 instant is read.
pub mod rfc3339_secs {
    use chrono::{DateTime, SecondsFormat, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    /// The wire form of `t`.
    pub fn format(t: &DateTime<Utc>) -> String {
        t.to_rfc3339_opts(SecondsFormat::Secs, true)
    }

    fn parse<E: serde::de::Error>(s: &str) -> Result<DateTime<Utc>, E> {
        DateTime::parse_from_rfc3339(s)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|e| E::custom(format!("{s:?} is not an RFC 3339 instant ({e})")))
    }

    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(t))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        parse(&String::deserialize(d)?)
    }

    /// The same for an optional instant (`null` when absent).
    pub mod option {
        use super::*;

        pub fn serialize<S: Serializer>(
            t: &Option<DateTime<Utc>>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            match t {
                Some(t) => s.serialize_some(&format(t)),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<DateTime<Utc>>, D::Error> {
            Option::<String>::deserialize(d)?
                .map(|s| parse(&s))
                .transpose()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the server writes, the CLI reads back unchanged, and the wire
    /// form is SPEC 4's, member for member.
    #[test]
    fn connections_round_trip_in_the_spec_form() {
        let at = DateTime::from_timestamp_millis(1_767_225_600_123).unwrap();
        let body = ConnectionsBody {
            connections: vec![ConnectionJson {
                provider: "keap".into(),
                account: "default".into(),
                state: ConnState::AuthorizationRequired.into(),
                expires_at: at,
                refreshed_at: None,
                next_refresh_at: Some(at),
                refresh_token_issued_at: at,
                refresh_token_expires_at: None,
                last_error: Some("x".into()),
                quota: None,
            }],
            tls_fingerprint: None,
        };
        let text = serde_json::to_string(&body).unwrap();
        assert_eq!(
            text,
            r#"{"connections":[{"provider":"keap","account":"default","state":"authorization_required","expires_at":"2026-01-01T00:00:00Z","refreshed_at":null,"next_refresh_at":"2026-01-01T00:00:00Z","refresh_token_issued_at":"2026-01-01T00:00:00Z","refresh_token_expires_at":null,"last_error":"x"}]}"#
        );
        let back: ConnectionsBody = serde_json::from_str(&text).unwrap();
        let c = &back.connections[0];
        assert_eq!(c.state.known(), Some(ConnState::AuthorizationRequired));
        assert_eq!(c.expires_at.timestamp(), at.timestamp());
        assert_eq!(c.refreshed_at, None);
    }

    /// A newer daemon's state name and extra members do not stop a reader.
    #[test]
    fn unknown_states_and_members_are_kept_or_ignored() {
        let c: ConnectionJson = serde_json::from_str(
            r#"{"provider":"p","account":"a","state":"hibernating","expires_at":"2026-01-01T00:00:00+01:00","refresh_token_issued_at":"2026-01-01T00:00:00Z","new_member":[1]}"#,
        )
        .unwrap();
        assert_eq!(c.state, StateName::Other("hibernating".into()));
        assert_eq!(c.state.to_string(), "hibernating");
        assert_eq!(c.expires_at.to_rfc3339(), "2025-12-31T23:00:00+00:00");
        assert!(c.refreshed_at.is_none() && c.last_error.is_none());
    }
}
