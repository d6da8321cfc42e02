//! What the store tells the engine without being asked: which connections
//! other daemons changed ([`Changes`], pushed by PostgreSQL's
//! `LISTEN/NOTIFY`, see `postgres::follow`), and whether the database can
//! be reached at all (the outage state: `/readyz`, one log line per
//! outage, `tokenkeeper_storage_up`).
//!
//! Must not: read or write the database itself (the listener and the
//! callers that hit a failure report here), or log more than one line per
//! outage and one when it ends, however many requests or passes fail
//! meanwhile.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use tokio::sync::Notify;

use super::StoreError;

/// Connections written by someone, not yet re-read by the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changes {
    /// These connections (by id) changed.
    Rows(BTreeSet<i64>),
    /// Anything may have changed: notifications may have been missed (the
    /// listener reconnected, the database came back), so every grant is
    /// read again.
    All,
}

impl Changes {
    fn merge(self, other: Changes) -> Changes {
        match (self, other) {
            (Changes::Rows(mut a), Changes::Rows(b)) => {
                a.extend(b);
                Changes::Rows(a)
            }
            _ => Changes::All,
        }
    }
}

/// The store's feed to the engine; one per [`super::Store`], shared by its
/// clones.
pub struct Feed {
    pending: Mutex<Option<Changes>>,
    /// Signalled when changes are queued (one stored permit: a signal sent
    /// while nobody waits is not lost).
    arrived: Notify,
    /// Whether changes are pushed (a listener runs): the engine then keeps
    /// its snapshots current from the feed, not by reading per request.
    pushed: AtomicBool,
    up: AtomicBool,
    /// When the current outage began (for the line that ends it).
    down_since: Mutex<Option<Instant>>,
}

impl Default for Feed {
    fn default() -> Self {
        Feed {
            pending: Mutex::new(None),
            arrived: Notify::new(),
            pushed: AtomicBool::new(false),
            up: AtomicBool::new(true),
            down_since: Mutex::new(None),
        }
    }
}

impl Feed {
    /// Queues changes and wakes whoever follows the feed.
    pub fn push(&self, changes: Changes) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        *p = Some(match p.take() {
            Some(old) => old.merge(changes),
            None => changes,
        });
        drop(p);
        self.arrived.notify_one();
    }

    /// The changes queued since the last call, if any.
    pub fn take(&self) -> Option<Changes> {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// Whether changes are queued (without taking them).
    pub fn has_pending(&self) -> bool {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Waits until changes are queued (returns at once if some were
    /// signalled since the last wait).
    pub async fn arrived(&self) {
        self.arrived.notified().await;
    }

    /// Marks the feed as pushed by a listener (see [`Feed::pushed`]).
    pub fn set_pushed(&self) {
        self.pushed.store(true, Ordering::SeqCst);
    }

    /// Whether a listener pushes changes: then snapshots are kept current
    /// from the feed and the token path reads no storage.
    pub fn pushed(&self) -> bool {
        self.pushed.load(Ordering::SeqCst)
    }

    /// Whether the database was reachable at the last look.
    pub fn up(&self) -> bool {
        self.up.load(Ordering::SeqCst)
    }

    /// The database could not be reached. The first report of an outage
    /// logs it (once) and moves the metrics; later ones are silent.
    /// Returns whether this began an outage.
    pub fn lost(&self, cause: &dyn std::fmt::Display) -> bool {
        if !self.up.swap(false, Ordering::SeqCst) {
            return false;
        }
        *self.down_since.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        metrics::gauge!(crate::metrics::STORAGE_UP).set(0.0);
        metrics::counter!(crate::metrics::STORAGE_OUTAGES_TOTAL).increment(1);
        tracing::error!(
            error = %cause,
            "the database cannot be reached; serving the valid access tokens held in memory and starting no refresh until it answers again (/readyz answers 503 meanwhile)"
        );
        true
    }

    /// The database answered. Ends an outage if one was on: logged once,
    /// and every grant is read again (changes made meanwhile were not
    /// pushed). Returns whether this ended an outage.
    pub fn back(&self) -> bool {
        if self.up.swap(true, Ordering::SeqCst) {
            return false;
        }
        let since = self
            .down_since
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        metrics::gauge!(crate::metrics::STORAGE_UP).set(1.0);
        tracing::info!(
            outage_secs = since.map_or(0, |s| s.elapsed().as_secs()),
            "the database answers again; re-reading every grant and resuming refreshes"
        );
        self.push(Changes::All);
        true
    }

    /// Whether `e` says the database cannot be reached
    /// ([`StoreError::is_unavailable`]). Where a listener pushes changes it
    /// alone judges outages (it holds a connection of its own and notices
    /// a lost server at once; a caller's failure may be this process's
    /// own stall); elsewhere `e` begins one.
    pub fn note(&self, e: &StoreError) -> bool {
        let unavailable = e.is_unavailable();
        if unavailable && !self.pushed() {
            self.lost(e);
        }
        unavailable
    }

    /// The database answered a caller: ends an outage where no listener
    /// judges them (see [`Feed::note`]).
    pub fn answered(&self) {
        if !self.pushed() {
            self.back();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_merge_and_all_wins() {
        let feed = Feed::default();
        assert_eq!(feed.take(), None);
        feed.push(Changes::Rows([1].into()));
        feed.push(Changes::Rows([2].into()));
        assert_eq!(feed.take(), Some(Changes::Rows([1, 2].into())));
        feed.push(Changes::Rows([1].into()));
        feed.push(Changes::All);
        feed.push(Changes::Rows([3].into()));
        assert_eq!(feed.take(), Some(Changes::All));
        assert!(!feed.has_pending());
    }

    #[test]
    fn an_outage_is_reported_once_and_its_end_rereads_everything() {
        let feed = Feed::default();
        assert!(feed.up());
        assert!(feed.lost(&"connection refused"));
        assert!(!feed.lost(&"connection refused"), "reported once");
        assert!(!feed.up());
        assert!(feed.back());
        assert!(!feed.back());
        assert_eq!(feed.take(), Some(Changes::All));
    }

    #[test]
    fn a_listener_alone_judges_outages_where_it_runs() {
        let lost = StoreError::Sql(sqlx::Error::Io(std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused,
        )));
        let feed = Feed::default();
        assert!(feed.note(&lost));
        assert!(!feed.up(), "without a listener a caller's failure counts");
        feed.answered();
        assert!(feed.up());
        let feed = Feed::default();
        feed.set_pushed();
        assert!(feed.note(&lost), "still said to be an outage-like failure");
        assert!(feed.up(), "but the listener decides");
        let stalled = StoreError::Sql(sqlx::Error::PoolTimedOut);
        assert!(!stalled.is_unavailable(), "a pool wait is not an outage");
    }
}
