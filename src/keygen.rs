//! `tokenkeeper genkey`: a new encryption key for
//! `storage.encryption_key_file`, made by
//! [`SealKey::generate_text`](crate::crypto::SealKey::generate_text) and
//! written to a new file that only its owner can read.
//!
//! A key file is never overwritten (tokens sealed with the key it held
//! could no longer be read) and never written through a symbolic link
//! (whoever planted the link would choose where the key lands). Needs no
//! config and no daemon; the key reaches no log line and no error message.

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use secrecy::{ExposeSecret as _, SecretString};

/// Mode of a key file: read and write for its owner alone, as
/// `LoadCredential=` and the daemon's own check (which warns about a key
/// file others can read) expect.
pub const KEY_FILE_MODE: u32 = 0o600;

/// Why a key file was not written. Nothing is left behind in any case.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// The path names a symbolic link (even a dangling one).
    #[error("{path} is a symbolic link; a key is never written through a link: give the path of a new regular file")]
    Symlink { path: PathBuf },
    /// The path names something that already exists.
    #[error("{path} already exists and is never overwritten (tokens sealed with the key it holds could no longer be read); choose a new file name, or remove it first if no database uses that key")]
    Exists { path: PathBuf },
    /// Creating, writing or syncing the file failed.
    #[error("cannot write the key file {path}: {source}; check that its directory exists and is writable")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl KeyFileError {
    /// Whether the operator asked for something refused (exit 2), rather
    /// than the system failing to do it (exit 1).
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            KeyFileError::Symlink { .. } | KeyFileError::Exists { .. }
        )
    }
}

/// Creates `path` holding `key`, with mode [`KEY_FILE_MODE`] whatever the
/// umask: created exclusively (`O_CREAT|O_EXCL|O_NOFOLLOW`), so an existing
/// file or link is refused instead of followed or replaced, then synced with
/// its directory. A file that could not be completely written is removed.
pub fn write_new_key_file(path: &Path, key: &SecretString) -> Result<(), KeyFileError> {
    let io = |source| KeyFileError::Io {
        path: path.to_path_buf(),
        source,
    };
    let opened = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(KEY_FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path);
    let mut file = match opened {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let is_link = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
            return Err(if is_link {
                KeyFileError::Symlink {
                    path: path.to_path_buf(),
                }
            } else {
                KeyFileError::Exists {
                    path: path.to_path_buf(),
                }
            });
        }
        Err(e) => return Err(io(e)),
    };
    let written = file
        // The umask may have taken bits away from the creation mode.
        .set_permissions(std::fs::Permissions::from_mode(KEY_FILE_MODE))
        .and_then(|()| file.write_all(key.expose_secret().as_bytes()))
        .and_then(|()| file.sync_all());
    drop(file);
    if let Err(e) = written {
        let _ = std::fs::remove_file(path);
        return Err(io(e));
    }
    // The new name itself must survive a crash, not only the bytes.
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::SealKey;

    #[test]
    fn generated_keys_load_and_differ() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        write_new_key_file(&a, &SealKey::generate_text().unwrap()).unwrap();
        write_new_key_file(&b, &SealKey::generate_text().unwrap()).unwrap();
        let mode = std::fs::metadata(&a).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o600);
        SealKey::from_file(&a).expect("the daemon reads a generated key");
        SealKey::from_file(&b).expect("the daemon reads a generated key");
        assert_ne!(
            std::fs::read(&a).unwrap(),
            std::fs::read(&b).unwrap(),
            "two keys are never the same"
        );
    }

    #[test]
    fn existing_files_and_links_are_refused_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let key = SealKey::generate_text().unwrap();
        let existing = dir.path().join("existing");
        std::fs::write(&existing, "old key\n").unwrap();
        let e = write_new_key_file(&existing, &key).unwrap_err();
        assert!(
            matches!(e, KeyFileError::Exists { .. }) && e.is_usage(),
            "{e}"
        );
        assert_eq!(std::fs::read_to_string(&existing).unwrap(), "old key\n");

        let dangling = dir.path().join("dangling");
        std::os::unix::fs::symlink(dir.path().join("target"), &dangling).unwrap();
        let e = write_new_key_file(&dangling, &key).unwrap_err();
        assert!(matches!(e, KeyFileError::Symlink { .. }), "{e}");
        assert!(
            !dir.path().join("target").exists(),
            "nothing written through the link"
        );

        let missing = dir.path().join("no-such-dir").join("key");
        let e = write_new_key_file(&missing, &key).unwrap_err();
        assert!(matches!(e, KeyFileError::Io { .. }) && !e.is_usage(), "{e}");
        assert!(!e.to_string().contains(key.expose_secret().trim()));
    }
}
