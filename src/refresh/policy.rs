//! When to refresh and how long to back off: pure functions of stored
//! absolute instants and a `now` the caller chooses (the engine passes each
//! token's `clock::Anchor::now`, which a wall clock set back cannot move
//! backwards), so a suspended laptop or a clock jump is caught up at the
//! next tick instead of sleeping through a refresh.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::config::RefreshConfig;
use crate::store::GrantMeta;

/// What the policy needs to know about one connection.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub issued_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub refresh_token_issued_at: DateTime<Utc>,
}

fn chrono(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

/// A stable per-connection share of `jitter`, in `[0, jitter)`: derived
/// from the connection's identity so a restart does not reshuffle the
/// schedule.
pub fn stable_jitter(provider: &str, account: &str, jitter: Duration) -> Duration {
    if jitter.is_zero() {
        return Duration::ZERO;
    }
    // FNV-1a: tiny, deterministic across runs and platforms.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in provider.bytes().chain([0u8]).chain(account.bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let frac = (h >> 11) as f64 / (1u64 << 53) as f64;
    jitter.mul_f64(frac)
}

/// The instant the scheduler should refresh this connection: `at_fraction`
/// of the lifetime plus jitter, but never later than the point where a
/// caller would get less than `min_validity`, and never later than
/// `keepalive` after the last refresh (the grant's last use).
pub fn next_refresh_at(t: &Timing, policy: &RefreshConfig, jitter: Duration) -> DateTime<Utc> {
    let lifetime = (t.expires_at - t.issued_at).max(chrono::Duration::zero());
    let lifetime_std = lifetime.to_std().unwrap_or_default();
    let planned = t.issued_at + chrono(lifetime_std.mul_f64(policy.at_fraction)) + chrono(jitter);
    let latest = t.expires_at - chrono(effective_min_validity(t, policy));
    // Counted from the last use, not from the refresh token's issue: a
    // provider that keeps its refresh token (no rotation: Google) never
    // moves that issue, and counting from it would make every pass due
    // once `keepalive` had passed since the authorization.
    let keepalive = t.issued_at.max(t.refresh_token_issued_at) + chrono(policy.keepalive);
    planned.min(latest).min(keepalive)
}

/// When a rolling refresh token (SPEC 11) must be used to stay alive:
/// `at_fraction` of the way from its last use (the last refresh,
/// `issued_at`) to its end. `None` when its end is unknown, or fixed
/// (refreshing cannot push a hard cap back, so trying would only spend
/// calls).
pub fn keep_refresh_token_alive_at(
    t: &Timing,
    meta: &GrantMeta,
    policy: &RefreshConfig,
) -> Option<DateTime<Utc>> {
    let end = meta.refresh_token_expires_at?;
    // An end at or before the last refresh was not pushed back by it:
    // chasing it would refresh at every pass.
    if meta.refresh_token_end_is_fixed() || end <= t.issued_at {
        return None;
    }
    let life = (end - t.issued_at).to_std().unwrap_or_default();
    Some(t.issued_at + chrono(life.mul_f64(policy.at_fraction)))
}

/// The instant the scheduler refreshes this connection: the earlier of
/// the access token's [`next_refresh_at`] and the point that keeps a
/// rolling refresh token alive ([`keep_refresh_token_alive_at`]).
pub fn next_due_at(
    t: &Timing,
    meta: &GrantMeta,
    policy: &RefreshConfig,
    jitter: Duration,
) -> DateTime<Utc> {
    let planned = next_refresh_at(t, policy, jitter);
    keep_refresh_token_alive_at(t, meta, policy).map_or(planned, |k| planned.min(k))
}

/// `min_validity`, except for tokens that live less than twice as long:
/// those could never satisfy it, and every token request would refresh,
/// so half their lifetime stands in. For every lifetime of at least
/// `2 × min_validity` (Keap's 24 h against 5 min) this is `min_validity`
/// exactly, as SPEC 3 promises.
pub fn effective_min_validity(t: &Timing, policy: &RefreshConfig) -> Duration {
    let lifetime = (t.expires_at - t.issued_at).to_std().unwrap_or_default();
    policy.min_validity.min(lifetime / 2)
}

/// Whether the token satisfies a caller at `now`.
pub fn fresh_enough(t: &Timing, now: DateTime<Utc>, policy: &RefreshConfig) -> bool {
    t.expires_at - now >= chrono(effective_min_validity(t, policy))
}

/// Exponential backoff with full jitter, floored at `retry_initial` so a
/// failing connection costs the provider at most `3600 / retry_initial`
/// calls an hour, and capped at `retry_max`. `failures` counts the
/// failures so far (1 after the first). `unit` is a random number in [0, 1).
pub fn backoff(failures: u32, policy: &RefreshConfig, unit: f64) -> Duration {
    let exp = failures.saturating_sub(1).min(30);
    let ceiling = policy
        .retry_initial
        .saturating_mul(1u32 << exp.min(20))
        .min(policy.retry_max)
        .max(policy.retry_initial);
    ceiling
        .mul_f64(unit.clamp(0.0, 1.0))
        .max(policy.retry_initial)
}

/// The provider's `Retry-After` wins over our own backoff when longer, but
/// is capped at `retry_max` so a hostile or buggy header cannot park a
/// connection for days.
pub fn retry_delay(
    failures: u32,
    retry_after: Option<Duration>,
    policy: &RefreshConfig,
    unit: f64,
) -> Duration {
    let own = backoff(failures, policy, unit);
    match retry_after {
        Some(ra) => own.max(ra.min(policy.retry_max)),
        None => own,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RefreshConfig {
        RefreshConfig::default()
    }

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap()
    }

    #[test]
    fn a_rolling_refresh_token_shorter_than_the_access_token_is_kept_alive() {
        let t = Timing {
            issued_at: at(0),
            expires_at: at(86400),
            refresh_token_issued_at: at(0),
        };
        let mut meta = GrantMeta {
            refresh_token_expires_at: Some(at(3600)),
            ..GrantMeta::default()
        };
        assert_eq!(next_due_at(&t, &meta, &policy(), Duration::ZERO), at(2700));
        // A fixed end is not chased.
        meta.refresh_token_cap_at = Some(at(3600));
        let planned = next_refresh_at(&t, &policy(), Duration::ZERO);
        assert_eq!(next_due_at(&t, &meta, &policy(), Duration::ZERO), planned);
        assert_eq!(
            next_due_at(&t, &GrantMeta::default(), &policy(), Duration::ZERO),
            planned
        );
    }

    #[test]
    fn keap_day_token_refreshes_at_three_quarters() {
        let t = Timing {
            issued_at: at(0),
            expires_at: at(86400),
            refresh_token_issued_at: at(0),
        };
        let due = next_refresh_at(&t, &policy(), Duration::ZERO);
        assert_eq!(due, at(64800)); // 18 h
        let due = next_refresh_at(&t, &policy(), Duration::from_secs(300));
        assert_eq!(due, at(65100));
    }

    #[test]
    fn never_later_than_min_validity_before_expiry() {
        let t = Timing {
            issued_at: at(0),
            expires_at: at(600),
            refresh_token_issued_at: at(0),
        };
        // 0.75 * 600 + 10 min jitter would be past expiry; with 5 min of
        // min_validity the refresh must happen by 300 s.
        let due = next_refresh_at(&t, &policy(), Duration::from_secs(600));
        assert_eq!(due, at(300));
        assert!(fresh_enough(&t, at(299), &policy()));
        assert!(!fresh_enough(&t, at(301), &policy()));
        let day = Timing {
            issued_at: at(0),
            expires_at: at(86400),
            refresh_token_issued_at: at(0),
        };
        assert!(fresh_enough(&day, at(86400 - 300), &policy()));
        assert!(!fresh_enough(&day, at(86400 - 299), &policy()));
    }

    #[test]
    fn short_tokens_do_not_refresh_on_every_request() {
        let t = Timing {
            issued_at: at(0),
            expires_at: at(4),
            refresh_token_issued_at: at(0),
        };
        assert_eq!(
            effective_min_validity(&t, &policy()),
            Duration::from_secs(2)
        );
        assert!(fresh_enough(&t, at(2), &policy()));
        assert!(!fresh_enough(&t, at(3), &policy()));
        assert_eq!(next_refresh_at(&t, &policy(), Duration::ZERO), at(2));
    }

    #[test]
    fn keepalive_counts_from_the_last_refresh_when_the_refresh_token_is_kept() {
        // Authorized 60 days ago, the refresh token never rotated, the last
        // refresh an hour ago with a one-hour token: due at 45 minutes of
        // its lifetime, not at once.
        let day = 86400;
        let t = Timing {
            issued_at: at(60 * day),
            expires_at: at(60 * day + 3600),
            refresh_token_issued_at: at(0),
        };
        assert_eq!(
            next_refresh_at(&t, &policy(), Duration::ZERO),
            at(60 * day + 2700)
        );
    }

    #[test]
    fn keepalive_bounds_long_lived_tokens() {
        let t = Timing {
            issued_at: at(0),
            expires_at: at(365 * 86400),
            refresh_token_issued_at: at(0),
        };
        assert_eq!(
            next_refresh_at(&t, &policy(), Duration::ZERO),
            at(30 * 86400)
        );
    }

    #[test]
    fn stable_jitter_is_stable_and_bounded() {
        let j = Duration::from_secs(600);
        let a = stable_jitter("keap", "default", j);
        assert_eq!(a, stable_jitter("keap", "default", j));
        assert!(a < j);
        assert_ne!(a, stable_jitter("keap", "other", j));
    }

    #[test]
    fn backoff_grows_and_is_bounded() {
        let p = policy();
        assert_eq!(backoff(1, &p, 0.0), p.retry_initial);
        assert_eq!(backoff(1, &p, 0.999), p.retry_initial);
        assert!(backoff(4, &p, 0.999) > Duration::from_secs(200));
        assert!(backoff(50, &p, 0.999) <= p.retry_max);
        assert_eq!(
            retry_delay(1, Some(Duration::from_secs(120)), &p, 0.0),
            Duration::from_secs(120)
        );
        assert_eq!(
            retry_delay(1, Some(Duration::from_secs(99999)), &p, 0.0),
            p.retry_max
        );
    }
}
