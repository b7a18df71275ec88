// The backward's gradients by Q (PHASE 1) and by K and V (PHASE 2) in 64 x 64 tiles of
// scores, the products register-blocked as in the fused forward (lib/tile_gemm.wgsl). Phase 0
// (D and the row shifts) is attention_backward_delta.wgsl; phases 3 and 4 (the bias's and the
// sinks' gradients) stay in attention_backward.wgsl, which also runs phases 1 and 2 where this
// kernel does not fit (head_dim or v_head_dim past 256).
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
// attention_backward.wgsl; params.rows is this kernel's workgroup count, params.first and
// params.count its share of tiles (PHASE 1: key tiles; PHASE 2: pairs).

const O_STRIDE: u32 = NX * OC;
// The operands, by the tensor they are read from.
const OP_Q: u32 = 0u;
const OP_K: u32 = 1u;
const OP_V: u32 = 2u;
const OP_DO: u32 = 3u;

// P or dS of the tile, [column][row / 4] (column c's four-row groups at c * TILE_X ..): the
// left operand of the accumulating products. Until P or dS is stored, it stages the second
// product of the scores' slice loop (score_products): TILE_K x TILE_X vec4s of each operand.
var<workgroup> p_tile: array<vec4<f32>, TILE * TILE_X>;
// The last tile (plus one) that any query row of the workgroup was seen to reach, and that
// any row was seen not to cover (tile_state).
var<workgroup> seen: atomic<u32>;
var<workgroup> partial: atomic<u32>;
var<workgroup> visit: u32;
// A packed batch: the query rows and keys of the workgroup's sequence, read uniformly.
var<workgroup> seq_rows: vec2<u32>;

// What tile_state says of a tile.
const TILE_SKIPPED: u32 = 0u;
const TILE_PARTIAL: u32 = 1u;
const TILE_FULL: u32 = 2u;

// The workgroup's batch entry and kv head, and the query head of its rows (PHASE 1) or of the
// current pair (PHASE 2).
var<private> wb: u32;
var<private> wkvh: u32;
var<private> wh: u32;

// What an element's gradient needs of its query row (of head wh, the same for every row a
// tile holds).
struct QueryRow {
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
    // Dropout's state of the row (lib/masking.wgsl).
    drop: vec2<u32>,
}

fn query_row(i: u32) -> QueryRow {
    var out = QueryRow(i, 0u, 0, 0, 0, AlibiRow(0.0, 0), 0.0, 0.0, 0.0, vec2<u32>(0u, 0u));
    if i < params.q_len {
        let row = (wb * params.heads + wh) * params.q_len + i;
        let bits = lse_bits(row);
        let range = key_range(wb, i);
        out.lo = range.x;
        out.hi = range.y;
        out.se = sink_end(wb, i);
        out.alibi = alibi_row(wb, wh, i);
        if bits != NEG_INF_BITS {
            out.live = 1u;
            out.lse = bitcast<f32>(bits);
            out.shift = row_shift(row);
        }
        out.delta = row_delta(row);
        out.drop = dropout_row(wb * params.heads + wh, i);
    }
    return out;
}

// (P, dS) of query row q and key j, from the scaled-down dot products s = q·k and dp = dO·v:
// zeros for a key the row does not see. With dropout, P is the kept weight, scaled (what dV
// sums), and dP the kept dO·v, scaled (attention_backward.wgsl's header).
fn grad_of(s: f32, dp: f32, q: QueryRow, j: u32) -> vec2<f32> {
    if q.live != 0u && in_keys(j, q.lo, q.hi, q.se) && mask_allows(wb, wh, q.i, j) {
        let xs = score_and_slope(s * params.scale, wb, wh, q.i, j, q.alibi);
        let p = exp(xs.x - q.lse - q.shift);
        let z = dropout_factor(q.drop, j);
        return vec2<f32>(p * z, p * (dp * z - q.delta) * xs.y * params.scale);
    }
    return vec2<f32>(0.0, 0.0);
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

// The first element of row 0 of op's head (Q and dO: head wh; K and V: kv head wkvh), the
// stride between its rows, and its rows in the sequence (rows past it are staged as zeros).
fn op_rows(op: u32) -> vec3<u32> {
    switch op {
        case 0u: {
            return vec3<u32>(q_at(wb, wh, 0u), params.q_stride_s, seq_q_len(wb));
        }
        case 1u: {
            return vec3<u32>(k_at(wb, wkvh, 0u), params.k_stride_s, seq_kv_len(wb));
        }
        case 2u: {
            return vec3<u32>(v_at(wb, wkvh, 0u), params.v_stride_s, seq_kv_len(wb));
        }
        default: {
            return vec3<u32>(o_at(wb, wh, 0u), params.o_stride_s, seq_q_len(wb));
        }
    }
}

// Where stage_side writes: tile_stage, or p_tile while it is free (score_products).
const TO_STAGE: u32 = 0u;
const TO_P: u32 = 1u;

// The slice k0 .. k0 + TILE_K of op over rows first .. first + 63 into half `side` of
// tile_stage or of p_tile's first STAGE_SIZE vec4s (`dest`), as tile_gemm lays it out
// ([k][row / 4]): 256 items of four rows of one dim, 1 to 4 per invocation (a constant trip
// count). `op` and `dest` are constants at every call site, so the loads compile to one
// tensor's and the stores to one array's.
fn stage_side(li: u32, k0: u32, op: u32, side: u32, first: u32, dest: u32) {
    let half = TILE_K * TILE_X;
    let invocations = tile_invocations();
    let rows = op_rows(op);
    let width = op_width(op);
    for (var n = 0u; n < half / invocations; n++) {
        let idx = li + n * invocations;
        let kk = idx % TILE_K;
        let row = first + 4u * (idx / TILE_K);
        let d = k0 + kk;
        var x = vec4<f32>();
        if d < width {
            for (var e = 0u; e < 4u; e++) {
                if row + e < rows.z {
                    x[e] = op_load(op, rows.x + (row + e) * rows.y + d);
                }
            }
        }
        let at = side * STAGE_B + kk * TILE_X + idx / TILE_K;
        if dest == TO_STAGE {
            tile_stage[at] = x;
        } else {
            p_tile[at] = x;
        }
    }
}

// tile_fma of the slice staged in p_tile (TO_P).
fn p_tile_fma(acc: Block, ty: u32, tx: u32) -> Block {
    var out = acc;
    for (var k = 0u; k < TILE_K; k++) {
        var a = array<vec4<f32>, BR4>();
        for (var g = 0u; g < BR4; g++) {
            a[g] = p_tile[k * TILE_X + block_row_group(ty, g)];
        }
        var b = array<vec4<f32>, BC4>();
        for (var j = 0u; j < BC4; j++) {
            b[j] = p_tile[STAGE_B + k * TILE_X + tx + NX * j];
        }
        out = block_fma(out, a, b);
    }
    return out;
}

// The scores' block and dP's: PHASE 1 rows x keys (S = Q K^T, dP = dO V^T), PHASE 2 keys x
// rows (S^T = K Q^T, dP^T = V dO^T).
struct Scores {
    s: Block,
    dp: Block,
}

// Both products in one loop over the summed dims: each slice stages Q's and K's part in
// tile_stage and dO's and V's in p_tile (free until P or dS is stored: the caller has passed a
// barrier since the accumulating products last read it), so a slice of both costs one pair
// of barriers (FlashAttention-2's loop; two loops took twice as many). Past a width, its
// product's slices are neither staged nor summed (a uniform condition).
fn score_products(li: u32, tx: u32, ty: u32) -> Scores {
    var out = Scores(Block(), Block());
    for (var k0 = 0u; k0 < max(params.head_dim, params.v_head_dim); k0 += TILE_K) {
        let with_s = k0 < params.head_dim;
        let with_dp = k0 < params.v_head_dim;
        if PHASE == 1u {
            if with_s {
                stage_side(li, k0, OP_Q, 0u, r0, TO_STAGE);
                stage_side(li, k0, OP_K, 1u, c0, TO_STAGE);
            }
            if with_dp {
                stage_side(li, k0, OP_DO, 0u, r0, TO_P);
                stage_side(li, k0, OP_V, 1u, c0, TO_P);
            }
        } else {
            if with_s {
                stage_side(li, k0, OP_K, 0u, r0, TO_STAGE);
                stage_side(li, k0, OP_Q, 1u, c0, TO_STAGE);
            }
            if with_dp {
                stage_side(li, k0, OP_V, 0u, r0, TO_P);
                stage_side(li, k0, OP_DO, 1u, c0, TO_P);
            }
        }
        workgroupBarrier();
        if with_s {
            out.s = tile_fma(out.s, ty, tx);
        }
        if with_dp {
            out.dp = p_tile_fma(out.dp, ty, tx);
        }
        workgroupBarrier();
    }
    return out;
}

// The block x (of P or dS) into p_tile, [column][row / 4]. The caller has passed a barrier
// since p_tile was last read.
fn store_p_tile(x: Block, tx: u32, ty: u32) {
    for (var n = 0u; n < BC * BR4; n++) {
        let c = n / BR4;
        let g = n % BR4;
        p_tile[block_col(tx, c) * TILE_X + block_row_group(ty, g)] = vec4<f32>(
            x[(4u * g) * BC4 + c / 4u][c % 4u],
            x[(4u * g + 1u) * BC4 + c / 4u][c % 4u],
            x[(4u * g + 2u) * BC4 + c / 4u][c % 4u],
            x[(4u * g + 3u) * BC4 + c / 4u][c % 4u],
        );
    }
}

alias Acc = array<vec4<f32>, OC * BR>;

// tile_gemm's generic staging names these; this kernel stages through stage_side.
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
    let rows = op_rows(op);
    let width = op_width(op);
    for (var kv0 = 0u; kv0 < TILE; kv0 += BKV) {
        workgroupBarrier();
        for (var n = 0u; n < (slice + invocations - 1u) / invocations; n++) {
            let idx = li + n * invocations;
            if idx >= slice {
                break;
            }
            let vk = idx / O_STRIDE;
            let nq = idx % O_STRIDE;
            // Dims 4 nq .. 4 nq + 3 of row c0 + kv0 + vk (zeros past the width or the rows).
            let row = c0 + kv0 + vk;
            var x = vec4<f32>();
            if row < rows.z {
                let base = rows.x + row * rows.y;
                for (var e = 0u; e < 4u; e++) {
                    if 4u * nq + e < width {
                        x[e] = op_load(op, base + 4u * nq + e);
                    }
                }
            }
            tile_stage[idx] = x;
        }
        workgroupBarrier();
        for (var k = 0u; k < BKV; k++) {
            var a = array<vec4<f32>, BR4>();
            for (var g = 0u; g < BR4; g++) {
                a[g] = p_tile[(kv0 + k) * TILE_X + block_row_group(ty, g)];
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

// Whether any query row of the tile pair t sees a key of it (else TILE_SKIPPED), and whether
// every row sees every key (TILE_FULL: no mask code runs, as long as the call has no per-key
// option) or not (TILE_PARTIAL). The query rows are q0 .. q0 + 63 (of head wh), the keys
// k0 .. k0 + 63. The workgroup's first 64 invocations check a row each; the answer is
// uniform. The boolean mask is not consulted here (a tile it removes entirely is computed, as
// zeros; per_key_options covers it).
fn tile_state(li: u32, t: u32, q0: u32, k0: u32) -> u32 {
    if li < TILE {
        let i = q0 + li;
        let first = i32(k0);
        let end = first + i32(TILE);
        var covers = false;
        if i < params.q_len {
            let range = key_range(wb, i);
            let in_range = range.y > range.x && range.x < end && range.y > first;
            if in_range || sink_end(wb, i) > first {
                atomicMax(&seen, t + 1u);
            }
            covers = range.x <= first && range.y >= end;
        }
        if !covers {
            atomicMax(&partial, t + 1u);
        }
    }
    workgroupBarrier();
    if li == 0u {
        var state = TILE_SKIPPED;
        if atomicLoad(&seen) == t + 1u {
            state = select(TILE_FULL, TILE_PARTIAL, atomicLoad(&partial) == t + 1u);
        }
        visit = state;
    }
    let state = workgroupUniformLoad(&visit);
    if per_key_options() && state == TILE_FULL {
        return TILE_PARTIAL;
    }
    return state;
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
            if n < params.q_len && row_is_real(wb, n) {
                let base = q_at(wb, wh, n);
                for (var e = 0u; e < 4u; e++) {
                    if d0 + e < params.head_dim {
                        add_grad_a(base + d0 + e, out_a[x][e]);
                    }
                }
            }
        } else if n < params.kv_len && key_is_real(wb, n) {
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
        atomicStore(&partial, 0u);
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
            qrows[r] = query_row(r0 + block_row(ty, r));
        }
        end = min(params.first + params.count, tiles_k);
    } else {
        r0 = (id % tiles_k) * TILE;
        let bk = id / tiles_k;
        wb = bk / params.kv_heads;
        wkvh = bk % params.kv_heads;
        end = min(params.first + params.count, params.group * tiles_q);
    }
    // A packed batch's grid is sized for its longest sequence: a workgroup whose rows (dQ) or
    // keys (dK, dV) all lie past its own sequence has nothing to write (those slots are the
    // next sequence's), and none needs the key tiles (dQ) or query tiles (dK, dV) past it.
    // Not with padded lengths: there the rows past them are real and get their zeros.
    // (Compared through locals: a browser's uniformity analysis counts every read of a
    // module-scope private variable, r0 and c0 here, as non-uniform.)
    var seq = vec2<u32>(params.q_len, params.kv_len);
    if HAS_VARLEN {
        if li == 0u {
            seq_rows = vec2<u32>(seq_q_len(wb), seq_kv_len(wb));
        }
        seq = workgroupUniformLoad(&seq_rows);
        if PHASE == 1u {
            if (id % tiles_q) * TILE >= seq.x {
                return;
            }
            end = min(end, (seq.y + TILE - 1u) / TILE);
        } else if (id % tiles_k) * TILE >= seq.y {
            return;
        }
    }
    var acc_a = Acc();
    var acc_b = Acc();
    for (var t = params.first; t < end; t++) {
        var state = TILE_SKIPPED;
        if PHASE == 1u {
            c0 = t * TILE;
            state = tile_state(li, t, r0, c0);
            if state == TILE_SKIPPED {
                continue;
            }
        } else {
            wh = wkvh * params.group + t / tiles_q;
            let first_row = (t % tiles_q) * TILE;
            if first_row >= seq.x {
                continue;
            }
            c0 = first_row;
            state = tile_state(li, t, c0, r0);
            if state == TILE_SKIPPED {
                continue;
            }
            for (var c = 0u; c < NQ; c++) {
                qrows[c] = query_row(c0 + block_col(tx, c));
            }
        }
        // The scores' and dP's blocks: PHASE 1 rows x keys, PHASE 2 keys x rows.
        let scores = score_products(li, tx, ty);
        var s = scores.s;
        var dp = scores.dp;
        // P into s, dS into dp. Block row x / BC4's columns 4 (tx + NX (x % BC4)) .. + 3.
        if state == TILE_FULL && !HAS_DROPOUT {
            // Every score seen, none adjusted: only floored (and none dropped). The query rows' values four
            // columns at a time (one row's, or four rows').
            for (var x = 0u; x < BR * BC4; x++) {
                var lse4 = vec4<f32>();
                var delta4 = vec4<f32>();
                var shift4 = vec4<f32>();
                if PHASE == 1u {
                    let q = qrows[x / BC4];
                    lse4 = vec4<f32>(q.lse);
                    shift4 = vec4<f32>(q.shift);
                    delta4 = vec4<f32>(q.delta);
                } else {
                    let c = 4u * (x % BC4);
                    lse4 = vec4<f32>(qrows[c].lse, qrows[c + 1u].lse, qrows[c + 2u].lse, qrows[c + 3u].lse);
                    shift4 = vec4<f32>(qrows[c].shift, qrows[c + 1u].shift, qrows[c + 2u].shift, qrows[c + 3u].shift);
                    delta4 = vec4<f32>(qrows[c].delta, qrows[c + 1u].delta, qrows[c + 2u].delta, qrows[c + 3u].delta);
                }
                let y = max(s[x] * params.scale, vec4<f32>(SCORE_FLOOR));
                let p = exp(y - lse4 - shift4);
                s[x] = p;
                dp[x] = select(p * (dp[x] - delta4) * params.scale, vec4<f32>(), y <= vec4<f32>(SCORE_FLOOR));
            }
        } else {
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
