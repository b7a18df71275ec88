// Fused attention (flash attention, forward): scores, masked online softmax and P·V in one
// pass; the score matrix never leaves the workgroup.
// One workgroup: 64 query rows that share one kv head of one batch entry, streaming the keys
// of its split that its rows may see in tiles of 64 (tiles that causal, window or length masks
// remove entirely are never visited). The rows are the (query head in the group, query row)
// pairs of the kv head, query row fastest: for decoding, the whole GQA group shares each K/V
// tile.
// One invocation: a 4 x 4 block of each score tile, and 4 rows x 4 * O_CHUNKS columns of O,
// accumulated in registers with the running row maximum and sum.
// With one split, O and the log-sum-exp are final. With several (flash-decoding), each split
// writes its normalised partial O and log-sum-exp to `parts`, and combine_splits.wgsl merges.
// Q, K, V and O go through the dtype prelude's load_* / store_o; masking through
// attention_mask.wgsl.

// ceil(v_head_dim / 64): the columns of O each invocation owns are tx * 4 + 64 * c + 0..3.
override O_CHUNKS: u32 = 1u;
// Keys per slice of V staged at once: the slice holds BKV * 16 * O_CHUNKS vec4s <= 512.
override BKV: u32 = 32u;

struct Params {
    heads: u32,
    kv_heads: u32,
    group: u32,
    // group * q_len: the rows one kv head serves.
    packed_rows: u32,
    tiles_m: u32,
    splits: u32,
    tiles_per_split: u32,
    groups_total: u32,
    head_dim: u32,
    v_head_dim: u32,
    write_lse: u32,
    scale: f32,
    // Offset of the partial log-sum-exps in the aux buffer, in elements.
    parts_lse_offset: u32,
    // First key tile of this dispatch (of split 0).
    first_tile: u32,
    // Nonzero when an earlier dispatch covered earlier key tiles: merge with its O and
    // log-sum-exp instead of overwriting them.
    resume: u32,
    _pad0: u32,
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
// One split: the log-sum-exp as f32 bits, [batch, heads, q_len]. Several: the partial outputs
// as f32 bits, [split, batch, heads, q_len, v_head_dim], then from parts_lse_offset the
// partial log-sum-exps, [split, batch, heads, q_len].
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
    // Query tiles fastest, so the workgroups reading the same keys run together; the heaviest
    // tiles (last under causal masking) first, for load balance.
    let tm = params.tiles_m - 1u - id % params.tiles_m;
    let split = (id / params.tiles_m) % params.splits;
    let bkv = id / (params.tiles_m * params.splits);
    let b = bkv / params.kv_heads;
    let kvh = bkv % params.kv_heads;
    let k_base = b * params.k_stride_b + kvh * params.k_stride_h;
    let v_base = b * params.v_stride_b + kvh * params.v_stride_h;
    let r0 = tm * BM;
    let tx = lid.x;
    let ty = lid.y;
    let q_len = mparams.q_len;
    let kv_len = mparams.kv_len;

    // This invocation's four rows: query head, query row, key range.
    var row_h: array<u32, 4>;
    var row_i: array<u32, 4>;
    var lo: array<i32, 4>;
    var hi: array<i32, 4>;
    // The four rows this invocation stages Q for: rows mq * 4 + e of the tile.
    var q_row: array<u32, 4>;
    let mq = li / BK;
    for (var r = 0u; r < 4u; r++) {
        let pr = r0 + ty * 4u + r;
        let g = pr / q_len;
        row_h[r] = kvh * params.group + g;
        row_i[r] = pr % q_len;
        var range = vec2<i32>(0, 0);
        if pr < params.packed_rows {
            range = key_range(b, row_i[r]);
        }
        lo[r] = range.x;
        hi[r] = range.y;
        let sr = r0 + mq * 4u + r;
        let sh = kvh * params.group + sr / q_len;
        q_row[r] = b * params.q_stride_b + sh * params.q_stride_h + (sr % q_len) * params.q_stride_s;
    }
    if li == 0u {
        var t_lo = i32(kv_len);
        var t_hi = 0;
        for (var m = 0u; m < BM && r0 + m < params.packed_rows; m++) {
            let range = key_range(b, (r0 + m) % q_len);
            if range.y > range.x {
                t_lo = min(t_lo, range.x);
                t_hi = max(t_hi, range.y);
            }
        }
        // This split's (or this dispatch's) share of the key tiles.
        let first = params.first_tile + split * params.tiles_per_split;
        var bounds = vec2<u32>(0u, 0u);
        if t_hi > t_lo {
            bounds = vec2<u32>(
                max(u32(t_lo) / BN, first),
                min((u32(t_hi) + BN - 1u) / BN, first + params.tiles_per_split),
            );
        }
        tile_bounds = bounds;
    }
    let tiles = workgroupUniformLoad(&tile_bounds);

    let o_stride = 16u * O_CHUNKS;
    // Whether any of this invocation's rows is real. A tile of 64 rows serving a GQA group of
    // a few queries (decoding) is mostly padding: those invocations skip the products (no
    // barrier inside them), so whole warps idle instead of computing rows nobody reads.
    let rows_live = r0 + ty * 4u < params.packed_rows;
    var m_run = vec4<f32>(NEG_BIG);
    var l_run = vec4<f32>(0.0);
    var acc: array<vec4<f32>, 16>;
    for (var t = tiles.x; t < tiles.y; t++) {
        let c0 = t * BN;

        // S = Q K^T for the 64 x 64 tile, over head_dim in slices of 16.
        var s: array<vec4<f32>, 4>;
        for (var k0 = 0u; k0 < params.head_dim; k0 += BK) {
            let kk = li % BK;
            let d = k0 + kk;
            var qv = vec4<f32>();
            var kv = vec4<f32>();
            if d < params.head_dim {
                for (var e = 0u; e < 4u; e++) {
                    let m = mq * 4u + e;
                    if r0 + m < params.packed_rows {
                        qv[e] = load_q(q_row[e] + d);
                    }
                    if c0 + m < kv_len {
                        kv[e] = load_k(k_base + (c0 + m) * params.k_stride_s + d);
                    }
                }
            }
            stage[kk * 16u + mq] = qv;
            stage[256u + kk * 16u + mq] = kv;
            workgroupBarrier();
            if rows_live {
                for (var k = 0u; k < BK; k++) {
                    let a = stage[k * 16u + ty];
                    let bv = stage[256u + k * 16u + tx];
                    s[0] += a.x * bv;
                    s[1] += a.y * bv;
                    s[2] += a.z * bv;
                    s[3] += a.w * bv;
                }
            }
            workgroupBarrier();
        }

        // Mask, adjust, and the tile's row maxima.
        var allowed = 0u;
        var tile_max = vec4<f32>(NEG_BIG);
        for (var r = 0u; r < 4u; r++) {
            let h = row_h[r];
            let i = row_i[r];
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
            if rows_live {
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
        }
        workgroupBarrier();
    }

    // Row sums across the 16 invocations of each row, then normalise and write.
    for (var r = 0u; r < 4u; r++) {
        red[(ty * 4u + r) * 16u + tx] = l_run[r];
    }
    workgroupBarrier();
    // Resuming: the log-sum-exp of the earlier dispatches, read by every invocation of a row
    // before the barrier, after which one of them overwrites it.
    var prev_lse = array<u32, 4>(NEG_INF_BITS, NEG_INF_BITS, NEG_INF_BITS, NEG_INF_BITS);
    if params.resume != 0u {
        for (var r = 0u; r < 4u; r++) {
            if r0 + ty * 4u + r < params.packed_rows {
                prev_lse[r] = lse[(b * params.heads + row_h[r]) * q_len + row_i[r]];
            }
        }
    }
    workgroupBarrier();

    let bh_count = mparams.batch * params.heads;
    for (var r = 0u; r < 4u; r++) {
        if r0 + ty * 4u + r >= params.packed_rows {
            break;
        }
        let h = row_h[r];
        let i = row_i[r];
        let bh = b * params.heads + h;
        var l = 0.0;
        for (var x = 0u; x < 16u; x++) {
            l += red[(ty * 4u + r) * 16u + x];
        }
        let inv = select(0.0, 1.0 / l, l > 0.0);
        var lse_bits = NEG_INF_BITS;
        if l > 0.0 {
            lse_bits = bitcast<u32>(m_run[r] + log(l));
        }
        if params.splits == 1u {
            // Weights of the earlier dispatches' O and of this one's, by log-sum-exp.
            var w_prev = 0.0;
            var w_new = 1.0;
            if prev_lse[r] != NEG_INF_BITS {
                let lp = bitcast<f32>(prev_lse[r]);
                if l > 0.0 {
                    let ln = m_run[r] + log(l);
                    let top = max(lp, ln);
                    let ep = exp(lp - top);
                    let en = exp(ln - top);
                    w_prev = ep / (ep + en);
                    w_new = en / (ep + en);
                    lse_bits = bitcast<u32>(top + log(ep + en));
                } else {
                    w_prev = 1.0;
                    w_new = 0.0;
                    lse_bits = prev_lse[r];
                }
            }
            let row = b * params.o_stride_b + h * params.o_stride_h + i * params.o_stride_s;
            for (var c = 0u; c < O_CHUNKS; c++) {
                let v = acc[r * 4u + c] * (inv * w_new);
                for (var e = 0u; e < 4u; e++) {
                    let n = (tx + 16u * c) * 4u + e;
                    if n < params.v_head_dim {
                        var x = v[e];
                        // Never read O unless it was written: a fresh output may hold anything.
                        if w_prev > 0.0 {
                            x += w_prev * load_o(row + n);
                        }
                        store_o(row + n, x);
                    }
                }
            }
            if tx == 0u && params.write_lse != 0u {
                lse[bh * q_len + i] = lse_bits;
            }
        } else {
            let part_row = (split * bh_count + bh) * q_len + i;
            let row = part_row * params.v_head_dim;
            for (var c = 0u; c < O_CHUNKS; c++) {
                let v = acc[r * 4u + c] * inv;
                for (var e = 0u; e < 4u; e++) {
                    let n = (tx + 16u * c) * 4u + e;
                    if n < params.v_head_dim {
                        lse[row + n] = bitcast<u32>(v[e]);
                    }
                }
            }
            if tx == 0u {
                lse[params.parts_lse_offset + part_row] = lse_bits;
            }
        }
    }
}
