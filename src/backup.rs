//! Backups of an SQLite store (SPEC 14) and the daemon's calendar jobs.
//!
//! A backup is a consistent online snapshot ([`Store::snapshot_into`],
//! SQLite's `VACUUM INTO`: never a file copy of a live WAL database),
//! written 0600 into `backup.dir` (0700) as `tokenkeeper-<UTC time>.db`
//! beside `<name>.sha256` (the `sha256sum` format), verified by opening it
//! ([`crate::store::check_file`]: integrity, migrations, and the key check,
//! so with encryption on the backup stays sealed and opens only with the
//! configured key), then the oldest beyond `backup.keep` are removed (only
//! files with our name pattern). A restore checks a copy of the file the
//! same way, and its checksum when one is beside it, before anything is
//! replaced; the previous database is kept aside.
//!
//! The calendar ([`Calendar`], `tokio-cron-scheduler`) runs what is
//! calendar-shaped: the backup schedule and the purge of expired pending
//! authorizations. Token fingerprints need no purge: the store keeps the
//! newest [`crate::store::FINGERPRINTS_KEPT`] per connection and kind at
//! every write and drops them with their connection.
//!
//! Must not: write into the live database, or remove a file in
//! `backup.dir` that does not carry our name pattern.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use tokio_cron_scheduler::{Job, JobScheduler};

use crate::config::BackupConfig;
use crate::crypto::SealKey;
use crate::notify::{Event, EventKind};
use crate::refresh::Engine;
use crate::store::{Store, StoreError};

/// Gauge: UNIX time of the last backup that was written and verified.
pub const BACKUP_LAST_SUCCESS: &str = "tokenkeeper_backup_last_success_timestamp_seconds";
/// Counter: scheduled or requested backups that failed.
pub const BACKUP_FAILURES_TOTAL: &str = "tokenkeeper_backup_failures_total";

/// When expired pending authorizations are purged: every ten minutes, at
/// second 17 so it does not coincide with backups scheduled on the minute.
/// They live minutes; a few stale rows in between cost nothing.
pub const PURGE_SCHEDULE: &str = "17 */10 * * * *";

/// How long the daemon's stop waits for a backup that is being written.
/// A snapshot of a store of 10,000 connections takes well under a second.
pub const STOP_WAIT: Duration = Duration::from_secs(30);

const PREFIX: &str = "tokenkeeper-";
const SUFFIX: &str = ".db";
const CHECKSUM_SUFFIX: &str = ".sha256";
/// `20261130T020000.123Z`: sorts by time as text.
const STAMP: &str = "%Y%m%dT%H%M%S%.3fZ";

/// Why a backup or a restore did not happen.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("cannot use the backup directory {dir} ({source}); create it, or give the service user write access to it (backup.dir)")]
    Dir { dir: String, source: std::io::Error },
    #[error("{0}")]
    UnsafeDir(String),
    #[error("cannot write {path} ({source}); check free space and permissions")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("the snapshot into {path} failed: {source}")]
    Snapshot { path: String, source: StoreError },
    #[error("the new backup did not verify and was removed: {0}")]
    Unverified(StoreError),
    #[error("cannot read {path} ({source}); give the path of a backup file (tokenkeeper-*.db)")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} does not match its checksum file {sum}: it was damaged or changed since it was made; choose another backup (nothing was changed)")]
    ChecksumMismatch { path: String, sum: String },
    #[error("the checksum file {sum} is not in the `sha256sum` format; remove it or choose another backup (nothing was changed)")]
    ChecksumUnreadable { sum: String },
    #[error("{companion} lies beside {path}: that file was copied from a live database (some of its commits may be only in the -wal), not made by `tokenkeeper backup`, which writes a single file; restore a file made by `tokenkeeper backup` (nothing was changed)")]
    LiveCopy { path: String, companion: String },
    #[error("nothing was restored, the current database is unchanged: {source}")]
    Invalid { path: String, source: StoreError },
    #[error(
        "the daemon is stopping; no backup was made, run `tokenkeeper backup` once it is stopped"
    )]
    Stopping,
    #[error("the calendar jobs cannot start: {0}")]
    Scheduler(String),
}

/// A backup written and verified.
#[derive(Debug, Clone)]
pub struct Made {
    pub path: PathBuf,
    /// Lower-case hex SHA-256 of the file, as in its checksum file.
    pub sha256: String,
    pub bytes: u64,
    /// Older backups removed to keep `backup.keep`.
    pub removed: Vec<PathBuf>,
}

/// Makes backups for one configuration; one at a time.
pub struct Backups {
    config: BackupConfig,
    key: Option<SealKey>,
    /// Held while a backup is written: the schedule and `POST /v1/backup`
    /// take turns, and the daemon's stop waits for it.
    running: tokio::sync::Mutex<()>,
    /// Set by the daemon's stop: a job that fired just before it must not
    /// start a backup while the database closes.
    stopping: std::sync::atomic::AtomicBool,
}

/// Reads a `backup.schedule` value: a classic five-field cron expression
/// (minute hour day-of-month month day-of-week) or the scheduler's own six
/// fields with seconds first. Returns the six-field form the scheduler
/// takes, or a sentence with the fix.
pub fn check_schedule(expr: &str) -> Result<String, String> {
    let six = match expr.split_whitespace().count() {
        5 => format!("0 {}", expr.trim()),
        6 => expr.trim().to_string(),
        _ => String::new(),
    };
    if six.is_empty() || Job::new_async(six.as_str(), |_, _| Box::pin(async {})).is_err() {
        return Err(format!(
            "`{expr}` is not a cron expression: five fields (minute hour day-of-month month day-of-week), or six with seconds first, evaluated in UTC, e.g. \"0 3 * * *\" for 03:00 every day"
        ));
    }
    Ok(six)
}

impl Backups {
    /// Backups per `config`, verified with `key` (the store's).
    pub fn new(config: BackupConfig, key: Option<SealKey>) -> Backups {
        Backups {
            config,
            key,
            running: tokio::sync::Mutex::new(()),
            stopping: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &BackupConfig {
        &self.config
    }

    /// Writes a backup of `store` now, verifies it, then removes the
    /// oldest beyond `keep`. A failed backup leaves no partial file.
    pub async fn make(&self, store: &Store) -> Result<Made, BackupError> {
        let _turn = self.running.lock().await;
        if self.stopping.load(std::sync::atomic::Ordering::Acquire) {
            return Err(BackupError::Stopping);
        }
        let dir = &self.config.dir;
        let dir_error = |source| BackupError::Dir {
            dir: dir.display().to_string(),
            source,
        };
        crate::store::create_private_dir(dir).map_err(dir_error)?;
        check_dir(dir).map_err(BackupError::UnsafeDir)?;
        let name = backup_name(Utc::now());
        let path = dir.join(&name);
        let partial = dir.join(format!(".{name}.partial"));
        let _ = std::fs::remove_file(&partial);
        // Created 0600 before SQLite writes into it (VACUUM INTO accepts an
        // empty file), so the backup is never readable by others.
        create_private_file(&partial).map_err(|source| write_error(&partial, source))?;
        let done = self.fill(store, &partial, &path, &name).await;
        if done.is_err() {
            let _ = std::fs::remove_file(&partial);
        }
        let (sha256, bytes) = done?;
        let removed = prune(dir, self.config.keep, &name);
        Ok(Made {
            path,
            sha256,
            bytes,
            removed,
        })
    }

    async fn fill(
        &self,
        store: &Store,
        partial: &Path,
        path: &Path,
        name: &str,
    ) -> Result<(String, u64), BackupError> {
        store
            .snapshot_into(partial)
            .await
            .map_err(|source| BackupError::Snapshot {
                path: partial.display().to_string(),
                source,
            })?;
        crate::store::check_file(partial, &path.display().to_string(), self.key.as_ref())
            .await
            .map_err(BackupError::Unverified)?;
        let (sha256, bytes) = sha256_of(partial).map_err(|source| write_error(partial, source))?;
        std::fs::File::open(partial)
            .and_then(|f| f.sync_all())
            .map_err(|source| write_error(partial, source))?;
        std::fs::rename(partial, path).map_err(|source| write_error(path, source))?;
        let sum = checksum_path(path);
        write_private_atomically(&sum, format!("{sha256}  {name}\n").as_bytes())
            .map_err(|source| write_error(&sum, source))?;
        if let Some(dir) = path.parent() {
            sync_dir(dir);
        }
        Ok((sha256, bytes))
    }

    /// Refuses new backups, then waits (at most [`STOP_WAIT`]) for one
    /// being written to finish.
    pub async fn stop(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::Release);
        let _ = tokio::time::timeout(STOP_WAIT, self.running.lock()).await;
    }
}

/// Refuses a backup directory another user could write into or owns: such
/// a user could remove or replace a backup (a restore would then put their
/// file in place) or read the next one through a link. `Ok` when `dir`
/// does not exist yet (it is created 0700) or cannot be looked at. The sentence names the
/// directory and the fix.
pub fn check_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    // A directory that cannot be looked at is reported by the attempt to
    // create or write it, with the cause ([`BackupError::Dir`]).
    let Ok(meta) = std::fs::metadata(dir) else {
        return Ok(());
    };
    if !meta.is_dir() {
        return Err(format!(
            "the backup directory {} is not a directory; give the path of a directory (backup.dir)",
            dir.display()
        ));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(format!(
            "the backup directory {} belongs to another user (uid {}), who could replace or remove backups; use a directory owned by this service's user (uid {me}), mode 0700 (backup.dir)",
            dir.display(),
            meta.uid()
        ));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(format!(
            "the backup directory {} is writable by other users (mode {mode:04o}), who could replace or remove backups; run `chmod 700 {}` (backup.dir)",
            dir.display(),
            dir.display()
        ));
    }
    Ok(())
}

/// The file name of a backup made at `at`.
fn backup_name(at: DateTime<Utc>) -> String {
    format!("{PREFIX}{}{SUFFIX}", at.format(STAMP))
}

/// Whether `name` is one of ours: exactly `tokenkeeper-<stamp>.db`.
fn is_backup_name(name: &str) -> bool {
    name.strip_prefix(PREFIX)
        .and_then(|r| r.strip_suffix(SUFFIX))
        .is_some_and(|stamp| {
            chrono::NaiveDateTime::parse_from_str(stamp.trim_end_matches('Z'), "%Y%m%dT%H%M%S%.3f")
                .is_ok()
                && stamp.len() == "20261130T020000.123Z".len()
        })
}

fn checksum_path(backup: &Path) -> PathBuf {
    let mut name = backup.as_os_str().to_owned();
    name.push(CHECKSUM_SUFFIX);
    PathBuf::from(name)
}

/// Removes the oldest backups (and their checksum files) beyond `keep`;
/// returns what was removed. Files without our name pattern are never
/// touched. A file that cannot be removed is logged and left.
fn prune(dir: &Path, keep: u32, just_made: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| is_backup_name(n))
        .collect();
    names.sort_unstable_by(|a, b| b.cmp(a));
    // The backup just made counts first whatever its name says: after the
    // clock was set back it would sort oldest and go at once.
    if let Some(i) = names.iter().position(|n| n == just_made) {
        let made = names.remove(i);
        names.insert(0, made);
    }
    let mut removed = Vec::new();
    for name in names.into_iter().skip(keep as usize) {
        let path = dir.join(&name);
        match std::fs::remove_file(&path) {
            Ok(()) => {
                let _ = std::fs::remove_file(checksum_path(&path));
                removed.push(path);
            }
            Err(e) => tracing::warn!(
                file = %path.display(),
                error = %e,
                "cannot remove an old backup"
            ),
        }
    }
    removed
}

/// What a restore did.
#[derive(Debug, Clone)]
pub struct Restored {
    /// Where the database that was replaced now is, if there was one.
    pub aside: Option<PathBuf>,
    /// Whether a checksum file was found and matched.
    pub checksum_checked: bool,
}

/// Puts the backup `file` in place as the SQLite database `db`. The caller
/// holds the store lock exclusively (no daemon runs). A copy is made next
/// to `db` and checked (checksum when `<file>.sha256` exists, integrity,
/// migrations, `key`) before anything is replaced; then the current
/// database (with its -wal and -shm) is moved aside to
/// `<db>.before-restore-<time>` and the copy renamed into place, 0600.
pub async fn restore(
    file: &Path,
    db: &Path,
    key: Option<&SealKey>,
) -> Result<Restored, BackupError> {
    let dir = db.parent().unwrap_or(Path::new("."));
    crate::store::create_private_dir(dir).map_err(|source| BackupError::Dir {
        dir: dir.display().to_string(),
        source,
    })?;
    let db_name = db
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "tokenkeeper.db".into());
    let copy = dir.join(format!(".{db_name}.restoring"));
    let checked = copy_and_check(file, &copy, key).await;
    let checksum_checked = match checked {
        Ok(c) => c,
        Err(e) => {
            let _ = std::fs::remove_file(&copy);
            return Err(e);
        }
    };
    let aside = if db.exists() {
        let stamp = Utc::now().format("%Y%m%dT%H%M%SZ");
        // Never over an earlier copy put aside (two restores in a second).
        let aside = (0..)
            .map(|n: u32| match n {
                0 => PathBuf::from(format!("{}.before-restore-{stamp}", db.display())),
                n => PathBuf::from(format!("{}.before-restore-{stamp}-{n}", db.display())),
            })
            .find(|p| !p.exists())
            .unwrap_or_else(|| PathBuf::from(format!("{}.before-restore", db.display())));
        // Every rename done is undone if a later one fails, so that a
        // failed restore leaves the database where it was, never nothing
        // (a daemon started then would create an empty one).
        let mut moved: Vec<(PathBuf, PathBuf)> = Vec::new();
        let undo = |moved: &[(PathBuf, PathBuf)]| {
            for (from, to) in moved.iter().rev() {
                let _ = std::fs::rename(to, from);
            }
        };
        std::fs::rename(db, &aside).map_err(|source| write_error(&aside, source))?;
        moved.push((db.to_path_buf(), aside.clone()));
        // The -wal of a database that was not closed cleanly holds some of
        // its commits: it goes aside with it; the -shm is only an index.
        for ext in ["-wal", "-journal"] {
            let from = PathBuf::from(format!("{}{ext}", db.display()));
            if from.exists() {
                let to = PathBuf::from(format!("{}{ext}", aside.display()));
                if let Err(source) = std::fs::rename(&from, &to) {
                    undo(&moved);
                    let _ = std::fs::remove_file(&copy);
                    return Err(write_error(&to, source));
                }
                moved.push((from, to));
            }
        }
        if let Err(source) = std::fs::rename(&copy, db) {
            undo(&moved);
            let _ = std::fs::remove_file(&copy);
            return Err(write_error(db, source));
        }
        let _ = std::fs::remove_file(format!("{}-shm", db.display()));
        Some(aside)
    } else {
        std::fs::rename(&copy, db).map_err(|source| write_error(db, source))?;
        None
    };
    sync_dir(dir);
    Ok(Restored {
        aside,
        checksum_checked,
    })
}

/// Copies `file` to `copy` (0600, synced) and checks the copy; returns
/// whether a checksum file was there to compare with.
async fn copy_and_check(
    file: &Path,
    copy: &Path,
    key: Option<&SealKey>,
) -> Result<bool, BackupError> {
    let read_error = |source| BackupError::Read {
        path: file.display().to_string(),
        source,
    };
    let meta = std::fs::metadata(file).map_err(read_error)?;
    if !meta.is_file() {
        return Err(read_error(std::io::Error::other("not a regular file")));
    }
    // A backup is one self-contained file (VACUUM INTO); a -wal or -shm
    // beside it means a live database's files were copied, and restoring
    // the main file alone would lose what only the -wal holds.
    for ext in ["-wal", "-shm"] {
        let companion = PathBuf::from(format!("{}{ext}", file.display()));
        if std::fs::symlink_metadata(&companion).is_ok() {
            return Err(BackupError::LiveCopy {
                path: file.display().to_string(),
                companion: companion.display().to_string(),
            });
        }
    }
    let _ = std::fs::remove_file(copy);
    let mut input = std::fs::File::open(file).map_err(read_error)?;
    let mut output = create_private_file(copy).map_err(|source| write_error(copy, source))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = input.read(&mut buf).map_err(read_error)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        output
            .write_all(&buf[..n])
            .map_err(|source| write_error(copy, source))?;
    }
    output
        .sync_all()
        .map_err(|source| write_error(copy, source))?;
    drop(output);
    let digest = hex(&hasher.finalize());
    let sum = checksum_path(file);
    let checksum_checked = match std::fs::read_to_string(&sum) {
        Ok(text) => {
            let expected = text.split_whitespace().next().unwrap_or("");
            if expected.len() != 64 || !expected.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(BackupError::ChecksumUnreadable {
                    sum: sum.display().to_string(),
                });
            }
            if !expected.eq_ignore_ascii_case(&digest) {
                return Err(BackupError::ChecksumMismatch {
                    path: file.display().to_string(),
                    sum: sum.display().to_string(),
                });
            }
            true
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(source) => {
            return Err(BackupError::Read {
                path: sum.display().to_string(),
                source,
            })
        }
    };
    let shown = file.display().to_string();
    crate::store::check_file(copy, &shown, key)
        .await
        .map_err(|source| BackupError::Invalid {
            path: shown.clone(),
            source: match source {
                StoreError::WrongKey => StoreError::NotADatabase(format!(
                    "{shown} was sealed with another key than storage.encryption_key_file; set it to the key the backup was made with"
                )),
                StoreError::KeyRequired => StoreError::NotADatabase(format!(
                    "{shown} holds encrypted tokens; set storage.encryption_key_file to the key the backup was made with"
                )),
                other => other,
            },
        })?;
    Ok(checksum_checked)
}

fn write_error(path: &Path, source: std::io::Error) -> BackupError {
    BackupError::Write {
        path: path.display().to_string(),
        source,
    }
}

/// A new file, mode 0600, truncated if it exists.
fn create_private_file(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    // A stale temporary (a crash) is removed first; then the file must be
    // new and not a link someone planted in its place, so nothing outside
    // the backup directory is ever truncated or written.
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let f = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    // Whatever the umask.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    Ok(f)
}

/// Writes `bytes` to `path` through a synced temporary file and a rename.
fn write_private_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".partial");
    let tmp = PathBuf::from(tmp);
    let mut f = create_private_file(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Makes renames in `dir` durable; best effort (some file systems refuse).
fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

fn sha256_of(path: &Path) -> std::io::Result<(String, u64)> {
    let mut f = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let bytes = std::io::copy(&mut f, &mut hasher)?;
    Ok((hex(&hasher.finalize()), bytes))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// The daemon's calendar jobs; stopped with [`Calendar::stop`].
pub struct Calendar {
    scheduler: JobScheduler,
    backups: Option<Arc<Backups>>,
}

impl Calendar {
    /// Starts the purge job, and the backup job when `backups` is set.
    /// Failures of a job are logged (a failed backup at error level,
    /// counted and notified as `backup_failed`); they never stop the
    /// daemon.
    pub async fn start(
        engine: Engine,
        backups: Option<Arc<Backups>>,
    ) -> Result<Calendar, BackupError> {
        let sched =
            |e: tokio_cron_scheduler::JobSchedulerError| BackupError::Scheduler(e.to_string());
        let scheduler = JobScheduler::new().await.map_err(sched)?;
        let store = engine.store().clone();
        let purge = Job::new_async(PURGE_SCHEDULE, move |_, _| {
            let store = store.clone();
            Box::pin(async move {
                match store.purge_expired_pending(Utc::now()).await {
                    Ok(0) => {}
                    Ok(n) => tracing::debug!(removed = n, "purged expired pending authorizations"),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot purge expired pending authorizations")
                    }
                }
            })
        })
        .map_err(sched)?;
        scheduler.add(purge).await.map_err(sched)?;
        if let Some(b) = &backups {
            metrics::describe_gauge!(
                BACKUP_LAST_SUCCESS,
                "UNIX time of the last backup written and verified"
            );
            metrics::describe_counter!(BACKUP_FAILURES_TOTAL, "Backups that failed");
            metrics::counter!(BACKUP_FAILURES_TOTAL).absolute(0);
            let schedule = b.config.schedule.clone();
            let b = b.clone();
            let job = Job::new_async(schedule, move |_, _| {
                let (b, engine) = (b.clone(), engine.clone());
                Box::pin(async move {
                    let _ = run_logged(&b, &engine).await;
                })
            })
            .map_err(sched)?;
            scheduler.add(job).await.map_err(sched)?;
        }
        scheduler.start().await.map_err(sched)?;
        Ok(Calendar { scheduler, backups })
    }

    /// Stops every job and waits (bounded) for a backup being written.
    pub async fn stop(mut self) {
        if let Err(e) = self.scheduler.shutdown().await {
            tracing::warn!(error = %e, "the calendar jobs did not stop cleanly");
        }
        if let Some(b) = &self.backups {
            b.stop().await;
        }
    }
}

/// Makes a backup and reports it: logged, the metrics updated, and a
/// failure notified. What the schedule and `POST /v1/backup` both run.
pub async fn run_logged(backups: &Backups, engine: &Engine) -> Result<Made, BackupError> {
    match backups.make(engine.store()).await {
        Ok(made) => {
            metrics::gauge!(BACKUP_LAST_SUCCESS).set(Utc::now().timestamp() as f64);
            tracing::info!(
                file = %made.path.display(),
                bytes = made.bytes,
                removed = made.removed.len(),
                "backup written and verified"
            );
            Ok(made)
        }
        Err(BackupError::Stopping) => {
            tracing::info!("a scheduled backup was skipped: the daemon is stopping");
            Err(BackupError::Stopping)
        }
        Err(e) => {
            metrics::counter!(BACKUP_FAILURES_TOTAL).increment(1);
            tracing::error!(error = %e, "backup failed");
            engine.settings().notifier.emit(Event {
                event: EventKind::BackupFailed,
                provider: String::new(),
                account: String::new(),
                message: format!("backup failed: {e}"),
            });
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_sort_by_time_and_only_ours_match() {
        let a = backup_name(DateTime::from_timestamp(1_700_000_000, 5_000_000).unwrap());
        let b = backup_name(DateTime::from_timestamp(1_700_000_001, 0).unwrap());
        assert!(a < b, "{a} < {b}");
        assert!(is_backup_name(&a) && is_backup_name(&b));
        for other in [
            "tokenkeeper.db",
            "tokenkeeper-.db",
            "tokenkeeper-20261130T020000.123Z.db.sha256",
            "tokenkeeper-notatime.db",
            "my-tokenkeeper-20261130T020000.123Z.db",
            ".tokenkeeper-20261130T020000.123Z.db.partial",
        ] {
            assert!(!is_backup_name(other), "{other}");
        }
    }

    #[test]
    fn schedules_take_five_or_six_fields() {
        assert_eq!(check_schedule("* * * * * *").unwrap(), "* * * * * *");
        assert_eq!(check_schedule("0 0 3 * * *").unwrap(), "0 0 3 * * *");
        assert_eq!(check_schedule(" 0 3 * * * ").unwrap(), "0 0 3 * * *");
        for bad in ["", "3 * * *", "every day", "61 * * * * *", "0 25 * * *"] {
            let e = check_schedule(bad).unwrap_err();
            assert!(e.contains("five fields"), "{bad}: {e}");
        }
    }

    /// After the clock was set back the backup just made has the oldest
    /// name: it is kept, the oldest of the others goes.
    #[test]
    fn prune_never_removes_the_backup_just_made() {
        let dir = tempfile::tempdir().unwrap();
        let names: Vec<String> = (0..3)
            .map(|s| backup_name(DateTime::from_timestamp(1_700_000_000 + s, 0).unwrap()))
            .collect();
        for n in &names {
            std::fs::write(dir.path().join(n), b"x").unwrap();
        }
        let removed = prune(dir.path(), 2, &names[0]);
        assert_eq!(removed, vec![dir.path().join(&names[1])]);
        assert!(dir.path().join(&names[0]).exists());
        assert!(dir.path().join(&names[2]).exists());
    }

    /// A link planted where a temporary goes is replaced, never written
    /// through.
    #[test]
    fn a_planted_link_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let tmp = dir.path().join(".t.partial");
        std::os::unix::fs::symlink(&victim, &tmp).unwrap();
        let mut f = create_private_file(&tmp).unwrap();
        f.write_all(b"backup").unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert!(!std::fs::symlink_metadata(&tmp)
            .unwrap()
            .file_type()
            .is_symlink());
    }

    #[test]
    fn prune_keeps_the_newest_and_leaves_other_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut names = Vec::new();
        for s in 0..5 {
            let n = backup_name(DateTime::from_timestamp(1_700_000_000 + s, 0).unwrap());
            std::fs::write(dir.path().join(&n), b"x").unwrap();
            std::fs::write(checksum_path(&dir.path().join(&n)), b"x").unwrap();
            names.push(n);
        }
        std::fs::write(dir.path().join("notes.txt"), b"keep me").unwrap();
        let removed = prune(dir.path(), 2, "");
        assert_eq!(removed.len(), 3);
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        let mut want = vec![
            names[3].clone(),
            format!("{}.sha256", names[3]),
            names[4].clone(),
            format!("{}.sha256", names[4]),
            "notes.txt".to_string(),
        ];
        want.sort();
        assert_eq!(left, want);
    }
}
