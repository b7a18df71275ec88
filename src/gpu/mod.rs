//! Attention on a wgpu device.
//!
//! [`Gpu`] holds the device and its pipeline cache, [`Tensor`] a device buffer with dims, and
//! [`Attention::run`](crate::Attention::run) validates a call, plans it and submits it once.
//!
//! | module | what it holds |
//! | --- | --- |
//! | `attention` | `Attention::{plan, run, run_into}`: validate once, plan, encode, submit |
//! | `backward` | `Attention::backward`: dQ, dK, dV from the forward's log-sum-exp |
//! | `paths` | the path choice, and one file per path (`three_pass`, `fused`) with its plan and encoding; the masking buffers |
//! | `dispatch` | dispatches several callers record: the batched GEMM, the log-sum-exp combine |
//! | [`kernels`] | the kernel registry: typed keys, WGSL composition from `shaders/lib/`, the uniforms declared once, the pipeline cache |
//! | `limits` | [`GpuLimits`], [`LimitCaps`], dispatch sizes: what every plan is checked against |
//! | `context` | [`Gpu`]: adapter, device, queue, timestamps, submission |
//! | `tensor`, `cache`, `paged`, `merge`, `rotary` | [`Tensor`], [`KvCache`], [`PagedKvCache`], [`merge`], [`rotate`] |
//! | `pool` | the per-device buffer pool and its reuse rule |
//! | `scopes` | wgpu's error scopes around every call; in the browser, their verdicts kept for the next call or `await` |
//! | `oneshot` | a value one callback hands to one future (readbacks, work done) |
//! | `options` | masking options on the device: [`DeviceMask`], [`DeviceLens`], bias tensors |

mod attention;
mod backward;
mod cache;
mod context;
pub(crate) mod dispatch;
#[doc(hidden)]
pub mod kernels;
pub(crate) mod limits;
mod merge;
mod oneshot;
mod options;
mod paged;
pub(crate) mod paths;
pub(crate) mod pool;
pub(crate) mod rotary;
pub(crate) mod scopes;
pub(crate) mod tensor;
pub mod tuning;

pub use attention::Output;
pub(crate) use attention::encode_validated;
pub use backward::Gradients;
pub use cache::KvCache;
pub use context::Gpu;
#[doc(hidden)]
pub use dispatch::gemm::{MatView, MatmulShape, matmul};
pub use kernels::ParamsIn;
pub use limits::{DecodeKernel, DispatchSize, GpuLimits, LimitCaps, MmaChoice, TileBlock};
pub use merge::{Partial, merge};
pub use options::{DeviceLens, DeviceMask};
pub use paged::{PagedKvCache, SeqId};
#[doc(hidden)]
pub use paths::Chunk;
pub use paths::{FusedPlan, Plan, ThreePassPlan};
pub use pool::PoolStats;
pub use rotary::rotate;
pub use tensor::{Shape, Tensor};
