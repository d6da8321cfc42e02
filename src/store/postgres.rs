//! The PostgreSQL backend (`storage.url`): several daemons, on one host or
//! many, sharing one database as a cluster (SPEC 9).
//!
//! Cross-host compare-and-swap: every lifecycle write is one conditional
//! `UPDATE ... RETURNING` (PostgreSQL re-checks its `WHERE` against the
//! newest row version after waiting for a concurrent writer, so two
//! daemons racing for a lease cannot both win), or a transaction that
//! locks the row first (`SELECT ... FOR UPDATE`) when the written values
//! depend on what is read (sealing for the next generation). Leases are
//! judged by the engine from what it sees of them, never here.
//!
//! The statements themselves are shared with SQLite
//! (`store::lifecycle`); this file gives the `DIALECT` and what only
//! a cluster needs (the session lock, `follow`, connection options).
//!
//! Queries are checked at run time (no `DATABASE_URL` at build time).
//! Migrations (`migrations/postgres/`) and the key check run at start
//! under an advisory lock, so daemons starting at once take turns. The
//! pool is small (a token daemon makes a handful of writes per refresh),
//! and every session has a `statement_timeout`, so a stuck database fails
//! a refresh (which is retried) instead of blocking it forever; tokens are
//! served from memory and never wait for the database.
//!
//! Must not: be reached other than through [`super::Store`]; check a lease
//! holder's process (it may be on another host).

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::TryStreamExt;
use secrecy::{ExposeSecret, SecretString};
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions, PgRow};
use sqlx::{Connection, Row};
use tokio_util::sync::CancellationToken;

use super::codec::{self, impl_columns, Codec, Column, SealContext, COLUMNS, PENDING_COLUMNS};
use super::feed::{Changes, Feed};
use super::lifecycle::{lifecycle_helpers, lifecycle_methods, Dialect};
use super::migrate::{Dump, MigrateError};
use super::{
    from_ms, to_ms, Backend, BeginRefresh, CommitOutcome, ConnState, ConnectionRow, Event,
    EventQuery, Fingerprint, GrantMeta, LeaseSeen, NewEvent, NewGrant, PendingAuthorization,
    PendingTake, StoreError, FINGERPRINTS_KEPT,
};
use crate::crypto::SealKey;

impl_columns!(PgRow);

/// Connections in the pool: a refresh holds one for a few statements;
/// the token endpoint holds none. Enough for a wave of refreshes paced by
/// the provider's rate limit plus `/readyz` and the scheduler's reads.
const POOL_SIZE: u32 = 4;

/// Longest a statement may run (waiting for a row lock included). Below
/// [`super::BUSY_TIMEOUT`] so the shutdown arithmetic in `daemon` holds.
pub const STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long to wait for a pooled connection (or a new one) before failing.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// Advisory lock held (shared) by every daemon for its life and
/// (exclusive) by offline commands: the PostgreSQL form of
/// [`super::DbLock`]. The value spells "tokenkp" and a 1.
const LOCK_DAEMONS: i64 = 0x746f_6b65_6e6b_7001;

/// Advisory lock around migrating and checking the key at start.
const LOCK_STARTUP: i64 = 0x746f_6b65_6e6b_7002;

/// Whether `s` is a PostgreSQL URL (`postgres://` or `postgresql://`).
pub fn is_url(s: &str) -> bool {
    let lower = s.trim_start().to_ascii_lowercase();
    lower.starts_with("postgres://") || lower.starts_with("postgresql://")
}

/// The URL without its password, for messages and logs.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            // Query parameters may carry a password too.
            if u.query().is_some() {
                u.set_query(Some("..."));
            }
            u.to_string()
        }
        Err(_) => "the PostgreSQL URL in storage.url".to_owned(),
    }
}

/// Whether `url` carries a password (in its user part or as a
/// `password` query parameter).
pub fn has_password(url: &str) -> bool {
    url::Url::parse(url).is_ok_and(|u| {
        u.password().is_some_and(|p| !p.is_empty())
            || u.query_pairs()
                .any(|(k, v)| k.eq_ignore_ascii_case("password") && !v.is_empty())
    })
}

/// The query parameters the PostgreSQL driver reads from a URL. It logs
/// any other one together with its value, and that value can be a secret
/// (libpq's `sslpassword`, a mistyped `password`), so others never reach it.
const KNOWN_PARAMETERS: [&str; 18] = [
    "sslmode",
    "ssl-mode",
    "sslrootcert",
    "ssl-root-cert",
    "ssl-ca",
    "sslcert",
    "ssl-cert",
    "sslkey",
    "ssl-key",
    "statement-cache-capacity",
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "application_name",
    "options",
];

/// `url` without the query parameters the driver does not know, and the
/// names of those left out (fit for a log line; never their values).
fn known_parameters_only(url: &str) -> (SecretString, Vec<String>) {
    let Ok(mut u) = url::Url::parse(url) else {
        // The driver refuses it too, before reading any parameter.
        return (SecretString::from(url.to_owned()), Vec::new());
    };
    if u.query().is_none() {
        return (SecretString::from(url.to_owned()), Vec::new());
    }
    let known = |k: &str| KNOWN_PARAMETERS.contains(&k) || k.starts_with("options[");
    let (kept, dropped): (Vec<_>, Vec<_>) = u
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .partition(|(k, _)| known(k));
    let names = dropped
        .into_iter()
        .map(|(k, _)| {
            let plain = k.len() <= 40
                && k.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            if plain {
                k
            } else {
                "(a parameter with an unusual name)".to_owned()
            }
        })
        .collect();
    if kept.is_empty() {
        u.set_query(None);
    } else {
        u.query_pairs_mut().clear().extend_pairs(kept);
    }
    (SecretString::from(String::from(u)), names)
}

/// The connection options of `url`, with this daemon's session settings.
fn options(url: &SecretString) -> Result<PgConnectOptions, StoreError> {
    let redacted = redact(url.expose_secret());
    let (url, unknown) = known_parameters_only(url.expose_secret());
    if !unknown.is_empty() {
        tracing::warn!(
            "the PostgreSQL URL has parameters tokenkeeper does not use ({}); they are left out, remove them from the URL",
            unknown.join(", ")
        );
    }
    let opts =
        PgConnectOptions::from_str(url.expose_secret()).map_err(|source| StoreError::Connect {
            url: redacted,
            source,
        })?;
    let timeout = format!("{}", STATEMENT_TIMEOUT.as_millis());
    Ok(opts.application_name("tokenkeeper").options([
        ("statement_timeout", timeout.as_str()),
        // A transaction left open by a stalled daemon must not hold
        // row locks for long.
        ("idle_in_transaction_session_timeout", "30000"),
        // The daemons' advisory lock lives on an idle connection: a server
        // or database `idle_session_timeout` would close it and silently
        // free the lock, letting `rekey` or `migrate-storage` run beside
        // a daemon. The pool keeps its own idle limit.
        ("idle_session_timeout", "0"),
        // As SQLite's `synchronous = FULL`: a rotated refresh token is the
        // only valid one the moment the provider answered, so a commit
        // must be on disk when it returns, whatever the server's default.
        ("synchronous_commit", "on"),
        // The conditional UPDATEs rely on READ COMMITTED: a second writer
        // waits, re-reads the row and changes nothing (rather than failing
        // with a serialization error under a stricter server default).
        // A space in a startup option is escaped with a backslash.
        ("default_transaction_isolation", "read\\ committed"),
    ]))
}

/// How often a daemon checks that its advisory lock is still held.
pub const LOCK_CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// A connection of its own holding the daemons' advisory lock (shared for a daemon,
/// exclusive for an offline command) until dropped. Closing the connection
/// releases the lock, so a daemon that dies never leaves it held.
///
/// The server can close that connection under a living daemon (a restart,
/// a failover, `pg_terminate_backend`), taking the lock with it; a daemon's
/// lock is therefore checked every [`LOCK_CHECK_INTERVAL`] and taken again
/// on a new connection when it is gone, so offline commands are refused
/// again from then on.
pub struct SessionLock {
    /// An offline command's connection (held for its short life).
    _conn: Option<sqlx::PgConnection>,
    /// A daemon's keeper task, which owns its connection.
    keeper: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for SessionLock {
    fn drop(&mut self) {
        if let Some(k) = &self.keeper {
            k.abort();
        }
    }
}

impl SessionLock {
    /// Takes the lock without waiting; refused while a conflicting holder
    /// has it.
    pub async fn take(url: &SecretString, exclusive: bool) -> Result<SessionLock, StoreError> {
        let conn = Self::lock_connection(url, exclusive).await?;
        if exclusive {
            return Ok(SessionLock {
                _conn: Some(conn),
                keeper: None,
            });
        }
        let keeper = tokio::spawn(keep(url.clone(), conn));
        Ok(SessionLock {
            _conn: None,
            keeper: Some(keeper),
        })
    }

    /// A new connection holding the lock.
    async fn lock_connection(
        url: &SecretString,
        exclusive: bool,
    ) -> Result<sqlx::PgConnection, StoreError> {
        let redacted = redact(url.expose_secret());
        let mut conn = sqlx::PgConnection::connect_with(&options(url)?)
            .await
            .map_err(|source| StoreError::Connect {
                url: redacted.clone(),
                source,
            })?;
        let sql = if exclusive {
            "SELECT pg_try_advisory_lock($1)"
        } else {
            "SELECT pg_try_advisory_lock_shared($1)"
        };
        let got: bool = sqlx::query_scalar(sql)
            .bind(LOCK_DAEMONS)
            .fetch_one(&mut conn)
            .await?;
        if !got {
            return Err(if exclusive {
                StoreError::DaemonRunning { path: redacted }
            } else {
                StoreError::OfflineCommandRunning { path: redacted }
            });
        }
        Ok(conn)
    }
}

/// A daemon's lock keeper: checks the connection holding the shared lock
/// and takes the lock again on a new one when the server dropped it.
///
/// While the lock is lost, it is tried again every [`LOCK_RETAKE_INTERVAL`]
/// (an offline command started in that gap could take it first; it then
/// runs beside this daemon, see the README's "Several hosts"); a failure
/// to take it again is logged once per loss, not at every try (the
/// database being away is reported by the store's feed).
async fn keep(url: SecretString, conn: sqlx::PgConnection) {
    let mut held = Some(conn);
    let mut told = false;
    loop {
        let wait = if held.is_some() {
            LOCK_CHECK_INTERVAL
        } else {
            LOCK_RETAKE_INTERVAL
        };
        tokio::time::sleep(wait).await;
        if let Some(c) = held.as_mut() {
            if sqlx::query("SELECT 1").execute(&mut *c).await.is_ok() {
                continue;
            }
            held = None;
            tracing::warn!(
                database = %redact(url.expose_secret()),
                "the connection holding this daemon's lock on the database was closed; taking the lock again"
            );
        }
        match SessionLock::lock_connection(&url, false).await {
            Ok(c) => {
                tracing::info!("the daemon's lock on the database is held again");
                held = Some(c);
                told = false;
            }
            Err(e) if !told => {
                told = true;
                tracing::warn!(
                    error = %e,
                    "cannot take this daemon's lock on the database again yet; an offline command (rekey, migrate-storage) could run beside this daemon until it is; trying again"
                );
            }
            Err(_) => {}
        }
    }
}

/// How often a lost lock is tried again: short, since an offline command
/// could take it in the gap.
const LOCK_RETAKE_INTERVAL: Duration = Duration::from_millis(500);

/// The channel on which every committed change of a connection is
/// announced, with the connection's id as payload (the trigger of
/// `migrations/postgres/*_announce_changes.sql`).
pub const CHANNEL: &str = "tokenkeeper_connections";

/// First wait before connecting the listener again after a failure;
/// doubled per failure up to [`FOLLOW_BACKOFF_MAX`].
const FOLLOW_BACKOFF_MIN: Duration = Duration::from_millis(100);

/// Longest wait between attempts to reach the database again: short, so
/// a database back after an outage is noticed (and every grant re-read)
/// within about this long.
const FOLLOW_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// How long the listener waits for a connection: short, so an outage is
/// reported about this long after the server went away.
const FOLLOW_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// How long the listener stays quiet before it checks its connection.
const FOLLOW_PING_EVERY: Duration = Duration::from_secs(5);

/// Follows the announcements of every daemon's commits (`LISTEN` on
/// [`CHANNEL`], on a connection of its own outside the pool) into `feed`
/// until `shutdown`: each announced id is queued as a change; a lost
/// connection is reconnected at once and then with backoff, and every
/// grant is queued for re-reading once it is back, since announcements
/// sent meanwhile are lost. A connection that cannot be had is an outage
/// ([`Feed::lost`]), and having it again ends it ([`Feed::back`]).
///
/// The first `LISTEN` is made before this returns, so a daemon follows
/// the others before it serves; the task it returns does the rest.
pub(super) async fn follow(
    pg: Postgres,
    feed: Arc<Feed>,
    shutdown: CancellationToken,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let options = (*pg.pool.connect_options()).clone();
    // Two: a new listener does not wait for the old one's connection to
    // be given back.
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .min_connections(0)
        .acquire_timeout(FOLLOW_CONNECT_TIMEOUT)
        .connect_lazy_with(options.clone());
    let first = listen(&pool).await;
    follow_on(pool, options, first, feed, shutdown)
}

async fn follow_on(
    pool: PgPool,
    options: PgConnectOptions,
    first: Result<PgListener, sqlx::Error>,
    feed: Arc<Feed>,
    shutdown: CancellationToken,
) {
    let mut backoff = FOLLOW_BACKOFF_MIN;
    let mut first = Some(first);
    loop {
        let connected = match first.take() {
            Some(r) => r,
            None => tokio::select! {
                () = shutdown.cancelled() => return,
                r = listen(&pool) => r,
            },
        };
        let mut listener = match connected {
            Ok(l) => l,
            Err(e) => {
                // A pool wait can time out with the server fine (this
                // process was stopped for a while): only a connection that
                // cannot be made now is an outage.
                let probe = tokio::time::timeout(
                    FOLLOW_CONNECT_TIMEOUT,
                    sqlx::PgConnection::connect_with(&options),
                )
                .await;
                match probe {
                    Ok(Ok(c)) => {
                        let _ = c.close().await;
                        tracing::debug!(error = %e, "listening for other daemons' writes failed; retrying");
                    }
                    Ok(Err(e)) => {
                        feed.lost(&StoreError::from(e));
                    }
                    Err(_) => {
                        feed.lost(&"no connection to the database within 1 s");
                    }
                }
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(FOLLOW_BACKOFF_MAX);
                continue;
            }
        };
        backoff = FOLLOW_BACKOFF_MIN;
        if !feed.back() {
            // What was announced while nobody listened (since the
            // daemon's first read, or while the connection was down) is
            // lost: everything is read again.
            feed.push(Changes::All);
        }
        loop {
            let got = tokio::select! {
                () = shutdown.cancelled() => return,
                r = tokio::time::timeout(FOLLOW_PING_EVERY, listener.try_recv()) => r,
            };
            match got {
                Ok(Ok(Some(n))) => feed.push(match n.payload().parse::<i64>() {
                    Ok(id) => Changes::Rows([id].into()),
                    Err(_) => Changes::All,
                }),
                // The connection was lost and made again at once.
                Ok(Ok(None)) => feed.push(Changes::All),
                // Lost: a new listener is connected above, at once.
                Ok(Err(_)) => break,
                // Quiet for a while: a server cut off without closing the
                // connection (a network partition) is noticed here.
                Err(_) => {
                    let ping = sqlx::query("SELECT 1").execute(&mut listener);
                    if !matches!(
                        tokio::time::timeout(FOLLOW_CONNECT_TIMEOUT * 2, ping).await,
                        Ok(Ok(_))
                    ) {
                        break;
                    }
                }
            }
        }
    }
}

/// A listener on [`CHANNEL`].
async fn listen(pool: &PgPool) -> Result<PgListener, sqlx::Error> {
    let mut l = PgListener::connect_with(pool).await?;
    l.listen(CHANNEL).await?;
    Ok(l)
}

/// A connected PostgreSQL database.
#[derive(Clone)]
pub struct Postgres {
    pool: PgPool,
    codec: Codec,
}

impl Postgres {
    /// Connects (the pool opens one connection at once, so a wrong URL,
    /// password or unreachable server fails here, naming the URL).
    pub(super) async fn connect(url: &SecretString, codec: Codec) -> Result<Postgres, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(POOL_SIZE)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options(url)?)
            .await
            .map_err(|source| StoreError::Connect {
                url: redact(url.expose_secret()),
                source,
            })?;
        Ok(Postgres { pool, codec })
    }

    /// Waits for [`LOCK_STARTUP`]; held until the returned connection is
    /// dropped (it is closed then, which releases the lock).
    pub(super) async fn startup_lock(&self) -> Result<PoolConnection<sqlx::Postgres>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        conn.close_on_drop();
        // Without a statement timeout: daemons starting at once wait for
        // each other's migration, however long it takes.
        sqlx::query("SET statement_timeout = 0")
            .execute(&mut *conn)
            .await?;
        sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(LOCK_STARTUP)
            .execute(&mut *conn)
            .await?;
        Ok(conn)
    }

    /// Applies `migrations/postgres/` (the caller holds the startup lock).
    pub(super) async fn migrate(&self, url: &str) -> Result<(), StoreError> {
        sqlx::migrate!("./migrations/postgres")
            .run(&self.pool)
            .await
            .map_err(|source| match source {
                sqlx::migrate::MigrateError::VersionMissing(version) => StoreError::NewerVersion {
                    path: url.to_owned(),
                    version,
                },
                source => StoreError::Migrate {
                    path: url.to_owned(),
                    source,
                },
            })
    }

    /// The pool, for tests that must write what no method writes.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

/// PostgreSQL locks rows: a transaction locks the row it goes on to
/// write when it reads it, and takes an advisory lock on a name whose row
/// may not exist yet (a row lock cannot cover it).
const DIALECT: Dialect = Dialect {
    for_update: " FOR UPDATE",
    lock_name: "SELECT pg_advisory_xact_lock(hashtext($1 || '/' || $2))",
    lock_generation: "SELECT generation FROM connections WHERE id = $1 FOR UPDATE",
    lock_all: None,
    export_snapshot: Some("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"),
    import_lock: "LOCK TABLE connections IN EXCLUSIVE MODE",
    after_import: &[
        "SELECT setval(pg_get_serial_sequence('connections', 'id'), \
         COALESCE((SELECT MAX(id) FROM connections), 0) + 1, false)",
        "SELECT setval(pg_get_serial_sequence('token_fingerprints', 'id'), \
         COALESCE((SELECT MAX(id) FROM token_fingerprints), 0) + 1, false)",
        "SELECT setval(pg_get_serial_sequence('events', 'id'), \
         COALESCE((SELECT MAX(id) FROM events), 0) + 1, false)",
    ],
};

impl Backend for Postgres {
    lifecycle_methods!(DIALECT);

    async fn close(&self) {
        self.pool.close().await;
    }

    /// Always yes here: without a listener (see `follow`) nothing says
    /// what changed, so the scheduler reads every row once per
    /// `check_interval`. A daemon follows the announcements instead, and
    /// `Store::changed` then answers from them exactly.
    async fn changed(&self) -> Result<bool, StoreError> {
        Ok(true)
    }

    async fn heartbeat(
        &self,
        owner: &str,
        now: DateTime<Utc>,
        alive_since: DateTime<Utc>,
    ) -> Result<usize, StoreError> {
        let mut c = self.pool.acquire().await?;
        write_heartbeat(&mut c, owner, now, alive_since).await
    }
}

lifecycle_helpers!(Postgres, sqlx::Postgres, DIALECT);

/// Cause and fix of a PostgreSQL failure, if it is one an operator can fix.
pub(super) fn problem_of(e: &sqlx::Error) -> Option<&'static str> {
    let sqlx::Error::Database(d) = e else {
        return None;
    };
    d.try_downcast_ref::<sqlx::postgres::PgDatabaseError>()?;
    pg_problem(d.code().as_deref()?)
}

/// Cause and fix for a PostgreSQL SQLSTATE.
fn pg_problem(code: &str) -> Option<&'static str> {
    Some(match code {
        "57014" => "the database did not answer within the statement timeout (a lock held elsewhere, or an overloaded server); tokenkeeper retries",
        "25006" => "the database is read-only (a standby, or default_transaction_read_only); point storage.url at the primary",
        "53100" => "the disk holding the PostgreSQL database is full; free space on it",
        "53300" => "the PostgreSQL server has no connection slot left; raise max_connections or reduce other clients",
        "28P01" | "28000" => "PostgreSQL refused the login; check the user and password in storage.url",
        "3D000" => "the PostgreSQL database named in storage.url does not exist; create it (createdb) or fix the URL",
        "42501" => "the PostgreSQL user lacks a privilege tokenkeeper needs; make it the owner of the database (or grant CREATE and ALL on its tables)",
        "57P01" | "57P02" | "57P03" => "the PostgreSQL server is shutting down or starting up; tokenkeeper retries",
        _ => return None,
    })
}

/// Why a connection could not be made, with the fix.
pub(super) fn describe_connect(e: &sqlx::Error) -> String {
    if let Some(sentence) = problem_of(e) {
        return format!("{sentence} ({e})");
    }
    match e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut => format!(
            "{e}; check that the server runs and listens at the host and port in storage.url, and that no firewall is in between"
        ),
        sqlx::Error::Configuration(_) => {
            format!("{e}; check storage.url (postgres://USER@HOST:PORT/DATABASE)")
        }
        _ => format!("{e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_recognised_and_passwords_never_shown() {
        assert!(is_url("postgres://u@h/db"));
        assert!(is_url("PostgreSQL://u@h/db"));
        assert!(!is_url("/var/lib/tokenkeeper/tokenkeeper.db"));
        let shown = redact("postgres://tk:s3cret@db.example:5432/tk?password=other");
        assert!(
            !shown.contains("s3cret") && !shown.contains("other"),
            "{shown}"
        );
        assert!(shown.contains("db.example:5432/tk"), "{shown}");
        assert!(!redact("postgres://tk:s3cret@[bad").contains("s3cret"));
    }

    #[test]
    fn unknown_url_parameters_never_reach_the_driver_and_only_their_names_are_told() {
        let (url, dropped) = known_parameters_only(
            "postgres://tk:pw@db.example/tk?sslmode=require&sslpassword=s3cret&passwrd=other&options[search_path]=a",
        );
        let url = url.expose_secret().to_owned();
        assert!(!url.contains("s3cret") && !url.contains("other"), "{url}");
        assert!(
            url.contains("sslmode=require") && url.contains("tk:pw@"),
            "{url}"
        );
        assert_eq!(dropped, vec!["sslpassword", "passwrd"]);
        let opts = PgConnectOptions::from_str(&url).unwrap();
        assert_eq!(opts.get_host(), "db.example");
        let (url, dropped) = known_parameters_only("postgres://tk@db.example/tk?a%3Dx%20y=s3cret");
        assert_eq!(url.expose_secret(), "postgres://tk@db.example/tk");
        assert!(!dropped[0].contains("s3cret"), "{dropped:?}");
        let (url, dropped) = known_parameters_only("postgres://tk@db.example/tk");
        assert_eq!(url.expose_secret(), "postgres://tk@db.example/tk");
        assert!(dropped.is_empty());
    }

    #[test]
    fn common_failures_name_their_fix() {
        assert!(pg_problem("57014").unwrap().contains("statement timeout"));
        assert!(pg_problem("25006").unwrap().contains("primary"));
        assert!(pg_problem("3D000").unwrap().contains("createdb"));
        assert!(pg_problem("23505").is_none());
    }
}
