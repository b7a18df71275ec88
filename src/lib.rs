#![doc = include_str!("../README.md")]

pub mod cpu;
mod error;
pub mod gpu;
pub mod mha;
pub mod rotary;
pub mod score_mod;
mod spec;

pub use error::{Error, Result};
pub use gpu::{
    DecodeKernel, DeviceLens, DeviceMask, Gpu, GpuLimits, Gradients, KvCache, LimitCaps, MmaChoice,
    Output, PagedKvCache, ParamsIn, Plan, SeqId, Shape, Tensor, TileBlock,
};
pub use mha::{MhaActivations, MhaConfig, MhaGradients, MhaOutput, MhaWeights, MultiHeadAttention};
pub use rotary::Rotary;
pub use score_mod::ScoreMod;
pub use spec::{
    Attention, Bias, BlockTable, BoolMask, Causal, DType, Dims, Dropout, Layout, MAX_ALIBI_SLOPE,
    MAX_HEAD_DIM, MAX_SCALE, MAX_V_HEAD_DIM, Path, SCORE_FLOOR, Spec,
};
