//! The history of connections (SPEC 13): one row per lifecycle event, with
//! its time and an optional detail and duration, never a secret.
//!
//! Events are keyed by provider and account names, not by the connection's
//! id, so a forgotten connection's history stays readable by name. An event
//! that records a change of a connection is written by the backend in the
//! same transaction as the change (a committed refresh and its `refreshed`
//! event land together, or neither does); events without a change of their
//! own (a bearer misuse, a transient failure) are inserted alone.
//!
//! Must not: hold a token, a client secret or a provider's answer body in
//! any field. Callers build details from reason sentences the engine
//! already logs (which never contain secrets).

use std::time::Duration;

use chrono::{DateTime, Utc};

/// What happened to a connection. Serialised and stored under SPEC's
/// names (`authorized`, `refresh_failed`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A grant was stored by a browser authorization.
    Authorized,
    /// A grant was stored by an import (pasted or from a file).
    Imported,
    /// A refresh committed a new access token (with its duration).
    Refreshed,
    /// A refresh failed (the detail names the failure class and reason).
    RefreshFailed,
    /// The provider rotated the refresh token.
    Rotated,
    /// The grant needs a new authorization (the refresh token was refused).
    AuthorizationRequired,
    /// The grant was revoked at the provider and forgotten.
    Revoked,
    /// The grant was forgotten locally.
    Forgotten,
    /// A refresh token was presented as a bearer token.
    BearerMisuse,
    /// A refresh whose holder died before it finished.
    Interrupted,
}

impl EventKind {
    /// Every kind, in the order of the variants.
    pub const ALL: [EventKind; 10] = [
        EventKind::Authorized,
        EventKind::Imported,
        EventKind::Refreshed,
        EventKind::RefreshFailed,
        EventKind::Rotated,
        EventKind::AuthorizationRequired,
        EventKind::Revoked,
        EventKind::Forgotten,
        EventKind::BearerMisuse,
        EventKind::Interrupted,
    ];

    /// SPEC's name of the kind, as stored and serialised.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Authorized => "authorized",
            EventKind::Imported => "imported",
            EventKind::Refreshed => "refreshed",
            EventKind::RefreshFailed => "refresh_failed",
            EventKind::Rotated => "rotated",
            EventKind::AuthorizationRequired => "authorization_required",
            EventKind::Revoked => "revoked",
            EventKind::Forgotten => "forgotten",
            EventKind::BearerMisuse => "bearer_misuse",
            EventKind::Interrupted => "interrupted",
        }
    }

    /// The kind stored as `s`, if it is one this version knows.
    pub fn parse(s: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An event to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    pub provider: String,
    pub account: String,
    pub at: DateTime<Utc>,
    pub kind: EventKind,
    /// A sentence without secrets (a failure's class and reason).
    pub detail: Option<String>,
    /// How long the recorded operation took (a refresh's round trip).
    pub duration: Option<Duration>,
}

impl NewEvent {
    /// An event of `kind` for `(provider, account)` at `at`, without detail.
    pub fn new(name: (&str, &str), at: DateTime<Utc>, kind: EventKind) -> NewEvent {
        NewEvent {
            provider: name.0.to_owned(),
            account: name.1.to_owned(),
            at,
            kind,
            detail: None,
            duration: None,
        }
    }

    /// With a detail sentence.
    pub fn detail(mut self, detail: impl Into<String>) -> NewEvent {
        self.detail = Some(detail.into());
        self
    }

    /// With a duration.
    pub fn took(mut self, duration: Duration) -> NewEvent {
        self.duration = Some(duration);
        self
    }

    pub(super) fn duration_ms(&self) -> Option<i64> {
        self.duration
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
    }
}

/// An event as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Increasing in insertion order: the paging key.
    pub id: i64,
    pub provider: String,
    pub account: String,
    pub at: DateTime<Utc>,
    pub kind: EventKind,
    pub detail: Option<String>,
    pub duration_ms: Option<i64>,
}

/// Where a page of events ends (exclusive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Before {
    /// Events with a smaller id.
    Id(i64),
    /// Events that happened earlier.
    Time(DateTime<Utc>),
}

/// Which events of one connection to list: newest first, at most `limit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventQuery {
    pub before: Option<Before>,
    /// Only events with a larger id (what `tokenkeeper log --follow` has
    /// not shown yet).
    pub after: Option<i64>,
    pub limit: u32,
}

/// Defines, in a backend module, `insert_events`, `list_events` and
/// `purge_events` over its connection type `$conn`.
macro_rules! events_sql {
    ($conn:ty) => {
        /// Inserts `events` inside the caller's transaction.
        async fn insert_events(
            tx: &mut $conn,
            events: &[$crate::store::events::NewEvent],
        ) -> Result<(), StoreError> {
            let insert = format!(
                "INSERT INTO events (provider, account, at, kind, detail, duration_ms) VALUES ({})",
                $crate::store::migrate::values(6)
            );
            for e in events {
                sqlx::query(&insert)
                    .bind(e.provider.clone())
                    .bind(e.account.clone())
                    .bind($crate::store::to_ms(e.at))
                    .bind(e.kind.as_str())
                    .bind(e.detail.clone())
                    .bind(e.duration_ms())
                    .execute(&mut *tx)
                    .await?;
            }
            Ok(())
        }

        /// One page of a connection's events, newest first.
        async fn list_events(
            c: &mut $conn,
            provider: &str,
            account: &str,
            q: &$crate::store::events::EventQuery,
        ) -> Result<Vec<$crate::store::events::Event>, StoreError> {
            use $crate::store::events::{Before, Event, EventKind};
            let (before_id, before_at) = match q.before {
                Some(Before::Id(id)) => (id, i64::MAX),
                Some(Before::Time(t)) => (i64::MAX, $crate::store::to_ms(t)),
                None => (i64::MAX, i64::MAX),
            };
            let rows = sqlx::query(
                "SELECT id, provider, account, at, kind, detail, duration_ms FROM events \
                 WHERE provider = $1 AND account = $2 AND id < $3 AND at < $4 AND id > $5 \
                 ORDER BY id DESC LIMIT $6",
            )
            .bind(provider.to_owned())
            .bind(account.to_owned())
            .bind(before_id)
            .bind(before_at)
            .bind(q.after.unwrap_or(i64::MIN))
            .bind(i64::from(q.limit))
            .fetch_all(&mut *c)
            .await?;
            rows.iter()
                .map(|r| {
                    let kind: String = sqlx::Row::try_get(r, "kind")?;
                    Ok(Event {
                        id: sqlx::Row::try_get(r, "id")?,
                        provider: sqlx::Row::try_get(r, "provider")?,
                        account: sqlx::Row::try_get(r, "account")?,
                        at: $crate::store::from_ms(sqlx::Row::try_get(r, "at")?),
                        kind: EventKind::parse(&kind).ok_or_else(|| {
                            StoreError::Corrupt(format!(
                                "unknown event kind {kind:?} (written by a newer version?)"
                            ))
                        })?,
                        detail: sqlx::Row::try_get(r, "detail")?,
                        duration_ms: sqlx::Row::try_get(r, "duration_ms")?,
                    })
                })
                .collect()
        }

        /// Deletes the events older than `before`; how many.
        async fn purge_events(
            c: &mut $conn,
            before: chrono::DateTime<chrono::Utc>,
        ) -> Result<u64, StoreError> {
            let done = sqlx::query("DELETE FROM events WHERE at < $1")
                .bind($crate::store::to_ms(before))
                .execute(&mut *c)
                .await?;
            Ok(done.rows_affected())
        }
    };
}
pub(crate) use events_sql;
