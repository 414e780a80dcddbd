#!/usr/bin/env bash
# Installs the system packages and Python modules the tests use, when missing. Idempotent;
# quick when everything is already there.
set -euo pipefail

need_apt=()
command -v socat >/dev/null || need_apt+=(socat)
command -v redis-server >/dev/null || need_apt+=(redis-server)
command -v openssl >/dev/null || need_apt+=(openssl)
command -v curl >/dev/null || need_apt+=(curl)
# strace: the crash harness (tests/e2e/crash.rs) records the agent's file-system calls with it.
command -v strace >/dev/null || need_apt+=(strace)
# chromium, chromium-driver: the console's browser test (tests/e2e/console_browser.rs) drives
# a headless Chromium through chromedriver (about 2 minutes to install on a fresh machine).
command -v chromium >/dev/null || need_apt+=(chromium)
command -v chromedriver >/dev/null || need_apt+=(chromium-driver)
# swtpm: the software TPM behind the freeze state's TPM anchor tests (tests/e2e/tpm.rs).
command -v swtpm >/dev/null || need_apt+=(swtpm swtpm-tools)
if ((${#need_apt[@]})); then
    if [ "$(id -u)" = 0 ]; then
        echo "== installing ${need_apt[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
    else
        echo "warning: missing ${need_apt[*]} (not root: install them yourself); dependent tests skip" >&2
    fi
fi

# cryptography: the independent license/token issuers; huaweicloudsdkcore: Huawei's own
# APIG signer, the second test vector for ours.
for mod in cryptography huaweicloudsdkcore; do
    python3 -c "import $mod" 2>/dev/null && continue
    echo "== installing python $mod"
    python3 -m pip install -q "$mod"
done

# Every locked package's manifest, for tests/e2e/toolchain.rs (`cargo metadata --offline`
# reads them all, other platforms' too; the build itself fetches only what it compiles).
cargo fetch --locked -q
