#!/usr/bin/env bash
# tokenkeeper benchmark suite (issue 9). One command: bench/run.sh
#
# 1. GET /v1/token/demo on a warm daemon vs nginx serving the same bytes two
#    ways (a static file, and `return 200 '...'` with default_type
#    application/json and Cache-Control no-store: nginx's fastest answer)
#    vs a bare axum handler (bench/floor), wrk, alternated each round.
# 2. Herd: 1,000 and 10,000 concurrent requests for a token that must
#    refresh, provider token endpoint delayed 200 ms; the 10,000 herd
#    BENCH_HERD_ROUNDS (3) times, each against its floor (the same 10,000
#    connections answered by the daemon already holding a fresh token):
#    the daemon's time from the provider's answer to the last token over
#    that floor.
# 3. Scale: 10,000 connections: start-to-ready, idle RSS, CPU per tick,
#    idle CPU with the default settings (% of a core, CPU-ms per hour),
#    refresh wave.
# 4. Cost per token-day with Keap's 24 h tokens.
# 5. Cluster (in the default run when the PostgreSQL server binaries,
#    pg_ctl/initdb, are installed; the report says so when they are not;
#    with BENCH_PARTS naming `cluster` they are required): a throw-away PostgreSQL cluster
#    (tests/postgres/start.sh, removed at the end), three daemons on it, a
#    herd of 3 x BENCH_CLUSTER_CALLERS (1,000) callers on a token that must
#    refresh (exactly one upstream call is asserted), time to the last token
#    against the provider delay (BENCH_CLUSTER_DELAY_MS, 200), rotation
#    propagation p50/p99 (BENCH_CLUSTER_ROTATIONS, 100), and the token
#    endpoint on PostgreSQL against SQLite, alternated BENCH_ROUNDS times.
# 6. Proxy (part `proxy`): one fast upstream (nginx `return 200` of a Keap
#    contact-list answer), called directly, through nginx as a reverse proxy
#    (proxy_pass, an upstream keep-alive pool, Authorization set, 2 workers)
#    and through tokenkeeper's /proxy (generic preset: no limits), wrk
#    alternated; throughput, p50/p99, added latency over direct. With
#    BENCH_PROXY_BASELINE=/path/to/tokenkeeper another build's proxy runs
#    beside (A/B of a change, same rounds).
# 7. Soak: "a day" at high speed: BENCH_SOAK_REFRESHES (150,000) refreshes
#    of BENCH_SOAK_CONNECTIONS (1,000) connections with BENCH_SOAK_LIFETIME
#    (2) s tokens, provider limits raised, with BENCH_SOAK_PROXIED (100,000)
#    proxied calls, BENCH_SOAK_TOKENS (100,000) token calls and
#    BENCH_SOAK_SCRAPES (2,000) /metrics scrapes beside them; the daemon's
#    RSS after warm-up, at ten checkpoints and at the end, and its growth
#    per 10,000 of each (bench/tool/src/soak.rs). Bounded by those counts.
# With BENCH_IDLE_BASELINE, BENCH_IDLE_ROUNDS (1) alternates the idle-CPU
# measurement of this build and the baseline that many times (medians).
#
# Prints `name: value (baseline: value, ratio: r)` lines and writes the whole
# run to bench/results/latest.md. Uses only 127.0.0.1; cleans up everything
# it starts. Knobs (environment): BENCH_DURATION (s per wrk run, 10),
# BENCH_ROUNDS (3), BENCH_HTTP_CONNECTIONS (64), BENCH_WRK_THREADS (2),
# BENCH_PORT_BASE (18780), BENCH_WAVE_SECONDS (60), BENCH_PROFILE=1 (perf
# profile of the token endpoint and of the proxy, needs perf),
# BENCH_PROXY_BASELINE (part 6), BENCH_PROXY_DURATION (s per proxy wrk run;
# BENCH_DURATION), BENCH_SKIP_INSTALL=1, BENCH_HERD_ROUNDS (3),
# BENCH_PARTS (which of "token herd scale cost proxy soak cluster" to run;
# all by default, cluster only when PostgreSQL's server binaries are
# installed),
# BENCH_IDLE_SECONDS (120: the idle-CPU window of part 3; 0 skips it),
# BENCH_IDLE_BASELINE (a git revision, e.g. d74c930: its daemon is built
# from a temporary worktree and its idle CPU measured beside this one's;
# or the path of a daemon binary built beforehand),
# BENCH_CONNECTIONS (10000), BENCH_DEV_BUILD=1 (debug builds in the usual
# target directories: quick, to check the script runs; figures meaningless).
# BENCH_TARGET_DIR (where release builds go; bench/target by default:
# several worktrees can share one, cargo takes turns).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
DURATION=${BENCH_DURATION:-10}
ROUNDS=${BENCH_ROUNDS:-3}
CONNS=${BENCH_HTTP_CONNECTIONS:-64}
THREADS=${BENCH_WRK_THREADS:-2}
BASE=${BENCH_PORT_BASE:-18780}
TK_PORT=$BASE
NGINX_PORT=$((BASE + 1))
FLOOR_PORT=$((BASE + 2))
HERD_PORT=$((BASE + 3))
NGINX_RETURN_PORT=$((BASE + 15))
SCALE_PORT=$((BASE + 4))
CLUSTER_PORT=$((BASE + 5)) # and the next three
PROXY_PORT=$((BASE + 20))  # upstream; nginx proxy, tokenkeeper, baseline build next
SOAK_PORT=$((BASE + 16))
RESULTS=$ROOT/bench/results
OUT=$RESULTS/latest.md

log() { printf '%s\n' "$*" >&2; }
have_pg() { ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || command -v pg_ctl >/dev/null; }
# Why a part of the default run was left out, for the report.
SKIPPED=""
if [ -n "${BENCH_PARTS:-}" ]; then
    PARTS=" $BENCH_PARTS "
elif have_pg; then
    PARTS=" token herd scale cost proxy soak cluster "
else
    PARTS=" token herd scale cost proxy soak "
    SKIPPED="cluster: not measured: the PostgreSQL server binaries (pg_ctl, initdb) are not installed (apt-get install postgresql, then run again)"
fi
want() { [[ $PARTS == *" $1 "* ]]; }

# --- 0. tools ---------------------------------------------------------------
NGINX_BIN=$(command -v nginx || echo /usr/sbin/nginx)
if { want token || want proxy; } && [ "${BENCH_SKIP_INSTALL:-0}" != 1 ] && { ! command -v wrk >/dev/null || [ ! -x "$NGINX_BIN" ]; }; then
    log "installing nginx-light and wrk (Debian packages)"
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO=sudo
    # RUNLEVEL=1: the package's init script must not start a system nginx.
    $SUDO env RUNLEVEL=1 DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $SUDO env RUNLEVEL=1 DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light wrk >/dev/null
    NGINX_BIN=$(command -v nginx || echo /usr/sbin/nginx)
fi
NEEDED="python3 cargo curl"
{ want token || want proxy; } && NEEDED="wrk $NEEDED"
if want cluster; then
    # What tests/postgres/start.sh looks for, checked before the long build.
    have_pg || {
        log "bench: the cluster part needs the PostgreSQL server binaries (pg_ctl, initdb): apt-get install postgresql"
        exit 2
    }
fi
for t in $NEEDED; do
    command -v "$t" >/dev/null || { log "bench: $t is required"; exit 2; }
done
for p in $TK_PORT $NGINX_PORT $NGINX_RETURN_PORT $FLOOR_PORT $HERD_PORT $SCALE_PORT $SOAK_PORT $(want cluster && seq "$CLUSTER_PORT" $((CLUSTER_PORT + 3))) $(want proxy && seq "$PROXY_PORT" $((PROXY_PORT + 3))); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
        log "bench: 127.0.0.1:$p is in use; set BENCH_PORT_BASE"; exit 2
    fi
done
# 10,000 sockets in the herd client and 10,000 in the daemon.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt 10500 ]; then
    log "bench: warning: ulimit -n is $(ulimit -n); the 10,000-connection herd needs about 10,500 per process"
fi

# Taken before anything is written: the report's own file is rewritten
# below, and must not mark the run as made from uncommitted code.
REVISION="$(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet HEAD -- . ':(exclude)bench/results' 2>/dev/null || echo ' (with uncommitted changes)')"

# --- build --------------------------------------------------------------------
if [ "${BENCH_DEV_BUILD:-0}" = 1 ]; then
    log "building debug binaries (BENCH_DEV_BUILD=1: the figures are meaningless)"
    # Each crate's own target directory, which the usual checks keep built.
    cargo build --quiet --bin tokenkeeper
    want token && (cd bench/floor && cargo build --quiet)
    (cd bench/tool && cargo build --quiet)
    BUILT=("$ROOT/target/debug/tokenkeeper" "$ROOT/bench/floor/target/debug/tokenkeeper-bench-floor" "$ROOT/bench/tool/target/debug/tokenkeeper-bench")
else
    log "building release binaries (tokenkeeper, bench/floor, bench/tool)"
    # One target directory for all three (bench/target): the helper depends on
    # the library, so the dependencies build once; the main target/ is left alone.
    export CARGO_TARGET_DIR=${BENCH_TARGET_DIR:-$ROOT/bench/target}
    cargo build --release --quiet --bin tokenkeeper
    want token && (cd bench/floor && cargo build --release --quiet)
    (cd bench/tool && cargo build --release --quiet)
    BUILT=("$CARGO_TARGET_DIR"/release/{tokenkeeper,tokenkeeper-bench-floor,tokenkeeper-bench})
fi

TMP=$(mktemp -d /tmp/tokenkeeper-bench.XXXXXX)
chmod 755 "$TMP"
# Private copies: a later build in the same target dir cannot swap them.
mkdir -p "$TMP/bin"
for b in "${BUILT[@]}"; do
    if [ -x "$b" ]; then cp "$b" "$TMP/bin/"; fi
done
TK=$TMP/bin/tokenkeeper
FLOOR=$TMP/bin/tokenkeeper-bench-floor
TOOL=$TMP/bin/tokenkeeper-bench
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    [ -d "$TMP/baseline-src" ] && git worktree remove --force "$TMP/baseline-src" 2>/dev/null
    # The cluster part's PostgreSQL (stop.sh also removes its directory).
    [ -s "$TMP/pg.env" ] && (. "$TMP/pg.env" && bash "$ROOT/tests/postgres/stop.sh")
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ -n "${BENCH_IDLE_BASELINE:-}" ] && [ -x "$BENCH_IDLE_BASELINE" ] && want scale; then
    # A daemon binary built beforehand.
    cp "$BENCH_IDLE_BASELINE" "$TMP/bin/tokenkeeper-baseline"
    export BENCH_BASELINE_BIN=$TMP/bin/tokenkeeper-baseline
elif [ -n "${BENCH_IDLE_BASELINE:-}" ] && want scale; then
    log "building the baseline daemon ($BENCH_IDLE_BASELINE) for the idle-CPU comparison"
    git worktree add --quiet --detach "$TMP/baseline-src" "$BENCH_IDLE_BASELINE"
    (cd "$TMP/baseline-src" && CARGO_TARGET_DIR=$ROOT/bench/target/baseline cargo build --release --quiet --bin tokenkeeper)
    cp "$ROOT/bench/target/baseline/release/tokenkeeper" "$TMP/bin/tokenkeeper-baseline"
    git worktree remove --force "$TMP/baseline-src"
    export BENCH_BASELINE_BIN=$TMP/bin/tokenkeeper-baseline
fi
RAW=$TMP/raw.txt
FIG=$TMP/figures.txt
: >"$RAW"
: >"$FIG"

wait_http() { # url
    for _ in $(seq 1 500); do
        curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
        sleep 0.02
    done
    log "bench: $1 did not answer"; return 1
}

if want token; then
# --- 1. token endpoint vs nginx vs floor ---------------------------------------
log "1/4 token endpoint: seeding one demo grant"
mkdir -p "$TMP/tk"
CFG=$(timeout 60 "$TOOL" seed-one "$TK" "$TMP/tk" "$TK_PORT")
RUST_LOG=warn "$TK" serve --config "$CFG" --log-format human >"$TMP/tk/daemon.log" 2>&1 &
TK_PID=$!
PIDS+=("$TK_PID")
wait_http "http://127.0.0.1:$TK_PORT/readyz"
URL_TK="http://127.0.0.1:$TK_PORT/v1/token/demo"
curl -fsS "$URL_TK" >"$TMP/body.json"
BODY_BYTES=$(wc -c <"$TMP/body.json")

# nginx: unprivileged, foreground, temp config, loopback only.
nginx_quote() { # file: its bytes as the inside of an nginx '...' string
    python3 - "$1" <<'PY'
import sys
body = open(sys.argv[1], encoding="utf-8").read()
# A '$' would be read as a variable; tokens and names never contain one.
if "$" in body or "\n" in body:
    sys.exit("bench: the token body cannot be written as an nginx return string")
print(body.replace("\\", "\\\\").replace("'", "\\'"), end="")
PY
}
RETURN_BODY=$(nginx_quote "$TMP/body.json")
mkdir -p "$TMP/nginx/www/v1/token" "$TMP/nginx/run"
cp "$TMP/body.json" "$TMP/nginx/www/v1/token/demo"
chmod -R a+rX "$TMP/nginx"
chmod 777 "$TMP/nginx/run"
cat >"$TMP/nginx/nginx.conf" <<EOF
worker_processes auto;
daemon off;
pid $TMP/nginx/run/nginx.pid;
error_log $TMP/nginx/run/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $TMP/nginx/run/body;
    proxy_temp_path $TMP/nginx/run/proxy;
    fastcgi_temp_path $TMP/nginx/run/fastcgi;
    uwsgi_temp_path $TMP/nginx/run/uwsgi;
    scgi_temp_path $TMP/nginx/run/scgi;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 10000000;
    open_file_cache max=16 inactive=60s;
    server {
        listen 127.0.0.1:$NGINX_PORT;
        root $TMP/nginx/www;
        location = /v1/token/demo {
            default_type application/json;
            add_header Cache-Control no-store;
        }
    }
    server {
        listen 127.0.0.1:$NGINX_RETURN_PORT;
        location = /v1/token/demo {
            default_type application/json;
            add_header Cache-Control no-store;
            return 200 '$RETURN_BODY';
        }
    }
}
EOF
if [ "$(id -u)" -eq 0 ]; then
    setpriv --reuid=65534 --regid=65534 --clear-groups "$NGINX_BIN" -p "$TMP/nginx/run" -c "$TMP/nginx/nginx.conf" 2>>"$TMP/nginx/run/stderr" &
else
    "$NGINX_BIN" -p "$TMP/nginx/run" -c "$TMP/nginx/nginx.conf" 2>>"$TMP/nginx/run/stderr" &
fi
PIDS+=("$!")
"$FLOOR" "127.0.0.1:$FLOOR_PORT" "$TMP/body.json" &
PIDS+=("$!")
URL_NGINX="http://127.0.0.1:$NGINX_PORT/v1/token/demo"
URL_NGINX_RETURN="http://127.0.0.1:$NGINX_RETURN_PORT/v1/token/demo"
URL_FLOOR="http://127.0.0.1:$FLOOR_PORT/v1/token/demo"
wait_http "$URL_NGINX"
wait_http "$URL_NGINX_RETURN"
wait_http "$URL_FLOOR"
# Every baseline serves the very bytes tokenkeeper serves, with the headers
# a caller relies on (JSON, no-store).
for u in "$URL_NGINX" "$URL_NGINX_RETURN" "$URL_FLOOR"; do
    curl -fsS -D "$TMP/head.txt" -o "$TMP/other.json" "$u"
    cmp -s "$TMP/body.json" "$TMP/other.json" || { log "bench: $u serves other bytes than $URL_TK"; exit 1; }
    grep -qi '^content-type: application/json' "$TMP/head.txt" || { log "bench: $u does not answer application/json"; exit 1; }
    case $u in "$URL_NGINX"*) grep -qi '^cache-control: no-store' "$TMP/head.txt" || { log "bench: $u does not send Cache-Control: no-store"; exit 1; } ;; esac
done
# The answers' header sizes, for the report (what each side writes per request).
HEADS=""
for s in tokenkeeper:$URL_TK nginx:$URL_NGINX nginx_return:$URL_NGINX_RETURN floor:$URL_FLOOR; do
    HEADS="$HEADS ${s%%:*}=$(curl -fsS -D - -o /dev/null "${s#*:}" | wc -c)B"
done

run_wrk() { # name url seconds
    {
        echo "### $1 ($2)"
        timeout $(($3 + 30)) wrk -t"$THREADS" -c"$CONNS" -d"$3"s --latency "$2"
    } >>"$RAW" 2>&1
}
log "1/4 token endpoint: warm-up"
SIDES="tokenkeeper:$URL_TK nginx:$URL_NGINX nginx_return:$URL_NGINX_RETURN floor:$URL_FLOOR"
for s in $SIDES; do
    timeout 30 wrk -t"$THREADS" -c"$CONNS" -d2s "${s#*:}" >/dev/null
done
for r in $(seq 1 "$ROUNDS"); do
    for s in $SIDES; do
        log "1/4 round $r/$ROUNDS: ${s%%:*} (${DURATION}s, $CONNS connections, $THREADS wrk threads)"
        run_wrk "round $r ${s%%:*}" "${s#*:}" "$DURATION"
    done
done
if [ "${BENCH_PROFILE:-0}" = 1 ] && command -v perf >/dev/null; then
    log "1/4 profiling the token endpoint (perf, ${DURATION}s)"
    perf record -F 999 -g -p "$TK_PID" -o "$TMP/perf.data" -- sleep "$DURATION" >/dev/null 2>&1 &
    PERF=$!
    timeout $((DURATION + 30)) wrk -t"$THREADS" -c"$CONNS" -d"$DURATION"s "$URL_TK" >/dev/null
    wait $PERF || true
    perf report -i "$TMP/perf.data" --no-children -g none --percent-limit 1 --stdio 2>/dev/null \
        | grep -v '^$' | head -80 >"$TMP/profile.txt" || true
fi
python3 - "$RAW" "$BODY_BYTES" "$HEADS" >>"$FIG" <<'PY'
import re, sys, statistics
raw, body = open(sys.argv[1]).read(), sys.argv[2]
runs = {}
for block in raw.split("### ")[1:]:
    name = block.split()[2]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", block).group(1))
    def pct(p):
        m = re.search(r"^\s+%s%%\s+([\d.]+)(us|ms|s)\b" % p, block, re.M)
        v, u = float(m.group(1)), m.group(2)
        return v * {"us": 1, "ms": 1e3, "s": 1e6}[u]
    runs.setdefault(name, []).append((rps, pct(50), pct(99)))
med = {k: [statistics.median(x[i] for x in v) for i in range(3)] for k, v in runs.items()}
def fig(name, v, b, unit, note):
    print(f"{name}: {v:.1f}{unit} (baseline: {b:.1f}{unit} {note}, ratio: {v / b:.3f})")
tk, ng, nr, fl = med["tokenkeeper"], med["nginx"], med["nginx_return"], med["floor"]
n = len(runs["tokenkeeper"])
print(f"token_endpoint_setup: {body}-byte body, median of {n} alternated rounds; response heads:{sys.argv[3]}")
fig("token_rps_vs_nginx_return", tk[0], nr[0], " req/s", "(nginx return 200; target ratio >= 0.95)")
fig("token_p99_vs_nginx_return", tk[2], nr[2], " us", "(nginx return 200 p99; target ratio <= 1)")
fig("token_p50_vs_nginx_return", tk[1], nr[1], " us", "(nginx return 200 p50)")
fig("token_rps_vs_floor", tk[0], fl[0], " req/s", "(axum floor; target ratio >= 0.95)")
fig("token_rps_vs_nginx", tk[0], ng[0], " req/s", "(nginx static file; target ratio >= 0.90)")
fig("floor_rps_vs_nginx", fl[0], ng[0], " req/s", "(nginx; for reference)")
fig("token_p50_vs_nginx", tk[1], ng[1], " us", "(nginx p50)")
fig("token_p99_vs_nginx", tk[2], ng[2], " us", "(nginx p99; target ratio <= 1)")
fig("token_p50_vs_floor", tk[1], fl[1], " us", "(floor p50)")
fig("token_p99_vs_floor", tk[2], fl[2], " us", "(floor p99)")
# Per round, so a drift over the run shows: tokenkeeper / nginx return.
print("token_rps_vs_nginx_return_per_round: " + ", ".join(
    f"{a[0] / b[0]:.3f}" for a, b in zip(runs["tokenkeeper"], runs["nginx_return"])))
for k in ("tokenkeeper", "nginx", "nginx_return", "floor"):
    rounds = ", ".join(f"{r:.0f}" for r, _, _ in runs[k])
    p = ", ".join(f"{a:.0f}/{b:.0f}" for _, a, b in runs[k])
    print(f"{k}_rounds: req/s [{rounds}], p50/p99 us [{p}]")
PY
kill "${PIDS[@]}" 2>/dev/null || true
wait "${PIDS[@]}" 2>/dev/null || true
PIDS=()
fi

if want herd; then
# --- 2. herd --------------------------------------------------------------------
log "2/4 herd: 1,000 and 10,000 concurrent requests for a token that must refresh"
mkdir -p "$TMP/herd"
HERD_ROUNDS=${BENCH_HERD_ROUNDS:-3}
BENCH_HERD_ROUNDS=$HERD_ROUNDS timeout $((120 + 30 * HERD_ROUNDS)) "$TOOL" herd "$TK" "$TMP/herd" "$HERD_PORT" >>"$FIG"
fi

if want scale; then
# --- 3. scale -------------------------------------------------------------------
log "3/4 scale: 10,000 connections (seeding takes a while)"
mkdir -p "$TMP/scale"
timeout 1500 "$TOOL" scale "$TK" "$TMP/scale" "$SCALE_PORT" >>"$FIG"
fi

if want cost; then
# --- 4. cost --------------------------------------------------------------------
log "4/4 cost per token-day"
"$TOOL" cost >>"$FIG"
fi

if want soak; then
# --- 6. soak ----------------------------------------------------------------------
log "soak: ${BENCH_SOAK_REFRESHES:-150000} refreshes of short-lived tokens with proxied calls, token calls and scrapes"
mkdir -p "$TMP/soak"
# Bounded by counts; the timeout only stops a stuck run.
timeout 1800 "$TOOL" soak "$TK" "$TMP/soak" "$SOAK_PORT" >>"$FIG" || {
    tail -n 20 "$TMP/soak/soak.log" >&2 || true
    log "bench: the soak part failed"
    exit 1
}
fi

if want cluster; then
# --- 5. cluster -------------------------------------------------------------------
log "5/5 cluster: a throw-away PostgreSQL, three daemons on it, one SQLite daemon"
bash tests/postgres/start.sh >"$TMP/pg.env"
PG_CTL=$(ls /usr/lib/postgresql/*/bin/pg_ctl 2>/dev/null | sort -V | tail -1)
PG_VERSION="PostgreSQL $("${PG_CTL:-pg_ctl}" --version | awk '{print $3}')"
PG_URL=$(. "$TMP/pg.env" && echo "$TOKENKEEPER_TEST_PG_URL")
mkdir -p "$TMP/cluster"
CLUSTER_OK=0
# In the background and waited for, so an interruption reaches the trap at
# once: cleanup stops the tool (its daemons die with it) and the cluster.
BENCH_ROUNDS=$ROUNDS BENCH_DURATION=$DURATION BENCH_HTTP_CONNECTIONS=$CONNS \
    timeout $((300 + 2 * ROUNDS * (DURATION + 5))) \
    "$TOOL" cluster "$TK" "$TMP/cluster" "$CLUSTER_PORT" "$PG_URL" >>"$FIG" &
PIDS+=("$!")
wait "$!" || CLUSTER_OK=$?
PIDS=()
(. "$TMP/pg.env" && bash tests/postgres/stop.sh)
rm -f "$TMP/pg.env"
if [ "$CLUSTER_OK" != 0 ]; then
    cat "$FIG"
    for f in "$TMP"/cluster/*/daemon*.log; do
        [ -s "$f" ] && { log "--- ${f#"$TMP"/}"; tail -n 20 "$f" >&2; }
    done
    log "bench: the cluster part failed (exit $CLUSTER_OK)"
    exit 1
fi
fi

if want proxy; then
# --- 6. proxy vs nginx's proxy_pass ------------------------------------------------
# The same upstream for all: nginx `return 200` of a Keap contact-list
# answer, the cheapest server on this machine (it shares the cores with
# wrk and the proxies, so the less it costs the more of the machine the
# proxies get). nginx's proxy is what a user would set up instead:
# proxy_pass to a keep-alive pool, Authorization set, 2 workers.
log "6/6 proxy: upstream, nginx proxy, tokenkeeper proxy"
UP_PORT=$PROXY_PORT
NP_PORT=$((PROXY_PORT + 1))
TKP_PORT=$((PROXY_PORT + 2))
TKB_PORT=$((PROXY_PORT + 3))
PD=$TMP/proxy
mkdir -p "$PD/up" "$PD/np" "$PD/tk" "$PD/tkb"
PROXY_DURATION=${BENCH_PROXY_DURATION:-$DURATION}
RAWP=$TMP/raw-proxy.txt
: >"$RAWP"
# A tokenkeeper proxy: the seeded `demo` grant, its provider turned into a
# `generic` one (no limits at all: the limiter never waits) whose
# api_base_url is the upstream.
start_tk_proxy() { # binary dir port -> pid in TKP_PID
    local cfg
    cfg=$(timeout 60 "$TOOL" seed-one "$1" "$2" "$3")
    sed -i -e 's/^preset = "keap"$/preset = "generic"/' \
        -e "s#^api_base_url = .*#api_base_url = \"http://127.0.0.1:$UP_PORT/api\"#" "$cfg"
    grep -q '^preset = "generic"$' "$cfg" || { log "bench: seed-one's config changed; fix the proxy part"; exit 1; }
    RUST_LOG=warn "$1" serve --config "$cfg" --log-format human >"$2/daemon.log" 2>&1 &
    TKP_PID=$!
    PIDS+=("$TKP_PID")
    wait_http "http://127.0.0.1:$3/readyz"
}
start_tk_proxy "$TK" "$PD/tk" "$TKP_PORT"
TK_PROXY_PID=$TKP_PID
if [ -n "${BENCH_PROXY_BASELINE:-}" ]; then
    cp "$BENCH_PROXY_BASELINE" "$TMP/bin/tokenkeeper-proxy-baseline"
    start_tk_proxy "$TMP/bin/tokenkeeper-proxy-baseline" "$PD/tkb" "$TKB_PORT"
    TKB_PID=$TKP_PID
fi
TOKEN=$(curl -fsS "http://127.0.0.1:$TKP_PORT/v1/token/demo" | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
# Keap's GET /crm/rest/v1/contacts?limit=1 answer, with made-up values (no
# `$`, `'` or `\` in it: it goes into nginx's config as it is).
KEAP_JSON='{"contacts":[{"id":28104,"given_name":"Ada","family_name":"Lovelace","middle_name":null,"company":{"id":3110,"company_name":"Analytical Engines Ltd"},"email_addresses":[{"email":"ada@example.com","field":"EMAIL1"}],"phone_numbers":[{"number":"+44 20 7946 0958","extension":null,"field":"PHONE1","type":"Work"}],"addresses":[{"line1":"12 St James Square","line2":null,"locality":"London","region":null,"postal_code":"SW1Y 4JH","zip_code":null,"zip_four":null,"country_code":"GBR","field":"BILLING"}],"email_status":"SingleOptIn","email_opted_in":true,"tag_ids":[92,94,118],"owner_id":7,"date_created":"2024-03-01T10:02:11.000+0000","last_updated":"2024-11-20T08:45:37.000+0000","custom_fields":[{"id":14,"content":"Gold"},{"id":16,"content":null}]}],"count":2431,"next":"https://api.infusionsoft.com/crm/rest/v1/contacts/?limit=1&offset=1&","previous":null}'
printf '%s' "$KEAP_JSON" >"$PD/body.json"
BODYP_BYTES=$(wc -c <"$PD/body.json")
nginx_conf() { # dir workers server-block
    cat >"$1/nginx.conf" <<EOF
worker_processes $2;
daemon off;
pid $1/nginx.pid;
error_log $1/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $1/body;
    proxy_temp_path $1/proxy;
    fastcgi_temp_path $1/fastcgi;
    uwsgi_temp_path $1/uwsgi;
    scgi_temp_path $1/scgi;
    tcp_nodelay on;
    keepalive_requests 10000000;
$3
}
EOF
    chmod -R a+rwX "$1"
    if [ "$(id -u)" -eq 0 ]; then
        setpriv --reuid=65534 --regid=65534 --clear-groups "$NGINX_BIN" -p "$1" -c "$1/nginx.conf" 2>>"$1/stderr" &
    else
        "$NGINX_BIN" -p "$1" -c "$1/nginx.conf" 2>>"$1/stderr" &
    fi
    PIDS+=("$!")
}
nginx_conf "$PD/up" auto "    server {
        listen 127.0.0.1:$UP_PORT;
        location / {
            default_type application/json;
            return 200 '$KEAP_JSON';
        }
    }"
nginx_conf "$PD/np" 2 "    upstream api {
        server 127.0.0.1:$UP_PORT;
        keepalive 64;
        keepalive_requests 10000000;
    }
    server {
        listen 127.0.0.1:$NP_PORT;
        location /proxy/demo/ {
            proxy_pass http://api/api/;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_set_header Authorization \"Bearer $TOKEN\";
        }
    }"
P_PATH=crm/rest/v1/contacts?limit=1
URL_DIRECT="http://127.0.0.1:$UP_PORT/api/$P_PATH"
URL_NP="http://127.0.0.1:$NP_PORT/proxy/demo/$P_PATH"
URL_TKP="http://127.0.0.1:$TKP_PORT/proxy/demo/$P_PATH"
URL_TKB="http://127.0.0.1:$TKB_PORT/proxy/demo/$P_PATH"
AUTH="Authorization: Bearer $TOKEN"
wait_http "$URL_DIRECT"
wait_http "$URL_NP"
CONTENDERS=(direct:$URL_DIRECT nginx:$URL_NP tokenkeeper:$URL_TKP)
[ -n "${BENCH_PROXY_BASELINE:-}" ] && CONTENDERS+=(baseline:$URL_TKB)
for s in "${CONTENDERS[@]}"; do
    n=$(curl -fsS -H "$AUTH" "${s#*:}" | wc -c)
    [ "$n" = "$BODYP_BYTES" ] || { log "bench: ${s%%:*} (${s#*:}) answers $n bytes, expected $BODYP_BYTES"; exit 1; }
done
log "6/6 proxy: warm-up"
for s in "${CONTENDERS[@]}"; do
    timeout 30 wrk -t"$THREADS" -c"$CONNS" -d2s -H "$AUTH" "${s#*:}" >/dev/null
done
for r in $(seq 1 "$ROUNDS"); do
    # Every other round in reverse order: no contender always runs right
    # after the same neighbour (or always first, on a warming machine).
    ORDER=("${CONTENDERS[@]}")
    if [ $((r % 2)) = 0 ]; then
        ORDER=()
        for ((i = ${#CONTENDERS[@]} - 1; i >= 0; i--)); do ORDER+=("${CONTENDERS[i]}"); done
    fi
    for s in "${ORDER[@]}"; do
        log "6/6 round $r/$ROUNDS: ${s%%:*} (${PROXY_DURATION}s, $CONNS connections, $THREADS wrk threads)"
        {
            echo "### round $r proxy-${s%%:*} (${s#*:})"
            timeout $((PROXY_DURATION + 30)) wrk -t"$THREADS" -c"$CONNS" -d"$PROXY_DURATION"s --latency -H "$AUTH" "${s#*:}"
        } >>"$RAWP" 2>&1
    done
done
if [ "${BENCH_PROFILE:-0}" = 1 ] && command -v perf >/dev/null; then
    PROFILED=("$TK_PROXY_PID:$URL_TKP:profile-proxy.txt")
    [ -n "${BENCH_PROXY_BASELINE:-}" ] && PROFILED+=("$TKB_PID:$URL_TKB:profile-proxy-baseline.txt")
    for s in "${PROFILED[@]}"; do
        IFS=: read -r pid _ <<<"$s"
        url=${s#*:}; url=${url%:*}; out=${s##*:}
        log "6/6 profiling the proxy (perf, ${PROXY_DURATION}s, $out)"
        perf record -F 999 -g -p "$pid" -o "$TMP/perf-proxy.data" -- sleep "$PROXY_DURATION" >/dev/null 2>&1 &
        PERF=$!
        timeout $((PROXY_DURATION + 30)) wrk -t"$THREADS" -c"$CONNS" -d"$PROXY_DURATION"s "$url" >/dev/null
        wait $PERF || true
        perf report -i "$TMP/perf-proxy.data" --no-children -g none --percent-limit 0.7 --stdio 2>/dev/null \
            | grep -v '^$' | head -80 >"$TMP/$out" || true
    done
fi
python3 - "$RAWP" "$BODYP_BYTES" >>"$FIG" <<'PY'
import re, sys, statistics
raw, body = open(sys.argv[1]).read(), sys.argv[2]
runs = {}
for block in raw.split("### ")[1:]:
    name = block.split()[2].removeprefix("proxy-")
    m = re.search(r"Requests/sec:\s+([\d.]+)", block)
    if not m:
        sys.exit(f"bench: wrk gave no figures for {name}:\n{block}")
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", block)
    if errors:
        sys.exit(f"bench: {name} answered {errors.group(1)} requests with an error status")
    def pct(p):
        m = re.search(r"^\s+%s%%\s+([\d.]+)(us|ms|s)\b" % p, block, re.M)
        v, u = float(m.group(1)), m.group(2)
        return v * {"us": 1, "ms": 1e3, "s": 1e6}[u]
    runs.setdefault(name, []).append((float(m.group(1)), pct(50), pct(99)))
med = {k: [statistics.median(x[i] for x in v) for i in range(3)] for k, v in runs.items()}
# Added latency per round (each proxy minus direct of the same round), median.
def added(name, i):
    return statistics.median(p[i] - d[i] for p, d in zip(runs[name], runs["direct"]))
def fig(name, v, b, unit, note):
    r = f"{v / b:.3f}" if b > 0 else "n/a"
    print(f"{name}: {v:.1f}{unit} (baseline: {b:.1f}{unit} {note}, ratio: {r})")
tk, ng, di = med["tokenkeeper"], med["nginx"], med["direct"]
n = len(runs["tokenkeeper"])
print(f"proxy_setup: {body}-byte JSON upstream answer (nginx return 200), median of {n} alternated rounds")
fig("proxy_rps_vs_nginx", tk[0], ng[0], " req/s", "(nginx proxy_pass; target ratio >= 1.0)")
fig("proxy_added_p50_vs_nginx", added("tokenkeeper", 1), added("nginx", 1), " us", "(nginx's added p50 over direct; target ratio <= 1)")
fig("proxy_added_p99_vs_nginx", added("tokenkeeper", 2), added("nginx", 2), " us", "(nginx's added p99 over direct; target ratio <= 1)")
fig("proxy_p50_vs_nginx", tk[1], ng[1], " us", "(nginx proxy p50)")
fig("proxy_p99_vs_nginx", tk[2], ng[2], " us", "(nginx proxy p99; target ratio <= 1)")
fig("proxy_rps_vs_direct", tk[0], di[0], " req/s", "(the upstream called directly)")
fig("proxy_nginx_rps_vs_direct", ng[0], di[0], " req/s", "(the upstream called directly; for reference)")
if "baseline" in runs:
    bl = med["baseline"]
    fig("proxy_rps_vs_baseline_build", tk[0], bl[0], " req/s", "(BENCH_PROXY_BASELINE)")
    fig("proxy_added_p50_vs_baseline_build", added("tokenkeeper", 1), added("baseline", 1), " us", "(BENCH_PROXY_BASELINE)")
    fig("proxy_added_p99_vs_baseline_build", added("tokenkeeper", 2), added("baseline", 2), " us", "(BENCH_PROXY_BASELINE)")
# Per round, each against the other contender of the same round: on a
# shared machine only these pairs compare.
def per_round(other):
    out = []
    for t, o, d in zip(runs["tokenkeeper"], runs[other], runs["direct"]):
        ta, oa = t[1] - d[1], o[1] - d[1]
        out.append(f"{t[0] / o[0]:.3f}/{ta / oa:.3f}" if oa > 0 else f"{t[0] / o[0]:.3f}/n/a")
    print(f"proxy_vs_{other}_rounds: req/s ratio/added p50 ratio [{', '.join(out)}]")
per_round("nginx")
if "baseline" in runs:
    per_round("baseline")
for k in runs:
    rounds = ", ".join(f"{r:.0f}" for r, _, _ in runs[k])
    p = ", ".join(f"{a:.0f}/{b:.0f}" for _, a, b in runs[k])
    print(f"proxy_{k}_rounds: req/s [{rounds}], p50/p99 us [{p}]")
PY
kill "${PIDS[@]}" 2>/dev/null || true
wait "${PIDS[@]}" 2>/dev/null || true
PIDS=()
fi

# --- report -----------------------------------------------------------------------
[ -n "$SKIPPED" ] && echo "$SKIPPED" >>"$FIG"
cat "$FIG"
mkdir -p "$RESULTS"
{
    echo "# tokenkeeper benchmark: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo
    echo "## Machine"
    echo
    echo '```'
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //') x $(nproc)"
    echo "memory: $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
    echo "kernel: $(uname -sr)"
    echo "os: $(. /etc/os-release && echo "$PRETTY_NAME")"
    echo "rustc: $(rustc -V)"
    if want token || want proxy; then
        echo "nginx: $("$NGINX_BIN" -v 2>&1 | cut -d/ -f2)"
        echo "wrk: $(wrk -v 2>&1 | head -1)"
    fi
    echo "tokenkeeper: $REVISION"
    [ "${BENCH_DEV_BUILD:-0}" = 1 ] && echo "build: debug (BENCH_DEV_BUILD=1; the figures are meaningless)"
    want token && echo "load: wrk -t$THREADS -c$CONNS -d${DURATION}s, $ROUNDS rounds alternated tokenkeeper/nginx (static file)/nginx_return (return 200)/floor, all on the same cores"
    want proxy && echo "proxy load: wrk -t$THREADS -c$CONNS -d${PROXY_DURATION:-$DURATION}s, $ROUNDS rounds alternated direct/nginx proxy/tokenkeeper proxy${BENCH_PROXY_BASELINE:+/baseline build}, upstream nginx return 200, all on the same cores"
    want cluster && echo "cluster: ${PG_VERSION:-PostgreSQL} (throw-away cluster, fsync off); token endpoint load from the bench tool, -c$CONNS -d${DURATION}s, $ROUNDS rounds alternated PostgreSQL/SQLite"
    echo '```'
    echo
    echo "## Figures"
    echo
    echo '```'
    cat "$FIG"
    echo '```'
    if [ -s "$TMP/profile-proxy.txt" ]; then
        echo
        echo "## Profile of the proxy (perf, self time)"
        echo
        echo '```'
        cat "$TMP/profile-proxy.txt"
        echo '```'
    fi
    if [ -s "$TMP/profile-proxy-baseline.txt" ]; then
        echo
        echo "## Profile of the baseline build's proxy (perf, self time)"
        echo
        echo '```'
        cat "$TMP/profile-proxy-baseline.txt"
        echo '```'
    fi
    if [ -s "$TMP/profile.txt" ]; then
        echo
        echo "## Profile of the token endpoint (perf, self time)"
        echo
        echo '```'
        cat "$TMP/profile.txt"
        echo '```'
    fi
    echo
    echo "## Raw wrk output"
    echo
    echo '```'
    cat "$RAW"
    [ -s "$TMP/raw-proxy.txt" ] && cat "$TMP/raw-proxy.txt"
    echo '```'
} >"$OUT"
log "written: $OUT"
