//! Serving: the token a caller asks for, from the connection's snapshot
//! ([`with_fresh_token`], the allocation-free fast lane; [`token`], which
//! refreshes first when needed by starting or joining a flight), what a
//! token is ([`inspect`], [`refuse_refresh_token_as_bearer`]), reports,
//! and where a new grant lands ([`authorized`]).
//!
//! Must not: write the refresh journal or call the provider itself (a
//! flight does), or serve a snapshot older than the last commit.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use secrecy::ExposeSecret;

use super::flight::{self, commit};
use super::history;
use super::lease;
use super::meta;
use super::policy;
use super::shared::Shared;
use super::slot::Slot;
use super::snapshot::{Snapshot, TokenState};
use super::token_json::TokenJson;
use super::types::{
    AuthorizedBy, ConnectionReport, IssuedToken, ServedToken, TokenError, TokenIdentity, Trigger,
};
use crate::notify::{Event, EventKind};
use crate::provider::TokenGrant;
use crate::store::{
    ConnState, EventKind as HistoryKind, GrantMeta, NewEvent, NewGrant, StoreError, TokenKind,
};

/// The slot of `provider/account`, if the provider is configured and the
/// connection known.
pub fn slot(shared: &Shared, provider: &str, account: &str) -> Result<Arc<Slot>, TokenError> {
    if !shared.settings().providers.contains_key(provider) {
        return Err(TokenError::UnknownProvider(provider.to_string()));
    }
    shared
        .slots
        .get(provider, account)
        .ok_or_else(|| TokenError::UnknownConnection {
            provider: provider.to_string(),
            account: account.to_string(),
        })
}

/// The hot path's synchronous half: when this process is alone on its
/// database, no refresh of the connection is in flight and its snapshot
/// is fresh enough, `f` sees the token in place and its result is
/// returned: no storage read, no allocation, no `Arc` clone, only shared
/// read locks. `None` means "take [`token`]", which decides every other
/// case (unknown names, peers, refreshes, failures); when `Some`, `token`
/// would have returned the same token, and the served counter moves the
/// same way.
pub fn with_fresh_token<R>(
    shared: &Shared,
    provider: &str,
    account: &str,
    now: DateTime<Utc>,
    f: impl FnOnce(ServedToken<'_>) -> R,
) -> Option<R> {
    let pushed = shared.store.feed().pushed();
    if !pushed && shared.peers.load(Ordering::Relaxed) {
        return None;
    }
    // Copied out so no two locks of different kinds are ever nested here
    // (`install` takes slots, then settings).
    let refresh = {
        let settings = shared.settings.read().unwrap_or_else(|e| e.into_inner());
        if !settings.providers.contains_key(provider) {
            return None;
        }
        settings.refresh.clone()
    };
    shared
        .slots
        .with(provider, account, |slot| {
            if slot.in_flight() {
                return None;
            }
            let snap = slot.snap.read().unwrap_or_else(|e| e.into_inner());
            // Another daemon's refresh (announced): `token` waits for it.
            if pushed && snap.state() == ConnState::Refreshing {
                return None;
            }
            let token = snap.token()?;
            let now = now.max(token.anchor.now(shared.clock()));
            if !policy::fresh_enough(&token.timing, now, &refresh) {
                return None;
            }
            let answer = snap.answer(&slot.provider, &slot.account)?;
            slot.served.fetch_add(1, Ordering::Relaxed);
            Some(f(ServedToken {
                access_token: token.access_token.expose_secret(),
                extra: &snap.meta.extra,
                answer,
                at: now,
            }))
        })
        .flatten()
}

/// The token `provider/account` serves now, if it has one that is still
/// valid: read from the snapshot only (no refresh, no storage read, not
/// counted as served). For what mirrors the served token elsewhere.
pub fn current(shared: &Shared, provider: &str, account: &str) -> Option<IssuedToken> {
    let slot = shared.slots.get(provider, account)?;
    let snap = slot.snapshot();
    let token = snap.token()?;
    snap.valid_until(snap.now(shared.clock()))?;
    Some(IssuedToken {
        provider: slot.provider.clone(),
        account: slot.account.clone(),
        access_token: token.access_token.clone(),
        token_type: token.token_type.clone(),
        expires_at: token.timing.expires_at,
        extra: snap.meta.clone(),
    })
}

/// The hot path: a token with at least `min_validity` left, refreshing
/// first when needed, waiting for an in-flight refresh rather than
/// handing out a token that refresh may be about to kill.
pub async fn token(
    shared: &Arc<Shared>,
    provider: &str,
    account: &str,
) -> Result<IssuedToken, TokenError> {
    let (slot, snap) = served(shared, provider, account).await?;
    slot.issue(&snap)
        .ok_or_else(|| slot.failure(&snap, shared.clock()))
}

/// [`token`] as its rendered `/v1/token` answer, shared with every other
/// caller served from the same snapshot (a herd waiting for one refresh
/// gets one rendering). Counted as served.
pub async fn token_answer(
    shared: &Arc<Shared>,
    provider: &str,
    account: &str,
) -> Result<(Arc<TokenJson>, DateTime<Utc>), TokenError> {
    let (slot, snap) = served(shared, provider, account).await?;
    match snap.answer(&slot.provider, &slot.account) {
        Some(answer) => {
            slot.served.fetch_add(1, Ordering::Relaxed);
            Ok((answer.clone(), snap.now(shared.clock())))
        }
        None => Err(slot.failure(&snap, shared.clock())),
    }
}

/// What [`token`] decides, as the slot and the snapshot whose token the
/// caller gets (servable, not yet counted as served).
async fn served(
    shared: &Arc<Shared>,
    provider: &str,
    account: &str,
) -> Result<(Arc<Slot>, Arc<Snapshot>), TokenError> {
    let slot = slot(shared, provider, account)?;
    // With two daemons on one database, the snapshot alone would only
    // learn of another process's refresh at our next tick, and until then
    // hand out the access token that refresh killed. Where the store
    // announces every commit (PostgreSQL), the snapshot is kept current by
    // `Engine::follow` instead, and a lease another daemon took shows as
    // `refreshing` in it: no storage read per request.
    let foreign_flight = if shared.store.feed().pushed() {
        !slot.in_flight() && slot.snapshot().state() == ConnState::Refreshing
    } else if shared.peers.load(Ordering::Relaxed) {
        sync_with_store(shared, &slot).await?
    } else {
        false
    };
    let mut snap = slot.snapshot();
    let settings = shared.settings();
    if slot.pending().is_some() {
        snap = commit::serve_pending_if_stored_dead(shared, &slot, &settings.refresh);
    }
    let now = snap.now(shared.clock());
    let waiting = foreign_flight || slot.in_flight();
    if !waiting && snap.fresh_enough(now, &settings.refresh) && snap.token().is_some() {
        return Ok((slot, snap));
    }
    if snap.parked(now) && !waiting {
        let snap = slot.servable(snap, shared.clock())?;
        return Ok((slot, snap));
    }
    // Another process's refresh: the flight finds its lease busy and
    // waits for, then adopts, what it stores.
    let snap = flight::refresh_served(shared, &slot, Trigger::OnDemand).await?;
    Ok((slot, snap))
}

/// Brings the slot up to date with what other processes sharing the
/// database wrote (a newer grant, a new state), and tells whether one of
/// them holds a live lease, i.e. is refreshing this connection now: its
/// provider may already have revoked the token in our snapshot (SPEC 7).
/// Skipped while this process refreshes the slot itself.
async fn sync_with_store(shared: &Shared, slot: &Arc<Slot>) -> Result<bool, TokenError> {
    // A grant held in memory is newer than anything stored.
    if slot.in_flight() || slot.pending().is_some() {
        return Ok(false);
    }
    let attempts = slot.attempts.load(Ordering::SeqCst);
    let Some(row) = shared.store.load_connection(slot.id).await? else {
        return Err(TokenError::UnknownConnection {
            provider: slot.provider.clone(),
            account: slot.account.clone(),
        });
    };
    // Any attempt of another holder counts as in flight (a stalled one is
    // taken over by the flight once seen standing still): the wall clock
    // cannot tell a live lease from a lapsed one.
    let foreign = match row.lease_owner.as_deref() {
        Some(holder) if row.attempt_id.is_some() && holder != shared.owner => lease::holder_gone(
            shared,
            slot,
            holder,
            row.attempt_id.as_deref(),
            row.lease_until,
        )
        .is_none(),
        _ => false,
    };
    if foreign {
        return Ok(true);
    }
    // A flight of ours that started or ended since the read has newer
    // information than the row; never install an older generation.
    if slot.in_flight() || slot.attempts.load(Ordering::SeqCst) != attempts {
        return Ok(false);
    }
    let snap = slot.snapshot();
    if row.generation > snap.generation {
        shared.learn_fingerprints(row.id).await?;
        shared.install(&row);
    } else if row.generation == snap.generation && row.state != snap.state() {
        shared.install(&row);
    }
    Ok(false)
}

/// Refreshes now, whatever the schedule says (SPEC: `POST .../refresh`).
pub async fn force_refresh(
    shared: &Arc<Shared>,
    provider: &str,
    account: &str,
) -> Result<IssuedToken, TokenError> {
    let slot = slot(shared, provider, account)?;
    flight::refresh(shared, &slot, Trigger::Forced).await
}

/// Every known connection of a configured provider, for reports.
pub fn report(shared: &Shared) -> Vec<ConnectionReport> {
    let settings = shared.settings();
    let epoch = DateTime::<Utc>::UNIX_EPOCH;
    shared
        .slots
        .all()
        .into_iter()
        .filter(|s| settings.providers.contains_key(&s.provider))
        .map(|slot| {
            let snap = slot.snapshot();
            let next = match &snap.state {
                TokenState::AuthorizationRequired { .. } | TokenState::Unreadable { .. } => None,
                TokenState::Retrying { failing, .. } => {
                    failing.next_attempt_at.or(Some(shared.clock().now()))
                }
                TokenState::Active { token } | TokenState::Refreshing { token, .. } => {
                    Some(policy::next_due_at(
                        &token.timing,
                        &snap.meta,
                        &settings.refresh,
                        slot.jitter(&settings.refresh),
                    ))
                }
            };
            let state = if slot.in_flight() {
                ConnState::Refreshing
            } else {
                snap.state()
            };
            let token = snap.token();
            ConnectionReport {
                provider: slot.provider.clone(),
                account: slot.account.clone(),
                state,
                expires_at: token.map_or(epoch, |t| t.timing.expires_at),
                refreshed_at: token.and_then(|t| t.refreshed_at),
                next_refresh_at: next,
                refresh_token_issued_at: token.map_or(epoch, |t| t.timing.refresh_token_issued_at),
                last_error: snap.last_error().map(str::to_string),
                refresh_token_expires_at: snap.meta.refresh_token_expires_at,
                refresh_token_end_fixed: snap.meta.refresh_token_end_is_fixed(),
                served: slot.served.load(Ordering::Relaxed),
                refreshes: std::array::from_fn(|i| slot.refreshes[i].load(Ordering::Relaxed)),
            }
        })
        .collect()
}

/// Says what a token is (for `tokenkeeper inspect`).
pub fn inspect(shared: &Shared, token: &str) -> TokenIdentity {
    let Some((kind, id)) = shared.recognizer.lookup(token) else {
        return TokenIdentity::Unknown;
    };
    let Some(slot) = shared.slots.by_id(id) else {
        return TokenIdentity::Unknown;
    };
    let (provider, account) = (slot.provider.clone(), slot.account.clone());
    let snap = slot.snapshot();
    let current = snap.token().is_some_and(|t| {
        shared
            .recognizer
            .same(token, t.access_token.expose_secret())
    });
    match kind {
        TokenKind::Refresh => TokenIdentity::RefreshToken { provider, account },
        TokenKind::Access if current => TokenIdentity::CurrentAccessToken { provider, account },
        TokenKind::Access => TokenIdentity::OldAccessToken { provider, account },
    }
}

/// How often a repeated bearer misuse of one grant is reported.
const MISUSE_REPORT_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// Whether a bearer credential is one of our refresh tokens, current or
/// rotated out (SPEC 5). If so, the misuse is reported here, once: a
/// security log line, `tokenkeeper_bearer_misuse_total` and the
/// `bearer_misuse` notification naming the grant, never the token.
pub fn refuse_refresh_token_as_bearer(shared: &Shared, token: &str) -> bool {
    let Some((TokenKind::Refresh, id)) = shared.recognizer.lookup(token) else {
        return false;
    };
    metrics::counter!(crate::metrics::BEARER_MISUSE_TOTAL).increment(1);
    let slot = shared.slots.by_id(id);
    // Every request is refused and counted; the report (log line, history
    // event, notification) comes at most once a minute per grant, so a
    // program retrying in a loop cannot flood the log, the history table
    // or the notify command.
    if let Some(slot) = &slot {
        let now = shared.clock().monotonic().as_millis() as u64 + 1;
        let last = slot.misuse_reported.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < MISUSE_REPORT_EVERY.as_millis() as u64
            || slot
                .misuse_reported
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return true;
        }
    }
    tracing::warn!(
        target: "tokenkeeper::security",
        event = "bearer_misuse",
        "a refresh token was presented as a bearer token and refused"
    );
    let (provider, account) = slot
        .map(|s| (s.provider.clone(), s.account.clone()))
        .unwrap_or_default();
    history::record_later(
        shared,
        vec![NewEvent::new(
            (&provider, &account),
            shared.clock().now(),
            HistoryKind::BearerMisuse,
        )],
    );
    shared.settings().notifier.emit(Event {
        event: EventKind::BearerMisuse,
        provider,
        account,
        message: "a refresh token was presented as a bearer token and refused; the program sending it should use GET /v1/token instead".into(),
    });
    true
}

/// After a config reload: every `retrying` connection is due at the next
/// scheduler pass instead of after its backoff, since the reload may have
/// fixed what failed (a client secret, `token_url`, scopes, a timeout).
/// Costs at most one provider call per failing connection per reload,
/// spread by the scheduler's per-pass cap. Returns how many.
pub fn retry_failing_now(shared: &Shared) -> usize {
    let n = clear_backoffs(shared);
    shared.scheduler.wake();
    n
}

/// Clears every failing connection's backoff; how many.
fn clear_backoffs(shared: &Shared) -> usize {
    let now = shared.clock().now();
    let mut n = 0;
    for slot in shared.slots.all() {
        // Under the snapshot's write lock, so a flight landing meanwhile is
        // never overwritten with the older snapshot.
        let mut snap = slot.snap.write().unwrap_or_else(|e| e.into_inner());
        if snap.state() == ConnState::Retrying && snap.next_attempt_at().is_some_and(|t| t > now) {
            let mut next = (**snap).clone();
            next.retry_now(now);
            *snap = Arc::new(next);
            n += 1;
        }
    }
    n
}

/// Stores the grant of a completed authorization (`by` says which kind)
/// and serves it.
pub async fn authorized(
    shared: &Shared,
    provider: &str,
    account: &str,
    grant: &TokenGrant,
    by: AuthorizedBy,
) -> Result<(), StoreError> {
    land(
        shared,
        provider,
        account,
        grant,
        HistoryKind::Authorized,
        by.message(),
        false,
    )
    .await
}

/// Where every new grant lands (a browser, pasted or device-code
/// authorization, an import): stored with its history event `kind` in the same transaction,
/// served, and the grant it replaced revoked; `how` is the `authorized`
/// notification's message. With `only_if_no_working_grant` the store
/// compares in its transaction and refuses with
/// [`StoreError::WorkingGrantExists`] when a working grant is stored.
pub(super) async fn land(
    shared: &Shared,
    provider: &str,
    account: &str,
    grant: &TokenGrant,
    kind: HistoryKind,
    how: &str,
    only_if_no_working_grant: bool,
) -> Result<(), StoreError> {
    let meta = landed_meta(shared, provider, grant).await;
    let new = NewGrant {
        access_token: &grant.access_token,
        refresh_token: grant.refresh_token.as_ref(),
        token_type: &grant.token_type,
        scope: grant.scope.as_deref(),
        issued_at: grant.issued_at,
        expires_at: grant.expires_at,
        meta: Some(&meta),
    };
    let fps = shared.fingerprints(grant);
    let events = [NewEvent::new(
        (provider, account),
        shared.clock().now(),
        kind,
    )];
    let (row, replaced) = if only_if_no_working_grant {
        shared
            .store
            .save_authorized_if_no_working_grant(provider, account, &new, &fps, &events)
            .await?
    } else {
        shared
            .store
            .save_authorized(provider, account, &new, &fps, &events)
            .await?
    };
    shared.recognizer.add(row.id, &fps);
    shared.install(&row);
    shared.settings().notifier.emit(Event {
        event: EventKind::Authorized,
        provider: provider.to_string(),
        account: account.to_string(),
        message: how.into(),
    });
    // The grant this authorization replaced (an earlier one, or a second
    // browser flow for the same account) would otherwise stay valid at the
    // provider with nobody holding it. Only when the new grant brings its
    // own refresh token: without one, the old token may be the only
    // refresh token of this very grant.
    if let (Some(old), Some(new)) = (replaced, grant.refresh_token.as_ref()) {
        if new.expose_secret() != old.expose_secret() {
            shared.revoke_in_background(
                provider,
                account,
                old,
                "the grant replaced by a newer authorization",
            );
        }
    }
    Ok(())
}

/// What a new grant keeps beside its tokens: its extras, with the lists
/// the preset fetches from the API after an authorization (Xero's
/// tenants), and its refresh token's end (`meta::authorized`).
async fn landed_meta(shared: &Shared, provider: &str, grant: &TokenGrant) -> GrantMeta {
    let settings = shared.settings();
    let Some(p) = settings.providers.get(provider) else {
        return GrantMeta::default();
    };
    let mut meta = meta::authorized(grant, &p.config.refresh_token_lifetime);
    meta.extra.extend(p.list_extras(&grant.access_token).await);
    meta
}
