//! Hostile values reach every kind of HTML page escaped: the dashboard
//! (a provider's error text in "Last error"), the authorization pages (an
//! unknown provider in the path, a provider's `error` and
//! `error_description` on the callback, a refused code exchange) and the
//! simulator's consent page (a `state` echoed into hidden fields).
//! Black-box: the real daemon and simulator, checked in the bytes a
//! browser would parse.

mod common;

use common::{Harness, Options};
use reqwest::header::{COOKIE, LOCATION};
use tokenkeeper::dev::Fault;

/// Breaks out of text and out of a double-quoted attribute, in two ways.
const HOSTILE: &str = "<script>alert(1)</script>\"><img src=x onerror=alert(1)>";

/// The same, as it must appear once escaped.
const ESCAPED: &str =
    "&lt;script&gt;alert(1)&lt;/script&gt;&quot;&gt;&lt;img src=x onerror=alert(1)&gt;";

fn enc(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// `html` shows the hostile value (so the check means something), and only
/// escaped: no element or attribute of it exists in the page. The one
/// script element a page may have is the dashboard's own.
fn assert_inert(html: &str, page: &str) {
    assert!(
        html.contains(ESCAPED),
        "{page}: the value is shown, escaped: {html}"
    );
    assert_eq!(
        html.matches("<script").count(),
        html.matches("<script src=\"/assets/dashboard.js\" defer>")
            .count(),
        "{page}: a script element that is not the dashboard's own: {html}"
    );
    for raw in ["<script>", "<img"] {
        assert!(!html.contains(raw), "{page}: raw {raw:?} in {html}");
    }
}

#[tokio::test]
async fn hostile_values_are_escaped_on_every_page() {
    let mut h = Harness::new(Options::default()).await;
    h.start().await;

    // An unknown provider named in the path.
    let r = h
        .http
        .get(h.url(&format!("/connect/{}", enc(HOSTILE).replace('+', "%20"))))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.headers()["x-frame-options"], "DENY");
    assert_inert(&r.text().await.unwrap(), "unknown provider");

    // The provider's error and description on the callback.
    let (location, cookie) = h.start_connect("keap", "default").await;
    let state = url::Url::parse(&location)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "state")
        .map(|(_, v)| v.into_owned())
        .expect("a state");
    let r = h
        .http
        .get(h.url(&format!(
            "/callback?state={}&error={}&error_description={}",
            enc(&state),
            enc(HOSTILE),
            enc(HOSTILE)
        )))
        .header(COOKIE, &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let csp = r.headers()["content-security-policy"].to_str().unwrap();
    assert!(csp.starts_with("default-src 'none'"), "{csp}");
    assert_inert(&r.text().await.unwrap(), "callback with a provider error");

    // A code exchange the provider refuses with a hostile description.
    h.sim.sim.push_fault(Fault::OAuthError {
        status: 400,
        error: "invalid_request".into(),
        description: Some(HOSTILE.into()),
    });
    let r = h.authorize("keap", "default").await;
    assert_eq!(r.status(), 502);
    assert_inert(&r.text().await.unwrap(), "refused code exchange");

    // The dashboard's "Last error": a refresh the provider refuses.
    assert_eq!(h.authorize("keap", "default").await.status(), 200);
    h.sim.sim.push_fault(Fault::OAuthError {
        status: 400,
        error: "invalid_client".into(),
        description: Some(HOSTILE.into()),
    });
    assert_eq!(h.post("/v1/token/keap/refresh").await.status(), 503);
    let dashboard = h.get_text("/").await;
    assert!(dashboard.contains("retrying"), "{dashboard}");
    assert_inert(&dashboard, "dashboard");

    // The simulator's consent page echoes the request into hidden fields.
    let mut hostile_start = url::Url::parse(&location).unwrap();
    let pairs: Vec<(String, String)> = hostile_start
        .query_pairs()
        .into_owned()
        .map(|(k, v)| {
            if k == "state" {
                (k, HOSTILE.into())
            } else {
                (k, v)
            }
        })
        .collect();
    hostile_start.query_pairs_mut().clear().extend_pairs(pairs);
    let consent = h.http.get(hostile_start).send().await.unwrap();
    assert_eq!(consent.status(), 200);
    assert!(consent.headers().get(LOCATION).is_none());
    assert_inert(&consent.text().await.unwrap(), "simulator consent page");
}
