//! The `async` twins of the blocking calls (what the browser awaits) on native: the same
//! values as the blocking calls, from several threads at once (a mapping callback may run on
//! another thread's poll), and `Error::DeviceLost` after a loss.

mod common;

use wgpu_attention::{Attention, Error, Gpu, Path};

#[test]
fn async_downloads_match_blocking_ones() {
    let Some(gpu) = common::gpu() else { return };
    let dims = common::dims(1, 4, 2, 9, 70, 16, 16);
    let mut r = common::rng(41);
    let q = common::random(&mut r, dims.q_elems(), 2.0);
    let k = common::random(&mut r, dims.k_elems(), 1.0);
    let v = common::random(&mut r, dims.v_elems(), 1.0);
    let up = |x: &[f32], s| gpu.upload(x, s).unwrap();
    let (tq, tk, tv) = (
        up(&q, dims.q_shape(Default::default())),
        up(&k, dims.k_shape(Default::default())),
        up(&v, dims.v_shape(Default::default())),
    );
    let opts = Attention::new().path(Path::Fused);
    let want = wgpu_attention::cpu::reference(&q, &k, &v, dims, &opts).unwrap();
    let out = opts.run(gpu, &tq, &tk, &tv).unwrap();
    let blocking = out.o.download(gpu).unwrap();
    let awaited = pollster::block_on(out.o.download_async(gpu)).unwrap();
    assert_eq!(blocking, awaited);
    common::assert_close("O", &awaited, &want.o, common::O_ATOL, common::O_RTOL);
    pollster::block_on(gpu.wait_async()).unwrap();
}

/// Eight threads, each uploading its own values and reading them back both ways, 400 times:
/// every readback is the thread's own data, whichever thread's poll ran its callback.
#[test]
fn downloads_from_many_threads() {
    let Some(gpu) = common::gpu() else { return };
    std::thread::scope(|s| {
        for thread in 0..8u32 {
            s.spawn(move || {
                for round in 0..400u32 {
                    // Distinct in every thread and round, and exact in f32 (< 2^24).
                    let data: Vec<f32> = (0..1000)
                        .map(|i| (thread * 1_000_000 + round * 1000 + i) as f32)
                        .collect();
                    let t = gpu.upload(&data, [1, 1, 10, 100]).unwrap();
                    let got = if round % 2 == 0 {
                        t.download(gpu).unwrap()
                    } else {
                        pollster::block_on(t.download_async(gpu)).unwrap()
                    };
                    assert_eq!(got, data, "thread {thread}, round {round}");
                }
            });
        }
    });
}

#[test]
fn async_calls_after_a_loss_are_device_lost() {
    if common::gpu().is_none() {
        return;
    }
    let gpu = Gpu::new().unwrap();
    let t = gpu.upload(&[1.0, 2.0, 3.0, 4.0], [1, 1, 2, 2]).unwrap();
    assert_eq!(
        pollster::block_on(t.download_async(&gpu)).unwrap(),
        [1.0, 2.0, 3.0, 4.0]
    );
    gpu.destroy();
    for (what, result) in [
        (
            "download_async",
            pollster::block_on(t.download_async(&gpu)).map(|_| ()),
        ),
        ("wait_async", pollster::block_on(gpu.wait_async())),
    ] {
        assert!(
            matches!(result, Err(Error::DeviceLost { .. })),
            "{what} after destroy: {result:?}"
        );
    }
}
