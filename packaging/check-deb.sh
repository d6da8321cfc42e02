#!/usr/bin/env bash
# Builds the Debian package (packaging/build-deb.sh), installs it on this
# machine with dpkg -i, checks what it installed, and purges it again:
#   - `tokenkeeper --version` is the crate's version;
#   - `tokenkeeper check-config` accepts the shipped /etc/tokenkeeper/tokenkeeper.toml,
#     which dpkg registers as a conffile;
#   - the installed units pass `systemd-analyze verify` and the exposure limit
#     (tests/systemd/check-unit.sh, pointed at them and at /usr/bin/tokenkeeper);
#   - `man tokenkeeper` renders, and the bash, zsh and fish completions are there;
#   - `dpkg --purge` leaves none of the package's files behind.
# Needs root (dpkg). Refuses to replace a tokenkeeper package installed by
# other means. Runs from any cwd. Arguments go to `cargo deb`: for a quick
# look at the packaging without the release build,
#   cargo build && bash packaging/check-deb.sh --profile dev --no-build
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

die() { echo "check-deb: $*" >&2; exit 1; }
ok() { echo "check-deb: $*: ok"; }

[[ $EUID -eq 0 ]] || die "needs root (dpkg -i)"
if dpkg-query -W -f='${Status}' tokenkeeper 2>/dev/null | grep -q 'ok installed'; then
    die "a tokenkeeper package is already installed; remove it first (dpkg --purge tokenkeeper)"
fi

# man-db renders the page; init-system-helpers and procps are the package's
# own dependencies, which dpkg -i does not fetch.
need=()
command -v man >/dev/null 2>&1 || need+=(man-db)
command -v deb-systemd-helper >/dev/null 2>&1 || need+=(init-system-helpers)
[[ -x /bin/kill ]] || need+=(procps)
if ((${#need[@]})); then
    echo "check-deb: installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

bash packaging/build-deb.sh "$@"
version="$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)"
deb="$(ls -t target/debian/tokenkeeper_"$version"-*_*.deb | head -n1)"
[[ -f "$deb" ]] || die "no package for version $version in target/debian/"
echo "check-deb: $deb"

# Purge on the way out whatever happens, so a failed check leaves no package.
trap 'dpkg --purge tokenkeeper >/dev/null 2>&1 || true' EXIT
dpkg -i "$deb"
files="$(dpkg -L tokenkeeper)"

# --- the binary and the shipped config ---------------------------------------
bin=/usr/bin/tokenkeeper
got="$("$bin" --version)"
[[ "$got" == "tokenkeeper $version" ]] || die "--version says '$got', expected 'tokenkeeper $version'"
ok "tokenkeeper --version ($got)"
config=/etc/tokenkeeper/tokenkeeper.toml
"$bin" check-config --config "$config" || die "check-config refuses the shipped $config"
ok "check-config on the shipped $config"
dpkg-query -W -f='${Conffiles}\n' tokenkeeper | grep -q "^ $config " \
    || die "$config is not a conffile"
ok "$config is a conffile"

# --- systemd units -----------------------------------------------------------
unit_dir=/usr/lib/systemd/system
for u in tokenkeeper.service tokenkeeper.socket; do
    grep -qx "$unit_dir/$u" <<<"$files" || die "the package has no $unit_dir/$u"
done
grep -q '^ExecStart=/usr/bin/tokenkeeper serve ' "$unit_dir/tokenkeeper.service" \
    || die "the installed unit does not start /usr/bin/tokenkeeper"
unit_out="$(TOKENKEEPER_UNIT_DIR="$unit_dir" TOKENKEEPER_BIN=/usr/bin/tokenkeeper \
    bash tests/systemd/check-unit.sh)" || { printf '%s\n' "$unit_out"; die "installed units fail the unit checks"; }
printf '%s\n' "$unit_out"
grep -q 'verify clean (as shipped, host binary)' <<<"$unit_out" || die "verify did not run against the installed binary"
ok "installed units: systemd-analyze verify and exposure"

# --- man page and completions --------------------------------------------------
page="$(MANWIDTH=100 man --no-hyphenation tokenkeeper 2>&1)" || die "man tokenkeeper fails: $page"
grep -q 'check-config' <<<"$page" || die "man tokenkeeper does not list the subcommands: $page"
MANWIDTH=100 man tokenkeeper-serve 2>/dev/null | grep -q -- '--listen' || die "man tokenkeeper-serve lacks --listen"
ok "man tokenkeeper renders"
for f in /usr/share/bash-completion/completions/tokenkeeper \
    /usr/share/zsh/vendor-completions/_tokenkeeper \
    /usr/share/fish/vendor_completions.d/tokenkeeper.fish; do
    grep -qx "$f" <<<"$files" || die "the package has no $f"
    grep -q 'check-config' "$f" || die "$f does not complete the subcommands"
done
bash -c 'source /usr/share/bash-completion/completions/tokenkeeper && complete -p tokenkeeper' >/dev/null \
    || die "the bash completion does not load"
ok "bash, zsh and fish completions"

# --- purge ---------------------------------------------------------------------
trap - EXIT
dpkg --purge tokenkeeper
status="$(dpkg-query -W -f='${Status}' tokenkeeper 2>/dev/null || true)"
case "$status" in
    "" | *not-installed) ;;
    *) die "dpkg still holds the package after --purge ($status)" ;;
esac
left=()
while IFS= read -r f; do
    [[ -f "$f" || -L "$f" ]] && left+=("$f")
done <<<"$files"
[[ -e $config ]] && left+=("$config")
# deb-systemd-helper's record of the units (enable/mask state) goes too.
while IFS= read -r f; do
    left+=("$f")
done < <(find /var/lib/systemd/deb-systemd-helper-enabled /var/lib/systemd/deb-systemd-helper-masked \
    -name '*tokenkeeper*' 2>/dev/null)
((${#left[@]} == 0)) || die "left behind after purge: ${left[*]}"
ok "dpkg --purge removes every file"
echo "check-deb: the package builds, installs, works and purges cleanly"
