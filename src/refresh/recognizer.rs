//! Recognising tokens by their keyed fingerprints: is this string one of
//! our refresh tokens (current or rotated out), or an access token we
//! issued? Used to reject refresh tokens presented as bearer tokens (SPEC 5)
//! and by `tokenkeeper inspect`.
//!
//! Lookups go through a hash map keyed by HMAC digests. That is constant
//! time with respect to the secret: the map is indexed by an HMAC under a
//! key the caller does not know, so timing reveals nothing about stored
//! tokens; the final equality check uses `subtle`.
//!
//! The store keeps the full 32-byte digests; memory keeps only the first
//! 8 bytes of each, as a `u64`. A connection holds up to
//! [`FINGERPRINTS_KEPT`] refresh and as many access fingerprints, and every
//! connection fills its lists in its lifetime, so with 10,000 connections
//! the index holds 1.28 million fingerprints: at 32 bytes of key, 16 of
//! value and the lists' own copies that was some 138 MB, now some 45.
//!
//! Truncating is safe because the HMAC key is secret: nobody can compute a
//! token's digest, so nobody can aim at a collision, and the 64 bits of a
//! keyed digest are uniformly distributed. An unrelated bearer token then
//! matches one of `n` held entries with probability `n / 2^64`: about
//! 7e-14 per lookup at 1.28 million entries. Two of our own tokens sharing
//! a prefix (about 4e-8 over the whole 1.28 million) would make the older
//! one unrecognised, as if it had been pruned; the store, which compares
//! full digests, is unaffected.

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

/// The first 8 bytes of a fingerprint's digest: what memory keeps of it.
type Key = u64;

fn key_of(digest: &[u8; 32]) -> Key {
    let mut head = [0; 8];
    head.copy_from_slice(&digest[..8]);
    Key::from_le_bytes(head)
}

/// Position of a kind in per-kind arrays.
fn slot_of(kind: TokenKind) -> usize {
    usize::from(kind == TokenKind::Access)
}

const KINDS: [TokenKind; 2] = [TokenKind::Refresh, TokenKind::Access];

#[derive(Default)]
struct Index {
    /// Per kind (refresh, access): key -> connection id. A map per kind
    /// rather than the kind in the value: an entry is 16 bytes, no padding.
    known: [HashMap<Key, i64>; 2],
    /// Connection id -> its keys per kind (refresh, access), oldest first.
    by_connection: HashMap<i64, [VecDeque<Key>; 2]>,
}

impl Index {
    fn insert(&mut self, connection_id: i64, kind: TokenKind, key: Key) {
        let slot = slot_of(kind);
        // Already known (the same token committed twice, or moved, or with
        // another kind): it now counts only once, as the newest.
        for (other, known) in self.known.iter_mut().enumerate() {
            if let Some(owner) = known.remove(&key) {
                if let Some(lists) = self.by_connection.get_mut(&owner) {
                    lists[other].retain(|k| *k != key);
                }
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
                if self.known[slot].get(&old) == Some(&connection_id) {
                    self.known[slot].remove(&old);
                }
            }
        }
        lists[slot].push_back(key);
        self.known[slot].insert(key, connection_id);
    }

    fn forget(&mut self, connection_id: i64) {
        if let Some(lists) = self.by_connection.remove(&connection_id) {
            for (slot, list) in lists.iter().enumerate() {
                for k in list {
                    if self.known[slot].get(k) == Some(&connection_id) {
                        self.known[slot].remove(k);
                    }
                }
            }
        }
    }

    fn len(&self) -> usize {
        self.known.iter().map(HashMap::len).sum()
    }

    /// The connection and kind holding `key`. Both maps are always
    /// searched, so the time taken does not tell which kind matched.
    fn find(&self, key: Key) -> Option<(TokenKind, i64)> {
        let mut found = None;
        for (slot, known) in self.known.iter().enumerate() {
            if let Some((stored, id)) = known.get_key_value(&key) {
                if bool::from(stored.to_le_bytes().ct_eq(&key.to_le_bytes())) {
                    found = Some((KINDS[slot], *id));
                }
            }
        }
        found
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
            index.insert(connection_id, fp.kind, key_of(&fp.digest));
        }
    }

    /// Makes the connection's fingerprints exactly `fps` (as stored, oldest
    /// first): after another process wrote the connection.
    pub fn replace(&self, connection_id: i64, fps: &[Fingerprint]) {
        let mut index = self.index.write().unwrap_or_else(|e| e.into_inner());
        index.forget(connection_id);
        for fp in fps {
            index.insert(connection_id, fp.kind, key_of(&fp.digest));
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
        self.index.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether no fingerprint is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What `token` is, if we know it: its kind and connection.
    pub fn lookup(&self, token: &str) -> Option<(TokenKind, i64)> {
        let key = key_of(&self.fingerprinter.digest(token));
        self.index
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .find(key)
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

    /// Bytes a map's table takes: hashbrown keeps 7/8 of a power-of-two
    /// number of buckets usable, each an entry and a control byte.
    fn table_bytes<K, V>(map: &HashMap<K, V>) -> usize {
        let buckets = (map.capacity() * 8 / 7).next_power_of_two();
        buckets * (std::mem::size_of::<(K, V)>() + 1)
    }

    #[test]
    fn a_full_index_of_ten_thousand_connections_stays_small() {
        // A fingerprint costs 8 bytes of key and 8 of connection in the
        // map, and 8 in its connection's list.
        assert_eq!(std::mem::size_of::<(Key, i64)>(), 16);
        assert_eq!(std::mem::size_of::<Key>(), 8);

        let connections = 10_000_i64;
        let kept = FINGERPRINTS_KEPT as usize;
        let mut index = Index::default();
        // Uniform keys, as keyed digests are, without hashing 1.3 million
        // tokens; one round past the bound, the steady state.
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = || {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        for _ in 0..=kept {
            for c in 0..connections {
                index.insert(c, TokenKind::Access, next());
                index.insert(c, TokenKind::Refresh, next());
            }
        }
        assert_eq!(index.len(), connections as usize * 2 * kept);

        let maps: usize = index.known.iter().map(table_bytes).sum();
        let lists: usize = index
            .by_connection
            .values()
            .flatten()
            .map(|l| l.capacity() * std::mem::size_of::<Key>())
            .sum();
        let total = maps + lists + table_bytes(&index.by_connection);
        // Full 32-byte digests took some 145 MB here by this estimate.
        assert!(
            total < 48 << 20,
            "10,000 full connections take {:.1} MB ({:.1} in the maps, {:.1} in the lists)",
            total as f64 / 1e6,
            maps as f64 / 1e6,
            lists as f64 / 1e6
        );
    }

    #[test]
    fn rotated_out_refresh_tokens_are_recognised_after_many_rotations() {
        let r = Recognizer::new([9; 32]);
        let kept = FINGERPRINTS_KEPT as usize;
        let rounds = kept * 3;
        // Connections rotating in turn, as the engine commits them.
        for i in 0..rounds {
            for c in 1..=3_i64 {
                r.add(
                    c,
                    &[
                        r.fingerprint(TokenKind::Access, &format!("access-{c}-{i}")),
                        r.fingerprint(TokenKind::Refresh, &format!("refresh-{c}-{i}")),
                    ],
                );
            }
        }
        for c in 1..=3_i64 {
            // Every refresh token still held by the store, from the current
            // one to the oldest kept, is recognised as its connection's.
            for i in rounds - kept..rounds {
                assert_eq!(
                    r.lookup(&format!("refresh-{c}-{i}")),
                    Some((TokenKind::Refresh, c)),
                    "refresh-{c}-{i}, {} rotations ago",
                    rounds - 1 - i
                );
                assert_eq!(
                    r.lookup(&format!("access-{c}-{i}")),
                    Some((TokenKind::Access, c))
                );
            }
            // Those the store pruned are not.
            for i in 0..rounds - kept {
                assert_eq!(r.lookup(&format!("refresh-{c}-{i}")), None);
            }
        }
        assert_eq!(r.lookup("never-issued"), None);
        assert_eq!(r.len(), 3 * 2 * kept);
    }
}
