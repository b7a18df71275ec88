//! The three-pass path: `S = scale * Q K^T`, masked softmax of S in place, `O = P V`.
//!
//! It materialises the scores, so it is the path that can return the attention weights. Its
//! scratch is one chunk of scores `[bh_count, rows, kv_len]` in f32; the plan picks the chunks
//! so that the scratch fits one storage binding of the device: whole (batch, head) slabs while
//! one fits, query-row ranges of a single (batch, head) otherwise. Every chunk is encoded into
//! the same command buffer (one submit per call); wgpu orders the passes, so one scratch buffer
//! serves them all. When the caller wants the weights, a single-chunk plan writes them in place
//! and a multi-chunk plan copies each chunk into the weights buffer, which only has to fit
//! `max_buffer_size`, not a binding.

use super::{Io, masking, strides};
use crate::error::{Error, Result};
use crate::gpu::context::Gpu;
use crate::gpu::kernels::KernelKey;
use crate::gpu::kernels::uniforms::{PvParams, QkParams, SoftmaxParams, uniform_buffer};
use crate::gpu::limits::{DispatchSize, GpuLimits};
use crate::spec::Spec;

/// Rows and columns of one tile of the product kernels.
const TILE: u64 = crate::gpu::kernels::uniforms::TILE as u64;

/// The longest key range on a device that caps loop iterations per invocation (llvmpipe,
/// see [`GpuLimits::max_key_tiles_per_workgroup`]): `pv_product` loops `kv_len / 16` times
/// plus a fold every 16 slices, and llvmpipe stops an invocation after 65535 iterations.
const CAPPED_DEVICE_MAX_KV_LEN: u64 = 524_288;

/// One slice of the problem that runs with one scratch buffer: query rows
/// `row_start..row_start + rows` of (batch * head) entries `bh_start..bh_start + bh_count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    /// First flattened (batch * heads + head) index.
    pub bh_start: usize,
    /// Number of (batch, head) entries.
    pub bh_count: usize,
    /// First query row.
    pub row_start: usize,
    /// Number of query rows.
    pub rows: usize,
}

/// How the three-pass path will run a problem on a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreePassPlan {
    /// The chunks, in dispatch order.
    pub chunks: Vec<Chunk>,
    /// Bytes of score scratch (one chunk's worth).
    pub scratch_bytes: u64,
    /// Whether the chunking came from the storage-binding limit or the workgroup limit.
    pub reason: &'static str,
}

fn too_large(what: &'static str, requested: u64, max: u64, hint: &'static str) -> Error {
    Error::TooLarge {
        what,
        requested,
        max,
        hint,
    }
}

fn max_groups(limits: &GpuLimits) -> u64 {
    (limits.max_workgroups_per_dim.max(1) as u64).pow(3)
}

/// Workgroups the three kernels need for a chunk of `bh` entries of `rows` rows.
fn chunk_groups(bh: u64, rows: u64, kv_len: u64, v_head_dim: u64) -> u64 {
    let qk = bh * rows.div_ceil(TILE) * kv_len.div_ceil(TILE);
    let softmax = bh * rows;
    let pv = bh * rows.div_ceil(TILE) * v_head_dim.div_ceil(TILE);
    qk.max(softmax).max(pv)
}

impl ThreePassPlan {
    /// Plans `spec` for a device with `limits`.
    pub fn new(spec: &Spec<'_>, limits: &GpuLimits) -> Result<ThreePassPlan> {
        let d = spec.dims;
        let bh_total = (d.batch * d.heads) as u64;
        let (q_len, kv_len) = (d.q_len as u64, d.kv_len as u64);
        let max_elems = limits.max_storage_binding / 4;
        let max_groups = max_groups(limits);
        if limits.max_key_tiles_per_workgroup != u32::MAX && kv_len > CAPPED_DEVICE_MAX_KV_LEN {
            return Err(too_large(
                "kv_len on the three-pass path",
                kv_len,
                CAPPED_DEVICE_MAX_KV_LEN,
                " keys on a device that caps loop iterations (a CPU adapter); the fused path \
                 (Path::Fused) has no such limit",
            ));
        }
        if kv_len > max_elems {
            return Err(too_large(
                "one row of scores",
                kv_len * 4,
                limits.max_storage_binding,
                " bytes (max_storage_buffer_binding_size); kv_len is too long for the \
                 three-pass path",
            ));
        }
        let fits = |bh: u64, rows: u64| {
            bh * rows * kv_len <= max_elems
                && chunk_groups(bh, rows, kv_len, d.v_head_dim as u64) <= max_groups
        };
        let (bh_per, rows_per) = if fits(1, q_len) {
            // Whole (batch, head) slabs; as many per chunk as fit.
            let mut lo = 1u64;
            let mut hi = bh_total;
            while lo < hi {
                let mid = (lo + hi).div_ceil(2);
                if fits(mid, q_len) {
                    lo = mid
                } else {
                    hi = mid - 1
                }
            }
            (lo, q_len)
        } else {
            let mut lo = 0u64;
            let mut hi = q_len;
            while lo < hi {
                let mid = (lo + hi).div_ceil(2);
                if fits(1, mid) { lo = mid } else { hi = mid - 1 }
            }
            if lo == 0 {
                return Err(too_large(
                    "one query row",
                    chunk_groups(1, 1, kv_len, d.v_head_dim as u64),
                    max_groups,
                    " workgroups (max_compute_workgroups_per_dimension cubed)",
                ));
            }
            (1, lo)
        };
        let mut chunks = Vec::new();
        for bh_start in (0..bh_total).step_by(bh_per as usize) {
            let bh_count = bh_per.min(bh_total - bh_start);
            for row_start in (0..q_len).step_by(rows_per as usize) {
                chunks.push(Chunk {
                    bh_start: bh_start as usize,
                    bh_count: bh_count as usize,
                    row_start: row_start as usize,
                    rows: rows_per.min(q_len - row_start) as usize,
                });
            }
        }
        let reason = if chunks.len() == 1 {
            "one chunk"
        } else if bh_per * rows_per * kv_len * 4 > limits.max_storage_binding / 2 {
            "chunked to fit the storage-binding limit"
        } else {
            "chunked to fit the workgroup-count limit"
        };
        Ok(ThreePassPlan {
            chunks,
            scratch_bytes: bh_per * rows_per * kv_len * 4,
            reason,
        })
    }
}

/// The three kernels' uniforms for one chunk, and their workgroup counts (pure: tested
/// without a device).
struct ChunkParams {
    qk: QkParams,
    softmax: SoftmaxParams,
    pv: PvParams,
    workgroups: [u64; 3],
}

fn chunk_params(spec: &Spec<'_>, chunk: &Chunk, write_lse: bool) -> ChunkParams {
    let d = spec.dims;
    let rows = chunk.rows as u64;
    let tiles_i = rows.div_ceil(TILE) as u32;
    let tiles_j = (d.kv_len as u64).div_ceil(TILE) as u32;
    let tiles_n = (d.v_head_dim as u64).div_ceil(TILE) as u32;
    let bh_count = chunk.bh_count as u32;
    let [q_stride_b, q_stride_h, q_stride_s] = strides(spec, d.heads, d.q_len, d.head_dim);
    let [k_stride_b, k_stride_h, k_stride_s] = strides(spec, d.kv_heads, d.kv_len, d.head_dim);
    let [v_stride_b, v_stride_h, v_stride_s] = strides(spec, d.kv_heads, d.kv_len, d.v_head_dim);
    let [o_stride_b, o_stride_h, o_stride_s] = strides(spec, d.heads, d.q_len, d.v_head_dim);
    // Additive scores are not scaled.
    let scale = if spec.opts.additive.is_some() {
        1.0
    } else {
        spec.scale
    };
    ChunkParams {
        qk: QkParams {
            bh_start: chunk.bh_start as u32,
            bh_count,
            row_start: chunk.row_start as u32,
            rows: chunk.rows as u32,
            kv_len: d.kv_len as u32,
            head_dim: d.head_dim as u32,
            heads: d.heads as u32,
            group: d.group() as u32,
            tiles_i,
            tiles_j,
            q_stride_b,
            q_stride_h,
            q_stride_s,
            k_stride_b,
            k_stride_h,
            k_stride_s,
            scale,
        },
        softmax: SoftmaxParams {
            bh_start: chunk.bh_start as u32,
            bh_count,
            row_start: chunk.row_start as u32,
            rows: chunk.rows as u32,
            heads: d.heads as u32,
            write_lse: write_lse as u32,
        },
        pv: PvParams {
            v_scale: spec.opts.v_scale(),
            bh_start: chunk.bh_start as u32,
            bh_count,
            row_start: chunk.row_start as u32,
            rows: chunk.rows as u32,
            kv_len: d.kv_len as u32,
            v_head_dim: d.v_head_dim as u32,
            heads: d.heads as u32,
            group: d.group() as u32,
            tiles_i,
            tiles_n,
            v_stride_b,
            v_stride_h,
            v_stride_s,
            o_stride_b,
            o_stride_h,
            o_stride_s,
        },
        workgroups: [
            bh_count as u64 * tiles_i as u64 * tiles_j as u64,
            bh_count as u64 * rows,
            bh_count as u64 * tiles_i as u64 * tiles_n as u64,
        ],
    }
}

/// Encodes the three passes for every chunk of `plan` into `encoder`.
pub(crate) fn encode(
    gpu: &Gpu,
    spec: &Spec<'_>,
    plan: &ThreePassPlan,
    io: &Io<'_>,
    encoder: &mut wgpu::CommandEncoder,
) -> Result<()> {
    let d = spec.dims;
    let opts = spec.opts;
    let limits = &gpu.limits;
    let device = &gpu.device;
    io.check_bindings(limits)?;

    let masks = masking::upload(gpu, spec, encoder)?;

    // Scores go straight into the weights buffer when one chunk covers it and it is bindable.
    let weights_in_place = match io.weights {
        Some(w) => plan.chunks.len() == 1 && w.byte_len() <= limits.max_storage_binding,
        None => false,
    };
    let scratch = if weights_in_place {
        None
    } else {
        Some(gpu.scratch(
            "wgpu-attention scores",
            plan.scratch_bytes,
            wgpu::BufferUsages::COPY_SRC,
        ))
    };
    let scores: &wgpu::Buffer = match (&scratch, io.weights) {
        (Some(s), _) => s,
        (None, Some(w)) => w.buffer(),
        (None, None) => unreachable!("scratch exists unless the weights buffer serves"),
    };

    let [q_storage, k_storage, v_storage, o_storage] = io.storage(gpu);
    // Additive (Bahdanau) scores replace QK^T in pass 1: the same kernel specialised by a
    // pipeline constant, with the weight vector at binding 4 and no scale.
    let additive = opts.additive.as_ref().map(|w| {
        gpu.submission_buffer(
            "wgpu-attention additive weights",
            bytemuck::cast_slice(w),
            wgpu::BufferUsages::STORAGE,
        )
    });
    let qk = gpu.kernels.get(
        device,
        KernelKey::QkScores {
            q: q_storage,
            k: k_storage,
            additive: additive.is_some(),
            block: limits.gemm_block_for(spec.dims.head_dim as u64),
        },
    )?;
    let softmax = gpu.kernels.get(
        device,
        KernelKey::MaskedSoftmax {
            workgroup: gpu.kernels.row_workgroup,
            masks: gpu.kernels.mask_options(device, spec, false)?,
        },
    )?;
    let pv = gpu.kernels.get(
        device,
        KernelKey::PvProduct {
            v: v_storage,
            o: o_storage,
            block: limits.gemm_block_for(spec.dims.kv_len as u64),
        },
    )?;

    let max_wg = limits.max_workgroups_per_dim;
    let last_chunk = plan.chunks.len() - 1;
    for (index, chunk) in plan.chunks.iter().enumerate() {
        let ChunkParams {
            qk: qk_params,
            softmax: sm_params,
            pv: pv_params,
            workgroups: [qk_groups, sm_groups, pv_groups],
        } = chunk_params(spec, chunk, io.lse.is_some());
        let qk_params = uniform_buffer(gpu, &qk_params)?;
        let sm_params = uniform_buffer(gpu, &sm_params)?;
        let pv_params = uniform_buffer(gpu, &pv_params)?;
        let w = additive.as_ref().unwrap_or(&gpu.kernels.placeholder);
        let qk_bind = qk.bind(
            device,
            &[&qk_params, io.q.buffer(), io.k.buffer(), scores, w],
        );
        let sm_bind = softmax.bind(
            device,
            &[
                &sm_params,
                scores,
                masks.bias(gpu),
                masks.mask(gpu),
                masks.lens(gpu),
                io.lse.map_or(&gpu.kernels.placeholder_out, |t| t.buffer()),
                &masks.params,
            ],
        );
        let pv_bind = pv.bind(device, &[&pv_params, scores, io.v.buffer(), io.o.buffer()]);
        let dispatches = [
            (
                &qk,
                &qk_bind,
                DispatchSize::linear(qk_groups, max_wg, "qk_scores dispatch")?,
            ),
            (
                &softmax,
                &sm_bind,
                DispatchSize::linear(sm_groups, max_wg, "softmax dispatch")?,
            ),
            (
                &pv,
                &pv_bind,
                DispatchSize::linear(pv_groups, max_wg, "pv_product dispatch")?,
            ),
        ];
        {
            let mut pass = gpu.begin_pass(
                encoder,
                "wgpu-attention three-pass chunk",
                index == 0,
                index == last_chunk,
            );
            for (kernel, bind, size) in dispatches {
                kernel.dispatch(&mut pass, bind, size);
            }
        }
        if let (Some(scratch), Some(weights)) = (&scratch, io.weights) {
            let offset = ((chunk.bh_start * d.q_len + chunk.row_start) * d.kv_len * 4) as u64;
            let size = (chunk.bh_count * chunk.rows * d.kv_len * 4) as u64;
            encoder.copy_buffer_to_buffer(scratch, 0, weights.buffer(), offset, size);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{Attention, Dims};

    /// A chunk's workgroup counts are what `chunk_groups` planned with, and additive scores
    /// are not scaled.
    #[test]
    fn chunk_params_match_the_plan() {
        let d = Dims {
            batch: 2,
            heads: 4,
            kv_heads: 2,
            q_len: 100,
            kv_len: 130,
            head_dim: 16,
            v_head_dim: 70,
        };
        let chunk = Chunk {
            bh_start: 3,
            bh_count: 2,
            row_start: 0,
            rows: 100,
        };
        let opts = Attention::new().scale(0.5);
        let spec = opts.validate(d).unwrap();
        let p = chunk_params(&spec, &chunk, true);
        let [qk, sm, pv] = p.workgroups;
        assert_eq!(qk.max(sm).max(pv), chunk_groups(2, 100, 130, 70));
        assert_eq!((p.qk.tiles_i, p.qk.tiles_j, p.pv.tiles_n), (2, 3, 2));
        assert_eq!((p.qk.scale, p.softmax.write_lse, p.qk.group), (0.5, 1, 2));
        let additive = Attention::new().additive(vec![1.0; 16]);
        let spec = additive.validate(d).unwrap();
        assert_eq!(chunk_params(&spec, &chunk, false).qk.scale, 1.0);
    }
}
