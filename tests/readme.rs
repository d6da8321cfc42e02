//! The README's "Connect a provider" section promises copy-paste config:
//! every ```toml block there is run through `tokenkeeper check-config`
//! as a complete config (with the secret files it names created beside
//! it), and together the blocks cover every preset and way in.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_tokenkeeper");
const README: &str = include_str!("../README.md");

/// The text from `## Connect a provider` to the next level-2 heading.
fn provider_section(readme: &str) -> &str {
    let start = readme
        .find("\n## Connect a provider\n")
        .expect("the README has a \"## Connect a provider\" section");
    let rest = &readme[start + 1..];
    let end = rest.find("\n## ").unwrap_or(rest.len());
    &rest[..end]
}

/// The bodies of the ```toml blocks, with the line each starts on
/// (within the section), for messages.
fn toml_blocks(section: &str) -> Vec<(usize, String)> {
    let mut blocks = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (n, line) in section.lines().enumerate() {
        match (&mut current, line.trim_end()) {
            (None, "```toml") => current = Some((n + 1, String::new())),
            (Some(_), "```") => blocks.extend(current.take()),
            (Some((_, body)), _) => {
                body.push_str(line);
                body.push('\n');
            }
            (None, _) => {}
        }
    }
    assert!(current.is_none(), "a ```toml block is never closed");
    blocks
}

/// The value of `key = "value"` on an uncommented line, if it is one.
fn string_value<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let rest = line.trim_start().strip_prefix(key)?;
    let rest = rest.trim_start().strip_prefix('=')?.trim_start();
    let rest = rest.strip_prefix('"')?;
    Some(&rest[..rest.find('"')?])
}

/// Runs `check-config` on one block as a whole config in its own
/// directory: every relative `*_file` it names exists there (mode 0600)
/// with a placeholder, every `client_secret_env` is set. `Err` says why
/// the block is refused.
fn check_block(body: &str) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(BIN);
    cmd.env_remove("CREDENTIALS_DIRECTORY")
        .env_remove("TOKENKEEPER_CONFIG");
    for line in body.lines() {
        let key = line.trim_start().split([' ', '=']).next().unwrap_or("");
        if key.ends_with("_file") {
            if let Some(name) = string_value(line, key).filter(|v| !Path::new(v).is_absolute()) {
                let file = dir.path().join(name);
                std::fs::write(&file, "placeholder-secret\n").unwrap();
                std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
            }
        }
        if let Some(var) = string_value(line, "client_secret_env") {
            cmd.env(var, "placeholder-secret");
        }
    }
    let config = dir.path().join("tokenkeeper.toml");
    std::fs::write(&config, body).unwrap();
    let out = cmd
        .args(["check-config", "--config"])
        .arg(&config)
        .output()
        .expect("run tokenkeeper");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() != Some(0) {
        return Err(format!("exit {:?}: {stderr}", out.status.code()));
    }
    let tables = body
        .lines()
        .filter(|l| l.starts_with("[providers."))
        .count();
    let expect = format!(
        "ok ({tables} provider{})",
        if tables == 1 { "" } else { "s" }
    );
    if !stdout.contains(&expect) {
        return Err(format!("expected \"{expect}\", got: {stdout}"));
    }
    // A warning about a provider table means the snippet is not what
    // someone should copy.
    if let Some(w) = stderr
        .lines()
        .find(|l| l.starts_with("warning: providers."))
    {
        return Err(w.to_string());
    }
    Ok(())
}

/// Every block, checked; the failures with their line in the section.
fn failures(section: &str) -> Vec<String> {
    toml_blocks(section)
        .into_iter()
        .filter_map(|(line, body)| {
            check_block(&body)
                .err()
                .map(|e| format!("block at line {line}: {e}"))
        })
        .collect()
}

#[test]
fn every_toml_block_in_connect_a_provider_passes_check_config() {
    let section = provider_section(README);
    assert!(
        toml_blocks(section).len() >= 4,
        "the section has its toml blocks: {section}"
    );
    let failed = failures(section);
    assert!(
        failed.is_empty(),
        "README \"Connect a provider\" snippets check-config refuses:\n{}",
        failed.join("\n")
    );
}

#[test]
fn the_snippets_cover_every_preset_and_way_in() {
    let section = provider_section(README);
    let all: String = toml_blocks(section).into_iter().map(|(_, b)| b).collect();
    let presets: BTreeSet<&str> = all
        .lines()
        .filter_map(|l| string_value(l, "preset"))
        .collect();
    for preset in [
        "keap",
        "google",
        "microsoft",
        "xero",
        "intuit",
        "zoho",
        "salesforce",
        "generic",
    ] {
        assert!(
            presets.contains(preset),
            "no snippet with preset = \"{preset}\" (have {presets:?})"
        );
    }
    for (key, what) in [
        ("tenant", "Microsoft's tenant"),
        ("region", "Zoho's region"),
        ("issuer", "issuer discovery"),
        ("device_authorization_url", "a device endpoint"),
        ("grant", "the client-credentials grant"),
        ("public_url", "the browser's public URL"),
    ] {
        assert!(
            all.lines().any(|l| string_value(l, key).is_some()),
            "no snippet sets {key} ({what})"
        );
    }
    for way in [
        "`connect`",
        "`connect --paste`",
        "`connect --device`",
        "`import`",
        "`grant = \"client_credentials\"`",
    ] {
        assert!(
            section
                .lines()
                .any(|l| l.starts_with("### ") && l.contains(way)),
            "no \"### ... ({way})\" subsection"
        );
    }
}

/// The check has teeth: the same section with one snippet broken (an
/// unknown preset, an unknown key, a missing secret file) is refused.
#[test]
fn a_broken_snippet_is_refused() {
    let section = provider_section(README);
    for (from, to) in [
        ("preset = \"zoho\"", "preset = \"zohoo\""),
        ("tenant = \"common\"", "tennant = \"common\""),
        (
            "client_secret_file = \"keap-client-secret\"",
            "client_secret_file = \"/nonexistent/keap-client-secret\"",
        ),
    ] {
        assert!(section.contains(from), "the section has {from}");
        let broken = section.replacen(from, to, 1);
        let failed = failures(&broken);
        assert_eq!(failed.len(), 1, "{to}: {failed:?}");
    }
}
