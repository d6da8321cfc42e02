//! Reading what a token endpoint answered: the lenient parser and the one
//! place that decides which failures are transient, which reject the grant
//! and which are the operator's configuration.
//!
//! Pure functions of the status, the body and the time the request left,
//! so they can be unit-tested and fuzzed (`fuzz/`) without a network.
//!
//! Lenient on purpose: by the time a 2xx answer arrives the provider has
//! usually rotated the refresh token already, so refusing an answer over a
//! detail (`expires_in` as a string, a missing `token_type`, JSON served as
//! `text/plain`, HTTP 201) kills the grant. What real providers send is
//! accepted; what cannot be used is reported, and a refresh token found in
//! any 2xx JSON object is handed back ([`ProviderError::Unusable`]) so the
//! caller stores it.
//!
//! Must not: log anything (the caller decides), or put a token or the raw
//! body into a message.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use secrecy::SecretString;
use serde_json::value::RawValue;

use super::{ProviderError, TokenGrant};

/// The longest access-token lifetime believed. Longer claims (a provider
/// bug, or `1e308`) are cut to this: a shorter lifetime only makes us
/// refresh earlier, never serve a dead token, and `keepalive` (30 d by
/// default) refreshes sooner anyway. One year is far beyond any provider's
/// access tokens (Keap 24 h, Google 1 h, Facebook's long-lived 60 d) and
/// keeps every date far from chrono's limits and inside RFC 3339's
/// four-digit years.
pub const MAX_LIFETIME: Duration = Duration::from_secs(366 * 24 * 3600);

/// Lifetimes shorter than this are treated like a missing `expires_in`
/// (the provider's `default_lifetime`). `0` is how some providers say "no
/// expiry stated"; anything under a second is gone before a caller could
/// use it, and honouring it would make every token request refresh (the
/// token is expired on arrival). One second and up is honoured: tests and
/// some providers really issue tokens that live a few seconds, and serving
/// a token longer than the provider said hands out dead tokens.
pub const MIN_LIFETIME: Duration = Duration::from_secs(1);

/// Longest provider-supplied text (an `error_description`) kept in a
/// message; the rest is cut so a hostile answer cannot flood logs.
const MAX_DESCRIPTION_CHARS: usize = 200;

/// What a token answer is read against.
#[derive(Debug, Clone, Copy)]
pub struct AnswerContext<'a> {
    /// `[providers.NAME]`, named in messages that say what to fix.
    pub provider: &'a str,
    /// When the request left: lifetimes count from here.
    pub sent_at: DateTime<Utc>,
    /// Used when the answer states no usable lifetime.
    pub default_lifetime: Duration,
}

/// A lifetime as the answer stated it, before defaults and caps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StatedLifetime {
    /// No `expires_in`, `null`, or a value that is not a number.
    Missing,
    /// A number of seconds (possibly negative, fractional or infinite).
    Seconds(f64),
}

/// Reads a token endpoint's answer: `Ok` with a usable grant, or the
/// classified failure (SPEC 7). `retry_after` is the parsed `Retry-After`
/// header. Never panics, whatever the bytes.
pub fn interpret(
    ctx: &AnswerContext<'_>,
    status: u16,
    retry_after: Option<Duration>,
    body: &[u8],
) -> Result<TokenGrant, ProviderError> {
    let fields = object(body);
    if (200..300).contains(&status) {
        let Some(fields) = fields else {
            return Err(transient(
                format!("the token endpoint answered HTTP {status} with a body that is not a JSON object"),
                None,
            ));
        };
        return success(ctx, status, &fields);
    }
    let oauth = fields.as_ref().and_then(OAuthError::from_fields);
    match status {
        429 => Err(transient(
            format!("the provider is rate limiting (HTTP {status})"),
            retry_after,
        )),
        500..=599 => Err(transient(
            format!("the provider failed (HTTP {status})"),
            retry_after,
        )),
        408 => Err(transient(
            "the token endpoint timed out reading the request (HTTP 408)".into(),
            retry_after,
        )),
        400..=499 => Err(match oauth {
            Some(e) => e.classify(ctx.provider, status),
            None => ProviderError::Refused {
                message: format!(
                    "the token endpoint answered HTTP {status} without an OAuth error: check token_url and the client credentials of [providers.{}], then reload",
                    ctx.provider
                ),
            },
        }),
        300..=399 => Err(ProviderError::Refused {
            message: format!(
                "the token endpoint redirected (HTTP {status}), which token endpoints never do: check token_url of [providers.{}] (http instead of https?), then reload",
                ctx.provider
            ),
        }),
        _ => Err(transient(
            format!("the token endpoint answered an unexpected HTTP {status}"),
            retry_after,
        )),
    }
}

/// The top-level members of a JSON object, each kept as raw JSON text so
/// one odd value (`1e400` overflows serde_json's numbers) cannot make the
/// whole answer unreadable and lose the refresh token in it.
pub(super) fn object(body: &[u8]) -> Option<HashMap<String, Box<RawValue>>> {
    // A UTF-8 byte-order mark is not JSON, but some servers send one.
    let body = body.strip_prefix(b"\xef\xbb\xbf").unwrap_or(body);
    serde_json::from_slice(body).ok()
}

/// A member as a string, if it is one.
pub(super) fn string(fields: &HashMap<String, Box<RawValue>>, name: &str) -> Option<String> {
    fields
        .get(name)
        .and_then(|v| serde_json::from_str::<String>(v.get()).ok())
}

/// `expires_in` as a number of seconds, whether sent as a JSON number or a
/// numeric string (`"3600"`, `" 3600.5 "`).
pub fn stated_lifetime(raw: Option<&str>) -> StatedLifetime {
    let Some(raw) = raw else {
        return StatedLifetime::Missing;
    };
    let text = match serde_json::from_str::<String>(raw) {
        Ok(s) => s,
        Err(_) => raw.to_string(),
    };
    let text = text.trim();
    // JSON numbers are a subset of what `f64::from_str` reads; huge ones
    // become infinity instead of an error. "inf"/"NaN" are words, not
    // numbers, in JSON: treated as missing.
    let numeric = !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'-' | b'+' | b'.' | b'e' | b'E'));
    match text.parse::<f64>() {
        Ok(v) if numeric && !v.is_nan() => StatedLifetime::Seconds(v),
        _ => StatedLifetime::Missing,
    }
}

/// The lifetime to count with: the stated one, or `default` when missing,
/// under [`MIN_LIFETIME`], or not a number; never above [`MAX_LIFETIME`].
pub fn effective_lifetime(stated: StatedLifetime, default: Duration) -> Duration {
    let lifetime = match stated {
        StatedLifetime::Seconds(s) if s >= MIN_LIFETIME.as_secs_f64() => {
            if s >= MAX_LIFETIME.as_secs_f64() {
                MAX_LIFETIME
            } else {
                // Millisecond precision: what the store keeps.
                Duration::from_millis((s * 1000.0) as u64)
            }
        }
        _ => default,
    };
    lifetime.min(MAX_LIFETIME)
}

/// The token type as callers should send it: case-normalized for the
/// registered types ("bearer" is "Bearer"), other types as sent. Missing
/// means Bearer (RFC 6749 makes it required; providers omit it); a value
/// that could not stand in an `Authorization` header is taken for Bearer.
pub fn normalize_token_type(raw: Option<&str>) -> String {
    let Some(t) = raw.map(str::trim).filter(|t| !t.is_empty()) else {
        return "Bearer".into();
    };
    const KNOWN: [&str; 4] = ["Bearer", "DPoP", "MAC", "N_A"];
    if let Some(k) = KNOWN.iter().find(|k| k.eq_ignore_ascii_case(t)) {
        return (*k).to_string();
    }
    // RFC 9110 token characters: what an auth scheme may be made of.
    let tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if t.len() <= 64 && t.bytes().all(tchar) {
        t.to_string()
    } else {
        "Bearer".into()
    }
}

/// RFC 6749 5.1 access tokens are visible ASCII; anything else cannot go
/// into an `Authorization` header and is no token we can hand out.
fn usable_access_token(t: &str) -> bool {
    !t.trim().is_empty() && t.bytes().all(|b| (0x20..=0x7e).contains(&b))
}

fn success(
    ctx: &AnswerContext<'_>,
    status: u16,
    fields: &HashMap<String, Box<RawValue>>,
) -> Result<TokenGrant, ProviderError> {
    let refresh_token = string(fields, "refresh_token").filter(|t| !t.is_empty());
    let access_token = string(fields, "access_token");
    let problem = match &access_token {
        Some(t) if usable_access_token(t) => None,
        Some(_) => Some(
            "an access_token that is empty or holds characters no HTTP header can carry"
                .to_string(),
        ),
        None if fields.contains_key("access_token") => {
            Some("an access_token that is not a string".to_string())
        }
        None => match OAuthError::from_fields(fields) {
            // A 200 carrying an OAuth error is an error like a 400's.
            Some(e) if refresh_token.is_none() => return Err(e.classify(ctx.provider, status)),
            Some(e) => Some(format!(
                "an OAuth error ({}) instead of an access_token",
                e.summary()
            )),
            None => Some("no access_token".to_string()),
        },
    };
    if let Some(problem) = problem {
        let message = format!("the token endpoint answered HTTP {status} with {problem}");
        return Err(match refresh_token {
            Some(t) => ProviderError::Unusable {
                message,
                refresh_token: SecretString::from(t),
            },
            None => transient(message, None),
        });
    }
    let lifetime = effective_lifetime(
        stated_lifetime(fields.get("expires_in").map(|v| v.get())),
        ctx.default_lifetime,
    );
    let scope = string(fields, "scope").or_else(|| {
        // Some providers send scopes as an array.
        let v: Vec<String> = serde_json::from_str(fields.get("scope")?.get()).ok()?;
        Some(v.join(" "))
    });
    // A refresh-token lifetime is a fact about the grant, not a default:
    // missing, zero or junk means "not stated" (the preset or config then
    // says), never "dies now".
    let refresh_token_expires_in = ["refresh_token_expires_in", "x_refresh_token_expires_in"]
        .iter()
        .find_map(|k| match stated_lifetime(fields.get(*k).map(|v| v.get())) {
            StatedLifetime::Seconds(s) if s >= 1.0 => {
                Some(if s >= MAX_REFRESH_TOKEN_LIFETIME.as_secs_f64() {
                    MAX_REFRESH_TOKEN_LIFETIME
                } else {
                    Duration::from_millis((s * 1000.0) as u64)
                })
            }
            _ => None,
        });
    Ok(TokenGrant {
        access_token: SecretString::from(access_token.unwrap_or_default()),
        refresh_token: refresh_token.map(SecretString::from),
        token_type: normalize_token_type(string(fields, "token_type").as_deref()),
        scope,
        issued_at: ctx.sent_at,
        expires_at: super::expiry(ctx.sent_at, lifetime),
        refresh_token_expires_in,
        extra: crate::store::Extras::new(),
    })
}

/// The longest refresh-token lifetime believed: ten years (Intuit's cap
/// is five). Keeps every computed end far inside chrono's range.
pub const MAX_REFRESH_TOKEN_LIFETIME: Duration = Duration::from_secs(3653 * 24 * 3600);

/// The members named `keys` of a token answer that are strings (or
/// numbers, kept as their text), for the connection's extras. Anything
/// else, or a body that is not a JSON object, yields nothing. Values are
/// cut like provider text in messages (`clean`), so a hostile answer
/// cannot fill the database through them.
pub fn extras(body: &[u8], keys: &[&str]) -> crate::store::Extras {
    let mut out = crate::store::Extras::new();
    if keys.is_empty() {
        return out;
    }
    let Some(fields) = object(body) else {
        return out;
    };
    for key in keys {
        let Some(raw) = fields.get(*key) else {
            continue;
        };
        let text = match serde_json::from_str::<serde_json::Value>(raw.get()) {
            Ok(serde_json::Value::String(s)) => s,
            Ok(serde_json::Value::Number(n)) => n.to_string(),
            _ => continue,
        };
        let text = clean(&text);
        if !text.is_empty() {
            out.insert((*key).to_string(), serde_json::Value::String(text));
        }
    }
    out
}

/// An RFC 6749 5.2 error answer.
struct OAuthError {
    code: String,
    description: Option<String>,
}

impl OAuthError {
    fn from_fields(fields: &HashMap<String, Box<RawValue>>) -> Option<OAuthError> {
        let code = string(fields, "error").filter(|c| !c.trim().is_empty())?;
        Some(OAuthError {
            code: clean(&code),
            description: string(fields, "error_description")
                .map(|d| clean(&d))
                .filter(|d| !d.is_empty()),
        })
    }

    fn summary(&self) -> String {
        match &self.description {
            Some(d) => format!("{}: {d}", self.code),
            None => self.code.clone(),
        }
    }

    /// Keap answers a dead refresh token with `invalid_request` and the
    /// description "Invalid Refresh Token" instead of `invalid_grant`.
    fn is_keap_dead_refresh_token(&self) -> bool {
        let d = self
            .description
            .as_deref()
            .unwrap_or_default()
            .to_ascii_lowercase();
        self.code == "invalid_request"
            && (d.contains("invalid refresh token")
                || (d.contains("refresh token")
                    && (d.contains("expired") || d.contains("revoked"))))
    }

    /// Only a rejected grant ends a grant (SPEC 7); every other refusal is
    /// the client's configuration, said with what to fix.
    fn classify(&self, provider: &str, status: u16) -> ProviderError {
        let seen = format!("HTTP {status} {}", self.summary());
        if self.code == "invalid_grant" || self.is_keap_dead_refresh_token() {
            return ProviderError::Rejected {
                message: format!("the provider rejected the grant ({seen})"),
            };
        }
        let fix = match self.code.as_str() {
            "invalid_client" => format!(
                "the provider refused the client credentials ({seen}): check client_id and the client secret (and refresh_auth/code_auth) of [providers.{provider}], then reload"
            ),
            "unauthorized_client" => format!(
                "the provider does not allow this client this grant type ({seen}): enable it for the client at the provider, or check client_id of [providers.{provider}], then reload"
            ),
            "invalid_scope" => format!(
                "the provider refused the requested scope ({seen}): check scopes of [providers.{provider}], then reload"
            ),
            "unsupported_grant_type" => format!(
                "the provider does not support this grant type ({seen}): check token_url of [providers.{provider}], then reload"
            ),
            "invalid_request" => format!(
                "the provider refused the request as malformed ({seen}): check token_url and refresh_auth/code_auth of [providers.{provider}], then reload"
            ),
            _ => format!(
                "the provider refused the request ({seen}): check the settings of [providers.{provider}], then reload"
            ),
        };
        ProviderError::Refused { message: fix }
    }
}

/// Provider text made safe for a log line: printable, one line, bounded.
fn clean(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_DESCRIPTION_CHARS)
        .collect::<String>()
        .trim()
        .to_string()
}

fn transient(message: String, retry_after: Option<Duration>) -> ProviderError {
    ProviderError::Transient {
        message,
        retry_after,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    fn ctx() -> AnswerContext<'static> {
        AnswerContext {
            provider: "keap",
            sent_at: DateTime::from_timestamp(1_800_000_000, 0).unwrap(),
            default_lifetime: Duration::from_secs(3600),
        }
    }

    fn ok(status: u16, body: &str) -> TokenGrant {
        match interpret(&ctx(), status, None, body.as_bytes()) {
            Ok(g) => g,
            Err(e) => panic!("{body}: {e}"),
        }
    }

    fn lifetime_of(g: &TokenGrant) -> i64 {
        (g.expires_at - g.issued_at).num_milliseconds()
    }

    #[test]
    fn odd_but_valid_answers_are_accepted() {
        let g = ok(
            200,
            r#"{"access_token":"a","expires_in":"3600","refresh_token":"r"}"#,
        );
        assert_eq!(lifetime_of(&g), 3_599_000);
        assert_eq!(g.token_type, "Bearer");
        assert_eq!(g.refresh_token.unwrap().expose_secret(), "r");
        assert_eq!(
            lifetime_of(&ok(201, r#"{"access_token":"a","expires_in":120.5}"#)),
            119_500
        );
        assert_eq!(
            lifetime_of(&ok(200, r#"{"access_token":"a","expires_in":" 60 "}"#)),
            59_000
        );
        // Negative and zero lifetimes are not lifetimes: the default applies.
        for v in [
            "-5", "0", "\"0\"", "\"soon\"", "null", "true", "\"NaN\"", "0.2",
        ] {
            let g = ok(200, &format!(r#"{{"access_token":"a","expires_in":{v}}}"#));
            assert_eq!(lifetime_of(&g), 3_599_000, "{v}");
        }
        let g = ok(
            200,
            "\u{feff}{\"access_token\":\"a\",\"scope\":[\"x\",\"y\"]}",
        );
        assert_eq!(g.scope.as_deref(), Some("x y"));
    }

    #[test]
    fn refresh_token_lifetimes_and_extras_are_read() {
        let day = Duration::from_secs(86_400);
        for (body, want) in [
            (
                r#"{"access_token":"a","refresh_token_expires_in":86400}"#,
                Some(day),
            ),
            (
                r#"{"access_token":"a","x_refresh_token_expires_in":"86400"}"#,
                Some(day),
            ),
            (r#"{"access_token":"a","refresh_token_expires_in":0}"#, None),
            (
                r#"{"access_token":"a","refresh_token_expires_in":"soon"}"#,
                None,
            ),
            (r#"{"access_token":"a"}"#, None),
        ] {
            assert_eq!(ok(200, body).refresh_token_expires_in, want, "{body}");
        }
        let huge = ok(
            200,
            r#"{"access_token":"a","refresh_token_expires_in":1e300}"#,
        );
        assert_eq!(
            huge.refresh_token_expires_in,
            Some(MAX_REFRESH_TOKEN_LIFETIME)
        );
        let body = br#"{"access_token":"a","instance_url":"https://na1.example","api_domain":{"x":1},"realmId":42}"#;
        let got = extras(body, &["instance_url", "api_domain", "realmId", "missing"]);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got["instance_url"], "https://na1.example");
        assert_eq!(got["realmId"], "42");
        assert!(extras(b"not json", &["instance_url"]).is_empty());
        assert!(extras(body, &[]).is_empty());
    }

    #[test]
    fn absurd_lifetimes_are_capped() {
        for v in [
            "1e13",
            "1e12",
            "9223372036854775807",
            "18446744073709551616",
            "1e308",
            "1e400",
            "\"1e400\"",
            "\"99999999999999999999999999999999\"",
            "-1e400",
        ] {
            let g = ok(200, &format!(r#"{{"access_token":"a","expires_in":{v}}}"#));
            let life = g.expires_at - g.issued_at;
            assert!(
                life <= chrono::Duration::from_std(MAX_LIFETIME).unwrap(),
                "{v}"
            );
            assert!(life > chrono::Duration::zero(), "{v}");
            let text = g
                .expires_at
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
            assert!(DateTime::parse_from_rfc3339(&text).is_ok(), "{v}: {text}");
        }
    }

    #[test]
    fn token_types_are_normalized_not_rewritten() {
        assert_eq!(normalize_token_type(Some("bearer")), "Bearer");
        assert_eq!(normalize_token_type(Some("BEARER")), "Bearer");
        assert_eq!(normalize_token_type(Some("dpop")), "DPoP");
        assert_eq!(normalize_token_type(Some("mac")), "MAC");
        assert_eq!(normalize_token_type(Some("OAuth")), "OAuth");
        assert_eq!(normalize_token_type(None), "Bearer");
        assert_eq!(normalize_token_type(Some("two words")), "Bearer");
        let g = ok(200, r#"{"access_token":"a","token_type":"DPoP"}"#);
        assert_eq!(g.token_type, "DPoP");
    }

    #[test]
    fn a_refresh_token_in_an_unusable_answer_is_kept() {
        for body in [
            r#"{"refresh_token":"r2","token_type":"bearer"}"#,
            r#"{"access_token":"","refresh_token":"r2"}"#,
            r#"{"access_token":42,"refresh_token":"r2"}"#,
            r#"{"access_token":"a\nb","refresh_token":"r2"}"#,
            r#"{"error":"server_error","refresh_token":"r2"}"#,
        ] {
            match interpret(&ctx(), 200, None, body.as_bytes()) {
                Err(ProviderError::Unusable { refresh_token, .. }) => {
                    assert_eq!(refresh_token.expose_secret(), "r2", "{body}")
                }
                other => panic!("{body}: {:?}", other.err()),
            }
        }
    }

    #[test]
    fn errors_are_classified_by_code_whatever_the_status() {
        let class = |status: u16, body: &str| match interpret(&ctx(), status, None, body.as_bytes())
        {
            Ok(_) => "ok",
            Err(ProviderError::Transient { .. }) => "transient",
            Err(ProviderError::Rejected { .. }) => "rejected",
            Err(ProviderError::Refused { .. }) => "refused",
            Err(ProviderError::Unusable { .. }) => "unusable",
        };
        assert_eq!(class(200, r#"{"error":"invalid_grant"}"#), "rejected");
        assert_eq!(class(400, r#"{"error":"invalid_grant"}"#), "rejected");
        assert_eq!(
            class(
                400,
                r#"{"error":"invalid_request","error_description":"Invalid Refresh Token"}"#
            ),
            "rejected"
        );
        assert_eq!(class(401, r#"{"error":"invalid_client"}"#), "refused");
        assert_eq!(class(200, r#"{"error":"invalid_client"}"#), "refused");
        assert_eq!(class(400, r#"{"error":"unauthorized_client"}"#), "refused");
        assert_eq!(class(400, r#"{"error":"invalid_scope"}"#), "refused");
        assert_eq!(
            class(400, r#"{"error":"unsupported_grant_type"}"#),
            "refused"
        );
        assert_eq!(
            class(
                400,
                r#"{"error":"invalid_request","error_description":"Missing refresh_token"}"#
            ),
            "refused"
        );
        assert_eq!(class(400, r#"{"error":"something_new"}"#), "refused");
        assert_eq!(class(401, "Unauthorized"), "refused");
        assert_eq!(class(302, ""), "refused");
        assert_eq!(class(429, ""), "transient");
        assert_eq!(class(503, r#"{"error":"invalid_grant"}"#), "transient");
        assert_eq!(class(200, "<html>"), "transient");
        assert_eq!(class(200, "[]"), "transient");
        assert_eq!(class(200, r#"{"token_type":"bearer"}"#), "transient");
    }

    /// A JSON value as raw text: the shapes providers send, and junk.
    fn raw_value() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        prop_oneof![
            any::<f64>().prop_map(|f| f.to_string()),
            any::<i64>().prop_map(|i| i.to_string()),
            "-?[0-9]{1,400}(\\.[0-9]{0,5})?([eE][+-]?[0-9]{1,4})?",
            any::<String>().prop_map(|s| serde_json::to_string(&s).unwrap()),
            Just("null".to_string()),
            Just("[\"a\"]".to_string()),
            Just("{}".to_string()),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        /// The fuzz target's properties (fuzz/fuzz_targets/token_answer.rs),
        /// run with every `cargo test`.
        #[test]
        fn any_answer_is_read_without_panic_and_only_usable_ones_are_accepted(
            status in proptest::prop_oneof![200u16..300, 100u16..600],
            access in raw_value(),
            expires in raw_value(),
            refresh in raw_value(),
            kind in raw_value(),
            junk in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
            structured in proptest::prelude::any::<bool>(),
        ) {
            let body = if structured {
                format!(r#"{{"access_token":{access},"expires_in":{expires},"refresh_token":{refresh},"token_type":{kind}}}"#).into_bytes()
            } else {
                junk
            };
            match interpret(&ctx(), status, None, &body) {
                Ok(g) => {
                    proptest::prop_assert!((200..300).contains(&status));
                    proptest::prop_assert!(usable_access_token(g.access_token.expose_secret()));
                    let life = g.expires_at - g.issued_at;
                    proptest::prop_assert!(life >= chrono::Duration::zero());
                    proptest::prop_assert!(life <= chrono::Duration::from_std(MAX_LIFETIME).unwrap());
                    let text = g.expires_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
                    proptest::prop_assert!(DateTime::parse_from_rfc3339(&text).is_ok());
                    proptest::prop_assert!(!g.token_type.is_empty());
                }
                Err(e) => {
                    let m = e.to_string();
                    proptest::prop_assert!(m.len() < 2000 && !m.contains(['\n', '\r']));
                    if let ProviderError::Unusable { refresh_token, .. } = e {
                        proptest::prop_assert!(!refresh_token.expose_secret().is_empty());
                    }
                }
            }
        }
    }

    #[test]
    fn messages_say_what_to_fix_and_stay_short() {
        let long = "x".repeat(10_000);
        let body = format!(r#"{{"error":"invalid_client","error_description":"{long}\u0007"}}"#);
        let Err(ProviderError::Refused { message }) = interpret(&ctx(), 401, None, body.as_bytes())
        else {
            panic!("not refused");
        };
        assert!(
            message.contains("client_id and the client secret"),
            "{message}"
        );
        assert!(message.contains("[providers.keap]"), "{message}");
        assert!(message.len() < 600, "{}", message.len());
        assert!(!message.contains('\u{7}'));
    }
}
