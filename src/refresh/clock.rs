//! Time as the engine sees it: the wall clock (instants stored and reported,
//! SPEC 7) and a monotonic clock (how long something really took).
//!
//! Every decision that must survive a wall-clock jump is made against both:
//! an access token is judged by the later of the wall clock and "its receipt
//! plus the monotonic time since" ([`Anchor::now`]), and another process's
//! lease is judged lapsed only when its renewal has not moved for a full
//! lease on the monotonic clock ([`LeaseWatch`]), never by comparing its
//! wall-clock deadline with ours. The engine never reads the system clock
//! directly; it asks a [`Clock`], so tests can move time at will.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};

/// A source of wall-clock and monotonic time.
pub trait Clock: Send + Sync {
    /// The wall clock: what instants are stored and reported in.
    fn now(&self) -> DateTime<Utc>;
    /// Monotonic time since an arbitrary fixed origin: never jumps, and is
    /// the only measure of elapsed time the engine trusts.
    fn monotonic(&self) -> Duration;
}

/// Shared handle on a clock.
pub type ClockHandle = Arc<dyn Clock>;

/// The system's clocks. The monotonic half is tokio's, so a test that
/// pauses tokio time also pauses it.
pub struct SystemClock {
    origin: tokio::time::Instant,
}

impl SystemClock {
    /// A system clock whose monotonic origin is now.
    pub fn new() -> SystemClock {
        SystemClock {
            origin: tokio::time::Instant::now(),
        }
    }

    /// As a shared handle.
    pub fn handle() -> ClockHandle {
        Arc::new(SystemClock::new())
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        SystemClock::new()
    }
}

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }

    fn monotonic(&self) -> Duration {
        self.origin.elapsed()
    }
}

/// A clock tests move by hand: [`TestClock::advance`] moves both halves
/// (time passes), [`TestClock::jump_wall`] only the wall clock (an operator
/// or NTP setting it).
pub struct TestClock {
    state: Mutex<(DateTime<Utc>, Duration)>,
}

impl TestClock {
    /// A clock reading `wall`, monotonic zero.
    pub fn new(wall: DateTime<Utc>) -> Arc<TestClock> {
        Arc::new(TestClock {
            state: Mutex::new((wall, Duration::ZERO)),
        })
    }

    /// Time passes: both clocks move by `d`.
    pub fn advance(&self, d: Duration) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.0 += chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX);
        s.1 += d;
    }

    /// The wall clock is set `by` forward (positive) or back (negative);
    /// no time passes.
    pub fn jump_wall(&self, by: chrono::Duration) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.0 += by;
    }
}

impl Clock for TestClock {
    fn now(&self) -> DateTime<Utc> {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).0
    }

    fn monotonic(&self) -> Duration {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).1
    }
}

/// Where a token was received on both clocks, so its age can be measured
/// on the monotonic one whatever the wall clock does afterwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Anchor {
    pub wall: DateTime<Utc>,
    pub monotonic: Duration,
}

impl Anchor {
    /// The anchor for "now".
    pub fn at(clock: &dyn Clock) -> Anchor {
        Anchor {
            wall: clock.now(),
            monotonic: clock.monotonic(),
        }
    }

    /// The instant to judge the anchored token's expiry by: the later of the
    /// wall clock and the anchor advanced by the monotonic time since. A
    /// wall clock set back cannot make a dead token look alive (the anchor
    /// side wins); one set forward makes tokens look older, which costs at
    /// most an early refresh, never a dead token served.
    pub fn now(&self, clock: &dyn Clock) -> DateTime<Utc> {
        let wall = clock.now();
        let since = clock.monotonic().saturating_sub(self.monotonic);
        let anchored = chrono::Duration::from_std(since)
            .ok()
            .and_then(|d| self.wall.checked_add_signed(d))
            .unwrap_or(DateTime::<Utc>::MAX_UTC);
        wall.max(anchored)
    }
}

/// What we last saw of another process's lease, to tell a live holder (its
/// renewal moves) from a dead one (it stops moving), on our monotonic clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseWatch {
    /// `(owner, attempt, lease_until in ms)` as stored: any renewal changes it.
    seen: (String, Option<String>, i64),
    since: Duration,
}

impl LeaseWatch {
    /// Records an observation of the lease `seen` at monotonic `now` and
    /// says whether it has stood still for at least `lease`: only then has
    /// the holder certainly missed its renewals. Any change starts over.
    pub fn observe(
        watch: &mut Option<LeaseWatch>,
        seen: (String, Option<String>, i64),
        now: Duration,
        lease: Duration,
    ) -> bool {
        match watch {
            Some(w) if w.seen == seen => now.saturating_sub(w.since) >= lease,
            _ => {
                *watch = Some(LeaseWatch { seen, since: now });
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t0() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).unwrap()
    }

    #[test]
    fn anchored_now_survives_a_backward_jump() {
        let clock = TestClock::new(t0());
        let a = Anchor::at(&*clock);
        clock.advance(Duration::from_secs(3600));
        clock.jump_wall(-chrono::Duration::hours(2));
        // The wall clock says an hour before receipt; an hour has passed.
        assert_eq!(a.now(&*clock), t0() + chrono::Duration::hours(1));
    }

    #[test]
    fn anchored_now_follows_a_forward_jump() {
        let clock = TestClock::new(t0());
        let a = Anchor::at(&*clock);
        clock.jump_wall(chrono::Duration::hours(5));
        assert_eq!(a.now(&*clock), t0() + chrono::Duration::hours(5));
    }

    #[test]
    fn a_lease_lapses_only_after_standing_still_for_a_lease_on_the_monotonic_clock() {
        let clock = TestClock::new(t0());
        let lease = Duration::from_secs(30);
        let mut w = None;
        let seen = |until: i64| ("other".to_string(), Some("a1".to_string()), until);
        assert!(!LeaseWatch::observe(
            &mut w,
            seen(100),
            clock.monotonic(),
            lease
        ));
        // A wall-clock jump of a day changes nothing: no time passed.
        clock.jump_wall(chrono::Duration::days(1));
        assert!(!LeaseWatch::observe(
            &mut w,
            seen(100),
            clock.monotonic(),
            lease
        ));
        clock.advance(Duration::from_secs(20));
        // Renewed: the watch starts over.
        assert!(!LeaseWatch::observe(
            &mut w,
            seen(200),
            clock.monotonic(),
            lease
        ));
        clock.advance(Duration::from_secs(29));
        assert!(!LeaseWatch::observe(
            &mut w,
            seen(200),
            clock.monotonic(),
            lease
        ));
        clock.advance(Duration::from_secs(1));
        assert!(LeaseWatch::observe(
            &mut w,
            seen(200),
            clock.monotonic(),
            lease
        ));
    }
}
