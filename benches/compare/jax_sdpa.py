#!/usr/bin/env python3
"""Times jax.nn.dot_product_attention on the shapes attn-bench takes.

For people, not CI. The flags and the JSON keys mirror torch_sdpa.py, so the two read side by
side. Runs fp32 on JAX's default device (CPU unless a GPU build of jaxlib is installed), jitted,
in JAX's layout [batch, seq, heads, head_dim], with grouped-query attention native to JAX when
--kv-heads is smaller than --heads. Each timed call waits for its result (block_until_ready);
the median over --reps calls is reported, after --warmup calls that include the compilation.
GFLOP/s follow the convention of DESIGN.md.

    pip install jax
    python3 benches/compare/jax_sdpa.py --batch 1 --heads 8 --head-dim 64 --len 1024,2048 --causal
"""
import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp


def flops(b, h, l, s, d, dv, causal):
    f = 2.0 * b * h * l * s * (d + dv)
    return f / 2 if causal and l == s else f


def time_one(fn, args, reps, warmup):
    for _ in range(warmup):
        fn(*args).block_until_ready()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn(*args).block_until_ready()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--len", default="512", help="comma-separated q_len = kv_len values")
    p.add_argument("--q-len", type=int, default=None, help="query length (overrides --len for queries)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    a = p.parse_args()

    hkv = a.kv_heads or a.heads
    dev = jax.devices()[0]
    attend = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=a.causal))
    for s in [int(x) for x in a.len.split(",")]:
        l = a.q_len or s
        kq, kk, kv = jax.random.split(jax.random.key(0), 3)
        uniform = lambda key, shape: jax.random.uniform(key, shape, jnp.float32, -1.0, 1.0)
        q = uniform(kq, (a.batch, l, a.heads, a.head_dim))
        k = uniform(kk, (a.batch, s, hkv, a.head_dim))
        v = uniform(kv, (a.batch, s, hkv, a.head_dim))
        ms = time_one(attend, (q, k, v), a.reps, a.warmup)
        print(json.dumps({
            "path": "jax-sdpa-float32",
            "device": dev.device_kind if dev.platform != "cpu" else "cpu",
            "jax": jax.__version__,
            "batch": a.batch, "heads": a.heads, "kv_heads": hkv, "q_len": l, "kv_len": s,
            "head_dim": a.head_dim, "causal": a.causal,
            "median_ms": round(ms, 4),
            "gflops": round(flops(a.batch, a.heads, l, s, a.head_dim, a.head_dim, a.causal) / ms / 1e6, 2),
        }))


if __name__ == "__main__":
    main()
