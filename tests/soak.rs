//! Soak: many calls on every path, sampling the process's resident memory (and, on Linux, its
//! executable mappings, which grow when a driver compiles code per call). Ignored by default:
//! `cargo test --release --test soak -- --ignored` runs 3000 calls per path and fails if the
//! resident set grows by 1% or more from call 500 to the last call, or if any executable
//! mapping appears after call 500. `WGPU_ATTENTION_SOAK_CALLS=n` changes the count (the first
//! sixth are the warm-up); CI runs 600.
//!
//! Each attention, merge and layer case checks its first result against the CPU reference, so
//! a path that stops computing does not pass by doing nothing; the cache case's results are
//! checked by `tests/device_options.rs` and `tests/cache_and_merge.rs`.

mod common;

use wgpu_attention::{
    Attention, Causal, Dims, Gpu, KvCache, Layout, MhaConfig, MhaWeights, MultiHeadAttention, Path,
    Plan, Tensor, cpu, gpu::Partial,
};

/// Resident set and executable mappings of this process (Linux; `None` elsewhere).
fn memory() -> Option<(u64, usize)> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    let exec = maps
        .lines()
        .filter(|l| l.split_whitespace().nth(1).is_some_and(|p| p.contains('x')))
        .count();
    Some((pages * 4096 / 1024, exec))
}

fn calls() -> usize {
    std::env::var("WGPU_ATTENTION_SOAK_CALLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000)
}

/// Held for the whole of each test: resident memory is the process's, so two soaks running at
/// once (the harness runs tests in parallel) would count each other's allocations.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `call` `calls()` times and checks memory from the warm-up on.
fn soak(what: &str, mut call: impl FnMut()) {
    let n = calls();
    let warm = n / 6;
    let mut at_warm = None;
    for i in 1..=n {
        call();
        if i == warm {
            at_warm = memory();
        }
    }
    let (Some((rss0, exec0)), Some((rss1, exec1))) = (at_warm, memory()) else {
        eprintln!("soak {what}: {n} calls; no /proc on this system, memory not sampled");
        return;
    };
    let growth = (rss1 as f64 - rss0 as f64) / rss0 as f64 * 100.0;
    eprintln!(
        "soak {what}: resident {rss0} KiB at call {warm}, {rss1} KiB at call {n} ({growth:+.2}%); \
         executable mappings {exec0} -> {exec1}"
    );
    assert!(growth < 1.0, "{what}: resident memory grew {growth:.2}%");
    assert_eq!(exec0, exec1, "{what}: executable mappings grew");
}

fn upload(gpu: &Gpu, seed: u64, dims: [usize; 4]) -> (Vec<f32>, Tensor) {
    let data = common::random(&mut common::rng(seed), dims.iter().product(), 1.0);
    let t = gpu.upload(&data, dims).unwrap();
    (data, t)
}

/// One attention call shape on one path, checked once against the reference, then soaked.
fn soak_path(what: &str, path: Path, d: Dims, opts: Attention) {
    let _serial = serial();
    let Some(gpu) = common::gpu() else { return };
    let opts = opts.path(path);
    let (q, tq) = upload(gpu, 1, d.q_shape(Layout::Bhsd));
    let (k, tk) = upload(gpu, 2, d.k_shape(Layout::Bhsd));
    let (v, tv) = upload(gpu, 3, d.v_shape(Layout::Bhsd));
    let plan = opts.plan(gpu, d).unwrap();
    let want = cpu::reference(&q, &k, &v, d, &opts).unwrap();
    let got = opts
        .run(gpu, &tq, &tk, &tv)
        .unwrap()
        .o
        .download(gpu)
        .unwrap();
    common::assert_close(what, &got, &want.o, common::O_ATOL, common::O_RTOL);
    soak(&format!("{what} ({})", plan.reason()), || {
        let out = opts.run(gpu, &tq, &tk, &tv).unwrap();
        out.o.download(gpu).unwrap();
    });
}

#[test]
#[ignore = "soak: thousands of calls; run with --ignored"]
fn three_pass() {
    let d = common::dims(1, 4, 2, 37, 70, 32, 32);
    soak_path(
        "three-pass",
        Path::ThreePass,
        d,
        Attention::new().return_weights(true),
    );
}

#[test]
#[ignore = "soak: thousands of calls; run with --ignored"]
fn fused() {
    let d = common::dims(1, 4, 2, 37, 70, 32, 32);
    soak_path(
        "fused",
        Path::Fused,
        d,
        Attention::new().causal(Causal::BottomRight),
    );
}

#[test]
#[ignore = "soak: thousands of calls; run with --ignored"]
fn decode_single_split() {
    soak_path(
        "decode, one split",
        Path::Decode,
        common::dims(1, 8, 2, 1, 100, 64, 64),
        Attention::new(),
    );
}

/// The shape that leaked ~440 KiB per call before parameter blocks left lavapipe's uniforms.
#[test]
#[ignore = "soak: thousands of calls; run with --ignored"]
fn decode_split() {
    let d = common::dims(1, 8, 2, 1, 1100, 64, 64);
    let Some(gpu) = common::gpu() else { return };
    match Attention::new().path(Path::Decode).plan(gpu, d).unwrap() {
        Plan::Decode { plan, .. } => assert!(plan.splits > 1, "the shape must split: {plan:?}"),
        other => panic!("expected the decode path: {other:?}"),
    }
    soak_path("decode, split", Path::Decode, d, Attention::new());
}

#[test]
#[ignore = "soak: thousands of calls; run with --ignored"]
fn auto() {
    soak_path(
        "auto",
        Path::Auto,
        common::dims(1, 8, 2, 1, 1100, 64, 64),
        Attention::new(),
    );
}

#[test]
#[ignore = "soak: thousands of calls; run with --ignored"]
fn merge() {
    let _serial = serial();
    let Some(gpu) = common::gpu() else { return };
    let dims = [1, 4, 3, 16];
    let (oa_h, oa) = upload(gpu, 4, dims);
    let (ob_h, ob) = upload(gpu, 5, dims);
    let (la_h, la) = upload(gpu, 6, [1, 4, 3, 1]);
    let (lb_h, lb) = upload(gpu, 7, [1, 4, 3, 1]);
    let (want, _) = cpu::merge((&oa_h, &la_h), (&ob_h, &lb_h), dims, Layout::Bhsd).unwrap();
    let a = Partial { o: &oa, lse: &la };
    let b = Partial { o: &ob, lse: &lb };
    let got = wgpu_attention::gpu::merge(gpu, a, b, Layout::Bhsd).unwrap();
    let got = got.o.download(gpu).unwrap();
    common::assert_close("merge", &got, &want, common::O_ATOL, common::O_RTOL);
    soak("merge", || {
        let a = Partial { o: &oa, lse: &la };
        let b = Partial { o: &ob, lse: &lb };
        let out = wgpu_attention::gpu::merge(gpu, a, b, Layout::Bhsd).unwrap();
        out.o.download(gpu).unwrap();
    });
}

#[test]
#[ignore = "soak: thousands of calls; run with --ignored"]
fn kv_cache() {
    let _serial = serial();
    let Some(gpu) = common::gpu() else { return };
    let (kv_heads, heads, dim) = (2, 8, 64);
    let capacity = calls() + 64;
    let mut cache = KvCache::new(gpu, 1, kv_heads, capacity, dim, dim).unwrap();
    let mut r = common::rng(8);
    let prompt = common::random(&mut r, kv_heads * 64 * dim, 1.0);
    cache.append(gpu, &prompt, &prompt, &[64]).unwrap();
    let token = common::random(&mut r, kv_heads * dim, 1.0);
    let (_, q) = upload(gpu, 9, [1, heads, 1, dim]);
    soak("kv cache: append + attend", || {
        cache.append(gpu, &token, &token, &[1]).unwrap();
        let out = cache.attend(gpu, &q, &Attention::new()).unwrap();
        out.o.download(gpu).unwrap();
    });
}

/// A cache that applies RoPE: decoding steps (K turned on the host), and every tenth call a
/// chunk of 160 tokens (turned on the device through a pooled staging buffer).
#[test]
#[ignore = "soak: thousands of calls; run with --ignored"]
fn kv_cache_rotary() {
    let _serial = serial();
    let Some(gpu) = common::gpu() else { return };
    let (kv_heads, heads, dim) = (2, 8, 64);
    let capacity = 160 * (calls() / 10 + 1) + calls() + 64;
    let rotary = wgpu_attention::Rotary::new(dim, 10_000.0).unwrap();
    let mut cache = KvCache::new(gpu, 1, kv_heads, capacity, dim, dim)
        .unwrap()
        .with_rotary(rotary)
        .unwrap();
    let mut r = common::rng(10);
    let chunk = common::random(&mut r, kv_heads * 160 * dim, 1.0);
    cache.append(gpu, &chunk, &chunk, &[160]).unwrap();
    let token = common::random(&mut r, kv_heads * dim, 1.0);
    let (_, q) = upload(gpu, 11, [1, heads, 1, dim]);
    let mut i = 0;
    soak("kv cache with RoPE: append + attend", || {
        i += 1;
        if i % 10 == 0 {
            cache.append(gpu, &chunk, &chunk, &[160]).unwrap();
        } else {
            cache.append(gpu, &token, &token, &[1]).unwrap();
        }
        let out = cache.attend(gpu, &q, &Attention::new()).unwrap();
        out.o.download(gpu).unwrap();
    });
}

#[test]
#[ignore = "soak: thousands of calls; run with --ignored"]
fn mha_layer() {
    let _serial = serial();
    let Some(gpu) = common::gpu() else { return };
    let config = MhaConfig::new(32, 4);
    let mut r = common::rng(10);
    let e = config.embed_dim;
    let weights = {
        let mut w = || common::random(&mut r, e * e, 0.2);
        MhaWeights::new(w(), w(), w(), w())
    };
    let layer = MultiHeadAttention::new(gpu, config, &weights).unwrap();
    let (x_h, x) = upload(gpu, 11, [2, 9, 1, e]);
    let opts = Attention::new();
    let (want, _) =
        cpu::mha_reference(&config, &weights, &x_h, &x_h, &x_h, (2, 9, 9), &opts, false).unwrap();
    let got = layer.forward(gpu, &x, &x, &x, &opts).unwrap();
    let got = got.out.download(gpu).unwrap();
    common::assert_close("layer", &got, &want, 2e-5, common::O_RTOL);
    soak("multi-head layer", || {
        let out = layer.forward(gpu, &x, &x, &x, &Attention::new()).unwrap();
        out.out.download(gpu).unwrap();
    });
}
