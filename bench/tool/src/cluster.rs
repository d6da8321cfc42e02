//! `cluster BIN DIR PORT PG_URL`: several daemons on one PostgreSQL
//! (issue 14). Ports PORT, PORT+1 and PORT+2 are the cluster's three
//! daemons, PORT+3 an SQLite-backed daemon for comparison.
//!
//! 1. Herd: `BENCH_CLUSTER_CALLERS` (1,000) kept-alive callers per daemon,
//!    all let go at once on a token that must be refreshed, provider token
//!    endpoint delayed `BENCH_CLUSTER_DELAY_MS` (200): exactly one upstream
//!    refresh call in the whole cluster, every caller answered 200 with the
//!    same token, and the time to the last token beside the provider delay.
//!    A broken guarantee is an error (non-zero exit) after the figures.
//! 2. Rotation propagation: `BENCH_CLUSTER_ROTATIONS` (100) forced
//!    refreshes on one daemon, p50 and p99 of the time until both others
//!    hold the new token in memory (as `bench/rotation.sh`, here with the
//!    release build and in the report).
//! 3. Throughput of `GET /v1/token/demo` on one of the PostgreSQL daemons
//!    (its two peers running) against the SQLite daemon, alternated
//!    `BENCH_ROUNDS` (3) times, `BENCH_DURATION` (10) s each with
//!    `BENCH_HTTP_CONNECTIONS` (64) kept-alive connections driven from this
//!    process. Both serve from memory, so the ratio should be about 1.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokenkeeper::dev::{DelayPhase, SimulatorConfig};
use tokio::net::TcpStream;

use crate::{
    cpu_secs, figure, get, json_field, seed, signal, start_sim_apart, stop, wait_ready,
    write_config, write_config_with, Res,
};

/// How many daemons share the PostgreSQL database.
const DAEMONS: usize = 3;

fn env_or<T: std::str::FromStr>(var: &str, default: T) -> T {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Stops every daemon when dropped, also on an early return with `?`.
struct Daemons(Vec<Child>);

impl Drop for Daemons {
    fn drop(&mut self) {
        for c in &mut self.0 {
            signal(c.id(), libc::SIGCONT);
            stop(c);
        }
    }
}

/// Like `spawn_daemon`, but the daemon gets SIGTERM when this tool dies,
/// so an interrupted run (timeout, Ctrl-C in `bench/run.sh`) leaves no
/// daemon behind holding connections to a cluster that is being removed.
fn spawn_tied(bin: &Path, cfg: &Path, log: &Path) -> Res<Child> {
    use std::os::unix::process::CommandExt;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let mut cmd = Command::new(bin);
    cmd.args(["serve", "--config"])
        .arg(cfg)
        .args(["--log-format", "human"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork
    // and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd.spawn()?)
}

pub async fn cluster(bin: PathBuf, dir: PathBuf, port: u16, pg_url: String) -> Res<()> {
    if !(pg_url.starts_with("postgres://") || pg_url.starts_with("postgresql://")) {
        return Err(format!(
            "cluster: the fourth argument must be a postgres:// URL (got {:?}); \
             bench/run.sh makes one with tests/postgres/start.sh",
            pg_url
        )
        .into());
    }
    let callers: usize = env_or("BENCH_CLUSTER_CALLERS", 1_000);
    let delay = Duration::from_millis(env_or("BENCH_CLUSTER_DELAY_MS", 200));
    // The seeded token lives 2*S, so it falls due S after seeding (the
    // effective min_validity is half a lifetime this short): S must cover
    // starting three daemons and opening every caller's connection.
    let s_secs: i64 = env_or("BENCH_CLUSTER_DUE_SECONDS", 15);

    let sim = start_sim_apart(SimulatorConfig::default()).await?;
    let cdir = dir.join("cluster");
    std::fs::create_dir_all(&cdir)?;
    let storage = format!("url = \"{pg_url}\"");
    let refresh = "check_interval = \"1h\"";
    let configs: Vec<PathBuf> = (0..DAEMONS)
        .map(|i| {
            write_config_with(
                &cdir,
                &format!("tokenkeeper-{i}.toml"),
                port + i as u16,
                &sim.base_url,
                refresh,
                &storage,
            )
        })
        .collect::<Res<_>>()?;
    let seeded = Utc::now();
    seed(
        &configs[0],
        &sim,
        vec!["default".into()],
        Some((seeded, seeded + chrono::Duration::seconds(2 * s_secs))),
    )
    .await?;
    let mut daemons = Daemons(Vec::new());
    for (i, cfg) in configs.iter().enumerate() {
        let log = cdir.join(format!("daemon-{i}.log"));
        daemons.0.push(spawn_tied(&bin, cfg, &log)?);
    }
    for i in 0..DAEMONS {
        wait_ready(port + i as u16, Instant::now(), Duration::from_secs(60)).await?;
    }

    // --- herd -------------------------------------------------------------
    let mut conns: Vec<(usize, TcpStream)> = Vec::with_capacity(DAEMONS * callers);
    for d in 0..DAEMONS {
        let p = port + d as u16;
        let mut opened = 0;
        while opened < callers {
            let batch = (callers - opened).min(500);
            let mut set = tokio::task::JoinSet::new();
            for _ in 0..batch {
                set.spawn(async move {
                    let mut s = TcpStream::connect(("127.0.0.1", p)).await?;
                    s.set_nodelay(true)?;
                    let (st, _) = get(&mut s, "/healthz").await?;
                    if st != 200 {
                        return Err(std::io::Error::other("healthz not 200"));
                    }
                    Ok(s)
                });
            }
            while let Some(r) = set.join_next().await {
                conns.push((d, r??));
            }
            opened += batch;
        }
    }
    let stale_at = seeded + chrono::Duration::seconds(s_secs);
    let until = |t: DateTime<Utc>| (t - Utc::now()).to_std().unwrap_or_default();
    if until(stale_at) < Duration::from_secs(3) {
        return Err(format!(
            "cluster: setting up took past the moment the token falls due \
             ({s_secs} s after seeding); raise BENCH_CLUSTER_DUE_SECONDS"
        )
        .into());
    }
    // Every scheduler would refresh the token the moment it falls due:
    // the daemons are stopped across that instant and continued as the
    // herd is let go, so the herd meets a token that must be refreshed
    // (whichever scheduler or caller starts the refresh, all share it).
    tokio::time::sleep(until(stale_at).saturating_sub(Duration::from_secs(2))).await;
    for c in &daemons.0 {
        signal(c.id(), libc::SIGSTOP);
    }
    tokio::time::sleep(until(stale_at) + Duration::from_millis(300)).await;
    let before = sim.sim.stats();
    sim.sim.set_token_delay(delay, DelayPhase::BeforeProcessing);
    let n = conns.len();
    let (go_tx, go_rx) = tokio::sync::watch::channel(false);
    let parked = Arc::new(AtomicUsize::new(0));
    let mut set = tokio::task::JoinSet::new();
    for (d, mut s) in conns.drain(..) {
        let mut rx = go_rx.clone();
        let parked = parked.clone();
        set.spawn(async move {
            parked.fetch_add(1, Ordering::SeqCst);
            let _ = rx.wait_for(|v| *v).await;
            let r = get(&mut s, "/v1/token/demo").await;
            (d, Instant::now(), r)
        });
    }
    while parked.load(Ordering::SeqCst) < n {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let cpu0: Vec<f64> = daemons.0.iter().map(|c| cpu_secs(c.id())).collect();
    for c in &daemons.0 {
        signal(c.id(), libc::SIGCONT);
    }
    let t0 = Instant::now();
    go_tx.send(true)?;
    let mut last = [t0; DAEMONS];
    let mut ok = [0usize; DAEMONS];
    let mut statuses = std::collections::BTreeMap::<String, usize>::new();
    let mut tokens = std::collections::HashSet::new();
    while let Some(r) = set.join_next().await {
        let (d, t, r) = r?;
        last[d] = last[d].max(t);
        match r {
            Ok((200, body)) => {
                ok[d] += 1;
                let body = String::from_utf8_lossy(&body).into_owned();
                if let Some(tok) = json_field(&body, "access_token") {
                    tokens.insert(tok.to_string());
                }
            }
            Ok((st, _)) => *statuses.entry(st.to_string()).or_default() += 1,
            Err(e) => *statuses.entry(e.kind().to_string()).or_default() += 1,
        }
    }
    let after = sim.sim.stats();
    sim.sim
        .set_token_delay(Duration::ZERO, DelayPhase::BeforeProcessing);
    let calls = after.refresh_calls - before.refresh_calls;
    let reuse = after.refresh_reuse - before.refresh_reuse;
    let ms = |t: Instant| t.saturating_duration_since(t0).as_secs_f64() * 1e3;
    let to_last = last.iter().copied().max().unwrap_or(t0);
    let label = format!("cluster_herd_{DAEMONS}x{callers}");
    println!(
        "cluster_setup: {DAEMONS} daemons on one PostgreSQL, {callers} callers each, \
         provider token endpoint delayed {} ms",
        delay.as_millis()
    );
    figure(
        &format!("{label}_upstream_refresh_calls"),
        calls as f64,
        "",
        1.0,
        "(target: exactly 1 in the whole cluster)",
    );
    figure(
        &format!("{label}_time_to_last_token"),
        ms(to_last),
        "ms",
        delay.as_secs_f64() * 1e3,
        "(the provider delay)",
    );
    let cpu: Vec<String> = daemons
        .0
        .iter()
        .zip(&cpu0)
        .map(|(c, c0)| format!("{:.0}", (cpu_secs(c.id()) - c0) * 1e3))
        .collect();
    println!(
        "{label}_detail: {}/{n} answered 200 ({}), {} distinct token(s), {reuse} refresh-token \
         reuse(s); last token per daemon at +[{}] ms; CPU [{}] ms per daemon",
        ok.iter().sum::<usize>(),
        if statuses.is_empty() {
            "no other answers".to_string()
        } else {
            format!("others: {statuses:?}")
        },
        tokens.len(),
        last.iter()
            .map(|&t| format!("{:.1}", ms(t)))
            .collect::<Vec<_>>()
            .join(", "),
        cpu.join(", "),
    );
    let mut broken = Vec::new();
    if calls != 1 {
        broken.push(format!("{calls} upstream refresh calls, not exactly 1"));
    }
    if ok.iter().sum::<usize>() != n {
        broken.push(format!("callers not answered 200: {statuses:?}"));
    }
    if tokens.len() != 1 {
        broken.push(format!("{} distinct tokens served, not 1", tokens.len()));
    }
    if reuse != 0 {
        broken.push(format!("{reuse} refresh-token reuse(s)"));
    }

    // --- rotation propagation ------------------------------------------------
    let rotations: usize = env_or("BENCH_CLUSTER_ROTATIONS", 100);
    if rotations > 0 {
        let took = rotation(port, rotations).await?;
        let at = |q: f64| took[((took.len() as f64 * q) as usize).min(took.len() - 1)];
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        figure(
            "cluster_rotation_propagation_p50",
            ms(at(0.50)),
            "ms",
            100.0,
            "(target; from the commit on one daemon to both others holding the token)",
        );
        figure(
            "cluster_rotation_propagation_p99",
            ms(at(0.99)),
            "ms",
            1000.0,
            "(SPEC 9's limit)",
        );
        println!(
            "cluster_rotation_detail: {rotations} rotations on one daemon, 2 others; max {:.1} ms",
            ms(took[took.len() - 1])
        );
    }

    // --- throughput: PostgreSQL-backed vs SQLite-backed -----------------------
    let sdir = dir.join("sqlite");
    std::fs::create_dir_all(&sdir)?;
    let sport = port + DAEMONS as u16;
    let scfg = write_config(&sdir, sport, &sim.base_url, refresh)?;
    seed(&scfg, &sim, vec!["default".into()], None).await?;
    daemons
        .0
        .push(spawn_tied(&bin, &scfg, &sdir.join("daemon.log"))?);
    wait_ready(sport, Instant::now(), Duration::from_secs(60)).await?;
    let rounds: usize = env_or("BENCH_ROUNDS", 3);
    let secs: f64 = env_or("BENCH_DURATION", 10.0);
    let connections: usize = env_or("BENCH_HTTP_CONNECTIONS", 64);
    let warm = Duration::from_secs_f64((secs / 5.0).clamp(0.5, 2.0));
    for p in [port, sport] {
        load(p, connections, warm).await?;
    }
    let mut pg = Vec::new();
    let mut sq = Vec::new();
    let mut pg_requests = 0.0;
    let xacts_before = transactions(&pg_url).await?;
    for r in 0..rounds {
        // Alternated order (PG first, then SQLite first), so neither side
        // always runs on a machine the other just warmed.
        let order = if r % 2 == 0 {
            [(port, true), (sport, false)]
        } else {
            [(sport, false), (port, true)]
        };
        for (p, is_pg) in order {
            eprintln!(
                "cluster throughput round {}/{rounds}: {} ({secs} s, {connections} connections)",
                r + 1,
                if is_pg { "postgres" } else { "sqlite" }
            );
            let m = load(p, connections, Duration::from_secs_f64(secs)).await?;
            if is_pg {
                pg_requests += m.requests as f64;
            }
            if is_pg { &mut pg } else { &mut sq }.push(m);
        }
    }
    let med = |v: &[Measured], f: fn(&Measured) -> f64| {
        let mut x: Vec<f64> = v.iter().map(f).collect();
        x.sort_by(f64::total_cmp);
        let m = x.len() / 2;
        if x.len().is_multiple_of(2) {
            (x[m - 1] + x[m]) / 2.0
        } else {
            x[m]
        }
    };
    // PostgreSQL publishes a session's counts up to a second late.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let xacts = transactions(&pg_url).await? - xacts_before;
    if rounds > 0 {
        println!(
            "cluster_token_setup: GET /v1/token/demo, {connections} kept-alive connections \
             from the bench tool, median of {rounds} alternated rounds of {secs} s; the \
             PostgreSQL daemon has its two peers running"
        );
        figure(
            "cluster_token_rps_postgres_vs_sqlite",
            med(&pg, |m| m.rps),
            "req/s",
            med(&sq, |m| m.rps),
            "(SQLite-backed daemon; target ratio ~1.0, both serve from memory)",
        );
        figure(
            "cluster_token_p99_postgres_vs_sqlite",
            med(&pg, |m| m.p99_us),
            "us",
            med(&sq, |m| m.p99_us),
            "(SQLite-backed daemon p99)",
        );
        // Token requests must not reach the database: what it counted over
        // the rounds is the daemons' background work and these two queries.
        println!(
            "cluster_token_postgres_database_transactions: {xacts} over the rounds, for \
             {pg_requests:.0} token requests on the PostgreSQL daemon ({:.4} per request; \
             far below 1 means served from memory)",
            xacts as f64 / pg_requests.max(1.0)
        );
        for (name, v) in [("postgres", &pg), ("sqlite", &sq)] {
            let rps: Vec<String> = v.iter().map(|m| format!("{:.0}", m.rps)).collect();
            let lat: Vec<String> = v
                .iter()
                .map(|m| format!("{:.0}/{:.0}", m.p50_us, m.p99_us))
                .collect();
            println!(
                "cluster_token_{name}_rounds: req/s [{}], p50/p99 us [{}]",
                rps.join(", "),
                lat.join(", ")
            );
        }
    }
    let after = sim.sim.stats();
    if after.refresh_reuse != 0 {
        broken.push(format!(
            "{} refresh-token reuse(s) over the run",
            after.refresh_reuse
        ));
    }
    drop(daemons);
    if broken.is_empty() {
        Ok(())
    } else {
        Err(format!("cluster: {}", broken.join("; ")).into())
    }
}

/// Rotates the token `rotations` times on the daemon at `port` (a forced
/// refresh) and times each from the answer, which comes after the commit,
/// until both other daemons recognize the new token as their current one
/// (`POST /v1/inspect` answers from memory, so asking reads no storage).
/// Sorted.
async fn rotation(port: u16, rotations: usize) -> Res<Vec<Duration>> {
    let http = reqwest::Client::new();
    let mut took = Vec::with_capacity(rotations);
    for _ in 0..rotations {
        let r = http
            .post(format!("http://127.0.0.1:{port}/v1/token/demo/refresh"))
            .send()
            .await?;
        let status = r.status();
        let body = r.text().await?;
        if !status.is_success() {
            return Err(format!("forced refresh answered {status}: {body}").into());
        }
        let rotated = json_field(&body, "access_token")
            .ok_or("forced refresh: no access_token")?
            .to_string();
        let committed = Instant::now();
        for d in 1..DAEMONS {
            let url = format!("http://127.0.0.1:{}/v1/inspect", port + d as u16);
            loop {
                let b = http
                    .post(&url)
                    .body(rotated.clone())
                    .send()
                    .await?
                    .text()
                    .await?;
                if json_field(&b, "kind") == Some("current_access_token") {
                    break;
                }
                if committed.elapsed() > Duration::from_secs(10) {
                    return Err(format!(
                        "a rotation did not reach the daemon on port {} in 10 s",
                        port + d as u16
                    )
                    .into());
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        took.push(committed.elapsed());
    }
    took.sort();
    Ok(took)
}

/// Transactions committed or rolled back in the database at `url` so far
/// (`pg_stat_database`), from all sessions.
async fn transactions(url: &str) -> Res<i64> {
    use sqlx::Connection;
    let mut c = sqlx::PgConnection::connect(url).await?;
    let n: i64 = sqlx::query_scalar(
        "SELECT (xact_commit + xact_rollback)::bigint FROM pg_stat_database \
         WHERE datname = current_database()",
    )
    .fetch_one(&mut c)
    .await?;
    c.close().await?;
    Ok(n)
}

struct Measured {
    requests: usize,
    rps: f64,
    p50_us: f64,
    p99_us: f64,
}

/// `connections` kept-alive connections each sending GET /v1/token/demo
/// back to back for `length`; any answer other than 200 is an error.
async fn load(port: u16, connections: usize, length: Duration) -> Res<Measured> {
    let end = Instant::now() + length;
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..connections {
        set.spawn(async move {
            let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
            s.set_nodelay(true)?;
            let mut took: Vec<u32> = Vec::with_capacity(1 << 14);
            loop {
                let t = Instant::now();
                if t >= end {
                    break;
                }
                let (st, body) = get(&mut s, "/v1/token/demo").await?;
                if st != 200 {
                    return Err(std::io::Error::other(format!(
                        "token endpoint on port {port} answered {st}: {}",
                        String::from_utf8_lossy(&body)
                    )));
                }
                took.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
            }
            Ok(took)
        });
    }
    let mut all: Vec<u32> = Vec::new();
    while let Some(r) = set.join_next().await {
        all.extend(r??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    if all.is_empty() {
        return Err(format!("no request completed on port {port}").into());
    }
    all.sort_unstable();
    let at = |q: f64| all[((all.len() as f64 * q) as usize).min(all.len() - 1)] as f64;
    Ok(Measured {
        requests: all.len(),
        rps: all.len() as f64 / elapsed,
        p50_us: at(0.50),
        p99_us: at(0.99),
    })
}
