//! Attention on the GPU, checked against the CPU reference.
//!
//! `cargo run --release --example quickstart`

use wgpu_attention::{Attention, Causal, Dims, Gpu, cpu};

fn main() -> Result<(), wgpu_attention::Error> {
    let gpu = Gpu::new()?;
    println!("adapter: {}", gpu.describe());
    // Batch 2, 8 query heads sharing 2 kv heads, 100 queries over 300 keys, head_dim 64.
    let dims = Dims {
        batch: 2,
        heads: 8,
        kv_heads: 2,
        q_len: 100,
        kv_len: 300,
        head_dim: 64,
        v_head_dim: 64,
    };
    let wave = |n: usize, f: f32| -> Vec<f32> { (0..n).map(|i| (i as f32 * f).sin()).collect() };
    let (q, k, v) = (
        wave(dims.q_elems(), 0.37),
        wave(dims.k_elems(), 0.11),
        wave(dims.v_elems(), 0.05),
    );

    let opts = Attention::new()
        .causal(Causal::BottomRight)
        .window(128, 0)
        .return_lse(true);
    let layout = opts.get_layout();
    println!("plan: {}", opts.plan(&gpu, dims)?.reason());
    let out = opts.run(
        &gpu,
        &gpu.upload(&q, dims.q_shape(layout))?,
        &gpu.upload(&k, dims.k_shape(layout))?,
        &gpu.upload(&v, dims.v_shape(layout))?,
    )?;
    let o = out.o.download(&gpu)?;

    let want = cpu::reference(&q, &k, &v, dims, &opts)?;
    let worst = o
        .iter()
        .zip(&want.o)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    println!(
        "O: {} values, max |GPU - f64 reference| = {worst:.2e}",
        o.len()
    );
    assert!(worst < 1e-5);
    Ok(())
}
