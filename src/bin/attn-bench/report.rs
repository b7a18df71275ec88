//! What a run found: the table, JSON lines or CSV, and the SVG plot.

use std::fmt::Write as _;

use wgpu_attention::Dims;

use crate::{Args, DTypeName, PathName};

/// One measured row.
pub(crate) struct Row {
    pub(crate) path: PathName,
    pub(crate) dtype: DTypeName,
    pub(crate) dims: Dims,
    pub(crate) causal: bool,
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
    /// The path, with the storage type when it is not f32: `gpu-fused[bf16]`.
    fn label(&self) -> String {
        match self.dtype {
            DTypeName::F32 => self.path.to_string(),
            other => format!("{}[{other}]", self.path),
        }
    }
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

pub(crate) fn print_rows(args: &Args, device: &str, rows: &[Row]) {
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

pub(crate) fn plot(
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
