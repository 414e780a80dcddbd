#!/bin/sh
# Cross-builds kooagent and kooagent-install for aarch64 and armv7 without Docker, using
# Debian's rustc-web toolchain (/usr/bin/cargo + /usr/bin/rustc), the target's std unpacked
# from Debian's libstd-rust-web-dev:<arch> package, and gcc cross linkers; then smoke-tests
# the binaries under qemu-user-static and reports their sizes.
#
#   scripts/cross-build.sh                  # both targets
#   TARGETS=aarch64-unknown-linux-gnu scripts/cross-build.sh
#   SKIP_APT=1 scripts/cross-build.sh       # tools already installed
#
# Needs root and apt-get (Debian 12) for the tool install. Output: target/cross/<triple>/release/.
# Builds one target at a time (the machine is small). armv7 is skipped, not failed, when
# Debian's armhf package lists cannot be fetched (e.g. a mirror sync in progress).
set -eu

here=$(cd "$(dirname "$0")/.." && pwd)
TARGETS=${TARGETS:-"aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf"}
OUT="$here/target/cross"
MAX_SIZE=$((6 * 1024 * 1024))
export DEBIAN_FRONTEND=noninteractive

log() { echo "cross-build: $*"; }
warn() { echo "cross-build: WARNING: $*" >&2; }

# triple -> Debian arch, gcc prefix, qemu binary
deb_arch() {
    case "$1" in
        aarch64-unknown-linux-gnu) echo arm64 ;;
        armv7-unknown-linux-gnueabihf) echo armhf ;;
        *) echo "unsupported target $1" >&2; exit 2 ;;
    esac
}
gnu_prefix() {
    case "$1" in
        aarch64-unknown-linux-gnu) echo aarch64-linux-gnu ;;
        armv7-unknown-linux-gnueabihf) echo arm-linux-gnueabihf ;;
    esac
}
qemu_bin() {
    case "$1" in
        aarch64-unknown-linux-gnu) echo qemu-aarch64-static ;;
        armv7-unknown-linux-gnueabihf) echo qemu-arm-static ;;
    esac
}

# Versions of a package in the apt lists, newest first.
versions() { apt-cache madison "$1" 2>/dev/null | awk -F'|' '{gsub(/ /, "", $2); print $2}' | sort -Vru; }

# apt-get update; a partial failure (mirror sync) is reported, not fatal.
apt_update() {
    if apt-get update -qq >"$OUT/apt-update.log" 2>&1; then
        return 0
    fi
    grep -E '^(E|W):' "$OUT/apt-update.log" >&2 || true
    return 1
}

mkdir -p "$OUT/debs"

if [ "${SKIP_APT:-0}" != 1 ]; then
    [ "$(id -u)" = 0 ] || { echo "cross-build: needs root for apt-get (or SKIP_APT=1)" >&2; exit 1; }
    dpkg --add-architecture arm64
    apt_update || warn "apt-get update reported errors; continuing with the lists apt has"
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
    apt-get install -y -qq --allow-downgrades \
        "rustc-web=$RUST_WEB_VERSION" "cargo-web=$RUST_WEB_VERSION" "libstd-rust-web-dev=$RUST_WEB_VERSION" \
        gcc-aarch64-linux-gnu libc6-dev-arm64-cross \
        gcc-arm-linux-gnueabihf libc6-dev-armhf-cross \
        qemu-user-static python3 >/dev/null
else
    RUST_WEB_VERSION=$(dpkg-query -W -f '${Version}' rustc-web)
fi

CARGO=/usr/bin/cargo
export RUSTC=/usr/bin/rustc
export CARGO_TARGET_DIR="$OUT"
log "$($RUSTC --version), $($CARGO --version)"

# Unpacks the target's std (rlibs only, no dependencies to install) into a private sysroot.
# Prints the sysroot, or nothing when the package is not available in the same version.
target_sysroot() {
    triple=$1
    arch=$(deb_arch "$triple")
    sysroot="$OUT/sysroot-$triple"
    stamp="$sysroot/.version"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$RUST_WEB_VERSION" ]; then
        echo "$sysroot/usr"
        return 0
    fi
    if ! versions "libstd-rust-web-dev:$arch" | grep -qxF "$RUST_WEB_VERSION"; then
        return 0
    fi
    (cd "$OUT/debs" && apt-get download -q "libstd-rust-web-dev:$arch=$RUST_WEB_VERSION" >/dev/null 2>&1) || return 0
    rm -rf "$sysroot"
    mkdir -p "$sysroot"
    dpkg-deb -x "$OUT/debs/libstd-rust-web-dev_$(echo "$RUST_WEB_VERSION" | sed 's/^[0-9]*://')_$arch.deb" "$sysroot"
    echo "$RUST_WEB_VERSION" >"$stamp"
    echo "$sysroot/usr"
}

# Prepares armhf: its lists must load completely, or armv7 is skipped and armhf removed
# again so that apt stays usable for everything else.
prepare_armhf() {
    [ "${SKIP_APT:-0}" = 1 ] && return 0
    dpkg --add-architecture armhf
    if apt_update && versions libstd-rust-web-dev:armhf | grep -qxF "$RUST_WEB_VERSION"; then
        return 0
    fi
    warn "Debian's armhf lists are incomplete or lack libstd-rust-web-dev:armhf $RUST_WEB_VERSION (mirror sync?): skipping armv7"
    dpkg --remove-architecture armhf || true
    apt_update || true
    return 1
}

# Smoke test under qemu: --version; `id --json` and a socket ping once the daemon exists.
smoke() {
    triple=$1
    bin="$OUT/$triple/release/kooagent"
    qemu=$(qemu_bin "$triple")
    prefix="/usr/$(gnu_prefix "$triple")"
    run() { "$qemu" -L "$prefix" "$bin" "$@"; }
    log "$triple: kooagent --version: $(run --version 2>&1 | head -n 1)"
    run --version >/dev/null
    installer_out=$("$qemu" -L "$prefix" "$OUT/$triple/release/kooagent-install" --version)
    log "$triple: $installer_out"
    help=$(run --help 2>&1 || true)
    if echo "$help" | grep -qE '^ +id( |$)'; then
        log "$triple: kooagent id --json: $(run id --json 2>&1 | head -c 300)"
        run id --json >/dev/null
    else
        log "$triple: no \`id\` subcommand yet: skipped"
    fi
    if ! echo "$help" | grep -qE '^ +run( |$)'; then
        log "$triple: no \`run\` subcommand yet: socket ping skipped"
        return 0
    fi
    tmp=$(mktemp -d)
    mkdir -p "$tmp/state"
    chmod 0700 "$tmp/state"
    cat >"$tmp/agent.toml" <<EOF
[agent]
state_dir = "$tmp/state"

[socket]
path = "$tmp/agent.sock"
group = "$(id -gn)"

[identity]
metadata = false
EOF
    # Not through the run() function: a backgrounded function is a subshell, and SIGTERM
    # would reach that shell instead of the agent.
    "$qemu" -L "$prefix" "$bin" run --config "$tmp/agent.toml" --log-level debug >"$tmp/run.log" 2>&1 &
    pid=$!
    ok=0
    python3 - "$tmp/agent.sock" <<'EOF' && ok=1
import socket, sys, time
path = sys.argv[1]
deadline = time.time() + 60  # qemu is slow
while True:
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(path)
        break
    except OSError:
        if time.time() > deadline:
            sys.exit("socket never came up")
        time.sleep(0.2)
s.sendall(b'{"v":1,"id":1,"op":"ping"}\n')
line = s.makefile("rb").readline().decode()
print("ping ->", line.strip())
sys.exit(0 if '"ok":true' in line.replace(" ", "") else 1)
EOF
    kill -TERM "$pid" 2>/dev/null || true
    rc=0
    wait "$pid" || rc=$?
    if [ "$ok" != 1 ] || [ "$rc" != 0 ]; then
        cat "$tmp/run.log" >&2
        rm -rf "$tmp"
        echo "cross-build: $triple: smoke test failed (ping ok=$ok, exit $rc after SIGTERM)" >&2
        return 1
    fi
    rm -rf "$tmp"
    log "$triple: run + ping + SIGTERM OK"
}

summary=""
for triple in $TARGETS; do
    if [ "$triple" = armv7-unknown-linux-gnueabihf ] && ! prepare_armhf; then
        summary="$summary\n  $triple: SKIPPED (armhf packages unavailable)"
        continue
    fi
    sysroot=$(target_sysroot "$triple")
    if [ -z "$sysroot" ]; then
        if [ "$triple" = armv7-unknown-linux-gnueabihf ]; then
            warn "no libstd-rust-web-dev:armhf $RUST_WEB_VERSION: skipping armv7"
            summary="$summary\n  $triple: SKIPPED (no matching std)"
            continue
        fi
        echo "cross-build: no libstd-rust-web-dev for $triple in version $RUST_WEB_VERSION" >&2
        exit 1
    fi
    gp=$(gnu_prefix "$triple")
    env_triple=$(echo "$triple" | tr 'a-z-' 'A-Z_')
    cc_triple=$(echo "$triple" | tr '-' '_')
    log "building $triple"
    start=$(date +%s)
    env "CARGO_TARGET_${env_triple}_LINKER=$gp-gcc" \
        "CARGO_TARGET_${env_triple}_RUSTFLAGS=--sysroot=$sysroot -C target-feature=+crt-static" \
        "CC_${cc_triple}=$gp-gcc" "AR_${cc_triple}=$gp-ar" \
        "$CARGO" build --release --locked --target "$triple" -p kooagent -p kooagent-install
    log "$triple built in $(($(date +%s) - start)) s"
    # Shipped static (glibc linked in, as scripts/release.sh does for the host): the
    # --target build keeps the flag away from the host's proc-macro crates.
    if "$gp-readelf" -l "$OUT/$triple/release/kooagent" | grep -q "program interpreter"; then
        echo "cross-build: $triple: kooagent is not statically linked" >&2
        exit 1
    fi
    smoke "$triple"
    for b in kooagent kooagent-install; do
        f="$OUT/$triple/release/$b"
        "$gp-strip" -o "$OUT/$triple/release/$b.stripped" "$f"
        size=$(stat -c %s "$OUT/$triple/release/$b.stripped")
        mib=$(awk -v s="$size" 'BEGIN { printf "%.2f", s / 1048576 }')
        line="  $triple: $b $size bytes ($mib MiB) stripped"
        if [ "$b" = kooagent ] && [ "$size" -gt "$MAX_SIZE" ]; then
            line="$line  ABOVE the 6 MiB target"
            warn "$triple: kooagent is $mib MiB > 6 MiB"
        fi
        summary="$summary\n$line"
    done
done
log "summary:"
printf "%b\n" "$summary"
