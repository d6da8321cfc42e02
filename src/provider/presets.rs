//! Built-in provider descriptions (`preset = "..."`): what each provider's
//! own documentation says about its endpoints, scopes, offline-access
//! parameters, client authentication, refresh-token rotation and lifetime,
//! and rate limits.
//!
//! This module is data plus the two small functions that turn a preset and
//! its parameter (`tenant`, `region`) into concrete values; `config` applies
//! them, letting every key the file sets win. It holds no state, makes no
//! request and knows nothing of the simulator. Each entry cites the pages
//! it follows; when a provider changes, fix the entry and its citation
//! together.

use std::time::Duration;

use crate::config::{ClientAuth, Limits};

/// Built-in provider descriptions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Preset {
    Keap,
    Generic,
    Google,
    Microsoft,
    Xero,
    Intuit,
    Zoho,
    Salesforce,
}

/// What happens to a refresh token when it is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rotation {
    /// Every refresh returns a new refresh token and the used one dies
    /// (possibly after a short grace period): losing an answer loses the
    /// grant, so the new one must be stored before anything else.
    SingleUse,
    /// Every refresh may return a new refresh token, but the used one keeps
    /// working until its own end: the newest is kept, the old is no loss.
    Reissued,
    /// Refreshes return no refresh token: the one from the authorization
    /// is kept for the life of the grant.
    Never,
}

/// How long a refresh token lives (SPEC 11): the preset's value, which
/// the file's `refresh_token_lifetime` / `refresh_token_max_lifetime`
/// replace and a lifetime stated in a token answer overrides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefreshTokenLifetime {
    /// Dies after this long without use; each refresh restarts the clock
    /// (a rolling lifetime, kept alive by refreshing in time).
    pub idle: Option<Duration>,
    /// Dies this long after the authorization whatever happens (a hard
    /// cap that only a new authorization pushes back).
    pub max: Option<Duration>,
}

/// The preset's parameter: a config key whose value is substituted into
/// the endpoint templates.
#[derive(Debug, Clone, Copy)]
pub struct Parameter {
    /// The config key (`tenant`, `region`).
    pub key: &'static str,
    /// Used when the key is absent.
    pub default: &'static str,
    /// The accepted values in words, for the error message.
    pub accepted: &'static str,
    /// Turns a value into the `{placeholder}` substitutions, or says why
    /// it is not accepted.
    pub resolve: fn(&str) -> Option<Substitutions>,
}

/// `{placeholder}` → value pairs for an endpoint template.
pub type Substitutions = Vec<(&'static str, String)>;

/// One preset: every value a `[providers.NAME]` table may leave out.
#[derive(Debug, Clone, Copy)]
pub struct PresetSpec {
    pub preset: Preset,
    /// The value of `preset = "..."`.
    pub name: &'static str,
    /// The provider documentation these values follow.
    pub docs: &'static [&'static str],
    /// Endpoint templates; `{...}` placeholders are filled from `parameter`.
    pub authorization_url: Option<&'static str>,
    pub token_url: Option<&'static str>,
    pub revocation_url: Option<&'static str>,
    /// RFC 8628, where the provider offers it at a standard endpoint.
    pub device_authorization_url: Option<&'static str>,
    pub api_base_url: Option<&'static str>,
    /// Default scopes (used when the file sets no `scopes`).
    pub scopes: &'static [&'static str],
    /// Scopes without which the provider issues no refresh token: added
    /// to the file's `scopes` when missing (with a warning), since a grant
    /// that cannot be refreshed is never what the operator wants here.
    pub offline_scopes: &'static [&'static str],
    /// Authorization parameters without which the provider issues no
    /// refresh token (or none on a second authorization); a key the file's
    /// `extra_authorize_params` sets itself wins.
    pub offline_params: &'static [(&'static str, &'static str)],
    /// How scopes are joined in the authorization request (`" "` per RFC
    /// 6749; Zoho wants commas).
    pub scope_delimiter: &'static str,
    pub code_auth: ClientAuth,
    pub refresh_auth: ClientAuth,
    pub rotation: Rotation,
    pub refresh_token_lifetime: RefreshTokenLifetime,
    /// Access-token lifetime assumed when an answer has no `expires_in`.
    pub default_lifetime: Duration,
    /// Limits per OAuth client (all connections together).
    pub limits: Limits,
    /// Limits per connection (one tenant, organisation, company, realm).
    pub tenant_limits: Option<Limits>,
    /// Whether revoking a replaced grant's refresh token is safe (see
    /// `ProviderConfig::revoke_replaced`).
    pub revoke_replaced: bool,
    pub parameter: Option<Parameter>,
    /// What the provider returns beside the tokens that an API needs: kept
    /// per connection, returned under `"extra"` by `/v1/token`, and used
    /// by the proxy as each entry's [`ExtraUse`] says.
    pub extras: &'static [ExtraSpec],
}

/// One per-connection extra a preset declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtraSpec {
    /// Its key under `"extra"` (the provider's own name for it).
    pub key: &'static str,
    pub source: ExtraSource,
    pub used_as: ExtraUse,
}

/// Where an extra comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtraSource {
    /// A member of the token answer (of the code exchange, and of a
    /// refresh answer when it carries a new value).
    TokenAnswer,
    /// A query parameter of the redirect back to `/callback`.
    Callback,
    /// A list fetched once after the authorization with the new access
    /// token: `GET api_base_url + path`, a JSON array of objects, of which
    /// the member `id` is kept as `id` and `name` as `name`.
    ApiList {
        path: &'static str,
        id: &'static str,
        name: &'static str,
    },
}

/// What the proxy does with an extra.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtraUse {
    /// Nothing: it is for the caller (Intuit's `realmId` goes into API
    /// paths the caller writes).
    Caller,
    /// The connection's upstream base URL, instead of `api_base_url`, when
    /// its host is one of these domains or below one (an answer naming any
    /// other host would get the access token sent there).
    ApiBaseUrl(&'static [&'static str]),
    /// Sent as this header when the list has exactly one entry; with
    /// several, the caller chooses by sending the header itself.
    HeaderWhenOne(&'static str),
}

/// Intuit's company id: the callback's `realmId` query parameter.
const INTUIT_REALM: ExtraSpec = ExtraSpec {
    key: "realmId",
    source: ExtraSource::Callback,
    used_as: ExtraUse::Caller,
};

/// Xero's organisations: https://developer.xero.com/documentation/guides/oauth2/auth-flow
/// (step 5: `GET https://api.xero.com/connections` with the access token;
/// every API call names one with the `xero-tenant-id` header).
const XERO_TENANTS: ExtraSpec = ExtraSpec {
    key: "tenants",
    source: ExtraSource::ApiList {
        path: "/connections",
        id: "tenantId",
        name: "tenantName",
    },
    used_as: ExtraUse::HeaderWhenOne("xero-tenant-id"),
};

/// Zoho's API host of the user's data centre, in every token answer:
/// https://www.zoho.com/crm/developer/docs/api/v8/multi-dc.html
const ZOHO_API_DOMAIN: ExtraSpec = ExtraSpec {
    key: "api_domain",
    source: ExtraSource::TokenAnswer,
    used_as: ExtraUse::ApiBaseUrl(&[
        "zohoapis.com",
        "zohoapis.eu",
        "zohoapis.in",
        "zohoapis.com.au",
        "zohoapis.jp",
        "zohoapis.ca",
        "zohoapis.com.cn",
        "zohoapis.sa",
        "zohocloud.ca",
    ]),
};

/// Salesforce's org host, in every token answer (My Domain hosts end in
/// these domains).
const SALESFORCE_INSTANCE: ExtraSpec = ExtraSpec {
    key: "instance_url",
    source: ExtraSource::TokenAnswer,
    used_as: ExtraUse::ApiBaseUrl(&["salesforce.com", "force.com", "cloudforce.com"]),
};

const DAY: u64 = 86_400;
const HOUR: Duration = Duration::from_secs(3600);

const NO_LIMITS: Limits = Limits {
    per_second: None,
    per_minute: None,
    per_day: None,
};

const NO_LIFETIME: RefreshTokenLifetime = RefreshTokenLifetime {
    idle: None,
    max: None,
};

const fn idle_days(days: u64) -> RefreshTokenLifetime {
    RefreshTokenLifetime {
        idle: Some(Duration::from_secs(days * DAY)),
        max: None,
    }
}

/// Every preset, in the order the README lists them.
pub const PRESETS: &[PresetSpec] = &[
    // https://developer.infusionsoft.com/getting-started-oauth-keys
    // (endpoints, scope `full`, rotation by design of the refresh grant);
    // https://integration.keap.com/t/how-to-get-access-token/86529 (Keap
    // staff: access token 24 h, refresh token 45 days, a new one with each
    // refresh); limits: SPEC 3 and Keap's published 25/s, 1,500/min,
    // 150,000/day per client, 10,000/min and 250,000/day per tenant.
    PresetSpec {
        preset: Preset::Keap,
        name: "keap",
        docs: &[
            "https://developer.infusionsoft.com/getting-started-oauth-keys",
            "https://integration.keap.com/t/how-to-get-access-token/86529",
        ],
        authorization_url: Some("https://accounts.infusionsoft.com/app/oauth/authorize"),
        token_url: Some("https://api.infusionsoft.com/token"),
        revocation_url: None,
        device_authorization_url: None,
        api_base_url: Some("https://api.infusionsoft.com"),
        scopes: &["full"],
        offline_scopes: &[],
        offline_params: &[],
        scope_delimiter: " ",
        code_auth: ClientAuth::Body,
        refresh_auth: ClientAuth::Basic,
        rotation: Rotation::SingleUse,
        refresh_token_lifetime: idle_days(45),
        default_lifetime: HOUR,
        limits: Limits {
            per_second: Some(25),
            per_minute: Some(1500),
            per_day: Some(150_000),
        },
        tenant_limits: Some(Limits {
            per_second: None,
            per_minute: Some(10_000),
            per_day: Some(250_000),
        }),
        revoke_replaced: true,
        parameter: None,
        extras: &[],
    },
    PresetSpec {
        preset: Preset::Generic,
        name: "generic",
        docs: &[],
        authorization_url: None,
        token_url: None,
        revocation_url: None,
        device_authorization_url: None,
        api_base_url: None,
        scopes: &[],
        offline_scopes: &[],
        offline_params: &[],
        scope_delimiter: " ",
        code_auth: ClientAuth::Basic,
        refresh_auth: ClientAuth::Basic,
        rotation: Rotation::Reissued,
        refresh_token_lifetime: NO_LIFETIME,
        default_lifetime: HOUR,
        limits: NO_LIMITS,
        tenant_limits: None,
        revoke_replaced: true,
        parameter: None,
        extras: &[],
    },
    // https://developers.google.com/identity/protocols/oauth2/web-server
    // (endpoints; `access_type=offline` for a refresh token, `prompt=consent`
    // to get one again on a second authorization; refreshes return no new
    // refresh token; client_id and client_secret in the body);
    // https://developers.google.com/identity/protocols/oauth2
    // (a refresh token unused for six months stops working; seven days for
    // apps in "Testing"; revoking one token ends the whole grant, so a
    // replaced grant's token must not be revoked);
    // https://oauth2.googleapis.com/device/code per the limited-input
    // device guide. Rate limits are per API (quotas in the Cloud console).
    PresetSpec {
        preset: Preset::Google,
        name: "google",
        docs: &[
            "https://developers.google.com/identity/protocols/oauth2/web-server",
            "https://developers.google.com/identity/protocols/oauth2",
            "https://developers.google.com/identity/protocols/oauth2/limited-input-device",
        ],
        authorization_url: Some("https://accounts.google.com/o/oauth2/v2/auth"),
        token_url: Some("https://oauth2.googleapis.com/token"),
        revocation_url: Some("https://oauth2.googleapis.com/revoke"),
        device_authorization_url: Some("https://oauth2.googleapis.com/device/code"),
        api_base_url: Some("https://www.googleapis.com"),
        scopes: &["openid", "email"],
        offline_scopes: &[],
        offline_params: &[("access_type", "offline"), ("prompt", "consent")],
        scope_delimiter: " ",
        code_auth: ClientAuth::Body,
        refresh_auth: ClientAuth::Body,
        rotation: Rotation::Never,
        refresh_token_lifetime: idle_days(182),
        default_lifetime: HOUR,
        limits: NO_LIMITS,
        tenant_limits: None,
        revoke_replaced: false,
        parameter: None,
        extras: &[],
    },
    // https://learn.microsoft.com/en-us/entra/identity-platform/v2-oauth2-auth-code-flow
    // (endpoints under /{tenant}/oauth2/v2.0/, `offline_access` scope for a
    // refresh token, secret in the body);
    // https://learn.microsoft.com/en-us/entra/identity-platform/refresh-tokens
    // (90 days, 24 h for SPAs; each use returns a new refresh token and the
    // old one is not revoked);
    // https://learn.microsoft.com/en-us/entra/identity-platform/v2-oauth2-device-code
    // (/devicecode). No RFC 7009 endpoint. Graph throttling varies per
    // service, so no fixed limits.
    PresetSpec {
        preset: Preset::Microsoft,
        name: "microsoft",
        docs: &[
            "https://learn.microsoft.com/en-us/entra/identity-platform/v2-oauth2-auth-code-flow",
            "https://learn.microsoft.com/en-us/entra/identity-platform/refresh-tokens",
            "https://learn.microsoft.com/en-us/entra/identity-platform/v2-oauth2-device-code",
        ],
        authorization_url: Some("https://login.microsoftonline.com/{tenant}/oauth2/v2.0/authorize"),
        token_url: Some("https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token"),
        revocation_url: None,
        device_authorization_url: Some(
            "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/devicecode",
        ),
        api_base_url: Some("https://graph.microsoft.com"),
        scopes: &["offline_access", "openid", "User.Read"],
        offline_scopes: &["offline_access"],
        offline_params: &[],
        scope_delimiter: " ",
        code_auth: ClientAuth::Body,
        refresh_auth: ClientAuth::Body,
        rotation: Rotation::Reissued,
        refresh_token_lifetime: idle_days(90),
        default_lifetime: HOUR,
        limits: NO_LIMITS,
        tenant_limits: None,
        revoke_replaced: true,
        parameter: Some(Parameter {
            key: "tenant",
            default: "common",
            accepted: "\"common\", \"organizations\", \"consumers\", a tenant id (a GUID) or a tenant domain such as contoso.onmicrosoft.com",
            resolve: microsoft_tenant,
        }),
        extras: &[],
    },
    // https://community.xero.com/developer/discussion/105714701/
    // (Xero staff: HTTP Basic at the token endpoint, a new refresh token
    // with each refresh); endpoints and the `offline_access` scope as in
    // Xero's OpenID configuration (https://identity.xero.com); tenant ids
    // come from https://api.xero.com/connections (`xero-tenant-id`);
    // https://developer.xero.com/faq/oauth2 (access token 30 min; unused
    // refresh tokens expire after 60 days; each refresh returns a new one,
    // the old one usable for a 30-minute grace period);
    // https://developer.xero.com/documentation/oauth2/limits
    // (per tenant 60/min, 5,000/day, 5 concurrent; 10,000/min per app).
    PresetSpec {
        preset: Preset::Xero,
        name: "xero",
        docs: &[
            "https://community.xero.com/developer/discussion/105714701/",
            "https://developer.xero.com/faq/oauth2",
            "https://developer.xero.com/documentation/oauth2/limits",
        ],
        authorization_url: Some("https://login.xero.com/identity/connect/authorize"),
        token_url: Some("https://identity.xero.com/connect/token"),
        revocation_url: Some("https://identity.xero.com/connect/revocation"),
        device_authorization_url: None,
        api_base_url: Some("https://api.xero.com"),
        scopes: &["offline_access", "openid", "profile", "email"],
        offline_scopes: &["offline_access"],
        offline_params: &[],
        scope_delimiter: " ",
        code_auth: ClientAuth::Basic,
        refresh_auth: ClientAuth::Basic,
        rotation: Rotation::SingleUse,
        refresh_token_lifetime: idle_days(60),
        default_lifetime: Duration::from_secs(1800),
        limits: Limits {
            per_second: None,
            per_minute: Some(10_000),
            per_day: None,
        },
        tenant_limits: Some(Limits {
            per_second: None,
            per_minute: Some(60),
            per_day: Some(5000),
        }),
        revoke_replaced: true,
        parameter: None,
        extras: &[XERO_TENANTS],
    },
    // https://developer.intuit.com/app/developer/qbo/docs/develop/authentication-and-authorization/oauth-2.0
    // (flow, `realmId` on the callback);
    // https://developer.intuit.com/app/developer/qbo/docs/develop/authentication-and-authorization/oauth-openid-discovery-doc
    // (endpoints); .../authentication-and-authorization/faq (access token
    // 1 h, refresh token 100 days rolling, always use the latest one);
    // https://blogs.intuit.com/2025/11/12/important-changes-to-refresh-token-policy
    // (a five-year maximum); https://blogs.intuit.com/2016/08/08/idg-concurrent-api-use-changes-coming-soon
    // (500 requests per minute and 10 concurrent per realm). HTTP Basic at
    // the token endpoint, as in the discovery document.
    PresetSpec {
        preset: Preset::Intuit,
        name: "intuit",
        docs: &[
            "https://developer.intuit.com/app/developer/qbo/docs/develop/authentication-and-authorization/oauth-2.0",
            "https://developer.intuit.com/app/developer/qbo/docs/develop/authentication-and-authorization/oauth-openid-discovery-doc",
            "https://developer.intuit.com/app/developer/qbo/docs/develop/authentication-and-authorization/faq",
            "https://blogs.intuit.com/2025/11/12/important-changes-to-refresh-token-policy",
            "https://blogs.intuit.com/2016/08/08/idg-concurrent-api-use-changes-coming-soon",
        ],
        authorization_url: Some("https://appcenter.intuit.com/connect/oauth2"),
        token_url: Some("https://oauth.platform.intuit.com/oauth2/v1/tokens/bearer"),
        revocation_url: Some("https://developer.api.intuit.com/v2/oauth2/tokens/revoke"),
        device_authorization_url: None,
        api_base_url: Some("https://quickbooks.api.intuit.com"),
        scopes: &["com.intuit.quickbooks.accounting"],
        offline_scopes: &[],
        offline_params: &[],
        scope_delimiter: " ",
        code_auth: ClientAuth::Basic,
        refresh_auth: ClientAuth::Basic,
        rotation: Rotation::Reissued,
        refresh_token_lifetime: RefreshTokenLifetime {
            idle: Some(Duration::from_secs(100 * DAY)),
            max: Some(Duration::from_secs(5 * 365 * DAY)),
        },
        default_lifetime: HOUR,
        limits: NO_LIMITS,
        tenant_limits: Some(Limits {
            per_second: None,
            per_minute: Some(500),
            per_day: None,
        }),
        revoke_replaced: true,
        parameter: None,
        extras: &[INTUIT_REALM],
    },
    // https://www.zoho.com/accounts/protocol/oauth/web-apps/authorization.html
    // (`access_type=offline` for a refresh token, `prompt=consent` to get
    // one again; comma-separated scopes; credentials as parameters);
    // https://www.zoho.com/accounts/protocol/oauth/multi-dc.html (one
    // accounts server per data centre; `api_domain` in the token answer);
    // https://zoho.com/crm/developer/docs/api/v2/token-validity.html
    // (access token 1 h; refresh tokens do not expire until revoked and are
    // not rotated; at most 20 per client and user, the oldest deleted; 10
    // access tokens per refresh token in 10 minutes). API limits are credits
    // per product and edition, so none here.
    PresetSpec {
        preset: Preset::Zoho,
        name: "zoho",
        docs: &[
            "https://www.zoho.com/accounts/protocol/oauth/web-apps/authorization.html",
            "https://www.zoho.com/accounts/protocol/oauth/multi-dc.html",
            "https://zoho.com/crm/developer/docs/api/v2/token-validity.html",
        ],
        authorization_url: Some("https://{accounts}/oauth/v2/auth"),
        token_url: Some("https://{accounts}/oauth/v2/token"),
        revocation_url: Some("https://{accounts}/oauth/v2/token/revoke"),
        device_authorization_url: None,
        api_base_url: Some("https://{api}"),
        scopes: &["ZohoCRM.modules.ALL"],
        offline_scopes: &[],
        offline_params: &[("access_type", "offline"), ("prompt", "consent")],
        scope_delimiter: ",",
        code_auth: ClientAuth::Body,
        refresh_auth: ClientAuth::Body,
        rotation: Rotation::Never,
        refresh_token_lifetime: NO_LIFETIME,
        default_lifetime: HOUR,
        limits: NO_LIMITS,
        tenant_limits: None,
        revoke_replaced: true,
        parameter: Some(Parameter {
            key: "region",
            default: "us",
            accepted: "\"us\", \"eu\", \"in\", \"au\", \"jp\", \"ca\", \"cn\", \"sa\" or \"uk\"",
            resolve: zoho_region,
        }),
        extras: &[ZOHO_API_DOMAIN],
    },
    // https://help.salesforce.com/articleView?id=remoteaccess_oauth_web_server_flow.htm&type=0
    // (endpoints on login.salesforce.com, test.salesforce.com or the My
    // Domain; `refresh_token` scope for a refresh token; `instance_url` in
    // the answer; no `expires_in`: the session timeout decides, 15 min to
    // 24 h, default 2 h);
    // https://help.salesforce.com/apex/HTViewHelpDoc?id=remoteaccess_oauth_refresh_token_flow.htm&language=en_US
    // (no rotation unless enabled on the app; lifetime set by the app's
    // refresh token policy, default valid until revoked);
    // https://help.salesforce.com/s/articleView?id=xcloud.remoteaccess_revoke_token.htm&language=en_US&type=5.
    // API limits are per org and edition (24-hour allocations), so none here.
    PresetSpec {
        preset: Preset::Salesforce,
        name: "salesforce",
        docs: &[
            "https://help.salesforce.com/articleView?id=remoteaccess_oauth_web_server_flow.htm&type=0",
            "https://help.salesforce.com/apex/HTViewHelpDoc?id=remoteaccess_oauth_refresh_token_flow.htm&language=en_US",
            "https://help.salesforce.com/s/articleView?id=xcloud.remoteaccess_revoke_token.htm&language=en_US&type=5",
        ],
        authorization_url: Some("https://login.salesforce.com/services/oauth2/authorize"),
        token_url: Some("https://login.salesforce.com/services/oauth2/token"),
        revocation_url: Some("https://login.salesforce.com/services/oauth2/revoke"),
        device_authorization_url: None,
        // The org's own host: each connection's `instance_url` (below);
        // an api_base_url in the file is used when an answer has none.
        api_base_url: None,
        scopes: &["api", "refresh_token"],
        offline_scopes: &["refresh_token"],
        offline_params: &[],
        scope_delimiter: " ",
        code_auth: ClientAuth::Body,
        refresh_auth: ClientAuth::Body,
        rotation: Rotation::Never,
        refresh_token_lifetime: NO_LIFETIME,
        // The shortest session timeout an org can set: refreshing more
        // often than needed costs little, serving a dead token a 401.
        default_lifetime: Duration::from_secs(15 * 60),
        limits: NO_LIMITS,
        tenant_limits: None,
        revoke_replaced: true,
        parameter: None,
        extras: &[SALESFORCE_INSTANCE],
    },
];

impl Preset {
    /// The preset named `name` in a config file.
    pub fn from_name(name: &str) -> Option<Preset> {
        PRESETS.iter().find(|s| s.name == name).map(|s| s.preset)
    }

    /// Every accepted `preset = "..."` value, quoted, for messages.
    pub fn names() -> String {
        let quoted: Vec<String> = PRESETS.iter().map(|s| format!("\"{}\"", s.name)).collect();
        quoted.join(", ")
    }

    /// This preset's description.
    pub fn spec(self) -> &'static PresetSpec {
        PRESETS
            .iter()
            .find(|s| s.preset == self)
            .unwrap_or(&PRESETS[1])
    }

    /// Limits per OAuth client, as the provider publishes them.
    pub fn limits(self) -> Limits {
        self.spec().limits
    }

    /// Limits per tenant (one connection), where the provider has them.
    pub fn tenant_limits(self) -> Option<Limits> {
        self.spec().tenant_limits
    }
}

/// Endpoint URLs of a preset with its parameter substituted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Endpoints {
    pub authorization_url: Option<String>,
    pub token_url: Option<String>,
    pub revocation_url: Option<String>,
    pub device_authorization_url: Option<String>,
    pub api_base_url: Option<String>,
}

impl PresetSpec {
    /// The endpoints for parameter value `value` (the default when `None`);
    /// `Err` with the accepted values when the value is not one.
    pub fn endpoints(&self, value: Option<&str>) -> Result<Endpoints, String> {
        let subs = match &self.parameter {
            Some(p) => {
                let v = value.unwrap_or(p.default);
                (p.resolve)(v)
                    .ok_or_else(|| format!("\"{v}\" is not accepted; use {}", p.accepted))?
            }
            None => Vec::new(),
        };
        let fill = |t: Option<&'static str>| {
            t.map(|t| {
                subs.iter()
                    .fold(t.to_string(), |acc, (k, v)| acc.replace(k, v))
            })
        };
        Ok(Endpoints {
            authorization_url: fill(self.authorization_url),
            token_url: fill(self.token_url),
            revocation_url: fill(self.revocation_url),
            device_authorization_url: fill(self.device_authorization_url),
            api_base_url: fill(self.api_base_url),
        })
    }
}

/// Microsoft's `{tenant}`: the three special tenants, a GUID, or a domain
/// name (letters, digits and hyphens in dot-separated labels). Anything
/// else could change the URL's path or host.
fn microsoft_tenant(v: &str) -> Option<Substitutions> {
    let v = v.to_ascii_lowercase();
    let special = ["common", "organizations", "consumers"].contains(&v.as_str());
    let guid = v.len() == 36
        && v.char_indices().all(|(i, c)| {
            if [8, 13, 18, 23].contains(&i) {
                c == '-'
            } else {
                c.is_ascii_hexdigit()
            }
        });
    let domain = v.len() <= 253
        && v.contains('.')
        && v.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    (special || guid || domain).then(|| vec![("{tenant}", v)])
}

/// Zoho's data centres: the accounts server and the API host of each.
fn zoho_region(v: &str) -> Option<Substitutions> {
    let (accounts, api) = match v.to_ascii_lowercase().as_str() {
        "us" => ("accounts.zoho.com", "www.zohoapis.com"),
        "eu" => ("accounts.zoho.eu", "www.zohoapis.eu"),
        "in" => ("accounts.zoho.in", "www.zohoapis.in"),
        "au" => ("accounts.zoho.com.au", "www.zohoapis.com.au"),
        "jp" => ("accounts.zoho.jp", "www.zohoapis.jp"),
        "ca" => ("accounts.zohocloud.ca", "www.zohoapis.ca"),
        "cn" => ("accounts.zoho.com.cn", "www.zohoapis.com.cn"),
        "sa" => ("accounts.zoho.sa", "www.zohoapis.sa"),
        "uk" => ("accounts.zoho.uk", "www.zohoapis.uk"),
        _ => return None,
    };
    Some(vec![
        ("{accounts}", accounts.to_string()),
        ("{api}", api.to_string()),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn https(u: &Option<String>) -> bool {
        u.as_deref().is_none_or(|u| {
            url::Url::parse(u).is_ok_and(|p| {
                p.scheme() == "https" && p.query().is_none() && !u.contains(['{', '}'])
            })
        })
    }

    #[test]
    fn every_preset_is_complete_and_its_urls_valid() {
        for spec in PRESETS {
            assert_eq!(Preset::from_name(spec.name), Some(spec.preset));
            assert_eq!(spec.preset.spec().name, spec.name);
            let e = spec
                .endpoints(None)
                .expect("the default parameter is accepted");
            for u in [
                &e.authorization_url,
                &e.token_url,
                &e.revocation_url,
                &e.device_authorization_url,
                &e.api_base_url,
            ] {
                assert!(https(u), "{}: {u:?}", spec.name);
            }
            if spec.preset != Preset::Generic {
                assert!(e.authorization_url.is_some() && e.token_url.is_some());
                assert!(!spec.docs.is_empty(), "{} cites its docs", spec.name);
                assert!(!spec.scopes.is_empty(), "{} has scopes", spec.name);
                for s in spec.offline_scopes {
                    assert!(
                        spec.scopes.contains(s),
                        "{}: default scopes are offline",
                        spec.name
                    );
                }
            }
            for d in spec.docs {
                assert!(d.starts_with("https://"), "{d}");
            }
            assert!([" ", ","].contains(&spec.scope_delimiter));
        }
        assert_eq!(Preset::from_name("okta"), None);
        assert!(Preset::names().contains("\"salesforce\""));
    }

    #[test]
    fn microsoft_tenant_is_substituted_and_checked() {
        let ms = Preset::Microsoft.spec();
        assert_eq!(
            ms.endpoints(None).unwrap().token_url.as_deref(),
            Some("https://login.microsoftonline.com/common/oauth2/v2.0/token")
        );
        for ok in [
            "organizations",
            "consumers",
            "Contoso.onmicrosoft.com",
            "72f988bf-86f1-41af-91ab-2d7cd011db47",
        ] {
            let e = ms.endpoints(Some(ok)).unwrap();
            assert!(
                e.authorization_url.unwrap().contains(&format!(
                    "/{}/oauth2/v2.0/authorize",
                    ok.to_ascii_lowercase()
                )),
                "{ok}"
            );
        }
        for bad in [
            "",
            "evil.example/x",
            "a b",
            "common?x=1",
            "..",
            "contoso",
            "72f988bf-86f1-41af-91ab-2d7cd011db4",
            "host:8080.com",
            "x@y.com",
        ] {
            let err = ms.endpoints(Some(bad)).unwrap_err();
            assert!(
                err.contains("\"common\", \"organizations\""),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn zoho_region_picks_the_data_centre() {
        let z = Preset::Zoho.spec();
        let us = z.endpoints(None).unwrap();
        assert_eq!(
            us.token_url.as_deref(),
            Some("https://accounts.zoho.com/oauth/v2/token")
        );
        assert_eq!(us.api_base_url.as_deref(), Some("https://www.zohoapis.com"));
        let ca = z.endpoints(Some("ca")).unwrap();
        assert_eq!(
            ca.authorization_url.as_deref(),
            Some("https://accounts.zohocloud.ca/oauth/v2/auth")
        );
        assert_eq!(ca.api_base_url.as_deref(), Some("https://www.zohoapis.ca"));
        let eu = z.endpoints(Some("eu")).unwrap();
        assert_eq!(
            eu.revocation_url.as_deref(),
            Some("https://accounts.zoho.eu/oauth/v2/token/revoke")
        );
        assert_eq!(z.endpoints(Some("EU")).unwrap(), eu);
        for bad in ["de", "com", "", "eu/", "zoho.eu"] {
            let err = z.endpoints(Some(bad)).unwrap_err();
            assert!(err.contains("\"us\", \"eu\""), "{bad}: {err}");
        }
    }

    #[test]
    fn documented_quirks_are_recorded() {
        let g = Preset::Google.spec();
        assert!(g.offline_params.contains(&("access_type", "offline")));
        assert!(g.offline_params.contains(&("prompt", "consent")));
        assert_eq!(g.rotation, Rotation::Never);
        assert!(!g.revoke_replaced);
        assert_eq!(Preset::Microsoft.spec().offline_scopes, &["offline_access"]);
        assert_eq!(Preset::Xero.spec().offline_scopes, &["offline_access"]);
        let xero = Preset::Xero.spec().refresh_token_lifetime;
        assert_eq!(xero.idle, Some(Duration::from_secs(60 * DAY)));
        let intuit = Preset::Intuit.spec().refresh_token_lifetime;
        assert_eq!(intuit.idle, Some(Duration::from_secs(100 * DAY)));
        assert_eq!(intuit.max, Some(Duration::from_secs(5 * 365 * DAY)));
        let keap = Preset::Keap.spec();
        assert_eq!(
            keap.refresh_token_lifetime.idle,
            Some(Duration::from_secs(45 * DAY))
        );
        assert_eq!(keap.limits.per_second, Some(25));
        assert_eq!(Preset::Zoho.spec().scope_delimiter, ",");
        assert_eq!(
            Preset::Xero.spec().tenant_limits.unwrap().per_minute,
            Some(60)
        );
        assert_eq!(
            Preset::Intuit.spec().tenant_limits.unwrap().per_minute,
            Some(500)
        );
    }
}
