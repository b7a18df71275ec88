//! Tile configurations as data: which kernel configuration the decode path runs on which
//! adapter, and the invocation blocks of the fused kernel and of the tile products.
//!
//! [`TABLE`] lists configurations keyed by what wgpu reports of an adapter (PCI vendor ID,
//! device type, smallest subgroup size); the first entry that matches is taken when a [`Gpu`](crate::Gpu) is opened,
//! and [`GpuLimits::from_wgpu`](crate::gpu::GpuLimits::from_wgpu) applies the entry for a device type with no vendor. Each entry
//! says whether it was measured (`attn-bench --tune` prints a line to paste here) or is a
//! guess. A program overrides the choice with
//! [`Gpu::with_tile_config`](crate::Gpu::with_tile_config) (or the finer
//! `with_decode_kernel`, `with_decode_rows`, `with_blocks`), a user without a rebuild with
//! `WGPU_ATTENTION_DECODE_KERNEL`, `WGPU_ATTENTION_SUBGROUPS`, `WGPU_ATTENTION_DECODE_ROWS`,
//! `WGPU_ATTENTION_FUSED_BLOCK`, `WGPU_ATTENTION_GEMM_BLOCK`, `WGPU_ATTENTION_RESIDENT_Q`,
//! `WGPU_ATTENTION_DOUBLE_BUFFER`, `WGPU_ATTENTION_TILED_BACKWARD`,
//! `WGPU_ATTENTION_BACKWARD_BLOCK` and `WGPU_ATTENTION_MMA`.
//!
//! The configuration is [`GpuLimits::tile`](crate::gpu::GpuLimits::tile): the plans read it there, beside the device
//! limits, so the planner tests set any configuration without a device.

use super::limits::{DecodeKernel, MmaChoice, TileBlock};

/// One tile configuration ([`GpuLimits::tile`](crate::gpu::GpuLimits::tile)): the decode
/// path's kernel and the invocation blocks of the tile products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TileConfig {
    /// Which kernel the decode path runs for the few rows it fits, and its workgroup (see
    /// [`DecodeKernel`]).
    pub decode_kernel: DecodeKernel,
    /// Whether kernels may use subgroup operations. A [`Gpu`](crate::Gpu) keeps it only where
    /// its device has `Features::SUBGROUP` (wgpu guarantees subgroups of at least 4
    /// invocations); [`GpuLimits::from_wgpu`](crate::gpu::GpuLimits::from_wgpu), which sees no features, sets it `false`;
    /// `WGPU_ATTENTION_SUBGROUPS=0` or
    /// [`Gpu::with_decode_kernel`](crate::Gpu::with_decode_kernel) turns it off.
    pub subgroups: bool,
    /// The fewest rows per workgroup of the row-tiled fused kernel on the decode path (4, 8,
    /// 16, 32 or 64; the plan takes the fewest of those, at least this, that hold a kv head's
    /// rows): 16 on GPUs (64 invocations, at least a warp or wavefront), 4 on CPU adapters.
    /// `WGPU_ATTENTION_DECODE_ROWS` or [`Gpu::with_decode_rows`](crate::Gpu::with_decode_rows)
    /// overrides it.
    pub min_decode_rows: u32,
    /// Workgroups the decode path aims for when it splits the keys (flash-decoding); wgpu does
    /// not report a core count: 1024 on discrete GPUs (a few workgroups per core of a large
    /// card), 256 on integrated and other GPUs, 64 on CPU adapters.
    pub decode_target_workgroups: u32,
    /// The register block of the fused kernel's invocations (`flash_attention.wgsl`), for
    /// tiles of at least `fused_block.rows` rows (fewer rows take 4 x 4).
    /// `WGPU_ATTENTION_FUSED_BLOCK` overrides it.
    pub fused_block: TileBlock,
    /// The register block of the three-pass path's products and the layer's projections
    /// (`qk_scores`, `pv_product`, `matmul`). `WGPU_ATTENTION_GEMM_BLOCK` overrides it.
    pub gemm_block: TileBlock,
    /// Whether the fused kernel keeps its rows of Q in workgroup memory for the whole key
    /// loop, where that memory holds them (`TILE_M * ceil(head_dim / 16) * 64` bytes beside
    /// the rest: at 64 rows, head_dim up to 16 with 8 x 8 blocks on 32 KiB, 64 with 8 x 4 and
    /// 80 with 8 x 8 on 48 KiB), and stages only K per key tile; otherwise Q is staged again
    /// with every tile's K.
    /// `WGPU_ATTENTION_RESIDENT_Q=0|1` or [`Gpu::with_resident_q`](crate::Gpu::with_resident_q)
    /// overrides it.
    pub resident_q: bool,
    /// Whether the fused kernel double-buffers its staging where workgroup memory holds a
    /// second 8 KiB buffer beside the rest (resident Q keeps priority) and the workgroup has
    /// at least 64 invocations: each step of a key tile (a slice of Q and K, a pair of slices
    /// of K, a slice of V) is loaded from global memory into registers during the previous
    /// step's FMAs and then stored into the other buffer, one barrier per step instead of two.
    /// At 64 rows that is 34-36 KiB: NVIDIA's 48 KiB hold it (without resident Q at
    /// head_dim 64), lavapipe's and Apple's 32 KiB do not.
    /// `WGPU_ATTENTION_DOUBLE_BUFFER=0|1` or
    /// [`Gpu::with_double_buffer`](crate::Gpu::with_double_buffer) overrides it.
    pub double_buffer: bool,
    /// Whether the backward computes dQ, dK and dV in 64 x 64 tiles with register blocks
    /// (`attention_backward_tiled.wgsl`, for head_dim and v_head_dim up to 256), or one row
    /// per invocation (`attention_backward.wgsl`, every width). `WGPU_ATTENTION_TILED_BACKWARD`
    /// or [`Gpu::with_tiled_backward`](crate::Gpu::with_tiled_backward) overrides it.
    pub tiled_backward: bool,
    /// The register block of the tiled backward's invocations, where its accumulators fit
    /// (else the next smaller block): apart from the forward's, since each invocation holds
    /// two score blocks (S and dP) and two rows of accumulators (dK and dV), which may spill
    /// registers where the forward's block does not. `WGPU_ATTENTION_BACKWARD_BLOCK` or
    /// [`Gpu::with_backward_block`](crate::Gpu::with_backward_block) overrides it.
    pub backward_block: TileBlock,
    /// Whether the fused kernel computes S and P V as products of 16-bit operands where Q,
    /// K and V are native f16 ([`MmaChoice`]): `Off` in every entry until a GPU measures the
    /// cooperative kernel, which has not yet run on one. `WGPU_ATTENTION_MMA` or
    /// [`Gpu::with_mma`](crate::Gpu::with_mma) overrides it.
    pub mma: MmaChoice,
}

/// An entry of [`TABLE`]: which adapters it is for, and where its figures come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableEntry {
    /// What the entry is for, in words.
    pub adapters: &'static str,
    /// PCI vendor ID the adapter must report (`AdapterInfo::vendor`), or any.
    pub vendor: Option<u32>,
    /// Device type the adapter must report, or any.
    pub device_type: Option<wgpu::DeviceType>,
    /// Smallest subgroup size the adapter must report (`AdapterInfo::subgroup_min_size`), or
    /// any: AMD's wave64 and wave32 parts, say, may want different workgroups.
    pub subgroup_size: Option<u32>,
    /// The configuration.
    pub config: TileConfig,
    /// `attn-bench --tune` output it was taken from, with the date, or why it is a guess.
    pub source: &'static str,
}

/// A configuration with the decode-shaped kernel, subgroups, resident Q and the tiled
/// backward; `[fused, gemm, backward]` are the three blocks.
const fn keys(
    workgroup: u32,
    min_decode_rows: u32,
    decode_target_workgroups: u32,
    double_buffer: bool,
    [fused_block, gemm_block, backward_block]: [TileBlock; 3],
) -> TileConfig {
    TileConfig {
        decode_kernel: DecodeKernel::KeysAcrossInvocations { workgroup },
        subgroups: true,
        min_decode_rows,
        decode_target_workgroups,
        fused_block,
        gemm_block,
        resident_q: true,
        double_buffer,
        tiled_backward: true,
        backward_block,
        mma: MmaChoice::Off,
    }
}

/// The guess for discrete GPUs, NVIDIA's among them, until `attn-bench --tune` measures one.
const DISCRETE_GUESS: TileConfig = keys(
    64,
    16,
    1024,
    true,
    [TileBlock::B8X4, TileBlock::B8X8, TileBlock::B8X4],
);

/// The configurations, first match wins; the last entry matches every adapter.
pub const TABLE: &[TableEntry] = &[
    TableEntry {
        adapters: "CPU adapters (Mesa's llvmpipe / lavapipe)",
        vendor: None,
        device_type: Some(wgpu::DeviceType::Cpu),
        subgroup_size: None,
        config: keys(
            16,
            4,
            64,
            false,
            [TileBlock::B8X8, TileBlock::B8X8, TileBlock::B8X8],
        ),
        source: "measured: attn-bench --tune --reps 3 --warmup 1, llvmpipe (LLVM 15.0.6, 256 \
                 bits), Mesa 22.3.6, 2026-12-02: keys16 subgroups=1 fastest, 287 ms over both \
                 shapes (keys32 subgroups=1 331, keys16 subgroups=0 380, tiles rows=4 506); \
                 fused block 8x8 133.7 ms over both prefill shapes (8x4 167.6, 4x4 202.9); \
                 gemm block 8x8 126-151 ms against 4x4 149-156 in 3 alternating pairs of the \
                 three-pass path (a single --tune pass favoured 4x4: this VM's slow mode)",
    },
    TableEntry {
        adapters: "NVIDIA GPUs",
        vendor: Some(0x10de),
        device_type: None,
        subgroup_size: None,
        config: DISCRETE_GUESS,
        source: "guess, never measured: 64 invocations are two warps; 1024 workgroups are \
                 about 8 per SM of an H100 or H200",
    },
    TableEntry {
        adapters: "discrete GPUs",
        vendor: None,
        device_type: Some(wgpu::DeviceType::DiscreteGpu),
        subgroup_size: None,
        config: DISCRETE_GUESS,
        source: "guess, never measured: 64 invocations are one AMD wavefront or two warps",
    },
    TableEntry {
        adapters: "every other adapter (integrated and virtual GPUs, WebGPU)",
        vendor: None,
        device_type: None,
        subgroup_size: None,
        config: keys(
            64,
            16,
            256,
            true,
            [TileBlock::B8X4, TileBlock::B8X8, TileBlock::B8X4],
        ),
        source: "guess, never measured",
    },
];

/// The entry of [`TABLE`] for an adapter of `vendor`, `device_type` and smallest subgroup
/// size `subgroup_size` (0 when unknown, which matches only entries that take any).
pub fn table_entry(
    vendor: u32,
    device_type: wgpu::DeviceType,
    subgroup_size: u32,
) -> &'static TableEntry {
    TABLE
        .iter()
        .find(|e| {
            e.vendor.is_none_or(|v| v == vendor)
                && e.device_type.is_none_or(|t| t == device_type)
                && e.subgroup_size.is_none_or(|n| n == subgroup_size)
        })
        .unwrap_or(&TABLE[TABLE.len() - 1])
}

/// The entry of [`TABLE`] for `info`'s adapter.
pub fn entry_for(info: &wgpu::AdapterInfo) -> &'static TableEntry {
    table_entry(info.vendor, info.device_type, info.subgroup_min_size)
}

impl TileConfig {
    /// The configuration as Rust, for a [`TABLE`] entry (what `attn-bench --tune` prints).
    pub fn as_rust(&self) -> String {
        let kernel = match self.decode_kernel {
            DecodeKernel::KeysAcrossInvocations { workgroup } => {
                format!("DecodeKernel::KeysAcrossInvocations {{ workgroup: {workgroup} }}")
            }
            DecodeKernel::RowTiles => "DecodeKernel::RowTiles".into(),
        };
        let block = |b: TileBlock| format!("TileBlock::B{}X{}", b.rows, b.cols);
        format!(
            "TileConfig {{ decode_kernel: {kernel}, subgroups: {}, min_decode_rows: {}, \
             decode_target_workgroups: {}, fused_block: {}, gemm_block: {}, resident_q: {}, \
             double_buffer: {}, tiled_backward: {}, backward_block: {}, mma: MmaChoice::{:?} }}",
            self.subgroups,
            self.min_decode_rows,
            self.decode_target_workgroups,
            block(self.fused_block),
            block(self.gemm_block),
            self.resident_q,
            self.double_buffer,
            self.tiled_backward,
            block(self.backward_block),
            self.mma
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_adapter_gets_an_entry_and_the_cpu_entry_is_the_measured_one() {
        let cpu = table_entry(0x10005, wgpu::DeviceType::Cpu, 8);
        assert!(cpu.source.starts_with("measured"), "{cpu:?}");
        assert_eq!(
            cpu.config.decode_kernel,
            DecodeKernel::KeysAcrossInvocations { workgroup: 16 }
        );
        let nvidia = table_entry(0x10de, wgpu::DeviceType::DiscreteGpu, 32);
        assert_eq!(nvidia.adapters, "NVIDIA GPUs");
        let amd = table_entry(0x1002, wgpu::DeviceType::DiscreteGpu, 64);
        assert_eq!(amd.adapters, "discrete GPUs");
        let other = table_entry(0x106b, wgpu::DeviceType::IntegratedGpu, 32);
        assert!(other.vendor.is_none() && other.device_type.is_none());
        assert!(TABLE[TABLE.len() - 1].subgroup_size.is_none());
        for e in TABLE {
            let name = e.config.decode_kernel.name();
            assert_eq!(
                DecodeKernel::parse(&name),
                Some(e.config.decode_kernel),
                "{e:?}"
            );
            assert!(crate::gpu::kernels::FLASH_ROWS.contains(&e.config.min_decode_rows));
            assert!(e.config.decode_target_workgroups > 0);
        }
    }

    #[test]
    fn as_rust_names_every_field() {
        let s = TABLE[0].config.as_rust();
        assert_eq!(
            s,
            "TileConfig { decode_kernel: DecodeKernel::KeysAcrossInvocations { workgroup: 16 }, \
             subgroups: true, min_decode_rows: 4, decode_target_workgroups: 64, \
             fused_block: TileBlock::B8X8, gemm_block: TileBlock::B8X8, resident_q: true, \
             double_buffer: false, tiled_backward: true, backward_block: TileBlock::B8X8, \
             mma: MmaChoice::Off }"
        );
    }
}
