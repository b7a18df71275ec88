//! The layer on the GPU.

use super::{MhaConfig, MhaWeights};
use crate::error::{Error, Result};
use crate::gpu::{Gpu, MatView, MatmulShape, Output, Tensor};
use crate::spec::{Attention, Layout};

/// What `forward` returns.
#[derive(Debug)]
pub struct MhaOutput {
    /// `[B, L, embed_dim]`.
    pub out: Tensor,
    /// With `need_weights`: the attention weights averaged over heads, `[B, 1, L, S]`.
    pub weights: Option<Tensor>,
}

/// A multi-head attention layer on the GPU; see the module docs.
#[derive(Debug)]
pub struct MultiHeadAttention {
    config: MhaConfig,
    q_weight: Tensor,
    k_weight: Tensor,
    v_weight: Tensor,
    out_weight: Tensor,
    q_bias: Option<Tensor>,
    k_bias: Option<Tensor>,
    v_bias: Option<Tensor>,
    out_bias: Option<Tensor>,
}

impl MultiHeadAttention {
    /// Uploads the weights.
    pub fn new(gpu: &Gpu, config: MhaConfig, weights: &MhaWeights) -> Result<MultiHeadAttention> {
        config.validate()?;
        weights.validate(&config)?;
        let (e, kv) = (config.embed_dim, config.kv_width());
        let up = |x: &[f32], rows: usize, cols: usize| gpu.upload(x, [1, 1, rows, cols]);
        let bias = |b: &Option<Vec<f32>>| -> Result<Option<Tensor>> {
            b.as_ref()
                .map(|b| gpu.upload(b, [1, 1, 1, b.len()]))
                .transpose()
        };
        Ok(MultiHeadAttention {
            config,
            q_weight: up(&weights.q_weight, e, e)?,
            k_weight: up(&weights.k_weight, kv, config.kdim)?,
            v_weight: up(&weights.v_weight, kv, config.vdim)?,
            out_weight: up(&weights.out_weight, e, e)?,
            q_bias: bias(&weights.q_bias)?,
            k_bias: bias(&weights.k_bias)?,
            v_bias: bias(&weights.v_bias)?,
            out_bias: bias(&weights.out_bias)?,
        })
    }

    /// The layer's sizes.
    pub fn config(&self) -> &MhaConfig {
        &self.config
    }

    /// The layer on `query` `[B, L, E]`, `key` `[B, S, kdim]` and `value` `[B, S, vdim]`
    /// (`batch_first`; tensors of dims `[B, L, 1, E]` etc. are taken too, and the output has
    /// the query's form), with the masks and options of
    /// `opts` (its layout is ignored: the layer's own is `Bshd`). PyTorch's `need_weights` is
    /// [`Attention::return_weights`]: with it, the output carries the weights averaged over
    /// heads, and attention runs on the three-pass path.
    pub fn forward(
        &self,
        gpu: &Gpu,
        query: &Tensor,
        key: &Tensor,
        value: &Tensor,
        opts: &Attention,
    ) -> Result<MhaOutput> {
        let need_weights = opts.want_weights;
        let c = &self.config;
        for (what, t) in [("query", query), ("key", key), ("value", value)] {
            gpu.expect_own(what, t)?;
        }
        // The layer's weights were uploaded by one Gpu; a layer is used with that one.
        gpu.expect_own("the layer's weights", &self.q_weight)?;
        let (batch, q_len) = input_dims("query", query, c.embed_dim, None)?;
        let (_, kv_len) = input_dims("key", key, c.kdim, Some(batch))?;
        let (_, v_len) = input_dims("value", value, c.vdim, Some(batch))?;
        if v_len != kv_len {
            return Err(Error::ShapeMismatch {
                what: "value sequence length".into(),
                got: v_len,
                expected: kv_len,
            });
        }
        let dims = c.attention_dims(batch, q_len, kv_len);
        let opts = opts
            .clone()
            .layout(Layout::Bshd)
            .return_weights(need_weights);
        // Validated once, before anything is allocated; the attention step reuses it.
        let spec = opts.validate(dims)?;
        let q = gpu.empty(dims.q_shape(Layout::Bshd))?;
        let k = gpu.empty(dims.k_shape(Layout::Bshd))?;
        let v = gpu.empty(dims.v_shape(Layout::Bshd))?;
        let attn = Output {
            o: gpu.empty(dims.o_shape(Layout::Bshd))?,
            lse: None,
            weights: need_weights
                .then(|| gpu.empty(dims.score_shape()))
                .transpose()?,
        };
        // The output has the query's form: [B, L, E], or [B, L, 1, E].
        let out = if query.rank() == 3 {
            gpu.empty([batch, q_len, c.embed_dim])?
        } else {
            gpu.empty([batch, q_len, 1, c.embed_dim])?
        };
        let averaged = need_weights
            .then(|| gpu.empty([batch, 1, q_len, kv_len]))
            .transpose()?;
        let ones = need_weights
            .then(|| gpu.upload(&vec![1.0; c.num_heads], [1, 1, 1, c.num_heads]))
            .transpose()?;
        let (e, kv) = (c.embed_dim, c.kv_width());
        let linear = |rows: usize, n: usize, k: usize| MatmulShape {
            m: rows,
            n,
            k,
            batches: 1,
            alpha: 1.0,
        };
        gpu.submit_with("multi-head attention", |encoder| {
            use crate::gpu::dispatch::gemm::encode_matmul;
            let projections = [
                (query, &self.q_weight, &self.q_bias, &q, batch * q_len, e, e),
                (
                    key,
                    &self.k_weight,
                    &self.k_bias,
                    &k,
                    batch * kv_len,
                    kv,
                    c.kdim,
                ),
                (
                    value,
                    &self.v_weight,
                    &self.v_bias,
                    &v,
                    batch * kv_len,
                    kv,
                    c.vdim,
                ),
            ];
            for (x, w, b, y, rows, n, width) in projections {
                encode_matmul(
                    gpu,
                    encoder,
                    linear(rows, n, width),
                    MatView::contiguous(x, rows, width),
                    MatView::contiguous(w, n, width),
                    MatView::contiguous(y, rows, n),
                    b.as_ref(),
                )?;
            }
            crate::gpu::encode_validated(gpu, &spec, (&q, &k, &v), &attn, encoder)?;
            encode_matmul(
                gpu,
                encoder,
                linear(batch * q_len, e, e),
                MatView::contiguous(&attn.o, batch * q_len, e),
                MatView::contiguous(&self.out_weight, e, e),
                MatView::contiguous(&out, batch * q_len, e),
                self.out_bias.as_ref(),
            )?;
            if let (Some(w), Some(avg), Some(ones)) = (&attn.weights, &averaged, &ones) {
                // avg[b, x] = (1/H) sum_h w[b, h, x]: a product with a row of ones, summing
                // over the head axis of the weights.
                let plane = q_len * kv_len;
                encode_matmul(
                    gpu,
                    encoder,
                    MatmulShape {
                        m: 1,
                        n: plane,
                        k: c.num_heads,
                        batches: batch,
                        alpha: 1.0 / c.num_heads as f32,
                    },
                    MatView {
                        tensor: ones,
                        strides: [0, 0, 1],
                    },
                    MatView {
                        tensor: w,
                        strides: [c.num_heads * plane, 1, plane],
                    },
                    MatView {
                        tensor: avg,
                        strides: [plane, plane, 1],
                    },
                    None,
                )?;
            }
            Ok(())
        })?;
        Ok(MhaOutput {
            out,
            weights: averaged,
        })
    }
}

/// `(batch, seq)` of a `[B, seq, width]` input (or `[B, seq, 1, width]`), checking its width
/// (and batch).
fn input_dims(
    what: &'static str,
    t: &Tensor,
    width: usize,
    batch: Option<usize>,
) -> Result<(usize, usize)> {
    let ([b, s, w], one) = match (t.rank(), t.dims()) {
        (3, [_, b, s, w]) => ([b, s, w], None),
        (_, [b, s, one, w]) => ([b, s, w], Some(one)),
    };
    let form = if one.is_some() {
        "inputs are [batch, seq, 1, width]"
    } else {
        "inputs are [batch, seq, width]"
    };
    let axis_w = if one.is_some() { 3 } else { 2 };
    for (axis, got, expected) in [
        (2, one.unwrap_or(1), 1),
        (axis_w, w, width),
        (0, b, batch.unwrap_or(b)),
    ] {
        if got != expected {
            return Err(Error::ShapeMismatch {
                what: format!("{what} dim {axis} ({form})"),
                got,
                expected,
            });
        }
    }
    Ok((b, s))
}
