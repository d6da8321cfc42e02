//! Secrets at rest: sealing tokens with an AEAD, and keyed fingerprints of
//! tokens (so the daemon can recognise a refresh token presented as a
//! bearer without keeping plaintext copies of old tokens).
//!
//! Nothing here touches the database or the network.

use std::path::Path;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, ExposeSecretMut, SecretBox, SecretString};
use sha2::Sha256;

/// Prefix of sealed values, so plaintext rows (written before a key was
/// configured) are recognised.
const SEALED_PREFIX: &str = "tk1:";

/// Why a key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read the key file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("the key file {path} must hold 32 random bytes in base64 (make one with `tokenkeeper genkey FILE`)")]
    Format { path: String },
}

/// A 32-byte AEAD key (XChaCha20-Poly1305).
pub struct SealKey {
    key: SecretBox<[u8; 32]>,
}

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealKey([redacted])")
    }
}

/// A sealed value could not be opened: wrong key, or tampered data.
#[derive(Debug, thiserror::Error)]
#[error("a stored secret cannot be decrypted (wrong storage.encryption_key_file, or the data was altered)")]
pub struct OpenError;

impl SealKey {
    pub fn from_bytes(bytes: [u8; 32]) -> SealKey {
        SealKey {
            key: SecretBox::new(Box::new(bytes)),
        }
    }

    /// Reads a key file: 32 bytes, base64, surrounding whitespace ignored.
    pub fn from_file(path: &Path) -> Result<SealKey, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let bytes = STANDARD.decode(text.trim()).map_err(|_| KeyError::Format {
            path: path.display().to_string(),
        })?;
        let arr: [u8; 32] = bytes.try_into().map_err(|_| KeyError::Format {
            path: path.display().to_string(),
        })?;
        Ok(SealKey::from_bytes(arr))
    }

    /// A fresh key from the operating system's random source, as the text
    /// [`SealKey::from_file`] reads: 32 bytes in standard base64 and a
    /// newline. An error when the OS cannot give randomness: a key from a
    /// weaker source is never made.
    pub fn generate_text() -> Result<SecretString, std::io::Error> {
        use rand::RngCore as _;
        let mut bytes = SecretBox::new(Box::new([0u8; 32]));
        rand::rngs::OsRng
            .try_fill_bytes(bytes.expose_secret_mut())
            .map_err(std::io::Error::other)?;
        let mut text = STANDARD.encode(bytes.expose_secret());
        text.push('\n');
        Ok(SecretString::from(text))
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new(self.key.expose_secret().into())
    }

    /// Seals `plain`, binding it to `context` (the connection's identity),
    /// so a sealed token copied onto another row does not open.
    pub fn seal(&self, plain: &str, context: &str) -> String {
        let nonce_bytes: [u8; 24] = rand::random();
        let nonce = XNonce::from_slice(&nonce_bytes);
        let sealed = self
            .cipher()
            .encrypt(
                nonce,
                Payload {
                    msg: plain.as_bytes(),
                    aad: context.as_bytes(),
                },
            )
            .expect("XChaCha20-Poly1305 encryption cannot fail for in-memory buffers");
        let mut out = nonce_bytes.to_vec();
        out.extend_from_slice(&sealed);
        format!("{SEALED_PREFIX}{}", STANDARD.encode(out))
    }

    /// Opens a value sealed by [`SealKey::seal`] with the same context.
    pub fn open(&self, stored: &str, context: &str) -> Result<SecretString, OpenError> {
        let b64 = stored.strip_prefix(SEALED_PREFIX).ok_or(OpenError)?;
        let raw = STANDARD.decode(b64).map_err(|_| OpenError)?;
        if raw.len() < 24 {
            return Err(OpenError);
        }
        let (nonce, body) = raw.split_at(24);
        let plain = self
            .cipher()
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: body,
                    aad: context.as_bytes(),
                },
            )
            .map_err(|_| OpenError)?;
        String::from_utf8(plain)
            .map(SecretString::from)
            .map_err(|_| OpenError)
    }
}

/// Whether a stored value is sealed.
pub fn is_sealed(stored: &str) -> bool {
    stored.starts_with(SEALED_PREFIX)
}

/// HMAC-SHA256 under a per-installation secret: the same token always maps
/// to the same digest here, and to nothing guessable anywhere else.
pub struct Fingerprinter {
    key: SecretBox<[u8; 32]>,
}

impl Fingerprinter {
    pub fn new(key: [u8; 32]) -> Fingerprinter {
        Fingerprinter {
            key: SecretBox::new(Box::new(key)),
        }
    }

    pub fn digest(&self, token: &str) -> [u8; 32] {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(self.key.expose_secret())
            .expect("HMAC accepts keys of any length");
        mac.update(token.as_bytes());
        mac.finalize().into_bytes().into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_roundtrip_and_context_binding() {
        let k = SealKey::from_bytes([7; 32]);
        let s = k.seal("secret-token", "keap/default");
        assert!(is_sealed(&s));
        assert!(!s.contains("secret-token"));
        assert_eq!(
            k.open(&s, "keap/default").unwrap().expose_secret(),
            "secret-token"
        );
        assert!(k.open(&s, "keap/other").is_err());
        assert!(SealKey::from_bytes([8; 32])
            .open(&s, "keap/default")
            .is_err());
        assert!(k.open("tk1:!!!", "x").is_err());
        assert!(k.open("plain", "x").is_err());
    }

    #[test]
    fn fingerprints_are_keyed() {
        let a = Fingerprinter::new([1; 32]);
        let b = Fingerprinter::new([2; 32]);
        assert_eq!(a.digest("t"), a.digest("t"));
        assert_ne!(a.digest("t"), a.digest("u"));
        assert_ne!(a.digest("t"), b.digest("t"));
    }

    #[test]
    fn key_file_format() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        std::fs::write(&p, format!("{}\n", STANDARD.encode([3u8; 32]))).unwrap();
        assert!(SealKey::from_file(&p).is_ok());
        std::fs::write(&p, "short").unwrap();
        assert!(matches!(
            SealKey::from_file(&p),
            Err(KeyError::Format { .. })
        ));
    }
}
