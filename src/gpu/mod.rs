//! Attention on a wgpu device.
//!
//! [`Gpu`] holds the device and its pipeline cache, [`Tensor`] a device buffer with dims, and
//! [`Attention::run`](crate::Attention::run) validates a call, plans it and submits it once.

mod context;
pub mod kernels;
mod tensor;
mod three_pass;

pub use context::{Gpu, GpuLimits, LimitCaps};
pub use tensor::Tensor;
pub use three_pass::{Chunk, ThreePassPlan};

use crate::error::{Error, Result};
use crate::spec::{Attention, Dims};

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

/// Which kernels a call runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Plan {
    /// QK^T, masked softmax and P·V as three kernels, with the scores materialised.
    ThreePass(ThreePassPlan),
}

impl Plan {
    /// Why this path and this chunking were chosen.
    pub fn reason(&self) -> String {
        match self {
            Plan::ThreePass(p) => format!(
                "three-pass: {} chunk(s) of {} bytes of scores ({})",
                p.chunks.len(),
                p.scratch_bytes,
                p.reason
            ),
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
        let spec = self.validate(dims)?;
        let plan = ThreePassPlan::new(&spec, &gpu.limits)?;
        let plan = Plan::ThreePass(plan);
        log::debug!("wgpu-attention: {dims:?}: {}", plan.reason());
        Ok(plan)
    }

    /// Runs attention on the GPU, allocating the outputs.
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
        let out = Output {
            o: gpu.empty(dims.o_shape(self.layout))?,
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
    /// whatever [`return_lse`](Attention::return_lse) says.
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
        let Plan::ThreePass(plan) = self.plan(gpu, dims)?;
        three_pass::run(
            gpu,
            &spec,
            &plan,
            &three_pass::Io {
                q,
                k,
                v,
                o: &out.o,
                lse: out.lse.as_ref(),
                weights: out.weights.as_ref(),
            },
        )
    }
}
