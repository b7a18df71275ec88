//! `--tune`: the decode path under every tile configuration, on this adapter.
//!
//! The decode path runs one of two kernels ([`DecodeKernel`]): the decode-shaped
//! `flash_decode.wgsl` with 16, 32 or 64 invocations per workgroup, with subgroup operations
//! or workgroup-memory reductions, or the row-tiled fused kernel with at least
//! `TileConfig::min_decode_rows` rows per workgroup. This times each configuration on two decode
//! shapes (a GQA group of 4 heads with 1 and with 4 new tokens over 16384 keys) within
//! `--tune-seconds`, and prints the fastest as the values to put in `GpuLimits::from_wgpu` for
//! this kind of adapter (or to set with `WGPU_ATTENTION_DECODE_KERNEL`,
//! `WGPU_ATTENTION_SUBGROUPS` and `WGPU_ATTENTION_DECODE_ROWS`).

use std::time::Instant;

use wgpu_attention::{Attention, Causal, DecodeKernel, Dims, Gpu, Layout, Path};

use crate::Args;
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

pub(crate) fn tune(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let start = Instant::now();
    let budget = args.tune_seconds as f64;
    let base = Gpu::new()?;
    let gpu = base.with_timer().unwrap_or_else(|| base.clone());
    let l = gpu.limits();
    println!(
        "tune: {} (default decode kernel {}, subgroups {}, min_decode_rows {}), budget {budget} s",
        gpu.describe(),
        l.tile.decode_kernel.name(),
        l.tile.subgroups as u8,
        l.tile.min_decode_rows
    );
    let configs = configs(&gpu)?;
    let opts = Attention::new()
        .causal(Causal::BottomRight)
        .path(Path::Decode);
    // Per configuration, the sum over shapes of the median ms (None when not reached).
    let mut totals: Vec<Option<f64>> = vec![Some(0.0); configs.len()];
    for q_len in [1, 4] {
        let d = Dims {
            batch: 1,
            heads: 32,
            kv_heads: 8,
            q_len,
            kv_len: 16384,
            head_dim: 128,
            v_head_dim: 128,
        };
        let layout = Layout::Bhsd;
        let q = gpu.upload(&values(d.q_elems(), 1), d.q_shape(layout))?;
        let k = gpu.upload(&values(d.k_elems(), 2), d.k_shape(layout))?;
        let v = gpu.upload(&values(d.v_elems(), 3), d.v_shape(layout))?;
        println!(
            "tune: q_len {q_len} ({} rows per kv head):",
            d.group() * q_len
        );
        for (n, config) in configs.iter().enumerate() {
            if start.elapsed().as_secs_f64() > budget {
                println!("tune:   {}: skipped (budget)", config.name);
                totals[n] = None;
                continue;
            }
            let (ms, timing, _, note) = time_gpu(&config.gpu, &opts, d, (&q, &k, &v), args)?;
            let (median, _, _) = stats(ms);
            if let Some(t) = &mut totals[n] {
                *t += median;
            }
            println!("tune:   {}: {median:.3} ms ({timing})", config.name);
            log::debug!("tune: {}: {note}", config.name);
        }
    }
    let best = configs
        .iter()
        .zip(&totals)
        .filter_map(|(c, t)| t.map(|t| (c, t)))
        .min_by(|a, b| a.1.total_cmp(&b.1));
    match best {
        Some((config, total)) => {
            let info = gpu.adapter_info();
            println!(
                "tune: best for {:?} adapters like {}: {} ({total:.3} ms over both shapes)",
                info.device_type, info.name, config.name
            );
            // A line for wgpu_attention::gpu::tuning::TABLE.
            println!(
                "tune: table entry: TableEntry {{ adapters: {:?}, vendor: Some({:#x}), \
                 device_type: Some(wgpu::DeviceType::{:?}), subgroup_size: Some({}), config: {}, \
                 source: \"measured: attn-bench --tune, {} ms over both shapes\" }}",
                info.name,
                info.vendor,
                info.device_type,
                info.subgroup_min_size,
                config.gpu.tile_config().as_rust(),
                (total * 1000.0).round() / 1000.0
            );
        }
        None => println!("tune: no configuration finished within the budget"),
    }
    Ok(())
}
