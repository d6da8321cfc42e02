//! Prometheus metrics (`GET /metrics`): the recorder, the names, and the
//! per-connection gauges computed at scrape time. Labels are provider and
//! account only, never token material.

use std::sync::OnceLock;

use chrono::Utc;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::refresh::Engine;

/// Counter: refresh attempts by `result` = ok | transient | rejected.
pub const REFRESH_TOTAL: &str = "tokenkeeper_refresh_total";
/// Histogram: duration of refresh calls to the provider.
pub const REFRESH_DURATION: &str = "tokenkeeper_refresh_duration_seconds";
/// Counter: tokens handed out.
pub const TOKEN_REQUESTS_TOTAL: &str = "tokenkeeper_token_requests_total";
/// Histogram: time to answer a token request.
pub const TOKEN_REQUEST_DURATION: &str = "tokenkeeper_token_request_duration_seconds";
/// Counter: refresh tokens presented as bearer tokens.
pub const BEARER_MISUSE_TOTAL: &str = "tokenkeeper_bearer_misuse_total";

const STATES: [&str; 4] = ["active", "refreshing", "retrying", "authorization_required"];

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
    metrics::describe_counter!(
        REFRESH_TOTAL,
        "Refresh attempts by result (ok, transient, rejected)"
    );
    metrics::describe_histogram!(
        REFRESH_DURATION,
        metrics::Unit::Seconds,
        "Duration of refresh calls to the provider"
    );
    metrics::describe_counter!(TOKEN_REQUESTS_TOTAL, "Access tokens handed out");
    metrics::describe_histogram!(
        TOKEN_REQUEST_DURATION,
        metrics::Unit::Seconds,
        "Time to answer a token request"
    );
    metrics::describe_counter!(
        BEARER_MISUSE_TOTAL,
        "Refresh tokens presented as bearer tokens"
    );
    metrics::describe_gauge!(
        "tokenkeeper_access_token_expiry_seconds",
        metrics::Unit::Seconds,
        "Time left on the current access token"
    );
    metrics::describe_gauge!(
        "tokenkeeper_refresh_token_age_seconds",
        metrics::Unit::Seconds,
        "Age of the current refresh token"
    );
    metrics::describe_gauge!(
        "tokenkeeper_connection_state",
        "1 for the connection's current state, 0 for the others"
    );
}

/// The Prometheus text exposition, with per-connection gauges refreshed.
pub fn render(engine: &Engine) -> Option<String> {
    let handle = install()?;
    let now = Utc::now();
    for c in engine.report() {
        let labels = [
            ("provider", c.provider.clone()),
            ("account", c.account.clone()),
        ];
        metrics::gauge!("tokenkeeper_access_token_expiry_seconds", &labels)
            .set((c.expires_at - now).num_milliseconds() as f64 / 1000.0);
        metrics::gauge!("tokenkeeper_refresh_token_age_seconds", &labels)
            .set((now - c.refresh_token_issued_at).num_milliseconds().max(0) as f64 / 1000.0);
        for state in STATES {
            metrics::gauge!(
                "tokenkeeper_connection_state",
                "provider" => c.provider.clone(),
                "account" => c.account.clone(),
                "state" => state
            )
            .set(if c.state == state { 1.0 } else { 0.0 });
        }
    }
    Some(handle.render())
}

/// Drains histogram samples into their buckets. Without it, samples pile up
/// in memory until the next scrape; the scheduler calls it every tick.
pub fn upkeep() {
    if let Some(Some(handle)) = HANDLE.get() {
        handle.run_upkeep();
    }
}
