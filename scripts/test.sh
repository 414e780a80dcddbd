#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls exactly this). Installs what the tests
# need on a fresh machine first, then: format check, clippy, every test.
set -euo pipefail
cd "$(dirname "$0")/.."

# Each stage prints its name on start and its duration when the next one starts (and the
# total at the end), so a slow stage shows in CI's log.
suite_start=$(date +%s)
stage_start=$suite_start
stage_name=""
stage_done() {
    local now
    now=$(date +%s)
    [ -z "$stage_name" ] || echo "== done: $stage_name ($((now - stage_start)) s)"
    stage_start=$now
}
stage() {
    stage_done
    stage_name="$*"
    echo "== $*"
}
trap 'rc=$?; stage_done; echo "== whole suite: $(($(date +%s) - suite_start)) s (exit $rc)"' EXIT

stage "deps: what the tests need"
bash scripts/deps.sh

stage "cargo fmt --check"
cargo fmt --all --check
stage "cargo clippy (default features, then all features)"
cargo clippy --workspace --all-targets -- -D warnings
cargo clippy --workspace --all-targets --all-features -- -D warnings
# Dependency creep shows in review: deps/*.txt must match the locked tree, and
# kooagent-core must stay free of I/O crates.
stage "dependency lists (deps/*.txt, scripts/dep-list.sh --check)"
bash scripts/dep-list.sh --check

# The seller server's storage tests also run on PostgreSQL: a throw-away local cluster
# (root: it installs Debian's postgresql and starts it on a Unix socket).
if [ "$(id -u)" = 0 ]; then
    . scripts/pg-test.sh
    set -euo pipefail   # the sourced script leaves errexit off for interactive shells
fi
stage "cargo test (all features)"
cargo test --workspace --all-features -- --skip console_browser:: 2>&1

# The seller console in a real browser: headless Chromium through chromedriver (deps.sh
# installs them; here their absence is a failure, not a skip) signs in, walks every page,
# freezes an agent's instance; phone width and JavaScript off too. Same build as above.
stage "console in headless Chromium (tests/e2e/console_browser.rs)"
KOOAGENT_REQUIRE_BROWSER=1 cargo test --workspace --all-features --test e2e console_browser:: \
    -- --nocapture >target/console-browser.log 2>&1 || { tail -n 80 target/console-browser.log; exit 1; }
grep -E '^(console_browser:|test result)' target/console-browser.log

# The shipped binary is the static build (scripts/release.sh, which checks it has no
# program interpreter): run the end-to-end tests again on it (name lookups go through its
# pinned NSS modules: the socket group, `localhost` for the upstream test servers). The
# seller server's own modules are skipped (they test kooagent-seller, not the agent); the
# seller's tools the agent tests use (`kooagent seller keygen|issue|token`) run the
# kooagent-seller the test stage above built, found through PATH.
stage "static release binary: end-to-end tests on it"
bash scripts/release.sh
# Quiet when it passes; on a failure, every failing test's output and the list of names.
PATH="$PWD/target/debug:$PATH" KOOAGENT_E2E_BIN="$PWD/target/release/kooagent" \
    cargo test -p kooagent --test e2e -- --skip guide:: --skip relay:: --skip seller_call:: \
    --skip seller_hardening:: --skip seller_metrics:: --skip seller_scale:: --skip seller_server:: \
    --skip console_browser:: \
    >target/static-e2e.log 2>&1 ||
    { sed -n '/^failures:/,$p' target/static-e2e.log; exit 1; }
tail -n 3 target/static-e2e.log

# Crash soak, bounded (about 30 s here): kill -9 during mixed ingest, nothing acknowledged
# lost (scripts/soak.sh; the long run and its last result are in docs/operations.md).
stage "soak: 10 kill -9 cycles during usage ingest"
CYCLES=10 bash scripts/soak.sh

# Fuzzing, bounded: the license parser's target body under a seeded mutational driver on
# stable, and the real cargo-fuzz (libFuzzer) target when a nightly toolchain is present.
stage "fuzz: license parser (stable driver, 20 s)"
KOOAGENT_FUZZ_SECS=20 cargo test -q -p kooagent-core --lib license::fuzz 2>&1 | tail -n 3
if [ "${FUZZ:-1}" != 0 ] && rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    command -v cargo-fuzz >/dev/null || cargo install -q --locked cargo-fuzz
    stage "cargo fuzz run license_parse (libFuzzer, 20 s)"
    mkdir -p fuzz/corpus/license_parse
    cargo +nightly fuzz run license_parse fuzz/corpus/license_parse fuzz/seeds -- -max_total_time=20 2>&1 | tail -n 3
fi

# The systemd unit: `systemd-analyze verify` and the offline security exposure (≤ 2.0).
stage "systemd unit checks"
bash scripts/check-units.sh

# The SysV script started and stopped for real in throwaway namespaces (root) with the
# shipped static binary (NSS pinned: the kooagent user comes from /etc/passwd), and the
# syntax of both init scripts.
stage "init scripts (SysV start/stop, no capability)"
bash scripts/check-init.sh target/release/kooagent

# The unit under a real systemd (a systemd-nspawn container; root; installs
# systemd-container): starts, no capability, prestart's hand-over, online exposure, stop.
if [ "$(id -u)" = 0 ]; then
    stage "systemd unit started under systemd (nspawn)"
    bash scripts/check-systemd.sh target/release/kooagent
fi

# Packages: build the .deb and .rpm and check their contents (installs cargo-deb and
# cargo-generate-rpm on first use). PACKAGES=0 skips it on a workstation.
if [ "${PACKAGES:-1}" != 0 ]; then
    stage "packages (.deb, .rpm)"
    cargo test -q -p kooagent-install -- --ignored 2>&1 | tail -n 3
fi

# Every board: aarch64, armv7 and riscv64 built static and run through the same end-to-end
# script under qemu (scripts/cross-test.sh), the armv7 32-bit hazard unit tests under qemu,
# and that script on the x86_64 release binary too (root: installs the cross toolchains with
# apt). The CI builds use PROFILE=cross-test (release minus fat LTO: same code, much quicker
# to build); the shipped release builds and their packages are scripts/cross-packages.sh.
# CROSS=0 skips it on a workstation; CROSS_TARGETS="…" picks the boards, CROSS_UNIT_TESTS=0
# skips the armv7 unit tests.
if [ "${CROSS:-1}" != 0 ] && [ "$(id -u)" = 0 ]; then
    stage "cross builds + the same qemu test on every target (x86_64, aarch64, armv7, riscv64)"
    TARGETS=${CROSS_TARGETS:-"aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf riscv64gc-unknown-linux-gnu"} \
        PROFILE=cross-test bash scripts/cross-build.sh
    # qemu-user-static is installed by now (cross-build.sh).
    bash scripts/cross-test.sh x86_64-unknown-linux-gnu target/release/kooagent
    if [ "${CROSS_UNIT_TESTS:-1}" != 0 ]; then
        TARGETS=armv7-unknown-linux-gnueabihf PROFILE=cross-test SKIP_APT=1 TEST=0 UNIT_TESTS=1 \
            bash scripts/cross-build.sh
    fi
    # The board packages around those binaries (no rebuild): .deb arm64, armhf, riscv64 and
    # .rpm aarch64, checked like the amd64 ones (files, modes, conffiles, scriptlets,
    # architecture, a static binary of that machine). The shipped ones: scripts/cross-packages.sh.
    if [ "${PACKAGES:-1}" != 0 ]; then
        stage "board packages (.deb arm64/armhf/riscv64, .rpm aarch64; cross-test binaries)"
        TARGETS=${CROSS_TARGETS:-"aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf riscv64gc-unknown-linux-gnu"} \
            PROFILE=cross-test NO_BUILD=1 RPM_ARCHES=aarch64 CARGO_TARGET_DIR="$PWD/target/cross" \
            sh scripts/package.sh | grep -E '^package: (built|contents)'
    fi
fi
