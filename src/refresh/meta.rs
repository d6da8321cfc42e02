//! What is kept about a grant beside its tokens (SPEC 11): the
//! connection's extras and when its refresh token dies. Pure functions of
//! a token answer, the provider's declared lifetime and what was stored
//! before; the flights and the landing of a new grant call them, the store
//! writes the result with the grant.
//!
//! Must not: read a clock (every instant comes from the grant), or fail:
//! nothing here is a reason to refuse or lose a grant.

use chrono::{DateTime, Utc};

use crate::provider::presets::RefreshTokenLifetime;
use crate::provider::TokenGrant;
use crate::refresh::types::chrono_dur;
use crate::store::GrantMeta;

/// A new authorization (or import): the grant's extras (its answer's,
/// with what the landing added: the callback's query, the API lists
/// fetched after it); the refresh token's end from the answer's stated
/// lifetime, else the rolling lifetime, else the hard cap, never past the
/// cap.
pub fn authorized(grant: &TokenGrant, lifetime: &RefreshTokenLifetime) -> GrantMeta {
    let t = grant.issued_at;
    let cap = lifetime.max.map(|m| t + chrono_dur(m));
    let end = stated_or_idle(grant, lifetime).or(cap);
    GrantMeta {
        extra: grant.extra.clone(),
        refresh_token_expires_at: earlier(end, cap),
        refresh_token_cap_at: cap,
    }
}

/// A refresh: the stored extras with the answer's new values over them;
/// the refresh token's end moved by what the answer says (a stated
/// lifetime, or the rolling lifetime restarted by this use), kept as a
/// fixed end where nothing restarts it, never past the cap. A stated end that this
/// refresh did not push back (by at least half the time since the grant
/// `previous_issued_at`) is an end refreshing cannot move: it becomes the
/// cap, so the scheduler stops trying to keep it alive and the
/// `refresh_token_expiring` warning applies.
pub fn refreshed(
    prior: &GrantMeta,
    previous_issued_at: DateTime<Utc>,
    grant: &TokenGrant,
    lifetime: &RefreshTokenLifetime,
) -> GrantMeta {
    let mut extra = prior.extra.clone();
    extra.extend(grant.extra.clone());
    let mut cap = prior.refresh_token_cap_at;
    let end = match stated_or_idle(grant, lifetime) {
        Some(new_end) => {
            if let (Some(_), Some(old_end)) = (
                grant.refresh_token_expires_in,
                prior.refresh_token_expires_at,
            ) {
                let since = grant.issued_at - previous_issued_at;
                if since > chrono::Duration::zero() && new_end - old_end < since / 2 {
                    cap = earlier(cap, Some(new_end));
                }
            }
            Some(new_end)
        }
        // Nothing restarted it (the answer states no lifetime and none is
        // declared): refreshing does not move it, so it is an end to warn
        // about, not one to chase (chasing would refresh ever more often).
        None => {
            cap = earlier(cap, prior.refresh_token_expires_at);
            prior.refresh_token_expires_at
        }
    };
    GrantMeta {
        extra,
        refresh_token_expires_at: earlier(end, cap).or(cap),
        refresh_token_cap_at: cap,
    }
}

/// The refresh-token end worth a `refresh_token_expiring` warning, and
/// when it is due (`warn_before` ahead): an end refreshing cannot push
/// back, either fixed or rolling while refreshes are `failing`. `None`
/// for an unknown end, or a rolling one the scheduler keeps alive.
pub fn warning(
    meta: &GrantMeta,
    failing: bool,
    warn_before: std::time::Duration,
) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
    let end = meta.refresh_token_expires_at?;
    (failing || meta.refresh_token_end_is_fixed()).then(|| (end, end - chrono_dur(warn_before)))
}

/// The end the answer states, else the rolling lifetime counted from now.
fn stated_or_idle(grant: &TokenGrant, lifetime: &RefreshTokenLifetime) -> Option<DateTime<Utc>> {
    grant
        .refresh_token_expires_in
        .or(lifetime.idle)
        .map(|d| grant.issued_at + chrono_dur(d))
}

fn earlier(a: Option<DateTime<Utc>>, b: Option<DateTime<Utc>>) -> Option<DateTime<Utc>> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, None) => a,
        (None, b) => b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Extras;
    use secrecy::SecretString;
    use std::time::Duration;

    const DAY: u64 = 86_400;

    fn at(days: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + days * DAY as i64, 0).unwrap()
    }

    fn grant(issued: DateTime<Utc>, stated: Option<u64>) -> TokenGrant {
        TokenGrant {
            access_token: SecretString::from("a"),
            refresh_token: Some(SecretString::from("r")),
            token_type: "Bearer".into(),
            scope: None,
            issued_at: issued,
            expires_at: issued + chrono::Duration::hours(1),
            refresh_token_expires_in: stated.map(|d| Duration::from_secs(d * DAY)),
            extra: Extras::new(),
        }
    }

    fn lifetime(idle: Option<u64>, max: Option<u64>) -> RefreshTokenLifetime {
        RefreshTokenLifetime {
            idle: idle.map(|d| Duration::from_secs(d * DAY)),
            max: max.map(|d| Duration::from_secs(d * DAY)),
        }
    }

    #[test]
    fn the_answer_wins_over_the_declared_lifetime() {
        let m = authorized(&grant(at(0), Some(10)), &lifetime(Some(45), None));
        assert_eq!(m.refresh_token_expires_at, Some(at(10)));
        assert!(!m.refresh_token_end_is_fixed());
        let m = authorized(&grant(at(0), None), &lifetime(Some(45), None));
        assert_eq!(m.refresh_token_expires_at, Some(at(45)));
        let m = authorized(&grant(at(0), None), &lifetime(None, None));
        assert_eq!(m, GrantMeta::default());
    }

    #[test]
    fn a_rolling_end_moves_and_a_cap_does_not() {
        let l = lifetime(Some(100), Some(5 * 365));
        let m = authorized(&grant(at(0), None), &l);
        assert_eq!(m.refresh_token_expires_at, Some(at(100)));
        assert_eq!(m.refresh_token_cap_at, Some(at(5 * 365)));
        let m = refreshed(&m, at(0), &grant(at(50), None), &l);
        assert_eq!(m.refresh_token_expires_at, Some(at(150)));
        let m = refreshed(&m, at(50), &grant(at(5 * 365 - 10), None), &l);
        assert_eq!(m.refresh_token_expires_at, Some(at(5 * 365)));
        assert!(m.refresh_token_end_is_fixed());
        // A cap alone is fixed from the start.
        let m = authorized(&grant(at(0), None), &lifetime(None, Some(30)));
        assert_eq!(m.refresh_token_expires_at, Some(at(30)));
        assert!(m.refresh_token_end_is_fixed());
        let m = refreshed(&m, at(0), &grant(at(20), None), &lifetime(None, Some(30)));
        assert_eq!(m.refresh_token_expires_at, Some(at(30)));
    }

    #[test]
    fn a_stated_end_that_does_not_move_becomes_fixed() {
        let l = lifetime(None, None);
        let m = authorized(&grant(at(0), Some(60)), &l);
        let m = refreshed(&m, at(0), &grant(at(10), Some(50)), &l);
        assert_eq!(m.refresh_token_expires_at, Some(at(60)));
        assert!(m.refresh_token_end_is_fixed());
        let rolling = authorized(&grant(at(0), Some(60)), &l);
        let rolling = refreshed(&rolling, at(0), &grant(at(10), Some(60)), &l);
        assert_eq!(rolling.refresh_token_expires_at, Some(at(70)));
        assert!(!rolling.refresh_token_end_is_fixed());
    }

    #[test]
    fn an_end_stated_once_and_never_again_is_fixed_not_chased() {
        // The code exchange states 60 days, refreshes state nothing and no
        // lifetime is declared: nothing pushes the end back.
        let l = lifetime(None, None);
        let m = authorized(&grant(at(0), Some(60)), &l);
        assert!(!m.refresh_token_end_is_fixed());
        let m = refreshed(&m, at(0), &grant(at(45), None), &l);
        assert_eq!(m.refresh_token_expires_at, Some(at(60)));
        assert!(m.refresh_token_end_is_fixed());
        let t = crate::refresh::policy::Timing {
            issued_at: at(45),
            expires_at: at(46),
            refresh_token_issued_at: at(45),
        };
        let p = crate::config::RefreshConfig::default();
        assert_eq!(
            crate::refresh::policy::keep_refresh_token_alive_at(&t, &m, &p),
            None
        );
    }

    #[test]
    fn only_an_end_that_cannot_be_pushed_back_is_warned_about() {
        let week = Duration::from_secs(7 * DAY);
        let rolling = authorized(&grant(at(0), None), &lifetime(Some(45), None));
        assert_eq!(warning(&rolling, false, week), None);
        assert_eq!(warning(&rolling, true, week), Some((at(45), at(38))));
        let capped = authorized(&grant(at(0), None), &lifetime(None, Some(30)));
        assert_eq!(warning(&capped, false, week), Some((at(30), at(23))));
        assert_eq!(warning(&GrantMeta::default(), true, week), None);
    }

    #[test]
    fn extras_are_merged_newest_first() {
        let mut g = grant(at(0), None);
        g.extra.insert("realmId".into(), "123".into());
        g.extra
            .insert("instance_url".into(), "https://a.example".into());
        let m = authorized(&g, &lifetime(None, None));
        assert_eq!(m.extra.len(), 2);
        let mut g = grant(at(1), None);
        g.extra
            .insert("instance_url".into(), "https://b.example".into());
        let m = refreshed(&m, at(0), &g, &lifetime(None, None));
        assert_eq!(m.extra["instance_url"], "https://b.example");
        assert_eq!(m.extra["realmId"], "123");
    }
}
