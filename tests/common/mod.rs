//! Shared set-up of the integration tests: one device per test binary, random inputs, and the
//! element-by-element comparison against the CPU reference.
#![allow(dead_code, unreachable_pub)] // each test binary uses a different part of this module

use std::collections::BTreeSet;
use std::sync::{Mutex, OnceLock};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use wgpu_attention::{Attention, DType, Dims, Gpu, Output, Path, Plan, Tensor, cpu};

/// The variable that lets GPU tests pass without running where there is no adapter.
pub const SKIP_VAR: &str = "WGPU_ATTENTION_SKIP_GPU_TESTS";

/// The GPU tests skipped in this binary (no adapter, and `SKIP_VAR=1`), by the name of the
/// thread the harness ran each on (the test's name); a test may ask for the device twice.
static SKIPPED: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

/// The device shared by every test of a binary (pipelines compile once per binary).
///
/// Without an adapter the test fails, saying how to get one, unless `WGPU_ATTENTION_SKIP_GPU_TESTS=1`:
/// then it is skipped (`None`), and when the binary exits it prints how many of its GPU tests
/// were skipped (outside the harness's capture, so a passing run still shows it).
pub fn gpu() -> Option<&'static Gpu> {
    static GPU: OnceLock<Result<Gpu, String>> = OnceLock::new();
    let gpu = GPU.get_or_init(|| {
        Gpu::new()
            .inspect(|gpu| eprintln!("tests run on {}", gpu.describe()))
            .map_err(|e| e.to_string())
    });
    match gpu {
        Ok(gpu) => Some(gpu),
        Err(_) if skip_allowed() => {
            let test = std::thread::current().name().unwrap_or("main").to_string();
            let mut skipped = SKIPPED.lock().unwrap_or_else(|e| e.into_inner());
            if skipped.is_empty() {
                at_exit_report_skips();
            }
            skipped.insert(test);
            None
        }
        Err(e) => panic!(
            "{e}\nThe GPU tests need one: `bash scripts/setup.sh` installs Mesa's \
             software Vulkan driver on Debian/Ubuntu, and WGPU_BACKEND / WGPU_ADAPTER_NAME pick \
             an adapter. To skip the GPU tests instead, set {SKIP_VAR}=1."
        ),
    }
}

/// Whether `WGPU_ATTENTION_SKIP_GPU_TESTS=1` lets GPU tests skip where there is no adapter.
pub fn skip_allowed() -> bool {
    std::env::var(SKIP_VAR).is_ok_and(|v| v == "1")
}

/// Registers, once, a report of the skipped count for when the process exits.
fn at_exit_report_skips() {
    extern "C" fn report() {
        let n = SKIPPED.lock().map_or(0, |s| s.len());
        let exe = std::env::args().next().unwrap_or_default();
        let file = std::path::Path::new(&exe)
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        // Cargo names test binaries `<name>-<hash>`.
        let name = file
            .rsplit_once('-')
            .map_or(file.as_str(), |(name, _)| name);
        eprintln!(
            "SKIPPED: the GPU part of {n} test(s) of {name} did not run: no GPU adapter \
             ({SKIP_VAR}=1)"
        );
    }
    #[allow(unsafe_code)]
    // SAFETY: `atexit` is the C runtime's, on every platform Rust's std supports; `report`
    // touches only a static mutex and stderr, both valid until the process ends.
    unsafe {
        unsafe extern "C" {
            fn atexit(f: extern "C" fn()) -> std::ffi::c_int;
        }
        atexit(report);
    }
}

/// Uniform values in `[-amp, amp)`; never all zeros.
/// `x` with every value made non-negative (ALiBi slopes).
pub fn positive(x: Vec<f32>) -> Vec<f32> {
    x.into_iter().map(f32::abs).collect()
}

pub fn random(rng: &mut StdRng, n: usize, amp: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-amp..amp)).collect()
}

/// Random booleans, `true` with probability `p`.
pub fn random_mask(rng: &mut StdRng, n: usize, p: f64) -> Vec<bool> {
    (0..n).map(|_| rng.random_bool(p)).collect()
}

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// Asserts `|got - want| <= atol + rtol * |want|` element by element (naming the first failing
/// index and both values), `-inf` matching only `-inf`, and no NaN anywhere.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let ok = if w.is_infinite() {
            g == w
        } else {
            g.is_finite() && (g - w).abs() <= atol + rtol * w.abs()
        };
        assert!(
            ok,
            "{what}[{i}]: got {g}, want {w} (atol {atol}, rtol {rtol})"
        );
    }
}

/// `||got - want|| / ||want||` over finite entries (0 when `want` is all zeros and `got` too).
pub fn rel_norm_error(got: &[f32], want: &[f32]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (&g, &w) in got.iter().zip(want) {
        if w.is_finite() {
            num += (g as f64 - w as f64).powi(2);
            den += (w as f64).powi(2);
        }
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// A poisoned tensor: NaN everywhere, so an element a kernel forgets to write fails the check.
pub fn poisoned(gpu: &Gpu, dims: [usize; 4]) -> Tensor {
    gpu.upload(&vec![f32::NAN; dims.iter().product()], dims)
        .unwrap()
}

/// The f32 tolerance contract of DESIGN.md, plus element-wise bounds.
pub const O_ATOL: f32 = 2e-5;
pub const O_RTOL: f32 = 1e-4;
pub const NORM_TOL: f64 = 1e-5;

/// Runs one case on `path` and checks every output it has against the reference: O and the
/// log-sum-exp always, the weights on the three-pass path. Every output starts as NaN.
/// `logit_amp` scales Q to push the scores up (x30 in the grid).
pub fn check(gpu: &Gpu, path: Path, dims: Dims, opts: &Attention, seed: u64, logit_amp: f32) {
    check_dtypes(gpu, path, dims, opts, seed, logit_amp, [DType::F32; 4]);
}

/// Tolerance of O elements, relative, for an output stored as `dtype`: one unit in the last
/// place of that type (the kernel and the reference may round to neighbours), f32's contract
/// otherwise.
fn o_rtol(dtype: DType) -> f32 {
    match dtype {
        DType::Bf16 => 1.0 / 128.0,
        DType::F16 => 1.0 / 1024.0,
        DType::F8E4M3 => 1.0 / 8.0,
        _ => O_RTOL,
    }
}

/// [`check`] with Q, K, V and O stored as `types`. The reference runs on the same rounded
/// inputs; the relative norm error bound is DESIGN.md's 3e-3 when anything is half precision.
pub fn check_dtypes(
    gpu: &Gpu,
    path: Path,
    dims: Dims,
    opts: &Attention,
    seed: u64,
    logit_amp: f32,
    types: [DType; 4],
) {
    check_against(gpu, path, dims, (opts, opts), seed, logit_amp, types);
}

/// [`check`] of the GPU running `gpu_opts` against the reference running `ref_opts`: for
/// options whose GPU form the CPU cannot read (masks, biases and lengths on the device), the
/// reference takes their host form.
pub fn check_against_host_form(
    gpu: &Gpu,
    path: Path,
    dims: Dims,
    gpu_opts: &Attention,
    ref_opts: &Attention,
    seed: u64,
    logit_amp: f32,
) {
    check_against(
        gpu,
        path,
        dims,
        (gpu_opts, ref_opts),
        seed,
        logit_amp,
        [DType::F32; 4],
    );
}

fn check_against(
    gpu: &Gpu,
    path: Path,
    dims: Dims,
    (opts, ref_opts): (&Attention, &Attention),
    seed: u64,
    logit_amp: f32,
    types: [DType; 4],
) {
    let [tq_t, tk_t, tv_t, to_t] = types;
    let opts = opts.clone().path(path);
    let layout = opts.get_layout();
    let mut r = rng(seed);
    let round = |x: Vec<f32>, t: DType| -> Vec<f32> { x.into_iter().map(|v| t.round(v)).collect() };
    let q = round(random(&mut r, dims.q_elems(), logit_amp), tq_t);
    let k = round(random(&mut r, dims.k_elems(), 1.0), tk_t);
    let v = round(random(&mut r, dims.v_elems(), 1.0), tv_t);
    let want = cpu::reference(&q, &k, &v, dims, &ref_opts.clone().path(path)).expect("reference");
    let tq = gpu.upload_as(&q, dims.q_shape(layout), tq_t).unwrap();
    let tk = gpu.upload_as(&k, dims.k_shape(layout), tk_t).unwrap();
    let tv = gpu.upload_as(&v, dims.v_shape(layout), tv_t).unwrap();
    let with_weights = path == Path::ThreePass;
    let o_shape = dims.o_shape(layout);
    let out = Output {
        o: gpu
            .upload_as(&vec![f32::NAN; o_shape.iter().product()], o_shape, to_t)
            .unwrap(),
        lse: Some(poisoned(gpu, [dims.batch, dims.heads, dims.q_len, 1])),
        weights: with_weights.then(|| poisoned(gpu, dims.score_shape())),
    };
    let plan = opts
        .plan_for_dtypes(gpu, dims, [tq_t, tk_t, tv_t])
        .unwrap_or_else(|e| panic!("{dims:?}: {e}"));
    let ran = plan.name();
    // The 16-bit products (f16 Q, K and V, where the Gpu's configuration asks for them) round P
    // to f16: up to 2^-10 of max |v| (1 here) per element beyond the reference (see
    // tests/fused.rs, sixteen_bit_products_against_the_reference).
    let mma = matches!(&plan, Plan::Fused { plan: p, .. } | Plan::Decode { plan: p, .. } if p.mma.is_some());
    // An 8-bit O: its subnormals are 2^-9 apart.
    let o_atol = if to_t == DType::F8E4M3 {
        1.0 / 512.0
    } else if mma {
        1e-3
    } else {
        O_ATOL
    };
    opts.run_into(gpu, &tq, &tk, &tv, &out)
        .unwrap_or_else(|e| panic!("{dims:?}: {e}"));
    let o = out.o.download(gpu).unwrap();
    let lse = out.lse.unwrap().download(gpu).unwrap();
    let ctx = format!("[{ran}, {types:?}] {dims:?} {opts:?} seed {seed}");
    let ctx = if ctx.len() > 400 {
        format!("{}...", &ctx[..400])
    } else {
        ctx
    };
    assert_close(&format!("O of {ctx}"), &o, &want.o, o_atol, o_rtol(to_t));
    let norm_tol = if types.iter().all(|&t| t == DType::F32) {
        NORM_TOL
    } else {
        3e-3
    };
    let err = rel_norm_error(&o, &want.o);
    // An 8-bit O is judged element by element only (within a code of the reference, above):
    // small outputs fall among its subnormals, 2^-9 apart, where the norm error of a right
    // answer can pass 7% (an independent review's long-row decode case).
    assert!(
        err <= norm_tol || to_t == DType::F8E4M3,
        "O of {ctx}: relative norm error {err:e} > {norm_tol:e}"
    );
    assert_close(&format!("lse of {ctx}"), &lse, &want.lse, 2e-5, 2e-5);
    if let Some(w) = out.weights {
        let w = w.download(gpu).unwrap();
        assert_close(&format!("weights of {ctx}"), &w, &want.weights, 1e-6, 1e-4);
    }
}

/// Runs `opts` on `q`, `k`, `v` into an O of `o_shape` and a log-sum-exp of `lse_dims`, both
/// poisoned with NaN, and checks them against the reference's `want` with f32's tolerances
/// (`ctx` names the call in a failure): for calls whose tensors `check` cannot build (paged
/// pools, packed batches).
pub fn run_poisoned_and_check(
    gpu: &Gpu,
    opts: &Attention,
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    (o_shape, lse_dims): ([usize; 4], [usize; 4]),
    want: &cpu::Reference,
    ctx: &str,
) {
    let out = Output {
        o: poisoned(gpu, o_shape),
        lse: Some(poisoned(gpu, lse_dims)),
        weights: None,
    };
    opts.run_into(gpu, q, k, v, &out)
        .unwrap_or_else(|e| panic!("{ctx}: {e}"));
    let o = out.o.download(gpu).unwrap();
    let lse = out.lse.unwrap().download(gpu).unwrap();
    assert_close(&format!("O of {ctx}"), &o, &want.o, O_ATOL, O_RTOL);
    let err = rel_norm_error(&o, &want.o);
    assert!(err <= NORM_TOL, "O of {ctx}: relative norm error {err:e}");
    assert_close(&format!("lse of {ctx}"), &lse, &want.lse, 2e-5, 2e-5);
}

/// One test problem: dims, options, and how hard to push the logits.
#[derive(Debug, Clone)]
pub struct Case {
    pub dims: Dims,
    pub opts: Attention,
    pub amp: f32,
}

pub fn dims(
    batch: usize,
    heads: usize,
    kv_heads: usize,
    q_len: usize,
    kv_len: usize,
    d: usize,
    dv: usize,
) -> Dims {
    Dims {
        batch,
        heads,
        kv_heads,
        q_len,
        kv_len,
        head_dim: d,
        v_head_dim: dv,
    }
}

/// The shape of a mask or bias broadcast by `pattern`: bit k set means dim k is kept full.
pub fn broadcast_shape(dims: Dims, pattern: usize) -> [usize; 4] {
    let full = dims.score_shape();
    std::array::from_fn(|k| {
        if pattern & (1 << (3 - k)) != 0 {
            full[k]
        } else {
            1
        }
    })
}

pub const LENGTHS: [usize; 5] = [1, 7, 33, 100, 257];
pub const HEAD_DIMS: [usize; 6] = [1, 8, 40, 64, 128, 256];

/// Every (q_len, kv_len) pair of LENGTHS, alternating layout and causal alignment.
pub fn grid_lengths() -> Vec<Case> {
    use wgpu_attention::{Causal, Layout};
    let mut cases = Vec::new();
    for (n, &l) in LENGTHS.iter().enumerate() {
        for (m, &s) in LENGTHS.iter().enumerate() {
            let mut opts = Attention::new().layout(if (n + m) % 2 == 0 {
                Layout::Bhsd
            } else {
                Layout::Bshd
            });
            opts = match (n + 2 * m) % 3 {
                0 => opts,
                1 => opts.causal(Causal::TopLeft),
                _ => opts.causal(Causal::BottomRight),
            };
            cases.push(Case {
                dims: dims(1 + (n + m) % 2, 2, 1, l, s, 40, 24),
                opts,
                amp: 1.0,
            });
        }
    }
    cases
}

/// Every head dim, with v_head_dim equal and different.
pub fn grid_head_dims() -> Vec<Case> {
    let mut cases = Vec::new();
    for (n, &d) in HEAD_DIMS.iter().enumerate() {
        for dv in [d, HEAD_DIMS[(n + 3) % HEAD_DIMS.len()]] {
            cases.push(Case {
                dims: dims(2, 2, 2, 33, 100, d, dv),
                opts: Attention::new(),
                amp: 1.0,
            });
        }
    }
    cases
}

/// Batch 1 to 3; heads 1 to 8 in groups of 1, 2 and 4 and multi-query; both layouts.
pub fn grid_heads() -> Vec<Case> {
    use wgpu_attention::Layout;
    let heads = [
        (1, 1),
        (2, 2),
        (8, 8),
        (4, 2),
        (8, 4),
        (8, 2),
        (6, 3),
        (4, 1),
        (8, 1),
        (3, 1),
    ];
    let mut cases = Vec::new();
    for (n, &(h, hkv)) in heads.iter().enumerate() {
        let layout = if n % 2 == 0 {
            Layout::Bshd
        } else {
            Layout::Bhsd
        };
        cases.push(Case {
            dims: dims(
                1 + n % 3,
                h,
                hkv,
                7 + 13 * (n % 3),
                33 + 17 * (n % 4),
                8 * (1 + n % 5),
                16,
            ),
            opts: Attention::new().layout(layout),
            amp: 1.0,
        });
    }
    cases
}

/// Both causal alignments with q_len below, equal to and above kv_len, in both layouts.
pub fn grid_causal() -> Vec<Case> {
    use wgpu_attention::{Causal, Layout};
    let mut cases = Vec::new();
    for causal in [Causal::TopLeft, Causal::BottomRight] {
        for (l, s) in [(7, 100), (33, 33), (100, 7), (257, 33), (1, 257)] {
            for layout in [Layout::Bhsd, Layout::Bshd] {
                cases.push(Case {
                    dims: dims(2, 4, 2, l, s, 40, 40),
                    opts: Attention::new().causal(causal).layout(layout),
                    amp: 1.0,
                });
            }
        }
    }
    cases
}

/// Masks and biases broadcast every way (each of the 16 patterns of kept and broadcast dims).
/// Dims are pairwise different so a wrong broadcast stride cannot pass by accident.
pub fn grid_broadcast(seed: u64) -> Vec<Case> {
    let mut r = rng(seed);
    let d = dims(2, 3, 3, 7, 33, 8, 8);
    let mut cases = Vec::new();
    for pattern in 0..16 {
        let shape = broadcast_shape(d, pattern);
        let n: usize = shape.iter().product();
        cases.push(Case {
            dims: d,
            opts: Attention::new().mask(shape, random_mask(&mut r, n, 0.7)),
            amp: 1.0,
        });
        cases.push(Case {
            dims: d,
            opts: Attention::new().bias(shape, random(&mut r, n, 3.0)),
            amp: 1.0,
        });
    }
    cases
}

/// Sliding windows of every shape: one-sided, two-sided, wider than the keys, zero-width;
/// with and without causal masking, aligned both ways.
pub fn grid_window() -> Vec<Case> {
    use wgpu_attention::Causal;
    let mut cases = Vec::new();
    let windows = [(0, 0), (3, 0), (0, 5), (16, 16), (70, 3), (1000, 1000)];
    for (n, &(left, right)) in windows.iter().enumerate() {
        for (l, s) in [(100, 100), (33, 257), (100, 33)] {
            let mut opts = Attention::new().window(left, right);
            opts = match n % 3 {
                0 => opts.causal(Causal::BottomRight),
                1 => opts.causal(Causal::TopLeft),
                _ => opts.window_align(if l == s {
                    Causal::TopLeft
                } else {
                    Causal::BottomRight
                }),
            };
            cases.push(Case {
                dims: dims(1, 2, 1, l, s, 40, 24),
                opts,
                amp: 1.0,
            });
        }
    }
    cases
}

/// The grid and property tests every GPU path must pass, instantiated once per path so that a
/// failure names its kernel.
#[allow(unused_macros)] // errors.rs shares this module but runs no grid
macro_rules! path_grid_tests {
    ($path:expr) => {
        path_grid_tests!($path, |opts: wgpu_attention::Attention,
                                 _: wgpu_attention::Dims| {
            opts
        });
    };
    // `$adjust` rewrites every case's options (additive scores, for one).
    ($path:expr, $adjust:expr) => {
        use common::{Case, dims, gpu, random, random_mask, rng};
        use proptest::prelude::*;
        use proptest::test_runner::{Config, RngSeed, TestRunner};
        use rand::Rng;
        use wgpu_attention::{Attention, Causal, Dims, Layout, cpu};

        /// The options every case of this file runs with.
        fn adjust(opts: &Attention, d: Dims) -> Attention {
            let adjust: fn(Attention, Dims) -> Attention = $adjust;
            adjust(opts.clone(), d)
        }

        fn check(
            gpu: &wgpu_attention::Gpu,
            path: wgpu_attention::Path,
            d: Dims,
            opts: &Attention,
            seed: u64,
            amp: f32,
        ) {
            common::check(gpu, path, d, &adjust(opts, d), seed, amp);
        }

        fn check_dtypes(
            gpu: &wgpu_attention::Gpu,
            path: wgpu_attention::Path,
            d: Dims,
            opts: &Attention,
            seed: u64,
            amp: f32,
            types: [wgpu_attention::DType; 4],
        ) {
            common::check_dtypes(gpu, path, d, &adjust(opts, d), seed, amp, types);
        }

        fn run_cases(cases: &[Case], seed: u64) {
            let Some(gpu) = gpu() else { return };
            for (n, case) in cases.iter().enumerate() {
                check(gpu, $path, case.dims, &case.opts, seed + n as u64, case.amp);
            }
        }

        #[test]
        fn lengths_every_pair() {
            run_cases(&common::grid_lengths(), 100);
        }

        #[test]
        fn head_dims_1_to_256_and_v_head_dim() {
            run_cases(&common::grid_head_dims(), 200);
        }

        #[test]
        fn batches_heads_gqa_mqa_layouts() {
            run_cases(&common::grid_heads(), 300);
        }

        #[test]
        fn causal_both_alignments() {
            run_cases(&common::grid_causal(), 400);
        }

        #[test]
        fn mask_and_bias_broadcast_every_way() {
            run_cases(&common::grid_broadcast(5), 500);
        }

        #[test]
        fn sliding_window() {
            run_cases(&common::grid_window(), 550);
        }

        #[test]
        fn mask_bias_causal_window_softcap_together() {
            let Some(gpu) = gpu() else { return };
            let d = dims(2, 4, 2, 33, 100, 64, 40);
            let mut r = rng(6);
            let opts = Attention::new()
                .causal(Causal::BottomRight)
                .window(40, 0)
                .mask([2, 1, 33, 100], random_mask(&mut r, 2 * 33 * 100, 0.8))
                .bias([1, 4, 1, 100], random(&mut r, 400, 2.0))
                .softcap(20.0)
                .layout(Layout::Bshd);
            check(gpu, $path, d, &opts, 600, 30.0);
        }

        #[test]
        fn kv_lens_including_zero_and_q_lens() {
            let Some(gpu) = gpu() else { return };
            let d = dims(3, 2, 1, 33, 100, 40, 40);
            check(
                gpu,
                $path,
                d,
                &Attention::new().kv_lens(vec![0, 57, 100]),
                700,
                1.0,
            );
            check(
                gpu,
                $path,
                d,
                &Attention::new().q_lens(vec![33, 0, 17]),
                701,
                1.0,
            );
            let both = Attention::new()
                .kv_lens(vec![1, 100, 64])
                .q_lens(vec![5, 33, 20])
                .causal(Causal::BottomRight);
            check(gpu, $path, d, &both, 702, 1.0);
            let d = dims(2, 2, 2, 100, 7, 8, 8);
            let opts = Attention::new().kv_lens(vec![3, 0]).causal(Causal::TopLeft);
            check(gpu, $path, d, &opts, 703, 1.0);
        }

        #[test]
        fn softcap() {
            let Some(gpu) = gpu() else { return };
            for (n, cap) in [1.0f32, 5.0, 50.0].into_iter().enumerate() {
                let d = dims(1, 2, 2, 33, 257, 64, 64);
                check(
                    gpu,
                    $path,
                    d,
                    &Attention::new().softcap(cap),
                    800 + n as u64,
                    30.0,
                );
            }
        }

        /// ALiBi (per head, per batch entry and head), learnable sinks and StreamingLLM's sink
        /// keys, alone and together with causal masking, both alignments, lengths and masks;
        /// keys long enough to split on the decode path (the merge adds the sinks) and to
        /// leave whole key tiles between the sink keys and the window (skipped).
        #[test]
        fn alibi_sinks_and_sink_keys() {
            let Some(gpu) = gpu() else { return };
            let mut r = rng(12);
            let mut seed = 1100;
            let d = dims(2, 4, 2, 37, 70, 24, 16);
            let slopes = common::positive(random(&mut r, 4, 0.5));
            let per_batch = common::positive(random(&mut r, 8, 0.5));
            let sinks = random(&mut r, 4, 3.0);
            let mask = random_mask(&mut r, 37 * 70, 0.7);
            let cases = [
                Attention::new().alibi(slopes.clone()),
                Attention::new()
                    .alibi(per_batch.clone())
                    .causal(Causal::TopLeft),
                Attention::new().sinks(sinks.clone()),
                Attention::new()
                    .sinks(sinks.clone())
                    .alibi(slopes.clone())
                    .causal(Causal::BottomRight)
                    .kv_lens(vec![0, 50])
                    .q_lens(vec![37, 9]),
                Attention::new()
                    .window(3, 0)
                    .causal(Causal::BottomRight)
                    .sink_keys(4)
                    .layout(Layout::Bshd),
                Attention::new()
                    .window(5, 5)
                    .window_align(Causal::TopLeft)
                    .sink_keys(9)
                    .sinks(sinks.clone())
                    .mask([1, 1, 37, 70], mask),
            ];
            for opts in &cases {
                seed += 1;
                check(gpu, $path, d, opts, seed, 4.0);
            }
            // Decoding over many keys: splits on the decode path.
            let long = dims(1, 8, 2, 1, 1100, 64, 64);
            let sinks8 = random(&mut r, 8, 3.0);
            let slopes8 = common::positive(random(&mut r, 8, 0.02));
            for opts in [
                Attention::new().sinks(sinks8.clone()),
                Attention::new()
                    .alibi(slopes8)
                    .sinks(sinks8.clone())
                    .causal(Causal::BottomRight),
                Attention::new()
                    .window(100, 0)
                    .causal(Causal::BottomRight)
                    .sink_keys(4)
                    .sinks(sinks8),
            ] {
                seed += 1;
                check(gpu, $path, long, &opts, seed, 4.0);
            }
            // Whole tiles between the sink keys and the windows of a query tile.
            let square = dims(1, 2, 1, 300, 300, 16, 16);
            let opts = Attention::new()
                .window(20, 0)
                .causal(Causal::TopLeft)
                .sink_keys(5);
            check(gpu, $path, square, &opts, seed + 1, 4.0);
        }

        /// head_dim 512 (Gemma-class models) and DeepSeek's MLA shape (Q and K 576, V 512),
        /// for prefill and for decoding over enough keys to split them, GQA, both layouts.
        #[test]
        fn head_dim_512_and_mla() {
            let Some(gpu) = gpu() else { return };
            let cases = [
                (dims(1, 4, 1, 37, 70, 512, 512), Attention::new()),
                (
                    dims(1, 8, 2, 1, 1100, 576, 512),
                    Attention::new().causal(Causal::BottomRight),
                ),
                (
                    dims(2, 2, 2, 9, 33, 576, 512),
                    Attention::new()
                        .causal(Causal::TopLeft)
                        .layout(Layout::Bshd),
                ),
            ];
            for (n, (d, opts)) in cases.iter().enumerate() {
                check(gpu, $path, *d, opts, 1200 + n as u64, 2.0);
            }
        }

        #[test]
        fn logits_scaled_30x() {
            let Some(gpu) = gpu() else { return };
            check(
                gpu,
                $path,
                dims(2, 4, 4, 100, 257, 128, 64),
                &Attention::new(),
                900,
                30.0,
            );
            let causal = Attention::new().causal(Causal::TopLeft);
            check(
                gpu,
                $path,
                dims(1, 8, 2, 257, 100, 256, 32),
                &causal,
                901,
                30.0,
            );
            let luong = Attention::new().scale(1.0);
            check(gpu, $path, dims(1, 2, 2, 7, 33, 40, 40), &luong, 902, 30.0);
        }

        #[test]
        fn fully_masked_rows_give_zeros_and_minus_inf() {
            let Some(gpu) = gpu() else { return };
            // Rows 0, 3 and 6 have no allowed key; the others keep a random half.
            let d = dims(1, 2, 2, 7, 33, 8, 8);
            let mut r = rng(10);
            let mut mask = random_mask(&mut r, 7 * 33, 0.5);
            for i in [0, 3, 6] {
                mask[i * 33..(i + 1) * 33].fill(false);
            }
            let masked = Attention::new().mask([1, 1, 7, 33], mask.clone());
            check(gpu, $path, d, &masked, 1000, 1.0);
            // Bottom-right causal with q_len > kv_len leaves the first rows without keys.
            let br = Attention::new().causal(Causal::BottomRight);
            check(gpu, $path, dims(1, 2, 2, 100, 33, 8, 8), &br, 1001, 1.0);
            // And the reference agrees on what that means.
            let q = random(&mut r, 2 * 7 * 8, 1.0);
            let k = random(&mut r, 2 * 33 * 8, 1.0);
            let want = cpu::reference(&q, &k, &k, d, &masked).unwrap();
            assert!(want.o[..8].iter().all(|&x| x == 0.0));
            assert_eq!(want.lse[0], f32::NEG_INFINITY);
        }

        /// A bias of f32::MIN (PyTorch's finfo.min mask) on whole rows and on some keys: the
        /// scores sit at the floor, the row is uniform there, never empty and never NaN.
        #[test]
        fn bias_of_f32_min() {
            let Some(gpu) = gpu() else { return };
            let d = dims(1, 2, 2, 5, 9, 8, 8);
            let mut bias = vec![0.0f32; 5 * 9];
            bias[..9].fill(f32::MIN); // row 0: every key
            for j in [1, 4, 7] {
                bias[2 * 9 + j] = f32::MIN; // row 2: some keys
            }
            check(
                gpu,
                $path,
                d,
                &Attention::new().bias([1, 1, 5, 9], bias),
                1455,
                1.0,
            );
        }

        /// 40000 keys with equal scores: the worst case for f32 summation (every weight is the
        /// same, so rounding errors do not cancel), and more loop iterations than llvmpipe's
        /// per-invocation limit would allow a kernel that streamed them in one loop.
        #[test]
        fn long_key_range_with_equal_weights() {
            let Some(gpu) = gpu() else { return };
            let d = dims(1, 2, 1, 3, 40_000, 16, 8);
            let mut r = rng(1450);
            let q = random(&mut r, d.q_elems(), 1.0);
            let k = vec![0.25f32; d.k_elems()];
            for v in [vec![1.0f32; d.v_elems()], random(&mut r, d.v_elems(), 1.0)] {
                let opts = adjust(&Attention::new().path($path), d);
                let want = cpu::reference(&q, &k, &v, d, &opts).unwrap();
                let up = |x: &[f32], s| gpu.upload(x, s).unwrap();
                let out = opts
                    .run(
                        gpu,
                        &up(&q, d.q_shape(Layout::Bhsd)),
                        &up(&k, d.k_shape(Layout::Bhsd)),
                        &up(&v, d.v_shape(Layout::Bhsd)),
                    )
                    .unwrap();
                let o = out.o.download(gpu).unwrap();
                common::assert_close("O", &o, &want.o, common::O_ATOL, common::O_RTOL);
                let err = common::rel_norm_error(&o, &want.o);
                assert!(err <= common::NORM_TOL, "relative norm error {err:e}");
            }
        }

        /// Half-precision storage: all f16, all bf16, f32 queries over a bf16 or f16 cache, and
        /// half outputs; natively and through the packed-f16 fallback.
        #[test]
        fn half_precision_dtypes() {
            use wgpu_attention::DType::{Bf16, F16, F32};
            let Some(gpu) = gpu() else { return };
            let packed = gpu.with_packed_f16();
            let combos = [
                [F16; 4],
                [Bf16; 4],
                [F32, Bf16, Bf16, F32],
                [F32, F16, F16, F32],
                [Bf16, Bf16, Bf16, F32],
                [F16, F32, F16, Bf16],
            ];
            let mut r = rng(1460);
            for (n, types) in combos.into_iter().enumerate() {
                for (m, g) in [gpu, &packed].into_iter().enumerate() {
                    let d = dims(2, 4, 2, 33 + 7 * m, 70 + 31 * n, 40, 24 + 2 * n);
                    let opts = Attention::new()
                        .causal(if n % 2 == 0 {
                            Causal::BottomRight
                        } else {
                            Causal::TopLeft
                        })
                        .mask([2, 1, 1, d.kv_len], random_mask(&mut r, 2 * d.kv_len, 0.8))
                        .layout(if m == 0 { Layout::Bhsd } else { Layout::Bshd });
                    check_dtypes(g, $path, d, &opts, 1470 + (2 * n + m) as u64, 1.0, types);
                }
            }
            // Odd sizes everywhere: packed halves share words across rows and invocations.
            let d = dims(1, 3, 1, 7, 33, 7, 5);
            for types in [[F16; 4], [Bf16; 4]] {
                check_dtypes(&packed, $path, d, &Attention::new(), 1490, 1.0, types);
                check_dtypes(
                    gpu,
                    $path,
                    d,
                    &Attention::new().softcap(5.0),
                    1491,
                    30.0,
                    types,
                );
            }
        }

        /// Random configurations in random storage types.
        #[test]
        fn proptest_random_dtypes() {
            use wgpu_attention::DType;
            let Some(gpu) = gpu() else { return };
            let packed = gpu.with_packed_f16();
            let mut runner = TestRunner::new(Config {
                cases: 40,
                rng_seed: RngSeed::Fixed(0xd7_9e5),
                failure_persistence: None,
                ..Config::default()
            });
            // A few storage combinations, so that the cases do not spend the run compiling
            // a pipeline for each of the 81 possible ones (0.2-0.4 s each on lavapipe).
            let combos = [
                [DType::F16; 4],
                [DType::Bf16; 4],
                [DType::F32, DType::Bf16, DType::Bf16, DType::F32],
                [DType::Bf16, DType::F16, DType::F32, DType::F16],
            ];
            let strategy = (
                (1usize..=2, 1usize..=3, 1usize..=3, 1usize..=70, 1usize..=90),
                (
                    1usize..=72,
                    1usize..=72,
                    0usize..3,
                    any::<bool>(),
                    any::<u64>(),
                ),
                0..combos.len(),
            );
            runner
                .run(
                    &strategy,
                    |((b, hkv, g, l, s), (dd, dv, causal, use_packed, seed), combo)| {
                        let [tq, tk, tv, to] = combos[combo];
                        let d = Dims {
                            batch: b,
                            heads: hkv * g,
                            kv_heads: hkv,
                            q_len: l,
                            kv_len: s,
                            head_dim: dd,
                            v_head_dim: dv,
                        };
                        let opts = match causal {
                            1 => Attention::new().causal(Causal::TopLeft),
                            2 => Attention::new().causal(Causal::BottomRight),
                            _ => Attention::new(),
                        };
                        let g = if use_packed { &packed } else { gpu };
                        check_dtypes(g, $path, d, &opts, seed, 1.0, [tq, tk, tv, to]);
                        Ok(())
                    },
                )
                .unwrap();
        }

        /// Random configurations: every option, sizes that are not multiples of the tiles.
        /// 100 cases per path by default (the first 100 of the fixed seed's sequence: CI's
        /// time on lavapipe); `PROPTEST_CASES=200` or more for a deeper run.
        #[test]
        fn proptest_random_configurations() {
            let Some(gpu) = gpu() else { return };
            let cases: u32 = std::env::var("PROPTEST_CASES")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(100);
            let mut runner = TestRunner::new(Config {
                cases,
                rng_seed: RngSeed::Fixed(0x5eed_a77e),
                failure_persistence: None,
                ..Config::default()
            });
            let groups = prop_oneof![Just(1usize), Just(2), Just(4)];
            let strategy = (
                (1usize..=3, 1usize..=4, groups, 1usize..=80, 1usize..=120),
                (
                    1usize..=96,
                    1usize..=96,
                    any::<bool>(),
                    0usize..3,
                    0usize..16,
                ),
                (
                    0usize..16,
                    any::<bool>(),
                    any::<bool>(),
                    any::<bool>(),
                    any::<bool>(),
                ),
                // llm: 1 ALiBi, 2 sinks, 3 sink keys (with a window), else none (each is a
                // pipeline of its own per combination: kept to one at a time here).
                (0usize..4, any::<u64>(), 0usize..16),
            );
            runner
                .run(
                    &strategy,
                    |(
                        (b, hkv, g, l, s),
                        (dd, dv, bshd, causal, mask_pat),
                        (bias_pat, softcap, kv_lens, q_lens, big),
                        (window, seed, llm),
                    )| {
                        let d = Dims {
                            batch: b,
                            heads: hkv * g,
                            kv_heads: hkv,
                            q_len: l,
                            kv_len: s,
                            head_dim: dd,
                            v_head_dim: dv,
                        };
                        let mut r = rng(seed);
                        let layout = if bshd { Layout::Bshd } else { Layout::Bhsd };
                        let mut opts = Attention::new().layout(layout);
                        opts = match causal {
                            1 => opts.causal(Causal::TopLeft),
                            2 => opts.causal(Causal::BottomRight),
                            _ => opts,
                        };
                        // Pattern 0 (all broadcast) stands for "no mask" / "no bias".
                        if mask_pat != 0 {
                            let shape = common::broadcast_shape(d, mask_pat);
                            opts =
                                opts.mask(shape, random_mask(&mut r, shape.iter().product(), 0.75));
                        }
                        if bias_pat != 0 {
                            let shape = common::broadcast_shape(d, bias_pat);
                            opts = opts.bias(shape, random(&mut r, shape.iter().product(), 2.0));
                        }
                        if softcap {
                            opts = opts.softcap(10.0);
                        }
                        if window != 0 || llm == 3 {
                            opts = opts.window(r.random_range(0..40), r.random_range(0..40));
                        }
                        opts = match llm {
                            1 => opts.alibi(common::positive(random(&mut r, d.heads, 0.3))),
                            2 => opts.sinks(random(&mut r, d.heads, 3.0)),
                            3 => opts.sink_keys(r.random_range(1..20)),
                            _ => opts,
                        };
                        if kv_lens {
                            opts = opts
                                .kv_lens((0..b).map(|_| r.random_range(0..=s as u32)).collect());
                        }
                        if q_lens {
                            opts =
                                opts.q_lens((0..b).map(|_| r.random_range(0..=l as u32)).collect());
                        }
                        check(gpu, $path, d, &opts, seed, if big { 30.0 } else { 1.0 });
                        Ok(())
                    },
                )
                .unwrap();
        }
    };
}

/// An option's checks in reduced storage and split work, on the fused and decode paths: `plain`
/// (the option alone, on `d`) in f16, `options` (beside the others, on `d2`) in `mixed`
/// storage, `options` with one key tile per dispatch (the fused kernel's passes resume O),
/// and both through the emulated 16-bit products (P in f16). Seeds from `seed` up.
pub fn half_storage_passes_and_products(
    gpu: &Gpu,
    (d, plain): (Dims, &Attention),
    (d2, options): (Dims, &Attention),
    mixed: [DType; 4],
    seed: u64,
) {
    let capped = gpu.with_caps(wgpu_attention::LimitCaps {
        max_key_tiles_per_workgroup: Some(1),
        ..Default::default()
    });
    for path in [Path::Fused, Path::Decode] {
        check_dtypes(gpu, path, d, plain, seed, 2.0, [DType::F16; 4]);
        check_dtypes(gpu, path, d2, options, seed + 1, 2.0, mixed);
        check(&capped, path, d2, options, seed + 2, 2.0);
    }
    let Plan::Fused { plan, .. } = options.clone().path(Path::Fused).plan(&capped, d2).unwrap()
    else {
        panic!("not the fused path")
    };
    assert!(plan.passes > 1, "no passes under the cap: {plan:?}");
    let products = gpu.with_mma(wgpu_attention::MmaChoice::Emulated).unwrap();
    for (dims, opts) in [(d, plain), (d2, options)] {
        let plan = opts
            .clone()
            .path(Path::Fused)
            .plan_for_dtypes(&products, dims, [DType::F16; 3])
            .unwrap();
        assert!(
            matches!(&plan, Plan::Fused { plan, .. } if plan.mma.is_some()),
            "{plan:?}"
        );
        check_dtypes(
            &products,
            Path::Fused,
            dims,
            opts,
            seed + 3,
            2.0,
            [DType::F16; 4],
        );
    }
}

/// The host copy of a `KvCache` (`[batch, kv_heads, cap, width]`) after an append of `new[b]`
/// rows to sequence `b` from `start[b]` on, the rows given as `[batch, kv_heads, t, width]`
/// (`t` the most rows any sequence appended): what a test's reference attends to.
pub fn mirror_append(
    host: &mut [f32],
    rows: &[f32],
    (kv_heads, cap, width): (usize, usize, usize),
    start: &[usize],
    new: &[usize],
) {
    let t = new.iter().copied().max().unwrap_or(0);
    for (b, (&from, &n)) in start.iter().zip(new).enumerate() {
        for h in 0..kv_heads {
            for row in 0..n {
                let dst = ((b * kv_heads + h) * cap + from + row) * width;
                let src = ((b * kv_heads + h) * t + row) * width;
                host[dst..dst + width].copy_from_slice(&rows[src..src + width]);
            }
        }
    }
}
