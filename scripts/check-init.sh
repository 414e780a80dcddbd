#!/bin/sh
# Checks the init scripts for systems without systemd.
#   - both (packaging/sysv/kooagent.init, packaging/openrc/kooagent.openrc): shell syntax;
#   - the SysV script, for real: start, status, reload, stop against a throwaway system in
#     private mount and PID namespaces (nothing outside them is touched; every process dies
#     with the namespace). There the `kooagent` user exists, the configuration keeps the
#     packaged defaults for paths, and the identity sources are root-only (mode 0400). The
#     script must run `kooagent prestart` as root and then the agent as kooagent with no
#     capability (empty bounding set, no_new_privs), and that agent must compute the same
#     device code as root reading everything itself, and keep its state in /var/lib/kooagent.
#
#   scripts/check-init.sh [BIN]      # BIN: a kooagent binary (default target/debug/kooagent)
#
# The run needs root, unshare(1) and setpriv(1) (util-linux) and python3; without them only the syntax
# is checked (and the script says so). OpenRC's openrc-run is not installed here: its script
# gets the syntax check only.
set -eu

here=$(cd "$(dirname "$0")/.." && pwd)
sysv="$here/packaging/sysv/kooagent.init"
openrc="$here/packaging/openrc/kooagent.openrc"

if [ "${1:-}" != --inside ]; then
    for s in "$sysv" "$openrc"; do
        sh -n "$s" || { echo "check-init: FAIL: $s has shell syntax errors" >&2; exit 1; }
    done
    echo "check-init: syntax OK (sysv, openrc)"
    bin=$(cd "$(dirname "${1:-$here/target/debug/kooagent}")" && pwd)/$(basename "${1:-kooagent}")
    [ -x "$bin" ] || { echo "check-init: FAIL: $bin missing (cargo build -p kooagent)" >&2; exit 1; }
    if [ "$(id -u)" != 0 ] || ! command -v unshare >/dev/null 2>&1 ||
        ! command -v setpriv >/dev/null 2>&1 || ! command -v python3 >/dev/null 2>&1; then
        echo "check-init: SKIPPED the SysV start/stop run (needs root, unshare, setpriv, python3)"
        exit 0
    fi
    # timeout: bounded even if the agent never answers; the PID namespace kills the rest.
    # PID 1 in there reaps: the daemonized agent is reparented to it, and an unreaped agent
    # would stay a zombie that `kill -0` still finds.
    exec timeout 120 unshare --mount --propagation private --pid --fork --mount-proc -- \
        python3 -c '
import os, sys
child = os.fork()
if child == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
while True:
    pid, status = os.wait()
    if pid == child:
        sys.exit(os.waitstatus_to_exitcode(status))
' sh "$0" --inside "$bin"
fi

# Inside the namespaces.
bin=$2
fail() {
    echo "check-init: FAIL: $*" >&2
    exit 1
}
tmp=$(mktemp -d)
trap 'umount -l /etc /run /var/lib 2>/dev/null; rm -rf "$tmp"' EXIT INT TERM
chmod 0755 "$tmp"
mkdir -p "$tmp/bin"
cp "$bin" "$tmp/bin/kooagent"
chmod 0755 "$tmp/bin/kooagent"

# A fake machine whose identity files only root can read.
root="$tmp/root"
mkdir -p "$root/etc" "$root/sys/class/dmi/id" "$root/proc"
echo 0f1e2d3c4b5a69788796a5b4c3d2e1f0 >"$root/etc/machine-id"
echo 4C4C4544-0042-3510-8052-B4C04F4E4E32 >"$root/sys/class/dmi/id/product_uuid"
echo BSN-12345 >"$root/sys/class/dmi/id/board_serial"
printf 'vendor_id\t: GenuineIntel\nmodel name\t: Intel Xeon\n' >"$root/proc/cpuinfo"
chmod 0400 "$root/sys/class/dmi/id/product_uuid" "$root/sys/class/dmi/id/board_serial" "$root/proc/cpuinfo"
# The hand-over file lives under the identity root's /run: the namespace's /run.
ln -s /run "$root/run"

# This system's /etc, with the kooagent user and group, the configuration (paths left at
# their defaults, as the package ships it) and /etc/default/kooagent naming the binary.
cp -a /etc "$tmp/etc"
uid=64950
grep -q "^kooagent:" "$tmp/etc/group" || echo "kooagent:x:$uid:" >>"$tmp/etc/group"
grep -q "^kooagent:" "$tmp/etc/passwd" ||
    echo "kooagent:x:$uid:$uid:KooAgent daemon:/nonexistent:/usr/sbin/nologin" >>"$tmp/etc/passwd"
uid=$(awk -F: '$1 == "kooagent" { print $3 }' "$tmp/etc/passwd")
mkdir -p "$tmp/etc/kooagent" "$tmp/etc/default"
cat >"$tmp/etc/kooagent/agent.toml" <<EOF
[agent]
product_id = "init-check"

[identity]
root = "$root"
metadata = false
EOF
chmod 0644 "$tmp/etc/kooagent/agent.toml"
echo "DAEMON=$tmp/bin/kooagent" >"$tmp/etc/default/kooagent"
mount --bind "$tmp/etc" /etc
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs -o mode=0755 tmpfs /var/lib

init() { sh "$sysv" "$@"; }
agent() { "$tmp/bin/kooagent" "$@"; }

out=$(init start 2>&1) || fail "start: $out"
echo "check-init: start: $out"
pid=$(cat /run/kooagent/kooagent.pid) || fail "no pidfile"
status=/proc/$pid/status
[ -r "$status" ] || fail "pid $pid from the pidfile is not running"

# The agent answers on its default socket; root's own reading is the reference code.
want=$(agent id --local --json | sed -n 's/.*"code": "\(.*\)".*/\1/p')
# The code the running agent reports, once it answers (10 s at most).
running_code() {
    i=0
    until got=$(agent id --json 2>/dev/null | sed -n 's/.*"code": "\(.*\)".*/\1/p') && [ -n "$got" ]; do
        i=$((i + 1))
        [ $i -lt 100 ] || fail "the agent ($1) never answered on /run/kooagent/agent.sock"
        sleep 0.1
    done
}
running_code "packaged defaults"
[ "$got" = "$want" ] ||
    fail "the agent's device code $got differs from root's $want (prestart hand-over not used?)"
echo "check-init: the agent (no capability) reports root's device code $got"

# Who the agent runs as, and with what.
awk '/^Uid:/ { print $2, $3, $4, $5 }' "$status" | grep -qx "$uid $uid $uid $uid" ||
    fail "agent not running as kooagent ($uid): $(grep '^Uid:' "$status")"
for c in CapInh CapPrm CapEff CapBnd CapAmb; do
    v=$(awk -v k="$c:" '$1 == k { print $2 }' "$status")
    [ "$v" = 0000000000000000 ] || fail "agent has $c $v (want none)"
done
grep -q '^NoNewPrivs:[[:space:]]*1' "$status" || fail "agent without no_new_privs"
echo "check-init: agent runs as kooagent ($uid), no capability, no_new_privs"

# Its state went to the FHS default, owned by kooagent.
[ -n "$(find /var/lib/kooagent -mindepth 1 -user "$uid" | head -n 1)" ] ||
    fail "no state written by kooagent in /var/lib/kooagent: $(ls -la /var/lib/kooagent)"

init status >/dev/null || fail "status while running"
out=$(init reload 2>&1) || fail "reload: $out"
sleep 0.5
kill -0 "$pid" 2>/dev/null || fail "the agent died on reload"
out=$(init stop 2>&1) || fail "stop: $out"
echo "check-init: stop: $out"
! kill -0 "$pid" 2>/dev/null || fail "pid $pid still running after stop"
rc=0
init status >/dev/null || rc=$?
[ "$rc" = 3 ] || fail "status after stop: exit $rc (want 3)"
echo "check-init: SysV start/status/reload/stop OK"

# The configuration somewhere else, named in DAEMON_ARGS: prestart must read it too (else
# it hashes another identity root, or none, and the agent's code is not root's).
mv /etc/kooagent/agent.toml /etc/kooagent/custom.toml
echo 'DAEMON_ARGS="--config /etc/kooagent/custom.toml"' >>/etc/default/kooagent
rm -rf /run/kooagent /var/lib/kooagent
out=$(init start 2>&1) || fail "start with --config in DAEMON_ARGS: $out"
running_code "DAEMON_ARGS --config"
[ "$got" = "$want" ] ||
    fail "with --config in DAEMON_ARGS the agent's code $got differs from root's $want (prestart read another configuration?)"
out=$(init stop 2>&1) || fail "stop: $out"
echo "check-init: --config in DAEMON_ARGS reaches prestart too (code $got)"
