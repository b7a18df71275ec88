//! The reference's ALiBi, sinks and sink keys against forms of the same computation that share
//! none of its code for them: an explicit bias written here from the formula, one extra key
//! whose score is the sink and whose value row is zero, and a boolean mask built key by key.
//! The GPU paths are checked against the reference in each path's grid
//! (`alibi_sinks_and_sink_keys` in `common::path_grid_tests`).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use wgpu_attention::{Attention, Causal, Dims, Layout, cpu};

fn random(rng: &mut StdRng, n: usize, amp: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-amp..amp)).collect()
}

/// `got` and `want` agree to `tol` absolute plus relative, element by element (equal where
/// `want` is infinite).
#[track_caller]
fn close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (n, (&g, &w)) in got.iter().zip(want).enumerate() {
        let ok = if w.is_infinite() {
            g == w
        } else {
            (g - w).abs() <= tol * (1.0 + w.abs())
        };
        assert!(ok, "{what}[{n}]: {g} vs {w}");
    }
}

fn dims(b: usize, h: usize, hkv: usize, l: usize, s: usize, d: usize) -> Dims {
    Dims {
        batch: b,
        heads: h,
        kv_heads: hkv,
        q_len: l,
        kv_len: s,
        head_dim: d,
        v_head_dim: d + 3,
    }
}

#[test]
fn alibi_is_the_bias_of_its_formula() {
    let mut rng = StdRng::seed_from_u64(1);
    for (l, s, causal, align) in [
        (7, 19, None, None),
        (19, 7, Some(Causal::TopLeft), None),
        (7, 19, Some(Causal::BottomRight), None),
        (12, 12, None, Some(Causal::TopLeft)),
    ] {
        let d = dims(2, 4, 2, l, s, 8);
        let (q, k, v) = (
            random(&mut rng, d.q_elems(), 2.0),
            random(&mut rng, d.k_elems(), 1.0),
            random(&mut rng, d.v_elems(), 1.0),
        );
        let slopes: Vec<f32> = random(&mut rng, d.batch * d.heads, 0.7)
            .into_iter()
            .map(f32::abs)
            .collect();
        let mut base = Attention::new();
        if let Some(c) = causal {
            base = base.causal(c);
        }
        if let Some(a) = align {
            base = base.window_align(a).window(100, 100);
        }
        // The diagonal sits at i + (kv_len - q_len) unless aligned top-left.
        let off = if align == Some(Causal::TopLeft) || causal == Some(Causal::TopLeft) {
            0
        } else {
            s as i64 - l as i64
        };
        let mut bias = vec![0f32; d.batch * d.heads * l * s];
        for b in 0..d.batch {
            for h in 0..d.heads {
                for i in 0..l {
                    for j in 0..s {
                        let dist = (i as i64 + off - j as i64).abs() as f32;
                        bias[((b * d.heads + h) * l + i) * s + j] = -slopes[b * d.heads + h] * dist;
                    }
                }
            }
        }
        let got = cpu::reference(&q, &k, &v, d, &base.clone().alibi(slopes.clone())).unwrap();
        let want = cpu::reference(&q, &k, &v, d, &base.bias(d.score_shape(), bias)).unwrap();
        close("O", &got.o, &want.o, 1e-6);
        close("lse", &got.lse, &want.lse, 1e-6);
    }
}

#[test]
fn a_sink_is_a_key_with_a_zero_value() {
    let mut rng = StdRng::seed_from_u64(2);
    for layout in [Layout::Bhsd, Layout::Bshd] {
        let (b, h, l, s, hd) = (2, 3, 5, 9, 6);
        let d = dims(b, h, h, l, s, hd);
        let q = random(&mut rng, d.q_elems(), 2.0);
        let k = random(&mut rng, d.k_elems(), 1.0);
        let v = random(&mut rng, d.v_elems(), 1.0);
        let sinks = random(&mut rng, h, 3.0);
        // K and V with one more key, last: K's row zero (score 0), V's row zero.
        let wide = Dims { kv_len: s + 1, ..d };
        let extend = |x: &[f32], width: usize| -> Vec<f32> {
            let mut out = vec![0f32; b * h * (s + 1) * width];
            for bb in 0..b {
                for hh in 0..h {
                    for j in 0..s {
                        let src = match layout {
                            Layout::Bhsd => ((bb * h + hh) * s + j) * width,
                            Layout::Bshd => ((bb * s + j) * h + hh) * width,
                        };
                        let dst = match layout {
                            Layout::Bhsd => ((bb * h + hh) * (s + 1) + j) * width,
                            Layout::Bshd => ((bb * (s + 1) + j) * h + hh) * width,
                        };
                        out[dst..dst + width].copy_from_slice(&x[src..src + width]);
                    }
                }
            }
            out
        };
        let (k2, v2) = (extend(&k, hd), extend(&v, hd + 3));
        // The sink as the extra key's bias: the score of a zero K row is 0.
        let mut bias = vec![0f32; h * (s + 1)];
        for hh in 0..h {
            bias[hh * (s + 1) + s] = sinks[hh];
        }
        let mask: Vec<bool> = (0..l * (s + 1)).map(|e| e % (s + 1) != 2).collect();
        for opts in [
            Attention::new().layout(layout),
            Attention::new().layout(layout).softcap(3.0),
        ] {
            let got = cpu::reference(&q, &k, &v, d, &opts.clone().sinks(sinks.clone())).unwrap();
            let extended = opts.clone().bias([1, h, 1, s + 1], bias.clone());
            let want = cpu::reference(&q, &k2, &v2, wide, &extended).unwrap();
            close("O", &got.o, &want.o, 1e-6);
            close("lse", &got.lse, &want.lse, 1e-6);
            // Key 2 masked on both sides.
            let m = |n| mask[..l * n].to_vec();
            let mask_s: Vec<bool> = (0..l * s).map(|e| e % s != 2).collect();
            let got = cpu::reference(
                &q,
                &k,
                &v,
                d,
                &opts.clone().sinks(sinks.clone()).mask([1, 1, l, s], mask_s),
            )
            .unwrap();
            let want = cpu::reference(
                &q,
                &k2,
                &v2,
                wide,
                &extended.mask([1, 1, l, s + 1], m(s + 1)),
            )
            .unwrap();
            close("O, masked", &got.o, &want.o, 1e-6);
            close("lse, masked", &got.lse, &want.lse, 1e-6);
        }
        // A row with no key outputs zeros with the sink as its log-sum-exp.
        let none = Attention::new()
            .layout(layout)
            .kv_lens(vec![0, s as u32])
            .sinks(sinks.clone());
        let r = cpu::reference(&q, &k, &v, d, &none).unwrap();
        for (hh, &sink) in sinks.iter().enumerate() {
            for i in 0..l {
                assert_eq!(r.lse[hh * l + i], sink, "lse of an empty row");
            }
        }
        let fast = cpu::fast(&q, &k, &v, d, &none).unwrap();
        close("fast lse of empty rows", &fast.lse, &r.lse, 1e-6);
    }
}

#[test]
fn sink_keys_are_the_mask_of_their_rule() {
    let mut rng = StdRng::seed_from_u64(3);
    for (l, s, (left, right), n, causal) in [
        (30, 30, (3, 0), 4, Some(Causal::TopLeft)),
        (5, 40, (6, 0), 2, Some(Causal::BottomRight)),
        (20, 25, (2, 2), 7, None),
        (10, 10, (0, 0), 12, Some(Causal::TopLeft)),
    ] {
        let d = dims(1, 2, 1, l, s, 8);
        let (q, k, v) = (
            random(&mut rng, d.q_elems(), 2.0),
            random(&mut rng, d.k_elems(), 1.0),
            random(&mut rng, d.v_elems(), 1.0),
        );
        let mut base = Attention::new();
        if let Some(c) = causal {
            base = base.causal(c);
        }
        let off = if causal == Some(Causal::TopLeft) {
            0
        } else {
            s as i64 - l as i64
        };
        let mask: Vec<bool> = (0..l * s)
            .map(|e| {
                let (i, j) = ((e / s) as i64, (e % s) as i64);
                let causal_ok = causal.is_none() || j <= i + off;
                let in_window = j >= i + off - left && j <= i + off + right;
                causal_ok && (in_window || j < n)
            })
            .collect();
        let got = cpu::reference(
            &q,
            &k,
            &v,
            d,
            &base
                .clone()
                .window(left as usize, right as usize)
                .sink_keys(n as usize),
        )
        .unwrap();
        let want = cpu::reference(&q, &k, &v, d, &base.mask([1, 1, l, s], mask)).unwrap();
        close("O", &got.o, &want.o, 1e-6);
        close("lse", &got.lse, &want.lse, 1e-6);
    }
}
