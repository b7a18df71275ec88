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
    /// This layer among all of the process (`MhaActivations::layer`).
    id: u64,
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
        static LAYERS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        Ok(MultiHeadAttention {
            id: LAYERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
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
        Ok(self.forward_keeping(gpu, query, key, value, opts, false)?.0)
    }

    /// [`forward`](MultiHeadAttention::forward), keeping what
    /// [`backward`](MultiHeadAttention::backward) needs: the inputs, the projections, the
    /// attention's output and its log-sum-exp (a few tensors of the inputs' size; nothing of
    /// size `L x S` unless the weights are asked for).
    pub fn forward_for_backward(
        &self,
        gpu: &Gpu,
        query: &Tensor,
        key: &Tensor,
        value: &Tensor,
        opts: &Attention,
    ) -> Result<(MhaOutput, MhaActivations)> {
        let (out, kept) = self.forward_keeping(gpu, query, key, value, opts, true)?;
        Ok((out, kept.expect("kept when asked")))
    }

    fn forward_keeping(
        &self,
        gpu: &Gpu,
        query: &Tensor,
        key: &Tensor,
        value: &Tensor,
        opts: &Attention,
        keep: bool,
    ) -> Result<(MhaOutput, Option<MhaActivations>)> {
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
            lse: keep
                .then(|| gpu.empty([batch, c.num_heads, q_len, 1]))
                .transpose()?,
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
        let kept = keep.then(|| MhaActivations {
            layer: self.id,
            inputs: [query.clone(), key.clone(), value.clone()],
            projected: [q, k, v],
            lse: attn.lse.clone().expect("allocated when keeping"),
            o: attn.o,
            // The layer gives no attention-bias or sink gradient.
            opts: opts
                .return_weights(false)
                .return_bias_grad(false)
                .return_sinks_grad(false),
            sizes: (batch, q_len, kv_len),
        });
        Ok((
            MhaOutput {
                out,
                weights: averaged,
            },
            kept,
        ))
    }

    /// The gradients of a loss by the layer's inputs, weights and biases, given `d_out`, the
    /// loss's gradient by the output of the forward that made `kept` (the output's dims).
    /// `kept` must come from this layer's own
    /// [`forward_for_backward`](MultiHeadAttention::forward_for_backward): another layer's,
    /// even of the same sizes, is [`Error::InvalidOption`] (its gradients would be of this
    /// layer's weights at the other's activations).
    /// On the GPU: the output projection's and the input projections' products, and the
    /// attention's [`backward`](Attention::backward). All f32; for self-attention (one tensor
    /// as query, key and value) the gradient by that tensor is the sum of the three. The CPU
    /// oracle is [`cpu::mha_reference_backward`](crate::cpu::mha_reference_backward).
    pub fn backward(
        &self,
        gpu: &Gpu,
        kept: &MhaActivations,
        d_out: &Tensor,
    ) -> Result<MhaGradients> {
        if kept.layer != self.id {
            return Err(Error::InvalidOption {
                what: "kept activations",
                value: format!("of layer {}, given to layer {}", kept.layer, self.id),
                why: "backward takes the activations of this layer's own forward_for_backward",
            });
        }
        let c = &self.config;
        let (batch, q_len, kv_len) = kept.sizes;
        let [query, key, value] = &kept.inputs;
        gpu.expect_own("d_out", d_out)?;
        gpu.expect_own("the kept activations", &kept.o)?;
        gpu.expect_own("the layer's weights", &self.q_weight)?;
        crate::gpu::tensor::expect_dims("d_out", d_out.dims(), query.dims())?;
        let (e, kv) = (c.embed_dim, c.kv_width());
        let (rows, kv_rows) = (batch * q_len, batch * kv_len);
        let d_attn = gpu.empty(kept.o.dims())?;
        let grads = MhaGradients {
            query: gpu.empty(query.dims())?,
            key: gpu.empty(key.dims())?,
            value: gpu.empty(value.dims())?,
            q_weight: gpu.empty(self.q_weight.dims())?,
            k_weight: gpu.empty(self.k_weight.dims())?,
            v_weight: gpu.empty(self.v_weight.dims())?,
            out_weight: gpu.empty(self.out_weight.dims())?,
            q_bias: self
                .q_bias
                .as_ref()
                .map(|b| gpu.empty(b.dims()))
                .transpose()?,
            k_bias: self
                .k_bias
                .as_ref()
                .map(|b| gpu.empty(b.dims()))
                .transpose()?,
            v_bias: self
                .v_bias
                .as_ref()
                .map(|b| gpu.empty(b.dims()))
                .transpose()?,
            out_bias: self
                .out_bias
                .as_ref()
                .map(|b| gpu.empty(b.dims()))
                .transpose()?,
        };
        let ones = gpu.upload(&vec![1.0; rows.max(kv_rows)], [1, 1, 1, rows.max(kv_rows)])?;
        // The output projection: d_attn = d_out W_o, dW_o = d_out^T o, db_o = sum_rows d_out.
        gpu.submit_with("multi-head attention backward (output)", |encoder| {
            linear_backward(
                gpu,
                encoder,
                (&kept.o, &self.out_weight, d_out, &ones),
                (&d_attn, &grads.out_weight, grads.out_bias.as_ref()),
                (rows, e, e),
            )
        })?;
        let [q, k, v] = &kept.projected;
        let attn_grads = crate::gpu::Gradients {
            dq: gpu.empty(q.dims())?,
            dk: gpu.empty(k.dims())?,
            dv: gpu.empty(v.dims())?,
            dbias: None,
            dsinks: None,
        };
        kept.opts
            .backward_into(gpu, q, k, v, &kept.o, &kept.lse, &d_attn, &attn_grads)?;
        gpu.submit_with("multi-head attention backward (inputs)", |encoder| {
            for (x, w, dy, dx, dw, db, sizes) in [
                (
                    query,
                    &self.q_weight,
                    &attn_grads.dq,
                    &grads.query,
                    &grads.q_weight,
                    &grads.q_bias,
                    (rows, e, e),
                ),
                (
                    key,
                    &self.k_weight,
                    &attn_grads.dk,
                    &grads.key,
                    &grads.k_weight,
                    &grads.k_bias,
                    (kv_rows, kv, c.kdim),
                ),
                (
                    value,
                    &self.v_weight,
                    &attn_grads.dv,
                    &grads.value,
                    &grads.v_weight,
                    &grads.v_bias,
                    (kv_rows, kv, c.vdim),
                ),
            ] {
                linear_backward(
                    gpu,
                    encoder,
                    (x, w, dy, &ones),
                    (dx, dw, db.as_ref()),
                    sizes,
                )?;
            }
            Ok(())
        })?;
        Ok(grads)
    }
}

/// The backward of `y = x W^T + b` (`x` `[rows, width]`, `W` `[n, width]`, `dy` `[rows, n]`):
/// `dx = dy W`, `dW = dy^T x`, `db = sum_rows dy` (with a row of `ones` at least `rows` long).
#[allow(clippy::type_complexity)]
fn linear_backward(
    gpu: &Gpu,
    encoder: &mut wgpu::CommandEncoder,
    (x, w, dy, ones): (&Tensor, &Tensor, &Tensor, &Tensor),
    (dx, dw, db): (&Tensor, &Tensor, Option<&Tensor>),
    (rows, n, width): (usize, usize, usize),
) -> Result<()> {
    use crate::gpu::dispatch::gemm::encode_matmul;
    let shape = |m, n, k| MatmulShape {
        m,
        n,
        k,
        batches: 1,
        alpha: 1.0,
    };
    // dx[r, c] = sum_o dy[r, o] W[o, c]: B[c, o] = W[o, c].
    encode_matmul(
        gpu,
        encoder,
        shape(rows, width, n),
        MatView::contiguous(dy, rows, n),
        MatView {
            tensor: w,
            strides: [0, 1, width],
        },
        MatView::contiguous(dx, rows, width),
        None,
    )?;
    // dW[o, c] = sum_r dy[r, o] x[r, c]: A[o, r] = dy[r, o], B[c, r] = x[r, c].
    encode_matmul(
        gpu,
        encoder,
        shape(n, width, rows),
        MatView {
            tensor: dy,
            strides: [0, 1, n],
        },
        MatView {
            tensor: x,
            strides: [0, 1, width],
        },
        MatView::contiguous(dw, n, width),
        None,
    )?;
    if let Some(db) = db {
        // db[o] = sum_r 1 * dy[r, o].
        encode_matmul(
            gpu,
            encoder,
            shape(1, n, rows),
            MatView {
                tensor: ones,
                strides: [0, 0, 1],
            },
            MatView {
                tensor: dy,
                strides: [0, 1, n],
            },
            MatView::contiguous(db, 1, n),
            None,
        )?;
    }
    Ok(())
}

/// What [`MultiHeadAttention::forward_for_backward`] keeps for the backward.
#[derive(Debug, Clone)]
pub struct MhaActivations {
    /// The layer whose forward kept them (`MultiHeadAttention::id`).
    layer: u64,
    /// The query, key and value inputs.
    inputs: [Tensor; 3],
    /// Their projections Q, K, V (`Bshd`).
    projected: [Tensor; 3],
    /// The attention's output (`Bshd`) and log-sum-exp.
    o: Tensor,
    lse: Tensor,
    /// The attention options of the forward, in the layer's layout.
    opts: Attention,
    /// `(batch, q_len, kv_len)`.
    sizes: (usize, usize, usize),
}

/// The gradients [`MultiHeadAttention::backward`] returns, f32 tensors in the dims of what
/// they are the gradients of (the weights `[1, 1, out, in]`, the biases `[1, 1, 1, out]`).
#[derive(Debug, Clone)]
pub struct MhaGradients {
    /// By the query input.
    pub query: Tensor,
    /// By the key input.
    pub key: Tensor,
    /// By the value input.
    pub value: Tensor,
    /// By `W_q`.
    pub q_weight: Tensor,
    /// By `W_k`.
    pub k_weight: Tensor,
    /// By `W_v`.
    pub v_weight: Tensor,
    /// By `W_o`.
    pub out_weight: Tensor,
    /// By the biases the layer has.
    pub q_bias: Option<Tensor>,
    /// By `b_k`.
    pub k_bias: Option<Tensor>,
    /// By `b_v`.
    pub v_bias: Option<Tensor>,
    /// By `b_o`.
    pub out_bias: Option<Tensor>,
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
