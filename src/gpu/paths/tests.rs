//! The planner against the limits of real devices, with no adapter: every figure here is
//! arithmetic over [`GpuLimits`].

use super::*;
use crate::error::Error;
use crate::gpu::limits::{DecodeKernel, LimitCaps, MmaChoice, TileBlock};
use crate::gpu::tuning::TileConfig;
use crate::spec::{Attention, Causal, Dims};

/// Mesa's lavapipe (the CI adapter): 128 MiB bindings, 32 KiB workgroup memory, and the
/// loop limit that caps the keys per workgroup.
fn lavapipe() -> GpuLimits {
    GpuLimits {
        max_storage_binding: 128 << 20,
        max_buffer_size: (2 << 30) - 1,
        max_workgroups_per_dim: 65535,
        max_invocations_per_workgroup: 1024,
        max_workgroup_storage: 32 << 10,
        max_storage_buffers_per_stage: 32,
        min_uniform_offset_alignment: 16,
        max_key_tiles_per_workgroup: 32,
        cooperative_matrix: 0,
        subgroup_size: 0,
        tile: TileConfig {
            decode_kernel: DecodeKernel::KeysAcrossInvocations { workgroup: 16 },
            subgroups: true,
            min_decode_rows: 4,
            decode_target_workgroups: 64,
            fused_block: TileBlock::B8X8,
            gemm_block: TileBlock::B8X8,
            resident_q: true,
            double_buffer: false,
            tiled_backward: true,
            backward_block: TileBlock::B8X8,
            mma: MmaChoice::Off,
        },
    }
}

/// An H100 / H200 on NVIDIA's Vulkan driver as wgpu reports it (NOTES.md): a storage binding
/// just under 2 GiB, 48 KiB of workgroup memory, no loop limit.
fn h100() -> GpuLimits {
    GpuLimits {
        max_storage_binding: (2 << 30) - 4,
        max_buffer_size: 1 << 40,
        max_workgroups_per_dim: 65535,
        max_invocations_per_workgroup: 1024,
        max_workgroup_storage: 48 << 10,
        max_storage_buffers_per_stage: 1 << 20,
        min_uniform_offset_alignment: 64,
        max_key_tiles_per_workgroup: u32::MAX,
        // What NVIDIA's Vulkan driver lists (WGPU-NOTES.md) and its warps.
        cooperative_matrix: 16,
        subgroup_size: 32,
        tile: TileConfig {
            decode_kernel: DecodeKernel::KeysAcrossInvocations { workgroup: 64 },
            subgroups: true,
            min_decode_rows: 16,
            decode_target_workgroups: 1024,
            fused_block: TileBlock::B8X4,
            gemm_block: TileBlock::B8X8,
            resident_q: true,
            double_buffer: true,
            tiled_backward: true,
            backward_block: TileBlock::B8X4,
            mma: MmaChoice::Off,
        },
    }
}

/// Apple M-series on Metal: 32 KiB of threadgroup memory, 1024 invocations, 31 buffers.
fn apple_m() -> GpuLimits {
    GpuLimits {
        max_storage_binding: 1 << 30,
        max_buffer_size: 1 << 32,
        max_workgroups_per_dim: 65535,
        max_invocations_per_workgroup: 1024,
        max_workgroup_storage: 32 << 10,
        max_storage_buffers_per_stage: 31,
        min_uniform_offset_alignment: 256,
        max_key_tiles_per_workgroup: u32::MAX,
        // Metal's 8 x 8 simdgroup matrices and 32-wide simdgroups.
        cooperative_matrix: 8,
        subgroup_size: 32,
        tile: TileConfig {
            decode_kernel: DecodeKernel::KeysAcrossInvocations { workgroup: 64 },
            subgroups: true,
            min_decode_rows: 16,
            decode_target_workgroups: 256,
            fused_block: TileBlock::B8X4,
            gemm_block: TileBlock::B8X8,
            resident_q: true,
            double_buffer: true,
            tiled_backward: true,
            backward_block: TileBlock::B8X4,
            mma: MmaChoice::Off,
        },
    }
}

/// WebGPU's defaults, exactly as wgpu writes them: 128 MiB bindings, 16 KiB workgroup memory,
/// 8 storage buffers per stage, 256 invocations.
fn webgpu() -> GpuLimits {
    GpuLimits::from_wgpu(&wgpu::Limits::default(), wgpu::DeviceType::Other)
}

fn devices() -> [(&'static str, GpuLimits); 4] {
    [
        ("lavapipe", lavapipe()),
        ("h100", h100()),
        ("apple-m", apple_m()),
        ("webgpu", webgpu()),
    ]
}

fn dims(b: usize, h: usize, hkv: usize, l: usize, s: usize, d: usize) -> Dims {
    Dims {
        batch: b,
        heads: h,
        kv_heads: hkv,
        q_len: l,
        kv_len: s,
        head_dim: d,
        v_head_dim: d,
    }
}

fn plan(opts: &Attention, limits: &GpuLimits, d: Dims) -> Result<Plan> {
    opts.plan_for_limits(limits, d)
}

#[test]
fn webgpu_defaults_are_what_the_issue_records() {
    let w = webgpu();
    assert_eq!(w.max_storage_binding, 128 << 20);
    assert_eq!(w.max_workgroup_storage, 16 << 10);
    assert_eq!(w.max_storage_buffers_per_stage, 8);
    assert_eq!(w.max_invocations_per_workgroup, 256);
    assert_eq!(w.max_key_tiles_per_workgroup, u32::MAX);
}

#[test]
fn path_choice_per_device() {
    let prefill = dims(1, 8, 8, 512, 512, 64);
    let decoding = dims(1, 32, 8, 1, 4096, 64);
    for (name, limits) in devices() {
        let auto = plan(&Attention::new(), &limits, prefill).unwrap();
        let dec = plan(&Attention::new(), &limits, decoding).unwrap();
        let weights = plan(&Attention::new().return_weights(true), &limits, prefill).unwrap();
        let additive = plan(&Attention::new().additive(vec![0.5; 64]), &limits, prefill).unwrap();
        assert_eq!(weights.name(), "three-pass", "{name}");
        assert_eq!(additive.name(), "three-pass", "{name}");
        if name == "webgpu" {
            // 16 KiB of workgroup memory is below the fused kernel's 28 KiB, not below the
            // decode-shaped kernel's.
            assert_eq!(auto.name(), "three-pass", "{name}: {}", auto.reason());
            assert_eq!(dec.name(), "decode", "{name}: {}", dec.reason());
        } else {
            assert_eq!(auto.name(), "fused", "{name}: {}", auto.reason());
            assert_eq!(dec.name(), "decode", "{name}: {}", dec.reason());
        }
    }
}

#[test]
fn forcing_the_fused_path_where_it_cannot_run_is_a_typed_error() {
    let err = plan(
        &Attention::new().path(Path::Fused),
        &webgpu(),
        dims(1, 2, 2, 100, 100, 64),
    )
    .unwrap_err();
    assert!(
        matches!(err, Error::Unsupported { needed, available: 16384, .. } if needed > 16384),
        "{err:?}"
    );
    // Enough memory but too few storage buffers: the error names that limit.
    let mut few = h100();
    few.max_storage_buffers_per_stage = 4;
    let err = plan(
        &Attention::new().path(Path::Fused),
        &few,
        dims(1, 2, 2, 100, 100, 64),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Unsupported {
                needed: 8,
                available: 4,
                ..
            }
        ),
        "{err:?}"
    );
    let auto = plan(&Attention::new(), &few, dims(1, 2, 2, 100, 100, 64)).unwrap();
    assert_eq!(auto.name(), "three-pass", "{}", auto.reason());
}

/// The figure NOTES.md records from the H100 (chunks of 2080374784 bytes of scores at B=4,
/// H=16, L=S=4096): 31 (batch, head) slabs of 64 MiB per chunk; lavapipe takes two.
#[test]
fn three_pass_chunks_fit_one_binding() {
    let d = dims(4, 16, 16, 4096, 4096, 64);
    let opts = Attention::new().path(Path::ThreePass);
    let Plan::ThreePass { plan: p, .. } = plan(&opts, &h100(), d).unwrap() else {
        panic!("not three-pass")
    };
    assert_eq!(p.scratch_bytes, 2_080_374_784);
    assert_eq!(p.chunks.len(), 64usize.div_ceil(31));
    let Plan::ThreePass { plan: p, .. } = plan(&opts, &lavapipe(), d).unwrap() else {
        panic!("not three-pass")
    };
    assert_eq!(p.scratch_bytes, 2 * 4096 * 4096 * 4);
    assert_eq!(p.chunks.len(), 32);
    // One row of 40M keys (160 MiB of scores) is more than a WebGPU binding holds.
    let err = plan(&opts, &webgpu(), dims(1, 1, 1, 2, 40 << 20, 8)).unwrap_err();
    assert!(
        matches!(
            err,
            Error::TooLarge {
                what: "one row of scores",
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn three_pass_refuses_long_keys_only_where_loops_are_capped() {
    let d = dims(1, 1, 1, 1, 600_000, 8);
    let opts = Attention::new().path(Path::ThreePass);
    let err = plan(&opts, &lavapipe(), d).unwrap_err();
    assert!(
        matches!(err, Error::TooLarge { max: 524_288, .. }),
        "{err:?}"
    );
    assert!(plan(&opts, &h100(), d).is_ok());
}

/// Every chunk plan covers each (batch * head, query row) exactly once, on every device, over
/// shapes that are not multiples of the tiles.
#[test]
fn three_pass_chunks_cover_the_problem_exactly_once() {
    for (name, limits) in devices() {
        for caps in [None, Some(1u64 << 20), Some(40_000)] {
            let limits = limits.capped(LimitCaps {
                max_storage_binding: caps,
                ..LimitCaps::default()
            });
            for d in [
                dims(3, 5, 5, 257, 100, 33),
                dims(1, 2, 1, 1000, 1000, 64),
                dims(2, 4, 2, 7, 3000, 16),
            ] {
                let opts = Attention::new().path(Path::ThreePass);
                let Plan::ThreePass { plan: p, .. } = plan(&opts, &limits, d).unwrap() else {
                    panic!("not three-pass")
                };
                assert!(p.scratch_bytes <= limits.max_storage_binding, "{name}");
                let mut seen = vec![0u8; d.batch * d.heads * d.q_len];
                for c in &p.chunks {
                    assert!(
                        (c.bh_count * c.rows * d.kv_len * 4) as u64 <= p.scratch_bytes,
                        "{name}: {c:?}"
                    );
                    for bh in c.bh_start..c.bh_start + c.bh_count {
                        for row in c.row_start..c.row_start + c.rows {
                            seen[bh * d.q_len + row] += 1;
                        }
                    }
                }
                assert!(seen.iter().all(|&n| n == 1), "{name} {d:?}: {:?}", p.chunks);
            }
        }
    }
}

#[test]
fn fused_passes_only_where_keys_per_workgroup_are_capped() {
    let d = dims(1, 8, 8, 300, 8192, 64);
    let opts = Attention::new().path(Path::Fused);
    let Plan::Fused { plan: p, .. } = plan(&opts, &lavapipe(), d).unwrap() else {
        panic!("not fused")
    };
    // 128 key tiles, 32 per dispatch; the passes merge by a log-sum-exp scratch.
    assert_eq!((p.splits, p.passes, p.tiles_per_split), (1, 4, 32));
    assert_eq!(p.workgroups, 8 * 300usize.div_ceil(64) as u64);
    assert_eq!(p.scratch_bytes, 8 * 300 * 4);
    assert_eq!(p.o_chunks, 1);
    for limits in [h100(), apple_m()] {
        let Plan::Fused { plan: p, .. } = plan(&opts, &limits, d).unwrap() else {
            panic!("not fused")
        };
        assert_eq!((p.splits, p.passes, p.scratch_bytes), (1, 1, 0));
    }
}

/// Flash-decoding aims for the adapter's `decode_target_workgroups`: B=1, H=32, Hkv=8, one
/// query over 4096 keys (64 tiles) is 8 row tiles, so 8 splits of 8 tiles on lavapipe (64
/// workgroups), and 32 splits of 2 tiles (the fewest a split gets) on the GPUs, whose targets
/// (1024, 256) would want more.
#[test]
fn decode_splits_fill_the_device() {
    let d = dims(1, 32, 8, 1, 4096, 128);
    for (limits, splits) in [(lavapipe(), 8), (h100(), 32), (apple_m(), 32)] {
        let Plan::Decode { plan: p, .. } = plan(&Attention::new(), &limits, d).unwrap() else {
            panic!("not decode")
        };
        assert_eq!(
            (p.splits, p.passes, p.tiles_per_split),
            (splits, 1, 64 / splits)
        );
        assert_eq!(p.workgroups, 8 * splits as u64);
        assert_eq!(p.o_chunks, 2);
        assert_eq!(p.scratch_bytes, splits as u64 * 32 * (128 + 1) * 4);
    }
}

#[test]
fn decode_splits_respect_the_key_cap_on_long_caches() {
    // 262144 keys = 4096 tiles; lavapipe streams at most 32 per workgroup.
    let d = dims(1, 8, 2, 1, 262_144, 64);
    let opts = Attention::new().causal(Causal::BottomRight);
    let Plan::Decode { plan: p, .. } = plan(&opts, &lavapipe(), d).unwrap() else {
        panic!("not decode")
    };
    assert!(p.tiles_per_split <= 32, "{p:?}");
    assert!(p.splits as u64 * p.tiles_per_split as u64 >= 4096, "{p:?}");
}

#[test]
fn grids_larger_than_the_dispatch_limit_are_typed_errors() {
    let tiny = lavapipe().capped(LimitCaps {
        max_workgroups_per_dim: Some(3),
        ..LimitCaps::default()
    });
    // 1000 row tiles > 3^3 workgroups.
    let err = plan(
        &Attention::new().path(Path::Fused),
        &tiny,
        dims(1, 1, 1, 64_000, 64, 8),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::TooLarge {
                what: "flash_attention dispatch",
                max: 27,
                ..
            }
        ),
        "{err:?}"
    );
    // Within x * y * z the grid spills instead.
    let spilled = crate::gpu::limits::DispatchSize::linear(27, 3, "test").unwrap();
    assert_eq!(spilled.counts, [3, 3, 3]);
}

#[test]
fn invalid_calls_fail_before_planning() {
    let err = plan(&Attention::new(), &h100(), dims(1, 3, 2, 4, 4, 8)).unwrap_err();
    assert!(matches!(err, Error::HeadsNotDivisible { .. }), "{err:?}");
}

/// The decode-shaped kernel takes a kv head's rows up to 16, rounded up to a power of two, with
/// the configured workgroup or the largest smaller one whose workgroup memory fits; more rows
/// run the row-tiled kernel (which WebGPU's 16 KiB cannot hold).
#[test]
fn decode_kernel_rows() {
    for (group_rows, keys_rows, tiled_webgpu) in [
        ((1, 1), Some(1), false),
        ((4, 1), Some(4), false),
        ((2, 3), Some(8), false),
        ((8, 1), Some(8), false),
        ((4, 4), Some(16), false),
        ((4, 7), None, true),
        ((8, 8), None, true),
    ] {
        let (group, q_len) = group_rows;
        let d = dims(1, 8 * group, 8, q_len, 4096, 64);
        let opts = Attention::new().path(Path::Decode);
        for limits in [lavapipe(), h100(), apple_m(), webgpu()] {
            let webgpu = limits.max_workgroup_storage == 16 << 10;
            let planned = plan(&opts, &limits, d);
            if webgpu && tiled_webgpu {
                // Nor does the row-tiled kernel fit there.
                assert!(
                    matches!(planned, Err(Error::Unsupported { .. })),
                    "{planned:?}"
                );
                continue;
            }
            let Plan::Decode { plan: p, .. } = planned.unwrap() else {
                panic!("not decode")
            };
            match keys_rows {
                Some(rows) if !(webgpu && tiled_webgpu) => {
                    assert!(p.keys_across_invocations, "{group_rows:?}: {p:?}");
                    assert_eq!(p.rows_per_workgroup, rows, "{group_rows:?}: {p:?}");
                    // 16 rows at 64 invocations need 20 KiB: WebGPU's 16 KiB takes 32.
                    let configured = match limits.tile.decode_kernel {
                        DecodeKernel::KeysAcrossInvocations { workgroup } => workgroup,
                        DecodeKernel::RowTiles => unreachable!(),
                    };
                    let want = if webgpu && rows == 16 { 32 } else { configured };
                    assert_eq!(p.invocations, want, "{group_rows:?}: {p:?}");
                }
                _ => assert!(!p.keys_across_invocations, "{group_rows:?}: {p:?}"),
            }
            assert_eq!(
                p.row_tiles as usize,
                (group * q_len).div_ceil(p.rows_per_workgroup as usize),
                "{p:?}"
            );
        }
    }
}

/// Row-tiled decode rows per workgroup: the fewest configuration that holds a kv head's rows,
/// no fewer than the adapter's minimum (4 on lavapipe, 16 on GPUs).
#[test]
fn decode_rows_per_workgroup() {
    for (group_rows, lavapipe_rows, gpu_rows) in [
        ((4, 1), 4, 16),
        ((2, 3), 8, 16),
        ((8, 1), 8, 16),
        ((4, 4), 16, 16),
        ((4, 7), 32, 32),
        ((8, 8), 64, 64),
    ] {
        let (group, q_len) = group_rows;
        let d = dims(1, 8 * group, 8, q_len, 4096, 64);
        let opts = Attention::new().path(Path::Decode);
        for (mut limits, rows) in [(lavapipe(), lavapipe_rows), (h100(), gpu_rows)] {
            limits.tile.decode_kernel = DecodeKernel::RowTiles;
            let Plan::Decode { plan: p, .. } = plan(&opts, &limits, d).unwrap() else {
                panic!("not decode")
            };
            assert_eq!(p.rows_per_workgroup, rows, "{group_rows:?}: {p:?}");
            assert_eq!(
                p.row_tiles as usize,
                (group * q_len).div_ceil(rows as usize),
                "{p:?}"
            );
        }
    }
    // The fused path keeps 64 rows whatever the minimum.
    let d = dims(1, 32, 8, 1, 4096, 64);
    let Plan::Fused { plan: p, .. } =
        plan(&Attention::new().path(Path::Fused), &lavapipe(), d).unwrap()
    else {
        panic!("not fused")
    };
    assert_eq!(p.rows_per_workgroup, 64);
}

/// A hand-written configuration naming a workgroup no kernel is compiled for plans the row-tiled
/// kernel instead of panicking or compiling a kernel that does not exist.
#[test]
fn decode_workgroups_outside_the_table_fall_back() {
    let d = dims(1, 4, 1, 1, 4096, 64);
    for workgroup in [0, 8, 48, 128] {
        let mut limits = lavapipe();
        limits.tile.decode_kernel = DecodeKernel::KeysAcrossInvocations { workgroup };
        let Plan::Decode { plan: p, .. } =
            plan(&Attention::new().path(Path::Decode), &limits, d).unwrap()
        else {
            panic!("not decode")
        };
        assert!(!p.keys_across_invocations, "{workgroup}: {p:?}");
    }
}

/// Long sums on a loop-capped device take 4 x 4 blocks, whose loops llvmpipe unrolls; a GPU
/// keeps its configured block at any length.
#[test]
fn long_sums_on_a_loop_capped_device_take_4x4_blocks() {
    let l = lavapipe();
    assert_eq!(l.tile.gemm_block, TileBlock::B8X8);
    assert_eq!(l.gemm_block_for(16384), TileBlock::B8X8);
    assert_eq!(l.gemm_block_for(16385), TileBlock::B4X4);
    let h = h100();
    assert_eq!(h.gemm_block_for(1 << 20), h.tile.gemm_block);
}

/// `Path::Auto` checks the workgroup memory of the block the fused plan would take, not of the
/// configured one: 4 x 4 and 8 x 4 need 2 KiB more than 8 x 8, so a device with room for 8 x 8
/// only runs three-pass where the plan falls back (v_head_dim 256), fused where it does not.
#[test]
fn auto_checks_the_memory_of_the_block_it_would_take() {
    let mut l = h100();
    l.tile.fused_block = TileBlock::B8X8;
    l.max_workgroup_storage = 27_000;
    let mut d = dims(1, 2, 2, 100, 100, 64);
    let opts = Attention::new();
    let p = plan(&opts, &l, d).unwrap();
    assert!(
        matches!(&p, Plan::Fused { plan, .. } if plan.block == TileBlock::B8X8),
        "{}",
        p.reason()
    );
    d.v_head_dim = 256;
    let p = plan(&opts, &l, d).unwrap();
    assert!(matches!(p, Plan::ThreePass { .. }), "{}", p.reason());
}

/// On a loop-capped device a row-tiled workgroup keeps at least 16 invocations: an 8 x 8 block
/// on 8 rows (8 invocations) takes 8 x 4 there; a GPU keeps 8 x 8.
#[test]
fn loop_capped_row_tiles_keep_16_invocations() {
    let d = dims(1, 6, 1, 1, 4096, 64);
    let opts = Attention::new().path(Path::Decode);
    for (limits, want) in [(lavapipe(), TileBlock::B8X4), (h100(), TileBlock::B8X8)] {
        let mut l = limits;
        l.tile.decode_kernel = DecodeKernel::RowTiles;
        l.tile.min_decode_rows = 8;
        l.tile.fused_block = TileBlock::B8X8;
        let p = plan(&opts, &l, d).unwrap();
        let Plan::Decode { plan: f, .. } = &p else {
            panic!("{}", p.reason())
        };
        assert_eq!((f.rows_per_workgroup, f.block), (8, want), "{}", p.reason());
        assert!(
            f.invocations >= 16 || l.max_key_tiles_per_workgroup == u32::MAX,
            "{}",
            p.reason()
        );
    }
}

/// Q stays in workgroup memory where it fits beside the rest: on lavapipe's 32 KiB, 64 rows
/// up to head_dim 16 and the decode path's 16-row tiles up to 128 (their tile of
/// probabilities is 4 KiB; at 256 the 8 x 4 block's row reduction takes the room); on an
/// H100's 48 KiB, 64 rows
/// up to 64 with 8 x 4 blocks (its table entry). The configuration turns it off, and the
/// decode-shaped kernel never has it.
#[test]
fn resident_q_where_workgroup_memory_holds_it() {
    let fused = |l: &GpuLimits, d: Dims, opts: &Attention| -> FusedPlan {
        match plan(opts, l, d).unwrap() {
            Plan::Fused { plan, .. } | Plan::Decode { plan, .. } => plan,
            p => panic!("{}", p.reason()),
        }
    };
    let prefill = Attention::new().path(Path::Fused);
    let lp = lavapipe();
    for (head_dim, want) in [(1, 1), (16, 1), (17, 0), (64, 0)] {
        let p = fused(&lp, dims(1, 2, 2, 300, 300, head_dim), &prefill);
        assert_eq!(
            (p.rows_per_workgroup, p.resident_q),
            (64, want),
            "D={head_dim}"
        );
    }
    let mut tiles = lp;
    tiles.tile.decode_kernel = DecodeKernel::RowTiles;
    tiles.tile.min_decode_rows = 16;
    let decode = Attention::new().path(Path::Decode);
    for (head_dim, want) in [(64, 4), (80, 5), (96, 6), (128, 8), (256, 0)] {
        let p = fused(&tiles, dims(1, 12, 1, 1, 5000, head_dim), &decode);
        assert_eq!(
            (p.rows_per_workgroup, p.resident_q),
            (16, want),
            "D={head_dim}"
        );
    }
    let p = fused(&lp, dims(1, 4, 1, 1, 5000, 64), &decode);
    assert!(p.keys_across_invocations && p.resident_q == 0, "{p:?}");
    let h = h100();
    for (head_dim, want) in [(64, 4), (72, 0), (128, 0)] {
        let p = fused(&h, dims(4, 16, 16, 4096, 4096, head_dim), &prefill);
        assert_eq!(
            (p.block, p.resident_q),
            (TileBlock::B8X4, want),
            "D={head_dim}"
        );
    }
    let mut off = h;
    off.tile.resident_q = false;
    let p = fused(&off, dims(4, 16, 16, 4096, 4096, 64), &prefill);
    assert_eq!(p.resident_q, 0);
}

/// Up to 16 rows per kv head take the decode path over any number of keys; 17 to 64 only over
/// 1024 keys or more; more rows the fused path.
#[test]
fn auto_decodes_up_to_16_rows_at_any_length() {
    let l = lavapipe();
    let opts = Attention::new();
    for (d, want) in [
        (dims(1, 8, 8, 1, 128, 64), "decode"),
        (dims(1, 32, 8, 1, 64, 64), "decode"),
        (dims(1, 8, 8, 16, 256, 64), "decode"),
        (dims(1, 8, 8, 17, 256, 64), "fused"),
        (dims(1, 8, 8, 17, 1024, 64), "decode"),
        (dims(1, 8, 8, 64, 1024, 64), "decode"),
        (dims(1, 8, 8, 65, 4096, 64), "fused"),
    ] {
        let p = plan(&opts, &l, d).unwrap();
        assert_eq!(p.name(), want, "{d:?}: {}", p.reason());
    }
}

/// The second staging buffer where the configuration asks for it, the workgroup has at least
/// 64 invocations and workgroup memory holds it beside resident Q: never at 64 rows on
/// lavapipe's 32 KiB; at 32 rows there with 8 x 4 blocks (64 invocations), not 8 x 8 (32), and
/// beside resident Q only where head_dim is at most 16; on
/// an H100's 48 KiB at 64 rows where Q is not resident (head_dim 128), not beside resident Q
/// (head_dim 64); never on the decode-shaped kernel.
#[test]
fn double_buffer_where_it_fits() {
    let fused = |l: &GpuLimits, d: Dims, opts: &Attention| -> FusedPlan {
        match plan(opts, l, d).unwrap() {
            Plan::Fused { plan, .. } | Plan::Decode { plan, .. } => plan,
            p => panic!("{}", p.reason()),
        }
    };
    let prefill = Attention::new().path(Path::Fused);
    let decode = Attention::new().path(Path::Decode);
    let mut lp = lavapipe();
    lp.tile.double_buffer = true;
    for head_dim in [16, 64] {
        let p = fused(&lp, dims(1, 2, 2, 300, 300, head_dim), &prefill);
        assert_eq!(
            (p.rows_per_workgroup, p.double_buffer),
            (64, false),
            "{p:?}"
        );
    }
    let mut tiles = lp;
    tiles.tile.decode_kernel = DecodeKernel::RowTiles;
    tiles.tile.fused_block = TileBlock::B8X4;
    for (head_dim, resident, double) in [(16, 1, true), (32, 2, false)] {
        let p = fused(&tiles, dims(1, 24, 1, 1, 5000, head_dim), &decode);
        assert_eq!((p.resident_q, p.double_buffer), (resident, double), "{p:?}");
    }
    tiles.tile.resident_q = false;
    for (block, want) in [
        (TileBlock::B8X8, false),
        (TileBlock::B8X4, true),
        (TileBlock::B4X4, true),
    ] {
        tiles.tile.fused_block = block;
        let p = fused(&tiles, dims(1, 24, 1, 1, 5000, 64), &decode);
        assert_eq!(
            (p.rows_per_workgroup, p.block, p.double_buffer),
            (32, block, want),
            "{p:?}"
        );
    }
    let p = fused(&lp, dims(1, 4, 1, 1, 5000, 64), &decode);
    assert!(p.keys_across_invocations && !p.double_buffer, "{p:?}");
    let h = h100();
    for (head_dim, resident, double) in [(64, 4, false), (128, 0, true)] {
        let p = fused(&h, dims(4, 16, 16, 4096, 4096, head_dim), &prefill);
        assert_eq!((p.resident_q, p.double_buffer), (resident, double), "{p:?}");
    }
    let mut not_resident = h;
    not_resident.tile.resident_q = false;
    let p = fused(&not_resident, dims(4, 16, 16, 4096, 4096, 64), &prefill);
    assert_eq!((p.resident_q, p.double_buffer), (0, true), "{p:?}");
    let mut off = h;
    off.tile.double_buffer = false;
    let p = fused(&off, dims(4, 16, 16, 4096, 4096, 128), &prefill);
    assert!(!p.double_buffer, "{p:?}");
}

/// The 16-bit products (`FusedPlan::mma`): only for native f16 inputs and where asked for; on
/// cooperative matrices at 64 rows on an H100's 48 KiB for every width up to 256 (Q, K and V
/// staged 64 dims at a time), at 32 rows on Apple's 32 KiB with 8 x 8 matrices, emulated at 32
/// rows on lavapipe (64 do not fit there), on 16-row decode tiles, and never past 256 dims, on
/// the decode-shaped kernel, or without the device's matrices.
#[test]
fn sixteen_bit_products_where_they_fit() {
    let with = |mut l: GpuLimits, mma| {
        l.tile.mma = mma;
        l
    };
    let mma_of = |l: &GpuLimits, opts: &Attention, d: Dims, half: bool| {
        let spec = opts.validate(d).unwrap();
        match choose(&spec, l, false, half).unwrap() {
            Plan::Fused { plan, .. } | Plan::Decode { plan, .. } => plan
                .mma
                .map(|m| (m, plan.rows_per_workgroup, plan.invocations, plan.passes)),
            Plan::ThreePass { .. } => None,
        }
    };
    let fused = Attention::new().path(Path::Fused);
    let nvidia = with(h100(), MmaChoice::Cooperative);
    for d in [64, 100, 128, 256] {
        let (m, rows, inv, _) = mma_of(&nvidia, &fused, dims(4, 16, 16, 4096, 4096, d), true)
            .unwrap_or_else(|| panic!("head_dim {d}"));
        assert!(m.cooperative && m.size == 16 && m.subgroup == 32);
        assert_eq!((rows, inv), (64, 128), "head_dim {d}");
        assert_eq!(m.q_dims, (d as u32).div_ceil(64) * 64);
        // f32 inputs, the configuration off, no matrices: the scalar products.
        assert!(mma_of(&nvidia, &fused, dims(4, 16, 16, 4096, 4096, d), false).is_none());
        let off = with(h100(), MmaChoice::Off);
        assert!(mma_of(&off, &fused, dims(4, 16, 16, 4096, 4096, d), true).is_none());
        let bare = GpuLimits {
            cooperative_matrix: 0,
            ..nvidia
        };
        assert!(mma_of(&bare, &fused, dims(4, 16, 16, 4096, 4096, d), true).is_none());
    }
    assert!(mma_of(&nvidia, &fused, dims(1, 2, 2, 100, 100, 320), true).is_none());
    let apple = with(apple_m(), MmaChoice::Cooperative);
    let (m, rows, ..) = mma_of(&apple, &fused, dims(2, 8, 8, 1000, 1000, 128), true).unwrap();
    assert_eq!((m.size, rows), (8, 32));
    // lavapipe: emulated at 32 rows, and at most 8 key tiles per dispatch under its loop limit.
    let lvp = with(lavapipe(), MmaChoice::Emulated);
    let (m, rows, _, passes) = mma_of(&lvp, &fused, dims(1, 2, 2, 100, 1000, 64), true).unwrap();
    assert!(!m.cooperative);
    assert_eq!((rows, passes), (32, 2));
    // The decode path: 16-row tiles take them; the decode-shaped kernel does not.
    let decode = Attention::new().path(Path::Decode);
    let tiles = GpuLimits {
        tile: TileConfig {
            decode_kernel: DecodeKernel::RowTiles,
            ..lvp.tile
        },
        ..lvp
    };
    let (_, rows, ..) = mma_of(&tiles, &decode, dims(1, 12, 1, 1, 500, 64), true).unwrap();
    assert_eq!(rows, 16);
    assert!(mma_of(&lvp, &decode, dims(1, 12, 1, 1, 500, 64), true).is_none());
}
