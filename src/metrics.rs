//! Prometheus metrics (`GET /metrics`): the recorder, the names, and the
//! per-connection gauges computed at scrape time. Labels are provider and
//! account only, never token material.

use std::sync::OnceLock;

use chrono::{DateTime, Utc};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::refresh::{ConnectionReport, Engine};
use crate::store::ConnState;

/// Counter: refresh attempts by `result` = ok | transient | rejected | refused
/// (refused: the provider refused the client configuration, the grant is kept).
pub const REFRESH_TOTAL: &str = "tokenkeeper_refresh_total";
/// Histogram: duration of refresh calls to the provider.
pub const REFRESH_DURATION: &str = "tokenkeeper_refresh_duration_seconds";
/// Counter: tokens handed out.
pub const TOKEN_REQUESTS_TOTAL: &str = "tokenkeeper_token_requests_total";
/// Histogram: time to answer a token request.
pub const TOKEN_REQUEST_DURATION: &str = "tokenkeeper_token_request_duration_seconds";
/// Counter: refresh tokens presented as bearer tokens.
pub const BEARER_MISUSE_TOTAL: &str = "tokenkeeper_bearer_misuse_total";
/// Gauge: stored connections whose row cannot be read (unknown state,
/// a sealed token that does not open, a bad timestamp); each is reported
/// in `/v1/connections` and never served.
pub const UNREADABLE_CONNECTIONS: &str = "tokenkeeper_unreadable_connections";
/// Gauge: 1 while the last readiness probe could write to the database.
pub const DATABASE_WRITABLE: &str = "tokenkeeper_database_writable";
/// Gauge: 1 while the database can be reached, 0 during an outage (the
/// daemon then serves held tokens and starts no refresh).
pub const STORAGE_UP: &str = "tokenkeeper_storage_up";
/// Counter: database outages (times it went from reachable to not).
pub const STORAGE_OUTAGES_TOTAL: &str = "tokenkeeper_storage_outages_total";
/// Counter: failed attempts to store a grant the provider issued.
pub const COMMIT_FAILURES_TOTAL: &str = "tokenkeeper_commit_failures_total";
/// Gauge: grants the provider issued that are held in memory, not yet stored.
pub const UNCOMMITTED_GRANTS: &str = "tokenkeeper_uncommitted_grants";

/// The `result` label values of [`REFRESH_TOTAL`], in the order of
/// `ConnectionReport::refreshes`.
pub const REFRESH_RESULTS: [&str; 4] = ["ok", "transient", "rejected", "refused"];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide recorder once; later calls return the same
/// handle. `None` if another recorder was installed first (e.g. by an
/// embedding program), in which case `/metrics` says so.
pub fn install() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(&[
                    0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                ])
                .ok()?
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok()?;
            describe();
            Some(handle)
        })
        .as_ref()
}

fn describe() {
    metrics::describe_histogram!(
        REFRESH_DURATION,
        metrics::Unit::Seconds,
        "Duration of refresh calls to the provider"
    );
    metrics::describe_histogram!(
        TOKEN_REQUEST_DURATION,
        metrics::Unit::Seconds,
        "Time to answer a token request"
    );
    metrics::describe_counter!(
        BEARER_MISUSE_TOTAL,
        "Refresh tokens presented as bearer tokens"
    );
    metrics::counter!(BEARER_MISUSE_TOTAL).increment(0);
    metrics::describe_gauge!(
        UNREADABLE_CONNECTIONS,
        "Stored connections that cannot be read and are not served (see last_error in /v1/connections)"
    );
    metrics::describe_gauge!(
        DATABASE_WRITABLE,
        "1 while the readiness probe can write to the database, 0 when it cannot"
    );
    // Present from the start, so an alert on them needs no `absent()`.
    metrics::gauge!(UNREADABLE_CONNECTIONS).set(0.0);
    metrics::gauge!(DATABASE_WRITABLE).set(1.0);
    metrics::describe_counter!(
        COMMIT_FAILURES_TOTAL,
        "Failed attempts to store a grant the provider issued (it is kept in memory and retried)"
    );
    metrics::describe_gauge!(
        UNCOMMITTED_GRANTS,
        "Grants the provider issued that are held in memory because storing them failed"
    );
    metrics::describe_counter!(
        crate::sinks::SINK_FAILURES_TOTAL,
        "Failed token-file writes and failed sink commands (see the warning logged with the path)"
    );
    metrics::describe_gauge!(
        STORAGE_UP,
        "1 while the database can be reached, 0 during an outage (held tokens are served, no refresh starts)"
    );
    metrics::describe_counter!(
        STORAGE_OUTAGES_TOTAL,
        "Times the database became unreachable"
    );
    metrics::gauge!(STORAGE_UP).set(1.0);
    metrics::counter!(STORAGE_OUTAGES_TOTAL).increment(0);
    // Present from the start, at zero.
    metrics::counter!(COMMIT_FAILURES_TOTAL).increment(0);
    metrics::gauge!(UNCOMMITTED_GRANTS).set(0.0);
}

/// The Prometheus text exposition: the recorder's series, then the
/// per-connection ones.
pub fn render(engine: &Engine) -> Option<String> {
    let handle = install()?;
    let report = engine.report();
    let mut out = handle.render();
    // About 600 bytes per connection: one allocation instead of doubling.
    out.reserve(report.len() * 640);
    write_connections(&mut out, &report, Utc::now());
    Some(out)
}

/// The per-connection series, written at scrape time straight from the
/// engine's snapshots rather than kept in the recorder: with 10,000
/// connections that would be 70,000 series held in memory between scrapes,
/// and series of deleted connections would linger.
fn write_connections(out: &mut String, report: &[ConnectionReport], now: DateTime<Utc>) {
    if report.is_empty() {
        return;
    }
    family(
        out,
        ("tokenkeeper_access_token_expiry_seconds", "gauge"),
        "Time left on the current access token, in seconds",
        report,
        ("", &[""]),
        |c, _| seconds(c.expires_at - now),
    );
    family(
        out,
        ("tokenkeeper_refresh_token_age_seconds", "gauge"),
        "Age of the current refresh token, in seconds",
        report,
        ("", &[""]),
        |c, _| seconds((now - c.refresh_token_issued_at).max(chrono::TimeDelta::zero())),
    );
    // Only connections whose refresh token has a known end (SPEC 11).
    let ending: Vec<ConnectionReport> = report
        .iter()
        .filter(|c| c.refresh_token_expires_at.is_some())
        .cloned()
        .collect();
    family(
        out,
        ("tokenkeeper_refresh_token_expiry_seconds", "gauge"),
        "Time left until the refresh token dies, in seconds (connections whose refresh token has a known end)",
        &ending,
        ("", &[""]),
        |c, _| {
            c.refresh_token_expires_at
                .map_or(0.0, |end| seconds((end - now).max(chrono::TimeDelta::zero())))
        },
    );
    family(
        out,
        ("tokenkeeper_connection_state", "gauge"),
        "1 for the connection's current state, 0 for the others",
        report,
        ("state", &ConnState::ALL),
        |c, state| f64::from(u8::from(c.state == *state)),
    );
    family(
        out,
        (TOKEN_REQUESTS_TOTAL, "counter"),
        "Access tokens handed out",
        report,
        ("", &[""]),
        |c, _| c.served as f64,
    );
    family(
        out,
        (REFRESH_TOTAL, "counter"),
        "Refresh attempts by result (ok, transient, rejected, refused)",
        report,
        ("result", &REFRESH_RESULTS),
        |c, result| {
            REFRESH_RESULTS
                .iter()
                .position(|r| r == result)
                .map_or(0.0, |i| c.refreshes[i] as f64)
        },
    );
}

/// One metric family: a series per connection and entry of `values` (the
/// values of the label named `label`; `[""]` for no such label), valued by
/// `value(connection, label value)`.
fn family<V: std::fmt::Display>(
    out: &mut String,
    (name, kind): (&str, &str),
    help: &str,
    report: &[ConnectionReport],
    (label, values): (&str, &[V]),
    value: impl Fn(&ConnectionReport, &V) -> f64,
) {
    use std::fmt::Write;
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for c in report {
        let (provider, account) = (escape(&c.provider), escape(&c.account));
        for state in values {
            let _ = write!(out, "{name}{{provider=\"{provider}\",account=\"{account}\"");
            if !label.is_empty() {
                let _ = write!(out, ",{label}=\"{state}\"");
            }
            let _ = writeln!(out, "}} {}", value(c, state));
        }
    }
    out.push('\n');
}

fn seconds(d: chrono::TimeDelta) -> f64 {
    d.num_milliseconds() as f64 / 1000.0
}

/// Label value escaping of the text format (`\\`, `\"`, newline).
fn escape(v: &str) -> std::borrow::Cow<'_, str> {
    if !v.contains(['\\', '"', '\n']) {
        return v.into();
    }
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
        .into()
}

/// Drains histogram samples into their buckets. Without it, samples pile up
/// in memory until the next scrape; the scheduler calls it every tick.
pub fn upkeep() {
    if let Some(Some(handle)) = HANDLE.get() {
        handle.run_upkeep();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_connection_series() {
        let now = Utc::now();
        let c = ConnectionReport {
            provider: "keap".into(),
            account: "a\"b".into(),
            state: ConnState::Retrying,
            expires_at: now + chrono::TimeDelta::seconds(90),
            refreshed_at: None,
            next_refresh_at: None,
            refresh_token_issued_at: now - chrono::TimeDelta::seconds(5),
            last_error: None,
            refresh_token_expires_at: Some(now + chrono::TimeDelta::seconds(600)),
            refresh_token_end_fixed: false,
            served: 7,
            refreshes: [2, 1, 0, 0],
        };
        let mut out = String::new();
        write_connections(&mut out, &[c], now);
        let labels = r#"provider="keap",account="a\"b""#;
        for line in [
            format!("tokenkeeper_access_token_expiry_seconds{{{labels}}} 90"),
            format!("tokenkeeper_refresh_token_age_seconds{{{labels}}} 5"),
            format!("tokenkeeper_refresh_token_expiry_seconds{{{labels}}} 600"),
            format!("tokenkeeper_connection_state{{{labels},state=\"retrying\"}} 1"),
            format!("tokenkeeper_connection_state{{{labels},state=\"active\"}} 0"),
            format!("tokenkeeper_token_requests_total{{{labels}}} 7"),
            format!("tokenkeeper_refresh_total{{{labels},result=\"ok\"}} 2"),
            format!("tokenkeeper_refresh_total{{{labels},result=\"refused\"}} 0"),
            "# TYPE tokenkeeper_token_requests_total counter".to_string(),
        ] {
            assert!(out.lines().any(|l| l == line), "missing {line} in\n{out}");
        }
        let mut empty = String::new();
        write_connections(&mut empty, &[], now);
        assert!(empty.is_empty());
    }
}
