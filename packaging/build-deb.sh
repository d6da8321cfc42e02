#!/usr/bin/env bash
# Builds the Debian package into target/debian/ and prints its path.
#
#   1. man pages and bash/zsh/fish completions, generated from the CLI's own
#      clap definition (packaging/gen-docs.rs, a dev-profile example: the
#      generators stay out of the shipped binary), into target/packaging/;
#   2. the systemd units, with ExecStart= pointing at /usr/bin (a hand
#      install, as in the README, uses /usr/local/bin);
#   3. `cargo deb` (release build, fat LTO: about 3.5 min on 2 cores), with
#      the metadata of Cargo.toml [package.metadata.deb].
#
# Installs cargo-deb if it is missing. Arguments go to `cargo deb` (e.g.
# `--profile dev --no-build` to package an existing debug build). Runs from
# any cwd.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

die() { echo "build-deb: $*" >&2; exit 1; }

# A literal path: Cargo.toml's assets name target/packaging/ as it is.
out=target/packaging
rm -rf "$out"
mkdir -p "$out/debian"

cargo run --quiet --locked --example gen-docs -- "$out"

sed 's#^ExecStart=/usr/local/bin/tokenkeeper #ExecStart=/usr/bin/tokenkeeper #' \
    systemd/tokenkeeper.service >"$out/debian/tokenkeeper.service"
grep -q '^ExecStart=/usr/bin/tokenkeeper ' "$out/debian/tokenkeeper.service" \
    || die "systemd/tokenkeeper.service has no ExecStart=/usr/local/bin/tokenkeeper line to adapt"
cp systemd/tokenkeeper.socket "$out/debian/"

command -v cargo-deb >/dev/null 2>&1 || cargo install cargo-deb --locked
cargo deb --locked --quiet "$@"
