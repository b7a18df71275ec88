//! Masking options that live on the device: a boolean mask and per-sequence lengths kept in
//! device buffers ([`DeviceMask`], [`DeviceLens`]), and a bias as an f32 [`Tensor`]
//! ([`Attention::bias_tensor`]). A call with them uploads nothing for its masking options; a
//! program that reuses a mask, a bias or the lengths over many calls (a decoding loop, a fixed
//! padding mask) uploads them once. They are validated for shape and dtype when the call is;
//! their values are the caller's (a device buffer cannot be read without a round trip): the
//! kernels clamp lengths to `kv_len` and `q_len`, and a non-finite bias is outside the contract.
//!
//! ```no_run
//! use wgpu_attention::{Attention, Gpu};
//! let gpu = Gpu::new()?;
//! let (b, h, l, s, d) = (2, 4, 1, 300, 64);
//! let q = gpu.upload(&vec![0.1; b * h * l * d], [b, h, l, d])?;
//! let kv = gpu.upload(&vec![0.2; b * h * s * d], [b, h, s, d])?;
//! // Padding: sequence 0 has 300 keys, sequence 1 has 120; uploaded once.
//! let lens = gpu.upload_lens(Some(&[300, 120]), None)?;
//! let padding = gpu.upload_mask([b, 1, 1, s], &vec![true; b * s])?;
//! let opts = Attention::new().lens_tensor(&lens).mask_tensor(&padding);
//! for _ in 0..10 {
//!     let out = opts.run(&gpu, &q, &kv, &kv)?;
//! #   let _ = out;
//! }
//! // The lengths change in place (queued; the next call sees them).
//! lens.write(&gpu, Some(&[300, 121]), None)?;
//! # Ok::<(), wgpu_attention::Error>(())
//! ```

use crate::error::{Error, Result};
use crate::gpu::context::Gpu;
use crate::gpu::tensor::Tensor;
use crate::spec::Attention;

/// A boolean mask on the device, broadcastable to `[batch, heads, q_len, kv_len]` like
/// [`Attention::mask`]'s: one byte per element (0 masks the key out), four to a 32-bit word,
/// row-major over `shape`. Made by [`Gpu::upload_mask`], or around a buffer a kernel of the
/// application wrote in that format with [`DeviceMask::from_buffer`].
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceMask {
    pub(crate) buffer: wgpu::Buffer,
    pub(crate) shape: [usize; 4],
    pub(crate) device: u64,
}

/// Per-sequence lengths on the device, for [`Attention::lens_tensor`]: `kv_lens` and
/// `q_lens` as [`Attention::kv_lens`] and [`Attention::q_lens`] take them, each optional, in
/// one buffer of `2 * batch` 32-bit words (`kv_lens`, then `q_lens`).
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceLens {
    pub(crate) buffer: wgpu::Buffer,
    pub(crate) batch: usize,
    pub(crate) has_kv: bool,
    pub(crate) has_q: bool,
    pub(crate) device: u64,
}

/// The mask as one byte per element, four to a u32 word.
pub(crate) fn pack_mask(data: &[bool]) -> Vec<u32> {
    let mut words = vec![0u32; data.len().div_ceil(4).max(1)];
    for (e, &allowed) in data.iter().enumerate() {
        if allowed {
            words[e / 4] |= 1 << ((e % 4) * 8);
        }
    }
    words
}

/// Elements of `shape`, with checked arithmetic.
fn elements(what: &'static str, shape: [usize; 4]) -> Result<usize> {
    if shape.contains(&0) {
        return Err(Error::ZeroSize { what });
    }
    crate::spec::checked_elements(what, &shape)
}

const USAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_DST)
    .union(wgpu::BufferUsages::COPY_SRC);

impl Gpu {
    /// Uploads a boolean mask of `shape` (broadcastable to `[batch, heads, q_len, kv_len]`;
    /// `true` = attend) to the device, for [`Attention::mask_tensor`].
    pub fn upload_mask(&self, shape: [usize; 4], data: &[bool]) -> Result<DeviceMask> {
        let expected = elements("mask", shape)?;
        if data.len() != expected {
            return Err(Error::DataLength {
                what: "mask",
                dims: shape.to_vec(),
                expected,
                got: data.len(),
            });
        }
        let words = pack_mask(data);
        let bytes: &[u8] = bytemuck::cast_slice(&words);
        crate::gpu::limits::check_binding(&self.limits, "mask", bytes.len() as u64)?;
        let buffer = self.guarded("uploading a mask", || {
            crate::gpu::tensor::init_buffer(&self.device, "wgpu-attention mask", bytes, USAGE)
        })?;
        Ok(DeviceMask {
            buffer,
            shape,
            device: self.state.id,
        })
    }

    /// Uploads per-sequence lengths to the device, for [`Attention::lens_tensor`]: either or
    /// both of `kv_lens` and `q_lens`, one entry per batch element. Their values are checked
    /// against the call's `kv_len` and `q_len` only on the host form; on the device, longer
    /// lengths act as the full length.
    pub fn upload_lens(
        &self,
        kv_lens: Option<&[u32]>,
        q_lens: Option<&[u32]>,
    ) -> Result<DeviceLens> {
        let batch = lens_batch(kv_lens, q_lens)?;
        let words = lens_words(batch, kv_lens, q_lens);
        let buffer = self.guarded("uploading lengths", || {
            crate::gpu::tensor::init_buffer(
                &self.device,
                "wgpu-attention lens",
                bytemuck::cast_slice(&words),
                USAGE,
            )
        })?;
        Ok(DeviceLens {
            buffer,
            batch,
            has_kv: kv_lens.is_some(),
            has_q: q_lens.is_some(),
            device: self.state.id,
        })
    }
}

/// The batch of a pair of length vectors: what they agree on, and at least one given.
fn lens_batch(kv_lens: Option<&[u32]>, q_lens: Option<&[u32]>) -> Result<usize> {
    match (kv_lens, q_lens) {
        (None, None) => Err(Error::InvalidOption {
            what: "device lengths",
            value: "neither kv_lens nor q_lens".into(),
            why: "give at least one of them",
        }),
        (Some(kv), Some(q)) if kv.len() != q.len() => Err(Error::ShapeMismatch {
            what: "q_lens length (kv_lens has the batch)".into(),
            got: q.len(),
            expected: kv.len(),
        }),
        (Some(l), _) | (None, Some(l)) if l.is_empty() => Err(Error::ZeroSize {
            what: "device lengths",
        }),
        (Some(l), _) | (None, Some(l)) => Ok(l.len()),
    }
}

fn lens_words(batch: usize, kv_lens: Option<&[u32]>, q_lens: Option<&[u32]>) -> Vec<u32> {
    let mut words = vec![0u32; 2 * batch];
    if let Some(kv) = kv_lens {
        words[..batch].copy_from_slice(kv);
    }
    if let Some(q) = q_lens {
        words[batch..].copy_from_slice(q);
    }
    words
}

impl DeviceMask {
    /// Wraps a buffer holding a mask of `shape` in the device format (one byte per element,
    /// four to a word, row-major), written by the application on `gpu`'s device: the buffer
    /// needs `STORAGE` usage and `ceil(elements / 4) * 4` bytes.
    pub fn from_buffer(gpu: &Gpu, buffer: wgpu::Buffer, shape: [usize; 4]) -> Result<DeviceMask> {
        let elems = elements("mask", shape)?;
        let needed = (elems as u64).div_ceil(4) * 4;
        crate::gpu::tensor::check_wrapped_buffer("mask", &buffer, needed)?;
        Ok(DeviceMask {
            buffer,
            shape,
            device: gpu.state.id,
        })
    }

    /// The shape it broadcasts from.
    pub fn shape(&self) -> [usize; 4] {
        self.shape
    }
}

impl DeviceLens {
    /// Overwrites the lengths in place (queued: the next submission sees them, earlier ones
    /// the old values). The same of `kv_lens` and `q_lens` must be given as at upload, with
    /// the same batch.
    pub fn write(&self, gpu: &Gpu, kv_lens: Option<&[u32]>, q_lens: Option<&[u32]>) -> Result<()> {
        gpu.expect_device("the lengths written", self.device)?;
        let batch = lens_batch(kv_lens, q_lens)?;
        if batch != self.batch || kv_lens.is_some() != self.has_kv || q_lens.is_some() != self.has_q
        {
            return Err(Error::InvalidOption {
                what: "device lengths",
                value: format!(
                    "batch {batch}, kv_lens {}, q_lens {}",
                    kv_lens.is_some(),
                    q_lens.is_some()
                ),
                why: "a write gives the same lengths, for the same batch, as the upload did",
            });
        }
        let words = lens_words(batch, kv_lens, q_lens);
        gpu.guarded("writing lengths", || {
            gpu.queue
                .write_buffer(&self.buffer, 0, bytemuck::cast_slice(&words));
            Ok(())
        })
    }

    /// Batch elements it holds lengths for.
    pub fn batch(&self) -> usize {
        self.batch
    }
}

impl Attention {
    /// The additive bias as an f32 tensor on the device, its dims the shape it broadcasts from
    /// (as [`bias`](Attention::bias)'s `shape`). Replaces a host bias.
    pub fn bias_tensor(mut self, bias: &Tensor) -> Self {
        self.bias = None;
        self.device.bias = Some(bias.clone());
        self
    }

    /// The boolean mask on the device ([`Gpu::upload_mask`]). Replaces a host mask.
    pub fn mask_tensor(mut self, mask: &DeviceMask) -> Self {
        self.mask = None;
        self.device.mask = Some(mask.clone());
        self
    }

    /// Per-sequence lengths on the device ([`Gpu::upload_lens`]), which hold `kv_lens` and
    /// `q_lens` together: a call with them and host [`kv_lens`](Attention::kv_lens) or
    /// [`q_lens`](Attention::q_lens) as well is an [`Error::InvalidOption`].
    pub fn lens_tensor(mut self, lens: &DeviceLens) -> Self {
        self.device.lens = Some(lens.clone());
        self
    }
}
