//! Shared set-up of the integration tests: one device per test binary, random inputs, and the
//! element-by-element comparison against the CPU reference.
#![allow(dead_code, unreachable_pub)] // each test binary uses a different part of this module

use std::sync::OnceLock;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use wgpu_attention::{Attention, Dims, Gpu, Output, Tensor, cpu};

/// The device shared by every test of a binary (pipelines compile once per binary).
///
/// Without an adapter the test is skipped with a message, except under `CI=true`, where a
/// missing adapter fails: tests never skip silently in CI.
pub fn gpu() -> Option<&'static Gpu> {
    static GPU: OnceLock<Option<Gpu>> = OnceLock::new();
    GPU.get_or_init(|| match Gpu::new() {
        Ok(gpu) => {
            eprintln!("tests run on {}", gpu.describe());
            Some(gpu)
        }
        Err(e) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("CI=true and no GPU adapter: {e}")
        }
        Err(e) => {
            eprintln!("SKIPPED: no GPU adapter ({e})");
            None
        }
    })
    .as_ref()
}

/// Uniform values in `[-amp, amp)`; never all zeros.
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

/// Runs one case on `gpu` (with the weights and log-sum-exp) and checks all three outputs
/// against the reference. `logit_amp` scales Q to push the scores up (x30 in the grid).
pub fn check(gpu: &Gpu, dims: Dims, opts: &Attention, seed: u64, logit_amp: f32) {
    let layout = opts.get_layout();
    let mut r = rng(seed);
    let q = random(&mut r, dims.q_elems(), logit_amp);
    let k = random(&mut r, dims.k_elems(), 1.0);
    let v = random(&mut r, dims.v_elems(), 1.0);
    let want = cpu::reference(&q, &k, &v, dims, opts).expect("reference");
    let tq = gpu.upload(&q, dims.q_shape(layout)).unwrap();
    let tk = gpu.upload(&k, dims.k_shape(layout)).unwrap();
    let tv = gpu.upload(&v, dims.v_shape(layout)).unwrap();
    let out = Output {
        o: poisoned(gpu, dims.o_shape(layout)),
        lse: Some(poisoned(gpu, [dims.batch, dims.heads, dims.q_len, 1])),
        weights: Some(poisoned(gpu, dims.score_shape())),
    };
    opts.run_into(gpu, &tq, &tk, &tv, &out)
        .unwrap_or_else(|e| panic!("{dims:?}: {e}"));
    let o = out.o.download(gpu).unwrap();
    let lse = out.lse.unwrap().download(gpu).unwrap();
    let w = out.weights.unwrap().download(gpu).unwrap();
    let ctx = format!("{dims:?} {opts:?} seed {seed}");
    let ctx = if ctx.len() > 400 {
        format!("{}...", &ctx[..400])
    } else {
        ctx
    };
    assert_close(&format!("O of {ctx}"), &o, &want.o, O_ATOL, O_RTOL);
    let err = rel_norm_error(&o, &want.o);
    assert!(
        err <= NORM_TOL,
        "O of {ctx}: relative norm error {err:e} > {NORM_TOL:e}"
    );
    assert_close(&format!("lse of {ctx}"), &lse, &want.lse, 2e-5, 2e-5);
    assert_close(&format!("weights of {ctx}"), &w, &want.weights, 1e-6, 1e-4);
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
