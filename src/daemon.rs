//! Assembles and runs the daemon: store, engine, scheduler, HTTP server.
//!
//! Two steps, testable in the mini-redis way: [`App::build`] makes the
//! application from a config (it opens the store and starts the engine, but
//! serves and schedules nothing), and [`App::serve`] serves it on a
//! listener the caller bound until a shutdown signal the caller owns (a
//! signal handler, a test's token). [`run`] is the two in a row.
//! Shutdown is explicit and bounded, so it ends before systemd's
//! `TimeoutStopSec` would kill a refresh mid-call:
//!
//! 1. SIGTERM: stop accepting connections; the scheduler stops and the
//!    engine starts no new refresh flight.
//! 2. Flights in the air land and commit, within [`shutdown_grace`]: the
//!    longest possible flight, i.e. per try a rate-limit wait and a
//!    provider call (each at most the provider's `request_timeout`), two
//!    tries (a rejected token is retried once with a newer stored one),
//!    a wait for another process's lease (one more `request_timeout`), and
//!    the database writes around them plus the last attempt of a grant held
//!    in memory (each at most the SQLite busy timeout,
//!    [`crate::store::BUSY_TIMEOUT`]): `5 × request_timeout + 3 × busy
//!    timeout`. With the defaults: 5 × 30 s + 3 × 10 s = 180 s.
//! 3. Open HTTP connections drain for at most [`HTTP_DRAIN`] more (requests
//!    waiting for a flight are answered as soon as it lands), then are cut;
//!    meanwhile token files get their last write, within
//!    [`crate::sinks::FINAL_WRITE_BOUND`] (no longer than the drain).
//! 4. The database is closed (WAL checkpoint), within [`CLOSE_BOUND`].
//!
//! Worst case with the defaults: 180 s + 5 s + 5 s = 190 s; the unit file
//! sets `TimeoutStopSec=210s`. `request_timeout` is capped at 120 s
//! ([`crate::config::MAX_REQUEST_TIMEOUT`]); a configuration whose budget
//! exceeds the unit's timeout is covered anyway: at SIGTERM the daemon tells
//! systemd its budget (`EXTEND_TIMEOUT_USEC`). A normal stop takes
//! milliseconds: the bounds are only reached by a flight that is slow.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::http::{self, AppState};
use crate::provider::{self, Provider};
use crate::ratelimit::RateLimits;
use crate::refresh::{Engine, EngineParts, Settings};
use crate::store::{Store, StoreError};
use crate::systemd;

/// How long open HTTP connections may take to finish once the refresh
/// flights have landed: enough to write the answers waiting for them, short
/// enough that an idle or stalled client cannot hold the stop open.
pub const HTTP_DRAIN: Duration = Duration::from_secs(5);

/// Closing the database after the flights (a WAL checkpoint of a small file).
pub const CLOSE_BOUND: Duration = Duration::from_secs(5);

/// How long shutdown waits for refresh flights to land and commit: the
/// longest possible flight (see the module doc for the arithmetic). A
/// provider call that has been answered must reach the database, or the
/// rotated refresh token is lost.
pub fn shutdown_grace(config: &Config) -> Duration {
    let request_timeout = config
        .providers
        .values()
        .map(|p| p.request_timeout)
        .max()
        .unwrap_or(Duration::ZERO);
    request_timeout * 5 + crate::store::BUSY_TIMEOUT * 3
}

/// The whole stop, worst case: what systemd's `TimeoutStopSec` must exceed.
pub fn stop_budget(config: &Config) -> Duration {
    shutdown_grace(config) + HTTP_DRAIN.max(crate::sinks::FINAL_WRITE_BOUND) + CLOSE_BOUND
}

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the HTTP server failed: {0}")]
    Serve(#[from] std::io::Error),
    #[error(transparent)]
    Key(#[from] crate::crypto::KeyError),
    #[error("cannot set up HTTPS: {0}")]
    Tls(#[from] crate::http::tls::TlsError),
    #[error("HTTP server task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// A provider's `issuer` gave no endpoints and none are kept: a
    /// configuration problem (exit 2), named with the URLs tried.
    #[error(transparent)]
    Discovery(#[from] crate::provider::discovery::DiscoveryError),
    #[error(transparent)]
    Backup(#[from] crate::backup::BackupError),
    #[error("cannot read server.api_keys_file {path}: {source}")]
    ApiKeys {
        path: String,
        source: std::io::Error,
    },
}

/// Builds the engine's reloadable settings from a config.
pub fn settings_from(config: &Config, http: &reqwest::Client) -> Settings {
    Settings {
        refresh: config.refresh.clone(),
        providers: config
            .providers
            .iter()
            .map(|(name, p)| (name.clone(), Provider::new(p.clone(), http.clone())))
            .collect::<HashMap<_, _>>(),
        notifier: crate::notify::Notifier::new(&config.notify, http.clone()),
    }
}

/// Everything `run` needs; the caller binds the listener and owns shutdown.
pub struct RunOptions {
    pub config: Config,
    /// Re-read on SIGHUP; `None` (dev mode) means there is nothing to reload.
    pub config_path: Option<PathBuf>,
    pub listener: TcpListener,
    pub shutdown: CancellationToken,
    /// Extra routes merged into the router (dev mode mounts the simulator).
    pub extra: Option<axum::Router>,
}

/// Builds the application from `opts.config` and serves it on
/// `opts.listener` until `opts.shutdown` is cancelled.
pub async fn run(opts: RunOptions) -> Result<(), DaemonError> {
    let bound = opts.listener.local_addr()?;
    let app = App::build(opts.config, bound, opts.extra).await?;
    app.serve(opts.listener, opts.config_path, opts.shutdown)
        .await
}

/// The application built from a config: the open store, the engine, the
/// rate limits shared by the proxy and the refreshes, the HTTP state and
/// router, TLS, and what a reload can change. Nothing is served or
/// scheduled until [`App::serve`]; tests build the same value and drive
/// [`App::router`] or [`App::engine`] in-process.
pub struct App {
    /// What a reload can change, with the engine and the config in force.
    reload: Reloadable,
    store: Store,
    router: http::App,
    tls: Option<crate::http::tls::TlsMaterial>,
    public_url: url::Url,
    /// Held while the application lives: offline commands (rekey) refuse
    /// to run while it is.
    db_lock: crate::store::StoreLock,
    /// `[backup]`: made on its schedule (and on `POST /v1/backup`).
    backups: Option<Arc<crate::backup::Backups>>,
    /// The proxy's state, also held by the router's.
    proxy: Arc<http::proxy::Proxy>,
}

impl App {
    /// Opens the store and builds everything on top of it for a daemon
    /// whose listener is bound to `bound` (the default `public_url` is
    /// derived from it); `extra` routes are merged into the router (dev
    /// mode mounts the simulator).
    pub async fn build(
        mut config: Config,
        bound: std::net::SocketAddr,
        extra: Option<axum::Router>,
    ) -> Result<App, DaemonError> {
        for w in &config.warnings {
            tracing::warn!("{w}");
        }
        // Before the engine exists, so the handles it caches are real ones.
        crate::metrics::install();
        let key = match &config.storage.encryption_key_file {
            Some(path) => {
                warn_if_readable_by_others(path, "storage.encryption_key_file");
                Some(crate::crypto::SealKey::from_file(path)?)
            }
            None => None,
        };
        if let Some(path) = &config.server.api_keys_file {
            warn_if_readable_by_others(path, "server.api_keys_file");
        }
        let location = config.storage.location();
        let db_lock = crate::store::StoreLock::shared(&location).await?;
        let store = Store::open_at(&location, key).await?;
        if !store.encrypted() {
            tracing::warn!(
                "tokens are stored unencrypted; set storage.encryption_key_file to seal them at rest"
            );
        }
        let api_keys = match &config.server.api_keys_file {
            Some(path) => Some(Arc::new(crate::http::auth::ApiKeys::load(path).map_err(
                |source| DaemonError::ApiKeys {
                    path: path.display().to_string(),
                    source,
                },
            )?)),
            None => None,
        };
        let http_client = provider::http_client();
        // Before the engine and the limits see the providers: an issuer's
        // endpoints are part of their configuration.
        crate::provider::discovery::resolve(&mut config, &store, &http_client).await?;
        // One set of limits for the proxy and the engine's refresh calls:
        // both spend the same provider quota.
        let limits = Arc::new(RateLimits::new(config.providers.values()));
        let engine = Engine::start(EngineParts {
            limits: Some(limits.clone()),
            ..EngineParts::new(store.clone(), settings_from(&config, &http_client))
        })
        .await?;
        engine.ensure_client_credentials().await?;
        release_freed_memory();
        let backups = match &config.backup {
            // The key again, for verifying backups (the store keeps its own).
            Some(b) => Some(Arc::new(crate::backup::Backups::new(
                b.clone(),
                match &config.storage.encryption_key_file {
                    Some(path) => Some(crate::crypto::SealKey::from_file(path)?),
                    None => None,
                },
            ))),
            None => None,
        };
        let extra = match &backups {
            Some(b) => {
                let routes = http::backup::routes(b.clone(), engine.clone());
                Some(match extra {
                    Some(e) => e.merge(routes),
                    None => routes,
                })
            }
            None => extra,
        };
        let public_url = config.public_url(bound);
        let tls = load_tls(&config, &public_url)?;
        let proxy = Arc::new(http::proxy::Proxy::new(
            limits.clone(),
            config.server.proxy_max_wait,
        ));
        let state = AppState::new(crate::http::Shared {
            engine: engine.clone(),
            public_url: public_url.clone(),
            allowed_hosts: Arc::new(allowed_hosts(&config, &public_url)),
            api_keys: api_keys.clone(),
            tls_fingerprint: tls.as_ref().map(|t| Arc::from(t.fingerprint.as_str())),
            proxy: proxy.clone(),
            devices: crate::device::DeviceFlows::new(),
        });
        http::proxy::Proxy::register(config.providers.keys().map(String::as_str));
        Ok(App {
            reload: Reloadable {
                engine,
                http: http_client,
                limits,
                api_keys,
                config,
                sinks: None,
            },
            store,
            router: http::router(state, extra),
            tls,
            public_url,
            db_lock,
            backups,
            proxy,
        })
    }

    /// The refresh engine.
    pub fn engine(&self) -> &Engine {
        &self.reload.engine
    }

    /// What the proxy keeps per connection.
    pub fn proxy(&self) -> &Arc<http::proxy::Proxy> {
        &self.proxy
    }

    /// The rate limits the proxy and the refreshes share.
    pub fn limits(&self) -> &Arc<RateLimits> {
        &self.reload.limits
    }

    /// The whole HTTP application (guards and routes), for serving or for
    /// calling in-process.
    pub fn router(&self) -> http::App {
        self.router.clone()
    }

    /// Serves on `listener` until `shutdown` is cancelled, then stops in
    /// the order of the module doc; SIGHUP re-reads `reload_from` (`None`:
    /// nothing to reload). The scheduler, the watchdog and the reload
    /// listener run only here.
    pub async fn serve(
        self,
        listener: TcpListener,
        reload_from: Option<PathBuf>,
        shutdown: CancellationToken,
    ) -> Result<(), DaemonError> {
        let App {
            mut reload,
            store,
            router,
            tls,
            public_url,
            db_lock,
            backups,
            proxy: _,
        } = self;
        let engine = reload.engine.clone();
        let config = reload.config.clone();
        let bound = listener.local_addr()?;

        // Catch up at once rather than one interval late (interrupted refreshes,
        // tokens that expired while the daemon was down).
        engine.tick().await?;
        let scheduler = tokio::spawn(crate::refresh::scheduler::run(
            engine.clone(),
            shutdown.clone(),
        ));
        // Other daemons' commits, announced by the database (PostgreSQL),
        // installed as they come; and the outage state.
        let following = store.follow(shutdown.clone()).await.map(|listener| {
            let engine = engine.clone();
            let stop = shutdown.clone();
            (
                listener,
                tokio::spawn(async move { engine.follow(stop).await }),
            )
        });
        // Token files: written now from the caught-up snapshots, then at
        // every change, on tasks of their own.
        let sinks = Arc::new(crate::sinks::Sinks::start(engine.clone(), &config.sinks));
        reload.sinks = Some(sinks.clone());
        // Calendar jobs (backups, purges); their failure to start is the
        // daemon's, like a port that cannot be bound.
        let calendar = crate::backup::Calendar::start(engine.clone(), backups).await?;

        let background = tokio_util::task::TaskTracker::new();
        background.spawn(systemd::watchdog(engine.clone(), shutdown.clone()));
        background.spawn(reload_on_sighup(reload, reload_from, shutdown.clone()));
        background.spawn(crate::history::purge_loop(
            store.clone(),
            config.storage.history,
            shutdown.clone(),
        ));
        let stop_notice = shutdown.clone();
        let budget = stop_budget(&config);
        background.spawn(async move {
            stop_notice.cancelled().await;
            systemd::stopping(budget);
        });
        background.close();

        tracing::info!(
            listen = %bound,
            public_url = %public_url,
            database = %config.storage.location().describe(),
            providers = config.providers.len(),
            "tokenkeeper is serving"
        );
        systemd::ready(&systemd::summary(&engine));
        // On its own task, so that the stop can give up on connections that
        // do not drain (see the module doc). The server starts draining its
        // own connections the moment `shutdown` is cancelled.
        let mut server = tokio::spawn(http::server::serve(
            listener,
            tls.map(|t| t.acceptor),
            router,
            server_limits(&config),
            shutdown.clone(),
        ));
        let ended_early = tokio::select! {
            r = &mut server => Some(r),
            () = shutdown.cancelled() => None,
        };

        // 1. Nothing new: no scheduled and no on-demand refresh starts.
        shutdown.cancel();
        engine.stop_new_refreshes();
        if let Err(e) = scheduler.await {
            tracing::warn!(error = %e, "scheduler did not stop cleanly");
        }
        if let Some((listener, follower)) = following {
            let _ = tokio::join!(listener, follower);
        }
        calendar.stop().await;
        // Grants held in memory (a failed commit) get their last attempt.
        engine.stop();
        // 2. Flights in the air land and commit.
        let grace = shutdown_grace(&config);
        tracing::info!(
            grace_secs = grace.as_secs(),
            "shutting down: waiting for in-flight refreshes to commit"
        );
        engine.tasks().close();
        if tokio::time::timeout(grace, engine.tasks().wait())
            .await
            .is_err()
        {
            tracing::error!(
                grace_secs = grace.as_secs(),
                "some refreshes did not finish within the shutdown grace period; their results may be lost"
            );
        }
        // 3. Open connections drain, briefly; meanwhile token files get
        // their last write (a refresh that landed during the stop), within
        // the same few seconds.
        let drain = async {
            match ended_early {
                Some(r) => r,
                None => match tokio::time::timeout(HTTP_DRAIN, &mut server).await {
                    Ok(r) => r,
                    Err(_) => {
                        tracing::info!(
                            "closing HTTP connections that did not finish within {} s",
                            HTTP_DRAIN.as_secs()
                        );
                        server.abort();
                        Ok(Ok(()))
                    }
                },
            }
        };
        let (served, ()) = tokio::join!(drain, sinks.stop());
        // 4. Close.
        background.wait().await;
        let close = async {
            engine.leave().await;
            store.close().await;
        };
        if tokio::time::timeout(CLOSE_BOUND, close).await.is_err() {
            tracing::warn!(
                "the database did not close in time; SQLite recovers the WAL at next start"
            );
        }
        drop(db_lock);
        tracing::info!("stopped");
        Ok(served??)
    }
}

/// The TLS material `[server] tls` asks for (a self-signed certificate is
/// made in the database's directory on first use), logged with its
/// fingerprint and published for other users' CLI.
fn load_tls(
    config: &Config,
    public_url: &url::Url,
) -> Result<Option<crate::http::tls::TlsMaterial>, DaemonError> {
    let state_dir = config
        .storage
        .path
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default();
    let tls = crate::http::tls::load(&config.server.tls, &state_dir, public_url.host_str())?;
    if let Some(t) = &tls {
        tracing::info!(
            certificate = %t.cert_path.display(),
            sha256 = %t.fingerprint,
            "serving HTTPS; compare this fingerprint when your browser asks"
        );
        if config.server.tls == crate::config::TlsConfig::SelfSigned {
            publish_certificate(&t.cert_path);
        }
    }
    Ok(tls)
}

/// Writes a world-readable copy of the self-signed certificate (public
/// data) to `$RUNTIME_DIRECTORY/cert.pem` when systemd provides one: the
/// state directory is private to the service user, and other users' CLI
/// must be able to verify the daemon (`crate::cli::PUBLIC_CERT_PATH`).
fn publish_certificate(cert: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    let Some(dir) = std::env::var_os("RUNTIME_DIRECTORY") else {
        return;
    };
    let Some(dir) = std::env::split_paths(&dir).next() else {
        return;
    };
    let target = dir.join("cert.pem");
    let copied = std::fs::read(cert)
        .and_then(|pem| std::fs::write(&target, pem))
        // After the write: the service's UMask would narrow a create mode.
        .and_then(|()| std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644)));
    match copied {
        Ok(()) => tracing::info!(
            copy = %target.display(),
            "published the public certificate for other users' `tokenkeeper` commands"
        ),
        Err(e) => tracing::warn!(
            copy = %target.display(),
            error = %e,
            "cannot publish the public certificate; other users need --ca-file"
        ),
    }
}

/// What a reload can change in a running daemon.
struct Reloadable {
    engine: Engine,
    http: reqwest::Client,
    limits: Arc<RateLimits>,
    api_keys: Option<Arc<crate::http::auth::ApiKeys>>,
    /// The configuration in force, to tell what a reload changes.
    config: Config,
    /// The token-file writers, once serving (re-read at a reload).
    sinks: Option<Arc<crate::sinks::Sinks>>,
}

/// SIGHUP: re-read the config; on success apply what a running daemon can
/// (providers, refresh policy including `check_interval` and `jitter`,
/// notify, the API keys) and name in a warning every changed setting that
/// needs a restart; on failure log every problem and keep the old config.
async fn reload_on_sighup(mut r: Reloadable, path: Option<PathBuf>, shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP; config reload disabled");
        return;
    };
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            got = hup.recv() => if got.is_none() { return },
        }
        let Some(path) = &path else {
            tracing::info!("SIGHUP: no config file in use, nothing to reload");
            continue;
        };
        systemd::reloading();
        let loaded = crate::config::load(path);
        match loaded {
            Ok(mut new) => {
                for w in &new.warnings {
                    tracing::warn!("{w}");
                }
                // Issuers are asked again: a reload is how an operator
                // picks up a provider's moved endpoints.
                let store = r.engine.store().clone();
                if let Err(e) = crate::provider::discovery::resolve(&mut new, &store, &r.http).await
                {
                    tracing::error!(
                        "configuration reload refused, the previous configuration stays in force: {e}"
                    );
                    systemd::ready(&systemd::summary(&r.engine));
                    continue;
                }
                apply(&mut r, new);
                // A client-credentials provider added, or its connection
                // forgotten since: its token is obtained at the next pass.
                if let Err(e) = r.engine.ensure_client_credentials().await {
                    tracing::error!(
                        "cannot store the connection of a client-credentials provider ({e}); it is tried again at the next reload or start"
                    );
                }
            }
            Err(e) => {
                tracing::error!(
                    "configuration reload refused, the previous configuration stays in force:\n{e}"
                );
            }
        }
        systemd::ready(&systemd::summary(&r.engine));
    }
}

/// Applies a successfully read config (see [`reload_on_sighup`]).
fn apply(r: &mut Reloadable, new: Config) {
    let mut restart = needs_restart(&r.config, &new);
    match (&r.api_keys, &new.server.api_keys_file) {
        (Some(keys), Some(path)) => match keys.reload(path) {
            Ok(n) => tracing::info!(keys = n, file = %path.display(), "API keys reloaded"),
            Err(e) => tracing::error!(
                file = %path.display(),
                "cannot reload server.api_keys_file ({e}); the previous keys stay valid"
            ),
        },
        (None, None) => {}
        // Turning keys on or off changes which routes are guarded.
        _ => restart.push("server.api_keys_file (turning API keys on or off)"),
    }
    let names: Vec<&str> = new.providers.keys().map(String::as_str).collect();
    r.engine.reload(settings_from(&new, &r.http));
    r.limits.reload(new.providers.values());
    if let Some(sinks) = &r.sinks {
        sinks.reload(&new.sinks);
    }
    http::proxy::Proxy::register(new.providers.keys().map(String::as_str));
    // A reload may be the fix (a new client secret): try at once.
    let failing = r.engine.retry_failing_now();
    if failing > 0 {
        tracing::info!(
            connections = failing,
            "retrying failing connections at once with the new configuration"
        );
    }
    if restart.is_empty() {
        tracing::info!(providers = ?names, "configuration reloaded");
    } else {
        tracing::warn!(
            providers = ?names,
            "configuration reloaded, except these changed settings, which need a restart (systemctl restart tokenkeeper): {}",
            restart.join(", ")
        );
    }
    // What is in force now: settings needing a restart keep their old values.
    let mut kept = new;
    kept.server = r.config.server.clone();
    kept.storage = r.config.storage.clone();
    kept.backup = r.config.backup.clone();
    r.config = kept;
}

/// Settings a running daemon cannot change (the socket, TLS, guards and
/// the database are set up once), by name, when `new` differs from `old`.
fn needs_restart(old: &Config, new: &Config) -> Vec<&'static str> {
    fn differs<T: std::fmt::Debug>(a: &T, b: &T) -> bool {
        format!("{a:?}") != format!("{b:?}")
    }
    let (o, n) = (&old.server, &new.server);
    let mut named = Vec::new();
    let checks: [(&'static str, bool); 6] = [
        ("server.listen", differs(&o.listen, &n.listen)),
        (
            "server.allow_remote",
            differs(&o.allow_remote, &n.allow_remote),
        ),
        ("server.public_url", differs(&o.public_url, &n.public_url)),
        ("server.tls", differs(&o.tls, &n.tls)),
        (
            "server.allowed_hosts",
            differs(&o.allowed_hosts, &n.allowed_hosts),
        ),
        (
            "server.proxy_max_wait",
            differs(&o.proxy_max_wait, &n.proxy_max_wait),
        ),
    ];
    named.extend(checks.iter().filter(|c| c.1).map(|c| c.0));
    // Any other [server] key (whatever this list does not know yet).
    let mut o2 = o.clone();
    o2.api_keys_file = n.api_keys_file.clone();
    if named.is_empty() && differs(&o2, n) {
        named.push("[server] settings");
    }
    let storage: [(&str, bool); 3] = [
        (
            "storage.path",
            differs(&old.storage.path, &new.storage.path),
        ),
        (
            "storage.encryption_key_file",
            differs(
                &old.storage.encryption_key_file,
                &new.storage.encryption_key_file,
            ),
        ),
        ("storage.url", {
            use secrecy::ExposeSecret;
            let url = |c: &Config| c.storage.url.as_ref().map(|u| u.expose_secret().to_owned());
            url(old) != url(new)
        }),
    ];
    let before = named.len();
    named.extend(storage.iter().filter(|c| c.1).map(|c| c.0));
    // Any other [storage] key.
    if named.len() == before && differs(&old.storage, &new.storage) {
        named.push("[storage] settings");
    }
    // The calendar jobs are set up once, at start.
    if differs(&old.backup, &new.backup) {
        named.push("[backup]");
    }
    named
}

/// Key files are the operator's; a readable one is worth a loud warning
/// (with the fix) rather than a refusal, since systemd credentials are
/// already private to the service.
fn warn_if_readable_by_others(path: &std::path::Path, key: &str) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 && !crate::config::is_systemd_credential(path) {
            tracing::warn!(
                "{key} {} can be read by other users (mode {mode:o}); run `chmod 600 {}`",
                path.display(),
                path.display()
            );
        }
    }
}

/// `[server]` connection limits, with the file limit raised to fit them.
fn server_limits(config: &Config) -> http::server::ServerLimits {
    let want = config.server.max_connections as usize;
    // Room for the database, outgoing connections and the listener.
    let files = http::server::raise_file_limit(want as u64 + 256);
    let max_connections = want.min((files as usize).saturating_sub(256).max(64));
    if max_connections < want {
        tracing::warn!(
            max_connections,
            "server.max_connections is {want}, but the open-file limit is {files}; raise LimitNOFILE"
        );
    }
    http::server::ServerLimits {
        header_read_timeout: config.server.header_read_timeout,
        idle_timeout: config.server.idle_timeout,
        max_connections,
    }
}

fn allowed_hosts(config: &Config, public_url: &url::Url) -> Vec<String> {
    let mut hosts: Vec<String> = config
        .server
        .allowed_hosts
        .iter()
        .map(|h| h.to_ascii_lowercase())
        .collect();
    if let Some(h) = public_url.host_str() {
        hosts.push(h.to_ascii_lowercase());
    }
    hosts.push(config.server.listen.ip().to_string());
    hosts.sort();
    hosts.dedup();
    hosts
}

/// Returns memory freed after the start (decoding every stored grant) to
/// the kernel. glibc keeps freed pages inside its arenas otherwise, and an
/// idle daemon would hold its start-up peak for good (`bench/run.sh`,
/// `scale_10000_idle_rss`).
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages; it is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reload_names_exactly_the_settings_that_need_a_restart() {
        let cfg = |extra_server: &str, db: &str, interval: &str| {
            crate::config::parse(
                &format!(
                    "[server]\nlisten = \"127.0.0.1:8787\"\n{extra_server}\n[storage]\npath = \"{db}\"\n[refresh]\ncheck_interval = \"{interval}\"\n"
                ),
                std::path::Path::new("/tmp/t.toml"),
            )
            .unwrap()
        };
        let old = cfg("", "/tmp/a.db", "30s");
        assert!(needs_restart(&old, &cfg("", "/tmp/a.db", "5s")).is_empty());
        assert_eq!(
            needs_restart(&old, &cfg("proxy_max_wait = \"3s\"", "/tmp/b.db", "5s")),
            vec!["server.proxy_max_wait", "storage.path"]
        );
    }

    #[test]
    fn a_changed_backup_section_needs_a_restart() {
        let cfg = |backup: &str| {
            crate::config::parse(
                &format!("[storage]\npath = \"/tmp/a.db\"\n{backup}"),
                std::path::Path::new("/tmp/t.toml"),
            )
            .unwrap()
        };
        let daily = "[backup]\nschedule = \"0 0 3 * * *\"\ndir = \"/tmp/b\"\n";
        assert!(needs_restart(&cfg(daily), &cfg(daily)).is_empty());
        assert_eq!(needs_restart(&cfg(""), &cfg(daily)), vec!["[backup]"]);
        assert_eq!(
            needs_restart(&cfg(daily), &cfg(&daily.replace("3 *", "4 *"))),
            vec!["[backup]"]
        );
    }

    #[test]
    fn a_changed_storage_url_needs_a_restart() {
        let cfg = |url: &str| {
            crate::config::parse(
                &format!("[storage]\nurl = \"{url}\"\n"),
                std::path::Path::new("/tmp/t.toml"),
            )
            .unwrap()
        };
        let old = cfg("postgres://tk@a/tk");
        assert!(needs_restart(&old, &cfg("postgres://tk@a/tk")).is_empty());
        assert_eq!(
            needs_restart(&old, &cfg("postgres://tk:other@a/tk")),
            vec!["storage.url"]
        );
    }

    /// The unit's `TimeoutStopSec` covers the daemon's own worst-case stop
    /// with the default `request_timeout`, so systemd never kills a refresh
    /// mid-call (the arithmetic is in the module doc and the unit file).
    #[test]
    fn the_unit_stop_timeout_covers_the_longest_stop() {
        let unit = include_str!("../systemd/tokenkeeper.service");
        let value = unit
            .lines()
            .find_map(|l| l.strip_prefix("TimeoutStopSec="))
            .expect("the unit sets TimeoutStopSec");
        let unit_timeout = crate::config::parse_duration(value.trim()).unwrap();
        let config = crate::config::parse(
            "[providers.keap]\npreset = \"keap\"\nclient_id = \"id\"\nclient_secret = \"s\"\n",
            std::path::Path::new("/tmp/t.toml"),
        )
        .unwrap();
        assert_eq!(
            config.providers["keap"].request_timeout,
            Duration::from_secs(30)
        );
        let budget = stop_budget(&config);
        assert_eq!(budget, Duration::from_secs(190));
        assert!(
            unit_timeout >= budget + Duration::from_secs(10),
            "TimeoutStopSec={value} leaves no margin over the {budget:?} stop"
        );
    }
}
