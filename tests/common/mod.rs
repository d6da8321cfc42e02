//! Test harness: the real `tokenkeeper` binary on a loopback port, a real
//! SQLite file in a temp dir, and the Keap-like simulator in-process so
//! tests can inject faults and inspect what the provider saw.
#![allow(dead_code)]

pub mod engine;
pub mod postgres;

use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use reqwest::header::{COOKIE, LOCATION, SET_COOKIE};
use reqwest::redirect::Policy;
use serde_json::Value;
use tokenkeeper::dev::{RunningSimulator, Simulator, SimulatorConfig};

pub const BIN: &str = env!("CARGO_BIN_EXE_tokenkeeper");
pub const CLIENT_SECRET: &str = "sim-client+secret/9f8e7d=";

/// Settings a test may change before the daemon starts.
pub struct Options {
    pub access_lifetime: Duration,
    /// Extra lines appended to `[refresh]`.
    pub refresh: String,
    /// Extra lines appended to `[providers.keap]`.
    pub provider: String,
    /// Extra lines appended to `[server]`.
    pub server: String,
    pub sim: SimulatorConfig,
    pub rust_log: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            access_lifetime: Duration::from_secs(86400),
            refresh: String::new(),
            provider: String::new(),
            server: String::new(),
            sim: SimulatorConfig {
                client_secret: CLIENT_SECRET.into(),
                ..SimulatorConfig::default()
            },
            rust_log: "info,tokenkeeper=debug".into(),
        }
    }
}

impl Options {
    /// The defaults, with the provider issuing access tokens that live
    /// `lifetime`.
    pub fn lifetime(lifetime: Duration) -> Options {
        Options {
            access_lifetime: lifetime,
            ..Options::default()
        }
    }
}

pub struct Harness {
    pub sim: RunningSimulator,
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub config_path: PathBuf,
    pub http: reqwest::Client,
    pub daemon: Option<Child>,
    pub rust_log: String,
    /// A browser session cookie (`name=value`) from [`Harness::login`],
    /// sent by `start_connect` (needed when API keys are set).
    pub session: Option<String>,
    /// Extra environment of the daemons [`Harness::start`] spawns (e.g.
    /// `CREDENTIALS_DIRECTORY`, as systemd sets it).
    pub daemon_env: Vec<(String, PathBuf)>,
    starts: usize,
}

pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(Policy::none())
        .pool_max_idle_per_host(64)
        .timeout(Duration::from_secs(60))
        .build()
        .expect("reqwest client")
}

impl Harness {
    pub async fn new(opts: Options) -> Harness {
        let sim_cfg = SimulatorConfig {
            access_lifetime: opts.access_lifetime,
            ..opts.sim
        };
        let sim = Simulator::start_local(sim_cfg)
            .await
            .expect("simulator starts");
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let config_path = dir.path().join("tokenkeeper.toml");
        std::fs::write(
            dir.path().join("client-secret"),
            format!("{CLIENT_SECRET}\n"),
        )
        .unwrap();
        let h = Harness {
            sim,
            port,
            config_path,
            http: client(),
            daemon: None,
            rust_log: opts.rust_log.clone(),
            session: None,
            daemon_env: Vec::new(),
            starts: 0,
            dir,
        };
        h.write_config(&opts.server, &opts.refresh, &opts.provider);
        h
    }

    /// [`Harness::new`] with `server.api_keys_file` set to a file holding
    /// `keys` ([`Harness::api_keys_path`]); not started.
    pub async fn with_api_keys(mut opts: Options, keys: &str) -> Harness {
        opts.server = format!("{}\napi_keys_file = \"api-keys\"", opts.server);
        let h = Harness::new(opts).await;
        std::fs::write(h.api_keys_path(), keys).unwrap();
        h
    }

    /// The API key file of [`Harness::with_api_keys`].
    pub fn api_keys_path(&self) -> PathBuf {
        self.dir.path().join("api-keys")
    }

    /// A running daemon ([`Harness::new`], then [`Harness::start`]).
    pub async fn started(opts: Options) -> Harness {
        let mut h = Harness::new(opts).await;
        h.start().await;
        h
    }

    /// A running daemon with `keap/default` authorized: where most tests
    /// begin.
    pub async fn authorized(opts: Options) -> Harness {
        let h = Harness::started(opts).await;
        h.authorize_default().await;
        h
    }

    /// Authorizes `keap/default` through the browser flow; returns the
    /// access token the daemon then serves.
    pub async fn authorize_default(&self) -> String {
        let r = self.authorize("keap", "default").await;
        assert_eq!(r.status(), 200, "authorization succeeds");
        let (s, b) = self.token().await;
        assert_eq!(s, 200, "{b}");
        b["access_token"].as_str().unwrap().to_string()
    }

    /// `POST /v1/token/keap/refresh`: a forced refresh of `keap/default`.
    pub async fn force_refresh(&self) -> (u16, Value) {
        self.post_json("/v1/token/keap/refresh").await
    }

    /// A forced refresh succeeds, and the provider never saw a spent
    /// refresh token sent again nor refused one: the grant is intact.
    pub async fn assert_refresh_keeps_the_grant(&self) {
        let (s, b) = self.force_refresh().await;
        assert_eq!(s, 200, "{b}");
        assert_no_reuse_or_rejection(&self.sim.sim.stats());
    }

    /// `POST path` on a task of its own (a request left in the air while
    /// the test goes on); the task yields the status and JSON body.
    pub fn spawn_post(&self, path: &str) -> tokio::task::JoinHandle<(u16, Value)> {
        let http = self.http.clone();
        let url = self.url(path);
        tokio::spawn(async move {
            let r = http.post(url).send().await.expect("daemon answers");
            let s = r.status().as_u16();
            (s, r.json::<Value>().await.unwrap_or(Value::Null))
        })
    }

    pub fn db_path(&self) -> PathBuf {
        self.dir.path().join("tokenkeeper.db")
    }

    pub fn write_config(&self, server: &str, refresh: &str, provider: &str) {
        let sim = &self.sim.base_url;
        // Test-friendly refresh defaults, each overridable by `refresh`.
        let defaults: String = [
            ("check_interval", "\"1s\""),
            ("jitter", "\"0s\""),
            ("retry_initial", "\"1s\""),
            ("retry_max", "\"4s\""),
        ]
        .iter()
        .filter(|(k, _)| !refresh.lines().any(|l| l.trim_start().starts_with(k)))
        .map(|(k, v)| format!("{k} = {v}\n"))
        .collect();
        // The provider's request timeout, unless `provider` sets its own
        // (TOML refuses a key given twice).
        let timeout = if provider
            .lines()
            .any(|l| l.trim_start().starts_with("request_timeout"))
        {
            ""
        } else {
            "request_timeout = \"5s\"\n"
        };
        let text = format!(
            r#"[server]
listen = "127.0.0.1:{port}"
{server}

[storage]
path = "{db}"

[refresh]
{defaults}{refresh}

[providers.keap]
preset = "keap"
client_id = "demo-client"
client_secret_file = "client-secret"
authorization_url = "{sim}/authorize"
token_url = "{sim}/token"
revocation_url = "{sim}/revoke"
api_base_url = "{sim}/api"
{timeout}{provider}
"#,
            port = self.port,
            db = self.db_path().display(),
        );
        std::fs::write(&self.config_path, text).unwrap();
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("daemon.log")
    }

    /// All daemon output so far (every start appends).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts the daemon and waits until `/healthz` answers.
    /// Tests run in parallel, so the port picked by [`free_port`] can be
    /// taken in between: then the daemon says "cannot listen" and exits, and
    /// this moves the config to another port and tries again.
    pub async fn start(&mut self) {
        assert!(self.daemon.is_none(), "daemon already running");
        for _ in 0..5 {
            let log_before = self.log().len();
            let serving_before = self.log().matches("tokenkeeper is serving").count();
            let mut child = spawn_daemon_env(
                &self.config_path,
                &self.log_path(),
                &self.rust_log,
                &[],
                &self.daemon_env,
            );
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    let log = self.log();
                    // Only this attempt's lines: an earlier port clash must
                    // not turn a later real start-up failure into a retry.
                    if log[log_before.min(log.len())..].contains("cannot listen on") {
                        let old = format!("127.0.0.1:{}", self.port);
                        self.port = free_port();
                        let text = std::fs::read_to_string(&self.config_path).unwrap();
                        std::fs::write(
                            &self.config_path,
                            text.replace(&old, &format!("127.0.0.1:{}", self.port)),
                        )
                        .unwrap();
                        break;
                    }
                    panic!("daemon exited during start-up with {status}:\n{log}");
                }
                // Healthy, and it is ours (not another test's daemon that
                // happens to hold the port).
                let ours = self.log().matches("tokenkeeper is serving").count() > serving_before;
                if ours {
                    wait_healthy(&self.http, &self.url("/healthz"), &mut child).await;
                    self.daemon = Some(child);
                    self.starts += 1;
                    return;
                }
                assert!(Instant::now() < deadline, "daemon did not become healthy");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        panic!("no free port after 5 attempts");
    }

    /// SIGTERM and wait for exit; returns the exit status code.
    pub async fn stop(&mut self) -> Option<i32> {
        let mut child = self.daemon.take()?;
        signal(&child, libc::SIGTERM);
        let status = wait_exit(&mut child, Duration::from_secs(40)).await;
        status
    }

    /// SIGKILL: no chance to clean up.
    pub async fn kill9(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            signal(&child, libc::SIGKILL);
            let _ = wait_exit(&mut child, Duration::from_secs(10)).await;
        }
    }

    /// Runs the CLI against this daemon's config (async: the simulator
    /// lives on this test's runtime and must keep answering meanwhile).
    pub async fn cli(&self, args: &[&str]) -> Output {
        tokio::process::Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(&self.config_path)
            .env_remove("RUST_LOG")
            .output()
            .await
            .expect("run tokenkeeper")
    }

    /// Runs the whole browser flow (connect → simulator consent → callback)
    /// and returns the callback response.
    pub async fn authorize(&self, provider: &str, account: &str) -> reqwest::Response {
        let (location, cookie) = self.start_connect(provider, account).await;
        let callback = self.approve(&location).await;
        self.http
            .get(callback)
            .header(COOKIE, cookie)
            .send()
            .await
            .expect("callback answers")
    }

    /// `GET /connect/...`: returns the provider URL and the flow cookie.
    pub async fn start_connect(&self, provider: &str, account: &str) -> (String, String) {
        let mut req = self
            .http
            .get(self.url(&format!("/connect/{provider}?account={account}")));
        if let Some(session) = &self.session {
            req = req.header(COOKIE, session);
        }
        let r = req.send().await.expect("connect answers");
        assert_eq!(r.status(), 302, "connect must redirect");
        let location = r.headers()[LOCATION].to_str().unwrap().to_string();
        let cookie = cookie(&r);
        (location, cookie)
    }

    /// Logs a browser in with a one-time link obtained with `key` (API keys
    /// set): later `start_connect`/`authorize` calls send its cookie.
    pub async fn login(&mut self, key: &str) {
        let link = self.login_link(key).await;
        let r = self.http.get(&link).send().await.expect("login answers");
        assert_eq!(r.status(), 303, "the login link redirects");
        self.session = Some(cookie(&r));
    }

    /// A one-time login link to `/`, obtained with the API key `key`.
    pub async fn login_link(&self, key: &str) -> String {
        let r = self
            .http
            .post(self.url("/v1/login-links"))
            .bearer_auth(key)
            .json(&serde_json::json!({"next": "/"}))
            .send()
            .await
            .expect("login-links answers");
        assert_eq!(r.status(), 200, "a login link with the key");
        let v: Value = r.json().await.unwrap();
        v["url"].as_str().expect("a url").to_string()
    }

    /// Points the provider's `api_base_url` at `base` (before `start`).
    pub fn use_api_base(&self, base: &str) {
        let text = std::fs::read_to_string(&self.config_path).unwrap();
        let from = format!("api_base_url = \"{}/api\"", self.sim.base_url);
        assert!(text.contains(&from));
        std::fs::write(
            &self.config_path,
            text.replace(&from, &format!("api_base_url = \"{base}\"")),
        )
        .unwrap();
    }

    /// Posts the simulator's Approve form; returns the callback URL.
    pub async fn approve(&self, authorize_url: &str) -> String {
        let query = authorize_url
            .split_once('?')
            .map(|x| x.1)
            .unwrap_or("")
            .to_string();
        let r = self
            .http
            .post(self.sim.url("/approve"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(query)
            .send()
            .await
            .expect("approve answers");
        assert_eq!(r.status(), 302, "approve must redirect");
        r.headers()[LOCATION].to_str().unwrap().to_string()
    }

    /// GET an absolute URL with one extra header.
    pub async fn get_with(
        &self,
        url: impl reqwest::IntoUrl,
        header: (&str, &str),
    ) -> reqwest::Response {
        self.http
            .get(url)
            .header(header.0, header.1)
            .send()
            .await
            .expect("daemon answers")
    }

    /// GET a daemon path with `Authorization: Bearer {credential}`.
    pub async fn get_bearer(&self, path: &str, credential: &str) -> reqwest::Response {
        self.http
            .get(self.url(path))
            .bearer_auth(credential)
            .send()
            .await
            .expect("daemon answers")
    }

    /// POST with an empty body to a daemon path.
    pub async fn post(&self, path: &str) -> reqwest::Response {
        self.http
            .post(self.url(path))
            .send()
            .await
            .expect("daemon answers")
    }

    /// DELETE a daemon path.
    pub async fn delete(&self, path: &str) -> reqwest::Response {
        self.http
            .delete(self.url(path))
            .send()
            .await
            .expect("daemon answers")
    }

    pub async fn post_json(&self, path: &str) -> (u16, Value) {
        let r = self.post(path).await;
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let r = self
            .http
            .get(self.url(path))
            .send()
            .await
            .expect("daemon answers");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// The body of `GET path` as text, whatever the status.
    pub async fn get_text(&self, path: &str) -> String {
        let r = self.http.get(self.url(path)).send().await;
        r.expect("daemon answers")
            .text()
            .await
            .expect("a text body")
    }

    /// Every access and refresh token the simulator has issued so far: what
    /// must never appear in logs, metrics, notifications or files.
    pub fn issued_tokens(&self) -> Vec<String> {
        let mut all = self.sim.sim.access_tokens_issued();
        all.extend(self.sim.sim.refresh_tokens_issued());
        all
    }

    pub async fn token(&self) -> (u16, Value) {
        self.get_json("/v1/token/keap").await
    }

    pub async fn connection(&self, account: &str) -> Value {
        let (_, v) = self.get_json("/v1/connections").await;
        v["connections"]
            .as_array()
            .and_then(|a| a.iter().find(|c| c["account"] == account).cloned())
            .unwrap_or(Value::Null)
    }

    /// Asserts that `keap/{account}` is in `state` with a `last_error`
    /// that contains `error`; returns the connection.
    pub async fn assert_connection(&self, account: &str, state: &str, error: &str) -> Value {
        let c = self.connection(account).await;
        assert_eq!(c["state"], state, "{c}");
        assert!(
            c["last_error"].as_str().is_some_and(|e| e.contains(error)),
            "{c}"
        );
        c
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn spawn_daemon(config: &Path, log: &Path, rust_log: &str, extra: &[&str]) -> Child {
    spawn_daemon_env(config, log, rust_log, extra, &[])
}

/// [`spawn_daemon`] with extra environment variables.
pub fn spawn_daemon_env(
    config: &Path,
    log: &Path,
    rust_log: &str,
    extra: &[&str],
    env: &[(String, PathBuf)],
) -> Child {
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Command::new(BIN)
        .arg("serve")
        .arg("--config")
        .arg(config)
        .args(extra)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("RUST_LOG", rust_log)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file)
        .spawn()
        .expect("spawn tokenkeeper")
}

pub async fn wait_healthy(http: &reqwest::Client, url: &str, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("daemon exited during start-up with {status}");
        }
        if let Ok(r) = http.get(url).send().await {
            if r.status().is_success() {
                return;
            }
        }
        assert!(Instant::now() < deadline, "daemon did not become healthy");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

pub fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on a pid we spawned and have not reaped yet.
    unsafe {
        libc::kill(child.id() as i32, sig);
    }
}

pub async fn wait_exit(child: &mut Child, limit: Duration) -> Option<i32> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("daemon did not exit within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The provider never saw a spent refresh token sent again, nor refused
/// one: every grant came through intact.
pub fn assert_no_reuse_or_rejection(stats: &tokenkeeper::dev::SimStats) {
    assert_eq!(
        stats.refresh_reuse, 0,
        "a spent refresh token was sent again: {stats:?}"
    );
    assert_eq!(
        stats.refresh_rejected, 0,
        "a refresh token was rejected: {stats:?}"
    );
}

/// A command exited 0; its stderr otherwise.
pub fn assert_success(out: &Output) {
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The `name=value` of the cookie `r` sets.
pub fn cookie(r: &reqwest::Response) -> String {
    let set = r.headers()[SET_COOKIE]
        .to_str()
        .expect("a Set-Cookie header");
    set.split(';').next().unwrap_or_default().to_string()
}

/// Kills the child on drop, so a failed assertion leaves no daemon behind.
pub struct KillOnDrop(pub Option<std::process::Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Writes an executable script (`text` with its `#!` line) at `path`.
pub fn write_script(path: &Path, text: impl AsRef<str>) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text.as_ref()).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Forces a refresh whose answer arrives `delay` late and, once the call is
/// out ("refresh started" committed), takes an exclusive write lock on the
/// database, as another writer holding it past the store's busy timeout
/// (10 s) would: the commit of the rotated pair fails. Returns the forced
/// request and the locking connection (roll back or drop it to release).
pub async fn forced_refresh_under_a_write_lock(
    h: &Harness,
    delay: Duration,
) -> (
    tokio::task::JoinHandle<(u16, Value)>,
    sqlx::SqliteConnection,
) {
    use sqlx::ConnectOptions;
    let sim = h.sim.sim.clone();
    sim.set_token_delay(delay, tokenkeeper::dev::DelayPhase::BeforeProcessing);
    let forced = h.spawn_post("/v1/token/keap/refresh");
    eventually(
        Duration::from_secs(5),
        "the refresh call is out",
        || async { sim.stats().refresh_calls == 1 },
    )
    .await;
    let mut lock = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(h.db_path())
        .connect()
        .await
        .unwrap();
    sqlx::query("BEGIN EXCLUSIVE")
        .execute(&mut lock)
        .await
        .unwrap();
    (forced, lock)
}

/// Replaces `h`'s config by one with a quick refresh schedule and the one
/// provider table `provider` (its `[providers.NAME]` line included).
pub fn write_config_with_provider(h: &Harness, provider: &str) {
    let text = format!(
        r#"[server]
listen = "127.0.0.1:{port}"

[storage]
path = "{db}"

[refresh]
check_interval = "1s"
jitter = "0s"
retry_initial = "1s"
retry_max = "4s"

{provider}
"#,
        port = h.port,
        db = h.db_path().display(),
    );
    std::fs::write(&h.config_path, text).unwrap();
}

/// What a herd of token requests got: how many answers had each status,
/// and how many times each access token was served.
pub struct HerdTally {
    pub statuses: std::collections::HashMap<u16, u32>,
    pub tokens: std::collections::HashMap<String, u32>,
}

/// Sends `GET url` for every url of `urls` at once (a thundering herd) and
/// tallies the answers.
pub async fn herd(http: &reqwest::Client, urls: impl IntoIterator<Item = String>) -> HerdTally {
    let mut set = tokio::task::JoinSet::new();
    for url in urls {
        let http = http.clone();
        set.spawn(async move {
            let r = http.get(url).send().await.expect("daemon answers");
            let s = r.status().as_u16();
            (s, r.json::<Value>().await.unwrap_or(Value::Null))
        });
    }
    let mut tally = HerdTally {
        statuses: Default::default(),
        tokens: Default::default(),
    };
    while let Some(res) = set.join_next().await {
        let (s, b) = res.unwrap();
        *tally.statuses.entry(s).or_default() += 1;
        if let Some(t) = b["access_token"].as_str() {
            *tally.tokens.entry(t.to_string()).or_default() += 1;
        }
    }
    tally
}

/// Polls `cond` every 50 ms until it holds or `limit` passes.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if cond().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Serves `router` on a loopback port for the rest of the test (a stand-in
/// API behind the proxy); returns its base URL.
pub async fn serve_router(router: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    format!("http://{addr}")
}
