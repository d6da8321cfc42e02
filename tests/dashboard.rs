//! The dashboard's content, read from the real daemon's HTML: the
//! timeline's points (one per refresh, failures marked apart), the access
//! token's lifetime bar, the quota gauge from what the proxy learned, the
//! recent events, and the live-update script with the policy that lets it
//! run. (tests/e2e/dashboard.mjs checks the same page in Chromium.)

mod common;

use std::time::Duration;

use common::{Harness, Options};
use tokenkeeper::dev::{Fault, SimLimits, SimulatorConfig};

/// The text between the first `start` and the `end` after it.
fn between<'a>(html: &'a str, start: &str, end: &str) -> &'a str {
    let from = html
        .find(start)
        .unwrap_or_else(|| panic!("{start:?} in {html}"));
    let rest = &html[from..];
    let to = rest
        .find(end)
        .unwrap_or_else(|| panic!("{end:?} after {start:?}"));
    &rest[..to + end.len()]
}

/// The value of `attr="..."` in the first element that has it, in `html`.
fn attr<'a>(html: &'a str, attr: &str) -> &'a str {
    let key = format!(" {attr}=\"");
    let from = html.find(&key).unwrap_or_else(|| panic!("{key} in {html}")) + key.len();
    let len = html[from..].find('"').unwrap();
    &html[from..from + len]
}

/// The timeline SVG of the first connection.
fn timeline(html: &str) -> &str {
    between(html, "<svg class=\"timeline\"", "</svg>")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_timeline_has_a_point_per_refresh_and_marks_failures() {
    let h = Harness::authorized(Options::default()).await;
    for _ in 0..3 {
        let (s, b) = h.force_refresh().await;
        assert_eq!(s, 200, "{b}");
    }
    h.sim.sim.push_fault(Fault::Status(500));
    let (s, b) = h.force_refresh().await;
    assert_eq!(s, 503, "{b}");

    let html = h.get_text("/").await;
    let tl = timeline(&html);
    assert_eq!(tl.matches("class=\"point ok\"").count(), 3, "{tl}");
    assert_eq!(tl.matches("data-kind=\"refreshed\"").count(), 3, "{tl}");
    assert_eq!(tl.matches("data-duration-ms=\"").count(), 3, "{tl}");
    assert_eq!(attr(tl, "data-refreshes"), "3");
    // The failure: its own shape, class and lane, and said in words.
    assert_eq!(tl.matches("class=\"point failure\"").count(), 1, "{tl}");
    assert_eq!(
        tl.matches("data-kind=\"refresh_failed\"").count(),
        1,
        "{tl}"
    );
    assert_eq!(attr(tl, "data-failures"), "1");
    assert!(tl.contains("3 refreshes, 1 failure."), "{tl}");
    // The grant's authorization is there too, as another kind of event.
    assert!(
        tl.contains("class=\"point other\" data-kind=\"authorized\""),
        "{tl}"
    );
    // Keap rotates the refresh token on each refresh: listed under the
    // events, not drawn over the refreshes.
    assert!(!tl.contains("data-kind=\"rotated\""), "{tl}");
    assert_eq!(html.matches("<tr data-kind=\"rotated\">").count(), 3);
    // Every point carries its time; a refresh's tooltip its duration.
    assert_eq!(tl.matches("data-at=\"").count(), 5, "{tl}");
    assert_eq!(tl.matches("class=\"point ").count(), 5, "{tl}");
    assert!(tl.contains("took "), "{tl}");

    // The recent events list the failure first, marked in words and colour.
    let events = between(&html, "<table class=\"events\"", "</table>");
    let first = between(events, "<tbody>", "</tr>");
    assert!(first.contains("data-kind=\"refresh_failed\""), "{first}");
    assert!(first.contains("✗ refresh failed"), "{first}");
    assert!(first.contains("class=\"kind-failed\""), "{first}");
    assert_eq!(events.matches("data-kind=\"refreshed\"").count(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lifetime_bar_marks_now_and_the_next_refresh() {
    // A one-hour token refreshed at 0.75 of its life, without jitter: the
    // next refresh sits at 75% of the bar, now near its start.
    let h = Harness::authorized(Options {
        refresh: "at_fraction = 0.75\n".into(),
        ..Options::lifetime(Duration::from_secs(3600))
    })
    .await;
    let html = h.get_text("/").await;
    let bar = between(&html, "<div class=\"access-bar\"", "</svg>");
    let now: f64 = attr(bar, "data-now-pct").parse().unwrap();
    let next: f64 = attr(bar, "data-next-pct").parse().unwrap();
    assert!((0.0..5.0).contains(&now), "now at {now}%: {bar}");
    assert!(
        (74.0..=76.0).contains(&next),
        "next refresh at {next}%: {bar}"
    );
    // The markers are drawn where the attributes say (in a 1000-wide box).
    let next_x: f64 = attr(between(bar, "class=\"next\"", ">"), "x1")
        .parse()
        .unwrap();
    assert!((next_x - next * 10.0).abs() <= 1.0, "{bar}");
    let label = attr(bar, "aria-label");
    assert!(label.starts_with("Access token: "), "{label}");
    assert!(label.contains("expires in 5"), "{label}");
    assert!(label.contains("next refresh in 4"), "{label}");

    // Forced refresh: the bar starts again from the new token.
    let (s, _) = h.force_refresh().await;
    assert_eq!(s, 200);
    let html = h.get_text("/").await;
    let bar = between(&html, "<div class=\"access-bar\"", "</svg>");
    let now: f64 = attr(bar, "data-now-pct").parse().unwrap();
    assert!((0.0..5.0).contains(&now), "now at {now}% after a refresh");
    // Keap's refresh tokens die 45 days unused, and each refresh pushes
    // that back: a rolling end, drawn as its own bar.
    let rt = between(&html, "<div class=\"refresh-bar\"", "</p>");
    assert!(rt.contains("45d left") || rt.contains("44d"), "{rt}");
    assert!(rt.contains("Rolling"), "{rt}");
    assert!(!html.contains("the provider states no end"), "{html}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quota_gauge_shows_what_the_proxy_learned_today() {
    let limits = SimLimits {
        per_second: 1000,
        per_minute: 100_000,
        per_day: 1000,
        tenant_per_minute: 100_000,
    };
    let h = Harness::authorized(Options {
        sim: SimulatorConfig {
            client_secret: common::CLIENT_SECRET.into(),
            limits: Some(limits),
            ..SimulatorConfig::default()
        },
        ..Options::default()
    })
    .await;
    h.sim.sim.set_daily_used(500);
    for _ in 0..3 {
        let r = h
            .http
            .get(h.url("/proxy/keap/contacts"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let c = h.connection("default").await;
    let used = c["quota"]["daily_used"].as_u64().unwrap();
    assert_eq!(used, 503, "the provider's count, learned: {c}");

    let html = h.get_text("/").await;
    let gauge = between(&html, "<div class=\"gauge\"", "</div>");
    assert_eq!(attr(gauge, "data-used"), "503", "{gauge}");
    assert_eq!(attr(gauge, "data-limit"), "1000", "{gauge}");
    let meter = between(gauge, "<meter", "</meter>");
    assert_eq!(attr(meter, "value"), "503", "{meter}");
    assert_eq!(attr(meter, "max"), "1000", "{meter}");
    // Labelled for assistive technology, and said in words.
    let id = attr(meter, "id");
    assert!(gauge.contains(&format!("<label for=\"{id}\">")), "{gauge}");
    assert!(
        gauge.contains("503 of 1,000 requests used today (50.3%), as the provider reports"),
        "{gauge}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_updates_itself_with_its_own_script_only() {
    let h = Harness::authorized(Options::default()).await;
    let r = h.http.get(h.url("/")).send().await.unwrap();
    let csp = r.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    let html = r.text().await.unwrap();
    // One script, from this origin; it may fetch this origin only.
    assert!(csp.contains("script-src 'self'"), "{csp}");
    assert!(csp.contains("connect-src 'self'"), "{csp}");
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert!(
        !csp.contains("unsafe-eval") && !csp.contains("script-src 'unsafe-inline'"),
        "{csp}"
    );
    assert_eq!(html.matches("<script").count(), 1, "{html}");
    assert!(
        html.contains("<script src=\"/assets/dashboard.js\" defer></script>"),
        "{html}"
    );
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "no outside resource: {html}"
    );
    // The region the script replaces, and how often.
    assert!(
        html.contains("<div id=\"live\" data-refresh-secs=\"5\">"),
        "{html}"
    );

    let r = h
        .http
        .get(h.url("/assets/dashboard.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-type"],
        "text/javascript; charset=utf-8"
    );
    assert_eq!(r.headers()["x-content-type-options"], "nosniff");
    assert!(r.headers().get("access-control-allow-origin").is_none());
    let js = r.text().await.unwrap();
    assert!(js.contains("getElementById('live')"), "{js}");
    // The script fetches the page itself: no data route of its own.
    assert!(js.contains("fetch('/'"), "{js}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_api_keys_the_script_and_the_page_need_a_login() {
    let mut h = Harness::with_api_keys(Options::default(), "k-dashboard-1\n").await;
    h.start().await;
    for path in ["/", "/assets/dashboard.js"] {
        let r = h.http.get(h.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path} without a session");
    }
    h.login("k-dashboard-1").await;
    let session = h.session.clone().unwrap();
    for path in ["/", "/assets/dashboard.js"] {
        let r = h.get_with(h.url(path), ("cookie", &session)).await;
        assert_eq!(r.status(), 200, "{path} with a session");
    }
    let r = h
        .get_with(h.url("/"), ("cookie", &session))
        .await
        .text()
        .await
        .unwrap();
    assert!(r.contains("id=\"live\""), "{r}");
}
