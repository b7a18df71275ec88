//! The test grid in a browser: every GPU path, both layouts, GQA, causal, windows, masks,
//! f16, bf16 and 8-bit storage (packed in `u32`: the browser has no `shader-f16` here),
//! dropout, score and mask mods, the KV cache, RoPE and the layer, through WebGPU, each against
//! `cpu::reference` compiled to wasm, on shapes that are not multiples of the tiles. Run by `web/run-tests.sh` (headless Chromium); with no
//! WebGPU adapter every test fails.

use std::future::Future;

use wasm_bindgen_test::*;
use wgpu_attention::cpu::mha_reference;
use wgpu_attention::{
    Attention, Causal, DType, Dims, Error, Gpu, KvCache, Layout, MhaConfig, MhaWeights,
    MultiHeadAttention, Path, ScoreMod,
};
use wgpu_attention_web::{Rng, check, close};

wasm_bindgen_test_configure!(run_in_browser);

async fn gpu() -> Gpu {
    match Gpu::new_async().await {
        Ok(gpu) => gpu,
        Err(e) => panic!("no WebGPU adapter in this browser: {e}"),
    }
}

fn dims(b: usize, h: usize, hkv: usize, l: usize, s: usize, d: usize, dv: usize) -> Dims {
    Dims {
        batch: b,
        heads: h,
        kv_heads: hkv,
        q_len: l,
        kv_len: s,
        head_dim: d,
        v_head_dim: dv,
    }
}

const F32: [DType; 4] = [DType::F32; 4];

async fn run(gpu: &Gpu, cases: &[(Path, Dims, Attention, [DType; 4])]) {
    for (seed, (path, dims, opts, types)) in cases.iter().enumerate() {
        let checked = check(gpu, *path, *dims, opts, 700 + seed as u64, *types)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        console_log!(
            "{path:?} {dims:?} ran {} (max |diff| {:e})",
            checked.plan,
            checked.max_abs
        );
    }
}

#[wasm_bindgen_test]
async fn adapter_and_limits() {
    let gpu = gpu().await;
    let info = gpu.adapter_info();
    console_log!(
        "adapter: {} ({:?}), vendor {:#x}",
        gpu.describe(),
        info.backend,
        info.vendor
    );
    console_log!("tile config: {:?}", gpu.tile_config());
    console_log!("limits: {:?}", gpu.limits());
    console_log!("features: {:?}", gpu.features());
    assert_eq!(format!("{:?}", info.backend), "BrowserWebGpu");
    // The blocking calls say what to await instead.
    assert!(matches!(Gpu::new(), Err(Error::Blocking { .. })));
    assert!(matches!(gpu.wait(), Err(Error::Blocking { .. })));
    let t = gpu.upload(&[1.0, 2.0], [1, 1, 1, 2]).unwrap();
    assert!(matches!(t.download(&gpu), Err(Error::Blocking { .. })));
    assert_eq!(t.download_async(&gpu).await.unwrap(), vec![1.0, 2.0]);
    gpu.wait_async().await.unwrap();
}

#[wasm_bindgen_test]
async fn every_path_and_layout() {
    let gpu = gpu().await;
    let mut cases = Vec::new();
    for layout in [Layout::Bhsd, Layout::Bshd] {
        let opts = Attention::new().layout(layout);
        cases.push((
            Path::ThreePass,
            dims(2, 3, 3, 19, 45, 24, 20),
            opts.clone(),
            F32,
        ));
        cases.push((
            Path::Fused,
            dims(1, 4, 2, 70, 133, 40, 36),
            opts.clone(),
            F32,
        ));
        // One query per kv head's group: the decode-shaped kernel, split over the keys.
        cases.push((
            Path::Decode,
            dims(1, 8, 2, 1, 1100, 64, 64),
            opts.clone(),
            F32,
        ));
    }
    run(&gpu, &cases).await;
}

#[wasm_bindgen_test]
async fn gqa_causal_window_softcap() {
    let gpu = gpu().await;
    let cases = [
        (
            Path::Fused,
            dims(1, 6, 2, 37, 37, 32, 32),
            Attention::new().causal(Causal::TopLeft),
            F32,
        ),
        (
            Path::ThreePass,
            dims(1, 4, 1, 21, 50, 16, 16),
            Attention::new().causal(Causal::BottomRight),
            F32,
        ),
        (
            Path::Fused,
            dims(1, 3, 3, 70, 133, 40, 36),
            Attention::new().window(20, 5).softcap(8.0),
            F32,
        ),
        (
            Path::Decode,
            dims(2, 8, 2, 3, 300, 64, 64),
            Attention::new()
                .causal(Causal::BottomRight)
                .kv_lens(vec![300, 171]),
            F32,
        ),
        // Dropout on each path (the reference drops the same weights).
        (
            Path::Fused,
            dims(1, 4, 2, 37, 70, 24, 24),
            Attention::new()
                .dropout(0.3, 11)
                .causal(Causal::BottomRight),
            F32,
        ),
        (
            Path::ThreePass,
            dims(1, 4, 2, 21, 50, 16, 16),
            Attention::new().dropout(0.5, 12),
            F32,
        ),
        (
            Path::Decode,
            dims(1, 8, 2, 1, 300, 64, 64),
            Attention::new().dropout(0.2, 13),
            F32,
        ),
        // Score and mask mods of the user's own, compiled into each kernel by the browser's
        // compiler (the reference runs their closures).
        (
            Path::Fused,
            dims(1, 4, 2, 37, 70, 24, 24),
            Attention::new()
                .score_mod(score_mod(4))
                .causal(Causal::BottomRight),
            F32,
        ),
        (
            Path::ThreePass,
            dims(1, 4, 2, 21, 50, 16, 16),
            Attention::new().score_mod(score_mod(4)),
            F32,
        ),
        (
            Path::Decode,
            dims(1, 8, 2, 1, 300, 64, 64),
            Attention::new().score_mod(score_mod(8)),
            F32,
        ),
        // A ready-made range (positions from the lengths, its words after the user's).
        (
            Path::Fused,
            dims(1, 4, 2, 70, 133, 24, 24),
            Attention::new()
                .causal(Causal::BottomRight)
                .score_mod(ScoreMod::chunked(16)),
            F32,
        ),
    ];
    run(&gpu, &cases).await;
}

/// A mask mod removing a pattern across tiles, a score mod bending each head's scores by a
/// factor from its data, with its derivative, and a key range (a band drifting with the row).
fn score_mod(heads: usize) -> ScoreMod {
    let factors: Vec<f32> = (0..heads).map(|h| 0.6 + 0.25 * h as f32).collect();
    let (f, g) = (factors.clone(), factors.clone());
    ScoreMod::new()
        .mask_wgsl("return (i / 3u + j / 7u) % 4u != 2u;")
        .mask_cpu(|_, _, i, j| (i / 3 + j / 7) % 4 != 2)
        .score_wgsl("return attn_data_f32(h) * s + 0.3 * sin(s);")
        .score_cpu(move |s, _, h, _, _| f[h] as f64 * s + 0.3 * s.sin())
        .grad_wgsl("return attn_data_f32(h) + 0.3 * cos(s);")
        .grad_cpu(move |s, _, h, _, _| g[h] as f64 + 0.3 * s.cos())
        .range_wgsl("return vec2<u32>(i / 3u, i / 3u + 90u);")
        .range_cpu(|_, i| (i / 3, i / 3 + 90))
        .data_f32(&factors)
}

#[wasm_bindgen_test]
async fn masks_and_bias() {
    let gpu = gpu().await;
    let d = dims(2, 2, 2, 17, 29, 16, 16);
    let mut r = Rng::new(5);
    let mask: Vec<bool> = (0..2 * 17 * 29).map(|_| r.uniform() > -0.6).collect();
    let bias = r.values(2 * 2 * 17 * 29, 1.5);
    let opts = Attention::new()
        .mask([2, 1, 17, 29], mask)
        .bias([2, 2, 17, 29], bias);
    let cases = [
        (Path::ThreePass, d, opts.clone(), F32),
        (Path::Fused, d, opts.clone(), F32),
    ];
    run(&gpu, &cases).await;
}

#[wasm_bindgen_test]
async fn half_precision_packed() {
    let gpu = gpu().await;
    // Without `shader-f16`, f16 and bf16 tensors are packed two to a u32 word on every path;
    // 8-bit K and V four to a word.
    let f8 = DType::F8E4M3;
    for types in [
        [DType::F16; 4],
        [DType::Bf16; 4],
        [DType::F32, f8, f8, DType::F32],
        [f8; 4],
    ] {
        let cases = [
            (
                Path::ThreePass,
                dims(1, 2, 2, 13, 27, 24, 24),
                Attention::new(),
                types,
            ),
            (
                Path::Fused,
                dims(1, 4, 2, 33, 65, 40, 40),
                Attention::new(),
                types,
            ),
            (
                Path::Decode,
                dims(1, 8, 2, 1, 700, 64, 64),
                Attention::new(),
                types,
            ),
        ];
        run(&gpu, &cases).await;
    }
}

#[wasm_bindgen_test]
async fn kv_cache_decoding() {
    let gpu = gpu().await;
    let (heads, kv_heads, cap, d) = (4, 2, 300, 32);
    let mut cache = KvCache::new(&gpu, 1, kv_heads, cap, d, d).unwrap();
    let mut host_k = vec![0f32; kv_heads * cap * d];
    let mut host_v = vec![0f32; kv_heads * cap * d];
    let mut r = Rng::new(9);
    for (step, new) in [77usize, 1, 1, 5].into_iter().enumerate() {
        let k = r.values(kv_heads * new * d, 1.0);
        let v = r.values(kv_heads * new * d, 1.0);
        let start = cache.lens()[0] as usize;
        cache.append(&gpu, &k, &v, &[new]).unwrap();
        for h in 0..kv_heads {
            for row in 0..new {
                let dst = (h * cap + start + row) * d;
                let src = (h * new + row) * d;
                host_k[dst..dst + d].copy_from_slice(&k[src..src + d]);
                host_v[dst..dst + d].copy_from_slice(&v[src..src + d]);
            }
        }
        let q = r.values(heads * new * d, 1.0);
        let tq = gpu.upload(&q, [1, heads, new, d]).unwrap();
        let out = cache.attend(&gpu, &tq, &Attention::new()).unwrap();
        let want_opts = Attention::new()
            .kv_lens(cache.lens().to_vec())
            .causal(Causal::BottomRight);
        let want = wgpu_attention::cpu::reference(
            &q,
            &host_k,
            &host_v,
            dims(1, heads, kv_heads, new, cap, d, d),
            &want_opts,
        )
        .unwrap();
        let o = out.o.download_async(&gpu).await.unwrap();
        close(&format!("cache step {step}"), &o, &want.o, 2e-5, 1e-4).unwrap();
    }
}

/// RoPE on WebGPU: `gpu::rotate` in f32 and bf16 (packed in `u32`) against `cpu::rotate`, and
/// a cache that turns K and its queries, against the reference on the host-turned tensors.
#[wasm_bindgen_test]
async fn rotary_embedding() {
    use wgpu_attention::rotary::{Positions, Rotary};
    let gpu = gpu().await;
    let mut r = Rng::new(12);
    let shape = [2, 7, 3, 40]; // Bshd: 2 sequences of 7 rows, 3 heads of 40
    let x = r.values(2 * 7 * 3 * 40, 1.0);
    for (rope, dtype, tol) in [
        (Rotary::new(40, 10_000.0).unwrap(), DType::F32, 2e-6),
        (
            Rotary::new(24, 500_000.0).unwrap().interleaved(),
            DType::Bf16,
            1e-2,
        ),
    ] {
        // One start per sequence, and M-RoPE's three positions per row (Qwen3-VL's cycle).
        let axes: Vec<[u32; 3]> = (0..14).map(|i| [i, 3 * i + 1, 70_000 - i]).collect();
        let mrope = rope
            .clone()
            .mrope_interleaved([rope.dim() / 2 - 6, 4, 2])
            .unwrap();
        for (rope, at) in [
            (rope, Positions::Start(vec![3, 100_000])),
            (mrope, Positions::Axes(axes)),
        ] {
            let t = gpu.upload_as(&x, shape, dtype).unwrap();
            let held = t.download_async(&gpu).await.unwrap();
            let want = wgpu_attention::cpu::rotate(&held, shape, Layout::Bshd, &rope, &at).unwrap();
            let got = wgpu_attention::gpu::rotate(&gpu, &t, Layout::Bshd, &rope, &at).unwrap();
            let got = got.download_async(&gpu).await.unwrap();
            close(&format!("rotate {dtype:?} {at:?}"), &got, &want, tol, tol).unwrap();
        }
    }
    let (heads, kv_heads, cap, d) = (4, 2, 64, 16);
    let rope = Rotary::new(d, 10_000.0).unwrap();
    let mut cache = KvCache::new(&gpu, 1, kv_heads, cap, d, d)
        .unwrap()
        .with_rotary(rope.clone())
        .unwrap();
    let k = r.values(kv_heads * 9 * d, 1.0);
    let v = r.values(kv_heads * 9 * d, 1.0);
    cache.append(&gpu, &k, &v, &[9]).unwrap();
    let q = r.values(heads * 2 * d, 1.0);
    let tq = gpu.upload(&q, [1, heads, 2, d]).unwrap();
    let out = cache.attend(&gpu, &tq, &Attention::new()).unwrap();
    let turn = |x: &[f32], h: usize, n: usize, from: u32| {
        wgpu_attention::cpu::rotate(
            x,
            [1, h, n, d],
            Layout::Bhsd,
            &rope,
            &Positions::Start(vec![from]),
        )
        .unwrap()
    };
    let want = wgpu_attention::cpu::reference(
        &turn(&q, heads, 2, 7),
        &turn(&k, kv_heads, 9, 0),
        &v,
        dims(1, heads, kv_heads, 2, 9, d, d),
        &Attention::new().causal(Causal::BottomRight),
    )
    .unwrap();
    let o = out.o.download_async(&gpu).await.unwrap();
    close("rotary cache", &o, &want.o, 2e-5, 1e-4).unwrap();
}

#[wasm_bindgen_test]
async fn multi_head_layer() {
    let gpu = gpu().await;
    let config = MhaConfig::new(24, 3);
    let (batch, l, s) = (2, 9, 13);
    let mut r = Rng::new(11);
    let e = config.embed_dim;
    let w = MhaWeights::new(
        r.values(e * e, 0.3),
        r.values(e * e, 0.3),
        r.values(e * e, 0.3),
        r.values(e * e, 0.3),
    );
    let query = r.values(batch * l * e, 1.0);
    let key = r.values(batch * s * e, 1.0);
    let value = r.values(batch * s * e, 1.0);
    let opts = Attention::new().causal(Causal::BottomRight);
    let layer = MultiHeadAttention::new(&gpu, config, &w).unwrap();
    let (want, _) = mha_reference(
        &config,
        &w,
        &query,
        &key,
        &value,
        (batch, l, s),
        &opts,
        false,
    )
    .unwrap();
    let got = layer
        .forward(
            &gpu,
            &gpu.upload(&query, [batch, l, e]).unwrap(),
            &gpu.upload(&key, [batch, s, e]).unwrap(),
            &gpu.upload(&value, [batch, s, e]).unwrap(),
            &opts,
        )
        .unwrap();
    let out = got.out.download_async(&gpu).await.unwrap();
    close("layer output", &out, &want, 2e-5, 1e-4).unwrap();
}

/// Under WebGPU's default limits (what a page that asks for nothing more gets): the plans
/// that fit 16 KiB of workgroup memory and 8 storage buffers, exact.
#[wasm_bindgen_test]
async fn webgpu_default_limits() {
    let gpu = gpu()
        .await
        .with_caps(wgpu_attention::LimitCaps::webgpu_defaults());
    let causal = Attention::new().causal(Causal::BottomRight);
    let cases = [
        (
            Path::Auto,
            dims(1, 4, 2, 70, 133, 40, 40),
            causal.clone(),
            F32,
        ),
        (
            Path::Auto,
            dims(1, 8, 2, 1, 1100, 64, 64),
            causal.clone(),
            F32,
        ),
    ];
    run(&gpu, &cases).await;
}

/// The backward in the browser, within its 8 storage buffers: dQ, dK, dV and the bias's
/// gradient against `cpu::reference_backward`, in tiles where the adapter's workgroup memory
/// holds them (a causal call with a bias, and a plain one with full 64 x 64 tiles), and one
/// row per invocation under WebGPU's default 16 KiB.
#[wasm_bindgen_test]
async fn backward_against_the_reference() {
    let gpu = gpu().await;
    let mut r = Rng::new(31);
    // With dropout: the forward and the backward drop the same weights as the reference.
    let biased = Attention::new()
        .dropout(0.3, 32)
        .causal(Causal::BottomRight)
        .bias([1, 4, 70, 45], r.values(4 * 70 * 45, 1.0))
        .return_bias_grad(true);
    let cases = [
        (dims(1, 4, 2, 70, 45, 24, 16), biased),
        // With score and mask mods (the tiled kernels' full tiles take the per-key code).
        (
            dims(1, 2, 1, 130, 140, 32, 32),
            Attention::new().score_mod(score_mod(2)),
        ),
    ];
    for (g, (d, opts)) in [
        gpu.clone(),
        gpu.clone(),
        gpu.with_caps(wgpu_attention::LimitCaps::webgpu_defaults()),
    ]
    .into_iter()
    .zip([&cases[0], &cases[1], &cases[0]])
    {
        let (d, opts) = (*d, opts);
        let q = r.values(d.q_elems(), 1.5);
        let k = r.values(d.k_elems(), 1.5);
        let v = r.values(d.v_elems(), 1.0);
        let d_o = r.values(d.o_elems(), 1.0);
        let want = wgpu_attention::cpu::reference_backward(&q, &k, &v, &d_o, d, opts).unwrap();
        let up = |x: &[f32], dims| g.upload(x, dims).unwrap();
        let layout = Layout::Bhsd;
        let (tq, tk, tv) = (
            up(&q, d.q_shape(layout)),
            up(&k, d.k_shape(layout)),
            up(&v, d.v_shape(layout)),
        );
        let t_do = up(&d_o, d.o_shape(layout));
        let out = opts
            .clone()
            .return_lse(true)
            .run(&g, &tq, &tk, &tv)
            .unwrap();
        let lse = out.lse.as_ref().unwrap();
        let grads = opts
            .backward(&g, &tq, &tk, &tv, &out.o, lse, &t_do)
            .unwrap_or_else(|e| panic!("the backward in the browser: {e}"));
        let mut pairs = vec![
            ("dQ", &grads.dq, &want.dq),
            ("dK", &grads.dk, &want.dk),
            ("dV", &grads.dv, &want.dv),
        ];
        if let (Some(t), Some(w)) = (&grads.dbias, &want.dbias) {
            pairs.push(("dbias", t, w));
        }
        for (what, t, w) in pairs {
            let got = t.download_async(&g).await.unwrap();
            close(what, &got, w, 1e-5, 1e-4).unwrap();
        }
        console_log!("backward {d:?} exact under limits {:?}", g.limits());
    }
}

/// Lets the browser's event loop run for `ms` milliseconds (WebGPU's error verdicts arrive
/// through it).
async fn sleep(ms: i32) {
    let promise = js_sys::Promise::new(&mut |resolve, _| {
        let set_timeout: js_sys::Function =
            js_sys::Reflect::get(&js_sys::global(), &"setTimeout".into())
                .unwrap()
                .into();
        set_timeout
            .call2(&wasm_bindgen::JsValue::NULL, &resolve, &ms.into())
            .unwrap();
    });
    wasm_bindgen_futures::JsFuture::from(promise).await.unwrap();
}

/// A tensor over a destroyed buffer: writing it passes every check of the crate and is a
/// wgpu validation error, which WebGPU reports only after the call has returned.
fn destroyed(gpu: &Gpu) -> wgpu_attention::Tensor {
    let buffer = gpu.device().create_buffer(&wgpu::BufferDescriptor {
        label: Some("destroyed"),
        size: 16,
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    buffer.destroy();
    wgpu_attention::Tensor::from_buffer(gpu, buffer, [1, 1, 1, 4], DType::F32).unwrap()
}

/// wgpu errors in the browser arrive after their call returned: each reaches a later call
/// once, in the order of the calls; an await takes only errors of calls made before it
/// began; asking whether the device is lost takes none; a dropped await loses none.
#[wasm_bindgen_test]
async fn deferred_wgpu_errors() {
    let gpu = gpu().await;
    let (bad1, bad2) = (destroyed(&gpu), destroyed(&gpu));
    let good = gpu.upload(&[1.0, 2.0, 3.0, 4.0], [1, 1, 1, 4]).unwrap();
    // Two bad calls; the next two awaits get one error each, then none.
    bad1.write(&gpu, &[1.0; 4]).unwrap();
    bad2.write(&gpu, &[2.0; 4]).unwrap();
    sleep(50).await;
    assert!(!gpu.is_lost(), "a validation error is not a loss");
    for n in 0..2 {
        let r = gpu.wait_async().await;
        assert!(
            matches!(&r, Err(Error::Gpu(m)) if m.contains("write")),
            "error {n}: {r:?}"
        );
    }
    assert_eq!(gpu.wait_async().await, Ok(()));
    // An await that began (was first polled) before a bad call does not take its error; the
    // next one does.
    let mut earlier = Box::pin(good.download_async(&gpu));
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    assert!(earlier.as_mut().poll(&mut cx).is_pending());
    bad1.write(&gpu, &[3.0; 4]).unwrap();
    assert_eq!(earlier.await.unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
    assert!(matches!(gpu.wait_async().await, Err(Error::Gpu(_))));
    // An await dropped while it waits leaves the error for the next one.
    bad2.write(&gpu, &[4.0; 4]).unwrap();
    let mut dropped = Box::pin(gpu.wait_async());
    assert!(dropped.as_mut().poll(&mut cx).is_pending());
    drop(dropped);
    assert!(matches!(gpu.wait_async().await, Err(Error::Gpu(_))));
    assert_eq!(gpu.wait_async().await, Ok(()));
}

/// Bad input is the same typed error as on native, before anything reaches the GPU.
#[wasm_bindgen_test]
async fn bad_input_is_a_typed_error() {
    let gpu = gpu().await;
    let q = gpu.upload(&[0.5; 12], [1, 3, 1, 4]).unwrap();
    let k = gpu.upload(&[0.5; 8], [1, 2, 1, 4]).unwrap();
    let err = Attention::new().run(&gpu, &q, &k, &k).unwrap_err();
    assert!(matches!(err, Error::HeadsNotDivisible { .. }), "{err:?}");
    // The page's entry point: sizes whose products overflow or exceed what the page computes
    // are exceptions, not a trap; a bad path name too.
    for (path, heads, q_len, head_dim) in [
        ("auto", usize::MAX, 8, 16),
        ("auto", 1, 1 << 23, 64),
        ("auto", 64, 1024, 256),
        ("sideways", 1, 8, 16),
    ] {
        let r = wgpu_attention_web::run_demo(
            path.into(),
            heads,
            1,
            q_len,
            2048,
            head_dim,
            false,
            -1,
            0.0,
            1,
        )
        .await;
        assert!(r.is_err(), "{path} {heads} {q_len} {head_dim}");
    }
}

/// Key lengths around the 64-key tile (one key, a partial tile, a full one, a full one and
/// one key more), on the fused and decode kernels, both decode kernels: with a `var`
/// declared in a loop and not re-zeroed (Dawn did not), scores of one tile leaked into the
/// next and masked keys kept the last key's probability (outputs a quarter of the truth).
#[wasm_bindgen_test]
async fn partial_key_tiles() {
    let gpu = gpu().await;
    let rows = gpu
        .with_decode_kernel(wgpu_attention::DecodeKernel::RowTiles, false)
        .unwrap();
    let mut cases = Vec::new();
    for kv_len in [1, 7, 64, 65, 200] {
        cases.push((&gpu, Path::Fused, dims(1, 2, 1, 5, kv_len, 16, 16)));
        cases.push((&gpu, Path::Decode, dims(1, 2, 1, 1, kv_len, 64, 64)));
        cases.push((&rows, Path::Decode, dims(1, 4, 2, 1, kv_len, 16, 16)));
    }
    for (seed, (g, path, d)) in cases.into_iter().enumerate() {
        check(g, path, d, &Attention::new(), 900 + seed as u64, F32)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
}
