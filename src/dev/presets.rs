//! The simulator behaving like each preset's provider, where it matters to
//! the lifecycle: rotation, what earns a refresh token, client
//! authentication, scope syntax, how long a refresh token lives (rolling
//! or capped), and what the answers carry beside the tokens. Endpoints stay the simulator's own; everything else the daemon
//! does for the preset is exercised as it would be against the real one.

use super::*;

use crate::config::Preset;

/// What an authorization request must carry for its code to be exchanged
/// for a refresh token.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Offline {
    /// Every code earns one (Keap, Intuit).
    #[default]
    Always,
    /// Only with this authorization parameter (Google, Zoho:
    /// `access_type=offline`); without it the answer has no refresh token.
    Param(&'static str, &'static str),
    /// Only when this scope was requested (Microsoft and Xero:
    /// `offline_access`; Salesforce: `refresh_token`).
    Scope(&'static str),
}

/// Provider behaviour beyond Keap's; the default is Keap's, except that
/// refresh tokens never die of age (`SimulatorConfig::like(Preset::Keap)`
/// adds Keap's 45 idle days).
#[derive(Clone, Debug, PartialEq)]
pub struct Quirks {
    /// A refresh returns a new refresh token but the used one keeps working
    /// (Microsoft, Intuit). Only with `rotate_refresh_tokens`.
    pub keep_used_refresh_tokens: bool,
    pub offline: Offline,
    /// The code exchange too must use HTTP Basic (Xero, Intuit).
    pub require_basic_on_code: bool,
    /// HTTP Basic is refused at the token endpoint: credentials go in the
    /// body (Zoho).
    pub refuse_basic: bool,
    /// How the authorization request must join scopes (Zoho: `','`; a
    /// space in its scope is refused).
    pub scope_delimiter: char,
    /// Members added to every successful token answer (Salesforce
    /// `instance_url`, Zoho `api_domain`, Intuit `x_refresh_token_expires_in`,
    /// `refresh_token_expires_in`). In a string value, `{sim}` stands for
    /// the simulator's own base URL (its issuer), so an extra naming an API
    /// host can name the simulator's.
    pub token_extras: Vec<(String, serde_json::Value)>,
    /// Query parameters added to the redirect back (Intuit `realmId`, Zoho
    /// `location` and `accounts-server`).
    pub callback_extras: Vec<(String, String)>,
    /// Token answers carry no `expires_in` (Salesforce).
    pub omit_expires_in: bool,
    /// A refresh token dies this long after it was issued or last
    /// redeemed (a rolling lifetime: Keap 45 days, Xero 60, Intuit 100).
    /// `None`: never for being idle.
    pub refresh_token_idle: Option<Duration>,
    /// Every refresh token of a grant dies this long after the
    /// authorization, used or not (a hard cap: Intuit's five years).
    pub refresh_token_max: Option<Duration>,
    /// The organisations a grant may act for, as `(tenantId, tenantName)`,
    /// listed by `GET /api/connections` like Xero's
    /// `https://api.xero.com/connections`; empty: no such endpoint (404).
    pub tenants: Vec<(String, String)>,
}

impl Default for Quirks {
    fn default() -> Self {
        Quirks {
            keep_used_refresh_tokens: false,
            offline: Offline::Always,
            require_basic_on_code: false,
            refuse_basic: false,
            scope_delimiter: ' ',
            token_extras: Vec::new(),
            callback_extras: Vec::new(),
            omit_expires_in: false,
            refresh_token_idle: None,
            refresh_token_max: None,
            tenants: Vec::new(),
        }
    }
}

impl SimulatorConfig {
    /// A simulator that behaves like `preset`'s provider in what matters
    /// to the lifecycle (see the module doc); Keap's for `keap` and
    /// `generic`.
    pub fn like(preset: Preset) -> SimulatorConfig {
        let keap = SimulatorConfig::default();
        let not_keap = SimulatorConfig {
            require_basic_on_refresh: false,
            refresh_error_style: RefreshErrorStyle::InvalidGrant,
            ..keap.clone()
        };
        let extra = |k: &str, v: serde_json::Value| (k.to_string(), v);
        let days = |n: u64| Some(Duration::from_secs(n * 86_400));
        match preset {
            Preset::Keap => SimulatorConfig {
                quirks: Quirks {
                    refresh_token_idle: days(45),
                    ..Quirks::default()
                },
                ..keap
            },
            Preset::Generic => keap,
            Preset::Google => SimulatorConfig {
                rotate_refresh_tokens: false,
                revoke_old_access_on_refresh: false,
                quirks: Quirks {
                    offline: Offline::Param("access_type", "offline"),
                    refresh_token_idle: days(182),
                    ..Quirks::default()
                },
                ..not_keap
            },
            Preset::Microsoft => SimulatorConfig {
                revoke_old_access_on_refresh: false,
                quirks: Quirks {
                    keep_used_refresh_tokens: true,
                    offline: Offline::Scope("offline_access"),
                    refresh_token_idle: days(90),
                    ..Quirks::default()
                },
                ..not_keap
            },
            Preset::Xero => SimulatorConfig {
                require_basic_on_refresh: true,
                quirks: Quirks {
                    offline: Offline::Scope("offline_access"),
                    require_basic_on_code: true,
                    refresh_token_idle: days(60),
                    tenants: vec![(
                        "45e4708e-d862-4111-ab3a-dd8cd03913e1".into(),
                        "Demo Company (Global)".into(),
                    )],
                    ..Quirks::default()
                },
                ..not_keap
            },
            Preset::Intuit => SimulatorConfig {
                require_basic_on_refresh: true,
                quirks: Quirks {
                    keep_used_refresh_tokens: true,
                    require_basic_on_code: true,
                    token_extras: vec![extra(
                        "x_refresh_token_expires_in",
                        serde_json::json!(8_640_000),
                    )],
                    callback_extras: vec![("realmId".into(), "9130350000000000".into())],
                    refresh_token_idle: days(100),
                    refresh_token_max: days(5 * 365),
                    ..Quirks::default()
                },
                ..not_keap
            },
            Preset::Zoho => SimulatorConfig {
                rotate_refresh_tokens: false,
                revoke_old_access_on_refresh: false,
                quirks: Quirks {
                    offline: Offline::Param("access_type", "offline"),
                    refuse_basic: true,
                    scope_delimiter: ',',
                    // Zoho names its API host here; the simulator names
                    // its own API, so the proxy's use of it is observable.
                    token_extras: vec![extra("api_domain", serde_json::json!("{sim}/api"))],
                    callback_extras: vec![
                        ("location".into(), "us".into()),
                        ("accounts-server".into(), "https://accounts.zoho.com".into()),
                    ],
                    ..Quirks::default()
                },
                ..not_keap
            },
            Preset::Salesforce => SimulatorConfig {
                rotate_refresh_tokens: false,
                revoke_old_access_on_refresh: false,
                quirks: Quirks {
                    offline: Offline::Scope("refresh_token"),
                    omit_expires_in: true,
                    token_extras: vec![
                        // The org's host at Salesforce; the simulator's API here.
                        extra("instance_url", serde_json::json!("{sim}/api")),
                        extra("issued_at", serde_json::json!("1700000000000")),
                    ],
                    ..Quirks::default()
                },
                ..not_keap
            },
        }
    }
}

impl Offline {
    /// Whether an authorization request with `params` earns a refresh token.
    pub(super) fn earned(&self, params: &Params, delimiter: char) -> bool {
        match self {
            Offline::Always => true,
            Offline::Param(k, v) => param(params, k) == Some(*v),
            Offline::Scope(scope) => param(params, "scope")
                .is_some_and(|s| s.split(delimiter).any(|x| x.trim() == *scope)),
        }
    }
}
