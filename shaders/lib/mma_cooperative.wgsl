// The products of lib/mma.wgsl on cooperative matrices (`enable wgpu_cooperative_matrix`;
// MmaA, MmaB and MmaC are the host's aliases of coop_matCMxCM<f16, A>, <f16, B> and
// <f32, C>). Each of the workgroup's NSG subgroups of SG invocations computes every NSG-th
// CM x CM tile of the result, the count a constant, so that each subgroup runs its
// cooperative operations in control flow uniform across the workgroup (the planner makes sure
// NSG divides the tile counts and that SG is the device's only subgroup size).
// Layouts: coopLoadT / coopStoreT read and write row-major memory (element (i, j) at
// i * stride + j), coopLoad column-major (at j * stride + i). Q's slice is [row][QS] (A,
// row-major); K's slice is [key][KVW], so K^T (B: dims x keys) is column-major with stride
// KVW; P is [row][TILE] (A, row-major); V's chunk is [key][KVW] (B: keys x columns,
// row-major); S and P V are [row][TILE] in mma_s, row-major.

const NSG: u32 = INV / SG;
const S_TILES: u32 = (MMA_ROWS / CM) * (TILE / CM);
const PV_TILES: u32 = (MMA_ROWS / CM) * (PV_COLS / CM);

// The first row and column of this subgroup's n-th result tile of a product `cols` columns
// wide: tile n * NSG + place_sg, row-major.
fn tile_origin(n: u32, cols: u32) -> vec2<u32> {
    let t = n * NSG + place_sg;
    return vec2<u32>((t / (cols / CM)) * CM, (t % (cols / CM)) * CM);
}

// c plus the CM x CM block of Q K^T at rows tr, keys tc, over the staged slice.
fn mma_qk_tile(tr: u32, tc: u32, c0: MmaC) -> MmaC {
    var c = c0;
    for (var d = 0u; d < QS; d += CM) {
        let a = coopLoadT<MmaA>(&mma_q[tr * QS + d], QS);
        let b = coopLoad<MmaB>(&mma_kv[tc * KVW + d], KVW);
        c = coopMultiplyAdd(a, b, c);
    }
    return c;
}

// mma_s = Q K^T over the staged slice (the first slice), [row][key]. Whether to add to mma_s
// is a function of its own, not an argument: naga counts arguments as non-uniform, and a
// cooperative operation under a branch on one as outside uniform control flow.
fn mma_scores_product(li: u32) {
    let zero = coopLoadT<MmaC>(&mma_zero[0], CM);
    for (var n = 0u; n < S_TILES / NSG; n++) {
        let o = tile_origin(n, TILE);
        let tr = o.x;
        let tc = o.y;
        coopStoreT(mma_qk_tile(tr, tc, zero), &mma_s[tr * TILE + tc], TILE);
    }
}

// mma_s += Q K^T over the staged slice (the later slices).
fn mma_scores_product_add(li: u32) {
    for (var n = 0u; n < S_TILES / NSG; n++) {
        let o = tile_origin(n, TILE);
        let tr = o.x;
        let tc = o.y;
        let c = coopLoadT<MmaC>(&mma_s[tr * TILE + tc], TILE);
        coopStoreT(mma_qk_tile(tr, tc, c), &mma_s[tr * TILE + tc], TILE);
    }
}

// mma_s = P V for the staged chunk of V, [row][column of the chunk].
fn mma_pv_product(li: u32) {
    let zero = coopLoadT<MmaC>(&mma_zero[0], CM);
    for (var n = 0u; n < PV_TILES / NSG; n++) {
        let o = tile_origin(n, PV_COLS);
        let tr = o.x;
        let tc = o.y;
        var c = zero;
        for (var k = 0u; k < TILE; k += CM) {
            let a = coopLoadT<MmaA>(&mma_p[tr * TILE + k], TILE);
            let b = coopLoadT<MmaB>(&mma_kv[k * KVW + tc], KVW);
            c = coopMultiplyAdd(a, b, c);
        }
        coopStoreT(c, &mma_s[tr * TILE + tc], TILE);
    }
}
