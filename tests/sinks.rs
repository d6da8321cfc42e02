//! Token files (SPEC 12): the real daemon and the simulator; what each
//! format holds, when files are written, the command after a write,
//! symbolic links, unwritable directories, and no token in any log.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{eventually, Harness, Options};
use serde_json::Value;

/// A `[[providers.keap.sinks]]` table.
fn sink(path: &Path, extra: &str) -> String {
    format!(
        "\n[[providers.keap.sinks]]\npath = \"{}\"\n{extra}\n",
        path.display()
    )
}

/// A daemon started with `sinks` under `[providers.keap]`.
async fn with_sinks(sinks: String) -> Harness {
    Harness::started(Options {
        provider: sinks,
        ..Options::default()
    })
    .await
}

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// Waits until the file at `path` holds `want`.
async fn file_holds(path: &Path, want: &str) {
    eventually(
        Duration::from_secs(20),
        &format!("{} holds the served token", path.display()),
        || async { read(path).as_deref() == Some(want) },
    )
    .await;
}

/// The `GET /v1/token/keap` body.
async fn served(h: &Harness) -> Value {
    let (s, b) = h.token().await;
    assert_eq!(s, 200, "{b}");
    b
}

/// What each format must hold for the served body `b`.
fn expected(b: &Value) -> [String; 3] {
    let t = b["access_token"].as_str().unwrap();
    let exp = b["expires_at"].as_str().unwrap();
    let unix = chrono::DateTime::parse_from_rfc3339(exp)
        .unwrap()
        .timestamp();
    [
        t.to_string(),
        format!("Authorization: Bearer {t}"),
        format!(
            "ACCESS_TOKEN={t}\nTOKEN_TYPE=Bearer\nEXPIRES_AT={exp}\nEXPIRES_AT_UNIX={unix}\nPROVIDER=keap\nACCOUNT=default\n"
        ),
    ]
}

/// The JSON file is `/v1/token`'s body: the same members in the same
/// order, `expires_in` as of the write.
fn assert_json_is_the_body(file: &str, body: &Value) {
    let v: Value = serde_json::from_str(file).expect("the json file parses");
    let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(&v), keys(body));
    for k in [
        "access_token",
        "token_type",
        "expires_at",
        "provider",
        "account",
    ] {
        assert_eq!(v[k], body[k], "{k}");
    }
    let (a, b) = (
        v["expires_in"].as_i64().unwrap(),
        body["expires_in"].as_i64().unwrap(),
    );
    assert!((a - b).abs() <= 30, "expires_in {a} vs {b}");
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_files_hold_each_format_exactly_from_start_and_after_refreshes() {
    let out = tempfile::tempdir().unwrap();
    let p = |n: &str| out.path().join(n);
    // Not the daemon's own gid where that is possible, so the chown shows.
    let gid = if unsafe { libc::geteuid() } == 0 {
        1
    } else {
        unsafe { libc::getegid() }
    };
    let provider = [
        sink(&p("token"), ""),
        sink(
            &p("header"),
            &format!("format = \"header\"\nmode = \"0640\"\ngroup = {gid}"),
        ),
        sink(&p("env"), "format = \"env\"\naccount = \"default\""),
        sink(&p("json"), "format = \"json\""),
    ]
    .concat();
    let mut h = Harness::started(Options {
        provider,
        rust_log: "trace".into(),
        ..Options::default()
    })
    .await;
    assert!(
        read(&p("token")).is_none(),
        "nothing to write before a grant"
    );
    h.authorize_default().await;

    let check = |b: Value| {
        let [token, header, env] = expected(&b);
        async move {
            file_holds(&p("token"), &token).await;
            file_holds(&p("header"), &header).await;
            file_holds(&p("env"), &env).await;
            eventually(Duration::from_secs(20), "the json file follows", || async {
                read(&p("json")).is_some_and(|j| j.contains(b["access_token"].as_str().unwrap()))
            })
            .await;
            assert_json_is_the_body(&read(&p("json")).unwrap(), &b);
        }
    };
    let first = served(&h).await;
    check(first.clone()).await;
    assert_eq!(mode(&p("token")), 0o600, "the default mode");
    assert_eq!(mode(&p("json")), 0o600);
    assert_eq!(mode(&p("header")), 0o640);
    assert_eq!(std::fs::metadata(p("header")).unwrap().gid(), gid);
    // Nothing but the files: no temporary file is left behind.
    assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 4);

    // A forced refresh: every file holds the new token.
    let (s, refreshed) = h.force_refresh().await;
    assert_eq!(s, 200, "{refreshed}");
    assert_ne!(refreshed["access_token"], first["access_token"]);
    check(served(&h).await).await;

    // At start, every file is written for a connection with a valid token.
    h.stop().await;
    for n in ["token", "header", "env", "json"] {
        std::fs::remove_file(p(n)).unwrap();
    }
    h.start().await;
    check(served(&h).await).await;

    h.stop().await;
    let log = h.log();
    assert!(log.contains("TRACE"), "trace level reached the log");
    assert!(log.contains("token file written"), "{log}");
    for t in h.issued_tokens() {
        assert!(!log.contains(&t), "a token reached the log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_refresh_rewrites_the_file() {
    let out = tempfile::tempdir().unwrap();
    let path = out.path().join("token");
    let h = Harness::started(Options {
        access_lifetime: Duration::from_secs(4),
        refresh: "at_fraction = 0.5\nmin_validity = \"1s\"".into(),
        provider: sink(&path, ""),
        ..Options::default()
    })
    .await;
    let first = h.authorize_default().await;
    file_holds(&path, &first).await;
    // No request from here on: only the scheduler refreshes.
    eventually(
        Duration::from_secs(20),
        "a new token in the file",
        || async { read(&path).is_some_and(|t| t != first) },
    )
    .await;
    let now = read(&path).unwrap();
    assert!(h.sim.sim.access_tokens_issued().contains(&now));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_runs_after_each_write_and_its_failure_stops_nothing() {
    let out = tempfile::tempdir().unwrap();
    let scripts = tempfile::tempdir().unwrap();
    let seen = scripts.path().join("seen");
    let ok = scripts.path().join("ok.sh");
    std::fs::write(
        &ok,
        format!(
            "#!/bin/sh\n{{ cat \"$TOKENKEEPER_SINK_PATH\"; echo \" $TOKENKEEPER_PROVIDER $TOKENKEEPER_ACCOUNT ${{RUST_LOG:-clean}}\"; }} >> {}\n",
            seen.display()
        ),
    )
    .unwrap();
    let bad = scripts.path().join("bad.sh");
    std::fs::write(&bad, "#!/bin/sh\nexit 3\n").unwrap();
    for s in [&ok, &bad] {
        std::fs::set_permissions(s, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    let good_path = out.path().join("good");
    let bad_path = out.path().join("bad");
    let provider = [
        sink(&good_path, &format!("command = \"{}\"", ok.display())),
        sink(
            &bad_path,
            &format!(
                "command = [\"{}\", \"an argument\"]\ncommand_timeout = \"5s\"",
                bad.display()
            ),
        ),
    ]
    .concat();
    let mut h = with_sinks(provider).await;
    let first = h.authorize_default().await;
    let line = |t: &str| format!("{t} keap default clean");
    eventually(
        Duration::from_secs(20),
        "the command saw the written file",
        || async { read(&seen).is_some_and(|s| s.lines().any(|l| l == line(&first))) },
    )
    .await;
    // The failing command: logged, counted; refreshing goes on and both
    // files follow.
    for _ in 0..2 {
        let (s, b) = h.force_refresh().await;
        assert_eq!(s, 200, "{b}");
    }
    let last = served(&h).await["access_token"]
        .as_str()
        .unwrap()
        .to_string();
    file_holds(&bad_path, &last).await;
    file_holds(&good_path, &last).await;
    eventually(Duration::from_secs(20), "the command ran again", || async {
        read(&seen).is_some_and(|s| s.lines().any(|l| l == line(&last)))
    })
    .await;
    let metrics = h.get_text("/metrics").await;
    let failures: f64 = metrics
        .lines()
        .find(|l| {
            l.starts_with("tokenkeeper_sink_failures_total{")
                && l.contains(&format!("path=\"{}\"", bad_path.display()))
        })
        .and_then(|l| l.rsplit_once(' '))
        .map(|(_, v)| v.parse().unwrap())
        .unwrap_or_else(|| panic!("no failure series for the bad sink in\n{metrics}"));
    assert!(failures >= 2.0, "{failures}");
    h.stop().await;
    let log = h.log();
    assert!(
        log.contains("run after writing the token file") && log.contains("exit status: 3"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_symbolic_link_is_refused_in_the_config_and_never_followed_later() {
    let out = tempfile::tempdir().unwrap();
    let victim = out.path().join("victim");
    std::fs::write(&victim, "keep me").unwrap();
    let path = out.path().join("token");
    std::os::unix::fs::symlink(&victim, &path).unwrap();
    let mut h = Harness::new(Options {
        provider: sink(&path, ""),
        ..Options::default()
    })
    .await;
    let r = h.cli(&["check-config"]).await;
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(2), "{err}");
    assert!(
        err.contains("providers.keap.sinks[0].path") && err.contains("symbolic link"),
        "{err}"
    );

    // A link planted once the daemon runs is replaced, never written through.
    std::fs::remove_file(&path).unwrap();
    h.start().await;
    let first = h.authorize_default().await;
    file_holds(&path, &first).await;
    std::fs::remove_file(&path).unwrap();
    std::os::unix::fs::symlink(&victim, &path).unwrap();
    let (s, b) = h.force_refresh().await;
    assert_eq!(s, 200, "{b}");
    file_holds(&path, b["access_token"].as_str().unwrap()).await;
    assert!(!std::fs::symlink_metadata(&path)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(read(&victim).as_deref(), Some("keep me"));
}

#[tokio::test]
async fn bad_sinks_are_config_errors_naming_key_and_line() {
    let out = tempfile::tempdir().unwrap();
    let h = Harness::new(Options::default()).await;
    let db_dir: PathBuf = h.db_path().parent().unwrap().to_path_buf();
    // Like /tmp: writable by everyone, sticky.
    let shared = out.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    }
    let provider = [
        sink(&out.path().join("a"), "format = \"yaml\""),
        sink(&out.path().join("b"), "mode = \"0999\""),
        "\n[[providers.keap.sinks]]\npath = \"relative/token\"\n".to_string(),
        sink(&db_dir.join("token"), ""),
        sink(&out.path().join("dup"), ""),
        sink(&out.path().join("dup"), "format = \"json\""),
        sink(&out.path().join("no-such-dir/token"), ""),
        sink(&out.path().join("c"), "mode = 600"),
        sink(&out.path().join("d"), "group = \"no-such-group-tk\""),
        sink(&out.path().join("e"), "account = \"Bad Name\""),
        sink(&out.path().join("f"), "colour = \"blue\""),
        sink(&shared.join("token"), ""),
    ]
    .concat();
    h.write_config("", "", &provider);
    let r = h.cli(&["check-config"]).await;
    let err = String::from_utf8_lossy(&r.stderr).to_string();
    assert_eq!(r.status.code(), Some(2), "{err}");
    let text = std::fs::read_to_string(&h.config_path).unwrap();
    let line_of = |needle: &str| {
        text.lines()
            .position(|l| l.contains(needle))
            .map(|i| i + 1)
            .unwrap_or_else(|| panic!("{needle} not in the config"))
    };
    for (key, needle, says) in [
        ("sinks[0].format", "\"yaml\"", "unknown format"),
        ("sinks[1].mode", "\"0999\"", "not a file mode"),
        ("sinks[2].path", "relative/token", "relative"),
        (
            "sinks[3].path",
            &format!("{}\"", db_dir.join("token").display()),
            "state directory",
        ),
        (
            "sinks[5].path",
            "",
            "also the path of providers.keap.sinks[4]",
        ),
        ("sinks[6].path", "no-such-dir", "does not exist"),
        ("sinks[7].mode", "mode = 600", "octal string"),
        ("sinks[8].group", "no-such-group-tk", "no group"),
        ("sinks[9].account", "Bad Name", "not an account name"),
        ("sinks[10].colour", "colour", "unknown key"),
        ("sinks[11].path", "shared/token", "writable by every user"),
    ] {
        let key = format!("providers.keap.{key}");
        let line = err
            .lines()
            .find(|l| l.contains(&format!(": {key}: ")))
            .unwrap_or_else(|| panic!("{key} not named in\n{err}"));
        assert!(line.contains(says), "{line}");
        if !needle.is_empty() {
            assert!(
                line.contains(&format!(":{}: {key}: ", line_of(needle))),
                "{line} (want the line of {needle})"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_write_is_logged_and_retried_while_refreshing_goes_on() {
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("files");
    std::fs::create_dir(&dir).unwrap();
    let path = dir.join("token");
    let mut h = with_sinks(sink(&path, "")).await;
    // The directory goes away under the running daemon (as root, a mode
    // would not stop the write).
    std::fs::remove_dir(&dir).unwrap();
    let first = h.authorize_default().await;
    eventually(
        Duration::from_secs(20),
        "the refused write is logged",
        || async { h.log().contains("cannot write the token file") },
    )
    .await;
    let (s, b) = h.force_refresh().await;
    assert_eq!(s, 200, "refreshing goes on: {b}");
    assert_ne!(b["access_token"].as_str().unwrap(), first);
    let metrics = h.get_text("/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("tokenkeeper_sink_failures_total{") && !l.ends_with(" 0")),
        "{metrics}"
    );
    std::fs::create_dir(&dir).unwrap();
    file_holds(&path, b["access_token"].as_str().unwrap()).await;
    h.stop().await;
    let log = h.log();
    assert!(
        log.contains(&path.display().to_string()),
        "the path is named"
    );
    assert!(log.contains("the token file is written again"), "{log}");
    assert!(
        log.contains("sink_failed"),
        "the operator is notified: {log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_rereads_the_sinks() {
    let out = tempfile::tempdir().unwrap();
    let (a, b) = (out.path().join("a"), out.path().join("b"));
    let h = with_sinks(sink(&a, "")).await;
    let first = h.authorize_default().await;
    file_holds(&a, &first).await;
    h.write_config("", "", &sink(&b, "format = \"header\""));
    common::signal(h.daemon.as_ref().unwrap(), libc::SIGHUP);
    file_holds(&b, &format!("Authorization: Bearer {first}")).await;
    // The removed sink is written no more.
    let (s, r) = h.force_refresh().await;
    assert_eq!(s, 200, "{r}");
    let next = r["access_token"].as_str().unwrap();
    file_holds(&b, &format!("Authorization: Bearer {next}")).await;
    assert_eq!(read(&a).as_deref(), Some(first.as_str()));
}

#[tokio::test]
async fn a_sink_under_the_state_directory_of_systemd_is_refused() {
    let state = tempfile::tempdir().unwrap();
    std::fs::create_dir(state.path().join("sub")).unwrap();
    let h = Harness::new(Options {
        provider: sink(&state.path().join("sub/token"), ""),
        ..Options::default()
    })
    .await;
    let out = tokio::process::Command::new(common::BIN)
        .arg("check-config")
        .arg("--config")
        .arg(&h.config_path)
        .env("STATE_DIRECTORY", state.path())
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("providers.keap.sinks[0].path") && err.contains("state directory"),
        "{err}"
    );
}

/// A mode that lets other users read or change the token, or the group
/// write it, is a config error naming the key and its line; the group may
/// read (`"0640"` with `group`).
#[tokio::test]
async fn a_mode_open_to_others_is_a_config_error_naming_key_and_line() {
    let out = tempfile::tempdir().unwrap();
    let h = Harness::new(Options::default()).await;
    let bad = ["0644", "0666", "0601", "0604", "0660", "0o707"];
    let provider: String = bad
        .iter()
        .enumerate()
        .map(|(i, m)| {
            sink(
                &out.path().join(format!("t{i}")),
                &format!("mode = \"{m}\""),
            )
        })
        .chain([sink(&out.path().join("ok"), "mode = \"0640\"")])
        .collect();
    h.write_config("", "", &provider);
    let r = h.cli(&["check-config"]).await;
    let err = String::from_utf8_lossy(&r.stderr).to_string();
    assert_eq!(r.status.code(), Some(2), "{err}");
    let text = std::fs::read_to_string(&h.config_path).unwrap();
    for (i, m) in bad.iter().enumerate() {
        let key = format!("providers.keap.sinks[{i}].mode");
        let line_no = text
            .lines()
            .position(|l| l.contains(&format!("mode = \"{m}\"")))
            .unwrap()
            + 1;
        let line = err
            .lines()
            .find(|l| l.contains(&format!(":{line_no}: {key}: ")))
            .unwrap_or_else(|| panic!("{key} at line {line_no} not named in\n{err}"));
        assert!(line.contains("mode \""), "{line}");
    }
    assert!(!err.contains("sinks[6]"), "0640 is allowed: {err}");
}

/// A revoked or forgotten connection's token file is removed (it would
/// offer a dead token, or after a local forget a live one nobody holds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_or_forgetting_removes_the_token_file() {
    let out = tempfile::tempdir().unwrap();
    let (a, b) = (out.path().join("a"), out.path().join("b"));
    let provider = [sink(&a, ""), sink(&b, "account = \"second\"")].concat();
    let h = with_sinks(provider).await;
    let first = h.authorize_default().await;
    file_holds(&a, &first).await;
    let r = h.authorize("keap", "second").await;
    assert!(
        r.status().is_success() || r.status().is_redirection(),
        "{}",
        r.status()
    );
    eventually(Duration::from_secs(20), "the second file", || async {
        read(&b).is_some()
    })
    .await;
    for (args, path) in [
        (&["revoke", "keap"][..], &a),
        (&["revoke", "keap", "second", "--local"][..], &b),
    ] {
        let r = h.cli(args).await;
        assert_eq!(
            r.status.code(),
            Some(0),
            "{args:?}: {}",
            String::from_utf8_lossy(&r.stderr)
        );
        eventually(Duration::from_secs(20), "the file removed", || async {
            !path.exists()
        })
        .await;
    }
    assert!(h.log().contains("the token file is removed"));
    // Authorized again: written again.
    let again = h.authorize_default().await;
    file_holds(&a, &again).await;
}

/// A command that hangs does not delay the next write; it is still killed
/// after its timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_command_does_not_delay_the_next_write() {
    let out = tempfile::tempdir().unwrap();
    let (slow, killed) = (out.path().join("slow"), out.path().join("killed"));
    let provider = [
        sink(
            &slow,
            "command = [\"sleep\", \"600\"]\ncommand_timeout = \"1h\"",
        ),
        sink(
            &killed,
            "command = [\"sleep\", \"600\"]\ncommand_timeout = \"1s\"",
        ),
    ]
    .concat();
    let mut h = with_sinks(provider).await;
    let first = h.authorize_default().await;
    file_holds(&slow, &first).await;
    for _ in 0..2 {
        let (s, b) = h.force_refresh().await;
        assert_eq!(s, 200, "{b}");
        // Old behaviour: the write waited for the command (an hour).
        file_holds(&slow, b["access_token"].as_str().unwrap()).await;
    }
    eventually(
        Duration::from_secs(20),
        "the slow command killed",
        || async { h.log().contains("did not finish within 1 s and was killed") },
    )
    .await;
    assert_eq!(h.stop().await, Some(0));
}
