//! The token-endpoint answer parser (`provider::answer::interpret`): no
//! input panics, and whatever it accepts is usable (a header-safe access
//! token, a lifetime within the cap, an RFC 3339 expiry); a refresh token
//! it hands back for storing is never empty; messages stay short and on
//! one line.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokenkeeper::provider::answer::{interpret, AnswerContext, MAX_LIFETIME};
use tokenkeeper::provider::ProviderError;

/// Statuses worth telling apart; the first input byte picks one.
const STATUSES: [u16; 12] = [200, 201, 204, 299, 302, 400, 401, 403, 408, 429, 500, 503];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let status = STATUSES[usize::from(pick) % STATUSES.len()];
    // Half the inputs are a lifetime in an otherwise valid answer, so the
    // date arithmetic is reached without the fuzzer rediscovering JSON.
    let wrapped;
    let body = if pick & 0x80 != 0 {
        wrapped = [
            &br#"{"access_token":"a","refresh_token":"r","expires_in":"#[..],
            rest,
            b"}",
        ]
        .concat();
        &wrapped[..]
    } else {
        rest
    };
    let sent_at = chrono::DateTime::from_timestamp(1_800_000_000, 0).unwrap();
    let ctx = AnswerContext {
        provider: "fuzz",
        sent_at,
        default_lifetime: std::time::Duration::from_secs(3600),
    };
    match interpret(&ctx, status, None, body) {
        Ok(grant) => {
            use secrecy::ExposeSecret;
            assert!((200..300).contains(&status));
            let token = grant.access_token.expose_secret();
            assert!(!token.trim().is_empty());
            assert!(token.bytes().all(|b| (0x20..=0x7e).contains(&b)));
            let lifetime = grant.expires_at - grant.issued_at;
            assert!(lifetime >= chrono::Duration::zero());
            assert!(lifetime <= chrono::Duration::from_std(MAX_LIFETIME).unwrap());
            let text = grant
                .expires_at
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
            assert!(chrono::DateTime::parse_from_rfc3339(&text).is_ok());
            assert!(!grant.token_type.is_empty());
            assert!(!grant.token_type.contains(char::is_whitespace));
        }
        Err(e) => {
            let message = e.to_string();
            assert!(message.len() < 2000, "{}", message.len());
            assert!(!message.contains(['\n', '\r']));
            if let ProviderError::Unusable { refresh_token, .. } = e {
                use secrecy::ExposeSecret;
                assert!(!refresh_token.expose_secret().is_empty());
            }
        }
    }
});
