//! Attention on a wgpu device.
//!
//! [`Gpu`] holds the device and its pipeline cache, [`Tensor`] a device buffer with dims, and
//! [`Attention::run`](crate::Attention::run) validates a call, plans it and submits it once.
//!
//! | module | what it holds |
//! | --- | --- |
//! | `attention` | `Attention::{plan, run, run_into}`: validate once, plan, encode, submit |
//! | `paths` | the path choice, and one file per path (`three_pass`, `fused`) with its plan and encoding; the masking buffers |
//! | `dispatch` | dispatches several callers record: the batched GEMM, the log-sum-exp combine |
//! | [`kernels`] | the kernel registry: typed keys, WGSL composition from `shaders/lib/`, the uniforms declared once, the pipeline cache |
//! | `limits` | [`GpuLimits`], [`LimitCaps`], dispatch sizes: what every plan is checked against |
//! | `context` | [`Gpu`]: adapter, device, queue, timestamps, submission |
//! | `tensor`, `cache`, `merge` | [`Tensor`], [`KvCache`], [`merge`] |

mod attention;
mod cache;
mod context;
pub(crate) mod dispatch;
pub mod kernels;
pub(crate) mod limits;
mod merge;
pub(crate) mod paths;
pub(crate) mod tensor;

pub(crate) use attention::encode_validated;
pub use cache::KvCache;
pub use context::Gpu;
pub use dispatch::gemm::{MatView, MatmulShape, matmul};
pub use limits::{DispatchSize, GpuLimits, LimitCaps};
pub use merge::{Partial, merge};
pub use paths::{Chunk, FusedPlan, Plan, ThreePassPlan};
pub use tensor::Tensor;

use crate::error::{Error, Result};

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
