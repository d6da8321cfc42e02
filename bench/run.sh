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
# 5. Cluster (only with BENCH_PARTS naming `cluster`; needs the PostgreSQL
#    server binaries, pg_ctl/initdb): a throw-away PostgreSQL cluster
#    (tests/postgres/start.sh, removed at the end), three daemons on it, a
#    herd of 3 x BENCH_CLUSTER_CALLERS (1,000) callers on a token that must
#    refresh (exactly one upstream call is asserted), time to the last token
#    against the provider delay (BENCH_CLUSTER_DELAY_MS, 200), rotation
#    propagation p50/p99 (BENCH_CLUSTER_ROTATIONS, 100), and the token
#    endpoint on PostgreSQL against SQLite, alternated BENCH_ROUNDS times.
#
# Prints `name: value (baseline: value, ratio: r)` lines and writes the whole
# run to bench/results/latest.md. Uses only 127.0.0.1; cleans up everything
# it starts. Knobs (environment): BENCH_DURATION (s per wrk run, 10),
# BENCH_ROUNDS (3), BENCH_HTTP_CONNECTIONS (64), BENCH_WRK_THREADS (2),
# BENCH_PORT_BASE (18780), BENCH_WAVE_SECONDS (60), BENCH_PROFILE=1 (perf
# profile of the token endpoint, needs perf), BENCH_SKIP_INSTALL=1, BENCH_HERD_ROUNDS (3),
# BENCH_PARTS (which of "token herd scale cost cluster" to run; all but
# cluster by default),
# BENCH_IDLE_SECONDS (120: the idle-CPU window of part 3; 0 skips it),
# BENCH_IDLE_BASELINE (a git revision, e.g. d74c930: its daemon is built
# from a temporary worktree and its idle CPU measured beside this one's),
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
RESULTS=$ROOT/bench/results
OUT=$RESULTS/latest.md

log() { printf '%s\n' "$*" >&2; }
PARTS=" ${BENCH_PARTS:-token herd scale cost} "
want() { [[ $PARTS == *" $1 "* ]]; }

# --- 0. tools ---------------------------------------------------------------
NGINX_BIN=$(command -v nginx || echo /usr/sbin/nginx)
if want token && [ "${BENCH_SKIP_INSTALL:-0}" != 1 ] && { ! command -v wrk >/dev/null || [ ! -x "$NGINX_BIN" ]; }; then
    log "installing nginx-light and wrk (Debian packages)"
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO=sudo
    # RUNLEVEL=1: the package's init script must not start a system nginx.
    $SUDO env RUNLEVEL=1 DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $SUDO env RUNLEVEL=1 DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light wrk >/dev/null
    NGINX_BIN=$(command -v nginx || echo /usr/sbin/nginx)
fi
NEEDED="python3 cargo curl"
want token && NEEDED="wrk $NEEDED"
if want cluster; then
    # What tests/postgres/start.sh looks for, checked before the long build.
    ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || command -v pg_ctl >/dev/null || {
        log "bench: the cluster part needs the PostgreSQL server binaries (pg_ctl, initdb): apt-get install postgresql"
        exit 2
    }
fi
for t in $NEEDED; do
    command -v "$t" >/dev/null || { log "bench: $t is required"; exit 2; }
done
for p in $TK_PORT $NGINX_PORT $NGINX_RETURN_PORT $FLOOR_PORT $HERD_PORT $SCALE_PORT $(want cluster && seq "$CLUSTER_PORT" $((CLUSTER_PORT + 3))); do
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

if [ -n "${BENCH_IDLE_BASELINE:-}" ] && want scale; then
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

# --- report -----------------------------------------------------------------------
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
    if want token; then
        echo "nginx: $("$NGINX_BIN" -v 2>&1 | cut -d/ -f2)"
        echo "wrk: $(wrk -v 2>&1 | head -1)"
    fi
    echo "tokenkeeper: $REVISION"
    [ "${BENCH_DEV_BUILD:-0}" = 1 ] && echo "build: debug (BENCH_DEV_BUILD=1; the figures are meaningless)"
    want token && echo "load: wrk -t$THREADS -c$CONNS -d${DURATION}s, $ROUNDS rounds alternated tokenkeeper/nginx (static file)/nginx_return (return 200)/floor, all on the same cores"
    want cluster && echo "cluster: ${PG_VERSION:-PostgreSQL} (throw-away cluster, fsync off); token endpoint load from the bench tool, -c$CONNS -d${DURATION}s, $ROUNDS rounds alternated PostgreSQL/SQLite"
    echo '```'
    echo
    echo "## Figures"
    echo
    echo '```'
    cat "$FIG"
    echo '```'
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
    echo '```'
} >"$OUT"
log "written: $OUT"
