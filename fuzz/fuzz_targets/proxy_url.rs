//! The proxy's upstream URL (`http::proxy::upstream_url`), SPEC 6: for any
//! request path and query, the URL built is under `api_base_url` (same
//! scheme, host and port; the base path's segments first; no `.`/`..`
//! segment however often it is percent-decoded), or the path is refused.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokenkeeper::http::proxy::upstream_url;
use url::Url;

const BASES: [&str; 4] = [
    "https://api.infusionsoft.com",
    "https://api.example.com/api/v1/",
    "http://127.0.0.1:8080/x",
    "http://[::1]:9/a/b",
];

/// Every segment of `path` as a server that decodes repeatedly sees it.
fn decoded_segments(path: &str) -> Vec<String> {
    let mut text = path.to_string();
    for _ in 0..8 {
        let d = percent_encoding::percent_decode_str(&text)
            .decode_utf8_lossy()
            .into_owned();
        if d == text {
            break;
        }
        text = d;
    }
    text.split(['/', '\\']).map(str::to_string).collect()
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let base = Url::parse(BASES[usize::from(pick) % BASES.len()]).unwrap();
    let text = String::from_utf8_lossy(rest);
    // A NUL splits path from query, so both are explored.
    let (path, query) = match text.split_once('\0') {
        Some((p, q)) => (p, Some(q)),
        None => (&*text, None),
    };
    let Ok(url) = upstream_url(&base, path, query) else {
        return;
    };
    assert_eq!(url.scheme(), base.scheme());
    assert_eq!(url.host_str(), base.host_str());
    assert_eq!(url.port_or_known_default(), base.port_or_known_default());
    assert!(url.username().is_empty() && url.password().is_none());
    let base_path = base.path().trim_end_matches('/');
    let rest = url.path().strip_prefix(base_path).expect("under the base path");
    assert!(rest.starts_with('/'), "{url} not under {base}");
    for seg in decoded_segments(&rest[1..]) {
        let name = seg.split(';').next().unwrap_or(&seg);
        assert!(name != "." && name != "..", "{url}: dot segment");
    }
});
