//! `MultiHeadAttention`: the layer of "Attention Is All You Need" in PyTorch's
//! `nn.MultiheadAttention` conventions, on the GPU, plus its CPU version on the reference path.
//!
//! `forward(query, key, value)` with `batch_first` inputs `[B, L, E]`, `[B, S, kdim]`,
//! `[B, S, vdim]`: Q, K and V projections (`X W^T + b`), attention over `num_heads` query heads
//! and `kv_heads` key/value heads (grouped-query attention when fewer), the output projection,
//! and on request the attention weights averaged over heads (`need_weights`). The projections
//! write `[B, L, heads, head_dim]`, which is the `Bshd` layout, so attention reads them with no
//! transpose; everything is recorded into one command buffer and submitted once.

use crate::error::{Error, Result};
use crate::gpu::{Gpu, MatView, MatmulShape, Output, Tensor};
use crate::spec::{Attention, Dims, Layout};

/// Sizes of the layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MhaConfig {
    /// Model width `E`: the query input and the output.
    pub embed_dim: usize,
    /// Query heads; `embed_dim % num_heads == 0`, `head_dim = embed_dim / num_heads`.
    pub num_heads: usize,
    /// Key/value heads (grouped-query attention); `num_heads % kv_heads == 0`.
    pub kv_heads: usize,
    /// Width of the key input (PyTorch's `kdim`).
    pub kdim: usize,
    /// Width of the value input (PyTorch's `vdim`).
    pub vdim: usize,
}

impl MhaConfig {
    /// Self-attention sizes: `kv_heads = num_heads`, `kdim = vdim = embed_dim`.
    pub fn new(embed_dim: usize, num_heads: usize) -> MhaConfig {
        MhaConfig {
            embed_dim,
            num_heads,
            kv_heads: num_heads,
            kdim: embed_dim,
            vdim: embed_dim,
        }
    }

    /// Per-head width.
    pub fn head_dim(&self) -> usize {
        self.embed_dim / self.num_heads
    }

    /// Rows of the K and V projection weights: `kv_heads * head_dim`.
    pub fn kv_width(&self) -> usize {
        self.kv_heads * self.head_dim()
    }

    fn validate(&self) -> Result<()> {
        for (what, v) in [
            ("embed_dim", self.embed_dim),
            ("num_heads", self.num_heads),
            ("kv_heads", self.kv_heads),
            ("kdim", self.kdim),
            ("vdim", self.vdim),
        ] {
            if v == 0 {
                return Err(Error::ZeroSize { what });
            }
        }
        if !self.embed_dim.is_multiple_of(self.num_heads) {
            return Err(Error::ShapeMismatch {
                what: format!(
                    "embed_dim {} modulo num_heads {}",
                    self.embed_dim, self.num_heads
                ),
                got: self.embed_dim % self.num_heads,
                expected: 0,
            });
        }
        if !self.num_heads.is_multiple_of(self.kv_heads) {
            return Err(Error::HeadsNotDivisible {
                heads: self.num_heads,
                kv_heads: self.kv_heads,
            });
        }
        Ok(())
    }
}

/// The layer's parameters on the host, in PyTorch's layout: weights `[out, in]` row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct MhaWeights {
    /// `W_q`, `[embed_dim, embed_dim]`.
    pub q_weight: Vec<f32>,
    /// `W_k`, `[kv_heads * head_dim, kdim]`.
    pub k_weight: Vec<f32>,
    /// `W_v`, `[kv_heads * head_dim, vdim]`.
    pub v_weight: Vec<f32>,
    /// `W_o` (`out_proj.weight`), `[embed_dim, embed_dim]`.
    pub out_weight: Vec<f32>,
    /// `b_q`, `[embed_dim]`.
    pub q_bias: Option<Vec<f32>>,
    /// `b_k`, `[kv_heads * head_dim]`.
    pub k_bias: Option<Vec<f32>>,
    /// `b_v`, `[kv_heads * head_dim]`.
    pub v_bias: Option<Vec<f32>>,
    /// `out_proj.bias`, `[embed_dim]`.
    pub out_bias: Option<Vec<f32>>,
}

impl MhaWeights {
    /// From PyTorch's packed `in_proj_weight` (`[E + 2 * kv_width, E]`: the rows of `W_q`, then
    /// `W_k`, then `W_v`) and `in_proj_bias`, used when `kdim == vdim == embed_dim`.
    pub fn from_in_proj(
        config: &MhaConfig,
        in_proj_weight: &[f32],
        in_proj_bias: Option<&[f32]>,
        out_weight: Vec<f32>,
        out_bias: Option<Vec<f32>>,
    ) -> Result<MhaWeights> {
        let (e, kv) = (config.embed_dim, config.kv_width());
        let rows = e + 2 * kv;
        if in_proj_weight.len() != rows * e {
            return Err(Error::DataLength {
                what: "in_proj_weight",
                dims: vec![rows, e],
                expected: rows * e,
                got: in_proj_weight.len(),
            });
        }
        if let Some(b) = in_proj_bias
            && b.len() != rows
        {
            return Err(Error::DataLength {
                what: "in_proj_bias",
                dims: vec![rows],
                expected: rows,
                got: b.len(),
            });
        }
        let split = |x: &[f32], w: usize| {
            (
                x[..e * w].to_vec(),
                x[e * w..(e + kv) * w].to_vec(),
                x[(e + kv) * w..].to_vec(),
            )
        };
        let (q_weight, k_weight, v_weight) = split(in_proj_weight, e);
        let (q_bias, k_bias, v_bias) = match in_proj_bias.map(|b| split(b, 1)) {
            Some((q, k, v)) => (Some(q), Some(k), Some(v)),
            None => (None, None, None),
        };
        Ok(MhaWeights {
            q_weight,
            k_weight,
            v_weight,
            out_weight,
            q_bias,
            k_bias,
            v_bias,
            out_bias,
        })
    }

    /// From a `.safetensors` file's bytes with PyTorch's state-dict names for
    /// `nn.MultiheadAttention`, under `prefix` (e.g. `"layers.0.self_attn."`, or `""`):
    /// `in_proj_weight` / `in_proj_bias`, or `q_proj_weight`, `k_proj_weight`,
    /// `v_proj_weight` (PyTorch's names when `kdim` or `vdim` differ from `embed_dim`), then
    /// `out_proj.weight` and `out_proj.bias`. Biases are optional; f32, f16 and bf16 tensors
    /// are read (half precision converted to f32).
    pub fn from_safetensors(config: &MhaConfig, bytes: &[u8], prefix: &str) -> Result<MhaWeights> {
        let file = safetensors::SafeTensors::deserialize(bytes)
            .map_err(|e| Error::Weights(format!("not a safetensors file: {e}")))?;
        let read = |name: &str| -> Result<Option<Vec<f32>>> {
            let full = format!("{prefix}{name}");
            let view = match file.tensor(&full) {
                Ok(view) => view,
                Err(safetensors::SafeTensorError::TensorNotFound(_)) => return Ok(None),
                Err(e) => return Err(Error::Weights(format!("{full}: {e}"))),
            };
            let data = view.data();
            let values = match view.dtype() {
                safetensors::Dtype::F32 => data
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
                safetensors::Dtype::F16 => data
                    .chunks_exact(2)
                    .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect(),
                safetensors::Dtype::BF16 => data
                    .chunks_exact(2)
                    .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect(),
                other => {
                    return Err(Error::Weights(format!(
                        "{full} is {other:?}; f32, f16 and bf16 are supported"
                    )));
                }
            };
            Ok(Some(values))
        };
        let need = |name: &str| -> Result<Vec<f32>> {
            read(name)?.ok_or_else(|| Error::Weights(format!("no tensor named {prefix}{name}")))
        };
        let out_weight = need("out_proj.weight")?;
        let out_bias = read("out_proj.bias")?;
        let weights = match read("in_proj_weight")? {
            Some(packed) => {
                let bias = read("in_proj_bias")?;
                MhaWeights::from_in_proj(config, &packed, bias.as_deref(), out_weight, out_bias)?
            }
            None => {
                let (q_bias, k_bias, v_bias) = match read("in_proj_bias")? {
                    Some(b) => {
                        let (e, kv) = (config.embed_dim, config.kv_width());
                        if b.len() != e + 2 * kv {
                            return Err(Error::DataLength {
                                what: "in_proj_bias",
                                dims: vec![e + 2 * kv],
                                expected: e + 2 * kv,
                                got: b.len(),
                            });
                        }
                        (
                            Some(b[..e].to_vec()),
                            Some(b[e..e + kv].to_vec()),
                            Some(b[e + kv..].to_vec()),
                        )
                    }
                    None => (None, None, None),
                };
                MhaWeights {
                    q_weight: need("q_proj_weight")?,
                    k_weight: need("k_proj_weight")?,
                    v_weight: need("v_proj_weight")?,
                    out_weight,
                    q_bias,
                    k_bias,
                    v_bias,
                    out_bias,
                }
            }
        };
        weights.validate(config)?;
        Ok(weights)
    }

    fn validate(&self, c: &MhaConfig) -> Result<()> {
        let (e, kv) = (c.embed_dim, c.kv_width());
        let check = |what: &'static str, got: usize, dims: Vec<usize>| -> Result<()> {
            let expected = dims.iter().product();
            if got != expected {
                return Err(Error::DataLength {
                    what,
                    dims,
                    expected,
                    got,
                });
            }
            Ok(())
        };
        check("q_weight", self.q_weight.len(), vec![e, e])?;
        check("k_weight", self.k_weight.len(), vec![kv, c.kdim])?;
        check("v_weight", self.v_weight.len(), vec![kv, c.vdim])?;
        check("out_weight", self.out_weight.len(), vec![e, e])?;
        for (what, bias, n) in [
            ("q_bias", &self.q_bias, e),
            ("k_bias", &self.k_bias, kv),
            ("v_bias", &self.v_bias, kv),
            ("out_bias", &self.out_bias, e),
        ] {
            if let Some(b) = bias {
                check(what, b.len(), vec![n])?;
            }
        }
        Ok(())
    }
}

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
    /// (tensors of dims `[B, L, 1, E]` etc., `batch_first`), with the masks and options of
    /// `opts` (its layout is ignored: the layer's own is `Bshd`). `need_weights` returns the
    /// weights averaged over heads and runs attention on the three-pass path.
    pub fn forward(
        &self,
        gpu: &Gpu,
        query: &Tensor,
        key: &Tensor,
        value: &Tensor,
        opts: &Attention,
        need_weights: bool,
    ) -> Result<MhaOutput> {
        let c = &self.config;
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
        let hd = c.head_dim();
        let dims = Dims {
            batch,
            heads: c.num_heads,
            kv_heads: c.kv_heads,
            q_len,
            kv_len,
            head_dim: hd,
            v_head_dim: hd,
        };
        let opts = opts
            .clone()
            .layout(Layout::Bshd)
            .return_weights(need_weights);
        opts.validate(dims)?;
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
        let out = gpu.empty([batch, q_len, 1, c.embed_dim])?;
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
            opts.encode_into(gpu, (&q, &k, &v), &attn, encoder)?;
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

/// `(batch, seq)` of a `[B, seq, 1, width]` input, checking its width (and batch).
fn input_dims(
    what: &'static str,
    t: &Tensor,
    width: usize,
    batch: Option<usize>,
) -> Result<(usize, usize)> {
    let [b, s, one, w] = t.dims();
    for (axis, got, expected) in [(2, one, 1), (3, w, width), (0, b, batch.unwrap_or(b))] {
        if got != expected {
            return Err(Error::ShapeMismatch {
                what: format!("{what} dim {axis} (inputs are [batch, seq, 1, width])"),
                got,
                expected,
            });
        }
    }
    Ok((b, s))
}

/// The layer on the CPU, on the reference path (f64 projections and attention): the oracle of
/// [`MultiHeadAttention::forward`]. Inputs are `[B, L, E]`, `[B, S, kdim]`, `[B, S, vdim]`
/// row-major; returns the output `[B, L, E]` and, with `need_weights`, the head-averaged
/// weights `[B, L, S]`.
#[allow(clippy::too_many_arguments)] // mirrors forward(): config, weights, three inputs, sizes
pub fn mha_reference(
    config: &MhaConfig,
    weights: &MhaWeights,
    query: &[f32],
    key: &[f32],
    value: &[f32],
    (batch, q_len, kv_len): (usize, usize, usize),
    opts: &Attention,
    need_weights: bool,
) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
    config.validate()?;
    weights.validate(config)?;
    let c = config;
    let (e, kv, hd) = (c.embed_dim, c.kv_width(), c.head_dim());
    let linear = |x: &[f32], rows: usize, w: &[f32], b: &Option<Vec<f32>>, n: usize, k: usize| {
        let mut y = vec![0f32; rows * n];
        for r in 0..rows {
            for o in 0..n {
                let mut acc = b.as_ref().map_or(0.0, |b| b[o] as f64);
                for i in 0..k {
                    acc += x[r * k + i] as f64 * w[o * k + i] as f64;
                }
                y[r * n + o] = acc as f32;
            }
        }
        y
    };
    for (what, data, expected) in [
        ("query", query.len(), batch * q_len * e),
        ("key", key.len(), batch * kv_len * c.kdim),
        ("value", value.len(), batch * kv_len * c.vdim),
    ] {
        if data != expected {
            return Err(Error::DataLength {
                what,
                dims: vec![batch, if what == "query" { q_len } else { kv_len }],
                expected,
                got: data,
            });
        }
    }
    let q = linear(
        query,
        batch * q_len,
        &weights.q_weight,
        &weights.q_bias,
        e,
        e,
    );
    let k = linear(
        key,
        batch * kv_len,
        &weights.k_weight,
        &weights.k_bias,
        kv,
        c.kdim,
    );
    let v = linear(
        value,
        batch * kv_len,
        &weights.v_weight,
        &weights.v_bias,
        kv,
        c.vdim,
    );
    let dims = Dims {
        batch,
        heads: c.num_heads,
        kv_heads: c.kv_heads,
        q_len,
        kv_len,
        head_dim: hd,
        v_head_dim: hd,
    };
    let opts = opts.clone().layout(Layout::Bshd);
    let r = crate::cpu::reference(&q, &k, &v, dims, &opts)?;
    let out = linear(
        &r.o,
        batch * q_len,
        &weights.out_weight,
        &weights.out_bias,
        e,
        e,
    );
    let averaged = need_weights.then(|| {
        let plane = q_len * kv_len;
        let mut avg = vec![0f32; batch * plane];
        for b in 0..batch {
            for x in 0..plane {
                let sum: f64 = (0..c.num_heads)
                    .map(|h| r.weights[(b * c.num_heads + h) * plane + x] as f64)
                    .sum();
                avg[b * plane + x] = (sum / c.num_heads as f64) as f32;
            }
        }
        avg
    });
    Ok((out, averaged))
}
