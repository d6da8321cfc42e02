//! Token files (SPEC 12): the served access token mirrored into files, for
//! programs that cannot call HTTP (a cron job, a PHP app, `curl -H @file`).
//!
//! Each `[[providers.NAME.sinks]]` gets a task of its own, woken by the
//! engine's change counter ([`Engine::token_changes`], which moves when a
//! served token changes, not when only a state does): it reads the token
//! the connection serves now ([`Engine::current_token`]: after the commit
//! that produced it, never anything else) and, when it differs from what
//! it last wrote, replaces the file atomically ([`write_atomic`]: a
//! temporary file in the same directory, created with the final mode and
//! never through a symbolic link, written, fsynced, renamed over the path,
//! then the directory fsynced), then wakes the sink's `command`, if any,
//! which runs on a task of its own so that a hanging command never delays
//! the next write. When the connection is revoked or forgotten the file is
//! removed, so it never offers a token that is no longer the grant's.
//! The writes run on the blocking pool, so a slow or full disk delays only
//! its own sink, never the engine or the token endpoint. A write that
//! fails is logged with the path, counted in
//! `tokenkeeper_sink_failures_total`, notified once (`sink_failed`), and
//! retried every `refresh.check_interval` until it lands.
//!
//! Must not: decide anything about refreshes, write anything but the
//! formatted token, follow a symbolic link at the path, or log a token.

use std::ffi::CString;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use secrecy::{ExposeSecret, SecretString};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::notify::{Event, EventKind};
use crate::refresh::{Engine, IssuedToken};

/// Counter: failed token-file writes and failed sink commands, by
/// `provider`, `account` and `path`.
pub const SINK_FAILURES_TOTAL: &str = "tokenkeeper_sink_failures_total";

/// How long a sink's `command` may run by default before it is killed: as
/// long as a notify command may.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the last writes may take at shutdown (a refresh that landed
/// during the stop is still written out).
pub const FINAL_WRITE_BOUND: Duration = Duration::from_secs(5);

/// `PATH` for the command when the daemon itself has none.
const FALLBACK_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// What a token file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkFormat {
    /// The bare access token, no newline.
    Token,
    /// `Authorization: <token_type> <token>` (as `tokenkeeper header`), no
    /// newline.
    Header,
    /// `KEY=value` lines: `ACCESS_TOKEN`, `TOKEN_TYPE`, `EXPIRES_AT`
    /// (RFC 3339), `EXPIRES_AT_UNIX` (seconds), `PROVIDER`, `ACCOUNT`.
    Env,
    /// The `GET /v1/token` body, byte for byte as of the write.
    Json,
}

impl SinkFormat {
    /// Every format's name, for messages.
    pub const NAMES: &'static str = "\"token\", \"header\", \"env\", \"json\"";

    /// The format named `name` in the config.
    pub fn from_name(name: &str) -> Option<SinkFormat> {
        Some(match name {
            "token" => SinkFormat::Token,
            "header" => SinkFormat::Header,
            "env" => SinkFormat::Env,
            "json" => SinkFormat::Json,
            _ => return None,
        })
    }
}

/// One token file (`[[providers.NAME.sinks]]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkConfig {
    pub provider: String,
    /// Default `default`.
    pub account: String,
    /// Absolute; its directory exists and is not the state directory.
    pub path: PathBuf,
    pub format: SinkFormat,
    /// Permission bits (default `0o600`), applied whatever the umask.
    pub mode: u32,
    /// Group the file is given (`chown :group`).
    pub group: Option<u32>,
    /// Program and arguments run after each write (no shell).
    pub command: Option<Vec<String>>,
    pub command_timeout: Duration,
}

/// Reads a `mode` value: an octal string of permission bits, `"0600"`,
/// `"640"`.
pub fn parse_mode(s: &str) -> Result<u32, String> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    match u32::from_str_radix(digits, 8) {
        Ok(m) if !digits.is_empty() && m <= 0o777 => Ok(m),
        _ => Err(format!(
            "\"{s}\" is not a file mode; write permission bits in octal as a string, e.g. \"0600\" or \"0640\""
        )),
    }
}

/// Checks that a token file's `mode` keeps the token to its owner and,
/// at most, lets the `group` read it: a bit for other users would hand the
/// token to every account on the machine, and a group write bit would let
/// a group member put something else in the file, which SPEC 12 says
/// never holds anything but the token.
pub fn check_mode(mode: u32) -> Result<(), String> {
    if mode & 0o007 != 0 {
        return Err(format!(
            "mode \"{mode:04o}\" lets every user on this machine read or change the token; use \"0600\", or \"0640\" with group = the reading program's group"
        ));
    }
    if mode & 0o020 != 0 {
        return Err(format!(
            "mode \"{mode:04o}\" lets the group write the token file, which must hold nothing but the token; use \"0640\" (the group may read)"
        ));
    }
    Ok(())
}

/// The gid of group `name` (a name, or a number), from the system's group
/// database.
pub fn resolve_group(name: &str) -> Result<u32, String> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    let unknown = || format!("no group named \"{name}\" on this system; create it or use a gid");
    let c = CString::new(name).map_err(|_| unknown())?;
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: getgrnam_r writes only into `grp` and `buf` (whose length is
    // passed), and sets `result` to null or to `&grp`.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::group = std::ptr::null_mut();
    let rc = unsafe {
        libc::getgrnam_r(
            c.as_ptr(),
            &mut grp,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() {
        return Err(unknown());
    }
    Ok(grp.gr_gid)
}

/// What `format` writes for `token`, `now` being the time of the write
/// (for the JSON body's `expires_in`).
pub fn render(format: SinkFormat, token: &IssuedToken, now: DateTime<Utc>) -> SecretString {
    let access = token.access_token.expose_secret();
    let scheme = Some(token.token_type.as_str())
        .filter(|t| !t.is_empty())
        .unwrap_or("Bearer");
    let text = match format {
        SinkFormat::Token => access.to_string(),
        SinkFormat::Header => format!("Authorization: {scheme} {access}"),
        SinkFormat::Env => format!(
            "ACCESS_TOKEN={}\nTOKEN_TYPE={}\nEXPIRES_AT={}\nEXPIRES_AT_UNIX={}\nPROVIDER={}\nACCOUNT={}\n",
            env_value(access),
            env_value(scheme),
            token.expires_at.to_rfc3339_opts(SecondsFormat::Secs, true),
            token.expires_at.timestamp(),
            env_value(&token.provider),
            env_value(&token.account),
        ),
        SinkFormat::Json => {
            let body = crate::http::answers::TokenBody {
                access_token: access.to_string(),
                token_type: token.token_type.clone(),
                expires_at: token.expires_at,
                expires_in: (token.expires_at - now).num_seconds().max(0),
                provider: token.provider.clone(),
                account: token.account.clone(),
                extra: token.extra.extra.clone(),
            };
            // A struct of strings and numbers always serialises.
            serde_json::to_string(&body).unwrap_or_default()
        }
    };
    SecretString::from(text)
}

/// A value as shells, systemd's `EnvironmentFile=` and dotenv readers all
/// read it: bare when it only holds characters none of them treat
/// specially, else single-quoted (a `'` inside becomes `'\''`).
fn env_value(v: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-._~+/=:@%,".contains(c);
    if !v.is_empty() && v.chars().all(plain) {
        v.to_string()
    } else {
        format!("'{}'", v.replace('\'', r"'\''"))
    }
}

/// Replaces the file at `path` with `contents`, atomically: the directory
/// is opened once (never through a symbolic link) and every step after
/// that is relative to that open directory, so renaming or replacing a
/// directory on the path meanwhile cannot redirect the write. A temporary
/// file is created in it (exclusively, never through a link, with `mode`
/// and `gid` set before anything is written), written and fsynced, renamed
/// over the file name (which replaces a symbolic link planted there instead
/// of following it), then the directory fsynced so the rename survives a
/// crash. Returns whether a symbolic link stood at `path`.
pub fn write_atomic(
    path: &Path,
    contents: &[u8],
    mode: u32,
    gid: Option<u32>,
) -> std::io::Result<bool> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::io::{AsRawFd, FromRawFd};
    let invalid =
        |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, what.to_string());
    let dir_path = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .ok_or_else(|| invalid("the path has no directory"))?;
    let name = path
        .file_name()
        .ok_or_else(|| invalid("the path has no file name"))?;
    let dir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(dir_path)?;
    let c = |n: &std::ffi::OsStr| {
        CString::new(n.as_bytes()).map_err(|_| invalid("the path holds a NUL byte"))
    };
    let final_name = c(name)?;
    // SAFETY: `st` is written by fstatat only; both pointers outlive the
    // call and the name is NUL-terminated.
    let was_link = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        libc::fstatat(
            dir.as_raw_fd(),
            final_name.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        ) == 0
            && st.st_mode & libc::S_IFMT == libc::S_IFLNK
    };
    let mut tmp_name = temp_prefix(name);
    tmp_name.push(format!("{:016x}{TEMP_SUFFIX}", rand::random::<u64>()));
    let tmp_name = c(&tmp_name)?;
    // SAFETY: a NUL-terminated name relative to an open directory; the
    // returned descriptor is owned by the File built from it right away.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            tmp_name.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is owned by nothing else.
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    let written = (|| {
        if let Some(gid) = gid {
            std::os::unix::fs::fchown(&file, None, Some(gid))?;
        }
        // After the chown (which may clear bits) and whatever the umask
        // took away at creation.
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        file.write_all(contents)?;
        file.sync_all()?;
        // SAFETY: two NUL-terminated names relative to the same open
        // directory.
        let rc = unsafe {
            libc::renameat(
                dir.as_raw_fd(),
                tmp_name.as_ptr(),
                dir.as_raw_fd(),
                final_name.as_ptr(),
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    })();
    if let Err(e) = written {
        // SAFETY: a NUL-terminated name relative to the open directory.
        unsafe { libc::unlinkat(dir.as_raw_fd(), tmp_name.as_ptr(), 0) };
        return Err(e);
    }
    dir.sync_all()?;
    Ok(was_link)
}

/// How a temporary file of [`write_atomic`] for the file `name` begins.
fn temp_prefix(name: &std::ffi::OsStr) -> std::ffi::OsString {
    let mut p = std::ffi::OsString::from(".");
    p.push(name);
    p.push(".tokenkeeper-");
    p
}

/// How a temporary file of [`write_atomic`] ends.
const TEMP_SUFFIX: &str = ".tmp";

/// Removes temporary files a crash between their creation and their rename
/// left beside `path` (they may hold a token); returns how many. Only
/// names [`write_atomic`] makes are touched, and a link is removed, never
/// followed.
pub fn remove_stale_temps(path: &Path) -> usize {
    use std::os::unix::ffi::OsStrExt;
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return 0;
    };
    let prefix = temp_prefix(name);
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| {
            let n = e.file_name();
            let n = n.as_bytes();
            n.starts_with(prefix.as_bytes()) && n.ends_with(TEMP_SUFFIX.as_bytes())
        })
        .filter(|e| std::fs::remove_file(e.path()).is_ok())
        .count()
}

/// The running sink tasks; [`Sinks::reload`] replaces them, [`Sinks::stop`]
/// ends them after a last write.
pub struct Sinks {
    engine: Engine,
    current: Mutex<Running>,
}

struct Running {
    configs: Vec<SinkConfig>,
    cancel: CancellationToken,
    /// Set at shutdown: the tasks make a last write before they end
    /// (not at a reload, where a removed sink must not be written again).
    last_write: Arc<AtomicBool>,
    tasks: TaskTracker,
}

impl Sinks {
    /// Starts a task per sink; each writes its file at once if the
    /// connection has a valid token.
    pub fn start(engine: Engine, configs: &[SinkConfig]) -> Sinks {
        let running = spawn_all(&engine, configs);
        Sinks {
            engine,
            current: Mutex::new(running),
        }
    }

    /// Applies a reloaded config: when the sinks changed, the old tasks end
    /// and new ones start (and write their files).
    pub fn reload(&self, configs: &[SinkConfig]) {
        let mut cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if cur.configs == configs {
            return;
        }
        cur.cancel.cancel();
        *cur = spawn_all(&self.engine, configs);
        tracing::info!(sinks = configs.len(), "token files reloaded");
    }

    /// Ends the tasks, each after a last write of a token that changed
    /// (bounded).
    pub async fn stop(&self) {
        let tasks = {
            let cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
            cur.last_write.store(true, Ordering::SeqCst);
            cur.cancel.cancel();
            cur.tasks.clone()
        };
        if tokio::time::timeout(FINAL_WRITE_BOUND, tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("some token files were not written before the stop");
        }
    }
}

fn spawn_all(engine: &Engine, configs: &[SinkConfig]) -> Running {
    let cancel = CancellationToken::new();
    let last_write = Arc::new(AtomicBool::new(false));
    let tasks = TaskTracker::new();
    for c in configs {
        metrics::counter!(SINK_FAILURES_TOTAL, &labels(c)).increment(0);
        tasks.spawn(run(
            engine.clone(),
            Arc::new(c.clone()),
            cancel.clone(),
            last_write.clone(),
        ));
    }
    tasks.close();
    Running {
        configs: configs.to_vec(),
        cancel,
        last_write,
        tasks,
    }
}

fn labels(c: &SinkConfig) -> [(&'static str, String); 3] {
    [
        ("provider", c.provider.clone()),
        ("account", c.account.clone()),
        ("path", c.path.display().to_string()),
    ]
}

/// What one sink task knows between wake-ups.
#[derive(Default)]
struct SinkState {
    /// The token the file holds (kept in memory, like the engine's).
    written: Option<IssuedToken>,
    /// Why the last write failed, while it does.
    failing: Option<String>,
    /// The file was removed for a connection that is gone.
    cleared: bool,
}

impl SinkState {
    fn holds(&self, t: &IssuedToken) -> bool {
        self.written.as_ref().is_some_and(|w| {
            w.expires_at == t.expires_at
                && w.token_type == t.token_type
                && w.access_token.expose_secret() == t.access_token.expose_secret()
                // The JSON file carries the extras: a change of extras
                // alone (a tenant added) must rewrite it too.
                && w.extra.extra == t.extra.extra
        })
    }
}

/// One sink: write now, then at every change, retrying a failed write
/// every `check_interval`, until cancelled.
async fn run(
    engine: Engine,
    sink: Arc<SinkConfig>,
    cancel: CancellationToken,
    last_write: Arc<AtomicBool>,
) {
    let mut changes = engine.token_changes();
    let mut state = SinkState::default();
    // The command runs on a task of its own, so one that hangs until its
    // timeout never delays the next write; writes made while it runs are
    // coalesced into one more run after it. It ends with this task (the
    // sender dropped), a running command after its timeout at the latest.
    let commands = sink.command.as_ref().map(|_| {
        let (tx, rx) = tokio::sync::watch::channel(0u64);
        tokio::spawn(run_commands(engine.clone(), sink.clone(), rx));
        tx
    });
    let wrote = |commands: &Option<tokio::sync::watch::Sender<u64>>| {
        if let Some(tx) = commands {
            tx.send_modify(|n| *n = n.wrapping_add(1));
        }
    };
    let path = sink.path.clone();
    if let Ok(n @ 1..) = tokio::task::spawn_blocking(move || remove_stale_temps(&path)).await {
        tracing::info!(path = %sink.path.display(), removed = n,
            "removed temporary token files an earlier run left behind");
    }
    loop {
        changes.borrow_and_update();
        tokio::select! {
            () = cancel.cancelled() => break,
            w = sync(&engine, &sink, &mut state) => if w { wrote(&commands) },
        }
        let retry = engine
            .settings()
            .refresh
            .check_interval
            .max(Duration::from_secs(1));
        tokio::select! {
            () = cancel.cancelled() => break,
            r = changes.changed() => if r.is_err() { return },
            () = tokio::time::sleep(retry), if state.failing.is_some() => {}
        }
    }
    if last_write.load(Ordering::SeqCst) && sync(&engine, &sink, &mut state).await {
        wrote(&commands);
    }
}

/// Runs the sink's command once per wake-up of `writes` (several writes
/// during one run make one more run), until the sink task ends.
async fn run_commands(
    engine: Engine,
    sink: Arc<SinkConfig>,
    mut writes: tokio::sync::watch::Receiver<u64>,
) {
    let Some(cmd) = sink.command.clone() else {
        return;
    };
    while writes.changed().await.is_ok() {
        writes.borrow_and_update();
        run_command(&engine, &sink, &cmd).await;
    }
}

/// Writes the token the connection serves now if the file does not hold
/// it yet; returns whether it wrote (the command is then due).
async fn sync(engine: &Engine, sink: &SinkConfig, state: &mut SinkState) -> bool {
    let Some(token) = engine.current_token(&sink.provider, &sink.account) else {
        if !engine.knows(&sink.provider, &sink.account) {
            clear(engine, sink, state).await;
        }
        return false;
    };
    state.cleared = false;
    if state.failing.is_none() && state.holds(&token) {
        return false;
    }
    let contents = render(sink.format, &token, Utc::now());
    let (path, mode, group) = (sink.path.clone(), sink.mode, sink.group);
    let written = tokio::task::spawn_blocking(move || {
        write_atomic(&path, contents.expose_secret().as_bytes(), mode, group)
    })
    .await
    .unwrap_or_else(|e| Err(std::io::Error::other(e)));
    let path = sink.path.display();
    match written {
        Ok(was_link) => {
            if was_link {
                tracing::warn!(path = %path, provider = %sink.provider, account = %sink.account,
                    "a symbolic link stood at the token file's path; it was replaced by the file, not followed");
            }
            if state.failing.take().is_some() {
                tracing::info!(path = %path, provider = %sink.provider, account = %sink.account,
                    "the token file is written again");
            } else {
                tracing::debug!(path = %path, provider = %sink.provider, account = %sink.account,
                    "token file written");
            }
            state.written = Some(token);
            true
        }
        Err(e) => {
            metrics::counter!(SINK_FAILURES_TOTAL, &labels(sink)).increment(1);
            let why = format!(
                "cannot write the token file {path} ({e}); check that the directory exists and this service's user may write it; retried every check_interval"
            );
            if state.failing.as_deref() != Some(&why) {
                tracing::warn!(provider = %sink.provider, account = %sink.account, "{why}");
            }
            if state.failing.is_none() {
                failed(engine, sink, why.clone());
            }
            state.failing = Some(why);
            false
        }
    }
}

/// Removes the token file of a connection that is gone (revoked or
/// forgotten, here or by another process): a file left behind would keep
/// offering a token that no longer works, or, after a local forget, one
/// that still does. Removed rather than emptied, so a reader fails at
/// once with "no such file" instead of sending an empty credential.
async fn clear(engine: &Engine, sink: &SinkConfig, state: &mut SinkState) {
    if state.cleared {
        return;
    }
    let path = sink.path.clone();
    let removed = tokio::task::spawn_blocking(move || match std::fs::remove_file(&path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    })
    .await
    .unwrap_or_else(|e| Err(std::io::Error::other(e)));
    let path = sink.path.display();
    match removed {
        Ok(was_there) => {
            if was_there {
                tracing::info!(path = %path, provider = %sink.provider, account = %sink.account,
                    "the token file is removed: its connection was revoked or forgotten");
            }
            state.written = None;
            state.failing = None;
            state.cleared = true;
        }
        Err(e) => {
            metrics::counter!(SINK_FAILURES_TOTAL, &labels(sink)).increment(1);
            let why = format!(
                "cannot remove the token file {path} of a revoked or forgotten connection ({e}); remove it by hand; retried every check_interval"
            );
            if state.failing.is_none() {
                tracing::warn!(provider = %sink.provider, account = %sink.account, "{why}");
                failed(engine, sink, why.clone());
            }
            state.failing = Some(why);
        }
    }
}

/// Tells the operator a token file or its command failed.
fn failed(engine: &Engine, sink: &SinkConfig, message: String) {
    engine.settings().notifier.emit(Event {
        event: EventKind::SinkFailed,
        provider: sink.provider.clone(),
        account: sink.account.clone(),
        message,
    });
}

/// Runs the sink's command with a clean environment (`PATH` and the
/// `TOKENKEEPER_SINK_*` variables; never the token), killed after its
/// timeout; a failure is logged and notified, and changes nothing else.
async fn run_command(engine: &Engine, sink: &SinkConfig, cmd: &[String]) {
    let Some((program, args)) = cmd.split_first() else {
        return;
    };
    let path = std::env::var_os("PATH").unwrap_or_else(|| FALLBACK_PATH.into());
    let child = tokio::process::Command::new(program)
        .args(args)
        .env_clear()
        .env("PATH", path)
        .env("TOKENKEEPER_SINK_PATH", &sink.path)
        .env("TOKENKEEPER_PROVIDER", &sink.provider)
        .env("TOKENKEEPER_ACCOUNT", &sink.account)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn();
    let outcome = match child {
        Err(e) => Err(format!("could not be started ({e})")),
        Ok(mut child) => match tokio::time::timeout(sink.command_timeout, child.wait()).await {
            Ok(Ok(status)) if status.success() => Ok(()),
            Ok(Ok(status)) => Err(format!("failed ({status})")),
            Ok(Err(e)) => Err(format!("failed ({e})")),
            Err(_) => Err(format!(
                "did not finish within {} s and was killed",
                sink.command_timeout.as_secs_f64()
            )),
        },
    };
    if let Err(what) = outcome {
        metrics::counter!(SINK_FAILURES_TOTAL, &labels(sink)).increment(1);
        let why = format!(
            "the command {program} run after writing the token file {} {what}; the file itself is written, and refreshing goes on",
            sink.path.display()
        );
        tracing::warn!(provider = %sink.provider, account = %sink.account, "{why}");
        failed(engine, sink, why);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn token(access: &str) -> IssuedToken {
        IssuedToken {
            provider: "keap".into(),
            account: "default".into(),
            access_token: SecretString::from(access.to_string()),
            token_type: "Bearer".into(),
            expires_at: DateTime::parse_from_rfc3339("2030-01-02T03:04:05Z")
                .unwrap()
                .with_timezone(&Utc),
            extra: Default::default(),
        }
    }

    #[test]
    fn formats() {
        let t = token("abc.DEF-123");
        let now = t.expires_at - chrono::TimeDelta::seconds(90);
        let r = |f| render(f, &t, now).expose_secret().to_string();
        assert_eq!(r(SinkFormat::Token), "abc.DEF-123");
        assert_eq!(r(SinkFormat::Header), "Authorization: Bearer abc.DEF-123");
        assert_eq!(
            r(SinkFormat::Env),
            "ACCESS_TOKEN=abc.DEF-123\nTOKEN_TYPE=Bearer\nEXPIRES_AT=2030-01-02T03:04:05Z\nEXPIRES_AT_UNIX=1893553445\nPROVIDER=keap\nACCOUNT=default\n"
        );
        assert_eq!(
            r(SinkFormat::Json),
            r#"{"access_token":"abc.DEF-123","token_type":"Bearer","expires_at":"2030-01-02T03:04:05Z","expires_in":90,"provider":"keap","account":"default"}"#
        );
        let odd = token("a b'c$d");
        assert!(render(SinkFormat::Env, &odd, now)
            .expose_secret()
            .starts_with("ACCESS_TOKEN='a b'\\''c$d'\n"));
    }

    #[test]
    fn a_change_of_extras_alone_is_a_change_to_write() {
        let mut state = SinkState {
            written: Some(token("abc")),
            ..Default::default()
        };
        assert!(state.holds(&token("abc")));
        assert!(!state.holds(&token("abd")));
        let mut tenant = token("abc");
        let mut meta = crate::store::GrantMeta::default();
        meta.extra
            .insert("tenants".into(), serde_json::json!(["t1"]));
        tenant.extra = std::sync::Arc::new(meta);
        assert!(!state.holds(&tenant), "the JSON file shows the extras");
        state.written = Some(tenant.clone());
        assert!(state.holds(&tenant));
    }

    #[test]
    fn modes() {
        assert_eq!(parse_mode("0600"), Ok(0o600));
        assert_eq!(parse_mode("640"), Ok(0o640));
        assert_eq!(parse_mode("0o644"), Ok(0o644));
        assert_eq!(parse_mode("0400"), Ok(0o400));
        for bad in ["", "rw", "0999", "4755", "-600", "0o"] {
            assert!(parse_mode(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn groups() {
        assert_eq!(resolve_group("1234"), Ok(1234));
        assert_eq!(resolve_group("root"), Ok(0));
        assert!(resolve_group("no-such-group-tk").is_err());
        assert!(resolve_group("a\0b").is_err());
    }

    #[test]
    fn atomic_write_sets_mode_and_replaces_a_link_without_following_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        // Whatever the umask, the mode is the one asked for.
        assert!(!write_atomic(&path, b"one", 0o640, None).unwrap());
        assert_eq!(std::fs::read(&path).unwrap(), b"one");
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o640);
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "keep").unwrap();
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        assert!(write_atomic(&path, b"two", 0o600, None).unwrap());
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        assert!(!std::fs::symlink_metadata(&path)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        // No temporary file left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
        // One a crash left is removed; nothing else is.
        let stale = dir.path().join(".token.tokenkeeper-00000000deadbeef.tmp");
        std::fs::write(&stale, "old").unwrap();
        std::fs::write(dir.path().join(".other.tokenkeeper-1.tmp"), "x").unwrap();
        assert_eq!(remove_stale_temps(&path), 1);
        assert!(!stale.exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 3);
        // A missing directory is an error, not a panic.
        assert!(write_atomic(&dir.path().join("no/such"), b"x", 0o600, None).is_err());
    }

    /// The directory is opened once, never through a link: a directory
    /// swapped for a link to another one is refused, and nothing lands in
    /// the link's target.
    #[test]
    fn a_directory_swapped_for_a_link_is_not_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = dir.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        let files = dir.path().join("files");
        std::os::unix::fs::symlink(&elsewhere, &files).unwrap();
        assert!(write_atomic(&files.join("token"), b"secret", 0o600, None).is_err());
        assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
    }

    #[test]
    fn modes_open_to_others_or_group_writes_are_refused() {
        for ok in [0o600, 0o640, 0o400, 0o440, 0o700] {
            assert_eq!(check_mode(ok), Ok(()), "{ok:o}");
        }
        for bad in [0o644, 0o666, 0o601, 0o602, 0o604, 0o660, 0o620, 0o777] {
            let e = check_mode(bad).unwrap_err();
            assert!(e.contains(&format!("{bad:04o}")), "{e}");
        }
    }
}
