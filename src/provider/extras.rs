//! What the proxy does with a connection's extras (SPEC 11), as each
//! preset declares it ([`super::presets::ExtraUse`]): an upstream base URL of the
//! connection's own (Salesforce `instance_url`, Zoho `api_domain`), or a
//! header the API requires (Xero `xero-tenant-id`).
//!
//! Pure: a function of the provider's configuration, the stored extras and
//! the caller's headers. Must not trust an extra beyond its shape: a base
//! URL is used only when it is an absolute `https` URL (or `http` to a
//! loopback host, as simulators use) without credentials, query or
//! fragment; anything else falls back to `api_base_url`.

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
    let mut up = Upstream {
        base: config.api_base_url.clone(),
        headers: Vec::new(),
    };
    for e in config.preset.spec().extras {
        let Some(value) = extra.get(e.key) else {
            continue;
        };
        match e.used_as {
            ExtraUse::Caller => {}
            ExtraUse::ApiBaseUrl => {
                if let Some(url) = value.as_str().and_then(base_url) {
                    up.base = Some(url);
                }
            }
            ExtraUse::HeaderWhenOne(name) => {
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
                            up.headers.push((header, v));
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
        }
    }
    Ok(up)
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

/// An extra usable as a base URL (see the module doc).
fn base_url(text: &str) -> Option<Url> {
    let url = Url::parse(text).ok()?;
    let loopback = match url.host() {
        Some(url::Host::Ipv4(a)) => a.is_loopback(),
        Some(url::Host::Ipv6(a)) => a.is_loopback(),
        Some(url::Host::Domain(d)) => d == "localhost",
        None => false,
    };
    let scheme_ok = url.scheme() == "https" || (url.scheme() == "http" && loopback);
    (scheme_ok
        && url.has_host()
        && url.username().is_empty()
        && url.password().is_none()
        && url.query().is_none()
        && url.fragment().is_none())
    .then_some(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_https_or_loopback_urls_become_a_base() {
        assert!(base_url("https://na1.my.salesforce.com").is_some());
        assert!(base_url("http://127.0.0.1:8080/sim").is_some());
        assert!(base_url("http://evil.example").is_none());
        assert!(base_url("https://u:p@evil.example").is_none());
        assert!(base_url("https://a.example/?x=1").is_none());
        assert!(base_url("javascript:alert(1)").is_none());
        assert!(base_url("www.zohoapis.eu").is_none());
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
