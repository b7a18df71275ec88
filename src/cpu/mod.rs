//! Attention on the CPU.
//!
//! [`reference()`] is the oracle every GPU result is checked against: plain loops, f64
//! accumulation, the score matrix materialised, the same [`Spec`](crate::Spec) and semantics as
//! the GPU paths.

mod merge;
mod reference;

pub use merge::merge;
pub use reference::{Reference, reference};
