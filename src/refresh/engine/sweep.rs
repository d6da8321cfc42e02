//! The scheduler's pass over every connection: [`Engine::tick`] notices
//! other processes ([`Engine::heartbeat`]) and their writes
//! ([`Engine::reconcile`]), then starts every due refresh as a flight.
//!
//! Must not: refresh inline (each due connection gets its own flight), or
//! start more refreshes per pass than the provider's rate allows.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::Engine;
use crate::refresh::policy;
use crate::refresh::slot::Slot;
use crate::refresh::types::{chrono_dur, Trigger};
use crate::store::{ConnState, StoreError};

impl Engine {
    /// One scheduler pass: notice other processes' writes, then start every
    /// due refresh. Decisions compare stored absolute instants with each
    /// token's own idea of now (`clock::Anchor`): the wall clock, or its
    /// receipt plus monotonic time since if that is later, so time spent
    /// suspended is caught up here and a clock set back delays nothing.
    pub async fn tick(&self) -> Result<(), StoreError> {
        self.heartbeat().await?;
        self.reconcile().await?;
        let settings = self.settings();
        let mut due: Vec<(DateTime<Utc>, Arc<Slot>)> = Vec::new();
        for slot in self.all_slots() {
            // A slot holding an uncommitted grant is looked after by its
            // commit retry loop, not refreshed.
            if !settings.providers.contains_key(&slot.provider)
                || slot.in_flight.load(Ordering::SeqCst)
                || slot.pending().is_some()
            {
                continue;
            }
            let snap = slot.snapshot();
            let now = snap.now(self.clock());
            if snap.state() == ConnState::AuthorizationRequired
                || snap.next_attempt_at().is_some_and(|t| t > now)
            {
                continue;
            }
            let Some(timing) = snap.timing() else {
                continue;
            };
            if snap.state() == ConnState::Retrying
                || policy::next_refresh_at(
                    timing,
                    &settings.refresh,
                    slot.jitter(&settings.refresh),
                ) <= now
            {
                due.push((timing.expires_at, slot));
            }
        }
        // Most urgent first; and no more per tick than the provider's
        // per-second limit allows until the next tick, so a wave of due
        // connections (10,000 restored from a backup) is spread over ticks
        // instead of bursting past the limit. The rest wait for the next tick.
        due.sort_by_key(|(expires_at, _)| *expires_at);
        let interval = settings.refresh.check_interval.as_secs().max(1) as usize;
        let mut started: HashMap<String, usize> = HashMap::new();
        for (_, slot) in due {
            // Within one interval, and within the time a refresh waits for
            // its rate-limit slot (`request_timeout`).
            let cap = settings
                .providers
                .get(&slot.provider)
                .map_or(usize::MAX, |p| {
                    let window = interval.min(p.config.request_timeout.as_secs().max(1) as usize);
                    p.config
                        .limits
                        .per_second
                        .map_or(usize::MAX, |r| (r as usize).saturating_mul(window))
                });
            let n = started.entry(slot.provider.clone()).or_default();
            if *n >= cap {
                continue;
            }
            *n += 1;
            let engine = self.clone();
            self.inner.tasks.spawn(async move {
                if let Err(e) = engine.refresh_slot(&slot, Trigger::Scheduled).await {
                    tracing::debug!(provider = %slot.provider, account = %slot.account, error = %e, "scheduled refresh did not produce a token");
                }
            });
        }
        Ok(())
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
