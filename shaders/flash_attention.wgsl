// Fused attention (flash attention, forward): scores, masked online softmax and P·V in one
// pass; the score matrix never leaves the workgroup.
// One workgroup: TILE_M query rows (64; 8 to 32 when decoding a few rows) that share one kv
// head of one batch entry, streaming the keys of its split that its rows may see in tiles of
// TILE (tiles that causal, window or length masks remove entirely are never visited). The
// rows are the (query head in the group, query row) pairs of the kv head, query row fastest:
// for decoding, the whole GQA group shares each K/V tile.
// One invocation (tx, ty) of NX x NY (placed by lib/tile_rows_*.wgsl, which also reduce the
// rows across the NX invocations that share them: subgroup shuffles or workgroup memory): a
// BR x BC block of each score tile (lib/tile_gemm.wgsl:
// rows block_row(ty, r), columns block_col(tx, c)), and the same BR rows x 4 * OC columns of
// O, 4 (tx + NX c) .. + 3 for c < OC, accumulated in registers with the running row maximum
// and sum. Q is pre-scaled by scale * log2(e) as it is staged; the softmax runs on exp2.
// The masking options are compiled in (lib/masking.wgsl); a key tile inside every row's key
// range, on a call without per-key options, is only floored.
// With one split, O and the log-sum-exp are final. With several (flash-decoding), each split
// writes its normalised partial O and log-sum-exp to `lse_or_partials`, and
// combine_splits.wgsl merges them.
// MMA = 1 (f16 Q, K and V): S and P V are products of 16-bit operands staged in workgroup
// memory (lib/mma.wgsl: cooperative matrices, or their emulation), read back into the same
// blocks; everything else below is the same.
// Q, K, V and O go through the dtype prelude's load_* /
// store_o. TILE and TILE_K come from the host's shared constants; BR, BC, OC (vec4 columns of
// O per invocation), BKV, QR (slices of TILE_K dims of resident Q, 0 for none), QR_VEC4S
// (q_res's length, at least 1), ROWS4 (TILE_M / 4), INV (the workgroup's invocations) and
// STAGES (staging buffers: 2 double-buffers them) from the key; TILE_M is a pipeline
// constant, equal to 4 ROWS4.
// Double buffering (STAGES = 2): each step of a key tile (a slice of Q and K, a pair of
// slices of K with resident Q, a slice of V) reads its operands from one staging buffer while
// the next step's are loaded from global memory into registers and then stored into the
// other, so a step takes one barrier instead of two and the loads' latency hides behind the
// FMAs; the first slice of V is loaded before the softmax.
// Every loop over a register array (s, acc, the per-row state) is one flat loop with a small
// body, never nested: llvmpipe keeps a private array in memory, read and written lane by lane,
// as soon as one index into it is not a constant after unrolling, and it unrolls no loop that
// holds another (NOTES.md).

// Keys per slice of V staged at once: the slice holds BKV x NX * OC vec4s, at most the
// 2 * STAGE_B of tile_stage; BKV divides TILE.
const O_STRIDE: u32 = NX * OC;
// Items of Q's slice each invocation stages: TILE_K * TILE_M / 4 over NX * TILE_M / BR, exactly.
const Q_ITEMS: u32 = BR * BC / 16u;
// A row this invocation does not stage (past the packed rows).
const NO_ROW: u32 = 0xffffffffu;
// Double-buffered staging, and the items of a slice of K and of V each invocation stages.
const DB: bool = STAGES == 2u;
const K_ITEMS: u32 = STAGE_B / INV;
const V_ITEMS: u32 = (BKV * O_STRIDE + INV - 1u) / INV;
// Dims of Q K^T per step of the key tile: a pair of slices of K where Q is resident.
const QK_STEP: u32 = select(TILE_K, 2u * TILE_K, QR > 0u);

// Bindings (declared by the host from Kernel::slots): params (FlashParams); q, k, v (read) and
// o (write) tensors; bias, mask, lens and mparams (lib/masking.wgsl); lse_or_partials: with
// one split, the log-sum-exp as f32 bits, [batch, heads, q_len]; with several, the partial
// outputs as f32 bits, [split, batch, heads, q_len, v_head_dim], then from parts_lse_offset
// the partial log-sum-exps, [split, batch, heads, q_len].

// The tile's probabilities, [key][row / 4] (P_KEYS = TILE; 1, unused, with MMA).
var<workgroup> p_tile: array<array<vec4<f32>, ROWS4>, P_KEYS>;

fn hmax(v: vec4<f32>) -> f32 {
    return max(max(v.x, v.y), max(v.z, v.w));
}

fn hsum(v: vec4<f32>) -> f32 {
    return (v.x + v.y) + (v.z + v.w);
}

// Element `d` of the Q row at `row` (NO_ROW: none), pre-scaled.
fn q_elem(row: u32, d: u32, q_scale: f32) -> f32 {
    if row != NO_ROW {
        return load_q(row + d) * q_scale;
    }
    return 0.0;
}

// The score of key j for a row with key range lo..hi and sink keys 0..se, of query head h and
// row i: NEG_BIG where masked, else floored, or adjusted by the per-key options.
// `alibi` is the row's alibi_row.
fn masked_score(
    x: f32,
    b: u32,
    h: u32,
    i: u32,
    j: u32,
    lo: i32,
    hi: i32,
    se: i32,
    alibi: AlibiRow
) -> f32 {
    if in_keys(j, lo, hi, se) && mask_allows(b, h, i, j) {
        if per_key_options() {
            return adjust_score_with(x * LN2, b, h, i, j, alibi) * LOG2E;
        }
        return max(x, SCORE_FLOOR2);
    }
    return NEG_BIG;
}

// The key tiles this workgroup visits, and the keys every one of its rows may see.
var<workgroup> tile_bounds: vec4<u32>;
// Key tiles between every row's sink keys and its window, skipped (lib/masking.wgsl).
var<workgroup> hole_tiles: vec2<u32>;
// One past the last key any row may see: V rows from there on are staged as zeros, so rows
// past kv_lens (which may hold anything, NaN included) never reach O.
var<workgroup> key_end: u32;

// k_base: the kv head's first key (tile_b).
var<private> k_base: u32;
// Paged K/V: the pool rows of the tile's keys (lib/masking.wgsl's key_slot), looked up once
// per key and tile, not once per element staged.
var<workgroup> key_slots: array<u32, TILE>;

// The K/V row of the tile's key `col`.
fn tile_key_row(col: u32) -> u32 {
    if HAS_PAGES || HAS_VARLEN {
        return key_slots[col];
    }
    return c0 + col;
}

// Q is staged by stage_q, not through tile_stage_a; the hook exists because tile_gemm's
// generic staging names it.
fn tile_a(row: u32, d: u32) -> f32 {
    return 0.0;
}

fn tile_b(col: u32, d: u32) -> f32 {
    if c0 + col < mparams.kv_len && d < params.head_dim {
        return load_k(k_base + tile_key_row(col) * params.k_stride_s + d);
    }
    return 0.0;
}

// This invocation's items of Q's slice k0 .. k0 + TILE_K, pre-scaled by scale * log2(e):
// item n holds dim k0 + (li + n INV) % TILE_K of the rows whose first elements are at
// q_row[4 n .. 4 n + 3] (NO_ROW past the rows).
fn q_slice(li: u32, k0: u32, q_row: array<u32, 4u * Q_ITEMS>) -> array<vec4<f32>, Q_ITEMS> {
    let q_scale = params.scale * LOG2E;
    var x = array<vec4<f32>, Q_ITEMS>();
    for (var n = 0u; n < Q_ITEMS; n++) {
        let d = k0 + (li + n * INV) % TILE_K;
        if d < params.head_dim {
            x[n] = vec4<f32>(
                q_elem(q_row[4u * n], d, q_scale),
                q_elem(q_row[4u * n + 1u], d, q_scale),
                q_elem(q_row[4u * n + 2u], d, q_scale),
                q_elem(q_row[4u * n + 3u], d, q_scale),
            );
        }
    }
    return x;
}

// Q's slice from q_slice: into q_res where Q is resident (QR > 0), else into the first half
// of the staging buffer at `base`.
fn put_q(li: u32, k0: u32, x: array<vec4<f32>, Q_ITEMS>, base: u32) {
    for (var n = 0u; n < Q_ITEMS; n++) {
        let idx = li + n * INV;
        let kk = idx % TILE_K;
        if QR > 0u {
            q_res[(k0 + kk) * (TILE_M / 4u) + idx / TILE_K] = x[n];
        } else {
            tile_stage[base + kk * TILE_X + idx / TILE_K] = x[n];
        }
    }
}

fn stage_q(li: u32, k0: u32, q_row: array<u32, 4u * Q_ITEMS>) {
    put_q(li, k0, q_slice(li, k0, q_row), 0u);
}

// Resident Q (QR > 0): all QR * TILE_K dims of the workgroup's rows, pre-scaled, staged once
// before the key loop, [d][row / 4]. Every key tile then stages only K, two slices of TILE_K
// at a time (tile_stage's two halves), so a tile of head_dim 64 takes 4 barriers, not 8, and
// no global reads of Q. Where workgroup memory is short (QR = 0), Q is staged with each
// slice of K.
var<workgroup> q_res: array<vec4<f32>, QR_VEC4S>;

// The block's rows of resident Q at dim d (BR4 vec4s).
fn q_rows(d: u32, ty: u32) -> array<vec4<f32>, BR4> {
    var a = array<vec4<f32>, BR4>();
    for (var g = 0u; g < BR4; g++) {
        a[g] = q_res[d * (TILE_M / 4u) + block_row_group(ty, g)];
    }
    return a;
}

// The block's columns of K at dim k0 + kk of a pair of slices staged by stage_k_pair (or
// put_k) into the buffer at `base`.
fn k_cols(kk: u32, tx: u32, base: u32) -> array<vec4<f32>, BC4> {
    var b = array<vec4<f32>, BC4>();
    for (var j = 0u; j < BC4; j++) {
        b[j] = tile_stage[base + kk * TILE_X + tx + NX * j];
    }
    return b;
}

// This invocation's items of K's slice k0 .. k0 + TILE_K, as stage_k_pair lays them out:
// item n is dim (li + n INV) % TILE_K of keys 4 ((li + n INV) / TILE_K) .. + 3.
fn k_slice(li: u32, k0: u32) -> array<vec4<f32>, K_ITEMS> {
    var x = array<vec4<f32>, K_ITEMS>();
    for (var n = 0u; n < K_ITEMS; n++) {
        let idx = li + n * INV;
        let mq = idx / TILE_K;
        let d = k0 + idx % TILE_K;
        x[n] = vec4<f32>(
            tile_b(mq * 4u, d),
            tile_b(mq * 4u + 1u, d),
            tile_b(mq * 4u + 2u, d),
            tile_b(mq * 4u + 3u, d)
        );
    }
    return x;
}

// K's slice from k_slice, [kk][key / 4], at `at`: a buffer's second half (Q K^T), or its
// first or second half (a pair of slices for resident Q).
fn put_k(li: u32, x: array<vec4<f32>, K_ITEMS>, at: u32) {
    for (var n = 0u; n < K_ITEMS; n++) {
        let idx = li + n * INV;
        tile_stage[at + (idx % TILE_K) * TILE_X + idx / TILE_K] = x[n];
    }
}

// K's dims k0 .. k0 + 2 TILE_K into all of tile_stage, [kk][key / 4]: four keys of one dim per
// item, 16 consecutive dims to 16 consecutive invocations (coalesced reads). Only the first
// slice where head_dim ends inside it. Each invocation stages 1 to 64 items (the workgroup
// has 8 to 256 invocations, a power of two; a slice is 256 items). Not tile_gemm's
// tile_stage_item with K behind tile_a: its operand branch on a run-time side cost 6-17% of
// the kernel's instructions on lavapipe (callgrind, 2026-12-07).
fn stage_k_pair(li: u32, k0: u32) {
    let half = TILE_K * TILE_X;
    let invocations = tile_invocations();
    let per_invocation = select(half, 2u * half, k0 + TILE_K < params.head_dim) / invocations;
    for (var n = 0u; n < per_invocation; n++) {
        let idx = li + n * invocations;
        let kk = idx % TILE_K + TILE_K * (idx / half);
        let mq = (idx % half) / TILE_K;
        var x = vec4<f32>();
        for (var e = 0u; e < 4u; e++) {
            x[e] = tile_b(mq * 4u + e, k0 + kk);
        }
        tile_stage[kk * TILE_X + mq] = x;
    }
}

// The scores of dims k0 .. k0 + 2 TILE_K from the pair of slices of K in the buffer at
// `base` (the second slice only where head_dim reaches it, so that no dim past q_res is
// read).
fn resident_fma(acc: Block, k0: u32, ty: u32, tx: u32, base: u32) -> Block {
    var out = acc;
    for (var k = 0u; k < TILE_K; k++) {
        out = block_fma(out, q_rows(k0 + k, ty), k_cols(k, tx, base));
    }
    if k0 + TILE_K < params.head_dim {
        for (var k = TILE_K; k < 2u * TILE_K; k++) {
            out = block_fma(out, q_rows(k0 + k, ty), k_cols(k, tx, base));
        }
    }
    return out;
}

// One step of Q K^T (QK_STEP dims from k0) from the buffer at `base`.
fn step_fma(acc: Block, k0: u32, ty: u32, tx: u32, base: u32) -> Block {
    if QR > 0u {
        return resident_fma(acc, k0, ty, tx, base);
    }
    return tile_fma_at(acc, ty, tx, base);
}

// The operands of one step of Q K^T, loaded but not yet staged (double buffering): Q's slice
// (without resident Q) and one or two slices of K.
struct QkStep {
    q: array<vec4<f32>, Q_ITEMS>,
    k: array<vec4<f32>, K_ITEMS>,
    k2: array<vec4<f32>, K_ITEMS>,
}

// Loads the step at dims k0 .. k0 + QK_STEP.
fn load_step(li: u32, k0: u32, q_row: array<u32, 4u * Q_ITEMS>) -> QkStep {
    var x = QkStep();
    x.k = k_slice(li, k0);
    if QR > 0u {
        if k0 + TILE_K < params.head_dim {
            x.k2 = k_slice(li, k0 + TILE_K);
        }
    } else {
        x.q = q_slice(li, k0, q_row);
    }
    return x;
}

// Stores a loaded step at dims k0 .. into the buffer at `base`.
fn put_step(li: u32, k0: u32, x: QkStep, base: u32) {
    if QR > 0u {
        put_k(li, x.k, base);
        if k0 + TILE_K < params.head_dim {
            put_k(li, x.k2, base + STAGE_B);
        }
    } else {
        put_q(li, k0, x.q, base);
        put_k(li, x.k, base + STAGE_B);
    }
}

// S = Q K^T for the key tile, double-buffered: the first step staged into buffer 0, then each
// step's FMAs from one buffer while the next step goes from global memory through registers
// into the other; one barrier per step. `live`: whether this invocation computes (see
// rows_live in main). Every invocation calls it.
fn scores_double_buffered(
    li: u32,
    ty: u32,
    tx: u32,
    live: bool,
    q_row: array<u32, 4u * Q_ITEMS>
) -> Block {
    var s = Block();
    put_step(li, 0u, load_step(li, 0u, q_row), 0u);
    workgroupBarrier();
    var base = 0u;
    for (var k0 = 0u; k0 < params.head_dim; k0 += QK_STEP) {
        let next = k0 + QK_STEP;
        let more = next < params.head_dim;
        var x = QkStep();
        if more {
            x = load_step(li, next, q_row);
        }
        if live {
            s = step_fma(s, k0, ty, tx, base);
        }
        base = STAGE_SIZE - base;
        if more {
            put_step(li, next, x, base);
        }
        workgroupBarrier();
    }
    return s;
}

// Item idx of V's slice of BKV keys from the tile's key kv0: four consecutive columns of one
// key, [key][column / 4] (zeros past key_end and v_head_dim).
fn v_item(idx: u32, kv0: u32, v_base: u32) -> vec4<f32> {
    let vk = idx / O_STRIDE;
    let nq = idx % O_STRIDE;
    var vv = vec4<f32>();
    if c0 + kv0 + vk < key_end {
        let row = v_base + tile_key_row(kv0 + vk) * params.v_stride_s;
        for (var e = 0u; e < 4u; e++) {
            let n = nq * 4u + e;
            if n < params.v_head_dim {
                vv[e] = load_v(row + n);
            }
        }
    }
    return vv;
}

// This invocation's items of V's slice from key kv0 (double buffering).
fn v_slice(li: u32, kv0: u32, v_base: u32) -> array<vec4<f32>, V_ITEMS> {
    var x = array<vec4<f32>, V_ITEMS>();
    for (var n = 0u; n < V_ITEMS; n++) {
        let idx = li + n * INV;
        if idx < BKV * O_STRIDE {
            x[n] = v_item(idx, kv0, v_base);
        }
    }
    return x;
}

// V's slice from v_slice into the buffer at `base`.
fn put_v(li: u32, x: array<vec4<f32>, V_ITEMS>, base: u32) {
    for (var n = 0u; n < V_ITEMS; n++) {
        let idx = li + n * INV;
        if idx < BKV * O_STRIDE {
            tile_stage[base + idx] = x[n];
        }
    }
}

// acc += P V over the BKV keys from the tile's key kv0, V staged in the buffer at `base`.
fn pv_fma(acc: array<vec4<f32>, OC * BR>, kv0: u32, ty: u32, tx: u32, base: u32)
    -> array<vec4<f32>, OC * BR> {
    var out = acc;
    for (var k = 0u; k < BKV; k++) {
        var a = array<vec4<f32>, BR4>();
        for (var g = 0u; g < BR4; g++) {
            a[g] = p_tile[kv0 + k][block_row_group(ty, g)];
        }
        // Columns past v_head_dim are staged as zeros and never written: no branch here,
        // which llvmpipe would run as masked updates of acc.
        var vv = array<vec4<f32>, OC>();
        for (var c = 0u; c < OC; c++) {
            vv[c] = tile_stage[base + k * O_STRIDE + tx + NX * c];
        }
        for (var x = 0u; x < OC * BR4; x++) {
            let c = x / BR4;
            let g = x % BR4;
            out[c * BR + 4u * g] += a[g].x * vv[c];
            out[c * BR + 4u * g + 1u] += a[g].y * vv[c];
            out[c * BR + 4u * g + 2u] += a[g].z * vv[c];
            out[c * BR + 4u * g + 3u] += a[g].w * vv[c];
        }
    }
    return out;
}

// Element n of the output row at `row`: O (one split), plus w_prev times what earlier
// dispatches wrote there, or the split's partial output (several splits). Columns past
// v_head_dim are not written.
fn write_out(row: u32, n: u32, x: f32, w_prev: f32) {
    if n >= params.v_head_dim {
        return;
    }
    if params.splits == 1u {
        var y = x;
        // Never read O unless it was written: a fresh output may hold anything.
        if w_prev > 0.0 {
            y += w_prev * load_o(row + n);
        }
        store_o(row + n, y);
    } else {
        lse_or_partials[row + n] = bitcast<u32>(x);
    }
}

@compute @workgroup_size(NX * (TILE_M / BR))
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) num_wg: vec3<u32>,
    inv: TileRowsInvocation,
) {
    let id = workgroup_index(wg, num_wg);
    if id >= params.groups_total {
        return;
    }
    // (tx, ty) of this invocation's block, and its index for staging (lib/tile_rows_*.wgsl).
    let place = tile_place(inv);
    let tx = place.x;
    let ty = place.y;
    let li = place.z;
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
    let q_len = mparams.q_len;
    let kv_len = mparams.kv_len;

    // This invocation's BR rows: query head, query row, key range.
    var row_h = array<u32, BR>();
    var row_i = array<u32, BR>();
    var lo = array<i32, BR>();
    var hi = array<i32, BR>();
    // Sink keys 0..se (all 0 without HAS_SINK_KEYS), and ALiBi's per-row values.
    var se = array<i32, BR>();
    var alibi = array<AlibiRow, BR>();
    // Dropout's per-row state (lib/masking.wgsl; zeros without dropout).
    var drow = array<vec2<u32>, BR>();
    for (var r = 0u; r < BR; r++) {
        let pr = r0 + block_row(ty, r);
        row_h[r] = kvh * params.group + pr / q_len;
        row_i[r] = pr % q_len;
        var range = vec2<i32>(0, 0);
        if pr < params.packed_rows {
            range = key_range(b, row_i[r]);
            se[r] = sink_end(b, row_i[r]);
            alibi[r] = alibi_row(b, row_h[r], row_i[r]);
            drow[r] = dropout_row(b * params.heads + row_h[r], row_i[r]);
        }
        lo[r] = range.x;
        hi[r] = range.y;
    }
    // The rows of Q this invocation stages.
    var q_row = array<u32, 4u * Q_ITEMS>();
    for (var x = 0u; x < 4u * Q_ITEMS; x++) {
        let mq = (li + (x / 4u) * tile_invocations()) / TILE_K;
        let sr = r0 + mq * 4u + x % 4u;
        let sh = kvh * params.group + sr / q_len;
        let si = sr % q_len;
        // Rows past a packed sequence are the next one's: never read (their keys are none).
        q_row[x] = select(
            NO_ROW,
            b * params.q_stride_b + sh * params.q_stride_h + q_slot(b, si) * params.q_stride_s,
            sr < params.packed_rows && row_is_real(b, si)
        );
    }
    if li == 0u {
        // This split's (or this dispatch's) share of the key tiles, and the keys every row may
        // see.
        var hull = range_hull_new(kv_len);
        for (var m = 0u; m < TILE_M && r0 + m < params.packed_rows; m++) {
            let i = (r0 + m) % q_len;
            hull = range_hull_add(hull, key_range(b, i), sink_end(b, i));
        }
        let first = params.first_tile + split * params.tiles_per_split;
        let bounds = range_hull_bounds(hull, first, params.tiles_per_split);
        tile_bounds = bounds;
        hole_tiles = range_hull_hole_tiles(hull);
        key_end = u32(max(hull.union_hi, 0));
    }
    if MMA == 1u {
        // Read after the barrier of workgroupUniformLoad below.
        mma_stage_q(li, b, kvh);
    } else if QR > 0u {
        // Resident Q, read after the barrier of workgroupUniformLoad below.
        for (var k0 = 0u; k0 < QR * TILE_K; k0 += TILE_K) {
            stage_q(li, k0, q_row);
        }
    }
    let bounds = workgroupUniformLoad(&tile_bounds);
    var hole = vec2<u32>(0u, 0u);
    if HAS_SINK_KEYS {
        hole = workgroupUniformLoad(&hole_tiles);
    }

    // Whether any of this invocation's rows is real (its first row is its smallest). A tile of
    // 64 rows serving a GQA group of a few queries (decoding) is mostly padding: those
    // invocations skip the products (no barrier inside them), so whole warps idle instead of
    // computing rows nobody reads.
    let rows_live = r0 + block_row(ty, 0u) < params.packed_rows;
    var m_run = array<f32, BR>();
    var l_run = array<f32, BR>();
    for (var r = 0u; r < BR; r++) {
        m_run[r] = NEG_BIG;
    }
    // [c * BR + r]: columns 4 (tx + NX c) .. + 3 of block row r.
    var acc = array<vec4<f32>, OC * BR>();
    // Double buffering: the next slice of V, loaded and not yet staged.
    var v_next = array<vec4<f32>, V_ITEMS>();
    for (var t = bounds.x; t < bounds.y; t++) {
        if HAS_SINK_KEYS && t >= hole.x && t < hole.y {
            // No row sees these keys: on to the window.
            t = hole.y;
            if t >= bounds.y {
                break;
            }
        }
        c0 = t * TILE;
        if HAS_PAGES || HAS_VARLEN {
            // The previous tile's last barrier: nobody reads the old slots any more. Keys past
            // the sequence stage its last key's row (their scores are masked): a packed
            // sequence's next rows are another's, and past the last one's, none.
            let last = max(seq_kv_len(b), 1u) - 1u;
            for (var n = li; n < TILE; n += tile_invocations()) {
                key_slots[n] = key_slot(b, min(c0 + n, last));
            }
            workgroupBarrier();
        }

        // S = Q K^T for the 64 x 64 tile, over head_dim in slices of 16 (pairs of slices of K
        // where Q is resident).
        var s = Block();
        if MMA == 1u {
            s = mma_scores(li, ty, tx);
        } else if DB {
            s = scores_double_buffered(li, ty, tx, rows_live, q_row);
            // V's first slice, loaded now so that its latency hides behind the softmax.
            v_next = v_slice(li, 0u, v_base);
        } else if QR > 0u {
            for (var k0 = 0u; k0 < params.head_dim; k0 += 2u * TILE_K) {
                stage_k_pair(li, k0);
                workgroupBarrier();
                if rows_live {
                    s = resident_fma(s, k0, ty, tx, 0u);
                }
                workgroupBarrier();
            }
        } else {
            for (var k0 = 0u; k0 < params.head_dim; k0 += TILE_K) {
                stage_q(li, k0, q_row);
                tile_stage_b(li, k0);
                workgroupBarrier();
                if rows_live {
                    s = tile_fma(s, ty, tx);
                }
                workgroupBarrier();
            }
        }

        // Mask, adjust, and the tile's row maxima (log2 units); masked scores are NEG_BIG
        // (every allowed one is at least SCORE_FLOOR2). A tile inside every row's key range,
        // with no per-key option, is only floored. Block row x / BC4's columns
        // 4 (tx + NX (x % BC4)) .. + 3 are four consecutive keys.
        let untouched = !per_key_options() && c0 >= bounds.z && c0 + TILE <= bounds.w;
        if untouched {
            for (var x = 0u; x < BR * BC4; x++) {
                s[x] = max(s[x], vec4<f32>(SCORE_FLOOR2));
            }
        } else {
            for (var x = 0u; x < BR * BC4; x++) {
                let r = x / BC4;
                let j = c0 + block_col(tx, 4u * (x % BC4));
                let h = row_h[r];
                let i = row_i[r];
                let a = alibi[r];
                s[x] = vec4<f32>(
                    masked_score(s[x].x, b, h, i, j, lo[r], hi[r], se[r], a),
                    masked_score(s[x].y, b, h, i, j + 1u, lo[r], hi[r], se[r], a),
                    masked_score(s[x].z, b, h, i, j + 2u, lo[r], hi[r], se[r], a),
                    masked_score(s[x].w, b, h, i, j + 3u, lo[r], hi[r], se[r], a),
                );
            }
        }
        var tile_max = array<f32, BR>();
        for (var r = 0u; r < BR; r++) {
            tile_max[r] = NEG_BIG;
        }
        for (var x = 0u; x < BR * BC4; x++) {
            tile_max[x / BC4] = max(tile_max[x / BC4], hmax(s[x]));
        }
        tile_max = rows_max(tile_max, ty, tx);

        // Probabilities: to registers for the row sums, to p_tile for P·V.
        var corr = array<f32, BR>();
        for (var r = 0u; r < BR; r++) {
            let m_new = max(m_run[r], tile_max[r]);
            corr[r] = exp2(m_run[r] - m_new);
            m_run[r] = m_new;
            l_run[r] *= corr[r];
        }
        for (var x = 0u; x < BR * BC4; x++) {
            let p = select(vec4<f32>(), exp2(s[x] - m_run[x / BC4]), s[x] > vec4<f32>(NEG_BIG));
            l_run[x / BC4] += hsum(p);
            if HAS_DROPOUT {
                // The row sums count every weight; P·V only the kept ones (scaled at the end).
                let j = c0 + block_col(tx, 4u * (x % BC4));
                let d = drow[x / BC4];
                s[x] = select(vec4<f32>(), p, vec4<bool>(
                    dropout_keeps(d, j),
                    dropout_keeps(d, j + 1u),
                    dropout_keeps(d, j + 2u),
                    dropout_keeps(d, j + 3u),
                ));
            } else {
                s[x] = p;
            }
        }
        for (var x = 0u; x < OC * BR; x++) {
            acc[x] *= corr[x % BR];
        }
        // Key block_col(tx, c)'s probabilities of rows 4 (ty + NY g) .. + 3.
        for (var x = 0u; x < BC * BR4 * (1u - MMA); x++) {
            let c = x / BR4;
            let g = x % BR4;
            p_tile[block_col(tx, c)][block_row_group(ty, g)] = vec4<f32>(
                s[(4u * g) * BC4 + c / 4u][c % 4u],
                s[(4u * g + 1u) * BC4 + c / 4u][c % 4u],
                s[(4u * g + 2u) * BC4 + c / 4u][c % 4u],
                s[(4u * g + 3u) * BC4 + c / 4u][c % 4u],
            );
        }

        // O += P V over the tile's keys, in slices of BKV keys of V (staged in tile_stage).
        if MMA == 1u {
            mma_put_p(s, ty, tx);
            acc = mma_pv(acc, li, ty, tx, v_base);
        } else if DB {
            // The first slice into buffer 0 (free since the last step's barrier), then one
            // barrier per slice, the next slice loaded during this one's FMAs.
            put_v(li, v_next, 0u);
            workgroupBarrier();
            var base = 0u;
            for (var kv0 = 0u; kv0 < TILE; kv0 += BKV) {
                let more = kv0 + BKV < TILE;
                if more {
                    v_next = v_slice(li, kv0 + BKV, v_base);
                }
                if rows_live {
                    acc = pv_fma(acc, kv0, ty, tx, base);
                }
                base = STAGE_SIZE - base;
                if more {
                    put_v(li, v_next, base);
                }
                workgroupBarrier();
            }
        } else {
            for (var kv0 = 0u; kv0 < TILE; kv0 += BKV) {
                workgroupBarrier();
                let slice = BKV * O_STRIDE;
                // A constant trip count (see tile_gemm's staging).
                for (var n = 0u; n < (slice + INV - 1u) / INV; n++) {
                    let idx = li + n * INV;
                    if idx >= slice {
                        break;
                    }
                    tile_stage[idx] = v_item(idx, kv0, v_base);
                }
                workgroupBarrier();
                if rows_live {
                    acc = pv_fma(acc, kv0, ty, tx, 0u);
                }
            }
            workgroupBarrier();
        }
    }

    // Row sums across the NX invocations of each row, then normalise and write.
    let l_row = rows_sum(l_run, ty, tx);
    // Resuming: the log-sum-exp of the earlier dispatches, read by every invocation of a row
    // before the barrier, after which one of them overwrites it. The read and the write are of
    // storage memory, which workgroupBarrier does not order (its semantics cover workgroup
    // memory only): storageBarrier does (an independent review of GPU-only races found it).
    var prev_lse = array<u32, BR>();
    for (var r = 0u; r < BR; r++) {
        prev_lse[r] = NEG_INF_BITS;
        if params.resume != 0u && r0 + block_row(ty, r) < params.packed_rows {
            prev_lse[r] = lse_or_partials[(b * params.heads + row_h[r]) * q_len + row_i[r]];
        }
    }
    workgroupBarrier();
    storageBarrier();

    // Per row: where its output goes (NO_ROW for padding rows), the factor of this dispatch's
    // O and the weight of the O earlier dispatches wrote; then every element in one flat loop.
    let bh_count = mparams.batch * params.heads;
    var o_row = array<u32, BR>();
    var o_scale = array<f32, BR>();
    var o_prev = array<f32, BR>();
    for (var r = 0u; r < BR; r++) {
        o_row[r] = NO_ROW;
        if r0 + block_row(ty, r) < params.packed_rows {
            let h = row_h[r];
            let i = row_i[r];
            let bh = b * params.heads + h;
            let l = l_row[r];
            let inv = select(0.0, 1.0 / l, l > 0.0);
            let new_lse = lse_of(m_run[r] * LN2, l);
            if params.splits == 1u {
                // The earlier dispatches' O and this one's, weighted by their log-sum-exps; a
                // sink joins the first dispatch as a part with no output.
                var sum = lse_add(LseSum(0.0, 0.0), prev_lse[r]);
                let sink = HAS_SINKS && params.resume == 0u;
                if sink {
                    sum = lse_add(sum, sink_bits(h));
                }
                sum = lse_add(sum, new_lse);
                let w_new = select(
                    1.0,
                    lse_weight(sum, new_lse),
                    prev_lse[r] != NEG_INF_BITS || sink
                );
                if row_is_real(b, i) {
                    o_row[r] = b * params.o_stride_b + h * params.o_stride_h
                        + q_slot(b, i) * params.o_stride_s;
                }
                o_scale[r] = inv * w_new * dropout_row_scale() * mparams.v_scale;
                o_prev[r] = lse_weight(sum, prev_lse[r]);
                if tx == 0u && params.write_lse != 0u {
                    lse_or_partials[bh * q_len + i] = lse_total(sum);
                }
            } else {
                let part_row = (split * bh_count + bh) * q_len + i;
                o_row[r] = part_row * params.v_head_dim;
                o_scale[r] = inv * dropout_row_scale() * mparams.v_scale;
                if tx == 0u {
                    lse_or_partials[params.parts_lse_offset + part_row] = new_lse;
                }
            }
        }
    }
    // Scaled into a copy first, in a loop small enough to unroll: the writing loop is not
    // unrolled on llvmpipe, and indexing acc there kept all of acc in memory for the whole
    // kernel (30% more instructions at D=72).
    var out = array<vec4<f32>, OC * BR>();
    for (var x = 0u; x < OC * BR; x++) {
        out[x] = acc[x] * o_scale[x % BR];
    }
    for (var x = 0u; x < OC * BR; x++) {
        let r = x % BR;
        if o_row[r] != NO_ROW {
            let n = (tx + NX * (x / BR)) * 4u;
            write_out(o_row[r], n, out[x].x, o_prev[r]);
            write_out(o_row[r], n + 1u, out[x].y, o_prev[r]);
            write_out(o_row[r], n + 2u, out[x].z, o_prev[r]);
            write_out(o_row[r], n + 3u, out[x].w, o_prev[r]);
        }
    }
}
