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
    /// Invocations per workgroup, of a one-dimensional workgroup: the device's invocation
    /// limit or its limit on a workgroup's x size, whichever is smaller (the fused, decode and
    /// softmax kernels lay their invocations along x).
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
    /// The size of the square f16 x f16 -> f32 cooperative matrices the device multiplies
    /// (16 on Vulkan's `VK_KHR_cooperative_matrix` drivers that list 16 x 16 x 16, 8 on
    /// Metal), or 0: none (no `Features::EXPERIMENTAL_COOPERATIVE_MATRIX`, or no such shape).
    pub cooperative_matrix: u32,
    /// The device's subgroup size where it has only one (`subgroup_min_size ==
    /// subgroup_max_size`, subgroups enabled; 32 on Apple GPUs through Metal, for which wgpu
    /// reports 4 to 64), else 0.
    pub subgroup_size: u32,
    /// The tile configuration (the decode path's kernel, the invocation blocks): not a device
    /// limit but a choice per adapter
    /// ([`TABLE`](crate::gpu::tuning::TABLE)), kept beside the limits because the planner
    /// reads both.
    pub tile: TileConfig,
}

/// Whether the fused kernel computes S and P V as products of 16-bit operands (f16 Q, K and V;
/// `shaders/lib/mma.wgsl`), a tile choice per adapter ([`TileConfig::mma`];
/// `WGPU_ATTENTION_MMA=off|emulated|cooperative` overrides it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum MmaChoice {
    /// The scalar register-blocked products, whatever the dtype.
    #[default]
    Off,
    /// The 16-bit products by plain FMAs: the cooperative kernel's structure on any adapter
    /// with `SHADER_F16`, for testing it where no cooperative matrices exist. Slower than
    /// `Off`.
    Emulated,
    /// On cooperative matrices (tensor cores, simdgroup matrices): NVIDIA's 16 x 16 on Vulkan
    /// (any Vulkan driver with an f16 shape and one subgroup size), Apple's 8 x 8 on Metal.
    /// The device needs them ([`GpuLimits::cooperative_matrix`]): `Gpu::with_mma` refuses
    /// this choice where it has none, `WGPU_ATTENTION_MMA` then warns and keeps the adapter's.
    /// Calls whose shape the products cannot serve run the scalar products.
    Cooperative,
}

impl MmaChoice {
    /// Parses `off`, `emulated` or `cooperative` (the name [`MmaChoice::name`] writes).
    pub fn parse(value: &str) -> Option<MmaChoice> {
        match value.trim() {
            "off" => Some(MmaChoice::Off),
            "emulated" => Some(MmaChoice::Emulated),
            "cooperative" => Some(MmaChoice::Cooperative),
            _ => None,
        }
    }

    /// The name `parse` reads.
    pub fn name(&self) -> &'static str {
        match self {
            MmaChoice::Off => "off",
            MmaChoice::Emulated => "emulated",
            MmaChoice::Cooperative => "cooperative",
        }
    }
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

/// The register block of one invocation of the tile product (`shaders/lib/tile_gemm.wgsl`):
/// `rows x cols` scores (or outputs) of a 64-column tile, a tile choice per adapter
/// ([`TileConfig::fused_block`], [`TileConfig::gemm_block`];
/// `WGPU_ATTENTION_FUSED_BLOCK=8x8`, say, overrides the first).
///
/// A larger block reads fewer vec4s of workgroup memory per multiply-add (an 8 x 8 block 4
/// per 64, a 4 x 4 block 2 per 16) with fewer invocations per workgroup (64 instead of 256
/// for 64 rows) and more registers per invocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TileBlock {
    /// Rows per invocation: 4 or 8.
    pub rows: u32,
    /// Columns per invocation: 4 or 8.
    pub cols: u32,
}

impl TileBlock {
    /// 4 x 4: 256 invocations for a 64 x 64 tile.
    pub const B4X4: TileBlock = TileBlock { rows: 4, cols: 4 };
    /// 8 x 4: 128 invocations for a 64 x 64 tile.
    pub const B8X4: TileBlock = TileBlock { rows: 8, cols: 4 };
    /// 8 x 8: 64 invocations for a 64 x 64 tile.
    pub const B8X8: TileBlock = TileBlock { rows: 8, cols: 8 };
    /// Every block the kernels are compiled for.
    pub const ALL: [TileBlock; 3] = [TileBlock::B4X4, TileBlock::B8X4, TileBlock::B8X8];

    /// Invocations across the 64 columns of a tile.
    pub const fn columns_invocations(self) -> u32 {
        64 / self.cols
    }

    /// Invocations of a workgroup computing `tile_rows` rows (a multiple of `rows`) of a
    /// 64-column tile.
    pub const fn invocations(self, tile_rows: u32) -> u32 {
        self.columns_invocations() * (tile_rows / self.rows)
    }

    /// Parses `4x4`, `8x4` or `8x8` (the name [`TileBlock::name`] writes).
    pub fn parse(value: &str) -> Option<TileBlock> {
        let (r, c) = value.trim().split_once('x')?;
        let block = TileBlock {
            rows: r.parse().ok()?,
            cols: c.parse().ok()?,
        };
        TileBlock::ALL.contains(&block).then_some(block)
    }

    /// `rows x cols`, as `8x8`.
    pub fn name(&self) -> String {
        format!("{}x{}", self.rows, self.cols)
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
            max_invocations_per_workgroup: l
                .max_compute_invocations_per_workgroup
                .min(l.max_compute_workgroup_size_x),
            max_workgroup_storage: l.max_compute_workgroup_storage_size,
            max_storage_buffers_per_stage: l.max_storage_buffers_per_shader_stage,
            min_uniform_offset_alignment: l.min_uniform_buffer_offset_alignment,
            max_key_tiles_per_workgroup: if device_type == wgpu::DeviceType::Cpu {
                32
            } else {
                u32::MAX
            },
            // No features here: no cooperative matrices, no subgroups.
            cooperative_matrix: 0,
            subgroup_size: 0,
            // No vendor and no features here: the device type's entry, without subgroups.
            tile: TileConfig {
                subgroups: false,
                ..table_entry(0, device_type, 0).config
            },
        }
    }
}

impl GpuLimits {
    /// The invocation block of a tile product summing over `sum_len` elements (keys for
    /// `pv_product`, `k` for `matmul`): [`TileConfig::gemm_block`], except on a device that
    /// caps loop iterations (llvmpipe, [`GpuLimits::max_key_tiles_per_workgroup`] finite) past
    /// 16384 elements, where 4 x 4 runs instead. Measured on lavapipe:
    /// 4 x 4 `pv_product` summed 520000 keys exactly, 8 x 8 stopped early past about 40000
    /// (its staging and slice loops are not unrolled there, so each slice costs the limit
    /// about 25 iterations instead of 1).
    pub fn gemm_block_for(&self, sum_len: u64) -> TileBlock {
        if self.max_key_tiles_per_workgroup != u32::MAX && sum_len > LOOP_CAPPED_MAX_BLOCK_SUM {
            TileBlock::B4X4
        } else {
            self.tile.gemm_block
        }
    }

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
        if let Some(cap) = caps.max_workgroup_storage {
            self.max_workgroup_storage = self.max_workgroup_storage.min(cap);
        }
        if let Some(cap) = caps.max_storage_buffers_per_stage {
            self.max_storage_buffers_per_stage = self.max_storage_buffers_per_stage.min(cap);
        }
        self
    }
}

/// The longest summed axis a tile product runs with a block larger than 4 x 4 on a device that
/// caps loop iterations ([`GpuLimits::gemm_block_for`]).
pub(crate) const LOOP_CAPPED_MAX_BLOCK_SUM: u64 = 16384;

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
    /// Cap on [`GpuLimits::max_workgroup_storage`], in bytes: plans then pick the kernels that
    /// fit (WebGPU's default is 16 KiB, below the fused kernel's need).
    pub max_workgroup_storage: Option<u32>,
    /// Cap on [`GpuLimits::max_storage_buffers_per_stage`] (WebGPU's default is 8).
    pub max_storage_buffers_per_stage: Option<u32>,
}

impl LimitCaps {
    /// WebGPU's default limits, which a browser grants when a page asks for nothing more:
    /// 128 MiB storage bindings, 16 KiB of workgroup memory, 8 storage buffers per stage.
    pub fn webgpu_defaults() -> LimitCaps {
        LimitCaps {
            max_storage_binding: Some(128 << 20),
            max_workgroup_storage: Some(16 << 10),
            max_storage_buffers_per_stage: Some(8),
            ..LimitCaps::default()
        }
    }
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
