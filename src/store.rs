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

use std::path::Path;
use std::time::Duration;

use std::sync::Arc;

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
    #[error("cannot prepare the database directory {path}: {source}")]
    Directory {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot open the database {path}: {source}")]
    Open { path: String, source: sqlx::Error },
    #[error("cannot apply database migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database error: {0}")]
    Sql(#[from] sqlx::Error),
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
}

/// Lifecycle state of a connection (SPEC 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    Active,
    Refreshing,
    Retrying,
    AuthorizationRequired,
}

impl ConnState {
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
}

pub fn to_ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

pub fn from_ms(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms)
        .single()
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

fn opt_ms(v: Option<i64>) -> Option<DateTime<Utc>> {
    v.map(from_ms)
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
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true)
            // 512 KiB of page cache per pooled connection instead of 2 MiB:
            // the start reads every row once, and each connection would
            // keep the pages it read for the life of the daemon. Refreshes
            // touch a handful of pages by primary key.
            .pragma("cache_size", "-512");
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .map_err(|source| StoreError::Open {
                path: path.display().to_string(),
                source,
            })?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        let store = Store {
            pool,
            seal: key.map(Arc::new),
        };
        store.check_key().await?;
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
            (Some(key), Some(c)) => key
                .open(&c, KEY_CHECK_CONTEXT)
                .map(|_| ())
                .map_err(|_| StoreError::WrongKey),
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
    async fn reseal_all(&self, old: Option<&SealKey>, new: &SealKey) -> Result<usize, StoreError> {
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(
            "SELECT id, provider, account, access_token, refresh_token FROM connections",
        )
        .fetch_all(&mut *tx)
        .await?;
        for r in &rows {
            let ctx = context(r.try_get("provider")?, r.try_get("account")?);
            let open = |v: String| -> Result<SecretString, StoreError> {
                match old {
                    Some(k) => Ok(k.open(&v, &ctx)?),
                    None if crypto::is_sealed(&v) => Err(StoreError::WrongKey),
                    None => Ok(SecretString::from(v)),
                }
            };
            let access = open(r.try_get("access_token")?)?;
            let refresh = r
                .try_get::<Option<String>, _>("refresh_token")?
                .map(open)
                .transpose()?;
            sqlx::query("UPDATE connections SET access_token = ?, refresh_token = ? WHERE id = ?")
                .bind(new.seal(access.expose_secret(), &ctx))
                .bind(refresh.map(|t| new.seal(t.expose_secret(), &ctx)))
                .bind(r.try_get::<i64, _>("id")?)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("DELETE FROM pending_authorizations")
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT OR REPLACE INTO installation (name, value) VALUES ('key_check', ?)")
            .bind(new.seal("tokenkeeper", KEY_CHECK_CONTEXT).into_bytes())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(rows.len())
    }

    /// `tokenkeeper rekey`: re-seals everything under `new`.
    pub async fn rekey(&self, new: &SealKey) -> Result<usize, StoreError> {
        self.reseal_all(self.seal.as_deref(), new).await
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

    /// Cheap liveness probe for `/readyz` and the watchdog.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Closes every pooled connection (checkpointing the WAL).
    pub async fn close(&self) {
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
        let verifier = r
            .try_get::<Option<String>, _>("pkce_verifier")?
            .map(|v| self.open_value(v, &pending_context(state)))
            .transpose()?;
        Ok(Some(PendingAuthorization {
            state: r.try_get("state")?,
            provider: r.try_get("provider")?,
            account: r.try_get("account")?,
            pkce_verifier: verifier,
            redirect_uri: r.try_get("redirect_uri")?,
            browser_hash: r.try_get("browser_hash")?,
            created_at: from_ms(r.try_get("created_at")?),
            expires_at: from_ms(r.try_get("expires_at")?),
        }))
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
            f(self.decode(&r)?);
        }
        Ok(())
    }

    pub async fn load_connection(&self, id: i64) -> Result<Option<ConnectionRow>, StoreError> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM connections WHERE id = ?"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(|r| self.decode(r)).transpose()
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
        let ctx = context(provider, account);
        // BEGIN IMMEDIATE semantics: the first statement writes, so the
        // replaced token read below is the one this write replaces.
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE connections SET generation = generation WHERE provider = ? AND account = ?",
        )
        .bind(provider.to_owned())
        .bind(account.to_owned())
        .execute(&mut *tx)
        .await?;
        let replaced: Option<Option<String>> = sqlx::query_scalar(
            "SELECT refresh_token FROM connections WHERE provider = ? AND account = ?",
        )
        .bind(provider.to_owned())
        .bind(account.to_owned())
        .fetch_optional(&mut *tx)
        .await?;
        // A replaced token that no longer opens is not worth failing the
        // new authorization for: it is simply not revoked.
        let replaced = replaced
            .flatten()
            .and_then(|v| self.open_value(v, &ctx).ok());
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
        .bind(self.seal_value(g.access_token, &ctx))
        .bind(g.refresh_token.map(|t| self.seal_value(t, &ctx)))
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
        // remember when, so a later rejection can say precisely why.
        let row = sqlx::query(&format!(
            "UPDATE connections SET \
                 interrupted_at = CASE WHEN attempt_id IS NOT NULL AND lease_owner IS NOT ?1 \
                                       THEN attempt_started_at ELSE interrupted_at END, \
                 lease_owner = ?1, lease_until = ?2, attempt_id = ?3, attempt_started_at = ?4, \
                 state = CASE WHEN state = 'authorization_required' THEN state ELSE 'refreshing' END \
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
        .fetch_optional(&self.pool)
        .await?;
        if let Some(row) = row {
            return Ok(BeginRefresh::Started(Box::new(self.decode(&row)?)));
        }
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
        let ctx = context(provider, account);
        let sealed = || {
            (
                self.seal_value(g.access_token, &ctx),
                g.refresh_token.map(|t| self.seal_value(t, &ctx)),
            )
        };
        // One transaction: the pair and the fingerprints of the new tokens
        // become durable together.
        let mut tx = self.pool.begin().await?;
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
        if let Some(row) = row {
            let decoded = self.decode(&row)?;
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
        if let Some(row) = row {
            let decoded = self.decode(&row)?;
            record_fingerprints(&mut tx, id, fps, g.issued_at).await?;
            tx.commit().await?;
            return Ok(CommitOutcome::Committed {
                row: Box::new(decoded),
                kept_lease: false,
            });
        }
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
        let current = sqlx::query(&format!("SELECT {COLUMNS} FROM connections WHERE id = ?"))
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
        tx.commit().await?;
        let current = current.as_ref().map(|r| self.decode(r)).transpose()?;
        Ok(CommitOutcome::Superseded(current.map(Box::new)))
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
    /// were seen since `alive_since` (older entries are dropped).
    pub async fn heartbeat(
        &self,
        owner: &str,
        now: DateTime<Utc>,
        alive_since: DateTime<Utc>,
    ) -> Result<usize, StoreError> {
        sqlx::query("INSERT INTO processes (owner, seen_at) VALUES (?1, ?2) ON CONFLICT (owner) DO UPDATE SET seen_at = ?2")
            .bind(owner.to_owned())
            .bind(to_ms(now))
            .execute(&self.pool)
            .await?;
        sqlx::query("DELETE FROM processes WHERE seen_at < ?")
            .bind(to_ms(alive_since))
            .execute(&self.pool)
            .await?;
        let others: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM processes WHERE owner != ?")
            .bind(owner.to_owned())
            .fetch_one(&self.pool)
            .await?;
        Ok(others.max(0) as usize)
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
    /// A row as the lifecycle sees it: tokens opened.
    fn decode(&self, r: &SqliteRow) -> Result<ConnectionRow, StoreError> {
        let provider: String = r.try_get("provider")?;
        let account: String = r.try_get("account")?;
        let ctx = context(&provider, &account);
        Ok(ConnectionRow {
            id: r.try_get("id")?,
            state: ConnState::parse(r.try_get::<&str, _>("state")?)?,
            access_token: self.open_value(r.try_get("access_token")?, &ctx)?,
            refresh_token: r
                .try_get::<Option<String>, _>("refresh_token")?
                .map(|v| self.open_value(v, &ctx))
                .transpose()?,
            provider,
            account,
            token_type: r.try_get("token_type")?,
            scope: r.try_get("scope")?,
            expires_at: from_ms(r.try_get("expires_at")?),
            issued_at: from_ms(r.try_get("issued_at")?),
            refreshed_at: opt_ms(r.try_get("refreshed_at")?),
            refresh_token_issued_at: from_ms(r.try_get("refresh_token_issued_at")?),
            generation: r.try_get("generation")?,
            last_error: r.try_get("last_error")?,
            failures: r.try_get::<i64, _>("failures")?.clamp(0, u32::MAX as i64) as u32,
            next_attempt_at: opt_ms(r.try_get("next_attempt_at")?),
            lease_owner: r.try_get("lease_owner")?,
            lease_until: opt_ms(r.try_get("lease_until")?),
            attempt_id: r.try_get("attempt_id")?,
            attempt_started_at: opt_ms(r.try_get("attempt_started_at")?),
            interrupted_at: opt_ms(r.try_get("interrupted_at")?),
        })
    }
}

/// Associated data of sealed tokens: the connection's identity, so a sealed
/// value moved to another row does not open.
fn context(provider: &str, account: &str) -> String {
    format!("connection:{provider}/{account}")
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
