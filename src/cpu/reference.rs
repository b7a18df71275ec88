//! The f64 reference: slow, simple and exact enough to judge every other path.

use crate::error::{Error, Result};
use crate::spec::{Attention, Dims, broadcast_strides};

/// Everything the reference computes for one call.
#[derive(Debug, Clone, PartialEq)]
pub struct Reference {
    /// The output, in the layout of the options: `[batch, heads, q_len, v_head_dim]` for `Bhsd`.
    pub o: Vec<f32>,
    /// Natural log-sum-exp of each row's scores, `[batch, heads, q_len]`; `-inf` for a row with
    /// no allowed key.
    pub lse: Vec<f32>,
    /// Attention weights, `[batch, heads, q_len, kv_len]`; zero where a key is not allowed.
    pub weights: Vec<f32>,
}

fn widen<T: Copy + Into<f64>>(x: &[T]) -> Vec<f64> {
    x.iter().map(|&e| e.into()).collect()
}

fn check_len<T>(what: &'static str, data: &[T], dims: [usize; 4]) -> Result<()> {
    let expected: usize = dims.iter().product();
    if data.len() != expected {
        return Err(Error::DataLength {
            what,
            dims: dims.to_vec(),
            expected,
            got: data.len(),
        });
    }
    Ok(())
}

/// Computes attention on the CPU in f64 with the score matrix materialised.
///
/// `q`, `k` and `v` are row-major in the layout of `opts` (see [`Dims::q_shape`] and friends),
/// each `f32`, `half::f16` or `half::bf16` (any type that widens to `f64` exactly): pass
/// half-precision data as it is stored and the reference sees the same rounded values.
/// Validation is the same as on the GPU, so bad input gets the same [`Error`].
///
/// ```
/// use wgpu_attention::{Attention, Causal, Dims, cpu};
/// let dims = Dims::new(1, 2, 3, 4); // batch 1, 2 heads, 3 rows, head_dim 4
/// let x: Vec<f32> = (0..24).map(|i| (i as f32 * 0.37).sin()).collect();
/// let r = cpu::reference(&x, &x, &x, dims, &Attention::new().causal(Causal::TopLeft))?;
/// assert_eq!(r.o.len(), 24);
/// // The first row sees only the first key, so it copies the first value row.
/// assert!((r.o[0] - x[0]).abs() < 1e-6);
/// # Ok::<(), wgpu_attention::Error>(())
/// ```
pub fn reference<Q, K, V>(
    q: &[Q],
    k: &[K],
    v: &[V],
    dims: Dims,
    opts: &Attention,
) -> Result<Reference>
where
    Q: Copy + Into<f64>,
    K: Copy + Into<f64>,
    V: Copy + Into<f64>,
{
    let spec = opts.validate(dims)?;
    opts.require_host_options()?;
    let layout = opts.layout;
    if let Some((packing, [q, k, v], flat)) =
        opts.unpack((&widen(q), &widen(k), &widen(v)), dims)?
    {
        // A packed batch: the same computation padded, O packed again.
        let padded = reference(&q, &k, &v, dims, &flat)?;
        return Ok(Reference {
            o: packing.pack(&padded.o),
            ..padded
        });
    }
    if let Some(pages) = &opts.pages {
        // Paged K/V: the same computation on K and V gathered through the block table.
        let (k, v) = pages.unpage(&widen(k), &widen(v), dims, layout)?;
        let flat = Attention {
            pages: None,
            ..opts.clone()
        };
        return reference(q, &k, &v, dims, &flat);
    }
    check_len("Q", q, dims.q_shape(layout))?;
    check_len("K", k, dims.k_shape(layout))?;
    check_len("V", v, dims.v_shape(layout))?;
    // Every input type (f32, half::f16, half::bf16) widens to f64 exactly.
    let (q, k, v) = (widen(q), widen(k), widen(v));

    let Dims {
        batch,
        heads,
        q_len,
        kv_len,
        head_dim,
        v_head_dim,
        kv_heads,
    } = dims;
    let qs = layout.strides(heads, q_len, head_dim);
    let ks = layout.strides(kv_heads, kv_len, head_dim);
    let vs = layout.strides(kv_heads, kv_len, v_head_dim);
    let os = layout.strides(heads, q_len, v_head_dim);
    let mask = opts
        .mask
        .as_ref()
        .map(|m| (broadcast_strides(m.shape), &m.data));
    let bias = opts
        .bias
        .as_ref()
        .map(|m| (broadcast_strides(m.shape), &m.data));
    let at = |s: [usize; 4], b: usize, h: usize, i: usize, j: usize| {
        b * s[0] + h * s[1] + i * s[2] + j * s[3]
    };
    let scale = spec.scale as f64;
    let cap = opts.softcap.map(|c| c as f64);
    let additive = opts.additive.as_ref().map(|w| widen(w));

    let mut o = vec![0f32; dims.o_elems()];
    let mut lse = vec![f32::NEG_INFINITY; dims.lse_elems()];
    let mut weights = vec![0f32; dims.weights_elems()];
    let mut scores = vec![0f64; kv_len];
    let mut allowed = vec![false; kv_len];
    for b in 0..batch {
        for h in 0..heads {
            let kvh = h / dims.group();
            for i in 0..q_len {
                let (lo, hi) = spec.key_range(b, i);
                let sink_end = spec.sink_end(b, i);
                let alibi = spec.alibi_slope(b, h).map(|slope| slope as f64);
                let diagonal = i as i64 + spec.diagonal_offset(b);
                let q_row = &q[b * qs[0] + h * qs[1] + i * qs[2]..][..head_dim];
                let mut max = f64::NEG_INFINITY;
                for j in 0..kv_len {
                    allowed[j] = ((j >= lo && j < hi) || j < sink_end)
                        && mask.is_none_or(|(s, data)| data[at(s, b, h, i, j)]);
                    if !allowed[j] {
                        continue;
                    }
                    let k_row = &k[b * ks[0] + kvh * ks[1] + j * ks[2]..][..head_dim];
                    let mut s = match &additive {
                        // Bahdanau: sum_d w_d * tanh(q_d + k_d), unscaled.
                        Some(w) => (q_row.iter().zip(k_row).zip(w))
                            .map(|((&a, &c), &wd)| wd * (a + c).tanh())
                            .sum(),
                        None => scale * q_row.iter().zip(k_row).map(|(&a, &c)| a * c).sum::<f64>(),
                    };
                    if let Some(c) = cap {
                        s = c * (s / c).tanh();
                    }
                    if let Some((st, data)) = bias {
                        s += data[at(st, b, h, i, j)] as f64;
                    }
                    if let Some(slope) = alibi {
                        s -= slope * (diagonal - j as i64).unsigned_abs() as f64;
                    }
                    let s = s.max(crate::spec::SCORE_FLOOR as f64);
                    scores[j] = s;
                    max = max.max(s);
                }
                let row = (b * heads + h) * q_len + i;
                // A sink joins the denominator (and the maximum) and attends to nothing.
                let sink = opts.sinks.as_ref().map(|s| s[h] as f64);
                if let Some(sink) = sink {
                    max = max.max(sink);
                }
                if max == f64::NEG_INFINITY {
                    continue; // no allowed key: zeros and lse = -inf
                }
                let sum: f64 = (0..kv_len)
                    .filter(|&j| allowed[j])
                    .map(|j| (scores[j] - max).exp())
                    .sum::<f64>()
                    + sink.map_or(0.0, |s| (s - max).exp());
                lse[row] = (max + sum.ln()) as f32;
                let mut acc = vec![0f64; v_head_dim];
                for j in (0..kv_len).filter(|&j| allowed[j]) {
                    let p = (scores[j] - max).exp() / sum;
                    weights[row * kv_len + j] = p as f32;
                    let v_row = &v[b * vs[0] + kvh * vs[1] + j * vs[2]..][..v_head_dim];
                    for (a, &x) in acc.iter_mut().zip(v_row) {
                        *a += p * x;
                    }
                }
                let o_row = &mut o[b * os[0] + h * os[1] + i * os[2]..][..v_head_dim];
                for (dst, a) in o_row.iter_mut().zip(acc) {
                    *dst = a as f32;
                }
            }
        }
    }
    Ok(Reference { o, lse, weights })
}
