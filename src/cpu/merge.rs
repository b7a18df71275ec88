//! The CPU merge of partial results over disjoint key sets (see [`crate::gpu::merge`]).

use crate::error::{Error, Result};
use crate::spec::Layout;

/// Merges `(o_a, lse_a)` and `(o_b, lse_b)`, each over a disjoint set of keys, in f64.
///
/// `o_dims` are the dims of each O in `layout`; the log-sum-exps are `[batch, heads, q_len]`,
/// each finite or `-inf` (a row that saw no key: that side weighs nothing, and its O is not
/// read, as on the GPU). Returns the merged O (same layout) and log-sum-exp. A NaN or `+inf`
/// log-sum-exp is [`Error::InvalidOption`].
pub fn merge(
    a: (&[f32], &[f32]),
    b: (&[f32], &[f32]),
    o_dims: [usize; 4],
    layout: Layout,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let (batch, heads, q_len, dv) = layout.split(o_dims);
    let elems = |dims: &[usize]| crate::spec::checked_elements("merge inputs", dims);
    let rows = elems(&[batch, heads, q_len])?;
    let o_elems = elems(&[rows, dv])?;
    for (what, got, expected) in [
        ("first output", a.0.len(), o_elems),
        ("second output", b.0.len(), o_elems),
        ("first log-sum-exp", a.1.len(), rows),
        ("second log-sum-exp", b.1.len(), rows),
    ] {
        if got != expected {
            let width = if expected == rows { 1 } else { dv };
            return Err(Error::DataLength {
                what,
                dims: vec![batch, heads, q_len, width],
                expected,
                got,
            });
        }
    }
    let bad =
        a.1.iter()
            .chain(b.1)
            .find(|x| x.is_nan() || **x == f32::INFINITY);
    if let Some(x) = bad {
        return Err(Error::InvalidOption {
            what: "merge log-sum-exp",
            value: x.to_string(),
            why: "a log-sum-exp is finite, or -inf for a row that saw no key",
        });
    }
    let strides = layout.strides(heads, q_len, dv);
    let mut o = vec![0f32; o_elems];
    let mut lse = vec![f32::NEG_INFINITY; rows];
    for bb in 0..batch {
        for h in 0..heads {
            for i in 0..q_len {
                let row = (bb * heads + h) * q_len + i;
                let (la, lb) = (a.1[row] as f64, b.1[row] as f64);
                let top = la.max(lb);
                if top == f64::NEG_INFINITY {
                    continue;
                }
                let (wa, wb) = ((la - top).exp(), (lb - top).exp());
                let total = wa + wb;
                lse[row] = (top + total.ln()) as f32;
                let base = bb * strides[0] + h * strides[1] + i * strides[2];
                // A side of weight 0 is not read: its O may hold anything (an empty call's).
                let term = |w: f64, x: f32| if w > 0.0 { w * x as f64 } else { 0.0 };
                for n in 0..dv {
                    let x = (term(wa, a.0[base + n]) + term(wb, b.0[base + n])) / total;
                    o[base + n] = x as f32;
                }
            }
        }
    }
    Ok((o, lse))
}
