//! The served state of one connection: what the engine hands out and
//! reports, replaced as a whole after each commit.
//!
//! A snapshot is an enum, so a state carries exactly what it has: an
//! active grant has no error, a retrying one always says what failed and
//! when it is tried again, a rejected one says why it needs a new
//! authorization, and a row the store could not read has no token at all
//! (nothing in it is real, so nothing can serve it by mistake). SPEC's
//! state names ([`ConnState`], stored and serialised) are derived from it
//! at the edge ([`Snapshot::state`]).
//!
//! Must not: read the clock itself, touch storage, or know about leases
//! and flights.

use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};

use super::clock::{Anchor, Clock};
use super::policy::{self, Timing};
use super::token_json::{TokenFields, TokenJson};
use crate::config::RefreshConfig;
use crate::store::{ConnState, ConnectionRow, GrantMeta};
use std::sync::{Arc, OnceLock};

/// Said when a row is `retrying` without a stored reason.
const NO_REASON_RETRYING: &str = "the refresh did not complete";
/// Said when a row is `authorization_required` without a stored reason.
const NO_REASON_REJECTED: &str = "the grant was rejected";

/// The refresh policy's view of a stored row, which reports show too. A
/// grant without a refresh token (a client-credentials grant, or one the
/// provider never gave a refresh token) never moves its stored
/// `refresh_token_issued_at`: shown as is, the age of a refresh token it
/// does not have would grow forever in `/v1/connections`, the age metric
/// and the dashboard. It shows the access token's issue instead.
pub fn timing_of(r: &ConnectionRow) -> Timing {
    Timing {
        issued_at: r.issued_at,
        expires_at: r.expires_at,
        refresh_token_issued_at: match r.refresh_token {
            Some(_) => r.refresh_token_issued_at,
            None => r.issued_at.max(r.refresh_token_issued_at),
        },
    }
}

/// The access token a snapshot serves and where it was taken in.
#[derive(Clone)]
pub struct HeldToken {
    pub access_token: SecretString,
    pub token_type: String,
    pub timing: Timing,
    pub refreshed_at: Option<DateTime<Utc>>,
    /// Where this access token was taken in, on both clocks.
    pub anchor: Anchor,
}

/// What a failing grant carries: why, how often, and when it is tried
/// again (`None`: at the next scheduler pass).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failing {
    pub last_error: String,
    pub failures: u32,
    pub next_attempt_at: Option<DateTime<Utc>>,
}

/// The lifecycle state of a connection, with what each state has.
#[derive(Clone)]
pub enum TokenState {
    /// Refreshed on schedule; nothing is wrong.
    Active { token: HeldToken },
    /// A refresh holds the lease (this process's or another's); `failing`
    /// is what the previous attempt left, if it failed.
    Refreshing {
        token: HeldToken,
        failing: Option<Failing>,
    },
    /// A refresh failed (transient, refused, unusable, interrupted, or a
    /// grant held in memory); the token is still served while valid.
    Retrying { token: HeldToken, failing: Failing },
    /// The provider rejected the grant: only a new authorization helps.
    /// The token is still served while valid.
    AuthorizationRequired { token: HeldToken, reason: String },
    /// The stored row cannot be read (see `store::ConnectionRow::unreadable`):
    /// no token, and nothing refreshes, parks or revokes from it.
    Unreadable { why: String },
}

/// The in-memory view of one connection, replaced after each commit.
#[derive(Clone)]
pub struct Snapshot {
    /// The stored grant's generation (also kept for an unreadable row, so
    /// comparing versions does not re-read it as changed).
    pub generation: i64,
    pub state: TokenState,
    /// What the stored grant keeps beside its tokens (extras, the refresh
    /// token's end); shared, since snapshots are cloned on every change.
    pub meta: Arc<GrantMeta>,
    /// The token's `/v1/token` answer, rendered on first use. Valid for
    /// the token and `meta` above: a clone starts without it, and
    /// whatever replaces the token clears it.
    answer: AnswerCache,
}

/// A lazily rendered answer that a clone does not inherit, so that a
/// snapshot cloned and then changed can never serve a stale rendering.
#[derive(Default)]
struct AnswerCache(OnceLock<Arc<TokenJson>>);

impl Clone for AnswerCache {
    fn clone(&self) -> AnswerCache {
        AnswerCache::default()
    }
}

impl Snapshot {
    /// The snapshot of a stored row, its token taken in at `anchor`.
    pub fn from_row(r: &ConnectionRow, anchor: Anchor) -> Snapshot {
        let token = || HeldToken {
            access_token: r.access_token.clone(),
            token_type: r.token_type.clone(),
            timing: timing_of(r),
            refreshed_at: r.refreshed_at,
            anchor,
        };
        let failing = |last_error: String| Failing {
            last_error,
            failures: r.failures,
            next_attempt_at: r.next_attempt_at,
        };
        let state = if let Some(why) = &r.unreadable {
            TokenState::Unreadable { why: why.clone() }
        } else {
            match r.state {
                ConnState::Active => TokenState::Active { token: token() },
                ConnState::Refreshing => TokenState::Refreshing {
                    token: token(),
                    failing: r.last_error.clone().map(failing),
                },
                ConnState::Retrying => TokenState::Retrying {
                    token: token(),
                    failing: failing(
                        r.last_error
                            .clone()
                            .unwrap_or_else(|| NO_REASON_RETRYING.into()),
                    ),
                },
                ConnState::AuthorizationRequired => TokenState::AuthorizationRequired {
                    token: token(),
                    reason: r
                        .last_error
                        .clone()
                        .unwrap_or_else(|| NO_REASON_REJECTED.into()),
                },
            }
        };
        Snapshot {
            generation: r.generation,
            state,
            meta: Arc::new(r.meta.clone()),
            answer: AnswerCache::default(),
        }
    }

    /// Whether `other` serves the same token as this one (access token,
    /// type, expiry and extras), whatever the state of each: all that
    /// mirrors of the served token (token files) write.
    pub fn serves_same_token_as(&self, other: &Snapshot) -> bool {
        let same_meta = Arc::ptr_eq(&self.meta, &other.meta) || self.meta == other.meta;
        same_meta
            && match (self.token(), other.token()) {
                (None, None) => true,
                (Some(a), Some(b)) => {
                    a.timing.expires_at == b.timing.expires_at
                        && a.token_type == b.token_type
                        && a.access_token.expose_secret() == b.access_token.expose_secret()
                }
                _ => false,
            }
    }

    /// The `/v1/token` answer of this snapshot's token for
    /// `provider/account` (the slot's names, fixed for its life), rendered
    /// once; `None` if the row could not be read. Whether the token may
    /// be served is the caller's decision.
    pub fn answer(&self, provider: &str, account: &str) -> Option<&Arc<TokenJson>> {
        let token = self.token()?;
        Some(self.answer.0.get_or_init(|| {
            Arc::new(TokenJson::render(&TokenFields {
                provider,
                account,
                access_token: secrecy::ExposeSecret::expose_secret(&token.access_token),
                token_type: &token.token_type,
                expires_at: token.timing.expires_at,
                extra: &self.meta.extra,
            }))
        }))
    }

    /// SPEC's name of the state (`/v1/connections`, `status`, metrics).
    pub fn state(&self) -> ConnState {
        match self.state {
            TokenState::Active { .. } => ConnState::Active,
            TokenState::Refreshing { .. } => ConnState::Refreshing,
            TokenState::Retrying { .. } => ConnState::Retrying,
            TokenState::AuthorizationRequired { .. } | TokenState::Unreadable { .. } => {
                ConnState::AuthorizationRequired
            }
        }
    }

    /// The token served, unless the row could not be read.
    pub fn token(&self) -> Option<&HeldToken> {
        match &self.state {
            TokenState::Active { token }
            | TokenState::Refreshing { token, .. }
            | TokenState::Retrying { token, .. }
            | TokenState::AuthorizationRequired { token, .. } => Some(token),
            TokenState::Unreadable { .. } => None,
        }
    }

    fn token_mut(&mut self) -> Option<&mut HeldToken> {
        match &mut self.state {
            TokenState::Active { token }
            | TokenState::Refreshing { token, .. }
            | TokenState::Retrying { token, .. }
            | TokenState::AuthorizationRequired { token, .. } => Some(token),
            TokenState::Unreadable { .. } => None,
        }
    }

    /// The token's timing, unless the row could not be read.
    pub fn timing(&self) -> Option<&Timing> {
        self.token().map(|t| &t.timing)
    }

    /// What failed, as reported: the retry reason, the rejection, or why
    /// the row cannot be read.
    pub fn last_error(&self) -> Option<&str> {
        match &self.state {
            TokenState::Active { .. } => None,
            TokenState::Refreshing { failing, .. } => failing.as_ref().map(|f| &*f.last_error),
            TokenState::Retrying { failing, .. } => Some(&failing.last_error),
            TokenState::AuthorizationRequired { reason, .. } => Some(reason),
            TokenState::Unreadable { why } => Some(why),
        }
    }

    /// The failure record, when the grant is failing and will be retried.
    pub fn failing(&self) -> Option<&Failing> {
        match &self.state {
            TokenState::Refreshing { failing, .. } => failing.as_ref(),
            TokenState::Retrying { failing, .. } => Some(failing),
            _ => None,
        }
    }

    /// Failed attempts in a row.
    pub fn failures(&self) -> u32 {
        self.failing().map_or(0, |f| f.failures)
    }

    /// When a failing grant is tried again.
    pub fn next_attempt_at(&self) -> Option<DateTime<Utc>> {
        self.failing().and_then(|f| f.next_attempt_at)
    }

    /// Whether only a new authorization helps (rejected, or unreadable).
    pub fn needs_authorization(&self) -> bool {
        matches!(
            self.state,
            TokenState::AuthorizationRequired { .. } | TokenState::Unreadable { .. }
        )
    }

    /// Whether callers are answered from this snapshot instead of
    /// refreshing: the grant needs a new authorization, or its backoff
    /// has not run out.
    pub fn parked(&self, now: DateTime<Utc>) -> bool {
        self.needs_authorization() || self.next_attempt_at().is_some_and(|t| t > now)
    }

    /// The instant to judge this token's expiry by (see [`Anchor::now`]).
    pub fn now(&self, clock: &dyn Clock) -> DateTime<Utc> {
        match self.token() {
            Some(t) => t.anchor.now(clock),
            None => clock.now(),
        }
    }

    /// Whether the token satisfies a caller at `now` (`min_validity`).
    pub fn fresh_enough(&self, now: DateTime<Utc>, refresh: &RefreshConfig) -> bool {
        self.timing()
            .is_some_and(|t| policy::fresh_enough(t, now, refresh))
    }

    /// The token's expiry if it is still valid at `now`.
    pub fn valid_until(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.timing()
            .map(|t| t.expires_at)
            .filter(|expires_at| *expires_at > now)
    }

    /// The same token, due at the next scheduler pass instead of after its
    /// backoff; `false` if it was not waiting for one.
    pub fn retry_now(&mut self, now: DateTime<Utc>) -> bool {
        match &mut self.state {
            TokenState::Retrying { failing, .. }
                if failing.next_attempt_at.is_some_and(|t| t > now) =>
            {
                failing.next_attempt_at = None;
                true
            }
            _ => false,
        }
    }

    /// The same token, now failing with `last_error` (one more failure),
    /// tried again at `next_attempt_at`. An unreadable row stays as it is.
    pub fn failed(self, last_error: String, next_attempt_at: DateTime<Utc>) -> Snapshot {
        let failures = self.failures().saturating_add(1);
        let state = match self.state {
            TokenState::Active { token }
            | TokenState::Refreshing { token, .. }
            | TokenState::Retrying { token, .. }
            | TokenState::AuthorizationRequired { token, .. } => TokenState::Retrying {
                token,
                failing: Failing {
                    last_error,
                    failures,
                    next_attempt_at: Some(next_attempt_at),
                },
            },
            s @ TokenState::Unreadable { .. } => s,
        };
        Snapshot {
            generation: self.generation,
            state,
            meta: self.meta,
            answer: self.answer,
        }
    }

    /// The same state serving `token` instead; an unreadable row stays as
    /// it is.
    pub fn serving(mut self, token: HeldToken) -> Snapshot {
        if let Some(t) = self.token_mut() {
            *t = token;
            self.answer = AnswerCache::default();
        }
        self
    }

    /// Takes over `older`'s anchor when it serves the same token: it was
    /// taken in once, and re-anchoring it would forget a clock jump since.
    pub fn keep_anchor_of(&mut self, older: &Snapshot) {
        if self.generation != older.generation {
            return;
        }
        if let (Some(new), Some(old)) = (self.token_mut(), older.token()) {
            if new.timing.expires_at == old.timing.expires_at {
                new.anchor = old.anchor;
            }
        }
    }

    /// What to write back when a lease is given up without a result: the
    /// state the connection had, with its failure record (a snapshot taken
    /// while refreshing reads as what it was before).
    pub fn journal(&self) -> (ConnState, Option<&str>, u32, Option<DateTime<Utc>>) {
        let state = match (self.state(), self.failing()) {
            (ConnState::Refreshing, Some(_)) => ConnState::Retrying,
            (ConnState::Refreshing, None) => ConnState::Active,
            (s, _) => s,
        };
        (
            state,
            self.last_error(),
            self.failures(),
            self.next_attempt_at(),
        )
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::refresh::clock::TestClock;
    use secrecy::ExposeSecret;

    fn t0() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).unwrap()
    }

    /// A stored row as the store decodes it.
    pub(crate) fn row(state: ConnState) -> ConnectionRow {
        ConnectionRow {
            id: 1,
            provider: "p".into(),
            account: "a".into(),
            state,
            access_token: SecretString::from("at".to_string()),
            refresh_token: Some(SecretString::from("rt".to_string())),
            token_type: "Bearer".into(),
            scope: None,
            expires_at: t0() + chrono::Duration::hours(1),
            issued_at: t0(),
            refreshed_at: None,
            refresh_token_issued_at: t0(),
            generation: 3,
            last_error: None,
            failures: 0,
            next_attempt_at: None,
            lease_owner: None,
            lease_until: None,
            attempt_id: None,
            attempt_started_at: None,
            interrupted_at: None,
            meta: GrantMeta::default(),
            unreadable: None,
        }
    }

    fn snap(r: &ConnectionRow) -> Snapshot {
        Snapshot::from_row(r, Anchor::at(&*TestClock::new(t0())))
    }

    #[test]
    fn every_stored_state_maps_back_to_its_spec_name() {
        for state in ConnState::ALL {
            let mut r = row(state);
            r.last_error = Some("boom".into());
            assert_eq!(snap(&r).state(), state, "{state}");
        }
    }

    #[test]
    fn each_state_carries_what_it_has() {
        let active = snap(&row(ConnState::Active));
        assert!(matches!(active.state, TokenState::Active { .. }));
        assert_eq!(active.last_error(), None);
        assert_eq!(active.next_attempt_at(), None);
        assert!(!active.parked(t0()));

        let mut r = row(ConnState::Retrying);
        r.last_error = Some("timeout".into());
        r.failures = 2;
        r.next_attempt_at = Some(t0() + chrono::Duration::minutes(1));
        let retrying = snap(&r);
        assert_eq!(
            retrying.failing(),
            Some(&Failing {
                last_error: "timeout".into(),
                failures: 2,
                next_attempt_at: r.next_attempt_at,
            })
        );
        assert!(retrying.parked(t0()), "backoff not run out");
        assert!(!retrying.parked(t0() + chrono::Duration::minutes(2)));

        // A retrying row without a stored reason still says something.
        let bare = snap(&row(ConnState::Retrying));
        assert_eq!(bare.last_error(), Some(NO_REASON_RETRYING));

        let mut r = row(ConnState::AuthorizationRequired);
        r.last_error = Some("invalid_grant".into());
        let rejected = snap(&r);
        assert_eq!(rejected.last_error(), Some("invalid_grant"));
        assert!(rejected.parked(t0()));
        // A still-valid token is never discarded because of a failure.
        assert_eq!(rejected.token().unwrap().access_token.expose_secret(), "at");

        // Refreshing after a failure keeps the failure, reported as it was.
        let mut r = row(ConnState::Refreshing);
        r.last_error = Some("timeout".into());
        r.failures = 1;
        let refreshing = snap(&r);
        assert_eq!(refreshing.last_error(), Some("timeout"));
        assert_eq!(refreshing.journal().0, ConnState::Retrying);
        assert_eq!(
            snap(&row(ConnState::Refreshing)).journal().0,
            ConnState::Active
        );
    }

    #[test]
    fn an_unreadable_row_serves_nothing_and_reads_as_authorization_required() {
        let mut r = row(ConnState::Active);
        r.unreadable = Some("its access_token does not decrypt".into());
        let s = snap(&r);
        assert_eq!(s.state(), ConnState::AuthorizationRequired);
        assert!(s.token().is_none());
        assert!(s.parked(t0()));
        assert!(!s.fresh_enough(t0(), &RefreshConfig::default()));
        assert_eq!(s.valid_until(t0()), None);
        assert_eq!(s.last_error(), Some("its access_token does not decrypt"));
        assert_eq!(s.generation, 3, "kept, so versions compare equal");
        // Failing it changes nothing: there is no token to keep serving.
        let s = s.failed("x".into(), t0());
        assert!(matches!(s.state, TokenState::Unreadable { .. }));
    }

    #[test]
    fn retry_now_clears_only_a_pending_backoff() {
        let mut r = row(ConnState::Retrying);
        r.last_error = Some("e".into());
        r.next_attempt_at = Some(t0() + chrono::Duration::minutes(5));
        let mut s = snap(&r);
        assert!(s.retry_now(t0()));
        assert_eq!(s.next_attempt_at(), None);
        assert!(!s.retry_now(t0()), "nothing left to clear");
        let mut active = snap(&row(ConnState::Active));
        assert!(!active.retry_now(t0()));
    }

    #[test]
    fn failing_an_active_grant_makes_it_retrying_with_one_more_failure() {
        let s = snap(&row(ConnState::Active));
        let next = t0() + chrono::Duration::seconds(10);
        let f = s.failed("disk full".into(), next);
        assert_eq!(f.state(), ConnState::Retrying);
        assert_eq!(f.failures(), 1);
        assert_eq!(f.next_attempt_at(), Some(next));
        assert_eq!(f.last_error(), Some("disk full"));
    }

    #[test]
    fn the_answer_is_rendered_once_per_token_with_its_extras() {
        let mut r = row(ConnState::Active);
        r.meta
            .extra
            .insert("instance_url".into(), "https://x.example".into());
        let s = snap(&r);
        let first = s.answer("keap", "default").unwrap().clone();
        assert!(Arc::ptr_eq(&first, s.answer("keap", "default").unwrap()));
        let body = String::from_utf8(first.body(7)).unwrap();
        assert!(body.ends_with(
            r#""expires_in":7,"provider":"keap","account":"default","extra":{"instance_url":"https://x.example"}}"#
        ));
        // Failing keeps the token and its answer; a clone, or another
        // token, renders anew.
        let failed = s.clone().failed("boom".into(), t0());
        assert!(!Arc::ptr_eq(
            &first,
            failed.answer("keap", "default").unwrap()
        ));
        let kept = s.failed("boom".into(), t0());
        assert!(Arc::ptr_eq(&first, kept.answer("keap", "default").unwrap()));
        let mut other = kept.token().unwrap().clone();
        other.access_token = "another".to_string().into();
        let replaced = kept.serving(other);
        let body = String::from_utf8(replaced.answer("keap", "default").unwrap().body(7)).unwrap();
        assert!(body.starts_with(r#"{"access_token":"another","#), "{body}");
    }
}
