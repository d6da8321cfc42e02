#!/usr/bin/env bash
# Starts a throw-away PostgreSQL cluster for the tests: a fresh data
# directory under a temporary directory, trust authentication, listening
# on 127.0.0.1 only, on a free port. Prints shell lines to evaluate:
#
#   eval "$(bash tests/postgres/start.sh)"
#
# which export TOKENKEEPER_TEST_PG_URL (the URL of the cluster's `postgres`
# database; each test creates a database of its own in it) and
# TOKENKEEPER_TEST_PG_DIR (for tests/postgres/stop.sh). Run as root, the
# server runs as the `postgres` user (PostgreSQL refuses to run as root).
set -euo pipefail

bindir=""
for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    [ -x "$d/pg_ctl" ] && { bindir=$d; break; }
done
if [ -z "$bindir" ]; then
    command -v pg_ctl >/dev/null 2>&1 || {
        echo "PostgreSQL server binaries not found (pg_ctl); install the postgresql package" >&2
        exit 1
    }
    bindir=$(dirname "$(command -v pg_ctl)")
fi

run_as=()
if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres
    run_as=(runuser -u postgres --)
fi

dir=$(mktemp -d "${TMPDIR:-/tmp}/tokenkeeper-pg.XXXXXX")
chmod 755 "$dir"
[ "${#run_as[@]}" = 0 ] || chown postgres "$dir"

# A free port: bind to 0, read it, release it (a race with another
# process taking it is possible but rare; pg_ctl then fails loudly).
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

"${run_as[@]}" "$bindir/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --locale=C >"$dir/initdb.log" 2>&1 || {
    cat "$dir/initdb.log" >&2
    exit 1
}
# Enough connections for parallel tests (each daemon pools a few). The
# options are kept beside the data, so tests/postgres/ctl.sh can stop and
# start the same server again (an outage test on a cluster of its own).
echo "-c listen_addresses=127.0.0.1 -p $port -k $dir -c max_connections=300 -c fsync=off -c shared_buffers=32MB" >"$dir/options"
"${run_as[@]}" "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
    -o "$(cat "$dir/options")" \
    start >/dev/null || {
    cat "$dir/server.log" >&2
    exit 1
}

echo "export TOKENKEEPER_TEST_PG_URL='postgres://postgres@127.0.0.1:$port/postgres'"
echo "export TOKENKEEPER_TEST_PG_DIR='$dir'"
