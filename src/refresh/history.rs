//! Which history events (SPEC 13) each lifecycle step records, so that
//! every hook in the engine stays one line. The events go to the store
//! with the write they describe (same transaction) where there is one.
//!
//! Must not: put a token in an event. Details are the reason sentences the
//! engine already logs and stores as `last_error`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};

use crate::provider::TokenGrant;
use crate::refresh::shared::Shared;
use crate::refresh::slot::Slot;
use crate::store::{EventKind, NewEvent};

/// An event of `kind` for `slot`'s connection.
pub fn of(slot: &Slot, at: DateTime<Utc>, kind: EventKind) -> NewEvent {
    NewEvent::new((&slot.provider, &slot.account), at, kind)
}

/// A committed refresh: `refreshed` with its round trip, and `rotated` if
/// the provider issued a refresh token other than the one it was given.
pub fn refreshed(
    slot: &Slot,
    at: DateTime<Utc>,
    elapsed: Duration,
    used: &SecretString,
    grant: &TokenGrant,
) -> Vec<NewEvent> {
    let mut events = vec![of(slot, at, EventKind::Refreshed).took(elapsed)];
    if grant
        .refresh_token
        .as_ref()
        .is_some_and(|t| t.expose_secret() != used.expose_secret())
    {
        events.push(of(slot, at, EventKind::Rotated));
    }
    events
}

/// A failed refresh of `class` (`transient`, `refused`, `unusable`,
/// `rejected`), with the reason.
pub fn failed(slot: &Slot, at: DateTime<Utc>, class: &str, reason: &str) -> NewEvent {
    of(slot, at, EventKind::RefreshFailed).detail(format!("{class}: {reason}"))
}

/// A refresh token the provider rejected: the failure, then the state it
/// leaves the grant in.
pub fn rejected(slot: &Slot, at: DateTime<Utc>, reason: &str) -> Vec<NewEvent> {
    vec![
        failed(slot, at, "rejected", reason),
        of(slot, at, EventKind::AuthorizationRequired).detail(reason),
    ]
}

/// A refresh whose holder died before storing its result, started at
/// `started`.
pub fn interrupted(name: (&str, &str), at: DateTime<Utc>, started: DateTime<Utc>) -> NewEvent {
    NewEvent::new(name, at, EventKind::Interrupted).detail(format!(
        "a refresh started at {} was interrupted before its result was stored",
        started.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    ))
}

/// Records events that go with no write of their own, without delaying
/// the caller (a bearer check answers at once).
pub fn record_later(shared: &Shared, events: Vec<NewEvent>) {
    let store = shared.store.clone();
    shared
        .tasks
        .spawn(async move { store.record_events(&events).await });
}
