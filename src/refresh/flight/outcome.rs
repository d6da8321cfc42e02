//! How a failed refresh ends, by failure class (`provider::answer`
//! classifies; here each class becomes a state):
//!
//! | class       | state                    | next attempt                                  |
//! |-------------|--------------------------|-----------------------------------------------|
//! | transient   | `retrying`               | backoff (`Retry-After` if longer, capped)     |
//! | refused     | `retrying`               | at most [`REFUSED_RETRY_MAX`]; a reload retries at once |
//! | unusable    | `retrying`, its refresh token stored | backoff, with the stored token    |
//! | rejected    | `authorization_required` | none: only a new authorization helps          |
//!
//! [`plan`] is the pure part (tested below); the functions after it write
//! the journal, count, log and notify.
//!
//! Must not: end a grant for anything but a rejection, or discard a
//! still-valid access token.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use secrecy::SecretString;

use super::commit;
use crate::config::RefreshConfig;
use crate::notify::EventKind;
use crate::provider::TokenGrant;
use crate::refresh::history;
use crate::refresh::lease::{self, LEASE};
use crate::refresh::policy;
use crate::refresh::shared::Shared;
use crate::refresh::slot::Slot;
use crate::refresh::snapshot::Snapshot;
use crate::refresh::types::{chrono_dur, TokenError};
use crate::store::{BeginRefresh, ConnState, ConnectionRow};

/// The longest wait between attempts after a configuration refusal:
/// `retry_max` if shorter. A quarter of an hour lets a grant whose access
/// token lives a day (Keap) recover well before it expires once the
/// provider accepts the client again (a fix made at the provider needs no
/// reload here), at four calls an hour.
pub const REFUSED_RETRY_MAX: Duration = Duration::from_secs(15 * 60);

/// A failed refresh's class (see `provider::ProviderError`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Worth retrying later; `retry_after` is the provider's wish.
    Transient { retry_after: Option<Duration> },
    /// A configuration refusal: the grant is kept.
    Refused,
    /// A 2xx the daemon cannot use, whose refresh token is stored first.
    Unusable,
    /// The grant itself was rejected.
    Rejected,
}

impl Class {
    /// The class's name in history events.
    pub fn name(self) -> &'static str {
        match self {
            Class::Transient { .. } => "transient",
            Class::Refused => "refused",
            Class::Unusable => "unusable",
            Class::Rejected => "rejected",
        }
    }
}

/// Where a failure leaves the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub state: ConnState,
    /// Failures in a row, this one included.
    pub failures: u32,
    /// How long until the next attempt (`None`: never by itself).
    pub retry_in: Option<Duration>,
}

/// The state a failure of `class` leaves the grant in, given the failures
/// before it and a random `unit` in [0, 1) for the backoff's jitter.
pub fn plan(class: Class, failures_before: u32, refresh: &RefreshConfig, unit: f64) -> Plan {
    let failures = failures_before.saturating_add(1);
    match class {
        Class::Transient { retry_after } => Plan {
            state: ConnState::Retrying,
            failures,
            retry_in: Some(policy::retry_delay(failures, retry_after, refresh, unit)),
        },
        // Backing off gently would only hammer a provider that keeps
        // saying the same thing until someone changes the config.
        Class::Refused => Plan {
            state: ConnState::Retrying,
            failures,
            retry_in: Some(
                refresh
                    .retry_max
                    .min(REFUSED_RETRY_MAX)
                    .max(refresh.retry_initial),
            ),
        },
        Class::Unusable => plan(
            Class::Transient { retry_after: None },
            failures_before,
            refresh,
            unit,
        ),
        Class::Rejected => Plan {
            state: ConnState::AuthorizationRequired,
            failures: failures_before,
            retry_in: None,
        },
    }
}

/// Why a rejected grant needs a new authorization: the provider's words,
/// and, after an interrupted refresh, the likely cause.
pub fn rejected_reason(message: &str, interrupted_at: Option<DateTime<Utc>>) -> String {
    match interrupted_at {
        Some(t) => format!(
            "{message}; a refresh started at {} was interrupted before its result was stored, and the provider had most likely already rotated the refresh token: authorize again",
            t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        ),
        None => format!("{message}; authorize again"),
    }
}

/// A transient failure: `retrying`, backing off; the operator is told at
/// the first failure of a run.
pub async fn transient(
    shared: &Shared,
    slot: &Slot,
    attempt: &str,
    row: &ConnectionRow,
    message: String,
    retry_after: Option<Duration>,
) -> Result<Arc<Snapshot>, TokenError> {
    retry_later(
        shared,
        slot,
        attempt,
        row,
        message,
        Class::Transient { retry_after },
    )
    .await
}

/// `retrying` after a transient failure or an unusable answer.
async fn retry_later(
    shared: &Shared,
    slot: &Slot,
    attempt: &str,
    row: &ConnectionRow,
    message: String,
    class: Class,
) -> Result<Arc<Snapshot>, TokenError> {
    let settings = shared.settings();
    let p = plan(
        class,
        row.failures,
        &settings.refresh,
        rand::random::<f64>(),
    );
    let delay = p.retry_in.unwrap_or_default();
    let next = slot.snapshot().now(shared.clock()) + chrono_dur(delay);
    tracing::warn!(
        provider = %slot.provider,
        account = %slot.account,
        failures = p.failures,
        retry_in_secs = delay.as_secs(),
        "refresh failed, will retry: {message}"
    );
    slot.count_refresh("transient", None);
    shared
        .store
        .record_events(&[history::failed(
            slot,
            shared.clock().now(),
            class.name(),
            &message,
        )])
        .await;
    if p.failures == 1 {
        shared.notify(
            slot,
            EventKind::RefreshFailing,
            format!("refresh failed, retrying: {message}"),
        );
    }
    Ok(lease::finish(
        shared,
        slot,
        attempt,
        p.state,
        (Some(&message), p.failures, Some(next)),
    )
    .await?)
}

/// A configuration refusal: `retrying` with the provider's reason and
/// what to fix as `last_error`; the operator is told once per new reason.
/// A reload (`Engine::retry_failing_now`) or a forced refresh tries at
/// once.
pub async fn refused(
    shared: &Shared,
    slot: &Slot,
    attempt: &str,
    row: &ConnectionRow,
    message: String,
) -> Result<Arc<Snapshot>, TokenError> {
    let settings = shared.settings();
    let p = plan(Class::Refused, row.failures, &settings.refresh, 0.0);
    let delay = p.retry_in.unwrap_or_default();
    tracing::error!(
        provider = %slot.provider,
        account = %slot.account,
        failures = p.failures,
        retry_in_secs = delay.as_secs(),
        "refresh refused by the provider (the grant is kept; a reload or a forced refresh retries at once): {message}"
    );
    slot.count_refresh("refused", None);
    shared
        .store
        .record_events(&[history::failed(
            slot,
            shared.clock().now(),
            "refused",
            &message,
        )])
        .await;
    if row.last_error.as_deref() != Some(message.as_str()) {
        shared.notify(slot, EventKind::RefreshFailing, message.clone());
    }
    let next = shared.clock().now() + chrono_dur(delay);
    Ok(lease::finish(
        shared,
        slot,
        attempt,
        p.state,
        (Some(&message), p.failures, Some(next)),
    )
    .await?)
}

/// An unusable answer: its refresh token is stored first, with the access
/// token we already have (the provider has most likely rotated, so the
/// token we sent is spent), then the failure is recorded like a transient
/// one under a new lease, so the next attempt backs off and uses the
/// stored token. The caller gets the failure, not the old token: the
/// provider may have invalidated it when it rotated.
#[allow(clippy::too_many_arguments)]
pub async fn unusable(
    shared: &Arc<Shared>,
    slot: &Arc<Slot>,
    (attempt, base_generation, used): (&str, i64, SecretString),
    row: &ConnectionRow,
    message: String,
    refresh_token: SecretString,
    elapsed: Duration,
) -> Result<Arc<Snapshot>, TokenError> {
    let message = format!(
        "{message}; the refresh token in that answer was stored and the next attempt uses it"
    );
    tracing::error!(provider = %slot.provider, account = %slot.account, "{message}");
    let kept = TokenGrant {
        access_token: row.access_token.clone(),
        refresh_token: Some(refresh_token),
        token_type: row.token_type.clone(),
        scope: None,
        issued_at: row.issued_at,
        expires_at: row.expires_at,
        refresh_token_expires_in: None,
        extra: Default::default(),
    };
    commit::commit(
        shared,
        slot,
        attempt,
        base_generation,
        used,
        kept,
        elapsed,
        None,
    )
    .await?;
    let attempt = lease::new_attempt();
    let now = shared.clock().now();
    match shared
        .store
        .begin_refresh(
            slot.id,
            &shared.owner,
            &attempt,
            now,
            now + chrono_dur(LEASE),
            None,
        )
        .await?
    {
        BeginRefresh::Started(row) => {
            let snap = retry_later(shared, slot, &attempt, &row, message, Class::Unusable).await?;
            // The commit above moved the generation, which would read as a
            // successful refresh to a caller that forced this one.
            Err(slot.failure(&snap, shared.clock()))
        }
        // Someone else took over meanwhile: the token is stored, and their
        // attempt reports for itself.
        _ => Ok(slot.snapshot()),
    }
}

/// Parks the grant as `authorization_required`, unless a newer grant was
/// stored since `generation` was read (a previous holder of the lease
/// landed the grant it held, or a new authorization): that one is adopted
/// instead.
pub async fn rejected(
    shared: &Shared,
    slot: &Slot,
    (attempt, generation): (&str, i64),
    row: &ConnectionRow,
    reason: String,
) -> Result<Arc<Snapshot>, TokenError> {
    let p = plan(
        Class::Rejected,
        row.failures,
        &shared.settings().refresh,
        0.0,
    );
    let rejected = shared
        .store
        .reject_attempt(
            slot.id,
            (&shared.owner, attempt),
            generation,
            &reason,
            p.failures,
            &history::rejected(slot, shared.clock().now(), &reason),
        )
        .await?;
    let Some(r) = rejected else {
        tracing::info!(provider = %slot.provider, account = %slot.account, "the refresh token was rejected, but a newer grant was stored meanwhile; keeping it");
        return Ok(match shared.store.load_connection(slot.id).await? {
            Some(r) => slot.set(shared.snap_of(&r)),
            None => slot.snapshot(),
        });
    };
    tracing::error!(provider = %slot.provider, account = %slot.account, "grant needs a new authorization: {reason}");
    slot.count_refresh("rejected", None);
    shared.notify(slot, EventKind::AuthorizationRequired, reason.clone());
    Ok(slot.set(shared.snap_of(&r)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RefreshConfig {
        RefreshConfig::default()
    }

    #[test]
    fn a_transient_failure_retries_with_backoff_within_bounds() {
        let p = policy();
        let first = plan(Class::Transient { retry_after: None }, 0, &p, 0.0);
        assert_eq!(first.state, ConnState::Retrying);
        assert_eq!(first.failures, 1);
        assert_eq!(first.retry_in, Some(p.retry_initial), "floored");
        // Many failures later the ceiling is retry_max, never more.
        let late = plan(Class::Transient { retry_after: None }, 40, &p, 0.999_999);
        let wait = late.retry_in.unwrap();
        assert!(wait <= p.retry_max && wait > p.retry_max / 2, "{wait:?}");
        // The provider's Retry-After wins when longer, capped at retry_max.
        let asked = plan(
            Class::Transient {
                retry_after: Some(Duration::from_secs(7200)),
            },
            0,
            &p,
            0.0,
        );
        assert_eq!(
            asked.retry_in,
            Some(p.retry_max.min(Duration::from_secs(7200)))
        );
    }

    #[test]
    fn a_refusal_keeps_the_grant_and_retries_within_a_quarter_hour() {
        let p = policy();
        let r = plan(Class::Refused, 3, &p, 0.5);
        assert_eq!(r.state, ConnState::Retrying);
        assert_eq!(r.failures, 4);
        assert_eq!(
            r.retry_in,
            Some(p.retry_max.min(REFUSED_RETRY_MAX).max(p.retry_initial))
        );
        assert!(r.retry_in.unwrap() <= REFUSED_RETRY_MAX.max(p.retry_initial));
    }

    #[test]
    fn an_unusable_answer_is_retried_like_a_transient_failure() {
        let p = policy();
        assert_eq!(
            plan(Class::Unusable, 0, &p, 0.3),
            plan(Class::Transient { retry_after: None }, 0, &p, 0.3)
        );
    }

    #[test]
    fn only_a_rejection_ends_the_grant() {
        let p = policy();
        let r = plan(Class::Rejected, 2, &p, 0.5);
        assert_eq!(r.state, ConnState::AuthorizationRequired);
        assert_eq!(r.retry_in, None);
        assert_eq!(r.failures, 2, "a rejection is not counted as a retry");
        for class in [
            Class::Transient { retry_after: None },
            Class::Refused,
            Class::Unusable,
        ] {
            assert_eq!(
                plan(class, 0, &p, 0.5).state,
                ConnState::Retrying,
                "{class:?}"
            );
        }
    }

    #[test]
    fn a_rejection_after_an_interrupted_refresh_says_the_likely_cause() {
        let t = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let r = rejected_reason("invalid_grant", Some(t));
        assert!(
            r.starts_with("invalid_grant; a refresh started at 2027-"),
            "{r}"
        );
        assert!(r.contains("interrupted"), "{r}");
        assert_eq!(
            rejected_reason("invalid_grant", None),
            "invalid_grant; authorize again"
        );
    }
}
