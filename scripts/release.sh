#!/usr/bin/env bash
# The shipped agent: `kooagent` in the release profile with glibc linked in statically
# (static-pie). One file that runs on any Linux of its architecture, and a third fewer
# resident pages than the dynamic build: no ld.so, libc.so, libm, libgcc_s or NSS modules
# mapped, only the parts of libc the agent calls (docs/operations.md, "The static binary").
#
#   bash scripts/release.sh              # builds target/release/kooagent
#   bash scripts/release.sh run          # builds, then runs the agent on its embedded defaults
#   bash scripts/release.sh status       # builds, then any other kooagent command
#   bash scripts/release.sh bench        # builds, then kooagent-bench measures the static binary
#
# Only the final link differs from `cargo build --release` (`cargo rustc` passes the flag
# to the binary alone: a workspace-wide +crt-static would also hit proc-macro crates, which
# cannot be static). TARGET=<triple> builds for another target (see scripts/cross-build.sh
# for the linker and sysroot a cross build needs).
set -euo pipefail
cd "$(dirname "$0")/.."
target_args=()
bin="${CARGO_TARGET_DIR:-target}/release/kooagent"
if [ -n "${TARGET:-}" ]; then
    target_args=(--target "$TARGET")
    bin="${CARGO_TARGET_DIR:-target}/$TARGET/release/kooagent"
fi
"${CARGO:-cargo}" rustc --release --locked -p kooagent --bin kooagent "${target_args[@]}" \
    -- -C target-feature=+crt-static
# A static-pie has no program interpreter; one that has it would depend on the host's libc.
if readelf -l "$bin" | grep -q "program interpreter"; then
    echo "release: $bin is not statically linked" >&2
    exit 1
fi
[ $# -eq 0 ] && exit 0
if [ "$1" = bench ]; then
    # The bench is its own binary (never shipped); it measures the static agent just built.
    shift
    "${CARGO:-cargo}" build --release --locked -p kooagent --bin kooagent-bench "${target_args[@]}"
    exec "$(dirname "$bin")/kooagent-bench" --agent "$bin" "$@"
fi
exec "$bin" "$@"
