//! Attention on the CPU.
//!
//! [`reference()`] is the oracle every GPU result is checked against: plain loops, f64
//! accumulation, the score matrix materialised, the same [`Spec`](crate::Spec) and semantics as
//! the GPU paths; [`reference_backward()`] is its backward (the gradients by Q, K, V, the
//! bias, the sinks), from the same scorer. [`fast()`] is the honest CPU baseline: f32, blocked like FlashAttention (online
//! softmax, no `q_len x kv_len` buffer) and multi-threaded with rayon. [`mha_reference`] is the
//! multi-head layer on the reference path, [`mha_reference_backward`] its backward. [`rotate()`] is rotary position embedding in f64.

mod backward;
mod fast;
mod merge;
mod mha;
mod reference;
mod rotary;

pub use backward::{ReferenceGradients, reference_backward};
pub use fast::{CpuKernel, FastOutput, HostElement, fast, fast_with_kernel};
pub use merge::merge;
pub use mha::{MhaReferenceGradients, mha_reference, mha_reference_backward};
pub use reference::{Reference, reference};
pub use rotary::rotate;
