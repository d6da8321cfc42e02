//! Revocation: forgetting a grant, under the flight lock and the lease so
//! the newest refresh token is the one revoked, keeping it when the
//! provider fails the revocation (unless only a local forget is asked).
//! (Tokens nobody holds any more are revoked by
//! `Shared::revoke_in_background`.)
//!
//! Must not: revoke from a row that cannot be read, or forget a grant the
//! provider failed to revoke.

use std::sync::Arc;

use secrecy::{ExposeSecret, SecretString};

use super::commit;
use crate::provider::Provider;
use crate::refresh::lease;
use crate::refresh::shared::Shared;
use crate::refresh::slot::Slot;
use crate::refresh::types::{Revocation, TokenError};
use crate::store::{EventKind, NewEvent};

/// Revokes the grant of `slot` upstream where the provider can (unless
/// `mode` is [`Revocation::LocalOnly`]) and forgets it locally. Returns
/// `false` if there was nothing to forget.
///
/// It first holds the flight lock (waiting for this process's refresh, or
/// a commit retry, to finish) and then the lease (waiting for another
/// process's), so the token it revokes is the newest: a flight cannot land
/// a successor afterwards. If the provider fails the revocation, the grant
/// is kept and the error returned, so the operator can retry. A stored row
/// that cannot be read is never revoked from (its refresh token is
/// unknown: revoking the stand-in's empty token would succeed at an RFC
/// 7009 provider and forget a grant still live upstream); it is refused
/// unless only a local forget is asked.
pub async fn forget(
    shared: &Shared,
    slot: &Arc<Slot>,
    p: &Provider,
    mode: Revocation,
) -> Result<bool, TokenError> {
    let (provider, account) = (slot.provider.as_str(), slot.account.as_str());
    let _flight = slot.flight.clone().lock_owned().await;
    // A grant held in memory is the newest: store it first if storage
    // allows, so the revocation below names it either way.
    if slot.pending().is_some() {
        if let Err(e) = commit::land_pending(shared, slot).await {
            tracing::error!(provider, account, error = %e, "the grant held in memory still cannot be stored; revoking it from memory");
        }
    }
    for _ in 0..3 {
        let attempt = lease::new_attempt();
        let Some(row) = lease::take_for_revocation(shared, slot, &attempt, p).await? else {
            shared.drop_slot(slot);
            return Ok(false);
        };
        if row.unreadable.is_some() && mode == Revocation::Upstream {
            return Err(slot.unreadable_error(
                &row,
                &format!("its refresh token is unknown, so nothing was revoked upstream or forgotten: forget it here only with `tokenkeeper revoke {provider} {account} --local` (DELETE ...?local=true) and revoke it at the provider, or authorize again"),
            ));
        }
        let held = slot.pending();
        let mut gone = EventKind::Forgotten;
        if mode == Revocation::Upstream {
            // Newest first: the held grant's refresh token, then what is
            // stored (the access token if no refresh token exists).
            let mut tokens: Vec<(&SecretString, &str)> = Vec::new();
            if let Some(t) = held.as_ref().and_then(|h| h.grant.refresh_token.as_ref()) {
                tokens.push((t, "refresh_token"));
            }
            match &row.refresh_token {
                Some(t) => tokens.push((t, "refresh_token")),
                None => tokens.push((&row.access_token, "access_token")),
            }
            let mut revoked = false;
            // An empty token is a connection that never got one (a
            // client-credentials row before its first token): nothing
            // exists upstream to revoke.
            for (token, hint) in tokens
                .into_iter()
                .filter(|(t, _)| !t.expose_secret().is_empty())
            {
                match p.revoke(token, hint).await {
                    Ok(r) => revoked = r,
                    Err(e) => {
                        tracing::warn!(provider, account, error = %e, "upstream revocation failed; the grant is kept");
                        lease::release(shared, slot, &attempt).await;
                        return Err(TokenError::RevocationFailed {
                            provider: provider.to_string(),
                            account: account.to_string(),
                            reason: e.to_string(),
                        });
                    }
                }
            }
            if revoked {
                gone = EventKind::Revoked;
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
        if shared
            .store
            .delete_connection_at(
                row.id,
                row.generation,
                &[NewEvent::new(
                    (provider, account),
                    shared.clock().now(),
                    gone,
                )],
            )
            .await?
        {
            tracing::info!(provider, account, "grant forgotten");
            shared.drop_slot(slot);
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
