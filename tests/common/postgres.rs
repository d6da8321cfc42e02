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
    Some(create_database(&admin, test).await)
}

/// Creates a database for `test` in the cluster at `admin`; its URL.
pub async fn create_database(admin: &str, test: &str) -> String {
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
    // The time too: a process id is reused, and a cluster kept between
    // runs still holds the databases of earlier ones.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let name = format!(
        "tk_{tag}_{}_{}_{nanos}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let mut conn = sqlx::PgConnection::connect(admin)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {URL_VAR} ({admin}): {e}"));
    sqlx::query(&format!("CREATE DATABASE \"{name}\""))
        .execute(&mut conn)
        .await
        .expect("create a test database");
    let _ = conn.close().await;
    with_database(admin, &name)
}

/// A throw-away PostgreSQL cluster of one test's own (started with
/// `tests/postgres/start.sh`), for a test that stops the server: the
/// shared cluster other tests run against in parallel must stay up.
/// Stopped and removed on drop.
pub struct OwnCluster {
    /// The URL of its `postgres` database.
    pub url: String,
    dir: String,
}

fn script(name: &str) -> String {
    format!("{}/tests/postgres/{name}", env!("CARGO_MANIFEST_DIR"))
}

impl OwnCluster {
    /// Starts one; `None` (after saying why) where PostgreSQL tests are
    /// skipped (see the module doc).
    pub fn start(test: &str) -> Option<OwnCluster> {
        cluster_url(test)?;
        let out = std::process::Command::new("bash")
            .arg(script("start.sh"))
            .output()
            .expect("run tests/postgres/start.sh");
        let said = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "tests/postgres/start.sh failed: {said}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let value = |var: &str| {
            said.lines()
                .find_map(|l| l.strip_prefix(&format!("export {var}='")))
                .and_then(|v| v.strip_suffix('\''))
                .unwrap_or_else(|| panic!("start.sh printed no {var}: {said}"))
                .to_owned()
        };
        Some(OwnCluster {
            url: value(URL_VAR),
            dir: value("TOKENKEEPER_TEST_PG_DIR"),
        })
    }

    fn ctl(&self, what: &str) {
        let out = std::process::Command::new("bash")
            .arg(script("ctl.sh"))
            .arg(what)
            .env("TOKENKEEPER_TEST_PG_DIR", &self.dir)
            .output()
            .expect("run tests/postgres/ctl.sh");
        assert!(
            out.status.success(),
            "ctl.sh {what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Stops the server (`pg_ctl stop -m fast`: every connection is
    /// terminated).
    pub fn stop_server(&self) {
        self.ctl("stop");
    }

    /// Starts the server again on the same port and data.
    pub fn start_server(&self) {
        self.ctl("start");
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        let _ = std::process::Command::new("bash")
            .arg(script("stop.sh"))
            .env("TOKENKEEPER_TEST_PG_DIR", &self.dir)
            .output();
    }
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
