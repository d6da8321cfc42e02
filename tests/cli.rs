//! The command line: config validation, client commands, exit codes.

mod common;

use std::process::Command;

use common::{Harness, Options, BIN};

fn check_config(text: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tk.toml");
    std::fs::write(&path, text).unwrap();
    check_config_file(&path)
}

/// `check-config --config path`: the exit code and stderr.
fn check_config_file(path: &std::path::Path) -> (i32, String) {
    let out = Command::new(BIN)
        .arg("check-config")
        .arg("--config")
        .arg(path)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_config_reports_every_problem_with_key_and_line() {
    let broken = r#"[server]
listen = "127.0.0.1:8787"
colour = "blue"

[refresh]
jitter = "ten minutes"
at_fraction = 2.0

[providers.keap]
preset = "keap"
client_secret_file = "/nonexistent/keap-secret"

[providers.gen]
preset = "generic"
client_id = "x"
client_secret = "y"
"#;
    let (code, err) = check_config(broken);
    assert_eq!(code, 2, "{err}");
    for (key, line) in [
        ("server.colour", 3),
        ("refresh.jitter", 6),
        ("refresh.at_fraction", 7),
        ("providers.keap.client_secret_file", 11),
    ] {
        assert!(
            err.contains(&format!(":{line}: {key}:")),
            "missing {key} at line {line} in:\n{err}"
        );
    }
    assert!(err.contains("providers.keap.client_id"), "{err}");
    assert!(err.contains("providers.gen.authorization_url"), "{err}");
    assert!(err.contains("providers.gen.token_url"), "{err}");
}

#[test]
fn check_config_single_problems() {
    let cases = [
        ("[server]\nlisten = \"0.0.0.0:8787\"\n", "server.listen"),
        ("[refresh]\ncheck_interval = 30\n", "refresh.check_interval"),
        ("[providers.Keap]\npreset = \"keap\"\nclient_id = \"a\"\nclient_secret = \"b\"\n", "providers.Keap"),
        ("[providers.k]\npreset = \"nope\"\nclient_id = \"a\"\nclient_secret = \"b\"\n", "providers.k.preset"),
        ("[providers.k]\npreset = \"keap\"\nclient_id = \"a\"\nclient_secret_env = \"TK_TEST_UNSET_VAR\"\n", "providers.k.client_secret_env"),
        ("[server\n", "(syntax)"),
        ("[providers.k]\npreset = \"keap\"\nclient_id = \"a\"\nclient_secret = \"b\"\ncode_auth = \"magic\"\n", "providers.k.code_auth"),
    ];
    for (text, key) in cases {
        let (code, err) = check_config(text);
        assert_eq!(code, 2, "config {text:?} should be refused:\n{err}");
        assert!(err.contains(key), "expected {key} in:\n{err}");
    }
}

#[test]
fn check_config_accepts_a_good_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret"), "s3cret\n").unwrap();
    let path = dir.path().join("tk.toml");
    std::fs::write(
        &path,
        "[providers.keap]\npreset = \"keap\"\nclient_id = \"abc\"\nclient_secret_file = \"secret\"\n[refresh]\njitter = \"10m\"\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("check-config")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    common::assert_success(&out);
    // The secret is resolved against $CREDENTIALS_DIRECTORY too.
    let creds = tempfile::tempdir().unwrap();
    std::fs::write(creds.path().join("keap-client-secret"), "fromcreds").unwrap();
    std::fs::write(
        &path,
        "[providers.keap]\npreset = \"keap\"\nclient_id = \"abc\"\nclient_secret_file = \"/etc/tokenkeeper/keap-client-secret\"\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("check-config")
        .arg("--config")
        .arg(&path)
        .env("CREDENTIALS_DIRECTORY", creds.path())
        .output()
        .unwrap();
    common::assert_success(&out);
}

#[test]
fn unreachable_daemon_is_exit_1_with_a_sentence() {
    let port = common::free_port();
    let out = Command::new(BIN)
        .args([
            "token",
            "keap",
            "--url",
            &format!("http://127.0.0.1:{port}"),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach the tokenkeeper daemon"), "{err}");
    assert!(out.stdout.is_empty());
}

#[tokio::test]
async fn client_commands_against_a_running_daemon() {
    let h = Harness::started(Options::default()).await;

    // Not authorized yet: exit 1 and a hint.
    let out = h.cli(&["token", "keap"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("tokenkeeper connect keap"));
    // Unknown provider is a usage error.
    let out = h.cli(&["token", "nosuch"]).await;
    assert_eq!(out.status.code(), Some(2));

    let out = h.cli(&["connect", "keap", "work"]).await;
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        h.url("/connect/keap?account=work")
    );

    assert_eq!(h.authorize("keap", "default").await.status(), 200);
    let current = h.sim.sim.access_tokens_issued().last().unwrap().clone();

    let out = h.cli(&["token", "keap"]).await;
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("{current}\n"),
        "token alone on stdout"
    );

    let out = h.cli(&["header", "keap", "default"]).await;
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("Authorization: Bearer {current}\n")
    );

    let out = h.cli(&["status", "--json"]).await;
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status --json parses");
    assert_eq!(v["connections"][0]["state"], "active");

    let out = h.cli(&["status"]).await;
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("PROVIDER") && table.contains("keap") && table.contains("active"),
        "{table}"
    );

    let out = h.cli(&["refresh", "keap"]).await;
    common::assert_success(&out);
    let newest = h.sim.sim.access_tokens_issued().last().unwrap().clone();
    assert_ne!(newest, current);
    assert_eq!(
        String::from_utf8(h.cli(&["token", "keap"]).await.stdout)
            .unwrap()
            .trim(),
        newest
    );

    // A rejected grant: status exits 1 so cron and monitoring notice.
    h.sim.sim.revoke_all_grants();
    let out = h.cli(&["refresh", "keap"]).await;
    assert_eq!(out.status.code(), Some(1));
    let out = h.cli(&["status"]).await;
    assert_eq!(out.status.code(), Some(1));

    let out = h.cli(&["revoke", "keap"]).await;
    common::assert_success(&out);
    let out = h.cli(&["token", "keap"]).await;
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn help_is_there() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in [
        "serve",
        "token",
        "header",
        "status",
        "connect",
        "refresh",
        "revoke",
        "check-config",
    ] {
        assert!(text.contains(cmd), "--help lacks {cmd}");
    }
}

#[tokio::test]
async fn names_are_checked_and_never_reach_the_server_raw() {
    let h = Harness::started(Options::default()).await;
    assert_eq!(h.authorize("keap", "victim").await.status(), 200);
    for (provider, account) in [
        ("keap", "typo/../victim"),
        ("keap", "../victim"),
        ("keap", "victim/"),
        ("keap", "victim%2f"),
        ("keap", "Victim"),
        ("keap", "a b"),
        ("keap", "refresh"),
        ("ke/ap", "victim"),
        ("..", "victim"),
    ] {
        for cmd in ["revoke", "refresh", "token", "header", "connect"] {
            let out = h.cli(&[cmd, provider, account]).await;
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(
                out.status.code(),
                Some(2),
                "{cmd} {provider} {account}: {err}"
            );
            assert!(err.contains("not a valid"), "{err}");
        }
    }
    // Nothing was revoked.
    assert_eq!(h.get_json("/v1/token/keap/victim").await.0, 200);
    let out = h.cli(&["token", "keap", "victim"]).await;
    assert_eq!(out.status.code(), Some(0));
}

/// A pipe whose reading end is already closed: every write fails (EPIPE).
fn broken_pipe() -> std::process::Stdio {
    use std::os::fd::{FromRawFd, OwnedFd};
    let mut fds = [0; 2];
    // SAFETY: pipe(2) fills both descriptors, which are then owned here.
    let (read, write) = unsafe {
        assert_eq!(libc::pipe(fds.as_mut_ptr()), 0);
        (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))
    };
    drop(read);
    std::process::Stdio::from(write)
}

#[tokio::test]
async fn broken_pipes_and_closed_stdout() {
    let h = Harness::started(Options::default()).await;
    for account in ["a1", "a2", "a3"] {
        assert_eq!(h.authorize("keap", account).await.status(), 200);
    }
    // Not `output()`: tokio's replaces stdout with a pipe of its own.
    let run = |args: &[&str], stdout: std::process::Stdio| {
        tokio::process::Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(&h.config_path)
            .stdout(stdout)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
            .wait_with_output()
    };
    // `tokenkeeper status | head -1` with head gone: quiet, no panic.
    for args in [&["status"][..], &["status", "--json"], &["check-config"]] {
        let out = run(args, broken_pipe()).await.unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(!err.contains("tokenkeeper:"), "{args:?}: {err}");
    }
    // The token itself cannot be delivered: a failure, with a sentence.
    for cmd in ["token", "header"] {
        let out = run(&[cmd, "keap", "a1"], broken_pipe()).await.unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains("cannot write to standard output"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    // Standard output closed altogether (`>&-`).
    let out = tokio::process::Command::new("sh")
        .arg("-c")
        .arg("exec \"$0\" token keap a1 --config \"$1\" >&-")
        .arg(BIN)
        .arg(&h.config_path)
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("standard output is closed"), "{err}");
    // A deliberate /dev/null (write-only, or read-write as Python's
    // DEVNULL opens it) stays a success.
    for redirect in [">/dev/null", "1<>/dev/null"] {
        let out = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "exec \"$0\" token keap a1 --config \"$1\" {redirect}"
            ))
            .arg(BIN)
            .arg(&h.config_path)
            .output()
            .await
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{redirect}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[tokio::test]
async fn self_signed_daemon_from_another_user_names_certificate_verification() {
    let h = Harness::new(Options {
        server: "tls = \"self-signed\"".into(),
        ..Options::default()
    })
    .await;
    // systemd's RuntimeDirectory=: where the public copy goes.
    let runtime = h.dir.path().join("run");
    std::fs::create_dir(&runtime).unwrap();
    let log = std::fs::File::create(h.log_path()).unwrap();
    let mut h = h;
    let child = std::process::Command::new(BIN)
        .arg("serve")
        .arg("--config")
        .arg(&h.config_path)
        .env("RUNTIME_DIRECTORY", &runtime)
        .env("RUST_LOG", "info")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    // The harness stops it, even if an assertion fails first.
    h.daemon = Some(child);
    let public = runtime.join("cert.pem");
    common::eventually(
        std::time::Duration::from_secs(20),
        "public certificate",
        || async { h.log().contains("tokenkeeper is serving") },
    )
    .await;
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&public).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o644, "readable by every user");
    assert_eq!(
        std::fs::read(&public).unwrap(),
        std::fs::read(h.dir.path().join("tls-cert.pem")).unwrap()
    );

    // Another user: the state directory (and its certificate) is out of
    // reach, modelled by a config whose storage lies elsewhere.
    let other = tempfile::tempdir().unwrap();
    let cfg = other.path().join("tk.toml");
    std::fs::write(
        &cfg,
        format!(
            "[server]\nlisten = \"127.0.0.1:{}\"\ntls = \"self-signed\"\n[storage]\npath = \"{}\"\n",
            h.port,
            other.path().join("no-state/tk.db").display()
        ),
    )
    .unwrap();
    let cli = |extra: &[&str]| {
        tokio::process::Command::new(BIN)
            .arg("status")
            .arg("--config")
            .arg(&cfg)
            .args(extra)
            .output()
    };
    let out = cli(&[]).await.unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("certificate cannot be verified") && err.contains("--ca-file"),
        "{err}"
    );
    assert!(!err.contains("cannot reach"), "{err}");
    let out = cli(&["--ca-file", public.to_str().unwrap()]).await.unwrap();
    common::assert_success(&out);
    let out = cli(&["--ca-file", "/nonexistent/cert.pem"]).await.unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(h.stop().await, Some(0));
}

#[test]
fn api_base_url_with_a_query_or_fragment_is_a_config_error() {
    for (base, part) in [
        ("https://api.example/v1?tenant=a", "query"),
        ("https://api.example/v1#top", "fragment"),
    ] {
        let text = format!(
            "[providers.k]\npreset = \"keap\"\nclient_id = \"id\"\nclient_secret = \"s\"\napi_base_url = \"{base}\"\n"
        );
        let (code, err) = check_config(&text);
        assert_eq!(code, 2, "{err}");
        assert!(
            err.contains(":5: providers.k.api_base_url:") && err.contains(part),
            "{err}"
        );
    }
}

/// A client command whose answer is not what the daemon's API answers
/// (another program on that port, a daemon of another version) says so in
/// a sentence and exits 1: it neither reports "no connections" nor prints
/// something that is not a token.
#[tokio::test]
async fn an_unexpected_answer_is_a_sentence_not_a_wrong_result() {
    for body in [
        "<html>some other server</html>",
        "{}",
        r#"{"connections": "none"}"#,
    ] {
        let router = axum::Router::new().fallback(move || async move { body });
        let base = common::serve_router(router).await;
        for args in [
            &["status"][..],
            &["status", "--json"],
            &["token", "keap"],
            &["header", "keap"],
            &["refresh", "keap"],
        ] {
            let out = tokio::process::Command::new(BIN)
                .args(args)
                .args(["--url", &base])
                .env_remove("TOKENKEEPER_CONFIG")
                .output()
                .await
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{args:?} on {body}: {err}");
            assert!(
                err.contains(&format!("the daemon at {base} answered"))
                    && err.contains("cannot read")
                    && err.contains("same version"),
                "{args:?} on {body}: {err}"
            );
            assert!(
                out.stdout.is_empty(),
                "{args:?} on {body}: printed a result"
            );
        }
    }
}

/// Client commands read only what they need from the daemon's config: a
/// client secret this user cannot read (here: gone, or an unset
/// variable) does not stop them.
#[tokio::test]
async fn client_commands_work_without_the_provider_secret() {
    let h = Harness::authorized(Options::default()).await;
    std::fs::remove_file(h.dir.path().join("client-secret")).unwrap();
    let text = std::fs::read_to_string(&h.config_path).unwrap();
    std::fs::write(
        &h.config_path,
        format!("{text}\n[providers.other]\npreset = \"keap\"\nclient_id = \"x\"\nclient_secret_env = \"TK_CLI_TEST_UNSET\"\n"),
    )
    .unwrap();
    let (code, err) = check_config_file(&h.config_path);
    assert_eq!(code, 2, "the daemon would refuse this file: {err}");
    for args in [&["token", "keap"][..], &["status"], &["refresh", "keap"]] {
        let out = h.cli(args).await;
        assert_eq!(
            out.status.code(),
            Some(0),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A problem in what client commands read (here `server.listen`) is a
/// config error with key and line, not a daemon that "cannot be reached".
#[test]
fn a_bad_listen_address_is_a_config_error_for_clients() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tk.toml");
    std::fs::write(&path, "[server]\nlisten = \"localhost\"\n").unwrap();
    let out = Command::new(BIN)
        .args(["status", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains(":2: server.listen:"), "{err}");
    assert!(!err.contains("cannot reach"), "{err}");
    // With --url the listen address is not needed.
    let url = format!("http://127.0.0.1:{}", common::free_port());
    let out = Command::new(BIN)
        .args(["status", "--url", &url, "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot reach"), "{err}");
    // A config file named on the command line must be there.
    let out = Command::new(BIN)
        .args(["status", "--url", &url, "--config"])
        .arg(dir.path().join("absent.toml"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("cannot read the config file"), "{err}");
}

/// URLs for a browser (`connect`, `dashboard` without API keys) use
/// `server.public_url`, the address the browser reaches the daemon at and
/// the one its callback and cookies belong to.
#[tokio::test]
async fn browser_urls_use_the_public_url() {
    let h = Harness::new(Options::default()).await;
    let public = format!("http://localhost:{}", h.port);
    h.write_config(&format!("public_url = \"{public}/\""), "", "");
    let out = h.cli(&["connect", "keap", "work"]).await;
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("{public}/connect/keap?account=work")
    );
    let out = h.cli(&["dashboard"]).await;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("{public}/")
    );
}

/// A parameter of `storage.url` the PostgreSQL driver does not know (libpq's
/// `sslpassword`, a mistyped `password`) may hold a secret: the daemon's
/// output names it and never shows its value.
#[test]
fn an_unknown_postgres_url_parameter_is_named_never_shown() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tk.toml");
    // Nothing listens on port 1: the start fails after reading the URL.
    std::fs::write(
        &path,
        "[server]\nlisten = \"127.0.0.1:0\"\n[storage]\nurl = \"postgres://tk@127.0.0.1:1/tk?sslpassword=S3CRETVALUE&passwrd=0THERSECRET\"\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&path)
        .env("RUST_LOG", "debug")
        .output()
        .unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_ne!(out.status.code(), Some(0), "{all}");
    assert!(
        !all.contains("S3CRETVALUE") && !all.contains("0THERSECRET"),
        "{all}"
    );
    assert!(
        all.contains("sslpassword") && all.contains("passwrd"),
        "{all}"
    );
}

/// `migrate-storage` names the configured store itself as such whatever
/// the spelling of `--to` (`dir/./tk.db`, a symlink to it), rather than
/// blaming a daemon or "copying" the store onto itself.
#[test]
fn migrate_storage_recognises_the_store_itself_under_another_name() {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("tk.db");
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&db)
        .unwrap();
    std::os::unix::fs::symlink(&db, dir.path().join("link.db")).unwrap();
    let config = dir.path().join("tk.toml");
    std::fs::write(&config, format!("[storage]\npath = \"{}\"\n", db.display())).unwrap();
    for to in [
        format!("{}/./tk.db", dir.path().display()),
        format!("{}/link.db", dir.path().display()),
    ] {
        let out = Command::new(BIN)
            .args(["migrate-storage", "--to", &to, "--config"])
            .arg(&config)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_ne!(out.status.code(), Some(0), "--to {to}: {err}");
        assert!(
            err.contains("is the configured store itself"),
            "--to {to}: {err}"
        );
    }
}

/// A password in `migrate-storage --to` is visible to every local user in
/// the process list: the command says so, names the private ways to give
/// it, and never repeats it.
#[test]
fn a_password_in_migrate_storage_to_is_warned_about_and_never_shown() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tk.toml");
    std::fs::write(
        &config,
        format!(
            "[storage]\npath = \"{}\"\n",
            dir.path().join("tk.db").display()
        ),
    )
    .unwrap();
    // Nothing listens on port 1: the copy fails after the warning.
    let out = Command::new(BIN)
        .args([
            "migrate-storage",
            "--to",
            "postgres://tk:S3CRETPW@127.0.0.1:1/tk",
            "--config",
        ])
        .arg(&config)
        .env_remove("PGPASSWORD")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("PGPASSWORD") && err.contains("process list"),
        "{err}"
    );
    assert!(!err.contains("S3CRETPW"), "{err}");
}
