//! [`Attention`]'s GPU entry points: [`plan`](Attention::plan), [`run`](Attention::run) and
//! [`run_into`](Attention::run_into) (the type and its options live in `spec.rs`).
//!
//! A call is validated once ([`Attention::validate`] gives the [`Spec`] every later step
//! takes), planned from the device's [`GpuLimits`] alone ([`paths::choose`]), encoded into one
//! command buffer and submitted once.

use crate::error::{Error, Result};
use crate::gpu::context::Gpu;
use crate::gpu::limits::GpuLimits;
use crate::gpu::paths::{self, Io, Plan};
use crate::gpu::tensor::{Tensor, expect_dims};
use crate::spec::{Attention, DType, Dims, Spec};

/// The results of one call on the GPU.
#[derive(Debug, Clone)]
pub struct Output {
    /// The attention output, in the layout of the options.
    pub o: Tensor,
    /// Log-sum-exp per row, dims `[batch, heads, q_len, 1]`, if asked for; `-inf` for a row
    /// with no allowed key.
    pub lse: Option<Tensor>,
    /// Attention weights, dims `[batch, heads, q_len, kv_len]`, if asked for.
    pub weights: Option<Tensor>,
}

/// Checks caller-allocated outputs against a validated call.
fn check_outputs(spec: &Spec<'_>, out: &Output) -> Result<()> {
    let dims = spec.dims;
    expect_dims("O", out.o.dims(), spec.opts.o_shape_for(dims))?;
    if let Some(lse) = &out.lse {
        expect_dims(
            "log-sum-exp",
            lse.dims(),
            [dims.batch, dims.heads, dims.q_len, 1],
        )?;
    }
    if let Some(w) = &out.weights {
        expect_dims("weights", w.dims(), dims.score_shape())?;
    }
    for (what, t) in [("log-sum-exp", &out.lse), ("weights", &out.weights)] {
        if let Some(t) = t
            && t.dtype() != DType::F32
        {
            return Err(Error::InvalidOption {
                what,
                value: format!("{:?}", t.dtype()),
                why: "the log-sum-exp and the weights are always f32",
            });
        }
    }
    Ok(())
}

impl Attention {
    /// The plan a call with these options would run for `dims` on `gpu`, without running it,
    /// for f32 inputs ([`Attention::plan_for_dtypes`] for others: f16 Q, K and V may take the
    /// fused kernel's 16-bit products).
    pub fn plan(&self, gpu: &Gpu, dims: Dims) -> Result<Plan> {
        self.plan_for_limits(&gpu.limits, dims)
    }

    /// The plan a call with these options would run for `dims` on `gpu` with Q, K and V of
    /// `[q, k, v]` dtypes, without running it.
    pub fn plan_for_dtypes(&self, gpu: &Gpu, dims: Dims, dtypes: [DType; 3]) -> Result<Plan> {
        let spec = self.validate(dims)?;
        let half = gpu.native_f16 && dtypes.iter().all(|&t| t == DType::F16);
        paths::choose(&spec, &gpu.limits, self.want_weights, half)
    }

    /// The plan a call with these options would run for `dims` on a device with `limits`
    /// (e.g. [`GpuLimits::from_wgpu`] of a device this program has not opened). Needs no
    /// device: planning is arithmetic over the limits.
    pub fn plan_for_limits(&self, limits: &GpuLimits, dims: Dims) -> Result<Plan> {
        let spec = self.validate(dims)?;
        paths::choose(&spec, limits, self.want_weights, false)
    }

    /// Runs attention on the GPU, allocating the outputs (O in the queries' dtype).
    ///
    /// Dims are read from the tensors in the layout of the options; the log-sum-exp and the
    /// weights are returned when [`return_lse`](Attention::return_lse) and
    /// [`return_weights`](Attention::return_weights) ask for them. Supported: `head_dim` and
    /// `v_head_dim` up to [`MAX_HEAD_DIM`](crate::MAX_HEAD_DIM) and
    /// [`MAX_V_HEAD_DIM`](crate::MAX_V_HEAD_DIM), any lengths (problems larger than one storage binding are
    /// chunked), every tensor within one storage binding.
    pub fn run(&self, gpu: &Gpu, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Output> {
        self.run_with_prelude(gpu, q, k, v, |_| Ok(()))
    }

    /// [`run`](Attention::run), with `prelude` recorded into the same command buffer before
    /// the attention: work its inputs depend on (a cache's rotation of its queries), in one
    /// submission.
    pub(crate) fn run_with_prelude(
        &self,
        gpu: &Gpu,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        prelude: impl FnOnce(&mut wgpu::CommandEncoder) -> Result<()>,
    ) -> Result<Output> {
        let dims = self.dims_for(q.dims(), k.dims(), v.dims())?;
        let spec = self.validate(dims)?;
        for (what, t) in [("Q", q), ("K", k), ("V", v)] {
            gpu.expect_own(what, t)?;
        }
        let lse_dims = [dims.batch, dims.heads, dims.q_len, 1];
        // One guarded region for the allocations and the submission (one poll, one set of
        // error scopes). O takes the queries' dtype: f32 queries over a bf16 cache give an
        // f32 output.
        gpu.guarded("attention", || {
            let out = Output {
                o: gpu.empty_as(self.o_shape_for(dims), q.dtype())?,
                lse: self.want_lse.then(|| gpu.empty(lse_dims)).transpose()?,
                weights: self
                    .want_weights
                    .then(|| gpu.empty(dims.score_shape()))
                    .transpose()?,
            };
            run_validated(gpu, &spec, (q, k, v), &out, prelude)?;
            Ok(out)
        })
    }

    /// Runs attention on the GPU into outputs the caller allocated (reused across calls, or
    /// poisoned by a test). The log-sum-exp and weights are written when `out` has them,
    /// whatever [`return_lse`](Attention::return_lse) says; weights in `out` make
    /// [`Path::Auto`](crate::Path::Auto) choose the three-pass path.
    pub fn run_into(
        &self,
        gpu: &Gpu,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Output,
    ) -> Result<()> {
        let dims = self.dims_for(q.dims(), k.dims(), v.dims())?;
        let spec = self.validate(dims)?;
        check_outputs(&spec, out)?;
        run_validated(gpu, &spec, (q, k, v), out, |_| Ok(()))
    }
}

/// Plans a validated call into checked outputs and records it into `encoder` without
/// submitting, for callers that put more work in the same command buffer (the multi-head
/// layer, which validates before it allocates).
pub(crate) fn encode_validated(
    gpu: &Gpu,
    spec: &Spec<'_>,
    inputs: (&Tensor, &Tensor, &Tensor),
    out: &Output,
    encoder: &mut wgpu::CommandEncoder,
) -> Result<()> {
    let dims = spec
        .opts
        .dims_for(inputs.0.dims(), inputs.1.dims(), inputs.2.dims())?;
    if dims != spec.dims {
        return Err(Error::InvalidOption {
            what: "encode_validated inputs",
            value: format!("{dims:?}"),
            why: "the tensors do not have the dims the call was validated for",
        });
    }
    check_outputs(spec, out)?;
    check_devices(gpu, inputs, out)?;
    let plan = plan_checked(gpu, spec, inputs, out)?;
    paths::encode(gpu, spec, &plan, &io(inputs, out), encoder)
}

fn io<'a>((q, k, v): (&'a Tensor, &'a Tensor, &'a Tensor), out: &'a Output) -> Io<'a> {
    Io {
        q,
        k,
        v,
        o: &out.o,
        lse: out.lse.as_ref(),
        weights: out.weights.as_ref(),
    }
}

/// The plan for a validated call into `out`; weights in `out` need the three-pass path.
fn plan_checked(
    gpu: &Gpu,
    spec: &Spec<'_>,
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    out: &Output,
) -> Result<Plan> {
    // Native f16 Q, K and V may take the fused kernel's 16-bit products.
    let half = gpu.native_f16 && [q, k, v].iter().all(|t| t.dtype() == DType::F16);
    let plan = paths::choose(spec, &gpu.limits, out.weights.is_some(), half)?;
    if out.weights.is_some() && !matches!(plan, Plan::ThreePass { .. }) {
        return Err(Error::InvalidOption {
            what: "weights output",
            value: "Some".into(),
            why: "the fused path does not materialise the weights; ask for them with \
                  return_weights(true) so the plan picks the three-pass path",
        });
    }
    Ok(plan)
}

/// [`Error::WrongDevice`] unless every tensor of the call was made on `gpu`'s device.
fn check_devices(gpu: &Gpu, (q, k, v): (&Tensor, &Tensor, &Tensor), out: &Output) -> Result<()> {
    for (what, t) in [
        ("Q", Some(q)),
        ("K", Some(k)),
        ("V", Some(v)),
        ("O", Some(&out.o)),
    ]
    .into_iter()
    .chain([
        ("log-sum-exp", out.lse.as_ref()),
        ("weights", out.weights.as_ref()),
    ]) {
        if let Some(t) = t {
            gpu.expect_own(what, t)?;
        }
    }
    Ok(())
}

/// Plans, encodes (after `prelude`) and submits a validated call whose outputs have been
/// checked.
fn run_validated(
    gpu: &Gpu,
    spec: &Spec<'_>,
    inputs: (&Tensor, &Tensor, &Tensor),
    out: &Output,
    prelude: impl FnOnce(&mut wgpu::CommandEncoder) -> Result<()>,
) -> Result<()> {
    check_devices(gpu, inputs, out)?;
    let plan = plan_checked(gpu, spec, inputs, out)?;
    gpu.submit_with(plan.name(), |encoder| {
        prelude(encoder)?;
        paths::encode(gpu, spec, &plan, &io(inputs, out), encoder)
    })
}
