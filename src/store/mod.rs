//! Durable state: the only module that speaks SQL.
//!
//! [`Store`] is the one storage interface the rest of the daemon uses. Its
//! methods are shaped by what the lifecycle needs (take a lease, commit a
//! rotation, ...), not by tables; behind it sits one backend:
//!
//! - [`sqlite`]: the zero-setup default (`storage.path`), one host;
//! - [`postgres`]: `storage.url`, several daemons on several hosts sharing
//!   one database as a cluster (SPEC 9).
//!
//! Every backend implements [`Backend`], whose doc comments are the
//! contract: which writes are compare-and-swap, on what, and what a lost
//! race returns. The engine relies on nothing else, so a new backend is a
//! new file implementing that trait and one arm in [`Db`], not an edit of
//! the engine. `tests/store_conformance.rs` runs the same contract tests
//! against every backend. The SQL backends write the contract once
//! (`lifecycle.rs`: statements in the SQL both speak, expanded per
//! backend) and differ only in how a transaction keeps other writers off
//! a row (each one's `Dialect`) and in what one of them alone does.
//!
//! Shared by all backends (here and in [`codec`]): the row types, errors,
//! sealing (tokens encrypted at rest, bound to their connection, column
//! and grant generation) and the decoding of stored rows, including the
//! rule that a row which cannot be read never stops the daemon and is never
//! served: it decodes as a stand-in (`authorization_required`, no token)
//! with `unreadable` and `last_error` saying what is wrong, is logged once
//! at error level and counted in `tokenkeeper_unreadable_connections`.
//! The lifecycle never writes it: `begin_refresh` answers
//! [`BeginRefresh::Unreadable`] without taking a lease; only a new
//! authorization or a forget rewrites or removes it.
//!
//! [`feed`] is what the store tells the engine unasked: which connections
//! other daemons changed (PostgreSQL announces each commit, see
//! [`Store::follow`]) and whether the database can be reached at all.
//!
//! The history of connections ([`events`]) is written by the backends
//! inside the transaction of the write it records, and only if that write
//! lands.
//!
//! Instants are stored as UTC milliseconds in every backend, so values
//! (sealed tokens included) copy between backends unchanged
//! ([`migrate`]).
//!
//! Must not: compare a lease deadline with this process's clock (whether a
//! holder still lives is the engine's call), or hand out a token from a row
//! it could not open.

pub mod codec;
pub mod events;
pub mod feed;
mod lifecycle;
pub mod migrate;
pub mod postgres;
pub mod sqlite;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use secrecy::{ExposeSecret, SecretString};

use crate::crypto::{self, SealKey};
pub use codec::Codec;
use codec::{Column, SealContext};
pub use events::{Before, Event, EventKind, EventQuery, NewEvent};
pub use sqlite::{check_file, DbLock};

/// Errors of the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot prepare the database {path} ({source}); check that the service user can create and write it and its directory")]
    Directory {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot open the database {path}: {}", sqlite::describe_open(.source))]
    Open { path: String, source: sqlx::Error },
    #[error("cannot connect to the PostgreSQL database {url}: {}", postgres::describe_connect(.source))]
    Connect { url: String, source: sqlx::Error },
    #[error("the database {path} was written by a newer version of tokenkeeper (it has migration {version}, which this version does not know); upgrade tokenkeeper, or restore a backup made by this version")]
    NewerVersion { path: String, version: i64 },
    #[error("cannot apply database migrations to {path}: {}", describe_migrate(.source))]
    Migrate {
        path: String,
        source: sqlx::migrate::MigrateError,
    },
    #[error("{}", describe_sql(.0))]
    Sql(#[from] sqlx::Error),
    #[error("a tokenkeeper daemon is using the database {path}; stop it first (systemctl stop tokenkeeper), then run this command again")]
    DaemonRunning { path: String },
    #[error("an offline command (such as `tokenkeeper rekey`) is working on the database {path}; wait until it ends, then start the daemon again")]
    OfflineCommandRunning { path: String },
    #[error("the database {path} can be read by other users (mode {mode:o}); run `chmod 600 {path}` and start again")]
    Permissions { path: String, mode: u32 },
    #[error("the database was encrypted with another key; set storage.encryption_key_file to the key it was written with (nothing was changed)")]
    WrongKey,
    #[error("the database holds encrypted tokens; set storage.encryption_key_file to its key (nothing was changed)")]
    KeyRequired,
    #[error(transparent)]
    Sealed(#[from] crypto::OpenError),
    #[error("the stored row is corrupt: {0}")]
    Corrupt(String),
    /// A file checked before it is trusted ([`check_file`]) is not a
    /// whole tokenkeeper database: the sentence names it and the fix.
    #[error("{0}")]
    NotADatabase(String),
    #[error("the database cannot be written: {0}")]
    NotWritable(String),
    /// A conditional store ([`Backend::save_authorized_if`]) found a
    /// working grant stored meanwhile; nothing was written.
    #[error("{provider}/{account} has a working grant stored by another process meanwhile; nothing was written")]
    WorkingGrantExists { provider: String, account: String },
}

impl StoreError {
    /// Whether the database could not be reached at all (the server is
    /// down, restarting or cut off), as opposed to a refused or failed
    /// statement: the failures that make an outage (see [`feed::Feed`]).
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Sql(e) | StoreError::Connect { source: e, .. } => unreachable_database(e),
            _ => false,
        }
    }
}

/// Whether `e` says the database cannot be reached (see
/// [`StoreError::is_unavailable`]).
fn unreachable_database(e: &sqlx::Error) -> bool {
    match e {
        // Not `PoolTimedOut`: a process stopped for a while (SIGSTOP, a
        // suspended VM) finds its pool waits timed out with the server
        // fine.
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::WorkerCrashed => true,
        // Connection exceptions (08xxx) and the server shutting down or
        // starting up (57P01-57P03).
        sqlx::Error::Database(d) => d
            .code()
            .is_some_and(|c| c.starts_with("08") || matches!(&*c, "57P01" | "57P02" | "57P03")),
        _ => false,
    }
}

/// A sentence for a database failure: the common operator-fixable ones
/// name cause and fix, in the words of the backend that failed.
fn describe_sql(e: &sqlx::Error) -> String {
    sqlite::problem_of(e)
        .or_else(|| postgres::problem_of(e))
        .map_or_else(
            || format!("database error: {e}"),
            |sentence| format!("{sentence} ({e})"),
        )
}

fn describe_migrate(e: &sqlx::migrate::MigrateError) -> String {
    match e {
        sqlx::migrate::MigrateError::Execute(e) => describe_sql(e),
        other => format!("{other}; restore a backup made by this version"),
    }
}

/// Lifecycle state of a connection (SPEC 7). Serialised, stored and shown
/// under SPEC's names (`active`, `refreshing`, `retrying`,
/// `authorization_required`); Rust code matches on the variants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnState {
    Active,
    Refreshing,
    Retrying,
    AuthorizationRequired,
}

impl ConnState {
    /// Every state, in SPEC 7's order (the `state` label values of
    /// `/metrics`).
    pub const ALL: [ConnState; 4] = [
        ConnState::Active,
        ConnState::Refreshing,
        ConnState::Retrying,
        ConnState::AuthorizationRequired,
    ];

    /// SPEC's name of the state, as stored and serialised.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnState::Active => "active",
            ConnState::Refreshing => "refreshing",
            ConnState::Retrying => "retrying",
            ConnState::AuthorizationRequired => "authorization_required",
        }
    }

    fn parse(s: &str) -> Result<ConnState, StoreError> {
        Ok(match s {
            "active" => ConnState::Active,
            "refreshing" => ConnState::Refreshing,
            "retrying" => ConnState::Retrying,
            "authorization_required" => ConnState::AuthorizationRequired,
            other => return Err(StoreError::Corrupt(format!("unknown state {other:?}"))),
        })
    }
}

impl std::fmt::Display for ConnState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A connection as stored.
pub struct ConnectionRow {
    pub id: i64,
    pub provider: String,
    pub account: String,
    pub state: ConnState,
    pub access_token: SecretString,
    pub refresh_token: Option<SecretString>,
    pub token_type: String,
    pub scope: Option<String>,
    pub expires_at: DateTime<Utc>,
    pub issued_at: DateTime<Utc>,
    pub refreshed_at: Option<DateTime<Utc>>,
    pub refresh_token_issued_at: DateTime<Utc>,
    pub generation: i64,
    pub last_error: Option<String>,
    pub failures: u32,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub lease_owner: Option<String>,
    pub lease_until: Option<DateTime<Utc>>,
    pub attempt_id: Option<String>,
    pub attempt_started_at: Option<DateTime<Utc>>,
    pub interrupted_at: Option<DateTime<Utc>>,
    /// What is kept beside the tokens (extras, refresh-token end).
    pub meta: GrantMeta,
    /// Why the stored row cannot be read, if it cannot: then the other
    /// fields are a stand-in (see [`Codec::decode`]), never to be acted on
    /// or written back by the lifecycle; only a new authorization (which
    /// rewrites the whole row) or a local forget touches it.
    pub unreadable: Option<String>,
}

/// A token pair just received from the provider.
pub struct NewGrant<'a> {
    pub access_token: &'a SecretString,
    /// `None`: the provider did not rotate; keep the stored refresh token.
    pub refresh_token: Option<&'a SecretString>,
    pub token_type: &'a str,
    pub scope: Option<&'a str>,
    pub issued_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    /// What to keep beside the tokens, replacing what is stored; `None`
    /// leaves the stored values as they are.
    pub meta: Option<&'a GrantMeta>,
}

/// What a provider returned beside the tokens that an API needs (Intuit
/// `realmId`, Salesforce `instance_url`, Zoho `api_domain`, Xero
/// `tenants`): a JSON object, not secret.
pub type Extras = serde_json::Map<String, serde_json::Value>;

/// What is kept about a grant beside its tokens (SPEC 11). Not secret:
/// stored in plain text, written in the transaction of the grant it
/// belongs to.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GrantMeta {
    /// Per-connection extras (see [`Extras`]); empty when none.
    pub extra: Extras,
    /// When the refresh token dies, if known.
    pub refresh_token_expires_at: Option<DateTime<Utc>>,
    /// An end no refresh pushes back (a maximum lifetime counted from the
    /// authorization, or a stated end that refreshing did not move).
    pub refresh_token_cap_at: Option<DateTime<Utc>>,
}

impl GrantMeta {
    /// Whether the known end is one refreshing cannot push back.
    pub fn refresh_token_end_is_fixed(&self) -> bool {
        match (self.refresh_token_expires_at, self.refresh_token_cap_at) {
            (Some(end), Some(cap)) => end >= cap,
            _ => false,
        }
    }

    /// `extra` as stored: `NULL` for none.
    pub fn extra_text(&self) -> Option<String> {
        if self.extra.is_empty() {
            return None;
        }
        serde_json::to_string(&self.extra).ok()
    }

    /// `extra` as read back: anything but a JSON object reads as none
    /// (extras are conveniences, never a reason to refuse a grant).
    pub fn parse_extra(text: Option<&str>) -> Extras {
        match text.map(serde_json::from_str::<serde_json::Value>) {
            Some(Ok(serde_json::Value::Object(m))) => m,
            _ => Extras::new(),
        }
    }
}

/// A browser authorization in progress.
pub struct PendingAuthorization {
    pub state: String,
    pub provider: String,
    pub account: String,
    pub pkce_verifier: Option<SecretString>,
    pub redirect_uri: String,
    /// SHA-256 (hex) of the cookie that binds the flow to one browser.
    pub browser_hash: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

/// What [`Store::take_pending_for_browser`] found.
pub enum PendingTake {
    /// The flow's pending authorization, now removed (single use).
    Taken(PendingAuthorization),
    /// The state exists but belongs to another browser; it was kept.
    OtherBrowser,
    /// No such state: unknown, expired or already used.
    Unknown,
}

/// Which kind of token a fingerprint belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenKind {
    Refresh,
    Access,
}

impl TokenKind {
    fn as_str(self) -> &'static str {
        match self {
            TokenKind::Refresh => "refresh",
            TokenKind::Access => "access",
        }
    }

    fn parse(s: &str) -> TokenKind {
        match s {
            "refresh" => TokenKind::Refresh,
            _ => TokenKind::Access,
        }
    }
}

/// A keyed digest of a token (see `crypto::Fingerprinter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint {
    pub kind: TokenKind,
    pub digest: [u8; 32],
}

impl Fingerprint {
    fn from_stored(kind: &str, digest: &[u8]) -> Result<Fingerprint, StoreError> {
        let digest = digest
            .try_into()
            .map_err(|_| StoreError::Corrupt("fingerprint of the wrong length".into()))?;
        Ok(Fingerprint {
            kind: TokenKind::parse(kind),
            digest,
        })
    }
}

/// How many fingerprints per connection and kind are kept: enough to
/// recognise a refresh token someone copied weeks ago (one rotation a day at
/// Keap's 24 h tokens), bounded so the table cannot grow without limit.
pub const FINGERPRINTS_KEPT: i64 = 64;

/// Another holder's lease exactly as it was seen: a takeover only happens
/// if it is still exactly this (not renewed, not released, not replaced).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseSeen {
    pub owner: String,
    pub attempt: Option<String>,
    pub until_ms: Option<i64>,
}

/// What became of a commit.
pub enum CommitOutcome {
    /// The pair is stored; `kept_lease` says whether the lease was still
    /// ours (if not, it was written anyway: see [`Backend::commit_refresh`]).
    Committed {
        row: Box<ConnectionRow>,
        kept_lease: bool,
    },
    /// A newer grant (a re-authorization, an import) was stored after this
    /// refresh read the grant: nothing was written. The current row, or
    /// `None` if the connection was forgotten.
    Superseded(Option<Box<ConnectionRow>>),
}

/// Result of trying to start a refresh.
pub enum BeginRefresh {
    /// The lease is ours and "refresh started" is committed; the row is the
    /// freshly re-read grant (another process may have rotated it).
    Started(Box<ConnectionRow>),
    /// Another holder has it: who, its attempt and its stored deadline.
    /// Whether the holder still lives is the engine's call (`owner`,
    /// `clock::LeaseWatch`), never a comparison with this process's clock.
    Busy {
        owner: String,
        attempt: Option<String>,
        until: DateTime<Utc>,
    },
    /// The connection no longer exists.
    Gone,
    /// The stored row cannot be read (its stand-in, with the reason in
    /// `unreadable`): nothing was written, no lease was taken.
    Unreadable(Box<ConnectionRow>),
}

/// How long a statement waits for another writer's lock before failing
/// (SQLite `busy_timeout`; PostgreSQL's `statement_timeout` is below it).
/// Part of the shutdown arithmetic in `daemon`.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// How long `/readyz` waits for its write probe. Below the pool's busy
/// timeout on purpose: a database that holds a write for this long is not
/// ready for a refresh commit either.
const WRITE_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// A write probe result is reused this long, so a readiness check in a
/// tight loop does not turn into a stream of fsyncs.
const WRITE_PROBE_REUSE: Duration = Duration::from_secs(1);

/// UTC milliseconds, as every backend stores instants.
pub fn to_ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

/// The instant of stored UTC milliseconds (the earliest representable one
/// for a value out of range).
pub fn from_ms(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms)
        .single()
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// Where the grants live: `storage.path` or `storage.url`.
#[derive(Debug, Clone)]
pub enum Location {
    /// An SQLite database file.
    Sqlite(PathBuf),
    /// A PostgreSQL URL (it may hold a password: never logged as is, see
    /// [`Location::describe`]).
    Postgres(SecretString),
}

impl Location {
    /// A `--to` argument: a `postgres://` or `postgresql://` URL, else the
    /// path of an SQLite file.
    pub fn parse(target: &str) -> Location {
        if postgres::is_url(target) {
            Location::Postgres(SecretString::from(target.to_owned()))
        } else {
            Location::Sqlite(PathBuf::from(target))
        }
    }

    /// For log lines and messages: the path, or the URL without its
    /// password.
    pub fn describe(&self) -> String {
        match self {
            Location::Sqlite(p) => p.display().to_string(),
            Location::Postgres(url) => postgres::redact(url.expose_secret()),
        }
    }
}

/// The storage contract every backend implements. [`Store`] forwards to
/// it; the engine sees only `Store`.
///
/// Compare-and-swap is the rule for every write that follows a network
/// call: the row names what the writer read (lease owner and attempt id,
/// grant generation), the write lands only if that is still what is
/// stored, and zero rows changed means someone else got there first. A
/// backend makes each of these one atomic step for every process sharing
/// the database (SQLite: one write transaction; PostgreSQL: a conditional
/// `UPDATE ... RETURNING`, or `SELECT ... FOR UPDATE` then write in one
/// transaction). No method compares a stored deadline with the clock of
/// the process calling it: clocks differ between hosts and jump.
///
/// Sealing: every token written is sealed with [`Codec`] for the
/// generation the row has once the write lands; a backend that keeps a
/// token across a generation change re-seals it in the same transaction.
#[allow(async_fn_in_trait)]
pub trait Backend {
    /// The sealing and decoding shared by all backends.
    fn codec(&self) -> &Codec;

    /// A value of the `installation` table (per-database settings: the
    /// key check, the seal format, the fingerprint key).
    async fn setting(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError>;

    /// Re-seals every stored token under `new`, opening each with `open`,
    /// in one transaction; with `key_check`, also drops pending browser
    /// authorizations (sealed under the old key, minutes-lived) and stores
    /// a new key check. Marks the seal format current. A row whose tokens
    /// do not open is left as it is. Returns how many rows were re-sealed.
    async fn reseal(
        &self,
        new: &SealKey,
        open: &(dyn Fn(&SealContext<'_>, Column, &str) -> Option<SecretString> + Sync),
        key_check: bool,
    ) -> Result<usize, StoreError>;

    /// The per-installation fingerprint key: created on first use, and
    /// the same for every daemon sharing the database (first writer wins).
    async fn fingerprint_key(&self) -> Result<[u8; 32], StoreError>;

    /// Every stored fingerprint, oldest first per connection, one at a time.
    async fn each_fingerprint(&self, f: impl FnMut(i64, Fingerprint)) -> Result<(), StoreError>;

    /// The fingerprints of one connection, oldest first.
    async fn fingerprints_of(&self, connection_id: i64) -> Result<Vec<Fingerprint>, StoreError>;

    /// A read that proves the database answers.
    async fn ping(&self) -> Result<(), StoreError>;

    /// One small write that changes nothing a reader sees.
    async fn write_once(&self) -> Result<(), sqlx::Error>;

    /// Closes the pool.
    async fn close(&self);

    /// Stores a browser authorization in progress (its PKCE verifier sealed).
    async fn insert_pending(&self, p: &PendingAuthorization) -> Result<(), StoreError>;

    /// Take-once: purges expired pending authorizations, then removes and
    /// returns the one for `state` (and, with `browser_hash`, only if it
    /// belongs to that browser) in one atomic delete, so two callbacks
    /// racing with the same state cannot both take it.
    async fn take_pending(
        &self,
        state: &str,
        browser_hash: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<PendingTake, StoreError>;

    /// Removes the pending authorizations that expired before `now`;
    /// returns how many. Without it, flows started and abandoned stay
    /// until the next callback.
    async fn purge_expired_pending(&self, now: DateTime<Utc>) -> Result<u64, StoreError>;

    /// Every connection, decoded, one at a time (a row whose identity
    /// cannot be read is logged and skipped).
    async fn each_connection(&self, f: impl FnMut(ConnectionRow)) -> Result<(), StoreError>;

    /// One connection (`None` also for a row skipped as unreadable).
    async fn load_connection(&self, id: i64) -> Result<Option<ConnectionRow>, StoreError>;

    /// `(id, generation, state)` of every connection.
    async fn versions(&self) -> Result<Vec<(i64, i64, String)>, StoreError>;

    /// Keeps the discovery document fetched from `issuer`, replacing the
    /// one kept before.
    async fn save_discovery(
        &self,
        issuer: &str,
        document: &str,
        fetched_at: DateTime<Utc>,
    ) -> Result<(), StoreError>;

    /// The discovery document last kept for `issuer`, and when it was
    /// fetched.
    async fn load_discovery(
        &self,
        issuer: &str,
    ) -> Result<Option<(String, DateTime<Utc>)>, StoreError>;

    /// Stores a grant from a new authorization, replacing any earlier grant
    /// of the same provider/account unconditionally: the generation moves
    /// (so any refresh in flight finds it moved at commit), lease, attempt,
    /// failures and errors are cleared, and the fingerprints are recorded
    /// in the same transaction. Returns the stored row and the refresh
    /// token of the replaced grant (for upstream revocation), if it opens.
    async fn save_authorized(
        &self,
        provider: &str,
        account: &str,
        g: &NewGrant<'_>,
        fps: &[Fingerprint],
        events: &[NewEvent],
    ) -> Result<(ConnectionRow, Option<SecretString>), StoreError> {
        self.save_authorized_if(provider, account, g, fps, events, false)
            .await
    }

    /// [`Backend::save_authorized`], but when `only_if_no_working_grant`
    /// is set, compare-and-swap on the connection's state in the same
    /// transaction: the grant lands only if `provider/account` has no row,
    /// or one in `authorization_required`; otherwise nothing is written
    /// and the answer is [`StoreError::WorkingGrantExists`] (another
    /// process stored a grant after the caller looked).
    async fn save_authorized_if(
        &self,
        provider: &str,
        account: &str,
        g: &NewGrant<'_>,
        fps: &[Fingerprint],
        events: &[NewEvent],
        only_if_no_working_grant: bool,
    ) -> Result<(ConnectionRow, Option<SecretString>), StoreError>;

    /// Makes sure `provider/account` has a row, for a grant the daemon
    /// obtains itself (the client-credentials grant): when none exists, a
    /// row without a usable token is inserted (an empty access token that
    /// expired at `now`, no refresh token, state `retrying` with `reason`
    /// and no backoff, so the next pass obtains one through the lease like
    /// any refresh). An existing row is left exactly as it is (another
    /// process may have inserted it, or obtained its token, first).
    /// Returns the row as stored.
    async fn ensure_connection(
        &self,
        provider: &str,
        account: &str,
        now: DateTime<Utc>,
        reason: &str,
    ) -> Result<Option<ConnectionRow>, StoreError>;

    /// The lease and the journal in one atomic step: takes the refresh
    /// lease for `(owner, attempt_id)` until `lease_until` and records
    /// "refresh started" (`attempt_started_at = now`, state `refreshing`
    /// unless `authorization_required`), then returns the re-read grant.
    ///
    /// The lease is free when nobody, or `owner` itself, holds it. Another
    /// holder's lease is taken only when `takeover` names exactly what is
    /// stored (owner, attempt, deadline): a holder that renewed, released
    /// or was replaced since the engine looked keeps it. Taking over an
    /// unfinished attempt records `interrupted_at`. A lease held by another
    /// answers [`BeginRefresh::Busy`] with what is stored; an unreadable
    /// row is left untouched ([`BeginRefresh::Unreadable`]).
    async fn begin_refresh(
        &self,
        id: i64,
        owner: &str,
        attempt_id: &str,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        takeover: Option<&LeaseSeen>,
    ) -> Result<BeginRefresh, StoreError>;

    /// Renew: moves the deadline of a lease still held by
    /// `(owner, attempt_id)`; `false` (nothing written) if it is not.
    async fn renew_lease(
        &self,
        id: i64,
        owner: &str,
        attempt_id: &str,
        until: DateTime<Utc>,
    ) -> Result<bool, StoreError>;

    /// Commits a rotation, compare-and-swap on `base_generation` (the
    /// generation the refresh read under its lease), in one transaction
    /// with the new fingerprints:
    ///
    /// - lease still `(owner, attempt_id)` and generation unchanged: the
    ///   pair is written, the generation moves on, the lease ends;
    ///   `Committed { kept_lease: true }`;
    /// - lease lost meanwhile (we stalled past it) but generation unchanged:
    ///   the pair is written anyway, since the provider has already rotated
    ///   and ours is the only refresh token that still works; the other
    ///   holder's lease is left alone (its rejection path re-reads storage
    ///   and finds this grant); `Committed { kept_lease: false }`;
    /// - generation moved (a newer grant was stored after our read):
    ///   nothing is written, our lease (if still ours) is released;
    ///   `Superseded` with the current row.
    #[allow(clippy::too_many_arguments)]
    async fn commit_refresh(
        &self,
        id: i64,
        name: (&str, &str),
        owner: &str,
        attempt_id: &str,
        base_generation: i64,
        g: &NewGrant<'_>,
        fps: &[Fingerprint],
        events: &[NewEvent],
    ) -> Result<CommitOutcome, StoreError>;

    /// Ends an attempt without a new grant (state, error, failures, next
    /// attempt) and releases the lease, only if `(owner, attempt_id)` still
    /// holds it; `None` otherwise (nothing written).
    #[allow(clippy::too_many_arguments)]
    async fn finish_attempt(
        &self,
        id: i64,
        owner: &str,
        attempt_id: &str,
        state: ConnState,
        last_error: Option<&str>,
        failures: u32,
        next_attempt_at: Option<DateTime<Utc>>,
    ) -> Result<Option<ConnectionRow>, StoreError>;

    /// Parks the grant as `authorization_required` only if the lease is
    /// still ours *and* the grant is still `generation`; otherwise releases
    /// our lease (if still ours) and answers `None`: a grant stored since
    /// our read is not parked for our spent token.
    async fn reject_attempt(
        &self,
        id: i64,
        holder: (&str, &str),
        generation: i64,
        reason: &str,
        failures: u32,
        events: &[NewEvent],
    ) -> Result<Option<ConnectionRow>, StoreError>;

    /// Clears the lease of a holder the engine judged dead
    /// (`lease_owner IS dead_owner` and an attempt recorded), marking the
    /// attempt interrupted and the state `retrying` (unless
    /// `authorization_required`).
    async fn mark_interrupted(
        &self,
        id: i64,
        dead_owner: Option<&str>,
        message: &str,
        events: &[NewEvent],
    ) -> Result<Option<ConnectionRow>, StoreError>;

    /// Records that `owner` is alive at `now`, drops entries older than
    /// `alive_since`, and counts the other processes left.
    async fn heartbeat(
        &self,
        owner: &str,
        now: DateTime<Utc>,
        alive_since: DateTime<Utc>,
    ) -> Result<usize, StoreError>;

    /// Removes `owner`'s heartbeat.
    async fn leave(&self, owner: &str) -> Result<(), StoreError>;

    /// Whether another connection (another process, or this process's own
    /// pool) committed anything since the previous call (`true` at the
    /// first); this process's heartbeat does not count. May answer `true`
    /// for a write that changed nothing the caller cares about; never
    /// `false` after such a commit. Cheap: an idle scheduler asks often.
    async fn changed(&self) -> Result<bool, StoreError>;

    /// Forgets a connection and its fingerprints, unconditionally.
    async fn delete_connection(
        &self,
        provider: &str,
        account: &str,
        events: &[NewEvent],
    ) -> Result<Option<ConnectionRow>, StoreError>;

    /// Forgets connection `id` (and its fingerprints) only if its grant is
    /// still `generation`; `false` if a newer grant was stored or it is gone.
    async fn delete_connection_at(
        &self,
        id: i64,
        generation: i64,
        events: &[NewEvent],
    ) -> Result<bool, StoreError>;

    /// Inserts events that record no change of their own (see [`events`]).
    async fn record_events(&self, events: &[NewEvent]) -> Result<(), StoreError>;

    /// One page of the events of `provider`/`account`, newest first.
    async fn events(
        &self,
        provider: &str,
        account: &str,
        q: &EventQuery,
    ) -> Result<Vec<Event>, StoreError>;

    /// Deletes the events that happened before `before`; how many.
    async fn purge_events(&self, before: DateTime<Utc>) -> Result<u64, StoreError>;

    /// Everything `migrate-storage` copies, exactly as stored (sealed
    /// values stay sealed: their binding names no backend).
    async fn export(&self) -> Result<migrate::Dump, StoreError>;

    /// Replaces everything with `dump` in one transaction. Refused (with
    /// [`migrate::MigrateError::TargetNotEmpty`], naming `target`) if
    /// connections exist and `replace` is not set.
    async fn import(
        &self,
        dump: &migrate::Dump,
        replace: bool,
        target: &str,
    ) -> Result<(), migrate::MigrateError>;
}

/// The backends, one arm each.
#[derive(Clone)]
pub enum Db {
    Sqlite(sqlite::Sqlite),
    Postgres(postgres::Postgres),
}

/// Runs `$body` with `$b` bound to the backend behind `$store`.
macro_rules! on_backend {
    ($store:expr, $b:ident => $body:expr) => {
        match &$store.db {
            Db::Sqlite($b) => $body,
            Db::Postgres($b) => $body,
        }
    };
}

/// Handle on the database; cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: Db,
    /// The last write probe (`/readyz`): when, and whether it succeeded.
    probe: Arc<tokio::sync::Mutex<Option<(std::time::Instant, bool)>>>,
    /// Changes pushed by the database, and whether it can be reached.
    feed: Arc<feed::Feed>,
}

impl Store {
    /// Opens (creating with mode 0600, in a 0700 directory, if needed) and
    /// migrates the SQLite database at `path`, then checks `key` against it
    /// before anything else is written.
    pub async fn open(path: &Path, key: Option<SealKey>) -> Result<Store, StoreError> {
        let db = sqlite::Sqlite::open(path, Codec::new(key)).await?;
        Store::ready(Db::Sqlite(db), |source| StoreError::Open {
            path: path.display().to_string(),
            source,
        })
        .await
    }

    /// Connects to the PostgreSQL database at `url`, migrates it and checks
    /// `key` against it, all under an advisory lock so daemons starting at
    /// once take turns.
    pub async fn connect(url: &SecretString, key: Option<SealKey>) -> Result<Store, StoreError> {
        let shown = postgres::redact(url.expose_secret());
        let db = postgres::Postgres::connect(url, Codec::new(key)).await?;
        // Several daemons may start at once: one migrates and checks (and
        // maybe seals) at a time.
        let turn = db.startup_lock().await?;
        db.migrate(&shown).await?;
        let store = Store::ready(Db::Postgres(db), |source| StoreError::Connect {
            url: shown,
            source,
        })
        .await;
        drop(turn);
        store
    }

    /// [`Store::open`] or [`Store::connect`], by location.
    pub async fn open_at(location: &Location, key: Option<SealKey>) -> Result<Store, StoreError> {
        match location {
            Location::Sqlite(path) => Store::open(path, key).await,
            Location::Postgres(url) => Store::connect(url, key).await,
        }
    }

    /// Checks the key, then proves the database takes a write now, at
    /// start, rather than at the first refresh (a read-only SQLite file
    /// opens and fails only at its first write).
    async fn ready(
        db: Db,
        write_failed: impl FnOnce(sqlx::Error) -> StoreError,
    ) -> Result<Store, StoreError> {
        let store = Store {
            db,
            probe: Arc::new(tokio::sync::Mutex::new(None)),
            feed: Arc::new(feed::Feed::default()),
        };
        store.check_key().await?;
        on_backend!(store, b => b.write_once().await).map_err(write_failed)?;
        Ok(store)
    }

    /// Changes pushed by the database and its reachability (see
    /// [`feed::Feed`]).
    pub fn feed(&self) -> &Arc<feed::Feed> {
        &self.feed
    }

    /// Starts following other daemons' writes where the backend pushes
    /// them (PostgreSQL: a `LISTEN` connection of its own, reconnected
    /// with backoff, see `postgres::follow`), until `shutdown`. Changes
    /// and outages arrive in [`Store::feed`]. SQLite pushes nothing (the
    /// scheduler's `PRAGMA data_version` look finds other writers there):
    /// `None`.
    ///
    /// The first `LISTEN` is made before this returns (or has failed,
    /// then the outage is reported and retried), so what other daemons
    /// commit from then on is announced to this one.
    pub async fn follow(
        &self,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Option<tokio::task::JoinHandle<()>> {
        match &self.db {
            Db::Sqlite(_) => None,
            Db::Postgres(pg) => {
                self.feed.set_pushed();
                let task = postgres::follow(pg.clone(), self.feed.clone(), shutdown).await;
                Some(tokio::spawn(task))
            }
        }
    }

    /// The backend, for code that must know it (`migrate-storage`).
    pub fn backend(&self) -> &Db {
        &self.db
    }

    fn codec(&self) -> &Codec {
        on_backend!(self, b => b.codec())
    }

    /// Whether tokens are sealed at rest.
    pub fn encrypted(&self) -> bool {
        self.codec().encrypted()
    }

    /// The key check: a value sealed under the key the database was written
    /// with. A wrong or missing key fails here, before any write; a key set
    /// for the first time seals the existing plaintext rows in one
    /// transaction.
    async fn check_key(&self) -> Result<(), StoreError> {
        let check = on_backend!(self, b => b.setting("key_check").await)?;
        let check = check.map(|v| String::from_utf8_lossy(&v).into_owned());
        match (self.codec().key(), check) {
            (None, None) => Ok(()),
            (None, Some(_)) => Err(StoreError::KeyRequired),
            (Some(key), Some(c)) => {
                key.open(&c, codec::KEY_CHECK_CONTEXT)
                    .map_err(|_| StoreError::WrongKey)?;
                self.upgrade_sealing(key).await
            }
            (Some(key), None) => {
                let n = self.reseal_all(None, key).await?;
                if n > 0 {
                    tracing::info!(
                        connections = n,
                        "sealed the stored tokens with the new encryption key"
                    );
                }
                Ok(())
            }
        }
    }

    /// Re-seals every stored token under `new` (from `old`, or from
    /// plaintext) and replaces the key check, all in one transaction.
    async fn reseal_all(&self, old: Option<&SealKey>, new: &SealKey) -> Result<usize, StoreError> {
        let open = |ctx: &SealContext<'_>, column: Column, v: &str| match old {
            Some(k) => k.open(v, &ctx.column(column)).ok(),
            None if crypto::is_sealed(v) => None,
            None => Some(SecretString::from(v.to_owned())),
        };
        on_backend!(self, b => b.reseal(new, &open, true).await)
    }

    /// Databases sealed before values were bound to their column and
    /// generation are re-sealed once, at open, in one transaction. Done
    /// eagerly (rather than accepting the old binding on read) so that an
    /// old value can never be swapped or replayed once this version runs.
    async fn upgrade_sealing(&self, key: &SealKey) -> Result<(), StoreError> {
        let format = on_backend!(self, b => b.setting("seal_format").await)?;
        if format.as_deref() == Some(codec::SEAL_FORMAT.as_bytes()) {
            return Ok(());
        }
        let open = |ctx: &SealContext<'_>, _: Column, v: &str| key.open(v, &ctx.legacy()).ok();
        let n = on_backend!(self, b => b.reseal(key, &open, false).await)?;
        if n > 0 {
            tracing::info!(
                connections = n,
                "re-sealed the stored tokens, now bound to their column and grant generation"
            );
        }
        Ok(())
    }

    /// `tokenkeeper rekey`: re-seals everything under `new`.
    pub async fn rekey(&self, new: &SealKey) -> Result<usize, StoreError> {
        self.reseal_all(self.codec().key(), new).await
    }

    /// The per-installation fingerprint key, created on first use.
    pub async fn fingerprint_key(&self) -> Result<[u8; 32], StoreError> {
        on_backend!(self, b => b.fingerprint_key().await)
    }

    /// Every stored fingerprint, oldest first per connection:
    /// `(connection_id, fingerprint)`, handed to `f` one row at a time so
    /// that 10,000 connections never sit in memory as raw rows.
    pub async fn each_fingerprint(
        &self,
        f: impl FnMut(i64, Fingerprint),
    ) -> Result<(), StoreError> {
        on_backend!(self, b => b.each_fingerprint(f).await)
    }

    /// The fingerprints stored for one connection, oldest first: what the
    /// recognizer mirrors after another process wrote the connection.
    pub async fn fingerprints_of(
        &self,
        connection_id: i64,
    ) -> Result<Vec<Fingerprint>, StoreError> {
        on_backend!(self, b => b.fingerprints_of(connection_id).await)
    }

    /// Cheap liveness probe for the watchdog.
    pub async fn ping(&self) -> Result<(), StoreError> {
        on_backend!(self, b => b.ping().await)
    }

    /// Readiness: the database answers *and* takes a write (a full disk, a
    /// read-only file or a lock held elsewhere fail here, where a read
    /// would pass). One small upsert, bounded by `WRITE_PROBE_TIMEOUT`;
    /// a result younger than `WRITE_PROBE_REUSE` is reused.
    pub async fn write_probe(&self) -> Result<(), StoreError> {
        // Where a listener judges outages, its word counts: until it has
        // its connection back, nothing is committed or followed.
        if self.feed.pushed() && !self.feed.up() {
            metrics::gauge!(crate::metrics::DATABASE_WRITABLE).set(0.0);
            return Err(StoreError::NotWritable(
                "it cannot be reached; reconnecting".into(),
            ));
        }
        let mut last = self.probe.lock().await;
        if let Some((at, true)) = *last {
            if at.elapsed() < WRITE_PROBE_REUSE {
                return Ok(());
            }
        }
        let write = async { on_backend!(self, b => b.write_once().await) };
        let result = match tokio::time::timeout(WRITE_PROBE_TIMEOUT, write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(StoreError::Sql(e)),
            Err(_) => Err(StoreError::NotWritable(format!(
                "a write did not complete within {} s (another process holds the database locked, or the disk stalls)",
                WRITE_PROBE_TIMEOUT.as_secs()
            ))),
        };
        *last = Some((std::time::Instant::now(), result.is_ok()));
        match &result {
            Ok(()) => self.feed.answered(),
            Err(e) => {
                self.feed.note(e);
            }
        }

        metrics::gauge!(crate::metrics::DATABASE_WRITABLE).set(f64::from(u8::from(result.is_ok())));
        result
    }

    /// Closes every pooled connection (checkpointing SQLite's WAL).
    pub async fn close(&self) {
        on_backend!(self, b => b.close().await)
    }

    // ----- pending authorizations -----

    /// Stores a browser authorization in progress.
    pub async fn insert_pending(&self, p: &PendingAuthorization) -> Result<(), StoreError> {
        on_backend!(self, b => b.insert_pending(p).await)
    }

    /// Removes and returns the pending authorization for `state`: a state
    /// can be used once, whatever happens next. Expired ones are purged.
    pub async fn take_pending(
        &self,
        state: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<PendingAuthorization>, StoreError> {
        Ok(
            match on_backend!(self, b => b.take_pending(state, None, now).await)? {
                PendingTake::Taken(p) => Some(p),
                PendingTake::OtherBrowser | PendingTake::Unknown => None,
            },
        )
    }

    /// Removes the pending authorizations that expired before `now` (the
    /// periodic purge, [`crate::backup`]); returns how many.
    pub async fn purge_expired_pending(&self, now: DateTime<Utc>) -> Result<u64, StoreError> {
        on_backend!(self, b => b.purge_expired_pending(now).await)
    }

    /// Writes a consistent copy of the whole database to `dest` while it
    /// is in use (SQLite `VACUUM INTO`, see `sqlite::Sqlite::snapshot_into`);
    /// sealed values stay sealed. PostgreSQL has its own tools for that,
    /// so it answers [`StoreError::NotWritable`] naming them.
    pub async fn snapshot_into(&self, dest: &Path) -> Result<(), StoreError> {
        match &self.db {
            Db::Sqlite(b) => b.snapshot_into(dest).await,
            Db::Postgres(_) => Err(StoreError::NotWritable(
                "backups of a PostgreSQL store are the database's business (pg_dump, base backups)"
                    .into(),
            )),
        }
    }

    /// Like [`Store::take_pending`], but only for the browser that started
    /// the flow (`browser_hash`): a callback from another browser, or
    /// without the cookie, leaves the pending authorization in place for
    /// the right one.
    pub async fn take_pending_for_browser(
        &self,
        state: &str,
        browser_hash: &str,
        now: DateTime<Utc>,
    ) -> Result<PendingTake, StoreError> {
        on_backend!(self, b => b.take_pending(state, Some(browser_hash), now).await)
    }

    // ----- connections -----

    /// Every connection, decoded.
    pub async fn load_connections(&self) -> Result<Vec<ConnectionRow>, StoreError> {
        let mut all = Vec::new();
        self.each_connection(|c| all.push(c)).await?;
        Ok(all)
    }

    /// Every connection, decoded and handed to `f` one row at a time: the
    /// daemon's start reads them all, and raw rows of 10,000 connections
    /// held at once were most of its peak memory (`bench/run.sh`).
    pub async fn each_connection(&self, f: impl FnMut(ConnectionRow)) -> Result<(), StoreError> {
        on_backend!(self, b => b.each_connection(f).await)
    }

    /// One connection; `None` also when even its name cannot be read (such
    /// a row is logged once and skipped, see [`Store::each_connection`]).
    pub async fn load_connection(&self, id: i64) -> Result<Option<ConnectionRow>, StoreError> {
        on_backend!(self, b => b.load_connection(id).await)
    }

    /// `(id, generation, state)` of every connection: what the engine compares
    /// to notice writes by other processes without reading tokens.
    pub async fn versions(&self) -> Result<Vec<(i64, i64, String)>, StoreError> {
        on_backend!(self, b => b.versions().await)
    }

    /// Keeps the discovery document fetched from `issuer`, replacing the
    /// one kept before, so that a restart without network still knows the
    /// provider's endpoints (`provider::discovery`).
    pub async fn save_discovery(
        &self,
        issuer: &str,
        document: &str,
        fetched_at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        on_backend!(self, b => b.save_discovery(issuer, document, fetched_at).await)
    }

    /// The discovery document last kept for `issuer`, and when it was
    /// fetched.
    pub async fn load_discovery(
        &self,
        issuer: &str,
    ) -> Result<Option<(String, DateTime<Utc>)>, StoreError> {
        on_backend!(self, b => b.load_discovery(issuer).await)
    }

    /// Stores a grant only if `provider/account` has no working grant,
    /// checked in the storing transaction (see
    /// [`Backend::save_authorized_if`]).
    pub async fn save_authorized_if_no_working_grant(
        &self,
        provider: &str,
        account: &str,
        g: &NewGrant<'_>,
        fps: &[Fingerprint],
        events: &[NewEvent],
    ) -> Result<(ConnectionRow, Option<SecretString>), StoreError> {
        on_backend!(self, b => b.save_authorized_if(provider, account, g, fps, events, true).await)
    }

    /// Stores a grant obtained by a browser authorization, replacing any
    /// earlier grant (see [`Backend::save_authorized`]).
    pub async fn save_authorized(
        &self,
        provider: &str,
        account: &str,
        g: &NewGrant<'_>,
        fps: &[Fingerprint],
        events: &[NewEvent],
    ) -> Result<(ConnectionRow, Option<SecretString>), StoreError> {
        on_backend!(self, b => b.save_authorized(provider, account, g, fps, events).await)
    }

    /// Inserts a token-less row for `provider/account` unless one exists
    /// (see [`Backend::ensure_connection`]).
    pub async fn ensure_connection(
        &self,
        provider: &str,
        account: &str,
        now: DateTime<Utc>,
        reason: &str,
    ) -> Result<Option<ConnectionRow>, StoreError> {
        on_backend!(self, b => b.ensure_connection(provider, account, now, reason).await)
    }

    /// Takes the refresh lease and records "refresh started" in one step
    /// (see [`Backend::begin_refresh`]).
    pub async fn begin_refresh(
        &self,
        id: i64,
        owner: &str,
        attempt_id: &str,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        takeover: Option<&LeaseSeen>,
    ) -> Result<BeginRefresh, StoreError> {
        on_backend!(self, b => b.begin_refresh(id, owner, attempt_id, now, lease_until, takeover).await)
    }

    /// Extends a held lease; `false` if it is no longer ours.
    pub async fn renew_lease(
        &self,
        id: i64,
        owner: &str,
        attempt_id: &str,
        until: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        on_backend!(self, b => b.renew_lease(id, owner, attempt_id, until).await)
    }

    /// Commits a rotation, compare-and-swap on `base_generation` (see
    /// [`Backend::commit_refresh`]).
    #[allow(clippy::too_many_arguments)]
    pub async fn commit_refresh(
        &self,
        id: i64,
        name: (&str, &str),
        owner: &str,
        attempt_id: &str,
        base_generation: i64,
        g: &NewGrant<'_>,
        fps: &[Fingerprint],
        events: &[NewEvent],
    ) -> Result<CommitOutcome, StoreError> {
        on_backend!(self, b => b.commit_refresh(id, name, owner, attempt_id, base_generation, g, fps, events).await)
    }

    /// Ends an attempt without a new grant: transient failure (`retrying`),
    /// rejection (`authorization_required`) or nothing to do (`active`).
    /// Releases the lease. Only the current holder's write lands.
    #[allow(clippy::too_many_arguments)]
    pub async fn finish_attempt(
        &self,
        id: i64,
        owner: &str,
        attempt_id: &str,
        state: ConnState,
        last_error: Option<&str>,
        failures: u32,
        next_attempt_at: Option<DateTime<Utc>>,
    ) -> Result<Option<ConnectionRow>, StoreError> {
        on_backend!(self, b => b.finish_attempt(id, owner, attempt_id, state, last_error, failures, next_attempt_at).await)
    }

    /// Ends an attempt whose refresh token the provider rejected, as
    /// `authorization_required`, but only if the grant is still
    /// `generation` (see [`Backend::reject_attempt`]).
    pub async fn reject_attempt(
        &self,
        id: i64,
        holder: (&str, &str),
        generation: i64,
        reason: &str,
        failures: u32,
        events: &[NewEvent],
    ) -> Result<Option<ConnectionRow>, StoreError> {
        on_backend!(self, b => b.reject_attempt(id, holder, generation, reason, failures, events).await)
    }

    /// Marks refreshes whose holder died as interrupted, so status reports
    /// them and the engine retries them at once.
    pub async fn mark_interrupted(
        &self,
        id: i64,
        dead_owner: Option<&str>,
        message: &str,
        events: &[NewEvent],
    ) -> Result<Option<ConnectionRow>, StoreError> {
        on_backend!(self, b => b.mark_interrupted(id, dead_owner, message, events).await)
    }

    /// Records that `owner` is alive and returns how many other processes
    /// were seen since `alive_since` (older entries are dropped).
    pub async fn heartbeat(
        &self,
        owner: &str,
        now: DateTime<Utc>,
        alive_since: DateTime<Utc>,
    ) -> Result<usize, StoreError> {
        on_backend!(self, b => b.heartbeat(owner, now, alive_since).await)
    }

    /// Removes `owner`'s heartbeat at a clean stop.
    pub async fn leave(&self, owner: &str) -> Result<(), StoreError> {
        on_backend!(self, b => b.leave(owner).await)
    }

    /// Whether another connection committed since the previous call, so
    /// that an idle scheduler reads every row only after a write (see
    /// [`Backend::changed`]).
    /// Where changes are pushed ([`Store::follow`]), exactly whether an
    /// announcement (or a reconnect that may have missed some) came that
    /// was not yet taken from the feed.
    pub async fn changed(&self) -> Result<bool, StoreError> {
        if self.feed.pushed() {
            return Ok(self.feed.has_pending());
        }
        on_backend!(self, b => b.changed().await)
    }

    /// Forgets a connection; returns it (for upstream revocation) if it existed.
    pub async fn delete_connection(
        &self,
        provider: &str,
        account: &str,
        events: &[NewEvent],
    ) -> Result<Option<ConnectionRow>, StoreError> {
        let row = on_backend!(self, b => b.delete_connection(provider, account, events).await)?;
        if let Some(d) = &row {
            self.codec().set_unreadable(d.id, None, provider, account);
        }
        Ok(row)
    }

    /// Forgets connection `id` only if its grant is still `generation` (the
    /// one just revoked); `false` if a newer grant was stored meanwhile or
    /// the row is already gone.
    pub async fn delete_connection_at(
        &self,
        id: i64,
        generation: i64,
        events: &[NewEvent],
    ) -> Result<bool, StoreError> {
        on_backend!(self, b => b.delete_connection_at(id, generation, events).await)
    }
}

impl Store {
    // ----- history -----

    /// Records events that go with no write of their own (a bearer misuse,
    /// a transient failure). A failure is logged, never fatal: history is
    /// worth less than the refresh it describes.
    pub async fn record_events(&self, events: &[NewEvent]) {
        if let Err(e) = on_backend!(self, b => b.record_events(events).await) {
            tracing::warn!(error = %e, "could not record a history event");
        }
    }

    /// One page of the events of `provider`/`account`, newest first.
    pub async fn events(
        &self,
        provider: &str,
        account: &str,
        q: &EventQuery,
    ) -> Result<Vec<Event>, StoreError> {
        on_backend!(self, b => b.events(provider, account, q).await)
    }

    /// Deletes the events that happened before `before` (`storage.history`);
    /// how many.
    pub async fn purge_events(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        on_backend!(self, b => b.purge_events(before).await)
    }
}

/// Held by a daemon for its whole life, or by an offline command while it
/// works: daemons share it, offline commands (`rekey`, `migrate-storage`)
/// take it alone, so neither starts while the other runs.
pub enum StoreLock {
    /// SQLite: `flock` on `<database>.lock`.
    File(DbLock),
    /// PostgreSQL: a session advisory lock on a connection of its own.
    Postgres(postgres::SessionLock),
}

impl StoreLock {
    /// For a daemon: shared, refused while an offline command runs.
    pub async fn shared(location: &Location) -> Result<StoreLock, StoreError> {
        Ok(match location {
            Location::Sqlite(p) => StoreLock::File(DbLock::shared(p)?),
            Location::Postgres(url) => {
                StoreLock::Postgres(postgres::SessionLock::take(url, false).await?)
            }
        })
    }

    /// For an offline command: exclusive, refused while a daemon runs.
    pub async fn exclusive(location: &Location) -> Result<StoreLock, StoreError> {
        Ok(match location {
            Location::Sqlite(p) => StoreLock::File(DbLock::exclusive(p)?),
            Location::Postgres(url) => {
                StoreLock::Postgres(postgres::SessionLock::take(url, true).await?)
            }
        })
    }
}

/// Creates a directory (and its parents) with mode 0700 if missing.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.as_os_str().is_empty() || dir.exists() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}
