//! Operability: /metrics across a lifecycle, notifications (command and
//! webhook) for every event, with no token in them.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::routing::post;
use axum::{Json, Router};
use common::{eventually, Harness, Options};
use reqwest::header::AUTHORIZATION;
use tokenkeeper::provider::simulator::Fault;

/// Parses Prometheus text: `name{labels} value` lines, `#` comments.
fn parse_metrics(text: &str) -> HashMap<String, f64> {
    let mut out = HashMap::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            assert!(
                line.is_empty() || line.starts_with("# HELP ") || line.starts_with("# TYPE "),
                "bad comment: {line}"
            );
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line: {line}"));
        let v: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in: {line}"));
        let name_end = series.find('{').unwrap_or(series.len());
        assert!(
            series[..name_end]
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name: {line}"
        );
        if name_end < series.len() {
            assert!(series.ends_with('}'), "bad labels: {line}");
        }
        out.insert(series.to_string(), v);
    }
    out
}

/// The sum of the series of `name` carrying all `labels`; a missing series
/// fails the test rather than reading as 0.
fn find(m: &HashMap<String, f64>, name: &str, labels: &[&str]) -> f64 {
    let values: Vec<f64> = m
        .iter()
        .filter(|(k, _)| k.starts_with(&format!("{name}{{")) || *k == name)
        .filter(|(k, _)| labels.iter().all(|l| k.contains(l)))
        .map(|(_, v)| *v)
        .collect();
    assert!(!values.is_empty(), "no series {name} with {labels:?}");
    values.iter().sum()
}

async fn scrape(h: &Harness) -> HashMap<String, f64> {
    let r = h.http.get(h.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    parse_metrics(&r.text().await.unwrap())
}

#[tokio::test]
async fn metrics_follow_the_lifecycle() {
    let mut h = Harness::new(Options::default()).await;
    h.start().await;
    assert_eq!(h.authorize("keap", "default").await.status(), 200);
    for _ in 0..3 {
        assert_eq!(h.token().await.0, 200);
    }
    let m = scrape(&h).await;
    let keap = "provider=\"keap\"";
    assert_eq!(
        find(
            &m,
            "tokenkeeper_connection_state",
            &[keap, "state=\"active\""]
        ),
        1.0
    );
    assert_eq!(
        find(
            &m,
            "tokenkeeper_connection_state",
            &[keap, "state=\"authorization_required\""]
        ),
        0.0
    );
    assert!(find(&m, "tokenkeeper_access_token_expiry_seconds", &[keap]) > 86000.0);
    assert!(find(&m, "tokenkeeper_refresh_token_age_seconds", &[keap]) < 60.0);
    assert_eq!(find(&m, "tokenkeeper_token_requests_total", &[keap]), 3.0);
    assert!(find(&m, "tokenkeeper_token_request_duration_seconds_count", &[]) >= 3.0);

    assert_eq!(h.post("/v1/token/keap/refresh").await.status(), 200);
    let m = scrape(&h).await;
    assert_eq!(
        find(&m, "tokenkeeper_refresh_total", &[keap, "result=\"ok\""]),
        1.0
    );
    assert_eq!(
        find(&m, "tokenkeeper_refresh_duration_seconds_count", &[keap]),
        1.0
    );

    let rt = h.sim.sim.current_refresh_token().unwrap();
    let r = h
        .get_with(
            h.url("/v1/connections"),
            (AUTHORIZATION.as_str(), &format!("Bearer {rt}")),
        )
        .await;
    assert_eq!(r.status(), 401);

    h.sim.sim.revoke_all_grants();
    assert_eq!(h.post("/v1/token/keap/refresh").await.status(), 409);
    let m = scrape(&h).await;
    assert_eq!(
        find(
            &m,
            "tokenkeeper_refresh_total",
            &[keap, "result=\"rejected\""]
        ),
        1.0
    );
    assert_eq!(
        find(
            &m,
            "tokenkeeper_connection_state",
            &[keap, "state=\"authorization_required\""]
        ),
        1.0
    );
    assert_eq!(
        find(
            &m,
            "tokenkeeper_connection_state",
            &[keap, "state=\"active\""]
        ),
        0.0
    );
    assert_eq!(find(&m, "tokenkeeper_bearer_misuse_total", &[]), 1.0);
    let text = h.get_text("/metrics").await;
    for t in h.issued_tokens() {
        assert!(!text.contains(&t), "token material in metrics");
    }
}

#[tokio::test]
async fn notifications_by_command_and_webhook() {
    // Webhook receiver.
    let received: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
    let sink = received.clone();
    let app = Router::new().route(
        "/hook",
        post(move |Json(v): Json<serde_json::Value>| {
            let sink = sink.clone();
            async move {
                sink.lock().unwrap().push(v);
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("events.txt");
    let script = dir.path().join("notify.sh");
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

    let mut h = Harness::new(Options {
        provider: format!(
            "\n[notify]\ncommand = \"{}\"\nwebhook_url = \"{hook}\"\n",
            script.display()
        ),
        ..Options::default()
    })
    .await;
    h.start().await;

    let events = |expected: &'static str| {
        let out = out.clone();
        let received = received.clone();
        async move {
            let cmd = std::fs::read_to_string(&out).unwrap_or_default();
            let by_cmd = cmd
                .lines()
                .any(|l| l.starts_with(&format!("{expected}|keap|default|")));
            let by_hook = received.lock().unwrap().iter().any(|v| {
                v["event"] == expected
                    && v["provider"] == "keap"
                    && v["account"] == "default"
                    && v["message"].is_string()
            });
            by_cmd && by_hook
        }
    };
    let wait = Duration::from_secs(10);

    assert_eq!(h.authorize("keap", "default").await.status(), 200);
    eventually(wait, "authorized", || events("authorized")).await;

    h.sim.sim.set_fault(Some(Fault::Status(503)));
    assert_eq!(h.post("/v1/token/keap/refresh").await.status(), 503);
    eventually(wait, "refresh_failing", || events("refresh_failing")).await;

    h.sim.sim.set_fault(None);
    assert_eq!(h.post("/v1/token/keap/refresh").await.status(), 200);
    eventually(wait, "recovered", || events("recovered")).await;

    let rt = h.sim.sim.current_refresh_token().unwrap();
    let r = h
        .get_with(
            h.url("/v1/token/keap"),
            (AUTHORIZATION.as_str(), &format!("Bearer {rt}")),
        )
        .await;
    assert_eq!(r.status(), 401);
    eventually(wait, "bearer_misuse", || events("bearer_misuse")).await;

    h.sim.sim.revoke_all_grants();
    assert_eq!(h.post("/v1/token/keap/refresh").await.status(), 409);
    eventually(wait, "authorization_required", || {
        events("authorization_required")
    })
    .await;

    // Never a token in either channel.
    let cmd = std::fs::read_to_string(&out).unwrap();
    let hooks = serde_json::to_string(&*received.lock().unwrap()).unwrap();
    for t in h.issued_tokens() {
        assert!(
            !cmd.contains(&t) && !hooks.contains(&t),
            "a token reached a notification"
        );
    }
}

#[tokio::test]
async fn a_failing_hook_never_blocks_the_lifecycle() {
    let dir = tempfile::tempdir().unwrap();
    let started_log = dir.path().join("started.txt");
    let script = dir.path().join("slow.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$TOKENKEEPER_EVENT\" >> {}\nsleep 60\n",
            started_log.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    // A webhook that accepts the connection and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!("http://{}/hook", listener.local_addr().unwrap());
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            held.push(stream);
        }
    });
    let mut h = Harness::new(Options {
        provider: format!(
            "\n[notify]\ncommand = \"{}\"\nwebhook_url = \"{hook}\"\n",
            script.display()
        ),
        ..Options::default()
    })
    .await;
    h.start().await;
    let started = std::time::Instant::now();
    // Three `authorized` events, each with a hanging command and webhook.
    for account in ["default", "second", "third"] {
        assert_eq!(h.authorize("keap", account).await.status(), 200);
        assert_eq!(
            h.post(&format!("/v1/token/keap/{account}/refresh"))
                .await
                .status(),
            200
        );
    }
    assert_eq!(h.token().await.0, 200);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "hooks held up the lifecycle"
    );
    // The hooks did run (and are still hanging).
    common::eventually(
        Duration::from_secs(5),
        "all three hooks started",
        || async {
            std::fs::read_to_string(&started_log)
                .unwrap_or_default()
                .lines()
                .filter(|l| *l == "authorized")
                .count()
                == 3
                && accepted.load(std::sync::atomic::Ordering::SeqCst) >= 3
        },
    )
    .await;
}
