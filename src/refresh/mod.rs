//! Keeping grants alive. From the bottom up (each layer uses only those
//! below it):
//!
//! - `types` (errors, triggers, settings, what callers get), `policy`
//!   (pure functions: when is a connection due, how long to back off),
//!   `clock` (the wall and monotonic time the engine reads, injectable for
//!   tests), `owner` (who holds a lease and when its death is certain),
//!   `recognizer` (fingerprints of our tokens), `flights` (the thread
//!   refreshes run on), `meta` (a grant's extras and its refresh token's
//!   end, pure);
//! - `token_json`: the `/v1/token` answer of a token, rendered once;
//! - `snapshot`: the served state of a connection, an enum (with its
//!   token's answer, rendered on first use);
//! - `slot`: one connection in memory, and the table of them;
//! - `shared`: the context every layer acts through;
//! - `lease`: the lease and the refresh journal (take, renew, take over,
//!   interrupted refreshes);
//! - `flight`: one refresh as named phases (decide, call, commit or end by
//!   failure class), and revocation;
//! - `registry`: serving tokens from snapshots, starting flights, and
//!   where a new grant lands;
//! - `import`: adopting a refresh token another program holds;
//! - `client_credentials`: the connections of client-credentials
//!   providers, stored at start so flights obtain their tokens;
//! - `engine`: the façade that wires them, and the scheduler pass
//!   (`engine/sweep.rs`);
//! - `scheduler`: the task that sleeps until the next connection falls
//!   due (or `check_interval`, or a wake-up) and runs a pass.
//!
//! Tests drive the engine directly, without HTTP.

mod client_credentials;
pub mod clock;
mod due;
pub mod engine;
mod flight;
pub mod flights;
mod history;
pub mod import;
mod lease;
pub mod meta;
pub mod owner;
pub mod policy;
pub mod recognizer;
mod registry;
pub mod scheduler;
mod shared;
mod slot;
pub mod snapshot;
pub mod token_json;
mod types;

pub use engine::{Engine, EngineParts};
pub use snapshot::{Failing, HeldToken, Snapshot, TokenState};
pub use types::{
    AuthorizedBy, ConnectionReport, IssuedToken, Revocation, ServedToken, Settings, TokenError,
    TokenIdentity, Trigger,
};
