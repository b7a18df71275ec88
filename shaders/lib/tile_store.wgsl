// The epilogue of lib/tile_gemm.wgsl: hands each element of this invocation's BR x BC block to
// the kernel's `fn tile_out(row: u32, col: u32, x: f32)` (tile coordinates), which checks the
// bounds and writes it. From a copy made in a loop small enough to unroll: llvmpipe does not
// unroll the writing loop, and indexing acc there kept the caller's accumulators in memory
// through the whole product (qk_scores 8 x 8 at L=S=512, D=64: 149M -> 125M instructions).
fn tile_store(acc: Block, ty: u32, tx: u32) {
    var out = Block();
    for (var x = 0u; x < BR * BC4; x++) {
        out[x] = acc[x];
    }
    for (var x = 0u; x < BR * BC4; x++) {
        let row = block_row(ty, x / BC4);
        let col = block_col(tx, 4u * (x % BC4));
        tile_out(row, col, out[x].x);
        tile_out(row, col + 1u, out[x].y);
        tile_out(row, col + 2u, out[x].z);
        tile_out(row, col + 3u, out[x].w);
    }
}
