//! PostgreSQL for the tests: a fresh database per test in the throw-away
//! cluster started by `tests/postgres/start.sh` (its URL in
//! `TOKENKEEPER_TEST_PG_URL`), so tests run in parallel without sharing
//! rows. Without that variable, a test is skipped with a line saying why,
//! except in CI (`CI=true`), where it fails: CI must run these tests.

use std::sync::atomic::{AtomicUsize, Ordering};

use sqlx::Connection;

/// The environment variable holding the test cluster's URL.
pub const URL_VAR: &str = "TOKENKEEPER_TEST_PG_URL";

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// Whether this run is CI, where a PostgreSQL test may not be skipped.
fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// The cluster's URL; `None` (after printing why) when the tests are to
/// be skipped.
pub fn cluster_url(test: &str) -> Option<String> {
    match std::env::var(URL_VAR) {
        Ok(u) if !u.is_empty() => Some(u),
        _ => {
            assert!(
                !in_ci(),
                "{URL_VAR} is not set but CI is: the PostgreSQL tests must run in CI (.ci/run starts a server with tests/postgres/start.sh)"
            );
            eprintln!(
                "SKIPPED {test}: it needs PostgreSQL; set {URL_VAR}, e.g. eval \"$(bash tests/postgres/start.sh)\" (see README, Run the tests)"
            );
            None
        }
    }
}

/// Creates a database of its own for `test` and returns its URL; `None`
/// when PostgreSQL tests are skipped (see the module doc).
pub async fn fresh_database(test: &str) -> Option<String> {
    let admin = cluster_url(test)?;
    let tag: String = test
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .take(32)
        .collect();
    let name = format!(
        "tk_{tag}_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let mut conn = sqlx::PgConnection::connect(&admin)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {URL_VAR} ({admin}): {e}"));
    sqlx::query(&format!("CREATE DATABASE \"{name}\""))
        .execute(&mut conn)
        .await
        .expect("create a test database");
    let _ = conn.close().await;
    Some(with_database(&admin, &name))
}

/// `url` with its database replaced by `name`.
pub fn with_database(url: &str, name: &str) -> String {
    let mut u = url::Url::parse(url).expect("a PostgreSQL URL");
    u.set_path(&format!("/{name}"));
    u.to_string()
}

/// Rewrites a harness config's `[storage] path = ...` line into
/// `url = "<url>"`: the same daemon, on PostgreSQL.
pub fn use_postgres(config: &std::path::Path, url: &str) {
    let text = std::fs::read_to_string(config).expect("config");
    let text: String = text
        .lines()
        .map(|l| {
            if l.starts_with("path = ") {
                format!("url = \"{url}\"")
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(config, text + "\n").expect("write config");
}
