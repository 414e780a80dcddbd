#!/bin/sh
# The board packages in one command: builds the shipped (release) static binaries for
# aarch64, armv7 and riscv64 (scripts/cross-build.sh, qemu test included unless TEST=0),
# then the .deb for arm64, armhf and riscv64 and the .rpm for aarch64, each checked like the
# amd64 ones (file list, modes, conffiles, scriptlets, architecture, static binary of that
# architecture; scripts/package.sh).
#
#   scripts/cross-packages.sh          # output: target/packages/
#
# Slow on a small machine (three release builds with fat LTO; see docs/operations.md,
# "Cross builds", for the times measured here); CI runs the lighter PROFILE=cross-test
# build and test instead.
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
boards="aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf riscv64gc-unknown-linux-gnu"
TARGETS="$boards" PROFILE=release sh "$here/scripts/cross-build.sh"
TARGETS="$boards" CARGO_TARGET_DIR="$here/target/cross" NO_BUILD=1 RPM_ARCHES=aarch64 \
    sh "$here/scripts/package.sh"
