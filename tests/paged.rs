//! Paged K/V (`Attention::paged`): keys and values read through a block table from pools of
//! pages, on the fused and decode paths, against the reference, with shuffled pages, page sizes
//! that divide no tile, empty and one-token sequences, shared pages and pools exactly full.
//! The reference's own gather is checked against contiguous K/V built here.

mod common;

use common::{O_ATOL, O_RTOL, assert_close, random, rng};
use rand::seq::SliceRandom;
use wgpu_attention::{
    Attention, Causal, DType, Dims, Error, Layout, PagedKvCache, Path, SeqId, cpu,
};

/// A paged problem: pools of `pages` pages, each sequence's table a random choice of them.
struct Paged {
    dims: Dims,
    page_size: usize,
    pages: usize,
    table: Vec<u32>,
    k_pool: Vec<f32>,
    v_pool: Vec<f32>,
}

/// `lens` keys per sequence in pages of `page_size` from a pool of `pages` pages (at least
/// what the sequences need; exactly that when equal). The tables are shuffled pages, and with
/// `share` every sequence's first page is the same one.
fn paged(
    seed: u64,
    (batch, kv_heads, head_dim, v_head_dim): (usize, usize, usize, usize),
    page_size: usize,
    pages_per_seq: usize,
    pages: usize,
    share: bool,
) -> Paged {
    let mut r = rng(seed);
    let mut order: Vec<u32> = (0..pages as u32).collect();
    order.shuffle(&mut r);
    let mut table = Vec::new();
    let mut next = 0;
    for b in 0..batch {
        for p in 0..pages_per_seq {
            let page = if share && p == 0 && b > 0 {
                table[0]
            } else {
                let page = order[next % pages];
                next += 1;
                page
            };
            table.push(page);
        }
    }
    let dims = Dims {
        batch,
        heads: 0,
        kv_heads,
        q_len: 0,
        kv_len: pages_per_seq * page_size,
        head_dim,
        v_head_dim,
    };
    Paged {
        dims,
        page_size,
        pages,
        table,
        k_pool: random(&mut r, pages * page_size * kv_heads * head_dim, 1.0),
        v_pool: random(&mut r, pages * page_size * kv_heads * v_head_dim, 1.0),
    }
}

/// Runs the paged call on the GPU (outputs poisoned) and checks O and the log-sum-exp against
/// the reference.
#[allow(clippy::too_many_arguments)]
fn check(
    p: &Paged,
    heads: usize,
    q_len: usize,
    path: Path,
    opts: &Attention,
    kv_dtype: DType,
    seed: u64,
) {
    let Some(gpu) = common::gpu() else { return };
    let d = Dims {
        heads,
        q_len,
        ..p.dims
    };
    let opts = opts.clone().paged(p.page_size, p.table.clone()).path(path);
    let mut r = rng(seed);
    let q = random(&mut r, d.q_elems(), 2.0);
    let round = |x: &[f32]| -> Vec<f32> { x.iter().map(|&v| kv_dtype.round(v)).collect() };
    let (k_pool, v_pool) = (round(&p.k_pool), round(&p.v_pool));
    let want = cpu::reference(&q, &k_pool, &v_pool, d, &opts).expect("reference");
    let layout = opts.get_layout();
    let tq = gpu.upload(&q, d.q_shape(layout)).unwrap();
    let pool = |width| [p.pages, p.page_size, d.kv_heads, width];
    let tk = gpu.upload_as(&k_pool, pool(d.head_dim), kv_dtype).unwrap();
    let tv = gpu
        .upload_as(&v_pool, pool(d.v_head_dim), kv_dtype)
        .unwrap();
    let ctx = format!(
        "[{path:?}, {kv_dtype:?}] {d:?} page {} seed {seed}",
        p.page_size
    );
    let shapes = (d.o_shape(layout), [d.batch, d.heads, d.q_len, 1]);
    common::run_poisoned_and_check(gpu, &opts, (&tq, &tk, &tv), shapes, &want, &ctx);
}

#[test]
fn the_reference_gathers_through_the_table() {
    let p = paged(1, (2, 2, 8, 5), 7, 3, 9, false);
    let d = Dims {
        heads: 4,
        q_len: 5,
        ..p.dims
    };
    for layout in [Layout::Bhsd, Layout::Bshd] {
        // Contiguous K and V, written here from the table.
        let mut k = vec![0f32; d.k_elems()];
        let mut v = vec![0f32; d.v_elems()];
        let ks = layout.strides(d.kv_heads, d.kv_len, d.head_dim);
        let vs = layout.strides(d.kv_heads, d.kv_len, d.v_head_dim);
        for b in 0..d.batch {
            for j in 0..d.kv_len {
                let page = p.table[b * 3 + j / 7] as usize;
                for h in 0..d.kv_heads {
                    let row = (page * 7 + j % 7) * d.kv_heads + h;
                    let kd = b * ks[0] + h * ks[1] + j * ks[2];
                    k[kd..kd + 8].copy_from_slice(&p.k_pool[row * 8..row * 8 + 8]);
                    let vd = b * vs[0] + h * vs[1] + j * vs[2];
                    v[vd..vd + 5].copy_from_slice(&p.v_pool[row * 5..row * 5 + 5]);
                }
            }
        }
        let q = random(&mut rng(2), d.q_elems(), 1.0);
        let opts = Attention::new()
            .layout(layout)
            .causal(Causal::BottomRight)
            .kv_lens(vec![20, 9]);
        let want = cpu::reference(&q, &k, &v, d, &opts).unwrap();
        let paged_opts = opts.paged(7, p.table.clone());
        let got = cpu::reference(&q, &p.k_pool, &p.v_pool, d, &paged_opts).unwrap();
        assert_eq!(got, want, "{layout:?}");
        let fast = cpu::fast(&q, &p.k_pool, &p.v_pool, d, &paged_opts).unwrap();
        assert_close("cpu::fast, paged", &fast.o, &want.o, O_ATOL, O_RTOL);
    }
}

#[test]
fn decoding_over_shuffled_pages() {
    let mut seed = 10;
    // (page size, pages per sequence, lengths): sizes that divide no tile, a sequence of one
    // token, an empty one, and one filling its pages exactly.
    for (page_size, pps, lens) in [
        (16, 70, vec![1100, 1, 0, 1120]),
        (7, 20, vec![140, 3, 139, 77]),
        (64, 3, vec![192, 65, 64, 1]),
    ] {
        // The pool exactly full: every page belongs to a sequence.
        let p = paged(seed, (4, 2, 64, 64), page_size, pps, 4 * pps, false);
        for path in [Path::Decode, Path::Fused, Path::Auto] {
            seed += 1;
            let opts = Attention::new()
                .causal(Causal::BottomRight)
                .kv_lens(lens.clone());
            check(&p, 8, 1, path, &opts, DType::F32, seed);
        }
    }
}

#[test]
fn prefill_and_options_over_pages() {
    let p = paged(20, (2, 2, 24, 16), 5, 40, 100, true);
    let mut r = rng(21);
    let mask = common::random_mask(&mut r, 2 * 37 * 200, 0.8);
    let cases = [
        Attention::new(),
        Attention::new()
            .causal(Causal::BottomRight)
            .kv_lens(vec![200, 57]),
        Attention::new()
            .causal(Causal::TopLeft)
            .window(20, 3)
            .layout(Layout::Bshd),
        Attention::new()
            .mask([2, 1, 37, 200], mask)
            .alibi(common::positive(random(&mut r, 4, 0.1)))
            .sinks(random(&mut r, 4, 2.0))
            .softcap(10.0),
        Attention::new()
            .window(10, 0)
            .causal(Causal::BottomRight)
            .sink_keys(4)
            .q_lens(vec![37, 12]),
    ];
    for (n, opts) in cases.iter().enumerate() {
        for path in [Path::Fused, Path::Decode] {
            check(&p, 4, 37, path, opts, DType::F32, 30 + n as u64);
        }
    }
}

#[test]
fn half_precision_pools() {
    let p = paged(40, (1, 2, 64, 64), 16, 80, 90, false);
    for (n, dtype) in [DType::F16, DType::Bf16, DType::F8E4M3]
        .into_iter()
        .enumerate()
    {
        let opts = Attention::new()
            .causal(Causal::BottomRight)
            .kv_lens(vec![1250]);
        check(&p, 8, 1, Path::Decode, &opts, dtype, 41 + n as u64);
        check(&p, 8, 3, Path::Fused, &opts, dtype, 43 + n as u64);
    }
}

#[test]
fn bad_tables_and_pools_are_typed_errors() {
    let p = paged(50, (2, 1, 8, 8), 4, 3, 6, false);
    let d = Dims {
        heads: 2,
        q_len: 1,
        ..p.dims
    };
    let q = vec![0.5f32; d.q_elems()];
    let run_cpu = |opts: &Attention| cpu::reference(&q, &p.k_pool, &p.v_pool, d, opts);
    // An entry outside the pool.
    let mut bad = p.table.clone();
    bad[4] = 6;
    let e = run_cpu(&Attention::new().paged(4, bad.clone())).unwrap_err();
    assert!(
        matches!(
            e,
            Error::LengthOutOfRange {
                index: 4,
                value: 6,
                max: 5,
                ..
            }
        ),
        "{e:?}"
    );
    // A table of the wrong length, a kv_len that is not pages * page_size, a zero page size.
    let e = run_cpu(&Attention::new().paged(4, p.table[..5].to_vec())).unwrap_err();
    assert!(
        matches!(
            e,
            Error::DataLength {
                what: "block table",
                ..
            }
        ),
        "{e:?}"
    );
    let e = run_cpu(&Attention::new().paged(3, p.table.clone())).unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e:?}");
    let e = run_cpu(&Attention::new().paged(0, p.table.clone())).unwrap_err();
    assert!(matches!(e, Error::ZeroSize { what: "page_size" }), "{e:?}");
    // A pool whose length is not whole pages.
    let e = cpu::reference(
        &q,
        &p.k_pool[..p.k_pool.len() - 8],
        &p.v_pool,
        d,
        &Attention::new().paged(4, p.table.clone()),
    )
    .unwrap_err();
    assert!(
        matches!(e, Error::DataLength { what: "K pool", .. }),
        "{e:?}"
    );
    // Lengths past the table.
    let e = run_cpu(
        &Attention::new()
            .paged(4, p.table.clone())
            .kv_lens(vec![13, 1]),
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            Error::LengthOutOfRange {
                what: "kv_lens",
                ..
            }
        ),
        "{e:?}"
    );
    // The three-pass path, the weights and additive scores do not read pages.
    for opts in [
        Attention::new().path(Path::ThreePass),
        Attention::new().return_weights(true),
        Attention::new().additive(vec![1.0; 8]),
    ] {
        let e = run_cpu(&opts.paged(4, p.table.clone())).unwrap_err();
        assert!(
            matches!(
                e,
                Error::InvalidOption {
                    what: "paged K/V",
                    ..
                }
            ),
            "{e:?}"
        );
    }

    let Some(gpu) = common::gpu() else { return };
    let tq = gpu.upload(&q, d.q_shape(Layout::Bhsd)).unwrap();
    let tk = gpu.upload(&p.k_pool, [6, 4, 1, 8]).unwrap();
    let tv = gpu.upload(&p.v_pool, [6, 4, 1, 8]).unwrap();
    let e = Attention::new()
        .paged(4, bad)
        .run(gpu, &tq, &tk, &tv)
        .unwrap_err();
    assert!(
        matches!(e, Error::LengthOutOfRange { value: 6, .. }),
        "{e:?}"
    );
    let wrong_v = gpu.upload(&p.v_pool, [6, 2, 2, 8]).unwrap();
    let e = Attention::new()
        .paged(4, p.table.clone())
        .run(gpu, &tq, &tk, &wrong_v)
        .unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e:?}");
    let e = Attention::new()
        .paged(4, p.table.clone())
        .path(Path::ThreePass)
        .run(gpu, &tq, &tk, &tv)
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidOption {
                what: "paged K/V",
                ..
            }
        ),
        "{e:?}"
    );
    // And a valid call on the same tensors runs.
    Attention::new()
        .paged(4, p.table.clone())
        .run(gpu, &tq, &tk, &tv)
        .unwrap();
}

/// A cache's sequences as the host wrote them: token rows `[len, kv_heads, dim]` of K and V.
#[derive(Clone, Default)]
struct Written {
    k: Vec<f32>,
    v: Vec<f32>,
}

/// Appends `t` random tokens to `s` from the host, and to its record `w`.
fn append_random(
    gpu: &wgpu_attention::Gpu,
    cache: &mut PagedKvCache,
    (s, w): (SeqId, &mut Written),
    t: usize,
    r: &mut rand::rngs::StdRng,
) {
    let row = |pool: &wgpu_attention::Tensor| pool.dims()[2] * pool.dims()[3];
    let k = random(r, t * row(cache.k()), 1.0);
    let v = random(r, t * row(cache.v()), 1.0);
    cache.append(gpu, s, &k, &v).unwrap();
    w.k.extend_from_slice(&k);
    w.v.extend_from_slice(&v);
}

/// Attends one query per sequence and checks O against the reference on contiguous K/V built
/// from what was written (no page involved).
fn check_cache(
    gpu: &wgpu_attention::Gpu,
    cache: &wgpu_attention::PagedKvCache,
    seqs: &[wgpu_attention::SeqId],
    written: &[Written],
    (heads, kv_heads, dim): (usize, usize, usize),
    opts: &Attention,
    seed: u64,
) {
    let n = seqs.len();
    let lens: Vec<usize> = written
        .iter()
        .map(|w| w.k.len() / (kv_heads * dim))
        .collect();
    for (s, &len) in seqs.iter().zip(&lens) {
        assert_eq!(cache.len(*s).unwrap(), len);
    }
    let s_max = lens.iter().copied().max().unwrap().max(1);
    let d = Dims {
        batch: n,
        heads,
        kv_heads,
        q_len: 1,
        kv_len: s_max,
        head_dim: dim,
        v_head_dim: dim,
    };
    // Bhsd K and V, zero past each length.
    let mut k = vec![0f32; d.k_elems()];
    let mut v = vec![0f32; d.v_elems()];
    for (b, w) in written.iter().enumerate() {
        for j in 0..lens[b] {
            for h in 0..kv_heads {
                let src = (j * kv_heads + h) * dim;
                let dst = ((b * kv_heads + h) * s_max + j) * dim;
                k[dst..dst + dim].copy_from_slice(&w.k[src..src + dim]);
                v[dst..dst + dim].copy_from_slice(&w.v[src..src + dim]);
            }
        }
    }
    let q = random(&mut rng(seed), d.q_elems(), 2.0);
    let want = cpu::reference(
        &q,
        &k,
        &v,
        d,
        &opts
            .clone()
            .causal(Causal::BottomRight)
            .kv_lens(lens.iter().map(|&l| l as u32).collect()),
    )
    .unwrap();
    let tq = gpu.upload(&q, [n, heads, 1, dim]).unwrap();
    let got = cache
        .attend(gpu, &tq, seqs, opts)
        .unwrap()
        .o
        .download(gpu)
        .unwrap();
    assert_close(
        &format!("paged cache at lens {lens:?}"),
        &got,
        &want.o,
        O_ATOL,
        O_RTOL,
    );
}

#[test]
fn a_paged_cache_appends_forks_and_frees() {
    let Some(gpu) = common::gpu() else { return };
    let (heads, kv_heads, dim, page) = (4, 2, 16, 5);
    let pages = 40;
    let mut cache =
        wgpu_attention::PagedKvCache::new(gpu, pages, page, kv_heads, dim, dim).unwrap();
    let mut r = rng(60);
    let row = kv_heads * dim;
    let mut append = |cache: &mut PagedKvCache, s: SeqId, w: &mut Written, t: usize| {
        append_random(gpu, cache, (s, w), t, &mut r);
    };
    let a = cache.add_sequence();
    let b = cache.add_sequence();
    let (mut wa, mut wb) = (Written::default(), Written::default());
    // Interleaved appends of sizes that cross pages: the two sequences' pages interleave.
    for (ta, tb) in [(7, 1), (1, 12), (3, 4), (9, 1)] {
        append(&mut cache, a, &mut wa, ta);
        append(&mut cache, b, &mut wb, tb);
    }
    check_cache(
        gpu,
        &cache,
        &[a, b],
        &[wa.clone(), wb.clone()],
        (heads, kv_heads, dim),
        &Attention::new(),
        61,
    );
    // A fork shares every page: no page taken.
    let free = cache.free_pages();
    let c = cache.fork(a).unwrap();
    assert_eq!(cache.free_pages(), free);
    assert_eq!(cache.pages_of(c).unwrap(), cache.pages_of(a).unwrap());
    let mut wc = wa.clone();
    // a holds 20 tokens, four full pages: two more make its last page partial, and a fork of
    // it then shares that partial page, which the fork's next append copies.
    append(&mut cache, a, &mut wa, 2);
    let c2 = cache.fork(a).unwrap();
    let mut wc2 = wa.clone();
    let before = cache.free_pages();
    append(&mut cache, c2, &mut wc2, 1);
    assert_eq!(
        cache.free_pages(),
        before - 1,
        "copy on write takes one page"
    );
    assert_ne!(
        cache.pages_of(c2).unwrap().last(),
        cache.pages_of(a).unwrap().last()
    );
    append(&mut cache, c, &mut wc, 6);
    append(&mut cache, a, &mut wa, 1);
    let all = [a, b, c, c2];
    let written = [wa.clone(), wb.clone(), wc.clone(), wc2.clone()];
    let sinks = random(&mut rng(66), heads, 2.0);
    check_cache(
        gpu,
        &cache,
        &all,
        &written,
        (heads, kv_heads, dim),
        &Attention::new(),
        62,
    );
    check_cache(
        gpu,
        &cache,
        &all,
        &written,
        (heads, kv_heads, dim),
        &Attention::new().sinks(sinks).window(6, 0),
        63,
    );
    // Freeing a returns only the pages nobody else holds; the others still read right.
    let held_by_a = cache.pages_of(a).unwrap().len();
    let free = cache.free_pages();
    cache.free_sequence(a).unwrap();
    assert!(cache.free_pages() > free && cache.free_pages() < free + held_by_a);
    check_cache(
        gpu,
        &cache,
        &[c, b, c2],
        &[wc.clone(), wb.clone(), wc2.clone()],
        (heads, kv_heads, dim),
        &Attention::new(),
        64,
    );
    // Unknown sequences are typed errors.
    assert!(matches!(cache.len(a), Err(Error::UnknownSequence { .. })));
    assert!(matches!(
        cache.free_sequence(a),
        Err(Error::UnknownSequence { .. })
    ));
    let q = gpu
        .upload(&vec![0.1; heads * dim], [1, heads, 1, dim])
        .unwrap();
    assert!(matches!(
        cache.attend(gpu, &q, &[a], &Attention::new()),
        Err(Error::UnknownSequence { .. })
    ));

    // Fill the pool exactly; then one token more is CacheFull and changes nothing.
    let d = cache.add_sequence();
    let mut wd = Written::default();
    let fill = cache.free_pages() * page;
    append(&mut cache, d, &mut wd, fill);
    assert_eq!(cache.free_pages(), 0);
    let one = vec![0.5; row];
    let e = cache.append(gpu, d, &one, &one).unwrap_err();
    assert_eq!(e, Error::CacheFull { needed: 1, free: 0 });
    assert_eq!(cache.len(d).unwrap(), fill);
    check_cache(
        gpu,
        &cache,
        &[d, b, c, c2],
        &[wd, wb, wc, wc2],
        (heads, kv_heads, dim),
        &Attention::new(),
        65,
    );
    // Bad appends.
    let e = cache
        .append(gpu, b, &one[..row - 1], &one[..row - 1])
        .unwrap_err();
    assert!(matches!(e, Error::DataLength { .. }), "{e:?}");
    let e = cache.append(gpu, b, &[], &[]).unwrap_err();
    assert!(matches!(e, Error::ZeroSize { .. }), "{e:?}");
}

/// Speculative decoding's rollback: truncating a sequence frees the pages past its new
/// length (unless a fork holds them), and the next append writes after the new length; a
/// truncated sequence sharing its last page with a fork copies it before writing into it, so
/// the fork keeps its tokens. Checked against the reference on what was written.
#[test]
fn truncating_paged_sequences() {
    let Some(gpu) = common::gpu() else { return };
    let (heads, kv_heads, dim, page) = (4, 2, 16, 5);
    let mut cache = wgpu_attention::PagedKvCache::new(gpu, 30, page, kv_heads, dim, dim).unwrap();
    let mut r = rng(70);
    let row = kv_heads * dim;
    let mut append = |cache: &mut PagedKvCache, s: SeqId, w: &mut Written, t: usize| {
        append_random(gpu, cache, (s, w), t, &mut r);
    };
    let truncate = |w: &mut Written, len: usize| {
        w.k.truncate(len * row);
        w.v.truncate(len * row);
    };
    let shape = (heads, kv_heads, dim);
    let a = cache.add_sequence();
    let b = cache.add_sequence();
    let (mut wa, mut wb) = (Written::default(), Written::default());
    append(&mut cache, a, &mut wa, 23);
    append(&mut cache, b, &mut wb, 4);
    // Five pages for a: cut back to 12 tokens, three pages; two go back.
    let free = cache.free_pages();
    cache.truncate(a, 12).unwrap();
    truncate(&mut wa, 12);
    assert_eq!(cache.free_pages(), free + 2);
    assert_eq!(cache.pages_of(a).unwrap().len(), 3);
    check_cache(
        gpu,
        &cache,
        &[a, b],
        &[wa.clone(), wb.clone()],
        shape,
        &Attention::new(),
        71,
    );
    // Appending goes on from 12, into a's own partial page.
    append(&mut cache, a, &mut wa, 4);
    check_cache(
        gpu,
        &cache,
        &[a, b],
        &[wa.clone(), wb.clone()],
        shape,
        &Attention::new(),
        72,
    );
    // A fork shares a's pages; a cut back into a shared page copies it on its next append,
    // and the fork keeps every token; pages the fork holds are not freed.
    let c = cache.fork(a).unwrap();
    let wc = wa.clone();
    let free = cache.free_pages();
    cache.truncate(a, 7).unwrap();
    truncate(&mut wa, 7);
    assert_eq!(cache.free_pages(), free, "the fork still holds every page");
    append(&mut cache, a, &mut wa, 6);
    assert_eq!(cache.free_pages(), free - 2, "one copied page and one new");
    let all = [a, b, c];
    let written = [wa.clone(), wb.clone(), wc.clone()];
    check_cache(gpu, &cache, &all, &written, shape, &Attention::new(), 73);
    check_cache(
        gpu,
        &cache,
        &all,
        &written,
        shape,
        &Attention::new().window(3, 0),
        74,
    );
    // To nothing: every page the sequence alone held is free, and it starts again.
    let held = cache.pages_of(b).unwrap().len();
    let free = cache.free_pages();
    cache.truncate(b, 0).unwrap();
    truncate(&mut wb, 0);
    assert_eq!(cache.free_pages(), free + held);
    assert!(cache.pages_of(b).unwrap().is_empty());
    append(&mut cache, b, &mut wb, 3);
    check_cache(
        gpu,
        &cache,
        &all,
        &[wa, wb, wc],
        shape,
        &Attention::new(),
        75,
    );
    // Longer than the sequence, or an unknown one: typed errors, nothing changes.
    let e = cache.truncate(a, 14).unwrap_err();
    assert_eq!(
        e,
        Error::LengthOutOfRange {
            what: "truncated sequence length",
            index: a.get() as usize,
            value: 14,
            max: 13,
        }
    );
    assert_eq!(cache.len(a).unwrap(), 13);
    cache.free_sequence(c).unwrap();
    assert!(matches!(
        cache.truncate(c, 0),
        Err(Error::UnknownSequence { .. })
    ));
}

/// Appends from device tensors (`append_tensors`): across pages, into a forked sequence's
/// shared last page (copy on write), in f32 and f16, checked against the reference on what
/// was written; with RoPE, against the same cache appended from the host (turned there in
/// f64); and the typed errors, which change nothing.
#[test]
fn a_paged_cache_appends_device_tensors() {
    use wgpu_attention::rotary::Rotary;
    let Some(gpu) = common::gpu() else { return };
    let (heads, kv_heads, dim, page) = (4, 2, 16, 5);
    let row = kv_heads * dim;
    for dtype in [DType::F32, DType::F16] {
        let mut cache = PagedKvCache::with_dtype(gpu, 20, page, kv_heads, dim, dim, dtype).unwrap();
        let mut r = rng(80);
        let mut append = |cache: &mut PagedKvCache, s: SeqId, w: &mut Written, t: usize| {
            // (one sequence per call here; several below)
            let k = random(&mut r, t * row, 1.0);
            let v = random(&mut r, t * row, 1.0);
            let tk = gpu.upload_as(&k, [t, kv_heads, dim], dtype).unwrap();
            let tv = gpu.upload_as(&v, [1, t, kv_heads, dim], dtype).unwrap();
            cache.append_tensors(gpu, &[s], &[t], &tk, &tv).unwrap();
            w.k.extend(k.iter().map(|&x| dtype.round(x)));
            w.v.extend(v.iter().map(|&x| dtype.round(x)));
        };
        let a = cache.add_sequence();
        let b = cache.add_sequence();
        let (mut wa, mut wb) = (Written::default(), Written::default());
        for (ta, tb) in [(7, 1), (1, 12), (3, 4)] {
            append(&mut cache, a, &mut wa, ta);
            append(&mut cache, b, &mut wb, tb);
        }
        // a holds 11 tokens: a fork shares its partial last page, which the fork copies.
        let c = cache.fork(a).unwrap();
        let mut wc = wa.clone();
        let free = cache.free_pages();
        append(&mut cache, c, &mut wc, 2);
        assert_eq!(cache.free_pages(), free - 1, "copy on write takes one page");
        append(&mut cache, a, &mut wa, 6);
        // Several sequences in one call, packed one after the other (one with nothing).
        let (seqs, new) = ([c, a, b], [3, 0, 2]);
        let k = random(&mut r, 5 * row, 1.0);
        let v = random(&mut r, 5 * row, 1.0);
        let up = |x: &[f32]| gpu.upload_as(x, [5, kv_heads, dim], dtype).unwrap();
        cache
            .append_tensors(gpu, &seqs, &new, &up(&k), &up(&v))
            .unwrap();
        let mut first = 0;
        for (w, n) in [(&mut wc, 3), (&mut wa, 0), (&mut wb, 2)] {
            let rows = first * row..(first + n) * row;
            w.k.extend(k[rows.clone()].iter().map(|&x| dtype.round(x)));
            w.v.extend(v[rows].iter().map(|&x| dtype.round(x)));
            first += n;
        }
        let shape = (heads, kv_heads, dim);
        let written = [wa, wb, wc];
        check_cache(
            gpu,
            &cache,
            &[a, b, c],
            &written,
            shape,
            &Attention::new(),
            81,
        );
        // Bad tensors: typed errors, nothing changes.
        let len = cache.len(a).unwrap();
        let good = gpu
            .upload_as(&vec![0.5; row], [1, kv_heads, dim], dtype)
            .unwrap();
        let other = if dtype == DType::F32 {
            DType::F16
        } else {
            DType::F32
        };
        let wrong_dtype = gpu
            .upload_as(&vec![0.5; row], [1, kv_heads, dim], other)
            .unwrap();
        let two = gpu
            .upload_as(&vec![0.5; 2 * row], [2, kv_heads, dim], dtype)
            .unwrap();
        let wide = gpu
            .upload_as(&vec![0.5; 2 * row], [1, kv_heads, 2 * dim], dtype)
            .unwrap();
        let pool = cache.k().clone();
        for (what, k, v) in [
            ("dtype", &wrong_dtype, &good),
            ("V of other tokens", &good, &two),
            ("width", &wide, &good),
            ("own pool", &pool, &good),
        ] {
            let err = cache.append_tensors(gpu, &[a], &[1], k, v).unwrap_err();
            assert!(
                matches!(
                    err,
                    Error::InvalidOption { .. } | Error::ShapeMismatch { .. }
                ),
                "{what}: {err:?}"
            );
        }
        let big = gpu
            .upload_as(&vec![0.5; 60 * row], [60, kv_heads, dim], dtype)
            .unwrap();
        let err = cache
            .append_tensors(gpu, &[a], &[60], &big, &big)
            .unwrap_err();
        assert!(matches!(err, Error::CacheFull { .. }), "{err:?}");
        // Each sequence's pages fit, all of them together do not.
        let free = cache.free_pages();
        let rows = (free - 1) * page;
        let most = gpu
            .upload_as(&vec![0.5; 2 * rows * row], [2 * rows, kv_heads, dim], dtype)
            .unwrap();
        let err = cache
            .append_tensors(gpu, &[a, b], &[rows, rows], &most, &most)
            .unwrap_err();
        assert!(matches!(err, Error::CacheFull { .. }), "{err:?}");
        for (what, seqs, new) in [
            ("a sequence twice", vec![a, a], vec![1, 1]),
            ("counts not one per sequence", vec![a, b], vec![2]),
            ("counts against the rows", vec![a, b], vec![1, 2]),
        ] {
            let err = cache
                .append_tensors(gpu, &seqs, &new, &two, &two)
                .unwrap_err();
            assert!(
                matches!(
                    err,
                    Error::InvalidOption { .. } | Error::ShapeMismatch { .. }
                ),
                "{what}: {err:?}"
            );
        }
        assert_eq!(cache.free_pages(), free);
        assert_eq!(cache.len(a).unwrap(), len);
        check_cache(
            gpu,
            &cache,
            &[a, b, c],
            &written,
            shape,
            &Attention::new(),
            82,
        );
    }
    // RoPE: the device rotation of tensor appends against the host's of the same rows.
    let rotary = Rotary::new(12, 10_000.0).unwrap();
    let mut host = PagedKvCache::new(gpu, 20, page, kv_heads, dim, dim)
        .unwrap()
        .with_rotary(rotary.clone())
        .unwrap();
    let mut device = PagedKvCache::new(gpu, 20, page, kv_heads, dim, dim)
        .unwrap()
        .with_rotary(rotary)
        .unwrap();
    let (sh, sd) = (host.add_sequence(), device.add_sequence());
    let (sh2, sd2) = (host.add_sequence(), device.add_sequence());
    let mut r = rng(83);
    // Two sequences per device call, turned each at its own positions.
    for (t, t2) in [(9, 4), (1, 1), (7, 0)] {
        let k = random(&mut r, (t + t2) * row, 1.0);
        let v = random(&mut r, (t + t2) * row, 1.0);
        host.append(gpu, sh, &k[..t * row], &v[..t * row]).unwrap();
        if t2 > 0 {
            host.append(gpu, sh2, &k[t * row..], &v[t * row..]).unwrap();
        }
        let up = |x: &[f32]| gpu.upload(x, [t + t2, kv_heads, dim]).unwrap();
        device
            .append_tensors(gpu, &[sd, sd2], &[t, t2], &up(&k), &up(&v))
            .unwrap();
    }
    let q = random(&mut r, 3 * heads * dim, 1.0);
    let tq = gpu.upload(&q, [1, heads, 3, dim]).unwrap();
    let attend = |c: &PagedKvCache, s| {
        c.attend(gpu, &tq, &[s], &Attention::new())
            .unwrap()
            .o
            .download(gpu)
            .unwrap()
    };
    for (d, h) in [(sd, sh), (sd2, sh2)] {
        assert_close(
            "rotary tensor appends against host appends",
            &attend(&device, d),
            &attend(&host, h),
            2e-6,
            2e-5,
        );
    }
}

/// A device append that fails (here the rotation's binding past a capped limit, as WebGPU's
/// 128 MiB would refuse a long prompt) changes nothing: no page is lost, and a fork sharing the
/// sequence's partial last page keeps its reference (an outside review found the pages taken
/// and the shared page's count dropped, so that a later sequence wrote over the fork's keys).
#[test]
fn a_failed_device_append_changes_nothing() {
    use wgpu_attention::LimitCaps;
    use wgpu_attention::rotary::Rotary;
    let Some(gpu) = common::gpu() else { return };
    let (heads, kv_heads, dim, page) = (2, 1, 16, 4);
    let mut cache = PagedKvCache::new(gpu, 8, page, kv_heads, dim, dim)
        .unwrap()
        .with_rotary(Rotary::new(dim, 1e4).unwrap())
        .unwrap();
    let mut r = rng(95);
    let a = cache.add_sequence();
    let k0 = random(&mut r, 3 * kv_heads * dim, 1.0);
    let v0 = random(&mut r, 3 * kv_heads * dim, 1.0);
    cache.append(gpu, a, &k0, &v0).unwrap();
    let b = cache.fork(a).unwrap();
    let q = gpu
        .upload(&random(&mut r, heads * dim, 1.0), [1, heads, 1, dim])
        .unwrap();
    let attend = |cache: &PagedKvCache| {
        let out = cache.attend(gpu, &q, &[b], &Attention::new()).unwrap();
        out.o.download(gpu).unwrap()
    };
    let before = attend(&cache);
    let (free, pages) = (cache.free_pages(), cache.pages_of(b).unwrap().to_vec());
    let t = 6;
    let k = gpu
        .upload(&vec![0.1; t * kv_heads * dim], [t, kv_heads, dim])
        .unwrap();
    let capped = gpu.with_caps(LimitCaps {
        max_storage_binding: Some(128),
        ..LimitCaps::default()
    });
    let err = cache
        .append_tensors(&capped, &[b], &[t], &k, &k)
        .unwrap_err();
    assert!(matches!(err, Error::TooLarge { .. }), "{err:?}");
    assert_eq!(cache.free_pages(), free);
    assert_eq!(cache.pages_of(b).unwrap(), pages);
    assert_eq!(cache.len(b).unwrap(), 3);
    // a freed, its pages b still holds stay; a new sequence takes every free page, none of b's.
    cache.free_sequence(a).unwrap();
    let c = cache.add_sequence();
    let fill = cache.free_pages() * page;
    let big = random(&mut r, fill * kv_heads * dim, 5.0);
    cache.append(gpu, c, &big, &big).unwrap();
    assert!(
        cache
            .pages_of(c)
            .unwrap()
            .iter()
            .all(|p| !pages.contains(p))
    );
    assert_eq!(attend(&cache), before);
    // And the append goes through uncapped, copying the shared page first.
    cache.free_sequence(c).unwrap();
    cache.append_tensors(gpu, &[b], &[t], &k, &k).unwrap();
    assert_eq!(cache.len(b).unwrap(), 3 + t);
}

/// The books of a batch whose sequences share a partly filled last page (the first copies
/// it and lets go, so the last one holds it alone: one page, not two; a review found the
/// batch refused though one free page sufficed), and what `release_tokens` returns when a
/// fork keeps the pages (the pages the sequence let go of; the pool shrinks by the page of
/// zeros).
#[test]
fn batched_appends_and_releases_count_pages_right() {
    let Some(gpu) = common::gpu() else { return };
    let (heads, kv_heads, dim, page) = (2, 1, 8, 4);
    let row = kv_heads * dim;
    let mut c = PagedKvCache::new(gpu, 2, page, kv_heads, dim, dim).unwrap();
    let mut r = rng(97);
    let (k0, v0) = (random(&mut r, 2 * row, 1.0), random(&mut r, 2 * row, 1.0));
    let a = c.add_sequence();
    c.append(gpu, a, &k0, &v0).unwrap();
    let b = c.fork(a).unwrap();
    assert_eq!(c.free_pages(), 1);
    let (k1, v1) = (random(&mut r, 2 * row, 1.0), random(&mut r, 2 * row, 1.0));
    let up = |x: &[f32]| gpu.upload(x, [2, kv_heads, dim]).unwrap();
    c.append_tensors(gpu, &[a, b], &[1, 1], &up(&k1), &up(&v1))
        .unwrap();
    assert_eq!(c.free_pages(), 0);
    let written = |i: usize| Written {
        k: [&k0[..], &k1[i * row..(i + 1) * row]].concat(),
        v: [&v0[..], &v1[i * row..(i + 1) * row]].concat(),
    };
    let shape = (heads, kv_heads, dim);
    check_cache(
        gpu,
        &c,
        &[a, b],
        &[written(0), written(1)],
        shape,
        &Attention::new(),
        98,
    );

    let mut c = PagedKvCache::new(gpu, 6, page, kv_heads, dim, dim).unwrap();
    let a = c.add_sequence();
    c.append(gpu, a, &vec![0.5; 12 * row], &vec![0.5; 12 * row])
        .unwrap();
    let _b = c.fork(a).unwrap();
    assert_eq!(c.free_pages(), 3);
    assert_eq!(c.release_tokens(gpu, a, 0..8).unwrap(), 2);
    assert_eq!(
        c.free_pages(),
        2,
        "the fork holds both pages; the page of zeros is taken"
    );
    assert_eq!(
        c.release_tokens(gpu, a, 0..8).unwrap(),
        0,
        "released already"
    );
}

/// A sliding-window layer's cache holding about its window: decoding step by step, each step
/// releasing the tokens no later row can see (StreamingLLM's sink tokens kept), checked
/// against the reference on every token written; the released pages go back to the pool
/// (the sequence never holds more than its window's pages), their tokens (NaN here) never
/// reach the output (their entries point to the page of zeros), a fork keeps what it shares,
/// and calls that would see released tokens, or truncate into them, are typed errors.
#[test]
fn releasing_tokens_outside_a_sliding_window() {
    let Some(gpu) = common::gpu() else { return };
    let (heads, kv_heads, dim, page, window, sinks) = (4, 2, 16, 4, 7, 4);
    let row = kv_heads * dim;
    let mut cache = PagedKvCache::new(gpu, 40, page, kv_heads, dim, dim).unwrap();
    let mut r = rng(90);
    let a = cache.add_sequence();
    let mut wa = Written::default();
    // A prompt whose tokens 4..20 are NaN: all of them will be released.
    let mut k = random(&mut r, 30 * row, 1.0);
    let mut v = random(&mut r, 30 * row, 1.0);
    k[4 * row..20 * row].fill(f32::NAN);
    v[4 * row..20 * row].fill(f32::INFINITY);
    cache.append(gpu, a, &k, &v).unwrap();
    wa.k.extend_from_slice(&k);
    wa.v.extend_from_slice(&v);
    // A fork of the prompt, which keeps every page it shares.
    let f = cache.fork(a).unwrap();
    let wf = Written {
        k: random(&mut r, 30 * row, 1.0),
        v: random(&mut r, 30 * row, 1.0),
    };
    cache.truncate(f, 0).unwrap();
    cache.append(gpu, f, &wf.k, &wf.v).unwrap();
    let opts = Attention::new()
        .causal(Causal::BottomRight)
        .window(window - 1, 0)
        .sink_keys(sinks);
    let shape = (heads, kv_heads, dim);
    let mut held_most = 0;
    for step in 0..12 {
        let k1 = random(&mut r, row, 1.0);
        let v1 = random(&mut r, row, 1.0);
        cache.append(gpu, a, &k1, &v1).unwrap();
        wa.k.extend_from_slice(&k1);
        wa.v.extend_from_slice(&v1);
        let len = cache.len(a).unwrap();
        // The next row (this step's) sees positions from len - window on, and the sinks.
        cache.release_tokens(gpu, a, sinks..len - window).unwrap();
        let real = cache
            .pages_of(a)
            .unwrap()
            .iter()
            .collect::<std::collections::BTreeSet<_>>()
            .len();
        held_most = held_most.max(real);
        let seed = 91 + step;
        check_cache(gpu, &cache, &[a], &[wa.clone()], shape, &opts, seed);
    }
    // Sink page, window pages (window 7 over pages of 4: up to 3), the zero page.
    assert!(held_most <= 5, "held {held_most} distinct pages");
    check_cache(
        gpu,
        &cache,
        &[a, f],
        &[wa.clone(), wf.clone()],
        shape,
        &opts,
        120,
    );
    check_cache(
        gpu,
        &cache,
        &[f],
        std::slice::from_ref(&wf),
        shape,
        &Attention::new(),
        121,
    );
    // Seeing released tokens: no window, a wider one, sink keys past the kept ones.
    for bad in [
        Attention::new(),
        Attention::new().window(window + 4, 0),
        Attention::new().window(window - 1, 0).sink_keys(sinks + 1),
    ] {
        let q = gpu
            .upload(&vec![0.1; heads * dim], [1, heads, 1, dim])
            .unwrap();
        let err = cache.attend(gpu, &q, &[a], &bad).unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidOption {
                    what: "released tokens",
                    ..
                }
            ),
            "{bad:?}: {err:?}"
        );
    }
    let len = cache.len(a).unwrap();
    let (lo, hi) = (page, (len - window) / page * page);
    // A second range apart from the first, a range past the length, a cut into the range.
    assert_eq!(
        cache.release_tokens(gpu, a, 0..1).unwrap(),
        0,
        "no whole page"
    );
    for range in [hi + page..hi + 2 * page, hi..len + 1] {
        let err = cache.release_tokens(gpu, a, range.clone()).unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidOption {
                    what: "released tokens",
                    ..
                }
            ),
            "{range:?}: {err:?}"
        );
    }
    let err = cache.truncate(a, lo + 1).unwrap_err();
    assert!(matches!(err, Error::InvalidOption { .. }), "{err:?}");
    assert_eq!(cache.len(a).unwrap(), len);
    // Cut back before the released range: it is gone, and the sequence grows again from there.
    let free = cache.free_pages();
    cache.truncate(a, 3).unwrap();
    assert!(cache.free_pages() > free);
    wa.k.truncate(3 * row);
    wa.v.truncate(3 * row);
    let more_k = random(&mut r, 9 * row, 1.0);
    let more_v = random(&mut r, 9 * row, 1.0);
    cache.append(gpu, a, &more_k, &more_v).unwrap();
    wa.k.extend_from_slice(&more_k);
    wa.v.extend_from_slice(&more_v);
    check_cache(
        gpu,
        &cache,
        &[a, f],
        &[wa, wf],
        shape,
        &Attention::new(),
        122,
    );
    // Freeing both sequences gives back every page but the page of zeros.
    cache.free_sequence(a).unwrap();
    cache.free_sequence(f).unwrap();
    assert_eq!(cache.free_pages(), cache.pages() - 1);
}

#[test]
fn a_half_precision_paged_cache() {
    let Some(gpu) = common::gpu() else { return };
    let (heads, kv_heads, dim) = (8, 2, 64);
    for dtype in [DType::F16, DType::Bf16, DType::F8E4M3] {
        let mut cache =
            wgpu_attention::PagedKvCache::with_dtype(gpu, 100, 16, kv_heads, dim, dim, dtype)
                .unwrap();
        let mut r = rng(70);
        let mut written = Vec::new();
        let mut seqs = Vec::new();
        for t in [1100usize, 37, 1] {
            let s = cache.add_sequence();
            let k: Vec<f32> = random(&mut r, t * kv_heads * dim, 1.0)
                .into_iter()
                .map(|x| dtype.round(x))
                .collect();
            let v: Vec<f32> = random(&mut r, t * kv_heads * dim, 1.0)
                .into_iter()
                .map(|x| dtype.round(x))
                .collect();
            cache.append(gpu, s, &k, &v).unwrap();
            written.push(Written { k, v });
            seqs.push(s);
        }
        check_cache(
            gpu,
            &cache,
            &seqs,
            &written,
            (heads, kv_heads, dim),
            &Attention::new(),
            71,
        );
    }
}

#[test]
fn paged_cache_construction_errors() {
    let Some(gpu) = common::gpu() else { return };
    use wgpu_attention::PagedKvCache;
    for (pages, page, kvh) in [(0, 16, 2), (8, 0, 2), (8, 16, 0)] {
        let e = PagedKvCache::new(gpu, pages, page, kvh, 8, 8).unwrap_err();
        assert!(matches!(e, Error::ZeroSize { .. }), "{e:?}");
    }
    let e = PagedKvCache::with_dtype(gpu, 8, 16, 1, 7, 8, DType::F16).unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidOption {
                what: "paged cache head dims",
                ..
            }
        ),
        "{e:?}"
    );
    // Odd head dims are fine when kv_heads makes each token's row even.
    PagedKvCache::with_dtype(gpu, 8, 16, 2, 7, 7, DType::Bf16).unwrap();
    let e = PagedKvCache::new(gpu, 8, 16, 1, 600, 8).unwrap_err();
    assert!(matches!(e, Error::HeadDimTooLarge { .. }), "{e:?}");
    let e = PagedKvCache::new(gpu, 1 << 40, 1 << 30, 1, 8, 8).unwrap_err();
    assert!(matches!(e, Error::TooLarge { .. }), "{e:?}");
}

/// Random paged problems: page sizes 1 to 20, pools with spare pages, shuffled (and, half the
/// time, shared first) pages, random lengths and options, on the fused and decode paths.
#[test]
fn proptest_random_paged_calls() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, RngSeed, TestRunner};
    use rand::Rng;
    if common::gpu().is_none() {
        return;
    }
    let mut runner = TestRunner::new(Config {
        cases: 24,
        rng_seed: RngSeed::Fixed(0x9a9e),
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = (
        (1usize..=3, 1usize..=2, 1usize..=3, 1usize..=20, 1usize..=12),
        (
            1usize..=5,
            0usize..=3,
            any::<bool>(),
            any::<bool>(),
            0usize..3,
        ),
        (any::<bool>(), any::<u64>()),
    );
    runner
        .run(
            &strategy,
            |(
                (batch, kv_heads, group, page, pps),
                (q_len, spare, share, lens, causal),
                (decode, seed),
            )| {
                let p = paged(
                    seed,
                    (batch, kv_heads, 16, 8),
                    page,
                    pps,
                    batch * pps + spare,
                    share,
                );
                let mut r = rng(seed ^ 1);
                let mut opts = match causal {
                    1 => Attention::new().causal(Causal::TopLeft),
                    2 => Attention::new().causal(Causal::BottomRight),
                    _ => Attention::new(),
                };
                if lens {
                    let s = (page * pps) as u32;
                    opts = opts.kv_lens((0..batch).map(|_| r.random_range(0..=s)).collect());
                }
                let path = if decode { Path::Decode } else { Path::Fused };
                check(&p, kv_heads * group, q_len, path, &opts, DType::F32, seed);
                Ok(())
            },
        )
        .unwrap();
}
