#!/usr/bin/env bash
# Rotation propagation on PostgreSQL (issue 14): three daemons on one
# throw-away PostgreSQL cluster and the simulator; one rotates
# BENCH_ROTATIONS times (200), and p50/p99 of the time from its commit until
# both others hold the new token in memory are printed. Needs the
# PostgreSQL server binaries (pg_ctl, initdb: the `postgresql` package).
# BENCH_RELEASE=1 builds with --release (slower to build, closer to
# production figures). Uses only 127.0.0.1; removes the cluster it made.
set -euo pipefail
cd "$(dirname "$0")/.."
env_file=$(mktemp)
trap 'set +e; [ -s "$env_file" ] && { . "$env_file"; bash tests/postgres/stop.sh; }; rm -f "$env_file"' EXIT
bash tests/postgres/start.sh >"$env_file"
. "$env_file"
profile=()
[ "${BENCH_RELEASE:-0}" = 1 ] && profile=(--release)
cargo test "${profile[@]}" --test postgres bench_rotation_propagation -- \
    --ignored --exact --nocapture 2>&1 | grep -E '^rotation propagation|panicked|FAILED|error' || {
    echo "bench/rotation.sh: the benchmark did not run" >&2
    exit 1
}
