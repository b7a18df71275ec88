//! The GPU backward (`Attention::backward`) against the f64 reference backward, which the
//! unit tests of `cpu::backward` check against finite differences: dQ, dK and dV on shapes
//! that fill no tile, every masking option, GQA, both layouts, half-precision storage, the
//! dispatches split under a loop cap, long key ranges, and bad input.

#[macro_use]
mod common;

use common::*;
use wgpu_attention::gpu::{ParamsIn, TileBlock};
use wgpu_attention::{Attention, Causal, DType, Dims, Error, Gpu, Gradients, Layout, cpu};

/// Relative norm error of f32 gradients against the reference (DESIGN.md's contract), and of
/// half-precision inputs (the rounding of O and of the inputs' products).
const F32_TOL: f64 = 1e-5;
const HALF_TOL: f64 = 3e-3;

/// Runs the forward (for O and the log-sum-exp) and the backward into NaN-poisoned gradients
/// on `gpu` in storage `dtype` (dO too), and checks dQ, dK and dV against the reference on the
/// same rounded inputs: relative norm error within the contract, and every element within
/// `1e-4` of the gradient's largest element (finite: a poisoned element fails).
fn check_grads(gpu: &Gpu, d: Dims, opts: &Attention, seed: u64, dtype: DType) -> Gradients {
    check_grads_with(gpu, d, opts, seed, dtype, (None, false))
}

/// [`check_grads`], with the bias's gradient (the bias of `bias_shape`) and the sinks' asked
/// for where given, both checked against the reference too.
fn check_grads_with(
    gpu: &Gpu,
    d: Dims,
    opts: &Attention,
    seed: u64,
    dtype: DType,
    (bias_shape, sinks): (Option<[usize; 4]>, bool),
) -> Gradients {
    check_grads_after(gpu, gpu, d, opts, seed, dtype, (bias_shape, sinks))
}

/// [`check_grads_with`], the forward run on `forward` (a context of the same device: the
/// tests that vary only the backward's configuration compile the forward once).
fn check_grads_after(
    forward: &Gpu,
    gpu: &Gpu,
    d: Dims,
    opts: &Attention,
    seed: u64,
    dtype: DType,
    (bias_shape, sinks): (Option<[usize; 4]>, bool),
) -> Gradients {
    let opts = &opts
        .clone()
        .return_bias_grad(bias_shape.is_some())
        .return_sinks_grad(sinks);
    let layout = opts.get_layout();
    let mut r = rng(seed);
    let round = |x: Vec<f32>| -> Vec<f32> { x.into_iter().map(|v| dtype.round(v)).collect() };
    let q = round(random(&mut r, d.q_elems(), 1.5));
    let k = round(random(&mut r, d.k_elems(), 1.5));
    let v = round(random(&mut r, d.v_elems(), 1.0));
    let d_o = round(random(&mut r, d.o_elems(), 1.0));
    let up = |x: &[f32], shape| gpu.upload_as(x, shape, dtype).unwrap();
    let (tq, tk, tv) = (
        up(&q, d.q_shape(layout)),
        up(&k, d.k_shape(layout)),
        up(&v, d.v_shape(layout)),
    );
    let t_do = up(&d_o, d.o_shape(layout));
    let fwd = opts.clone().return_lse(true);
    let out = fwd.run(forward, &tq, &tk, &tv).unwrap();
    let grads = Gradients {
        dq: poisoned(gpu, d.q_shape(layout)),
        dk: poisoned(gpu, d.k_shape(layout)),
        dv: poisoned(gpu, d.v_shape(layout)),
        dbias: bias_shape.map(|shape| poisoned(gpu, shape)),
        dsinks: sinks.then(|| poisoned(gpu, [1, 1, 1, d.heads])),
    };
    opts.backward_into(
        gpu,
        &tq,
        &tk,
        &tv,
        &out.o,
        out.lse.as_ref().unwrap(),
        &t_do,
        &grads,
    )
    .unwrap_or_else(|e| panic!("{d:?} {opts:?}: {e}"));
    let want = cpu::reference_backward(&q, &k, &v, &d_o, d, opts).unwrap();
    let ctx = format!("{d:?} {dtype:?} seed {seed} {opts:?}");
    let row_constant_bias = bias_shape.is_some_and(|s| s[3] == 1);
    compare_grads(gpu, &grads, &want, dtype, row_constant_bias, &ctx);
    grads
}

/// Checks `grads` (and the bias's and the sinks' gradients where given) against the
/// reference's `want`: relative norm error within the contract for `dtype`'s storage, and every
/// element within 1e-4 (half storage: 3e-2) of the gradient's largest element (finite: a
/// poisoned element fails). A bias broadcast along the keys (`row_constant_bias`) has a zero
/// gradient in exact arithmetic, checked as ~0.
fn compare_grads(
    gpu: &Gpu,
    grads: &Gradients,
    want: &cpu::ReferenceGradients,
    dtype: DType,
    row_constant_bias: bool,
    ctx: &str,
) {
    let tol = if dtype == DType::F32 {
        F32_TOL
    } else {
        HALF_TOL
    };
    let mut pairs = vec![
        ("dQ", &grads.dq, &want.dq),
        ("dK", &grads.dk, &want.dk),
        ("dV", &grads.dv, &want.dv),
    ];
    if let Some(t) = &grads.dbias {
        pairs.push((
            "dbias",
            t,
            want.dbias.as_ref().expect("the options have a bias"),
        ));
    }
    if let Some(t) = &grads.dsinks {
        pairs.push((
            "dsinks",
            t,
            want.dsinks.as_ref().expect("the options have sinks"),
        ));
    }
    for (what, t, w) in pairs {
        let got = t.download(gpu).unwrap();
        if what == "dbias" && row_constant_bias {
            // A bias broadcast along the keys shifts whole rows of scores, which softmax
            // ignores: its gradient is zero in exact arithmetic, rounding noise here.
            let worst = got.iter().fold(0f32, |m, x| m.max(x.abs()));
            assert!(
                worst <= 1e-4,
                "dbias of a row-constant bias: {worst:e}, not ~0"
            );
            continue;
        }
        let ctx = format!("{what} of {ctx}");
        let ctx = &ctx[..ctx.len().min(500)];
        let err = rel_norm_error(&got, w);
        assert!(err <= tol, "{ctx}: relative norm error {err:e} > {tol:e}");
        let largest = w.iter().fold(0f32, |m, x| m.max(x.abs()));
        let atol = if dtype == DType::F32 { 1e-4 } else { 3e-2 } * largest.max(1e-3);
        assert_close(ctx, &got, w, atol, 0.0);
    }
}

#[test]
fn shapes_layouts_and_gqa() {
    let Some(gpu) = gpu() else { return };
    check_grads(
        gpu,
        dims(2, 4, 2, 37, 53, 40, 24),
        &Attention::new(),
        1,
        DType::F32,
    );
    check_grads(
        gpu,
        dims(1, 6, 1, 19, 70, 33, 65),
        &Attention::new().layout(Layout::Bshd).scale(0.3),
        2,
        DType::F32,
    );
    check_grads(
        gpu,
        dims(1, 2, 2, 5, 9, 1, 3),
        &Attention::new(),
        3,
        DType::F32,
    );
    check_grads(
        gpu,
        dims(1, 2, 1, 9, 20, 256, 130),
        &Attention::new(),
        4,
        DType::F32,
    );
}

#[test]
fn causal_window_and_lengths() {
    let Some(gpu) = gpu() else { return };
    let d = dims(2, 4, 2, 45, 30, 24, 16);
    for (n, opts) in [
        Attention::new().causal(Causal::TopLeft),
        Attention::new().causal(Causal::BottomRight),
        Attention::new().window(7, 3),
        Attention::new()
            .causal(Causal::BottomRight)
            .window(5, 0)
            .window_align(Causal::BottomRight),
        // A sequence with no keys: zero gradients for it, no NaN.
        Attention::new()
            .causal(Causal::BottomRight)
            .kv_lens(vec![0, 17])
            .q_lens(vec![45, 11]),
    ]
    .iter()
    .enumerate()
    {
        check_grads(gpu, d, opts, 10 + n as u64, DType::F32);
    }
}

#[test]
fn masks_bias_softcap_alibi_sinks() {
    let Some(gpu) = gpu() else { return };
    let d = dims(2, 4, 2, 21, 67, 32, 20);
    let mut r = rng(20);
    let mask = random_mask(&mut r, 2 * 21 * 67, 0.7);
    // Whole rows masked out too.
    let mut holes = mask.clone();
    holes[..67].iter_mut().for_each(|m| *m = false);
    for (n, opts) in [
        Attention::new().mask([2, 1, 21, 67], holes),
        Attention::new().bias([1, 4, 21, 67], random(&mut r, 4 * 21 * 67, 2.0)),
        Attention::new()
            .bias([2, 1, 1, 67], random(&mut r, 2 * 67, 2.0))
            .mask([2, 1, 21, 67], mask.clone())
            .softcap(1.5),
        Attention::new().softcap(0.8).causal(Causal::TopLeft),
        Attention::new().alibi(positive(random(&mut r, 4, 0.5))),
        Attention::new().sinks(random(&mut r, 4, 2.0)).window(4, 4),
        Attention::new()
            .sinks(random(&mut r, 4, 2.0))
            .causal(Causal::BottomRight)
            .window(6, 0)
            .sink_keys(3),
    ]
    .iter()
    .enumerate()
    {
        check_grads(gpu, d, opts, 30 + n as u64, DType::F32);
    }
}

#[test]
fn half_precision_storage() {
    let Some(gpu) = gpu() else { return };
    let d = dims(1, 4, 2, 29, 41, 36, 20);
    let opts = Attention::new().causal(Causal::BottomRight);
    check_grads(gpu, d, &opts, 40, DType::F16);
    check_grads(gpu, d, &opts, 41, DType::Bf16);
    check_grads(&gpu.with_packed_f16(), d, &opts, 42, DType::F16);
}

/// Contexts of `gpu` running each configuration of the backward's dQ, dK and dV: the row
/// kernel, and the tiled kernel with each invocation block.
fn kernel_configurations(gpu: &Gpu) -> Vec<Gpu> {
    [
        (false, TileBlock::B8X8),
        (true, TileBlock::B4X4),
        (true, TileBlock::B8X4),
        (true, TileBlock::B8X8),
    ]
    .into_iter()
    .map(|(tiled, block)| {
        gpu.with_tiled_backward(tiled)
            .with_backward_block(block)
            .unwrap()
    })
    .collect()
}

/// Every configuration of the backward's dQ, dK and dV: the row kernel, and the tiled kernel
/// with each invocation block, on a shape with full 64 x 64 tiles (the tiled kernel's path
/// without mask code) and partial ones, plain, causal with lengths, and with per-key options.
#[test]
fn every_kernel_configuration() {
    let Some(gpu) = gpu() else { return };
    let d = dims(1, 4, 2, 130, 77, 40, 24);
    let mut r = rng(45);
    let mask = random_mask(&mut r, 130 * 77, 0.8);
    let option_sets = [
        Attention::new(),
        Attention::new()
            .causal(Causal::BottomRight)
            .q_lens(vec![101])
            .kv_lens(vec![70]),
        Attention::new()
            .mask([1, 1, 130, 77], mask)
            .bias([1, 4, 1, 77], random(&mut r, 4 * 77, 1.0))
            .softcap(2.0),
    ];
    for (n, g) in kernel_configurations(gpu).iter().enumerate() {
        for (m, opts) in option_sets.iter().enumerate() {
            let seed = 46 + (3 * n + m) as u64;
            check_grads_after(gpu, g, d, opts, seed, DType::F32, (None, false));
        }
    }
}

/// Dropout: the row kernel and the tiled kernel with each block, on full 64 x 64 tiles (which
/// dropout sends through the per-key code) and partial ones; with the masking options, the
/// bias's and the sinks' gradients, and dispatches split under a loop cap; half storage. The
/// forward and the reference drop the same weights (the same options). Mutations tried: the
/// tiled kernel's dV from undropped P, and the row kernel's dP unscaled, each fail it.
#[test]
fn dropout_gradients() {
    let Some(gpu) = gpu() else { return };
    let d = dims(1, 4, 2, 130, 77, 40, 24);
    let plain = Attention::new().dropout(0.3, 7);
    for (n, g) in kernel_configurations(gpu).iter().enumerate() {
        check_grads_after(gpu, g, d, &plain, 201 + n as u64, DType::F32, (None, false));
    }
    let (d2, _) =
        beside_every_option_under_a_cap(gpu, Attention::new().dropout(0.6, u64::MAX), 210);
    check_grads(gpu, d2, &plain, 213, DType::F16);
}

/// `opts` with a causal window, lengths, a softcap, sinks and a bias (random from `seed`), on
/// both kernels under a cap of one key tile per dispatch, the bias's and the sinks' gradients
/// asked for (seeds `seed + 1`, `seed + 2`); returns the shape and the options.
fn beside_every_option_under_a_cap(gpu: &Gpu, opts: Attention, seed: u64) -> (Dims, Attention) {
    let capped = gpu.with_caps(wgpu_attention::LimitCaps {
        max_key_tiles_per_workgroup: Some(1),
        ..Default::default()
    });
    let d2 = dims(2, 4, 2, 23, 70, 20, 12);
    let mut r = rng(seed);
    let bias = [2, 1, 23, 70];
    let opts = opts
        .causal(Causal::BottomRight)
        .window(30, 2)
        .softcap(2.0)
        .sinks(random(&mut r, 4, 1.0))
        .bias(bias, random(&mut r, 2 * 23 * 70, 1.0))
        .kv_lens(vec![70, 41]);
    for (n, tiled) in [true, false].into_iter().enumerate() {
        let g = capped.with_tiled_backward(tiled);
        let seed = seed + 1 + n as u64;
        check_grads_with(&g, d2, &opts, seed, DType::F32, (Some(bias), true));
    }
    (d2, opts)
}

/// A score mod that bends the scores (derivative not 1, per head from its data), a mask mod
/// that removes a pattern crossing tiles and, for a sequence's last rows, whole rows, and a key
/// range (a band drifting with the row, whose outside tiles are skipped): the
/// row kernel and the tiled kernel with each block (full 64 x 64 tiles, which the mods send
/// through the per-key code, and partial ones); beside a causal window, lengths, a softcap, a
/// bias (and its gradient, which the mod's derivative does not touch: the bias is added after
/// it) and sinks under a loop cap; half storage. Without the derivative's WGSL, a typed error.
#[test]
fn score_mod_gradients() {
    let Some(gpu) = gpu() else { return };
    let mods = |heads: usize| {
        let f: Vec<f32> = (0..heads).map(|h| 0.7 + 0.2 * h as f32).collect();
        let g = f.clone();
        wgpu_attention::ScoreMod::new()
            .mask_wgsl("return (i + 2u * j) % 7u != 3u && i + 4u < attn_q_len(b);")
            .mask_cpu(|_, _, i, j| (i + 2 * j) % 7 != 3 && i + 4 < 101)
            .score_wgsl("return attn_data_f32(h) * s + 0.4 * sin(s);")
            .score_cpu(move |s, _, h, _, _| f[h] as f64 * s + 0.4 * s.sin())
            .grad_wgsl("return attn_data_f32(h) + 0.4 * cos(s);")
            .grad_cpu(move |s, _, h, _, _| g[h] as f64 + 0.4 * s.cos())
            // A band drifting with the row: some tile pairs lie outside every row's range
            // (skipped), some partly.
            .range_wgsl("return vec2<u32>(i / 2u, i / 2u + 70u);")
            .range_cpu(|_, i| (i / 2, i / 2 + 70))
            .data_f32(&(0..heads).map(|h| 0.7 + 0.2 * h as f32).collect::<Vec<_>>())
    };
    let d = dims(1, 4, 2, 130, 77, 40, 24);
    let plain = Attention::new().score_mod(mods(4)).q_lens(vec![101]);
    for (n, g) in kernel_configurations(gpu).iter().enumerate() {
        check_grads_after(gpu, g, d, &plain, 401 + n as u64, DType::F32, (None, false));
    }
    let m = mods(4)
        .mask_wgsl("return (i + 2u * j) % 7u != 3u;")
        .mask_cpu(|_, _, i, j| (i + 2 * j) % 7 != 3);
    let (d2, opts) = beside_every_option_under_a_cap(gpu, Attention::new().score_mod(m), 410);
    check_grads(gpu, d2, &opts, 413, DType::F16);
    // A ready-made key range (packed documents; entry 1's rows past its one document are
    // empty): nothing to differentiate, only keys to remove and tiles to skip.
    let docs = wgpu_attention::ScoreMod::documents(&[vec![30, 1, 39], vec![50]]).unwrap();
    let opts = Attention::new().causal(Causal::BottomRight).score_mod(docs);
    check_grads(gpu, dims(2, 2, 1, 70, 70, 16, 16), &opts, 414, DType::F32);
    let e = check_backward_error(
        gpu,
        Attention::new().score_mod(
            wgpu_attention::ScoreMod::new()
                .score_wgsl("return 2.0 * s;")
                .score_cpu(|s, _, _, _, _| 2.0 * s),
        ),
    );
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
}

/// Under a cap of one key tile per dispatch the keys (dQ) and query rows (dK, dV) are split
/// over dispatches of 64 that add up; the sums match the single-dispatch ones.
#[test]
fn dispatches_split_under_a_loop_cap() {
    let Some(gpu) = gpu() else { return };
    let capped = gpu.with_caps(wgpu_attention::LimitCaps {
        max_key_tiles_per_workgroup: Some(1),
        ..Default::default()
    });
    let d = dims(1, 4, 2, 150, 300, 24, 16);
    let opts = Attention::new().causal(Causal::BottomRight).window(100, 0);
    check_grads(&capped, d, &opts, 50, DType::F32);
    check_grads(&capped, d, &Attention::new().softcap(2.0), 51, DType::F32);
}

/// A long key range (8192 keys), and the same call twice gives the same bits.
#[test]
fn long_key_range_and_determinism() {
    let Some(gpu) = gpu() else { return };
    let d = dims(1, 2, 1, 12, 8192, 32, 32);
    let opts = Attention::new();
    let a = check_grads(gpu, d, &opts, 60, DType::F32);
    let b = check_grads(gpu, d, &opts, 60, DType::F32);
    for (x, y) in [(&a.dq, &b.dq), (&a.dk, &b.dk), (&a.dv, &b.dv)] {
        assert_eq!(x.download(gpu).unwrap(), y.download(gpu).unwrap());
    }
}

#[test]
fn bad_input_is_a_typed_error() {
    let Some(gpu) = gpu() else { return };
    // q_len = kv_len, so that one buffer fits dQ and dK.
    let d = dims(1, 2, 2, 6, 6, 8, 8);
    let shape = |n: [usize; 4]| gpu.upload(&vec![0.5; n.iter().product()], n).unwrap();
    let (q, k, v) = (
        shape(d.q_shape(Layout::Bhsd)),
        shape(d.k_shape(Layout::Bhsd)),
        shape(d.v_shape(Layout::Bhsd)),
    );
    let opts = Attention::new().return_lse(true);
    let out = opts.run(gpu, &q, &k, &v).unwrap();
    let lse = out.lse.as_ref().unwrap();
    let d_o = shape(d.o_shape(Layout::Bhsd));
    let bad_do = shape([1, 2, 4, 8]);
    let e = opts
        .backward(gpu, &q, &k, &v, &out.o, lse, &bad_do)
        .unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
    let bad_lse = shape([1, 2, 4, 1]);
    let e = opts
        .backward(gpu, &q, &k, &v, &out.o, &bad_lse, &d_o)
        .unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
    let half_lse = gpu.upload_as(&[0.0; 12], [1, 2, 6, 1], DType::F16).unwrap();
    let e = opts
        .backward(gpu, &q, &k, &v, &out.o, &half_lse, &d_o)
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidOption {
                what: "log-sum-exp",
                ..
            }
        ),
        "{e}"
    );
    // Additive scores, and a V scale (its gradient would be by V as stored).
    for opts in [
        Attention::new().additive(vec![0.1; 8]),
        Attention::new().kv_scales(2.0, 0.5),
    ] {
        let e = opts
            .backward(gpu, &q, &k, &v, &out.o, lse, &d_o)
            .unwrap_err();
        assert!(
            matches!(
                e,
                Error::InvalidOption {
                    what: "backward",
                    ..
                }
            ),
            "{e}"
        );
    }
    // Gradients that share a buffer, or are not f32.
    let dq = gpu.empty(d.q_shape(Layout::Bhsd)).unwrap();
    let shared = Gradients {
        dq: dq.clone(),
        dk: dq.clone(),
        dv: gpu.empty(d.v_shape(Layout::Bhsd)).unwrap(),
        dbias: None,
        dsinks: None,
    };
    let e = opts
        .backward_into(gpu, &q, &k, &v, &out.o, lse, &d_o, &shared)
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidOption {
                what: "gradient",
                ..
            }
        ),
        "{e}"
    );
    let half = Gradients {
        dq: gpu.empty_as(d.q_shape(Layout::Bhsd), DType::F16).unwrap(),
        ..shared
    };
    let e = opts
        .backward_into(gpu, &q, &k, &v, &out.o, lse, &d_o, &half)
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidOption {
                what: "gradient",
                ..
            }
        ),
        "{e}"
    );
    // A device with too few storage buffers for the kernels (eight, as a browser's, are
    // enough where the parameter blocks are uniforms: webgpu_storage_buffer_limit).
    let few = gpu.with_caps(wgpu_attention::LimitCaps {
        max_storage_buffers_per_stage: Some(7),
        ..Default::default()
    });
    let e = opts
        .backward(&few, &q, &k, &v, &out.o, lse, &d_o)
        .unwrap_err();
    assert!(matches!(e, Error::Unsupported { .. }), "{e}");
}

/// A browser's limits: eight storage buffers per stage, and the parameter blocks uniforms.
/// The backward fits them (the bias and the mask packed into the lengths' buffer, the
/// log-sum-exp copied beside D) and is exact, with every masking buffer in use.
#[test]
fn webgpu_storage_buffer_limit() {
    let Some(gpu) = gpu() else { return };
    let browser_like =
        gpu.with_params_in(ParamsIn::Uniform)
            .unwrap()
            .with_caps(wgpu_attention::LimitCaps {
                max_storage_buffers_per_stage: Some(8),
                ..Default::default()
            });
    let d = dims(2, 4, 2, 70, 45, 24, 16);
    let mut r = rng(80);
    let opts = Attention::new()
        .mask([2, 1, 70, 45], random_mask(&mut r, 2 * 70 * 45, 0.8))
        .bias([1, 4, 70, 45], random(&mut r, 4 * 70 * 45, 1.0))
        .causal(Causal::BottomRight)
        .kv_lens(vec![45, 30])
        .alibi(positive(random(&mut r, 4, 0.3)));
    check_grads(&browser_like, d, &opts, 81, DType::F32);
    check_grads_with(
        &browser_like,
        d,
        &opts,
        82,
        DType::F32,
        (Some([1, 4, 70, 45]), false),
    );
}

/// Device-resident masks, biases and lengths (copied into the backward's one options buffer)
/// give the host forms' gradients bit for bit, and those match the reference; a device buffer
/// the copy cannot read (no `COPY_SRC`) is a typed error.
#[test]
fn device_options_match_host_options() {
    let Some(gpu) = gpu() else { return };
    let d = dims(2, 2, 1, 20, 70, 16, 16);
    let mut r = rng(90);
    let mask = random_mask(&mut r, 20 * 70, 0.7);
    let bias = random(&mut r, 2 * 2 * 20 * 70, 1.0);
    let [xq, xk, xv, xo] = [
        (91, d.q_elems()),
        (92, d.k_elems()),
        (93, d.v_elems()),
        (94, d.o_elems()),
    ]
    .map(|(seed, n)| random(&mut rng(seed), n, 1.0));
    let up = |x: &[f32], dims| gpu.upload(x, dims).unwrap();
    let (q, k, v) = (
        up(&xq, d.q_shape(Layout::Bhsd)),
        up(&xk, d.k_shape(Layout::Bhsd)),
        up(&xv, d.v_shape(Layout::Bhsd)),
    );
    let d_o = up(&xo, d.o_shape(Layout::Bhsd));
    let host = Attention::new()
        .mask([1, 1, 20, 70], mask.clone())
        .bias([2, 2, 20, 70], bias.clone())
        .kv_lens(vec![70, 41])
        .q_lens(vec![20, 13])
        .return_bias_grad(true);
    let dmask = gpu.upload_mask([1, 1, 20, 70], &mask).unwrap();
    let dbias = gpu.upload(&bias, [2, 2, 20, 70]).unwrap();
    let dlens = gpu.upload_lens(Some(&[70, 41]), Some(&[20, 13])).unwrap();
    let device = Attention::new()
        .mask_tensor(&dmask)
        .bias_tensor(&dbias)
        .lens_tensor(&dlens)
        .return_bias_grad(true);
    let out = host.clone().return_lse(true).run(gpu, &q, &k, &v).unwrap();
    let lse = out.lse.as_ref().unwrap();
    let a = host.backward(gpu, &q, &k, &v, &out.o, lse, &d_o).unwrap();
    let b = device.backward(gpu, &q, &k, &v, &out.o, lse, &d_o).unwrap();
    let want = cpu::reference_backward(&xq, &xk, &xv, &xo, d, &host).unwrap();
    let pairs = [
        (&a.dq, &b.dq, &want.dq),
        (&a.dk, &b.dk, &want.dk),
        (&a.dv, &b.dv, &want.dv),
        (
            a.dbias.as_ref().unwrap(),
            b.dbias.as_ref().unwrap(),
            want.dbias.as_ref().unwrap(),
        ),
    ];
    for (x, y, w) in pairs {
        let (x, y) = (x.download(gpu).unwrap(), y.download(gpu).unwrap());
        let err = rel_norm_error(&x, w);
        assert!(
            err <= F32_TOL,
            "host options against the reference: {err:e}"
        );
        assert_eq!(x, y);
    }
    let storage_only = gpu.device().create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: (20 * 70usize).div_ceil(4) as u64 * 4,
        usage: wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    });
    let unreadable =
        wgpu_attention::DeviceMask::from_buffer(gpu, storage_only, [1, 1, 20, 70]).unwrap();
    let e = Attention::new()
        .mask_tensor(&unreadable)
        .backward(gpu, &q, &k, &v, &out.o, lse, &d_o)
        .unwrap_err();
    assert!(matches!(e, Error::InvalidOption { .. }), "{e}");
}

/// A log-sum-exp whose buffer cannot be copied (the backward copies it beside D), and
/// statistics (three f32 per query row) over the binding limit, are typed errors.
#[test]
fn statistics_buffer_errors() {
    let Some(gpu) = gpu() else { return };
    let x = gpu
        .upload(&random(&mut rng(70), 2 * 6 * 8, 1.0), [1, 2, 6, 8])
        .unwrap();
    let out = Attention::new()
        .return_lse(true)
        .run(gpu, &x, &x, &x)
        .unwrap();
    let lse_host: Vec<f32> = out.lse.as_ref().unwrap().download(gpu).unwrap();
    let buffer = gpu.device().create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: 12 * 4,
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    gpu.queue()
        .write_buffer(&buffer, 0, bytemuck::cast_slice(&lse_host));
    let lse = wgpu_attention::Tensor::from_buffer(gpu, buffer, [1, 2, 6, 1], DType::F32).unwrap();
    let e = Attention::new()
        .backward(gpu, &x, &x, &x, &out.o, &lse, &x)
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidOption {
                what: "log-sum-exp",
                ..
            }
        ),
        "{e}"
    );
    // head_dim 2: Q and dO take 8 bytes per row, the log-sum-exp 4, the statistics 12.
    let q = gpu
        .upload(&random(&mut rng(71), 2000, 1.0), [1, 1, 1000, 2])
        .unwrap();
    let kv = gpu
        .upload(&random(&mut rng(72), 20, 1.0), [1, 1, 10, 2])
        .unwrap();
    let out = Attention::new()
        .return_lse(true)
        .run(gpu, &q, &kv, &kv)
        .unwrap();
    let capped = gpu.with_caps(wgpu_attention::LimitCaps {
        max_storage_binding: Some(8192),
        ..Default::default()
    });
    let e = Attention::new()
        .backward(&capped, &q, &kv, &kv, &out.o, out.lse.as_ref().unwrap(), &q)
        .unwrap_err();
    assert!(matches!(e, Error::TooLarge { .. }), "{e}");
}

/// Rows past `q_lens` may hold anything in Q and dO (NaN here): every gradient, the sinks'
/// (which sums over all rows) too, matches the reference on zeroed padding, on both kernels.
#[test]
fn nan_in_padding_rows() {
    let Some(gpu) = gpu() else { return };
    let d = dims(2, 2, 1, 70, 9, 8, 8);
    let (q_lens, kv_lens) = ([70u32, 4], [9u32, 6]);
    let opts = Attention::new()
        .sinks(vec![0.5, -1.0])
        .q_lens(q_lens.to_vec())
        .kv_lens(kv_lens.to_vec())
        .return_sinks_grad(true);
    let layout = Layout::Bhsd;
    let mut r = rng(75);
    let mut q = random(&mut r, d.q_elems(), 1.5);
    let mut k = random(&mut r, d.k_elems(), 1.5);
    let mut v = random(&mut r, d.v_elems(), 1.0);
    let mut d_o = random(&mut r, d.o_elems(), 1.0);
    // Rows past each sequence's length, [batch][head][row][width] (Bhsd).
    let pad = |x: &mut [f32], heads: usize, len: usize, width: usize, lens: &[u32], y: f32| {
        for (b, &n) in lens.iter().enumerate() {
            for h in 0..heads {
                for i in n as usize..len {
                    let at = ((b * heads + h) * len + i) * width;
                    x[at..at + width].fill(y);
                }
            }
        }
    };
    pad(&mut q, 2, 70, 8, &q_lens, 0.0);
    pad(&mut d_o, 2, 70, 8, &q_lens, 0.0);
    pad(&mut k, 1, 9, 8, &kv_lens, 0.0);
    pad(&mut v, 1, 9, 8, &kv_lens, 0.0);
    let want = cpu::reference_backward(&q, &k, &v, &d_o, d, &opts).unwrap();
    pad(&mut q, 2, 70, 8, &q_lens, f32::NAN);
    pad(&mut d_o, 2, 70, 8, &q_lens, f32::NAN);
    pad(&mut k, 1, 9, 8, &kv_lens, f32::NAN);
    pad(&mut v, 1, 9, 8, &kv_lens, f32::NAN);
    for tiled in [true, false] {
        let g = gpu.with_tiled_backward(tiled);
        let up = |x: &[f32], shape| g.upload(x, shape).unwrap();
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
            .unwrap();
        let dsinks = grads.dsinks.as_ref().unwrap();
        for (what, t, w) in [
            ("dQ", &grads.dq, &want.dq),
            ("dK", &grads.dk, &want.dk),
            ("dV", &grads.dv, &want.dv),
            ("dsinks", dsinks, want.dsinks.as_ref().unwrap()),
        ] {
            let got = t.download(&g).unwrap();
            // Padding rows of dQ are the reference's zeros: NaN there fails.
            let err = rel_norm_error(&got, w);
            assert!(err <= F32_TOL, "{what} (tiled {tiled}): {err:e}");
            assert_close(what, &got, w, 1e-5, 0.0);
        }
    }
}

/// O(N) memory: at L = S = 4096 under a 1 MiB cap on every storage binding, where one
/// `L x S` f32 buffer would take 64 MiB, the backward runs (and is exact).
#[test]
fn no_quadratic_buffer() {
    let Some(gpu) = gpu() else { return };
    let small = gpu.with_caps(wgpu_attention::LimitCaps {
        max_storage_binding: Some(1 << 20),
        ..Default::default()
    });
    let d = dims(1, 1, 1, 4096, 4096, 16, 16);
    check_grads(
        &small,
        d,
        &Attention::new().causal(Causal::TopLeft),
        70,
        DType::F32,
    );
}

/// The bias's gradient in every broadcast shape (summed over the broadcast dimensions), with
/// masks, a softcap and causal masking, and the sinks' gradient; under a loop cap too.
#[test]
fn bias_and_sink_gradients() {
    let Some(gpu) = gpu() else { return };
    let capped = gpu.with_caps(wgpu_attention::LimitCaps {
        max_key_tiles_per_workgroup: Some(1),
        ..Default::default()
    });
    let d = dims(2, 4, 2, 23, 70, 20, 12);
    let mut r = rng(80);
    let mask = random_mask(&mut r, 2 * 23 * 70, 0.8);
    for (n, shape) in [
        [2, 4, 23, 70],
        [1, 4, 1, 70],
        [2, 1, 23, 70],
        [1, 1, 23, 70],
        [2, 1, 23, 1],
        [1, 1, 1, 1],
    ]
    .into_iter()
    .enumerate()
    {
        let bias = random(&mut r, shape.iter().product(), 1.5);
        let opts = Attention::new().bias(shape, bias);
        check_grads_with(
            gpu,
            d,
            &opts,
            81 + n as u64,
            DType::F32,
            (Some(shape), false),
        );
        let masked = opts
            .mask([2, 1, 23, 70], mask.clone())
            .softcap(2.0)
            .causal(Causal::BottomRight);
        check_grads_with(
            &capped,
            d,
            &masked,
            90 + n as u64,
            DType::F32,
            (Some(shape), false),
        );
    }
    let sinks = Attention::new().sinks(random(&mut r, 4, 1.5)).window(9, 2);
    check_grads_with(gpu, d, &sinks, 100, DType::F32, (None, true));
    let both = sinks
        .bias([1, 4, 1, 70], random(&mut r, 4 * 70, 1.0))
        .kv_lens(vec![70, 0]);
    check_grads_with(
        &capped,
        d,
        &both,
        101,
        DType::F32,
        (Some([1, 4, 1, 70]), true),
    );
    // Asked for without a bias or sinks: typed errors.
    let e = check_backward_error(gpu, Attention::new().return_bias_grad(true));
    assert!(
        matches!(
            e,
            Error::InvalidOption {
                what: "backward",
                ..
            }
        ),
        "{e}"
    );
    let e = check_backward_error(gpu, Attention::new().return_sinks_grad(true));
    assert!(
        matches!(
            e,
            Error::InvalidOption {
                what: "backward",
                ..
            }
        ),
        "{e}"
    );
}

/// The error of a backward with `opts` on a small problem.
fn check_backward_error(gpu: &Gpu, opts: Attention) -> Error {
    let x = gpu.upload(&[0.5; 2 * 3 * 4], [1, 2, 3, 4]).unwrap();
    let out = Attention::new()
        .return_lse(true)
        .run(gpu, &x, &x, &x)
        .unwrap();
    opts.backward(gpu, &x, &x, &x, &out.o, out.lse.as_ref().unwrap(), &x)
        .unwrap_err()
}

/// A GQA group of 768 heads at head_dim 128: the dK/dV phase splits the group's (head, row)
/// pairs over dispatches, so no invocation passes llvmpipe's loop cap (before, one row of the
/// whole group was over it and dK, dV stayed unwritten).
#[test]
fn large_gqa_group_under_the_loop_cap() {
    let Some(gpu) = gpu() else { return };
    let d = dims(1, 768, 1, 1, 2, 128, 128);
    check_grads(gpu, d, &Attention::new(), 110, DType::F32);
}

/// A row whose every score is clipped to the floor (a bias of f32::MIN, PyTorch's fill for a
/// padded row): its f32 log-sum-exp is the floor itself, and P must still be 1/n, not 1.
#[test]
fn rows_clipped_to_the_score_floor() {
    let Some(gpu) = gpu() else { return };
    let d = dims(1, 2, 1, 3, 5, 8, 8);
    let mut r = rng(120);
    let mut bias = random(&mut r, 2 * 3 * 5, 1.0);
    bias[..5].fill(f32::MIN); // head 0, row 0: every key
    bias[17] = f32::MIN; // head 1, row 0, key 2
    let opts = Attention::new().bias([1, 2, 3, 5], bias);
    check_grads_with(gpu, d, &opts, 121, DType::F32, (Some([1, 2, 3, 5]), false));
    let masked = opts.clone().mask(
        [1, 1, 3, 5],
        vec![
            true, false, true, true, true, true, true, true, true, true, true, true, true, true,
            true,
        ],
    );
    check_grads_with(
        gpu,
        d,
        &masked,
        122,
        DType::F32,
        (Some([1, 2, 3, 5]), false),
    );
    // Every row clipped whole, with ranges that differ per row (a window and sink keys): the
    // count of each row's keys in closed form.
    let d = dims(1, 2, 1, 6, 9, 8, 8);
    let all_min = Attention::new()
        .bias([1, 1, 1, 9], vec![f32::MIN; 9])
        .causal(Causal::BottomRight)
        .window(2, 0)
        .sink_keys(2);
    check_grads(gpu, d, &all_min, 123, DType::F32);
}

/// A device-resident bias passed as its own gradient is the crate's typed aliasing error.
#[test]
fn device_bias_as_its_own_gradient() {
    let Some(gpu) = gpu() else { return };
    let d = dims(1, 2, 2, 4, 4, 8, 8);
    let x = gpu.upload(&vec![0.5; 2 * 4 * 8], [1, 2, 4, 8]).unwrap();
    let bias = gpu.upload(&[0.1; 2 * 4 * 4], [1, 2, 4, 4]).unwrap();
    let opts = Attention::new().bias_tensor(&bias).return_bias_grad(true);
    let out = opts.clone().return_lse(true).run(gpu, &x, &x, &x).unwrap();
    let grads = Gradients {
        dq: gpu.empty(d.q_shape(Layout::Bhsd)).unwrap(),
        dk: gpu.empty(d.k_shape(Layout::Bhsd)).unwrap(),
        dv: gpu.empty(d.v_shape(Layout::Bhsd)).unwrap(),
        dbias: Some(bias.clone()),
        dsinks: None,
    };
    let e = opts
        .backward_into(
            gpu,
            &x,
            &x,
            &x,
            &out.o,
            out.lse.as_ref().unwrap(),
            &x,
            &grads,
        )
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidOption {
                what: "gradient",
                ..
            }
        ),
        "{e}"
    );
}

/// Packed variable-length batches (FlashAttention's varlen): every sequence's rows in one
/// tensor, against the reference (which pads them), with NaN-poisoned gradients, so that a row
/// written outside its own sequence (over a neighbour's gradient) or left unwritten fails:
/// both layouts, the tiled and the row kernels, one key tile per dispatch (the loop cap's
/// split), GQA, both causal alignments per sequence, a window, a softcap, sequences with no
/// query rows or no keys (first, middle, last), several tiles in a sequence, f16 storage, and
/// on the row kernel the bias's and the sinks' gradients.
#[test]
fn packed_variable_length_batches() {
    use wgpu_attention::LimitCaps;
    let Some(base) = gpu() else { return };
    let capped = |g: &Gpu| {
        g.with_caps(LimitCaps {
            max_key_tiles_per_workgroup: Some(1),
            ..Default::default()
        })
    };
    // (layout, tiled, capped, storage, causal, query offsets, key offsets)
    #[rustfmt::skip]
    let cases = [
        // Query rows 70, 0, 5; keys 90, 11, 130.
        (Layout::Bshd, false, false, DType::F32, Causal::BottomRight, vec![0u32, 70, 70, 75], vec![0u32, 90, 101, 231]),
        (Layout::Bhsd, true, false, DType::F32, Causal::BottomRight, vec![0, 70, 70, 75], vec![0, 90, 101, 231]),
        (Layout::Bshd, true, true, DType::F32, Causal::BottomRight, vec![0, 70, 70, 75], vec![0, 90, 101, 231]),
        // Query rows 3, 7, 0, 66; keys 0, 12, 5, 70.
        (Layout::Bhsd, true, true, DType::F16, Causal::TopLeft, vec![0, 3, 10, 10, 76], vec![0, 0, 12, 17, 87]),
        (Layout::Bshd, false, true, DType::F32, Causal::TopLeft, vec![0, 3, 10, 10, 76], vec![0, 0, 12, 17, 87]),
    ];
    for (n, (layout, tiled, cap, dtype, causal, cq, ck)) in cases.into_iter().enumerate() {
        let g = base.with_tiled_backward(tiled);
        let g = if cap { capped(&g) } else { g };
        let lens = |cu: &[u32]| cu.windows(2).map(|w| (w[1] - w[0]) as usize).max().unwrap();
        let (batch, total_q, total_k) = (
            cq.len() - 1,
            cq[cq.len() - 1] as usize,
            ck[ck.len() - 1] as usize,
        );
        let d = dims(batch, 4, 2, lens(&cq), lens(&ck), 40, 24);
        let mut r = rng(9100 + n as u64);
        let mut opts = Attention::new()
            .layout(layout)
            .causal(causal)
            .window(50, 0)
            .softcap(8.0)
            .varlen(cq.clone(), ck.clone());
        let extra = n == 0;
        if extra {
            opts = opts
                .bias([1, 4, 1, d.kv_len], random(&mut r, 4 * d.kv_len, 1.0))
                .sinks(vec![0.3, -0.4, 1.1, 0.0])
                .return_bias_grad(true)
                .return_sinks_grad(true);
        }
        let round = |x: Vec<f32>| -> Vec<f32> { x.into_iter().map(|v| dtype.round(v)).collect() };
        let q = round(random(&mut r, total_q * 4 * 40, 1.5));
        let k = round(random(&mut r, total_k * 2 * 40, 1.5));
        let v = round(random(&mut r, total_k * 2 * 24, 1.0));
        let d_o = round(random(&mut r, total_q * 4 * 24, 1.0));
        let shape = |heads, rows, width| layout.dims(1, heads, rows, width);
        let up = |x: &[f32], shape| g.upload_as(x, shape, dtype).unwrap();
        let (tq, tk, tv) = (
            up(&q, shape(4, total_q, 40)),
            up(&k, shape(2, total_k, 40)),
            up(&v, shape(2, total_k, 24)),
        );
        let t_do = up(&d_o, shape(4, total_q, 24));
        let out = opts
            .clone()
            .return_lse(true)
            .run(&g, &tq, &tk, &tv)
            .unwrap();
        let grads = Gradients {
            dq: poisoned(&g, tq.dims()),
            dk: poisoned(&g, tk.dims()),
            dv: poisoned(&g, tv.dims()),
            dbias: extra.then(|| poisoned(&g, [1, 4, 1, d.kv_len])),
            dsinks: extra.then(|| poisoned(&g, [1, 1, 1, 4])),
        };
        let lse = out.lse.as_ref().unwrap();
        opts.backward_into(&g, &tq, &tk, &tv, &out.o, lse, &t_do, &grads)
            .unwrap_or_else(|e| panic!("case {n}: {e}"));
        let want = cpu::reference_backward(&q, &k, &v, &d_o, d, &opts).unwrap();
        let ctx = format!("case {n} ({layout:?}, tiled {tiled}, capped {cap}, {dtype:?})");
        compare_grads(&g, &grads, &want, dtype, false, &ctx);
    }
}
