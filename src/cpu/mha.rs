//! The multi-head layer on the CPU, on the reference path: the oracle of
//! [`MultiHeadAttention::forward`](crate::MultiHeadAttention::forward).

use crate::error::{Error, Result};
use crate::mha::{MhaConfig, MhaWeights};
use crate::spec::{Attention, Layout};

/// The layer on the CPU, on the reference path (f64 projections and attention): the oracle of
/// [`MultiHeadAttention::forward`](crate::MultiHeadAttention::forward). Inputs are `[B, L, E]`, `[B, S, kdim]`, `[B, S, vdim]`
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
    let (e, kv) = (c.embed_dim, c.kv_width());
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
    // Validates the attention problem (zero sizes, sizes whose element counts overflow) before
    // any size below is multiplied out.
    let dims = c.attention_dims(batch, q_len, kv_len);
    let opts = opts.clone().layout(Layout::Bshd);
    opts.validate(dims)?;
    opts.require_host_options()?;
    let elems = |what, dims: [usize; 3]| crate::spec::checked_elements(what, &dims);
    for (what, data, expected) in [
        ("query", query.len(), elems("query", [batch, q_len, e])?),
        ("key", key.len(), elems("key", [batch, kv_len, c.kdim])?),
        (
            "value",
            value.len(),
            elems("value", [batch, kv_len, c.vdim])?,
        ),
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
