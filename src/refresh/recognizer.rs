//! Recognising tokens by their keyed fingerprints: is this string one of
//! our refresh tokens (current or rotated out), or an access token we
//! issued? Used to reject refresh tokens presented as bearer tokens (SPEC 5)
//! and by `tokenkeeper inspect`.
//!
//! Lookups go through a hash set of HMAC digests. That is constant time with
//! respect to the secret: the set is indexed by an HMAC under a key the
//! caller does not know, so timing reveals nothing about stored tokens; the
//! final equality check uses `subtle`.

use std::collections::HashMap;
use std::sync::RwLock;

use subtle::ConstantTimeEq;

use crate::crypto::Fingerprinter;
use crate::store::{Fingerprint, TokenKind};

/// In-memory index of fingerprints, mirrored from the store.
pub struct Recognizer {
    fingerprinter: Fingerprinter,
    /// digest -> (kind, connection id)
    known: RwLock<HashMap<[u8; 32], (TokenKind, i64)>>,
}

impl Recognizer {
    /// An empty index; `add` fills it.
    pub fn new(key: [u8; 32]) -> Recognizer {
        Recognizer {
            fingerprinter: Fingerprinter::new(key),
            known: RwLock::new(HashMap::new()),
        }
    }

    /// Fingerprint of a token of the given kind.
    pub fn fingerprint(&self, kind: TokenKind, token: &str) -> Fingerprint {
        Fingerprint {
            kind,
            digest: self.fingerprinter.digest(token),
        }
    }

    /// Remembers fingerprints after they were committed.
    pub fn add(&self, connection_id: i64, fps: &[Fingerprint]) {
        let mut known = self.known.write().unwrap_or_else(|e| e.into_inner());
        for fp in fps {
            known.insert(fp.digest, (fp.kind, connection_id));
        }
    }

    /// What `token` is, if we know it: its kind and connection.
    pub fn lookup(&self, token: &str) -> Option<(TokenKind, i64)> {
        let digest = self.fingerprinter.digest(token);
        let known = self.known.read().unwrap_or_else(|e| e.into_inner());
        let (stored, found) = known.get_key_value(&digest)?;
        bool::from(stored.ct_eq(&digest)).then_some(*found)
    }

    /// Whether two tokens are the same, without early exit.
    pub fn same(&self, a: &str, b: &str) -> bool {
        self.fingerprinter
            .digest(a)
            .ct_eq(&self.fingerprinter.digest(b))
            .into()
    }
}
