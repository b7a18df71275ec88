//! The layer's sizes.

use crate::error::{Error, Result};
use crate::spec::Dims;

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

    /// Per-head width (0 when `num_heads` is 0, which [`MultiHeadAttention::new`] refuses).
    ///
    /// [`MultiHeadAttention::new`]: crate::MultiHeadAttention::new
    pub fn head_dim(&self) -> usize {
        self.embed_dim.checked_div(self.num_heads).unwrap_or(0)
    }

    /// Rows of the K and V projection weights: `kv_heads * head_dim` (saturating; a config
    /// whose sizes overflow is refused before any use).
    pub fn kv_width(&self) -> usize {
        self.kv_heads.saturating_mul(self.head_dim())
    }

    /// Elements of `W_q`, `W_k`, `W_v`, `W_o` and of the packed `in_proj_weight`, computed
    /// with checked arithmetic: [`Error::TooLarge`] where one overflows.
    pub(crate) fn weight_elems(&self) -> Result<[usize; 5]> {
        let (e, kv) = (self.embed_dim, self.kv_width());
        let product = |what: &'static str, a: usize, b: usize| {
            a.checked_mul(b).ok_or(Error::TooLarge {
                what,
                requested: u64::MAX,
                max: usize::MAX as u64,
                hint: " elements (the layer's sizes overflow)",
            })
        };
        let rows = kv
            .checked_mul(2)
            .and_then(|x| x.checked_add(e))
            .ok_or(Error::TooLarge {
                what: "in_proj_weight rows",
                requested: u64::MAX,
                max: usize::MAX as u64,
                hint: " (the layer's sizes overflow)",
            })?;
        Ok([
            product("q_weight", e, e)?,
            product("k_weight", kv, self.kdim)?,
            product("v_weight", kv, self.vdim)?,
            product("out_weight", e, e)?,
            product("in_proj_weight", rows, e)?,
        ])
    }

    /// The attention problem of a batch of `q_len` queries over `kv_len` keys: query and kv
    /// heads of this layer, `head_dim` for Q, K and V.
    pub(crate) fn attention_dims(&self, batch: usize, q_len: usize, kv_len: usize) -> Dims {
        let hd = self.head_dim();
        Dims {
            batch,
            heads: self.num_heads,
            kv_heads: self.kv_heads,
            q_len,
            kv_len,
            head_dim: hd,
            v_head_dim: hd,
        }
    }

    pub(crate) fn validate(&self) -> Result<()> {
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
        if self.head_dim() > crate::MAX_V_HEAD_DIM {
            return Err(Error::HeadDimTooLarge {
                what: "head_dim (embed_dim / num_heads)",
                got: self.head_dim(),
                max: crate::MAX_V_HEAD_DIM,
            });
        }
        self.weight_elems()?;
        Ok(())
    }
}
