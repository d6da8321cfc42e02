//! The encryption key: `tokenkeeper genkey` (a new key, on stdout or in a
//! new 0600 file, never over an existing file nor through a link), a
//! generated key sealing a real daemon's database across restarts, and the
//! key delivered as systemd delivers credentials (`LoadCredentialEncrypted=`
//! of a key sealed with `systemd-creds encrypt`, read from
//! `$CREDENTIALS_DIRECTORY`).

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use base64::Engine as _;
use common::{Harness, Options, BIN};

/// `tokenkeeper genkey ARGS` in an empty directory, with no config anywhere
/// it would look first.
fn genkey(cwd: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("genkey")
        .args(args)
        .current_dir(cwd)
        .env_remove("TOKENKEEPER_CONFIG")
        .env_remove("CREDENTIALS_DIRECTORY")
        .env("RUST_LOG", "trace")
        .output()
        .expect("run tokenkeeper genkey")
}

/// The 32 bytes a key text holds, as the daemon reads it.
fn key_bytes(text: &str) -> Vec<u8> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .unwrap_or_else(|e| panic!("not base64 ({e}): {text:?}"));
    assert_eq!(bytes.len(), 32, "a key is 32 bytes");
    bytes
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[test]
fn genkey_prints_fresh_keys_without_a_config_or_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let a = genkey(dir.path(), &[]);
    let b = genkey(dir.path(), &["-"]);
    for out in [&a, &b] {
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.stderr.is_empty(), "stdout carries the key alone");
    }
    let (a, b) = (
        String::from_utf8(a.stdout).unwrap(),
        String::from_utf8(b.stdout).unwrap(),
    );
    assert!(a.ends_with('\n') && a.trim_end().len() == 44, "{a:?}");
    assert_ne!(key_bytes(&a), key_bytes(&b), "two keys are never the same");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "nothing written but stdout"
    );
}

#[test]
fn genkey_creates_a_0600_file_and_never_replaces_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db-key");
    let p = path.to_str().unwrap();
    let out = genkey(dir.path(), &[p]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.is_empty(), "the key goes to the file only");
    assert_eq!(mode(&path), 0o600);
    let key = std::fs::read_to_string(&path).unwrap();
    key_bytes(&key);
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains(key.trim()),
        "the key is never echoed"
    );

    // Again: refused with exit 2, the key in use untouched.
    let out = genkey(dir.path(), &[p]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), key);

    // A relative name lands in the working directory, created the same way.
    let out = genkey(dir.path(), &["second-key"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(mode(&dir.path().join("second-key")), 0o600);
    assert_ne!(
        key_bytes(&std::fs::read_to_string(dir.path().join("second-key")).unwrap()),
        key_bytes(&key)
    );
}

#[test]
fn genkey_never_writes_through_a_symbolic_link() {
    let dir = tempfile::tempdir().unwrap();
    // A dangling link: following it would create the file it names.
    let target = dir.path().join("planted");
    let dangling = dir.path().join("dangling");
    std::os::unix::fs::symlink(&target, &dangling).unwrap();
    // A link to an existing file: following it would overwrite that file.
    let victim = dir.path().join("victim");
    std::fs::write(&victim, "not a key\n").unwrap();
    let to_victim = dir.path().join("to-victim");
    std::os::unix::fs::symlink(&victim, &to_victim).unwrap();

    for link in [&dangling, &to_victim] {
        let out = genkey(dir.path(), &[link.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2), "{}", link.display());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("symbolic link"), "{err}");
    }
    assert!(
        !target.exists(),
        "nothing created through the dangling link"
    );
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "not a key\n");
}

#[test]
fn genkey_says_why_a_file_cannot_be_made() {
    let dir = tempfile::tempdir().unwrap();
    let out = genkey(
        dir.path(),
        &[dir.path().join("missing/db-key").to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("tokenkeeper: cannot write the key file") && err.contains("directory"),
        "{err}"
    );
}

/// Every byte of the database files, WAL included.
fn raw_db_bytes(h: &Harness) -> Vec<u8> {
    let mut all = Vec::new();
    for suffix in ["", "-wal", "-shm"] {
        if let Ok(b) = std::fs::read(format!("{}{suffix}", h.db_path().display())) {
            all.extend(b);
        }
    }
    all
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// Sets `storage.encryption_key_file = key_file` in the harness config.
fn use_key_file(h: &Harness, key_file: &str) {
    let text = std::fs::read_to_string(&h.config_path).unwrap().replace(
        "[storage]\n",
        &format!("[storage]\nencryption_key_file = \"{key_file}\"\n"),
    );
    std::fs::write(&h.config_path, text).unwrap();
}

/// Authorizes, restarts, and checks that the grant survived sealed: the
/// database holds no token in plaintext, the restarted daemon serves the
/// same access token, and the key never reached the log.
async fn sealed_across_a_restart(h: &mut Harness, key_text: &str) {
    h.start().await;
    let token = h.authorize_default().await;
    h.stop().await;
    let raw = raw_db_bytes(h);
    for t in h.issued_tokens() {
        assert!(!contains(&raw, &t), "a token is readable in the database");
    }
    h.start().await;
    let (s, b) = h.token().await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(
        b["access_token"],
        token.as_str(),
        "the same grant, unsealed"
    );
    h.stop().await;
    let log = h.log();
    assert!(!log.contains(key_text.trim()), "the key is in the log");
    assert!(!log.contains("stored unencrypted"), "{log}");
    assert!(
        !log.lines()
            .any(|l| l.contains("encryption_key_file") && l.contains("can be read by other users")),
        "{log}"
    );
}

#[tokio::test]
async fn a_generated_key_seals_a_daemon_across_restarts() {
    let mut h = Harness::new(Options::default()).await;
    let out = genkey(h.dir.path(), &["db-key"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    use_key_file(&h, "db-key");
    let key = std::fs::read_to_string(h.dir.path().join("db-key")).unwrap();
    sealed_across_a_restart(&mut h, &key).await;
}

/// Whether this run is CI, where a test may not be skipped.
fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// Runs `systemd-creds ARGS` with the host key at `host_secret` (see the
/// test below), feeding `stdin`.
fn systemd_creds(host_secret: &Path, args: &[&str], stdin: &[u8]) -> Output {
    use std::io::Write as _;
    let mut child = Command::new("systemd-creds")
        .args(args)
        .env("SYSTEMD_CREDENTIAL_SECRET", host_secret)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run systemd-creds");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "systemd-creds {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The whole `LoadCredentialEncrypted=` path but systemd's own delivery:
/// `tokenkeeper genkey | systemd-creds encrypt --name=db-key - FILE`, then
/// what systemd does at the unit's start (decrypt into a private
/// credentials directory, files read-only with an ACL, so `stat` shows
/// 0440), then the daemon with `$CREDENTIALS_DIRECTORY` and
/// `encryption_key_file = "db-key"`. systemd as PID 1 is not needed (nor
/// available in CI containers); the host key is a throw-away file
/// (`$SYSTEMD_CREDENTIAL_SECRET`), so the machine's own is never created or
/// used. Without `systemd-creds` the test says so and is skipped, except in
/// CI (`.ci/run` installs it).
#[tokio::test]
async fn a_key_sealed_with_systemd_creds_reaches_the_daemon_as_a_credential() {
    let available = Command::new("systemd-creds")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !available {
        assert!(
            !in_ci(),
            "systemd-creds is missing but CI is set: install systemd (.ci/run does) so this test runs"
        );
        eprintln!("SKIPPED: systemd-creds is not installed; the LoadCredentialEncrypted= path was not tested");
        return;
    }
    let mut h = Harness::new(Options::default()).await;
    let dir = h.dir.path().to_path_buf();
    let host_secret = dir.join("host-credential.secret");

    // Sealed at install time.
    let key = genkey(&dir, &[]);
    assert_eq!(key.status.code(), Some(0));
    let key_text = String::from_utf8(key.stdout).unwrap();
    let store = dir.join("credstore.encrypted");
    std::fs::create_dir(&store).unwrap();
    let sealed = store.join("db-key");
    systemd_creds(
        &host_secret,
        &[
            "encrypt",
            "--with-key=host",
            "--name=db-key",
            "-",
            sealed.to_str().unwrap(),
        ],
        key_text.as_bytes(),
    );
    let sealed_bytes = std::fs::read(&sealed).unwrap();
    assert!(
        !contains(&sealed_bytes, key_text.trim()),
        "the credential store holds the key in plaintext"
    );

    // Delivered at start, as systemd does for LoadCredentialEncrypted=.
    let creds: PathBuf = dir.join("credentials");
    std::fs::create_dir(&creds).unwrap();
    let delivered = creds.join("db-key");
    systemd_creds(
        &host_secret,
        &[
            "decrypt",
            "--name=db-key",
            sealed.to_str().unwrap(),
            delivered.to_str().unwrap(),
        ],
        b"",
    );
    assert_eq!(
        std::fs::read_to_string(&delivered).unwrap(),
        key_text,
        "systemd-creds gives back the key as genkey made it"
    );
    // The client secret comes the same way (LoadCredential=, plain).
    std::fs::rename(dir.join("client-secret"), creds.join("client-secret")).unwrap();
    for file in [&delivered, &creds.join("client-secret")] {
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o440)).unwrap();
    }
    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o500)).unwrap();

    use_key_file(&h, "db-key");
    assert!(
        !dir.join("db-key").exists(),
        "only the credential can be the key"
    );
    h.daemon_env = vec![("CREDENTIALS_DIRECTORY".into(), creds.clone())];
    sealed_across_a_restart(&mut h, &key_text).await;
    // Mode 0440 is the ACL mask systemd's credentials show, not access
    // for a group: no advice to chmod a read-only credential.
    assert!(
        !h.log().contains("can be read by other users"),
        "{}",
        h.log()
    );

    // Without the credential the daemon refuses to start: it was the key.
    h.daemon_env.clear();
    let mut child = common::spawn_daemon(&h.config_path, &h.log_path(), "info", &[]);
    let code = common::wait_exit(&mut child, std::time::Duration::from_secs(20)).await;
    assert_ne!(code, Some(0));
    assert!(
        h.log().contains("encryption_key_file"),
        "the refusal names the key: {}",
        h.log()
    );
    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o700)).unwrap();
}

/// The Debian package's man pages and completions are generated from the
/// CLI definition (`packaging/gen-docs.rs`): `genkey` is in them.
#[test]
fn genkey_is_in_the_man_pages_and_completions() {
    use clap::CommandFactory as _;
    let dir = tempfile::tempdir().unwrap();
    clap_mangen::generate_to(tokenkeeper::cli::Cli::command(), dir.path()).unwrap();
    let page = std::fs::read_to_string(dir.path().join("tokenkeeper-genkey.1")).unwrap();
    assert!(
        page.contains("systemd\\-creds encrypt") && page.contains("0600"),
        "{page}"
    );
    let main = std::fs::read_to_string(dir.path().join("tokenkeeper.1")).unwrap();
    assert!(main.contains("genkey"), "{main}");
    for shell in [
        clap_complete::Shell::Bash,
        clap_complete::Shell::Zsh,
        clap_complete::Shell::Fish,
    ] {
        let mut script = Vec::new();
        clap_complete::generate(
            shell,
            &mut tokenkeeper::cli::Cli::command(),
            "tokenkeeper",
            &mut script,
        );
        assert!(
            String::from_utf8_lossy(&script).contains("genkey"),
            "{shell} completion lacks genkey"
        );
    }
}
