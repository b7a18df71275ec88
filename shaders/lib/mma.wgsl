// Tile products of flash_attention.wgsl on 16-bit operands (MMA = 1): the shape a cooperative
// matrix (tensor core, simdgroup matrix) multiplies. Q, K and V are f16 tensors, staged as
// f16 in workgroup memory, 64 dims (or columns) at a time; S = Q K^T and each 64-column
// chunk of P V land in `mma_s` (f32), from where every invocation takes the same BR x BC
// block (and O columns) the scalar kernel computes in registers, so the masking, the online
// softmax and the epilogue are the scalar kernel's, unchanged. P goes back to f16 in `mma_p`
// for P V.
// The products themselves come from one of two fragments with the same interface:
// lib/mma_cooperative.wgsl (coopMultiplyAdd: one subgroup per CM x CM tile of the result)
// and lib/mma_emulated.wgsl (plain FMAs over the same staged operands, on any adapter with
// SHADER_F16: what the tests run where no cooperative matrices exist, so that everything in
// this file is checked on every adapter).
// From the key: CM (the matrices' size: 16, or 8 on Metal); QD and VD, head_dim and
// v_head_dim rounded up to CM, or to a multiple of 64 past 64; SG (the device's subgroup
// size, cooperative only). Rows are 4 ROWS4.
// Workgroup memory at 64 rows: 16 KiB of S, 8 of P, 8 of a slice of Q, 8 of a slice of K or
// V, whatever the widths.

const MMA_ROWS: u32 = 4u * ROWS4;
// Dims of Q and K per slice, and the slices; columns of V and P V per chunk, and the chunks.
const QS: u32 = min(QD, TILE);
const Q_SLICES: u32 = QD / QS;
const PV_COLS: u32 = min(VD, TILE);
const PV_CHUNKS: u32 = VD / PV_COLS;
// Row length of the staged K slice or V chunk.
const KVW: u32 = max(QS, PV_COLS);

// A slice of the workgroup's rows of Q, unscaled, [row][QS] (zeros past head_dim and past the
// rows): staged once where Q is one slice, else with each slice of K.
var<workgroup> mma_q: array<f16, MMA_ROWS * QS>;
// A slice of the key tile's K, or a chunk of its V, [key][KVW] (zeros past the keys and past
// the widths).
var<workgroup> mma_kv: array<f16, TILE * KVW>;
// S (summed over the slices), then each chunk of P V, [row][TILE] in f32.
var<workgroup> mma_s: array<f32, MMA_ROWS * TILE>;
// P, [row][key].
var<workgroup> mma_p: array<f16, MMA_ROWS * TILE>;
// A CM x CM matrix of zeros: the accumulator every product starts from (a whole matrix, not
// one row read with stride 0, which Vulkan's rules on strides may not allow).
var<workgroup> mma_zero: array<f32, CM * CM>;

// The workgroup's batch entry and kv head (for staging Q).
var<private> mma_b: u32;
var<private> mma_kvh: u32;

// Stages dims d0 .. d0 + QS of the workgroup's rows of Q (r0 set).
fn mma_stage_q_slice(li: u32, d0: u32) {
    let q_len = mparams.q_len;
    for (var idx = li; idx < MMA_ROWS * QS; idx += INV) {
        let sr = r0 + idx / QS;
        let d = d0 + idx % QS;
        var x = 0.0;
        if sr < params.packed_rows && d < params.head_dim {
            let si = sr % q_len;
            if row_is_real(mma_b, si) {
                let sh = mma_kvh * params.group + sr / q_len;
                x = load_q(
                    mma_b * params.q_stride_b + sh * params.q_stride_h
                        + q_slot(mma_b, si) * params.q_stride_s + d
                );
            }
        }
        mma_q[idx] = f16(x);
    }
}

// Before the key loop (batch entry b, kv head kvh; r0 set): the zeros, and Q where it is one
// slice. The caller's next barrier publishes them.
fn mma_stage_q(li: u32, b: u32, kvh: u32) {
    mma_b = b;
    mma_kvh = kvh;
    for (var i = li; i < CM * CM; i += INV) {
        mma_zero[i] = 0.0;
    }
    if Q_SLICES == 1u {
        mma_stage_q_slice(li, 0u);
    }
}

// This invocation's BR x BC block of S = Q K^T for the key tile at c0, pre-scaled by
// scale * log2(e) like the scalar kernel's. Every invocation calls it (two barriers a slice).
fn mma_scores(li: u32, ty: u32, tx: u32) -> Block {
    for (var sl = 0u; sl < Q_SLICES; sl++) {
        let d0 = sl * QS;
        if Q_SLICES > 1u {
            mma_stage_q_slice(li, d0);
        }
        // Four dims of one key per item; tile_b gives zeros past kv_len and head_dim.
        for (var idx = li; idx < TILE * QS / 4u; idx += INV) {
            let key = idx / (QS / 4u);
            let d = (idx % (QS / 4u)) * 4u;
            for (var e = 0u; e < 4u; e++) {
                mma_kv[key * KVW + d + e] = f16(tile_b(key, d0 + d + e));
            }
        }
        workgroupBarrier();
        if sl == 0u {
            mma_scores_product(li);
        } else {
            mma_scores_product_add(li);
        }
        workgroupBarrier();
    }
    let q_scale = params.scale * LOG2E;
    var s = Block();
    for (var x = 0u; x < BR * BC4; x++) {
        let at = block_row(ty, x / BC4) * TILE + block_col(tx, 4u * (x % BC4));
        s[x] = vec4<f32>(mma_s[at], mma_s[at + 1u], mma_s[at + 2u], mma_s[at + 3u]) * q_scale;
    }
    return s;
}

// Stores this invocation's block of probabilities into mma_p (published by mma_pv's first
// barrier; every read of the previous tile's P is behind an earlier one).
fn mma_put_p(s: Block, ty: u32, tx: u32) {
    for (var x = 0u; x < BR * BC4; x++) {
        let at = block_row(ty, x / BC4) * TILE + block_col(tx, 4u * (x % BC4));
        for (var e = 0u; e < 4u; e++) {
            mma_p[at + e] = f16(s[x][e]);
        }
    }
}

// acc += P V for the key tile (V of the kv head at v_base), a chunk of PV_COLS columns at a
// time: V's chunk staged, the product into mma_s, each invocation's columns added. Every
// invocation calls it (three barriers a chunk).
fn mma_pv(acc: array<vec4<f32>, OC * BR>, li: u32, ty: u32, tx: u32, v_base: u32)
    -> array<vec4<f32>, OC * BR> {
    var out = acc;
    for (var chunk = 0u; chunk < PV_CHUNKS; chunk++) {
        let n0 = chunk * PV_COLS;
        // Four columns of one key per item: zeros past key_end (rows past kv_lens may hold
        // anything, NaN included) and past v_head_dim.
        for (var idx = li; idx < TILE * PV_COLS / 4u; idx += INV) {
            let key = idx / (PV_COLS / 4u);
            let n = (idx % (PV_COLS / 4u)) * 4u;
            var vv = vec4<f32>();
            if c0 + key < key_end {
                let row = v_base + tile_key_row(key) * params.v_stride_s;
                for (var e = 0u; e < 4u; e++) {
                    if n0 + n + e < params.v_head_dim {
                        vv[e] = load_v(row + n0 + n + e);
                    }
                }
            }
            for (var e = 0u; e < 4u; e++) {
                mma_kv[key * KVW + n + e] = f16(vv[e]);
            }
        }
        workgroupBarrier();
        mma_pv_product(li);
        workgroupBarrier();
        for (var x = 0u; x < OC * BR; x++) {
            let col = 4u * (tx + NX * (x / BR));
            if col >= n0 && col < n0 + PV_COLS {
                let at = block_row(ty, x % BR) * TILE + col - n0;
                out[x] += vec4<f32>(mma_s[at], mma_s[at + 1u], mma_s[at + 2u], mma_s[at + 3u]);
            }
        }
        workgroupBarrier();
    }
    return out;
}
