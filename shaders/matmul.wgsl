// Batched matrix product with an optional bias: C[z, m, n] = alpha * sum_k A[z, m, k] B[z, n, k]
// + bias[n] -- B indexed [n, k], as PyTorch's Linear stores its weight [out, in] -- with any
// element strides, for the projections of a multi-head layer and for head averages.
// One workgroup: a 64 x 64 tile of C of one batch entry, over k in slices of 16.
// One invocation: a 4 x 4 block of that tile, accumulated in registers.
// A, B and C go through the dtype prelude's load_a / load_b / store_c.

struct Params {
    m: u32,
    n: u32,
    k: u32,
    batches: u32,
    tiles_m: u32,
    tiles_n: u32,
    has_bias: u32,
    alpha: f32,
    a_stride_z: u32,
    a_stride_m: u32,
    a_stride_k: u32,
    b_stride_z: u32,
    b_stride_n: u32,
    b_stride_k: u32,
    c_stride_z: u32,
    c_stride_m: u32,
    c_stride_n: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
// @binding(1): A, @binding(2): B (read) and @binding(3): C (write), declared by the prelude.
@group(0) @binding(4) var<storage, read> bias: array<f32>;

const TILE: u32 = 64u;
const BK: u32 = 16u;

// [k][row / 4]: one vec4 holds four consecutive rows of one column of the tile.
var<workgroup> a_tile: array<array<vec4<f32>, 16>, BK>;
var<workgroup> b_tile: array<array<vec4<f32>, 16>, BK>;

@compute @workgroup_size(16, 16)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) num_wg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let tile = wg.x + num_wg.x * (wg.y + num_wg.y * wg.z);
    if tile >= params.tiles_m * params.tiles_n * params.batches {
        return;
    }
    let tn = tile % params.tiles_n;
    let tm = (tile / params.tiles_n) % params.tiles_m;
    let z = tile / (params.tiles_n * params.tiles_m);
    let a_base = z * params.a_stride_z;
    let b_base = z * params.b_stride_z;
    let r0 = tm * TILE;
    let c0 = tn * TILE;

    var acc: array<vec4<f32>, 4>;
    for (var k0 = 0u; k0 < params.k; k0 += BK) {
        // Each invocation stages four rows of one column of each operand; the 16 invocations
        // sharing those rows read 16 consecutive k, which coalesce when k is contiguous.
        let kk = li % BK;
        let mq = li / BK;
        let kx = k0 + kk;
        var av = vec4<f32>();
        var bv = vec4<f32>();
        if kx < params.k {
            for (var e = 0u; e < 4u; e++) {
                let row = mq * 4u + e;
                if r0 + row < params.m {
                    av[e] = load_a(a_base + (r0 + row) * params.a_stride_m + kx * params.a_stride_k);
                }
                if c0 + row < params.n {
                    bv[e] = load_b(b_base + (c0 + row) * params.b_stride_n + kx * params.b_stride_k);
                }
            }
        }
        a_tile[kk][mq] = av;
        b_tile[kk][mq] = bv;
        workgroupBarrier();
        for (var k = 0u; k < BK; k++) {
            let a = a_tile[k][lid.y];
            let b = b_tile[k][lid.x];
            acc[0] += a.x * b;
            acc[1] += a.y * b;
            acc[2] += a.z * b;
            acc[3] += a.w * b;
        }
        workgroupBarrier();
    }

    for (var r = 0u; r < 4u; r++) {
        let row = r0 + lid.y * 4u + r;
        if row >= params.m {
            break;
        }
        for (var c = 0u; c < 4u; c++) {
            let col = c0 + lid.x * 4u + c;
            if col < params.n {
                var x = acc[r][c] * params.alpha;
                if params.has_bias != 0u {
                    x += bias[col];
                }
                store_c(z * params.c_stride_z + row * params.c_stride_m + col * params.c_stride_n, x);
            }
        }
    }
}
