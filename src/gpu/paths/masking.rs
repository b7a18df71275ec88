//! The device side of the masking options: one uniform and three small buffers that every
//! masking kernel binds (see `shaders/lib/masking.wgsl`, which reads them), or, for kernels
//! short of storage buffers (the backward), one buffer holding all three
//! ([`upload_packed`]). Whether a call has per-key options (mask, bias, softcap) is not
//! uploaded: it is compiled into the kernel ([`MaskOptions`](crate::gpu::kernels::MaskOptions)).

use crate::error::{Error, Result};
use crate::gpu::context::Gpu;
use crate::gpu::kernels::uniforms::{
    CAUSAL_BOTTOM_RIGHT, CAUSAL_TOP_LEFT, MaskParams, uniform_buffer,
};
use crate::gpu::limits::check_binding;
use crate::gpu::options::pack_mask;
use crate::spec::{Causal, Dropout, Spec, broadcast_strides};

/// The buffers of one call's masking options; absent ones are the shared placeholder.
pub(crate) struct MaskBuffers {
    pub(crate) params: wgpu::Buffer,
    bias: Option<wgpu::Buffer>,
    mask: Option<wgpu::Buffer>,
    lens: Option<wgpu::Buffer>,
    /// Where the sink logits start in `lens`, if the call has sinks.
    pub(crate) sink_offset: Option<u32>,
    /// Where a packed batch's offsets (`cu_seqlens_q`, then `cu_seqlens_k`) start in `lens`.
    pub(crate) varlen_offset: Option<u32>,
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

/// The bias's f32 bits or the mask's words: the host's, or a device buffer and how many words
/// of it they take.
/// A host bias is borrowed, not copied: the forward uploads it from the call's own slice on
/// every call.
enum Words<'a> {
    Host(std::borrow::Cow<'a, [u32]>),
    Device(wgpu::Buffer, usize),
}

impl Words<'_> {
    fn len(&self) -> usize {
        match self {
            Words::Host(host) => host.len(),
            Words::Device(_, n) => *n,
        }
    }
}

/// Uploads the masking options of `spec`, or binds their device forms (which must be
/// `gpu`'s). Device lengths with ALiBi slopes or sinks are copied (by `encoder`) into the
/// call's own buffer, which holds the slopes and sinks behind them.
pub(crate) fn upload(
    gpu: &Gpu,
    spec: &Spec<'_>,
    encoder: &mut wgpu::CommandEncoder,
) -> Result<MaskBuffers> {
    upload_as(gpu, spec, encoder, false)
}

/// [`upload`] with the mask's words and the bias's f32 bits in `lens`, behind everything else
/// (`shaders/lib/options_packed.wgsl`), so that a kernel binds one buffer for all three.
/// Device forms are copied in by `encoder`: a device mask or bias (or lengths) needs
/// `COPY_SRC` usage, as the crate's own buffers have.
pub(crate) fn upload_packed(
    gpu: &Gpu,
    spec: &Spec<'_>,
    encoder: &mut wgpu::CommandEncoder,
) -> Result<MaskBuffers> {
    upload_as(gpu, spec, encoder, true)
}

fn upload_as(
    gpu: &Gpu,
    spec: &Spec<'_>,
    encoder: &mut wgpu::CommandEncoder,
    pack_options: bool,
) -> Result<MaskBuffers> {
    let d = spec.dims;
    let opts = spec.opts;
    let on_device = &opts.device;
    let storage = |label: &str, contents: &[u8]| -> Result<wgpu::Buffer> {
        Ok(gpu.submission_buffer(label, contents, wgpu::BufferUsages::STORAGE))
    };
    if pack_options {
        for (what, buffer) in [
            (
                "the bias tensor",
                on_device.bias.as_ref().map(|t| t.buffer()),
            ),
            (
                "the mask tensor",
                on_device.mask.as_ref().map(|m| &m.buffer),
            ),
            (
                "the device lengths",
                on_device.lens.as_ref().map(|l| &l.buffer),
            ),
        ] {
            if let Some(b) = buffer
                && !b.usage().contains(wgpu::BufferUsages::COPY_SRC)
            {
                return Err(Error::InvalidOption {
                    what: "device-resident option",
                    value: what.into(),
                    why: "the backward copies device masks, biases and lengths into one \
                          buffer: their buffers need COPY_SRC usage",
                });
            }
        }
    }
    let bias = match &opts.bias {
        Some(bias) => {
            check_binding(&gpu.limits, "bias", bias.data.len() as u64 * 4)?;
            Some(Words::Host(bytemuck::cast_slice(&bias.data).into()))
        }
        None => match &on_device.bias {
            Some(t) => {
                gpu.expect_own("the bias tensor", t)?;
                check_binding(&gpu.limits, "bias", t.byte_len())?;
                Some(Words::Device(t.buffer().clone(), t.byte_len() as usize / 4))
            }
            None => None,
        },
    };
    let mask = match &opts.mask {
        Some(mask) => {
            let words = pack_mask(&mask.data);
            check_binding(&gpu.limits, "mask", words.len() as u64 * 4)?;
            Some(Words::Host(words.into()))
        }
        None => match &on_device.mask {
            Some(m) => {
                gpu.expect_device("the mask tensor", m.device)?;
                check_binding(&gpu.limits, "mask", m.buffer.size())?;
                let elems: usize = m.shape.iter().product();
                Some(Words::Device(m.buffer.clone(), elems.div_ceil(4)))
            }
            None => None,
        },
    };
    let len = |x: &Option<Words>| x.as_ref().map_or(0, Words::len);
    let (mask_words, bias_words) = if pack_options {
        (len(&mask), len(&bias))
    } else {
        (0, 0)
    };
    // Apart, each in a buffer of its own (the device's, or the host's uploaded).
    let apart = |x: &Option<Words>, label| match x {
        Some(Words::Host(host)) if !pack_options => {
            storage(label, bytemuck::cast_slice(host)).map(Some)
        }
        Some(Words::Device(buffer, _)) if !pack_options => Ok(Some(buffer.clone())),
        _ => Ok(None),
    };
    let bias_buffer = apart(&bias, "wgpu-attention bias")?;
    let mask_buffer = apart(&mask, "wgpu-attention mask")?;
    // A packed batch's lengths come from its offsets (which follow the block table).
    let packed = opts.varlen_lens();
    let (kv_lens, q_lens) = match &packed {
        Some((kv, q)) => (Some(kv), Some(q)),
        None => (opts.kv_lens.as_ref(), opts.q_lens.as_ref()),
    };
    let (has_kv_lens, has_q_lens) = match &on_device.lens {
        Some(l) => (l.has_kv, l.has_q),
        None => (kv_lens.is_some(), q_lens.is_some()),
    };
    // The lengths, then the ALiBi slopes and the sinks (as f32 bits).
    let alibi = opts.alibi.as_deref().unwrap_or(&[]);
    let sinks = opts.sinks.as_deref().unwrap_or(&[]);
    let alibi_offset = 2 * d.batch;
    let sink_offset = alibi_offset + alibi.len();
    let table = opts.pages.as_ref().map_or(&[][..], |p| &p.table[..]);
    let page_offset = sink_offset + sinks.len();
    let offsets: Vec<u32> = match &opts.varlen {
        Some((cq, ck)) => cq.iter().chain(ck).copied().collect(),
        None => Vec::new(),
    };
    let varlen_offset = page_offset + table.len();
    let mod_data = opts.score_mod.as_ref().map_or(Vec::new(), |m| m.words());
    let mod_offset = varlen_offset + offsets.len();
    // Packed: the mask's words, then the bias's bits.
    let mask_offset = mod_offset + mod_data.len();
    let bias_offset = mask_offset + mask_words;
    // Words behind the lengths: a device form of the lengths is then copied in front of them.
    let extra = !alibi.is_empty()
        || !sinks.is_empty()
        || !table.is_empty()
        || !mod_data.is_empty()
        || mask_words > 0
        || bias_words > 0;
    let lens = if let Some(l) = on_device.lens.as_ref().filter(|_| !extra) {
        gpu.expect_device("the device lengths", l.device)?;
        Some(l.buffer.clone())
    } else if kv_lens.is_some() || q_lens.is_some() || extra {
        let mut lens = vec![0u32; bias_offset + bias_words];
        if let Some(kv) = kv_lens {
            lens[..d.batch].copy_from_slice(kv);
        }
        if let Some(q) = q_lens {
            lens[d.batch..alibi_offset].copy_from_slice(q);
        }
        for (dst, x) in lens[alibi_offset..]
            .iter_mut()
            .zip(alibi.iter().chain(sinks))
        {
            *dst = x.to_bits();
        }
        lens[page_offset..varlen_offset].copy_from_slice(table);
        lens[varlen_offset..mod_offset].copy_from_slice(&offsets);
        lens[mod_offset..mask_offset].copy_from_slice(&mod_data);
        for (x, at, n) in [
            (&mask, mask_offset, mask_words),
            (&bias, bias_offset, bias_words),
        ] {
            if let Some(Words::Host(host)) = x.as_ref().filter(|_| n > 0) {
                lens[at..at + n].copy_from_slice(host);
            }
        }
        check_binding(
            &gpu.limits,
            if pack_options {
                "lengths, slopes, sinks, score mod data, mask and bias (packed into one buffer \
                 for the backward)"
            } else {
                "lengths, slopes, sinks and score mod data"
            },
            lens.len() as u64 * 4,
        )?;
        let buffer = storage("wgpu-attention lens", bytemuck::cast_slice(&lens))?;
        if let Some(l) = &on_device.lens {
            gpu.expect_device("the device lengths", l.device)?;
            // After the queue's write of the slopes and sinks, the device's lengths.
            encoder.copy_buffer_to_buffer(&l.buffer, 0, &buffer, 0, alibi_offset as u64 * 4);
        }
        // After the queue's write, the device forms of the mask and the bias.
        for (x, at, n) in [
            (&mask, mask_offset, mask_words),
            (&bias, bias_offset, bias_words),
        ] {
            if let Some(Words::Device(from, _)) = x.as_ref().filter(|_| n > 0) {
                encoder.copy_buffer_to_buffer(from, 0, &buffer, at as u64 * 4, n as u64 * 4);
            }
        }
        Some(buffer)
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
    let bias_shape =
        (opts.bias.as_ref().map(|b| b.shape)).or(on_device.bias.as_ref().map(|t| t.dims()));
    let mask_shape =
        (opts.mask.as_ref().map(|m| m.shape)).or(on_device.mask.as_ref().map(|m| m.shape));
    let [bias_stride_b, bias_stride_h, bias_stride_i, bias_stride_j] =
        bias_shape.map_or([0; 4], |s| broadcast_strides(s).map(|x| x as u32));
    let [mask_stride_b, mask_stride_h, mask_stride_i, mask_stride_j] =
        mask_shape.map_or([0; 4], |s| broadcast_strides(s).map(|x| x as u32));
    // Without dropout: nothing dropped, nothing scaled (the kernels do not read them).
    let dropout = opts.active_dropout().unwrap_or(Dropout { p: 0.0, seed: 0 });
    let [dropout_key_a, dropout_key_b] = dropout.keys();
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
            has_kv_lens: has_kv_lens as u32,
            has_q_lens: has_q_lens as u32,
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
            alibi_offset: alibi_offset as u32,
            alibi_stride_b: if alibi.len() == d.heads {
                0
            } else {
                d.heads as u32
            },
            sink_offset: sink_offset as u32,
            sink_keys: opts.sink_keys.min(d.kv_len) as u32,
            page_offset: page_offset as u32,
            varlen_offset: varlen_offset as u32,
            pages_per_seq: opts.pages.as_ref().map_or(0, |p| p.pages_per_seq(d.batch)) as u32,
            mask_offset: mask_offset as u32,
            bias_offset: bias_offset as u32,
            dropout_key_a,
            dropout_key_b,
            dropout_threshold: dropout.threshold(),
            dropout_scale: dropout.scale(),
            v_scale: opts.v_scale(),
            mod_offset: mod_offset as u32,
        },
    )?;
    Ok(MaskBuffers {
        params,
        bias: bias_buffer,
        mask: mask_buffer,
        lens,
        sink_offset: opts.sinks.is_some().then_some(sink_offset as u32),
        varlen_offset: opts.varlen.is_some().then_some(varlen_offset as u32),
    })
}
