#!/usr/bin/env bash
# End-to-end suite: tokenkeeper against panva's oidc-provider (a real
# third-party OAuth2/OIDC server), authorized through its real login and
# consent pages in headless Chromium. One command:
#
#   tests/e2e/run.sh
#
# Needs: Node.js >= 20 with npm, Chromium at /usr/bin/chromium (or
# $E2E_CHROMIUM), and `npm ci` in tests/e2e (done here when node_modules is
# missing). Builds the debug binary with `cargo build`. Logs and screenshots
# go to target/e2e/. The last line is "e2e: N passed, N failed"; the exit
# status is non-zero on any failure. Missing tools are failures, not skips.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"

die() {
  echo "e2e: $*" >&2
  echo "e2e: 0 passed, 1 failed"
  exit 1
}

command -v node >/dev/null 2>&1 || die "node is not installed (apt-get install -y nodejs npm)"
command -v npm >/dev/null 2>&1 || die "npm is not installed (apt-get install -y npm)"
node_major="$(node -p 'process.versions.node.split(".")[0]')"
[ "$node_major" -ge 20 ] || die "Node.js >= 20 is needed, found $(node --version)"
chromium="${E2E_CHROMIUM:-/usr/bin/chromium}"
[ -x "$chromium" ] || die "Chromium not found at $chromium (apt-get install -y chromium, or set E2E_CHROMIUM)"

if [ ! -d "$here/node_modules/oidc-provider" ] || [ ! -d "$here/node_modules/playwright-core" ]; then
  (cd "$here" && npm ci --no-audit --no-fund) || die "npm ci failed in tests/e2e"
fi

cd "$root"
cargo build --quiet || die "cargo build failed"
target_dir="$(cargo metadata --format-version 1 --no-deps | node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>console.log(JSON.parse(s).target_directory))')"
[ -x "$target_dir/debug/tokenkeeper" ] || die "no binary at $target_dir/debug/tokenkeeper"

out="$target_dir/e2e"
rm -rf "$out"
mkdir -p "$out"
export E2E_BIN="$target_dir/debug/tokenkeeper" E2E_OUT="$out" E2E_CHROMIUM="$chromium"
# The dashboard, device-code and client-credentials checks run first
# (seconds each; client credentials about 30 s), then the oidc-provider
# suite, whose last line is the summary CI reads.
node "$here/dashboard.mjs" || die "the dashboard browser test failed (see above and $out)"
node "$here/device.mjs" || die "the device-code browser test failed (see above and $out)"
node "$here/client_credentials.mjs" || die "the client-credentials test failed (see above and $out)"
exec node "$here/driver.mjs"
