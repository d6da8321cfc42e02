//! The refresh scheduler: one task that sleeps until the earliest instant a
//! connection falls due and then runs an engine pass ([`Engine::tick`]),
//! which decides what is due and starts those refreshes.
//!
//! What it owns: *when* a pass runs. The sleep ends at the first of
//! - the earliest due instant the last pass reported (next refresh, next
//!   retry after backoff, keepalive);
//! - `refresh.check_interval` after the last pass (the cap): a wall clock
//!   set forward, a suspended machine, or another process's write are
//!   noticed at most that late, since a sleep on the monotonic clock cannot
//!   see them;
//! - a wake-up from the engine ([`State::wake`]): a grant installed (a new
//!   authorization, another process's write picked up), a reload (which can
//!   move every due time: `check_interval`, `at_fraction`, `jitter`), failing
//!   connections told to retry now;
//! - [`PACE`] after a pass while a refresh is in the air: its end may have
//!   scheduled a retry or moved the connection's due time;
//! - the daemon's cancellation token, which ends the task.
//!
//! When a pass held due connections back (no more started per pass than the
//! provider's `per_second` limit, see `Engine::tick`), the next pass comes
//! exactly [`PACE`] later, whatever wakes it meanwhile, so the wave goes on
//! at the provider's limit and never faster.
//!
//! What it must not do: decide anything about a connection (that is
//! `Engine::tick` and `policy`), or read the wall clock: it sleeps on tokio's
//! monotonic clock, and every decision is made against the engine's `Clock`.
//! An idle pass costs one `PRAGMA data_version` and one heartbeat write; a
//! full read of the connections (`reconcile`) runs only when another
//! connection wrote, and at most once per `check_interval` ([`State`]).

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use futures_util::FutureExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Engine;

/// The shortest `check_interval` honoured: configs allow sub-second values
/// for tests; zero would spin.
const MIN_INTERVAL: Duration = Duration::from_millis(100);

pub use super::due::{Pass, State, MIN_GAP, PACE};

/// How the scheduler waits after a pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wait {
    /// From the end of the pass.
    pub after: Duration,
    /// Whether a wake-up ends the wait early.
    pub wakeable: bool,
}

/// The wait after a pass (`None`: the pass failed) with `check_interval`
/// in force. Pure, so the rules are tested without a clock.
pub fn wait_after(pass: Option<&Pass>, check_interval: Duration) -> Wait {
    let cap = check_interval.max(MIN_INTERVAL);
    let Some(pass) = pass else {
        return Wait {
            after: cap,
            wakeable: true,
        };
    };
    if pass.deferred {
        // The pass started a second's worth at the provider's limit.
        return Wait {
            after: PACE,
            wakeable: false,
        };
    }
    let mut after = cap;
    if let Some(due) = pass.next_due_in {
        after = after.min(due);
    }
    if pass.in_flight {
        after = after.min(PACE);
    }
    if let Some(r) = pass.reconcile_in {
        after = after.min(r);
    }
    Wait {
        after: after.max(MIN_GAP),
        wakeable: true,
    }
}

/// Runs the refresh scheduler of `engine` until `shutdown` is cancelled.
/// A pass in progress finishes first (it only starts refreshes; the
/// daemon waits for those separately).
pub async fn run(engine: Engine, shutdown: CancellationToken) {
    // (status line last sent, when upkeep last ran). The first is one
    // interval after the start: the daemon announces itself (READY=1 with
    // its status) after spawning this task.
    let upkeep = Mutex::new((String::new(), Instant::now()));
    let (engine, upkeep) = (&engine, &upkeep);
    drive(
        engine.scheduler(),
        &shutdown,
        || engine.settings().refresh.check_interval,
        move || async move {
            let pass = match engine.tick().await {
                Ok(p) => Some(p),
                Err(e) => {
                    // An outage is logged once, by the store's feed.
                    let feed = engine.store().feed();
                    if !feed.note(&e) && feed.up() {
                        tracing::error!(error = %e, "refresh scheduler pass failed");
                    }
                    None
                }
            };
            // Histogram upkeep and the systemd status line (which walks every
            // connection, and only under systemd): once per interval is as
            // often as they need.
            let every = engine.settings().refresh.check_interval;
            let mut u = upkeep.lock().unwrap_or_else(|e| e.into_inner());
            if u.1.elapsed() >= every {
                u.1 = Instant::now();
                crate::metrics::upkeep();
                if std::env::var_os("NOTIFY_SOCKET").is_none() {
                    return pass;
                }
                let now = crate::systemd::summary(engine);
                if u.0 != now {
                    crate::systemd::status(&now);
                    u.0 = now;
                }
            }
            pass
        },
    )
    .await;
}

/// The loop itself, apart from the engine so that its timing is tested
/// with tokio's paused clock: run a pass, wait as [`wait_after`] says (on
/// tokio's monotonic clock), again, until `shutdown`.
pub async fn drive<F, Fut>(
    state: &State,
    shutdown: &CancellationToken,
    check_interval: impl Fn() -> Duration,
    mut pass: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<Pass>>,
{
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        let began = Instant::now();
        // A wake-up stored before this pass is answered by it.
        let _ = state.wake.notified().now_or_never();
        let outcome = pass().await;
        let wait = wait_after(outcome.as_ref(), check_interval());
        // From the end of the pass: a due instant is then met just after
        // it, not a few milliseconds early (which would cost another pass).
        let until = Instant::now() + wait.after;
        if wait.wakeable {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep_until(until) => {}
                () = state.wake.notified() => {}
            }
        } else {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep_until(until) => {}
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep_until(began + MIN_GAP) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::refresh::due::HEARTBEAT_MIN;
    use std::sync::Arc;

    const INTERVAL: Duration = Duration::from_secs(30);

    fn due_in(secs: u64) -> Pass {
        Pass {
            next_due_in: Some(Duration::from_secs(secs)),
            ..Pass::default()
        }
    }

    #[test]
    fn waits_for_the_earliest_due_instant_but_never_longer_than_the_interval() {
        assert_eq!(
            wait_after(Some(&due_in(5)), INTERVAL).after,
            Duration::from_secs(5)
        );
        assert_eq!(wait_after(Some(&due_in(3600)), INTERVAL).after, INTERVAL);
        assert_eq!(wait_after(Some(&Pass::default()), INTERVAL).after, INTERVAL);
        // A failed pass is tried again one interval later, as before.
        assert_eq!(wait_after(None, INTERVAL).after, INTERVAL);
        // A due instant already past is met at once, not in a spin.
        assert_eq!(wait_after(Some(&due_in(0)), INTERVAL).after, MIN_GAP);
    }

    #[test]
    fn a_paced_wave_goes_on_after_one_second_and_only_then() {
        let w = wait_after(
            Some(&Pass {
                deferred: true,
                next_due_in: Some(Duration::ZERO),
                ..Pass::default()
            }),
            INTERVAL,
        );
        assert_eq!(
            w,
            Wait {
                after: PACE,
                wakeable: false
            }
        );
    }

    #[test]
    fn a_refresh_in_the_air_or_a_change_to_read_brings_the_next_pass_forward() {
        let flying = Pass {
            in_flight: true,
            ..due_in(3600)
        };
        assert_eq!(wait_after(Some(&flying), INTERVAL).after, PACE);
        let changed = Pass {
            reconcile_in: Some(Duration::from_secs(7)),
            ..due_in(3600)
        };
        assert_eq!(
            wait_after(Some(&changed), INTERVAL).after,
            Duration::from_secs(7)
        );
    }

    #[test]
    fn reconcile_runs_only_after_a_change_and_at_most_once_per_interval() {
        let s = State::default();
        let every = Duration::from_secs(30);
        let at = Duration::from_secs;
        // The first look always reads (the store answers `changed` once).
        assert!(s.reconcile_due(true, at(0), every));
        s.reconciled(at(0));
        assert!(!s.reconcile_due(false, at(100), every), "nothing changed");
        assert_eq!(s.reconcile_in(at(100), every), None);
        assert!(s.reconcile_due(true, at(100), every));
        s.reconciled(at(100));
        // A change 10 s after the last read waits until 30 s have passed...
        assert!(!s.reconcile_due(true, at(110), every));
        assert_eq!(s.reconcile_in(at(110), every), Some(at(20)));
        // ...remembered though the store reports each change only once.
        assert!(!s.reconcile_due(false, at(120), every));
        assert!(s.reconcile_due(false, at(130), every));
        s.reconciled(at(130));
        assert_eq!(s.reconcile_in(at(131), every), None);
    }

    #[test]
    fn the_heartbeat_is_written_at_most_once_a_second() {
        let s = State::default();
        assert!(s.heartbeat_due(Duration::ZERO));
        s.heartbeat_done(Duration::ZERO);
        assert!(!s.heartbeat_due(Duration::from_millis(500)));
        assert!(s.heartbeat_due(HEARTBEAT_MIN));
    }

    /// Drives the loop with scripted passes on tokio's paused clock and
    /// records when each pass ran (milliseconds since the start).
    struct Script {
        state: Arc<State>,
        shutdown: CancellationToken,
        interval: Arc<Mutex<Duration>>,
        passes: Arc<Mutex<Vec<u128>>>,
        task: tokio::task::JoinHandle<()>,
    }

    fn script(answer: impl Fn(usize) -> Pass + Send + Sync + 'static) -> Script {
        let state = Arc::new(State::default());
        let shutdown = CancellationToken::new();
        let interval = Arc::new(Mutex::new(INTERVAL));
        let passes = Arc::new(Mutex::new(Vec::new()));
        let start = Instant::now();
        let task = tokio::spawn({
            let (state, shutdown, interval, passes) = (
                state.clone(),
                shutdown.clone(),
                interval.clone(),
                passes.clone(),
            );
            async move {
                drive(
                    &state,
                    &shutdown,
                    || *interval.lock().unwrap(),
                    || {
                        let mut p = passes.lock().unwrap();
                        p.push(start.elapsed().as_millis());
                        let pass = answer(p.len() - 1);
                        async move { Some(pass) }
                    },
                )
                .await;
            }
        });
        Script {
            state,
            shutdown,
            interval,
            passes,
            task,
        }
    }

    impl Script {
        fn passes(&self) -> Vec<u128> {
            self.passes.lock().unwrap().clone()
        }
    }

    /// Lets the spawned loop run until it waits again.
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn sleeps_until_the_due_instant_and_no_longer_than_the_interval() {
        // First pass: one connection due in 5 s; afterwards none for hours.
        let s = script(|n| if n == 0 { due_in(5) } else { due_in(7200) });
        tokio::time::sleep(Duration::from_secs(95)).await;
        settle().await;
        assert_eq!(s.passes(), vec![0, 5_000, 35_000, 65_000, 95_000]);
        s.shutdown.cancel();
        s.task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_wake_up_runs_a_pass_at_once() {
        let s = script(|_| due_in(7200));
        tokio::time::sleep(Duration::from_secs(2)).await;
        s.state.wake();
        settle().await;
        assert_eq!(s.passes(), vec![0, 2_000]);
        // A burst of wake-ups costs one pass, MIN_GAP after the last.
        tokio::time::sleep(Duration::from_millis(10)).await;
        for _ in 0..50 {
            s.state.wake();
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(s.passes(), vec![0, 2_000, 2_100]);
        s.shutdown.cancel();
        s.task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_reloaded_shorter_interval_applies_at_once() {
        let s = script(|_| Pass::default());
        tokio::time::sleep(Duration::from_secs(10)).await;
        // What `Engine::reload` does: new settings, then a wake-up.
        *s.interval.lock().unwrap() = Duration::from_secs(2);
        s.state.wake();
        tokio::time::sleep(Duration::from_secs(5)).await;
        settle().await;
        assert_eq!(s.passes(), vec![0, 10_000, 12_000, 14_000]);
        s.shutdown.cancel();
        s.task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn cancellation_stops_it_promptly() {
        let s = script(|_| due_in(7200));
        tokio::time::sleep(Duration::from_secs(3)).await;
        let before = Instant::now();
        s.shutdown.cancel();
        let passes = s.passes.clone();
        s.task.await.unwrap();
        assert_eq!(before.elapsed(), Duration::ZERO, "it did not sleep on");
        assert_eq!(*passes.lock().unwrap(), vec![0]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_paced_wave_continues_every_second_and_wake_ups_do_not_hurry_it() {
        // Three passes hold connections back, then the wave is done.
        let s = script(|n| {
            if n < 3 {
                Pass {
                    started: 25,
                    deferred: true,
                    next_due_in: Some(Duration::ZERO),
                    in_flight: true,
                    ..Pass::default()
                }
            } else {
                due_in(7200)
            }
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        s.state.wake();
        tokio::time::sleep(Duration::from_secs(40)).await;
        settle().await;
        // The wake-up during the first pause is answered by the next pass.
        assert_eq!(s.passes(), vec![0, 1_000, 2_000, 3_000, 33_000]);
        s.shutdown.cancel();
        s.task.await.unwrap();
    }
}
