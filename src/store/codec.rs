//! Sealing and decoding shared by every backend: what a stored value means
//! does not depend on where it is stored.
//!
//! Sealed tokens (with `storage.encryption_key_file`) are bound to their
//! place: the associated data names the connection, the column and the
//! grant generation the row has once the write lands, so a value swapped
//! between columns, moved to another row or replayed from an older grant
//! does not open. A row that cannot be read (such a value, an unknown
//! state, a bad timestamp) decodes as a stand-in (see [`Codec::decode`]).
//!
//! Must not: run SQL (backends hand it rows through [`Columns`]).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, TimeZone, Utc};
use secrecy::{ExposeSecret, SecretString};

use super::{ConnState, ConnectionRow, GrantMeta, NewGrant, PendingAuthorization, StoreError};
use crate::crypto::{self, SealKey};

/// The columns every backend selects for a connection, in this order.
pub const COLUMNS: &str = "id, provider, account, state, access_token, refresh_token, token_type, scope, \
    expires_at, issued_at, refreshed_at, refresh_token_issued_at, generation, last_error, failures, \
    next_attempt_at, lease_owner, lease_until, attempt_id, attempt_started_at, interrupted_at, \
    extra, refresh_token_expires_at, refresh_token_cap_at";

/// The columns of a pending authorization, in this order.
pub const PENDING_COLUMNS: &str =
    "state, provider, account, pkce_verifier, redirect_uri, browser_hash, created_at, expires_at";

/// Associated data of the key check value in `installation`.
pub const KEY_CHECK_CONTEXT: &str = "key-check";

/// Value of `installation.seal_format` once every token is sealed with
/// [`SealContext::column`].
pub const SEAL_FORMAT: &str = "2";

/// Reading one column of a stored row, whatever the backend: a value that
/// cannot be read is a sentence naming the column, never a panic.
pub trait Columns {
    fn int(&self, column: &str) -> Result<i64, String>;
    fn opt_int(&self, column: &str) -> Result<Option<i64>, String>;
    fn text(&self, column: &str) -> Result<String, String>;
    fn opt_text(&self, column: &str) -> Result<Option<String>, String>;
}

/// Implements [`Columns`] for a backend's row type.
macro_rules! impl_columns {
    ($row:ty) => {
        impl $crate::store::codec::Columns for $row {
            fn int(&self, column: &str) -> Result<i64, String> {
                sqlx::Row::try_get::<i64, _>(self, column)
                    .map_err(|e| format!("column {column} cannot be read ({e})"))
            }
            fn opt_int(&self, column: &str) -> Result<Option<i64>, String> {
                sqlx::Row::try_get::<Option<i64>, _>(self, column)
                    .map_err(|e| format!("column {column} cannot be read ({e})"))
            }
            fn text(&self, column: &str) -> Result<String, String> {
                sqlx::Row::try_get::<String, _>(self, column)
                    .map_err(|e| format!("column {column} cannot be read ({e})"))
            }
            fn opt_text(&self, column: &str) -> Result<Option<String>, String> {
                sqlx::Row::try_get::<Option<String>, _>(self, column)
                    .map_err(|e| format!("column {column} cannot be read ({e})"))
            }
        }
    };
}
pub(crate) use impl_columns;

/// Which sealed column a value belongs to (part of its associated data).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Column {
    AccessToken,
    RefreshToken,
}

impl Column {
    fn as_str(self) -> &'static str {
        match self {
            Column::AccessToken => "access_token",
            Column::RefreshToken => "refresh_token",
        }
    }
}

/// What a sealed token's associated data names: its connection, and the
/// grant generation the row has once the write lands (with the column,
/// see [`SealContext::column`]).
pub struct SealContext<'a> {
    pub provider: &'a str,
    pub account: &'a str,
    pub generation: i64,
}

impl SealContext<'_> {
    /// The associated data of `column` in this row at this generation.
    pub fn column(&self, column: Column) -> String {
        format!(
            "connection:{}/{}:{}:generation:{}",
            self.provider,
            self.account,
            column.as_str(),
            self.generation
        )
    }

    /// The binding before `SEAL_FORMAT` 2: the connection only.
    pub fn legacy(&self) -> String {
        format!("connection:{}/{}", self.provider, self.account)
    }
}

/// Associated data of a pending authorization's PKCE verifier.
pub fn pending_context(state: &str) -> String {
    format!("pending:{state}")
}

/// Seals and opens values, decodes rows, and remembers which rows were
/// found unreadable; cheap to clone (one per store, shared by its clones).
#[derive(Clone)]
pub struct Codec {
    /// Tokens are sealed with this key when `storage.encryption_key_file`
    /// is set; `None` stores them as they are.
    seal: Option<Arc<SealKey>>,
    /// Ids of rows found unreadable, so each is logged once (not at every
    /// scheduler pass that re-reads it) and counted in the metric.
    unreadable: Arc<Mutex<HashSet<i64>>>,
}

impl Codec {
    /// A codec sealing with `key` (or storing tokens as they are).
    pub fn new(key: Option<SealKey>) -> Codec {
        Codec {
            seal: key.map(Arc::new),
            unreadable: Arc::new(Mutex::new(HashSet::new())),
        }
    }

    /// Whether tokens are sealed at rest.
    pub fn encrypted(&self) -> bool {
        self.seal.is_some()
    }

    /// The sealing key, if any.
    pub fn key(&self) -> Option<&SealKey> {
        self.seal.as_deref()
    }

    /// Whether row `id` was last seen unreadable.
    pub fn is_unreadable(&self, id: i64) -> bool {
        self.lock().contains(&id)
    }

    /// Whether no row is known unreadable.
    pub fn none_unreadable(&self) -> bool {
        self.lock().is_empty()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<i64>> {
        self.unreadable.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Seals the token pair of a row that will have `generation` once the
    /// write lands.
    pub fn seal_pair(
        &self,
        (provider, account): (&str, &str),
        generation: i64,
        g: &NewGrant<'_>,
    ) -> (String, Option<String>) {
        let ctx = SealContext {
            provider,
            account,
            generation,
        };
        (
            self.seal_value(g.access_token, &ctx.column(Column::AccessToken)),
            g.refresh_token
                .map(|t| self.seal_value(t, &ctx.column(Column::RefreshToken))),
        )
    }

    /// Seals one value under `ctx` (or returns it as it is, without a key).
    pub fn seal_value(&self, plain: &SecretString, ctx: &str) -> String {
        match &self.seal {
            Some(k) => k.seal(plain.expose_secret(), ctx),
            None => plain.expose_secret().to_string(),
        }
    }

    /// Opens one stored value sealed under `ctx`.
    pub fn open_value(&self, stored: String, ctx: &str) -> Result<SecretString, StoreError> {
        match &self.seal {
            Some(k) => Ok(k.open(&stored, ctx)?),
            None if crypto::is_sealed(&stored) => Err(StoreError::KeyRequired),
            None => Ok(SecretString::from(stored)),
        }
    }

    /// The refresh token a grant of `generation - 1` holds, sealed again
    /// for `generation`: an answer without a new refresh token keeps the
    /// stored one (SPEC 7), but sealed it is bound to the generation it
    /// was written under. `None` without a key (nothing to re-seal).
    pub fn reseal_kept(
        &self,
        (provider, account): (&str, &str),
        generation: i64,
        stored: String,
    ) -> Result<Option<String>, StoreError> {
        if self.seal.is_none() {
            return Ok(None);
        }
        let ctx = |generation| SealContext {
            provider,
            account,
            generation,
        };
        let plain = self.open_value(stored, &ctx(generation - 1).column(Column::RefreshToken))?;
        Ok(Some(self.seal_value(
            &plain,
            &ctx(generation).column(Column::RefreshToken),
        )))
    }

    /// A pending authorization as stored.
    pub fn pending<R: Columns>(
        &self,
        r: &R,
        state: &str,
    ) -> Result<PendingAuthorization, StoreError> {
        let corrupt = StoreError::Corrupt;
        let verifier = r
            .opt_text("pkce_verifier")
            .map_err(corrupt)?
            .map(|v| self.open_value(v, &pending_context(state)))
            .transpose()?;
        Ok(PendingAuthorization {
            state: r.text("state").map_err(corrupt)?,
            provider: r.text("provider").map_err(corrupt)?,
            account: r.text("account").map_err(corrupt)?,
            pkce_verifier: verifier,
            redirect_uri: r.text("redirect_uri").map_err(corrupt)?,
            browser_hash: r.text("browser_hash").map_err(corrupt)?,
            created_at: super::from_ms(r.int("created_at").map_err(corrupt)?),
            expires_at: super::from_ms(r.int("expires_at").map_err(corrupt)?),
        })
    }

    /// A row as the lifecycle sees it: tokens opened. Only a row whose
    /// identity (id, provider, account) cannot be read is an error; any
    /// other problem yields the row as unreadable: no token, expired, and
    /// `authorization_required` with the problem as its last error, so it
    /// is reported and refused like a rejected grant, and a new
    /// authorization (which rewrites the whole row) repairs it.
    pub fn decode<R: Columns>(&self, r: &R) -> Result<ConnectionRow, StoreError> {
        let id = r.int("id").map_err(StoreError::Corrupt)?;
        let provider = r.text("provider").map_err(StoreError::Corrupt)?;
        let account = r.text("account").map_err(StoreError::Corrupt)?;
        match self.decode_fields(r, id, &provider, &account) {
            Ok(row) => {
                self.set_unreadable(id, None, &provider, &account);
                Ok(row)
            }
            Err(problem) => {
                let message = format!(
                    "the stored grant cannot be read ({problem}); it is not used: authorize {provider}/{account} again (tokenkeeper connect {provider} {account}) or restore a backup"
                );
                self.set_unreadable(id, Some(&message), &provider, &account);
                let generation = r.int("generation").unwrap_or(0);
                Ok(unreadable_row(id, provider, account, generation, message))
            }
        }
    }

    /// [`Codec::decode`] for the readers that must go on past one row: a
    /// row whose very identity cannot be read is logged once (error level,
    /// counted as unreadable) and skipped rather than failing them all.
    pub fn decode_or_skip<R: Columns>(&self, r: &R) -> Option<ConnectionRow> {
        match self.decode(r) {
            Ok(row) => Some(row),
            Err(e) => {
                let id = r.int("id").unwrap_or(-1);
                let message = format!(
                    "the stored connection row {id} cannot be read at all ({e}); it is skipped: delete it (DELETE FROM connections WHERE id = {id}) or restore a backup"
                );
                self.set_unreadable(id, Some(&message), "?", "?");
                None
            }
        }
    }

    fn decode_fields<R: Columns>(
        &self,
        r: &R,
        id: i64,
        provider: &str,
        account: &str,
    ) -> Result<ConnectionRow, String> {
        let generation = r.int("generation")?;
        let ctx = SealContext {
            provider,
            account,
            generation,
        };
        let open = |column: Column, v: String| {
            self.open_value(v, &ctx.column(column)).map_err(|e| match e {
                StoreError::KeyRequired => format!(
                    "its {} is encrypted but storage.encryption_key_file is not set",
                    column.as_str()
                ),
                _ => format!(
                    "its {} does not decrypt: it was altered, moved from another row or column, or replayed from an older grant",
                    column.as_str()
                ),
            })
        };
        let state = r.text("state")?;
        let state = ConnState::parse(&state).map_err(|_| format!("unknown state {state:?}"))?;
        Ok(ConnectionRow {
            id,
            state,
            access_token: open(Column::AccessToken, r.text("access_token")?)?,
            refresh_token: r
                .opt_text("refresh_token")?
                .map(|v| open(Column::RefreshToken, v))
                .transpose()?,
            provider: provider.to_owned(),
            account: account.to_owned(),
            token_type: r.text("token_type")?,
            scope: r.opt_text("scope")?,
            expires_at: instant(r, "expires_at")?,
            issued_at: instant(r, "issued_at")?,
            refreshed_at: opt_instant(r, "refreshed_at")?,
            refresh_token_issued_at: instant(r, "refresh_token_issued_at")?,
            generation,
            last_error: r.opt_text("last_error")?,
            failures: r.int("failures")?.clamp(0, u32::MAX as i64) as u32,
            next_attempt_at: opt_instant(r, "next_attempt_at")?,
            lease_owner: r.opt_text("lease_owner")?,
            lease_until: opt_instant(r, "lease_until")?,
            attempt_id: r.opt_text("attempt_id")?,
            attempt_started_at: opt_instant(r, "attempt_started_at")?,
            interrupted_at: opt_instant(r, "interrupted_at")?,
            meta: GrantMeta {
                extra: GrantMeta::parse_extra(r.opt_text("extra")?.as_deref()),
                refresh_token_expires_at: opt_instant(r, "refresh_token_expires_at")?,
                refresh_token_cap_at: opt_instant(r, "refresh_token_cap_at")?,
            },
            unreadable: None,
        })
    }

    /// Records whether row `id` is unreadable; logs (error level) the first
    /// time it is seen so, and keeps the gauge in step.
    pub fn set_unreadable(&self, id: i64, message: Option<&str>, provider: &str, account: &str) {
        let mut set = self.lock();
        if message.is_none() && set.is_empty() {
            return;
        }
        let changed = match message {
            Some(m) => {
                let new = set.insert(id);
                if new {
                    tracing::error!(provider, account, "{m}");
                }
                new
            }
            None => set.remove(&id),
        };
        if changed {
            metrics::gauge!(crate::metrics::UNREADABLE_CONNECTIONS).set(set.len() as f64);
        }
    }
}

/// The stand-in for a row that cannot be read (see [`Codec::decode`]).
/// Keeps the stored generation, so comparing versions does not re-read it
/// as changed.
fn unreadable_row(
    id: i64,
    provider: String,
    account: String,
    generation: i64,
    message: String,
) -> ConnectionRow {
    let epoch = DateTime::<Utc>::UNIX_EPOCH;
    ConnectionRow {
        id,
        provider,
        account,
        state: ConnState::AuthorizationRequired,
        access_token: SecretString::from(String::new()),
        refresh_token: None,
        token_type: "Bearer".into(),
        scope: None,
        expires_at: epoch,
        issued_at: epoch,
        refreshed_at: None,
        refresh_token_issued_at: epoch,
        generation,
        last_error: Some(message.clone()),
        failures: 0,
        next_attempt_at: None,
        lease_owner: None,
        lease_until: None,
        attempt_id: None,
        attempt_started_at: None,
        interrupted_at: None,
        meta: GrantMeta::default(),
        unreadable: Some(message),
    }
}

fn instant<R: Columns>(r: &R, column: &str) -> Result<DateTime<Utc>, String> {
    let ms = r.int(column)?;
    checked_ms(ms).ok_or_else(|| format!("{column} holds an impossible instant ({ms} ms)"))
}

fn opt_instant<R: Columns>(r: &R, column: &str) -> Result<Option<DateTime<Utc>>, String> {
    match r.opt_int(column)? {
        None => Ok(None),
        Some(ms) => checked_ms(ms)
            .map(Some)
            .ok_or_else(|| format!("{column} holds an impossible instant ({ms} ms)")),
    }
}

/// An instant chrono can represent; anything else is damage. Far-future
/// but representable values stay readable: such a row still holds a
/// working grant, and losing it would cost a new authorization.
fn checked_ms(ms: i64) -> Option<DateTime<Utc>> {
    Utc.timestamp_millis_opt(ms).single()
}

/// Re-seals one row's tokens under `new` for its current generation,
/// opening each with `open`; `None` if either does not open.
pub fn reseal_row(
    new: &SealKey,
    ctx: &SealContext<'_>,
    (access, refresh): (&str, Option<&str>),
    open: &(dyn Fn(&SealContext<'_>, Column, &str) -> Option<SecretString> + Sync),
) -> Option<(String, Option<String>)> {
    let access = open(ctx, Column::AccessToken, access)?;
    let refresh = match refresh {
        None => None,
        Some(v) => Some(open(ctx, Column::RefreshToken, v)?),
    };
    Some((
        new.seal(access.expose_secret(), &ctx.column(Column::AccessToken)),
        refresh.map(|t| new.seal(t.expose_secret(), &ctx.column(Column::RefreshToken))),
    ))
}
