//! The one place that names every kernel: its shader, its bindings, its specialisations.
//!
//! # How a kernel is put together
//!
//! A kernel is one file under `shaders/` holding its entry point `main`, composed by the host
//! ([`KernelKey::source`]) with shared pieces, in this order:
//!
//! 1. `enable` lines for the features the key needs (`enable f16;` when a tensor is stored as
//!    native f16). Subgroup builtins need no `enable` (naga 30 rejects `enable subgroups;`):
//!    they work once the device has `Features::SUBGROUP`.
//! 2. the shared constants (`uniforms::shared_constants`: `-inf` bits, tile sizes, `log2(e)`,
//!    ...), the key's own `const`s ([`KernelKey::source_constants`]: sizes that fix the length
//!    of function-scope arrays, which a pipeline `override` cannot, e.g. the decode kernel's
//!    rows and workgroup) and the WGSL structs of the parameter blocks the kernel binds,
//!    generated from their one Rust definition (`uniforms.rs`);
//! 3. every binding, declared from the kernel's slot list (`Kernel::slots`: name, type,
//!    access, in binding order), so no kernel file writes a binding number; a tensor binding
//!    gets a *prelude* declaring it in its [`Storage`] with a `load_<name>(i) -> f32` (and,
//!    when writable, `store_<name>(i, x)`) accessor: a new storage type is a new prelude,
//!    never a copy of a kernel. A read-only tensor also gets `load4_<name>(i)`; one the key
//!    reads in groups ([`KernelKey::grouped_tensors`]) is declared as an array of 4- or
//!    8-element vectors so that a group is one load, with `loadg_<name>(i)`;
//! 4. the fragments of `shaders/lib/` the key uses ([`KernelKey::fragments`]): the workgroup
//!    grid, log-sum-exp merging, the register-blocked tile product and its store, the masking
//!    rules, the decode kernel's row reduction (subgroup or workgroup-memory variant);
//! 5. the kernel file;
//! 6. for a kernel with the masking rules, the call's score mods (`ScoreMod::wgsl`: the user's
//!    `attn_mask_mod`, `attn_score_mod`, `attn_score_mod_grad` and `attn_key_range`, identities
//!    without them), from the device's list of sources by the number in
//!    [`MaskOptions::mods`] (`cache.rs`).
//!
//! A new product kernel lists its bindings in `Kernel::slots` (private to the crate),
//! defines `tile_a` / `tile_b` (its operands) and `tile_out` (its epilogue), sets the tile
//! origin `r0`, `c0` in `main` and loops over `tile_slice` (or `tile_stage_*` / `tile_fma`;
//! see `shaders/lib/tile_gemm.wgsl`); a new masking kernel calls `key_range`, `mask_allows`
//! and `adjust_score`. Its key gets a [`KernelKey`] variant, and `KernelKey::samples` a
//! sample, so the naga tests compile it for every backend.
//!
//! Everything that changes the compiled pipeline is in its [`KernelKey`], one variant per
//! kernel: tensor storage, tile configuration, and the options compiled in as pipeline
//! `override` constants (the per-key masking options of [`MaskOptions`], additive scores). Pipelines are compiled on first use
//! and cached per key (`cache.rs`); the key is also the pipeline's debug label.

mod cache;
mod compose;
pub(crate) mod uniforms;

pub(crate) use cache::Kernels;

use uniforms::{
    BackwardParams, CombineParams, FlashParams, MaskParams, MatmulParams, PvParams, QkParams,
    RotateParams, SoftmaxParams, TILE, TILE_STAGE_BYTES, Uniform,
};

use crate::gpu::limits::TileBlock;
use crate::spec::{DType, Spec};

/// WGSL source of the tiled `QK^T` kernel (and of additive scores, by a pipeline constant).
pub const QK_SCORES: &str = include_str!("../../../shaders/qk_scores.wgsl");
/// WGSL source of the masked row-softmax kernel.
pub const MASKED_SOFTMAX: &str = include_str!("../../../shaders/masked_softmax.wgsl");
/// WGSL source of the tiled `P V` kernel.
pub const PV_PRODUCT: &str = include_str!("../../../shaders/pv_product.wgsl");
/// WGSL source of the fused flash-attention kernel.
pub const FLASH_ATTENTION: &str = include_str!("../../../shaders/flash_attention.wgsl");
/// WGSL source of the decode-shaped fused kernel (keys across invocations).
pub const FLASH_DECODE: &str = include_str!("../../../shaders/flash_decode.wgsl");
/// WGSL source of the kernel that merges partial results by their log-sum-exp.
pub const COMBINE_SPLITS: &str = include_str!("../../../shaders/combine_splits.wgsl");
/// WGSL source of the backward's gradient phases one row per invocation (dQ, dK and dV, the
/// bias's and the sinks' gradients).
pub const ATTENTION_BACKWARD: &str = include_str!("../../../shaders/attention_backward.wgsl");
/// WGSL source of the backward's first phase (D = dO·O and the row shifts).
pub const ATTENTION_BACKWARD_DELTA: &str =
    include_str!("../../../shaders/attention_backward_delta.wgsl");
/// WGSL source of the backward's dQ and dK/dV phases in tiles.
pub const ATTENTION_BACKWARD_TILED: &str =
    include_str!("../../../shaders/attention_backward_tiled.wgsl");
/// WGSL source of the batched matrix product with bias (the layer's projections).
pub const MATMUL: &str = include_str!("../../../shaders/matmul.wgsl");
/// WGSL source of the rotary position embedding (RoPE).
pub const ROTATE: &str = include_str!("../../../shaders/rotate.wgsl");

/// Every name a kernel that masks (and so composes a score mod) declares at module scope, over
/// every storage and specialisation (a score mod's helpers may not reuse one), scanned once
/// from the composed sources.
pub(crate) fn module_scope_names() -> &'static std::collections::HashSet<String> {
    static NAMES: std::sync::OnceLock<std::collections::HashSet<String>> =
        std::sync::OnceLock::new();
    NAMES.get_or_init(|| {
        let mut names = std::collections::HashSet::new();
        // Names come from the kernel file, its fragments and its bindings' preludes: one
        // sample per combination of those is enough (composing every sample took 175 ms).
        let mut seen = std::collections::HashSet::new();
        for storage in Storage::ALL {
            // Only the kernels that mask compose a score mod into their source.
            for key in KernelKey::samples(storage) {
                if key.masks().is_some()
                    && seen.insert((
                        key.kernel(),
                        key.fragments(),
                        key.storages(),
                        key.grouped_tensors(),
                    ))
                {
                    names.extend(crate::score_mod::module_scope_names(
                        &key.source_with(ParamsIn::ReadOnlyStorage),
                    ));
                }
            }
        }
        names
    })
}

/// A piece of WGSL under `shaders/lib/` that kernels include (not a kernel itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fragment {
    /// `workgroup_index`: the linear index of a spilled grid.
    Grid,
    /// Log-sum-exps as bits, and merging partial results by them.
    Lse,
    /// The register-blocked tile product (`tile_stage_*`, `tile_fma`).
    TileGemm,
    /// `tile_store`: the tile product's epilogue through the kernel's `tile_out`.
    TileStore,
    /// The masking rules, with the options as pipeline constants.
    Masking,
    /// `rows_max` of the decode kernel with subgroup operations.
    ReduceSubgroup,
    /// `rows_max` of the decode kernel through workgroup memory only.
    ReduceWorkgroup,
    /// The fused kernel's row reductions through workgroup memory (both variants use it).
    TileRows,
    /// The fused kernel's placement and row reductions by subgroup shuffles.
    TileRowsSubgroup,
    /// The fused kernel's placement and row reductions through workgroup memory only.
    TileRowsWorkgroup,
    /// What the two backward kernels share: addresses, the score's derivative, the stores.
    Backward,
    /// `bias_at` and `mask_word` from buffers of their own.
    OptionsApart,
    /// `bias_at` and `mask_word` from inside `lens` (two storage buffers fewer).
    OptionsPacked,
    /// The fused kernel's 16-bit tile products: staging and read-back ([`Mma`]).
    Mma,
    /// Their products on cooperative matrices.
    MmaCooperative,
    /// Their products by plain FMAs (any adapter with `SHADER_F16`).
    MmaEmulated,
    /// Their interface for the scalar fused kernel, never called.
    MmaNone,
}

impl Fragment {
    /// Every fragment.
    pub const ALL: [Fragment; 17] = [
        Fragment::Grid,
        Fragment::Lse,
        Fragment::TileGemm,
        Fragment::TileStore,
        Fragment::Masking,
        Fragment::ReduceSubgroup,
        Fragment::ReduceWorkgroup,
        Fragment::TileRows,
        Fragment::TileRowsSubgroup,
        Fragment::TileRowsWorkgroup,
        Fragment::Backward,
        Fragment::OptionsApart,
        Fragment::OptionsPacked,
        Fragment::Mma,
        Fragment::MmaCooperative,
        Fragment::MmaEmulated,
        Fragment::MmaNone,
    ];

    /// Its WGSL.
    pub fn source(self) -> &'static str {
        match self {
            Fragment::Grid => include_str!("../../../shaders/lib/grid.wgsl"),
            Fragment::Lse => include_str!("../../../shaders/lib/lse.wgsl"),
            Fragment::TileGemm => include_str!("../../../shaders/lib/tile_gemm.wgsl"),
            Fragment::TileStore => include_str!("../../../shaders/lib/tile_store.wgsl"),
            Fragment::Masking => include_str!("../../../shaders/lib/masking.wgsl"),
            Fragment::ReduceSubgroup => include_str!("../../../shaders/lib/reduce_subgroup.wgsl"),
            Fragment::ReduceWorkgroup => {
                include_str!("../../../shaders/lib/reduce_workgroup.wgsl")
            }
            Fragment::TileRows => include_str!("../../../shaders/lib/tile_rows.wgsl"),
            Fragment::TileRowsSubgroup => {
                include_str!("../../../shaders/lib/tile_rows_subgroup.wgsl")
            }
            Fragment::TileRowsWorkgroup => {
                include_str!("../../../shaders/lib/tile_rows_workgroup.wgsl")
            }
            Fragment::Backward => include_str!("../../../shaders/lib/backward.wgsl"),
            Fragment::OptionsApart => include_str!("../../../shaders/lib/options_apart.wgsl"),
            Fragment::OptionsPacked => include_str!("../../../shaders/lib/options_packed.wgsl"),
            Fragment::Mma => include_str!("../../../shaders/lib/mma.wgsl"),
            Fragment::MmaCooperative => include_str!("../../../shaders/lib/mma_cooperative.wgsl"),
            Fragment::MmaEmulated => include_str!("../../../shaders/lib/mma_emulated.wgsl"),
            Fragment::MmaNone => include_str!("../../../shaders/lib/mma_none.wgsl"),
        }
    }
}

/// Every kernel of the crate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// `S = scale * Q K^T`, tiled (three-pass path, pass 1).
    QkScores,
    /// Masked softmax of S in place, with log-sum-exp (three-pass path, pass 2).
    MaskedSoftmax,
    /// `O = P V`, tiled (three-pass path, pass 3).
    PvProduct,
    /// Scores, online softmax and `P V` fused (flash attention).
    FlashAttention,
    /// The same for a few rows over many keys, the keys spread over the invocations.
    FlashDecode,
    /// Merges partial results over disjoint key sets (flash-decoding splits, public merge).
    CombineSplits,
    /// Batched `C = alpha A B^T + bias` with any strides (projections, head averages).
    Matmul,
    /// The backward's first phase: D = dO·O and the row shifts, one row per invocation.
    AttentionBackwardDelta,
    /// The backward of attention: dQ, dK and dV, the bias's and the sinks' gradients, one
    /// row per invocation.
    AttentionBackward,
    /// The backward's dQ, or dK and dV, in 64 x 64 tiles with register blocks.
    AttentionBackwardTiled,
    /// Rotary position embedding of rows, by their positions.
    Rotate,
}

/// What sits at one binding slot of a kernel. The host declares every binding from this list
/// (`@group(0) @binding(n)`, in slot order), so binding numbers and access modes are written
/// once, here, and the kernels only use the names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Slot {
    /// `var<uniform> name: U` for a parameter block `U` of [`uniforms`].
    Uniform {
        name: &'static str,
        ty: &'static str,
        decl: &'static str,
    },
    /// `var<storage, ...> name: ty`, a buffer of a fixed element type.
    Storage {
        name: &'static str,
        ty: &'static str,
        read_only: bool,
    },
    /// A tensor the prelude declares in its storage type, with accessors named after it.
    Tensor { name: &'static str, read_only: bool },
}

/// How a kernel binds its parameter blocks (sizes, strides and flags of one call).
///
/// Uniform buffers everywhere but on Mesa's lavapipe, where they are read-only storage
/// buffers. lavapipe (Mesa 22.3, Debian bookworm's) specialises a shader on the values of the
/// uniforms its loop bounds and branches read ("inline uniforms") and, when that looks
/// worthwhile, recompiles the shader on every dispatch without caching or freeing the
/// variants: a kernel caught by that heuristic costs a JIT compilation per call and leaks its
/// code (the split decode path's merge did: ~440 KiB and one executable mapping per call).
/// Storage buffers are never inlined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ParamsIn {
    /// `var<uniform>`: constant caches on GPUs.
    Uniform,
    /// `var<storage, read>`: immune to lavapipe's per-dispatch specialisation.
    ReadOnlyStorage,
}

impl ParamsIn {
    /// Parses the value of `WGPU_ATTENTION_PARAMS`: `uniform` or `storage`.
    pub fn parse(value: &str) -> Option<ParamsIn> {
        match value.trim() {
            "uniform" => Some(ParamsIn::Uniform),
            "storage" => Some(ParamsIn::ReadOnlyStorage),
            _ => None,
        }
    }

    /// The binding a device with adapter `info` uses unless `WGPU_ATTENTION_PARAMS` says
    /// otherwise.
    pub fn for_adapter(info: &wgpu::AdapterInfo) -> ParamsIn {
        if info.name.contains("llvmpipe") {
            ParamsIn::ReadOnlyStorage
        } else {
            ParamsIn::Uniform
        }
    }
}

const fn tensor(name: &'static str, read_only: bool) -> Slot {
    Slot::Tensor { name, read_only }
}

const fn uniform<U: Uniform>(name: &'static str) -> Slot {
    Slot::Uniform {
        name,
        ty: U::NAME,
        decl: U::WGSL,
    }
}

const fn read(name: &'static str, ty: &'static str) -> Slot {
    Slot::Storage {
        name,
        ty,
        read_only: true,
    }
}

const fn write(name: &'static str, ty: &'static str) -> Slot {
    Slot::Storage {
        name,
        ty,
        read_only: false,
    }
}

impl Kernel {
    /// All kernels, for tests that compile every one.
    pub const ALL: [Kernel; 11] = [
        Kernel::QkScores,
        Kernel::MaskedSoftmax,
        Kernel::PvProduct,
        Kernel::FlashAttention,
        Kernel::FlashDecode,
        Kernel::CombineSplits,
        Kernel::Matmul,
        Kernel::AttentionBackwardDelta,
        Kernel::AttentionBackward,
        Kernel::AttentionBackwardTiled,
        Kernel::Rotate,
    ];

    /// The kernel's own file.
    pub fn source(self) -> &'static str {
        match self {
            Kernel::QkScores => QK_SCORES,
            Kernel::MaskedSoftmax => MASKED_SOFTMAX,
            Kernel::PvProduct => PV_PRODUCT,
            Kernel::FlashAttention => FLASH_ATTENTION,
            Kernel::FlashDecode => FLASH_DECODE,
            Kernel::CombineSplits => COMBINE_SPLITS,
            Kernel::Matmul => MATMUL,
            Kernel::AttentionBackwardDelta => ATTENTION_BACKWARD_DELTA,
            Kernel::AttentionBackward => ATTENTION_BACKWARD,
            Kernel::AttentionBackwardTiled => ATTENTION_BACKWARD_TILED,
            Kernel::Rotate => ROTATE,
        }
    }

    /// The fragments of `shaders/lib/` it includes, in order (a key may add one:
    /// [`KernelKey::fragments`]).
    pub fn fragments(self) -> &'static [Fragment] {
        use Fragment::*;
        match self {
            Kernel::QkScores | Kernel::PvProduct | Kernel::Matmul => &[Grid, TileGemm, TileStore],
            Kernel::MaskedSoftmax => &[Grid, Lse, Masking, OptionsApart],
            Kernel::FlashAttention => &[Grid, Lse, TileGemm, Masking, OptionsApart],
            Kernel::FlashDecode => &[Grid, Lse, Masking, OptionsApart],
            Kernel::CombineSplits => &[Grid, Lse],
            Kernel::Rotate => &[Grid],
            Kernel::AttentionBackwardDelta => &[Grid, Masking, OptionsPacked],
            Kernel::AttentionBackward => &[Grid, Masking, OptionsPacked, Backward],
            Kernel::AttentionBackwardTiled => &[Grid, TileGemm, Masking, OptionsPacked, Backward],
        }
    }

    /// Slot `n` is `@binding(n)` of group 0.
    pub(crate) fn slots(self) -> &'static [Slot] {
        const F32: &str = "array<f32>";
        // f32 bits, so that -inf is only ever written as a bit pattern.
        const BITS: &str = "array<u32>";
        // One byte per element, four to a word.
        const BYTES: &str = "array<u32>";
        match self {
            Kernel::QkScores => {
                const S: &[Slot] = &[
                    uniform::<QkParams>("params"),
                    tensor("q", true),
                    tensor("k", true),
                    write("scores", F32),
                    read("w", F32),
                ];
                S
            }
            Kernel::MaskedSoftmax => {
                const S: &[Slot] = &[
                    uniform::<SoftmaxParams>("params"),
                    write("scores", F32),
                    read("bias", F32),
                    read("mask", BYTES),
                    read("lens", "array<u32>"),
                    write("lse", BITS),
                    uniform::<MaskParams>("mparams"),
                ];
                S
            }
            // The decode kernel binds exactly what the fused kernel binds, so one encoder serves
            // both.
            Kernel::FlashAttention | Kernel::FlashDecode => {
                const S: &[Slot] = &[
                    uniform::<FlashParams>("params"),
                    tensor("q", true),
                    tensor("k", true),
                    tensor("v", true),
                    tensor("o", false),
                    read("bias", F32),
                    read("mask", BYTES),
                    read("lens", "array<u32>"),
                    write("lse_or_partials", BITS),
                    uniform::<MaskParams>("mparams"),
                ];
                S
            }
            Kernel::CombineSplits => {
                const S: &[Slot] = &[
                    uniform::<CombineParams>("params"),
                    tensor("p", true),
                    read("part_lses", BITS),
                    tensor("o", false),
                    write("lse", BITS),
                    read("lens", BITS),
                ];
                S
            }
            Kernel::Matmul => {
                const S: &[Slot] = &[
                    uniform::<MatmulParams>("params"),
                    tensor("a", true),
                    tensor("b", true),
                    tensor("c", false),
                    read("bias", F32),
                ];
                S
            }
            // The backward's statistics (D, the row shifts and the log-sum-exp, as f32 bits)
            // are one buffer, and the bias and the mask are packed into `lens`: eight storage
            // buffers for the gradient phases, WebGPU's default limit per stage. The tiled
            // phases bind what the row phases bind, so one encoder serves both.
            Kernel::AttentionBackwardDelta => {
                const S: &[Slot] = &[
                    uniform::<BackwardParams>("params"),
                    tensor("o", true),
                    tensor("d_o", true),
                    write("stats", BITS),
                    read("lens", "array<u32>"),
                    uniform::<MaskParams>("mparams"),
                ];
                S
            }
            Kernel::AttentionBackward | Kernel::AttentionBackwardTiled => {
                const S: &[Slot] = &[
                    uniform::<BackwardParams>("params"),
                    tensor("q", true),
                    tensor("k", true),
                    tensor("v", true),
                    tensor("d_o", true),
                    write("stats", BITS),
                    write("g_a", F32),
                    write("g_b", F32),
                    read("lens", "array<u32>"),
                    uniform::<MaskParams>("mparams"),
                ];
                S
            }
            Kernel::Rotate => {
                const S: &[Slot] = &[
                    uniform::<RotateParams>("params"),
                    tensor("x", true),
                    tensor("y", false),
                    read("table", "array<vec2<f32>>"),
                    read("positions", "array<u32>"),
                ];
                S
            }
            Kernel::PvProduct => {
                const S: &[Slot] = &[
                    uniform::<PvParams>("params"),
                    read("probs", F32),
                    tensor("v", true),
                    tensor("o", false),
                ];
                S
            }
        }
    }

    /// The name used in labels and errors.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::QkScores => "qk_scores",
            Kernel::MaskedSoftmax => "masked_softmax",
            Kernel::PvProduct => "pv_product",
            Kernel::FlashAttention => "flash_attention",
            Kernel::FlashDecode => "flash_decode",
            Kernel::CombineSplits => "combine_splits",
            Kernel::Matmul => "matmul",
            Kernel::AttentionBackwardDelta => "attention_backward_delta",
            Kernel::AttentionBackward => "attention_backward",
            Kernel::AttentionBackwardTiled => "attention_backward_tiled",
            Kernel::Rotate => "rotate",
        }
    }
}

/// The fused kernel's products of 16-bit operands (`shaders/lib/mma.wgsl`): Q, K and V are
/// f16 tensors, staged as f16 in workgroup memory, S and each 64-column chunk of P V computed
/// into an f32 tile there and read back into the scalar kernel's register blocks. On
/// cooperative matrices (tensor cores, simdgroup matrices) where the device has them, else
/// emulated by plain FMAs over the same staged operands (what tests run on other adapters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mma {
    /// Cooperative matrices (`Features::EXPERIMENTAL_COOPERATIVE_MATRIX`), or the emulation.
    pub cooperative: bool,
    /// The matrices' size (`CM`): 16 (f16 16 x 16 x 16 on Vulkan) or 8 (8 x 8 x 8 on Metal).
    pub size: u32,
    /// head_dim rounded up to `size`, or to a multiple of 64 past 64 (`QD`: Q and K are
    /// staged 64 dims at a time).
    pub q_dims: u32,
    /// v_head_dim rounded the same way (`VD`: V is staged and P V computed 64 columns at a
    /// time).
    pub v_dims: u32,
    /// The device's one subgroup size (`SG`), which the cooperative products share tiles out
    /// by; 0 for the emulation.
    pub subgroup: u32,
}

impl Mma {
    /// The products for `head_dim` and `v_head_dim` with matrices of `size`.
    pub fn new(
        cooperative: bool,
        size: u32,
        head_dim: usize,
        v_head_dim: usize,
        subgroup: u32,
    ) -> Mma {
        let round = |n: usize| {
            let n = n.max(1) as u32;
            let m = if n > TILE { TILE } else { size };
            n.div_ceil(m) * m
        };
        Mma {
            cooperative,
            size,
            q_dims: round(head_dim),
            v_dims: round(v_head_dim),
            subgroup: if cooperative { subgroup } else { 0 },
        }
    }

    /// Bytes of lib/mma.wgsl's workgroup arrays at `rows` rows: S or a chunk of P V (f32), P,
    /// a slice of Q, a slice of K or chunk of V (f16), and a matrix of zeros.
    pub const fn workgroup_bytes(&self, rows: u32) -> u32 {
        let qs = if self.q_dims < TILE {
            self.q_dims
        } else {
            TILE
        };
        let pv = if self.v_dims < TILE {
            self.v_dims
        } else {
            TILE
        };
        let kvw = if qs > pv { qs } else { pv };
        rows * TILE * 4
            + rows * TILE * 2
            + rows * qs * 2
            + TILE * kvw * 2
            + self.size * self.size * 4
    }

    /// The result tiles of S and of one chunk of P V at `rows` rows.
    pub fn tiles(&self, rows: u32) -> [u32; 2] {
        let strips = rows / self.size;
        [
            strips * (TILE / self.size),
            strips * (self.v_dims.min(TILE) / self.size),
        ]
    }

    /// The constants of its source.
    fn constants(&self) -> [(&'static str, u32); 4] {
        [
            ("CM", self.size),
            ("QD", self.q_dims),
            ("VD", self.v_dims),
            ("SG", self.subgroup.max(1)),
        ]
    }
}

/// The rows per workgroup the fused kernel is compiled for (`TILE_M`).
pub const FLASH_ROWS: [u32; 5] = [4, 8, 16, 32, 64];

/// Workgroup memory of the fused kernel with invocation block `block` on `rows` rows, with
/// `resident_q` slices of resident Q, double-buffered or not: the tile product's staging
/// (also V's; two buffers with `double_buffer`), the tile's probabilities (`TILE x rows`
/// f32), a row reduction (`TILE` rows x `TILE / block.cols` invocations), the tile bounds
/// (`vec4<u32>`), the last key any row sees (`u32`), the hole, the paged keys' slots, with
/// `subgroups` the flag saying whether they fit the rows, and `q_res` ([`flash_q_vec4s`], one
/// unused vec4 without resident Q). The one figure the planner and the key both use; a test
/// checks it against naga's layout.
pub(crate) const fn flash_workgroup_bytes(
    block: TileBlock,
    subgroups: bool,
    rows: u32,
    resident_q: u32,
    double_buffer: bool,
    mma: Option<Mma>,
) -> u32 {
    // With 16-bit products: no tile staging (one vec4), p_tile of one key, and lib/mma.wgsl's
    // arrays.
    let (staging, p_keys, mma_bytes) = match mma {
        Some(m) => (16, 1, m.workgroup_bytes(rows)),
        None => (
            TILE_STAGE_BYTES * if double_buffer { 2 } else { 1 },
            TILE,
            0,
        ),
    };
    // Staging, p_tile, red, tile_bounds, key_end, hole_tiles, key_slots, rows_fit, q_res.
    staging
        + mma_bytes
        + p_keys * rows * 4
        + TILE * block.columns_invocations() * 4
        + 16
        + 4
        + 8
        + TILE * 4
        + if subgroups { 4 } else { 0 }
        + 16 * flash_q_vec4s(rows, resident_q)
}

/// The length in vec4s of the fused kernel's resident Q (`q_res`) for `rows` rows and
/// `resident_q` slices of 16 dims: `rows / 4` vec4s per dim, and 1 (unused) where Q is not
/// resident, since WGSL has no empty arrays.
pub(crate) const fn flash_q_vec4s(rows: u32, resident_q: u32) -> u32 {
    let n = resident_q * uniforms::TILE_K * rows / 4;
    if n == 0 { 1 } else { n }
}

/// The fused kernel's vec4 columns of O per invocation for `v_head_dim` and `block`
/// (`OC`): the `ceil(v_head_dim / 4)` vec4 columns over the block's `64 / cols` invocations
/// across a row.
pub(crate) fn flash_o_vec4s(v_head_dim: usize, block: TileBlock) -> u32 {
    (v_head_dim.div_ceil(4) as u32).div_ceil(block.columns_invocations())
}

/// Keys of V the fused kernel stages at once (`BKV`): a power of two dividing the 64-key
/// tile whose slice of `64 / cols * o_vec4s` vec4s per key fits the tile staging.
fn flash_bkv(block: TileBlock, o_vec4s: u32) -> u32 {
    let per_key = block.columns_invocations() * o_vec4s;
    let most = (TILE_STAGE_BYTES / 16 / per_key).clamp(1, TILE);
    1 << most.ilog2()
}

/// Workgroup memory of the tiled backward kernel: the tile product's staging (also the
/// accumulating products'), a `TILE x TILE` f32 tile of P or dS, the tile's state (two
/// atomics and their verdict) and a packed sequence's lengths.
pub(crate) const BACKWARD_TILED_WORKGROUP_BYTES: u32 = TILE_STAGE_BYTES + TILE * TILE * 4 + 12 + 8;

/// The rows the decode kernel is compiled for (`ROWS`): the fewest of these that hold a kv
/// head's `group * q_len` rows.
pub const DECODE_ROWS: [u32; 5] = [1, 2, 4, 8, 16];

/// Invocations per workgroup the decode kernel is compiled for (`WG`): each computes the scores
/// of `64 / WG` keys of a tile.
pub const DECODE_WORKGROUPS: [u32; 3] = [16, 32, 64];

/// The decode kernel's sizes, as written into its source: (`Q4`, vec4s of Q per row;
/// `V_LANES`, invocations per key in P·V; `CPL`, vec4 columns of O per invocation; `SH4`,
/// vec4s of its row buffer).
fn decode_sizes(workgroup: u32, rows: u32, q_chunks: u32, o_chunks: u32) -> [u32; 4] {
    let q4 = 16 * q_chunks;
    // The vec4 columns of O, over V_LANES invocations (a power of two dividing the workgroup)
    // of CPL columns each.
    let columns = 16 * o_chunks;
    let v_lanes = columns.next_power_of_two().min(workgroup);
    let cpl = columns.div_ceil(v_lanes);
    // Q during the key loop; the partial outputs of all but the first key group after it.
    let sh4 = rows * q4.max((workgroup - v_lanes) * cpl);
    [q4, v_lanes, cpl, sh4]
}

/// Bytes of workgroup memory of the decode kernel for `workgroup` invocations, `rows` rows,
/// `ceil(head_dim / 64)` and `ceil(v_head_dim / 64)` chunks, with or without subgroup
/// operations.
pub fn decode_workgroup_bytes(
    workgroup: u32,
    rows: u32,
    q_chunks: u32,
    o_chunks: u32,
    subgroups: bool,
) -> u32 {
    let [_, _, _, sh4] = decode_sizes(workgroup, rows, q_chunks, o_chunks);
    // rows_sh, p_sh (two tiles), row_info, row_sink, slot_sh, tile_bounds, hole_tiles,
    // key_end, and the reduction's partials.
    let parts = if subgroups {
        workgroup / 4
    } else {
        workgroup / 8
    };
    sh4 * 16
        + 2 * TILE * rows.div_ceil(4) * 16
        + rows * 16
        + rows * 4
        + 2 * TILE * 4
        + 16
        + 8
        + 4
        + 2 * rows * parts * 4
}

/// How a tensor is stored, as a kernel sees it: the [`DType`] plus, for f16, whether the
/// adapter reads it natively.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Storage {
    /// `array<f32>`.
    #[default]
    F32,
    /// `array<f16>` with `enable f16` (adapters with `SHADER_F16`).
    F16,
    /// f16 packed two to a `u32`, converted with `unpack2x16float` / `pack2x16float`.
    F16Packed,
    /// bf16 packed two to a `u32`, converted by bit shifts; rounded to nearest even on store.
    Bf16,
    /// OCP FP8 E4M3 packed four to a `u32`, converted by bit operations; rounded to nearest
    /// even and saturated on store.
    F8E4M3,
}

impl Storage {
    /// Every storage type.
    pub const ALL: [Storage; 5] = [
        Storage::F32,
        Storage::F16,
        Storage::F16Packed,
        Storage::Bf16,
        Storage::F8E4M3,
    ];

    /// The storage of `dtype` on an adapter with (or without) native f16.
    pub fn of(dtype: DType, native_f16: bool) -> Storage {
        match dtype {
            DType::F32 => Storage::F32,
            DType::F16 if native_f16 => Storage::F16,
            DType::F16 => Storage::F16Packed,
            DType::Bf16 => Storage::Bf16,
            DType::F8E4M3 => Storage::F8E4M3,
        }
    }
}

/// The masking options that act key by key, compiled into the masking kernels as pipeline
/// constants (`shaders/lib/masking.wgsl`): a call without them runs none of their code. The
/// options that only narrow each row's key range (causal, window, lengths) are uniforms: they
/// cost per row, not per key, and compiling them in would multiply the pipelines by 24.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct MaskOptions {
    /// An additive bias.
    pub bias: bool,
    /// A boolean mask.
    pub mask: bool,
    /// A softcap.
    pub softcap: bool,
    /// ALiBi slopes.
    pub alibi: bool,
    /// Learnable sink logits.
    pub sinks: bool,
    /// StreamingLLM's sink keys beside a window.
    pub sink_keys: bool,
    /// Keys per page of K and V read through a block table; 0 without pages.
    pub page_size: u32,
    /// A packed batch of variable-length sequences.
    pub varlen: bool,
    /// Dropout on the weights (a call with `p > 0`).
    pub dropout: bool,
    /// A mask mod ([`ScoreMod`](crate::ScoreMod)).
    pub mask_mod: bool,
    /// A score mod.
    pub score_mod: bool,
    /// A key range of the score mod's.
    pub key_range: bool,
    /// Which mods' WGSL the kernel compiles in: 0 for the identities (then `mask_mod` and
    /// `score_mod` only compile in their calls), else the number the device's pipeline cache
    /// gave the call's source.
    pub mods: u32,
}

impl MaskOptions {
    /// The options of a validated call.
    pub(crate) fn of(spec: &Spec<'_>) -> MaskOptions {
        let o = spec.opts;
        MaskOptions {
            bias: o.bias.is_some() || o.device.bias.is_some(),
            mask: o.mask.is_some() || o.device.mask.is_some(),
            softcap: o.softcap.is_some(),
            alibi: o.alibi.is_some(),
            sinks: o.sinks.is_some(),
            sink_keys: o.sink_keys > 0 && o.window.is_some(),
            page_size: o.pages.as_ref().map_or(0, |p| p.page_size as u32),
            varlen: o.varlen.is_some(),
            dropout: o.active_dropout().is_some(),
            mask_mod: o.score_mod.as_ref().is_some_and(|m| m.has_mask()),
            score_mod: o.score_mod.as_ref().is_some_and(|m| m.has_score()),
            key_range: o.score_mod.as_ref().is_some_and(|m| m.has_range()),
            mods: 0,
        }
    }

    /// Every combination of bias, mask and softcap (8), each with ALiBi, sinks and sink keys
    /// all off or all on: what the naga tests compile (the last three share no code with each
    /// other beyond what all-on compiles).
    pub fn all() -> Vec<MaskOptions> {
        (0..16u8)
            .map(|bits| MaskOptions {
                bias: bits & 1 != 0,
                mask: bits & 2 != 0,
                softcap: bits & 4 != 0,
                alibi: bits & 8 != 0,
                sinks: bits & 8 != 0,
                sink_keys: bits & 8 != 0,
                page_size: if bits & 8 != 0 { 16 } else { 0 },
                varlen: bits & 8 != 0,
                dropout: bits & 8 != 0,
                mask_mod: bits & 8 != 0,
                score_mod: bits & 8 != 0,
                key_range: bits & 8 != 0,
                mods: 0,
            })
            .collect()
    }

    fn constants(&self, out: &mut Vec<(&'static str, f64)>) {
        for (name, on) in [
            ("HAS_BIAS", self.bias),
            ("HAS_MASK", self.mask),
            ("HAS_SOFTCAP", self.softcap),
            ("HAS_ALIBI", self.alibi),
            ("HAS_SINKS", self.sinks),
            ("HAS_SINK_KEYS", self.sink_keys),
            ("HAS_PAGES", self.page_size != 0),
            ("HAS_VARLEN", self.varlen),
            ("HAS_DROPOUT", self.dropout),
            ("HAS_MASK_MOD", self.mask_mod),
            ("HAS_SCORE_MOD", self.score_mod),
            ("HAS_KEY_RANGE", self.key_range),
        ] {
            out.push((name, on as u8 as f64));
        }
        out.push(("PAGE_SIZE", self.page_size.max(1) as f64));
    }

    fn label(&self) -> String {
        let parts: Vec<&str> = [
            ("bias", self.bias),
            ("mask", self.mask),
            ("softcap", self.softcap),
            ("alibi", self.alibi),
            ("sinks", self.sinks),
            ("sink keys", self.sink_keys),
            ("paged", self.page_size != 0),
            ("packed", self.varlen),
            ("dropout", self.dropout),
            ("mask mod", self.mask_mod),
            ("score mod", self.score_mod),
            ("key range", self.key_range),
        ]
        .into_iter()
        .filter_map(|(name, on)| on.then_some(name))
        .collect();
        let mods = if self.mods != 0 {
            format!(" (mods #{})", self.mods)
        } else {
            String::new()
        };
        if parts.is_empty() {
            "no per-key options".into()
        } else {
            parts.join("+") + &mods
        }
    }
}

/// One specialisation of one kernel: everything that changes its compiled pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KernelKey {
    /// [`Kernel::QkScores`].
    QkScores {
        /// Queries.
        q: Storage,
        /// Keys.
        k: Storage,
        /// Additive (Bahdanau) scores instead of the dot product.
        additive: bool,
        /// Each invocation's block of the tile.
        block: TileBlock,
    },
    /// [`Kernel::MaskedSoftmax`].
    MaskedSoftmax {
        /// Invocations per workgroup (one row per workgroup): 64, 128 or 256.
        workgroup: u32,
        /// The options compiled in.
        masks: MaskOptions,
    },
    /// [`Kernel::PvProduct`].
    PvProduct {
        /// Values.
        v: Storage,
        /// Output.
        o: Storage,
        /// Each invocation's block of the tile.
        block: TileBlock,
    },
    /// [`Kernel::FlashAttention`].
    FlashAttention {
        /// Queries.
        q: Storage,
        /// Keys.
        k: Storage,
        /// Values.
        v: Storage,
        /// Output.
        o: Storage,
        /// Each invocation's block of a score tile (`block.rows` at most `rows`).
        block: TileBlock,
        /// Vec4 columns of O each invocation owns, `ceil(ceil(v_head_dim / 4) / (64 /
        /// block.cols))`: 1 to 4 with 4 columns per block, 1 to 8 with 8.
        o_vec4s: u32,
        /// Rows per workgroup: 64, or 4 to 32 when decoding a few rows
        /// ([`FusedPlan::rows_per_workgroup`](crate::gpu::FusedPlan::rows_per_workgroup)).
        rows: u32,
        /// Slices of 16 dims of Q kept in workgroup memory for the whole key loop
        /// (`ceil(head_dim / 16)`), or 0: Q staged with every key tile's K
        /// ([`TileConfig::resident_q`](crate::gpu::tuning::TileConfig::resident_q)).
        resident_q: u32,
        /// Two staging buffers, each step of a key tile loaded during the previous one's FMAs
        /// ([`TileConfig::double_buffer`](crate::gpu::tuning::TileConfig::double_buffer)).
        double_buffer: bool,
        /// Row maxima and sums by subgroup shuffles (the device has `Features::SUBGROUP`;
        /// the kernel falls back to workgroup memory where its subgroups are smaller than a
        /// row's invocations or not full), or through workgroup memory only.
        subgroups: bool,
        /// S and P V as products of 16-bit operands staged in workgroup memory (f16 Q, K
        /// and V), or `None`: the scalar register-blocked products.
        mma: Option<Mma>,
        /// The options compiled in.
        masks: MaskOptions,
    },
    /// [`Kernel::FlashDecode`].
    FlashDecode {
        /// Queries.
        q: Storage,
        /// Keys.
        k: Storage,
        /// Values.
        v: Storage,
        /// Output.
        o: Storage,
        /// Invocations per workgroup, one of [`DECODE_WORKGROUPS`].
        workgroup: u32,
        /// Rows per workgroup, one of [`DECODE_ROWS`].
        rows: u32,
        /// `ceil(head_dim / 64)`, 1 to 4.
        q_chunks: u32,
        /// `ceil(v_head_dim / 64)`, 1 to 4.
        o_chunks: u32,
        /// Row maxima by subgroup operations (the device has `Features::SUBGROUP`), or through
        /// workgroup memory only.
        subgroups: bool,
        /// K read this many elements per load: 8 (16 bytes of a 16-bit type, two loads of
        /// f32) where head_dim is a multiple of 8, 4 where it is a multiple of 4, else 1
        /// (element by element).
        k_group: u32,
        /// V read 4 elements per load (4) where v_head_dim is a multiple of 4, else 1.
        v_group: u32,
        /// The options compiled in.
        masks: MaskOptions,
    },
    /// [`Kernel::CombineSplits`].
    CombineSplits {
        /// The partial outputs.
        parts: Storage,
        /// The merged output.
        o: Storage,
    },
    /// [`Kernel::Rotate`].
    Rotate {
        /// The rows turned.
        x: Storage,
        /// Where they go.
        y: Storage,
    },
    /// [`Kernel::AttentionBackwardDelta`].
    AttentionBackwardDelta {
        /// The forward's output.
        o: Storage,
        /// The output's gradient.
        d_o: Storage,
        /// The options compiled in.
        masks: MaskOptions,
    },
    /// [`Kernel::AttentionBackward`].
    AttentionBackward {
        /// Queries.
        q: Storage,
        /// Keys.
        k: Storage,
        /// Values.
        v: Storage,
        /// The output's gradient.
        d_o: Storage,
        /// 1: dQ; 2: dK and dV; 3: the bias's gradient; 4: the sinks'.
        phase: u32,
        /// Vec4s of a Q or K row held per invocation: `ceil(head_dim / 16) * 4`.
        d4: u32,
        /// Vec4s of a V or O row: `ceil(v_head_dim / 16) * 4`.
        v4: u32,
        /// The options compiled in.
        masks: MaskOptions,
    },
    /// [`Kernel::AttentionBackwardTiled`].
    AttentionBackwardTiled {
        /// Queries.
        q: Storage,
        /// Keys.
        k: Storage,
        /// Values.
        v: Storage,
        /// The output's gradient.
        d_o: Storage,
        /// `false`: dQ, a workgroup per 64 query rows; `true`: dK and dV, a workgroup per
        /// 64 keys.
        dkv: bool,
        /// Each invocation's block of a score tile.
        block: TileBlock,
        /// Vec4 columns of each gradient row per invocation, `ceil(ceil(width / 4) / (64 /
        /// block.cols))` for the wider of head_dim and v_head_dim (dQ: for head_dim).
        o_vec4s: u32,
        /// The options compiled in.
        masks: MaskOptions,
    },
    /// [`Kernel::Matmul`].
    Matmul {
        /// Left operand.
        a: Storage,
        /// Right operand.
        b: Storage,
        /// Result.
        c: Storage,
        /// Each invocation's block of the tile.
        block: TileBlock,
    },
}

impl KernelKey {
    /// Which kernel.
    pub fn kernel(&self) -> Kernel {
        match self {
            KernelKey::QkScores { .. } => Kernel::QkScores,
            KernelKey::MaskedSoftmax { .. } => Kernel::MaskedSoftmax,
            KernelKey::PvProduct { .. } => Kernel::PvProduct,
            KernelKey::FlashAttention { .. } => Kernel::FlashAttention,
            KernelKey::FlashDecode { .. } => Kernel::FlashDecode,
            KernelKey::CombineSplits { .. } => Kernel::CombineSplits,
            KernelKey::Rotate { .. } => Kernel::Rotate,
            KernelKey::Matmul { .. } => Kernel::Matmul,
            KernelKey::AttentionBackwardDelta { .. } => Kernel::AttentionBackwardDelta,
            KernelKey::AttentionBackward { .. } => Kernel::AttentionBackward,
            KernelKey::AttentionBackwardTiled { .. } => Kernel::AttentionBackwardTiled,
        }
    }

    /// The storage of the kernel's tensor bindings, in binding order.
    pub fn storages(&self) -> Vec<Storage> {
        match *self {
            KernelKey::QkScores { q, k, .. } => vec![q, k],
            KernelKey::MaskedSoftmax { .. } => Vec::new(),
            KernelKey::PvProduct { v, o, .. } => vec![v, o],
            KernelKey::FlashAttention { q, k, v, o, .. }
            | KernelKey::FlashDecode { q, k, v, o, .. } => vec![q, k, v, o],
            KernelKey::CombineSplits { parts, o } => vec![parts, o],
            KernelKey::Rotate { x, y } => vec![x, y],
            KernelKey::Matmul { a, b, c, .. } => vec![a, b, c],
            KernelKey::AttentionBackwardDelta { o, d_o, .. } => vec![o, d_o],
            KernelKey::AttentionBackward { q, k, v, d_o, .. }
            | KernelKey::AttentionBackwardTiled { q, k, v, d_o, .. } => vec![q, k, v, d_o],
        }
    }

    /// Every key with every tensor in `storage`, over every tile configuration and every combination of
    /// options ([`MaskOptions::all`]): what the naga tests compile.
    pub fn samples(storage: Storage) -> Vec<KernelKey> {
        let s = storage;
        let mut keys = vec![
            KernelKey::CombineSplits { parts: s, o: s },
            KernelKey::Rotate { x: s, y: s },
        ];
        for block in TileBlock::ALL {
            for additive in [false, true] {
                keys.push(KernelKey::QkScores {
                    q: s,
                    k: s,
                    additive,
                    block,
                });
            }
            keys.extend([
                KernelKey::PvProduct { v: s, o: s, block },
                KernelKey::Matmul {
                    a: s,
                    b: s,
                    c: s,
                    block,
                },
            ]);
        }
        // The fused kernel: every block, size and row count without options, and every option
        // combination on a few of them.
        let flash = |block, o_vec4s, rows, resident_q, double_buffer, subgroups, masks| {
            KernelKey::FlashAttention {
                q: s,
                k: s,
                v: s,
                o: s,
                block,
                o_vec4s,
                rows,
                resident_q,
                double_buffer,
                subgroups,
                mma: None,
                masks,
            }
        };
        for block in TileBlock::ALL {
            for o_vec4s in 1..=64 / block.columns_invocations() {
                for (n, rows) in FLASH_ROWS
                    .into_iter()
                    .filter(|&r| r >= block.rows)
                    .enumerate()
                {
                    let subgroups = (n + o_vec4s as usize).is_multiple_of(2);
                    // Resident Q of 1 to 5 slices on every other key, double buffers on every
                    // third.
                    let resident = (n as u32 + o_vec4s) % 6 * (n as u32 % 2);
                    let double = (n + o_vec4s as usize).is_multiple_of(3);
                    let masks = MaskOptions::default();
                    keys.push(flash(
                        block, o_vec4s, rows, resident, double, subgroups, masks,
                    ));
                }
            }
        }
        for masks in MaskOptions::all() {
            for workgroup in [64, 128, 256] {
                keys.push(KernelKey::MaskedSoftmax { workgroup, masks });
            }
            for (n, block) in TileBlock::ALL.into_iter().enumerate() {
                let resident = n as u32 % 2 * 3;
                keys.push(flash(
                    block,
                    1 + n as u32,
                    [64, 16, 32][n],
                    resident,
                    n != 1,
                    n == 1,
                    masks,
                ));
            }
        }
        // The 16-bit products (f16 tensors only): emulated and cooperative, at the widths and
        // row counts the planner picks from, with every option combination on one of them.
        if s == Storage::F16 {
            let mma = |cooperative, size, dims: (usize, usize), rows, block, masks| {
                let o_vec4s = flash_o_vec4s(dims.1, block);
                let mut key = flash(block, o_vec4s, rows, 0, false, cooperative, masks);
                if let KernelKey::FlashAttention { mma, .. } = &mut key {
                    *mma = Some(Mma::new(cooperative, size, dims.0, dims.1, 32));
                }
                key
            };
            let plain = MaskOptions::default();
            for (n, (dims, rows)) in [
                ((64, 64), 64),
                ((128, 128), 32),
                ((72, 40), 16),
                ((16, 100), 32),
            ]
            .into_iter()
            .enumerate()
            {
                let block = TileBlock::ALL[n % 3];
                keys.push(mma(false, 16, dims, rows, block, plain));
                keys.push(mma(true, 16, dims, rows, TileBlock::B8X4, plain));
                keys.push(mma(true, 8, dims, rows, TileBlock::B8X4, plain));
            }
            for masks in MaskOptions::all() {
                keys.push(mma(false, 16, (64, 64), 32, TileBlock::B8X8, masks));
            }
            if let Some(&every) = MaskOptions::all().last() {
                keys.push(mma(true, 16, (64, 64), 64, TileBlock::B8X4, every));
            }
        }
        // The decode kernel: every size and reduction without options, and every option
        // combination on a few sizes (each key is a full compile per backend in the naga tests).
        for subgroups in [false, true] {
            for (n, rows) in DECODE_ROWS.into_iter().enumerate() {
                for chunks in 1..=4 {
                    keys.push(KernelKey::FlashDecode {
                        q: s,
                        k: s,
                        v: s,
                        o: s,
                        workgroup: DECODE_WORKGROUPS[(n + chunks as usize) % 3],
                        rows,
                        q_chunks: chunks,
                        o_chunks: 5 - chunks,
                        subgroups,
                        k_group: [1, 4, 8][(n + chunks as usize) % 3],
                        v_group: [1, 4][(n + chunks as usize) % 2],
                        masks: MaskOptions::default(),
                    });
                }
            }
            for masks in MaskOptions::all() {
                keys.push(KernelKey::FlashDecode {
                    q: s,
                    k: s,
                    v: s,
                    o: s,
                    workgroup: 64,
                    rows: 4,
                    q_chunks: 2,
                    o_chunks: 1,
                    subgroups,
                    k_group: if masks.bias { 8 } else { 4 },
                    v_group: if masks.mask { 1 } else { 4 },
                    masks,
                });
            }
        }
        // The backward: each phase at a few widths without options, and every option
        // combination on the two gradient phases.
        let backward = |phase, d4, v4, masks| KernelKey::AttentionBackward {
            q: s,
            k: s,
            v: s,
            d_o: s,
            phase,
            d4,
            v4,
            masks,
        };
        for masks in MaskOptions::all().into_iter().filter(|m| m.page_size == 0) {
            keys.push(KernelKey::AttentionBackwardDelta {
                o: s,
                d_o: s,
                masks,
            });
        }
        for phase in 1..5 {
            for (d4, v4) in [(4, 4), (16, 32), (128, 128)] {
                keys.push(backward(phase, d4, v4, MaskOptions::default()));
            }
        }
        for block in TileBlock::ALL {
            for o_vec4s in 1..=128 / 4 / block.columns_invocations() {
                for dkv in [false, true] {
                    keys.push(KernelKey::AttentionBackwardTiled {
                        q: s,
                        k: s,
                        v: s,
                        d_o: s,
                        dkv,
                        block,
                        o_vec4s,
                        masks: MaskOptions::default(),
                    });
                }
            }
        }
        for masks in MaskOptions::all().into_iter().filter(|m| m.page_size == 0) {
            for (n, block) in TileBlock::ALL.into_iter().enumerate() {
                keys.push(KernelKey::AttentionBackwardTiled {
                    q: s,
                    k: s,
                    v: s,
                    d_o: s,
                    dkv: n % 2 == 1,
                    block,
                    o_vec4s: 1,
                    masks,
                });
            }
        }
        for masks in MaskOptions::all() {
            keys.push(backward(1, 8, 4, masks));
            keys.push(backward(2, 4, 8, masks));
            keys.push(backward(3, 4, 4, masks));
        }
        keys
    }

    /// The key's debug label, e.g.
    /// `flash_attention<q:F32,k:F32,v:F32,o:F32; block 8x8; o_vec4s=2; rows=64; bias+mask>`.
    pub fn label(&self) -> String {
        let mut tensors = Vec::new();
        let storages = self.storages();
        let mut next = storages.iter();
        for slot in self.kernel().slots() {
            if let Slot::Tensor { name, .. } = slot
                && let Some(s) = next.next()
            {
                tensors.push(format!("{name}:{s:?}"));
            }
        }
        let extra = match self {
            KernelKey::QkScores {
                additive, block, ..
            } => {
                let kind = if *additive { "additive" } else { "dot" };
                format!("{kind}; block {}", block.name())
            }
            KernelKey::PvProduct { block, .. } | KernelKey::Matmul { block, .. } => {
                format!("block {}", block.name())
            }
            KernelKey::MaskedSoftmax { workgroup, masks } => {
                format!("wg={workgroup}; {}", masks.label())
            }
            KernelKey::FlashAttention {
                block,
                o_vec4s,
                rows,
                resident_q,
                double_buffer,
                subgroups,
                mma,
                masks,
                ..
            } => format!(
                "block {}; o_vec4s={o_vec4s}; rows={rows}; resident_q={resident_q}; \
                 double_buffer={}; {}; {}{}",
                block.name(),
                *double_buffer as u8,
                if *subgroups {
                    "subgroups"
                } else {
                    "workgroup reduce"
                },
                match mma {
                    Some(m) => format!(
                        "{} {}x{} q{} v{} sg{}; ",
                        if m.cooperative {
                            "cooperative"
                        } else {
                            "emulated"
                        },
                        m.size,
                        m.size,
                        m.q_dims,
                        m.v_dims,
                        m.subgroup
                    ),
                    None => String::new(),
                },
                masks.label()
            ),
            KernelKey::FlashDecode {
                workgroup,
                rows,
                q_chunks,
                o_chunks,
                subgroups,
                k_group,
                v_group,
                masks,
                ..
            } => format!(
                "wg={workgroup}; rows={rows}; q_chunks={q_chunks}; o_chunks={o_chunks}; {}; \
                 k by {k_group}, v by {v_group}; {}",
                if *subgroups {
                    "subgroups"
                } else {
                    "workgroup reduce"
                },
                masks.label()
            ),
            KernelKey::AttentionBackward {
                phase,
                d4,
                v4,
                masks,
                ..
            } => format!("phase {phase}; d4={d4}; v4={v4}; {}", masks.label()),
            KernelKey::AttentionBackwardDelta { masks, .. } => masks.label(),
            KernelKey::AttentionBackwardTiled {
                dkv,
                block,
                o_vec4s,
                masks,
                ..
            } => format!(
                "{}; block {}; o_vec4s={o_vec4s}; {}",
                if *dkv { "dK dV" } else { "dQ" },
                block.name(),
                masks.label()
            ),
            _ => String::new(),
        };
        format!("{}<{}; {extra}>", self.kernel().name(), tensors.join(","))
    }

    /// Bytes of workgroup memory the key's kernel declares, computed from its tile sizes (a
    /// test checks it against naga's layout of the compiled module).
    pub fn workgroup_bytes(&self) -> u32 {
        match *self {
            KernelKey::QkScores { .. } => TILE_STAGE_BYTES + uniforms::TILE_K * 4,
            KernelKey::PvProduct { .. } | KernelKey::Matmul { .. } => TILE_STAGE_BYTES,
            KernelKey::FlashAttention {
                block,
                subgroups,
                rows,
                resident_q,
                double_buffer,
                mma,
                ..
            } => flash_workgroup_bytes(block, subgroups, rows, resident_q, double_buffer, mma),
            KernelKey::FlashDecode {
                workgroup,
                rows,
                q_chunks,
                o_chunks,
                subgroups,
                ..
            } => decode_workgroup_bytes(workgroup, rows, q_chunks, o_chunks, subgroups),
            // Two reductions of one f32 per invocation and a flag.
            KernelKey::MaskedSoftmax { workgroup, .. } => 2 * workgroup * 4 + 4,
            KernelKey::CombineSplits { .. }
            | KernelKey::Rotate { .. }
            | KernelKey::AttentionBackward { .. }
            | KernelKey::AttentionBackwardDelta { .. } => 0,
            KernelKey::AttentionBackwardTiled { .. } => BACKWARD_TILED_WORKGROUP_BYTES,
        }
    }

    /// The fragments of `shaders/lib/` its source includes, in order.
    pub fn fragments(&self) -> Vec<Fragment> {
        let mut out = self.kernel().fragments().to_vec();
        match *self {
            KernelKey::FlashDecode { subgroups, .. } => out.push(if subgroups {
                Fragment::ReduceSubgroup
            } else {
                Fragment::ReduceWorkgroup
            }),
            KernelKey::FlashAttention { subgroups, mma, .. } => {
                out.extend([
                    Fragment::TileRows,
                    if subgroups {
                        Fragment::TileRowsSubgroup
                    } else {
                        Fragment::TileRowsWorkgroup
                    },
                ]);
                match mma {
                    Some(m) if m.cooperative => {
                        out.extend([Fragment::Mma, Fragment::MmaCooperative])
                    }
                    Some(_) => out.extend([Fragment::Mma, Fragment::MmaEmulated]),
                    None => out.push(Fragment::MmaNone),
                }
            }
            _ => {}
        }
        out
    }

    /// The `const` declarations the key writes into its source: sizes that fix the length of
    /// function-scope arrays, which a pipeline `override` cannot.
    pub fn source_constants(&self) -> Vec<(&'static str, u32)> {
        match *self {
            KernelKey::QkScores { block, .. }
            | KernelKey::PvProduct { block, .. }
            | KernelKey::Matmul { block, .. } => {
                vec![("BR", block.rows), ("BC", block.cols), ("STAGES", 1)]
            }
            KernelKey::FlashAttention {
                block,
                o_vec4s,
                rows,
                resident_q,
                double_buffer,
                mma,
                ..
            } => {
                let mut out = vec![
                    ("BR", block.rows),
                    ("BC", block.cols),
                    ("OC", o_vec4s),
                    ("BKV", flash_bkv(block, o_vec4s)),
                    ("QR", resident_q),
                    ("QR_VEC4S", flash_q_vec4s(rows, resident_q)),
                    ("ROWS4", rows / 4),
                    ("INV", block.invocations(rows)),
                    (
                        "STAGES",
                        match (mma, double_buffer) {
                            (Some(_), _) => 0,
                            (None, true) => 2,
                            (None, false) => 1,
                        },
                    ),
                    ("MMA", mma.is_some() as u32),
                    ("P_KEYS", if mma.is_some() { 1 } else { TILE }),
                ];
                if let Some(m) = mma {
                    out.extend(m.constants());
                }
                out
            }
            KernelKey::FlashDecode {
                workgroup,
                rows,
                q_chunks,
                o_chunks,
                ..
            } => {
                let [q4, v_lanes, cpl, sh4] = decode_sizes(workgroup, rows, q_chunks, o_chunks);
                vec![
                    ("WG", workgroup),
                    ("ROWS", rows),
                    ("Q4", q4),
                    ("V_LANES", v_lanes),
                    ("CPL", cpl),
                    ("SH4", sh4),
                ]
            }
            KernelKey::AttentionBackward { d4, v4, .. } => vec![("D4", d4), ("V4", v4)],
            KernelKey::AttentionBackwardTiled {
                dkv,
                block,
                o_vec4s,
                ..
            } => vec![
                ("BR", block.rows),
                ("BC", block.cols),
                ("PHASE", if dkv { 2 } else { 1 }),
                ("NQ", if dkv { block.cols } else { block.rows }),
                ("OC", o_vec4s),
                ("BKV", flash_bkv(block, o_vec4s)),
                ("STAGES", 1),
            ],
            KernelKey::Rotate { .. } => vec![
                ("ROTARY_LEVEL_BITS", crate::rotary::LEVEL_BITS),
                ("ROTARY_LEVELS", crate::rotary::LEVELS),
                ("ROTARY_ENTRIES", crate::rotary::ENTRIES),
                (
                    "ROTARY_MAX_POSITION",
                    (crate::rotary::MAX_POSITIONS - 1) as u32,
                ),
            ],
            _ => Vec::new(),
        }
    }

    /// The read-only tensors the key reads in groups of elements, and the group (see
    /// `compose::prelude_grouped`).
    pub fn grouped_tensors(&self) -> Vec<(&'static str, u32)> {
        match *self {
            KernelKey::FlashDecode {
                k_group, v_group, ..
            } => vec![("k", k_group), ("v", v_group)],
            _ => Vec::new(),
        }
    }

    /// Whether the key's kernel uses subgroup operations (the device needs `SUBGROUP`).
    pub fn needs_subgroups(&self) -> bool {
        matches!(
            self,
            KernelKey::FlashDecode {
                subgroups: true,
                ..
            } | KernelKey::FlashAttention {
                subgroups: true,
                ..
            }
        )
    }

    /// Whether a tensor of this key is stored as native f16 (the device needs `SHADER_F16`).
    pub fn needs_f16(&self) -> bool {
        self.storages().contains(&Storage::F16)
    }

    /// The WGSL `enable` directives the key's source starts with: `f16` for native f16
    /// storage. A cooperative-matrix kernel adds `wgpu_cooperative_matrix` here (and its
    /// device feature); subgroup builtins need none (naga 30 rejects `enable subgroups;`).
    pub fn enables(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.needs_f16() {
            out.push("f16");
        }
        if self.needs_cooperative_matrix() {
            out.push("wgpu_cooperative_matrix");
        }
        out
    }

    /// Whether the key's kernel uses cooperative matrices (the device needs
    /// `Features::EXPERIMENTAL_COOPERATIVE_MATRIX`).
    pub fn needs_cooperative_matrix(&self) -> bool {
        matches!(
            self,
            KernelKey::FlashAttention {
                mma: Some(Mma {
                    cooperative: true,
                    ..
                }),
                ..
            }
        )
    }

    /// The type aliases its source declares after the constants: the cooperative matrix types
    /// of its products, sized by the key.
    pub fn aliases(&self) -> Vec<(&'static str, String)> {
        match *self {
            KernelKey::FlashAttention {
                mma:
                    Some(
                        m @ Mma {
                            cooperative: true, ..
                        },
                    ),
                ..
            } => {
                let n = m.size;
                vec![
                    ("MmaA", format!("coop_mat{n}x{n}<f16, A>")),
                    ("MmaB", format!("coop_mat{n}x{n}<f16, B>")),
                    ("MmaC", format!("coop_mat{n}x{n}<f32, C>")),
                ]
            }
            _ => Vec::new(),
        }
    }

    /// The `override` constants this specialisation sets.
    pub fn constants(&self) -> Vec<(&'static str, f64)> {
        let mut out = Vec::new();
        match *self {
            KernelKey::MaskedSoftmax { workgroup, masks } => {
                out.push(("WG", workgroup as f64));
                masks.constants(&mut out);
                // It reads scores, not Q, K, V or O: pages and packing mean nothing to it.
                out.retain(|&(name, _)| !matches!(name, "HAS_PAGES" | "PAGE_SIZE" | "HAS_VARLEN"));
            }
            KernelKey::FlashAttention { rows, masks, .. } => {
                out.push(("TILE_M", rows as f64));
                masks.constants(&mut out);
            }
            KernelKey::FlashDecode { masks, .. } => masks.constants(&mut out),
            KernelKey::AttentionBackward { phase, masks, .. } => {
                out.push(("PHASE", phase as f64));
                masks.constants(&mut out);
            }
            KernelKey::AttentionBackwardTiled { masks, .. }
            | KernelKey::AttentionBackwardDelta { masks, .. } => masks.constants(&mut out),
            KernelKey::QkScores { additive, .. } => out.push(("ADDITIVE", additive as u8 as f64)),
            KernelKey::PvProduct { .. }
            | KernelKey::CombineSplits { .. }
            | KernelKey::Rotate { .. }
            | KernelKey::Matmul { .. } => {}
        }
        out
    }

    /// The complete WGSL the crate compiles for this key (see the module docs for the order),
    /// its parameter blocks bound as uniforms, with the identity score mods (a call's own
    /// mods, `MaskOptions::mods` other than 0, come from the device's list of sources).
    pub fn source(&self) -> String {
        self.source_with(ParamsIn::Uniform)
    }

    /// [`source`](KernelKey::source) with the parameter blocks bound as `params` says.
    pub fn source_with(&self, params: ParamsIn) -> String {
        compose::source(self, params, &crate::ScoreMod::default().wgsl())
    }

    /// The masking options compiled in, for the kernels that mask.
    pub(crate) fn masks(&self) -> Option<MaskOptions> {
        match *self {
            KernelKey::MaskedSoftmax { masks, .. }
            | KernelKey::FlashAttention { masks, .. }
            | KernelKey::FlashDecode { masks, .. }
            | KernelKey::AttentionBackwardDelta { masks, .. }
            | KernelKey::AttentionBackward { masks, .. }
            | KernelKey::AttentionBackwardTiled { masks, .. } => Some(masks),
            _ => None,
        }
    }
}
