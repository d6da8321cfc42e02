//! The engine at its own interface, in-process: a real SQLite file, the
//! simulator, and a test clock moved by hand (`tests/engine_clock.rs`,
//! `tests/scheduler.rs`).

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::ConnectOptions;
use tokenkeeper::config::Config;
use tokenkeeper::dev::{RunningSimulator, Simulator, SimulatorConfig};
use tokenkeeper::provider::{Provider, TokenGrant};
use tokenkeeper::refresh::clock::{Clock, TestClock};
use tokenkeeper::refresh::{Engine, EngineParts};
use tokenkeeper::store::Store;

/// An engine on a test clock against the simulator (provider `demo`,
/// tokens living an hour), and what keeps it alive.
pub struct EngineSetup {
    pub sim: RunningSimulator,
    pub engine: Engine,
    pub clock: Arc<TestClock>,
    pub provider: Provider,
    pub db: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl EngineSetup {
    /// Starts the simulator with `secret` and an engine on a fresh
    /// database; `tune` adjusts the daemon config (its `demo` provider
    /// already points at the simulator) before the engine is built.
    pub async fn start(secret: &str, tune: impl FnOnce(&mut Config)) -> EngineSetup {
        let sim = Simulator::start_local(SimulatorConfig {
            client_secret: secret.into(),
            access_lifetime: Duration::from_secs(3600),
            ..SimulatorConfig::default()
        })
        .await
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("tokenkeeper.db");
        let mut cfg = tokenkeeper::dev::config("127.0.0.1:1".parse().unwrap(), db.clone(), secret);
        let p = cfg.providers.get_mut("demo").unwrap();
        p.authorization_url = url::Url::parse(&sim.url("/authorize")).unwrap();
        p.token_url = url::Url::parse(&sim.url("/token")).unwrap();
        p.revocation_url = Some(url::Url::parse(&sim.url("/revoke")).unwrap());
        tune(&mut cfg);
        let http = reqwest::Client::new();
        let provider = Provider::new(cfg.providers["demo"].clone(), http.clone());
        let store = Store::open(&db, None).await.unwrap();
        let clock = TestClock::new(Utc::now());
        let engine = Engine::start(EngineParts {
            clock: clock.clone(),
            ..EngineParts::new(store, tokenkeeper::daemon::settings_from(&cfg, &http))
        })
        .await
        .unwrap();
        EngineSetup {
            sim,
            engine,
            clock,
            provider,
            db,
            _dir: dir,
        }
    }

    /// A browser authorization of `demo/account` against the simulator,
    /// stored through the engine, issued `age` ago on the test clock and
    /// living an hour from then.
    pub async fn authorize(&self, account: &str, age: Duration) -> TokenGrant {
        let redirect = url::Url::parse("http://127.0.0.1:1/callback").unwrap();
        let start = self.provider.authorization_start(&redirect);
        let r = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap()
            .post(self.sim.url("/approve"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(start.url.query().unwrap_or_default().to_string())
            .send()
            .await
            .unwrap();
        let location = url::Url::parse(r.headers()["location"].to_str().unwrap()).unwrap();
        let code = location
            .query_pairs()
            .find(|(k, _)| k == "code")
            .unwrap()
            .1
            .to_string();
        let mut grant = self
            .provider
            .exchange_code(&code, start.pkce_verifier.as_ref(), &redirect)
            .await
            .unwrap();
        grant.issued_at = self.clock.now() - chrono::Duration::from_std(age).unwrap();
        grant.expires_at = grant.issued_at + chrono::Duration::hours(1);
        self.engine
            .authorized("demo", account, &grant)
            .await
            .unwrap();
        grant
    }

    /// A connection of its own to the database: another process's writes.
    pub async fn other_process(&self) -> sqlx::SqliteConnection {
        SqliteConnectOptions::new()
            .filename(&self.db)
            .connect()
            .await
            .unwrap()
    }
}
