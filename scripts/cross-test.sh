#!/usr/bin/env bash
# The same end-to-end checks for every target, run under qemu-user: a byte-order or
# word-size bug in a build shows as a different answer than on x86_64.
#
#   scripts/cross-test.sh TRIPLE [BIN]     # BIN: the target's kooagent (default:
#                                          # target/cross/TRIPLE/release/kooagent)
#
# The seller side (key, license, freeze token) and the reference device code come from a
# host (x86_64) build: $HOST_BIN (kooagent, default target/release/kooagent, else
# target/debug) and $HOST_SELLER (kooagent-seller, default beside HOST_BIN, else
# target/release, else target/debug).
# Steps, each bounded: `kooagent id` (must equal the host's code for the same fake machine),
# start the agent, install a license issued on x86_64 (valid until 2040, a limit past 2^32)
# and check it, record usage (decimals) and read the ledger back, freeze with a token, then
# restart the agent and read ledger and freeze state back from disk. Prints the agent's idle
# RSS (the qemu process: emulator included) and the time each step took.
#
# QEMU= runs BIN natively (the host's own target). Needs python3 and qemu-user-static.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
triple=${1:?usage: cross-test.sh TRIPLE [BIN]}
bin=${2:-$here/target/cross/$triple/${PROFILE:-release}/kooagent}
[ -x "$bin" ] || { echo "cross-test: $bin missing (run scripts/cross-build.sh first)" >&2; exit 1; }
if [ -z "${HOST_BIN:-}" ]; then
    HOST_BIN=$here/target/release/kooagent
    [ -x "$HOST_BIN" ] || HOST_BIN=$here/target/debug/kooagent
fi
[ -x "$HOST_BIN" ] || { echo "cross-test: no host kooagent (cargo build -p kooagent)" >&2; exit 1; }
if [ -z "${HOST_SELLER:-}" ]; then
    for HOST_SELLER in "$(dirname "$HOST_BIN")/kooagent-seller" "$here/target/release/kooagent-seller" \
        "$here/target/debug/kooagent-seller"; do
        [ -x "$HOST_SELLER" ] && break
    done
fi
[ -x "$HOST_SELLER" ] || { echo "cross-test: no host kooagent-seller (cargo build -p kooagent-seller)" >&2; exit 1; }

if [ -z "${QEMU+set}" ]; then
    case "$triple" in
        x86_64-*) QEMU=qemu-x86_64-static ;;
        aarch64-*) QEMU=qemu-aarch64-static ;;
        armv7-*) QEMU=qemu-arm-static ;;
        riscv64*) QEMU=qemu-riscv64-static ;;
        *) echo "cross-test: unknown target $triple" >&2; exit 2 ;;
    esac
fi
# The binaries are static: no -L sysroot needed.
target() { ${QEMU:+"$QEMU"} "$bin" --config "$tmp/agent.toml" "$@"; }
host() { "$HOST_BIN" "$@"; }
seller() { "$HOST_SELLER" "$@"; }

log() { echo "cross-test: $triple: $*"; }
fail() {
    echo "cross-test: $triple: FAIL: $*" >&2
    [ -f "$tmp/run.log" ] && tail -n 30 "$tmp/run.log" >&2
    exit 1
}
# jq-less JSON field access: json FILE EXPR (EXPR in Python over `v`).
json() { python3 -c 'import json,sys; v=json.load(open(sys.argv[1])); print(eval(sys.argv[2]))' "$1" "$2"; }
t0=$(date +%s%N)
step() { # name: prints the time since the last step
    local now
    now=$(date +%s%N)
    log "$1 ($(((now - t0) / 1000000)) ms)"
    t0=$now
}

tmp=$(mktemp -d)
pid=
cleanup() {
    [ -n "$pid" ] && kill -KILL "$pid" 2>/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT INT TERM

# A fixed fake machine: the device code must be the same on every target.
root="$tmp/root"
mkdir -p "$root/etc" "$root/sys/class/dmi/id" "$root/proc"
echo 0f1e2d3c4b5a69788796a5b4c3d2e1f0 >"$root/etc/machine-id"
echo 4C4C4544-0042-3510-8052-B4C04F4E4E32 >"$root/sys/class/dmi/id/product_uuid"
echo BSN-12345 >"$root/sys/class/dmi/id/board_serial"
printf 'vendor_id\t: GenuineIntel\nmodel name\t: Intel Xeon\n' >"$root/proc/cpuinfo"

seller keygen --out "$tmp/seller.key" >/dev/null
mkdir -p "$tmp/state"
chmod 0700 "$tmp/state"
cat >"$tmp/agent.toml" <<EOF
[agent]
product_id = "boards-test"
state_dir = "$tmp/state"

[socket]
path = "$tmp/agent.sock"
group = "$(id -gn)"

[identity]
root = "$root"
metadata = false

[license]
trusted_keys = ["$(cat "$tmp/seller.key.pub")"]

[usage.meters.cpu]
instance_id = "inst-boards"
EOF

# 1. The device code: the target's equals the host's.
target id --local --json >"$tmp/id.json" || fail "kooagent id"
code=$(json "$tmp/id.json" 'v["code"]')
host --config "$tmp/agent.toml" id --local --json >"$tmp/id-host.json"
[ "$code" = "$(json "$tmp/id-host.json" 'v["code"]')" ] ||
    fail "device code $code differs from the host's $(json "$tmp/id-host.json" 'v["code"]')"
step "kooagent id: $code (same as x86_64)"

start_agent() {
    ${QEMU:+"$QEMU"} "$bin" --config "$tmp/agent.toml" run >>"$tmp/run.log" 2>&1 &
    pid=$!
    python3 - "$tmp/agent.sock" <<'EOF' || fail "the agent's socket never answered"
import socket, sys, time
deadline = time.time() + 60  # qemu is slow
while True:
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(sys.argv[1])
        s.sendall(b'{"v":1,"id":1,"op":"ping"}\n')
        if b'"ok":true' in s.makefile("rb").readline().replace(b" ", b""):
            break
    except OSError:
        pass
    if time.time() > deadline:
        sys.exit(1)
    time.sleep(0.2)
EOF
}
stop_agent() {
    kill -TERM "$pid"
    local rc=0 i=0
    while kill -0 "$pid" 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
    wait "$pid" || rc=$?
    pid=
    [ "$rc" = 0 ] || fail "the agent exited $rc after SIGTERM"
}

# 2. Start the agent; its answer to `id` is the same code.
start_agent
step "agent started"
target id --json >"$tmp/id2.json" || fail "kooagent id through the agent"
[ "$(json "$tmp/id2.json" 'v["code"]')" = "$code" ] || fail "the agent's code differs"
sleep 2
rss_kib=$(awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status")
step "idle RSS ${rss_kib} KiB (the ${QEMU:-native} process)"

# 3. A license issued on x86_64: valid past 2038, a limit past 2^32.
seller issue --key "$tmp/seller.key" --device-code "$code" --product boards-test \
    --instance inst-boards --not-after 2040-06-01T00:00:00Z --limit users=4294967297 \
    --id L-BOARDS --out "$tmp/l.lic"
target license install "$tmp/l.lic" >/dev/null || fail "license install"
target license check boards-test --json >"$tmp/check.json" || fail "license check: $(cat "$tmp/check.json")"
[ "$(json "$tmp/check.json" 'v["state"]')" = valid ] || fail "license state: $(cat "$tmp/check.json")"
grep -q '2040-06-01T00:00:00Z' "$tmp/check.json" || fail "not_after lost: $(cat "$tmp/check.json")"
grep -q '4294967297' "$tmp/check.json" || fail "limit lost: $(cat "$tmp/check.json")"
step "license issued on x86_64 installed and valid until 2040"

# 4. Usage with decimals, read back from the ledger.
at=$(date -u +%Y-%m-%dT%H:%M:%SZ)
target usage record cpu 1.5 --at "$at" >/dev/null || fail "usage record"
target usage record cpu 0.0001 --at "$at" >/dev/null || fail "usage record"
target usage record cpu 12345678.000000001 --at "$at" >/dev/null || fail "usage record"
want_usage=12345679.500100001
target usage status --json >"$tmp/usage.json" || fail "usage status"
[ "$(json "$tmp/usage.json" 'v["open"]["cpu"]["value"]')" = "$want_usage" ] ||
    fail "usage read back: $(json "$tmp/usage.json" 'v["open"]')"
step "usage recorded and read back: $want_usage"

# 5. Freeze with a token signed on x86_64.
seller token --key "$tmp/seller.key" --license L-BOARDS --action freeze --seq 1 \
    --device-code "$code" --reason overdue --out "$tmp/f.tok"
target token apply "$tmp/f.tok" >/dev/null || fail "token apply"
rc=0
target license check boards-test --json >"$tmp/check.json" || rc=$?
[ "$rc" = 2 ] && [ "$(json "$tmp/check.json" 'v["state"]')" = frozen ] ||
    fail "after freeze: exit $rc, $(cat "$tmp/check.json")"
step "frozen by a token"

# 6. Restart: ledger and freeze state read back from disk.
stop_agent
step "stopped on SIGTERM"
start_agent
target usage status --json >"$tmp/usage.json" || fail "usage status after restart"
[ "$(json "$tmp/usage.json" 'v["open"]["cpu"]["value"]')" = "$want_usage" ] ||
    fail "usage after restart: $(json "$tmp/usage.json" 'v["open"]')"
rc=0
target license check boards-test --json >"$tmp/check.json" || rc=$?
[ "$rc" = 2 ] || fail "freeze lost on restart: $(cat "$tmp/check.json")"
stop_agent
step "restarted: ledger and freeze read back"
log "OK"
