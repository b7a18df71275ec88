//! `--tune`: the decode path under every rows-per-workgroup configuration, on this adapter.
//!
//! The decode path runs the fused kernel with at least `GpuLimits::min_decode_rows` rows per
//! workgroup (4 on CPU adapters, 16 on GPUs: a guess until measured). This times each
//! configuration on two decode shapes and prints the fastest as the value to put in
//! `GpuLimits::from_wgpu` for this kind of adapter (or to set with `WGPU_ATTENTION_DECODE_ROWS`).

use std::time::Instant;

use wgpu_attention::{Attention, Causal, Dims, Gpu, Layout, Path};

use crate::Args;
use crate::run::{stats, time_gpu, values};

/// The rows-per-workgroup configurations of the fused kernel.
const ROWS: [u32; 5] = [4, 8, 16, 32, 64];

pub(crate) fn tune(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let start = Instant::now();
    let budget = args.tune_seconds as f64;
    let base = Gpu::new()?;
    let gpu = base.with_timer().unwrap_or_else(|| base.clone());
    println!(
        "tune: {} (default min_decode_rows {}), budget {budget} s",
        gpu.describe(),
        gpu.limits().min_decode_rows
    );
    let opts = Attention::new()
        .causal(Causal::BottomRight)
        .path(Path::Decode);
    // Per configuration, the sum over shapes of the median ms (None when not reached).
    let mut totals: Vec<Option<f64>> = vec![Some(0.0); ROWS.len()];
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
        let mut line = format!(
            "tune: q_len {q_len} ({} rows per kv head):",
            d.group() * q_len
        );
        for (n, &rows) in ROWS.iter().enumerate() {
            if start.elapsed().as_secs_f64() > budget {
                line.push_str(&format!(" {rows}: skipped (budget)"));
                totals[n] = None;
                continue;
            }
            let g = gpu.with_decode_rows(rows)?;
            let (ms, timing, _, note) = time_gpu(&g, &opts, d, (&q, &k, &v), args)?;
            let (median, _, _) = stats(ms);
            if let Some(t) = &mut totals[n] {
                *t += median;
            }
            line.push_str(&format!(" {rows}: {median:.3} ms ({timing})"));
            log::debug!("tune: {rows} rows: {note}");
        }
        println!("{line}");
    }
    let best = ROWS
        .iter()
        .zip(&totals)
        .filter_map(|(&rows, t)| t.map(|t| (rows, t)))
        .min_by(|a, b| a.1.total_cmp(&b.1));
    match best {
        Some((rows, total)) => println!(
            "tune: best for {:?} adapters like {}: min_decode_rows = {rows} ({total:.3} ms over both shapes)",
            gpu.adapter_info().device_type,
            gpu.adapter_info().name
        ),
        None => println!("tune: no configuration finished within the budget"),
    }
    Ok(())
}
