// Decode-shaped fused attention: a few query rows (a GQA group's heads x a few queries) over
// many keys, the keys spread over the invocations.
// One workgroup: WG = TILE invocations serving ROWS rows of one kv head of one batch entry (the
// (query head, query row) pairs of its GQA group, query row fastest, as flash_attention.wgsl)
// over the key tiles of one split. Q is staged once, pre-scaled by scale * log2(e), so the
// softmax runs on exp2 throughout.
// Each key tile of TILE keys takes two steps and two barriers (three without subgroups):
// 1. scores: invocation t computes key t's score against every row (its K row read once,
//    vec4 at a time, Q broadcast from workgroup memory); the tile's row maxima come from
//    rows_max (lib/reduce_subgroup.wgsl or lib/reduce_workgroup.wgsl); the invocation keeps
//    its own running row sums and writes its probabilities to p_sh.
// 2. P·V: invocation (kh, dq) owns columns 4 dq .. 4 dq + 3 of O for every row and adds the
//    keys kh, kh + KH, ... of the tile (V read vec4 at a time, coalesced over dq).
// Row sums and the KH partial outputs are merged once, after the key loop.
// Like flash_attention.wgsl it writes the final O and log-sum-exp with one split, or each
// split's normalised partial and log-sum-exp (combine_splits.wgsl merges them); it never
// resumes an earlier dispatch (the host plans decode with one pass).
// ROWS, Q4 (vec4s of Q per row), V_LANES (invocations per key in P·V) and SH4 (vec4s of rows_sh)
// are constants of the key, written by the host.

const WG: u32 = TILE;
// Key groups of P·V.
const KH: u32 = WG / V_LANES;
const LOG2E: f32 = 1.4426950408889634;
const LN2: f32 = 0.6931471805599453;
// SCORE_FLOOR in log2 units.
const SCORE_FLOOR2: f32 = SCORE_FLOOR * LOG2E;

// Bindings (declared by the host from Kernel::slots): as flash_attention.wgsl.

// Q of the rows, pre-scaled, [row][vec4 of head_dim] (zero past head_dim and past the rows),
// during the key loop; the partial outputs of key groups 1.. KH - 1, [kh - 1][row][dq], after it.
var<workgroup> rows_sh: array<vec4<f32>, SH4>;
// The tile's probabilities, [parity][key][row], double-buffered by tile parity so that the
// next tile's scores never wait for this tile's P·V.
var<workgroup> p_sh: array<f32, 2u * TILE * ROWS>;
// Per row: key range lo, hi, query head, query row.
var<workgroup> row_info: array<vec4<i32>, ROWS>;
// The key tiles to visit, and the keys every row may see.
var<workgroup> tile_bounds: vec4<u32>;

fn p_index(par: u32, key: u32, r: u32) -> u32 {
    return (par * TILE + key) * ROWS + r;
}

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) num_wg: vec3<u32>,
    inv: ReduceInvocation,
) {
    let lid = inv.lid;
    let id = workgroup_index(wg, num_wg);
    if id >= params.groups_total {
        return;
    }
    let tm = id % params.tiles_m;
    let split = (id / params.tiles_m) % params.splits;
    let bkv = id / (params.tiles_m * params.splits);
    let b = bkv / params.kv_heads;
    let kvh = bkv % params.kv_heads;
    let k_base = b * params.k_stride_b + kvh * params.k_stride_h;
    let v_base = b * params.v_stride_b + kvh * params.v_stride_h;
    let r0 = tm * ROWS;
    let q_len = mparams.q_len;
    let kv_len = mparams.kv_len;
    let head_dim = params.head_dim;

    // The rows: key range, head and query row; Q, pre-scaled.
    if lid < ROWS {
        let pr = r0 + lid;
        let h = kvh * params.group + pr / q_len;
        let i = pr % q_len;
        var range = vec2<i32>(0, 0);
        if pr < params.packed_rows {
            range = key_range(b, i);
        }
        row_info[lid] = vec4<i32>(range.x, range.y, i32(h), i32(i));
    }
    let q_scale = params.scale * LOG2E;
    for (var idx = lid; idx < ROWS * Q4; idx += WG) {
        let r = idx / Q4;
        let d = (idx % Q4) * 4u;
        let pr = r0 + r;
        var x = vec4<f32>();
        if pr < params.packed_rows {
            let h = kvh * params.group + pr / q_len;
            let row = b * params.q_stride_b + h * params.q_stride_h + (pr % q_len) * params.q_stride_s;
            for (var e = 0u; e < 4u; e++) {
                if d + e < head_dim {
                    x[e] = load_q(row + d + e) * q_scale;
                }
            }
        }
        rows_sh[idx] = x;
    }
    workgroupBarrier();
    if lid == 0u {
        // The union of the rows' key ranges (the tiles to visit) and their intersection (the
        // keys no range restriction touches).
        var t_lo = i32(kv_len);
        var t_hi = 0;
        var in_lo = 0;
        var in_hi = i32(kv_len);
        for (var r = 0u; r < ROWS && r0 + r < params.packed_rows; r++) {
            let range = row_info[r].xy;
            if range.y > range.x {
                t_lo = min(t_lo, range.x);
                t_hi = max(t_hi, range.y);
            }
            in_lo = max(in_lo, range.x);
            in_hi = min(in_hi, range.y);
        }
        let first = params.first_tile + split * params.tiles_per_split;
        var bounds = vec4<u32>(0u, 0u, 0u, 0u);
        if t_hi > t_lo {
            bounds.x = max(u32(t_lo) / TILE, first);
            bounds.y = min((u32(t_hi) + TILE - 1u) / TILE, first + params.tiles_per_split);
        }
        if in_hi > in_lo {
            bounds.z = u32(in_lo);
            bounds.w = u32(in_hi);
        }
        tile_bounds = bounds;
    }
    let bounds = workgroupUniformLoad(&tile_bounds);

    // P·V: this invocation's key group and columns.
    let kh = lid / V_LANES;
    let dq = lid % V_LANES;
    let col = dq * 4u;
    let v_dim = params.v_head_dim;
    let full_quads = head_dim / 4u;

    var m_run: array<f32, ROWS>;
    var l_run: array<f32, ROWS>;
    var acc: array<vec4<f32>, ROWS>;
    for (var r = 0u; r < ROWS; r++) {
        m_run[r] = NEG_BIG;
    }
    for (var t = bounds.x; t < bounds.y; t++) {
        let c0 = t * TILE;
        let par = t & 1u;
        let j = c0 + lid;

        // Scores of key j against every row (log2 units).
        var s: array<f32, ROWS>;
        if j < kv_len {
            let krow = k_base + j * params.k_stride_s;
            for (var d4 = 0u; d4 < full_quads; d4++) {
                let kv = load4_k(krow + d4 * 4u);
                for (var r = 0u; r < ROWS; r++) {
                    s[r] += dot(rows_sh[r * Q4 + d4], kv);
                }
            }
            for (var d = full_quads * 4u; d < head_dim; d++) {
                let kd = load_k(krow + d);
                for (var r = 0u; r < ROWS; r++) {
                    s[r] += rows_sh[r * Q4 + full_quads][d % 4u] * kd;
                }
            }
        }
        // Mask and adjust. A tile inside every row's key range, with no per-key option, is
        // only floored.
        var allowed = 0u;
        let untouched = !per_key_options() && c0 >= bounds.z && c0 + TILE <= bounds.w;
        if untouched {
            allowed = (1u << ROWS) - 1u;
            for (var r = 0u; r < ROWS; r++) {
                s[r] = max(s[r], SCORE_FLOOR2);
            }
        } else {
            for (var r = 0u; r < ROWS; r++) {
                let info = row_info[r];
                if i32(j) >= info.x && i32(j) < info.y && mask_allows(b, u32(info.z), u32(info.w), j) {
                    if per_key_options() {
                        s[r] = adjust_score(s[r] * LN2, b, u32(info.z), u32(info.w), j) * LOG2E;
                    } else {
                        s[r] = max(s[r], SCORE_FLOOR2);
                    }
                    allowed |= 1u << r;
                } else {
                    s[r] = NEG_BIG;
                }
            }
        }
        let tile_max = rows_max(s, par, inv);
        var corr: array<f32, ROWS>;
        for (var r = 0u; r < ROWS; r++) {
            let m_new = max(m_run[r], tile_max[r]);
            corr[r] = exp2(m_run[r] - m_new);
            m_run[r] = m_new;
            var p = 0.0;
            if (allowed & (1u << r)) != 0u {
                p = exp2(s[r] - m_new);
            }
            l_run[r] = l_run[r] * corr[r] + p;
            p_sh[p_index(par, lid, r)] = p;
            acc[r] *= corr[r];
        }
        workgroupBarrier();

        // O += P V over this invocation's keys of the tile.
        let keys = min(TILE, kv_len - c0);
        if col < v_dim {
            for (var key = kh; key < keys; key += KH) {
                let vrow = v_base + (c0 + key) * params.v_stride_s + col;
                var vv: vec4<f32>;
                if col + 4u <= v_dim {
                    vv = load4_v(vrow);
                } else {
                    for (var e = 0u; col + e < v_dim; e++) {
                        vv[e] = load_v(vrow + e);
                    }
                }
                for (var r = 0u; r < ROWS; r++) {
                    acc[r] += p_sh[p_index(par, key, r)] * vv;
                }
            }
        }
    }

    // Merge the invocations: row sums through p_sh, partial outputs through rows_sh.
    workgroupBarrier();
    for (var r = 0u; r < ROWS; r++) {
        p_sh[p_index(0u, lid, r)] = l_run[r];
        if kh > 0u {
            rows_sh[((kh - 1u) * ROWS + r) * V_LANES + dq] = acc[r];
        }
    }
    workgroupBarrier();
    if kh != 0u || col >= v_dim {
        return;
    }
    let bh_count = mparams.batch * params.heads;
    for (var r = 0u; r < ROWS && r0 + r < params.packed_rows; r++) {
        let info = row_info[r];
        let h = u32(info.z);
        let i = u32(info.w);
        let bh = b * params.heads + h;
        var l = 0.0;
        for (var x = 0u; x < WG; x++) {
            l += p_sh[p_index(0u, x, r)];
        }
        var o = acc[r];
        for (var g = 1u; g < KH; g++) {
            o += rows_sh[((g - 1u) * ROWS + r) * V_LANES + dq];
        }
        o *= select(0.0, 1.0 / l, l > 0.0);
        let lse = lse_of(m_run[r] * LN2, l);
        var dst: u32;
        if params.splits == 1u {
            dst = b * params.o_stride_b + h * params.o_stride_h + i * params.o_stride_s + col;
            if dq == 0u && params.write_lse != 0u {
                lse_or_partials[bh * q_len + i] = lse;
            }
        } else {
            let part_row = (split * bh_count + bh) * q_len + i;
            dst = part_row * v_dim + col;
            if dq == 0u {
                lse_or_partials[params.parts_lse_offset + part_row] = lse;
            }
        }
        for (var e = 0u; e < 4u && col + e < v_dim; e++) {
            if params.splits == 1u {
                store_o(dst + e, o[e]);
            } else {
                lse_or_partials[dst + e] = bitcast<u32>(o[e]);
            }
        }
    }
}
