//! The client-credentials grant (SPEC 10, `grant = "client_credentials"`)
//! against the real daemon and the simulator: obtained at start with no
//! person, renewed on the refresh schedule under the lease, failures ended
//! by SPEC 7's classes, and every person-facing way in refused.

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use common::{eventually, Harness, Options, CLIENT_SECRET};
use tokenkeeper::dev::{DelayPhase, Fault};

/// `[providers.keap]` as a client-credentials provider asking for two
/// scopes (the harness's keap preset authenticates with HTTP Basic, which
/// the Keap-like simulator demands).
const CLIENT_CREDENTIALS: &str = "grant = \"client_credentials\"\nscopes = [\"read\", \"write\"]";

fn options(lifetime: Duration, refresh: &str) -> Options {
    Options {
        provider: CLIENT_CREDENTIALS.into(),
        refresh: refresh.into(),
        ..Options::lifetime(lifetime)
    }
}

#[tokio::test]
async fn the_token_is_obtained_at_start_without_anyone_asking_and_served_everywhere() {
    let mut h = Harness::started(options(Duration::from_secs(3600), "")).await;
    // Nobody asked for a token: the daemon obtains it by itself.
    eventually(
        Duration::from_secs(20),
        "the token obtained at start",
        || async { h.sim.sim.stats().client_credentials_ok == 1 },
    )
    .await;
    assert_eq!(
        h.sim.sim.last_client_credentials_scope().as_deref(),
        Some("read write"),
        "the configured scopes apply to the token request"
    );
    let issued = h.sim.sim.access_tokens_issued();
    let (s, b) = h.token().await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["account"], "default");
    assert_eq!(b["access_token"], issued[0].as_str());
    assert!(h.sim.sim.access_token_valid(&issued[0]));
    let c = h.connection("default").await;
    assert_eq!(c["state"], "active", "{c}");
    assert!(c["last_error"].is_null(), "{c}");
    // The CLI serves it like any other connection's.
    let out = h.cli(&["token", "keap"]).await;
    common::assert_success(&out);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), issued[0]);
    assert_eq!(
        h.sim.sim.stats().client_credentials_calls,
        1,
        "served tokens cost no provider call"
    );
    assert!(
        h.sim.sim.refresh_tokens_issued().is_empty() && h.sim.sim.stats().refresh_calls == 0,
        "no refresh token exists or is used"
    );

    // Forgetting drops it; the next start obtains a new one.
    let r = h
        .http
        .delete(h.url("/v1/connections/keap/default"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let (s, b) = h.token().await;
    assert_eq!(s, 404, "{b}");
    h.stop().await;
    h.start().await;
    eventually(
        Duration::from_secs(20),
        "a new token after restart",
        || async { h.token().await.0 == 200 },
    )
    .await;
    assert_eq!(h.sim.sim.stats().client_credentials_ok, 2);
}

#[tokio::test]
async fn it_is_renewed_before_expiry_once_per_renewal_under_a_herd_of_callers() {
    // 6 s tokens; the scheduler's point (90 %) is held back to the
    // callers' (2 s left), so the scheduler and the herd reach for each
    // renewal at the same moment, and each request is held 300 ms at the
    // provider so that callers pile up while a renewal is in the air.
    let h = Harness::started(options(
        Duration::from_secs(6),
        "at_fraction = 0.9\nmin_validity = \"2s\"",
    ))
    .await;
    h.sim
        .sim
        .set_token_delay(Duration::from_millis(300), DelayPhase::BeforeProcessing);
    eventually(Duration::from_secs(20), "the first token", || async {
        h.token().await.0 == 200
    })
    .await;
    let calls_before = h.sim.sim.stats().client_credentials_calls;
    let served: Arc<Mutex<HashSet<String>>> = Arc::default();
    let stop_at = Instant::now() + Duration::from_secs(9);
    let mut herd = Vec::new();
    for _ in 0..24 {
        let (http, url, sim) = (h.http.clone(), h.url("/v1/token/keap"), h.sim.sim.clone());
        let served = served.clone();
        herd.push(tokio::spawn(async move {
            while Instant::now() < stop_at {
                let r = http.get(&url).send().await.expect("daemon answers");
                assert_eq!(r.status(), 200);
                let b: serde_json::Value = r.json().await.unwrap();
                let token = b["access_token"].as_str().unwrap().to_string();
                let expires_at: DateTime<Utc> = b["expires_at"].as_str().unwrap().parse().unwrap();
                assert!(expires_at > Utc::now(), "an expired token was served: {b}");
                assert!(
                    sim.access_token_valid(&token),
                    "a token the provider no longer accepts was served"
                );
                served.lock().unwrap().insert(token);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    for t in herd {
        t.await.expect("no caller failed");
    }
    // A renewal may still be in the air at the provider.
    eventually(
        Duration::from_secs(10),
        "no token request in the air",
        || async {
            let s = h.sim.sim.stats();
            s.client_credentials_calls == s.client_credentials_ok
        },
    )
    .await;
    let stats = h.sim.sim.stats();
    let calls = stats.client_credentials_calls - calls_before;
    let served = served.lock().unwrap().len() as u64;
    assert!(
        calls >= 2,
        "renewed several times in 9 s of 6 s tokens: {calls}"
    );
    // Each renewal is one provider call whose token the herd then gets:
    // a second call for the same renewal would issue a token nobody is
    // served (the last call may land after the herd stopped asking).
    assert!(
        calls <= served + 1,
        "{calls} provider calls for {served} tokens served"
    );
    // A renewal every 3.4 s at the earliest (2 s before the 5.4 s a
    // token is counted to live): at most 3 in 9 s.
    assert!(calls <= 4, "{calls} provider calls in 9 s");
}

/// A grant without a refresh token has no refresh token to age: the
/// reported `refresh_token_issued_at` (which the age metric and the
/// dashboard show too) follows its latest token, not the connection's
/// creation, so an alert on an old refresh token never fires for it.
#[tokio::test]
async fn the_reported_refresh_token_issue_follows_the_latest_token() {
    let h = Harness::started(options(Duration::from_secs(3), "at_fraction = 0.5")).await;
    eventually(Duration::from_secs(20), "the first token", || async {
        h.sim.sim.stats().client_credentials_ok >= 1
    })
    .await;
    let issued = |c: &serde_json::Value| -> DateTime<Utc> {
        c["refresh_token_issued_at"]
            .as_str()
            .unwrap_or_else(|| panic!("refresh_token_issued_at in {c}"))
            .parse()
            .unwrap()
    };
    let first = issued(&h.connection("default").await);
    eventually(Duration::from_secs(20), "two renewals", || async {
        h.sim.sim.stats().client_credentials_ok >= 3
    })
    .await;
    let c = h.connection("default").await;
    let refreshed: DateTime<Utc> = c["refreshed_at"].as_str().unwrap().parse().unwrap();
    assert!(
        issued(&c) > first,
        "the reported issue moved with the renewals: {c}"
    );
    assert!(
        (refreshed - issued(&c)).num_seconds().abs() <= 1,
        "it is the latest token's issue: {c}"
    );
}

#[tokio::test]
async fn a_refused_client_is_a_clear_state_and_no_retry_storm_then_a_forced_refresh_recovers() {
    let mut h = Harness::new(options(Duration::from_secs(3600), "retry_max = \"1h\"")).await;
    h.sim
        .sim
        .set_client_secret("a-secret-the-daemon-does-not-have");
    h.start().await;
    eventually(Duration::from_secs(20), "the refusal recorded", || async {
        h.connection("default").await["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("invalid_client"))
    })
    .await;
    let c = h
        .assert_connection(
            "default",
            "retrying",
            "check client_id and the client secret",
        )
        .await;
    assert!(
        c["last_error"]
            .as_str()
            .unwrap()
            .contains("[providers.keap]"),
        "{c}"
    );
    // A herd of callers learns why, without each asking the provider.
    let mut herd = Vec::new();
    for _ in 0..20 {
        let (http, url) = (h.http.clone(), h.url("/v1/token/keap"));
        herd.push(tokio::spawn(async move {
            let r = http.get(url).send().await.unwrap();
            let s = r.status().as_u16();
            (s, r.json::<serde_json::Value>().await.unwrap())
        }));
    }
    for t in herd {
        let (s, b) = t.await.unwrap();
        assert_eq!(s, 503, "{b}");
        assert!(
            b["message"].as_str().unwrap().contains("client secret"),
            "{b}"
        );
    }
    assert_eq!(
        h.sim.sim.stats().client_credentials_calls,
        1,
        "a refused client is not asked again by every caller"
    );
    // The operator fixes the secret at the provider and forces a retry.
    h.sim.sim.set_client_secret(CLIENT_SECRET);
    let (s, b) = h.post_json("/v1/token/keap/refresh").await;
    assert_eq!(s, 200, "{b}");
    let c = h.connection("default").await;
    assert_eq!(c["state"], "active", "{c}");
}

#[tokio::test]
async fn server_errors_back_off_between_attempts_and_recover() {
    // The backoff's floor (2 s) is above the scheduler's pass (1 s): without
    // backoff the attempts would come at every pass. (A Retry-After is
    // `retry_after_of_a_rate_limited_token_request_is_honoured`'s.)
    let mut h = Harness::new(options(
        Duration::from_secs(3600),
        "retry_initial = \"2s\"\nretry_max = \"4s\"",
    ))
    .await;
    h.sim.sim.set_fault(Some(Fault::Status(503)));
    h.start().await;
    eventually(Duration::from_secs(60), "retries after backoff", || async {
        h.sim.sim.stats().client_credentials_calls >= 4
    })
    .await;
    // Between attempts (one may be in the air, reported as refreshing).
    eventually(
        Duration::from_secs(30),
        "retrying with the reason",
        || async {
            let c = h.connection("default").await;
            c["state"] == "retrying"
                && c["last_error"]
                    .as_str()
                    .is_some_and(|e| e.contains("HTTP 503"))
        },
    )
    .await;
    // Each attempt waited at least the backoff's floor after the one that
    // failed before it (a lower bound only: a busy machine is late, never
    // early).
    let failed = h.sim.sim.token_call_times();
    assert!(failed.len() >= 4, "{}", failed.len());
    for pair in failed.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= Duration::from_millis(1900),
            "attempts {gap:?} apart, under retry_initial (2 s)"
        );
    }
    assert_eq!(h.token().await.0, 503, "no token to serve yet");
    h.sim.sim.set_fault(None);
    eventually(Duration::from_secs(30), "recovered by itself", || async {
        h.connection("default").await["state"] == "active"
    })
    .await;
    let (s, b) = h.token().await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(h.sim.sim.stats().client_credentials_ok, 1);
}

#[tokio::test]
async fn retry_after_of_a_rate_limited_token_request_is_honoured() {
    let mut h = Harness::new(options(Duration::from_secs(3600), "retry_max = \"1h\"")).await;
    h.sim.sim.push_fault(Fault::RateLimited {
        retry_after_secs: Some(600),
    });
    let asked = Utc::now();
    h.start().await;
    eventually(Duration::from_secs(20), "the 429 recorded", || async {
        h.connection("default").await["state"] == "retrying"
    })
    .await;
    let c = h.connection("default").await;
    let next: DateTime<Utc> = c["next_refresh_at"].as_str().unwrap().parse().unwrap();
    assert!(
        next >= asked + chrono::Duration::seconds(590),
        "the next attempt waits for Retry-After: {c}"
    );
    assert_eq!(h.sim.sim.stats().client_credentials_calls, 1);
}

#[tokio::test]
async fn nothing_can_be_authorized_pasted_or_imported_for_it() {
    let h = Harness::started(options(Duration::from_secs(3600), "")).await;
    // The dashboard lists the connection but offers no button to authorize it.
    let page = h.http.get(h.url("/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let page = page.text().await.unwrap();
    assert!(page.contains("data-provider=\"keap\""), "{page}");
    assert!(!page.contains("/connect/keap"), "{page}");
    let r = h.http.get(h.url("/connect/keap")).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let page = r.text().await.unwrap();
    assert!(page.contains("client_credentials"), "{page}");
    let r = h
        .http
        .post(h.url("/v1/connections/keap/default/paste/start"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let b: serde_json::Value = r.json().await.unwrap();
    assert_eq!(b["error"], "nothing_to_authorize", "{b}");
    let r = h
        .http
        .post(h.url("/v1/connections/keap/default/device"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let b: serde_json::Value = r.json().await.unwrap();
    assert_eq!(b["error"], "nothing_to_authorize", "{b}");
    let r = h
        .http
        .post(h.url("/v1/connections/keap/default/import"))
        .header("content-type", "application/json")
        .body(r#"{"refresh_token": "someone-elses-refresh-token-1234567890", "replace": true}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let b: serde_json::Value = r.json().await.unwrap();
    assert_eq!(b["error"], "nothing_to_authorize", "{b}");
    assert!(
        b["message"]
            .as_str()
            .unwrap()
            .contains("nothing to authorize"),
        "{b}"
    );
    // The CLI says so itself, before reading any token file.
    let file = h.dir.path().join("rt");
    std::fs::write(&file, "someone-elses-refresh-token-1234567890\n").unwrap();
    let file = file.to_str().unwrap();
    for args in [
        &["connect", "keap"][..],
        &["connect", "keap", "--paste"],
        &["import", "keap", "--refresh-token-file", file],
    ] {
        let out = h.cli(args).await;
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("nothing to authorize"), "{args:?}: {err}");
    }
    assert_eq!(h.sim.sim.stats().refresh_calls, 0, "nothing was redeemed");
}

#[tokio::test]
async fn an_unknown_grant_is_a_config_error_naming_the_key_line_and_values() {
    let h = Harness::new(Options {
        provider: "grant = \"password\"".into(),
        ..Options::default()
    })
    .await;
    let out = h.cli(&["check-config"]).await;
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    let text = std::fs::read_to_string(&h.config_path).unwrap();
    let line = text.lines().position(|l| l.starts_with("grant")).unwrap() + 1;
    assert!(err.contains("providers.keap.grant"), "{err}");
    assert!(err.contains(&format!(".toml:{line}:")), "{err}");
    assert!(
        err.contains("\"authorization_code\"") && err.contains("\"client_credentials\""),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_daemons_on_one_database_renew_it_once_per_renewal_through_the_lease() {
    let h = Harness::started(options(
        Duration::from_secs(6),
        "at_fraction = 0.5\nmin_validity = \"2s\"",
    ))
    .await;
    let port2 = common::free_port();
    let text = std::fs::read_to_string(&h.config_path).unwrap();
    let config2 = h.dir.path().join("tokenkeeper-2.toml");
    std::fs::write(
        &config2,
        text.replace(
            &format!("listen = \"127.0.0.1:{}\"", h.port),
            &format!("listen = \"127.0.0.1:{port2}\""),
        ),
    )
    .unwrap();
    let mut second = common::spawn_daemon(&config2, &h.dir.path().join("d2.log"), &h.rust_log, &[]);
    let url2 = format!("http://127.0.0.1:{port2}");
    common::wait_healthy(&h.http, &format!("{url2}/healthz"), &mut second).await;
    eventually(Duration::from_secs(20), "both serve a token", || async {
        let r = h.http.get(format!("{url2}/v1/token/keap")).send().await;
        h.token().await.0 == 200 && r.is_ok_and(|r| r.status() == 200)
    })
    .await;
    let before = h.sim.sim.stats().client_credentials_calls;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(8) {
        for url in [h.url("/v1/token/keap"), format!("{url2}/v1/token/keap")] {
            let b: serde_json::Value = h.http.get(url).send().await.unwrap().json().await.unwrap();
            let token = b["access_token"].as_str().expect("a token");
            assert!(h.sim.sim.access_token_valid(token), "{b}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let calls = h.sim.sim.stats().client_credentials_calls - before;
    // A renewal every 2.7 s at the earliest: at most 3 in 8 s for the
    // pair; two schedulers each renewing would make about twice that.
    assert!(calls >= 2, "renewed in 8 s: {calls}");
    assert!(calls <= 5, "{calls} provider calls in 8 s from two daemons");
    let _ = second.kill();
    let _ = second.wait();
}

#[tokio::test]
async fn the_client_authenticates_in_the_body_when_the_provider_wants_it_there() {
    let mut opts = options(Duration::from_secs(3600), "");
    opts.provider = format!("{CLIENT_CREDENTIALS}\nrefresh_auth = \"body\"");
    // A provider that refuses HTTP Basic at its token endpoint (Zoho-like).
    opts.sim.require_basic_on_refresh = false;
    opts.sim.quirks.refuse_basic = true;
    let h = Harness::started(opts).await;
    eventually(
        Duration::from_secs(20),
        "a token with body credentials",
        || async { h.token().await.0 == 200 },
    )
    .await;
    assert_eq!(h.sim.sim.stats().client_credentials_calls, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_daemons_on_one_postgres_obtain_the_first_token_once() {
    let Some(url) = common::postgres::fresh_database("client_credentials_birth").await else {
        return;
    };
    let h = Harness::new(options(Duration::from_secs(3600), "")).await;
    common::postgres::use_postgres(&h.config_path, &url);
    // The first token request is held at the provider, so the other
    // daemons start while it is in the air and find its lease.
    h.sim
        .sim
        .set_token_delay(Duration::from_secs(2), DelayPhase::BeforeProcessing);
    let text = std::fs::read_to_string(&h.config_path).unwrap();
    let listen = format!("listen = \"127.0.0.1:{}\"", h.port);
    let mut daemons = Vec::new();
    for n in 0..3 {
        let port = common::free_port();
        let config = h.dir.path().join(format!("tokenkeeper-{n}.toml"));
        std::fs::write(
            &config,
            text.replace(&listen, &format!("listen = \"127.0.0.1:{port}\"")),
        )
        .unwrap();
        let log = h.dir.path().join(format!("daemon-{n}.log"));
        let child = common::spawn_daemon(&config, &log, &h.rust_log, &[]);
        daemons.push((child, format!("http://127.0.0.1:{port}")));
    }
    for (child, base) in &mut daemons {
        common::wait_healthy(&h.http, &format!("{base}/healthz"), child).await;
    }
    let mut served = HashSet::new();
    for (_, base) in &daemons {
        let url = format!("{base}/v1/token/keap");
        let deadline = Instant::now() + Duration::from_secs(30);
        let body = loop {
            let r = h.http.get(&url).send().await.expect("daemon answers");
            if r.status() == 200 {
                break r.json::<serde_json::Value>().await.unwrap();
            }
            assert!(Instant::now() < deadline, "no token from {base}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        served.insert(body["access_token"].as_str().unwrap().to_string());
    }
    for (child, _) in &mut daemons {
        let _ = child.kill();
        let _ = child.wait();
    }
    assert_eq!(served.len(), 1, "one token for the whole cluster");
    assert_eq!(
        h.sim.sim.stats().client_credentials_calls,
        1,
        "one token request in the whole cluster"
    );
}
