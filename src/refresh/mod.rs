//! Keeping grants alive: the policy (pure functions: when is a connection
//! due, how long to back off), the engine (single-flight refresh, durable
//! rotation, crash recovery, serving snapshots), `flights`, the thread
//! refreshes run on, `clock` (the wall and monotonic time the engine reads,
//! injectable for tests), `owner` (who holds a lease and when its death is
//! certain), `recognizer` (fingerprints of our tokens) and `scheduler` (the
//! task that sleeps until the next connection falls due and runs an engine
//! pass). Tests drive the engine directly, without HTTP.

pub mod clock;
pub mod engine;
pub mod flights;
pub mod owner;
pub mod policy;
pub mod recognizer;
pub mod scheduler;

pub use engine::{
    ConnectionReport, Engine, IssuedToken, Revocation, Settings, Snapshot, TokenError,
    TokenIdentity, Trigger,
};
