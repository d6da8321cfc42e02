//! Serving connections (plain and TLS) with the limits that keep slow or
//! idle clients from starving the daemon:
//!
//! - a request head must be complete within `header_read_timeout` of the
//!   connection's accept or of its first byte (slow headers, silent
//!   sockets);
//! - while a handler waits for the request body, the client must keep it
//!   moving: no byte for `header_read_timeout` closes the connection (a
//!   slow body is a slow head by other means). The timer runs only while
//!   the body is polled and empty, so a handler that is busy (waiting for a
//!   refresh, streaming a proxied answer) is never cut by it;
//! - a connection with no request being answered and no byte moving
//!   either way for `idle_timeout` is closed (an idle keep-alive, or a
//!   streamed answer that stalled);
//! - at most `max_connections` are open at once; beyond that, new ones wait
//!   in the kernel's backlog (no descriptor, no task) until one closes;
//! - on shutdown, accepting stops, idle connections close at once and
//!   answers in flight get [`DRAIN_GRACE`].
//!
//! hyper's own `header_read_timeout` is not used: its timer also runs while
//! a keep-alive connection waits for its next request, which would make it
//! the idle timeout too.

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::Request;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_service::Service;

use super::App;

/// How long answers in flight may take to finish after shutdown starts;
/// then their connections are dropped. Fits inside the unit's stop timeout
/// together with the refresh engine's own grace.
pub const DRAIN_GRACE: Duration = Duration::from_secs(10);

/// The connection limits, from `[server]`.
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

/// Serves `app` on `listener` (TLS when `tls` is set) until `shutdown`,
/// then drains (see the module doc).
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    app: App,
    limits: ServerLimits,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let connections = TaskTracker::new();
    let mut warned_full = false;
    loop {
        let permit = if let Ok(p) = slots.clone().try_acquire_owned() {
            warned_full = false;
            p
        } else {
            if !warned_full {
                tracing::warn!(
                    max_connections = limits.max_connections,
                    "server.max_connections reached; new connections wait until one closes"
                );
                warned_full = true;
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                p = slots.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
            }
        };
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors, typically: wait rather than spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // No Nagle: a proxied (streamed) answer leaves as headers, then
        // body, and the second write would otherwise wait for the client's
        // delayed ACK (~40 ms).
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let app = app.clone();
        let shutdown = shutdown.clone();
        let tls = tls.clone();
        connections.spawn(async move {
            let _permit = permit;
            let activity = Arc::new(Activity::new());
            let io = Tracked {
                inner: tcp,
                activity: activity.clone(),
            };
            match tls {
                None => serve_connection(io, app, activity, limits, shutdown).await,
                Some(acceptor) => {
                    let handshake = tokio::select! {
                        () = shutdown.cancelled() => return,
                        h = tokio::time::timeout(limits.header_read_timeout, acceptor.accept(io)) => h,
                    };
                    match handshake {
                        Ok(Ok(tls)) => serve_connection(tls, app, activity, limits, shutdown).await,
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
        });
    }
    drop(listener);
    connections.close();
    // Each connection ends itself within DRAIN_GRACE; the margin covers
    // the last writes.
    if tokio::time::timeout(DRAIN_GRACE + Duration::from_secs(1), connections.wait())
        .await
        .is_err()
    {
        tracing::warn!("some HTTP connections did not close within the drain grace");
    }
    Ok(())
}

/// What a connection did last, shared by its I/O, its service and its
/// watchdog. Times are milliseconds since `start`.
struct Activity {
    start: Instant,
    /// Last byte read or written.
    last_ms: AtomicU64,
    /// Since when a request head is awaited and not complete; [`NONE`]
    /// while none is (a request in flight, or idle between requests).
    head_since_ms: AtomicU64,
    /// Requests being answered (until the answer's head is ready).
    active: AtomicUsize,
    /// Since when a handler waits for request body bytes that have not
    /// come; [`NONE`] while it does not (see [`Watched`]).
    body_since_ms: AtomicU64,
}

const NONE: u64 = u64::MAX;

impl Activity {
    fn new() -> Activity {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            // A fresh connection owes its first head from the start: a
            // socket that sends nothing is closed like a slow one.
            head_since_ms: AtomicU64::new(0),
            active: AtomicUsize::new(0),
            body_since_ms: AtomicU64::new(NONE),
        }
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn read(&self) {
        let now = self.now_ms();
        self.last_ms.store(now, Ordering::Relaxed);
        if self.active.load(Ordering::Acquire) == 0 {
            // Bytes while nothing is in flight start the next head.
            let _ =
                self.head_since_ms
                    .compare_exchange(NONE, now, Ordering::AcqRel, Ordering::Relaxed);
        }
    }

    fn wrote(&self) {
        self.last_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    fn request_started(&self) {
        self.active.fetch_add(1, Ordering::AcqRel);
        self.head_since_ms.store(NONE, Ordering::Release);
    }

    fn request_answered(&self) {
        self.active.fetch_sub(1, Ordering::AcqRel);
        self.last_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// The handler's body poll found no bytes (`true`) or got a frame, the
    /// end, or dropped the body (`false`).
    fn body_waiting(&self, waiting: bool) {
        if waiting {
            let now = self.now_ms();
            let _ =
                self.body_since_ms
                    .compare_exchange(NONE, now, Ordering::AcqRel, Ordering::Relaxed);
        } else {
            self.body_since_ms.store(NONE, Ordering::Release);
        }
    }

    /// When the connection must close if nothing changes, in ms; `None`
    /// while a request is in flight and not starved of its body.
    fn deadline_ms(&self, limits: &ServerLimits) -> Option<u64> {
        let head_limit = limits.header_read_timeout.as_millis() as u64;
        let head = self.head_since_ms.load(Ordering::Acquire);
        if head != NONE {
            return Some(head.saturating_add(head_limit));
        }
        if self.active.load(Ordering::Acquire) > 0 {
            let body = self.body_since_ms.load(Ordering::Acquire);
            if body == NONE {
                return None;
            }
            // Any byte read counts as progress (a chunk header may arrive
            // without making a frame yet).
            let last = self.last_ms.load(Ordering::Relaxed);
            return Some(body.max(last).saturating_add(head_limit));
        }
        Some(
            self.last_ms
                .load(Ordering::Relaxed)
                .saturating_add(limits.idle_timeout.as_millis() as u64),
        )
    }
}

/// Resolves when the connection has been silent too long (see
/// [`Activity::deadline_ms`]).
async fn watchdog(activity: &Activity, limits: &ServerLimits) {
    loop {
        let now = activity.now_ms();
        let wait = match activity.deadline_ms(limits) {
            Some(d) if d <= now => return,
            Some(d) => d - now,
            // Re-checked later: an answer in flight is not idle, but its
            // handler may start waiting for body bytes at any time.
            None => limits
                .header_read_timeout
                .min(limits.idle_timeout)
                .as_millis() as u64,
        };
        tokio::time::sleep(Duration::from_millis(wait.max(10))).await;
    }
}

/// Decrements the in-flight count when an answer (or its future) is done.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.request_answered();
    }
}

async fn serve_connection<I>(
    io: I,
    app: App,
    activity: Arc<Activity>,
    limits: ServerLimits,
    shutdown: CancellationToken,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc_activity = activity.clone();
    let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        svc_activity.request_started();
        let guard = InFlight(svc_activity.clone());
        let mut app = app.clone();
        async move {
            let req: Request = req.map(|inner| {
                axum::body::Body::new(Watched {
                    inner,
                    activity: guard.0.clone(),
                })
            });
            let ready: Result<(), Infallible> =
                std::future::poll_fn(|cx| Service::<Request>::poll_ready(&mut app, cx)).await;
            if let Err(e) = ready {
                match e {}
            }
            let answer: Result<axum::response::Response, Infallible> = app.call(req).await;
            drop(guard);
            answer
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    // Our watchdog times heads (see the module doc), not hyper's timer.
    builder.keep_alive(true).header_read_timeout(None);
    let conn = builder.serve_connection(TokioIo::new(io), svc);
    tokio::pin!(conn);
    let mut drain_until: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "HTTP connection ended with an error");
                }
                return;
            }
            () = watchdog(&activity, &limits), if drain_until.is_none() => {
                tracing::debug!("closing a silent HTTP connection (header_read_timeout or idle_timeout)");
                return;
            }
            () = shutdown.cancelled(), if drain_until.is_none() => {
                if activity.active.load(Ordering::Acquire) == 0 {
                    return;
                }
                conn.as_mut().graceful_shutdown();
                drain_until = Some(tokio::time::Instant::now() + DRAIN_GRACE);
            }
            () = tokio::time::sleep_until(drain_until.unwrap_or_else(tokio::time::Instant::now)), if drain_until.is_some() => {
                tracing::warn!("an answer did not finish within the shutdown drain grace; connection dropped");
                return;
            }
        }
    }
}

/// A request body that tells [`Activity`] when its handler waits for
/// bytes the client has not sent (the body timer of the module doc).
struct Watched {
    inner: hyper::body::Incoming,
    activity: Arc<Activity>,
}

impl hyper::body::Body for Watched {
    type Data = hyper::body::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        self.activity.body_waiting(polled.is_pending());
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        // A handler that gives up on the body no longer waits for it.
        self.activity.body_waiting(false);
    }
}

/// A socket that reports its reads and writes to [`Activity`].
struct Tracked<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.read();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.wrote();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.wrote();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Raises the soft limit on open files towards `want` (at most the hard
/// limit), so `max_connections` sockets fit next to the database and the
/// outgoing connections; returns the soft limit in force. systemd and
/// login sessions often start services at a soft 1024.
// `rlim_t` is `u64` on Linux but not everywhere.
#[allow(clippy::unnecessary_cast)]
pub fn raise_file_limit(want: u64) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return want;
        }
        if lim.rlim_cur >= want as libc::rlim_t {
            return lim.rlim_cur as u64;
        }
        let target = (want as libc::rlim_t).min(lim.rlim_max);
        let raised = libc::rlimit {
            rlim_cur: target,
            rlim_max: lim.rlim_max,
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
            target as u64
        } else {
            lim.rlim_cur as u64
        }
    }
}
