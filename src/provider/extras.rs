//! What the proxy does with a connection's extras (SPEC 11), as each
//! preset declares it ([`super::presets::ExtraUse`]): an upstream base URL of the
//! connection's own (Salesforce `instance_url`, Zoho `api_domain`), or a
//! header the API requires (Xero `xero-tenant-id`).
//!
//! Pure: a function of the provider's configuration, the stored extras and
//! the caller's headers. An extra is a provider's word, and the proxy sends
//! the access token where it points, so a base URL is used only when it is
//! an absolute `https` URL on the default port whose host is one of the
//! preset's domains (or below one), without credentials, query or
//! fragment; or, when the token endpoint or `api_base_url` is itself on a
//! loopback host (a simulator), an `http` or `https` URL on a loopback host. Anything else
//! falls back to `api_base_url`.

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use url::Url;

use super::presets::ExtraUse;
use crate::config::ProviderConfig;
use crate::store::Extras;

/// Where and with what a proxied request goes for one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// The connection's base URL, or the provider's `api_base_url`.
    pub base: Option<Url>,
    /// Headers to add (never replacing one the caller sent).
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

/// The connection's upstream, or a sentence saying what the caller must
/// add (a Xero connection with several tenants and no tenant header).
pub fn upstream(
    config: &ProviderConfig,
    extra: &Extras,
    incoming: &HeaderMap,
) -> Result<Upstream, String> {
    Ok(Upstream {
        base: base(config, extra),
        headers: headers(config, extra, incoming)?,
    })
}

/// Whether some extra of this provider's preset may name the base URL: if
/// not, every connection's base is `api_base_url` and [`base`] need not
/// be asked per connection.
pub fn has_own_base(config: &ProviderConfig) -> bool {
    config
        .preset
        .spec()
        .extras
        .iter()
        .any(|e| matches!(e.used_as, ExtraUse::ApiBaseUrl(_)))
}

/// The connection's base URL (checked as the module doc says), or the
/// provider's `api_base_url`. A function of the configuration and the
/// stored extras only, so it can be kept as long as both are unchanged.
pub fn base(config: &ProviderConfig, extra: &Extras) -> Option<Url> {
    let mut base = config.api_base_url.clone();
    for e in config.preset.spec().extras {
        let ExtraUse::ApiBaseUrl(domains) = e.used_as else {
            continue;
        };
        let Some(value) = extra.get(e.key) else {
            continue;
        };
        let local =
            is_loopback(&config.token_url) || config.api_base_url.as_ref().is_some_and(is_loopback);
        if let Some(url) = value.as_str().and_then(|t| base_url(t, domains, local)) {
            base = Some(url);
        }
    }
    base
}

/// Headers the connection's API requires that the caller did not send, or
/// a sentence saying what the caller must add.
pub fn headers(
    config: &ProviderConfig,
    extra: &Extras,
    incoming: &HeaderMap,
) -> Result<Vec<(HeaderName, HeaderValue)>, String> {
    let mut out = Vec::new();
    for e in config.preset.spec().extras {
        let ExtraUse::HeaderWhenOne(name) = e.used_as else {
            continue;
        };
        let Some(value) = extra.get(e.key) else {
            continue;
        };
        let Ok(header) = HeaderName::from_bytes(name.as_bytes()) else {
            continue;
        };
        if incoming.contains_key(&header) {
            continue;
        }
        let ids = list_ids(value);
        match ids.as_slice() {
            [] => {}
            [one] => {
                if let Ok(v) = HeaderValue::from_str(one) {
                    out.push((header, v));
                }
            }
            several => {
                return Err(format!(
                    "this connection has {} {} ({}); send the {name} header with the one this request is for",
                    several.len(),
                    e.key,
                    several.join(", ")
                ))
            }
        }
    }
    Ok(out)
}

/// The `id` of each entry of a stored list (see
/// [`presets::ExtraSource::ApiList`]).
fn list_ids(value: &serde_json::Value) -> Vec<String> {
    value
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|i| i.get("id")?.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// An extra usable as a base URL (see the module doc): on one of
/// `domains`, or on a loopback host when `local`.
fn base_url(text: &str, domains: &[&str], local: bool) -> Option<Url> {
    let url = Url::parse(text).ok()?;
    let plain = url.username().is_empty()
        && url.password().is_none()
        && url.query().is_none()
        && url.fragment().is_none();
    if !plain {
        return None;
    }
    if local && is_loopback(&url) && matches!(url.scheme(), "http" | "https") {
        return Some(url);
    }
    let host = match url.host() {
        Some(url::Host::Domain(d)) => d.trim_end_matches('.').to_ascii_lowercase(),
        _ => return None,
    };
    let allowed = domains
        .iter()
        .any(|d| host == *d || host.strip_suffix(d).is_some_and(|rest| rest.ends_with('.')));
    (url.scheme() == "https" && url.port().is_none() && allowed).then_some(url)
}

fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(a)) => a.is_loopback(),
        Some(url::Host::Ipv6(a)) => a.is_loopback(),
        Some(url::Host::Domain(d)) => d == "localhost",
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_presets_domains_become_a_base() {
        const SF: &[&str] = &["salesforce.com", "force.com"];
        let ok = |t: &str| base_url(t, SF, false).is_some();
        assert!(ok("https://na1.my.salesforce.com"));
        assert!(ok("https://acme.my.salesforce.com./"));
        assert!(ok("https://ACME.lightning.FORCE.com"));
        assert!(ok("https://salesforce.com/services"));
        // Another host, a look-alike, a port, an address, plain http.
        assert!(!ok("https://evil.example"));
        assert!(!ok("https://evilsalesforce.com"));
        assert!(!ok("https://salesforce.com.evil.example"));
        assert!(!ok("https://na1.salesforce.com:8443"));
        assert!(!ok("https://10.0.0.5"));
        assert!(!ok("http://na1.salesforce.com"));
        assert!(!ok("http://127.0.0.1:2375"));
        assert!(!ok("https://u:p@na1.salesforce.com"));
        assert!(!ok("https://na1.salesforce.com/?x=1"));
        assert!(!ok("javascript:alert(1)"));
        assert!(!ok("www.zohoapis.eu"));
        // Loopback only when the configured base is loopback (a simulator).
        assert!(base_url("http://127.0.0.1:8080/sim", SF, true).is_some());
        assert!(base_url("http://localhost:8080", SF, true).is_some());
        assert!(base_url("http://10.0.0.5:8080", SF, true).is_none());
    }

    #[test]
    fn one_tenant_is_sent_and_several_need_the_caller() {
        let one = serde_json::json!([{"id": "t1", "name": "A"}]);
        assert_eq!(list_ids(&one), vec!["t1"]);
        let two = serde_json::json!([{"id": "t1"}, {"id": "t2"}, {"name": "no id"}]);
        assert_eq!(list_ids(&two), vec!["t1", "t2"]);
        assert!(list_ids(&serde_json::json!("t1")).is_empty());
    }
}
