//! Issue 12 item 21 (and the forgetting half of 14b) at the engine's own
//! interface, with a simulated clock: the engine against the simulator and a
//! real SQLite file, time moved by hand.

mod common;

use std::time::Duration;

use common::engine::EngineSetup;
use secrecy::ExposeSecret;
use sqlx::Connection;
use tokenkeeper::provider::TokenGrant;
use tokenkeeper::refresh::clock::Clock;
use tokenkeeper::refresh::Revocation;
use tokenkeeper::store::ConnState;

const SECRET: &str = "clock-test-secret";

type Setup = EngineSetup;

async fn setup() -> Setup {
    EngineSetup::start(SECRET, |cfg| {
        cfg.providers.get_mut("demo").unwrap().request_timeout = Duration::from_secs(1);
    })
    .await
}

/// A browser authorization against the simulator, stored through the
/// engine, its lifetime counted on the test clock.
async fn authorize(s: &Setup) -> TokenGrant {
    s.authorize("default", Duration::ZERO).await
}

fn fresh(s: &Setup) -> Option<String> {
    s.engine
        .with_fresh_token("demo", "default", s.clock.now(), |t| {
            t.access_token.to_string()
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wall_clock_set_back_does_not_keep_a_dead_token_alive() {
    let s = setup().await;
    let grant = authorize(&s).await;
    assert_eq!(
        fresh(&s).as_deref(),
        Some(grant.access_token.expose_secret())
    );
    // An hour and a minute pass; meanwhile the wall clock is set back two
    // hours. By the wall clock the token has an hour and more left; it is
    // in fact expired.
    s.clock.advance(Duration::from_secs(61 * 60));
    s.clock.jump_wall(-chrono::Duration::hours(2));
    assert_eq!(fresh(&s), None, "a dead token is served as fresh");
    let t = s.engine.token("demo", "default").await.unwrap();
    assert_ne!(
        t.access_token.expose_secret(),
        grant.access_token.expose_secret()
    );
    assert_eq!(s.sim.sim.stats().refresh_ok, 1, "it was refreshed instead");
    assert_eq!(s.engine.report()[0].state, ConnState::Active);
}

/// `expires_in` tells a client how long it may keep the token: after the
/// wall clock was set back, the instant both serving paths hand the HTTP
/// layer (`ServedToken::at`, `token_answer`'s) is the engine's anchored
/// time, or the answer rendered at it would promise the client the 30
/// minutes the clock went back. (The handlers render at that instant; the
/// test clock cannot reach them, so this checks the engine's side.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_hands_out_expires_in_from_its_anchored_clock() {
    let s = setup().await;
    authorize(&s).await;
    s.clock.advance(Duration::from_secs(10 * 60));
    s.clock.jump_wall(-chrono::Duration::minutes(30));
    let expires_in = |body: Vec<u8>| -> i64 {
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        v["expires_in"].as_i64().unwrap()
    };
    let fast = s
        .engine
        .with_fresh_token("demo", "default", s.clock.now(), |t| {
            expires_in(t.answer.body_at(t.at))
        })
        .expect("still fresh");
    let (answer, at) = s.engine.token_answer("demo", "default").await.unwrap();
    let slow = expires_in(answer.body_at(at));
    for (path, left) in [("fast lane", fast), ("full path", slow)] {
        assert!(
            (49 * 60..=50 * 60).contains(&left),
            "{path}: expires_in {left} s, 50 minutes are left"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scheduler_refreshes_on_time_after_the_wall_clock_was_set_back() {
    let s = setup().await;
    authorize(&s).await;
    // 50 minutes pass (due at 45: three quarters of the hour), and the wall
    // clock is set back two hours: by the wall clock the token was issued
    // in the future.
    s.clock.advance(Duration::from_secs(50 * 60));
    s.clock.jump_wall(-chrono::Duration::hours(2));
    s.engine.tick().await.unwrap();
    for _ in 0..100 {
        if s.sim.sim.stats().refresh_ok == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        s.sim.sim.stats().refresh_ok,
        1,
        "the due refresh did not run"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wall_clock_set_forward_does_not_make_a_live_lease_look_lapsed() {
    let s = setup().await;
    authorize(&s).await;
    // Another daemon, on another host, holds the lease for 30 s more.
    let until = (s.clock.now() + chrono::Duration::seconds(30)).timestamp_millis();
    let holder = "tk2;host=elsewhere;boot=-;pidns=-;pid=7;start=-;nonce=00000001";
    let mut c = s.other_process().await;
    sqlx::query(
        "UPDATE connections SET lease_owner = ?, lease_until = ?, attempt_id = 'other', attempt_started_at = ?",
    )
    .bind(holder)
    .bind(until)
    .bind(until - 30_000)
    .execute(&mut c)
    .await
    .unwrap();

    // Our wall clock jumps an hour ahead: by wall clocks the lease lapsed
    // long ago, but no time passed and the holder may be renewing it.
    s.clock.jump_wall(chrono::Duration::hours(1));
    assert!(s.engine.force_refresh("demo", "default").await.is_err());
    assert_eq!(
        s.sim.sim.stats().refresh_calls,
        0,
        "a live lease was taken over"
    );
    assert_eq!(lease_owner(&mut c).await.as_deref(), Some(holder));

    // It stands still for a whole lease on our monotonic clock: now it is
    // lapsed, and the refresh takes it over. (The wall clock is set right
    // again first: the provider module dates new tokens by the system clock.)
    s.clock.jump_wall(-chrono::Duration::hours(1));
    s.clock.advance(Duration::from_secs(31));
    let t = s.engine.force_refresh("demo", "default").await.unwrap();
    assert_eq!(s.sim.sim.stats().refresh_ok, 1);
    assert!(s.sim.sim.access_token_valid(t.access_token.expose_secret()));
    assert_eq!(lease_owner(&mut c).await, None);
    let _ = c.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forgotten_grant_is_no_longer_recognised() {
    let s = setup().await;
    let grant = authorize(&s).await;
    let refresh = grant.refresh_token.unwrap();
    assert!(s
        .engine
        .refuse_refresh_token_as_bearer(refresh.expose_secret()));
    assert!(s
        .engine
        .forget("demo", "default", Revocation::LocalOnly)
        .await
        .unwrap());
    assert!(
        !s.engine
            .refuse_refresh_token_as_bearer(refresh.expose_secret()),
        "the recognizer still holds a forgotten grant's token"
    );
}

async fn lease_owner(c: &mut sqlx::SqliteConnection) -> Option<String> {
    sqlx::query_scalar("SELECT lease_owner FROM connections")
        .fetch_one(c)
        .await
        .unwrap()
}

/// Each failure class the provider module names ends in the state SPEC 7
/// gives it, with the backoff its class allows, on the test clock; only a
/// rejection ends the grant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_failure_class_leaves_the_state_it_names() {
    use tokenkeeper::dev::{AnswerShape, Fault};
    let s = setup().await;
    authorize(&s).await;
    let refresh = s.engine.settings().refresh.clone();
    let report = |s: &Setup| s.engine.report().remove(0);

    // Transient (a 503): retrying, backing off at least retry_initial.
    s.sim.sim.push_fault(Fault::Status(503));
    assert!(s.engine.force_refresh("demo", "default").await.is_err());
    let r = report(&s);
    assert_eq!(r.state, ConnState::Retrying);
    // (Stored instants are whole milliseconds.)
    let wait = r.next_refresh_at.unwrap() - s.clock.now() + chrono::Duration::milliseconds(1);
    assert!(wait >= chrono::Duration::from_std(refresh.retry_initial).unwrap());
    assert!(wait <= chrono::Duration::from_std(refresh.retry_max).unwrap());

    // Refused (a configuration problem): retrying, never longer than a
    // quarter of an hour, the provider's words kept.
    s.sim.sim.push_fault(Fault::OAuthError {
        status: 401,
        error: "invalid_client".into(),
        description: None,
    });
    assert!(s.engine.force_refresh("demo", "default").await.is_err());
    let r = report(&s);
    assert_eq!(r.state, ConnState::Retrying);
    assert!(r.last_error.unwrap().contains("invalid_client"));
    let wait = r.next_refresh_at.unwrap() - s.clock.now();
    assert!(
        wait <= chrono::Duration::minutes(15)
            .max(chrono::Duration::from_std(refresh.retry_initial).unwrap())
    );

    // Unusable (a 2xx without an access token, with a new refresh token):
    // retrying, and the refresh token it carried is the one used next.
    s.sim.sim.set_answer_shape(Some(AnswerShape::NoAccessToken));
    assert!(s.engine.force_refresh("demo", "default").await.is_err());
    s.sim.sim.set_answer_shape(None);
    assert_eq!(report(&s).state, ConnState::Retrying);
    s.engine.force_refresh("demo", "default").await.unwrap();
    assert_eq!(report(&s).state, ConnState::Active);
    assert_eq!(report(&s).last_error, None);
    assert_eq!(
        s.sim.sim.stats().refresh_reuse,
        0,
        "the stored token was spent"
    );

    // Rejected: the grant needs a new authorization.
    s.sim.sim.push_fault(Fault::RejectRefresh);
    assert!(s.engine.force_refresh("demo", "default").await.is_err());
    let r = report(&s);
    assert_eq!(r.state, ConnState::AuthorizationRequired);
    assert_eq!(r.next_refresh_at, None);
}

/// Counts heap allocations made by the current thread while asked to, so
/// the token fast lane can be shown to make none.
struct CountingAlloc;

thread_local! {
    static COUNTING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    static ALLOCATIONS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

fn note_allocation() {
    let _ = COUNTING.try_with(|on| {
        if on.get() {
            let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        }
    });
}

// SAFETY: every call is passed on to the system allocator unchanged.
unsafe impl std::alloc::GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        note_allocation();
        unsafe { std::alloc::System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        note_allocation();
        unsafe { std::alloc::System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, size: usize) -> *mut u8 {
        note_allocation();
        unsafe { std::alloc::System.realloc(ptr, layout, size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAlloc = CountingAlloc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_fast_lane_does_not_allocate() {
    let s = setup().await;
    let grant = authorize(&s).await;
    let serve = |s: &Setup| {
        s.engine
            .with_fresh_token("demo", "default", s.clock.now(), |t| {
                t.access_token.len() + t.extra.len()
            })
    };
    // The first call on a thread sizes its lookup-key buffer.
    assert!(serve(&s).is_some());
    COUNTING.with(|on| on.set(true));
    let served = serve(&s);
    COUNTING.with(|on| on.set(false));
    let n = ALLOCATIONS.with(|n| n.get());
    assert_eq!(served, Some(grant.access_token.expose_secret().len()));
    assert_eq!(n, 0, "the fast lane allocated {n} times");
    // What it served is this grant's answer (read outside the counted call:
    // the body is copied out).
    let body = s
        .engine
        .with_fresh_token("demo", "default", s.clock.now(), |t| {
            t.answer.body_at(s.clock.now())
        })
        .expect("served");
    let body = String::from_utf8_lossy(&body).into_owned();
    assert!(
        body.contains(grant.access_token.expose_secret()),
        "the grant's token"
    );
    assert!(
        body.contains(&format!("\"token_type\":\"{}\"", grant.token_type))
            && body.contains("\"provider\":\"demo\""),
        "the grant's answer: {body}"
    );
}

/// A grant that failed transiently is retried by the scheduler only once
/// its backoff has run out, measured on the test clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scheduler_waits_out_a_retrying_grants_backoff() {
    let s = setup().await;
    authorize(&s).await;
    s.sim.sim.push_fault(tokenkeeper::dev::Fault::Status(503));
    assert!(s.engine.force_refresh("demo", "default").await.is_err());
    let r = s.engine.report().remove(0);
    assert_eq!(r.state, ConnState::Retrying);
    let next = r.next_refresh_at.unwrap();
    assert_eq!(s.sim.sim.stats().refresh_calls, 1);

    // Not yet: the backoff has not run out (a refresh, if one were wrongly
    // started, would reach the simulator well within this wait).
    s.engine.tick().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(s.sim.sim.stats().refresh_calls, 1, "retried during backoff");

    // Once it has, the next pass retries and the grant is active again.
    s.clock
        .advance((next - s.clock.now()).to_std().unwrap() + Duration::from_secs(1));
    s.engine.tick().await.unwrap();
    for _ in 0..100 {
        if s.engine.report()[0].state == ConnState::Active {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(s.engine.report()[0].state, ConnState::Active);
    assert_eq!(s.sim.sim.stats().refresh_ok, 1);
}

/// SPEC 9 at the engine: while the database cannot be reached no refresh
/// starts (it could not be committed): a token about to expire is still
/// served as it is, and once none is valid callers get `refresh_failed`
/// with a time to come back; when the database answers again the next
/// caller gets a refreshed token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_a_database_outage_no_refresh_starts_and_the_held_token_is_served_while_valid() {
    let s = setup().await;
    let grant = authorize(&s).await;
    let feed = s.engine.store().feed().clone();
    assert!(feed.lost(&"connection refused (test)"));
    // Two minutes left: below min_validity, so a refresh would be due.
    s.clock.advance(Duration::from_secs(58 * 60));
    let t = s.engine.token("demo", "default").await.unwrap();
    assert_eq!(
        t.access_token.expose_secret(),
        grant.access_token.expose_secret()
    );
    assert_eq!(s.sim.sim.stats().refresh_calls, 0, "no refresh started");
    // Expired: nothing valid is left.
    s.clock.advance(Duration::from_secs(3 * 60));
    match s.engine.token("demo", "default").await {
        Err(tokenkeeper::refresh::TokenError::RefreshFailed {
            retry_after,
            still_valid_until,
            ..
        }) => {
            assert!(retry_after >= Duration::from_secs(1));
            assert!(still_valid_until.is_none());
        }
        other => panic!("expected refresh_failed, got {:?}", other.map(|_| ())),
    }
    assert_eq!(s.sim.sim.stats().refresh_calls, 0, "no refresh started");
    // Back: the next caller refreshes. (What it is then served depends on
    // the simulator's wall-clock lifetime, an hour behind the test clock.)
    assert!(feed.back());
    let _ = s.engine.token("demo", "default").await;
    assert_eq!(s.sim.sim.stats().refresh_ok, 1, "refreshing resumed");
}
