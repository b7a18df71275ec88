//! The device side of the masking options: one uniform and three small buffers that every
//! masking kernel binds (see `shaders/lib/masking.wgsl`, which reads them). Whether a call has
//! per-key options (mask, bias, softcap) is not uploaded: it is compiled into the kernel
//! ([`MaskOptions`](crate::gpu::kernels::MaskOptions)).

use crate::error::Result;
use crate::gpu::context::Gpu;
use crate::gpu::kernels::uniforms::{
    CAUSAL_BOTTOM_RIGHT, CAUSAL_TOP_LEFT, MaskParams, uniform_buffer,
};
use crate::gpu::limits::check_binding;
use crate::spec::{Causal, Spec, broadcast_strides};

/// The buffers of one call's masking options; absent ones are the shared placeholder.
pub(crate) struct MaskBuffers {
    pub(crate) params: wgpu::Buffer,
    bias: Option<wgpu::Buffer>,
    mask: Option<wgpu::Buffer>,
    lens: Option<wgpu::Buffer>,
}

impl MaskBuffers {
    pub(crate) fn bias<'a>(&'a self, gpu: &'a Gpu) -> &'a wgpu::Buffer {
        self.bias.as_ref().unwrap_or(&gpu.kernels.placeholder)
    }
    pub(crate) fn mask<'a>(&'a self, gpu: &'a Gpu) -> &'a wgpu::Buffer {
        self.mask.as_ref().unwrap_or(&gpu.kernels.placeholder)
    }
    pub(crate) fn lens<'a>(&'a self, gpu: &'a Gpu) -> &'a wgpu::Buffer {
        self.lens.as_ref().unwrap_or(&gpu.kernels.placeholder)
    }
}

/// The mask as one byte per element, four to a u32 word.
fn pack_mask(data: &[bool]) -> Vec<u32> {
    let mut words = vec![0u32; data.len().div_ceil(4).max(1)];
    for (e, &allowed) in data.iter().enumerate() {
        if allowed {
            words[e / 4] |= 1 << ((e % 4) * 8);
        }
    }
    words
}

/// Uploads the masking options of `spec`.
pub(crate) fn upload(gpu: &Gpu, spec: &Spec<'_>) -> Result<MaskBuffers> {
    let d = spec.dims;
    let opts = spec.opts;
    let storage = |label: &str, contents: &[u8]| -> Result<wgpu::Buffer> {
        Ok(gpu.submission_buffer(label, contents, wgpu::BufferUsages::STORAGE))
    };
    let bias = match &opts.bias {
        Some(bias) => {
            check_binding(&gpu.limits, "bias", bias.data.len() as u64 * 4)?;
            Some(storage(
                "wgpu-attention bias",
                bytemuck::cast_slice(&bias.data),
            )?)
        }
        None => None,
    };
    let mask = match &opts.mask {
        Some(mask) => {
            let words = pack_mask(&mask.data);
            check_binding(&gpu.limits, "mask", words.len() as u64 * 4)?;
            Some(storage(
                "wgpu-attention mask",
                bytemuck::cast_slice(&words),
            )?)
        }
        None => None,
    };
    let lens = if opts.kv_lens.is_some() || opts.q_lens.is_some() {
        let mut lens = vec![0u32; 2 * d.batch];
        if let Some(kv) = &opts.kv_lens {
            lens[..d.batch].copy_from_slice(kv);
        }
        if let Some(q) = &opts.q_lens {
            lens[d.batch..].copy_from_slice(q);
        }
        Some(storage("wgpu-attention lens", bytemuck::cast_slice(&lens))?)
    } else {
        None
    };

    // Window sides past every key are unbounded; clamping keeps the kernel's i32 sums exact.
    let reach = (d.q_len + d.kv_len) as i32;
    let (win_left, win_right) = opts.window.map_or((0, 0), |(l, r)| {
        (l.min(reach as usize) as i32, r.min(reach as usize) as i32)
    });
    // 1 selects the bottom-right shift, which the kernel computes per sequence.
    let win_off = match spec.window_align() {
        Causal::TopLeft => 0,
        Causal::BottomRight => 1,
    };
    let [bias_stride_b, bias_stride_h, bias_stride_i, bias_stride_j] = opts
        .bias
        .as_ref()
        .map_or([0; 4], |b| broadcast_strides(b.shape).map(|x| x as u32));
    let [mask_stride_b, mask_stride_h, mask_stride_i, mask_stride_j] = opts
        .mask
        .as_ref()
        .map_or([0; 4], |m| broadcast_strides(m.shape).map(|x| x as u32));
    let params = uniform_buffer(
        gpu,
        &MaskParams {
            batch: d.batch as u32,
            q_len: d.q_len as u32,
            kv_len: d.kv_len as u32,
            causal: match opts.causal {
                None => 0,
                Some(Causal::TopLeft) => CAUSAL_TOP_LEFT,
                Some(Causal::BottomRight) => CAUSAL_BOTTOM_RIGHT,
            },
            has_kv_lens: opts.kv_lens.is_some() as u32,
            has_q_lens: opts.q_lens.is_some() as u32,
            has_window: opts.window.is_some() as u32,
            softcap: opts.softcap.unwrap_or(1.0),
            win_left,
            win_right,
            win_off,
            bias_stride_b,
            bias_stride_h,
            bias_stride_i,
            bias_stride_j,
            mask_stride_b,
            mask_stride_h,
            mask_stride_i,
            mask_stride_j,
        },
    )?;
    Ok(MaskBuffers {
        params,
        bias,
        mask,
        lens,
    })
}
