#!/usr/bin/env bash
# Stops the cluster started by tests/postgres/start.sh and removes it.
set -euo pipefail
dir=${TOKENKEEPER_TEST_PG_DIR:?run start.sh first (eval its output)}
bindir=""
for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    [ -x "$d/pg_ctl" ] && { bindir=$d; break; }
done
[ -n "$bindir" ] || bindir=$(dirname "$(command -v pg_ctl)")
run_as=()
[ "$(id -u)" = 0 ] && run_as=(runuser -u postgres --)
"${run_as[@]}" "$bindir/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true
rm -rf "$dir"
