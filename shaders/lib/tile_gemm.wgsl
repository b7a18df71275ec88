// The register-blocked tile product behind every product kernel (matmul, qk_scores,
// pv_product, and the scores of flash_attention): one TILE_M x TILE tile of C = A B^T, the
// summed axis staged TILE_K at a time through workgroup memory.
// One workgroup: NX x NY invocations, NX = TILE / BC across the columns, NY = TILE_M / BR
// across the rows (declare `@workgroup_size(NX, TILE_M / BR)` and take (tx, ty) from
// local_invocation_id; flash_attention.wgsl is one-dimensional instead and takes (tx, ty)
// from lib/tile_rows_*.wgsl, which may place by subgroup). One invocation (tx, ty): a
// BR x BC block in registers (BR, BC: 4 or 8, constants of the key written by the host), its
// rows and columns in groups of four spread over the tile so that neighbouring invocations
// read neighbouring vec4s of workgroup memory: block row r is tile row `block_row(ty, r)`,
// 4 (ty + NY (r / 4)) + r % 4, block column c is tile column `block_col(tx, c)`,
// 4 (tx + NX (c / 4)) + c % 4. An 8 x 8 block reads 4 vec4s of workgroup memory per 64 FMAs,
// a 4 x 4 block 2 per 16.
//
// A kernel that includes this fragment defines its operands, in tile coordinates and the
// absolute index k of the summed axis, returning 0 outside the problem:
//     fn tile_a(row: u32, k: u32) -> f32
//     fn tile_b(col: u32, k: u32) -> f32
// and runs `acc = tile_slice(acc, inv, k0)` for each k0 in steps of TILE_K (or, for other
// staging or arithmetic, the same steps written out: stage, barrier, tile_fma, barrier), then
// writes acc (lib/tile_store.wgsl, or its own epilogue). TILE and TILE_K come from the
// host's shared constants, BR and BC from the key.

// Rows of the tile: 64, or 4 to 32 for the fused kernel serving a few rows (decoding), so
// that a GQA group of 4 query rows does not occupy a 64-row workgroup. At least BR.
override TILE_M: u32 = 64u;

// The per-invocation builtins of a tile-product entry point: `fn main(@builtin(workgroup_id)
// wg: vec3<u32>, @builtin(num_workgroups) num_wg: vec3<u32>, inv: TileInvocation)` (the
// workgroup's builtins apart, for the uniformity analysis: see `RowInvocation`).
struct TileInvocation {
    // (tx, ty): the block this invocation owns.
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
}

// The tile of a [batches, tiles_m, tiles_n] grid this workgroup computes, column tiles fastest:
// (tn, tm, z); z >= batches past the grid.
fn tile_of(wg: vec3<u32>, num_wg: vec3<u32>, tiles_m: u32, tiles_n: u32) -> vec3<u32> {
    let index = workgroup_index(wg, num_wg);
    return vec3<u32>(index % tiles_n, (index / tiles_n) % tiles_m, index / (tiles_n * tiles_m));
}

// This workgroup's tile origin, set by the kernel's main before the first slice: the tile's
// first row (of A) and first column (of B), for the kernel's tile_a / tile_b / tile_out.
var<private> r0: u32;
var<private> c0: u32;

// Vec4s across a staged row of the tile (also the row groups of four of a 64-row tile).
const TILE_X: u32 = TILE / 4u;
// Invocations across the tile's columns.
const NX: u32 = TILE / BC;
// Vec4s per block row, and groups of four rows per block.
const BC4: u32 = BC / 4u;
const BR4: u32 = BR / 4u;
// Where B's slice starts in tile_stage: after A's, at most TILE_K x TILE_X vec4s.
const STAGE_B: u32 = TILE_K * TILE_X;

// A BR x BC register block: row r's columns 4 j .. 4 j + 3 (of the block) at [r * BC4 + j].
alias Block = array<vec4<f32>, BR * BC4>;

// Invocations of the workgroup: NX x NY, NY = TILE_M / BR (TILE_M is a pipeline constant, so
// these are functions, folded when the pipeline is built).
fn tile_invocations() -> u32 {
    return NX * (TILE_M / BR);
}

// The vec4 of staged rows (of four) holding rows 4 g .. 4 g + 3 of invocation row ty's block.
fn block_row_group(ty: u32, g: u32) -> u32 {
    return ty + (TILE_M / BR) * g;
}

// The tile row of block row r of invocation row ty.
fn block_row(ty: u32, r: u32) -> u32 {
    return 4u * block_row_group(ty, r / 4u) + r % 4u;
}

// The tile column of block column c of invocation column tx.
fn block_col(tx: u32, c: u32) -> u32 {
    return 4u * (tx + NX * (c / 4u)) + c % 4u;
}

// Vec4s of one staging buffer: a slice of A, then a slice of B.
const STAGE_SIZE: u32 = 2u * STAGE_B;

// STAGES (a constant of the key: 1, 2 for flash_attention.wgsl's double buffering, 0 for
// its 16-bit products, which stage elsewhere: one unused vec4)
// buffers, each a slice of A then a slice of B, [k][row / 4]: one vec4 holds four consecutive
// rows of one k. Flash attention reuses it to stage V.
var<workgroup> tile_stage: array<vec4<f32>, max(STAGES * STAGE_SIZE, 1u)>;

// Item `idx` of operand `side` (0: A, TILE_M rows; 1: B, TILE columns), slice
// k0 .. k0 + TILE_K, for operands contiguous in k: four rows of one k. The 16 invocations that
// share those rows read 16 consecutive k, so global reads coalesce.
fn tile_stage_item(idx: u32, k0: u32, side: u32) {
    let kk = idx % TILE_K;
    let mq = idx / TILE_K;
    var x = vec4<f32>();
    for (var e = 0u; e < 4u; e++) {
        if side == 0u {
            x[e] = tile_a(mq * 4u + e, k0 + kk);
        } else {
            x[e] = tile_b(mq * 4u + e, k0 + kk);
        }
    }
    tile_stage[side * STAGE_B + kk * TILE_X + mq] = x;
}

// The whole slice of operand `side`: items / invocations items per invocation (1, 2, 4, or
// up to 32 for tiles of a few rows), a loop with a constant trip count that drivers unroll:
// llvmpipe counts every iteration of a loop it does not unroll against its 65535-iteration
// limit per invocation (NOTES.md), which long products would otherwise reach.
fn tile_stage_k_contiguous(li: u32, k0: u32, side: u32) {
    let items = TILE_K * select(TILE, TILE_M, side == 0u) / 4u;
    let invocations = tile_invocations();
    for (var n = 0u; n < items / invocations; n++) {
        tile_stage_item(li + n * invocations, k0, side);
    }
}

// A's slice (Q of QK^T, P of P V, an activation).
fn tile_stage_a(li: u32, k0: u32) {
    tile_stage_k_contiguous(li, k0, 0u);
}

// B's slice, for operands contiguous in k (K of QK^T, a Linear weight).
fn tile_stage_b(li: u32, k0: u32) {
    tile_stage_k_contiguous(li, k0, 1u);
}

// Item `idx` of B's slice for operands contiguous in the column (V of P V): four
// consecutive columns of one k.
fn tile_stage_item_by_k(idx: u32, k0: u32) {
    let kk = idx / TILE_X;
    let nq = idx % TILE_X;
    var b = vec4<f32>();
    for (var e = 0u; e < 4u; e++) {
        b[e] = tile_b(nq * 4u + e, k0 + kk);
    }
    tile_stage[STAGE_B + kk * TILE_X + nq] = b;
}

// B's slice, for operands contiguous in the column (constant trip count, as above).
fn tile_stage_b_by_k(li: u32, k0: u32) {
    let invocations = tile_invocations();
    for (var n = 0u; n < TILE_K * TILE_X / invocations; n++) {
        tile_stage_item_by_k(li + n * invocations, k0);
    }
}

// The block's rows of staged A at k (BR4 vec4s), of the buffer at `base`.
fn stage_rows_at(k: u32, ty: u32, base: u32) -> array<vec4<f32>, BR4> {
    var a = array<vec4<f32>, BR4>();
    for (var g = 0u; g < BR4; g++) {
        a[g] = tile_stage[base + k * TILE_X + block_row_group(ty, g)];
    }
    return a;
}

// The block's columns of staged B at k (BC4 vec4s), of the buffer at `base`.
fn stage_cols_at(k: u32, tx: u32, base: u32) -> array<vec4<f32>, BC4> {
    var b = array<vec4<f32>, BC4>();
    for (var j = 0u; j < BC4; j++) {
        b[j] = tile_stage[base + STAGE_B + k * TILE_X + tx + NX * j];
    }
    return b;
}

// The same of the first buffer.
fn stage_rows(k: u32, ty: u32) -> array<vec4<f32>, BR4> {
    return stage_rows_at(k, ty, 0u);
}

fn stage_cols(k: u32, tx: u32) -> array<vec4<f32>, BC4> {
    return stage_cols_at(k, tx, 0u);
}

// acc[r][c] += a[r] * b[c]: one k of the block, a the block's rows, b its columns. One flat
// loop with a small body, so that every driver unrolls it and the block's indices are
// constants: llvmpipe keeps a private array in memory, read and written lane by lane, as soon
// as one of its indices is not (nested loops stay rolled there).
fn block_fma(acc: Block, a: array<vec4<f32>, BR4>, b: array<vec4<f32>, BC4>) -> Block {
    var out = acc;
    for (var x = 0u; x < BR4 * BC4; x++) {
        let g = x / BC4;
        let j = x % BC4;
        out[(4u * g) * BC4 + j] += a[g].x * b[j];
        out[(4u * g + 1u) * BC4 + j] += a[g].y * b[j];
        out[(4u * g + 2u) * BC4 + j] += a[g].z * b[j];
        out[(4u * g + 3u) * BC4 + j] += a[g].w * b[j];
    }
    return out;
}

// The slice staged in the buffer at `base`: its contribution to this invocation's block.
fn tile_fma_at(acc: Block, ty: u32, tx: u32, base: u32) -> Block {
    var out = acc;
    for (var k = 0u; k < TILE_K; k++) {
        out = block_fma(out, stage_rows_at(k, ty, base), stage_cols_at(k, tx, base));
    }
    return out;
}

// The same of the first buffer.
fn tile_fma(acc: Block, ty: u32, tx: u32) -> Block {
    return tile_fma_at(acc, ty, tx, 0u);
}

// One slice of the product for operands contiguous in k: stage A and B, then accumulate.
// Every invocation of the workgroup must call it (it holds two barriers).
fn tile_slice(acc: Block, inv: TileInvocation, k0: u32) -> Block {
    tile_stage_a(inv.li, k0);
    tile_stage_b(inv.li, k0);
    workgroupBarrier();
    let out = tile_fma(acc, inv.lid.y, inv.lid.x);
    workgroupBarrier();
    return out;
}
