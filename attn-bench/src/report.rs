//! What a run found: the table, JSON lines or CSV, and the SVG plot.

use std::fmt::Write as _;

use wgpu_attention::Dims;

use crate::{Args, DTypeName, PathName};

/// One measured row.
pub(crate) struct Row {
    pub(crate) path: PathName,
    pub(crate) dtype: DTypeName,
    pub(crate) dims: Dims,
    /// `none`, `top-left` or `bottom-right`.
    pub(crate) alignment: &'static str,
    /// For `gpu-auto`: the path `Path::Auto` chose.
    pub(crate) chose: Option<&'static str>,
    pub(crate) median_ms: f64,
    pub(crate) min_ms: f64,
    pub(crate) max_ms: f64,
    pub(crate) gflops: f64,
    pub(crate) gbps: f64,
    pub(crate) max_abs_err: f64,
    pub(crate) rel_err: f64,
    pub(crate) timing: &'static str,
    pub(crate) checked_on: String,
    pub(crate) note: String,
}

impl Row {
    /// The path, with `Path::Auto`'s choice: `gpu-auto (fused)`.
    fn label(&self) -> String {
        match self.chose {
            Some(chose) => format!("{} ({chose})", self.path),
            None => self.path.to_string(),
        }
    }

    /// How many times faster than `cpu-fast` on the same shape and dtype, if it ran.
    fn speedup(&self, rows: &[Row]) -> Option<f64> {
        let cpu = rows.iter().find(|r| {
            r.path == PathName::CpuFast && r.dims == self.dims && r.dtype == self.dtype
        })?;
        self.path.on_gpu().then(|| cpu.median_ms / self.median_ms)
    }
}

/// A field of a record: a number (bare in JSON and CSV), a string (quoted), or nothing (`null`
/// in JSON, empty in CSV).
enum Field {
    Num(String),
    Text(String),
    Missing,
}

/// One row as named fields, the single source of the JSON and CSV outputs.
fn record(args: &Args, device: &str, r: &Row, rows: &[Row]) -> Vec<(&'static str, Field)> {
    use Field::{Missing, Num, Text};
    let d = r.dims;
    let num = |x: usize| Num(x.to_string());
    vec![
        ("path", Text(r.path.to_string())),
        ("chose", r.chose.map_or(Missing, |c| Text(c.to_string()))),
        ("dtype", Text(r.dtype.to_string())),
        ("device", Text(device.to_string())),
        ("batch", num(d.batch)),
        ("heads", num(d.heads)),
        ("kv_heads", num(d.kv_heads)),
        ("q_len", num(d.q_len)),
        ("kv_len", num(d.kv_len)),
        ("head_dim", num(d.head_dim)),
        ("v_head_dim", num(d.v_head_dim)),
        ("causal", Text(r.alignment.to_string())),
        ("options", Text(args.llm_options())),
        ("median_ms", Num(format!("{:.4}", r.median_ms))),
        ("min_ms", Num(format!("{:.4}", r.min_ms))),
        ("max_ms", Num(format!("{:.4}", r.max_ms))),
        ("gflops", Num(format!("{:.2}", r.gflops))),
        ("gbps", Num(format!("{:.2}", r.gbps))),
        (
            "speedup_vs_cpu_fast",
            r.speedup(rows).map_or(Missing, |x| Num(format!("{x:.3}"))),
        ),
        (
            "peak_fraction",
            args.peak_gflops
                .map_or(Missing, |p| Num(format!("{:.3}", r.gflops / p))),
        ),
        ("max_abs_err", Num(format!("{:.3e}", r.max_abs_err))),
        ("rel_err", Num(format!("{:.3e}", r.rel_err))),
        ("timing", Text(r.timing.to_string())),
        ("checked_on", Text(r.checked_on.clone())),
        ("note", Text(r.note.clone())),
    ]
}

/// `text` as a JSON string: quotes, backslashes and control characters escaped.
fn json_string(text: &str) -> String {
    let mut out = String::from('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The shape and options every row shares, for the table's header and the plot's title.
pub(crate) fn describe_problem(args: &Args) -> String {
    let kv_heads = args.kv_heads.unwrap_or(args.heads);
    let causal = match (args.causal, args.bottom_right) {
        (false, _) => "not causal",
        (true, false) => "causal (top-left)",
        (true, true) => "causal (bottom-right)",
    };
    let dtypes: Vec<String> = args.dtype.iter().map(|d| d.to_string()).collect();
    let llm = args.llm_options();
    let llm = if llm.is_empty() {
        llm
    } else {
        format!(", {llm}")
    };
    format!(
        "B={} H={} kv_heads={} D={}, {causal}{llm}, {}",
        args.batch,
        args.heads,
        kv_heads,
        args.head_dim,
        dtypes.join("/")
    )
}

pub(crate) fn print_rows(args: &Args, device: &str, software: bool, rows: &[Row]) {
    if args.json || args.csv {
        for (n, r) in rows.iter().enumerate() {
            let fields = record(args, device, r, rows);
            if args.json {
                let body: Vec<String> = fields
                    .iter()
                    .map(|(k, v)| match v {
                        Field::Num(x) => format!("\"{k}\": {x}"),
                        Field::Text(text) => format!("\"{k}\": {}", json_string(text)),
                        Field::Missing => format!("\"{k}\": null"),
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
                    Field::Num(x) => x.clone(),
                    Field::Text(text) => format!("\"{}\"", text.replace('"', "\"\"")),
                    Field::Missing => String::new(),
                })
                .collect();
            println!("{}", values.join(","));
        }
        return;
    }
    println!("device: {device}");
    println!(
        "cpu-fast kernel: {} (of {:?} on this CPU; WGPU_ATTENTION_CPU_KERNEL picks another)",
        wgpu_attention::cpu::CpuKernel::chosen(),
        wgpu_attention::cpu::CpuKernel::available()
            .iter()
            .map(|k| k.name())
            .collect::<Vec<_>>()
    );
    println!("problem: {}", describe_problem(args));
    let mut header = format!(
        "{:<26} {:<6} {:>6} {:>6} {:>11} {:>11} {:>11} {:>9} {:>8} {:>9}",
        "path", "dtype", "L", "S", "median ms", "min ms", "max ms", "GFLOP/s", "GB/s", "vs cpu"
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
        let speedup = r
            .speedup(rows)
            .map_or("-".to_string(), |x| format!("{x:.2}x"));
        let mut line = format!(
            "{:<26} {:<6} {:>6} {:>6} {:>11.3} {:>11.3} {:>11.3} {:>9.2} {:>8.2} {:>9}",
            r.label(),
            r.dtype.to_string(),
            d.q_len,
            d.kv_len,
            r.median_ms,
            r.min_ms,
            r.max_ms,
            r.gflops,
            r.gbps,
            speedup
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
            "  {} [{}] L={} S={}: {}",
            r.label(),
            r.dtype,
            r.dims.q_len,
            r.dims.kv_len,
            r.note
        );
    }
    println!(
        "vs cpu: times faster than cpu-fast on the same shape and dtype (higher is better); \
         GPU rows timed by GPU timestamps (gpu-ts) leave out the host's submission time, which \
         the CPU rows' wall clock includes."
    );
    if software && rows.iter().any(|r| r.path.on_gpu()) {
        println!(
            "note: the GPU rows ran on a software driver (the CPU emulating a GPU): they compare \
             kernels on this machine and say nothing about their speed on a real GPU."
        );
    }
}

/// GFLOP/s against the key length, log-log, one series per (path, dtype) with a fixed colour
/// per path (thick lines for f32, thin for half precision), titled with the problem and
/// the device.
pub(crate) fn plot(
    args: &Args,
    file: &std::path::Path,
    device: &str,
    rows: &[Row],
) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    const COLOURS: [RGBColor; 6] = [
        RGBColor(90, 90, 90),
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
    ];
    let root = SVGBackend::new(file, (960, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let xs = rows.iter().map(|r| r.dims.kv_len as f64);
    let min_x = xs.clone().fold(f64::INFINITY, f64::min).min(1e9);
    let max_x = xs.fold(1.0, f64::max);
    let ys = rows.iter().map(|r| r.gflops).filter(|&g| g > 0.0);
    let min_y = ys.clone().fold(f64::INFINITY, f64::min).min(1e9);
    let max_y = ys.fold(1e-6, f64::max);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("attention, {}, on {device}", describe_problem(args)),
            ("sans-serif", 15),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(
            (min_x / 1.2..max_x * 1.2).log_scale(),
            (min_y / 1.5..max_y * 1.5).log_scale(),
        )?;
    chart
        .configure_mesh()
        .x_desc("key length S")
        .y_desc("GFLOP/s (log)")
        .x_label_formatter(&|x| format!("{}", x.round() as u64))
        .y_label_formatter(&|y| format!("{y}"))
        .draw()?;
    let mut series: Vec<(PathName, DTypeName)> = Vec::new();
    for r in rows {
        if !series.contains(&(r.path, r.dtype)) {
            series.push((r.path, r.dtype));
        }
    }
    for (path, dtype) in series {
        let index = PathName::ALL.iter().position(|p| *p == path).unwrap_or(0);
        let colour = COLOURS[index % COLOURS.len()];
        let width = if dtype == DTypeName::F32 { 2 } else { 1 };
        let points: Vec<(f64, f64)> = rows
            .iter()
            .filter(|r| r.path == path && r.dtype == dtype && r.gflops > 0.0)
            .map(|r| (r.dims.kv_len as f64, r.gflops))
            .collect();
        chart
            .draw_series(LineSeries::new(points.clone(), colour.stroke_width(width)))?
            .label(format!("{path} {dtype}"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(width))
            });
        chart.draw_series(
            points
                .into_iter()
                .map(|p| Circle::new(p, 3, colour.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn row(path: PathName, median_ms: f64) -> Row {
        Row {
            path,
            dtype: DTypeName::F16,
            dims: Dims {
                batch: 1,
                heads: 2,
                kv_heads: 1,
                q_len: 3,
                kv_len: 5,
                head_dim: 8,
                v_head_dim: 8,
            },
            alignment: "bottom-right",
            chose: (path == PathName::GpuAuto).then_some("fused"),
            median_ms,
            min_ms: median_ms,
            max_ms: median_ms,
            gflops: 1.0,
            gbps: 1.0,
            max_abs_err: 0.0,
            rel_err: 0.0,
            timing: "wall",
            checked_on: "all".into(),
            note: String::new(),
        }
    }

    /// Shape, dtype and alignment are fields of their own; what is missing is `null` in JSON
    /// and empty in CSV; the speed-up is against cpu-fast on the same shape and dtype.
    #[test]
    fn records_have_separate_fields_and_empty_missing_values() {
        let args = crate::Args::try_parse_from(["attn-bench"]).unwrap();
        let rows = [row(PathName::CpuFast, 4.0), row(PathName::GpuAuto, 1.0)];
        let fields = record(&args, "dev", &rows[1], &rows);
        let get = |k: &str| fields.iter().find(|(name, _)| *name == k).map(|(_, v)| v);
        assert!(matches!(get("path"), Some(Field::Text(p)) if p == "gpu-auto"));
        assert!(matches!(get("chose"), Some(Field::Text(c)) if c == "fused"));
        assert!(matches!(get("dtype"), Some(Field::Text(d)) if d == "f16"));
        assert!(matches!(get("causal"), Some(Field::Text(c)) if c == "bottom-right"));
        assert!(matches!(get("v_head_dim"), Some(Field::Num(v)) if v == "8"));
        assert!(matches!(get("speedup_vs_cpu_fast"), Some(Field::Num(x)) if x == "4.000"));
        assert!(matches!(get("peak_fraction"), Some(Field::Missing)));
        let cpu = record(&args, "dev", &rows[0], &rows);
        assert!(
            cpu.iter()
                .any(|(k, v)| *k == "speedup_vs_cpu_fast" && matches!(v, Field::Missing))
        );
    }

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(json_string("a\"b\\c\u{1}é"), "\"a\\\"b\\\\c\\u0001é\"");
    }
}
