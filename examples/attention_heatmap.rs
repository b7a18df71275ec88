//! Where a head looks: one head's attention weights as a PNG heat map, queries down, keys
//! across, both axes labelled by position.
//!
//! `cargo run --release --example attention_heatmap -- [OUT.png]` (default
//! `target/attention_heatmap.png` in the crate, never the source tree). The weights come from the three-pass path (the one that
//! materialises them), for a small input with a causal mask and a sliding window, so the
//! picture shows the band those masks leave and where inside it the head puts its weight.
//! Colours run from dark (no weight) to yellow (the row's largest weight).

use image::{Rgb, RgbImage};
use wgpu_attention::{Attention, Causal, Dims, Gpu};

/// 3 x 5 glyphs, one row per u8 (bit 2 = left column).
const DIGITS: [[u8; 5]; 10] = [
    [0b111, 0b101, 0b101, 0b101, 0b111],
    [0b010, 0b110, 0b010, 0b010, 0b111],
    [0b111, 0b001, 0b111, 0b100, 0b111],
    [0b111, 0b001, 0b111, 0b001, 0b111],
    [0b101, 0b101, 0b111, 0b001, 0b001],
    [0b111, 0b100, 0b111, 0b001, 0b111],
    [0b111, 0b100, 0b111, 0b101, 0b111],
    [0b111, 0b001, 0b010, 0b010, 0b010],
    [0b111, 0b101, 0b111, 0b101, 0b111],
    [0b111, 0b101, 0b111, 0b001, 0b111],
];
const LETTER_Q: [u8; 5] = [0b111, 0b101, 0b101, 0b111, 0b001];
const LETTER_K: [u8; 5] = [0b101, 0b101, 0b110, 0b101, 0b101];

const CELL: u32 = 28;
const SCALE: u32 = 2;
const MARGIN: u32 = 44;

fn glyph(img: &mut RgbImage, rows: &[u8; 5], x: u32, y: u32) {
    for (r, bits) in rows.iter().enumerate() {
        for c in 0..3 {
            if bits & (0b100 >> c) != 0 {
                for dy in 0..SCALE {
                    for dx in 0..SCALE {
                        img.put_pixel(
                            x + c * SCALE + dx,
                            y + r as u32 * SCALE + dy,
                            Rgb([20, 20, 20]),
                        );
                    }
                }
            }
        }
    }
}

/// Draws `n` with its top-left corner at (x, y); returns the width used.
fn number(img: &mut RgbImage, n: usize, x: u32, y: u32) -> u32 {
    let text = n.to_string();
    for (i, ch) in text.bytes().enumerate() {
        glyph(
            img,
            &DIGITS[(ch - b'0') as usize],
            x + i as u32 * 4 * SCALE,
            y,
        );
    }
    text.len() as u32 * 4 * SCALE
}

/// A viridis-like ramp: dark violet (0) through teal to yellow (1).
fn color(t: f32) -> Rgb<u8> {
    let stops = [
        (68.0, 1.0, 84.0),
        (33.0, 145.0, 140.0),
        (253.0, 231.0, 37.0),
    ];
    let t = t.clamp(0.0, 1.0) * 2.0;
    let (i, f) = if t >= 2.0 {
        (1, 1.0)
    } else {
        (t as usize, t.fract())
    };
    let (a, b) = (stops[i], stops[i + 1]);
    let mix = |x: f32, y: f32| (x + (y - x) * f).round() as u8;
    Rgb([mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2)])
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = match std::env::args().nth(1) {
        Some(path) => std::path::PathBuf::from(path),
        None => {
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(std::path::PathBuf::from)
                .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
            std::fs::create_dir_all(&target)?;
            target.join("attention_heatmap.png")
        }
    };
    let gpu = Gpu::new()?;
    let dims = Dims::new(1, 2, 16, 16);
    // Queries and keys with a little structure: each position's vector rotates slowly, so
    // nearby positions are similar and the head attends along the diagonal.
    let vec_at = |n: usize, phase: f32| -> Vec<f32> {
        (0..n)
            .map(|e| {
                let (pos, d) = ((e / 16) % 16, e % 16);
                ((pos as f32 * 0.45 + phase) * (1.0 + d as f32 * 0.3)).cos() * 0.55
            })
            .collect()
    };
    let (q, k, v) = (
        vec_at(dims.q_elems(), 0.0),
        vec_at(dims.k_elems(), 0.1),
        vec_at(dims.v_elems(), 0.7),
    );
    let opts = Attention::new()
        .causal(Causal::TopLeft)
        .window(8, 0)
        .return_weights(true);
    let layout = opts.get_layout();
    let out = opts.run(
        &gpu,
        &gpu.upload(&q, dims.q_shape(layout))?,
        &gpu.upload(&k, dims.k_shape(layout))?,
        &gpu.upload(&v, dims.v_shape(layout))?,
    )?;
    let weights = out.weights.expect("asked for").download(&gpu)?;
    let (rows, cols) = (dims.q_len, dims.kv_len);
    let head0 = &weights[..rows * cols];

    let (w, h) = (
        MARGIN + cols as u32 * CELL + 8,
        MARGIN + rows as u32 * CELL + 8,
    );
    let mut img = RgbImage::from_pixel(w, h, Rgb([255, 255, 255]));
    for i in 0..rows {
        // Each row scaled to its own maximum: early rows spread over few keys would otherwise
        // wash out the rest.
        let row = &head0[i * cols..(i + 1) * cols];
        let top = row.iter().copied().fold(f32::MIN_POSITIVE, f32::max);
        for (j, &weight) in row.iter().enumerate() {
            let c = color(weight / top);
            for y in 0..CELL - 1 {
                for x in 0..CELL - 1 {
                    img.put_pixel(
                        MARGIN + j as u32 * CELL + x,
                        MARGIN + i as u32 * CELL + y,
                        c,
                    );
                }
            }
        }
    }
    // Axis titles (Q down the side, K across the top) and positions.
    glyph(&mut img, &LETTER_K, MARGIN - 14, 4);
    glyph(&mut img, &LETTER_Q, 4, MARGIN - 14);
    for j in 0..cols {
        let digits = j.to_string().len() as u32;
        number(
            &mut img,
            j,
            MARGIN + j as u32 * CELL + (CELL - digits * 4 * SCALE) / 2,
            MARGIN - 16,
        );
    }
    for i in 0..rows {
        number(
            &mut img,
            i,
            14,
            MARGIN + i as u32 * CELL + (CELL - 5 * SCALE) / 2,
        );
    }
    img.save(&path)?;
    println!(
        "wrote {}: head 0 of {rows} queries x {cols} keys on {}",
        path.display(),
        gpu.describe()
    );
    Ok(())
}
