//! The client-credentials grant (`grant = "client_credentials"`, SPEC 10):
//! no person and no refresh token; the daemon asks the token endpoint with
//! the client's own credentials, under account `default`.
//!
//! Such a connection is an ordinary connection from its birth on: at start
//! (and at each reload) [`ensure`] gives every client-credentials provider
//! without one a stored row that holds no usable token (`retrying`, due at
//! once), and from then on the scheduler and callers obtain and renew its
//! token through the ordinary flight: under the lease (one token request
//! per connection in the whole cluster), on the refresh schedule, failures
//! ended by class. The flight's only difference is the request it sends
//! (`flight::call_once`). A forgotten connection comes back at the next
//! start or reload.
//!
//! Must not: call the provider itself (the flight does), or store anything
//! as a refresh token.

use super::shared::Shared;
use crate::config::GrantKind;
use crate::store::StoreError;

/// The account a client-credentials provider's token is kept under.
pub const ACCOUNT: &str = "default";

/// What a connection says until its first token has been obtained.
pub const NOT_OBTAINED_YET: &str =
    "no token obtained yet: the client-credentials grant asks the token endpoint at the next scheduler pass";

/// Gives every configured client-credentials provider its connection
/// (stored, and loaded into a slot) when it has none yet; how many were
/// added here. Another process may have stored it first: then its row, as
/// stored, is loaded.
pub async fn ensure(shared: &Shared) -> Result<usize, StoreError> {
    let settings = shared.settings();
    let mut added = 0;
    for (name, provider) in &settings.providers {
        if provider.config.grant != GrantKind::ClientCredentials
            || shared.slots.get(name, ACCOUNT).is_some()
        {
            continue;
        }
        let now = shared.clock().now();
        if let Some(row) = shared
            .store
            .ensure_connection(name, ACCOUNT, now, NOT_OBTAINED_YET)
            .await?
        {
            shared.learn_fingerprints(row.id).await?;
            shared.install(&row);
            added += 1;
        }
    }
    Ok(added)
}
