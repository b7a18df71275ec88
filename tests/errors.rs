//! Every kind of bad input gets its typed [`Error`] variant, never a panic, on the CPU reference
//! and on the GPU alike; and the message names what was wrong.
//!
//! GPU cases run on the device of `common::gpu()` and are skipped without one (the CPU cases
//! still run). Shapes are tiny: nothing here is about speed.

mod common;

use std::fmt::Debug;

use wgpu_attention::{
    Attention, Causal, DType, Dims, Error, Gpu, Layout, LimitCaps, Output, Path, Result, Tensor,
    cpu,
};

const LAYOUTS: [Layout; 2] = [Layout::Bhsd, Layout::Bshd];

/// A small valid problem: GQA (heads 4, kv_heads 2), q_len != kv_len, head_dim != v_head_dim.
fn base() -> Dims {
    Dims {
        batch: 2,
        heads: 4,
        kv_heads: 2,
        q_len: 3,
        kv_len: 5,
        head_dim: 4,
        v_head_dim: 6,
    }
}

fn data(n: usize) -> Vec<f32> {
    (0..n).map(|i| (i as f32 * 0.37).sin()).collect()
}

/// Unwraps the error of `result`, checks it with `pred`, and checks that its message contains
/// every needle. Returns the error for further checks.
#[track_caller]
fn expect_err<T: Debug>(
    ctx: &str,
    result: Result<T>,
    pred: impl Fn(&Error) -> bool,
    needles: &[&str],
) -> Error {
    let err = match result {
        Ok(v) => panic!("{ctx}: expected an error, got Ok({v:?})"),
        Err(e) => e,
    };
    assert!(pred(&err), "{ctx}: wrong error variant or fields: {err:?}");
    let msg = err.to_string();
    for needle in needles {
        assert!(
            msg.contains(needle),
            "{ctx}: message {msg:?} does not mention {needle:?}"
        );
    }
    err
}

fn upload_qkv(gpu: &Gpu, dims: Dims, layout: Layout) -> (Tensor, Tensor, Tensor) {
    let q = gpu
        .upload(&data(dims.q_elems()), dims.q_shape(layout))
        .unwrap();
    let k = gpu
        .upload(&data(dims.k_elems()), dims.k_shape(layout))
        .unwrap();
    let v = gpu
        .upload(&data(dims.v_elems()), dims.v_shape(layout))
        .unwrap();
    (q, k, v)
}

/// Runs `opts` on `dims` through `cpu::reference` (with data of the right lengths) and, when
/// there is a GPU, through `Attention::run` and `Attention::plan`; all must fail with an error
/// that satisfies `pred` and mentions every needle, and the paths must agree on the error.
#[track_caller]
fn both(ctx: &str, dims: Dims, opts: &Attention, pred: impl Fn(&Error) -> bool, needles: &[&str]) {
    let layout = opts.get_layout();
    let cpu_err = expect_err(
        &format!("{ctx} (cpu::reference)"),
        cpu::reference(
            &data(dims.q_elems()),
            &data(dims.k_elems()),
            &data(dims.v_elems()),
            dims,
            opts,
        ),
        &pred,
        needles,
    );
    let Some(gpu) = common::gpu() else { return };
    let plan_err = expect_err(
        &format!("{ctx} (Attention::plan)"),
        opts.plan(gpu, dims),
        &pred,
        needles,
    );
    assert_eq!(plan_err, cpu_err, "{ctx}: plan and reference disagree");
    let (q, k, v) = upload_qkv(gpu, dims, layout);
    let gpu_err = expect_err(
        &format!("{ctx} (Attention::run)"),
        opts.run(gpu, &q, &k, &v),
        &pred,
        needles,
    );
    assert_eq!(gpu_err, cpu_err, "{ctx}: GPU and reference disagree");
}

#[test]
fn base_problem_is_valid() {
    // The cases below perturb this problem; it must pass as given, or they prove nothing.
    for layout in LAYOUTS {
        let opts = Attention::new().layout(layout);
        let dims = base();
        cpu::reference(
            &data(dims.q_elems()),
            &data(dims.k_elems()),
            &data(dims.v_elems()),
            dims,
            &opts,
        )
        .unwrap();
        if let Some(gpu) = common::gpu() {
            let (q, k, v) = upload_qkv(gpu, dims, layout);
            opts.run(gpu, &q, &k, &v).unwrap();
        }
    }
}

#[test]
fn zero_sizes() {
    let names = [
        "batch",
        "heads",
        "kv_heads",
        "q_len",
        "kv_len",
        "head_dim",
        "v_head_dim",
    ];
    for (n, name) in names.into_iter().enumerate() {
        let mut dims = base();
        let field = match n {
            0 => &mut dims.batch,
            1 => &mut dims.heads,
            2 => &mut dims.kv_heads,
            3 => &mut dims.q_len,
            4 => &mut dims.kv_len,
            5 => &mut dims.head_dim,
            _ => &mut dims.v_head_dim,
        };
        *field = 0;
        for layout in LAYOUTS {
            let opts = Attention::new().layout(layout);
            expect_err(
                &format!("{name} = 0, {layout:?}"),
                cpu::reference(
                    &data(dims.q_elems()),
                    &data(dims.k_elems()),
                    &data(dims.v_elems()),
                    dims,
                    &opts,
                ),
                |e| matches!(e, Error::ZeroSize { what } if *what == name),
                &[name, "zero"],
            );
            // The GPU path reads dims from tensors, which cannot be empty: the error comes
            // earlier, from making the tensor, and the plan says the same as the reference.
            if let Some(gpu) = common::gpu() {
                expect_err(
                    &format!("plan with {name} = 0"),
                    opts.plan(gpu, dims),
                    |e| matches!(e, Error::ZeroSize { what } if *what == name),
                    &[name],
                );
            }
        }
    }
    let Some(gpu) = common::gpu() else { return };
    for d in 0..4 {
        let mut shape = [2, 3, 4, 5];
        shape[d] = 0;
        expect_err(
            &format!("upload {shape:?}"),
            gpu.upload(&[], shape),
            |e| matches!(e, Error::ZeroSize { .. }),
            &["zero"],
        );
        expect_err(
            &format!("empty {shape:?}"),
            gpu.empty(shape),
            |e| matches!(e, Error::ZeroSize { .. }),
            &["zero"],
        );
        let buffer = gpu.device().create_buffer(&wgpu::BufferDescriptor {
            label: Some("zero dims"),
            size: 256,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        expect_err(
            &format!("from_buffer {shape:?}"),
            Tensor::from_buffer(gpu, buffer, shape, DType::F32),
            |e| matches!(e, Error::ZeroSize { .. }),
            &["zero"],
        );
    }
}

#[test]
fn heads_not_divisible() {
    for layout in LAYOUTS {
        let dims = Dims {
            heads: 3,
            kv_heads: 2,
            ..base()
        };
        both(
            &format!("heads 3, kv_heads 2, {layout:?}"),
            dims,
            &Attention::new().layout(layout),
            |e| {
                matches!(
                    e,
                    Error::HeadsNotDivisible {
                        heads: 3,
                        kv_heads: 2
                    }
                )
            },
            &["heads (3)", "kv_heads (2)"],
        );
    }
}

#[test]
fn head_dim_too_large() {
    for layout in LAYOUTS {
        let opts = Attention::new().layout(layout);
        let dims = Dims {
            head_dim: 577,
            ..base()
        };
        both(
            &format!("head_dim 577, {layout:?}"),
            dims,
            &opts,
            |e| {
                matches!(
                    e,
                    Error::HeadDimTooLarge {
                        what: "head_dim",
                        got: 577,
                        max: 576
                    }
                )
            },
            &["head_dim is 577", "576"],
        );
        let dims = Dims {
            v_head_dim: 513,
            ..base()
        };
        both(
            &format!("v_head_dim 513, {layout:?}"),
            dims,
            &opts,
            |e| {
                matches!(
                    e,
                    Error::HeadDimTooLarge {
                        what: "v_head_dim",
                        got: 513,
                        max: 512
                    }
                )
            },
            &["v_head_dim is 513", "512"],
        );
    }
}

/// The tensor a shape-mismatch case perturbs.
#[derive(Clone, Copy)]
enum Which {
    K,
    V,
}

#[test]
fn mismatched_qkv_shapes() {
    let d = base();
    // (tensor, field index in (batch, heads, seq, dim), new value, `what`, got, expected)
    let cases: [(Which, usize, usize, &str, usize, usize); 5] = [
        (Which::K, 0, 3, "K batch", 3, d.batch),
        (Which::V, 0, 1, "V batch", 1, d.batch),
        (Which::K, 3, 5, "K head_dim", 5, d.head_dim),
        (Which::V, 1, 1, "V heads", 1, d.kv_heads),
        (Which::V, 2, 4, "V seq len", 4, d.kv_len),
    ];
    for layout in LAYOUTS {
        for (which, field, value, what, got, expected) in cases {
            let q = d.q_shape(layout);
            let mut k = [d.batch, d.kv_heads, d.kv_len, d.head_dim];
            let mut v = [d.batch, d.kv_heads, d.kv_len, d.v_head_dim];
            match which {
                Which::K => k[field] = value,
                Which::V => v[field] = value,
            }
            let k = layout.dims(k[0], k[1], k[2], k[3]);
            let v = layout.dims(v[0], v[1], v[2], v[3]);
            let ctx = format!("{what} {value}, {layout:?}: q {q:?} k {k:?} v {v:?}");
            let pred = |e: &Error| {
                matches!(e, Error::ShapeMismatch { what: w, got: g, expected: x }
                    if w == what && *g == got && *x == expected)
            };
            let needles = [what, &got.to_string(), &expected.to_string()];
            let from_shapes = expect_err(&ctx, Dims::from_shapes(layout, q, k, v), pred, &needles);
            let Some(gpu) = common::gpu() else { continue };
            let tq = gpu.upload(&data(q.iter().product()), q).unwrap();
            let tk = gpu.upload(&data(k.iter().product()), k).unwrap();
            let tv = gpu.upload(&data(v.iter().product()), v).unwrap();
            let opts = Attention::new().layout(layout);
            let run = expect_err(
                &format!("{ctx} (run)"),
                opts.run(gpu, &tq, &tk, &tv),
                pred,
                &needles,
            );
            assert_eq!(run, from_shapes, "{ctx}");
            // run_into checks the inputs before the outputs.
            let out = Output {
                o: gpu.empty(d.o_shape(layout)).unwrap(),
                lse: None,
                weights: None,
            };
            expect_err(
                &format!("{ctx} (run_into)"),
                opts.run_into(gpu, &tq, &tk, &tv, &out),
                pred,
                &needles,
            );
        }
    }
}

#[test]
fn host_data_of_wrong_length() {
    let dims = base();
    for layout in LAYOUTS {
        let opts = Attention::new().layout(layout);
        let (nq, nk, nv) = (dims.q_elems(), dims.k_elems(), dims.v_elems());
        for (what, lens, shape, expected, got) in [
            ("Q", [nq - 1, nk, nv], dims.q_shape(layout), nq, nq - 1),
            ("K", [nq, nk + 1, nv], dims.k_shape(layout), nk, nk + 1),
            ("V", [nq, nk, 0], dims.v_shape(layout), nv, 0),
        ] {
            let ctx = format!("{what} of {got} elements, {layout:?}");
            expect_err(
                &ctx,
                cpu::reference(&data(lens[0]), &data(lens[1]), &data(lens[2]), dims, &opts),
                |e| {
                    matches!(e, Error::DataLength { what: w, dims: d, expected: x, got: g }
                        if *w == what && d == &shape.to_vec() && *x == expected && *g == got)
                },
                &[
                    what,
                    &format!("{got} elements"),
                    &format!("{shape:?}"),
                    &format!("need {expected}"),
                ],
            );
        }
    }
    let Some(gpu) = common::gpu() else { return };
    for (len, shape) in [(5, [1, 1, 2, 3]), (7, [1, 1, 2, 3]), (0, [1, 1, 1, 1])] {
        expect_err(
            &format!("upload of {len} elements as {shape:?}"),
            gpu.upload(&data(len), shape),
            |e| {
                matches!(e, Error::DataLength { what: "upload", dims, expected: 6 | 1, got }
                    if dims == &shape.to_vec() && *got == len)
            },
            &["upload", &format!("{len} elements"), &format!("{shape:?}")],
        );
    }
    let t = gpu.empty([1, 1, 2, 3]).unwrap();
    expect_err(
        "write of 5 elements into [1, 1, 2, 3]",
        t.write(gpu, &data(5)),
        |e| {
            matches!(
                e,
                Error::DataLength {
                    what: "write",
                    expected: 6,
                    got: 5,
                    ..
                }
            )
        },
        &["write", "5 elements", "need 6"],
    );
}

#[test]
fn mask_and_bias_shapes() {
    let d = base();
    let target = d.score_shape(); // [2, 4, 3, 5]
    for layout in LAYOUTS {
        // Shapes that do not broadcast: a dim that is neither 1 nor the target's.
        for shape in [
            [3, 1, 1, 1],
            [1, 2, 1, 1],
            [1, 1, 5, 5],
            [1, 1, 3, 3],
            [2, 4, 3, 6],
            [1, 1, 1, 0],
        ] {
            let n: usize = shape.iter().product();
            for (what, opts) in [
                (
                    "mask",
                    Attention::new().layout(layout).mask(shape, vec![true; n]),
                ),
                (
                    "bias",
                    Attention::new().layout(layout).bias(shape, vec![0.5; n]),
                ),
            ] {
                both(
                    &format!("{what} of shape {shape:?}, {layout:?}"),
                    d,
                    &opts,
                    |e| matches!(e, Error::BroadcastShape { what: w, got, target: t } if *w == what && *got == shape && *t == target),
                    &[what, &format!("{shape:?}"), &format!("{target:?}")],
                );
            }
        }
        // Shapes that broadcast, with the wrong number of elements.
        for (shape, len) in [
            ([1, 1, 1, 1], 0),
            ([1, 1, 1, 1], 2),
            ([2, 4, 3, 5], 119),
            ([1, 1, 3, 5], 16),
        ] {
            let expected: usize = shape.iter().product();
            for (what, opts) in [
                (
                    "mask",
                    Attention::new().layout(layout).mask(shape, vec![true; len]),
                ),
                (
                    "bias",
                    Attention::new().layout(layout).bias(shape, vec![0.5; len]),
                ),
            ] {
                both(
                    &format!("{what} of shape {shape:?} with {len} elements, {layout:?}"),
                    d,
                    &opts,
                    |e| {
                        matches!(e, Error::DataLength { what: w, dims, expected: x, got }
                            if *w == what && dims == &shape.to_vec() && *x == expected && *got == len)
                    },
                    &[
                        what,
                        &format!("{len} elements"),
                        &format!("need {expected}"),
                    ],
                );
            }
        }
    }
}

#[test]
fn non_finite_bias() {
    let d = base();
    let shape = [1, 1, d.q_len, d.kv_len];
    let n = d.q_len * d.kv_len;
    for (bad, index) in [
        (f32::NAN, 0),
        (f32::INFINITY, 7),
        (f32::NEG_INFINITY, n - 1),
    ] {
        let mut values = vec![0.25; n];
        values[index] = bad;
        let opts = Attention::new().causal(Causal::TopLeft).bias(shape, values);
        both(
            &format!("bias {bad} at {index}"),
            d,
            &opts,
            |e| matches!(e, Error::InvalidOption { what: "bias", .. }),
            &[
                "bias",
                &bad.to_string(),
                &format!("index {index}"),
                "finite",
            ],
        );
    }
}

#[test]
fn per_sequence_lengths() {
    let d = base(); // batch 2, q_len 3, kv_len 5
    for layout in LAYOUTS {
        let opts = || Attention::new().layout(layout);
        for (what, lens) in [
            ("kv_lens", vec![5]),
            ("kv_lens", vec![1, 2, 3]),
            ("q_lens", vec![]),
            ("q_lens", vec![3; 3]),
        ] {
            let got = lens.len();
            let o = if what == "kv_lens" {
                opts().kv_lens(lens)
            } else {
                opts().q_lens(lens)
            };
            both(
                &format!("{what} of length {got}, {layout:?}"),
                d,
                &o,
                |e| matches!(e, Error::ShapeMismatch { what: w, got: g, expected: 2 } if *w == format!("{what} length") && *g == got),
                &[what, &format!("is {got}"), "expected 2"],
            );
        }
        for (what, lens, index, value, max) in [
            ("kv_lens", vec![5, 6], 1, 6, 5),
            ("kv_lens", vec![u32::MAX, 0], 0, u32::MAX as usize, 5),
            ("q_lens", vec![4, 0], 0, 4, 3),
            ("q_lens", vec![3, 100], 1, 100, 3),
        ] {
            let o = if what == "kv_lens" {
                opts().kv_lens(lens)
            } else {
                opts().q_lens(lens)
            };
            both(
                &format!("{what}[{index}] = {value}, {layout:?}"),
                d,
                &o,
                |e| {
                    matches!(e, Error::LengthOutOfRange { what: w, index: i, value: v, max: m }
                        if *w == what && *i == index && *v == value && *m == max)
                },
                &[
                    &format!("{what}[{index}] is {value}"),
                    &format!("maximum of {max}"),
                ],
            );
        }
    }
}

#[test]
fn invalid_scale_and_softcap() {
    let d = base();
    for bad in [
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MAX,
        -f32::MAX,
        wgpu_attention::MAX_SCALE * 1.01,
    ] {
        both(
            &format!("scale {bad}"),
            d,
            &Attention::new().scale(bad),
            |e| matches!(e, Error::InvalidOption { what: "scale", value, .. } if *value == bad.to_string()),
            &["scale", &bad.to_string(), "finite", "1e6"],
        );
    }
    for bad in [0.0, -0.0, -1.0, f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        both(
            &format!("softcap {bad}"),
            d,
            &Attention::new().softcap(bad),
            |e| matches!(e, Error::InvalidOption { what: "softcap", value, .. } if *value == bad.to_string()),
            &["softcap", &bad.to_string(), "> 0"],
        );
    }
}

#[test]
fn alibi_slopes_and_sink_logits() {
    let d = base(); // batch 2, heads 4
    for n in [0, 3, 5, 7, 9] {
        both(
            &format!("{n} alibi slopes"),
            d,
            &Attention::new().alibi(vec![0.5; n]),
            |e| matches!(e, Error::DataLength { what: "alibi slopes", expected: 4, got, .. } if *got == n),
            &["alibi slopes", &n.to_string()],
        );
        both(
            &format!("{n} sink logits"),
            d,
            &Attention::new().sinks(vec![0.5; n]),
            |e| matches!(e, Error::DataLength { what: "sink logits", expected: 4, got, .. } if *got == n),
            &["sink logits", &n.to_string()],
        );
    }
    // One slope per batch entry and head is accepted too.
    let ok = Attention::new().alibi(vec![0.25; 8]);
    cpu::reference(
        &data(d.q_elems()),
        &data(d.k_elems()),
        &data(d.v_elems()),
        d,
        &ok,
    )
    .unwrap();
    for bad in [
        f32::NAN,
        f32::INFINITY,
        -f32::INFINITY,
        wgpu_attention::MAX_ALIBI_SLOPE * 2.0,
        -0.5,
    ] {
        let mut slopes = vec![0.5; 4];
        slopes[2] = bad;
        both(
            &format!("alibi slope {bad}"),
            d,
            &Attention::new().alibi(slopes),
            |e| {
                matches!(
                    e,
                    Error::InvalidOption {
                        what: "alibi slopes",
                        ..
                    }
                )
            },
            &["alibi slopes", "index 2", "finite"],
        );
    }
    for bad in [f32::NAN, f32::INFINITY, -f32::INFINITY, -1e31, f32::MAX] {
        let mut sinks = vec![0.5; 4];
        sinks[3] = bad;
        both(
            &format!("sink logit {bad}"),
            d,
            &Attention::new().sinks(sinks),
            |e| {
                matches!(
                    e,
                    Error::InvalidOption {
                        what: "sink logits",
                        ..
                    }
                )
            },
            &["sink logits", "index 3", "finite"],
        );
    }
}

/// The largest accepted scale on inputs whose scores reach ~1e37, near the contract's 1e38:
/// finite outputs on every path, equal to the reference's.
#[test]
fn the_largest_scale_gives_finite_outputs() {
    let d = common::dims(1, 2, 1, 7, 33, 16, 8);
    let opts = Attention::new().scale(-wgpu_attention::MAX_SCALE);
    let Some(gpu) = common::gpu() else { return };
    for path in [Path::ThreePass, Path::Fused, Path::Decode] {
        // Q in [-1e30, 1e30], K in [-1, 1]: |scale| * sum_d |q k| is up to 1.6e37.
        common::check(gpu, path, d, &opts, 41, 1e30);
    }
}

/// Sizes from a user that overflow when multiplied are typed errors, never a panic, a wrap
/// to a small number, or an out-of-bounds index.
#[test]
fn layer_and_cache_sizes_that_overflow() {
    use wgpu_attention::{MhaConfig, MhaWeights};
    let packed = vec![0.5f32; 48];
    for (what, config) in [
        ("zero heads", MhaConfig::new(16, 0)),
        ("2^33 wide, one head", MhaConfig::new(1 << 33, 1)),
        ("2^40 wide, 2^32 heads", MhaConfig::new(1 << 40, 1 << 32)),
    ] {
        let from_in_proj = MhaWeights::from_in_proj(&config, &packed, None, vec![0.5; 4], None);
        assert!(
            matches!(
                from_in_proj,
                Err(Error::ZeroSize { .. }
                    | Error::HeadDimTooLarge { .. }
                    | Error::TooLarge { .. })
            ),
            "{what}: from_in_proj gave {from_in_proj:?}"
        );
        let from_file = MhaWeights::from_safetensors(&config, b"not a file", "");
        assert!(
            !matches!(from_file, Err(Error::Weights(_)) | Ok(_)),
            "{what}: the config is refused before the file is read: {from_file:?}"
        );
    }
    // The CPU layer with sizes whose products overflow.
    let config = MhaConfig::new(8, 2);
    let w = MhaWeights {
        q_weight: vec![0.1; 64],
        k_weight: vec![0.1; 64],
        v_weight: vec![0.1; 64],
        out_weight: vec![0.1; 64],
        q_bias: None,
        k_bias: None,
        v_bias: None,
        out_bias: None,
    };
    let huge = wgpu_attention::cpu::mha_reference(
        &config,
        &w,
        &[0.5; 8],
        &[0.5; 8],
        &[0.5; 8],
        (1 << 62, 1 << 2, 1),
        &Attention::new(),
        false,
    );
    assert!(
        matches!(huge, Err(Error::TooLarge { .. })),
        "mha_reference with 2^64 rows: {huge:?}"
    );
    let Some(gpu) = common::gpu() else { return };
    let mut cache = wgpu_attention::KvCache::new(gpu, 1, 1, 8, 4, 4).unwrap();
    cache.append(gpu, &[0.5; 12], &[0.5; 12], &[3]).unwrap();
    let absurd = cache.append(gpu, &[], &[], &[usize::MAX]);
    assert!(
        matches!(
            absurd,
            Err(Error::LengthOutOfRange {
                max: 8,
                value: usize::MAX,
                ..
            })
        ),
        "append of usize::MAX tokens after 3: {absurd:?}"
    );
    assert_eq!(cache.lens(), &[3], "a refused append changes nothing");
}

/// Dims whose element counts do not fit the kernels' 32-bit indices (or a `usize`): refused
/// before any data is touched or allocated.
#[test]
fn dims_too_large_for_indices() {
    let huge = Dims {
        batch: 1 << 16,
        heads: 1 << 16,
        kv_heads: 1,
        q_len: 1,
        kv_len: 1,
        head_dim: 2,
        v_head_dim: 1,
    };
    expect_err(
        "Q of 2^33 elements",
        cpu::reference::<f32, f32, f32>(&[], &[], &[], huge, &Attention::new()),
        |e| matches!(e, Error::TooLarge { what: "Q", requested, max, .. } if *requested == 1 << 33 && *max == u32::MAX as u64),
        &["Q", &(1u64 << 33).to_string(), &u32::MAX.to_string()],
    );
    if let Some(gpu) = common::gpu() {
        expect_err(
            "plan of Q of 2^33 elements",
            Attention::new().plan(gpu, huge),
            |e| matches!(e, Error::TooLarge { what: "Q", .. }),
            &["Q"],
        );
    }
}

/// Dims whose element counts overflow `usize` must be refused, not wrap around to a small
/// number (or panic on the overflow).
#[test]
fn dims_overflowing_usize() {
    let huge = Dims {
        batch: 1 << 32,
        heads: 1 << 32,
        kv_heads: 1 << 32,
        q_len: 1,
        kv_len: 1,
        head_dim: 1,
        v_head_dim: 1,
    };
    expect_err(
        "batch * heads = 2^64",
        cpu::reference::<f32, f32, f32>(&[], &[], &[], huge, &Attention::new()),
        |e| matches!(e, Error::TooLarge { .. }),
        &[],
    );
    if let Some(gpu) = common::gpu() {
        expect_err(
            "plan with batch * heads = 2^64",
            Attention::new().plan(gpu, huge),
            |e| matches!(e, Error::TooLarge { .. }),
            &[],
        );
    }
}

fn storage_buffer(gpu: &Gpu, size: u64, usage: wgpu::BufferUsages) -> wgpu::Buffer {
    gpu.device().create_buffer(&wgpu::BufferDescriptor {
        label: Some("errors test"),
        size,
        usage,
        mapped_at_creation: false,
    })
}

#[test]
fn from_buffer_errors() {
    let Some(gpu) = common::gpu() else { return };
    let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC;
    let dims = [1, 2, 3, 4]; // 96 bytes
    Tensor::from_buffer(gpu, storage_buffer(gpu, 96, usage), dims, DType::F32).unwrap();
    expect_err(
        "92-byte buffer for 96 bytes",
        Tensor::from_buffer(gpu, storage_buffer(gpu, 92, usage), dims, DType::F32),
        |e| {
            matches!(
                e,
                Error::BufferTooSmall {
                    what: "tensor",
                    needed: 96,
                    got: 92
                }
            )
        },
        &["92 bytes", "need 96"],
    );
    for usage in [
        wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
        wgpu::BufferUsages::UNIFORM,
        wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
    ] {
        expect_err(
            &format!("buffer with usage {usage:?}"),
            Tensor::from_buffer(gpu, storage_buffer(gpu, 256, usage), dims, DType::F32),
            |e| {
                matches!(
                    e,
                    Error::BufferUsage {
                        needed: "STORAGE",
                        ..
                    }
                )
            },
            &["STORAGE"],
        );
    }
    // Bindable but neither readable back nor writable from the host.
    let t = Tensor::from_buffer(
        gpu,
        storage_buffer(gpu, 96, wgpu::BufferUsages::STORAGE),
        dims,
        DType::F32,
    )
    .unwrap();
    expect_err(
        "download without COPY_SRC",
        t.download(gpu),
        |e| {
            matches!(
                e,
                Error::BufferUsage {
                    needed: "COPY_SRC",
                    ..
                }
            )
        },
        &["COPY_SRC"],
    );
    expect_err(
        "write without COPY_DST",
        t.write(gpu, &data(24)),
        |e| {
            matches!(
                e,
                Error::BufferUsage {
                    needed: "COPY_DST",
                    ..
                }
            )
        },
        &["COPY_DST"],
    );
}

/// Dims whose byte count overflows `u64` must not wrap around to a size the buffer "has".
#[test]
fn from_buffer_with_overflowing_dims() {
    let Some(gpu) = common::gpu() else { return };
    let dims = [1 << 32, 1 << 32, 1, 1];
    let result = Tensor::from_buffer(
        gpu,
        storage_buffer(gpu, 16, wgpu::BufferUsages::STORAGE),
        dims,
        DType::F32,
    );
    expect_err(
        "from_buffer [2^32, 2^32, 1, 1]",
        result,
        |e| matches!(e, Error::BufferTooSmall { .. } | Error::TooLarge { .. }),
        &[],
    );
    expect_err(
        "empty [2^32, 2^32, 1, 1]",
        gpu.empty(dims),
        |e| matches!(e, Error::TooLarge { what: "tensor", .. }),
        &["tensor", "max_buffer_size"],
    );
}

#[test]
fn run_into_with_wrong_output_dims() {
    let Some(gpu) = common::gpu() else { return };
    let d = base(); // o [2, 4, 3, 6] in Bhsd, [2, 3, 4, 6] in Bshd
    for layout in LAYOUTS {
        let opts = Attention::new().layout(layout);
        let (q, k, v) = upload_qkv(gpu, d, layout);
        let lse_dims = [d.batch, d.heads, d.q_len, 1];
        let good = Output {
            o: gpu.empty(d.o_shape(layout)).unwrap(),
            lse: Some(gpu.empty(lse_dims).unwrap()),
            weights: Some(gpu.empty(d.score_shape()).unwrap()),
        };
        opts.run_into(gpu, &q, &k, &v, &good).unwrap();
        let other = match layout {
            Layout::Bhsd => Layout::Bshd,
            Layout::Bshd => Layout::Bhsd,
        };
        let mut o_wrong = d.o_shape(layout);
        o_wrong[3] += 1;
        let cases: [(&str, Output, usize, usize, usize); 5] = [
            (
                "O",
                Output {
                    o: gpu.empty(o_wrong).unwrap(),
                    ..good.clone()
                },
                3,
                7,
                6,
            ),
            (
                "O",
                Output {
                    o: gpu.empty(d.o_shape(other)).unwrap(),
                    ..good.clone()
                },
                1,
                d.o_shape(other)[1],
                d.o_shape(layout)[1],
            ),
            (
                "O",
                Output {
                    o: gpu.empty([1, 1, 1, 144]).unwrap(),
                    ..good.clone()
                },
                0,
                1,
                2,
            ),
            (
                "log-sum-exp",
                Output {
                    lse: Some(gpu.empty([d.batch, d.heads, d.q_len, 2]).unwrap()),
                    ..good.clone()
                },
                3,
                2,
                1,
            ),
            (
                "weights",
                Output {
                    weights: Some(gpu.empty([d.batch, d.heads, d.kv_len, d.q_len]).unwrap()),
                    ..good.clone()
                },
                2,
                d.kv_len,
                d.q_len,
            ),
        ];
        for (what, out, axis, got, expected) in cases {
            let ctx = format!("{what} dim {axis} = {got}, {layout:?}");
            expect_err(
                &ctx,
                opts.run_into(gpu, &q, &k, &v, &out),
                |e| matches!(e, Error::ShapeMismatch { what: w, got: g, expected: x } if w.starts_with(&format!("{what} dim {axis}")) && *g == got && *x == expected),
                &[
                    &format!("{what} dim {axis}"),
                    &format!("is {got}"),
                    &format!("expected {expected}"),
                ],
            );
        }
    }
}

/// Problems the device cannot run, on a device whose limits are capped to make them tiny.
#[test]
fn too_large_for_the_device() {
    let Some(full) = common::gpu() else { return };
    let gpu = full.with_caps(LimitCaps {
        max_storage_binding: Some(256),
        ..LimitCaps::default()
    });
    assert_eq!(gpu.limits().max_storage_binding, 256);
    // The three-pass path materialises rows of scores; the fused path never does.
    let opts = Attention::new().path(wgpu_attention::Path::ThreePass);

    // One row of scores (kv_len * 4 bytes) does not fit a binding: no chunking can help.
    let dims = Dims {
        batch: 1,
        heads: 1,
        kv_heads: 1,
        q_len: 1,
        kv_len: 65,
        head_dim: 1,
        v_head_dim: 1,
    };
    let pred = |e: &Error| {
        matches!(
            e,
            Error::TooLarge {
                what: "one row of scores",
                requested: 260,
                max: 256,
                ..
            }
        )
    };
    let needles = ["one row of scores", "260", "256", "kv_len"];
    expect_err("plan, kv_len 65", opts.plan(&gpu, dims), pred, &needles);
    let (q, k, v) = upload_qkv(&gpu, dims, Layout::Bhsd);
    expect_err("run, kv_len 65", opts.run(&gpu, &q, &k, &v), pred, &needles);
    // The same problem runs on the uncapped device, and at kv_len 64 on the capped one.
    opts.run(full, &q, &k, &v).unwrap();
    let dims64 = Dims { kv_len: 64, ..dims };
    let (q, k, v) = upload_qkv(&gpu, dims64, Layout::Bhsd);
    opts.run(&gpu, &q, &k, &v).unwrap();

    // Q (8 x 16 f32 = 512 bytes) is larger than one binding; K, V and the scores fit.
    let dims = Dims {
        batch: 1,
        heads: 1,
        kv_heads: 1,
        q_len: 8,
        kv_len: 4,
        head_dim: 16,
        v_head_dim: 4,
    };
    let (q, k, v) = upload_qkv(&gpu, dims, Layout::Bhsd);
    expect_err(
        "run, Q of 512 bytes",
        opts.run(&gpu, &q, &k, &v),
        |e| {
            matches!(
                e,
                Error::TooLarge {
                    what: "Q",
                    requested: 512,
                    max: 256,
                    ..
                }
            )
        },
        &["Q needs 512", "256", "max_storage_buffer_binding_size"],
    );
    opts.run(full, &q, &k, &v).unwrap();

    // A full bias (8 x 16 f32 = 512 bytes) larger than one binding, everything else fitting.
    let dims = Dims {
        batch: 1,
        heads: 1,
        kv_heads: 1,
        q_len: 8,
        kv_len: 16,
        head_dim: 4,
        v_head_dim: 4,
    };
    let (q, k, v) = upload_qkv(&gpu, dims, Layout::Bhsd);
    let biased = Attention::new().bias(dims.score_shape(), vec![0.5; 128]);
    expect_err(
        "run, bias of 512 bytes",
        biased.run(&gpu, &q, &k, &v),
        |e| {
            matches!(
                e,
                Error::TooLarge {
                    what: "bias",
                    requested: 512,
                    max: 256,
                    ..
                }
            )
        },
        &["bias needs 512", "256"],
    );
    biased.run(full, &q, &k, &v).unwrap();

    // One query row needs more workgroups than a capped device can dispatch.
    let gpu = full.with_caps(LimitCaps {
        max_workgroups_per_dim: Some(1),
        ..LimitCaps::default()
    });
    let dims = Dims {
        batch: 1,
        heads: 1,
        kv_heads: 1,
        q_len: 2,
        kv_len: 65,
        head_dim: 1,
        v_head_dim: 1,
    };
    let (q, k, v) = upload_qkv(&gpu, dims, Layout::Bhsd);
    expect_err(
        "run, kv_len 65 with 1 workgroup per dimension",
        opts.run(&gpu, &q, &k, &v),
        |e| {
            matches!(
                e,
                Error::TooLarge {
                    what: "one query row",
                    requested: 2,
                    max: 1,
                    ..
                }
            )
        },
        &["one query row", "workgroups"],
    );

    // A tensor larger than the device's largest buffer is refused before allocating.
    let max = full.limits().max_buffer_size;
    let elems = (max / 4 + 1) as usize;
    expect_err(
        "empty tensor above max_buffer_size",
        full.empty([1, 1, 1, elems]),
        |e| matches!(e, Error::TooLarge { what: "tensor", requested, max: m, .. } if *requested > max && *m == max),
        &["tensor", &max.to_string(), "max_buffer_size"],
    );
}

/// An output aliasing an input of the same dispatch, or a destroyed buffer, is refused by
/// wgpu's validation:
/// it must come back as `Error::Gpu`, not panic in wgpu's uncaptured-error handler.
#[test]
fn gpu_validation_errors_are_returned() {
    let Some(gpu) = common::gpu() else { return };
    let dims = Dims::new(1, 1, 4, 4);
    let (q, k, v) = upload_qkv(gpu, dims, Layout::Bhsd);
    // P V reads V and writes O in one dispatch: one buffer cannot be both (a usage conflict).
    let out = Output {
        o: v.clone(),
        lse: None,
        weights: None,
    };
    expect_err(
        "O aliasing V",
        Attention::new().run_into(gpu, &q, &k, &v, &out),
        |e| matches!(e, Error::Gpu(_)),
        &["GPU error"],
    );
    let (q, k, v) = upload_qkv(gpu, dims, Layout::Bhsd);
    v.buffer().destroy();
    expect_err(
        "destroyed V",
        Attention::new().run(gpu, &q, &k, &v),
        |e| matches!(e, Error::Gpu(_)),
        &["GPU error"],
    );
    // The device is still usable afterwards.
    let (q, k, v) = upload_qkv(gpu, dims, Layout::Bhsd);
    let o = Attention::new()
        .run(gpu, &q, &k, &v)
        .unwrap()
        .o
        .download(gpu)
        .unwrap();
    assert!(o.iter().all(|x| x.is_finite()));
}

/// `matmul` and `cpu::merge` with sizes whose products overflow: typed errors, not a wrapped
/// offset that runs a smaller product, nor a panic.
#[test]
fn matmul_and_merge_sizes_that_overflow() {
    let huge = cpu::merge(
        (&[], &[]),
        (&[], &[]),
        [1 << 32, 1 << 32, 1, 1],
        Layout::Bhsd,
    );
    assert!(
        matches!(huge, Err(Error::TooLarge { .. })),
        "cpu::merge: {huge:?}"
    );
    let Some(gpu) = common::gpu() else { return };
    use wgpu_attention::gpu::{MatView, MatmulShape, matmul};
    let t = gpu.upload(&[0.5; 16], [1, 1, 1, 16]).unwrap();
    let view = |strides| MatView {
        tensor: &t,
        strides,
    };
    for (what, shape, a_strides) in [
        ("m = 2^63 + 1", (1usize << 63) + 1, 8usize),
        ("k = 2^32 + 8", 1, (1 << 32) + 8),
    ] {
        let (m, k) = if a_strides == 8 {
            (shape, 8)
        } else {
            (1, a_strides)
        };
        let shape = MatmulShape {
            m,
            n: 2,
            k,
            batches: 1,
            alpha: 1.0,
        };
        let result = matmul(
            gpu,
            shape,
            view([0, 2, 1]),
            view([0, 8, 0]),
            view([0, 2, 1]),
            None,
        );
        assert!(
            matches!(
                result,
                Err(Error::TooLarge { .. } | Error::BufferTooSmall { .. })
            ),
            "{what}: {result:?}"
        );
    }
}
