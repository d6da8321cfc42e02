//! The refresh engine: in-memory snapshots for serving, single-flight
//! refreshes (in-process and across processes), durable rotation, failure
//! classes, crash recovery. Storing what the provider issued (and holding
//! it when that fails) lives in `commit`; forgetting and revoking grants
//! in `revoke`.
//!
//! Invariants:
//! - A snapshot is replaced only after the database commit that produced it,
//!   so no caller ever sees an access token whose refresh token is not
//!   durable. The one exception: a grant the provider issued whose commit
//!   failed, once the stored access token is no longer usable (logged).
//! - At most one refresh per connection runs in this process (`Slot::flight`)
//!   and across processes (the lease in `connections.lease_owner`); callers
//!   that arrive during a refresh wait for it and share its result. Another
//!   process's lease is taken over only when that process is certainly dead
//!   (`owner`) or its lease has stood still for `LEASE` (30 s) on our monotonic
//!   clock (`clock::LeaseWatch`); never by comparing wall clocks. A failed
//!   write of our own restarts that watch (the holder could not renew
//!   either), and a held grant's lease is renewed at every commit retry.
//! - A row the store could not read (`Snapshot::unreadable`) is never
//!   leased, refreshed, parked or revoked from: the store refuses to lease
//!   it (`BeginRefresh::Unreadable`), forced refreshes and upstream
//!   revocations are refused naming the problem; a local forget or a new
//!   authorization are the ways out.
//! - The refresh token is not kept in memory: it is read from the database
//!   under the lease, which is the only point where it can be current. The
//!   exception is a grant whose commit failed: it is held in the slot's
//!   pending commit (secrecy types) and retried with backoff until it lands;
//!   while it is held, no refresh of the connection calls the provider (it
//!   could not be committed either), and the flight lock orders the retries
//!   with flights and revocations.
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

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};
use tokio_util::task::TaskTracker;

mod commit;
mod revoke;

use commit::PendingCommit;

use super::clock::{Anchor, Clock, ClockHandle, LeaseWatch, SystemClock};
use super::flights::FlightThread;
use super::owner;
use super::policy::{self, Timing};
use super::recognizer::Recognizer;
use crate::config::RefreshConfig;
use crate::notify::{Event, EventKind, Notifier};
use crate::provider::{Provider, ProviderError, TokenGrant};
use crate::store::{
    BeginRefresh, ConnState, ConnectionRow, Fingerprint, LeaseSeen, NewGrant, Store, StoreError,
    TokenKind,
};

/// How long a refresh lease lasts without renewal. Long enough that a
/// renewal (every third of it) surviving one slow database write keeps it;
/// short enough that a crashed holder on another host blocks refreshes only
/// briefly.
const LEASE: Duration = Duration::from_secs(30);

/// How often a caller waiting on another process's lease looks again.
const LEASE_POLL: Duration = Duration::from_millis(50);

/// Errors a token request can end in (mapped to SPEC 4 statuses by `http`).
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("no provider named {0:?} is configured")]
    UnknownProvider(String),
    #[error("{provider}/{account} has never been authorized")]
    UnknownConnection { provider: String, account: String },
    #[error("{provider}/{account} needs a new authorization: {reason}")]
    AuthorizationRequired {
        provider: String,
        account: String,
        reason: String,
    },
    #[error("{}", refresh_failed_text(provider, account, reason, still_valid_until.as_ref()))]
    RefreshFailed {
        provider: String,
        account: String,
        reason: String,
        retry_after: Duration,
        /// The access token still served, if one is: then the message says
        /// so instead of claiming none is left.
        still_valid_until: Option<DateTime<Utc>>,
    },
    /// The provider refused or failed the revocation; nothing was forgotten.
    #[error("the provider did not revoke the grant of {provider}/{account} ({reason}); it is kept, so the revocation can be retried; to forget it here without revoking it upstream, use `tokenkeeper revoke {provider} {account} --local` (DELETE ...?local=true)")]
    RevocationFailed {
        provider: String,
        account: String,
        reason: String,
    },
    /// Another process held the connection's lease for longer than a
    /// revocation waits.
    #[error("another tokenkeeper process is refreshing {provider}/{account} and did not finish in time; nothing was revoked or forgotten; try again")]
    Busy { provider: String, account: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn refresh_failed_text(
    provider: &str,
    account: &str,
    reason: &str,
    still_valid_until: Option<&DateTime<Utc>>,
) -> String {
    match still_valid_until {
        Some(t) => format!(
            "the refresh of {provider}/{account} did not produce a new access token: {reason}; the current one stays valid until {} and is still served",
            t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        ),
        None => format!(
            "no valid access token is left for {provider}/{account} and the provider could not be reached: {reason}"
        ),
    }
}

/// Whether `forget` also revokes upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revocation {
    /// Revoke the newest refresh token at the provider (where it offers
    /// revocation); if that fails, keep the grant.
    Upstream,
    /// Forget locally only; the grant stays valid at the provider.
    LocalOnly,
}

/// What a caller gets: the access token and when it expires.
#[derive(Clone)]
pub struct IssuedToken {
    pub provider: String,
    pub account: String,
    pub access_token: SecretString,
    pub token_type: String,
    pub expires_at: DateTime<Utc>,
}

/// A token served in place by [`Engine::with_fresh_token`].
pub struct ServedToken<'a> {
    pub provider: &'a str,
    pub account: &'a str,
    pub access_token: &'a str,
    /// As the provider named it ("Bearer", "DPoP", ...).
    pub token_type: &'a str,
    pub expires_at: DateTime<Utc>,
}

/// The in-memory view of one connection, replaced after each commit.
#[derive(Clone)]
pub struct Snapshot {
    pub access_token: SecretString,
    pub token_type: String,
    pub timing: Timing,
    pub refreshed_at: Option<DateTime<Utc>>,
    pub generation: i64,
    pub state: ConnState,
    pub last_error: Option<String>,
    pub failures: u32,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub interrupted_at: Option<DateTime<Utc>>,
    pub has_refresh_token: bool,
    /// Why the stored row cannot be read, if it cannot (see
    /// `store::ConnectionRow::unreadable`): then nothing here is real and
    /// no refresh or upstream revocation acts on it.
    pub unreadable: Option<String>,
    /// Where this access token was taken in, on both clocks.
    pub anchor: Anchor,
}

impl Snapshot {
    fn from_row(r: &ConnectionRow, anchor: Anchor) -> Snapshot {
        Snapshot {
            access_token: r.access_token.clone(),
            token_type: r.token_type.clone(),
            timing: Timing {
                issued_at: r.issued_at,
                expires_at: r.expires_at,
                refresh_token_issued_at: r.refresh_token_issued_at,
            },
            refreshed_at: r.refreshed_at,
            generation: r.generation,
            state: r.state,
            last_error: r.last_error.clone(),
            failures: r.failures,
            next_attempt_at: r.next_attempt_at,
            interrupted_at: r.interrupted_at,
            has_refresh_token: r.refresh_token.is_some(),
            unreadable: r.unreadable.clone(),
            anchor,
        }
    }
}

/// A connection as reported by `/v1/connections` and `status`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ConnectionReport {
    pub provider: String,
    pub account: String,
    pub state: ConnState,
    pub expires_at: DateTime<Utc>,
    pub refreshed_at: Option<DateTime<Utc>>,
    pub next_refresh_at: Option<DateTime<Utc>>,
    pub refresh_token_issued_at: DateTime<Utc>,
    pub last_error: Option<String>,
    /// Access tokens handed out since the daemon started.
    pub served: u64,
    /// Refresh attempts since start by result, in the order of
    /// [`crate::metrics::REFRESH_RESULTS`] (for `/metrics` only).
    #[serde(skip)]
    pub refreshes: [u64; 4],
}

/// Reloadable part of the engine's configuration.
pub struct Settings {
    pub refresh: RefreshConfig,
    pub providers: HashMap<String, Provider>,
    pub notifier: Notifier,
}

struct Slot {
    id: i64,
    provider: String,
    account: String,
    /// std RwLock: held only to clone an `Arc`, never across `.await`.
    snap: RwLock<Arc<Snapshot>>,
    /// tokio Mutex: held across the provider call; waiting on it is how
    /// concurrent callers share one refresh. Owned guards, because the
    /// flight holding it runs apart from the caller that took it.
    flight: Arc<tokio::sync::Mutex<()>>,
    in_flight: AtomicBool,
    /// Finished attempts; a waiter that sees it move knows a flight ended
    /// while it queued and takes that result instead of starting another.
    attempts: AtomicU64,
    /// Woken when a flight ends, so a herd of callers waiting for it
    /// resumes at once instead of taking the flight lock one by one.
    landed: tokio::sync::Notify,
    /// Tokens handed out since start: `tokenkeeper_token_requests_total`,
    /// written into `/metrics` at scrape time. A plain atomic, not a
    /// recorder series: 10,000 of those cost megabytes of idle memory.
    served: AtomicU64,
    /// Refresh attempts by result (`tokenkeeper_refresh_total`), written at
    /// scrape time like `served`, so every series exists from the start.
    refreshes: [AtomicU64; 4],
    /// A grant the provider issued that could not be stored yet (see the
    /// module invariants). std Mutex: never held across `.await`.
    pending: std::sync::Mutex<Option<Arc<PendingCommit>>>,
    /// What we last saw of another process's lease on this connection.
    lease_watch: std::sync::Mutex<Option<LeaseWatch>>,
}

impl Slot {
    /// This connection's stable share of `refresh.jitter`, computed from
    /// the current settings so a reloaded jitter applies at once.
    fn jitter(&self, refresh: &RefreshConfig) -> Duration {
        policy::stable_jitter(&self.provider, &self.account, refresh.jitter)
    }

    fn snapshot(&self) -> Arc<Snapshot> {
        self.snap.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the snapshot. The same token keeps its anchor: it was taken
    /// in once, and re-anchoring it would forget a clock jump since.
    fn set(&self, mut s: Snapshot) -> Arc<Snapshot> {
        let mut cur = self.snap.write().unwrap_or_else(|e| e.into_inner());
        if cur.generation == s.generation && cur.timing.expires_at == s.timing.expires_at {
            s.anchor = cur.anchor;
        }
        let s = Arc::new(s);
        *cur = s.clone();
        s
    }
}

impl Slot {
    /// Our own write of the lease failed (the database is locked): the
    /// other holder cannot renew its lease either, so what we saw of it
    /// standing still says nothing about whether it lives. Watching starts
    /// over once writes work again.
    fn forget_lease_watch(&self) {
        *self.lease_watch.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// Clears `in_flight` even if the refresh future is dropped mid-way.
struct FlightGuard(Arc<Slot>);

impl Drop for FlightGuard {
    fn drop(&mut self) {
        self.0.attempts.fetch_add(1, Ordering::SeqCst);
        self.0.in_flight.store(false, Ordering::SeqCst);
        self.0.landed.notify_waiters();
    }
}

/// Why a refresh is being attempted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// The scheduler found it due.
    Scheduled,
    /// A caller would get less than `min_validity`.
    OnDemand,
    /// `POST .../refresh` or `tokenkeeper refresh`.
    Forced,
}

/// Handle on the engine; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    clock: ClockHandle,
    /// Cancelled by [`Engine::stop`]: commit retries make their last try.
    stopping: tokio_util::sync::CancellationToken,
    settings: RwLock<Arc<Settings>>,
    slots: RwLock<HashMap<(String, String), Arc<Slot>>>,
    owner: String,
    tasks: TaskTracker,
    /// Where refresh flights run (see `flights`).
    flights: FlightThread,
    recognizer: Recognizer,
    /// The provider rate limits the proxy also uses (set once by the
    /// daemon): a refresh spends the same quota as an API call.
    limits: std::sync::OnceLock<Arc<crate::ratelimit::RateLimits>>,
    /// Set once shutdown begins: no new refresh flight starts (one in the
    /// air still lands and commits).
    /// Shutdown has begun: no new flight starts (`stop_new_refreshes`).
    no_new_refreshes: AtomicBool,
    /// Another live process shares the database (see `heartbeat`). Alone,
    /// the in-memory snapshot is the truth and the hot path reads no
    /// storage; with peers, `token` checks storage first.
    peers: AtomicBool,
    /// The scheduler's wake-up and bookkeeping (see `scheduler`).
    scheduler: super::scheduler::State,
}

/// What `inspect` found a token to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenIdentity {
    /// The access token this daemon currently hands out.
    CurrentAccessToken {
        provider: String,
        account: String,
    },
    /// An access token this daemon handed out before.
    OldAccessToken {
        provider: String,
        account: String,
    },
    /// A refresh token: never to be sent as a bearer token.
    RefreshToken {
        provider: String,
        account: String,
    },
    Unknown,
}

impl Engine {
    /// Loads every stored grant and reports refreshes that a previous
    /// process started and never finished.
    pub async fn start(store: Store, settings: Settings) -> Result<Engine, StoreError> {
        Engine::start_with_clock(store, settings, SystemClock::handle()).await
    }

    /// [`Engine::start`] with the clock it reads time from (tests move a
    /// `clock::TestClock`).
    pub async fn start_with_clock(
        store: Store,
        settings: Settings,
        clock: ClockHandle,
    ) -> Result<Engine, StoreError> {
        let recognizer = Recognizer::new(store.fingerprint_key().await?);
        store
            .each_fingerprint(|id, fp| recognizer.add(id, &[fp]))
            .await?;
        let engine = Engine {
            inner: Arc::new(Inner {
                store,
                clock,
                stopping: tokio_util::sync::CancellationToken::new(),
                settings: RwLock::new(Arc::new(settings)),
                slots: RwLock::new(HashMap::new()),
                owner: owner::Identity::current().owner(rand::random()),
                tasks: TaskTracker::new(),
                flights: FlightThread::start(),
                recognizer,
                limits: std::sync::OnceLock::new(),
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
        // Only holders certainly dead are dealt with now; any other lease is
        // taken over once seen standing still (`refresh_locked`), so a live
        // holder in another PID namespace is never cut off.
        for mut row in unfinished {
            if let (Some(started), Some(holder)) = (row.attempt_started_at, row.lease_owner.clone())
            {
                if holder != engine.inner.owner && owner_is_dead(&holder) {
                    let msg = format!(
                        "a refresh started at {} was interrupted before its result was stored (the process stopped); retrying with the stored refresh token",
                        started.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                    );
                    tracing::warn!(provider = %row.provider, account = %row.account, "{msg}");
                    if let Some(updated) = engine
                        .inner
                        .store
                        .mark_interrupted(row.id, Some(&holder), &msg)
                        .await?
                    {
                        row = updated;
                    }
                }
            }
            engine.install(&row);
        }
        Ok(engine)
    }

    /// The store this engine writes to.
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// Current settings.
    pub fn settings(&self) -> Arc<Settings> {
        self.inner
            .settings
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces providers and policy (SIGHUP). Grants of removed providers
    /// stay in the database but are no longer served.
    pub fn reload(&self, settings: Settings) {
        *self
            .inner
            .settings
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Arc::new(settings);
        self.inner.scheduler.wake();
    }

    /// What the refresh scheduler shares with the engine (its wake-up).
    pub(crate) fn scheduler(&self) -> &super::scheduler::State {
        &self.inner.scheduler
    }

    /// Makes refresh calls take a slot of their provider's rate limits
    /// (first call wins; later calls are ignored).
    pub fn use_rate_limits(&self, limits: Arc<crate::ratelimit::RateLimits>) {
        let _ = self.inner.limits.set(limits);
    }

    /// Waits for a rate-limit slot, at most the provider's request timeout;
    /// without one the refresh goes anyway, since losing the grant to a
    /// missed refresh costs more than one request over the limit.
    async fn rate_slot(&self, provider: &Provider, account: &str) {
        let Some(limits) = self.inner.limits.get() else {
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

    fn fingerprints(&self, grant: &TokenGrant) -> Vec<Fingerprint> {
        let r = &self.inner.recognizer;
        let mut fps = vec![r.fingerprint(TokenKind::Access, grant.access_token.expose_secret())];
        if let Some(t) = &grant.refresh_token {
            fps.push(r.fingerprint(TokenKind::Refresh, t.expose_secret()));
        }
        fps
    }

    /// Stores the grant of a completed browser authorization and serves it.
    pub async fn authorized(
        &self,
        provider: &str,
        account: &str,
        grant: &TokenGrant,
    ) -> Result<(), StoreError> {
        let new = NewGrant {
            access_token: &grant.access_token,
            refresh_token: grant.refresh_token.as_ref(),
            token_type: &grant.token_type,
            scope: grant.scope.as_deref(),
            issued_at: grant.issued_at,
            expires_at: grant.expires_at,
        };
        let fps = self.fingerprints(grant);
        let (row, replaced) = self
            .inner
            .store
            .save_authorized(provider, account, &new, &fps)
            .await?;
        self.inner.recognizer.add(row.id, &fps);
        self.install(&row);
        self.settings().notifier.emit(Event {
            event: EventKind::Authorized,
            provider: provider.to_string(),
            account: account.to_string(),
            message: "authorized in the browser; the grant is stored".into(),
        });
        // The grant this authorization replaced (an earlier one, or a second
        // browser flow for the same account) would otherwise stay valid at
        // the provider with nobody holding it. Only when the new grant
        // brings its own refresh token: without one, the old token may be
        // the only refresh token of this very grant.
        if let (Some(old), Some(new)) = (replaced, grant.refresh_token.as_ref()) {
            if new.expose_secret() != old.expose_secret() {
                self.revoke_in_background(
                    provider,
                    account,
                    old,
                    "the grant replaced by a newer authorization",
                );
            }
        }
        Ok(())
    }

    fn clock(&self) -> &dyn Clock {
        &*self.inner.clock
    }

    /// A snapshot of `row`, taken in now.
    fn snap_of(&self, row: &ConnectionRow) -> Snapshot {
        Snapshot::from_row(row, Anchor::at(self.clock()))
    }

    /// Stops background work at shutdown: grants held in memory get one
    /// last attempt to be stored (their retry loops end after it).
    pub fn stop(&self) {
        self.inner.stopping.cancel();
    }

    /// Whether a bearer credential is one of our refresh tokens, current or
    /// rotated out (SPEC 5). If so, the misuse is reported here, once: a
    /// security log line, `tokenkeeper_bearer_misuse_total` and the
    /// `bearer_misuse` notification naming the grant, never the token.
    pub fn refuse_refresh_token_as_bearer(&self, token: &str) -> bool {
        let Some((TokenKind::Refresh, id)) = self.inner.recognizer.lookup(token) else {
            return false;
        };
        metrics::counter!(crate::metrics::BEARER_MISUSE_TOTAL).increment(1);
        tracing::warn!(
            target: "tokenkeeper::security",
            event = "bearer_misuse",
            "a refresh token was presented as a bearer token and refused"
        );
        let (provider, account) = self
            .all_slots()
            .into_iter()
            .find(|s| s.id == id)
            .map(|s| (s.provider.clone(), s.account.clone()))
            .unwrap_or_default();
        self.settings().notifier.emit(Event {
            event: EventKind::BearerMisuse,
            provider,
            account,
            message: "a refresh token was presented as a bearer token and refused; the program sending it should use GET /v1/token instead".into(),
        });
        true
    }

    fn notify(&self, slot: &Slot, event: EventKind, message: String) {
        self.settings().notifier.emit(Event {
            event,
            provider: slot.provider.clone(),
            account: slot.account.clone(),
            message,
        });
    }

    /// Says what a token is (for `tokenkeeper inspect`).
    pub fn inspect(&self, token: &str) -> TokenIdentity {
        let Some((kind, id)) = self.inner.recognizer.lookup(token) else {
            return TokenIdentity::Unknown;
        };
        let Some(slot) = self.all_slots().into_iter().find(|s| s.id == id) else {
            return TokenIdentity::Unknown;
        };
        let (provider, account) = (slot.provider.clone(), slot.account.clone());
        match kind {
            TokenKind::Refresh => TokenIdentity::RefreshToken { provider, account },
            TokenKind::Access
                if self
                    .inner
                    .recognizer
                    .same(token, slot.snapshot().access_token.expose_secret()) =>
            {
                TokenIdentity::CurrentAccessToken { provider, account }
            }
            TokenKind::Access => TokenIdentity::OldAccessToken { provider, account },
        }
    }

    /// Makes a freshly stored row (e.g. a new authorization) visible.
    pub fn install(&self, row: &ConnectionRow) {
        let key = (row.provider.clone(), row.account.clone());
        let mut slots = self.inner.slots.write().unwrap_or_else(|e| e.into_inner());
        match slots.get(&key) {
            Some(slot) if slot.id == row.id => {
                slot.set(self.snap_of(row));
            }
            _ => {
                slots.insert(
                    key,
                    Arc::new(Slot {
                        id: row.id,
                        provider: row.provider.clone(),
                        account: row.account.clone(),
                        snap: RwLock::new(Arc::new(self.snap_of(row))),
                        flight: Arc::new(tokio::sync::Mutex::new(())),
                        in_flight: AtomicBool::new(false),
                        attempts: AtomicU64::new(0),
                        landed: tokio::sync::Notify::new(),
                        served: AtomicU64::new(0),
                        refreshes: Default::default(),
                        pending: std::sync::Mutex::new(None),
                        lease_watch: std::sync::Mutex::new(None),
                    }),
                );
            }
        }
        self.inner.scheduler.wake();
    }

    fn slot(&self, provider: &str, account: &str) -> Result<Arc<Slot>, TokenError> {
        if !self.settings().providers.contains_key(provider) {
            return Err(TokenError::UnknownProvider(provider.to_string()));
        }
        self.inner
            .slots
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(provider.to_string(), account.to_string()))
            .cloned()
            .ok_or_else(|| TokenError::UnknownConnection {
                provider: provider.to_string(),
                account: account.to_string(),
            })
    }

    fn all_slots(&self) -> Vec<Arc<Slot>> {
        let mut v: Vec<_> = self
            .inner
            .slots
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| (&a.provider, &a.account).cmp(&(&b.provider, &b.account)));
        v
    }

    /// The hot path's synchronous half: when this process is
    /// alone on its database, no refresh of the connection is in flight and
    /// its snapshot is fresh enough, `f` sees the token in place and its
    /// result is returned: no storage read, no allocation, no `Arc` clone,
    /// only shared read locks. `None` means "take [`Engine::token`]", which
    /// decides every other case exactly as before (unknown names, peers,
    /// refreshes, failures); when `Some`, `token` would have returned the
    /// same token, and the served counter moves the same way.
    pub fn with_fresh_token<R>(
        &self,
        provider: &str,
        account: &str,
        now: DateTime<Utc>,
        f: impl FnOnce(ServedToken<'_>) -> R,
    ) -> Option<R> {
        if self.inner.peers.load(Ordering::Relaxed) {
            return None;
        }
        // Copied out so no two locks of different kinds are ever nested here
        // (`install` takes slots, then settings).
        let refresh = {
            let settings = self
                .inner
                .settings
                .read()
                .unwrap_or_else(|e| e.into_inner());
            if !settings.providers.contains_key(provider) {
                return None;
            }
            settings.refresh.clone()
        };
        let slots = self.inner.slots.read().unwrap_or_else(|e| e.into_inner());
        // The map is keyed by owned strings; a per-thread key buffer keeps
        // the lookup free of allocations.
        thread_local! {
            static KEY: std::cell::RefCell<(String, String)> =
                const { std::cell::RefCell::new((String::new(), String::new())) };
        }
        let slot = KEY.with(|k| {
            let mut k = k.borrow_mut();
            k.0.clear();
            k.0.push_str(provider);
            k.1.clear();
            k.1.push_str(account);
            slots.get(&*k).map(|s| &**s)
        })?;
        if slot.in_flight.load(Ordering::SeqCst) {
            return None;
        }
        let snap = slot.snap.read().unwrap_or_else(|e| e.into_inner());
        let now = now.max(snap.anchor.now(self.clock()));
        if !policy::fresh_enough(&snap.timing, now, &refresh) {
            return None;
        }
        slot.served.fetch_add(1, Ordering::Relaxed);
        Some(f(ServedToken {
            provider: &slot.provider,
            account: &slot.account,
            access_token: snap.access_token.expose_secret(),
            token_type: &snap.token_type,
            expires_at: snap.timing.expires_at,
        }))
    }

    /// The hot path: a token with at least `min_validity` left, refreshing
    /// first when needed, waiting for an in-flight refresh rather than
    /// handing out a token that refresh may be about to kill.
    pub async fn token(&self, provider: &str, account: &str) -> Result<IssuedToken, TokenError> {
        let slot = self.slot(provider, account)?;
        // With two daemons on one database, the snapshot alone
        // would only learn of another process's refresh at our next tick,
        // and until then hand out the access token that refresh killed.
        let foreign_flight = if self.inner.peers.load(Ordering::Relaxed) {
            self.sync_with_store(&slot).await?
        } else {
            false
        };
        let mut snap = slot.snapshot();
        let settings = self.settings();
        if slot.pending().is_some() {
            snap = self.serve_pending_if_stored_dead(&slot, &settings.refresh);
        }
        let now = snap.anchor.now(self.clock());
        let waiting = foreign_flight || slot.in_flight.load(Ordering::SeqCst);
        if !waiting && policy::fresh_enough(&snap.timing, now, &settings.refresh) {
            return Ok(issued(&slot, &snap));
        }
        let parked = snap.state == ConnState::AuthorizationRequired
            || snap.next_attempt_at.is_some_and(|t| t > now);
        if parked && !waiting {
            return answer(&slot, &snap, self.clock());
        }
        // Another process's refresh: `begin_refresh` finds its lease busy
        // and `wait_for_other_process` adopts what it stores.
        self.refresh_slot(&slot, Trigger::OnDemand).await
    }

    /// Brings the slot up to date with what other processes sharing the
    /// database wrote (a newer grant, a new state), and tells whether one of
    /// them holds a live lease, i.e. is refreshing this connection now: its
    /// provider may already have revoked the token in our snapshot (SPEC 7).
    /// Skipped while this process refreshes the slot itself.
    async fn sync_with_store(&self, slot: &Arc<Slot>) -> Result<bool, TokenError> {
        // A grant held in memory is newer than anything stored.
        if slot.in_flight.load(Ordering::SeqCst) || slot.pending().is_some() {
            return Ok(false);
        }
        let attempts = slot.attempts.load(Ordering::SeqCst);
        let Some(row) = self.inner.store.load_connection(slot.id).await? else {
            return Err(TokenError::UnknownConnection {
                provider: slot.provider.clone(),
                account: slot.account.clone(),
            });
        };
        // Any attempt of another holder counts as in flight (a stalled one
        // is taken over by `refresh_locked` once seen standing still): the
        // wall clock cannot tell a live lease from a lapsed one.
        let foreign = match row.lease_owner.as_deref() {
            Some(holder) if row.attempt_id.is_some() && holder != self.inner.owner => self
                .holder_gone(slot, holder, row.attempt_id.as_deref(), row.lease_until)
                .is_none(),
            _ => false,
        };
        if foreign {
            return Ok(true);
        }
        // A flight of ours that started or ended since the read has newer
        // information than the row; never install an older generation.
        if slot.in_flight.load(Ordering::SeqCst) || slot.attempts.load(Ordering::SeqCst) != attempts
        {
            return Ok(false);
        }
        let snap = slot.snapshot();
        if row.generation > snap.generation {
            self.learn_fingerprints(row.id).await?;
            self.install(&row);
        } else if row.generation == snap.generation && row.state != snap.state {
            self.install(&row);
        }
        Ok(false)
    }

    /// Whether `provider/account` is a known connection, from memory only
    /// (no storage read, no refresh): lets the proxy refuse unknown names
    /// before it spends a rate-limit slot or quota on them.
    pub fn check_known(&self, provider: &str, account: &str) -> Result<(), TokenError> {
        self.slot(provider, account).map(|_| ())
    }

    /// Whether another process's lease may be taken over: its holder is
    /// certainly dead, or its lease has not moved for [`LEASE`] as measured
    /// on our monotonic clock (each call is an observation). Returns what was
    /// seen, for the compare-and-swap takeover in `begin_refresh`.
    fn holder_gone(
        &self,
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
            self.clock().monotonic(),
            LEASE,
        );
        lapsed.then_some(seen)
    }

    /// Mirrors the stored fingerprints of a connection another process
    /// wrote (SPEC 5: its rotated refresh tokens are ours to recognise too).
    async fn learn_fingerprints(&self, id: i64) -> Result<(), StoreError> {
        let fps = self.inner.store.fingerprints_of(id).await?;
        self.inner.recognizer.replace(id, &fps);
        Ok(())
    }

    /// Refreshes now, whatever the schedule says (SPEC: `POST .../refresh`).
    pub async fn force_refresh(
        &self,
        provider: &str,
        account: &str,
    ) -> Result<IssuedToken, TokenError> {
        let slot = self.slot(provider, account)?;
        self.refresh_slot(&slot, Trigger::Forced).await
    }

    /// Every known connection of a configured provider, for reports.
    pub fn report(&self) -> Vec<ConnectionReport> {
        let settings = self.settings();
        self.all_slots()
            .into_iter()
            .filter(|s| settings.providers.contains_key(&s.provider))
            .map(|slot| {
                let snap = slot.snapshot();
                let next = match snap.state {
                    ConnState::AuthorizationRequired => None,
                    ConnState::Retrying => snap.next_attempt_at.or(Some(self.clock().now())),
                    _ => Some(policy::next_refresh_at(
                        &snap.timing,
                        &settings.refresh,
                        slot.jitter(&settings.refresh),
                    )),
                };
                let state = if slot.in_flight.load(Ordering::SeqCst) {
                    ConnState::Refreshing
                } else {
                    snap.state
                };
                ConnectionReport {
                    provider: slot.provider.clone(),
                    account: slot.account.clone(),
                    state,
                    expires_at: snap.timing.expires_at,
                    refreshed_at: snap.refreshed_at,
                    next_refresh_at: next,
                    refresh_token_issued_at: snap.timing.refresh_token_issued_at,
                    last_error: snap.last_error.clone(),
                    served: slot.served.load(Ordering::Relaxed),
                    refreshes: std::array::from_fn(|i| slot.refreshes[i].load(Ordering::Relaxed)),
                }
            })
            .collect()
    }

    /// One scheduler pass: notice other processes' writes, then start every
    /// due refresh, and say when the next connection falls due. Decisions
    /// compare stored absolute instants with each token's own idea of now
    /// (`clock::Anchor`): the wall clock, or its receipt plus monotonic time
    /// since if that is later, so time spent suspended is caught up here
    /// and a clock set back delays nothing. The stored rows are read again
    /// (`reconcile`) only when another connection wrote since the last pass,
    /// at most once per `check_interval`; an idle pass reads no table.
    pub async fn tick(&self) -> Result<super::scheduler::Pass, StoreError> {
        let sched = &self.inner.scheduler;
        let every = self.settings().refresh.check_interval;
        let mono = self.clock().monotonic();
        if sched.heartbeat_due(mono) {
            self.heartbeat().await?;
            sched.heartbeat_done(mono);
        }
        if sched.reconcile_due(self.inner.store.changed().await?, mono, every) {
            self.reconcile().await?;
            sched.reconciled(mono);
        }
        let settings = self.settings();
        let mut pass = super::scheduler::Pass {
            reconcile_in: sched.reconcile_in(mono, every),
            ..Default::default()
        };
        let mut earliest: Option<Duration> = None;
        let mut due: Vec<(DateTime<Utc>, Arc<Slot>)> = Vec::new();
        // Unsorted (`due` is sorted below): an idle pass over 10,000
        // connections should not pay for ordering them by name.
        let slots: Vec<Arc<Slot>> = self
            .inner
            .slots
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        for slot in slots {
            if !settings.providers.contains_key(&slot.provider) {
                continue;
            }
            // A slot holding an uncommitted grant is looked after by its
            // commit retry loop, not refreshed; one in flight is looked at
            // again once it lands (`scheduler::PACE`).
            if slot.in_flight.load(Ordering::SeqCst) || slot.pending().is_some() {
                pass.in_flight = true;
                continue;
            }
            let snap = slot.snapshot();
            if snap.state == ConnState::AuthorizationRequired {
                continue;
            }
            let now = snap.anchor.now(self.clock());
            // A retrying connection is due at its next attempt; any other at
            // its planned refresh, but not before a pending next attempt.
            let due_at = if snap.state == ConnState::Retrying {
                snap.next_attempt_at.unwrap_or(now)
            } else {
                let planned = policy::next_refresh_at(
                    &snap.timing,
                    &settings.refresh,
                    slot.jitter(&settings.refresh),
                );
                snap.next_attempt_at.map_or(planned, |t| t.max(planned))
            };
            if due_at <= now {
                due.push((snap.timing.expires_at, slot));
            } else {
                let left = (due_at - now).to_std().unwrap_or_default();
                earliest = Some(earliest.map_or(left, |e| e.min(left)));
            }
        }
        // Most urgent first; and no more per pass than the provider's
        // per-second limit: while any are held back the scheduler looks
        // again one second later (`scheduler::PACE`), so a wave of due
        // connections (10,000 restored from a backup) goes at the provider's
        // limit instead of bursting past it.
        due.sort_by_key(|(expires_at, _)| *expires_at);
        let mut started: HashMap<String, usize> = HashMap::new();
        for (_, slot) in due {
            let cap = settings
                .providers
                .get(&slot.provider)
                .map_or(usize::MAX, |p| {
                    // A second's worth: the time until the next pass.
                    p.config
                        .limits
                        .per_second
                        .map_or(usize::MAX, |r| (r as usize).max(1))
                });
            let n = started.entry(slot.provider.clone()).or_default();
            if *n >= cap {
                pass.deferred = true;
                earliest = Some(Duration::ZERO);
                continue;
            }
            *n += 1;
            pass.started += 1;
            let engine = self.clone();
            self.inner.tasks.spawn(async move {
                if let Err(e) = engine.refresh_slot(&slot, Trigger::Scheduled).await {
                    tracing::debug!(provider = %slot.provider, account = %slot.account, error = %e, "scheduled refresh did not produce a token");
                }
            });
        }
        pass.next_due_in = earliest;
        if pass.started > 0 {
            pass.in_flight = true;
        }
        Ok(pass)
    }

    /// Announces this process and learns whether others share the database.
    /// A peer is alive if seen within three scheduler intervals (at least
    /// 10 s), so one slow tick does not flip the answer.
    async fn heartbeat(&self) -> Result<(), StoreError> {
        let now = self.clock().now();
        let every = self
            .settings()
            .refresh
            .check_interval
            .max(Duration::from_secs(1));
        let horizon = (every * 3).max(Duration::from_secs(10));
        let others = self
            .inner
            .store
            .heartbeat(&self.inner.owner, now, now - chrono_dur(horizon))
            .await?;
        let had = self.inner.peers.swap(others > 0, Ordering::Relaxed);
        if had != (others > 0) {
            tracing::info!(
                other_processes = others,
                "{}",
                if others > 0 {
                    "another tokenkeeper process shares this database; token requests now check storage first"
                } else {
                    "this process is alone on its database again"
                }
            );
        }
        Ok(())
    }

    /// Removes this process's heartbeat (clean stop).
    pub async fn leave(&self) {
        if let Err(e) = self.inner.store.leave(&self.inner.owner).await {
            tracing::warn!(error = %e, "cannot remove this process's heartbeat");
        }
    }

    /// Picks up grants written by other processes (another daemon on the
    /// same file, a re-authorization) and drops forgotten ones.
    async fn reconcile(&self) -> Result<(), StoreError> {
        let versions = self.inner.store.versions().await?;
        let known: HashMap<i64, Arc<Slot>> =
            self.all_slots().into_iter().map(|s| (s.id, s)).collect();
        for (id, generation, state) in &versions {
            // (stale, new grant): a new grant brings new fingerprints.
            let (stale, regrant) = match known.get(id) {
                None => (true, true),
                Some(slot) => {
                    let snap = slot.snapshot();
                    let quiet = !slot.in_flight.load(Ordering::SeqCst) && slot.pending().is_none();
                    let regrant = snap.generation != *generation;
                    (
                        quiet && (regrant || snap.state.as_str() != state),
                        quiet && regrant,
                    )
                }
            };
            if stale {
                if let Some(row) = self.inner.store.load_connection(*id).await? {
                    if regrant {
                        self.learn_fingerprints(*id).await?;
                    }
                    self.install(&row);
                }
            }
        }
        let live: std::collections::HashSet<i64> = versions.iter().map(|v| v.0).collect();
        let mut gone = Vec::new();
        self.inner
            .slots
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, s| {
                let keep = live.contains(&s.id);
                if !keep {
                    gone.push(s.id);
                }
                keep
            });
        for id in gone {
            self.inner.recognizer.forget(id);
        }
        Ok(())
    }

    /// Single-flight entry: concurrent callers queue on the slot's flight
    /// lock; the first runs the refresh, the rest take its result.
    async fn refresh_slot(
        &self,
        slot: &Arc<Slot>,
        trigger: Trigger,
    ) -> Result<IssuedToken, TokenError> {
        // Read before `seen`: a flight that ends in between then counts as
        // ours to run, never as a joined one that did not rotate.
        let joined_from = slot.snapshot().generation;
        let seen = slot.attempts.load(Ordering::SeqCst);
        if trigger != Trigger::Forced && slot.in_flight.load(Ordering::SeqCst) {
            // Join the flight in the air: wait for it to land and share its
            // result. Registering before re-checking means a landing in
            // between cannot be missed.
            let landed = slot.landed.notified();
            tokio::pin!(landed);
            landed.as_mut().enable();
            if slot.attempts.load(Ordering::SeqCst) == seen && slot.in_flight.load(Ordering::SeqCst)
            {
                landed.await;
            }
            if slot.attempts.load(Ordering::SeqCst) != seen {
                return answer(slot, &slot.snapshot(), self.clock());
            }
        }
        let flight = slot.flight.clone().lock_owned().await;
        if slot.attempts.load(Ordering::SeqCst) != seen {
            let snap = slot.snapshot();
            // A forced refresh that joined a flight which
            // failed must report the failure, like one that ran it (below),
            // not answer 200 with the token it was asked to replace. A
            // joined flight that had nothing to do does not count: run ours.
            let rotated = snap.generation != joined_from;
            let failed = snap.state != ConnState::Active || snap.last_error.is_some();
            if trigger != Trigger::Forced || rotated {
                return answer(slot, &snap, self.clock());
            }
            if failed {
                return Err(failure(slot, &snap, self.clock()));
            }
        }
        // Checked under the flight lock: a caller queued on a flight that
        // landed has taken its result above; nobody starts a new one.
        if self.inner.no_new_refreshes.load(Ordering::SeqCst) {
            let snap = slot.snapshot();
            let valid = snap.timing.expires_at > snap.anchor.now(self.clock());
            if valid && trigger != Trigger::Forced {
                return answer(slot, &snap, self.clock());
            }
            return Err(TokenError::RefreshFailed {
                provider: slot.provider.clone(),
                account: slot.account.clone(),
                reason: "tokenkeeper is stopping and starts no new refresh; retry once it is back"
                    .into(),
                retry_after: Duration::from_secs(5),
                still_valid_until: valid.then_some(snap.timing.expires_at),
            });
        }
        slot.in_flight.store(true, Ordering::SeqCst);
        // From here the flight owns the lock and the guard: it finishes on
        // the flight thread even if this caller goes away.
        let guard = FlightGuard(slot.clone());
        let engine = self.clone();
        let flying = slot.clone();
        let landed = self
            .inner
            .flights
            .spawn(self.inner.tasks.track_future(async move {
                let _flight = flight;
                let _guard = guard;
                let before = flying.snapshot().generation;
                let snap = engine.refresh_locked(&flying, trigger).await?;
                // A held grant's token being served is a new token too.
                let held = flying.pending().is_some_and(|p| {
                    p.grant.access_token.expose_secret() == snap.access_token.expose_secret()
                });
                if trigger == Trigger::Forced && snap.generation == before && !held {
                    // Whoever forces a refresh wants to know it did not
                    // happen, even though the old token would still be
                    // served to ordinary callers.
                    return Err(failure(&flying, &snap, engine.clock()));
                }
                answer(&flying, &snap, engine.clock())
            }));
        match landed.await {
            Ok(result) => result,
            Err(e) => {
                tracing::error!(provider = %slot.provider, account = %slot.account, "the refresh task failed: {e}");
                let snap = slot.snapshot();
                let now = snap.anchor.now(self.clock());
                Err(TokenError::RefreshFailed {
                    provider: slot.provider.clone(),
                    account: slot.account.clone(),
                    reason: "internal error: the refresh task stopped".into(),
                    retry_after: Duration::from_secs(1),
                    still_valid_until: (snap.timing.expires_at > now)
                        .then_some(snap.timing.expires_at),
                })
            }
        }
    }

    /// Runs one refresh with the flight lock held.
    async fn refresh_locked(
        &self,
        slot: &Arc<Slot>,
        trigger: Trigger,
    ) -> Result<Arc<Snapshot>, TokenError> {
        let settings = self.settings();
        let provider = settings
            .providers
            .get(&slot.provider)
            .ok_or_else(|| TokenError::UnknownProvider(slot.provider.clone()))?;
        let store = &self.inner.store;
        let owner = &self.inner.owner;

        // 0. A grant held in memory comes first: store it, and that is this
        // flight's result. While it cannot be stored, no refresh calls the
        // provider (its result could not be stored either, SPEC 9), and
        // the stored refresh token is the rotated-out one anyway.
        if slot.pending().is_some() {
            return match self.land_pending(slot).await {
                Ok(()) => Ok(slot.snapshot()),
                Err(e) => {
                    tracing::error!(provider = %slot.provider, account = %slot.account, error = %e, "the grant held in memory still cannot be stored; no refresh until it is");
                    Ok(self.serve_pending_if_stored_dead(slot, &settings.refresh))
                }
            };
        }

        let attempt = format!("{:016x}", rand::random::<u64>());

        // 1. Take the lease; this also commits "refresh started".
        let mut takeover: Option<LeaseSeen> = None;
        let mut takeovers = 0;
        let row = loop {
            let now = self.clock().now();
            match store
                .begin_refresh(
                    slot.id,
                    owner,
                    &attempt,
                    now,
                    now + chrono_dur(LEASE),
                    takeover.as_ref(),
                )
                .await
                .inspect_err(|_| slot.forget_lease_watch())?
            {
                BeginRefresh::Started(row) => {
                    *slot.lease_watch.lock().unwrap_or_else(|e| e.into_inner()) = None;
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
                    }
                    break *row;
                }
                BeginRefresh::Gone => {
                    return Err(TokenError::UnknownConnection {
                        provider: slot.provider.clone(),
                        account: slot.account.clone(),
                    })
                }
                // Nothing was written; whatever the stand-in says is not
                // the grant, so nothing is refreshed (or parked) on it.
                BeginRefresh::Unreadable(row) => {
                    slot.set(self.snap_of(&row));
                    return Err(unreadable_error(slot, &row, "it was not refreshed"));
                }
                BeginRefresh::Busy {
                    owner: holder,
                    attempt: theirs,
                    until,
                } => {
                    if takeovers < 2 {
                        takeover = self.holder_gone(slot, &holder, theirs.as_deref(), Some(until));
                        if takeover.is_some() {
                            takeovers += 1;
                            continue;
                        }
                    }
                    // Someone else refreshes this grant: we are not alone.
                    self.inner.peers.store(true, Ordering::Relaxed);
                    match self.wait_for_other_process(slot, provider).await? {
                        Waited::Settled(snap) => return Ok(snap),
                        Waited::Lapsed(seen) if takeovers < 2 => {
                            takeover = Some(seen);
                            takeovers += 1;
                        }
                        Waited::Lapsed(_) => return Ok(slot.snapshot()),
                    }
                }
            }
        };

        // 2. The re-read grant may be newer than our snapshot: another
        // process rotated it. If it no longer needs refreshing, we are done.
        let fresh = self.snap_of(&row);
        let now = slot.set(fresh.clone()).anchor.now(self.clock());
        let needed = match trigger {
            Trigger::Forced => true,
            Trigger::OnDemand => !policy::fresh_enough(&fresh.timing, now, &settings.refresh),
            Trigger::Scheduled => {
                row.interrupted_at.is_some()
                    || row.last_error.is_some()
                    || policy::next_refresh_at(
                        &fresh.timing,
                        &settings.refresh,
                        slot.jitter(&settings.refresh),
                    ) <= now
            }
        };
        if row.state == ConnState::AuthorizationRequired || !needed {
            let state = if row.state == ConnState::AuthorizationRequired {
                ConnState::AuthorizationRequired
            } else {
                ConnState::Active
            };
            let row = store
                .finish_attempt(
                    slot.id,
                    owner,
                    &attempt,
                    state,
                    row.last_error.as_deref(),
                    row.failures,
                    row.next_attempt_at,
                )
                .await?
                .unwrap_or(row);
            return Ok(slot.set(self.snap_of(&row)));
        }
        let Some(mut refresh_token) = row.refresh_token.clone() else {
            let reason = "the provider never issued a refresh token for this grant; authorize again (ask for offline access if the provider needs it)";
            return self
                .reject(slot, (&attempt, row.generation), &row, reason.to_string())
                .await;
        };

        // 3. Call the provider, renewing the lease while we wait; retry once
        // with a newer stored token if the provider rejects ours.
        let mut retried = false;
        let mut base_generation = row.generation;
        loop {
            let started = std::time::Instant::now();
            let result = {
                let renew = self.renew_lease_while(slot.id, attempt.clone());
                let call = async {
                    self.rate_slot(provider, &slot.account).await;
                    provider.refresh(&refresh_token).await
                };
                tokio::pin!(call);
                tokio::select! {
                    r = &mut call => r,
                    () = renew => call.await,
                }
            };
            let elapsed = started.elapsed();
            match result {
                Ok(grant) => {
                    return self
                        .commit(
                            slot,
                            &attempt,
                            base_generation,
                            refresh_token,
                            grant,
                            elapsed,
                        )
                        .await
                }
                Err(ProviderError::Transient {
                    message,
                    retry_after,
                }) => {
                    return self
                        .transient(slot, &attempt, &row, message, retry_after)
                        .await;
                }
                Err(e @ (ProviderError::Refused { .. } | ProviderError::Unusable { .. })) => {
                    return self
                        .provider_refused_or_unusable(
                            slot,
                            (&attempt, base_generation, refresh_token),
                            &row,
                            e,
                            elapsed,
                        )
                        .await;
                }
                Err(ProviderError::Rejected { message }) => {
                    let current = store.load_connection(slot.id).await?;
                    let newer = current.as_ref().filter(|c| {
                        c.refresh_token
                            .as_ref()
                            .is_some_and(|t| t.expose_secret() != refresh_token.expose_secret())
                    });
                    match newer {
                        Some(c) if !retried => {
                            tracing::info!(provider = %slot.provider, account = %slot.account, "refresh token rejected, but storage holds a newer one (another process rotated it); retrying once with it");
                            if let Some(t) = c.refresh_token.clone() {
                                refresh_token = t;
                            }
                            base_generation = c.generation;
                            retried = true;
                        }
                        _ => {
                            let reason = match row.interrupted_at {
                                Some(t) => format!(
                                    "{message}; a refresh started at {} was interrupted before its result was stored, and the provider had most likely already rotated the refresh token: authorize again",
                                    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                                ),
                                None => format!("{message}; authorize again"),
                            };
                            return self
                                .reject(slot, (&attempt, base_generation), &row, reason)
                                .await;
                        }
                    }
                }
            }
        }
    }

    /// Renews the lease every third of its length; never returns on its own
    /// unless the lease is lost.
    async fn renew_lease_while(&self, id: i64, attempt: String) {
        loop {
            tokio::time::sleep(LEASE / 3).await;
            let until = self.clock().now() + chrono_dur(LEASE);
            match self
                .inner
                .store
                .renew_lease(id, &self.inner.owner, &attempt, until)
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

    async fn transient(
        &self,
        slot: &Slot,
        attempt: &str,
        row: &ConnectionRow,
        message: String,
        retry_after: Option<Duration>,
    ) -> Result<Arc<Snapshot>, TokenError> {
        let settings = self.settings();
        let failures = row.failures.saturating_add(1);
        let delay = policy::retry_delay(
            failures,
            retry_after,
            &settings.refresh,
            rand::random::<f64>(),
        );
        let next = slot.snapshot().anchor.now(self.clock()) + chrono_dur(delay);
        tracing::warn!(
            provider = %slot.provider,
            account = %slot.account,
            failures,
            retry_in_secs = delay.as_secs(),
            "refresh failed, will retry: {message}"
        );
        count_refresh(slot, "transient", None);
        if failures == 1 {
            self.notify(
                slot,
                EventKind::RefreshFailing,
                format!("refresh failed, retrying: {message}"),
            );
        }
        let row = self
            .inner
            .store
            .finish_attempt(
                slot.id,
                &self.inner.owner,
                attempt,
                ConnState::Retrying,
                Some(&message),
                failures,
                Some(next),
            )
            .await?;
        Ok(match row {
            Some(r) => slot.set(self.snap_of(&r)),
            None => slot.snapshot(),
        })
    }

    /// Parks the grant as `authorization_required`, unless a newer grant
    /// was stored since `generation` was read (a previous holder of the
    /// lease landed the grant it held, or a new authorization): that one is
    /// adopted instead.
    async fn reject(
        &self,
        slot: &Slot,
        (attempt, generation): (&str, i64),
        row: &ConnectionRow,
        reason: String,
    ) -> Result<Arc<Snapshot>, TokenError> {
        let rejected = self
            .inner
            .store
            .reject_attempt(
                slot.id,
                (&self.inner.owner, attempt),
                generation,
                &reason,
                row.failures,
            )
            .await?;
        let Some(r) = rejected else {
            tracing::info!(provider = %slot.provider, account = %slot.account, "the refresh token was rejected, but a newer grant was stored meanwhile; keeping it");
            return Ok(match self.inner.store.load_connection(slot.id).await? {
                Some(r) => slot.set(self.snap_of(&r)),
                None => slot.snapshot(),
            });
        };
        tracing::error!(provider = %slot.provider, account = %slot.account, "grant needs a new authorization: {reason}");
        count_refresh(slot, "rejected", None);
        self.notify(slot, EventKind::AuthorizationRequired, reason.clone());
        Ok(slot.set(self.snap_of(&r)))
    }

    /// Another process holds the lease: wait (bounded by the provider
    /// timeout) until it lets go, then adopt whatever it stored; or, if its
    /// lease stands still for [`LEASE`] on our monotonic clock meanwhile,
    /// say so, for the caller to take it over.
    async fn wait_for_other_process(
        &self,
        slot: &Slot,
        provider: &Provider,
    ) -> Result<Waited, TokenError> {
        let deadline = tokio::time::Instant::now() + provider.config.request_timeout + LEASE_POLL;
        loop {
            tokio::time::sleep(LEASE_POLL).await;
            let Some(row) = self.inner.store.load_connection(slot.id).await? else {
                return Err(TokenError::UnknownConnection {
                    provider: slot.provider.clone(),
                    account: slot.account.clone(),
                });
            };
            if let Some(holder) = row.lease_owner.as_deref() {
                if holder != self.inner.owner {
                    if let Some(seen) =
                        self.holder_gone(slot, holder, row.attempt_id.as_deref(), row.lease_until)
                    {
                        return Ok(Waited::Lapsed(seen));
                    }
                }
            }
            if row.lease_owner.is_none() || tokio::time::Instant::now() >= deadline {
                return Ok(Waited::Settled(slot.set(self.snap_of(&row))));
            }
        }
    }

    /// A refresh the provider answered with a configuration refusal or an
    /// unusable answer (see [`ProviderError`]); neither ends the grant.
    ///
    /// - `Refused`: the connection is `retrying` with the provider's reason
    ///   and what to fix as `last_error`, the operator is told once per new
    ///   reason, and the next attempt waits [`REFUSED_RETRY_MAX`] at most:
    ///   backing off gently would only hammer a provider that keeps saying
    ///   the same thing until someone changes the config. A reload
    ///   ([`Engine::retry_failing_now`]) or a forced refresh tries at once.
    /// - `Unusable`: the answer's refresh token is stored first, with the
    ///   access token we already have (the provider has most likely rotated,
    ///   so the token we sent is spent), then the failure is recorded like a
    ///   transient one under a new lease, so the next attempt backs off and
    ///   uses the stored token. The caller gets the failure, not the old
    ///   token: the provider may have invalidated it when it rotated.
    async fn provider_refused_or_unusable(
        &self,
        slot: &Arc<Slot>,
        (attempt, base_generation, used): (&str, i64, SecretString),
        row: &ConnectionRow,
        error: ProviderError,
        elapsed: Duration,
    ) -> Result<Arc<Snapshot>, TokenError> {
        let (message, refresh_token) = match error {
            ProviderError::Unusable {
                message,
                refresh_token,
            } => (message, refresh_token),
            ProviderError::Refused { message } => {
                let settings = self.settings();
                let failures = row.failures.saturating_add(1);
                let delay = settings
                    .refresh
                    .retry_max
                    .min(REFUSED_RETRY_MAX)
                    .max(settings.refresh.retry_initial);
                tracing::error!(
                    provider = %slot.provider,
                    account = %slot.account,
                    failures,
                    retry_in_secs = delay.as_secs(),
                    "refresh refused by the provider (the grant is kept; a reload or a forced refresh retries at once): {message}"
                );
                count_refresh(slot, "refused", None);
                if row.last_error.as_deref() != Some(message.as_str()) {
                    self.notify(slot, EventKind::RefreshFailing, message.clone());
                }
                let row = self
                    .inner
                    .store
                    .finish_attempt(
                        slot.id,
                        &self.inner.owner,
                        attempt,
                        ConnState::Retrying,
                        Some(&message),
                        failures,
                        Some(self.clock().now() + chrono_dur(delay)),
                    )
                    .await?;
                return Ok(match row {
                    Some(r) => slot.set(self.snap_of(&r)),
                    None => slot.snapshot(),
                });
            }
            other => {
                return self
                    .transient(slot, attempt, row, other.to_string(), None)
                    .await
            }
        };
        let message = format!(
            "{message}; the refresh token in that answer was stored and the next attempt uses it"
        );
        tracing::error!(provider = %slot.provider, account = %slot.account, "{message}");
        let kept = TokenGrant {
            access_token: row.access_token.clone(),
            refresh_token: Some(refresh_token),
            token_type: row.token_type.clone(),
            scope: None,
            issued_at: row.issued_at,
            expires_at: row.expires_at,
        };
        self.commit(slot, attempt, base_generation, used, kept, elapsed)
            .await?;
        let attempt = format!("{:016x}", rand::random::<u64>());
        let now = self.clock().now();
        match self
            .inner
            .store
            .begin_refresh(
                slot.id,
                &self.inner.owner,
                &attempt,
                now,
                now + chrono_dur(LEASE),
                None,
            )
            .await?
        {
            BeginRefresh::Started(row) => {
                let snap = self.transient(slot, &attempt, &row, message, None).await?;
                // The commit above moved the generation, which would read as
                // a successful refresh to a caller that forced this one.
                Err(failure(slot, &snap, self.clock()))
            }
            // Someone else took over meanwhile: the token is stored, and
            // their attempt reports for itself.
            _ => Ok(slot.snapshot()),
        }
    }

    /// After a config reload: every `retrying` connection is due at the
    /// next scheduler tick instead of after its backoff, since the reload
    /// may have fixed what failed (a client secret, `token_url`, scopes, a
    /// timeout). Costs at most one provider call per failing connection
    /// per reload, spread by the scheduler's per-tick cap. Returns how many.
    pub fn retry_failing_now(&self) -> usize {
        let now = self.clock().now();
        let mut n = 0;
        for slot in self.all_slots() {
            // Under the snapshot's write lock, so a flight landing meanwhile
            // is never overwritten with the older snapshot.
            let mut snap = slot.snap.write().unwrap_or_else(|e| e.into_inner());
            if snap.state == ConnState::Retrying && snap.next_attempt_at.is_some_and(|t| t > now) {
                let mut next = (**snap).clone();
                next.next_attempt_at = None;
                *snap = Arc::new(next);
                n += 1;
            }
        }
        self.inner.scheduler.wake();
        n
    }
}

/// The longest wait between attempts after a configuration refusal
/// ([`Engine::provider_refused_or_unusable`]): `retry_max` if shorter. A
/// quarter of an hour lets a grant whose access token lives a day (Keap)
/// recover well before it expires once the provider accepts the client
/// again (a fix made at the provider needs no reload here), at four calls
/// an hour.
const REFUSED_RETRY_MAX: Duration = Duration::from_secs(15 * 60);

/// How waiting for another process's lease ended.
enum Waited {
    /// It let go (or we stopped waiting): what is stored now.
    Settled(Arc<Snapshot>),
    /// Its holder is gone; take over exactly this lease.
    Lapsed(LeaseSeen),
}

/// Turns a snapshot into what a caller gets: the token while it is still
/// valid (even after failures), else the error that explains why not.
fn answer(slot: &Slot, snap: &Snapshot, clock: &dyn Clock) -> Result<IssuedToken, TokenError> {
    if snap.timing.expires_at > snap.anchor.now(clock) {
        return Ok(issued(slot, snap));
    }
    Err(failure(slot, snap, clock))
}

/// The error that explains why `snap` yields no (new) token. It says
/// whether the current token is still served, so a failed forced refresh
/// does not claim that none is left.
fn failure(slot: &Slot, snap: &Snapshot, clock: &dyn Clock) -> TokenError {
    let now = snap.anchor.now(clock);
    if snap.state == ConnState::AuthorizationRequired {
        return TokenError::AuthorizationRequired {
            provider: slot.provider.clone(),
            account: slot.account.clone(),
            reason: snap
                .last_error
                .clone()
                .unwrap_or_else(|| "the grant was rejected".into()),
        };
    }
    let retry_after = snap
        .next_attempt_at
        .and_then(|t| (t - now).to_std().ok())
        .unwrap_or(Duration::from_secs(1))
        .max(Duration::from_secs(1));
    TokenError::RefreshFailed {
        provider: slot.provider.clone(),
        account: slot.account.clone(),
        reason: snap
            .last_error
            .clone()
            .unwrap_or_else(|| "the refresh did not complete".into()),
        retry_after,
        still_valid_until: (snap.timing.expires_at > now).then_some(snap.timing.expires_at),
    }
}

/// The answer for a connection whose stored row cannot be read: shaped
/// like `authorization_required` (a new authorization repairs it), saying
/// what is wrong and what was not done.
fn unreadable_error(slot: &Slot, row: &ConnectionRow, not_done: &str) -> TokenError {
    TokenError::AuthorizationRequired {
        provider: slot.provider.clone(),
        account: slot.account.clone(),
        reason: format!(
            "{}; {not_done}",
            row.unreadable
                .as_deref()
                .unwrap_or("the stored grant cannot be read")
        ),
    }
}

fn count_refresh(slot: &Slot, result: &'static str, elapsed: Option<Duration>) {
    if let Some(i) = crate::metrics::REFRESH_RESULTS
        .iter()
        .position(|r| *r == result)
    {
        slot.refreshes[i].fetch_add(1, Ordering::Relaxed);
    }
    if let Some(d) = elapsed {
        metrics::histogram!(crate::metrics::REFRESH_DURATION, "provider" => slot.provider.clone())
            .record(d.as_secs_f64());
    }
}

fn issued(slot: &Slot, snap: &Snapshot) -> IssuedToken {
    slot.served.fetch_add(1, Ordering::Relaxed);
    IssuedToken {
        provider: slot.provider.clone(),
        account: slot.account.clone(),
        access_token: snap.access_token.clone(),
        token_type: snap.token_type.clone(),
        expires_at: snap.timing.expires_at,
    }
}

fn chrono_dur(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

/// Whether the lease holder `owner` is certainly gone (see `owner`).
fn owner_is_dead(owner: &str) -> bool {
    owner::certainly_dead(owner, owner::Identity::current(), owner::probe)
}
