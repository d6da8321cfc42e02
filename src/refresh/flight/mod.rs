//! One refresh of one connection, a *flight*: [`refresh`] makes it single
//! (callers that arrive while one is in the air join it and share its
//! result) and launches it on the flight thread; [`run`] is the refresh
//! itself, as named phases read top-down:
//!
//! 1. land a grant held in memory first, if any ([`commit`]);
//! 2. take the lease, which also journals "refresh started" (`lease`);
//! 3. decide on the grant as stored now ([`decide`]);
//! 4. call the provider, renewing the lease meanwhile (`call`);
//! 5. commit what it issued ([`commit`]), or end by failure class
//!    ([`outcome`]: transient, refused, unusable, rejected) (`conclude`).
//!
//! [`revoke`] forgets a grant under the same flight lock and lease.
//!
//! Must not: serve tokens or walk the connections (the registry and the
//! scheduler pass do); hold a std lock across `.await`.

pub mod commit;
pub mod decide;
pub mod outcome;
pub mod revoke;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

use self::decide::{decide, Decision, NO_REFRESH_TOKEN};
use crate::config::GrantKind;
use crate::provider::{Provider, ProviderError, TokenGrant};
use crate::refresh::lease::{self, Taken};
use crate::refresh::meta;
use crate::refresh::shared::Shared;
use crate::refresh::slot::{FlightGuard, Slot};
use crate::refresh::snapshot::Snapshot;
use crate::refresh::types::{IssuedToken, TokenError, Trigger};
use crate::store::{ConnState, ConnectionRow};

/// Single-flight entry: concurrent callers queue on the slot's flight
/// lock; the first runs the refresh, the rest take its result.
pub async fn refresh(
    shared: &Arc<Shared>,
    slot: &Arc<Slot>,
    trigger: Trigger,
) -> Result<IssuedToken, TokenError> {
    let snap = refresh_served(shared, slot, trigger).await?;
    slot.issue(&snap)
        .ok_or_else(|| slot.failure(&snap, shared.clock()))
}

/// [`refresh`], answering with the snapshot whose token the caller gets
/// (checked servable, not yet counted as served) rather than a copy of the
/// token: a herd of callers sharing one flight shares its snapshot.
pub async fn refresh_served(
    shared: &Arc<Shared>,
    slot: &Arc<Slot>,
    trigger: Trigger,
) -> Result<Arc<Snapshot>, TokenError> {
    let clock = shared.clock();
    // Read before `seen`: a flight that ends in between then counts as
    // ours to run, never as a joined one that did not rotate.
    let joined_from = slot.snapshot().generation;
    let seen = slot.attempts.load(Ordering::SeqCst);
    if trigger != Trigger::Forced && slot.in_flight() {
        // Join the flight in the air: wait for it to land and share its
        // result. Registering before re-checking means a landing in
        // between cannot be missed.
        let landed = slot.landed.notified();
        tokio::pin!(landed);
        landed.as_mut().enable();
        if slot.attempts.load(Ordering::SeqCst) == seen && slot.in_flight() {
            landed.await;
        }
        if slot.attempts.load(Ordering::SeqCst) != seen {
            return slot.servable(slot.snapshot(), clock);
        }
    }
    let flight = slot.flight.clone().lock_owned().await;
    if slot.attempts.load(Ordering::SeqCst) != seen {
        let snap = slot.snapshot();
        // A forced refresh that joined a flight which failed must report
        // the failure, like one that ran it (below), not answer 200 with
        // the token it was asked to replace. A joined flight that had
        // nothing to do does not count: run ours.
        let rotated = snap.generation != joined_from;
        let failed = snap.state() != ConnState::Active;
        if trigger != Trigger::Forced || rotated {
            return slot.servable(snap, clock);
        }
        if failed {
            return Err(slot.failure(&snap, clock));
        }
    }
    // Checked under the flight lock: a caller queued on a flight that
    // landed has taken its result above; nobody starts a new one.
    if shared.no_new_refreshes.load(Ordering::SeqCst) {
        let snap = slot.snapshot();
        let valid = snap.valid_until(snap.now(clock));
        if valid.is_some() && trigger != Trigger::Forced {
            return slot.servable(snap, clock);
        }
        return Err(TokenError::RefreshFailed {
            provider: slot.provider.clone(),
            account: slot.account.clone(),
            reason: "tokenkeeper is stopping and starts no new refresh; retry once it is back"
                .into(),
            retry_after: Duration::from_secs(5),
            still_valid_until: valid,
        });
    }
    // A refresh that could not be committed is not started: the provider
    // would rotate the refresh token and the new one would be lost. The
    // token held is served while it is valid (even if it is about to
    // expire), then callers are told to come back.
    if !shared.store.feed().up() {
        return unavailable(shared, slot, trigger, None);
    }
    // From here the flight owns the lock and the guard: it finishes on the
    // flight thread even if this caller goes away.
    let guard = FlightGuard::new(slot.clone());
    let (flying_shared, flying) = (shared.clone(), slot.clone());
    let landed = shared.flights.spawn(shared.tasks.track_future(async move {
        let _flight = flight;
        let _guard = guard;
        let shared = flying_shared;
        let before = flying.snapshot().generation;
        let snap = run(&shared, &flying, trigger).await?;
        // A held grant's token being served is a new token too.
        let held = flying.pending().is_some_and(|p| {
            snap.token().is_some_and(|t| {
                p.grant.access_token.expose_secret() == t.access_token.expose_secret()
            })
        });
        if trigger == Trigger::Forced && snap.generation == before && !held {
            // Whoever forces a refresh wants to know it did not happen,
            // even though the old token would still be served to
            // ordinary callers.
            return Err(flying.failure(&snap, shared.clock()));
        }
        flying.servable(snap, shared.clock())
    }));
    match landed.await {
        // Lost before the provider was called (taking the lease is the
        // first write): nothing was refreshed.
        Ok(Err(TokenError::Store(e)))
            if shared.store.feed().note(&e) || !shared.store.feed().up() =>
        {
            unavailable(shared, slot, trigger, Some(&e))
        }
        Ok(result) => result,
        Err(e) => {
            tracing::error!(provider = %slot.provider, account = %slot.account, "the refresh task failed: {e}");
            let snap = slot.snapshot();
            Err(TokenError::RefreshFailed {
                provider: slot.provider.clone(),
                account: slot.account.clone(),
                reason: "internal error: the refresh task stopped".into(),
                retry_after: Duration::from_secs(1),
                still_valid_until: snap.valid_until(snap.now(clock)),
            })
        }
    }
}

/// The answer while the database cannot be reached: the held token while
/// it is valid (not for a forced refresh, which asked for a new one), else
/// `refresh_failed` with a `Retry-After`.
fn unavailable(
    shared: &Shared,
    slot: &Slot,
    trigger: Trigger,
    cause: Option<&crate::store::StoreError>,
) -> Result<Arc<Snapshot>, TokenError> {
    let clock = shared.clock();
    let snap = slot.snapshot();
    if snap.needs_authorization() {
        return Err(slot.failure(&snap, clock));
    }
    let valid = snap.valid_until(snap.now(clock));
    if valid.is_some() && trigger != Trigger::Forced {
        return slot.servable(snap, clock);
    }
    let reason = match cause {
        Some(e) => format!(
            "the database cannot be reached ({e}); no refresh is started until it answers again"
        ),
        None => {
            "the database cannot be reached; no refresh is started until it answers again".into()
        }
    };
    Err(TokenError::RefreshFailed {
        provider: slot.provider.clone(),
        account: slot.account.clone(),
        reason,
        retry_after: UNAVAILABLE_RETRY_AFTER,
        still_valid_until: valid,
    })
}

/// `Retry-After` while the database cannot be reached: about the time the
/// store takes to notice it is back (`store::postgres` reconnects at
/// least every 2 s).
const UNAVAILABLE_RETRY_AFTER: Duration = Duration::from_secs(5);

/// Runs one refresh with the flight lock held; the phases are in the
/// module documentation.
pub async fn run(
    shared: &Arc<Shared>,
    slot: &Arc<Slot>,
    trigger: Trigger,
) -> Result<Arc<Snapshot>, TokenError> {
    let settings = shared.settings();
    let provider = settings
        .providers
        .get(&slot.provider)
        .ok_or_else(|| TokenError::UnknownProvider(slot.provider.clone()))?;

    // 1. A grant held in memory comes first.
    if slot.pending().is_some() {
        return Ok(commit::land_before_refresh(shared, slot, &settings.refresh).await);
    }

    // 2. Take the lease; this also journals "refresh started".
    let attempt = lease::new_attempt();
    let row = match lease::take(shared, slot, &attempt, provider).await? {
        Taken::Ours(row) => row,
        Taken::Settled(snap) => return Ok(snap),
    };

    // 3. Decide on the re-read grant: it may be newer than our snapshot
    // (another process rotated it).
    let now = slot.set(shared.snap_of(&row)).now(shared.clock());
    let jitter = slot.jitter(&settings.refresh);
    let refresh_token = match decide(trigger, &row, now, &settings.refresh, jitter) {
        Decision::Refresh(token) => token.clone(),
        Decision::Skip => return skip(shared, slot, &attempt, *row).await,
        // The client-credentials grant has no refresh token to send: the
        // request is built from the client's credentials (`call_once`).
        Decision::NoRefreshToken if provider.config.grant == GrantKind::ClientCredentials => {
            SecretString::from(String::new())
        }
        Decision::NoRefreshToken => {
            let generation = row.generation;
            return outcome::rejected(
                shared,
                slot,
                (&attempt, generation),
                &row,
                NO_REFRESH_TOKEN.to_string(),
            )
            .await;
        }
    };

    // 4. Call the provider, renewing the lease meanwhile.
    let called = call(
        shared,
        slot,
        provider,
        &attempt,
        refresh_token,
        row.generation,
    )
    .await?;

    // 5. Commit what it issued, or end by failure class.
    conclude(shared, slot, &attempt, &row, called).await
}

/// What the provider answered, with the refresh token it was sent and the
/// generation that token was read at (the commit compares against it).
struct Called {
    result: Result<TokenGrant, ProviderError>,
    used: SecretString,
    base_generation: i64,
    elapsed: Duration,
}

/// Calls the provider with `refresh_token`; if it rejects the token but
/// storage holds a newer one (another process rotated it while we
/// called), calls once more with that.
async fn call(
    shared: &Shared,
    slot: &Slot,
    provider: &Provider,
    attempt: &str,
    refresh_token: SecretString,
    generation: i64,
) -> Result<Called, TokenError> {
    let called = call_once(shared, slot, provider, attempt, refresh_token, generation).await;
    if !matches!(called.result, Err(ProviderError::Rejected { .. })) {
        return Ok(called);
    }
    let Some((newer, generation)) = newer_stored_token(shared, slot, &called.used).await? else {
        return Ok(called);
    };
    tracing::info!(provider = %slot.provider, account = %slot.account, "refresh token rejected, but storage holds a newer one (another process rotated it); retrying once with it");
    Ok(call_once(shared, slot, provider, attempt, newer, generation).await)
}

/// Ends the flight by what the provider answered: a commit, or the state
/// of the failure's class (`outcome`).
async fn conclude(
    shared: &Arc<Shared>,
    slot: &Arc<Slot>,
    attempt: &str,
    row: &ConnectionRow,
    called: Called,
) -> Result<Arc<Snapshot>, TokenError> {
    let Called {
        result,
        used,
        base_generation,
        elapsed,
    } = called;
    match result {
        Ok(grant) => {
            let meta = shared.settings().providers.get(&slot.provider).map(|p| {
                meta::refreshed(
                    &row.meta,
                    row.issued_at,
                    &grant,
                    &p.config.refresh_token_lifetime,
                )
            });
            commit::commit(
                shared,
                slot,
                attempt,
                base_generation,
                used,
                grant,
                elapsed,
                meta,
            )
            .await
        }
        Err(ProviderError::Transient {
            message,
            retry_after,
        }) => outcome::transient(shared, slot, attempt, row, message, retry_after).await,
        Err(ProviderError::Refused { message }) => {
            outcome::refused(shared, slot, attempt, row, message).await
        }
        Err(ProviderError::Unusable {
            message,
            refresh_token,
        }) => {
            outcome::unusable(
                shared,
                slot,
                (attempt, base_generation, used),
                row,
                message,
                refresh_token,
                elapsed,
            )
            .await
        }
        Err(ProviderError::Rejected { message }) => {
            let reason = outcome::rejected_reason(&message, row.interrupted_at);
            outcome::rejected(shared, slot, (attempt, base_generation), row, reason).await
        }
    }
}

/// Nothing to do: gives the lease back with the state as stored (a
/// rejected grant stays rejected, anything else is active again).
async fn skip(
    shared: &Shared,
    slot: &Slot,
    attempt: &str,
    row: ConnectionRow,
) -> Result<Arc<Snapshot>, TokenError> {
    let state = match row.state {
        ConnState::AuthorizationRequired => ConnState::AuthorizationRequired,
        _ => ConnState::Active,
    };
    let row = shared
        .store
        .finish_attempt(
            slot.id,
            &shared.owner,
            attempt,
            state,
            row.last_error.as_deref(),
            row.failures,
            row.next_attempt_at,
        )
        .await?
        .unwrap_or(row);
    Ok(slot.set(shared.snap_of(&row)))
}

/// One provider call with `refresh_token` (for a client-credentials
/// provider, a token request with the client's credentials instead),
/// within the provider's rate limits, renewing the lease while it runs.
async fn call_once(
    shared: &Shared,
    slot: &Slot,
    provider: &Provider,
    attempt: &str,
    refresh_token: SecretString,
    generation: i64,
) -> Called {
    let started = std::time::Instant::now();
    let result = {
        let renew = lease::renew_while(shared, slot.id, attempt);
        let call = async {
            shared.rate_slot(provider, &slot.account).await;
            match provider.config.grant {
                GrantKind::AuthorizationCode => provider.refresh(&refresh_token).await,
                GrantKind::ClientCredentials => provider.client_credentials().await,
            }
        };
        tokio::pin!(call);
        tokio::select! {
            r = &mut call => r,
            () = renew => call.await,
        }
    };
    Called {
        result,
        used: refresh_token,
        base_generation: generation,
        elapsed: started.elapsed(),
    }
}

/// The stored refresh token and generation, if storage holds a different
/// refresh token than the one the provider just rejected.
async fn newer_stored_token(
    shared: &Shared,
    slot: &Slot,
    rejected: &SecretString,
) -> Result<Option<(SecretString, i64)>, TokenError> {
    let current = shared.store.load_connection(slot.id).await?;
    Ok(current.and_then(|c| {
        let token = c
            .refresh_token
            .filter(|t| t.expose_secret() != rejected.expose_secret())?;
        Some((token, c.generation))
    }))
}
