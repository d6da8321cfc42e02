//! The command line (SPEC 2): `serve` runs the daemon; the other commands
//! are clients of a running daemon over its HTTP API, except
//! `check-config`, which only reads the file, and `genkey`, which needs
//! neither config nor daemon.
//!
//! Clients read the daemon's answers through the types the server writes
//! ([`crate::http::answers`]) and the config through the daemon's own
//! reader in its client mode ([`config::load_for_client`]).
//!
//! Exit codes: 0 ok, 1 runtime failure (daemon unreachable, connection needs
//! authorization), 2 usage or config error. Errors are one sentence on
//! stderr that says what to do next.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::{self, Config};
use crate::dev::{Simulator, SimulatorConfig};
use crate::http::answers::{
    rfc3339_secs, ConnectionJson, ConnectionsBody, DeviceFlowBody, ErrorBody, EventJson,
    EventsBody, ImportBody, InspectBody, LinkBody, PasteFinishBody, PasteStartBody, TokenBody,
};
use crate::http::api::DEFAULT_ACCOUNT;
use crate::http::pages::relative;
use crate::ratelimit::ConnectionQuota;
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
        /// Headless: open the printed URL in a browser on any machine, approve, then paste here the address the browser ended on (even if that page did not load).
        #[arg(long, conflicts_with = "open")]
        paste: bool,
        /// Device code (RFC 8628), for providers with a device endpoint: prints where to go and the code to enter on any device, then waits while the daemon polls. Ctrl-C cancels.
        #[arg(long, conflicts_with_all = ["open", "paste"])]
        device: bool,
    },
    /// Adopt a grant another program holds: its refresh token is redeemed once at once (so that program's copy stops working) and the grant stored.
    Import {
        provider: String,
        account: Option<String>,
        /// File holding the refresh token alone ("-": standard input). Never give the token as an argument.
        #[arg(long, value_name = "F")]
        refresh_token_file: PathBuf,
        /// Replace a connection that has a working grant (that grant is then revoked).
        #[arg(long)]
        replace: bool,
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
    /// Show a connection's history (SPEC 13), oldest first: authorizations, refreshes with their duration, failures with their reason, rotations, revocations. Never a token.
    Log {
        provider: String,
        account: Option<String>,
        /// Keep printing new events as they happen (polls every second; Ctrl-C ends).
        #[arg(long)]
        follow: bool,
        /// One JSON object per line (the fields of GET /v1/connections/{provider}/{account}/events).
        #[arg(long)]
        json: bool,
        /// How many of the latest events to show first (1 to 1000).
        #[arg(long, default_value_t = crate::history::DEFAULT_LIMIT, value_parser = clap::value_parser!(u32).range(1..=i64::from(crate::history::MAX_LIMIT)))]
        limit: u32,
    },
    /// Validate the config: exit 0, or print every problem with its key and line and exit 2.
    CheckConfig,
    /// Read a token on stdin and say what it is: the current access token, an older one, a refresh token (never to be sent as a bearer token), or unknown.
    Inspect,
    /// Re-seal every stored token under a new encryption key, in one transaction (stop the daemon first).
    Rekey {
        /// File with the new key: 32 random bytes, base64 (make one with `tokenkeeper genkey F`).
        #[arg(long, value_name = "F")]
        new_key_file: PathBuf,
    },
    /// Generate a new encryption key (32 random bytes from the OS, base64) for storage.encryption_key_file; needs no config and no daemon.
    ///
    /// With FILE, the key goes into a new file created with mode 0600; an
    /// existing file or a symbolic link is refused, never replaced. Without
    /// FILE (or with "-") it is printed on standard output, e.g. to seal it
    /// as a systemd credential:
    /// `tokenkeeper genkey | systemd-creds encrypt --name=db-key - /etc/credstore.encrypted/db-key`.
    Genkey {
        /// The new key file ("-" or none: standard output).
        #[arg(value_name = "FILE")]
        file: Option<PathBuf>,
    },
    /// Make a backup now (the backup section of the config): the running daemon makes it, or, when none runs, this command on the database file.
    Backup,
    /// Put a backup back in place of the database (stop the daemon first); the file is checked before anything is replaced, and the previous database is kept aside.
    Restore {
        /// The backup file (tokenkeeper-*.db); its checksum file beside it is checked when present.
        file: PathBuf,
    },
    /// Copy every grant, fingerprint, pending authorization and setting from the configured store to another (an SQLite file or a postgres:// URL), in one transaction, and verify the copy (stop the daemon first).
    MigrateStorage {
        /// The target: a postgres://USER@HOST:PORT/DATABASE URL, or the path of an SQLite file.
        #[arg(long, value_name = "URL")]
        to: String,
        /// Overwrite a target that already holds connections.
        #[arg(long)]
        replace: bool,
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
        Command::MigrateStorage { ref to, replace } => {
            migrate_storage(cli.config.as_deref(), to, replace).await
        }
        Command::Genkey { ref file } => genkey(file.as_deref()),
        Command::Backup => backup(&cli).await,
        Command::Restore { ref file } => restore(cli.config.as_deref(), file).await,
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
            // `/dev-provider/_sim/config` injects faults, to see a failing
            // provider on the dashboard (only the simulated one is harmed).
            control_api: true,
            ..SimulatorConfig::default()
        });
        // Its device verification page is named from the issuer.
        sim.set_issuer(Some(format!("http://{addr}/dev-provider")));
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
    /// Where a browser reaches the daemon: `server.public_url` when the
    /// config sets it, else `base`.
    browser_base: String,
    api_key: Option<String>,
    /// The certificate to trust, when the daemon serves HTTPS.
    ca_cert: Option<PathBuf>,
    /// Whether `ca_cert` was named by `--ca-file` (then it must be usable).
    ca_explicit: bool,
    /// Providers of the config that nobody authorizes (client credentials),
    /// with the sentence that says so.
    unauthorizable: std::collections::HashMap<String, String>,
}

/// Where the daemon is and how to trust it: `--url`, else the config's
/// `server.listen` (the config read as a client reads it,
/// [`config::load_for_client`]: no secret is needed), else the default.
fn target(cli: &Cli) -> Result<Target, CliError> {
    // What the command line gives needs no config.
    let mut unused = Vec::new();
    if cli.url.is_some() {
        unused.push("server.listen");
    }
    if cli.api_key_file.is_some() {
        unused.push("server.api_keys_file");
    }
    let named = cli.config.is_some()
        || std::env::var_os("TOKENKEEPER_CONFIG").is_some_and(|v| !v.is_empty());
    let cfg = match config::locate(cli.config.as_deref()) {
        Some(path) => match config::load_for_client(&path, &unused) {
            Ok(c) => Some(c),
            // A system config this user may not read: the defaults, and
            // --url, still find a daemon; a file the user named must be read.
            Err(e) if !named && e.problems.iter().all(|p| p.key == "(file)") => None,
            Err(e) => {
                return Err(usage(format!(
                    "the config has problems in what client commands read; fix them and retry:\n{e}"
                )))
            }
        },
        None => None,
    };
    let server = cfg.as_ref().map(|c| &c.server);
    let tls = server.map_or(&config::TlsConfig::Off, |s| &s.tls);
    let base = match &cli.url {
        Some(u) => u.trim_end_matches('/').to_string(),
        None => format!(
            "{}://{}",
            if *tls == config::TlsConfig::Off {
                "http"
            } else {
                "https"
            },
            server.map_or_else(
                || config::DEFAULT_LISTEN.to_string(),
                |s| s.listen.to_string()
            )
        ),
    };
    let browser_base = server.and_then(|s| s.public_url.as_ref()).map_or_else(
        || base.clone(),
        |u| u.as_str().trim_end_matches('/').to_string(),
    );
    let key_file = cli
        .api_key_file
        .clone()
        .or_else(|| server.and_then(|s| s.api_keys_file.clone()));
    let api_key = key_file
        .and_then(|f| std::fs::read_to_string(f).ok())
        .and_then(|t| {
            t.lines()
                .map(str::trim)
                .find(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_string)
        });
    let configured = match (tls, &cfg) {
        (config::TlsConfig::SelfSigned, Some(c)) => c
            .storage
            .path
            .parent()
            .map(|d| crate::http::tls::self_signed_paths(d).0),
        (config::TlsConfig::Files { cert_file, .. }, _) => Some(cert_file.clone()),
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
    Ok(Target {
        base,
        browser_base,
        api_key,
        ca_cert,
        ca_explicit: cli.ca_file.is_some(),
        unauthorizable: cfg
            .iter()
            .flat_map(|c| c.providers.values())
            .filter_map(|p| Some((p.name.clone(), p.authorization_refusal()?)))
            .collect(),
    })
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
        }
        | Command::Import {
            provider, account, ..
        }
        | Command::Log {
            provider, account, ..
        } => Some(names(provider, account)?),
        _ => None,
    };
    let target = target(cli)?;
    let daemon = Daemon::new(&target)?;
    let (provider, account) = checked.unwrap_or_default();
    let (p, a) = (provider.as_str(), account.as_str());
    if matches!(command, Command::Connect { .. } | Command::Import { .. }) {
        if let Some(why) = target.unauthorizable.get(p) {
            return Err(usage(why.clone()));
        }
    }
    match command {
        Command::Token { .. } | Command::Header { .. } => {
            let t: TokenBody = daemon
                .call(reqwest::Method::GET, &["v1", "token", p, a], None)
                .await?;
            if matches!(command, Command::Header { .. }) {
                // The scheme the provider issued the token for ("Bearer",
                // "DPoP", ...), as /v1/token says.
                let scheme = Some(t.token_type.as_str())
                    .filter(|t| !t.is_empty())
                    .unwrap_or("Bearer");
                outln(
                    format_args!("Authorization: {scheme} {}", t.access_token),
                    Output::Essential,
                )?;
            } else {
                outln(&t.access_token, Output::Essential)?;
            }
        }
        Command::Refresh { .. } => {
            let t: TokenBody = daemon
                .call(
                    reqwest::Method::POST,
                    &["v1", "token", p, a, "refresh"],
                    None,
                )
                .await?;
            outln(
                format_args!(
                    "refreshed {p}/{a}: new access token expires at {}",
                    rfc3339_secs::format(&t.expires_at)
                ),
                Output::Report,
            )?;
        }
        Command::Revoke { local, .. } => {
            let mut url = daemon.endpoint(&["v1", "connections", p, a])?;
            if *local {
                url.query_pairs_mut().append_pair("local", "true");
            }
            daemon.send(reqwest::Method::DELETE, url, None).await?;
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
            let body: ConnectionsBody = daemon
                .call(reqwest::Method::GET, &["v1", "connections"], None)
                .await?;
            if *json {
                outln(
                    serde_json::to_string_pretty(&body).unwrap_or_default(),
                    Output::Report,
                )?;
            } else {
                print_status(&body.connections)?;
                if let Some(fp) = &body.tls_fingerprint {
                    outln(
                        format_args!("\nHTTPS certificate SHA-256: {fp}"),
                        Output::Report,
                    )?;
                }
            }
            if body
                .connections
                .iter()
                .any(|c| c.state.known() == Some(ConnState::AuthorizationRequired))
            {
                return Err(runtime("some connections need a new authorization; run `tokenkeeper connect PROVIDER ACCOUNT`"));
            }
        }
        Command::Connect { paste: true, .. } => paste_flow(&daemon, p, a).await?,
        Command::Connect { device: true, .. } => device_flow(&daemon, p, a).await?,
        Command::Import {
            refresh_token_file,
            replace,
            ..
        } => import(&daemon, p, a, refresh_token_file, *replace).await?,
        Command::Connect { open, .. } => {
            let mut url = endpoint(&target.browser_base, &["connect", p])?;
            url.query_pairs_mut().append_pair("account", a);
            // Behind API keys a browser needs a one-time login link.
            let url = match &target.api_key {
                Some(_) => {
                    let next = format!("{}?{}", url.path(), url.query().unwrap_or_default());
                    daemon.login_link(&next).await?
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
                Some(_) => daemon.login_link("/").await?,
                None => endpoint(&target.browser_base, &[""])?.to_string(),
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
            let answer: InspectBody = daemon
                .call(
                    reqwest::Method::POST,
                    &["v1", "inspect"],
                    Some(token.to_string()),
                )
                .await?;
            outln(&answer.message, Output::Report)?;
        }
        Command::Log {
            follow,
            json,
            limit,
            ..
        } => {
            log(&daemon, (p, a), *limit, *follow, *json).await?;
        }
        Command::Serve { .. }
        | Command::CheckConfig
        | Command::Rekey { .. }
        | Command::Genkey { .. }
        | Command::Backup
        | Command::Restore { .. }
        | Command::MigrateStorage { .. } => {
            unreachable!("handled in run")
        }
    }
    Ok(())
}

/// How often `tokenkeeper log --follow` asks for new events.
const FOLLOW_EVERY: Duration = Duration::from_secs(1);

/// `tokenkeeper log`: the latest `limit` events oldest first, then, with
/// `follow`, each newer one as it appears, until Ctrl-C or the reader of
/// standard output goes away (both end it cleanly).
async fn log(
    daemon: &Daemon,
    (p, a): (&str, &str),
    limit: u32,
    follow: bool,
    json: bool,
) -> Result<(), CliError> {
    // Polls ask for the most a page holds, so that a burst between two
    // polls is shown whole.
    // Installed before the first line is printed, so that a Ctrl-C at any
    // moment of a follow ends it cleanly rather than killing it.
    let mut interrupt = if follow {
        Some(
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
                .map_err(|e| runtime(format!("cannot watch for Ctrl-C ({e})")))?,
        )
    } else {
        None
    };
    let segments = ["v1", "connections", p, a, "events"];
    let page = |after: Option<i64>| {
        let limit = if after.is_some() {
            crate::history::MAX_LIMIT
        } else {
            limit
        };
        let mut query = vec![("limit", limit.to_string())];
        if let Some(id) = after {
            query.push(("after", id.to_string()));
        }
        daemon.get_query::<EventsBody>(&segments, query)
    };
    let mut last = None;
    loop {
        let body = page(last).await?;
        // Newest first on the wire; a log reads oldest first.
        for e in body.events.iter().rev() {
            let line = if json {
                serde_json::to_string(e).unwrap_or_default()
            } else {
                event_line(e)
            };
            match outln(line, Output::Report) {
                Err(e) if e.code == 0 => return Ok(()),
                other => other?,
            }
            last = Some(e.id);
        }
        let Some(interrupt) = interrupt.as_mut() else {
            return Ok(());
        };
        tokio::select! {
            () = tokio::time::sleep(FOLLOW_EVERY) => {}
            _ = interrupt.recv() => return Ok(()),
        }
        if last.is_none() {
            last = Some(0);
        }
    }
}

/// One event as a log line: time, kind, duration, detail.
fn event_line(e: &EventJson) -> String {
    let mut line = format!(
        "{}  {}/{}  {}",
        e.at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        e.provider,
        e.account,
        e.kind
    );
    if let Some(ms) = e.duration_ms {
        line.push_str(&format!("  {ms} ms"));
    }
    if let Some(d) = &e.detail {
        line.push_str(&format!("  {d}"));
    }
    line
}

/// A running daemon as client commands talk to it: its HTTP API, read
/// through the answer types the server writes ([`crate::http::answers`]).
struct Daemon {
    http: reqwest::Client,
    base: String,
}

impl Daemon {
    /// An HTTP client for `target`: its API key on every request, its
    /// certificate trusted.
    fn new(target: &Target) -> Result<Daemon, CliError> {
        let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(120));
        if let Some(key) = &target.api_key {
            let mut headers = reqwest::header::HeaderMap::new();
            let value =
                reqwest::header::HeaderValue::from_str(&format!("Bearer {key}")).map_err(|_| {
                    usage("the API key file holds characters that cannot go in a header")
                })?;
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
                    let path = path.display();
                    return Err(usage(format!(
                        "cannot read --ca-file {path} ({e}); point it at the daemon's public certificate"
                    )));
                }
                Err(_) => {}
            }
        }
        Ok(Daemon {
            http: builder.build().map_err(|e| runtime(e.to_string()))?,
            base: target.base.clone(),
        })
    }

    fn endpoint(&self, segments: &[&str]) -> Result<url::Url, CliError> {
        endpoint(&self.base, segments)
    }

    /// Calls `segments` and reads the answer as a `T`; a body that is not
    /// one (another server at that address, a daemon of another version)
    /// is a sentence saying so.
    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: reqwest::Method,
        segments: &[&str],
        body: Option<String>,
    ) -> Result<T, CliError> {
        let url = self.endpoint(segments)?;
        let what = format!("{method} {}", url.path());
        let bytes = self.send(method, url, body).await?;
        serde_json::from_slice(&bytes).map_err(|e| {
            runtime(format!(
                "the daemon at {} answered {what} with a body this tokenkeeper cannot read ({e}); check that --url or server.listen points at a tokenkeeper daemon, and that it runs the same version as this command",
                self.base
            ))
        })
    }

    /// `GET segments?query` read as a `T` (see [`Daemon::call`]).
    async fn get_query<T: serde::de::DeserializeOwned>(
        &self,
        segments: &[&str],
        query: Vec<(&str, String)>,
    ) -> Result<T, CliError> {
        let mut url = self.endpoint(segments)?;
        url.query_pairs_mut().extend_pairs(query);
        let what = format!("GET {}", url.path());
        let bytes = self.send(reqwest::Method::GET, url, None).await?;
        serde_json::from_slice(&bytes).map_err(|e| {
            runtime(format!(
                "the daemon at {} answered {what} with a body this tokenkeeper cannot read ({e}); check that --url or server.listen points at a tokenkeeper daemon, and that it runs the same version as this command",
                self.base
            ))
        })
    }

    /// Sends the request; returns the body of a successful answer, and
    /// turns the daemon's JSON errors into one-sentence CLI errors.
    async fn send(
        &self,
        method: reqwest::Method,
        url: url::Url,
        body: Option<String>,
    ) -> Result<axum::body::Bytes, CliError> {
        let base = &self.base;
        let mut req = self.http.request(method, url);
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
        let bytes = resp.bytes().await.map_err(|e| {
            runtime(format!(
                "the daemon at {base} stopped answering mid-way ({e}); try again"
            ))
        })?;
        if status.is_success() {
            return Ok(bytes);
        }
        let (code, message) = match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(e) => {
                let code = match e.error.as_str() {
                    "unknown_provider" | "invalid_request" | "not_a_refresh_token" => EXIT_USAGE,
                    _ => EXIT_RUNTIME,
                };
                (code, e.message)
            }
            Err(_) => (EXIT_RUNTIME, format!("the daemon answered HTTP {status}")),
        };
        Err(CliError { code, message })
    }

    /// A one-time login link to `path` from the daemon (`POST
    /// /v1/login-links`, with the API key).
    async fn login_link(&self, path: &str) -> Result<String, CliError> {
        let link: LinkBody = self
            .call(
                reqwest::Method::POST,
                &["v1", "login-links"],
                Some(serde_json::json!({ "next": path }).to_string()),
            )
            .await?;
        Ok(link.url)
    }
}

/// `tokenkeeper import`: the token from a file or stdin, checked here
/// for shape (so junk never leaves the machine), then sent in a POST body.
async fn import(
    daemon: &Daemon,
    p: &str,
    a: &str,
    file: &Path,
    replace: bool,
) -> Result<(), CliError> {
    use crate::refresh::import::{check_refresh_token, MAX_REFRESH_TOKEN_BYTES};
    use std::io::Read;
    let from_stdin = file.as_os_str() == "-";
    let mut raw = Vec::new();
    let limit = MAX_REFRESH_TOKEN_BYTES as u64 + 1;
    let read = if from_stdin {
        std::io::stdin().lock().take(limit).read_to_end(&mut raw)
    } else {
        std::fs::File::open(file).and_then(|f| f.take(limit).read_to_end(&mut raw))
    };
    let source = if from_stdin {
        "standard input".to_string()
    } else {
        file.display().to_string()
    };
    read.map_err(|e| usage(format!("cannot read the refresh token from {source} ({e})")))?;
    let text = secrecy::SecretString::from(String::from_utf8(raw).map_err(|_| {
        usage(format!(
            "{source} holds bytes that are not text, so it is not a refresh token; put the refresh token in it, alone on one line"
        ))
    })?);
    let token = check_refresh_token(secrecy::ExposeSecret::expose_secret(&text))
        .map_err(|e| usage(format!("{source}: {e}")))?;
    let body = serde_json::json!({ "refresh_token": token, "replace": replace }).to_string();
    let done: ImportBody = daemon
        .call(
            reqwest::Method::POST,
            &["v1", "connections", p, a, "import"],
            Some(body),
        )
        .await?;
    let replaced = if done.replaced {
        " (the grant it held before is revoked)"
    } else {
        ""
    };
    if done.access_token_usable {
        outln(
            format_args!(
                "imported {p}/{a}{replaced}: the provider accepted the refresh token; access token valid until {}",
                rfc3339_secs::format(&done.expires_at)
            ),
            Output::Report,
        )?;
    } else {
        outln(
            format_args!(
                "imported {p}/{a}{replaced}: the provider accepted the refresh token and issued a new one, but its answer carried no usable access token; the new refresh token is stored and tokenkeeper obtains an access token at the first request"
            ),
            Output::Report,
        )?;
    }
    if done.rotated {
        outln(
            "The provider rotated the refresh token: the copy the other program holds no longer works. That program must get its access tokens from tokenkeeper from now on (GET /v1/token or `tokenkeeper token`); remove the refresh token from it.",
            Output::Report,
        )
    } else {
        outln(
            format_args!("The provider did not rotate the refresh token, so the other program's copy still works: remove it there, and let that program get its access tokens from tokenkeeper from now on (GET /v1/token or `tokenkeeper token`), or two holders will refresh the same grant."),
            Output::Report,
        )
    }
}

/// `tokenkeeper connect --paste`: the daemon starts a flow bound to a
/// secret only this command holds; the person approves in any browser and
/// pastes the address it ended on; the daemon finishes as `/callback` would.
async fn paste_flow(daemon: &Daemon, p: &str, a: &str) -> Result<(), CliError> {
    let started: PasteStartBody = daemon
        .call(
            reqwest::Method::POST,
            &["v1", "connections", p, a, "paste", "start"],
            None,
        )
        .await?;
    err_line(format_args!(
        "Open this address in a browser on any machine and approve (within 10 minutes):"
    ));
    outln(&started.authorization_url, Output::Report)?;
    err_line(format_args!(
        "Then paste here the whole address the browser ends on (it starts with {} and may show an error page: that is fine), and press Enter:",
        started.redirect_uri
    ));
    let line = tokio::task::spawn_blocking(|| {
        use std::io::{BufRead, Read};
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .take(64 * 1024)
            .read_line(&mut line)
            .map(|_| line)
    })
    .await
    .map_err(|e| runtime(format!("cannot read the pasted address ({e})")))?
    .map_err(|e| usage(format!("cannot read the pasted address from standard input ({e}); paste it as one line of text")))?;
    if line.trim().is_empty() {
        return Err(runtime(
            "nothing was pasted, so nothing was stored; run the command again and paste the address the browser ended on",
        ));
    }
    let body = serde_json::json!({ "flow_secret": started.flow_secret, "pasted": line.trim() })
        .to_string();
    let done: PasteFinishBody = daemon
        .call(
            reqwest::Method::POST,
            &["v1", "connections", p, a, "paste", "finish"],
            Some(body),
        )
        .await?;
    outln(
        format_args!(
            "authorized {}/{}; the grant is stored",
            done.provider, done.account
        ),
        Output::Report,
    )?;
    if !done.refresh_token {
        outln(
            "The provider issued no refresh token: this grant ends when its access token expires. Check the provider's offline-access settings.",
            Output::Report,
        )?;
    }
    Ok(())
}

/// How long one watch of a device flow waits at the daemon before asking
/// again (the daemon caps it at 30 s; the client's timeout is 120 s).
const DEVICE_WATCH_SECS: u64 = 25;

/// `tokenkeeper connect --device`: the daemon obtains the codes and polls
/// the provider; this command prints where to go and the code, then
/// watches the flow until it ends. Ctrl-C cancels the daemon's polling.
async fn device_flow(daemon: &Daemon, p: &str, a: &str) -> Result<(), CliError> {
    let started: DeviceFlowBody = daemon
        .call(
            reqwest::Method::POST,
            &["v1", "connections", p, a, "device"],
            None,
        )
        .await?;
    let left = (started.expires_at - chrono::Utc::now())
        .num_seconds()
        .max(0) as u64;
    outln(
        format_args!(
            "To authorize {p}/{a}, open this address on any device:\n\n    {}\n\nand enter the code:\n\n    {}\n",
            started.verification_uri, started.user_code
        ),
        Output::Report,
    )?;
    if let Some(complete) = &started.verification_uri_complete {
        outln(
            format_args!("Or open this address, which has the code in it:\n\n    {complete}\n"),
            Output::Report,
        )?;
    }
    err_line(format_args!(
        "Waiting for approval (the code expires in {}); Ctrl-C cancels.",
        crate::http::pages::human_span(left)
    ));
    let id = started.flow_id;
    let segments = ["v1", "connections", p, a, "device", id.as_str()];
    let mut ctrl_c = std::pin::pin!(tokio::signal::ctrl_c());
    let ended = loop {
        let watch = daemon
            .get_query::<DeviceFlowBody>(&segments, vec![("wait", DEVICE_WATCH_SECS.to_string())]);
        tokio::select! {
            _ = &mut ctrl_c => {
                let _ = daemon
                    .call::<DeviceFlowBody>(reqwest::Method::DELETE, &segments, None)
                    .await;
                return Err(runtime("cancelled; the daemon stopped polling and nothing was stored"));
            }
            flow = watch => {
                let flow = flow?;
                if flow.state != "pending" {
                    break flow;
                }
            }
        }
    };
    let message = ended
        .message
        .unwrap_or_else(|| format!("the device authorization ended ({})", ended.state));
    if ended.state != "authorized" {
        return Err(runtime(message));
    }
    outln(message, Output::Report)?;
    if ended.refresh_token == Some(false) {
        outln(
            "The provider issued no refresh token: this grant ends when its access token expires. Check the provider's offline-access settings (scopes such as offline_access).",
            Output::Report,
        )?;
    }
    Ok(())
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
fn quota_cell(q: Option<&ConnectionQuota>) -> String {
    let Some(q) = q else {
        return "-".into();
    };
    let mut s = match (q.client.daily_available, q.client.daily_limit) {
        (Some(a), Some(l)) => format!("{a}/{l} left today"),
        _ => format!("{} used today", q.client.daily_used),
    };
    if q.paused_until.is_some() {
        s.push_str(" (paused after 429)");
    }
    s
}

fn print_status(conns: &[ConnectionJson]) -> Result<(), CliError> {
    if conns.is_empty() {
        return outln(
            "no connections yet; run `tokenkeeper connect PROVIDER` and open the URL it prints",
            Output::Report,
        );
    }
    let now = chrono::Utc::now();
    let when = |t: Option<chrono::DateTime<chrono::Utc>>| -> String {
        t.map(|t| relative(t, now)).unwrap_or_else(|| "-".into())
    };
    let mut rows = vec![[
        "PROVIDER".to_string(),
        "ACCOUNT".into(),
        "STATE".into(),
        "EXPIRES".into(),
        "LAST REFRESH".into(),
        "NEXT REFRESH".into(),
        "REFRESH TOKEN ENDS".into(),
        "QUOTA".into(),
        "LAST ERROR".into(),
    ]];
    for c in conns {
        rows.push([
            c.provider.clone(),
            c.account.clone(),
            c.state.to_string(),
            when(Some(c.expires_at)),
            when(c.refreshed_at),
            when(c.next_refresh_at),
            when(c.refresh_token_expires_at),
            quota_cell(c.quota.as_ref()),
            c.last_error.clone().unwrap_or_default(),
        ]);
    }
    let states: Vec<Option<ConnState>> = conns.iter().map(|c| c.state.known()).collect();
    let widths: Vec<usize> = (0..9)
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
    let location = cfg.storage.location();
    let _lock = crate::store::StoreLock::exclusive(&location)
        .await
        .map_err(|e| runtime(e.to_string()))?;
    let store = crate::store::Store::open_at(&location, old_key)
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

/// `genkey`: a new key on standard output, or in a new file of mode 0600.
fn genkey(file: Option<&Path>) -> Result<(), CliError> {
    use secrecy::ExposeSecret as _;
    let key = crate::crypto::SealKey::generate_text().map_err(|e| {
        runtime(format!(
            "the operating system gave no random bytes ({e}); no key was made, retry once it can"
        ))
    })?;
    let path = match file {
        Some(p) if p.as_os_str() != "-" => p,
        _ if stdout_was_closed() => {
            return Err(runtime(
                "standard output is closed, so no key was written; send it to a pipe or a file, or name a FILE",
            ))
        }
        _ => return out(key.expose_secret(), Output::Essential),
    };
    crate::keygen::write_new_key_file(path, &key).map_err(|e| {
        if e.is_usage() {
            usage(e.to_string())
        } else {
            runtime(e.to_string())
        }
    })?;
    // To stderr: stdout carries keys only, so `genkey F > G` cannot
    // mistake this sentence for one.
    err_line(format_args!(
        "tokenkeeper: wrote a new key to {} (mode 0600); set storage.encryption_key_file to it, or seal it with `systemd-creds encrypt`",
        path.display()
    ));
    Ok(())
}

/// The configured encryption key, if any, as a usage error when unreadable.
fn configured_key(cfg: &Config) -> Result<Option<crate::crypto::SealKey>, CliError> {
    match &cfg.storage.encryption_key_file {
        Some(p) => crate::crypto::SealKey::from_file(p)
            .map(Some)
            .map_err(|e| usage(e.to_string())),
        None => Ok(None),
    }
}

/// `tokenkeeper backup` (SPEC 14): the running daemon makes it (`POST
/// /v1/backup`, on its own pool); when no daemon holds the store, this
/// command does, on the file, holding the store lock alone meanwhile.
async fn backup(cli: &Cli) -> Result<(), CliError> {
    let (_, cfg) = load_config(cli.config.as_deref())?;
    let Some(backup_cfg) = cfg.backup.clone() else {
        return Err(usage(
            "no [backup] section in the config; add one with schedule, dir and keep (see the README, \"Backups\"), then run this again",
        ));
    };
    let location = cfg.storage.location();
    let made = match crate::store::StoreLock::exclusive(&location).await {
        Ok(_lock) => {
            let key = configured_key(&cfg)?;
            let store = crate::store::Store::open_at(&location, configured_key(&cfg)?)
                .await
                .map_err(|e| runtime(e.to_string()))?;
            let made = crate::backup::Backups::new(backup_cfg, key)
                .make(&store)
                .await;
            store.close().await;
            let made = made.map_err(|e| runtime(e.to_string()))?;
            crate::http::backup::BackupBody {
                file: made.path.display().to_string(),
                sha256: made.sha256,
                bytes: made.bytes,
                removed: made.removed.len(),
            }
        }
        Err(crate::store::StoreError::DaemonRunning { .. }) => {
            let daemon = Daemon::new(&target(cli)?)?;
            daemon
                .call(reqwest::Method::POST, &["v1", "backup"], None)
                .await
                .map_err(|e| {
                    if e.message.starts_with("no such endpoint") {
                        runtime("the running daemon was started without [backup]; restart it (systemctl restart tokenkeeper) so it reads the section, then run this again")
                    } else {
                        e
                    }
                })?
        }
        Err(e) => return Err(runtime(e.to_string())),
    };
    outln(
        format_args!(
            "wrote and verified {} ({} bytes, sha256 {}){}",
            made.file,
            made.bytes,
            made.sha256,
            match made.removed {
                0 => String::new(),
                1 => "; removed 1 older backup".into(),
                n => format!("; removed {n} older backups"),
            }
        ),
        Output::Report,
    )
}

/// `tokenkeeper restore FILE` (SPEC 14): refused while a daemon holds the
/// store; see [`crate::backup::restore`].
async fn restore(explicit: Option<&Path>, file: &Path) -> Result<(), CliError> {
    let (_, cfg) = load_config(explicit)?;
    let location = cfg.storage.location();
    let crate::store::Location::Sqlite(db) = &location else {
        return Err(usage(
            "the store is PostgreSQL (storage.url): restore it with the database's own tools (pg_restore)",
        ));
    };
    let key = configured_key(&cfg)?;
    let _lock = crate::store::StoreLock::exclusive(&location)
        .await
        .map_err(|e| runtime(e.to_string()))?;
    let done = crate::backup::restore(file, db, key.as_ref())
        .await
        .map_err(|e| runtime(e.to_string()))?;
    let aside = match &done.aside {
        Some(p) => format!("; the previous database is kept as {}", p.display()),
        None => String::new(),
    };
    let checked = if done.checksum_checked {
        "checksum, "
    } else {
        ""
    };
    outln(
        format_args!(
            "restored {} to {} ({checked}integrity, migrations and key checked){aside}; start the daemon",
            file.display(),
            db.display()
        ),
        Output::Report,
    )
}

/// `tokenkeeper migrate-storage --to URL [--replace]` (SPEC 9): see
/// [`crate::store::migrate`].
async fn migrate_storage(explicit: Option<&Path>, to: &str, replace: bool) -> Result<(), CliError> {
    let (_, cfg) = load_config(explicit)?;
    let key = || match &cfg.storage.encryption_key_file {
        Some(p) => crate::crypto::SealKey::from_file(p)
            .map(Some)
            .map_err(|e| usage(e.to_string())),
        None => Ok(None),
    };
    let from = cfg.storage.location();
    if crate::store::postgres::is_url(to) && crate::store::postgres::has_password(to) {
        // Any local user can read a command line (/proc/*/cmdline), and the
        // shell keeps it in its history.
        err_line(format_args!(
            "tokenkeeper: warning: the --to URL holds a password, which other local users can see in the process list; next time leave it out and give it in PGPASSWORD or ~/.pgpass instead"
        ));
    }
    let target = crate::store::Location::parse(to);
    let copied = crate::store::migrate::migrate_storage(&from, &target, (key()?, key()?), replace)
        .await
        .map_err(|e| runtime(e.to_string()))?;
    let plural = |n: usize| if n == 1 { "" } else { "s" };
    outln(
        format_args!(
            "copied {} connection{}, {} fingerprint{} and {} pending authorization{} from {} to {} and verified the copy; now point [storage] at the target (storage.{}) and start the daemon",
            copied.connections,
            plural(copied.connections),
            copied.fingerprints,
            plural(copied.fingerprints),
            copied.pending,
            plural(copied.pending),
            from.describe(),
            target.describe(),
            match target {
                crate::store::Location::Sqlite(_) => "path",
                crate::store::Location::Postgres(_) => "url",
            }
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
    let html = crate::http::pages::login_redirect(url);
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
        let url = "http://127.0.0.1:8080/login?token=s3cr3t-link&x=\"<y>'";
        let path = login_redirect_file(dir.path(), url).unwrap();
        assert!(path.starts_with(dir.path()));
        assert!(
            !path.to_string_lossy().contains("s3cr3t-link"),
            "no secret in the path"
        );
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "owner-only: {mode:o}");
        let html = std::fs::read_to_string(&path).unwrap();
        // A single quote needs no escaping inside a double-quoted attribute.
        let escaped = "http://127.0.0.1:8080/login?token=s3cr3t-link&amp;x=&quot;&lt;y&gt;'";
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
