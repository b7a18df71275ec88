// Scores of one chunk of (batch * head, query rows): S = scale * Q K^T, or with ADDITIVE the
// additive (Bahdanau) scores S[i, j] = sum_d w[d] * tanh(Q[i, d] + K[j, d]) (Keras'
// AdditiveAttention convention; the host passes scale 1 for them).
// One workgroup: a 64 x 64 tile of S of one (batch, head), over head_dim in slices of 16
// (lib/tile_gemm.wgsl). One invocation: a BR x BC block of that tile, in registers.
// Q and K are read through load_q / load_k, which the host's dtype prelude defines.

// Bindings (declared by the host from Kernel::slots): params (QkParams); q, k (tensors); scores
// of the chunk, [bh_count, rows, kv_len]; w, the additive weight vector [head_dim] (a
// placeholder for dot-product scores).

// A pipeline constant: the branch it selects is resolved when the pipeline is built.
override ADDITIVE: bool = false;

// ADDITIVE: the 16 weights of the current slice; 0 past head_dim, so padded dims add nothing.
var<workgroup> w_tile: array<f32, TILE_K>;

// The bases of this workgroup's head (its tile origin is r0, c0 of lib/tile_gemm.wgsl).
var<private> q_base: u32;
var<private> k_base: u32;

fn tile_a(row: u32, d: u32) -> f32 {
    if r0 + row < params.rows && d < params.head_dim {
        return load_q(q_base + (params.row_start + r0 + row) * params.q_stride_s + d);
    }
    return 0.0;
}

fn tile_b(col: u32, d: u32) -> f32 {
    if c0 + col < params.kv_len && d < params.head_dim {
        return load_k(k_base + (c0 + col) * params.k_stride_s + d);
    }
    return 0.0;
}

var<private> bh_local: u32;

fn tile_out(row: u32, col: u32, x: f32) {
    if r0 + row < params.rows && c0 + col < params.kv_len {
        scores[(bh_local * params.rows + r0 + row) * params.kv_len + c0 + col] = x * params.scale;
    }
}

// Clamped: tanh(10) is 1 in f32, and some drivers overflow inside tanh for large inputs.
fn tanh4(x: vec4<f32>) -> vec4<f32> {
    return tanh(clamp(x, vec4<f32>(-10.0), vec4<f32>(10.0)));
}

// The staged slice's additive scores: acc[r][c] += w[d] * tanh(q[r, d] + k[c, d]).
fn additive_fma(acc: Block, ty: u32, tx: u32) -> Block {
    var out = acc;
    for (var k = 0u; k < TILE_K; k++) {
        let a = stage_rows(k, ty);
        let b = stage_cols(k, tx);
        let wd = w_tile[k];
        for (var g = 0u; g < BR4; g++) {
            for (var j = 0u; j < BC4; j++) {
                out[(4u * g) * BC4 + j] += wd * tanh4(a[g].x + b[j]);
                out[(4u * g + 1u) * BC4 + j] += wd * tanh4(a[g].y + b[j]);
                out[(4u * g + 2u) * BC4 + j] += wd * tanh4(a[g].z + b[j]);
                out[(4u * g + 3u) * BC4 + j] += wd * tanh4(a[g].w + b[j]);
            }
        }
    }
    return out;
}

@compute @workgroup_size(NX, TILE_M / BR)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) num_wg: vec3<u32>,
    inv: TileInvocation,
) {
    let lid = inv.lid;
    let li = inv.li;
    let tile = tile_of(wg, num_wg, params.tiles_i, params.tiles_j);
    if tile.z >= params.bh_count {
        return;
    }
    bh_local = tile.z;
    let bh = params.bh_start + bh_local;
    let b = bh / params.heads;
    let h = bh % params.heads;
    q_base = b * params.q_stride_b + h * params.q_stride_h;
    k_base = b * params.k_stride_b + (h / params.group) * params.k_stride_h;
    r0 = tile.y * TILE;
    c0 = tile.x * TILE;

    var acc = Block();
    for (var k0 = 0u; k0 < params.head_dim; k0 += TILE_K) {
        if ADDITIVE {
            tile_stage_a(li, k0);
            tile_stage_b(li, k0);
            if li < TILE_K {
                var wv = 0.0;
                if k0 + li < params.head_dim {
                    wv = w[k0 + li];
                }
                w_tile[li] = wv;
            }
            workgroupBarrier();
            acc = additive_fma(acc, lid.y, lid.x);
            workgroupBarrier();
        } else {
            acc = tile_slice(acc, inv, k0);
        }
    }
    tile_store(acc, lid.y, lid.x);
}
