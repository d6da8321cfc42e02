//! Client-side rate limits (SPEC 6, issue 8): what a provider allows per
//! OAuth client and per tenant (account), enforced before anything is sent,
//! corrected by what the provider reports in its quota headers.
//!
//! Each scope (the client; one tenant) combines:
//! - GCRA limiters (`governor`) for the per-second and per-minute limits,
//!   with a small safety margin (see [`JITTER_TOLERANCE`]);
//! - a daily counter that resets at the provider's reset instant (Keap:
//!   00:00 UTC, or the `expiry-time` it reports);
//! - what the provider last said (Keap's `x-keap-*` headers): the newest
//!   answer wins, minus the requests sent after the one it answers;
//! - a pause after an upstream 429.
//!
//! Waiters are served first come, first served: one tokio `Mutex` per
//! provider is the queue (tokio's mutex is FIFO-fair), and only its holder
//! takes cells, so a cell taken while waiting for another limiter is never
//! stolen. A request whose wait cannot end before its deadline is refused at
//! once with the time after which trying again makes sense.
//!
//! This module knows nothing about HTTP bodies or tokens; it never logs.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeZone, Utc};
// `MonotonicClock` measures in `std::time::Instant`, the clock our
// deadlines use, so `earliest_possible` can be slept on directly.
use governor::clock::MonotonicClock;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

use crate::config::{Limits, ProviderConfig};

/// How much spread in the time from granting a slot to the provider
/// seeing the request the limiters absorb: requests granted at exactly the
/// allowed spacing can reach the provider closer together (connection
/// set-up for the first ones of a burst, scheduling, network), so each GCRA
/// burst is that many emission intervals (at least one cell) below the
/// provider's. Measured: over 100 ms for the first requests of a burst on a
/// busy two-core machine; 250 ms leaves room. It costs a few requests of a
/// burst, never sustained throughput. (The per-second limit has no burst at
/// all: it is paced.)
pub const JITTER_TOLERANCE: Duration = Duration::from_millis(250);

/// How long an upstream 429 pauses a provider when it says nothing more
/// precise (Keap sends no `Retry-After`): Keap's spike window is one second.
pub const PAUSE_AFTER_429: Duration = Duration::from_secs(1);

/// The longest pause one answer can impose on a provider: a day, the
/// longest window a provider counts in. A `Retry-After` of years (a broken
/// or hostile upstream) would otherwise park every account of the provider
/// until a restart, or overflow the instant it is added to.
pub const MAX_PAUSE: Duration = Duration::from_secs(24 * 3600);

/// Why a request did not get a slot.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LimitError {
    /// The slot would come later than the caller may wait.
    #[error("the {scope} rate limit of {provider} leaves no slot within the allowed wait; retry in {}s", retry_after.as_secs().max(1))]
    Limited {
        provider: String,
        /// `client`, `tenant`, `daily quota`, `paused after a 429`.
        scope: &'static str,
        retry_after: Duration,
    },
}

impl LimitError {
    /// When trying again makes sense.
    pub fn retry_after(&self) -> Duration {
        match self {
            LimitError::Limited { retry_after, .. } => *retry_after,
        }
    }
}

type Gcra = RateLimiter<NotKeyed, InMemoryState, MonotonicClock>;

/// The provider's answer about one window, as learned from headers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Reported {
    limit: Option<u64>,
    available: Option<u64>,
    used: Option<u64>,
    /// Epoch milliseconds of the window's end (quota only).
    expiry_ms: Option<i64>,
}

/// A counted window: the day (configured or reported) or a reported
/// throttle window.
#[derive(Debug, Clone)]
struct Window {
    limit: Option<u64>,
    /// `None`: nothing is known to bound it (no configured daily limit).
    remaining: Option<u64>,
    used: u64,
    resets_at: DateTime<Utc>,
    /// Sequence number of the request whose answer set `remaining`; an
    /// older answer never overrides a newer one.
    learned_seq: Option<u64>,
}

impl Window {
    fn day(limit: Option<u32>, now: DateTime<Utc>) -> Window {
        Window {
            limit: limit.map(u64::from),
            remaining: limit.map(u64::from),
            used: 0,
            resets_at: next_utc_midnight(now),
            learned_seq: None,
        }
    }

    /// Starts a new day if the old one is over.
    fn roll(&mut self, now: DateTime<Utc>) {
        if now >= self.resets_at {
            self.remaining = self.limit;
            self.used = 0;
            self.resets_at = next_utc_midnight(now);
            self.learned_seq = None;
        }
    }
}

/// A throttle window the provider told us about (no end is reported, so it
/// is believed for one refill interval, after which a token bucket has
/// room again and the next answer corrects us).
#[derive(Debug, Clone, Copy)]
struct Throttle {
    remaining: u64,
    limit: Option<u64>,
    until: Instant,
    learned_seq: u64,
}

/// One scope: the OAuth client, or one tenant.
struct Scope {
    per_second: Option<Gcra>,
    per_minute: Option<Gcra>,
    /// Client-side bursts, for the lower bound of a queue's wait.
    bursts: Vec<(u32, f64)>,
    /// std Mutex: held for a few arithmetic operations, never across `.await`.
    day: Mutex<Window>,
    throttle: Mutex<Option<Throttle>>,
    /// Requests granted so far; a permit's sequence number.
    granted: AtomicU64,
}

impl Scope {
    fn new(limits: Limits, now: DateTime<Utc>) -> Scope {
        let mut bursts = Vec::new();
        let mut gcra = |n: Option<u32>, period: Duration, paced: bool| {
            let n = n?;
            let rate = f64::from(n) / period.as_secs_f64();
            // Margin in cells for JITTER_TOLERANCE, at least one.
            let margin = (rate * JITTER_TOLERANCE.as_secs_f64()).ceil().max(1.0) as u32;
            // The per-second limit is paced, one request per 1/n s: a burst
            // on top of the rate would put up to 2n requests into one
            // second, and Keap's spike arrest (Apigee) counts in slices of
            // 1/n s anyway.
            let burst = if paced {
                1
            } else {
                n.saturating_sub(margin).max(1)
            };
            bursts.push((burst, rate));
            let quota = Quota::with_period(period / n.max(1))?.allow_burst(NonZeroU32::new(burst)?);
            Some(RateLimiter::direct_with_clock(quota, MonotonicClock))
        };
        let per_second = gcra(limits.per_second, Duration::from_secs(1), true);
        let per_minute = gcra(limits.per_minute, Duration::from_secs(60), false);
        Scope {
            per_second,
            per_minute,
            bursts,
            day: Mutex::new(Window::day(limits.per_day, now)),
            throttle: Mutex::new(None),
            granted: AtomicU64::new(0),
        }
    }

    fn day(&self) -> std::sync::MutexGuard<'_, Window> {
        self.day.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn throttle(&self) -> std::sync::MutexGuard<'_, Option<Throttle>> {
        self.throttle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Lower bound of the wait of the `n`-th request in line (1-based),
    /// assuming every limiter is rested.
    fn lower_bound(&self, n: u64, now: DateTime<Utc>) -> Option<(Duration, &'static str)> {
        let mut worst: Option<(Duration, &'static str)> = None;
        for &(burst, rate) in &self.bursts {
            if n > u64::from(burst) && rate > 0.0 {
                let d = Duration::from_secs_f64((n - u64::from(burst)) as f64 / rate);
                if worst.is_none_or(|(w, _)| d > w) {
                    worst = Some((d, "rate"));
                }
            }
        }
        let mut day = self.day();
        day.roll(now);
        if day.remaining.is_some_and(|r| n > r) {
            let d = (day.resets_at - now).to_std().unwrap_or_default();
            if worst.is_none_or(|(w, _)| d > w) {
                worst = Some((d, "daily quota"));
            }
        }
        worst
    }

    /// Until when the counted windows (day, reported throttle) block.
    fn blocked_until(&self, now: Instant, wall: DateTime<Utc>) -> Option<(Instant, &'static str)> {
        let mut day = self.day();
        day.roll(wall);
        if day.remaining == Some(0) {
            let d = (day.resets_at - wall).to_std().unwrap_or_default();
            return Some((now + d, "daily quota"));
        }
        drop(day);
        let mut t = self.throttle();
        match *t {
            Some(th) if th.until <= now => *t = None,
            Some(th) if th.remaining == 0 => return Some((th.until, "throttle")),
            _ => {}
        }
        None
    }

    /// Counts a granted request; returns its sequence number.
    fn count(&self) -> u64 {
        let mut day = self.day();
        let mut throttle = self.throttle();
        self.count_locked(&mut day, &mut throttle)
    }

    /// [`Scope::count`] with the scope's windows already locked.
    fn count_locked(&self, day: &mut Window, throttle: &mut Option<Throttle>) -> u64 {
        day.used = day.used.saturating_add(1);
        if let Some(r) = day.remaining.as_mut() {
            *r = r.saturating_sub(1);
        }
        if let Some(t) = throttle.as_mut() {
            t.remaining = t.remaining.saturating_sub(1);
        }
        self.granted.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// The scope's windows, locked, if none of them blocks now (else
    /// `None`): checked and counted under one lock, so two requests cannot
    /// both take the last request of a window.
    fn open(
        &self,
        now: Instant,
        wall: DateTime<Utc>,
    ) -> Option<(
        std::sync::MutexGuard<'_, Window>,
        std::sync::MutexGuard<'_, Option<Throttle>>,
    )> {
        let mut day = self.day();
        day.roll(wall);
        if day.remaining == Some(0) {
            return None;
        }
        let mut throttle = self.throttle();
        match *throttle {
            Some(th) if th.until <= now => *throttle = None,
            Some(th) if th.remaining == 0 => return None,
            _ => {}
        }
        Some((day, throttle))
    }

    /// Believes the provider's report about this scope, answered to the
    /// request with sequence number `seq`: requests granted after it may not
    /// be counted in it yet, so they are taken off what it says is left.
    fn learn(&self, seq: u64, quota: Reported, throttle: Reported) {
        let after = self.granted.load(Ordering::SeqCst).saturating_sub(seq);
        if let Some(available) = quota.available {
            let mut day = self.day();
            let reported_end = quota
                .expiry_ms
                .and_then(|ms| Utc.timestamp_millis_opt(ms).single());
            let newer_window = reported_end.is_some_and(|e| e > day.resets_at);
            if newer_window || day.learned_seq.is_none_or(|s| seq >= s) {
                if let Some(end) = reported_end {
                    day.resets_at = end;
                }
                day.limit = quota.limit.or(day.limit);
                day.remaining = Some(available.saturating_sub(after));
                day.used = quota
                    .used
                    .unwrap_or_else(|| day.limit.map_or(day.used, |l| l.saturating_sub(available)))
                    .saturating_add(after);
                day.learned_seq = Some(seq);
            }
        }
        if let Some(available) = throttle.available {
            let mut t = self.throttle();
            if t.is_none_or(|t| seq >= t.learned_seq) {
                // One refill interval of a bucket of `limit` per minute.
                let refill =
                    throttle
                        .limit
                        .filter(|l| *l > 0)
                        .map_or(Duration::from_secs(60), |l| {
                            // Beyond u32, the 1 ms floor below applies anyway.
                            Duration::from_secs(60) / u32::try_from(l).unwrap_or(u32::MAX)
                        });
                *t = Some(Throttle {
                    remaining: available.saturating_sub(after),
                    limit: throttle.limit,
                    until: Instant::now() + refill.max(Duration::from_millis(1)),
                    learned_seq: seq,
                });
            }
        }
    }

    fn quota(&self, now: DateTime<Utc>) -> ScopeQuota {
        let mut day = self.day();
        day.roll(now);
        let throttle = self.throttle().filter(|t| t.until > Instant::now());
        ScopeQuota {
            daily_limit: day.limit,
            daily_available: day.remaining,
            daily_used: day.used,
            resets_at: day.resets_at,
            reported: day.learned_seq.is_some(),
            throttle_limit: throttle.and_then(|t| t.limit),
            throttle_available: throttle.map(|t| t.remaining),
        }
    }
}

/// Quota figures of one scope, for `/v1/connections`, `status`, metrics.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ScopeQuota {
    /// Requests allowed per day (configured, or as the provider reports).
    pub daily_limit: Option<u64>,
    /// Left today; `None` when no daily limit is known.
    pub daily_available: Option<u64>,
    pub daily_used: u64,
    /// When the daily count starts again.
    pub resets_at: DateTime<Utc>,
    /// Whether the figures come from the provider's headers (else: counted here).
    pub reported: bool,
    /// Per-minute throttle as the provider last reported it.
    pub throttle_limit: Option<u64>,
    pub throttle_available: Option<u64>,
}

/// Quota figures of a connection: its client's, and its tenant's where the
/// provider has tenant limits.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ConnectionQuota {
    #[serde(flatten)]
    pub client: ScopeQuota,
    /// Paused after an upstream 429 until then.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub paused_until: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<ScopeQuota>,
}

/// Everything limited for one provider.
struct ProviderLimits {
    name: String,
    limits: Limits,
    tenant_limits: Option<Limits>,
    client: Scope,
    tenants: RwLock<HashMap<String, Arc<Scope>>>,
    /// The FIFO queue: the holder is the only one taking cells.
    turn: tokio::sync::Mutex<()>,
    /// Requests waiting for (or holding) the turn.
    waiting: AtomicUsize,
    /// Set by an upstream 429.
    paused_until: Mutex<Option<Instant>>,
    /// No per-second or per-minute limit in any scope: nothing but a pause
    /// or an exhausted window ever makes a request wait, so a request
    /// with nobody ahead takes its slot without queueing (see
    /// [`ProviderLimits::take_open`]).
    unpaced: bool,
}

impl ProviderLimits {
    fn new(name: &str, limits: Limits, tenant_limits: Option<Limits>) -> ProviderLimits {
        let now = Utc::now();
        ProviderLimits {
            name: name.to_string(),
            limits,
            tenant_limits,
            client: Scope::new(limits, now),
            tenants: RwLock::new(HashMap::new()),
            turn: tokio::sync::Mutex::new(()),
            waiting: AtomicUsize::new(0),
            paused_until: Mutex::new(None),
            unpaced: [Some(limits), tenant_limits]
                .into_iter()
                .flatten()
                .all(|l| l.per_second.is_none() && l.per_minute.is_none()),
        }
    }

    /// For an unpaced provider: the slot, counted in every scope, if
    /// nothing blocks now; checked and counted under the scopes' locks
    /// together (the client's first), so it is exact whether or not the
    /// caller holds the turn.
    fn take_open(&self, tenant: Option<&Scope>) -> Option<(u64, u64)> {
        let now = Instant::now();
        let wall = Utc::now();
        let paused = self.paused_until.lock().unwrap_or_else(|e| e.into_inner());
        if paused.is_some_and(|t| t > now) {
            return None;
        }
        let (mut day, mut throttle) = self.client.open(now, wall)?;
        let tenant_seq = match tenant {
            Some(t) => {
                let (mut tday, mut tthrottle) = t.open(now, wall)?;
                t.count_locked(&mut tday, &mut tthrottle)
            }
            None => 0,
        };
        let client_seq = self.client.count_locked(&mut day, &mut throttle);
        drop(paused);
        Some((client_seq, tenant_seq))
    }

    fn tenant(&self, account: &str) -> Option<Arc<Scope>> {
        let limits = self.tenant_limits?;
        if let Some(s) = self
            .tenants
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(account)
        {
            return Some(s.clone());
        }
        let mut w = self.tenants.write().unwrap_or_else(|e| e.into_inner());
        Some(
            w.entry(account.to_string())
                .or_insert_with(|| Arc::new(Scope::new(limits, Utc::now())))
                .clone(),
        )
    }

    fn paused(&self, now: Instant) -> Option<Instant> {
        let mut p = self.paused_until.lock().unwrap_or_else(|e| e.into_inner());
        match *p {
            Some(t) if t > now => Some(t),
            _ => {
                *p = None;
                None
            }
        }
    }

    fn limited(&self, scope: &'static str, retry_after: Duration) -> LimitError {
        LimitError::Limited {
            provider: self.name.clone(),
            scope,
            retry_after: round_up_secs(retry_after),
        }
    }
}

/// Leaves the queue count when a waiter finishes or is dropped.
struct Waiting(Arc<ProviderLimits>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A granted slot; feed it the provider's answer with [`Permit::learn`].
pub struct Permit {
    provider: Arc<ProviderLimits>,
    tenant: Option<Arc<Scope>>,
    client_seq: u64,
    tenant_seq: u64,
}

/// What a provider's answer says about its limits.
#[derive(Debug, Clone, Copy, Default)]
pub struct Answer {
    pub status: u16,
    pub retry_after: Option<Duration>,
    quota: Reported,
    throttle: Reported,
    tenant_quota: Reported,
    tenant_throttle: Reported,
    product_quota_reported: bool,
}

impl Answer {
    /// Reads Keap's `x-keap-{product,tenant}-{quota,throttle}-*` headers and
    /// `Retry-After`; absent or malformed headers mean "not reported" (of
    /// repeated ones, the first counts).
    ///
    /// One pass over the answer's headers, allocating nothing: it runs on
    /// every proxied answer, and most carry no quota header at all.
    pub fn from_headers(status: u16, headers: &axum::http::HeaderMap) -> Answer {
        let mut answer = Answer {
            status,
            retry_after: headers
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(crate::provider::parse_retry_after),
            ..Answer::default()
        };
        // Which of the 16 figures were seen already (the first one counts,
        // as `HeaderMap::get` would have it).
        let mut seen = 0u16;
        for (name, value) in headers {
            let Some(rest) = name.as_str().strip_prefix("x-keap-") else {
                continue;
            };
            let (window, field, bit) = if let Some(f) = rest.strip_prefix("product-quota-") {
                (&mut answer.quota, f, 0)
            } else if let Some(f) = rest.strip_prefix("product-throttle-") {
                (&mut answer.throttle, f, 4)
            } else if let Some(f) = rest.strip_prefix("tenant-quota-") {
                (&mut answer.tenant_quota, f, 8)
            } else if let Some(f) = rest.strip_prefix("tenant-throttle-") {
                (&mut answer.tenant_throttle, f, 12)
            } else {
                continue;
            };
            let bit = bit
                + match field {
                    "limit" => 0,
                    "available" => 1,
                    "used" => 2,
                    "expiry-time" => 3,
                    _ => continue,
                };
            if seen & (1 << bit) != 0 {
                continue;
            }
            seen |= 1 << bit;
            let n = value
                .to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok());
            match bit % 4 {
                0 => window.limit = n,
                1 => window.available = n,
                2 => window.used = n,
                _ => window.expiry_ms = n.and_then(|v| i64::try_from(v).ok()),
            }
        }
        answer.product_quota_reported = seen & (1 << 1) != 0;
        answer
    }

    /// Whether the answer carried the provider's product quota
    /// (`x-keap-product-quota-available`, even if unreadable): only then
    /// is the daily figure worth publishing again.
    pub fn reports_quota(&self) -> bool {
        self.product_quota_reported
    }
}

impl Permit {
    /// Updates the limiter from the provider's answer; on a 429, pauses the
    /// provider for as long as the answer implies (or [`PAUSE_AFTER_429`]).
    pub fn learn(&self, answer: &Answer) {
        self.provider
            .client
            .learn(self.client_seq, answer.quota, answer.throttle);
        if let Some(t) = &self.tenant {
            t.learn(self.tenant_seq, answer.tenant_quota, answer.tenant_throttle);
        }
        if answer.status == 429 {
            let now = Instant::now();
            let wall = Utc::now();
            let until_day = |r: &Reported| {
                (r.available == Some(0))
                    .then(|| {
                        r.expiry_ms
                            .and_then(|ms| Utc.timestamp_millis_opt(ms).single())
                    })
                    .flatten()
                    .and_then(|end| (end - wall).to_std().ok())
            };
            let pause = answer
                .retry_after
                .or_else(|| until_day(&answer.quota))
                .or_else(|| until_day(&answer.tenant_quota))
                .unwrap_or(PAUSE_AFTER_429)
                .min(MAX_PAUSE);
            let mut p = self
                .provider
                .paused_until
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let until = now + pause;
            if p.is_none_or(|t| t < until) {
                *p = Some(until);
            }
        }
    }
}

/// The limits of every configured provider; cheap to share (`Arc`).
pub struct RateLimits {
    providers: RwLock<HashMap<String, Arc<ProviderLimits>>>,
}

impl RateLimits {
    /// Limits for each provider, from its preset or `[providers.X.limits]`.
    pub fn new<'a>(providers: impl IntoIterator<Item = &'a ProviderConfig>) -> RateLimits {
        let r = RateLimits {
            providers: RwLock::new(HashMap::new()),
        };
        r.reload(providers);
        r
    }

    /// Applies a reloaded config: providers whose limits did not change keep
    /// their state (counts, what the provider reported); others start anew.
    pub fn reload<'a>(&self, providers: impl IntoIterator<Item = &'a ProviderConfig>) {
        let mut map = self.providers.write().unwrap_or_else(|e| e.into_inner());
        let mut next = HashMap::new();
        for p in providers {
            let tenant = p.preset.tenant_limits();
            let keep = map
                .get(&p.name)
                .filter(|old| old.limits == p.limits && old.tenant_limits == tenant)
                .cloned();
            let entry =
                keep.unwrap_or_else(|| Arc::new(ProviderLimits::new(&p.name, p.limits, tenant)));
            next.insert(p.name.clone(), entry);
        }
        *map = next;
    }

    fn provider(&self, name: &str) -> Option<Arc<ProviderLimits>> {
        self.providers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// Waits, first come first served, for a slot of `provider` (and of its
    /// tenant `account` where the provider has tenant limits) until
    /// `deadline`. A provider without configured limits still counts and
    /// learns. Unknown providers get an unlimited permit.
    pub async fn acquire(
        &self,
        provider: &str,
        account: &str,
        deadline: tokio::time::Instant,
    ) -> Result<Permit, LimitError> {
        let p = match self.provider(provider) {
            Some(p) => p,
            None => Arc::new(ProviderLimits::new(provider, Limits::default(), None)),
        };
        let tenant = p.tenant(account);
        let ahead = p.waiting.fetch_add(1, Ordering::SeqCst) as u64;
        let _waiting = Waiting(p.clone());
        if p.unpaced && ahead == 0 {
            if let Some((client_seq, tenant_seq)) = p.take_open(tenant.as_deref()) {
                return Ok(Permit {
                    provider: p.clone(),
                    tenant,
                    client_seq,
                    tenant_seq,
                });
            }
        }
        let wall = Utc::now();
        let now = tokio::time::Instant::now();
        // Refuse at once what cannot make it even if every limiter is rested.
        let bounds = [
            p.client.lower_bound(ahead + 1, wall),
            tenant.as_ref().and_then(|t| t.lower_bound(ahead + 1, wall)),
        ];
        if let Some((d, scope)) = bounds.into_iter().flatten().max_by_key(|(d, _)| *d) {
            if now + d > deadline {
                return Err(p.limited(scope, d));
            }
        }
        let Ok(turn) = tokio::time::timeout_at(deadline, p.turn.lock()).await else {
            let d = p
                .client
                .lower_bound(ahead + 1, wall)
                .map_or(Duration::ZERO, |b| b.0);
            return Err(p.limited("rate", d.max(deadline.saturating_duration_since(now))));
        };
        let (mut sec, mut min, mut tmin) = (false, false, false);
        let taken = loop {
            let now = Instant::now();
            let wall = Utc::now();
            // Non-consuming blockers first, so no cell is wasted on them.
            let blocked = p
                .paused(now)
                .map(|t| (t, "paused after a 429"))
                .or_else(|| p.client.blocked_until(now, wall))
                .or_else(|| tenant.as_ref().and_then(|t| t.blocked_until(now, wall)));
            let wait = match blocked {
                Some((t, scope)) => Some((t, scope)),
                None => {
                    let take = |g: &Option<Gcra>, done: &mut bool| -> Option<Instant> {
                        if *done {
                            return None;
                        }
                        match g.as_ref().map(|g| g.check()) {
                            None | Some(Ok(())) => {
                                *done = true;
                                None
                            }
                            Some(Err(nu)) => Some(nu.earliest_possible()),
                        }
                    };
                    // Longest windows first: their refusal decides early.
                    let tenant_min = tenant.as_ref().map(|t| &t.per_minute);
                    take(tenant_min.unwrap_or(&None), &mut tmin)
                        .map(|t| (t, "tenant"))
                        .or_else(|| take(&p.client.per_minute, &mut min).map(|t| (t, "client")))
                        .or_else(|| take(&p.client.per_second, &mut sec).map(|t| (t, "client")))
                }
            };
            match wait {
                // Taken under the windows' locks: a request that found
                // nobody ahead may have taken a slot without the turn.
                None if p.unpaced => match p.take_open(tenant.as_deref()) {
                    Some(seqs) => break Some(seqs),
                    None => continue,
                },
                None => break None,
                Some((t, scope)) => {
                    let t = tokio::time::Instant::from_std(t);
                    if t > deadline {
                        return Err(p.limited(scope, t.saturating_duration_since(now.into())));
                    }
                    tokio::time::sleep_until(t).await;
                }
            }
        };
        let (client_seq, tenant_seq) =
            taken.unwrap_or_else(|| (p.client.count(), tenant.as_ref().map_or(0, |t| t.count())));
        drop(turn);
        Ok(Permit {
            provider: p,
            tenant,
            client_seq,
            tenant_seq,
        })
    }

    /// Frees what is kept for `provider/account` (its tenant scope), once
    /// the connection is forgotten: limiter state exists only for real
    /// connections.
    pub fn forget(&self, provider: &str, account: &str) {
        if let Some(p) = self.provider(provider) {
            p.tenants
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .remove(account);
        }
    }

    /// How many per-account (tenant) scopes are kept, over all providers:
    /// bounded by the real connections (see [`RateLimits::forget`]).
    pub fn tenant_count(&self) -> usize {
        self.providers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|p| p.tenants.read().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }

    /// Quota figures of a connection, if its provider is configured.
    pub fn quota(&self, provider: &str, account: &str) -> Option<ConnectionQuota> {
        let p = self.provider(provider)?;
        let now = Utc::now();
        let paused_until = p.paused(Instant::now()).map(|t| {
            now + chrono::Duration::from_std(t.saturating_duration_since(Instant::now()))
                .unwrap_or_default()
        });
        let tenant = p
            .tenants
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(account)
            .map(|t| t.quota(now));
        Some(ConnectionQuota {
            client: p.client.quota(now),
            paused_until,
            tenant,
        })
    }
}

/// The next 00:00 UTC strictly after `now` (Keap's daily reset).
pub fn next_utc_midnight(now: DateTime<Utc>) -> DateTime<Utc> {
    let tomorrow = now.date_naive().succ_opt().unwrap_or(now.date_naive());
    Utc.from_utc_datetime(&tomorrow.and_time(chrono::NaiveTime::MIN))
}

/// `Retry-After` is whole seconds: round up so a client that obeys it
/// finds a slot, and never say 0.
fn round_up_secs(d: Duration) -> Duration {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    Duration::from_secs(secs.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Preset;

    fn limits(s: Option<u32>, m: Option<u32>, d: Option<u32>) -> Limits {
        Limits {
            per_second: s,
            per_minute: m,
            per_day: d,
        }
    }

    fn registry(l: Limits) -> RateLimits {
        let p = crate::dev::config("127.0.0.1:1".parse().unwrap(), "/tmp/x.db".into(), "s")
            .providers
            .into_values()
            .next()
            .unwrap();
        let p = ProviderConfig {
            limits: l,
            preset: Preset::Generic,
            ..p
        };
        RateLimits::new([&p])
    }

    fn name() -> String {
        crate::dev::config("127.0.0.1:1".parse().unwrap(), "/tmp/x.db".into(), "s")
            .providers
            .into_keys()
            .next()
            .unwrap()
    }

    #[test]
    fn midnight() {
        let t = Utc.with_ymd_and_hms(2025, 3, 4, 23, 59, 59).unwrap();
        assert_eq!(
            next_utc_midnight(t),
            Utc.with_ymd_and_hms(2025, 3, 5, 0, 0, 0).unwrap()
        );
        let t = Utc.with_ymd_and_hms(2025, 3, 5, 0, 0, 0).unwrap();
        assert_eq!(
            next_utc_midnight(t),
            Utc.with_ymd_and_hms(2025, 3, 6, 0, 0, 0).unwrap()
        );
    }

    #[tokio::test]
    async fn daily_limit_refuses_with_retry_after_until_midnight() {
        let r = registry(limits(None, None, Some(3)));
        let n = name();
        let soon = tokio::time::Instant::now() + Duration::from_millis(50);
        for _ in 0..3 {
            r.acquire(&n, "default", soon).await.unwrap();
        }
        let e = r.acquire(&n, "default", soon).await.err().unwrap();
        assert!(e.retry_after() >= Duration::from_secs(1));
        let q = r.quota(&n, "default").unwrap();
        assert_eq!(
            (q.client.daily_available, q.client.daily_used),
            (Some(0), 3)
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unpaced_providers_never_grant_past_a_window_under_concurrency() {
        let r = Arc::new(registry(limits(None, None, Some(20))));
        let n = name();
        let soon = tokio::time::Instant::now() + Duration::from_millis(200);
        let mut tasks = Vec::new();
        for _ in 0..60 {
            let r = r.clone();
            let n = n.clone();
            tasks.push(tokio::spawn(async move {
                let mut ok = 0;
                for _ in 0..3 {
                    ok += usize::from(r.acquire(&n, "a", soon).await.is_ok());
                }
                ok
            }));
        }
        let mut ok = 0;
        for t in tasks {
            ok += t.await.unwrap();
        }
        assert_eq!(ok, 20);
        let q = r.quota(&n, "a").unwrap();
        assert_eq!(
            (q.client.daily_available, q.client.daily_used),
            (Some(0), 20)
        );
    }

    #[tokio::test]
    async fn per_second_spacing_and_early_refusal() {
        let r = Arc::new(registry(limits(Some(20), None, None)));
        let n = name();
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
        let mut tasks = Vec::new();
        for _ in 0..40 {
            let r = r.clone();
            let n = n.clone();
            tasks.push(tokio::spawn(async move {
                r.acquire(&n, "a", deadline).await.is_ok()
            }));
        }
        let mut ok = 0;
        for t in tasks {
            ok += usize::from(t.await.unwrap());
        }
        // Paced: one at once, then one every 50 ms for 0.5 s; never more.
        // Fewer only when a loaded machine wakes the waiters late (a slot
        // is granted only before the deadline).
        assert!((7..=12).contains(&ok), "granted {ok}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn reported_quota_wins_and_stale_answers_do_not_raise_it() {
        let r = registry(limits(None, None, Some(1000)));
        let n = name();
        let far = tokio::time::Instant::now() + Duration::from_secs(1);
        let first = r.acquire(&n, "a", far).await.unwrap();
        let second = r.acquire(&n, "a", far).await.unwrap();
        let mut h = axum::http::HeaderMap::new();
        h.insert("x-keap-product-quota-available", "5".parse().unwrap());
        h.insert("x-keap-product-quota-limit", "1000".parse().unwrap());
        second.learn(&Answer::from_headers(200, &h));
        assert_eq!(r.quota(&n, "a").unwrap().client.daily_available, Some(5));
        // An older answer (to `first`) says more is left: ignored.
        h.insert("x-keap-product-quota-available", "7".parse().unwrap());
        first.learn(&Answer::from_headers(200, &h));
        assert_eq!(r.quota(&n, "a").unwrap().client.daily_available, Some(5));
    }

    #[test]
    fn answers_read_every_keap_figure_and_only_those() {
        let mut h = axum::http::HeaderMap::new();
        for (scope, base) in [
            ("product-quota", 10),
            ("product-throttle", 20),
            ("tenant-quota", 30),
            ("tenant-throttle", 40),
        ] {
            h.insert(
                axum::http::HeaderName::from_bytes(format!("x-keap-{scope}-limit").as_bytes())
                    .unwrap(),
                (base + 1).to_string().parse().unwrap(),
            );
            h.insert(
                axum::http::HeaderName::from_bytes(format!("x-keap-{scope}-available").as_bytes())
                    .unwrap(),
                format!(" {} ", base + 2).parse().unwrap(),
            );
            h.insert(
                axum::http::HeaderName::from_bytes(format!("x-keap-{scope}-used").as_bytes())
                    .unwrap(),
                (base + 3).to_string().parse().unwrap(),
            );
            h.insert(
                axum::http::HeaderName::from_bytes(
                    format!("x-keap-{scope}-expiry-time").as_bytes(),
                )
                .unwrap(),
                (base + 4).to_string().parse().unwrap(),
            );
        }
        h.insert("x-keap-product-quota-interval", "99".parse().unwrap());
        h.insert("x-keap-other-limit", "99".parse().unwrap());
        h.insert(reqwest::header::RETRY_AFTER, "7".parse().unwrap());
        let a = Answer::from_headers(429, &h);
        let r = |l, av, u, e| Reported {
            limit: Some(l),
            available: Some(av),
            used: Some(u),
            expiry_ms: Some(e),
        };
        assert_eq!(a.status, 429);
        assert_eq!(a.retry_after, Some(Duration::from_secs(7)));
        assert_eq!(a.quota, r(11, 12, 13, 14));
        assert_eq!(a.throttle, r(21, 22, 23, 24));
        assert_eq!(a.tenant_quota, r(31, 32, 33, 34));
        assert_eq!(a.tenant_throttle, r(41, 42, 43, 44));
        assert!(a.reports_quota());
        // Malformed means not reported; of repeated ones the first counts,
        // even when it is the malformed one.
        let mut h = axum::http::HeaderMap::new();
        h.append("x-keap-product-quota-available", "many".parse().unwrap());
        h.append("x-keap-product-quota-available", "5".parse().unwrap());
        h.append("x-keap-product-quota-limit", "9".parse().unwrap());
        h.append("x-keap-product-quota-limit", "8".parse().unwrap());
        h.insert("x-keap-product-quota-expiry-time", "-1".parse().unwrap());
        let a = Answer::from_headers(200, &h);
        assert_eq!(a.quota.available, None);
        assert_eq!(a.quota.limit, Some(9));
        assert_eq!(a.quota.expiry_ms, None);
        assert!(a.reports_quota(), "the header was there, if unreadable");
        let a = Answer::from_headers(200, &axum::http::HeaderMap::new());
        assert!(!a.reports_quota());
        assert_eq!(a.quota, Reported::default());
        assert_eq!(a.retry_after, None);
    }

    #[tokio::test]
    async fn tenant_state_is_freed_with_its_connection() {
        let p = crate::dev::config("127.0.0.1:1".parse().unwrap(), "/tmp/x.db".into(), "s")
            .providers
            .into_values()
            .next()
            .unwrap();
        assert!(
            p.preset.tenant_limits().is_some(),
            "the dev provider has tenant limits"
        );
        let r = RateLimits::new([&p]);
        let far = tokio::time::Instant::now() + Duration::from_secs(1);
        r.acquire(&p.name, "a", far).await.unwrap();
        r.acquire(&p.name, "b", far).await.unwrap();
        assert_eq!(r.tenant_count(), 2);
        r.forget(&p.name, "a");
        assert_eq!(r.tenant_count(), 1);
        assert!(r.quota(&p.name, "a").unwrap().tenant.is_none());
    }

    /// Headers from a broken or hostile upstream: no panic, no pause
    /// beyond [`MAX_PAUSE`], and the quota still readable.
    #[tokio::test]
    async fn absurd_upstream_figures_neither_panic_nor_park_the_provider() {
        let n = name();
        for retry_after in ["10000000000000", "18446744073709551615"] {
            let r = registry(limits(None, None, None));
            let far = tokio::time::Instant::now() + Duration::from_secs(5);
            let mut h = axum::http::HeaderMap::new();
            h.insert(reqwest::header::RETRY_AFTER, retry_after.parse().unwrap());
            let p = r.acquire(&n, "a", far).await.unwrap();
            p.learn(&Answer::from_headers(429, &h));
            let until = r.quota(&n, "a").unwrap().paused_until.expect("paused");
            assert!(
                until <= Utc::now() + chrono::Duration::from_std(MAX_PAUSE).unwrap(),
                "Retry-After {retry_after}: paused until {until}"
            );
        }
        let r = registry(limits(None, None, None));
        let far = tokio::time::Instant::now() + Duration::from_secs(5);
        let mut h = axum::http::HeaderMap::new();
        for (k, v) in [
            ("x-keap-product-throttle-available", "5"),
            ("x-keap-product-throttle-limit", "4294967296"),
            ("x-keap-tenant-throttle-available", "5"),
            ("x-keap-tenant-throttle-limit", "8589934592"),
            ("x-keap-product-quota-available", "3"),
            ("x-keap-product-quota-used", "18446744073709551615"),
        ] {
            h.insert(k, v.parse().unwrap());
        }
        let first = r.acquire(&n, "a", far).await.unwrap();
        // Granted after the first: the report then counts it on top.
        let second = r.acquire(&n, "a", far).await.unwrap();
        first.learn(&Answer::from_headers(200, &h));
        second.learn(&Answer::from_headers(200, &h));
        r.acquire(&n, "a", far).await.unwrap();
        let q = r.quota(&n, "a").unwrap();
        assert_eq!(q.client.throttle_limit, Some(4294967296));
        assert_eq!(q.client.daily_used, u64::MAX);
    }

    #[tokio::test]
    async fn upstream_429_pauses() {
        let r = registry(limits(None, None, None));
        let n = name();
        let far = tokio::time::Instant::now() + Duration::from_secs(5);
        let p = r.acquire(&n, "a", far).await.unwrap();
        p.learn(&Answer::from_headers(429, &axum::http::HeaderMap::new()));
        assert!(r.quota(&n, "a").unwrap().paused_until.is_some());
        let soon = tokio::time::Instant::now() + Duration::from_millis(100);
        assert!(r.acquire(&n, "a", soon).await.is_err());
        let started = Instant::now();
        r.acquire(&n, "a", far).await.unwrap();
        assert!(started.elapsed() >= Duration::from_millis(800));
    }
}
