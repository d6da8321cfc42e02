#!/usr/bin/env bash
# Property-based test of the live daemon against its own OpenAPI document:
# schemathesis generates requests for every operation and checks that no
# answer is a 5xx and that every answer conforms to the documented schema.
# Runs `tokenkeeper serve --dev` (built-in simulated provider) with one
# authorized connection, so token endpoints answer 200 as well as errors.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
bin="$repo/target/debug/tokenkeeper"
command -v schemathesis >/dev/null || { echo "openapi: schemathesis is missing (pip install schemathesis)" >&2; exit 1; }
[[ -x "$bin" ]] || (cd "$repo" && cargo build --quiet)

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
base="http://127.0.0.1:$port"
work=$(mktemp -d)
"$bin" serve --dev --listen "127.0.0.1:$port" >"$work/daemon.log" 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 100); do curl -fs "$base/healthz" >/dev/null && break; sleep 0.1; done

# Authorize the demo connection through the real flow.
loc=$(curl -fs -o /dev/null -c "$work/jar" -w '%{redirect_url}' "$base/connect/demo")
cb=$(curl -fs -o /dev/null -w '%{redirect_url}' -X POST --data "${loc#*\?}" "$base/dev-provider/approve")
curl -fs -b "$work/jar" -o /dev/null "$cb"
curl -fs "$base/v1/token/demo" >/dev/null

# The OpenAPI document itself must validate as 3.1.
python3 - "$base/openapi.json" <<'PY'
import json, sys, urllib.request
doc = json.load(urllib.request.urlopen(sys.argv[1]))
assert doc["openapi"].startswith("3.1"), doc["openapi"]
spec_paths = ["/", "/connect/{provider}", "/callback", "/v1/token/{provider}", "/v1/token/{provider}/{account}",
              "/v1/token/{provider}/refresh", "/v1/token/{provider}/{account}/refresh", "/v1/connections",
              "/v1/connections/{provider}/{account}", "/v1/connections/{provider}/{account}/events",
              "/healthz", "/readyz", "/metrics", "/openapi.json"]
missing = [p for p in spec_paths if p not in doc["paths"]]
assert not missing, f"SPEC 4 paths missing from /openapi.json: {missing}"
print(f"openapi: document {doc['openapi']} lists {len(doc['paths'])} paths")
PY

schemathesis run "$base/openapi.json" \
    --checks not_a_server_error,response_schema_conformance,content_type_conformance \
    --max-examples "${OPENAPI_MAX_EXAMPLES:-40}" \
    --workers 1 \
    --suppress-health-check all \
    --no-color 2>&1 | tee "$work/st.log"
status=${PIPESTATUS[0]}
if [[ $status -ne 0 ]]; then
    echo "openapi: 0 passed, 1 failed"
    tail -50 "$work/daemon.log"
    exit 1
fi
echo "openapi: 1 passed, 0 failed"
