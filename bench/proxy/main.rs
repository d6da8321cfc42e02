//! Proxy overhead benchmark (issue 8): the same requests sent straight to
//! the simulator's API and through `/proxy/keap/...` of a release daemon,
//! in one run, with the rate limits lifted.
//!
//! Reports added latency (p50, p99) at concurrency 1 and the throughput
//! ratio at concurrency `BENCH_CONCURRENCY` (default 16). Run with
//! `bench/proxy/run.sh` (or `cargo bench --bench proxy`).

#[path = "../../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{Harness, Options};

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Sequential latencies of `n` GETs (after `n / 10` warm-up requests).
async fn latencies(
    http: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    n: usize,
) -> Vec<Duration> {
    let mut out = Vec::with_capacity(n);
    for i in 0..(n + n / 10) {
        let mut req = http.get(url);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let started = Instant::now();
        let r = req.send().await.expect("answer");
        assert_eq!(r.status(), 200, "{url}");
        let _ = r.bytes().await.expect("body");
        if i >= n / 10 {
            out.push(started.elapsed());
        }
    }
    out.sort();
    out
}

/// Requests per second with `conc` clients for `secs`.
async fn throughput(
    http: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    conc: usize,
    secs: f64,
) -> f64 {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let http = http.clone();
        let url = url.to_string();
        let token = token.map(str::to_string);
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                let mut req = http.get(&url);
                if let Some(t) = &token {
                    req = req.bearer_auth(t);
                }
                let r = req.send().await.expect("answer");
                assert_eq!(r.status(), 200);
                let _ = r.bytes().await;
                n += 1;
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.expect("task");
    }
    total as f64 / secs
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let n = env_num("BENCH_REQUESTS", 5000);
    let conc = env_num("BENCH_CONCURRENCY", 16);
    let secs = env_num("BENCH_SECONDS", 5) as f64;
    // Limits lifted: a `generic` provider on the same simulator has no
    // limits at all (the `keap` preset would keep its tenant limits).
    let mut h = Harness::new(Options {
        rust_log: "warn,tokenkeeper=info".into(),
        ..Options::default()
    })
    .await;
    let sim = h.sim.base_url.clone();
    h.write_config(
        "",
        "",
        &format!(
            "\n[providers.bench]\npreset = \"generic\"\nclient_id = \"demo-client\"\n\
             client_secret_file = \"client-secret\"\nauthorization_url = \"{sim}/authorize\"\n\
             token_url = \"{sim}/token\"\napi_base_url = \"{sim}/api\"\nrefresh_auth = \"basic\"\n"
        ),
    );
    h.start().await;
    assert_eq!(h.authorize("bench", "default").await.status(), 200);
    let (_, v) = h.get_json("/v1/token/bench").await;
    let token = v["access_token"].as_str().expect("a token").to_string();
    let http = common::client();
    let direct = h.sim.url("/api/crm/rest/v1/contacts?limit=5");
    let proxied = h.url("/proxy/bench/crm/rest/v1/contacts?limit=5");

    let d = latencies(&http, &direct, Some(&token), n).await;
    let p = latencies(&http, &proxied, None, n).await;
    let (d50, d99, p50, p99) = (
        percentile(&d, 0.5),
        percentile(&d, 0.99),
        percentile(&p, 0.5),
        percentile(&p, 0.99),
    );
    let td = throughput(&http, &direct, Some(&token), conc, secs).await;
    let tp = throughput(&http, &proxied, None, conc, secs).await;
    // The daemon's own HTTP handling without the upstream hop, for scale.
    let tt = throughput(&http, &h.url("/v1/token/bench"), None, conc, secs).await;

    println!("requests per latency series: {n}; throughput: {conc} clients x {secs}s");
    println!(
        "direct   p50 {:8.1} us   p99 {:8.1} us   {td:9.0} req/s",
        us(d50),
        us(d99)
    );
    println!(
        "proxied  p50 {:8.1} us   p99 {:8.1} us   {tp:9.0} req/s",
        us(p50),
        us(p99)
    );
    println!(
        "added    p50 {:8.1} us   p99 {:8.1} us   throughput ratio {:.1} %",
        us(p50) - us(d50),
        us(p99) - us(d99),
        100.0 * tp / td
    );
    println!("daemon /v1/token alone: {tt:9.0} req/s (no upstream hop)");
    h.stop().await;
}
