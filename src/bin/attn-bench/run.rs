//! Timing each path on each shape, and its error against the f64 reference.

use std::time::Instant;

use wgpu_attention::{Attention, Causal, DType, Dims, Gpu, Layout, Output, Path, Tensor, cpu};

use crate::report::{Row, plot, print_rows};
use crate::{Args, PathName, shapes};

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

fn stats(mut ms: Vec<f64>) -> (f64, f64, f64) {
    ms.sort_by(f64::total_cmp);
    (ms[ms.len() / 2], ms[0], ms[ms.len() - 1])
}

/// Bytes a path moves by its traffic model: Q, K, V read and O written once, plus what the
/// path adds (the scores written and read twice by three-pass; K and V re-read by each row
/// tile of the fused kernel; the partial outputs of decode's splits).
fn bytes_moved(path: PathName, d: Dims, causal: bool, dtype: DType) -> f64 {
    let f = dtype.size() as f64;
    let min = f * (d.q_elems() + d.k_elems() + d.v_elems() + d.o_elems()) as f64;
    let kv = f * (d.k_elems() + d.v_elems()) as f64;
    let visited: f64 = if causal && d.q_len == d.kv_len {
        0.5
    } else {
        1.0
    };
    let row_tiles = (d.group() * d.q_len).div_ceil(64) as f64;
    match path {
        PathName::GpuThreePass => min + 16.0 * d.weights_elems() as f64,
        PathName::GpuFused | PathName::GpuDecode => min + kv * (row_tiles * visited - 1.0).max(0.0),
        PathName::CpuReference | PathName::CpuFast => min,
    }
}

pub(crate) fn run(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let needs_gpu = args.paths.iter().any(|p| {
        matches!(
            p,
            PathName::GpuThreePass | PathName::GpuFused | PathName::GpuDecode
        )
    });
    let gpu = if needs_gpu { Some(Gpu::new()?) } else { None };
    let timed = gpu.as_ref().and_then(Gpu::with_timer);
    let device = gpu.as_ref().map_or("none".to_string(), |g| {
        let info = g.adapter_info();
        let soft = if info.device_type == wgpu::DeviceType::Cpu {
            ", software driver"
        } else {
            ""
        };
        format!(
            "{} ({:?}, driver {} {}{soft})",
            info.name, info.backend, info.driver, info.driver_info
        )
    });
    let shapes = shapes(args);
    let mut cases = Vec::new();
    for &dtype in &args.dtype {
        for &shape in &shapes {
            cases.push((dtype, shape));
        }
    }
    let progress = indicatif::ProgressBar::new((cases.len() * args.paths.len()) as u64);
    progress.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}")
            .expect("valid template"),
    );
    let mut rows = Vec::new();
    for &(dtype_name, (q_len, kv_len)) in &cases {
        let dtype = dtype_name.dtype();
        let d = Dims {
            batch: args.batch,
            heads: args.heads,
            kv_heads: args.kv_heads.unwrap_or(args.heads),
            q_len,
            kv_len,
            head_dim: args.head_dim,
            v_head_dim: args.head_dim,
        };
        let mut opts = Attention::new();
        if args.causal || args.bottom_right {
            opts = opts.causal(if args.bottom_right {
                Causal::BottomRight
            } else {
                Causal::TopLeft
            });
        }
        let causal = args.causal || args.bottom_right;
        // Values as the dtype stores them, so every path and the oracle see the same inputs.
        let rounded = |n, seed| -> Vec<f32> {
            values(n, seed)
                .into_iter()
                .map(|x| dtype.round(x))
                .collect()
        };
        let q = rounded(d.q_elems(), 1);
        let k = rounded(d.k_elems(), 2);
        let v = rounded(d.v_elems(), 3);
        let flops = d.flops(causal);

        // The oracle on all of it when cheap, else on batch 0 and the first kv-head group.
        let full_check = args.check_all || flops < 4e9;
        let check = if full_check {
            d
        } else {
            Dims {
                batch: 1,
                heads: d.group(),
                kv_heads: 1,
                ..d
            }
        };
        let sub = |x: &[f32], n: usize| x[..n].to_vec();
        let (cq, ck, cv) = if full_check {
            (q.clone(), k.clone(), v.clone())
        } else {
            (
                sub(&q, check.q_elems()),
                sub(&k, check.k_elems()),
                sub(&v, check.v_elems()),
            )
        };
        let start = Instant::now();
        let want = cpu::reference(&cq, &ck, &cv, check, &opts)?;
        let ref_secs = start.elapsed().as_secs_f64();
        let checked_on = if full_check {
            "all".to_string()
        } else {
            format!("b=0,h<{}", d.group())
        };
        let errors = |o: &[f32]| {
            let (mut max, mut num, mut den) = (0f64, 0f64, 0f64);
            for (&g, &w) in o.iter().zip(&want.o) {
                let e = (g as f64 - w as f64).abs();
                max = max.max(e);
                num += e * e;
                den += (w as f64) * (w as f64);
            }
            (max, (num / den.max(f64::MIN_POSITIVE)).sqrt())
        };

        let device_inputs = match &gpu {
            Some(g) => {
                let layout = Layout::Bhsd;
                Some((
                    g.upload_as(&q, d.q_shape(layout), dtype)?,
                    g.upload_as(&k, d.k_shape(layout), dtype)?,
                    g.upload_as(&v, d.v_shape(layout), dtype)?,
                ))
            }
            None => None,
        };
        for &path in &args.paths {
            progress.set_message(format!("{path} L={q_len} S={kv_len}"));
            let row = match path {
                PathName::CpuReference => Row {
                    path,
                    dtype: dtype_name,
                    dims: check,
                    causal,
                    median_ms: ref_secs * 1e3,
                    min_ms: ref_secs * 1e3,
                    max_ms: ref_secs * 1e3,
                    gflops: check.flops(causal) / ref_secs / 1e9,
                    gbps: bytes_moved(path, check, causal, dtype) / ref_secs / 1e9,
                    max_abs_err: 0.0,
                    rel_err: 0.0,
                    timing: "wall",
                    checked_on: checked_on.clone(),
                    note: format!("oracle, one run on {checked_on}"),
                },
                PathName::CpuFast => {
                    let mut ms = Vec::new();
                    let mut o = Vec::new();
                    for rep in 0..args.warmup + args.reps {
                        let start = Instant::now();
                        o = cpu::fast(&q, &k, &v, d, &opts)?.o;
                        if rep >= args.warmup {
                            ms.push(start.elapsed().as_secs_f64() * 1e3);
                        }
                    }
                    let (median_ms, min_ms, max_ms) = stats(ms);
                    let (max_abs_err, rel_err) = errors(&o[..want.o.len()]);
                    Row {
                        path,
                        dtype: dtype_name,
                        dims: d,
                        causal,
                        median_ms,
                        min_ms,
                        max_ms,
                        gflops: flops / median_ms / 1e6,
                        gbps: bytes_moved(path, d, causal, dtype) / median_ms / 1e6,
                        max_abs_err,
                        rel_err,
                        timing: "wall",
                        checked_on: checked_on.clone(),
                        note: format!(
                            "{} threads",
                            std::thread::available_parallelism().map_or(1, |n| n.get())
                        ),
                    }
                }
                PathName::GpuThreePass | PathName::GpuFused | PathName::GpuDecode => {
                    let g = timed.as_ref().or(gpu.as_ref()).expect("gpu for gpu paths");
                    let (tq, tk, tv) = device_inputs.as_ref().expect("inputs on the device");
                    let which = match path {
                        PathName::GpuThreePass => Path::ThreePass,
                        PathName::GpuFused => Path::Fused,
                        _ => Path::Decode,
                    };
                    match time_gpu(g, &opts.clone().path(which), d, (tq, tk, tv), args) {
                        Ok((ms, timing, o, note)) => {
                            let (median_ms, min_ms, max_ms) = stats(ms);
                            let (max_abs_err, rel_err) = errors(&o[..want.o.len()]);
                            Row {
                                path,
                                dtype: dtype_name,
                                dims: d,
                                causal,
                                median_ms,
                                min_ms,
                                max_ms,
                                gflops: flops / median_ms / 1e6,
                                gbps: bytes_moved(path, d, causal, dtype) / median_ms / 1e6,
                                max_abs_err,
                                rel_err,
                                timing,
                                checked_on: checked_on.clone(),
                                note,
                            }
                        }
                        Err(e) => {
                            progress
                                .suspend(|| eprintln!("{path} L={q_len} S={kv_len}: skipped: {e}"));
                            progress.inc(1);
                            continue;
                        }
                    }
                }
            };
            rows.push(row);
            progress.inc(1);
        }
    }
    progress.finish_and_clear();
    print_rows(args, &device, &rows);
    if let Some(file) = &args.plot {
        plot(file, &device, &rows)?;
        eprintln!("attn-bench: wrote {}", file.display());
    }
    Ok(())
}

type Timed = (Vec<f64>, &'static str, Vec<f32>, String);

fn time_gpu(
    gpu: &Gpu,
    opts: &Attention,
    d: Dims,
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    args: &Args,
) -> Result<Timed, wgpu_attention::Error> {
    let out = Output {
        o: gpu.empty_as(d.o_shape(Layout::Bhsd), q.dtype())?,
        lse: None,
        weights: None,
    };
    let plan = opts.plan(gpu, d)?;
    let mut ms = Vec::new();
    let mut timing = "wall";
    for rep in 0..args.warmup + args.reps {
        let start = Instant::now();
        opts.run_into(gpu, q, k, v, &out)?;
        gpu.wait()?;
        let wall = start.elapsed().as_secs_f64();
        let secs = match gpu.last_gpu_seconds()? {
            Some(s) if s > 0.0 => {
                timing = "gpu-ts";
                s
            }
            _ => wall,
        };
        if rep >= args.warmup {
            ms.push(secs * 1e3);
        }
    }
    let o = out.o.download(gpu)?;
    Ok((ms, timing, o, plan.reason()))
}
