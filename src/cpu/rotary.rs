//! Rotary position embedding on the host, in f64 ([`crate::rotary`]).

use crate::error::Result;
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
    super::reference::check_len("rotated tensor", x, dims)?;
    let [sb, sh, ss] = layout.strides(heads, seq, head_dim);
    let mut y = x.to_vec();
    let mut turns = vec![(1.0, 0.0); rotary.dim() / 2];
    for b in 0..batch {
        for i in 0..seq {
            // The row's position on each axis (M-RoPE's three, or one three times).
            let axes = match positions {
                Positions::Start(s) => [s[b] as u64 + i as u64; 3],
                Positions::Each(e) => [e[b * seq + i] as u64; 3],
                Positions::Axes(a) => a[b * seq + i].map(|p| p as u64),
            };
            // Every head of the row turns by the same angles.
            for (k, turn) in turns.iter_mut().enumerate() {
                *turn = rotary.turn(axes[rotary.axis_of(k)], k);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// YaRN scales the turned pairs only, as `transformers`' scaled `cos` and `sin` do: a
    /// partial rotation's pass-through elements keep their size (a review found the first
    /// version's advice, a global attention scale, wrong there).
    #[test]
    fn yarn_scales_the_turned_pairs_only() {
        let (head_dim, rotary_dim) = (16, 8);
        let yarn = crate::rotary::YarnScaling::new(4.0, 64.0);
        let rope = Rotary::yarn(rotary_dim, 10_000.0, &yarn).unwrap();
        let a = yarn.attention_factor();
        assert_eq!(rope.magnitude(), a);
        let plain = Rotary::from_frequencies(rope.frequencies().to_vec()).unwrap();
        let dims = [1, 2, 5, head_dim];
        let x: Vec<f32> = (0..2 * 5 * head_dim)
            .map(|i| (i as f32 * 0.37).sin())
            .collect();
        let at = Positions::Start(vec![3]);
        let got = rotate(&x, dims, Layout::Bhsd, &rope, &at).unwrap();
        let turned = rotate(&x, dims, Layout::Bhsd, &plain, &at).unwrap();
        for (i, (&g, &t)) in got.iter().zip(&turned).enumerate() {
            let want = if i % head_dim < rotary_dim {
                t * a as f32
            } else {
                t
            };
            assert!((g - want).abs() < 1e-6, "{i}: {g} vs {want}");
        }
    }

    /// The transpose is the backward: `<rotate(x), w> = <x, rotate_transposed(w)>` for any x
    /// and w, in both pairings, with a partial rotation and with a magnitude.
    #[test]
    fn the_transpose_is_the_backward() {
        let dims = [2, 3, 5, 10];
        let n: usize = dims.iter().product();
        let x: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 113) as f32 / 56.0 - 1.0)
            .collect();
        let w: Vec<f32> = (0..n)
            .map(|i| ((i * 104_729) % 97) as f32 / 48.0 - 1.0)
            .collect();
        for rotary in [
            Rotary::new(6, 10_000.0).unwrap(),
            Rotary::new(10, 100.0).unwrap().interleaved(),
            Rotary::new(8, 100.0).unwrap().with_magnitude(1.3).unwrap(),
        ] {
            for layout in [Layout::Bhsd, Layout::Bshd] {
                let (batch, _, seq, _) = layout.split(dims);
                let at = Positions::Each((0..(batch * seq) as u32).map(|p| p * 12_345).collect());
                let rx = rotate(&x, dims, layout, &rotary, &at).unwrap();
                let iw = rotate(&w, dims, layout, &rotary.clone().transpose(), &at).unwrap();
                let dot = |a: &[f32], b: &[f32]| -> f64 {
                    a.iter().zip(b).map(|(&p, &q)| p as f64 * q as f64).sum()
                };
                let (lhs, rhs) = (dot(&rx, &w), dot(&x, &iw));
                assert!((lhs - rhs).abs() < 1e-5 * lhs.abs().max(1.0), "{lhs} {rhs}");
                // And it does turn (the identity would pass the line above too).
                assert!(rx.iter().zip(&x).any(|(a, b)| (a - b).abs() > 0.1));
            }
        }
    }

    /// M-RoPE as `transformers` writes it for Qwen3.5 (partial rotation, interleaved axes),
    /// transcribed element by element: `freqs[a][k] = pos[a] · inv_freq[k]`, the interleaved
    /// selection of `freqs_t`, `emb = cat(freqs_t, freqs_t)`, then
    /// `x · cos(emb) + rotate_half(x) · sin(emb)` over the rotated part, the rest passed through.
    #[test]
    fn mrope_matches_a_transcription_of_transformers() {
        let (head_dim, rotary_dim, sections) = (40, 24, [4, 4, 4]);
        let rope = Rotary::new(rotary_dim, 1e7)
            .unwrap()
            .mrope_interleaved(sections)
            .unwrap();
        let half = rotary_dim / 2;
        let inv_freq = rope.frequencies().to_vec();
        let rows: Vec<[u32; 3]> = vec![[5, 5, 5], [6, 17, 91], [1000, 2, 70000]];
        let x: Vec<f32> = (0..rows.len() * head_dim)
            .map(|i| (i as f32 * 0.61).cos())
            .collect();
        let got = rotate(
            &x,
            [1, 1, rows.len(), head_dim],
            Layout::Bhsd,
            &rope,
            &Positions::Axes(rows.clone()),
        )
        .unwrap();
        for (i, pos) in rows.iter().enumerate() {
            let freqs: Vec<Vec<f64>> = (0..3)
                .map(|a| inv_freq.iter().map(|f| pos[a] as f64 * f).collect())
                .collect();
            let mut freqs_t = freqs[0].clone();
            for (dim, offset) in [(1, 1), (2, 2)] {
                for idx in (offset..3 * sections[dim]).step_by(3) {
                    freqs_t[idx] = freqs[dim][idx];
                }
            }
            let emb: Vec<f64> = freqs_t.iter().chain(&freqs_t).copied().collect();
            let row = &x[i * head_dim..][..head_dim];
            for d in 0..head_dim {
                let want = if d < rotary_dim {
                    let rotated_half = if d < half {
                        -row[d + half] as f64
                    } else {
                        row[d - half] as f64
                    };
                    row[d] as f64 * emb[d].cos() + rotated_half * emb[d].sin()
                } else {
                    row[d] as f64
                };
                let g = got[i * head_dim + d] as f64;
                assert!(
                    (g - want).abs() < 1e-6,
                    "row {i} element {d}: {g} vs {want}"
                );
            }
        }
    }
}
