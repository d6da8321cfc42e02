//! systemd behaviour: sd_notify readiness and watchdog, SIGHUP reload,
//! SIGTERM with a refresh in flight, socket activation, journal log lines.

mod common;

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{eventually, signal, wait_exit, wait_healthy, Harness, Options, BIN};
use tokenkeeper::dev::DelayPhase;
use tokio::net::UnixDatagram;

/// Receives sd_notify datagrams; each may hold several `KEY=VALUE` lines.
async fn recv(sock: &UnixDatagram, limit: Duration) -> Option<String> {
    let mut buf = vec![0u8; 4096];
    match tokio::time::timeout(limit, sock.recv(&mut buf)).await {
        Ok(Ok(n)) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
        _ => None,
    }
}

fn daemon_command(h: &Harness) -> Command {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(h.log_path())
        .unwrap();
    let mut cmd = Command::new(BIN);
    cmd.arg("serve")
        .arg("--config")
        .arg(&h.config_path)
        .env("RUST_LOG", "info,tokenkeeper=debug")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    cmd
}

#[tokio::test]
async fn readiness_watchdog_and_stopping() {
    let h = Harness::new(Options::default()).await;
    let sock_path = h.dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    let mut child = daemon_command(&h)
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "400000")
        .spawn()
        .unwrap();

    let first = recv(&sock, Duration::from_secs(20))
        .await
        .expect("a notification arrives");
    assert!(
        first.lines().any(|l| l == "READY=1"),
        "first message is READY=1: {first:?}"
    );
    // READY=1 only once the port answers.
    let r = h
        .http
        .get(h.url("/healthz"))
        .send()
        .await
        .expect("port answers at READY");
    assert_eq!(r.status(), 200);
    assert!(first.contains("STATUS=0 active"), "{first:?}");

    let started = Instant::now();
    let mut pings = 0;
    while started.elapsed() < Duration::from_millis(1500) {
        if let Some(m) = recv(&sock, Duration::from_millis(300)).await {
            pings += m.lines().filter(|l| *l == "WATCHDOG=1").count();
        }
    }
    // Half of 400 ms: about 7 pings in 1.5 s.
    assert!((5..=9).contains(&pings), "{pings} watchdog pings in 1.5 s");

    signal(&child, libc::SIGTERM);
    let mut stopping = false;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && !stopping {
        if let Some(m) = recv(&sock, Duration::from_millis(500)).await {
            stopping = m.lines().any(|l| l == "STOPPING=1");
        }
    }
    assert!(stopping, "STOPPING=1 on SIGTERM");
    assert_eq!(
        wait_exit(&mut child, Duration::from_secs(20)).await,
        Some(0)
    );
}

#[tokio::test]
async fn sighup_reloads_valid_config_and_refuses_invalid() {
    let mut h = Harness::authorized(Options::default()).await;
    let (_, before) = h.token().await;
    let pid_child = h.daemon.as_ref().unwrap();

    // Add a provider.
    let extra = format!(
        "\n[providers.second]\npreset = \"generic\"\nclient_id = \"demo-client\"\nclient_secret_file = \"client-secret\"\nauthorization_url = \"{0}/authorize\"\ntoken_url = \"{0}/token\"\n",
        h.sim.base_url
    );
    let original = std::fs::read_to_string(&h.config_path).unwrap();
    std::fs::write(&h.config_path, format!("{original}{extra}")).unwrap();
    signal(pid_child, libc::SIGHUP);
    eventually(
        Duration::from_secs(5),
        "provider `second` appears",
        || async { h.get_json("/v1/token/second").await.1["error"] == "unknown_connection" },
    )
    .await;
    let r = h.http.get(h.url("/connect/second")).send().await.unwrap();
    assert_eq!(r.status(), 302);

    // An invalid config is refused; the old one stays in force.
    std::fs::write(
        &h.config_path,
        format!("{original}{extra}\n[refresh]\nbogus = 1\n"),
    )
    .unwrap();
    signal(h.daemon.as_ref().unwrap(), libc::SIGHUP);
    eventually(Duration::from_secs(5), "the refusal is logged", || async {
        h.log().contains("configuration reload refused")
    })
    .await;
    let (s, after) = h.token().await;
    assert_eq!(s, 200);
    assert_eq!(after["access_token"], before["access_token"]);
    assert_eq!(
        h.get_json("/v1/token/second").await.1["error"],
        "unknown_connection"
    );

    // Removing `keap` stops serving it; the grant stays in the database.
    std::fs::write(
        &h.config_path,
        original.replace("[providers.keap]", "[providers.other]"),
    )
    .unwrap();
    signal(h.daemon.as_ref().unwrap(), libc::SIGHUP);
    eventually(
        Duration::from_secs(5),
        "keap is no longer served",
        || async { h.token().await.1["error"] == "unknown_provider" },
    )
    .await;
    std::fs::write(&h.config_path, &original).unwrap();
    signal(h.daemon.as_ref().unwrap(), libc::SIGHUP);
    eventually(
        Duration::from_secs(5),
        "keap is served again with its grant",
        || async { h.token().await.1["access_token"] == before["access_token"] },
    )
    .await;
    assert_eq!(h.stop().await, Some(0));
}

#[tokio::test]
async fn sigterm_waits_for_an_in_flight_refresh_to_commit() {
    let mut h = Harness::authorized(Options::default()).await;
    h.sim
        .sim
        .set_token_delay(Duration::from_millis(1500), DelayPhase::AfterRotation);
    let http = h.http.clone();
    let url = h.url("/v1/token/keap/refresh");
    let pending =
        tokio::spawn(async move { http.post(url).send().await.map(|r| r.status().as_u16()) });
    // Let the provider call start, then ask the daemon to stop.
    eventually(
        Duration::from_secs(5),
        "the refresh reaches the provider",
        || async { h.sim.sim.stats().refresh_calls == 1 },
    )
    .await;
    signal(h.daemon.as_ref().unwrap(), libc::SIGTERM);
    assert_eq!(
        h.stop().await,
        Some(0),
        "exit 0 after the refresh committed"
    );
    assert_eq!(
        pending.await.unwrap().ok(),
        Some(200),
        "the caller got its token"
    );
    h.sim
        .sim
        .set_token_delay(Duration::ZERO, DelayPhase::BeforeProcessing);

    // The rotated refresh token was committed: after a restart it works.
    h.start().await;
    let (_, v) = h.token().await;
    assert_eq!(
        v["access_token"].as_str(),
        h.sim.sim.access_tokens_issued().last().map(String::as_str)
    );
    let r = h.post("/v1/token/keap/refresh").await;
    assert_eq!(r.status(), 200);
    let s = h.sim.sim.stats();
    assert_eq!(
        (s.refresh_ok, s.refresh_reuse, s.refresh_rejected),
        (2, 0, 0)
    );
}

#[tokio::test]
async fn socket_activation_uses_the_inherited_listener() {
    let h = Harness::new(Options::default()).await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    use std::os::fd::AsRawFd;
    let fd = listener.as_raw_fd();
    // The config's listen port is deliberately different (and unbound).
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(format!(
            "LISTEN_PID=$$ LISTEN_FDS=1 exec {BIN} serve --config {}",
            h.config_path.display()
        ))
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(h.log_path()).unwrap());
    // SAFETY: only async-signal-safe dup2 between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    drop(listener);
    wait_healthy(
        &h.http,
        &format!("http://127.0.0.1:{port}/healthz"),
        &mut child,
    )
    .await;
    assert!(h.log().contains("socket activation"), "{}", h.log());
    assert!(
        h.http.get(h.url("/healthz")).send().await.is_err(),
        "the configured port stays unbound"
    );
    signal(&child, libc::SIGTERM);
    assert_eq!(
        wait_exit(&mut child, Duration::from_secs(20)).await,
        Some(0)
    );
}

#[tokio::test]
async fn journal_lines_have_priorities_and_no_timestamps() {
    let h = Harness::new(Options::default()).await;
    let mut child = daemon_command(&h)
        .env("JOURNAL_STREAM", "8:12345")
        .spawn()
        .unwrap();
    wait_healthy(&h.http, &h.url("/healthz"), &mut child).await;
    signal(&child, libc::SIGTERM);
    wait_exit(&mut child, Duration::from_secs(20)).await;
    let log = h.log();
    let serving = log
        .lines()
        .find(|l| l.contains("tokenkeeper is serving"))
        .expect("serving line");
    assert!(serving.starts_with("<6>"), "{serving}");
    assert!(!serving.contains("\u{1b}["), "no colours: {serving}");
    assert!(!has_rfc3339_timestamp(serving), "no timestamp: {serving}");
    let warn = log
        .lines()
        .find(|l| l.contains("Keap only accepts HTTPS"))
        .expect("warning line");
    assert!(warn.starts_with("<4>"), "{warn}");

    // --log-format json for log shippers.
    let mut child = daemon_command(&h)
        .args(["--log-format", "json"])
        .spawn()
        .unwrap();
    wait_healthy(&h.http, &h.url("/healthz"), &mut child).await;
    signal(&child, libc::SIGTERM);
    wait_exit(&mut child, Duration::from_secs(20)).await;
    let log = h.log();
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("\"stopped\""))
        .expect("json stop line");
    let v: serde_json::Value = serde_json::from_str(line).expect("json log line");
    assert_eq!(v["level"], "INFO");
}

/// Whether `line` holds an RFC 3339 date-time such as `2026-11-28T03:25:20`.
/// A loose substring check ("T0") would match random temp-dir names.
fn has_rfc3339_timestamp(line: &str) -> bool {
    let shape = b"dddd-dd-ddTdd:dd";
    line.as_bytes().windows(shape.len()).any(|w| {
        w.iter().zip(shape).all(|(c, s)| match s {
            b'd' => c.is_ascii_digit(),
            other => c == other,
        })
    })
}

#[test]
fn timestamp_shape_is_recognised() {
    assert!(has_rfc3339_timestamp("2026-11-28T03:25:20.123Z INFO x"));
    assert!(!has_rfc3339_timestamp(
        "<6>serving database=/tmp/.tmpT0ssdt/tokenkeeper.db"
    ));
}
