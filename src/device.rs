//! Device authorizations in flight (RFC 8628, SPEC 10): started for
//! `connect --device` or the dashboard, polled by the daemon, landed like
//! a browser authorization.
//!
//! [`DeviceFlows::start`] asks the provider for codes and spawns one task
//! per flow that polls the token endpoint: it waits `interval` before each
//! poll, adds 5 s on `slow_down`, keeps going through transient failures,
//! and ends on a grant (landed through `Engine::authorized`, exactly as
//! `/callback` lands one), `expired_token`, `access_denied`, any other
//! refusal, the code's expiry, a cancel, or (for a command's flow) the
//! command going away. What a flow shows is a [`FlowView`]; a watcher
//! waits for its end with [`DeviceFlows::wait`].
//!
//! Invariants: the device code never leaves the polling task (not in a
//! view, an answer or a log line); nothing is stored unless the provider
//! issued a grant; a flow ends exactly once, and its status never changes
//! after that.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use secrecy::SecretString;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use url::Url;

use crate::provider::device::{slowed, DeviceStartError, PollAnswer};
use crate::provider::{ProviderError, TokenGrant};
use crate::refresh::{AuthorizedBy, Engine};

/// Flows running at once: each holds a task and a provider's codes; a
/// local client starting more is misbehaving.
const MAX_RUNNING: usize = 32;

/// How long an ended flow's outcome stays readable, so a watcher that
/// reconnects late still learns it.
const KEEP_ENDED: Duration = Duration::from_secs(600);

/// A command's flow nobody asked about for this long is abandoned (the
/// command was killed without cancelling): well above the longest wait a
/// watcher makes ([`MAX_WAIT`]).
const ABANDONED_AFTER: Duration = Duration::from_secs(90);

/// Longest a watcher's single wait lasts; it then asks again.
pub const MAX_WAIT: Duration = Duration::from_secs(30);

/// Where a flow stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FlowStatus {
    /// Waiting for the person to enter the code.
    Pending,
    /// The grant is stored; `refresh_token`: the provider issued one.
    Authorized { refresh_token: bool },
    /// The code expired before anyone approved it.
    Expired,
    /// The person refused at the provider.
    Denied,
    /// Cancelled by its command (Ctrl-C) or abandoned.
    Cancelled,
    /// The provider refused, or the grant could not be stored: the sentence.
    Failed(String),
}

impl FlowStatus {
    /// The wire name (`pending`, `authorized`, `expired`, `denied`,
    /// `cancelled`, `failed`).
    pub fn as_str(&self) -> &'static str {
        match self {
            FlowStatus::Pending => "pending",
            FlowStatus::Authorized { .. } => "authorized",
            FlowStatus::Expired => "expired",
            FlowStatus::Denied => "denied",
            FlowStatus::Cancelled => "cancelled",
            FlowStatus::Failed(_) => "failed",
        }
    }

    /// What to tell the person, for an ended flow.
    pub fn sentence(&self, provider: &str, account: &str) -> Option<String> {
        let again = format!("run `tokenkeeper connect {provider} {account} --device` again");
        Some(match self {
            FlowStatus::Pending => return None,
            FlowStatus::Authorized { .. } => format!("authorized {provider}/{account}; the grant is stored"),
            FlowStatus::Expired => format!("the device code expired before it was approved; nothing was stored. {again} and enter the new code in time"),
            FlowStatus::Denied => format!("access was denied at the provider; nothing was stored. If that was a mistake, {again} and approve"),
            FlowStatus::Cancelled => "the device authorization was cancelled; nothing was stored".to_string(),
            FlowStatus::Failed(why) => format!("{why}; nothing was stored"),
        })
    }
}

/// What anyone holding a flow's id may see of it.
#[derive(Debug, Clone)]
pub struct FlowView {
    pub provider: String,
    pub account: String,
    pub user_code: String,
    pub verification_uri: Url,
    pub verification_uri_complete: Option<Url>,
    pub expires_at: DateTime<Utc>,
    /// The interval polls are made at now (grows on `slow_down`).
    pub interval: Duration,
    pub status: FlowStatus,
}

/// A started flow: its id (the handle to watch or cancel it) and view.
pub struct Started {
    pub id: String,
    pub view: FlowView,
}

/// Why a flow was not started.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StartError {
    #[error("no provider named {0} is configured")]
    UnknownProvider(String),
    #[error("{MAX_RUNNING} device authorizations are already waiting; finish or cancel one first")]
    TooMany,
    /// A client-credentials provider: the sentence says why.
    #[error("{0}")]
    NothingToAuthorize(String),
    #[error(transparent)]
    Provider(#[from] DeviceStartError),
}

struct Flow {
    view: Mutex<FlowView>,
    status: watch::Sender<FlowStatus>,
    cancel: CancellationToken,
    /// Watched by a command: abandoned when nobody asks for a while.
    watched: bool,
    last_seen: Mutex<Instant>,
    ended_at: Mutex<Option<Instant>>,
}

impl Flow {
    fn view(&self) -> FlowView {
        let mut v = self.view.lock().unwrap_or_else(|e| e.into_inner()).clone();
        v.status = self.status.borrow().clone();
        v
    }

    fn seen(&self) {
        *self.last_seen.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    /// Ends the flow once; a later end is ignored.
    fn end(&self, status: FlowStatus) -> bool {
        let mut ended = self.ended_at.lock().unwrap_or_else(|e| e.into_inner());
        if ended.is_some() {
            return false;
        }
        *ended = Some(Instant::now());
        self.status.send_replace(status);
        true
    }
}

/// The device authorizations this daemon runs. Cheap to clone.
#[derive(Clone, Default)]
pub struct DeviceFlows {
    flows: Arc<Mutex<HashMap<String, Arc<Flow>>>>,
}

impl DeviceFlows {
    pub fn new() -> DeviceFlows {
        DeviceFlows::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Flow>>> {
        self.flows.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forgets flows that ended long enough ago.
    fn purge(&self) {
        let now = Instant::now();
        self.lock().retain(|_, f| {
            f.ended_at
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_none_or(|t| now.duration_since(t) < KEEP_ENDED)
        });
    }

    /// Asks the provider for codes and starts polling. `watched`: a
    /// command waits on it, and it is abandoned if that command goes away.
    pub async fn start(
        &self,
        engine: &Engine,
        provider: &str,
        account: &str,
        watched: bool,
    ) -> Result<Started, StartError> {
        self.purge();
        let running = self
            .lock()
            .values()
            .filter(|f| *f.status.borrow() == FlowStatus::Pending)
            .count();
        if running >= MAX_RUNNING {
            return Err(StartError::TooMany);
        }
        let settings = engine.settings();
        let p = settings
            .providers
            .get(provider)
            .ok_or_else(|| StartError::UnknownProvider(provider.to_string()))?;
        if let Some(why) = p.config.authorization_refusal() {
            return Err(StartError::NothingToAuthorize(why));
        }
        let auth = p.device_authorization().await?;
        let view = FlowView {
            provider: provider.to_string(),
            account: account.to_string(),
            user_code: auth.user_code,
            verification_uri: auth.verification_uri,
            verification_uri_complete: auth.verification_uri_complete,
            expires_at: Utc::now()
                + chrono::Duration::from_std(auth.expires_in).unwrap_or_default(),
            interval: auth.interval,
            status: FlowStatus::Pending,
        };
        let (status, _) = watch::channel(FlowStatus::Pending);
        let flow = Arc::new(Flow {
            view: Mutex::new(view.clone()),
            status,
            cancel: CancellationToken::new(),
            watched,
            last_seen: Mutex::new(Instant::now()),
            ended_at: Mutex::new(None),
        });
        let id = format!("{:032x}", rand::random::<u128>());
        self.lock().insert(id.clone(), flow.clone());
        tracing::info!(provider, account, "device authorization started");
        tokio::spawn(poll(
            engine.clone(),
            flow,
            auth.device_code,
            Instant::now() + auth.expires_in,
        ));
        Ok(Started { id, view })
    }

    /// The flow's view, if `id` names one of `provider`/`account`.
    pub fn get(&self, id: &str, provider: &str, account: &str) -> Option<FlowView> {
        let flow = self.find(id, provider, account)?;
        flow.seen();
        Some(flow.view())
    }

    fn find(&self, id: &str, provider: &str, account: &str) -> Option<Arc<Flow>> {
        let flow = self.lock().get(id).cloned()?;
        let ours = {
            let v = flow.view.lock().unwrap_or_else(|e| e.into_inner());
            v.provider == provider && v.account == account
        };
        ours.then_some(flow)
    }

    /// Waits up to `max` (at most [`MAX_WAIT`]) for the flow to end, then
    /// returns its view.
    pub async fn wait(
        &self,
        id: &str,
        provider: &str,
        account: &str,
        max: Duration,
    ) -> Option<FlowView> {
        let flow = self.find(id, provider, account)?;
        flow.seen();
        let mut rx = flow.status.subscribe();
        let _ = tokio::time::timeout(
            max.min(MAX_WAIT),
            rx.wait_for(|s| *s != FlowStatus::Pending),
        )
        .await;
        flow.seen();
        Some(flow.view())
    }

    /// Cancels a pending flow; its view (cancelled, or how it ended).
    pub fn cancel(&self, id: &str, provider: &str, account: &str) -> Option<FlowView> {
        let flow = self.find(id, provider, account)?;
        if flow.end(FlowStatus::Cancelled) {
            flow.cancel.cancel();
            tracing::info!(provider, account, "device authorization cancelled");
        }
        Some(flow.view())
    }
}

/// The polling task of one flow.
async fn poll(engine: Engine, flow: Arc<Flow>, device_code: SecretString, deadline: Instant) {
    let (provider, account) = {
        let v = flow.view.lock().unwrap_or_else(|e| e.into_inner());
        (v.provider.clone(), v.account.clone())
    };
    let status = loop {
        let interval = flow.view.lock().unwrap_or_else(|e| e.into_inner()).interval;
        let next = Instant::now() + interval;
        if next >= deadline {
            tokio::select! {
                _ = flow.cancel.cancelled() => return,
                _ = tokio::time::sleep_until(deadline) => break FlowStatus::Expired,
            }
        }
        tokio::select! {
            _ = flow.cancel.cancelled() => return,
            _ = tokio::time::sleep_until(next) => {}
        }
        if flow.watched
            && flow
                .last_seen
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .elapsed()
                > ABANDONED_AFTER
        {
            tracing::info!(provider = %provider, account = %account, "device authorization abandoned: its command stopped asking");
            break FlowStatus::Cancelled;
        }
        // An approval is consumed by the poll that sees it: while the
        // database cannot take the grant, wait rather than redeem it.
        if !engine.store().feed().up() {
            continue;
        }
        let settings = engine.settings();
        let Some(p) = settings.providers.get(&provider) else {
            break FlowStatus::Failed(format!(
                "provider {provider} was removed from the config while waiting"
            ));
        };
        let answer = p.device_poll(&device_code).await;
        // Cancelled while the poll was out: the command already told the
        // person nothing was stored, so nothing is.
        if flow.cancel.is_cancelled() {
            return;
        }
        match answer {
            PollAnswer::Pending => {}
            PollAnswer::SlowDown => {
                let mut v = flow.view.lock().unwrap_or_else(|e| e.into_inner());
                v.interval = slowed(v.interval);
                tracing::info!(provider = %provider, account = %account, interval_ms = v.interval.as_millis() as u64, "the provider asked to poll more slowly");
            }
            PollAnswer::Expired => break FlowStatus::Expired,
            PollAnswer::Denied => break FlowStatus::Denied,
            PollAnswer::Failed(ProviderError::Unusable {
                message,
                refresh_token,
            }) => {
                // The device code is spent and the answer's refresh token
                // is the grant: kept, with an access token already
                // expired, so the first request refreshes it.
                tracing::warn!(provider = %provider, account = %account, "the device code was redeemed but the access token is unusable ({message}); the refresh token is kept");
                let grant = TokenGrant::refresh_token_only(refresh_token, Utc::now());
                break land(&engine, &provider, &account, &grant).await;
            }
            PollAnswer::Failed(ProviderError::Transient { message, .. }) => {
                tracing::warn!(provider = %provider, account = %account, "device authorization poll failed, trying again: {message}");
            }
            PollAnswer::Failed(e) => {
                tracing::warn!(provider = %provider, account = %account, "device authorization refused: {e}");
                break FlowStatus::Failed(format!(
                    "the provider refused the device authorization: {e}"
                ));
            }
            PollAnswer::Granted(grant) => break land(&engine, &provider, &account, &grant).await,
        }
    };
    if status != FlowStatus::Pending {
        tracing::info!(provider = %provider, account = %account, outcome = status.as_str(), "device authorization ended");
    }
    flow.end(status);
}

/// The same landing as `/callback`: a newer authorization replaces the
/// connection's grant.
async fn land(engine: &Engine, provider: &str, account: &str, grant: &TokenGrant) -> FlowStatus {
    // The `authorized` notification logs the landing.
    match engine
        .authorized_by(provider, account, grant, AuthorizedBy::DeviceCode)
        .await
    {
        Ok(()) => FlowStatus::Authorized {
            refresh_token: grant.refresh_token.is_some(),
        },
        Err(e) => {
            tracing::error!(provider, account, error = %e, "the grant from a device code could not be stored");
            FlowStatus::Failed(format!("the grant could not be stored: {e}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_end_has_a_sentence_and_pending_none() {
        assert_eq!(FlowStatus::Pending.sentence("p", "a"), None);
        for s in [
            FlowStatus::Expired,
            FlowStatus::Denied,
            FlowStatus::Cancelled,
            FlowStatus::Failed("x".into()),
        ] {
            let text = s.sentence("p", "a").unwrap();
            assert!(text.contains("nothing was stored"), "{text}");
        }
        assert!(FlowStatus::Expired
            .sentence("p", "a")
            .unwrap()
            .contains("connect p a --device"));
    }
}
