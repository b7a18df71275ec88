//! `attn-bench`: attention on the CPU and on every GPU path, side by side, in one run.
//!
//! For each shape of a sweep and each path it prints the median, min and max time over
//! `--reps` runs after `--warmup` runs, GFLOP/s (the FLOP convention of DESIGN.md), GB/s (the
//! bytes the path moves by its own traffic model), the fraction of `--peak-gflops` when given,
//! and the error against the f64 reference. GPU times come from timestamp queries when the
//! adapter has them (the table says `gpu-ts`), wall clock from submit to completion otherwise
//! (`wall`); the inputs are already on the device. `attn-bench --help` lists the flags; with
//! none it sweeps a small problem in well under a minute on a 2-core machine with lavapipe.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, ValueEnum};
use wgpu_attention::{Attention, Causal, DType, Dims, Gpu, Layout, Output, Path, Tensor, cpu};

/// Times attention on the CPU and the GPU paths and compares each with the f64 reference.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Batch size.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Query heads.
    #[arg(long, default_value_t = 8)]
    heads: usize,
    /// Key/value heads (default: heads).
    #[arg(long)]
    kv_heads: Option<usize>,
    /// Query lengths to sweep, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [256usize, 512])]
    q_len: Vec<usize>,
    /// Key lengths to sweep (default: equal to each query length); paired with --q-len when
    /// both have the same count, else every combination.
    #[arg(long, value_delimiter = ',')]
    kv_len: Vec<usize>,
    /// Head dim (Q, K and V).
    #[arg(long, default_value_t = 64)]
    head_dim: usize,
    /// Causal masking (top-left, i.e. PyTorch's is_causal; bottom-right when q_len != kv_len
    /// with --bottom-right).
    #[arg(long)]
    causal: bool,
    /// Bottom-right causal alignment.
    #[arg(long)]
    bottom_right: bool,
    /// Storage types of Q, K, V and O to sweep, comma-separated (accumulation is f32).
    #[arg(long, value_delimiter = ',', default_values_t = [DTypeName::F32])]
    dtype: Vec<DTypeName>,
    /// Paths to run, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [PathName::CpuReference, PathName::CpuFast, PathName::GpuThreePass, PathName::GpuFused, PathName::GpuDecode])]
    paths: Vec<PathName>,
    /// Runs before timing.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Timed runs.
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Check errors on the whole problem even when it is large (the f64 reference is slow).
    #[arg(long)]
    check_all: bool,
    /// The device's peak in GFLOP/s, to print the fraction of it each path reaches.
    #[arg(long)]
    peak_gflops: Option<f64>,
    /// Print JSON lines instead of a table.
    #[arg(long)]
    json: bool,
    /// Print CSV instead of a table.
    #[arg(long)]
    csv: bool,
    /// Draw GFLOP/s against sequence length per path into this SVG file.
    #[arg(long)]
    plot: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum PathName {
    /// The f64 oracle (materialised scores, one thread).
    CpuReference,
    /// Blocked online softmax, multi-threaded, f32.
    CpuFast,
    /// QK^T, masked softmax, P·V (scores materialised).
    GpuThreePass,
    /// Fused flash attention.
    GpuFused,
    /// Flash-decoding (keys split, GQA packed).
    GpuDecode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DTypeName {
    F32,
    F16,
    Bf16,
}

impl DTypeName {
    fn dtype(self) -> DType {
        match self {
            DTypeName::F32 => DType::F32,
            DTypeName::F16 => DType::F16,
            DTypeName::Bf16 => DType::Bf16,
        }
    }
}

impl std::fmt::Display for DTypeName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = self.to_possible_value().expect("no skipped variants");
        f.write_str(name.get_name())
    }
}

impl std::fmt::Display for PathName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = self.to_possible_value().expect("no skipped variants");
        f.write_str(name.get_name())
    }
}

/// One measured row.
struct Row {
    path: PathName,
    dtype: DTypeName,
    dims: Dims,
    causal: bool,
    median_ms: f64,
    min_ms: f64,
    max_ms: f64,
    gflops: f64,
    gbps: f64,
    max_abs_err: f64,
    rel_err: f64,
    timing: &'static str,
    checked_on: String,
    note: String,
}

impl Row {
    /// The path, with the storage type when it is not f32: `gpu-fused[bf16]`.
    fn label(&self) -> String {
        match self.dtype {
            DTypeName::F32 => self.path.to_string(),
            other => format!("{}[{other}]", self.path),
        }
    }
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

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("attn-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn shapes(args: &Args) -> Vec<(usize, usize)> {
    if args.kv_len.is_empty() {
        args.q_len.iter().map(|&l| (l, l)).collect()
    } else if args.kv_len.len() == args.q_len.len() {
        args.q_len
            .iter()
            .copied()
            .zip(args.kv_len.iter().copied())
            .collect()
    } else {
        let mut all = Vec::new();
        for &l in &args.q_len {
            for &s in &args.kv_len {
                all.push((l, s));
            }
        }
        all
    }
}

fn run(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
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

/// One row as named fields, the single source of the JSON and CSV outputs: `Ok` holds a number
/// (written bare), `Err` a string (quoted).
fn record(args: &Args, device: &str, r: &Row) -> Vec<(&'static str, Result<String, String>)> {
    let d = r.dims;
    let num = |x: String| Ok::<String, String>(x);
    vec![
        ("path", Err(r.label())),
        ("device", Err(device.to_string())),
        ("batch", num(d.batch.to_string())),
        ("heads", num(d.heads.to_string())),
        ("kv_heads", num(d.kv_heads.to_string())),
        ("q_len", num(d.q_len.to_string())),
        ("kv_len", num(d.kv_len.to_string())),
        ("head_dim", num(d.head_dim.to_string())),
        ("causal", num(r.causal.to_string())),
        ("median_ms", num(format!("{:.4}", r.median_ms))),
        ("min_ms", num(format!("{:.4}", r.min_ms))),
        ("max_ms", num(format!("{:.4}", r.max_ms))),
        ("gflops", num(format!("{:.2}", r.gflops))),
        ("gbps", num(format!("{:.2}", r.gbps))),
        (
            "peak_fraction",
            num(args
                .peak_gflops
                .map_or("null".into(), |p| format!("{:.3}", r.gflops / p))),
        ),
        ("max_abs_err", num(format!("{:.3e}", r.max_abs_err))),
        ("rel_err", num(format!("{:.3e}", r.rel_err))),
        ("timing", Err(r.timing.to_string())),
        ("checked_on", Err(r.checked_on.clone())),
        ("note", Err(r.note.clone())),
    ]
}

fn print_rows(args: &Args, device: &str, rows: &[Row]) {
    if args.json || args.csv {
        for (n, r) in rows.iter().enumerate() {
            let fields = record(args, device, r);
            if args.json {
                let body: Vec<String> = fields
                    .iter()
                    .map(|(k, v)| match v {
                        Ok(x) => format!("\"{k}\": {x}"),
                        Err(text) => format!("\"{k}\": {text:?}"),
                    })
                    .collect();
                println!("{{{}}}", body.join(", "));
                continue;
            }
            if n == 0 {
                let keys: Vec<&str> = fields.iter().map(|(k, _)| *k).collect();
                println!("{}", keys.join(","));
            }
            let values: Vec<String> = fields
                .iter()
                .map(|(_, v)| match v {
                    Ok(x) => x.clone(),
                    Err(text) => format!("{:?}", text),
                })
                .collect();
            println!("{}", values.join(","));
        }
        return;
    }
    println!("device: {device}");
    let mut header = format!(
        "{:<22} {:>5} {:>6} {:>6} {:>11} {:>11} {:>11} {:>9} {:>8}",
        "path", "B*H", "L", "S", "median ms", "min ms", "max ms", "GFLOP/s", "GB/s"
    );
    if args.peak_gflops.is_some() {
        header.push_str(" of peak");
    }
    let _ = write!(
        header,
        " {:>10} {:>10}  timing  error on",
        "max|err|", "rel err"
    );
    println!("{header}");
    for r in rows {
        let d = r.dims;
        let mut line = format!(
            "{:<22} {:>5} {:>6} {:>6} {:>11.3} {:>11.3} {:>11.3} {:>9.2} {:>8.2}",
            r.label(),
            d.batch * d.heads,
            d.q_len,
            d.kv_len,
            r.median_ms,
            r.min_ms,
            r.max_ms,
            r.gflops,
            r.gbps
        );
        if let Some(peak) = args.peak_gflops {
            let _ = write!(line, " {:>8.3}", r.gflops / peak);
        }
        let _ = write!(
            line,
            " {:>10.2e} {:>10.2e}  {:<6}  {}",
            r.max_abs_err, r.rel_err, r.timing, r.checked_on
        );
        println!("{line}");
    }
    for r in rows.iter().filter(|r| !r.note.is_empty()) {
        println!(
            "  {} L={} S={}: {}",
            r.label(),
            r.dims.q_len,
            r.dims.kv_len,
            r.note
        );
    }
}

fn plot(
    file: &std::path::Path,
    device: &str,
    rows: &[Row],
) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let root = SVGBackend::new(file, (900, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let max_x = rows.iter().map(|r| r.dims.kv_len).max().unwrap_or(1) as f64;
    let max_y = rows.iter().map(|r| r.gflops).fold(0.0, f64::max).max(1e-3) * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("attention GFLOP/s on {device}"), ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..max_x * 1.05, 0f64..max_y)?;
    chart
        .configure_mesh()
        .x_desc("sequence length (kv_len)")
        .y_desc("GFLOP/s")
        .draw()?;
    let paths: Vec<PathName> = {
        let mut seen = Vec::new();
        for r in rows {
            if !seen.contains(&r.path) {
                seen.push(r.path);
            }
        }
        seen
    };
    for (n, path) in paths.iter().enumerate() {
        let color = Palette99::pick(n).to_rgba();
        let points: Vec<(f64, f64)> = rows
            .iter()
            .filter(|r| r.path == *path && r.dtype == rows[0].dtype)
            .map(|r| (r.dims.kv_len as f64, r.gflops))
            .collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
            .label(path.to_string())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart.draw_series(
            points
                .into_iter()
                .map(|p| Circle::new(p, 3, color.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()?;
    root.present()?;
    Ok(())
}
