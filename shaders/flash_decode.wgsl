// Decode-shaped fused attention: a few query rows (a GQA group's heads x a few queries) over
// many keys, the keys spread over the invocations.
// One workgroup: WG invocations (16, 32 or 64) serving ROWS rows of one kv head of one batch
// entry (the (query head, query row) pairs of its GQA group, query row fastest, as
// flash_attention.wgsl) over the key tiles of one split. Q is staged once, pre-scaled by
// scale * log2(e), so the softmax runs on exp2 throughout.
// Each key tile of TILE keys takes two steps and two barriers (three without subgroups):
// 1. scores: invocation x computes the scores of keys x, x + WG, ... (KPT = TILE / WG keys)
//    against every row, each K row read once, 4 or 8 elements a load, each vec4 of Q read from
//    workgroup memory once for its KPT keys; the tile's row maxima come from rows_max
//    (lib/reduce_subgroup.wgsl or lib/reduce_workgroup.wgsl); the invocation keeps its own
//    running row sums and writes its probabilities to p_sh.
// 2. P·V: invocation (kh, dq) owns the columns 4 (dq + V_LANES c) .. + 3 of O (c < CPL) for
//    every row, and adds the keys kh, kh + KH, ... of the tile (V read vec4 at a time,
//    coalesced over dq).
// Row sums and the KH partial outputs are merged once, after the key loop.
// Like flash_attention.wgsl it writes the final O and log-sum-exp with one split, or each
// split's normalised partial and log-sum-exp (combine_splits.wgsl merges them); it never
// resumes an earlier dispatch (the host plans decode with one pass).
// WG, ROWS, Q4 (vec4s of Q per row), V_LANES (invocations per key in P·V), CPL (vec4 columns
// per invocation) and SH4 (vec4s of rows_sh) are constants of the key, written by the host.

// Keys per invocation in the score step.
const KPT: u32 = TILE / WG;
// Key groups of P·V.
const KH: u32 = WG / V_LANES;
// Rows in vec4s.
const R4: u32 = (ROWS + 3u) / 4u;

// Bindings (declared by the host from Kernel::slots): as flash_attention.wgsl.

// Q of the rows, pre-scaled, [row][vec4 of head_dim] (zero past head_dim and past the rows),
// during the key loop; the partial outputs of key groups 1 .. KH - 1, [kh - 1][row][c][dq],
// after it.
var<workgroup> rows_sh: array<vec4<f32>, SH4>;
// The tile's probabilities, [parity][key][row / 4], double-buffered by tile parity so that the
// next tile's scores never wait for this tile's P·V.
var<workgroup> p_sh: array<vec4<f32>, 2u * TILE * R4>;
// Per row: key range lo, hi, query head, query row.
var<workgroup> row_info: array<vec4<i32>, ROWS>;
// Per row: the end of its sink keys (lib/masking.wgsl; 0 without HAS_SINK_KEYS).
var<workgroup> row_sink: array<i32, ROWS>;
// Paged K/V: the pool rows of the tile's keys, [parity][key], looked up once per key by the
// score step for P·V (which would otherwise look each up once per column group).
var<workgroup> slot_sh: array<u32, 2u * TILE>;
// The key tiles to visit, and the keys every row may see.
var<workgroup> tile_bounds: vec4<u32>;
// Key tiles between every row's sink keys and its window, skipped.
var<workgroup> hole_tiles: vec2<u32>;
// One past the last key any row may see: P·V stops there, so V rows past every row's range
// (past kv_lens, say, which may hold anything) are never read.
var<workgroup> key_end: u32;

// The vec4 of p_sh holding rows 4 q .. 4 q + 3 of `key`.
fn p_index(par: u32, key: u32, q: u32) -> u32 {
    return (par * TILE + key) * R4 + q;
}

// `v` of every row, as R4 vec4s (rows past ROWS are 0).
fn rows_vec4(v: array<f32, ROWS>) -> array<vec4<f32>, R4> {
    var out = array<vec4<f32>, R4>();
    for (var r = 0u; r < ROWS; r++) {
        out[r / 4u][r % 4u] = v[r];
    }
    return out;
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
    for (var r = lid; r < ROWS; r += WG) {
        let pr = r0 + r;
        let h = kvh * params.group + pr / q_len;
        let i = pr % q_len;
        var range = vec2<i32>(0, 0);
        var se = 0;
        if pr < params.packed_rows {
            range = key_range(b, i);
            se = sink_end(b, i);
        }
        row_info[r] = vec4<i32>(range.x, range.y, i32(h), i32(i));
        row_sink[r] = se;
    }
    let q_scale = params.scale * LOG2E;
    for (var idx = lid; idx < ROWS * Q4; idx += WG) {
        let r = idx / Q4;
        let d = (idx % Q4) * 4u;
        let pr = r0 + r;
        var x = vec4<f32>();
        if pr < params.packed_rows && row_is_real(b, pr % q_len) {
            let h = kvh * params.group + pr / q_len;
            let row = b * params.q_stride_b + h * params.q_stride_h
                + q_slot(b, pr % q_len) * params.q_stride_s;
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
        // This split's share of the key tiles, and the keys every row may see.
        var hull = range_hull_new(kv_len);
        for (var r = 0u; r < ROWS && r0 + r < params.packed_rows; r++) {
            hull = range_hull_add(hull, row_info[r].xy, row_sink[r]);
        }
        let first = params.first_tile + split * params.tiles_per_split;
        let bounds = range_hull_bounds(hull, first, params.tiles_per_split);
        key_end = u32(max(hull.union_hi, 0));
        tile_bounds = bounds;
        hole_tiles = range_hull_hole_tiles(hull);
    }
    let bounds = workgroupUniformLoad(&tile_bounds);
    var hole = vec2<u32>(0u, 0u);
    if HAS_SINK_KEYS {
        hole = workgroupUniformLoad(&hole_tiles);
    }

    // P·V: this invocation's key group and columns.
    let kh = lid / V_LANES;
    let dq = lid % V_LANES;
    let v_dim = params.v_head_dim;
    // K in groups of 4 K_G4 elements (one load each, lib prelude), then the last few alone.
    let k_groups = head_dim / (4u * K_G4);

    // ALiBi's per-row values (lib/masking.wgsl).
    var alibi = array<AlibiRow, ROWS>();
    // Dropout's per-row state (lib/masking.wgsl).
    var drow = array<vec2<u32>, ROWS>();
    if HAS_DROPOUT {
        for (var r = 0u; r < ROWS; r++) {
            let info = row_info[r];
            drow[r] = dropout_row(b * params.heads + u32(info.z), u32(info.w));
        }
    }
    if HAS_ALIBI {
        for (var r = 0u; r < ROWS; r++) {
            let info = row_info[r];
            alibi[r] = alibi_row(b, u32(info.z), u32(info.w));
        }
    }
    var m_run = array<f32, ROWS>();
    var l_run = array<f32, ROWS>();
    // [c][row]: columns 4 (dq + V_LANES c) .. + 3 of each row.
    var acc = array<array<vec4<f32>, ROWS>, CPL>();
    for (var r = 0u; r < ROWS; r++) {
        m_run[r] = NEG_BIG;
    }
    // Tiles visited so far: their parity double-buffers p_sh and slot_sh, which requires it to
    // alternate from one visited tile to the next, also across the skipped hole (t's parity
    // would not: two visited tiles could share it, and a fast invocation overwrite what a slow
    // one still reads).
    var visited = 0u;
    for (var t = bounds.x; t < bounds.y; t++) {
        if HAS_SINK_KEYS && t >= hole.x && t < hole.y {
            // No row sees these keys: on to the window.
            t = hole.y;
            if t >= bounds.y {
                break;
            }
        }
        let c0 = t * TILE;
        let par = visited & 1u;
        visited++;

        // Scores of keys c0 + lid + WG k against every row (log2 units).
        var s = array<array<f32, ROWS>, KPT>();
        var krow = array<u32, KPT>();
        for (var k = 0u; k < KPT; k++) {
            // Keys past the end read key 0; their scores are masked below.
            let j = c0 + lid + WG * k;
            // Keys past the end read key 0 (a packed batch's: its own last key).
            var slot = key_slot(b, select(0u, j, j < kv_len));
            if HAS_VARLEN {
                slot = key_slot(b, min(j, max(seq_kv_len(b), 1u) - 1u));
            }
            krow[k] = k_base + slot * params.k_stride_s;
            if HAS_PAGES || HAS_VARLEN {
                slot_sh[par * TILE + lid + WG * k] = slot;
            }
        }
        for (var dg = 0u; dg < k_groups; dg++) {
            var kv = array<array<vec4<f32>, K_G4>, KPT>();
            for (var k = 0u; k < KPT; k++) {
                kv[k] = loadg_k(krow[k] + dg * 4u * K_G4);
            }
            for (var r = 0u; r < ROWS; r++) {
                for (var g = 0u; g < K_G4; g++) {
                    let q = rows_sh[r * Q4 + dg * K_G4 + g];
                    for (var k = 0u; k < KPT; k++) {
                        s[k][r] += dot(q, kv[k][g]);
                    }
                }
            }
        }
        for (var d = k_groups * 4u * K_G4; d < head_dim; d++) {
            for (var k = 0u; k < KPT; k++) {
                let kd = load_k(krow[k] + d);
                for (var r = 0u; r < ROWS; r++) {
                    s[k][r] += rows_sh[r * Q4 + d / 4u][d % 4u] * kd;
                }
            }
        }
        // Mask and adjust, and this invocation's maxima. A tile inside every row's key range,
        // with no per-key option, is only floored.
        var allowed = array<u32, KPT>();
        var own_max = array<f32, ROWS>();
        for (var r = 0u; r < ROWS; r++) {
            own_max[r] = NEG_BIG;
        }
        let untouched = !per_key_options() && c0 >= bounds.z && c0 + TILE <= bounds.w;
        for (var k = 0u; k < KPT; k++) {
            let j = c0 + lid + WG * k;
            if untouched {
                allowed[k] = (1u << ROWS) - 1u;
                for (var r = 0u; r < ROWS; r++) {
                    s[k][r] = max(s[k][r], SCORE_FLOOR2);
                }
            } else {
                for (var r = 0u; r < ROWS; r++) {
                    let info = row_info[r];
                    let h = u32(info.z);
                    let i = u32(info.w);
                    if in_keys(j, info.x, info.y, row_sink[r]) && mask_allows(b, h, i, j) {
                        if per_key_options() {
                            s[k][r] = adjust_score_with(s[k][r] * LN2, b, h, i, j, alibi[r]) * LOG2E;
                        } else {
                            s[k][r] = max(s[k][r], SCORE_FLOOR2);
                        }
                        allowed[k] |= 1u << r;
                    } else {
                        s[k][r] = NEG_BIG;
                    }
                }
            }
            for (var r = 0u; r < ROWS; r++) {
                own_max[r] = max(own_max[r], s[k][r]);
            }
        }
        let tile_max = rows_max(own_max, par, inv);
        var corr = array<f32, ROWS>();
        for (var r = 0u; r < ROWS; r++) {
            let m_new = max(m_run[r], tile_max[r]);
            corr[r] = exp2(m_run[r] - m_new);
            m_run[r] = m_new;
            l_run[r] *= corr[r];
        }
        for (var k = 0u; k < KPT; k++) {
            var p = array<f32, ROWS>();
            for (var r = 0u; r < ROWS; r++) {
                if (allowed[k] & (1u << r)) != 0u {
                    p[r] = exp2(s[k][r] - m_run[r]);
                }
                l_run[r] += p[r];
                // The row sums count every weight; P·V only the kept ones (scaled at the end).
                if HAS_DROPOUT && !dropout_keeps(drow[r], c0 + lid + WG * k) {
                    p[r] = 0.0;
                }
            }
            let p4 = rows_vec4(p);
            for (var q = 0u; q < R4; q++) {
                p_sh[p_index(par, lid + WG * k, q)] = p4[q];
            }
        }
        for (var c = 0u; c < CPL; c++) {
            for (var r = 0u; r < ROWS; r++) {
                acc[c][r] *= corr[r];
            }
        }
        workgroupBarrier();

        // O += P V over this invocation's keys of the tile.
        let keys = min(TILE, key_end - c0);
        for (var key = kh; key < keys; key += KH) {
            var pk = array<vec4<f32>, R4>();
            for (var q = 0u; q < R4; q++) {
                pk[q] = p_sh[p_index(par, key, q)];
            }
            var vrow = v_base + (c0 + key) * params.v_stride_s;
            if HAS_PAGES || HAS_VARLEN {
                vrow = v_base + slot_sh[par * TILE + key] * params.v_stride_s;
            }
            for (var c = 0u; c < CPL; c++) {
                let col = (dq + V_LANES * c) * 4u;
                // No loop for the last partial vec4: a loop in this body would keep the loop
                // over c from being unrolled, and acc from staying in registers.
                var vv = vec4<f32>();
                if col + 4u <= v_dim {
                    vv = load4_v(vrow + col);
                } else if col < v_dim {
                    vv.x = load_v(vrow + col);
                    if col + 1u < v_dim {
                        vv.y = load_v(vrow + col + 1u);
                    }
                    if col + 2u < v_dim {
                        vv.z = load_v(vrow + col + 2u);
                    }
                }
                for (var r = 0u; r < ROWS; r++) {
                    acc[c][r] += pk[r / 4u][r % 4u] * vv;
                }
            }
        }
    }

    // Merge the invocations: row sums through p_sh, partial outputs through rows_sh.
    workgroupBarrier();
    let l4 = rows_vec4(l_run);
    for (var q = 0u; q < R4; q++) {
        p_sh[p_index(0u, lid, q)] = l4[q];
    }
    if kh > 0u {
        for (var c = 0u; c < CPL; c++) {
            for (var r = 0u; r < ROWS; r++) {
                rows_sh[(((kh - 1u) * ROWS + r) * CPL + c) * V_LANES + dq] = acc[c][r];
            }
        }
    }
    workgroupBarrier();
    if kh != 0u {
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
            l += p_sh[p_index(0u, x, r / 4u)][r % 4u];
        }
        var norm = select(0.0, 1.0 / l, l > 0.0) * dropout_row_scale() * mparams.v_scale;
        var lse = lse_of(m_run[r] * LN2, l);
        if HAS_SINKS && params.splits == 1u {
            // The sink joins as a part with no output (with splits, the merge adds it).
            let sum = lse_add(lse_add(LseSum(0.0, 0.0), lse), sink_bits(h));
            norm *= lse_weight(sum, lse);
            lse = lse_total(sum);
        }
        var dst = 0u;
        if params.splits == 1u {
            dst = b * params.o_stride_b + h * params.o_stride_h + q_slot(b, i) * params.o_stride_s;
            if dq == 0u && params.write_lse != 0u {
                lse_or_partials[bh * q_len + i] = lse;
            }
        } else {
            let part_row = (split * bh_count + bh) * q_len + i;
            dst = part_row * v_dim;
            if dq == 0u {
                lse_or_partials[params.parts_lse_offset + part_row] = lse;
            }
        }
        for (var c = 0u; c < CPL; c++) {
            let col = (dq + V_LANES * c) * 4u;
            var o = acc[c][r];
            for (var g = 1u; g < KH; g++) {
                o += rows_sh[(((g - 1u) * ROWS + r) * CPL + c) * V_LANES + dq];
            }
            o *= norm;
            for (var e = 0u; e < 4u && col + e < v_dim; e++) {
                if params.splits == 1u {
                    // Not past a packed sequence's rows (the next sequence's).
                    if row_is_real(b, i) {
                        store_o(dst + col + e, o[e]);
                    }
                } else {
                    lse_or_partials[dst + col + e] = bitcast<u32>(o[e]);
                }
            }
        }
    }
}
