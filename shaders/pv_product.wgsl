// O = P V for one chunk of (batch * head, query rows), P being the softmax weights.
// One workgroup: a 64-row x 64-column tile of O of one (batch, head), over keys in slices of
// 16 (lib/tile_gemm.wgsl). One invocation: a BR x BC block of that tile, in registers.
// V is read through load_v and O written through store_o, from the host's dtype prelude.

// Bindings (declared by the host from Kernel::slots): params (PvParams); probs, the weights of
// the chunk, [bh_count, rows, kv_len]; v, o (tensors).

// Slices of keys summed into a block accumulator before it is folded into the total.
const BLOCK_STEPS: u32 = 16u;

var<private> p_base: u32;
var<private> v_base: u32;
var<private> o_base: u32;

fn tile_a(row: u32, key: u32) -> f32 {
    if r0 + row < params.rows && key < params.kv_len {
        return probs[p_base + (r0 + row) * params.kv_len + key];
    }
    return 0.0;
}

fn tile_b(col: u32, key: u32) -> f32 {
    if key < params.kv_len && c0 + col < params.v_head_dim {
        return load_v(v_base + key * params.v_stride_s + c0 + col);
    }
    return 0.0;
}

fn tile_out(row: u32, col: u32, x: f32) {
    if r0 + row < params.rows && c0 + col < params.v_head_dim {
        store_o(
            o_base + (params.row_start + r0 + row) * params.o_stride_s + c0 + col,
            x * params.v_scale,
        );
    }
}

@compute @workgroup_size(NX, TILE_M / BR)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) num_wg: vec3<u32>,
    inv: TileInvocation,
) {
    let lid = inv.lid;
    let li = inv.li;
    let tile = tile_of(wg, num_wg, params.tiles_i, params.tiles_n);
    if tile.z >= params.bh_count {
        return;
    }
    let bh_local = tile.z;
    let bh = params.bh_start + bh_local;
    let b = bh / params.heads;
    let h = bh % params.heads;
    v_base = b * params.v_stride_b + (h / params.group) * params.v_stride_h;
    o_base = b * params.o_stride_b + h * params.o_stride_h;
    r0 = tile.y * TILE;
    c0 = tile.x * TILE;
    p_base = bh_local * params.rows * params.kv_len;

    // Two-level accumulation: `block` sums up to BLOCK_STEPS slices of keys and is then folded
    // into `acc`, so no f32 sum runs over more than 256 keys in a row (summing tens of
    // thousands of equal weights into one f32 drifts by 1e-4 relative).
    var acc = Block();
    var block = Block();
    var steps = 0u;
    for (var k0 = 0u; k0 < params.kv_len; k0 += TILE_K) {
        tile_stage_a(li, k0);
        tile_stage_b_by_k(li, k0);
        workgroupBarrier();
        block = tile_fma(block, lid.y, lid.x);
        steps += 1u;
        if steps == BLOCK_STEPS {
            for (var r = 0u; r < BR * BC4; r++) {
                acc[r] += block[r];
                block[r] = vec4<f32>();
            }
            steps = 0u;
        }
        workgroupBarrier();
    }
    for (var r = 0u; r < BR * BC4; r++) {
        acc[r] += block[r];
    }
    tile_store(acc, lid.y, lid.x);
}
