//! `cpu::fast` against the f64 reference, element by element, on shapes that are not multiples
//! of its blocks (4-row strips, 8-, 16- or 64-key panels, 128-key blocks, 64-row tasks), with
//! every option, through every copy of its block kernel this CPU can run
//! (`CpuKernel::available`: SSE2, AVX2, AVX2+FMA and AVX-512F on an AVX-512 machine). No GPU
//! needed.

use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use wgpu_attention::{Attention, Causal, Dims, Error, Layout, cpu};

/// Uniform values in `[-amp, amp)`, never exactly zero.
fn random(rng: &mut StdRng, n: usize, amp: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            loop {
                let x = rng.random_range(-amp..amp);
                if x != 0.0 {
                    break x;
                }
            }
        })
        .collect()
}

/// Random booleans, `true` with probability `p`.
/// `x` with every value made non-negative (ALiBi slopes).
fn positive(x: Vec<f32>) -> Vec<f32> {
    x.into_iter().map(f32::abs).collect()
}

fn random_mask(rng: &mut StdRng, n: usize, p: f64) -> Vec<bool> {
    (0..n).map(|_| rng.random_bool(p)).collect()
}

fn dims(
    batch: usize,
    heads: usize,
    kv_heads: usize,
    l: usize,
    s: usize,
    d: usize,
    dv: usize,
) -> Dims {
    Dims {
        batch,
        heads,
        kv_heads,
        q_len: l,
        kv_len: s,
        head_dim: d,
        v_head_dim: dv,
    }
}

/// Runs `fast` and the reference on fresh random Q, K, V (Q multiplied by `q_amp`) and checks
/// O element by element (`2e-5 + 1e-4 |want|`), O's relative norm error (`1e-5`) and the
/// log-sum-exp (`2e-5` absolute plus relative, `-inf` only where the reference has it).
fn check(what: &str, seed: u64, dims: Dims, opts: &Attention, q_amp: f32) {
    let mut rng = StdRng::seed_from_u64(seed);
    let q = random(&mut rng, dims.q_elems(), q_amp);
    let k = random(&mut rng, dims.k_elems(), 1.0);
    let v = random(&mut rng, dims.v_elems(), 1.0);
    let want = cpu::reference(&q, &k, &v, dims, opts).unwrap();
    for kernel in cpu::CpuKernel::available() {
        let got = cpu::fast_with_kernel(kernel, &q, &k, &v, dims, opts).unwrap();
        let ctx = format!("{what}, {kernel}: {dims:?}, {opts:?}");
        compare(&ctx, &got, &want);
    }
}

/// O element by element and by relative norm error, and the log-sum-exp (see [`check`]).
fn compare(ctx: &str, got: &cpu::FastOutput, want: &cpu::Reference) {
    assert_eq!(got.o.len(), want.o.len(), "{ctx}: O length");
    for (i, (&g, &w)) in got.o.iter().zip(&want.o).enumerate() {
        assert!(
            g.is_finite() && (g - w).abs() <= 2e-5 + 1e-4 * w.abs(),
            "{ctx}: O[{i}] is {g}, want {w}"
        );
    }
    let (mut num, mut den) = (0f64, 0f64);
    for (&g, &w) in got.o.iter().zip(&want.o) {
        num += (g as f64 - w as f64).powi(2);
        den += (w as f64).powi(2);
    }
    let rel = if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    };
    assert!(rel <= 1e-5, "{ctx}: relative norm error {rel:e}");

    assert_eq!(got.lse.len(), want.lse.len(), "{ctx}: lse length");
    for (i, (&g, &w)) in got.lse.iter().zip(&want.lse).enumerate() {
        let ok = if w == f32::NEG_INFINITY {
            g == w
        } else {
            g.is_finite() && (g - w).abs() <= 2e-5 + 2e-5 * w.abs()
        };
        assert!(ok, "{ctx}: lse[{i}] is {g}, want {w}");
    }
}

const LENS: [usize; 5] = [1, 7, 33, 100, 257];

#[test]
fn every_length_pair_and_head_dim() {
    // (head_dim, v_head_dim): every head_dim asked for, each with a different v_head_dim.
    let widths = [(1, 3), (8, 5), (40, 64), (64, 40), (128, 72), (256, 129)];
    let aligns = [None, Some(Causal::TopLeft), Some(Causal::BottomRight)];
    let mut seed = 0;
    for (n, &l) in LENS.iter().enumerate() {
        for (m, &s) in LENS.iter().enumerate() {
            for (w, &(d, dv)) in widths.iter().enumerate() {
                seed += 1;
                // Every width meets every causal setting as the length pair changes.
                let mut opts = Attention::new().return_lse(true);
                if let Some(c) = aligns[(n + m + w) % 3] {
                    opts = opts.causal(c);
                }
                check("lengths", seed, dims(1, 1, 1, l, s, d, dv), &opts, 1.0);
            }
        }
    }
}

#[test]
fn grouped_and_multi_query_in_both_layouts() {
    let mut seed = 100;
    for layout in [Layout::Bhsd, Layout::Bshd] {
        // (heads, kv_heads): plain, groups of 2 and 4, multi-query.
        for (heads, kv_heads) in [(3, 3), (4, 2), (8, 2), (6, 1)] {
            for causal in [None, Some(Causal::TopLeft), Some(Causal::BottomRight)] {
                for (l, s) in [(33, 100), (100, 33), (7, 257)] {
                    if kv_heads > 1 && l == 7 {
                        continue; // the long, thin shape only with multi-query attention
                    }
                    seed += 1;
                    let mut opts = Attention::new().layout(layout);
                    if let Some(c) = causal {
                        opts = opts.causal(c);
                    }
                    let d = dims(2, heads, kv_heads, l, s, 40, 24);
                    check("gqa", seed, d, &opts, 1.0);
                }
            }
        }
    }
}

#[test]
fn causal_alignments_leave_rows_without_keys() {
    // q_len > kv_len bottom-right: the first q_len - kv_len rows see nothing (zeros, -inf).
    for (seed, (l, s)) in [(100, 33), (257, 7), (33, 1), (7, 100), (257, 257)]
        .into_iter()
        .enumerate()
    {
        for causal in [Causal::TopLeft, Causal::BottomRight] {
            for layout in [Layout::Bhsd, Layout::Bshd] {
                let opts = Attention::new().layout(layout).causal(causal);
                check(
                    "causal",
                    200 + seed as u64,
                    dims(2, 2, 2, l, s, 64, 64),
                    &opts,
                    1.0,
                );
            }
        }
    }
}

#[test]
fn sliding_windows() {
    let mut seed = 300;
    for (l, s) in [(100, 100), (33, 257), (257, 33), (1, 100)] {
        for (left, right) in [(0, 0), (5, 0), (16, 3), (63, 64), (0, 200), (1000, 1)] {
            for (causal, align) in [
                (None, None),
                (Some(Causal::TopLeft), None),
                (Some(Causal::BottomRight), None),
                (None, Some(Causal::TopLeft)),
                (Some(Causal::BottomRight), Some(Causal::TopLeft)),
            ] {
                seed += 1;
                let mut opts = Attention::new().window(left, right);
                if let Some(c) = causal {
                    opts = opts.causal(c);
                }
                if let Some(a) = align {
                    opts = opts.window_align(a);
                }
                check("window", seed, dims(1, 2, 1, l, s, 8, 16), &opts, 1.0);
            }
        }
    }
}

/// ALiBi (per head and per batch entry and head), learnable sinks and StreamingLLM's sink keys,
/// alone and with the options they interact with: both alignments (ALiBi's distances follow
/// the window's), per-sequence lengths (the offset is per sequence), windows the sink keys
/// overlap or not, and rows with no key (a sink's log-sum-exp is its logit).
#[test]
fn alibi_sinks_and_sink_keys() {
    let mut rng = StdRng::seed_from_u64(77);
    let mut seed = 900;
    for (l, s) in [(33, 100), (100, 33), (1, 257), (57, 57)] {
        let d = dims(2, 4, 2, l, s, 24, 16);
        let slopes = positive(random(&mut rng, 4, 0.5));
        let per_batch = positive(random(&mut rng, 8, 0.5));
        let sinks = random(&mut rng, 4, 3.0);
        let base = [
            Attention::new(),
            Attention::new().causal(Causal::TopLeft),
            Attention::new().causal(Causal::BottomRight),
            Attention::new().window_align(Causal::TopLeft).window(5, 5),
            Attention::new()
                .kv_lens(vec![0, (s as u32).min(40)])
                .q_lens(vec![l as u32, 1]),
        ];
        for opts in base {
            for with in [
                opts.clone().alibi(slopes.clone()),
                opts.clone().alibi(per_batch.clone()),
                opts.clone().sinks(sinks.clone()),
                opts.clone().alibi(slopes.clone()).sinks(sinks.clone()),
                opts.clone().window(3, 0).sink_keys(4),
                opts.clone()
                    .window(20, 2)
                    .sink_keys(30)
                    .sinks(sinks.clone()),
                opts.clone().window(0, 0).sink_keys(1).alibi(slopes.clone()),
            ] {
                seed += 1;
                check("alibi/sinks", seed, d, &with, 4.0);
            }
        }
    }
}

/// Decoding shapes: few tasks against many keys, so the keys are split across threads (at
/// least 512 keys per split: 1100 keys give 2 splits, 4099 up to 8) and merged by log-sum-exp;
/// and a kv head's group packed as the rows of one task (strips of 4 rows straddle heads at
/// q_len 3 and 7). Every option whose terms differ per head or per key rides along: ALiBi,
/// sinks (added once, at the merge), sink keys with a window (the hole falls inside one split
/// or across two), lengths (a split with no allowed key), masks and biases per head.
#[test]
fn decoding_shapes_split_the_keys_and_pack_the_group() {
    let mut rng = StdRng::seed_from_u64(4242);
    let mut seed = 5000;
    for (h, hkv, l, s) in [
        (1, 1, 1, 1100),
        (6, 2, 3, 2500),
        (4, 1, 7, 4099),
        (3, 3, 1, 1500),
    ] {
        let d = dims(1, h, hkv, l, s, 40, 24);
        let slopes = positive(random(&mut rng, h, 0.05));
        let sinks = random(&mut rng, h, 3.0);
        let mask = random_mask(&mut rng, h * l * s, 0.2);
        let bias = random(&mut rng, h * s, 2.0);
        for opts in [
            Attention::new(),
            Attention::new().causal(Causal::BottomRight),
            Attention::new().kv_lens(vec![(s as u32) / 3]),
            Attention::new().kv_lens(vec![0]).sinks(sinks.clone()),
            Attention::new().alibi(slopes.clone()),
            Attention::new().sinks(sinks.clone()),
            Attention::new()
                .causal(Causal::BottomRight)
                .window(700, 0)
                .sink_keys(5)
                .sinks(sinks.clone()),
            Attention::new().window(30, 30).sink_keys(600),
            Attention::new().mask([1, h, l, s], mask.clone()),
            Attention::new()
                .bias([1, h, 1, s], bias.clone())
                .softcap(3.0),
        ] {
            seed += 1;
            check("decoding", seed, d, &opts, 2.0);
        }
    }
}

/// Dropout drops the reference's weights (the same hash of each weight's place): several
/// tasks and key blocks, decoding's split keys and packed group, every masking option, packed
/// sequences, and p = 1.
/// `base` beside every masking option, for `dims(2, 4, 2, 150, 201, ..)` in Bshd: bottom-right
/// causal, a window with sink keys, kv_lens 201 and 77, the boolean `mask` (`[2, 1, 150, 201]`),
/// a bias, softcap, ALiBi and sinks.
fn every_option(base: Attention, mask: Vec<bool>, rng: &mut StdRng) -> Attention {
    base.causal(Causal::BottomRight)
        .window(120, 2)
        .sink_keys(3)
        .kv_lens(vec![201, 77])
        .mask([2, 1, 150, 201], mask)
        .bias([1, 4, 1, 201], random(rng, 4 * 201, 1.0))
        .softcap(4.0)
        .alibi(positive(random(rng, 4, 0.1)))
        .sinks(random(rng, 4, 1.0))
        .layout(Layout::Bshd)
}

#[test]
fn dropout_drops_the_references_weights() {
    let mut rng = StdRng::seed_from_u64(4343);
    let d = dims(2, 4, 2, 150, 201, 40, 24);
    let mask = random_mask(&mut rng, 2 * 150 * 201, 0.2);
    check("dropout", 900, d, &Attention::new().dropout(0.3, 1), 1.0);
    let every = every_option(Attention::new().dropout(0.6, u64::MAX), mask, &mut rng);
    check("dropout, every option", 901, d, &every, 2.0);
    // Decoding: the keys split over tasks, the group packed as rows.
    check(
        "dropout, decoding",
        902,
        dims(1, 6, 2, 3, 2500, 40, 24),
        &Attention::new().dropout(0.2, 3),
        2.0,
    );
    // Packed sequences: rows and keys count within each sequence.
    let packed = Attention::new()
        .dropout(0.4, 4)
        .layout(Layout::Bshd)
        .varlen(vec![0, 20, 21, 90], vec![0, 33, 1133, 1150]);
    let pd = dims(3, 4, 2, 69, 1100, 16, 16);
    let n = |rows: usize, heads: usize, w: usize| rows * heads * w;
    let (q, k, v) = (
        random(&mut rng, n(90, 4, 16), 2.0),
        random(&mut rng, n(1150, 2, 16), 1.0),
        random(&mut rng, n(1150, 2, 16), 1.0),
    );
    let want = cpu::reference(&q, &k, &v, pd, &packed).unwrap();
    let got = cpu::fast(&q, &k, &v, pd, &packed).unwrap();
    compare("dropout, packed", &got, &want);
    // Everything dropped.
    let all = cpu::fast(&q, &k, &v, pd, &packed.clone().dropout(1.0, 1557816)).unwrap();
    assert!(all.o.iter().all(|&x| x == 0.0));
}

/// Score mods, mask mods and key ranges (`Attention::score_mod`, their CPU closures): beside
/// every masking option, decoding's split keys and packed group, the ready-made ranges, and
/// closures that panic if called for a key the other masks remove (the kernels call them
/// for allowed keys only, and so must `cpu::fast`: it called them for keys a boolean mask
/// removes, once). The GPU paths run the same cases' WGSL in `tests/score_mod.rs`.
#[test]
fn score_mods() {
    use wgpu_attention::ScoreMod;
    let mut rng = StdRng::seed_from_u64(4545);
    let d = dims(2, 4, 2, 150, 201, 40, 24);
    let bent = |kv: [usize; 2]| {
        ScoreMod::new()
            .mask_cpu(move |b, _, i, j| (i / 7 + j / 5) % 3 != 1 && (j + 3 < kv[b] || i % 2 == 0))
            .score_cpu(|s, _, h, i, j| {
                s * (0.5 + 0.3 * h as f64) + 0.05 * (j % 7) as f64 - 0.02 * (i % 5) as f64
            })
            .range_cpu(|_, i| (i / 16 * 8, i / 16 * 8 + 120 + i % 5))
    };
    check(
        "score mods",
        910,
        d,
        &Attention::new().score_mod(bent([201, 201])),
        2.0,
    );
    let mask = random_mask(&mut rng, 2 * 150 * 201, 0.8);
    let every = every_option(Attention::new().score_mod(bent([201, 77])), mask, &mut rng);
    check("score mods, every option", 911, d, &every, 2.0);
    check(
        "score mods, decoding",
        912,
        dims(1, 6, 2, 3, 2500, 40, 24),
        &Attention::new().score_mod(bent([2500, 2500])),
        2.0,
    );
    // Ready-made ranges (rows by position), and a range whose empty rows see the sink keys.
    let ready = [
        ScoreMod::chunked(64),
        ScoreMod::prefix_lm(37),
        ScoreMod::documents(&[vec![40, 1, 70, 39], vec![100, 30]]).unwrap(),
    ];
    for (n, m) in ready.into_iter().enumerate() {
        let opts = Attention::new().causal(Causal::BottomRight).score_mod(m);
        check(
            "ready-made range",
            913 + n as u64,
            dims(2, 4, 2, 150, 150, 24, 24),
            &opts,
            2.0,
        );
    }
    let holes = Attention::new()
        .score_mod(ScoreMod::new().range_cpu(|_, i| {
            if i % 9 == 4 {
                (5, 5)
            } else {
                (i + 40, i + 130)
            }
        }))
        .window(100, 100)
        .sink_keys(3)
        .causal(Causal::BottomRight);
    check(
        "range beside sink keys",
        916,
        dims(1, 4, 2, 70, 200, 16, 16),
        &holes,
        2.0,
    );
    // Closures that panic for a key the causal window, its sink keys or the boolean mask
    // remove (and the score mod for one the mask mod removes).
    let mask = random_mask(&mut rng, 40 * 40, 0.7);
    let (m2, m3) = (
        std::sync::Arc::new(mask.clone()),
        std::sync::Arc::new(mask.clone()),
    );
    let in_range = |i: usize, j: usize| j <= i && (j + 6 >= i || j < 2);
    let watched = ScoreMod::new()
        .mask_cpu(move |_, _, i, j| {
            assert!(in_range(i, j) && m2[i * 40 + j], "mask mod at ({i}, {j})");
            (i + j) % 3 != 0
        })
        .score_cpu(move |s, _, _, i, j| {
            assert!(
                in_range(i, j) && m3[i * 40 + j] && (i + j) % 3 != 0,
                "score mod at ({i}, {j})"
            );
            s - 0.1 * (i - j) as f64
        });
    let opts = Attention::new()
        .causal(Causal::TopLeft)
        .window(6, 0)
        .sink_keys(2)
        .mask([1, 1, 40, 40], mask)
        .score_mod(watched);
    check(
        "mods see allowed keys only",
        917,
        dims(1, 2, 1, 40, 40, 8, 8),
        &opts,
        2.0,
    );
}

#[test]
fn masks_and_biases_broadcast() {
    let (b, h, l, s) = (2, 2, 33, 100);
    let shapes = [
        [1, 1, 1, s],
        [1, 1, l, s],
        [b, 1, 1, s],
        [1, h, l, 1],
        [b, h, 1, 1],
        [b, h, l, s],
        [1, 1, 1, 1],
    ];
    let mut rng = StdRng::seed_from_u64(400);
    for (n, shape) in shapes.into_iter().enumerate() {
        let len: usize = shape.iter().product();
        for layout in [Layout::Bhsd, Layout::Bshd] {
            let seed = 400 + n as u64 * 2 + (layout == Layout::Bshd) as u64;
            let d = dims(b, h, 1, l, s, 64, 48);
            let mask = random_mask(&mut rng, len, 0.7);
            let bias = random(&mut rng, len, 3.0);
            let with_mask = Attention::new().layout(layout).mask(shape, mask.clone());
            check("mask", seed, d, &with_mask, 1.0);
            let with_bias = Attention::new().layout(layout).bias(shape, bias.clone());
            check("bias", seed, d, &with_bias, 1.0);
            let both = Attention::new()
                .layout(layout)
                .mask(shape, mask)
                .bias(shape, bias)
                .causal(Causal::BottomRight);
            check("mask+bias+causal", seed, d, &both, 1.0);
        }
    }
}

#[test]
fn fully_masked_rows_and_sequences() {
    let (b, h, l, s) = (2, 2, 100, 257);
    let d = dims(b, h, h, l, s, 40, 40);
    // Every third row masked out entirely, every other key of the rest.
    let mask: Vec<bool> = (0..b * h * l * s)
        .map(|x| {
            let (i, j) = ((x / s) % l, x % s);
            i % 3 != 0 && j % 2 == 0
        })
        .collect();
    check(
        "mask rows",
        500,
        d,
        &Attention::new().mask([b, h, l, s], mask),
        1.0,
    );
    // Everything masked: zeros and -inf everywhere.
    let none = Attention::new().mask([1, 1, 1, 1], vec![false]);
    check("all masked", 501, d, &none, 1.0);
    // A window that lies past the last key for every row.
    let away = Attention::new()
        .window(0, 10)
        .window_align(Causal::TopLeft)
        .kv_lens(vec![0, 3]);
    check("window past the keys", 502, d, &away, 1.0);
}

#[test]
fn sequence_lengths() {
    let (l, s) = (100, 257);
    let mut seed = 600;
    for (kv_lens, q_lens) in [
        (Some(vec![0, 257, 64, 1]), None),
        (None, Some(vec![0, 100, 37, 1])),
        (Some(vec![257, 0, 65, 3]), Some(vec![100, 100, 7, 100])),
        (Some(vec![5, 200, 100, 257]), Some(vec![7, 33, 100, 1])),
    ] {
        for causal in [None, Some(Causal::TopLeft), Some(Causal::BottomRight)] {
            for layout in [Layout::Bhsd, Layout::Bshd] {
                seed += 1;
                let mut opts = Attention::new().layout(layout);
                if let Some(c) = causal {
                    opts = opts.causal(c);
                }
                if let Some(lens) = &kv_lens {
                    opts = opts.kv_lens(lens.clone());
                }
                if let Some(lens) = &q_lens {
                    opts = opts.q_lens(lens.clone());
                }
                check("lens", seed, dims(4, 2, 1, l, s, 8, 12), &opts, 1.0);
                check(
                    "lens+window",
                    seed,
                    dims(4, 2, 1, l, s, 8, 12),
                    &opts.window(20, 3),
                    1.0,
                );
            }
        }
    }
}

#[test]
fn softcap_scale_and_large_logits() {
    let d = dims(2, 4, 2, 100, 257, 64, 40);
    check("softcap", 700, d, &Attention::new().softcap(2.0), 30.0);
    check("softcap 50", 701, d, &Attention::new().softcap(50.0), 30.0);
    check("scale", 702, d, &Attention::new().scale(1.0), 1.0);
    check(
        "luong x30",
        703,
        dims(1, 2, 2, 33, 100, 16, 16),
        &Attention::new().scale(1.0),
        30.0,
    );
    for (n, head_dim) in [1, 8, 64, 128, 256].into_iter().enumerate() {
        let d = dims(1, 2, 1, 33, 257, head_dim, 32);
        check("logits x30", 710 + n as u64, d, &Attention::new(), 30.0);
        let all = Attention::new()
            .softcap(20.0)
            .bias(
                [1, 1, 33, 257],
                random(&mut StdRng::seed_from_u64(n as u64), 33 * 257, 2.0),
            )
            .causal(Causal::BottomRight)
            .window(40, 0);
        check("logits x30, everything", 720 + n as u64, d, &all, 30.0);
    }
}

#[test]
fn many_tasks_and_blocks() {
    // Several 64-row tasks and 128-key blocks per head, with partial last ones.
    let d = dims(2, 2, 2, 150, 201, 64, 64);
    check("big", 800, d, &Attention::new(), 1.0);
    check(
        "big causal",
        801,
        d,
        &Attention::new().causal(Causal::TopLeft),
        1.0,
    );
    let d = dims(1, 2, 1, 257, 600, 32, 32);
    let opts = Attention::new()
        .causal(Causal::BottomRight)
        .window(100, 0)
        .layout(Layout::Bshd);
    check("big window", 802, d, &opts, 1.0);
}

#[test]
fn overflowing_scores_give_no_nan() {
    // Finite inputs whose dot products overflow f32 (to inf, and to inf - inf = NaN).
    let d = dims(1, 1, 1, 7, 33, 4, 4);
    let q: Vec<f32> = (0..d.q_elems())
        .map(|i| if i % 2 == 0 { 3e38 } else { -3e38 })
        .collect();
    let k: Vec<f32> = (0..d.k_elems())
        .map(|i| if i % 3 == 0 { 3e38 } else { 1.0 })
        .collect();
    let v: Vec<f32> = (0..d.v_elems()).map(|i| (i as f32 * 0.1).sin()).collect();
    for opts in [
        Attention::new(),
        Attention::new().softcap(5.0),
        Attention::new().scale(1e-30),
    ] {
        for kernel in cpu::CpuKernel::available() {
            let got = cpu::fast_with_kernel(kernel, &q, &k, &v, d, &opts).unwrap();
            let ctx = format!("{kernel}, {opts:?}");
            assert!(got.o.iter().all(|x| x.is_finite()), "{ctx}: {:?}", got.o);
            assert!(got.lse.iter().all(|x| !x.is_nan()), "{ctx}: {:?}", got.lse);
        }
    }
}

#[test]
fn weights_are_never_returned_but_the_call_succeeds() {
    let d = dims(1, 2, 2, 7, 9, 8, 8);
    let x = random(
        &mut StdRng::seed_from_u64(900),
        d.q_elems().max(d.k_elems()),
        1.0,
    );
    let (q, k) = (&x[..d.q_elems()], &x[..d.k_elems()]);
    let opts = Attention::new().return_weights(true);
    let fast = cpu::fast(q, k, k, d, &opts).unwrap();
    let exact = cpu::reference(q, k, k, d, &opts).unwrap();
    assert_eq!(fast.o.len(), exact.o.len());
}

#[test]
fn errors_match_the_reference() {
    let d = dims(1, 2, 2, 7, 9, 8, 8);
    let q = vec![0.5; d.q_elems()];
    let k = vec![0.5; d.k_elems()];
    let both = |q: &[f32], k: &[f32], v: &[f32], d: Dims, opts: &Attention| {
        let fast = cpu::fast(q, k, v, d, opts).unwrap_err();
        let exact = cpu::reference(q, k, v, d, opts).unwrap_err();
        assert_eq!(fast, exact);
        fast
    };
    let e = both(&q[1..], &k, &k, d, &Attention::new());
    assert!(matches!(e, Error::DataLength { what: "Q", .. }), "{e}");
    let e = both(&q, &k[1..], &k, d, &Attention::new());
    assert!(matches!(e, Error::DataLength { what: "K", .. }), "{e}");
    let e = both(&q, &k, &k[1..], d, &Attention::new());
    assert!(matches!(e, Error::DataLength { what: "V", .. }), "{e}");
    let e = both(&q, &k, &k, dims(1, 3, 2, 7, 9, 8, 8), &Attention::new());
    assert!(matches!(e, Error::HeadsNotDivisible { .. }), "{e}");
    let e = both(
        &q,
        &k,
        &k,
        d,
        &Attention::new().mask([1, 1, 2, 9], vec![true; 18]),
    );
    assert!(matches!(e, Error::BroadcastShape { .. }), "{e}");
    let e = both(&q, &k, &k, d, &Attention::new().kv_lens(vec![10]));
    assert!(matches!(e, Error::LengthOutOfRange { .. }), "{e}");
    let e = both(&q, &k, &k, d, &Attention::new().softcap(0.0));
    assert!(matches!(e, Error::InvalidOption { .. }), "{e}");
}

/// A random problem: sizes, options and which of them are set.
#[derive(Debug, Clone)]
struct Case {
    batch: usize,
    kv_heads: usize,
    group: usize,
    q_len: usize,
    kv_len: usize,
    head_dim: usize,
    v_head_dim: usize,
    bshd: bool,
    causal: Option<bool>,
    window: Option<(usize, usize, Option<bool>)>,
    softcap: Option<f32>,
    scale: Option<f32>,
    mask: Option<(u8, f64)>,
    bias: Option<u8>,
    kv_lens: bool,
    q_lens: bool,
    q_amp: f32,
    seed: u64,
    /// ALiBi: slopes per batch entry and head (else per head), and their size.
    alibi: Option<(bool, f32)>,
    /// Sink logits of this size.
    sinks: Option<f32>,
    sink_keys: usize,
}

fn case() -> impl Strategy<Value = Case> {
    let sizes = (
        1..=2usize,
        1..=2usize,
        1..=3usize,
        1..=80usize,
        1..=90usize,
        1..=72usize,
        1..=72usize,
    );
    let options = (
        any::<bool>(),
        proptest::option::of(any::<bool>()),
        proptest::option::of((0..40usize, 0..40usize, proptest::option::of(any::<bool>()))),
        proptest::option::of(1.0f32..30.0),
        proptest::option::of(0.05f32..2.0),
        proptest::option::of((0..16u8, 0.0f64..1.0)),
        proptest::option::of(0..16u8),
        any::<bool>(),
        any::<bool>(),
        prop_oneof![Just(1.0f32), Just(4.0), Just(30.0)],
        any::<u64>(),
        (
            proptest::option::of((any::<bool>(), 0.01f32..1.0)),
            proptest::option::of(0.1f32..8.0),
            prop_oneof![Just(0usize), 1..12usize],
        ),
    );
    (sizes, options).prop_map(
        |(
            (batch, kv_heads, group, q_len, kv_len, head_dim, v_head_dim),
            (
                bshd,
                causal,
                window,
                softcap,
                scale,
                mask,
                bias,
                kv_lens,
                q_lens,
                q_amp,
                seed,
                (alibi, sinks, sink_keys),
            ),
        )| Case {
            batch,
            kv_heads,
            group,
            q_len,
            kv_len,
            head_dim,
            v_head_dim,
            bshd,
            causal,
            window,
            softcap,
            scale,
            mask,
            bias,
            kv_lens,
            q_lens,
            q_amp,
            seed,
            alibi,
            sinks,
            sink_keys,
        },
    )
}

impl Case {
    fn dims(&self) -> Dims {
        dims(
            self.batch,
            self.kv_heads * self.group,
            self.kv_heads,
            self.q_len,
            self.kv_len,
            self.head_dim,
            self.v_head_dim,
        )
    }

    /// The options; a broadcast shape picks, bit by bit, which dims of the score shape are 1.
    fn opts(&self) -> Attention {
        let d = self.dims();
        let mut rng = StdRng::seed_from_u64(self.seed ^ 0x5eed);
        let full = d.score_shape();
        let shape = |bits: u8| -> [usize; 4] {
            std::array::from_fn(|i| if bits >> i & 1 == 1 { 1 } else { full[i] })
        };
        let align = |right: bool| {
            if right {
                Causal::BottomRight
            } else {
                Causal::TopLeft
            }
        };
        let mut opts = Attention::new().layout(if self.bshd {
            Layout::Bshd
        } else {
            Layout::Bhsd
        });
        if let Some(c) = self.causal {
            opts = opts.causal(align(c));
        }
        if let Some((left, right, a)) = self.window {
            opts = opts.window(left, right);
            if let Some(a) = a {
                opts = opts.window_align(align(a));
            }
        }
        if let Some(cap) = self.softcap {
            opts = opts.softcap(cap);
        }
        if let Some(scale) = self.scale {
            opts = opts.scale(scale);
        }
        if let Some((bits, p)) = self.mask {
            let shape = shape(bits);
            opts = opts.mask(shape, random_mask(&mut rng, shape.iter().product(), p));
        }
        if let Some(bits) = self.bias {
            let shape = shape(bits);
            opts = opts.bias(shape, random(&mut rng, shape.iter().product(), 2.0));
        }
        if self.kv_lens {
            let lens = (0..d.batch)
                .map(|_| rng.random_range(0..=d.kv_len as u32))
                .collect();
            opts = opts.kv_lens(lens);
        }
        if self.q_lens {
            let lens = (0..d.batch)
                .map(|_| rng.random_range(0..=d.q_len as u32))
                .collect();
            opts = opts.q_lens(lens);
        }
        if let Some((per_batch, size)) = self.alibi {
            let n = if per_batch {
                d.batch * d.heads
            } else {
                d.heads
            };
            opts = opts.alibi(positive(random(&mut rng, n, size)));
        }
        if let Some(size) = self.sinks {
            opts = opts.sinks(random(&mut rng, d.heads, size));
        }
        opts.sink_keys(self.sink_keys)
    }
}

proptest! {
    #![proptest_config(Config {
        cases: 200,
        rng_seed: RngSeed::Fixed(0xfa57_a77e),
        failure_persistence: None,
        ..Config::default()
    })]

    #[test]
    fn random_configs_match_the_reference(c in case()) {
        check("proptest", c.seed, c.dims(), &c.opts(), c.q_amp);
    }
}

/// Half-precision inputs, stored as `half::f16` / `half::bf16`, against the reference on the
/// same values.
#[test]
fn half_precision_inputs() {
    use wgpu_attention::{Attention, Causal, Dims, cpu};
    let dims = Dims {
        batch: 1,
        heads: 4,
        kv_heads: 2,
        q_len: 33,
        kv_len: 70,
        head_dim: 40,
        v_head_dim: 24,
    };
    let wave = |n: usize, f: f32| -> Vec<f32> { (0..n).map(|i| (i as f32 * f).sin()).collect() };
    let (q, k, v) = (
        wave(dims.q_elems(), 0.37),
        wave(dims.k_elems(), 0.11),
        wave(dims.v_elems(), 0.05),
    );
    let opts = Attention::new().causal(Causal::BottomRight);
    let qh: Vec<half::f16> = q.iter().map(|&x| half::f16::from_f32(x)).collect();
    let kb: Vec<half::bf16> = k.iter().map(|&x| half::bf16::from_f32(x)).collect();
    let vb: Vec<half::bf16> = v.iter().map(|&x| half::bf16::from_f32(x)).collect();
    let want = cpu::reference(&qh, &kb, &vb, dims, &opts).unwrap();
    for kernel in cpu::CpuKernel::available() {
        let got = cpu::fast_with_kernel(kernel, &qh, &kb, &vb, dims, &opts).unwrap();
        for (i, (g, w)) in got.o.iter().zip(&want.o).enumerate() {
            assert!(
                (g - w).abs() <= 2e-5 + 1e-4 * w.abs(),
                "{kernel}: O[{i}]: got {g}, want {w}"
            );
        }
    }
}

/// The copies of the block kernel: the chosen one is available, names round-trip, and one
/// this CPU cannot run (or an unknown name) is a typed error, not a crash.
#[test]
fn kernel_copies_are_chosen_and_refused_by_name() {
    use cpu::CpuKernel;
    let available = CpuKernel::available();
    eprintln!(
        "cpu::fast copies on this CPU: {:?}, chosen {}",
        available.iter().map(|k| k.name()).collect::<Vec<_>>(),
        CpuKernel::chosen()
    );
    assert!(available.contains(&CpuKernel::Baseline));
    assert!(available.contains(&CpuKernel::chosen()));
    let forced = std::env::var("WGPU_ATTENTION_CPU_KERNEL").unwrap_or_default();
    let baseline = std::env::var("WGPU_ATTENTION_CPU_BASELINE").is_ok_and(|v| v != "0");
    if baseline {
        assert_eq!(CpuKernel::chosen(), CpuKernel::Baseline);
    } else if forced.is_empty() {
        assert_eq!(
            Some(&CpuKernel::chosen()),
            available.last(),
            "the fastest is chosen"
        );
    }
    for k in CpuKernel::ALL {
        match CpuKernel::from_name(k.name()) {
            Ok(found) => assert_eq!(found, k),
            Err(e) => {
                assert!(!available.contains(&k), "{k} is available but refused: {e}");
                assert!(matches!(e, Error::InvalidOption { .. }), "{e}");
                let d = dims(1, 1, 1, 3, 5, 4, 4);
                let x = vec![0.25f32; 20];
                let e = cpu::fast_with_kernel(k, &x[..12], &x, &x, d, &Attention::new());
                assert!(matches!(e, Err(Error::InvalidOption { .. })), "{e:?}");
            }
        }
    }
    assert_eq!(CpuKernel::from_name("baseline"), Ok(CpuKernel::Baseline));
    let e = CpuKernel::from_name("avx1024").unwrap_err();
    assert!(matches!(e, Error::InvalidOption { .. }), "{e}");
}
