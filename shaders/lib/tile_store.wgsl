// The epilogue of lib/tile_gemm.wgsl: hands each element of this invocation's 4 x 4 block to
// the kernel's `fn tile_out(row: u32, col: u32, x: f32)` (tile coordinates), which checks the
// bounds and writes it.
fn tile_store(acc: Block, ty: u32, tx: u32) {
    for (var r = 0u; r < 4u; r++) {
        for (var c = 0u; c < 4u; c++) {
            tile_out(ty * 4u + r, tx * 4u + c, acc[r][c]);
        }
    }
}
