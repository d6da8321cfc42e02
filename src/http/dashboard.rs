//! The dashboard (`GET /`): a summary table of every connection, then per
//! connection a timeline of its recent history (refreshes as points whose
//! height is their duration, failures as red squares in their own lane),
//! the access token's lifetime as a bar marking now and the next refresh,
//! the refresh token's remaining life when the provider states one, the
//! provider quota used today as a gauge, and the recent events; below, a
//! Connect form per provider.
//!
//! Server-rendered with `maud` (escaped by construction), inline SVG, one
//! embedded stylesheet and one embedded script ([`SCRIPT`], served at
//! [`SCRIPT_PATH`]) that re-fetches this same page every
//! [`REFRESH_EVERY_SECS`] and swaps in its `#live` region. So live updates
//! need no data route of their own: they pass the same guards, with the
//! same session, as loading the page.
//!
//! Must not: show a secret (the history never holds one, reports neither),
//! or fail the page because the history could not be read (the panel says
//! so instead).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Duration as Span, SecondsFormat, Utc};
use maud::{html, Markup};

use super::pages::{human_span, relative};
use super::AppState;
use crate::ratelimit::{ConnectionQuota, ScopeQuota};
use crate::refresh::ConnectionReport;
use crate::store::{ConnState, Event, EventKind, EventQuery};

/// Where the script is served (embedded; behind the same guards as `/`).
pub const SCRIPT_PATH: &str = "/assets/dashboard.js";

/// The live-update script, embedded at build time: no build step, no CDN.
pub const SCRIPT: &str = include_str!("assets/dashboard.js");

/// How often an open dashboard refreshes itself. Short enough that a
/// refresh shows up while one watches; one page render per open tab every
/// few seconds costs next to nothing.
pub const REFRESH_EVERY_SECS: u32 = 5;

/// The longest stretch of history a timeline covers: a week shows about
/// ten refreshes of a 24-hour token (Keap's), enough to see a pattern.
pub const TIMELINE_MAX_SPAN: Span = Span::days(7);

/// Timeline spans to pick from: the shortest that holds the oldest event
/// shown, so a young connection's points are not crowded into one edge.
const TIMELINE_SPANS: [Span; 7] = [
    Span::minutes(5),
    Span::minutes(30),
    Span::hours(1),
    Span::hours(6),
    Span::days(1),
    Span::days(3),
    TIMELINE_MAX_SPAN,
];

/// Events read per connection for its timeline: bounds the page's size and
/// cost whatever a connection's history holds (a connection failing every
/// few seconds for a week would otherwise draw thousands of points).
pub const TIMELINE_MAX_EVENTS: u32 = 300;

/// Events listed under "Recent events".
pub const RECENT_EVENTS: usize = 8;

/// What the dashboard shows of one connection.
pub struct Panel {
    pub report: ConnectionReport,
    /// Newest first, at most [`TIMELINE_MAX_EVENTS`]; `Err` says why the
    /// history could not be read.
    pub events: Result<Vec<Event>, String>,
    /// The proxy's view of the provider's quota (learned from its headers,
    /// else counted here).
    pub quota: Option<ConnectionQuota>,
    /// When the refresh token ends, where the provider says so.
    pub refresh_token_expires_at: Option<DateTime<Utc>>,
}

/// Gathers every connection's panel: its report, history and quota.
pub async fn gather(state: &AppState) -> Vec<Panel> {
    let q = EventQuery {
        before: None,
        after: None,
        limit: TIMELINE_MAX_EVENTS,
    };
    let mut panels = Vec::new();
    for report in state.engine.report() {
        let events = state
            .engine
            .store()
            .events(&report.provider, &report.account, &q)
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, provider = %report.provider, account = %report.account, "the dashboard could not read a connection's history");
                "the history could not be read; see the daemon's log".to_string()
            });
        let quota = state.proxy.limits.quota(&report.provider, &report.account);
        panels.push(Panel {
            refresh_token_expires_at: refresh_token_expires_at(&report),
            report,
            events,
            quota,
        });
    }
    panels
}

/// The refresh token's end as the connection's report states it (`None`:
/// the provider states none and none is configured).
fn refresh_token_expires_at(report: &ConnectionReport) -> Option<DateTime<Utc>> {
    report.refresh_token_expires_at
}

#[utoipa::path(get, path = "/assets/dashboard.js", summary = "The dashboard's live-update script (embedded; same guards as the dashboard)", responses(
    (status = 200, description = "JavaScript", body = String, content_type = "text/javascript")
))]
/// `GET /assets/dashboard.js`.
pub async fn script() -> Response {
    let mut r = SCRIPT.into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/javascript; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    r
}

/// The dashboard page at `now`. `providers` are those a person can connect
/// (a client-credentials provider has nothing to authorize: no button);
/// those also in `device` offer "Connect with a device code".
pub fn page(
    providers: &[String],
    device: &[String],
    panels: &[Panel],
    now: DateTime<Utc>,
) -> Response {
    let body = html! {
        p id="live-status" class="live-status muted" role="status" {}
        div id="live" data-refresh-secs=(REFRESH_EVERY_SECS) {
            (live(panels, providers, now))
        }
        h2 { "Providers" }
        @for p in providers {
            div class="card" {
                form method="get" action={ "/connect/" (p) } {
                    strong id={ "provider-" (p) } { (p) }
                    " \u{a0} "
                    label { "account " input name="account" value="default" pattern="[a-z0-9][a-z0-9_\\-]{0,62}" required; }
                    " "
                    button type="submit" aria-describedby={ "provider-" (p) } { "Connect" }
                }
                @if device.contains(p) {
                    form method="get" action={ "/connect/" (p) "/device" } class="muted" {
                        label {
                            "or approve on another device: account "
                            input name="account" value="default" pattern="[a-z0-9][a-z0-9_\\-]{0,62}" required;
                        }
                        " "
                        button type="submit" aria-describedby={ "provider-" (p) } { "Connect with a device code" }
                    }
                }
            }
        }
    };
    super::pages::layout_with_script(StatusCode::OK, "tokenkeeper", body, SCRIPT_PATH)
}

/// The part the script replaces on each update.
fn live(panels: &[Panel], providers: &[String], now: DateTime<Utc>) -> Markup {
    html! {
        h2 { "Connections" }
        p class="muted" {
            "As of " time datetime=(rfc3339(now)) { (now.format("%H:%M:%S UTC")) }
            "; updates itself every " (REFRESH_EVERY_SECS) " seconds."
        }
        @if panels.is_empty() {
            div class="card" { p { "No connection yet. Pick a provider below and click Connect." } }
        } @else {
            table class="summary" {
                thead { tr {
                    th { "Provider" } th { "Account" } th { "State" } th { "Expires" }
                    th { "Refreshed" } th { "Next refresh" } th { "Refresh token age" }
                    th { "Last error" } th { span class="muted" { "Action" } }
                } }
                tbody {
                    @for p in panels {
                        (summary_row(&p.report, providers.contains(&p.report.provider), now))
                    }
                }
            }
            @for (i, p) in panels.iter().enumerate() { (panel(i, p, now)) }
        }
    }
}

fn summary_row(c: &ConnectionReport, connectable: bool, now: DateTime<Utc>) -> Markup {
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
            td {
                @if connectable {
                    a class="button" href={ "/connect/" (c.provider) "?account=" (c.account) }
                        aria-label={ (label) " " (c.provider) "/" (c.account) } { (label) }
                }
            }
        }
    }
}

fn panel(i: usize, p: &Panel, now: DateTime<Utc>) -> Markup {
    let c = &p.report;
    let id = format!("c{i}");
    html! {
        section class="card connection" id=(id) aria-labelledby={ (id) "-h" }
            data-provider=(c.provider) data-account=(c.account) {
            div class="panel-head" {
                h3 id={ (id) "-h" } { (c.provider) "/" (c.account) }
                span class={ "badge " (c.state.as_str()) } { (c.state.as_str()) }
            }
            @match &p.events {
                Ok(events) => (timeline(&id, c, events, now)),
                Err(why) => p class="error" { "Timeline unavailable: " (why) },
            }
            div class="grid" {
                div { (access_bar(&id, c, now)) }
                div { (refresh_token_life(&id, c, p.refresh_token_expires_at, now)) }
            }
            @if let Some(q) = &p.quota { (quota(&id, c, q, now)) }
            @if let Ok(events) = &p.events { (recent(&id, events, now)) }
        }
    }
}

/// Width of a timeline's coordinate system; the SVG is stretched to the
/// card's width (`preserveAspectRatio="none"`), and its markers are drawn
/// with non-scaling strokes so they keep their shape.
const TL_WIDTH: f64 = 1000.0;
/// Room at both ends, so a marker at either edge is drawn whole.
const TL_MARGIN: f64 = 8.0;
/// The failure lane's height.
const TL_FAIL_Y: f64 = 12.0;
/// A refresh of no duration sits here; the slowest shown, at `TL_TOP`.
const TL_BASE_Y: f64 = 88.0;
const TL_TOP_Y: f64 = 30.0;

fn timeline(id: &str, c: &ConnectionReport, events: &[Event], now: DateTime<Utc>) -> Markup {
    let oldest_wanted = now - TIMELINE_MAX_SPAN;
    // A rotation comes with every refresh of a single-use provider: drawn,
    // it would only hide the refresh (it is listed under the events).
    let shown: Vec<&Event> = events
        .iter()
        .filter(|e| e.at >= oldest_wanted && e.at <= now && e.kind != EventKind::Rotated)
        .collect();
    let span = shown
        .iter()
        .map(|e| now - e.at)
        .max()
        .and_then(|age| TIMELINE_SPANS.iter().copied().find(|s| *s >= age))
        .unwrap_or(TIMELINE_SPANS[0]);
    let start = now - span;
    let x = |t: DateTime<Utc>| TL_MARGIN + fraction(t, start, now) * (TL_WIDTH - 2.0 * TL_MARGIN);
    let slowest = shown
        .iter()
        .filter(|e| e.kind == EventKind::Refreshed)
        .filter_map(|e| e.duration_ms)
        .max()
        .unwrap_or(0)
        .max(1000);
    let y = |ms: Option<i64>| {
        let share = ms.unwrap_or(0).clamp(0, slowest) as f64 / slowest as f64;
        TL_BASE_Y - share * (TL_BASE_Y - TL_TOP_Y)
    };
    let refreshes = shown
        .iter()
        .filter(|e| e.kind == EventKind::Refreshed)
        .count();
    let failures = shown.iter().filter(|e| failed(e.kind)).count();
    let summary = format!(
        "Timeline of {}/{} over the last {}: {} refresh{}, {} failure{}.",
        c.provider,
        c.account,
        round_span(span),
        refreshes,
        if refreshes == 1 { "" } else { "es" },
        failures,
        if failures == 1 { "" } else { "s" },
    );
    html! {
        h4 { "Timeline" }
        svg class="timeline" role="img" aria-labelledby={ (id) "-tl-t" }
            viewBox="0 0 1000 100" preserveAspectRatio="none"
            data-span-secs=(span.num_seconds()) data-refreshes=(refreshes) data-failures=(failures) {
            title id={ (id) "-tl-t" } { (summary) }
            line class="grid-line" x1="0" x2="1000" y1=(TL_BASE_Y + 6.0) y2=(TL_BASE_Y + 6.0) vector-effect="non-scaling-stroke" {}
            line class="grid-line" x1="0" x2="1000" y1="24" y2="24" vector-effect="non-scaling-stroke" {}
            // Oldest first, so the newest is drawn on top.
            @for e in shown.iter().rev() {
                @let cx = format!("{:.1}", x(e.at));
                @if e.kind == EventKind::Refreshed {
                    path class="point ok" data-kind=(e.kind.as_str()) data-at=(rfc3339(e.at))
                        data-duration-ms=[e.duration_ms]
                        d={ "M" (cx) " " (format!("{:.1}", y(e.duration_ms))) "h0" }
                        vector-effect="non-scaling-stroke" {
                        title { (event_sentence(e)) }
                    }
                } @else if failed(e.kind) {
                    path class="point failure" data-kind=(e.kind.as_str()) data-at=(rfc3339(e.at))
                        d={ "M" (cx) " " (TL_FAIL_Y) "h0" } vector-effect="non-scaling-stroke" {
                        title { (event_sentence(e)) }
                    }
                } @else {
                    line class="point other" data-kind=(e.kind.as_str()) data-at=(rfc3339(e.at))
                        x1=(cx) x2=(cx) y1="26" y2=(TL_BASE_Y + 6.0) vector-effect="non-scaling-stroke" {
                        title { (event_sentence(e)) }
                    }
                }
            }
        }
        div class="axis" aria-hidden="true" {
            span { (round_span(span)) " ago" }
            span { (round_span(span / 2)) " ago" }
            span { "now" }
        }
        ul class="legend" {
            li { span class="sym-ok" aria-hidden="true" { "●" } " refresh (higher took longer; top = " (millis(slowest)) ")" }
            li { span class="sym-failure" aria-hidden="true" { "■" } " failure (top lane)" }
            li { span class="sym-other" aria-hidden="true" { "┆" } " other event" }
        }
    }
}

/// `7d`, `12h`, `2m 30s`: a span without its zero parts.
fn round_span(span: Span) -> String {
    let secs = span.num_seconds().max(0) as u64;
    match secs {
        s if s > 0 && s % 86400 == 0 => format!("{}d", s / 86400),
        s if s > 0 && s % 3600 == 0 => format!("{}h", s / 3600),
        s if s > 0 && s % 60 == 0 => format!("{}m", s / 60),
        s => human_span(s),
    }
}

/// Events drawn as failures: red, in their own lane.
fn failed(kind: EventKind) -> bool {
    matches!(
        kind,
        EventKind::RefreshFailed | EventKind::AuthorizationRequired | EventKind::Interrupted
    )
}

/// `refreshed at 2026-…Z, took 120 ms: detail`.
fn event_sentence(e: &Event) -> String {
    let mut s = format!(
        "{} at {}",
        e.kind.as_str().replace('_', " "),
        e.at.format("%Y-%m-%d %H:%M:%S UTC")
    );
    if let Some(ms) = e.duration_ms {
        s.push_str(&format!(", took {}", millis(ms)));
    }
    if let Some(d) = &e.detail {
        s.push_str(": ");
        s.push_str(d);
    }
    s
}

/// `850 ms`, `1.2 s`.
fn millis(ms: i64) -> String {
    if ms < 1000 {
        format!("{ms} ms")
    } else {
        format!("{:.1} s", ms as f64 / 1000.0)
    }
}

/// Where `t` falls between `start` and `end`, from 0 to 1.
fn fraction(t: DateTime<Utc>, start: DateTime<Utc>, end: DateTime<Utc>) -> f64 {
    let whole = (end - start).num_milliseconds();
    if whole <= 0 {
        return 1.0;
    }
    ((t - start).num_milliseconds() as f64 / whole as f64).clamp(0.0, 1.0)
}

/// A percentage with one decimal, as the bars' data attributes give it.
fn pct(t: DateTime<Utc>, start: DateTime<Utc>, end: DateTime<Utc>) -> String {
    format!("{:.1}", fraction(t, start, end) * 100.0)
}

/// A lifetime from `start` to `end` as a bar: the elapsed share filled, a
/// solid marker at now and a dashed one at `next` (the next refresh).
fn lifetime_bar(
    label: &str,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    next: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Markup {
    let now_pct = pct(now, start, end);
    let next_pct = next.map(|t| pct(t, start, end));
    // Markers stay inside the box, so one at either end is drawn whole.
    let at = |t: DateTime<Utc>| {
        format!(
            "{:.1}",
            (fraction(t, start, end) * BAR_WIDTH).clamp(2.0, BAR_WIDTH - 2.0)
        )
    };
    let now_x = at(now);
    let elapsed = if now >= end {
        "elapsed late"
    } else {
        "elapsed"
    };
    html! {
        svg class="bar" role="img" aria-label=(label) viewBox="0 0 1000 20" preserveAspectRatio="none"
            data-now-pct=(now_pct) data-next-pct=[next_pct] {
            rect class="track" x="0" y="3" width="1000" height="14" rx="3" {}
            rect class=(elapsed) x="0" y="3" width=(now_x) height="14" {}
            @if let Some(t) = next {
                @let next_x = at(t);
                line class="next" x1=(next_x) x2=(next_x) y1="0" y2="20" vector-effect="non-scaling-stroke" {}
            }
            line class="now" x1=(now_x) x2=(now_x) y1="0" y2="20" vector-effect="non-scaling-stroke" {}
        }
    }
}

/// Width of a lifetime bar's coordinate system (stretched like a timeline's).
const BAR_WIDTH: f64 = 1000.0;

fn access_bar(id: &str, c: &ConnectionReport, now: DateTime<Utc>) -> Markup {
    // A token never refreshed was issued with the grant.
    let start = c.refreshed_at.unwrap_or(c.refresh_token_issued_at);
    let next = c
        .next_refresh_at
        .filter(|_| c.state != ConnState::AuthorizationRequired);
    let expiry = if c.expires_at > now {
        format!("expires {}", relative(c.expires_at, now))
    } else {
        format!("expired {}", relative(c.expires_at, now))
    };
    let mut label = format!(
        "Access token: {}% of its lifetime used, {expiry}",
        pct(now, start, c.expires_at)
    );
    if let Some(t) = next {
        label.push_str(&format!(", next refresh {}", relative(t, now)));
    }
    html! {
        h4 id={ (id) "-at" } { "Access token lifetime" }
        div class="access-bar" {
            (lifetime_bar(&label, start, c.expires_at, next, now))
            div class="bar-labels" {
                span { "issued " (relative(start, now)) }
                @if let Some(t) = next { span { "╎ next refresh " (relative(t, now)) } }
                span { (expiry) }
            }
        }
    }
}

fn refresh_token_life(
    id: &str,
    c: &ConnectionReport,
    expires_at: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Markup {
    let age = human_span((now - c.refresh_token_issued_at).num_seconds().max(0) as u64);
    html! {
        h4 id={ (id) "-rt" } { "Refresh token" }
        @match expires_at {
            Some(end) => {
                @let left = if end > now { format!("{} left", human_span((end - now).num_seconds().max(0) as u64)) } else { "expired".to_string() };
                div class="refresh-bar" data-expires-at=(rfc3339(end)) {
                    (lifetime_bar(&format!("Refresh token: {left}, issued {age} ago"), c.refresh_token_issued_at, end, None, now))
                    div class="bar-labels" {
                        span { "issued " (age) " ago" }
                        span class="rt-left" { (left) }
                    }
                    p class="muted rt-kind" {
                        @if c.refresh_token_end_fixed {
                            "A hard end: refreshing cannot push it back; authorize again before then."
                        } @else {
                            "Rolling: each refresh pushes the end back, and tokenkeeper refreshes in time to keep it alive."
                        }
                    }
                }
            }
            None => p class="muted rt-left" { "Issued " (age) " ago; the provider states no end (it lasts until revoked or unused too long)." },
        }
    }
}

fn quota(id: &str, c: &ConnectionReport, q: &ConnectionQuota, now: DateTime<Utc>) -> Markup {
    html! {
        h4 { "Provider quota today" }
        (gauge(&format!("{id}-q"), &format!("{} (all accounts)", c.provider), &q.client, now))
        @if let Some(t) = &q.tenant {
            (gauge(&format!("{id}-qt"), &format!("account {}", c.account), t, now))
        }
        @if let Some(until) = q.paused_until {
            p class="error" { "Paused after the provider answered 429, until " (relative(until, now)) "." }
        }
    }
}

fn gauge(id: &str, whose: &str, s: &ScopeQuota, now: DateTime<Utc>) -> Markup {
    let source = if s.reported {
        "as the provider reports"
    } else {
        "counted here"
    };
    let resets = relative(s.resets_at, now);
    html! {
        div class="gauge" data-used=(s.daily_used) data-limit=[s.daily_limit] {
            @match s.daily_limit {
                Some(limit) if limit > 0 => {
                    label for=(id) { (whose) }
                    meter id=(id) min="0" max=(limit) value=(s.daily_used.min(limit))
                        low=(limit / 2) high=(limit / 10 * 9) optimum="0" {
                        (s.daily_used) " of " (limit)
                    }
                    p class="gauge-text" {
                        (thousands(s.daily_used)) " of " (thousands(limit)) " requests used today ("
                        (share(s.daily_used, limit)) "), "
                        (source) "; resets " (resets) "."
                    }
                }
                _ => p class="gauge-text" {
                    (whose) ": " (thousands(s.daily_used)) " requests today, " (source) "; no daily limit known."
                },
            }
        }
    }
}

/// `50.3%`; `<0.1%` rather than a misleading `0.0%` once any is used.
fn share(used: u64, limit: u64) -> String {
    let p = used as f64 * 100.0 / limit as f64;
    if used > 0 && p < 0.1 {
        "<0.1%".into()
    } else {
        format!("{p:.1}%")
    }
}

/// `150,000`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

fn recent(id: &str, events: &[Event], now: DateTime<Utc>) -> Markup {
    html! {
        h4 id={ (id) "-ev" } { "Recent events" }
        @if events.is_empty() {
            p class="muted" { "No events recorded yet." }
        } @else {
            table class="events" aria-labelledby={ (id) "-ev" } {
                thead { tr { th { "When" } th { "Event" } th { "Took" } th { "Detail" } } }
                tbody {
                    @for e in events.iter().take(RECENT_EVENTS) {
                        tr data-kind=(e.kind.as_str()) {
                            td data-label="When" { time datetime=(rfc3339(e.at)) title=(e.at.format("%Y-%m-%d %H:%M:%S UTC")) { (relative(e.at, now)) } }
                            td data-label="Event" {
                                @if failed(e.kind) {
                                    span class="kind-failed" { "✗ " (e.kind.as_str().replace('_', " ")) }
                                } @else {
                                    (e.kind.as_str().replace('_', " "))
                                }
                            }
                            td data-label="Took" { @if let Some(ms) = e.duration_ms { (millis(ms)) } }
                            td data-label="Detail" { (e.detail.as_deref().unwrap_or("")) }
                        }
                    }
                }
            }
        }
    }
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOSTILE: &str = "<script>alert(1)</script>\"><img src=x onerror=alert(1)>";

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn report(now: DateTime<Utc>) -> ConnectionReport {
        ConnectionReport {
            provider: "keap".into(),
            account: "default".into(),
            state: ConnState::Active,
            expires_at: now + Span::hours(18),
            refreshed_at: Some(now - Span::hours(6)),
            next_refresh_at: Some(now + Span::hours(12)),
            refresh_token_issued_at: now - Span::days(15),
            refresh_token_expires_at: None,
            refresh_token_end_fixed: false,
            last_error: None,
            served: 0,
            refreshes: [0; 4],
        }
    }

    fn event(id: i64, at: DateTime<Utc>, kind: EventKind, ms: Option<i64>) -> Event {
        Event {
            id,
            provider: "keap".into(),
            account: "default".into(),
            at,
            kind,
            detail: None,
            duration_ms: ms,
        }
    }

    fn render(panel: Panel, now: DateTime<Utc>) -> String {
        live(&[panel], &["keap".to_string()], now).into_string()
    }

    fn panel(now: DateTime<Utc>, events: Vec<Event>) -> Panel {
        Panel {
            report: report(now),
            events: Ok(events),
            quota: None,
            refresh_token_expires_at: None,
        }
    }

    #[test]
    fn a_stated_refresh_token_end_is_a_bar_with_now_on_it() {
        let now = at("2026-03-01T12:00:00Z");
        let mut p = panel(now, vec![]);
        p.refresh_token_expires_at = Some(now + Span::days(30));
        let html = render(p, now);
        let rt = &html[html
            .find("class=\"refresh-bar\"")
            .expect("a refresh-token bar")..];
        // Issued 15 days ago, ends in 30: a third of its life is gone.
        assert!(rt.contains("data-now-pct=\"33.3\""), "{rt}");
        assert!(rt.contains("30d 0h left"), "{rt}");
        assert!(
            rt.contains("data-expires-at=\"2026-03-31T12:00:00Z\""),
            "{rt}"
        );

        let html = render(panel(now, vec![]), now);
        assert!(!html.contains("refresh-bar"), "{html}");
        assert!(html.contains("the provider states no end"), "{html}");
    }

    #[test]
    fn the_access_bar_places_now_and_the_next_refresh() {
        let now = at("2026-03-01T12:00:00Z");
        let html = render(panel(now, vec![]), now);
        // Issued 6 h ago, lives 24 h, next refresh 18 h in.
        assert!(
            html.contains("data-now-pct=\"25.0\" data-next-pct=\"75.0\""),
            "{html}"
        );
        assert!(html.contains("class=\"next\" x1=\"750.0\""), "{html}");
        assert!(html.contains("class=\"now\" x1=\"250.0\""), "{html}");
    }

    #[test]
    fn the_timeline_spans_its_oldest_event_and_draws_each_kind_apart() {
        let now = at("2026-03-01T12:00:00Z");
        let events = vec![
            event(
                4,
                now - Span::minutes(1),
                EventKind::AuthorizationRequired,
                None,
            ),
            event(
                3,
                now - Span::hours(1),
                EventKind::RefreshFailed,
                Some(30_000),
            ),
            event(2, now - Span::hours(2), EventKind::Refreshed, Some(2000)),
            event(1, now - Span::hours(3), EventKind::Refreshed, Some(500)),
            // Beyond a week: not drawn.
            event(0, now - Span::days(8), EventKind::Refreshed, Some(100)),
        ];
        let html = render(panel(now, events), now);
        let tl = &html[html.find("<svg class=\"timeline\"").unwrap()..];
        let tl = &tl[..tl.find("</svg>").unwrap()];
        assert!(tl.contains("data-span-secs=\"21600\""), "6 hours: {tl}");
        assert!(
            tl.contains("data-refreshes=\"2\" data-failures=\"2\""),
            "{tl}"
        );
        assert_eq!(tl.matches("class=\"point ok\"").count(), 2);
        assert_eq!(tl.matches("class=\"point failure\"").count(), 2);
        // The slowest refresh tops the plot; a failure's duration does not
        // stretch the scale.
        assert!(tl.contains("took 2.0 s"), "{tl}");
        assert!(tl.contains(&format!(" {:.1}h0\"", TL_TOP_Y)), "{tl}");
        assert!(html.contains("top = 2.0 s"), "{html}");

        let empty = render(panel(now, vec![]), now);
        assert!(empty.contains("data-span-secs=\"300\""), "{empty}");
        assert!(empty.contains("No events recorded yet."), "{empty}");
    }

    #[test]
    fn hostile_text_is_escaped_in_every_part() {
        let now = at("2026-03-01T12:00:00Z");
        let mut e = event(1, now - Span::minutes(3), EventKind::RefreshFailed, None);
        e.detail = Some(HOSTILE.into());
        let mut p = panel(now, vec![e]);
        p.report.last_error = Some(HOSTILE.into());
        let html = render(p, now);
        assert!(
            !html.contains("<script") && !html.contains("<img"),
            "{html}"
        );
        assert!(html.contains("&lt;script&gt;alert(1)"), "{html}");
    }

    #[test]
    fn a_quota_without_a_known_limit_is_said_in_words() {
        let now = at("2026-03-01T12:00:00Z");
        let scope = |limit: Option<u64>, used: u64| ScopeQuota {
            daily_limit: limit,
            daily_available: limit.map(|l| l - used),
            daily_used: used,
            resets_at: now + Span::hours(12),
            reported: false,
            throttle_limit: None,
            throttle_available: None,
        };
        let mut p = panel(now, vec![]);
        p.quota = Some(ConnectionQuota {
            client: scope(None, 1234),
            paused_until: Some(now + Span::seconds(30)),
            tenant: Some(scope(Some(150_000), 3)),
        });
        let html = render(p, now);
        assert!(
            html.contains("1,234 requests today, counted here; no daily limit known."),
            "{html}"
        );
        assert!(
            html.contains("3 of 150,000 requests used today (&lt;0.1%)"),
            "{html}"
        );
        assert!(
            html.contains("Paused after the provider answered 429"),
            "{html}"
        );
    }

    #[test]
    fn numbers_read_well() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(150_000), "150,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(share(0, 10), "0.0%");
        assert_eq!(share(503, 1000), "50.3%");
        assert_eq!(round_span(Span::days(7)), "7d");
        assert_eq!(round_span(Span::hours(3)), "3h");
        assert_eq!(round_span(Span::seconds(150)), "2m 30s");
        assert_eq!(millis(850), "850 ms");
        assert_eq!(millis(1250), "1.2 s");
    }
}
