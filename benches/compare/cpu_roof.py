#!/usr/bin/env python3
"""cpu::fast against the machine's roof and its CPU peer, in one run, with ratios.

For people, not CI. On the machine at hand, for each shape and round, back to back: numpy's
sgemm rate (a 2048^3 float32 matmul: the roof for attention, which is two GEMMs plus an exp
per score) and the same product through XLA (jitted `jnp.dot`: numpy's OpenBLAS may pick a
kernel narrower than the CPU's vectors), JAX's jitted `jax.nn.dot_product_attention` (XLA on the CPU, fp32) and
`cpu::fast` (through `attn-bench --paths cpu-fast --json`, which names the kernel copy it
ran). Shapes: B=1, H=8, D=64 and 128, L=S=1024, 2048 and 4096, causal and not, and a decoding
shape (B=1, 32 query heads over 8 kv heads, D=128, one query, S=16384). Each figure is a
median of --reps timed calls after --warmup; GFLOP/s follow DESIGN.md (4 B H L S D, halved
for causal self-attention). Prints a Markdown table, then the targets of issue 16 checked
(cpu::fast >= 3x JAX and >= 60% of sgemm at L=S >= 2048, D=64).

    pip install numpy jax
    cargo build --release --bin attn-bench
    python3 benches/compare/cpu_roof.py --rounds 2
"""
import argparse
import json
import os
import statistics
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np


def median_ms(fn, reps, warmup):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def sgemm_gflops(n, reps):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    ms = median_ms(lambda: a @ b, reps, 1)
    return 2.0 * n**3 / ms / 1e6


def xla_sgemm_gflops(n, reps):
    """The same product through XLA (jnp.dot, jitted): a second roof, since numpy's OpenBLAS
    may pick a kernel narrower than the CPU's widest vectors."""
    a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(2), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    ms = median_ms(lambda: dot(a, b).block_until_ready(), reps, 2)
    return 2.0 * n**3 / ms / 1e6


def attention_flops(s):
    f = 4.0 * s["batch"] * s["heads"] * s["q_len"] * s["kv_len"] * s["head_dim"]
    return f / 2 if s["causal"] and s["q_len"] == s["kv_len"] else f


def jax_gflops(s, reps, warmup):
    attend = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=s["causal"]))
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    uniform = lambda key, shape: jax.random.uniform(key, shape, jnp.float32, -1.0, 1.0)
    q = uniform(kq, (s["batch"], s["q_len"], s["heads"], s["head_dim"]))
    k = uniform(kk, (s["batch"], s["kv_len"], s["kv_heads"], s["head_dim"]))
    v = uniform(kv, (s["batch"], s["kv_len"], s["kv_heads"], s["head_dim"]))
    ms = median_ms(lambda: attend(q, k, v).block_until_ready(), reps, warmup)
    return attention_flops(s) / ms / 1e6


def fast_gflops(bench, s, reps, warmup):
    cmd = [
        bench, "--batch", str(s["batch"]), "--heads", str(s["heads"]),
        "--kv-heads", str(s["kv_heads"]), "--q-len", str(s["q_len"]),
        "--kv-len", str(s["kv_len"]), "--head-dim", str(s["head_dim"]),
        "--paths", "cpu-fast", "--reps", str(reps), "--warmup", str(warmup), "--json",
    ]
    if s["causal"]:
        cmd.append("--causal")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    row = json.loads(out.splitlines()[0])
    return row["gflops"], row["note"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bench", default=os.path.join("target", "release", "attn-bench"))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="only L=S=2048, D=64, not causal")
    a = p.parse_args()

    shapes = []
    for d in (64, 128):
        for n in (1024, 2048, 4096):
            for causal in (False, True):
                shapes.append(dict(batch=1, heads=8, kv_heads=8, q_len=n, kv_len=n, head_dim=d, causal=causal))
    shapes.append(dict(batch=1, heads=32, kv_heads=8, q_len=1, kv_len=16384, head_dim=128, causal=False))
    if a.quick:
        shapes = [s for s in shapes if s["q_len"] == 2048 and s["head_dim"] == 64 and not s["causal"]]

    print(f"# numpy {np.__version__}, jax {jax.__version__}, {os.cpu_count()} CPUs")
    print("| round | shape | causal | numpy sgemm GFLOP/s | XLA sgemm GFLOP/s | JAX GFLOP/s | cpu::fast GFLOP/s | kernel | fast / JAX | fast / numpy sgemm | fast / XLA sgemm |")
    print("| ---: | --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |")
    results = []
    for r in range(1, a.rounds + 1):
        for s in shapes:
            roof = sgemm_gflops(2048, a.reps)
            xla_roof = xla_sgemm_gflops(2048, a.reps)
            jax_rate = jax_gflops(s, a.reps, a.warmup)
            fast_rate, note = fast_gflops(a.bench, s, a.reps, a.warmup)
            kernel = note.split(", ")[-1].removesuffix(" kernel")
            shape = f"H={s['heads']}/{s['kv_heads']} L={s['q_len']} S={s['kv_len']} D={s['head_dim']}"
            print(f"| {r} | {shape} | {'yes' if s['causal'] else 'no'} | {roof:.1f} | {xla_roof:.1f} | "
                  f"{jax_rate:.1f} | {fast_rate:.1f} | {kernel} | {fast_rate / jax_rate:.2f}x | "
                  f"{fast_rate / roof:.0%} | {fast_rate / xla_roof:.0%} |", flush=True)
            results.append((s, roof, jax_rate, fast_rate))
    targets = [(s, roof, j, f) for s, roof, j, f in results
               if s["q_len"] == s["kv_len"] and s["kv_len"] >= 2048 and s["head_dim"] == 64]
    for s, roof, j, f in targets:
        ok = f >= 3 * j and f >= 0.6 * roof
        print(f"# target L=S={s['kv_len']} D=64 causal={s['causal']}: {f / j:.2f}x JAX, "
              f"{f / roof:.0%} of sgemm: {'met' if ok else 'MISSED'}")


if __name__ == "__main__":
    main()
