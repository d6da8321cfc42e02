//! Refresh-token lifetimes (SPEC 11) through the real daemon: where the
//! end comes from (the token answer, else `refresh_token_lifetime` /
//! `refresh_token_max_lifetime` on the provider, else the preset), that a
//! rolling one is kept alive by refreshing in time, that `/v1/connections`,
//! `status` and `/metrics` show it, and that `refresh_token_expiring` is
//! sent once ahead of an end refreshing cannot push back.

mod common;

use std::time::Duration;

use chrono::{DateTime, Utc};
use common::{eventually, Harness, Options};

/// `refresh_token_expires_at` of `keap/default`, as `/v1/connections` says.
async fn refresh_token_end(h: &Harness) -> Option<DateTime<Utc>> {
    let c = h.connection("default").await;
    let v = &c["refresh_token_expires_at"];
    assert!(v.is_null() || v.is_string(), "RFC 3339 or null: {c}");
    v.as_str()
        .map(|s| DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc))
}

/// Whether `end` is `days` from now, give or take an hour.
fn days_ahead(end: Option<DateTime<Utc>>, days: i64) -> bool {
    end.is_some_and(|e| {
        (e - Utc::now() - chrono::Duration::days(days))
            .num_seconds()
            .abs()
            < 3600
    })
}

fn answering(member: &str, secs: u64) -> Options {
    let mut o = Options::default();
    o.sim.quirks.token_extras = vec![(member.into(), serde_json::json!(secs))];
    o
}

#[tokio::test]
async fn the_preset_lifetime_applies_when_nothing_else_says() {
    // Keap: 45 days, rolling.
    let h = Harness::authorized(Options::default()).await;
    let end = refresh_token_end(&h).await;
    assert!(days_ahead(end, 45), "{end:?}");
}

#[tokio::test]
async fn the_configured_lifetime_replaces_the_presets() {
    let h = Harness::authorized(Options {
        provider: "refresh_token_lifetime = \"10d\"".into(),
        ..Options::default()
    })
    .await;
    let end = refresh_token_end(&h).await;
    assert!(days_ahead(end, 10), "{end:?}");
}

#[tokio::test]
async fn the_answer_wins_over_preset_and_config() {
    for member in ["refresh_token_expires_in", "x_refresh_token_expires_in"] {
        let h = Harness::authorized(Options {
            provider: "refresh_token_lifetime = \"10d\"".into(),
            ..answering(member, 20 * 86_400)
        })
        .await;
        let end = refresh_token_end(&h).await;
        assert!(days_ahead(end, 20), "{member}: {end:?}");
    }
}

#[tokio::test]
async fn a_zero_lifetime_in_the_config_overrides_the_preset_and_states_no_end() {
    let h = Harness::authorized(Options {
        provider: "refresh_token_lifetime = \"0s\"".into(),
        ..Options::default()
    })
    .await;
    assert_eq!(refresh_token_end(&h).await, None);
    let metrics = h.get_text("/metrics").await;
    assert!(
        !metrics.contains("tokenkeeper_refresh_token_expiry_seconds{"),
        "no series for an unknown end"
    );
}

#[tokio::test]
async fn a_rolling_refresh_token_shorter_than_the_access_token_is_kept_alive() {
    // Access tokens live a day; the refresh token dies 6 s after its last
    // use unless used again. Only refreshing before then keeps the grant.
    let h = Harness::authorized(answering("refresh_token_expires_in", 6)).await;
    eventually(
        Duration::from_secs(60),
        "two scheduled refreshes long before the access token's own",
        || async { h.sim.sim.stats().refresh_ok >= 2 },
    )
    .await;
    // Refreshing every few seconds, the connection is seen mid-refresh at
    // times: it must be seen active between refreshes, never parked.
    eventually(
        Duration::from_secs(30),
        "the connection active between refreshes",
        || async {
            let c = h.connection("default").await;
            assert_ne!(c["state"], "authorization_required", "{c}");
            c["state"] == "active"
        },
    )
    .await;
    let end = refresh_token_end(&h).await.expect("an end");
    // Kept alive: the end still lies ahead, and no refresh was refused.
    assert!(end > Utc::now(), "{end}");
    let stats = h.sim.sim.stats();
    assert_eq!(stats.refresh_rejected, 0);
    assert_eq!(stats.refresh_expired, 0);
}

#[tokio::test]
async fn status_and_metrics_show_the_refresh_token_end() {
    let h = Harness::authorized(Options::default()).await;
    let out = h.cli(&["status"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("REFRESH TOKEN ENDS"), "{text}");
    let json = h.cli(&["status", "--json"]).await;
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap_or_default();
    let listed = v["connections"][0]["refresh_token_expires_at"]
        .as_str()
        .or_else(|| v[0]["refresh_token_expires_at"].as_str());
    assert!(listed.is_some(), "{v}");
    let metrics = h.get_text("/metrics").await;
    let line = metrics
        .lines()
        .find(|l| {
            l.starts_with(
                "tokenkeeper_refresh_token_expiry_seconds{provider=\"keap\",account=\"default\"}",
            )
        })
        .unwrap_or_else(|| panic!("a gauge per connection:\n{metrics}"));
    let secs: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(
        (44.0 * 86_400.0..=45.0 * 86_400.0).contains(&secs),
        "{line}"
    );
}

/// A notify command appending `EVENT|PROVIDER|ACCOUNT|MESSAGE` lines to a
/// file; returns the `[notify]` table and the file.
fn notify_to_file(h: &Harness) -> (String, std::path::PathBuf) {
    let out = h.dir.path().join("events.txt");
    let script = h.dir.path().join("notify.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$TOKENKEEPER_EVENT|$TOKENKEEPER_PROVIDER|$TOKENKEEPER_ACCOUNT|$TOKENKEEPER_MESSAGE\" >> {}\n",
            out.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    (
        format!("\n[notify]\ncommand = \"{}\"\n", script.display()),
        out,
    )
}

fn expiring_lines(file: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("refresh_token_expiring|"))
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn a_hard_cap_within_warn_before_is_notified_once() {
    let mut h = Harness::new(Options {
        refresh: "warn_before = \"60d\"".into(),
        ..Options::default()
    })
    .await;
    let (notify, file) = notify_to_file(&h);
    h.write_config(
        "",
        "warn_before = \"60d\"",
        &format!("refresh_token_max_lifetime = \"30d\"\n{notify}"),
    );
    h.start().await;
    h.authorize_default().await;
    let end = refresh_token_end(&h).await;
    assert!(days_ahead(end, 30), "the cap is the end: {end:?}");
    eventually(
        Duration::from_secs(30),
        "refresh_token_expiring sent",
        || async { !expiring_lines(&file).is_empty() },
    )
    .await;
    // Several scheduler passes (check_interval 1s) and a refresh later,
    // still one: the end did not move.
    let (status, _) = h.force_refresh().await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let lines = expiring_lines(&file);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].starts_with("refresh_token_expiring|keap|default|")
            && lines[0].contains("authorize again"),
        "{lines:?}"
    );
    assert!(
        days_ahead(refresh_token_end(&h).await, 30),
        "a refresh does not move a cap"
    );
}

#[tokio::test]
async fn a_rolling_end_the_daemon_keeps_alive_is_not_notified() {
    // Access tokens of 4 s: the scheduler refreshes each at half its life,
    // so passes that looked at the connection provably happened.
    let mut h = Harness::new(Options::lifetime(Duration::from_secs(4))).await;
    let (notify, file) = notify_to_file(&h);
    // Keap's 45 days rolling, warned 60 days ahead: but refreshing pushes
    // it back, so nothing is sent.
    h.write_config("", "warn_before = \"60d\"", &notify);
    h.start().await;
    h.authorize_default().await;
    // Nobody asks for a token: these refreshes are the scheduler's, and
    // each pass that found one due first checked the end against
    // warn_before.
    eventually(
        Duration::from_secs(30),
        "two scheduled refreshes",
        || async { h.sim.sim.stats().refresh_calls >= 2 },
    )
    .await;
    assert!(
        expiring_lines(&file).is_empty(),
        "{:?}",
        expiring_lines(&file)
    );
    let log = h.log();
    assert!(!log.contains("the refresh token ends at"), "{log}");
}

#[tokio::test]
async fn a_rolling_end_is_notified_once_refreshes_fail() {
    // Rolling, a day long, warned two days ahead: quiet while refreshing
    // works, told once refreshes fail and the end stops moving.
    let mut h = Harness::new(answering("refresh_token_expires_in", 86_400)).await;
    let (notify, file) = notify_to_file(&h);
    h.write_config("", "warn_before = \"2d\"", &notify);
    h.start().await;
    h.authorize_default().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        expiring_lines(&file).is_empty(),
        "{:?}",
        expiring_lines(&file)
    );
    h.sim
        .sim
        .set_fault(Some(tokenkeeper::dev::Fault::Status(503)));
    let (status, _) = h.force_refresh().await;
    assert_ne!(status, 200);
    eventually(
        Duration::from_secs(30),
        "refresh_token_expiring sent while failing",
        || async { !expiring_lines(&file).is_empty() },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let lines = expiring_lines(&file);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("failing"), "{lines:?}");
}

/// A provider that enforces an idle lifetime (the simulator, like Keap's
/// 45 days, here 2 s): a refresh token left unused past it is refused,
/// and the daemon, told nothing about it, loses the grant.
#[tokio::test]
async fn a_refresh_token_left_unused_past_the_providers_idle_lifetime_is_refused() {
    let mut o = Options::default();
    o.sim.quirks.refresh_token_idle = Some(Duration::from_secs(2));
    let h = Harness::authorized(o).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (status, v) = h.post_json("/v1/token/keap/refresh").await;
    assert_eq!(status, 409, "{v}");
    assert_eq!(v["error"], "authorization_required", "{v}");
    assert_eq!(h.sim.sim.stats().refresh_expired, 1);
}

/// The same provider, and the daemon told the lifetime (conservatively,
/// 4 s of the provider's 8): it refreshes in time, so the grant outlives
/// several idle lifetimes though the access token lives a day.
#[tokio::test]
async fn a_rolling_lifetime_the_provider_enforces_is_kept_alive() {
    let mut o = Options::default();
    o.sim.quirks.refresh_token_idle = Some(Duration::from_secs(8));
    o.provider = "refresh_token_lifetime = \"4s\"".into();
    let h = Harness::authorized(o).await;
    eventually(
        Duration::from_secs(60),
        "refreshes past one idle lifetime of the provider",
        || async { h.sim.sim.stats().refresh_ok >= 3 },
    )
    .await;
    let stats = h.sim.sim.stats();
    assert_eq!(stats.refresh_expired, 0, "{stats:?}");
    assert_eq!(stats.refresh_rejected, 0, "{stats:?}");
    let (s, b) = h.token().await;
    assert_eq!(s, 200, "{b}");
    let (status, v) = h.post_json("/v1/token/keap/refresh").await;
    assert_eq!(status, 200, "{v}");
}

/// A hard cap (Intuit's five years, here 5 s) ends the grant however
/// recently its refresh token was issued: refreshing does not push it back.
#[tokio::test]
async fn a_capped_grant_is_refused_at_its_end_however_fresh_its_refresh_token() {
    let mut o = Options::default();
    o.sim.quirks.refresh_token_max = Some(Duration::from_secs(5));
    let h = Harness::authorized(o).await;
    let (status, v) = h.post_json("/v1/token/keap/refresh").await;
    assert_eq!(status, 200, "{v}");
    tokio::time::sleep(Duration::from_millis(5500)).await;
    let (status, v) = h.post_json("/v1/token/keap/refresh").await;
    assert_eq!(status, 409, "{v}");
    assert_eq!(h.sim.sim.stats().refresh_expired, 1);
}
