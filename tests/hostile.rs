//! Hostile input: property tests for the config parser and the callback
//! handling (no panic, no 5xx, nothing stored), and size limits.

mod common;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use common::{Harness, Options};
use proptest::prelude::*;
use tokenkeeper::config;
use tokenkeeper::daemon::App;
use tokenkeeper::store::Store;
use tower::ServiceExt;

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    /// Arbitrary text never panics the parser; it is accepted or explained.
    #[test]
    fn config_parser_never_panics(text in "\\PC{0,300}") {
        let path = std::path::Path::new("/tmp/x.toml");
        match config::parse(&text, path) {
            Ok(_) => {}
            Err(e) => prop_assert!(!e.problems.is_empty()),
        }
        // The client reading of the same file, too.
        match config::parse_for_client(&text, path, &[]) {
            Ok(_) => {}
            Err(e) => prop_assert!(!e.problems.is_empty()),
        }
    }

    /// TOML-shaped input with known keys and odd values.
    #[test]
    fn config_parser_handles_odd_values(
        section in prop::sample::select(vec!["server", "storage", "refresh", "providers.k", "notify", "providers.k.limits"]),
        key in prop::sample::select(vec!["listen", "tls", "jitter", "at_fraction", "client_id", "preset", "scopes", "per_second", "path", "bogus", "extra_authorize_params"]),
        value in prop::sample::select(vec!["\"\"", "\"10x\"", "-1", "1e400", "[1, \"a\"]", "{ a = 1 }", "true", "\"self-signed\"", "\"0.0.0.0:1\"", "99999999999999999999", "\"keap\"", "0.5"]),
    ) {
        let text = format!("[{section}]\n{key} = {value}\n");
        let path = std::path::Path::new("/tmp/x.toml");
        let _ = config::parse(&text, path);
        let _ = config::parse_for_client(&text, path, &[]);
    }
}

fn callback_router(rt: &tokio::runtime::Runtime, dir: &std::path::Path) -> tokenkeeper::http::App {
    test_app(rt, dir).router()
}

/// The daemon's application in-process, built as `serve --dev` builds it
/// (provider `demo`, Keap preset), with its database in `dir`.
fn test_app(rt: &tokio::runtime::Runtime, dir: &std::path::Path) -> App {
    let addr = "127.0.0.1:1".parse().unwrap();
    let cfg = tokenkeeper::dev::config(addr, dir.join("db.sqlite"), "s");
    rt.block_on(App::build(cfg, addr, None)).unwrap()
}

/// Sends `GET path(i)` for `i` in `0..n`; each must answer 404 (unknown).
fn flood(
    rt: &tokio::runtime::Runtime,
    app: &tokenkeeper::http::App,
    n: usize,
    path: impl Fn(usize) -> String,
) {
    rt.block_on(async {
        for i in 0..n {
            let req = Request::get(path(i))
                .header(header::HOST, "127.0.0.1")
                .body(Body::empty())
                .unwrap();
            let r = app.clone().oneshot(req).await.unwrap();
            assert_eq!(r.status(), StatusCode::NOT_FOUND);
        }
    });
}

/// Issue 12 item 11: a flood of unknown accounts on `/proxy/{p}@{account}`
/// creates no limiter entry and spends none of the provider's quota.
#[test]
fn unknown_proxy_accounts_leave_no_limiter_state() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let built = test_app(&rt, dir.path());
    let (app, limits) = (built.router(), built.limits());
    flood(&rt, &app, 10_000, |i| {
        format!("/proxy/demo@flood-{i}/crm/rest/v1/contacts")
    });
    assert_eq!(
        limits.tenant_count(),
        0,
        "no limiter entry for unknown accounts"
    );
    let q = limits.quota("demo", "flood-1").unwrap();
    assert_eq!(q.client.daily_used, 0, "no quota spent");
    assert!(q.tenant.is_none());
}

/// The same flood against a provider whose base URL comes from each
/// grant (Salesforce's instance): no base URL is cached for a made-up name.
#[test]
fn unknown_proxy_accounts_leave_no_cached_base_url() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let addr = "127.0.0.1:1".parse().unwrap();
    let mut cfg = tokenkeeper::dev::config(addr, dir.path().join("db.sqlite"), "s");
    let mut sf = cfg.providers["demo"].clone();
    sf.name = "sf".into();
    sf.preset = tokenkeeper::config::Preset::Salesforce;
    cfg.providers.insert("sf".into(), sf);
    let built = rt.block_on(App::build(cfg, addr, None)).unwrap();
    let app = built.router();
    flood(&rt, &app, 1_000, |i| {
        format!("/proxy/sf@flood-{i}/services/data")
    });
    assert_eq!(
        built.proxy().cached_bases(),
        0,
        "a base URL was cached for made-up accounts"
    );
}

#[test]
fn callback_query_fuzz_never_fails_the_server() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let app = callback_router(&rt, dir.path());
    // A real pending authorization, so the fuzz can hit a valid state: a
    // callback without the browser's cookie must still store nothing.
    let connect = Request::get("/connect/demo?account=default")
        .header(header::HOST, "127.0.0.1")
        .body(Body::empty())
        .unwrap();
    let r = rt.block_on(app.clone().oneshot(connect)).unwrap();
    assert_eq!(r.status(), StatusCode::FOUND);
    let location = r.headers()[header::LOCATION].to_str().unwrap();
    let state = url::Url::parse(location)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "state")
        .map(|(_, v)| v.into_owned())
        .expect("state in the authorization URL");
    let mut fragments: Vec<String> = [
        "code=",
        "state=",
        "error=",
        "error_description=",
        "&",
        "=",
        "%",
        "%00",
        "%ZZ",
        "a",
        "state=abc",
        "code=x&state=",
        "\u{00e9}",
        "+",
        ";",
        "state=%F0%9F%98%80",
        "error=access_denied",
    ]
    .map(String::from)
    .to_vec();
    fragments.push(format!("state={state}"));
    let fragment = prop::sample::select(fragments);
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 300,
        ..ProptestConfig::default()
    });
    runner
        .run(&prop::collection::vec(fragment, 0..12), |parts| {
            let uri = format!("/callback?{}", parts.concat());
            // `%`, `\u{e9}` and the like make some URIs unbuildable: those
            // never reach a server, so there is nothing to check.
            let Ok(req) = Request::get(&uri)
                .header(header::HOST, "127.0.0.1")
                .body(Body::empty())
            else {
                return Ok(());
            };
            let status = rt.block_on(app.clone().oneshot(req)).unwrap().status();
            prop_assert!(
                status == StatusCode::BAD_REQUEST,
                "GET {uri} answered {status}: unknown states, and known ones without the browser's cookie, must be a 400 page"
            );
            Ok(())
        })
        .unwrap();
    let stored = rt.block_on(async {
        Store::open(&dir.path().join("db.sqlite"), None)
            .await
            .unwrap()
            .load_connections()
            .await
            .unwrap()
            .len()
    });
    assert_eq!(stored, 0, "nothing stored by hostile callbacks");
}

#[tokio::test]
async fn oversized_bodies_and_headers_are_refused() {
    let h = Harness::started(Options::default()).await;
    let r = h
        .http
        .post(h.url("/v1/inspect"))
        .body(vec![b'a'; 100 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413, "bodies over 64 KiB are refused");
    let r = h
        .http
        .post(h.url("/v1/inspect"))
        .body("short-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = h
        .http
        .get(h.url("/v1/connections"))
        .header("x-big", "b".repeat(200 * 1024))
        .send()
        .await;
    assert_eq!(r.unwrap().status(), 431);
    let (s, _) = h
        .get_json(&format!("/v1/token/{}", "a".repeat(10_000)))
        .await;
    assert_eq!(s, 414);
    let (s, b) = h
        .get_json(&format!("/v1/token/{}", "a".repeat(1_000)))
        .await;
    assert_eq!((s, b["error"].as_str()), (404, Some("unknown_provider")));
    // The daemon is still fine.
    assert_eq!(
        h.http.get(h.url("/healthz")).send().await.unwrap().status(),
        200
    );
}

/// Raises this process's open-file limit (the daemon inherits it) so a
/// test can hold many sockets; returns the soft limit in force.
fn raise_nofile(want: u64) -> u64 {
    tokenkeeper::http::server::raise_file_limit(want)
}

/// Opens a connection that sends part of a request head and then nothing.
async fn slow_socket(port: u16) -> Option<tokio::net::TcpStream> {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(b"GET /v1/token/keap HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: a")
        .await
        .ok()?;
    Some(s)
}

/// Whether the daemon closed `s` within `limit` (EOF or reset).
async fn closed_within(mut s: tokio::net::TcpStream, limit: std::time::Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            // An error answer (e.g. 408) before the close is fine too.
            Ok(Ok(_)) => continue,
        }
    }
}

/// Issue 12 item 12: 1,000 sockets that never finish their headers
/// neither block `/v1/token` nor stay open past `header_read_timeout`; an
/// idle keep-alive connection is closed after `idle_timeout`; SIGTERM exits
/// promptly while slow sockets are open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_do_not_starve_the_daemon() {
    use std::time::{Duration, Instant};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let files = raise_nofile(4096);
    let n = 1000.min(files.saturating_sub(200) as usize / 2);
    let mut h = Harness::authorized(Options {
        server: "header_read_timeout = \"2s\"\nidle_timeout = \"3s\"".into(),
        rust_log: "warn,tokenkeeper=info".into(),
        ..Options::default()
    })
    .await;

    let mut slow = Vec::new();
    for _ in 0..n {
        if let Some(s) = slow_socket(h.port).await {
            slow.push(s);
        }
    }
    assert!(slow.len() >= n * 9 / 10, "opened {} of {n}", slow.len());
    // A fresh client is answered while they are all open.
    let fresh = common::client();
    let r = fresh.get(h.url("/v1/token/keap")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // And they are closed after header_read_timeout (2 s), not kept.
    let closes: Vec<_> = slow
        .into_iter()
        .map(|s| tokio::spawn(closed_within(s, Duration::from_secs(20))))
        .collect();
    for c in closes {
        assert!(
            c.await.unwrap(),
            "a socket with unfinished headers stayed open"
        );
    }

    // An idle keep-alive connection is closed after idle_timeout (3 s).
    let mut ka = tokio::net::TcpStream::connect(("127.0.0.1", h.port))
        .await
        .unwrap();
    ka.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    let got = ka.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..got]).starts_with("HTTP/1.1 200"));
    assert!(
        closed_within(ka, Duration::from_secs(20)).await,
        "idle keep-alive stayed open"
    );

    // SIGTERM with slow sockets open: the daemon exits promptly.
    let mut held = Vec::new();
    for _ in 0..100 {
        if let Some(s) = slow_socket(h.port).await {
            held.push(s);
        }
    }
    let started = Instant::now();
    assert_eq!(h.stop().await, Some(0));
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "shutdown took {:?} with slow sockets open",
        started.elapsed()
    );
    drop(held);
}

/// `server.max_connections` bounds the sockets the daemon holds: beyond it
/// connections wait in the backlog, not in a descriptor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_bounds_open_sockets() {
    use std::time::Duration;
    let h = Harness::started(Options {
        server: "max_connections = 16\nheader_read_timeout = \"30s\"".into(),
        rust_log: "warn,tokenkeeper=info".into(),
        ..Options::default()
    })
    .await;
    let pid = h.daemon.as_ref().unwrap().id();
    let fds = || std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    let baseline = fds();
    let mut slow = Vec::new();
    for _ in 0..100 {
        if let Some(s) = slow_socket(h.port).await {
            slow.push(s);
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let held = fds().saturating_sub(baseline);
    assert!(
        held <= 16 + 4,
        "the daemon holds {held} more descriptors with max_connections = 16"
    );
    drop(slow);
    // Freed: the daemon answers again.
    common::eventually(
        Duration::from_secs(20),
        "the daemon answers after the slow sockets close",
        || async {
            common::client()
                .get(h.url("/healthz"))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        },
    )
    .await;
}

/// Review of issue 12: a request body that stops coming holds its
/// connection no longer than `header_read_timeout` (it used to disable
/// every timer while the handler waited); a silent socket is closed after
/// `header_read_timeout` from accept, not `idle_timeout`; and a handler
/// that is busy longer than that after reading its body (a slow upstream
/// behind `/proxy`) is not cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_request_bodies_are_timed_out_but_slow_answers_are_not() {
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;
    let api = common::serve_router(axum::Router::new().fallback(|| async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        "{\"ok\":true}"
    }))
    .await;
    let mut h = Harness::new(Options {
        server: "header_read_timeout = \"1s\"\nidle_timeout = \"60s\"\nmax_connections = 5".into(),
        rust_log: "warn,tokenkeeper=info".into(),
        ..Options::default()
    })
    .await;
    h.use_api_base(&api);
    h.start().await;
    assert_eq!(h.authorize("keap", "default").await.status(), 200);

    let mut socks = Vec::new();
    for path in [
        "/v1/inspect",
        "/v1/login-links",
        "/proxy/keap/crm/rest/v1/notes",
    ] {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", h.port))
            .await
            .unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{",
            h.port
        );
        s.write_all(head.as_bytes()).await.unwrap();
        socks.push(s);
    }
    // Sends nothing at all.
    socks.push(
        tokio::net::TcpStream::connect(("127.0.0.1", h.port))
            .await
            .unwrap(),
    );
    let closes: Vec<_> = socks
        .into_iter()
        .map(|s| tokio::spawn(closed_within(s, Duration::from_secs(20))))
        .collect();
    for (i, c) in closes.into_iter().enumerate() {
        assert!(
            c.await.unwrap(),
            "socket {i} (a stalled body or a silent socket) stayed open past header_read_timeout"
        );
    }
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        common::client().get(h.url("/healthz")).send(),
    )
    .await
    .expect("/healthz answers once the stalled sockets are closed")
    .unwrap();
    assert_eq!(r.status(), 200);

    // A complete body and a 3 s upstream: the answer is not cut.
    let r = h
        .http
        .post(h.url("/proxy/keap/crm/rest/v1/notes"))
        .header("content-type", "application/json")
        .body("{\"note\":\"x\"}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "{\"ok\":true}");
}
