#!/bin/sh
# Starts systemd/kooagent.service under a real systemd: boots a throwaway container with
# systemd-nspawn (the host's /usr read-only, its own /etc, /run and /var, a private network
# with loopback only) whose multi-user.target wants the unit as shipped (only the binary's
# path changed), then checks:
#   - the unit is active: `kooagent prestart` (ExecStartPre=+) ran, then the agent;
#   - the main process runs as kooagent with no capability at all and no_new_privs;
#   - through its socket it reports the device code root computes reading everything
#     itself, although the identity files are root-only (mode 0400): the hand-over works
#     under PrivateUsers=/ProcSubset=pid;
#   - its state is in /var/lib/kooagent (StateDirectory=, the packaged default paths);
#   - reload keeps it running, stop ends it cleanly (Result=success);
#   - `systemd-analyze security` on the running unit (the online score) <= $MAX_EXPOSURE.
#
#   scripts/check-systemd.sh [BIN]    # BIN: a kooagent binary (default target/debug/kooagent)
#
# Needs root and systemd-nspawn (Debian: systemd-container, installed here with apt when
# missing). PID 1 of this machine need not be systemd. Bounded: the container dies after
# $TIMEOUT seconds whatever happens.
set -eu

here=$(cd "$(dirname "$0")/.." && pwd)
MAX_EXPOSURE=${MAX_EXPOSURE:-1.2}
TIMEOUT=${TIMEOUT:-180}
bin=${1:-$here/target/debug/kooagent}
[ -x "$bin" ] || { echo "check-systemd: $bin missing (cargo build -p kooagent)" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "check-systemd: needs root" >&2; exit 1; }
if ! command -v systemd-nspawn >/dev/null 2>&1; then
    echo "check-systemd: installing systemd-container (for systemd-nspawn)"
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq systemd-container >/dev/null
fi

tmp=$(mktemp -d)
nspawn=
init=
cleanup() {
    # SIGKILL to the container's PID 1 ends everything in it at once; nspawn then exits.
    [ -z "$init" ] || kill -KILL "$init" 2>/dev/null || true
    [ -z "$nspawn" ] || wait "$nspawn" 2>/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT INT TERM
fail() {
    echo "check-systemd: FAIL: $*" >&2
    [ -n "$init" ] && nsenter -t "$init" -a journalctl -u kooagent --no-pager 2>&1 | tail -n 30 >&2
    exit 1
}

# The container's root: merged-/usr symlinks, the host's /usr bound read-only at boot.
r="$tmp/root"
mkdir -p "$r/usr" "$r/etc/kooagent" "$r/etc/systemd/system/multi-user.target.wants" \
    "$r/var/lib" "$r/var/log" "$r/run" "$r/tmp" "$r/proc" "$r/sys" "$r/dev" "$r/root" "$r/opt/kooagent"
for d in bin sbin lib lib64; do [ ! -L "/$d" ] || ln -s "usr/$d" "$r/$d"; done
cp /usr/lib/os-release "$r/etc/os-release"
echo kooagent-check >"$r/etc/hostname"
: >"$r/etc/machine-id"
cp /etc/nsswitch.conf "$r/etc/"
uid=998
cat >"$r/etc/passwd" <<EOF
root:x:0:0:root:/root:/bin/sh
kooagent:x:$uid:$uid:KooAgent daemon:/nonexistent:/usr/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
EOF
printf 'root:x:0:\nkooagent:x:%s:\nnogroup:x:65534:\n' "$uid" >"$r/etc/group"
printf 'root:*:1::::::\nkooagent:!:1::::::\nnobody:!:1::::::\n' >"$r/etc/shadow"
chmod 0640 "$r/etc/shadow"

cp "$bin" "$r/opt/kooagent/kooagent"
chmod 0755 "$r/opt/kooagent/kooagent"
sed 's|/usr/bin/kooagent|/opt/kooagent/kooagent|g' "$here/systemd/kooagent.service" \
    >"$r/etc/systemd/system/kooagent.service"
ln -s ../kooagent.service "$r/etc/systemd/system/multi-user.target.wants/kooagent.service"

# Identity sources only root can read; the hand-over goes to the container's /run.
f="$r/opt/fakeroot"
mkdir -p "$f/etc" "$f/sys/class/dmi/id" "$f/proc"
echo 0f1e2d3c4b5a69788796a5b4c3d2e1f0 >"$f/etc/machine-id"
echo 4C4C4544-0042-3510-8052-B4C04F4E4E32 >"$f/sys/class/dmi/id/product_uuid"
echo BSN-12345 >"$f/sys/class/dmi/id/board_serial"
printf 'vendor_id\t: GenuineIntel\nmodel name\t: Intel Xeon\n' >"$f/proc/cpuinfo"
chmod 0400 "$f/sys/class/dmi/id/product_uuid" "$f/sys/class/dmi/id/board_serial" "$f/proc/cpuinfo"
ln -s /run "$f/run"
cat >"$r/etc/kooagent/agent.toml" <<EOF
[agent]
product_id = "systemd-check"

[identity]
root = "/opt/fakeroot"
metadata = false
EOF
chown "0:$uid" "$r/etc/kooagent/agent.toml"
chmod 0640 "$r/etc/kooagent/agent.toml"

timeout "$TIMEOUT" systemd-nspawn --quiet -D "$r" --bind-ro=/usr --private-network --register=no --keep-unit \
    --boot systemd.unit=multi-user.target </dev/null >"$tmp/boot.log" 2>&1 &
nspawn=$!
# The container's PID 1 (systemd): timeout's child is systemd-nspawn, whose child it is.
i=0
while [ -z "$init" ]; do
    i=$((i + 1))
    [ $i -le 100 ] || fail "the container did not start"
    sleep 0.1
    n=$(pgrep -P "$nspawn" -x systemd-nspawn || true)
    [ -z "$n" ] || init=$(pgrep -P "$n" | head -n 1 || true)
done
inside() { nsenter -t "$init" -a "$@"; }
echo "check-systemd: $(inside /usr/lib/systemd/systemd --version | head -n 1) booted in a container"

i=0
until [ "$(inside systemctl is-active kooagent 2>/dev/null)" = active ]; do
    i=$((i + 1))
    [ $i -le 300 ] || fail "kooagent.service not active: $(inside systemctl is-active kooagent 2>&1)"
    case "$(inside systemctl show -p NRestarts --value kooagent 2>/dev/null)" in
        [1-9]*) fail "kooagent.service failed and is being restarted" ;;
    esac
    sleep 0.1
done
inside systemctl show -p ExecStartPre kooagent | grep -q 'status=0' || fail "prestart did not succeed"
pid=$(inside systemctl show -p MainPID --value kooagent)
status=$(inside cat "/proc/$pid/status")
echo "$status" | awk '/^Uid:/ { print $2, $3, $4, $5 }' | grep -qx "$uid $uid $uid $uid" ||
    fail "main process not kooagent: $(echo "$status" | grep '^Uid:')"
for c in CapInh CapPrm CapEff CapBnd CapAmb; do
    v=$(echo "$status" | awk -v k="$c:" '$1 == k { print $2 }')
    [ "$v" = 0000000000000000 ] || fail "main process has $c $v (want none)"
done
echo "$status" | grep -q '^NoNewPrivs:[[:space:]]*1' || fail "main process without no_new_privs"
echo "check-systemd: kooagent.service active; main process kooagent ($uid), no capability, no_new_privs"

code() { sed -n 's/.*"code": "\(.*\)".*/\1/p'; }
want=$(inside /opt/kooagent/kooagent id --local --json | code)
got=$(inside /opt/kooagent/kooagent id --json | code)
[ -n "$got" ] && [ "$got" = "$want" ] ||
    fail "the agent's device code '$got' differs from root's '$want' (hand-over not used?)"
echo "check-systemd: the agent reports root's device code $got (root-only sources via prestart)"
inside test -f /var/lib/kooagent/identity.json || fail "no state in /var/lib/kooagent"

exposure=$(inside systemd-analyze security kooagent --no-pager 2>&1 |
    sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p' | tail -n 1)
[ -n "$exposure" ] || fail "no exposure from systemd-analyze security"
awk -v e="$exposure" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(e + 0 <= m + 0) }' ||
    fail "exposure of the running unit $exposure > $MAX_EXPOSURE"
echo "check-systemd: exposure of the running unit $exposure <= $MAX_EXPOSURE"

inside systemctl reload kooagent || fail "reload"
sleep 0.5
[ "$(inside systemctl show -p MainPID --value kooagent)" = "$pid" ] || fail "reload restarted the agent"
inside systemctl stop kooagent || fail "stop"
inside systemctl show -p Result --value kooagent | grep -qx success ||
    fail "stop: Result=$(inside systemctl show -p Result --value kooagent)"
echo "check-systemd: reload kept pid $pid; stop: Result=success"
echo "check-systemd: OK"
