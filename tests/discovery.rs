//! Discovery (SPEC 11) through the real daemon: a provider configured with
//! only `issuer` gets its endpoints from the simulator's metadata, keeps
//! the document for restarts without network, asks again on reload, and a
//! first start without any usable document is a configuration error
//! (exit 2) naming the URLs tried and what was wrong.

mod common;

use std::time::Duration;

use common::{eventually, signal, Harness, Options, BIN};
use tokenkeeper::dev::DiscoveryFault;

/// A harness whose provider `keap` has `issuer` instead of endpoints
/// (`extra` is appended to its table).
async fn harness(extra: &str) -> Harness {
    let h = Harness::new(Options::default()).await;
    let sim = &h.sim.base_url;
    common::write_config_with_provider(
        &h,
        &format!(
            r#"[providers.keap]
client_id = "demo-client"
client_secret_file = "client-secret"
issuer = "{sim}"
api_base_url = "{sim}/api"
{extra}"#
        ),
    );
    h
}

/// Runs `serve` on `h`'s config, expecting it to stop at once; returns
/// its exit code and everything it printed.
async fn failed_start(h: &Harness) -> (Option<i32>, String) {
    let run = tokio::process::Command::new(BIN)
        .arg("serve")
        .arg("--config")
        .arg(&h.config_path)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .output();
    let out = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("serve stops by itself")
        .expect("serve runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

async fn connect_and_refresh(h: &Harness) {
    let page = h.authorize("keap", "default").await;
    assert_eq!(page.status(), 200);
    let (status, v) = h.token().await;
    assert_eq!(status, 200, "{v}");
    let (status, v) = h.post_json("/v1/token/keap/refresh").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(h.sim.sim.stats().refresh_ok, 1);
}

#[tokio::test]
async fn issuer_alone_gives_the_endpoints_and_a_restart_without_discovery_uses_the_kept_document() {
    let mut h = harness("").await;
    h.start().await;
    assert!(h.sim.sim.stats().discovery_fetches >= 1);
    connect_and_refresh(&h).await;
    h.stop().await;

    // The provider's metadata is unreachable now: the kept document serves.
    h.sim
        .sim
        .set_discovery_fault(Some(DiscoveryFault::Status(503)));
    h.start().await;
    assert!(
        h.log().contains("using the document kept"),
        "the fallback is logged:\n{}",
        h.log()
    );
    let (status, v) = h.post_json("/v1/token/keap/refresh").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(h.sim.sim.stats().refresh_ok, 2);

    // A reload asks the issuer again.
    h.sim.sim.set_discovery_fault(None);
    let before = h.sim.sim.stats().discovery_fetches;
    signal(h.daemon.as_ref().unwrap(), libc::SIGHUP);
    eventually(
        Duration::from_secs(10),
        "the reload fetches again",
        || async {
            h.sim.sim.stats().discovery_fetches > before
                && h.log().contains("configuration reloaded")
        },
    )
    .await;
}

#[tokio::test]
async fn rfc8414_metadata_is_used_when_there_is_no_openid_configuration() {
    let mut h = harness("").await;
    h.sim
        .sim
        .set_discovery_fault(Some(DiscoveryFault::OnlyOAuthMetadata));
    h.start().await;
    connect_and_refresh(&h).await;
}

#[tokio::test]
async fn a_first_start_without_discovery_is_a_config_error_naming_the_urls() {
    let h = harness("").await;
    h.sim
        .sim
        .set_discovery_fault(Some(DiscoveryFault::NotFound));
    let (code, out) = failed_start(&h).await;
    assert_eq!(code, Some(2), "{out}");
    let sim = &h.sim.base_url;
    for needle in [
        "providers.keap.issuer".to_string(),
        format!("{sim}/.well-known/openid-configuration answered HTTP 404"),
        format!("{sim}/.well-known/oauth-authorization-server answered HTTP 404"),
        "no earlier document is kept".to_string(),
    ] {
        assert!(out.contains(&needle), "missing {needle:?} in:\n{out}");
    }
}

#[tokio::test]
async fn garbage_discovery_documents_each_get_a_sentence_and_exit_2() {
    let h = harness("request_timeout = \"1s\"").await;
    for (fault, says) in [
        (DiscoveryFault::NotJson, "did not answer a JSON document"),
        (
            DiscoveryFault::NoTokenEndpoint,
            "has no token_endpoint; set token_url",
        ),
        (
            DiscoveryFault::WrongIssuer,
            "names the issuer \"https://attacker.example\"",
        ),
        (DiscoveryFault::Huge, "answered more than 256 KiB"),
        (
            DiscoveryFault::Hang(Duration::from_secs(3)),
            "did not answer within 1 s",
        ),
        (DiscoveryFault::Status(500), "answered HTTP 500"),
    ] {
        h.sim.sim.set_discovery_fault(Some(fault.clone()));
        let (code, out) = failed_start(&h).await;
        assert_eq!(code, Some(2), "{fault:?}: {out}");
        assert!(out.contains(says), "{fault:?}: missing {says:?} in:\n{out}");
        assert!(!out.contains("panicked"), "{out}");
    }
}

#[tokio::test]
async fn an_explicit_endpoint_wins_and_may_be_missing_from_the_document() {
    let mut h = harness("").await;
    let token_url = format!("token_url = \"{}/token\"\n", h.sim.base_url);
    let text = std::fs::read_to_string(&h.config_path).unwrap() + &token_url;
    std::fs::write(&h.config_path, text).unwrap();
    h.sim
        .sim
        .set_discovery_fault(Some(DiscoveryFault::NoTokenEndpoint));
    h.start().await;
    connect_and_refresh(&h).await;
}

#[tokio::test]
async fn failed_discovery_only_warns_when_the_file_sets_both_required_endpoints() {
    let mut h = harness("").await;
    let sim = h.sim.base_url.clone();
    let text = std::fs::read_to_string(&h.config_path).unwrap()
        + &format!("authorization_url = \"{sim}/authorize\"\ntoken_url = \"{sim}/token\"\n");
    std::fs::write(&h.config_path, text).unwrap();
    h.sim
        .sim
        .set_discovery_fault(Some(DiscoveryFault::NotFound));
    h.start().await;
    assert!(
        h.log().contains("using the configured endpoints"),
        "{}",
        h.log()
    );
    connect_and_refresh(&h).await;
}

#[tokio::test]
async fn check_config_accepts_an_issuer_without_fetching_it() {
    let h = harness("").await;
    h.sim
        .sim
        .set_discovery_fault(Some(DiscoveryFault::NotFound));
    let out = h.cli(&["check-config"]).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(h.sim.sim.stats().discovery_fetches, 0);
}

/// Issuers are asked all at once: one after the other, a few that do not
/// answer (two URLs each, up to request_timeout apiece) would hold the
/// start past systemd's start timeout, kept documents or not.
#[tokio::test]
async fn issuers_are_asked_at_once_so_unanswering_ones_do_not_add_up() {
    let h = harness("").await;
    let sim = h.sim.base_url.clone();
    let endpoints = format!(
        "authorization_url = \"{sim}/authorize\"\ntoken_url = \"{sim}/token\"\nrequest_timeout = \"5s\"\n"
    );
    let mut text = std::fs::read_to_string(&h.config_path).unwrap() + &endpoints;
    for n in 2..=4 {
        text += &format!(
            "\n[providers.other{n}]\nclient_id = \"demo-client\"\nclient_secret_file = \"client-secret\"\nissuer = \"{sim}\"\n{endpoints}"
        );
    }
    std::fs::write(&h.config_path, text).unwrap();
    h.sim
        .sim
        .set_discovery_fault(Some(DiscoveryFault::Hang(Duration::from_secs(60))));
    let mut child = common::spawn_daemon(&h.config_path, &h.log_path(), &h.rust_log, &[]);
    // One at a time, the second request would come only after the first
    // one's 5 s timeout.
    let deadline = std::time::Instant::now() + Duration::from_secs(4);
    let all_asked = loop {
        if h.sim.sim.stats().discovery_fetches >= 4 {
            break true;
        }
        if std::time::Instant::now() > deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        all_asked,
        "the four issuers were asked at once: {} requests\n{}",
        h.sim.sim.stats().discovery_fetches,
        h.log()
    );
}

/// A document refused at a first start is not kept: the next start, with
/// the issuer unreachable, finds no earlier document, and no connection
/// exists.
#[tokio::test]
async fn a_refused_document_at_first_start_is_not_kept() {
    let h = harness("").await;
    for (fault, says) in [
        (DiscoveryFault::NotJson, "did not answer a JSON document"),
        (
            DiscoveryFault::NoTokenEndpoint,
            "has no token_endpoint; set token_url",
        ),
    ] {
        h.sim.sim.set_discovery_fault(Some(fault.clone()));
        let (code, out) = failed_start(&h).await;
        assert_eq!(code, Some(2), "{fault:?}: {out}");
        assert!(out.contains(says), "{fault:?}: missing {says:?} in:\n{out}");
        assert!(out.contains("providers.keap.issuer"), "{out}");
    }
    h.sim
        .sim
        .set_discovery_fault(Some(DiscoveryFault::Status(503)));
    let (code, out) = failed_start(&h).await;
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("no earlier document is kept"), "{out}");
    assert_eq!(h.sim.sim.stats().code_exchanges, 0);
}

/// On reload a document that is not JSON, or lacks the token endpoint, is
/// named in a warning and not kept: the daemon goes on with the last good
/// one, which a later start without network still finds.
#[tokio::test]
async fn a_refused_document_on_reload_keeps_the_last_good_one() {
    let mut h = harness("").await;
    h.start().await;
    connect_and_refresh(&h).await;
    for (n, (fault, says)) in [
        (DiscoveryFault::NotJson, "did not answer a JSON document"),
        (DiscoveryFault::NoTokenEndpoint, "has no token_endpoint"),
    ]
    .into_iter()
    .enumerate()
    {
        h.sim.sim.set_discovery_fault(Some(fault.clone()));
        signal(h.daemon.as_ref().unwrap(), libc::SIGHUP);
        eventually(Duration::from_secs(10), "the reload is done", || async {
            h.log().matches("configuration reloaded").count() > n
        })
        .await;
        let log = h.log();
        assert!(
            log.lines()
                .any(|l| l.contains(says) && l.contains("using the document kept")),
            "{fault:?}: no warning naming {says:?}:\n{log}"
        );
    }
    let (status, v) = h.post_json("/v1/token/keap/refresh").await;
    assert_eq!(status, 200, "{v}");
    h.stop().await;
    h.sim
        .sim
        .set_discovery_fault(Some(DiscoveryFault::Status(503)));
    h.start().await;
    assert!(h.log().contains("using the document kept"), "{}", h.log());
    let (status, v) = h.post_json("/v1/token/keap/refresh").await;
    assert_eq!(status, 200, "{v}");
}
