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

// Handlers build their rejection as a finished `Response` and return it
// through `Err`; boxing it would only add noise on a cold path.
#![allow(clippy::result_large_err)]

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
    /// Rejected refreshes (unknown, reused, revoked, injected RejectRefresh).
    pub refresh_rejected: u64,
    /// Every request to `/api/*`, authorized or not.
    pub api_calls: u64,
    /// `/api/*` requests rejected for a missing or invalid bearer token.
    pub api_unauthorized: u64,
    /// `/api/*` requests answered 429 because a limit was exceeded.
    pub api_rate_limited: u64,
    /// Grants revoked through `/revoke` (unknown tokens do not count).
    pub revocations: u64,
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
}

struct AccessEntry {
    grant: usize,
    expires_at: Instant,
    revoked: bool,
}

#[derive(Default)]
struct Grant {
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
}

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
}

impl State {
    fn is_public_client(&self) -> bool {
        self.config.client_secret.is_empty()
    }

    fn new_grant(&mut self) -> usize {
        self.grants.push(Grant::default());
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
                },
            );
            self.refresh_log.push(rt.clone());
        }
        Issued {
            access_token,
            refresh_token,
            expires_in: lifetime.as_secs(),
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
    /// - `POST /token`: `authorization_code` and `refresh_token` grants.
    /// - `POST /revoke`: RFC 7009; revokes the whole grant.
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
            .route("/api/{*path}", any(api_endpoint));
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

    /// Sets (or clears) a fault applied to every `refresh_token` grant
    /// request until cleared. Queued faults take precedence.
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

fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

fn html_page(status: StatusCode, title: &str, body_html: &str) -> Response {
    let page = format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{t}</title></head>\
         <body><h1>{t}</h1>\n{body_html}\n</body></html>\n",
        t = html_escape(title)
    );
    let mut resp = (status, page).into_response();
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
            "<p>The redirect URI cannot be used in a Location header.</p>",
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

/// Credentials from an `Authorization: Basic` header, if one was sent.
fn basic_credentials(headers: &HeaderMap) -> Result<Option<(String, String)>, Response> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .map_err(|_| invalid_request("Malformed Authorization header"))?;
    let (scheme, rest) = value.trim().split_once(' ').unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(invalid_client(
            "Unsupported client authentication scheme; use HTTP Basic",
        ));
    }
    let decoded = STANDARD
        .decode(rest.trim())
        .map_err(|_| invalid_request("Malformed Basic authorization header: bad base64"))?;
    let decoded = String::from_utf8(decoded)
        .map_err(|_| invalid_request("Malformed Basic authorization header: not UTF-8"))?;
    let (id, secret) = decoded
        .split_once(':')
        .ok_or_else(|| invalid_request("Malformed Basic authorization header: missing ':'"))?;
    // RFC 6749 2.3.1: both parts are form-urlencoded before Basic encoding.
    let form_decode = |s: &str| -> String {
        url::form_urlencoded::parse(format!("x={s}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default()
    };
    Ok(Some((form_decode(id), form_decode(secret))))
}

/// Checks client credentials. `basic_only` forbids credentials in the body
/// for confidential clients (Keap's refresh behaviour).
fn authenticate_client(
    config: &SimulatorConfig,
    headers: &HeaderMap,
    params: &Params,
    basic_only: bool,
) -> Result<(), Response> {
    let public = config.client_secret.is_empty();
    let body_id = param(params, "client_id");
    let body_secret = param(params, "client_secret");
    match basic_credentials(headers)? {
        Some((id, secret)) => {
            if body_secret.is_some() {
                return Err(invalid_request(
                    "Client credentials supplied both in the Authorization header and in the body",
                ));
            }
            if body_id.is_some_and(|b| b != id) {
                return Err(invalid_client(
                    "client_id does not match the Authorization header",
                ));
            }
            if id != config.client_id || secret != config.client_secret {
                return Err(invalid_client("Invalid client credentials"));
            }
            Ok(())
        }
        None => {
            let Some(id) = body_id else {
                return Err(invalid_client("Client authentication required"));
            };
            if id != config.client_id {
                return Err(invalid_client("Invalid client credentials"));
            }
            if public {
                return match body_secret {
                    None => Ok(()),
                    Some(_) => Err(invalid_client("Invalid client credentials")),
                };
            }
            if basic_only {
                return Err(invalid_client(
                    "Client must authenticate with HTTP Basic on refresh",
                ));
            }
            match body_secret {
                Some(s) if s == config.client_secret => Ok(()),
                Some(_) => Err(invalid_client("Invalid client credentials")),
                None => Err(invalid_client("Client authentication required")),
            }
        }
    }
}

fn pkce_matches(verifier: &str, challenge: &str, method: ChallengeMethod) -> bool {
    match method {
        ChallengeMethod::S256 => {
            URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes())) == challenge
        }
        ChallengeMethod::Plain => verifier == challenge,
    }
}

fn fault_response_immediate(fault: &Fault, style: RefreshErrorStyle) -> Option<Response> {
    let resp = match fault {
        Fault::Status(code) => {
            let status = StatusCode::from_u16(*code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let reason = status.canonical_reason().unwrap_or("Error");
            if status.is_server_error() {
                html_page(
                    status,
                    &format!("{} {reason}", status.as_u16()),
                    "<p>The upstream server is temporarily unable to service your request.</p>",
                )
            } else {
                let mut resp = (status, format!("{} {reason}\n", status.as_u16())).into_response();
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; charset=utf-8"),
                );
                resp
            }
        }
        Fault::RateLimited { retry_after_secs } => {
            let mut resp = apigee_fault(
                StatusCode::TOO_MANY_REQUESTS,
                "Rate limit quota violation. Quota limit exceeded. Identifier : sim1234",
                "policies.ratelimit.QuotaViolation",
            );
            if let Some(secs) = retry_after_secs {
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(*secs));
            }
            resp
        }
        Fault::Garbage => {
            // Labelled JSON on purpose: clients must not trust the header.
            let mut resp = (
                StatusCode::OK,
                "<html><body>Service temporarily unavailable</body></html>",
            )
                .into_response();
            resp.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static(JSON_CT));
            resp
        }
        Fault::MissingAccessToken => json_response(
            StatusCode::OK,
            serde_json::json!({ "token_type": "bearer", "expires_in": 86400, "scope": SIM_SCOPE }),
        ),
        Fault::RejectRefresh => refresh_rejected(style),
        Fault::OAuthError {
            status,
            error,
            description,
        } => {
            let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_REQUEST);
            let mut body = serde_json::json!({ "error": error });
            if let (Some(d), Some(obj)) = (description, body.as_object_mut()) {
                obj.insert("error_description".into(), d.as_str().into());
            }
            json_response(status, body)
        }
        Fault::Hang(_) => return None,
    };
    Some(resp)
}

// ---------------------------------------------------------------------------
// authorization endpoint

struct AuthorizeRequest {
    params: Params,
    redirect_uri: url::Url,
    challenge: Option<(String, ChallengeMethod)>,
}

fn validate_authorize(
    config: &SimulatorConfig,
    params: Params,
) -> Result<AuthorizeRequest, Response> {
    let bad = |msg: &str| {
        html_page(
            StatusCode::BAD_REQUEST,
            "Invalid authorization request",
            &format!("<p>{}</p>", html_escape(msg)),
        )
    };
    if param(&params, "client_id") != Some(config.client_id.as_str()) {
        return Err(bad("Unknown or missing client_id."));
    }
    let Some(redirect_raw) = param(&params, "redirect_uri") else {
        return Err(bad("Missing redirect_uri."));
    };
    let redirect_uri = match url::Url::parse(redirect_raw) {
        Ok(u) if u.fragment().is_none() => u,
        _ => {
            return Err(bad(
                "redirect_uri must be an absolute URI without a fragment.",
            ))
        }
    };
    if param(&params, "response_type") != Some("code") {
        return Err(bad("response_type must be \"code\"."));
    }
    let challenge = match param(&params, "code_challenge") {
        None => None,
        Some(c) => {
            let method = match param(&params, "code_challenge_method") {
                None | Some("plain") => ChallengeMethod::Plain,
                Some("S256") => ChallengeMethod::S256,
                Some(_) => return Err(bad("Unsupported code_challenge_method.")),
            };
            Some((c.to_owned(), method))
        }
    };
    Ok(AuthorizeRequest {
        params,
        redirect_uri,
        challenge,
    })
}

async fn authorize_page(AxState(sim): AxState<Simulator>, RawQuery(query): RawQuery) -> Response {
    let params = parse_params(query.unwrap_or_default().as_bytes());
    let config = sim.lock().config.clone();
    let req = match validate_authorize(&config, params) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let hidden: String = req
        .params
        .iter()
        .map(|(k, v)| {
            format!(
                "<input type=\"hidden\" name=\"{}\" value=\"{}\">",
                html_escape(k),
                html_escape(v)
            )
        })
        .collect();
    let body = format!(
        "<p>The application <b>{client}</b> wants access to your Keap account \
         (simulated; scope <code>{scope}</code>).</p>\n\
         <form method=\"post\" action=\"approve\">{hidden}<button type=\"submit\" id=\"approve\">Approve</button></form>\n\
         <form method=\"post\" action=\"deny\">{hidden}<button type=\"submit\" id=\"deny\">Deny</button></form>",
        client = html_escape(&config.client_id),
        scope = html_escape(SIM_SCOPE),
    );
    html_page(StatusCode::OK, "Keap simulator: authorize access", &body)
}

async fn approve(AxState(sim): AxState<Simulator>, body: Body) -> Response {
    let raw = match read_body(body, FORM_BODY_LIMIT).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let params = parse_params(&raw);
    let mut st = sim.lock();
    let req = match validate_authorize(&st.config, params) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let code = random_token();
    let now = Instant::now();
    let client_id = st.config.client_id.clone();
    // Expired codes are useless; dropping them keeps long dev sessions small.
    st.codes.retain(|_, c| c.expires_at > now);
    st.codes.insert(
        code.clone(),
        AuthCode {
            client_id,
            redirect_uri: param(&req.params, "redirect_uri")
                .unwrap_or_default()
                .to_owned(),
            challenge: req.challenge,
            expires_at: now + CODE_LIFETIME,
            used: false,
        },
    );
    drop(st);
    tracing::debug!("simulator: authorization approved, code issued");
    let mut location = req.redirect_uri;
    {
        let mut q = location.query_pairs_mut();
        q.append_pair("code", &code);
        if let Some(state) = param(&req.params, "state") {
            q.append_pair("state", state);
        }
    }
    redirect(location.as_str())
}

async fn deny(AxState(sim): AxState<Simulator>, body: Body) -> Response {
    let raw = match read_body(body, FORM_BODY_LIMIT).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let config = sim.lock().config.clone();
    let req = match validate_authorize(&config, parse_params(&raw)) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let mut location = req.redirect_uri;
    {
        let mut q = location.query_pairs_mut();
        q.append_pair("error", "access_denied");
        q.append_pair(
            "error_description",
            "The user denied the authorization request",
        );
        if let Some(state) = param(&req.params, "state") {
            q.append_pair("state", state);
        }
    }
    redirect(location.as_str())
}

// ---------------------------------------------------------------------------
// token endpoint

fn token_success(issued: &Issued, shape: Option<&AnswerShape>) -> Response {
    let mut body = serde_json::json!({
        "access_token": issued.access_token,
        "token_type": "bearer",
        "expires_in": issued.expires_in,
        "scope": SIM_SCOPE,
    });
    let Some(obj) = body.as_object_mut() else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    if let Some(rt) = &issued.refresh_token {
        obj.insert(
            "refresh_token".to_owned(),
            serde_json::Value::from(rt.as_str()),
        );
    }
    let mut status = StatusCode::OK;
    let mut raw_expires_in = None;
    match shape {
        None | Some(AnswerShape::TextPlain) => {}
        Some(AnswerShape::ExpiresIn(raw)) => {
            obj.remove("expires_in");
            raw_expires_in = Some(raw.as_str());
        }
        Some(AnswerShape::NoTokenType) => {
            obj.remove("token_type");
        }
        Some(AnswerShape::TokenType(t)) => {
            obj.insert("token_type".into(), t.as_str().into());
        }
        Some(AnswerShape::Status(code)) => {
            status = StatusCode::from_u16(*code).unwrap_or(StatusCode::OK);
        }
        Some(AnswerShape::NoAccessToken) => {
            obj.remove("access_token");
        }
    }
    let mut text = body.to_string();
    if let Some(raw) = raw_expires_in {
        // Spliced as text: `1e400` is no serde_json number.
        text = format!("{{\"expires_in\":{raw},{}", &text[1..]);
    }
    let mut resp = (status, text).into_response();
    let h = resp.headers_mut();
    let ct = if shape == Some(&AnswerShape::TextPlain) {
        "text/plain; charset=utf-8"
    } else {
        JSON_CT
    };
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    resp
}

/// Processes a validated token request; `Ok` means tokens were issued.
fn process_token(
    sim: &Simulator,
    headers: &HeaderMap,
    params: &Params,
) -> Result<Response, Response> {
    if !has_form_content_type(headers) {
        return Err(invalid_request(
            "Content-Type must be application/x-www-form-urlencoded",
        ));
    }
    if let Some(name) = repeated_param(params) {
        return Err(invalid_request(&format!("Parameter {name} is repeated")));
    }
    let mut st = sim.lock();
    match param(params, "grant_type") {
        None => Err(invalid_request("Missing grant_type")),
        Some("authorization_code") => {
            authenticate_client(&st.config, headers, params, false)?;
            let Some(code) = param(params, "code") else {
                return Err(invalid_request("Missing code"));
            };
            let invalid_grant = |d: &str| oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", d);
            let client_id = st.config.client_id.clone();
            let Some(entry) = st.codes.get_mut(code) else {
                return Err(invalid_grant("Invalid authorization code"));
            };
            if entry.used || entry.expires_at <= Instant::now() || entry.client_id != client_id {
                return Err(invalid_grant("Invalid authorization code"));
            }
            if param(params, "redirect_uri") != Some(entry.redirect_uri.as_str()) {
                return Err(invalid_grant(
                    "redirect_uri does not match the authorization request",
                ));
            }
            let verifier = param(params, "code_verifier");
            match (&entry.challenge, verifier) {
                (Some((challenge, method)), Some(v)) if pkce_matches(v, challenge, *method) => {}
                (Some(_), _) => return Err(invalid_grant("PKCE verification failed")),
                // A verifier without a challenge means the client and server
                // disagree about PKCE; refusing surfaces that client bug.
                (None, Some(_)) => {
                    return Err(invalid_grant(
                        "code_verifier sent but no code_challenge was registered",
                    ))
                }
                (None, None) => {}
            }
            entry.used = true;
            let grant = st.new_grant();
            let issued = st.issue(grant, true);
            st.stats.code_exchanges += 1;
            let shape = st.answer_shape.clone();
            drop(st);
            tracing::debug!("simulator: authorization code exchanged");
            Ok(token_success(&issued, shape.as_ref()))
        }
        Some("refresh_token") => {
            let basic_only = st.config.require_basic_on_refresh && !st.is_public_client();
            authenticate_client(&st.config, headers, params, basic_only)?;
            let Some(rt) = param(params, "refresh_token") else {
                return Err(invalid_request("Missing refresh_token"));
            };
            let style = st.config.refresh_error_style;
            let (grant, status) = match st.refresh.get(rt) {
                Some(e) => (e.grant, e.status),
                None => {
                    st.stats.refresh_rejected += 1;
                    tracing::debug!("simulator: unknown refresh token rejected");
                    return Err(refresh_rejected(style));
                }
            };
            let grant_revoked = st.grants.get(grant).is_none_or(|g| g.revoked);
            match status {
                RefreshStatus::Used => {
                    st.stats.refresh_reuse += 1;
                    st.stats.refresh_rejected += 1;
                    tracing::warn!("simulator: rotated-out refresh token presented again (reuse)");
                    return Err(refresh_rejected(style));
                }
                RefreshStatus::Revoked => {
                    st.stats.refresh_rejected += 1;
                    return Err(refresh_rejected(style));
                }
                RefreshStatus::Valid if grant_revoked => {
                    st.stats.refresh_rejected += 1;
                    return Err(refresh_rejected(style));
                }
                RefreshStatus::Valid => {}
            }
            let rotate = st.config.rotate_refresh_tokens;
            if rotate {
                if let Some(e) = st.refresh.get_mut(rt) {
                    e.status = RefreshStatus::Used;
                }
            }
            let issued = st.issue(grant, rotate);
            st.stats.refresh_ok += 1;
            let shape = st.answer_shape.clone();
            drop(st);
            tracing::debug!(rotated = rotate, "simulator: refresh succeeded");
            Ok(token_success(&issued, shape.as_ref()))
        }
        Some(_) => Err(oauth_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "grant_type must be authorization_code or refresh_token",
        )),
    }
}

async fn token_endpoint(
    AxState(sim): AxState<Simulator>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let raw = match read_body(body, FORM_BODY_LIMIT).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    // Parsed before the content-type check so a refresh is counted (and
    // faults apply) no matter how malformed the rest of the request is.
    let params = parse_params(&raw);
    let is_refresh = param(&params, "grant_type") == Some("refresh_token");
    let (fault, delay, phase, style) = {
        let mut st = sim.lock();
        if is_refresh {
            st.stats.refresh_calls += 1;
        }
        let fault = match st.fault_queue.pop_front() {
            Some(f) => Some(f),
            None if is_refresh => st.persistent_fault.clone(),
            None => None,
        };
        if is_refresh && fault == Some(Fault::RejectRefresh) {
            st.stats.refresh_rejected += 1;
        }
        (
            fault,
            st.token_delay,
            st.delay_phase,
            st.config.refresh_error_style,
        )
    };
    if phase == DelayPhase::BeforeProcessing && !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if let Some(fault) = fault {
        tracing::debug!(?fault, "simulator: injecting token endpoint fault");
        if let Fault::Hang(d) = fault {
            tokio::time::sleep(d).await;
            return apigee_fault(
                StatusCode::GATEWAY_TIMEOUT,
                "Gateway Timeout",
                "messaging.adaptors.http.flow.GatewayTimeout",
            );
        }
        if let Some(resp) = fault_response_immediate(&fault, style) {
            return resp;
        }
    }
    match process_token(&sim, &headers, &params) {
        Ok(resp) => {
            if phase == DelayPhase::AfterRotation && !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            resp
        }
        Err(resp) => resp,
    }
}

// ---------------------------------------------------------------------------
// revocation endpoint

async fn revoke_endpoint(
    AxState(sim): AxState<Simulator>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let raw = match read_body(body, FORM_BODY_LIMIT).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    if !has_form_content_type(&headers) {
        return invalid_request("Content-Type must be application/x-www-form-urlencoded");
    }
    let params = parse_params(&raw);
    let mut st = sim.lock();
    if let Some(status) = st.revoke_fault {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let error = if status.is_server_error() {
            "temporarily_unavailable"
        } else {
            "unsupported_token_type"
        };
        return (
            status,
            [(header::CONTENT_TYPE, JSON_CT)],
            serde_json::json!({
                "error": error,
                "error_description": "simulated revocation failure",
            })
            .to_string(),
        )
            .into_response();
    }
    if let Err(resp) = authenticate_client(&st.config, &headers, &params, false) {
        return resp;
    }
    let Some(token) = param(&params, "token") else {
        return invalid_request("Missing token");
    };
    // The hint is only an optimisation in RFC 7009; both tables are searched.
    let strict = st.strict_revocation;
    let grant = st
        .refresh
        .get(token)
        .filter(|e| !strict || e.status == RefreshStatus::Valid)
        .map(|e| e.grant)
        .or_else(|| {
            st.access
                .get(token)
                .filter(|_| !strict || st.access_valid(token))
                .map(|e| e.grant)
        });
    if let Some(g) = grant {
        if st.grants.get(g).is_some_and(|g| !g.revoked) {
            st.revoke_grant(g);
            st.stats.revocations += 1;
            tracing::debug!("simulator: grant revoked");
        }
    }
    StatusCode::OK.into_response()
}

// ---------------------------------------------------------------------------
// protected API

fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

async fn api_endpoint(
    AxState(sim): AxState<Simulator>,
    method: Method,
    Path(path): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let authorized = {
        let mut st = sim.lock();
        st.stats.api_calls += 1;
        let ok = bearer_token(&headers).is_some_and(|t| st.access_valid(t));
        if !ok {
            st.stats.api_unauthorized += 1;
        }
        ok
    };
    if !authorized {
        return apigee_fault(
            StatusCode::UNAUTHORIZED,
            "Invalid Access Token",
            "keymanagement.service.invalid_access_token",
        );
    }
    // Like Apigee: the token is checked first, then the quotas; the
    // headers describe the quotas after this request.
    let mut quota_headers = HeaderMap::new();
    {
        let mut st = sim.lock();
        if let Some(limits) = st.config.limits {
            let now = Instant::now();
            let admitted = st.usage.admit(&limits, now);
            st.usage.headers(&limits, now, &mut quota_headers);
            if let Err(which) = admitted {
                st.stats.api_rate_limited += 1;
                drop(st);
                let mut resp = if which == "spike" {
                    apigee_fault(
                        StatusCode::TOO_MANY_REQUESTS,
                        &format!(
                            "Spike arrest violation. Allowed rate : MessageRate{{messagesPerPeriod={n}, periodInMicroseconds=1000000, maxBurstMessageCount={n}.0}}",
                            n = limits.per_second
                        ),
                        "policies.ratelimit.SpikeArrestViolation",
                    )
                } else {
                    apigee_fault(
                        StatusCode::TOO_MANY_REQUESTS,
                        "Rate limit quota violation. Quota limit exceeded. Identifier : sim1234",
                        "policies.ratelimit.QuotaViolation",
                    )
                };
                resp.headers_mut().extend(quota_headers);
                return resp;
            }
        }
    }
    let mut resp = api_answer(method, path, query, &headers, body).await;
    resp.headers_mut().extend(quota_headers);
    resp
}

/// The API itself: an echo, and `large?bytes=N`.
async fn api_answer(
    method: Method,
    path: String,
    query: Option<String>,
    headers: &HeaderMap,
    body: Body,
) -> Response {
    if path == "headers" {
        // What reached the API, minus the (valid) bearer token itself.
        let seen: serde_json::Map<String, serde_json::Value> = headers
            .iter()
            .filter(|(k, _)| *k != header::AUTHORIZATION)
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into(),
                )
            })
            .collect();
        return json_response(StatusCode::OK, serde_json::json!({ "headers": seen }));
    }
    if path == "large" {
        let params = parse_params(query.as_deref().unwrap_or_default().as_bytes());
        let n = match param(&params, "bytes").map(str::parse::<u64>) {
            Some(Ok(n)) if n <= LARGE_BODY_MAX => n,
            _ => {
                return invalid_request(&format!(
                    "large requires bytes=N with N <= {LARGE_BODY_MAX}"
                ))
            }
        };
        // Deterministic pattern so a client can verify the bytes it relayed;
        // streamed in chunks so a large answer is never one buffer (and a
        // proxy in between is seen to stream, not to buffer).
        const CHUNK: u64 = 64 * 1024;
        let chunks = futures_util::stream::unfold(0u64, move |sent| async move {
            if sent >= n {
                return None;
            }
            let end = (sent + CHUNK).min(n);
            let data: Vec<u8> = (sent..end).map(|i| (i % 251) as u8).collect();
            Some((Ok::<_, std::io::Error>(Bytes::from(data)), end))
        });
        let mut resp = (StatusCode::OK, Body::from_stream(chunks)).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        return resp;
    }
    let body_len = match axum::body::to_bytes(body, API_BODY_LIMIT).await {
        Ok(b) => b.len(),
        Err(_) => {
            return oauth_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request",
                "Request body too large",
            )
        }
    };
    json_response(
        StatusCode::OK,
        serde_json::json!({
            "method": method.as_str(),
            "path": path,
            "query": query,
            "body_len": body_len,
        }),
    )
}

// ---------------------------------------------------------------------------
// control API

async fn sim_stats(AxState(sim): AxState<Simulator>) -> Json<SimStats> {
    Json(sim.stats())
}

async fn sim_revoke_all(AxState(sim): AxState<Simulator>) -> StatusCode {
    sim.revoke_all_grants();
    StatusCode::NO_CONTENT
}

/// JSON representation of a [`Fault`] for `/_sim/config`, e.g.
/// `{"type":"status","status":503}`, `{"type":"rate_limited","retry_after_secs":5}`,
/// `{"type":"garbage"}`, `{"type":"missing_access_token"}`,
/// `{"type":"hang","ms":2000}`, `{"type":"reject_refresh"}`,
/// `{"type":"oauth_error","status":401,"error":"invalid_client"}`.
#[derive(Debug, serde::Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum FaultSpec {
    Status {
        status: u16,
    },
    RateLimited {
        retry_after_secs: Option<u64>,
    },
    Garbage,
    MissingAccessToken,
    Hang {
        ms: u64,
    },
    RejectRefresh,
    OauthError {
        status: u16,
        error: String,
        description: Option<String>,
    },
}

impl From<FaultSpec> for Fault {
    fn from(spec: FaultSpec) -> Self {
        match spec {
            FaultSpec::Status { status } => Fault::Status(status),
            FaultSpec::RateLimited { retry_after_secs } => Fault::RateLimited { retry_after_secs },
            FaultSpec::Garbage => Fault::Garbage,
            FaultSpec::MissingAccessToken => Fault::MissingAccessToken,
            FaultSpec::Hang { ms } => Fault::Hang(Duration::from_millis(ms)),
            FaultSpec::RejectRefresh => Fault::RejectRefresh,
            FaultSpec::OauthError {
                status,
                error,
                description,
            } => Fault::OAuthError {
                status,
                error,
                description,
            },
        }
    }
}

/// Body of `POST /_sim/config`. Absent keys leave a setting unchanged;
/// `"fault": null` clears the persistent fault.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigUpdate {
    token_delay_ms: Option<u64>,
    /// `"before_processing"` (default) or `"after_rotation"`.
    token_delay_phase: Option<String>,
    access_lifetime_secs: Option<u64>,
    #[serde(default, deserialize_with = "present")]
    fault: Option<Option<FaultSpec>>,
}

/// Distinguishes `"fault": null` (clear) from an absent key (keep).
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    <Option<T> as serde::Deserialize>::deserialize(d).map(Some)
}

async fn sim_config(AxState(sim): AxState<Simulator>, body: Body) -> Response {
    let raw = match read_body(body, FORM_BODY_LIMIT).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let update: ConfigUpdate = match serde_json::from_slice(&raw) {
        Ok(u) => u,
        Err(e) => return invalid_request(&format!("Invalid config JSON: {e}")),
    };
    let phase = match update.token_delay_phase.as_deref() {
        None => None,
        Some("before_processing") => Some(DelayPhase::BeforeProcessing),
        Some("after_rotation") => Some(DelayPhase::AfterRotation),
        Some(_) => {
            return invalid_request("token_delay_phase must be before_processing or after_rotation")
        }
    };
    let mut st = sim.lock();
    if let Some(ms) = update.token_delay_ms {
        st.token_delay = Duration::from_millis(ms);
    }
    if let Some(p) = phase {
        st.delay_phase = p;
    }
    if let Some(secs) = update.access_lifetime_secs {
        st.config.access_lifetime = Duration::from_secs(secs);
    }
    if let Some(fault) = update.fault {
        st.persistent_fault = fault.map(Fault::from);
    }
    let phase_name = match st.delay_phase {
        DelayPhase::BeforeProcessing => "before_processing",
        DelayPhase::AfterRotation => "after_rotation",
    };
    json_response(
        StatusCode::OK,
        serde_json::json!({
            "token_delay_ms": u64::try_from(st.token_delay.as_millis()).unwrap_or(u64::MAX),
            "token_delay_phase": phase_name,
            "access_lifetime_secs": st.config.access_lifetime.as_secs(),
            "fault": st.persistent_fault.as_ref().map(|f| format!("{f:?}")),
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const REDIRECT: &str = "http://127.0.0.1:1/callback";
    const VERIFIER: &str = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";

    fn client() -> reqwest::Client {
        reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap()
    }

    fn challenge() -> String {
        URL_SAFE_NO_PAD.encode(Sha256::digest(VERIFIER.as_bytes()))
    }

    struct Tokens {
        access: String,
        refresh: String,
    }

    /// Walks the consent flow and returns the authorization code.
    async fn authorize(rs: &RunningSimulator, http: &reqwest::Client) -> String {
        let ch = challenge();
        let query = [
            ("response_type", "code"),
            ("client_id", "demo-client"),
            ("redirect_uri", REDIRECT),
            ("scope", "full"),
            ("state", "xyz<&>"),
            ("code_challenge", ch.as_str()),
            ("code_challenge_method", "S256"),
        ];
        let page = http
            .get(rs.url("/authorize"))
            .query(&query)
            .send()
            .await
            .unwrap();
        assert_eq!(page.status(), 200);
        let html = page.text().await.unwrap();
        assert!(html.contains("action=\"approve\""), "{html}");
        assert!(html.contains("action=\"deny\""));
        assert!(
            html.contains("value=\"xyz&lt;&amp;&gt;\""),
            "state must be escaped"
        );
        let resp = http
            .post(rs.url("/approve"))
            .form(&query)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 302);
        let loc = url::Url::parse(resp.headers()["location"].to_str().unwrap()).unwrap();
        assert!(loc.as_str().starts_with(REDIRECT));
        let q: HashMap<String, String> = loc.query_pairs().into_owned().collect();
        assert_eq!(q.get("state").map(String::as_str), Some("xyz<&>"));
        let code = q.get("code").cloned().unwrap();
        assert_eq!(code.len(), 32);
        code
    }

    async fn exchange(
        rs: &RunningSimulator,
        http: &reqwest::Client,
        code: &str,
        verifier: &str,
    ) -> reqwest::Response {
        http.post(rs.url("/token"))
            .form(&[
                ("grant_type", "authorization_code"),
                ("code", code),
                ("redirect_uri", REDIRECT),
                ("code_verifier", verifier),
                ("client_id", "demo-client"),
                ("client_secret", "demo-secret"),
            ])
            .send()
            .await
            .unwrap()
    }

    async fn obtain(rs: &RunningSimulator, http: &reqwest::Client) -> Tokens {
        let code = authorize(rs, http).await;
        let resp = exchange(rs, http, &code, VERIFIER).await;
        assert_eq!(resp.status(), 200);
        let v: serde_json::Value = resp.json().await.unwrap();
        Tokens {
            access: v["access_token"].as_str().unwrap().to_owned(),
            refresh: v["refresh_token"].as_str().unwrap().to_owned(),
        }
    }

    async fn refresh(rs: &RunningSimulator, http: &reqwest::Client, rt: &str) -> reqwest::Response {
        http.post(rs.url("/token"))
            .basic_auth("demo-client", Some("demo-secret"))
            .form(&[("grant_type", "refresh_token"), ("refresh_token", rt)])
            .send()
            .await
            .unwrap()
    }

    async fn json(resp: reqwest::Response) -> (u16, serde_json::Value) {
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        let v = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
        (status, v)
    }

    async fn api(
        rs: &RunningSimulator,
        http: &reqwest::Client,
        token: &str,
        path: &str,
    ) -> reqwest::Response {
        http.get(rs.url(&format!("/api/{path}")))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
    }

    async fn start() -> RunningSimulator {
        Simulator::start_local(SimulatorConfig::default())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn code_flow_with_pkce() {
        let rs = start().await;
        assert!(rs.base_url.starts_with("http://127.0.0.1:") && !rs.base_url.ends_with('/'));
        let http = client();
        let code = authorize(&rs, &http).await;

        let (status, v) = json(
            exchange(
                &rs,
                &http,
                &code,
                "wrong-verifier-wrong-verifier-wrong-verif",
            )
            .await,
        )
        .await;
        assert_eq!((status, v["error"].as_str()), (400, Some("invalid_grant")));

        let resp = exchange(&rs, &http, &code, VERIFIER).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.headers()["content-type"],
            "application/json;charset=UTF-8"
        );
        assert_eq!(resp.headers()["cache-control"], "no-store");
        let v: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(v["token_type"], "bearer");
        assert_eq!(v["expires_in"], 86400);
        assert_eq!(v["scope"], SIM_SCOPE);
        let at = v["access_token"].as_str().unwrap();
        let rt = v["refresh_token"].as_str().unwrap();
        for t in [at, rt] {
            assert_eq!(t.len(), 32);
            assert!(t.chars().all(|c| c.is_ascii_alphanumeric()));
        }
        assert!(rs.sim.access_token_valid(at));
        assert_eq!(rs.sim.current_refresh_token().as_deref(), Some(rt));
        assert_eq!(rs.sim.stats().code_exchanges, 1);

        // Single use.
        let (status, v) = json(exchange(&rs, &http, &code, VERIFIER).await).await;
        assert_eq!((status, v["error"].as_str()), (400, Some("invalid_grant")));

        // redirect_uri must match.
        let code = authorize(&rs, &http).await;
        let resp = http
            .post(rs.url("/token"))
            .basic_auth("demo-client", Some("demo-secret"))
            .form(&[
                ("grant_type", "authorization_code"),
                ("code", code.as_str()),
                ("redirect_uri", "http://127.0.0.1:1/other"),
                ("code_verifier", VERIFIER),
            ])
            .send()
            .await
            .unwrap();
        let (status, v) = json(resp).await;
        assert_eq!((status, v["error"].as_str()), (400, Some("invalid_grant")));
    }

    #[tokio::test]
    async fn authorize_rejects_bad_client_and_deny_redirects() {
        let rs = start().await;
        let http = client();
        let resp = http
            .get(rs.url(
                "/authorize?response_type=code&client_id=nope&redirect_uri=http%3A%2F%2Fx%2Fcb",
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400);
        assert!(resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html"));
        let resp = http
            .get(rs.url("/authorize?response_type=code&client_id=demo-client"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400);

        let resp = http
            .post(rs.url("/deny"))
            .form(&[
                ("response_type", "code"),
                ("client_id", "demo-client"),
                ("redirect_uri", "http://127.0.0.1:1/cb?keep=1"),
                ("state", "s1"),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 302);
        let loc = url::Url::parse(resp.headers()["location"].to_str().unwrap()).unwrap();
        let q: HashMap<String, String> = loc.query_pairs().into_owned().collect();
        assert_eq!(q["keep"], "1");
        assert_eq!(q["error"], "access_denied");
        assert_eq!(q["state"], "s1");
        assert!(q.contains_key("error_description"));
    }

    #[tokio::test]
    async fn refresh_rotation_and_reuse_detection() {
        let rs = start().await;
        let http = client();
        let t = obtain(&rs, &http).await;

        let (status, v) = json(refresh(&rs, &http, &t.refresh).await).await;
        assert_eq!(status, 200);
        let rt2 = v["refresh_token"].as_str().unwrap().to_owned();
        let at2 = v["access_token"].as_str().unwrap().to_owned();
        assert_ne!(rt2, t.refresh);
        assert!(
            !rs.sim.access_token_valid(&t.access),
            "old access token must die"
        );
        assert!(rs.sim.access_token_valid(&at2));
        assert_eq!(
            rs.sim.current_refresh_token().as_deref(),
            Some(rt2.as_str())
        );
        assert_eq!(
            rs.sim.refresh_tokens_issued(),
            vec![t.refresh.clone(), rt2.clone()]
        );
        assert_eq!(
            rs.sim.access_tokens_issued(),
            vec![t.access.clone(), at2.clone()]
        );

        let (status, v) = json(refresh(&rs, &http, &t.refresh).await).await;
        assert_eq!(status, 400);
        assert_eq!(
            v,
            serde_json::json!({"error":"invalid_request","error_description":"Invalid Refresh Token"})
        );
        let (status, _) =
            json(refresh(&rs, &http, "unknownunknownunknownunknown12345").await).await;
        assert_eq!(status, 400);

        let s = rs.sim.stats();
        assert_eq!(
            (
                s.refresh_calls,
                s.refresh_ok,
                s.refresh_reuse,
                s.refresh_rejected
            ),
            (3, 1, 1, 2)
        );
        // Reuse does not kill the current token.
        assert_eq!(refresh(&rs, &http, &rt2).await.status(), 200);
    }

    #[tokio::test]
    async fn non_rotating_and_invalid_grant_style() {
        let rs = Simulator::start_local(SimulatorConfig {
            rotate_refresh_tokens: false,
            revoke_old_access_on_refresh: false,
            refresh_error_style: RefreshErrorStyle::InvalidGrant,
            ..SimulatorConfig::default()
        })
        .await
        .unwrap();
        let http = client();
        let t = obtain(&rs, &http).await;
        for _ in 0..2 {
            let (status, v) = json(refresh(&rs, &http, &t.refresh).await).await;
            assert_eq!(status, 200);
            assert!(v.get("refresh_token").is_none());
        }
        assert!(rs.sim.access_token_valid(&t.access));
        assert_eq!(rs.sim.stats().refresh_reuse, 0);
        rs.sim.revoke_all_grants();
        let (status, v) = json(refresh(&rs, &http, &t.refresh).await).await;
        assert_eq!((status, v["error"].as_str()), (400, Some("invalid_grant")));
        assert!(rs.sim.current_refresh_token().is_none());
    }

    #[tokio::test]
    async fn client_authentication_on_refresh() {
        let rs = start().await;
        let http = client();
        let t = obtain(&rs, &http).await;
        let form = [
            ("grant_type", "refresh_token"),
            ("refresh_token", t.refresh.as_str()),
            ("client_id", "demo-client"),
            ("client_secret", "demo-secret"),
        ];
        let resp = http
            .post(rs.url("/token"))
            .form(&form)
            .send()
            .await
            .unwrap();
        assert!(resp.headers().contains_key("www-authenticate"));
        let (status, v) = json(resp).await;
        assert_eq!((status, v["error"].as_str()), (401, Some("invalid_client")));

        let resp = http
            .post(rs.url("/token"))
            .basic_auth("demo-client", Some("wrong"))
            .form(&form[..2])
            .send()
            .await
            .unwrap();
        let (status, v) = json(resp).await;
        assert_eq!((status, v["error"].as_str()), (401, Some("invalid_client")));

        let resp = http
            .post(rs.url("/token"))
            .header("authorization", "Basic %%%not-base64")
            .form(&form[..2])
            .send()
            .await
            .unwrap();
        let (status, v) = json(resp).await;
        assert_eq!(
            (status, v["error"].as_str()),
            (400, Some("invalid_request"))
        );
        // None of the failed attempts consumed the token.
        assert_eq!(refresh(&rs, &http, &t.refresh).await.status(), 200);
    }

    #[tokio::test]
    async fn body_credentials_allowed_when_basic_not_required_and_public_client() {
        let rs = Simulator::start_local(SimulatorConfig {
            require_basic_on_refresh: false,
            ..SimulatorConfig::default()
        })
        .await
        .unwrap();
        let http = client();
        let t = obtain(&rs, &http).await;
        let resp = http
            .post(rs.url("/token"))
            .form(&[
                ("grant_type", "refresh_token"),
                ("refresh_token", t.refresh.as_str()),
                ("client_id", "demo-client"),
                ("client_secret", "demo-secret"),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);

        let rs = Simulator::start_local(SimulatorConfig {
            client_secret: String::new(),
            ..SimulatorConfig::default()
        })
        .await
        .unwrap();
        let code = authorize(&rs, &http).await;
        let resp = http
            .post(rs.url("/token"))
            .form(&[
                ("grant_type", "authorization_code"),
                ("code", code.as_str()),
                ("redirect_uri", REDIRECT),
                ("code_verifier", VERIFIER),
                ("client_id", "demo-client"),
            ])
            .send()
            .await
            .unwrap();
        let (status, v) = json(resp).await;
        assert_eq!(status, 200);
        let resp = http
            .post(rs.url("/token"))
            .form(&[
                ("grant_type", "refresh_token"),
                ("refresh_token", v["refresh_token"].as_str().unwrap()),
                ("client_id", "demo-client"),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }

    #[tokio::test]
    async fn revoke_kills_the_whole_grant() {
        let rs = start().await;
        let http = client();
        let t = obtain(&rs, &http).await;
        let unauth = http
            .post(rs.url("/revoke"))
            .form(&[("token", t.refresh.as_str())])
            .send()
            .await
            .unwrap();
        assert_eq!(unauth.status(), 401);
        assert!(rs.sim.access_token_valid(&t.access));

        let resp = http
            .post(rs.url("/revoke"))
            .basic_auth("demo-client", Some("demo-secret"))
            .form(&[
                ("token", t.refresh.as_str()),
                ("token_type_hint", "refresh_token"),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert!(!rs.sim.access_token_valid(&t.access));
        assert_eq!(api(&rs, &http, &t.access, "v1/x").await.status(), 401);
        assert_eq!(refresh(&rs, &http, &t.refresh).await.status(), 400);
        assert!(rs.sim.current_refresh_token().is_none());

        let resp = http
            .post(rs.url("/revoke"))
            .basic_auth("demo-client", Some("demo-secret"))
            .form(&[("token", "doesnotexist")])
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let s = rs.sim.stats();
        assert_eq!(
            (s.revocations, s.refresh_rejected, s.refresh_reuse),
            (1, 1, 0)
        );
    }

    #[tokio::test]
    async fn faults() {
        let rs = start().await;
        let http = client();
        let t = obtain(&rs, &http).await;

        rs.sim.push_fault(Fault::Status(503));
        let resp = refresh(&rs, &http, &t.refresh).await;
        assert_eq!(resp.status(), 503);
        assert!(serde_json::from_str::<serde_json::Value>(&resp.text().await.unwrap()).is_err());

        rs.sim.push_fault(Fault::RateLimited {
            retry_after_secs: Some(7),
        });
        rs.sim.push_fault(Fault::RateLimited {
            retry_after_secs: None,
        });
        let resp = refresh(&rs, &http, &t.refresh).await;
        assert_eq!(resp.headers()["retry-after"], "7");
        let (status, v) = json(resp).await;
        assert_eq!(status, 429);
        assert_eq!(
            v["fault"]["detail"]["errorcode"],
            "policies.ratelimit.QuotaViolation"
        );
        assert!(v["fault"]["faultstring"]
            .as_str()
            .unwrap()
            .starts_with("Rate limit quota violation"));
        let resp = refresh(&rs, &http, &t.refresh).await;
        assert_eq!(resp.status(), 429);
        assert!(!resp.headers().contains_key("retry-after"));

        rs.sim.push_fault(Fault::Garbage);
        let resp = refresh(&rs, &http, &t.refresh).await;
        assert_eq!(resp.status(), 200);
        assert!(resp.json::<serde_json::Value>().await.is_err());

        rs.sim.push_fault(Fault::MissingAccessToken);
        let (status, v) = json(refresh(&rs, &http, &t.refresh).await).await;
        assert_eq!(status, 200);
        assert!(v.get("access_token").is_none());

        rs.sim.push_fault(Fault::Hang(Duration::from_millis(200)));
        let started = Instant::now();
        let resp = refresh(&rs, &http, &t.refresh).await;
        assert_eq!(resp.status(), 504);
        assert!(started.elapsed() >= Duration::from_millis(200));

        rs.sim.push_fault(Fault::RejectRefresh);
        let (status, v) = json(refresh(&rs, &http, &t.refresh).await).await;
        assert_eq!(
            (status, v["error_description"].as_str()),
            (400, Some("Invalid Refresh Token"))
        );

        // No fault consumed the token.
        assert_eq!(
            rs.sim.current_refresh_token().as_deref(),
            Some(t.refresh.as_str())
        );
        let s = rs.sim.stats();
        assert_eq!(
            (
                s.refresh_calls,
                s.refresh_ok,
                s.refresh_rejected,
                s.refresh_reuse
            ),
            (7, 0, 1, 0)
        );

        // Persistent fault until cleared; queued faults take precedence.
        rs.sim.set_fault(Some(Fault::Status(502)));
        rs.sim.push_fault(Fault::Status(500));
        assert_eq!(refresh(&rs, &http, &t.refresh).await.status(), 500);
        assert_eq!(refresh(&rs, &http, &t.refresh).await.status(), 502);
        assert_eq!(refresh(&rs, &http, &t.refresh).await.status(), 502);
        rs.sim.set_fault(None);
        assert_eq!(refresh(&rs, &http, &t.refresh).await.status(), 200);
    }

    #[tokio::test]
    async fn delay_after_rotation_loses_the_grant_for_an_impatient_client() {
        let rs = start().await;
        let http = client();
        let t = obtain(&rs, &http).await;
        rs.sim
            .set_token_delay(Duration::from_millis(500), DelayPhase::AfterRotation);
        let impatient = reqwest::Client::builder()
            .timeout(Duration::from_millis(100))
            .build()
            .unwrap();
        let err = impatient
            .post(rs.url("/token"))
            .basic_auth("demo-client", Some("demo-secret"))
            .form(&[
                ("grant_type", "refresh_token"),
                ("refresh_token", t.refresh.as_str()),
            ])
            .send()
            .await;
        assert!(err.is_err());
        let current = rs.sim.current_refresh_token().unwrap();
        assert_ne!(current, t.refresh);

        rs.sim
            .set_token_delay(Duration::from_millis(300), DelayPhase::BeforeProcessing);
        let err = impatient
            .post(rs.url("/token"))
            .basic_auth("demo-client", Some("demo-secret"))
            .form(&[
                ("grant_type", "refresh_token"),
                ("refresh_token", current.as_str()),
            ])
            .send()
            .await;
        assert!(err.is_err());
        // The request is dropped with the connection while it waits, so nothing
        // happened server-side: the grant is intact.
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(
            rs.sim.current_refresh_token().as_deref(),
            Some(current.as_str())
        );
        rs.sim
            .set_token_delay(Duration::ZERO, DelayPhase::BeforeProcessing);
        assert_eq!(refresh(&rs, &http, &current).await.status(), 200);
        assert_eq!(rs.sim.stats().refresh_reuse, 0);
    }

    #[tokio::test]
    async fn api_bearer_check_and_expiry() {
        let rs = start().await;
        let http = client();
        let t = obtain(&rs, &http).await;

        let resp = http
            .post(rs.url("/api/crm/rest/v1/contacts?limit=5"))
            .bearer_auth(&t.access)
            .body("hello")
            .send()
            .await
            .unwrap();
        let (status, v) = json(resp).await;
        assert_eq!(status, 200);
        assert_eq!(
            v,
            serde_json::json!({"method":"POST","path":"crm/rest/v1/contacts","query":"limit=5","body_len":5})
        );

        let (status, v) = json(http.get(rs.url("/api/x")).send().await.unwrap()).await;
        assert_eq!(status, 401);
        assert_eq!(v["fault"]["faultstring"], "Invalid Access Token");
        assert_eq!(
            v["fault"]["detail"]["errorcode"],
            "keymanagement.service.invalid_access_token"
        );
        assert_eq!(api(&rs, &http, "bogus", "x").await.status(), 401);

        let resp = api(&rs, &http, &t.access, "large?bytes=100000").await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "application/octet-stream");
        let bytes = resp.bytes().await.unwrap();
        assert_eq!(bytes.len(), 100_000);
        assert_eq!(bytes[252], 1);
        assert_eq!(
            api(&rs, &http, &t.access, "large?bytes=abc").await.status(),
            400
        );

        rs.sim.set_access_lifetime(Duration::from_millis(150));
        let (_, v) = json(refresh(&rs, &http, &t.refresh).await).await;
        let short = v["access_token"].as_str().unwrap().to_owned();
        assert_eq!(v["expires_in"], 0);
        assert_eq!(api(&rs, &http, &short, "x").await.status(), 200);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!rs.sim.access_token_valid(&short));
        assert_eq!(api(&rs, &http, &short, "x").await.status(), 401);
        let s = rs.sim.stats();
        assert_eq!((s.api_calls, s.api_unauthorized), (7, 3));
    }

    #[tokio::test]
    async fn malformed_token_requests_get_json_400s() {
        let rs = start().await;
        let http = client();
        let cases: Vec<(Option<&str>, &str, &str)> = vec![
            (
                Some("application/json"),
                r#"{"grant_type":"refresh_token"}"#,
                "invalid_request",
            ),
            (None, "grant_type=refresh_token", "invalid_request"),
            (
                Some("application/x-www-form-urlencoded"),
                "",
                "invalid_request",
            ),
            (
                Some("application/x-www-form-urlencoded"),
                "grant_type=password",
                "unsupported_grant_type",
            ),
            (
                Some("application/x-www-form-urlencoded"),
                "%%%=&&==%ff%fe",
                "invalid_request",
            ),
            (
                Some("application/x-www-form-urlencoded; charset=utf-8"),
                "grant_type=refresh_token&grant_type=refresh_token",
                "invalid_request",
            ),
            (
                Some("application/x-www-form-urlencoded"),
                "grant_type=authorization_code&client_id=demo-client&client_secret=demo-secret",
                "invalid_request",
            ),
        ];
        for (ct, body, expected) in cases {
            let mut req = http
                .post(rs.url("/token"))
                .basic_auth("demo-client", Some("demo-secret"))
                .body(body);
            if let Some(ct) = ct {
                req = req.header("content-type", ct);
            }
            let (status, v) = json(req.send().await.unwrap()).await;
            assert_eq!(
                (status, v["error"].as_str()),
                (400, Some(expected)),
                "body {body:?}"
            );
            assert!(v["error_description"].is_string());
        }
    }

    #[tokio::test]
    async fn control_api_only_when_enabled() {
        let rs = start().await;
        let http = client();
        assert_eq!(
            http.get(rs.url("/_sim/stats"))
                .send()
                .await
                .unwrap()
                .status(),
            404
        );

        let rs = Simulator::start_local(SimulatorConfig {
            control_api: true,
            ..SimulatorConfig::default()
        })
        .await
        .unwrap();
        let (status, v) = json(http.get(rs.url("/_sim/stats")).send().await.unwrap()).await;
        assert_eq!(status, 200);
        assert_eq!(v["refresh_reuse"], 0);
        let t = obtain(&rs, &http).await;
        let resp = http
            .post(rs.url("/_sim/config"))
            .json(&serde_json::json!({"access_lifetime_secs": 60, "fault": {"type": "status", "status": 503}}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(refresh(&rs, &http, &t.refresh).await.status(), 503);
        let resp = http
            .post(rs.url("/_sim/config"))
            .json(&serde_json::json!({"fault": null}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let (status, v) = json(refresh(&rs, &http, &t.refresh).await).await;
        assert_eq!((status, v["expires_in"].as_u64()), (200, Some(60)));
        let resp = http
            .post(rs.url("/_sim/config"))
            .body("{nope")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400);
    }

    #[tokio::test]
    async fn router_works_when_nested() {
        let sim = Simulator::new(SimulatorConfig::default());
        let app = Router::new().nest("/dev-provider", sim.router());
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let resp = client()
            .get(format!("http://{addr}/dev-provider/authorize?response_type=code&client_id=demo-client&redirect_uri=http%3A%2F%2Fx%2Fcb"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        task.abort();
    }
}
