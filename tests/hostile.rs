//! Hostile input: property tests for the config parser and the callback
//! handling (no panic, no 5xx, nothing stored), and size limits.

mod common;

use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use common::{Harness, Options};
use proptest::prelude::*;
use tokenkeeper::config::{self, Config};
use tokenkeeper::http::{router, AppState};
use tokenkeeper::refresh::Engine;
use tokenkeeper::store::Store;
use tower::ServiceExt;

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    /// Arbitrary text never panics the parser; it is accepted or explained.
    #[test]
    fn config_parser_never_panics(text in "\\PC{0,300}") {
        match config::parse(&text, std::path::Path::new("/tmp/x.toml")) {
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
        let _ = config::parse(&text, std::path::Path::new("/tmp/x.toml"));
    }
}

fn callback_router(rt: &tokio::runtime::Runtime, dir: &std::path::Path) -> tokenkeeper::http::App {
    rt.block_on(async {
        let store = Store::open(&dir.join("db.sqlite"), None).await.unwrap();
        let cfg = Config::dev("127.0.0.1:1".parse().unwrap(), dir.join("unused.db"), "s");
        let http = reqwest::Client::new();
        let engine = Engine::start(store, tokenkeeper::daemon::settings_from(&cfg, &http))
            .await
            .unwrap();
        router(
            AppState::new(tokenkeeper::http::Shared {
                engine,
                public_url: url::Url::parse("http://127.0.0.1:1/").unwrap(),
                allowed_hosts: Arc::new(vec!["127.0.0.1".into()]),
                api_keys: None,
                tls_fingerprint: None,
                proxy: Arc::new(tokenkeeper::http::proxy::Proxy::new(
                    Arc::new(tokenkeeper::ratelimit::RateLimits::new(
                        cfg.providers.values(),
                    )),
                    std::time::Duration::from_secs(1),
                )),
            }),
            None,
        )
    })
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
    let mut h = Harness::new(Options::default()).await;
    h.start().await;
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
