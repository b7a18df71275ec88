//! Score and mask mods and key ranges of the user's own (`Attention::score_mod`,
//! FlexAttention's `score_mod` and `mask_mod`, and its block sparsity by rows): every GPU path
//! against the f64 reference running the mods' CPU forms, with every other option beside
//! them, half storage, the 16-bit products and passes, rows the mask mod empties, key ranges
//! beside a window's sink keys, a `KvCache` decoding under chunked attention, the ready-made
//! ranges, data that changes from call to call without a new pipeline, and bad mods as typed
//! errors. The backward is in `tests/backward.rs` (`score_mod_gradients`), packed batches in
//! `tests/varlen.rs`, the layer in `tests/mha.rs`, `cpu::fast` in `tests/cpu_fast.rs`
//! (`score_mods`).

#[macro_use]
mod common;

use std::sync::Arc;

use common::*;
use wgpu_attention::{Attention, Causal, DType, Dims, Error, KvCache, Path, ScoreMod, cpu};

/// A mask mod that removes a pattern crossing tiles and, past a sequence's first rows, its
/// last keys (through the lengths accessors), and a score mod that bends the score by a
/// per-head factor from the data plus offsets by place (through a helper): neither linear nor
/// the same from head to head. `kv_lens` / `q_lens` are the lengths the kernels see per
/// sequence (for the CPU forms, which have no accessors).
fn mods(heads: usize, kv_lens: Vec<usize>, q_lens: Vec<usize>) -> ScoreMod {
    let factors: Vec<f32> = (0..heads).map(|h| 0.5 + 0.3 * h as f32).collect();
    let f = factors.clone();
    let (kv, q) = (Arc::new(kv_lens), Arc::new(q_lens));
    ScoreMod::new()
        .helpers("fn test_offset(i: u32, j: u32) -> f32 { return 0.05 * f32(j % 7u) - 0.02 * f32(i % 5u); }")
        .mask_wgsl(
            "return ((i / 7u + j / 5u) % 3u != 1u) && (j + 3u < attn_kv_len(b) || i * 2u < attn_q_len(b));",
        )
        .mask_cpu(move |b, _h, i, j| {
            (i / 7 + j / 5) % 3 != 1 && (j + 3 < kv[b] || i * 2 < q[b])
        })
        .score_wgsl("return s * attn_data_f32(h) + test_offset(i, j);")
        .score_cpu(move |s, _b, h, i, j| {
            s * f[h] as f64 + 0.05 * (j % 7) as f64 - 0.02 * (i % 5) as f64
        })
        .grad_wgsl("return attn_data_f32(h);")
        // A key range narrowing each row to a band that drifts with it: whole key tiles fall
        // outside some rows' and every row's ranges, which the kernels then skip.
        .range_wgsl("let lo = i / 16u * 8u; return vec2<u32>(lo, lo + 48u + i % 5u);")
        .range_cpu(|_b, i| (i / 16 * 8, i / 16 * 8 + 48 + i % 5))
        .data_f32(&factors)
}

/// The cases every path runs: the mods alone, beside every other option, one query over many
/// keys (the decode kernel's keys across invocations), and a few queries of a group (row tiles
/// with splits).
fn cases() -> Vec<(Dims, Attention)> {
    let mut r = rng(17);
    let d = dims(2, 4, 2, 37, 70, 24, 20);
    let mask = random_mask(&mut r, 2 * 37 * 70, 0.85);
    let everything = Attention::new()
        .score_mod(mods(4, vec![70, 51], vec![37, 37]))
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
        (
            d,
            Attention::new().score_mod(mods(4, vec![70; 2], vec![37; 2])),
        ),
        (d, everything),
        (
            dims(1, 8, 2, 1, 300, 64, 64),
            Attention::new()
                .score_mod(mods(8, vec![300], vec![1]))
                .layout(wgpu_attention::Layout::Bshd),
        ),
        (
            dims(1, 8, 2, 9, 1100, 40, 40),
            Attention::new()
                .score_mod(mods(8, vec![1100], vec![9]))
                .causal(Causal::BottomRight),
        ),
    ]
}

#[test]
fn every_path_against_the_reference() {
    let Some(gpu) = gpu() else { return };
    for (n, (dims, opts)) in cases().into_iter().enumerate() {
        for path in [Path::ThreePass, Path::Fused, Path::Decode, Path::Auto] {
            check(gpu, path, dims, &opts, 300 + n as u64, 3.0);
        }
    }
}

#[test]
fn half_storage_products_and_passes() {
    let Some(gpu) = gpu() else { return };
    let [(d, plain), (d2, everything), ..] = &cases()[..] else {
        unreachable!()
    };
    half_storage_passes_and_products(
        gpu,
        (*d, plain),
        (*d2, everything),
        [DType::Bf16, DType::F8E4M3, DType::F16, DType::F32],
        310,
    );
}

/// The mods change O (so the reference check above could not pass with a kernel that ignored
/// them), and rows the mask mod empties are zeros with a log-sum-exp of -inf on every path.
#[test]
fn mods_act_and_emptied_rows_are_zero() {
    let Some(gpu) = gpu() else { return };
    let d = dims(1, 2, 1, 21, 90, 16, 16);
    let mut r = rng(19);
    let layout = wgpu_attention::Layout::Bhsd;
    let q = gpu
        .upload(&random(&mut r, d.q_elems(), 2.0), d.q_shape(layout))
        .unwrap();
    let k = gpu
        .upload(&random(&mut r, d.k_elems(), 1.0), d.k_shape(layout))
        .unwrap();
    let v = gpu
        .upload(&random(&mut r, d.v_elems(), 1.0), d.v_shape(layout))
        .unwrap();
    let empties = ScoreMod::new()
        .mask_wgsl("return i % 4u != 1u;")
        .mask_cpu(|_, _, i, _| i % 4 != 1);
    for path in [Path::ThreePass, Path::Fused, Path::Decode] {
        let run = |opts: Attention| {
            let out = opts
                .path(path)
                .return_lse(true)
                .run(gpu, &q, &k, &v)
                .unwrap();
            (
                out.o.download(gpu).unwrap(),
                out.lse.unwrap().download(gpu).unwrap(),
            )
        };
        let (plain, _) = run(Attention::new());
        let (bent, _) = run(Attention::new().score_mod(mods(2, vec![90], vec![21])));
        assert!(
            rel_norm_error(&bent, &plain) > 1e-2,
            "{path:?}: the mods changed nothing"
        );
        let (o, lse) = run(Attention::new().score_mod(empties.clone()));
        for i in 0..2 * 21 {
            let row = &o[i * 16..][..16];
            if i % 21 % 4 == 1 {
                assert!(row.iter().all(|&x| x == 0.0), "{path:?} row {i}: {row:?}");
                assert_eq!(lse[i], f32::NEG_INFINITY, "{path:?} row {i}");
            } else {
                assert!(lse[i].is_finite() && row.iter().any(|&x| x != 0.0));
            }
        }
    }
}

/// Decoding through a `KvCache` under Llama 4's chunked attention (each token sees the tokens
/// of its own chunk of 8 up to itself): the key range computes each new row's absolute
/// position from the lengths, as the module docs say, and `ScoreMod::chunked` does the same.
#[test]
fn kv_cache_decoding_under_a_chunked_mask() {
    let Some(gpu) = gpu() else { return };
    let (batch, heads, kv_heads, cap, d) = (2, 4, 2, 160, 24);
    let mut cache = KvCache::new(gpu, batch, kv_heads, cap, d, d).unwrap();
    let mut host_k = vec![0f32; batch * kv_heads * cap * d];
    let mut host_v = host_k.clone();
    let mut r = rng(330);
    for (step, new) in [[100usize, 77], [1, 1], [3, 1]].iter().enumerate() {
        let t = *new.iter().max().unwrap();
        let k = random(&mut r, batch * kv_heads * t * d, 1.0);
        let v = random(&mut r, batch * kv_heads * t * d, 1.0);
        let start: Vec<usize> = cache.lens().iter().map(|&l| l as usize).collect();
        cache.append(gpu, &k, &v, new).unwrap();
        mirror_append(&mut host_k, &k, (kv_heads, cap, d), &start, new);
        mirror_append(&mut host_v, &v, (kv_heads, cap, d), &start, new);
        let lens: Vec<usize> = cache.lens().iter().map(|&l| l as usize).collect();
        // The chunk as a key range (the kernels skip the other chunks' tiles).
        let chunked = {
            let (lens, new) = (lens.clone(), *new);
            ScoreMod::new()
                .range_wgsl(
                    "let c = (attn_kv_len(b) - attn_q_len(b) + i) / 8u * 8u; \
                     return vec2<u32>(c, c + 8u);",
                )
                .range_cpu(move |b, i| {
                    let c = (lens[b] - new[b] + i) / 8 * 8;
                    (c, c + 8)
                })
        };
        let q = random(&mut r, batch * heads * t * d, 1.0);
        let tq = gpu.upload(&q, [batch, heads, t, d]).unwrap();
        let opts = Attention::new()
            .causal(Causal::BottomRight)
            .q_lens(new.iter().map(|&n| n as u32).collect())
            .score_mod(chunked)
            .return_lse(true);
        let out = cache.attend(gpu, &tq, &opts).unwrap();
        // The ready-made mod numbers the new rows by position too: the same answer.
        let ready = opts.clone().score_mod(ScoreMod::chunked(8));
        let o_ready = cache
            .attend(gpu, &tq, &ready)
            .unwrap()
            .o
            .download(gpu)
            .unwrap();
        let full = Dims {
            batch,
            heads,
            kv_heads,
            q_len: t,
            kv_len: cap,
            head_dim: d,
            v_head_dim: d,
        };
        let want = cpu::reference(
            &q,
            &host_k,
            &host_v,
            full,
            &opts
                .clone()
                .kv_lens(lens.iter().map(|&l| l as u32).collect()),
        )
        .unwrap();
        let o = out.o.download(gpu).unwrap();
        // Rows past a sequence's new tokens hold anything; compare the real ones.
        for (b, &rows) in new.iter().enumerate() {
            for h in 0..heads {
                for i in 0..rows {
                    let at = ((b * heads + h) * t + i) * d;
                    for (what, o) in [("own", &o), ("ready-made", &o_ready)] {
                        assert_close(
                            &format!("{what}: step {step} b {b} h {h} row {i}"),
                            &o[at..at + d],
                            &want.o[at..at + d],
                            O_ATOL,
                            O_RTOL,
                        );
                    }
                }
            }
        }
    }
}

/// New data is uploaded with each call: the results follow it, and no pipeline is compiled
/// for it (the source is the same).
#[test]
fn data_changes_without_a_new_pipeline() {
    let Some(gpu) = gpu() else { return };
    let d = dims(1, 3, 3, 20, 45, 16, 16);
    let with = |factors: &[f32]| {
        let f = factors.to_vec();
        Attention::new().score_mod(
            ScoreMod::new()
                .score_wgsl("return s * attn_data_f32(h * 2u) + attn_data_f32(h * 2u + 1u);")
                .score_cpu(move |s, _, h, _, _| s * f[2 * h] as f64 + f[2 * h + 1] as f64)
                .data_f32(factors),
        )
    };
    check(
        gpu,
        Path::Fused,
        d,
        &with(&[1.0, 0.0, 2.0, 0.5, 0.3, -1.0]),
        340,
        2.0,
    );
    let compiled = gpu.pipelines_compiled();
    check(
        gpu,
        Path::Fused,
        d,
        &with(&[0.2, 3.0, 1.5, -0.5, 4.0, 1.0]),
        341,
        2.0,
    );
    assert_eq!(
        gpu.pipelines_compiled(),
        compiled,
        "new data compiled a pipeline"
    );
}

#[test]
fn bad_mods_are_typed_errors() {
    let d = Dims::new(1, 1, 4, 8);
    let x = vec![0.5f32; 32];
    let is_mod_error = |e: &Error| {
        matches!(
            e,
            Error::InvalidOption {
                what: "score mod",
                ..
            }
        )
    };
    // The CPU paths run the closures: a WGSL-only mod is refused.
    let wgsl_only = Attention::new().score_mod(ScoreMod::new().mask_wgsl("return j <= i;"));
    let e = cpu::reference(&x, &x, &x, d, &wgsl_only).unwrap_err();
    assert!(is_mod_error(&e), "{e}");
    let e = cpu::fast(&x, &x, &x, d, &wgsl_only).unwrap_err();
    assert!(is_mod_error(&e), "{e}");
    let Some(gpu) = gpu() else { return };
    let t = gpu.upload(&x, [1, 1, 4, 8]).unwrap();
    // The GPU runs the WGSL: a CPU-only mod is refused; and bad WGSL, on every path.
    let cpu_only = ScoreMod::new().score_cpu(|s, _, _, _, _| s);
    let bad = [
        ("not WGSL", ScoreMod::new().mask_wgsl("return banana;")),
        (
            "a range of the wrong type",
            ScoreMod::new().range_wgsl("return vec2<i32>(0, 4);"),
        ),
        ("wrong type", ScoreMod::new().score_wgsl("return 1u;")),
        (
            "a kernel's own uniform",
            ScoreMod::new().mask_wgsl("return mparams.q_len > i;"),
        ),
        (
            "a missing helper",
            ScoreMod::new().score_wgsl("return my_helper(s);"),
        ),
        ("CPU only", cpu_only),
        // Helpers named like the kernels' own functions (`hmax` is the fused kernel's only: a
        // review found it failed there alone, as an untyped error).
        (
            "a helper named like a fragment's function",
            ScoreMod::new()
                .helpers("fn mix32(x: u32) -> u32 { return x * 3u; }")
                .mask_wgsl("return j <= i;"),
        ),
        (
            "a helper named like one kernel's function",
            ScoreMod::new()
                .helpers("fn hmax(x: f32) -> f32 { return x; }")
                .mask_wgsl("return j <= i;"),
        ),
        // The same, or a reserved attn_ name, as a line's second declaration or after a block
        // comment (a review found those missed by the first name scan).
        (
            "a kernel's name second on a line",
            ScoreMod::new()
                .helpers("fn my_a() -> u32 { return 0u; } fn hmax(x: f32) -> f32 { return x; }")
                .mask_wgsl("return j <= i;"),
        ),
        (
            "a reserved name second on a line",
            ScoreMod::new()
                .helpers("fn my_a() -> u32 { return 0u; } fn attn_mine() -> u32 { return 1u; }")
                .mask_wgsl("return j <= i;"),
        ),
        (
            "a reserved name after a block comment",
            ScoreMod::new()
                .helpers("/* mine */ fn attn_mine() -> u32 { return 1u; }")
                .mask_wgsl("return j <= i;"),
        ),
    ];
    for (what, m) in bad {
        for path in [Path::ThreePass, Path::Fused, Path::Decode] {
            let e = Attention::new()
                .score_mod(m.clone())
                .path(path)
                .run(gpu, &t, &t, &t)
                .unwrap_err();
            assert!(is_mod_error(&e), "{what} on {path:?}: {e}");
        }
    }
    // The compiler's message reaches the caller.
    let e = Attention::new()
        .score_mod(ScoreMod::new().mask_wgsl("return banana;"))
        .run(gpu, &t, &t, &t)
        .unwrap_err();
    assert!(e.to_string().contains("banana"), "{e}");
    // A good mod after the bad ones runs.
    let good = ScoreMod::new()
        .mask_wgsl("return j <= i;")
        .mask_cpu(|_, _, i, j| j <= i);
    check(
        gpu,
        Path::Fused,
        dims(1, 1, 1, 4, 8, 8, 8),
        &Attention::new().score_mod(good),
        350,
        1.0,
    );
}

/// A key range beside a window with sink keys: the sink keys stay visible beside the range as
/// beside the window, on every path, also for rows whose range is empty (`cpu::fast` runs the
/// same case in `tests/cpu_fast.rs`).
#[test]
fn key_range_beside_a_window_and_sink_keys() {
    let Some(gpu) = gpu() else { return };
    let d = dims(1, 4, 2, 70, 200, 16, 16);
    let m = ScoreMod::new()
        .range_wgsl(
            "if i % 9u == 4u { return vec2<u32>(5u, 5u); } return vec2<u32>(i + 40u, i + 130u);",
        )
        .range_cpu(|_, i| {
            if i % 9 == 4 {
                (5, 5)
            } else {
                (i + 40, i + 130)
            }
        });
    let opts = Attention::new()
        .score_mod(m)
        .window(100, 100)
        .sink_keys(3)
        .causal(Causal::BottomRight);
    for path in [Path::ThreePass, Path::Fused, Path::Decode] {
        check(gpu, path, d, &opts, 370, 2.0);
    }
    // Row 10: the window and causal alignment give 40..141, the range 50..140; row 13's
    // range is empty, and it sees the three sink keys alone.
    let spec = opts.validate(d).unwrap();
    assert_eq!(spec.key_range(0, 10), (50, 140));
    assert_eq!(spec.key_range(0, 13), (0, 0));
    assert_eq!(spec.sink_end(0, 13), 3);
}

/// The ready-made mods (chunked attention, a prefix LM, packed documents) on every path against
/// the reference, which runs their CPU forms, and the patterns they stand for checked on the
/// reference's weights; through the backward too.
#[test]
fn ready_made_mods() {
    let Some(gpu) = gpu() else { return };
    let d = dims(2, 4, 2, 150, 150, 24, 24);
    // Entry 1 holds 130 tokens: its rows 130.. see no key (zeros, checked through `sees`).
    let docs = vec![vec![40, 1, 70, 39], vec![100, 30]];
    let cases = [
        (
            "chunked",
            Attention::new()
                .causal(Causal::BottomRight)
                .score_mod(ScoreMod::chunked(64)),
        ),
        (
            "prefix LM",
            Attention::new().score_mod(ScoreMod::prefix_lm(37)),
        ),
        (
            "documents",
            Attention::new()
                .causal(Causal::BottomRight)
                .score_mod(ScoreMod::documents(&docs).unwrap()),
        ),
    ];
    // Where each pattern lets row i of entry b see key j.
    let doc_of = |b: usize, t: usize| {
        let mut start = 0;
        for &len in &docs[b] {
            if t < start + len {
                return Some(start);
            }
            start += len;
        }
        None
    };
    let sees = [
        &(|_: usize, i: usize, j: usize| j <= i && j / 64 == i / 64)
            as &dyn Fn(usize, usize, usize) -> bool,
        &|_, i, j| j < 37 || j <= i,
        &|b, i, j| j <= i && doc_of(b, i).is_some() && doc_of(b, i) == doc_of(b, j),
    ];
    // More rows than keys: rows before the first key's position (the first 8 here) see none.
    let short = dims(1, 2, 1, 20, 12, 8, 8);
    for path in [Path::ThreePass, Path::Fused, Path::Decode] {
        check(gpu, path, short, &cases[1].1, 379, 2.0);
    }
    for (n, ((what, opts), sees)) in cases.iter().zip(sees).enumerate() {
        for path in [Path::ThreePass, Path::Fused, Path::Decode] {
            check(gpu, path, d, opts, 380 + n as u64, 2.0);
        }
        let mut r = rng(390 + n as u64);
        let q = random(&mut r, d.q_elems(), 1.0);
        let k = random(&mut r, d.k_elems(), 1.0);
        let w = cpu::reference(&q, &k, &k, d, &opts.clone().return_weights(true))
            .unwrap()
            .weights;
        for b in 0..2 {
            for i in 0..150 {
                for j in 0..150 {
                    let p = w[((b * 4 + 1) * 150 + i) * 150 + j];
                    assert_eq!(p > 0.0, sees(b, i, j), "{what}: b {b} row {i} key {j}");
                }
            }
        }
    }
}

/// A ready-made mod takes the user's data, helpers, and mask and score mods beside its range
/// (its words follow the user's), and a range of the user's replaces its own whole; documents
/// too long for the table are a typed error (each found by a review: the user's data replaced
/// the chunk size on the GPU only, helpers dropped the position helper, an overriding range's
/// CPU form was still given positions, and a length sum overflowed into a panic).
#[test]
fn ready_made_mods_beside_the_users_parts() {
    let Some(gpu) = gpu() else { return };
    let d = dims(1, 2, 2, 40, 40, 16, 16);
    let with_data = ScoreMod::chunked(8)
        .helpers("fn my_pen(x: f32) -> f32 { return x * 0.5; }")
        .score_wgsl("return my_pen(s) - attn_data_f32(h);")
        .score_cpu(|s, _, h, _, _| s * 0.5 - [0.5, 0.25][h])
        .data_f32(&[0.5, 0.25]);
    let docs = ScoreMod::documents(&[vec![20, 20]])
        .unwrap()
        .helpers("fn my_half(x: f32) -> f32 { return x * 0.5; }")
        .score_wgsl("return my_half(s);")
        .score_cpu(|s, _, _, _, _| s * 0.5)
        .data_u32(vec![7, 8, 9]);
    let replaced = ScoreMod::prefix_lm(0)
        .range_wgsl("return vec2<u32>(0u, i + 1u);")
        .range_cpu(|_, i| (0, i + 1));
    for (what, m, q_len) in [
        ("chunked with data", with_data, 40),
        ("documents with data", docs, 40),
        ("prefix LM's range replaced", replaced, 8),
    ] {
        let opts = Attention::new().causal(Causal::BottomRight).score_mod(m);
        let d = dims(1, 2, 2, q_len, d.kv_len, 16, 16);
        for path in [Path::Fused, Path::Decode] {
            eprintln!("{what} on {path:?}");
            check(gpu, path, d, &opts, 395, 1.0);
        }
    }
    // A range replacing a ready-made one in one form only leaves the other form missing.
    let half = ScoreMod::chunked(8).range_wgsl("return vec2<u32>(0u, i + 1u);");
    let x = vec![0.5f32; 32];
    let e = cpu::reference(
        &x,
        &x,
        &x,
        Dims::new(1, 1, 4, 8),
        &Attention::new().score_mod(half),
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidOption {
                what: "score mod",
                ..
            }
        ),
        "{e}"
    );
    for docs in [vec![vec![usize::MAX, 2]], vec![vec![1 << 20]; 1 << 8]] {
        let e = ScoreMod::documents(&docs).unwrap_err();
        assert!(
            matches!(
                e,
                Error::InvalidOption {
                    what: "documents",
                    ..
                }
            ),
            "{e}"
        );
    }
}
