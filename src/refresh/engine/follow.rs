//! Following the store's feed ([`Engine::follow`]): what other daemons of
//! a cluster commit, announced by the database, is read and installed at
//! once, so every daemon serves a rotation within moments of its commit
//! while the token path itself reads no storage.
//!
//! Must not: refresh anything (the scheduler does, woken here), or keep
//! retrying a read while the database is away (its return queues a full
//! re-read: `store::feed::Feed::back`).

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Engine;
use crate::store::feed::Changes;

/// Wait before reading again after a read failed for another reason than
/// an outage (a statement timeout, a lock held elsewhere).
const RETRY_IN: Duration = Duration::from_secs(1);

impl Engine {
    /// Applies the changes the store announces until `shutdown`: the
    /// connections named are read again, or all of them when
    /// announcements may have been missed (the listener reconnected, the
    /// database came back, the periodic safety net of `tick`). Runs
    /// beside the scheduler, which it wakes after each batch since due
    /// times may have moved.
    pub async fn follow(&self, shutdown: CancellationToken) {
        let feed = self.inner.store.feed().clone();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = feed.arrived() => {}
            }
            let Some(changes) = feed.take() else {
                continue;
            };
            let read = match &changes {
                Changes::All => self.reconcile().await,
                Changes::Rows(ids) => self.reconcile_rows(ids).await,
            };
            self.inner.scheduler.wake();
            let Err(e) = read else {
                continue;
            };
            if feed.note(&e) {
                // Its end queues a full re-read.
                continue;
            }
            tracing::warn!(error = %e, "could not read what another daemon wrote; reading again shortly");
            feed.push(changes);
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(RETRY_IN) => {}
            }
        }
    }
}
