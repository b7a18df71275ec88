//! Dispatches more than one caller records: the batched matrix product (the layer's
//! projections) and the merge of partial results by log-sum-exp (flash-decoding's splits, the
//! fused path's passes, the public [`merge`](crate::gpu::merge)).

pub(crate) mod combine;
pub(crate) mod gemm;
