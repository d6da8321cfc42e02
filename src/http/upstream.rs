//! The proxy's own upstream client for the common exchange: a buffered
//! request body, sent over a pooled HTTP/1.1 connection, and an answer read
//! inside the calling task.
//!
//! A pooled client that drives each connection on a task of its own (as
//! reqwest's does) moves every proxied request between three tasks, often
//! across worker threads; here the handler's task polls the connection
//! together with the request and the answer's body, so one exchange stays
//! on one thread, as in an event-loop proxy. Idle connections are kept per
//! origin (scheme, host, port) without a task: before one is reused it is
//! polled once, without waiting, to notice that the server closed it.
//!
//! A request is sent again on a fresh connection only when hyper gives it
//! back unsent (the pooled connection was found closed before anything was
//! written): a request that may have reached the server is never replayed
//! here.

use std::collections::{HashMap, VecDeque};
use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{header, HeaderMap, HeaderValue, Method, Request, StatusCode, Uri};
use futures_util::FutureExt;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body as _, Incoming};
use hyper::client::conn::http1::{Connection, SendRequest};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use url::{Position, Url};

/// Idle connections kept per origin: what 64 concurrent callers need, and
/// few enough that a burst to an origin that then goes quiet cannot hold
/// the daemon's spare file descriptors.
pub const MAX_IDLE_PER_ORIGIN: usize = 64;
/// How long a TCP connect plus TLS handshake may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle connections older than this are closed rather than reused (most
/// servers drop theirs sooner), by the next use of their origin or by the
/// reaper, which looks every third of it while any connection is idle.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// TCP keep-alive probes and `TCP_USER_TIMEOUT`, as reqwest sets them: the
/// proxy has no answer timeout, so these are what notice an upstream that
/// died (or a NAT that forgot the connection) after a request was sent,
/// within about a minute instead of the kernel's quarter of an hour.
const KEEPALIVE: Duration = Duration::from_secs(15);
const KEEPALIVE_RETRIES: u32 = 3;
const USER_TIMEOUT: Duration = Duration::from_secs(30);
/// When the first address of a name does not answer within this, the
/// next (of the other IP family) is tried beside it (RFC 8305), as reqwest
/// does: a dual-stack host with a dead IPv6 path must not cost every new
/// connection the whole connect timeout.
const HAPPY_EYEBALLS: Duration = Duration::from_millis(300);

/// Why an exchange failed. Never carries the URL (its query may hold
/// something the caller considers private) nor any header.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The URL has no host or port this client can connect to.
    #[error("the upstream URL has no host to connect to")]
    NoHost,
    /// DNS or TCP connect failed.
    #[error("could not connect to the upstream: {0}")]
    Connect(#[source] io::Error),
    /// Connect and TLS handshake took longer than [`CONNECT_TIMEOUT`].
    #[error("connecting to the upstream timed out after {0:?}")]
    ConnectTimeout(Duration),
    /// The host is not a name TLS can verify.
    #[error("the upstream host is not a valid TLS server name")]
    ServerName,
    /// The TLS handshake failed (certificate, protocol).
    #[error("TLS handshake with the upstream failed: {0}")]
    Tls(#[source] io::Error),
    /// The request could not be built (method, path or header hyper refuses).
    #[error("the upstream request could not be built: {0}")]
    Request(#[source] axum::http::Error),
    /// The HTTP exchange failed (connection reset, malformed answer).
    #[error("the upstream exchange failed: {0}")]
    Http(#[source] hyper::Error),
    /// The connection ended before the answer's announced length.
    #[error("the upstream closed the connection before the whole answer was read")]
    Truncated,
}

/// The upstream's answer: small ones of known length read whole (their
/// connection is back in the pool already), others streamed.
pub struct Answer {
    /// Status as received.
    pub status: StatusCode,
    /// Headers as received (hop-by-hop ones included).
    pub headers: HeaderMap,
    /// The body.
    pub body: AnswerBody,
}

/// An answer's body.
pub enum AnswerBody {
    /// Read whole.
    Whole(Bytes),
    /// Still arriving; its connection is driven by a task of its own and
    /// is not reused.
    Stream(Incoming),
}

/// Plain TCP or TLS over TCP.
enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

type Driver = Pin<Box<Connection<TokioIo<Io>, Full<Bytes>>>>;

/// One HTTP/1.1 connection: the half that sends and the half that must be
/// polled for anything to move.
struct Conn {
    sender: SendRequest<Full<Bytes>>,
    /// `None` once the connection has closed: dropping the driver then
    /// settles whatever was still waiting on it (a request not yet written
    /// comes back unsent, an answer or body in flight fails).
    driver: Option<Driver>,
    idle_since: Instant,
}

impl Conn {
    /// Whether a pooled connection can take a request now. Polls the
    /// driver once with a no-op waker: a server's close (or stray bytes)
    /// is noticed here, before a request is committed to it.
    fn usable(&mut self, idle_timeout: Duration) -> bool {
        if self.idle_since.elapsed() >= idle_timeout {
            return false;
        }
        let Some(driver) = &mut self.driver else {
            return false;
        };
        if poll_fn(|cx| driver.as_mut().poll(cx))
            .now_or_never()
            .is_some()
        {
            self.driver = None;
            return false;
        }
        !self.sender.is_closed()
    }
}

/// Polls `fut` to completion while driving the connection: `fut` waits on
/// something (readiness, the answer's head, its body) that only moves when
/// the connection's driver is polled. When the driver ends first it is
/// dropped, which makes hyper settle `fut` (with an error, or the request
/// given back); nothing would ever move it otherwise.
async fn drive<F: Future>(driver: &mut Option<Driver>, fut: F) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    poll_fn(|cx| {
        if let Poll::Ready(v) = fut.as_mut().poll(cx) {
            return Poll::Ready(v);
        }
        if let Some(d) = driver {
            if d.as_mut().poll(cx).is_ready() {
                *driver = None;
                return fut.as_mut().poll(cx);
            }
        }
        Poll::Pending
    })
    .await
}

/// The pooled client (see the module documentation).
pub struct Upstream {
    /// Idle connections by origin (`scheme://host:port` as the URL spells
    /// it), most recently used last.
    idle: Arc<Mutex<Idle>>,
    /// Whether a reaper task is running (one at most, while anything idles).
    reaping: Arc<AtomicBool>,
    idle_timeout: Duration,
    tcp: HttpConnector,
    tls: tokio_rustls::TlsConnector,
}

type Idle = HashMap<String, VecDeque<Conn>>;

/// A TCP connection to `authority` (`scheme://host:port`) by `connector`.
async fn connect_tcp(mut connector: HttpConnector, authority: Uri) -> io::Result<TcpStream> {
    use tower_service::Service;
    poll_fn(|cx| connector.poll_ready(cx))
        .await
        .map_err(io::Error::other)?;
    let io = connector.call(authority).await.map_err(io::Error::other)?;
    Ok(io.into_inner())
}

/// TCP connections as reqwest makes them (see [`KEEPALIVE`],
/// [`HAPPY_EYEBALLS`]); TLS is added on top by [`Upstream::connect`].
fn tcp_connector() -> HttpConnector {
    let mut c = HttpConnector::new();
    // https URLs too: this only makes the TCP connection.
    c.enforce_http(false);
    c.set_nodelay(true);
    c.set_connect_timeout(Some(CONNECT_TIMEOUT));
    c.set_happy_eyeballs_timeout(Some(HAPPY_EYEBALLS));
    c.set_keepalive(Some(KEEPALIVE));
    c.set_keepalive_interval(Some(KEEPALIVE));
    c.set_keepalive_retries(Some(KEEPALIVE_RETRIES));
    c.set_tcp_user_timeout(Some(USER_TIMEOUT));
    c
}

impl Upstream {
    /// A client trusting the Mozilla roots (`webpki-roots`, as the proxy's
    /// reqwest client with `rustls-tls` does), TLS 1.2 and 1.3 with ring,
    /// offering only `http/1.1`. Fails only if ring lacks those versions.
    pub fn new() -> Result<Upstream, rustls::Error> {
        Upstream::with_roots(rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        })
    }

    /// [`Upstream::new`] trusting `roots` instead.
    fn with_roots(roots: rustls::RootCertStore) -> Result<Upstream, rustls::Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Upstream {
            idle: Arc::new(Mutex::new(HashMap::new())),
            reaping: Arc::new(AtomicBool::new(false)),
            idle_timeout: IDLE_TIMEOUT,
            tcp: tcp_connector(),
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
        })
    }

    /// Closes idle connections past the idle timeout, every third of it,
    /// until none is left idle: without it, connections to an origin that
    /// went quiet would hold their sockets until that origin's next use.
    fn reap(&self) {
        // Read first: a running reaper is the common case, and a read
        // leaves the flag's cache line shared between the workers.
        if self.reaping.load(Ordering::Acquire) || self.reaping.swap(true, Ordering::SeqCst) {
            return;
        }
        let (idle, reaping, timeout) = (self.idle.clone(), self.reaping.clone(), self.idle_timeout);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(timeout / 3).await;
                let mut idle = idle.lock().unwrap_or_else(|e| e.into_inner());
                idle.retain(|_, conns| {
                    conns.retain(|c| c.idle_since.elapsed() < timeout);
                    !conns.is_empty()
                });
                if idle.is_empty() {
                    // Under the lock: a connection put back after this
                    // sees the flag down and starts another reaper.
                    reaping.store(false, Ordering::SeqCst);
                    return;
                }
            }
        });
    }

    /// Sends `method url` with `headers` (end-to-end ones, `Authorization`
    /// included; `Host` is set here) and the whole `body`, and reads the
    /// answer: whole if its length is known and at most `whole_max`.
    pub async fn send(
        &self,
        method: Method,
        url: &Url,
        mut headers: HeaderMap,
        body: Bytes,
        whole_max: u64,
    ) -> Result<Answer, UpstreamError> {
        let https = match url.scheme() {
            "https" => true,
            "http" => false,
            _ => return Err(UpstreamError::NoHost),
        };
        let origin = &url[..Position::AfterPort];
        let host = HeaderValue::from_str(&url[Position::BeforeHost..Position::AfterPort])
            .map_err(|_| UpstreamError::NoHost)?;
        headers.insert(header::HOST, host);
        // The length is the body's, which hyper writes; a caller's own
        // would be believed and could frame the request otherwise.
        headers.remove(header::CONTENT_LENGTH);
        headers.remove(header::TRANSFER_ENCODING);
        // What reqwest adds by default; some APIs answer 406 without it.
        if !headers.contains_key(header::ACCEPT) {
            headers.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        }
        let uri = Uri::from_maybe_shared(Bytes::copy_from_slice(
            url[Position::BeforePath..Position::AfterQuery].as_bytes(),
        ))
        .map_err(|e| UpstreamError::Request(e.into()))?;
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        *req.headers_mut() = headers;

        loop {
            let (mut conn, pooled) = match self.take(origin) {
                Some(c) => (c, true),
                None => (self.connect(url, https).await?, false),
            };
            let Conn { sender, driver, .. } = &mut conn;
            if let Err(e) = drive(driver, sender.ready()).await {
                if pooled {
                    continue;
                }
                return Err(UpstreamError::Http(e));
            }
            let sent = drive(driver, sender.try_send_request(req)).await;
            let resp = match sent {
                Ok(r) => r,
                Err(mut e) => match e.take_message() {
                    // Never written: safe to send on another connection.
                    Some(back) if pooled => {
                        req = back;
                        continue;
                    }
                    _ => return Err(UpstreamError::Http(e.into_error())),
                },
            };
            let (parts, incoming) = resp.into_parts();
            let length = incoming.size_hint().exact();
            if length.is_none_or(|n| n > whole_max) {
                // Streamed: the connection gets a task of its own for as
                // long as the body flows, and is not reused.
                if let Some(driver) = conn.driver {
                    tokio::spawn(async move {
                        let _ = driver.await;
                    });
                }
                return Ok(Answer {
                    status: parts.status,
                    headers: parts.headers,
                    body: AnswerBody::Stream(incoming),
                });
            }
            let whole = drive(&mut conn.driver, incoming.collect())
                .await
                .map_err(UpstreamError::Http)?
                .to_bytes();
            if Some(whole.len() as u64) != length {
                return Err(UpstreamError::Truncated);
            }
            let closing = parts
                .headers
                .get_all(header::CONNECTION)
                .iter()
                .any(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
            if !closing {
                self.put(origin, conn);
            }
            return Ok(Answer {
                status: parts.status,
                headers: parts.headers,
                body: AnswerBody::Whole(whole),
            });
        }
    }

    /// The most recently used idle connection to `origin` that is still
    /// open; closed or stale ones met on the way are dropped.
    fn take(&self, origin: &str) -> Option<Conn> {
        loop {
            // Checked outside the lock: the check may read from the socket.
            let mut c = self
                .idle
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_mut(origin)?
                .pop_back()?;
            if c.usable(self.idle_timeout) {
                return Some(c);
            }
        }
    }

    /// Back to the pool, unless it ended or the origin has enough idle.
    fn put(&self, origin: &str, mut conn: Conn) {
        conn.idle_since = Instant::now();
        // Lets the driver settle after the answer: it notices a close that
        // came with it, and asks for the next request only if the exchange
        // is wholly over (a server that answered before reading the whole
        // request body leaves the connection unfit for another).
        if !conn.usable(self.idle_timeout) || !conn.sender.is_ready() {
            return;
        }
        {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            let conns = match idle.get_mut(origin) {
                Some(c) => c,
                None => idle.entry(origin.to_string()).or_default(),
            };
            // Oldest first: those past the idle timeout go.
            while conns
                .front()
                .is_some_and(|c| c.idle_since.elapsed() >= self.idle_timeout)
            {
                conns.pop_front();
            }
            if conns.len() >= MAX_IDLE_PER_ORIGIN {
                return;
            }
            conns.push_back(conn);
        }
        self.reap();
    }

    async fn connect(&self, url: &Url, https: bool) -> Result<Conn, UpstreamError> {
        let port = url.port_or_known_default().ok_or(UpstreamError::NoHost)?;
        let host = url.host().ok_or(UpstreamError::NoHost)?;
        // The connector resolves the name and connects: only the scheme,
        // host (IPv6 in brackets) and port of the URL reach it.
        let authority = Uri::try_from(format!(
            "{}://{}:{port}",
            url.scheme(),
            url.host_str().ok_or(UpstreamError::NoHost)?
        ))
        .map_err(|_| UpstreamError::NoHost)?;
        let io = tokio::time::timeout(CONNECT_TIMEOUT, async {
            let tcp = connect_tcp(self.tcp.clone(), authority)
                .await
                .map_err(UpstreamError::Connect)?;
            if !https {
                return Ok(Io::Plain(tcp));
            }
            let name = match &host {
                url::Host::Domain(d) => rustls::pki_types::ServerName::try_from(d.to_string())
                    .map_err(|_| UpstreamError::ServerName)?,
                url::Host::Ipv4(a) => rustls::pki_types::ServerName::from(std::net::IpAddr::V4(*a)),
                url::Host::Ipv6(a) => rustls::pki_types::ServerName::from(std::net::IpAddr::V6(*a)),
            };
            let tls = self
                .tls
                .connect(name, tcp)
                .await
                .map_err(UpstreamError::Tls)?;
            Ok(Io::Tls(Box::new(tls)))
        })
        .await
        .map_err(|_| UpstreamError::ConnectTimeout(CONNECT_TIMEOUT))??;
        let (sender, driver) = hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(io))
            .await
            .map_err(UpstreamError::Http)?;
        Ok(Conn {
            sender,
            driver: Some(Box::pin(driver)),
            idle_since: Instant::now(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Keep-alive probes and `TCP_USER_TIMEOUT` are what notice a dead
    /// upstream (the proxy has no answer timeout).
    #[tokio::test]
    async fn new_connections_probe_a_silent_peer() {
        use std::os::fd::AsRawFd;
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let uri = Uri::try_from(format!("http://127.0.0.1:{port}")).unwrap();
        let tcp = connect_tcp(tcp_connector(), uri).await.unwrap();
        let opt = |level, name| {
            let mut v: libc::c_int = 0;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: getsockopt on an open socket into a c_int of its size.
            let r = unsafe {
                libc::getsockopt(
                    tcp.as_raw_fd(),
                    level,
                    name,
                    (&mut v as *mut libc::c_int).cast(),
                    &mut len,
                )
            };
            assert_eq!(r, 0);
            v
        };
        assert_eq!(opt(libc::SOL_SOCKET, libc::SO_KEEPALIVE), 1);
        assert_eq!(opt(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE), 15);
        assert_eq!(opt(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL), 15);
        assert_eq!(opt(libc::IPPROTO_TCP, libc::TCP_KEEPCNT), 3);
        assert_eq!(opt(libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT), 30_000);
        assert_eq!(opt(libc::IPPROTO_TCP, libc::TCP_NODELAY), 1);
    }

    /// An idle connection is closed once past the idle timeout even if its
    /// origin is never used again, and the pool forgets the origin.
    #[tokio::test]
    async fn idle_connections_of_a_quiet_origin_are_closed() {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                let mut b = [0u8; 1];
                if s.read(&mut b).await.unwrap() == 0 {
                    return;
                }
                head.push(b[0]);
            }
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await
                .unwrap();
            // Kept alive: the next read ends only when the client closes.
            let mut b = [0u8; 1];
            let _ = closed_tx.send(s.read(&mut b).await.map(|n| n == 0));
        });
        let mut client = Upstream::new().unwrap();
        client.idle_timeout = Duration::from_millis(300);
        let url = Url::parse(&format!("http://127.0.0.1:{port}/x")).unwrap();
        let answer = client
            .send(Method::GET, &url, HeaderMap::new(), Bytes::new(), 1024)
            .await
            .unwrap();
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(client.idle.lock().unwrap().len(), 1, "kept for reuse");
        let closed = tokio::time::timeout(Duration::from_secs(5), closed_rx)
            .await
            .expect("the idle connection was not closed")
            .unwrap();
        assert!(matches!(closed, Ok(true)), "{closed:?}");
        assert!(
            client.idle.lock().unwrap().is_empty(),
            "the origin is forgotten"
        );
        assert!(!client.reaping.load(Ordering::SeqCst), "the reaper stopped");
    }

    /// Over TLS: the server name is sent (SNI), `http/1.1` is agreed
    /// (ALPN), the certificate is checked against the roots, and the
    /// connection carries the next request too.
    #[tokio::test]
    async fn https_exchange_sends_sni_and_alpn_and_reuses_the_connection() {
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let der = certified.cert.der().clone();
        let key =
            rustls::pki_types::PrivateKeyDer::Pkcs8(certified.signing_key.serialize_der().into());
        let mut server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], key)
        .unwrap();
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let served = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = acceptor.accept(tcp).await.unwrap();
            let (_, conn) = tls.get_ref();
            let seen = (
                conn.server_name().map(str::to_string),
                conn.alpn_protocol().map(<[u8]>::to_vec),
            );
            let mut heads = Vec::new();
            for i in 0..2 {
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") {
                    let mut b = [0u8; 1];
                    tls.read_exact(&mut b).await.unwrap();
                    head.push(b[0]);
                }
                heads.push(String::from_utf8(head).unwrap());
                let body = format!("answer {i}");
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                tls.write_all(answer.as_bytes()).await.unwrap();
            }
            (seen, heads)
        });

        let mut roots = rustls::RootCertStore::empty();
        roots.add(der).unwrap();
        let client = Upstream::with_roots(roots).unwrap();
        let url = Url::parse(&format!("https://localhost:{port}/api/x?y=1")).unwrap();
        for i in 0..2 {
            let answer = client
                .send(Method::GET, &url, HeaderMap::new(), Bytes::new(), 1024)
                .await
                .unwrap();
            assert_eq!(answer.status, StatusCode::OK);
            let AnswerBody::Whole(body) = answer.body else {
                panic!("a small answer is read whole");
            };
            assert_eq!(body, format!("answer {i}"));
        }
        let ((sni, alpn), heads) = served.await.unwrap();
        assert_eq!(sni.as_deref(), Some("localhost"));
        assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
        assert!(
            heads[0].starts_with("GET /api/x?y=1 HTTP/1.1\r\n"),
            "{}",
            heads[0]
        );
        let lower = heads[1].to_ascii_lowercase();
        assert!(
            lower.contains(&format!("host: localhost:{port}\r\n")),
            "{lower}"
        );
        assert!(lower.contains("accept: */*\r\n"), "{lower}");
    }

    /// A certificate the roots do not vouch for: no exchange, a TLS error.
    #[tokio::test]
    async fn an_untrusted_certificate_is_refused() {
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let key =
            rustls::pki_types::PrivateKeyDer::Pkcs8(certified.signing_key.serialize_der().into());
        let server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![certified.cert.der().clone()], key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let _ = acceptor.accept(tcp).await;
        });
        let client = Upstream::new().unwrap();
        let url = Url::parse(&format!("https://localhost:{port}/x")).unwrap();
        let e = client
            .send(Method::GET, &url, HeaderMap::new(), Bytes::new(), 1024)
            .await
            .err()
            .expect("refused");
        assert!(matches!(e, UpstreamError::Tls(_)), "{e}");
    }
}
