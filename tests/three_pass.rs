//! The three-pass path (QK^T, masked softmax, P·V) against the f64 reference: O, the weights and
//! the log-sum-exp, element by element, with every output buffer poisoned with NaN first.

mod common;

use common::{Case, check, dims, gpu, random, random_mask, rng};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestRunner};
use rand::Rng;
use wgpu_attention::{Attention, Causal, Dims, Layout, LimitCaps, Output, Plan, cpu};

fn run_cases(cases: &[Case], seed: u64) {
    let Some(gpu) = gpu() else { return };
    for (n, case) in cases.iter().enumerate() {
        check(gpu, case.dims, &case.opts, seed + n as u64, case.amp);
    }
}

#[test]
fn lengths_every_pair() {
    run_cases(&common::grid_lengths(), 100);
}

#[test]
fn head_dims_1_to_256_and_v_head_dim() {
    run_cases(&common::grid_head_dims(), 200);
}

#[test]
fn batches_heads_gqa_mqa_layouts() {
    run_cases(&common::grid_heads(), 300);
}

#[test]
fn causal_both_alignments() {
    run_cases(&common::grid_causal(), 400);
}

#[test]
fn mask_and_bias_broadcast_every_way() {
    run_cases(&common::grid_broadcast(5), 500);
}

#[test]
fn mask_bias_causal_softcap_together() {
    let Some(gpu) = gpu() else { return };
    let d = dims(2, 4, 2, 33, 100, 64, 40);
    let mut r = rng(6);
    let opts = Attention::new()
        .causal(Causal::BottomRight)
        .mask([2, 1, 33, 100], random_mask(&mut r, 2 * 33 * 100, 0.8))
        .bias([1, 4, 1, 100], random(&mut r, 400, 2.0))
        .softcap(20.0)
        .layout(Layout::Bshd);
    check(gpu, d, &opts, 600, 30.0);
}

#[test]
fn kv_lens_including_zero_and_q_lens() {
    let Some(gpu) = gpu() else { return };
    let d = dims(3, 2, 1, 33, 100, 40, 40);
    check(
        gpu,
        d,
        &Attention::new().kv_lens(vec![0, 57, 100]),
        700,
        1.0,
    );
    check(gpu, d, &Attention::new().q_lens(vec![33, 0, 17]), 701, 1.0);
    check(
        gpu,
        d,
        &Attention::new()
            .kv_lens(vec![1, 100, 64])
            .q_lens(vec![5, 33, 20])
            .causal(Causal::BottomRight),
        702,
        1.0,
    );
    let d = dims(2, 2, 2, 100, 7, 8, 8);
    check(
        gpu,
        d,
        &Attention::new().kv_lens(vec![3, 0]).causal(Causal::TopLeft),
        703,
        1.0,
    );
}

#[test]
fn softcap() {
    let Some(gpu) = gpu() else { return };
    for (n, cap) in [1.0f32, 5.0, 50.0].into_iter().enumerate() {
        check(
            gpu,
            dims(1, 2, 2, 33, 257, 64, 64),
            &Attention::new().softcap(cap),
            800 + n as u64,
            30.0,
        );
    }
}

#[test]
fn logits_scaled_30x() {
    let Some(gpu) = gpu() else { return };
    check(
        gpu,
        dims(2, 4, 4, 100, 257, 128, 64),
        &Attention::new(),
        900,
        30.0,
    );
    check(
        gpu,
        dims(1, 8, 2, 257, 100, 256, 32),
        &Attention::new().causal(Causal::TopLeft),
        901,
        30.0,
    );
    check(
        gpu,
        dims(1, 2, 2, 7, 33, 40, 40),
        &Attention::new().scale(1.0),
        902,
        30.0,
    );
}

#[test]
fn fully_masked_rows_give_zeros_and_minus_inf() {
    let Some(gpu) = gpu() else { return };
    // Rows 0, 3 and 6 have no allowed key; the others keep a random half.
    let d = dims(1, 2, 2, 7, 33, 8, 8);
    let mut r = rng(10);
    let mut mask = random_mask(&mut r, 7 * 33, 0.5);
    for i in [0, 3, 6] {
        mask[i * 33..(i + 1) * 33].fill(false);
    }
    check(
        gpu,
        d,
        &Attention::new().mask([1, 1, 7, 33], mask.clone()),
        1000,
        1.0,
    );
    // Bottom-right causal with q_len > kv_len leaves the first q_len - kv_len rows empty.
    check(
        gpu,
        dims(1, 2, 2, 100, 33, 8, 8),
        &Attention::new().causal(Causal::BottomRight),
        1001,
        1.0,
    );
    // And the reference agrees on what that means.
    let q = random(&mut r, 2 * 7 * 8, 1.0);
    let k = random(&mut r, 2 * 33 * 8, 1.0);
    let want = cpu::reference(&q, &k, &k, d, &Attention::new().mask([1, 1, 7, 33], mask)).unwrap();
    assert!(want.o[..8].iter().all(|&x| x == 0.0));
    assert_eq!(want.lse[0], f32::NEG_INFINITY);
}

/// Outputs not asked for are not written, and leaving them out changes nothing else.
#[test]
fn optional_outputs() {
    let Some(gpu) = gpu() else { return };
    let d = dims(2, 2, 1, 33, 100, 40, 24);
    let mut r = rng(11);
    let (q, k, v) = (
        random(&mut r, d.q_elems(), 1.0),
        random(&mut r, d.k_elems(), 1.0),
        random(&mut r, d.v_elems(), 1.0),
    );
    let (tq, tk, tv) = (
        gpu.upload(&q, d.q_shape(Layout::Bhsd)).unwrap(),
        gpu.upload(&k, d.k_shape(Layout::Bhsd)).unwrap(),
        gpu.upload(&v, d.v_shape(Layout::Bhsd)).unwrap(),
    );
    let opts = Attention::new()
        .causal(Causal::TopLeft)
        .kv_lens(vec![50, 100]);
    let want = cpu::reference(&q, &k, &v, d, &opts).unwrap();
    for (lse, weights) in [(false, false), (true, false), (false, true), (true, true)] {
        let out = opts
            .clone()
            .return_lse(lse)
            .return_weights(weights)
            .run(gpu, &tq, &tk, &tv)
            .unwrap();
        assert_eq!(out.lse.is_some(), lse);
        assert_eq!(out.weights.is_some(), weights);
        let o = out.o.download(gpu).unwrap();
        common::assert_close("O", &o, &want.o, common::O_ATOL, common::O_RTOL);
        if let Some(t) = out.lse {
            common::assert_close("lse", &t.download(gpu).unwrap(), &want.lse, 2e-5, 2e-5);
        }
        if let Some(t) = out.weights {
            common::assert_close(
                "weights",
                &t.download(gpu).unwrap(),
                &want.weights,
                1e-6,
                1e-4,
            );
        }
    }
}

fn chunks(gpu: &wgpu_attention::Gpu, d: Dims, opts: &Attention) -> usize {
    let Plan::ThreePass(plan) = opts.plan(gpu, d).unwrap() else {
        unreachable!()
    };
    plan.chunks.len()
}

/// A capped storage binding forces chunking over (batch, head), then over query rows.
#[test]
fn chunked_under_a_small_storage_binding() {
    let Some(gpu) = gpu() else { return };
    let d = dims(2, 3, 1, 100, 257, 40, 24);
    // One (batch, head) of scores is 100 * 257 * 4 = 102800 bytes.
    let two_heads = gpu.with_caps(LimitCaps {
        max_storage_binding: Some(2 * 102_800 + 100),
        ..Default::default()
    });
    let opts = Attention::new()
        .causal(Causal::BottomRight)
        .layout(Layout::Bshd);
    assert_eq!(chunks(&two_heads, d, &opts), 3);
    check(&two_heads, d, &opts, 1100, 1.0);
    // Less than one (batch, head): chunks of 9 query rows each (9 * 257 * 4 = 9252 bytes);
    // the inputs, mask included, must still fit one binding, so keep them small.
    let d = dims(2, 2, 1, 100, 257, 2, 3);
    let rows9 = gpu.with_caps(LimitCaps {
        max_storage_binding: Some(9300),
        ..Default::default()
    });
    assert_eq!(chunks(&rows9, d, &Attention::new()), 4 * 12);
    let mut r = rng(12);
    let opts = Attention::new()
        .mask([2, 1, 1, 257], random_mask(&mut r, 2 * 257, 0.6))
        .causal(Causal::TopLeft);
    check(&rows9, d, &opts, 1101, 30.0);
}

/// A capped workgroup count forces the dispatch to spill into y and z, and then to chunk.
#[test]
fn spilled_and_chunked_under_a_small_workgroup_limit() {
    let Some(gpu) = gpu() else { return };
    let d = dims(2, 4, 2, 100, 130, 40, 72);
    // 8 (batch, head) x 100 rows = 800 softmax workgroups: 10^3 allows one chunk, spilled to z.
    let spill = gpu.with_caps(LimitCaps {
        max_workgroups_per_dim: Some(10),
        ..Default::default()
    });
    assert_eq!(chunks(&spill, d, &Attention::new()), 1);
    check(
        &spill,
        d,
        &Attention::new().causal(Causal::TopLeft),
        1200,
        1.0,
    );
    // 5^3 = 125 workgroups: chunks of one (batch, head) and up to 125 rows... 100 rows fit.
    let tiny = gpu.with_caps(LimitCaps {
        max_workgroups_per_dim: Some(5),
        ..Default::default()
    });
    assert_eq!(chunks(&tiny, d, &Attention::new()), 8);
    check(&tiny, d, &Attention::new(), 1201, 1.0);
    // 4^3 = 64 workgroups: fewer than 100 rows per chunk.
    let tinier = gpu.with_caps(LimitCaps {
        max_workgroups_per_dim: Some(4),
        ..Default::default()
    });
    assert_eq!(chunks(&tinier, d, &Attention::new()), 16);
    check(
        &tinier,
        d,
        &Attention::new().return_weights(true),
        1202,
        1.0,
    );
}

/// Weights larger than one binding are still returned, copied chunk by chunk.
#[test]
fn weights_bigger_than_a_binding() {
    let Some(gpu) = gpu() else { return };
    let d = dims(1, 4, 4, 33, 100, 8, 8);
    let capped = gpu.with_caps(LimitCaps {
        max_storage_binding: Some(33 * 100 * 4),
        ..Default::default()
    });
    assert_eq!(chunks(&capped, d, &Attention::new()), 4);
    check(
        &capped,
        d,
        &Attention::new().causal(Causal::TopLeft),
        1300,
        1.0,
    );
}

/// Random configurations: every option, sizes that are not multiples of the tiles.
#[test]
fn proptest_random_configurations() {
    let Some(gpu) = gpu() else { return };
    let cases: u32 = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let mut runner = TestRunner::new(Config {
        cases,
        rng_seed: RngSeed::Fixed(0x5eed_a77e),
        failure_persistence: None,
        ..Config::default()
    });
    let groups = prop_oneof![Just(1usize), Just(2), Just(4)];
    let strategy = (
        (1usize..=3, 1usize..=4, groups, 1usize..=80, 1usize..=120),
        (
            1usize..=96,
            1usize..=96,
            any::<bool>(),
            0usize..3,
            0usize..16,
        ),
        (
            0usize..16,
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            any::<u64>(),
        ),
    );
    runner
        .run(
            &strategy,
            |(
                (b, hkv, g, l, s),
                (dd, dv, bshd, causal, mask_pat),
                (bias_pat, softcap, kv_lens, q_lens, big, seed),
            )| {
                let d = Dims {
                    batch: b,
                    heads: hkv * g,
                    kv_heads: hkv,
                    q_len: l,
                    kv_len: s,
                    head_dim: dd,
                    v_head_dim: dv,
                };
                let mut r = rng(seed);
                let mut opts =
                    Attention::new().layout(if bshd { Layout::Bshd } else { Layout::Bhsd });
                opts = match causal {
                    1 => opts.causal(Causal::TopLeft),
                    2 => opts.causal(Causal::BottomRight),
                    _ => opts,
                };
                // Pattern 0 (all broadcast) stands for "no mask" / "no bias".
                if mask_pat != 0 {
                    let shape = common::broadcast_shape(d, mask_pat);
                    opts = opts.mask(shape, random_mask(&mut r, shape.iter().product(), 0.75));
                }
                if bias_pat != 0 {
                    let shape = common::broadcast_shape(d, bias_pat);
                    opts = opts.bias(shape, random(&mut r, shape.iter().product(), 2.0));
                }
                if softcap {
                    opts = opts.softcap(10.0);
                }
                if kv_lens {
                    opts = opts.kv_lens((0..b).map(|_| r.random_range(0..=s as u32)).collect());
                }
                if q_lens {
                    opts = opts.q_lens((0..b).map(|_| r.random_range(0..=l as u32)).collect());
                }
                check(gpu, d, &opts, seed, if big { 30.0 } else { 1.0 });
                Ok(())
            },
        )
        .unwrap();
}

/// The device API: inputs and outputs wrapped around buffers the application owns.
#[test]
fn tensors_wrap_application_buffers() {
    let Some(gpu) = gpu() else { return };
    let d = Dims::new(1, 2, 7, 8);
    let mut r = rng(13);
    let x = random(&mut r, d.q_elems(), 1.0);
    let buffer = wgpu::util::DeviceExt::create_buffer_init(
        gpu.device(),
        &wgpu::util::BufferInitDescriptor {
            label: Some("app buffer"),
            contents: bytemuck::cast_slice(&x),
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
        },
    );
    let t = wgpu_attention::Tensor::from_buffer(
        buffer,
        d.q_shape(Layout::Bhsd),
        wgpu_attention::DType::F32,
    )
    .unwrap();
    let out = Output {
        o: common::poisoned(gpu, d.o_shape(Layout::Bhsd)),
        lse: None,
        weights: None,
    };
    Attention::new().run_into(gpu, &t, &t, &t, &out).unwrap();
    let want = cpu::reference(&x, &x, &x, d, &Attention::new()).unwrap();
    common::assert_close(
        "O",
        &out.o.download(gpu).unwrap(),
        &want.o,
        common::O_ATOL,
        common::O_RTOL,
    );
}
