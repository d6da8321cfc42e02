#!/usr/bin/env bash
# Stops (fast: connections are terminated, as in a server restart) or
# starts again, on the same port and data directory, the cluster started
# by tests/postgres/start.sh whose directory is TOKENKEEPER_TEST_PG_DIR.
# For outage tests, which start a cluster of their own: never run it on
# the shared one other tests use.
#
#   TOKENKEEPER_TEST_PG_DIR=... bash tests/postgres/ctl.sh stop|start
set -euo pipefail
dir=${TOKENKEEPER_TEST_PG_DIR:?the directory printed by start.sh}
bindir=""
for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    [ -x "$d/pg_ctl" ] && { bindir=$d; break; }
done
[ -n "$bindir" ] || bindir=$(dirname "$(command -v pg_ctl)")
run_as=()
[ "$(id -u)" = 0 ] && run_as=(runuser -u postgres --)
case "${1:-}" in
    stop)
        "${run_as[@]}" "$bindir/pg_ctl" -D "$dir/data" -m fast -w -t 60 stop >/dev/null
        ;;
    start)
        "${run_as[@]}" "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
            -o "$(cat "$dir/options")" start >/dev/null || {
            cat "$dir/server.log" >&2
            exit 1
        }
        ;;
    *)
        echo "usage: ctl.sh stop|start" >&2
        exit 2
        ;;
esac
