//! Masking options on the device (`gpu::options`): a bias tensor, a device mask and device
//! lengths give the results of their host forms on every path; bad shapes, dtypes and devices
//! are typed errors; lengths past the problem act as the full length; the CPU paths refuse
//! them; `DeviceLens::write` and `KvCache` keep them current.

mod common;

use common::{
    O_ATOL, O_RTOL, assert_close, check_against_host_form, dims, random, random_mask, rng,
};
use wgpu_attention::{Attention, Causal, DType, Error, Gpu, KvCache, Layout, Path, cpu};

#[test]
fn device_forms_match_the_reference_on_every_path() {
    let Some(gpu) = common::gpu() else { return };
    for (seed, (path, d)) in [
        (Path::ThreePass, dims(2, 4, 2, 13, 37, 16, 12)),
        (Path::Fused, dims(2, 3, 3, 70, 133, 24, 20)),
        (Path::Decode, dims(2, 8, 2, 1, 1100, 64, 64)),
    ]
    .into_iter()
    .enumerate()
    {
        let mut r = rng(100 + seed as u64);
        let bias_shape = [d.batch, 1, d.q_len, d.kv_len];
        let bias = random(&mut r, bias_shape.iter().product(), 3.0);
        let mask_shape = [1, d.heads, 1, d.kv_len];
        let mask = random_mask(&mut r, mask_shape.iter().product(), 0.8);
        let kv_lens = vec![d.kv_len as u32, (d.kv_len / 2) as u32];
        let q_lens = vec![d.q_len as u32, (d.q_len as u32).div_ceil(2)];
        let base = Attention::new().causal(Causal::BottomRight);
        let host = base
            .clone()
            .bias(bias_shape, bias.clone())
            .mask(mask_shape, mask.clone())
            .kv_lens(kv_lens.clone())
            .q_lens(q_lens.clone());
        let bias_t = gpu.upload(&bias, bias_shape).unwrap();
        let mask_t = gpu.upload_mask(mask_shape, &mask).unwrap();
        let lens_t = gpu.upload_lens(Some(&kv_lens), Some(&q_lens)).unwrap();
        let device = base
            .bias_tensor(&bias_t)
            .mask_tensor(&mask_t)
            .lens_tensor(&lens_t);
        check_against_host_form(gpu, path, d, &device, &host, seed as u64, 2.0);
    }
}

/// Device lengths with ALiBi slopes and sinks, which live in the call's own buffer behind a
/// copy of the device's lengths; and a cache attending with them.
#[test]
fn device_lengths_with_alibi_and_sinks() {
    let Some(gpu) = common::gpu() else { return };
    for (seed, (path, d)) in [
        (Path::ThreePass, dims(2, 4, 2, 13, 37, 16, 12)),
        (Path::Fused, dims(2, 3, 3, 70, 133, 24, 20)),
        (Path::Decode, dims(2, 8, 2, 1, 1100, 64, 64)),
    ]
    .into_iter()
    .enumerate()
    {
        let mut r = rng(200 + seed as u64);
        let kv_lens = vec![(d.kv_len / 3) as u32, d.kv_len as u32];
        let q_lens = vec![d.q_len as u32, (d.q_len as u32).div_ceil(2)];
        let base = Attention::new()
            .causal(Causal::BottomRight)
            .alibi(common::positive(random(&mut r, d.heads, 0.1)))
            .sinks(random(&mut r, d.heads, 3.0));
        let host = base.clone().kv_lens(kv_lens.clone()).q_lens(q_lens.clone());
        let lens_t = gpu.upload_lens(Some(&kv_lens), Some(&q_lens)).unwrap();
        let device = base.lens_tensor(&lens_t);
        check_against_host_form(gpu, path, d, &device, &host, 10 + seed as u64, 2.0);
    }

    let (batch, kv_heads, heads, dim) = (2, 2, 4, 16);
    let mut cache = KvCache::new(gpu, batch, kv_heads, 64, dim, dim).unwrap();
    let mut r = rng(14);
    let k = random(&mut r, batch * kv_heads * 20 * dim, 1.0);
    let v = random(&mut r, batch * kv_heads * 20 * dim, 1.0);
    cache.append(gpu, &k, &v, &[20, 9]).unwrap();
    let q = random(&mut r, batch * heads * dim, 1.0);
    let tq = gpu.upload(&q, [batch, heads, 1, dim]).unwrap();
    let extra = Attention::new()
        .alibi(common::positive(random(&mut r, heads, 0.3)))
        .sinks(random(&mut r, heads, 2.0));
    let got = cache
        .attend(gpu, &tq, &extra)
        .unwrap()
        .o
        .download(gpu)
        .unwrap();
    let (kc, vc) = (
        cache.k().download(gpu).unwrap(),
        cache.v().download(gpu).unwrap(),
    );
    let want = cpu::reference(
        &q,
        &kc,
        &vc,
        dims(batch, heads, kv_heads, 1, 64, dim, dim),
        &extra
            .causal(Causal::BottomRight)
            .kv_lens(cache.lens().to_vec()),
    )
    .unwrap();
    assert_close("cache with alibi and sinks", &got, &want.o, O_ATOL, O_RTOL);
}

/// Lengths past `kv_len` / `q_len` (which the host form refuses) act as the full length.
#[test]
fn device_lengths_past_the_problem_act_as_the_full_length() {
    let Some(gpu) = common::gpu() else { return };
    let d = dims(2, 2, 2, 9, 70, 16, 16);
    let lens = gpu
        .upload_lens(Some(&[1000, 33]), Some(&[9, u32::MAX]))
        .unwrap();
    let device = Attention::new().lens_tensor(&lens);
    let host = Attention::new().kv_lens(vec![70, 33]);
    for path in [Path::ThreePass, Path::Fused, Path::Decode] {
        check_against_host_form(gpu, path, d, &device, &host, 11, 1.0);
    }
}

/// `DeviceLens::write` changes what the next call sees.
#[test]
fn lengths_written_in_place_reach_the_next_call() {
    let Some(gpu) = common::gpu() else { return };
    let d = dims(2, 4, 2, 1, 300, 32, 32);
    let lens = gpu.upload_lens(Some(&[300, 100]), None).unwrap();
    let opts = Attention::new().lens_tensor(&lens);
    for kv_lens in [[300, 100], [17, 299], [1, 1]] {
        lens.write(gpu, Some(&kv_lens), None).unwrap();
        let host = Attention::new().kv_lens(kv_lens.to_vec());
        check_against_host_form(gpu, Path::Decode, d, &opts, &host, 12, 1.0);
    }
    let wrong = lens.write(gpu, Some(&[1, 2]), Some(&[1, 1]));
    assert!(
        matches!(wrong, Err(Error::InvalidOption { .. })),
        "{wrong:?}"
    );
    let wrong = lens.write(gpu, Some(&[1, 2, 3]), None);
    assert!(
        matches!(wrong, Err(Error::InvalidOption { .. })),
        "{wrong:?}"
    );
}

#[test]
fn bad_device_options_are_typed_errors() {
    let Some(gpu) = common::gpu() else { return };
    let d = dims(2, 4, 2, 3, 10, 8, 8);
    let q = gpu
        .upload(&vec![0.5; d.q_elems()], d.q_shape(Layout::Bhsd))
        .unwrap();
    let k = gpu
        .upload(&vec![0.5; d.k_elems()], d.k_shape(Layout::Bhsd))
        .unwrap();
    let run = |opts: Attention| opts.run(gpu, &q, &k, &k).map(drop);
    let half = gpu
        .upload_as(&[0.5; 20], [2, 1, 1, 10], DType::F16)
        .unwrap();
    let r = run(Attention::new().bias_tensor(&half));
    assert!(
        matches!(
            r,
            Err(Error::InvalidOption {
                what: "bias tensor dtype",
                ..
            })
        ),
        "{r:?}"
    );
    let wide = gpu.upload(&[0.5; 22], [2, 1, 1, 11]).unwrap();
    let r = run(Attention::new().bias_tensor(&wide));
    assert!(matches!(r, Err(Error::BroadcastShape { .. })), "{r:?}");
    let mask = gpu.upload_mask([3, 1, 1, 10], &[true; 30]).unwrap();
    let r = run(Attention::new().mask_tensor(&mask));
    assert!(matches!(r, Err(Error::BroadcastShape { .. })), "{r:?}");
    let lens = gpu.upload_lens(Some(&[1, 2, 3]), None).unwrap();
    let r = run(Attention::new().lens_tensor(&lens));
    assert!(matches!(r, Err(Error::ShapeMismatch { .. })), "{r:?}");
    assert!(matches!(
        gpu.upload_mask([1, 1, 1, 10], &[true; 9]),
        Err(Error::DataLength { .. })
    ));
    assert!(matches!(
        gpu.upload_mask([1, 0, 1, 10], &[]),
        Err(Error::ZeroSize { .. })
    ));
    assert!(matches!(
        gpu.upload_lens(None, None),
        Err(Error::InvalidOption { .. })
    ));
    assert!(matches!(
        gpu.upload_lens(Some(&[1, 2]), Some(&[1])),
        Err(Error::ShapeMismatch { .. })
    ));
    // The CPU paths cannot read device data.
    let host = vec![0.5; d.q_elems()];
    let kv = vec![0.5; d.k_elems()];
    let on_device =
        Attention::new().mask_tensor(&gpu.upload_mask([1, 1, 1, 10], &[true; 10]).unwrap());
    let r = cpu::reference(&host, &kv, &kv, d, &on_device).map(drop);
    assert!(matches!(r, Err(Error::InvalidOption { .. })), "{r:?}");
    let r = cpu::fast(&host, &kv, &kv, d, &on_device).map(drop);
    assert!(matches!(r, Err(Error::InvalidOption { .. })), "{r:?}");
    // A host form set after a device form replaces it, and the other way round.
    let replaced = on_device.clone().mask([1, 1, 1, 10], vec![true; 10]);
    cpu::reference(&host, &kv, &kv, d, &replaced).unwrap();
    // Options of another device.
    let other = Gpu::new().unwrap();
    let foreign = other.upload(&[0.5; 20], [2, 1, 1, 10]).unwrap();
    let r = run(Attention::new().bias_tensor(&foreign));
    assert!(matches!(r, Err(Error::WrongDevice { .. })), "{r:?}");
    let foreign = other.upload_lens(Some(&[1, 2]), None).unwrap();
    let r = run(Attention::new().lens_tensor(&foreign));
    assert!(matches!(r, Err(Error::WrongDevice { .. })), "{r:?}");
    assert!(matches!(
        foreign.write(gpu, Some(&[1, 1]), None),
        Err(Error::WrongDevice { .. })
    ));
}

/// The cache's lengths live on the device: appends keep them current, and after `clear` the
/// next `attend` sees the empty cache's new tokens, not the old lengths.
#[test]
fn kv_cache_lengths_on_the_device_stay_current() {
    let Some(gpu) = common::gpu() else { return };
    let (batch, kv_heads, heads, dim) = (2, 2, 4, 16);
    let mut cache = KvCache::new(gpu, batch, kv_heads, 64, dim, dim).unwrap();
    let mut r = rng(13);
    let check = |cache: &mut KvCache, new: [usize; 2], r: &mut rand::rngs::StdRng| {
        let t = new.iter().copied().max().unwrap();
        let k = random(r, batch * kv_heads * t * dim, 1.0);
        let v = random(r, batch * kv_heads * t * dim, 1.0);
        cache.append(gpu, &k, &v, &new).unwrap();
        let q = random(r, batch * heads * dim, 1.0);
        let tq = gpu.upload(&q, [batch, heads, 1, dim]).unwrap();
        let got = cache
            .attend(gpu, &tq, &Attention::new())
            .unwrap()
            .o
            .download(gpu)
            .unwrap();
        let kc = cache.k().download(gpu).unwrap();
        let vc = cache.v().download(gpu).unwrap();
        let lens = cache.lens().to_vec();
        let d = dims(batch, heads, kv_heads, 1, 64, dim, dim);
        let opts = Attention::new()
            .causal(Causal::BottomRight)
            .kv_lens(lens.clone());
        let want = cpu::reference(&q, &kc, &vc, d, &opts).unwrap();
        assert_close(
            &format!("cache at lens {lens:?}"),
            &got,
            &want.o,
            O_ATOL,
            O_RTOL,
        );
    };
    check(&mut cache, [20, 7], &mut r);
    check(&mut cache, [1, 1], &mut r);
    cache.clear();
    // Straight after clear, with no append to rewrite them: every key is gone.
    let q = gpu
        .upload(
            &random(&mut r, batch * heads * dim, 1.0),
            [batch, heads, 1, dim],
        )
        .unwrap();
    let empty = cache
        .attend(gpu, &q, &Attention::new())
        .unwrap()
        .o
        .download(gpu)
        .unwrap();
    assert!(
        empty.iter().all(|&x| x == 0.0),
        "a cleared cache attends to nothing"
    );
    check(&mut cache, [3, 5], &mut r);
}

/// Several threads attending right after `clear`: none may submit before the cleared lengths
/// are written (a thread that saw the stale flag cleared used to race the one writing them).
#[test]
fn concurrent_attends_after_clear_see_the_cleared_lengths() {
    let Some(gpu) = common::gpu() else { return };
    let (batch, kv_heads, heads, dim) = (1, 1, 2, 8);
    let mut cache = KvCache::new(gpu, batch, kv_heads, 16, dim, dim).unwrap();
    let q = gpu.upload(&[0.5; 16], [batch, heads, 1, dim]).unwrap();
    let kv = vec![0.5; 8 * dim];
    let threads = 6;
    for round in 0..200 {
        cache.append(gpu, &kv, &kv, &[8]).unwrap();
        cache.clear();
        let barrier = std::sync::Barrier::new(threads);
        let cache = &cache;
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| {
                    barrier.wait();
                    let o = cache.attend(gpu, &q, &Attention::new()).unwrap().o;
                    let o = o.download(gpu).unwrap();
                    assert!(
                        o.iter().all(|&x| x == 0.0),
                        "round {round}: an attend saw the cleared tokens"
                    );
                });
            }
        });
    }
}

#[test]
fn lengths_on_the_host_and_the_device_together_are_refused() {
    let Some(gpu) = common::gpu() else { return };
    let d = dims(2, 2, 2, 4, 40, 8, 8);
    let q = gpu
        .upload(&vec![0.5; d.q_elems()], d.q_shape(Layout::Bhsd))
        .unwrap();
    let k = gpu
        .upload(&vec![0.5; d.k_elems()], d.k_shape(Layout::Bhsd))
        .unwrap();
    let lens = gpu.upload_lens(Some(&[40, 5]), None).unwrap();
    for opts in [
        Attention::new().lens_tensor(&lens).q_lens(vec![4, 2]),
        Attention::new().kv_lens(vec![40, 5]).lens_tensor(&lens),
    ] {
        let r = opts.run(gpu, &q, &k, &k).map(drop);
        assert!(
            matches!(
                r,
                Err(Error::InvalidOption {
                    what: "lengths",
                    ..
                })
            ),
            "{r:?}"
        );
    }
}

/// Buffers are bound whole, so one whose size is not a whole number of words is refused when
/// it is wrapped, not by wgpu at the call.
#[test]
fn wrapped_buffers_of_odd_sizes_are_refused() {
    let Some(gpu) = common::gpu() else { return };
    let buffer = |size| {
        gpu.device().create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        })
    };
    let r = wgpu_attention::DeviceMask::from_buffer(gpu, buffer(10), [1, 1, 1, 5]);
    assert!(matches!(r, Err(Error::InvalidOption { .. })), "{r:?}");
    let r = wgpu_attention::Tensor::from_buffer(gpu, buffer(22), [1, 1, 1, 5], DType::F32);
    assert!(matches!(r, Err(Error::InvalidOption { .. })), "{r:?}");
    wgpu_attention::DeviceMask::from_buffer(gpu, buffer(8), [1, 1, 1, 5]).unwrap();
}
