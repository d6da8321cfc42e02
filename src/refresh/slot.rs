//! One connection in memory ([`Slot`]: its snapshot, its flight lock,
//! counters, a grant held after a failed commit, what we saw of another
//! process's lease) and the table of them ([`Slots`]). Also how a snapshot
//! becomes a caller's answer ([`Slot::answer`], [`Slot::failure`]).
//!
//! Must not: touch storage, call a provider or decide when to refresh.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};

use chrono::{DateTime, Utc};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use secrecy::SecretString;

use super::clock::{Anchor, Clock, LeaseWatch};
use super::policy;
use super::snapshot::Snapshot;
use super::types::{IssuedToken, TokenError};
use crate::config::RefreshConfig;
use crate::provider::TokenGrant;
use crate::store::{ConnectionRow, Fingerprint};

/// A grant the provider issued whose commit failed: kept until it lands
/// (see `flight::commit`).
pub struct PendingCommit {
    pub grant: TokenGrant,
    /// The refresh token the provider was given (now spent).
    pub used: SecretString,
    pub attempt: String,
    pub base_generation: i64,
    pub fps: Vec<Fingerprint>,
    /// When the provider's answer arrived, on both clocks.
    pub anchor: Anchor,
    /// The history events the commit records with the grant.
    pub events: Vec<crate::store::NewEvent>,
    /// What the grant keeps beside its tokens, written with it (`None`:
    /// what is stored stays).
    pub meta: Option<crate::store::GrantMeta>,
}

/// One connection's in-memory state.
pub struct Slot {
    pub id: i64,
    pub provider: String,
    pub account: String,
    /// std RwLock: held only to clone an `Arc`, never across `.await`.
    pub(super) snap: RwLock<Arc<Snapshot>>,
    /// tokio Mutex: held across the provider call; waiting on it is how
    /// concurrent callers share one refresh. Owned guards, because the
    /// flight holding it runs apart from the caller that took it.
    pub(super) flight: Arc<tokio::sync::Mutex<()>>,
    pub(super) in_flight: AtomicBool,
    /// Finished attempts; a waiter that sees it move knows a flight ended
    /// while it queued and takes that result instead of starting another.
    pub(super) attempts: AtomicU64,
    /// Woken when a flight ends, so a herd of callers waiting for it
    /// resumes at once instead of taking the flight lock one by one.
    pub(super) landed: tokio::sync::Notify,
    /// Tokens handed out since start: `tokenkeeper_token_requests_total`,
    /// written into `/metrics` at scrape time. A plain atomic, not a
    /// recorder series: 10,000 of those cost megabytes of idle memory.
    pub(super) served: AtomicU64,
    /// Refresh attempts by result (`tokenkeeper_refresh_total`), written at
    /// scrape time like `served`, so every series exists from the start.
    pub(super) refreshes: [AtomicU64; 4],
    /// A grant the provider issued that could not be stored yet (see the
    /// engine's invariants). std Mutex: never held across `.await`.
    pub(super) pending: std::sync::Mutex<Option<Arc<PendingCommit>>>,
    /// What we last saw of another process's lease on this connection.
    pub(super) lease_watch: std::sync::Mutex<Option<LeaseWatch>>,
    /// When a bearer misuse of this grant's refresh token was last
    /// reported (monotonic ms + 1; 0: never), so that a program sending it
    /// in a loop costs one log line, event and notification a minute.
    pub(super) misuse_reported: AtomicU64,
    /// The refresh-token end a `refresh_token_expiring` event was sent
    /// for (UTC ms; 0: none), so each approaching end is told once.
    warned_end: AtomicI64,
    /// The table's change counter (see [`Slots::changes`]), moved by
    /// [`Slot::set`].
    changes: tokio::sync::watch::Sender<u64>,
}

impl Slot {
    fn new(row: &ConnectionRow, snap: Snapshot, changes: tokio::sync::watch::Sender<u64>) -> Slot {
        Slot {
            id: row.id,
            provider: row.provider.clone(),
            account: row.account.clone(),
            snap: RwLock::new(Arc::new(snap)),
            flight: Arc::new(tokio::sync::Mutex::new(())),
            in_flight: AtomicBool::new(false),
            attempts: AtomicU64::new(0),
            landed: tokio::sync::Notify::new(),
            served: AtomicU64::new(0),
            refreshes: Default::default(),
            pending: std::sync::Mutex::new(None),
            lease_watch: std::sync::Mutex::new(None),
            misuse_reported: AtomicU64::new(0),
            warned_end: AtomicI64::new(0),
            changes,
        }
    }

    /// This connection's stable share of `refresh.jitter`, computed from
    /// the current settings so a reloaded jitter applies at once.
    pub fn jitter(&self, refresh: &RefreshConfig) -> Duration {
        policy::stable_jitter(&self.provider, &self.account, refresh.jitter)
    }

    /// Whether `end` is a refresh-token end not yet warned about; marks it
    /// warned.
    pub fn first_warning_for(&self, end: DateTime<Utc>) -> bool {
        self.warned_end
            .swap(end.timestamp_millis(), Ordering::SeqCst)
            != end.timestamp_millis()
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snap.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the snapshot. The same token keeps its anchor (see
    /// [`Snapshot::keep_anchor_of`]); the change counter moves only when
    /// the token served changes, not for a change of state alone (a
    /// refresh starting, failing, waiting).
    pub fn set(&self, mut s: Snapshot) -> Arc<Snapshot> {
        let mut cur = self.snap.write().unwrap_or_else(|e| e.into_inner());
        s.keep_anchor_of(&cur);
        let token_changed = !s.serves_same_token_as(&cur);
        let s = Arc::new(s);
        *cur = s.clone();
        drop(cur);
        if token_changed {
            bump(&self.changes);
        }
        s
    }

    /// Whether a refresh of this connection is in the air in this process.
    pub fn in_flight(&self) -> bool {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// The grant held in memory after a failed commit, if any.
    pub fn pending(&self) -> Option<Arc<PendingCommit>> {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Drops the held grant (it landed, or lost to a newer one).
    pub fn take_pending(&self) -> Option<Arc<PendingCommit>> {
        let taken = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if taken.is_some() {
            metrics::gauge!(crate::metrics::UNCOMMITTED_GRANTS).decrement(1.0);
        }
        taken
    }

    /// Our own write of the lease failed (the database is locked): the
    /// other holder cannot renew its lease either, so what we saw of it
    /// standing still says nothing about whether it lives. Watching starts
    /// over once writes work again.
    pub fn forget_lease_watch(&self) {
        *self.lease_watch.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Turns a snapshot into what a caller gets: the token while it is
    /// still valid (even after failures), else the error that explains why
    /// not.
    pub fn answer(&self, snap: &Snapshot, clock: &dyn Clock) -> Result<IssuedToken, TokenError> {
        if snap.valid_until(snap.now(clock)).is_some() {
            if let Some(t) = self.issue(snap) {
                return Ok(t);
            }
        }
        Err(self.failure(snap, clock))
    }

    /// [`Slot::answer`] without building the token: `snap` itself when its
    /// token may be handed out (valid, even after failures), else the
    /// error that explains why not. Not counted as served.
    pub fn servable(
        &self,
        snap: Arc<Snapshot>,
        clock: &dyn Clock,
    ) -> Result<Arc<Snapshot>, TokenError> {
        if snap.token().is_some() && snap.valid_until(snap.now(clock)).is_some() {
            return Ok(snap);
        }
        Err(self.failure(&snap, clock))
    }

    /// The error that explains why `snap` yields no (new) token. It says
    /// whether the current token is still served, so a failed forced
    /// refresh does not claim that none is left.
    pub fn failure(&self, snap: &Snapshot, clock: &dyn Clock) -> TokenError {
        let now = snap.now(clock);
        if snap.needs_authorization() {
            return TokenError::AuthorizationRequired {
                provider: self.provider.clone(),
                account: self.account.clone(),
                reason: snap.last_error().unwrap_or_default().to_string(),
            };
        }
        let retry_after = snap
            .next_attempt_at()
            .and_then(|t| (t - now).to_std().ok())
            .unwrap_or(Duration::from_secs(1))
            .max(Duration::from_secs(1));
        TokenError::RefreshFailed {
            provider: self.provider.clone(),
            account: self.account.clone(),
            reason: snap
                .last_error()
                .unwrap_or("the refresh did not complete")
                .to_string(),
            retry_after,
            still_valid_until: snap.valid_until(now),
        }
    }

    /// The answer for a connection whose stored row cannot be read: shaped
    /// like `authorization_required` (a new authorization repairs it),
    /// saying what is wrong and what was not done.
    pub fn unreadable_error(&self, row: &ConnectionRow, not_done: &str) -> TokenError {
        TokenError::AuthorizationRequired {
            provider: self.provider.clone(),
            account: self.account.clone(),
            reason: format!(
                "{}; {not_done}",
                row.unreadable
                    .as_deref()
                    .unwrap_or("the stored grant cannot be read")
            ),
        }
    }

    /// Hands out the snapshot's token (counted as served); `None` if the
    /// row could not be read.
    pub fn issue(&self, snap: &Snapshot) -> Option<IssuedToken> {
        let t = snap.token()?;
        self.served.fetch_add(1, Ordering::Relaxed);
        Some(IssuedToken {
            provider: self.provider.clone(),
            account: self.account.clone(),
            access_token: t.access_token.clone(),
            token_type: t.token_type.clone(),
            expires_at: t.timing.expires_at,
            extra: snap.meta.clone(),
        })
    }

    /// Counts a refresh attempt by result (and its duration, if it reached
    /// the provider and succeeded).
    pub fn count_refresh(&self, result: &'static str, elapsed: Option<Duration>) {
        if let Some(i) = crate::metrics::REFRESH_RESULTS
            .iter()
            .position(|r| *r == result)
        {
            self.refreshes[i].fetch_add(1, Ordering::Relaxed);
        }
        if let Some(d) = elapsed {
            metrics::histogram!(crate::metrics::REFRESH_DURATION, "provider" => self.provider.clone())
                .record(d.as_secs_f64());
        }
    }
}

/// Marks a slot in flight; clears it, counts the attempt and wakes the
/// waiters when dropped, even if the refresh future is dropped mid-way.
pub struct FlightGuard(Arc<Slot>);

impl FlightGuard {
    /// Marks `slot` in flight until the guard is dropped.
    pub fn new(slot: Arc<Slot>) -> FlightGuard {
        slot.in_flight.store(true, Ordering::SeqCst);
        FlightGuard(slot)
    }
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        self.0.attempts.fetch_add(1, Ordering::SeqCst);
        self.0.in_flight.store(false, Ordering::SeqCst);
        self.0.landed.notify_waiters();
    }
}

/// Moves a change counter; receivers wake and look at what they mirror.
fn bump(changes: &tokio::sync::watch::Sender<u64>) {
    changes.send_modify(|n| *n = n.wrapping_add(1));
}

/// Every known connection's slot, by `(provider, account)`.
pub struct Slots {
    /// std RwLock: never held across `.await`.
    map: RwLock<HashMap<(String, String), Arc<Slot>>>,
    /// Moves whenever the token a connection serves changes (not its
    /// state alone) or a connection appears or goes, so that what mirrors tokens outside the engine (token
    /// files, `sinks`) learns of it without the engine knowing of them. A
    /// counter, not the change itself: a slow subscriber only ever needs
    /// the latest state, which it reads from the snapshots.
    changes: tokio::sync::watch::Sender<u64>,
}

impl Default for Slots {
    fn default() -> Slots {
        Slots {
            map: RwLock::default(),
            changes: tokio::sync::watch::Sender::new(0),
        }
    }
}

impl Slots {
    /// A receiver woken whenever a served token changes (see
    /// [`Slots::changes`]).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Makes a stored row visible: replaces the snapshot of its slot, or
    /// starts a new slot (a new connection, or one authorized anew after
    /// it was forgotten).
    pub fn install(&self, row: &ConnectionRow, snap: Snapshot) {
        let key = (row.provider.clone(), row.account.clone());
        let mut slots = self.map.write().unwrap_or_else(|e| e.into_inner());
        match slots.get(&key) {
            Some(slot) if slot.id == row.id => {
                slot.set(snap);
            }
            _ => {
                let slot = Slot::new(row, snap, self.changes.clone());
                slots.insert(key, Arc::new(slot));
                drop(slots);
                bump(&self.changes);
            }
        }
    }

    /// The slot of `provider/account`.
    pub fn get(&self, provider: &str, account: &str) -> Option<Arc<Slot>> {
        self.map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(provider.to_string(), account.to_string()))
            .cloned()
    }

    /// `f` on the slot of `provider/account`, under the read lock and
    /// without allocating (the token fast lane).
    pub fn with<R>(&self, provider: &str, account: &str, f: impl FnOnce(&Slot) -> R) -> Option<R> {
        let slots = self.map.read().unwrap_or_else(|e| e.into_inner());
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
        Some(f(slot))
    }

    /// Every slot, sorted by provider and account.
    pub fn all(&self) -> Vec<Arc<Slot>> {
        let mut v: Vec<_> = self
            .map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| (&a.provider, &a.account).cmp(&(&b.provider, &b.account)));
        v
    }

    /// Every slot, in no particular order (the scheduler's pass).
    pub fn unsorted(&self) -> Vec<Arc<Slot>> {
        self.map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// The slot of connection `id`.
    pub fn by_id(&self, id: i64) -> Option<Arc<Slot>> {
        self.map
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .find(|s| s.id == id)
            .cloned()
    }

    /// Keeps the slots for which `keep` holds.
    /// Keeps only the slots `keep` accepts; subscribers are woken when any
    /// went (a forgotten grant's mirrors must stop showing its token).
    pub fn retain(&self, mut keep: impl FnMut(&Slot) -> bool) {
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        let before = map.len();
        map.retain(|_, s| keep(s));
        let removed = map.len() != before;
        drop(map);
        if removed {
            bump(&self.changes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::refresh::clock::TestClock;
    use crate::refresh::snapshot::tests::row;
    use crate::store::ConnState;

    fn snap(r: &ConnectionRow) -> Snapshot {
        Snapshot::from_row(r, Anchor::at(&*TestClock::new(r.issued_at)))
    }

    #[test]
    fn subscribers_wake_when_the_served_token_changes_not_its_state() {
        let slots = Slots::default();
        let mut rx = slots.subscribe();
        let mut woken = || {
            let w = rx.has_changed().unwrap();
            rx.borrow_and_update();
            w
        };
        let active = row(ConnState::Active);
        slots.install(&active, snap(&active));
        assert!(woken());
        for state in [
            ConnState::Refreshing,
            ConnState::Retrying,
            ConnState::Active,
        ] {
            let mut r = row(state);
            r.last_error = (state == ConnState::Retrying).then(|| "boom".into());
            r.failures = u32::from(state == ConnState::Retrying);
            slots.install(&r, snap(&r));
            assert!(!woken(), "{state}: the token is the same");
        }
        let mut rotated = row(ConnState::Active);
        rotated.access_token = SecretString::from("at2".to_string());
        rotated.expires_at += chrono::Duration::hours(1);
        rotated.generation += 1;
        slots.install(&rotated, snap(&rotated));
        assert!(woken());
        let mut extras = row(ConnState::Active);
        extras.access_token = SecretString::from("at2".to_string());
        extras.expires_at = rotated.expires_at;
        extras.generation = rotated.generation;
        extras
            .meta
            .extra
            .insert("tenant".into(), serde_json::json!("t1"));
        slots.install(&extras, snap(&extras));
        assert!(woken(), "the json and env files show extras");
        slots.retain(|_| false);
        assert!(woken());
    }
}
