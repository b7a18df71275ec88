//! The three-pass path (QK^T, masked softmax, P·V) against the f64 reference: O, the weights and
//! the log-sum-exp, element by element, with every output buffer poisoned with NaN first.

#[macro_use]
mod common;

use wgpu_attention::{LimitCaps, Output, Path, Plan};

path_grid_tests!(Path::ThreePass);

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
    let Plan::ThreePass { plan, .. } = opts.clone().path(Path::ThreePass).plan(gpu, d).unwrap()
    else {
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
    check(&two_heads, Path::ThreePass, d, &opts, 1100, 1.0);
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
    check(&rows9, Path::ThreePass, d, &opts, 1101, 30.0);
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
        Path::ThreePass,
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
    check(&tiny, Path::ThreePass, d, &Attention::new(), 1201, 1.0);
    // 4^3 = 64 workgroups: fewer than 100 rows per chunk.
    let tinier = gpu.with_caps(LimitCaps {
        max_workgroups_per_dim: Some(4),
        ..Default::default()
    });
    assert_eq!(chunks(&tinier, d, &Attention::new()), 16);
    check(
        &tinier,
        Path::ThreePass,
        d,
        &Attention::new().return_weights(true),
        1202,
        1.0,
    );
}

/// On a device that caps loop iterations (llvmpipe), a key range the three-pass kernels cannot
/// finish in one invocation is a typed error, not silently dropped keys.
#[test]
fn too_many_keys_for_a_capped_device() {
    let Some(gpu) = gpu() else { return };
    let capped = gpu.with_caps(LimitCaps {
        max_key_tiles_per_workgroup: Some(32),
        ..Default::default()
    });
    let opts = Attention::new().path(Path::ThreePass);
    let ok = opts.plan(&capped, dims(1, 1, 1, 1, 524_288, 4, 4));
    assert!(ok.is_ok(), "{ok:?}");
    let err = opts.plan(&capped, dims(1, 1, 1, 1, 524_289, 4, 4));
    assert!(
        matches!(
            err,
            Err(wgpu_attention::Error::TooLarge { max: 524_288, .. })
        ),
        "{err:?}"
    );
    // The fused path has no such limit.
    assert!(
        Attention::new()
            .path(Path::Fused)
            .plan(&capped, dims(1, 1, 1, 1, 524_289, 4, 4))
            .is_ok()
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
        Path::ThreePass,
        d,
        &Attention::new().causal(Causal::TopLeft),
        1300,
        1.0,
    );
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
        gpu,
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

/// Every invocation block of the tile products (4 x 4, 8 x 4, 8 x 8) on shapes that fill no
/// tile exactly, O, weights and log-sum-exp checked, with a key range long enough for the
/// `P·V` kernel's two-level sums and every per-key option.
#[test]
fn every_gemm_block() {
    use wgpu_attention::TileBlock;
    let Some(base) = gpu() else { return };
    let mut r = rng(31);
    // (heads, kv_heads, q_len, kv_len, head_dim, v_head_dim)
    let shapes = [
        (2, 2, 70, 130, 72, 72),
        (2, 1, 65, 300, 40, 130),
        (1, 1, 9, 5000, 7, 3),
    ];
    for block in TileBlock::ALL {
        let g = base
            .with_blocks(base.tile_config().fused_block, block)
            .unwrap();
        for (n, &(h, hkv, l, s, d, dv)) in shapes.iter().enumerate() {
            let seed = 3100 + 100 * block.rows as u64 + 10 * block.cols as u64 + n as u64;
            let dm = dims(2, h, hkv, l, s, d, dv);
            let opts = Attention::new()
                .causal(Causal::BottomRight)
                .kv_lens(vec![s as u32, s as u32 - 37]);
            check(&g, Path::ThreePass, dm, &opts, seed, 1.0);
            let masked = Attention::new()
                .window(40, 7)
                .softcap(20.0)
                .mask([2, 1, l, s], random_mask(&mut r, 2 * l * s, 0.8))
                .bias([1, h, 1, s], random(&mut r, h * s, 2.0));
            check(&g, Path::ThreePass, dm, &masked, seed + 1, 3.0);
        }
    }
}
