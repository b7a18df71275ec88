//! The decode path (flash-decoding: the fused kernel with the keys split across workgroups,
//! GQA groups packed, partials merged by log-sum-exp) against the f64 reference.

#[macro_use]
mod common;

use wgpu_attention::{DType, DecodeKernel, Path, Plan};

path_grid_tests!(Path::Decode);

/// LLM decoding shapes: one to 16 new tokens over a long cache, GQA 4:1, bottom-right causal.
#[test]
fn short_queries_over_long_keys() {
    let Some(gpu) = gpu() else { return };
    for (n, &(l, s)) in [(1, 4097), (3, 2500), (16, 5000)].iter().enumerate() {
        let d = dims(2, 8, 2, l, s, 64, 64);
        let opts = Attention::new()
            .causal(Causal::BottomRight)
            .kv_lens(vec![s as u32, (s / 3) as u32]);
        let plan = opts.plan(gpu, d).unwrap();
        assert!(matches!(plan, Plan::Decode { .. }), "{}", plan.reason());
        check(gpu, Path::Decode, d, &opts, 1600 + n as u64, 1.0);
    }
}

/// Splits whose every key is masked (lse -inf) weigh nothing in the merge.
#[test]
fn splits_with_no_allowed_key() {
    let Some(gpu) = gpu() else { return };
    let capped = gpu.with_caps(wgpu_attention::LimitCaps {
        max_key_tiles_per_workgroup: Some(1),
        ..Default::default()
    });
    // Keys 0..300 in 5 splits of one tile; a window keeps only keys near the end for most rows.
    let d = dims(1, 2, 1, 5, 300, 16, 8);
    let opts = Attention::new().causal(Causal::BottomRight).window(20, 0);
    let plan = opts.clone().path(Path::Decode).plan(&capped, d).unwrap();
    let Plan::Decode { plan: p, .. } = &plan else {
        panic!("{}", plan.reason())
    };
    assert_eq!((p.splits, p.passes), (5, 1), "{}", plan.reason());
    check(&capped, Path::Decode, d, &opts, 1700, 1.0);
    check(
        &capped,
        Path::Decode,
        d,
        &Attention::new().kv_lens(vec![70]),
        1701,
        30.0,
    );
}

/// Each rows-per-workgroup configuration of the row-tiled decode kernel (4 to 64) on shapes
/// that fill none of them exactly, with masks and with the keys split and capped, against the
/// reference; under this adapter's minimum and under the GPUs' (16).
#[test]
fn every_row_configuration() {
    let Some(gpu) = gpu() else { return };
    let gpu = &gpu
        .with_decode_kernel(DecodeKernel::RowTiles, gpu.limits().tile.subgroups)
        .unwrap();
    let gpu_like = gpu.with_decode_rows(16).unwrap();
    assert!(gpu.with_decode_rows(12).is_err());
    // (heads, kv_heads, q_len) -> group * q_len rows per kv head.
    for (n, &(h, hkv, l)) in [(3, 3, 1), (6, 2, 2), (6, 2, 5), (8, 2, 7), (4, 2, 40)]
        .iter()
        .enumerate()
    {
        let d = dims(2, h, hkv, l, 700, 40, 72);
        let rows = (h / hkv) * l;
        let opts = Attention::new()
            .causal(Causal::BottomRight)
            .kv_lens(vec![700, 333]);
        for base in [gpu, &gpu_like] {
            let capped = base.with_caps(wgpu_attention::LimitCaps {
                max_key_tiles_per_workgroup: Some(2),
                ..Default::default()
            });
            let min = base.limits().tile.min_decode_rows;
            let want = [4, 8, 16, 32, 64]
                .into_iter()
                .find(|&r| r >= min && r as usize >= rows)
                .unwrap_or(64);
            for g in [base, &capped] {
                let plan = opts.clone().path(Path::Decode).plan(g, d).unwrap();
                let Plan::Decode { plan: p, .. } = &plan else {
                    panic!("{}", plan.reason())
                };
                assert_eq!(p.rows_per_workgroup, want, "{}", plan.reason());
                check(g, Path::Decode, d, &opts, 1800 + n as u64, 1.0);
                let masked = opts.clone().softcap(20.0).window(100, 0);
                check(g, Path::Decode, d, &masked, 1810 + n as u64, 3.0);
            }
        }
    }
}

/// The contexts that run each configuration of the decode-shaped kernel on this adapter: with
/// subgroup operations (required where the adapter has them) and with workgroup-memory
/// reductions only (what WebGPU gets).
fn keys_kernel_contexts(gpu: &wgpu_attention::Gpu) -> Vec<(wgpu_attention::Gpu, String)> {
    let mut out = Vec::new();
    for workgroup in [16, 32, 64] {
        let keys = DecodeKernel::KeysAcrossInvocations { workgroup };
        let name = keys.name();
        out.push((
            gpu.with_decode_kernel(keys, false).unwrap(),
            format!("{name}, workgroup reduce"),
        ));
        if gpu.limits().tile.subgroups {
            out.push((
                gpu.with_decode_kernel(keys, true).unwrap(),
                format!("{name}, subgroups"),
            ));
        } else {
            assert!(gpu.with_decode_kernel(keys, true).is_err());
        }
    }
    let odd = DecodeKernel::KeysAcrossInvocations { workgroup: 48 };
    assert!(gpu.with_decode_kernel(odd, false).is_err());
    out
}

/// Every row count (1 to 16) and head-dim chunking of the decode-shaped kernel, with both
/// reductions, the keys split and capped, masks and half-precision storage, K read 8, 4 or 1
/// elements per load and V 4 or 1, on shapes that fill no tile exactly; and a group too large
/// for it, which runs the row-tiled kernel.
#[test]
fn keys_kernel_every_configuration() {
    let Some(gpu) = gpu() else { return };
    let mut r = rng(19);
    // (heads, kv_heads, q_len, head_dim, v_head_dim) -> group * q_len rows per kv head.
    let shapes = [
        (3, 3, 1, 40, 72),
        (4, 2, 1, 1, 3),
        (6, 2, 1, 7, 130),
        (5, 1, 1, 128, 128),
        (8, 2, 4, 256, 256),
        (6, 2, 5, 132, 7),
        (4, 1, 3, 64, 200),
    ];
    // Six contexts (16, 32, 64 invocations, each with both reductions), ordered so that each
    // shape runs under two of them, one per reduction: the full cross product took minutes.
    let contexts = keys_kernel_contexts(gpu);
    for (ci, (base, what)) in contexts.iter().enumerate() {
        let capped = base.with_caps(wgpu_attention::LimitCaps {
            max_key_tiles_per_workgroup: Some(2),
            ..Default::default()
        });
        for (n, &(h, hkv, l, d, dv)) in shapes.iter().enumerate() {
            if contexts.len() == 6 && n % 3 != ci % 3 {
                continue;
            }
            let seed = 1900 + 100 * ci as u64 + 10 * n as u64;
            let dm = dims(2, h, hkv, l, 700, d, dv);
            let rows = (h / hkv) * l;
            let want_rows = [1u32, 2, 4, 8, 16]
                .into_iter()
                .find(|&x| x as usize >= rows)
                .unwrap();
            let opts = Attention::new()
                .causal(Causal::BottomRight)
                .kv_lens(vec![700, 333]);
            for g in [base, &capped] {
                let plan = opts.clone().path(Path::Decode).plan(g, dm).unwrap();
                let Plan::Decode { plan: p, .. } = &plan else {
                    panic!("{}", plan.reason())
                };
                assert!(p.keys_across_invocations, "{what}: {}", plan.reason());
                assert_eq!(p.rows_per_workgroup, want_rows, "{}", plan.reason());
                check(g, Path::Decode, dm, &opts, seed, 1.0);
            }
            let masked = Attention::new()
                .window(150, 3)
                .softcap(20.0)
                .mask([2, 1, l, 700], random_mask(&mut r, 2 * l * 700, 0.7))
                .bias([1, h, 1, 700], random(&mut r, h * 700, 2.0))
                .layout(Layout::Bshd);
            check(&capped, Path::Decode, dm, &masked, seed + 1, 3.0);
            // K grouped by 8, 4 or 1 in every storage type, over the shapes.
            let types = if n % 2 == 0 {
                [DType::F32, DType::F16, DType::Bf16, DType::F16]
            } else {
                [DType::Bf16, DType::Bf16, DType::F32, DType::F32]
            };
            check_dtypes(base, Path::Decode, dm, &opts, seed + 2, 1.0, types);
            check_dtypes(
                &base.with_packed_f16(),
                Path::Decode,
                dm,
                &opts,
                seed + 3,
                1.0,
                [DType::F16; 4],
            );
        }
        // 20 rows per kv head: more than the kernel holds.
        let dm = dims(1, 4, 1, 5, 300, 16, 16);
        let plan = Attention::new().path(Path::Decode).plan(base, dm).unwrap();
        let Plan::Decode { plan: p, .. } = &plan else {
            panic!("{}", plan.reason())
        };
        assert!(!p.keys_across_invocations, "{}", plan.reason());
    }
}

/// The decode-shaped kernel at its most loop iterations per invocation on a CPU adapter (16
/// invocations, 16 rows, head_dim 256, 32 key tiles in one split, the last one partial):
/// llvmpipe silently stops an invocation's loops after 65535 iterations in total (NOTES.md),
/// so a kernel over the limit drops keys.
#[test]
fn keys_kernel_longest_split() {
    let Some(gpu) = gpu() else { return };
    // 16 invocations run the most loop iterations each (4 keys per tile each).
    let contexts = keys_kernel_contexts(gpu);
    for (base, what) in contexts
        .into_iter()
        .filter(|(_, what)| what.starts_with("keys16"))
    {
        let dm = dims(8, 128, 8, 1, 2040, 256, 256);
        let opts = Attention::new().path(Path::Decode);
        let plan = opts.plan(&base, dm).unwrap();
        let Plan::Decode { plan: p, .. } = &plan else {
            panic!("{}", plan.reason())
        };
        assert!(p.keys_across_invocations, "{what}: {}", plan.reason());
        assert_eq!(p.rows_per_workgroup, 16, "{}", plan.reason());
        if base.limits().max_key_tiles_per_workgroup == 32 {
            assert_eq!(p.tiles_per_split, 32, "{}", plan.reason());
        }
        let types = [DType::F16; 4];
        check_dtypes(&base, Path::Decode, dm, &opts, 2000, 1.0, types);
    }
}

/// The tile configuration round-trips through the API, and bad ones are typed errors.
#[test]
fn tile_config_overrides() {
    let Some(gpu) = gpu() else { return };
    let mut config = gpu.tile_config();
    config.decode_kernel = DecodeKernel::KeysAcrossInvocations { workgroup: 32 };
    config.min_decode_rows = 8;
    config.decode_target_workgroups = 7;
    let tuned = gpu.with_tile_config(config).unwrap();
    assert_eq!(tuned.tile_config(), config);
    let d = dims(1, 8, 2, 1, 3000, 64, 64);
    let plan = Attention::new().plan(&tuned, d).unwrap();
    let Plan::Decode { plan: p, .. } = &plan else {
        panic!("{}", plan.reason())
    };
    assert_eq!((p.invocations, p.splits), (32, 4), "{}", plan.reason());
    for bad in [
        wgpu_attention::gpu::tuning::TileConfig {
            min_decode_rows: 12,
            ..config
        },
        wgpu_attention::gpu::tuning::TileConfig {
            decode_target_workgroups: 0,
            ..config
        },
        wgpu_attention::gpu::tuning::TileConfig {
            decode_kernel: DecodeKernel::KeysAcrossInvocations { workgroup: 8 },
            ..config
        },
    ] {
        assert!(gpu.with_tile_config(bad).is_err(), "{bad:?}");
    }
}

/// K and V rows past a sequence's `kv_lens` may hold anything (a cache's unwritten rows): no
/// kernel multiplies them, so NaNs there leave O exact: the decode-shaped kernel, the row-tiled
/// one on the decode path (one staging buffer and two), and the fused path (one query row per
/// tile row, 8 query rows).
#[test]
fn rows_past_kv_lens_are_never_read() {
    let Some(gpu) = gpu() else { return };
    let tiles = gpu
        .with_decode_kernel(DecodeKernel::RowTiles, gpu.limits().tile.subgroups)
        .unwrap();
    // The row-tiled kernel double-buffered (16 rows, 4 x 4 blocks: 64 invocations), whose
    // staging loads V and the next slice of K ahead of their use.
    let double = tiles
        .with_decode_rows(16)
        .unwrap()
        .with_blocks(
            wgpu_attention::TileBlock::B4X4,
            gpu.tile_config().gemm_block,
        )
        .unwrap()
        .with_double_buffer(true);
    for (g, path, q_len, keys_kernel) in [
        (gpu, Path::Decode, 1, true),
        (&tiles, Path::Decode, 1, false),
        (&double, Path::Decode, 1, false),
        (gpu, Path::Fused, 8, false),
    ] {
        nan_past_kv_lens(g, path, q_len, keys_kernel);
    }
    let plan = Attention::new()
        .path(Path::Decode)
        .plan(&double, dims(2, 8, 2, 1, 700, 64, 64))
        .unwrap();
    let Plan::Decode { plan: p, .. } = &plan else {
        panic!("{}", plan.reason())
    };
    assert!(p.double_buffer, "{}", plan.reason());
}

fn nan_past_kv_lens(gpu: &wgpu_attention::Gpu, path: Path, q_len: usize, keys_kernel: bool) {
    let d = dims(2, 8, 2, q_len, 700, 64, 64);
    let opts = Attention::new().kv_lens(vec![700, 333]).path(path);
    let plan = opts.plan(gpu, d).unwrap();
    let used = match &plan {
        Plan::Decode { plan: p, .. } | Plan::Fused { plan: p, .. } => p.keys_across_invocations,
        _ => panic!("{}", plan.reason()),
    };
    assert_eq!(used, keys_kernel, "{}", plan.reason());
    let mut r = rng(2100);
    let q = random(&mut r, d.q_elems(), 1.0);
    let k = random(&mut r, d.k_elems(), 1.0);
    let v = random(&mut r, d.v_elems(), 1.0);
    let want = cpu::reference(&q, &k, &v, d, &opts).unwrap();
    // Batch 1's rows 333.. of every kv head, in the Bhsd layout.
    let poison = |x: &[f32]| -> Vec<f32> {
        let mut x = x.to_vec();
        for h in 0..d.kv_heads {
            let start = ((d.kv_heads + h) * d.kv_len + 333) * d.head_dim;
            let end = ((d.kv_heads + h) * d.kv_len + d.kv_len) * d.head_dim;
            x[start..end].fill(f32::NAN);
        }
        x
    };
    let layout = Layout::Bhsd;
    let tq = gpu.upload(&q, d.q_shape(layout)).unwrap();
    let tk = gpu.upload(&poison(&k), d.k_shape(layout)).unwrap();
    let tv = gpu.upload(&poison(&v), d.v_shape(layout)).unwrap();
    let out = opts.run(gpu, &tq, &tk, &tv).unwrap();
    let o = out.o.download(gpu).unwrap();
    common::assert_close(
        &format!("O of {}", plan.reason()),
        &o,
        &want.o,
        common::O_ATOL,
        common::O_RTOL,
    );
}

/// Sink keys skip the key tiles between them and the window. The decode-shaped kernel
/// double-buffers its tile state by the parity of the tiles it visits, so an odd number of
/// skipped tiles must not make two visited tiles share a buffer: one split per kv head (each
/// workgroup visits the sink tile, skips 13 tiles, then visits the window's), every workgroup
/// size, both reductions, with paged and packed K/V too (whose key rows share that buffer).
#[test]
fn keys_kernel_across_skipped_tiles() {
    let Some(gpu) = gpu() else { return };
    let d = dims(1, 4, 1, 1, 1000, 32, 32);
    let opts = Attention::new()
        .causal(Causal::BottomRight)
        .window(100, 0)
        .sink_keys(4);
    for (ctx, name) in keys_kernel_contexts(gpu) {
        let mut tile = ctx.tile_config();
        tile.decode_target_workgroups = 1;
        let one_split = ctx.with_tile_config(tile).unwrap();
        let plan = opts.clone().path(Path::Decode).plan(&one_split, d).unwrap();
        assert!(
            plan.reason().contains("1 key split"),
            "{name}: {}",
            plan.reason()
        );
        common::check(&one_split, Path::Decode, d, &opts, 1300, 2.0);
        // Paged: one page per 8 keys, in reverse order; the reference reads the same pool.
        let table: Vec<u32> = (0..125).rev().collect();
        let paged = opts.clone().paged(8, table);
        let mut r = rng(1301);
        let q = common::random(&mut r, d.q_elems(), 2.0);
        let k = common::random(&mut r, d.k_elems(), 1.0);
        let v = common::random(&mut r, d.v_elems(), 1.0);
        let want = wgpu_attention::cpu::reference(&q, &k, &v, d, &paged).unwrap();
        let got = paged
            .clone()
            .path(Path::Decode)
            .run(
                &one_split,
                &one_split.upload(&q, d.q_shape(Layout::Bhsd)).unwrap(),
                &one_split.upload(&k, [125, 8, 1, 32]).unwrap(),
                &one_split.upload(&v, [125, 8, 1, 32]).unwrap(),
            )
            .unwrap()
            .o
            .download(&one_split)
            .unwrap();
        common::assert_close(
            &format!("paged, {name}"),
            &got,
            &want.o,
            common::O_ATOL,
            common::O_RTOL,
        );
    }
}
