//! Additive (Bahdanau) attention, `s_ij = sum_d w_d * tanh(q_id + k_jd)`, on the three-pass path
//! against the f64 reference: O, the weights and the log-sum-exp element by element, every
//! output poisoned with NaN first; plus the path choice and the validation errors.

#[macro_use]
mod common;

use wgpu_attention::{Error, LimitCaps, Output, Path, Plan};

// The whole grid and the property tests of every path, with additive scores: each case gets
// weights drawn from its dims.
path_grid_tests!(
    Path::ThreePass,
    |opts: wgpu_attention::Attention, d: wgpu_attention::Dims| { opts.additive(weights(d, 0xadd)) }
);

/// Random additive weights in `[-1, 1)`, one per dim of Q and K.
fn weights(dims: Dims, seed: u64) -> Vec<f32> {
    random(&mut rng(seed), dims.head_dim, 1.0)
}

/// The scale does not apply to additive scores: the reference ignores it, and so does the GPU.
#[test]
fn scale_is_not_applied() {
    let d = dims(1, 2, 1, 7, 33, 8, 8);
    let w = weights(d, 1);
    let mut r = rng(2);
    let (q, k, v) = (
        random(&mut r, d.q_elems(), 1.0),
        random(&mut r, d.k_elems(), 1.0),
        random(&mut r, d.v_elems(), 1.0),
    );
    let plain = cpu::reference(&q, &k, &v, d, &Attention::new().additive(w.clone())).unwrap();
    let scaled = cpu::reference(
        &q,
        &k,
        &v,
        d,
        &Attention::new().additive(w.clone()).scale(9.0),
    )
    .unwrap();
    assert_eq!(plain, scaled);
    let Some(gpu) = gpu() else { return };
    check(
        gpu,
        Path::ThreePass,
        d,
        &Attention::new().additive(w).scale(9.0),
        3,
        1.0,
    );
}

/// Chunked over (batch, head) and query rows, and with the dispatch spilled into y and z.
#[test]
fn chunked_and_spilled() {
    let Some(gpu) = gpu() else { return };
    let d = dims(2, 2, 1, 100, 257, 2, 3);
    let rows9 = gpu.with_caps(LimitCaps {
        max_storage_binding: Some(9300),
        ..Default::default()
    });
    let opts = Attention::new()
        .causal(Causal::TopLeft)
        .additive(weights(d, 900));
    let Plan::ThreePass { plan, .. } = opts.clone().path(Path::ThreePass).plan(&rows9, d).unwrap()
    else {
        unreachable!()
    };
    assert!(plan.chunks.len() > 1, "{plan:?}");
    check(&rows9, Path::ThreePass, d, &opts, 901, 1.0);
    let d = dims(2, 4, 2, 100, 130, 40, 72);
    let spill = gpu.with_caps(LimitCaps {
        max_workgroups_per_dim: Some(5),
        ..Default::default()
    });
    let opts = Attention::new()
        .layout(Layout::Bshd)
        .additive(weights(d, 902));
    check(&spill, Path::ThreePass, d, &opts, 903, 1.0);
}

/// `Path::Auto` runs additive scores on the three-pass path, and says why, even where it would
/// otherwise choose the fused or decode path.
#[test]
fn auto_chooses_three_pass() {
    let Some(gpu) = gpu() else { return };
    for d in [
        dims(1, 2, 2, 33, 100, 40, 24),
        dims(1, 8, 2, 1, 2048, 64, 64),
    ] {
        let opts = Attention::new().additive(weights(d, 1200));
        let plan = opts.plan(gpu, d).unwrap();
        let Plan::ThreePass { why, .. } = &plan else {
            panic!("{d:?}: expected three-pass, got {}", plan.reason())
        };
        assert_eq!(*why, "additive scores need the three-pass path");
        assert!(
            plan.reason().contains("additive scores"),
            "{}",
            plan.reason()
        );
        // The same options without additive scores do not choose three-pass.
        assert_ne!(Attention::new().plan(gpu, d).unwrap().name(), "three-pass");
        check(gpu, Path::Auto, d, &opts, 1201, 1.0);
    }
}

fn expect_err(what: &str, got: Result<impl std::fmt::Debug, Error>, ok: impl Fn(&Error) -> bool) {
    match got {
        Err(e) if ok(&e) => {}
        other => panic!("{what}: unexpected {other:?}"),
    }
}

/// Wrong weight length, non-finite weights, and a forced fused or decode path are typed errors
/// on the CPU and on the GPU alike.
#[test]
fn validation_errors() {
    let d = dims(1, 2, 1, 3, 5, 4, 6);
    let (q, k, v) = (
        vec![0.5f32; d.q_elems()],
        vec![0.25f32; d.k_elems()],
        vec![1f32; d.v_elems()],
    );
    type Expect = fn(&Error) -> bool;
    let cases: Vec<(Attention, Expect)> = vec![
        (Attention::new().additive(vec![1.0; 3]), |e| {
            matches!(
                e,
                Error::DataLength {
                    what: "additive weights",
                    expected: 4,
                    got: 3,
                    ..
                }
            )
        }),
        (Attention::new().additive(vec![]), |e| {
            matches!(
                e,
                Error::DataLength {
                    what: "additive weights",
                    got: 0,
                    ..
                }
            )
        }),
        (
            Attention::new().additive(vec![1.0, f32::NAN, 0.0, 0.0]),
            |e| {
                matches!(
                    e,
                    Error::InvalidOption {
                        what: "additive weights",
                        ..
                    }
                )
            },
        ),
        (
            Attention::new().additive(vec![1.0, 0.0, f32::INFINITY, 0.0]),
            |e| matches!(e, Error::InvalidOption { what: "additive weights", value, .. } if value.contains("index 2")),
        ),
        (
            Attention::new().additive(vec![1.0; 4]).path(Path::Fused),
            |e| matches!(e, Error::InvalidOption { what: "path", why, .. } if why.contains("additive")),
        ),
        (
            Attention::new().additive(vec![1.0; 4]).path(Path::Decode),
            |e| matches!(e, Error::InvalidOption { what: "path", why, .. } if why.contains("additive")),
        ),
    ];
    for (opts, ok) in &cases {
        expect_err("validate", opts.validate(d).map(|_| ()), ok);
        expect_err("cpu::reference", cpu::reference(&q, &k, &v, d, opts), ok);
    }
    // The fast CPU path computes dot products only: it refuses additive scores.
    expect_err(
        "cpu::fast",
        cpu::fast(&q, &k, &v, d, &Attention::new().additive(vec![1.0; 4])),
        |e| {
            matches!(
                e,
                Error::InvalidOption {
                    what: "additive",
                    ..
                }
            )
        },
    );
    let Some(gpu) = gpu() else { return };
    let up = |x: &[f32], s| gpu.upload(x, s).unwrap();
    let (tq, tk, tv) = (
        up(&q, d.q_shape(Layout::Bhsd)),
        up(&k, d.k_shape(Layout::Bhsd)),
        up(&v, d.v_shape(Layout::Bhsd)),
    );
    for (opts, ok) in &cases {
        expect_err("plan", opts.plan(gpu, d), ok);
        expect_err("run", opts.run(gpu, &tq, &tk, &tv).map(|o| o.o.dims()), ok);
    }
}

/// The measured error of additive scores on this adapter, printed (run with `--nocapture`):
/// tanh itself (with `kv_len == 1` the log-sum-exp of a row is its one score, so head_dim 1
/// and `w = [1]` read `tanh(q + k)` back), and O, the log-sum-exp and the weights at head_dim
/// 128. The bounds asserted are the f32 contract of `check`.
#[test]
fn measured_errors() {
    let Some(gpu) = gpu() else { return };
    // tanh over [-12, 12]: 4096 queries against one key of 0.
    let q: Vec<f32> = (0..4096)
        .map(|i| -12.0 + 24.0 * i as f32 / 4095.0)
        .collect();
    let opts = Attention::new().additive(vec![1.0]).return_lse(true);
    let shape = [1, 1, 4096, 1];
    let out = opts
        .run(
            gpu,
            &gpu.upload(&q, shape).unwrap(),
            &gpu.upload(&[0.0], [1, 1, 1, 1]).unwrap(),
            &gpu.upload(&[1.0], [1, 1, 1, 1]).unwrap(),
        )
        .unwrap();
    let lse = out.lse.unwrap().download(gpu).unwrap();
    let (mut abs, mut rel) = (0f64, 0f64);
    for (&x, &got) in q.iter().zip(&lse) {
        let want = (x as f64).tanh();
        abs = abs.max((got as f64 - want).abs());
        if want != 0.0 {
            rel = rel.max(((got as f64 - want) / want).abs());
        }
    }
    eprintln!("tanh on [-12, 12]: max abs error {abs:.3e}, max rel error {rel:.3e}");
    assert!(abs <= 2e-6, "tanh max abs error {abs:e}");

    for (amp, seed) in [(1.0, 1300), (3.0, 1301), (30.0, 1302)] {
        let d = dims(2, 4, 2, 257, 257, 128, 64);
        let mut r = rng(seed);
        let (q, k, v) = (
            random(&mut r, d.q_elems(), amp),
            random(&mut r, d.k_elems(), 1.0),
            random(&mut r, d.v_elems(), 1.0),
        );
        let opts = Attention::new()
            .additive(random(&mut r, d.head_dim, 1.0))
            .path(Path::ThreePass);
        let want = cpu::reference(&q, &k, &v, d, &opts).unwrap();
        let out = Output {
            o: common::poisoned(gpu, d.o_shape(Layout::Bhsd)),
            lse: Some(common::poisoned(gpu, [d.batch, d.heads, d.q_len, 1])),
            weights: Some(common::poisoned(gpu, d.score_shape())),
        };
        let up = |x: &[f32], s| gpu.upload(x, s).unwrap();
        opts.run_into(
            gpu,
            &up(&q, d.q_shape(Layout::Bhsd)),
            &up(&k, d.k_shape(Layout::Bhsd)),
            &up(&v, d.v_shape(Layout::Bhsd)),
            &out,
        )
        .unwrap();
        let o = out.o.download(gpu).unwrap();
        let lse = out.lse.unwrap().download(gpu).unwrap();
        let w = out.weights.unwrap().download(gpu).unwrap();
        let max_abs = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max)
        };
        let norm = common::rel_norm_error(&o, &want.o);
        eprintln!(
            "head_dim 128, |q| < {amp}: O rel norm error {norm:.3e}, max |dO| {:.3e}, max |dlse| \
             {:.3e}, max |dP| {:.3e}",
            max_abs(&o, &want.o),
            max_abs(&lse, &want.lse),
            max_abs(&w, &want.weights),
        );
        assert!(norm <= common::NORM_TOL, "O relative norm error {norm:e}");
    }
}
