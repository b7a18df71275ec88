//! criterion benches of each attention path, waiting for the GPU inside the timed region.
//!
//! `WGPU_ATTENTION_BENCH_SMOKE=1` shrinks every size so CI can run them once as a smoke test
//! (`cargo bench --bench attention -- --test`).

use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use wgpu_attention::{Attention, Causal, Dims, Gpu, Layout, Output, cpu};

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

fn three_pass(c: &mut Criterion) {
    let gpu = match Gpu::new() {
        Ok(gpu) => gpu,
        Err(e) => {
            eprintln!("three_pass bench skipped: {e}");
            return;
        }
    };
    let mut group = c.benchmark_group(format!("gpu-three-pass ({})", gpu.describe()));
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(if smoke() { 1 } else { 5 }));
    for seq in sizes() {
        let d = Dims::new(1, 8, seq, 64);
        let opts = Attention::new().causal(Causal::TopLeft);
        let layout = Layout::Bhsd;
        let q = gpu.upload(&values(d.q_elems()), d.q_shape(layout)).unwrap();
        let out = Output {
            o: gpu.empty(d.o_shape(layout)).unwrap(),
            lse: None,
            weights: None,
        };
        group.throughput(Throughput::Elements(d.flops(true) as u64));
        group.bench_function(format!("L=S={seq} causal"), |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    opts.run_into(&gpu, &q, &q, &q, &out).unwrap();
                    gpu.wait().unwrap();
                }
                start.elapsed()
            })
        });
    }
    group.finish();
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

fn main() {
    let mut c = Criterion::default().configure_from_args();
    three_pass(&mut c);
    cpu_reference(&mut c);
    c.final_summary();
}
