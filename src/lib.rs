//! tokenkeeper: an OAuth2 token lifecycle daemon.
//!
//! A person authorizes once in a browser; the daemon keeps the grant in
//! SQLite, refreshes it before expiry, exactly once at a time and durably,
//! and hands a fresh access token to local programs over a loopback HTTP
//! endpoint. `../shared/SPEC.md` is the external contract.
//!
//! # Layout
//!
//! - [`config`]: the TOML config, its lookup order, secret files; applies
//!   the presets of [`provider::presets`], explicit keys winning.
//! - [`store`]: the only SQL, one interface over SQLite and PostgreSQL:
//!   migrations, leases, durable rotation, `migrate-storage`; and its
//!   feed (`store::feed`): other daemons' commits announced by PostgreSQL,
//!   and whether the database can be reached.
//! - [`crypto`]: sealing tokens at rest (AEAD) and keyed token fingerprints;
//!   making a new key from the OS random source.
//! - [`keygen`]: `tokenkeeper genkey`: a new key written to a new file,
//!   mode 0600, never over an existing file nor through a link.
//! - [`provider`]: OAuth2 calls to providers; [`provider::answer`] reads
//!   token answers leniently and is the one place that decides which
//!   failures are transient, which reject the grant and which are the
//!   client's configuration. [`provider::presets`] is the table of built-in
//!   providers (endpoints, scopes, offline parameters, client
//!   authentication, rotation, refresh-token lifetime, limits), each citing
//!   its documentation; [`provider::discovery`] fills endpoints from an
//!   `issuer`'s metadata. It knows nothing of the simulator.
//! - [`refresh`]: the refresh policy (pure functions) and the engine in
//!   layers: the served state as an enum (`snapshot`), the lease and the
//!   refresh journal (`lease`), one refresh as named phases (`flight`:
//!   decide, call, commit or end by failure class), serving from snapshots
//!   (`registry`) and the façade that wires them (`engine`); also the
//!   thread flights run on, the injectable clock, and lease-holder
//!   identities.
//! - [`http`]: the local HTTP interface: `api` (JSON), `callback` (browser
//!   authorization), `answers` (the JSON bodies, shared with the CLI),
//!   `pages` (HTML layout and result pages), `dashboard` (the dashboard and
//!   its live-update script), `proxy` (the rate-limited API proxy),
//!   `auth` and `login` (site checks, API keys, browser login links),
//!   `server` (connections: timeouts, cap, drain), `error` (the one error
//!   enum).
//! - [`device`]: device authorizations in flight (RFC 8628, `connect
//!   --device`): one polling task per flow honouring `interval` and
//!   `slow_down`, landing the grant as `/callback` does; the requests and
//!   their answers are [`provider::device`]'s.
//! - [`history`]: reading the history of connections (SPEC 13) in pages,
//!   and its retention purge (`storage.history`); the engine records the
//!   events (`refresh::history`), the store keeps them (`store::events`).
//! - [`metrics`]: Prometheus names, the recorder, scrape-time gauges.
//! - [`notify`]: operator notifications (command, webhook), never blocking.
//! - [`ratelimit`]: client-side rate limits per provider and tenant (GCRA
//!   per second/minute, daily counter), corrected by the provider's quota
//!   headers; the proxy and refreshes take their slots here.
//! - [`sinks`]: token files (SPEC 12): the served token mirrored into
//!   files, replaced atomically after each change, off the engine's path.
//! - [`dev`]: the Keap-like provider simulator for tests and `serve --dev`
//!   (OAuth endpoints, API, control and faults, discovery documents, and
//!   each preset's quirks via [`dev::SimulatorConfig::like`]) and [`dev::config`], the
//!   configuration of `serve --dev`. Never used for real traffic.
//! - [`backup`]: SQLite backups (`VACUUM INTO`, checksum, verification,
//!   pruning), restore, and the calendar jobs (`tokio-cron-scheduler`: the
//!   backup schedule, the purge of expired pending authorizations).
//! - [`daemon`]: builds the application from a config ([`daemon::App`]:
//!   store, engine, rate limits, HTTP state) and serves it on a listener
//!   until a shutdown signal; graceful stop.
//! - [`cli`]: the command line: `serve` and the client commands, which read
//!   the API through the types of [`http::answers`].
//! - [`systemd`]: sd_notify, watchdog, socket activation, journal log lines.

pub mod backup;
pub mod cli;
pub mod config;
pub mod crypto;
pub mod daemon;
pub mod dev;
pub mod device;
pub mod history;
pub mod http;
pub mod keygen;
pub mod metrics;
pub mod notify;
pub mod provider;
pub mod ratelimit;
pub mod refresh;
pub mod sinks;
pub mod store;
pub mod systemd;
