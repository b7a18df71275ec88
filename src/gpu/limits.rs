//! The device limits every plan is checked against, and the dispatch-size arithmetic.
//!
//! Nothing here needs a device: [`GpuLimits`] is plain data (read once from a device by
//! [`Gpu`](crate::Gpu), or written down for a device one plans for), so every plan is unit-tested
//! against the limits of real devices on a machine with no adapter at all.

use crate::error::{Error, Result};
use crate::gpu::tuning::{TileConfig, table_entry};

/// The device limits the plans need, read once from the device.
///
/// Plans never hard-code a limit: they read it here, and an [`Error::TooLarge`] names the one
/// they would break. [`Gpu::with_caps`](crate::Gpu::with_caps) lowers them, so chunking can be tested on small data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuLimits {
    /// Largest storage buffer binding, in bytes.
    pub max_storage_binding: u64,
    /// Largest buffer, in bytes.
    pub max_buffer_size: u64,
    /// Workgroups per dispatch dimension.
    pub max_workgroups_per_dim: u32,
    /// Invocations per workgroup.
    pub max_invocations_per_workgroup: u32,
    /// Workgroup memory, in bytes.
    pub max_workgroup_storage: u32,
    /// Storage buffers per shader stage.
    pub max_storage_buffers_per_stage: u32,
    /// Alignment of uniform buffer offsets, in bytes.
    pub min_uniform_offset_alignment: u32,
    /// Key tiles (of 64 keys) one workgroup of the fused kernel streams in one dispatch;
    /// longer key ranges take several dispatches (or splits). Not a wgpu limit: llvmpipe stops
    /// an invocation's loops after 65535 iterations in total, so on CPU adapters it is 32
    /// (2048 keys); elsewhere it is unbounded.
    pub max_key_tiles_per_workgroup: u32,
    /// The decode path's tile configuration: not a device limit but a choice per adapter
    /// ([`TABLE`](crate::gpu::tuning::TABLE)), kept beside the limits because the planner
    /// reads both.
    pub tile: TileConfig,
}

/// The kernel of the decode path, a tile choice per adapter ([`TileConfig::decode_kernel`];
/// `WGPU_ATTENTION_DECODE_KERNEL=keys16`, `keys32`, `keys64` or `tiles` overrides it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DecodeKernel {
    /// `flash_decode.wgsl` where a kv head's `group * q_len` rows are at most 16 and its
    /// workgroup memory fits: `workgroup` invocations (16, 32 or 64) spread over the 64 keys of
    /// each tile, the rows' scores and outputs in registers; the row-tiled fused kernel
    /// otherwise. 64 on GPUs (two warps, one wavefront), 16 on CPU adapters.
    KeysAcrossInvocations {
        /// Invocations per workgroup, one of
        /// [`DECODE_WORKGROUPS`](crate::gpu::kernels::DECODE_WORKGROUPS).
        workgroup: u32,
    },
    /// Always the row-tiled fused kernel (`flash_attention.wgsl` with
    /// [`TileConfig::min_decode_rows`] rows or more).
    RowTiles,
}

impl DecodeKernel {
    /// Parses the value of `WGPU_ATTENTION_DECODE_KERNEL`: `keys16`, `keys32`, `keys64` or
    /// `tiles`.
    pub fn parse(value: &str) -> Option<DecodeKernel> {
        match value.trim() {
            "tiles" => Some(DecodeKernel::RowTiles),
            v => {
                let workgroup: u32 = v.strip_prefix("keys")?.parse().ok()?;
                crate::gpu::kernels::DECODE_WORKGROUPS
                    .contains(&workgroup)
                    .then_some(DecodeKernel::KeysAcrossInvocations { workgroup })
            }
        }
    }

    /// The name `parse` reads.
    pub fn name(&self) -> String {
        match self {
            DecodeKernel::KeysAcrossInvocations { workgroup } => format!("keys{workgroup}"),
            DecodeKernel::RowTiles => "tiles".into(),
        }
    }
}

impl GpuLimits {
    /// The limits of a device with wgpu limits `l` and of type `device_type`: what
    /// [`Gpu`](crate::Gpu) reads from its device, and what a program can plan with for a
    /// device it does not have open.
    pub fn from_wgpu(l: &wgpu::Limits, device_type: wgpu::DeviceType) -> GpuLimits {
        GpuLimits {
            max_storage_binding: l.max_storage_buffer_binding_size,
            max_buffer_size: l.max_buffer_size,
            max_workgroups_per_dim: l.max_compute_workgroups_per_dimension,
            max_invocations_per_workgroup: l.max_compute_invocations_per_workgroup,
            max_workgroup_storage: l.max_compute_workgroup_storage_size,
            max_storage_buffers_per_stage: l.max_storage_buffers_per_shader_stage,
            min_uniform_offset_alignment: l.min_uniform_buffer_offset_alignment,
            max_key_tiles_per_workgroup: if device_type == wgpu::DeviceType::Cpu {
                32
            } else {
                u32::MAX
            },
            // No vendor and no features here: the device type's entry, without subgroups.
            tile: TileConfig {
                subgroups: false,
                ..table_entry(0, device_type, 0).config
            },
        }
    }
}

impl GpuLimits {
    /// These limits lowered by `caps`.
    pub fn capped(mut self, caps: LimitCaps) -> GpuLimits {
        if let Some(cap) = caps.max_storage_binding {
            self.max_storage_binding = self.max_storage_binding.min(cap);
        }
        if let Some(cap) = caps.max_workgroups_per_dim {
            self.max_workgroups_per_dim = self.max_workgroups_per_dim.min(cap.max(1));
        }
        if let Some(cap) = caps.max_key_tiles_per_workgroup {
            self.max_key_tiles_per_workgroup = self.max_key_tiles_per_workgroup.min(cap.max(1));
        }
        self
    }
}

/// Lower limits to impose on a [`Gpu`](crate::Gpu), to exercise chunking and dispatch spilling on small
/// problems. `None` keeps the device's own limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimitCaps {
    /// Cap on [`GpuLimits::max_storage_binding`], in bytes.
    pub max_storage_binding: Option<u64>,
    /// Cap on [`GpuLimits::max_workgroups_per_dim`].
    pub max_workgroups_per_dim: Option<u32>,
    /// Cap on [`GpuLimits::max_key_tiles_per_workgroup`].
    pub max_key_tiles_per_workgroup: Option<u32>,
}

/// Workgroup counts for a 1-D grid of `groups` workgroups, spilled into y and z when x is full.
/// Kernels recover the linear index as `x + nx * (y + ny * z)` and skip indices past the grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DispatchSize {
    /// Workgroups in x, y and z.
    pub counts: [u32; 3],
}

impl DispatchSize {
    /// Fits `groups` into at most `max_per_dim` per dimension.
    pub fn linear(groups: u64, max_per_dim: u32, what: &'static str) -> Result<DispatchSize> {
        let max = max_per_dim.max(1) as u64;
        if groups > max * max * max {
            return Err(Error::TooLarge {
                what,
                requested: groups,
                max: max * max * max,
                hint: " workgroups (x * y * z)",
            });
        }
        let x = groups.min(max);
        let rest = groups.div_ceil(x.max(1));
        let y = rest.min(max);
        let z = rest.div_ceil(y.max(1));
        Ok(DispatchSize {
            counts: [x as u32, y as u32, z as u32],
        })
    }
}

/// Fails with [`Error::TooLarge`] unless `bytes` fit one storage binding.
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
