//! Keys split across devices (sequence parallelism for a long context): each device attends
//! the queries to its shard of the keys, the partial outputs and log-sum-exps move to one
//! device, and `gpu::merge` combines them, which equals attention over all the keys.
//!
//! This opens three devices with `Gpu::new()` (three devices on one adapter where there is one
//! adapter, as on a software driver); an engine with several GPUs opens one `Gpu` per adapter
//! (`Gpu::from_wgpu`) or per machine. The crate moves no data between devices itself: here the
//! partials go through the host, two small tensors per shard (`[batch, heads, q_len, dim]` and
//! `[batch, heads, q_len, 1]`), never the keys.
//!
//! `cargo run --release --example split_keys`

use wgpu_attention::gpu::{Partial, merge};
use wgpu_attention::{Attention, Causal, Dims, Gpu, Layout, Tensor, cpu};

fn main() -> Result<(), wgpu_attention::Error> {
    let devices: Vec<Gpu> = (0..3).map(|_| Gpu::new()).collect::<Result<_, _>>()?;
    println!("{} devices: {}", devices.len(), devices[0].describe());
    // One new token for each of 2 sequences, 8 query heads over 2 kv heads, 3000 cached keys
    // split 1100 / 900 / 1000.
    let (batch, heads, kv_heads, dim) = (2, 8, 2, 64);
    let shards = [1100usize, 900, 1000];
    let kv_len: usize = shards.iter().sum();
    let all = Dims {
        batch,
        heads,
        kv_heads,
        q_len: 1,
        kv_len,
        head_dim: dim,
        v_head_dim: dim,
    };
    let wave = |n: usize, f: f32| -> Vec<f32> { (0..n).map(|i| (i as f32 * f).sin()).collect() };
    let q = wave(all.q_elems(), 0.37);
    let k = wave(all.k_elems(), 0.011);
    let v = wave(all.v_elems(), 0.05);
    // Bhsd: the keys of shard s are rows start..start + n of every (batch, kv head).
    let shard_of = |x: &[f32], start: usize, n: usize| -> Vec<f32> {
        let mut out = Vec::with_capacity(batch * kv_heads * n * dim);
        for bh in 0..batch * kv_heads {
            let row = (bh * kv_len + start) * dim;
            out.extend_from_slice(&x[row..row + n * dim]);
        }
        out
    };
    // The new token sees every cached key: bottom-right causal masking is all of each shard.
    let opts = Attention::new()
        .causal(Causal::BottomRight)
        .return_lse(true);
    let layout = Layout::Bhsd;

    // Each device attends to its shard; the partials come back to the host.
    let mut partials = Vec::new();
    let mut start = 0;
    for (gpu, &n) in devices.iter().zip(&shards) {
        let d = Dims { kv_len: n, ..all };
        let out = opts.run(
            gpu,
            &gpu.upload(&q, d.q_shape(layout))?,
            &gpu.upload(&shard_of(&k, start, n), d.k_shape(layout))?,
            &gpu.upload(&shard_of(&v, start, n), d.v_shape(layout))?,
        )?;
        let lse = out.lse.as_ref().expect("asked for").download(gpu)?;
        partials.push((out.o.download(gpu)?, lse));
        start += n;
    }

    // On device 0: the partials merged pairwise (the merge is associative).
    let gpu = &devices[0];
    let up = |(o, lse): &(Vec<f32>, Vec<f32>)| -> Result<(Tensor, Tensor), wgpu_attention::Error> {
        Ok((
            gpu.upload(o, all.o_shape(layout))?,
            gpu.upload(lse, [batch, heads, 1, 1])?,
        ))
    };
    let (mut o, mut lse) = up(&partials[0])?;
    for p in &partials[1..] {
        let (po, plse) = up(p)?;
        let merged = merge(
            gpu,
            Partial { o: &o, lse: &lse },
            Partial { o: &po, lse: &plse },
            layout,
        )?;
        o = merged.o;
        lse = merged.lse.expect("merge writes the log-sum-exp");
    }
    let merged = o.download(gpu)?;

    // Against one device attending to every key, and against the reference.
    let single = opts
        .run(
            gpu,
            &gpu.upload(&q, all.q_shape(layout))?,
            &gpu.upload(&k, all.k_shape(layout))?,
            &gpu.upload(&v, all.v_shape(layout))?,
        )?
        .o
        .download(gpu)?;
    let want = cpu::reference(&q, &k, &v, all, &opts)?;
    let err = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    };
    let (vs_single, vs_ref) = (err(&merged, &single), err(&merged, &want.o));
    let lse_err = err(&lse.download(gpu)?, &want.lse);
    println!(
        "{} shards merged: max error {vs_single:.1e} against one device, {vs_ref:.1e} against \
         the reference, log-sum-exp {lse_err:.1e}",
        shards.len()
    );
    assert!(vs_single < 1e-5 && vs_ref < 1e-5 && lse_err < 1e-4);
    Ok(())
}
