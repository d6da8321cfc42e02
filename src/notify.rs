//! Telling an operator that a grant needs attention: a command run with
//! `TOKENKEEPER_*` environment variables (and `PATH`, nothing else of the
//! daemon's environment) and/or a JSON webhook. Never any
//! token in either. Delivery runs in the background with timeouts and
//! bounded retries: a failing hook never blocks the lifecycle.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::Semaphore;
use url::Url;

use crate::config::NotifyConfig;

/// How long a notification command may run before it is killed.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// Per webhook attempt.
const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);
/// Webhook attempts in all (the first plus retries with doubling delays).
const WEBHOOK_ATTEMPTS: u32 = 4;
/// Deliveries in flight at once, so a wave of failures cannot fork-bomb
/// the host or flood the webhook.
const MAX_IN_FLIGHT: usize = 8;

/// What happened (`TOKENKEEPER_EVENT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    AuthorizationRequired,
    RefreshFailing,
    Recovered,
    BearerMisuse,
    Authorized,
    /// A token file could not be written, or its command failed.
    SinkFailed,
    /// A scheduled or requested backup failed (no provider or account).
    BackupFailed,
    /// The refresh token ends within `refresh.warn_before` and refreshing
    /// cannot push the end back (a hard cap, or refreshes failing): only a
    /// new authorization keeps the connection (SPEC 11).
    RefreshTokenExpiring,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::AuthorizationRequired => "authorization_required",
            EventKind::RefreshFailing => "refresh_failing",
            EventKind::Recovered => "recovered",
            EventKind::BearerMisuse => "bearer_misuse",
            EventKind::Authorized => "authorized",
            EventKind::SinkFailed => "sink_failed",
            EventKind::BackupFailed => "backup_failed",
            EventKind::RefreshTokenExpiring => "refresh_token_expiring",
        }
    }
}

/// One notification; the webhook receives it as JSON.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub event: EventKind,
    pub provider: String,
    pub account: String,
    pub message: String,
}

/// Delivers events to the configured command and webhook.
pub struct Notifier {
    command: Option<PathBuf>,
    webhook: Option<Url>,
    http: reqwest::Client,
    slots: Arc<Semaphore>,
}

impl Notifier {
    pub fn new(cfg: &NotifyConfig, http: reqwest::Client) -> Notifier {
        Notifier {
            command: cfg.command.clone(),
            webhook: cfg.webhook_url.clone(),
            http,
            slots: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
        }
    }

    /// Queues `event` for delivery and returns at once.
    pub fn emit(&self, event: Event) {
        tracing::info!(
            event = event.event.as_str(),
            provider = %event.provider,
            account = %event.account,
            "{}",
            event.message
        );
        if self.command.is_none() && self.webhook.is_none() {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        // Each hook on its own: a hung command must not hold back the
        // webhook, nor the other way round.
        if let Some(cmd) = self.command.clone() {
            let event = event.clone();
            self.deliver(&handle, async move { run_command(&cmd, &event).await });
        }
        if let Some(url) = self.webhook.clone() {
            let http = self.http.clone();
            self.deliver(
                &handle,
                async move { post_webhook(&http, &url, &event).await },
            );
        }
    }

    /// Runs one delivery in the background, at most `MAX_IN_FLIGHT` at once.
    fn deliver(
        &self,
        handle: &tokio::runtime::Handle,
        delivery: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let slots = self.slots.clone();
        handle.spawn(async move {
            if let Ok(_permit) = slots.acquire_owned().await {
                delivery.await;
            }
        });
    }
}

/// `PATH` for the notify command when the daemon itself has none.
const FALLBACK_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

async fn run_command(cmd: &PathBuf, event: &Event) {
    // A clean environment: the daemon's own may hold the client secret
    // (`client_secret_env`) or anything else the service was started with,
    // and the command only needs the event. PATH stays so a script can
    // find its tools.
    let path = std::env::var_os("PATH").unwrap_or_else(|| FALLBACK_PATH.into());
    let child = tokio::process::Command::new(cmd)
        .env_clear()
        .env("PATH", path)
        .env("TOKENKEEPER_EVENT", event.event.as_str())
        .env("TOKENKEEPER_PROVIDER", &event.provider)
        .env("TOKENKEEPER_ACCOUNT", &event.account)
        .env("TOKENKEEPER_MESSAGE", &event.message)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(command = %cmd.display(), error = %e, "cannot run the notify command");
            return;
        }
    };
    match tokio::time::timeout(COMMAND_TIMEOUT, child.wait()).await {
        Ok(Ok(status)) if status.success() => {}
        Ok(Ok(status)) => {
            tracing::warn!(command = %cmd.display(), %status, "the notify command failed")
        }
        Ok(Err(e)) => {
            tracing::warn!(command = %cmd.display(), error = %e, "the notify command failed")
        }
        Err(_) => {
            tracing::warn!(command = %cmd.display(), "the notify command timed out and was killed")
        }
    }
}

async fn post_webhook(http: &reqwest::Client, url: &Url, event: &Event) {
    let mut delay = Duration::from_secs(1);
    for attempt in 1..=WEBHOOK_ATTEMPTS {
        let sent = http
            .post(url.clone())
            .timeout(WEBHOOK_TIMEOUT)
            .json(event)
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() => return,
            Ok(r) => {
                tracing::warn!(status = %r.status(), attempt, "the notify webhook refused the event")
            }
            Err(e) => {
                tracing::warn!(error = %crate::provider::without_url(&e), attempt, "cannot reach the notify webhook")
            }
        }
        if attempt < WEBHOOK_ATTEMPTS {
            tokio::time::sleep(delay).await;
            delay *= 2;
        }
    }
}
