//! Assembles and runs the daemon: store, engine, scheduler, HTTP server.
//!
//! The entry point is testable in the mini-redis way: the caller binds the
//! listener and decides what shutdown means (a signal, a test's token).
//! Shutdown is explicit: stop accepting, let in-flight refreshes commit
//! (bounded), close the database.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::ServiceExt;
use tokio::net::TcpListener;
use tokio_cron_scheduler::{Job, JobScheduler};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::http::{self, AppState};
use crate::provider::{self, Provider};
use crate::ratelimit::RateLimits;
use crate::refresh::{Engine, Settings};
use crate::store::{Store, StoreError};
use crate::systemd;

/// How long shutdown waits for in-flight refreshes to commit: a provider
/// call that has been answered must reach the database, or the rotated
/// refresh token is lost.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot start the refresh scheduler: {0}")]
    Scheduler(#[from] tokio_cron_scheduler::JobSchedulerError),
    #[error("the HTTP server failed: {0}")]
    Serve(#[from] std::io::Error),
    #[error(transparent)]
    Key(#[from] crate::crypto::KeyError),
    #[error("cannot set up HTTPS: {0}")]
    Tls(#[from] crate::http::tls::TlsError),
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

/// Runs until `shutdown` is cancelled.
pub async fn run(opts: RunOptions) -> Result<(), DaemonError> {
    let RunOptions {
        config,
        config_path,
        listener,
        shutdown,
        extra,
    } = opts;
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
    let store = Store::open(&config.storage.path, key).await?;
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
    let engine = Engine::start(store.clone(), settings_from(&config, &http_client)).await?;
    release_freed_memory();
    let bound = listener.local_addr()?;
    let public_url = config.public_url(bound);
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
    }
    // One set of limits for the proxy and the engine's refresh calls: both
    // spend the same provider quota.
    let limits = Arc::new(RateLimits::new(config.providers.values()));
    engine.use_rate_limits(limits.clone());
    let state = AppState::new(crate::http::Shared {
        engine: engine.clone(),
        public_url: public_url.clone(),
        allowed_hosts: Arc::new(allowed_hosts(&config, &public_url)),
        api_keys,
        tls_fingerprint: tls.as_ref().map(|t| Arc::from(t.fingerprint.as_str())),
        proxy: Arc::new(http::proxy::Proxy::new(
            limits.clone(),
            config.server.proxy_max_wait,
        )),
    });
    let app = http::router(state, extra);

    let mut scheduler = JobScheduler::new().await?;
    // The cron scheduler counts whole seconds; a sub-second interval would
    // become zero and spin.
    let every = config.refresh.check_interval.max(Duration::from_secs(1));
    let ticker = engine.clone();
    let last_status = Arc::new(Mutex::new(String::new()));
    scheduler
        .add(Job::new_repeated_async(every, move |_id, _sched| {
            let engine = ticker.clone();
            let last_status = last_status.clone();
            Box::pin(async move {
                if let Err(e) = engine.tick().await {
                    tracing::error!(error = %e, "refresh scheduler tick failed");
                }
                crate::metrics::upkeep();
                let now = systemd::summary(&engine);
                let mut last = last_status.lock().unwrap_or_else(|e| e.into_inner());
                if *last != now {
                    systemd::status(&now);
                    *last = now;
                }
            })
        })?)
        .await?;
    scheduler.start().await?;
    // Catch up at once rather than one interval late (interrupted refreshes,
    // tokens that expired while the daemon was down).
    engine.tick().await?;

    let background = tokio_util::task::TaskTracker::new();
    background.spawn(systemd::watchdog(engine.clone(), shutdown.clone()));
    background.spawn(reload_on_sighup(
        engine.clone(),
        config_path,
        http_client.clone(),
        limits.clone(),
        shutdown.clone(),
    ));
    let stop_notice = shutdown.clone();
    background.spawn(async move {
        stop_notice.cancelled().await;
        systemd::stopping();
    });
    background.close();

    tracing::info!(
        listen = %bound,
        public_url = %public_url,
        database = %config.storage.path.display(),
        providers = config.providers.len(),
        "tokenkeeper is serving"
    );
    systemd::ready(&systemd::summary(&engine));
    let stop = shutdown.clone().cancelled_owned();
    let served = match tls {
        Some(t) => {
            let tls_listener = crate::http::tls::TlsListener::new(listener, t.acceptor)?;
            axum::serve(tls_listener, app.into_make_service())
                .with_graceful_shutdown(stop)
                .await
        }
        None => {
            // No Nagle: a proxied (streamed) answer leaves as headers, then
            // body, and the second write would otherwise wait for the
            // client's delayed ACK (~40 ms).
            use axum::serve::ListenerExt;
            let listener = listener.tap_io(|tcp| {
                if let Err(e) = tcp.set_nodelay(true) {
                    tracing::debug!(error = %e, "cannot set TCP_NODELAY");
                }
            });
            axum::serve(listener, app.into_make_service())
                .with_graceful_shutdown(stop)
                .await
        }
    };

    tracing::info!("shutting down: waiting for in-flight refreshes to commit");
    shutdown.cancel();
    if let Err(e) = scheduler.shutdown().await {
        tracing::warn!(error = %e, "scheduler did not stop cleanly");
    }
    engine.tasks().close();
    if tokio::time::timeout(SHUTDOWN_GRACE, engine.tasks().wait())
        .await
        .is_err()
    {
        tracing::warn!("some refreshes did not finish within the shutdown grace period");
    }
    background.wait().await;
    engine.leave().await;
    store.close().await;
    tracing::info!("stopped");
    served.map_err(DaemonError::from)
}

/// SIGHUP: re-read the config; on success swap providers and policy, on
/// failure log every problem and keep the old config. Server and storage
/// settings need a restart (the socket and the database are already open).
async fn reload_on_sighup(
    engine: Engine,
    path: Option<PathBuf>,
    http: reqwest::Client,
    limits: Arc<RateLimits>,
    shutdown: CancellationToken,
) {
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
        match crate::config::load(path) {
            Ok(new) => {
                for w in &new.warnings {
                    tracing::warn!("{w}");
                }
                let names: Vec<&str> = new.providers.keys().map(String::as_str).collect();
                tracing::info!(providers = ?names, "configuration reloaded");
                engine.reload(settings_from(&new, &http));
                limits.reload(new.providers.values());
                let failing = engine.retry_failing_now();
                if failing > 0 {
                    tracing::info!(
                        connections = failing,
                        "retrying failing connections at once with the new configuration"
                    );
                }
            }
            Err(e) => {
                tracing::error!(
                    "configuration reload refused, the previous configuration stays in force:\n{e}"
                );
            }
        }
        systemd::ready(&systemd::summary(&engine));
    }
}

/// Key files are the operator's; a readable one is worth a loud warning
/// (with the fix) rather than a refusal, since systemd credentials are
/// already private to the service.
fn warn_if_readable_by_others(path: &std::path::Path, key: &str) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                "{key} {} can be read by other users (mode {mode:o}); run `chmod 600 {}`",
                path.display(),
                path.display()
            );
        }
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
