//! What providers really answer (issue 12, items 2, 15, 16, 17, 26d): odd
//! but valid token answers keep the grant, absurd lifetimes are capped,
//! zero lifetimes do not make every request refresh, non-Bearer token types
//! are served as issued, and a refusal of the client is a configuration
//! problem that a reload fixes, not a dead grant.

mod common;

use std::time::Duration;

use common::{eventually, signal, Harness, Options};
use serde_json::Value;
use tokenkeeper::dev::{AnswerShape, DelayPhase, Fault};

const WAIT: Duration = Duration::from_secs(15);

/// The grant is alive and was never sent twice: the provider rotated
/// every time and saw no reuse of a spent refresh token.
fn assert_grant_intact(h: &Harness) {
    common::assert_no_reuse_or_rejection(&h.sim.sim.stats());
    assert!(h.sim.sim.current_refresh_token().is_some());
}

/// The token the daemon serves is the newest the provider issued.
fn assert_serves_newest(h: &Harness, body: &Value) {
    let newest = h.sim.sim.access_tokens_issued().last().cloned();
    assert_eq!(body["access_token"].as_str(), newest.as_deref(), "{body}");
}

#[tokio::test]
async fn odd_but_valid_token_answers_keep_the_grant() {
    let h = Harness::authorized(Options::default()).await;
    let shapes = [
        AnswerShape::ExpiresIn("\"3600\"".into()),
        AnswerShape::ExpiresIn("\" 7200 \"".into()),
        AnswerShape::ExpiresIn("3599.75".into()),
        AnswerShape::ExpiresIn("-30".into()),
        AnswerShape::ExpiresIn("null".into()),
        AnswerShape::NoTokenType,
        AnswerShape::TextPlain,
        AnswerShape::Status(201),
        AnswerShape::Status(203),
    ];
    for shape in shapes {
        h.sim.sim.set_answer_shape(Some(shape.clone()));
        // Twice with the same shape: the second refresh proves the first
        // answer's refresh token was stored.
        for round in 0..2 {
            let (status, body) = h.force_refresh().await;
            assert_eq!(status, 200, "{shape:?} round {round}: {body}");
            assert_serves_newest(&h, &body);
            assert_eq!(body["token_type"], "Bearer", "{shape:?}");
            // Stated lifetimes (or the 1 h default), else the simulator's day.
            let left = body["expires_in"].as_i64().unwrap();
            let range = match shape {
                AnswerShape::ExpiresIn(_) => 3000..=7200,
                _ => 86000..=86400,
            };
            assert!(range.contains(&left), "{shape:?}: {body}");
        }
        assert_grant_intact(&h);
        assert_eq!(h.connection("default").await["state"], "active");
    }
}

#[tokio::test]
async fn a_refresh_token_in_an_unusable_answer_is_stored() {
    let h = Harness::authorized(Options::default()).await;
    h.sim.sim.set_answer_shape(Some(AnswerShape::NoAccessToken));
    let (status, body) = h.force_refresh().await;
    assert_eq!(
        status, 503,
        "a forced refresh that got no token says so: {body}"
    );
    let c = h.connection("default").await;
    assert_eq!(c["state"], "retrying", "{c}");
    let reason = c["last_error"].as_str().unwrap_or_default();
    assert!(reason.contains("access_token"), "{reason}");
    assert!(
        reason.contains("refresh token in that answer was stored"),
        "{reason}"
    );
    // The answer's refresh token is the grant now: the next refresh sends it.
    h.sim.sim.set_answer_shape(None);
    let (status, body) = h.force_refresh().await;
    assert_eq!(status, 200, "{body}");
    assert_serves_newest(&h, &body);
    assert_grant_intact(&h);
    assert_eq!(h.connection("default").await["state"], "active");
}

#[tokio::test]
async fn an_oauth_error_in_a_200_is_classified_by_its_code() {
    let h = Harness::authorized(Options::default()).await;
    h.sim.sim.push_fault(Fault::OAuthError {
        status: 200,
        error: "invalid_client".into(),
        description: None,
    });
    assert_eq!(h.force_refresh().await.0, 503);
    assert_eq!(h.connection("default").await["state"], "retrying");
    h.sim.sim.push_fault(Fault::OAuthError {
        status: 200,
        error: "invalid_grant".into(),
        description: Some("refresh token revoked".into()),
    });
    let (status, body) = h.force_refresh().await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"], "authorization_required");
}

#[tokio::test]
async fn absurd_lifetimes_are_capped_and_served_as_rfc3339() {
    let h = Harness::authorized(Options::default()).await;
    let year = chrono::Duration::days(367);
    for raw in [
        "1e13",
        "1e12",
        "9223372036854775807",
        "1e308",
        "1e400",
        "\"1e30\"",
        "\"99999999999999999999999999999999999999\"",
    ] {
        h.sim
            .sim
            .set_answer_shape(Some(AnswerShape::ExpiresIn(raw.into())));
        let (status, body) = h.force_refresh().await;
        assert_eq!(status, 200, "{raw}: {body}");
        assert_serves_newest(&h, &body);
        let at = body["expires_at"].as_str().unwrap();
        let at = chrono::DateTime::parse_from_rfc3339(at)
            .unwrap_or_else(|e| panic!("{raw}: expires_at {at} is not RFC 3339: {e}"));
        assert!(at.to_utc() <= chrono::Utc::now() + year, "{raw}: {at}");
        let (status, listed) = h.get_json("/v1/connections").await;
        assert_eq!(status, 200, "{raw}");
        assert_eq!(listed["connections"][0]["state"], "active", "{raw}");
    }
    h.sim.sim.set_answer_shape(None);
    assert_eq!(h.force_refresh().await.0, 200);
    assert_grant_intact(&h);
}

#[tokio::test]
async fn a_zero_lifetime_does_not_make_every_request_refresh() {
    let h = Harness::new(Options::default()).await;
    let mut h = h;
    h.sim
        .sim
        .set_answer_shape(Some(AnswerShape::ExpiresIn("0".into())));
    h.start().await;
    assert_eq!(h.authorize("keap", "default").await.status(), 200);
    assert_eq!(h.force_refresh().await.0, 200);
    let before = h.sim.sim.stats().refresh_calls;
    for _ in 0..40 {
        let (status, body) = h.token().await;
        assert_eq!(status, 200, "{body}");
        assert!(body["expires_in"].as_i64().unwrap() > 600, "{body}");
    }
    let calls = h.sim.sim.stats().refresh_calls - before;
    assert!(calls <= 1, "{calls} refreshes for 40 token requests");
    assert_grant_intact(&h);
}

#[tokio::test]
async fn non_bearer_token_types_are_served_as_issued() {
    let h = Harness::authorized(Options::default()).await;
    for (sent, served) in [("DPoP", "DPoP"), ("mac", "MAC"), ("bearer", "Bearer")] {
        h.sim
            .sim
            .set_answer_shape(Some(AnswerShape::TokenType(sent.into())));
        let (status, body) = h.force_refresh().await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["token_type"], served, "{sent}");
        let (_, body) = h.token().await;
        assert_eq!(body["token_type"], served, "{sent}");
        let out = h.cli(&["header", "keap"]).await;
        assert!(out.status.success(), "{out:?}");
        let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let token = body["access_token"].as_str().unwrap();
        assert_eq!(line, format!("Authorization: {served} {token}"));
    }
}

/// Item 2: a client-secret rotation at the provider makes every refresh
/// answer `invalid_client`. The grants are still good: nothing may send
/// the tenants through the browser again.
#[tokio::test]
async fn a_refused_client_is_a_configuration_problem_a_reload_fixes() {
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.txt");
    let script = dir.path().join("notify.sh");
    common::write_script(
        &script,
        format!(
            "#!/bin/sh\necho \"$TOKENKEEPER_EVENT|$TOKENKEEPER_MESSAGE\" >> {}\n",
            events.display()
        ),
    );
    let h = Harness::authorized(Options {
        // Long backoffs: any attempt seen below was asked for, not scheduled.
        refresh: "retry_max = \"1h\"\n".into(),
        provider: format!("\n[notify]\ncommand = \"{}\"\n", script.display()),
        ..Options::default()
    })
    .await;
    let (_, first) = h.token().await;
    let old = first["access_token"].as_str().unwrap().to_string();

    h.sim.sim.set_client_secret("rotated-at-the-provider");
    let (status, body) = h.force_refresh().await;
    assert_eq!(status, 503, "{body}");
    let c = h.connection("default").await;
    assert_eq!(c["state"], "retrying", "{c}");
    let reason = c["last_error"].as_str().unwrap_or_default().to_string();
    for part in [
        "invalid_client",
        "client secret",
        "[providers.keap]",
        "reload",
    ] {
        assert!(reason.contains(part), "{part:?} missing from {reason:?}");
    }
    let next = c["next_refresh_at"].as_str().unwrap();
    let next = chrono::DateTime::parse_from_rfc3339(next).unwrap();
    assert!(
        next.to_utc() > chrono::Utc::now() + chrono::Duration::minutes(5),
        "a refused client is retried slowly: {c}"
    );
    // The still-valid access token keeps being served.
    let (status, body) = h.token().await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["access_token"], old.as_str());
    eventually(WAIT, "the operator is told (refresh_failing)", || {
        let events = events.clone();
        async move {
            std::fs::read_to_string(&events)
                .unwrap_or_default()
                .lines()
                .any(|l| l.starts_with("refresh_failing|") && l.contains("invalid_client"))
        }
    })
    .await;

    // A forced refresh tries again at once, whatever the backoff says.
    let calls = h.sim.sim.stats().refresh_calls;
    assert_eq!(h.force_refresh().await.0, 503);
    assert_eq!(h.sim.sim.stats().refresh_calls, calls + 1);
    assert_eq!(h.connection("default").await["state"], "retrying");

    // The operator installs the new secret and reloads: the scheduler
    // retries at once and the same grant refreshes.
    std::fs::write(
        h.dir.path().join("client-secret"),
        "rotated-at-the-provider\n",
    )
    .unwrap();
    signal(h.daemon.as_ref().unwrap(), libc::SIGHUP);
    eventually(WAIT, "refreshed after the reload", || async {
        h.connection("default").await["state"] == "active"
    })
    .await;
    let (status, body) = h.token().await;
    assert_eq!(status, 200, "{body}");
    assert_ne!(body["access_token"], old.as_str());
    assert_serves_newest(&h, &body);
    assert_eq!(h.sim.sim.stats().code_exchanges, 1, "no new authorization");
    assert_grant_intact(&h);
}

/// Every OAuth refusal other than a rejected grant leaves the grant alive.
#[tokio::test]
async fn only_a_rejected_grant_ends_a_grant() {
    let h = Harness::authorized(Options::default()).await;
    let refusals = [
        (401, "invalid_client", None),
        (400, "unauthorized_client", None),
        (400, "invalid_scope", Some("scope full is not allowed")),
        (400, "unsupported_grant_type", None),
        (400, "invalid_request", Some("Missing client_id")),
        (400, "temporarily_confused", None),
    ];
    for (status, error, description) in refusals {
        h.sim.sim.push_fault(Fault::OAuthError {
            status,
            error: error.into(),
            description: description.map(Into::into),
        });
        let (got, body) = h.force_refresh().await;
        assert_eq!(got, 503, "{error}: {body}");
        let c = h.connection("default").await;
        assert_eq!(c["state"], "retrying", "{error}: {c}");
        assert!(
            c["last_error"].as_str().unwrap_or_default().contains(error),
            "{c}"
        );
    }
    // A 401 without an OAuth body (a gateway, a wrong token_url).
    h.sim.sim.push_fault(Fault::Status(401));
    assert_eq!(h.force_refresh().await.0, 503);
    assert_eq!(h.connection("default").await["state"], "retrying");
    // The grant survived all of it.
    let (status, body) = h.force_refresh().await;
    assert_eq!(status, 200, "{body}");
    assert_grant_intact(&h);
    // Keap's way of saying the refresh token is dead does end it.
    h.sim.sim.push_fault(Fault::RejectRefresh);
    let (status, body) = h.force_refresh().await;
    assert_eq!(status, 409, "{body}");
}

/// A lifetime shorter than the round trip yields a token dead on arrival:
/// reported and backed off, not refreshed again by every request.
#[tokio::test]
async fn a_token_dead_on_arrival_is_not_refreshed_in_a_loop() {
    let h = Harness::authorized(Options {
        refresh: "retry_initial = \"30s\"\nretry_max = \"1h\"\n".into(),
        ..Options::default()
    })
    .await;
    h.sim
        .sim
        .set_answer_shape(Some(AnswerShape::ExpiresIn("1".into())));
    h.sim
        .sim
        .set_token_delay(Duration::from_millis(1200), DelayPhase::BeforeProcessing);
    let (status, body) = h.force_refresh().await;
    assert_ne!(status, 200, "{body}");
    let before = h.sim.sim.stats().refresh_calls;
    for _ in 0..20 {
        h.token().await;
    }
    let calls = h.sim.sim.stats().refresh_calls - before;
    assert!(calls <= 1, "{calls} refreshes for 20 token requests");
    h.assert_connection("default", "retrying", "expired before")
        .await;
    h.sim.sim.set_answer_shape(None);
    h.sim
        .sim
        .set_token_delay(Duration::ZERO, DelayPhase::BeforeProcessing);
    let (status, body) = h.force_refresh().await;
    assert_eq!(status, 200, "{body}");
    assert_grant_intact(&h);
}
