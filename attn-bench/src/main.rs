//! `attn-bench`: attention on the CPU and on every GPU path, side by side, in one run.
//!
//! For each shape of a sweep and each path it prints the median, min and max time over
//! `--reps` runs after `--warmup` runs, GFLOP/s (the FLOP convention of DESIGN.md), GB/s (the
//! bytes the path moves by its own traffic model), the fraction of `--peak-gflops` when given,
//! and the error against the f64 reference. GPU times come from timestamp queries when the
//! adapter has them (the table says `gpu-ts`), wall clock from submit to completion otherwise
//! (`wall`); the inputs are already on the device. `attn-bench --help` lists the flags; with
//! none it sweeps a small problem in well under a minute on a 2-core machine with lavapipe.

//!
//! `main.rs` holds the command line; `run.rs` times each path on each shape; `report.rs` prints
//! the table, JSON or CSV and draws the plot; `tune.rs` times the tile configurations
//! (`--tune`); `overhead.rs` the host's share of small calls (`--overhead`); `backward.rs`
//! forward plus backward (`--backward`); `rotary.rs` the rotary embedding alone (`--rotary`).

mod backward;
mod overhead;
mod report;
mod rotary;
mod run;
mod tune;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use wgpu_attention::DType;

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
    /// Query lengths to sweep, separated by commas or spaces.
    #[arg(long, value_delimiter = ',', num_args = 1.., default_values_t = [256usize, 512])]
    q_len: Vec<usize>,
    /// Key lengths to sweep (default: equal to each query length); paired with --q-len when
    /// both have the same count, else every combination.
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    kv_len: Vec<usize>,
    /// Head dim (Q, K and V).
    #[arg(long, default_value_t = 64)]
    head_dim: usize,
    /// Causal masking, top-left aligned (PyTorch's is_causal) unless --bottom-right.
    #[arg(long)]
    causal: bool,
    /// With --causal: bottom-right alignment (FlashAttention's; what a KV cache needs). The
    /// two differ only when q_len != kv_len.
    #[arg(long, requires = "causal")]
    bottom_right: bool,
    /// ALiBi with the slopes of Press et al., 2^(-8 (h + 1) / heads), computed in the kernels.
    #[arg(long)]
    alibi: bool,
    /// Learnable attention sinks (gpt-oss): one logit per query head (fixed values near 0).
    #[arg(long)]
    sinks: bool,
    /// A sliding window of this many keys before each query's diagonal (and none after).
    #[arg(long)]
    window: Option<usize>,
    /// The GPU paths read K and V through a block table from pools of pages of this many
    /// tokens (vLLM's layout; pages shuffled), the CPU paths from contiguous K and V: the
    /// cost of paging. Each --kv-len must be a multiple of it.
    #[arg(long)]
    page_size: Option<usize>,
    /// Pack the batch (FlashAttention's varlen): sequence b of B has
    /// `q_len * (1 - b / (2 B))` queries and `kv_len * (1 - b / (2 B))` keys, concatenated
    /// without padding; every path but the three-pass one runs it packed, and GFLOP/s count
    /// the real rows.
    #[arg(long)]
    varlen: bool,
    /// Dropout on the attention weights with this probability (training; seed 0): every path
    /// drops the same weights.
    #[arg(long)]
    dropout: Option<f32>,
    /// A score or mask mod of the user's own kind (`ScoreMod`, FlexAttention's): `distance`
    /// subtracts a per-head slope (from its data) times |i - j| from each score (what ALiBi
    /// computes built in), `chunked` keeps keys of the query's own chunk of 64 (Llama 4's
    /// chunked attention; with --causal, up to the query) as a key range, `chunked-mask` the
    /// same as a mask mod (which skips no tile).
    #[arg(long)]
    score_mod: Option<ScoreModName>,
    /// With --window: the first keys every query also sees (StreamingLLM's sink keys).
    #[arg(long, requires = "window")]
    sink_keys: Option<usize>,
    /// Storage types of Q, K, V and O to sweep, separated by commas or spaces (accumulation is
    /// f32).
    #[arg(long, value_delimiter = ',', num_args = 1.., default_values_t = [DTypeName::F32])]
    dtype: Vec<DTypeName>,
    /// Paths to run, separated by commas or spaces; gpu-auto is whatever Path::Auto picks,
    /// named in its row.
    #[arg(long, value_delimiter = ',', num_args = 1.., default_values_t = [PathName::CpuReference, PathName::CpuFast, PathName::GpuThreePass, PathName::GpuFused, PathName::GpuDecode, PathName::GpuAuto])]
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
    /// Instead of the sweep: time every tile configuration, within --tune-seconds: the decode
    /// path (the decode-shaped kernel with 16, 32 or 64 invocations, with and without
    /// subgroups; the row-tiled kernel with 4 to 64 rows) on two decode shapes (B=1, H=32, 8 kv
    /// heads, D=128, S=16384, 1 and 4 queries), then the fused kernel's and the three-pass
    /// products' invocation blocks (4x4, 8x4, 8x8) on prefill shapes, and print the fastest as
    /// a line for the tile configuration table.
    #[arg(long)]
    tune: bool,
    /// Time bound of --tune, in seconds; configurations not reached are reported as skipped.
    #[arg(long, default_value_t = 90)]
    tune_seconds: u64,
    /// Instead of the sweep: the host's time per call (up to submission, GPU work not waited
    /// for) and the end-to-end time, for a small prefill call and a decoding step.
    #[arg(long)]
    overhead: bool,
    /// Instead of the sweep: forward plus backward (dQ, dK, dV) on the GPU over the sweep's
    /// shapes, beside the f64 reference where it is small enough, with the gradients' errors.
    #[arg(long)]
    backward: bool,
    /// Instead of the sweep: rotary position embedding alone (`gpu::rotate` of Q over the
    /// sweep's lengths and dtypes, beside `cpu::rotate`), with its bandwidth.
    #[arg(long)]
    rotary: bool,
}

impl Args {
    /// The options of a run over the first `heads` query heads (fewer than `--heads` when the
    /// reference checks part of the problem): causal masking and the LLM options asked for.
    fn attention(&self, heads: usize) -> wgpu_attention::Attention {
        use wgpu_attention::{Attention, Causal};
        let mut opts = Attention::new();
        if self.causal {
            opts = opts.causal(if self.bottom_right {
                Causal::BottomRight
            } else {
                Causal::TopLeft
            });
        }
        let total = self.heads as f32;
        if self.alibi {
            opts = opts.alibi(
                (0..heads)
                    .map(|h| (-8.0 * (h + 1) as f32 / total).exp2())
                    .collect(),
            );
        }
        if self.sinks {
            opts = opts.sinks((0..heads).map(|h| (h as f32 * 0.7).sin()).collect());
        }
        if let Some(left) = self.window {
            opts = opts.window(left, 0);
        }
        if let Some(n) = self.sink_keys {
            opts = opts.sink_keys(n);
        }
        if let Some(p) = self.dropout {
            opts = opts.dropout(p, 0);
        }
        if let Some(m) = self.score_mod {
            opts = opts.score_mod(m.score_mod(heads, self.heads));
        }
        opts
    }

    /// The LLM options of the run, in words ("" when none).
    fn llm_options(&self) -> String {
        let mut parts = Vec::new();
        if self.alibi {
            parts.push("ALiBi".to_string());
        }
        if self.sinks {
            parts.push("sinks".to_string());
        }
        if let Some(w) = self.window {
            parts.push(format!("window {w}"));
        }
        if let Some(n) = self.sink_keys {
            parts.push(format!("{n} sink keys"));
        }
        if let Some(p) = self.page_size {
            parts.push(format!("GPU K/V in pages of {p}"));
        }
        if self.varlen {
            parts.push("packed sequences of falling lengths".to_string());
        }
        if let Some(p) = self.dropout {
            parts.push(format!("dropout {p}"));
        }
        if let Some(m) = self.score_mod {
            parts.push(format!("{m:?} score mod").to_lowercase());
        }
        parts.join(", ")
    }
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
    /// Whatever `Path::Auto` picks for the shape (its row names the choice).
    GpuAuto,
}

impl PathName {
    /// Every path, in the order of the table (and the plot's fixed colours).
    const ALL: [PathName; 6] = [
        PathName::CpuReference,
        PathName::CpuFast,
        PathName::GpuThreePass,
        PathName::GpuFused,
        PathName::GpuDecode,
        PathName::GpuAuto,
    ];

    fn on_gpu(self) -> bool {
        !matches!(self, PathName::CpuReference | PathName::CpuFast)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ScoreModName {
    Distance,
    Chunked,
    ChunkedMask,
}

impl ScoreModName {
    /// The mod over the first `heads` of `total` query heads (slopes as ALiBi's).
    fn score_mod(self, heads: usize, total: usize) -> wgpu_attention::ScoreMod {
        use wgpu_attention::ScoreMod;
        match self {
            ScoreModName::Distance => {
                let slopes: Vec<f32> = (0..heads)
                    .map(|h| (-8.0 * (h + 1) as f32 / total as f32).exp2())
                    .collect();
                let f = slopes.clone();
                ScoreMod::new()
                    .score_wgsl("return s - attn_data_f32(h) * f32(max(i, j) - min(i, j));")
                    .score_cpu(move |s, _, h, i, j| s - f[h] as f64 * i.abs_diff(j) as f64)
                    .grad_wgsl("return 1.0;")
                    .grad_cpu(|_, _, _, _, _| 1.0)
                    .data_f32(&slopes)
            }
            // As a key range: the kernels skip the other chunks' tiles.
            ScoreModName::Chunked => ScoreMod::chunked(64),
            ScoreModName::ChunkedMask => ScoreMod::new()
                .mask_wgsl("return i / 64u == j / 64u;")
                .mask_cpu(|_, _, i, j| i / 64 == j / 64),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DTypeName {
    F32,
    F16,
    Bf16,
    /// OCP FP8 E4M3 (8-bit K/V caches; Q and O too, here).
    F8e4m3,
}

impl DTypeName {
    fn dtype(self) -> DType {
        match self {
            DTypeName::F32 => DType::F32,
            DTypeName::F16 => DType::F16,
            DTypeName::Bf16 => DType::Bf16,
            DTypeName::F8e4m3 => DType::F8E4M3,
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

/// Checks what clap cannot before anything runs: sizes, and that the plot can be written.
fn check_args(args: &Args) -> Result<(), String> {
    for (what, values) in [("--q-len", &args.q_len), ("--kv-len", &args.kv_len)] {
        if values.contains(&0) {
            return Err(format!("{what} must be at least 1"));
        }
    }
    let kv_heads = args.kv_heads.unwrap_or(args.heads);
    for (what, value) in [
        ("--batch", args.batch),
        ("--heads", args.heads),
        ("--kv-heads", kv_heads),
        ("--head-dim", args.head_dim),
        ("--reps", args.reps),
    ] {
        if value == 0 {
            return Err(format!("{what} must be at least 1"));
        }
    }
    if let Some(p) = args.dropout
        && !(0.0..=1.0).contains(&p)
    {
        return Err(format!("--dropout {p}: a probability, from 0 to 1"));
    }
    if args.varlen && args.page_size.is_some() {
        return Err("--varlen and --page-size do not combine".into());
    }
    if let Some(p) = args.page_size {
        let lens = if args.kv_len.is_empty() {
            &args.q_len
        } else {
            &args.kv_len
        };
        if p == 0 || lens.iter().any(|s| !s.is_multiple_of(p)) {
            return Err(format!(
                "--page-size {p}: every key length ({lens:?}) must be a positive multiple of it"
            ));
        }
    }
    if !args.heads.is_multiple_of(kv_heads) {
        return Err(format!(
            "--heads {} must be a multiple of --kv-heads {kv_heads}",
            args.heads
        ));
    }
    if let Some(file) = &args.plot {
        if args.tune || args.overhead || args.backward || args.rotary {
            return Err(
                "--plot draws the sweep; --tune, --overhead, --backward and --rotary draw nothing"
                    .into(),
            );
        }
        if file.extension().and_then(|e| e.to_str()) != Some("svg") {
            return Err(format!(
                "--plot {}: the plot is an SVG file (.svg)",
                file.display()
            ));
        }
        // A probe beside it, so that an existing plot survives a run that fails.
        let dir = match file.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let probe = dir.join(format!(".attn-bench-probe-{}", std::process::id()));
        std::fs::write(&probe, b"")
            .map_err(|e| format!("--plot {}: cannot write there: {e}", file.display()))?;
        let _ = std::fs::remove_file(&probe);
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = check_args(&args) {
        eprintln!("attn-bench: {e}");
        return ExitCode::FAILURE;
    }
    let result = if args.tune {
        tune::tune(&args)
    } else if args.overhead {
        overhead::overhead()
    } else if args.backward {
        backward::backward(&args)
    } else if args.rotary {
        rotary::rotary(&args)
    } else {
        run::run(&args)
    };
    match result {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_parse_with_commas_or_spaces() {
        for argv in [
            vec!["attn-bench", "--q-len", "64,128"],
            vec!["attn-bench", "--q-len", "64", "128"],
        ] {
            let args = Args::try_parse_from(&argv).unwrap();
            assert_eq!(args.q_len, [64, 128], "{argv:?}");
        }
        let args = Args::try_parse_from(["attn-bench", "--paths", "gpu-auto", "cpu-fast"]).unwrap();
        assert_eq!(args.paths, [PathName::GpuAuto, PathName::CpuFast]);
    }

    #[test]
    fn bottom_right_needs_causal() {
        assert!(Args::try_parse_from(["attn-bench", "--bottom-right"]).is_err());
        let args = Args::try_parse_from(["attn-bench", "--causal", "--bottom-right"]).unwrap();
        assert!(args.causal && args.bottom_right);
    }

    #[test]
    fn arguments_are_checked_before_running() {
        let bad = [
            vec!["attn-bench", "--q-len", "0"],
            vec!["attn-bench", "--reps", "0"],
            vec!["attn-bench", "--plot", "plot.png"],
            vec!["attn-bench", "--plot", "/no/such/directory/plot.svg"],
            vec!["attn-bench", "--kv-heads", "0"],
            vec!["attn-bench", "--heads", "8", "--kv-heads", "3"],
            vec!["attn-bench", "--tune", "--plot", "plot.svg"],
        ];
        for argv in bad {
            let args = Args::try_parse_from(&argv).unwrap();
            assert!(check_args(&args).is_err(), "{argv:?} passed");
        }
    }
}
