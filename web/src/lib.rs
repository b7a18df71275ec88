//! wgpu-attention in the browser: the wasm module of the demo page (`web/index.html`) and the
//! checks the browser tests (`web/tests/browser.rs`) run in headless Chromium.
//!
//! Everything here is `async`: a browser's main thread cannot block, so the GPU is opened
//! with [`Gpu::new_async`] and results come back with [`Tensor::download_async`]. The checks
//! compare every output against `cpu::reference`, compiled to wasm beside the kernels, with
//! the tolerances of the native tests (DESIGN.md), on outputs poisoned with NaN first.
//! The README's "In the browser" section says how to build the page and run the tests.

use std::cell::RefCell;

use wasm_bindgen::prelude::*;
use wgpu_attention::{Attention, Causal, DType, Dims, Gpu, Layout, Output, Path, Tensor, cpu};

/// A small deterministic generator (SplitMix64): fresh inputs per seed, with no dependency
/// on the browser's entropy source.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    /// The next value, uniform in `[-1, 1)`.
    pub fn uniform(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// `n` values uniform in `[-amp, amp)`.
    pub fn values(&mut self, n: usize, amp: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform() * amp).collect()
    }
}

/// `|got - want| <= atol + rtol * |want|` everywhere (`-inf` matches only `-inf`, NaN
/// nothing), else a message naming the first element that fails.
pub fn close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!(
            "{what}: {} elements, want {}",
            got.len(),
            want.len()
        ));
    }
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let ok = if w.is_infinite() {
            g == w
        } else {
            g.is_finite() && (g - w).abs() <= atol + rtol * w.abs()
        };
        if !ok {
            return Err(format!(
                "{what}[{i}]: got {g}, want {w} (atol {atol}, rtol {rtol})"
            ));
        }
    }
    Ok(())
}

/// The largest `|got - want|` over elements where `want` is finite.
pub fn max_abs_diff(got: &[f32], want: &[f32]) -> f32 {
    got.iter()
        .zip(want)
        .filter(|(_, w)| w.is_finite())
        .map(|(g, w)| (g - w).abs())
        .fold(0.0, f32::max)
}

/// A tensor of `dims` full of NaN stored as `dtype`: an element a kernel forgets to write
/// fails the comparison.
pub fn poisoned(gpu: &Gpu, dims: [usize; 4], dtype: DType) -> wgpu_attention::Result<Tensor> {
    gpu.upload_as(&vec![f32::NAN; dims.iter().product()], dims, dtype)
}

/// What one checked call ran and how far it was from the reference.
#[derive(Debug, Clone)]
pub struct Checked {
    /// The plan's name (`three-pass`, `fused`, `decode`, ...).
    pub plan: String,
    /// Largest absolute difference of O from the reference.
    pub max_abs: f32,
}

/// Runs `opts` on `path` over fresh random Q, K, V of `dims` stored as `types` (Q, K, V, O)
/// and checks O and the log-sum-exp (and the weights on the three-pass path) against
/// `cpu::reference` on the same rounded inputs: O within `2e-5 + rtol * |want|` (rtol 1e-4 in
/// f32, one unit in the last place of a half type), the log-sum-exp within `2e-5` absolute
/// and relative, the weights within `1e-6 + 1e-4 * |want|`.
pub async fn check(
    gpu: &Gpu,
    path: Path,
    dims: Dims,
    opts: &Attention,
    seed: u64,
    types: [DType; 4],
) -> Result<Checked, String> {
    let [tq_t, tk_t, tv_t, to_t] = types;
    let opts = opts.clone().path(path);
    let layout = opts.get_layout();
    let ctx = format!("{path:?} {dims:?} {types:?} seed {seed}");
    let err = |e: wgpu_attention::Error| format!("{ctx}: {e}");
    // The element counts below are plain products: refuse any that would not fit.
    let fits = [
        dims.q_shape(Layout::Bhsd),
        dims.k_shape(Layout::Bhsd),
        dims.v_shape(Layout::Bhsd),
    ]
    .iter()
    .all(|s| {
        s.iter()
            .try_fold(1usize, |a, &b| a.checked_mul(b))
            .is_some()
    });
    if !fits {
        return Err(format!("{ctx}: too large for this machine's usize"));
    }
    let mut r = Rng::new(seed);
    let round = |x: Vec<f32>, t: DType| -> Vec<f32> { x.into_iter().map(|v| t.round(v)).collect() };
    let q = round(r.values(dims.q_elems(), 2.0), tq_t);
    let k = round(r.values(dims.k_elems(), 1.0), tk_t);
    let v = round(r.values(dims.v_elems(), 1.0), tv_t);
    let want = cpu::reference(&q, &k, &v, dims, &opts).map_err(err)?;
    let tq = gpu.upload_as(&q, dims.q_shape(layout), tq_t).map_err(err)?;
    let tk = gpu.upload_as(&k, dims.k_shape(layout), tk_t).map_err(err)?;
    let tv = gpu.upload_as(&v, dims.v_shape(layout), tv_t).map_err(err)?;
    let with_weights = path == Path::ThreePass;
    let out = Output {
        o: poisoned(gpu, dims.o_shape(layout), to_t).map_err(err)?,
        lse: Some(poisoned(gpu, [dims.batch, dims.heads, dims.q_len, 1], DType::F32).map_err(err)?),
        weights: if with_weights {
            Some(poisoned(gpu, dims.score_shape(), DType::F32).map_err(err)?)
        } else {
            None
        },
    };
    let plan = opts.plan(gpu, dims).map_err(err)?.name();
    opts.run_into(gpu, &tq, &tk, &tv, &out).map_err(err)?;
    let o = out.o.download_async(gpu).await.map_err(err)?;
    // One unit in the last place of O's type (8-bit subnormals are 2^-9 apart).
    let (atol, rtol) = match to_t {
        DType::Bf16 => (2e-5, 1.0 / 128.0),
        DType::F16 => (2e-5, 1.0 / 1024.0),
        DType::F8E4M3 => (1.0 / 512.0, 1.0 / 8.0),
        _ => (2e-5, 1e-4),
    };
    close(&format!("O of {ctx} ({plan})"), &o, &want.o, atol, rtol)?;
    if let Some(lse) = &out.lse {
        let lse = lse.download_async(gpu).await.map_err(err)?;
        close(&format!("lse of {ctx}"), &lse, &want.lse, 2e-5, 2e-5)?;
    }
    if let Some(w) = &out.weights {
        let w = w.download_async(gpu).await.map_err(err)?;
        close(&format!("weights of {ctx}"), &w, &want.weights, 1e-6, 1e-4)?;
    }
    Ok(Checked {
        max_abs: max_abs_diff(&o, &want.o),
        plan: plan.to_string(),
    })
}

/// Milliseconds since the page loaded (`performance.now()`), for the page's timings.
fn now_ms() -> f64 {
    js_sys::Reflect::get(&js_sys::global(), &"performance".into())
        .ok()
        .and_then(|p| {
            let now = js_sys::Reflect::get(&p, &"now".into()).ok()?;
            let now: js_sys::Function = now.dyn_into().ok()?;
            now.call0(&p).ok()?.as_f64()
        })
        .unwrap_or_else(js_sys::Date::now)
}

thread_local! {
    /// The page's device, opened once.
    static GPU: RefCell<Option<Gpu>> = const { RefCell::new(None) };
}

/// The page's device: opened on first use, then shared; opened again after a loss.
async fn page_gpu() -> Result<Gpu, JsError> {
    if let Some(gpu) = GPU.with(|g| g.borrow().clone())
        && !gpu.is_lost()
    {
        return Ok(gpu);
    }
    let gpu = Gpu::new_async().await?;
    GPU.with(|g| *g.borrow_mut() = Some(gpu.clone()));
    Ok(gpu)
}

/// The adapter the page runs on, in one line (opens the device if need be).
#[wasm_bindgen]
pub async fn adapter() -> Result<String, JsError> {
    Ok(page_gpu().await?.describe())
}

/// What the page shows after one run: both timings, the agreement, one head's weights.
#[wasm_bindgen(getter_with_clone)]
#[derive(Debug, Clone)]
pub struct DemoResult {
    /// The GPU plan that ran.
    pub plan: String,
    /// Milliseconds from submitting the GPU call to its output being on the host.
    pub gpu_ms: f64,
    /// Milliseconds of `cpu::fast` on the same inputs.
    pub cpu_ms: f64,
    /// Largest `|O_gpu - O_cpu|`.
    pub max_abs_diff: f32,
    /// Head 0 of batch 0's weights, `q_len` rows of `kv_len` (row-major).
    pub weights: Vec<f32>,
    /// Rows of `weights` (query positions).
    pub rows: usize,
    /// Columns of `weights` (key positions).
    pub cols: usize,
}

/// Runs attention of the shape and options the page chose on the GPU, on the path `path`
/// (`auto`, `fused`, `decode` or `three-pass`), and on `cpu::fast`, and returns both timings,
/// their largest difference and one head's weights (from a three-pass run, the path that
/// returns them). `window` below zero means none, `softcap` zero none. Bad input is an
/// exception with the crate's message.
#[allow(clippy::too_many_arguments)]
#[wasm_bindgen]
pub async fn run_demo(
    path: String,
    heads: usize,
    kv_heads: usize,
    q_len: usize,
    kv_len: usize,
    head_dim: usize,
    causal: bool,
    window: i32,
    softcap: f32,
    seed: u32,
) -> Result<DemoResult, JsError> {
    let path = match path.as_str() {
        "auto" => Path::Auto,
        "fused" => Path::Fused,
        "decode" => Path::Decode,
        "three-pass" => Path::ThreePass,
        other => return Err(JsError::new(&format!("unknown path {other:?}"))),
    };
    // Sizes checked before anything is allocated (wasm32's usize is 32 bits), and kept to
    // what one page can compute on the CPU in a few seconds.
    let elems = |x: [usize; 3]| x.iter().try_fold(1u64, |a, &b| a.checked_mul(b as u64));
    let too_big = |what: &str, n: Option<u64>, max: u64| match n {
        Some(n) if n <= max => Ok(()),
        _ => Err(JsError::new(&format!(
            "{what} is too large for this page (at most {max}); the library itself takes more"
        ))),
    };
    too_big(
        "heads x q_len x head_dim",
        elems([heads, q_len, head_dim]),
        1 << 24,
    )?;
    too_big(
        "kv_heads x kv_len x head_dim",
        elems([kv_heads, kv_len, head_dim]),
        1 << 24,
    )?;
    too_big(
        "the weights, heads x q_len x kv_len",
        elems([heads, q_len, kv_len]),
        1 << 24,
    )?;
    let flops = elems([heads, q_len, kv_len]).and_then(|n| n.checked_mul(4 * head_dim as u64));
    too_big(
        "4 x heads x q_len x kv_len x head_dim (FLOPs)",
        flops,
        20_000_000_000,
    )?;
    let gpu = page_gpu().await?;
    let dims = Dims {
        batch: 1,
        heads,
        kv_heads,
        q_len,
        kv_len,
        head_dim,
        v_head_dim: head_dim,
    };
    let mut opts = Attention::new();
    if causal {
        opts = opts.causal(Causal::BottomRight);
    }
    if window >= 0 {
        let w = window as usize;
        opts = opts.window(w, if causal { 0 } else { w });
    }
    if softcap > 0.0 {
        opts = opts.softcap(softcap);
    }
    let mut r = Rng::new(u64::from(seed));
    let q = r.values(dims.q_elems(), 2.0);
    let k = r.values(dims.k_elems(), 1.0);
    let v = r.values(dims.v_elems(), 1.0);
    let layout = opts.get_layout();
    let tq = gpu.upload(&q, dims.q_shape(layout))?;
    let tk = gpu.upload(&k, dims.k_shape(layout))?;
    let tv = gpu.upload(&v, dims.v_shape(layout))?;
    let timed = opts.clone().path(path);
    let plan = timed.plan(&gpu, dims)?.name().to_string();
    // Once untimed: the first call compiles the pipelines.
    let warm = timed.run(&gpu, &tq, &tk, &tv)?;
    warm.o.download_async(&gpu).await?;
    let start = now_ms();
    let out = timed.run(&gpu, &tq, &tk, &tv)?;
    let o = out.o.download_async(&gpu).await?;
    let gpu_ms = now_ms() - start;
    let with_weights = opts.clone().path(Path::ThreePass).return_weights(true);
    let weights = match &with_weights.run(&gpu, &tq, &tk, &tv)?.weights {
        Some(w) => w.download_async(&gpu).await?,
        None => return Err(JsError::new("the three-pass path returned no weights")),
    };
    let start = now_ms();
    let want = cpu::fast(&q, &k, &v, dims, &opts)?;
    let cpu_ms = now_ms() - start;
    Ok(DemoResult {
        plan,
        gpu_ms,
        cpu_ms,
        max_abs_diff: max_abs_diff(&o, &want.o),
        weights: weights[..q_len * kv_len].to_vec(),
        rows: q_len,
        cols: kv_len,
    })
}
