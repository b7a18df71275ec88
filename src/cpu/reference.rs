//! The f64 reference: slow, simple and exact enough to judge every other path.

use crate::error::{Error, Result};
use crate::spec::{Attention, Dims, Spec, broadcast_strides};

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

pub(super) fn widen<T: Copy + Into<f64>>(x: &[T]) -> Vec<f64> {
    x.iter().map(|&e| e.into()).collect()
}

pub(super) fn check_len<T>(what: &'static str, data: &[T], dims: [usize; 4]) -> Result<()> {
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
    let problem = Problem::new(q, k, v, spec)?;
    let Dims {
        batch,
        heads,
        q_len,
        kv_len,
        v_head_dim,
        ..
    } = dims;
    let mut o = vec![0f32; dims.o_elems()];
    let mut lse = vec![f32::NEG_INFINITY; dims.lse_elems()];
    let mut weights = vec![0f32; dims.weights_elems()];
    let mut row = Row::new(kv_len);
    for b in 0..batch {
        for h in 0..heads {
            for i in 0..q_len {
                let Some((max, sum)) = problem.score_row(b, h, i, &mut row) else {
                    continue; // no allowed key: zeros and lse = -inf
                };
                let r = (b * heads + h) * q_len + i;
                lse[r] = (max + sum.ln()) as f32;
                let mut acc = vec![0f64; v_head_dim];
                for j in (0..kv_len).filter(|&j| row.allowed[j]) {
                    let p = (row.scores[j] - max).exp() / sum * problem.dropout(b, h, i, j);
                    weights[r * kv_len + j] = p as f32;
                    for (a, &x) in acc.iter_mut().zip(problem.v_row(b, h, j)) {
                        *a += p * x;
                    }
                }
                let o_row = &mut o[problem.o_at(b, h, i)..][..v_head_dim];
                for (dst, a) in o_row.iter_mut().zip(acc) {
                    *dst = a as f32;
                }
            }
        }
    }
    Ok(Reference { o, lse, weights })
}

/// The scores of one query row, and (for the backward) the derivative of each final score by
/// the raw score it came from (`q·k·scale`, or the additive sum): the softcap's `1 - tanh²`,
/// zero where the score floor clipped it; and whether the floor clipped it (then no input of
/// the score, the bias included, moves it).
pub(super) struct Row {
    pub(super) scores: Vec<f64>,
    pub(super) allowed: Vec<bool>,
    pub(super) slope: Vec<f64>,
    pub(super) clipped: Vec<bool>,
}

impl Row {
    pub(super) fn new(kv_len: usize) -> Row {
        Row {
            scores: vec![0.0; kv_len],
            allowed: vec![false; kv_len],
            slope: vec![0.0; kv_len],
            clipped: vec![false; kv_len],
        }
    }
}

/// One validated call with its inputs widened to f64: what scoring a row needs, shared by the
/// forward reference and the backward one.
pub(super) struct Problem<'a> {
    pub(super) spec: Spec<'a>,
    pub(super) q: Vec<f64>,
    pub(super) k: Vec<f64>,
    pub(super) v: Vec<f64>,
    pub(super) qs: [usize; 3],
    pub(super) ks: [usize; 3],
    pub(super) vs: [usize; 3],
    pub(super) os: [usize; 3],
    mask: Option<([usize; 4], &'a [bool])>,
    /// The bias's broadcast strides: 0 along a broadcast dimension.
    pub(super) bias: Option<([usize; 4], &'a [f32])>,
    pub(super) scale: f64,
    cap: Option<f64>,
    pub(super) additive: Option<Vec<f64>>,
}

/// Index of element `[b, h, i, j]` of a broadcast tensor with strides `s`.
pub(super) fn at(s: [usize; 4], b: usize, h: usize, i: usize, j: usize) -> usize {
    b * s[0] + h * s[1] + i * s[2] + j * s[3]
}

impl<'a> Problem<'a> {
    /// Checks the lengths of `q`, `k` and `v` (plain, neither packed nor paged) and widens them.
    pub(super) fn new<Q, K, V>(q: &[Q], k: &[K], v: &[V], spec: Spec<'a>) -> Result<Problem<'a>>
    where
        Q: Copy + Into<f64>,
        K: Copy + Into<f64>,
        V: Copy + Into<f64>,
    {
        let (dims, opts) = (spec.dims, spec.opts);
        let layout = opts.layout;
        check_len("Q", q, dims.q_shape(layout))?;
        check_len("K", k, dims.k_shape(layout))?;
        check_len("V", v, dims.v_shape(layout))?;
        let Dims {
            heads,
            q_len,
            kv_len,
            head_dim,
            v_head_dim,
            kv_heads,
            ..
        } = dims;
        Ok(Problem {
            spec,
            // Every input type (f32, half::f16, half::bf16) widens to f64 exactly.
            q: widen(q),
            k: widen(k),
            // V as attended to: times its scale (exact in f64 up to one rounding).
            v: widen(v)
                .into_iter()
                .map(|x| x * opts.v_scale() as f64)
                .collect(),
            qs: layout.strides(heads, q_len, head_dim),
            ks: layout.strides(kv_heads, kv_len, head_dim),
            vs: layout.strides(kv_heads, kv_len, v_head_dim),
            os: layout.strides(heads, q_len, v_head_dim),
            mask: opts
                .mask
                .as_ref()
                .map(|m| (broadcast_strides(m.shape), &m.data[..])),
            bias: opts
                .bias
                .as_ref()
                .map(|m| (broadcast_strides(m.shape), &m.data[..])),
            scale: spec.scale as f64,
            cap: opts.softcap.map(|c| c as f64),
            additive: opts.additive.as_ref().map(|w| widen(w)),
        })
    }

    /// Where row `i` of query head `h` starts in Q (and in dQ).
    pub(super) fn q_at(&self, b: usize, h: usize, i: usize) -> usize {
        b * self.qs[0] + h * self.qs[1] + i * self.qs[2]
    }

    /// Where key `j` of query head `h`'s kv head starts in K (and in dK).
    pub(super) fn k_at(&self, b: usize, h: usize, j: usize) -> usize {
        b * self.ks[0] + (h / self.spec.dims.group()) * self.ks[1] + j * self.ks[2]
    }

    /// Where value `j` of query head `h`'s kv head starts in V (and in dV).
    pub(super) fn v_at(&self, b: usize, h: usize, j: usize) -> usize {
        b * self.vs[0] + (h / self.spec.dims.group()) * self.vs[1] + j * self.vs[2]
    }

    /// Where row `i` of head `h` starts in O (and in dO).
    pub(super) fn o_at(&self, b: usize, h: usize, i: usize) -> usize {
        b * self.os[0] + h * self.os[1] + i * self.os[2]
    }

    pub(super) fn v_row(&self, b: usize, h: usize, j: usize) -> &[f64] {
        &self.v[self.v_at(b, h, j)..][..self.spec.dims.v_head_dim]
    }

    /// Scores row `i` of head `h` into `row`; returns the row's maximum and its sum of
    /// `exp(score - max)`, the sink included, or `None` when the row has no allowed key and
    /// no sink.
    pub(super) fn score_row(
        &self,
        b: usize,
        h: usize,
        i: usize,
        row: &mut Row,
    ) -> Option<(f64, f64)> {
        let spec = &self.spec;
        let (head_dim, kv_len) = (spec.dims.head_dim, spec.dims.kv_len);
        let (lo, hi) = spec.key_range(b, i);
        let sink_end = spec.sink_end(b, i);
        let alibi = spec.alibi_slope(b, h).map(|slope| slope as f64);
        let diagonal = i as i64 + spec.diagonal_offset(b);
        let q_row = &self.q[self.q_at(b, h, i)..][..head_dim];
        let mods = spec.opts.score_mod.as_ref();
        let mut max = f64::NEG_INFINITY;
        for j in 0..kv_len {
            row.allowed[j] = ((j >= lo && j < hi) || j < sink_end)
                && self.mask.is_none_or(|(s, data)| data[at(s, b, h, i, j)])
                && mods.is_none_or(|m| m.keeps(b, h, i, j));
            if !row.allowed[j] {
                continue;
            }
            let k_row = &self.k[self.k_at(b, h, j)..][..head_dim];
            let mut s = match &self.additive {
                // Bahdanau: sum_d w_d * tanh(q_d + k_d), unscaled.
                Some(w) => (q_row.iter().zip(k_row).zip(w))
                    .map(|((&a, &c), &wd)| wd * (a + c).tanh())
                    .sum(),
                None => self.scale * q_row.iter().zip(k_row).map(|(&a, &c)| a * c).sum::<f64>(),
            };
            let mut slope = 1.0;
            if let Some(c) = self.cap {
                let t = (s / c).tanh();
                s = c * t;
                slope = 1.0 - t * t;
            }
            if let Some(m) = mods {
                let (y, dy) = m.apply(s, b, h, i, j);
                s = y;
                slope *= dy;
            }
            if let Some((st, data)) = self.bias {
                s += data[at(st, b, h, i, j)] as f64;
            }
            if let Some(slope) = alibi {
                s -= slope * (diagonal - j as i64).unsigned_abs() as f64;
            }
            let floor = crate::spec::SCORE_FLOOR as f64;
            row.clipped[j] = s < floor;
            if row.clipped[j] {
                slope = 0.0;
            }
            let s = s.max(floor);
            row.scores[j] = s;
            row.slope[j] = slope;
            max = max.max(s);
        }
        // A sink joins the denominator (and the maximum) and attends to nothing.
        let sink = self.sink(h);
        if let Some(sink) = sink {
            max = max.max(sink);
        }
        if max == f64::NEG_INFINITY {
            return None;
        }
        let sum: f64 = (0..kv_len)
            .filter(|&j| row.allowed[j])
            .map(|j| (row.scores[j] - max).exp())
            .sum::<f64>()
            + sink.map_or(0.0, |s| (s - max).exp());
        Some((max, sum))
    }

    /// The factor dropout puts on the weight of `(b, h, i, j)`: 0 where it drops it,
    /// `1 / (1 - p)` where it keeps it, 1 without dropout.
    pub(super) fn dropout(&self, b: usize, h: usize, i: usize, j: usize) -> f64 {
        match self.spec.opts.active_dropout() {
            // keeps is false for every weight at p = 1.
            Some(d) if d.keeps(self.spec.dims, b, h, i, j) => 1.0 / (1.0 - d.p as f64),
            Some(_) => 0.0,
            None => 1.0,
        }
    }

    /// Head `h`'s learnable sink logit, if the call has sinks.
    pub(super) fn sink(&self, h: usize) -> Option<f64> {
        self.spec.opts.sinks.as_ref().map(|s| s[h] as f64)
    }
}
