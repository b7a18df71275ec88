//! The fused flash-attention path against the f64 reference: O and the log-sum-exp, element by
//! element, every output poisoned with NaN first; plus what makes it the long-sequence path.

#[macro_use]
mod common;

use wgpu_attention::{DType, Output, Path, Plan};

path_grid_tests!(Path::Fused);

/// The row maxima and sums of every block both ways: by subgroup shuffles (where the device
/// has subgroups; on lavapipe, subgroups of 8 fit the 8 invocations of an 8 x 8 block's rows,
/// while the 16 of 4 x 4 and 8 x 4 take the kernel's workgroup-memory fallback) and through
/// workgroup memory only, in one and in several passes, on rows and keys that fill no tile.
#[test]
fn row_reductions_both_ways() {
    use wgpu_attention::{LimitCaps, TileBlock};
    let Some(base) = gpu() else { return };
    let kernel = base.tile_config().decode_kernel;
    let mut ways = vec![(false, base.with_decode_kernel(kernel, false).unwrap())];
    if base.limits().tile.subgroups {
        ways.push((true, base.with_decode_kernel(kernel, true).unwrap()));
    } else {
        assert!(!base.features().contains(wgpu::Features::SUBGROUP));
    }
    let dm = dims(2, 3, 1, 90, 150, 40, 72);
    let opts = Attention::new()
        .causal(Causal::BottomRight)
        .softcap(15.0)
        .kv_lens(vec![150, 101]);
    for (subgroups, g) in ways {
        assert_eq!(g.limits().tile.subgroups, subgroups);
        for block in TileBlock::ALL {
            let g = g.with_blocks(block, g.tile_config().gemm_block).unwrap();
            let seed = 3300 + 10 * block.rows as u64 + block.cols as u64 + subgroups as u64;
            check(&g, Path::Fused, dm, &opts, seed, 2.0);
            let capped = g.with_caps(LimitCaps {
                max_key_tiles_per_workgroup: Some(1),
                ..Default::default()
            });
            check(&capped, Path::Fused, dm, &opts, seed + 100, 2.0);
        }
    }
}

/// Q resident in workgroup memory and Q staged per key tile, each against the CPU reference
/// (random inputs, NaN-poisoned outputs), on the shapes lavapipe's 32
/// KiB holds it for (64 rows up to head_dim 16; the decode path's 16-row tiles up to 80),
/// with every per-key option, several passes (cases 0, 2, 4), half storage (cases 1, 3), and
/// head dims that are not multiples of the two 16-dim slices of K a step stages.
#[test]
fn resident_q_against_staged_q() {
    use wgpu_attention::{DType, DecodeKernel, LimitCaps};
    let Some(base) = gpu() else { return };
    let mut r = rng(37);
    let tiles = base
        .with_decode_kernel(DecodeKernel::RowTiles, base.limits().tile.subgroups)
        .unwrap()
        .with_decode_rows(16)
        .unwrap();
    // (path, gpu, heads, kv_heads, q_len, kv_len, head_dim, v_head_dim)
    let cases = [
        (Path::Fused, base, 2, 1, 70, 150, 16, 24),
        (Path::Fused, base, 3, 3, 65, 90, 9, 5),
        (Path::Decode, &tiles, 12, 1, 1, 700, 80, 72),
        (Path::Decode, &tiles, 6, 2, 2, 333, 40, 40),
        (Path::Decode, &tiles, 5, 1, 3, 200, 33, 20),
    ];
    for (n, &(path, g, h, hkv, l, s, d, dv)) in cases.iter().enumerate() {
        let dm = dims(2, h, hkv, l, s, d, dv);
        let seed = 3700 + 10 * n as u64;
        let opts = Attention::new()
            .causal(Causal::BottomRight)
            .kv_lens(vec![s as u32, s as u32 - 29]);
        let masked = Attention::new()
            .window(50, 3)
            .softcap(12.0)
            .mask([2, 1, l, s], random_mask(&mut r, 2 * l * s, 0.8))
            .bias([1, h, 1, s], random(&mut r, h * s, 2.0));
        for resident in [true, false] {
            let g = g.with_resident_q(resident);
            let plan = opts.clone().path(path).plan(&g, dm).unwrap();
            let (Plan::Fused { plan: p, .. } | Plan::Decode { plan: p, .. }) = &plan else {
                panic!("{}", plan.reason())
            };
            assert!(!p.keys_across_invocations, "{}", plan.reason());
            let want = if resident { d.div_ceil(16) as u32 } else { 0 };
            assert_eq!(p.resident_q, want, "{}", plan.reason());
            let seed = seed + resident as u64;
            check(&g, path, dm, &opts, seed, 2.0);
            // The rest on resident Q only (Q staged per tile is every other test's kernel),
            // half of it on alternate cases: each key is a pipeline to compile on a cold
            // shader cache in CI.
            if !resident {
                continue;
            }
            check(&g, path, dm, &masked, seed + 2, 2.0);
            if n % 2 == 0 {
                let capped = g.with_caps(LimitCaps {
                    max_key_tiles_per_workgroup: Some(1),
                    ..Default::default()
                });
                check(&capped, path, dm, &opts, seed + 4, 1.0);
            } else {
                let types = [DType::F16, DType::Bf16, DType::F16, DType::Bf16];
                common::check_dtypes(&g, path, dm, &opts, seed + 6, 1.0, types);
            }
        }
    }
}

/// The double-buffered staging against the CPU reference (random inputs, NaN-poisoned
/// outputs) on the shapes lavapipe's 32 KiB holds a second buffer for: the decode path's
/// row-tiled kernel on 32 rows with 8 x 4 and 4 x 4 blocks (64 and 128 invocations), Q staged
/// with every slice (head_dim 40: three steps, so the last step's FMAs read buffer 0, which
/// the first slice of V then overwrites after a barrier) and resident (head_dim 16, and
/// 16-row tiles up to head_dim 72: pairs of slices, the last one half), with every per-key
/// option, several key splits and passes, half storage, and v_head_dim that fills no slice
/// of V.
#[test]
fn double_buffer_against_the_reference() {
    use wgpu_attention::{DType, DecodeKernel, LimitCaps, TileBlock};
    let Some(base) = gpu() else { return };
    let mut r = rng(41);
    let tiles = |rows: u32, block: TileBlock, resident: bool| {
        base.with_decode_kernel(DecodeKernel::RowTiles, base.limits().tile.subgroups)
            .unwrap()
            .with_decode_rows(rows)
            .unwrap()
            .with_blocks(block, base.tile_config().gemm_block)
            .unwrap()
            .with_resident_q(resident)
    };
    // (gpu, heads, kv_heads, q_len, kv_len, head_dim, v_head_dim, resident slices)
    let cases = [
        (tiles(32, TileBlock::B8X4, false), 24, 1, 1, 333, 40, 24, 0),
        (tiles(32, TileBlock::B4X4, false), 10, 2, 3, 200, 33, 70, 0),
        (tiles(32, TileBlock::B8X4, true), 6, 1, 4, 150, 16, 9, 1),
        (tiles(16, TileBlock::B4X4, true), 12, 1, 1, 500, 72, 64, 5),
        (tiles(16, TileBlock::B4X4, true), 3, 1, 5, 140, 40, 40, 3),
    ];
    for (n, (g, h, hkv, l, s, d, dv, resident)) in cases.into_iter().enumerate() {
        let dm = dims(2, h, hkv, l, s, d, dv);
        let seed = 4100 + 10 * n as u64;
        let opts = Attention::new()
            .causal(Causal::BottomRight)
            .kv_lens(vec![s as u32, s as u32 - 37]);
        let masked = Attention::new()
            .window(60, 2)
            .softcap(10.0)
            .mask([2, 1, l, s], random_mask(&mut r, 2 * l * s, 0.8))
            .bias([1, h, 1, s], random(&mut r, h * s, 2.0));
        for double in [true, false] {
            let g = g.with_double_buffer(double);
            let plan = opts.clone().path(Path::Decode).plan(&g, dm).unwrap();
            let Plan::Decode { plan: p, .. } = &plan else {
                panic!("{}", plan.reason())
            };
            assert!(!p.keys_across_invocations, "{}", plan.reason());
            assert_eq!(
                (p.double_buffer, p.resident_q),
                (double, resident),
                "{}",
                plan.reason()
            );
            check(&g, Path::Decode, dm, &opts, seed + double as u64, 2.0);
            // The rest double-buffered only (one buffer is every other test's kernel).
            if !double {
                continue;
            }
            check(&g, Path::Decode, dm, &masked, seed + 2, 2.0);
            if n % 2 == 0 {
                let capped = g.with_caps(LimitCaps {
                    max_key_tiles_per_workgroup: Some(1),
                    ..Default::default()
                });
                check(&capped, Path::Decode, dm, &opts, seed + 4, 1.0);
            } else {
                let types = [DType::F16, DType::Bf16, DType::F16, DType::Bf16];
                common::check_dtypes(&g, Path::Decode, dm, &opts, seed + 6, 1.0, types);
            }
        }
    }
}

/// One query row over 262144 keys: the fused path allocates nothing of size q_len x kv_len.
#[test]
fn one_query_over_262144_keys() {
    let Some(gpu) = gpu() else { return };
    let d = dims(1, 1, 1, 1, 262_144, 16, 16);
    let opts = Attention::new().causal(Causal::BottomRight);
    let plan = opts.clone().path(Path::Fused).plan(gpu, d).unwrap();
    assert!(plan.scratch_bytes() <= 4, "{}", plan.reason());
    check(gpu, Path::Fused, d, &opts, 1400, 1.0);
}

/// The plan of a 65536 x 65536 problem: no buffer grows with q_len x kv_len (the three-pass
/// plan of the same problem needs gigabytes of scores). At most a log-sum-exp per row, where
/// the device caps the keys per dispatch.
#[test]
fn fused_plan_memory_is_linear() {
    let Some(gpu) = gpu() else { return };
    let d = Dims::new(1, 8, 65_536, 64);
    let opts = Attention::new().causal(Causal::TopLeft);
    let fused = opts.plan(gpu, d).unwrap();
    assert!(matches!(fused, Plan::Fused { .. }), "{}", fused.reason());
    assert!(
        fused.scratch_bytes() <= d.lse_elems() as u64 * 4,
        "{}",
        fused.reason()
    );
    let three = opts.clone().path(Path::ThreePass).plan(gpu, d).unwrap();
    assert!(three.scratch_bytes() >= 65_536 * 4, "{}", three.reason());
}

/// Auto picks three-pass for the weights and fused otherwise, and says why.
#[test]
fn path_choice_is_visible() {
    let Some(gpu) = gpu() else { return };
    let d = Dims::new(1, 2, 100, 32);
    let plan = Attention::new().plan(gpu, d).unwrap();
    assert_eq!(plan.name(), "fused");
    assert!(plan.reason().contains("default"), "{}", plan.reason());
    let plan = Attention::new().return_weights(true).plan(gpu, d).unwrap();
    assert_eq!(plan.name(), "three-pass");
    assert!(plan.reason().contains("weights"), "{}", plan.reason());
    let plan = Attention::new().path(Path::ThreePass).plan(gpu, d).unwrap();
    assert!(plan.reason().contains("forced"), "{}", plan.reason());
    // Asking the fused path for weights is an error, not a silent omission.
    let err = Attention::new()
        .path(Path::Fused)
        .return_weights(true)
        .plan(gpu, d);
    assert!(matches!(
        err,
        Err(wgpu_attention::Error::InvalidOption { .. })
    ));
    let q = gpu
        .upload(&vec![0.5; d.q_elems()], d.q_shape(Layout::Bhsd))
        .unwrap();
    let out = Output {
        o: gpu.empty(d.o_shape(Layout::Bhsd)).unwrap(),
        lse: None,
        weights: Some(gpu.empty(d.score_shape()).unwrap()),
    };
    let err = Attention::new()
        .path(Path::Fused)
        .run_into(gpu, &q, &q, &q, &out);
    assert!(matches!(
        err,
        Err(wgpu_attention::Error::InvalidOption { .. })
    ));
}

/// A capped workgroup count spills the fused grid into y and z.
#[test]
fn spilled_dispatch() {
    let Some(gpu) = gpu() else { return };
    let capped = gpu.with_caps(wgpu_attention::LimitCaps {
        max_workgroups_per_dim: Some(3),
        ..Default::default()
    });
    // 3 * 4 heads * 2 row tiles = 24 workgroups > 3: spills to (3, 3, 3).
    let d = dims(3, 4, 2, 100, 70, 40, 72);
    check(
        &capped,
        Path::Fused,
        d,
        &Attention::new().causal(Causal::TopLeft),
        1500,
        1.0,
    );
}

/// Half-precision O over many passes: the passes merge in f32 and O is rounded once, so the
/// error stays at one rounding of the output.
#[test]
fn half_output_over_many_passes() {
    use wgpu_attention::DType::{Bf16, F16};
    let Some(gpu) = gpu() else { return };
    let capped = gpu.with_caps(wgpu_attention::LimitCaps {
        max_key_tiles_per_workgroup: Some(1),
        ..Default::default()
    });
    let d = dims(1, 2, 1, 70, 900, 16, 8);
    for types in [[Bf16; 4], [F16; 4]] {
        common::check_dtypes(&capped, Path::Fused, d, &Attention::new(), 1810, 1.0, types);
        common::check_dtypes(
            &capped,
            Path::Fused,
            d,
            &Attention::new().causal(Causal::BottomRight),
            1811,
            30.0,
            types,
        );
    }
}

/// Capping the keys per dispatch runs the key range in passes merged by log-sum-exp, with
/// and without a log-sum-exp output of the caller's.
#[test]
fn key_range_in_several_passes() {
    let Some(gpu) = gpu() else { return };
    let capped = gpu.with_caps(wgpu_attention::LimitCaps {
        max_key_tiles_per_workgroup: Some(2),
        ..Default::default()
    });
    let d = dims(2, 4, 2, 70, 600, 40, 24);
    let opts = Attention::new()
        .causal(Causal::BottomRight)
        .kv_lens(vec![600, 200]);
    let plan = opts.clone().path(Path::Fused).plan(&capped, d).unwrap();
    let Plan::Fused { plan: p, .. } = &plan else {
        panic!("{}", plan.reason())
    };
    assert_eq!((p.splits, p.passes), (1, 5), "{}", plan.reason());
    check(&capped, Path::Fused, d, &opts, 1800, 30.0);
    // Without an lse output the passes merge through a scratch one.
    let mut r = rng(1801);
    let q = random(&mut r, d.q_elems(), 1.0);
    let k = random(&mut r, d.k_elems(), 1.0);
    let v = random(&mut r, d.v_elems(), 1.0);
    let want = cpu::reference(&q, &k, &v, d, &opts).unwrap();
    let up = |x: &[f32], s| capped.upload(x, s).unwrap();
    let out = Output {
        o: common::poisoned(&capped, d.o_shape(Layout::Bhsd)),
        lse: None,
        weights: None,
    };
    opts.clone()
        .path(Path::Fused)
        .run_into(
            &capped,
            &up(&q, d.q_shape(Layout::Bhsd)),
            &up(&k, d.k_shape(Layout::Bhsd)),
            &up(&v, d.v_shape(Layout::Bhsd)),
            &out,
        )
        .unwrap();
    common::assert_close(
        "O",
        &out.o.download(&capped).unwrap(),
        &want.o,
        common::O_ATOL,
        common::O_RTOL,
    );
}

/// Every invocation block of the row-tiled kernel (4 x 4, 8 x 4, 8 x 8) on shapes that fill no
/// tile exactly: head dims that fall back to a smaller block (more than 128 output
/// accumulators per invocation), key ranges run in several passes, every per-key option,
/// half-precision storage, and the row-tiled kernel on the decode path with 16 rows (two rows
/// of 8 x 8 blocks) and 8.
#[test]
fn every_block_configuration() {
    use wgpu_attention::{DType, DecodeKernel, Layout, LimitCaps, TileBlock};
    let Some(base) = gpu() else { return };
    let mut r = rng(29);
    // (heads, kv_heads, q_len, kv_len, head_dim, v_head_dim)
    let shapes = [
        (2, 2, 100, 150, 72, 72),
        (4, 2, 70, 130, 40, 130),
        (1, 1, 65, 70, 256, 256),
        (3, 1, 33, 200, 7, 3),
    ];
    for block in TileBlock::ALL {
        let g = base
            .with_blocks(block, base.tile_config().gemm_block)
            .unwrap();
        let capped = g.with_caps(LimitCaps {
            max_key_tiles_per_workgroup: Some(1),
            ..Default::default()
        });
        for (n, &(h, hkv, l, s, d, dv)) in shapes.iter().enumerate() {
            let seed = 2900 + 100 * block.rows as u64 + 10 * block.cols as u64 + n as u64;
            let dm = dims(2, h, hkv, l, s, d, dv);
            let opts = Attention::new()
                .causal(Causal::BottomRight)
                .kv_lens(vec![s as u32, s as u32 - 37]);
            let plan = opts.clone().path(Path::Fused).plan(&g, dm).unwrap();
            let Plan::Fused { plan: p, .. } = &plan else {
                panic!("{}", plan.reason())
            };
            let accumulators =
                |b: TileBlock| b.rows * 4 * (dv.div_ceil(4) as u32).div_ceil(64 / b.cols);
            assert!(
                p.block == block || accumulators(block) > 128,
                "{block:?}: {}",
                plan.reason()
            );
            assert!(accumulators(p.block) <= 128, "{}", plan.reason());
            check(&g, Path::Fused, dm, &opts, seed, 1.0);
            check(&capped, Path::Fused, dm, &opts, seed + 1, 1.0);
            let masked = Attention::new()
                .causal(Causal::TopLeft)
                .window(40, 7)
                .softcap(20.0)
                .mask([2, 1, l, s], random_mask(&mut r, 2 * l * s, 0.8))
                .bias([1, h, 1, s], random(&mut r, h * s, 2.0))
                .layout(Layout::Bshd);
            check(&g, Path::Fused, dm, &masked, seed + 2, 3.0);
            let types = [DType::F16, DType::Bf16, DType::F16, DType::Bf16];
            common::check_dtypes(&g, Path::Fused, dm, &opts, seed + 3, 1.0, types);
        }
        // The row-tiled kernel on the decode path: 12 rows per kv head take 16-row tiles, 6
        // take 8.
        let tiles = g.with_decode_kernel(DecodeKernel::RowTiles, false).unwrap();
        for (rows, (h, hkv, l)) in [(16, (6, 1, 2)), (8, (3, 1, 2))] {
            let tiles = tiles.with_decode_rows(8).unwrap();
            let dm = dims(1, h, hkv, l, 900, 64, 40);
            let opts = Attention::new().causal(Causal::BottomRight);
            let plan = opts.clone().path(Path::Decode).plan(&tiles, dm).unwrap();
            let Plan::Decode { plan: p, .. } = &plan else {
                panic!("{}", plan.reason())
            };
            // A loop-capped device (llvmpipe) keeps 16 invocations per workgroup: 8 x 8 on 8
            // rows (8 invocations) takes 8 x 4 there.
            let capped = tiles.limits().max_key_tiles_per_workgroup != u32::MAX;
            let want = if capped && rows == 8 && block == TileBlock::B8X8 {
                TileBlock::B8X4
            } else {
                block
            };
            assert_eq!(
                (p.rows_per_workgroup, p.block),
                (rows, want),
                "{}",
                plan.reason()
            );
            check(&tiles, Path::Decode, dm, &opts, 2990 + rows as u64, 1.0);
        }
    }
}

/// The fused kernel's 16-bit products (f16 Q, K and V; `shaders/lib/mma.wgsl`) against the f64
/// reference on the f16-rounded inputs: emulated by plain FMAs on every adapter with
/// `SHADER_F16`, and on cooperative matrices where the `Gpu` has them (opened with
/// `WGPU_ATTENTION_MMA=cooperative` on an adapter that lists an f16 shape; the test prints
/// whether they ran). Shapes fill no tile: several row tiles, GQA rows, Q and K in one to four
/// slices of 64 dims, V in one to four chunks, every per-key option, several passes, f16 and
/// f32 O, and the decode path's 16-row tiles.
/// Checked by `common::check_dtypes` (NaN-poisoned O and log-sum-exp, the reference on the
/// same f16-rounded inputs), whose tolerance follows the plan: P is rounded to f16 before P V
/// (as FlashAttention's kernels do), so an element of O may differ from the reference by up to
/// one f16 unit of `sum p |v| / l`, at most 2^-10 of max |v| = 1 (WGSL lets a conversion round
/// to either neighbour; 2^-11 to nearest): absolute 1e-3, relative O's own rounding, and a
/// relative norm error within DESIGN.md's 3e-3 for half storage. The log-sum-exp sums the
/// unrounded P: 2e-5. The largest O error seen on lavapipe was 1.6e-4.
#[test]
fn sixteen_bit_products_against_the_reference() {
    use wgpu_attention::{DecodeKernel, Error, LimitCaps, MmaChoice};
    let Some(base) = gpu() else { return };
    if !base.features().contains(wgpu::Features::SHADER_F16) {
        let e = base.with_mma(MmaChoice::Emulated).unwrap_err();
        assert!(matches!(e, Error::Unsupported { .. }), "{e}");
        eprintln!("16-bit products: no SHADER_F16 on this adapter, so none ran ({e})");
        return;
    }
    let mut ways = vec![base.with_mma(MmaChoice::Emulated).unwrap()];
    match base.with_mma(MmaChoice::Cooperative) {
        Ok(g) => {
            eprintln!(
                "16-bit products: cooperative matrices of {0}x{0} ran, and the emulation",
                base.limits().cooperative_matrix
            );
            ways.push(g);
        }
        Err(e) => {
            assert!(matches!(e, Error::Unsupported { .. }), "{e}");
            assert_eq!(base.limits().cooperative_matrix, 0, "{e}");
            eprintln!("16-bit products: emulated only (no cooperative matrices: {e})");
        }
    }
    let mut r = rng(53);
    for (w, g) in ways.iter().enumerate() {
        let cooperative = g.tile_config().mma == MmaChoice::Cooperative;
        let tiles = g
            .with_decode_kernel(DecodeKernel::RowTiles, g.limits().tile.subgroups)
            .unwrap()
            .with_decode_rows(16)
            .unwrap();
        let capped = g.with_caps(LimitCaps {
            max_key_tiles_per_workgroup: Some(1),
            ..Default::default()
        });
        let causal = |s: usize| {
            Attention::new()
                .causal(Causal::BottomRight)
                .kv_lens(vec![s as u32, s as u32 - 29])
        };
        let masked = |h: usize, l: usize, s: usize, r: &mut rand::rngs::StdRng| {
            Attention::new()
                .window(50, 3)
                .softcap(12.0)
                .mask([2, 1, l, s], random_mask(r, 2 * l * s, 0.8))
                .bias([1, h, 1, s], random(r, h * s, 2.0))
        };
        // Bshd, ALiBi, a learnable sink and sink keys beside a window (tiles no row sees).
        let llm = |h: usize| {
            Attention::new()
                .layout(wgpu_attention::Layout::Bshd)
                .causal(Causal::TopLeft)
                .window(20, 0)
                .sink_keys(4)
                .alibi((0..h).map(|i| 0.25 / (i + 1) as f32).collect())
                .sinks((0..h).map(|i| 0.5 * i as f32 - 0.7).collect())
        };
        // (gpu, path, [heads, kv_heads, q_len, kv_len, head_dim, v_head_dim], options, O)
        #[rustfmt::skip]
        let cases = [
            (g, Path::Fused, [3, 3, 70, 150, 40, 24], causal(150), DType::F32),
            (g, Path::Fused, [4, 2, 33, 200, 72, 100], masked(4, 33, 200, &mut r), DType::F16),
            (&tiles, Path::Decode, [12, 1, 1, 300, 64, 64], causal(300), DType::F32),
            (g, Path::Fused, [2, 1, 20, 90, 256, 256], Attention::new(), DType::F16),
            (&capped, Path::Fused, [3, 3, 70, 150, 40, 24], causal(150), DType::F16),
            (g, Path::Fused, [4, 2, 40, 130, 33, 65], llm(4), DType::F32),
        ];
        for (n, (g, path, [h, hkv, l, s, d, dv], opts, o_type)) in cases.into_iter().enumerate() {
            let dm = dims(2, h, hkv, l, s, d, dv);
            let opts = opts.path(path);
            let plan = opts.plan_for_dtypes(g, dm, [DType::F16; 3]).unwrap();
            let (Plan::Fused { plan: p, .. } | Plan::Decode { plan: p, .. }) = &plan else {
                panic!("{}", plan.reason())
            };
            let m = p
                .mma
                .unwrap_or_else(|| panic!("no 16-bit products: {}", plan.reason()));
            assert_eq!(m.cooperative, cooperative, "{}", plan.reason());
            // f32 inputs never take them.
            let (Plan::Fused { plan: f, .. } | Plan::Decode { plan: f, .. }) =
                opts.plan(g, dm).unwrap()
            else {
                panic!("not the fused kernel for f32")
            };
            assert!(f.mma.is_none());
            let seed = 5300 + 100 * w as u64 + n as u64;
            let types = [DType::F16, DType::F16, DType::F16, o_type];
            common::check_dtypes(g, path, dm, &opts, seed, 2.0, types);
        }
    }
}
