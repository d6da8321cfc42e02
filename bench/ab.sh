#!/usr/bin/env bash
# Two tokenkeeper builds side by side, with the axum floor, for judging one
# change to the token path: bench/ab.sh OLD_BINARY NEW_BINARY [ROUNDS] [SECONDS]
# Both daemons run at once on their own seeded databases; wrk alternates
# old / new / floor each round (the machine's noise hits all three alike).
# Needs wrk and the release helpers that bench/run.sh builds in bench/target
# (or BENCH_TARGET_DIR).
# Extra environment for the new binary: AB_ENV="NAME=value ...".
set -euo pipefail
cd "$(dirname "$0")/.."
OLD=$(realpath "$1"); NEW=$(realpath "$2"); ROUNDS=${3:-5}; SECS=${4:-5}
BASE=${BENCH_PORT_BASE:-18800}
T=${BENCH_TARGET_DIR:-bench/target}
TOOL=$T/release/tokenkeeper-bench
FLOOR=$T/release/tokenkeeper-bench-floor
TMP=$(mktemp -d /tmp/tokenkeeper-ab.XXXXXX)
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$TMP"' EXIT
mkdir -p "$TMP/old" "$TMP/new"
CFG_OLD=$("$TOOL" seed-one "$OLD" "$TMP/old" $((BASE + 1)))
CFG_NEW=$("$TOOL" seed-one "$NEW" "$TMP/new" $((BASE + 2)))
RUST_LOG=warn "$OLD" serve --config "$CFG_OLD" >"$TMP/old.log" 2>&1 &
PIDS+=("$!")
env RUST_LOG=warn ${AB_ENV:-} "$NEW" serve --config "$CFG_NEW" >"$TMP/new.log" 2>&1 &
PIDS+=("$!")
for _ in $(seq 100); do
    curl -fsS -o "$TMP/body.json" "http://127.0.0.1:$((BASE + 1))/v1/token/demo" 2>/dev/null && break
    sleep 0.05
done
"$FLOOR" "127.0.0.1:$((BASE + 3))" "$TMP/body.json" &
PIDS+=("$!")
sleep 0.5
NAMES=(old new floor)
for i in 0 1 2; do wrk -t2 -c64 -d2s "http://127.0.0.1:$((BASE + 1 + i))/v1/token/demo" >/dev/null; done
for r in $(seq "$ROUNDS"); do
    for i in 0 1 2; do
        printf 'round %s %-5s ' "$r" "${NAMES[$i]}"
        wrk -t2 -c64 -d"${SECS}"s --latency "http://127.0.0.1:$((BASE + 1 + i))/v1/token/demo" |
            awk '/Requests\/sec/ {rps=$2} / 50%/ {p50=$2} / 99%/ {p99=$2} END {printf "%s req/s  p50 %s  p99 %s\n", rps, p50, p99}'
    done
done
