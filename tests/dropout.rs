//! Dropout on the attention weights (`Attention::dropout`): the pattern's statistics, the
//! reference's unbiasedness over seeds, every GPU path against the f64 reference (which drops
//! the same weights, bit for bit the same hash), half storage, passes and splits, and bad
//! input. The backward with dropout is in `tests/backward.rs` (`dropout_gradients`),
//! `cpu::fast` in `tests/cpu_fast.rs`, packed batches in `tests/varlen.rs`.

#[macro_use]
mod common;

use common::*;
use wgpu_attention::{Attention, Causal, DType, Dims, Dropout, Error, Path, Plan, cpu};

/// The fraction of `n` Bernoulli(`keep`) draws lies within five standard deviations.
#[track_caller]
fn within_five_sigma(what: &str, kept: usize, n: usize, keep: f64) {
    let sigma = (keep * (1.0 - keep) / n as f64).sqrt();
    let got = kept as f64 / n as f64;
    assert!(
        (got - keep).abs() <= 5.0 * sigma,
        "{what}: kept {got:.5}, want {keep:.5} +- {:.5}",
        5.0 * sigma
    );
}

#[test]
fn the_pattern_keeps_one_minus_p_independently() {
    let dims = Dims::new(2, 4, 128, 8);
    for (p, seed) in [(0.1f32, 1u64), (0.5, 2), (0.9, 3), (0.5, 0)] {
        let d = Dropout { p, seed };
        let keep = 1.0 - p as f64;
        let n = 2 * 4 * 128 * 128;
        let mut kept = 0;
        // Pairs of neighbours along the keys and along the rows, both kept.
        let (mut along_j, mut along_i) = (0, 0);
        let mut rows = std::collections::HashSet::new();
        for b in 0..2 {
            for h in 0..4 {
                for i in 0..128 {
                    let row: Vec<bool> = (0..128).map(|j| d.keeps(dims, b, h, i, j)).collect();
                    kept += row.iter().filter(|&&x| x).count();
                    along_j += row.windows(2).filter(|w| w[0] && w[1]).count();
                    if i > 0 {
                        along_i += (0..128)
                            .filter(|&j| row[j] && d.keeps(dims, b, h, i - 1, j))
                            .count();
                    }
                    rows.insert(row);
                }
            }
        }
        within_five_sigma(&format!("p {p}"), kept, n, keep);
        within_five_sigma(
            &format!("p {p}, key pairs"),
            along_j,
            8 * 128 * 127,
            keep * keep,
        );
        within_five_sigma(
            &format!("p {p}, row pairs"),
            along_i,
            8 * 127 * 128,
            keep * keep,
        );
        // 1024 rows of 128 draws: none repeats another.
        assert_eq!(rows.len(), 1024, "p {p}: repeated rows");
    }
    // Two seeds agree where both keep or both drop, as independent draws do.
    let (a, b) = (Dropout { p: 0.3, seed: 10 }, Dropout { p: 0.3, seed: 11 });
    let n = 64 * 64;
    let same = (0..n)
        .filter(|&x| a.keeps(dims, 1, 2, x / 64, x % 64) == b.keeps(dims, 1, 2, x / 64, x % 64))
        .count();
    within_five_sigma("seeds 10 and 11 agreeing", same, n, 0.7 * 0.7 + 0.3 * 0.3);
    // Seeds that differ only in their high word differ too.
    let c = Dropout {
        p: 0.3,
        seed: 10 | (1 << 40),
    };
    let same = (0..n)
        .filter(|&x| a.keeps(dims, 1, 2, x / 64, x % 64) == c.keeps(dims, 1, 2, x / 64, x % 64))
        .count();
    within_five_sigma(
        "seeds differing above bit 32",
        same,
        n,
        0.7 * 0.7 + 0.3 * 0.3,
    );
    assert_eq!(Dropout { p: 0.25, seed: 0 }.scale(), 1.0 / 0.75);
    assert_eq!(Dropout { p: 1.0, seed: 0 }.scale(), 0.0);
}

/// The reference's O with dropout, averaged over seeds, tends to O without it (dropout's
/// rescaling makes it unbiased); its log-sum-exp is the softmax's whatever the seed.
#[test]
fn the_reference_is_unbiased_over_seeds() {
    let dims = common::dims(1, 2, 1, 5, 40, 8, 8);
    let mut r = rng(5);
    let (q, k, v) = (
        random(&mut r, dims.q_elems(), 1.0),
        random(&mut r, dims.k_elems(), 1.0),
        random(&mut r, dims.v_elems(), 1.0),
    );
    let plain = cpu::reference(&q, &k, &v, dims, &Attention::new()).unwrap();
    let seeds = 2000;
    let mut mean = vec![0f64; plain.o.len()];
    for seed in 0..seeds {
        let opts = Attention::new().dropout(0.5, seed);
        let out = cpu::reference(&q, &k, &v, dims, &opts).unwrap();
        assert_eq!(out.lse, plain.lse, "seed {seed}: the log-sum-exp moved");
        for (m, o) in mean.iter_mut().zip(&out.o) {
            *m += *o as f64 / seeds as f64;
        }
    }
    // Each element is a sum of 40 weights of about 1/40 times a value below 1, each kept or
    // doubled: a standard deviation under 0.1 per seed, 0.0023 over 2000 seeds.
    for (n, (m, o)) in mean.iter().zip(&plain.o).enumerate() {
        assert!((m - *o as f64).abs() < 0.012, "O[{n}]: mean {m} vs {o}");
    }
    // p = 0 is no dropout at all; p = 1 drops everything.
    let zero = cpu::reference(&q, &k, &v, dims, &Attention::new().dropout(0.0, 9)).unwrap();
    assert_eq!(zero, plain);
    let all = cpu::reference(&q, &k, &v, dims, &Attention::new().dropout(1.0, 9)).unwrap();
    assert!(all.o.iter().all(|&x| x == 0.0));
    assert_eq!(all.lse, plain.lse);
}

/// The cases every path runs: plain, GQA and every masking option, one query over many keys
/// (the decode path's keys kernel), a few queries of a group (its row tiles, with splits), and
/// the three-pass path's weights.
fn cases() -> Vec<(Dims, Attention)> {
    let mut r = rng(7);
    let d = common::dims(2, 4, 2, 37, 70, 24, 20);
    let mask = random_mask(&mut r, 2 * 37 * 70, 0.8);
    let options = Attention::new()
        .dropout(0.5, 77)
        .causal(Causal::BottomRight)
        .window(40, 3)
        .sink_keys(2)
        .kv_lens(vec![70, 51])
        .mask([2, 1, 37, 70], mask)
        .bias([1, 4, 37, 70], random(&mut r, 4 * 37 * 70, 1.0))
        .softcap(3.0)
        .alibi(positive(random(&mut r, 4, 0.3)))
        .sinks(random(&mut r, 4, 1.0));
    vec![
        (d, Attention::new().dropout(0.3, 1)),
        (d, options),
        (
            common::dims(1, 8, 2, 1, 300, 64, 64),
            Attention::new()
                .dropout(0.2, 2)
                .layout(wgpu_attention::Layout::Bshd),
        ),
        (
            common::dims(1, 8, 2, 9, 1100, 40, 40),
            Attention::new().dropout(0.7, 3).causal(Causal::BottomRight),
        ),
    ]
}

#[test]
fn every_path_against_the_reference() {
    let Some(gpu) = gpu() else { return };
    for (n, (dims, opts)) in cases().into_iter().enumerate() {
        for path in [Path::ThreePass, Path::Fused, Path::Decode, Path::Auto] {
            check(gpu, path, dims, &opts, 100 + n as u64, 4.0);
        }
    }
}

/// Dropout changes O (the check above could not tell a kernel that ignored it from a
/// reference that did, were that the case), and the same seed gives the same O on every path.
#[test]
fn the_same_seed_drops_the_same_weights_on_every_path() {
    let Some(gpu) = gpu() else { return };
    let dims = common::dims(1, 4, 2, 9, 130, 16, 16);
    let mut r = rng(9);
    let layout = wgpu_attention::Layout::Bhsd;
    let q = gpu
        .upload(&random(&mut r, dims.q_elems(), 2.0), dims.q_shape(layout))
        .unwrap();
    let k = gpu
        .upload(&random(&mut r, dims.k_elems(), 1.0), dims.k_shape(layout))
        .unwrap();
    let v = gpu
        .upload(&random(&mut r, dims.v_elems(), 1.0), dims.v_shape(layout))
        .unwrap();
    let run = |opts: Attention| opts.run(gpu, &q, &k, &v).unwrap().o.download(gpu).unwrap();
    let plain = run(Attention::new());
    let outs: Vec<Vec<f32>> = [Path::ThreePass, Path::Fused, Path::Decode]
        .into_iter()
        .map(|path| run(Attention::new().dropout(0.4, 123).path(path)))
        .collect();
    for o in &outs[1..] {
        assert_close("O across paths", o, &outs[0], 2e-5, 1e-4);
    }
    let moved = outs[0]
        .iter()
        .zip(&plain)
        .filter(|(a, b)| (*a - *b).abs() > 1e-3)
        .count();
    assert!(
        moved > outs[0].len() / 2,
        "dropout moved only {moved} elements"
    );
    let other_seed = run(Attention::new().dropout(0.4, 124).path(Path::Fused));
    assert!(
        rel_norm_error(&other_seed, &outs[1]) > 1e-2,
        "the seed changed nothing"
    );
    // p = 0 is the kernel without dropout.
    assert_eq!(
        run(Attention::new().dropout(0.0, 5).path(Path::Fused)),
        run(Attention::new().path(Path::Fused))
    );
}

/// Half and mixed storage, passes, and the 16-bit products (emulated here; cooperative matrices
/// on a GPU that has them), which take P after dropout; and the decode path's splits.
#[test]
fn half_storage_passes_and_splits() {
    let Some(gpu) = gpu() else { return };
    let [(d, plain), (d2, options), ..] = &cases()[..] else {
        unreachable!()
    };
    half_storage_passes_and_products(
        gpu,
        (*d, plain),
        (*d2, options),
        [DType::Bf16, DType::F16, DType::F16, DType::F32],
        200,
    );
    // The decode path's few rows over many keys split the keys.
    let (d4, few) = &cases()[3];
    let Plan::Decode { plan, .. } = few.clone().path(Path::Decode).plan(gpu, *d4).unwrap() else {
        panic!("not the decode path")
    };
    assert!(plan.splits > 1, "no splits: {plan:?}");
}

#[test]
fn bad_probabilities_are_typed_errors() {
    let dims = Dims::new(1, 1, 4, 8);
    let x = vec![0.5f32; 32];
    for p in [-0.1, 1.5, f32::NAN, f32::INFINITY] {
        let e = cpu::reference(&x, &x, &x, dims, &Attention::new().dropout(p, 1)).unwrap_err();
        assert!(
            matches!(
                e,
                Error::InvalidOption {
                    what: "dropout",
                    ..
                }
            ),
            "p {p}: {e}"
        );
    }
    let e = cpu::fast(&x, &x, &x, dims, &Attention::new().dropout(1.5, 1)).unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidOption {
                what: "dropout",
                ..
            }
        ),
        "{e}"
    );
    let Some(gpu) = gpu() else { return };
    let t = gpu.upload(&x, [1, 1, 4, 8]).unwrap();
    let e = Attention::new()
        .dropout(2.0, 1)
        .run(gpu, &t, &t, &t)
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidOption {
                what: "dropout",
                ..
            }
        ),
        "{e}"
    );
}

/// `p = 1` drops every weight: O and the weights are zeros, the gradients finite (zeros but
/// the sinks'). Seed 1557816 gives weight (0, 0, 0, 25) bits of `u32::MAX`, which the
/// threshold `u32::MAX` keeps: the reference multiplied it by `1 / (1 - 1)` before `keeps`
/// said `false` at `p = 1` (an independent review found it).
#[test]
fn p_one_drops_everything() {
    const SEED: u64 = 1557816;
    let dims = common::dims(1, 1, 1, 4, 64, 8, 8);
    let d = Dropout { p: 1.0, seed: SEED };
    assert!((0..4 * 64).all(|n| !d.keeps(dims, 0, 0, n / 64, n % 64)));
    let mut r = rng(11);
    let (q, k, v, d_o) = (
        random(&mut r, dims.q_elems(), 1.0),
        random(&mut r, dims.k_elems(), 1.0),
        random(&mut r, dims.v_elems(), 1.0),
        random(&mut r, dims.o_elems(), 1.0),
    );
    let opts = Attention::new()
        .dropout(1.0, SEED)
        .sinks(vec![0.5])
        .return_weights(true);
    let out = cpu::reference(&q, &k, &v, dims, &opts).unwrap();
    assert!(out.o.iter().chain(&out.weights).all(|&x| x == 0.0));
    let g = cpu::reference_backward(&q, &k, &v, &d_o, dims, &opts).unwrap();
    for x in [&g.dq, &g.dk, &g.dv] {
        assert!(x.iter().all(|&x| x == 0.0), "{x:?}");
    }
    assert!(g.dsinks.unwrap().iter().all(|x| x.is_finite()));
    let Some(gpu) = gpu() else { return };
    for path in [Path::ThreePass, Path::Fused, Path::Decode] {
        check(
            gpu,
            path,
            dims,
            &opts.clone().return_weights(false),
            12,
            2.0,
        );
    }
}
