//! Records `combine_splits.wgsl`: partial results over disjoint key sets merged by their
//! log-sum-exp into one output (and its log-sum-exp).

use crate::error::Result;
use crate::gpu::context::Gpu;
use crate::gpu::kernels::KernelKey;
use crate::gpu::kernels::Storage;
use crate::gpu::kernels::uniforms::{CombineParams, uniform_buffer};
use crate::gpu::limits::DispatchSize;
use crate::gpu::tensor::Tensor;

/// One merge: `parts` (partial outputs, read in `parts_storage`) and `part_lses` (their
/// log-sum-exps as f32 bits, from `params.lse_offset`; may be the same buffer) into `o` and,
/// if given, `lse`. `lens`, when given, is the call's masking buffer, with the sink logits and packed offsets `params` points at.
pub(crate) struct Combine<'a> {
    pub(crate) params: CombineParams,
    pub(crate) parts: &'a wgpu::Buffer,
    pub(crate) part_lses: &'a wgpu::Buffer,
    pub(crate) parts_storage: Storage,
    pub(crate) o: &'a Tensor,
    pub(crate) lse: Option<&'a wgpu::Buffer>,
    pub(crate) lens: Option<&'a wgpu::Buffer>,
    /// Whether the pass may write the call's end timestamp (it is the call's last).
    pub(crate) last: bool,
}

/// Records the merge into `encoder`.
pub(crate) fn encode(
    gpu: &Gpu,
    encoder: &mut wgpu::CommandEncoder,
    combine: &Combine<'_>,
) -> Result<()> {
    let device = &gpu.device;
    let kernel = gpu.kernels.get(
        device,
        KernelKey::CombineSplits {
            parts: combine.parts_storage,
            o: gpu.storage(combine.o.dtype()),
        },
    )?;
    let uniform = uniform_buffer(gpu, &combine.params)?;
    let bind = kernel.bind(
        device,
        &[
            &uniform,
            combine.parts,
            combine.part_lses,
            combine.o.buffer(),
            combine.lse.unwrap_or(&gpu.kernels.placeholder_out),
            combine.lens.unwrap_or(&gpu.kernels.placeholder),
        ],
    );
    let size = DispatchSize::linear(
        combine.params.rows as u64,
        gpu.limits.max_workgroups_per_dim,
        "combine_splits dispatch",
    )?;
    let mut pass = gpu.begin_pass(encoder, "wgpu-attention combine", false, combine.last);
    kernel.dispatch(&mut pass, &bind, size);
    Ok(())
}
