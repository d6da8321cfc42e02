//! Revocation: forgetting a grant, under the flight lock and the lease so
//! the newest refresh token is the one revoked, keeping it when the
//! provider fails the revocation (unless only a local forget is asked), and
//! revoking tokens nobody holds any more (a replaced grant, a discarded
//! late result).

use std::sync::Arc;

use secrecy::SecretString;

use super::{chrono_dur, Engine, Revocation, Slot, TokenError, LEASE, LEASE_POLL};
use crate::provider::Provider;
use crate::store::{BeginRefresh, ConnState, ConnectionRow, LeaseSeen};

impl Engine {
    /// Revokes a refresh token nobody holds any more, best effort, without
    /// delaying the caller; the outcome is logged (never the token).
    pub(super) fn revoke_in_background(
        &self,
        provider: &str,
        account: &str,
        token: SecretString,
        what: &'static str,
    ) {
        let Some(p) = self.settings().providers.get(provider).cloned() else {
            return;
        };
        if !p.config.revoke_replaced {
            tracing::info!(
                provider,
                account,
                "{what} is not revoked upstream (revoke_replaced = false for this provider)"
            );
            return;
        }
        let (provider, account) = (provider.to_string(), account.to_string());
        self.inner.tasks.spawn(async move {
            match p.revoke(&token, "refresh_token").await {
                Ok(true) => tracing::info!(%provider, %account, "revoked upstream: {what}"),
                Ok(false) => tracing::info!(
                    %provider,
                    %account,
                    "{what} stays valid at the provider: it offers no revocation"
                ),
                Err(e) => tracing::warn!(
                    %provider,
                    %account,
                    error = %e,
                    "could not revoke {what} upstream; it may stay valid at the provider until it expires"
                ),
            }
        });
    }

    /// Revokes a grant upstream where the provider can (unless `mode` is
    /// [`Revocation::LocalOnly`]) and forgets it locally. Returns `false` if
    /// there was nothing to forget.
    ///
    /// It first holds the flight lock (waiting for this process's refresh,
    /// or a commit retry, to finish) and then the lease (waiting for another
    /// process's), so the token it revokes is the newest: a flight cannot
    /// land a successor afterwards. If the provider fails the revocation, the
    /// grant is kept and the error returned, so the operator can retry. A
    /// stored row that cannot be read is never revoked from (its refresh
    /// token is unknown: revoking the stand-in's empty token would succeed
    /// at an RFC 7009 provider and forget a grant still live upstream); it
    /// is refused unless only a local forget is asked.
    pub async fn forget(
        &self,
        provider: &str,
        account: &str,
        mode: Revocation,
    ) -> Result<bool, TokenError> {
        let settings = self.settings();
        let Some(p) = settings.providers.get(provider) else {
            return Err(TokenError::UnknownProvider(provider.to_string()));
        };
        let slot = match self.slot(provider, account) {
            Ok(s) => s,
            Err(TokenError::UnknownConnection { .. }) => {
                // Perhaps stored by another process since our last look.
                self.reconcile().await?;
                match self.slot(provider, account) {
                    Ok(s) => s,
                    Err(TokenError::UnknownConnection { .. }) => return Ok(false),
                    Err(e) => return Err(e),
                }
            }
            Err(e) => return Err(e),
        };
        let _flight = slot.flight.clone().lock_owned().await;
        // A grant held in memory is the newest: store it first if storage
        // allows, so the revocation below names it either way.
        if slot.pending().is_some() {
            if let Err(e) = self.land_pending(&slot).await {
                tracing::error!(provider, account, error = %e, "the grant held in memory still cannot be stored; revoking it from memory");
            }
        }
        for _ in 0..3 {
            let attempt = format!("{:016x}", rand::random::<u64>());
            let Some(row) = self.lease_for_revocation(&slot, &attempt, p).await? else {
                self.drop_slot(&slot);
                return Ok(false);
            };
            if row.unreadable.is_some() && mode == Revocation::Upstream {
                return Err(super::unreadable_error(
                    &slot,
                    &row,
                    &format!("its refresh token is unknown, so nothing was revoked upstream or forgotten: forget it here only with `tokenkeeper revoke {provider} {account} --local` (DELETE ...?local=true) and revoke it at the provider, or authorize again"),
                ));
            }
            let held = slot.pending();
            if mode == Revocation::Upstream {
                // Newest first: the held grant's refresh token, then what
                // is stored (the access token if no refresh token exists).
                let mut tokens: Vec<(&SecretString, &str)> = Vec::new();
                if let Some(t) = held.as_ref().and_then(|h| h.grant.refresh_token.as_ref()) {
                    tokens.push((t, "refresh_token"));
                }
                match &row.refresh_token {
                    Some(t) => tokens.push((t, "refresh_token")),
                    None => tokens.push((&row.access_token, "access_token")),
                }
                let mut revoked = false;
                for (token, hint) in tokens {
                    match p.revoke(token, hint).await {
                        Ok(r) => revoked = r,
                        Err(e) => {
                            tracing::warn!(provider, account, error = %e, "upstream revocation failed; the grant is kept");
                            self.release_lease(&slot, &attempt).await;
                            return Err(TokenError::RevocationFailed {
                                provider: provider.to_string(),
                                account: account.to_string(),
                                reason: e.to_string(),
                            });
                        }
                    }
                }
                if revoked {
                    tracing::info!(provider, account, "grant revoked upstream");
                } else {
                    tracing::info!(
                        provider,
                        account,
                        "the provider offers no revocation; the grant is only forgotten here"
                    );
                }
            } else {
                tracing::warn!(
                    provider,
                    account,
                    "forgetting the grant here only, as asked: it stays valid at the provider"
                );
            }
            if self
                .inner
                .store
                .delete_connection_at(row.id, row.generation)
                .await?
            {
                tracing::info!(provider, account, "grant forgotten");
                self.drop_slot(&slot);
                return Ok(true);
            }
            // A newer authorization was stored meanwhile: revoke that too.
            tracing::info!(
                provider,
                account,
                "a newer grant was stored during the revocation; revoking it as well"
            );
        }
        Err(TokenError::Busy {
            provider: provider.to_string(),
            account: account.to_string(),
        })
    }

    /// Takes the lease for a revocation, waiting for another process's
    /// flight (bounded); returns the stored row, or `None` if it is gone.
    /// A row that cannot be read comes back as its stand-in (`unreadable`
    /// set) with no lease taken and nothing written.
    pub(super) async fn lease_for_revocation(
        &self,
        slot: &Arc<Slot>,
        attempt: &str,
        provider: &Provider,
    ) -> Result<Option<ConnectionRow>, TokenError> {
        let deadline = tokio::time::Instant::now()
            + provider.config.request_timeout.saturating_mul(2)
            + LEASE
            + LEASE_POLL;
        let mut takeover: Option<LeaseSeen> = None;
        loop {
            let now = self.clock().now();
            match self
                .inner
                .store
                .begin_refresh(
                    slot.id,
                    &self.inner.owner,
                    attempt,
                    now,
                    now + chrono_dur(LEASE),
                    takeover.as_ref(),
                )
                .await
                .inspect_err(|_| slot.forget_lease_watch())?
            {
                // No lease is taken on it: the caller refuses to revoke
                // from a stand-in, and a local forget needs none.
                BeginRefresh::Started(row) | BeginRefresh::Unreadable(row) => {
                    return Ok(Some(*row))
                }
                BeginRefresh::Gone => return Ok(None),
                BeginRefresh::Busy {
                    owner: holder,
                    attempt: theirs,
                    until,
                } => {
                    takeover = self.holder_gone(slot, &holder, theirs.as_deref(), Some(until));
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

    /// Gives back a lease taken for a revocation that did not happen,
    /// restoring the state the connection had.
    pub(super) async fn release_lease(&self, slot: &Slot, attempt: &str) {
        let snap = slot.snapshot();
        let state = match snap.state {
            ConnState::Refreshing => ConnState::Active,
            s => s,
        };
        match self
            .inner
            .store
            .finish_attempt(
                slot.id,
                &self.inner.owner,
                attempt,
                state,
                snap.last_error.as_deref(),
                snap.failures,
                snap.next_attempt_at,
            )
            .await
        {
            Ok(Some(row)) if slot.pending().is_none() => {
                slot.set(self.snap_of(&row));
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(provider = %slot.provider, account = %slot.account, error = %e, "cannot release the lease; it lapses by itself")
            }
        }
    }

    /// Removes a forgotten connection from memory: its snapshot, its
    /// fingerprints and any grant held for it.
    pub(super) fn drop_slot(&self, slot: &Slot) {
        self.inner
            .slots
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, s| s.id != slot.id);
        self.inner.recognizer.forget(slot.id);
        slot.take_pending();
    }
}
