#!/usr/bin/env bash
# cpu::fast built for the very CPU it runs on (`-C target-cpu=native`) must be correct and
# must not be slower than the default build. An AVX-512 machine once ran it 15x slower that
# way (NOTES.md): LLVM vectorised the plain-loop kernel with gathers and scatters.
#
# Builds the CPU tests and attn-bench with `-C target-cpu=native` in target/native (its own
# directory, so the default build's artefacts are not rebuilt), runs the tests, then times
# cpu-fast in both builds, alternating, and fails if the native build's best median is below
# 0.8x the default build's (a margin for this kind of VM's noise; the cliff was 0.07x).
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-target}"
native=(env RUSTFLAGS="-C target-cpu=native" CARGO_TARGET_DIR="$target/native")
"${native[@]}" cargo test --release --test cpu_fast
cargo build --release --bin attn-bench
"${native[@]}" cargo build --release --bin attn-bench
shape=(--batch 1 --heads 8 --q-len 1024 --head-dim 64 --paths cpu-fast --reps 5 --warmup 1 --json)
gflops() { "$1" "${shape[@]}" 2>/dev/null | python3 -c 'import json,sys; print(json.loads(sys.stdin.readline())["gflops"])'; }
best_default=0
best_native=0
for round in 1 2 3; do
    d=$(gflops "$target/release/attn-bench")
    n=$(gflops "$target/native/release/attn-bench")
    echo "round $round: default build $d GFLOP/s, native build $n GFLOP/s"
    best_default=$(python3 -c "print(max($best_default, $d))")
    best_native=$(python3 -c "print(max($best_native, $n))")
done
python3 - "$best_default" "$best_native" <<'PY'
import sys
default, native = map(float, sys.argv[1:])
ratio = native / default
print(f"cpu-fast, B=1 H=8 L=S=1024 D=64: native build {native:.1f} GFLOP/s, default {default:.1f}: {ratio:.2f}x")
if ratio < 0.8:
    sys.exit(f"the -C target-cpu=native build is {ratio:.2f}x the default build: a cliff")
PY
