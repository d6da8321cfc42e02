//! Reading and pruning the history (SPEC 13): the pages of
//! `GET /v1/connections/{provider}/{account}/events` and the retention
//! purge of `storage.history`. What is recorded, and when, is the engine's
//! (`refresh::history`); the rows are the store's (`store::events`).
//!
//! Must not: fail a refresh or a request because the history could not be
//! pruned (a purge failure is logged and tried again at the next pass).

use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use crate::store::{Before, Event, EventQuery, Store, StoreError};

/// Events per page when `?limit=` is not given.
pub const DEFAULT_LIMIT: u32 = 50;

/// The largest page: bounds one answer's size and the query's cost.
pub const MAX_LIMIT: u32 = 1000;

/// The longest wait between purges. Events only need to be gone roughly
/// when their retention ends; an hour keeps that within an hour for the
/// default 90 days at one small `DELETE` an hour.
pub const PURGE_MAX_INTERVAL: Duration = Duration::from_secs(3600);

/// The shortest wait between purges, whatever `storage.history` says.
const PURGE_MIN_INTERVAL: Duration = Duration::from_secs(1);

/// Why a query of the events endpoint was refused: a sentence naming the
/// parameter and the fix.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("limit must be a whole number from 1 to {MAX_LIMIT}, not {0:?}")]
    Limit(String),
    #[error("before must be an event id (a whole number) or an RFC 3339 instant such as 2026-01-02T03:04:05Z, not {0:?}")]
    Before(String),
    #[error("after must be an event id (a whole number), not {0:?}")]
    After(String),
}

/// The raw query parameters, as the handler and the CLI name them.
#[derive(Debug, Default, serde::Deserialize)]
pub struct RawQuery {
    pub limit: Option<String>,
    pub before: Option<String>,
    pub after: Option<String>,
}

impl RawQuery {
    /// Checks the parameters: `limit` 1..=[`MAX_LIMIT`] (default
    /// [`DEFAULT_LIMIT`]), `before` an event id or an instant, `after` an
    /// event id.
    pub fn parse(&self) -> Result<EventQuery, QueryError> {
        let limit = match &self.limit {
            None => DEFAULT_LIMIT,
            Some(s) => s
                .trim()
                .parse::<u32>()
                .ok()
                .filter(|n| (1..=MAX_LIMIT).contains(n))
                .ok_or_else(|| QueryError::Limit(s.clone()))?,
        };
        let before = self.before.as_deref().map(parse_before).transpose()?;
        let after = match &self.after {
            None => None,
            Some(s) => Some(
                s.trim()
                    .parse::<i64>()
                    .map_err(|_| QueryError::After(s.clone()))?,
            ),
        };
        Ok(EventQuery {
            before,
            after,
            limit,
        })
    }
}

/// `before`: a whole number is an event id, anything else an RFC 3339
/// instant.
fn parse_before(s: &str) -> Result<Before, QueryError> {
    let t = s.trim();
    if let Ok(id) = t.parse::<i64>() {
        return Ok(Before::Id(id));
    }
    DateTime::parse_from_rfc3339(t)
        .map(|d| Before::Time(d.with_timezone(&Utc)))
        .map_err(|_| QueryError::Before(s.to_owned()))
}

/// One page of the events of `provider`/`account`, newest first; `None`
/// if the connection is unknown (`known` is false) and has no history at
/// all. A forgotten connection's history stays readable by name.
pub async fn page(
    store: &Store,
    known: bool,
    (provider, account): (&str, &str),
    q: &EventQuery,
) -> Result<Option<Vec<Event>>, StoreError> {
    let events = store.events(provider, account, q).await?;
    if !events.is_empty() || known {
        return Ok(Some(events));
    }
    // An empty page of a connection with history (paged past its end) is
    // an empty page, not an unknown connection.
    let any = EventQuery {
        before: None,
        after: None,
        limit: 1,
    };
    let exists = !store.events(provider, account, &any).await?.is_empty();
    Ok(exists.then_some(events))
}

/// How often to purge for a retention of `history`: half of it (so an
/// event outlives its retention by at most half again), capped at
/// [`PURGE_MAX_INTERVAL`].
pub fn purge_interval(history: Duration) -> Duration {
    (history / 2).clamp(PURGE_MIN_INTERVAL, PURGE_MAX_INTERVAL)
}

/// Deletes the events older than `history`, now and then every
/// [`purge_interval`], until `shutdown`.
pub async fn purge_loop(store: Store, history: Duration, shutdown: CancellationToken) {
    let every = purge_interval(history);
    loop {
        // Saturating: a retention beyond the range of instants keeps all.
        let cutoff = chrono::Duration::from_std(history)
            .ok()
            .and_then(|h| Utc::now().checked_sub_signed(h))
            .unwrap_or(chrono::DateTime::<Utc>::MIN_UTC);
        match store.purge_events(cutoff).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(events = n, "pruned history events past storage.history"),
            Err(e) => tracing::warn!(error = %e, "could not prune the history; trying again later"),
        }
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(limit: Option<&str>, before: Option<&str>, after: Option<&str>) -> RawQuery {
        RawQuery {
            limit: limit.map(str::to_owned),
            before: before.map(str::to_owned),
            after: after.map(str::to_owned),
        }
    }

    #[test]
    fn a_query_defaults_to_fifty_and_takes_an_id_or_an_instant() {
        let q = raw(None, None, None).parse().unwrap();
        assert_eq!((q.limit, q.before, q.after), (DEFAULT_LIMIT, None, None));
        let q = raw(Some("1000"), Some("42"), Some("7")).parse().unwrap();
        assert_eq!(
            (q.limit, q.before, q.after),
            (1000, Some(Before::Id(42)), Some(7))
        );
        let q = raw(None, Some("2026-01-02T03:04:05Z"), None)
            .parse()
            .unwrap();
        assert_eq!(
            q.before,
            Some(Before::Time(
                DateTime::parse_from_rfc3339("2026-01-02T03:04:05Z")
                    .unwrap()
                    .with_timezone(&Utc)
            ))
        );
    }

    #[test]
    fn a_bad_query_names_the_parameter() {
        for (r, word) in [
            (raw(Some("0"), None, None), "limit"),
            (raw(Some("1001"), None, None), "limit"),
            (raw(Some("-3"), None, None), "limit"),
            (raw(None, Some("yesterday"), None), "before"),
            (raw(None, None, Some("x")), "after"),
        ] {
            let e = r.parse().unwrap_err().to_string();
            assert!(e.starts_with(word), "{e}");
        }
    }

    #[test]
    fn purges_run_at_half_the_retention_at_most_hourly() {
        assert_eq!(
            purge_interval(Duration::from_secs(4)),
            Duration::from_secs(2)
        );
        assert_eq!(
            purge_interval(Duration::from_millis(10)),
            PURGE_MIN_INTERVAL
        );
        assert_eq!(
            purge_interval(crate::config::DEFAULT_HISTORY),
            PURGE_MAX_INTERVAL
        );
    }
}
