//! The two requests of the device authorization grant (RFC 8628) and how
//! their answers are read: the device authorization request (a device
//! code, a user code, where the person goes) and one poll of the token
//! endpoint with the device code.
//!
//! Reading is pure ([`read_authorization`], [`read_poll`]) and never
//! panics, whatever the bytes; a successful poll is read by
//! [`answer::interpret`], the same reader as every token answer. Polling
//! itself (the interval, `slow_down`, the expiry) is `crate::device`'s.
//!
//! Must not: log or put the device code in an error message (it redeems
//! the grant while the code lives).

use std::time::Duration;

use chrono::Utc;
use secrecy::{ExposeSecret, SecretString};
use url::Url;

use super::answer::{self, StatedLifetime};
use super::{Provider, ProviderError, TokenGrant};

/// RFC 8628 3.5: without `interval` in the answer, clients wait 5 seconds.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);

/// RFC 8628 3.5: each `slow_down` adds 5 seconds to the interval.
pub const SLOW_DOWN_STEP: Duration = Duration::from_secs(5);

/// Shortest interval honoured, whatever the provider says: a zero or
/// negative interval would make polling a busy loop.
const MIN_INTERVAL: Duration = Duration::from_millis(200);

/// Longest interval honoured: a provider asking for more is broken, and
/// the code would expire before a second poll.
const MAX_INTERVAL: Duration = Duration::from_secs(300);

/// Longest a device code is waited for, whatever `expires_in` says (RFC
/// 8628 suggests 30 minutes; providers use 15).
const MAX_CODE_LIFETIME: Duration = Duration::from_secs(3600);

/// Used when the answer has no usable `expires_in`, which RFC 8628
/// requires; 10 minutes is the common value.
const DEFAULT_CODE_LIFETIME: Duration = Duration::from_secs(600);

/// The grant type of a device-code poll (RFC 8628 3.4).
const DEVICE_CODE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";

/// What the device authorization endpoint answered.
pub struct DeviceAuthorization {
    /// Redeems the grant while it lives: stays in the daemon.
    pub device_code: SecretString,
    /// What the person types at `verification_uri`.
    pub user_code: String,
    pub verification_uri: Url,
    /// The address with the user code in it, when the provider gives one.
    pub verification_uri_complete: Option<Url>,
    /// How long the codes live, from when the answer arrived.
    pub expires_in: Duration,
    /// How long to wait between polls.
    pub interval: Duration,
}

/// Why a device authorization could not be started.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DeviceStartError {
    /// The provider has no device endpoint, configured or discovered.
    #[error("[providers.{0}] has no device authorization endpoint: set device_authorization_url (or an issuer whose metadata names one), then reload; or use `tokenkeeper connect {0} --paste`")]
    NoEndpoint(String),
    /// Network failure, timeout, 5xx or 429: worth trying again.
    #[error("{0}")]
    Unreachable(String),
    /// An OAuth error or another 4xx: a configuration problem.
    #[error("{0}")]
    Refused(String),
    /// A 2xx answer that is not a device authorization.
    #[error("{0}")]
    Unreadable(String),
}

/// What one poll of the token endpoint yielded.
pub enum PollAnswer {
    /// The person approved: the grant.
    Granted(TokenGrant),
    /// `authorization_pending`: ask again after the interval.
    Pending,
    /// `slow_down`: ask again after the interval plus [`SLOW_DOWN_STEP`].
    SlowDown,
    /// `expired_token`: the codes died; a new start is needed.
    Expired,
    /// `access_denied`: the person refused.
    Denied,
    /// Anything else, classified as every token answer is (transient ones
    /// are worth another poll, the others end the flow).
    Failed(ProviderError),
}

// Both requests authenticate the client as at the code exchange
// (`code_auth`): RFC 8628 has it authenticate as at the token endpoint.
impl Provider {
    /// RFC 8628 3.1: asks the device authorization endpoint for codes.
    pub async fn device_authorization(&self) -> Result<DeviceAuthorization, DeviceStartError> {
        let name = self.name().to_string();
        let Some(url) = self.config.device_authorization_url.clone() else {
            return Err(DeviceStartError::NoEndpoint(name));
        };
        let mut form = Vec::new();
        if let Some(scope) = self.scope_param() {
            form.push(("scope", scope));
        }
        let (status, body) = self
            .post_form(&url, self.config.code_auth, form)
            .await
            .map_err(|e| DeviceStartError::Unreachable(format!("cannot reach the device authorization endpoint {url}: {e}; check that it is up, then try again")))?;
        read_authorization(&name, &url, status, &body)
    }

    /// RFC 8628 3.4: one poll of the token endpoint with the device code.
    pub async fn device_poll(&self, device_code: &SecretString) -> PollAnswer {
        let form = vec![
            ("grant_type", DEVICE_CODE_GRANT.to_string()),
            ("device_code", device_code.expose_secret().to_string()),
        ];
        let sent_at = Utc::now();
        let url = self.config.token_url.clone();
        match self.post_form(&url, self.config.code_auth, form).await {
            Ok((status, body)) => {
                let ctx = answer::AnswerContext {
                    provider: self.name(),
                    sent_at,
                    default_lifetime: self.config.default_lifetime,
                };
                read_poll(&ctx, status, &body)
            }
            Err(e) => PollAnswer::Failed(ProviderError::Transient {
                message: format!("cannot reach the token endpoint: {e}"),
                retry_after: None,
            }),
        }
    }
}

/// A lifetime or interval as stated, within `min..=max`; `default` when
/// not stated (RFC 8628 requires `expires_in`; `interval` is optional).
fn clamp(stated: StatedLifetime, default: Duration, min: Duration, max: Duration) -> Duration {
    match stated {
        StatedLifetime::Seconds(s) if s > 0.0 => {
            Duration::from_secs_f64(s.min(max.as_secs_f64())).max(min)
        }
        StatedLifetime::Seconds(_) => min,
        StatedLifetime::Missing => default,
    }
}

/// Reads the device authorization endpoint's answer (RFC 8628 3.2).
/// Google names the address `verification_url`; both are read.
pub fn read_authorization(
    provider: &str,
    url: &Url,
    status: u16,
    body: &[u8],
) -> Result<DeviceAuthorization, DeviceStartError> {
    let fields = answer::object(body);
    if !(200..300).contains(&status) {
        let said = fields
            .as_ref()
            .and_then(|f| answer::string(f, "error"))
            .map(|e| {
                let e: String = e.chars().filter(|c| !c.is_control()).take(64).collect();
                format!(" with the OAuth error \"{e}\"")
            })
            .unwrap_or_default();
        let message =
            format!("the device authorization endpoint {url} answered HTTP {status}{said}");
        return Err(match status {
            429 | 500..=599 => DeviceStartError::Unreachable(format!("{message}; try again later")),
            _ => DeviceStartError::Refused(format!("{message}: check client_id, the client secret, scopes and device_authorization_url of [providers.{provider}] (and that the client may use the device grant at the provider), then reload")),
        });
    }
    let unreadable = |what: &str| {
        DeviceStartError::Unreadable(format!(
            "the device authorization endpoint {url} answered HTTP {status} with {what}, which is not a device authorization; check device_authorization_url of [providers.{provider}]"
        ))
    };
    let Some(fields) = fields else {
        return Err(unreadable("a body that is not a JSON object"));
    };
    let text = |name: &str| {
        answer::string(&fields, name)
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    };
    let device_code = text("device_code").ok_or_else(|| unreadable("no device_code"))?;
    let user_code = text("user_code").ok_or_else(|| unreadable("no user_code"))?;
    if user_code.len() > 64 || user_code.chars().any(char::is_control) {
        return Err(unreadable("a user_code no person could type"));
    }
    let stated = |name: &str| answer::stated_lifetime(fields.get(name).map(|v| v.get()));
    let web = |s: &str| {
        Url::parse(s)
            .ok()
            .filter(|u| matches!(u.scheme(), "https" | "http"))
    };
    let verification_uri = text("verification_uri")
        .or_else(|| text("verification_url"))
        .ok_or_else(|| unreadable("no verification_uri"))?;
    let verification_uri = web(&verification_uri)
        .ok_or_else(|| unreadable("a verification_uri that is no web address"))?;
    let verification_uri_complete = text("verification_uri_complete")
        .or_else(|| text("verification_url_complete"))
        .and_then(|u| web(&u));
    Ok(DeviceAuthorization {
        device_code: SecretString::from(device_code),
        user_code,
        verification_uri,
        verification_uri_complete,
        expires_in: clamp(
            stated("expires_in"),
            DEFAULT_CODE_LIFETIME,
            Duration::from_secs(1),
            MAX_CODE_LIFETIME,
        ),
        interval: clamp(
            stated("interval"),
            DEFAULT_INTERVAL,
            MIN_INTERVAL,
            MAX_INTERVAL,
        ),
    })
}

/// Reads one poll's answer (RFC 8628 3.5): the four device-flow errors by
/// name, anything else as every token answer is read.
pub fn read_poll(ctx: &answer::AnswerContext<'_>, status: u16, body: &[u8]) -> PollAnswer {
    if !(200..300).contains(&status) {
        let error = answer::object(body).and_then(|f| answer::string(&f, "error"));
        match error.as_deref() {
            Some("authorization_pending") => return PollAnswer::Pending,
            Some("slow_down") => return PollAnswer::SlowDown,
            Some("expired_token") => return PollAnswer::Expired,
            Some("access_denied") => return PollAnswer::Denied,
            _ => {}
        }
    }
    match answer::interpret(ctx, status, None, body) {
        Ok(grant) => PollAnswer::Granted(grant),
        Err(e) => PollAnswer::Failed(e),
    }
}

/// The interval after a `slow_down`, never past the cap.
pub fn slowed(interval: Duration) -> Duration {
    (interval + SLOW_DOWN_STEP).min(MAX_INTERVAL)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url() -> Url {
        Url::parse("https://p.example/device").unwrap()
    }

    fn read(status: u16, body: &str) -> Result<DeviceAuthorization, DeviceStartError> {
        read_authorization("p", &url(), status, body.as_bytes())
    }

    #[test]
    fn a_device_authorization_is_read_leniently() {
        let a = read(
            200,
            r#"{"device_code":"d","user_code":"ABCD-EFGH","verification_uri":"https://p.example/activate","verification_uri_complete":"https://p.example/activate?user_code=ABCD-EFGH","expires_in":"900"}"#,
        )
        .unwrap();
        assert_eq!(a.user_code, "ABCD-EFGH");
        assert_eq!(a.interval, DEFAULT_INTERVAL);
        assert_eq!(a.expires_in, Duration::from_secs(900));
        assert!(a.verification_uri_complete.is_some());
        let g = read(
            200,
            r#"{"device_code":"d","user_code":"X","verification_url":"https://www.google.com/device","expires_in":1800,"interval":0}"#,
        )
        .unwrap();
        assert_eq!(g.verification_uri.as_str(), "https://www.google.com/device");
        assert_eq!(g.interval, MIN_INTERVAL);
        let slow = read(
            200,
            r#"{"device_code":"d","user_code":"X","verification_uri":"https://p.example/a","expires_in":1e300,"interval":1e300}"#,
        )
        .unwrap();
        assert_eq!(slow.interval, MAX_INTERVAL);
        assert_eq!(slow.expires_in, MAX_CODE_LIFETIME);
        // Read as every token answer is: a byte-order mark, numbers as
        // strings, a string too large for a float.
        let b = read(
            200,
            "\u{feff}{\"device_code\":\"d\",\"user_code\":\"X\",\"verification_uri\":\"https://p.example/a\",\"expires_in\":\"1e400\",\"interval\":\" 2.5 \"}",
        )
        .unwrap();
        assert_eq!(b.interval, Duration::from_millis(2500));
        assert_eq!(b.expires_in, MAX_CODE_LIFETIME);
    }

    #[test]
    fn garbage_is_refused_with_a_sentence() {
        for body in [
            "<html>",
            "[]",
            "{}",
            r#"{"user_code":"X","verification_uri":"https://p.example/a"}"#,
            r#"{"device_code":"d","verification_uri":"https://p.example/a"}"#,
            r#"{"device_code":"d","user_code":"X"}"#,
            r#"{"device_code":"d","user_code":"X","verification_uri":"javascript:alert(1)"}"#,
            r#"{"device_code":"d","user_code":"X\u0007","verification_uri":"https://p.example/a"}"#,
        ] {
            let e = read(200, body).err().expect(body);
            assert!(matches!(e, DeviceStartError::Unreadable(_)), "{body}");
            assert!(e.to_string().contains("device_authorization_url"), "{e}");
        }
        assert!(matches!(
            read(400, r#"{"error":"unauthorized_client"}"#),
            Err(DeviceStartError::Refused(m)) if m.contains("unauthorized_client")
        ));
        assert!(matches!(
            read(503, "down"),
            Err(DeviceStartError::Unreachable(_))
        ));
    }

    #[test]
    fn poll_errors_are_told_apart() {
        let ctx = answer::AnswerContext {
            provider: "p",
            sent_at: Utc::now(),
            default_lifetime: Duration::from_secs(3600),
        };
        let poll = |status, body: &str| read_poll(&ctx, status, body.as_bytes());
        assert!(matches!(
            poll(400, r#"{"error":"authorization_pending"}"#),
            PollAnswer::Pending
        ));
        assert!(matches!(
            poll(400, r#"{"error":"slow_down"}"#),
            PollAnswer::SlowDown
        ));
        assert!(matches!(
            poll(400, r#"{"error":"expired_token"}"#),
            PollAnswer::Expired
        ));
        assert!(matches!(
            poll(403, r#"{"error":"access_denied"}"#),
            PollAnswer::Denied
        ));
        assert!(matches!(
            poll(400, r#"{"error":"invalid_grant"}"#),
            PollAnswer::Failed(ProviderError::Rejected { .. })
        ));
        assert!(matches!(
            poll(502, "bad gateway"),
            PollAnswer::Failed(ProviderError::Transient { .. })
        ));
        assert!(matches!(
            poll(
                200,
                r#"{"access_token":"a","refresh_token":"r","expires_in":60}"#
            ),
            PollAnswer::Granted(_)
        ));
        assert_eq!(slowed(Duration::from_secs(1)), Duration::from_secs(6));
        assert_eq!(slowed(MAX_INTERVAL), MAX_INTERVAL);
    }
}
