//! The device side of the masking options: one uniform and three small buffers that every
//! masking kernel binds (see `shaders/attention_mask.wgsl`, which reads them).

use bytemuck::{Pod, Zeroable};
use wgpu::util::DeviceExt;

use crate::error::{Error, Result};
use crate::gpu::context::{Gpu, GpuLimits};
use crate::spec::{Causal, Spec, broadcast_strides};

/// Mirrors `MaskParams` of `attention_mask.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct MaskParams {
    batch: u32,
    q_len: u32,
    kv_len: u32,
    causal: u32,
    flags: u32,
    softcap: f32,
    win_left: i32,
    win_right: i32,
    win_off: i32,
    _pad: [u32; 3],
    bias_stride: [u32; 4],
    mask_stride: [u32; 4],
}

const MASK_BIAS: u32 = 1;
const MASK_BOOL: u32 = 2;
const MASK_KV_LENS: u32 = 4;
const MASK_Q_LENS: u32 = 8;
const MASK_SOFTCAP: u32 = 16;
const MASK_WINDOW: u32 = 32;

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

pub(crate) fn check_binding(limits: &GpuLimits, what: &'static str, bytes: u64) -> Result<()> {
    if bytes > limits.max_storage_binding {
        return Err(Error::TooLarge {
            what,
            requested: bytes,
            max: limits.max_storage_binding,
            hint: " bytes (max_storage_buffer_binding_size)",
        });
    }
    Ok(())
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
    let device = &gpu.device;
    let storage = |label: &str, contents: &[u8]| {
        device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some(label),
            contents,
            usage: wgpu::BufferUsages::STORAGE,
        })
    };
    let bias = match &opts.bias {
        Some(bias) => {
            check_binding(&gpu.limits, "bias", bias.data.len() as u64 * 4)?;
            Some(storage(
                "wgpu-attention bias",
                bytemuck::cast_slice(&bias.data),
            ))
        }
        None => None,
    };
    let mask = match &opts.mask {
        Some(mask) => {
            let words = pack_mask(&mask.data);
            check_binding(&gpu.limits, "mask", words.len() as u64 * 4)?;
            Some(storage("wgpu-attention mask", bytemuck::cast_slice(&words)))
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
        Some(storage("wgpu-attention lens", bytemuck::cast_slice(&lens)))
    } else {
        None
    };

    let mut flags = 0;
    for (on, bit) in [
        (opts.bias.is_some(), MASK_BIAS),
        (opts.mask.is_some(), MASK_BOOL),
        (opts.kv_lens.is_some(), MASK_KV_LENS),
        (opts.q_lens.is_some(), MASK_Q_LENS),
        (opts.softcap.is_some(), MASK_SOFTCAP),
        (opts.window.is_some(), MASK_WINDOW),
    ] {
        if on {
            flags |= bit;
        }
    }
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
    let params = MaskParams {
        batch: d.batch as u32,
        q_len: d.q_len as u32,
        kv_len: d.kv_len as u32,
        causal: match opts.causal {
            None => 0,
            Some(Causal::TopLeft) => 1,
            Some(Causal::BottomRight) => 2,
        },
        flags,
        softcap: opts.softcap.unwrap_or(1.0),
        win_left,
        win_right,
        win_off,
        _pad: [0; 3],
        bias_stride: opts
            .bias
            .as_ref()
            .map_or([0; 4], |b| broadcast_strides(b.shape).map(|x| x as u32)),
        mask_stride: opts
            .mask
            .as_ref()
            .map_or([0; 4], |m| broadcast_strides(m.shape).map(|x| x as u32)),
    };
    let params = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some("wgpu-attention mask params"),
        contents: bytemuck::bytes_of(&params),
        usage: wgpu::BufferUsages::UNIFORM,
    });
    Ok(MaskBuffers {
        params,
        bias,
        mask,
        lens,
    })
}
