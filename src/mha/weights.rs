//! The layer's parameters on the host: PyTorch's layout, packed `in_proj`, safetensors.

use super::MhaConfig;
use crate::error::{Error, Result};

/// The layer's parameters on the host, in PyTorch's layout: weights `[out, in]` row-major.
///
/// [`MhaWeights::new`] takes the four projections without biases; the biases are fields to
/// set after (`MhaWeights { q_bias: Some(..), ..MhaWeights::new(..) }`), and `Default` is
/// every tensor empty, for filling field by field.
#[derive(Debug, Clone, Default, PartialEq)]
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
    /// The projections `W_q`, `W_k`, `W_v` and `W_o` (PyTorch's `[out, in]` layout), with no
    /// biases (PyTorch's `bias=False`). Sizes are checked when the layer is made.
    pub fn new(
        q_weight: Vec<f32>,
        k_weight: Vec<f32>,
        v_weight: Vec<f32>,
        out_weight: Vec<f32>,
    ) -> MhaWeights {
        MhaWeights {
            q_weight,
            k_weight,
            v_weight,
            out_weight,
            ..MhaWeights::default()
        }
    }

    /// From PyTorch's packed `in_proj_weight` (`[E + 2 * kv_width, E]`: the rows of `W_q`, then
    /// `W_k`, then `W_v`) and `in_proj_bias`, used when `kdim == vdim == embed_dim`.
    pub fn from_in_proj(
        config: &MhaConfig,
        in_proj_weight: &[f32],
        in_proj_bias: Option<&[f32]>,
        out_weight: Vec<f32>,
        out_bias: Option<Vec<f32>>,
    ) -> Result<MhaWeights> {
        config.validate()?;
        let (e, kv) = (config.embed_dim, config.kv_width());
        let rows = e + 2 * kv;
        let packed = config.weight_elems()?[4];
        if in_proj_weight.len() != packed {
            return Err(Error::DataLength {
                what: "in_proj_weight",
                dims: vec![rows, e],
                expected: packed,
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
        config.validate()?;
        let file = safetensors::SafeTensors::deserialize(bytes)
            .map_err(|e| Error::Weights(format!("not a safetensors file: {e}")))?;
        let (e, kv) = (config.embed_dim, config.kv_width());
        // PyTorch's shape of each tensor: a weight is [out, in]. A transposed or reshaped
        // tensor of the right size is refused, not read scrambled.
        let shape_of = |name: &str| -> Vec<usize> {
            match name {
                "in_proj_weight" => vec![e + 2 * kv, e],
                "in_proj_bias" => vec![e + 2 * kv],
                "k_proj_weight" => vec![kv, config.kdim],
                "v_proj_weight" => vec![kv, config.vdim],
                "out_proj.bias" => vec![e],
                _ => vec![e, e],
            }
        };
        let read = |name: &str| -> Result<Option<Vec<f32>>> {
            let full = format!("{prefix}{name}");
            let view = match file.tensor(&full) {
                Ok(view) => view,
                Err(safetensors::SafeTensorError::TensorNotFound(_)) => return Ok(None),
                Err(e) => return Err(Error::Weights(format!("{full}: {e}"))),
            };
            let expected = shape_of(name);
            if view.shape() != expected.as_slice() {
                return Err(Error::Weights(format!(
                    "{full} has shape {:?}; this config needs {expected:?} ([out, in], as \
                     PyTorch stores it)",
                    view.shape()
                )));
            }
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

    pub(crate) fn validate(&self, c: &MhaConfig) -> Result<()> {
        c.validate()?;
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
