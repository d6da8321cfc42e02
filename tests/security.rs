//! Defences of the local API and of stored grants (SPEC 4 Host check, SPEC 5
//! bearer misuse, API keys, Origin, HTTPS, encryption at rest, permissions,
//! secrets kept out of logs).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use base64::Engine as _;
use common::{Harness, Options, CLIENT_SECRET};
use reqwest::header::{AUTHORIZATION, WWW_AUTHENTICATE};
use sha2::{Digest, Sha256};

const SPEC5_CHALLENGE: &str = "Bearer error=\"invalid_token\", error_description=\"a refresh token was presented as a bearer token; refresh tokens only obtain new access tokens: use GET /v1/token/{provider}\"";

async fn assert_refresh_token_refused(h: &Harness, token: &str) {
    let r = h
        .get_with(
            h.url("/v1/token/keap"),
            (AUTHORIZATION.as_str(), &format!("Bearer {token}")),
        )
        .await;
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()[WWW_AUTHENTICATE], SPEC5_CHALLENGE);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "invalid_token");
    assert!(body["message"].as_str().unwrap().contains("refresh token"));
}

#[tokio::test]
async fn api_keys_and_refresh_tokens_as_bearer() {
    let mut h =
        Harness::with_api_keys(Options::default(), "# local apps\nkey-one\nkey-two\n").await;
    h.start().await;

    // Missing key: 401 with the realm challenge.
    let r = h.http.get(h.url("/v1/connections")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.headers()[WWW_AUTHENTICATE],
        "Bearer realm=\"tokenkeeper\""
    );
    // Wrong key: invalid_token.
    let r = h.get_bearer("/v1/connections", "nope").await;
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["error"],
        "invalid_token"
    );
    // Either key works; pages and health checks need none.
    for key in ["key-one", "key-two"] {
        let r = h
            .get_with(
                h.url("/v1/connections"),
                (AUTHORIZATION.as_str(), &format!("Bearer {key}")),
            )
            .await;
        assert_eq!(r.status(), 200);
    }
    assert_eq!(
        h.http.get(h.url("/healthz")).send().await.unwrap().status(),
        200
    );

    h.login("key-one").await;
    assert_eq!(h.authorize("keap", "default").await.status(), 200);
    let first_refresh = h.sim.sim.current_refresh_token().unwrap();
    // The CLI sends the key from the same file.
    let out = h.cli(&["refresh", "keap"]).await;
    common::assert_success(&out);
    let current_refresh = h.sim.sim.current_refresh_token().unwrap();
    assert_ne!(first_refresh, current_refresh);

    // Current and rotated-out refresh tokens as API key: the exact SPEC 5 answer.
    assert_refresh_token_refused(&h, &current_refresh).await;
    assert_refresh_token_refused(&h, &first_refresh).await;
    assert!(
        h.log().contains("bearer_misuse"),
        "logged as a security event"
    );
    assert!(
        !h.log().contains(&current_refresh),
        "never the token itself"
    );

    // Survives a restart (fingerprints are durable).
    h.stop().await;
    h.start().await;
    assert_refresh_token_refused(&h, &first_refresh).await;
}

#[tokio::test]
async fn refresh_token_as_bearer_is_refused_even_without_api_keys() {
    let h = Harness::authorized(Options::default()).await;
    let rt = h.sim.sim.current_refresh_token().unwrap();
    assert_refresh_token_refused(&h, &rt).await;
    // An unrelated bearer is ignored when no API keys are configured.
    let r = h.get_bearer("/v1/token/keap", "something-else").await;
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn inspect_says_what_a_token_is() {
    let h = Harness::authorized(Options::default()).await;
    let old_access = h.sim.sim.access_tokens_issued().last().unwrap().clone();
    let old_refresh = h.sim.sim.current_refresh_token().unwrap();
    assert_eq!(h.cli(&["refresh", "keap"]).await.status.code(), Some(0));
    let access = h.sim.sim.access_tokens_issued().last().unwrap().clone();
    let refresh = h.sim.sim.current_refresh_token().unwrap();

    let inspect = |token: String| {
        let config = h.config_path.clone();
        async move {
            use tokio::io::AsyncWriteExt;
            let mut child = tokio::process::Command::new(common::BIN)
                .args(["inspect", "--config"])
                .arg(config)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let mut stdin = child.stdin.take().unwrap();
            stdin
                .write_all(format!("{token}\n").as_bytes())
                .await
                .unwrap();
            drop(stdin);
            let out = child.wait_with_output().await.unwrap();
            assert_eq!(out.status.code(), Some(0));
            String::from_utf8(out.stdout).unwrap()
        }
    };
    assert!(inspect(access)
        .await
        .contains("the current access token of keap/default"));
    assert!(inspect(old_access)
        .await
        .contains("an earlier access token"));
    for rt in [refresh, old_refresh] {
        let said = inspect(rt).await;
        assert!(
            said.contains("a refresh token of keap/default")
                && said.contains("never send it as a bearer"),
            "{said}"
        );
    }
    assert!(inspect("some-random-string".into())
        .await
        .contains("not a token this daemon"));
}

#[tokio::test]
async fn cross_origin_requests_are_refused() {
    let h = Harness::started(Options::default()).await;
    let r = h
        .get_with(h.url("/v1/connections"), ("origin", "https://evil.example"))
        .await;
    assert_eq!(r.status(), 403);
    assert!(r.headers().get("access-control-allow-origin").is_none());
    let r = h
        .get_with(h.url("/v1/connections"), ("origin", &h.url("")))
        .await;
    assert_eq!(r.status(), 200, "the daemon's own origin is fine");
    let r = h
        .get_with(h.url("/v1/connections"), ("host", "evil.example"))
        .await;
    assert_eq!(r.status(), 421);
}

#[tokio::test]
async fn https_with_a_self_signed_certificate() {
    let mut h = Harness::new(Options {
        server: "tls = \"self-signed\"".into(),
        ..Options::default()
    })
    .await;
    // Start by hand: the harness health check speaks plain HTTP.
    let mut child = common::spawn_daemon(&h.config_path, &h.log_path(), "info", &[]);
    let cert_path = h.dir.path().join("tls-cert.pem");
    common::eventually(Duration::from_secs(20), "certificate generated", || async {
        cert_path.exists()
    })
    .await;
    let pem = std::fs::read_to_string(&cert_path).unwrap();
    let der = base64::engine::general_purpose::STANDARD
        .decode(
            pem.lines()
                .filter(|l| !l.starts_with("-----"))
                .collect::<String>(),
        )
        .unwrap();
    let expected: String = Sha256::digest(&der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":");
    let mode = std::fs::metadata(&cert_path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert_eq!(
        std::fs::metadata(h.dir.path().join("tls-key.pem"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );

    let https = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(pem.as_bytes()).unwrap())
        .build()
        .unwrap();
    let url = format!("https://localhost:{}/healthz", h.port);
    let mut ok = false;
    for _ in 0..100 {
        if let Ok(r) = https.get(&url).send().await {
            ok = r.status() == 200;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "HTTPS answers with the generated certificate");
    let r = https
        .get(format!("https://127.0.0.1:{}/v1/connections", h.port))
        .send()
        .await
        .unwrap();
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["tls_fingerprint"], expected.as_str());
    assert!(h.log().contains(&expected), "fingerprint printed at start");
    // Plain HTTP is not served.
    assert!(h.http.get(h.url("/healthz")).send().await.is_err());
    // The CLI trusts the generated certificate and shows its fingerprint.
    let out = h.cli(&["status"]).await;
    common::assert_success(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains(&expected));
    common::signal(&child, libc::SIGTERM);
    common::wait_exit(&mut child, Duration::from_secs(20)).await;
    h.daemon = None;
}

/// Every row of every table, as text, read-only.
async fn dump(db: &std::path::Path) -> String {
    use sqlx::{Column, ConnectOptions, Row};
    let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(db)
        .read_only(true)
        .connect()
        .await
        .unwrap();
    let mut out = String::new();
    for table in [
        "connections",
        "installation",
        "token_fingerprints",
        "pending_authorizations",
    ] {
        let rows = sqlx::query(&format!("SELECT * FROM {table} ORDER BY 1"))
            .fetch_all(&mut conn)
            .await
            .unwrap();
        for r in rows {
            for (i, c) in r.columns().iter().enumerate() {
                let text = if let Ok(v) = r.try_get::<Option<String>, _>(i) {
                    format!("{v:?}")
                } else if let Ok(v) = r.try_get::<Option<i64>, _>(i) {
                    format!("{v:?}")
                } else {
                    format!("{:?}", r.try_get::<Option<Vec<u8>>, _>(i).ok().flatten())
                };
                out.push_str(&format!("{table}.{}={text};", c.name()));
            }
            out.push('\n');
        }
    }
    out
}

fn raw_db_bytes(h: &Harness) -> Vec<u8> {
    let mut all = Vec::new();
    for suffix in ["", "-wal", "-shm"] {
        let p = format!("{}{suffix}", h.db_path().display());
        if let Ok(b) = std::fs::read(p) {
            all.extend(b);
        }
    }
    all
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

fn write_key(path: &std::path::Path, byte: u8) {
    std::fs::write(
        path,
        base64::engine::general_purpose::STANDARD.encode([byte; 32]),
    )
    .unwrap();
}

#[tokio::test]
async fn encryption_at_rest_wrong_key_and_rekey() {
    let mut h = Harness::new(Options::default()).await;
    write_key(&h.dir.path().join("db-key"), 1);
    let sim = h.sim.base_url.clone();
    let _ = sim;
    h.write_config("", "", "");
    let cfg = std::fs::read_to_string(&h.config_path).unwrap().replace(
        "[storage]\n",
        "[storage]\nencryption_key_file = \"db-key\"\n",
    );
    std::fs::write(&h.config_path, &cfg).unwrap();
    h.start().await;
    assert_eq!(h.authorize("keap", "default").await.status(), 200);
    assert_eq!(h.cli(&["refresh", "keap"]).await.status.code(), Some(0));
    let (_, tok) = h.token().await;
    h.stop().await;

    let raw = raw_db_bytes(&h);
    assert!(raw.len() > 4096);
    for t in h.issued_tokens() {
        assert!(
            !contains(&raw, &t),
            "a token is readable in the database file"
        );
    }

    // A wrong key: start-up fails with a clear error, the database is unchanged.
    let before = dump(&h.db_path()).await;
    assert!(before.contains("keap"), "the dump sees the grant");
    write_key(&h.dir.path().join("db-key"), 2);
    let mut child = common::spawn_daemon(&h.config_path, &h.log_path(), "info", &[]);
    let code = common::wait_exit(&mut child, Duration::from_secs(20)).await;
    assert_eq!(code, Some(1));
    assert!(
        h.log().contains("encrypted with another key"),
        "{}",
        h.log()
    );
    // Compared by content: opening may checkpoint the WAL into the main
    // file, which changes its bytes but not what it holds.
    assert_eq!(
        before,
        dump(&h.db_path()).await,
        "the database was not touched"
    );

    // No key at all: also refused.
    std::fs::write(
        &h.config_path,
        cfg.replace("encryption_key_file = \"db-key\"\n", ""),
    )
    .unwrap();
    let mut child = common::spawn_daemon(&h.config_path, &h.log_path(), "info", &[]);
    assert_eq!(
        common::wait_exit(&mut child, Duration::from_secs(20)).await,
        Some(1)
    );
    assert!(h.log().contains("holds encrypted tokens"));

    // Rekey from key 1 to key 3, then serve with key 3.
    write_key(&h.dir.path().join("db-key"), 1);
    std::fs::write(&h.config_path, &cfg).unwrap();
    let out = rekey_to_new_key(&h, 3).await;
    common::assert_success(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("re-sealed 1 connection"));
    std::fs::write(&h.config_path, cfg.replace("\"db-key\"", "\"new-key\"")).unwrap();
    h.start().await;
    let (s, after) = h.token().await;
    assert_eq!(s, 200);
    assert_eq!(after["access_token"], tok["access_token"]);
    assert_eq!(
        h.cli(&["refresh", "keap"]).await.status.code(),
        Some(0),
        "the re-sealed refresh token works"
    );
}

#[tokio::test]
async fn world_readable_database_is_refused_with_the_fix() {
    let mut h = Harness::started(Options::default()).await;
    h.stop().await;
    let mode = std::fs::metadata(h.db_path()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "created 0600");
    std::fs::set_permissions(h.db_path(), std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut child = common::spawn_daemon(&h.config_path, &h.log_path(), "info", &[]);
    assert_eq!(
        common::wait_exit(&mut child, Duration::from_secs(20)).await,
        Some(1)
    );
    assert!(
        h.log()
            .contains(&format!("chmod 600 {}", h.db_path().display())),
        "{}",
        h.log()
    );
    std::fs::set_permissions(h.db_path(), std::fs::Permissions::from_mode(0o600)).unwrap();
    h.start().await;
}

#[tokio::test]
async fn trace_logs_never_contain_secrets() {
    let mut h = Harness::authorized(Options {
        rust_log: "trace".into(),
        ..Options::default()
    })
    .await;
    assert_eq!(h.cli(&["refresh", "keap"]).await.status.code(), Some(0));
    let (s, _) = h.token().await;
    assert_eq!(s, 200);
    h.sim.sim.revoke_all_grants();
    assert_eq!(h.cli(&["refresh", "keap"]).await.status.code(), Some(1));
    h.stop().await;
    let log = h.log();
    assert!(
        log.len() > 10_000,
        "trace logging was on ({} bytes)",
        log.len()
    );
    assert!(log.contains("TRACE"), "trace level reached the log");
    let mut secrets = h.issued_tokens();
    secrets.push(CLIENT_SECRET.to_string());
    // Basic auth carries the secret base64-encoded.
    secrets.push(
        base64::engine::general_purpose::STANDARD.encode(format!("demo-client:{CLIENT_SECRET}")),
    );
    assert!(secrets.len() >= 5);
    for s in secrets {
        assert!(!log.contains(&s), "a secret reached the log");
    }
}

/// A harness whose database is sealed with `db-key` (key byte 1).
/// Writes a key of `byte`s to `new-key` and runs `tokenkeeper rekey` to it.
async fn rekey_to_new_key(h: &Harness, byte: u8) -> std::process::Output {
    let new_key = h.dir.path().join("new-key");
    write_key(&new_key, byte);
    h.cli(&["rekey", "--new-key-file", new_key.to_str().unwrap()])
        .await
}

async fn encrypted_harness() -> Harness {
    encrypted_harness_with(Options::default()).await
}

async fn encrypted_harness_with(opts: Options) -> Harness {
    let h = Harness::new(opts).await;
    write_key(&h.dir.path().join("db-key"), 1);
    let cfg = std::fs::read_to_string(&h.config_path).unwrap().replace(
        "[storage]\n",
        "[storage]\nencryption_key_file = \"db-key\"\n",
    );
    std::fs::write(&h.config_path, cfg).unwrap();
    h
}

#[tokio::test]
async fn swapped_sealed_columns_are_reported_and_never_served() {
    let mut h = encrypted_harness().await;
    h.start().await;
    assert_eq!(h.authorize("keap", "default").await.status(), 200);
    assert_eq!(h.authorize("keap", "other").await.status(), 200);
    h.stop().await;
    let refresh_token = h.sim.sim.refresh_tokens_issued()[0].clone();
    // No key needed to swap two columns of a row.
    let db = sqlx::SqlitePool::connect_with(
        sqlx::sqlite::SqliteConnectOptions::new().filename(h.db_path()),
    )
    .await
    .unwrap();
    sqlx::query(
        "UPDATE connections SET access_token = refresh_token, refresh_token = access_token \
         WHERE account = 'default'",
    )
    .execute(&db)
    .await
    .unwrap();
    db.close().await;

    h.start().await;
    let r = h.http.get(h.url("/v1/token/keap")).send().await.unwrap();
    let status = r.status();
    let body = r.text().await.unwrap();
    assert_eq!(status, 409, "{body}");
    for t in h.sim.sim.refresh_tokens_issued() {
        assert!(!body.contains(&t), "a refresh token was served");
    }
    assert!(!body.contains(&refresh_token));
    h.assert_connection("default", "authorization_required", "does not decrypt")
        .await;
    // The other connection is untouched and served.
    assert_eq!(h.get_json("/v1/token/keap/other").await.0, 200);
    assert!(h
        .log()
        .lines()
        .any(|l| l.contains("ERROR") && l.contains("does not decrypt")));
}

#[tokio::test]
async fn rekey_refuses_while_a_daemon_holds_the_database() {
    let mut h = encrypted_harness().await;
    h.start().await;
    assert_eq!(h.authorize("keap", "default").await.status(), 200);
    let out = rekey_to_new_key(&h, 3).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("daemon is using the database") && err.contains("systemctl stop tokenkeeper"),
        "{err}"
    );
    // Still the old key: a restart with it serves the grant.
    h.stop().await;
    h.start().await;
    assert_eq!(h.token().await.0, 200);
}

/// Issue 12 item 9 (SPEC 4): what a browser marks as cross-site or
/// same-site is refused on `/v1/*`, `/proxy/*` and `/connect/*` (a foreign
/// `Origin` too), not on `/callback`; proxied answers cannot be rendered
/// as the daemon's own content, cookies stay on their side, and the
/// daemon's pages refuse framing.
#[tokio::test]
async fn cross_site_requests_are_refused_and_answers_are_inert() {
    use axum::http::header as h_;
    let api = common::serve_router(axum::Router::new().fallback(
        |headers: axum::http::HeaderMap| async move {
            let cookie = headers
                .get(h_::COOKIE)
                .map(|v| v.to_str().unwrap_or("?").to_string());
            (
                [
                    (h_::SET_COOKIE, "upstream=1; Path=/"),
                    (h_::CONTENT_TYPE, "text/html"),
                ],
                format!("<script>alert(1)</script>{}", cookie.unwrap_or_default()),
            )
        },
    ))
    .await;
    let mut h = Harness::new(Options::default()).await;
    h.use_api_base(&api);
    h.start().await;
    assert_eq!(h.authorize("keap", "default").await.status(), 200);

    for site in ["cross-site", "same-site", "Cross-Site"] {
        for path in [
            "/v1/token/keap",
            "/v1/connections",
            "/proxy/keap/x",
            "/connect/keap?account=x",
        ] {
            let r = h.get_with(h.url(path), ("sec-fetch-site", site)).await;
            assert_eq!(r.status(), 403, "{site} {path}");
            assert!(r.headers().get("access-control-allow-origin").is_none());
        }
    }
    for path in ["/proxy/keap/x", "/connect/keap?account=x"] {
        let r = h
            .get_with(h.url(path), ("origin", "https://evil.example"))
            .await;
        assert_eq!(r.status(), 403, "foreign Origin on {path}");
    }
    for site in ["same-origin", "none"] {
        let r = h
            .get_with(h.url("/v1/token/keap"), ("sec-fetch-site", site))
            .await;
        assert_eq!(r.status(), 200, "{site}");
        let r = h
            .get_with(h.url("/connect/keap?account=x"), ("sec-fetch-site", site))
            .await;
        assert_eq!(r.status(), 302, "{site}");
    }
    // The provider's redirect reaches /callback cross-site: not refused
    // for that (400 here only because the state is unknown).
    let r = h
        .get_with(
            h.url("/callback?code=x&state=unknown"),
            ("sec-fetch-site", "cross-site"),
        )
        .await;
    assert_eq!(r.status(), 400);

    // Proxied answers: inert, no cookie either way.
    let r = h
        .get_with(
            h.url("/proxy/keap/page"),
            ("cookie", "tokenkeeper_session=secret; other=1"),
        )
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-content-type-options"], "nosniff");
    assert_eq!(r.headers()["content-security-policy"], "sandbox");
    assert!(
        r.headers().get("set-cookie").is_none(),
        "upstream Set-Cookie passed through"
    );
    assert_eq!(
        r.text().await.unwrap(),
        "<script>alert(1)</script>",
        "a Cookie reached the API"
    );

    // Pages refuse framing.
    for path in ["/", "/callback?state=x"] {
        let r = h.http.get(h.url(path)).send().await.unwrap();
        assert_eq!(r.headers()["x-frame-options"], "DENY", "{path}");
        let csp = r.headers()["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("frame-ancestors 'none'"), "{path}: {csp}");
    }
}

/// Issue 12 item 10: with API keys set, every path but /healthz, /readyz
/// and /callback needs a key; a browser gets in with a one-time login link
/// (from `tokenkeeper dashboard` or `connect`) that sets a short-lived
/// HttpOnly, SameSite=Strict session cookie; used or unknown links fail.
#[tokio::test]
async fn api_keys_protect_every_path_and_browsers_log_in_once() {
    let mut h = Harness::with_api_keys(Options::default(), "the-key\n").await;
    h.start().await;

    for path in [
        "/",
        "/connect/keap?account=mine",
        "/metrics",
        "/openapi.json",
        "/nope",
        "/v1/connections",
    ] {
        let r = h.http.get(h.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path} without a key");
        let r = h.get_bearer(path, "wrong").await;
        assert_eq!(r.status(), 401, "{path} with a wrong key");
    }
    let r = h
        .get_with(h.url("/connect/keap?account=mine"), ("accept", "text/html"))
        .await;
    assert_eq!(r.status(), 401);
    assert!(r.text().await.unwrap().contains("tokenkeeper dashboard"));
    for path in ["/", "/metrics", "/openapi.json"] {
        let r = h.get_bearer(path, "the-key").await;
        assert_eq!(r.status(), 200, "{path} with the key");
    }
    for path in ["/healthz", "/readyz"] {
        assert_eq!(
            h.http.get(h.url(path)).send().await.unwrap().status(),
            200,
            "{path}"
        );
    }
    let r = h
        .http
        .get(h.url("/callback?code=x&state=y"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "/callback is reached without a key");

    // `tokenkeeper dashboard` prints a one-time link.
    let out = h.cli(&["dashboard"]).await;
    common::assert_success(&out);
    let link = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(link.starts_with(&h.url("/login?token=")), "{link}");
    let r = h.http.get(&link).send().await.unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/");
    let set = r.headers()["set-cookie"].to_str().unwrap().to_string();
    for attr in ["HttpOnly", "SameSite=Strict", "Max-Age=", "Path=/"] {
        assert!(set.contains(attr), "{set}");
    }
    assert!(!set.contains("Secure"), "plain HTTP here");
    let session = set.split(';').next().unwrap().to_string();
    let r = h.get_with(h.url("/"), ("cookie", &session)).await;
    assert_eq!(r.status(), 200, "the session admits the browser to pages");
    let r = h
        .get_with(h.url("/v1/token/keap"), ("cookie", &session))
        .await;
    assert_eq!(r.status(), 401, "a session cookie is not an API key");
    // Used once: refused the second time; a made-up one too.
    assert_eq!(h.http.get(&link).send().await.unwrap().status(), 403);
    let r = h.http.get(h.url("/login?token=0123")).send().await.unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.headers().get("set-cookie").is_none());
    let r = h
        .get_with(h.url("/"), ("cookie", "tokenkeeper_session=forged"))
        .await;
    assert_eq!(r.status(), 401);

    // `tokenkeeper connect` prints a link that lands on the authorization.
    let out = h.cli(&["connect", "keap", "mine"]).await;
    common::assert_success(&out);
    let link = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let r = h.http.get(&link).send().await.unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/connect/keap?account=mine");
    h.session = Some(common::cookie(&r));
    assert_eq!(h.authorize("keap", "mine").await.status(), 200);
    let r = h.get_bearer("/v1/token/keap/mine", "the-key").await;
    assert_eq!(r.status(), 200);
}

/// Issue 12 item 26: a callback without the browser's cookie is refused
/// and does not spend the pending authorization: the real browser then
/// completes it.
#[tokio::test]
async fn callback_without_the_cookie_does_not_burn_the_authorization() {
    use reqwest::header::COOKIE;
    let h = Harness::started(Options::default()).await;
    let (location, cookie) = h.start_connect("keap", "victim").await;
    let cb = h.approve(&location).await;
    let r = h.http.get(&cb).send().await.unwrap();
    assert_eq!(r.status(), 400, "no cookie");
    assert!(r.text().await.unwrap().contains("another browser"));
    let r = h
        .get_with(&cb, (COOKIE.as_str(), "tokenkeeper_flow=guess"))
        .await;
    assert_eq!(r.status(), 400, "a wrong cookie");
    let r = h.get_with(&cb, (COOKIE.as_str(), &cookie)).await;
    assert_eq!(
        r.status(),
        200,
        "the browser that started it still completes it"
    );
    assert_eq!(h.connection("victim").await["state"], "active");
}

/// Sealed values are bound to the grant generation; a refresh answer
/// without a new refresh token keeps the stored one (SPEC 7), which must
/// then still open under the new generation: the grant survives refreshes
/// and restarts.
#[tokio::test]
async fn a_kept_refresh_token_still_opens_after_refreshes_without_rotation() {
    let mut opts = Options::default();
    opts.sim.rotate_refresh_tokens = false;
    let mut h = encrypted_harness_with(opts).await;
    h.start().await;
    assert_eq!(h.authorize("keap", "default").await.status(), 200);
    for _ in 0..3 {
        let (status, body) = h.post_json("/v1/token/keap/default/refresh").await;
        assert_eq!(status, 200, "{body}");
    }
    h.stop().await;
    h.start().await;
    let (status, body) = h.token().await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(h.connection("default").await["state"], "active");
    let (status, body) = h.post_json("/v1/token/keap/default/refresh").await;
    assert_eq!(status, 200, "after a restart: {body}");
    assert_eq!(
        h.sim.sim.refresh_tokens_issued().len(),
        1,
        "one grant, never rotated"
    );
}

/// Review of issue 12: removing an API key by reload (SIGHUP) also ends
/// the browser sessions and unspent login links it made; those of a key
/// that stays keep working.
#[tokio::test]
async fn removing_an_api_key_ends_its_sessions_and_links() {
    use std::time::Duration;
    let mut h = Harness::with_api_keys(Options::default(), "key-a\nkey-kept\n").await;
    let keys = h.api_keys_path();
    h.start().await;

    let link = |key: &'static str| h.login_link(key);
    let open = |url: String| {
        let h = &h;
        async move {
            let r = h.http.get(&url).send().await.unwrap();
            assert_eq!(r.status(), 303, "the link opens");
            common::cookie(&r)
        }
    };
    let session_a = open(link("key-a").await).await;
    let unspent_a = link("key-a").await;
    let session_kept = open(link("key-kept").await).await;
    let unspent_kept = link("key-kept").await;
    for s in [&session_a, &session_kept] {
        let r = h.get_with(h.url("/"), ("cookie", s)).await;
        assert_eq!(r.status(), 200, "the session works before the reload");
    }

    std::fs::write(&keys, "key-b\nkey-kept\n").unwrap();
    common::signal(h.daemon.as_ref().unwrap(), libc::SIGHUP);
    common::eventually(
        Duration::from_secs(10),
        "the reload removes key-a",
        || async { h.get_bearer("/v1/connections", "key-a").await.status() == 401 },
    )
    .await;

    let r = h.get_with(h.url("/"), ("cookie", &session_a)).await;
    assert_eq!(r.status(), 401, "a removed key's session is refused");
    let r = h.http.get(&unspent_a).send().await.unwrap();
    assert_eq!(r.status(), 403, "a removed key's unspent link is refused");
    assert!(r.headers().get("set-cookie").is_none());
    let r = h.get_with(h.url("/"), ("cookie", &session_kept)).await;
    assert_eq!(r.status(), 200, "a kept key's session still works");
    open(unspent_kept).await;
}

/// Review of issue 12: `connect --open` behind API keys never puts the
/// one-time login link in the browser opener's command line (readable by
/// every local user): it hands over a private file that forwards to it.
/// A stand-in `xdg-open` records its arguments.
#[tokio::test]
async fn connect_open_keeps_the_login_link_out_of_argv() {
    use std::os::unix::fs::PermissionsExt;
    let mut h = Harness::with_api_keys(Options::default(), "the-key\n").await;
    h.start().await;
    let bin = h.dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let record = h.dir.path().join("argv");
    let opener = bin.join("xdg-open");
    common::write_script(
        &opener,
        format!("#!/bin/sh\nprintf '%s' \"$*\" > '{}'\n", record.display()),
    );
    let runtime = h.dir.path().join("run");
    std::fs::create_dir(&runtime).unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = tokio::process::Command::new(common::BIN)
        .args(["connect", "keap", "mine", "--open", "--config"])
        .arg(&h.config_path)
        .env("PATH", path)
        .env("XDG_RUNTIME_DIR", &runtime)
        .env_remove("RUST_LOG")
        .output()
        .await
        .unwrap();
    common::assert_success(&out);
    let link = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(link.contains("/login?token="), "{link}");
    let token = link.split("token=").nth(1).unwrap();
    let argv = std::fs::read_to_string(&record).unwrap();
    assert!(
        !argv.contains(token),
        "the link is in the opener's argv: {argv}"
    );
    let file = std::path::Path::new(&argv);
    assert!(file.starts_with(&runtime), "{argv}");
    let mode = std::fs::metadata(file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let html = std::fs::read_to_string(file).unwrap();
    assert!(
        html.contains(&format!("content=\"0;url={}\"", link.replace('&', "&amp;"))),
        "{html}"
    );
    // The link itself still works (the stand-in spent nothing).
    let r = h.http.get(&link).send().await.unwrap();
    assert_eq!(r.status(), 303);
}

/// Review of issue 12: over HTTPS the session cookie is
/// `__Host-tokenkeeper_session` with `Secure` (browsers scope cookies to
/// the host, not the port: a plain-HTTP server on another local port then
/// neither receives nor can plant it); the plain name is not accepted.
#[tokio::test]
async fn https_session_cookie_is_host_prefixed_and_secure() {
    let h = Harness::with_api_keys(
        Options {
            server: "tls = \"self-signed\"".into(),
            ..Options::default()
        },
        "the-key\n",
    )
    .await;
    let mut child = common::spawn_daemon(&h.config_path, &h.log_path(), "info", &[]);
    let cert_path = h.dir.path().join("tls-cert.pem");
    common::eventually(Duration::from_secs(20), "certificate generated", || async {
        cert_path.exists()
    })
    .await;
    let pem = std::fs::read_to_string(&cert_path).unwrap();
    let https = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(pem.as_bytes()).unwrap())
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let base = format!("https://localhost:{}", h.port);
    let mut link = None;
    for _ in 0..100 {
        if let Ok(r) = https
            .post(format!("{base}/v1/login-links"))
            .bearer_auth("the-key")
            .json(&serde_json::json!({"next": "/"}))
            .send()
            .await
        {
            assert_eq!(r.status(), 200);
            let v: serde_json::Value = r.json().await.unwrap();
            link = Some(v["url"].as_str().unwrap().to_string());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let link = link.expect("HTTPS answers");
    let token = link.split("token=").nth(1).unwrap();
    let r = https
        .get(format!("{base}/login?token={token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let set = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(set.starts_with("__Host-tokenkeeper_session="), "{set}");
    for attr in ["; Secure", "; Path=/", "HttpOnly", "SameSite=Strict"] {
        assert!(set.contains(attr), "{set}");
    }
    assert!(!set.contains("Domain"), "{set}");
    let session = set.split(';').next().unwrap().to_string();
    let page = |cookie: String| {
        let (https, base) = (&https, &base);
        async move {
            https
                .get(format!("{base}/"))
                .header("cookie", cookie)
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    assert_eq!(page(session.clone()).await, 200);
    let plain = session.replacen("__Host-", "", 1);
    assert_eq!(
        page(plain).await,
        401,
        "the unprefixed name is not accepted over HTTPS"
    );
    common::signal(&child, libc::SIGTERM);
    common::wait_exit(&mut child, Duration::from_secs(20)).await;
}
