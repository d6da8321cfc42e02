//! Storing what the provider issued: compare-and-swap on the generation
//! the refresh read (a newer grant wins and the late result is discarded,
//! its refresh token revoked upstream), and a grant whose commit failed
//! held in memory and retried until it lands (see the engine's invariants).
//!
//! Must not: drop a grant the provider issued while storing it can still
//! succeed, or let a refresh call the provider while one is held.

use std::sync::Arc;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

use crate::config::RefreshConfig;
use crate::notify::EventKind;
use crate::provider::TokenGrant;
use crate::refresh::clock::Anchor;
use crate::refresh::history;
use crate::refresh::lease::{self, LEASE};
use crate::refresh::policy::Timing;
use crate::refresh::shared::Shared;
use crate::refresh::slot::{PendingCommit, Slot};
use crate::refresh::snapshot::{HeldToken, Snapshot};
use crate::refresh::types::{chrono_dur, TokenError};
use crate::store::{CommitOutcome, ConnectionRow, GrantMeta, NewGrant, StoreError};

/// First wait before retrying a failed commit of a grant the provider
/// issued: short, because until it lands the grant exists only in memory.
const COMMIT_RETRY_INITIAL: Duration = Duration::from_millis(500);

/// Longest wait between commit retries: a third of the lease, because each
/// retry that fails also renews the lease the grant was obtained under. A
/// lease standing still for `LEASE` is taken over by another process, which
/// would then send the stored, rotated-out refresh token (at providers with
/// reuse detection that kills the whole grant).
const COMMIT_RETRY_MAX: Duration = Duration::from_secs(LEASE.as_secs() / 3);

const _: () = assert!(COMMIT_RETRY_MAX.as_secs() * 3 <= LEASE.as_secs());

/// Stores what the provider issued, with `meta` (what the grant keeps
/// beside its tokens; `None` keeps what is stored). A failed write does not lose it: it
/// is held in memory and retried (see the engine's invariants). A write
/// that finds a newer grant stored (a re-authorization after our read)
/// discards it instead.
#[allow(clippy::too_many_arguments)]
pub async fn commit(
    shared: &Arc<Shared>,
    slot: &Arc<Slot>,
    attempt: &str,
    base_generation: i64,
    used: SecretString,
    grant: TokenGrant,
    elapsed: Duration,
    meta: Option<GrantMeta>,
) -> Result<Arc<Snapshot>, TokenError> {
    slot.count_refresh("ok", Some(elapsed));
    let pending = Arc::new(PendingCommit {
        meta,
        events: history::refreshed(slot, shared.clock().now(), elapsed, &used, &grant),
        fps: shared.fingerprints(&grant),
        grant,
        used,
        attempt: attempt.to_string(),
        base_generation,
        anchor: Anchor::at(shared.clock()),
    });
    match try_commit(shared, slot, &pending).await {
        Ok(snap) => {
            tracing::info!(
                provider = %slot.provider,
                account = %slot.account,
                expires_at = %pending.grant.expires_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                rotated = pending.grant.refresh_token.is_some(),
                elapsed_ms = elapsed.as_millis() as u64,
                "access token refreshed"
            );
            Ok(snap)
        }
        Err(CommitError::Superseded) => Ok(slot.snapshot()),
        Err(CommitError::Gone) => Err(TokenError::UnknownConnection {
            provider: slot.provider.clone(),
            account: slot.account.clone(),
        }),
        Err(CommitError::Store(e)) => Ok(hold_pending(shared, slot, pending, &e)),
    }
}

/// One commit attempt of `p`; on success the snapshot is replaced.
async fn try_commit(
    shared: &Shared,
    slot: &Slot,
    p: &PendingCommit,
) -> Result<Arc<Snapshot>, CommitError> {
    let g = &p.grant;
    let new = NewGrant {
        access_token: &g.access_token,
        refresh_token: g.refresh_token.as_ref(),
        token_type: &g.token_type,
        scope: g.scope.as_deref(),
        issued_at: g.issued_at,
        expires_at: g.expires_at,
        meta: p.meta.as_ref(),
    };
    let was_failing = slot.snapshot().failures() > 0 || slot.pending().is_some();
    let outcome = shared
        .store
        .commit_refresh(
            slot.id,
            (&slot.provider, &slot.account),
            &shared.owner,
            &p.attempt,
            p.base_generation,
            &new,
            &p.fps,
            &p.events,
        )
        .await
        .map_err(CommitError::Store)?;
    match outcome {
        CommitOutcome::Committed { row, kept_lease } => {
            shared.recognizer.add(slot.id, &p.fps);
            if !kept_lease {
                tracing::warn!(provider = %slot.provider, account = %slot.account, "refresh lease had lapsed before commit; stored the new grant anyway, since the provider already rotated");
            }
            // Anchored where the provider answered, not at the commit.
            let snap = slot.set(Snapshot::from_row(&row, p.anchor));
            if was_failing {
                shared.notify(slot, EventKind::Recovered, "refreshing works again".into());
            }
            Ok(snap)
        }
        CommitOutcome::Superseded(current) => {
            discard_superseded(shared, slot, p, current.as_deref());
            match current {
                Some(row) => {
                    if slot.pending().is_none() {
                        shared.install(&row);
                    }
                    Err(CommitError::Superseded)
                }
                None => Err(CommitError::Gone),
            }
        }
    }
}

/// A refresh that started before a newer grant was stored finished after
/// it: the newer grant wins. The late result's new refresh token is
/// revoked upstream unless it could belong to the stored grant.
fn discard_superseded(
    shared: &Shared,
    slot: &Slot,
    p: &PendingCommit,
    current: Option<&ConnectionRow>,
) {
    let stored = current.and_then(|c| c.refresh_token.as_ref());
    let ours = p.grant.refresh_token.as_ref().filter(|t| {
        t.expose_secret() != p.used.expose_secret()
            && stored.is_none_or(|s| s.expose_secret() != t.expose_secret())
    });
    // The stored grant descends from ours only if it holds the token we
    // spent (no rotation) or ours: then revoking would kill it too.
    let same_family = stored.is_some_and(|s| s.expose_secret() == p.used.expose_secret());
    tracing::warn!(
        provider = %slot.provider,
        account = %slot.account,
        "a refresh that started before a newer grant was stored (a new authorization, or the connection was forgotten) finished after it; its result is discarded"
    );
    if let (Some(token), false) = (ours, same_family) {
        shared.revoke_in_background(
            &slot.provider,
            &slot.account,
            token.clone(),
            "the discarded result of a refresh overtaken by a newer grant",
        );
    }
}

/// Keeps a grant whose commit failed: in memory, served as the engine's
/// invariants say, retried in the background until it lands.
fn hold_pending(
    shared: &Arc<Shared>,
    slot: &Arc<Slot>,
    pending: Arc<PendingCommit>,
    error: &StoreError,
) -> Arc<Snapshot> {
    tracing::error!(
        provider = %slot.provider,
        account = %slot.account,
        error = %error,
        "the provider issued a new grant but storing it failed; it is held in memory and storing is retried until it lands"
    );
    metrics::counter!(crate::metrics::COMMIT_FAILURES_TOTAL).increment(1);
    let first = {
        let mut held = slot.pending.lock().unwrap_or_else(|e| e.into_inner());
        let first = held.is_none();
        *held = Some(pending);
        first
    };
    if first {
        metrics::gauge!(crate::metrics::UNCOMMITTED_GRANTS).increment(1.0);
        shared.notify(
            slot,
            EventKind::RefreshFailing,
            format!("the provider issued a new grant but it could not be stored ({error}); it is held in memory and storing is retried until it lands"),
        );
        let (retrying, slot) = (shared.clone(), slot.clone());
        shared.tasks.spawn(async move {
            retry_pending(&retrying, slot).await;
        });
    }
    let settings = shared.settings();
    mark_held(shared, slot, error, &settings.refresh)
}

/// The snapshot while a grant is held: `retrying`, saying so, and parked
/// (token requests answer from it instead of refreshing).
fn mark_held(
    shared: &Shared,
    slot: &Slot,
    error: &StoreError,
    refresh: &RefreshConfig,
) -> Arc<Snapshot> {
    let snap = (*slot.snapshot()).clone();
    let now = snap.now(shared.clock());
    slot.set(snap.failed(
        format!(
            "the provider issued a new grant, but it could not be stored ({error}); it is held in memory and not yet stored; storing is retried until it lands"
        ),
        now + chrono_dur(COMMIT_RETRY_MAX.min(refresh.retry_max)),
    ));
    serve_pending_if_stored_dead(shared, slot, refresh)
}

/// While a grant is held, the stored access token is served as long as it
/// satisfies callers (some providers keep it valid, and it is the one a
/// crash would leave); once it does not, the held one is served, and the
/// log says why.
pub fn serve_pending_if_stored_dead(
    shared: &Shared,
    slot: &Slot,
    refresh: &RefreshConfig,
) -> Arc<Snapshot> {
    let snap = slot.snapshot();
    let Some(p) = slot.pending() else {
        return snap;
    };
    let Some(stored) = snap.token() else {
        // An unreadable row: nothing stored to compare with or to keep.
        return snap;
    };
    let serving_held = stored.access_token.expose_secret() == p.grant.access_token.expose_secret();
    if serving_held || snap.fresh_enough(snap.now(shared.clock()), refresh) {
        return snap;
    }
    tracing::warn!(
        provider = %slot.provider,
        account = %slot.account,
        "serving the access token held in memory although its grant is not stored yet: the stored access token has expired or is about to"
    );
    let held = HeldToken {
        access_token: p.grant.access_token.clone(),
        token_type: p.grant.token_type.clone(),
        timing: Timing {
            issued_at: p.grant.issued_at,
            expires_at: p.grant.expires_at,
            refresh_token_issued_at: if p.grant.refresh_token.is_some() {
                p.grant.issued_at
            } else {
                stored.timing.refresh_token_issued_at
            },
        },
        refreshed_at: stored.refreshed_at,
        anchor: p.anchor,
    };
    slot.set((*snap).clone().serving(held))
}

/// A flight's first step when a grant is held: store it, and that is the
/// flight's result. While it cannot be stored, no refresh calls the
/// provider (its result could not be stored either, SPEC 9), and the
/// stored refresh token is the rotated-out one anyway.
pub async fn land_before_refresh(
    shared: &Shared,
    slot: &Slot,
    refresh: &RefreshConfig,
) -> Arc<Snapshot> {
    match land_pending(shared, slot).await {
        Ok(()) => slot.snapshot(),
        Err(e) => {
            tracing::error!(provider = %slot.provider, account = %slot.account, error = %e, "the grant held in memory still cannot be stored; no refresh until it is");
            serve_pending_if_stored_dead(shared, slot, refresh)
        }
    }
}

/// Lands the held grant, if any (`Ok` also when it was discarded as
/// superseded). Callers hold the flight lock.
pub async fn land_pending(shared: &Shared, slot: &Slot) -> Result<(), StoreError> {
    let Some(p) = slot.pending() else {
        return Ok(());
    };
    match try_commit(shared, slot, &p).await {
        Ok(_) => {
            slot.take_pending();
            tracing::info!(provider = %slot.provider, account = %slot.account, "the grant held in memory is stored now");
            Ok(())
        }
        Err(CommitError::Superseded) | Err(CommitError::Gone) => {
            slot.take_pending();
            if let Some(row) = shared.store.load_connection(slot.id).await? {
                shared.install(&row);
            }
            Ok(())
        }
        Err(CommitError::Store(e)) => {
            metrics::counter!(crate::metrics::COMMIT_FAILURES_TOTAL).increment(1);
            let settings = shared.settings();
            mark_held(shared, slot, &e, &settings.refresh);
            Err(e)
        }
    }
}

/// Retries the held grant's commit with backoff (at most a third of the
/// lease apart) until it lands (or the connection is forgotten); at
/// shutdown, one last attempt. Each failed attempt renews the lease the
/// grant was obtained under, so another process never sees it stand still
/// and takes it over to spend the rotated-out refresh token; a renewal
/// failing too (the database is locked) is only logged: the next attempt,
/// at most `LEASE / 3` later, moves the lease (or lands the grant) as soon
/// as the database is writable again.
async fn retry_pending(shared: &Shared, slot: Arc<Slot>) {
    let mut delay = COMMIT_RETRY_INITIAL;
    loop {
        let last = tokio::select! {
            () = tokio::time::sleep(delay) => false,
            () = shared.stopping.cancelled() => true,
        };
        let _flight = slot.flight.lock().await;
        if slot.pending().is_none() {
            return;
        }
        match land_pending(shared, &slot).await {
            Ok(()) => return,
            Err(e) if last => {
                tracing::error!(provider = %slot.provider, account = %slot.account, error = %e, "stopping with a grant the provider issued that could not be stored: the stored refresh token is rotated out, so this connection will need a new authorization");
                return;
            }
            Err(e) => {
                tracing::error!(provider = %slot.provider, account = %slot.account, error = %e, retry_in_ms = delay.as_millis() as u64, "storing the grant held in memory failed again; retrying");
                if let Some(p) = slot.pending() {
                    lease::renew_held(shared, &slot, &p.attempt).await;
                }
                delay = (delay * 2).min(COMMIT_RETRY_MAX);
            }
        }
    }
}

/// Why a commit attempt did not store the grant.
enum CommitError {
    /// A newer grant is stored; ours was discarded.
    Superseded,
    /// The connection was forgotten; ours was discarded.
    Gone,
    /// Storage failed; the grant must be kept and retried.
    Store(StoreError),
}
