#!/usr/bin/env python3
"""Times torch.nn.functional.scaled_dot_product_attention on the shapes attn-bench takes.

For people, not CI. fp32 runs with TF32 off, so the comparison with the f32 WGSL kernels is
like for like. Prints one JSON object per shape: median milliseconds (CUDA events when on a
GPU, wall clock otherwise), GFLOP/s by the convention of DESIGN.md, and the backend used.

    python3 benches/compare/torch_sdpa.py --batch 4 --heads 16 --head-dim 64 --len 512,1024 --causal

With --backward it times forward plus backward (the gradients by q, k and v of sum(dO * O)),
counting 3.5 x the forward's FLOPs (FlashAttention-2's convention), as `attn-bench --backward`.
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F


def flops(b, h, l, s, d, dv, causal):
    f = 2.0 * b * h * l * s * (d + dv)
    return f / 2 if causal and l == s else f


def time_one(fn, reps, warmup, cuda):
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
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
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--backward", action="store_true", help="time forward + backward")
    a = p.parse_args()

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    dtype = getattr(torch, a.dtype)
    hkv = a.kv_heads or a.heads
    for s in [int(x) for x in a.len.split(",")]:
        l = a.q_len or s
        g = torch.Generator(device=dev).manual_seed(0)
        q = torch.rand(a.batch, a.heads, l, a.head_dim, device=dev, dtype=dtype, generator=g) * 2 - 1
        k = torch.rand(a.batch, hkv, s, a.head_dim, device=dev, dtype=dtype, generator=g) * 2 - 1
        v = torch.rand(a.batch, hkv, s, a.head_dim, device=dev, dtype=dtype, generator=g) * 2 - 1
        if hkv != a.heads:
            # SDPA's enable_gqa needs torch >= 2.5; expanding is the portable equivalent.
            k = k.repeat_interleave(a.heads // hkv, dim=1)
            v = v.repeat_interleave(a.heads // hkv, dim=1)
        if a.backward:
            q.requires_grad_(True)
            k.requires_grad_(True)
            v.requires_grad_(True)
            d_o = torch.rand(a.batch, a.heads, l, a.head_dim, device=dev, dtype=dtype, generator=g) * 2 - 1

            def step():
                o = F.scaled_dot_product_attention(q, k, v, is_causal=a.causal)
                torch.autograd.grad(o, (q, k, v), d_o)

            ms = time_one(step, a.reps, a.warmup, cuda)
        else:
            with torch.no_grad():
                ms = time_one(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=a.causal), a.reps, a.warmup, cuda)
        work = 3.5 if a.backward else 1.0
        print(json.dumps({
            "path": f"torch-sdpa-{a.dtype}" + ("-backward" if a.backward else ""),
            "device": torch.cuda.get_device_name() if cuda else "cpu",
            "torch": torch.__version__,
            "batch": a.batch, "heads": a.heads, "kv_heads": hkv, "q_len": l, "kv_len": s,
            "head_dim": a.head_dim, "causal": a.causal,
            "median_ms": round(ms, 4),
            "gflops": round(work * flops(a.batch, a.heads, l, s, a.head_dim, a.head_dim, a.causal) / ms / 1e6, 2),
        }))


if __name__ == "__main__":
    main()
