//! Server-rendered HTML: the dashboard and the authorization result pages.
//! No scripts, no external assets.
//!
//! Pages are `maud` templates: every value interpolated into one is escaped
//! by construction (text and attributes alike), so no caller escapes
//! anything by hand and nothing here takes a pre-rendered HTML string from
//! outside this module, only [`Markup`] built by `html!`.

use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use chrono::{DateTime, Utc};
use maud::{html, Markup, PreEscaped, DOCTYPE};

use crate::refresh::ConnectionReport;
use crate::store::ConnState;

/// The one stylesheet, inlined (the CSP allows inline styles and nothing
/// from outside). A compile-time constant, so it is the only markup emitted
/// unescaped.
const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}\
main{max-width:960px;margin:0 auto;padding:1.5rem}h1{font-size:1.4rem}\
table{border-collapse:collapse;width:100%;background:#fff}th,td{text-align:left;padding:.5rem;border-bottom:1px solid #e3e6ea;font-size:.9rem}\
.badge{display:inline-block;padding:.15rem .5rem;border-radius:1rem;font-size:.8rem;color:#fff}\
.active{background:#1f883d}.refreshing{background:#0969da}.retrying{background:#bf8700}.authorization_required{background:#cf222e}\
.card{background:#fff;border:1px solid #e3e6ea;border-radius:.5rem;padding:1rem;margin:1rem 0}\
a.button,button{display:inline-block;background:#0969da;color:#fff;border:0;border-radius:.4rem;padding:.4rem .8rem;text-decoration:none;font-size:.9rem;cursor:pointer}\
input{padding:.35rem;border:1px solid #c9ced6;border-radius:.3rem}.error{color:#cf222e}\
@media(max-width:640px){table,thead,tbody,tr,td,th{display:block}thead{display:none}td{border:0;padding:.2rem .5rem}tr{border-bottom:1px solid #e3e6ea;padding:.5rem 0}\
td[data-label]::before{content:attr(data-label) \": \";font-weight:600;color:#57606a}}\
.muted{color:#57606a;font-size:.85rem}";

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
    let markup = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · tokenkeeper" }
                style { (PreEscaped(STYLE)) }
            }
            body { main { h1 { (title) } (body) } }
        }
    };
    let mut r = (status, Html(markup.into_string())).into_response();
    html_headers(r.headers_mut());
    r
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

/// The dashboard: every provider and connection with a Connect button;
/// the providers in `device` also get "Connect with a device code".
pub fn dashboard(
    providers: &[String],
    device: &[String],
    connections: &[ConnectionReport],
) -> Response {
    let now = Utc::now();
    let body = html! {
        h2 { "Connections" }
        @if connections.is_empty() {
            div class="card" { p { "No connection yet. Pick a provider below and click Connect." } }
        } @else {
            table {
                thead { tr {
                    th { "Provider" } th { "Account" } th { "State" } th { "Expires" }
                    th { "Refreshed" } th { "Next refresh" } th { "Refresh token age" }
                    th { "Last error" } th {}
                } }
                tbody {
                    @for c in connections { (connection_row(c, now)) }
                }
            }
        }
        h2 { "Providers" }
        @for p in providers {
            div class="card" {
                form method="get" action={ "/connect/" (p) } {
                    strong { (p) }
                    " \u{a0} account "
                    input name="account" value="default" pattern="[a-z0-9][a-z0-9_\\-]{0,62}" required;
                    " "
                    button type="submit" { "Connect" }
                }
                @if device.contains(p) {
                    form method="get" action={ "/connect/" (p) "/device" } class="muted" {
                        "or approve on another device: account "
                        input name="account" value="default" pattern="[a-z0-9][a-z0-9_\\-]{0,62}" required;
                        " "
                        button type="submit" { "Connect with a device code" }
                    }
                }
            }
        }
    };
    layout(StatusCode::OK, "tokenkeeper", body)
}

fn connection_row(c: &ConnectionReport, now: DateTime<Utc>) -> Markup {
    let label = match c.state {
        ConnState::AuthorizationRequired => "Re-connect",
        ConnState::Active | ConnState::Refreshing | ConnState::Retrying => "Connect again",
    };
    let state = c.state.as_str();
    html! {
        tr {
            td data-label="Provider" { (c.provider) }
            td data-label="Account" { (c.account) }
            td data-label="State" { span class={ "badge " (state) } { (state) } }
            td data-label="Expires" { (relative(c.expires_at, now)) }
            td data-label="Refreshed" {
                @match c.refreshed_at {
                    Some(t) => (relative(t, now)),
                    None => "never",
                }
            }
            td data-label="Next refresh" {
                @match c.next_refresh_at {
                    Some(t) => (relative(t, now)),
                    None => "-",
                }
            }
            td data-label="Refresh token age" {
                (human_span((now - c.refresh_token_issued_at).num_seconds().max(0) as u64))
            }
            td data-label="Last error" class="error" { (c.last_error.as_deref().unwrap_or("")) }
            td { a class="button" href={ "/connect/" (c.provider) "?account=" (c.account) } { (label) } }
        }
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
