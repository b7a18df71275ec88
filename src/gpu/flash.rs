//! The fused path: flash attention in one kernel, O(N) memory.
//!
//! One workgroup per 64 query rows of a (batch, head) streams the keys its rows may see in
//! tiles of 64 through workgroup memory, keeping a running row maximum and sum (online
//! softmax) and the output in registers. Nothing of size `q_len * kv_len` exists anywhere: the
//! plan allocates no scratch at all, which is what lets it run 65536 x 65536 problems or
//! one query over 262144 keys. Key tiles that causal, window, `kv_lens` or `q_lens` masks
//! remove for every row of a workgroup are not visited, so causal attention costs half.
//!
//! The kernel is specialised on `ceil(v_head_dim / 64)` (`O_CHUNKS`, the output columns each
//! invocation owns), which also fixes how many keys of V are staged at once.

use bytemuck::{Pod, Zeroable};
use wgpu::util::DeviceExt;

use crate::error::{Error, Result};
use crate::gpu::context::{Gpu, GpuLimits};
use crate::gpu::kernels::{DispatchSize, FLASH_WORKGROUP_BYTES, Kernel, KernelKey};
use crate::gpu::masking::{self, check_binding};
use crate::gpu::three_pass::Io;
use crate::spec::{DType, Spec};

/// Query rows per workgroup.
const BM: usize = 64;

/// How the fused path will run a problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FusedPlan {
    /// Workgroups: (batch * heads) * ceil(q_len / 64).
    pub workgroups: u64,
    /// Output columns per invocation, in chunks of 64 (`ceil(v_head_dim / 64)`).
    pub o_chunks: u32,
    /// Bytes of device memory the plan allocates besides the inputs and outputs: always 0.
    pub scratch_bytes: u64,
}

/// Why the fused path cannot run on a device, if it cannot.
pub(crate) fn unsupported(limits: &GpuLimits) -> Option<&'static str> {
    if limits.max_workgroup_storage < FLASH_WORKGROUP_BYTES {
        Some("the device has less workgroup memory than the fused kernel needs (28 KiB)")
    } else if limits.max_storage_buffers_per_stage < 8 {
        Some("the device binds fewer than 8 storage buffers per stage")
    } else {
        None
    }
}

impl FusedPlan {
    /// Plans `spec` for a device with `limits`.
    pub fn new(spec: &Spec<'_>, limits: &GpuLimits) -> Result<FusedPlan> {
        if let Some(why) = unsupported(limits) {
            return Err(Error::Unsupported {
                what: why,
                needed: FLASH_WORKGROUP_BYTES as u64,
                available: limits.max_workgroup_storage as u64,
            });
        }
        let d = spec.dims;
        let workgroups = (d.batch * d.heads) as u64 * d.q_len.div_ceil(BM) as u64;
        // Fails here, not at dispatch, if even spilling into y and z cannot hold the grid.
        DispatchSize::linear(workgroups, limits.max_workgroups_per_dim, "flash_attention dispatch")?;
        Ok(FusedPlan {
            workgroups,
            o_chunks: d.v_head_dim.div_ceil(64) as u32,
            scratch_bytes: 0,
        })
    }
}

/// Mirrors `Params` of `flash_attention.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct FlashParams {
    heads: u32,
    group: u32,
    tiles_m: u32,
    groups_total: u32,
    head_dim: u32,
    v_head_dim: u32,
    write_lse: u32,
    scale: f32,
    q_strides: [u32; 3],
    k_strides: [u32; 3],
    v_strides: [u32; 3],
    o_strides: [u32; 3],
}

/// Encodes and submits the fused kernel.
pub(crate) fn run(gpu: &Gpu, spec: &Spec<'_>, plan: &FusedPlan, io: &Io<'_>) -> Result<()> {
    let d = spec.dims;
    let limits = &gpu.limits;
    let device = &gpu.device;
    for (what, t) in [("Q", io.q), ("K", io.k), ("V", io.v), ("O", io.o)] {
        check_binding(limits, what, t.byte_len())?;
    }
    if let Some(lse) = io.lse {
        check_binding(limits, "log-sum-exp", lse.byte_len())?;
    }
    let masks = masking::upload(gpu, spec)?;
    let kernel = gpu.kernels.get(
        device,
        KernelKey {
            kernel: Kernel::FlashAttention,
            dtype: DType::F32,
            variant: plan.o_chunks,
        },
    )?;
    let layout = spec.opts.layout;
    let strides = |heads, seq, dim| layout.strides(heads, seq, dim).map(|x| x as u32);
    let params = FlashParams {
        heads: d.heads as u32,
        group: d.group() as u32,
        tiles_m: d.q_len.div_ceil(BM) as u32,
        groups_total: plan.workgroups as u32,
        head_dim: d.head_dim as u32,
        v_head_dim: d.v_head_dim as u32,
        write_lse: io.lse.is_some() as u32,
        scale: spec.scale,
        q_strides: strides(d.heads, d.q_len, d.head_dim),
        k_strides: strides(d.kv_heads, d.kv_len, d.head_dim),
        v_strides: strides(d.kv_heads, d.kv_len, d.v_head_dim),
        o_strides: strides(d.heads, d.q_len, d.v_head_dim),
    };
    let params = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some("wgpu-attention flash params"),
        contents: bytemuck::bytes_of(&params),
        usage: wgpu::BufferUsages::UNIFORM,
    });
    let size = DispatchSize::linear(plan.workgroups, limits.max_workgroups_per_dim, "flash_attention dispatch")?;

    let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let oom_scope = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
    let bind = kernel.bind(
        device,
        &[
            &params,
            io.q.buffer(),
            io.k.buffer(),
            io.v.buffer(),
            io.o.buffer(),
            masks.bias(gpu),
            masks.mask(gpu),
            masks.lens(gpu),
            io.lse.map_or(&gpu.kernels.placeholder_out, |t| t.buffer()),
            &masks.params,
        ],
    );
    let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
        label: Some("wgpu-attention fused"),
    });
    {
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("wgpu-attention flash"),
            timestamp_writes: None,
        });
        pass.set_pipeline(&kernel.pipeline);
        pass.set_bind_group(0, &bind, &[]);
        let [x, y, z] = size.counts;
        pass.dispatch_workgroups(x, y, z);
    }
    gpu.queue.submit([encoder.finish()]);
    let oom = pollster::block_on(oom_scope.pop());
    let validation = pollster::block_on(scope.pop());
    if let Some(err) = validation.or(oom) {
        return Err(Error::Gpu(format!("fused attention: {err}")));
    }
    Ok(())
}
