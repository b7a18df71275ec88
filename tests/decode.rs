//! The decode path (flash-decoding: the fused kernel with the keys split across workgroups,
//! GQA groups packed, partials merged by log-sum-exp) against the f64 reference.

#[macro_use]
mod common;

use wgpu_attention::{Path, Plan};

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

/// Each rows-per-workgroup configuration of the decode path (4 to 64) on shapes that fill
/// none of them exactly, with masks and with the keys split and capped, against the reference;
/// under this adapter's minimum and under the GPUs' (16).
#[test]
fn every_row_configuration() {
    let Some(gpu) = gpu() else { return };
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
            let min = base.limits().min_decode_rows;
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
