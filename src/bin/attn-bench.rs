//! `attn-bench`: times attention on the CPU and the GPU side by side.
//!
//! ```text
//! attn-bench [--batch B] [--heads H] [--kv-heads HKV] [--q-len L] [--kv-len S]
//!            [--head-dim D] [--causal] [--reps N] [--warmup N] [--check-all]
//! ```
//!
//! Prints one row per path: median wall time over `--reps` runs (GPU: submit to completion, the
//! inputs already on the device), GFLOP/s by the FLOP convention of DESIGN.md, and the largest
//! absolute error against the f64 reference. For large problems the reference is computed on
//! the first (batch, kv-head group) only, unless `--check-all`; the table says which.

use std::process::ExitCode;
use std::time::Instant;

use wgpu_attention::{Attention, Causal, Dims, Gpu, Output, cpu};

struct Args {
    dims: Dims,
    causal: bool,
    reps: usize,
    warmup: usize,
    check_all: bool,
}

const USAGE: &str = "usage: attn-bench [--batch B] [--heads H] [--kv-heads HKV] [--q-len L] \
[--kv-len S] [--head-dim D] [--causal] [--reps N] [--warmup N] [--check-all]";

fn parse() -> Result<Args, String> {
    let mut dims = Dims::new(1, 8, 512, 64);
    let mut kv_heads = None;
    let mut kv_len = None;
    let mut a = Args {
        dims,
        causal: false,
        reps: 10,
        warmup: 2,
        check_all: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut num = |name: &str| -> Result<usize, String> {
            let v = it.next().ok_or(format!("{name} needs a value"))?;
            v.parse().map_err(|_| format!("{name}: not a number: {v}"))
        };
        match flag.as_str() {
            "--batch" => dims.batch = num("--batch")?,
            "--heads" => dims.heads = num("--heads")?,
            "--kv-heads" => kv_heads = Some(num("--kv-heads")?),
            "--q-len" => dims.q_len = num("--q-len")?,
            "--kv-len" => kv_len = Some(num("--kv-len")?),
            "--head-dim" => dims.head_dim = num("--head-dim")?,
            "--reps" => a.reps = num("--reps")?.max(1),
            "--warmup" => a.warmup = num("--warmup")?,
            "--causal" => a.causal = true,
            "--check-all" => a.check_all = true,
            "-h" | "--help" => return Err(USAGE.to_string()),
            other => return Err(format!("unknown flag {other}\n{USAGE}")),
        }
    }
    dims.kv_heads = kv_heads.unwrap_or(dims.heads);
    dims.kv_len = kv_len.unwrap_or(dims.q_len);
    dims.v_head_dim = dims.head_dim;
    a.dims = dims;
    Ok(a)
}

fn median_ms(mut times: Vec<f64>) -> f64 {
    times.sort_by(f64::total_cmp);
    times[times.len() / 2] * 1e3
}

fn values(n: usize, seed: u64) -> Vec<f32> {
    // A cheap deterministic generator: the benchmark needs varied values, not statistics.
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// The first (batch, kv-head) slice of a `Bhsd` tensor with `heads` heads of `per_head` elements.
fn first_heads(x: &[f32], heads: usize, per_head: usize) -> Vec<f32> {
    x[..heads * per_head].to_vec()
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(msg) => {
            eprintln!("{msg}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("attn-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), wgpu_attention::Error> {
    let d = args.dims;
    let mut opts = Attention::new();
    if args.causal {
        opts = opts.causal(Causal::TopLeft);
    }
    let q = values(d.q_elems(), 1);
    let k = values(d.k_elems(), 2);
    let v = values(d.v_elems(), 3);
    let flops = d.flops(args.causal);

    // The reference on all of it when cheap, else on batch 0 and the first kv-head group.
    let full_check = args.check_all || flops < 2e9;
    let check_dims = if full_check {
        d
    } else {
        Dims {
            batch: 1,
            heads: d.group(),
            kv_heads: 1,
            ..d
        }
    };
    let (cq, ck, cv) = if full_check {
        (q.clone(), k.clone(), v.clone())
    } else {
        (
            first_heads(&q, d.group(), d.q_len * d.head_dim),
            first_heads(&k, 1, d.kv_len * d.head_dim),
            first_heads(&v, 1, d.kv_len * d.v_head_dim),
        )
    };
    let start = Instant::now();
    let want = cpu::reference(&cq, &ck, &cv, check_dims, &opts)?;
    let ref_secs = start.elapsed().as_secs_f64();

    let gpu = Gpu::new()?;
    println!(
        "attn-bench: B={} H={} Hkv={} L={} S={} D={} causal={} | adapter: {} | driver: {} {}",
        d.batch,
        d.heads,
        d.kv_heads,
        d.q_len,
        d.kv_len,
        d.head_dim,
        args.causal,
        gpu.describe(),
        gpu.adapter_info().driver,
        gpu.adapter_info().driver_info
    );
    let layout = opts.get_layout();
    let tq = gpu.upload(&q, d.q_shape(layout))?;
    let tk = gpu.upload(&k, d.k_shape(layout))?;
    let tv = gpu.upload(&v, d.v_shape(layout))?;
    let out = Output {
        o: gpu.empty(d.o_shape(layout))?,
        lse: None,
        weights: None,
    };
    let plan = opts.plan(&gpu, d)?;
    for _ in 0..args.warmup {
        opts.run_into(&gpu, &tq, &tk, &tv, &out)?;
        gpu.wait()?;
    }
    let mut times = Vec::with_capacity(args.reps);
    for _ in 0..args.reps {
        let start = Instant::now();
        opts.run_into(&gpu, &tq, &tk, &tv, &out)?;
        gpu.wait()?;
        times.push(start.elapsed().as_secs_f64());
    }
    let o = out.o.download(&gpu)?;
    let gpu_ms = median_ms(times);
    let got = &o[..want.o.len()];
    let max_err = got
        .iter()
        .zip(&want.o)
        .map(|(g, w)| (g - w).abs())
        .fold(0f32, f32::max);

    let scope = if full_check {
        "all".to_string()
    } else {
        format!("b=0, heads 0..{}", d.group())
    };
    println!(
        "{:<22} {:>12} {:>10} {:>12}  error checked on",
        "path", "median ms", "GFLOP/s", "max |err|"
    );
    let ref_flops = check_dims.flops(args.causal);
    println!(
        "{:<22} {:>12.3} {:>10.3} {:>12}  (oracle, 1 run on {scope})",
        "cpu-reference (f64)",
        ref_secs * 1e3,
        ref_flops / ref_secs / 1e9,
        "-"
    );
    println!(
        "{:<22} {:>12.3} {:>10.1} {:>12.2e}  {scope}",
        "gpu-three-pass",
        gpu_ms,
        flops / (gpu_ms / 1e3) / 1e9,
        max_err
    );
    println!(
        "plan: {}; GPU time is wall clock from submit to completion, median of {} runs",
        plan.reason(),
        args.reps
    );
    Ok(())
}
