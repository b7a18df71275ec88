//! `--tune`: every tile configuration, on this adapter, in stages.
//!
//! The decode path runs one of two kernels ([`DecodeKernel`]): the decode-shaped
//! `flash_decode.wgsl` with 16, 32 or 64 invocations per workgroup, with subgroup operations
//! or workgroup-memory reductions, or the row-tiled fused kernel with at least
//! `TileConfig::min_decode_rows` rows per workgroup. This times each configuration on two decode
//! shapes (a GQA group of 4 heads with 1 and with 4 new tokens over 16384 keys) within
//! `--tune-seconds`. Then, on the best of those, the fused kernel with every invocation block
//! (`TileBlock`: 4 x 4, 8 x 4, 8 x 8), Q resident in workgroup memory (where it fits) or
//! staged with every key tile, one staging buffer or two (where they fit), on two prefill
//! shapes (head dims 64 and 128); on the best of those, f16 inputs on the same shapes with
//! the scalar products, the 16-bit products emulated, and on cooperative matrices where the
//! `Gpu` has them (`WGPU_ATTENTION_MMA=cooperative` when it is opened); the
//! three-pass path with every block of its tile products on one; last, the backward, one row
//! per invocation or in tiles with every block, on one shape. It prints the fastest of each
//! stage and the whole configuration as a `TableEntry` line for `gpu::tuning::TABLE` (each
//! part can also be set with `WGPU_ATTENTION_DECODE_KERNEL`, `WGPU_ATTENTION_SUBGROUPS`,
//! `WGPU_ATTENTION_DECODE_ROWS`, `WGPU_ATTENTION_FUSED_BLOCK`, `WGPU_ATTENTION_GEMM_BLOCK`,
//! `WGPU_ATTENTION_RESIDENT_Q`, `WGPU_ATTENTION_DOUBLE_BUFFER`, `WGPU_ATTENTION_TILED_BACKWARD`,
//! `WGPU_ATTENTION_BACKWARD_BLOCK` and `WGPU_ATTENTION_MMA`). Shapes are smaller on CPU adapters, so the bound holds
//! there. A configuration whose plans on a stage's shapes are an earlier configuration's (a
//! second buffer or resident Q that does not fit, a row count the group rounds up) runs the
//! same kernels: it is listed as such and not timed. A stage the budget cuts short picks
//! nothing (the printed entry keeps the adapter's value for it); the backward stops a
//! configuration whose next calls would overrun the budget.

use std::time::Instant;

use wgpu_attention::gpu::tuning::TileConfig;
use wgpu_attention::{
    Attention, Causal, DType, DecodeKernel, Dims, Gpu, Layout, MmaChoice, Path, Plan, TileBlock,
};

use crate::Args;
use crate::backward::{Inputs, backward_ms};
use crate::run::{stats, time_gpu, values};

/// The rows-per-workgroup configurations of the row-tiled kernel.
const ROWS: [u32; 5] = [4, 8, 16, 32, 64];

/// One configuration: its name (as the environment variables spell it) and its context.
struct Config {
    name: String,
    gpu: Gpu,
}

/// Every configuration this adapter can run.
fn configs(gpu: &Gpu) -> Result<Vec<Config>, Box<dyn std::error::Error>> {
    let mut out = Vec::new();
    let reductions: &[bool] = if gpu.limits().tile.subgroups {
        &[true, false]
    } else {
        &[false]
    };
    for workgroup in [16, 32, 64] {
        let kernel = DecodeKernel::KeysAcrossInvocations { workgroup };
        for &subgroups in reductions {
            out.push(Config {
                name: format!("{} subgroups={}", kernel.name(), subgroups as u8),
                gpu: gpu.with_decode_kernel(kernel, subgroups)?,
            });
        }
    }
    let tiles = gpu.with_decode_kernel(DecodeKernel::RowTiles, gpu.limits().tile.subgroups)?;
    for rows in ROWS {
        out.push(Config {
            name: format!("tiles rows={rows}"),
            gpu: tiles.with_decode_rows(rows)?,
        });
    }
    Ok(out)
}

/// Times every configuration of `configs` on every shape of `shapes` with `opts` and Q, K, V
/// of `dtype`, within the time left of `budget` seconds since `start`: per configuration, the
/// sum of the median ms over the shapes (None when the budget ran out before it).
fn time_configs(
    stage: &str,
    configs: &[Config],
    (shapes, dtype): (&[Dims], DType),
    opts: &Attention,
    (start, budget): (Instant, f64),
    args: &Args,
) -> Result<Vec<Option<f64>>, Box<dyn std::error::Error>> {
    let mut totals: Vec<Option<f64>> = vec![Some(0.0); configs.len()];
    // A configuration whose plans, on every shape, are an earlier one's runs the same kernels:
    // it is not timed (nor can it win, so a flag the plan declined never reaches the entry).
    let ran: Vec<Vec<(Plan, TileConfig)>> = configs
        .iter()
        .map(|c| {
            shapes
                .iter()
                .map(|d| {
                    Ok(ran_config(
                        &c.gpu,
                        opts.plan_for_dtypes(&c.gpu, *d, [dtype; 3])?,
                    ))
                })
                .collect::<Result<_, wgpu_attention::Error>>()
        })
        .collect::<Result<_, _>>()?;
    let same_as: Vec<Option<usize>> = (0..configs.len())
        .map(|n| (0..n).find(|&m| ran[m] == ran[n]))
        .collect();
    let mut incomplete = false;
    for d in shapes {
        let layout = Layout::Bhsd;
        let gpu = &configs[0].gpu;
        let q = gpu.upload_as(&values(d.q_elems(), 1), d.q_shape(layout), dtype)?;
        let k = gpu.upload_as(&values(d.k_elems(), 2), d.k_shape(layout), dtype)?;
        let v = gpu.upload_as(&values(d.v_elems(), 3), d.v_shape(layout), dtype)?;
        println!(
            "tune: {stage}: {dtype:?} B={} H={}/{} L={} S={} D={} ({} rows per kv head):",
            d.batch,
            d.heads,
            d.kv_heads,
            d.q_len,
            d.kv_len,
            d.head_dim,
            d.group() * d.q_len
        );
        for (n, config) in configs.iter().enumerate() {
            if let Some(m) = same_as[n] {
                println!(
                    "tune:   {}: runs as {} (not timed)",
                    config.name, configs[m].name
                );
                totals[n] = None;
                continue;
            }
            if start.elapsed().as_secs_f64() > budget {
                println!("tune:   {}: skipped (budget)", config.name);
                totals[n] = None;
                incomplete = true;
                continue;
            }
            let hidden = indicatif::ProgressBar::hidden();
            let (ms, timing, _, plan) =
                time_gpu(&config.gpu, opts, *d, (&q, &k, &v), args, &hidden)?;
            let note = plan.reason();
            let (median, _, _) = stats(ms);
            if let Some(t) = &mut totals[n] {
                *t += median;
            }
            // What the plan took of the configuration where the fused kernel runs in row tiles:
            // resident Q and the second buffer only where they fit.
            let took = match &plan {
                Plan::Fused { plan: p, .. } | Plan::Decode { plan: p, .. }
                    if !p.keys_across_invocations =>
                {
                    format!(
                        " [ran: {} rows, block {}, resident_q={}, double_buffer={}{}]",
                        p.rows_per_workgroup,
                        p.block.name(),
                        (p.resident_q > 0) as u8,
                        p.double_buffer as u8,
                        match p.mma {
                            Some(m) if m.cooperative => format!(", cooperative {0}x{0}", m.size),
                            Some(_) => ", emulated 16-bit products".to_string(),
                            None => String::new(),
                        }
                    )
                }
                _ => String::new(),
            };
            println!("tune:   {}: {median:.3} ms ({timing}){took}", config.name);
            log::debug!("tune: {}: {note}", config.name);
        }
    }
    if incomplete {
        // A pick among the configurations that ran would be no measurement of the rest.
        println!("tune: {stage}: the budget ended before every configuration ran: no pick");
        return Ok(vec![None; configs.len()]);
    }
    Ok(totals)
}

/// The plan and what of `gpu`'s configuration it ran with: resident Q and the second staging
/// buffer only where the plan took them.
fn ran_config(gpu: &Gpu, plan: Plan) -> (Plan, TileConfig) {
    let mut config = gpu.tile_config();
    let (resident_q, double_buffer, mma) = match &plan {
        Plan::Fused { plan: p, .. } | Plan::Decode { plan: p, .. } => {
            (p.resident_q > 0, p.double_buffer, p.mma.is_some())
        }
        _ => (false, false, false),
    };
    config.resident_q = resident_q;
    config.double_buffer = double_buffer;
    if !mma {
        config.mma = MmaChoice::Off;
    }
    (plan, config)
}

/// The fastest configuration that finished, and its total.
fn fastest<'a>(configs: &'a [Config], totals: &[Option<f64>]) -> Option<(&'a Config, f64)> {
    configs
        .iter()
        .zip(totals)
        .filter_map(|(c, t)| t.map(|t| (c, t)))
        .min_by(|a, b| a.1.total_cmp(&b.1))
}

/// Times the backward (dQ, dK and dV from one forward's output, wall clock from submission to
/// completion) with `base`'s configuration and each of: one row per invocation, and in tiles
/// with every block, within the budget. The fastest configuration and its median, or None
/// when none finished.
fn time_backward(
    base: &Gpu,
    cpu: bool,
    (start, budget): (Instant, f64),
    args: &Args,
) -> Result<Option<(Config, f64)>, Box<dyn std::error::Error>> {
    // The standard table's shape at L = S = 4096 on a GPU (`torch_sdpa.py --backward` times
    // PyTorch's on it); one that ends in seconds on a CPU adapter.
    let d = if cpu {
        dims(1, 8, 8, 256, 256, 64)
    } else {
        dims(4, 16, 16, 4096, 4096, 64)
    };
    if start.elapsed().as_secs_f64() > budget {
        println!("tune: backward: skipped (budget)");
        return Ok(None);
    }
    // The row kernel last: it is the slowest where the tiles run, and the budget may end
    // before it.
    let mut configs = Vec::new();
    for b in TileBlock::ALL {
        configs.push(Config {
            name: format!("tiles block {}", b.name()),
            gpu: base.with_tiled_backward(true).with_backward_block(b)?,
        });
    }
    configs.push(Config {
        name: "rows".into(),
        gpu: base.with_tiled_backward(false),
    });
    let layout = Layout::Bhsd;
    let opts = Attention::new();
    let up = |x: Vec<f32>, shape| base.upload(&x, shape);
    let q = up(values(d.q_elems(), 1), d.q_shape(layout))?;
    let k = up(values(d.k_elems(), 2), d.k_shape(layout))?;
    let v = up(values(d.v_elems(), 3), d.v_shape(layout))?;
    let d_o = up(values(d.o_elems(), 4), d.o_shape(layout))?;
    let out = opts.clone().return_lse(true).run(base, &q, &k, &v)?;
    let lse = out.lse.as_ref().expect("asked for");
    let inputs = Inputs {
        q: &q,
        k: &k,
        v: &v,
        o: &out.o,
        lse,
        d_o: &d_o,
    };
    let deadline = start + std::time::Duration::from_secs_f64(budget);
    let flops = 2.5 * d.flops(false);
    println!(
        "tune: backward: B={} H={} L={} S={} D={}, f32, wall clock ({:.1} GFLOP per call):",
        d.batch,
        d.heads,
        d.q_len,
        d.kv_len,
        d.head_dim,
        flops / 1e9
    );
    let mut best: Option<(Config, f64)> = None;
    let mut incomplete = false;
    for config in configs {
        if start.elapsed().as_secs_f64() > budget {
            println!("tune:   {}: skipped (budget)", config.name);
            incomplete = true;
            continue;
        }
        let ms = backward_ms(
            &config.gpu,
            &opts,
            &inputs,
            (args.warmup, args.reps.max(1)),
            Some(deadline),
        )?;
        if ms.is_empty() {
            println!(
                "tune:   {}: stopped (budget; a call takes longer)",
                config.name
            );
            incomplete = true;
            continue;
        }
        let (median, _, _) = stats(ms);
        println!(
            "tune:   {}: {median:.3} ms ({:.1} GFLOP/s)",
            config.name,
            flops / median / 1e6
        );
        if best.as_ref().is_none_or(|(_, t)| median < *t) {
            best = Some((config, median));
        }
    }
    if incomplete {
        println!("tune: backward: the budget ended before every configuration ran: no pick");
        return Ok(None);
    }
    Ok(best)
}

/// `batch` x `heads` query heads over `kv_heads`, `q_len` queries over `kv_len` keys, head dim
/// `d` (Q, K and V).
fn dims(
    batch: usize,
    heads: usize,
    kv_heads: usize,
    q_len: usize,
    kv_len: usize,
    d: usize,
) -> Dims {
    Dims {
        kv_heads,
        q_len,
        kv_len,
        ..Dims::new(batch, heads, q_len, d)
    }
}

pub(crate) fn tune(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let start = Instant::now();
    let budget = args.tune_seconds as f64;
    let base = Gpu::new()?;
    let gpu = base.with_timer()?.unwrap_or_else(|| base.clone());
    let l = gpu.limits();
    println!(
        "tune: {} (default decode kernel {}, subgroups {}, min_decode_rows {}, fused block {}, \
         gemm block {}, backward block {}), budget {budget} s",
        gpu.describe(),
        l.tile.decode_kernel.name(),
        l.tile.subgroups as u8,
        l.tile.min_decode_rows,
        l.tile.fused_block.name(),
        l.tile.gemm_block.name(),
        l.tile.backward_block.name()
    );
    let clock = (start, budget);
    let info = gpu.adapter_info();
    let cpu = info.device_type == wgpu::DeviceType::Cpu;

    // 1. The decode path.
    let configs = configs(&gpu)?;
    let decode = Attention::new()
        .causal(Causal::BottomRight)
        .path(Path::Decode);
    let shapes = [1, 4].map(|q_len| dims(1, 32, 8, q_len, 16384, 128));
    let totals = time_configs(
        "decode",
        &configs,
        (&shapes, DType::F32),
        &decode,
        clock,
        args,
    )?;
    let Some((best, total)) = fastest(&configs, &totals) else {
        println!("tune: no decode configuration picked within the budget: no entry");
        return Ok(());
    };
    println!(
        "tune: decode: best {} ({total:.3} ms over both shapes)",
        best.name
    );
    let mut summary = vec![format!("decode {} {total:.3} ms", best.name)];
    let best = best.gpu.clone();

    // 2. The fused kernel's invocation block, on the best decode configuration.
    let (fused_shapes, gemm_shape) = if cpu {
        (
            [dims(1, 8, 8, 512, 512, 64), dims(1, 4, 4, 512, 512, 128)],
            dims(1, 8, 8, 512, 512, 64),
        )
    } else {
        (
            [
                dims(4, 16, 16, 4096, 4096, 64),
                dims(4, 16, 16, 4096, 4096, 128),
            ],
            dims(4, 16, 16, 2048, 2048, 64),
        )
    };
    let gemm = best.tile_config().gemm_block;
    let blocks = |f: &dyn Fn(TileBlock) -> (TileBlock, TileBlock)| {
        TileBlock::ALL
            .into_iter()
            .map(|b| {
                let (fused, gemm) = f(b);
                Ok(Config {
                    name: format!("block {}", b.name()),
                    gpu: best.with_blocks(fused, gemm)?,
                })
            })
            .collect::<Result<Vec<Config>, wgpu_attention::Error>>()
    };
    // Every block with Q resident in workgroup memory (where it fits) and staged per tile,
    // with one staging buffer and two (where they fit beside the rest). One buffer first: a
    // configuration whose second buffer the plans decline runs as (and reports as) that one.
    let mut configs = Vec::new();
    for (resident, double) in [(true, false), (false, false), (true, true), (false, true)] {
        for c in blocks(&|b| (b, gemm))? {
            configs.push(Config {
                name: format!(
                    "{} resident_q={} double_buffer={}",
                    c.name, resident as u8, double as u8
                ),
                gpu: c.gpu.with_resident_q(resident).with_double_buffer(double),
            });
        }
    }
    let fused = Attention::new().path(Path::Fused);
    let totals = time_configs(
        "fused",
        &configs,
        (&fused_shapes, DType::F32),
        &fused,
        clock,
        args,
    )?;
    let fused_config = match fastest(&configs, &totals) {
        Some((c, total)) => {
            println!(
                "tune: fused: best {} ({total:.3} ms over both shapes)",
                c.name
            );
            summary.push(format!("fused {} {total:.3} ms", c.name));
            c.gpu.tile_config()
        }
        None => best.tile_config(),
    };
    let (fused_block, resident_q, double_buffer) = (
        fused_config.fused_block,
        fused_config.resident_q,
        fused_config.double_buffer,
    );
    let best = best
        .with_resident_q(resident_q)
        .with_double_buffer(double_buffer);
    let best = best.with_blocks(fused_block, gemm)?;
    print_entry("table entry so far", info, &best.tile_config(), &summary);

    // 2b. f16 inputs: the scalar products against the 16-bit ones (emulated, and on
    // cooperative matrices where the Gpu has them: WGPU_ATTENTION_MMA=cooperative).
    let mut configs = Vec::new();
    for choice in [MmaChoice::Off, MmaChoice::Emulated, MmaChoice::Cooperative] {
        match best.with_mma(choice) {
            Ok(g) => configs.push(Config {
                name: format!("mma {}", choice.name()),
                gpu: g,
            }),
            Err(e) => println!("tune: f16 products: mma {} not here: {e}", choice.name()),
        }
    }
    let totals = time_configs(
        "f16 products",
        &configs,
        (&fused_shapes, DType::F16),
        &fused,
        clock,
        args,
    )?;
    let best = match fastest(&configs, &totals) {
        Some((c, total)) => {
            println!(
                "tune: f16 products: best {} ({total:.3} ms over both shapes)",
                c.name
            );
            summary.push(format!("f16 {} {total:.3} ms", c.name));
            c.gpu.clone()
        }
        None => best,
    };
    let mma = best.tile_config().mma;
    print_entry("table entry so far", info, &best.tile_config(), &summary);

    // 3. The tile products' block (three-pass), with the best fused block.
    let configs: Vec<Config> = blocks(&|b| (fused_block, b))?
        .into_iter()
        .map(|c| Config {
            name: c.name,
            gpu: c
                .gpu
                .with_resident_q(resident_q)
                .with_double_buffer(double_buffer)
                .with_mma(mma)
                .expect("timed above"),
        })
        .collect();
    let three = Attention::new().path(Path::ThreePass);
    let totals = time_configs(
        "three-pass",
        &configs,
        (&[gemm_shape], DType::F32),
        &three,
        clock,
        args,
    )?;
    let config = match fastest(&configs, &totals) {
        Some((c, total)) => {
            println!("tune: three-pass: best {} ({total:.3} ms)", c.name);
            summary.push(format!("three-pass {} {total:.3} ms", c.name));
            c.gpu.tile_config()
        }
        None => best.tile_config(),
    };
    print_entry("table entry so far", info, &config, &summary);

    // 4. The backward: one row per invocation, or in tiles with each block.
    let config = match time_backward(&gpu.with_tile_config(config)?, cpu, clock, args)? {
        Some((c, ms)) => {
            println!("tune: backward: best {} ({ms:.3} ms)", c.name);
            summary.push(format!("backward {} {ms:.3} ms", c.name));
            c.gpu.tile_config()
        }
        None => config,
    };
    println!(
        "tune: best for {:?} adapters like {}: {} in {:.0} s",
        info.device_type,
        info.name,
        summary.join(", "),
        start.elapsed().as_secs_f64()
    );
    print_entry("table entry", info, &config, &summary);
    Ok(())
}

/// A line for `wgpu_attention::gpu::tuning::TABLE`: `config` for `info`'s adapter, measured as
/// `summary` says. Printed after each stage as well (`label` "table entry so far"), so that a
/// run killed by an outer time limit (`.gpu/on-device.sh` gives its step what is left of its
/// budget) still leaves the stages it finished as an entry.
fn print_entry(label: &str, info: &wgpu::AdapterInfo, config: &TileConfig, summary: &[String]) {
    println!(
        "tune: {label}: TableEntry {{ adapters: {:?}, vendor: Some({:#x}), \
         device_type: Some(wgpu::DeviceType::{:?}), subgroup_size: Some({}), config: {}, \
         source: \"measured: attn-bench --tune, {}\" }}",
        info.name,
        info.vendor,
        info.device_type,
        info.subgroup_min_size,
        config.as_rust(),
        summary.join(", ")
    );
}
