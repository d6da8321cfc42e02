//! Each preset end to end through the real daemon: the simulator behaves
//! like the preset's provider (rotation, what earns a refresh token, client
//! authentication, scope syntax, extras in its answers), the config keeps
//! the preset and overrides only its endpoints, and the daemon connects,
//! refreshes (twice, so a kept or reissued refresh token is proven to
//! work) and serves through `/v1/token` and the proxy.

mod common;

use common::{Harness, Options, CLIENT_SECRET};
use tokenkeeper::config::Preset;
use tokenkeeper::dev::SimulatorConfig;

/// A harness whose simulator behaves like `sim_like`, with one provider
/// `name` using `preset` and the simulator's endpoints; `extra` is
/// appended to its table.
async fn harness(sim_like: Preset, name: &str, preset: &str, extra: &str) -> Harness {
    let h = Harness::new(Options {
        sim: SimulatorConfig {
            client_secret: CLIENT_SECRET.into(),
            ..SimulatorConfig::like(sim_like)
        },
        ..Options::default()
    })
    .await;
    let sim = &h.sim.base_url;
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
api_base_url = "{sim}/api"
request_timeout = "5s"
{extra}"#
        ),
    );
    h
}

/// Connects, refreshes twice and serves; returns the three access tokens.
async fn lifecycle(h: &Harness, name: &str) -> [String; 3] {
    let page = h.authorize(name, "default").await;
    assert_eq!(page.status(), 200, "{name}: the callback succeeds");
    let body = page.text().await.unwrap();
    assert!(
        !body.contains("no refresh token"),
        "{name}: the preset's offline parameters earned a refresh token:\n{body}"
    );
    let (status, first) = h.get_json(&format!("/v1/token/{name}")).await;
    assert_eq!(status, 200, "{name}: {first}");
    let mut tokens = vec![first["access_token"].as_str().unwrap().to_string()];
    for _ in 0..2 {
        let (status, v) = h.post_json(&format!("/v1/token/{name}/refresh")).await;
        assert_eq!(status, 200, "{name}: a forced refresh works: {v}");
        tokens.push(v["access_token"].as_str().unwrap().to_string());
    }
    assert!(
        tokens[0] != tokens[1] && tokens[1] != tokens[2],
        "{name}: new tokens"
    );
    assert!(h.sim.sim.access_token_valid(&tokens[2]));
    let stats = h.sim.sim.stats();
    assert_eq!(stats.refresh_ok, 2, "{name}: {stats:?}");
    assert_eq!(stats.refresh_rejected, 0, "{name}: {stats:?}");
    assert_eq!(stats.refresh_reuse, 0, "{name}: {stats:?}");
    let r = h
        .http
        .get(h.url(&format!("/proxy/{name}/contacts?limit=1")))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        200,
        "{name}: the proxy serves with the fresh token"
    );
    [tokens[0].clone(), tokens[1].clone(), tokens[2].clone()]
}

#[tokio::test]
async fn google_preset_connects_refreshes_and_serves_against_a_google_like_provider() {
    let mut h = harness(Preset::Google, "google", "google", "").await;
    h.start().await;
    lifecycle(&h, "google").await;
    // Google never rotates: the one refresh token from the authorization
    // is the one every refresh used.
    assert_eq!(h.sim.sim.refresh_tokens_issued().len(), 1);
    assert!(h.sim.sim.current_refresh_token().is_some());
}

#[tokio::test]
async fn without_googles_offline_parameters_no_refresh_token_is_issued() {
    // The same provider configured as generic (no access_type=offline):
    // the simulator models Google's refusal to issue a refresh token.
    let mut h = harness(Preset::Google, "g", "generic", "code_auth = \"body\"").await;
    h.start().await;
    let page = h.authorize("g", "default").await;
    assert_eq!(page.status(), 200);
    let body = page.text().await.unwrap();
    assert!(body.contains("no refresh token"), "{body}");
    assert!(h.sim.sim.refresh_tokens_issued().is_empty());
}

#[tokio::test]
async fn microsoft_preset_adds_offline_access_and_keeps_the_newest_refresh_token() {
    // scopes without offline_access: the preset adds it, or the simulator
    // (like Microsoft) would issue no refresh token.
    let mut h = harness(
        Preset::Microsoft,
        "ms",
        "microsoft",
        "tenant = \"organizations\"\nscopes = [\"User.Read\"]",
    )
    .await;
    h.start().await;
    lifecycle(&h, "ms").await;
    assert!(
        h.log().contains("offline_access"),
        "the added scope is warned about"
    );
    // Reissued on every refresh, the daemon kept the newest.
    assert_eq!(h.sim.sim.refresh_tokens_issued().len(), 3);
}

#[tokio::test]
async fn xero_preset_uses_basic_for_code_and_refresh_and_survives_rotation() {
    let mut h = harness(Preset::Xero, "xero", "xero", "").await;
    h.start().await;
    lifecycle(&h, "xero").await;
    assert_eq!(h.sim.sim.refresh_tokens_issued().len(), 3);
    // A restart serves from storage and refreshes with the rotated token.
    h.stop().await;
    h.start().await;
    let (status, v) = h.post_json("/v1/token/xero/refresh").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(h.sim.sim.stats().refresh_reuse, 0);
}

#[tokio::test]
async fn intuit_preset_tolerates_realm_id_and_refresh_token_lifetime_in_answers() {
    let mut h = harness(Preset::Intuit, "qbo", "intuit", "").await;
    h.start().await;
    lifecycle(&h, "qbo").await;
}

#[tokio::test]
async fn zoho_preset_joins_scopes_with_commas_and_sends_credentials_in_the_body() {
    let mut h = harness(
        Preset::Zoho,
        "zoho",
        "zoho",
        "region = \"eu\"\nscopes = [\"ZohoCRM.modules.ALL\", \"ZohoCRM.settings.ALL\"]",
    )
    .await;
    h.start().await;
    lifecycle(&h, "zoho").await;
    assert_eq!(h.sim.sim.refresh_tokens_issued().len(), 1);
}

#[tokio::test]
async fn salesforce_preset_assumes_a_short_lifetime_when_the_answer_has_none() {
    let mut h = harness(Preset::Salesforce, "sf", "salesforce", "").await;
    h.start().await;
    lifecycle(&h, "sf").await;
    let (_, v) = h.get_json("/v1/token/sf").await;
    let left = v["expires_in"].as_u64().unwrap();
    assert!(
        (800..=900).contains(&left),
        "no expires_in: the preset's 15 minutes apply, got {left}"
    );
}
