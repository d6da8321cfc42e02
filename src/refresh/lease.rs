//! The lease and the refresh journal: who may refresh a connection now,
//! across every process sharing the database.
//!
//! Taking the lease commits "refresh started" in the same write
//! ([`take`]), so a crash mid-call is known at the next start
//! ([`recover_interrupted`]); the lease is renewed while the provider call
//! runs ([`renew_while`]) and given back with the attempt's end state
//! ([`finish`], [`release`]). Another process's lease is taken over only
//! when its holder is certainly dead (`owner`) or its lease has stood still
//! for [`LEASE`] on our monotonic clock ([`holder_gone`]), never by
//! comparing wall clocks; a live holder is waited for.
//!
//! Must not: call a provider, or decide whether a refresh is needed.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::clock::LeaseWatch;
use super::history;
use super::owner;
use super::shared::Shared;
use super::slot::Slot;
use super::snapshot::Snapshot;
use super::types::{chrono_dur, TokenError};
use crate::provider::Provider;
use crate::store::{BeginRefresh, ConnState, ConnectionRow, LeaseSeen, StoreError};

/// How long a refresh lease lasts without renewal. Long enough that a
/// renewal (every third of it) surviving one slow database write keeps it;
/// short enough that a crashed holder on another host blocks refreshes only
/// briefly.
pub const LEASE: Duration = Duration::from_secs(30);

/// How often a caller waiting on another process's lease looks again.
pub const LEASE_POLL: Duration = Duration::from_millis(50);

/// A fresh attempt id: names one holding of the lease.
pub fn new_attempt() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Whether the lease holder `owner` is certainly gone (see `owner`).
pub fn owner_is_dead(owner: &str) -> bool {
    owner::certainly_dead(owner, owner::Identity::current(), owner::probe)
}

/// Whether another process's lease may be taken over: its holder is
/// certainly dead, or its lease has not moved for [`LEASE`] as measured
/// on our monotonic clock (each call is an observation). Returns what was
/// seen, for the compare-and-swap takeover in `begin_refresh`.
pub fn holder_gone(
    shared: &Shared,
    slot: &Slot,
    holder: &str,
    attempt: Option<&str>,
    until: Option<DateTime<Utc>>,
) -> Option<LeaseSeen> {
    let seen = LeaseSeen {
        owner: holder.to_string(),
        attempt: attempt.map(str::to_string),
        until_ms: until.map(crate::store::to_ms),
    };
    if owner_is_dead(holder) {
        return Some(seen);
    }
    let mut watch = slot.lease_watch.lock().unwrap_or_else(|e| e.into_inner());
    let lapsed = LeaseWatch::observe(
        &mut watch,
        (
            seen.owner.clone(),
            seen.attempt.clone(),
            seen.until_ms.unwrap_or(i64::MIN),
        ),
        shared.clock().monotonic(),
        LEASE,
    );
    lapsed.then_some(seen)
}

/// How taking the lease for a refresh ended.
pub enum Taken {
    /// The lease is ours under `attempt`: the grant as stored now.
    Ours(Box<ConnectionRow>),
    /// Another process refreshed meanwhile (or we stopped waiting for it):
    /// its result, to be taken instead of refreshing.
    Settled(Arc<Snapshot>),
}

/// Takes the lease for a refresh under `attempt`, which also commits
/// "refresh started". A live holder in another process is waited for
/// (bounded by the provider's timeout) and its result adopted; a dead or
/// lapsed one is taken over (at most twice, then its last state is
/// adopted).
pub async fn take(
    shared: &Shared,
    slot: &Slot,
    attempt: &str,
    provider: &Provider,
) -> Result<Taken, TokenError> {
    let mut takeover: Option<LeaseSeen> = None;
    let mut takeovers = 0;
    loop {
        match begin(shared, slot, attempt, takeover.as_ref()).await? {
            BeginRefresh::Started(row) => {
                slot.forget_lease_watch();
                if let (Some(previous), Some(at)) = (&takeover, row.interrupted_at) {
                    // Report it now, not only if the provider later
                    // rejects the token: the operator should know.
                    tracing::warn!(
                        provider = %slot.provider,
                        account = %slot.account,
                        previous_holder = %previous.owner,
                        "a refresh started at {} by a process that has since died or stopped renewing its lease was interrupted; took over its lease and retrying with the stored refresh token",
                        at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                    );
                    let event = history::interrupted(
                        (&slot.provider, &slot.account),
                        shared.clock().now(),
                        at,
                    );
                    shared.store.record_events(&[event]).await;
                }
                return Ok(Taken::Ours(row));
            }
            BeginRefresh::Gone => {
                return Err(TokenError::UnknownConnection {
                    provider: slot.provider.clone(),
                    account: slot.account.clone(),
                })
            }
            // Nothing was written; whatever the stand-in says is not the
            // grant, so nothing is refreshed (or parked) on it.
            BeginRefresh::Unreadable(row) => {
                slot.set(shared.snap_of(&row));
                return Err(slot.unreadable_error(&row, "it was not refreshed"));
            }
            BeginRefresh::Busy {
                owner: holder,
                attempt: theirs,
                until,
            } => {
                if takeovers < 2 {
                    takeover = holder_gone(shared, slot, &holder, theirs.as_deref(), Some(until));
                    if takeover.is_some() {
                        takeovers += 1;
                        continue;
                    }
                }
                // Someone else refreshes this grant: we are not alone.
                shared.peers.store(true, Ordering::Relaxed);
                match wait_for_other_process(shared, slot, provider).await? {
                    Waited::Settled(snap) => return Ok(Taken::Settled(snap)),
                    Waited::Lapsed(seen) if takeovers < 2 => {
                        takeover = Some(seen);
                        takeovers += 1;
                    }
                    Waited::Lapsed(_) => return Ok(Taken::Settled(slot.snapshot())),
                }
            }
        }
    }
}

/// How waiting for another process's lease ended.
enum Waited {
    /// It let go (or we stopped waiting): what is stored now.
    Settled(Arc<Snapshot>),
    /// Its holder is gone; take over exactly this lease.
    Lapsed(LeaseSeen),
}

/// Another process holds the lease: wait (bounded by the provider
/// timeout) until it lets go, then adopt whatever it stored; or, if its
/// lease stands still for [`LEASE`] on our monotonic clock meanwhile, say
/// so, for the caller to take it over.
async fn wait_for_other_process(
    shared: &Shared,
    slot: &Slot,
    provider: &Provider,
) -> Result<Waited, TokenError> {
    let deadline = tokio::time::Instant::now() + provider.config.request_timeout + LEASE_POLL;
    loop {
        tokio::time::sleep(LEASE_POLL).await;
        let Some(row) = shared.store.load_connection(slot.id).await? else {
            return Err(TokenError::UnknownConnection {
                provider: slot.provider.clone(),
                account: slot.account.clone(),
            });
        };
        if let Some(holder) = row.lease_owner.as_deref() {
            if holder != shared.owner {
                if let Some(seen) = holder_gone(
                    shared,
                    slot,
                    holder,
                    row.attempt_id.as_deref(),
                    row.lease_until,
                ) {
                    return Ok(Waited::Lapsed(seen));
                }
            }
        }
        if row.lease_owner.is_none() || tokio::time::Instant::now() >= deadline {
            return Ok(Waited::Settled(slot.set(shared.snap_of(&row))));
        }
    }
}

/// Takes the lease for a revocation, waiting for another process's flight
/// (bounded); returns the stored row, or `None` if it is gone. A row that
/// cannot be read comes back as its stand-in (`unreadable` set) with no
/// lease taken and nothing written.
pub async fn take_for_revocation(
    shared: &Shared,
    slot: &Slot,
    attempt: &str,
    provider: &Provider,
) -> Result<Option<ConnectionRow>, TokenError> {
    let deadline = tokio::time::Instant::now()
        + provider.config.request_timeout.saturating_mul(2)
        + LEASE
        + LEASE_POLL;
    let mut takeover: Option<LeaseSeen> = None;
    loop {
        match begin(shared, slot, attempt, takeover.as_ref()).await? {
            // No lease is taken on it: the caller refuses to revoke from a
            // stand-in, and a local forget needs none.
            BeginRefresh::Started(row) | BeginRefresh::Unreadable(row) => return Ok(Some(*row)),
            BeginRefresh::Gone => return Ok(None),
            BeginRefresh::Busy {
                owner: holder,
                attempt: theirs,
                until,
            } => {
                takeover = holder_gone(shared, slot, &holder, theirs.as_deref(), Some(until));
                if takeover.is_none() {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(TokenError::Busy {
                            provider: slot.provider.clone(),
                            account: slot.account.clone(),
                        });
                    }
                    tokio::time::sleep(LEASE_POLL).await;
                }
            }
        }
    }
}

/// Renews the lease every third of its length; never returns on its own
/// unless the lease is lost.
pub async fn renew_while(shared: &Shared, id: i64, attempt: &str) {
    loop {
        tokio::time::sleep(LEASE / 3).await;
        let until = shared.clock().now() + chrono_dur(LEASE);
        match shared
            .store
            .renew_lease(id, &shared.owner, attempt, until)
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(
                    connection = id,
                    "refresh lease lost while the provider call runs"
                );
                return;
            }
            Err(e) => {
                tracing::warn!(connection = id, error = %e, "cannot renew the refresh lease")
            }
        }
    }
}

/// Keeps the lease of a held grant's attempt alive (see
/// `flight::commit::retry_pending`).
pub async fn renew_held(shared: &Shared, slot: &Slot, attempt: &str) {
    let until = shared.clock().now() + chrono_dur(LEASE);
    match shared
        .store
        .renew_lease(slot.id, &shared.owner, attempt, until)
        .await
    {
        Ok(true) => {}
        // Taken over, released or the connection replaced: the held commit
        // still lands only on its own generation (see
        // `Store::commit_refresh`), and a taker's rejection re-reads it.
        Ok(false) => {
            tracing::warn!(provider = %slot.provider, account = %slot.account, "the lease of the refresh whose grant is held in memory is no longer ours")
        }
        Err(e) => {
            tracing::warn!(provider = %slot.provider, account = %slot.account, error = %e, "cannot renew the lease of the grant held in memory; retrying with the next commit attempt")
        }
    }
}

/// Ends our attempt without a new grant, recording its end state, and
/// serves what was written (or, if the lease was no longer ours, the
/// current snapshot).
pub async fn finish(
    shared: &Shared,
    slot: &Slot,
    attempt: &str,
    state: ConnState,
    failing: (Option<&str>, u32, Option<DateTime<Utc>>),
) -> Result<Arc<Snapshot>, StoreError> {
    let (last_error, failures, next_attempt_at) = failing;
    let row = shared
        .store
        .finish_attempt(
            slot.id,
            &shared.owner,
            attempt,
            state,
            last_error,
            failures,
            next_attempt_at,
        )
        .await?;
    Ok(match row {
        Some(r) => slot.set(shared.snap_of(&r)),
        None => slot.snapshot(),
    })
}

/// Gives back a lease taken for a revocation that did not happen,
/// restoring the state the connection had.
pub async fn release(shared: &Shared, slot: &Slot, attempt: &str) {
    let snap = slot.snapshot();
    let (state, last_error, failures, next_attempt_at) = snap.journal();
    match shared
        .store
        .finish_attempt(
            slot.id,
            &shared.owner,
            attempt,
            state,
            last_error,
            failures,
            next_attempt_at,
        )
        .await
    {
        Ok(Some(row)) if slot.pending().is_none() => {
            slot.set(shared.snap_of(&row));
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(provider = %slot.provider, account = %slot.account, error = %e, "cannot release the lease; it lapses by itself")
        }
    }
}

/// At start-up: marks the unfinished refreshes of holders certainly dead
/// as interrupted (so status reports them and they are retried at once)
/// and returns the rows to install. Any other holder's lease is taken
/// over only once seen standing still ([`take`]), so a live holder in
/// another PID namespace is never cut off.
pub async fn recover_interrupted(
    shared: &Shared,
    unfinished: Vec<ConnectionRow>,
) -> Result<Vec<ConnectionRow>, StoreError> {
    let mut rows = Vec::with_capacity(unfinished.len());
    for mut row in unfinished {
        if let (Some(started), Some(holder)) = (row.attempt_started_at, row.lease_owner.clone()) {
            if holder != shared.owner && owner_is_dead(&holder) {
                let msg = format!(
                    "a refresh started at {} was interrupted before its result was stored (the process stopped); retrying with the stored refresh token",
                    started.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                );
                tracing::warn!(provider = %row.provider, account = %row.account, "{msg}");
                if let Some(updated) = shared
                    .store
                    .mark_interrupted(
                        row.id,
                        Some(&holder),
                        &msg,
                        &[history::interrupted(
                            (&row.provider, &row.account),
                            shared.clock().now(),
                            started,
                        )],
                    )
                    .await?
                {
                    row = updated;
                }
            }
        }
        rows.push(row);
    }
    Ok(rows)
}

/// One attempt at the lease for `attempt`, for [`LEASE`] from now, taking
/// over `takeover` if that is still what is stored; on a store error the
/// lease watch is dropped (what it watched is unknown now).
async fn begin(
    shared: &Shared,
    slot: &Slot,
    attempt: &str,
    takeover: Option<&LeaseSeen>,
) -> Result<BeginRefresh, StoreError> {
    let now = shared.clock().now();
    shared
        .store
        .begin_refresh(
            slot.id,
            &shared.owner,
            attempt,
            now,
            now + chrono_dur(LEASE),
            takeover,
        )
        .await
        .inspect_err(|_| slot.forget_lease_watch())
}
