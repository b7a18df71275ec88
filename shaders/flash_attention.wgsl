// Fused attention (flash attention, forward): scores, masked online softmax and P·V in one
// pass; the score matrix never leaves the workgroup.
// One workgroup: 64 query rows of one (batch, head), streaming the keys its rows may see in
// tiles of 64 (tiles that causal, window or length masks remove entirely are never visited).
// One invocation: a 4 x 4 block of each score tile, and 4 rows x 4 * O_CHUNKS columns of O,
// accumulated in registers with the running row maximum and sum.
// Q, K, V and O go through the dtype prelude's load_* / store_o; masking through
// attention_mask.wgsl.

// ceil(v_head_dim / 64): the columns of O each invocation owns are tx * 4 + 64 * c + 0..3.
override O_CHUNKS: u32 = 1u;
// Keys per slice of V staged at once: the slice holds BKV * 16 * O_CHUNKS vec4s <= 512.
override BKV: u32 = 32u;

struct Params {
    heads: u32,
    group: u32,
    tiles_m: u32,
    groups_total: u32,
    head_dim: u32,
    v_head_dim: u32,
    write_lse: u32,
    scale: f32,
    q_stride_b: u32,
    q_stride_h: u32,
    q_stride_s: u32,
    k_stride_b: u32,
    k_stride_h: u32,
    k_stride_s: u32,
    v_stride_b: u32,
    v_stride_h: u32,
    v_stride_s: u32,
    o_stride_b: u32,
    o_stride_h: u32,
    o_stride_s: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
// @binding(1..4): Q, K, V (read) and O (write), declared by the prelude.
@group(0) @binding(5) var<storage, read> bias: array<f32>;
@group(0) @binding(6) var<storage, read> mask: array<u32>;
@group(0) @binding(7) var<storage, read> lens: array<u32>;
// Log-sum-exp as f32 bits, [batch, heads, q_len].
@group(0) @binding(8) var<storage, read_write> lse: array<u32>;
@group(0) @binding(9) var<uniform> mparams: MaskParams;

const BM: u32 = 64u;
const BN: u32 = 64u;
const BK: u32 = 16u;

// Q and K slices ([k][row / 4], 256 vec4s each) while scoring; a slice of V while summing.
var<workgroup> stage: array<vec4<f32>, 512>;
// The tile's probabilities, [key][row / 4].
var<workgroup> p_tile: array<array<vec4<f32>, 16>, BN>;
// Row reductions across the 16 invocations that share rows: [row][tx].
var<workgroup> red: array<f32, 1024>;
var<workgroup> tile_bounds: vec2<u32>;

@compute @workgroup_size(16, 16)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) num_wg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let id = wg.x + num_wg.x * (wg.y + num_wg.y * wg.z);
    if id >= params.groups_total {
        return;
    }
    let bh = id / params.tiles_m;
    // Heaviest query tiles (last under causal masking) first, for better load balance.
    let tm = params.tiles_m - 1u - id % params.tiles_m;
    let b = bh / params.heads;
    let h = bh % params.heads;
    let kvh = h / params.group;
    let q_base = b * params.q_stride_b + h * params.q_stride_h;
    let k_base = b * params.k_stride_b + kvh * params.k_stride_h;
    let v_base = b * params.v_stride_b + kvh * params.v_stride_h;
    let r0 = tm * BM;
    let tx = lid.x;
    let ty = lid.y;
    let q_len = mparams.q_len;
    let kv_len = mparams.kv_len;

    // The key range of each of this invocation's rows, and of the whole tile.
    var lo: array<i32, 4>;
    var hi: array<i32, 4>;
    for (var r = 0u; r < 4u; r++) {
        let i = r0 + ty * 4u + r;
        var range = vec2<i32>(0, 0);
        if i < q_len {
            range = key_range(b, i);
        }
        lo[r] = range.x;
        hi[r] = range.y;
    }
    if li == 0u {
        var t_lo = i32(kv_len);
        var t_hi = 0;
        for (var m = 0u; m < BM && r0 + m < q_len; m++) {
            let range = key_range(b, r0 + m);
            if range.y > range.x {
                t_lo = min(t_lo, range.x);
                t_hi = max(t_hi, range.y);
            }
        }
        var bounds = vec2<u32>(0u, 0u);
        if t_hi > t_lo {
            bounds = vec2<u32>(u32(t_lo) / BN, (u32(t_hi) + BN - 1u) / BN);
        }
        tile_bounds = bounds;
    }
    let tiles = workgroupUniformLoad(&tile_bounds);

    let o_stride = 16u * O_CHUNKS;
    var m_run = vec4<f32>(NEG_BIG);
    var l_run = vec4<f32>(0.0);
    var acc: array<vec4<f32>, 16>;
    for (var t = tiles.x; t < tiles.y; t++) {
        let c0 = t * BN;

        // S = Q K^T for the 64 x 64 tile, over head_dim in slices of 16.
        var s: array<vec4<f32>, 4>;
        for (var k0 = 0u; k0 < params.head_dim; k0 += BK) {
            let kk = li % BK;
            let mq = li / BK;
            let d = k0 + kk;
            var qv = vec4<f32>();
            var kv = vec4<f32>();
            if d < params.head_dim {
                for (var e = 0u; e < 4u; e++) {
                    let m = mq * 4u + e;
                    if r0 + m < q_len {
                        qv[e] = load_q(q_base + (r0 + m) * params.q_stride_s + d);
                    }
                    if c0 + m < kv_len {
                        kv[e] = load_k(k_base + (c0 + m) * params.k_stride_s + d);
                    }
                }
            }
            stage[kk * 16u + mq] = qv;
            stage[256u + kk * 16u + mq] = kv;
            workgroupBarrier();
            for (var k = 0u; k < BK; k++) {
                let a = stage[k * 16u + ty];
                let bv = stage[256u + k * 16u + tx];
                s[0] += a.x * bv;
                s[1] += a.y * bv;
                s[2] += a.z * bv;
                s[3] += a.w * bv;
            }
            workgroupBarrier();
        }

        // Mask, adjust, and the tile's row maxima.
        var allowed = 0u;
        var tile_max = vec4<f32>(NEG_BIG);
        for (var r = 0u; r < 4u; r++) {
            let i = r0 + ty * 4u + r;
            for (var c = 0u; c < 4u; c++) {
                let j = c0 + tx * 4u + c;
                if i32(j) >= lo[r] && i32(j) < hi[r] && mask_allows(b, h, i, j) {
                    let x = adjust_score(s[r][c] * params.scale, b, h, i, j);
                    s[r][c] = x;
                    tile_max[r] = max(tile_max[r], x);
                    allowed |= 1u << (r * 4u + c);
                }
            }
            red[(ty * 4u + r) * 16u + tx] = tile_max[r];
        }
        workgroupBarrier();
        var m_new = m_run;
        for (var r = 0u; r < 4u; r++) {
            let row = (ty * 4u + r) * 16u;
            for (var x = 0u; x < 16u; x++) {
                m_new[r] = max(m_new[r], red[row + x]);
            }
        }
        let corr = exp(m_run - m_new);
        m_run = m_new;

        // Probabilities: to registers for the row sums, to p_tile for P·V.
        var p: array<vec4<f32>, 4>;
        for (var r = 0u; r < 4u; r++) {
            for (var c = 0u; c < 4u; c++) {
                if (allowed & (1u << (r * 4u + c))) != 0u {
                    p[r][c] = exp(s[r][c] - m_new[r]);
                }
            }
            l_run[r] = l_run[r] * corr[r] + p[r].x + p[r].y + p[r].z + p[r].w;
            for (var c = 0u; c < O_CHUNKS; c++) {
                acc[r * 4u + c] *= corr[r];
            }
        }
        for (var c = 0u; c < 4u; c++) {
            p_tile[tx * 4u + c][ty] = vec4<f32>(p[0][c], p[1][c], p[2][c], p[3][c]);
        }

        // O += P V over the tile's keys, in slices of BKV keys of V.
        for (var kv0 = 0u; kv0 < BN; kv0 += BKV) {
            workgroupBarrier();
            let slice = BKV * o_stride;
            for (var idx = li; idx < slice; idx += 256u) {
                let vk = idx / o_stride;
                let nq = idx % o_stride;
                let key = c0 + kv0 + vk;
                var vv = vec4<f32>();
                if key < kv_len {
                    let row = v_base + key * params.v_stride_s;
                    for (var e = 0u; e < 4u; e++) {
                        let n = nq * 4u + e;
                        if n < params.v_head_dim {
                            vv[e] = load_v(row + n);
                        }
                    }
                }
                stage[idx] = vv;
            }
            workgroupBarrier();
            for (var k = 0u; k < BKV; k++) {
                let a = p_tile[kv0 + k][ty];
                for (var c = 0u; c < O_CHUNKS; c++) {
                    let bv = stage[k * o_stride + tx + 16u * c];
                    acc[c] += a.x * bv;
                    acc[4u + c] += a.y * bv;
                    acc[8u + c] += a.z * bv;
                    acc[12u + c] += a.w * bv;
                }
            }
        }
        workgroupBarrier();
    }

    // Row sums across the 16 invocations of each row, then normalise and write.
    for (var r = 0u; r < 4u; r++) {
        red[(ty * 4u + r) * 16u + tx] = l_run[r];
    }
    workgroupBarrier();
    let o_base = b * params.o_stride_b + h * params.o_stride_h;
    for (var r = 0u; r < 4u; r++) {
        let i = r0 + ty * 4u + r;
        if i >= q_len {
            break;
        }
        var l = 0.0;
        for (var x = 0u; x < 16u; x++) {
            l += red[(ty * 4u + r) * 16u + x];
        }
        let inv = select(0.0, 1.0 / l, l > 0.0);
        let row = o_base + i * params.o_stride_s;
        for (var c = 0u; c < O_CHUNKS; c++) {
            let v = acc[r * 4u + c] * inv;
            for (var e = 0u; e < 4u; e++) {
                let n = (tx + 16u * c) * 4u + e;
                if n < params.v_head_dim {
                    store_o(row + n, v[e]);
                }
            }
        }
        if tx == 0u && params.write_lse != 0u {
            var bits = NEG_INF_BITS;
            if l > 0.0 {
                bits = bitcast<u32>(m_run[r] + log(l));
            }
            lse[bh * q_len + i] = bits;
        }
    }
}
