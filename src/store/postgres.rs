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
use super::migrate::{self, Dump, MigrateError};
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

/// The one PostgreSQL connection of a transaction.
type Conn = sqlx::PgConnection;

impl Backend for Postgres {
    fn codec(&self) -> &Codec {
        &self.codec
    }

    async fn setting(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT value FROM installation WHERE name = $1")
                .bind(name.to_owned())
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn reseal(
        &self,
        new: &SealKey,
        open: &(dyn Fn(&SealContext<'_>, Column, &str) -> Option<SecretString> + Sync),
        key_check: bool,
    ) -> Result<usize, StoreError> {
        let mut tx = self.pool.begin().await?;
        // Locked: a daemon of the cluster committing meanwhile waits, so
        // no rotation is overwritten with the value read here.
        let rows = sqlx::query(
            "SELECT id, provider, account, generation, access_token, refresh_token FROM connections FOR UPDATE",
        )
        .fetch_all(&mut *tx)
        .await?;
        let mut n = 0;
        for r in &rows {
            let provider: String = r.try_get("provider")?;
            let account: String = r.try_get("account")?;
            let ctx = SealContext {
                provider: &provider,
                account: &account,
                generation: r.try_get("generation")?,
            };
            let access: String = r.try_get("access_token")?;
            let refresh: Option<String> = r.try_get("refresh_token")?;
            let Some((access, refresh)) =
                codec::reseal_row(new, &ctx, (&access, refresh.as_deref()), open)
            else {
                tracing::warn!(
                    provider = %provider,
                    account = %account,
                    "cannot re-seal this connection: its stored tokens do not open; left as they are"
                );
                continue;
            };
            sqlx::query(
                "UPDATE connections SET access_token = $1, refresh_token = $2 WHERE id = $3",
            )
            .bind(access)
            .bind(refresh)
            .bind(r.try_get::<i64, _>("id")?)
            .execute(&mut *tx)
            .await?;
            n += 1;
        }
        let upsert = "INSERT INTO installation (name, value) VALUES ($1, $2) \
                      ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value";
        if key_check {
            sqlx::query("DELETE FROM pending_authorizations")
                .execute(&mut *tx)
                .await?;
            sqlx::query(upsert)
                .bind("key_check")
                .bind(
                    new.seal("tokenkeeper", codec::KEY_CHECK_CONTEXT)
                        .into_bytes(),
                )
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query(upsert)
            .bind("seal_format")
            .bind(codec::SEAL_FORMAT.as_bytes().to_vec())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(n)
    }

    async fn fingerprint_key(&self) -> Result<[u8; 32], StoreError> {
        let fresh: [u8; 32] = rand::random();
        sqlx::query(
            "INSERT INTO installation (name, value) VALUES ('fingerprint_key', $1) ON CONFLICT (name) DO NOTHING",
        )
        .bind(fresh.to_vec())
        .execute(&self.pool)
        .await?;
        let v: Vec<u8> =
            sqlx::query_scalar("SELECT value FROM installation WHERE name = 'fingerprint_key'")
                .fetch_one(&self.pool)
                .await?;
        v.try_into()
            .map_err(|_| StoreError::Corrupt("fingerprint key has the wrong length".into()))
    }

    async fn each_fingerprint(
        &self,
        mut f: impl FnMut(i64, Fingerprint),
    ) -> Result<(), StoreError> {
        let mut rows =
            sqlx::query("SELECT connection_id, kind, digest FROM token_fingerprints ORDER BY id")
                .fetch(&self.pool);
        while let Some(r) = rows.try_next().await? {
            let fp = Fingerprint::from_stored(r.try_get("kind")?, r.try_get("digest")?)?;
            f(r.try_get("connection_id")?, fp);
        }
        Ok(())
    }

    async fn fingerprints_of(&self, connection_id: i64) -> Result<Vec<Fingerprint>, StoreError> {
        let rows = sqlx::query(
            "SELECT kind, digest FROM token_fingerprints WHERE connection_id = $1 ORDER BY id",
        )
        .bind(connection_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Fingerprint::from_stored(r.try_get("kind")?, r.try_get("digest")?))
            .collect()
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn write_once(&self) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO installation (name, value) VALUES ('write_probe', '\\x01'::bytea) \
             ON CONFLICT (name) DO UPDATE SET value = installation.value",
        )
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn close(&self) {
        self.pool.close().await;
    }

    async fn insert_pending(&self, p: &PendingAuthorization) -> Result<(), StoreError> {
        sqlx::query(&format!(
            "INSERT INTO pending_authorizations ({PENDING_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
        ))
        .bind(p.state.clone())
        .bind(p.provider.clone())
        .bind(p.account.clone())
        .bind(
            p.pkce_verifier
                .as_ref()
                .map(|v| self.codec.seal_value(v, &codec::pending_context(&p.state))),
        )
        .bind(p.redirect_uri.clone())
        .bind(p.browser_hash.clone())
        .bind(to_ms(p.created_at))
        .bind(to_ms(p.expires_at))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn purge_expired_pending(&self, now: DateTime<Utc>) -> Result<u64, StoreError> {
        let done = sqlx::query("DELETE FROM pending_authorizations WHERE expires_at < $1")
            .bind(to_ms(now))
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    async fn take_pending(
        &self,
        state: &str,
        browser_hash: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<PendingTake, StoreError> {
        sqlx::query("DELETE FROM pending_authorizations WHERE expires_at < $1")
            .bind(to_ms(now))
            .execute(&self.pool)
            .await?;
        let row = sqlx::query(&format!(
            "DELETE FROM pending_authorizations WHERE state = $1 AND ($2::text IS NULL OR browser_hash = $2) \
             RETURNING {PENDING_COLUMNS}"
        ))
        .bind(state.to_owned())
        .bind(browser_hash.map(str::to_owned))
        .fetch_optional(&self.pool)
        .await?;
        if let Some(r) = row {
            return self.codec.pending(&r, state).map(PendingTake::Taken);
        }
        if browser_hash.is_none() {
            return Ok(PendingTake::Unknown);
        }
        let exists = sqlx::query("SELECT 1 FROM pending_authorizations WHERE state = $1")
            .bind(state.to_owned())
            .fetch_optional(&self.pool)
            .await?;
        Ok(if exists.is_some() {
            PendingTake::OtherBrowser
        } else {
            PendingTake::Unknown
        })
    }

    async fn each_connection(&self, mut f: impl FnMut(ConnectionRow)) -> Result<(), StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM connections ORDER BY provider, account");
        let mut rows = sqlx::query(&sql).fetch(&self.pool);
        while let Some(r) = rows.try_next().await? {
            if let Some(row) = self.codec.decode_or_skip(&r) {
                f(row);
            }
        }
        Ok(())
    }

    async fn load_connection(&self, id: i64) -> Result<Option<ConnectionRow>, StoreError> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM connections WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().and_then(|r| self.codec.decode_or_skip(r)))
    }

    async fn versions(&self) -> Result<Vec<(i64, i64, String)>, StoreError> {
        let rows = sqlx::query("SELECT id, generation, state FROM connections")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
            .collect()
    }

    async fn save_discovery(
        &self,
        issuer: &str,
        document: &str,
        fetched_at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO discovery (issuer, document, fetched_at) VALUES ($1, $2, $3) \
             ON CONFLICT (issuer) DO UPDATE SET document = excluded.document, fetched_at = excluded.fetched_at",
        )
        .bind(issuer.to_owned())
        .bind(document.to_owned())
        .bind(to_ms(fetched_at))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn load_discovery(
        &self,
        issuer: &str,
    ) -> Result<Option<(String, DateTime<Utc>)>, StoreError> {
        let row = sqlx::query("SELECT document, fetched_at FROM discovery WHERE issuer = $1")
            .bind(issuer.to_owned())
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| Ok((r.try_get("document")?, from_ms(r.try_get("fetched_at")?))))
            .transpose()
    }

    async fn save_authorized_if(
        &self,
        provider: &str,
        account: &str,
        g: &NewGrant<'_>,
        fps: &[Fingerprint],
        events: &[NewEvent],
        only_if_no_working_grant: bool,
    ) -> Result<(ConnectionRow, Option<SecretString>), StoreError> {
        let mut tx = self.pool.begin().await?;
        // Two daemons storing the first grant of one name at once: the
        // second waits here, then sees the first's row (a row lock alone
        // cannot cover a row that does not exist yet).
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1 || '/' || $2))")
            .bind(provider.to_owned())
            .bind(account.to_owned())
            .execute(&mut *tx)
            .await?;
        if only_if_no_working_grant {
            refuse_a_working_grant(&mut tx, provider, account).await?;
        }
        let current: Option<(i64, Option<String>)> = sqlx::query_as(
            "SELECT generation, refresh_token FROM connections WHERE provider = $1 AND account = $2 FOR UPDATE",
        )
        .bind(provider.to_owned())
        .bind(account.to_owned())
        .fetch_optional(&mut *tx)
        .await?;
        let generation = current.as_ref().map_or(1, |c| c.0 + 1);
        // A replaced token that no longer opens is not worth failing the
        // new authorization for: it is simply not revoked.
        let old = SealContext {
            provider,
            account,
            generation: generation - 1,
        };
        let replaced = current.and_then(|c| c.1).and_then(|v| {
            self.codec
                .open_value(v, &old.column(Column::RefreshToken))
                .ok()
        });
        let sealed = self.codec.seal_pair((provider, account), generation, g);
        let row = sqlx::query(&format!(
            "INSERT INTO connections (provider, account, state, access_token, refresh_token, token_type, scope, \
                 expires_at, issued_at, refreshed_at, refresh_token_issued_at, generation, created_at) \
             VALUES ($1, $2, 'active', $3, $4, $5, $6, $7, $8, NULL, $8, 1, $8) \
             ON CONFLICT (provider, account) DO UPDATE SET \
                 state = 'active', access_token = $3, refresh_token = $4, token_type = $5, scope = $6, \
                 expires_at = $7, issued_at = $8, refreshed_at = NULL, refresh_token_issued_at = $8, \
                 generation = connections.generation + 1, last_error = NULL, failures = 0, next_attempt_at = NULL, \
                 lease_owner = NULL, lease_until = NULL, attempt_id = NULL, attempt_started_at = NULL, \
                 interrupted_at = NULL \
             RETURNING {COLUMNS}"
        ))
        .bind(provider.to_owned())
        .bind(account.to_owned())
        .bind(sealed.0)
        .bind(sealed.1)
        .bind(g.token_type.to_owned())
        .bind(g.scope.map(str::to_owned))
        .bind(to_ms(g.expires_at))
        .bind(to_ms(g.issued_at))
        .fetch_one(&mut *tx)
        .await?;
        let mut decoded = self.codec.decode(&row)?;
        // A new authorization replaces what the old grant kept beside its
        // tokens.
        let meta = g.meta.cloned().unwrap_or_default();
        write_meta(&mut tx, decoded.id, &meta).await?;
        decoded.meta = meta;
        record_fingerprints(&mut tx, decoded.id, fps, g.issued_at).await?;
        insert_events(&mut tx, events).await?;
        tx.commit().await?;
        Ok((decoded, replaced))
    }

    async fn ensure_connection(
        &self,
        provider: &str,
        account: &str,
        now: DateTime<Utc>,
        reason: &str,
    ) -> Result<Option<ConnectionRow>, StoreError> {
        let empty = SecretString::from(String::new());
        let placeholder = NewGrant {
            access_token: &empty,
            refresh_token: None,
            token_type: "Bearer",
            scope: None,
            issued_at: now,
            expires_at: now,
            meta: None,
        };
        let (sealed, _) = self.codec.seal_pair((provider, account), 1, &placeholder);
        sqlx::query(
            "INSERT INTO connections (provider, account, state, access_token, refresh_token, token_type, \
                 expires_at, issued_at, refresh_token_issued_at, generation, last_error, created_at) \
             VALUES ($1, $2, 'retrying', $3, NULL, 'Bearer', $4, $4, $4, 1, $5, $4) \
             ON CONFLICT (provider, account) DO NOTHING",
        )
        .bind(provider.to_owned())
        .bind(account.to_owned())
        .bind(sealed)
        .bind(to_ms(now))
        .bind(reason.to_owned())
        .execute(&self.pool)
        .await?;
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM connections WHERE provider = $1 AND account = $2"
        ))
        .bind(provider.to_owned())
        .bind(account.to_owned())
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().and_then(|r| self.codec.decode_or_skip(r)))
    }

    async fn begin_refresh(
        &self,
        id: i64,
        owner: &str,
        attempt_id: &str,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        takeover: Option<&LeaseSeen>,
    ) -> Result<BeginRefresh, StoreError> {
        // One conditional UPDATE: a concurrent taker waits for this row's
        // lock, then re-evaluates the WHERE against the lease written here
        // and finds it taken. In a transaction so an unreadable row is
        // rolled back untouched.
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(&format!(
            "UPDATE connections SET \
                 interrupted_at = CASE WHEN attempt_id IS NOT NULL AND lease_owner IS DISTINCT FROM $1 \
                                       THEN attempt_started_at ELSE interrupted_at END, \
                 lease_owner = $1, lease_until = $2, attempt_id = $3, attempt_started_at = $4, \
                 state = CASE WHEN state IN ('active', 'retrying', 'refreshing') THEN 'refreshing' ELSE state END \
             WHERE id = $5 AND (lease_owner IS NULL OR lease_owner = $1 \
                 OR (lease_owner = $6 AND attempt_id IS NOT DISTINCT FROM $7 \
                     AND lease_until IS NOT DISTINCT FROM $8)) \
             RETURNING {COLUMNS}"
        ))
        .bind(owner.to_owned())
        .bind(to_ms(lease_until))
        .bind(attempt_id.to_owned())
        .bind(to_ms(now))
        .bind(id)
        .bind(takeover.map(|t| t.owner.clone()))
        .bind(takeover.and_then(|t| t.attempt.clone()))
        .bind(takeover.and_then(|t| t.until_ms))
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(row) = row {
            let decoded = self.codec.decode(&row)?;
            if decoded.unreadable.is_some() {
                tx.rollback().await?;
                return Ok(BeginRefresh::Unreadable(Box::new(decoded)));
            }
            tx.commit().await?;
            return Ok(BeginRefresh::Started(Box::new(decoded)));
        }
        tx.commit().await?;
        let holder = sqlx::query(
            "SELECT lease_owner, lease_until, attempt_id FROM connections WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match holder {
            None => BeginRefresh::Gone,
            Some(r) => BeginRefresh::Busy {
                owner: r.try_get::<Option<String>, _>(0)?.unwrap_or_default(),
                until: super::from_ms(r.try_get::<Option<i64>, _>(1)?.unwrap_or(0)),
                attempt: r.try_get::<Option<String>, _>(2)?,
            },
        })
    }

    async fn renew_lease(
        &self,
        id: i64,
        owner: &str,
        attempt_id: &str,
        until: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE connections SET lease_until = $1 WHERE id = $2 AND lease_owner = $3 AND attempt_id = $4",
        )
        .bind(to_ms(until))
        .bind(id)
        .bind(owner.to_owned())
        .bind(attempt_id.to_owned())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn commit_refresh(
        &self,
        id: i64,
        name: (&str, &str),
        owner: &str,
        attempt_id: &str,
        base_generation: i64,
        g: &NewGrant<'_>,
        fps: &[Fingerprint],
        events: &[NewEvent],
    ) -> Result<CommitOutcome, StoreError> {
        let mut tx = self.pool.begin().await?;
        // The row locked from here to commit: the generation read is the
        // one the sealed values below are written over.
        let current: Option<i64> =
            sqlx::query_scalar("SELECT generation FROM connections WHERE id = $1 FOR UPDATE")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
        let generation = current.map_or(1, |g| g + 1);
        let sealed = || self.codec.seal_pair(name, generation, g);
        let cas = format!(
            "UPDATE connections SET {GRANT_SET}, state = 'active', lease_owner = NULL, lease_until = NULL, \
             attempt_id = NULL, attempt_started_at = NULL \
             WHERE id = $7 AND lease_owner = $8 AND attempt_id = $9 AND generation = $10 RETURNING {COLUMNS}"
        );
        let row = bind_grant(sqlx::query(&cas), g, sealed())
            .bind(id)
            .bind(owner.to_owned())
            .bind(attempt_id.to_owned())
            .bind(base_generation)
            .fetch_optional(&mut *tx)
            .await?;
        if row.is_some() {
            let decoded = self.finish_commit(&mut tx, id, name, generation, g).await?;
            record_fingerprints(&mut tx, id, fps, g.issued_at).await?;
            insert_events(&mut tx, events).await?;
            tx.commit().await?;
            return Ok(CommitOutcome::Committed {
                row: Box::new(decoded),
                kept_lease: true,
            });
        }
        let forced = format!(
            "UPDATE connections SET {GRANT_SET}, state = CASE WHEN lease_owner IS NULL THEN 'active' ELSE state END \
             WHERE id = $7 AND generation = $8 RETURNING {COLUMNS}"
        );
        let row = bind_grant(sqlx::query(&forced), g, sealed())
            .bind(id)
            .bind(base_generation)
            .fetch_optional(&mut *tx)
            .await?;
        if row.is_some() {
            let decoded = self.finish_commit(&mut tx, id, name, generation, g).await?;
            record_fingerprints(&mut tx, id, fps, g.issued_at).await?;
            insert_events(&mut tx, events).await?;
            tx.commit().await?;
            return Ok(CommitOutcome::Committed {
                row: Box::new(decoded),
                kept_lease: false,
            });
        }
        release_lease(&mut tx, id, owner, attempt_id).await?;
        let current = sqlx::query(&format!("SELECT {COLUMNS} FROM connections WHERE id = $1"))
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
        tx.commit().await?;
        let current = current.as_ref().map(|r| self.codec.decode(r)).transpose()?;
        Ok(CommitOutcome::Superseded(current.map(Box::new)))
    }

    async fn finish_attempt(
        &self,
        id: i64,
        owner: &str,
        attempt_id: &str,
        state: ConnState,
        last_error: Option<&str>,
        failures: u32,
        next_attempt_at: Option<DateTime<Utc>>,
    ) -> Result<Option<ConnectionRow>, StoreError> {
        let row = sqlx::query(&format!(
            "UPDATE connections SET state = $1, last_error = $2, failures = $3, next_attempt_at = $4, \
                 lease_owner = NULL, lease_until = NULL, attempt_id = NULL, attempt_started_at = NULL \
             WHERE id = $5 AND lease_owner = $6 AND attempt_id = $7 RETURNING {COLUMNS}"
        ))
        .bind(state.as_str())
        .bind(last_error.map(str::to_owned))
        .bind(failures as i64)
        .bind(next_attempt_at.map(to_ms))
        .bind(id)
        .bind(owner.to_owned())
        .bind(attempt_id.to_owned())
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(|r| self.codec.decode(r)).transpose()
    }

    async fn reject_attempt(
        &self,
        id: i64,
        (owner, attempt_id): (&str, &str),
        generation: i64,
        reason: &str,
        failures: u32,
        events: &[NewEvent],
    ) -> Result<Option<ConnectionRow>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(&format!(
            "UPDATE connections SET state = 'authorization_required', last_error = $1, failures = $2, \
                 next_attempt_at = NULL, lease_owner = NULL, lease_until = NULL, attempt_id = NULL, \
                 attempt_started_at = NULL \
             WHERE id = $3 AND lease_owner = $4 AND attempt_id = $5 AND generation = $6 RETURNING {COLUMNS}"
        ))
        .bind(reason.to_owned())
        .bind(failures as i64)
        .bind(id)
        .bind(owner.to_owned())
        .bind(attempt_id.to_owned())
        .bind(generation)
        .fetch_optional(&mut *tx)
        .await?;
        if row.is_none() {
            release_lease(&mut tx, id, owner, attempt_id).await?;
        } else {
            insert_events(&mut tx, events).await?;
        }
        tx.commit().await?;
        row.as_ref().map(|r| self.codec.decode(r)).transpose()
    }

    async fn mark_interrupted(
        &self,
        id: i64,
        dead_owner: Option<&str>,
        message: &str,
        events: &[NewEvent],
    ) -> Result<Option<ConnectionRow>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(&format!(
            "UPDATE connections SET interrupted_at = attempt_started_at, last_error = $1, \
                 state = CASE WHEN state = 'authorization_required' THEN state ELSE 'retrying' END, \
                 lease_owner = NULL, lease_until = NULL, attempt_id = NULL, attempt_started_at = NULL, \
                 next_attempt_at = NULL \
             WHERE id = $2 AND attempt_id IS NOT NULL AND lease_owner IS NOT DISTINCT FROM $3 RETURNING {COLUMNS}"
        ))
        .bind(message.to_owned())
        .bind(id)
        .bind(dead_owner.map(str::to_owned))
        .fetch_optional(&mut *tx)
        .await?;
        if row.is_some() {
            insert_events(&mut tx, events).await?;
        }
        tx.commit().await?;
        row.as_ref().map(|r| self.codec.decode(r)).transpose()
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
        sqlx::query(
            "INSERT INTO processes (owner, seen_at) VALUES ($1, $2) ON CONFLICT (owner) DO UPDATE SET seen_at = $2",
        )
        .bind(owner.to_owned())
        .bind(to_ms(now))
        .execute(&self.pool)
        .await?;
        sqlx::query("DELETE FROM processes WHERE seen_at < $1")
            .bind(to_ms(alive_since))
            .execute(&self.pool)
            .await?;
        let others: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM processes WHERE owner <> $1")
            .bind(owner.to_owned())
            .fetch_one(&self.pool)
            .await?;
        Ok(others.max(0) as usize)
    }

    async fn leave(&self, owner: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM processes WHERE owner = $1")
            .bind(owner.to_owned())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn delete_connection(
        &self,
        provider: &str,
        account: &str,
        events: &[NewEvent],
    ) -> Result<Option<ConnectionRow>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(&format!(
            "DELETE FROM connections WHERE provider = $1 AND account = $2 RETURNING {COLUMNS}"
        ))
        .bind(provider.to_owned())
        .bind(account.to_owned())
        .fetch_optional(&mut *tx)
        .await?;
        let decoded = row.as_ref().map(|r| self.codec.decode(r)).transpose()?;
        if let Some(d) = &decoded {
            sqlx::query("DELETE FROM token_fingerprints WHERE connection_id = $1")
                .bind(d.id)
                .execute(&mut *tx)
                .await?;
            insert_events(&mut tx, events).await?;
        }
        tx.commit().await?;
        Ok(decoded)
    }

    async fn delete_connection_at(
        &self,
        id: i64,
        generation: i64,
        events: &[NewEvent],
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query("DELETE FROM connections WHERE id = $1 AND generation = $2")
            .bind(id)
            .bind(generation)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 1 {
            sqlx::query("DELETE FROM token_fingerprints WHERE connection_id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            insert_events(&mut tx, events).await?;
        }
        tx.commit().await?;
        Ok(done.rows_affected() == 1)
    }

    async fn record_events(&self, events: &[NewEvent]) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        insert_events(&mut tx, events).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn events(
        &self,
        provider: &str,
        account: &str,
        q: &EventQuery,
    ) -> Result<Vec<Event>, StoreError> {
        let mut c = self.pool.acquire().await?;
        list_events(&mut c, provider, account, q).await
    }

    async fn purge_events(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        let mut c = self.pool.acquire().await?;
        purge_events(&mut c, before).await
    }

    async fn export(&self) -> Result<Dump, StoreError> {
        let mut tx = self.pool.begin().await?;
        // One snapshot for all four tables.
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            .execute(&mut *tx)
            .await?;
        let dump = read_dump(&mut tx).await?;
        tx.commit().await?;
        Ok(dump)
    }

    async fn import(&self, dump: &Dump, replace: bool, target: &str) -> Result<(), MigrateError> {
        let mut tx = self.pool.begin().await.map_err(StoreError::from)?;
        // Writers of the cluster wait until this commits, so the emptiness
        // seen below is what this transaction replaces.
        sqlx::query("LOCK TABLE connections IN EXCLUSIVE MODE")
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from)?;
        check_empty(&mut tx, replace, target).await?;
        write_dump(&mut tx, dump).await?;
        // Rows came with their ids: new ones continue after them.
        for table in ["connections", "token_fingerprints", "events"] {
            sqlx::query(&format!(
                "SELECT setval(pg_get_serial_sequence('{table}', 'id'), \
                 COALESCE((SELECT MAX(id) FROM {table}), 0) + 1, false)"
            ))
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from)?;
        }
        tx.commit().await.map_err(StoreError::from)?;
        Ok(())
    }
}

migrate::dump_sql!(Conn, '$');
super::events::events_sql!(Conn, '$');

impl Postgres {
    /// After a commit's write: writes what is kept beside the tokens (when
    /// given), re-seals a kept refresh token for the new generation (see
    /// [`Codec::reseal_kept`]) and returns the row.
    async fn finish_commit(
        &self,
        tx: &mut Conn,
        id: i64,
        name: (&str, &str),
        generation: i64,
        g: &NewGrant<'_>,
    ) -> Result<ConnectionRow, StoreError> {
        if let Some(meta) = g.meta {
            write_meta(tx, id, meta).await?;
        }
        if g.refresh_token.is_none() && self.codec.encrypted() {
            let kept: Option<String> =
                sqlx::query_scalar("SELECT refresh_token FROM connections WHERE id = $1")
                    .bind(id)
                    .fetch_one(&mut *tx)
                    .await?;
            if let Some(v) = kept {
                let resealed = self.codec.reseal_kept(name, generation, v)?;
                sqlx::query("UPDATE connections SET refresh_token = $1 WHERE id = $2")
                    .bind(resealed)
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM connections WHERE id = $1"))
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
        self.codec.decode(&row)
    }
}

/// Columns written by a rotation, bound by [`bind_grant`] as $1..$6.
const GRANT_SET: &str = "access_token = $1, refresh_token = COALESCE($2, refresh_token), token_type = $3, \
     scope = COALESCE($4, scope), expires_at = $5, issued_at = $6, refreshed_at = $6, \
     refresh_token_issued_at = CASE WHEN $2::text IS NULL THEN refresh_token_issued_at ELSE $6 END, \
     generation = generation + 1, failures = 0, next_attempt_at = NULL, last_error = NULL, interrupted_at = NULL";

type PgQuery<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

fn bind_grant<'q>(
    q: PgQuery<'q>,
    g: &NewGrant<'_>,
    sealed: (String, Option<String>),
) -> PgQuery<'q> {
    q.bind(sealed.0)
        .bind(sealed.1)
        .bind(g.token_type.to_string())
        .bind(g.scope.map(str::to_string))
        .bind(to_ms(g.expires_at))
        .bind(to_ms(g.issued_at))
}

/// Lets go of a lease this attempt still holds, without touching the grant.
async fn release_lease(
    tx: &mut Conn,
    id: i64,
    owner: &str,
    attempt_id: &str,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE connections SET lease_owner = NULL, lease_until = NULL, attempt_id = NULL, \
             attempt_started_at = NULL, \
             state = CASE WHEN state = 'refreshing' THEN 'active' ELSE state END \
         WHERE id = $1 AND lease_owner = $2 AND attempt_id = $3",
    )
    .bind(id)
    .bind(owner.to_owned())
    .bind(attempt_id.to_owned())
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Records fingerprints and drops the oldest beyond [`FINGERPRINTS_KEPT`].
async fn record_fingerprints(
    tx: &mut Conn,
    connection_id: i64,
    fps: &[Fingerprint],
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    for fp in fps {
        sqlx::query(
            "INSERT INTO token_fingerprints (connection_id, kind, digest, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(connection_id)
        .bind(fp.kind.as_str())
        .bind(fp.digest.to_vec())
        .bind(to_ms(now))
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "DELETE FROM token_fingerprints WHERE connection_id = $1 AND kind = $2 AND id NOT IN \
             (SELECT id FROM token_fingerprints WHERE connection_id = $1 AND kind = $2 ORDER BY id DESC LIMIT $3)",
        )
        .bind(connection_id)
        .bind(fp.kind.as_str())
        .bind(FINGERPRINTS_KEPT)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

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

/// Writes what is kept beside the tokens, inside the grant's transaction.
async fn write_meta(tx: &mut Conn, id: i64, meta: &GrantMeta) -> Result<(), StoreError> {
    sqlx::query("UPDATE connections SET extra = $1, refresh_token_expires_at = $2, refresh_token_cap_at = $3 WHERE id = $4")
        .bind(meta.extra_text())
        .bind(meta.refresh_token_expires_at.map(to_ms))
        .bind(meta.refresh_token_cap_at.map(to_ms))
        .bind(id)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// The compare of [`Backend::save_authorized_if`], under the advisory
/// lock of the name (so no other store of it interleaves); the transaction
/// is dropped, so rolled back, on the error.
async fn refuse_a_working_grant(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    provider: &str,
    account: &str,
) -> Result<(), StoreError> {
    let state: Option<String> = sqlx::query_scalar(
        "SELECT state FROM connections WHERE provider = $1 AND account = $2 FOR UPDATE",
    )
    .bind(provider.to_owned())
    .bind(account.to_owned())
    .fetch_optional(&mut **tx)
    .await?;
    match state.as_deref() {
        None | Some("authorization_required") => Ok(()),
        Some(_) => Err(StoreError::WorkingGrantExists {
            provider: provider.to_string(),
            account: account.to_string(),
        }),
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
