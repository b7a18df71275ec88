//! `KvCache` filled in several appends, and the merge of partial results over disjoint keys,
//! on the GPU and the CPU, against the f64 reference on the whole problem.

mod common;

use common::{O_ATOL, O_RTOL, assert_close, dims, gpu, mirror_append, random, rng};
use wgpu_attention::gpu::merge;
use wgpu_attention::{Attention, Causal, Dims, Error, KvCache, Layout, Path, cpu};

/// Decoding: a prompt, then single tokens, then a ragged chunk, with two sequences of
/// different lengths; every step checked against the reference on the host copy of the cache,
/// and on the kernel the decode path picks for it.
#[test]
fn cache_filled_in_several_appends() {
    let Some(gpu) = gpu() else { return };
    let (batch, heads, kv_heads, cap, d, dv) = (2, 8, 2, 1200, 40, 24);
    let mut cache = KvCache::new(gpu, batch, kv_heads, cap, d, dv).unwrap();
    let mut host_k = vec![0f32; batch * kv_heads * cap * d];
    let mut host_v = vec![0f32; batch * kv_heads * cap * dv];
    let mut r = rng(1900);
    let steps: [[usize; 2]; 5] = [[1030, 700], [1, 1], [1, 0], [5, 3], [16, 16]];
    for (step, new) in steps.iter().enumerate() {
        let t = *new.iter().max().unwrap();
        let k = random(&mut r, batch * kv_heads * t * d, 1.0);
        let v = random(&mut r, batch * kv_heads * t * dv, 1.0);
        let start: Vec<usize> = cache.lens().iter().map(|&l| l as usize).collect();
        if step % 2 == 0 {
            cache.append(gpu, &k, &v, new).unwrap();
        } else {
            let tk = gpu.upload(&k, [batch, kv_heads, t, d]).unwrap();
            let tv = gpu.upload(&v, [batch, kv_heads, t, dv]).unwrap();
            cache.append_tensors(gpu, &tk, &tv, new).unwrap();
        }
        mirror_append(&mut host_k, &k, (kv_heads, cap, d), &start, new);
        mirror_append(&mut host_v, &v, (kv_heads, cap, dv), &start, new);
        // The new tokens' queries; a sequence that appended fewer has fewer real queries.
        let q = random(&mut r, batch * heads * t * d, 1.0);
        let tq = gpu.upload(&q, [batch, heads, t, d]).unwrap();
        let q_lens: Vec<u32> = new.iter().map(|&n| n as u32).collect();
        let opts = Attention::new().q_lens(q_lens.clone()).return_lse(true);
        let out = cache.attend(gpu, &tq, &opts).unwrap();
        let lens = cache.lens().to_vec();
        let full = Dims {
            batch,
            heads,
            kv_heads,
            q_len: t,
            kv_len: cap,
            head_dim: d,
            v_head_dim: dv,
        };
        let want_opts = Attention::new()
            .q_lens(q_lens)
            .kv_lens(lens)
            .causal(Causal::BottomRight);
        // What attend ran: the fused path for the prompt, then the decode path, on the
        // decode-shaped kernel for up to 16 rows per kv head (one token here), the row-tiled
        // one past that.
        let plan = want_opts.plan(gpu, full).unwrap();
        let rows = heads / kv_heads * t;
        match &plan {
            wgpu_attention::Plan::Decode { plan: p, .. } => {
                assert!(rows <= 64, "{}", plan.reason());
                assert_eq!(p.keys_across_invocations, rows <= 16, "{}", plan.reason());
            }
            wgpu_attention::Plan::Fused { .. } => assert!(rows > 64, "{}", plan.reason()),
            _ => panic!("{}", plan.reason()),
        }
        let want = cpu::reference(&q, &host_k, &host_v, full, &want_opts).unwrap();
        let ctx = format!("step {step}, appended {new:?}");
        assert_close(
            &format!("O, {ctx}"),
            &out.o.download(gpu).unwrap(),
            &want.o,
            O_ATOL,
            O_RTOL,
        );
        assert_close(
            &format!("lse, {ctx}"),
            &out.lse.unwrap().download(gpu).unwrap(),
            &want.lse,
            2e-5,
            2e-5,
        );
    }
    assert_eq!(cache.lens(), &[1053, 720]);
    // Past the capacity: a typed error, and nothing changes.
    let err = cache.append(
        gpu,
        &vec![0.5; batch * kv_heads * 200 * d],
        &vec![0.5; batch * kv_heads * 200 * dv],
        &[200, 0],
    );
    assert!(
        matches!(
            err,
            Err(Error::LengthOutOfRange {
                index: 0,
                value: 1253,
                max: 1200,
                ..
            })
        ),
        "{err:?}"
    );
    assert_eq!(cache.lens(), &[1053, 720]);
    // Appending the cache's own buffers is an error, not a wgpu panic.
    let mut empty = KvCache::new(gpu, batch, kv_heads, cap, d, dv).unwrap();
    let (ek, ev) = (empty.k().clone(), empty.v().clone());
    let err = empty.append_tensors(gpu, &ek, &ev, &[cap, cap]);
    assert!(
        matches!(
            err,
            Err(Error::InvalidOption {
                what: "appended tensor",
                ..
            })
        ),
        "{err:?}"
    );
    let err = cache.attend(
        gpu,
        &gpu.upload(&vec![0.5; 2 * 8 * d], [2, 8, 1, d]).unwrap(),
        &Attention::new().kv_lens(vec![1, 1]),
    );
    assert!(
        matches!(
            err,
            Err(Error::InvalidOption {
                what: "kv_lens",
                ..
            })
        ),
        "{err:?}"
    );
}

/// Keys split in two, each half attended with its log-sum-exp, merged: equals the whole.
#[test]
fn merge_of_disjoint_key_sets() {
    let Some(gpu) = gpu() else { return };
    for (n, layout) in [Layout::Bhsd, Layout::Bshd].into_iter().enumerate() {
        let whole = dims(2, 4, 2, 33, 150, 40, 24);
        let split = 61;
        let mut r = rng(2000 + n as u64);
        let q = random(&mut r, whole.q_elems(), 3.0);
        let k = random(&mut r, whole.k_elems(), 1.0);
        let v = random(&mut r, whole.v_elems(), 1.0);
        // The halves of K and V along the key axis, in the layout.
        let take = |x: &[f32], dim: usize, lo: usize, hi: usize| -> Vec<f32> {
            let mut out = Vec::new();
            for b in 0..whole.batch {
                match layout {
                    Layout::Bhsd => {
                        for h in 0..whole.kv_heads {
                            let base = (b * whole.kv_heads + h) * whole.kv_len * dim;
                            out.extend_from_slice(&x[base + lo * dim..base + hi * dim]);
                        }
                    }
                    Layout::Bshd => {
                        let row = whole.kv_heads * dim;
                        let base = b * whole.kv_len * row;
                        out.extend_from_slice(&x[base + lo * row..base + hi * row]);
                    }
                }
            }
            out
        };
        let opts = Attention::new().layout(layout).return_lse(true);
        let mut parts = Vec::new();
        let mut host_parts = Vec::new();
        for (lo, hi) in [(0, split), (split, whole.kv_len)] {
            let part = Dims {
                kv_len: hi - lo,
                ..whole
            };
            let (pk, pv) = (
                take(&k, whole.head_dim, lo, hi),
                take(&v, whole.v_head_dim, lo, hi),
            );
            let want = cpu::reference(&q, &pk, &pv, part, &opts).unwrap();
            let out = opts
                .run(
                    gpu,
                    &gpu.upload(&q, part.q_shape(layout)).unwrap(),
                    &gpu.upload(&pk, part.k_shape(layout)).unwrap(),
                    &gpu.upload(&pv, part.v_shape(layout)).unwrap(),
                )
                .unwrap();
            parts.push(out);
            host_parts.push(want);
        }
        let merged = merge(
            gpu,
            parts[0].as_partial().unwrap(),
            parts[1].as_partial().unwrap(),
            layout,
        )
        .unwrap();
        let want = cpu::reference(&q, &k, &v, whole, &opts).unwrap();
        let ctx = format!("{layout:?}");
        assert_close(
            &format!("merged O, {ctx}"),
            &merged.o.download(gpu).unwrap(),
            &want.o,
            O_ATOL,
            O_RTOL,
        );
        assert_close(
            &format!("merged lse, {ctx}"),
            &merged.lse.unwrap().download(gpu).unwrap(),
            &want.lse,
            2e-5,
            2e-5,
        );
        // The CPU merge of the reference halves agrees too.
        let (o, lse) = cpu::merge(
            (&host_parts[0].o, &host_parts[0].lse),
            (&host_parts[1].o, &host_parts[1].lse),
            whole.o_shape(layout),
            layout,
        )
        .unwrap();
        assert_close(&format!("cpu merged O, {ctx}"), &o, &want.o, 1e-6, 1e-5);
        assert_close(
            &format!("cpu merged lse, {ctx}"),
            &lse,
            &want.lse,
            1e-6,
            1e-6,
        );
    }
}

/// A side with no allowed key (lse -inf) weighs nothing; both empty gives zeros and -inf.
#[test]
fn merge_with_empty_sides() {
    let Some(gpu) = gpu() else { return };
    let d = dims(2, 1, 1, 3, 20, 8, 8);
    let mut r = rng(2100);
    let q = random(&mut r, d.q_elems(), 1.0);
    let k = random(&mut r, d.k_elems(), 1.0);
    let v = random(&mut r, d.v_elems(), 1.0);
    let up = |x: &[f32], s| gpu.upload(x, s).unwrap();
    let (tq, tk, tv) = (
        up(&q, d.q_shape(Layout::Bhsd)),
        up(&k, d.k_shape(Layout::Bhsd)),
        up(&v, d.v_shape(Layout::Bhsd)),
    );
    let run = |kv_lens: Vec<u32>| {
        Attention::new()
            .return_lse(true)
            .kv_lens(kv_lens)
            .path(Path::Fused)
            .run(gpu, &tq, &tk, &tv)
            .unwrap()
    };
    // Sequence 0: empty on one side; sequence 1: empty on both.
    let a = run(vec![20, 0]);
    let b = run(vec![0, 0]);
    let merged = merge(
        gpu,
        a.as_partial().unwrap(),
        b.as_partial().unwrap(),
        Layout::Bhsd,
    )
    .unwrap();
    let want = cpu::reference(&q, &k, &v, d, &Attention::new().kv_lens(vec![20, 0])).unwrap();
    assert_close(
        "O",
        &merged.o.download(gpu).unwrap(),
        &want.o,
        O_ATOL,
        O_RTOL,
    );
    assert_close(
        "lse",
        &merged.lse.unwrap().download(gpu).unwrap(),
        &want.lse,
        2e-5,
        2e-5,
    );
    // Mismatched shapes are a typed error.
    let c = Attention::new()
        .return_lse(true)
        .run(
            gpu,
            &up(&q[..24], [1, 1, 3, 8]),
            &up(&k[..160], [1, 1, 20, 8]),
            &up(&v[..160], [1, 1, 20, 8]),
        )
        .unwrap();
    let err = merge(
        gpu,
        a.as_partial().unwrap(),
        c.as_partial().unwrap(),
        Layout::Bhsd,
    );
    assert!(matches!(err, Err(Error::ShapeMismatch { .. })), "{err:?}");
}

/// A side that saw no key (log-sum-exp `-inf`) weighs nothing on both merges, whatever its O
/// holds (NaN and infinities here: an outside review found the CPU merge turning such rows into
/// NaN while the GPU's skipped them); a NaN or `+inf` log-sum-exp is a typed error on the CPU.
#[test]
fn an_empty_side_is_not_read() {
    let (oa, la) = (vec![1.0f32, 2.0, 3.0, 4.0], vec![0.5f32, f32::NEG_INFINITY]);
    let (ob, lb) = (
        vec![f32::NAN, f32::INFINITY, 7.0, -2.0],
        vec![f32::NEG_INFINITY, 0.25],
    );
    let dims = [1, 1, 2, 2];
    let (o, lse) = cpu::merge((&oa, &la), (&ob, &lb), dims, Layout::Bhsd).unwrap();
    assert_eq!(o, [1.0, 2.0, 7.0, -2.0]);
    assert_eq!(lse, [0.5, 0.25]);
    for bad in [f32::NAN, f32::INFINITY] {
        let err = cpu::merge((&oa, &[bad, 0.0]), (&ob, &lb), dims, Layout::Bhsd).unwrap_err();
        assert!(matches!(err, Error::InvalidOption { .. }), "{err:?}");
    }
    let Some(gpu) = gpu() else { return };
    let up = |x: &[f32], s| gpu.upload(x, s).unwrap();
    let a = wgpu_attention::gpu::Partial {
        o: &up(&oa, dims),
        lse: &up(&la, [1, 1, 2, 1]),
    };
    let b = wgpu_attention::gpu::Partial {
        o: &up(&ob, dims),
        lse: &up(&lb, [1, 1, 2, 1]),
    };
    let merged = merge(gpu, a, b, Layout::Bhsd).unwrap();
    assert_eq!(merged.o.download(gpu).unwrap(), o);
}

/// The common decoding case: a bf16 (or f16, or 8-bit) cache attended by f32 queries,
/// appended in steps.
#[test]
fn half_precision_cache_with_f32_queries() {
    use wgpu_attention::DType;
    let Some(gpu) = gpu() else { return };
    for dtype in [DType::Bf16, DType::F16, DType::F8E4M3] {
        let (batch, heads, kv_heads, cap, d) = (1, 4, 1, 3000, 32);
        let mut cache = KvCache::with_dtype(gpu, batch, kv_heads, cap, d, d, dtype).unwrap();
        let mut host_k = Vec::new();
        let mut host_v = Vec::new();
        let mut r = rng(2200);
        for (step, n) in [2100usize, 1, 3].into_iter().enumerate() {
            let k = random(&mut r, kv_heads * n * d, 1.0);
            let v = random(&mut r, kv_heads * n * d, 1.0);
            cache.append(gpu, &k, &v, &[n]).unwrap();
            // The host copy holds the values as the cache rounded them.
            host_k.extend(k.iter().map(|&x| dtype.round(x)));
            host_v.extend(v.iter().map(|&x| dtype.round(x)));
            let q = random(&mut r, batch * heads * n * d, 1.0);
            let out = cache
                .attend(
                    gpu,
                    &gpu.upload(&q, [batch, heads, n, d]).unwrap(),
                    &Attention::new(),
                )
                .unwrap();
            assert_eq!(out.o.dtype(), DType::F32);
            let total = cache.lens()[0] as usize;
            let dims = Dims {
                batch,
                heads,
                kv_heads,
                q_len: n,
                kv_len: total,
                head_dim: d,
                v_head_dim: d,
            };
            let want = cpu::reference(
                &q,
                &host_k,
                &host_v,
                dims,
                &Attention::new().causal(Causal::BottomRight),
            )
            .unwrap();
            assert_close(
                &format!("{dtype:?} cache, step {step}"),
                &out.o.download(gpu).unwrap(),
                &want.o,
                O_ATOL,
                O_RTOL,
            );
        }
    }
    // Half caches need even head dims (rows must start on 4-byte boundaries).
    let err = KvCache::with_dtype(gpu, 1, 1, 10, 7, 8, DType::Bf16);
    assert!(matches!(err, Err(Error::InvalidOption { .. })), "{err:?}");
}

/// Partial outputs stored in half precision merge like f32 ones (the merged O keeps their
/// dtype; the log-sum-exps stay f32).
#[test]
fn merge_of_half_precision_partials() {
    use wgpu_attention::DType;
    let Some(gpu) = gpu() else { return };
    for dtype in [DType::F16, DType::Bf16] {
        let d = dims(1, 2, 2, 9, 40, 16, 10);
        let mut r = rng(2300);
        let round = |x: Vec<f32>| -> Vec<f32> { x.into_iter().map(|v| dtype.round(v)).collect() };
        let q = round(random(&mut r, d.q_elems(), 1.0));
        let k = round(random(&mut r, d.k_elems(), 1.0));
        let v = round(random(&mut r, d.v_elems(), 1.0));
        let (tq, tk, tv) = (
            gpu.upload_as(&q, d.q_shape(Layout::Bhsd), dtype).unwrap(),
            gpu.upload_as(&k, d.k_shape(Layout::Bhsd), dtype).unwrap(),
            gpu.upload_as(&v, d.v_shape(Layout::Bhsd), dtype).unwrap(),
        );
        // Two disjoint key sets: keys < 17 (kv_lens) and keys >= 17 (a mask).
        let first = Attention::new().return_lse(true).kv_lens(vec![17]);
        let mask: Vec<bool> = (0..d.kv_len).map(|j| j >= 17).collect();
        let second = Attention::new()
            .return_lse(true)
            .mask([1, 1, 1, d.kv_len], mask);
        let a = first.run(gpu, &tq, &tk, &tv).unwrap();
        let b = second.run(gpu, &tq, &tk, &tv).unwrap();
        assert_eq!(a.o.dtype(), dtype);
        let merged = merge(
            gpu,
            a.as_partial().unwrap(),
            b.as_partial().unwrap(),
            Layout::Bhsd,
        )
        .unwrap();
        assert_eq!(merged.o.dtype(), dtype);
        let want = cpu::reference(&q, &k, &v, d, &Attention::new()).unwrap();
        let o = merged.o.download(gpu).unwrap();
        // Each partial and the merge round O to the dtype: two roundings.
        let rtol = if dtype == DType::Bf16 {
            2.0 / 128.0
        } else {
            2.0 / 1024.0
        };
        assert_close(&format!("{dtype:?} merged O"), &o, &want.o, 1e-3, rtol);
        assert_close(
            &format!("{dtype:?} merged lse"),
            &merged.lse.unwrap().download(gpu).unwrap(),
            &want.lse,
            1e-4,
            1e-4,
        );
    }
}

/// Half-precision tensors round-trip bit for bit through upload and download.
#[test]
fn half_precision_round_trip() {
    let Some(gpu) = gpu() else { return };
    let mut r = rng(2400);
    // An odd count: the last word is half padding.
    let x = random(&mut r, 3 * 5 * 7, 100.0);
    let h: Vec<half::f16> = x.iter().map(|&v| half::f16::from_f32(v)).collect();
    let b: Vec<half::bf16> = x.iter().map(|&v| half::bf16::from_f32(v)).collect();
    let th = gpu.upload_f16(&h, [1, 3, 5, 7]).unwrap();
    let tb = gpu.upload_bf16(&b, [1, 3, 5, 7]).unwrap();
    assert_eq!(th.download_f16(gpu).unwrap(), h);
    assert_eq!(tb.download_bf16(gpu).unwrap(), b);
    assert!(matches!(
        th.download_bf16(gpu),
        Err(Error::InvalidOption { .. })
    ));
}

/// A result without its log-sum-exp cannot be merged: a typed error says why.
#[test]
fn merge_needs_the_log_sum_exp() {
    let Some(gpu) = gpu() else { return };
    let x = gpu
        .upload(&random(&mut rng(2500), 2 * 5 * 8, 1.0), [1, 2, 5, 8])
        .unwrap();
    let out = Attention::new().run(gpu, &x, &x, &x).unwrap();
    assert!(matches!(
        out.as_partial(),
        Err(Error::InvalidOption {
            what: "merge input",
            ..
        })
    ));
}

/// Speculative decoding's rollback and beam search's reordering on a rotary cache: a prompt,
/// draft tokens of which some are rejected (`truncate`), new tokens appended after the new
/// lengths (turned by their new positions), then the beams reordered (one beam into two slots,
/// one dropped) and decoding going on; every step against the reference on a host copy of the
/// turned rows. Then the copy itself, exact, on a 16-bit cache, and the typed errors.
#[test]
fn truncate_and_reorder_sequences() {
    use wgpu_attention::DType;
    use wgpu_attention::rotary::{Positions, Rotary};
    let Some(gpu) = gpu() else { return };
    let (batch, heads, kv_heads, cap, d, dv) = (3, 4, 2, 200, 24, 20);
    let rotary = Rotary::new(16, 10_000.0).unwrap();
    let mut cache = KvCache::new(gpu, batch, kv_heads, cap, d, dv)
        .unwrap()
        .with_rotary(rotary.clone())
        .unwrap();
    let mut host_k = vec![0f32; batch * kv_heads * cap * d];
    let mut host_v = vec![0f32; batch * kv_heads * cap * dv];
    let mut r = rng(2600);
    // Appends `new`, attends with the new tokens' queries, and checks O against the reference.
    let mut step = |cache: &mut KvCache,
                    host_k: &mut Vec<f32>,
                    host_v: &mut Vec<f32>,
                    new: [usize; 3],
                    what: &str| {
        let t = *new.iter().max().unwrap();
        let start: Vec<usize> = cache.lens().iter().map(|&l| l as usize).collect();
        let k = random(&mut r, batch * kv_heads * t * d, 1.0);
        let v = random(&mut r, batch * kv_heads * t * dv, 1.0);
        cache.append(gpu, &k, &v, &new).unwrap();
        let starts = Positions::Start(start.iter().map(|&s| s as u32).collect());
        let turned =
            cpu::rotate(&k, [batch, kv_heads, t, d], Layout::Bhsd, &rotary, &starts).unwrap();
        mirror_append(host_k, &turned, (kv_heads, cap, d), &start, &new);
        mirror_append(host_v, &v, (kv_heads, cap, dv), &start, &new);
        let q = random(&mut r, batch * heads * t * d, 1.0);
        let q_lens: Vec<u32> = new.iter().map(|&n| n.max(1) as u32).collect();
        let lens = cache.lens().to_vec();
        // Query i of n is at position len - n + i.
        let q_starts: Vec<u32> = lens.iter().zip(&q_lens).map(|(&l, &n)| l - n).collect();
        let q_turned = cpu::rotate(
            &q,
            [batch, heads, t, d],
            Layout::Bhsd,
            &rotary,
            &Positions::Start(q_starts),
        )
        .unwrap();
        let tq = gpu.upload(&q, [batch, heads, t, d]).unwrap();
        let opts = Attention::new().q_lens(q_lens.clone());
        let out = cache.attend(gpu, &tq, &opts).unwrap();
        let full = dims(batch, heads, kv_heads, t, cap, d, dv);
        let want_opts = Attention::new()
            .q_lens(q_lens)
            .kv_lens(lens)
            .causal(Causal::BottomRight);
        let want = cpu::reference(&q_turned, host_k, host_v, full, &want_opts).unwrap();
        assert_close(
            &format!("O after {what}"),
            &out.o.download(gpu).unwrap(),
            &want.o,
            O_ATOL,
            O_RTOL,
        );
    };
    step(
        &mut cache,
        &mut host_k,
        &mut host_v,
        [50, 37, 61],
        "the prompts",
    );
    step(
        &mut cache,
        &mut host_k,
        &mut host_v,
        [4, 4, 4],
        "4 draft tokens",
    );
    // Sequence 0 keeps 2 drafts, sequence 1 none, sequence 2 all four.
    cache.truncate(&[52, 37, 65]).unwrap();
    assert_eq!(cache.lens(), &[52, 37, 65]);
    step(
        &mut cache,
        &mut host_k,
        &mut host_v,
        [1, 1, 1],
        "the rollback",
    );
    // Beam 2 continued twice, beam 1 dropped.
    cache.reorder(gpu, &[2, 0, 2]).unwrap();
    assert_eq!(cache.lens(), &[66, 53, 66]);
    let rows = |host: &[f32], b: usize, width: usize| {
        host[b * kv_heads * cap * width..][..kv_heads * cap * width].to_vec()
    };
    for (host, width) in [(&mut host_k, d), (&mut host_v, dv)] {
        let copy: Vec<Vec<f32>> = [2, 0, 2].iter().map(|&f| rows(host, f, width)).collect();
        for (b, rows) in copy.iter().enumerate() {
            host[b * kv_heads * cap * width..][..rows.len()].copy_from_slice(rows);
        }
    }
    step(
        &mut cache,
        &mut host_k,
        &mut host_v,
        [1, 1, 1],
        "the reorder",
    );
    step(
        &mut cache,
        &mut host_k,
        &mut host_v,
        [3, 1, 2],
        "a ragged step",
    );

    // The copy itself, exact, on a bf16 cache (rows of 2-byte elements): rows past a
    // sequence's length are not copied, and a sequence left in place is untouched.
    let (b16, w) = (4, 6);
    let mut half = KvCache::with_dtype(gpu, b16, 1, 16, w, w, DType::Bf16).unwrap();
    let k = random(&mut rng(2601), b16 * 16 * w, 1.0);
    half.append(gpu, &k, &k, &[16, 5, 9, 1]).unwrap();
    let before = half.k().download(gpu).unwrap();
    half.reorder(gpu, &[1, 1, 0, 3]).unwrap();
    assert_eq!(half.lens(), &[5, 5, 16, 1]);
    let after = half.k().download(gpu).unwrap();
    let seq = |x: &[f32], b: usize, n: usize| x[b * 16 * w..][..n * w].to_vec();
    assert_eq!(seq(&after, 0, 5), seq(&before, 1, 5));
    assert_eq!(seq(&after, 0, 16)[5 * w..], seq(&before, 0, 16)[5 * w..]);
    assert_eq!(seq(&after, 1, 5), seq(&before, 1, 5));
    assert_eq!(seq(&after, 2, 16), seq(&before, 0, 16));
    assert_eq!(seq(&after, 3, 1), seq(&before, 3, 1));
    assert_eq!(half.v().download(gpu).unwrap(), after);

    // Typed errors, and nothing changes.
    let lens = cache.lens().to_vec();
    assert_eq!(cache.lens(), &[70, 55, 69]);
    let err = cache.truncate(&[10, 56, 10]);
    assert!(
        matches!(
            err,
            Err(Error::LengthOutOfRange {
                what: "truncated cache length",
                index: 1,
                value: 56,
                max: 55,
            })
        ),
        "{err:?}"
    );
    let err = cache.truncate(&[1, 1]);
    assert!(matches!(err, Err(Error::ShapeMismatch { .. })), "{err:?}");
    let err = cache.reorder(gpu, &[0, 3, 1]);
    assert!(
        matches!(
            err,
            Err(Error::LengthOutOfRange {
                what: "reordered sequence index",
                index: 1,
                value: 3,
                max: 2,
            })
        ),
        "{err:?}"
    );
    let err = cache.reorder(gpu, &[0, 1]);
    assert!(matches!(err, Err(Error::ShapeMismatch { .. })), "{err:?}");
    assert_eq!(cache.lens(), &lens[..]);
    // Truncated to nothing, the cache starts again at position 0.
    cache.truncate(&[0, 0, 0]).unwrap();
    host_k.fill(0.0);
    host_v.fill(0.0);
    step(
        &mut cache,
        &mut host_k,
        &mut host_v,
        [7, 2, 5],
        "truncating to nothing",
    );
}
