// Batched matrix product with an optional bias: C[z, m, n] = alpha * sum_k A[z, m, k] B[z, n, k]
// + bias[n] -- B indexed [n, k], as PyTorch's Linear stores its weight [out, in] -- with any
// element strides, for the projections of a multi-head layer and for head averages.
// One workgroup: a 64 x 64 tile of C of one batch entry, over k in slices of 16
// (lib/tile_gemm.wgsl). One invocation: a BR x BC block of that tile, in registers.
// A, B and C go through the dtype prelude's load_a / load_b / store_c.

// Bindings (declared by the host from Kernel::slots): params (MatmulParams); a, b (read) and c
// (write) tensors; bias, [n] (a placeholder without one).

var<private> z: u32;

fn tile_a(row: u32, k: u32) -> f32 {
    if r0 + row < params.m && k < params.k {
        return load_a(z * params.a_stride_z + (r0 + row) * params.a_stride_m + k * params.a_stride_k);
    }
    return 0.0;
}

fn tile_b(col: u32, k: u32) -> f32 {
    if c0 + col < params.n && k < params.k {
        return load_b(z * params.b_stride_z + (c0 + col) * params.b_stride_n + k * params.b_stride_k);
    }
    return 0.0;
}

fn tile_out(row: u32, col: u32, x: f32) {
    let m = r0 + row;
    let n = c0 + col;
    if m < params.m && n < params.n {
        var y = x * params.alpha;
        if params.has_bias != 0u {
            y += bias[n];
        }
        store_c(z * params.c_stride_z + m * params.c_stride_m + n * params.c_stride_n, y);
    }
}

@compute @workgroup_size(NX, TILE_M / BR)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) num_wg: vec3<u32>,
    inv: TileInvocation,
) {
    let tile = tile_of(wg, num_wg, params.tiles_m, params.tiles_n);
    if tile.z >= params.batches {
        return;
    }
    z = tile.z;
    r0 = tile.y * TILE;
    c0 = tile.x * TILE;

    var acc = Block();
    for (var k0 = 0u; k0 < params.k; k0 += TILE_K) {
        acc = tile_slice(acc, inv, k0);
    }
    tile_store(acc, inv.lid.y, inv.lid.x);
}
