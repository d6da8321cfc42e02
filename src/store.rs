//! Durable state: the only module that speaks SQL.
//!
//! SQLite through sqlx, WAL, `synchronous = FULL` (a rotated refresh token
//! must survive power loss the moment it is committed), migrations embedded
//! and applied at open. Every write that follows a network call is a
//! compare-and-swap on the lease owner and attempt id, so a writer that lost
//! its lease cannot silently overwrite a newer grant. Instants are stored as
//! UTC milliseconds.
//!
//! The API is shaped by what the lifecycle needs (take a lease, commit a
//! rotation, ...), not by tables, so a PostgreSQL backend can be added
//! behind the same methods.
//!
//! Sealed tokens (with `storage.encryption_key_file`) are bound to their
//! place: the associated data names the connection, the column and the
//! grant generation the row has once the write lands, so a value swapped
//! between columns, moved to another row or replayed from an older grant
//! does not open. A row that cannot be read (such a value, an unknown
//! state, a bad timestamp) never stops the daemon and is never served: it
//! decodes as a stand-in (`authorization_required`, no token) with
//! `unreadable` and `last_error` saying what is wrong, is logged once at
//! error level and counted in `tokenkeeper_unreadable_connections`. The
//! lifecycle never writes it: `begin_refresh` rolls back and answers
//! `BeginRefresh::Unreadable`, so no lease, attempt or state is recorded
//! over it; only a new authorization or a forget rewrites or removes it.
//!
//! Daemons hold a shared advisory lock on `<database>.lock` for their
//! whole life; offline commands (`rekey`) take it exclusively, so they
//! refuse to run under a daemon (see [`DbLock`]).

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use futures_util::TryStreamExt;
use secrecy::{ExposeSecret, SecretString};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{Row, SqlitePool};

use crate::crypto::{self, SealKey};

/// Errors of the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot prepare the database {path} ({source}); check that the service user can create and write it and its directory")]
    Directory {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot open the database {path}: {}", describe_open(.source))]
    Open { path: String, source: sqlx::Error },
    #[error("the database {path} was written by a newer version of tokenkeeper (it has migration {version}, which this version does not know); upgrade tokenkeeper, or restore a backup made by this version")]
    NewerVersion { path: String, version: i64 },
    #[error("cannot apply database migrations to {path}: {}", describe_migrate(.source))]
    Migrate {
        path: String,
        source: sqlx::migrate::MigrateError,
    },
    #[error("{}", describe_sql(.0))]
    Sql(#[from] sqlx::Error),
    #[error("a tokenkeeper daemon is using the database {path}; stop it first (systemctl stop tokenkeeper), then run this command again")]
    DaemonRunning { path: String },
    #[error("an offline command (such as `tokenkeeper rekey`) is working on the database {path}; wait until it ends, then start the daemon again")]
    OfflineCommandRunning { path: String },
    #[error("the database {path} can be read by other users (mode {mode:o}); run `chmod 600 {path}` and start again")]
    Permissions { path: String, mode: u32 },
    #[error("the database was encrypted with another key; set storage.encryption_key_file to the key it was written with (nothing was changed)")]
    WrongKey,
    #[error("the database holds encrypted tokens; set storage.encryption_key_file to its key (nothing was changed)")]
    KeyRequired,
    #[error(transparent)]
    Sealed(#[from] crypto::OpenError),
    #[error("the stored row is corrupt: {0}")]
    Corrupt(String),
    #[error("the database cannot be written: {0}")]
    NotWritable(String),
}

/// Lifecycle state of a connection (SPEC 7). Serialised, stored and shown
/// under SPEC's names (`active`, `refreshing`, `retrying`,
/// `authorization_required`); Rust code matches on the variants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnState {
    Active,
    Refreshing,
    Retrying,
    AuthorizationRequired,
}

impl ConnState {
    /// Every state, in SPEC 7's order (the `state` label values of
    /// `/metrics`).
    pub const ALL: [ConnState; 4] = [
        ConnState::Active,
        ConnState::Refreshing,
        ConnState::Retrying,
        ConnState::AuthorizationRequired,
    ];

    /// SPEC's name of the state, as stored and serialised.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnState::Active => "active",
            ConnState::Refreshing => "refreshing",
            ConnState::Retrying => "retrying",
            ConnState::AuthorizationRequired => "authorization_required",
        }
    }

    fn parse(s: &str) -> Result<ConnState, StoreError> {
        Ok(match s {
            "active" => ConnState::Active,
            "refreshing" => ConnState::Refreshing,
            "retrying" => ConnState::Retrying,
            "authorization_required" => ConnState::AuthorizationRequired,
            other => return Err(StoreError::Corrupt(format!("unknown state {other:?}"))),
        })
    }
}

impl std::fmt::Display for ConnState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A connection as stored.
pub struct ConnectionRow {
    pub id: i64,
    pub provider: String,
    pub account: String,
    pub state: ConnState,
    pub access_token: SecretString,
    pub refresh_token: Option<SecretString>,
    pub token_type: String,
    pub scope: Option<String>,
    pub expires_at: DateTime<Utc>,
    pub issued_at: DateTime<Utc>,
    pub refreshed_at: Option<DateTime<Utc>>,
    pub refresh_token_issued_at: DateTime<Utc>,
    pub generation: i64,
    pub last_error: Option<String>,
    pub failures: u32,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub lease_owner: Option<String>,
    pub lease_until: Option<DateTime<Utc>>,
    pub attempt_id: Option<String>,
    pub attempt_started_at: Option<DateTime<Utc>>,
    pub interrupted_at: Option<DateTime<Utc>>,
    /// Why the stored row cannot be read, if it cannot: then the other
    /// fields are a stand-in (see `Store::decode`), never to be acted on
    /// or written back by the lifecycle; only a new authorization (which
    /// rewrites the whole row) or a local forget touches it.
    pub unreadable: Option<String>,
}

/// A token pair just received from the provider.
pub struct NewGrant<'a> {
    pub access_token: &'a SecretString,
    /// `None`: the provider did not rotate; keep the stored refresh token.
    pub refresh_token: Option<&'a SecretString>,
    pub token_type: &'a str,
    pub scope: Option<&'a str>,
    pub issued_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

/// A browser authorization in progress.
pub struct PendingAuthorization {
    pub state: String,
    pub provider: String,
    pub account: String,
    pub pkce_verifier: Option<SecretString>,
    pub redirect_uri: String,
    /// SHA-256 (hex) of the cookie that binds the flow to one browser.
    pub browser_hash: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

/// What [`Store::take_pending_for_browser`] found.
pub enum PendingTake {
    /// The flow's pending authorization, now removed (single use).
    Taken(PendingAuthorization),
    /// The state exists but belongs to another browser; it was kept.
    OtherBrowser,
    /// No such state: unknown, expired or already used.
    Unknown,
}

/// Which kind of token a fingerprint belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenKind {
    Refresh,
    Access,
}

impl TokenKind {
    fn as_str(self) -> &'static str {
        match self {
            TokenKind::Refresh => "refresh",
            TokenKind::Access => "access",
        }
    }
}

/// A keyed digest of a token (see `crypto::Fingerprinter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint {
    pub kind: TokenKind,
    pub digest: [u8; 32],
}

/// How many fingerprints per connection and kind are kept: enough to
/// recognise a refresh token someone copied weeks ago (one rotation a day at
/// Keap's 24 h tokens), bounded so the table cannot grow without limit.
pub const FINGERPRINTS_KEPT: i64 = 64;

/// Another holder's lease exactly as it was seen: a takeover only happens
/// if it is still exactly this (not renewed, not released, not replaced).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseSeen {
    pub owner: String,
    pub attempt: Option<String>,
    pub until_ms: Option<i64>,
}

/// What became of a commit.
pub enum CommitOutcome {
    /// The pair is stored; `kept_lease` says whether the lease was still
    /// ours (if not, it was written anyway: see `commit_refresh`).
    Committed {
        row: Box<ConnectionRow>,
        kept_lease: bool,
    },
    /// A newer grant (a re-authorization, an import) was stored after this
    /// refresh read the grant: nothing was written. The current row, or
    /// `None` if the connection was forgotten.
    Superseded(Option<Box<ConnectionRow>>),
}

/// Result of trying to start a refresh.
pub enum BeginRefresh {
    /// The lease is ours and "refresh started" is committed; the row is the
    /// freshly re-read grant (another process may have rotated it).
    Started(Box<ConnectionRow>),
    /// Another holder has it: who, its attempt and its stored deadline.
    /// Whether the holder still lives is the engine's call (`owner`,
    /// `clock::LeaseWatch`), never a comparison with this process's clock.
    Busy {
        owner: String,
        attempt: Option<String>,
        until: DateTime<Utc>,
    },
    /// The connection no longer exists.
    Gone,
    /// The stored row cannot be read (its stand-in, with the reason in
    /// `unreadable`): nothing was written, no lease was taken.
    Unreadable(Box<ConnectionRow>),
}

const COLUMNS: &str = "id, provider, account, state, access_token, refresh_token, token_type, scope, \
    expires_at, issued_at, refreshed_at, refresh_token_issued_at, generation, last_error, failures, \
    next_attempt_at, lease_owner, lease_until, attempt_id, attempt_started_at, interrupted_at";

/// Handle on the database; cheap to clone.
#[derive(Clone)]
pub struct Store {
    pool: SqlitePool,
    /// Tokens are sealed with this key when `storage.encryption_key_file`
    /// is set; `None` stores them as they are.
    seal: Option<Arc<SealKey>>,
    /// Ids of rows found unreadable, so each is logged once (not at every
    /// scheduler pass that re-reads it) and counted in the metric.
    unreadable: Arc<Mutex<HashSet<i64>>>,
    /// The last write probe (`/readyz`): when, and whether it succeeded.
    probe: Arc<tokio::sync::Mutex<Option<(std::time::Instant, bool)>>>,
    /// The scheduler's own connection, outside the pool (see
    /// [`Store::changed`]): opened at its first use with these options.
    watch: Arc<tokio::sync::Mutex<Watch>>,
}

/// A connection of its own and the `PRAGMA data_version` it last read.
/// SQLite changes that number when any *other* connection commits, never
/// for this connection's own writes, which is why the heartbeat is written
/// here: the scheduler's own bookkeeping never counts as a change.
struct Watch {
    options: SqliteConnectOptions,
    conn: Option<sqlx::SqliteConnection>,
    version: Option<i64>,
}

impl Watch {
    async fn connection(&mut self) -> Result<&mut sqlx::SqliteConnection, sqlx::Error> {
        use sqlx::ConnectOptions;
        let conn = match self.conn.take() {
            Some(c) => c,
            None => self.options.connect().await?,
        };
        Ok(self.conn.insert(conn))
    }
}

/// How long a statement waits for another writer's lock before failing
/// (SQLite `busy_timeout`). Part of the shutdown arithmetic in `daemon`.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// How long `/readyz` waits for its write probe. Below the pool's busy
/// timeout on purpose: a database that holds a write for this long is not
/// ready for a refresh commit either.
const WRITE_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// A write probe result is reused this long, so a readiness check in a
/// tight loop does not turn into a stream of fsyncs.
const WRITE_PROBE_REUSE: Duration = Duration::from_secs(1);

/// Which sealed column a value belongs to (part of its associated data).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Column {
    AccessToken,
    RefreshToken,
}

impl Column {
    fn as_str(self) -> &'static str {
        match self {
            Column::AccessToken => "access_token",
            Column::RefreshToken => "refresh_token",
        }
    }
}

pub fn to_ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

pub fn from_ms(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms)
        .single()
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

impl Store {
    /// Opens (creating with mode 0600, in a 0700 directory, if needed) and
    /// migrates the database at `path`, then checks `key` against it before
    /// anything else is written.
    pub async fn open(path: &Path, key: Option<SealKey>) -> Result<Store, StoreError> {
        prepare_file(path)?;
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true)
            // 512 KiB of page cache per pooled connection instead of 2 MiB:
            // the start reads every row once, and each connection would
            // keep the pages it read for the life of the daemon. Refreshes
            // touch a handful of pages by primary key.
            .pragma("cache_size", "-512");
        let watch = Watch {
            options: options.clone(),
            conn: None,
            version: None,
        };
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .map_err(|source| StoreError::Open {
                path: path.display().to_string(),
                source,
            })?;
        sqlx::migrate!("./migrations")
            .run(&pool)
            .await
            .map_err(|source| match source {
                sqlx::migrate::MigrateError::VersionMissing(version) => StoreError::NewerVersion {
                    path: path.display().to_string(),
                    version,
                },
                sqlx::migrate::MigrateError::Execute(e) => StoreError::Open {
                    path: path.display().to_string(),
                    source: e,
                },
                source => StoreError::Migrate {
                    path: path.display().to_string(),
                    source,
                },
            })?;
        let store = Store {
            pool,
            seal: key.map(Arc::new),
            unreadable: Arc::new(Mutex::new(HashSet::new())),
            probe: Arc::new(tokio::sync::Mutex::new(None)),
            watch: Arc::new(tokio::sync::Mutex::new(watch)),
        };
        store.check_key().await?;
        // Now, with the path at hand, rather than at the first refresh: a
        // read-only file or directory opens (SQLite falls back to reading)
        // and fails only at the first write.
        store
            .write_once()
            .await
            .map_err(|source| StoreError::Open {
                path: path.display().to_string(),
                source,
            })?;
        Ok(store)
    }

    /// Whether tokens are sealed at rest.
    pub fn encrypted(&self) -> bool {
        self.seal.is_some()
    }

    /// The key check: a value sealed under the key the database was written
    /// with. A wrong or missing key fails here, before any write; a key set
    /// for the first time seals the existing plaintext rows in one transaction.
    async fn check_key(&self) -> Result<(), StoreError> {
        let check: Option<Vec<u8>> =
            sqlx::query_scalar("SELECT value FROM installation WHERE name = 'key_check'")
                .fetch_optional(&self.pool)
                .await?;
        let check = check.map(|v| String::from_utf8_lossy(&v).into_owned());
        match (&self.seal, check) {
            (None, None) => Ok(()),
            (None, Some(_)) => Err(StoreError::KeyRequired),
            (Some(key), Some(c)) => {
                key.open(&c, KEY_CHECK_CONTEXT)
                    .map_err(|_| StoreError::WrongKey)?;
                self.upgrade_sealing(key).await
            }
            (Some(key), None) => {
                let n = self.reseal_all(None, key).await?;
                if n > 0 {
                    tracing::info!(
                        connections = n,
                        "sealed the stored tokens with the new encryption key"
                    );
                }
                Ok(())
            }
        }
    }

    /// Re-seals every stored token under `new` (from `old`, or from
    /// plaintext) and replaces the key check, all in one transaction.
    /// Pending browser authorizations are dropped: they expire in minutes.
    /// A value that does not open stays as it is (and is reported as
    /// unreadable), rather than holding every other grant hostage.
    async fn reseal_all(&self, old: Option<&SealKey>, new: &SealKey) -> Result<usize, StoreError> {
        let mut tx = self.pool.begin().await?;
        let n = reseal_rows(&mut tx, new, |ctx, column, v| match old {
            Some(k) => k.open(v, &ctx.column(column)).ok(),
            None if crypto::is_sealed(v) => None,
            None => Some(SecretString::from(v.to_owned())),
        })
        .await?;
        sqlx::query("DELETE FROM pending_authorizations")
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT OR REPLACE INTO installation (name, value) VALUES ('key_check', ?)")
            .bind(new.seal("tokenkeeper", KEY_CHECK_CONTEXT).into_bytes())
            .execute(&mut *tx)
            .await?;
        mark_sealing_current(&mut tx).await?;
        tx.commit().await?;
        Ok(n)
    }

    /// Databases sealed before values were bound to their column and
    /// generation are re-sealed once, at open, in one transaction. Done
    /// eagerly (rather than accepting the old binding on read) so that an
    /// old value can never be swapped or replayed once this version runs.
    async fn upgrade_sealing(&self, key: &SealKey) -> Result<(), StoreError> {
        let format: Option<Vec<u8>> =
            sqlx::query_scalar("SELECT value FROM installation WHERE name = 'seal_format'")
                .fetch_optional(&self.pool)
                .await?;
        if format.as_deref() == Some(SEAL_FORMAT.as_bytes()) {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        let n = reseal_rows(&mut tx, key, |ctx, _, v| key.open(v, &ctx.legacy()).ok()).await?;
        mark_sealing_current(&mut tx).await?;
        tx.commit().await?;
        if n > 0 {
            tracing::info!(
                connections = n,
                "re-sealed the stored tokens, now bound to their column and grant generation"
            );
        }
        Ok(())
    }

    /// `tokenkeeper rekey`: re-seals everything under `new`.
    pub async fn rekey(&self, new: &SealKey) -> Result<usize, StoreError> {
        self.reseal_all(self.seal.as_deref(), new).await
    }

    /// Seals the token pair of a row that will have `generation` once the
    /// write lands.
    fn seal_pair(
        &self,
        (provider, account): (&str, &str),
        generation: i64,
        g: &NewGrant<'_>,
    ) -> (String, Option<String>) {
        let ctx = SealContext {
            provider,
            account,
            generation,
        };
        (
            self.seal_value(g.access_token, &ctx.column(Column::AccessToken)),
            g.refresh_token
                .map(|t| self.seal_value(t, &ctx.column(Column::RefreshToken))),
        )
    }

    fn seal_value(&self, plain: &SecretString, ctx: &str) -> String {
        match &self.seal {
            Some(k) => k.seal(plain.expose_secret(), ctx),
            None => plain.expose_secret().to_string(),
        }
    }

    fn open_value(&self, stored: String, ctx: &str) -> Result<SecretString, StoreError> {
        match &self.seal {
            Some(k) => Ok(k.open(&stored, ctx)?),
            None if crypto::is_sealed(&stored) => Err(StoreError::KeyRequired),
            None => Ok(SecretString::from(stored)),
        }
    }

    /// The per-installation fingerprint key, created on first use.
    pub async fn fingerprint_key(&self) -> Result<[u8; 32], StoreError> {
        let fresh: [u8; 32] = rand::random();
        sqlx::query(
            "INSERT OR IGNORE INTO installation (name, value) VALUES ('fingerprint_key', ?)",
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

    /// Every stored fingerprint, oldest first per connection:
    /// `(connection_id, fingerprint)`, handed to `f` one row at a time so
    /// that 10,000 connections never sit in memory as raw rows.
    pub async fn each_fingerprint(
        &self,
        mut f: impl FnMut(i64, Fingerprint),
    ) -> Result<(), StoreError> {
        let mut rows =
            sqlx::query("SELECT connection_id, kind, digest FROM token_fingerprints ORDER BY id")
                .fetch(&self.pool);
        while let Some(r) = rows.try_next().await? {
            let kind = match r.try_get::<&str, _>("kind")? {
                "refresh" => TokenKind::Refresh,
                _ => TokenKind::Access,
            };
            let digest: &[u8] = r.try_get("digest")?;
            let digest = digest
                .try_into()
                .map_err(|_| StoreError::Corrupt("fingerprint of the wrong length".into()))?;
            f(r.try_get("connection_id")?, Fingerprint { kind, digest });
        }
        Ok(())
    }

    /// Cheap liveness probe for the watchdog.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// One small write that changes nothing a reader sees.
    async fn write_once(&self) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO installation (name, value) VALUES ('write_probe', x'01') \
             ON CONFLICT (name) DO UPDATE SET value = value",
        )
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Readiness: the database answers *and* takes a write (a full disk, a
    /// read-only file or a lock held elsewhere fail here, where a read
    /// would pass). One small upsert, bounded by `WRITE_PROBE_TIMEOUT`;
    /// a result younger than `WRITE_PROBE_REUSE` is reused.
    pub async fn write_probe(&self) -> Result<(), StoreError> {
        let mut last = self.probe.lock().await;
        if let Some((at, true)) = *last {
            if at.elapsed() < WRITE_PROBE_REUSE {
                return Ok(());
            }
        }
        let result = match tokio::time::timeout(WRITE_PROBE_TIMEOUT, self.write_once()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(StoreError::Sql(e)),
            Err(_) => Err(StoreError::NotWritable(format!(
                "a write did not complete within {} s (another process holds the database locked, or the disk stalls)",
                WRITE_PROBE_TIMEOUT.as_secs()
            ))),
        };
        *last = Some((std::time::Instant::now(), result.is_ok()));
        metrics::gauge!(crate::metrics::DATABASE_WRITABLE).set(f64::from(u8::from(result.is_ok())));
        result
    }

    /// Closes every pooled connection (checkpointing the WAL).
    pub async fn close(&self) {
        if let Some(conn) = self.watch.lock().await.conn.take() {
            use sqlx::Connection;
            let _ = conn.close().await;
        }
        self.pool.close().await;
    }

    // ----- pending authorizations -----

    pub async fn insert_pending(&self, p: &PendingAuthorization) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO pending_authorizations (state, provider, account, pkce_verifier, redirect_uri, browser_hash, created_at, expires_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(p.state.clone())
        .bind(p.provider.clone())
        .bind(p.account.clone())
        .bind(
            p.pkce_verifier
                .as_ref()
                .map(|v| self.seal_value(v, &pending_context(&p.state))),
        )
        .bind(p.redirect_uri.clone())
        .bind(p.browser_hash.clone())
        .bind(to_ms(p.created_at))
        .bind(to_ms(p.expires_at))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Removes and returns the pending authorization for `state`: a state
    /// can be used once, whatever happens next. Expired ones are purged.
    pub async fn take_pending(
        &self,
        state: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<PendingAuthorization>, StoreError> {
        sqlx::query("DELETE FROM pending_authorizations WHERE expires_at < ?")
            .bind(to_ms(now))
            .execute(&self.pool)
            .await?;
        let row = sqlx::query(
            "DELETE FROM pending_authorizations WHERE state = ? \
             RETURNING state, provider, account, pkce_verifier, redirect_uri, browser_hash, created_at, expires_at",
        )
        .bind(state.to_owned())
        .fetch_optional(&self.pool)
        .await?;
        let Some(r) = row else {
            return Ok(None);
        };
        self.pending_from_row(&r, state).map(Some)
    }

    /// Like [`Store::take_pending`], but only for the browser that started
    /// the flow (`browser_hash`): a callback from another browser, or
    /// without the cookie, leaves the pending authorization in place for
    /// the right one.
    pub async fn take_pending_for_browser(
        &self,
        state: &str,
        browser_hash: &str,
        now: DateTime<Utc>,
    ) -> Result<PendingTake, StoreError> {
        sqlx::query("DELETE FROM pending_authorizations WHERE expires_at < ?")
            .bind(to_ms(now))
            .execute(&self.pool)
            .await?;
        let row = sqlx::query(
            "DELETE FROM pending_authorizations WHERE state = ? AND browser_hash = ? \
             RETURNING state, provider, account, pkce_verifier, redirect_uri, browser_hash, created_at, expires_at",
        )
        .bind(state.to_owned())
        .bind(browser_hash.to_owned())
        .fetch_optional(&self.pool)
        .await?;
        if let Some(r) = row {
            return self.pending_from_row(&r, state).map(PendingTake::Taken);
        }
        let exists = sqlx::query("SELECT 1 FROM pending_authorizations WHERE state = ?")
            .bind(state.to_owned())
            .fetch_optional(&self.pool)
            .await?;
        Ok(if exists.is_some() {
            PendingTake::OtherBrowser
        } else {
            PendingTake::Unknown
        })
    }

    fn pending_from_row(
        &self,
        r: &sqlx::sqlite::SqliteRow,
        state: &str,
    ) -> Result<PendingAuthorization, StoreError> {
        let verifier = r
            .try_get::<Option<String>, _>("pkce_verifier")?
            .map(|v| self.open_value(v, &pending_context(state)))
            .transpose()?;
        Ok(PendingAuthorization {
            state: r.try_get("state")?,
            provider: r.try_get("provider")?,
            account: r.try_get("account")?,
            pkce_verifier: verifier,
            redirect_uri: r.try_get("redirect_uri")?,
            browser_hash: r.try_get("browser_hash")?,
            created_at: from_ms(r.try_get("created_at")?),
            expires_at: from_ms(r.try_get("expires_at")?),
        })
    }

    // ----- connections -----

    pub async fn load_connections(&self) -> Result<Vec<ConnectionRow>, StoreError> {
        let mut all = Vec::new();
        self.each_connection(|c| all.push(c)).await?;
        Ok(all)
    }

    /// Every connection, decoded and handed to `f` one row at a time: the
    /// daemon's start reads them all, and raw rows of 10,000 connections
    /// held at once were most of its peak memory (`bench/run.sh`).
    pub async fn each_connection(
        &self,
        mut f: impl FnMut(ConnectionRow),
    ) -> Result<(), StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM connections ORDER BY provider, account");
        let mut rows = sqlx::query(&sql).fetch(&self.pool);
        while let Some(r) = rows.try_next().await? {
            if let Some(row) = self.decode_or_skip(&r) {
                f(row);
            }
        }
        Ok(())
    }

    /// One connection; `None` also when even its name cannot be read (such
    /// a row is logged once and skipped, see [`Store::each_connection`]).
    pub async fn load_connection(&self, id: i64) -> Result<Option<ConnectionRow>, StoreError> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM connections WHERE id = ?"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().and_then(|r| self.decode_or_skip(r)))
    }

    /// `(id, generation, state)` of every connection: what the engine compares
    /// to notice writes by other processes without reading tokens.
    pub async fn versions(&self) -> Result<Vec<(i64, i64, String)>, StoreError> {
        let rows = sqlx::query("SELECT id, generation, state FROM connections")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect())
    }

    /// Stores a grant obtained by a browser authorization, replacing any
    /// earlier grant of the same provider/account (a re-authorization wins
    /// over whatever refresh was in flight: its commit finds the generation
    /// moved). Returns the stored row and the refresh token of the grant it
    /// replaced, if any, so the caller can revoke it upstream.
    pub async fn save_authorized(
        &self,
        provider: &str,
        account: &str,
        g: &NewGrant<'_>,
        fps: &[Fingerprint],
    ) -> Result<(ConnectionRow, Option<SecretString>), StoreError> {
        let mut tx = self.pool.begin().await?;
        // The first statement writes (BEGIN IMMEDIATE semantics), so the
        // replaced token read below is the one this write replaces.
        let generation = next_generation_by_name(&mut tx, provider, account).await?;
        let replaced: Option<Option<String>> = sqlx::query_scalar(
            "SELECT refresh_token FROM connections WHERE provider = ? AND account = ?",
        )
        .bind(provider.to_owned())
        .bind(account.to_owned())
        .fetch_optional(&mut *tx)
        .await?;
        // A replaced token that no longer opens is not worth failing the
        // new authorization for: it is simply not revoked.
        let old = SealContext {
            provider,
            account,
            generation: generation - 1,
        };
        let replaced = replaced
            .flatten()
            .and_then(|v| self.open_value(v, &old.column(Column::RefreshToken)).ok());
        let sealed = self.seal_pair((provider, account), generation, g);
        let row = sqlx::query(&format!(
            "INSERT INTO connections (provider, account, state, access_token, refresh_token, token_type, scope, \
                 expires_at, issued_at, refreshed_at, refresh_token_issued_at, generation, created_at) \
             VALUES (?1, ?2, 'active', ?3, ?4, ?5, ?6, ?7, ?8, NULL, ?8, 1, ?8) \
             ON CONFLICT (provider, account) DO UPDATE SET \
                 state = 'active', access_token = ?3, refresh_token = ?4, token_type = ?5, scope = ?6, \
                 expires_at = ?7, issued_at = ?8, refreshed_at = NULL, refresh_token_issued_at = ?8, \
                 generation = generation + 1, last_error = NULL, failures = 0, next_attempt_at = NULL, \
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
        let decoded = self.decode(&row)?;
        record_fingerprints(&mut tx, decoded.id, fps, g.issued_at).await?;
        tx.commit().await?;
        Ok((decoded, replaced))
    }

    /// Takes the refresh lease and records "refresh started" in one
    /// statement (an implicit write transaction), then returns the re-read
    /// grant. The lease is free when nobody (or this owner) holds it;
    /// another holder's lease is taken only when `takeover` names exactly
    /// what the engine saw of it (owner, attempt, deadline) and judged dead
    /// or lapsed: if it was renewed since, the takeover does not happen.
    /// No wall-clock comparison is made here: a clock set forward must not
    /// make a live lease look lapsed.
    pub async fn begin_refresh(
        &self,
        id: i64,
        owner: &str,
        attempt_id: &str,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        takeover: Option<&LeaseSeen>,
    ) -> Result<BeginRefresh, StoreError> {
        // An unfinished attempt of another holder means it died mid-refresh:
        // remember when, so a later rejection can say precisely why. One
        // transaction: a row that turns out unreadable is rolled back
        // untouched (its state is left as stored, so an unknown one still
        // reads as unknown after the update).
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(&format!(
            "UPDATE connections SET \
                 interrupted_at = CASE WHEN attempt_id IS NOT NULL AND lease_owner IS NOT ?1 \
                                       THEN attempt_started_at ELSE interrupted_at END, \
                 lease_owner = ?1, lease_until = ?2, attempt_id = ?3, attempt_started_at = ?4, \
                 state = CASE WHEN state IN ('active', 'retrying', 'refreshing') THEN 'refreshing' ELSE state END \
             WHERE id = ?5 AND (lease_owner IS NULL OR lease_owner = ?1 \
                 OR (lease_owner = ?6 AND attempt_id IS ?7 AND lease_until IS ?8)) \
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
            let decoded = self.decode(&row)?;
            if decoded.unreadable.is_some() {
                tx.rollback().await?;
                return Ok(BeginRefresh::Unreadable(Box::new(decoded)));
            }
            tx.commit().await?;
            return Ok(BeginRefresh::Started(Box::new(decoded)));
        }
        tx.commit().await?;
        let holder = sqlx::query(
            "SELECT lease_owner, lease_until, attempt_id FROM connections WHERE id = ?",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match holder {
            None => BeginRefresh::Gone,
            Some(r) => BeginRefresh::Busy {
                owner: r.get::<Option<String>, _>(0).unwrap_or_default(),
                until: from_ms(r.get::<Option<i64>, _>(1).unwrap_or(0)),
                attempt: r.get::<Option<String>, _>(2),
            },
        })
    }

    /// Extends a held lease; `false` if it is no longer ours.
    pub async fn renew_lease(
        &self,
        id: i64,
        owner: &str,
        attempt_id: &str,
        until: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query("UPDATE connections SET lease_until = ? WHERE id = ? AND lease_owner = ? AND attempt_id = ?")
            .bind(to_ms(until))
            .bind(id)
            .bind(owner.to_owned())
            .bind(attempt_id.to_owned())
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Commits a rotation, compare-and-swap on `base_generation`, the
    /// generation the refresh read under its lease. If the lease was lost
    /// meanwhile (we stalled past it) but the generation is unchanged, the
    /// pair is written anyway: the provider has already rotated, so ours is
    /// the only refresh token that still works, and the other holder's
    /// rejection path re-reads storage and finds it. If the generation
    /// moved, a newer grant was stored after our read and wins: nothing is
    /// written, our lease (if still ours) is released, and the caller deals
    /// with the result it holds.
    #[allow(clippy::too_many_arguments)]
    pub async fn commit_refresh(
        &self,
        id: i64,
        (provider, account): (&str, &str),
        owner: &str,
        attempt_id: &str,
        base_generation: i64,
        g: &NewGrant<'_>,
        fps: &[Fingerprint],
    ) -> Result<CommitOutcome, StoreError> {
        // One transaction: the pair and the fingerprints of the new tokens
        // become durable together.
        let mut tx = self.pool.begin().await?;
        let generation = next_generation_by_id(&mut tx, id).await?;
        let sealed = || self.seal_pair((provider, account), generation, g);
        let cas = format!(
            "UPDATE connections SET {GRANT_SET}, state = 'active', lease_owner = NULL, lease_until = NULL, \
             attempt_id = NULL, attempt_started_at = NULL \
             WHERE id = ?7 AND lease_owner = ?8 AND attempt_id = ?9 AND generation = ?10 RETURNING {COLUMNS}"
        );
        let row = bind_grant(sqlx::query(&cas), g, sealed())
            .bind(id)
            .bind(owner.to_owned())
            .bind(attempt_id.to_owned())
            .bind(base_generation)
            .fetch_optional(&mut *tx)
            .await?;
        if row.is_some() {
            let decoded = self
                .reseal_kept_refresh_token(&mut tx, id, (provider, account), generation, g)
                .await?;
            record_fingerprints(&mut tx, id, fps, g.issued_at).await?;
            tx.commit().await?;
            return Ok(CommitOutcome::Committed {
                row: Box::new(decoded),
                kept_lease: true,
            });
        }
        let forced = format!(
            "UPDATE connections SET {GRANT_SET}, state = CASE WHEN lease_owner IS NULL THEN 'active' ELSE state END \
             WHERE id = ?7 AND generation = ?8 RETURNING {COLUMNS}"
        );
        let row = bind_grant(sqlx::query(&forced), g, sealed())
            .bind(id)
            .bind(base_generation)
            .fetch_optional(&mut *tx)
            .await?;
        if row.is_some() {
            let decoded = self
                .reseal_kept_refresh_token(&mut tx, id, (provider, account), generation, g)
                .await?;
            record_fingerprints(&mut tx, id, fps, g.issued_at).await?;
            tx.commit().await?;
            return Ok(CommitOutcome::Committed {
                row: Box::new(decoded),
                kept_lease: false,
            });
        }
        release_lease(&mut tx, id, owner, attempt_id).await?;
        let current = sqlx::query(&format!("SELECT {COLUMNS} FROM connections WHERE id = ?"))
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
        tx.commit().await?;
        let current = current.as_ref().map(|r| self.decode(r)).transpose()?;
        Ok(CommitOutcome::Superseded(current.map(Box::new)))
    }

    /// After a commit: an answer without a new refresh token keeps the
    /// stored one (SPEC 7), but sealed it is bound to the generation it was
    /// written under, so it is re-sealed for the new generation in the same
    /// transaction. Returns the committed row.
    async fn reseal_kept_refresh_token(
        &self,
        tx: &mut sqlx::SqliteConnection,
        id: i64,
        (provider, account): (&str, &str),
        generation: i64,
        g: &NewGrant<'_>,
    ) -> Result<ConnectionRow, StoreError> {
        if g.refresh_token.is_none() && self.seal.is_some() {
            let kept: Option<String> =
                sqlx::query_scalar("SELECT refresh_token FROM connections WHERE id = ?")
                    .bind(id)
                    .fetch_one(&mut *tx)
                    .await?;
            if let Some(v) = kept {
                let ctx = |generation| SealContext {
                    provider,
                    account,
                    generation,
                };
                let plain =
                    self.open_value(v, &ctx(generation - 1).column(Column::RefreshToken))?;
                let resealed =
                    self.seal_value(&plain, &ctx(generation).column(Column::RefreshToken));
                sqlx::query("UPDATE connections SET refresh_token = ? WHERE id = ?")
                    .bind(resealed)
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM connections WHERE id = ?"))
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
        self.decode(&row)
    }

    /// Ends an attempt without a new grant: transient failure (`retrying`),
    /// rejection (`authorization_required`) or nothing to do (`active`).
    /// Releases the lease. Only the current holder's write lands.
    #[allow(clippy::too_many_arguments)]
    pub async fn finish_attempt(
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
            "UPDATE connections SET state = ?1, last_error = ?2, failures = ?3, next_attempt_at = ?4, \
                 lease_owner = NULL, lease_until = NULL, attempt_id = NULL, attempt_started_at = NULL \
             WHERE id = ?5 AND lease_owner = ?6 AND attempt_id = ?7 RETURNING {COLUMNS}"
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
        row.as_ref().map(|r| self.decode(r)).transpose()
    }

    /// Ends an attempt whose refresh token the provider rejected, as
    /// `authorization_required`, but only if the grant is still
    /// `generation`: if a newer grant was stored meanwhile (a previous
    /// holder landed the grant it held, or a new authorization), that one
    /// is not parked; the lease is released and `None` returned.
    pub async fn reject_attempt(
        &self,
        id: i64,
        (owner, attempt_id): (&str, &str),
        generation: i64,
        reason: &str,
        failures: u32,
    ) -> Result<Option<ConnectionRow>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(&format!(
            "UPDATE connections SET state = 'authorization_required', last_error = ?1, failures = ?2, \
                 next_attempt_at = NULL, lease_owner = NULL, lease_until = NULL, attempt_id = NULL, \
                 attempt_started_at = NULL \
             WHERE id = ?3 AND lease_owner = ?4 AND attempt_id = ?5 AND generation = ?6 RETURNING {COLUMNS}"
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
        }
        tx.commit().await?;
        row.as_ref().map(|r| self.decode(r)).transpose()
    }

    /// Marks refreshes whose holder died as interrupted, so status reports
    /// them and the engine retries them at once.
    pub async fn mark_interrupted(
        &self,
        id: i64,
        dead_owner: Option<&str>,
        message: &str,
    ) -> Result<Option<ConnectionRow>, StoreError> {
        let row = sqlx::query(&format!(
            "UPDATE connections SET interrupted_at = attempt_started_at, last_error = ?1, \
                 state = CASE WHEN state = 'authorization_required' THEN state ELSE 'retrying' END, \
                 lease_owner = NULL, lease_until = NULL, attempt_id = NULL, attempt_started_at = NULL, \
                 next_attempt_at = NULL \
             WHERE id = ?2 AND attempt_id IS NOT NULL AND lease_owner IS ?3 RETURNING {COLUMNS}"
        ))
        .bind(message.to_owned())
        .bind(id)
        .bind(dead_owner.map(str::to_owned))
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(|r| self.decode(r)).transpose()
    }

    /// Records that `owner` is alive and returns how many other processes
    /// were seen since `alive_since` (older entries are dropped). One
    /// transaction (one commit) on the scheduler's own connection, so it
    /// does not make [`Store::changed`] answer `true`.
    pub async fn heartbeat(
        &self,
        owner: &str,
        now: DateTime<Utc>,
        alive_since: DateTime<Utc>,
    ) -> Result<usize, StoreError> {
        use sqlx::Connection;
        let mut watch = self.watch.lock().await;
        let mut tx = watch.connection().await?.begin().await?;
        sqlx::query("INSERT INTO processes (owner, seen_at) VALUES (?1, ?2) ON CONFLICT (owner) DO UPDATE SET seen_at = ?2")
            .bind(owner.to_owned())
            .bind(to_ms(now))
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM processes WHERE seen_at < ?")
            .bind(to_ms(alive_since))
            .execute(&mut *tx)
            .await?;
        let others: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM processes WHERE owner != ?")
            .bind(owner.to_owned())
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(others.max(0) as usize)
    }

    /// Whether another connection committed anything since the previous
    /// call (`true` at the first): another process sharing the file, or
    /// this process's own pool. Costs one `PRAGMA data_version` (no table
    /// is read), so an idle scheduler can look often and read every row
    /// only when something was written. May answer `true` for a write that
    /// changed nothing the caller cares about; never `false` after a commit.
    pub async fn changed(&self) -> Result<bool, StoreError> {
        let mut watch = self.watch.lock().await;
        let version: i64 = sqlx::query_scalar("PRAGMA data_version")
            .fetch_one(watch.connection().await?)
            .await?;
        Ok(watch.version.replace(version) != Some(version))
    }

    /// Removes `owner`'s heartbeat at a clean stop.
    pub async fn leave(&self, owner: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM processes WHERE owner = ?")
            .bind(owner.to_owned())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Forgets a connection; returns it (for upstream revocation) if it existed.
    pub async fn delete_connection(
        &self,
        provider: &str,
        account: &str,
    ) -> Result<Option<ConnectionRow>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(&format!(
            "DELETE FROM connections WHERE provider = ? AND account = ? RETURNING {COLUMNS}"
        ))
        .bind(provider.to_owned())
        .bind(account.to_owned())
        .fetch_optional(&mut *tx)
        .await?;
        let decoded = row.as_ref().map(|r| self.decode(r)).transpose()?;
        if let Some(d) = &decoded {
            self.set_unreadable(d.id, None, provider, account);
            sqlx::query("DELETE FROM token_fingerprints WHERE connection_id = ?")
                .bind(d.id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(decoded)
    }

    /// Forgets connection `id` only if its grant is still `generation` (the
    /// one just revoked); `false` if a newer grant was stored meanwhile or
    /// the row is already gone.
    pub async fn delete_connection_at(&self, id: i64, generation: i64) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query("DELETE FROM connections WHERE id = ? AND generation = ?")
            .bind(id)
            .bind(generation)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 1 {
            sqlx::query("DELETE FROM token_fingerprints WHERE connection_id = ?")
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(done.rows_affected() == 1)
    }

    /// The fingerprints stored for one connection, oldest first: what the
    /// recognizer mirrors after another process wrote the connection.
    pub async fn fingerprints_of(
        &self,
        connection_id: i64,
    ) -> Result<Vec<Fingerprint>, StoreError> {
        let rows = sqlx::query(
            "SELECT kind, digest FROM token_fingerprints WHERE connection_id = ? ORDER BY id",
        )
        .bind(connection_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let kind = match r.try_get::<&str, _>("kind")? {
                    "refresh" => TokenKind::Refresh,
                    _ => TokenKind::Access,
                };
                let digest: &[u8] = r.try_get("digest")?;
                let digest = digest
                    .try_into()
                    .map_err(|_| StoreError::Corrupt("fingerprint of the wrong length".into()))?;
                Ok(Fingerprint { kind, digest })
            })
            .collect()
    }
}

/// Columns written by a rotation, bound by [`bind_grant`] as ?1..?6.
const GRANT_SET: &str = "access_token = ?1, refresh_token = COALESCE(?2, refresh_token), token_type = ?3, \
     scope = COALESCE(?4, scope), expires_at = ?5, issued_at = ?6, refreshed_at = ?6, \
     refresh_token_issued_at = CASE WHEN ?2 IS NULL THEN refresh_token_issued_at ELSE ?6 END, \
     generation = generation + 1, failures = 0, next_attempt_at = NULL, last_error = NULL, interrupted_at = NULL";

type SqliteQuery<'q> = sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>>;

fn bind_grant<'q>(
    q: SqliteQuery<'q>,
    g: &NewGrant<'_>,
    sealed: (String, Option<String>),
) -> SqliteQuery<'q> {
    q.bind(sealed.0)
        .bind(sealed.1)
        .bind(g.token_type.to_string())
        .bind(g.scope.map(str::to_string))
        .bind(to_ms(g.expires_at))
        .bind(to_ms(g.issued_at))
}

impl Store {
    /// A row as the lifecycle sees it: tokens opened. Only a row whose
    /// identity (id, provider, account) cannot be read is an error; any
    /// other problem yields the row as unreadable (see the module doc).
    fn decode(&self, r: &SqliteRow) -> Result<ConnectionRow, StoreError> {
        let id: i64 = r.try_get("id")?;
        let provider: String = r.try_get("provider")?;
        let account: String = r.try_get("account")?;
        match self.decode_fields(r, id, &provider, &account) {
            Ok(row) => {
                self.set_unreadable(id, None, &provider, &account);
                Ok(row)
            }
            Err(problem) => {
                let message = format!(
                    "the stored grant cannot be read ({problem}); it is not used: authorize {provider}/{account} again (tokenkeeper connect {provider} {account}) or restore a backup"
                );
                self.set_unreadable(id, Some(&message), &provider, &account);
                Ok(unreadable_row(r, id, provider, account, message))
            }
        }
    }

    /// [`Store::decode`] for the readers that must go on past one row: a
    /// row whose very identity cannot be read is logged once (error level,
    /// counted as unreadable) and skipped rather than failing them all.
    fn decode_or_skip(&self, r: &SqliteRow) -> Option<ConnectionRow> {
        match self.decode(r) {
            Ok(row) => Some(row),
            Err(e) => {
                let id: i64 = r.try_get("id").unwrap_or(-1);
                let message = format!(
                    "the stored connection row {id} cannot be read at all ({e}); it is skipped: delete it (DELETE FROM connections WHERE id = {id}) or restore a backup"
                );
                self.set_unreadable(id, Some(&message), "?", "?");
                None
            }
        }
    }

    fn decode_fields(
        &self,
        r: &SqliteRow,
        id: i64,
        provider: &str,
        account: &str,
    ) -> Result<ConnectionRow, String> {
        let generation: i64 = field(r, "generation")?;
        let ctx = SealContext {
            provider,
            account,
            generation,
        };
        let open = |column: Column, v: String| {
            self.open_value(v, &ctx.column(column)).map_err(|e| match e {
                StoreError::KeyRequired => format!(
                    "its {} is encrypted but storage.encryption_key_file is not set",
                    column.as_str()
                ),
                _ => format!(
                    "its {} does not decrypt: it was altered, moved from another row or column, or replayed from an older grant",
                    column.as_str()
                ),
            })
        };
        let state: String = field(r, "state")?;
        let state = ConnState::parse(&state).map_err(|_| format!("unknown state {state:?}"))?;
        Ok(ConnectionRow {
            id,
            state,
            access_token: open(Column::AccessToken, field(r, "access_token")?)?,
            refresh_token: field::<Option<String>>(r, "refresh_token")?
                .map(|v| open(Column::RefreshToken, v))
                .transpose()?,
            provider: provider.to_owned(),
            account: account.to_owned(),
            token_type: field(r, "token_type")?,
            scope: field(r, "scope")?,
            expires_at: instant(r, "expires_at")?,
            issued_at: instant(r, "issued_at")?,
            refreshed_at: opt_instant(r, "refreshed_at")?,
            refresh_token_issued_at: instant(r, "refresh_token_issued_at")?,
            generation,
            last_error: field(r, "last_error")?,
            failures: field::<i64>(r, "failures")?.clamp(0, u32::MAX as i64) as u32,
            next_attempt_at: opt_instant(r, "next_attempt_at")?,
            lease_owner: field(r, "lease_owner")?,
            lease_until: opt_instant(r, "lease_until")?,
            attempt_id: field(r, "attempt_id")?,
            attempt_started_at: opt_instant(r, "attempt_started_at")?,
            interrupted_at: opt_instant(r, "interrupted_at")?,
            unreadable: None,
        })
    }

    /// Records whether row `id` is unreadable; logs (error level) the first
    /// time it is seen so, and keeps the gauge in step.
    fn set_unreadable(&self, id: i64, message: Option<&str>, provider: &str, account: &str) {
        let mut set = self.unreadable.lock().unwrap_or_else(|e| e.into_inner());
        if message.is_none() && set.is_empty() {
            return;
        }
        let changed = match message {
            Some(m) => {
                let new = set.insert(id);
                if new {
                    tracing::error!(provider, account, "{m}");
                }
                new
            }
            None => set.remove(&id),
        };
        if changed {
            metrics::gauge!(crate::metrics::UNREADABLE_CONNECTIONS).set(set.len() as f64);
        }
    }
}

/// The stand-in for a row that cannot be read: no token, expired, and
/// `authorization_required` with `message` as its last error, so it is
/// reported and refused like a rejected grant and a new authorization
/// (which rewrites the whole row) repairs it. Keeps the stored generation,
/// so comparing versions does not re-read it as changed.
fn unreadable_row(
    r: &SqliteRow,
    id: i64,
    provider: String,
    account: String,
    message: String,
) -> ConnectionRow {
    let epoch = DateTime::<Utc>::UNIX_EPOCH;
    ConnectionRow {
        id,
        provider,
        account,
        state: ConnState::AuthorizationRequired,
        access_token: SecretString::from(String::new()),
        refresh_token: None,
        token_type: "Bearer".into(),
        scope: None,
        expires_at: epoch,
        issued_at: epoch,
        refreshed_at: None,
        refresh_token_issued_at: epoch,
        generation: r.try_get("generation").unwrap_or(0),
        last_error: Some(message.clone()),
        failures: 0,
        next_attempt_at: None,
        lease_owner: None,
        lease_until: None,
        attempt_id: None,
        attempt_started_at: None,
        interrupted_at: None,
        unreadable: Some(message),
    }
}

/// One column, or a sentence naming it.
fn field<'r, T>(r: &'r SqliteRow, column: &str) -> Result<T, String>
where
    T: sqlx::Decode<'r, sqlx::Sqlite> + sqlx::Type<sqlx::Sqlite>,
{
    r.try_get(column)
        .map_err(|e| format!("column {column} cannot be read ({e})"))
}

fn instant(r: &SqliteRow, column: &str) -> Result<DateTime<Utc>, String> {
    let ms: i64 = field(r, column)?;
    checked_ms(ms).ok_or_else(|| format!("{column} holds an impossible instant ({ms} ms)"))
}

fn opt_instant(r: &SqliteRow, column: &str) -> Result<Option<DateTime<Utc>>, String> {
    match field::<Option<i64>>(r, column)? {
        None => Ok(None),
        Some(ms) => checked_ms(ms)
            .map(Some)
            .ok_or_else(|| format!("{column} holds an impossible instant ({ms} ms)")),
    }
}

/// An instant chrono can represent; anything else is damage. Far-future
/// but representable values stay readable: such a row still holds a
/// working grant, and losing it would cost a new authorization.
fn checked_ms(ms: i64) -> Option<DateTime<Utc>> {
    Utc.timestamp_millis_opt(ms).single()
}

/// What a sealed token's associated data names: its connection, and the
/// grant generation the row has once the write lands (with the column,
/// see [`SealContext::column`]).
struct SealContext<'a> {
    provider: &'a str,
    account: &'a str,
    generation: i64,
}

impl SealContext<'_> {
    fn column(&self, column: Column) -> String {
        format!(
            "connection:{}/{}:{}:generation:{}",
            self.provider,
            self.account,
            column.as_str(),
            self.generation
        )
    }

    /// The binding before `SEAL_FORMAT` 2: the connection only.
    fn legacy(&self) -> String {
        format!("connection:{}/{}", self.provider, self.account)
    }
}

/// Value of `installation.seal_format` once every token is sealed with
/// [`SealContext::column`].
const SEAL_FORMAT: &str = "2";

async fn mark_sealing_current(tx: &mut sqlx::SqliteConnection) -> Result<(), StoreError> {
    sqlx::query("INSERT OR REPLACE INTO installation (name, value) VALUES ('seal_format', ?)")
        .bind(SEAL_FORMAT.as_bytes().to_vec())
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// Re-seals every row's tokens under `new`, bound to their column and
/// current generation, opening each with `open`. A row whose tokens do not
/// open is left as it is (and later reported as unreadable); returns how
/// many rows were re-sealed.
async fn reseal_rows(
    tx: &mut sqlx::SqliteConnection,
    new: &SealKey,
    open: impl Fn(&SealContext<'_>, Column, &str) -> Option<SecretString>,
) -> Result<usize, StoreError> {
    let rows = sqlx::query(
        "SELECT id, provider, account, generation, access_token, refresh_token FROM connections",
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
        let opened = (
            open(&ctx, Column::AccessToken, &access),
            match &refresh {
                None => Some(None),
                Some(v) => open(&ctx, Column::RefreshToken, v).map(Some),
            },
        );
        let (Some(access), Some(refresh)) = opened else {
            tracing::warn!(
                provider = %provider,
                account = %account,
                "cannot re-seal this connection: its stored tokens do not open; left as they are"
            );
            continue;
        };
        sqlx::query("UPDATE connections SET access_token = ?, refresh_token = ? WHERE id = ?")
            .bind(new.seal(access.expose_secret(), &ctx.column(Column::AccessToken)))
            .bind(refresh.map(|t| new.seal(t.expose_secret(), &ctx.column(Column::RefreshToken))))
            .bind(r.try_get::<i64, _>("id")?)
            .execute(&mut *tx)
            .await?;
        n += 1;
    }
    Ok(n)
}

/// Takes the transaction's write lock at once (a no-op update) and returns
/// the generation row `id` will have after this transaction writes its
/// token pair. With the lock held from here, no other writer can move the
/// generation between this read and the write it seals for.
/// Lets go of a lease this attempt still holds, without touching the
/// grant (a result that lost to a newer grant, a rejection that did).
async fn release_lease(
    tx: &mut sqlx::SqliteConnection,
    id: i64,
    owner: &str,
    attempt_id: &str,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE connections SET lease_owner = NULL, lease_until = NULL, attempt_id = NULL, \
             attempt_started_at = NULL, \
             state = CASE WHEN state = 'refreshing' THEN 'active' ELSE state END \
         WHERE id = ? AND lease_owner = ? AND attempt_id = ?",
    )
    .bind(id)
    .bind(owner.to_owned())
    .bind(attempt_id.to_owned())
    .execute(&mut *tx)
    .await?;
    Ok(())
}

async fn next_generation_by_id(
    tx: &mut sqlx::SqliteConnection,
    id: i64,
) -> Result<i64, StoreError> {
    let g: Option<i64> = sqlx::query_scalar(
        "UPDATE connections SET generation = generation WHERE id = ? RETURNING generation",
    )
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?;
    Ok(g.map_or(1, |g| g + 1))
}

/// As [`next_generation_by_id`], by name; 1 for a row yet to be inserted.
async fn next_generation_by_name(
    tx: &mut sqlx::SqliteConnection,
    provider: &str,
    account: &str,
) -> Result<i64, StoreError> {
    let g: Option<i64> = sqlx::query_scalar(
        "UPDATE connections SET generation = generation WHERE provider = ? AND account = ? RETURNING generation",
    )
    .bind(provider.to_owned())
    .bind(account.to_owned())
    .fetch_optional(&mut *tx)
    .await?;
    Ok(g.map_or(1, |g| g + 1))
}

/// A sentence for an SQLite failure: the common operator-fixable ones
/// (full disk, read-only file, locked database) name cause and fix.
fn describe_sql(e: &sqlx::Error) -> String {
    let code = match e {
        sqlx::Error::Database(d) => d.code().map(|c| c.into_owned()),
        _ => None,
    };
    match sqlite_problem(code.as_deref()) {
        Some(sentence) => format!("{sentence} ({e})"),
        None => format!("database error: {e}"),
    }
}

/// Why a database could not be opened, with the fix; the generic fix
/// when SQLite's code says nothing more specific.
fn describe_open(e: &sqlx::Error) -> String {
    let code = match e {
        sqlx::Error::Database(d) => d.code().map(|c| c.into_owned()),
        _ => None,
    };
    match sqlite_problem(code.as_deref()) {
        Some(sentence) => format!("{sentence} ({e})"),
        None => format!(
            "{e}; check that the service user can read and write the file and its directory (SQLite creates -wal and -shm files next to it)"
        ),
    }
}

/// Cause and fix for an SQLite (extended) result code, by its primary code.
fn sqlite_problem(code: Option<&str>) -> Option<&'static str> {
    let primary = code?.parse::<i64>().ok()? & 0xff;
    Some(match primary {
        13 => "the disk holding the database is full; free space on it (tokenkeeper keeps new grants in memory and retries)",
        8 => "the database or its directory is read-only; give the service user write access to both (SQLite also creates -wal and -shm files next to the database) and check the mount",
        14 => "the database file cannot be opened; check that the service user can read and write the file and its directory",
        5 | 6 => "the database is locked by another process; find what holds it (e.g. an sqlite3 shell in a transaction) and end it",
        10 => "the disk reported an I/O error while using the database; check the disk and the kernel log",
        11 | 26 => "the database file is damaged or not a tokenkeeper database; restore a backup",
        _ => return None,
    })
}

fn describe_migrate(e: &sqlx::migrate::MigrateError) -> String {
    match e {
        sqlx::migrate::MigrateError::Execute(e) => describe_sql(e),
        other => format!("{other}; restore a backup made by this version"),
    }
}

fn pending_context(state: &str) -> String {
    format!("pending:{state}")
}

const KEY_CHECK_CONTEXT: &str = "key-check";

/// Records fingerprints and drops the oldest beyond [`FINGERPRINTS_KEPT`].
async fn record_fingerprints(
    tx: &mut sqlx::SqliteConnection,
    connection_id: i64,
    fps: &[Fingerprint],
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    for fp in fps {
        sqlx::query("INSERT INTO token_fingerprints (connection_id, kind, digest, created_at) VALUES (?, ?, ?, ?)")
            .bind(connection_id)
            .bind(fp.kind.as_str())
            .bind(fp.digest.to_vec())
            .bind(to_ms(now))
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "DELETE FROM token_fingerprints WHERE connection_id = ?1 AND kind = ?2 AND id NOT IN \
             (SELECT id FROM token_fingerprints WHERE connection_id = ?1 AND kind = ?2 ORDER BY id DESC LIMIT ?3)",
        )
        .bind(connection_id)
        .bind(fp.kind.as_str())
        .bind(FINGERPRINTS_KEPT)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

/// An advisory lock (`flock`) on `<database>.lock`, held until dropped.
/// Daemons hold it shared for their whole life (several may share one
/// database); offline commands that rewrite every row (`rekey`) take it
/// exclusively, so neither can start while the other runs. The kernel
/// releases it when the process dies, so a crash never leaves it stuck.
pub struct DbLock {
    _file: std::fs::File,
}

impl DbLock {
    /// For a daemon: shared, refused while an offline command runs.
    pub fn shared(db: &Path) -> Result<DbLock, StoreError> {
        Self::take(db, libc::LOCK_SH).map_err(|e| match e {
            Some(e) => e,
            None => StoreError::OfflineCommandRunning {
                path: db.display().to_string(),
            },
        })
    }

    /// For an offline command: exclusive, refused while a daemon runs.
    pub fn exclusive(db: &Path) -> Result<DbLock, StoreError> {
        Self::take(db, libc::LOCK_EX).map_err(|e| match e {
            Some(e) => e,
            None => StoreError::DaemonRunning {
                path: db.display().to_string(),
            },
        })
    }

    /// `Err(None)`: someone holds a conflicting lock.
    fn take(db: &Path, mode: libc::c_int) -> Result<DbLock, Option<StoreError>> {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::OpenOptionsExt;
        let mut name = db.as_os_str().to_owned();
        name.push(".lock");
        let path = std::path::PathBuf::from(name);
        let io = |source| StoreError::Directory {
            path: path.display().to_string(),
            source,
        };
        if let Some(dir) = path.parent() {
            create_private_dir(dir).map_err(|e| Some(io(e)))?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| Some(io(e)))?;
        // SAFETY: flock on a descriptor this function owns; no memory involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), mode | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(DbLock { _file: file });
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(None);
        }
        Err(Some(io(err)))
    }
}

/// Creates a directory (and its parents) with mode 0700 if missing.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.as_os_str().is_empty() || dir.exists() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Creates the parent directory (0700) and the file (0600) before SQLite
/// does, so the database is never readable by others, not even briefly; an
/// existing database that others can read is refused, with the fix.
fn prepare_file(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let io = |source| StoreError::Directory {
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent() {
        create_private_dir(dir).map_err(io)?;
    }
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(StoreError::Permissions {
                path: path.display().to_string(),
                mode,
            });
        }
        return Ok(());
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SealKey {
        SealKey::from_bytes([9; 32])
    }

    /// Stores a browser authorization of keap/default whose tokens are
    /// `access-{n}` and `refresh-{n}`.
    async fn authorize(store: &Store, n: &str) -> ConnectionRow {
        let access = SecretString::from(format!("access-{n}"));
        let refresh = SecretString::from(format!("refresh-{n}"));
        let now = Utc::now();
        let new = NewGrant {
            access_token: &access,
            refresh_token: Some(&refresh),
            token_type: "Bearer",
            scope: None,
            issued_at: now,
            expires_at: now + chrono::Duration::hours(1),
        };
        store
            .save_authorized("keap", "default", &new, &[])
            .await
            .unwrap()
            .0
    }

    async fn store_with_grant(dir: &Path, key: Option<SealKey>) -> (Store, ConnectionRow) {
        let store = Store::open(&dir.join("t.db"), key).await.unwrap();
        let row = authorize(&store, "1").await;
        (store, row)
    }

    async fn raw(store: &Store, sql: &str) {
        sqlx::query(sql).execute(&store.pool).await.unwrap();
    }

    #[tokio::test]
    async fn swapped_columns_and_replayed_values_do_not_open() {
        let dir = tempfile::tempdir().unwrap();
        let (store, row) = store_with_grant(dir.path(), Some(key())).await;
        assert_eq!(row.access_token.expose_secret(), "access-1");
        assert!(store.unreadable.lock().unwrap().is_empty());

        // Swapped columns: reported, no token handed out.
        raw(
            &store,
            "UPDATE connections SET access_token = refresh_token, refresh_token = access_token",
        )
        .await;
        let got = store.load_connection(row.id).await.unwrap().unwrap();
        assert_eq!(got.state, ConnState::AuthorizationRequired);
        assert!(got.access_token.expose_secret().is_empty());
        assert!(got.refresh_token.is_none());
        assert!(got.expires_at < Utc::now());
        let why = got.last_error.unwrap();
        assert!(why.contains("does not decrypt"), "{why}");
        assert!(why.contains("tokenkeeper connect keap default"), "{why}");
        assert!(store.unreadable.lock().unwrap().contains(&row.id));
        raw(
            &store,
            "UPDATE connections SET access_token = refresh_token, refresh_token = access_token",
        )
        .await;
        assert_eq!(
            store
                .load_connection(row.id)
                .await
                .unwrap()
                .unwrap()
                .access_token
                .expose_secret(),
            "access-1"
        );
        assert!(store.unreadable.lock().unwrap().is_empty());

        // Replay: a value sealed for generation 1, put back after a commit.
        let old: String = sqlx::query_scalar("SELECT refresh_token FROM connections")
            .fetch_one(&store.pool)
            .await
            .unwrap();
        let row2 = authorize(&store, "2").await;
        assert_eq!(row2.generation, 2);
        assert_eq!(
            row2.refresh_token.unwrap().expose_secret(),
            "refresh-2",
            "sealed with the generation the row has after the write"
        );
        sqlx::query("UPDATE connections SET refresh_token = ?")
            .bind(old)
            .execute(&store.pool)
            .await
            .unwrap();
        let got = store.load_connection(row.id).await.unwrap().unwrap();
        assert_eq!(got.state, ConnState::AuthorizationRequired);
        assert!(got.last_error.unwrap().contains("refresh_token"));
    }

    #[tokio::test]
    async fn a_database_sealed_the_old_way_is_resealed_once_and_opens() {
        let dir = tempfile::tempdir().unwrap();
        let (store, row) = store_with_grant(dir.path(), Some(key())).await;
        // Rewrite the row as the previous version sealed it.
        let legacy = "connection:keap/default";
        sqlx::query("UPDATE connections SET access_token = ?, refresh_token = ?")
            .bind(key().seal("access-1", legacy))
            .bind(key().seal("refresh-1", legacy))
            .execute(&store.pool)
            .await
            .unwrap();
        raw(
            &store,
            "DELETE FROM installation WHERE name = 'seal_format'",
        )
        .await;
        store.close().await;

        let store = Store::open(&dir.path().join("t.db"), Some(key()))
            .await
            .unwrap();
        let got = store.load_connection(row.id).await.unwrap().unwrap();
        assert_eq!(got.state, ConnState::Active);
        assert_eq!(got.access_token.expose_secret(), "access-1");
        assert_eq!(got.refresh_token.unwrap().expose_secret(), "refresh-1");
        // Now bound: the legacy binding no longer opens what is stored.
        let stored: String = sqlx::query_scalar("SELECT access_token FROM connections")
            .fetch_one(&store.pool)
            .await
            .unwrap();
        assert!(key().open(&stored, legacy).is_err());
    }

    #[tokio::test]
    async fn bad_state_and_bad_timestamps_are_reported_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let (store, row) = store_with_grant(dir.path(), None).await;
        raw(&store, "UPDATE connections SET state = 'paused'").await;
        let mut seen = Vec::new();
        store.each_connection(|c| seen.push(c)).await.unwrap();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].state, ConnState::AuthorizationRequired);
        assert!(seen[0]
            .last_error
            .as_deref()
            .unwrap()
            .contains("unknown state \"paused\""));
        raw(
            &store,
            "UPDATE connections SET state = 'active', expires_at = 99999999999999999",
        )
        .await;
        let got = store.load_connection(row.id).await.unwrap().unwrap();
        assert!(got.last_error.unwrap().contains("expires_at"));
        raw(&store, "UPDATE connections SET expires_at = 'soon'").await;
        let got = store.load_connection(row.id).await.unwrap().unwrap();
        assert_eq!(got.state, ConnState::AuthorizationRequired);
        // Not even a name: skipped, not fatal.
        raw(&store, "UPDATE connections SET provider = x'ff00'").await;
        assert!(store.load_connection(row.id).await.unwrap().is_none());
        let mut n = 0;
        store.each_connection(|_| n += 1).await.unwrap();
        assert_eq!(n, 0);
        assert!(store.unreadable.lock().unwrap().contains(&row.id));
    }

    #[tokio::test]
    async fn sqlite_failures_name_cause_and_fix() {
        // Read-only: a real SQLITE_READONLY from a read-only connection.
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = store_with_grant(dir.path(), None).await;
        store.close().await;
        let ro = SqlitePool::connect_with(
            SqliteConnectOptions::new()
                .filename(dir.path().join("t.db"))
                .read_only(true),
        )
        .await
        .unwrap();
        let e = sqlx::query("DELETE FROM connections")
            .execute(&ro)
            .await
            .unwrap_err();
        let text = StoreError::from(e).to_string();
        assert!(
            text.contains("read-only") && text.contains("write access"),
            "{text}"
        );

        // Full: a real SQLITE_FULL, the database capped at its current size.
        let full = SqlitePool::connect_with(
            SqliteConnectOptions::new()
                .filename(dir.path().join("full.db"))
                .create_if_missing(true),
        )
        .await
        .unwrap();
        sqlx::query("CREATE TABLE t (v BLOB)")
            .execute(&full)
            .await
            .unwrap();
        let mut conn = full.acquire().await.unwrap();
        sqlx::query("PRAGMA max_page_count = 3")
            .execute(&mut *conn)
            .await
            .unwrap();
        let e = sqlx::query("INSERT INTO t VALUES (zeroblob(100000))")
            .execute(&mut *conn)
            .await
            .unwrap_err();
        let text = StoreError::from(e).to_string();
        assert!(
            text.contains("disk holding the database is full") && text.contains("free space"),
            "{text}"
        );

        assert!(sqlite_problem(Some("1032")).unwrap().contains("read-only"));
        assert!(sqlite_problem(Some("5")).unwrap().contains("locked"));
        assert!(sqlite_problem(Some("1")).is_none());
        assert!(sqlite_problem(None).is_none());
    }

    #[tokio::test]
    async fn newer_database_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = store_with_grant(dir.path(), None).await;
        raw(&store, "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
                     VALUES (99991231000000, 'from the future', 1, x'00', 0)").await;
        store.close().await;
        let Err(e) = Store::open(&dir.path().join("t.db"), None).await else {
            panic!("a newer database must be refused");
        };
        let text = e.to_string();
        assert!(
            text.contains("newer version of tokenkeeper") && text.contains("restore a backup"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn write_probe_fails_while_another_process_holds_the_write_lock() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = store_with_grant(dir.path(), None).await;
        store.write_probe().await.unwrap();
        let other = SqlitePool::connect_with(
            SqliteConnectOptions::new()
                .filename(dir.path().join("t.db"))
                .busy_timeout(Duration::from_secs(1)),
        )
        .await
        .unwrap();
        let mut conn = other.acquire().await.unwrap();
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut *conn)
            .await
            .unwrap();
        // Past the reuse window of the successful probe.
        tokio::time::sleep(WRITE_PROBE_REUSE).await;
        let e = store.write_probe().await.unwrap_err();
        assert!(
            e.to_string().contains("cannot be written") || e.to_string().contains("locked"),
            "{e}"
        );
        sqlx::query("ROLLBACK").execute(&mut *conn).await.unwrap();
        store.write_probe().await.unwrap();
        // Reads still work meanwhile: only a write probe tells.
        store.ping().await.unwrap();
    }

    /// The scheduler's idle look: its own heartbeat is not a change; a
    /// commit by this process's pool or by another process is, once.
    #[tokio::test]
    async fn changed_reports_other_connections_writes_not_the_heartbeat() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = store_with_grant(dir.path(), None).await;
        assert!(store.changed().await.unwrap(), "the first look reads");
        assert!(!store.changed().await.unwrap());
        let now = Utc::now();
        for _ in 0..3 {
            store
                .heartbeat("me", now, now - chrono::Duration::seconds(10))
                .await
                .unwrap();
            assert!(!store.changed().await.unwrap(), "our heartbeat");
        }
        // This process's pool: a new authorization.
        authorize(&store, "2").await;
        assert!(store.changed().await.unwrap());
        assert!(!store.changed().await.unwrap());
        // Another process: a write on a connection of its own.
        use sqlx::ConnectOptions;
        let mut other = SqliteConnectOptions::new()
            .filename(dir.path().join("t.db"))
            .connect()
            .await
            .unwrap();
        sqlx::query("UPDATE connections SET state = 'retrying'")
            .execute(&mut other)
            .await
            .unwrap();
        assert!(store.changed().await.unwrap());
        assert!(!store.changed().await.unwrap());
        // Reads change nothing.
        store.versions().await.unwrap();
        assert!(!store.changed().await.unwrap());
        use sqlx::Connection;
        other.close().await.unwrap();
        store.close().await;
    }

    #[test]
    fn offline_lock_excludes_daemons_and_daemons_share() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("t.db");
        let a = DbLock::shared(&db).unwrap();
        let b = DbLock::shared(&db).unwrap();
        let e = DbLock::exclusive(&db).err().unwrap();
        assert!(e.to_string().contains("stop it first"), "{e}");
        drop((a, b));
        let x = DbLock::exclusive(&db).unwrap();
        assert!(DbLock::shared(&db).is_err());
        drop(x);
        assert!(DbLock::shared(&db).is_ok());
    }

    #[tokio::test]
    async fn an_unreadable_row_is_not_leased_or_written() {
        let dir = tempfile::tempdir().unwrap();
        let (store, row) = store_with_grant(dir.path(), None).await;
        raw(&store, "UPDATE connections SET state = 'paused'").await;
        let now = Utc::now();
        let until = now + chrono::Duration::seconds(30);
        let got = store
            .begin_refresh(row.id, "me", "a1", now, until, None)
            .await
            .unwrap();
        let BeginRefresh::Unreadable(stand_in) = got else {
            panic!("an unreadable row must not be leased");
        };
        assert!(stand_in.unreadable.unwrap().contains("unknown state"));
        let (state, owner): (String, Option<String>) =
            sqlx::query_as("SELECT state, lease_owner FROM connections")
                .fetch_one(&store.pool)
                .await
                .unwrap();
        assert_eq!((state.as_str(), owner), ("paused", None));
    }

    #[tokio::test]
    async fn a_rejection_does_not_park_a_grant_stored_since_it_was_read() {
        let dir = tempfile::tempdir().unwrap();
        let (store, row) = store_with_grant(dir.path(), None).await;
        let now = Utc::now();
        let until = now + chrono::Duration::seconds(30);
        // B took the lease over and read generation 1 ...
        let BeginRefresh::Started(read) = store
            .begin_refresh(row.id, "b", "b1", now, until, None)
            .await
            .unwrap()
        else {
            panic!("lease taken");
        };
        // ... then A, the previous holder, landed the grant it held.
        let access = SecretString::from("access-2".to_string());
        let refresh = SecretString::from("refresh-2".to_string());
        let landed = store
            .commit_refresh(
                row.id,
                ("keap", "default"),
                "a",
                "a1",
                read.generation,
                &NewGrant {
                    access_token: &access,
                    refresh_token: Some(&refresh),
                    token_type: "Bearer",
                    scope: None,
                    issued_at: now,
                    expires_at: now + chrono::Duration::hours(1),
                },
                &[],
            )
            .await
            .unwrap();
        assert!(matches!(
            landed,
            CommitOutcome::Committed {
                kept_lease: false,
                ..
            }
        ));
        // B's spent token is rejected: the landed grant is not parked.
        let parked = store
            .reject_attempt(row.id, ("b", "b1"), read.generation, "rejected", 0)
            .await
            .unwrap();
        assert!(parked.is_none());
        let now_stored = store.load_connection(row.id).await.unwrap().unwrap();
        assert_eq!(now_stored.state, ConnState::Active);
        assert!(now_stored.lease_owner.is_none());
        assert_eq!(
            now_stored.refresh_token.unwrap().expose_secret(),
            "refresh-2"
        );
    }
}
