//! Discovery (SPEC 11): a provider configured with `issuer` gets the
//! endpoints its file does not set from the issuer's authorization server
//! metadata: `ISSUER/.well-known/openid-configuration` (OpenID Connect
//! Discovery), else RFC 8414's `/.well-known/oauth-authorization-server`
//! inserted before the issuer's path.
//!
//! A fetched document is checked (a JSON object, naming exactly the
//! configured issuer, with the endpoints the file leaves to it, as http(s)
//! URLs, and https ones when the issuer is https) and kept in storage, so a
//! restart without network uses the last good one. Only when neither a
//! fetch nor storage has a usable document does start-up (or a reload)
//! fail, with a sentence naming the URLs tried and why each failed. This
//! module decides nothing about the lifecycle; it only fills
//! `ProviderConfig` before the engine sees it.

use std::time::Duration;

use chrono::Utc;
use url::Url;

use crate::config::{Config, ExplicitEndpoints, ProviderConfig};
use crate::store::{Store, StoreError};

/// Largest discovery document read. Real ones are a few KiB (Google's is
/// 2 KiB, Microsoft's 2 KiB, Keycloak's 6 KiB); anything this large is not
/// one, and must not fill the memory.
pub const MAX_DOCUMENT_BYTES: usize = 256 * 1024;

/// Why discovery left a provider without endpoints.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// No fetch succeeded and no earlier document is kept: the sentence
    /// names the provider's `issuer` key and every URL tried.
    #[error("providers.{provider}.issuer: {message}")]
    Unavailable { provider: String, message: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The endpoints a discovery document gives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metadata {
    pub authorization_endpoint: Option<Url>,
    pub token_endpoint: Option<Url>,
    pub revocation_endpoint: Option<Url>,
    pub device_authorization_endpoint: Option<Url>,
}

/// Where the metadata of `issuer` is looked for, in order: OpenID Connect
/// Discovery 1.0 section 4 (appended to the issuer's path), then RFC 8414
/// section 3 (inserted between host and path).
pub fn well_known_urls(issuer: &Url) -> [Url; 2] {
    let path = issuer.path().trim_end_matches('/');
    let mut oidc = issuer.clone();
    oidc.set_path(&format!("{path}/.well-known/openid-configuration"));
    let mut oauth = issuer.clone();
    oauth.set_path(&format!("/.well-known/oauth-authorization-server{path}"));
    [oidc, oauth]
}

/// Reads a discovery document fetched from `from` for `issuer`; `explicit`
/// says which endpoints the file sets itself (those may be absent).
/// `Err` is a sentence saying what is wrong with the document.
pub fn parse(
    issuer: &Url,
    from: &str,
    body: &[u8],
    explicit: ExplicitEndpoints,
) -> Result<Metadata, String> {
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|_| {
        format!("{from} did not answer a JSON document, so it is no discovery document; check the issuer URL")
    })?;
    let Some(doc) = value.as_object() else {
        return Err(format!(
            "{from} answered JSON that is not an object, so it is no discovery document"
        ));
    };
    // RFC 8414 section 3.3 and OpenID Connect Discovery section 4.3: the
    // document must name the issuer it was asked for, or it could point
    // the client secret and the grants at another server.
    let named = doc.get("issuer").and_then(|v| v.as_str()).unwrap_or("");
    if named.trim_end_matches('/') != issuer.as_str().trim_end_matches('/') {
        return Err(format!(
            "{from} names the issuer \"{}\", not {issuer}; its endpoints are not used (set issuer to exactly what the provider publishes)",
            clean(named)
        ));
    }
    let endpoint = |key: &str, required: bool| -> Result<Option<Url>, String> {
        let Some(v) = doc.get(key).filter(|v| !v.is_null()) else {
            return if required {
                Err(format!(
                    "{from} has no {key}; set {} in the provider's table, or check the issuer",
                    config_key(key)
                ))
            } else {
                Ok(None)
            };
        };
        let text = v.as_str().unwrap_or("");
        match Url::parse(text) {
            Ok(u) if issuer.scheme() == "https" && u.scheme() == "http" => Err(format!(
                "{from} gives {key} \"{}\", not an https URL, for an https issuer; refusing to send credentials there",
                clean(text)
            )),
            Ok(u) if u.scheme() == "https" || u.scheme() == "http" => Ok(Some(u)),
            _ => Err(format!(
                "{from} gives {key} {}, which is not an http(s) URL",
                if text.is_empty() {
                    "as something other than a string".to_string()
                } else {
                    format!("\"{}\"", clean(text))
                }
            )),
        }
    };
    Ok(Metadata {
        authorization_endpoint: endpoint("authorization_endpoint", !explicit.authorization_url)?,
        token_endpoint: endpoint("token_endpoint", !explicit.token_url)?,
        revocation_endpoint: endpoint("revocation_endpoint", false)?,
        device_authorization_endpoint: endpoint("device_authorization_endpoint", false)?,
    })
}

/// The config key standing in for a metadata member.
fn config_key(member: &str) -> &'static str {
    match member {
        "authorization_endpoint" => "authorization_url",
        "token_endpoint" => "token_url",
        "revocation_endpoint" => "revocation_url",
        _ => "device_authorization_url",
    }
}

/// A value from the document, made safe and short for a message.
fn clean(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).take(200).collect()
}

/// Fetches `url` within `timeout`, refusing redirects (the shared client
/// follows none), non-200 answers and bodies over [`MAX_DOCUMENT_BYTES`].
async fn fetch_document(
    http: &reqwest::Client,
    url: &Url,
    timeout: Duration,
) -> Result<Vec<u8>, String> {
    let sent = http
        .get(url.clone())
        .header(reqwest::header::ACCEPT, "application/json")
        .timeout(timeout)
        .send()
        .await;
    let mut resp = match sent {
        Ok(r) => r,
        Err(e) if e.is_timeout() => {
            return Err(format!(
                "{url} did not answer within {} s",
                timeout.as_secs()
            ))
        }
        Err(e) => return Err(format!("cannot reach {url} ({})", super::without_url(&e))),
    };
    let status = resp.status();
    if status != reqwest::StatusCode::OK {
        let why = if status.is_redirection() {
            " (a redirect, which is not followed)"
        } else {
            ""
        };
        return Err(format!("{url} answered HTTP {}{why}", status.as_u16()));
    }
    let mut body = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > MAX_DOCUMENT_BYTES {
                    return Err(format!(
                        "{url} answered more than {} KiB, which is no discovery document",
                        MAX_DOCUMENT_BYTES / 1024
                    ));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(e) if e.is_timeout() => {
                return Err(format!(
                    "{url} did not finish its answer within {} s",
                    timeout.as_secs()
                ))
            }
            Err(e) => {
                return Err(format!(
                    "{url} broke off its answer ({})",
                    super::without_url(&e)
                ))
            }
        }
    }
}

/// Fetches and checks the metadata of `p`'s issuer: the document's text
/// (to keep) and what it gives, or a sentence for every URL tried.
pub async fn fetch(
    http: &reqwest::Client,
    p: &ProviderConfig,
    issuer: &Url,
) -> Result<(String, Metadata), String> {
    let mut failures = Vec::new();
    for url in well_known_urls(issuer) {
        let checked = fetch_document(http, &url, p.request_timeout)
            .await
            .and_then(|body| {
                let meta = parse(issuer, url.as_str(), &body, p.explicit)?;
                // Valid JSON is valid UTF-8.
                Ok((String::from_utf8_lossy(&body).into_owned(), meta))
            });
        match checked {
            Ok(found) => return Ok(found),
            Err(e) => failures.push(e),
        }
    }
    Err(failures.join("; "))
}

/// Fills what `p`'s file does not set from `m` (explicit keys win;
/// discovered endpoints win over the preset's).
pub fn apply(p: &mut ProviderConfig, m: &Metadata) {
    if !p.explicit.authorization_url {
        if let Some(u) = &m.authorization_endpoint {
            p.authorization_url = u.clone();
        }
    }
    if !p.explicit.token_url {
        if let Some(u) = &m.token_endpoint {
            p.token_url = u.clone();
        }
    }
    if !p.explicit.revocation_url && m.revocation_endpoint.is_some() {
        p.revocation_url = m.revocation_endpoint.clone();
    }
    if !p.explicit.device_authorization_url && m.device_authorization_endpoint.is_some() {
        p.device_authorization_url = m.device_authorization_endpoint.clone();
    }
}

/// Resolves every provider with an `issuer` in `config`: fetches its
/// metadata and keeps it in `store`, or falls back to the document kept
/// there (with a warning); `Err` when a provider has neither. Called at
/// start, before the engine sees the providers, and on every reload.
pub async fn resolve(
    config: &mut Config,
    store: &Store,
    http: &reqwest::Client,
) -> Result<(), DiscoveryError> {
    // All issuers at once: one after the other, a few unreachable ones
    // (two URLs, each up to request_timeout) would keep the daemon from
    // starting past systemd's start timeout, even with kept documents.
    let fetched =
        futures_util::future::join_all(config.providers.iter().filter_map(|(name, p)| {
            let issuer = p.issuer.clone()?;
            Some(async move {
                let found = fetch(http, p, &issuer).await;
                (name.clone(), issuer, found)
            })
        }))
        .await;
    for (name, issuer, found) in fetched {
        let Some(p) = config.providers.get_mut(&name) else {
            continue;
        };
        let key = issuer.as_str();
        match found {
            Ok((text, meta)) => {
                apply(p, &meta);
                if let Err(e) = store.save_discovery(key, &text, Utc::now()).await {
                    // The endpoints are known; only a later offline start
                    // would miss them.
                    tracing::warn!(provider = %name, error = %e, "cannot keep the discovery document; a restart without network would not find the endpoints");
                }
                tracing::info!(
                    provider = %name,
                    issuer = %issuer,
                    token_url = %p.token_url,
                    "endpoints discovered"
                );
            }
            Err(fetch_error) => {
                let kept = store.load_discovery(key).await?;
                let usable = kept.and_then(|(text, at)| {
                    parse(&issuer, "the kept document", text.as_bytes(), p.explicit)
                        .ok()
                        .map(|m| (m, at))
                });
                let Some((meta, fetched_at)) = usable else {
                    if p.explicit.authorization_url && p.explicit.token_url {
                        // Only the optional endpoints were to come from it.
                        tracing::warn!(
                            provider = %name,
                            "discovery failed ({fetch_error}); using the configured endpoints without the revocation and device endpoints it might have given"
                        );
                        continue;
                    }
                    return Err(DiscoveryError::Unavailable {
                        provider: name.clone(),
                        message: format!(
                            "discovery from {issuer} failed and no earlier document is kept: {fetch_error}; check the issuer URL and that the provider is reachable, or set authorization_url and token_url"
                        ),
                    });
                };
                apply(p, &meta);
                tracing::warn!(
                    provider = %name,
                    fetched_at = %fetched_at.to_rfc3339(),
                    "discovery failed ({fetch_error}); using the document kept from the last successful fetch"
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    #[test]
    fn well_known_urls_follow_both_specifications() {
        let [oidc, oauth] = well_known_urls(&url("https://id.example"));
        assert_eq!(
            oidc.as_str(),
            "https://id.example/.well-known/openid-configuration"
        );
        assert_eq!(
            oauth.as_str(),
            "https://id.example/.well-known/oauth-authorization-server"
        );
        let [oidc, oauth] = well_known_urls(&url("https://id.example/realms/a/"));
        assert_eq!(
            oidc.as_str(),
            "https://id.example/realms/a/.well-known/openid-configuration"
        );
        assert_eq!(
            oauth.as_str(),
            "https://id.example/.well-known/oauth-authorization-server/realms/a"
        );
    }

    fn doc(issuer: &str, token: Option<&str>) -> Vec<u8> {
        let mut v = serde_json::json!({
            "issuer": issuer,
            "authorization_endpoint": "https://id.example/auth",
            "revocation_endpoint": "https://id.example/revoke",
        });
        if let Some(t) = token {
            v["token_endpoint"] = serde_json::json!(t);
        }
        serde_json::to_vec(&v).unwrap()
    }

    #[test]
    fn a_good_document_gives_its_endpoints() {
        let issuer = url("https://id.example/");
        let m = parse(
            &issuer,
            "u",
            &doc("https://id.example", Some("https://id.example/token")),
            ExplicitEndpoints::default(),
        )
        .unwrap();
        assert_eq!(
            m.token_endpoint.unwrap().as_str(),
            "https://id.example/token"
        );
        assert_eq!(
            m.revocation_endpoint.unwrap().as_str(),
            "https://id.example/revoke"
        );
        assert_eq!(m.device_authorization_endpoint, None);
    }

    #[test]
    fn garbage_documents_each_get_a_sentence() {
        let issuer = url("https://id.example");
        let none = ExplicitEndpoints::default();
        let err = |body: &[u8]| {
            parse(&issuer, "https://id.example/.well-known/x", body, none).unwrap_err()
        };
        assert!(err(b"<html>").contains("did not answer a JSON document"));
        assert!(err(b"[1,2]").contains("not an object"));
        assert!(err(b"").contains("JSON"));
        let e = err(&doc("https://id.example", None));
        assert!(
            e.contains("no token_endpoint") && e.contains("token_url"),
            "{e}"
        );
        let e = err(&doc("https://evil.example", Some("https://id.example/t")));
        assert!(
            e.contains("\"https://evil.example\"") && e.contains("not https://id.example"),
            "{e}"
        );
        let e = err(&doc("https://id.example", Some("http://id.example/t")));
        assert!(e.contains("not an https URL"), "{e}");
        let e = err(&doc("https://id.example", Some("javascript:alert(1)")));
        assert!(e.contains("not an http(s) URL"), "{e}");
        let e = err(br#"{"issuer":"https://id.example","authorization_endpoint":"https://a/","token_endpoint":5}"#);
        assert!(
            e.contains("token_endpoint") && e.contains("not an http(s) URL"),
            "{e}"
        );
        let e = err(br#"{"authorization_endpoint":"https://a/","token_endpoint":"https://a/t"}"#);
        assert!(e.contains("names the issuer \"\""), "{e}");
        // An endpoint set in the file may be missing from the document.
        let explicit = ExplicitEndpoints {
            token_url: true,
            ..none
        };
        assert!(parse(&issuer, "u", &doc("https://id.example", None), explicit).is_ok());
    }
}
