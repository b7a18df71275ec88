// Scores of one chunk of (batch * head, query rows): S = scale * Q K^T, or with ADDITIVE the
// additive (Bahdanau) scores S[i, j] = sum_d w[d] * tanh(Q[i, d] + K[j, d]) (Keras'
// AdditiveAttention convention; the host passes scale 1 for them).
// One workgroup: a 64 x 64 tile of S of one (batch, head), over head_dim in steps of 16.
// One invocation: a 4 x 4 block of that tile, accumulated in registers.
// Q and K are read through load_q / load_k, which the host's dtype prelude defines.

struct Params {
    bh_start: u32,
    bh_count: u32,
    row_start: u32,
    rows: u32,
    kv_len: u32,
    head_dim: u32,
    heads: u32,
    group: u32,
    tiles_i: u32,
    tiles_j: u32,
    q_stride_b: u32,
    q_stride_h: u32,
    q_stride_s: u32,
    k_stride_b: u32,
    k_stride_h: u32,
    k_stride_s: u32,
    scale: f32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
// @binding(1): Q and @binding(2): K, declared by the prelude.
// Scores of the chunk: [bh_count, rows, kv_len].
@group(0) @binding(3) var<storage, read_write> scores: array<f32>;
// The additive weight vector, [head_dim] (a placeholder for dot-product scores).
@group(0) @binding(4) var<storage, read> w: array<f32>;

// A pipeline constant: the branch it selects is resolved when the pipeline is built.
override ADDITIVE: bool = false;

const TILE: u32 = 64u;
const BK: u32 = 16u;

// [k][m / 4]: one vec4 holds four consecutive rows of one column of the tile.
var<workgroup> q_tile: array<array<vec4<f32>, 16>, BK>;
var<workgroup> k_tile: array<array<vec4<f32>, 16>, BK>;
// ADDITIVE: the 16 weights of the current slice; 0 past head_dim, so padded dims add nothing.
var<workgroup> w_tile: array<f32, BK>;

// Clamped: tanh(10) is 1 in f32, and some drivers overflow inside tanh for large inputs.
fn tanh4(x: vec4<f32>) -> vec4<f32> {
    return tanh(clamp(x, vec4<f32>(-10.0), vec4<f32>(10.0)));
}

@compute @workgroup_size(16, 16)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) num_wg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    // The dispatch may spill into y and z when x is full.
    let tile = wg.x + num_wg.x * (wg.y + num_wg.y * wg.z);
    if tile >= params.tiles_i * params.tiles_j * params.bh_count {
        return;
    }
    let tj = tile % params.tiles_j;
    let ti = (tile / params.tiles_j) % params.tiles_i;
    let bh_local = tile / (params.tiles_j * params.tiles_i);
    let bh = params.bh_start + bh_local;
    let b = bh / params.heads;
    let h = bh % params.heads;
    let q_base = b * params.q_stride_b + h * params.q_stride_h;
    let k_base = b * params.k_stride_b + (h / params.group) * params.k_stride_h;
    let r0 = ti * TILE;
    let c0 = tj * TILE;

    var acc: array<vec4<f32>, 4>;
    for (var k0 = 0u; k0 < params.head_dim; k0 += BK) {
        // 64 x 16 elements of each operand: each invocation loads four rows of one column
        // and stores them as one vec4. The 16 invocations that share those rows read 16
        // consecutive elements of each, so global reads coalesce.
        let kk = li % BK;
        let mq = li / BK;
        let d = k0 + kk;
        var qv = vec4<f32>();
        var kv = vec4<f32>();
        if d < params.head_dim {
            for (var e = 0u; e < 4u; e++) {
                let m = mq * 4u + e;
                if r0 + m < params.rows {
                    qv[e] = load_q(q_base + (params.row_start + r0 + m) * params.q_stride_s + d);
                }
                if c0 + m < params.kv_len {
                    kv[e] = load_k(k_base + (c0 + m) * params.k_stride_s + d);
                }
            }
        }
        q_tile[kk][mq] = qv;
        k_tile[kk][mq] = kv;
        if ADDITIVE && li < BK {
            var wv = 0.0;
            if k0 + li < params.head_dim {
                wv = w[k0 + li];
            }
            w_tile[li] = wv;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk++) {
            let a = q_tile[kk][lid.y];
            let bv = k_tile[kk][lid.x];
            if ADDITIVE {
                let wd = w_tile[kk];
                acc[0] += wd * tanh4(a.x + bv);
                acc[1] += wd * tanh4(a.y + bv);
                acc[2] += wd * tanh4(a.z + bv);
                acc[3] += wd * tanh4(a.w + bv);
                continue;
            }
            acc[0] += a.x * bv;
            acc[1] += a.y * bv;
            acc[2] += a.z * bv;
            acc[3] += a.w * bv;
        }
        workgroupBarrier();
    }

    for (var r = 0u; r < 4u; r++) {
        let row = r0 + lid.y * 4u + r;
        if row >= params.rows {
            break;
        }
        let base = (bh_local * params.rows + row) * params.kv_len;
        for (var c = 0u; c < 4u; c++) {
            let col = c0 + lid.x * 4u + c;
            if col < params.kv_len {
                scores[base + col] = acc[r][c] * params.scale;
            }
        }
    }
}
