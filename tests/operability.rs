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
use tokenkeeper::dev::Fault;

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
    let h = Harness::started(Options::default()).await;
    // SPEC 4: every series a fresh daemon knows of is there, at 0.
    let m = scrape(&h).await;
    assert_eq!(find(&m, "tokenkeeper_bearer_misuse_total", &[]), 0.0);
    assert_eq!(
        find(
            &m,
            "tokenkeeper_proxy_requests_total",
            &["provider=\"keap\"", "result=\"ok\""]
        ),
        0.0
    );
    // A made-up provider name costs no series.
    for i in 0..20 {
        let r = h
            .http
            .get(h.url(&format!("/proxy/nosuch{i}/x")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404);
    }
    let text = h.get_text("/metrics").await;
    assert!(!text.contains("nosuch"), "a series for an unknown provider");
    assert_eq!(h.authorize("keap", "default").await.status(), 200);
    let m = scrape(&h).await;
    for result in ["ok", "transient", "rejected", "refused"] {
        let label = format!("result=\"{result}\"");
        assert_eq!(
            find(
                &m,
                "tokenkeeper_refresh_total",
                &["provider=\"keap\"", &label]
            ),
            0.0,
            "{result}"
        );
    }
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
    common::write_script(&script, format!(
        "#!/bin/sh\necho \"$TOKENKEEPER_EVENT|$TOKENKEEPER_PROVIDER|$TOKENKEEPER_ACCOUNT|$TOKENKEEPER_MESSAGE\" >> {}\n",
        out.display()
    ));

    let h = Harness::started(Options {
        provider: format!(
            "\n[notify]\ncommand = \"{}\"\nwebhook_url = \"{hook}\"\n",
            script.display()
        ),
        ..Options::default()
    })
    .await;

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
    common::write_script(
        &script,
        format!(
            "#!/bin/sh\necho \"$TOKENKEEPER_EVENT\" >> {}\nsleep 60\n",
            started_log.display()
        ),
    );
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
    let h = Harness::started(Options {
        provider: format!(
            "\n[notify]\ncommand = \"{}\"\nwebhook_url = \"{hook}\"\n",
            script.display()
        ),
        ..Options::default()
    })
    .await;
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

/// The database of a stopped daemon, for edits no daemon would make.
async fn raw_db(h: &Harness) -> sqlx::SqlitePool {
    sqlx::SqlitePool::connect_with(
        sqlx::sqlite::SqliteConnectOptions::new()
            .filename(h.db_path())
            .busy_timeout(Duration::from_secs(5)),
    )
    .await
    .unwrap()
}

/// A stopped daemon that authorized `accounts`, after which the row of
/// `second` got a state this build does not know and the row of `third` an
/// expiry that is not an instant; with the database, still open.
async fn with_unreadable_rows(accounts: &[&str]) -> (Harness, sqlx::SqlitePool) {
    let mut h = Harness::started(Options::default()).await;
    for account in accounts {
        assert_eq!(h.authorize("keap", account).await.status(), 200);
    }
    h.stop().await;
    let db = raw_db(&h).await;
    sqlx::query("UPDATE connections SET state = 'paused' WHERE account = 'second'")
        .execute(&db)
        .await
        .unwrap();
    sqlx::query("UPDATE connections SET expires_at = 'tomorrow' WHERE account = 'third'")
        .execute(&db)
        .await
        .unwrap();
    (h, db)
}

#[tokio::test]
async fn one_unreadable_row_does_not_stop_the_daemon() {
    let (mut h, db) = with_unreadable_rows(&["default", "second", "third"]).await;
    db.close().await;

    h.start().await;
    // The healthy connection is served.
    let (s, _) = h.token().await;
    assert_eq!(s, 200);
    // The bad ones are refused with what is wrong, never a token.
    for (account, what) in [
        ("second", "unknown state \"paused\""),
        ("third", "expires_at"),
    ] {
        let (s, v) = h.get_json(&format!("/v1/token/keap/{account}")).await;
        assert_eq!(s, 409, "{v}");
        assert_eq!(v["error"], "authorization_required");
        assert!(v["message"].as_str().unwrap().contains(what), "{v}");
        assert!(v.get("access_token").is_none());
        let c = h.connection(account).await;
        assert_eq!(c["state"], "authorization_required");
        let last = c["last_error"].as_str().unwrap();
        assert!(
            last.contains(what) && last.contains("authorize keap/"),
            "{last}"
        );
    }
    assert_eq!(h.connection("default").await["state"], "active");
    let log = h.log();
    assert!(
        log.lines()
            .any(|l| l.contains("ERROR") && l.contains("unknown state \"paused\"")),
        "{log}"
    );
    let metrics = parse_metrics(&h.get_text("/metrics").await);
    assert_eq!(
        metrics.get("tokenkeeper_unreadable_connections"),
        Some(&2.0)
    );
    let status = h.cli(&["status"]).await;
    assert!(String::from_utf8_lossy(&status.stdout).contains("unknown state"));

    // A new authorization repairs it.
    assert_eq!(h.authorize("keap", "second").await.status(), 200);
    assert_eq!(h.get_json("/v1/token/keap/second").await.0, 200);
    eventually(Duration::from_secs(10), "gauge follows", || async {
        parse_metrics(&h.get_text("/metrics").await).get("tokenkeeper_unreadable_connections")
            == Some(&1.0)
    })
    .await;
}

#[tokio::test]
async fn a_database_from_a_newer_version_is_refused_with_the_fix() {
    let mut h = Harness::started(Options::default()).await;
    h.stop().await;
    let db = raw_db(&h).await;
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (29991231000000, 'a later schema', 1, x'00', 0)",
    )
    .execute(&db)
    .await
    .unwrap();
    db.close().await;
    let mut child = common::spawn_daemon(&h.config_path, &h.log_path(), "info", &[]);
    assert_eq!(
        common::wait_exit(&mut child, Duration::from_secs(20)).await,
        Some(1)
    );
    let log = h.log();
    assert!(
        log.contains("written by a newer version of tokenkeeper")
            && log.contains("upgrade tokenkeeper, or restore a backup"),
        "{log}"
    );
}

#[tokio::test]
async fn readyz_fails_while_the_database_cannot_be_written() {
    let h = Harness::started(Options::default()).await;
    assert_eq!(h.get_text("/readyz").await, "ready\n");
    // Another process holds the write lock: reads still work, writes wait.
    let db = raw_db(&h).await;
    let mut conn = db.acquire().await.unwrap();
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut *conn)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = h.http.get(h.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let body = r.text().await.unwrap();
    assert!(body.contains("cannot be written"), "{body}");
    assert!(!h.get_text("/healthz").await.is_empty());
    sqlx::query("ROLLBACK").execute(&mut *conn).await.unwrap();
    drop(conn);
    eventually(Duration::from_secs(20), "ready again", || async {
        h.http
            .get(h.url("/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
}

#[tokio::test]
async fn sigterm_during_a_slow_refresh_commits_it_and_exits_in_time() {
    use tokenkeeper::dev::DelayPhase;
    let mut h = Harness::authorized(Options::default()).await;
    // The provider rotates at once and answers 2 s later: the new refresh
    // token exists only in that answer.
    h.sim
        .sim
        .set_token_delay(Duration::from_secs(2), DelayPhase::AfterRotation);
    let http = h.http.clone();
    let url = h.url("/v1/token/keap/refresh");
    let forced = tokio::spawn(async move { http.post(url).send().await.map(|r| r.status()) });
    // A client that never finishes its request must not hold the stop open.
    let mut stalled = tokio::net::TcpStream::connect(("127.0.0.1", h.port))
        .await
        .unwrap();
    tokio::io::AsyncWriteExt::write_all(
        &mut stalled,
        b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n",
    )
    .await
    .unwrap();
    eventually(Duration::from_secs(10), "provider rotated", || async {
        h.sim.sim.refresh_tokens_issued().len() == 2
    })
    .await;
    let mut child = h.daemon.take().unwrap();
    let started = std::time::Instant::now();
    common::signal(&child, libc::SIGTERM);
    let code = common::wait_exit(&mut child, Duration::from_secs(60)).await;
    assert_eq!(code, Some(0), "{}", h.log());
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "stopped in {:?}",
        started.elapsed()
    );
    // The rotated grant was committed before the process exited.
    let db = raw_db(&h).await;
    let stored: String = sqlx::query_scalar("SELECT refresh_token FROM connections")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(Some(stored), h.sim.sim.current_refresh_token());
    assert_eq!(forced.await.unwrap().ok().map(|s| s.as_u16()), Some(200));
    drop(stalled);
}

#[tokio::test]
async fn reload_applies_api_keys_and_check_interval_and_names_what_needs_a_restart() {
    let mut h = Harness::with_api_keys(
        Options {
            access_lifetime: Duration::from_secs(8),
            refresh: "check_interval = \"1h\"".into(),
            ..Options::default()
        },
        "key-one\n",
    )
    .await;
    let keys = h.api_keys_path();
    h.start().await;
    let with_key = |key: &'static str| {
        let h = &h;
        async move {
            h.get_with(
                h.url("/v1/connections"),
                (AUTHORIZATION.as_str(), &format!("Bearer {key}")),
            )
            .await
            .status()
        }
    };
    assert_eq!(with_key("key-one").await, 200);
    assert_eq!(with_key("key-two").await, 401);
    // The browser flow, with the key on /connect in case it is guarded.
    let (location, cookie) = {
        let r = h
            .http
            .get(h.url("/connect/keap?account=default"))
            .header(AUTHORIZATION, "Bearer key-one")
            .send()
            .await
            .unwrap();
        (
            r.headers()["location"].to_str().unwrap().to_string(),
            common::cookie(&r),
        )
    };
    let callback = h.approve(&location).await;
    let r = h
        .http
        .get(callback)
        .header("cookie", cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let issued = h.sim.sim.refresh_tokens_issued().len();

    std::fs::write(&keys, "key-two\n").unwrap();
    h.write_config(
        "api_keys_file = \"api-keys\"\nproxy_max_wait = \"3s\"",
        "check_interval = \"1s\"",
        "",
    );
    common::signal(h.daemon.as_ref().unwrap(), libc::SIGHUP);
    eventually(Duration::from_secs(10), "new key works", || async {
        with_key("key-two").await == 200
    })
    .await;
    assert_eq!(with_key("key-one").await, 401, "the old key stops working");
    let log = h.log();
    assert!(
        log.lines()
            .any(|l| l.contains("need a restart") && l.contains("server.proxy_max_wait")),
        "{log}"
    );
    // The scheduler now looks every second: the 8 s token is refreshed by
    // it (nobody asks for a token here).
    eventually(Duration::from_secs(20), "scheduled refresh", || async {
        h.sim.sim.refresh_tokens_issued().len() > issued
    })
    .await;
}

#[tokio::test]
async fn notify_command_gets_only_path_and_its_own_variables() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("env.txt");
    let script = dir.path().join("dump-env.sh");
    common::write_script(
        &script,
        format!(
            "#!/bin/sh\nenv > {0}.tmp && mv {0}.tmp {0}\n",
            out.display()
        ),
    );
    let mut h = Harness::new(Options {
        provider: format!("\n[notify]\ncommand = \"{}\"\n", script.display()),
        ..Options::default()
    })
    .await;
    // The client secret comes from the daemon's environment.
    let cfg = std::fs::read_to_string(&h.config_path).unwrap().replace(
        "client_secret_file = \"client-secret\"",
        "client_secret_env = \"TK_TEST_CLIENT_SECRET\"",
    );
    std::fs::write(&h.config_path, cfg).unwrap();
    let log = std::fs::File::create(h.log_path()).unwrap();
    let mut child = std::process::Command::new(common::BIN)
        .arg("serve")
        .arg("--config")
        .arg(&h.config_path)
        .env("TK_TEST_CLIENT_SECRET", common::CLIENT_SECRET)
        .env("TK_TEST_UNRELATED", "not-for-the-hook")
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    common::wait_healthy(&h.http, &h.url("/healthz"), &mut child).await;
    h.daemon = Some(child);
    assert_eq!(h.authorize("keap", "default").await.status(), 200);
    eventually(Duration::from_secs(10), "hook ran", || async {
        out.exists()
    })
    .await;
    let env = std::fs::read_to_string(&out).unwrap();
    assert!(env.contains("TOKENKEEPER_EVENT=authorized"), "{env}");
    assert!(env.lines().any(|l| l.starts_with("PATH=")), "{env}");
    assert!(
        !env.contains(common::CLIENT_SECRET),
        "the client secret reached the hook"
    );
    // Only PATH, the event's variables, and what the shell sets itself.
    for line in env.lines() {
        let name = line.split('=').next().unwrap();
        assert!(
            name.starts_with("TOKENKEEPER_")
                || ["PATH", "PWD", "OLDPWD", "SHLVL", "_"].contains(&name),
            "the hook inherited {name}:\n{env}"
        );
    }
}

#[tokio::test]
async fn once_shutdown_begins_no_new_refresh_starts() {
    use tokenkeeper::dev::{Simulator, SimulatorConfig};
    use tokenkeeper::store::{NewGrant, Store};
    let sim = Simulator::start_local(SimulatorConfig {
        client_secret: common::CLIENT_SECRET.into(),
        ..SimulatorConfig::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let base = &sim.base_url;
    let cfg = tokenkeeper::config::parse(
        &format!(
            "[storage]\npath = \"tk.db\"\n\
             [providers.keap]\npreset = \"keap\"\nclient_id = \"demo-client\"\nclient_secret = \"{}\"\n\
             authorization_url = \"{base}/authorize\"\ntoken_url = \"{base}/token\"\n",
            common::CLIENT_SECRET
        ),
        &dir.path().join("tk.toml"),
    )
    .unwrap();
    let store = Store::open(&cfg.storage.path, None).await.unwrap();
    // An expired access token: every token request wants a refresh.
    let now = chrono::Utc::now();
    let (access, refresh) = (
        secrecy::SecretString::from("expired-access".to_string()),
        secrecy::SecretString::from("some-refresh".to_string()),
    );
    for account in ["a", "b"] {
        store
            .save_authorized(
                "keap",
                account,
                &NewGrant {
                    access_token: &access,
                    refresh_token: Some(&refresh),
                    token_type: "Bearer",
                    scope: None,
                    issued_at: now - chrono::Duration::hours(2),
                    expires_at: now - chrono::Duration::hours(1),
                    meta: None,
                },
                &[],
                &[],
            )
            .await
            .unwrap();
    }
    store.close().await;
    let listen = cfg.server.listen;
    let app = tokenkeeper::daemon::App::build(cfg, listen, None)
        .await
        .unwrap();
    let engine = app.engine();
    // Before: a request refreshes (the simulator does not know this token).
    let _ = engine.token("keap", "a").await;
    assert_eq!(sim.sim.stats().refresh_calls, 1);

    engine.stop_new_refreshes();
    let e = engine.token("keap", "b").await.err().expect("no token");
    assert!(e.to_string().contains("stopping"), "{e}");
    let e = engine
        .force_refresh("keap", "a")
        .await
        .err()
        .expect("no token");
    assert!(e.to_string().contains("stopping"), "{e}");
    assert_eq!(
        sim.sim.stats().refresh_calls,
        1,
        "no provider call after the stop began"
    );
}

#[tokio::test]
async fn a_read_only_database_directory_is_refused_with_path_and_fix() {
    let mut h = Harness::started(Options::default()).await;
    h.stop().await;
    // A read-only directory stops root only through a user who is not root.
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let bin = h.dir.path().join("tokenkeeper");
    let mut cmd = if root {
        if !std::path::Path::new("/usr/bin/setpriv").exists() {
            eprintln!("skipped: running as root without setpriv");
            return;
        }
        std::fs::copy(common::BIN, &bin).unwrap();
        let mut c = std::process::Command::new("/usr/bin/setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&bin);
        c
    } else {
        std::process::Command::new(common::BIN)
    };
    use std::os::unix::fs::PermissionsExt;
    let dir = h.dir.path();
    if root {
        // The whole test directory belongs to `nobody`, as a state
        // directory belongs to the service user.
        for entry in std::fs::read_dir(dir).unwrap() {
            std::os::unix::fs::chown(entry.unwrap().path(), Some(65534), Some(65534)).unwrap();
        }
        std::os::unix::fs::chown(dir, Some(65534), Some(65534)).unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    // The file too: with its -wal and -shm files left in place, SQLite
    // would not need the directory.
    for suffix in ["", "-wal", "-shm"] {
        let p = format!("{}{suffix}", h.db_path().display());
        if std::path::Path::new(&p).exists() {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o400)).unwrap();
        }
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o500)).unwrap();
    let stderr = h.dir.path().join("stderr.txt");
    let mut child = cmd
        .arg("serve")
        .arg("--config")
        .arg(&h.config_path)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    let code = common::wait_exit(&mut child, Duration::from_secs(20)).await;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let err = std::fs::read_to_string(&stderr).unwrap();
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&h.db_path().display().to_string()) && err.contains("read-only"),
        "{err}"
    );
    assert!(err.contains("write access"), "{err}");
}

/// Every column of one row, as SQLite quotes it: to prove nothing wrote it.
async fn row_text(db: &sqlx::SqlitePool, account: &str) -> String {
    let cols = [
        "state",
        "access_token",
        "refresh_token",
        "expires_at",
        "generation",
        "last_error",
        "failures",
        "next_attempt_at",
        "lease_owner",
        "lease_until",
        "attempt_id",
        "attempt_started_at",
        "interrupted_at",
    ];
    let select = cols
        .iter()
        .map(|c| format!("'{c}=' || quote({c})"))
        .collect::<Vec<_>>()
        .join(" || ', ' || ");
    sqlx::query_scalar(&format!(
        "SELECT {select} FROM connections WHERE provider = 'keap' AND account = ?"
    ))
    .bind(account)
    .fetch_one(db)
    .await
    .unwrap()
}

#[tokio::test]
async fn an_unreadable_row_is_never_refreshed_written_or_revoked_from() {
    let (mut h, db) = with_unreadable_rows(&["second", "third"]).await;
    let before = [row_text(&db, "second").await, row_text(&db, "third").await];
    db.close().await;
    let sim = h.sim.sim.clone();
    let live = sim.live_grants();

    h.start().await;
    for (account, what) in [
        ("second", "unknown state \"paused\""),
        ("third", "expires_at"),
    ] {
        // A forced refresh is refused, naming the problem.
        let (s, v) = h
            .post_json(&format!("/v1/token/keap/{account}/refresh"))
            .await;
        assert_eq!(s, 409, "{v}");
        assert_eq!(v["error"], "authorization_required", "{v}");
        let m = v["message"].as_str().unwrap();
        assert!(m.contains(what) && m.contains("not refreshed"), "{v}");
        // An upstream revocation is refused: the refresh token is unknown.
        let r = h.delete(&format!("/v1/connections/keap/{account}")).await;
        let s = r.status().as_u16();
        let v: serde_json::Value = r.json().await.unwrap_or_default();
        assert_eq!(s, 409, "{v}");
        let m = v["message"].as_str().unwrap_or_default();
        assert!(m.contains(what) && m.contains("local"), "{v}");
    }
    assert_eq!(sim.stats().refresh_calls, 0, "no provider call");
    assert_eq!(sim.live_grants(), live, "nothing revoked upstream");
    h.stop().await;

    // Nothing was written into either row.
    let db = raw_db(&h).await;
    let after = [row_text(&db, "second").await, row_text(&db, "third").await];
    assert_eq!(before, after);
    // The operator repairs one column: the grant works at once.
    sqlx::query("UPDATE connections SET expires_at = 4102444800000 WHERE account = 'third'")
        .execute(&db)
        .await
        .unwrap();
    db.close().await;
    h.start().await;
    let (s, v) = h.post_json("/v1/token/keap/third/refresh").await;
    assert_eq!(s, 200, "{v}");
    assert!(sim.access_token_valid(v["access_token"].as_str().unwrap()));

    // A local forget of the other is allowed.
    let r = h.delete("/v1/connections/keap/second?local=true").await;
    assert!(r.status().is_success(), "{}", r.status());
    assert!(h.connection("second").await.is_null());
}

/// The daemon's entry point is testable in-process: the application built
/// from a config serves on a listener the caller bound, and stops, with
/// the store closed, when the caller's shutdown signal fires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_application_serves_on_a_given_listener_until_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cfg = tokenkeeper::dev::config(addr, dir.path().join("tk.db"), "s");
    let app = tokenkeeper::daemon::App::build(cfg, addr, None)
        .await
        .unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let served = tokio::spawn(app.serve(listener, None, shutdown.clone()));
    let http = common::client();
    let r = http
        .get(format!("http://{addr}/v1/connections"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: tokenkeeper::http::answers::ConnectionsBody = r.json().await.unwrap();
    assert!(body.connections.is_empty());
    shutdown.cancel();
    let result = tokio::time::timeout(Duration::from_secs(30), served)
        .await
        .expect("the stop is bounded")
        .unwrap();
    assert!(result.is_ok(), "{result:?}");
    assert!(
        http.get(format!("http://{addr}/healthz"))
            .send()
            .await
            .is_err(),
        "nothing listens after the stop"
    );
    // The database lock went with the application: an offline command may
    // take it now.
    assert!(tokenkeeper::store::DbLock::exclusive(&dir.path().join("tk.db")).is_ok());
}
