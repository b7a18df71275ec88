//! The fused path: flash attention in one kernel, O(N) memory.
//!
//! One workgroup per 64 rows (4 to 32 on the decode path for small GQA groups) of a (batch,
//! kv head) -- the (query head, query row) pairs of its GQA group -- streams the keys its rows
//! may see in tiles of 64 through workgroup memory,
//! keeping a running row maximum and sum (online softmax) and the output in registers.
//! Nothing of size `q_len * kv_len` exists anywhere: at most a few floats per query row (see
//! below), which is what lets it run 65536 x 65536 problems or one query over 262144 keys. Key tiles that causal, window, `kv_lens` or `q_lens` masks
//! remove for every row of a workgroup are not visited, so causal attention costs half.
//!
//! The rows of a workgroup are the (query head, query row) pairs that share one kv head, so
//! under grouped-query attention every K/V tile is read once for the whole group; for decoding
//! (a few query rows) the whole group fits one workgroup.
//!
//! On the decode path, a kv head's rows up to 16 run `flash_decode.wgsl` instead
//! ([`FusedPlan::keys_across_invocations`]): 16, 32 or 64 invocations per workgroup
//! ([`DecodeKernel`], from the adapter's entry of [`TABLE`](crate::gpu::tuning::TABLE)) share
//! each 64-key tile, each scoring its keys against every row, so a GQA group of 4 x 1 query
//! does not occupy a 64-row tile product. Same bindings, same partials, same merge.
//!
//! On the decode path, when the grid is small, the keys are split across workgroups
//! (flash-decoding): each split writes its normalised partial output and log-sum-exp to a
//! scratch of `splits * batch * heads * q_len * (v_head_dim + 1)` floats, linear in the
//! sequence length, and `combine_splits.wgsl` merges them in the same submit. The splits aim
//! for [`TileConfig::decode_target_workgroups`](crate::gpu::tuning::TileConfig::decode_target_workgroups) workgroups, with at least 2 key tiles each.
//!
//! Where the device caps the keys one workgroup may stream in one dispatch
//! ([`GpuLimits::max_key_tiles_per_workgroup`]: llvmpipe's loop limit), the fused path runs the
//! key range in several dispatches of one submit, each merging its result into the O and
//! log-sum-exp the previous one wrote: still no buffer beyond `batch * heads * q_len` floats
//! (plus an f32 copy of O when O is half precision, so it is rounded once, not per pass).
//!
//! The row-tiled kernel is specialised on its invocation block ([`TileBlock`]: 4 x 4, 8 x 4
//! or 8 x 8 scores per invocation, [`TileConfig::fused_block`](crate::gpu::tuning::TileConfig::fused_block) from the adapter's table entry; a
//! smaller one where the tile has fewer rows or an invocation would hold more than 128 output
//! accumulators), on the vec4 columns of O each invocation owns (which also fix how many keys
//! of V are staged at once), and on the per-key options (mask, bias, softcap:
//! [`MaskOptions`]). A key tile inside every row's key range, on a call without per-key
//! options, is only floored: no range test, no mask lookup.
//!
//! Two more choices of the row-tiled kernel. Its rows' maxima and sums are reduced by subgroup
//! shuffles where the configuration allows subgroups ([`TileConfig::subgroups`](crate::gpu::tuning::TileConfig::subgroups)): the
//! invocations then take their places from the subgroup builtins, and the kernel itself falls
//! back to workgroup memory where its subgroups turn out narrower than a row's invocations or
//! not full. And where workgroup memory holds the workgroup's rows of Q beside the rest
//! ([`FusedPlan::resident_q`]), Q is staged once before the key loop and each key tile stages
//! only K, two 16-dim slices per pair of barriers.
//!
//! The uniforms of each dispatch come from pure functions of the [`Spec`] and the plan
//! (`flash_params`, `split_merge_params`, `convert_params`), unit-tested below without a device.

use super::{Io, masking, strides};
use crate::error::{Error, Result};
use crate::gpu::context::Gpu;
use crate::gpu::dispatch::combine::{self, Combine};
use crate::gpu::kernels::uniforms::{CombineParams, FlashParams, TILE, TILE_K, uniform_buffer};
use crate::gpu::kernels::{
    DECODE_ROWS, DECODE_WORKGROUPS, FLASH_ROWS, KernelKey, Mma, Storage, decode_workgroup_bytes,
    flash_o_vec4s, flash_workgroup_bytes,
};
use crate::gpu::limits::{
    DecodeKernel, DispatchSize, GpuLimits, MmaChoice, TileBlock, check_binding,
};
use crate::spec::Spec;

/// Rows (query head, query row pairs) per workgroup: one tile of the tile product.
const BM: usize = TILE as usize;
/// Keys per tile.
const BN: usize = TILE as usize;
/// The fewest key tiles a split gets when splitting only for parallelism.
const MIN_TILES_PER_SPLIT: u64 = 2;

/// How the fused path will run a problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FusedPlan {
    /// Workgroups of the fused kernel: batch * kv_heads * row tiles * splits.
    pub workgroups: u64,
    /// `ceil(v_head_dim / 64)`: the output chunks of 64 columns the decode-shaped kernel is
    /// specialised on (the row-tiled kernel's columns per invocation follow from its block).
    pub o_chunks: u32,
    /// Key splits merged by log-sum-exp (1: no split, no scratch).
    pub splits: u32,
    /// Dispatches over consecutive key ranges, each merged into the last (1 unless the device
    /// caps the keys per workgroup).
    pub passes: u32,
    /// Key tiles of 64 per split or per pass.
    pub tiles_per_split: u32,
    /// Rows per workgroup: 64, or on the decode path the fewest of 4, 8, 16 and 32, at least
    /// [`TileConfig::min_decode_rows`](crate::gpu::tuning::TileConfig::min_decode_rows), that hold the `group * q_len` rows of a kv head (fewer
    /// idle invocations per key tile).
    pub rows_per_workgroup: u32,
    /// Whether the decode-shaped kernel runs (`flash_decode.wgsl`, keys across invocations;
    /// [`DecodeKernel::KeysAcrossInvocations`]); `rows_per_workgroup` is then one of
    /// [`DECODE_ROWS`] (1 to 16).
    pub keys_across_invocations: bool,
    /// The register block of the row-tiled kernel's invocations:
    /// [`TileConfig::fused_block`](crate::gpu::tuning::TileConfig::fused_block), or a smaller
    /// one where the workgroup has fewer rows than the block or an invocation would hold
    /// more than 128 output accumulators (`v_head_dim` past 128 with 8 x 8 blocks); unused by
    /// the decode-shaped kernel.
    pub block: TileBlock,
    /// Slices of 16 dims of Q the row-tiled kernel keeps in workgroup memory for the whole
    /// key loop (`ceil(head_dim / 16)`), or 0 where the configuration says not to
    /// ([`TileConfig::resident_q`](crate::gpu::tuning::TileConfig::resident_q)) or the device's
    /// workgroup memory does not hold them beside the rest: Q is then staged with every key
    /// tile.
    pub resident_q: u32,
    /// Whether the row-tiled kernel double-buffers its staging
    /// ([`TileConfig::double_buffer`](crate::gpu::tuning::TileConfig::double_buffer)): where
    /// the configuration says so, the workgroup has at least 64 invocations (each stages at
    /// most 8 vec4s per step in registers) and workgroup memory holds the second buffer
    /// beside resident Q.
    pub double_buffer: bool,
    /// S and P V as products of 16-bit operands (`shaders/lib/mma.wgsl`): where Q, K and V
    /// are native f16, the configuration asks for them
    /// ([`TileConfig::mma`](crate::gpu::tuning::TileConfig::mma)), head_dim and v_head_dim
    /// are at most 256 and workgroup memory holds them at the rows of the scalar plan or at
    /// half or a quarter of them (at least 16); for cooperative matrices the device must have
    /// them, a single subgroup size, subgroups turned on, and subgroups that divide the
    /// workgroup's result tiles.
    /// `rows_per_workgroup` and `block` are then the products' (no resident Q, one buffer).
    pub mma: Option<Mma>,
    /// Invocations per workgroup: `(64 / block.cols) * (rows_per_workgroup / block.rows)` for
    /// the row-tiled kernel, the configured 16, 32 or 64 for the decode-shaped one.
    pub invocations: u32,
    /// Row tiles per (batch, kv head): `ceil(group * q_len / rows_per_workgroup)`.
    pub row_tiles: u32,
    /// Bytes of device memory the plan allocates besides the inputs and outputs, at most: the
    /// partial results of the splits, or the log-sum-exp that passes merge by when the caller
    /// did not ask for it; linear in `q_len`, and 0 with one split and one pass.
    pub scratch_bytes: u64,
}

/// Storage buffers the fused kernel binds per stage.
const FLASH_STORAGE_BUFFERS: u32 = 8;

/// A device limit the fused kernel needs more of: what it is, what it needs, what the device has.
pub(crate) struct Shortfall {
    pub(crate) what: &'static str,
    needed: u32,
    available: u32,
}

impl From<Shortfall> for Error {
    fn from(s: Shortfall) -> Error {
        Error::Unsupported {
            what: s.what,
            needed: s.needed as u64,
            available: s.available as u64,
        }
    }
}

/// The rows and invocations the decode-shaped kernel would run `spec` with on a device with
/// `limits`: a kv head's `group * q_len` rows rounded up to one of [`DECODE_ROWS`], if they are
/// at most 16 and the adapter's configuration picks that kernel; its configured workgroup, or
/// the next smaller one of [`DECODE_WORKGROUPS`] whose workgroup memory fits (WebGPU's 16 KiB
/// holds 16 rows at 16 invocations, not at 64). `None` for a workgroup no kernel is compiled
/// for (a hand-written [`GpuLimits`]).
pub(crate) fn keys_kernel(spec: &Spec<'_>, limits: &GpuLimits) -> Option<(u32, u32)> {
    let d = spec.dims;
    let packed = d.group() * d.q_len;
    let rows = DECODE_ROWS.into_iter().find(|&r| r as usize >= packed)?;
    let DecodeKernel::KeysAcrossInvocations { workgroup } = limits.tile.decode_kernel else {
        return None;
    };
    if !DECODE_WORKGROUPS.contains(&workgroup)
        || limits.max_storage_buffers_per_stage < FLASH_STORAGE_BUFFERS
    {
        return None;
    }
    let q_chunks = d.head_dim.div_ceil(64) as u32;
    let o_chunks = d.v_head_dim.div_ceil(64) as u32;
    DECODE_WORKGROUPS
        .into_iter()
        .rev()
        .filter(|&wg| wg <= workgroup && wg <= limits.max_invocations_per_workgroup)
        .find(|&wg| {
            decode_workgroup_bytes(wg, rows, q_chunks, o_chunks, limits.tile.subgroups)
                <= limits.max_workgroup_storage
        })
        .map(|wg| (rows, wg))
}

/// The most elements, up to `most` (4 or 8), the decode kernel may read per load of a tensor
/// whose rows are `dim` long: the largest group dividing `dim`, else 1.
fn element_group(dim: usize, most: u32) -> u32 {
    [8, 4]
        .into_iter()
        .find(|&g| g <= most && dim.is_multiple_of(g as usize))
        .unwrap_or(1)
}

/// The limit the row-tiled fused kernel with invocation block `block` on `rows` rows (Q
/// staged per tile) lacks on a device, if any.
fn unsupported_block(limits: &GpuLimits, block: TileBlock, rows: u32) -> Option<Shortfall> {
    let bytes = flash_workgroup_bytes(block, limits.tile.subgroups, rows, 0, false, None);
    if limits.max_workgroup_storage < bytes {
        Some(Shortfall {
            what: "the fused kernel needs more workgroup memory (bytes)",
            needed: bytes,
            available: limits.max_workgroup_storage,
        })
    } else if limits.max_storage_buffers_per_stage < FLASH_STORAGE_BUFFERS {
        Some(Shortfall {
            what: "the fused kernel needs more storage buffers per stage",
            needed: FLASH_STORAGE_BUFFERS,
            available: limits.max_storage_buffers_per_stage,
        })
    } else {
        None
    }
}

/// The limit the row-tiled fused kernel lacks on a device for `spec`, with the block its plan
/// would take (on the decode path with `decode`), if any.
pub(crate) fn unsupported(spec: &Spec<'_>, limits: &GpuLimits, decode: bool) -> Option<Shortfall> {
    let rows = row_tile_rows(spec, limits, decode);
    unsupported_block(limits, block_for(limits, rows, spec.dims.v_head_dim), rows)
}

/// Slices of Q the row-tiled kernel keeps resident for `head_dim` on a device with `limits`,
/// with `rows` rows per workgroup and invocation block `block` (see
/// [`FusedPlan::resident_q`]).
fn resident_q_for(limits: &GpuLimits, block: TileBlock, rows: u32, head_dim: usize) -> u32 {
    let slices = head_dim.div_ceil(TILE_K as usize) as u32;
    let bytes = flash_workgroup_bytes(block, limits.tile.subgroups, rows, slices, false, None);
    if limits.tile.resident_q && bytes <= limits.max_workgroup_storage {
        slices
    } else {
        0
    }
}

/// The fewest invocations of a double-buffered workgroup: a step's slice of K, pair of slices
/// or slice of V is at most 512 vec4s, so each invocation holds at most 8 of them (32 f32) in
/// registers beside its block and accumulators.
const MIN_DOUBLE_BUFFER_INVOCATIONS: u32 = 64;

/// Whether the row-tiled kernel double-buffers, with `resident_q` slices of resident Q (see
/// [`FusedPlan::double_buffer`]).
fn double_buffer_for(limits: &GpuLimits, block: TileBlock, rows: u32, resident_q: u32) -> bool {
    let bytes = flash_workgroup_bytes(block, limits.tile.subgroups, rows, resident_q, true, None);
    limits.tile.double_buffer
        && block.invocations(rows) >= MIN_DOUBLE_BUFFER_INVOCATIONS
        && bytes <= limits.max_workgroup_storage
}

/// Rows per workgroup of the row-tiled kernel: 64, or on the decode path the fewest of
/// [`FLASH_ROWS`], at least `min_decode_rows`, that hold a kv head's rows.
fn row_tile_rows(spec: &Spec<'_>, limits: &GpuLimits, decode: bool) -> u32 {
    let packed = spec.dims.group() * spec.dims.q_len;
    if decode {
        FLASH_ROWS
            .into_iter()
            .find(|&r| r >= limits.tile.min_decode_rows && r as usize >= packed)
            .unwrap_or(BM as u32)
    } else {
        BM as u32
    }
}

/// Output accumulators (f32) one invocation of the fused kernel may hold: past it, the
/// configured block falls back to a smaller one. On lavapipe an 8 x 8 block over
/// `v_head_dim` 256 (256 accumulators) ran 1.9x the instructions of 8 x 4 (128), over 160
/// (160) 1.1x, while 8 x 8 over 72 (96) ran 29% fewer (NOTES.md); on a GPU 128 is about what
/// registers hold beside the scores.
const MOST_ACCUMULATORS: u32 = 128;

/// The fewest invocations of a row-tiled workgroup on a device that caps loop iterations
/// (llvmpipe): with fewer, each stages so many items per key tile (an 8 x 8 block on 8 rows:
/// 8 invocations, 32 K items and 64 V items each per slice) that a dispatch's 32 key tiles
/// came within 1.6x of the 65535-iteration limit (an independent review measured D=256
/// failing at 56 tiles); at 16 or more the margin is at least 2x.
const MIN_CAPPED_INVOCATIONS: u32 = 16;

/// The register block for `rows` rows per workgroup and `v_head_dim`: the configured one, or
/// the largest smaller one (of [`TileBlock::ALL`]) whose rows fit the tile, whose
/// accumulators fit [`MOST_ACCUMULATORS`], whose invocations the device allows and, on a
/// loop-capped device, number at least [`MIN_CAPPED_INVOCATIONS`]; 4 x 4 at the least.
fn block_for(limits: &GpuLimits, rows: u32, v_head_dim: usize) -> TileBlock {
    let configured = limits.tile.fused_block;
    TileBlock::ALL
        .into_iter()
        .rev()
        .skip_while(|&b| b != configured)
        .find(|&b| {
            rows >= b.rows
                && b.rows * 4 * flash_o_vec4s(v_head_dim, b) <= MOST_ACCUMULATORS
                && b.invocations(rows) <= limits.max_invocations_per_workgroup
                && (limits.max_key_tiles_per_workgroup == u32::MAX
                    || b.invocations(rows) >= MIN_CAPPED_INVOCATIONS)
        })
        .unwrap_or(TileBlock::B4X4)
}

/// The key tiles one workgroup of the 16-bit products streams per dispatch on a device that
/// caps loop iterations (llvmpipe): their staging and product loops run about 2000 to 4000
/// iterations per tile there (the emulation's inner loops are not all unrolled), against the
/// 65535 an invocation may run in all.
const MMA_CAPPED_TILES: u32 = 8;

/// The 16-bit products for `spec` on a device with `limits`, from `rows` rows per workgroup
/// down (see [`FusedPlan::mma`]): the products, their rows and their block.
fn mma_for(spec: &Spec<'_>, limits: &GpuLimits, rows: u32) -> Option<(Mma, u32, TileBlock)> {
    let d = spec.dims;
    let cooperative = match limits.tile.mma {
        MmaChoice::Off => return None,
        MmaChoice::Emulated => false,
        MmaChoice::Cooperative => true,
    };
    if d.head_dim > 256 || d.v_head_dim > 256 {
        return None;
    }
    let (size, subgroup) = if cooperative {
        // place_sg comes from the subgroup variant of the row reductions.
        if limits.cooperative_matrix == 0 || limits.subgroup_size == 0 || !limits.tile.subgroups {
            return None;
        }
        (limits.cooperative_matrix, limits.subgroup_size)
    } else {
        (16, 0)
    };
    let mma = Mma::new(cooperative, size, d.head_dim, d.v_head_dim, subgroup);
    [rows, rows / 2, rows / 4]
        .into_iter()
        .filter(|&r| r >= 16 && r >= size && r.is_multiple_of(size))
        .find_map(|r| {
            let block = block_for(limits, r, d.v_head_dim);
            let invocations = block.invocations(r);
            let bytes = flash_workgroup_bytes(block, limits.tile.subgroups, r, 0, false, Some(mma));
            let fits = bytes <= limits.max_workgroup_storage
                && invocations <= limits.max_invocations_per_workgroup
                && limits.max_storage_buffers_per_stage >= FLASH_STORAGE_BUFFERS;
            let shared_out = !cooperative
                || (invocations.is_multiple_of(subgroup)
                    && mma
                        .tiles(r)
                        .iter()
                        .all(|t| t.is_multiple_of(invocations / subgroup)));
            (fits && shared_out).then_some((mma, r, block))
        })
}

impl FusedPlan {
    /// Plans `spec` for a device with `limits`; `decode` also splits the keys to give a small
    /// grid enough workgroups; `half` says that Q, K and V are native f16, which the 16-bit
    /// products need ([`FusedPlan::mma`]).
    pub fn new(spec: &Spec<'_>, limits: &GpuLimits, decode: bool, half: bool) -> Result<FusedPlan> {
        let decode_kernel = if decode {
            keys_kernel(spec, limits)
        } else {
            None
        };
        let keys_kernel = decode_kernel.is_some();
        let decode_rows = decode_kernel.map(|(rows, _)| rows);
        let d = spec.dims;
        let packed = d.group() * d.q_len;
        let o_chunks = d.v_head_dim.div_ceil(64) as u32;
        let rows_per_workgroup = match decode_rows {
            Some(rows) => rows,
            None => row_tile_rows(spec, limits, decode),
        };
        let block = block_for(limits, rows_per_workgroup, d.v_head_dim);
        if !keys_kernel && let Some(short) = unsupported_block(limits, block, rows_per_workgroup) {
            return Err(short.into());
        }
        let resident_q = if keys_kernel {
            0
        } else {
            resident_q_for(limits, block, rows_per_workgroup, d.head_dim)
        };
        let double_buffer =
            !keys_kernel && double_buffer_for(limits, block, rows_per_workgroup, resident_q);
        let mma = if half && !keys_kernel {
            mma_for(spec, limits, rows_per_workgroup)
        } else {
            None
        };
        let (rows_per_workgroup, block, resident_q, double_buffer) = match mma {
            Some((_, rows, block)) => (rows, block, 0, false),
            None => (rows_per_workgroup, block, resident_q, double_buffer),
        };
        let mma = mma.map(|(m, ..)| m);
        let row_tiles = packed.div_ceil(rows_per_workgroup as usize) as u64;
        let key_tiles = d.kv_len.div_ceil(BN) as u64;
        let grid = (d.batch * d.kv_heads) as u64 * row_tiles;
        let mut cap = limits.max_key_tiles_per_workgroup.max(1);
        if mma.is_some() && cap != u32::MAX {
            cap = cap.min(MMA_CAPPED_TILES);
        }
        let cap = cap as u64;
        let rows = d.lse_elems() as u64;
        let (splits, passes) = if decode {
            let mut splits = key_tiles.div_ceil(cap);
            let target = limits.tile.decode_target_workgroups.max(1) as u64;
            if grid < target {
                let wanted = target.div_ceil(grid);
                let most = (key_tiles / MIN_TILES_PER_SPLIT).max(1);
                splits = splits.max(wanted.min(most));
            }
            (splits, 1)
        } else {
            (1, key_tiles.div_ceil(cap))
        };
        let tiles_per_split = key_tiles.div_ceil(splits * passes);
        let splits = if splits > 1 {
            key_tiles.div_ceil(tiles_per_split)
        } else {
            1
        };
        let passes = if passes > 1 {
            key_tiles.div_ceil(tiles_per_split)
        } else {
            1
        };
        let workgroups = grid * splits;
        // Fails here, not at dispatch, if even spilling into y and z cannot hold the grid.
        DispatchSize::linear(
            workgroups,
            limits.max_workgroups_per_dim,
            "flash_attention dispatch",
        )?;
        let scratch_bytes = if splits > 1 {
            let bytes = splits * rows * (d.v_head_dim as u64 + 1) * 4;
            check_binding(limits, "partial results of the key splits", bytes)?;
            DispatchSize::linear(
                rows,
                limits.max_workgroups_per_dim,
                "combine_splits dispatch",
            )?;
            bytes
        } else if passes > 1 {
            rows * 4
        } else {
            0
        };
        Ok(FusedPlan {
            workgroups,
            o_chunks,
            rows_per_workgroup,
            keys_across_invocations: keys_kernel,
            block,
            resident_q,
            double_buffer,
            mma,
            invocations: match decode_kernel {
                Some((_, workgroup)) => workgroup,
                None => block.invocations(rows_per_workgroup),
            },
            splits: splits as u32,
            passes: passes as u32,
            tiles_per_split: tiles_per_split as u32,
            row_tiles: row_tiles as u32,
            scratch_bytes,
        })
    }
}

/// Strides of Q or O (`queries`) or of K or V, `heads` heads of rows of `width`: a packed
/// batch's tensors hold every sequence's rows in one "batch" (the kernels add each
/// sequence's first row, `q_slot` and `key_slot`), paged pools `[pages, page_size, kv_heads,
/// width]` rows (pool slots) of `kv_heads * width`; neither has a batch stride.
pub(crate) fn io_strides(spec: &Spec<'_>, queries: bool, heads: usize, width: usize) -> [u32; 3] {
    let d = spec.dims;
    if let Some((cq, ck)) = &spec.opts.varlen {
        let total = *if queries { cq } else { ck }.last().unwrap_or(&0) as usize;
        let [_, h, s] = strides(spec, heads, total, width);
        return [0, h, s];
    }
    match spec.opts.pages {
        Some(_) if !queries => [0, width as u32, (heads * width) as u32],
        _ => strides(spec, heads, if queries { d.q_len } else { d.kv_len }, width),
    }
}

/// The uniforms of dispatch `pass` of `plan` (pure: tested without a device).
fn flash_params(spec: &Spec<'_>, plan: &FusedPlan, pass: u32, write_lse: bool) -> FlashParams {
    let d = spec.dims;
    let [q_stride_b, q_stride_h, q_stride_s] = io_strides(spec, true, d.heads, d.head_dim);
    let [k_stride_b, k_stride_h, k_stride_s] = io_strides(spec, false, d.kv_heads, d.head_dim);
    let [v_stride_b, v_stride_h, v_stride_s] = io_strides(spec, false, d.kv_heads, d.v_head_dim);
    let [o_stride_b, o_stride_h, o_stride_s] = io_strides(spec, true, d.heads, d.v_head_dim);
    FlashParams {
        heads: d.heads as u32,
        kv_heads: d.kv_heads as u32,
        group: d.group() as u32,
        packed_rows: (d.group() * d.q_len) as u32,
        tiles_m: plan.row_tiles,
        splits: plan.splits,
        tiles_per_split: plan.tiles_per_split,
        groups_total: plan.workgroups as u32,
        head_dim: d.head_dim as u32,
        v_head_dim: d.v_head_dim as u32,
        write_lse: write_lse as u32,
        scale: spec.scale,
        parts_lse_offset: parts_lse_offset(spec, plan) as u32,
        first_tile: pass * plan.tiles_per_split,
        resume: (pass > 0) as u32,
        q_stride_b,
        q_stride_h,
        q_stride_s,
        k_stride_b,
        k_stride_h,
        k_stride_s,
        v_stride_b,
        v_stride_h,
        v_stride_s,
        o_stride_b,
        o_stride_h,
        o_stride_s,
    }
}

/// Where the partial log-sum-exps start in the split scratch, in elements: after the partial
/// outputs `[split, batch, heads, q_len, v_head_dim]`.
fn parts_lse_offset(spec: &Spec<'_>, plan: &FusedPlan) -> u64 {
    plan.splits as u64 * spec.dims.lse_elems() as u64 * spec.dims.v_head_dim as u64
}

/// The merge of the splits' partials (`[split, batch, heads, q_len, v_head_dim]`, then their
/// log-sum-exps `[split, batch, heads, q_len]`) into O and, with `write_lse`, the log-sum-exp.
/// `sink_offset` and `varlen_offset`: where the call's sink logits and a packed batch's offsets
/// are in the masking buffer `lens`, if it has them.
fn split_merge_params(
    spec: &Spec<'_>,
    plan: &FusedPlan,
    write_lse: bool,
    (sink_offset, varlen_offset): (Option<u32>, Option<u32>),
) -> CombineParams {
    let d = spec.dims;
    let rows = d.lse_elems() as u32;
    let row = d.v_head_dim as u32;
    let heads_rows = (d.heads * d.q_len) as u32;
    let [o_stride_b, o_stride_h, o_stride_s] = io_strides(spec, true, d.heads, d.v_head_dim);
    CombineParams {
        splits: plan.splits,
        has_sinks: sink_offset.is_some() as u32,
        sink_offset: sink_offset.unwrap_or(0),
        has_varlen: varlen_offset.is_some() as u32,
        varlen_offset: varlen_offset.unwrap_or(0),
        parts_packed: 0,
        rows,
        heads: d.heads as u32,
        q_len: d.q_len as u32,
        v_head_dim: row,
        write_lse: write_lse as u32,
        lse_offset: parts_lse_offset(spec, plan) as u32,
        part_stride_s: rows * row,
        part_stride_b: heads_rows * row,
        part_stride_h: d.q_len as u32 * row,
        part_stride_i: row,
        part_lse_stride_s: rows,
        part_lse_stride_b: heads_rows,
        part_lse_stride_h: d.q_len as u32,
        part_lse_stride_i: 1,
        o_stride_b,
        o_stride_h,
        o_stride_s,
    }
}

/// One "split": the combine kernel copies the passes' f32 O (in O's layout) into O's dtype,
/// zeros where the log-sum-exp says the row had no key.
/// A packed batch's f32 copy is packed like O (`varlen_offset` as in `split_merge_params`).
fn convert_params(spec: &Spec<'_>, varlen_offset: Option<u32>) -> CombineParams {
    let d = spec.dims;
    let [o_stride_b, o_stride_h, o_stride_s] = io_strides(spec, true, d.heads, d.v_head_dim);
    CombineParams {
        splits: 1,
        // The passes counted the sinks.
        has_sinks: 0,
        sink_offset: 0,
        has_varlen: varlen_offset.is_some() as u32,
        varlen_offset: varlen_offset.unwrap_or(0),
        parts_packed: 1,
        rows: d.lse_elems() as u32,
        heads: d.heads as u32,
        q_len: d.q_len as u32,
        v_head_dim: d.v_head_dim as u32,
        write_lse: 0,
        lse_offset: 0,
        part_stride_s: 0,
        part_stride_b: o_stride_b,
        part_stride_h: o_stride_h,
        part_stride_i: o_stride_s,
        part_lse_stride_s: 0,
        part_lse_stride_b: (d.heads * d.q_len) as u32,
        part_lse_stride_h: d.q_len as u32,
        part_lse_stride_i: 1,
        o_stride_b,
        o_stride_h,
        o_stride_s,
    }
}

/// Encodes the fused kernel (and the combine of its splits) into `encoder`.
pub(crate) fn encode(
    gpu: &Gpu,
    spec: &Spec<'_>,
    plan: &FusedPlan,
    io: &Io<'_>,
    encoder: &mut wgpu::CommandEncoder,
) -> Result<()> {
    let rows = spec.dims.lse_elems() as u64;
    io.check_bindings(&gpu.limits)?;
    let masks = masking::upload(gpu, spec, encoder)?;
    // Passes merge into the O the previous pass wrote. A half-precision O would be rounded
    // once per pass (bf16 drifted to 7e-3 relative over 32 passes), so the passes run on an
    // f32 copy and one last dispatch converts it.
    let o_running = (plan.passes > 1 && io.o.dtype() != crate::DType::F32)
        .then(|| gpu.empty(io.o.dims()))
        .transpose()?;
    let [q, k, v, mut o] = io.storage(gpu);
    if o_running.is_some() {
        o = Storage::F32;
    }
    let masks_on = gpu.kernels.mask_options(&gpu.device, spec, false)?;
    let key = if plan.keys_across_invocations {
        // The decode kernel never resumes an earlier dispatch.
        debug_assert_eq!(plan.passes, 1);
        KernelKey::FlashDecode {
            q,
            k,
            v,
            o,
            workgroup: plan.invocations,
            rows: plan.rows_per_workgroup,
            q_chunks: spec.dims.head_dim.div_ceil(64) as u32,
            o_chunks: plan.o_chunks,
            subgroups: gpu.limits.tile.subgroups,
            // Every K (V) index the kernel reads in groups is then a multiple of the group, and
            // every K and V buffer a multiple of the group long.
            k_group: element_group(spec.dims.head_dim, 8),
            v_group: element_group(spec.dims.v_head_dim, 4),
            masks: masks_on,
        }
    } else {
        KernelKey::FlashAttention {
            q,
            k,
            v,
            o,
            block: plan.block,
            o_vec4s: flash_o_vec4s(spec.dims.v_head_dim, plan.block),
            rows: plan.rows_per_workgroup,
            resident_q: plan.resident_q,
            double_buffer: plan.double_buffer,
            subgroups: gpu.limits.tile.subgroups,
            mma: plan.mma,
            masks: masks_on,
        }
    };
    let kernel = gpu.kernels.get(&gpu.device, key)?;
    // Passes merge by log-sum-exp, so they need one even when the caller did not ask for it.
    let lse_scratch = (plan.passes > 1 && io.lse.is_none()).then(|| {
        gpu.scratch(
            "wgpu-attention pass log-sum-exp",
            rows * 4,
            wgpu::BufferUsages::empty(),
        )
    });
    let lse_out = io.lse.map(|t| t.buffer()).or(lse_scratch.as_ref());
    let parts = (plan.splits > 1).then(|| {
        gpu.scratch(
            "wgpu-attention split partials",
            plan.scratch_bytes,
            wgpu::BufferUsages::empty(),
        )
    });
    let size = DispatchSize::linear(
        plan.workgroups,
        gpu.limits.max_workgroups_per_dim,
        "flash_attention dispatch",
    )?;

    let placeholder_out = &gpu.kernels.placeholder_out;
    // With splits the kernel writes the partials, not O, whose binding is then a placeholder.
    let (o_binding, lse_or_partials) = match &parts {
        Some(parts) => (placeholder_out, parts),
        None => (
            o_running.as_ref().unwrap_or(io.o).buffer(),
            lse_out.unwrap_or(placeholder_out),
        ),
    };
    for pass in 0..plan.passes {
        let params = uniform_buffer(gpu, &flash_params(spec, plan, pass, lse_out.is_some()))?;
        let bind = kernel.bind(
            &gpu.device,
            &[
                &params,
                io.q.buffer(),
                io.k.buffer(),
                io.v.buffer(),
                o_binding,
                masks.bias(gpu),
                masks.mask(gpu),
                masks.lens(gpu),
                lse_or_partials,
                &masks.params,
            ],
        );
        let last = pass + 1 == plan.passes && parts.is_none() && o_running.is_none();
        let mut compute = gpu.begin_pass(encoder, "wgpu-attention flash", pass == 0, last);
        kernel.dispatch(&mut compute, &bind, size);
    }
    if let Some(parts) = &parts {
        let merge = Combine {
            params: split_merge_params(
                spec,
                plan,
                io.lse.is_some(),
                (masks.sink_offset, masks.varlen_offset),
            ),
            parts,
            part_lses: parts,
            parts_storage: Storage::F32,
            o: io.o,
            lse: io.lse.map(|t| t.buffer()),
            lens: Some(masks.lens(gpu)),
            last: true,
        };
        combine::encode(gpu, encoder, &merge)?;
    }
    if let (Some(running), Some(lse)) = (&o_running, lse_out) {
        let convert = Combine {
            params: convert_params(spec, masks.varlen_offset),
            parts: running.buffer(),
            part_lses: lse,
            parts_storage: Storage::F32,
            o: io.o,
            lse: None,
            lens: Some(masks.lens(gpu)),
            last: true,
        };
        combine::encode(gpu, encoder, &convert)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{Attention, Dims, Layout};

    /// WebGPU's defaults with lavapipe's workgroup memory and its cap on keys per workgroup.
    fn limits() -> GpuLimits {
        let mut l = GpuLimits::from_wgpu(&wgpu::Limits::default(), wgpu::DeviceType::Cpu);
        l.max_workgroup_storage = 32 << 10;
        l
    }

    /// The split scratch holds exactly the partial outputs and then the partial log-sum-exps,
    /// and the merge reads the last partial's last element at the scratch's last element.
    #[test]
    fn split_scratch_layout() {
        let l = limits();
        let d = Dims {
            batch: 2,
            heads: 6,
            kv_heads: 2,
            q_len: 3,
            kv_len: 5000,
            head_dim: 40,
            v_head_dim: 72,
        };
        for layout in [Layout::Bhsd, Layout::Bshd] {
            let opts = Attention::new().layout(layout);
            let spec = opts.validate(d).unwrap();
            let plan = FusedPlan::new(&spec, &l, true, false).unwrap();
            assert!(plan.splits > 1, "{plan:?}");
            let m = split_merge_params(&spec, &plan, true, (None, None));
            let rows = d.lse_elems() as u64;
            assert_eq!(
                (m.lse_offset as u64 + plan.splits as u64 * rows) * 4,
                plan.scratch_bytes
            );
            let last_part = (plan.splits - 1) * m.part_stride_s
                + (d.batch as u32 - 1) * m.part_stride_b
                + (d.heads as u32 - 1) * m.part_stride_h
                + (d.q_len as u32 - 1) * m.part_stride_i
                + m.v_head_dim
                - 1;
            assert_eq!(last_part + 1, m.lse_offset);
            let p = flash_params(&spec, &plan, 0, false);
            assert_eq!(p.parts_lse_offset, m.lse_offset);
            assert_eq!(p.packed_rows, 9);
            assert_eq!((p.first_tile, p.resume), (0, 0));
        }
    }

    /// 47 key tiles, at most 32 per dispatch: two passes of 24, the second resuming.
    #[test]
    fn passes_cover_the_keys_in_order() {
        let d = Dims::new(1, 2, 3000, 16);
        let l = limits();
        let opts = Attention::new();
        let spec = opts.validate(d).unwrap();
        let plan = FusedPlan::new(&spec, &l, false, false).unwrap();
        assert_eq!(plan.passes, 2, "{plan:?}");
        let firsts: Vec<(u32, u32)> = (0..plan.passes)
            .map(|p| {
                let f = flash_params(&spec, &plan, p, true);
                (f.first_tile, f.resume)
            })
            .collect();
        assert_eq!(firsts, vec![(0, 0), (24, 1)]);
        assert!(plan.passes * plan.tiles_per_split >= 3000u32.div_ceil(64));
    }
}
