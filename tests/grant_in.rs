//! Grants that enter without the browser reaching the daemon (SPEC 10):
//! `tokenkeeper import` and `tokenkeeper connect --paste`, black-box: the
//! real binary, the real daemon, the simulator.

mod common;

use std::process::{Output, Stdio};
use std::time::Duration;

use common::*;
use reqwest::header::LOCATION;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// Where the minted grants of [`mint_refresh_token`] pretend to live: the
/// other program's redirect URI, never called.
const OTHER_APP: &str = "http://127.0.0.1:9/other-app/callback";

/// A grant another program holds: authorized and redeemed at the simulator
/// directly, without the daemon. Returns its refresh token.
async fn mint_refresh_token(h: &Harness) -> String {
    let query = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("response_type", "code")
        .append_pair("client_id", "demo-client")
        .append_pair("redirect_uri", OTHER_APP)
        .append_pair("state", "other-app")
        .finish();
    let r = h
        .http
        .post(h.sim.url("/approve"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(query)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 302);
    let location = url::Url::parse(r.headers()[LOCATION].to_str().unwrap()).unwrap();
    let code = location
        .query_pairs()
        .find(|(k, _)| k == "code")
        .map(|(_, v)| v.into_owned())
        .unwrap();
    let (status, body) = sim_token(
        h,
        &[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", OTHER_APP),
        ],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body["refresh_token"].as_str().unwrap().to_string()
}

/// A token request straight to the simulator, as the other program would.
async fn sim_token(h: &Harness, form: &[(&str, &str)]) -> (u16, serde_json::Value) {
    let req = h.http.post(h.sim.url("/token"));
    // Keap: the code exchange authenticates in the body, a refresh with
    // HTTP Basic (RFC 6749 2.3.1: each part form-urlencoded first).
    let req = if form.contains(&("grant_type", "refresh_token")) {
        let enc = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
        req.basic_auth(enc("demo-client"), Some(enc(CLIENT_SECRET)))
            .form(form)
    } else {
        let mut form: Vec<(&str, &str)> = form.to_vec();
        form.push(("client_id", "demo-client"));
        form.push(("client_secret", CLIENT_SECRET));
        req.form(&form)
    };
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or_default())
}

/// Runs the CLI with `stdin` as its standard input.
async fn cli_stdin(h: &Harness, args: &[&str], stdin: &[u8]) -> Output {
    let mut child = tokio::process::Command::new(BIN)
        .args(args)
        .arg("--config")
        .arg(&h.config_path)
        .env_remove("RUST_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin).await.unwrap();
    drop(input);
    child.wait_with_output().await.unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The command failed (exit 1) with a sentence containing `says`.
fn assert_fails_saying(out: &Output, says: &str) {
    assert_eq!(out.status.code(), Some(1), "{}", stderr(out));
    assert!(stderr(out).contains(says), "{}", stderr(out));
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn token_file(h: &Harness, text: &[u8]) -> String {
    let path = h.dir.path().join("refresh-token");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[tokio::test]
async fn import_adopts_a_grant_and_kills_the_other_copy() {
    let h = Harness::started(Options {
        rust_log: "trace".into(),
        ..Options::default()
    })
    .await;
    let theirs = mint_refresh_token(&h).await;
    let file = token_file(&h, format!("  {theirs}\n").as_bytes());
    let out = h
        .cli(&["import", "keap", "--refresh-token-file", &file])
        .await;
    assert_success(&out);
    assert!(stdout(&out).contains("no longer works"), "{}", stdout(&out));
    // Served from now on...
    let (s, b) = h.token().await;
    assert_eq!(s, 200, "{b}");
    assert!(h
        .sim
        .sim
        .access_token_valid(b["access_token"].as_str().unwrap()));
    // ...and the other program's copy was rotated out.
    let (s, b) = sim_token(
        &h,
        &[("grant_type", "refresh_token"), ("refresh_token", &theirs)],
    )
    .await;
    assert_eq!(s, 400, "{b}");
    // Keap's way of saying so; the simulator saw a rotated-out token.
    assert_eq!(b["error"], "invalid_request", "{b}");
    assert_eq!(h.sim.sim.stats().refresh_reuse, 1);
    // The daemon keeps the grant alive with the rotated token.
    let (s, b) = h.force_refresh().await;
    assert_eq!(s, 200, "{b}");
    // The history says where the grant came from.
    let (s, events) = h.get_json("/v1/connections/keap/default/events").await;
    assert_eq!(s, 200, "{events}");
    let kinds: Vec<&str> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["kind"].as_str())
        .collect();
    assert_eq!(kinds.last(), Some(&"imported"), "{events}");
    assert!(!kinds.contains(&"authorized"), "{events}");
    // No token in the daemon's log, at trace level, whatever it saw.
    let log = h.log();
    assert!(log.contains("grant imported"), "the log is at trace level");
    for t in h.issued_tokens() {
        assert!(!log.contains(&t), "a token reached the log");
    }
}

#[tokio::test]
async fn import_reads_stdin_and_fills_another_account() {
    let h = Harness::started(Options::default()).await;
    let theirs = mint_refresh_token(&h).await;
    let out = cli_stdin(
        &h,
        &["import", "keap", "shop", "--refresh-token-file", "-"],
        format!("{theirs}\n").as_bytes(),
    )
    .await;
    assert_success(&out);
    let (s, b) = h.get_json("/v1/token/keap/shop").await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["account"], "shop");
}

#[tokio::test]
async fn import_of_a_rejected_token_stores_nothing() {
    let h = Harness::started(Options::default()).await;
    let file = token_file(&h, b"abcdefghijklmnopqrstuvwxyz0123456789\n");
    let out = h
        .cli(&["import", "keap", "--refresh-token-file", &file])
        .await;
    assert_fails_saying(&out, "rejected");
    assert!(
        stderr(&out).contains("nothing was stored"),
        "{}",
        stderr(&out)
    );
    assert_eq!(h.connection("default").await, serde_json::Value::Null);
    let (s, _) = h.token().await;
    assert_eq!(s, 404);
}

#[tokio::test]
async fn import_of_an_unreachable_provider_says_try_again() {
    let h = Harness::started(Options::default()).await;
    let theirs = mint_refresh_token(&h).await;
    h.sim
        .sim
        .set_fault(Some(tokenkeeper::dev::Fault::Status(503)));
    let file = token_file(&h, theirs.as_bytes());
    let out = h
        .cli(&["import", "keap", "--refresh-token-file", &file])
        .await;
    assert_fails_saying(&out, "try again");
    assert_eq!(h.connection("default").await, serde_json::Value::Null);
}

#[tokio::test]
async fn import_replaces_an_active_connection_only_when_told() {
    let h = Harness::authorized(Options::default()).await;
    let theirs = mint_refresh_token(&h).await;
    let refreshes = h.sim.sim.stats().refresh_calls;
    let file = token_file(&h, theirs.as_bytes());
    let out = h
        .cli(&["import", "keap", "--refresh-token-file", &file])
        .await;
    assert_fails_saying(&out, "--replace");
    // Refused before the provider was asked: the other copy still works.
    assert_eq!(h.sim.sim.stats().refresh_calls, refreshes);
    let out = h
        .cli(&["import", "keap", "--refresh-token-file", &file, "--replace"])
        .await;
    assert_success(&out);
    assert!(stdout(&out).contains("revoked"), "{}", stdout(&out));
    let (s, b) = h.token().await;
    assert_eq!(s, 200, "{b}");
    // The grant it replaced is revoked at the provider, not left behind.
    eventually(
        Duration::from_secs(10),
        "the replaced grant is revoked",
        || async { h.sim.sim.stats().revocations == 1 },
    )
    .await;
}

#[tokio::test]
async fn import_and_paste_need_the_api_key() {
    let mut h = Harness::with_api_keys(Options::default(), "key-1\n").await;
    h.start().await;
    let theirs = mint_refresh_token(&h).await;
    let r = h
        .http
        .post(h.url("/v1/connections/keap/default/import"))
        .json(&serde_json::json!({ "refresh_token": theirs }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = h
        .http
        .post(h.url("/v1/connections/keap/default/paste/start"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(h.sim.sim.stats().refresh_calls, 0);
    // The CLI sends the key from the config's api_keys_file.
    let file = token_file(&h, theirs.as_bytes());
    let out = h
        .cli(&["import", "keap", "--refresh-token-file", &file])
        .await;
    assert_success(&out);
}

#[tokio::test]
async fn import_from_a_provider_that_does_not_rotate_says_so() {
    let h = Harness::started(Options {
        sim: tokenkeeper::dev::SimulatorConfig {
            rotate_refresh_tokens: false,
            client_secret: CLIENT_SECRET.into(),
            ..Default::default()
        },
        ..Options::default()
    })
    .await;
    let theirs = mint_refresh_token(&h).await;
    let file = token_file(&h, theirs.as_bytes());
    let out = h
        .cli(&["import", "keap", "--refresh-token-file", &file])
        .await;
    assert_success(&out);
    assert!(stdout(&out).contains("did not rotate"), "{}", stdout(&out));
    // The daemon keeps refreshing with the imported token itself.
    let (s, b) = h.force_refresh().await;
    assert_eq!(s, 200, "{b}");
}

#[tokio::test]
async fn import_keeps_a_rotated_token_whose_answer_is_unusable() {
    let h = Harness::started(Options::default()).await;
    let theirs = mint_refresh_token(&h).await;
    h.sim
        .sim
        .set_answer_shape(Some(tokenkeeper::dev::AnswerShape::NoAccessToken));
    let file = token_file(&h, theirs.as_bytes());
    let out = h
        .cli(&["import", "keap", "--refresh-token-file", &file])
        .await;
    assert_success(&out);
    assert!(
        stdout(&out).contains("no usable access token"),
        "{}",
        stdout(&out)
    );
    h.sim.sim.set_answer_shape(None);
    // The rotated token was kept: the first request refreshes with it.
    let (s, b) = h.token().await;
    assert_eq!(s, 200, "{b}");
    assert_no_reuse_or_rejection(&h.sim.sim.stats());
}

#[tokio::test]
async fn import_needs_no_replace_for_a_dead_grant() {
    let h = Harness::authorized(Options::default()).await;
    h.sim.sim.revoke_all_grants();
    let (s, b) = h.force_refresh().await;
    assert_eq!(s, 409, "{b}");
    let theirs = mint_refresh_token(&h).await;
    let file = token_file(&h, theirs.as_bytes());
    let out = h
        .cli(&["import", "keap", "--refresh-token-file", &file])
        .await;
    assert_success(&out);
    let (s, b) = h.token().await;
    assert_eq!(s, 200, "{b}");
}

#[tokio::test]
async fn import_refuses_what_is_not_a_refresh_token() {
    let h = Harness::authorized(Options::default()).await;
    let (_, b) = h.token().await;
    let ours = b["access_token"].as_str().unwrap().to_string();
    let header = base64_url(br#"{"alg":"RS256","typ":"at+jwt"}"#);
    let payload = base64_url(br#"{"sub":"1","scope":"full","exp":9999999999}"#);
    let jwt = format!("{header}.{payload}.c2lnbmF0dXJl");
    let refreshes = h.sim.sim.stats().refresh_calls;
    let cases: [(&[u8], &str); 6] = [
        (b"", "empty"),
        (b"  \n\n", "empty"),
        (b"first-token\nsecond-token\n", "several lines"),
        (b"Bearer abcdef", "spaces"),
        (b"\x00\x01binary\xff", "not text"),
        (br#"{"refresh_token":"x"}"#, "JSON"),
    ];
    for (text, says) in cases {
        let file = token_file(&h, text);
        let out = h
            .cli(&["import", "keap", "other", "--refresh-token-file", &file])
            .await;
        assert_eq!(out.status.code(), Some(2), "{says}: {}", stderr(&out));
        assert!(stderr(&out).contains(says), "{says}: {}", stderr(&out));
    }
    let file = token_file(&h, jwt.as_bytes());
    let out = h
        .cli(&["import", "keap", "other", "--refresh-token-file", &file])
        .await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("access token"), "{}", stderr(&out));
    // Our own access token: the daemon recognizes it.
    let file = token_file(&h, ours.as_bytes());
    let out = h
        .cli(&["import", "keap", "other", "--refresh-token-file", &file])
        .await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("access token tokenkeeper issued"),
        "{}",
        stderr(&out)
    );
    assert!(!stderr(&out).contains(&ours));
    assert_eq!(h.sim.sim.stats().refresh_calls, refreshes);
    assert_eq!(h.connection("other").await, serde_json::Value::Null);
    // No flag carries the token itself.
    let out = h.cli(&["import", "keap", "--refresh-token", "x"]).await;
    assert_eq!(out.status.code(), Some(2));
}

fn base64_url(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// `connect --paste` in the air: the URL it printed, and its stdin.
struct PasteRun {
    child: tokio::process::Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    url: String,
}

async fn start_paste(h: &Harness, account: &str) -> PasteRun {
    let mut child = tokio::process::Command::new(BIN)
        .args(["connect", "keap", account, "--paste", "--config"])
        .arg(&h.config_path)
        .env_remove("RUST_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let url = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("the command prints the URL")
        .unwrap()
        .expect("a line");
    PasteRun { child, lines, url }
}

impl PasteRun {
    async fn paste(mut self, text: &str) -> Output {
        let mut input = self.child.stdin.take().unwrap();
        input
            .write_all(format!("{text}\n").as_bytes())
            .await
            .unwrap();
        drop(input);
        let mut rest = String::new();
        while let Some(line) = self.lines.next_line().await.unwrap() {
            rest.push_str(&line);
            rest.push('\n');
        }
        let mut out = self.child.wait_with_output().await.unwrap();
        out.stdout = rest.into_bytes();
        out
    }
}

#[tokio::test]
async fn connect_paste_authorizes_headless() {
    let h = Harness::started(Options::default()).await;
    let run = start_paste(&h, "default").await;
    assert!(run.url.starts_with(&h.sim.base_url), "{}", run.url);
    assert!(run.url.contains("code_challenge="), "PKCE as for /connect");
    // The browser ends on the daemon's /callback address, which it may not
    // reach: the person copies that address.
    let landed = h.approve(&run.url).await;
    assert!(landed.starts_with(&h.url("/callback")), "{landed}");
    let out = run.paste(&landed).await;
    assert_success(&out);
    assert!(stdout(&out).contains("authorized keap/default"));
    let code = url::Url::parse(&landed)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "code")
        .unwrap()
        .1
        .into_owned();
    let log = h.log();
    assert!(!log.contains(&code), "the code reached the log");
    assert!(
        log.contains("authorized through a pasted address; the grant is stored")
            && !log.contains("in the browser"),
        "the `authorized` notification says how: {log}"
    );
    let (s, b) = h.token().await;
    assert_eq!(s, 200, "{b}");
    // Replaying the same address is refused: the flow was used once.
    let before = h.sim.sim.stats().code_exchanges;
    let run = start_paste(&h, "default").await;
    let out = run.paste(&landed).await;
    assert_fails_saying(&out, "already used");
    assert_eq!(h.sim.sim.stats().code_exchanges, before);
    // Just the query, or the code and state, work too.
    let run = start_paste(&h, "second").await;
    let landed = h.approve(&run.url).await;
    let q = url::Url::parse(&landed).unwrap();
    let get = |k: &str| {
        q.query_pairs()
            .find(|(n, _)| n == k)
            .unwrap()
            .1
            .into_owned()
    };
    let out = run
        .paste(&format!("{} {}", get("code"), get("state")))
        .await;
    assert_success(&out);
    let (s, _) = h.get_json("/v1/token/keap/second").await;
    assert_eq!(s, 200);
}

#[tokio::test]
async fn connect_paste_refuses_a_wrong_state_an_error_and_garbage() {
    let h = Harness::started(Options::default()).await;
    // Another flow's address (started in a browser): not this command's.
    let (browser_url, _cookie) = h.start_connect("keap", "default").await;
    let browser_landed = h.approve(&browser_url).await;
    let run = start_paste(&h, "default").await;
    let out = run.paste(&browser_landed).await;
    assert_fails_saying(&out, "another authorization");
    // An unknown state.
    let run = start_paste(&h, "default").await;
    let landed = h.approve(&run.url).await;
    let forged = landed.replace("state=", "state=x");
    let out = run.paste(&forged).await;
    assert_fails_saying(&out, "nothing was stored");
    // The provider's error in the pasted address.
    let run = start_paste(&h, "default").await;
    let state = url::Url::parse(&run.url)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "state")
        .unwrap()
        .1
        .into_owned();
    let denied = format!("{}?error=access_denied&state={state}", h.url("/callback"));
    let out = run.paste(&denied).await;
    assert_fails_saying(&out, "denied");
    // Garbage.
    let run = start_paste(&h, "default").await;
    let out = run.paste("what is this").await;
    assert_fails_saying(&out, "paste the whole address");
    assert_eq!(h.sim.sim.stats().code_exchanges, 0);
    assert_eq!(h.connection("default").await, serde_json::Value::Null);
}

/// Malformed addresses: each ends the command with exit 1 and a sentence
/// saying what is wrong, no code is exchanged, and nothing is stored.
#[tokio::test]
async fn connect_paste_refuses_malformed_addresses() {
    let h = Harness::started(Options::default()).await;
    let callback = h.url("/callback");
    // `STATE` stands for the state of the flow the command started.
    let cases = [
        (
            "https://[::1/callback?code=abc&state=xyz".to_string(),
            "not an address tokenkeeper can read",
        ),
        (callback.clone(), "no state parameter"),
        (format!("{callback}?code=abc"), "no state parameter"),
        (
            format!("{callback}?state=STATE"),
            "carries no authorization code",
        ),
        (
            format!("{callback}?code=a&code=b&state=STATE"),
            "more than once",
        ),
        (
            format!("{callback}?code=abc&state=STATE&state=other"),
            "more than once",
        ),
    ];
    for (pasted, says) in cases {
        let run = start_paste(&h, "default").await;
        let state = url::Url::parse(&run.url)
            .unwrap()
            .query_pairs()
            .find(|(k, _)| k == "state")
            .unwrap()
            .1
            .into_owned();
        let text = pasted.replace("STATE", &state);
        let out = run.paste(&text).await;
        assert_fails_saying(&out, says);
        assert!(
            stderr(&out).contains("nothing was stored"),
            "{text}: {}",
            stderr(&out)
        );
        assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
    }
    assert_eq!(h.sim.sim.stats().code_exchanges, 0);
    assert_eq!(h.connection("default").await, serde_json::Value::Null);
    let (s, b) = h.get_json("/v1/connections").await;
    assert_eq!(s, 200);
    assert_eq!(b["connections"].as_array().map(Vec::len), Some(0), "{b}");
}

#[tokio::test]
async fn connect_paste_refuses_an_expired_flow() {
    let h = Harness::started(Options::default()).await;
    let run = start_paste(&h, "default").await;
    let landed = h.approve(&run.url).await;
    // Ten minutes pass for the pending authorization.
    let db = sqlx::SqlitePool::connect_with(
        sqlx::sqlite::SqliteConnectOptions::new().filename(h.db_path()),
    )
    .await
    .unwrap();
    let aged = sqlx::query("UPDATE pending_authorizations SET expires_at = 0")
        .execute(&db)
        .await
        .unwrap();
    assert_eq!(aged.rows_affected(), 1);
    db.close().await;
    let out = run.paste(&landed).await;
    assert_fails_saying(&out, "expired");
    assert_eq!(h.sim.sim.stats().code_exchanges, 0);
    assert_eq!(h.connection("default").await, serde_json::Value::Null);
}

/// A grant stored by another process while the import is at the provider
/// is never overwritten: the store compares again in its transaction. The
/// imported pair (the only live copy of the other program's grant, since
/// the provider rotated it) is kept under `ACCOUNT-imported`, and the
/// message says so and what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_never_overwrites_a_grant_stored_meanwhile() {
    use tokenkeeper::dev::DelayPhase;
    let h = Harness::started(Options {
        provider: "request_timeout = \"60s\"".into(),
        ..Options::default()
    })
    .await;
    let theirs = mint_refresh_token(&h).await;
    let file = token_file(&h, theirs.as_bytes());
    let calls = h.sim.sim.stats().refresh_calls;
    // The import's refresh is held at the provider, after the rotation,
    // until the browser authorization below has landed.
    h.sim
        .sim
        .set_token_delay(Duration::from_secs(10), DelayPhase::AfterRotation);
    let args = ["import", "keap", "--refresh-token-file", &file];
    let import = h.cli(&args);
    let meanwhile = async {
        eventually(
            Duration::from_secs(20),
            "the import at the provider",
            || async { h.sim.sim.stats().refresh_calls > calls },
        )
        .await;
        h.sim
            .sim
            .set_token_delay(Duration::ZERO, DelayPhase::BeforeProcessing);
        h.authorize_default().await
    };
    let (out, stored) = tokio::join!(import, meanwhile);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("from another process") && err.contains("nothing was overwritten"),
        "{err}"
    );
    assert!(
        err.contains("keap/default-imported")
            && err.contains("tokenkeeper revoke keap default-imported"),
        "{err}"
    );
    // The grant stored meanwhile is the one served.
    let (s, b) = h.token().await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["access_token"], stored.as_str());
    // The imported grant lives on under its own name, and refreshes.
    let (s, b) = h.get_json("/v1/token/keap/default-imported").await;
    assert_eq!(s, 200, "{b}");
    let (s, b) = h.post_json("/v1/token/keap/default-imported/refresh").await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(h.sim.sim.stats().refresh_reuse, 0);
}
