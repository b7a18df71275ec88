//! Timing each path on each shape, and its error against the f64 reference.

use std::time::Instant;

use wgpu_attention::{Attention, DType, Dims, Gpu, Layout, Output, Path, Tensor, cpu};

use crate::report::{Row, plot, print_rows};
use crate::{Args, DTypeName, PathName, shapes};

pub(crate) fn values(n: usize, seed: u64) -> Vec<f32> {
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

/// Largest absolute and relative norm error of `got` against `want` (over `want`'s length).
pub(crate) fn errors(got: &[f32], want: &[f32]) -> (f64, f64) {
    let (mut max, mut num, mut den) = (0f64, 0f64, 0f64);
    for (&g, &w) in got.iter().zip(want) {
        let e = (g as f64 - w as f64).abs();
        max = max.max(e);
        num += e * e;
        den += (w as f64) * (w as f64);
    }
    (max, (num / den.max(f64::MIN_POSITIVE)).sqrt())
}

pub(crate) fn stats(mut ms: Vec<f64>) -> (f64, f64, f64) {
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
        // gpu-auto's rows are modelled as the path it chose (`Case::row`).
        PathName::GpuFused | PathName::GpuDecode | PathName::GpuAuto => {
            min + kv * (row_tiles * visited - 1.0).max(0.0)
        }
        PathName::CpuReference | PathName::CpuFast => min,
    }
}

/// How a row was measured: the timing source, the note under the table, and for `gpu-auto`
/// the path it chose.
struct How {
    timing: &'static str,
    note: String,
    chose: Option<&'static str>,
}

/// One shape and storage type of the sweep: its inputs (rounded to the dtype, so every path
/// and the oracle see the same values) and the oracle's output on the checked part.
struct Case {
    dtype_name: DTypeName,
    dims: Dims,
    opts: Attention,
    causal: bool,
    alignment: &'static str,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// The part the oracle covers: all of it when cheap, else batch 0 and the first kv-head
    /// group.
    check: Dims,
    checked_on: String,
    want: Vec<f32>,
    ref_secs: f64,
    /// With --varlen: the shapes of the packed Q, K and V, and the real rows' share of the
    /// padded problem's FLOPs and bytes.
    packed: Option<([[usize; 4]; 3], f64, f64)>,
}

/// --varlen's lengths: sequence b of `batch` has `len * (1 - b / (2 batch))` rows, at least 1.
fn falling_lengths(batch: usize, len: usize) -> Vec<usize> {
    (0..batch)
        .map(|b| (len - len * b / (2 * batch)).max(1))
        .collect()
}

/// Row offsets of sequences of `lens` rows.
fn offsets(lens: &[usize]) -> Vec<u32> {
    std::iter::once(0)
        .chain(lens.iter().scan(0u32, |at, &l| {
            *at += l as u32;
            Some(*at)
        }))
        .collect()
}

impl Case {
    fn new(
        args: &Args,
        dtype_name: DTypeName,
        q_len: usize,
        kv_len: usize,
    ) -> Result<Case, Box<dyn std::error::Error>> {
        let dtype = dtype_name.dtype();
        let dims = Dims {
            batch: args.batch,
            heads: args.heads,
            kv_heads: args.kv_heads.unwrap_or(args.heads),
            q_len,
            kv_len,
            head_dim: args.head_dim,
            v_head_dim: args.head_dim,
        };
        let causal = args.causal;
        let alignment = match (args.causal, args.bottom_right) {
            (false, _) => "none",
            (true, false) => "top-left",
            (true, true) => "bottom-right",
        };
        let mut opts = args.attention(dims.heads);
        let mut packed = None;
        let (mut n_q, mut n_k, mut n_v) = (dims.q_elems(), dims.k_elems(), dims.v_elems());
        if args.varlen {
            let (ql, kl) = (
                falling_lengths(dims.batch, q_len),
                falling_lengths(dims.batch, kv_len),
            );
            let (tq, tk) = (ql.iter().sum::<usize>(), kl.iter().sum::<usize>());
            let (h, hkv, d) = (dims.heads, dims.kv_heads, dims.head_dim);
            let pairs: usize = ql.iter().zip(&kl).map(|(a, b)| a * b).sum();
            let flops = pairs as f64 / (dims.batch * q_len * kv_len) as f64;
            let rows = (tq + tk) as f64 / (dims.batch * (q_len + kv_len)) as f64;
            let shapes = [[1, tq, h, d], [1, tk, hkv, d], [1, tk, hkv, d]];
            packed = Some((shapes, flops, rows));
            (n_q, n_k, n_v) = (tq * h * d, tk * hkv * d, tk * hkv * d);
            opts = opts.layout(Layout::Bshd).varlen(offsets(&ql), offsets(&kl));
        }
        let rounded = |n, seed| -> Vec<f32> {
            values(n, seed)
                .into_iter()
                .map(|x| dtype.round(x))
                .collect()
        };
        let (q, k, v) = (rounded(n_q, 1), rounded(n_k, 2), rounded(n_v, 3));
        // A packed batch is checked whole.
        let full_check = args.check_all || args.varlen || dims.flops(causal) < 4e9;
        let check = if full_check {
            dims
        } else {
            Dims {
                batch: 1,
                heads: dims.group(),
                kv_heads: 1,
                ..dims
            }
        };
        let start = Instant::now();
        let want = if args.varlen {
            cpu::reference(&q, &k, &v, check, &opts)?.o
        } else {
            cpu::reference(
                &q[..check.q_elems()],
                &k[..check.k_elems()],
                &v[..check.v_elems()],
                check,
                &args.attention(check.heads),
            )?
            .o
        };
        let ref_secs = start.elapsed().as_secs_f64();
        let checked_on = if full_check {
            "all".to_string()
        } else {
            format!("b=0,h<{}", dims.group())
        };
        Ok(Case {
            dtype_name,
            dims,
            opts,
            causal,
            alignment,
            q,
            k,
            v,
            check,
            checked_on,
            want,
            ref_secs,
            packed,
        })
    }

    /// The physical shapes of Q, K and V as the GPU paths get them.
    fn shapes(&self) -> [[usize; 4]; 3] {
        let d = self.dims;
        match &self.packed {
            Some((shapes, _, _)) => *shapes,
            None => [
                d.q_shape(Layout::Bhsd),
                d.k_shape(Layout::Bhsd),
                d.v_shape(Layout::Bhsd),
            ],
        }
    }

    /// Largest absolute and relative norm error of `o` against the oracle, on the checked part.
    fn errors(&self, o: &[f32]) -> (f64, f64) {
        errors(o, &self.want)
    }

    /// The row of `path` timed at `ms` (one figure per timed run) over `dims`.
    fn row(&self, path: PathName, dims: Dims, ms: Vec<f64>, o: Option<&[f32]>, how: How) -> Row {
        let How {
            timing,
            note,
            chose,
        } = how;
        let (median_ms, min_ms, max_ms) = stats(ms);
        let model = match chose {
            Some("three-pass") => PathName::GpuThreePass,
            _ => path,
        };
        let (max_abs_err, rel_err) = o.map_or((0.0, 0.0), |o| self.errors(o));
        let dtype = self.dtype_name.dtype();
        // A packed batch's rows of the padded problem (the oracle row is timed unpacked).
        let (flop_share, row_share) = match &self.packed {
            Some((_, f, r)) if path != PathName::CpuReference => (*f, *r),
            _ => (1.0, 1.0),
        };
        Row {
            path,
            dtype: self.dtype_name,
            dims,
            alignment: self.alignment,
            chose,
            median_ms,
            min_ms,
            max_ms,
            gflops: dims.flops(self.causal) * flop_share / median_ms / 1e6,
            gbps: bytes_moved(model, dims, self.causal, dtype) * row_share / median_ms / 1e6,
            max_abs_err,
            rel_err,
            timing,
            checked_on: self.checked_on.clone(),
            note,
        }
    }
}

/// `name (backend, driver ..., software driver)` of the adapter, or `none`.
fn describe_device(gpu: Option<&Gpu>) -> String {
    gpu.map_or("none".to_string(), |g| {
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
    })
}

/// Where page `n` of the paged pools goes: pages in a fixed shuffled order (a multiplicative
/// step coprime to the count), so no sequence's pages are contiguous.
fn page_table(d: Dims, page: usize) -> Vec<u32> {
    let pages = d.batch * d.kv_len / page;
    let step = (1..)
        .map(|s: usize| 7 + 2 * s)
        .find(|s| gcd(*s, pages) == 1)
        .unwrap_or(1);
    (0..pages).map(|n| (n * step % pages) as u32).collect()
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// The case's K and V as pools of pages (`[pages, page, kv_heads, width]`) in the order of
/// [`page_table`], and the number of pages.
fn paged_pools(case: &Case, page: usize) -> (Vec<f32>, Vec<f32>, usize) {
    let d = case.dims;
    let table = page_table(d, page);
    let pps = d.kv_len / page;
    let pool = |x: &[f32], w: usize| {
        let mut out = vec![0f32; x.len()];
        for b in 0..d.batch {
            for h in 0..d.kv_heads {
                for j in 0..d.kv_len {
                    let slot = table[b * pps + j / page] as usize * page + j % page;
                    let src = ((b * d.kv_heads + h) * d.kv_len + j) * w;
                    let dst = (slot * d.kv_heads + h) * w;
                    out[dst..dst + w].copy_from_slice(&x[src..src + w]);
                }
            }
        }
        out
    };
    (
        pool(&case.k, d.head_dim),
        pool(&case.v, d.v_head_dim),
        table.len(),
    )
}

/// Times `path` on `case`, moving `progress` on by one per run: `Ok(Err(why))` when the path
/// cannot run it.
fn measure(
    args: &Args,
    case: &Case,
    path: PathName,
    gpu: Option<(&Gpu, &(Tensor, Tensor, Tensor))>,
    progress: &indicatif::ProgressBar,
) -> Result<Result<Row, String>, Box<dyn std::error::Error>> {
    let d = case.dims;
    Ok(Ok(match path {
        PathName::CpuReference => {
            // The oracle ran once, when the case was made.
            progress.inc((args.warmup + args.reps) as u64);
            let how = How {
                timing: "wall",
                note: format!("oracle, one run on {}", case.checked_on),
                chose: None,
            };
            case.row(path, case.check, vec![case.ref_secs * 1e3], None, how)
        }
        PathName::CpuFast => {
            let mut ms = Vec::new();
            let mut o = Vec::new();
            for rep in 0..args.warmup + args.reps {
                let start = Instant::now();
                o = match cpu::fast(&case.q, &case.k, &case.v, d, &case.opts) {
                    Ok(out) => out.o,
                    Err(e) => {
                        // Options it does not compute (dropout): the row says why.
                        progress.inc((args.warmup + args.reps - rep) as u64);
                        return Ok(Err(e.to_string()));
                    }
                };
                if rep >= args.warmup {
                    ms.push(start.elapsed().as_secs_f64() * 1e3);
                }
                progress.inc(1);
            }
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
            let how = How {
                timing: "wall",
                note: format!("{threads} threads, {} kernel", cpu::CpuKernel::chosen()),
                chose: None,
            };
            case.row(path, d, ms, Some(&o), how)
        }
        PathName::GpuThreePass | PathName::GpuFused | PathName::GpuDecode | PathName::GpuAuto => {
            let (g, (tq, tk, tv)) = gpu.expect("a device for the GPU paths");
            let which = match path {
                PathName::GpuThreePass => Path::ThreePass,
                PathName::GpuFused => Path::Fused,
                PathName::GpuDecode => Path::Decode,
                _ => Path::Auto,
            };
            let mut opts = case.opts.clone().path(which);
            if let Some(p) = args.page_size {
                opts = opts.paged(p, page_table(d, p));
            }
            match time_gpu(g, &opts, d, (tq, tk, tv), args, progress) {
                Ok((ms, timing, o, plan)) => {
                    let how = How {
                        timing,
                        note: plan.reason(),
                        chose: (path == PathName::GpuAuto).then(|| plan.name()),
                    };
                    case.row(path, d, ms, Some(&o), how)
                }
                Err(e) => {
                    progress.inc((args.warmup + args.reps) as u64);
                    return Ok(Err(e.to_string()));
                }
            }
        }
    }))
}

pub(crate) fn run(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let needs_gpu = args.paths.iter().any(|p| p.on_gpu());
    let gpu = if needs_gpu { Some(Gpu::new()?) } else { None };
    let timed = gpu.as_ref().map(Gpu::with_timer).transpose()?.flatten();
    let device = describe_device(gpu.as_ref());
    let shapes = shapes(args);
    // One step per run of a path (warm-up runs included), so a long case still moves.
    let runs = args.dtype.len() * shapes.len() * args.paths.len() * (args.warmup + args.reps);
    let progress = indicatif::ProgressBar::new(runs as u64);
    progress.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} runs, {elapsed} elapsed, ~{eta} left: {msg}",
        )
        .expect("valid template"),
    );
    let mut rows = Vec::new();
    for &dtype_name in &args.dtype {
        for &(q_len, kv_len) in &shapes {
            let case = Case::new(args, dtype_name, q_len, kv_len)?;
            let dtype = dtype_name.dtype();
            let d = case.dims;
            let device_inputs = match &gpu {
                Some(g) => {
                    let [q_shape, k_shape, v_shape] = case.shapes();
                    let (k, v) = match args.page_size {
                        Some(p) => {
                            let (k_pool, v_pool, pages) = paged_pools(&case, p);
                            let pool = |w| [pages, p, d.kv_heads, w];
                            (
                                g.upload_as(&k_pool, pool(d.head_dim), dtype)?,
                                g.upload_as(&v_pool, pool(d.v_head_dim), dtype)?,
                            )
                        }
                        None => (
                            g.upload_as(&case.k, k_shape, dtype)?,
                            g.upload_as(&case.v, v_shape, dtype)?,
                        ),
                    };
                    Some((g.upload_as(&case.q, q_shape, dtype)?, k, v))
                }
                None => None,
            };
            let on_device = timed.as_ref().or(gpu.as_ref()).zip(device_inputs.as_ref());
            for &path in &args.paths {
                progress.set_message(format!("{path} [{dtype_name}] L={q_len} S={kv_len}"));
                match measure(args, &case, path, on_device, &progress)? {
                    Ok(row) => rows.push(row),
                    Err(e) => {
                        progress.suspend(|| eprintln!("{path} L={q_len} S={kv_len}: skipped: {e}"))
                    }
                }
            }
        }
    }
    progress.finish_and_clear();
    let software = gpu
        .as_ref()
        .is_some_and(|g| g.adapter_info().device_type == wgpu::DeviceType::Cpu);
    print_rows(args, &device, software, &rows);
    if let Some(file) = &args.plot {
        plot(args, file, &device, &rows)?;
        eprintln!("attn-bench: wrote {}", file.display());
    }
    Ok(())
}

/// Per-run milliseconds, the timing source, O, and the plan that ran.
pub(crate) type Timed = (Vec<f64>, &'static str, Vec<f32>, wgpu_attention::Plan);

pub(crate) fn time_gpu(
    gpu: &Gpu,
    opts: &Attention,
    d: Dims,
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    args: &Args,
    progress: &indicatif::ProgressBar,
) -> Result<Timed, wgpu_attention::Error> {
    let out = Output {
        o: gpu.empty_as(opts.o_shape_for(d), q.dtype())?,
        lse: None,
        weights: None,
    };
    // f16 inputs may take the fused kernel's 16-bit products.
    let plan = opts.plan_for_dtypes(gpu, d, [q.dtype(), k.dtype(), v.dtype()])?;
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
        progress.inc(1);
    }
    let o = out.o.download(gpu)?;
    Ok((ms, timing, o, plan))
}
