//! The projections' GEMM against a CPU product, and the multi-head layer against its CPU
//! version on the reference path.

mod common;

use common::{assert_close, gpu, random, random_mask, rel_norm_error, rng};
use wgpu_attention::cpu::mha_reference;
use wgpu_attention::gpu::{MatView, MatmulShape, matmul};
use wgpu_attention::{
    Attention, Causal, DType, Error, MhaConfig, MhaWeights, MultiHeadAttention, TileBlock,
};

/// C = alpha A B^T + bias on odd sizes, batched, contiguous and strided, f32 and half inputs,
/// with every invocation block of the tile product (4 x 4, 8 x 4, 8 x 8).
#[test]
fn gemm_against_cpu_product() {
    let Some(base) = gpu() else { return };
    let mut r = rng(3000);
    let contexts: Vec<_> = TileBlock::ALL
        .into_iter()
        .map(|block| {
            let g = base.with_blocks(base.tile_config().fused_block, block);
            (block, g.unwrap())
        })
        .collect();
    for (block, gpu) in &contexts {
        for (n_case, &(batches, m, n, k)) in [
            (1, 1, 1, 1),
            (1, 7, 33, 5),
            (2, 65, 130, 17),
            (3, 100, 3, 257),
            (1, 129, 64, 64),
        ]
        .iter()
        .enumerate()
        {
            for dtype in [DType::F32, DType::Bf16] {
                let a: Vec<f32> = random(&mut r, batches * m * k, 1.0)
                    .into_iter()
                    .map(|x| dtype.round(x))
                    .collect();
                let b: Vec<f32> = random(&mut r, batches * n * k, 1.0)
                    .into_iter()
                    .map(|x| dtype.round(x))
                    .collect();
                let bias = random(&mut r, n, 1.0);
                let alpha = 0.5 + n_case as f32;
                let ta = gpu.upload_as(&a, [1, batches, m, k], dtype).unwrap();
                let tb = gpu.upload_as(&b, [1, batches, n, k], dtype).unwrap();
                let tc = common::poisoned(gpu, [1, batches, m, n]);
                let tbias = gpu.upload(&bias, [1, 1, 1, n]).unwrap();
                let shape = MatmulShape {
                    m,
                    n,
                    k,
                    batches,
                    alpha,
                };
                matmul(
                    gpu,
                    shape,
                    MatView::contiguous(&ta, m, k),
                    MatView::contiguous(&tb, n, k),
                    MatView::contiguous(&tc, m, n),
                    Some(&tbias),
                )
                .unwrap();
                let mut want = vec![0f32; batches * m * n];
                for z in 0..batches {
                    for i in 0..m {
                        for j in 0..n {
                            let dot: f64 = (0..k)
                                .map(|x| {
                                    a[(z * m + i) * k + x] as f64 * b[(z * n + j) * k + x] as f64
                                })
                                .sum();
                            want[(z * m + i) * n + j] =
                                (alpha as f64 * dot + bias[j] as f64) as f32;
                        }
                    }
                }
                let got = tc.download(gpu).unwrap();
                assert_close(
                    &format!("C {batches}x{m}x{n}x{k} {dtype:?}, block {block:?}"),
                    &got,
                    &want,
                    1e-5,
                    1e-4,
                );
            }
        }
    }
    let gpu = base;
    // A transposed view: C = A^T-as-rows, i.e. A read with swapped strides.
    let (m, n, k) = (9, 5, 13);
    let a = random(&mut r, k * m, 1.0); // stored [k, m]
    let b = random(&mut r, n * k, 1.0);
    let ta = gpu.upload(&a, [1, 1, k, m]).unwrap();
    let tb = gpu.upload(&b, [1, 1, n, k]).unwrap();
    let tc = common::poisoned(gpu, [1, 1, m, n]);
    let shape = MatmulShape {
        m,
        n,
        k,
        batches: 1,
        alpha: 1.0,
    };
    matmul(
        gpu,
        shape,
        MatView {
            tensor: &ta,
            strides: [0, 1, m],
        },
        MatView::contiguous(&tb, n, k),
        MatView::contiguous(&tc, m, n),
        None,
    )
    .unwrap();
    let want: Vec<f32> = (0..m * n)
        .map(|e| {
            (0..k)
                .map(|x| a[x * m + e / n] as f64 * b[(e % n) * k + x] as f64)
                .sum::<f64>() as f32
        })
        .collect();
    assert_close(
        "C from a strided A",
        &tc.download(gpu).unwrap(),
        &want,
        1e-5,
        1e-4,
    );
    // A view past the end of its tensor is a typed error.
    let err = matmul(
        gpu,
        MatmulShape { m: m + 1, ..shape },
        MatView {
            tensor: &ta,
            strides: [0, 1, m],
        },
        MatView::contiguous(&tb, n, k),
        MatView::contiguous(&tc, m, n),
        None,
    );
    assert!(matches!(err, Err(Error::BufferTooSmall { .. })), "{err:?}");
}

fn weights(r: &mut rand::rngs::StdRng, c: &MhaConfig, with_bias: bool) -> MhaWeights {
    let (e, kv) = (c.embed_dim, c.kv_width());
    let s = |r: &mut rand::rngs::StdRng, n: usize, fan_in: usize| {
        random(r, n, 1.0 / (fan_in as f32).sqrt())
    };
    let bias = |r: &mut rand::rngs::StdRng, n: usize| with_bias.then(|| random(r, n, 0.1));
    MhaWeights {
        q_weight: s(r, e * e, e),
        k_weight: s(r, kv * c.kdim, c.kdim),
        v_weight: s(r, kv * c.vdim, c.vdim),
        out_weight: s(r, e * e, e),
        q_bias: bias(r, e),
        k_bias: bias(r, kv),
        v_bias: bias(r, kv),
        out_bias: bias(r, e),
    }
}

fn run_layer(
    config: MhaConfig,
    batch: usize,
    q_len: usize,
    kv_len: usize,
    opts: Attention,
    need_weights: bool,
    seed: u64,
) {
    let Some(gpu) = gpu() else { return };
    let mut r = rng(seed);
    let w = weights(&mut r, &config, seed.is_multiple_of(2));
    let query = random(&mut r, batch * q_len * config.embed_dim, 1.0);
    let key = random(&mut r, batch * kv_len * config.kdim, 1.0);
    let value = random(&mut r, batch * kv_len * config.vdim, 1.0);
    let layer = MultiHeadAttention::new(gpu, config, &w).unwrap();
    let (want, want_w) = mha_reference(
        &config,
        &w,
        &query,
        &key,
        &value,
        (batch, q_len, kv_len),
        &opts,
        need_weights,
    )
    .unwrap();
    // PyTorch's [B, L, E] inputs, and the [B, L, 1, E] form.
    for rank in [3, 4] {
        let up = |x: &[f32], s: usize, width: usize| {
            if rank == 3 {
                gpu.upload(x, [batch, s, width]).unwrap()
            } else {
                gpu.upload(x, [batch, s, 1, width]).unwrap()
            }
        };
        let got = layer
            .forward(
                gpu,
                &up(&query, q_len, config.embed_dim),
                &up(&key, kv_len, config.kdim),
                &up(&value, kv_len, config.vdim),
                &opts.clone().return_weights(need_weights),
            )
            .unwrap();
        let e = config.embed_dim;
        let want_shape: &[usize] = if rank == 3 {
            &[batch, q_len, e]
        } else {
            &[batch, q_len, 1, e]
        };
        assert_eq!(
            got.out.shape(),
            want_shape,
            "the output has the query's form"
        );
        let out = got.out.download(gpu).unwrap();
        let ctx = format!(
            "{config:?} B={batch} L={q_len} S={kv_len} need_weights={need_weights} rank {rank}"
        );
        assert_close(&format!("out of {ctx}"), &out, &want, 2e-5, 1e-4);
        let err = rel_norm_error(&out, &want);
        assert!(err <= 1e-5, "{ctx}: relative norm error {err:e}");
        assert_eq!(got.weights.is_some(), need_weights);
        if let (Some(gw), Some(ww)) = (got.weights, want_w.as_ref()) {
            assert_close(
                &format!("averaged weights of {ctx}"),
                &gw.download(gpu).unwrap(),
                ww,
                1e-6,
                1e-4,
            );
        }
    }
}

#[test]
fn self_attention_layer() {
    run_layer(
        MhaConfig::new(64, 4),
        2,
        33,
        33,
        Attention::new(),
        false,
        3100,
    );
    run_layer(
        MhaConfig::new(40, 5),
        1,
        7,
        7,
        Attention::new().causal(Causal::TopLeft),
        true,
        3101,
    );
}

#[test]
fn grouped_query_layer() {
    let config = MhaConfig {
        kv_heads: 2,
        ..MhaConfig::new(96, 8)
    };
    run_layer(
        config,
        2,
        20,
        20,
        Attention::new().causal(Causal::BottomRight),
        true,
        3200,
    );
    let mqa = MhaConfig {
        kv_heads: 1,
        ..MhaConfig::new(48, 6)
    };
    run_layer(mqa, 1, 70, 70, Attention::new(), false, 3201);
    // Dropout (nn.MultiheadAttention's `dropout`): the same weights dropped as on the CPU layer,
    // and the averaged weights are the dropped ones, as PyTorch returns them.
    run_layer(
        config,
        2,
        20,
        31,
        Attention::new().dropout(0.25, 3202),
        true,
        3202,
    );
    // A score mod, a mask mod and a key range of the user's (the CPU layer runs the closures).
    run_layer(
        config,
        2,
        20,
        31,
        Attention::new().score_mod(layer_mods()),
        true,
        3203,
    );
}

/// Mods for the layer tests: a band of keys per row, a pattern removed within it, and scores
/// scaled per head (8 heads at most) and offset per key, with the derivative for the backward.
/// Linear in the score, so the key bias's gradient stays zero in exact arithmetic (a bending
/// mod makes it a sum that cancels to a small value, whose f32 error the layer test's bounds
/// do not allow for; bending mods' gradients are checked in tests/backward.rs).
fn layer_mods() -> wgpu_attention::ScoreMod {
    let f: Vec<f32> = (0..8).map(|h| 0.8 + 0.1 * h as f32).collect();
    let (g, data) = (f.clone(), f.clone());
    wgpu_attention::ScoreMod::new()
        .range_wgsl("return vec2<u32>(i / 3u, i / 3u + 25u);")
        .range_cpu(|_, i| (i / 3, i / 3 + 25))
        .mask_wgsl("return (i + j) % 5u != 1u;")
        .mask_cpu(|_, _, i, j| (i + j) % 5 != 1)
        .score_wgsl("return attn_data_f32(h) * s - 0.05 * f32(j % 4u);")
        .score_cpu(move |s, _, h, _, j| f[h] as f64 * s - 0.05 * (j % 4) as f64)
        .grad_wgsl("return attn_data_f32(h);")
        .grad_cpu(move |_, _, h, _, _| g[h] as f64)
        .data_f32(&data)
}

#[test]
fn cross_attention_with_other_widths_and_masks() {
    // kdim != vdim != embed_dim, and a key padding mask [B, 1, 1, S] plus kv_lens.
    let config = MhaConfig {
        embed_dim: 32,
        num_heads: 4,
        kv_heads: 2,
        kdim: 24,
        vdim: 40,
    };
    let mut r = rng(3300);
    let pad = random_mask(&mut r, 2 * 50, 0.8);
    let opts = Attention::new()
        .mask([2, 1, 1, 50], pad)
        .kv_lens(vec![50, 31]);
    run_layer(config, 2, 13, 50, opts.clone(), true, 3300);
    run_layer(config, 2, 13, 50, opts, false, 3301);
}

#[test]
fn packed_in_proj_and_bad_weights() {
    let Some(gpu) = gpu() else { return };
    let config = MhaConfig::new(16, 2);
    let mut r = rng(3400);
    let w = weights(&mut r, &config, true);
    // PyTorch's in_proj_weight is W_q, W_k, W_v stacked by rows.
    let packed: Vec<f32> = [w.q_weight.clone(), w.k_weight.clone(), w.v_weight.clone()].concat();
    let packed_bias: Vec<f32> = [
        w.q_bias.clone().unwrap(),
        w.k_bias.clone().unwrap(),
        w.v_bias.clone().unwrap(),
    ]
    .concat();
    let from_packed = MhaWeights::from_in_proj(
        &config,
        &packed,
        Some(&packed_bias),
        w.out_weight.clone(),
        w.out_bias.clone(),
    )
    .unwrap();
    assert_eq!(from_packed, w);
    let err = MhaWeights::from_in_proj(&config, &packed[1..], None, w.out_weight.clone(), None);
    assert!(
        matches!(
            err,
            Err(Error::DataLength {
                what: "in_proj_weight",
                ..
            })
        ),
        "{err:?}"
    );
    let bad = MhaWeights {
        k_weight: vec![0.0; 3],
        ..w.clone()
    };
    let err = MultiHeadAttention::new(gpu, config, &bad);
    assert!(
        matches!(
            err,
            Err(Error::DataLength {
                what: "k_weight",
                ..
            })
        ),
        "{err:?}"
    );
    let err = MultiHeadAttention::new(gpu, MhaConfig::new(10, 3), &w);
    assert!(matches!(err, Err(Error::ShapeMismatch { .. })), "{err:?}");
    // An input of the wrong width.
    let layer = MultiHeadAttention::new(gpu, config, &w).unwrap();
    let x = gpu
        .upload(&random(&mut r, 2 * 5 * 15, 1.0), [2, 5, 1, 15])
        .unwrap();
    let err = layer.forward(gpu, &x, &x, &x, &Attention::new());
    assert!(matches!(err, Err(Error::ShapeMismatch { .. })), "{err:?}");
    let x = gpu
        .upload(&random(&mut r, 2 * 5 * 15, 1.0), [2, 5, 15])
        .unwrap();
    let err = layer.forward(gpu, &x, &x, &x, &Attention::new());
    assert!(
        matches!(&err, Err(Error::ShapeMismatch { what, got: 15, .. }) if what.contains("[batch, seq, width]")),
        "{err:?}"
    );
    // A 4-dim input whose third dim is not 1.
    let x = gpu
        .upload(&random(&mut r, 2 * 5 * 2 * 16, 1.0), [2, 5, 2, 16])
        .unwrap();
    let err = layer.forward(gpu, &x, &x, &x, &Attention::new());
    assert!(
        matches!(err, Err(Error::ShapeMismatch { got: 2, .. })),
        "{err:?}"
    );
}

/// `.safetensors` files: the tensors read as written (separate projections of other widths,
/// half precision, a prefix), and a tensor of the right size but another shape (transposed,
/// flattened) refused with a typed error, not read scrambled (an outside review found a
/// transposed `k_proj_weight` accepted).
#[test]
fn safetensors_files_are_read_by_shape() {
    use safetensors::tensor::TensorView;
    // (name, values, shape, as bf16)
    type Tensors = Vec<(&'static str, Vec<f32>, Vec<usize>, bool)>;
    let file = |tensors: &Tensors| {
        let bytes: Vec<(String, Vec<u8>, Vec<usize>, bool)> = tensors
            .iter()
            .map(|(name, x, shape, bf16)| {
                let data = if *bf16 {
                    x.iter()
                        .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
                        .collect()
                } else {
                    x.iter().flat_map(|v| v.to_le_bytes()).collect()
                };
                (format!("layer.{name}"), data, shape.clone(), *bf16)
            })
            .collect();
        let views = bytes.iter().map(|(name, data, shape, bf16)| {
            let dtype = if *bf16 {
                safetensors::Dtype::BF16
            } else {
                safetensors::Dtype::F32
            };
            (
                name.clone(),
                TensorView::new(dtype, shape.clone(), data).unwrap(),
            )
        });
        safetensors::serialize(views, None).unwrap()
    };
    let config = MhaConfig {
        kdim: 6,
        vdim: 10,
        ..MhaConfig::new(8, 2)
    };
    let mut r = rng(3450);
    let w = weights(&mut r, &config, true);
    let bias = [
        w.q_bias.clone().unwrap(),
        w.k_bias.clone().unwrap(),
        w.v_bias.clone().unwrap(),
    ]
    .concat();
    let tensors: Tensors = vec![
        ("q_proj_weight", w.q_weight.clone(), vec![8, 8], false),
        ("k_proj_weight", w.k_weight.clone(), vec![8, 6], false),
        ("v_proj_weight", w.v_weight.clone(), vec![8, 10], false),
        ("in_proj_bias", bias, vec![24], false),
        ("out_proj.weight", w.out_weight.clone(), vec![8, 8], true),
        ("out_proj.bias", w.out_bias.clone().unwrap(), vec![8], false),
    ];
    let read = MhaWeights::from_safetensors(&config, &file(&tensors), "layer.").unwrap();
    let rounded: Vec<f32> = w
        .out_weight
        .iter()
        .map(|&x| half::bf16::from_f32(x).to_f32())
        .collect();
    assert_eq!(
        read,
        MhaWeights {
            out_weight: rounded,
            ..w.clone()
        }
    );
    for (index, shape) in [
        (1, vec![6, 8]),
        (1, vec![48]),
        (4, vec![64]),
        (3, vec![1, 24]),
    ] {
        let mut bad = tensors.clone();
        bad[index].2 = shape.clone();
        let err = MhaWeights::from_safetensors(&config, &file(&bad), "layer.").unwrap_err();
        assert!(
            matches!(&err, Error::Weights(m) if m.contains(bad[index].0)),
            "{} as {shape:?}: {err:?}",
            bad[index].0
        );
    }
}

/// A layer's backward refuses another layer's activations, of other widths (an outside
/// review found them accepted, with gradients of the wrong dims) or of the same ones, and
/// takes its own.
#[test]
fn backward_takes_its_own_activations() {
    let Some(gpu) = gpu() else { return };
    let mut r = rng(3460);
    let ca = MhaConfig::new(16, 2);
    let cb = MhaConfig {
        kdim: 8,
        vdim: 8,
        ..MhaConfig::new(16, 2)
    };
    let la = MultiHeadAttention::new(gpu, ca, &weights(&mut r, &ca, false)).unwrap();
    let lb = MultiHeadAttention::new(gpu, cb, &weights(&mut r, &cb, false)).unwrap();
    let twin = MultiHeadAttention::new(gpu, ca, &weights(&mut r, &ca, false)).unwrap();
    let x = gpu
        .upload(&random(&mut r, 5 * 16, 1.0), [1, 5, 16])
        .unwrap();
    let (_, kept) = la
        .forward_for_backward(gpu, &x, &x, &x, &Attention::new())
        .unwrap();
    let d = gpu
        .upload(&random(&mut r, 5 * 16, 1.0), [1, 5, 16])
        .unwrap();
    for other in [&lb, &twin] {
        let err = other.backward(gpu, &kept, &d).unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidOption {
                    what: "kept activations",
                    ..
                }
            ),
            "{err:?}"
        );
    }
    let grads = la.backward(gpu, &kept, &d).unwrap();
    assert_eq!(grads.key.dims(), x.dims());
}

/// The layer's backward on the GPU against the f64 gradients of the CPU layer (which its unit
/// tests check against finite differences): every input, weight and bias, compared element by
/// element and by relative norm error. `backward` allocates its gradients (zeroed by wgpu, not
/// poisoned): an element left unwritten reads 0, which the element-wise check catches
/// wherever the reference gradient is not near 0.
fn check_layer_backward(
    config: MhaConfig,
    (batch, q_len, kv_len): (usize, usize, usize),
    opts: Attention,
    with_bias: bool,
    seed: u64,
) {
    let Some(gpu) = gpu() else { return };
    let mut r = rng(seed);
    let w = weights(&mut r, &config, with_bias);
    let layer = MultiHeadAttention::new(gpu, config, &w).unwrap();
    let query = random(&mut r, batch * q_len * config.embed_dim, 1.0);
    let key = random(&mut r, batch * kv_len * config.kdim, 1.0);
    let value = random(&mut r, batch * kv_len * config.vdim, 1.0);
    let d_out = random(&mut r, batch * q_len * config.embed_dim, 1.0);
    let up = |x: &[f32], s: usize, width: usize| gpu.upload(x, [batch, s, width]).unwrap();
    let (tq, tk, tv) = (
        up(&query, q_len, config.embed_dim),
        up(&key, kv_len, config.kdim),
        up(&value, kv_len, config.vdim),
    );
    let (_, kept) = layer
        .forward_for_backward(gpu, &tq, &tk, &tv, &opts)
        .unwrap();
    let g = layer
        .backward(gpu, &kept, &up(&d_out, q_len, config.embed_dim))
        .unwrap();
    let sizes = (batch, q_len, kv_len);
    let want = wgpu_attention::cpu::mha_reference_backward(
        &config, &w, &query, &key, &value, sizes, &opts, &d_out,
    )
    .unwrap();
    let ww = &want.weights;
    let mut pairs = vec![
        ("d query", &g.query, &want.query),
        ("d key", &g.key, &want.key),
        ("d value", &g.value, &want.value),
        ("d q_weight", &g.q_weight, &ww.q_weight),
        ("d k_weight", &g.k_weight, &ww.k_weight),
        ("d v_weight", &g.v_weight, &ww.v_weight),
        ("d out_weight", &g.out_weight, &ww.out_weight),
    ];
    for (what, got, want) in [
        ("d q_bias", &g.q_bias, &ww.q_bias),
        ("d k_bias", &g.k_bias, &ww.k_bias),
        ("d v_bias", &g.v_bias, &ww.v_bias),
        ("d out_bias", &g.out_bias, &ww.out_bias),
    ] {
        assert_eq!(got.is_some(), want.is_some(), "{what}");
        if let (Some(got), Some(want)) = (got, want) {
            pairs.push((what, got, want));
        }
    }
    // The key bias's gradient is zero in exact arithmetic (it adds q_i·b_k to every score of
    // row i: softmax ignores a shift of a whole row), so the GPU's is rounding noise of the
    // sum over rows of dK: it is checked against the scale of d k_weight instead. Not under a
    // score mod that bends scores (a shift then moves the weights): the reference says which.
    let k_weight_scale = want
        .weights
        .k_weight
        .iter()
        .fold(0f32, |m, x| m.max(x.abs()));
    let k_bias_is_zero = ww
        .k_bias
        .as_ref()
        .is_some_and(|b| b.iter().all(|x| x.abs() <= 1e-6 * k_weight_scale));
    if let Some(db) = g.k_bias.as_ref().filter(|_| k_bias_is_zero) {
        let db = db.download(gpu).unwrap();
        let worst = db.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert!(
            worst <= 1e-5 * k_weight_scale,
            "d k_bias {worst:e} is not ~0"
        );
        pairs.retain(|(what, ..)| *what != "d k_bias");
    }
    for (what, got, want) in pairs {
        let got = got.download(gpu).unwrap();
        let err = rel_norm_error(&got, want);
        assert!(
            err <= 1e-5,
            "{what}: relative norm error {err:e} ({opts:?})"
        );
        let largest = want.iter().fold(0f32, |m, x| m.max(x.abs()));
        assert_close(what, &got, want, 1e-4 * largest.max(1e-3), 0.0);
    }
}

#[test]
fn layer_backward_against_the_reference() {
    check_layer_backward(
        MhaConfig::new(24, 3),
        (2, 11, 11),
        Attention::new().causal(Causal::TopLeft),
        true,
        3500,
    );
    let cross = MhaConfig {
        embed_dim: 32,
        num_heads: 4,
        kv_heads: 2,
        kdim: 24,
        vdim: 40,
    };
    check_layer_backward(
        cross,
        (2, 13, 29),
        Attention::new().kv_lens(vec![29, 17]).softcap(3.0),
        false,
        3501,
    );
    check_layer_backward(cross, (1, 7, 70), Attention::new(), true, 3502);
    check_layer_backward(
        cross,
        (2, 13, 29),
        Attention::new()
            .dropout(0.4, 3503)
            .causal(Causal::BottomRight),
        true,
        3503,
    );
    check_layer_backward(
        cross,
        (2, 13, 29),
        Attention::new().score_mod(layer_mods()),
        true,
        3504,
    );
}
