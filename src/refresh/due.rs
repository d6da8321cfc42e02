//! What the refresh scheduler (`scheduler`) and the engine's pass
//! (`Engine::tick`, `engine/sweep.rs`) share: the wake-up the engine pulls
//! when a due time may have moved earlier, the bookkeeping between passes
//! (when the heartbeat was written, when the stored rows were last read),
//! and the report of one pass. It sits at the bottom so that the engine
//! holds it without knowing the scheduler task.

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;

/// How soon the scheduler looks again while a paced wave of due
/// connections goes on, or while a refresh is in the air. A pass starts at
/// most the provider's `per_second` refreshes, which the provider's limit
/// grants in one second: looking again sooner would outrun it, later would
/// leave the limit unused.
pub const PACE: Duration = Duration::from_secs(1);

/// Shortest time between two passes, whatever wakes the scheduler: a storm
/// of wake-ups (many grants installed at once) costs at most ten passes a
/// second, and a due instant is met at most this late.
pub const MIN_GAP: Duration = Duration::from_millis(100);

/// Shortest time between two heartbeat writes: passes can come ten times a
/// second (see `MIN_GAP`), while a peer needs to hear from us only once
/// per `check_interval` (`Engine::heartbeat`).
pub(crate) const HEARTBEAT_MIN: Duration = Duration::from_secs(1);

/// What one pass of the engine found (`Engine::tick`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pass {
    /// Refreshes this pass started.
    pub started: usize,
    /// How long until the earliest connection that this pass did not start
    /// falls due, as judged by each token's own idea of now
    /// (`clock::Anchor`); zero if one is due now but was held back. `None`
    /// when no connection has a due time (none, or all need authorization).
    pub next_due_in: Option<Duration>,
    /// Due connections were held back to stay within a provider's limit.
    pub deferred: bool,
    /// A refresh (scheduled or on demand) is in the air or held for commit.
    pub in_flight: bool,
    /// Another connection wrote to the database and the read that picks it
    /// up (`reconcile`) waits this long, to run at most once per interval.
    pub reconcile_in: Option<Duration>,
}

/// The scheduler's state the engine holds: the wake-up, and what the passes
/// remember between them (on the engine's monotonic clock).
#[derive(Default)]
pub struct State {
    pub(crate) wake: Notify,
    /// std Mutex: held for a few assignments, never across `.await`.
    marks: Mutex<Marks>,
}

#[derive(Default)]
struct Marks {
    heartbeat_at: Option<Duration>,
    reconciled_at: Option<Duration>,
    /// Another connection wrote since the last reconcile.
    changed: bool,
}

impl State {
    /// A due time may have moved earlier: the scheduler runs a pass now
    /// (at most [`MIN_GAP`] after the previous one). Cheap; never blocks.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    fn marks(&self) -> std::sync::MutexGuard<'_, Marks> {
        self.marks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether this pass writes the heartbeat (at most every
    /// [`HEARTBEAT_MIN`]); `now` is monotonic.
    pub(crate) fn heartbeat_due(&self, now: Duration) -> bool {
        self.marks()
            .heartbeat_at
            .is_none_or(|at| now.saturating_sub(at) >= HEARTBEAT_MIN)
    }

    /// The heartbeat was written at `now`.
    pub(crate) fn heartbeat_done(&self, now: Duration) {
        self.marks().heartbeat_at = Some(now);
    }

    /// Records whether the store saw another connection's write, and says
    /// whether this pass reconciles: something changed since the last
    /// reconcile, and that was at least `every` ago (or never).
    pub(crate) fn reconcile_due(&self, changed: bool, now: Duration, every: Duration) -> bool {
        let mut m = self.marks();
        m.changed |= changed;
        m.changed
            && m.reconciled_at
                .is_none_or(|at| now.saturating_sub(at) >= every)
    }

    /// A reconcile finished at `now`; writes after its read are seen as a
    /// new change.
    pub(crate) fn reconciled(&self, now: Duration) {
        let mut m = self.marks();
        m.changed = false;
        m.reconciled_at = Some(now);
    }

    /// Whether the last full read (`reconcile`) is at least `every` old, or
    /// none was made: the safety net under changes pushed by the store,
    /// for any it did not announce.
    pub(crate) fn reconcile_stale(&self, now: Duration, every: Duration) -> bool {
        self.marks()
            .reconciled_at
            .is_none_or(|at| now.saturating_sub(at) >= every)
    }

    /// How long a noticed change waits for its reconcile, if one does.
    pub(crate) fn reconcile_in(&self, now: Duration, every: Duration) -> Option<Duration> {
        let m = self.marks();
        if !m.changed {
            return None;
        }
        Some(
            m.reconciled_at
                .map_or(Duration::ZERO, |at| (at + every).saturating_sub(now)),
        )
    }
}
