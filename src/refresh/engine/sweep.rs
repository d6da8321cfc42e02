//! The scheduler's pass over every connection: [`Engine::tick`] notices
//! other processes ([`Engine::heartbeat`]) and their writes
//! ([`Engine::reconcile`]), then starts every due refresh as a flight.
//!
//! Must not: refresh inline (each due connection gets its own flight), or
//! start more refreshes per pass than the provider's rate allows.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::Engine;
use crate::notify::EventKind;
use crate::refresh::due::Pass;
use crate::refresh::meta;
use crate::refresh::policy;
use crate::refresh::slot::Slot;
use crate::refresh::snapshot::Snapshot;
use crate::refresh::types::{chrono_dur, Trigger};
use crate::store::feed::Changes;
use crate::store::{ConnState, StoreError};

impl Engine {
    /// One scheduler pass: notice other processes' writes, then start every
    /// due refresh, and say when the next connection falls due. Decisions
    /// compare stored absolute instants with each token's own idea of now
    /// (`clock::Anchor`): the wall clock, or its receipt plus monotonic time
    /// since if that is later, so time spent suspended is caught up here
    /// and a clock set back delays nothing. The stored rows are read again
    /// (`reconcile`) only when another connection wrote since the last pass,
    /// at most once per `check_interval`; an idle pass reads no table.
    pub async fn tick(&self) -> Result<Pass, StoreError> {
        let sched = &self.inner.scheduler;
        let every = self.settings().refresh.check_interval;
        let mono = self.clock().monotonic();
        let feed = self.inner.store.feed();
        if sched.heartbeat_due(mono) {
            self.heartbeat().await?;
            sched.heartbeat_done(mono);
            // It answered: an outage noticed elsewhere is over.
            feed.answered();
        }
        if feed.pushed() {
            // Other daemons' writes arrive announced and are read by
            // `follow` at once; a full read once per interval, queued
            // there too, catches anything an announcement missed.
            if sched.reconcile_stale(mono, every) {
                feed.push(Changes::All);
                sched.reconciled(mono);
            }
        } else if sched.reconcile_due(self.inner.store.changed().await?, mono, every) {
            self.reconcile().await?;
            sched.reconciled(mono);
        }
        let settings = self.settings();
        let mut pass = Pass {
            reconcile_in: sched.reconcile_in(mono, every),
            ..Default::default()
        };
        if !feed.up() {
            // No refresh that could not be committed: held tokens are
            // served meanwhile, and the end of the outage wakes the
            // scheduler (`follow`).
            return Ok(pass);
        }
        let mut earliest: Option<Duration> = None;
        let mut due: Vec<(DateTime<Utc>, Arc<Slot>)> = Vec::new();
        // Unsorted (`due` is sorted below): an idle pass over 10,000
        // connections should not pay for ordering them by name.
        for slot in self.inner.slots.unsorted() {
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
            if snap.state() == ConnState::AuthorizationRequired {
                continue;
            }
            let Some(timing) = snap.timing() else {
                continue;
            };
            let now = snap.now(self.clock());
            if let Some(left) = self.warn_refresh_token_end(&slot, &snap, now, &settings.refresh) {
                earliest = Some(earliest.map_or(left, |e| e.min(left)));
            }
            // A retrying connection is due at its next attempt; any other at
            // its planned refresh, but not before a pending next attempt.
            let due_at = if snap.state() == ConnState::Retrying {
                snap.next_attempt_at().unwrap_or(now)
            } else {
                let planned = policy::next_due_at(
                    timing,
                    &snap.meta,
                    &settings.refresh,
                    slot.jitter(&settings.refresh),
                );
                snap.next_attempt_at().map_or(planned, |t| t.max(planned))
            };
            if due_at <= now {
                due.push((timing.expires_at, slot));
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
    pub(super) async fn heartbeat(&self) -> Result<(), StoreError> {
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

    /// Picks up what other processes wrote to the connections `ids` (as
    /// announced by the store): a newer grant with its fingerprints, a new
    /// state, a new connection. A slot this process is refreshing is left
    /// alone (its own result is newer), and an older generation is never
    /// installed. A connection that is gone is settled by a full
    /// [`Engine::reconcile`].
    pub(super) async fn reconcile_rows(&self, ids: &BTreeSet<i64>) -> Result<(), StoreError> {
        let busy = |s: &Slot| s.in_flight() || s.pending().is_some();
        for &id in ids {
            let slot = self.inner.slots.by_id(id);
            if slot.as_deref().is_some_and(busy) {
                continue;
            }
            let attempts = slot.as_ref().map(|s| s.attempts.load(Ordering::SeqCst));
            let Some(row) = self.inner.store.load_connection(id).await? else {
                self.reconcile().await?;
                continue;
            };
            let regrant = match &slot {
                None => true,
                Some(s) => {
                    // A flight of ours that started or ended since the read
                    // knows better than the row.
                    if busy(s) || Some(s.attempts.load(Ordering::SeqCst)) != attempts {
                        continue;
                    }
                    let generation = s.snapshot().generation;
                    if row.generation < generation {
                        continue;
                    }
                    row.generation > generation
                }
            };
            if regrant {
                self.learn_fingerprints(id).await?;
            }
            self.install(&row);
        }
        Ok(())
    }

    /// Picks up grants written by other processes (another daemon on the
    /// same file, a re-authorization) and drops forgotten ones.
    pub(super) async fn reconcile(&self) -> Result<(), StoreError> {
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
                        quiet && (regrant || snap.state().as_str() != state),
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
        self.inner.slots.retain(|s| {
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
}

impl Engine {
    /// Sends `refresh_token_expiring` once per approaching end that
    /// refreshing cannot push back (SPEC 11, [`meta::warning`]); returns
    /// how long until such a warning falls due, for the scheduler's sleep.
    fn warn_refresh_token_end(
        &self,
        slot: &Slot,
        snap: &Snapshot,
        now: DateTime<Utc>,
        refresh: &crate::config::RefreshConfig,
    ) -> Option<Duration> {
        let failing = snap.failures() > 0;
        let (end, at) = meta::warning(&snap.meta, failing, refresh.warn_before)?;
        if at > now {
            return (at - now).to_std().ok();
        }
        if end > now && slot.first_warning_for(end) {
            let when = end.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
            let why = if snap.meta.refresh_token_end_is_fixed() {
                "a fixed end that refreshing cannot push back"
            } else {
                "refreshes are failing, so it is not being renewed"
            };
            let message = format!(
                "the refresh token ends at {when} ({why}); authorize again before then (tokenkeeper connect {} {})",
                slot.provider, slot.account
            );
            tracing::warn!(provider = %slot.provider, account = %slot.account, "{message}");
            self.inner
                .notify(slot, EventKind::RefreshTokenExpiring, message);
        }
        None
    }
}
