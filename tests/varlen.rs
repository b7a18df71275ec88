//! Packed variable-length batches (`Attention::varlen`, FlashAttention's `cu_seqlens`): every
//! sequence's rows in one tensor, on the fused and decode paths, against the reference; the
//! reference's own packing against per-sequence calls; no row written past its sequence.

mod common;

use common::{O_ATOL, O_RTOL, assert_close, random, rel_norm_error, rng};
use wgpu_attention::{Attention, Causal, DType, Dims, Error, Layout, Output, Path, cpu};

/// Offsets of sequences of `lens` rows.
fn offsets(lens: &[usize]) -> Vec<u32> {
    let mut cu = vec![0u32];
    for &l in lens {
        cu.push(cu.last().unwrap() + l as u32);
    }
    cu
}

/// The packed dims and the logical ones (the longest sequences).
fn dims_of(q_lens: &[usize], k_lens: &[usize], heads: usize, kv_heads: usize, d: usize) -> Dims {
    Dims {
        batch: q_lens.len(),
        heads,
        kv_heads,
        q_len: *q_lens.iter().max().unwrap(),
        kv_len: *k_lens.iter().max().unwrap(),
        head_dim: d,
        v_head_dim: d + 8,
    }
}

/// Packed physical shape of `total` rows of `heads` heads of `width` in `layout`.
fn packed(layout: Layout, total: usize, heads: usize, width: usize) -> [usize; 4] {
    layout.dims(1, heads, total, width)
}

#[allow(clippy::too_many_arguments)]
fn check(
    q_lens: &[usize],
    k_lens: &[usize],
    (heads, kv_heads, hd): (usize, usize, usize),
    layout: Layout,
    path: Path,
    opts: &Attention,
    kv_dtype: DType,
    seed: u64,
) {
    let Some(gpu) = common::gpu() else { return };
    let d = dims_of(q_lens, k_lens, heads, kv_heads, hd);
    let (cq, ck) = (offsets(q_lens), offsets(k_lens));
    let (tq, tk) = (q_lens.iter().sum::<usize>(), k_lens.iter().sum::<usize>());
    let opts = opts.clone().layout(layout).varlen(cq, ck).path(path);
    let mut r = rng(seed);
    let round = |x: Vec<f32>| -> Vec<f32> { x.into_iter().map(|v| kv_dtype.round(v)).collect() };
    let q = random(&mut r, tq * heads * hd, 2.0);
    let k = round(random(&mut r, tk * kv_heads * hd, 1.0));
    let v = round(random(&mut r, tk * kv_heads * d.v_head_dim, 1.0));
    let want = cpu::reference(&q, &k, &v, d, &opts).expect("reference");
    let gq = gpu.upload(&q, packed(layout, tq, heads, hd)).unwrap();
    let gk = gpu
        .upload_as(&k, packed(layout, tk, kv_heads, hd), kv_dtype)
        .unwrap();
    let gv = gpu
        .upload_as(&v, packed(layout, tk, kv_heads, d.v_head_dim), kv_dtype)
        .unwrap();
    let ctx = format!("[{path:?} {layout:?} {kv_dtype:?}] q {q_lens:?} k {k_lens:?} seed {seed}");
    let shapes = (
        packed(layout, tq, heads, d.v_head_dim),
        [d.batch, heads, d.q_len, 1],
    );
    common::run_poisoned_and_check(gpu, &opts, (&gq, &gk, &gv), shapes, &want, &ctx);
}

/// A mask mod and a score mod on a packed batch: places count within each sequence, and the
/// lengths accessors give each sequence's own lengths.
#[test]
fn packed_score_mod() {
    let (q_lens, k_lens) = ([5usize, 33, 1, 70], [40usize, 33, 70, 65]);
    let m = wgpu_attention::ScoreMod::new()
        .mask_wgsl("return (i + j) % 4u != 2u && j + 2u < attn_kv_len(b) && attn_q_len(b) > 0u;")
        .mask_cpu(move |b, _, i, j| (i + j) % 4 != 2 && j + 2 < k_lens[b])
        .score_wgsl("return s - 0.01 * f32(attn_q_len(b) + i) * attn_data_f32(h);")
        .score_cpu(move |s, b, h, i, _| s - 0.01 * (q_lens[b] + i) as f64 * [1.0, 2.0][h])
        .data_f32(&[1.0, 2.0]);
    let opts = Attention::new().score_mod(m).causal(Causal::BottomRight);
    for (n, path) in [Path::Fused, Path::Decode].into_iter().enumerate() {
        check(
            &q_lens,
            &k_lens,
            (2, 1, 24),
            Layout::Bshd,
            path,
            &opts,
            DType::F32,
            500 + n as u64,
        );
    }
}

#[test]
fn the_reference_packs_per_sequence_calls() {
    let q_lens = [5, 0, 17, 1];
    let k_lens = [9, 4, 17, 30];
    let (h, hkv, hd) = (4, 2, 8);
    let d = dims_of(&q_lens, &k_lens, h, hkv, hd);
    for layout in [Layout::Bshd, Layout::Bhsd] {
        let (tq, tk): (usize, usize) = (q_lens.iter().sum(), k_lens.iter().sum());
        let mut r = rng(1);
        let q = random(&mut r, tq * h * hd, 1.0);
        let k = random(&mut r, tk * hkv * hd, 1.0);
        let v = random(&mut r, tk * hkv * (hd + 8), 1.0);
        let base = Attention::new()
            .layout(layout)
            .causal(Causal::BottomRight)
            .window(6, 0);
        let got = cpu::reference(
            &q,
            &k,
            &v,
            d,
            &base.clone().varlen(offsets(&q_lens), offsets(&k_lens)),
        )
        .unwrap();
        let fast = cpu::fast(
            &q,
            &k,
            &v,
            d,
            &base.clone().varlen(offsets(&q_lens), offsets(&k_lens)),
        )
        .unwrap();
        assert_close("cpu::fast, packed", &fast.o, &got.o, O_ATOL, O_RTOL);
        // Each sequence on its own, from its rows of the packed tensors.
        let take = |x: &[f32], cu: &[u32], b: usize, heads: usize, w: usize| -> Vec<f32> {
            let total = *cu.last().unwrap() as usize;
            let (s, e) = (cu[b] as usize, cu[b + 1] as usize);
            let mut out = Vec::new();
            match layout {
                Layout::Bshd => out.extend_from_slice(&x[s * heads * w..e * heads * w]),
                Layout::Bhsd => {
                    for hh in 0..heads {
                        out.extend_from_slice(&x[(hh * total + s) * w..(hh * total + e) * w]);
                    }
                }
            }
            out
        };
        let (cq, ck) = (offsets(&q_lens), offsets(&k_lens));
        for b in 0..q_lens.len() {
            if q_lens[b] == 0 {
                continue;
            }
            let one = Dims {
                batch: 1,
                q_len: q_lens[b],
                kv_len: k_lens[b],
                ..d
            };
            let want = cpu::reference(
                &take(&q, &cq, b, h, hd),
                &take(&k, &ck, b, hkv, hd),
                &take(&v, &ck, b, hkv, hd + 8),
                one,
                &base,
            )
            .unwrap();
            assert_eq!(
                take(&got.o, &cq, b, h, hd + 8),
                want.o,
                "sequence {b}, {layout:?}"
            );
            for hh in 0..h {
                let row = &got.lse[(b * h + hh) * d.q_len..][..d.q_len];
                assert_eq!(&row[..q_lens[b]], &want.lse[hh * q_lens[b]..][..q_lens[b]]);
                assert!(row[q_lens[b]..].iter().all(|&x| x == f32::NEG_INFINITY));
            }
        }
    }
}

#[test]
fn prefill_of_packed_prompts() {
    let mut seed = 10;
    for (q_lens, k_lens) in [
        (vec![37, 1, 70, 0, 5], vec![37, 1, 70, 0, 5]),
        (vec![3, 64, 129], vec![100, 64, 200]),
    ] {
        for layout in [Layout::Bshd, Layout::Bhsd] {
            for path in [Path::Fused, Path::Decode, Path::Auto] {
                seed += 1;
                let opts = Attention::new().causal(Causal::BottomRight);
                check(
                    &q_lens,
                    &k_lens,
                    (4, 2, 24),
                    layout,
                    path,
                    &opts,
                    DType::F32,
                    seed,
                );
            }
        }
    }
}

#[test]
fn packed_decoding_and_options() {
    let mut r = rng(30);
    // One query per sequence over long and short caches: the decode path splits the keys.
    let q_lens = [1, 1, 1, 1];
    let k_lens = [1100, 3, 0, 700];
    for (n, opts) in [
        Attention::new().causal(Causal::BottomRight),
        Attention::new()
            .sinks(random(&mut r, 8, 2.0))
            .alibi(common::positive(random(&mut r, 8, 0.01))),
        Attention::new()
            .window(100, 0)
            .causal(Causal::BottomRight)
            .sink_keys(4),
    ]
    .iter()
    .enumerate()
    {
        for path in [Path::Decode, Path::Fused] {
            check(
                &q_lens,
                &k_lens,
                (8, 2, 64),
                Layout::Bshd,
                path,
                opts,
                DType::F32,
                40 + n as u64,
            );
        }
    }
    let mask_shape = [1, 1, 20, 33];
    let mask = common::random_mask(&mut r, 20 * 33, 0.7);
    let masked = Attention::new().mask(mask_shape, mask).softcap(5.0);
    check(
        &[20, 7],
        &[33, 12],
        (2, 1, 16),
        Layout::Bshd,
        Path::Fused,
        &masked,
        DType::F32,
        50,
    );
    for (n, dtype) in [DType::F16, DType::Bf16].into_iter().enumerate() {
        let opts = Attention::new().causal(Causal::BottomRight);
        check(
            &[1, 2],
            &[1300, 40],
            (8, 2, 64),
            Layout::Bshd,
            Path::Decode,
            &opts,
            dtype,
            60 + n as u64,
        );
        check(
            &[30, 9],
            &[50, 9],
            (4, 4, 32),
            Layout::Bhsd,
            Path::Fused,
            &opts,
            dtype,
            62 + n as u64,
        );
    }
}

/// Dropout on packed sequences: each weight's row and key count within its sequence (the
/// reference runs the sequences padded), on the fused and decode paths (the three-pass path
/// takes no packed batches).
#[test]
fn packed_dropout() {
    let opts = Attention::new()
        .dropout(0.4, 31)
        .causal(Causal::BottomRight);
    for (n, path) in [Path::Fused, Path::Decode].into_iter().enumerate() {
        check(
            &[20, 1, 7],
            &[33, 1100, 12],
            (4, 2, 16),
            Layout::Bshd,
            path,
            &opts,
            DType::F32,
            70 + n as u64,
        );
    }
}

#[test]
fn bad_offsets_are_typed_errors() {
    let d = Dims {
        batch: 2,
        heads: 2,
        kv_heads: 2,
        q_len: 4,
        kv_len: 5,
        head_dim: 8,
        v_head_dim: 8,
    };
    let q = vec![0.5f32; 6 * 2 * 8];
    let k = vec![0.5f32; 8 * 2 * 8];
    let run = |cq: Vec<u32>, ck: Vec<u32>| {
        cpu::reference(
            &q,
            &k,
            &k,
            d,
            &Attention::new().layout(Layout::Bshd).varlen(cq, ck),
        )
    };
    assert!(run(vec![0, 2, 6], vec![0, 3, 8]).is_ok());
    let e = run(vec![0, 2], vec![0, 3, 8]).unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e:?}");
    let e = run(vec![1, 2, 6], vec![0, 3, 8]).unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidOption {
                what: "cu_seqlens_q",
                ..
            }
        ),
        "{e:?}"
    );
    let e = run(vec![0, 3, 2], vec![0, 3, 8]).unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidOption {
                what: "cu_seqlens_q",
                ..
            }
        ),
        "{e:?}"
    );
    let e = run(vec![0, 2, 6], vec![0, 1, 8]).unwrap_err();
    assert!(
        matches!(
            e,
            Error::LengthOutOfRange {
                what: "cu_seqlens_k",
                index: 1,
                value: 7,
                max: 5
            }
        ),
        "{e:?}"
    );
    // Not ending at the total: the data is too short or too long for the offsets.
    let e = run(vec![0, 2, 5], vec![0, 3, 8]).unwrap_err();
    assert!(
        matches!(
            e,
            Error::DataLength {
                what: "packed Q",
                ..
            }
        ),
        "{e:?}"
    );
    for opts in [
        Attention::new().kv_lens(vec![1, 1]),
        Attention::new().path(Path::ThreePass),
        Attention::new().return_weights(true),
        Attention::new().paged(5, vec![0, 0]),
    ] {
        let e = cpu::reference(
            &q,
            &k,
            &k,
            d,
            &opts
                .layout(Layout::Bshd)
                .varlen(vec![0, 2, 6], vec![0, 3, 8]),
        )
        .unwrap_err();
        assert!(
            matches!(e, Error::InvalidOption { what: "varlen", .. }),
            "{e:?}"
        );
    }

    let Some(gpu) = common::gpu() else { return };
    let gq = gpu.upload(&q, [1, 6, 2, 8]).unwrap();
    let gk = gpu.upload(&k, [1, 8, 2, 8]).unwrap();
    let opts = Attention::new().layout(Layout::Bshd);
    // Offsets that end past the tensors' rows.
    let e = opts
        .clone()
        .varlen(vec![0, 2, 7], vec![0, 3, 8])
        .run(gpu, &gq, &gk, &gk)
        .unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e:?}");
    let e = opts
        .clone()
        .varlen(vec![0, 2, 6], vec![0, 3, 8])
        .path(Path::ThreePass)
        .run(gpu, &gq, &gk, &gk)
        .unwrap_err();
    assert!(
        matches!(e, Error::InvalidOption { what: "varlen", .. }),
        "{e:?}"
    );
    let out = opts
        .varlen(vec![0, 2, 6], vec![0, 3, 8])
        .run(gpu, &gq, &gk, &gk)
        .unwrap();
    assert_eq!(out.o.dims(), [1, 6, 2, 8]);
}

/// Several passes of the fused kernel (more key tiles than lavapipe's loop limit lets one
/// workgroup stream) with a half-precision O: the passes merge in a packed f32 copy, which the
/// last dispatch converts into O row by row of each sequence.
#[test]
fn packed_passes_into_a_half_output() {
    let Some(gpu) = common::gpu() else { return };
    let (q_lens, k_lens) = ([3usize, 40], [2500usize, 2100]);
    let (h, hkv, hd) = (2, 1, 16);
    let d = dims_of(&q_lens, &k_lens, h, hkv, hd);
    let (tq, tk): (usize, usize) = (q_lens.iter().sum(), k_lens.iter().sum());
    let mut r = rng(80);
    let half = |x: Vec<f32>| -> Vec<f32> { x.into_iter().map(|v| DType::F16.round(v)).collect() };
    let q = half(random(&mut r, tq * h * hd, 2.0));
    let k = half(random(&mut r, tk * hkv * hd, 1.0));
    let v = half(random(&mut r, tk * hkv * (hd + 8), 1.0));
    let opts = Attention::new()
        .layout(Layout::Bshd)
        .causal(Causal::BottomRight)
        .varlen(offsets(&q_lens), offsets(&k_lens))
        .path(Path::Fused);
    let plan = opts.plan(gpu, d).unwrap();
    // Several passes on loop-capped devices like lavapipe (the case this test is for); one
    // elsewhere, where the test still checks a half output.
    if let wgpu_attention::Plan::Fused { plan: p, .. } = &plan {
        eprintln!("{} pass(es)", p.passes);
        if gpu.adapter_info().device_type == wgpu::DeviceType::Cpu {
            assert!(p.passes > 1, "{}", plan.reason());
        }
    }
    let want = cpu::reference(&q, &k, &v, d, &opts).unwrap();
    let gq = gpu.upload_as(&q, [1, tq, h, hd], DType::F16).unwrap();
    let gk = gpu.upload_as(&k, [1, tk, hkv, hd], DType::F16).unwrap();
    let gv = gpu.upload_as(&v, [1, tk, hkv, hd + 8], DType::F16).unwrap();
    let out = Output {
        o: gpu
            .upload_as(
                &vec![f32::NAN; tq * h * (hd + 8)],
                [1, tq, h, hd + 8],
                DType::F16,
            )
            .unwrap(),
        lse: None,
        weights: None,
    };
    opts.run_into(gpu, &gq, &gk, &gv, &out).unwrap();
    let o = out.o.download(gpu).unwrap();
    assert_close(
        &format!("O ({})", plan.reason()),
        &o,
        &want.o,
        1e-3,
        1.0 / 512.0,
    );
    assert!(rel_norm_error(&o, &want.o) <= 3e-3);
}

/// A packed batch is checked at its packed size: 127 sequences of 100 tokens beside one of
/// 8192 fit 32-bit indices packed (85.6M elements of Q) though not padded (4.3G).
#[test]
fn packed_sizes_are_checked_packed() {
    let mut lens = vec![100usize; 127];
    lens.push(8192);
    let cu = offsets(&lens);
    let d = Dims {
        batch: 128,
        heads: 32,
        kv_heads: 8,
        q_len: 8192,
        kv_len: 8192,
        head_dim: 128,
        v_head_dim: 128,
    };
    let padded = Attention::new().layout(Layout::Bshd);
    assert!(matches!(
        padded.validate(d),
        Err(Error::TooLarge { what: "Q", .. })
    ));
    let packed = padded.varlen(cu.clone(), cu);
    packed.validate(d).unwrap();
}

/// Random packed batches: 1 to 5 sequences of 0 to 40 query rows over 0 to 60 keys (at least
/// one sequence non-empty), random options, both layouts, on the fused and decode paths.
#[test]
fn proptest_random_packed_batches() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, RngSeed, TestRunner};
    if common::gpu().is_none() {
        return;
    }
    let mut runner = TestRunner::new(Config {
        cases: 24,
        rng_seed: RngSeed::Fixed(0x7a41),
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = (
        proptest::collection::vec((0usize..=40, 0usize..=60), 1..=5),
        (
            1usize..=2,
            1usize..=3,
            any::<bool>(),
            0usize..4,
            any::<bool>(),
        ),
        any::<u64>(),
    );
    runner
        .run(
            &strategy,
            |(mut seqs, (kv_heads, group, bshd, option, decode), seed)| {
                seqs[0].0 = seqs[0].0.max(1);
                seqs[0].1 = seqs[0].1.max(1);
                let q_lens: Vec<usize> = seqs.iter().map(|s| s.0).collect();
                let k_lens: Vec<usize> = seqs.iter().map(|s| s.1).collect();
                let heads = kv_heads * group;
                let mut r = rng(seed);
                let opts = match option {
                    0 => Attention::new().causal(Causal::BottomRight),
                    1 => Attention::new().causal(Causal::TopLeft).window(5, 2),
                    2 => Attention::new()
                        .sinks(random(&mut r, heads, 2.0))
                        .alibi(common::positive(random(&mut r, heads, 0.2))),
                    _ => Attention::new(),
                };
                let layout = if bshd { Layout::Bshd } else { Layout::Bhsd };
                let path = if decode { Path::Decode } else { Path::Fused };
                check(
                    &q_lens,
                    &k_lens,
                    (heads, kv_heads, 16),
                    layout,
                    path,
                    &opts,
                    DType::F32,
                    seed,
                );
                Ok(())
            },
        )
        .unwrap();
}
