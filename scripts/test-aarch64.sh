#!/usr/bin/env bash
# cpu::fast's tests for aarch64 (its NEON copy), cross-built and run under qemu-user. Not in
# CI (a second full build of the crate and its dependencies takes minutes); run it after
# touching src/cpu/fast. Installs Debian's cross linker and qemu-user, and the Rust target.
# qemu says nothing about speed on a real Arm CPU: this checks results only.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v qemu-aarch64 > /dev/null || ! command -v aarch64-linux-gnu-gcc > /dev/null; then
    bash scripts/apt-install.sh "the aarch64 tests need a cross linker and qemu-user" \
        qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross
fi
rustup target add aarch64-unknown-linux-gnu
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
cargo test --release --target aarch64-unknown-linux-gnu --test cpu_fast -- --nocapture
