#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls exactly this). Installs what the tests
# need on a fresh machine first, then: format check, clippy, every test.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/deps.sh

echo "== cargo fmt --check"
cargo fmt --all --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo test"
cargo test --workspace 2>&1

# The aarch64 build with Debian's toolchain, smoke-tested under qemu (root: it installs the
# cross toolchain with apt). CROSS=0 skips it on a workstation.
if [ "${CROSS:-1}" != 0 ] && [ "$(id -u)" = 0 ]; then
    echo "== cross build + qemu smoke test (aarch64)"
    TARGETS=aarch64-unknown-linux-gnu bash scripts/cross-build.sh
fi
