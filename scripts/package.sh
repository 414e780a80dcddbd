#!/bin/sh
# Builds the .deb (cargo-deb) and .rpm (cargo-generate-rpm) of kooagent and checks their
# contents against the list below (the same files `kooagent-install install` writes), their
# architecture, and that the packaged binary is the static one for that architecture.
#
#   scripts/package.sh                 # host target, release build
#   TARGETS="aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf riscv64gc-unknown-linux-gnu" \
#       CARGO_TARGET_DIR=target/cross NO_BUILD=1 scripts/package.sh
#                                      # after scripts/cross-build.sh: .deb arm64, armhf,
#                                      # riscv64 and .rpm aarch64 (no rebuild)
#   scripts/cross-packages.sh          # both steps in one command
#   PROFILE=cross-test TARGETS="…" CARGO_TARGET_DIR=target/cross NO_BUILD=1 scripts/package.sh
#                                      # CI: packages around the cross stage's binaries
#                                      # (same code, no fat LTO), checked the same way
#
# RPM_ARCHES (default "x86_64 aarch64"): the rpm architectures built; the others get a .deb only.
# Output: target/packages/*.deb, *.rpm. Installs cargo-deb / cargo-generate-rpm with
# `cargo install --locked` and dpkg-dev/rpm with apt-get when missing.
set -eu

here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
OUT="$here/target/packages"
mkdir -p "$OUT"
log() { echo "package: $*"; }
RPM_ARCHES=${RPM_ARCHES:-"x86_64 aarch64"}
# The cargo profile whose binary is packaged (with NO_BUILD=1; a build is always release).
PROFILE=${PROFILE:-release}
[ -n "${NO_BUILD:-}" ] || PROFILE=release
[ "$PROFILE" != dev ] || { echo "package: PROFILE=dev: package a release-like profile" >&2; exit 2; }

command -v cargo-deb >/dev/null 2>&1 || cargo install --locked cargo-deb
command -v cargo-generate-rpm >/dev/null 2>&1 || cargo install --locked cargo-generate-rpm
if ! command -v rpm >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rpm >/dev/null || log "rpm not installable: rpm contents not checked"
fi

# triple -> Debian arch, rpm arch, ELF machine (readelf -h)
arch_of() {
    case "$1" in
        x86_64-unknown-linux-gnu) echo "amd64 x86_64 X86-64" ;;
        aarch64-unknown-linux-gnu) echo "arm64 aarch64 AArch64" ;;
        armv7-unknown-linux-gnueabihf) echo "armhf armv7hl ARM" ;;
        riscv64gc-unknown-linux-gnu) echo "riscv64 riscv64 RISC-V" ;;
        *) echo "package: unsupported target $1" >&2; exit 2 ;;
    esac
}
host_triple=$(rustc -vV | sed -n 's/^host: //p')
TARGETS=${TARGETS:-${TARGET:-}}
[ -n "$TARGETS" ] || TARGETS=host

fail=0
summary=""
for t in $TARGETS; do
target_args=""
if [ "$t" != host ]; then
    target_args="--target $t"
    triple=$t
    bin="${CARGO_TARGET_DIR:-$here/target}/$t/$PROFILE/kooagent"
else
    triple=$host_triple
    bin="${CARGO_TARGET_DIR:-$here/target}/$PROFILE/kooagent"
fi
# shellcheck disable=SC2046
set -- $(arch_of "$triple")
deb_arch=$1 rpm_arch=$2 machine=$3

start=$(date +%s)
if [ -z "${NO_BUILD:-}" ]; then
    # The shipped binary: static glibc (scripts/release.sh).
    if [ "$t" = host ]; then TARGET="" bash "$here/scripts/release.sh"; else TARGET="$t" bash "$here/scripts/release.sh"; fi
fi
[ -x "$bin" ] || { echo "package: $bin missing" >&2; exit 1; }

rm -f "$OUT"/kooagent_*_"$deb_arch".deb "$OUT"/kooagent-*."$rpm_arch".rpm
# shellcheck disable=SC2086
cargo deb -p kooagent --no-build --profile "$PROFILE" $target_args --output "$OUT/"
deb=$(ls "$OUT"/kooagent_*_"$deb_arch".deb)
rpm=""
if echo " $RPM_ARCHES " | grep -q " $rpm_arch "; then
    # shellcheck disable=SC2086
    cargo generate-rpm -p agent --profile "$PROFILE" $target_args ${CARGO_TARGET_DIR:+--target-dir "$CARGO_TARGET_DIR"} -o "$OUT/"
    rpm=$(ls "$OUT"/kooagent-*."$rpm_arch".rpm)
fi
log "built $deb ${rpm:+and $rpm }in $(($(date +%s) - start)) s"

# Files both packages must contain (paths without the leading /).
expected="usr/bin/kooagent
usr/lib/systemd/system/kooagent.service
usr/share/kooagent/restart-backoff.conf
etc/kooagent/agent.toml
etc/kooagent/managed-units
usr/lib/sysusers.d/kooagent.conf
usr/share/polkit-1/rules.d/50-kooagent.rules
usr/share/doc/kooagent/operations.md
usr/share/kooagent/openrc/kooagent"

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
[ "$(dpkg-deb -f "$deb" Architecture)" = "$deb_arch" ] || { echo "package: deb: Architecture is not $deb_arch" >&2; fail=1; }
# The packaged binary: this architecture, static (no program interpreter).
x="$OUT/deb-extract-$deb_arch"
rm -rf "$x" && dpkg-deb -x "$deb" "$x"
readelf -h "$x/usr/bin/kooagent" | grep -qE "Machine: +.*$machine" || { echo "package: deb: usr/bin/kooagent is not a $machine binary" >&2; fail=1; }
if readelf -l "$x/usr/bin/kooagent" | grep -q "program interpreter"; then echo "package: deb: usr/bin/kooagent is not static" >&2; fail=1; fi
rm -rf "$x"
rm -rf "$OUT/deb-control"
dpkg-deb --ctrl-tarfile "$deb" | tar -t | grep -q conffiles && dpkg-deb -e "$deb" "$OUT/deb-control" && {
    grep -qx /etc/kooagent/agent.toml "$OUT/deb-control/conffiles" || { echo "package: deb: agent.toml not a conffile" >&2; fail=1; }
}

if [ -z "$rpm" ]; then
    log "no rpm for $rpm_arch (RPM_ARCHES=$RPM_ARCHES)"
elif command -v rpm >/dev/null 2>&1; then
    [ "$(rpm -qp --queryformat '%{ARCH}' "$rpm")" = "$rpm_arch" ] || { echo "package: rpm: arch is not $rpm_arch" >&2; fail=1; }
    rpm -qlvp "$rpm" | tee "$OUT/rpm-contents.txt"
    check rpm "$OUT/rpm-contents.txt"
    rpm -qp --configfiles "$rpm" | grep -qx /etc/kooagent/agent.toml || { echo "package: rpm: agent.toml not %config" >&2; fail=1; }
    grep -qE '^-rw-r----- .* root +kooagent .* /etc/kooagent/agent.toml$' "$OUT/rpm-contents.txt" || { echo "package: rpm: agent.toml not 0640 root:kooagent" >&2; fail=1; }
    rpm -qp --scripts "$rpm" | grep -q 'useradd -r' || { echo "package: rpm: no user creation in %pre" >&2; fail=1; }
    grep -qE '^-rwxr-xr-x .* /etc/rc.d/init.d/kooagent$' "$OUT/rpm-contents.txt" || { echo "package: rpm: no SysV init script" >&2; fail=1; }
    rpm -qp --scripts "$rpm" | grep -q 'chkconfig --add kooagent' || { echo "package: rpm: SysV script not enabled without systemd" >&2; fail=1; }
else
    log "rpm not available: rpm contents not checked"
fi

summary="$summary $(basename "$deb")${rpm:+, $(basename "$rpm")}"
done

[ "$fail" = 0 ] || { echo "package: FAIL" >&2; exit 1; }
log "contents OK:$summary"
