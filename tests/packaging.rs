//! The files the Debian package ships, checked without building it
//! (`packaging/check-deb.sh` builds, installs and checks the real package
//! in CI): the example config is valid as shipped (it becomes
//! /etc/tokenkeeper/tokenkeeper.toml) and stays valid once its provider is
//! uncommented; the man pages and completions come from the CLI.

use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_tokenkeeper");
const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/tokenkeeper.toml");

fn check_config(path: &Path) -> std::process::Output {
    Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(path)
        .env_remove("CREDENTIALS_DIRECTORY")
        .env_remove("TOKENKEEPER_CONFIG")
        .output()
        .expect("run tokenkeeper")
}

#[test]
fn the_example_config_is_valid_as_shipped() {
    let out = check_config(Path::new(EXAMPLE));
    assert_eq!(
        out.status.code(),
        Some(0),
        "check-config refuses examples/tokenkeeper.toml: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The commented `[providers.keap]` block is what an operator uncomments:
/// with its client secret file beside the config, it must check too.
#[test]
fn the_example_provider_is_valid_once_uncommented() {
    let text = std::fs::read_to_string(EXAMPLE).unwrap();
    let mut in_block = false;
    let mut uncommented = String::new();
    for line in text.lines() {
        if line == "# [providers.keap]" {
            in_block = true;
        } else if in_block && line.is_empty() {
            in_block = false;
        }
        let line = if in_block {
            line.strip_prefix("# ").unwrap_or(line)
        } else {
            line
        };
        uncommented.push_str(line);
        uncommented.push('\n');
    }
    assert!(
        uncommented.contains("\n[providers.keap]\npreset = \"keap\"\n"),
        "the example has a commented keap provider: {uncommented}"
    );
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tokenkeeper.toml");
    std::fs::write(&config, &uncommented).unwrap();
    std::fs::write(dir.path().join("keap-client-secret"), "s3cret\n").unwrap();
    let out = check_config(&config);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("1 provider"), "{stdout}");
}
