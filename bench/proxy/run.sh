#!/bin/sh
# Proxy overhead vs calling the simulator directly (issue 8), release build.
# Knobs: BENCH_REQUESTS (latency samples, default 5000), BENCH_CONCURRENCY
# (throughput clients, default 16), BENCH_SECONDS (per throughput run, 5).
set -eu
cd "$(dirname "$0")/../.."
exec cargo bench --bench proxy "$@"
