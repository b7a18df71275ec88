// The epilogue of lib/tile_gemm.wgsl: hands each element of this invocation's BR x BC block to
// the kernel's `fn tile_out(row: u32, col: u32, x: f32)` (tile coordinates), which checks the
// bounds and writes it. One flat loop (see block_fma).
fn tile_store(acc: Block, ty: u32, tx: u32) {
    for (var x = 0u; x < BR * BC4; x++) {
        let row = block_row(ty, x / BC4);
        let col = block_col(tx, 4u * (x % BC4));
        tile_out(row, col, acc[x].x);
        tile_out(row, col + 1u, acc[x].y);
        tile_out(row, col + 2u, acc[x].z);
        tile_out(row, col + 3u, acc[x].w);
    }
}
