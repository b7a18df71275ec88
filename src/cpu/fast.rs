//! Blocked, multi-threaded f32 attention on the CPU: the honest baseline the GPU paths are
//! compared with.
//!
//! # How it is blocked
//!
//! Like FlashAttention: one task computes up to 64 query rows of one (batch, unit) (a unit is a
//! head or a kv head's group, below). It walks the
//! keys in blocks of 128, and for each block and each strip of 4 query rows computes the 4 x 128
//! scores, applies softcap, bias and masks, updates the running row maximum and sum (online
//! softmax, in base 2 with `log2(e)` folded into the scale of Q), rescales the output
//! accumulator and adds `P V`. Nothing grows with `q_len * kv_len`: a task's scratch is its
//! packed Q, its output accumulator and a 4 x 128 block of scores. Key blocks outside the union
//! of the task's key ranges ([`Spec::key_range`]: causal, window, lengths) are never visited,
//! nor are key panels outside the union of a strip's ranges; the boolean mask is applied per
//! key on top.
//!
//! Both products run through one register-blocked micro-kernel, `C[4 x NR] += A B` with `NR`
//! two vectors wide, over packed operands so that every load is contiguous: K transposed into
//! panels of `NR` keys and V cut into panels of `NR` columns, Q scaled (and, for the baseline
//! copy, splatted: each value repeated across a vector, so its kernel needs no shuffles) once
//! per task, the probabilities likewise per strip. K and V are packed once per call and per
//! (batch, kv head) when several tasks read them (prefill), and block by block inside the one
//! task that reads them otherwise (decoding): a copy of all of K and V, allocated and first
//! touched per call, had made page faults most of a decoding call's time.
//!
//! # Which copy of the kernel runs
//!
//! The block code (scores, softmax, both products) exists in one copy per instruction set
//! ([`CpuKernel`]), chosen at run time from what the CPU has (`is_x86_feature_detected!`):
//! AVX-512F (`NR` = 64, fused multiply-adds), AVX2 with FMA (16), AVX2 (16), and the baseline
//! (8: SSE2 on the default x86-64 target, NEON on aarch64). The x86-64 micro-kernels are
//! written with `std::arch` intrinsics, and each copy's block code is compiled inside a
//! `#[target_feature]` function so the softmax around the kernel gets the same vectors; the
//! `unsafe` this takes is in `kernels.rs`, each block with its `SAFETY` note.
//! `WGPU_ATTENTION_CPU_KERNEL` (`sse2`, `avx2`, `avx2+fma`, `avx512f`, `baseline`) or
//! `WGPU_ATTENTION_CPU_BASELINE=1` picks another copy, [`fast_with_kernel`] one per call.
//! Before the copies were written with intrinsics, the kernel was plain loops left to LLVM's
//! vectoriser: built with `-C target-cpu=native` on an AVX-512 machine, LLVM vectorised them
//! across the four rows with a gather and a scatter per multiply-add, 15x slower than the
//! default build. `exp2` is a polynomial in plain arithmetic (the libm call does not
//! vectorise), as are the row maximum and sum, kept in 8 lanes; the AVX-512F copy has its own
//! in intrinsics (`MicroKernel::row_max` and `exp2_rows`: 16 lanes, masked tails, one tree
//! reduction, fused multiply-adds): 0-4% faster at the median on an Intel VM (pairs
//! 0.95-1.12x), where the plain loops' serial 8-lane folds were about 6% of the time. Against numpy's AVX-512 sgemm there, `cpu::fast`
//! reaches 48-66% at L = S >= 2048, D = 64 (BENCHMARKS.md); the micro-kernel loops are 63% of
//! its time, the softmax and data movement around them most of the rest.
//!
//! # How it is threaded
//!
//! rayon, one task per (batch, unit, block of 64 rows), each writing its own disjoint chunk of
//! a `Bhsd`-ordered output; for `Bshd` that output is then transposed in parallel. A unit is
//! one head when `q_len >= 64`, else a kv head's whole group, its rows in the order (head,
//! query row), so a decoding step's query heads share each K and V panel. When that still
//! makes fewer than four tasks per thread (decoding few sequences on many cores), the keys are
//! split into parts of at least 512 keys, each part a task of its own with its own partial O
//! and log-sum-exp, merged row by row afterwards (the sink logit joins once, at the merge).
//!
//! # What it measured
//!
//! `B=1, H=8, D=64`, FLOPs `4 B H L S D` (halved for causal), median of 5 calls after 2
//! warm-up calls, `--release`, the default target (no `-C target-cpu`), against numpy's and
//! XLA's sgemm on a 2048^3 product and JAX's `dot_product_attention` (XLA, jitted, f32), all
//! in one run of `benches/compare/cpu_roof.py` on a 2-vCPU AMD EPYC VM with AVX-512
//! (2026-12-02, BENCHMARKS.md has every shape):
//!
//! | GFLOP/s, L = S = 2048 | full | causal |
//! | --- | --- | --- |
//! | `fast`, AVX-512F copy (chosen) | 312-316 | 305-306 |
//! | numpy sgemm (OpenBLAS, an AVX2 kernel on this CPU) | 259-261 | |
//! | XLA sgemm (`jnp.dot`) | 492-498 | |
//! | `jax.nn.dot_product_attention` 0.10.2 | 58-59 | 33-39 |
//!
//! Before the copies, on the same VM in its slower mode: 80 with the default build (the AVX2
//! copy without FMA), 5.7 built with `-C target-cpu=native`. The copies alone, one slower
//! session: SSE2 62, AVX2 116, AVX2+FMA 142, AVX-512F 224 (at `NR` = 32). A decoding step
//! (B=1, 32 query heads over 8 kv heads, D=128, S=16384, one query) went from 72 ms to 7 ms
//! (19.5 GB/s of K and V read), 6.6-6.9x JAX.
//!
//! # Differences from [`reference`](super::reference())
//!
//! Accumulation is f32, so results agree with the f64 reference to about `1e-6` relative (more
//! for large logits: the scores' rounding error grows with their magnitude). The attention
//! weights are never returned, even when the options ask for them: `fast` only ever holds
//! 4 x 128 scores at a time. A score that overflows f32 (inputs near `f32::MAX`) is saturated to
//! `f32::MAX`, or dropped when it is NaN (`inf - inf` inside the dot product), so no output is
//! NaN.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::spec::{Attention, Dims, Dropout, Layout, Spec, broadcast_strides};

use super::reference::at;

mod kernels;

pub use kernels::CpuKernel;
#[cfg(target_arch = "x86_64")]
use kernels::{Avx2, Avx2Fma, Avx512};
use kernels::{Baseline, MR, MicroKernel, Panel};

/// Keys per block (128 measured a few percent faster than 64, full and causal).
const BC: usize = 128;
/// Query rows per task, at most.
const BR: usize = 64;
/// Keys per split, at least, when a shape with few tasks has its keys split across threads.
const SPLIT_KEYS: usize = 512;

/// The result of [`fast`].
#[derive(Debug, Clone, PartialEq)]
pub struct FastOutput {
    /// The output, in the layout of the options: `[batch, heads, q_len, v_head_dim]` for `Bhsd`.
    pub o: Vec<f32>,
    /// Natural log-sum-exp of each row's scores, `[batch, heads, q_len]`; `-inf` for a row with
    /// no allowed key.
    pub lse: Vec<f32>,
}

/// Computes attention on the CPU in f32: blocked like FlashAttention (online softmax, no
/// `q_len x kv_len` buffer), SIMD through a register-blocked micro-kernel, multi-threaded with
/// rayon over (batch, head, block of 64 query rows).
///
/// Takes the same inputs as [`reference`](super::reference()) and supports every option it
/// does (layouts, grouped-query attention, scale, softcap, bias, boolean mask, causal masking,
/// sliding window, `kv_lens`, `q_lens`, dropout with the same pattern), with the same
/// validation and errors. It returns O and
/// the log-sum-exp, never the attention weights: [`Attention::return_weights`] is ignored.
/// Besides O it allocates a packed copy of K and V (their size, plus padding to whole panels).
/// Results agree with the reference to about `1e-6` relative; scores that overflow f32 are
/// saturated, so finite input never gives NaN.
///
/// It runs the fastest copy of its block kernel the CPU has ([`CpuKernel::chosen`]: AVX-512F,
/// AVX2 with FMA, AVX2 or the baseline), chosen at run time, so a default build and one with
/// `-C target-cpu=native` run the same kernel.
///
/// ```
/// use wgpu_attention::{Attention, Causal, Dims, cpu};
/// let dims = Dims::new(1, 2, 3, 4);
/// let x: Vec<f32> = (0..24).map(|i| (i as f32 * 0.37).sin()).collect();
/// let opts = Attention::new().causal(Causal::TopLeft);
/// let fast = cpu::fast(&x, &x, &x, dims, &opts)?;
/// let exact = cpu::reference(&x, &x, &x, dims, &opts)?;
/// for (a, b) in fast.o.iter().zip(&exact.o) {
///     assert!((a - b).abs() < 1e-5);
/// }
/// # Ok::<(), wgpu_attention::Error>(())
/// ```
///
/// Inputs may be `f32`, `half::f16` or `half::bf16` ([`HostElement`]); half precision is
/// widened to f32 once (f32 inputs are not copied).
pub fn fast<Q, K, V>(q: &[Q], k: &[K], v: &[V], dims: Dims, opts: &Attention) -> Result<FastOutput>
where
    Q: HostElement,
    K: HostElement,
    V: HostElement,
{
    fast_f32(
        CpuKernel::chosen(),
        &Q::widen(q),
        &K::widen(k),
        &V::widen(v),
        dims,
        opts,
    )
}

/// [`fast`] with the copy of its block kernel named instead of chosen ([`CpuKernel`]): to
/// compare the copies, or to test each one. The results of two copies differ by rounding
/// (fused multiply-adds, the order of sums), within [`fast`]'s tolerance of the reference.
///
/// A kernel this CPU cannot run is a typed [`Error::InvalidOption`], never a crash.
///
/// ```
/// use wgpu_attention::{Attention, Dims, cpu};
/// let dims = Dims::new(1, 2, 5, 8);
/// let x: Vec<f32> = (0..80).map(|i| (i as f32 * 0.37).sin()).collect();
/// let opts = Attention::new();
/// for kernel in cpu::CpuKernel::available() {
///     let out = cpu::fast_with_kernel(kernel, &x, &x, &x, dims, &opts)?;
///     assert_eq!(out.o.len(), 80);
/// }
/// # Ok::<(), wgpu_attention::Error>(())
/// ```
pub fn fast_with_kernel<Q, K, V>(
    kernel: CpuKernel,
    q: &[Q],
    k: &[K],
    v: &[V],
    dims: Dims,
    opts: &Attention,
) -> Result<FastOutput>
where
    Q: HostElement,
    K: HostElement,
    V: HostElement,
{
    kernel.check()?;
    fast_f32(kernel, &Q::widen(q), &K::widen(k), &V::widen(v), dims, opts)
}

/// A host element type the CPU paths read: f32, or half precision widened to f32.
pub trait HostElement: Copy {
    /// The values as f32, borrowed when they already are.
    fn widen(x: &[Self]) -> std::borrow::Cow<'_, [f32]>;
}

impl HostElement for f32 {
    fn widen(x: &[f32]) -> std::borrow::Cow<'_, [f32]> {
        std::borrow::Cow::Borrowed(x)
    }
}

/// Through `half`'s slice conversion, which uses F16C where the CPU has it (detected at run
/// time).
impl HostElement for half::f16 {
    fn widen(x: &[half::f16]) -> std::borrow::Cow<'_, [f32]> {
        use half::slice::HalfFloatSliceExt;
        let mut out = vec![0f32; x.len()];
        x.convert_to_f32_slice(&mut out);
        std::borrow::Cow::Owned(out)
    }
}

impl HostElement for half::bf16 {
    fn widen(x: &[half::bf16]) -> std::borrow::Cow<'_, [f32]> {
        use half::slice::HalfFloatSliceExt;
        let mut out = vec![0f32; x.len()];
        x.convert_to_f32_slice(&mut out);
        std::borrow::Cow::Owned(out)
    }
}

fn fast_f32(
    kernel: CpuKernel,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dims: Dims,
    opts: &Attention,
) -> Result<FastOutput> {
    let spec = opts.validate(dims)?;
    opts.require_host_options()?;
    if let Some((packing, [q, k, v], flat)) = opts.unpack((q, k, v), dims)? {
        // A packed batch: the same computation padded, O packed again.
        let padded = fast_f32(kernel, &q, &k, &v, dims, &flat)?;
        return Ok(FastOutput {
            o: packing.pack(&padded.o),
            ..padded
        });
    }
    if let Some(pages) = &opts.pages {
        // Paged K/V: gathered through the block table, then the contiguous computation.
        let (k, v) = pages.unpage(k, v, dims, opts.layout)?;
        let flat = Attention {
            pages: None,
            ..opts.clone()
        };
        return fast_f32(kernel, q, &k, &v, dims, &flat);
    }
    if opts.additive.is_some() {
        return Err(Error::InvalidOption {
            what: "additive",
            value: "Some".into(),
            why: "cpu::fast computes dot-product scores only; use cpu::reference",
        });
    }
    let layout = opts.layout;
    super::reference::check_len("Q", q, dims.q_shape(layout))?;
    super::reference::check_len("K", k, dims.k_shape(layout))?;
    super::reference::check_len("V", v, dims.v_shape(layout))?;

    Ok(match kernel {
        #[cfg(target_arch = "x86_64")]
        CpuKernel::Avx512 => compute::<64, Avx512>(spec, q, k, v),
        #[cfg(target_arch = "x86_64")]
        CpuKernel::Avx2Fma => compute::<16, Avx2Fma>(spec, q, k, v),
        #[cfg(target_arch = "x86_64")]
        CpuKernel::Avx2 => compute::<16, Avx2>(spec, q, k, v),
        _ => compute::<8, Baseline>(spec, q, k, v),
    })
}

/// The computation of a validated call of plain (unpacked, unpaged) inputs with the copy `B`
/// of the block kernel.
fn compute<const NR: usize, B: Block<NR>>(
    spec: Spec<'_>,
    q: &[f32],
    k: &[f32],
    v: &[f32],
) -> FastOutput {
    let dims = spec.dims;
    let layout = spec.opts.layout;
    let problem = Problem::<NR>::new(spec, q, k, v);
    let (heads, q_len, dv, kv_len) = (dims.heads, dims.q_len, dims.v_head_dim, dims.kv_len);
    let mut o = vec![0f32; dims.o_elems()];
    let mut lse = vec![0f32; dims.lse_elems()];
    let splits = problem.key_splits();
    if splits == 1 {
        problem.run_passes::<B>(vec![((0, kv_len), true, &mut o, &mut lse)]);
    } else {
        // Few tasks and many keys (decoding): each split of the keys into its own partial
        // O and log-sum-exp, all splits in one parallel pass, then merged row by row.
        let chunk = kv_len.div_ceil(splits).next_multiple_of(BC);
        let splits = kv_len.div_ceil(chunk);
        let mut part_o = vec![0f32; splits * o.len()];
        let mut part_lse = vec![0f32; splits * lse.len()];
        let passes = part_o
            .chunks_mut(o.len())
            .zip(part_lse.chunks_mut(lse.len()))
            .enumerate()
            .map(|(sp, (po, pl))| ((sp * chunk, kv_len.min((sp + 1) * chunk)), false, po, pl))
            .collect();
        problem.run_passes::<B>(passes);
        let sinks = problem.spec.opts.sinks.as_deref();
        let (part_o, part_lse) = (&part_o, &part_lse);
        let rows = lse.len();
        o.par_chunks_mut(dv)
            .zip(lse.par_iter_mut())
            .enumerate()
            .for_each(|(row, (dst, row_lse))| {
                let sink = sinks.map(|s| s[row / q_len % heads]);
                let top = (0..splits)
                    .map(|sp| part_lse[sp * rows + row])
                    .chain(sink)
                    .fold(f32::NEG_INFINITY, f32::max);
                dst.fill(0.0);
                if top == f32::NEG_INFINITY {
                    *row_lse = f32::NEG_INFINITY;
                    return;
                }
                let mut total = sink.map_or(0.0, |s| (s - top).exp());
                for sp in 0..splits {
                    let w = (part_lse[sp * rows + row] - top).exp();
                    if w > 0.0 {
                        total += w;
                        let src = &part_o[(sp * rows + row) * dv..][..dv];
                        dst.iter_mut().zip(src).for_each(|(x, &y)| *x += w * y);
                    }
                }
                dst.iter_mut().for_each(|x| *x /= total);
                *row_lse = top + total.ln();
            });
    }
    if layout == Layout::Bshd {
        let staged = o;
        o = vec![0f32; dims.o_elems()];
        o.par_chunks_mut(heads * dv)
            .enumerate()
            .for_each(|(bi, row)| {
                let (b, i) = (bi / q_len, bi % q_len);
                for (h, dst) in row.chunks_exact_mut(dv).enumerate() {
                    dst.copy_from_slice(&staged[((b * heads + h) * q_len + i) * dv..][..dv]);
                }
            });
    }
    FastOutput { o, lse }
}

/// A validated call with everything a task needs, shared read-only between tasks.
struct Problem<'a, const NR: usize> {
    spec: Spec<'a>,
    q: &'a [f32],
    /// `(batch, head, seq)` element strides of Q.
    qs: [usize; 3],
    k: &'a [f32],
    /// `(batch, head, seq)` element strides of K.
    ks: [usize; 3],
    v: &'a [f32],
    /// `(batch, head, seq)` element strides of V.
    vs: [usize; 3],
    /// Whether each task packs the K and V blocks it visits into its scratch
    /// ([`Scratch::kb`], [`Scratch::vb`]) instead of the whole of K and V being packed once
    /// up front ([`Problem::kp`], [`Problem::vp`], then empty). True when a unit's rows fit one
    /// task (decoding), so that every block is used by one task anyway: packing as it goes
    /// then costs the same moves without allocating and first touching a copy of all of K and
    /// V (page faults were most of a decoding call's time).
    pack_per_task: bool,
    /// K of each (batch, kv head), transposed into panels of `NR` keys:
    /// `[batch * kv_heads][key panel][head_dim]`, keys past `kv_len` zero.
    kp: Vec<Panel<NR>>,
    /// V of each (batch, kv head) in panels of `NR` columns:
    /// `[batch * kv_heads][column panel][kv_len rounded up to NR]`.
    vp: Vec<Panel<NR>>,
    mask: Option<([usize; 4], &'a [bool])>,
    bias: Option<([usize; 4], &'a [f32])>,
    softcap: Option<f32>,
    /// The user's mask and score mods (their CPU forms).
    mods: Option<&'a crate::ScoreMod>,
    /// Dropout: the dropped weights are zeroed on their way into P·V (the row sums count
    /// them) and each output row is scaled by `1 / (1 - p)`, as on the GPU.
    dropout: Option<Dropout>,
    /// V's factor (`Attention::kv_scales`), applied to O with its normalisation.
    v_scale: f32,
    /// Folded into Q when it is packed: the score scale, times `log2(e)` unless a softcap or a
    /// bias has to be applied in natural units first.
    q_scale: f32,
    /// Whether scores come out of `Q K^T` in natural units and need `transform_row`.
    transform: bool,
    /// Query heads whose rows one task may hold: the kv head's whole group when `q_len` is
    /// below [`BR`] (decoding: the group's heads share every K and V panel), else 1.
    heads_per_unit: usize,
    /// Query rows per task: up to [`BR`] of a unit's `heads_per_unit * q_len`.
    br: usize,
    /// Key panels per (batch, kv head); `kv_len` rounded up to `NR` is `key_panels * NR`.
    key_panels: usize,
    /// Panels of `NR` columns covering `v_head_dim`.
    v_panels: usize,
}

/// One pass of [`Problem::run_passes`]: the keys, whether the sink logit joins, and the O and
/// log-sum-exp it fills.
type Pass<'o> = ((usize, usize), bool, &'o mut [f32], &'o mut [f32]);

/// Which rows a task computes, against which keys: rows `t0..t0 + rows` of the unit of
/// batch entry `b` whose first head is `h0`, in the order (head, query row), so row `t` is
/// query row `t % q_len` of head `h0 + t / q_len`; only keys `keys.0..keys.1`, and the sink
/// logit only if `with_sink` (a split of the keys leaves it to the merge).
#[derive(Debug, Clone, Copy)]
struct Task {
    b: usize,
    h0: usize,
    t0: usize,
    keys: (usize, usize),
    with_sink: bool,
}

/// Per-thread buffers of the copy `K` of the micro-kernel, reused from task to task.
struct Scratch<const NR: usize, K: MicroKernel<NR>> {
    /// Q of the task, scaled, in the kernel's form: `[strip][head_dim]` of `MR` rows.
    qp: Vec<K::A>,
    /// Probabilities of one strip for the current key block, in the kernel's form: `[key]` of
    /// `MR` rows.
    pp: Vec<K::A>,
    /// Unnormalised output: `[strip][column panel]` of `MR x NR` tiles.
    acc: Vec<[[f32; NR]; MR]>,
    /// Running row maximum (base-2 units) and sum.
    m: Vec<f32>,
    l: Vec<f32>,
    /// The task's K block when [`Problem::pack_per_task`]: `[key panel][head_dim]`.
    kb: Vec<Panel<NR>>,
    /// The task's V block when [`Problem::pack_per_task`]: `[column panel][BC keys]`.
    vb: Vec<Panel<NR>>,
    /// Head and query row of each row of the task.
    rows: Vec<(usize, usize)>,
    /// Key range of each row of the task.
    ranges: Vec<(usize, usize)>,
    /// Keys inside each row's range that it does not see (between StreamingLLM's sink keys
    /// and its window), masked in `transform_row`; empty for most rows.
    holes: Vec<(usize, usize)>,
}

impl<const NR: usize, K: MicroKernel<NR>> Scratch<NR, K> {
    fn new(p: &Problem<'_, NR>) -> Self {
        let d = p.spec.dims.head_dim;
        let strips = p.br.div_ceil(MR);
        Scratch {
            qp: vec![K::ZERO; strips * d],
            pp: vec![K::ZERO; BC],
            acc: vec![[[0.0; NR]; MR]; strips * p.v_panels],
            m: vec![0.0; strips * MR],
            l: vec![0.0; strips * MR],
            kb: if p.pack_per_task {
                vec![Panel::default(); BC / NR * d]
            } else {
                Vec::new()
            },
            vb: if p.pack_per_task {
                vec![Panel::default(); p.v_panels * BC]
            } else {
                Vec::new()
            },
            rows: vec![(0, 0); strips * MR],
            ranges: vec![(0, 0); strips * MR],
            holes: vec![(0, 0); strips * MR],
        }
    }
}

impl<'a, const NR: usize> Problem<'a, NR> {
    /// Resolves the options and packs K and V (in parallel, one task per (batch, kv head)).
    fn new(spec: Spec<'a>, q: &'a [f32], k: &'a [f32], v: &'a [f32]) -> Self {
        let dims = spec.dims;
        let opts = spec.opts;
        let layout = opts.layout;
        let (d, dv, kv_len) = (dims.head_dim, dims.v_head_dim, dims.kv_len);
        let key_panels = kv_len.div_ceil(NR);
        let kv_pad = key_panels * NR;
        let v_panels = dv.div_ceil(NR);

        let heads_per_unit = if dims.q_len < BR { dims.group() } else { 1 };
        let mut problem = Problem {
            spec,
            q,
            qs: layout.strides(dims.heads, dims.q_len, d),
            k,
            ks: layout.strides(dims.kv_heads, kv_len, d),
            v,
            vs: layout.strides(dims.kv_heads, kv_len, dv),
            kp: Vec::new(),
            vp: Vec::new(),
            pack_per_task: heads_per_unit * dims.q_len <= BR,
            mask: opts
                .mask
                .as_ref()
                .map(|m| (broadcast_strides(m.shape), m.data.as_slice())),
            bias: opts
                .bias
                .as_ref()
                .map(|m| (broadcast_strides(m.shape), m.data.as_slice())),
            softcap: opts.softcap,
            mods: opts.score_mod.as_ref().filter(|m| m.any()),
            dropout: opts.active_dropout(),
            v_scale: opts.v_scale(),
            q_scale: 0.0,
            transform: false,
            heads_per_unit,
            br: BR.min((heads_per_unit * dims.q_len).next_multiple_of(MR)),
            key_panels,
            v_panels,
        };
        if !problem.pack_per_task {
            let mut kp = vec![Panel::default(); dims.batch * dims.kv_heads * key_panels * d];
            kp.par_chunks_mut(key_panels * d)
                .enumerate()
                .for_each(|(bk, dst)| problem.pack_k(bk, 0, kv_len, dst));
            let mut vp = vec![Panel::default(); dims.batch * dims.kv_heads * v_panels * kv_pad];
            vp.par_chunks_mut(v_panels * kv_pad)
                .enumerate()
                .for_each(|(bk, dst)| problem.pack_v(bk, 0, kv_len, dst, kv_pad));
            (problem.kp, problem.vp) = (kp, vp);
        }

        let transform = opts.softcap.is_some()
            || opts.bias.is_some()
            || opts.alibi.is_some()
            || problem.mods.is_some_and(|m| m.has_score());
        problem.q_scale = if transform {
            spec.scale
        } else {
            spec.scale * std::f32::consts::LOG2_E
        };
        problem.transform = transform;
        problem
    }

    /// Writes keys `j0..j1` of (batch, kv head) `bk` into `dst` transposed, in panels of
    /// `NR` keys from `j0` (`[panel][head_dim]`), leaving the lanes past `j1` as they were.
    #[inline(always)]
    fn pack_k(&self, bk: usize, j0: usize, j1: usize, dst: &mut [Panel<NR>]) {
        let (d, ks) = (self.spec.dims.head_dim, self.ks);
        let kv_heads = self.spec.dims.kv_heads;
        let base = bk / kv_heads * ks[0] + bk % kv_heads * ks[1];
        for j in j0..j1 {
            let src = &self.k[base + j * ks[2]..][..d];
            let (p, lane) = ((j - j0) / NR, (j - j0) % NR);
            for (x, &y) in dst[p * d..][..d].iter_mut().zip(src) {
                x.0[lane] = y;
            }
        }
    }

    /// Writes the values of keys `j0..j1` of (batch, kv head) `bk` into `dst` in panels of
    /// `NR` columns, `stride` panels apart (`[column panel][key from j0]`); the columns past
    /// `v_head_dim` are left as they were.
    #[inline(always)]
    fn pack_v(&self, bk: usize, j0: usize, j1: usize, dst: &mut [Panel<NR>], stride: usize) {
        let (dv, vs) = (self.spec.dims.v_head_dim, self.vs);
        let kv_heads = self.spec.dims.kv_heads;
        let base = bk / kv_heads * vs[0] + bk % kv_heads * vs[1];
        for j in j0..j1 {
            let src = &self.v[base + j * vs[2]..][..dv];
            for (p, cols) in src.chunks(NR).enumerate() {
                dst[p * stride + j - j0].0[..cols.len()].copy_from_slice(cols);
            }
        }
    }

    /// How many parts to split the keys into: enough for about four tasks per thread when the
    /// shape has fewer (decoding), each part at least [`SPLIT_KEYS`] keys.
    fn key_splits(&self) -> usize {
        let dims = self.spec.dims;
        let units = dims.batch * dims.heads / self.heads_per_unit;
        let tasks = units * (self.heads_per_unit * dims.q_len).div_ceil(self.br);
        let want = (4 * rayon::current_num_threads()).div_ceil(tasks);
        want.min(dims.kv_len / SPLIT_KEYS).max(1)
    }

    /// Runs every task of each pass `(keys, with_sink, o, lse)` in one parallel loop: the
    /// whole of O and the log-sum-exp over the keys `keys.0..keys.1`, in `Bhsd` order.
    fn run_passes<B: Block<NR>>(&self, passes: Vec<Pass<'_>>) {
        let dims = self.spec.dims;
        let (q_len, dv, br) = (dims.q_len, dims.v_head_dim, self.br);
        let unit_rows = self.heads_per_unit * q_len;
        let units_per_batch = dims.heads / self.heads_per_unit;
        // Bhsd order: a unit's heads are consecutive, so it owns `unit_rows` contiguous rows,
        // each task `br` of them.
        let tasks: Vec<(Task, &mut [f32], &mut [f32])> = passes
            .into_iter()
            .flat_map(|(keys, with_sink, o, lse)| {
                o.chunks_mut(unit_rows * dv)
                    .zip(lse.chunks_mut(unit_rows))
                    .enumerate()
                    .flat_map(move |(u, (o_u, lse_u))| {
                        o_u.chunks_mut(br * dv)
                            .zip(lse_u.chunks_mut(br))
                            .enumerate()
                            .map(move |(blk, (o_blk, lse_blk))| {
                                let task = Task {
                                    b: u / units_per_batch,
                                    h0: u % units_per_batch * self.heads_per_unit,
                                    t0: blk * br,
                                    keys,
                                    with_sink,
                                };
                                (task, o_blk, lse_blk)
                            })
                    })
            })
            .collect();
        tasks.into_par_iter().for_each_init(
            || Scratch::<NR, B>::new(self),
            |scratch, (task, o_blk, lse_blk)| B::block(self, task, o_blk, lse_blk, scratch),
        );
    }

    /// Computes the task's rows, as many as `lse` holds: `o` receives those rows of O,
    /// `v_head_dim` wide, and `lse` their log-sum-exp.
    #[inline(always)]
    fn run_block<K: MicroKernel<NR>>(
        &self,
        task: Task,
        o: &mut [f32],
        lse: &mut [f32],
        s: &mut Scratch<NR, K>,
    ) {
        let dims = self.spec.dims;
        let (d, dv, np) = (dims.head_dim, dims.v_head_dim, self.v_panels);
        let Task { b, h0, t0, .. } = task;
        let (k0, k1) = task.keys;
        let rows = lse.len();
        let strips = rows.div_ceil(MR);
        let q_len = dims.q_len;
        for (r, hi) in s.rows[..rows].iter_mut().enumerate() {
            *hi = (h0 + (t0 + r) / q_len, (t0 + r) % q_len);
        }

        let (mut lo_all, mut hi_all) = (usize::MAX, 0);
        let ranges = s.ranges[..strips * MR].iter_mut();
        for (r, (range, hole)) in ranges.zip(&mut s.holes).enumerate() {
            let i = s.rows.get(r).filter(|_| r < rows).map(|&(_, i)| i);
            *range = i.map_or((0, 0), |i| self.spec.key_range(b, i));
            *hole = (0, 0);
            let sink_end = i.map_or(0, |i| self.spec.sink_end(b, i));
            if sink_end > 0 {
                // Sink keys 0..sink_end and the window lo..hi, as one range with a hole.
                if range.0 >= range.1 {
                    *range = (0, sink_end);
                } else {
                    if sink_end < range.0 {
                        *hole = (sink_end, range.0);
                    }
                    *range = (0, range.1.max(sink_end));
                }
            }
            // This task's share of the keys.
            *range = (range.0.max(k0), range.1.min(k1));
            if range.0 >= range.1 {
                *range = (0, 0);
            }
            if range.0 < range.1 {
                lo_all = lo_all.min(range.0);
                hi_all = hi_all.max(range.1);
            }
        }
        let sinks = self.spec.opts.sinks.as_deref().filter(|_| task.with_sink);
        if lo_all >= hi_all {
            o.fill(0.0);
            for (l, &(h, _)) in lse.iter_mut().zip(&s.rows) {
                *l = sinks.map_or(f32::NEG_INFINITY, |s| s[h]);
            }
            return;
        }

        // Q, scaled, in the kernel's form; rows past the end of the block are zero.
        for st in 0..strips {
            let src: [Option<&[f32]>; MR] = std::array::from_fn(|r| {
                let r = st * MR + r;
                (r < rows).then(|| {
                    let (h, i) = s.rows[r];
                    &self.q[b * self.qs[0] + h * self.qs[1] + i * self.qs[2]..][..d]
                })
            });
            for (c, x) in s.qp[st * d..][..d].iter_mut().enumerate() {
                *x = K::a(std::array::from_fn(|r| {
                    src[r].map_or(0.0, |row| row[c] * self.q_scale)
                }));
            }
        }
        s.m[..strips * MR].fill(f32::NEG_INFINITY);
        s.l[..strips * MR].fill(0.0);
        s.acc[..strips * np].fill([[0.0; NR]; MR]);

        // Key blocks aligned to BC, so they start on a panel of the packed K and V.
        let bk = b * dims.kv_heads + h0 / dims.group();
        let (mut kb, mut vb) = (std::mem::take(&mut s.kb), std::mem::take(&mut s.vb));
        for jb in lo_all / BC..hi_all.div_ceil(BC) {
            let (j0, j1) = (jb * BC, hi_all.min((jb + 1) * BC));
            let kv = if self.pack_per_task {
                // The block's keys only: this task is the one that reads them.
                self.pack_k(bk, j0, j1, &mut kb);
                self.pack_v(bk, j0, j1, &mut vb, BC);
                KvBlock {
                    kp: &kb,
                    vp: &vb,
                    base: j0,
                    v_stride: BC,
                    j0,
                    j1,
                }
            } else {
                let kv_pad = self.key_panels * NR;
                KvBlock {
                    kp: &self.kp[bk * self.key_panels * d..][..self.key_panels * d],
                    vp: &self.vp[bk * np * kv_pad..][..np * kv_pad],
                    base: 0,
                    v_stride: kv_pad,
                    j0,
                    j1,
                }
            };
            for st in 0..strips {
                self.strip(task, st, &kv, s);
            }
        }
        (s.kb, s.vb) = (kb, vb);

        for (r, (dst, row_lse)) in o.chunks_exact_mut(dv).zip(lse.iter_mut()).enumerate() {
            let (st, rr) = (r / MR, r % MR);
            let (mut m, mut l) = (s.m[r], s.l[r]);
            // A sink joins the sum (base-2 units here) and attends to nothing.
            let mut o_scale = 1.0;
            if let Some(sink) = sinks.map(|sinks| sinks[s.rows[r].0]) {
                let sink2 = sink * std::f32::consts::LOG2_E;
                let top = m.max(sink2);
                o_scale = if m == f32::NEG_INFINITY {
                    0.0
                } else {
                    exp2(m - top)
                };
                l = l * o_scale + exp2(sink2 - top);
                m = top;
            }
            if m == f32::NEG_INFINITY {
                dst.fill(0.0);
                *row_lse = f32::NEG_INFINITY;
                continue;
            }
            let inv = o_scale / l * self.dropout.map_or(1.0, |d| d.scale()) * self.v_scale;
            let tiles = &s.acc[st * np..][..np];
            for (c, x) in dst.iter_mut().enumerate() {
                *x = tiles[c / NR][rr][c % NR] * inv;
            }
            *row_lse = (m + l.log2()) * std::f32::consts::LN_2;
        }
    }

    /// One strip of `MR` query rows against the keys `kv.j0..kv.j1`.
    #[inline(always)]
    fn strip<K: MicroKernel<NR>>(
        &self,
        task: Task,
        st: usize,
        kv: &KvBlock<'_, NR>,
        s: &mut Scratch<NR, K>,
    ) {
        let b = task.b;
        let dims = self.spec.dims;
        let (d, np) = (dims.head_dim, self.v_panels);
        let (j0, j1) = (kv.j0, kv.j1);
        // Offsets into the packed K and V: the block's first panel and key.
        let (k_off, vs) = ((j0 - kv.base) / NR, kv.v_stride);
        let v_off = j0 - kv.base;
        // The strip's keys inside this block, relative to j0.
        let ranges = &s.ranges[st * MR..][..MR];
        let mut lo = usize::MAX;
        let mut hi = 0;
        for &(a, e) in ranges {
            let (a, e) = (a.max(j0), e.min(j1));
            if a < e {
                lo = lo.min(a - j0);
                hi = hi.max(e - j0);
            }
        }
        if lo >= hi {
            return;
        }

        let mut scores = [[0f32; BC]; MR];
        let a = &s.qp[st * d..][..d];
        for p in lo / NR..hi.div_ceil(NR) {
            let mut c = [[0f32; NR]; MR];
            K::tile(a, &kv.kp[(k_off + p) * d..][..d], &mut c);
            for (row, c) in scores.iter_mut().zip(&c) {
                row[p * NR..][..NR].copy_from_slice(c);
            }
        }

        let mut probs = [[0f32; BC]; MR];
        for r in 0..MR {
            let row = st * MR + r;
            let (a, e) = ranges[r];
            let (a, e) = (a.max(j0), e.min(j1));
            if a >= e {
                continue;
            }
            let (a, e) = (a - j0, e - j0);
            let sr = &mut scores[r][a..e];
            let pr = &mut probs[r][a..e];
            // Keys between the sink keys and the window.
            let (ha, he) = s.holes[row];
            if self.transform || self.mask.is_some() || self.mods.is_some() {
                let (h, i) = s.rows[row];
                self.transform_row(b, h, i, j0 + a, sr, (ha, he));
            }
            for x in &mut sr[ha.clamp(j0 + a, j0 + e) - j0 - a..he.clamp(j0 + a, j0 + e) - j0 - a] {
                *x = f32::NEG_INFINITY;
            }
            let mut m_blk = K::row_max(sr);
            if m_blk == f32::NEG_INFINITY {
                continue;
            }
            let m_old = s.m[row];
            let mut m_new = m_old.max(m_blk);
            let mut l_blk = K::exp2_rows(sr, m_new, pr);
            if !l_blk.is_finite() {
                // A score overflowed f32: saturate it (NaN, from inf - inf, drops the key).
                for x in sr.iter_mut() {
                    if x.is_nan() {
                        *x = f32::NEG_INFINITY;
                    } else if *x == f32::INFINITY {
                        *x = f32::MAX;
                    }
                }
                m_blk = K::row_max(sr);
                if m_blk == f32::NEG_INFINITY {
                    pr.fill(0.0);
                    continue;
                }
                m_new = m_old.max(m_blk);
                l_blk = K::exp2_rows(sr, m_new, pr);
            }
            if let Some(drop) = self.dropout {
                let (h, i) = s.rows[row];
                let state = drop.row((b * dims.heads + h) as u32, i as u32);
                // As the kernels decide (at p = 1 one weight in 2^32 passes; its scale is 0).
                let (first, threshold) = ((j0 + a) as u32, drop.threshold());
                for (n, x) in pr.iter_mut().enumerate() {
                    if Dropout::bits(state, first + n as u32) < threshold {
                        *x = 0.0;
                    }
                }
            }
            let alpha = exp2(m_old - m_new);
            s.m[row] = m_new;
            s.l[row] = s.l[row] * alpha + l_blk;
            if alpha != 1.0 {
                for t in &mut s.acc[st * np..][..np] {
                    t[r].iter_mut().for_each(|x| *x *= alpha);
                }
            }
        }

        for (j, dst) in s.pp[lo..hi].iter_mut().enumerate() {
            *dst = K::a(std::array::from_fn(|r| probs[r][lo + j]));
        }
        let pp = &s.pp[lo..hi];
        for (p, c) in s.acc[st * np..][..np].iter_mut().enumerate() {
            K::tile(pp, &kv.vp[p * vs + v_off + lo..p * vs + v_off + hi], c);
        }
    }

    /// Softcap, score mod and bias in natural units, then to base 2, and the boolean mask and
    /// the mask mod as `-inf`, for keys `j..j + s.len()` of row `i`; the mods are not called
    /// for the keys of `hole` (which the caller masks) nor for keys the boolean mask removes,
    /// and the score mod not for keys the mask mod removes.
    #[inline(always)]
    fn transform_row(
        &self,
        b: usize,
        h: usize,
        i: usize,
        j: usize,
        s: &mut [f32],
        hole: (usize, usize),
    ) {
        if let Some(cap) = self.softcap {
            for x in s.iter_mut() {
                *x = cap * (*x / cap).tanh();
            }
        }
        let mask_keeps = |key: usize| {
            self.mask
                .is_none_or(|(st, data)| data[at(st, b, h, i, key)])
        };
        let mod_sees = |key: usize, m: &crate::ScoreMod| {
            !(hole.0..hole.1).contains(&key) && mask_keeps(key) && m.keeps(b, h, i, key)
        };
        if let Some(m) = self.mods.filter(|m| m.has_score()) {
            for (t, x) in s.iter_mut().enumerate() {
                if mod_sees(j + t, m) {
                    *x = m.apply(*x as f64, b, h, i, j + t).0 as f32;
                }
            }
        }
        if let Some((st, data)) = self.bias {
            let base = b * st[0] + h * st[1] + i * st[2];
            for (t, x) in s.iter_mut().enumerate() {
                *x += data[base + (j + t) * st[3]];
            }
        }
        if let Some(slope) = self.spec.alibi_slope(b, h) {
            let diagonal = i as i64 + self.spec.diagonal_offset(b);
            for (t, x) in s.iter_mut().enumerate() {
                *x -= slope * (diagonal - (j + t) as i64).unsigned_abs() as f32;
            }
        }
        if self.bias.is_some()
            || self.spec.opts.alibi.is_some()
            || self.mods.is_some_and(|m| m.has_score())
        {
            s.iter_mut()
                .for_each(|x| *x = x.max(crate::spec::SCORE_FLOOR));
        }
        if self.transform {
            s.iter_mut().for_each(|x| *x *= std::f32::consts::LOG2_E);
        }
        if let Some((st, data)) = self.mask {
            let base = b * st[0] + h * st[1] + i * st[2];
            for (t, x) in s.iter_mut().enumerate() {
                if !data[base + (j + t) * st[3]] {
                    *x = f32::NEG_INFINITY;
                }
            }
        }
        if let Some(m) = self.mods.filter(|m| m.has_mask()) {
            for (t, x) in s.iter_mut().enumerate() {
                if !mod_sees(j + t, m) {
                    *x = f32::NEG_INFINITY;
                }
            }
        }
    }
}

/// The packed K and V of one (batch, kv head) (all of them, or the current block's), and the
/// keys `j0..j1` of the current block (`j0` a multiple of `BC`).
#[derive(Clone, Copy)]
struct KvBlock<'a, const NR: usize> {
    /// K from key `base` on, in panels of `NR` keys.
    kp: &'a [Panel<NR>],
    /// V from key `base` on, `v_stride` panels per column panel.
    vp: &'a [Panel<NR>],
    base: usize,
    v_stride: usize,
    j0: usize,
    j1: usize,
}

/// A copy of the micro-kernel with its entry: [`Problem::run_block`] inlined into a function
/// compiled for the copy's target features, so the softmax and the splats around the
/// micro-kernel get the same vectors.
trait Block<const NR: usize>: MicroKernel<NR> {
    fn block(
        p: &Problem<'_, NR>,
        task: Task,
        o: &mut [f32],
        lse: &mut [f32],
        s: &mut Scratch<NR, Self>,
    );
}

impl Block<8> for Baseline {
    fn block(
        p: &Problem<'_, 8>,
        task: Task,
        o: &mut [f32],
        lse: &mut [f32],
        s: &mut Scratch<8, Self>,
    ) {
        p.run_block(task, o, lse, s);
    }
}

/// The entry of an x86-64 copy: `$entry` compiled with `$features`, and `$kernel`'s `Block`.
macro_rules! x86_block {
    ($kernel:ident, $nr:literal, $features:literal, $entry:ident) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        fn $entry(
            p: &Problem<'_, $nr>,
            task: Task,
            o: &mut [f32],
            lse: &mut [f32],
            s: &mut Scratch<$nr, $kernel>,
        ) {
            p.run_block(task, o, lse, s);
        }

        #[cfg(target_arch = "x86_64")]
        impl Block<$nr> for $kernel {
            fn block(
                p: &Problem<'_, $nr>,
                task: Task,
                o: &mut [f32],
                lse: &mut [f32],
                s: &mut Scratch<$nr, Self>,
            ) {
                #[allow(unsafe_code)]
                // SAFETY: `fast_f32` runs this copy only when `CpuKernel::chosen` or
                // `CpuKernel::check` found the CPU has every feature of `$features`.
                unsafe {
                    $entry(p, task, o, lse, s)
                };
            }
        }
    };
}

x86_block!(Avx2, 16, "avx2", block_avx2);
x86_block!(Avx2Fma, 16, "avx2,fma", block_avx2_fma);
x86_block!(Avx512, 64, "avx512f,avx2,fma", block_avx512);

/// The maximum of `s`, ignoring NaN; `-inf` for an empty or fully masked row.
#[inline(always)]
fn row_max(s: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; 8];
    let (chunks, rest) = s.as_chunks::<8>();
    for x in chunks {
        for l in 0..8 {
            m[l] = if x[l] > m[l] { x[l] } else { m[l] };
        }
    }
    for (l, &x) in rest.iter().enumerate() {
        m[l] = if x > m[l] { x } else { m[l] };
    }
    m.into_iter()
        .fold(f32::NEG_INFINITY, |a, x| if x > a { x } else { a })
}

/// `p = 2^(s - m)` element-wise; returns the sum of `p`.
#[inline(always)]
fn exp2_rows(s: &[f32], m: f32, p: &mut [f32]) -> f32 {
    // A plain element loop, which LLVM vectorises; fusing the sum into it would stop that.
    for (x, y) in s.iter().zip(p.iter_mut()) {
        *y = exp2(*x - m);
    }
    row_sum(p)
}

/// The sum of `s`, over 8 lanes so it vectorises.
#[inline(always)]
fn row_sum(s: &[f32]) -> f32 {
    let mut sum = [0f32; 8];
    let (chunks, rest) = s.as_chunks::<8>();
    for x in chunks {
        for l in 0..8 {
            sum[l] += x[l];
        }
    }
    for (l, &x) in rest.iter().enumerate() {
        sum[l] += x;
    }
    sum.iter().sum()
}

/// `2^x` for `x <= 0`, to about 1.5 ulp, in arithmetic LLVM can vectorise. Results below
/// `2^-126` flush to zero (so `-inf` gives 0); NaN stays NaN.
#[inline(always)]
fn exp2(x: f32) -> f32 {
    // 1.5 * 2^23: adding it rounds to an integer n held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let xc = if x < -126.0 { -126.0 } else { x };
    let t = xc + ROUND;
    let n = t - ROUND;
    let f = xc - n; // in [-0.5, 0.5], exact
    // Least-squares fit of 2^f on [-0.5, 0.5] at Chebyshev nodes (relative error 9e-8).
    let p = 1.533_757_7e-4;
    let p = p * f + 1.339_986e-3;
    let p = p * f + 9.618_52e-3;
    let p = p * f + 5.550_329e-2;
    let p = p * f + 2.402_264_6e-1;
    let p = p * f + 6.931_472e-1;
    let p = p * f + 1.0;
    // t's bits are 0x4b40_0000 + n; the exponent field of 2^n is n + 127.
    let two_n = f32::from_bits(t.to_bits().wrapping_add(127u32.wrapping_sub(0x4b40_0000)) << 23);
    if x < -126.0 { 0.0 } else { p * two_n }
}

#[cfg(test)]
mod tests {
    use super::exp2;

    #[test]
    fn exp2_matches_std() {
        let mut worst = 0f64;
        for i in 0..=1_260_000 {
            let x = -(i as f32) * 1e-4;
            let got = exp2(x) as f64;
            let want = (x as f64).exp2();
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 2e-7, "worst relative error {worst}");
        assert_eq!(exp2(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp2(-127.0), 0.0);
        assert_eq!(exp2(0.0), 1.0);
        assert!(exp2(f32::NAN).is_nan());
    }
}
