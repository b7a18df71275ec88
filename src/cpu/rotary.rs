//! Rotary position embedding on the host, in f64 ([`crate::rotary`]).

use crate::error::{Error, Result};
use crate::rotary::{Positions, Rotary};
use crate::spec::Layout;

/// `x` (`dims` in `layout`) with each row turned by its position, computed in f64 and rounded
/// to f32: the oracle of [`gpu::rotate`](crate::gpu::rotate), and RoPE for a host program.
/// See [`crate::rotary`] for what it computes.
pub fn rotate(
    x: &[f32],
    dims: [usize; 4],
    layout: Layout,
    rotary: &Rotary,
    positions: &Positions,
) -> Result<Vec<f32>> {
    let (batch, heads, seq, head_dim) = rotary.check(dims, layout, positions)?;
    let expected = dims.iter().product::<usize>();
    if x.len() != expected {
        return Err(Error::DataLength {
            what: "rotated tensor",
            dims: dims.to_vec(),
            expected,
            got: x.len(),
        });
    }
    let [sb, sh, ss] = layout.strides(heads, seq, head_dim);
    let mut y = x.to_vec();
    let mut turns = vec![(1.0, 0.0); rotary.dim() / 2];
    for b in 0..batch {
        for i in 0..seq {
            let position = match positions {
                Positions::Start(s) => s[b] as u64 + i as u64,
                Positions::Each(e) => e[b * seq + i] as u64,
            };
            // Every head of the row turns by the same angles.
            for (k, turn) in turns.iter_mut().enumerate() {
                *turn = rotary.turn(position, k);
            }
            for h in 0..heads {
                let row = b * sb + h * sh + i * ss;
                for d in 0..rotary.dim() {
                    let (k, partner, first) = rotary.pair_of(d);
                    let (cos, sin) = turns[k];
                    let (me, other) = (x[row + d] as f64, x[row + partner] as f64);
                    y[row + d] = if first {
                        me * cos - other * sin
                    } else {
                        other * sin + me * cos
                    } as f32;
                }
            }
        }
    }
    Ok(y)
}
