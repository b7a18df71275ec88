//! criterion benches of each attention path, waiting for the GPU inside the timed region,
//! with the throughput in FLOPs (DESIGN.md's convention).
//!
//! `WGPU_ATTENTION_BENCH_SMOKE=1` shrinks every size so CI can run them once as a smoke test
//! (`cargo bench --bench attention -- --test`).

use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use wgpu_attention::{Attention, Causal, Dims, Gpu, Layout, Output, Path, cpu};

fn values(n: usize) -> Vec<f32> {
    (0..n).map(|i| ((i as f32) * 0.618).sin()).collect()
}

fn smoke() -> bool {
    std::env::var("WGPU_ATTENTION_BENCH_SMOKE").is_ok_and(|v| v != "0")
}

fn sizes() -> Vec<usize> {
    if smoke() {
        vec![32]
    } else {
        vec![128, 256, 512]
    }
}

/// One group per GPU path, on the same shapes; the GPU is waited for inside the timed region.
fn gpu_paths(c: &mut Criterion) {
    let gpu = match Gpu::new() {
        Ok(gpu) => gpu,
        Err(e) => {
            eprintln!("GPU benches skipped: {e}");
            return;
        }
    };
    for (name, path) in [
        ("gpu-three-pass", Path::ThreePass),
        ("gpu-fused", Path::Fused),
        ("gpu-decode", Path::Decode),
    ] {
        let mut group = c.benchmark_group(format!("{name} ({})", gpu.describe()));
        group
            .sample_size(10)
            .measurement_time(Duration::from_secs(if smoke() { 1 } else { 5 }));
        let shapes: Vec<(usize, usize)> = if path == Path::Decode {
            // A few queries over a long cache.
            sizes().into_iter().map(|s| (1, 16 * s)).collect()
        } else {
            sizes().into_iter().map(|s| (s, s)).collect()
        };
        for (q_len, kv_len) in shapes {
            let d = Dims {
                q_len,
                kv_len,
                ..Dims::new(1, 8, q_len, 64)
            };
            let opts = Attention::new().causal(Causal::BottomRight).path(path);
            let layout = Layout::Bhsd;
            let q = gpu.upload(&values(d.q_elems()), d.q_shape(layout)).unwrap();
            let k = gpu.upload(&values(d.k_elems()), d.k_shape(layout)).unwrap();
            let out = Output {
                o: gpu.empty(d.o_shape(layout)).unwrap(),
                lse: None,
                weights: None,
            };
            group.throughput(Throughput::Elements(d.flops(true) as u64));
            group.bench_function(format!("L={q_len} S={kv_len} causal"), |b| {
                b.iter_custom(|iters| {
                    let start = Instant::now();
                    for _ in 0..iters {
                        opts.run_into(&gpu, &q, &k, &k, &out).unwrap();
                        gpu.wait().unwrap();
                    }
                    start.elapsed()
                })
            });
        }
        group.finish();
    }
}

fn cpu_reference(c: &mut Criterion) {
    let mut group = c.benchmark_group("cpu-reference");
    group.sample_size(10);
    let seq = if smoke() { 16 } else { 128 };
    let d = Dims::new(1, 8, seq, 64);
    let x = values(d.q_elems());
    group.throughput(Throughput::Elements(d.flops(false) as u64));
    group.bench_function(format!("L=S={seq}"), |b| {
        b.iter(|| cpu::reference(&x, &x, &x, d, &Attention::new()).unwrap())
    });
    group.finish();
}

/// The multi-threaded CPU path, the honest baseline.
fn cpu_fast(c: &mut Criterion) {
    let mut group = c.benchmark_group("cpu-fast");
    group.sample_size(10);
    for seq in sizes() {
        let d = Dims::new(1, 8, seq, 64);
        let x = values(d.q_elems());
        let opts = Attention::new().causal(Causal::TopLeft);
        group.throughput(Throughput::Elements(d.flops(true) as u64));
        group.bench_function(format!("L=S={seq} causal"), |b| {
            b.iter(|| cpu::fast(&x, &x, &x, d, &opts).unwrap())
        });
    }
    group.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    gpu_paths(&mut c);
    cpu_fast(&mut c);
    cpu_reference(&mut c);
    c.final_summary();
}
