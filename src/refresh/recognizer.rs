//! Recognising tokens by their keyed fingerprints: is this string one of
//! our refresh tokens (current or rotated out), or an access token we
//! issued? Used to reject refresh tokens presented as bearer tokens (SPEC 5)
//! and by `tokenkeeper inspect`.
//!
//! Lookups go through a hash set of HMAC digests. That is constant time with
//! respect to the secret: the set is indexed by an HMAC under a key the
//! caller does not know, so timing reveals nothing about stored tokens; the
//! final equality check uses `subtle`.

use std::collections::{HashMap, VecDeque};
use std::sync::RwLock;

use subtle::ConstantTimeEq;

use crate::crypto::Fingerprinter;
use crate::store::{Fingerprint, TokenKind, FINGERPRINTS_KEPT};

/// In-memory index of fingerprints, mirrored from the store: it holds what
/// the store holds, no more. Fingerprints another process committed are
/// learnt when the engine syncs that connection ([`Recognizer::replace`]),
/// and the oldest beyond [`FINGERPRINTS_KEPT`] per kind, or all of a
/// forgotten connection, are dropped, as the store drops them.
pub struct Recognizer {
    fingerprinter: Fingerprinter,
    index: RwLock<Index>,
}

#[derive(Default)]
struct Index {
    /// digest -> (kind, connection id)
    known: HashMap<[u8; 32], (TokenKind, i64)>,
    /// connection id -> its digests per kind (refresh, access), oldest first.
    by_connection: HashMap<i64, [VecDeque<[u8; 32]>; 2]>,
}

impl Index {
    fn insert(&mut self, connection_id: i64, fp: &Fingerprint) {
        let slot = usize::from(fp.kind == TokenKind::Access);
        // Already known (the same token committed twice, or moved): it now
        // counts only once, as the newest.
        if let Some((kind, owner)) = self.known.insert(fp.digest, (fp.kind, connection_id)) {
            if let Some(lists) = self.by_connection.get_mut(&owner) {
                lists[usize::from(kind == TokenKind::Access)].retain(|d| d != &fp.digest);
            }
        }
        let lists = self.by_connection.entry(connection_id).or_default();
        let kept = usize::try_from(FINGERPRINTS_KEPT)
            .unwrap_or(usize::MAX)
            .max(1);
        // The oldest leave before the newest enters: a full list pushed
        // first would double its capacity, and every connection's list
        // fills up in its lifetime, so that would double this index.
        while lists[slot].len() >= kept {
            if let Some(old) = lists[slot].pop_front() {
                if self
                    .known
                    .get(&old)
                    .is_some_and(|(_, c)| *c == connection_id)
                {
                    self.known.remove(&old);
                }
            }
        }
        lists[slot].push_back(fp.digest);
    }

    fn forget(&mut self, connection_id: i64) {
        if let Some(lists) = self.by_connection.remove(&connection_id) {
            for d in lists.iter().flatten() {
                if self.known.get(d).is_some_and(|(_, c)| *c == connection_id) {
                    self.known.remove(d);
                }
            }
        }
    }
}

impl Recognizer {
    /// An empty index; `add` fills it.
    pub fn new(key: [u8; 32]) -> Recognizer {
        Recognizer {
            fingerprinter: Fingerprinter::new(key),
            index: RwLock::new(Index::default()),
        }
    }

    /// Fingerprint of a token of the given kind.
    pub fn fingerprint(&self, kind: TokenKind, token: &str) -> Fingerprint {
        Fingerprint {
            kind,
            digest: self.fingerprinter.digest(token),
        }
    }

    /// Remembers fingerprints after they were committed (oldest first),
    /// dropping the oldest beyond what the store keeps.
    pub fn add(&self, connection_id: i64, fps: &[Fingerprint]) {
        let mut index = self.index.write().unwrap_or_else(|e| e.into_inner());
        for fp in fps {
            index.insert(connection_id, fp);
        }
    }

    /// Makes the connection's fingerprints exactly `fps` (as stored, oldest
    /// first): after another process wrote the connection.
    pub fn replace(&self, connection_id: i64, fps: &[Fingerprint]) {
        let mut index = self.index.write().unwrap_or_else(|e| e.into_inner());
        index.forget(connection_id);
        for fp in fps {
            index.insert(connection_id, fp);
        }
    }

    /// Forgets every fingerprint of a forgotten connection.
    pub fn forget(&self, connection_id: i64) {
        self.index
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .forget(connection_id);
    }

    /// How many fingerprints are held (for tests and diagnostics).
    pub fn len(&self) -> usize {
        self.index
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .known
            .len()
    }

    /// Whether no fingerprint is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What `token` is, if we know it: its kind and connection.
    pub fn lookup(&self, token: &str) -> Option<(TokenKind, i64)> {
        let digest = self.fingerprinter.digest(token);
        let index = self.index.read().unwrap_or_else(|e| e.into_inner());
        let (stored, found) = index.known.get_key_value(&digest)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_what_the_store_keeps_and_forgets_the_rest() {
        let r = Recognizer::new([7; 32]);
        let kept = FINGERPRINTS_KEPT as usize;
        let tokens: Vec<String> = (0..kept + 3).map(|i| format!("refresh-{i}")).collect();
        for t in &tokens {
            r.add(1, &[r.fingerprint(TokenKind::Refresh, t)]);
        }
        r.add(1, &[r.fingerprint(TokenKind::Access, "access-0")]);
        // The oldest three were pruned, as `record_fingerprints` prunes them.
        for t in &tokens[..3] {
            assert_eq!(r.lookup(t), None, "{t} should be forgotten");
        }
        for t in &tokens[3..] {
            assert_eq!(r.lookup(t), Some((TokenKind::Refresh, 1)));
        }
        assert_eq!(r.len(), kept + 1);

        // Another process rotated: the stored set replaces ours.
        r.replace(1, &[r.fingerprint(TokenKind::Refresh, "theirs")]);
        assert_eq!(r.lookup("theirs"), Some((TokenKind::Refresh, 1)));
        assert_eq!(r.lookup(&tokens[kept]), None);

        r.add(2, &[r.fingerprint(TokenKind::Refresh, "other")]);
        r.forget(1);
        assert_eq!(r.lookup("theirs"), None);
        assert_eq!(r.lookup("other"), Some((TokenKind::Refresh, 2)));
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn a_full_list_keeps_its_size_through_many_rotations() {
        let r = Recognizer::new([7; 32]);
        let kept = FINGERPRINTS_KEPT as usize;
        // Far more rotations than are kept: each adds a refresh and an
        // access fingerprint, as a commit does.
        for i in 0..kept * 5 {
            r.add(
                1,
                &[
                    r.fingerprint(TokenKind::Access, &format!("access-{i}")),
                    r.fingerprint(TokenKind::Refresh, &format!("refresh-{i}")),
                ],
            );
        }
        assert_eq!(r.len(), 2 * kept);
        let index = r.index.read().unwrap();
        for list in &index.by_connection[&1] {
            assert_eq!(list.len(), kept);
            // Memory held stays what the kept fingerprints need, not twice
            // that: the list never grows past its bound.
            assert!(
                list.capacity() < 2 * kept,
                "a list of {kept} holds room for {}",
                list.capacity()
            );
        }
    }
}
