#!/bin/sh
# Checks systemd/kooagent.service: `systemd-analyze verify` must be clean and
# `systemd-analyze security --offline=true` must report an exposure <= $MAX_EXPOSURE (1.2).
# Installs Debian's systemd package when systemd-analyze is missing (needs root + apt).
set -eu

MAX_EXPOSURE=${MAX_EXPOSURE:-1.2}
here=$(cd "$(dirname "$0")/.." && pwd)
unit="$here/systemd/kooagent.service"
dropin="$here/systemd/kooagent.service.d/restart-backoff.conf"

if ! command -v systemd-analyze >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "check-units: installing systemd (for systemd-analyze)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null
    else
        echo "check-units: systemd-analyze missing and cannot install it (need root and apt-get)" >&2
        exit 1
    fi
fi

version=$(systemd-analyze --version | sed -n '1s/^systemd \([0-9]*\).*/\1/p')
echo "check-units: systemd $version"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT INT TERM

# verify: systemd-analyze checks that ExecStart= exists, so point it at a stand-in binary
# in a temporary directory; nothing is written outside $tmp.
mkdir -p "$tmp/bin" "$tmp/units"
printf '#!/bin/sh\nexit 0\n' > "$tmp/bin/kooagent"
chmod 0755 "$tmp/bin/kooagent"
sed "s|/usr/bin/kooagent|$tmp/bin/kooagent|" "$unit" > "$tmp/units/kooagent.service"
if [ "${version:-0}" -ge 254 ]; then
    # RestartSteps=/RestartMaxDelaySec= exist from systemd 254 on: verify the drop-in too.
    mkdir -p "$tmp/units/kooagent.service.d"
    cp "$dropin" "$tmp/units/kooagent.service.d/"
else
    echo "check-units: systemd $version < 254: restart-backoff.conf not verified (installed only on >= 254)"
fi
out="$tmp/verify.out"
if ! systemd-analyze verify "$tmp/units/kooagent.service" >"$out" 2>&1; then
    cat "$out" >&2
    echo "check-units: FAIL: systemd-analyze verify failed" >&2
    exit 1
fi
if [ -s "$out" ]; then
    cat "$out" >&2
    echo "check-units: FAIL: systemd-analyze verify printed warnings" >&2
    exit 1
fi
echo "check-units: verify OK"

sec="$tmp/security.out"
systemd-analyze security --offline=true --no-pager "$unit" >"$sec" 2>&1 || true
exposure=$(sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p' "$sec" | tail -n 1)
if [ -z "$exposure" ]; then
    cat "$sec" >&2
    echo "check-units: FAIL: no exposure level in systemd-analyze security output" >&2
    exit 1
fi
grep '✗' "$sec" || true
if awk -v e="$exposure" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(e + 0 <= m + 0) }'; then
    echo "check-units: exposure $exposure <= $MAX_EXPOSURE OK"
else
    echo "check-units: FAIL: exposure $exposure > $MAX_EXPOSURE" >&2
    exit 1
fi
