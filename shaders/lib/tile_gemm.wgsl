// The register-blocked tile product behind every product kernel (matmul, qk_scores,
// pv_product, and the scores of flash_attention): one TILE_M x TILE tile of C = A B^T, the
// summed axis staged TILE_K at a time through workgroup memory.
// One workgroup: TILE_X x (TILE_M / 4) invocations (declare
// `@workgroup_size(TILE_X, TILE_M / 4u)`); TILE_X = TILE / 4 = TILE_K (the host checks it).
// One invocation (tx, ty): the 4 x 4 block of rows 4 ty .. 4 ty + 3 and columns
// 4 tx .. 4 tx + 3, in registers.
//
// A kernel that includes this fragment defines its operands, in tile coordinates and the
// absolute index k of the summed axis, returning 0 outside the problem:
//     fn tile_a(row: u32, k: u32) -> f32
//     fn tile_b(col: u32, k: u32) -> f32
// and runs `acc = tile_slice(acc, inv, k0)` for each k0 in steps of TILE_K (or, for other
// staging or arithmetic, the same steps written out: stage, barrier, tile_fma, barrier), then
// writes acc (lib/tile_store.wgsl, or its own epilogue). TILE and TILE_K come from the
// host's shared constants.

// Rows of the tile: 64, or 4 to 32 for the fused kernel serving a few rows (decoding), so
// that a GQA group of 4 query rows does not occupy a 64-row workgroup.
override TILE_M: u32 = 64u;

// The builtins of a tile-product entry point: `fn main(inv: TileInvocation)`.
struct TileInvocation {
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) num_wg: vec3<u32>,
    // (tx, ty): the 4 x 4 block this invocation owns.
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
}

// The tile of a [batches, tiles_m, tiles_n] grid this workgroup computes, column tiles fastest:
// (tn, tm, z); z >= batches past the grid.
fn tile_of(inv: TileInvocation, tiles_m: u32, tiles_n: u32) -> vec3<u32> {
    let index = workgroup_index(inv.wg, inv.num_wg);
    return vec3<u32>(index % tiles_n, (index / tiles_n) % tiles_m, index / (tiles_n * tiles_m));
}

// This workgroup's tile origin, set by the kernel's main before the first slice: the tile's
// first row (of A) and first column (of B), for the kernel's tile_a / tile_b / tile_out.
var<private> r0: u32;
var<private> c0: u32;

// A 4 x 4 register block: one vec4 of four columns per row.
alias Block = array<vec4<f32>, 4>;

// Invocations across the tile's columns, each owning four (also the vec4s across a staged
// row of the tile).
const TILE_X: u32 = TILE / 4u;
// Where B's slice starts in tile_stage: after A's, at most TILE_K x TILE_X vec4s.
const STAGE_B: u32 = TILE_K * TILE_X;

// A slice of A then a slice of B, each [k][row / 4]: one vec4 holds four consecutive rows of
// one k. Flash attention reuses it to stage V.
var<workgroup> tile_stage: array<vec4<f32>, 2u * STAGE_B>;

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

// The whole slice of operand `side`: one item per invocation, or with fewer invocations than
// items (TILE_M < 64, operand B) several. The branch is on constants, resolved when the
// pipeline is built (a loop here cost the 64-row kernels 15% on llvmpipe).
fn tile_stage_k_contiguous(li: u32, k0: u32, side: u32) {
    let items = TILE_K * select(TILE, TILE_M, side == 0u) / 4u;
    if items == TILE_M * 4u {
        tile_stage_item(li, k0, side);
    } else {
        for (var idx = li; idx < items; idx += TILE_M * 4u) {
            tile_stage_item(idx, k0, side);
        }
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

// B's slice, for operands contiguous in the column.
fn tile_stage_b_by_k(li: u32, k0: u32) {
    if TILE_M == TILE {
        tile_stage_item_by_k(li, k0);
    } else {
        for (var idx = li; idx < TILE_K * TILE_X; idx += TILE_M * 4u) {
            tile_stage_item_by_k(idx, k0);
        }
    }
}

// acc[r] += a[r] * b: one k of a 4 x 4 block.
fn block_fma(acc: Block, a: vec4<f32>, b: vec4<f32>) -> Block {
    var out = acc;
    out[0] += a.x * b;
    out[1] += a.y * b;
    out[2] += a.z * b;
    out[3] += a.w * b;
    return out;
}

// The staged slice's contribution to this invocation's block.
fn tile_fma(acc: Block, ty: u32, tx: u32) -> Block {
    var out = acc;
    for (var k = 0u; k < TILE_K; k++) {
        out = block_fma(out, tile_stage[k * TILE_X + ty], tile_stage[STAGE_B + k * TILE_X + tx]);
    }
    return out;
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
