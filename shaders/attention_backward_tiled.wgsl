// The backward's gradients by Q (PHASE 1) and by K and V (PHASE 2) in 64 x 64 tiles of
// scores, the products register-blocked as in the fused forward (lib/tile_gemm.wgsl); phases
// 0, 3 and 4 (D and the row shifts, the bias's and the sinks' gradients) stay in
// attention_backward.wgsl, which also runs phases 1 and 2 where this kernel does not fit
// (head_dim or v_head_dim past 128).
//
// PHASE 1, one workgroup per 64 query rows of one query head: rows are query rows, columns
// keys. For each key tile of this dispatch (params.first .. + count, in tiles) that any of the
// rows sees: S = Q K^T and dP = dO V^T (each invocation a BR x BC block of both), P and dS
// from them (the row kernel's formulas), dS to workgroup memory, dQ += dS K.
// PHASE 2, one workgroup per 64 keys of one kv head: rows are keys, columns query rows. For
// each (query head of the group, query tile) pair of this dispatch (params.first .. + count,
// head major) whose rows see any of the keys: S^T = K Q^T and dP^T = V dO^T, P^T and dS^T,
// then dV += P^T dO and dK += dS^T Q, each product's left operand through workgroup memory.
// The accumulators are BR rows x OC vec4 columns per invocation, columns 4 (tx + NX c) .. + 3,
// as the fused kernel's O. The sums run in a fixed order: the gradients are the same bit for
// bit from run to run.
//
// Source constants from the key: BR, BC (the block), PHASE, NQ (query rows in a block: BR in
// PHASE 1, BC in PHASE 2), OC (vec4 columns of the accumulators), BKV (columns of the
// operand staged at once in the accumulating products). Bindings and formulas:
// attention_backward.wgsl.

const O_STRIDE: u32 = NX * OC;
// A row past its sequence: staged as zeros, so that padding (which may hold anything, NaN
// included) never reaches a gradient.
const NO_ROW: u32 = 0xffffffffu;
// The operands, by the tensor they are read from.
const OP_Q: u32 = 0u;
const OP_K: u32 = 1u;
const OP_V: u32 = 2u;
const OP_DO: u32 = 3u;

// P or dS of the tile, [column][row / 4]: the left operand of the accumulating products.
var<workgroup> p_tile: array<array<vec4<f32>, TILE_X>, TILE>;
// The last tile (plus one) any query row of the workgroup was seen to reach (tile_visible).
var<workgroup> seen: atomic<u32>;
var<workgroup> visit: u32;

// The workgroup's batch entry and kv head, and the query head of its rows (PHASE 1) or of the
// current pair (PHASE 2).
var<private> wb: u32;
var<private> wkvh: u32;
var<private> wh: u32;

// What an element's gradient needs of its query row.
struct QueryRow {
    h: u32,
    i: u32,
    // 1 for a row of the call with a finite log-sum-exp.
    live: u32,
    lo: i32,
    hi: i32,
    se: i32,
    alibi: AlibiRow,
    // The log-sum-exp and the row's shift, apart: a row clipped to the score floor has an
    // lse of the floor itself, which would absorb the shift.
    lse: f32,
    shift: f32,
    delta: f32,
}

fn query_row(h: u32, i: u32) -> QueryRow {
    var out = QueryRow(h, i, 0u, 0, 0, 0, AlibiRow(0.0, 0), 0.0, 0.0, 0.0);
    if i < params.q_len {
        let row = (wb * params.heads + h) * params.q_len + i;
        let bits = lse[row];
        let range = key_range(wb, i);
        out.lo = range.x;
        out.hi = range.y;
        out.se = sink_end(wb, i);
        out.alibi = alibi_row(wb, h, i);
        if bits != NEG_INF_BITS {
            out.live = 1u;
            out.lse = bitcast<f32>(bits);
            out.shift = row_shift(row);
        }
        out.delta = delta[row];
    }
    return out;
}

// (P, dS) of query row q and key j, from the scaled-down dot products s = q·k and dp = dO·v:
// zeros for a key the row does not see.
fn grad_of(s: f32, dp: f32, q: QueryRow, j: u32) -> vec2<f32> {
    if q.live != 0u && in_keys(j, q.lo, q.hi, q.se) && mask_allows(wb, q.h, q.i, j) {
        let xs = score_and_slope(s * params.scale, wb, q.h, q.i, j, q.alibi);
        let p = exp(xs.x - q.lse - q.shift);
        return vec2<f32>(p, p * (dp - q.delta) * xs.y * params.scale);
    }
    return vec2<f32>(0.0, 0.0);
}

// The first element of row n of operand op (a query row of head wh for Q and dO, a key of kv
// head wkvh for K and V), or NO_ROW past the sequence.
fn row_base(op: u32, n: u32) -> u32 {
    if op == OP_Q || op == OP_DO {
        if n >= seq_q_len(wb) {
            return NO_ROW;
        }
        if op == OP_Q {
            return q_at(wb, wh, n);
        }
        return o_at(wb, wh, n);
    }
    if n >= seq_kv_len(wb) {
        return NO_ROW;
    }
    if op == OP_K {
        return k_at(wb, wkvh, n);
    }
    return v_at(wb, wkvh, n);
}

fn op_width(op: u32) -> u32 {
    return select(params.head_dim, params.v_head_dim, op == OP_V || op == OP_DO);
}

fn op_load(op: u32, e: u32) -> f32 {
    switch op {
        case 0u: {
            return load_q(e);
        }
        case 1u: {
            return load_k(e);
        }
        case 2u: {
            return load_v(e);
        }
        default: {
            return load_d_o(e);
        }
    }
}

// Dims d0 .. d0 + 3 of row n of op (zeros past its width or its sequence).
fn op_vec4(op: u32, n: u32, d0: u32) -> vec4<f32> {
    let base = row_base(op, n);
    var x = vec4<f32>();
    if base != NO_ROW {
        let w = op_width(op);
        for (var e = 0u; e < 4u; e++) {
            if d0 + e < w {
                x[e] = op_load(op, base + d0 + e);
            }
        }
    }
    return x;
}

// The slice k0 .. k0 + TILE_K of op_a over the tile's rows (r0 + ..) and of op_b over its
// columns (c0 + ..) into tile_stage, as tile_gemm lays it out ([k][row / 4]). 512 items of
// four rows of one dim: 2 to 8 per invocation, a constant trip count.
fn stage_pair(li: u32, k0: u32, op_a: u32, op_b: u32) {
    let half = TILE_K * TILE_X;
    let invocations = tile_invocations();
    for (var n = 0u; n < 2u * half / invocations; n++) {
        let idx = li + n * invocations;
        let side = idx / half;
        let kk = idx % TILE_K;
        let mq = (idx % half) / TILE_K;
        let op = select(op_a, op_b, side == 1u);
        let first = select(r0, c0, side == 1u) + 4u * mq;
        let d = k0 + kk;
        var x = vec4<f32>();
        if d < op_width(op) {
            for (var e = 0u; e < 4u; e++) {
                let base = row_base(op, first + e);
                if base != NO_ROW {
                    x[e] = op_load(op, base + d);
                }
            }
        }
        tile_stage[side * STAGE_B + kk * TILE_X + mq] = x;
    }
}

// The block of op_a (rows) times op_b (columns) over `width` dims.
fn tile_product(li: u32, tx: u32, ty: u32, op_a: u32, op_b: u32, width: u32) -> Block {
    var acc = Block();
    for (var k0 = 0u; k0 < width; k0 += TILE_K) {
        stage_pair(li, k0, op_a, op_b);
        workgroupBarrier();
        acc = tile_fma(acc, ty, tx);
        workgroupBarrier();
    }
    return acc;
}

// The block x (of P or dS) into p_tile, [column][row / 4]. The caller has passed a barrier
// since p_tile was last read.
fn store_p_tile(x: Block, tx: u32, ty: u32) {
    for (var n = 0u; n < BC * BR4; n++) {
        let c = n / BR4;
        let g = n % BR4;
        p_tile[block_col(tx, c)][block_row_group(ty, g)] = vec4<f32>(
            x[(4u * g) * BC4 + c / 4u][c % 4u],
            x[(4u * g + 1u) * BC4 + c / 4u][c % 4u],
            x[(4u * g + 2u) * BC4 + c / 4u][c % 4u],
            x[(4u * g + 3u) * BC4 + c / 4u][c % 4u],
        );
    }
}

alias Acc = array<vec4<f32>, OC * BR>;

// tile_gemm's generic staging names these; this kernel stages through stage_pair.
fn tile_a(row: u32, k: u32) -> f32 {
    return 0.0;
}

fn tile_b(col: u32, k: u32) -> f32 {
    return 0.0;
}

// acc += p_tile (rows x the tile's columns) times op's rows of the tile's columns (c0 + ..),
// BKV columns of op staged at a time. Columns past op's width are staged as zeros.
fn accumulate(acc: Acc, li: u32, tx: u32, ty: u32, op: u32) -> Acc {
    var out = acc;
    let invocations = tile_invocations();
    let slice = BKV * O_STRIDE;
    for (var kv0 = 0u; kv0 < TILE; kv0 += BKV) {
        workgroupBarrier();
        for (var n = 0u; n < (slice + invocations - 1u) / invocations; n++) {
            let idx = li + n * invocations;
            if idx >= slice {
                break;
            }
            let vk = idx / O_STRIDE;
            let nq = idx % O_STRIDE;
            tile_stage[idx] = op_vec4(op, c0 + kv0 + vk, 4u * nq);
        }
        workgroupBarrier();
        for (var k = 0u; k < BKV; k++) {
            var a = array<vec4<f32>, BR4>();
            for (var g = 0u; g < BR4; g++) {
                a[g] = p_tile[kv0 + k][block_row_group(ty, g)];
            }
            var b = array<vec4<f32>, OC>();
            for (var c = 0u; c < OC; c++) {
                b[c] = tile_stage[k * O_STRIDE + tx + NX * c];
            }
            for (var x = 0u; x < OC * BR4; x++) {
                let c = x / BR4;
                let g = x % BR4;
                out[c * BR + 4u * g] += a[g].x * b[c];
                out[c * BR + 4u * g + 1u] += a[g].y * b[c];
                out[c * BR + 4u * g + 2u] += a[g].z * b[c];
                out[c * BR + 4u * g + 3u] += a[g].w * b[c];
            }
        }
    }
    return out;
}

// Whether any query row of the tile pair t sees a key of it: the query rows are q0 .. q0 + 63
// (of head wh), the keys k0 .. k0 + 63. The workgroup's first 64 invocations check a row
// each; the answer is uniform. The boolean mask is not consulted (a tile it removes entirely
// is computed, as zeros).
fn tile_visible(li: u32, t: u32, q0: u32, k0: u32) -> bool {
    if li < TILE {
        let i = q0 + li;
        if i < params.q_len {
            let range = key_range(wb, i);
            let first = i32(k0);
            let end = first + i32(TILE);
            let in_range = range.y > range.x && range.x < end && range.y > first;
            if in_range || sink_end(wb, i) > first {
                atomicMax(&seen, t + 1u);
            }
        }
    }
    workgroupBarrier();
    if li == 0u {
        visit = atomicLoad(&seen);
    }
    return workgroupUniformLoad(&visit) == t + 1u;
}

// Adds the accumulated rows (PHASE 1: dQ of query rows; PHASE 2: dK and dV of keys) to the
// gradients. From copies made in a loop small enough to unroll (see flash_attention.wgsl).
fn write_grads(acc_a: Acc, acc_b: Acc, tx: u32, ty: u32) {
    var out_a = Acc();
    var out_b = Acc();
    for (var x = 0u; x < OC * BR; x++) {
        out_a[x] = acc_a[x];
        out_b[x] = acc_b[x];
    }
    for (var x = 0u; x < OC * BR; x++) {
        let n = r0 + block_row(ty, x % BR);
        let d0 = (tx + NX * (x / BR)) * 4u;
        if PHASE == 1u {
            if n < params.q_len {
                let base = q_at(wb, wh, n);
                for (var e = 0u; e < 4u; e++) {
                    if d0 + e < params.head_dim {
                        add_grad_a(base + d0 + e, out_a[x][e]);
                    }
                }
            }
        } else if n < params.kv_len {
            let ka = k_at(wb, wkvh, n);
            let va = v_at(wb, wkvh, n);
            for (var e = 0u; e < 4u; e++) {
                if d0 + e < params.head_dim {
                    add_grad_a(ka + d0 + e, out_a[x][e]);
                }
                if d0 + e < params.v_head_dim {
                    add_grad_b(va + d0 + e, out_b[x][e]);
                }
            }
        }
    }
}

@compute @workgroup_size(NX, TILE_M / BR)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) num_wg: vec3<u32>,
    inv: TileInvocation,
) {
    let id = workgroup_index(wg, num_wg);
    if id >= params.rows {
        return;
    }
    let tx = inv.lid.x;
    let ty = inv.lid.y;
    let li = inv.li;
    // Workgroup memory starts undefined: the crate turns off wgpu's zeroing (kernels/cache.rs),
    // and llvmpipe, which runs workgroups one after another on a thread, keeps the last one's.
    if li == 0u {
        atomicStore(&seen, 0u);
    }
    workgroupBarrier();
    let tiles_q = (params.q_len + TILE - 1u) / TILE;
    let tiles_k = (params.kv_len + TILE - 1u) / TILE;
    var qrows = array<QueryRow, NQ>();
    var end = 0u;
    if PHASE == 1u {
        r0 = (id % tiles_q) * TILE;
        let bh = id / tiles_q;
        wb = bh / params.heads;
        wh = bh % params.heads;
        wkvh = wh / params.group;
        for (var r = 0u; r < NQ; r++) {
            qrows[r] = query_row(wh, r0 + block_row(ty, r));
        }
        end = min(params.first + params.count, tiles_k);
    } else {
        r0 = (id % tiles_k) * TILE;
        let bk = id / tiles_k;
        wb = bk / params.kv_heads;
        wkvh = bk % params.kv_heads;
        end = min(params.first + params.count, params.group * tiles_q);
    }
    var acc_a = Acc();
    var acc_b = Acc();
    for (var t = params.first; t < end; t++) {
        if PHASE == 1u {
            c0 = t * TILE;
            if !tile_visible(li, t, r0, c0) {
                continue;
            }
        } else {
            wh = wkvh * params.group + t / tiles_q;
            c0 = (t % tiles_q) * TILE;
            if !tile_visible(li, t, c0, r0) {
                continue;
            }
            for (var c = 0u; c < NQ; c++) {
                qrows[c] = query_row(wh, c0 + block_col(tx, c));
            }
        }
        // The scores' and dP's blocks: PHASE 1 rows x keys, PHASE 2 keys x rows.
        var s = Block();
        var dp = Block();
        if PHASE == 1u {
            s = tile_product(li, tx, ty, OP_Q, OP_K, params.head_dim);
            dp = tile_product(li, tx, ty, OP_DO, OP_V, params.v_head_dim);
        } else {
            s = tile_product(li, tx, ty, OP_K, OP_Q, params.head_dim);
            dp = tile_product(li, tx, ty, OP_V, OP_DO, params.v_head_dim);
        }
        // P into s, dS into dp. Block row x / BC4's columns 4 (tx + NX (x % BC4)) .. + 3.
        for (var x = 0u; x < BR * BC4; x++) {
            let r = x / BC4;
            let c = 4u * (x % BC4);
            var g = array<vec2<f32>, 4>();
            if PHASE == 1u {
                let j = c0 + block_col(tx, c);
                let q = qrows[r];
                g[0] = grad_of(s[x].x, dp[x].x, q, j);
                g[1] = grad_of(s[x].y, dp[x].y, q, j + 1u);
                g[2] = grad_of(s[x].z, dp[x].z, q, j + 2u);
                g[3] = grad_of(s[x].w, dp[x].w, q, j + 3u);
            } else {
                let j = r0 + block_row(ty, r);
                g[0] = grad_of(s[x].x, dp[x].x, qrows[c], j);
                g[1] = grad_of(s[x].y, dp[x].y, qrows[c + 1u], j);
                g[2] = grad_of(s[x].z, dp[x].z, qrows[c + 2u], j);
                g[3] = grad_of(s[x].w, dp[x].w, qrows[c + 3u], j);
            }
            s[x] = vec4<f32>(g[0].x, g[1].x, g[2].x, g[3].x);
            dp[x] = vec4<f32>(g[0].y, g[1].y, g[2].y, g[3].y);
        }
        if PHASE == 1u {
            // dQ += dS K.
            store_p_tile(dp, tx, ty);
            acc_a = accumulate(acc_a, li, tx, ty, OP_K);
        } else {
            // dV += P^T dO, then dK += dS^T Q.
            store_p_tile(s, tx, ty);
            acc_b = accumulate(acc_b, li, tx, ty, OP_DO);
            workgroupBarrier();
            store_p_tile(dp, tx, ty);
            acc_a = accumulate(acc_a, li, tx, ty, OP_Q);
        }
    }
    write_grads(acc_a, acc_b, tx, ty);
}
