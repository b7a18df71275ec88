//! `--rotary`: rotary position embedding alone (`gpu::rotate`), for each `--q-len` and
//! `--dtype`: a prompt's Q, `[batch, q_len, heads, head_dim]` (Bshd), turned from position 0
//! (Llama 3's theta over the whole head). GPU time from timestamps where the adapter has them
//! (else wall clock, submission to completion), the bandwidth that means (the tensor read once
//! and written once), and `cpu::rotate` (f64, one thread) on the same data, which also checks
//! the GPU's result.

use std::time::Instant;

use wgpu_attention::rotary::{Positions, Rotary};
use wgpu_attention::{Gpu, Layout, cpu};

use crate::Args;
use crate::run::{errors, stats, values};

pub(crate) fn rotary(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let gpu = Gpu::new()?;
    let timed = gpu.with_timer()?;
    let clock = if timed.is_some() {
        "GPU timestamps"
    } else {
        "wall clock"
    };
    println!("# device: {}", gpu.describe());
    println!(
        "# gpu::rotate of Q [batch, q_len, heads, head_dim] (Bshd) from position 0, theta \
         500000; median (min-max) of {} after {} warm-up, {clock}; GB/s counts the tensor read \
         and written once; cpu::rotate is f64 on one thread",
        args.reps, args.warmup
    );
    if gpu.adapter_info().device_type == wgpu::DeviceType::Cpu {
        println!("# a software adapter: its GPU rows say nothing about a GPU's speed");
    }
    println!(
        "{:>6} {:>6} {:>6} {:>5} {:>6} {:>24} {:>9} {:>12} {:>10}",
        "batch",
        "q_len",
        "heads",
        "dim",
        "dtype",
        "gpu ms (min-max)",
        "GB/s",
        "cpu ms",
        "max |err|"
    );
    let ctx = timed.as_ref().unwrap_or(&gpu);
    let rope = Rotary::new(args.head_dim, 500_000.0)?;
    for &q_len in &args.q_len {
        for &dtype in &args.dtype {
            let dims = [args.batch, q_len, args.heads, args.head_dim];
            let n: usize = dims.iter().product();
            let x = ctx.upload_as(&values(n, q_len as u64), dims, dtype.dtype())?;
            let at = Positions::Start(vec![0; args.batch]);
            let mut ms = Vec::new();
            for rep in 0..args.warmup + args.reps.max(1) {
                ctx.wait()?;
                let start = Instant::now();
                let y = wgpu_attention::gpu::rotate(ctx, &x, Layout::Bshd, &rope, &at)?;
                ctx.wait()?;
                let wall = start.elapsed().as_secs_f64();
                let secs = match &timed {
                    Some(t) => t.last_gpu_seconds()?.unwrap_or(wall),
                    None => wall,
                };
                if rep >= args.warmup {
                    ms.push(secs * 1e3);
                }
                drop(y);
            }
            let (med, lo, hi) = stats(ms);
            let bytes = 2.0 * x.byte_len() as f64;
            let held = x.download(ctx)?;
            let start = Instant::now();
            let want = cpu::rotate(&held, dims, Layout::Bshd, &rope, &at)?;
            let cpu_ms = start.elapsed().as_secs_f64() * 1e3;
            let got =
                wgpu_attention::gpu::rotate(ctx, &x, Layout::Bshd, &rope, &at)?.download(ctx)?;
            let (max_abs, _) = errors(&got, &want);
            println!(
                "{:>6} {q_len:>6} {:>6} {:>5} {dtype:>6} {:>24} {:>9.1} {cpu_ms:>12.2} {max_abs:>10.1e}",
                args.batch,
                args.heads,
                args.head_dim,
                format!("{med:.3} ({lo:.3}-{hi:.3})"),
                bytes / (med * 1e-3) / 1e9,
            );
        }
    }
    Ok(())
}
