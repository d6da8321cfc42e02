//! The config reader (`config::parse`, and its client reading
//! `config::parse_for_client`): no input panics, and every refusal names at
//! least one problem.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Secret and key files named in the config are read: keep the fuzzer
    // away from device files that never end (`/dev/zero`).
    if ["dev", "proc", "sys", "\\u", "\\U"]
        .iter()
        .any(|s| text.contains(s))
    {
        return;
    }
    let path = std::path::Path::new("/nonexistent/tokenkeeper-fuzz/tokenkeeper.toml");
    if let Err(e) = tokenkeeper::config::parse(text, path) {
        assert!(!e.problems.is_empty());
    }
    if let Err(e) = tokenkeeper::config::parse_for_client(text, path, &[]) {
        assert!(!e.problems.is_empty());
    }
});
