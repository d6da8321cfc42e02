//! Configuration: the TOML file of SPEC 3, its lookup order, presets and
//! secret resolution.
//!
//! Parsing walks the span-carrying TOML tree by hand instead of using serde
//! derive, because an operator must see *every* problem at once, each with
//! its key and line; serde stops at the first. This module only reads files
//! and the environment; it never opens sockets or the database.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::SecretString;
use toml::de::{DeTable, DeValue};
use toml::Spanned;
use url::Url;

/// Default listen address: loopback only, so nothing off the machine can ask
/// for a token unless the operator opts in.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8787";

/// Where the config is looked for when neither `--config` nor
/// `$TOKENKEEPER_CONFIG` says.
pub const SYSTEM_CONFIG_PATH: &str = "/etc/tokenkeeper/tokenkeeper.toml";

/// The whole, validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub storage: StorageConfig,
    pub refresh: RefreshConfig,
    pub providers: BTreeMap<String, ProviderConfig>,
    pub notify: NotifyConfig,
    /// Token files (SPEC 12), every provider's, in file order.
    pub sinks: Vec<crate::sinks::SinkConfig>,
    /// `[backup]` (SPEC 14); `None` when absent.
    pub backup: Option<BackupConfig>,
    /// Things that work but deserve the operator's attention.
    pub warnings: Vec<String>,
}

/// `[server]`.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub allow_remote: bool,
    /// `None` means "derive from the bound listen address".
    pub public_url: Option<Url>,
    pub tls: TlsConfig,
    pub api_keys_file: Option<PathBuf>,
    pub allowed_hosts: Vec<String>,
    pub proxy_max_wait: Duration,
    /// A request head must be complete this long after the connection
    /// opens or its first byte arrives (slow or silent clients).
    pub header_read_timeout: Duration,
    /// A keep-alive connection with nothing in flight closes after this.
    pub idle_timeout: Duration,
    /// Open client connections at most; more wait in the listen backlog.
    pub max_connections: u32,
}

/// `server.header_read_timeout` default: a real client sends its head in
/// one packet; ten seconds leaves room for a slow link.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// `server.idle_timeout` default: long enough that a polling program keeps
/// its connection between requests a minute apart.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// `server.max_connections` default: room for 1,000 stuck sockets plus the
/// real clients (the benchmark uses 64), within the file limit the daemon
/// raises itself to at start.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 4096;

/// `server.tls`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsConfig {
    Off,
    SelfSigned,
    Files {
        cert_file: PathBuf,
        key_file: PathBuf,
    },
}

/// `[storage]`.
#[derive(Debug, Clone)]
pub struct StorageConfig {
    /// The SQLite database (`storage.path`, or the default location);
    /// unused when `url` is set.
    pub path: PathBuf,
    /// `storage.url` (or the content of `storage.url_file`): a PostgreSQL
    /// URL, which selects PostgreSQL (SPEC 9). A secret: it may hold a
    /// password.
    pub url: Option<SecretString>,
    pub encryption_key_file: Option<PathBuf>,
    /// `storage.history`: how long history events are kept (SPEC 13).
    pub history: Duration,
}

/// Longest `storage.history`: a cutoff further back than this is outside
/// the range of instants the history can compare against.
pub const MAX_HISTORY: Duration = Duration::from_secs(36_500 * 24 * 3600);

/// Default of `storage.history`: a quarter of a year, enough to answer
/// "what happened last month" without the table growing forever (a few
/// events a day per connection).
pub const DEFAULT_HISTORY: Duration = Duration::from_secs(90 * 86400);

impl StorageConfig {
    /// Where the grants live: PostgreSQL when a URL is set, else SQLite.
    pub fn location(&self) -> crate::store::Location {
        match &self.url {
            Some(url) => crate::store::Location::Postgres(url.clone()),
            None => crate::store::Location::Sqlite(self.path.clone()),
        }
    }
}

/// `[refresh]`: the refresh policy knobs (see `refresh::policy`).
#[derive(Debug, Clone)]
pub struct RefreshConfig {
    pub at_fraction: f64,
    pub jitter: Duration,
    pub min_validity: Duration,
    pub check_interval: Duration,
    pub retry_initial: Duration,
    pub retry_max: Duration,
    pub keepalive: Duration,
    /// How long before a refresh token's end that refreshing cannot push
    /// back (a hard cap, or a rolling end while refreshes fail) the
    /// `refresh_token_expiring` event is sent (SPEC 11).
    pub warn_before: Duration,
}

impl Default for RefreshConfig {
    fn default() -> Self {
        RefreshConfig {
            at_fraction: 0.75,
            jitter: Duration::from_secs(600),
            min_validity: Duration::from_secs(300),
            check_interval: Duration::from_secs(30),
            retry_initial: Duration::from_secs(30),
            retry_max: Duration::from_secs(1800),
            keepalive: Duration::from_secs(30 * 86400),
            warn_before: Duration::from_secs(7 * 86400),
        }
    }
}

/// How the client authenticates at the token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// `client_id` and `client_secret` in the form body.
    Body,
    /// HTTP Basic with the client credentials.
    Basic,
    /// Public client: `client_id` in the body, no secret.
    None,
}

/// How a provider's grants come in (`grant` on `[providers.NAME]`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum GrantKind {
    /// A person authorizes in a browser (or pastes, imports, uses a device
    /// code); the daemon refreshes with the refresh token it was given.
    #[default]
    AuthorizationCode,
    /// RFC 6749 4.4: no person and no refresh token; the daemon asks the
    /// token endpoint with the client's own credentials, under account
    /// `default`, at start and on the refresh schedule.
    ClientCredentials,
}

impl GrantKind {
    /// The values `grant` accepts, as a config error lists them.
    pub const NAMES: &'static str =
        "\"authorization_code\" (the default) or \"client_credentials\"";

    /// The value of `grant` that selects this kind.
    pub fn name(self) -> &'static str {
        match self {
            GrantKind::AuthorizationCode => "authorization_code",
            GrantKind::ClientCredentials => "client_credentials",
        }
    }
}

/// Client-side rate limits of a provider (per OAuth client).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub per_second: Option<u32>,
    pub per_minute: Option<u32>,
    pub per_day: Option<u32>,
}

/// One `[providers.NAME]` table after presets were applied.
#[derive(Clone)]
pub struct ProviderConfig {
    pub name: String,
    pub preset: Preset,
    pub client_id: String,
    /// `None` for public clients.
    pub client_secret: Option<SecretString>,
    pub authorization_url: Url,
    pub token_url: Url,
    pub revocation_url: Option<Url>,
    pub api_base_url: Option<Url>,
    pub scopes: Vec<String>,
    pub code_auth: ClientAuth,
    pub refresh_auth: ClientAuth,
    pub pkce: bool,
    pub extra_authorize_params: BTreeMap<String, String>,
    pub default_lifetime: Duration,
    pub limits: Limits,
    /// Bound on one call to the provider's token endpoint.
    pub request_timeout: Duration,
    /// Revoke upstream the refresh token of a grant that a newer
    /// authorization replaced, or of a refresh result overtaken by one
    /// (default true). Turn off for providers where revoking one refresh
    /// token ends the user's whole authorization of the client (Google
    /// does): there it would also kill the new grant.
    pub revoke_replaced: bool,
    /// RFC 8628 device authorization endpoint, where the provider has one
    /// (preset, discovery or the file).
    pub device_authorization_url: Option<Url>,
    /// `issuer`: the endpoints the file does not set come from its
    /// discovery document (`provider::discovery`), applied at start and on
    /// reload. Until then, `authorization_url` and `token_url` not set in
    /// the file hold the issuer itself, which no request is sent to.
    pub issuer: Option<Url>,
    /// Which endpoints the file set itself (discovery never overrides them).
    pub explicit: ExplicitEndpoints,
    /// How scopes are joined in the authorization request (`" "`; Zoho: `","`).
    pub scope_delimiter: &'static str,
    /// What a refresh does to the refresh token (from the preset).
    pub rotation: Rotation,
    /// How long a refresh token lives (from the preset; SPEC 11).
    pub refresh_token_lifetime: RefreshTokenLifetime,
    /// How grants come in (`grant`; default: the authorization-code grant).
    pub grant: GrantKind,
}

impl ProviderConfig {
    /// Why no person can authorize this provider (browser, pasted address,
    /// import, device code), if that is so: with the client-credentials
    /// grant the daemon obtains tokens itself and holds no refresh token.
    pub fn authorization_refusal(&self) -> Option<String> {
        (self.grant == GrantKind::ClientCredentials).then(|| {
            format!(
                "provider {name} uses grant = \"client_credentials\": there is nothing to authorize or import; tokenkeeper obtains its token itself with the client's credentials (account default): ask GET /v1/token/{name} or run `tokenkeeper token {name}`",
                name = self.name
            )
        })
    }
}

impl fmt::Debug for ProviderConfig {
    // Written by hand so the secret can never be printed, whatever secrecy's
    // Debug does in future versions.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProviderConfig")
            .field("name", &self.name)
            .field("preset", &self.preset)
            .field("client_id", &self.client_id)
            .field(
                "client_secret",
                &self.client_secret.as_ref().map(|_| "[redacted]"),
            )
            .field("token_url", &self.token_url.as_str())
            .finish_non_exhaustive()
    }
}

pub use crate::provider::presets::Preset;
use crate::provider::presets::{RefreshTokenLifetime, Rotation};

/// Which endpoint keys a `[providers.NAME]` table set itself: discovery
/// (`issuer`) fills only the others.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExplicitEndpoints {
    pub authorization_url: bool,
    pub token_url: bool,
    pub revocation_url: bool,
    pub device_authorization_url: bool,
}

/// `[notify]`.
#[derive(Debug, Clone, Default)]
pub struct NotifyConfig {
    pub command: Option<PathBuf>,
    pub webhook_url: Option<Url>,
}

/// `[backup]` (SPEC 14): scheduled snapshots of an SQLite store.
#[derive(Debug, Clone)]
pub struct BackupConfig {
    /// A cron expression with seconds (`sec min hour day month weekday`),
    /// evaluated in UTC; checked when the config is read.
    pub schedule: String,
    /// Where backups go (absolute; created 0700).
    pub dir: PathBuf,
    /// How many backups are kept; older ones are removed.
    pub keep: u32,
}

/// `backup.keep` default: a week of daily backups.
pub const DEFAULT_BACKUP_KEEP: u32 = 7;

/// One problem found in the config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// Dotted key, e.g. `providers.keap.client_id`.
    pub key: String,
    /// 1-based line in the file, when the problem has a place.
    pub line: Option<usize>,
    pub message: String,
}

/// Every problem found, so they can all be fixed in one go.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigError {
    pub file: String,
    pub problems: Vec<ConfigProblem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            match p.line {
                Some(line) => write!(f, "{}:{}: {}: {}", self.file, line, p.key, p.message)?,
                None => write!(f, "{}: {}: {}", self.file, p.key, p.message)?,
            }
        }
        Ok(())
    }
}

/// Which file to read, following SPEC 2: `--config` > `$TOKENKEEPER_CONFIG`
/// > `./tokenkeeper.toml` > `/etc/tokenkeeper/tokenkeeper.toml`.
pub fn locate(explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = explicit {
        return Some(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("TOKENKEEPER_CONFIG").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(p));
    }
    [
        PathBuf::from("tokenkeeper.toml"),
        PathBuf::from(SYSTEM_CONFIG_PATH),
    ]
    .into_iter()
    .find(|p| p.is_file())
}

/// Reads and validates the file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    parse(&read_config_file(path)?, path)
}

/// The text of the config file, as a problem naming the file when it
/// cannot be read.
fn read_config_file(path: &Path) -> Result<String, ConfigError> {
    /// A config is a few KiB; this only stops `--config /dev/zero`.
    const MAX_CONFIG_FILE: u64 = 4 * 1024 * 1024;
    read_bounded(path, MAX_CONFIG_FILE).map_err(|e| ConfigError {
        file: path.display().to_string(),
        problems: vec![ConfigProblem {
            key: "(file)".into(),
            line: None,
            message: format!(
                "cannot read the config file ({e}); check the path and its permissions"
            ),
        }],
    })
}

/// Validates `text` as a config file found at `path` (used for messages and
/// for resolving relative secret files).
pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
    let (config, problems) = read(text, path, Mode::Daemon);
    checked(config, problems, path)
}

/// How strictly a file is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Everything the daemon needs, checked: secrets read, files present,
    /// the listen address allowed.
    Daemon,
    /// What a client command needs to find and trust the daemon: no secret
    /// is read (the user running the client may not be allowed to), a
    /// `*_file` need not exist here, and the listen address may be a
    /// remote daemon's.
    Client,
}

/// The keys client commands read (with everything below them): a problem
/// elsewhere in the file is the daemon's business, not theirs.
const CLIENT_KEYS: [&str; 5] = [
    "server.listen",
    "server.public_url",
    "server.tls",
    "server.api_keys_file",
    "storage.path",
];

/// Reads the file at `path` for a client command (SPEC 2: client commands
/// find the daemon from the same config): `server.listen`, `public_url`,
/// `tls`, `api_keys_file` and `storage.path` (where a self-signed
/// certificate lives). Problems in other keys, such as a client secret
/// file this user cannot read, are not the client's and are ignored, and
/// so are those in `unused`, keys the caller has from elsewhere (the
/// command line); problems in the rest are reported, with key and line.
pub fn load_for_client(path: &Path, unused: &[&str]) -> Result<Config, ConfigError> {
    parse_for_client(&read_config_file(path)?, path, unused)
}

/// [`load_for_client`] of `text`, a config file found at `path`.
pub fn parse_for_client(text: &str, path: &Path, unused: &[&str]) -> Result<Config, ConfigError> {
    let (config, mut problems) = read(text, path, Mode::Client);
    let under = |key: &str, k: &str| {
        key.strip_prefix(k)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
    };
    problems.retain(|p| {
        CLIENT_KEYS.iter().any(|k| under(&p.key, k)) && !unused.iter().any(|k| under(&p.key, k))
    });
    checked(config, problems, path)
}

/// `config`, unless there are `problems`.
fn checked(
    config: Config,
    problems: Vec<ConfigProblem>,
    path: &Path,
) -> Result<Config, ConfigError> {
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(ConfigError {
            file: path.display().to_string(),
            problems,
        })
    }
}

/// Reads `text` in `mode`: the config built from what could be read, and
/// every problem found.
fn read(text: &str, path: &Path, mode: Mode) -> (Config, Vec<ConfigProblem>) {
    let mut r = Reader::new(text, path, mode);
    let (root, parse_errors) = DeTable::parse_recoverable(text);
    for e in parse_errors {
        let line = e.span().map(|s| r.line_of(s.start));
        r.problems.push(ConfigProblem {
            key: "(syntax)".into(),
            line,
            message: format!("{}; fix the TOML syntax", e.message().trim()),
        });
    }
    let config = r.config(root.get_ref());
    (config, r.problems)
}

/// Parses `"10m"`, `"1h30m"`, `"500ms"`, `"30d"`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!(
                "`{s}` is not a duration like \"30s\", \"10m\", \"1h\""
            ));
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("`{s}`: number too large"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let part = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            "d" => Duration::from_secs(n.saturating_mul(86400)),
            "" => return Err(format!("`{s}` needs a unit (ms, s, m, h or d)")),
            other => {
                return Err(format!(
                    "`{s}`: unknown unit `{other}` (use ms, s, m, h or d)"
                ))
            }
        };
        total = total.saturating_add(part);
    }
    // Every instant computed from a duration (an end, a due time, a
    // warning) must stay inside chrono's range; nothing here means more
    // than a century.
    if total > MAX_DURATION {
        return Err(format!(
            "`{s}` is longer than a century; write at most \"36500d\""
        ));
    }
    Ok(total)
}

/// The longest duration any key accepts: 36500 days.
pub const MAX_DURATION: Duration = Duration::from_secs(36500 * 86400);

/// Provider and account names: `[a-z0-9][a-z0-9_-]{0,62}`.
pub fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_' || *c == b'-')
}

/// Account names follow the provider rule, except `refresh`, which would be
/// ambiguous with `POST /v1/token/{provider}/refresh`.
pub fn valid_account(name: &str) -> bool {
    valid_name(name) && name != "refresh"
}

/// Default database location when `storage.path` is absent.
pub fn default_db_path() -> PathBuf {
    let env_dir = |var: &str| {
        std::env::var_os(var)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(dir) = env_dir("STATE_DIRECTORY") {
        // systemd may pass several colon-separated directories; the first is ours.
        let first = dir
            .to_string_lossy()
            .split(':')
            .next()
            .unwrap_or_default()
            .to_string();
        return PathBuf::from(first).join("tokenkeeper.db");
    }
    if let Some(dir) = env_dir("XDG_STATE_HOME") {
        return dir.join("tokenkeeper").join("tokenkeeper.db");
    }
    let home = env_dir("HOME").unwrap_or_else(|| PathBuf::from("."));
    home.join(".local/state/tokenkeeper/tokenkeeper.db")
}

/// `[server]` as it is when the file has none: loopback, no TLS, no API keys.
impl ServerConfig {
    /// The defaults, listening on `listen`.
    pub fn local(listen: SocketAddr) -> ServerConfig {
        ServerConfig {
            listen,
            allow_remote: false,
            public_url: None,
            tls: TlsConfig::Off,
            api_keys_file: None,
            allowed_hosts: default_allowed_hosts(),
            proxy_max_wait: Duration::from_secs(10),
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

impl Config {
    /// The URL a browser reaches the daemon at, given the bound address.
    pub fn public_url(&self, bound: SocketAddr) -> Url {
        if let Some(u) = &self.server.public_url {
            return u.clone();
        }
        let scheme = if self.server.tls == TlsConfig::Off {
            "http"
        } else {
            "https"
        };
        Url::parse(&format!("{scheme}://{bound}")).expect("socket addresses form valid URLs")
    }
}

fn default_allowed_hosts() -> Vec<String> {
    vec!["localhost".into(), "127.0.0.1".into(), "[::1]".into()]
}

/// Walks the TOML tree, collecting problems instead of stopping at the first.
struct Reader<'a> {
    text: &'a str,
    path: &'a Path,
    mode: Mode,
    problems: Vec<ConfigProblem>,
    warnings: Vec<String>,
}

type Table<'i> = DeTable<'i>;
type Value<'i> = Spanned<DeValue<'i>>;

impl<'a> Reader<'a> {
    fn new(text: &'a str, path: &'a Path, mode: Mode) -> Self {
        Reader {
            text,
            path,
            mode,
            problems: Vec::new(),
            warnings: Vec::new(),
        }
    }

    fn line_of(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    fn problem(&mut self, key: &str, span: Option<Range<usize>>, message: impl Into<String>) {
        let line = span.map(|s| self.line_of(s.start));
        self.problems.push(ConfigProblem {
            key: key.to_string(),
            line,
            message: message.into(),
        });
    }

    fn check_keys(&mut self, table: &Table<'_>, path: &str, allowed: &[&str]) {
        for (k, _) in table.iter() {
            if !allowed.contains(&k.get_ref().as_ref()) {
                let key = join(path, k.get_ref());
                self.problem(
                    &key,
                    Some(k.span()),
                    format!("unknown key; allowed here: {}", allowed.join(", ")),
                );
            }
        }
    }

    fn get<'t, 'i>(&self, table: &'t Table<'i>, key: &str) -> Option<&'t Value<'i>> {
        table.get(key)
    }

    fn table<'t, 'i>(
        &mut self,
        parent: &'t Table<'i>,
        key: &str,
        path: &str,
    ) -> Option<&'t Table<'i>> {
        let v = self.get(parent, key)?;
        match v.get_ref() {
            DeValue::Table(t) => Some(t),
            other => {
                let msg = format!("expected a table, found {}", other.type_str());
                self.problem(&join(path, key), Some(v.span()), msg);
                None
            }
        }
    }

    fn string(
        &mut self,
        table: &Table<'_>,
        key: &str,
        path: &str,
    ) -> Option<(String, Range<usize>)> {
        let v = self.get(table, key)?;
        match v.get_ref() {
            DeValue::String(s) => Some((s.to_string(), v.span())),
            other => {
                let msg = format!("expected a string, found {}", other.type_str());
                self.problem(&join(path, key), Some(v.span()), msg);
                None
            }
        }
    }

    fn boolean(&mut self, table: &Table<'_>, key: &str, path: &str) -> Option<bool> {
        let v = self.get(table, key)?;
        match v.get_ref() {
            DeValue::Boolean(b) => Some(*b),
            other => {
                let msg = format!("expected true or false, found {}", other.type_str());
                self.problem(&join(path, key), Some(v.span()), msg);
                None
            }
        }
    }

    fn number(&mut self, table: &Table<'_>, key: &str, path: &str) -> Option<(f64, Range<usize>)> {
        let v = self.get(table, key)?;
        let parsed = match v.get_ref() {
            DeValue::Integer(i) => i64::from_str_radix(&i.as_str().replace('_', ""), i.radix())
                .ok()
                .map(|n| n as f64),
            DeValue::Float(f) => f.as_str().replace('_', "").parse::<f64>().ok(),
            _ => None,
        };
        if parsed.is_none() {
            let msg = format!("expected a number, found {}", v.get_ref().type_str());
            self.problem(&join(path, key), Some(v.span()), msg);
        }
        parsed.map(|n| (n, v.span()))
    }

    fn count(&mut self, table: &Table<'_>, key: &str, path: &str) -> Option<u32> {
        let (n, span) = self.number(table, key, path)?;
        if n.fract() != 0.0 || !(1.0..=u32::MAX as f64).contains(&n) {
            self.problem(
                &join(path, key),
                Some(span),
                "expected a positive whole number",
            );
            return None;
        }
        Some(n as u32)
    }

    fn duration(&mut self, table: &Table<'_>, key: &str, path: &str) -> Option<Duration> {
        let (s, span) = self.string(table, key, path)?;
        match parse_duration(&s) {
            Ok(d) => Some(d),
            Err(e) => {
                self.problem(
                    &join(path, key),
                    Some(span),
                    format!("{e}; write e.g. \"30s\", \"10m\", \"1h\""),
                );
                None
            }
        }
    }

    fn url(&mut self, table: &Table<'_>, key: &str, path: &str) -> Option<Url> {
        let (s, span) = self.string(table, key, path)?;
        match Url::parse(&s) {
            Ok(u) if u.scheme() == "http" || u.scheme() == "https" => Some(u),
            Ok(_) => {
                self.problem(
                    &join(path, key),
                    Some(span),
                    "must be an http:// or https:// URL",
                );
                None
            }
            Err(e) => {
                self.problem(
                    &join(path, key),
                    Some(span),
                    format!("not a valid URL ({e})"),
                );
                None
            }
        }
    }

    /// A URL that others are appended to (`api_base_url`): a query or a
    /// fragment would end up in the middle of every proxied URL, or be
    /// silently dropped, so either is refused with the fix.
    fn base_url(&mut self, table: &Table<'_>, key: &str, path: &str) -> Option<Url> {
        let u = self.url(table, key, path)?;
        let part = if u.query().is_some() {
            "a query (?...)"
        } else if u.fragment().is_some() {
            "a fragment (#...)"
        } else {
            return Some(u);
        };
        let span = self.get(table, key).map(|v| v.span());
        self.problem(
            &join(path, key),
            span,
            format!("must not contain {part}: requests are appended to its path; remove it, and pass query parameters on each proxied request instead"),
        );
        None
    }

    fn string_array(&mut self, table: &Table<'_>, key: &str, path: &str) -> Option<Vec<String>> {
        let v = self.get(table, key)?;
        let DeValue::Array(items) = v.get_ref() else {
            let msg = format!(
                "expected an array of strings, found {}",
                v.get_ref().type_str()
            );
            self.problem(&join(path, key), Some(v.span()), msg);
            return None;
        };
        let mut out = Vec::new();
        for item in items {
            match item.get_ref() {
                DeValue::String(s) => out.push(s.to_string()),
                other => {
                    let msg = format!("expected strings only, found {}", other.type_str());
                    self.problem(&join(path, key), Some(item.span()), msg);
                }
            }
        }
        Some(out)
    }

    fn string_map(
        &mut self,
        table: &Table<'_>,
        key: &str,
        path: &str,
    ) -> Option<BTreeMap<String, String>> {
        let t = self.table(table, key, path)?;
        let mut out = BTreeMap::new();
        for (k, v) in t.iter() {
            match v.get_ref() {
                DeValue::String(s) => {
                    out.insert(k.get_ref().to_string(), s.to_string());
                }
                other => {
                    let msg = format!("expected a string, found {}", other.type_str());
                    self.problem(&join(&join(path, key), k.get_ref()), Some(v.span()), msg);
                }
            }
        }
        Some(out)
    }

    /// A path from the config, relative to the config file's directory.
    fn path_value(
        &mut self,
        table: &Table<'_>,
        key: &str,
        path: &str,
    ) -> Option<(PathBuf, Range<usize>)> {
        let (s, span) = self.string(table, key, path)?;
        let p = PathBuf::from(&s);
        let resolved = if p.is_relative() {
            self.path.parent().map(|d| d.join(&p)).unwrap_or(p)
        } else {
            p
        };
        Some((resolved, span))
    }

    /// A `*_file` path: like [`Reader::path_value`], but found in
    /// `$CREDENTIALS_DIRECTORY` first (see [`credential_candidates`]); a
    /// file that cannot be found is an error naming the key.
    fn file_value(&mut self, table: &Table<'_>, key: &str, path: &str) -> Option<PathBuf> {
        let (raw, span) = self.string(table, key, path)?;
        let candidates = credential_candidates(&raw, self.path);
        match candidates.iter().find(|c| c.is_file()) {
            Some(found) => Some(found.clone()),
            // A client may run where the file is not (another user, another
            // machine); the path is all it needs, and a missing file is the
            // daemon's problem.
            None if self.mode == Mode::Client => self.path_value(table, key, path).map(|(p, _)| p),
            None => {
                let tried: Vec<String> =
                    candidates.iter().map(|c| c.display().to_string()).collect();
                self.problem(
                    &join(path, key),
                    Some(span),
                    format!(
                        "no such file (looked at {}); check the path",
                        tried.join(", ")
                    ),
                );
                None
            }
        }
    }

    /// A warning when the secret file `raw` names (the candidate that was
    /// read) can be read by users other than its owner.
    fn warn_if_shared(&mut self, raw: &str, key: &str) {
        use std::os::unix::fs::PermissionsExt;
        let read = credential_candidates(raw, self.path)
            .into_iter()
            .find_map(|c| std::fs::metadata(&c).ok().map(|m| (c, m)));
        if let Some((file, meta)) = read {
            let mode = meta.permissions().mode() & 0o777;
            if meta.is_file() && mode & 0o077 != 0 && !is_systemd_credential(&file) {
                self.warnings.push(format!(
                    "{key}: {} can be read by other users (mode {mode:o}); run `chmod 600 {}`",
                    file.display(),
                    file.display()
                ));
            }
        }
    }

    /// Reads a `*_file` secret; relative names are first looked up in
    /// `$CREDENTIALS_DIRECTORY` (systemd `LoadCredential=`), and so are
    /// absolute paths that do not exist, by file name.
    fn secret_file(&mut self, table: &Table<'_>, key: &str, path: &str) -> Option<SecretString> {
        let (raw, span) = self.string(table, key, path)?;
        if self.mode == Mode::Client {
            // Clients never need a secret, and must not fail on one.
            return None;
        }
        match read_secret_file(&raw, self.path) {
            Ok(s) => {
                self.warn_if_shared(&raw, &join(path, key));
                Some(s)
            }
            Err(msg) => {
                self.problem(&join(path, key), Some(span), msg);
                None
            }
        }
    }

    fn config(&mut self, root: &Table<'_>) -> Config {
        self.check_keys(
            root,
            "",
            &[
                "server",
                "storage",
                "refresh",
                "providers",
                "notify",
                "backup",
            ],
        );
        let empty = Table::new();
        let server_t = self.table(root, "server", "").unwrap_or(&empty);
        let server = self.server(server_t);
        let storage_t = self.table(root, "storage", "").unwrap_or(&empty);
        let storage = self.storage(storage_t);
        let refresh_t = self.table(root, "refresh", "").unwrap_or(&empty);
        let refresh = self.refresh(refresh_t);
        let notify_t = self.table(root, "notify", "").unwrap_or(&empty);
        let notify = self.notify(notify_t);
        let backup = self.backup(root, &storage);
        let mut providers = BTreeMap::new();
        let mut sinks = Vec::new();
        if let Some(pt) = self.table(root, "providers", "") {
            for (name, v) in pt.iter() {
                let name_s = name.get_ref().to_string();
                let path = format!("providers.{name_s}");
                if !valid_name(&name_s) {
                    self.problem(
                        &path,
                        Some(name.span()),
                        "provider names are lowercase letters, digits, '_' and '-', starting with a letter or digit, at most 63 characters",
                    );
                }
                let DeValue::Table(t) = v.get_ref() else {
                    self.problem(&path, Some(v.span()), "expected a table [providers.NAME]");
                    continue;
                };
                if let Some(p) = self.provider(&name_s, t, &path, name.span()) {
                    providers.insert(name_s.clone(), p);
                }
                self.sinks(&name_s, t, &path, &mut sinks);
            }
        }
        self.check_sinks(&sinks, &storage);
        if let Some(server) = &server {
            let uses_keap = providers.values().any(|p| p.preset == Preset::Keap);
            if uses_keap && server.tls == TlsConfig::Off {
                let http_public = server
                    .public_url
                    .as_ref()
                    .is_none_or(|u| u.scheme() == "http");
                if http_public {
                    self.warnings.push(
                        "server.public_url is http://: Keap only accepts HTTPS redirect URIs; set server.tls or an https public_url for the real Keap".into(),
                    );
                }
            }
        }
        Config {
            server: server
                .unwrap_or_else(|| ServerConfig::local(DEFAULT_LISTEN.parse().expect("valid"))),
            storage,
            refresh,
            providers,
            notify,
            sinks: sinks.into_iter().map(|(s, _, _)| s).collect(),
            backup,
            warnings: std::mem::take(&mut self.warnings),
        }
    }

    fn server(&mut self, t: &Table<'_>) -> Option<ServerConfig> {
        let p = "server";
        self.check_keys(
            t,
            p,
            &[
                "listen",
                "allow_remote",
                "public_url",
                "tls",
                "api_keys_file",
                "allowed_hosts",
                "proxy_max_wait",
                "header_read_timeout",
                "idle_timeout",
                "max_connections",
            ],
        );
        let listen = match self.string(t, "listen", p) {
            Some((s, span)) => match s.parse::<SocketAddr>() {
                Ok(a) => Some((a, span)),
                Err(_) => {
                    self.problem(
                        "server.listen",
                        Some(span),
                        "expected IP:PORT, e.g. \"127.0.0.1:8787\"",
                    );
                    None
                }
            },
            None => Some((DEFAULT_LISTEN.parse().expect("valid"), 0..0)),
        };
        let allow_remote = self.boolean(t, "allow_remote", p).unwrap_or(false);
        let public_url = self.url(t, "public_url", p);
        let tls = match self.get(t, "tls") {
            None => TlsConfig::Off,
            Some(v) => match v.get_ref() {
                DeValue::String(s) if s == "self-signed" => TlsConfig::SelfSigned,
                DeValue::Table(tt) => {
                    self.check_keys(tt, "server.tls", &["cert_file", "key_file"]);
                    let cert = self.file_value(tt, "cert_file", "server.tls");
                    let key = self.file_value(tt, "key_file", "server.tls");
                    match (cert, key) {
                        (Some(cert_file), Some(key_file)) => TlsConfig::Files {
                            cert_file,
                            key_file,
                        },
                        _ => {
                            self.problem(
                                "server.tls",
                                Some(v.span()),
                                "needs both cert_file and key_file",
                            );
                            TlsConfig::Off
                        }
                    }
                }
                _ => {
                    self.problem(
                        "server.tls",
                        Some(v.span()),
                        "expected \"self-signed\" or { cert_file = \"...\", key_file = \"...\" }",
                    );
                    TlsConfig::Off
                }
            },
        };
        let api_keys_file = self.file_value(t, "api_keys_file", p);
        let mut allowed_hosts = self
            .string_array(t, "allowed_hosts", p)
            .unwrap_or_else(default_allowed_hosts);
        if let Some(u) = &public_url {
            if let Some(h) = u.host_str() {
                allowed_hosts.push(h.to_string());
            }
        }
        let proxy_max_wait = self
            .duration(t, "proxy_max_wait", p)
            .unwrap_or(Duration::from_secs(10));
        let positive =
            |this: &mut Self, key: &str, default: Duration| match this.duration(t, key, p) {
                Some(d) if d.is_zero() => {
                    this.problem(&join(p, key), None, "must be longer than 0s, e.g. \"10s\"");
                    default
                }
                Some(d) => d,
                None => default,
            };
        let header_read_timeout =
            positive(self, "header_read_timeout", DEFAULT_HEADER_READ_TIMEOUT);
        let idle_timeout = positive(self, "idle_timeout", DEFAULT_IDLE_TIMEOUT);
        let max_connections = self
            .count(t, "max_connections", p)
            .unwrap_or(DEFAULT_MAX_CONNECTIONS);
        let (listen, listen_span) = listen?;
        let remote_ok = allow_remote && api_keys_file.is_some();
        // A client may be pointed at a remote daemon.
        if !(listen.ip().is_loopback() || remote_ok || self.mode == Mode::Client) {
            self.problem(
                "server.listen",
                Some(listen_span).filter(|s| s.end > 0),
                format!(
                    "{listen} is not a loopback address; set allow_remote = true and api_keys_file, or listen on 127.0.0.1"
                ),
            );
        }
        Some(ServerConfig {
            listen,
            allow_remote,
            public_url,
            tls,
            api_keys_file,
            allowed_hosts,
            proxy_max_wait,
            header_read_timeout,
            idle_timeout,
            max_connections,
        })
    }

    fn storage(&mut self, t: &Table<'_>) -> StorageConfig {
        let p = "storage";
        self.check_keys(
            t,
            p,
            &["path", "url", "url_file", "encryption_key_file", "history"],
        );
        let path_given = self.path_value(t, "path", p);
        let url = self.storage_url(t, p);
        if let (Some(_), Some((_, key, span))) = (&path_given, &url) {
            self.problem(
                &join(p, key),
                Some(span.clone()),
                format!(
                    "storage.path and storage.{key} cannot both be set: path selects SQLite, {key} selects PostgreSQL; keep one (to move the grants over, see `tokenkeeper migrate-storage`)"
                ),
            );
        }
        let path = path_given.map(|(p, _)| p).unwrap_or_else(default_db_path);
        let encryption_key_file = self.file_value(t, "encryption_key_file", p);
        let history = match self.duration(t, "history", p) {
            Some(d) if d.is_zero() => {
                self.problem(
                    "storage.history",
                    None,
                    "must be longer than 0s, e.g. \"90d\"",
                );
                DEFAULT_HISTORY
            }
            Some(d) if d > MAX_HISTORY => {
                self.problem(
                    "storage.history",
                    None,
                    "must be at most 36500d (100 years), e.g. \"90d\"",
                );
                DEFAULT_HISTORY
            }
            Some(d) => d,
            None => DEFAULT_HISTORY,
        };
        StorageConfig {
            path,
            url: url.map(|(u, _, _)| u),
            encryption_key_file,
            history,
        }
    }

    /// `storage.url` or `storage.url_file` (never both): the URL, the key
    /// it came from and that key's span.
    fn storage_url(
        &mut self,
        t: &Table<'_>,
        p: &str,
    ) -> Option<(SecretString, &'static str, Range<usize>)> {
        let inline = self.string(t, "url", p);
        let span_of_file = self.get(t, "url_file").map(|v| v.span());
        if let (Some((_, span)), Some(_)) = (&inline, &span_of_file) {
            self.problem(
                "storage.url",
                Some(span.clone()),
                "storage.url and storage.url_file cannot both be set; keep one (url_file for a URL with a password)",
            );
            return None;
        }
        let (url, key, span) = match (inline, span_of_file) {
            (Some((u, span)), _) => (SecretString::from(u), "url", span),
            (None, Some(span)) => (self.secret_file(t, "url_file", p)?, "url_file", span),
            (None, None) => return None,
        };
        use secrecy::ExposeSecret;
        if !crate::store::postgres::is_url(url.expose_secret()) {
            self.problem(
                &join(p, key),
                Some(span),
                "must be a PostgreSQL URL: postgres://USER@HOST:PORT/DATABASE (for SQLite, set storage.path instead)",
            );
            return None;
        }
        if key == "url" && crate::store::postgres::has_password(url.expose_secret()) {
            self.warnings.push(
                "storage.url holds a password in the config file, which other users may read; move the URL to a private file named by storage.url_file".into(),
            );
        }
        Some((url, key, span))
    }

    /// `[backup]`: refused with PostgreSQL (the database has its own
    /// backup tools); `schedule` must parse as a cron expression now, not
    /// at the first run; `dir` absolute.
    fn backup(&mut self, root: &Table<'_>, storage: &StorageConfig) -> Option<BackupConfig> {
        let p = "backup";
        let span = self.get(root, p).map(|v| v.span());
        let t = self.table(root, p, "")?;
        self.check_keys(t, p, &["schedule", "dir", "keep"]);
        if storage.url.is_some() {
            self.problem(
                p,
                span,
                "[backup] works with an SQLite store only: with PostgreSQL (storage.url), backups are the database's business (pg_dump, base backups); remove [backup]",
            );
            return None;
        }
        let schedule = match self.string(t, "schedule", p) {
            Some((s, span)) => match crate::backup::check_schedule(&s) {
                Ok(six) => Some(six),
                Err(e) => {
                    self.problem("backup.schedule", Some(span), e);
                    None
                }
            },
            None => {
                self.problem(
                    "backup.schedule",
                    span.clone(),
                    "missing; set a cron expression with seconds, in UTC, e.g. \"0 0 3 * * *\" for 03:00 every day",
                );
                None
            }
        };
        let dir = match self.string(t, "dir", p) {
            Some((d, span)) => {
                let d = PathBuf::from(d);
                if d.is_absolute() {
                    // Client commands run as other users and never write
                    // backups; the daemon and `backup` do.
                    match crate::backup::check_dir(&d) {
                        Err(e) if self.mode == Mode::Daemon => {
                            self.problem("backup.dir", Some(span), e);
                            None
                        }
                        _ => Some(d),
                    }
                } else {
                    self.problem(
                        "backup.dir",
                        Some(span),
                        "must be an absolute path, e.g. \"/var/backups/tokenkeeper\"",
                    );
                    None
                }
            }
            None => {
                self.problem(
                    "backup.dir",
                    span,
                    "missing; set the absolute directory backups go to, e.g. \"/var/backups/tokenkeeper\"",
                );
                None
            }
        };
        let keep = if self.get(t, "keep").is_some() {
            self.count(t, "keep", p)?
        } else {
            DEFAULT_BACKUP_KEEP
        };
        Some(BackupConfig {
            schedule: schedule?,
            dir: dir?,
            keep,
        })
    }

    fn refresh(&mut self, t: &Table<'_>) -> RefreshConfig {
        let p = "refresh";
        self.check_keys(
            t,
            p,
            &[
                "at_fraction",
                "jitter",
                "min_validity",
                "check_interval",
                "retry_initial",
                "retry_max",
                "keepalive",
                "warn_before",
            ],
        );
        let d = RefreshConfig::default();
        let at_fraction = match self.number(t, "at_fraction", p) {
            Some((f, _)) if f > 0.0 && f < 1.0 => f,
            Some((_, span)) => {
                self.problem(
                    "refresh.at_fraction",
                    Some(span),
                    "must be between 0 and 1 (exclusive), e.g. 0.75",
                );
                d.at_fraction
            }
            None => d.at_fraction,
        };
        let nonzero = |r: &mut Self, key: &str, default: Duration| -> Duration {
            let v = r.duration(t, key, p).unwrap_or(default);
            if v.is_zero() {
                let span = r.get(t, key).map(|v| v.span());
                r.problem(&join(p, key), span, "must be greater than zero");
                return default;
            }
            v
        };
        let min_validity = self
            .duration(t, "min_validity", p)
            .unwrap_or(d.min_validity);
        let jitter = self.duration(t, "jitter", p).unwrap_or(d.jitter);
        let check_interval = nonzero(self, "check_interval", d.check_interval);
        let retry_initial = nonzero(self, "retry_initial", d.retry_initial);
        let retry_max = nonzero(self, "retry_max", d.retry_max);
        let keepalive = nonzero(self, "keepalive", d.keepalive);
        let warn_before = self.duration(t, "warn_before", p).unwrap_or(d.warn_before);
        if retry_max < retry_initial {
            let span = self.get(t, "retry_max").map(|v| v.span());
            self.problem(
                "refresh.retry_max",
                span,
                "must not be smaller than refresh.retry_initial",
            );
        }
        RefreshConfig {
            at_fraction,
            jitter,
            min_validity,
            check_interval,
            retry_initial,
            retry_max,
            keepalive,
            warn_before,
        }
    }

    fn notify(&mut self, t: &Table<'_>) -> NotifyConfig {
        self.check_keys(t, "notify", &["command", "webhook_url"]);
        NotifyConfig {
            command: self.path_value(t, "command", "notify").map(|(p, _)| p),
            webhook_url: self.url(t, "webhook_url", "notify"),
        }
    }

    /// `grant`: how the provider's grants come in; an unknown value is a
    /// problem listing the accepted ones (and the default is assumed, so
    /// the rest of the table is still checked).
    fn grant_kind(&mut self, t: &Table<'_>, path: &str) -> GrantKind {
        let Some((s, span)) = self.string(t, "grant", path) else {
            return GrantKind::default();
        };
        match s.as_str() {
            "authorization_code" => GrantKind::AuthorizationCode,
            "client_credentials" => GrantKind::ClientCredentials,
            _ => {
                self.problem(
                    &join(path, "grant"),
                    Some(span),
                    format!("unknown grant \"{s}\"; use {}", GrantKind::NAMES),
                );
                GrantKind::default()
            }
        }
    }

    fn client_auth(&mut self, t: &Table<'_>, key: &str, path: &str) -> Option<ClientAuth> {
        let (s, span) = self.string(t, key, path)?;
        match s.as_str() {
            "body" => Some(ClientAuth::Body),
            "basic" => Some(ClientAuth::Basic),
            "none" => Some(ClientAuth::None),
            _ => {
                self.problem(
                    &join(path, key),
                    Some(span),
                    "expected \"body\", \"basic\" or \"none\"",
                );
                None
            }
        }
    }

    fn provider(
        &mut self,
        name: &str,
        t: &Table<'_>,
        path: &str,
        name_span: Range<usize>,
    ) -> Option<ProviderConfig> {
        self.check_keys(
            t,
            path,
            &[
                "preset",
                "client_id",
                "client_secret",
                "client_secret_file",
                "client_secret_env",
                "authorization_url",
                "token_url",
                "revocation_url",
                "api_base_url",
                "scopes",
                "code_auth",
                "refresh_auth",
                "pkce",
                "extra_authorize_params",
                "default_lifetime",
                "limits",
                "request_timeout",
                "revoke_replaced",
                "refresh_token_lifetime",
                "refresh_token_max_lifetime",
                "issuer",
                "device_authorization_url",
                "tenant",
                "region",
                "sinks",
                "grant",
            ],
        );
        let before = self.problems.len();
        let preset = match self.string(t, "preset", path) {
            Some((s, span)) => Preset::from_name(&s).or_else(|| {
                self.problem(
                    &join(path, "preset"),
                    Some(span),
                    format!("unknown preset \"{s}\"; use one of {}", Preset::names()),
                );
                None
            }),
            None => Some(Preset::Generic),
        };
        let spec = preset.unwrap_or(Preset::Generic).spec();
        let endpoints = self.preset_endpoints(t, path, preset);
        let client_id = self.string(t, "client_id", path).map(|(s, _)| s);
        if client_id.as_deref().is_none_or(str::is_empty) && self.get(t, "client_id").is_none() {
            self.problem(
                &join(path, "client_id"),
                Some(name_span.clone()),
                "missing; set client_id to the id of your OAuth client registration",
            );
        }
        let grant = self.grant_kind(t, path);
        let code_auth = self.client_auth(t, "code_auth", path);
        let refresh_auth = self.client_auth(t, "refresh_auth", path);
        let code_auth = code_auth.unwrap_or(spec.code_auth);
        // A generic provider refreshes the way it exchanges codes unless
        // told otherwise; presets know better.
        let refresh_auth = refresh_auth.unwrap_or(if spec.preset == Preset::Generic {
            code_auth
        } else {
            spec.refresh_auth
        });
        let public = code_auth == ClientAuth::None && refresh_auth == ClientAuth::None;
        if grant == GrantKind::ClientCredentials && refresh_auth == ClientAuth::None {
            let span = self
                .get(t, "refresh_auth")
                .or_else(|| self.get(t, "grant"))
                .map(|v| v.span());
            self.problem(
                &join(path, "refresh_auth"),
                span,
                "grant = \"client_credentials\" authenticates the client itself, so it needs a client secret: set refresh_auth to \"basic\" or \"body\" (how the token endpoint wants client_id and client_secret)",
            );
        }

        let secret_keys: Vec<&str> = ["client_secret", "client_secret_file", "client_secret_env"]
            .into_iter()
            .filter(|k| t.get(*k).is_some())
            .collect();
        if secret_keys.len() > 1 {
            let span = self.get(t, secret_keys[1]).map(|v| v.span());
            self.problem(
                &join(path, secret_keys[1]),
                span,
                format!("give only one of {}", secret_keys.join(", ")),
            );
        }
        let client_secret = if t.get("client_secret_file").is_some() {
            self.secret_file(t, "client_secret_file", path)
        } else if let Some((var, span)) = self.string(t, "client_secret_env", path) {
            match std::env::var(&var) {
                _ if self.mode == Mode::Client => None,
                Ok(v) if !v.is_empty() => Some(SecretString::from(v)),
                _ => {
                    self.problem(
                        &join(path, "client_secret_env"),
                        Some(span),
                        format!("environment variable {var} is not set or empty; export it before starting"),
                    );
                    None
                }
            }
        } else if let Some((s, _)) = self.string(t, "client_secret", path) {
            self.warnings.push(format!(
                "{path}.client_secret is written in the config file; prefer client_secret_file or client_secret_env"
            ));
            Some(SecretString::from(s))
        } else {
            None
        };
        if client_secret.is_none() && !public && secret_keys.is_empty() && self.mode == Mode::Daemon
        {
            self.problem(
                &join(path, "client_secret_file"),
                Some(name_span.clone()),
                "missing client secret; set client_secret_file or client_secret_env (or code_auth = refresh_auth = \"none\" for a public client)",
            );
        }

        let issuer = self.issuer(t, path);
        let preset_name = spec.name;
        let required_url = |r: &mut Self, key: &str, default: &Option<String>| -> Option<Url> {
            if r.get(t, key).is_some() {
                return r.url(t, key, path);
            }
            if let Some(d) = default {
                return Url::parse(d).ok();
            }
            if let Some(issuer) = &issuer {
                // Filled by discovery before any request (see the field doc).
                return Some(issuer.clone());
            }
            // With an unknown preset, that is the problem to report.
            preset?;
            r.problem(
                &join(path, key),
                Some(name_span.clone()),
                format!(
                    "missing; preset \"{preset_name}\" needs {key}, or issuer = \"https://...\" to discover it"
                ),
            );
            None
        };
        let explicit = ExplicitEndpoints {
            authorization_url: t.get("authorization_url").is_some(),
            token_url: t.get("token_url").is_some(),
            revocation_url: t.get("revocation_url").is_some(),
            device_authorization_url: t.get("device_authorization_url").is_some(),
        };
        let preset_url = |u: &Option<String>| u.as_deref().and_then(|u| Url::parse(u).ok());
        let token_url = required_url(self, "token_url", &endpoints.token_url);
        // The client-credentials grant never sends anyone to an
        // authorization page; without one configured, the field holds the
        // token endpoint, which no authorization request is built for.
        let authorization_url = if grant == GrantKind::ClientCredentials
            && t.get("authorization_url").is_none()
            && endpoints.authorization_url.is_none()
            && issuer.is_none()
        {
            token_url.clone()
        } else {
            required_url(self, "authorization_url", &endpoints.authorization_url)
        };
        let revocation_url = if explicit.revocation_url {
            self.url(t, "revocation_url", path)
        } else {
            preset_url(&endpoints.revocation_url)
        };
        let device_authorization_url = if explicit.device_authorization_url {
            self.url(t, "device_authorization_url", path)
        } else {
            preset_url(&endpoints.device_authorization_url)
        };
        let api_base_url = if t.get("api_base_url").is_some() {
            self.base_url(t, "api_base_url", path)
        } else {
            preset_url(&endpoints.api_base_url)
        };
        let scopes = self.scopes(t, path, spec);
        let pkce = self.boolean(t, "pkce", path).unwrap_or(true);
        // The preset's offline-access parameters, then the file's: a key
        // the file sets itself wins.
        let mut extra_authorize_params: BTreeMap<String, String> = spec
            .offline_params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        extra_authorize_params.extend(
            self.string_map(t, "extra_authorize_params", path)
                .unwrap_or_default(),
        );
        let default_lifetime = self
            .duration(t, "default_lifetime", path)
            .unwrap_or(spec.default_lifetime);
        let request_timeout = match self.duration(t, "request_timeout", path) {
            // The stop budget (daemon::shutdown_grace) is a multiple of it,
            // and a provider that needs minutes to answer is down.
            Some(d) if !(MIN_REQUEST_TIMEOUT..=MAX_REQUEST_TIMEOUT).contains(&d) => {
                let span = self.string(t, "request_timeout", path).map(|(_, s)| s);
                self.problem(
                    &join(path, "request_timeout"),
                    span,
                    format!(
                        "must be between {}s and {}s; a token endpoint slower than that is treated as down",
                        MIN_REQUEST_TIMEOUT.as_secs(),
                        MAX_REQUEST_TIMEOUT.as_secs()
                    ),
                );
                Duration::from_secs(30)
            }
            Some(d) => d,
            None => Duration::from_secs(30),
        };
        let revoke_replaced = self
            .boolean(t, "revoke_replaced", path)
            .unwrap_or(spec.revoke_replaced);
        let refresh_token_lifetime = self.refresh_token_lifetime(t, path, spec);
        let mut limits = spec.limits;
        if let Some(lt) = self.table(t, "limits", path) {
            let lp = join(path, "limits");
            self.check_keys(lt, &lp, &["per_second", "per_minute", "per_day"]);
            if lt.get("per_second").is_some() {
                limits.per_second = self.count(lt, "per_second", &lp);
            }
            if lt.get("per_minute").is_some() {
                limits.per_minute = self.count(lt, "per_minute", &lp);
            }
            if lt.get("per_day").is_some() {
                limits.per_day = self.count(lt, "per_day", &lp);
            }
        }
        if self.problems.len() != before {
            return None;
        }
        Some(ProviderConfig {
            name: name.to_string(),
            preset: preset?,
            client_id: client_id?,
            client_secret: if public { None } else { client_secret },
            authorization_url: authorization_url?,
            token_url: token_url?,
            revocation_url,
            api_base_url,
            scopes,
            code_auth,
            refresh_auth,
            pkce,
            extra_authorize_params,
            default_lifetime,
            limits,
            request_timeout,
            revoke_replaced,
            device_authorization_url,
            issuer,
            explicit,
            scope_delimiter: spec.scope_delimiter,
            rotation: spec.rotation,
            refresh_token_lifetime,
            grant,
        })
    }

    /// `refresh_token_lifetime` (rolling: restarted by each refresh) and
    /// `refresh_token_max_lifetime` (a hard cap from the authorization),
    /// each replacing the preset's value; `"0s"` says there is none.
    fn refresh_token_lifetime(
        &mut self,
        t: &Table<'_>,
        path: &str,
        spec: &crate::provider::presets::PresetSpec,
    ) -> RefreshTokenLifetime {
        let mut lifetime = spec.refresh_token_lifetime;
        let nonzero = |d: Duration| (!d.is_zero()).then_some(d);
        if let Some(d) = self.duration(t, "refresh_token_lifetime", path) {
            lifetime.idle = nonzero(d);
        }
        if let Some(d) = self.duration(t, "refresh_token_max_lifetime", path) {
            lifetime.max = nonzero(d);
        }
        lifetime
    }

    /// The preset's endpoints with its parameter (`tenant`, `region`)
    /// substituted; a parameter key the preset does not read, or a value
    /// it does not accept, is a problem naming the key and what is.
    fn preset_endpoints(
        &mut self,
        t: &Table<'_>,
        path: &str,
        preset: Option<Preset>,
    ) -> crate::provider::presets::Endpoints {
        let Some(preset) = preset else {
            return Default::default();
        };
        let spec = preset.spec();
        for key in ["tenant", "region"] {
            let Some(v) = self.get(t, key) else { continue };
            if spec.parameter.map(|p| p.key) != Some(key) {
                let owner = crate::provider::presets::PRESETS
                    .iter()
                    .find(|s| s.parameter.is_some_and(|p| p.key == key))
                    .map_or("", |s| s.name);
                let span = v.span();
                self.problem(
                    &join(path, key),
                    Some(span),
                    format!(
                        "only preset = \"{owner}\" reads {key}; remove it (this provider's preset is \"{}\")",
                        spec.name
                    ),
                );
            }
        }
        let value = spec
            .parameter
            .and_then(|p| self.string(t, p.key, path).map(|v| (p.key, v)));
        match spec.endpoints(value.as_ref().map(|(_, (v, _))| v.as_str())) {
            Ok(e) => e,
            Err(msg) => {
                if let Some((key, (_, span))) = value {
                    self.problem(&join(path, key), Some(span), msg);
                }
                Default::default()
            }
        }
    }

    /// `scopes`, or the preset's; a scope without which the preset's
    /// provider issues no refresh token is added when missing, with a
    /// warning, since a grant that cannot be renewed is useless here.
    fn scopes(
        &mut self,
        t: &Table<'_>,
        path: &str,
        spec: &crate::provider::presets::PresetSpec,
    ) -> Vec<String> {
        let Some(mut scopes) = self.string_array(t, "scopes", path) else {
            return spec.scopes.iter().map(|s| s.to_string()).collect();
        };
        for needed in spec.offline_scopes {
            if !scopes.iter().any(|s| s == needed) {
                self.warnings.push(format!(
                    "{path}.scopes lacks \"{needed}\", without which {} issues no refresh token; it is added",
                    spec.name
                ));
                scopes.push(needed.to_string());
            }
        }
        scopes
    }

    /// `issuer`: an http(s) URL without query or fragment (RFC 8414 2).
    fn issuer(&mut self, t: &Table<'_>, path: &str) -> Option<Url> {
        let u = self.url(t, "issuer", path)?;
        if u.query().is_some() || u.fragment().is_some() {
            let span = self.get(t, "issuer").map(|v| v.span());
            self.problem(
                &join(path, "issuer"),
                span,
                "must not contain a query or a fragment; use the issuer URL exactly as the provider publishes it",
            );
            return None;
        }
        Some(u)
    }
}

/// Bounds of `request_timeout` (one token-endpoint call).
pub const MIN_REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
/// See [`MIN_REQUEST_TIMEOUT`]; the stop budget is a multiple of it.
pub const MAX_REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// Where a `*_file` value may be: relative names in
/// `$CREDENTIALS_DIRECTORY` (systemd `LoadCredential=`) first, then next to
/// the config file; absolute paths as given, then by file name in
/// `$CREDENTIALS_DIRECTORY`.
pub fn credential_candidates(raw: &str, config_path: &Path) -> Vec<PathBuf> {
    let p = PathBuf::from(raw);
    let creds = std::env::var_os("CREDENTIALS_DIRECTORY")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    let mut candidates = Vec::new();
    if p.is_relative() {
        if let Some(c) = &creds {
            candidates.push(c.join(&p));
        }
        candidates.push(
            config_path
                .parent()
                .map(|d| d.join(&p))
                .unwrap_or_else(|| p.clone()),
        );
    } else {
        candidates.push(p.clone());
        if let (Some(c), Some(name)) = (&creds, p.file_name()) {
            candidates.push(c.join(name));
        }
    }
    candidates
}

/// Whether `file` is a credential systemd delivered (`LoadCredential=`,
/// `LoadCredentialEncrypted=`): it lies in `$CREDENTIALS_DIRECTORY`, and
/// that directory lets no other user in. Such a file's mode says nothing
/// about who can read it: systemd grants the service user read access
/// through an ACL, so `stat` shows the ACL mask in the group bits (0440)
/// though no group can read it, and the file is read-only, so `chmod`
/// could not change it anyway.
pub fn is_systemd_credential(file: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let Some(creds) = std::env::var_os("CREDENTIALS_DIRECTORY").filter(|v| !v.is_empty()) else {
        return false;
    };
    let creds = Path::new(&creds);
    file.parent() == Some(creds)
        && std::fs::metadata(creds).is_ok_and(|m| m.is_dir() && m.permissions().mode() & 0o007 == 0)
}

/// Largest secret file read: a secret is a line, and a path such as
/// `/dev/zero` must end in an error, not fill the memory.
const MAX_SECRET_FILE: u64 = 64 * 1024;

/// Reads a text file of at most `limit` bytes.
fn read_bounded(path: &Path, limit: u64) -> std::io::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(limit + 1)
        .read_to_string(&mut text)?;
    if text.len() as u64 > limit {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {limit} bytes, so not a secret file"),
        ));
    }
    Ok(text)
}

/// Resolves and reads a secret file (as `Reader::secret_file` does).
pub fn read_secret_file(raw: &str, config_path: &Path) -> Result<SecretString, String> {
    let candidates = credential_candidates(raw, config_path);
    let mut last_err = None;
    for c in &candidates {
        match read_bounded(c, MAX_SECRET_FILE) {
            Ok(s) => {
                let s = s.trim_end_matches(['\n', '\r']).to_string();
                if s.is_empty() {
                    return Err(format!("{} is empty; put the secret in it", c.display()));
                }
                return Ok(SecretString::from(s));
            }
            Err(e) => last_err = Some((c.clone(), e)),
        }
    }
    let (c, e) = last_err.expect("at least one candidate");
    Err(format!(
        "cannot read {} ({e}); check the path and that this user may read it",
        c.display()
    ))
}

/// A sink as read, with its key (`providers.NAME.sinks[i]`) and the span
/// of its `path`, for the checks across sinks.
type ReadSink = (crate::sinks::SinkConfig, String, Range<usize>);

impl Reader<'_> {
    /// `[[providers.NAME.sinks]]` (SPEC 12): each checked on its own here;
    /// the checks across sinks and against storage are in
    /// [`Reader::check_sinks`].
    fn sinks(&mut self, provider: &str, t: &Table<'_>, path: &str, out: &mut Vec<ReadSink>) {
        use crate::sinks::{self, SinkConfig, SinkFormat};
        let Some(v) = self.get(t, "sinks") else {
            return;
        };
        let DeValue::Array(items) = v.get_ref() else {
            let msg = format!(
                "expected [[{path}.sinks]] tables, found {}",
                v.get_ref().type_str()
            );
            self.problem(&join(path, "sinks"), Some(v.span()), msg);
            return;
        };
        for (i, item) in items.iter().enumerate() {
            let key = format!("{path}.sinks[{i}]");
            let DeValue::Table(st) = item.get_ref() else {
                self.problem(&key, Some(item.span()), "expected a table [[...sinks]]");
                continue;
            };
            let before = self.problems.len();
            self.check_keys(
                st,
                &key,
                &[
                    "path",
                    "format",
                    "mode",
                    "group",
                    "command",
                    "command_timeout",
                    "account",
                ],
            );
            let file = match self.string(st, "path", &key) {
                Some((raw, span)) if Path::new(&raw).is_absolute() => {
                    Some((PathBuf::from(raw), span))
                }
                Some((raw, span)) => {
                    self.problem(
                        &join(&key, "path"),
                        Some(span),
                        format!("\"{raw}\" is relative; give the token file's absolute path, e.g. \"/run/myapp/keap-token\""),
                    );
                    None
                }
                None => {
                    if self.get(st, "path").is_none() {
                        self.problem(
                            &join(&key, "path"),
                            Some(item.span()),
                            "missing; set path to the absolute path of the token file to write",
                        );
                    }
                    None
                }
            };
            let format = match self.string(st, "format", &key) {
                Some((f, span)) => SinkFormat::from_name(&f).or_else(|| {
                    self.problem(
                        &join(&key, "format"),
                        Some(span),
                        format!("unknown format \"{f}\"; use one of {}", SinkFormat::NAMES),
                    );
                    None
                }),
                None => Some(SinkFormat::Token),
            };
            let mode = match self.get(st, "mode") {
                None => 0o600,
                Some(m) => match m.get_ref() {
                    DeValue::String(ms) => {
                        match sinks::parse_mode(ms).and_then(|m| sinks::check_mode(m).map(|()| m)) {
                            Ok(m) => m,
                            Err(e) => {
                                self.problem(&join(&key, "mode"), Some(m.span()), e);
                                0o600
                            }
                        }
                    }
                    other => {
                        let msg = format!("expected an octal string such as \"0640\", found {} (a bare number would be read as decimal)", other.type_str());
                        self.problem(&join(&key, "mode"), Some(m.span()), msg);
                        0o600
                    }
                },
            };
            let group = match self.get(st, "group") {
                None => None,
                Some(g) => {
                    let name = match g.get_ref() {
                        DeValue::String(n) => Some(n.to_string()),
                        DeValue::Integer(n) => Some(n.as_str().replace('_', "")),
                        _ => None,
                    };
                    match name.map(|n| sinks::resolve_group(&n)) {
                        Some(Ok(gid)) => Some(gid),
                        Some(Err(e)) => {
                            self.problem(&join(&key, "group"), Some(g.span()), e);
                            None
                        }
                        None => {
                            self.problem(
                                &join(&key, "group"),
                                Some(g.span()),
                                "expected a group name or gid, e.g. \"www-data\"",
                            );
                            None
                        }
                    }
                }
            };
            let command = self.sink_command(st, &key);
            let command_timeout = match self.duration(st, "command_timeout", &key) {
                Some(d) if d.is_zero() || d > Duration::from_secs(3600) => {
                    let span = self.get(st, "command_timeout").map(|v| v.span());
                    self.problem(
                        &join(&key, "command_timeout"),
                        span,
                        "must be between 1s and 1h, e.g. \"30s\"",
                    );
                    sinks::DEFAULT_COMMAND_TIMEOUT
                }
                Some(d) => d,
                None => sinks::DEFAULT_COMMAND_TIMEOUT,
            };
            let account = match self.string(st, "account", &key) {
                Some((a, span)) if !valid_account(&a) => {
                    self.problem(
                        &join(&key, "account"),
                        Some(span),
                        format!("\"{a}\" is not an account name: lowercase letters, digits, '_' and '-', at most 63 characters, not \"refresh\""),
                    );
                    None
                }
                Some((a, _)) => Some(a),
                None => Some("default".to_string()),
            };
            if self.problems.len() != before {
                continue;
            }
            if let (Some((path, span)), Some(format), Some(account)) = (file, format, account) {
                out.push((
                    SinkConfig {
                        provider: provider.to_string(),
                        account,
                        path,
                        format,
                        mode,
                        group,
                        command,
                        command_timeout,
                    },
                    key,
                    span,
                ));
            }
        }
    }

    /// A sink's `command`: a program (string) or a program and its
    /// arguments (array); never a shell line.
    fn sink_command(&mut self, st: &Table<'_>, key: &str) -> Option<Vec<String>> {
        let v = self.get(st, "command")?;
        let argv = match v.get_ref() {
            DeValue::String(s) => vec![s.to_string()],
            DeValue::Array(_) => self.string_array(st, "command", key)?,
            other => {
                let msg = format!(
                    "expected a program path or an array [program, arguments...], found {}",
                    other.type_str()
                );
                self.problem(&join(key, "command"), Some(v.span()), msg);
                return None;
            }
        };
        let Some(program) = argv.first().filter(|p| !p.is_empty()) else {
            self.problem(
                &join(key, "command"),
                Some(v.span()),
                "is empty; name the program to run, or remove command",
            );
            return None;
        };
        let p = Path::new(program);
        if self.mode == Mode::Daemon && program.contains('/') && !p.is_file() {
            let hint = if program.contains(' ') {
                "; no shell runs it: to pass arguments, write command = [\"/path/to/program\", \"arg\", ...]"
            } else {
                ""
            };
            self.problem(
                &join(key, "command"),
                Some(v.span()),
                format!("no such program {program}{hint}"),
            );
            return None;
        }
        Some(argv)
    }

    /// Checks across sinks and against storage: no two sinks share a path,
    /// none is inside the state directory (beside the database, where a
    /// stray file could be taken for state, or state for a token file), and,
    /// for the daemon, the path is not a symbolic link and its directory
    /// exists.
    fn check_sinks(&mut self, sinks: &[ReadSink], storage: &StorageConfig) {
        // The nearest existing ancestor resolved, the rest kept as written,
        // so links in either path cannot hide that one is inside the other.
        let canonical = |p: &Path| {
            let mut rest = Vec::new();
            let mut at = p;
            loop {
                if let Ok(real) = std::fs::canonicalize(at) {
                    return rest.iter().rev().fold(real, |acc: PathBuf, n| acc.join(n));
                }
                match (at.parent(), at.file_name()) {
                    (Some(parent), Some(name)) => {
                        rest.push(name.to_os_string());
                        at = parent;
                    }
                    _ => return p.to_path_buf(),
                }
            }
        };
        let mut state_dirs: Vec<PathBuf> = Vec::new();
        if storage.url.is_none() {
            if let Some(d) = storage.path.parent().filter(|d| !d.as_os_str().is_empty()) {
                state_dirs.push(canonical(d));
            }
        }
        if let Some(dirs) = std::env::var_os("STATE_DIRECTORY") {
            state_dirs.extend(std::env::split_paths(&dirs).map(|d| canonical(&d)));
        }
        let mut seen: Vec<(PathBuf, &str)> = Vec::new();
        for (sink, key, span) in sinks {
            let pkey = join(key, "path");
            let path = &sink.path;
            let dir = path.parent().unwrap_or(Path::new("/"));
            let real_dir = canonical(dir);
            let real = path
                .file_name()
                .map_or(real_dir.clone(), |n| real_dir.join(n));
            if let Some((_, other)) = seen.iter().find(|(p, _)| *p == real) {
                self.problem(
                    &pkey,
                    Some(span.clone()),
                    format!(
                        "{} is also the path of {other}; each token file needs its own path",
                        path.display()
                    ),
                );
                continue;
            }
            seen.push((real.clone(), key));
            if let Some(d) = state_dirs.iter().find(|d| real_dir.starts_with(d)) {
                self.problem(
                    &pkey,
                    Some(span.clone()),
                    format!(
                        "{} is inside the state directory {} (beside the database); put token files elsewhere, e.g. under /run/NAME/",
                        path.display(),
                        d.display()
                    ),
                );
                continue;
            }
            if self.mode != Mode::Daemon {
                continue;
            }
            if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
                self.problem(
                    &pkey,
                    Some(span.clone()),
                    format!("{} is a symbolic link; token files are never written through links; remove the link or give the real path", path.display()),
                );
            } else if path.is_dir() {
                self.problem(
                    &pkey,
                    Some(span.clone()),
                    format!(
                        "{} is a directory; give the path of the token file itself",
                        path.display()
                    ),
                );
            } else if !dir.is_dir() {
                self.problem(
                    &pkey,
                    Some(span.clone()),
                    format!("the directory {} does not exist; create it (writable by this service's user) or fix the path", dir.display()),
                );
            } else if std::fs::metadata(dir).is_ok_and(|m| {
                use std::os::unix::fs::PermissionsExt;
                m.permissions().mode() & 0o002 != 0
            }) {
                // Anyone could put a file of their own at the path first
                // (a sticky directory then refuses our rename), and the
                // program reading it would take that file for the token.
                self.problem(
                    &pkey,
                    Some(span.clone()),
                    format!("the directory {} is writable by every user, so another user could put a file of their own at this path; use a directory only this service's user (and the reading program's group) can write", dir.display()),
                );
            }
        }
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endless_files_are_refused_not_read_forever() {
        let err = read_secret_file("/dev/zero", Path::new("/tmp/t.toml")).unwrap_err();
        assert!(err.contains("not a secret file"), "{err}");
        let err = load(Path::new("/dev/zero")).unwrap_err().to_string();
        assert!(err.contains("larger than"), "{err}");
    }

    #[test]
    fn request_timeout_is_bounded_and_revoke_replaced_read() {
        let provider = |extra: &str| {
            format!("[providers.keap]\npreset = \"keap\"\nclient_id = \"id\"\nclient_secret = \"s\"\n{extra}\n")
        };
        let path = Path::new("/tmp/t.toml");
        for bad in ["0s", "500ms", "121s", "1d"] {
            let err = parse(&provider(&format!("request_timeout = \"{bad}\"")), path)
                .err()
                .unwrap_or_else(|| panic!("request_timeout = {bad} was accepted"));
            let text = err.to_string();
            assert!(
                text.contains("providers.keap.request_timeout") && text.contains("between"),
                "{text}"
            );
        }
        let ok = parse(
            &provider("request_timeout = \"120s\"\nrevoke_replaced = false"),
            path,
        )
        .unwrap();
        assert_eq!(
            ok.providers["keap"].request_timeout,
            Duration::from_secs(120)
        );
        assert!(!ok.providers["keap"].revoke_replaced);
        assert!(parse(&provider(""), path).unwrap().providers["keap"].revoke_replaced);
    }

    #[test]
    fn refresh_token_lifetimes_replace_the_presets_and_warn_before_is_read() {
        let path = Path::new("/tmp/t.toml");
        let with = |extra: &str, refresh: &str| {
            format!("[refresh]\n{refresh}\n[providers.qbo]\npreset = \"intuit\"\nclient_id = \"id\"\nclient_secret = \"s\"\n{extra}\n")
        };
        let day = |d: u64| Some(Duration::from_secs(d * 86_400));
        let c = parse(&with("", ""), path).unwrap();
        assert_eq!(c.providers["qbo"].refresh_token_lifetime.idle, day(100));
        assert_eq!(c.providers["qbo"].refresh_token_lifetime.max, day(5 * 365));
        assert_eq!(c.refresh.warn_before, Duration::from_secs(7 * 86_400));
        let c = parse(
            &with(
                "refresh_token_lifetime = \"30d\"\nrefresh_token_max_lifetime = \"0s\"",
                "warn_before = \"2d\"",
            ),
            path,
        )
        .unwrap();
        assert_eq!(c.providers["qbo"].refresh_token_lifetime.idle, day(30));
        assert_eq!(c.providers["qbo"].refresh_token_lifetime.max, None);
        assert_eq!(c.refresh.warn_before, Duration::from_secs(2 * 86_400));
        let Err(err) = parse(&with("refresh_token_lifetime = \"soon\"", ""), path) else {
            panic!("a bad duration is refused");
        };
        assert!(
            err.to_string()
                .contains("providers.qbo.refresh_token_lifetime"),
            "{err}"
        );
    }

    fn problems(text: &str) -> Vec<ConfigProblem> {
        match parse(text, Path::new("/tmp/t.toml")) {
            Ok(_) => Vec::new(),
            Err(e) => e.problems,
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(
            parse_duration("30d").unwrap(),
            Duration::from_secs(30 * 86400)
        );
        assert!(parse_duration("30").is_err());
        assert!(parse_duration("m").is_err());
        assert!(parse_duration("5 weeks").is_err());
        // An operator's "forever" is a sentence, not an overflow later.
        assert!(parse_duration("36500d").is_ok());
        let e = parse_duration("99999999d").unwrap_err();
        assert!(e.contains("36500d"), "{e}");
    }

    #[test]
    fn names() {
        assert!(valid_name("keap"));
        assert!(valid_name("a-b_9"));
        assert!(!valid_name("Keap"));
        assert!(!valid_name("-x"));
        assert!(!valid_name(&"a".repeat(64)));
        assert!(!valid_account("refresh"));
    }

    #[test]
    fn grant_is_authorization_code_by_default_and_client_credentials_needs_no_authorization_url() {
        let generic = |extra: &str| {
            format!("[providers.m2m]\nclient_id = \"id\"\nclient_secret = \"s\"\ntoken_url = \"https://id.example/token\"\n{extra}")
        };
        let path = Path::new("/tmp/t.toml");
        // Without the grant, a generic provider needs its authorization page.
        let p = problems(&generic(""));
        assert!(
            p.iter().any(|p| p.key == "providers.m2m.authorization_url"),
            "{p:?}"
        );
        let cfg = parse(&generic("grant = \"client_credentials\""), path).unwrap();
        let m2m = &cfg.providers["m2m"];
        assert_eq!(m2m.grant, GrantKind::ClientCredentials);
        assert!(m2m
            .authorization_refusal()
            .is_some_and(|w| w.contains("m2m")));
        let cfg = parse(
            &generic(
                "grant = \"authorization_code\"\nauthorization_url = \"https://id.example/a\"",
            ),
            path,
        )
        .unwrap();
        assert_eq!(cfg.providers["m2m"].grant, GrantKind::AuthorizationCode);
        assert!(cfg.providers["m2m"].authorization_refusal().is_none());
    }

    #[test]
    fn a_bad_grant_is_a_problem_naming_the_key_the_line_and_the_values() {
        let text = "[providers.m2m]\nclient_id = \"id\"\nclient_secret = \"s\"\ntoken_url = \"https://id.example/token\"\ngrant = \"password\"\n";
        let p = problems(text);
        assert_eq!(p[0].key, "providers.m2m.grant", "{p:?}");
        assert_eq!(p[0].line, Some(5));
        assert!(p[0].message.contains("\"client_credentials\""), "{p:?}");
        assert!(p[0].message.contains("\"authorization_code\""), "{p:?}");
        let p = problems(&text.replace("\"password\"", "true"));
        assert_eq!(p[0].key, "providers.m2m.grant", "{p:?}");
        // A public client has no credentials to grant with.
        let public = text.replace(
            "grant = \"password\"",
            "grant = \"client_credentials\"\ncode_auth = \"none\"\nrefresh_auth = \"none\"",
        );
        let p = problems(&public);
        assert!(
            p.iter().any(|p| p.key == "providers.m2m.refresh_auth"
                && p.line == Some(7)
                && p.message.contains("client secret")),
            "{p:?}"
        );
    }

    #[test]
    fn keap_preset_fills_endpoints_and_limits() {
        let cfg = parse(
            "[providers.keap]\npreset = \"keap\"\nclient_id = \"id\"\nclient_secret = \"s\"\n",
            Path::new("/tmp/t.toml"),
        )
        .unwrap();
        let p = &cfg.providers["keap"];
        assert_eq!(p.token_url.as_str(), "https://api.infusionsoft.com/token");
        assert_eq!(p.code_auth, ClientAuth::Body);
        assert_eq!(p.refresh_auth, ClientAuth::Basic);
        assert_eq!(p.limits.per_second, Some(25));
        assert_eq!(p.scopes, vec!["full".to_string()]);
        assert!(cfg.warnings.iter().any(|w| w.contains("client_secret")));
    }

    #[test]
    fn secret_files_others_can_read_are_warned_about() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("tk.toml");
        let write = |name: &str, text: &str, mode: u32| {
            let f = dir.path().join(name);
            std::fs::write(&f, text).unwrap();
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        write("pg-url", "postgres://tk:s3cret@db.example/tk\n", 0o644);
        write("secret", "s3cret\n", 0o640);
        let text = "[storage]\nurl_file = \"pg-url\"\n[providers.p]\nclient_id = \"id\"\nclient_secret_file = \"secret\"\ntoken_url = \"https://id.example/t\"\nauthorization_url = \"https://id.example/a\"\n";
        let warnings = parse(text, &config).unwrap().warnings;
        for key in ["storage.url_file", "providers.p.client_secret_file"] {
            assert!(
                warnings
                    .iter()
                    .any(|w| w.starts_with(key) && w.contains("chmod 600")),
                "{key}: {warnings:?}"
            );
        }
        assert!(
            !warnings.iter().any(|w| w.contains("s3cret")),
            "{warnings:?}"
        );
        write("pg-url", "postgres://tk:s3cret@db.example/tk\n", 0o600);
        write("secret", "s3cret\n", 0o400);
        let warnings = parse(text, &config).unwrap().warnings;
        assert!(
            !warnings.iter().any(|w| w.contains("chmod")),
            "{warnings:?}"
        );
    }

    #[test]
    fn a_password_written_in_storage_url_is_warned_about() {
        let warned = |url: &str| {
            parse(
                &format!("[storage]\nurl = \"{url}\"\n"),
                Path::new("/tmp/t.toml"),
            )
            .unwrap()
            .warnings
            .iter()
            .any(|w| w.contains("storage.url holds a password") && !w.contains("s3cret"))
        };
        assert!(warned("postgres://tk:s3cret@db.example/tk"));
        assert!(warned("postgres://tk@db.example/tk?password=s3cret"));
        assert!(!warned("postgres://tk@db.example/tk"));
        assert!(!warned("postgres://tk@db.example/tk?sslmode=require"));
    }

    fn provider_with(preset: &str, extra: &str) -> String {
        format!("[providers.p]\npreset = \"{preset}\"\nclient_id = \"id\"\nclient_secret = \"s\"\n{extra}\n")
    }

    #[test]
    fn every_preset_resolves_with_only_its_client() {
        for spec in crate::provider::presets::PRESETS {
            if spec.preset == Preset::Generic {
                continue;
            }
            let cfg = parse(&provider_with(spec.name, ""), Path::new("/tmp/t.toml"))
                .unwrap_or_else(|e| panic!("{}: {e}", spec.name));
            let p = &cfg.providers["p"];
            assert_eq!(p.preset, spec.preset);
            assert_eq!(p.code_auth, spec.code_auth, "{}", spec.name);
            assert_eq!(p.refresh_auth, spec.refresh_auth, "{}", spec.name);
            assert_eq!(p.limits, spec.limits, "{}", spec.name);
            assert_eq!(p.rotation, spec.rotation, "{}", spec.name);
            assert_eq!(p.default_lifetime, spec.default_lifetime, "{}", spec.name);
            for (k, v) in spec.offline_params {
                assert_eq!(
                    p.extra_authorize_params.get(*k).map(String::as_str),
                    Some(*v)
                );
            }
            assert_eq!(p.issuer, None);
        }
    }

    #[test]
    fn explicit_keys_win_over_the_preset() {
        let cfg = parse(
            &provider_with(
                "google",
                "token_url = \"http://127.0.0.1:9/token\"\nscopes = [\"https://www.googleapis.com/auth/drive\"]\nextra_authorize_params = { prompt = \"select_account\" }\nrefresh_auth = \"basic\"\nrevoke_replaced = true",
            ),
            Path::new("/tmp/t.toml"),
        )
        .unwrap();
        let p = &cfg.providers["p"];
        assert_eq!(p.token_url.as_str(), "http://127.0.0.1:9/token");
        assert_eq!(
            p.authorization_url.as_str(),
            "https://accounts.google.com/o/oauth2/v2/auth"
        );
        assert_eq!(
            p.scopes,
            vec!["https://www.googleapis.com/auth/drive".to_string()]
        );
        assert_eq!(p.extra_authorize_params["prompt"], "select_account");
        assert_eq!(p.extra_authorize_params["access_type"], "offline");
        assert_eq!(p.refresh_auth, ClientAuth::Basic);
        assert_eq!(p.code_auth, ClientAuth::Body);
        assert!(p.revoke_replaced);
        // Microsoft without offline_access would never get a refresh token.
        let cfg = parse(
            &provider_with(
                "microsoft",
                "scopes = [\"Mail.Read\"]\ntenant = \"organizations\"",
            ),
            Path::new("/tmp/t.toml"),
        )
        .unwrap();
        let p = &cfg.providers["p"];
        assert_eq!(
            p.scopes,
            vec!["Mail.Read".to_string(), "offline_access".into()]
        );
        assert!(cfg.warnings.iter().any(|w| w.contains("offline_access")));
        assert_eq!(
            p.token_url.as_str(),
            "https://login.microsoftonline.com/organizations/oauth2/v2.0/token"
        );
        let cfg = parse(
            &provider_with("zoho", "region = \"eu\""),
            Path::new("/tmp/t.toml"),
        )
        .unwrap();
        let p = &cfg.providers["p"];
        assert_eq!(
            p.token_url.as_str(),
            "https://accounts.zoho.eu/oauth/v2/token"
        );
        assert_eq!(
            p.api_base_url.as_ref().unwrap().as_str(),
            "https://www.zohoapis.eu/"
        );
        assert_eq!(p.scope_delimiter, ",");
    }

    #[test]
    fn unknown_preset_and_bad_parameters_name_key_line_and_choices() {
        let ps = problems(&provider_with("okta", ""));
        let p = ps
            .iter()
            .find(|p| p.key == "providers.p.preset")
            .expect("preset named");
        assert_eq!(p.line, Some(2));
        assert!(
            p.message.contains("\"okta\"") && p.message.contains("\"microsoft\""),
            "{p:?}"
        );
        let ps = problems(&provider_with("microsoft", "tenant = \"evil.example/x\""));
        let p = ps
            .iter()
            .find(|p| p.key == "providers.p.tenant")
            .expect("tenant named");
        assert_eq!(p.line, Some(5));
        assert!(p.message.contains("\"common\""), "{p:?}");
        let ps = problems(&provider_with("zoho", "region = \"de\""));
        let p = ps
            .iter()
            .find(|p| p.key == "providers.p.region")
            .expect("region named");
        assert_eq!(p.line, Some(5));
        assert!(p.message.contains("\"eu\""), "{p:?}");
        let ps = problems(&provider_with("zoho", "region = 3"));
        assert!(ps.iter().any(|p| p.key == "providers.p.region"), "{ps:?}");
        let ps = problems(&provider_with("google", "tenant = \"common\""));
        let p = ps
            .iter()
            .find(|p| p.key == "providers.p.tenant")
            .expect("tenant named");
        assert!(p.message.contains("microsoft"), "{p:?}");
        let ps = problems(&provider_with("keap", "region = \"eu\""));
        assert!(
            ps.iter()
                .any(|p| p.key == "providers.p.region" && p.message.contains("zoho")),
            "{ps:?}"
        );
    }

    #[test]
    fn issuer_stands_in_for_the_endpoints() {
        let text = "[providers.p]\nclient_id = \"id\"\nclient_secret = \"s\"\nissuer = \"https://id.example/realm\"\nrevocation_url = \"https://id.example/rev\"\n";
        let cfg = parse(text, Path::new("/tmp/t.toml")).unwrap();
        let p = &cfg.providers["p"];
        assert_eq!(
            p.issuer.as_ref().unwrap().as_str(),
            "https://id.example/realm"
        );
        assert!(!p.explicit.token_url && p.explicit.revocation_url);
        let ps = problems("[providers.p]\nclient_id = \"id\"\nclient_secret = \"s\"\nissuer = \"https://id.example/?x=1\"\n");
        assert!(
            ps.iter()
                .any(|p| p.key == "providers.p.issuer" && p.line == Some(4)),
            "{ps:?}"
        );
    }

    #[test]
    fn all_problems_reported_with_lines() {
        let text = "[server]\nlisten = \"nope\"\nbogus = 1\n[refresh]\njitter = \"10 minutes\"\n[providers.x]\npreset = \"generic\"\nclient_secret = \"s\"\n";
        let ps = problems(text);
        let keys: Vec<_> = ps.iter().map(|p| (p.key.as_str(), p.line)).collect();
        assert!(keys.contains(&("server.listen", Some(2))), "{keys:?}");
        assert!(keys.contains(&("server.bogus", Some(3))), "{keys:?}");
        assert!(keys.contains(&("refresh.jitter", Some(5))), "{keys:?}");
        assert!(
            keys.iter().any(|(k, _)| *k == "providers.x.client_id"),
            "{keys:?}"
        );
        assert!(
            keys.iter()
                .any(|(k, _)| *k == "providers.x.authorization_url"),
            "{keys:?}"
        );
    }

    #[test]
    fn non_loopback_needs_remote_and_keys() {
        let ps = problems("[server]\nlisten = \"0.0.0.0:8787\"\n");
        assert!(ps.iter().any(|p| p.key == "server.listen"), "{ps:?}");
    }

    #[test]
    fn unreadable_secret_file_is_named() {
        let ps = problems("[providers.k]\npreset=\"keap\"\nclient_id=\"i\"\nclient_secret_file=\"/nonexistent/secret\"\n");
        assert!(
            ps.iter()
                .any(|p| p.key == "providers.k.client_secret_file" && p.line == Some(4)),
            "{ps:?}"
        );
    }

    #[test]
    fn api_base_url_with_query_or_fragment_is_refused_with_key_and_line() {
        for base in [
            "https://api.example/v1?tenant=a",
            "https://api.example/v1?",
            "https://api.example/v1#x",
            "https://api.example/v1/#",
        ] {
            let text = format!(
                "[providers.k]\npreset = \"keap\"\nclient_id = \"id\"\nclient_secret = \"s\"\napi_base_url = \"{base}\"\n"
            );
            let ps = problems(&text);
            assert!(
                ps.iter()
                    .any(|p| p.key == "providers.k.api_base_url" && p.line == Some(5)),
                "{base}: {ps:?}"
            );
        }
        let ok = "[providers.k]\npreset = \"keap\"\nclient_id = \"id\"\nclient_secret = \"s\"\napi_base_url = \"https://api.example/v1/\"\n";
        assert!(problems(ok).is_empty());
    }

    /// Client commands read what they need from a file the daemon would
    /// refuse for reasons that are not theirs (a secret this user cannot
    /// read, a remote listen address), and still report, with key and
    /// line, a problem in what they read.
    #[test]
    fn client_reading_ignores_what_clients_do_not_need() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tk.toml");
        let text = "[server]\nlisten = \"10.1.2.3:9000\"\ntls = { cert_file = \"c.pem\", key_file = \"k.pem\" }\napi_keys_file = \"keys\"\n\
            [refresh]\njitter = \"soon\"\n\
            [providers.keap]\npreset = \"keap\"\nclient_id = \"id\"\nclient_secret_file = \"/nonexistent/secret\"\n\
            [providers.other]\npreset = \"keap\"\nclient_id = \"id\"\nclient_secret_env = \"TK_UNIT_TEST_UNSET\"\n";
        std::fs::write(&path, text).unwrap();
        assert!(load(&path).is_err(), "the daemon refuses this file");
        let cfg = load_for_client(&path, &[]).unwrap();
        assert_eq!(cfg.server.listen.to_string(), "10.1.2.3:9000");
        assert_eq!(cfg.server.api_keys_file, Some(dir.path().join("keys")));
        assert_eq!(
            cfg.server.tls,
            TlsConfig::Files {
                cert_file: dir.path().join("c.pem"),
                key_file: dir.path().join("k.pem"),
            }
        );
        assert!(cfg.providers["keap"].client_secret.is_none());

        std::fs::write(
            &path,
            "[server]\nlisten = \"nope\"\n[refresh]\njitter = \"soon\"\n",
        )
        .unwrap();
        let err = load_for_client(&path, &[]).unwrap_err();
        let keys: Vec<_> = err
            .problems
            .iter()
            .map(|p| (p.key.as_str(), p.line))
            .collect();
        assert_eq!(keys, vec![("server.listen", Some(2))]);
        assert!(load_for_client(&path, &["server.listen"]).is_ok());
        let missing = load_for_client(&dir.path().join("absent.toml"), &[]).unwrap_err();
        assert!(missing.to_string().contains("cannot read the config file"));
    }

    #[test]
    fn syntax_error_has_a_line() {
        let ps = problems("[server\nlisten=1\n");
        assert!(
            ps.iter().any(|p| p.key == "(syntax)" && p.line.is_some()),
            "{ps:?}"
        );
    }

    #[test]
    fn storage_url_selects_postgres_and_path_with_url_is_refused() {
        use secrecy::ExposeSecret;
        let provider =
            "[providers.keap]\npreset = \"keap\"\nclient_id = \"id\"\nclient_secret = \"s\"\n";
        let path = Path::new("/tmp/t.toml");
        let cfg = parse(
            &format!("[storage]\nurl = \"postgres://tk@127.0.0.1:5432/tk\"\n{provider}"),
            path,
        )
        .unwrap();
        assert!(matches!(
            cfg.storage.location(),
            crate::store::Location::Postgres(u) if u.expose_secret() == "postgres://tk@127.0.0.1:5432/tk"
        ));
        // Both: an error naming both keys, at the url's line.
        let p = problems(&format!(
            "[storage]\npath = \"/tmp/x.db\"\nurl = \"postgres://tk@h/tk\"\n{provider}"
        ));
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!((p[0].key.as_str(), p[0].line), ("storage.url", Some(3)));
        assert!(
            p[0].message.contains("storage.path") && p[0].message.contains("storage.url"),
            "{}",
            p[0].message
        );
        // Not a PostgreSQL URL.
        let p = problems(&format!("[storage]\nurl = \"/var/lib/x.db\"\n{provider}"));
        assert!(p[0].message.contains("postgres://"), "{p:?}");
        // url_file: resolved like every *_file, $CREDENTIALS_DIRECTORY included.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pg-url"), "postgres://tk:pw@h:5/tk\n").unwrap();
        let cfg_path = dir.path().join("t.toml");
        let cfg = parse(
            &format!("[storage]\nurl_file = \"pg-url\"\n{provider}"),
            &cfg_path,
        )
        .unwrap();
        assert_eq!(
            cfg.storage
                .url
                .as_ref()
                .map(|u| u.expose_secret().to_owned()),
            Some("postgres://tk:pw@h:5/tk".to_owned())
        );
        let p = problems(&format!(
            "[storage]\nurl = \"postgres://h/tk\"\nurl_file = \"pg-url\"\n{provider}"
        ));
        assert!(
            p.iter()
                .any(|p| p.message.contains("url_file") && p.key == "storage.url"),
            "{p:?}"
        );
        let p = problems(&format!(
            "[storage]\npath = \"x.db\"\nurl_file = \"/nonexistent/pg-url\"\n{provider}"
        ));
        assert!(p.iter().any(|p| p.key == "storage.url_file"), "{p:?}");
    }
}
