//! The refresh scheduler (`refresh::scheduler`): what an engine pass tells
//! it (the next due instant, a paced wave, a change to read), on a test
//! clock, and its wake-ups end to end. The loop's own timing is tested with
//! tokio's paused clock next to it (`scheduler::tests`).

mod common;

use std::time::Duration;

use common::engine::EngineSetup;
use sqlx::Connection;
use tokenkeeper::dev::Fault;
use tokenkeeper::refresh::clock::Clock;
use tokenkeeper::refresh::scheduler::Pass;
use tokenkeeper::store::ConnState;

const SECRET: &str = "scheduler-test-secret";
const INTERVAL: Duration = Duration::from_secs(30);

type Setup = EngineSetup;

/// An engine on a test clock against the simulator: refresh at three
/// quarters of the lifetime, no jitter, `per_second` refreshes a second.
async fn setup(per_second: u32) -> Setup {
    EngineSetup::start(SECRET, |cfg| {
        cfg.refresh.at_fraction = 0.75;
        cfg.refresh.jitter = Duration::ZERO;
        cfg.refresh.check_interval = INTERVAL;
        let p = cfg.providers.get_mut("demo").unwrap();
        p.request_timeout = Duration::from_secs(2);
        p.limits.per_second = Some(per_second);
    })
    .await
}

/// A browser authorization of `account` against the simulator, issued
/// `age` ago on the test clock and living an hour from then.
async fn authorize(s: &Setup, account: &str, age: Duration) {
    s.authorize(account, age).await;
}

fn state(s: &Setup, account: &str) -> ConnState {
    s.engine
        .report()
        .into_iter()
        .find(|c| c.account == account)
        .unwrap()
        .state
}

/// Whole seconds (stored instants have millisecond precision, the test
/// clock has more).
fn secs(d: Option<Duration>) -> Option<u64> {
    d.map(|d| d.as_secs_f64().round() as u64)
}

/// Waits (bounded by count, not by a tight deadline) for `cond`.
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..500 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for: {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_says_when_the_next_connection_falls_due() {
    let s = setup(25).await;
    authorize(&s, "default", Duration::ZERO).await;
    let pass = s.engine.tick().await.unwrap();
    assert_eq!(pass.started, 0);
    // Three quarters of the hour.
    assert_eq!(secs(pass.next_due_in), Some(45 * 60));
    assert!(!pass.deferred && !pass.in_flight);

    s.clock.advance(Duration::from_secs(40 * 60));
    let pass = s.engine.tick().await.unwrap();
    assert_eq!(secs(pass.next_due_in), Some(5 * 60));

    // The machine sleeps for ten minutes: the wall clock moves, the
    // monotonic clock (what the scheduler slept on) does not. The next
    // pass, at most one interval later, finds the connection overdue.
    s.clock.jump_wall(chrono::Duration::minutes(10));
    let pass = s.engine.tick().await.unwrap();
    assert_eq!(pass.started, 1, "{pass:?}");
    assert!(pass.in_flight, "its end is looked at soon: {pass:?}");
    until("the refresh", || s.sim.sim.stats().refresh_ok == 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_refresh_is_due_again_at_its_retry() {
    let s = setup(25).await;
    authorize(&s, "default", Duration::from_secs(46 * 60)).await;
    s.sim.sim.set_fault(Some(Fault::Status(503)));
    let pass = s.engine.tick().await.unwrap();
    assert_eq!(pass.started, 1);
    until("the failure", || {
        state(&s, "default") == ConnState::Retrying
    })
    .await;

    let retry_initial = tokenkeeper::config::RefreshConfig::default().retry_initial;
    let pass = s.engine.tick().await.unwrap();
    assert_eq!(pass.started, 0, "not before its backoff: {pass:?}");
    let next = pass.next_due_in.expect("a retry is scheduled");
    assert!(
        next > Duration::ZERO && next <= retry_initial,
        "due again at its backoff: {pass:?}"
    );

    s.sim.sim.set_fault(None);
    s.clock.advance(next);
    let pass = s.engine.tick().await.unwrap();
    assert_eq!(pass.started, 1, "retried when due: {pass:?}");
    until("the retry", || s.sim.sim.stats().refresh_ok == 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wave_starts_no_more_per_pass_than_the_provider_allows_in_a_second() {
    let s = setup(2).await;
    for i in 0..5 {
        authorize(&s, &format!("a{i}"), Duration::from_secs(50 * 60)).await;
    }
    let pass = s.engine.tick().await.unwrap();
    assert_eq!(
        pass,
        Pass {
            started: 2,
            next_due_in: Some(Duration::ZERO),
            deferred: true,
            in_flight: true,
            reconcile_in: None,
        }
    );
    until("the first two refreshes", || {
        s.sim.sim.stats().refresh_ok == 2
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_processs_write_is_read_once_an_interval_and_only_then() {
    let s = setup(25).await;
    authorize(&s, "default", Duration::ZERO).await;
    // The first pass reads every row once.
    let pass = s.engine.tick().await.unwrap();
    assert_eq!(pass.reconcile_in, None);

    // Another process parks the connection for a day.
    let mut other = s.other_process().await;
    let later = (s.clock.now() + chrono::Duration::days(1)).timestamp_millis();
    sqlx::query("UPDATE connections SET state = 'retrying', next_attempt_at = ?, last_error = 'x'")
        .bind(later)
        .execute(&mut other)
        .await
        .unwrap();
    other.close().await.unwrap();

    // Seen at once, read once the interval since the last read is over.
    let pass = s.engine.tick().await.unwrap();
    assert_eq!(pass.reconcile_in, Some(INTERVAL));
    assert_eq!(state(&s, "default"), ConnState::Active);
    s.clock.advance(INTERVAL);
    let pass = s.engine.tick().await.unwrap();
    assert_eq!(pass.reconcile_in, None);
    assert_eq!(state(&s, "default"), ConnState::Retrying);
    assert_eq!(secs(pass.next_due_in), Some(86400 - INTERVAL.as_secs()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_grant_due_now_wakes_a_scheduler_that_would_sleep_an_interval() {
    let s = setup(25).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(tokenkeeper::refresh::scheduler::run(
        s.engine.clone(),
        stop.clone(),
    ));
    // Nothing to do: the scheduler sleeps its 30 s interval.
    tokio::time::sleep(Duration::from_millis(300)).await;
    authorize(&s, "default", Duration::from_secs(50 * 60)).await;
    until("the woken scheduler's refresh", || {
        s.sim.sim.stats().refresh_ok == 1
    })
    .await;
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the scheduler stops with its token")
        .unwrap();
}

// ---------------------------------------------------------------------------
// the real daemon

/// `check_interval` is only the cap: a grant that falls due two seconds
/// after it was stored is refreshed then, not before and not an hour later.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_daemon_refreshes_a_new_grant_when_due_not_at_the_next_interval() {
    let mut h = common::Harness::new(common::Options {
        access_lifetime: Duration::from_secs(4),
        refresh:
            "at_fraction = 0.5\nmin_validity = \"1s\"\ncheck_interval = \"1h\"\njitter = \"0s\""
                .into(),
        ..common::Options::default()
    })
    .await;
    h.start().await;
    let before = std::time::Instant::now();
    let r = h.authorize("keap", "default").await;
    let after = std::time::Instant::now();
    assert_eq!(r.status(), 200, "authorization succeeds");
    // No token request: only the scheduler can refresh it.
    common::eventually(Duration::from_secs(20), "a scheduled refresh", || async {
        h.sim.sim.stats().refresh_ok >= 1
    })
    .await;
    // The code exchange left between `before` and `after`; its token lives
    // 3.6 s as counted (4 s less a tenth), so it falls due half-way, 1.8 s
    // after it left. Not before that (less a few ms of rounding), and near
    // it: the margin after is generous for a busy machine, and still far
    // from the next interval (an hour).
    let refreshed = h.sim.sim.token_call_times()[0];
    let due = Duration::from_millis(1800);
    assert!(
        refreshed >= before + due - Duration::from_millis(20),
        "refreshed {:?} after the authorization started, before it was due ({due:?})",
        refreshed - before
    );
    assert!(
        refreshed <= after + due + Duration::from_secs(10),
        "refreshed {:?} after the authorization ended, long after it was due ({due:?})",
        refreshed.saturating_duration_since(after)
    );
    common::eventually(Duration::from_secs(20), "state active", || async {
        h.connection("default").await["state"] == "active"
    })
    .await;
    h.stop().await;
}
