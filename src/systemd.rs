//! systemd integration: the sd_notify protocol (readiness, status, watchdog,
//! reload, stop), socket activation, and the journal's log line format.
//!
//! Everything here is a no-op outside systemd (no `NOTIFY_SOCKET`, no
//! `LISTEN_FDS`, no `JOURNAL_STREAM`), so the daemon behaves the same when
//! run by hand. This module decides nothing about the lifecycle itself.

use std::fmt;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use crate::refresh::Engine;
use crate::store::ConnState;

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify the service manager");
    }
}

/// `READY=1` with a status line. Sent only once the database is migrated,
/// grants are loaded and the listener is bound.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// `STATUS=...` (shown by `systemctl status`).
pub fn status(status: &str) {
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        send(&[NotifyState::Status(status)]);
    }
}

/// `RELOADING=1` with the monotonic timestamp systemd expects with it.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// `STOPPING=1`.
/// Stopping, and how long it may take at most: systemd extends its stop
/// timeout to that (`EXTEND_TIMEOUT_USEC`), so a configuration whose
/// worst-case stop exceeds the unit's `TimeoutStopSec` is not killed
/// mid-commit.
pub fn stopping(budget: std::time::Duration) {
    let usec = u32::try_from(budget.as_micros()).unwrap_or(u32::MAX);
    send(&[
        NotifyState::Stopping,
        NotifyState::ExtendTimeoutUsec(usec),
        NotifyState::Status("stopping"),
    ]);
}

/// The one-line summary used for `STATUS=`.
pub fn summary(engine: &Engine) -> String {
    let report = engine.report();
    let count = |state: ConnState| report.iter().filter(|c| c.state == state).count();
    let needs = count(ConnState::AuthorizationRequired);
    let retrying = count(ConnState::Retrying);
    let active = report.len() - needs - retrying;
    format!("{active} active, {retrying} retrying, {needs} need authorization")
}

/// A listening socket passed by systemd socket activation, if any.
pub fn inherited_listener() -> std::io::Result<Option<std::net::TcpListener>> {
    use std::os::fd::FromRawFd;
    let mut fds = sd_notify::listen_fds()?;
    let Some(fd) = fds.next() else {
        return Ok(None);
    };
    // SAFETY: systemd hands us this descriptor (LISTEN_PID matched our pid)
    // and nothing else in the process owns it.
    let listener = unsafe { std::net::TcpListener::from_raw_fd(fd) };
    listener.set_nonblocking(true)?;
    Ok(Some(listener))
}

/// Pings the watchdog at half of `WATCHDOG_USEC`, but only after proving
/// the runtime schedules this task and the database answers: a bare timer
/// would keep a wedged daemon alive.
pub async fn watchdog(engine: Engine, shutdown: CancellationToken) {
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return;
    };
    let every = interval / 2;
    tracing::debug!(
        every_ms = every.as_millis() as u64,
        "systemd watchdog enabled"
    );
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        let probe =
            tokio::time::timeout(every.max(Duration::from_millis(10)), engine.store().ping()).await;
        // A database server that went away (or answers slowly) is an
        // outage the daemon rides out: held tokens are served, it
        // reconnects by itself, the store's feed reports it once. Restarting
        // the process cannot help and would lose those tokens, so on a
        // database server the watchdog only watches the process itself.
        let remote = engine.store().feed().pushed();
        match probe {
            Ok(Ok(())) => send(&[NotifyState::Watchdog]),
            _ if remote => send(&[NotifyState::Watchdog]),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "watchdog: the database does not answer; not pinging")
            }
            Err(_) => tracing::error!("watchdog: the database did not answer in time; not pinging"),
        }
    }
}

/// Whether stderr goes to the journal (systemd sets `JOURNAL_STREAM`).
pub fn under_journal() -> bool {
    std::env::var_os("JOURNAL_STREAM").is_some()
}

/// Journal lines: `<N>` syslog priority prefix so the journal records the
/// level, no timestamp (the journal adds one), no colours.
pub struct JournalFormat<F> {
    inner: F,
}

impl<F> JournalFormat<F> {
    pub fn new(inner: F) -> Self {
        JournalFormat { inner }
    }
}

fn priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        _ => 7,
    }
}

impl<S, N, F> FormatEvent<S, N> for JournalFormat<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        write!(writer, "<{}>", priority(event.metadata().level()))?;
        self.inner.format_event(ctx, writer, event)
    }
}
