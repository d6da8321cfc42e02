//! Per-connection extras (SPEC 11) through the real daemon: what each
//! provider returns beside the tokens (Salesforce `instance_url`, Zoho
//! `api_domain` in token answers, Intuit `realmId` on the callback, Xero's
//! tenants from its connections endpoint) is stored, returned under
//! `"extra"` by `/v1/token`, kept across a restart, and used by the proxy
//! as the connection's base URL or a required header.

mod common;

use common::{Harness, Options, CLIENT_SECRET};
use serde_json::Value;
use tokenkeeper::config::Preset;
use tokenkeeper::dev::SimulatorConfig;

/// A daemon whose simulator behaves like `like` (adjusted by `tweak`),
/// with one provider `name` using `preset` (`api_base` is its
/// `api_base_url`, `{sim}` standing for the simulator), started, with
/// `name/default` connected through the browser callback; returns it and
/// the connection's `/v1/token` answer.
async fn connected(
    like: Preset,
    tweak: impl FnOnce(&mut SimulatorConfig),
    (name, preset): (&str, &str),
    api_base: Option<&str>,
) -> (Harness, Value) {
    let mut sim = SimulatorConfig {
        client_secret: CLIENT_SECRET.into(),
        ..SimulatorConfig::like(like)
    };
    tweak(&mut sim);
    let mut h = Harness::new(Options {
        sim,
        ..Options::default()
    })
    .await;
    let sim = &h.sim.base_url;
    let api_base = api_base
        .map(|b| format!("api_base_url = \"{}\"", b.replace("{sim}", sim)))
        .unwrap_or_default();
    common::write_config_with_provider(
        &h,
        &format!(
            r#"[providers.{name}]
preset = "{preset}"
client_id = "demo-client"
client_secret_file = "client-secret"
authorization_url = "{sim}/authorize"
token_url = "{sim}/token"
revocation_url = "{sim}/revoke"
request_timeout = "5s"
{api_base}
"#
        ),
    );
    h.start().await;
    let page = h.authorize(name, "default").await;
    assert_eq!(page.status(), 200, "{name}: the callback succeeds");
    let (status, v) = h.get_json(&format!("/v1/token/{name}")).await;
    assert_eq!(status, 200, "{v}");
    (h, v)
}

/// `/proxy/{name}/headers`: the simulator's echo of what reached it.
async fn proxied_headers(h: &Harness, name: &str, header: Option<(&str, &str)>) -> (u16, Value) {
    let mut req = h.http.get(h.url(&format!("/proxy/{name}/headers")));
    if let Some((k, v)) = header {
        req = req.header(k, v);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn salesforce_instance_url_is_kept_returned_and_is_the_proxy_base() {
    // No api_base_url at all: only the connection's instance_url can say
    // where its API lives.
    let (mut h, v) = connected(Preset::Salesforce, |_| {}, ("sf", "salesforce"), None).await;
    let own_api = format!("{}/api", h.sim.base_url);
    assert_eq!(v["extra"]["instance_url"], own_api.as_str(), "{v}");
    let (status, echo) = proxied_headers(&h, "sf", None).await;
    assert_eq!(status, 200, "the proxy reaches the instance: {echo}");
    // Kept in storage: a restart still knows it, and a refresh keeps it.
    h.stop().await;
    h.start().await;
    let (status, v) = h.post_json("/v1/token/sf/refresh").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["extra"]["instance_url"], own_api.as_str(), "{v}");
    assert_eq!(proxied_headers(&h, "sf", None).await.0, 200);
}

#[tokio::test]
async fn zoho_api_domain_wins_over_the_configured_api_base_url() {
    // api_base_url points at nothing: the answer's api_domain is used.
    let (h, v) = connected(
        Preset::Zoho,
        |_| {},
        ("zoho", "zoho"),
        Some("http://127.0.0.1:9/nothing"),
    )
    .await;
    assert_eq!(
        v["extra"]["api_domain"],
        format!("{}/api", h.sim.base_url).as_str()
    );
    let (status, echo) = proxied_headers(&h, "zoho", None).await;
    assert_eq!(status, 200, "{echo}");
}

#[tokio::test]
async fn an_extra_that_is_no_safe_url_is_not_used_as_a_base() {
    // A provider answer naming a plain-http remote host is not followed.
    let (h, v) = connected(
        Preset::Salesforce,
        |s| {
            s.quirks.token_extras = vec![(
                "instance_url".into(),
                serde_json::json!("http://evil.example"),
            )]
        },
        ("sf", "salesforce"),
        Some("{sim}/api"),
    )
    .await;
    assert_eq!(v["extra"]["instance_url"], "http://evil.example");
    assert_eq!(proxied_headers(&h, "sf", None).await.0, 200);
}

#[tokio::test]
async fn intuit_realm_id_from_the_callback_is_returned_under_extra() {
    let (h, v) = connected(Preset::Intuit, |_| {}, ("qbo", "intuit"), Some("{sim}/api")).await;
    assert_eq!(v["extra"]["realmId"], "9130350000000000", "{v}");
    // A refresh answer without realmId keeps it.
    let (status, v) = h.post_json("/v1/token/qbo/refresh").await;
    assert_eq!(status, 200);
    assert_eq!(v["extra"]["realmId"], "9130350000000000", "{v}");
}

#[tokio::test]
async fn a_connection_without_extras_answers_without_an_extra_member() {
    let h = Harness::authorized(Options::default()).await;
    let (_, v) = h.token().await;
    assert!(v.get("extra").is_none(), "{v}");
    assert!(v["access_token"].is_string());
}

#[tokio::test]
async fn xero_single_tenant_is_fetched_and_sent_as_the_tenant_header() {
    let (h, v) = connected(Preset::Xero, |_| {}, ("xero", "xero"), Some("{sim}/api")).await;
    let tenant = "45e4708e-d862-4111-ab3a-dd8cd03913e1";
    assert_eq!(v["extra"]["tenants"][0]["id"], tenant, "{v}");
    assert_eq!(v["extra"]["tenants"][0]["name"], "Demo Company (Global)");
    let (status, echo) = proxied_headers(&h, "xero", None).await;
    assert_eq!(status, 200, "{echo}");
    assert_eq!(echo["headers"]["xero-tenant-id"], tenant, "{echo}");
    // The caller's own choice is passed through, never replaced.
    let (_, echo) = proxied_headers(&h, "xero", Some(("xero-tenant-id", "other"))).await;
    assert_eq!(echo["headers"]["xero-tenant-id"], "other", "{echo}");
}

#[tokio::test]
async fn xero_with_several_tenants_needs_the_caller_to_choose() {
    let (h, v) = connected(
        Preset::Xero,
        |s| {
            s.quirks.tenants = vec![
                ("t-one".into(), "One".into()),
                ("t-two".into(), "Two".into()),
            ]
        },
        ("xero", "xero"),
        Some("{sim}/api"),
    )
    .await;
    assert_eq!(
        v["extra"]["tenants"].as_array().map(Vec::len),
        Some(2),
        "{v}"
    );
    let (status, body) = proxied_headers(&h, "xero", None).await;
    assert_eq!(status, 400, "{body}");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("xero-tenant-id")
            && message.contains("t-one")
            && message.contains("t-two"),
        "{message}"
    );
    assert_eq!(
        h.sim.sim.stats().api_calls,
        1,
        "only the connections list was fetched"
    );
    let (status, echo) = proxied_headers(&h, "xero", Some(("Xero-Tenant-Id", "t-two"))).await;
    assert_eq!(status, 200, "{echo}");
    assert_eq!(echo["headers"]["xero-tenant-id"], "t-two");
}
