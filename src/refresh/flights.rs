//! The thread refresh flights run on.
//!
//! A refresh is the critical path of every caller waiting for it, so it
//! runs on its own single-threaded runtime rather than among the request
//! tasks. On the shared runtime each step of a flight (database commit,
//! rate-limit slot, provider call) was queued behind every ready request: a
//! herd of 10,000 callers delayed the provider call by 87 ms
//! (`bench/run.sh`, `herd_10000_detail`). Running apart also means a caller
//! that goes away (a closed connection drops its handler) never cancels a
//! refresh half-way: the single-use refresh token may already be spent at
//! the provider, and only a finished flight stores its successor.

use std::future::Future;

use tokio::runtime::Handle;
use tokio::task::JoinHandle;

/// Owns the flight thread; the thread ends when this is dropped.
pub struct FlightThread {
    handle: Handle,
    _stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl FlightThread {
    /// Starts the thread. Should the system refuse a thread, flights run on
    /// the caller's runtime instead: slower under load, still correct.
    pub fn start() -> FlightThread {
        match Self::spawn_thread() {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(
                    "cannot start the refresh thread ({e}); refreshing on the request threads"
                );
                FlightThread {
                    handle: Handle::current(),
                    _stop: None,
                }
            }
        }
    }

    fn spawn_thread() -> std::io::Result<FlightThread> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("tokenkeeper-refresh".into())
            .spawn(move || {
                // Returns when the sender is dropped; the runtime, and any
                // flight still in it, is dropped here, outside async code.
                runtime.block_on(async {
                    let _ = stopped.await;
                });
            })?;
        Ok(FlightThread {
            handle,
            _stop: Some(stop),
        })
    }

    /// Runs `flight` on the flight thread.
    pub fn spawn<F>(&self, flight: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle.spawn(flight)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn flights_run_on_their_own_thread_and_outlive_their_caller() {
        let flights = FlightThread::start();
        let caller = std::thread::current().id();
        let ran_on = flights
            .spawn(async { std::thread::current().id() })
            .await
            .unwrap();
        assert_ne!(ran_on, caller);

        // Dropping the JoinHandle (a caller that went away) does not cancel.
        let (tx, rx) = tokio::sync::oneshot::channel();
        drop(flights.spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            let _ = tx.send("landed");
        }));
        assert_eq!(rx.await.unwrap(), "landed");
    }
}
