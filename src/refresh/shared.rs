//! What every part of the engine shares ([`Shared`]): the store, the
//! clock, the settings, the table of slots, the recognizer, the flight
//! thread, the rate limits and the process's lease identity, plus the
//! small services all layers use (notifications, fingerprints, a
//! rate-limit slot, revoking a token nobody holds).
//!
//! Must not: decide anything about the lifecycle; it is the context the
//! layers above (lease, flight, registry) act through.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, RwLock};

use secrecy::{ExposeSecret, SecretString};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::clock::{Anchor, Clock, ClockHandle};
use super::flights::FlightThread;
use super::recognizer::Recognizer;
use super::slot::{Slot, Slots};
use super::snapshot::Snapshot;
use super::types::Settings;
use crate::notify::{Event, EventKind};
use crate::provider::{Provider, TokenGrant};
use crate::ratelimit::RateLimits;
use crate::store::{ConnectionRow, Fingerprint, Store, StoreError, TokenKind};

/// The engine's shared state; the engine is a cheap handle on it.
pub struct Shared {
    pub store: Store,
    pub clock: ClockHandle,
    /// Cancelled by `Engine::stop`: commit retries make their last try.
    pub stopping: CancellationToken,
    pub settings: RwLock<Arc<Settings>>,
    pub slots: Slots,
    /// This process's lease identity (see `owner`).
    pub owner: String,
    pub tasks: TaskTracker,
    /// Where refresh flights run (see `flights`).
    pub flights: FlightThread,
    pub recognizer: Recognizer,
    /// The provider rate limits the proxy also uses: a refresh spends the
    /// same quota as an API call. `None`: refreshes are not limited.
    pub limits: Option<Arc<RateLimits>>,
    /// Shutdown has begun: no new flight starts (one in the air still
    /// lands and commits).
    pub no_new_refreshes: AtomicBool,
    /// Another live process shares the database (see `heartbeat`). Alone,
    /// the in-memory snapshot is the truth and the hot path reads no
    /// storage; with peers, `token` checks storage first.
    pub peers: AtomicBool,
    /// The scheduler's wake-up and the bookkeeping between passes.
    pub scheduler: crate::refresh::due::State,
}

impl Shared {
    /// Current settings.
    pub fn settings(&self) -> Arc<Settings> {
        self.settings
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The clock the engine reads time from.
    pub fn clock(&self) -> &dyn Clock {
        &*self.clock
    }

    /// A snapshot of `row`, taken in now.
    pub fn snap_of(&self, row: &ConnectionRow) -> Snapshot {
        Snapshot::from_row(row, Anchor::at(self.clock()))
    }

    /// Makes a stored row visible.
    pub fn install(&self, row: &ConnectionRow) {
        self.slots.install(row, self.snap_of(row));
        // Its due time may be earlier than the scheduler's next look.
        self.scheduler.wake();
    }

    /// Tells the operator about `slot`.
    pub fn notify(&self, slot: &Slot, event: EventKind, message: String) {
        self.settings().notifier.emit(Event {
            event,
            provider: slot.provider.clone(),
            account: slot.account.clone(),
            message,
        });
    }

    /// The fingerprints of a grant's tokens.
    pub fn fingerprints(&self, grant: &TokenGrant) -> Vec<Fingerprint> {
        let r = &self.recognizer;
        let mut fps = vec![r.fingerprint(TokenKind::Access, grant.access_token.expose_secret())];
        if let Some(t) = &grant.refresh_token {
            fps.push(r.fingerprint(TokenKind::Refresh, t.expose_secret()));
        }
        fps
    }

    /// Mirrors the stored fingerprints of a connection another process
    /// wrote (SPEC 5: its rotated refresh tokens are ours to recognise too).
    pub async fn learn_fingerprints(&self, id: i64) -> Result<(), StoreError> {
        let fps = self.store.fingerprints_of(id).await?;
        self.recognizer.replace(id, &fps);
        Ok(())
    }

    /// Removes a forgotten connection from memory: its snapshot, its
    /// fingerprints and any grant held for it.
    pub fn drop_slot(&self, slot: &Slot) {
        self.slots.retain(|s| s.id != slot.id);
        self.recognizer.forget(slot.id);
        slot.take_pending();
    }

    /// Waits for a rate-limit slot, at most the provider's request timeout;
    /// without one the refresh goes anyway, since losing the grant to a
    /// missed refresh costs more than one request over the limit.
    pub async fn rate_slot(&self, provider: &Provider, account: &str) {
        let Some(limits) = &self.limits else {
            return;
        };
        let deadline = tokio::time::Instant::now() + provider.config.request_timeout;
        if let Err(e) = limits.acquire(provider.name(), account, deadline).await {
            tracing::warn!(
                provider = provider.name(),
                account,
                "refreshing without a rate-limit slot: {e}"
            );
        }
    }

    /// Revokes a refresh token nobody holds any more (a replaced grant, a
    /// discarded late result), best effort, without delaying the caller;
    /// the outcome is logged (never the token).
    pub fn revoke_in_background(
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
        self.tasks.spawn(async move {
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
}
