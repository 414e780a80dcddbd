#!/bin/sh
# Builds the .deb (cargo-deb) and .rpm (cargo-generate-rpm) of kooagent and checks their
# contents against the list below (the same files `kooagent-install install` writes).
#
#   scripts/package.sh                 # host target, release build
#   TARGET=aarch64-unknown-linux-gnu scripts/package.sh   # after scripts/cross-build.sh,
#                                      # with CARGO_TARGET_DIR=target/cross (no rebuild)
#
# Output: target/packages/*.deb, *.rpm. Installs cargo-deb / cargo-generate-rpm with
# `cargo install --locked` and dpkg-dev/rpm with apt-get when missing.
set -eu

here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
OUT="$here/target/packages"
mkdir -p "$OUT"
log() { echo "package: $*"; }

command -v cargo-deb >/dev/null 2>&1 || cargo install --locked cargo-deb
command -v cargo-generate-rpm >/dev/null 2>&1 || cargo install --locked cargo-generate-rpm
if ! command -v rpm >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rpm >/dev/null || log "rpm not installable: rpm contents not checked"
fi

target_args=""
if [ -n "${TARGET:-}" ]; then
    target_args="--target $TARGET"
    bin="${CARGO_TARGET_DIR:-$here/target}/$TARGET/release/kooagent"
else
    bin="${CARGO_TARGET_DIR:-$here/target}/release/kooagent"
fi

start=$(date +%s)
if [ -z "${NO_BUILD:-}" ]; then
    # The shipped binary: static glibc (scripts/release.sh).
    TARGET="${TARGET:-}" bash "$here/scripts/release.sh"
fi
[ -x "$bin" ] || { echo "package: $bin missing" >&2; exit 1; }

rm -f "$OUT"/kooagent*.deb "$OUT"/kooagent*.rpm
# shellcheck disable=SC2086
cargo deb -p kooagent --no-build $target_args --output "$OUT/"
# shellcheck disable=SC2086
cargo generate-rpm -p agent $target_args -o "$OUT/"
deb=$(ls "$OUT"/kooagent*.deb)
rpm=$(ls "$OUT"/kooagent*.rpm)
log "built $deb and $rpm in $(($(date +%s) - start)) s"

# Files both packages must contain (paths without the leading /).
expected="usr/bin/kooagent
usr/lib/systemd/system/kooagent.service
usr/share/kooagent/restart-backoff.conf
etc/kooagent/agent.toml
etc/kooagent/managed-units
usr/lib/sysusers.d/kooagent.conf
usr/share/polkit-1/rules.d/50-kooagent.rules
usr/share/doc/kooagent/operations.md"

fail=0
check() { # kind listing-file
    for f in $expected; do
        if ! grep -qE "(^|[ ./])/?$f\$" "$2"; then
            echo "package: $1 is missing $f" >&2
            fail=1
        fi
    done
}

dpkg-deb -c "$deb" | tee "$OUT/deb-contents.txt"
check deb "$OUT/deb-contents.txt"
grep -qE '^-rwxr-xr-x .* \./usr/bin/kooagent$' "$OUT/deb-contents.txt" || { echo "package: deb: /usr/bin/kooagent not 0755" >&2; fail=1; }
grep -qE '^-rw-r----- .* \./etc/kooagent/agent.toml$' "$OUT/deb-contents.txt" || { echo "package: deb: agent.toml not 0640" >&2; fail=1; }
grep -qE '^-rwxr-xr-x .* \./etc/init.d/kooagent$' "$OUT/deb-contents.txt" || { echo "package: deb: no SysV init script" >&2; fail=1; }
dpkg-deb -I "$deb" | grep -qE '^ *[0-9]+ bytes, +[0-9]+ lines +\* +postinst' || { echo "package: deb: no postinst" >&2; fail=1; }
dpkg-deb -f "$deb" Package Version Architecture Depends
dpkg-deb --ctrl-tarfile "$deb" | tar -t | grep -q conffiles && dpkg-deb -e "$deb" "$OUT/deb-control" && {
    grep -qx /etc/kooagent/agent.toml "$OUT/deb-control/conffiles" || { echo "package: deb: agent.toml not a conffile" >&2; fail=1; }
}

if command -v rpm >/dev/null 2>&1; then
    rpm -qlvp "$rpm" | tee "$OUT/rpm-contents.txt"
    check rpm "$OUT/rpm-contents.txt"
    rpm -qp --configfiles "$rpm" | grep -qx /etc/kooagent/agent.toml || { echo "package: rpm: agent.toml not %config" >&2; fail=1; }
    grep -qE '^-rw-r----- .* root +kooagent .* /etc/kooagent/agent.toml$' "$OUT/rpm-contents.txt" || { echo "package: rpm: agent.toml not 0640 root:kooagent" >&2; fail=1; }
    rpm -qp --scripts "$rpm" | grep -q 'useradd -r' || { echo "package: rpm: no user creation in %pre" >&2; fail=1; }
else
    log "rpm not available: rpm contents not checked"
fi

[ "$fail" = 0 ] || { echo "package: FAIL" >&2; exit 1; }
log "contents OK: $(basename "$deb"), $(basename "$rpm")"
