//! A multi-head attention layer loaded from a `.safetensors` file with PyTorch's state-dict
//! names, run on the GPU and checked against its CPU version.
//!
//! `cargo run --release --example mha_layer`. The example writes the file itself (random
//! weights) so it needs nothing downloaded; point `MhaWeights::from_safetensors` at a real
//! `nn.MultiheadAttention` state dict saved with `safetensors.torch.save_file` the same way.

use std::collections::HashMap;

use safetensors::tensor::TensorView;
use wgpu_attention::cpu::mha_reference;
use wgpu_attention::{Attention, Causal, Gpu, MhaConfig, MhaWeights, MultiHeadAttention};

fn pseudo_random(n: usize, seed: u32, scale: f32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(2_654_435_761) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x as f32 / u32::MAX as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Grouped-query self-attention: 128 wide, 8 query heads over 2 kv heads.
    let config = MhaConfig {
        kv_heads: 2,
        ..MhaConfig::new(128, 8)
    };
    let (e, kv) = (config.embed_dim, config.kv_width());
    let scale = 1.0 / (e as f32).sqrt();

    // The state dict PyTorch would save: in_proj packs W_q, W_k, W_v by rows.
    let tensors: Vec<(&str, Vec<f32>, Vec<usize>)> = vec![
        (
            "in_proj_weight",
            pseudo_random((e + 2 * kv) * e, 1, scale),
            vec![e + 2 * kv, e],
        ),
        (
            "in_proj_bias",
            pseudo_random(e + 2 * kv, 2, 0.1),
            vec![e + 2 * kv],
        ),
        (
            "out_proj.weight",
            pseudo_random(e * e, 3, scale),
            vec![e, e],
        ),
        ("out_proj.bias", pseudo_random(e, 4, 0.1), vec![e]),
    ];
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|(name, data, shape)| {
            (
                format!("attn.{name}"),
                bytemuck::cast_slice(data).to_vec(),
                shape.clone(),
            )
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = bytes
        .iter()
        .map(|(name, data, shape)| {
            Ok((
                name.clone(),
                TensorView::new(safetensors::Dtype::F32, shape.clone(), data)?,
            ))
        })
        .collect::<Result<_, safetensors::SafeTensorError>>()?;
    let file = std::env::temp_dir().join(format!(
        "wgpu-attention-mha-{}.safetensors",
        std::process::id()
    ));
    safetensors::serialize_to_file(views, None::<HashMap<String, String>>, &file)?;
    println!("wrote {}", file.display());

    let weights = MhaWeights::from_safetensors(&config, &std::fs::read(&file)?, "attn.")?;
    std::fs::remove_file(&file)?;
    let gpu = Gpu::new()?;
    let layer = MultiHeadAttention::new(&gpu, config, &weights)?;

    let (batch, seq) = (2, 50);
    let x = pseudo_random(batch * seq * e, 5, 1.0);
    let input = gpu.upload(&x, [batch, seq, e])?;
    let opts = Attention::new().causal(Causal::TopLeft);
    let out = layer.forward(
        &gpu,
        &input,
        &input,
        &input,
        &opts.clone().return_weights(true),
    )?;
    let got = out.out.download(&gpu)?;
    let averaged = out.weights.expect("asked for").download(&gpu)?;

    let (want, want_w) = mha_reference(
        &config,
        &weights,
        &x,
        &x,
        &x,
        (batch, seq, seq),
        &opts,
        true,
    )?;
    let err = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    let werr = averaged
        .iter()
        .zip(want_w.as_deref().unwrap_or(&[]))
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    println!(
        "layer on {}: out [{batch}, {seq}, {e}], max |GPU - CPU| = {err:.2e}; head-averaged weights max error {werr:.2e}",
        gpu.describe()
    );
    assert!(err < 1e-4 && werr < 1e-5);
    Ok(())
}
