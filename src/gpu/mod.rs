//! Attention on a wgpu device.
//!
//! [`Gpu`] holds the device and its pipeline cache, [`Tensor`] a device buffer with dims, and
//! [`Attention::run`](crate::Attention::run) validates a call, plans it and submits it once.

mod cache;
mod context;
mod flash;
pub mod kernels;
mod masking;
pub(crate) mod matmul;
mod merge;
pub(crate) mod tensor;
mod three_pass;

pub use cache::KvCache;
pub use context::{Gpu, GpuLimits, LimitCaps};
pub use flash::FusedPlan;
pub use matmul::{MatView, MatmulShape, matmul};
pub use merge::{Partial, merge};
pub use tensor::Tensor;
pub use three_pass::{Chunk, ThreePassPlan};

use crate::error::{Error, Result};
use crate::spec::{Attention, Dims, Path};

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

impl Output {
    /// This result as one side of a [`merge`]; needs the log-sum-exp
    /// ([`Attention::return_lse`]).
    pub fn as_partial(&self) -> Result<Partial<'_>> {
        let lse = self.lse.as_ref().ok_or(Error::InvalidOption {
            what: "merge input",
            value: "an output without log-sum-exp".into(),
            why: "merging weighs each side by its log-sum-exp: run it with return_lse(true)",
        })?;
        Ok(Partial { o: &self.o, lse })
    }
}

/// Which kernels a call runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Plan {
    /// QK^T, masked softmax and P·V as three kernels, with the scores materialised.
    ThreePass {
        /// Chunking of the scores.
        plan: ThreePassPlan,
        /// Why this path.
        why: &'static str,
    },
    /// One fused kernel, online softmax, O(N) memory; its keys split across workgroups only
    /// where the device caps the keys one workgroup may stream.
    Fused {
        /// Dispatch and specialisation.
        plan: FusedPlan,
        /// Why this path.
        why: &'static str,
    },
    /// The fused kernel with the keys split to fill the device, GQA groups packed, and the
    /// splits merged by log-sum-exp (flash-decoding).
    Decode {
        /// Dispatch, splits and specialisation.
        plan: FusedPlan,
        /// Why this path.
        why: &'static str,
    },
}

impl Plan {
    /// The path's name, as `attn-bench` prints it.
    pub fn name(&self) -> &'static str {
        match self {
            Plan::ThreePass { .. } => "three-pass",
            Plan::Fused { .. } => "fused",
            Plan::Decode { .. } => "decode",
        }
    }

    /// Why this path and this chunking were chosen.
    pub fn reason(&self) -> String {
        match self {
            Plan::ThreePass { plan, why } => format!(
                "three-pass ({why}): {} chunk(s) of {} bytes of scores ({})",
                plan.chunks.len(),
                plan.scratch_bytes,
                plan.reason
            ),
            Plan::Fused { plan, why } | Plan::Decode { plan, why } => format!(
                "{} ({why}): {} workgroups, {} key split(s) x {} pass(es) of {} tiles, {} output \
                 chunk(s) of 64 columns, {} bytes of scratch",
                self.name(),
                plan.workgroups,
                plan.splits,
                plan.passes,
                plan.tiles_per_split,
                plan.o_chunks,
                plan.scratch_bytes
            ),
        }
    }

    /// Bytes of device memory the plan allocates besides inputs and outputs.
    pub fn scratch_bytes(&self) -> u64 {
        match self {
            Plan::ThreePass { plan, .. } => plan.scratch_bytes,
            Plan::Fused { plan, .. } | Plan::Decode { plan, .. } => plan.scratch_bytes,
        }
    }
}

fn expect_dims(what: &'static str, got: [usize; 4], expected: [usize; 4]) -> Result<()> {
    for (axis, (&g, &e)) in got.iter().zip(&expected).enumerate() {
        if g != e {
            return Err(Error::ShapeMismatch {
                what: format!("{what} dim {axis} (expected dims {expected:?})"),
                got: g,
                expected: e,
            });
        }
    }
    Ok(())
}

impl Attention {
    /// The plan a call with these options would run for `dims` on `gpu`, without running it.
    pub fn plan(&self, gpu: &Gpu, dims: Dims) -> Result<Plan> {
        self.plan_for(gpu, dims, self.want_weights)
    }

    /// The plan, given whether the weights will be written.
    fn plan_for(&self, gpu: &Gpu, dims: Dims, weights: bool) -> Result<Plan> {
        let spec = self.validate(dims)?;
        let three_pass = |why| -> Result<Plan> {
            Ok(Plan::ThreePass {
                plan: ThreePassPlan::new(&spec, &gpu.limits)?,
                why,
            })
        };
        let fused = |why| -> Result<Plan> {
            Ok(Plan::Fused {
                plan: FusedPlan::new(&spec, &gpu.limits, false)?,
                why,
            })
        };
        let decode = |why| -> Result<Plan> {
            Ok(Plan::Decode {
                plan: FusedPlan::new(&spec, &gpu.limits, true)?,
                why,
            })
        };
        // A few query rows (a whole GQA group fits one workgroup) over many keys: the fused
        // grid would be a handful of workgroups each streaming every key.
        let short_queries = dims.group() * dims.q_len <= 64 && dims.kv_len >= 1024;
        let plan = match self.path {
            Path::ThreePass => three_pass("forced")?,
            Path::Fused => fused("forced")?,
            Path::Decode => decode("forced")?,
            Path::Auto if weights => three_pass("the weights were asked for")?,
            Path::Auto if self.additive.is_some() => {
                three_pass("additive scores need the three-pass path")?
            }
            Path::Auto => match flash::unsupported(&gpu.limits) {
                Some(why) => three_pass(why)?,
                None if short_queries => decode("a few queries over many keys")?,
                None => fused("the default: O(N) memory, one pass")?,
            },
        };
        log::debug!("wgpu-attention: {dims:?}: {}", plan.reason());
        Ok(plan)
    }

    /// Runs attention on the GPU, allocating the outputs (O in the queries' dtype).
    ///
    /// Dims are read from the tensors in the layout of the options; the log-sum-exp and the
    /// weights are returned when [`return_lse`](Attention::return_lse) and
    /// [`return_weights`](Attention::return_weights) ask for them. Supported: `head_dim` and
    /// `v_head_dim` 1 to 256, any lengths (problems larger than one storage binding are
    /// chunked), every tensor within one storage binding.
    pub fn run(&self, gpu: &Gpu, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Output> {
        let dims = Dims::from_shapes(self.layout, q.dims(), k.dims(), v.dims())?;
        self.validate(dims)?;
        let lse_dims = [dims.batch, dims.heads, dims.q_len, 1];
        // O takes the queries' dtype: f32 queries over a bf16 cache give an f32 output.
        let out = Output {
            o: gpu.empty_as(dims.o_shape(self.layout), q.dtype())?,
            lse: self.want_lse.then(|| gpu.empty(lse_dims)).transpose()?,
            weights: self
                .want_weights
                .then(|| gpu.empty(dims.score_shape()))
                .transpose()?,
        };
        self.run_into(gpu, q, k, v, &out)?;
        Ok(out)
    }

    /// Runs attention on the GPU into outputs the caller allocated (reused across calls, or
    /// poisoned by a test). The log-sum-exp and weights are written when `out` has them,
    /// whatever [`return_lse`](Attention::return_lse) says; weights in `out` make
    /// [`Path::Auto`] choose the three-pass path.
    pub fn run_into(
        &self,
        gpu: &Gpu,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Output,
    ) -> Result<()> {
        let dims = Dims::from_shapes(self.layout, q.dims(), k.dims(), v.dims())?;
        let spec = self.validate(dims)?;
        expect_dims("O", out.o.dims(), dims.o_shape(self.layout))?;
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
                && t.dtype() != crate::DType::F32
            {
                return Err(Error::InvalidOption {
                    what,
                    value: format!("{:?}", t.dtype()),
                    why: "the log-sum-exp and the weights are always f32",
                });
            }
        }
        let plan = self.plan_for(gpu, dims, out.weights.is_some())?;
        if out.weights.is_some() && !matches!(plan, Plan::ThreePass { .. }) {
            return Err(Error::InvalidOption {
                what: "weights output",
                value: "Some".into(),
                why: "the fused path does not materialise the weights; ask for them with \
                      return_weights(true) so the plan picks the three-pass path",
            });
        }
        gpu.submit_with(plan.name(), |encoder| {
            self.encode_planned(gpu, &spec, &plan, q, k, v, out, encoder)
        })
    }

    /// Validates and plans a call and records it into `encoder` without submitting, for
    /// callers that put more work in the same command buffer (the multi-head layer).
    pub(crate) fn encode_into(
        &self,
        gpu: &Gpu,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        out: &Output,
        encoder: &mut wgpu::CommandEncoder,
    ) -> Result<()> {
        let dims = Dims::from_shapes(self.layout, q.dims(), k.dims(), v.dims())?;
        let spec = self.validate(dims)?;
        expect_dims("O", out.o.dims(), dims.o_shape(self.layout))?;
        if let Some(w) = &out.weights {
            expect_dims("weights", w.dims(), dims.score_shape())?;
        }
        let plan = self.plan_for(gpu, dims, out.weights.is_some())?;
        self.encode_planned(gpu, &spec, &plan, q, k, v, out, encoder)
    }

    #[allow(clippy::too_many_arguments)] // the private step both entry points share
    fn encode_planned(
        &self,
        gpu: &Gpu,
        spec: &crate::Spec<'_>,
        plan: &Plan,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Output,
        encoder: &mut wgpu::CommandEncoder,
    ) -> Result<()> {
        let io = three_pass::Io {
            q,
            k,
            v,
            o: &out.o,
            lse: out.lse.as_ref(),
            weights: out.weights.as_ref(),
        };
        match plan {
            Plan::ThreePass { plan, .. } => three_pass::encode(gpu, spec, plan, &io, encoder),
            Plan::Fused { plan, .. } | Plan::Decode { plan, .. } => {
                flash::encode(gpu, spec, plan, &io, encoder)
            }
        }
    }
}
