//! The device authorization grant (RFC 8628, SPEC 10): `tokenkeeper
//! connect --device` and the dashboard's device page, black-box: the real
//! binary, the real daemon polling the simulator's device endpoint.

mod common;

use std::process::{Output, Stdio};
use std::time::Duration;

use common::*;
use tokenkeeper::dev::{AnswerShape, DeviceFault, Fault};

/// A daemon whose `keap` provider has the simulator's device endpoint;
/// the simulator answers `interval = 1`.
async fn device_harness() -> Harness {
    let mut h = Harness::new(Options::default()).await;
    let provider = format!(
        "device_authorization_url = \"{}\"",
        h.sim.url("/device/code")
    );
    h.write_config("", "", &provider);
    h.sim.sim.set_device_timing(1, Duration::from_secs(600));
    h.start().await;
    h
}

/// `connect keap [account] --device` in the air.
fn spawn_device(h: &Harness, account: &str) -> tokio::process::Child {
    tokio::process::Command::new(BIN)
        .args(["connect", "keap", account, "--device", "--config"])
        .arg(&h.config_path)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// The user code the command's flow is waiting on, once the simulator
/// issued it.
async fn user_code(h: &Harness) -> String {
    eventually(
        Duration::from_secs(30),
        "a device code is issued",
        || async { !h.sim.sim.pending_user_codes().is_empty() },
    )
    .await;
    h.sim.sim.pending_user_codes().remove(0)
}

async fn finish(child: tokio::process::Child) -> Output {
    tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("the command ends")
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Nothing stored: no connection, and `/v1/token` knows none.
async fn assert_nothing_stored(h: &Harness) {
    let (s, b) = h.get_json("/v1/connections").await;
    assert_eq!(s, 200);
    assert_eq!(b["connections"].as_array().map(Vec::len), Some(0), "{b}");
    let (s, b) = h.token().await;
    assert_eq!(s, 404, "{b}");
}

#[tokio::test]
async fn device_code_connects_and_stores_a_working_grant() {
    let h = device_harness().await;
    let child = spawn_device(&h, "default");
    let code = user_code(&h).await;
    assert!(h.sim.sim.approve_device(&code));
    let out = finish(child).await;
    assert_success(&out);
    let stdout = text(&out.stdout);
    assert!(stdout.contains(&code), "the user code is printed: {stdout}");
    assert!(
        stdout.contains(&h.sim.url("/device")),
        "the verification URI is printed: {stdout}"
    );
    assert!(
        stdout.contains(&format!("/device?user_code={code}")),
        "the complete URI is printed: {stdout}"
    );
    assert!(stdout.contains("authorized keap/default"), "{stdout}");
    let (s, b) = h.token().await;
    assert_eq!(s, 200, "{b}");
    let token = b["access_token"].as_str().unwrap();
    assert!(h.sim.sim.access_token_valid(token));
    // The stored grant renews like any other.
    h.assert_refresh_keeps_the_grant().await;
    let stats = h.sim.sim.stats();
    assert_eq!(stats.device_polls_too_fast, 0, "{stats:?}");
    assert!(stats.device_polls >= 1, "{stats:?}");
    let log = h.log();
    for secret in h.sim.sim.device_codes_issued() {
        assert!(!log.contains(&secret), "the device code is never logged");
    }
    assert!(
        log.contains("authorized with a device code"),
        "the daemon logs the landing"
    );
}

#[tokio::test]
async fn a_device_grant_is_notified_as_authorized_with_a_device_code() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("events.txt");
    let script = dir.path().join("notify.sh");
    write_script(
        &script,
        format!(
            "#!/bin/sh\necho \"$TOKENKEEPER_EVENT|$TOKENKEEPER_MESSAGE\" >> {}\n",
            out.display()
        ),
    );
    let mut h = Harness::new(Options::default()).await;
    let provider = format!(
        "device_authorization_url = \"{}\"\n\n[notify]\ncommand = \"{}\"\n",
        h.sim.url("/device/code"),
        script.display()
    );
    h.write_config("", "", &provider);
    h.sim.sim.set_device_timing(1, Duration::from_secs(600));
    h.start().await;
    let child = spawn_device(&h, "default");
    let code = user_code(&h).await;
    assert!(h.sim.sim.approve_device(&code));
    assert_success(&finish(child).await);
    let notified = || std::fs::read_to_string(&out).unwrap_or_default();
    eventually(
        Duration::from_secs(10),
        "the authorized notification",
        || async { notified().lines().any(|l| l.starts_with("authorized|")) },
    )
    .await;
    let notified = notified();
    assert!(
        notified.contains("authorized|authorized with a device code"),
        "{notified}"
    );
    let log = h.log();
    assert!(
        !notified.contains("browser") && !log.contains("in the browser"),
        "{notified}\n{log}"
    );
}

#[tokio::test]
async fn the_device_code_never_leaves_the_daemon() {
    let h = device_harness().await;
    let (s, b) = h.post_json("/v1/connections/keap/default/device").await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["state"], "pending");
    assert!(b.get("device_code").is_none(), "{b}");
    let id = b["flow_id"].as_str().unwrap().to_string();
    let code = b["user_code"].as_str().unwrap().to_string();
    assert!(h.sim.sim.approve_device(&code));
    let (s, b) = h
        .get_json(&format!("/v1/connections/keap/default/device/{id}?wait=20"))
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["state"], "authorized", "{b}");
    assert_eq!(b["refresh_token"], true, "{b}");
    // Another account's path does not reach the flow.
    let (s, _) = h
        .get_json(&format!("/v1/connections/keap/other/device/{id}"))
        .await;
    assert_eq!(s, 404);
    let (s, b) = h.token().await;
    assert_eq!(s, 200, "{b}");
}

#[tokio::test]
async fn a_discovered_device_endpoint_is_used() {
    let mut h = Harness::new(Options::default()).await;
    let issuer = format!("issuer = \"{}\"", h.sim.base_url);
    h.write_config("", "", &issuer);
    h.sim.sim.set_device_timing(1, Duration::from_secs(600));
    h.start().await;
    let child = spawn_device(&h, "default");
    let code = user_code(&h).await;
    assert!(h.sim.sim.approve_device(&code));
    assert_success(&finish(child).await);
    assert_eq!(h.token().await.0, 200);
}

#[tokio::test]
async fn slow_down_stretches_the_polling_interval() {
    let h = device_harness().await;
    h.sim.sim.slow_down_next(1);
    let child = spawn_device(&h, "default");
    let code = user_code(&h).await;
    eventually(Duration::from_secs(30), "the first poll", || async {
        !h.sim.sim.device_polls().is_empty()
    })
    .await;
    assert!(h.sim.sim.approve_device(&code));
    let out = finish(child).await;
    assert_success(&out);
    let polls = h.sim.sim.device_polls();
    assert!(polls.len() >= 2, "{polls:?}");
    // Loosely: the first poll waited the 1 s interval, the one after the
    // slow_down 1 + 5 s.
    assert!(polls[0] >= Duration::from_millis(900), "{polls:?}");
    assert!(
        polls[1] - polls[0] >= Duration::from_millis(5400),
        "slow_down added 5 s: {polls:?}"
    );
    assert_eq!(h.sim.sim.stats().device_polls_too_fast, 0);
    assert_eq!(h.token().await.0, 200);
}

#[tokio::test]
async fn an_expired_code_ends_with_a_sentence_and_stores_nothing() {
    let h = device_harness().await;
    let child = spawn_device(&h, "default");
    user_code(&h).await;
    h.sim.sim.expire_device_codes();
    let out = finish(child).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("expired"), "{err}");
    assert!(err.contains("nothing was stored"), "{err}");
    assert!(err.contains("connect keap default --device"), "{err}");
    assert_nothing_stored(&h).await;
}

#[tokio::test]
async fn a_code_the_provider_lets_lapse_ends_at_its_expiry() {
    let h = device_harness().await;
    h.sim.sim.set_device_timing(1, Duration::from_secs(2));
    let out = finish(spawn_device(&h, "default")).await;
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("expired"), "{err}");
    assert_nothing_stored(&h).await;
}

#[tokio::test]
async fn a_denied_code_ends_with_a_sentence_and_stores_nothing() {
    let h = device_harness().await;
    let child = spawn_device(&h, "default");
    let code = user_code(&h).await;
    assert!(h.sim.sim.deny_device(&code));
    let out = finish(child).await;
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("denied"), "{err}");
    assert!(err.contains("nothing was stored"), "{err}");
    assert_nothing_stored(&h).await;
}

#[tokio::test]
async fn a_refused_poll_ends_with_a_sentence_and_stores_nothing() {
    let h = device_harness().await;
    let child = spawn_device(&h, "default");
    user_code(&h).await;
    h.sim.sim.push_fault(Fault::OAuthError {
        status: 401,
        error: "invalid_client".into(),
        description: None,
    });
    let out = finish(child).await;
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("invalid_client"), "{err}");
    assert!(err.contains("nothing was stored"), "{err}");
    assert_nothing_stored(&h).await;
}

#[tokio::test]
async fn a_transient_poll_failure_is_polled_through() {
    let h = device_harness().await;
    let child = spawn_device(&h, "default");
    let code = user_code(&h).await;
    h.sim.sim.push_fault(Fault::Status(503));
    assert!(h.sim.sim.approve_device(&code));
    assert_success(&finish(child).await);
    assert_eq!(h.token().await.0, 200);
}

#[tokio::test]
async fn an_unusable_answer_keeps_its_refresh_token() {
    let h = device_harness().await;
    let child = spawn_device(&h, "default");
    let code = user_code(&h).await;
    h.sim.sim.set_answer_shape(Some(AnswerShape::NoAccessToken));
    assert!(h.sim.sim.approve_device(&code));
    assert_success(&finish(child).await);
    h.sim.sim.set_answer_shape(None);
    // The redeemed code's refresh token is the grant: a refresh with it
    // (the scheduler's, or the first request's) yields a working token.
    eventually(Duration::from_secs(30), "a working token", || async {
        let (s, b) = h.token().await;
        s == 200
            && b["access_token"]
                .as_str()
                .is_some_and(|t| h.sim.sim.access_token_valid(t))
    })
    .await;
    let stats = h.sim.sim.stats();
    assert!(stats.refresh_ok >= 1, "{stats:?}");
    assert_eq!(stats.refresh_reuse, 0, "{stats:?}");
    assert_eq!(stats.refresh_rejected, 0, "{stats:?}");
}

#[tokio::test]
async fn a_provider_without_device_endpoint_names_the_key() {
    let h = Harness::started(Options::default()).await;
    let out = h.cli(&["connect", "keap", "--device"]).await;
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("device_authorization_url"), "{err}");
    assert!(err.contains("[providers.keap]"), "{err}");
    assert_eq!(h.sim.sim.stats().device_authorizations, 0);
    assert_nothing_stored(&h).await;
}

#[tokio::test]
async fn garbage_from_the_device_endpoint_is_a_sentence() {
    let h = device_harness().await;
    for (fault, said) in [
        (DeviceFault::NotJson, "not a JSON object"),
        (DeviceFault::Missing("device_code".into()), "no device_code"),
        (DeviceFault::Missing("user_code".into()), "no user_code"),
        (
            DeviceFault::Missing("verification_uri".into()),
            "no verification_uri",
        ),
        (DeviceFault::Status(500), "HTTP 500"),
        (
            DeviceFault::OAuthError("unauthorized_client".into()),
            "unauthorized_client",
        ),
    ] {
        h.sim.sim.set_device_fault(Some(fault.clone()));
        let out = h.cli(&["connect", "keap", "--device"]).await;
        assert_eq!(out.status.code(), Some(1), "{fault:?}");
        let err = text(&out.stderr);
        assert!(err.contains(said), "{fault:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one sentence: {err}");
        assert!(out.stdout.is_empty(), "no code printed for {fault:?}");
    }
    assert_nothing_stored(&h).await;
}

#[tokio::test]
async fn an_unreachable_device_endpoint_is_a_sentence() {
    let mut h = Harness::new(Options::default()).await;
    let closed = format!(
        "device_authorization_url = \"http://127.0.0.1:{}/device/code\"",
        free_port()
    );
    h.write_config("", "", &closed);
    h.start().await;
    let out = h.cli(&["connect", "keap", "--device"]).await;
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("cannot reach the device authorization endpoint"),
        "{err}"
    );
    assert_nothing_stored(&h).await;
}

#[tokio::test]
async fn ctrl_c_cancels_the_daemons_polling() {
    let h = device_harness().await;
    let child = spawn_device(&h, "default");
    let code = user_code(&h).await;
    eventually(Duration::from_secs(30), "the first poll", || async {
        !h.sim.sim.device_polls().is_empty()
    })
    .await;
    let pid = child.id().unwrap() as i32;
    unsafe { libc::kill(pid, libc::SIGINT) };
    let out = finish(child).await;
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("cancelled"), "{err}");
    // A poll already on its way when the cancel landed may still arrive.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let polls = h.sim.sim.stats().device_polls;
    // At 1 s intervals, a daemon still polling would poll again here.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(h.sim.sim.stats().device_polls, polls, "polling stopped");
    // Approving now lands nothing.
    assert!(h.sim.sim.approve_device(&code));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_nothing_stored(&h).await;
}

#[tokio::test]
async fn the_dashboard_connects_with_a_device_code() {
    let h = device_harness().await;
    let home = h.get_text("/").await;
    assert!(home.contains("Connect with a device code"), "{home}");
    let r = h
        .http
        .get(h.url("/connect/keap/device?account=shop"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let page = r.headers()["location"].to_str().unwrap().to_string();
    assert!(page.starts_with("/connect/keap/device/"), "{page}");
    let html = h.get_text(&page).await;
    let code = h.sim.sim.pending_user_codes().remove(0);
    assert!(html.contains(&code), "{html}");
    assert!(html.contains(&h.sim.url("/device")), "{html}");
    assert!(h.sim.sim.approve_device(&code));
    eventually(
        Duration::from_secs(30),
        "the page says authorized",
        || async { h.get_text(&page).await.contains("the grant is stored") },
    )
    .await;
    let (s, b) = h.get_json("/v1/token/keap/shop").await;
    assert_eq!(s, 200, "{b}");
}

#[tokio::test]
async fn the_dashboard_offers_no_device_code_without_an_endpoint() {
    let h = Harness::started(Options::default()).await;
    let home = h.get_text("/").await;
    assert!(!home.contains("device code"), "{home}");
    let r = h
        .http
        .get(h.url("/connect/keap/device"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("device_authorization_url"));
}
