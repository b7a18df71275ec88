//! Faults a real program meets, through the public API only: a device destroyed under the crate
//! (every later call is `Error::DeviceLost`, none panics, `wait` included), and tensors passed
//! to a `Gpu` of another device (`Error::WrongDevice`, never another tensor's data).
//!
//! Each test opens devices of its own (a destroyed device cannot be shared), on the adapter
//! `common::gpu()` found.

mod common;

use wgpu_attention::gpu::{MatView, MatmulShape, Partial};
use wgpu_attention::{
    Attention, Error, Gpu, KvCache, Layout, MhaConfig, MhaWeights, MultiHeadAttention, Path, Tensor,
};

/// A second device on the suite's adapter, or `None` (skipped) where the suite skips.
fn fresh_gpu() -> Option<Gpu> {
    common::gpu()?;
    Some(Gpu::new().expect("the adapter the suite found opens again"))
}

fn qkv(gpu: &Gpu, seed: u64) -> (Vec<f32>, Tensor) {
    let dims = [1, 2, 5, 8];
    let data = common::random(&mut common::rng(seed), 80, 1.0);
    let t = gpu.upload(&data, dims).unwrap();
    (data, t)
}

fn weights(config: &MhaConfig) -> MhaWeights {
    let e = config.embed_dim;
    let mut r = common::rng(3);
    let mut w = || common::random(&mut r, e * e, 0.3);
    MhaWeights::new(w(), w(), w(), w())
}

fn lost<T: std::fmt::Debug>(what: &str, result: wgpu_attention::Result<T>) {
    match result {
        Err(Error::DeviceLost { reason }) => assert!(!reason.is_empty(), "{what}: empty reason"),
        other => panic!("{what} on a destroyed device: expected DeviceLost, got {other:?}"),
    }
}

#[test]
fn a_destroyed_device_fails_every_call_with_device_lost() {
    let Some(gpu) = fresh_gpu() else { return };
    let (_, t) = qkv(&gpu, 1);
    let config = MhaConfig::new(8, 2);
    let layer = MultiHeadAttention::new(&gpu, config, &weights(&config)).unwrap();
    let mut cache = KvCache::new(&gpu, 1, 2, 16, 8, 8).unwrap();
    let x = gpu.upload(&[0.5; 24], [1, 3, 1, 8]).unwrap();
    let partial = Attention::new()
        .return_lse(true)
        .run(&gpu, &t, &t, &t)
        .unwrap();
    let heard = std::sync::Arc::new(std::sync::Mutex::new(None));
    let sink = heard.clone();
    gpu.on_device_lost(move |reason| *sink.lock().unwrap() = Some(reason.to_string()));
    assert!(!gpu.is_lost());

    gpu.device().destroy();

    lost("wait", gpu.wait());
    assert!(gpu.is_lost());
    assert!(
        heard.lock().unwrap().is_some(),
        "the application's hook heard of the loss"
    );
    lost("upload", gpu.upload(&[1.0; 80], [1, 2, 5, 8]));
    lost("empty", gpu.empty([1, 2, 5, 8]));
    lost("download", t.download(&gpu));
    lost("write", t.write(&gpu, &[1.0; 80]));
    for path in [Path::Auto, Path::ThreePass, Path::Fused, Path::Decode] {
        lost(
            &format!("run on {path:?}"),
            Attention::new().path(path).run(&gpu, &t, &t, &t),
        );
    }
    lost(
        "merge",
        wgpu_attention::gpu::merge(
            &gpu,
            partial.as_partial().unwrap(),
            Partial {
                o: &partial.o,
                lse: partial.lse.as_ref().unwrap(),
            },
            Layout::Bhsd,
        ),
    );
    lost("cache new", KvCache::new(&gpu, 1, 2, 16, 8, 8));
    lost(
        "cache append",
        cache.append(&gpu, &[0.5; 16], &[0.5; 16], &[1]),
    );
    let q = t.clone();
    lost("cache attend", cache.attend(&gpu, &q, &Attention::new()));
    lost(
        "layer new",
        MultiHeadAttention::new(&gpu, config, &weights(&config)),
    );
    lost(
        "layer forward",
        layer.forward(&gpu, &x, &x, &x, &Attention::new()),
    );
    let view = MatView::contiguous(&t, 10, 8);
    let shape = MatmulShape {
        m: 10,
        n: 10,
        k: 8,
        batches: 1,
        alpha: 1.0,
    };
    lost(
        "matmul",
        wgpu_attention::gpu::matmul(&gpu, shape, view, view, view, None),
    );
    // Derived contexts share the loss.
    lost("a derived context", gpu.with_packed_f16().wait());
    lost("a second wait", gpu.wait());
}

/// A device destroyed between two calls with no wait in between: the next call still reports
/// the loss (wgpu reports it from the poll that call makes).
#[test]
fn a_loss_is_seen_by_the_next_call_without_a_wait() {
    let Some(gpu) = fresh_gpu() else { return };
    let (_, t) = qkv(&gpu, 2);
    gpu.device().destroy();
    lost(
        "run right after destroy",
        Attention::new().run(&gpu, &t, &t, &t),
    );
}

/// A device destroyed while work is in flight. Through `Gpu::destroy` every later call is
/// `DeviceLost` at once. Behind the crate's back (`device().destroy()`), wgpu reports the loss
/// only once the queue is empty: until then a call may still return `Ok` (its work is
/// dropped) or `DeviceLost`, never another error and never a panic; `wait` is `DeviceLost`.
#[test]
fn a_device_destroyed_with_work_in_flight() {
    for through_the_crate in [true, false] {
        let Some(gpu) = fresh_gpu() else { return };
        let data = common::random(&mut common::rng(6), 8 * 2048 * 64, 1.0);
        let big = gpu.upload(&data, [1, 8, 2048, 64]).unwrap();
        let _o = Attention::new()
            .path(Path::Fused)
            .run(&gpu, &big, &big, &big)
            .unwrap();
        if through_the_crate {
            gpu.destroy();
        } else {
            gpu.device().destroy();
        }
        let calls: [(&str, wgpu_attention::Result<()>); 5] = [
            ("empty", gpu.empty([1, 2, 5, 8]).map(drop)),
            ("upload", gpu.upload(&[1.0; 80], [1, 2, 5, 8]).map(drop)),
            ("write", big.write(&gpu, &data)),
            (
                "run",
                Attention::new().run(&gpu, &big, &big, &big).map(drop),
            ),
            ("download", big.download(&gpu).map(drop)),
        ];
        for (what, result) in calls {
            match result {
                Err(Error::DeviceLost { .. }) => {}
                Ok(()) if !through_the_crate => {}
                other => panic!(
                    "{what} after destroy (through the crate: {through_the_crate}): {other:?}"
                ),
            }
        }
        lost("wait", gpu.wait());
        assert!(gpu.is_lost());
        lost(
            "run after wait",
            Attention::new().run(&gpu, &big, &big, &big),
        );
    }
}

fn wrong<T: std::fmt::Debug>(what: &str, result: wgpu_attention::Result<T>) {
    match result {
        Err(e @ Error::WrongDevice { .. }) => {
            assert!(e.to_string().contains("another device"), "{what}: {e}")
        }
        other => panic!("{what}: expected WrongDevice, got {other:?}"),
    }
}

#[test]
fn tensors_of_another_device_are_refused() {
    let Some(a) = fresh_gpu() else { return };
    let b = Gpu::new().unwrap();
    let (x, ta) = qkv(&a, 4);
    let (y, tb) = qkv(&b, 5);
    // Each device's first buffer: the ids wgpu gives them are the same in both instances.
    wrong("download", ta.download(&b));
    wrong("write", ta.write(&b, &[7.0; 80]));
    assert_eq!(tb.download(&b).unwrap(), y, "b's tensor is untouched");
    assert_eq!(ta.download(&a).unwrap(), x, "a's tensor is untouched");
    for path in [Path::Auto, Path::ThreePass, Path::Fused, Path::Decode] {
        wrong(
            &format!("run on {path:?}"),
            Attention::new().path(path).run(&b, &ta, &tb, &tb),
        );
        wrong(
            &format!("run on {path:?} with V from a"),
            Attention::new().path(path).run(&b, &tb, &tb, &ta),
        );
    }
    let out = Attention::new().run(&a, &ta, &ta, &ta).unwrap();
    wrong(
        "run_into an output of a",
        Attention::new().run_into(&b, &tb, &tb, &tb, &out),
    );
    let pa = Attention::new()
        .return_lse(true)
        .run(&a, &ta, &ta, &ta)
        .unwrap();
    let pb = Attention::new()
        .return_lse(true)
        .run(&b, &tb, &tb, &tb)
        .unwrap();
    wrong(
        "merge",
        wgpu_attention::gpu::merge(
            &b,
            pa.as_partial().unwrap(),
            pb.as_partial().unwrap(),
            Layout::Bhsd,
        ),
    );
    let mut cache = KvCache::new(&a, 1, 2, 16, 8, 8).unwrap();
    wrong(
        "cache append on b",
        cache.append(&b, &[0.5; 16], &[0.5; 16], &[1]),
    );
    cache.append(&a, &[0.5; 16], &[0.5; 16], &[1]).unwrap();
    let kb = b.upload(&[0.5; 16], [1, 2, 1, 8]).unwrap();
    wrong(
        "cache append_tensors",
        cache.append_tensors(&a, &kb, &kb, &[1]),
    );
    wrong(
        "cache attend on b",
        cache.attend(&b, &tb, &Attention::new()),
    );
    let config = MhaConfig::new(8, 2);
    let layer = MultiHeadAttention::new(&a, config, &weights(&config)).unwrap();
    let xb = b.upload(&[0.5; 24], [1, 3, 1, 8]).unwrap();
    let xa = a.upload(&[0.5; 24], [1, 3, 1, 8]).unwrap();
    wrong(
        "forward with b's input",
        layer.forward(&a, &xb, &xb, &xb, &Attention::new()),
    );
    wrong(
        "forward on b",
        layer.forward(&b, &xb, &xb, &xb, &Attention::new()),
    );
    layer.forward(&a, &xa, &xa, &xa, &Attention::new()).unwrap();
    // A derived context of the same device accepts the tensors of the one it came from.
    let derived = a.with_packed_f16();
    assert_eq!(ta.download(&derived).unwrap(), x);
}

/// A timing context read from one thread while another runs calls on it: every call still
/// runs (timestamps may belong to either call, as documented).
#[test]
fn a_timer_read_while_calls_run() {
    let Some(gpu) = fresh_gpu() else { return };
    let Some(timer) = gpu.with_timer().unwrap() else {
        eprintln!("no TIMESTAMP_QUERY: nothing to check");
        return;
    };
    let (_, t) = qkv(&timer, 8);
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                timer.last_gpu_seconds().unwrap();
            }
        });
        for i in 0..60 {
            let run = Attention::new().run(&timer, &t, &t, &t);
            assert!(run.is_ok(), "call {i}: {run:?}");
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
}

/// The timer's figure is the last call's: none before any call, none after a call with no
/// compute pass (it used to repeat the previous call's), a figure after one with passes.
#[test]
fn timer_figures_belong_to_the_last_call() {
    let Some(gpu) = fresh_gpu() else { return };
    let Some(timer) = gpu.with_timer().unwrap() else {
        eprintln!("no TIMESTAMP_QUERY: nothing to check");
        return;
    };
    assert_eq!(timer.last_gpu_seconds().unwrap(), None, "before any call");
    let (_, t) = qkv(&timer, 9);
    Attention::new().run(&timer, &t, &t, &t).unwrap();
    let after_run = timer.last_gpu_seconds().unwrap();
    assert!(after_run.is_some_and(|s| s >= 0.0), "{after_run:?}");
    let mut cache = KvCache::new(&timer, 1, 2, 16, 8, 8).unwrap();
    let kv = timer.upload(&[0.5; 16], [1, 2, 1, 8]).unwrap();
    cache.append_tensors(&timer, &kv, &kv, &[1]).unwrap();
    assert_eq!(
        timer.last_gpu_seconds().unwrap(),
        None,
        "after a copy-only call"
    );
}
