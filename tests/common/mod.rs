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
        assert!(ok, "{what}[{i}]: got {g}, want {w} (atol {atol}, rtol {rtol})");
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
    if den == 0.0 { num.sqrt() } else { (num / den).sqrt() }
}

/// A poisoned tensor: NaN everywhere, so an element a kernel forgets to write fails the check.
pub fn poisoned(gpu: &Gpu, dims: [usize; 4]) -> Tensor {
    gpu.upload(&vec![f32::NAN; dims.iter().product()], dims).unwrap()
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
    let ctx = if ctx.len() > 400 { format!("{}...", &ctx[..400]) } else { ctx };
    assert_close(&format!("O of {ctx}"), &o, &want.o, O_ATOL, O_RTOL);
    let err = rel_norm_error(&o, &want.o);
    assert!(err <= NORM_TOL, "O of {ctx}: relative norm error {err:e} > {NORM_TOL:e}");
    assert_close(&format!("lse of {ctx}"), &lse, &want.lse, 2e-5, 2e-5);
    assert_close(&format!("weights of {ctx}"), &w, &want.weights, 1e-6, 1e-4);
}
