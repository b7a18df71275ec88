//! [`Attention::backward`]: the gradients of attention by Q, K and V on the GPU
//! (FlashAttention-2's algorithm: the weights recomputed from the forward's log-sum-exp, never
//! stored, so memory is O(N)).
//!
//! **Design.** WGSL has no float atomics, so the gradients are summed by their owners, in a
//! fixed order (deterministic, bit for bit from run to run), in phases of one invocation per
//! row (`shaders/attention_backward_delta.wgsl` for the first, `shaders/attention_backward.wgsl`
//! for the others):
//!
//! 1. `D_i = dO_i·O_i` per query row (0 past a sequence's `q_lens`);
//! 2. `dQ_i` per query row, over its keys;
//! 3. `dK_j` and `dV_j` per key row, over the query rows of every head of its GQA group;
//! 4. on request the bias's gradient per element of the bias, over the dimensions it is
//!    broadcast along, and the sinks' per head.
//!
//! Each score is computed twice (in phases 2 and 3), as in FlashAttention-2's two-kernel
//! variant. On a device that caps loop iterations (llvmpipe, NOTES.md) every phase but the
//! first is split over several dispatches, each adding its share of keys (or query rows, or
//! broadcast elements) to the f32 gradients; elsewhere each phase is one dispatch. A bias
//! broadcast along many dimensions (a `[1, 1, 1, S]` bias sums `B * H * L` scores per
//! element) leaves few invocations with long loops: correct, and slow.
//!
//! Where head_dim and v_head_dim are at most [`TILED_BACKWARD_MAX_DIM`] and workgroup memory
//! holds its 24 KiB, phases 2 and 3 run in tiles instead
//! (`shaders/attention_backward_tiled.wgsl`, [`TiledBackward`]): a workgroup per 64 query
//! rows of a head walks the key tiles for dQ, a workgroup per 64 keys of a kv head walks the
//! (group head, query tile) pairs for dK and dV, the scores and dP computed by the fused
//! forward's register-blocked tile product and P or dS passed through a workgroup tile to the
//! accumulating products. Tiles no row sees are skipped; tiles every row sees whole, on a call
//! without per-key options, run no mask code. Each invocation's sums still run in a fixed
//! order, so the gradients stay deterministic. `TileConfig::tiled_backward` (or
//! `WGPU_ATTENTION_TILED_BACKWARD=0`) keeps the row kernel everywhere.

use crate::error::{Error, Result};
use crate::gpu::context::Gpu;
use crate::gpu::kernels::uniforms::{BackwardParams, uniform_buffer};
use crate::gpu::kernels::{BACKWARD_TILED_WORKGROUP_BYTES, KernelKey, flash_o_vec4s};
use crate::gpu::limits::{DispatchSize, GpuLimits, TileBlock, check_binding};
use crate::gpu::paths::fused::io_strides;
use crate::gpu::paths::masking;
use crate::gpu::tensor::{Tensor, expect_dims};
use crate::spec::{Attention, DType, Spec};

/// The gradients [`Attention::backward`] returns: f32 tensors (accumulated in f32 whatever
/// the inputs' storage) in the dims and layout of Q, K and V.
#[derive(Debug, Clone)]
pub struct Gradients {
    /// By Q.
    pub dq: Tensor,
    /// By K, summed over each GQA group's query heads.
    pub dk: Tensor,
    /// By V, summed over each GQA group's query heads.
    pub dv: Tensor,
    /// By the additive bias, in the bias's dims (summed over the dimensions it is broadcast
    /// along, as PyTorch gives it), when asked for with
    /// [`return_bias_grad`](Attention::return_bias_grad).
    pub dbias: Option<Tensor>,
    /// By the learnable sink logits, `[1, 1, 1, heads]`, when asked for with
    /// [`return_sinks_grad`](Attention::return_sinks_grad).
    pub dsinks: Option<Tensor>,
}

/// Storage buffers the backward's kernels bind at most (their parameter blocks not counted):
/// Q, K, V, dO, the statistics, two gradients and the masking options (the bias and the mask
/// packed into the lengths' buffer), within WebGPU's default of 8 per stage.
pub(crate) const BACKWARD_STORAGE_BUFFERS: u32 = 8;

/// Loop iterations one invocation runs per dispatch, at most, on a device that caps them
/// (llvmpipe stops at 65535; NOTES.md).
const LOOP_BUDGET: u64 = 24_000;

/// How the backward of a validated call is split into dispatches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BackwardPlan {
    /// Vec4s per Q/K row and per V/O row held by an invocation.
    pub(crate) d4: u32,
    pub(crate) v4: u32,
    /// Keys per dispatch of the dQ phase.
    pub(crate) keys_per_pass: u32,
    /// (Group head, query row) pairs per dispatch of the dK/dV phase.
    pub(crate) rows_per_pass: u32,
    /// Broadcast elements per dispatch of the bias's gradient, and rows of the sinks'.
    pub(crate) bias_per_pass: u32,
    pub(crate) sinks_per_pass: u32,
    /// The tiled kernel's configuration for dQ, dK and dV, where it runs.
    pub(crate) tiled: Option<TiledBackward>,
}

/// How the tiled kernel (`attention_backward_tiled.wgsl`) runs a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TiledBackward {
    /// Each invocation's block of a 64 x 64 score tile.
    pub(crate) block: TileBlock,
    /// Vec4 columns per invocation of dQ's rows, and of dK's and dV's.
    pub(crate) dq_vec4s: u32,
    pub(crate) dkv_vec4s: u32,
    /// Tiles one workgroup visits per dispatch: key tiles of the dQ kernel, (group head,
    /// query tile) pairs of the dK/dV kernel.
    pub(crate) tiles_per_pass: u32,
}

/// The widest head_dim (and v_head_dim) the tiled kernel takes: its accumulators, a row of dK
/// and one of dV per block row, grow with the width, and past 128 only 4 x 4 blocks keep them
/// within [`TILED_BACKWARD_MOST_ACCUMULATORS`] (at 256, 128 of them).
pub(crate) const TILED_BACKWARD_MAX_DIM: usize = 256;

/// The tiled kernel's workgroup memory as WebGPU's limit counts it: each variable rounded up
/// to 16 bytes, so its three scalars take 48 bytes, not 12.
const TILED_WORKGROUP_BYTES_ROUNDED: u32 = BACKWARD_TILED_WORKGROUP_BYTES - 12 + 3 * 16;

/// Accumulators per invocation the tiled kernel may hold for dK and dV together (the fused
/// forward allows 128 for O alone; the backward also holds two score blocks).
const TILED_BACKWARD_MOST_ACCUMULATORS: u32 = 128;

impl TiledBackward {
    /// The tiled configuration for `spec` on `limits`, or `None` where the row kernel runs:
    /// turned off, a width past [`TILED_BACKWARD_MAX_DIM`], or too little workgroup memory or
    /// too few invocations. The block is the configured one
    /// ([`TileConfig::backward_block`](crate::gpu::tuning::TileConfig::backward_block)) where
    /// its accumulators fit, else the next smaller one.
    pub(crate) fn new(spec: &Spec<'_>, limits: &GpuLimits) -> Option<TiledBackward> {
        let d = spec.dims;
        let widest = d.head_dim.max(d.v_head_dim);
        if !limits.tile.tiled_backward
            || widest > TILED_BACKWARD_MAX_DIM
            || limits.max_workgroup_storage < TILED_WORKGROUP_BYTES_ROUNDED
        {
            return None;
        }
        let configured = limits.tile.backward_block;
        let block = TileBlock::ALL
            .into_iter()
            .rev()
            .skip_while(|&b| b != configured)
            .find(|&b| {
                2 * b.rows * 4 * flash_o_vec4s(widest, b) <= TILED_BACKWARD_MOST_ACCUMULATORS
                    && b.invocations(64) <= limits.max_invocations_per_workgroup
            })?;
        let capped = limits.max_key_tiles_per_workgroup != u32::MAX;
        Some(TiledBackward {
            block,
            dq_vec4s: flash_o_vec4s(d.head_dim, block),
            dkv_vec4s: flash_o_vec4s(widest, block),
            // A tile costs the loop cap about twice a fused forward tile's iterations.
            tiles_per_pass: if capped {
                (limits.max_key_tiles_per_workgroup / 2).max(1)
            } else {
                u32::MAX
            },
        })
    }
}

impl BackwardPlan {
    pub(crate) fn new(spec: &Spec<'_>, limits: &GpuLimits) -> BackwardPlan {
        let d = spec.dims;
        let d4 = d.head_dim.div_ceil(16) as u32 * 4;
        let v4 = d.v_head_dim.div_ceil(16) as u32 * 4;
        let capped = limits.max_key_tiles_per_workgroup != u32::MAX;
        let per_pass = |cost: u64, total: usize| -> u32 {
            let total = total.max(1) as u64;
            if !capped {
                return total.min(u32::MAX as u64) as u32;
            }
            let by_budget = (LOOP_BUDGET / cost).max(1);
            let by_tiles = limits.max_key_tiles_per_workgroup as u64 * 64;
            by_budget.min(by_tiles).min(total) as u32
        };
        let (d4w, v4w) = (d4 as u64, v4 as u64);
        BackwardPlan {
            d4,
            v4,
            keys_per_pass: per_pass(3 * d4w + v4w + 8, d.kv_len),
            rows_per_pass: per_pass(3 * d4w + 2 * v4w + 8, d.group() * d.q_len),
            bias_per_pass: per_pass(
                (d.head_dim + d.v_head_dim) as u64 + 16,
                bias_extent(spec).unwrap_or(1),
            ),
            sinks_per_pass: per_pass(4, d.batch * d.q_len),
            tiled: TiledBackward::new(spec, limits),
        }
    }
}

/// The shape of the call's bias, host or device form.
fn bias_shape(spec: &Spec<'_>) -> Option<[usize; 4]> {
    let o = spec.opts;
    (o.bias.as_ref().map(|b| b.shape)).or(o.device.bias.as_ref().map(|t| t.dims()))
}

/// How many score elements each element of the bias stands for: the product of the full
/// sizes of the dimensions it is broadcast along.
fn bias_extent(spec: &Spec<'_>) -> Option<usize> {
    let shape = bias_shape(spec)?;
    let full = spec.dims.score_shape();
    Some(
        (0..4)
            .map(|a| if shape[a] == 1 { full[a] } else { 1 })
            .product(),
    )
}

impl Attention {
    /// The gradients of a loss by Q, K and V on the GPU, given the forward's inputs, its
    /// output `o` and log-sum-exp `lse` (run the forward with
    /// [`return_lse(true)`](Attention::return_lse)) and `d_o`, the loss's gradient by O (O's
    /// dims and layout, any dtype). Every option of the forward applies (masks, bias and
    /// mask broadcasts, both causal alignments, windows, lengths, softcap, scale, ALiBi,
    /// sinks, sink keys, GQA, both layouts, f32/f16/bf16/8-bit storage, dropout (the same
    /// weights dropped as in the forward with the same options), K's scale, packed
    /// variable-length batches, whose dQ, dK and dV are packed as Q, K and V), except additive
    /// scores, paged K/V and a V scale ([`kv_scales`](Attention::kv_scales)), which are
    /// [`Error::InvalidOption`]. With
    /// [`return_bias_grad`](Attention::return_bias_grad) and
    /// [`return_sinks_grad`](Attention::return_sinks_grad) it also gives the bias's and the
    /// sinks' gradients. The log-sum-exp, and a device-resident mask, bias or lengths, are
    /// copied into the backward's own buffers (so that it binds at most eight storage
    /// buffers, as a browser allows): their buffers need `COPY_SRC` usage, as the crate's own
    /// have, or the call is an [`Error::InvalidOption`]. The f64 oracle is
    /// [`cpu::reference_backward`](crate::cpu::reference_backward).
    ///
    /// ```no_run
    /// use wgpu_attention::{Attention, Causal, Gpu};
    /// # fn main() -> Result<(), wgpu_attention::Error> {
    /// let gpu = Gpu::new()?;
    /// let dims = [1, 4, 100, 64]; // batch, heads, seq, head_dim (Bhsd)
    /// let x: Vec<f32> = (0..4 * 100 * 64).map(|i| (i as f32 * 0.1).sin()).collect();
    /// let (q, k, v) = (gpu.upload(&x, dims)?, gpu.upload(&x, dims)?, gpu.upload(&x, dims)?);
    /// let opts = Attention::new().causal(Causal::TopLeft).return_lse(true);
    /// let out = opts.run(&gpu, &q, &k, &v)?;
    /// let d_o = gpu.upload(&x, dims)?; // the loss's gradient by O
    /// let lse = out.lse.as_ref().expect("asked for");
    /// let g = opts.backward(&gpu, &q, &k, &v, &out.o, lse, &d_o)?;
    /// let dq: Vec<f32> = g.dq.download(&gpu)?;
    /// # let _ = dq; Ok(()) }
    /// ```
    #[allow(clippy::too_many_arguments)] // the forward's inputs, its outputs, dO
    pub fn backward(
        &self,
        gpu: &Gpu,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        lse: &Tensor,
        d_o: &Tensor,
    ) -> Result<Gradients> {
        let (spec, plan) = self.backward_checked(gpu, [q, k, v, o, d_o, lse])?;
        gpu.guarded("attention backward", || {
            let grads = Gradients {
                dq: gpu.empty(q.dims())?,
                dk: gpu.empty(k.dims())?,
                dv: gpu.empty(v.dims())?,
                dbias: (self.want_bias_grad)
                    .then(|| gpu.empty(bias_shape(&spec).expect("checked")))
                    .transpose()?,
                dsinks: (self.want_sinks_grad)
                    .then(|| gpu.empty([1, 1, 1, spec.dims.heads]))
                    .transpose()?,
            };
            run_checked(gpu, &spec, &plan, [q, k, v, o, d_o, lse], &grads)?;
            Ok(grads)
        })
    }

    /// [`backward`](Attention::backward) into gradients the caller allocated (reused across
    /// steps, or poisoned by a test): f32 tensors of Q's, K's and V's dims, every element of
    /// which is written.
    #[allow(clippy::too_many_arguments)] // the forward's inputs, its outputs, dO, the gradients
    pub fn backward_into(
        &self,
        gpu: &Gpu,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        lse: &Tensor,
        d_o: &Tensor,
        grads: &Gradients,
    ) -> Result<()> {
        let (spec, plan) = self.backward_checked(gpu, [q, k, v, o, d_o, lse])?;
        let mut outputs = vec![
            ("dQ", &grads.dq, q.dims()),
            ("dK", &grads.dk, k.dims()),
            ("dV", &grads.dv, v.dims()),
        ];
        for (what, asked, given, dims) in [
            (
                "dbias",
                self.want_bias_grad,
                &grads.dbias,
                bias_shape(&spec).unwrap_or([0; 4]),
            ),
            (
                "dsinks",
                self.want_sinks_grad,
                &grads.dsinks,
                [1, 1, 1, spec.dims.heads],
            ),
        ] {
            match given {
                Some(t) if asked => outputs.push((what, t, dims)),
                None if !asked => {}
                _ => {
                    return Err(Error::InvalidOption {
                        what: "gradient",
                        value: format!("{what}: {}", if asked { "missing" } else { "given" }),
                        why: "the gradients passed must be those the options ask for \
                              (return_bias_grad, return_sinks_grad)",
                    });
                }
            }
        }
        for &(what, t, dims) in &outputs {
            expect_dims(what, t.dims(), dims)?;
            if t.dtype() != DType::F32 {
                return Err(Error::InvalidOption {
                    what: "gradient",
                    value: format!("{what} in {:?}", t.dtype()),
                    why: "the backward's gradients are f32",
                });
            }
            gpu.expect_own(what, t)?;
        }
        // A gradient sharing a buffer with another, or with an input (a device-resident
        // option too), would be overwritten.
        let dev = &self.device;
        let mut inputs: Vec<&wgpu::Buffer> = [q, k, v, o, d_o, lse].map(Tensor::buffer).to_vec();
        inputs.extend(dev.bias.as_ref().map(Tensor::buffer));
        inputs.extend(dev.mask.as_ref().map(|m| &m.buffer));
        inputs.extend(dev.lens.as_ref().map(|l| &l.buffer));
        for (n, &(what, t, _)) in outputs.iter().enumerate() {
            let earlier = outputs[..n].iter().map(|&(_, u, _)| u.buffer());
            if earlier
                .chain(inputs.iter().copied())
                .any(|u| u == t.buffer())
            {
                return Err(Error::InvalidOption {
                    what: "gradient",
                    value: what.into(),
                    why: "each gradient needs a buffer of its own, shared with no other \
                          gradient and no input",
                });
            }
        }
        run_checked(gpu, &spec, &plan, [q, k, v, o, d_o, lse], grads)
    }

    /// Validates a backward call: the options, every tensor's dims, dtype and device, the
    /// limits; returns the spec and the plan.
    fn backward_checked(
        &self,
        gpu: &Gpu,
        [q, k, v, o, d_o, lse]: [&Tensor; 6],
    ) -> Result<(Spec<'_>, BackwardPlan)> {
        let dims = self.dims_for(q.dims(), k.dims(), v.dims())?;
        let spec = self.validate(dims)?;
        self.check_backward()?;
        let o_dims = self.o_shape_for(dims);
        expect_dims("O", o.dims(), o_dims)?;
        expect_dims("dO", d_o.dims(), o_dims)?;
        expect_dims(
            "log-sum-exp",
            lse.dims(),
            [dims.batch, dims.heads, dims.q_len, 1],
        )?;
        if lse.dtype() != DType::F32 {
            return Err(Error::InvalidOption {
                what: "log-sum-exp",
                value: format!("{:?}", lse.dtype()),
                why: "the log-sum-exp is f32, as the forward returns it",
            });
        }
        if !lse.buffer().usage().contains(wgpu::BufferUsages::COPY_SRC) {
            return Err(Error::InvalidOption {
                what: "log-sum-exp",
                value: "a buffer without COPY_SRC usage".into(),
                why: "the backward copies the log-sum-exp beside D into one statistics buffer \
                      (the forward's own has COPY_SRC)",
            });
        }
        for (what, t) in [
            ("Q", q),
            ("K", k),
            ("V", v),
            ("O", o),
            ("log-sum-exp", lse),
            ("dO", d_o),
        ] {
            gpu.expect_own(what, t)?;
            check_binding(&gpu.limits, what, t.byte_len())?;
        }
        // D, the row shifts and the log-sum-exp, bound as one buffer.
        check_binding(
            &gpu.limits,
            "the backward's statistics (three f32 per query row)",
            3 * lse.byte_len(),
        )?;
        let limits = &gpu.limits;
        // The parameter blocks are storage buffers too where they are bound as such.
        let needed = BACKWARD_STORAGE_BUFFERS
            + 2 * (gpu.kernels.params == crate::gpu::ParamsIn::ReadOnlyStorage) as u32;
        if limits.max_storage_buffers_per_stage < needed {
            return Err(Error::Unsupported {
                what: "storage buffers per shader stage (the backward kernel)",
                needed: needed as u64,
                available: limits.max_storage_buffers_per_stage as u64,
            });
        }
        // Every count the kernel indexes or loops over is a u32 there.
        let d = spec.dims;
        for (what, n) in [
            (
                "query rows of the backward (three statistics each)",
                Some(3 * d.lse_elems()),
            ),
            (
                "key rows of the backward",
                Some(d.batch * d.kv_heads * d.kv_len),
            ),
            ("(group head, query row) pairs", Some(d.group() * d.q_len)),
            ("score elements per bias element", bias_extent(&spec)),
        ] {
            if let Some(n) = n.filter(|&n| u32::try_from(n).is_err()) {
                return Err(Error::TooLarge {
                    what,
                    requested: n as u64,
                    max: u32::MAX as u64,
                    hint: " (indices are 32-bit)",
                });
            }
        }
        Ok((spec, BackwardPlan::new(&spec, limits)))
    }

    /// What the GPU backward refuses: the options its kernel does not have.
    fn check_backward(&self) -> Result<()> {
        let refuse = |value: &str, why| {
            Err(Error::InvalidOption {
                what: "backward",
                value: value.into(),
                why,
            })
        };
        if self.additive.is_some() {
            return refuse(
                "additive scores",
                "the GPU backward computes dot-product attention; cpu::reference_backward \
                 has the additive form",
            );
        }
        if self.pages.is_some() {
            return refuse(
                "paged K/V",
                "the backward takes K and V contiguous: gather the pages first",
            );
        }
        if self.v_scale() != 1.0 {
            return refuse(
                "kv_scales with a v_scale other than 1",
                "the backward gives gradients by V as stored; scale V in the forward's inputs",
            );
        }
        if let Some(m) = &self.score_mod {
            m.require(true, true)?;
        }
        if self.want_bias_grad && self.bias.is_none() && self.device.bias.is_none() {
            return refuse(
                "return_bias_grad without a bias",
                "there is no bias to give the gradient of",
            );
        }
        if self.want_sinks_grad && self.sinks.is_none() {
            return refuse(
                "return_sinks_grad without sinks",
                "there are no sink logits to give the gradient of",
            );
        }
        Ok(())
    }
}

/// Checks the gradients' bindings, then encodes and submits the backward.
fn run_checked(
    gpu: &Gpu,
    spec: &Spec<'_>,
    plan: &BackwardPlan,
    tensors: [&Tensor; 6],
    grads: &Gradients,
) -> Result<()> {
    for (what, t) in [
        ("dQ", Some(&grads.dq)),
        ("dK", Some(&grads.dk)),
        ("dV", Some(&grads.dv)),
        ("dbias", grads.dbias.as_ref()),
        ("dsinks", grads.dsinks.as_ref()),
    ] {
        if let Some(t) = t {
            check_binding(&gpu.limits, what, t.byte_len())?;
        }
    }
    gpu.submit_with("attention backward", |encoder| {
        encode(gpu, spec, plan, tensors, grads, encoder)
    })
}

/// The parameters of one dispatch of `phase` over `rows` invocations, adding in
/// `first .. first + count` (keys or query rows).
fn params(
    spec: &Spec<'_>,
    rows: usize,
    (first, count): (u32, u32),
    resume: bool,
) -> BackwardParams {
    let d = spec.dims;
    // The forward's strides: a packed batch is one "batch" of every sequence's rows, found by
    // q_slot / key_slot (lib/masking.wgsl). (Paged K/V is refused before this.)
    let s = |queries, heads, width| io_strides(spec, queries, heads, width);
    let [q_stride_b, q_stride_h, q_stride_s] = s(true, d.heads, d.head_dim);
    let [k_stride_b, k_stride_h, k_stride_s] = s(false, d.kv_heads, d.head_dim);
    let [v_stride_b, v_stride_h, v_stride_s] = s(false, d.kv_heads, d.v_head_dim);
    let [o_stride_b, o_stride_h, o_stride_s] = s(true, d.heads, d.v_head_dim);
    let [bias_b, bias_h, bias_i, bias_j] = bias_shape(spec).unwrap_or([1; 4]).map(|x| x as u32);
    BackwardParams {
        heads: d.heads as u32,
        kv_heads: d.kv_heads as u32,
        group: d.group() as u32,
        q_len: d.q_len as u32,
        kv_len: d.kv_len as u32,
        head_dim: d.head_dim as u32,
        v_head_dim: d.v_head_dim as u32,
        rows: rows as u32,
        scale: spec.scale,
        first,
        count,
        resume: resume as u32,
        q_stride_b,
        q_stride_h,
        q_stride_s,
        k_stride_b,
        k_stride_h,
        k_stride_s,
        v_stride_b,
        v_stride_h,
        v_stride_s,
        o_stride_b,
        o_stride_h,
        o_stride_s,
        bias_b,
        bias_h,
        bias_i,
        bias_j,
        batch: d.batch as u32,
    }
}

/// Encodes the phases into `encoder`: the log-sum-exp's copy into the statistics, D, then
/// dQ, dK and dV (tiled or by rows), then the bias's and the sinks' gradients on request.
fn encode(
    gpu: &Gpu,
    spec: &Spec<'_>,
    plan: &BackwardPlan,
    [q, k, v, o, d_o, lse]: [&Tensor; 6],
    grads: &Gradients,
    encoder: &mut wgpu::CommandEncoder,
) -> Result<()> {
    let d = spec.dims;
    let masks = masking::upload_packed(gpu, spec, encoder)?;
    let masks_on = gpu.kernels.mask_options(&gpu.device, spec, true)?;
    let query_rows = d.lse_elems();
    let key_rows = d.batch * d.kv_heads * d.kv_len;
    // D, each row's shift, then the forward's log-sum-exp (lib/backward.wgsl), so that no
    // kernel binds the log-sum-exp apart.
    let row_bytes = query_rows as u64 * 4;
    let stats = gpu.scratch(
        "wgpu-attention backward statistics",
        3 * row_bytes,
        wgpu::BufferUsages::COPY_DST,
    );
    encoder.copy_buffer_to_buffer(lse.buffer(), 0, &stats, 2 * row_bytes, row_bytes);
    let storage = |t: &Tensor| gpu.storage(t.dtype());
    let row_key = |phase| KernelKey::AttentionBackward {
        q: storage(q),
        k: storage(k),
        v: storage(v),
        d_o: storage(d_o),
        phase,
        d4: plan.d4,
        v4: plan.v4,
        masks: masks_on,
    };
    let tiled_key = |tiled: &TiledBackward, dkv| KernelKey::AttentionBackwardTiled {
        q: storage(q),
        k: storage(k),
        v: storage(v),
        d_o: storage(d_o),
        dkv,
        block: tiled.block,
        o_vec4s: if dkv { tiled.dkv_vec4s } else { tiled.dq_vec4s },
        masks: masks_on,
    };
    let out = &gpu.kernels.placeholder_out;
    // Each phase: (kernel, workgroups (the `rows` of its parameters), the range each dispatch
    // adds in, its step, g_a, g_b). The row kernel runs 64 invocations per workgroup, one
    // row each; the tiled one a workgroup per 64 query rows (dQ) or keys (dK, dV).
    let delta_key = KernelKey::AttentionBackwardDelta {
        o: storage(o),
        d_o: storage(d_o),
        masks: masks_on,
    };
    let mut phases = vec![(delta_key, query_rows, d.q_len, d.q_len, out, out)];
    let tiles = |len: usize| len.div_ceil(64);
    match &plan.tiled {
        Some(tiled) => {
            let step = tiled.tiles_per_pass as usize;
            phases.push((
                tiled_key(tiled, false),
                d.batch * d.heads * tiles(d.q_len),
                tiles(d.kv_len),
                step,
                grads.dq.buffer(),
                out,
            ));
            phases.push((
                tiled_key(tiled, true),
                d.batch * d.kv_heads * tiles(d.kv_len),
                d.group() * tiles(d.q_len),
                step,
                grads.dk.buffer(),
                grads.dv.buffer(),
            ));
        }
        None => {
            phases.push((
                row_key(1),
                query_rows,
                d.kv_len,
                plan.keys_per_pass as usize,
                grads.dq.buffer(),
                out,
            ));
            phases.push((
                row_key(2),
                key_rows,
                d.group() * d.q_len,
                plan.rows_per_pass as usize,
                grads.dk.buffer(),
                grads.dv.buffer(),
            ));
        }
    }
    if let Some(dbias) = &grads.dbias {
        let extent = bias_extent(spec).expect("checked");
        phases.push((
            row_key(3),
            dbias.len(),
            extent,
            plan.bias_per_pass as usize,
            dbias.buffer(),
            out,
        ));
    }
    if let Some(dsinks) = &grads.dsinks {
        phases.push((
            row_key(4),
            d.heads,
            d.batch * d.q_len,
            plan.sinks_per_pass as usize,
            dsinks.buffer(),
            out,
        ));
    }
    let passes: usize = phases
        .iter()
        .map(|&(_, _, len, step, ..)| len.div_ceil(step.max(1)))
        .sum();
    let mut n = 0;
    for (key, rows, len, step, g_a, g_b) in phases {
        let kernel = gpu.kernels.get(&gpu.device, key)?;
        let workgroups = match key {
            KernelKey::AttentionBackwardTiled { .. } => rows,
            _ => rows.div_ceil(64),
        };
        let size = DispatchSize::linear(
            workgroups as u64,
            gpu.limits.max_workgroups_per_dim,
            "attention backward dispatch",
        )?;
        let step = step.max(1);
        for (pass, first) in (0..len.max(1)).step_by(step).enumerate() {
            let count = step.min(len - first);
            let p = params(spec, rows, (first as u32, count as u32), pass > 0);
            let params = uniform_buffer(gpu, &p)?;
            let bind = match key {
                KernelKey::AttentionBackwardDelta { .. } => kernel.bind(
                    &gpu.device,
                    &[
                        &params,
                        o.buffer(),
                        d_o.buffer(),
                        &stats,
                        masks.lens(gpu),
                        &masks.params,
                    ],
                ),
                _ => kernel.bind(
                    &gpu.device,
                    &[
                        &params,
                        q.buffer(),
                        k.buffer(),
                        v.buffer(),
                        d_o.buffer(),
                        &stats,
                        g_a,
                        g_b,
                        masks.lens(gpu),
                        &masks.params,
                    ],
                ),
            };
            n += 1;
            let mut compute =
                gpu.begin_pass(encoder, "wgpu-attention backward", n == 1, n == passes);
            kernel.dispatch(&mut compute, &bind, size);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Dims;

    /// On a loop-capped device the passes keep each invocation under the budget; elsewhere
    /// each phase is one dispatch.
    #[test]
    fn passes_follow_the_loop_cap() {
        let d = Dims {
            batch: 1,
            heads: 8,
            kv_heads: 2,
            q_len: 3000,
            kv_len: 5000,
            head_dim: 64,
            v_head_dim: 40,
        };
        let opts = Attention::new();
        let spec = opts.validate(d).unwrap();
        let gpu = GpuLimits::from_wgpu(&wgpu::Limits::default(), wgpu::DeviceType::DiscreteGpu);
        let p = BackwardPlan::new(&spec, &gpu);
        assert_eq!((p.d4, p.v4), (16, 12));
        assert_eq!((p.keys_per_pass, p.rows_per_pass), (5000, 4 * 3000));
        let cpu = GpuLimits::from_wgpu(&wgpu::Limits::default(), wgpu::DeviceType::Cpu);
        let p = BackwardPlan::new(&spec, &cpu);
        let key_cost = 3 * 16 + 12 + 8;
        let row_cost = 3 * 16 + 2 * 12 + 8;
        assert!(p.keys_per_pass as u64 * key_cost <= LOOP_BUDGET, "{p:?}");
        assert!(p.rows_per_pass as u64 * row_cost <= LOOP_BUDGET, "{p:?}");
        assert!(p.keys_per_pass > 100 && p.rows_per_pass > 100, "{p:?}");
    }

    /// The tiled kernel runs up to head_dim 256 with the configured block where its
    /// accumulators fit (else a smaller one: 4 x 4 past 128), and the row kernel past that,
    /// where turned off, or where workgroup memory is short.
    #[test]
    fn tiled_where_it_fits() {
        let dims = |head_dim, v_head_dim| Dims {
            batch: 1,
            heads: 4,
            kv_heads: 2,
            q_len: 100,
            kv_len: 200,
            head_dim,
            v_head_dim,
        };
        let opts = Attention::new();
        // lavapipe's 32 KiB of workgroup memory (WebGPU's default 16 KiB is too little).
        let limits = wgpu::Limits {
            max_compute_workgroup_storage_size: 32768,
            ..Default::default()
        };
        let cpu = GpuLimits::from_wgpu(&limits, wgpu::DeviceType::Cpu);
        assert_eq!(cpu.tile.backward_block, TileBlock::B8X8);
        let plan =
            |d, limits: &GpuLimits| BackwardPlan::new(&opts.validate(d).unwrap(), limits).tiled;
        let t = plan(dims(64, 64), &cpu).expect("tiled at 64");
        assert_eq!((t.block, t.dq_vec4s, t.dkv_vec4s), (TileBlock::B8X8, 2, 2));
        assert_eq!(t.tiles_per_pass, 16);
        // 8 x 8 at 128 would hold 2 * 8 * 16 accumulators: 8 x 4 instead.
        let t = plan(dims(72, 128), &cpu).expect("tiled at 128");
        assert_eq!((t.block, t.dq_vec4s, t.dkv_vec4s), (TileBlock::B8X4, 2, 2));
        let t = plan(dims(136, 64), &cpu).expect("tiled at 136");
        assert_eq!((t.block, t.dq_vec4s, t.dkv_vec4s), (TileBlock::B4X4, 3, 3));
        let t = plan(dims(64, 256), &cpu).expect("tiled at 256");
        assert_eq!((t.block, t.dq_vec4s, t.dkv_vec4s), (TileBlock::B4X4, 1, 4));
        assert_eq!(plan(dims(264, 64), &cpu), None);
        assert_eq!(plan(dims(64, 257), &cpu), None);
        // The backward's block is its own, apart from the forward's.
        let mut own = cpu;
        own.tile.backward_block = TileBlock::B8X4;
        let t = plan(dims(64, 64), &own).expect("tiled at 64, 8 x 4");
        assert_eq!((t.block, t.dq_vec4s, t.dkv_vec4s), (TileBlock::B8X4, 1, 1));
        own.tile.fused_block = TileBlock::B4X4;
        assert_eq!(plan(dims(64, 64), &own).unwrap().block, TileBlock::B8X4);
        let mut off = cpu;
        off.tile.tiled_backward = false;
        assert_eq!(plan(dims(64, 64), &off), None);
        let mut small = cpu;
        small.max_workgroup_storage = 16384;
        assert_eq!(plan(dims(64, 64), &small), None);
        let gpu = GpuLimits::from_wgpu(&limits, wgpu::DeviceType::DiscreteGpu);
        let t = plan(dims(64, 64), &gpu).expect("tiled on a GPU");
        assert_eq!(t.tiles_per_pass, u32::MAX);
    }
}
