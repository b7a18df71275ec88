//! Portable GPU attention kernels in WGSL, run through wgpu on Vulkan, Metal and DX12, and
//! checked against an f64 CPU reference.
//!
//! ```no_run
//! use wgpu_attention::{Attention, Causal, Gpu};
//!
//! let gpu = Gpu::new()?;
//! let (b, h, l, d) = (1, 2, 5, 8);
//! let x: Vec<f32> = (0..b * h * l * d).map(|i| (i as f32 * 0.1).sin()).collect();
//! let q = gpu.upload(&x, [b, h, l, d])?;
//! let out = Attention::new().causal(Causal::TopLeft).run(&gpu, &q, &q, &q)?;
//! let o: Vec<f32> = out.o.download(&gpu)?;
//! assert_eq!(o.len(), x.len());
//! # Ok::<(), wgpu_attention::Error>(())
//! ```
//!
//! See the README for the semantics (which follow PyTorch's `scaled_dot_product_attention`
//! where it is well defined, and FlashAttention where it is not) and the architecture.

pub mod cpu;
mod error;
pub mod gpu;
pub mod mha;
mod spec;

pub use error::{Error, Result};
pub use gpu::{
    DecodeKernel, Gpu, GpuLimits, KvCache, LimitCaps, Output, ParamsIn, Plan, Tensor, TileBlock,
};
pub use mha::{MhaConfig, MhaOutput, MhaWeights, MultiHeadAttention};
pub use spec::{
    Attention, Bias, BoolMask, Causal, DType, Dims, Layout, MAX_HEAD_DIM, MAX_SCALE, Path,
    SCORE_FLOOR, Spec,
};

/// The README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
