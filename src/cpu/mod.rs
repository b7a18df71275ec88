//! Attention on the CPU.
//!
//! [`reference()`] is the oracle every GPU result is checked against: plain loops, f64
//! accumulation, the score matrix materialised, the same [`Spec`](crate::Spec) and semantics as
//! the GPU paths. [`fast()`] is the honest CPU baseline: f32, blocked like FlashAttention (online
//! softmax, no `q_len x kv_len` buffer) and multi-threaded with rayon. [`mha_reference`] is the
//! multi-head layer on the reference path.

mod fast;
mod merge;
mod mha;
mod reference;

pub use fast::{FastOutput, HostElement, fast};
pub use merge::merge;
pub use mha::mha_reference;
pub use reference::{Reference, reference};
