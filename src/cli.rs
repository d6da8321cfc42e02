//! The command line (SPEC 2): `serve` runs the daemon; the other commands
//! are clients of a running daemon over its HTTP API, except
//! `check-config`, which only reads the file.
//!
//! Exit codes: 0 ok, 1 runtime failure (daemon unreachable, connection needs
//! authorization), 2 usage or config error. Errors are one sentence on
//! stderr that says what to do next.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde::Deserialize;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::config::{self, Config};
use crate::dev::{Simulator, SimulatorConfig};
use crate::http::api::DEFAULT_ACCOUNT;
use crate::http::pages::relative;
use crate::store::ConnState;

/// Keeps OAuth2 grants alive and hands fresh access tokens to local programs.
#[derive(Debug, Parser)]
#[command(name = "tokenkeeper", version, about, long_about = None)]
pub struct Cli {
    /// Config file (default: $TOKENKEEPER_CONFIG, ./tokenkeeper.toml, /etc/tokenkeeper/tokenkeeper.toml).
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Address of the running daemon for client commands, e.g. http://127.0.0.1:8787 (default: from the config's server.listen).
    #[arg(long, global = true, value_name = "URL")]
    pub url: Option<String>,
    /// API key file for client commands (default: the config's server.api_keys_file; its first key is used).
    #[arg(long, global = true, value_name = "PATH")]
    pub api_key_file: Option<PathBuf>,
    /// PEM certificate to trust for a daemon serving HTTPS (default: the
    /// config's certificate if readable, else /run/tokenkeeper/cert.pem,
    /// the public copy a `tls = "self-signed"` daemon writes under systemd).
    #[arg(long, global = true, value_name = "PATH")]
    pub ca_file: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon.
    Serve {
        /// Override server.listen, e.g. 127.0.0.1:8787.
        #[arg(long, value_name = "ADDR")]
        listen: Option<SocketAddr>,
        /// Run with no config: a throw-away database and a built-in simulated Keap-like provider named "demo".
        #[arg(long)]
        dev: bool,
        /// Lifetime of the demo provider's access tokens in --dev mode (e.g. "30s"; default 24h like Keap).
        #[arg(long, value_name = "DURATION", requires = "dev")]
        dev_token_lifetime: Option<String>,
        /// Log line format: "auto" (journal lines under systemd, else human), "human", "journal" or "json".
        #[arg(long, value_name = "FORMAT", default_value = "auto")]
        log_format: LogFormat,
    },
    /// Print the current access token alone on stdout, for $(...).
    Token {
        provider: String,
        account: Option<String>,
    },
    /// Print "Authorization: Bearer TOKEN" (or the token type the provider
    /// issued, e.g. DPoP), the header to send to the API.
    Header {
        provider: String,
        account: Option<String>,
    },
    /// One row per connection: state, expiry, last and next refresh, last error.
    Status {
        /// Machine-readable output (same fields as GET /v1/connections).
        #[arg(long)]
        json: bool,
    },
    /// Print the URL that starts the browser authorization.
    Connect {
        provider: String,
        account: Option<String>,
        /// Also open it in the default browser.
        #[arg(long)]
        open: bool,
    },
    /// Print a one-time login link to the dashboard (needed when API keys are set).
    Dashboard,
    /// Force a refresh now.
    Refresh {
        provider: String,
        account: Option<String>,
    },
    /// Revoke the grant upstream where the provider can, and forget it (if the provider fails the revocation, the grant is kept).
    Revoke {
        provider: String,
        account: Option<String>,
        /// Forget the grant here only, without revoking it at the provider (it stays valid there).
        #[arg(long)]
        local: bool,
    },
    /// Validate the config: exit 0, or print every problem with its key and line and exit 2.
    CheckConfig,
    /// Read a token on stdin and say what it is: the current access token, an older one, a refresh token (never to be sent as a bearer token), or unknown.
    Inspect,
    /// Re-seal every stored token under a new encryption key, in one transaction (stop the daemon first).
    Rekey {
        /// File with the new key: 32 random bytes, base64 (`head -c32 /dev/urandom | base64`).
        #[arg(long, value_name = "F")]
        new_key_file: PathBuf,
    },
}

/// How `serve` writes log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Auto,
    Human,
    Journal,
    Json,
}

/// Exit codes of SPEC 2.
const EXIT_RUNTIME: u8 = 1;
const EXIT_USAGE: u8 = 2;

/// A failure with its exit code and the one sentence to print (none when
/// empty: a reader that went away needs no explanation).
#[derive(Debug)]
pub struct CliError {
    pub code: u8,
    pub message: String,
}

/// Where a `tls = "self-signed"` daemon under systemd publishes its public
/// certificate (`RuntimeDirectory=tokenkeeper`, world-readable), so users
/// other than the service user can verify it.
pub const PUBLIC_CERT_PATH: &str = "/run/tokenkeeper/cert.pem";

/// The reader of our output went away (`tokenkeeper status | head -1`):
/// stop quietly, as `cat` would.
fn reader_gone() -> CliError {
    CliError {
        code: 0,
        message: String::new(),
    }
}

/// What a write to standard output carries.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Output {
    /// The token itself: if it cannot be written, the command failed.
    Essential,
    /// A report: a closed pipe just ends it.
    Report,
}

/// Writes `text` to standard output; never panics (`println!` does on a
/// broken pipe). A token that cannot be written is a failure with a
/// sentence; a report whose reader went away ends quietly.
fn out(text: &str, kind: Output) -> Result<(), CliError> {
    use std::io::Write;
    if kind == Output::Essential && stdout_was_closed() {
        return Err(runtime(
            "standard output is closed, so the token was not written; send it to a pipe, a file or a terminal",
        ));
    }
    let mut stdout = std::io::stdout().lock();
    let written = stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush());
    match written {
        Ok(()) => Ok(()),
        Err(e) if kind == Output::Report && e.kind() == std::io::ErrorKind::BrokenPipe => {
            Err(reader_gone())
        }
        Err(e) => Err(runtime(format!(
            "cannot write to standard output ({e}); {}",
            match kind {
                Output::Essential => "the token was not delivered, retry with a working output",
                Output::Report => "the output is incomplete",
            }
        ))),
    }
}

/// `writeln!`-like shorthand for [`out`].
fn outln(text: impl std::fmt::Display, kind: Output) -> Result<(), CliError> {
    out(&format!("{text}\n"), kind)
}

/// Set by the binary before anything else: standard output was closed
/// when the process started (the runtime has since put /dev/null there).
static STDOUT_CLOSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Records whether file descriptor 1 was closed at process start (the
/// binary learns it before the Rust runtime reopens it on /dev/null).
pub fn stdout_closed_at_start(closed: bool) {
    STDOUT_CLOSED.store(closed, std::sync::atomic::Ordering::Relaxed);
}

fn stdout_was_closed() -> bool {
    STDOUT_CLOSED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Writes an error sentence to stderr, ignoring a stderr that is gone
/// (`eprintln!` would panic).
fn err_line(text: impl std::fmt::Display) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{text}");
}

fn runtime(message: impl Into<String>) -> CliError {
    CliError {
        code: EXIT_RUNTIME,
        message: message.into(),
    }
}

fn usage(message: impl Into<String>) -> CliError {
    CliError {
        code: EXIT_USAGE,
        message: message.into(),
    }
}

/// Runs a parsed command line; returns the process exit code.
pub async fn run(cli: Cli) -> u8 {
    let result = match cli.command {
        Command::Serve {
            listen,
            dev,
            ref dev_token_lifetime,
            log_format,
        } => {
            init_logging(log_format);
            serve(
                cli.config.as_deref(),
                listen,
                dev,
                dev_token_lifetime.as_deref(),
            )
            .await
        }
        Command::CheckConfig => check_config(cli.config.as_deref()),
        Command::Rekey { ref new_key_file } => rekey(cli.config.as_deref(), new_key_file).await,
        ref other => client(&cli, other).await,
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            if !e.message.is_empty() {
                err_line(format_args!("tokenkeeper: {}", e.message));
            }
            e.code
        }
    }
}

fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let format = match format {
        LogFormat::Auto if crate::systemd::under_journal() => LogFormat::Journal,
        LogFormat::Auto => LogFormat::Human,
        other => other,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Journal => {
            let inner = tracing_subscriber::fmt::format()
                .without_time()
                .with_level(false)
                .with_ansi(false);
            builder
                .with_ansi(false)
                .event_format(crate::systemd::JournalFormat::new(inner))
                .try_init()
        }
        LogFormat::Auto | LogFormat::Human => {
            let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
            builder.with_ansi(colour).try_init()
        }
    };
}

fn load_config(explicit: Option<&Path>) -> Result<(PathBuf, Config), CliError> {
    let Some(path) = config::locate(explicit) else {
        return Err(usage(format!(
            "no config file found (looked at $TOKENKEEPER_CONFIG, ./tokenkeeper.toml, {}); pass --config PATH, or try `tokenkeeper serve --dev`",
            config::SYSTEM_CONFIG_PATH
        )));
    };
    match config::load(&path) {
        Ok(c) => Ok((path, c)),
        Err(e) => Err(usage(format!(
            "the config has problems; fix them and retry:\n{e}"
        ))),
    }
}

fn check_config(explicit: Option<&Path>) -> Result<(), CliError> {
    let (path, cfg) = load_config(explicit)?;
    for w in &cfg.warnings {
        err_line(format_args!("warning: {w}"));
    }
    outln(
        format_args!(
            "{}: ok ({} provider{})",
            path.display(),
            cfg.providers.len(),
            if cfg.providers.len() == 1 { "" } else { "s" }
        ),
        Output::Report,
    )
}

async fn shutdown_signal(token: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    token.cancel();
}

async fn serve(
    explicit: Option<&Path>,
    listen: Option<SocketAddr>,
    dev: bool,
    dev_lifetime: Option<&str>,
) -> Result<(), CliError> {
    let (mut cfg, config_path, extra, dev_dir) = if dev {
        let lifetime = match dev_lifetime {
            Some(s) => config::parse_duration(s)
                .map_err(|e| usage(format!("--dev-token-lifetime: {e}")))?,
            None => Duration::from_secs(86400),
        };
        let addr = listen.unwrap_or_else(|| config::DEFAULT_LISTEN.parse().expect("valid default"));
        let dir = std::env::temp_dir().join(format!("tokenkeeper-dev-{}", std::process::id()));
        let secret = format!("{:032x}", rand::random::<u128>());
        let sim = Simulator::new(SimulatorConfig {
            client_secret: secret.clone(),
            access_lifetime: lifetime,
            // Dev mode shows Keap's limits and x-keap-* headers through
            // /proxy/demo/... (the demo provider's preset has the same).
            limits: Some(crate::dev::SimLimits::KEAP),
            ..SimulatorConfig::default()
        });
        let router = axum::Router::new().nest("/dev-provider", sim.router());
        (
            crate::dev::config(addr, dir.join("tokenkeeper.db"), &secret),
            None,
            Some(router),
            Some(dir),
        )
    } else {
        let (path, c) = load_config(explicit)?;
        (c, Some(path), None, None)
    };
    if let Some(l) = listen {
        cfg.server.listen = l;
    }
    let inherited = crate::systemd::inherited_listener().map_err(|e| {
        runtime(format!(
            "cannot use the socket passed by systemd ({e}); check tokenkeeper.socket"
        ))
    })?;
    let listener = match inherited {
        Some(std_listener) => {
            tracing::info!("using the listening socket passed by systemd (socket activation)");
            tokio::net::TcpListener::from_std(std_listener)
                .map_err(|e| runtime(format!("cannot use the inherited socket ({e})")))?
        }
        None => tokio::net::TcpListener::bind(cfg.server.listen)
            .await
            .map_err(|e| {
                runtime(format!(
                    "cannot listen on {} ({e}); pick another address with --listen",
                    cfg.server.listen
                ))
            })?,
    };
    let bound = listener.local_addr().map_err(|e| runtime(e.to_string()))?;
    if dev {
        let url = cfg.public_url(bound);
        // A closed or broken stdout must not stop the daemon.
        let _ = outln(
            format_args!(
                "tokenkeeper dev mode: open {url} and click Connect; then: curl {}/v1/token/demo",
                url.as_str().trim_end_matches('/')
            ),
            Output::Report,
        );
    }
    let shutdown = CancellationToken::new();
    tokio::spawn(shutdown_signal(shutdown.clone()));
    let result = crate::daemon::run(crate::daemon::RunOptions {
        config: cfg,
        config_path,
        listener,
        shutdown,
        extra,
    })
    .await;
    if let Some(dir) = dev_dir {
        let _ = std::fs::remove_dir_all(dir);
    }
    result.map_err(|e| match e {
        // A configuration problem found only by asking the issuer.
        crate::daemon::DaemonError::Discovery(_) => usage(format!("{e}")),
        e => runtime(format!("{e}")),
    })
}

/// How a client command reaches the daemon.
struct Target {
    base: String,
    api_key: Option<String>,
    /// The certificate to trust, when the daemon serves HTTPS.
    ca_cert: Option<PathBuf>,
    /// Whether `ca_cert` was named by `--ca-file` (then it must be usable).
    ca_explicit: bool,
}

/// Where the daemon is: `--url`, else the config's `server.listen` (read
/// leniently: a client needs no secrets), else the default.
fn target(cli: &Cli) -> Target {
    let config_path = config::locate(cli.config.as_deref());
    let table = config_path
        .as_ref()
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|text| text.parse::<toml::Table>().ok())
        .unwrap_or_default();
    let relative = |v: &str| -> PathBuf {
        let p = PathBuf::from(v);
        match config_path.as_ref().and_then(|c| c.parent()) {
            Some(dir) if p.is_relative() => dir.join(p),
            _ => p,
        }
    };
    let server = table.get("server").and_then(|s| s.as_table());
    let get = |k: &str| server.and_then(|s| s.get(k)).and_then(|v| v.as_str());
    let tls = server.is_some_and(|s| s.get("tls").is_some());
    let base = match &cli.url {
        Some(u) => u.trim_end_matches('/').to_string(),
        None => format!(
            "{}://{}",
            if tls { "https" } else { "http" },
            get("listen").unwrap_or(config::DEFAULT_LISTEN)
        ),
    };
    let key_file = cli
        .api_key_file
        .clone()
        .or_else(|| get("api_keys_file").map(relative));
    let api_key = key_file
        .and_then(|f| std::fs::read_to_string(f).ok())
        .and_then(|t| {
            t.lines()
                .map(str::trim)
                .find(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_string)
        });
    let db = table
        .get("storage")
        .and_then(|s| s.get("path"))
        .and_then(|v| v.as_str())
        .map(relative)
        .unwrap_or_else(config::default_db_path);
    let configured = match server.and_then(|s| s.get("tls")) {
        Some(toml::Value::String(s)) if s == "self-signed" => db
            .parent()
            .map(|d| crate::http::tls::self_signed_paths(d).0),
        Some(toml::Value::Table(t)) => t.get("cert_file").and_then(|v| v.as_str()).map(relative),
        _ => None,
    };
    // The state directory is private to the service user; everyone else
    // finds the daemon's public copy (or names one with --ca-file).
    let readable = |p: &PathBuf| std::fs::File::open(p).is_ok();
    let ca_cert = match &cli.ca_file {
        Some(p) => Some(p.clone()),
        None => configured
            .filter(readable)
            .or_else(|| Some(PathBuf::from(PUBLIC_CERT_PATH)).filter(readable)),
    };
    Target {
        base,
        api_key,
        ca_cert,
        ca_explicit: cli.ca_file.is_some(),
    }
}

/// `base` plus `segments`, each percent-encoded as one path segment: a
/// name can never add a segment or climb out of the API (`a/../b`).
fn endpoint(base: &str, segments: &[&str]) -> Result<url::Url, CliError> {
    let mut url = url::Url::parse(base).map_err(|e| {
        usage(format!(
            "the daemon address {base:?} is not a valid URL ({e}); pass --url like http://127.0.0.1:8787"
        ))
    })?;
    url.path_segments_mut()
        .map_err(|()| {
            usage(format!(
                "the daemon address {base:?} cannot have a path; pass --url like http://127.0.0.1:8787"
            ))
        })?
        .pop_if_empty()
        .extend(segments);
    Ok(url)
}

/// Checks provider and account names by the server's rule (SPEC 1), so a
/// typo is refused here and never reaches the daemon.
fn names(provider: &str, account: &Option<String>) -> Result<(String, String), CliError> {
    if !config::valid_name(provider) {
        return Err(usage(format!(
            "{provider:?} is not a valid provider name (lowercase letters, digits, '-' and '_', at most 63, starting with a letter or digit); use a name from the config's [providers.NAME]"
        )));
    }
    let account = account
        .clone()
        .unwrap_or_else(|| DEFAULT_ACCOUNT.to_string());
    if !config::valid_account(&account) {
        return Err(usage(format!(
            "{account:?} is not a valid account name (lowercase letters, digits, '-' and '_', at most 63, starting with a letter or digit, not \"refresh\"); see `tokenkeeper status` for the accounts there are"
        )));
    }
    Ok((provider.to_string(), account))
}

async fn client(cli: &Cli, command: &Command) -> Result<(), CliError> {
    // Names first: a bad one is a usage error whatever the daemon's state.
    let checked = match command {
        Command::Token { provider, account }
        | Command::Header { provider, account }
        | Command::Refresh { provider, account }
        | Command::Revoke {
            provider, account, ..
        }
        | Command::Connect {
            provider, account, ..
        } => Some(names(provider, account)?),
        _ => None,
    };
    let target = target(cli);
    let base = target.base.clone();
    let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(120));
    if let Some(key) = &target.api_key {
        let mut headers = reqwest::header::HeaderMap::new();
        let value = reqwest::header::HeaderValue::from_str(&format!("Bearer {key}"))
            .map_err(|_| usage("the API key file holds characters that cannot go in a header"))?;
        headers.insert(reqwest::header::AUTHORIZATION, value);
        builder = builder.default_headers(headers);
    }
    if let Some(path) = &target.ca_cert {
        match std::fs::read(path) {
            Ok(pem) => {
                let cert = reqwest::Certificate::from_pem(&pem).map_err(|e| {
                    usage(format!(
                        "{} is not a usable PEM certificate ({e}); point --ca-file at the daemon's public certificate",
                        path.display()
                    ))
                })?;
                builder = builder.add_root_certificate(cert);
            }
            Err(e) if target.ca_explicit => {
                return Err(usage(format!(
                    "cannot read --ca-file {} ({e}); point it at the daemon's public certificate",
                    path.display()
                )))
            }
            Err(_) => {}
        }
    }
    let http = builder.build().map_err(|e| runtime(e.to_string()))?;
    let (provider, account) = checked.unwrap_or_default();
    let (p, a) = (provider.as_str(), account.as_str());
    match command {
        Command::Token { .. } | Command::Header { .. } => {
            let url = endpoint(&base, &["v1", "token", p, a])?;
            let v = call(&http, reqwest::Method::GET, url, &base, None).await?;
            let token = v
                .get("access_token")
                .and_then(Value::as_str)
                .ok_or_else(|| runtime("the daemon answered without a token"))?;
            if matches!(command, Command::Header { .. }) {
                // The scheme the provider issued the token for ("Bearer",
                // "DPoP", ...), as /v1/token says.
                let scheme = v
                    .get("token_type")
                    .and_then(Value::as_str)
                    .filter(|t| !t.is_empty())
                    .unwrap_or("Bearer");
                outln(
                    format_args!("Authorization: {scheme} {token}"),
                    Output::Essential,
                )?;
            } else {
                outln(token, Output::Essential)?;
            }
        }
        Command::Refresh { .. } => {
            let url = endpoint(&base, &["v1", "token", p, a, "refresh"])?;
            let v = call(&http, reqwest::Method::POST, url, &base, None).await?;
            let exp = v.get("expires_at").and_then(Value::as_str).unwrap_or("?");
            outln(
                format_args!("refreshed {p}/{a}: new access token expires at {exp}"),
                Output::Report,
            )?;
        }
        Command::Revoke { local, .. } => {
            let mut url = endpoint(&base, &["v1", "connections", p, a])?;
            if *local {
                url.query_pairs_mut().append_pair("local", "true");
            }
            call(&http, reqwest::Method::DELETE, url, &base, None).await?;
            if *local {
                outln(
                    format_args!(
                        "forgot {p}/{a} here; it was not revoked at the provider and stays valid there"
                    ),
                    Output::Report,
                )?;
            } else {
                outln(format_args!("revoked and forgot {p}/{a}"), Output::Report)?;
            }
        }
        Command::Status { json } => {
            let url = endpoint(&base, &["v1", "connections"])?;
            let v = call(&http, reqwest::Method::GET, url, &base, None).await?;
            let conns = v
                .get("connections")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            if *json {
                outln(
                    serde_json::to_string_pretty(&v).unwrap_or_default(),
                    Output::Report,
                )?;
            } else {
                print_status(&conns)?;
                if let Some(fp) = v.get("tls_fingerprint").and_then(Value::as_str) {
                    outln(
                        format_args!("\nHTTPS certificate SHA-256: {fp}"),
                        Output::Report,
                    )?;
                }
            }
            if conns
                .iter()
                .any(|c| conn_state(c) == Some(ConnState::AuthorizationRequired))
            {
                return Err(runtime("some connections need a new authorization; run `tokenkeeper connect PROVIDER ACCOUNT`"));
            }
        }
        Command::Connect { open, .. } => {
            let mut url = endpoint(&base, &["connect", p])?;
            url.query_pairs_mut().append_pair("account", a);
            // Behind API keys a browser needs a one-time login link.
            let url = match &target.api_key {
                Some(_) => {
                    let next = format!("{}?{}", url.path(), url.query().unwrap_or_default());
                    login_link(&http, &base, &next).await?
                }
                None => url.to_string(),
            };
            outln(&url, Output::Report)?;
            if *open {
                // A login link is a secret: in xdg-open's argv any local
                // user could read it (/proc/*/cmdline) and spend it first.
                // The browser gets a private file that forwards to it.
                let arg = match &target.api_key {
                    Some(_) => login_redirect_file(&redirect_dir(), &url)
                        .map_err(|e| {
                            runtime(format!(
                                "cannot write the login page for the browser ({e}); open the URL above yourself"
                            ))
                        })?
                        .into_os_string(),
                    None => url.clone().into(),
                };
                let opened = std::process::Command::new("xdg-open").arg(&arg).status();
                if !opened.is_ok_and(|s| s.success()) {
                    return Err(runtime(
                        "cannot open a browser here; open the URL above yourself",
                    ));
                }
            }
        }
        Command::Dashboard => {
            let url = match &target.api_key {
                Some(_) => login_link(&http, &base, "/").await?,
                None => endpoint(&base, &[""])?.to_string(),
            };
            outln(&url, Output::Report)?;
        }
        Command::Inspect => {
            let mut token = String::new();
            std::io::Read::read_to_string(
                &mut std::io::Read::take(std::io::stdin(), 64 * 1024),
                &mut token,
            )
            .map_err(|e| usage(format!("cannot read the token from stdin ({e})")))?;
            let token = token.trim();
            if token.is_empty() {
                return Err(usage(
                    "give the token on stdin, e.g. `tokenkeeper inspect < token.txt`",
                ));
            }
            let url = endpoint(&base, &["v1", "inspect"])?;
            let v = call(
                &http,
                reqwest::Method::POST,
                url,
                &base,
                Some(token.to_string()),
            )
            .await?;
            outln(
                v.get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown"),
                Output::Report,
            )?;
        }
        Command::Serve { .. } | Command::CheckConfig | Command::Rekey { .. } => {
            unreachable!("handled in run")
        }
    }
    Ok(())
}

/// A one-time login link to `path` from the daemon (`POST /v1/login-links`,
/// with the API key).
async fn login_link(http: &reqwest::Client, base: &str, path: &str) -> Result<String, CliError> {
    let v = call(
        http,
        reqwest::Method::POST,
        endpoint(base, &["v1", "login-links"])?,
        base,
        Some(serde_json::json!({ "next": path }).to_string()),
    )
    .await?;
    v.get("url")
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| runtime("the daemon answered without a login link"))
}

/// Calls the daemon and turns its JSON errors into one-sentence CLI errors.
async fn call(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: url::Url,
    base: &str,
    body: Option<String>,
) -> Result<Value, CliError> {
    let mut req = http.request(method, url);
    if let Some(b) = body {
        let json = b.starts_with('{');
        req = req.body(b);
        if json {
            req = req.header(reqwest::header::CONTENT_TYPE, "application/json");
        }
    }
    let resp = req.send().await.map_err(|e| match certificate_problem(&e) {
        Some(detail) => runtime(format!(
            "the daemon at {base} answers, but its HTTPS certificate cannot be verified ({detail}); pass --ca-file with the daemon's public certificate ({PUBLIC_CERT_PATH} under systemd, or tls-cert.pem in its state directory)"
        )),
        None => runtime(format!(
            "cannot reach the tokenkeeper daemon at {base}; start it with `tokenkeeper serve` or point --url at it"
        )),
    })?;
    let status = resp.status();
    if status == reqwest::StatusCode::NO_CONTENT {
        return Ok(Value::Null);
    }
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    if status.is_success() {
        return Ok(body);
    }
    let message = body
        .get("message")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| format!("the daemon answered HTTP {status}"));
    let code = match body.get("error").and_then(Value::as_str) {
        Some("unknown_provider") | Some("invalid_request") => EXIT_USAGE,
        _ => EXIT_RUNTIME,
    };
    Err(CliError { code, message })
}

/// The TLS verification failure behind `e`, if that is what it is: the
/// daemon runs, and saying it does not would send the operator looking in
/// the wrong place.
fn certificate_problem(e: &reqwest::Error) -> Option<String> {
    let mut source: Option<&dyn std::error::Error> = Some(e);
    while let Some(err) = source {
        let text = err.to_string();
        if text.contains("certificate") {
            return Some(text);
        }
        source = err.source();
    }
    None
}

/// `left/limit today`, or `used today` without a known limit; `paused`
/// while the provider's 429 pause lasts.
fn quota_cell(q: Option<&Value>) -> String {
    let Some(q) = q.filter(|q| q.is_object()) else {
        return "-".into();
    };
    let n = |k: &str| q.get(k).and_then(Value::as_u64);
    let mut s = match (n("daily_available"), n("daily_limit")) {
        (Some(a), Some(l)) => format!("{a}/{l} left today"),
        _ => format!("{} used today", n("daily_used").unwrap_or(0)),
    };
    if q.get("paused_until").is_some_and(|v| !v.is_null()) {
        s.push_str(" (paused after 429)");
    }
    s
}

/// The `state` of one connection in `/v1/connections`; `None` when it is
/// missing or a name this build does not know (a newer daemon).
fn conn_state(c: &Value) -> Option<ConnState> {
    c.get("state").and_then(|s| ConnState::deserialize(s).ok())
}

fn print_status(conns: &[Value]) -> Result<(), CliError> {
    if conns.is_empty() {
        return outln(
            "no connections yet; run `tokenkeeper connect PROVIDER` and open the URL it prints",
            Output::Report,
        );
    }
    let now = chrono::Utc::now();
    let when = |c: &Value, k: &str| -> String {
        c.get(k)
            .and_then(Value::as_str)
            .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
            .map(|t| relative(t.with_timezone(&chrono::Utc), now))
            .unwrap_or_else(|| "-".into())
    };
    let mut rows = vec![[
        "PROVIDER".to_string(),
        "ACCOUNT".into(),
        "STATE".into(),
        "EXPIRES".into(),
        "LAST REFRESH".into(),
        "NEXT REFRESH".into(),
        "QUOTA".into(),
        "LAST ERROR".into(),
    ]];
    for c in conns {
        let s = |k: &str| c.get(k).and_then(Value::as_str).unwrap_or("-").to_string();
        rows.push([
            s("provider"),
            s("account"),
            s("state"),
            when(c, "expires_at"),
            when(c, "refreshed_at"),
            when(c, "next_refresh_at"),
            quota_cell(c.get("quota")),
            c.get("last_error")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
        ]);
    }
    let states: Vec<Option<ConnState>> = conns.iter().map(conn_state).collect();
    let widths: Vec<usize> = (0..8)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    use std::io::IsTerminal;
    let colour = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    for (n, r) in rows.iter().enumerate() {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, c)| {
                // Pad first: escape codes must not count towards the width.
                let cell = format!("{c:<w$}", w = widths[i]);
                match states.get(n.wrapping_sub(1)) {
                    Some(Some(state)) if colour && i == 2 && n > 0 => state_colour(*state, &cell),
                    _ => cell,
                }
            })
            .collect();
        outln(line.join("  ").trim_end(), Output::Report)?;
    }
    Ok(())
}

/// ANSI colour of a state cell: green active, blue refreshing, yellow
/// retrying, red authorization_required.
fn state_colour(state: ConnState, cell: &str) -> String {
    let code = match state {
        ConnState::Active => "32",
        ConnState::Refreshing => "34",
        ConnState::Retrying => "33",
        ConnState::AuthorizationRequired => "31",
    };
    format!("\x1b[{code}m{cell}\x1b[0m")
}

async fn rekey(explicit: Option<&Path>, new_key_file: &Path) -> Result<(), CliError> {
    let (_, cfg) = load_config(explicit)?;
    let new_key =
        crate::crypto::SealKey::from_file(new_key_file).map_err(|e| usage(e.to_string()))?;
    let old_key = match &cfg.storage.encryption_key_file {
        Some(p) => Some(crate::crypto::SealKey::from_file(p).map_err(|e| usage(e.to_string()))?),
        None => None,
    };
    // Refused while a daemon holds the database: its next commit would be
    // sealed under the old key after this one re-sealed everything.
    let _lock =
        crate::store::DbLock::exclusive(&cfg.storage.path).map_err(|e| runtime(e.to_string()))?;
    let store = crate::store::Store::open(&cfg.storage.path, old_key)
        .await
        .map_err(|e| runtime(e.to_string()))?;
    let n = store
        .rekey(&new_key)
        .await
        .map_err(|e| runtime(e.to_string()))?;
    store.close().await;
    outln(
        format_args!(
            "re-sealed {n} connection{} under {}; now set storage.encryption_key_file to it and restart the daemon",
            if n == 1 { "" } else { "s" },
            new_key_file.display()
        ),
        Output::Report,
    )
}

/// Where `connect --open` writes its login page: the per-user runtime
/// directory (private, emptied at logout) when there is one.
fn redirect_dir() -> PathBuf {
    std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|d| d.is_absolute() && d.is_dir())
        .unwrap_or_else(std::env::temp_dir)
}

/// Writes a new owner-only (0600) HTML file in `dir` that sends a browser
/// on to `url` (meta refresh, and a link should that be blocked) and
/// returns its path: what `connect --open` hands to the browser instead of
/// the one-time login link itself, so the link never appears in a command
/// line. The file is left behind (the browser reads it after we exit); the
/// link in it is spent on first use and expires within minutes.
pub fn login_redirect_file(dir: &Path, url: &str) -> std::io::Result<PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let escaped = url
        .replace('&', "&amp;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
        .replace('<', "&lt;")
        .replace('>', "&gt;");
    let html = format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\">\n\
         <meta name=\"referrer\" content=\"no-referrer\">\n\
         <meta http-equiv=\"refresh\" content=\"0;url={escaped}\">\n\
         <title>tokenkeeper login</title></head>\n\
         <body><p><a href=\"{escaped}\">Continue to tokenkeeper</a></p></body></html>\n"
    );
    let suffix: [u8; 16] = rand::random();
    let name: String = suffix.iter().map(|b| format!("{b:02x}")).collect();
    let path = dir.join(format!("tokenkeeper-login-{name}.html"));
    // create_new: never follow or reuse a file someone placed there.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    f.write_all(html.as_bytes())?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_redirect_file_is_private_and_forwards() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let url = "http://127.0.0.1:8080/login?token=abc&x=\"<y>'";
        let path = login_redirect_file(dir.path(), url).unwrap();
        assert!(path.starts_with(dir.path()));
        assert!(
            !path.to_string_lossy().contains("abc"),
            "no secret in the path"
        );
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "owner-only: {mode:o}");
        let html = std::fs::read_to_string(&path).unwrap();
        let escaped = "http://127.0.0.1:8080/login?token=abc&amp;x=&quot;&lt;y&gt;&#39;";
        assert!(
            html.contains(&format!(
                "<meta http-equiv=\"refresh\" content=\"0;url={escaped}\">"
            )),
            "{html}"
        );
        assert!(html.contains(&format!("<a href=\"{escaped}\">")), "{html}");
        assert!(!html.contains("\"<y>"), "the URL is escaped: {html}");
        // A second call makes a new file, never reusing one.
        let again = login_redirect_file(dir.path(), url).unwrap();
        assert_ne!(path, again);
    }
}
