//! Server-rendered HTML: the shared layout and the authorization result
//! pages (the dashboard is `dashboard`'s). No external assets; the only
//! script is the dashboard's own, served by the daemon.
//!
//! Pages are `maud` templates: every value interpolated into one is escaped
//! by construction (text and attributes alike), so no caller escapes
//! anything by hand and nothing here takes a pre-rendered HTML string from
//! outside this module, only [`Markup`] built by `html!`.

use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use chrono::{DateTime, Utc};
use maud::{html, Markup, PreEscaped, DOCTYPE};

/// The one stylesheet, inlined (the CSP allows inline styles and nothing
/// from outside). Embedded at build time, so it is the only markup emitted
/// unescaped.
const STYLE: &str = include_str!("assets/style.css");

/// Wraps a body in the shared page layout (with a way back to the
/// dashboard).
pub fn page(status: StatusCode, title: &str, body: Markup) -> Response {
    layout(
        status,
        title,
        html! {
            (body)
            p { a href="/" { "Back to tokenkeeper" } }
        },
    )
}

fn layout(status: StatusCode, title: &str, body: Markup) -> Response {
    let mut r = (status, Html(document(title, body, None).into_string())).into_response();
    html_headers(r.headers_mut());
    r
}

/// The layout with one script of the daemon's own (`src`, a path on this
/// origin), which may fetch from this origin and nowhere else.
pub fn layout_with_script(status: StatusCode, title: &str, body: Markup, src: &str) -> Response {
    let mut r = (status, Html(document(title, body, Some(src)).into_string())).into_response();
    html_headers(r.headers_mut());
    r.headers_mut().insert(
        axum::http::header::CONTENT_SECURITY_POLICY,
        axum::http::HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    r
}

fn document(title: &str, body: Markup, script: Option<&str>) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · tokenkeeper" }
                style { (PreEscaped(STYLE)) }
                @if let Some(src) = script { script src=(src) defer {} }
            }
            body { main { h1 { (title) } (body) } }
        }
    }
}

/// Headers of every HTML page: never cached, never framed (SPEC 4: a
/// framing page could click Connect for the user), no inline script or
/// outside resource, and no `Referer` that could carry a login link.
pub fn html_headers(h: &mut axum::http::HeaderMap) {
    use axum::http::{header, HeaderValue};
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
}

/// A page that says what went wrong and how to retry.
pub fn problem(status: StatusCode, title: &str, what: &str, retry_href: Option<&str>) -> Response {
    page(
        status,
        title,
        html! {
            div class="card" {
                p class="error" { (what) }
                @if let Some(href) = retry_href {
                    p { a class="button" href=(href) { "Try again" } }
                }
            }
        },
    )
}

/// The page after a successful authorization. `renewable` is false when
/// the provider issued no refresh token.
pub fn connected(provider: &str, account: &str, renewable: bool) -> Response {
    page(
        StatusCode::OK,
        "Connected",
        html! {
            div class="card" {
                p {
                    span class="badge active" { "active" }
                    " " (provider) "/" (account) " is authorized. You can close this window."
                }
                @if !renewable {
                    p class="error" { "The provider issued no refresh token, so this grant cannot be renewed: it ends when the access token expires." }
                }
                p {
                    "Programs get the access token with "
                    code { "tokenkeeper token " (provider) " " (account) }
                    " or "
                    code { "GET /v1/token/" (provider) "/" (account) }
                    "."
                }
            }
        },
    )
}

/// The local file `tokenkeeper connect --open` hands the browser: it
/// forwards to `url` (meta refresh, and a link should that be blocked)
/// without sending a `Referer` that would carry the one-time link.
pub fn login_redirect(url: &str) -> String {
    html! {
        (DOCTYPE)
        html {
            head {
                meta charset="utf-8";
                meta name="referrer" content="no-referrer";
                meta http-equiv="refresh" content={ "0;url=" (url) };
                title { "tokenkeeper login" }
            }
            body { p { a href=(url) { "Continue to tokenkeeper" } } }
        }
    }
    .into_string()
}

/// Human "in 17h 58m" / "3m ago".
pub fn relative(t: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let secs = (t - now).num_seconds();
    let span = human_span(secs.unsigned_abs());
    if secs >= 0 {
        format!("in {span}")
    } else {
        format!("{span} ago")
    }
}

/// `1d 2h`, `17h 58m`, `3m 5s`, `12s`.
pub fn human_span(secs: u64) -> String {
    let (d, h, m, s) = (
        secs / 86400,
        secs % 86400 / 3600,
        secs % 3600 / 60,
        secs % 60,
    );
    if d > 0 {
        format!("{d}d {h}h")
    } else if h > 0 {
        format!("{h}h {m}m")
    } else if m > 0 {
        format!("{m}m {s}s")
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOSTILE: &str = "<script>alert(1)</script>\"><img src=x onerror=alert(1)>";
    const ESCAPED: &str =
        "&lt;script&gt;alert(1)&lt;/script&gt;&quot;&gt;&lt;img src=x onerror=alert(1)&gt;";

    async fn body(r: Response) -> String {
        let bytes = axum::body::to_bytes(r.into_body(), usize::MAX)
            .await
            .unwrap();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    fn assert_inert(html: &str) {
        assert!(html.contains(ESCAPED), "shown, escaped: {html}");
        assert!(
            !html.contains("<script") && !html.contains("<img"),
            "{html}"
        );
    }

    /// The pages whose values cannot be made hostile through the daemon
    /// (names are checked before they get there), fed hostile values
    /// directly; tests/html_escaping.rs covers the others end to end.
    #[tokio::test]
    async fn hostile_values_are_escaped_in_text_and_attributes() {
        let html = body(connected(HOSTILE, HOSTILE, false)).await;
        assert_inert(&html);
        assert!(html.contains("no refresh token"), "{html}");
        let html = body(problem(
            StatusCode::BAD_REQUEST,
            HOSTILE,
            HOSTILE,
            Some(HOSTILE),
        ))
        .await;
        assert_inert(&html);
        assert!(html.contains(&format!("href=\"{ESCAPED}\"")), "{html}");
        assert!(
            html.contains(&format!("<title>{ESCAPED} · tokenkeeper</title>")),
            "{html}"
        );
        let html = login_redirect(HOSTILE);
        assert_inert(&html);
        assert!(
            html.contains(&format!("content=\"0;url={ESCAPED}\"")),
            "{html}"
        );
    }
}
