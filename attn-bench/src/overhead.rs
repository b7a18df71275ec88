//! `--overhead`: the host's share of a call. For a small prefill call and a decoding step
//! (without and with the cache applying RoPE) it
//! times, over many calls, the host time of the call itself (validation, planning, allocation,
//! encoding and submission; the GPU's work is not waited for) and the end-to-end time (the
//! call, then reading O back), and prints the medians.

use std::time::Instant;

use wgpu_attention::{Attention, Gpu, KvCache, Path, Rotary, Tensor};

use crate::run::{stats, values};

/// Calls per measurement, after as many warm-up calls.
const CALLS: usize = 300;

/// The median and the 10th percentile of `us`: on a shared machine the lower percentile says
/// what a call costs when nothing preempts it.
fn median_p10(mut us: Vec<f64>) -> (f64, f64) {
    us.sort_by(f64::total_cmp);
    (stats(us.clone()).0, us[us.len() / 10])
}

/// Host and end-to-end microseconds of `call` (which returns the tensor to read back): median
/// and 10th percentile of each.
fn time_calls(
    gpu: &Gpu,
    mut call: impl FnMut() -> wgpu_attention::Result<Tensor>,
) -> wgpu_attention::Result<[(f64, f64); 2]> {
    let (mut host, mut end_to_end) = (Vec::new(), Vec::new());
    for i in 0..2 * CALLS {
        gpu.wait()?;
        let start = Instant::now();
        let out = call()?;
        let submitted = start.elapsed();
        out.download(gpu)?;
        let done = start.elapsed();
        if i >= CALLS {
            host.push(submitted.as_secs_f64() * 1e6);
            end_to_end.push(done.as_secs_f64() * 1e6);
        }
    }
    Ok([median_p10(host), median_p10(end_to_end)])
}

pub(crate) fn overhead() -> Result<(), Box<dyn std::error::Error>> {
    let gpu = Gpu::new()?;
    println!("# device: {}", gpu.describe());
    println!(
        "# median (and 10th percentile) of {CALLS} calls after {CALLS} warm-up calls; host = \
         the call up to its submission, end-to-end = the call and reading O back"
    );
    println!(
        "{:<72} {:>18} {:>22}",
        "call", "host µs (p10)", "end-to-end µs (p10)"
    );
    let line = |what: &str, [(h, h10), (e, e10)]: [(f64, f64); 2]| {
        println!("{what:<72} {h:>9.1} ({h10:>6.1}) {e:>12.1} ({e10:>7.1})");
    };

    let upload = |dims: [usize; 4], seed| gpu.upload(&values(dims.iter().product(), seed), dims);
    let q = upload([1, 4, 64, 64], 1)?;
    let k = upload([1, 4, 64, 64], 2)?;
    let v = upload([1, 4, 64, 64], 3)?;
    let prefill = Attention::new().path(Path::Fused);
    let times = time_calls(&gpu, || Ok(prefill.run(&gpu, &q, &k, &v)?.o))?;
    line("prefill: fused, B=1 H=4 L=S=64 D=64, f32", times);

    let (batch, kv_heads, heads, dim, prompt) = (1, 2, 8, 64, 1000);
    let token = values(batch * kv_heads * dim, 5);
    let q = upload([batch, heads, 1, dim], 6)?;
    // Without RoPE, then with the cache turning K and the query (Llama's theta).
    for rotary in [None, Some(Rotary::new(dim, 500_000.0)?)] {
        let mut cache = KvCache::new(&gpu, batch, kv_heads, prompt + 2 * CALLS + 1, dim, dim)?;
        if let Some(rotary) = &rotary {
            cache = cache.with_rotary(rotary.clone())?;
        }
        let kv = values(batch * kv_heads * prompt * dim, 4);
        cache.append(&gpu, &kv, &kv, &[prompt])?;
        let plan = Attention::new()
            .causal(wgpu_attention::Causal::BottomRight)
            .kv_lens(vec![prompt as u32 + 1])
            .plan(
                &gpu,
                wgpu_attention::Dims {
                    batch,
                    heads,
                    kv_heads,
                    q_len: 1,
                    kv_len: cache.capacity(),
                    head_dim: dim,
                    v_head_dim: dim,
                },
            )?;
        let times = time_calls(&gpu, || {
            cache.append(&gpu, &token, &token, &[1])?;
            Ok(cache.attend(&gpu, &q, &Attention::new())?.o)
        })?;
        let what = format!(
            "decode step{}: append + attend, H=8/2 D=64 S~{}, f32 ({})",
            if rotary.is_some() { " with RoPE" } else { "" },
            prompt + CALLS,
            plan.name()
        );
        line(&what, times);
    }
    Ok(())
}
