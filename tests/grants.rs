//! Issue 12, "grants must survive": the real daemon against the simulator
//! under the faults that lost grants or leaked them: a commit that fails
//! after the provider rotated, a re-authorization racing a refresh, lease
//! holders in another PID namespace, revocation during a refresh, a failed
//! upstream revocation, replaced grants, and tokens rotated by another
//! process.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Harness, Options};
use reqwest::header::COOKIE;
use serde_json::Value;
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions, Connection, Row};
use tokenkeeper::dev::{DelayPhase, Fault};

/// The stored refresh token of keap/default, read on a connection of our own.
async fn stored_refresh_token(db: &Path) -> Option<String> {
    let mut c = SqliteConnectOptions::new()
        .filename(db)
        .read_only(true)
        .connect()
        .await
        .expect("open the database");
    let r = sqlx::query(
        "SELECT refresh_token FROM connections WHERE provider = 'keap' AND account = 'default'",
    )
    .fetch_optional(&mut c)
    .await
    .expect("read the row");
    let _ = c.close().await;
    r.and_then(|r| r.get(0))
}

async fn write_db(db: &Path, sql: &str) {
    let mut c = SqliteConnectOptions::new()
        .filename(db)
        .connect()
        .await
        .expect("open the database");
    sqlx::query(sql).execute(&mut c).await.expect(sql);
    let _ = c.close().await;
}

/// An authorized connection with a forced refresh in the air: the provider
/// has rotated (a second refresh token exists) but not answered yet. With
/// strict revocation, as providers that know a grant only by its current
/// token: revoking a rotated-out token leaves the new one alive.
async fn refresh_in_the_air() -> (
    Harness,
    tokenkeeper::dev::Simulator,
    tokio::task::JoinHandle<(u16, Value)>,
) {
    let h = Harness::authorized(Options::lifetime(Duration::from_secs(3600))).await;
    let sim = h.sim.sim.clone();
    sim.set_strict_revocation(true);
    sim.set_token_delay(Duration::from_millis(1500), DelayPhase::AfterRotation);
    let flight = h.spawn_post("/v1/token/keap/refresh");
    common::eventually(Duration::from_secs(5), "the provider rotated", || async {
        sim.refresh_tokens_issued().len() == 2
    })
    .await;
    (h, sim, flight)
}

async fn delete(h: &Harness, query: &str) -> (u16, Value) {
    let r = h
        .delete(&format!("/v1/connections/keap/default{query}"))
        .await;
    let s = r.status().as_u16();
    (s, r.json::<Value>().await.unwrap_or(Value::Null))
}

// ---------------------------------------------------------------------------
// Item 1: a failed commit after the provider rotated

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_grant_whose_commit_fails_is_held_in_memory_until_it_lands() {
    let h = Harness::started(Options::lifetime(Duration::from_secs(3600))).await;
    let token0 = h.authorize_default().await;
    let sim = h.sim.sim.clone();

    let (forced, mut lock) =
        common::forced_refresh_under_a_write_lock(&h, Duration::from_millis(700)).await;
    let (s, b) = forced.await.unwrap();
    assert_eq!(sim.stats().refresh_ok, 1, "the provider rotated");
    assert_eq!(s, 503, "the forced refresh is not stored yet: {b}");
    let message = b["message"].as_str().unwrap_or_default();
    assert!(message.contains("held in memory"), "{b}");
    assert!(
        !message.contains("no valid access token is left"),
        "the old token is still served: {b}"
    );

    // While it is held: visible in status, metrics; the stored access token
    // (still valid by its expiry) keeps being served.
    h.assert_connection("default", "retrying", "held in memory and not yet stored")
        .await;
    let metrics = h.get_text("/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("tokenkeeper_uncommitted_grants") && l.ends_with(" 1")),
        "{metrics}"
    );
    let (s, b) = h.token().await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["access_token"], token0.as_str());
    assert!(
        h.log().contains("storing it failed"),
        "logged at error level"
    );

    // Storage comes back: the held grant lands without another provider call.
    sqlx::query("ROLLBACK").execute(&mut lock).await.unwrap();
    drop(lock);
    let db = h.db_path();
    common::eventually(
        Duration::from_secs(30),
        "the held grant is stored",
        || async {
            stored_refresh_token(&db).await.is_some()
                && stored_refresh_token(&db).await == sim.current_refresh_token()
        },
    )
    .await;
    common::eventually(
        Duration::from_secs(5),
        "the connection is active again",
        || async { h.connection("default").await["state"] == "active" },
    )
    .await;
    assert_eq!(
        sim.stats().refresh_calls,
        1,
        "landing it needed no new refresh"
    );
    let (s, b) = h.token().await;
    assert_eq!(s, 200, "{b}");
    assert_ne!(
        b["access_token"],
        token0.as_str(),
        "the new token is served now"
    );

    // The next refresh sends the rotated refresh token: no invalid_grant.
    sim.set_token_delay(Duration::ZERO, DelayPhase::BeforeProcessing);
    let (s, b) = h.force_refresh().await;
    assert_eq!(s, 200, "{b}");
    let stats = sim.stats();
    assert_eq!(stats.refresh_ok, 2, "{stats:?}");
    common::assert_no_reuse_or_rejection(&stats);
    assert!(sim.access_token_valid(b["access_token"].as_str().unwrap()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_held_grant_is_served_once_the_stored_access_token_has_expired() {
    // The stored access token lives 6 s; the new one an hour.
    let h = Harness::started(Options::lifetime(Duration::from_secs(6))).await;
    let token0 = h.authorize_default().await;
    let sim = h.sim.sim.clone();
    sim.set_access_lifetime(Duration::from_secs(3600));
    let (forced, mut lock) =
        common::forced_refresh_under_a_write_lock(&h, Duration::from_millis(500)).await;
    // The commit fails after the busy timeout, by when token0 has expired:
    // the new token is served from memory, and the log says why.
    let (s, b) = forced.await.unwrap();
    assert_eq!(s, 200, "{b}");
    let held = b["access_token"].as_str().unwrap().to_string();
    assert_ne!(held, token0);
    assert!(sim.access_token_valid(&held));
    let (s, b) = h.token().await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["access_token"], held.as_str());
    assert!(h.log().contains("serving the access token held in memory"));
    assert_eq!(h.connection("default").await["state"], "retrying");

    sqlx::query("ROLLBACK").execute(&mut lock).await.unwrap();
    drop(lock);
    let db = h.db_path();
    common::eventually(
        Duration::from_secs(30),
        "the held grant is stored",
        || async { stored_refresh_token(&db).await == sim.current_refresh_token() },
    )
    .await;
    sim.set_token_delay(Duration::ZERO, DelayPhase::BeforeProcessing);
    h.assert_refresh_keeps_the_grant().await;
}

// ---------------------------------------------------------------------------
// Item 3: a re-authorization racing an in-flight refresh

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reauthorization_wins_over_a_refresh_that_started_before_it() {
    // A revocation below can only come from the discarded late result.
    let (h, sim, late) = refresh_in_the_air().await;
    // The delay was read when the refresh arrived; the browser is quick.
    sim.set_token_delay(Duration::ZERO, DelayPhase::AfterRotation);
    h.authorize_default().await;
    let newest = sim.current_refresh_token().expect("the new grant is live");
    let _ = late.await.unwrap();

    assert_eq!(
        stored_refresh_token(&h.db_path()).await.as_deref(),
        Some(newest.as_str()),
        "the newer authorization is what is stored"
    );
    let (s, b) = h.token().await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        b["access_token"].as_str(),
        sim.access_tokens_issued().last().map(String::as_str),
        "the newer authorization's token is served"
    );
    common::eventually(
        Duration::from_secs(5),
        "the late result's refresh token is revoked upstream",
        || async { sim.live_grants() == 1 },
    )
    .await;
    assert_eq!(
        sim.current_refresh_token().as_deref(),
        Some(newest.as_str())
    );
    assert!(h.log().contains("its result is discarded"));
}

// ---------------------------------------------------------------------------
// Item 4: lease takeover only when the holder is really gone

fn proc_value(path: &str) -> String {
    std::fs::read_to_string(path).unwrap().trim().to_string()
}

fn pid_ns() -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self/ns/pid").unwrap().ino()
}

/// A pid that certainly does not exist now: a child that has been reaped.
fn gone_pid() -> u32 {
    let mut c = std::process::Command::new("true").spawn().unwrap();
    let pid = c.id();
    c.wait().unwrap();
    pid
}

/// Stops the daemon, hands the connection's lease to `owner` (with a
/// deadline `until_offset_ms` from now), and starts it again.
async fn hand_lease_to(h: &mut Harness, owner: &str, until_offset_ms: i64) {
    h.stop().await;
    let now = chrono::Utc::now().timestamp_millis();
    write_db(
        &h.db_path(),
        &format!(
            "UPDATE connections SET lease_owner = '{owner}', lease_until = {}, attempt_id = 'feedfacecafebeef', \
             attempt_started_at = {now}, state = 'refreshing' WHERE provider = 'keap'",
            now + until_offset_ms
        ),
    )
    .await;
    h.start().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_holder_in_another_pid_namespace_is_not_taken_over_before_its_lease_lapses() {
    let mut h = Harness::authorized(Options {
        access_lifetime: Duration::from_secs(3600),
        provider: "request_timeout = \"2s\"".into(),
        ..Options::default()
    })
    .await;
    // Same host and boot, another PID namespace, a pid we cannot see: it
    // may be alive there. Its stored deadline has passed by our wall clock,
    // which proves nothing either.
    let owner = format!(
        "tk2;host={};boot={};pidns={};pid={};start=1;nonce=00000001",
        proc_value("/proc/sys/kernel/hostname"),
        proc_value("/proc/sys/kernel/random/boot_id"),
        pid_ns() + 1,
        gone_pid()
    );
    hand_lease_to(&mut h, &owner, -60_000).await;
    let (s, b) = h.force_refresh().await;
    assert_ne!(s, 200, "no refresh while another live holder may run: {b}");
    // A few scheduler ticks later, still untouched.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        h.sim.sim.stats().refresh_calls,
        0,
        "the lease was taken over"
    );
    let mut c = SqliteConnectOptions::new()
        .filename(h.db_path())
        .read_only(true)
        .connect()
        .await
        .unwrap();
    let holder: Option<String> =
        sqlx::query_scalar("SELECT lease_owner FROM connections WHERE provider = 'keap'")
            .fetch_one(&mut c)
            .await
            .unwrap();
    assert_eq!(holder.as_deref(), Some(owner.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_holder_certainly_dead_is_taken_over_at_once() {
    let mut h = Harness::authorized(Options::lifetime(Duration::from_secs(3600))).await;
    // Our host, boot and PID namespace, and the pid does not exist: dead,
    // though its stored deadline is an hour away.
    let owner = format!(
        "tk2;host={};boot={};pidns={};pid={};start=1;nonce=00000001",
        proc_value("/proc/sys/kernel/hostname"),
        proc_value("/proc/sys/kernel/random/boot_id"),
        pid_ns(),
        gone_pid()
    );
    hand_lease_to(&mut h, &owner, 3_600_000).await;
    // Its interrupted refresh is reported and retried at start.
    let sim = h.sim.sim.clone();
    common::eventually(
        Duration::from_secs(5),
        "the interrupted refresh is retried at once",
        || async { sim.stats().refresh_ok >= 1 },
    )
    .await;
    assert!(h.log().contains("interrupted"), "the takeover is reported");
    h.assert_refresh_keeps_the_grant().await;
}

// ---------------------------------------------------------------------------
// Item 18: revoking during a refresh

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn revoking_during_a_refresh_revokes_the_newest_token() {
    let (h, sim, flight) = refresh_in_the_air().await;
    let (s, b) = delete(&h, "").await;
    assert_eq!(s, 204, "{b}");
    let _ = flight.await.unwrap();
    assert_eq!(sim.live_grants(), 0, "a grant is still live upstream");
    assert_eq!(sim.stats().revocations, 1);
    let (s, _) = h.token().await;
    assert_eq!(s, 404, "the grant is forgotten");
    assert_eq!(stored_refresh_token(&h.db_path()).await, None);
}

// ---------------------------------------------------------------------------
// Item 19: a failed upstream revocation keeps the grant

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_upstream_revocation_keeps_the_grant_unless_local_is_asked() {
    let h = Harness::started(Options::lifetime(Duration::from_secs(3600))).await;
    let token0 = h.authorize_default().await;
    let sim = h.sim.sim.clone();
    sim.set_revoke_fault(Some(503));

    let (s, b) = delete(&h, "").await;
    assert_eq!(s, 502, "{b}");
    assert_eq!(b["error"], "revocation_failed", "{b}");
    let message = b["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("temporarily_unavailable"),
        "the provider's error: {b}"
    );
    assert!(
        message.contains("--local"),
        "says how to forget anyway: {b}"
    );
    let (s, b) = h.token().await;
    assert_eq!(s, 200, "the grant is kept: {b}");
    assert_eq!(b["access_token"], token0.as_str());
    assert_eq!(h.connection("default").await["state"], "active");

    let out = h.cli(&["revoke", "keap", "--local"]).await;
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("not revoked"));
    let (s, _) = h.token().await;
    assert_eq!(s, 404, "forgotten locally");
    assert_eq!(sim.live_grants(), 1, "and not revoked upstream");

    // The CLI without --local reports the failure and exits 1.
    h.authorize_default().await;
    let out = h.cli(&["revoke", "keap"]).await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("temporarily_unavailable"));
    sim.set_revoke_fault(None);
    let (s, b) = delete(&h, "?local=false").await;
    assert_eq!(s, 204, "{b}");
    assert_eq!(
        sim.live_grants(),
        1,
        "only the locally forgotten grant is left"
    );
}

// ---------------------------------------------------------------------------
// Item 26: a replaced grant is revoked; a failed forced refresh tells the truth

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_browser_flows_for_one_account_leave_one_live_grant() {
    let h = Harness::started(Options::default()).await;
    let sim = h.sim.sim.clone();
    sim.set_strict_revocation(true);
    let (first, cookie1) = h.start_connect("keap", "default").await;
    let (second, cookie2) = h.start_connect("keap", "default").await;
    let cb1 = h.approve(&first).await;
    let cb2 = h.approve(&second).await;
    for (cb, cookie) in [(cb1, cookie1), (cb2, cookie2)] {
        let r = h.http.get(cb).header(COOKIE, cookie).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    common::eventually(
        Duration::from_secs(5),
        "the replaced grant is revoked",
        || async { sim.live_grants() == 1 },
    )
    .await;
    assert_eq!(
        stored_refresh_token(&h.db_path()).await,
        sim.current_refresh_token(),
        "the live one is the stored one"
    );
}

/// `revoke_replaced = false` (providers where revoking one refresh token
/// ends the whole authorization, which would kill the new grant too): the
/// replaced grant is left alone, and the log says so.
#[tokio::test]
async fn revoke_replaced_false_leaves_the_replaced_grant_alone() {
    let h = Harness::started(Options {
        provider: "revoke_replaced = false".into(),
        ..Options::default()
    })
    .await;
    let sim = h.sim.sim.clone();
    sim.set_strict_revocation(true);
    assert_eq!(h.authorize("keap", "default").await.status(), 200);
    assert_eq!(h.authorize("keap", "default").await.status(), 200);
    common::eventually(
        Duration::from_secs(5),
        "the log says the replaced grant is not revoked",
        || async { h.log().contains("revoke_replaced = false") },
    )
    .await;
    assert_eq!(sim.live_grants(), 2, "nothing was revoked");
    assert_eq!(
        stored_refresh_token(&h.db_path()).await,
        sim.current_refresh_token(),
        "the newest grant is the stored one"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_forced_refresh_says_the_current_token_is_still_served() {
    let h = Harness::started(Options::lifetime(Duration::from_secs(3600))).await;
    let token0 = h.authorize_default().await;
    h.sim.sim.set_fault(Some(Fault::Status(503)));
    let (s, b) = h.force_refresh().await;
    assert_eq!(s, 503, "{b}");
    let message = b["message"].as_str().unwrap_or_default();
    assert!(!message.contains("no valid access token is left"), "{b}");
    assert!(message.contains("still served"), "{b}");
    let (s, b) = h.token().await;
    assert_eq!(s, 200);
    assert_eq!(b["access_token"], token0.as_str());
}

// ---------------------------------------------------------------------------
// Item 14b: tokens rotated by another process are recognised

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refresh_tokens_rotated_by_another_process_are_recognised() {
    let h = Harness::authorized(Options::lifetime(Duration::from_secs(3600))).await;

    let port2 = common::free_port();
    let text = std::fs::read_to_string(&h.config_path).unwrap();
    let listen1 = format!("listen = \"127.0.0.1:{}\"", h.port);
    let config2 = h.dir.path().join("tokenkeeper-2.toml");
    std::fs::write(
        &config2,
        text.replace(&listen1, &format!("listen = \"127.0.0.1:{port2}\"")),
    )
    .unwrap();
    let mut second = common::spawn_daemon(&config2, &h.dir.path().join("d2.log"), &h.rust_log, &[]);
    let url2 = format!("http://127.0.0.1:{port2}");
    common::wait_healthy(&h.http, &format!("{url2}/healthz"), &mut second).await;
    let r = h
        .http
        .post(format!("{url2}/v1/token/keap/refresh"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let rotated = h.sim.sim.current_refresh_token().unwrap();

    let inspect = |token: String| {
        let http = h.http.clone();
        let url = h.url("/v1/inspect");
        async move {
            let v: Value = http
                .post(url)
                .body(token)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            v["kind"].as_str().unwrap_or_default().to_string()
        }
    };
    common::eventually(
        Duration::from_secs(10),
        "the first daemon learns the refresh token the second one stored",
        || {
            let kind = inspect(rotated.clone());
            async move { kind.await == "refresh_token" }
        },
    )
    .await;
    let _ = second.kill();
    let _ = second.wait();
}

/// `lease_owner` and `lease_until` of keap/default.
async fn lease(db: &Path) -> (Option<String>, Option<i64>) {
    let mut c = SqliteConnectOptions::new()
        .filename(db)
        .read_only(true)
        .connect()
        .await
        .expect("open the database");
    let r =
        sqlx::query("SELECT lease_owner, lease_until FROM connections WHERE account = 'default'")
            .fetch_one(&mut c)
            .await
            .expect("read the row");
    let _ = c.close().await;
    (r.get(0), r.get(1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn while_a_grant_is_held_its_lease_is_kept_alive() {
    let h = Harness::authorized(Options::lifetime(Duration::from_secs(3600))).await;
    let sim = h.sim.sim.clone();
    let db = h.db_path();
    // Storing a new grant fails (as a full disk would), while lease
    // bookkeeping still works: only writes of the tokens are refused.
    write_db(
        &db,
        "CREATE TRIGGER no_grant_writes BEFORE UPDATE OF access_token ON connections \
         BEGIN SELECT RAISE(ABORT, 'injected: the disk is full'); END",
    )
    .await;
    let (s, b) = h.force_refresh().await;
    assert_eq!(sim.stats().refresh_ok, 1, "the provider rotated");
    assert_eq!(s, 503, "{b}");
    let (owner, until) = lease(&db).await;
    assert!(owner.is_some(), "the lease of the held grant is still ours");
    // Another process takes a lease over once it stands still for 30 s; it
    // must keep moving while the grant waits to be stored.
    common::eventually(
        Duration::from_secs(20),
        "the held grant's lease is renewed",
        || async {
            let (o, u) = lease(&db).await;
            o == owner && u > until
        },
    )
    .await;
    assert!(h
        .log()
        .contains("storing the grant held in memory failed again"));

    write_db(&db, "DROP TRIGGER no_grant_writes").await;
    common::eventually(
        Duration::from_secs(30),
        "the held grant is stored and the lease released",
        || async {
            stored_refresh_token(&db).await == sim.current_refresh_token()
                && lease(&db).await.0.is_none()
        },
    )
    .await;
    let stats = sim.stats();
    assert_eq!(stats.refresh_calls, 1, "{stats:?}");
    assert_eq!(stats.refresh_rejected, 0, "{stats:?}");
}
