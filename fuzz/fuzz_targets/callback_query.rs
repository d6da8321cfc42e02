//! The callback's query reader (`http::callback::read_query`), the first
//! thing that touches what a provider, or anyone with a browser, puts in
//! the redirect: no input panics; an accepted query has a bounded state,
//! a bounded code and one-line, bounded error text; and whatever reaches
//! the HTML pages through their templates (maud, escaping by
//! construction) cannot open a tag or leave a double-quoted attribute.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokenkeeper::http::callback::{read_query, CallbackOutcome};

fuzz_target!(|data: &[u8]| {
    let raw = String::from_utf8_lossy(data);
    let Ok(q) = read_query(&raw) else {
        return;
    };
    assert!(!q.state.is_empty() && q.state.len() <= 512);
    match &q.outcome {
        CallbackOutcome::Code(code) => assert!(!code.is_empty() && code.len() <= 4096),
        CallbackOutcome::Error { error, description } => {
            for text in std::iter::once(error).chain(description) {
                assert!(text.chars().count() <= 301);
                assert!(!text.chars().any(char::is_control));
                let html = maud::html! { (text) }.into_string();
                assert!(!html.contains(['<', '>', '"']), "{html}");
            }
        }
        CallbackOutcome::NoCode => {}
    }
});
