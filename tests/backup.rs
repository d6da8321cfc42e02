//! SPEC 14, black-box: the real daemon with `[backup]`, `tokenkeeper
//! backup` and `tokenkeeper restore` against a real SQLite file and the
//! simulator.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use common::{Harness, Options};
use sha2::{Digest, Sha256};

/// A cron expression that fires every second (the scheduler's first field
/// is seconds).
const EVERY_SECOND: &str = "* * * * * *";
/// Once a year: never during a test; backups come from the CLI.
const YEARLY: &str = "0 0 0 1 1 *";

fn backup_dir(h: &Harness) -> PathBuf {
    h.dir.path().join("backups")
}

/// Appends `[backup]` to the harness config.
fn add_backup(h: &Harness, schedule: &str, keep: u32) {
    let mut text = std::fs::read_to_string(&h.config_path).unwrap();
    text.push_str(&format!(
        "\n[backup]\nschedule = \"{schedule}\"\ndir = \"{}\"\nkeep = {keep}\n",
        backup_dir(h).display()
    ));
    std::fs::write(&h.config_path, text).unwrap();
}

/// Turns encryption on with a key made of `byte`.
fn use_key(h: &Harness, byte: u8) {
    std::fs::write(
        h.dir.path().join("db-key"),
        base64::engine::general_purpose::STANDARD.encode([byte; 32]),
    )
    .unwrap();
    let text = std::fs::read_to_string(&h.config_path).unwrap();
    if !text.contains("encryption_key_file") {
        std::fs::write(
            &h.config_path,
            text.replace(
                "[storage]\n",
                "[storage]\nencryption_key_file = \"db-key\"\n",
            ),
        )
        .unwrap();
    }
}

/// The backup files in the backup directory, oldest first.
fn backups(h: &Harness) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(backup_dir(h))
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    let n = p.file_name().unwrap().to_string_lossy().into_owned();
                    n.starts_with("tokenkeeper-") && n.ends_with(".db")
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn sum_path(p: &Path) -> PathBuf {
    PathBuf::from(format!("{}.sha256", p.display()))
}

/// The backup's checksum file is in the `sha256sum` format and matches.
fn assert_checksum(p: &Path) {
    let text = std::fs::read_to_string(sum_path(p)).expect("a checksum file beside the backup");
    let digest = Sha256::digest(std::fs::read(p).unwrap());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    let name = p.file_name().unwrap().to_string_lossy().into_owned();
    assert_eq!(text, format!("{hex}  {name}\n"));
    assert_eq!(mode(&sum_path(p)), 0o600);
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Files in the database's directory whose name starts with the
/// database's: the database, its -wal/-shm, anything kept aside.
fn db_family(h: &Harness) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(h.dir.path())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("tokenkeeper.db"))
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn scheduled_backups_appear_private_checksummed_and_pruned() {
    let mut h = Harness::new(Options::default()).await;
    add_backup(&h, EVERY_SECOND, 2);
    h.start().await;
    h.authorize_default().await;
    common::eventually(Duration::from_secs(30), "three scheduled backups", || {
        let log = h.log();
        async move { log.matches("backup written and verified").count() >= 3 }
    })
    .await;
    let metrics = h.get_text("/metrics").await;
    assert!(
        metrics.contains("tokenkeeper_backup_last_success_timestamp_seconds"),
        "{metrics}"
    );
    h.stop().await;
    let made = backups(&h);
    assert_eq!(made.len(), 2, "keep = 2 leaves two: {made:?}");
    assert_eq!(mode(&backup_dir(&h)), 0o700);
    for b in &made {
        assert_eq!(mode(b), 0o600, "{}", b.display());
        assert_checksum(b);
    }
    // Nothing half-written or orphaned is left behind.
    let all: Vec<String> = std::fs::read_dir(backup_dir(&h))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(all.len(), 4, "{all:?}");
}

#[tokio::test]
async fn backup_command_asks_the_running_daemon_and_works_offline() {
    let mut h = Harness::new(Options::default()).await;
    add_backup(&h, YEARLY, 7);
    h.start().await;
    h.authorize_default().await;
    let out = h.cli(&["backup"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("wrote and verified"));
    assert_eq!(
        h.log().matches("backup written and verified").count(),
        1,
        "the daemon made it"
    );
    assert_eq!(backups(&h).len(), 1);
    h.stop().await;

    let out = h.cli(&["backup"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let made = backups(&h);
    assert_eq!(made.len(), 2);
    for b in &made {
        assert_eq!(mode(b), 0o600);
        assert_checksum(b);
    }
}

#[tokio::test]
async fn restore_refuses_while_the_daemon_runs_then_gives_back_the_grant() {
    let mut h = Harness::new(Options::default()).await;
    add_backup(&h, YEARLY, 7);
    h.start().await;
    h.authorize_default().await;
    assert_eq!(h.cli(&["backup"]).await.status.code(), Some(0));
    let backup = backups(&h).pop().unwrap();
    // Lose the grant here (the provider still knows it).
    let out = h.cli(&["revoke", "keap", "--local"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(h.token().await.0, 404);

    let before = db_family(&h);
    let out = h.cli(&["restore", backup.to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("stop it first"), "{}", stderr(&out));
    assert_eq!(db_family(&h), before, "nothing moved while the daemon runs");

    h.stop().await;
    let out = h.cli(&["restore", backup.to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("kept as"));
    assert!(
        db_family(&h)
            .iter()
            .any(|n| n.starts_with("tokenkeeper.db.before-restore-")),
        "{:?}",
        db_family(&h)
    );
    assert_eq!(mode(&h.db_path()), 0o600);
    h.start().await;
    let (s, b) = h.token().await;
    assert_eq!(s, 200, "the restored grant is served: {b}");
    h.assert_refresh_keeps_the_grant().await;
}

#[tokio::test]
async fn restore_checks_the_file_and_the_key_before_replacing_anything() {
    let mut h = Harness::new(Options::default()).await;
    add_backup(&h, YEARLY, 7);
    use_key(&h, 1);
    h.start().await;
    h.authorize_default().await;
    h.stop().await;
    assert_eq!(h.cli(&["backup"]).await.status.code(), Some(0));
    let good = backups(&h).pop().unwrap();
    let db_before = std::fs::read(h.db_path()).unwrap();
    let family_before = db_family(&h);
    let unchanged = |h: &Harness, what: &str| {
        assert_eq!(
            std::fs::read(h.db_path()).unwrap(),
            db_before,
            "{what}: database changed"
        );
        assert_eq!(db_family(h), family_before, "{what}: files changed");
    };

    // Not a database at all.
    let junk = h.dir.path().join("junk.db");
    std::fs::write(&junk, vec![0x5a; 8192]).unwrap();
    let out = h.cli(&["restore", junk.to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("junk.db") && stderr(&out).contains("not a tokenkeeper database"),
        "{}",
        stderr(&out)
    );
    unchanged(&h, "junk");

    // A valid database whose bytes no longer match its checksum.
    let tampered = h.dir.path().join("tampered.db");
    let mut bytes = std::fs::read(&good).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&tampered, &bytes).unwrap();
    std::fs::copy(sum_path(&good), sum_path(&tampered)).unwrap();
    let out = h.cli(&["restore", tampered.to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("does not match its checksum"),
        "{}",
        stderr(&out)
    );
    unchanged(&h, "checksum");

    // A damaged page: SQLite's integrity check (no checksum file).
    let damaged = h.dir.path().join("damaged.db");
    let mut bytes = std::fs::read(&good).unwrap();
    for b in &mut bytes[4096..4096 + 512] {
        *b = 0xa5;
    }
    std::fs::write(&damaged, &bytes).unwrap();
    let out = h.cli(&["restore", damaged.to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    unchanged(&h, "damaged");

    // The right file under the wrong key, and without a key.
    use_key(&h, 2);
    let out = h.cli(&["restore", good.to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("another key"), "{}", stderr(&out));
    unchanged(&h, "wrong key");
    let text = std::fs::read_to_string(&h.config_path).unwrap();
    std::fs::write(
        &h.config_path,
        text.replace("encryption_key_file = \"db-key\"\n", ""),
    )
    .unwrap();
    let out = h.cli(&["restore", good.to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("encrypted tokens"),
        "{}",
        stderr(&out)
    );
    unchanged(&h, "no key");

    // With the right key it goes in.
    use_key(&h, 1);
    let out = h.cli(&["restore", good.to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[tokio::test]
async fn encrypted_backups_hold_no_plaintext_token() {
    let mut h = Harness::new(Options::default()).await;
    add_backup(&h, YEARLY, 7);
    use_key(&h, 7);
    h.start().await;
    h.authorize_default().await;
    h.assert_refresh_keeps_the_grant().await;
    let out = h.cli(&["backup"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let raw = std::fs::read(backups(&h).pop().unwrap()).unwrap();
    assert!(raw.len() > 4096);
    let tokens = h.issued_tokens();
    assert!(tokens.len() >= 4);
    for t in tokens {
        assert!(!contains(&raw, &t), "a token is readable in the backup");
    }
}

#[tokio::test]
async fn backup_config_errors_name_the_key() {
    let h = Harness::new(Options::default()).await;
    let base = std::fs::read_to_string(&h.config_path).unwrap();
    let check = |text: String| {
        let h = &h;
        async move {
            std::fs::write(&h.config_path, text).unwrap();
            let out = h.cli(&["check-config"]).await;
            assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
            stderr(&out)
        }
    };
    let pg = base.replace(
        &format!("path = \"{}\"", h.db_path().display()),
        "url = \"postgres://tk@127.0.0.1:5432/tk\"",
    );
    let e = check(format!(
        "{pg}\n[backup]\nschedule = \"0 0 3 * * *\"\ndir = \"/tmp/tk-backups\"\n"
    ))
    .await;
    assert!(
        e.contains("backup") && e.contains("database's business"),
        "{e}"
    );
    let e = check(format!(
        "{base}\n[backup]\nschedule = \"at three\"\ndir = \"/tmp/tk-backups\"\n"
    ))
    .await;
    // `FILE:LINE: key: sentence`.
    assert!(
        e.contains(".toml:") && e.contains(": backup.schedule: ") && e.contains("five fields"),
        "{e}"
    );
    let e = check(format!(
        "{base}\n[backup]\nschedule = \"0 0 3 * * *\"\ndir = \"relative\"\nkeep = 0\n"
    ))
    .await;
    assert!(e.contains("backup.dir") && e.contains("backup.keep"), "{e}");
}

#[tokio::test]
async fn a_failing_backup_is_logged_counted_and_notified_and_serving_goes_on() {
    let mut h = Harness::new(Options::default()).await;
    let out = h.dir.path().join("events");
    let script = h.dir.path().join("notify.sh");
    common::write_script(
        &script,
        format!(
            "#!/bin/sh\necho \"$TOKENKEEPER_EVENT $TOKENKEEPER_MESSAGE\" >> {}\n",
            out.display()
        ),
    );
    // A backup directory that cannot be created: its parent is a file
    // (permissions would not stop root).
    let blocker = h.dir.path().join("not-a-dir");
    std::fs::write(&blocker, b"").unwrap();
    let mut text = std::fs::read_to_string(&h.config_path).unwrap();
    text.push_str(&format!(
        "\n[notify]\ncommand = \"{}\"\n\n[backup]\nschedule = \"{EVERY_SECOND}\"\ndir = \"{}\"\n",
        script.display(),
        blocker.join("backups").display()
    ));
    std::fs::write(&h.config_path, text).unwrap();
    h.start().await;
    h.authorize_default().await;
    common::eventually(
        Duration::from_secs(30),
        "a backup_failed notification",
        || {
            let got = std::fs::read_to_string(&out).unwrap_or_default();
            async move { got.contains("backup_failed") }
        },
    )
    .await;
    let got = std::fs::read_to_string(&out).unwrap();
    assert!(
        got.contains("not-a-dir"),
        "the message names the directory: {got}"
    );
    assert!(h.log().contains("backup failed"));
    let metrics = h.get_text("/metrics").await;
    let failures = metrics
        .lines()
        .find(|l| l.starts_with("tokenkeeper_backup_failures_total "))
        .unwrap_or_else(|| panic!("{metrics}"));
    assert_ne!(failures, "tokenkeeper_backup_failures_total 0");
    assert_eq!(h.token().await.0, 200, "serving goes on");
    assert_eq!(h.stop().await, Some(0));
}

/// A backup directory another user could write into, or owns, is refused
/// at config time (naming `backup.dir`) and by `tokenkeeper backup`; the
/// backups themselves stay 0600.
#[tokio::test]
async fn a_backup_directory_others_can_write_or_own_is_refused() {
    let mut h = Harness::new(Options::default()).await;
    add_backup(&h, YEARLY, 7);
    let dir = backup_dir(&h);
    std::fs::create_dir(&dir).unwrap();
    for (mode, owner, says) in [
        (0o770, None, "writable by other users"),
        (0o1777, None, "writable by other users"),
        (0o702, None, "writable by other users"),
        (0o700, Some(65534), "belongs to another user"),
    ] {
        // SAFETY: geteuid cannot fail.
        let me = unsafe { libc::geteuid() };
        if owner.is_some() && me != 0 {
            continue; // only root can give a directory away
        }
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).unwrap();
        std::os::unix::fs::chown(&dir, owner, None).unwrap();
        for args in [&["check-config"][..], &["backup"][..]] {
            let out = h.cli(args).await;
            let e = stderr(&out);
            assert_eq!(out.status.code(), Some(2), "{args:?} {mode:o}: {e}");
            assert!(
                e.contains(": backup.dir: ") && e.contains(says),
                "{args:?} {mode:o}: {e}"
            );
        }
        std::os::unix::fs::chown(&dir, Some(me), None).unwrap();
    }
    assert!(backups(&h).is_empty());
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    h.start().await;
    h.authorize_default().await;
    // Opened up under the running daemon: the backup is refused then too.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let (s, b) = h.post_json("/v1/backup").await;
    assert!(s >= 400, "{s} {b}");
    assert!(b.to_string().contains("writable by other users"), "{b}");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    h.stop().await;
    let out = h.cli(&["backup"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let made = backups(&h);
    assert_eq!(made.len(), 1);
    assert_eq!(mode(&made[0]), 0o600);
    assert_eq!(mode(&sum_path(&made[0])), 0o600);
}

/// A file with a `-wal` or `-shm` beside it was copied from a live
/// database, not made by `backup` (a single file): refused, nothing moved.
#[tokio::test]
async fn restore_refuses_a_file_with_a_wal_or_shm_beside_it() {
    let mut h = Harness::new(Options::default()).await;
    h.start().await;
    h.authorize_default().await;
    let copy = h.dir.path().join("copied.db");
    std::fs::copy(h.db_path(), &copy).unwrap();
    h.stop().await;
    let family_before = db_family(&h);
    let db_before = std::fs::read(h.db_path()).unwrap();
    for ext in ["-wal", "-shm"] {
        let companion = PathBuf::from(format!("{}{ext}", copy.display()));
        std::fs::write(&companion, b"").unwrap();
        let out = h.cli(&["restore", copy.to_str().unwrap()]).await;
        assert_eq!(out.status.code(), Some(1), "{ext}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(&format!("copied.db{ext} lies beside"))
                && stderr(&out).contains("tokenkeeper backup"),
            "{}",
            stderr(&out)
        );
        assert_eq!(db_family(&h), family_before, "{ext}: nothing moved");
        assert_eq!(std::fs::read(h.db_path()).unwrap(), db_before);
        std::fs::remove_file(&companion).unwrap();
    }
}
