//! What a person pastes or puts in a file for `connect --paste` and
//! `import` (`http::grant_in::read_pasted`,
//! `refresh::import::check_refresh_token`): no input panics; an accepted
//! paste has a bounded state and code; an accepted refresh token is one
//! line of visible ASCII, trimmed, within the size bound.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokenkeeper::http::callback::CallbackOutcome;
use tokenkeeper::http::grant_in::read_pasted;
use tokenkeeper::refresh::import::{check_refresh_token, MAX_REFRESH_TOKEN_BYTES};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(q) = read_pasted(&text) {
        assert!(!q.state.is_empty() && q.state.len() <= 512);
        if let CallbackOutcome::Code(code) = &q.outcome {
            assert!(!code.is_empty() && code.len() <= 4096);
        }
    }
    if let Ok(token) = check_refresh_token(&text) {
        assert!(!token.is_empty() && token.len() <= MAX_REFRESH_TOKEN_BYTES);
        assert!(token.bytes().all(|b| (0x21..=0x7e).contains(&b)));
    }
});
