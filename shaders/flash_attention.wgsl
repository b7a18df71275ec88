// Fused attention (flash attention, forward): scores, masked online softmax and P·V in one
// pass; the score matrix never leaves the workgroup.
// One workgroup: TILE_M query rows (64; 4 to 32 when decoding a few rows) that share one kv
// head of one batch entry, streaming the keys of its split that its rows may see in tiles of
// TILE (tiles that causal, window or length masks remove entirely are never visited). The rows are the (query head in the group, query row)
// pairs of the kv head, query row fastest: for decoding, the whole GQA group shares each K/V
// tile.
// One invocation: a 4 x 4 block of each score tile (lib/tile_gemm.wgsl), and 4 rows x
// 4 * O_CHUNKS columns of O, accumulated in registers with the running row maximum and sum.
// The masking options are compiled in (lib/masking.wgsl); a key tile inside every row's key
// range, on a call without per-key options, is only floored (Q is pre-scaled by scale * log2(e); the softmax runs on exp2).
// With one split, O and the log-sum-exp are final. With several (flash-decoding), each split
// writes its normalised partial O and log-sum-exp to `lse_or_partials`, and
// combine_splits.wgsl merges them. Q, K, V and O go through the dtype prelude's load_* /
// store_o. TILE (keys per tile) and TILE_K come from the host; TILE_M is a pipeline constant.

// ceil(v_head_dim / 64): the columns of O each invocation owns are tx * 4 + 64 * c + 0..3.
override O_CHUNKS: u32 = 1u;
// Keys per slice of V staged at once: the slice holds BKV * TILE_X * O_CHUNKS vec4s, at most
// the 2 * STAGE_B of tile_stage.
override BKV: u32 = 32u;

// Bindings (declared by the host from Kernel::slots): params (FlashParams); q, k, v (read) and
// o (write) tensors; bias, mask, lens and mparams (lib/masking.wgsl); lse_or_partials: with
// one split, the log-sum-exp as f32 bits, [batch, heads, q_len]; with several, the partial
// outputs as f32 bits, [split, batch, heads, q_len, v_head_dim], then from parts_lse_offset
// the partial log-sum-exps, [split, batch, heads, q_len].

// The tile's probabilities, [key][row / 4].
var<workgroup> p_tile: array<array<vec4<f32>, TILE_X>, TILE>;
// Row reductions across the TILE_X invocations that share rows: [row][tx / 4][tx % 4], read a
// vec4 at a time (on llvmpipe every load costs about the same whatever its width).
var<workgroup> red: array<vec4<f32>, TILE * TILE_X / 4u>;

// The reduction slot of row `row` (of the tile) for invocation column tx.
fn red_put(row: u32, tx: u32, x: f32) {
    red[row * (TILE_X / 4u) + tx / 4u][tx % 4u] = x;
}

// The TILE_X values of row `row`, as vec4s.
fn red_row(row: u32, q: u32) -> vec4<f32> {
    return red[row * (TILE_X / 4u) + q];
}
// The key tiles this workgroup visits, and the keys every one of its rows may see.
var<workgroup> tile_bounds: vec4<u32>;
// One past the last key any row may see: V rows from there on are staged as zeros, so rows
// past kv_lens (which may hold anything, NaN included) never reach O.
var<workgroup> key_end: u32;

// The score tile's operands (lib/tile_gemm.wgsl): the Q rows this invocation stages (rows
// 4 (li / TILE_K) + e of the tile, e = row % 4); k_base, the kv head's first key.
var<private> q_row: array<u32, 4>;
var<private> k_base: u32;

// Q pre-scaled by scale * log2(e): the scores come out in log2 units, and the softmax runs on
// exp2 (no multiply per score).
fn tile_a(row: u32, d: u32) -> f32 {
    if r0 + row < params.packed_rows && d < params.head_dim {
        return load_q(q_row[row % 4u] + d) * (params.scale * LOG2E);
    }
    return 0.0;
}

fn tile_b(col: u32, d: u32) -> f32 {
    if c0 + col < mparams.kv_len && d < params.head_dim {
        return load_k(k_base + (c0 + col) * params.k_stride_s + d);
    }
    return 0.0;
}

@compute @workgroup_size(TILE_X, TILE_M / 4u)
fn main(inv: TileInvocation) {
    let lid = inv.lid;
    let li = inv.li;
    let id = workgroup_index(inv.wg, inv.num_wg);
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
    k_base = b * params.k_stride_b + kvh * params.k_stride_h;
    let v_base = b * params.v_stride_b + kvh * params.v_stride_h;
    r0 = tm * TILE_M;
    let tx = lid.x;
    let ty = lid.y;
    let q_len = mparams.q_len;
    let kv_len = mparams.kv_len;

    // This invocation's four rows: query head, query row, key range.
    var row_h: array<u32, 4>;
    var row_i: array<u32, 4>;
    var lo: array<i32, 4>;
    var hi: array<i32, 4>;
    let mq = li / TILE_K;
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
        // This split's (or this dispatch's) share of the key tiles, and the keys every row may
        // see.
        var hull = range_hull_new(kv_len);
        for (var m = 0u; m < TILE_M && r0 + m < params.packed_rows; m++) {
            hull = range_hull_add(hull, key_range(b, (r0 + m) % q_len));
        }
        let first = params.first_tile + split * params.tiles_per_split;
        let bounds = range_hull_bounds(hull, first, params.tiles_per_split);
        tile_bounds = bounds;
        key_end = u32(max(hull.union_hi, 0));
    }
    let bounds = workgroupUniformLoad(&tile_bounds);

    let o_stride = TILE_X * O_CHUNKS;
    // Whether any of this invocation's rows is real. A tile of 64 rows serving a GQA group of
    // a few queries (decoding) is mostly padding: those invocations skip the products (no
    // barrier inside them), so whole warps idle instead of computing rows nobody reads.
    let rows_live = r0 + ty * 4u < params.packed_rows;
    var m_run = vec4<f32>(NEG_BIG);
    var l_run = vec4<f32>(0.0);
    // [chunk][row]: four columns of one row of each 64-column chunk of O.
    var acc: array<Block, 4>;
    for (var t = bounds.x; t < bounds.y; t++) {
        c0 = t * TILE;

        // S = Q K^T for the 64 x 64 tile, over head_dim in slices of 16.
        var s: Block;
        for (var k0 = 0u; k0 < params.head_dim; k0 += TILE_K) {
            tile_stage_a(li, k0);
            tile_stage_b(li, k0);
            workgroupBarrier();
            if rows_live {
                s = tile_fma(s, ty, tx);
            }
            workgroupBarrier();
        }

        // Mask, adjust, and the tile's row maxima (log2 units). A tile inside every row's key
        // range, with no per-key option, is only floored.
        var allowed = 0u;
        var tile_max = vec4<f32>(NEG_BIG);
        let untouched = !per_key_options() && c0 >= bounds.z && c0 + TILE <= bounds.w;
        if untouched {
            allowed = 0xffffu;
            for (var r = 0u; r < 4u; r++) {
                s[r] = max(s[r], vec4<f32>(SCORE_FLOOR2));
                tile_max[r] = max(max(s[r].x, s[r].y), max(s[r].z, s[r].w));
            }
        } else {
            for (var r = 0u; r < 4u; r++) {
                let h = row_h[r];
                let i = row_i[r];
                for (var c = 0u; c < 4u; c++) {
                    let j = c0 + tx * 4u + c;
                    if i32(j) >= lo[r] && i32(j) < hi[r] && mask_allows(b, h, i, j) {
                        var x = max(s[r][c], SCORE_FLOOR2);
                        if per_key_options() {
                            x = adjust_score(s[r][c] * LN2, b, h, i, j) * LOG2E;
                        }
                        s[r][c] = x;
                        tile_max[r] = max(tile_max[r], x);
                        allowed |= 1u << (r * 4u + c);
                    }
                }
            }
        }
        for (var r = 0u; r < 4u; r++) {
            red_put(ty * 4u + r, tx, tile_max[r]);
        }
        workgroupBarrier();
        var m_new = m_run;
        for (var r = 0u; r < 4u; r++) {
            for (var q = 0u; q < TILE_X / 4u; q++) {
                let part = red_row(ty * 4u + r, q);
                m_new[r] = max(m_new[r], max(max(part.x, part.y), max(part.z, part.w)));
            }
        }
        let corr = exp2(m_run - m_new);
        m_run = m_new;

        // Probabilities: to registers for the row sums, to p_tile for P·V.
        var p: Block;
        for (var r = 0u; r < 4u; r++) {
            for (var c = 0u; c < 4u; c++) {
                if (allowed & (1u << (r * 4u + c))) != 0u {
                    p[r][c] = exp2(s[r][c] - m_new[r]);
                }
            }
            l_run[r] = l_run[r] * corr[r] + p[r].x + p[r].y + p[r].z + p[r].w;
            for (var c = 0u; c < O_CHUNKS; c++) {
                acc[c][r] *= corr[r];
            }
        }
        for (var c = 0u; c < 4u; c++) {
            p_tile[tx * 4u + c][ty] = vec4<f32>(p[0][c], p[1][c], p[2][c], p[3][c]);
        }

        // O += P V over the tile's keys, in slices of BKV keys of V (staged in tile_stage).
        for (var kv0 = 0u; kv0 < TILE; kv0 += BKV) {
            workgroupBarrier();
            let slice = BKV * o_stride;
            for (var idx = li; idx < slice; idx += TILE_M * 4u) {
                let vk = idx / o_stride;
                let nq = idx % o_stride;
                let key = c0 + kv0 + vk;
                var vv = vec4<f32>();
                if key < key_end {
                    let row = v_base + key * params.v_stride_s;
                    for (var e = 0u; e < 4u; e++) {
                        let n = nq * 4u + e;
                        if n < params.v_head_dim {
                            vv[e] = load_v(row + n);
                        }
                    }
                }
                tile_stage[idx] = vv;
            }
            workgroupBarrier();
            if rows_live {
                for (var k = 0u; k < BKV; k++) {
                    let a = p_tile[kv0 + k][ty];
                    for (var c = 0u; c < O_CHUNKS; c++) {
                        // Columns past v_head_dim (head dims not a multiple of 64) are skipped.
                        if (tx + TILE_X * c) * 4u < params.v_head_dim {
                            acc[c] = block_fma(acc[c], a, tile_stage[k * o_stride + tx + TILE_X * c]);
                        }
                    }
                }
            }
        }
        workgroupBarrier();
    }

    // Row sums across the 16 invocations of each row, then normalise and write.
    for (var r = 0u; r < 4u; r++) {
        red_put(ty * 4u + r, tx, l_run[r]);
    }
    workgroupBarrier();
    // Resuming: the log-sum-exp of the earlier dispatches, read by every invocation of a row
    // before the barrier, after which one of them overwrites it.
    var prev_lse = array<u32, 4>(NEG_INF_BITS, NEG_INF_BITS, NEG_INF_BITS, NEG_INF_BITS);
    if params.resume != 0u {
        for (var r = 0u; r < 4u; r++) {
            if r0 + ty * 4u + r < params.packed_rows {
                prev_lse[r] = lse_or_partials[(b * params.heads + row_h[r]) * q_len + row_i[r]];
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
        for (var q = 0u; q < TILE_X / 4u; q++) {
            let part = red_row(ty * 4u + r, q);
            l += (part.x + part.y) + (part.z + part.w);
        }
        let inv = select(0.0, 1.0 / l, l > 0.0);
        let new_lse = lse_of(m_run[r] * LN2, l);
        if params.splits == 1u {
            // The earlier dispatches' O and this one's, weighted by their log-sum-exps.
            let sum = lse_add(lse_add(LseSum(0.0, 0.0), prev_lse[r]), new_lse);
            let w_prev = lse_weight(sum, prev_lse[r]);
            let w_new = select(1.0, lse_weight(sum, new_lse), prev_lse[r] != NEG_INF_BITS);
            let row = b * params.o_stride_b + h * params.o_stride_h + i * params.o_stride_s;
            for (var c = 0u; c < O_CHUNKS; c++) {
                let v = acc[c][r] * (inv * w_new);
                for (var e = 0u; e < 4u; e++) {
                    let n = (tx + TILE_X * c) * 4u + e;
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
                lse_or_partials[bh * q_len + i] = lse_total(sum);
            }
        } else {
            let part_row = (split * bh_count + bh) * q_len + i;
            let row = part_row * params.v_head_dim;
            for (var c = 0u; c < O_CHUNKS; c++) {
                let v = acc[c][r] * inv;
                for (var e = 0u; e < 4u; e++) {
                    let n = (tx + TILE_X * c) * 4u + e;
                    if n < params.v_head_dim {
                        lse_or_partials[row + n] = bitcast<u32>(v[e]);
                    }
                }
            }
            if tx == 0u {
                lse_or_partials[params.parts_lse_offset + part_row] = new_lse;
            }
        }
    }
}
