//! Assembles and runs the daemon: store, engine, scheduler, HTTP server.
//!
//! The entry point is testable in the mini-redis way: the caller binds the
//! listener and decides what shutdown means (a signal, a test's token).
//! Shutdown is explicit: stop accepting, let in-flight refreshes commit
//! (bounded), close the database.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_cron_scheduler::{Job, JobScheduler};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::http::{self, AppState};
use crate::provider::{self, Provider};
use crate::refresh::{Engine, Settings};
use crate::store::{Store, StoreError};

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
    }
}

/// Runs until `shutdown` is cancelled. `extra` routes are merged into the
/// router (dev mode mounts the simulator there).
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
    extra: Option<axum::Router>,
) -> Result<(), DaemonError> {
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    let store = Store::open(&config.storage.path).await?;
    let http_client = provider::http_client();
    let engine = Engine::start(store.clone(), settings_from(&config, &http_client)).await?;
    let bound = listener.local_addr()?;
    let public_url = config.public_url(bound);
    let state = AppState {
        engine: engine.clone(),
        public_url: public_url.clone(),
        allowed_hosts: Arc::new(allowed_hosts(&config, &public_url)),
    };
    let app = http::router(state, extra);

    let mut scheduler = JobScheduler::new().await?;
    // The cron scheduler counts whole seconds; a sub-second interval would
    // become zero and spin.
    let every = config.refresh.check_interval.max(Duration::from_secs(1));
    let ticker = engine.clone();
    scheduler
        .add(Job::new_repeated_async(every, move |_id, _sched| {
            let engine = ticker.clone();
            Box::pin(async move {
                if let Err(e) = engine.tick().await {
                    tracing::error!(error = %e, "refresh scheduler tick failed");
                }
            })
        })?)
        .await?;
    scheduler.start().await?;
    // Catch up at once rather than one interval late (interrupted refreshes,
    // tokens that expired while the daemon was down).
    engine.tick().await?;

    tracing::info!(
        listen = %bound,
        public_url = %public_url,
        database = %config.storage.path.display(),
        providers = config.providers.len(),
        "tokenkeeper is serving"
    );
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .await;

    tracing::info!("shutting down: waiting for in-flight refreshes to commit");
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
    store.close().await;
    tracing::info!("stopped");
    served.map_err(DaemonError::from)
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
