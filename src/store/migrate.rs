//! `tokenkeeper migrate-storage`: copies everything a store holds (grants,
//! fingerprints, pending authorizations, settings) to another store of
//! either backend, in one transaction on the target, then reads the copy
//! back and compares it with what was read.
//!
//! Values are copied exactly as stored: a sealed token's associated data
//! names its connection, column and generation, never the backend, so the
//! copy opens with the same key and nothing is decrypted on the way.
//!
//! Must not: run while a daemon uses either store (both are locked
//! exclusively, see [`super::StoreLock`]), or leave a half-written target.

use secrecy::{ExposeSecret, SecretString};

use super::codec::Columns;
use super::{Backend, Db, Location, Store, StoreError, StoreLock};
use crate::crypto::SealKey;

/// Why a migration did not happen (nothing was changed) or failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the target {target} already holds {connections} connection(s); nothing was copied. Add --replace to overwrite them, or choose an empty target")]
    TargetNotEmpty { target: String, connections: i64 },
    #[error("the target is the configured store itself ({0}); choose another")]
    SameStore(String),
    #[error("the copy in {target} does not read back as the source ({what}); the target may be incomplete: do not use it, and run the command again with --replace")]
    Verify { target: String, what: String },
}

/// The tables a dump covers, children first (the order to empty them in).
pub const TABLES: [&str; 7] = [
    "events",
    "token_fingerprints",
    "pending_authorizations",
    "connections",
    "installation",
    "processes",
    "discovery",
];

/// A connection row exactly as stored (tokens sealed, or plain without a
/// key: either way they stay secrets).
pub struct StoredConnection {
    pub id: i64,
    pub provider: String,
    pub account: String,
    pub state: String,
    pub access_token: SecretString,
    pub refresh_token: Option<SecretString>,
    pub token_type: String,
    pub scope: Option<String>,
    pub expires_at: i64,
    pub issued_at: i64,
    pub refreshed_at: Option<i64>,
    pub refresh_token_issued_at: i64,
    pub generation: i64,
    pub last_error: Option<String>,
    pub failures: i64,
    pub next_attempt_at: Option<i64>,
    pub lease_owner: Option<String>,
    pub lease_until: Option<i64>,
    pub attempt_id: Option<String>,
    pub attempt_started_at: Option<i64>,
    pub interrupted_at: Option<i64>,
    pub created_at: i64,
    pub extra: Option<String>,
    pub refresh_token_expires_at: Option<i64>,
    pub refresh_token_cap_at: Option<i64>,
}

/// The columns of [`StoredConnection`], in order.
pub const CONNECTION_COLUMNS: &str = "id, provider, account, state, access_token, refresh_token, token_type, scope, \
    expires_at, issued_at, refreshed_at, refresh_token_issued_at, generation, last_error, failures, \
    next_attempt_at, lease_owner, lease_until, attempt_id, attempt_started_at, interrupted_at, created_at, \
    extra, refresh_token_expires_at, refresh_token_cap_at";

impl StoredConnection {
    /// Reads one stored row; a value of the wrong type is an error naming
    /// the row and column (such a row cannot be copied faithfully).
    pub fn from_row<R: Columns>(r: &R) -> Result<StoredConnection, StoreError> {
        let id = r.int("id").map_err(StoreError::Corrupt)?;
        let c = |e: String| StoreError::Corrupt(format!("connection row {id}: {e}"));
        Ok(StoredConnection {
            id,
            provider: r.text("provider").map_err(c)?,
            account: r.text("account").map_err(c)?,
            state: r.text("state").map_err(c)?,
            access_token: SecretString::from(r.text("access_token").map_err(c)?),
            refresh_token: r
                .opt_text("refresh_token")
                .map_err(c)?
                .map(SecretString::from),
            token_type: r.text("token_type").map_err(c)?,
            scope: r.opt_text("scope").map_err(c)?,
            expires_at: r.int("expires_at").map_err(c)?,
            issued_at: r.int("issued_at").map_err(c)?,
            refreshed_at: r.opt_int("refreshed_at").map_err(c)?,
            refresh_token_issued_at: r.int("refresh_token_issued_at").map_err(c)?,
            generation: r.int("generation").map_err(c)?,
            last_error: r.opt_text("last_error").map_err(c)?,
            failures: r.int("failures").map_err(c)?,
            next_attempt_at: r.opt_int("next_attempt_at").map_err(c)?,
            lease_owner: r.opt_text("lease_owner").map_err(c)?,
            lease_until: r.opt_int("lease_until").map_err(c)?,
            attempt_id: r.opt_text("attempt_id").map_err(c)?,
            attempt_started_at: r.opt_int("attempt_started_at").map_err(c)?,
            interrupted_at: r.opt_int("interrupted_at").map_err(c)?,
            created_at: r.int("created_at").map_err(c)?,
            extra: r.opt_text("extra").map_err(c)?,
            refresh_token_expires_at: r.opt_int("refresh_token_expires_at").map_err(c)?,
            refresh_token_cap_at: r.opt_int("refresh_token_cap_at").map_err(c)?,
        })
    }

    /// Everything but the tokens, for comparing a copy with its source.
    fn plain(&self) -> String {
        format!(
            "{}|{}|{}|{}|{}|{:?}|{}|{}|{:?}|{}|{}|{:?}|{}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{}|{:?}|{:?}|{:?}",
            self.id,
            self.provider,
            self.account,
            self.state,
            self.token_type,
            self.scope,
            self.expires_at,
            self.issued_at,
            self.refreshed_at,
            self.refresh_token_issued_at,
            self.generation,
            self.last_error,
            self.failures,
            self.next_attempt_at,
            self.lease_owner,
            self.lease_until,
            self.attempt_id,
            self.attempt_started_at,
            self.interrupted_at,
            self.created_at,
            self.extra,
            self.refresh_token_expires_at,
            self.refresh_token_cap_at,
        )
    }

    fn same_as(&self, other: &StoredConnection) -> bool {
        self.plain() == other.plain()
            && self.access_token.expose_secret() == other.access_token.expose_secret()
            && self.refresh_token.as_ref().map(|t| t.expose_secret())
                == other.refresh_token.as_ref().map(|t| t.expose_secret())
    }
}

/// A fingerprint row as stored.
#[derive(Debug, PartialEq, Eq)]
pub struct StoredFingerprint {
    pub id: i64,
    pub connection_id: i64,
    pub kind: String,
    pub digest: Vec<u8>,
    pub created_at: i64,
}

/// A pending authorization as stored (the PKCE verifier sealed or plain).
pub struct StoredPending {
    pub state: String,
    pub provider: String,
    pub account: String,
    pub pkce_verifier: Option<SecretString>,
    pub redirect_uri: String,
    pub browser_hash: String,
    pub created_at: i64,
    pub expires_at: i64,
}

impl StoredPending {
    fn same_as(&self, o: &StoredPending) -> bool {
        (
            &self.state,
            &self.provider,
            &self.account,
            &self.redirect_uri,
            &self.browser_hash,
            self.created_at,
            self.expires_at,
        ) == (
            &o.state,
            &o.provider,
            &o.account,
            &o.redirect_uri,
            &o.browser_hash,
            o.created_at,
            o.expires_at,
        ) && self.pkce_verifier.as_ref().map(|v| v.expose_secret())
            == o.pkce_verifier.as_ref().map(|v| v.expose_secret())
    }
}

/// Everything a store holds that is worth copying, ordered by key so two
/// dumps compare row by row. Daemon heartbeats (`processes`) are not
/// copied: they describe processes, not grants.
#[derive(Default)]
pub struct Dump {
    pub connections: Vec<StoredConnection>,
    pub fingerprints: Vec<StoredFingerprint>,
    pub pending: Vec<StoredPending>,
    /// The `installation` table (fingerprint key, key check, seal format).
    pub settings: Vec<(String, Vec<u8>)>,
    /// Discovery documents kept per issuer: `(issuer, document,
    /// fetched_at)`, so the target starts without network too.
    pub discovery: Vec<(String, String, i64)>,
    /// The history (`events`), as stored: `(id, provider, account, at,
    /// kind, detail, duration_ms)`, by id.
    pub events: Vec<StoredEvent>,
}

/// An `events` row as stored: `(id, provider, account, at, kind, detail,
/// duration_ms)`.
pub type StoredEvent = (
    i64,
    String,
    String,
    i64,
    String,
    Option<String>,
    Option<i64>,
);

impl Dump {
    /// What differs between `self` and `other`, if anything.
    pub fn difference(&self, other: &Dump) -> Option<String> {
        if self.connections.len() != other.connections.len() {
            return Some(format!(
                "{} connections instead of {}",
                other.connections.len(),
                self.connections.len()
            ));
        }
        if let Some((a, _)) = self
            .connections
            .iter()
            .zip(&other.connections)
            .find(|(a, b)| !a.same_as(b))
        {
            return Some(format!("connection {}/{} differs", a.provider, a.account));
        }
        if self.fingerprints != other.fingerprints {
            return Some("the token fingerprints differ".into());
        }
        if self.pending.len() != other.pending.len()
            || self
                .pending
                .iter()
                .zip(&other.pending)
                .any(|(a, b)| !a.same_as(b))
        {
            return Some("the pending authorizations differ".into());
        }
        if self.settings != other.settings {
            return Some("the installation settings differ".into());
        }
        if self.discovery != other.discovery {
            return Some("the kept discovery documents differ".into());
        }
        if self.events != other.events {
            return Some("the history (events) differs".into());
        }
        None
    }
}

/// `values(3)` is `$1, $2, $3` (both backends number parameters so; see
/// `store::lifecycle`).
pub fn values(n: usize) -> String {
    (1..=n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Defines, in a backend module, `read_dump`, `check_empty` and
/// `write_dump` over its connection type `$conn`.
macro_rules! dump_sql {
    ($conn:ty) => {
        /// Reads everything a [`Dump`] holds, inside the caller's transaction.
        async fn read_dump(tx: &mut $conn) -> Result<Dump, StoreError> {
            use $crate::store::codec::Columns;
            use $crate::store::migrate::{
                StoredConnection, StoredFingerprint, StoredPending, CONNECTION_COLUMNS,
            };
            let corrupt = StoreError::Corrupt;
            let mut dump = Dump::default();
            for r in sqlx::query(&format!(
                "SELECT {CONNECTION_COLUMNS} FROM connections ORDER BY id"
            ))
            .fetch_all(&mut *tx)
            .await?
            {
                dump.connections.push(StoredConnection::from_row(&r)?);
            }
            for r in sqlx::query(
                "SELECT id, connection_id, kind, digest, created_at FROM token_fingerprints ORDER BY id",
            )
            .fetch_all(&mut *tx)
            .await?
            {
                dump.fingerprints.push(StoredFingerprint {
                    id: r.int("id").map_err(corrupt)?,
                    connection_id: r.int("connection_id").map_err(corrupt)?,
                    kind: r.text("kind").map_err(corrupt)?,
                    digest: sqlx::Row::try_get(&r, "digest")?,
                    created_at: r.int("created_at").map_err(corrupt)?,
                });
            }
            for r in sqlx::query(&format!(
                "SELECT {PENDING_COLUMNS} FROM pending_authorizations ORDER BY state"
            ))
            .fetch_all(&mut *tx)
            .await?
            {
                dump.pending.push(StoredPending {
                    state: r.text("state").map_err(corrupt)?,
                    provider: r.text("provider").map_err(corrupt)?,
                    account: r.text("account").map_err(corrupt)?,
                    pkce_verifier: r
                        .opt_text("pkce_verifier")
                        .map_err(corrupt)?
                        .map(secrecy::SecretString::from),
                    redirect_uri: r.text("redirect_uri").map_err(corrupt)?,
                    browser_hash: r.text("browser_hash").map_err(corrupt)?,
                    created_at: r.int("created_at").map_err(corrupt)?,
                    expires_at: r.int("expires_at").map_err(corrupt)?,
                });
            }
            for r in sqlx::query("SELECT name, value FROM installation ORDER BY name")
                .fetch_all(&mut *tx)
                .await?
            {
                dump.settings.push((
                    sqlx::Row::try_get(&r, "name")?,
                    sqlx::Row::try_get(&r, "value")?,
                ));
            }
            for r in
                sqlx::query("SELECT issuer, document, fetched_at FROM discovery ORDER BY issuer")
                    .fetch_all(&mut *tx)
                    .await?
            {
                dump.discovery.push((
                    sqlx::Row::try_get(&r, "issuer")?,
                    sqlx::Row::try_get(&r, "document")?,
                    sqlx::Row::try_get(&r, "fetched_at")?,
                ));
            }
            for r in sqlx::query(
                "SELECT id, provider, account, at, kind, detail, duration_ms FROM events ORDER BY id",
            )
            .fetch_all(&mut *tx)
            .await?
            {
                dump.events.push((
                    sqlx::Row::try_get(&r, "id")?,
                    sqlx::Row::try_get(&r, "provider")?,
                    sqlx::Row::try_get(&r, "account")?,
                    sqlx::Row::try_get(&r, "at")?,
                    sqlx::Row::try_get(&r, "kind")?,
                    sqlx::Row::try_get(&r, "detail")?,
                    sqlx::Row::try_get(&r, "duration_ms")?,
                ));
            }
            Ok(dump)
        }

        /// Refuses a target that holds connections, unless `replace`.
        async fn check_empty(
            tx: &mut $conn,
            replace: bool,
            target: &str,
        ) -> Result<(), $crate::store::migrate::MigrateError> {
            let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM connections")
                .fetch_one(&mut *tx)
                .await
                .map_err(StoreError::from)?;
            if n > 0 && !replace {
                return Err($crate::store::migrate::MigrateError::TargetNotEmpty {
                    target: target.to_owned(),
                    connections: n,
                });
            }
            Ok(())
        }

        /// Empties every table and writes `dump`, inside the caller's
        /// transaction.
        async fn write_dump(tx: &mut $conn, dump: &Dump) -> Result<(), StoreError> {
            use $crate::store::migrate::{values, CONNECTION_COLUMNS, TABLES};
            use secrecy::ExposeSecret;
            for table in TABLES {
                sqlx::query(&format!("DELETE FROM {table}"))
                    .execute(&mut *tx)
                    .await?;
            }
            let insert = format!(
                "INSERT INTO connections ({CONNECTION_COLUMNS}) VALUES ({})",
                values(25)
            );
            for c in &dump.connections {
                sqlx::query(&insert)
                    .bind(c.id)
                    .bind(c.provider.clone())
                    .bind(c.account.clone())
                    .bind(c.state.clone())
                    .bind(c.access_token.expose_secret().to_owned())
                    .bind(c.refresh_token.as_ref().map(|t| t.expose_secret().to_owned()))
                    .bind(c.token_type.clone())
                    .bind(c.scope.clone())
                    .bind(c.expires_at)
                    .bind(c.issued_at)
                    .bind(c.refreshed_at)
                    .bind(c.refresh_token_issued_at)
                    .bind(c.generation)
                    .bind(c.last_error.clone())
                    .bind(c.failures)
                    .bind(c.next_attempt_at)
                    .bind(c.lease_owner.clone())
                    .bind(c.lease_until)
                    .bind(c.attempt_id.clone())
                    .bind(c.attempt_started_at)
                    .bind(c.interrupted_at)
                    .bind(c.created_at)
                    .bind(c.extra.clone())
                    .bind(c.refresh_token_expires_at)
                    .bind(c.refresh_token_cap_at)
                    .execute(&mut *tx)
                    .await?;
            }
            let insert = format!(
                "INSERT INTO token_fingerprints (id, connection_id, kind, digest, created_at) VALUES ({})",
                values(5)
            );
            for f in &dump.fingerprints {
                sqlx::query(&insert)
                    .bind(f.id)
                    .bind(f.connection_id)
                    .bind(f.kind.clone())
                    .bind(f.digest.clone())
                    .bind(f.created_at)
                    .execute(&mut *tx)
                    .await?;
            }
            let insert = format!(
                "INSERT INTO pending_authorizations ({PENDING_COLUMNS}) VALUES ({})",
                values(8)
            );
            for p in &dump.pending {
                sqlx::query(&insert)
                    .bind(p.state.clone())
                    .bind(p.provider.clone())
                    .bind(p.account.clone())
                    .bind(p.pkce_verifier.as_ref().map(|v| v.expose_secret().to_owned()))
                    .bind(p.redirect_uri.clone())
                    .bind(p.browser_hash.clone())
                    .bind(p.created_at)
                    .bind(p.expires_at)
                    .execute(&mut *tx)
                    .await?;
            }
            let insert = format!(
                "INSERT INTO installation (name, value) VALUES ({})",
                values(2)
            );
            for (name, value) in &dump.settings {
                sqlx::query(&insert)
                    .bind(name.clone())
                    .bind(value.clone())
                    .execute(&mut *tx)
                    .await?;
            }
            let insert = format!(
                "INSERT INTO discovery (issuer, document, fetched_at) VALUES ({})",
                values(3)
            );
            for (issuer, document, fetched_at) in &dump.discovery {
                sqlx::query(&insert)
                    .bind(issuer.clone())
                    .bind(document.clone())
                    .bind(*fetched_at)
                    .execute(&mut *tx)
                    .await?;
            }
            let insert = format!(
                "INSERT INTO events (id, provider, account, at, kind, detail, duration_ms) VALUES ({})",
                values(7)
            );
            for (id, provider, account, at, kind, detail, duration_ms) in &dump.events {
                sqlx::query(&insert)
                    .bind(*id)
                    .bind(provider.clone())
                    .bind(account.clone())
                    .bind(*at)
                    .bind(kind.clone())
                    .bind(detail.clone())
                    .bind(*duration_ms)
                    .execute(&mut *tx)
                    .await?;
            }
            Ok(())
        }
    };
}
pub(crate) use dump_sql;

/// What a migration copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Copied {
    pub connections: usize,
    pub fingerprints: usize,
    pub pending: usize,
}

/// Copies the store at `from` into the store at `to`, then verifies the
/// copy by reading it back. `keys` opens each (the same key, loaded twice:
/// the copy stays sealed under it). Both are locked exclusively for the
/// whole run, so this refuses while a daemon uses either.
pub async fn migrate_storage(
    from: &Location,
    to: &Location,
    keys: (Option<SealKey>, Option<SealKey>),
    replace: bool,
) -> Result<Copied, MigrateError> {
    if same_store(from, to) {
        return Err(MigrateError::SameStore(from.describe()));
    }
    let _from_lock = StoreLock::exclusive(from).await?;
    let _to_lock = StoreLock::exclusive(to).await?;
    let source = Store::open_at(from, keys.0).await?;
    let target = Store::open_at(to, keys.1).await?;
    let result = copy(&source, &target, &to.describe(), replace).await;
    source.close().await;
    target.close().await;
    result
}

/// Whether `a` and `b` name one store: SQLite paths are compared as the
/// files they reach (`./tk.db`, a symlink), so the target is never the
/// source under another spelling, refused with a misleading "a daemon is
/// using it" by the source's own lock.
fn same_store(a: &Location, b: &Location) -> bool {
    match (a, b) {
        (Location::Sqlite(x), Location::Sqlite(y)) => real_path(x) == real_path(y),
        _ => a.describe() == b.describe(),
    }
}

/// `p` with its directory (and the file, if it exists) resolved; `p` as
/// given when its directory does not exist yet.
fn real_path(p: &std::path::Path) -> std::path::PathBuf {
    if let Ok(full) = p.canonicalize() {
        return full;
    }
    let dir = p
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    match (dir.canonicalize(), p.file_name()) {
        (Ok(d), Some(name)) => d.join(name),
        _ => p.to_path_buf(),
    }
}

/// [`migrate_storage`] between two open stores.
pub async fn copy(
    source: &Store,
    target: &Store,
    target_name: &str,
    replace: bool,
) -> Result<Copied, MigrateError> {
    let dump = match source.backend() {
        Db::Sqlite(b) => b.export().await?,
        Db::Postgres(b) => b.export().await?,
    };
    match target.backend() {
        Db::Sqlite(b) => b.import(&dump, replace, target_name).await?,
        Db::Postgres(b) => b.import(&dump, replace, target_name).await?,
    }
    let back = match target.backend() {
        Db::Sqlite(b) => b.export().await?,
        Db::Postgres(b) => b.export().await?,
    };
    if let Some(what) = dump.difference(&back) {
        return Err(MigrateError::Verify {
            target: target_name.to_owned(),
            what,
        });
    }
    // And the copy opens: every grant readable at the source decodes at
    // the target under the same key.
    let mut broken = std::collections::HashSet::new();
    source
        .each_connection(|c| {
            if c.unreadable.is_some() {
                broken.insert(c.id);
            }
        })
        .await?;
    let mut unreadable = Vec::new();
    target
        .each_connection(|c| {
            if c.unreadable.is_some() && !broken.contains(&c.id) {
                unreadable.push(format!("{}/{}", c.provider, c.account));
            }
        })
        .await?;
    if !unreadable.is_empty() {
        return Err(MigrateError::Verify {
            target: target_name.to_owned(),
            what: format!("{} cannot be read there", unreadable.join(", ")),
        });
    }
    Ok(Copied {
        connections: dump.connections.len(),
        fingerprints: dump.fingerprints.len(),
        pending: dump.pending.len(),
    })
}
