//! Server-rendered HTML: the dashboard and the authorization result pages.
//! No scripts, no external assets; everything is escaped here.

use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use chrono::{DateTime, Utc};

use crate::refresh::ConnectionReport;
use crate::store::ConnState;

/// Escapes text for HTML element and attribute content.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

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
pub fn page(status: StatusCode, title: &str, body: &str) -> Response {
    let body = format!("{body}<p><a href=\"/\">Back to tokenkeeper</a></p>");
    layout(status, title, &body)
}

fn layout(status: StatusCode, title: &str, body: &str) -> Response {
    let html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{t} · tokenkeeper</title><style>{STYLE}</style></head><body><main><h1>{t}</h1>{body}</main></body></html>",
        t = escape(title)
    );
    let mut r = (status, Html(html)).into_response();
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
    let retry = retry_href
        .map(|h| {
            format!(
                "<p><a class=\"button\" href=\"{}\">Try again</a></p>",
                escape(h)
            )
        })
        .unwrap_or_default();
    page(
        status,
        title,
        &format!(
            "<div class=\"card\"><p class=\"error\">{}</p>{retry}</div>",
            escape(what)
        ),
    )
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

/// The dashboard: every provider and connection with a Connect button.
pub fn dashboard(providers: &[String], connections: &[ConnectionReport]) -> Response {
    let now = Utc::now();
    let mut rows = String::new();
    for c in connections {
        let connect = format!(
            "/connect/{}?account={}",
            escape(&c.provider),
            escape(&c.account)
        );
        let label = match c.state {
            ConnState::AuthorizationRequired => "Re-connect",
            ConnState::Active | ConnState::Refreshing | ConnState::Retrying => "Connect again",
        };
        rows.push_str(&format!(
            "<tr><td data-label=\"Provider\">{p}</td><td data-label=\"Account\">{a}</td><td data-label=\"State\"><span class=\"badge {s}\">{s}</span></td><td data-label=\"Expires\">{exp}</td><td data-label=\"Refreshed\">{refr}</td><td data-label=\"Next refresh\">{next}</td><td data-label=\"Refresh token age\">{age}</td><td data-label=\"Last error\" class=\"error\">{err}</td><td><a class=\"button\" href=\"{connect}\">{label}</a></td></tr>",
            p = escape(&c.provider),
            a = escape(&c.account),
            s = c.state,
            exp = relative(c.expires_at, now),
            refr = c.refreshed_at.map(|t| relative(t, now)).unwrap_or_else(|| "never".into()),
            next = c.next_refresh_at.map(|t| relative(t, now)).unwrap_or_else(|| "-".into()),
            age = human_span((now - c.refresh_token_issued_at).num_seconds().max(0) as u64),
            err = escape(c.last_error.as_deref().unwrap_or("")),
        ));
    }
    let table = if connections.is_empty() {
        "<div class=\"card\"><p>No connection yet. Pick a provider below and click Connect.</p></div>".to_string()
    } else {
        format!(
            "<table><thead><tr><th>Provider</th><th>Account</th><th>State</th><th>Expires</th><th>Refreshed</th><th>Next refresh</th><th>Refresh token age</th><th>Last error</th><th></th></tr></thead><tbody>{rows}</tbody></table>"
        )
    };
    let mut forms = String::new();
    for p in providers {
        forms.push_str(&format!(
            "<div class=\"card\"><form method=\"get\" action=\"/connect/{p}\"><strong>{p}</strong> &nbsp; account <input name=\"account\" value=\"default\" pattern=\"[a-z0-9][a-z0-9_\\-]{{0,62}}\" required> <button type=\"submit\">Connect</button></form></div>",
            p = escape(p)
        ));
    }
    layout(
        StatusCode::OK,
        "tokenkeeper",
        &format!("<h2>Connections</h2>{table}<h2>Providers</h2>{forms}"),
    )
}
