use super::*;

const REDIRECT: &str = "http://127.0.0.1:1/callback";
const VERIFIER: &str = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

fn challenge() -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(VERIFIER.as_bytes()))
}

struct Tokens {
    access: String,
    refresh: String,
}

/// Walks the consent flow and returns the authorization code.
async fn authorize(rs: &RunningSimulator, http: &reqwest::Client) -> String {
    let ch = challenge();
    let query = [
        ("response_type", "code"),
        ("client_id", "demo-client"),
        ("redirect_uri", REDIRECT),
        ("scope", "full"),
        ("state", "xyz<&>"),
        ("code_challenge", ch.as_str()),
        ("code_challenge_method", "S256"),
    ];
    let page = http
        .get(rs.url("/authorize"))
        .query(&query)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    assert!(html.contains("action=\"approve\""), "{html}");
    assert!(html.contains("action=\"deny\""));
    assert!(
        html.contains("value=\"xyz&lt;&amp;&gt;\""),
        "state must be escaped"
    );
    let resp = http
        .post(rs.url("/approve"))
        .form(&query)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 302);
    let loc = url::Url::parse(resp.headers()["location"].to_str().unwrap()).unwrap();
    assert!(loc.as_str().starts_with(REDIRECT));
    let q: HashMap<String, String> = loc.query_pairs().into_owned().collect();
    assert_eq!(q.get("state").map(String::as_str), Some("xyz<&>"));
    let code = q.get("code").cloned().unwrap();
    assert_eq!(code.len(), 32);
    code
}

async fn exchange(
    rs: &RunningSimulator,
    http: &reqwest::Client,
    code: &str,
    verifier: &str,
) -> reqwest::Response {
    http.post(rs.url("/token"))
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", REDIRECT),
            ("code_verifier", verifier),
            ("client_id", "demo-client"),
            ("client_secret", "demo-secret"),
        ])
        .send()
        .await
        .unwrap()
}

async fn obtain(rs: &RunningSimulator, http: &reqwest::Client) -> Tokens {
    let code = authorize(rs, http).await;
    let resp = exchange(rs, http, &code, VERIFIER).await;
    assert_eq!(resp.status(), 200);
    let v: serde_json::Value = resp.json().await.unwrap();
    Tokens {
        access: v["access_token"].as_str().unwrap().to_owned(),
        refresh: v["refresh_token"].as_str().unwrap().to_owned(),
    }
}

async fn refresh(rs: &RunningSimulator, http: &reqwest::Client, rt: &str) -> reqwest::Response {
    http.post(rs.url("/token"))
        .basic_auth("demo-client", Some("demo-secret"))
        .form(&[("grant_type", "refresh_token"), ("refresh_token", rt)])
        .send()
        .await
        .unwrap()
}

async fn json(resp: reqwest::Response) -> (u16, serde_json::Value) {
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    let v = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
    (status, v)
}

async fn api(
    rs: &RunningSimulator,
    http: &reqwest::Client,
    token: &str,
    path: &str,
) -> reqwest::Response {
    http.get(rs.url(&format!("/api/{path}")))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

async fn start() -> RunningSimulator {
    Simulator::start_local(SimulatorConfig::default())
        .await
        .unwrap()
}

#[tokio::test]
async fn code_flow_with_pkce() {
    let rs = start().await;
    assert!(rs.base_url.starts_with("http://127.0.0.1:") && !rs.base_url.ends_with('/'));
    let http = client();
    let code = authorize(&rs, &http).await;

    let (status, v) = json(
        exchange(
            &rs,
            &http,
            &code,
            "wrong-verifier-wrong-verifier-wrong-verif",
        )
        .await,
    )
    .await;
    assert_eq!((status, v["error"].as_str()), (400, Some("invalid_grant")));

    let resp = exchange(&rs, &http, &code, VERIFIER).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"],
        "application/json;charset=UTF-8"
    );
    assert_eq!(resp.headers()["cache-control"], "no-store");
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["token_type"], "bearer");
    assert_eq!(v["expires_in"], 86400);
    assert_eq!(v["scope"], SIM_SCOPE);
    let at = v["access_token"].as_str().unwrap();
    let rt = v["refresh_token"].as_str().unwrap();
    for t in [at, rt] {
        assert_eq!(t.len(), 32);
        assert!(t.chars().all(|c| c.is_ascii_alphanumeric()));
    }
    assert!(rs.sim.access_token_valid(at));
    assert_eq!(rs.sim.current_refresh_token().as_deref(), Some(rt));
    assert_eq!(rs.sim.stats().code_exchanges, 1);

    // Single use.
    let (status, v) = json(exchange(&rs, &http, &code, VERIFIER).await).await;
    assert_eq!((status, v["error"].as_str()), (400, Some("invalid_grant")));

    // redirect_uri must match.
    let code = authorize(&rs, &http).await;
    let resp = http
        .post(rs.url("/token"))
        .basic_auth("demo-client", Some("demo-secret"))
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", code.as_str()),
            ("redirect_uri", "http://127.0.0.1:1/other"),
            ("code_verifier", VERIFIER),
        ])
        .send()
        .await
        .unwrap();
    let (status, v) = json(resp).await;
    assert_eq!((status, v["error"].as_str()), (400, Some("invalid_grant")));
}

#[tokio::test]
async fn authorize_rejects_bad_client_and_deny_redirects() {
    let rs = start().await;
    let http = client();
    let resp = http
        .get(
            rs.url("/authorize?response_type=code&client_id=nope&redirect_uri=http%3A%2F%2Fx%2Fcb"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let resp = http
        .get(rs.url("/authorize?response_type=code&client_id=demo-client"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);

    let resp = http
        .post(rs.url("/deny"))
        .form(&[
            ("response_type", "code"),
            ("client_id", "demo-client"),
            ("redirect_uri", "http://127.0.0.1:1/cb?keep=1"),
            ("state", "s1"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 302);
    let loc = url::Url::parse(resp.headers()["location"].to_str().unwrap()).unwrap();
    let q: HashMap<String, String> = loc.query_pairs().into_owned().collect();
    assert_eq!(q["keep"], "1");
    assert_eq!(q["error"], "access_denied");
    assert_eq!(q["state"], "s1");
    assert!(q.contains_key("error_description"));
}

#[tokio::test]
async fn refresh_rotation_and_reuse_detection() {
    let rs = start().await;
    let http = client();
    let t = obtain(&rs, &http).await;

    let (status, v) = json(refresh(&rs, &http, &t.refresh).await).await;
    assert_eq!(status, 200);
    let rt2 = v["refresh_token"].as_str().unwrap().to_owned();
    let at2 = v["access_token"].as_str().unwrap().to_owned();
    assert_ne!(rt2, t.refresh);
    assert!(
        !rs.sim.access_token_valid(&t.access),
        "old access token must die"
    );
    assert!(rs.sim.access_token_valid(&at2));
    assert_eq!(
        rs.sim.current_refresh_token().as_deref(),
        Some(rt2.as_str())
    );
    assert_eq!(
        rs.sim.refresh_tokens_issued(),
        vec![t.refresh.clone(), rt2.clone()]
    );
    assert_eq!(
        rs.sim.access_tokens_issued(),
        vec![t.access.clone(), at2.clone()]
    );

    let (status, v) = json(refresh(&rs, &http, &t.refresh).await).await;
    assert_eq!(status, 400);
    assert_eq!(
        v,
        serde_json::json!({"error":"invalid_request","error_description":"Invalid Refresh Token"})
    );
    let (status, _) = json(refresh(&rs, &http, "unknownunknownunknownunknown12345").await).await;
    assert_eq!(status, 400);

    let s = rs.sim.stats();
    assert_eq!(
        (
            s.refresh_calls,
            s.refresh_ok,
            s.refresh_reuse,
            s.refresh_rejected
        ),
        (3, 1, 1, 2)
    );
    // Reuse does not kill the current token.
    assert_eq!(refresh(&rs, &http, &rt2).await.status(), 200);
}

#[tokio::test]
async fn non_rotating_and_invalid_grant_style() {
    let rs = Simulator::start_local(SimulatorConfig {
        rotate_refresh_tokens: false,
        revoke_old_access_on_refresh: false,
        refresh_error_style: RefreshErrorStyle::InvalidGrant,
        ..SimulatorConfig::default()
    })
    .await
    .unwrap();
    let http = client();
    let t = obtain(&rs, &http).await;
    for _ in 0..2 {
        let (status, v) = json(refresh(&rs, &http, &t.refresh).await).await;
        assert_eq!(status, 200);
        assert!(v.get("refresh_token").is_none());
    }
    assert!(rs.sim.access_token_valid(&t.access));
    assert_eq!(rs.sim.stats().refresh_reuse, 0);
    rs.sim.revoke_all_grants();
    let (status, v) = json(refresh(&rs, &http, &t.refresh).await).await;
    assert_eq!((status, v["error"].as_str()), (400, Some("invalid_grant")));
    assert!(rs.sim.current_refresh_token().is_none());
}

#[tokio::test]
async fn client_authentication_on_refresh() {
    let rs = start().await;
    let http = client();
    let t = obtain(&rs, &http).await;
    let form = [
        ("grant_type", "refresh_token"),
        ("refresh_token", t.refresh.as_str()),
        ("client_id", "demo-client"),
        ("client_secret", "demo-secret"),
    ];
    let resp = http
        .post(rs.url("/token"))
        .form(&form)
        .send()
        .await
        .unwrap();
    assert!(resp.headers().contains_key("www-authenticate"));
    let (status, v) = json(resp).await;
    assert_eq!((status, v["error"].as_str()), (401, Some("invalid_client")));

    let resp = http
        .post(rs.url("/token"))
        .basic_auth("demo-client", Some("wrong"))
        .form(&form[..2])
        .send()
        .await
        .unwrap();
    let (status, v) = json(resp).await;
    assert_eq!((status, v["error"].as_str()), (401, Some("invalid_client")));

    let resp = http
        .post(rs.url("/token"))
        .header("authorization", "Basic %%%not-base64")
        .form(&form[..2])
        .send()
        .await
        .unwrap();
    let (status, v) = json(resp).await;
    assert_eq!(
        (status, v["error"].as_str()),
        (400, Some("invalid_request"))
    );
    // None of the failed attempts consumed the token.
    assert_eq!(refresh(&rs, &http, &t.refresh).await.status(), 200);
}

#[tokio::test]
async fn body_credentials_allowed_when_basic_not_required_and_public_client() {
    let rs = Simulator::start_local(SimulatorConfig {
        require_basic_on_refresh: false,
        ..SimulatorConfig::default()
    })
    .await
    .unwrap();
    let http = client();
    let t = obtain(&rs, &http).await;
    let resp = http
        .post(rs.url("/token"))
        .form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", t.refresh.as_str()),
            ("client_id", "demo-client"),
            ("client_secret", "demo-secret"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    let rs = Simulator::start_local(SimulatorConfig {
        client_secret: String::new(),
        ..SimulatorConfig::default()
    })
    .await
    .unwrap();
    let code = authorize(&rs, &http).await;
    let resp = http
        .post(rs.url("/token"))
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", code.as_str()),
            ("redirect_uri", REDIRECT),
            ("code_verifier", VERIFIER),
            ("client_id", "demo-client"),
        ])
        .send()
        .await
        .unwrap();
    let (status, v) = json(resp).await;
    assert_eq!(status, 200);
    let resp = http
        .post(rs.url("/token"))
        .form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", v["refresh_token"].as_str().unwrap()),
            ("client_id", "demo-client"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn revoke_kills_the_whole_grant() {
    let rs = start().await;
    let http = client();
    let t = obtain(&rs, &http).await;
    let unauth = http
        .post(rs.url("/revoke"))
        .form(&[("token", t.refresh.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(unauth.status(), 401);
    assert!(rs.sim.access_token_valid(&t.access));

    let resp = http
        .post(rs.url("/revoke"))
        .basic_auth("demo-client", Some("demo-secret"))
        .form(&[
            ("token", t.refresh.as_str()),
            ("token_type_hint", "refresh_token"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(!rs.sim.access_token_valid(&t.access));
    assert_eq!(api(&rs, &http, &t.access, "v1/x").await.status(), 401);
    assert_eq!(refresh(&rs, &http, &t.refresh).await.status(), 400);
    assert!(rs.sim.current_refresh_token().is_none());

    let resp = http
        .post(rs.url("/revoke"))
        .basic_auth("demo-client", Some("demo-secret"))
        .form(&[("token", "doesnotexist")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let s = rs.sim.stats();
    assert_eq!(
        (s.revocations, s.refresh_rejected, s.refresh_reuse),
        (1, 1, 0)
    );
}

#[tokio::test]
async fn faults() {
    let rs = start().await;
    let http = client();
    let t = obtain(&rs, &http).await;

    rs.sim.push_fault(Fault::Status(503));
    let resp = refresh(&rs, &http, &t.refresh).await;
    assert_eq!(resp.status(), 503);
    assert!(serde_json::from_str::<serde_json::Value>(&resp.text().await.unwrap()).is_err());

    rs.sim.push_fault(Fault::RateLimited {
        retry_after_secs: Some(7),
    });
    rs.sim.push_fault(Fault::RateLimited {
        retry_after_secs: None,
    });
    let resp = refresh(&rs, &http, &t.refresh).await;
    assert_eq!(resp.headers()["retry-after"], "7");
    let (status, v) = json(resp).await;
    assert_eq!(status, 429);
    assert_eq!(
        v["fault"]["detail"]["errorcode"],
        "policies.ratelimit.QuotaViolation"
    );
    assert!(v["fault"]["faultstring"]
        .as_str()
        .unwrap()
        .starts_with("Rate limit quota violation"));
    let resp = refresh(&rs, &http, &t.refresh).await;
    assert_eq!(resp.status(), 429);
    assert!(!resp.headers().contains_key("retry-after"));

    rs.sim.push_fault(Fault::Garbage);
    let resp = refresh(&rs, &http, &t.refresh).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.json::<serde_json::Value>().await.is_err());

    rs.sim.push_fault(Fault::MissingAccessToken);
    let (status, v) = json(refresh(&rs, &http, &t.refresh).await).await;
    assert_eq!(status, 200);
    assert!(v.get("access_token").is_none());

    rs.sim.push_fault(Fault::Hang(Duration::from_millis(200)));
    let started = Instant::now();
    let resp = refresh(&rs, &http, &t.refresh).await;
    assert_eq!(resp.status(), 504);
    assert!(started.elapsed() >= Duration::from_millis(200));

    rs.sim.push_fault(Fault::RejectRefresh);
    let (status, v) = json(refresh(&rs, &http, &t.refresh).await).await;
    assert_eq!(
        (status, v["error_description"].as_str()),
        (400, Some("Invalid Refresh Token"))
    );

    // No fault consumed the token.
    assert_eq!(
        rs.sim.current_refresh_token().as_deref(),
        Some(t.refresh.as_str())
    );
    let s = rs.sim.stats();
    assert_eq!(
        (
            s.refresh_calls,
            s.refresh_ok,
            s.refresh_rejected,
            s.refresh_reuse
        ),
        (7, 0, 1, 0)
    );

    // Persistent fault until cleared; queued faults take precedence.
    rs.sim.set_fault(Some(Fault::Status(502)));
    rs.sim.push_fault(Fault::Status(500));
    assert_eq!(refresh(&rs, &http, &t.refresh).await.status(), 500);
    assert_eq!(refresh(&rs, &http, &t.refresh).await.status(), 502);
    assert_eq!(refresh(&rs, &http, &t.refresh).await.status(), 502);
    rs.sim.set_fault(None);
    assert_eq!(refresh(&rs, &http, &t.refresh).await.status(), 200);
}

#[tokio::test]
async fn delay_after_rotation_loses_the_grant_for_an_impatient_client() {
    let rs = start().await;
    let http = client();
    let t = obtain(&rs, &http).await;
    rs.sim
        .set_token_delay(Duration::from_millis(500), DelayPhase::AfterRotation);
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let err = impatient
        .post(rs.url("/token"))
        .basic_auth("demo-client", Some("demo-secret"))
        .form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", t.refresh.as_str()),
        ])
        .send()
        .await;
    assert!(err.is_err());
    let current = rs.sim.current_refresh_token().unwrap();
    assert_ne!(current, t.refresh);

    rs.sim
        .set_token_delay(Duration::from_millis(300), DelayPhase::BeforeProcessing);
    let err = impatient
        .post(rs.url("/token"))
        .basic_auth("demo-client", Some("demo-secret"))
        .form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", current.as_str()),
        ])
        .send()
        .await;
    assert!(err.is_err());
    // The request is dropped with the connection while it waits, so nothing
    // happened server-side: the grant is intact.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        rs.sim.current_refresh_token().as_deref(),
        Some(current.as_str())
    );
    rs.sim
        .set_token_delay(Duration::ZERO, DelayPhase::BeforeProcessing);
    assert_eq!(refresh(&rs, &http, &current).await.status(), 200);
    assert_eq!(rs.sim.stats().refresh_reuse, 0);
}

#[tokio::test]
async fn api_bearer_check_and_expiry() {
    let rs = start().await;
    let http = client();
    let t = obtain(&rs, &http).await;

    let resp = http
        .post(rs.url("/api/crm/rest/v1/contacts?limit=5"))
        .bearer_auth(&t.access)
        .body("hello")
        .send()
        .await
        .unwrap();
    let (status, v) = json(resp).await;
    assert_eq!(status, 200);
    assert_eq!(
        v,
        serde_json::json!({"method":"POST","path":"crm/rest/v1/contacts","query":"limit=5","body_len":5})
    );

    let (status, v) = json(http.get(rs.url("/api/x")).send().await.unwrap()).await;
    assert_eq!(status, 401);
    assert_eq!(v["fault"]["faultstring"], "Invalid Access Token");
    assert_eq!(
        v["fault"]["detail"]["errorcode"],
        "keymanagement.service.invalid_access_token"
    );
    assert_eq!(api(&rs, &http, "bogus", "x").await.status(), 401);

    let resp = api(&rs, &http, &t.access, "large?bytes=100000").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/octet-stream");
    let bytes = resp.bytes().await.unwrap();
    assert_eq!(bytes.len(), 100_000);
    assert_eq!(bytes[252], 1);
    assert_eq!(
        api(&rs, &http, &t.access, "large?bytes=abc").await.status(),
        400
    );

    rs.sim.set_access_lifetime(Duration::from_millis(150));
    let (_, v) = json(refresh(&rs, &http, &t.refresh).await).await;
    let short = v["access_token"].as_str().unwrap().to_owned();
    assert_eq!(v["expires_in"], 0);
    assert_eq!(api(&rs, &http, &short, "x").await.status(), 200);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!rs.sim.access_token_valid(&short));
    assert_eq!(api(&rs, &http, &short, "x").await.status(), 401);
    let s = rs.sim.stats();
    assert_eq!((s.api_calls, s.api_unauthorized), (7, 3));
}

#[tokio::test]
async fn malformed_token_requests_get_json_400s() {
    let rs = start().await;
    let http = client();
    let cases: Vec<(Option<&str>, &str, &str)> = vec![
        (
            Some("application/json"),
            r#"{"grant_type":"refresh_token"}"#,
            "invalid_request",
        ),
        (None, "grant_type=refresh_token", "invalid_request"),
        (
            Some("application/x-www-form-urlencoded"),
            "",
            "invalid_request",
        ),
        (
            Some("application/x-www-form-urlencoded"),
            "grant_type=password",
            "unsupported_grant_type",
        ),
        (
            Some("application/x-www-form-urlencoded"),
            "%%%=&&==%ff%fe",
            "invalid_request",
        ),
        (
            Some("application/x-www-form-urlencoded; charset=utf-8"),
            "grant_type=refresh_token&grant_type=refresh_token",
            "invalid_request",
        ),
        (
            Some("application/x-www-form-urlencoded"),
            "grant_type=authorization_code&client_id=demo-client&client_secret=demo-secret",
            "invalid_request",
        ),
    ];
    for (ct, body, expected) in cases {
        let mut req = http
            .post(rs.url("/token"))
            .basic_auth("demo-client", Some("demo-secret"))
            .body(body);
        if let Some(ct) = ct {
            req = req.header("content-type", ct);
        }
        let (status, v) = json(req.send().await.unwrap()).await;
        assert_eq!(
            (status, v["error"].as_str()),
            (400, Some(expected)),
            "body {body:?}"
        );
        assert!(v["error_description"].is_string());
    }
}

#[tokio::test]
async fn control_api_only_when_enabled() {
    let rs = start().await;
    let http = client();
    assert_eq!(
        http.get(rs.url("/_sim/stats"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );

    let rs = Simulator::start_local(SimulatorConfig {
        control_api: true,
        ..SimulatorConfig::default()
    })
    .await
    .unwrap();
    let (status, v) = json(http.get(rs.url("/_sim/stats")).send().await.unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(v["refresh_reuse"], 0);
    let t = obtain(&rs, &http).await;
    let resp = http
        .post(rs.url("/_sim/config"))
        .json(&serde_json::json!({"access_lifetime_secs": 60, "fault": {"type": "status", "status": 503}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(refresh(&rs, &http, &t.refresh).await.status(), 503);
    let resp = http
        .post(rs.url("/_sim/config"))
        .json(&serde_json::json!({"fault": null}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (status, v) = json(refresh(&rs, &http, &t.refresh).await).await;
    assert_eq!((status, v["expires_in"].as_u64()), (200, Some(60)));
    let resp = http
        .post(rs.url("/_sim/config"))
        .body("{nope")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
}

#[tokio::test]
async fn router_works_when_nested() {
    let sim = Simulator::new(SimulatorConfig::default());
    let app = Router::new().nest("/dev-provider", sim.router());
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let resp = client()
        .get(format!("http://{addr}/dev-provider/authorize?response_type=code&client_id=demo-client&redirect_uri=http%3A%2F%2Fx%2Fcb"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    task.abort();
}

#[tokio::test]
async fn discovery_documents_name_the_simulator_and_faults_apply() {
    let rs = Simulator::start_local(SimulatorConfig::default())
        .await
        .unwrap();
    let http = client();
    let oidc = rs.url("/.well-known/openid-configuration");
    let oauth = rs.url("/.well-known/oauth-authorization-server");
    for url in [&oidc, &oauth] {
        let v: serde_json::Value = http.get(url).send().await.unwrap().json().await.unwrap();
        assert_eq!(v["issuer"], rs.base_url.as_str());
        assert_eq!(v["token_endpoint"], format!("{}/token", rs.base_url));
        assert_eq!(v["revocation_endpoint"], format!("{}/revoke", rs.base_url));
    }
    rs.sim
        .set_discovery_fault(Some(DiscoveryFault::OnlyOAuthMetadata));
    assert_eq!(http.get(&oidc).send().await.unwrap().status(), 404);
    assert_eq!(http.get(&oauth).send().await.unwrap().status(), 200);
    rs.sim.set_issuer(None);
    assert_eq!(http.get(&oauth).send().await.unwrap().status(), 404);
    assert_eq!(rs.sim.stats().discovery_fetches, 5);
}

#[tokio::test]
async fn client_credentials_issue_independent_tokens_without_a_refresh_token() {
    let rs = start().await;
    let http = client();
    let ask = |secret: &'static str| {
        http.post(rs.url("/token"))
            .basic_auth("demo-client", Some(secret))
            .form(&[("grant_type", "client_credentials"), ("scope", "a b")])
            .send()
    };
    let (s, first) = json(ask("demo-secret").await.unwrap()).await;
    assert_eq!(s, 200, "{first}");
    assert!(first.get("refresh_token").is_none(), "{first}");
    let (_, second) = json(ask("demo-secret").await.unwrap()).await;
    let (a, b) = (
        first["access_token"].as_str().unwrap(),
        second["access_token"].as_str().unwrap(),
    );
    assert_ne!(a, b);
    assert!(
        rs.sim.access_token_valid(a) && rs.sim.access_token_valid(b),
        "a new token does not kill the previous one"
    );
    assert_eq!(api(&rs, &http, a, "x").await.status(), 200);
    assert_eq!(
        rs.sim.last_client_credentials_scope().as_deref(),
        Some("a b")
    );
    // A wrong secret, and credentials in the body where Keap wants Basic.
    let (s, e) = json(ask("wrong").await.unwrap()).await;
    assert_eq!((s, e["error"].as_str()), (401, Some("invalid_client")));
    let body = http
        .post(rs.url("/token"))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", "demo-client"),
            ("client_secret", "demo-secret"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(body.status(), 401);
    // Faults apply as to refreshes, queued or persistent.
    rs.sim.set_fault(Some(Fault::Status(503)));
    assert_eq!(ask("demo-secret").await.unwrap().status(), 503);
    rs.sim.set_fault(None);
    let stats = rs.sim.stats();
    assert_eq!(
        (stats.client_credentials_calls, stats.client_credentials_ok),
        (5, 2)
    );
    assert!(rs.sim.refresh_tokens_issued().is_empty());
}
