//! The discovery-document reader (`provider::discovery::parse`): no input
//! panics; what it accepts gives a token endpoint (none is set in the file
//! here) as an http(s) URL, an https one for the https issuer; refusals
//! are one short line.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokenkeeper::config::ExplicitEndpoints;
use tokenkeeper::provider::discovery::parse;
use url::Url;

fuzz_target!(|data: &[u8]| {
    let issuer = Url::parse("https://id.example/realm").expect("a valid issuer");
    // Half the inputs are members of a document that names the right
    // issuer, so the endpoint checks are reached without the fuzzer
    // rediscovering the issuer string.
    let wrapped;
    let body = match data.split_first() {
        Some((&pick, rest)) if pick & 1 == 1 => {
            wrapped = [
                &br#"{"issuer":"https://id.example/realm","#[..],
                rest,
                b"}",
            ]
            .concat();
            &wrapped[..]
        }
        _ => data,
    };
    match parse(&issuer, "https://id.example/.well-known/x", body, ExplicitEndpoints::default()) {
        Ok(m) => {
            let token = m.token_endpoint.expect("a token endpoint when none is set by hand");
            assert_eq!(token.scheme(), "https");
        }
        Err(message) => {
            assert!(!message.contains('\n'), "{message}");
            assert!(message.len() < 1200, "{message}");
        }
    }
});
