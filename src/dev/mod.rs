//! A Keap-like (formerly Infusionsoft) OAuth2 authorization server simulator.
//!
//! It owns everything a client of Keap's OAuth2 endpoints can observe: the
//! consent page, authorization codes with PKCE, rotating single-use refresh
//! tokens, HTTP Basic client authentication on refresh, RFC 7009 revocation,
//! a bearer-protected API, and Keap's/Apigee's error shapes. Faults (5xx,
//! 429, garbage bodies, hangs, rejected refreshes) and response delays can be
//! injected so the daemon's failure handling can be exercised deterministically.
//!
//! It exists for integration tests (started in-process with
//! [`Simulator::start_local`]) and for `serve --dev` (its [`Simulator::router`]
//! mounted under `/dev-provider`). It must never be pointed at or used for
//! real traffic: all state lives in memory, there is no real user, and the
//! consent page approves anything. It never logs token, code or secret
//! values; logs only describe what happened.
//!
//! The production code (`provider`, `config`) does not know it exists: the
//! daemon only mounts the router it is handed. Files: this one holds the
//! public types, the shared state and the [`Simulator`] handle; `oauth` the
//! consent page and the token and revocation endpoints; `api` the protected
//! API and its limits; `control` the `/_sim/...` endpoints; `faults` what an
//! injected [`Fault`] answers; `device` the device authorization grant
//! (RFC 8628); [`config`] the configuration of `serve --dev`.

// Handlers build their rejection as a finished `Response` and return it
// through `Err`; boxing it would only add noise on a cold path.
#![allow(clippy::result_large_err)]

mod api;
mod control;
mod device;
mod discovery;
mod faults;
mod oauth;
mod presets;
mod serve;
#[cfg(test)]
mod tests;

pub use device::DeviceFault;
pub use discovery::DiscoveryFault;
pub use presets::{Offline, Quirks};
pub use serve::config;

use api::api_endpoint;
use control::{sim_config, sim_revoke_all, sim_stats};
use oauth::{approve, authorize_page, deny, revoke_endpoint, token_endpoint};

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State as AxState};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use rand::distributions::Alphanumeric;
use rand::Rng;
use sha2::{Digest, Sha256};

/// Scope string Keap returns for every grant, whatever was requested.
pub const SIM_SCOPE: &str = "full|sim1234.infusionsoft.com";

/// How long an authorization code stays exchangeable.
const CODE_LIFETIME: Duration = Duration::from_secs(600);
/// Request bodies are tiny in OAuth; a cap keeps a misbehaving client from
/// making the simulator buffer arbitrary amounts of memory.
const FORM_BODY_LIMIT: usize = 64 * 1024;
const API_BODY_LIMIT: usize = 16 * 1024 * 1024;
/// Upper bound for `/api/large?bytes=N`, so a typo cannot exhaust memory.
pub const LARGE_BODY_MAX: u64 = 256 * 1024 * 1024;
const JSON_CT: &str = "application/json;charset=UTF-8";
const TOKEN_LEN: usize = 32;

/// Behaviour knobs for a [`Simulator`]. Defaults mirror Keap.
#[derive(Clone)]
pub struct SimulatorConfig {
    /// The only client the simulator knows.
    pub client_id: String,
    /// Empty means a public client: no secret is expected anywhere.
    pub client_secret: String,
    /// Lifetime of newly issued access tokens (Keap: 24h).
    pub access_lifetime: Duration,
    /// Every refresh issues a new refresh token and invalidates the used one.
    pub rotate_refresh_tokens: bool,
    /// The previous access tokens of a grant die when a new one is issued.
    pub revoke_old_access_on_refresh: bool,
    /// Shape of the error returned for an unusable refresh token.
    pub refresh_error_style: RefreshErrorStyle,
    /// Keap rejects refresh requests that carry client credentials in the
    /// body instead of an HTTP Basic header. Public clients are exempt.
    pub require_basic_on_refresh: bool,
    /// Enables the `/_sim/*` HTTP control endpoints (for dev mode).
    pub control_api: bool,
    /// Keap's rate limits on `/api/*`, with its `x-keap-*` headers on every
    /// authorized API answer and 429 + Apigee fault beyond them. `None` (the
    /// default): no limits and no headers.
    pub limits: Option<SimLimits>,
    /// Provider quirks beyond Keap's (see [`Quirks`] and
    /// [`SimulatorConfig::like`]); the default is Keap's behaviour.
    pub quirks: Quirks,
}

/// Rate limits the simulator enforces on `/api/*`, like Keap: per-second
/// (spike) and per-minute (throttle) as token buckets of that many requests
/// refilled evenly over the window, a daily quota that resets at 00:00 UTC,
/// and a tenant per-minute throttle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimLimits {
    pub per_second: u32,
    pub per_minute: u32,
    pub per_day: u64,
    pub tenant_per_minute: u32,
}

impl SimLimits {
    /// Keap's published limits for one OAuth client and one tenant.
    pub const KEAP: SimLimits = SimLimits {
        per_second: 25,
        per_minute: 1500,
        per_day: 150_000,
        tenant_per_minute: 10_000,
    };
}

impl Default for SimulatorConfig {
    fn default() -> Self {
        Self {
            client_id: "demo-client".to_owned(),
            client_secret: "demo-secret".to_owned(),
            access_lifetime: Duration::from_secs(24 * 60 * 60),
            rotate_refresh_tokens: true,
            revoke_old_access_on_refresh: true,
            refresh_error_style: RefreshErrorStyle::Keap,
            require_basic_on_refresh: true,
            control_api: false,
            limits: None,
            quirks: Quirks::default(),
        }
    }
}

// Hand-written so the client secret can never end up in a log line.
impl fmt::Debug for SimulatorConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimulatorConfig")
            .field("client_id", &self.client_id)
            .field("client_secret", &"<redacted>")
            .field("access_lifetime", &self.access_lifetime)
            .field("rotate_refresh_tokens", &self.rotate_refresh_tokens)
            .field(
                "revoke_old_access_on_refresh",
                &self.revoke_old_access_on_refresh,
            )
            .field("refresh_error_style", &self.refresh_error_style)
            .field("require_basic_on_refresh", &self.require_basic_on_refresh)
            .field("control_api", &self.control_api)
            .field("limits", &self.limits)
            .field("quirks", &self.quirks)
            .finish()
    }
}

/// Error body returned when a refresh token is unknown, used or revoked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RefreshErrorStyle {
    /// What Keap actually sends:
    /// 400 `{"error":"invalid_request","error_description":"Invalid Refresh Token"}`.
    #[default]
    Keap,
    /// RFC 6749 style: 400 `{"error":"invalid_grant","error_description":"..."}`.
    InvalidGrant,
}

/// An injected failure of the `/token` endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this status and a non-JSON body (HTML for 5xx, like a
    /// gateway would). An invalid status code falls back to 500.
    Status(u16),
    /// 429 with Apigee's quota fault body; `Retry-After` only when `Some`.
    RateLimited {
        /// Value of the `Retry-After` header, in seconds.
        retry_after_secs: Option<u64>,
    },
    /// 200 whose body is not JSON (although labelled as JSON).
    Garbage,
    /// 200 JSON token response without `access_token` (and without a new
    /// refresh token); no state changes.
    MissingAccessToken,
    /// Sleep this long, then answer 504 like Apigee's gateway timeout.
    Hang(Duration),
    /// Reject as an invalid refresh token (per the configured error style)
    /// without consuming the token.
    RejectRefresh,
    /// Answer this status with an RFC 6749 error body (`error`, and
    /// `error_description` when `Some`), e.g. 400 `invalid_scope`, or a
    /// 200 carrying `invalid_grant`; no state changes.
    OAuthError {
        status: u16,
        error: String,
        description: Option<String>,
    },
}

/// How successful token answers are shaped: odd-but-valid shapes real
/// providers send, and broken ones. Applied after the tokens were issued
/// (and the used refresh token rotated out), like a real provider whose
/// answer format is unusual, not like a failure before processing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AnswerShape {
    /// `expires_in` written as this raw JSON text (`"\"3600\""`, `-5`,
    /// `0.5`, `1e13`, `1e400`, ...).
    ExpiresIn(String),
    /// No `token_type` member.
    NoTokenType,
    /// `token_type` set to this (`"DPoP"`, `"mac"`, ...).
    TokenType(String),
    /// `Content-Type: text/plain` on a JSON body.
    TextPlain,
    /// This 2xx status instead of 200 (e.g. 201).
    Status(u16),
    /// No `access_token` member, though the refresh token was rotated and
    /// the new one is in the answer: a client must keep it.
    NoAccessToken,
}

/// When the configured `/token` delay is applied.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DelayPhase {
    /// Before any processing: nothing has changed server-side yet.
    #[default]
    BeforeProcessing,
    /// After tokens were issued and the used refresh token rotated out, before
    /// the response is sent: a client that gives up in this window has lost
    /// the grant. Only successful token responses are delayed.
    AfterRotation,
}

/// Counters describing what clients did; see [`Simulator::stats`].
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SimStats {
    /// Successful authorization_code exchanges.
    pub code_exchanges: u64,
    /// refresh_token grant requests received (any outcome, including faults).
    pub refresh_calls: u64,
    /// Refreshes that issued a new access token.
    pub refresh_ok: u64,
    /// A refresh token that had already been rotated out was presented again.
    /// A correct client keeps this at 0.
    pub refresh_reuse: u64,
    /// Rejected refreshes (unknown, reused, revoked, expired, injected
    /// RejectRefresh).
    pub refresh_rejected: u64,
    /// Refreshes rejected because the refresh token had outlived its
    /// lifetime ([`Quirks::refresh_token_idle`] or
    /// [`Quirks::refresh_token_max`]); also counted in `refresh_rejected`.
    pub refresh_expired: u64,
    /// Every request to `/api/*`, authorized or not.
    pub api_calls: u64,
    /// `/api/*` requests rejected for a missing or invalid bearer token.
    pub api_unauthorized: u64,
    /// `/api/*` requests answered 429 because a limit was exceeded.
    pub api_rate_limited: u64,
    /// Grants revoked through `/revoke` (unknown tokens do not count).
    pub revocations: u64,
    /// Requests for a discovery document (either path, any outcome).
    pub discovery_fetches: u64,
    /// client_credentials grant requests received (any outcome, including
    /// faults).
    pub client_credentials_calls: u64,
    /// client_credentials requests that issued an access token.
    pub client_credentials_ok: u64,
    /// Requests to the device authorization endpoint (any outcome).
    pub device_authorizations: u64,
    /// `device_code` grant requests from an authenticated client.
    pub device_polls: u64,
    /// Polls that came sooner than the interval the client was told
    /// (less 10%): a correct client keeps this at 0.
    pub device_polls_too_fast: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RefreshStatus {
    Valid,
    /// Rotated out by a successful refresh; presenting it again is reuse.
    Used,
    Revoked,
}

struct RefreshEntry {
    grant: usize,
    status: RefreshStatus,
    /// Issued, or last redeemed: an idle lifetime counts from here.
    last_used: Instant,
}

struct AccessEntry {
    grant: usize,
    expires_at: Instant,
    revoked: bool,
}

#[derive(Default)]
struct Grant {
    /// When the grant was authorized: a maximum lifetime counts from here.
    authorized_at: Option<Instant>,
    revoked: bool,
    refresh_tokens: Vec<String>,
    access_tokens: Vec<String>,
    current_refresh: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ChallengeMethod {
    S256,
    Plain,
}

struct AuthCode {
    /// The authorization request earned a refresh token (see
    /// [`Offline`]).
    offline: bool,
    client_id: String,
    redirect_uri: String,
    challenge: Option<(String, ChallengeMethod)>,
    expires_at: Instant,
    used: bool,
}

struct State {
    config: SimulatorConfig,
    token_delay: Duration,
    delay_phase: DelayPhase,
    fault_queue: VecDeque<Fault>,
    persistent_fault: Option<Fault>,
    answer_shape: Option<AnswerShape>,
    codes: HashMap<String, AuthCode>,
    grants: Vec<Grant>,
    refresh: HashMap<String, RefreshEntry>,
    access: HashMap<String, AccessEntry>,
    refresh_log: Vec<String>,
    access_log: Vec<String>,
    stats: SimStats,
    usage: Usage,
    /// `/revoke` answers this status (with an OAuth error body) instead of
    /// revoking.
    revoke_fault: Option<u16>,
    /// `/revoke` ignores tokens that are no longer valid (RFC 7009 2.2: an
    /// invalid token is not an error, and revokes nothing) instead of
    /// revoking the whole grant they came from.
    strict_revocation: bool,
    /// What the discovery documents name as issuer; `None`: they answer 404.
    issuer: Option<String>,
    discovery_fault: Option<DiscoveryFault>,
    /// The `scope` of the last client_credentials request that issued a
    /// token (`None`: it asked for none).
    client_credentials_scope: Option<String>,
    /// When the latest refresh and client-credentials requests arrived
    /// (at most [`TOKEN_CALLS_KEPT`]), so tests can check their spacing.
    token_calls: VecDeque<Instant>,
    device: device::DeviceState,
}

/// How many arrival instants of token requests are kept: enough for any
/// test, bounded for a long `serve --dev`.
const TOKEN_CALLS_KEPT: usize = 1000;

/// A token bucket of `capacity` requests refilled evenly over `window`.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    level: f64,
    at: Option<Instant>,
}

impl Bucket {
    fn full() -> Bucket {
        Bucket {
            level: f64::INFINITY,
            at: None,
        }
    }

    fn level(&self, capacity: u32, window: Duration, now: Instant) -> f64 {
        let cap = f64::from(capacity);
        match self.at {
            None => cap,
            Some(at) => {
                let refill =
                    now.saturating_duration_since(at).as_secs_f64() / window.as_secs_f64() * cap;
                (self.level + refill).min(cap)
            }
        }
    }

    fn take(&mut self, capacity: u32, window: Duration, now: Instant) {
        self.level = self.level(capacity, window, now) - 1.0;
        self.at = Some(now);
    }
}

/// What `/api/*` callers have used of the limits.
#[derive(Clone, Copy, Debug)]
struct Usage {
    second: Bucket,
    minute: Bucket,
    tenant_minute: Bucket,
    day_used: u64,
    day_ends_at: chrono::DateTime<chrono::Utc>,
}

impl Usage {
    fn new() -> Usage {
        Usage {
            second: Bucket::full(),
            minute: Bucket::full(),
            tenant_minute: Bucket::full(),
            day_used: 0,
            day_ends_at: crate::ratelimit::next_utc_midnight(chrono::Utc::now()),
        }
    }

    fn roll_day(&mut self) {
        let now = chrono::Utc::now();
        if now >= self.day_ends_at {
            self.day_used = 0;
            self.day_ends_at = crate::ratelimit::next_utc_midnight(now);
        }
    }

    /// Counts one request if every limit has room; else which one is full.
    fn admit(&mut self, l: &SimLimits, now: Instant) -> Result<(), &'static str> {
        const SEC: Duration = Duration::from_secs(1);
        const MIN: Duration = Duration::from_secs(60);
        self.roll_day();
        if self.day_used >= l.per_day {
            return Err("quota");
        }
        if self.second.level(l.per_second, SEC, now) < 1.0 {
            return Err("spike");
        }
        if self.minute.level(l.per_minute, MIN, now) < 1.0
            || self.tenant_minute.level(l.tenant_per_minute, MIN, now) < 1.0
        {
            return Err("quota");
        }
        self.second.take(l.per_second, SEC, now);
        self.minute.take(l.per_minute, MIN, now);
        self.tenant_minute.take(l.tenant_per_minute, MIN, now);
        self.day_used += 1;
        Ok(())
    }

    /// Keap's `x-keap-*` headers as of now.
    fn headers(&self, l: &SimLimits, now: Instant, h: &mut HeaderMap) {
        const MIN: Duration = Duration::from_secs(60);
        let mut put = |name: &'static str, v: u64| {
            h.insert(name, HeaderValue::from(v));
        };
        put("x-keap-product-quota-limit", l.per_day);
        put(
            "x-keap-product-quota-available",
            l.per_day.saturating_sub(self.day_used),
        );
        put("x-keap-product-quota-used", self.day_used);
        put(
            "x-keap-product-quota-expiry-time",
            u64::try_from(self.day_ends_at.timestamp_millis()).unwrap_or(0),
        );
        let throttle = |b: &Bucket, cap: u32| -> (u64, u64) {
            let avail = b.level(cap, MIN, now).max(0.0).floor() as u64;
            (avail, u64::from(cap).saturating_sub(avail))
        };
        let (avail, used) = throttle(&self.minute, l.per_minute);
        put("x-keap-product-throttle-limit", u64::from(l.per_minute));
        put("x-keap-product-throttle-available", avail);
        put("x-keap-product-throttle-used", used);
        let (avail, used) = throttle(&self.tenant_minute, l.tenant_per_minute);
        put(
            "x-keap-tenant-throttle-limit",
            u64::from(l.tenant_per_minute),
        );
        put("x-keap-tenant-throttle-available", avail);
        put("x-keap-tenant-throttle-used", used);
    }
}

struct Issued {
    access_token: String,
    refresh_token: Option<String>,
    expires_in: u64,
    /// Members the provider adds to its answers (see [`Quirks::token_extras`]).
    extras: Vec<(String, serde_json::Value)>,
    omit_expires_in: bool,
}

impl State {
    /// `v` with `{sim}` in a string replaced by the issuer (see
    /// [`Quirks::token_extras`]).
    fn own_url_in(&self, v: &serde_json::Value) -> serde_json::Value {
        match (v.as_str(), &self.issuer) {
            (Some(s), Some(issuer)) if s.contains("{sim}") => {
                serde_json::Value::String(s.replace("{sim}", issuer))
            }
            _ => v.clone(),
        }
    }

    fn is_public_client(&self) -> bool {
        self.config.client_secret.is_empty()
    }

    fn new_grant(&mut self) -> usize {
        self.grants.push(Grant {
            authorized_at: Some(Instant::now()),
            ..Grant::default()
        });
        self.grants.len() - 1
    }

    fn issue(&mut self, grant: usize, with_refresh: bool) -> Issued {
        let lifetime = self.config.access_lifetime;
        if self.config.revoke_old_access_on_refresh {
            if let Some(g) = self.grants.get(grant) {
                for old in &g.access_tokens {
                    if let Some(entry) = self.access.get_mut(old) {
                        entry.revoked = true;
                    }
                }
            }
        }
        let access_token = random_token();
        self.access.insert(
            access_token.clone(),
            AccessEntry {
                grant,
                expires_at: Instant::now() + lifetime,
                revoked: false,
            },
        );
        self.access_log.push(access_token.clone());
        let refresh_token = with_refresh.then(random_token);
        if let Some(g) = self.grants.get_mut(grant) {
            g.access_tokens.push(access_token.clone());
            if let Some(rt) = &refresh_token {
                g.refresh_tokens.push(rt.clone());
                g.current_refresh = Some(rt.clone());
            }
        }
        if let Some(rt) = &refresh_token {
            self.refresh.insert(
                rt.clone(),
                RefreshEntry {
                    grant,
                    status: RefreshStatus::Valid,
                    last_used: Instant::now(),
                },
            );
            self.refresh_log.push(rt.clone());
        }
        Issued {
            access_token,
            refresh_token,
            expires_in: lifetime.as_secs(),
            extras: self
                .config
                .quirks
                .token_extras
                .iter()
                .map(|(k, v)| (k.clone(), self.own_url_in(v)))
                .collect(),
            omit_expires_in: self.config.quirks.omit_expires_in,
        }
    }

    fn revoke_grant(&mut self, grant: usize) {
        let Some(g) = self.grants.get_mut(grant) else {
            return;
        };
        g.revoked = true;
        g.current_refresh = None;
        for rt in &g.refresh_tokens {
            if let Some(entry) = self.refresh.get_mut(rt) {
                // Rotated-out tokens stay `Used` so that presenting one later
                // is still reported as reuse, which is the more serious bug.
                if entry.status == RefreshStatus::Valid {
                    entry.status = RefreshStatus::Revoked;
                }
            }
        }
        for at in &g.access_tokens {
            if let Some(entry) = self.access.get_mut(at) {
                entry.revoked = true;
            }
        }
    }

    /// Whether refresh token `rt` of `grant` has outlived the provider's
    /// idle lifetime (since its issue or last use) or the grant's maximum.
    fn refresh_token_expired(&self, rt: &str, grant: usize) -> bool {
        let now = Instant::now();
        let quirks = &self.config.quirks;
        let idle = quirks.refresh_token_idle.is_some_and(|idle| {
            self.refresh
                .get(rt)
                .is_some_and(|e| now.duration_since(e.last_used) >= idle)
        });
        let capped = quirks.refresh_token_max.is_some_and(|max| {
            self.grants
                .get(grant)
                .and_then(|g| g.authorized_at)
                .is_some_and(|at| now.duration_since(at) >= max)
        });
        idle || capped
    }

    fn access_valid(&self, token: &str) -> bool {
        self.access.get(token).is_some_and(|e| {
            !e.revoked
                && Instant::now() < e.expires_at
                && self.grants.get(e.grant).is_some_and(|g| !g.revoked)
        })
    }
}

/// The simulated provider. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct Simulator {
    // std Mutex on purpose: every critical section is short and synchronous,
    // and the lock is never held across an `.await`.
    state: Arc<Mutex<State>>,
}

impl fmt::Debug for Simulator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Simulator").finish_non_exhaustive()
    }
}

/// A simulator serving on a local port; the server task stops on drop.
pub struct RunningSimulator {
    /// Handle for driving and inspecting the simulator.
    pub sim: Simulator,
    /// Like `http://127.0.0.1:PORT`, without a trailing slash.
    pub base_url: String,
    handle: tokio::task::JoinHandle<()>,
}

impl RunningSimulator {
    /// `base_url` joined with `path` (which should start with `/`).
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base_url, path)
    }
}

impl Drop for RunningSimulator {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

impl Simulator {
    /// Creates a simulator with no grants.
    pub fn new(config: SimulatorConfig) -> Self {
        Self {
            state: Arc::new(Mutex::new(State {
                config,
                token_delay: Duration::ZERO,
                delay_phase: DelayPhase::BeforeProcessing,
                fault_queue: VecDeque::new(),
                persistent_fault: None,
                answer_shape: None,
                codes: HashMap::new(),
                grants: Vec::new(),
                refresh: HashMap::new(),
                access: HashMap::new(),
                refresh_log: Vec::new(),
                access_log: Vec::new(),
                stats: SimStats::default(),
                usage: Usage::new(),
                revoke_fault: None,
                strict_revocation: false,
                issuer: None,
                discovery_fault: None,
                client_credentials_scope: None,
                token_calls: VecDeque::new(),
                device: device::DeviceState::default(),
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere must not turn every later request into a panic.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Routes, relative to where the router is mounted:
    ///
    /// - `GET /authorize`: consent page with Approve/Deny forms (posting to
    ///   the relative `approve`/`deny`, so it works under any mount point).
    /// - `POST /approve`: 302 to `redirect_uri?code=..&state=..`.
    /// - `POST /deny`: 302 to `redirect_uri?error=access_denied&..`.
    /// - `POST /token`: `authorization_code`, `refresh_token` and
    ///   `client_credentials` grants (the last: a fresh independent access
    ///   token per call, lifetime `access_lifetime`, no refresh token).
    /// - `POST /revoke`: RFC 7009; revokes the whole grant.
    /// - `POST /device/code`: RFC 8628 device authorization; `GET /device`
    ///   and `POST /device`: the page where a person enters the user code.
    /// - `GET /.well-known/openid-configuration` and
    ///   `/.well-known/oauth-authorization-server`: the endpoints above, for
    ///   the issuer set with [`Simulator::set_issuer`] (404 without one).
    /// - `ANY /api/{*path}`: bearer-protected echo; `large?bytes=N` streams
    ///   N bytes of `application/octet-stream`; `headers` echoes the request
    ///   headers (not the bearer token). With `limits`, Keap's rate limits
    ///   and `x-keap-*` headers apply.
    /// - `GET /_sim/stats`, `POST /_sim/config`, `POST /_sim/revoke_all`:
    ///   only when `control_api` is enabled, 404 otherwise.
    pub fn router(&self) -> Router {
        let control = self.lock().config.control_api;
        let mut router = Router::new()
            .route("/authorize", get(authorize_page))
            .route("/approve", post(approve))
            .route("/deny", post(deny))
            .route("/token", post(token_endpoint))
            .route("/revoke", post(revoke_endpoint))
            .route("/device/code", post(device::device_authorization))
            .route(
                "/device",
                get(device::verification_page).post(device::verification_answer),
            )
            .route("/api/{*path}", any(api_endpoint))
            .route(
                "/.well-known/openid-configuration",
                get(discovery::openid_configuration),
            )
            .route(
                "/.well-known/oauth-authorization-server",
                get(discovery::oauth_authorization_server),
            );
        if control {
            router = router
                .route("/_sim/stats", get(sim_stats))
                .route("/_sim/config", post(sim_config))
                .route("/_sim/revoke_all", post(sim_revoke_all));
        }
        router.with_state(self.clone())
    }

    /// Binds 127.0.0.1:0 and serves [`Self::router`] at the root in a tokio
    /// task until the returned handle is dropped.
    pub async fn start_local(config: SimulatorConfig) -> std::io::Result<RunningSimulator> {
        let sim = Simulator::new(config);
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        sim.set_issuer(Some(format!("http://{addr}")));
        let router = sim.router();
        let handle = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router).await {
                tracing::warn!(error = %e, "provider simulator stopped serving");
            }
        });
        tracing::debug!(%addr, "provider simulator listening");
        Ok(RunningSimulator {
            sim,
            base_url: format!("http://{addr}"),
            handle,
        })
    }

    /// Queues a fault; each `/token` request (any grant type) consumes the
    /// next queued fault, if any.
    pub fn push_fault(&self, fault: Fault) {
        self.lock().fault_queue.push_back(fault);
    }

    /// Sets (or clears) a fault applied to every `refresh_token` and
    /// `client_credentials` grant request until cleared. Queued faults take
    /// precedence.
    pub fn set_fault(&self, fault: Option<Fault>) {
        self.lock().persistent_fault = fault;
    }

    /// Shapes every successful `/token` answer from now on (`None`: the
    /// standard shape).
    pub fn set_answer_shape(&self, shape: Option<AnswerShape>) {
        self.lock().answer_shape = shape;
    }

    /// Changes the client secret the simulator expects, as when the
    /// operator rotates it at the provider: a client still sending the old
    /// one gets `invalid_client`.
    pub fn set_client_secret(&self, secret: &str) {
        self.lock().config.client_secret = secret.to_owned();
    }

    /// Delays every `/token` response; `Duration::ZERO` disables the delay.
    pub fn set_token_delay(&self, delay: Duration, phase: DelayPhase) {
        let mut st = self.lock();
        st.token_delay = delay;
        st.delay_phase = phase;
    }

    /// Lifetime of access tokens issued from now on; existing ones keep theirs.
    pub fn set_access_lifetime(&self, d: Duration) {
        self.lock().config.access_lifetime = d;
    }

    /// Members added to every token answer from now on (see
    /// [`Quirks::token_extras`]), as when a provider moves an organisation
    /// to another instance.
    pub fn set_token_extras(&self, extras: Vec<(String, serde_json::Value)>) {
        self.lock().config.quirks.token_extras = extras;
    }

    /// Invalidates every existing refresh and access token, as if the user
    /// disconnected the app in Keap.
    pub fn revoke_all_grants(&self) {
        let mut st = self.lock();
        for i in 0..st.grants.len() {
            st.revoke_grant(i);
        }
    }

    /// Pretends `used` API calls were already made today (e.g. by other
    /// installations of the same client), so a test can start near the
    /// end of the daily quota.
    pub fn set_daily_used(&self, used: u64) {
        let mut st = self.lock();
        st.usage.roll_day();
        st.usage.day_used = used;
    }

    /// Kills every access token issued so far while grants and refresh
    /// tokens stay valid, as when a provider invalidates tokens early.
    pub fn expire_access_tokens(&self) {
        for e in self.lock().access.values_mut() {
            e.revoked = true;
        }
    }

    /// Makes `/revoke` fail with this status and an OAuth error body
    /// (`None`: revoke normally).
    pub fn set_revoke_fault(&self, status: Option<u16>) {
        self.lock().revoke_fault = status;
    }

    /// With `true`, revoking a token that is no longer valid (a rotated-out
    /// refresh token, an expired access token) revokes nothing, as at
    /// providers that only know a grant by its current tokens; by default
    /// any token of a grant revokes the whole grant.
    pub fn set_strict_revocation(&self, on: bool) {
        self.lock().strict_revocation = on;
    }

    /// How many grants still hold a refresh token that works.
    pub fn live_grants(&self) -> usize {
        let st = self.lock();
        st.grants
            .iter()
            .filter(|g| {
                !g.revoked
                    && g.refresh_tokens.iter().any(|t| {
                        st.refresh
                            .get(t)
                            .is_some_and(|e| e.status == RefreshStatus::Valid)
                    })
            })
            .count()
    }

    /// The `scope` parameter of the last client_credentials request that
    /// issued a token.
    pub fn last_client_credentials_scope(&self) -> Option<String> {
        self.lock().client_credentials_scope.clone()
    }

    /// When the latest refresh and client-credentials requests arrived,
    /// oldest first (the last 1000).
    pub fn token_call_times(&self) -> Vec<Instant> {
        self.lock().token_calls.iter().copied().collect()
    }

    /// Snapshot of the counters.
    pub fn stats(&self) -> SimStats {
        self.lock().stats.clone()
    }

    /// Whether `token` was issued here and is neither expired nor revoked.
    pub fn access_token_valid(&self, token: &str) -> bool {
        self.lock().access_valid(token)
    }

    /// Every refresh token ever issued, oldest first.
    pub fn refresh_tokens_issued(&self) -> Vec<String> {
        self.lock().refresh_log.clone()
    }

    /// Every access token ever issued, oldest first.
    pub fn access_tokens_issued(&self) -> Vec<String> {
        self.lock().access_log.clone()
    }

    /// The newest valid refresh token of the newest grant; `None` when there
    /// is no grant or the newest grant was revoked.
    pub fn current_refresh_token(&self) -> Option<String> {
        let st = self.lock();
        let grant = st.grants.last()?;
        if grant.revoked {
            return None;
        }
        let rt = grant.current_refresh.as_ref()?;
        let valid = st
            .refresh
            .get(rt)
            .is_some_and(|e| e.status == RefreshStatus::Valid);
        valid.then(|| rt.clone())
    }
}

// ---------------------------------------------------------------------------
// helpers

fn random_token() -> String {
    rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(TOKEN_LEN)
        .map(char::from)
        .collect()
}

type Params = Vec<(String, String)>;

fn parse_params(raw: &[u8]) -> Params {
    url::form_urlencoded::parse(raw).into_owned().collect()
}

/// RFC 6749 §3.1: parameters without a value are treated as omitted.
fn param<'a>(params: &'a Params, name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, v)| k == name && !v.is_empty())
        .map(|(_, v)| v.as_str())
}

fn repeated_param(params: &Params) -> Option<&str> {
    params.iter().enumerate().find_map(|(i, (k, _))| {
        params[..i]
            .iter()
            .any(|(prev, _)| prev == k)
            .then_some(k.as_str())
    })
}

fn json_response(status: StatusCode, body: serde_json::Value) -> Response {
    let mut resp = (status, body.to_string()).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(JSON_CT));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    resp
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    let mut resp = json_response(
        status,
        serde_json::json!({ "error": error, "error_description": description }),
    );
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"tokenkeeper-simulator\""),
        );
    }
    resp
}

fn invalid_request(description: &str) -> Response {
    oauth_error(StatusCode::BAD_REQUEST, "invalid_request", description)
}

fn invalid_client(description: &str) -> Response {
    oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", description)
}

fn refresh_rejected(style: RefreshErrorStyle) -> Response {
    match style {
        RefreshErrorStyle::Keap => invalid_request("Invalid Refresh Token"),
        RefreshErrorStyle::InvalidGrant => oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "The refresh token is invalid, expired, revoked, or already used",
        ),
    }
}

fn apigee_fault(status: StatusCode, faultstring: &str, errorcode: &str) -> Response {
    json_response(
        status,
        serde_json::json!({
            "fault": { "faultstring": faultstring, "detail": { "errorcode": errorcode } }
        }),
    )
}

/// The simulator's pages: plain, like a provider's, and escaped by
/// construction (`maud`), as the daemon's own are.
fn html_page(status: StatusCode, title: &str, body: maud::Markup) -> Response {
    let page = maud::html! {
        (maud::DOCTYPE)
        html {
            head { meta charset="utf-8"; title { (title) } }
            body { h1 { (title) } (body) }
        }
    };
    let mut resp = (status, page.into_string()).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn redirect(location: &str) -> Response {
    match HeaderValue::from_str(location) {
        Ok(v) => {
            let mut resp = StatusCode::FOUND.into_response();
            resp.headers_mut().insert(header::LOCATION, v);
            resp
        }
        Err(_) => html_page(
            StatusCode::BAD_REQUEST,
            "Invalid redirect_uri",
            maud::html! { p { "The redirect URI cannot be used in a Location header." } },
        ),
    }
}

fn has_form_content_type(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| {
            m.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        })
}

async fn read_body(body: Body, limit: usize) -> Result<Bytes, Response> {
    axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| invalid_request("Request body could not be read or is too large"))
}
