//! The SQLite backend: the zero-setup default (`storage.path`).
//!
//! WAL, `synchronous = FULL` (a rotated refresh token must survive power
//! loss the moment it is committed), migrations embedded from
//! `migrations/sqlite/` and applied at open. Compare-and-swap writes are
//! single statements or transactions whose first statement writes, so
//! they hold SQLite's one write lock from their first read to commit.
//! The statements themselves are shared with PostgreSQL
//! (`store::lifecycle`); this file gives the `DIALECT` and what only
//! SQLite has.
//!
//! Daemons hold a shared advisory lock on `<database>.lock` for their
//! whole life; offline commands (`rekey`, `migrate-storage`) take it
//! exclusively, so they refuse to run under a daemon (see [`DbLock`]).
//!
//! Must not: be reached other than through [`super::Store`].

use std::path::Path;

use chrono::{DateTime, Utc};
use futures_util::TryStreamExt;
use secrecy::SecretString;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{Row, SqlitePool};

use super::codec::{self, impl_columns, Codec, Column, SealContext, COLUMNS, PENDING_COLUMNS};
use super::lifecycle::{lifecycle_helpers, lifecycle_methods, Dialect};
use super::migrate::{Dump, MigrateError};
use super::{
    create_private_dir, from_ms, to_ms, Backend, BeginRefresh, CommitOutcome, ConnState,
    ConnectionRow, Event, EventQuery, Fingerprint, GrantMeta, LeaseSeen, NewEvent, NewGrant,
    PendingAuthorization, PendingTake, StoreError, BUSY_TIMEOUT, FINGERPRINTS_KEPT,
};
use crate::crypto::SealKey;

impl_columns!(SqliteRow);

/// An open SQLite database.
#[derive(Clone)]
pub struct Sqlite {
    pool: SqlitePool,
    codec: Codec,
    /// The scheduler's own connection, outside the pool (see
    /// `Backend::changed`): opened at its first use with these options.
    watch: std::sync::Arc<tokio::sync::Mutex<Watch>>,
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

impl Sqlite {
    /// Opens (creating with mode 0600, in a 0700 directory, if needed) and
    /// migrates the database at `path`.
    pub(super) async fn open(path: &Path, codec: Codec) -> Result<Sqlite, StoreError> {
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
        sqlx::migrate!("./migrations/sqlite")
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
        Ok(Sqlite {
            pool,
            codec,
            watch: std::sync::Arc::new(tokio::sync::Mutex::new(watch)),
        })
    }

    /// Writes a consistent copy of the database to `dest` (which must not
    /// exist or be empty) with `VACUUM INTO`: one read transaction on a
    /// pooled connection, so writers go on and the copy is one committed
    /// state, never a file copy of a live WAL database. The copy is then
    /// switched to a rollback journal, so it is a single self-contained
    /// file that can be opened, checked and restored without -wal/-shm.
    pub(super) async fn snapshot_into(&self, dest: &Path) -> Result<(), StoreError> {
        let target = dest.to_str().ok_or_else(|| {
            StoreError::NotWritable(format!(
                "the backup path {} is not valid UTF-8; choose another backup.dir",
                dest.display()
            ))
        })?;
        sqlx::query("VACUUM INTO ?")
            .bind(target.to_owned())
            .execute(&self.pool)
            .await?;
        let options = SqliteConnectOptions::new()
            .filename(dest)
            .journal_mode(SqliteJournalMode::Delete)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(BUSY_TIMEOUT);
        let conn = sqlx::ConnectOptions::connect(&options).await?;
        sqlx::Connection::close(conn).await?;
        Ok(())
    }

    /// The pool, for tests that must write what no method writes.
    #[cfg(test)]
    pub(super) fn pool(&self) -> &SqlitePool {
        &self.pool
    }
}

/// SQLite has one write lock per database: a transaction whose first
/// statement writes holds it from there to commit (`BEGIN IMMEDIATE`
/// semantics), so that first statement is a write that changes nothing
/// (or, for an import, only the heartbeats, which it replaces anyway).
const DIALECT: Dialect = Dialect {
    for_update: "",
    lock_name:
        "UPDATE connections SET generation = generation WHERE provider = $1 AND account = $2",
    lock_generation:
        "UPDATE connections SET generation = generation WHERE id = $1 RETURNING generation",
    lock_all: Some("UPDATE connections SET generation = generation WHERE 0"),
    export_snapshot: None,
    import_lock: "DELETE FROM processes",
    after_import: &[],
};

impl Backend for Sqlite {
    lifecycle_methods!(DIALECT);

    async fn close(&self) {
        if let Some(conn) = self.watch.lock().await.conn.take() {
            use sqlx::Connection;
            let _ = conn.close().await;
        }
        self.pool.close().await;
    }

    async fn heartbeat(
        &self,
        owner: &str,
        now: DateTime<Utc>,
        alive_since: DateTime<Utc>,
    ) -> Result<usize, StoreError> {
        // One transaction on the scheduler's own connection, so that it
        // does not make `changed` answer yes.
        use sqlx::Connection;
        let mut watch = self.watch.lock().await;
        let mut tx = watch.connection().await?.begin().await?;
        let others = write_heartbeat(&mut tx, owner, now, alive_since).await?;
        tx.commit().await?;
        Ok(others)
    }

    async fn changed(&self) -> Result<bool, StoreError> {
        let mut watch = self.watch.lock().await;
        let version: i64 = sqlx::query_scalar("PRAGMA data_version")
            .fetch_one(watch.connection().await?)
            .await?;
        Ok(watch.version.replace(version) != Some(version))
    }
}

lifecycle_helpers!(Sqlite, sqlx::Sqlite, DIALECT);

/// Checks, without writing anything, that the SQLite file at `path` is a
/// whole tokenkeeper database that this version can open with `key`:
/// SQLite's integrity check, migrations this version knows (same versions
/// and checksums, none newer), and the key check (a sealed file opens only
/// with the key it was sealed with; a plaintext one with any key or none,
/// the daemon seals it at start). For backups before they are trusted;
/// messages call the file `name` (a check may run on a private copy).
pub async fn check_file(path: &Path, name: &str, key: Option<&SealKey>) -> Result<(), StoreError> {
    let shown = name.to_owned();
    // Immutable: no lock, no -wal/-shm created beside the file, nothing
    // written even if the file asks for a recovery.
    let options = SqliteConnectOptions::new()
        .filename(path)
        .read_only(true)
        .immutable(true);
    let mut conn = sqlx::ConnectOptions::connect(&options)
        .await
        .map_err(|source| StoreError::Open {
            path: shown.clone(),
            source,
        })?;
    let checked = check_open_file(&mut conn, &shown, key).await;
    let _ = sqlx::Connection::close(conn).await;
    checked
}

async fn check_open_file(
    conn: &mut sqlx::SqliteConnection,
    shown: &str,
    key: Option<&SealKey>,
) -> Result<(), StoreError> {
    let not_ours = |detail: String| {
        StoreError::NotADatabase(format!(
            "{shown} is not a tokenkeeper database ({detail}); choose a backup file made by `tokenkeeper backup` (tokenkeeper-*.db)"
        ))
    };
    let verdict: Vec<String> = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_all(&mut *conn)
        .await
        .map_err(|e| not_ours(e.to_string()))?;
    if verdict.first().map(String::as_str) != Some("ok") {
        return Err(StoreError::NotADatabase(format!(
            "{shown} fails SQLite's integrity check ({}); it is damaged, choose an older backup",
            verdict.first().map_or("no answer", String::as_str)
        )));
    }
    let applied: Vec<(i64, Vec<u8>)> = sqlx::query_as(
        "SELECT version, checksum FROM _sqlx_migrations WHERE success ORDER BY version",
    )
    .fetch_all(&mut *conn)
    .await
    .map_err(|_| not_ours("it has no tokenkeeper migrations".into()))?;
    if applied.is_empty() {
        return Err(not_ours("it has no tokenkeeper migrations".into()));
    }
    let known = sqlx::migrate!("./migrations/sqlite");
    for (version, checksum) in &applied {
        match known.iter().find(|m| m.version == *version) {
            None => {
                return Err(StoreError::NewerVersion {
                    path: shown.to_owned(),
                    version: *version,
                })
            }
            Some(m) if m.checksum.as_ref() != checksum.as_slice() => {
                return Err(not_ours(format!(
                    "its migration {version} differs from this version's"
                )))
            }
            Some(_) => {}
        }
    }
    let check: Option<Vec<u8>> =
        sqlx::query_scalar("SELECT value FROM installation WHERE name = 'key_check'")
            .fetch_optional(&mut *conn)
            .await
            .map_err(|e| not_ours(e.to_string()))?;
    let check = check.map(|v| String::from_utf8_lossy(&v).into_owned());
    match (key, check) {
        (None, Some(_)) => Err(StoreError::KeyRequired),
        (Some(key), Some(c)) => key
            .open(&c, codec::KEY_CHECK_CONTEXT)
            .map(|_| ())
            .map_err(|_| StoreError::WrongKey),
        (_, None) => Ok(()),
    }
}

/// Cause and fix of an SQLite failure, if it is one an operator can fix.
pub(super) fn problem_of(e: &sqlx::Error) -> Option<&'static str> {
    let sqlx::Error::Database(d) = e else {
        return None;
    };
    d.try_downcast_ref::<sqlx::sqlite::SqliteError>()?;
    sqlite_problem(d.code().as_deref())
}

/// Why a database could not be opened, with the fix; the generic fix
/// when SQLite's code says nothing more specific.
pub(super) fn describe_open(e: &sqlx::Error) -> String {
    match problem_of(e) {
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
    use crate::store::{Db, Store};
    use secrecy::ExposeSecret;
    use std::time::Duration;

    /// The SQLite pool behind `store`.
    fn pool(store: &Store) -> &SqlitePool {
        match store.backend() {
            Db::Sqlite(s) => s.pool(),
            Db::Postgres(_) => unreachable!("an SQLite store"),
        }
    }

    fn unreadable(store: &Store, id: i64) -> bool {
        match store.backend() {
            Db::Sqlite(s) => s.codec.is_unreadable(id),
            Db::Postgres(_) => unreachable!("an SQLite store"),
        }
    }

    fn none_unreadable(store: &Store) -> bool {
        match store.backend() {
            Db::Sqlite(s) => s.codec.none_unreadable(),
            Db::Postgres(_) => unreachable!("an SQLite store"),
        }
    }

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
            meta: None,
        };
        store
            .save_authorized("keap", "default", &new, &[], &[])
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
        sqlx::query(sql).execute(pool(store)).await.unwrap();
    }

    #[tokio::test]
    async fn swapped_columns_and_replayed_values_do_not_open() {
        let dir = tempfile::tempdir().unwrap();
        let (store, row) = store_with_grant(dir.path(), Some(key())).await;
        assert_eq!(row.access_token.expose_secret(), "access-1");
        assert!(none_unreadable(&store));

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
        assert!(unreadable(&store, row.id));
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
        assert!(none_unreadable(&store));

        // Replay: a value sealed for generation 1, put back after a commit.
        let old: String = sqlx::query_scalar("SELECT refresh_token FROM connections")
            .fetch_one(pool(&store))
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
            .execute(pool(&store))
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
            .execute(pool(&store))
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
            .fetch_one(pool(&store))
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
        assert!(unreadable(&store, row.id));
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
        tokio::time::sleep(crate::store::WRITE_PROBE_REUSE).await;
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
                .fetch_one(pool(&store))
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
                    meta: None,
                },
                &[],
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
            .reject_attempt(row.id, ("b", "b1"), read.generation, "rejected", 0, &[])
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
}
