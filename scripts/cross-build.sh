#!/bin/sh
# Builds the shipped kooagent and kooagent-install for every board a seller ships, static
# (glibc linked in), one target at a time, then runs the same end-to-end checks on each
# under qemu-user (scripts/cross-test.sh) and prints a table: linkage, stripped sizes,
# build time.
#
#   scripts/cross-build.sh                       # all four targets
#   TARGETS="armv7-unknown-linux-gnueabihf" scripts/cross-build.sh
#   PROFILE=cross-test scripts/cross-build.sh    # CI: quicker to build (no LTO), same code
#   SKIP_APT=1 TEST=0 scripts/cross-build.sh     # tools already installed; no qemu test
#   UNIT_TESTS=1 scripts/cross-build.sh          # also the word_size_* unit tests (32-bit
#                                                # hazards) built for the target, under qemu
#
# Targets and toolchains, per target, first that applies:
#   x86_64-unknown-linux-gnu       the rustup toolchain (the host's)         static-pie
#   aarch64-unknown-linux-gnu      rustup if the target is installed, else   static
#   armv7-unknown-linux-gnueabihf    Debian's rustc-web: aarch64 with the    static
#   riscv64gc-unknown-linux-gnu      prebuilt std (libstd-rust-web-dev:arm64),  static
#                                    armv7 and riscv64 with std built from
#                                    rust-web-src (-Zbuild-std; no armhf or
#                                    riscv64 package index needed)
# static-pie needs the target's support in rustc: x86_64 has it; aarch64, armv7 and
# riscv64 gnu do not (rustc 1.96), so they are static, non-PIE executables (ET_EXEC).
# USE_RUSTUP=0 forces Debian's toolchain; sellers with Docker can use cross.toml instead.
#
# Needs root and apt-get (Debian 12) for the tool install. Output:
# target/cross/<triple>/<profile>/{kooagent,kooagent-install}[.stripped].
set -eu

here=$(cd "$(dirname "$0")/.." && pwd)
TARGETS=${TARGETS:-"x86_64-unknown-linux-gnu aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf riscv64gc-unknown-linux-gnu"}
PROFILE=${PROFILE:-release}
# cargo puts the dev profile's output in debug/.
profile_dir=$PROFILE
[ "$PROFILE" != dev ] || profile_dir=debug
OUT="$here/target/cross"
MAX_SIZE=$((6 * 1024 * 1024))
export DEBIAN_FRONTEND=noninteractive

log() { echo "cross-build: $*"; }
warn() { echo "cross-build: WARNING: $*" >&2; }

# triple -> Debian arch, gcc prefix
deb_arch() {
    case "$1" in
        x86_64-unknown-linux-gnu) echo amd64 ;;
        aarch64-unknown-linux-gnu) echo arm64 ;;
        armv7-unknown-linux-gnueabihf) echo armhf ;;
        riscv64gc-unknown-linux-gnu) echo riscv64 ;;
        *) echo "cross-build: unsupported target $1" >&2; exit 2 ;;
    esac
}
gnu_prefix() {
    case "$1" in
        x86_64-unknown-linux-gnu) echo x86_64-linux-gnu ;;
        aarch64-unknown-linux-gnu) echo aarch64-linux-gnu ;;
        armv7-unknown-linux-gnueabihf) echo arm-linux-gnueabihf ;;
        riscv64gc-unknown-linux-gnu) echo riscv64-linux-gnu ;;
    esac
}

# Versions of a package in the apt lists, newest first.
versions() { apt-cache madison "$1" 2>/dev/null | awk -F'|' '{gsub(/ /, "", $2); print $2}' | sort -Vru; }

mkdir -p "$OUT/debs"

if [ "${SKIP_APT:-0}" != 1 ]; then
    [ "$(id -u)" = 0 ] || { echo "cross-build: needs root for apt-get (or SKIP_APT=1)" >&2; exit 1; }
    # arm64 only for its prebuilt std; armhf/riscv64 need no foreign package index.
    dpkg --add-architecture arm64
    apt-get -o DPkg::Lock::Timeout=600 update -qq >"$OUT/apt-update.log" 2>&1 ||
        { grep -E '^(E|W):' "$OUT/apt-update.log" >&2 || true; warn "apt-get update reported errors; continuing with the lists apt has"; }
    # The toolchain version: the newest rustc-web whose arm64 std is also available.
    host_versions=$(versions rustc-web)
    RUST_WEB_VERSION=${RUST_WEB_VERSION:-}
    if [ -z "$RUST_WEB_VERSION" ]; then
        for v in $(versions libstd-rust-web-dev:arm64); do
            if echo "$host_versions" | grep -qxF "$v"; then RUST_WEB_VERSION=$v; break; fi
        done
    fi
    [ -n "$RUST_WEB_VERSION" ] || { echo "cross-build: no rustc-web version available for amd64 and arm64" >&2; exit 1; }
    log "rustc-web $RUST_WEB_VERSION"
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq --allow-downgrades \
        "rustc-web=$RUST_WEB_VERSION" "cargo-web=$RUST_WEB_VERSION" \
        "libstd-rust-web-dev=$RUST_WEB_VERSION" "rust-web-src=$RUST_WEB_VERSION" \
        gcc-aarch64-linux-gnu libc6-dev-arm64-cross \
        gcc-arm-linux-gnueabihf libc6-dev-armhf-cross \
        gcc-riscv64-linux-gnu libc6-dev-riscv64-cross \
        binutils qemu-user-static python3 >/dev/null
else
    RUST_WEB_VERSION=$(dpkg-query -W -f '${Version}' rustc-web 2>/dev/null || true)
fi

# Unpacks the target's prebuilt std (rlibs only) into a private sysroot. Prints the
# sysroot, or nothing when the package is not available in the same version.
target_sysroot() {
    triple=$1
    arch=$(deb_arch "$triple")
    sysroot="$OUT/sysroot-$triple"
    stamp="$sysroot/.version"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$RUST_WEB_VERSION" ]; then
        echo "$sysroot/usr"
        return 0
    fi
    versions "libstd-rust-web-dev:$arch" | grep -qxF "$RUST_WEB_VERSION" || return 0
    (cd "$OUT/debs" && apt-get download -q "libstd-rust-web-dev:$arch=$RUST_WEB_VERSION" >/dev/null 2>&1) || return 0
    rm -rf "$sysroot"
    mkdir -p "$sysroot"
    dpkg-deb -x "$OUT/debs/libstd-rust-web-dev_$(echo "$RUST_WEB_VERSION" | sed 's/^[0-9]*://')_$arch.deb" "$sysroot"
    echo "$RUST_WEB_VERSION" >"$stamp"
    echo "$sysroot/usr"
}

rustup_has() {
    [ "${USE_RUSTUP:-1}" != 0 ] && command -v rustup >/dev/null 2>&1 &&
        rustup target list --installed 2>/dev/null | grep -qxF "$1"
}

# The toolchain for one target: sets $cargo, $flags, $extra, $linker_env, $how.
build_env() {
    triple=$1
    gp=$(gnu_prefix "$triple")
    env_triple=$(echo "$triple" | tr 'a-z-' 'A-Z_')
    cc_triple=$(echo "$triple" | tr '-' '_')
    flags="-C target-feature=+crt-static"
    cargo=cargo
    extra=""
    if [ "$triple" = x86_64-unknown-linux-gnu ] || rustup_has "$triple"; then
        how="rustup $(rustc --version | cut -d' ' -f2)"
    else
        cargo=/usr/bin/cargo
        export RUSTC=/usr/bin/rustc
        sysroot=$(target_sysroot "$triple")
        if [ -n "$sysroot" ]; then
            flags="$flags --sysroot=$sysroot"
            how="Debian rustc-web $($RUSTC --version | cut -d' ' -f2), prebuilt std"
        else
            [ -d /usr/lib/rustlib/src/rust/library ] ||
                { echo "cross-build: $triple needs rust-web-src (std source) or rustup's target" >&2; exit 1; }
            # std from source with the same compiler: a stable compiler allows -Z here.
            export RUSTC_BOOTSTRAP=1
            extra="-Zbuild-std=std,panic_abort"
            how="Debian rustc-web $($RUSTC --version | cut -d' ' -f2), -Zbuild-std"
        fi
    fi
    linker_env=""
    [ "$triple" = x86_64-unknown-linux-gnu ] || linker_env="CARGO_TARGET_${env_triple}_LINKER=$gp-gcc"
}

build() {
    triple=$1
    build_env "$triple"
    # shellcheck disable=SC2086
    env $linker_env "CARGO_TARGET_${env_triple}_RUSTFLAGS=$flags" \
        "CC_${cc_triple}=$gp-gcc" "AR_${cc_triple}=$gp-ar" CARGO_TARGET_DIR="$OUT" \
        nice -n "${NICE:-15}" "$cargo" build --profile "$PROFILE" --locked --target "$triple" $extra \
        -p kooagent -p kooagent-install
    unset RUSTC RUSTC_BOOTSTRAP
}

# The 32-bit hazard tests (word_size_*) of the agent's library, built for the target and
# run under qemu (cargo's runner).
unit_tests() {
    triple=$1
    env_triple=$(echo "$triple" | tr 'a-z-' 'A-Z_')
    case "$triple" in
        aarch64-*) qemu=qemu-aarch64-static ;;
        armv7-*) qemu=qemu-arm-static ;;
        riscv64*) qemu=qemu-riscv64-static ;;
    esac
    build_env "$triple"
    # shellcheck disable=SC2086
    env $linker_env "CARGO_TARGET_${env_triple}_RUSTFLAGS=$flags" \
        "CARGO_TARGET_${env_triple}_RUNNER=$qemu" \
        "CC_${cc_triple}=$gp-gcc" "AR_${cc_triple}=$gp-ar" CARGO_TARGET_DIR="$OUT" \
        nice -n "${NICE:-15}" "$cargo" test --profile "$PROFILE" --locked --target "$triple" ${extra:+$extra,test} \
        -p kooagent --lib word_size
    unset RUSTC RUSTC_BOOTSTRAP
}

# CPU seconds (user + system) used so far by this shell's finished children: the build's
# CPU time, which a shared machine's load does not inflate the way it does the wall time.
# `times` runs in this shell (a $(…) subshell would report its own, childless, times): call
# it as a plain command, then read the file.
cpu_mark() { times >"$OUT/.times"; }
cpu_secs() {
    sed -n 2p "$OUT/.times" | awk '{ t = 0; for (i = 1; i <= 2; i++) { split($i, a, /[ms]/); t += a[1] * 60 + a[2] } printf "%d", t }'
}
loadavg() { cut -d' ' -f1 /proc/loadavg; }

readelf_for() { if command -v "$1-readelf" >/dev/null 2>&1; then echo "$1-readelf"; else echo readelf; fi; }

summary="  target                          linkage     kooagent (stripped)  kooagent-install  build: wall, CPU (load avg. at start/end)"
for triple in $TARGETS; do
    gp=$(gnu_prefix "$triple")
    dir="$OUT/$triple/$profile_dir"
    log "building $triple ($PROFILE)"
    start=$(date +%s)
    cpu_mark
    cpu0=$(cpu_secs)
    load0=$(loadavg)
    build "$triple"
    secs=$(($(date +%s) - start))
    cpu_mark
    cpu=$(($(cpu_secs) - cpu0))
    load1=$(loadavg)
    log "$triple built in $secs s wall, $cpu s CPU (load $load0 -> $load1) with $how"
    re=$(readelf_for "$gp")
    # Shipped static: a program interpreter would tie it to the board's libc.
    for b in kooagent kooagent-install; do
        if "$re" -l "$dir/$b" | grep -q "program interpreter"; then
            echo "cross-build: $triple: $b is not statically linked" >&2
            exit 1
        fi
    done
    case "$("$re" -h "$dir/kooagent" | awk '/Type:/ { print $2 }')" in
        DYN) linkage=static-pie ;;
        *) linkage=static ;;
    esac
    line=$(printf '  %-31s %-11s' "$triple" "$linkage")
    for b in kooagent kooagent-install; do
        strip=$gp-strip
        command -v "$strip" >/dev/null 2>&1 || strip=strip
        "$strip" -o "$dir/$b.stripped" "$dir/$b"
        size=$(stat -c %s "$dir/$b.stripped")
        mib=$(awk -v s="$size" 'BEGIN { printf "%.2f MiB", s / 1048576 }')
        line="$line $(printf '%-20s' "$mib")"
        if [ "$b" = kooagent ] && [ "$size" -gt "$MAX_SIZE" ]; then
            warn "$triple: kooagent is $mib > 6 MiB"
        fi
    done
    summary="$summary
$line ${secs} s, ${cpu} s CPU ($load0/$load1)"
    if [ "${TEST:-1}" != 0 ]; then
        start=$(date +%s)
        PROFILE=$PROFILE bash "$here/scripts/cross-test.sh" "$triple" "$dir/kooagent"
        log "$triple: qemu test in $(($(date +%s) - start)) s"
    fi
    if [ "${UNIT_TESTS:-0}" = 1 ] && [ "$triple" != x86_64-unknown-linux-gnu ]; then
        start=$(date +%s)
        unit_tests "$triple"
        log "$triple: word_size unit tests under qemu in $(($(date +%s) - start)) s"
    fi
done
log "summary ($PROFILE profile):"
echo "$summary"
