//! `MultiHeadAttention`: the layer of "Attention Is All You Need" in PyTorch's
//! `nn.MultiheadAttention` conventions, on the GPU, plus its CPU version on the reference path.
//!
//! `forward(query, key, value)` with `batch_first` inputs `[B, L, E]`, `[B, S, kdim]`,
//! `[B, S, vdim]`: Q, K and V projections (`X W^T + b`), attention over `num_heads` query heads
//! and `kv_heads` key/value heads (grouped-query attention when fewer), the output projection,
//! and on request the attention weights averaged over heads (`need_weights`). The projections
//! write `[B, L, heads, head_dim]`, which is the `Bshd` layout, so attention reads them with no
//! transpose; everything is recorded into one command buffer and submitted once.
//!
//! | file | what it holds |
//! | --- | --- |
//! | `config` | [`MhaConfig`]: the layer's sizes and their validation |
//! | `weights` | [`MhaWeights`]: host parameters, PyTorch's packed `in_proj`, safetensors loading |
//! | `layer` | [`MultiHeadAttention`] on the GPU: projections, attention, output projection in one submit |
//!
//! Its CPU oracle is [`cpu::mha_reference`](crate::cpu::mha_reference).

/// The oracle's former home, kept so callers of `mha::mha_reference` still compile.
pub use crate::cpu::mha_reference;

mod config;
mod layer;
mod weights;

pub use config::MhaConfig;
pub use layer::{MhaActivations, MhaGradients, MhaOutput, MultiHeadAttention};
pub use weights::MhaWeights;
