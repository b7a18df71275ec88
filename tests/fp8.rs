//! 8-bit float storage (`DType::F8E4M3`, OCP FP8 E4M3): tensors round-trip as the host rounds
//! them; K and V in 8 bits on every path (the reference runs on the same rounded values, so
//! only f32 accumulation separates them), in every load width the kernels use (K grouped by 8,
//! 4 or 1 elements, by the head dim); Q, K, V and O all 8-bit (the kernels' rounding on store
//! against the host's); scales for K and V past the 8-bit range. The 8-bit caches run in
//! `cache_and_merge.rs` and `paged.rs` beside the 16-bit ones.

#[macro_use]
mod common;

use common::*;
use wgpu_attention::{
    Attention, Causal, DType, Error, KvCache, LimitCaps, PagedKvCache, Path, cpu,
};

const F8: DType = DType::F8E4M3;

/// Uploads round to nearest even and saturate, downloads give the rounded values back bit for
/// bit, over an odd count (the last word partly padding) and values across the whole range.
#[test]
fn round_trip_as_the_host_rounds() {
    let Some(gpu) = gpu() else { return };
    let mut r = rng(1);
    let mut x = random(&mut r, 1001, 3.0);
    x.extend([
        448.0,
        -448.0,
        500.0,
        -1e9,
        1.0 / 512.0,
        1e-6,
        -0.0,
        0.0,
        300.0,
        -0.017,
    ]);
    let t = gpu.upload_as(&x, [1, 1, 1, x.len()], F8).unwrap();
    assert_eq!(t.dtype(), F8);
    let got = t.download(gpu).unwrap();
    let want: Vec<f32> = x.iter().map(|&v| F8.round(v)).collect();
    assert_eq!(
        got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        want.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );
    assert_eq!(F8.round(500.0), 448.0);
    assert_eq!(F8.round(1.0 + 1.0 / 16.0), 1.0); // a tie: to the even mantissa
    assert_eq!(F8.round(1.0 + 3.0 / 16.0), 1.25); // a tie: to the even mantissa
    assert_eq!(F8.size(), 1);
}

/// K and V in 8 bits against the reference on the same rounded values, on every path, with
/// head dims that give the kernels' grouped loads of 8, 4 and single elements.
#[test]
fn eight_bit_keys_and_values_on_every_path() {
    let Some(gpu) = gpu() else { return };
    let mut r = rng(2);
    let types = [DType::F32, F8, F8, DType::F32];
    for (n, d) in [64usize, 36, 19].into_iter().enumerate() {
        let prefill = dims(2, 4, 2, 37, 70, d, d + 4);
        let decode = dims(1, 8, 2, 1, 1100, d, d);
        let mask = random_mask(&mut r, 2 * 37 * 70, 0.8);
        let options = Attention::new()
            .causal(Causal::BottomRight)
            .kv_lens(vec![70, 45])
            .mask([2, 1, 37, 70], mask)
            .softcap(5.0);
        let seed = 10 * n as u64;
        for path in [Path::ThreePass, Path::Fused, Path::Decode, Path::Auto] {
            check_dtypes(gpu, path, prefill, &options, seed, 2.0, types);
        }
        for path in [Path::Fused, Path::Decode] {
            check_dtypes(gpu, path, decode, &Attention::new(), seed + 1, 2.0, types);
        }
        // 16-bit queries over the 8-bit cache.
        let half = [DType::F16, F8, F8, DType::F16];
        check_dtypes(
            gpu,
            Path::Decode,
            decode,
            &Attention::new(),
            seed + 2,
            2.0,
            half,
        );
    }
}

/// Everything in 8 bits, O included (the kernels round O as the host does, within a unit of
/// the last place), through the fused kernel's passes too (O kept in f32 between them).
#[test]
fn everything_in_eight_bits() {
    let Some(gpu) = gpu() else { return };
    let capped = gpu.with_caps(LimitCaps {
        max_key_tiles_per_workgroup: Some(1),
        ..Default::default()
    });
    let d = dims(1, 4, 2, 70, 150, 32, 24);
    let opts = Attention::new().causal(Causal::TopLeft);
    for g in [gpu, &capped] {
        for path in [Path::Fused, Path::Decode, Path::ThreePass] {
            check_dtypes(g, path, d, &opts, 30, 2.0, [F8; 4]);
        }
    }
}

/// 8-bit cache rows must be whole 4-byte words (the cache itself is tested with the 16-bit
/// ones, `cache_and_merge.rs`, `half_precision_cache_with_f32_queries`).
#[test]
fn eight_bit_cache_rows_are_whole_words() {
    let Some(gpu) = gpu() else { return };
    // 30 bytes a row: not whole words.
    let err = KvCache::with_dtype(gpu, 1, 1, 10, 30, 32, F8);
    assert!(matches!(err, Err(Error::InvalidOption { .. })), "{err:?}");
    // Paged: kv_heads * head_dim bytes a token row.
    let err = PagedKvCache::with_dtype(gpu, 8, 16, 1, 30, 32, F8);
    assert!(matches!(err, Err(Error::InvalidOption { .. })), "{err:?}");
    PagedKvCache::with_dtype(gpu, 8, 16, 2, 30, 32, F8).unwrap();
}

/// The kernels' rounding on store is the host's, bit for bit: attention over a single key
/// copies its V row into O exactly (its one weight is 1), so an 8-bit O holds V as the kernel
/// rounded it. V holds every midpoint between neighbouring codes (ties to even), points just
/// off them, subnormals, and values past the largest code (saturated), on every path.
#[test]
fn stores_round_as_the_host_does() {
    let Some(gpu) = gpu() else { return };
    let codes: Vec<f32> = (0..0x7fu8).map(decode).collect();
    let mut v = Vec::new();
    for w in codes.windows(2) {
        let (lo, hi) = (w[0], w[1]);
        let mid = (lo + hi) / 2.0;
        let off = (hi - lo) / 64.0;
        v.extend([mid, -mid, mid - off, mid + off, lo, -hi]);
    }
    v.extend([
        449.0,
        -470.0,
        1e6,
        1.0 / 1024.0,
        -1.0 / 1024.0,
        3.0 / 1024.0,
    ]);
    let (heads, width) = (8, 128);
    v.resize(heads * width, 0.3);
    let d = dims(1, heads, heads, 1, 1, 4, width);
    let layout = wgpu_attention::Layout::Bhsd;
    let q = gpu
        .upload(&vec![0.5; heads * 4], d.q_shape(layout))
        .unwrap();
    let k = gpu
        .upload(&vec![0.25; heads * 4], d.k_shape(layout))
        .unwrap();
    let tv = gpu.upload(&v, d.v_shape(layout)).unwrap();
    let want: Vec<u32> = v.iter().map(|&x| F8.round(x).to_bits()).collect();
    for path in [Path::Fused, Path::Decode, Path::ThreePass] {
        let out = wgpu_attention::Output {
            o: gpu
                .upload_as(&vec![f32::NAN; heads * width], d.o_shape(layout), F8)
                .unwrap(),
            lse: None,
            weights: None,
        };
        let opts = Attention::new().path(path);
        opts.run_into(gpu, &q, &k, &tv, &out).unwrap();
        let got: Vec<u32> = out
            .o
            .download(gpu)
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect();
        for (n, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                g,
                w,
                "{path:?}: V {} stored as {}, the host rounds it to {}",
                v[n],
                f32::from_bits(*g),
                f32::from_bits(*w)
            );
        }
    }
}

/// The value of E4M3 code `b` (positive, finite), from its fields.
fn decode(b: u8) -> f32 {
    let (e, m) = ((b >> 3) as i32, (b & 7) as f32);
    if e == 0 {
        m / 512.0
    } else {
        (1.0 + m / 8.0) * 2f32.powi(e - 7)
    }
}

/// K and V past the 8-bit range, stored divided by their scales and attended to with
/// `kv_scales`, against the reference on the values they stand for (no scales): every path,
/// a cache, and the CPU paths; bad scales are typed errors (a backward with a V scale:
/// `backward.rs`, `bad_input_is_a_typed_error`).
#[test]
fn scaled_keys_and_values() {
    let Some(gpu) = gpu() else { return };
    let (ks, vs) = (16.0f32, 8.0f32);
    let mut r = rng(50);
    let d = dims(1, 4, 2, 37, 70, 32, 24);
    let layout = wgpu_attention::Layout::Bhsd;
    let q = random(&mut r, d.q_elems(), 0.05);
    // Up to 2000: four times past 448.
    let k = random(&mut r, d.k_elems(), 2000.0);
    let v = random(&mut r, d.v_elems(), 2000.0);
    let stored = |x: &[f32], s: f32| -> Vec<f32> { x.iter().map(|&x| F8.round(x / s)).collect() };
    let (k8, v8) = (stored(&k, ks), stored(&v, vs));
    // What the stored values stand for, exactly (a power of two times an 8-bit value).
    let k_true: Vec<f32> = k8.iter().map(|x| x * ks).collect();
    let v_true: Vec<f32> = v8.iter().map(|x| x * vs).collect();
    let causal = Attention::new().causal(Causal::BottomRight);
    let want = cpu::reference(&q, &k_true, &v_true, d, &causal).unwrap();
    let scaled = causal.clone().kv_scales(ks, vs);
    let tq = gpu.upload(&q, d.q_shape(layout)).unwrap();
    let tk = gpu.upload_as(&k8, d.k_shape(layout), F8).unwrap();
    let tv = gpu.upload_as(&v8, d.v_shape(layout), F8).unwrap();
    for path in [Path::ThreePass, Path::Fused, Path::Decode] {
        let out = wgpu_attention::Output {
            o: poisoned(gpu, d.o_shape(layout)),
            lse: None,
            weights: None,
        };
        scaled
            .clone()
            .path(path)
            .run_into(gpu, &tq, &tk, &tv, &out)
            .unwrap();
        let o = out.o.download(gpu).unwrap();
        assert_close(&format!("{path:?} with kv_scales"), &o, &want.o, 1e-2, 1e-4);
    }
    let refd = cpu::reference(&q, &k8, &v8, d, &scaled).unwrap();
    assert_close("the reference with kv_scales", &refd.o, &want.o, 1e-2, 1e-4);
    let fast = cpu::fast(&q, &k8, &v8, d, &scaled).unwrap();
    assert_close("cpu::fast with kv_scales", &fast.o, &want.o, 1e-2, 1e-4);
    // An 8-bit cache of the scaled values, attended with the scales.
    let mut cache = KvCache::with_dtype(gpu, 1, 2, 100, 32, 24, F8).unwrap();
    cache.append(gpu, &k8, &v8, &[70]).unwrap();
    let o = cache
        .attend(gpu, &tq, &Attention::new().kv_scales(ks, vs))
        .unwrap()
        .o;
    assert_close(
        "cache with kv_scales",
        &o.download(gpu).unwrap(),
        &want.o,
        1e-2,
        1e-4,
    );
    // One query per head: the decode-shaped kernel.
    let d1 = dims(1, 4, 2, 1, 70, 32, 24);
    let q1 = random(&mut r, d1.q_elems(), 0.05);
    let want1 = cpu::reference(&q1, &k_true, &v_true, d1, &Attention::new()).unwrap();
    let tq1 = gpu.upload(&q1, d1.q_shape(layout)).unwrap();
    let o = cache
        .attend(gpu, &tq1, &Attention::new().kv_scales(ks, vs))
        .unwrap()
        .o;
    assert_close(
        "decoding with kv_scales",
        &o.download(gpu).unwrap(),
        &want1.o,
        1e-2,
        1e-4,
    );
    // Bad scales, and scales with additive scores.
    for (a, b) in [
        (0.0, 1.0),
        (1.0, -2.0),
        (f32::NAN, 1.0),
        (1.0, f32::INFINITY),
    ] {
        let e = cpu::reference(&q, &k8, &v8, d, &Attention::new().kv_scales(a, b)).unwrap_err();
        assert!(
            matches!(
                e,
                Error::InvalidOption {
                    what: "kv_scales",
                    ..
                }
            ),
            "{e}"
        );
    }
    let additive = Attention::new().additive(vec![0.1; 32]).kv_scales(2.0, 1.0);
    let e = cpu::reference(&q, &k8, &v8, d, &additive).unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidOption {
                what: "kv_scales",
                ..
            }
        ),
        "{e}"
    );
}
