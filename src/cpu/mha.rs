//! The multi-head layer on the CPU, on the reference path: the oracle of
//! [`MultiHeadAttention::forward`](crate::MultiHeadAttention::forward).

use crate::error::{Error, Result};
use crate::mha::{MhaConfig, MhaWeights};
use crate::spec::{Attention, Dims, Layout};

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
    let (dims, opts) = check_layer(
        config,
        weights,
        (query, key, value),
        (batch, q_len, kv_len),
        opts,
    )?;
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

/// The layer's checks, shared by the forward and the backward reference: the config, the
/// weights, the attention problem (zero sizes, element counts that overflow) and the inputs'
/// lengths; returns the attention's dims and its options in the layer's `Bshd` layout.
fn check_layer(
    config: &MhaConfig,
    weights: &MhaWeights,
    (query, key, value): (&[f32], &[f32], &[f32]),
    (batch, q_len, kv_len): (usize, usize, usize),
    opts: &Attention,
) -> Result<(Dims, Attention)> {
    config.validate()?;
    weights.validate(config)?;
    let c = config;
    let e = c.embed_dim;
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
    Ok((dims, opts))
}

/// The gradients [`mha_reference_backward`] returns: by the layer's three inputs (for
/// self-attention, where one tensor feeds all three, the gradient by it is their sum) and by
/// every weight and bias, each in the shape of what it is the gradient of.
#[derive(Debug, Clone, PartialEq)]
pub struct MhaReferenceGradients {
    /// By the query input, `[B, L, E]`.
    pub query: Vec<f32>,
    /// By the key input, `[B, S, kdim]`.
    pub key: Vec<f32>,
    /// By the value input, `[B, S, vdim]`.
    pub value: Vec<f32>,
    /// By the weights and biases, laid out as [`MhaWeights`]; a bias the layer lacks has none.
    pub weights: MhaWeights,
}

/// `y = x·Wᵀ + b` in f64: `x` is `[rows, k]`, `w` is `[n, k]`.
fn linear64(
    x: &[f64],
    rows: usize,
    w: &[f32],
    b: &Option<Vec<f32>>,
    n: usize,
    k: usize,
) -> Vec<f64> {
    let mut y = vec![0f64; rows * n];
    for r in 0..rows {
        for o in 0..n {
            let mut acc = b.as_ref().map_or(0.0, |b| b[o] as f64);
            for i in 0..k {
                acc += x[r * k + i] * w[o * k + i] as f64;
            }
            y[r * n + o] = acc;
        }
    }
    y
}

/// The backward of `y = x·Wᵀ + b` given `dy` (`[rows, n]`): `dx = dy·W`, `dW = dyᵀ·x`,
/// `db = Σ_rows dy` (when the layer has the bias).
#[allow(clippy::type_complexity)]
fn linear64_backward(
    x: &[f64],
    dy: &[f64],
    w: &[f32],
    has_bias: bool,
    (rows, n, k): (usize, usize, usize),
) -> (Vec<f64>, Vec<f64>, Option<Vec<f64>>) {
    let mut dx = vec![0f64; rows * k];
    let mut dw = vec![0f64; n * k];
    let mut db = has_bias.then(|| vec![0f64; n]);
    for r in 0..rows {
        for o in 0..n {
            let g = dy[r * n + o];
            for i in 0..k {
                dx[r * k + i] += g * w[o * k + i] as f64;
                dw[o * k + i] += g * x[r * k + i];
            }
            if let Some(db) = &mut db {
                db[o] += g;
            }
        }
    }
    (dx, dw, db)
}

fn widen32(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&e| e as f64).collect()
}

fn narrow64(x: Vec<f64>) -> Vec<f32> {
    x.into_iter().map(|e| e as f32).collect()
}

/// The layer's forward in f64 throughout (the output), with the attention's gradients when `d_out` is given.
struct Layer64 {
    #[cfg_attr(not(test), allow(dead_code))] // the tests' loss
    out: Vec<f64>,
    grads: Option<(Vec<f64>, super::backward::Exact)>,
}

#[allow(clippy::too_many_arguments)] // the forward's arguments and d_out
fn layer64(
    config: &MhaConfig,
    weights: &MhaWeights,
    (query, key, value): (&[f64], &[f64], &[f64]),
    (batch, q_len, kv_len): (usize, usize, usize),
    dims: Dims,
    opts: &Attention,
    d_out: Option<&[f64]>,
) -> Result<Layer64> {
    let (e, kv, w) = (config.embed_dim, config.kv_width(), weights);
    let q = linear64(query, batch * q_len, &w.q_weight, &w.q_bias, e, e);
    let k = linear64(key, batch * kv_len, &w.k_weight, &w.k_bias, kv, config.kdim);
    let v = linear64(
        value,
        batch * kv_len,
        &w.v_weight,
        &w.v_bias,
        kv,
        config.vdim,
    );
    let rows = batch * q_len;
    // dO of the attention: d_out·W_o; without d_out, any dO gives the forward's O.
    let d_o = match d_out {
        Some(d_out) => {
            let o_weight = &w.out_weight;
            let mut d_o = vec![0f64; rows * e];
            for r in 0..rows {
                for o in 0..e {
                    for i in 0..e {
                        d_o[r * e + i] += d_out[r * e + o] * o_weight[o * e + i] as f64;
                    }
                }
            }
            d_o
        }
        None => vec![0f64; rows * e],
    };
    let g = super::backward::exact(&q, &k, &v, &d_o, dims, opts)?;
    let out = linear64(&g.o, rows, &w.out_weight, &w.out_bias, e, e);
    Ok(Layer64 {
        out,
        grads: d_out.map(|_| (d_o, g)),
    })
}

/// The layer's backward on the CPU, in f64 throughout: the gradients of a loss by the layer's
/// inputs, weights and biases, given `d_out`, the loss's gradient by the layer's output
/// (`[B, L, E]`). The arguments are those of [`mha_reference`]; every attention option of
/// [`reference_backward`](super::reference_backward) is honoured. The oracle of the layer's
/// backward on a GPU.
///
/// ```
/// use wgpu_attention::{Attention, MhaConfig, MhaWeights, cpu};
/// let config = MhaConfig::new(4, 2); // E = 4, 2 heads of width 2
/// let w = |n: usize, s: f32| (0..n).map(|i| (i as f32 * s).sin()).collect::<Vec<f32>>();
/// let weights = MhaWeights::new(w(16, 0.3), w(16, 0.5), w(16, 0.7), w(16, 0.9));
/// let x = w(3 * 4, 0.2); // batch 1, 3 tokens
/// let d_out = w(3 * 4, 0.4);
/// let g = cpu::mha_reference_backward(&config, &weights, &x, &x, &x, (1, 3, 3),
///     &Attention::new(), &d_out)?;
/// assert_eq!((g.query.len(), g.weights.q_weight.len()), (12, 16));
/// # Ok::<(), wgpu_attention::Error>(())
/// ```
#[allow(clippy::too_many_arguments)] // mirrors mha_reference(), with d_out
pub fn mha_reference_backward(
    config: &MhaConfig,
    weights: &MhaWeights,
    query: &[f32],
    key: &[f32],
    value: &[f32],
    sizes: (usize, usize, usize),
    opts: &Attention,
    d_out: &[f32],
) -> Result<MhaReferenceGradients> {
    let (dims, opts) = check_layer(config, weights, (query, key, value), sizes, opts)?;
    let (batch, q_len, kv_len) = sizes;
    let (e, kv) = (config.embed_dim, config.kv_width());
    let rows = batch * q_len;
    if d_out.len() != rows * e {
        return Err(Error::DataLength {
            what: "d_out",
            dims: vec![batch, q_len, e],
            expected: rows * e,
            got: d_out.len(),
        });
    }
    let (query, key, value) = (widen32(query), widen32(key), widen32(value));
    let d_out = widen32(d_out);
    let layer = layer64(
        config,
        weights,
        (&query, &key, &value),
        sizes,
        dims,
        &opts,
        Some(&d_out),
    )?;
    let Some((_, g)) = layer.grads else {
        unreachable!("layer64 returns gradients when given d_out")
    };
    let w = weights;
    let (_, d_wo, d_bo) = linear64_backward(
        &g.o,
        &d_out,
        &w.out_weight,
        w.out_bias.is_some(),
        (rows, e, e),
    );
    let (d_query, d_wq, d_bq) =
        linear64_backward(&query, &g.dq, &w.q_weight, w.q_bias.is_some(), (rows, e, e));
    let kv_rows = batch * kv_len;
    let (d_key, d_wk, d_bk) = linear64_backward(
        &key,
        &g.dk,
        &w.k_weight,
        w.k_bias.is_some(),
        (kv_rows, kv, config.kdim),
    );
    let (d_value, d_wv, d_bv) = linear64_backward(
        &value,
        &g.dv,
        &w.v_weight,
        w.v_bias.is_some(),
        (kv_rows, kv, config.vdim),
    );
    Ok(MhaReferenceGradients {
        query: narrow64(d_query),
        key: narrow64(d_key),
        value: narrow64(d_value),
        weights: MhaWeights {
            q_weight: narrow64(d_wq),
            k_weight: narrow64(d_wk),
            v_weight: narrow64(d_wv),
            out_weight: narrow64(d_wo),
            q_bias: d_bq.map(narrow64),
            k_bias: d_bk.map(narrow64),
            v_bias: d_bv.map(narrow64),
            out_bias: d_bo.map(narrow64),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Causal;

    /// One weight or bias of the layer: its name, its value, its gradient, how to reach it.
    type Param<'a, T> = (&'static str, &'a T, &'a T, fn(&mut MhaWeights) -> &mut T);

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9e3779b97f4a7c15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32
            })
            .collect()
    }

    /// Every gradient of the layer against central differences of `sum(d_out ∘ out)`, the
    /// forward in f64, within 1e-5 of each gradient's largest element.
    fn check(config: MhaConfig, biases: bool, sizes: (usize, usize, usize), opts: &Attention) {
        let (b, l, s) = sizes;
        let (e, kv) = (config.embed_dim, config.kv_width());
        let mut weights = MhaWeights::new(
            values(e * e, 1),
            values(kv * config.kdim, 2),
            values(kv * config.vdim, 3),
            values(e * e, 4),
        );
        if biases {
            weights.q_bias = Some(values(e, 5));
            weights.k_bias = Some(values(kv, 6));
            weights.v_bias = Some(values(kv, 7));
            weights.out_bias = Some(values(e, 8));
        }
        let query = values(b * l * e, 9);
        let key = values(b * s * config.kdim, 10);
        let value = values(b * s * config.vdim, 11);
        let d_out = values(b * l * e, 12);
        let g =
            mha_reference_backward(&config, &weights, &query, &key, &value, sizes, opts, &d_out)
                .unwrap();
        let (dims, opts) =
            check_layer(&config, &weights, (&query, &key, &value), sizes, opts).unwrap();
        let d_out64 = widen32(&d_out);
        let loss = |w: &MhaWeights, x: [&[f32]; 3]| {
            let x = x.map(widen32);
            let out = layer64(&config, w, (&x[0], &x[1], &x[2]), sizes, dims, &opts, None)
                .unwrap()
                .out;
            out.iter().zip(&d_out64).map(|(a, b)| a * b).sum::<f64>()
        };
        // Perturbs element n of one f32 array by about ±1e-3 (`eval` returns the loss and the
        // step actually taken, after rounding to f32) and compares the central difference.
        let differences =
            |what: &str, got: &[f32], len: usize, eval: &dyn Fn(usize, f32) -> (f64, f64)| {
                assert_eq!(got.len(), len, "{what}");
                let norm = got.iter().fold(1e-3f64, |m, g| m.max(g.abs() as f64));
                for (n, &got) in got.iter().enumerate() {
                    let ((up, su), (down, sd)) = (eval(n, 1e-3), eval(n, -1e-3));
                    let fd = (up - down) / (su - sd);
                    let w = (fd - got as f64).abs() / norm;
                    assert!(w < 1e-5, "{what}[{n}]: {fd} by differences, {got} ({w:e})");
                }
            };
        let nudged = |x: &[f32], n: usize, eps: f32| {
            let mut y = x.to_vec();
            y[n] += eps;
            (y[n] as f64 - x[n] as f64, y)
        };
        let inputs = [&query, &key, &value];
        for (which, what) in ["query", "key", "value"].iter().enumerate() {
            let x = inputs[which];
            let got = [&g.query, &g.key, &g.value][which];
            differences(what, got, x.len(), &|n, eps| {
                let mut xs = inputs.map(|v| v.to_vec());
                let (step, y) = nudged(x, n, eps);
                xs[which] = y;
                (loss(&weights, [&xs[0], &xs[1], &xs[2]]), step)
            });
        }
        let gw = &g.weights;
        let weight_sets: [Param<Vec<f32>>; 4] = [
            ("q_weight", &weights.q_weight, &gw.q_weight, |w| {
                &mut w.q_weight
            }),
            ("k_weight", &weights.k_weight, &gw.k_weight, |w| {
                &mut w.k_weight
            }),
            ("v_weight", &weights.v_weight, &gw.v_weight, |w| {
                &mut w.v_weight
            }),
            ("out_weight", &weights.out_weight, &gw.out_weight, |w| {
                &mut w.out_weight
            }),
        ];
        for (what, x, got, field) in weight_sets {
            differences(what, got, x.len(), &|n, eps| {
                let mut w = weights.clone();
                let (step, y) = nudged(x, n, eps);
                *field(&mut w) = y;
                (loss(&w, inputs.map(|v| &v[..])), step)
            });
        }
        let bias_sets: [Param<Option<Vec<f32>>>; 4] = [
            ("q_bias", &weights.q_bias, &gw.q_bias, |w| &mut w.q_bias),
            ("k_bias", &weights.k_bias, &gw.k_bias, |w| &mut w.k_bias),
            ("v_bias", &weights.v_bias, &gw.v_bias, |w| &mut w.v_bias),
            ("out_bias", &weights.out_bias, &gw.out_bias, |w| {
                &mut w.out_bias
            }),
        ];
        for (what, x, got, field) in bias_sets {
            assert_eq!(x.is_some(), got.is_some(), "{what}");
            let (Some(x), Some(got)) = (x, got) else {
                continue;
            };
            differences(what, got, x.len(), &|n, eps| {
                let mut w = weights.clone();
                let (step, y) = nudged(x, n, eps);
                *field(&mut w) = Some(y);
                (loss(&w, inputs.map(|v| &v[..])), step)
            });
        }
    }

    #[test]
    fn layer_gradients_match_differences() {
        check(MhaConfig::new(6, 2), true, (2, 3, 3), &Attention::new());
        check(
            MhaConfig::new(4, 2),
            false,
            (1, 4, 4),
            &Attention::new().causal(Causal::TopLeft),
        );
        let cross = MhaConfig {
            embed_dim: 8,
            num_heads: 4,
            kv_heads: 2,
            kdim: 3,
            vdim: 5,
        };
        check(
            cross,
            true,
            (2, 3, 5),
            &Attention::new().causal(Causal::BottomRight).softcap(2.0),
        );
    }

    #[test]
    fn bad_d_out_is_a_typed_error() {
        let config = MhaConfig::new(4, 2);
        let w = MhaWeights::new(values(16, 1), values(16, 2), values(16, 3), values(16, 4));
        let x = values(12, 5);
        let e = mha_reference_backward(
            &config,
            &w,
            &x,
            &x,
            &x,
            (1, 3, 3),
            &Attention::new(),
            &x[1..],
        )
        .unwrap_err();
        assert!(matches!(e, Error::DataLength { what: "d_out", .. }), "{e}");
    }
}
