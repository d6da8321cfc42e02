//! HTTPS for the local endpoint: Keap only accepts HTTPS redirect URIs, so
//! the callback must be served over TLS. Either a certificate generated at
//! first start (rcgen, kept in the state directory, valid for localhost,
//! 127.0.0.1 and ::1) or the operator's own files. rustls with ring only.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;

/// Names the generated certificate is valid for.
const SELF_SIGNED_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// Why HTTPS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: String, source: io::Error },
    #[error("{path} holds no usable PEM {what}; check server.tls")]
    Pem { path: String, what: &'static str },
    #[error("cannot generate the self-signed certificate: {0}")]
    Generate(String),
    #[error("the certificate and key do not form a valid TLS configuration: {0}")]
    Config(String),
}

/// What the server needs, plus the fingerprint operators compare.
pub struct TlsMaterial {
    pub acceptor: TlsAcceptor,
    /// SHA-256 of the leaf certificate (DER), colon-separated hex.
    pub fingerprint: String,
    pub cert_path: PathBuf,
}

/// SHA-256 fingerprint in the usual `AB:CD:...` form.
pub fn fingerprint(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Paths of the generated certificate inside the state directory.
pub fn self_signed_paths(state_dir: &Path) -> (PathBuf, PathBuf) {
    (
        state_dir.join("tls-cert.pem"),
        state_dir.join("tls-key.pem"),
    )
}

/// Loads (or, for `self-signed`, creates once) the server certificate.
pub fn load(
    cfg: &TlsConfig,
    state_dir: &Path,
    extra_name: Option<&str>,
) -> Result<Option<TlsMaterial>, TlsError> {
    let (cert_path, key_path) = match cfg {
        TlsConfig::Off => return Ok(None),
        TlsConfig::Files {
            cert_file,
            key_file,
        } => (cert_file.clone(), key_file.clone()),
        TlsConfig::SelfSigned => {
            let (cert, key) = self_signed_paths(state_dir);
            if !cert.exists() || !key.exists() {
                generate(&cert, &key, extra_name)?;
            }
            (cert, key)
        }
    };
    let read_err = |p: &Path| {
        let path = p.display().to_string();
        move |e: rustls::pki_types::pem::Error| match e {
            rustls::pki_types::pem::Error::Io(source) => TlsError::Read { path, source },
            _ => TlsError::Pem {
                path,
                what: "certificate or key",
            },
        }
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert_path)
        .map_err(read_err(&cert_path))?
        .collect::<Result<_, _>>()
        .map_err(read_err(&cert_path))?;
    let Some(leaf) = certs.first() else {
        return Err(TlsError::Pem {
            path: cert_path.display().to_string(),
            what: "certificate",
        });
    };
    let fp = fingerprint(leaf.as_ref());
    let key = PrivateKeyDer::from_pem_file(&key_path).map_err(read_err(&key_path))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(TlsMaterial {
        acceptor: TlsAcceptor::from(Arc::new(config)),
        fingerprint: fp,
        cert_path,
    }))
}

fn generate(cert: &Path, key: &Path, extra_name: Option<&str>) -> Result<(), TlsError> {
    let mut names: Vec<String> = SELF_SIGNED_NAMES.iter().map(|s| s.to_string()).collect();
    if let Some(n) = extra_name.filter(|n| !names.iter().any(|x| x == n)) {
        names.push(n.trim_start_matches('[').trim_end_matches(']').to_string());
    }
    let certified =
        rcgen::generate_simple_self_signed(names).map_err(|e| TlsError::Generate(e.to_string()))?;
    if let Some(dir) = cert.parent() {
        crate::store::create_private_dir(dir).map_err(|source| TlsError::Write {
            path: dir.display().to_string(),
            source,
        })?;
    }
    write_private(key, certified.signing_key.serialize_pem().as_bytes())?;
    write_private(cert, certified.cert.pem().as_bytes())?;
    tracing::info!(path = %cert.display(), "generated a self-signed TLS certificate");
    Ok(())
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| TlsError::Write {
        path: path.display().to_string(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)
}
