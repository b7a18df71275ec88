//! `--backward`: forward plus backward (the gradients by Q, K and V) on the GPU, and the same
//! on the f64 reference where the shape is small enough for it, with the GPU gradients' errors
//! against the reference. FLOPs by FlashAttention-2's count: the backward is 2.5 times the
//! forward, so forward plus backward is 3.5 times the forward's FLOPs (DESIGN.md's convention).

use std::time::Instant;

use wgpu_attention::{Attention, Dims, Gpu, Layout, Tensor, cpu};

use crate::run::{errors, stats, values};
use crate::{Args, shapes};

/// The reference's forward plus backward runs when the problem is at most this many forward
/// FLOPs (it is single-threaded f64).
const REFERENCE_MAX_FLOPS: f64 = 2e9;

/// The relative norm error of `got` against `want`.
fn rel_norm_error(got: &[f32], want: &[f32]) -> f64 {
    errors(got, want).1
}

/// What the backward reads: Q, K, V, the forward's O and log-sum-exp, and dO.
pub(crate) struct Inputs<'a> {
    pub(crate) q: &'a Tensor,
    pub(crate) k: &'a Tensor,
    pub(crate) v: &'a Tensor,
    pub(crate) o: &'a Tensor,
    pub(crate) lse: &'a Tensor,
    pub(crate) d_o: &'a Tensor,
}

/// The backward alone on `x`, `warmup` untimed calls and then `reps` timed ones, wall clock
/// from submission to completion, in ms. With a `deadline`, stops early when the calls left
/// would end past it (then fewer than `reps` figures, none if it stops during the warm-up).
pub(crate) fn backward_ms(
    gpu: &Gpu,
    opts: &Attention,
    x: &Inputs<'_>,
    (warmup, reps): (usize, usize),
    deadline: Option<Instant>,
) -> Result<Vec<f64>, wgpu_attention::Error> {
    let mut ms = Vec::new();
    let calls = warmup + reps;
    for rep in 0..calls {
        gpu.wait()?;
        let start = Instant::now();
        let g = opts.backward(gpu, x.q, x.k, x.v, x.o, x.lse, x.d_o)?;
        gpu.wait()?;
        let took = start.elapsed();
        if rep >= warmup {
            ms.push(took.as_secs_f64() * 1e3);
        }
        drop(g);
        let left = (calls - rep - 1) as u32;
        if deadline.is_some_and(|end| Instant::now() + took * left > end) {
            break;
        }
    }
    Ok(ms)
}

pub(crate) fn backward(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let gpu = Gpu::new()?;
    let software = gpu.describe().contains("Cpu");
    println!("# device: {}", gpu.describe());
    println!(
        "# forward (fused, with log-sum-exp) + backward (dQ, dK, dV), f32, wall clock from \
         submission to completion, median of {} after {} warm-up; GFLOP/s = 3.5 x the \
         forward's FLOPs / time; `bwd ms`: the backward alone (same inputs, the forward's \
         output reused), GFLOP/s = 2.5 x the forward's FLOPs / time",
        args.reps, args.warmup
    );
    println!(
        "# backward kernels: {} (TileConfig::tiled_backward; in tiles up to head_dim 256)",
        if gpu.tile_config().tiled_backward {
            "tiled"
        } else {
            "one row per invocation"
        }
    );
    println!(
        "{:<44} {:<14} {:>10} {:>9} {:>10} {:>9} {:>24}",
        "shape", "path", "ms", "GFLOP/s", "bwd ms", "GFLOP/s", "rel. error dQ dK dV"
    );
    let kv_heads = args.kv_heads.unwrap_or(args.heads);
    for (q_len, kv_len) in shapes(args) {
        let d = Dims {
            batch: args.batch,
            heads: args.heads,
            kv_heads,
            q_len,
            kv_len,
            head_dim: args.head_dim,
            v_head_dim: args.head_dim,
        };
        let opts = args.attention(args.heads);
        let flops = 3.5 * d.flops(args.causal);
        let shape = format!(
            "B={} H={}/{} L={q_len} S={kv_len} D={}{}",
            d.batch,
            d.heads,
            d.kv_heads,
            d.head_dim,
            if args.causal { " causal" } else { "" }
        );
        let (q, k, v, d_o) = (
            values(d.q_elems(), 1),
            values(d.k_elems(), 2),
            values(d.v_elems(), 3),
            values(d.o_elems(), 4),
        );
        let reference = (d.flops(args.causal) <= REFERENCE_MAX_FLOPS).then(|| {
            let start = Instant::now();
            let g = cpu::reference_backward(&q, &k, &v, &d_o, d, &opts);
            (g, start.elapsed().as_secs_f64() * 1e3)
        });
        let layout = Layout::Bhsd;
        let (tq, tk, tv) = (
            gpu.upload(&q, d.q_shape(layout))?,
            gpu.upload(&k, d.k_shape(layout))?,
            gpu.upload(&v, d.v_shape(layout))?,
        );
        let t_do = gpu.upload(&d_o, d.o_shape(layout))?;
        let fwd = opts.clone().return_lse(true);
        let mut times = Vec::new();
        let mut last = None;
        for rep in 0..args.warmup + args.reps {
            gpu.wait()?;
            let start = Instant::now();
            let out = fwd.run(&gpu, &tq, &tk, &tv)?;
            let lse = out.lse.as_ref().expect("asked for");
            let g = opts.backward(&gpu, &tq, &tk, &tv, &out.o, lse, &t_do)?;
            gpu.wait()?;
            if rep >= args.warmup {
                times.push(start.elapsed().as_secs_f64() * 1e3);
            }
            last = Some(g);
        }
        let (median, _, _) = stats(times);
        // The backward alone, on one forward's output.
        let out = fwd.run(&gpu, &tq, &tk, &tv)?;
        let lse = out.lse.as_ref().expect("asked for");
        let inputs = Inputs {
            q: &tq,
            k: &tk,
            v: &tv,
            o: &out.o,
            lse,
            d_o: &t_do,
        };
        let bwd_times = backward_ms(&gpu, &opts, &inputs, (args.warmup, args.reps), None)?;
        let (bwd_median, _, _) = stats(bwd_times);
        let errors = match (&reference, &last) {
            (Some((Ok(want), _)), Some(g)) => {
                let e = [
                    rel_norm_error(&g.dq.download(&gpu)?, &want.dq),
                    rel_norm_error(&g.dk.download(&gpu)?, &want.dk),
                    rel_norm_error(&g.dv.download(&gpu)?, &want.dv),
                ];
                format!("{:.1e} {:.1e} {:.1e}", e[0], e[1], e[2])
            }
            (Some((Err(e), _)), _) => format!("reference: {e}"),
            _ => "(no reference)".into(),
        };
        if let Some((Ok(_), ms)) = &reference {
            println!(
                "{shape:<44} {:<14} {ms:>10.1} {:>9.2} {:>10} {:>9} {:>24}",
                "cpu-reference",
                flops / ms / 1e6,
                "",
                "",
                ""
            );
        }
        let bwd_flops = 2.5 * d.flops(args.causal);
        println!(
            "{shape:<44} {:<14} {median:>10.2} {:>9.2} {bwd_median:>10.2} {:>9.2} {errors:>24}",
            "gpu-backward",
            flops / median / 1e6,
            bwd_flops / bwd_median / 1e6
        );
    }
    if software {
        println!(
            "# a software driver: these GPU rows say nothing about a real GPU's speed \
             (compare paths, not devices)"
        );
    }
    Ok(())
}
