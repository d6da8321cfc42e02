//! The engine: the façade that wires the refresh machinery together and
//! the API the rest of the daemon uses (`http`, `daemon`, `metrics`,
//! `cli`). It holds no logic of its own: serving is in `registry`, one
//! refresh in `flight`, the lease and the journal in `lease`, the served
//! state in `snapshot`; the scheduler pass (`tick`, `heartbeat`,
//! `reconcile`) is in `engine/sweep.rs`.
//!
//! Invariants (kept by the layers named):
//! - A snapshot is replaced only after the database commit that produced
//!   it (`flight::commit`), so no caller ever sees an access token whose
//!   refresh token is not durable. The one exception: a grant the provider
//!   issued whose commit failed, once the stored access token is no longer
//!   usable (logged).
//! - At most one refresh per connection runs in this process (the slot's
//!   flight lock, `flight::refresh`) and across processes (the lease,
//!   `lease`); callers that arrive during a refresh wait for it and share
//!   its result. Another process's lease is taken over only when that
//!   process is certainly dead (`owner`) or its lease has stood still for
//!   `lease::LEASE` (30 s) on our monotonic clock (`clock::LeaseWatch`);
//!   never by comparing wall clocks. A failed write of our own restarts
//!   that watch (the holder could not renew either), and a held grant's
//!   lease is renewed at every commit retry.
//! - A row the store could not read (`snapshot::TokenState::Unreadable`)
//!   has no token, and is never leased, refreshed, parked or revoked from:
//!   the store refuses to lease it (`BeginRefresh::Unreadable`), forced
//!   refreshes and upstream revocations are refused naming the problem; a
//!   local forget or a new authorization are the ways out.
//! - The refresh token is not kept in memory: it is read from the database
//!   under the lease, which is the only point where it can be current. The
//!   exception is a grant whose commit failed: it is held in the slot's
//!   pending commit (secrecy types) and retried with backoff until it
//!   lands; while it is held, no refresh of the connection calls the
//!   provider (it could not be committed either), and the flight lock
//!   orders the retries with flights and revocations.
//! - A commit is compare-and-swap on the generation the refresh read under
//!   its lease: a newer authorization always wins, and the late result is
//!   discarded (its new refresh token revoked upstream where possible).
//!   Parking a grant after a rejection is compare-and-swap on it too: a
//!   grant stored since the rejected token was read is kept.
//! - A revocation holds the flight lock and the lease, so it revokes the
//!   newest refresh token, never one a flight is about to replace.
//! - A still-valid access token is never discarded because of a failure.
//! - Expiry is judged on the later of the wall clock and the token's
//!   receipt plus monotonic time since (`clock::Anchor`), so a clock set
//!   back cannot make a dead token look alive.

mod follow;
mod sweep;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use chrono::{DateTime, Utc};
use tokio_util::task::TaskTracker;

use super::clock::{Clock, ClockHandle, SystemClock};
use super::flight::{self, revoke};
use super::flights::FlightThread;
use super::lease;
use super::owner;
use super::recognizer::Recognizer;
use super::registry;
use super::shared::Shared;
use super::slot::{Slot, Slots};
use crate::provider::TokenGrant;
use crate::ratelimit::RateLimits;
use crate::store::{ConnectionRow, Store, StoreError};

pub use super::snapshot::Snapshot;
pub use super::types::{
    ConnectionReport, IssuedToken, Revocation, ServedToken, Settings, TokenError, TokenIdentity,
    Trigger,
};

/// Everything an engine is made of, given at once to [`Engine::start`].
pub struct EngineParts {
    pub store: Store,
    pub settings: Settings,
    /// The provider rate limits the proxy also uses (a refresh spends the
    /// same quota as an API call); `None`: refreshes are not limited.
    pub limits: Option<Arc<RateLimits>>,
    /// Where the engine reads time (tests move a `clock::TestClock`).
    pub clock: ClockHandle,
}

impl EngineParts {
    /// An engine on `store` with `settings`, the system clock and no rate
    /// limits; set the other fields to change that.
    pub fn new(store: Store, settings: Settings) -> EngineParts {
        EngineParts {
            store,
            settings,
            limits: None,
            clock: SystemClock::handle(),
        }
    }
}

/// Handle on the engine; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Shared>,
}

impl Engine {
    /// Loads every stored grant and reports refreshes that a previous
    /// process started and never finished.
    pub async fn start(parts: EngineParts) -> Result<Engine, StoreError> {
        let EngineParts {
            store,
            settings,
            limits,
            clock,
        } = parts;
        let recognizer = Recognizer::new(store.fingerprint_key().await?);
        store
            .each_fingerprint(|id, fp| recognizer.add(id, &[fp]))
            .await?;
        let engine = Engine {
            inner: Arc::new(Shared {
                store,
                clock,
                stopping: tokio_util::sync::CancellationToken::new(),
                settings: RwLock::new(Arc::new(settings)),
                slots: Slots::default(),
                owner: owner::Identity::current().owner(rand::random()),
                tasks: TaskTracker::new(),
                flights: FlightThread::start(),
                recognizer,
                limits,
                no_new_refreshes: AtomicBool::new(false),
                peers: AtomicBool::new(false),
                scheduler: Default::default(),
            }),
        };
        engine.heartbeat().await?;
        // Installed as they stream in; the few with an unfinished refresh
        // are handled afterwards, since that writes to the store.
        let mut unfinished = Vec::new();
        engine
            .inner
            .store
            .each_connection(|row| {
                engine.install(&row);
                if row.attempt_started_at.is_some() && row.lease_owner.is_some() {
                    unfinished.push(row);
                }
            })
            .await?;
        for row in lease::recover_interrupted(&engine.inner, unfinished).await? {
            engine.install(&row);
        }
        Ok(engine)
    }

    /// Gives every client-credentials provider (`grant =
    /// "client_credentials"`) its connection under account `default` when
    /// it has none, due at once, so the scheduler obtains its token; how
    /// many were added. Called at start and after each reload.
    pub async fn ensure_client_credentials(&self) -> Result<usize, StoreError> {
        super::client_credentials::ensure(&self.inner).await
    }

    /// The store this engine writes to.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// Current settings.
    pub fn settings(&self) -> Arc<Settings> {
        self.inner.settings()
    }

    /// Replaces providers and policy (SIGHUP). Grants of removed providers
    /// stay in the database but are no longer served.
    pub fn reload(&self, settings: Settings) {
        *self
            .inner
            .settings
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Arc::new(settings);
        // check_interval, at_fraction or jitter may move every due time.
        self.inner.scheduler.wake();
    }

    /// What the refresh scheduler shares with the engine (its wake-up).
    pub(crate) fn scheduler(&self) -> &crate::refresh::due::State {
        &self.inner.scheduler
    }

    /// Shutdown has begun: from now on no new refresh flight starts (a
    /// provider call started now might not be answered and committed
    /// before the process must exit); callers get `RefreshFailed`.
    pub fn stop_new_refreshes(&self) {
        self.inner.no_new_refreshes.store(true, Ordering::SeqCst);
    }

    /// Tasks spawned by the engine (scheduled refreshes, every flight), for
    /// shutdown.
    pub fn tasks(&self) -> &TaskTracker {
        &self.inner.tasks
    }

    /// Stops background work at shutdown: grants held in memory get one
    /// last attempt to be stored (their retry loops end after it).
    pub fn stop(&self) {
        self.inner.stopping.cancel();
    }

    /// Removes this process's heartbeat (clean stop).
    pub async fn leave(&self) {
        if let Err(e) = self.inner.store.leave(&self.inner.owner).await {
            tracing::warn!(error = %e, "cannot remove this process's heartbeat");
        }
    }

    /// Stores the grant of a completed browser authorization and serves it.
    pub async fn authorized(
        &self,
        provider: &str,
        account: &str,
        grant: &TokenGrant,
    ) -> Result<(), StoreError> {
        self.authorized_by(provider, account, grant, super::AuthorizedBy::Browser)
            .await
    }

    /// Stores the grant of a completed authorization and serves it; `by`
    /// (browser, pasted address, device code) is what its `authorized`
    /// notification says.
    pub async fn authorized_by(
        &self,
        provider: &str,
        account: &str,
        grant: &TokenGrant,
        by: super::AuthorizedBy,
    ) -> Result<(), StoreError> {
        registry::authorized(&self.inner, provider, account, grant, by).await
    }

    /// Adopts a refresh token another program holds (`tokenkeeper
    /// import`): redeemed once at the provider, then stored like a new
    /// authorization; an active connection is replaced only with `replace`
    /// (`import.rs`).
    pub async fn import(
        &self,
        provider: &str,
        account: &str,
        refresh_token: &secrecy::SecretString,
        replace: bool,
    ) -> Result<super::import::Imported, super::import::ImportError> {
        if !self.inner.store.feed().up() {
            return Err(super::import::ImportError::StorageDown);
        }
        // A connection another process sharing the database stored since
        // our last pass must count as existing.
        if self.inner.slots.get(provider, account).is_none() {
            self.reconcile().await?;
        }
        super::import::import(&self.inner, provider, account, refresh_token, replace).await
    }

    /// Makes a freshly stored row (e.g. a new authorization) visible.
    pub fn install(&self, row: &ConnectionRow) {
        self.inner.install(row);
    }

    /// The token fast lane: when this process is alone on its database, no
    /// refresh of the connection is in flight and its snapshot is fresh
    /// enough, `f` sees the token in place (no storage read, no
    /// allocation) and its result is returned. `None` means "take
    /// [`Engine::token`]", which decides every other case; when `Some`,
    /// `token` would have returned the same token (`registry.rs`).
    pub fn with_fresh_token<R>(
        &self,
        provider: &str,
        account: &str,
        now: DateTime<Utc>,
        f: impl FnOnce(ServedToken<'_>) -> R,
    ) -> Option<R> {
        registry::with_fresh_token(&self.inner, provider, account, now, f)
    }

    /// The hot path: a token with at least `min_validity` left, refreshing
    /// first when needed, waiting for an in-flight refresh rather than
    /// handing out a token that refresh may be about to kill
    /// (`registry.rs`).
    pub async fn token(&self, provider: &str, account: &str) -> Result<IssuedToken, TokenError> {
        registry::token(&self.inner, provider, account).await
    }

    /// [`Engine::token`] as its `/v1/token` answer, rendered once per
    /// snapshot and shared by every caller it serves (`registry.rs`).
    pub async fn token_answer(
        &self,
        provider: &str,
        account: &str,
    ) -> Result<(Arc<super::token_json::TokenJson>, DateTime<Utc>), TokenError> {
        registry::token_answer(&self.inner, provider, account).await
    }

    /// Whether `provider/account` is a known connection, from memory only
    /// (no storage read, no refresh): lets the proxy refuse unknown names
    /// before it spends a rate-limit slot or quota on them.
    pub fn check_known(&self, provider: &str, account: &str) -> Result<(), TokenError> {
        registry::slot(&self.inner, provider, account).map(|_| ())
    }

    /// What connection `provider/account` keeps beside its tokens (its
    /// extras, its refresh token's end), from memory; the proxy's base URL
    /// and headers depend on it.
    pub fn grant_meta(
        &self,
        provider: &str,
        account: &str,
    ) -> Option<Arc<crate::store::GrantMeta>> {
        let slot = self.inner.slots.get(provider, account)?;
        let meta = slot.snapshot().meta.clone();
        Some(meta)
    }

    /// The token `provider/account` serves now, if still valid, without
    /// refreshing or counting it as served (token files mirror it).
    pub fn current_token(&self, provider: &str, account: &str) -> Option<IssuedToken> {
        registry::current(&self.inner, provider, account)
    }

    /// A receiver woken whenever a served token may have changed (a new
    /// token committed here or seen from another process, a connection
    /// new or gone; never a change of state alone): subscribers
    /// compare what they mirror with [`Engine::current_token`]. The engine
    /// does not know who listens.
    pub fn token_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.slots.subscribe()
    }

    /// Refreshes now, whatever the schedule says (SPEC: `POST .../refresh`).
    pub async fn force_refresh(
        &self,
        provider: &str,
        account: &str,
    ) -> Result<IssuedToken, TokenError> {
        registry::force_refresh(&self.inner, provider, account).await
    }

    /// Whether `provider`/`account` is a connection held now.
    pub fn knows(&self, provider: &str, account: &str) -> bool {
        self.inner.slots.get(provider, account).is_some()
    }

    /// Every known connection of a configured provider, for reports.
    pub fn report(&self) -> Vec<ConnectionReport> {
        registry::report(&self.inner)
    }

    /// Says what a token is (for `tokenkeeper inspect`).
    pub fn inspect(&self, token: &str) -> TokenIdentity {
        registry::inspect(&self.inner, token)
    }

    /// Whether a bearer credential is one of our refresh tokens, current or
    /// rotated out (SPEC 5). If so, the misuse is reported, once: a
    /// security log line, `tokenkeeper_bearer_misuse_total` and the
    /// `bearer_misuse` notification naming the grant, never the token.
    pub fn refuse_refresh_token_as_bearer(&self, token: &str) -> bool {
        registry::refuse_refresh_token_as_bearer(&self.inner, token)
    }

    /// After a config reload: every `retrying` connection is due at the
    /// next scheduler pass instead of after its backoff, since the reload
    /// may have fixed what failed. Returns how many.
    pub fn retry_failing_now(&self) -> usize {
        registry::retry_failing_now(&self.inner)
    }

    /// Revokes a grant upstream where the provider can (unless `mode` is
    /// [`Revocation::LocalOnly`]) and forgets it locally, under the flight
    /// lock and the lease so the newest token is the one revoked
    /// (`flight/revoke.rs`); if the provider fails the revocation, the
    /// grant is kept. Returns `false` if there was nothing to forget.
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
        let slot = match registry::slot(&self.inner, provider, account) {
            Ok(s) => s,
            Err(TokenError::UnknownConnection { .. }) => {
                // Perhaps stored by another process since our last look.
                self.reconcile().await?;
                match registry::slot(&self.inner, provider, account) {
                    Ok(s) => s,
                    Err(TokenError::UnknownConnection { .. }) => return Ok(false),
                    Err(e) => return Err(e),
                }
            }
            Err(e) => return Err(e),
        };
        revoke::forget(&self.inner, &slot, p, mode).await
    }

    // What the scheduler pass (`sweep`) uses.

    fn clock(&self) -> &dyn Clock {
        self.inner.clock()
    }

    fn all_slots(&self) -> Vec<Arc<Slot>> {
        self.inner.slots.all()
    }

    async fn learn_fingerprints(&self, id: i64) -> Result<(), StoreError> {
        self.inner.learn_fingerprints(id).await
    }

    async fn refresh_slot(
        &self,
        slot: &Arc<Slot>,
        trigger: Trigger,
    ) -> Result<IssuedToken, TokenError> {
        flight::refresh(&self.inner, slot, trigger).await
    }
}
