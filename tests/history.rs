//! SPEC 13, history: the real daemon against the simulator records each
//! lifecycle step of a connection (authorized, refreshed with its
//! duration, rotated, failures with their class, authorization required,
//! bearer misuse, revoked), with no secret in any field, in the same
//! transaction as the change (a commit that fails records nothing until
//! the grant lands), pages them newest first, prunes them after
//! `storage.history`, and shows them with `tokenkeeper log`.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Harness, Options};
use serde_json::Value;
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions, Connection, Row};
use tokenkeeper::dev::Fault;

const EVENTS: &str = "/v1/connections/keap/default/events";

/// The kinds of a page, in the order given.
fn kinds(page: &Value) -> Vec<String> {
    page["events"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| e["kind"].as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

async fn events(h: &Harness, query: &str) -> (u16, Value) {
    h.get_json(&format!("{EVENTS}{query}")).await
}

/// Every field of every stored event, as text, read on a connection of our
/// own: what must hold no token.
async fn stored_events_text(db: &Path) -> String {
    let mut c = SqliteConnectOptions::new()
        .filename(db)
        .read_only(true)
        .connect()
        .await
        .expect("open the database");
    let rows = sqlx::query(
        "SELECT provider, account, at, kind, COALESCE(detail, ''), COALESCE(duration_ms, -1) FROM events",
    )
    .fetch_all(&mut c)
    .await
    .expect("read the events");
    let _ = c.close().await;
    rows.iter()
        .map(|r| {
            format!(
                "{} {} {} {} {} {}\n",
                r.get::<String, _>(0),
                r.get::<String, _>(1),
                r.get::<i64, _>(2),
                r.get::<String, _>(3),
                r.get::<String, _>(4),
                r.get::<i64, _>(5)
            )
        })
        .collect()
}

/// Tokens that live an hour, and a failure retried only minutes later, so
/// that nothing but the test's own requests calls the provider.
fn quiet() -> Options {
    Options {
        refresh: "retry_initial = \"5m\"\nretry_max = \"10m\"".into(),
        ..Options::lifetime(Duration::from_secs(3600))
    }
}

/// Sets `storage.history` in the harness's config.
fn set_history(h: &Harness, history: &str) {
    let text = std::fs::read_to_string(&h.config_path).unwrap();
    std::fs::write(
        &h.config_path,
        text.replacen(
            "[storage]\n",
            &format!("[storage]\nhistory = \"{history}\"\n"),
            1,
        ),
    )
    .unwrap();
}

/// Authorize, a forced refresh that rotates, a transient failure, a
/// rejected refresh token, a refresh token sent as a bearer token, and a
/// revocation: each recorded, newest first, with the refresh's duration
/// and the failures' class, and the history still readable by name once
/// the connection is forgotten.
async fn walk_through_the_lifecycle(h: &Harness) {
    h.authorize_default().await;
    let (s, b) = h.force_refresh().await;
    assert_eq!(s, 200, "{b}");
    h.sim.sim.push_fault(Fault::Status(503));
    let (s, b) = h.force_refresh().await;
    assert_ne!(s, 200, "{b}");
    h.sim.sim.push_fault(Fault::RejectRefresh);
    let (s, b) = h.force_refresh().await;
    assert_ne!(s, 200, "{b}");
    h.assert_connection("default", "authorization_required", "")
        .await;
    let refresh = h.sim.sim.current_refresh_token().expect("a live grant");
    let r = h.get_bearer("/v1/token/keap", &refresh).await;
    assert_eq!(r.status(), 401);
    common::eventually(
        Duration::from_secs(10),
        "the misuse is recorded",
        || async {
            kinds(&events(h, "").await.1).first().map(String::as_str) == Some("bearer_misuse")
        },
    )
    .await;
    let r = h.delete("/v1/connections/keap/default").await;
    assert_eq!(r.status(), 204);

    let (s, page) = events(h, "").await;
    assert_eq!(
        s, 200,
        "a forgotten connection's history stays readable: {page}"
    );
    assert_eq!(
        kinds(&page),
        [
            "revoked",
            "bearer_misuse",
            "authorization_required",
            "refresh_failed",
            "refresh_failed",
            "rotated",
            "refreshed",
            "authorized"
        ],
        "{page}"
    );
    let list = page["events"].as_array().unwrap();
    let ids: Vec<i64> = list.iter().map(|e| e["id"].as_i64().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] > w[1]), "newest first: {ids:?}");
    let refreshed = &list[6];
    assert!(
        refreshed["duration_ms"].as_i64().is_some_and(|d| d >= 0),
        "{refreshed}"
    );
    assert!(list[7]["duration_ms"].is_null(), "{page}");
    let detail = |i: usize| list[i]["detail"].as_str().unwrap_or_default().to_owned();
    assert!(detail(4).starts_with("transient: "), "{page}");
    assert!(detail(3).starts_with("rejected: "), "{page}");
    assert!(detail(2).contains("authorize again"), "{page}");
    for e in list {
        assert_eq!(
            (e["provider"].as_str(), e["account"].as_str()),
            (Some("keap"), Some("default"))
        );
        assert!(e["at"].as_str().is_some_and(|t| t.ends_with('Z')), "{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_lifecycle_step_is_recorded_newest_first_without_a_secret() {
    let h = Harness::started(quiet()).await;
    walk_through_the_lifecycle(&h).await;

    let text = stored_events_text(&h.db_path()).await;
    assert!(text.lines().count() >= 8, "{text}");
    let tokens = h.issued_tokens();
    assert!(tokens.len() >= 4, "{tokens:?}");
    for t in tokens
        .iter()
        .map(String::as_str)
        .chain([common::CLIENT_SECRET])
    {
        assert!(!text.contains(t), "a secret in the events table:\n{text}");
    }
    let (_, page) = events(&h, "?limit=1000").await;
    let served = page.to_string();
    for t in &tokens {
        assert!(!served.contains(t.as_str()), "{served}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_page_by_limit_and_before_and_unknown_connections_are_404() {
    let h = Harness::started(quiet()).await;
    h.authorize_default().await;
    for _ in 0..3 {
        let (s, b) = h.force_refresh().await;
        assert_eq!(s, 200, "{b}");
    }
    // authorized + 3 × (refreshed, rotated)
    let (s, all) = events(&h, "").await;
    assert_eq!(s, 200, "{all}");
    let all = all["events"].as_array().unwrap().clone();
    assert_eq!(all.len(), 7, "{all:?}");

    let (s, first) = events(&h, "?limit=3").await;
    assert_eq!(s, 200);
    let first = first["events"].as_array().unwrap().clone();
    assert_eq!(first, all[..3]);
    let last_id = first[2]["id"].as_i64().unwrap();
    let (_, second) = events(&h, &format!("?limit=3&before={last_id}")).await;
    assert_eq!(second["events"].as_array().unwrap()[..], all[3..6]);
    let (_, rest) = events(&h, &format!("?before={}", all[5]["id"])).await;
    assert_eq!(kinds(&rest), ["authorized"]);
    // Past the end of a known connection: an empty page.
    let (s, end) = events(&h, &format!("?before={}", all[6]["id"])).await;
    assert_eq!((s, kinds(&end).len()), (200, 0), "{end}");
    // By time: nothing happened before the authorization.
    let authorized_at = all[6]["at"].as_str().unwrap();
    let (_, none) = events(&h, &format!("?before={authorized_at}")).await;
    assert_eq!(kinds(&none).len(), 0, "{none}");
    let (_, after) = events(&h, &format!("?after={}", all[1]["id"])).await;
    assert_eq!(after["events"].as_array().unwrap()[..], all[..1]);

    for bad in [
        "?limit=0",
        "?limit=1001",
        "?limit=x",
        "?before=yesterday",
        "?after=x",
    ] {
        let (s, b) = events(&h, bad).await;
        assert_eq!(s, 400, "{bad}: {b}");
        let word = bad[1..].split('=').next().unwrap();
        assert!(b["message"].as_str().unwrap().contains(word), "{b}");
    }
    let (s, b) = h.get_json("/v1/connections/keap/nobody/events").await;
    assert_eq!(s, 404, "{b}");
    assert_eq!(b["error"], "unknown_connection", "{b}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tokenkeeper_log_prints_the_history_oldest_first_and_as_json() {
    let h = Harness::started(quiet()).await;
    h.authorize_default().await;
    let (s, b) = h.force_refresh().await;
    assert_eq!(s, 200, "{b}");

    let out = h.cli(&["log", "keap"]).await;
    common::assert_success(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(lines[0].contains("keap/default  authorized"), "{text}");
    assert!(
        lines[1].contains("refreshed") && lines[1].ends_with(" ms"),
        "{text}"
    );
    assert!(lines[2].contains("rotated"), "{text}");

    let out = h
        .cli(&["log", "keap", "default", "--json", "--limit", "2"])
        .await;
    common::assert_success(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    let kinds: Vec<String> = text
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).expect("one JSON object per line");
            v["kind"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(kinds, ["refreshed", "rotated"], "{text}");

    let out = h.cli(&["log", "keap", "nobody"]).await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nobody"),
        "{out:?}"
    );
}

/// `tokenkeeper log keap --follow` started, its first line (the
/// authorization) read; returns the child and its remaining lines.
async fn follow_log(
    h: &Harness,
) -> (
    tokio::process::Child,
    tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
) {
    let mut child = tokio::process::Command::new(common::BIN)
        .args(["log", "keap", "--follow", "--config"])
        .arg(&h.config_path)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let first = lines.next_line().await.unwrap().unwrap();
    assert!(first.contains("authorized"), "{first}");
    (child, lines)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tokenkeeper_log_follow_shows_new_events_and_ends_with_its_reader() {
    let h = Harness::started(quiet()).await;
    h.authorize_default().await;
    let (mut child, mut lines) = follow_log(&h).await;
    let (s, b) = h.force_refresh().await;
    assert_eq!(s, 200, "{b}");
    let next = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .expect("the new event is shown")
        .unwrap()
        .unwrap();
    assert!(next.contains("refreshed"), "{next}");
    // The reader goes away: the next line written ends it cleanly.
    drop(lines);
    let (s, b) = h.force_refresh().await;
    assert_eq!(s, 200, "{b}");
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("log --follow ends once its reader is gone")
        .unwrap();
    assert_eq!(status.code(), Some(0), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_older_than_storage_history_are_purged() {
    let mut h = Harness::new(quiet()).await;
    set_history(&h, "2s");
    h.start().await;
    h.authorize_default().await;
    let (s, page) = events(&h, "").await;
    assert_eq!((s, kinds(&page)), (200, vec!["authorized".to_owned()]));
    common::eventually(Duration::from_secs(20), "the event is purged", || async {
        let (s, page) = events(&h, "").await;
        s == 200 && kinds(&page).is_empty()
    })
    .await;
    assert!(stored_events_text(&h.db_path()).await.is_empty());
}

#[tokio::test]
async fn a_zero_history_is_refused_naming_the_key() {
    // Zero, and one beyond the range of instants (it used to panic the
    // purge task at the first purge).
    for value in ["0s", "100000000d"] {
        let h = Harness::new(Options::default()).await;
        set_history(&h, value);
        let out = h.cli(&["check-config"]).await;
        assert_eq!(out.status.code(), Some(2), "{value}: {out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("storage.history"),
            "{value}: {out:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refresh_whose_commit_fails_is_recorded_only_when_its_grant_lands() {
    let h = Harness::started(quiet()).await;
    h.authorize_default().await;
    let sim = h.sim.sim.clone();
    // Another writer holds the database past the store's busy timeout: the
    // commit of the rotated pair fails, and the grant is held in memory.
    let (forced, mut lock) =
        common::forced_refresh_under_a_write_lock(&h, Duration::from_millis(700)).await;
    let (s, b) = forced.await.unwrap();
    assert_eq!(s, 503, "{b}");
    assert_eq!(sim.stats().refresh_ok, 1, "the provider rotated");
    let (s, page) = events(&h, "").await;
    assert_eq!(s, 200, "{page}");
    assert!(
        !kinds(&page)
            .iter()
            .any(|k| k == "refreshed" || k == "rotated"),
        "no refresh recorded before its grant is stored: {page}"
    );
    sqlx::query("ROLLBACK").execute(&mut lock).await.unwrap();
    let _ = lock.close().await;
    common::eventually(Duration::from_secs(30), "the held grant lands", || async {
        kinds(&events(&h, "").await.1)
            .iter()
            .any(|k| k == "refreshed")
    })
    .await;
    let (_, page) = events(&h, "").await;
    let k = kinds(&page);
    assert_eq!(k.iter().filter(|k| *k == "refreshed").count(), 1, "{page}");
    assert_eq!(k.iter().filter(|k| *k == "rotated").count(), 1, "{page}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_history_is_kept_on_postgres() {
    let Some(url) = common::postgres::fresh_database("history").await else {
        return;
    };
    let mut h = Harness::new(quiet()).await;
    common::postgres::use_postgres(&h.config_path, &url);
    h.start().await;
    walk_through_the_lifecycle(&h).await;
}

fn proc_value(path: &str) -> String {
    std::fs::read_to_string(path).unwrap().trim().to_string()
}

/// A pid that certainly does not exist now: a child that has been reaped.
fn gone_pid() -> u32 {
    let mut c = std::process::Command::new("true").spawn().unwrap();
    let pid = c.id();
    c.wait().unwrap();
    pid
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refresh_whose_holder_died_is_recorded_as_interrupted() {
    use std::os::unix::fs::MetadataExt;
    let mut h = Harness::started(quiet()).await;
    h.authorize_default().await;
    h.stop().await;
    // Our host, boot and PID namespace, and a pid that does not exist: a
    // holder that certainly died mid-refresh.
    let owner = format!(
        "tk2;host={};boot={};pidns={};pid={};start=1;nonce=00000001",
        proc_value("/proc/sys/kernel/hostname"),
        proc_value("/proc/sys/kernel/random/boot_id"),
        std::fs::metadata("/proc/self/ns/pid").unwrap().ino(),
        gone_pid()
    );
    let now = chrono::Utc::now().timestamp_millis();
    let mut c = SqliteConnectOptions::new()
        .filename(h.db_path())
        .connect()
        .await
        .unwrap();
    sqlx::query(&format!(
        "UPDATE connections SET lease_owner = '{owner}', lease_until = {}, attempt_id = 'feedfacecafebeef', \
         attempt_started_at = {now}, state = 'refreshing' WHERE provider = 'keap'",
        now + 3_600_000
    ))
    .execute(&mut c)
    .await
    .unwrap();
    let _ = c.close().await;
    h.start().await;
    common::eventually(Duration::from_secs(10), "the retry is recorded", || async {
        kinds(&events(&h, "").await.1).first().map(String::as_str) == Some("rotated")
    })
    .await;
    let (_, page) = events(&h, "").await;
    assert_eq!(
        kinds(&page),
        ["rotated", "refreshed", "interrupted", "authorized"],
        "{page}"
    );
    let detail = page["events"][2]["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("interrupted before its result was stored"),
        "{page}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn migrate_storage_copies_the_history() {
    let mut h = Harness::started(quiet()).await;
    h.authorize_default().await;
    let (s, b) = h.force_refresh().await;
    assert_eq!(s, 200, "{b}");
    h.stop().await;
    let target = h.dir.path().join("copy.db");
    let out = h
        .cli(&["migrate-storage", "--to", target.to_str().unwrap()])
        .await;
    common::assert_success(&out);
    let copied = stored_events_text(&target).await;
    assert_eq!(copied, stored_events_text(&h.db_path()).await);
    assert_eq!(copied.lines().count(), 3, "{copied}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tokenkeeper_log_follow_ends_cleanly_on_ctrl_c() {
    let h = Harness::started(quiet()).await;
    h.authorize_default().await;
    let (mut child, _lines) = follow_log(&h).await;
    let pid = child.id().expect("running") as i32;
    // SAFETY: kill(2) on a pid we spawned and have not reaped yet.
    unsafe {
        libc::kill(pid, libc::SIGINT);
    }
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("log --follow ends on Ctrl-C")
        .unwrap();
    assert_eq!(status.code(), Some(0), "{status:?}");
}

/// A program sending a refresh token as a bearer token in a loop: every
/// request is refused and counted, but reported (history event, log line)
/// once a minute per grant, so it cannot flood the table or the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bearer_misuse_loop_is_counted_each_time_and_recorded_once() {
    let h = Harness::started(quiet()).await;
    h.authorize_default().await;
    let refresh = h.sim.sim.current_refresh_token().expect("a live grant");
    for _ in 0..20 {
        let r = h.get_bearer("/v1/token/keap", &refresh).await;
        assert_eq!(r.status(), 401);
    }
    let metrics = h.get_text("/metrics").await;
    assert!(
        metrics.contains("tokenkeeper_bearer_misuse_total 20"),
        "{metrics}"
    );
    common::eventually(
        Duration::from_secs(10),
        "the misuse is recorded",
        || async { kinds(&events(&h, "").await.1).contains(&"bearer_misuse".to_string()) },
    )
    .await;
    // Give stray background recordings time to land before counting.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let recorded = kinds(&events(&h, "").await.1)
        .iter()
        .filter(|k| *k == "bearer_misuse")
        .count();
    assert_eq!(recorded, 1, "one event for the whole loop");
    assert_eq!(
        h.log()
            .lines()
            .filter(|l| l.contains("tokenkeeper::security") && l.contains("bearer_misuse"))
            .count(),
        1,
        "one security log line"
    );
}
