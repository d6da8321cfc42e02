//! The `/v1/token` answer of one snapshot (SPEC 4), rendered once: every
//! member but `expires_in` is fixed for as long as the snapshot serves, so
//! a request only copies two slices around that one number.
//!
//! The members are written by `serde_json` (strings, extras) in SPEC's
//! order, so the bytes are those `http::answers::TokenBody` serialises to
//! (`token_json_is_what_serde_writes` compares them).
//!
//! Must not: read the clock or decide whether a token may be served (the
//! registry does); keep the rendered token outside a `secrecy` type.

use chrono::{DateTime, SecondsFormat, Utc};
use secrecy::{ExposeSecret, SecretSlice};

/// The JSON answer carrying one access token, without its `expires_in`.
pub struct TokenJson {
    /// `{"access_token":...,"expires_in":` then, from `split`,
    /// `,"provider":...}`. Secret: it holds the access token.
    bytes: SecretSlice<u8>,
    split: usize,
    expires_at: DateTime<Utc>,
}

/// What an answer is rendered from: the served token and whose it is.
pub struct TokenFields<'a> {
    pub provider: &'a str,
    pub account: &'a str,
    pub access_token: &'a str,
    pub token_type: &'a str,
    pub expires_at: DateTime<Utc>,
    /// The connection's extras (SPEC 11), left out when empty.
    pub extra: &'a crate::store::Extras,
}

impl TokenJson {
    /// Renders the answer for `t`.
    pub fn render(t: &TokenFields<'_>) -> TokenJson {
        let mut buf = Vec::with_capacity(
            160 + t.access_token.len() + t.token_type.len() + t.provider.len() + t.account.len(),
        );
        buf.extend_from_slice(b"{\"access_token\":");
        string(&mut buf, t.access_token);
        buf.extend_from_slice(b",\"token_type\":");
        string(&mut buf, t.token_type);
        buf.extend_from_slice(b",\"expires_at\":");
        string(
            &mut buf,
            &t.expires_at.to_rfc3339_opts(SecondsFormat::Secs, true),
        );
        buf.extend_from_slice(b",\"expires_in\":");
        let split = buf.len();
        buf.extend_from_slice(b",\"provider\":");
        string(&mut buf, t.provider);
        buf.extend_from_slice(b",\"account\":");
        string(&mut buf, t.account);
        if !t.extra.is_empty() {
            buf.extend_from_slice(b",\"extra\":");
            if serde_json::to_writer(&mut buf, t.extra).is_err() {
                // A map of JSON values into a Vec cannot fail.
                buf.extend_from_slice(b"{}");
            }
        }
        buf.push(b'}');
        TokenJson {
            bytes: buf.into(),
            split,
            expires_at: t.expires_at,
        }
    }

    /// When the token expires.
    pub fn expires_at(&self) -> DateTime<Utc> {
        self.expires_at
    }

    /// The whole answer saying `expires_in`, in one buffer sized exactly.
    pub fn body(&self, expires_in: i64) -> Vec<u8> {
        let bytes = self.bytes.expose_secret();
        let mut n = itoa::Buffer::new();
        let n = n.format(expires_in).as_bytes();
        let mut out = Vec::with_capacity(bytes.len() + n.len());
        out.extend_from_slice(&bytes[..self.split]);
        out.extend_from_slice(n);
        out.extend_from_slice(&bytes[self.split..]);
        out
    }

    /// [`TokenJson::body`] at `now`: the whole seconds left, never
    /// negative.
    pub fn body_at(&self, now: DateTime<Utc>) -> Vec<u8> {
        self.body((self.expires_at - now).num_seconds().max(0))
    }
}

/// A JSON string as serde_json writes it.
fn string(buf: &mut Vec<u8>, s: &str) {
    if serde_json::to_writer(&mut *buf, s).is_err() {
        // Writing a string into a Vec cannot fail.
        buf.extend_from_slice(b"\"\"");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expires_in_is_the_only_part_that_moves() {
        let extra = crate::store::Extras::new();
        let at = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let j = TokenJson::render(&TokenFields {
            provider: "keap",
            account: "default",
            access_token: "tok\"en",
            token_type: "Bearer",
            expires_at: at,
            extra: &extra,
        });
        assert_eq!(
            String::from_utf8(j.body(42)).unwrap(),
            r#"{"access_token":"tok\"en","token_type":"Bearer","expires_at":"2027-01-15T08:00:00Z","expires_in":42,"provider":"keap","account":"default"}"#
        );
        assert!(
            String::from_utf8(j.body_at(at + chrono::Duration::seconds(5)))
                .unwrap()
                .contains(r#""expires_in":0,"#)
        );
        let later = at - chrono::Duration::seconds(90);
        assert!(String::from_utf8(j.body_at(later))
            .unwrap()
            .contains(r#""expires_in":90,"#));
    }
}
