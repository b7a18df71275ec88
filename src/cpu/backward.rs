//! The f64 reference backward: the gradients of a loss by attention's inputs, given the loss's
//! gradient by the output, computed from the materialised weights (the oracle of every
//! backward on a GPU, as [`reference()`](super::reference) is of every forward).
//!
//! For each query row, with `P` the row's weights over its allowed keys, `O = P·V` and `dO`
//! the row's output gradient (FlashAttention-2's notation):
//!
//! - `dV_j += P_j dO`, `dP_j = dO·V_j`, `D = dO·O`, `dS_j = P_j (dP_j - D)`;
//! - the score's chain rule: `dS_j` is the bias's gradient at `[b, h, i, j]` (summed over the
//!   bias's broadcast dimensions), times `1 - tanh²(s/cap)` under a softcap and the score
//!   mod's derivative (`ScoreMod::grad_cpu`) under a score mod; everything is
//!   zero where the score floor clipped the score; ALiBi and the masks are constants;
//! - `dQ_i += scale · dRaw_j K_j`, `dK_j += scale · dRaw_j Q_i` (summed over a GQA group's
//!   query heads), or the additive form's `w_d (1 - tanh²(q_d + k_d))` for both and
//!   `tanh(q_d + k_d)` for its weights;
//! - a learnable sink `t` (which joins the denominator and attends to nothing) gets
//!   `-P_t D`, summed over the rows of its head.
//!
//! A row with no allowed key (and no sink) contributes nothing: zero gradients, never NaN.
//! The unit tests check every option against central finite differences of the forward in f64.

use crate::error::{Error, Result};
use crate::spec::{Attention, Dims};

use super::reference::{Problem, Row, at, check_len, widen};

/// The gradients [`reference_backward`] returns, each in the layout and shape of what it is
/// the gradient of.
#[derive(Debug, Clone, PartialEq)]
pub struct ReferenceGradients {
    /// The gradient by Q, in Q's layout.
    pub dq: Vec<f32>,
    /// The gradient by K, in K's layout (summed over each GQA group's query heads).
    pub dk: Vec<f32>,
    /// The gradient by V, in V's layout (summed over each GQA group's query heads).
    pub dv: Vec<f32>,
    /// The gradient by the additive bias, in the bias's own (broadcast) shape: summed over
    /// each dimension it is broadcast along, as PyTorch gives it. `None` without a bias.
    pub dbias: Option<Vec<f32>>,
    /// The gradient by the learnable sink logits, `[heads]`. `None` without sinks.
    pub dsinks: Option<Vec<f32>>,
    /// The gradient by the additive-attention weights `w`, `[head_dim]`. `None` for
    /// dot-product attention.
    pub dadditive: Option<Vec<f32>>,
}

/// The gradients in f64, before rounding.
pub(super) struct Exact {
    /// The forward's output O, in f64.
    pub(super) o: Vec<f64>,
    pub(super) dq: Vec<f64>,
    pub(super) dk: Vec<f64>,
    pub(super) dv: Vec<f64>,
    pub(super) dbias: Option<Vec<f64>>,
    pub(super) dsinks: Option<Vec<f64>>,
    pub(super) dadditive: Option<Vec<f64>>,
}

fn narrow(x: Vec<f64>) -> Vec<f32> {
    x.into_iter().map(|e| e as f32).collect()
}

/// Computes the gradients of a loss by Q, K, V (and by the bias, the sinks and the additive
/// weights, where the options have them) on the CPU in f64, given `d_o`, the loss's gradient
/// by the output O, in O's layout. The forward is recomputed from Q, K and V; every option of
/// the forward is honoured except paged K/V (an [`Error::InvalidOption`]: gather the pages).
/// A packed batch's gradients are packed as Q, K and V are.
///
/// ```
/// use wgpu_attention::{Attention, Causal, Dims, cpu};
/// let dims = Dims::new(1, 2, 3, 4); // batch 1, 2 heads, 3 rows, head_dim 4
/// let x: Vec<f32> = (0..24).map(|i| (i as f32 * 0.37).sin()).collect();
/// let d_o: Vec<f32> = (0..24).map(|i| (i as f32 * 0.11).cos()).collect();
/// let opts = Attention::new().causal(Causal::TopLeft);
/// let g = cpu::reference_backward(&x, &x, &x, &d_o, dims, &opts)?;
/// assert_eq!((g.dq.len(), g.dk.len(), g.dv.len()), (24, 24, 24));
/// // The first row attends only to the first key, with weight 1: no gradient reaches Q there.
/// assert!(g.dq[..4].iter().all(|e| e.abs() < 1e-6));
/// # Ok::<(), wgpu_attention::Error>(())
/// ```
pub fn reference_backward<Q, K, V, G>(
    q: &[Q],
    k: &[K],
    v: &[V],
    d_o: &[G],
    dims: Dims,
    opts: &Attention,
) -> Result<ReferenceGradients>
where
    Q: Copy + Into<f64>,
    K: Copy + Into<f64>,
    V: Copy + Into<f64>,
    G: Copy + Into<f64>,
{
    let g = exact(q, k, v, d_o, dims, opts)?;
    Ok(ReferenceGradients {
        dq: narrow(g.dq),
        dk: narrow(g.dk),
        dv: narrow(g.dv),
        dbias: g.dbias.map(narrow),
        dsinks: g.dsinks.map(narrow),
        dadditive: g.dadditive.map(narrow),
    })
}

/// What the backward takes: the forward's options less paged K/V.
fn check_backward_options(opts: &Attention) -> Result<()> {
    opts.require_host_options()?;
    if let Some(m) = &opts.score_mod {
        m.require(false, true)?;
    }
    let refuse = |value: &str, why| {
        Err(Error::InvalidOption {
            what: "backward",
            value: value.into(),
            why,
        })
    };
    if opts.pages.is_some() {
        return refuse(
            "paged K/V",
            "the backward takes K and V contiguous: gather the pages first",
        );
    }
    if opts.v_scale() != 1.0 {
        return refuse(
            "kv_scales with a v_scale other than 1",
            "the backward gives gradients by V as stored; scale V in the forward's inputs",
        );
    }
    Ok(())
}

/// A packed batch's backward: the same computation on the sequences padded (with their
/// lengths as `q_lens` and `kv_lens`), O and the gradients by Q, K and V packed again. The
/// bias and its gradient are in padded coordinates, as the forward reads the bias.
fn exact_packed(
    (q, k, v, d_o): (&[f64], &[f64], &[f64], &[f64]),
    dims: Dims,
    opts: &Attention,
) -> Result<Option<Exact>> {
    let (Some((po, [q, k, v], flat)), Some([pq, pk, pv, _])) =
        (opts.unpack((q, k, v), dims)?, opts.packings(dims))
    else {
        return Ok(None);
    };
    let d_o = po.pad("packed dO", d_o)?;
    let padded = exact(&q, &k, &v, &d_o, dims, &flat)?;
    Ok(Some(Exact {
        o: po.pack(&padded.o),
        dq: pq.pack(&padded.dq),
        dk: pk.pack(&padded.dk),
        dv: pv.pack(&padded.dv),
        ..padded
    }))
}

pub(super) fn exact<Q, K, V, G>(
    q: &[Q],
    k: &[K],
    v: &[V],
    d_o: &[G],
    dims: Dims,
    opts: &Attention,
) -> Result<Exact>
where
    Q: Copy + Into<f64>,
    K: Copy + Into<f64>,
    V: Copy + Into<f64>,
    G: Copy + Into<f64>,
{
    let spec = opts.validate(dims)?;
    check_backward_options(opts)?;
    if opts.varlen.is_some() {
        let packed = exact_packed((&widen(q), &widen(k), &widen(v), &widen(d_o)), dims, opts)?;
        if let Some(g) = packed {
            return Ok(g);
        }
    }
    let problem = Problem::new(q, k, v, spec)?;
    check_len("dO", d_o, dims.o_shape(opts.layout))?;
    let d_o = widen(d_o);
    let Dims {
        batch,
        heads,
        q_len,
        kv_len,
        head_dim,
        v_head_dim,
        ..
    } = dims;
    let mut out = vec![0f64; dims.o_elems()];
    let mut dq = vec![0f64; dims.q_elems()];
    let mut dk = vec![0f64; dims.k_elems()];
    let mut dv = vec![0f64; dims.v_elems()];
    let mut dbias = problem.bias.map(|(_, data)| vec![0f64; data.len()]);
    let mut dsinks = opts.sinks.as_ref().map(|_| vec![0f64; heads]);
    let mut dadditive = problem.additive.as_ref().map(|_| vec![0f64; head_dim]);
    let mut row = Row::new(kv_len);
    let mut p = vec![0f64; kv_len];
    let mut z = vec![0f64; kv_len];
    for b in 0..batch {
        for h in 0..heads {
            for i in 0..q_len {
                let Some((max, sum)) = problem.score_row(b, h, i, &mut row) else {
                    continue; // no allowed key: no gradient
                };
                let do_row = &d_o[problem.o_at(b, h, i)..][..v_head_dim];
                let mut o = vec![0f64; v_head_dim];
                for j in (0..kv_len).filter(|&j| row.allowed[j]) {
                    p[j] = (row.scores[j] - max).exp() / sum;
                    z[j] = problem.dropout(b, h, i, j);
                    for (a, &x) in o.iter_mut().zip(problem.v_row(b, h, j)) {
                        *a += p[j] * z[j] * x;
                    }
                }
                let big_d: f64 = do_row.iter().zip(&o).map(|(a, b)| a * b).sum();
                out[problem.o_at(b, h, i)..][..v_head_dim].copy_from_slice(&o);
                if let (Some(ds), Some(t)) = (&mut dsinks, problem.sink(h)) {
                    ds[h] -= (t - max).exp() / sum * big_d;
                }
                let qa = problem.q_at(b, h, i);
                for j in (0..kv_len).filter(|&j| row.allowed[j]) {
                    let va = problem.v_at(b, h, j);
                    let dp: f64 = do_row
                        .iter()
                        .zip(problem.v_row(b, h, j))
                        .map(|(a, b)| a * b)
                        .sum();
                    for (g, &x) in dv[va..][..v_head_dim].iter_mut().zip(do_row) {
                        *g += p[j] * z[j] * x;
                    }
                    // With dropout, O = (P∘Z) V: dP = Z dO·V, and D = dO·O = sum_j P dP still.
                    let ds = p[j] * (dp * z[j] - big_d);
                    if let (Some(db), Some((st, _))) = (&mut dbias, problem.bias)
                        && !row.clipped[j]
                    {
                        db[at(st, b, h, i, j)] += ds;
                    }
                    let raw = ds * row.slope[j];
                    let ka = problem.k_at(b, h, j);
                    match (&problem.additive, &mut dadditive) {
                        (Some(w), Some(dw)) => {
                            for d in 0..head_dim {
                                let t = (problem.q[qa + d] + problem.k[ka + d]).tanh();
                                let g = raw * w[d] * (1.0 - t * t);
                                dq[qa + d] += g;
                                dk[ka + d] += g;
                                dw[d] += raw * t;
                            }
                        }
                        _ => {
                            let g = raw * problem.scale;
                            for d in 0..head_dim {
                                dq[qa + d] += g * problem.k[ka + d];
                                dk[ka + d] += g * problem.q[qa + d];
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(Exact {
        o: out,
        dq,
        dk,
        dv,
        dbias,
        dsinks,
        dadditive,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{Causal, Layout};

    /// A small deterministic generator: the tests need no seed from outside.
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self) -> f64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((self.0 >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        }

        fn vec(&mut self, n: usize, scale: f64) -> Vec<f64> {
            (0..n).map(|_| self.next() * scale).collect()
        }

        fn vec32(&mut self, n: usize, scale: f64) -> Vec<f32> {
            (0..n).map(|_| (self.next() * scale) as f32).collect()
        }
    }

    /// The loss `sum(dO ∘ O)` in f64, the forward recomputed through the same scorer.
    fn loss(q: &[f64], k: &[f64], v: &[f64], d_o: &[f64], dims: Dims, opts: &Attention) -> f64 {
        let problem = Problem::new(q, k, v, opts.validate(dims).unwrap()).unwrap();
        let mut row = Row::new(dims.kv_len);
        let mut total = 0.0;
        for b in 0..dims.batch {
            for h in 0..dims.heads {
                for i in 0..dims.q_len {
                    let Some((max, sum)) = problem.score_row(b, h, i, &mut row) else {
                        continue;
                    };
                    let do_row = &d_o[problem.o_at(b, h, i)..][..dims.v_head_dim];
                    for j in (0..dims.kv_len).filter(|&j| row.allowed[j]) {
                        let p = (row.scores[j] - max).exp() / sum * problem.dropout(b, h, i, j);
                        let dot: f64 = do_row
                            .iter()
                            .zip(problem.v_row(b, h, j))
                            .map(|(a, b)| a * b)
                            .sum();
                        total += p * dot;
                    }
                }
            }
        }
        total
    }

    /// The largest difference between `got` and central differences of `f` over every
    /// element of `x`, relative to the largest gradient (at least 1e-3).
    fn worst_vs_differences(what: &str, x: &[f64], got: &[f64], f: impl Fn(&[f64]) -> f64) -> f64 {
        assert_eq!(x.len(), got.len(), "{what}");
        let eps = 1e-5;
        let mut worst = 0f64;
        let norm = got.iter().fold(1e-3f64, |m, g| m.max(g.abs()));
        let mut y = x.to_vec();
        for n in 0..x.len() {
            y[n] = x[n] + eps;
            let up = f(&y);
            y[n] = x[n] - eps;
            let down = f(&y);
            y[n] = x[n];
            let fd = (up - down) / (2.0 * eps);
            worst = worst.max((fd - got[n]).abs() / norm);
        }
        worst
    }

    /// Checks dQ, dK, dV (and dbias, dsinks, dadditive where present) against central
    /// differences of the loss, within `TOL` relative to each gradient's largest element.
    fn check(dims: Dims, opts: &Attention, seed: u64) {
        const TOL: f64 = 1e-6;
        let mut r = Lcg(seed);
        let q = r.vec(dims.q_elems(), 1.5);
        let k = r.vec(dims.k_elems(), 1.5);
        let v = r.vec(dims.v_elems(), 1.0);
        let d_o = r.vec(dims.o_elems(), 1.0);
        let g = exact(&q, &k, &v, &d_o, dims, opts).unwrap();
        let l = |q: &[f64], k: &[f64], v: &[f64], o: &Attention| loss(q, k, v, &d_o, dims, o);
        let worst = [
            worst_vs_differences("dQ", &q, &g.dq, |x| l(x, &k, &v, opts)),
            worst_vs_differences("dK", &k, &g.dk, |x| l(&q, x, &v, opts)),
            worst_vs_differences("dV", &v, &g.dv, |x| l(&q, &k, x, opts)),
        ];
        for (what, w) in ["dQ", "dK", "dV"].iter().zip(worst) {
            assert!(w < TOL, "{what}: {w:e} off the differences ({opts:?})");
        }
        for x in [&g.dq, &g.dk, &g.dv] {
            assert!(x.iter().all(|e| e.is_finite()));
        }
        // The f32 parameters: the loss at the rounded perturbed values, divided by the step
        // actually taken.
        let f32_check =
            |what: &str, x: &[f32], got: &[f64], with: &dyn Fn(Vec<f32>) -> Attention| {
                let eps = 1e-3f32;
                let norm = got.iter().fold(1e-3f64, |m, g| m.max(g.abs()));
                for n in 0..x.len() {
                    let (mut up, mut down) = (x.to_vec(), x.to_vec());
                    up[n] += eps;
                    down[n] -= eps;
                    let step = up[n] as f64 - down[n] as f64;
                    let fd = (l(&q, &k, &v, &with(up)) - l(&q, &k, &v, &with(down))) / step;
                    let w = (fd - got[n]).abs() / norm;
                    assert!(
                        w < 1e-5,
                        "{what}[{n}]: {w:e} off the differences: {fd} vs {}",
                        got[n]
                    );
                }
            };
        if let (Some(bias), Some(db)) = (&opts.bias, &g.dbias) {
            f32_check("dbias", &bias.data, db, &|data| {
                opts.clone().bias(bias.shape, data)
            });
        }
        if let (Some(sinks), Some(ds)) = (&opts.sinks, &g.dsinks) {
            f32_check("dsinks", sinks, ds, &|s| opts.clone().sinks(s));
        }
        if let (Some(w), Some(dw)) = (&opts.additive, &g.dadditive) {
            f32_check("dadditive", w, dw, &|w| opts.clone().additive(w));
        }
    }

    fn dims(b: usize, h: usize, hkv: usize, l: usize, s: usize, d: usize, dv: usize) -> Dims {
        Dims {
            batch: b,
            heads: h,
            kv_heads: hkv,
            q_len: l,
            kv_len: s,
            head_dim: d,
            v_head_dim: dv,
        }
    }

    /// A score mod that bends scores (its derivative is not 1) and depends on the place, with
    /// a mask mod, under a softcap and a bias: the chain rule through all of them.
    #[test]
    fn score_mod_gradients() {
        let m = crate::ScoreMod::new()
            .mask_wgsl("return (i + j) % 5u != 3u;")
            .mask_cpu(|_, _, i, j| (i + j) % 5 != 3)
            .score_wgsl("return s + 0.3 * sin(s) - 0.1 * f32(h + j);")
            .score_cpu(|s, _, h, _, j| s + 0.3 * s.sin() - 0.1 * (h + j) as f64)
            .grad_wgsl("return 1.0 + 0.3 * cos(s);")
            .grad_cpu(|s, _, _, _, _| 1.0 + 0.3 * s.cos());
        let d = dims(2, 4, 2, 5, 7, 4, 3);
        check(d, &Attention::new().score_mod(m.clone()), 31);
        let bias: Vec<f32> = (0..5 * 7).map(|n| (n as f32 * 0.37).sin()).collect();
        let opts = Attention::new()
            .score_mod(m.clone())
            .softcap(2.0)
            .bias([1, 1, 5, 7], bias)
            .return_bias_grad(true);
        check(d, &opts, 32);
        // The backward needs the derivative's CPU form.
        let mut no_grad = m;
        no_grad.grad_cpu = None;
        let r = exact(
            &[0.5f64; 2 * 4 * 5 * 4],
            &[0.5f64; 2 * 2 * 7 * 4],
            &[0.5f64; 2 * 2 * 7 * 3],
            &[0.5f64; 2 * 4 * 5 * 3],
            d,
            &Attention::new().score_mod(no_grad),
        );
        assert!(
            matches!(
                r,
                Err(Error::InvalidOption {
                    what: "score mod",
                    ..
                })
            ),
            "{:?}",
            r.err()
        );
    }

    #[test]
    fn plain_and_gqa_and_layouts() {
        check(dims(1, 2, 2, 3, 5, 4, 3), &Attention::new(), 1);
        check(dims(2, 4, 2, 3, 7, 5, 6), &Attention::new(), 2);
        check(
            dims(1, 3, 1, 4, 6, 3, 2),
            &Attention::new().layout(Layout::Bshd),
            3,
        );
        check(dims(1, 2, 1, 2, 9, 3, 3), &Attention::new().scale(0.9), 4);
    }

    #[test]
    fn causal_window_lengths() {
        let d = dims(2, 2, 1, 5, 7, 3, 4);
        check(d, &Attention::new().causal(Causal::TopLeft), 10);
        check(d, &Attention::new().causal(Causal::BottomRight), 11);
        check(d, &Attention::new().window(2, 1), 12);
        check(
            d,
            &Attention::new()
                .causal(Causal::BottomRight)
                .kv_lens(vec![7, 3])
                .q_lens(vec![2, 5]),
            13,
        );
        // A row with no allowed key (kv_lens 0) and a window that leaves rows empty.
        check(d, &Attention::new().kv_lens(vec![0, 4]), 14);
        check(
            d,
            &Attention::new().causal(Causal::TopLeft).window(0, 0),
            15,
        );
    }

    #[test]
    fn masks_biases_softcap() {
        let d = dims(2, 2, 2, 3, 6, 4, 3);
        let mut r = Lcg(20);
        let mask: Vec<bool> = (0..2 * 3 * 6).map(|_| r.next() > -0.4).collect();
        check(d, &Attention::new().mask([2, 1, 3, 6], mask.clone()), 21);
        // Biases broadcast along each dimension: their gradients sum over it.
        for shape in [[1, 2, 1, 6], [2, 1, 3, 6], [1, 1, 1, 1], [2, 2, 3, 6]] {
            let n = shape.iter().product();
            let opts = Attention::new().bias(shape, r.vec32(n, 1.0));
            check(d, &opts, 22);
            check(d, &opts.clone().mask([2, 1, 3, 6], mask.clone()), 23);
        }
        check(d, &Attention::new().softcap(0.7), 24);
        check(
            d,
            &Attention::new()
                .softcap(1.3)
                .bias([1, 2, 3, 6], r.vec32(36, 2.0))
                .causal(Causal::BottomRight),
            25,
        );
    }

    #[test]
    fn alibi_sinks_sink_keys_additive() {
        let d = dims(1, 3, 1, 4, 6, 3, 2);
        let mut r = Lcg(30);
        check(d, &Attention::new().alibi(vec![0.5, 0.25, 0.125]), 31);
        check(d, &Attention::new().sinks(r.vec32(3, 1.0)), 32);
        check(
            d,
            &Attention::new()
                .sinks(r.vec32(3, 1.0))
                .causal(Causal::TopLeft)
                .window(1, 0)
                .sink_keys(2),
            33,
        );
        // Every key masked out: the sink takes all the weight and nothing else moves.
        check(
            d,
            &Attention::new().sinks(r.vec32(3, 1.0)).kv_lens(vec![0]),
            34,
        );
        check(d, &Attention::new().additive(r.vec32(3, 1.0)), 35);
        check(
            d,
            &Attention::new()
                .additive(r.vec32(3, 1.0))
                .softcap(0.8)
                .causal(Causal::BottomRight),
            36,
        );
    }

    /// Dropout's pattern is fixed by the seed, so the loss is smooth in the inputs and its
    /// gradient is the dropped weights' (the loss above applies the same pattern).
    #[test]
    fn dropout() {
        let d = dims(2, 4, 2, 5, 9, 3, 4);
        let mut r = Lcg(40);
        check(d, &Attention::new().dropout(0.3, 41), 41);
        check(
            d,
            &Attention::new()
                .dropout(0.6, u64::MAX - 3)
                .causal(Causal::BottomRight)
                .softcap(1.5)
                .bias([1, 4, 5, 9], r.vec32(180, 1.0))
                .sinks(r.vec32(4, 1.0)),
            42,
        );
        // Everything dropped: O is zero, and so is every gradient but the sinks'.
        check(d, &Attention::new().dropout(1.0, 43), 43);
    }

    #[test]
    fn fully_masked_rows_give_zero_gradients() {
        let d = dims(1, 1, 1, 3, 4, 2, 2);
        let mask = vec![false; 12];
        let opts = Attention::new().mask([1, 1, 3, 4], mask);
        let (q, kv) = (vec![0.5f32; 6], vec![0.5f32; 8]);
        let g = reference_backward(&q, &kv, &kv, &[1.0f32; 6], d, &opts).unwrap();
        for v in [&g.dq, &g.dk, &g.dv] {
            assert!(v.iter().all(|&e| e == 0.0), "{v:?}");
        }
    }

    /// A bias of `f32::MIN` clips its scores to the floor: no gradient reaches them (the
    /// loss does not move with the bias there), and a row clipped whole averages V evenly.
    #[test]
    fn clipped_scores_have_no_gradient() {
        let d = dims(1, 1, 1, 2, 3, 4, 2);
        let mut r = Lcg(40);
        let (q, k, v) = (r.vec(8, 1.0), r.vec(12, 1.0), r.vec(6, 1.0));
        let d_o = r.vec(4, 1.0);
        let mut bias = vec![f32::MIN; 6];
        bias[3..].copy_from_slice(&r.vec32(3, 1.0));
        let opts = Attention::new().bias([1, 1, 2, 3], bias.clone());
        let g = exact(&q, &k, &v, &d_o, d, &opts).unwrap();
        let db = g.dbias.unwrap();
        assert!(db[..3].iter().all(|&x| x == 0.0), "{db:?}");
        assert!(db[3..].iter().any(|&x| x != 0.0), "{db:?}");
        // Row 0 weighs its three keys 1/3 each: dV_j gets dO_0 / 3 from it.
        let mut only_row0 = d_o.clone();
        only_row0[2..].fill(0.0);
        let g0 = exact(&q, &k, &v, &only_row0, d, &opts).unwrap();
        for dv_row in g0.dv[..6].chunks(2) {
            for (g, x) in dv_row.iter().zip(&d_o) {
                assert!((g - x / 3.0).abs() < 1e-12, "{:?}", g0.dv);
            }
        }
        // Moving a clipped bias (to f32::MIN / 2, still clipped) leaves the loss alone.
        let mut moved = bias.clone();
        moved[0] = f32::MIN / 2.0;
        let l = |b: Vec<f32>| loss(&q, &k, &v, &d_o, d, &opts.clone().bias([1, 1, 2, 3], b));
        assert_eq!(l(bias), l(moved));
    }

    /// A packed batch's gradients are each sequence's alone (Bshd: a sequence's rows are a
    /// contiguous run of the packed ones), with GQA and bottom-right causal alignment per
    /// sequence.
    #[test]
    fn packed_batches_are_each_sequence_alone() {
        let (cq, ck) = (vec![0u32, 3, 5], vec![0u32, 5, 9]);
        let (h, hkv, dd, dv) = (4, 2, 5, 3);
        let d = dims(2, h, hkv, 3, 5, dd, dv);
        let opts = Attention::new()
            .layout(Layout::Bshd)
            .causal(Causal::BottomRight)
            .softcap(3.0);
        let mut r = Lcg(41);
        let q = r.vec32(5 * h * dd, 1.0);
        let k = r.vec32(9 * hkv * dd, 1.0);
        let v = r.vec32(9 * hkv * dv, 1.0);
        let d_o = r.vec32(5 * h * dv, 1.0);
        let packed = opts.clone().varlen(cq.clone(), ck.clone());
        let g = reference_backward(&q, &k, &v, &d_o, d, &packed).unwrap();
        for s in 0..2 {
            let (q0, q1) = (cq[s] as usize, cq[s + 1] as usize);
            let (k0, k1) = (ck[s] as usize, ck[s + 1] as usize);
            let one = dims(1, h, hkv, q1 - q0, k1 - k0, dd, dv);
            let rows = |x: &[f32], r0: usize, r1: usize, w: usize| x[r0 * w..r1 * w].to_vec();
            let alone = reference_backward(
                &rows(&q, q0, q1, h * dd),
                &rows(&k, k0, k1, hkv * dd),
                &rows(&v, k0, k1, hkv * dv),
                &rows(&d_o, q0, q1, h * dv),
                one,
                &opts,
            )
            .unwrap();
            assert_eq!(rows(&g.dq, q0, q1, h * dd), alone.dq, "dQ of sequence {s}");
            assert_eq!(
                rows(&g.dk, k0, k1, hkv * dd),
                alone.dk,
                "dK of sequence {s}"
            );
            assert_eq!(
                rows(&g.dv, k0, k1, hkv * dv),
                alone.dv,
                "dV of sequence {s}"
            );
        }
    }

    #[test]
    fn bad_input_is_a_typed_error() {
        let d = dims(1, 2, 2, 3, 5, 4, 3);
        let q = vec![0.1f32; d.q_elems()];
        let k = vec![0.2f32; d.k_elems()];
        let v = vec![0.3f32; d.v_elems()];
        let short = vec![1.0f32; d.o_elems() - 1];
        let e = reference_backward(&q, &k, &v, &short, d, &Attention::new()).unwrap_err();
        assert!(matches!(e, Error::DataLength { what: "dO", .. }), "{e}");
        let d_o = vec![1.0f32; d.o_elems()];
        let packed = Attention::new().varlen(vec![0, 3], vec![0, 5]);
        let e = reference_backward(&q, &k, &v, &short, d, &packed).unwrap_err();
        assert!(
            matches!(
                e,
                Error::DataLength {
                    what: "packed dO",
                    ..
                }
            ),
            "{e}"
        );
        let e = reference_backward(&q, &k, &v[1..], &d_o, d, &Attention::new()).unwrap_err();
        assert!(matches!(e, Error::DataLength { what: "V", .. }), "{e}");
    }
}
