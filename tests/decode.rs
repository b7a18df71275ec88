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

/// Each rows-per-workgroup configuration of the decode path (16, 32, 64) on shapes that fill
/// none of them exactly, with masks and with the keys split and capped, against the reference.
#[test]
fn every_row_configuration() {
    let Some(gpu) = gpu() else { return };
    let capped = gpu.with_caps(wgpu_attention::LimitCaps {
        max_key_tiles_per_workgroup: Some(2),
        ..Default::default()
    });
    // (heads, kv_heads, q_len) -> group * q_len rows per kv head, and the configuration.
    for (n, &(h, hkv, l, rows)) in [(6, 2, 5, 16), (8, 2, 7, 32), (4, 2, 40, 64), (3, 3, 1, 16)]
        .iter()
        .enumerate()
    {
        let d = dims(2, h, hkv, l, 700, 40, 72);
        let opts = Attention::new()
            .causal(Causal::BottomRight)
            .kv_lens(vec![700, 333]);
        for (g, name) in [(gpu, "device"), (&capped, "capped")] {
            let plan = opts.clone().path(Path::Decode).plan(g, d).unwrap();
            let Plan::Decode { plan: p, .. } = &plan else {
                panic!("{}", plan.reason())
            };
            assert_eq!(p.rows_per_workgroup, rows, "{name}: {}", plan.reason());
            check(g, Path::Decode, d, &opts, 1800 + n as u64, 1.0);
            let masked = opts.clone().softcap(20.0).window(100, 0);
            check(g, Path::Decode, d, &masked, 1810 + n as u64, 3.0);
        }
    }
}
