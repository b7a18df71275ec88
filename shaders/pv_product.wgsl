// O = P V for one chunk of (batch * head, query rows), P being the softmax weights.
// One workgroup: a 64-row x 64-column tile of O of one (batch, head), over keys in steps of 16.
// One invocation: a 4 x 4 block of that tile, accumulated in registers.
// V is read through load_v and O written through store_o, from the host's dtype prelude.

struct Params {
    bh_start: u32,
    bh_count: u32,
    row_start: u32,
    rows: u32,
    kv_len: u32,
    v_head_dim: u32,
    heads: u32,
    group: u32,
    tiles_i: u32,
    tiles_n: u32,
    v_stride_b: u32,
    v_stride_h: u32,
    v_stride_s: u32,
    o_stride_b: u32,
    o_stride_h: u32,
    o_stride_s: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
// Weights of the chunk: [bh_count, rows, kv_len].
@group(0) @binding(1) var<storage, read> probs: array<f32>;
// @binding(2): V and @binding(3): O, declared by the prelude.

const TILE: u32 = 64u;
const BK: u32 = 16u;
const BLOCK_STEPS: u32 = 16u;

// [k][m / 4] and [k][n / 4]: four consecutive rows (columns) of one key of the tile.
var<workgroup> p_tile: array<array<vec4<f32>, 16>, BK>;
var<workgroup> v_tile: array<array<vec4<f32>, 16>, BK>;

@compute @workgroup_size(16, 16)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) num_wg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let tile = wg.x + num_wg.x * (wg.y + num_wg.y * wg.z);
    if tile >= params.tiles_i * params.tiles_n * params.bh_count {
        return;
    }
    let tn = tile % params.tiles_n;
    let ti = (tile / params.tiles_n) % params.tiles_i;
    let bh_local = tile / (params.tiles_n * params.tiles_i);
    let bh = params.bh_start + bh_local;
    let b = bh / params.heads;
    let h = bh % params.heads;
    let v_base = b * params.v_stride_b + (h / params.group) * params.v_stride_h;
    let o_base = b * params.o_stride_b + h * params.o_stride_h;
    let r0 = ti * TILE;
    let c0 = tn * TILE;
    let p_base = bh_local * params.rows * params.kv_len;

    // Two-level accumulation: `block` sums up to BLOCK_STEPS slices of keys and is then folded
    // into `acc`, so no f32 sum runs over more than 256 keys in a row (summing tens of
    // thousands of equal weights into one f32 drifts by 1e-4 relative).
    var acc: array<vec4<f32>, 4>;
    var block: array<vec4<f32>, 4>;
    var steps = 0u;
    for (var k0 = 0u; k0 < params.kv_len; k0 += BK) {
        // P: 64 rows x 16 keys; each invocation loads four rows of one key, and the 16
        // invocations sharing those rows read 16 consecutive keys of each.
        let kk = li % BK;
        let mq = li / BK;
        var pv = vec4<f32>();
        if k0 + kk < params.kv_len {
            for (var e = 0u; e < 4u; e++) {
                let m = mq * 4u + e;
                if r0 + m < params.rows {
                    pv[e] = probs[p_base + (r0 + m) * params.kv_len + k0 + kk];
                }
            }
        }
        p_tile[kk][mq] = pv;
        // V: 16 keys x 64 columns; each invocation loads four consecutive columns of one key.
        let vk = li / 16u;
        let nq = li % 16u;
        var vv = vec4<f32>();
        if k0 + vk < params.kv_len {
            let row = v_base + (k0 + vk) * params.v_stride_s;
            for (var e = 0u; e < 4u; e++) {
                let n = c0 + nq * 4u + e;
                if n < params.v_head_dim {
                    vv[e] = load_v(row + n);
                }
            }
        }
        v_tile[vk][nq] = vv;
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk++) {
            let a = p_tile[kk][lid.y];
            let bv = v_tile[kk][lid.x];
            block[0] += a.x * bv;
            block[1] += a.y * bv;
            block[2] += a.z * bv;
            block[3] += a.w * bv;
        }
        steps += 1u;
        if steps == BLOCK_STEPS {
            for (var r = 0u; r < 4u; r++) {
                acc[r] += block[r];
                block[r] = vec4<f32>();
            }
            steps = 0u;
        }
        workgroupBarrier();
    }
    for (var r = 0u; r < 4u; r++) {
        acc[r] += block[r];
    }

    for (var r = 0u; r < 4u; r++) {
        let row = r0 + lid.y * 4u + r;
        if row >= params.rows {
            break;
        }
        let base = o_base + (params.row_start + row) * params.o_stride_s;
        for (var c = 0u; c < 4u; c++) {
            let col = c0 + lid.x * 4u + c;
            if col < params.v_head_dim {
                store_o(base + col, acc[r][c]);
            }
        }
    }
}
