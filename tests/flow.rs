//! Core daemon against the simulator: browser authorization, the token
//! endpoint, restart, and every error row of SPEC 4.

mod common;

use std::time::Duration;

use common::{Harness, Options};
use reqwest::header::{CACHE_CONTROL, COOKIE, LOCATION, RETRY_AFTER};
use tokenkeeper::dev::Fault;

#[tokio::test]
async fn full_flow_connect_callback_token() {
    let h = Harness::started(Options::default()).await;

    let (location, cookie) = h.start_connect("keap", "default").await;
    let url = url::Url::parse(&location).unwrap();
    assert!(location.starts_with(&h.sim.url("/authorize")), "{location}");
    let q: std::collections::HashMap<_, _> = url.query_pairs().into_owned().collect();
    assert_eq!(q["client_id"], "demo-client");
    assert_eq!(q["redirect_uri"], h.url("/callback"));
    assert_eq!(q["response_type"], "code");
    assert_eq!(q["scope"], "full");
    assert!(q["state"].len() >= 16);
    assert_eq!(q["code_challenge_method"], "S256");
    assert!(q["code_challenge"].len() >= 43);
    assert!(cookie.starts_with("tokenkeeper_flow="));

    let callback = h.approve(&location).await;
    let r = h.get_with(&callback, (COOKIE.as_str(), &cookie)).await;
    assert_eq!(r.status(), 200);
    let page = r.text().await.unwrap();
    assert!(page.contains("Connected"), "{page}");
    assert_eq!(h.sim.sim.stats().code_exchanges, 1);

    let r = h.http.get(h.url("/v1/token/keap")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()[CACHE_CONTROL], "no-store");
    let text = r.text().await.unwrap();
    let body: serde_json::Value = serde_json::from_str(&text).unwrap();
    let issued = h.sim.sim.access_tokens_issued();
    assert_eq!(body["access_token"], issued.last().unwrap().as_str());
    assert!(h
        .sim
        .sim
        .access_token_valid(body["access_token"].as_str().unwrap()));
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["provider"], "keap");
    assert_eq!(body["account"], "default");
    let exp = body["expires_in"].as_i64().unwrap();
    assert!((86000..=86400).contains(&exp), "{exp}");
    chrono::DateTime::parse_from_rfc3339(body["expires_at"].as_str().unwrap()).unwrap();
    for rt in h.sim.sim.refresh_tokens_issued() {
        assert!(
            !text.contains(&rt),
            "the refresh token leaked through /v1/token"
        );
    }
    // Same for the explicit account path and the connections listing.
    let (s, b) = h.get_json("/v1/token/keap/default").await;
    assert_eq!(s, 200);
    assert_eq!(b["access_token"], body["access_token"]);
    let listing = h.get_text("/v1/connections").await;
    for rt in h.sim.sim.refresh_tokens_issued() {
        assert!(!listing.contains(&rt));
    }
    let c = h.connection("default").await;
    assert_eq!(c["state"], "active");
    for k in [
        "provider",
        "account",
        "state",
        "expires_at",
        "refreshed_at",
        "next_refresh_at",
        "refresh_token_issued_at",
        "last_error",
    ] {
        assert!(c.get(k).is_some(), "missing {k} in {c}");
    }
}

#[tokio::test]
async fn restart_keeps_the_grant() {
    let mut h = Harness::authorized(Options::default()).await;
    let (_, before) = h.token().await;
    assert_eq!(h.stop().await, Some(0), "SIGTERM exits 0");
    h.start().await;
    let (s, after) = h.token().await;
    assert_eq!(s, 200);
    assert_eq!(before["access_token"], after["access_token"]);
    assert_eq!(h.sim.sim.stats().code_exchanges, 1, "no re-authorization");
    // And the stored refresh token still works after the restart.
    let r = h.post("/v1/token/keap/refresh").await;
    assert_eq!(r.status(), 200);
    let b: serde_json::Value = r.json().await.unwrap();
    assert_ne!(b["access_token"], before["access_token"]);
    assert!(h
        .sim
        .sim
        .access_token_valid(b["access_token"].as_str().unwrap()));
}

#[tokio::test]
async fn spec_error_rows() {
    let h = Harness::started(Options {
        access_lifetime: Duration::from_secs(2),
        refresh: "min_validity = \"0s\"\ncheck_interval = \"1h\"".into(),
        ..Options::default()
    })
    .await;

    // 404 unknown_provider
    let (s, b) = h.get_json("/v1/token/nosuch").await;
    assert_eq!((s, b["error"].as_str()), (404, Some("unknown_provider")));
    // 404 unknown_connection
    let (s, b) = h.get_json("/v1/token/keap/other").await;
    assert_eq!((s, b["error"].as_str()), (404, Some("unknown_connection")));
    assert!(b["message"].as_str().unwrap().contains("connect"));

    assert_eq!(h.authorize("keap", "default").await.status(), 200);

    // 503 refresh_failed: the token expired and the provider is down.
    h.sim.sim.set_fault(Some(Fault::Status(503)));
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let r = h.http.get(h.url("/v1/token/keap")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let ra: u64 = r.headers()[RETRY_AFTER].to_str().unwrap().parse().unwrap();
    assert!(ra >= 1);
    let b: serde_json::Value = r.json().await.unwrap();
    assert_eq!(b["error"], "refresh_failed");
    assert_eq!(h.connection("default").await["state"], "retrying");

    // 409 authorization_required: the provider rejects the refresh token.
    h.sim.sim.set_fault(None);
    h.sim.sim.revoke_all_grants();
    let r = h.post("/v1/token/keap/refresh").await;
    assert_eq!(r.status(), 409);
    let b: serde_json::Value = r.json().await.unwrap();
    assert_eq!(b["error"], "authorization_required");
    assert_eq!(b["connect_url"], h.url("/connect/keap?account=default"));
    h.assert_connection("default", "authorization_required", "Invalid Refresh Token")
        .await;

    // A fresh authorization brings it back.
    assert_eq!(h.authorize("keap", "default").await.status(), 200);
    let (s, _) = h.token().await;
    assert_eq!(s, 200);
    assert_eq!(h.connection("default").await["state"], "active");

    // Unknown provider on connect: an HTML page, not a redirect.
    let r = h.http.get(h.url("/connect/nosuch")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    // Bad account name.
    let r = h
        .http
        .get(h.url("/connect/keap?account=Bad%20Name"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // DELETE forgets; a second DELETE is unknown_connection.
    let r = h.delete("/v1/connections/keap/default").await;
    assert_eq!(r.status(), 204);
    assert_eq!(h.sim.sim.stats().revocations, 1, "revoked upstream");
    let r = h.delete("/v1/connections/keap/default").await;
    assert_eq!(r.status(), 404);
    let (s, b) = h.token().await;
    assert_eq!((s, b["error"].as_str()), (404, Some("unknown_connection")));
}

#[tokio::test]
async fn callback_failures_store_nothing() {
    let h = Harness::started(Options::default()).await;

    // The user clicks Deny.
    let (location, cookie) = h.start_connect("keap", "denied").await;
    let query = location.split_once('?').unwrap().1.to_string();
    let r = h
        .http
        .post(h.sim.url("/deny"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(query)
        .send()
        .await
        .unwrap();
    let cb = r.headers()[LOCATION].to_str().unwrap().to_string();
    let r = h.get_with(&cb, (COOKIE.as_str(), &cookie)).await;
    assert_eq!(r.status(), 400);
    let page = r.text().await.unwrap();
    assert!(
        page.contains("denied") && page.contains("connect again"),
        "{page}"
    );

    // A callback without the browser cookie (a stolen link).
    let (location, _cookie) = h.start_connect("keap", "stolen").await;
    let cb = h.approve(&location).await;
    let r = h.http.get(&cb).send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("another browser"));

    // Replayed state: the first use succeeds, the second is refused.
    let (location, cookie) = h.start_connect("keap", "replay").await;
    let cb = h.approve(&location).await;
    assert_eq!(
        h.get_with(&cb, (COOKIE.as_str(), &cookie)).await.status(),
        200
    );
    let r = h.get_with(&cb, (COOKIE.as_str(), &cookie)).await;
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("already used"));

    // Unknown state and missing state.
    let r = h
        .http
        .get(h.url("/callback?code=x&state=nonexistent"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = h.http.get(h.url("/callback?code=x")).send().await.unwrap();
    assert_eq!(r.status(), 400);

    // The provider fails the code exchange: 502, nothing stored.
    let (location, cookie) = h.start_connect("keap", "exchange").await;
    let cb = h.approve(&location).await;
    h.sim.sim.push_fault(Fault::Status(500));
    let r = h.get_with(&cb, (COOKIE.as_str(), &cookie)).await;
    assert_eq!(r.status(), 502);
    assert!(r.text().await.unwrap().contains("Nothing was stored"));

    let (_, v) = h.get_json("/v1/connections").await;
    let accounts: Vec<_> = v["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["account"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        accounts,
        vec!["replay".to_string()],
        "only the completed flow is stored"
    );
}

#[tokio::test]
async fn host_header_is_checked() {
    let h = Harness::started(Options::default()).await;
    let r = h
        .get_with(h.url("/v1/connections"), ("host", "evil.example"))
        .await;
    assert_eq!(r.status(), 421);
    let r = h
        .get_with(h.url("/healthz"), ("host", "localhost:1234"))
        .await;
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("access-control-allow-origin").is_none());
    let (s, _) = h.get_json("/readyz").await;
    assert_eq!(s, 200);
}

/// A fresh token is answered before routing (issue 9's fast lane); requests
/// it leaves to the router (percent-encoded names, other methods, invalid
/// names) must get the same answer or the router's own. Tokens that need a
/// refresh take the router's path throughout `tests/refresh.rs`.
#[tokio::test]
async fn token_answers_agree_on_both_serving_paths() {
    let h = Harness::authorized(Options::default()).await;
    let fetch = |path: &'static str| {
        let (http, url) = (h.http.clone(), h.url(path));
        async move {
            let r = http.get(url).send().await.unwrap();
            let status = r.status().as_u16();
            let headers: Vec<String> = ["content-type", "cache-control"]
                .iter()
                .map(|n| format!("{n}: {:?}", r.headers().get(*n)))
                .collect();
            let body: serde_json::Value = r.json().await.unwrap_or_default();
            (status, headers, body)
        }
    };
    let fast = fetch("/v1/token/keap").await;
    assert_eq!(fast.0, 200, "{:?}", fast.2);
    for path in [
        "/v1/token/keap/default",
        "/v1/token/ke%61p",         // decoded by the router
        "/v1/token/keap/d%65fault", // idem
        "/v1/token/keap?x=1",
    ] {
        let other = fetch(path).await;
        assert_eq!(other.0, 200, "{path}: {:?}", other.2);
        assert_eq!(other.1, fast.1, "{path}: headers");
        assert_eq!(other.2["access_token"], fast.2["access_token"], "{path}");
        assert_eq!(other.2["expires_at"], fast.2["expires_at"], "{path}");
        let keys =
            |v: &serde_json::Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
        assert_eq!(keys(&other.2), keys(&fast.2), "{path}: fields");
    }
    // Not the fast lane's to answer: the router's answers stand.
    assert_eq!(fetch("/v1/token/keap/refresh").await.0, 405);
    let error = |r: (u16, Vec<String>, serde_json::Value)| (r.0, r.2["error"].clone());
    assert_eq!(
        error(fetch("/v1/token/Keap").await),
        (404, "unknown_provider".into())
    );
    assert_eq!(
        error(fetch("/v1/token/keap/nobody").await),
        (404, "unknown_connection".into())
    );
    assert_eq!(
        error(fetch("/v1/token/keap/default/extra").await),
        (404, "not_found".into())
    );
    let head = h.http.head(h.url("/v1/token/keap")).send().await.unwrap();
    assert_eq!(head.status(), 200);
}
