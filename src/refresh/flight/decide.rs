//! The refresh decision, made under the lease on the grant as stored now
//! (another process may have rotated it since our snapshot): a pure
//! function of the stored row, the trigger, `now` and the policy.

use std::time::Duration;

use chrono::{DateTime, Utc};
use secrecy::SecretString;

use crate::config::RefreshConfig;
use crate::refresh::policy;
use crate::refresh::snapshot::timing_of;
use crate::refresh::types::Trigger;
use crate::store::{ConnState, ConnectionRow};

/// What a flight does with the grant it holds the lease on.
#[derive(Debug)]
pub enum Decision<'a> {
    /// Call the provider with this refresh token.
    Refresh(&'a SecretString),
    /// Nothing to do: the grant needs a new authorization, or it is fresh
    /// enough for this trigger (another process refreshed it). The lease
    /// is given back with the state as it is.
    Skip,
    /// It needs refreshing but the provider never issued a refresh token:
    /// only a new authorization helps.
    NoRefreshToken,
}

/// Said when a grant that needs refreshing has no refresh token.
pub const NO_REFRESH_TOKEN: &str = "the provider never issued a refresh token for this grant; authorize again (ask for offline access if the provider needs it)";

/// Decides whether the grant `row` is refreshed now.
///
/// - `Forced`: always.
/// - `OnDemand`: when a caller would get less than `min_validity`.
/// - `Scheduled`: at `at_fraction` of the lifetime (plus `jitter`,
///   bounded by `min_validity` and `keepalive`, see
///   [`policy::next_refresh_at`]), or at once after a failure or an
///   interrupted refresh (the scheduler only starts those once their
///   backoff has run out).
pub fn decide<'a>(
    trigger: Trigger,
    row: &'a ConnectionRow,
    now: DateTime<Utc>,
    refresh: &RefreshConfig,
    jitter: Duration,
) -> Decision<'a> {
    if row.state == ConnState::AuthorizationRequired {
        return Decision::Skip;
    }
    let timing = timing_of(row);
    let needed = match trigger {
        Trigger::Forced => true,
        Trigger::OnDemand => !policy::fresh_enough(&timing, now, refresh),
        Trigger::Scheduled => {
            row.interrupted_at.is_some()
                || row.last_error.is_some()
                || policy::next_due_at(&timing, &row.meta, refresh, jitter) <= now
        }
    };
    if !needed {
        return Decision::Skip;
    }
    match &row.refresh_token {
        Some(t) => Decision::Refresh(t),
        None => Decision::NoRefreshToken,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::refresh::snapshot::tests::row;

    fn t0() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).unwrap()
    }

    fn mins(n: i64) -> chrono::Duration {
        chrono::Duration::minutes(n)
    }

    /// A one-hour token issued at `t0`, with the default policy
    /// (`at_fraction` 0.75, `min_validity` 5 min).
    fn policy() -> RefreshConfig {
        RefreshConfig::default()
    }

    fn refreshes(d: Decision<'_>) -> bool {
        matches!(d, Decision::Refresh(_))
    }

    #[test]
    fn scheduled_refreshes_at_the_fraction_of_the_lifetime() {
        let r = row(ConnState::Refreshing);
        let p = policy();
        let at = t0()
            + chrono::Duration::from_std(Duration::from_secs(3600).mul_f64(p.at_fraction)).unwrap();
        assert!(!refreshes(decide(
            Trigger::Scheduled,
            &r,
            at - mins(1),
            &p,
            Duration::ZERO
        )));
        assert!(refreshes(decide(
            Trigger::Scheduled,
            &r,
            at,
            &p,
            Duration::ZERO
        )));
        // Jitter delays it, never past min_validity before expiry.
        let late = Duration::from_secs(10 * 60);
        assert!(!refreshes(decide(Trigger::Scheduled, &r, at, &p, late)));
        let latest = r.expires_at - chrono::Duration::from_std(p.min_validity).unwrap();
        assert!(refreshes(decide(
            Trigger::Scheduled,
            &r,
            latest,
            &p,
            Duration::from_secs(3600)
        )));
    }

    #[test]
    fn on_demand_refreshes_only_below_min_validity() {
        let r = row(ConnState::Refreshing);
        let p = policy();
        let edge = r.expires_at - chrono::Duration::from_std(p.min_validity).unwrap();
        // Past the scheduler's point, but still enough for a caller.
        assert!(!refreshes(decide(
            Trigger::OnDemand,
            &r,
            edge - mins(1),
            &p,
            Duration::ZERO
        )));
        assert!(refreshes(decide(
            Trigger::OnDemand,
            &r,
            edge + mins(1),
            &p,
            Duration::ZERO
        )));
    }

    #[test]
    fn a_failed_or_interrupted_grant_is_retried_by_the_scheduler_at_once() {
        let p = policy();
        let mut r = row(ConnState::Refreshing);
        // Long before the fraction: nothing to do...
        assert!(!refreshes(decide(
            Trigger::Scheduled,
            &r,
            t0(),
            &p,
            Duration::ZERO
        )));
        // ...unless the last attempt failed (its backoff has run out, or
        // the scheduler would not have started this flight)...
        r.last_error = Some("timeout".into());
        assert!(refreshes(decide(
            Trigger::Scheduled,
            &r,
            t0(),
            &p,
            Duration::ZERO
        )));
        // ...or was interrupted by a crash.
        r.last_error = None;
        r.interrupted_at = Some(t0());
        assert!(refreshes(decide(
            Trigger::Scheduled,
            &r,
            t0(),
            &p,
            Duration::ZERO
        )));
    }

    #[test]
    fn forced_always_refreshes_and_a_rejected_grant_never() {
        let p = policy();
        let r = row(ConnState::Refreshing);
        assert!(refreshes(decide(
            Trigger::Forced,
            &r,
            t0(),
            &p,
            Duration::ZERO
        )));
        let rejected = row(ConnState::AuthorizationRequired);
        for trigger in [Trigger::Forced, Trigger::OnDemand, Trigger::Scheduled] {
            let late = rejected.expires_at + mins(1);
            assert!(matches!(
                decide(trigger, &rejected, late, &p, Duration::ZERO),
                Decision::Skip
            ));
        }
    }

    #[test]
    fn keepalive_counts_from_the_last_token_when_there_is_no_refresh_token() {
        // A client-credentials row created long ago and renewed an hour
        // before `t0`, with a day-long token: not due 10 minutes later,
        // although keepalive (30 d) has long passed since its creation.
        let p = policy();
        let mut r = row(ConnState::Active);
        r.refresh_token = None;
        r.issued_at = t0() - mins(60);
        r.expires_at = r.issued_at + chrono::Duration::days(1);
        r.refresh_token_issued_at = t0() - chrono::Duration::days(60);
        assert!(matches!(
            decide(Trigger::Scheduled, &r, t0() + mins(10), &p, Duration::ZERO),
            Decision::Skip
        ));
        // Nor with a refresh token the provider keeps (no rotation):
        // keepalive counts from the last refresh, an hour ago.
        r.refresh_token = Some(SecretString::from("rt".to_string()));
        assert!(matches!(
            decide(Trigger::Scheduled, &r, t0() + mins(10), &p, Duration::ZERO),
            Decision::Skip
        ));
        // A token living longer than keepalive is refreshed at keepalive.
        r.expires_at = r.issued_at + chrono::Duration::days(365);
        let keepalive = r.issued_at + chrono::Duration::from_std(p.keepalive).unwrap();
        assert!(matches!(
            decide(
                Trigger::Scheduled,
                &r,
                keepalive - mins(1),
                &p,
                Duration::ZERO
            ),
            Decision::Skip
        ));
        assert!(refreshes(decide(
            Trigger::Scheduled,
            &r,
            keepalive + mins(1),
            &p,
            Duration::ZERO
        )));
    }

    #[test]
    fn no_refresh_token_is_said_only_when_one_is_needed() {
        let p = policy();
        let mut r = row(ConnState::Refreshing);
        r.refresh_token = None;
        assert!(matches!(
            decide(Trigger::OnDemand, &r, t0(), &p, Duration::ZERO),
            Decision::Skip
        ));
        assert!(matches!(
            decide(Trigger::Forced, &r, t0(), &p, Duration::ZERO),
            Decision::NoRefreshToken
        ));
    }
}
