// The masking rules every attention kernel shares (DESIGN.md, steps 2 to 4), mirroring
// `Spec::key_range` on the CPU: change one, change the other. A kernel that includes it lists
// in its slots `mparams: MaskParams` (uniform) and `lens: array<u32>` (kv_lens[0..batch], then
// q_lens[batch..2 * batch], then from mparams.alibi_offset the ALiBi slopes and from
// mparams.sink_offset the sink logits, both as f32 bits, then from mparams.page_offset the
// block table of paged K/V, from mparams.varlen_offset a packed batch's offsets, and from
// mparams.mod_offset the score mod's words), and reads the bias and the boolean mask (one byte per element,
// four to a word) through `bias_at` and `mask_word`: lib/options_apart.wgsl (the kernel also
// binds `bias: array<f32>` and `mask: array<u32>`) or lib/options_packed.wgsl (both in `lens`,
// from mparams.mask_offset and mparams.bias_offset: two storage buffers fewer).
//
// The options that act key by key (boolean mask, bias, softcap) are compiled in: these
// pipeline constants are part of the kernel's key, so a call without them runs none of their
// code. The options that only narrow each row's key range (causal, window, kv_lens, q_lens) are
// read from mparams: they cost a few operations per row in key_range, and the fused kernel
// only checks the range on key tiles that straddle a boundary, so compiling them in too would
// multiply the pipelines by 24 for no work saved in the inner loop.
override HAS_BIAS: bool = false;
override HAS_MASK: bool = false;
override HAS_SOFTCAP: bool = false;
// ALiBi, learnable sinks and StreamingLLM's sink keys: ALiBi acts key by key; a sink only at
// the end of a row; sink keys widen key ranges (sink_end), which the kernels check per key
// only where they hold such ranges.
override HAS_ALIBI: bool = false;
override HAS_SINKS: bool = false;
override HAS_SINK_KEYS: bool = false;
// Paged K/V (vLLM's layout): key j of sequence b is row key_slot(b, j) of the K and V pools.
override HAS_PAGES: bool = false;
// Keys per page, compiled in (a constant divisor is a multiply and a shift; a divisor read at
// run time, and the branch that picked shifts for powers of two, cost paged decoding 40% on
// llvmpipe).
override PAGE_SIZE: u32 = 1u;

// Dropout on the weights (spec::Dropout): which weights a row keeps is a hash of the call's
// key (mparams.dropout_key_a, _b, from the seed), the row's head and row, and the key; a
// weight is kept where its bits reach mparams.dropout_threshold, and then scaled by
// mparams.dropout_scale. Dropout::keeps computes the same bits on the CPU: change one, change
// the other.
override HAS_DROPOUT: bool = false;
// The user's mask and score mods (wgpu_attention::ScoreMod): the host appends their WGSL
// (`attn_mask_mod`, `attn_score_mod`, `attn_score_mod_grad`; identities when the call has
// none) to every kernel that includes this file. Their data is in `lens` from
// mparams.mod_offset.
override HAS_MASK_MOD: bool = false;
override HAS_SCORE_MOD: bool = false;
// A key range of the user's (`attn_key_range`): narrows key_range as the window does.
override HAS_KEY_RANGE: bool = false;

// What a mod's WGSL may call beside its arguments (score_mod.rs's module docs).
fn attn_data(k: u32) -> u32 {
    return lens[mparams.mod_offset + k];
}

fn attn_data_f32(k: u32) -> f32 {
    return bitcast<f32>(attn_data(k));
}

fn attn_q_len(b: u32) -> u32 {
    return seq_q_len(b);
}

fn attn_kv_len(b: u32) -> u32 {
    return seq_kv_len(b);
}

// The score mod's result, clamped to the floor and its negation (NaN to the floor).
fn score_mod_clamped(s: f32, b: u32, h: u32, i: u32, j: u32) -> f32 {
    let y = attn_score_mod(s, b, h, i, j);
    return select(SCORE_FLOOR, min(y, -SCORE_FLOOR), y >= SCORE_FLOOR);
}

// One round of Wellons' lowbias32 hash (spec::mix32).
fn mix32(x0: u32) -> u32 {
    var x = x0;
    x ^= x >> 16u;
    x *= 0x7feb352du;
    x ^= x >> 15u;
    x *= 0x846ca68bu;
    x ^= x >> 16u;
    return x;
}

// The dropout state of row i of head bh = b * heads + h: computed once per row.
fn dropout_row(bh: u32, i: u32) -> vec2<u32> {
    if !HAS_DROPOUT {
        return vec2<u32>(0u, 0u);
    }
    let ka = mparams.dropout_key_a;
    let kb = mparams.dropout_key_b;
    return vec2<u32>(mix32(mix32(bh ^ ka) + i), mix32(mix32(bh ^ kb) ^ mix32(i + kb)));
}

// Whether the row of state `row` keeps key j's weight (always, without dropout).
fn dropout_keeps(row: vec2<u32>, j: u32) -> bool {
    if !HAS_DROPOUT {
        return true;
    }
    return mix32(mix32(j ^ row.x) + row.y) >= mparams.dropout_threshold;
}

// The factor of key j's weight in the row of state `row`: 0 where dropped, dropout_scale where
// kept, 1 without dropout.
fn dropout_factor(row: vec2<u32>, j: u32) -> f32 {
    if !HAS_DROPOUT {
        return 1.0;
    }
    return select(0.0, mparams.dropout_scale, dropout_keeps(row, j));
}

// The factor of a whole output row: dropout_scale with dropout (the kernels sum the kept
// weights unscaled and scale the row once), 1 without.
fn dropout_row_scale() -> f32 {
    if !HAS_DROPOUT {
        return 1.0;
    }
    return mparams.dropout_scale;
}

// A packed batch (FlashAttention's varlen): every sequence's rows in one tensor, sequence b's
// from lens[varlen_offset + b] (queries) and lens[varlen_offset + batch + 1 + b] (keys); the
// lengths are in kv_lens and q_lens as usual.
override HAS_VARLEN: bool = false;

// The row of query row i of sequence b in Q and O: i, or its place among the packed rows.
fn q_slot(b: u32, i: u32) -> u32 {
    if !HAS_VARLEN {
        return i;
    }
    return lens[mparams.varlen_offset + b] + i;
}

// Whether query row i of sequence b has a row of Q and O: always, but past a packed
// sequence's rows (which belong to the next sequence).
fn row_is_real(b: u32, i: u32) -> bool {
    if !HAS_VARLEN {
        return true;
    }
    return i < seq_q_len(b);
}

// Keys of sequence b: kv_len, or its own length where the call has lengths (clamped, as
// seq_q_len).
fn seq_kv_len(b: u32) -> u32 {
    if mparams.has_kv_lens != 0u {
        return min(lens[b], mparams.kv_len);
    }
    return mparams.kv_len;
}

// The row of key j of sequence b in K and V: j, its place among a packed batch's rows, or
// with pages, its page's row in the pool (page * page_size + j % page_size, the page from the
// block table in `lens`).
fn key_slot(b: u32, j: u32) -> u32 {
    if HAS_VARLEN {
        return lens[mparams.varlen_offset + mparams.batch + 1u + b] + j;
    }
    if !HAS_PAGES {
        return j;
    }
    let page = lens[mparams.page_offset + b * mparams.pages_per_seq + j / PAGE_SIZE];
    return page * PAGE_SIZE + j % PAGE_SIZE;
}

// Whether scores need work key by key beyond scaling (a boolean mask, a bias, a softcap,
// ALiBi).
fn per_key_options() -> bool {
    return HAS_MASK || HAS_BIAS || HAS_SOFTCAP || HAS_ALIBI || HAS_MASK_MOD || HAS_SCORE_MOD;
}

// Whether keys are removed one by one (a boolean mask or a mask mod), beyond key ranges.
fn masks_keys() -> bool {
    return HAS_MASK || HAS_MASK_MOD;
}

// Keys lo..hi (half open) that kv_lens, causal alignment, the window and q_lens leave to
// query row i of batch entry b; the boolean mask is checked per key on top, and the sink keys
// 0 .. sink_end(b, i) are allowed beside it.
fn key_range(b: u32, i: u32) -> vec2<i32> {
    return key_range_of(b, i, true);
}

// kv_len - q_len of sequence b (its own lengths where the call has them).
fn sequence_shift(b: u32) -> i32 {
    return i32(seq_kv_len(b)) - i32(seq_q_len(b));
}

// Query rows of sequence b: q_len, or its own length where the call has lengths (clamped:
// lengths on the device are not checked on the host).
fn seq_q_len(b: u32) -> u32 {
    if mparams.has_q_lens != 0u {
        return min(lens[mparams.batch + b], mparams.q_len);
    }
    return mparams.q_len;
}

// StreamingLLM: keys 0 .. sink_end(b, i) are visible to row i beside its window, as far as
// causal masking and the lengths allow (Spec::sink_end on the CPU); 0 without sink keys.
fn sink_end(b: u32, i: u32) -> i32 {
    if !HAS_SINK_KEYS {
        return 0;
    }
    return min(i32(mparams.sink_keys), key_range_of(b, i, false).y);
}

// Whether key j is in a row's keys: its range lo..hi, or its sink keys 0..se.
fn in_keys(j: u32, lo: i32, hi: i32, se: i32) -> bool {
    let k = i32(j);
    return (k >= lo && k < hi) || (HAS_SINK_KEYS && k < se);
}

// The sink logit of query head h, as log-sum-exp bits (a part with no output that joins the
// softmax denominator: lib/lse.wgsl's lse_add folds it in).
fn sink_bits(h: u32) -> u32 {
    return lens[mparams.sink_offset + h];
}

// key_range, narrowed by the window and the user's key range (`narrow`) or not (the range
// the sink keys are taken from).
fn key_range_of(b: u32, i: u32, narrow: bool) -> vec2<i32> {
    let row = i32(i);
    // Bottom-right alignment follows each sequence's own lengths.
    let kv_len = i32(seq_kv_len(b));
    let q_len = i32(seq_q_len(b));
    let shift = kv_len - q_len;
    var lo = 0;
    var hi = kv_len;
    if mparams.causal == CAUSAL_TOP_LEFT {
        hi = min(hi, row + 1);
    } else if mparams.causal == CAUSAL_BOTTOM_RIGHT {
        hi = min(hi, row + shift + 1);
    }
    if narrow && mparams.has_window != 0u {
        // win_off is 0 for top-left alignment, or 1 for bottom-right: then the shift applies.
        let off = mparams.win_off * shift;
        lo = max(lo, row + off - mparams.win_left);
        hi = min(hi, row + off + mparams.win_right + 1);
    }
    if HAS_KEY_RANGE && narrow {
        let r = min(attn_key_range(b, i), vec2<u32>(u32(kv_len)));
        lo = max(lo, i32(r.x));
        hi = min(hi, i32(r.y));
    }
    if row >= q_len {
        hi = 0;
    }
    return vec2<i32>(lo, max(hi, lo));
}

// The score of (b, h, i, j) after softcap, score mod, bias and ALiBi, from the scaled dot
// product s.
fn adjust_score(s: f32, b: u32, h: u32, i: u32, j: u32) -> f32 {
    return adjust_score_with(s, b, h, i, j, alibi_row(b, h, i));
}

// What the per-key ALiBi term of a row needs: its slope and its aligned diagonal i + off
// (Spec::diagonal_offset), computed once per row by the fused kernels.
struct AlibiRow {
    slope: f32,
    diagonal: i32,
}

// Row i of head h of batch entry b's AlibiRow; zeros without ALiBi.
fn alibi_row(b: u32, h: u32, i: u32) -> AlibiRow {
    if !HAS_ALIBI {
        return AlibiRow(0.0, 0);
    }
    let slope = bitcast<f32>(lens[mparams.alibi_offset + b * mparams.alibi_stride_b + h]);
    return AlibiRow(slope, i32(i) + mparams.win_off * sequence_shift(b));
}

// adjust_score with the row's alibi_row.
fn adjust_score_with(s: f32, b: u32, h: u32, i: u32, j: u32, alibi: AlibiRow) -> f32 {
    var x = s;
    if HAS_SOFTCAP {
        // Clamped: tanh(10) is 1 in f32, and some drivers overflow inside tanh for large inputs.
        x = mparams.softcap * tanh(clamp(x / mparams.softcap, -10.0, 10.0));
    }
    if HAS_SCORE_MOD {
        x = score_mod_clamped(x, b, h, i, j);
    }
    if HAS_BIAS {
        let p = mparams;
        x += bias_at(b * p.bias_stride_b + h * p.bias_stride_h + i * p.bias_stride_i + j * p.bias_stride_j);
    }
    if HAS_ALIBI {
        // -slope * |i + off - j|; the distance in i32, exact at any length.
        x -= alibi.slope * f32(abs(alibi.diagonal - i32(j)));
    }
    return max(x, SCORE_FLOOR);
}

fn mask_allows(b: u32, h: u32, i: u32, j: u32) -> bool {
    if HAS_MASK_MOD && !attn_mask_mod(b, h, i, j) {
        return false;
    }
    if !HAS_MASK {
        return true;
    }
    let p = mparams;
    let e = b * p.mask_stride_b + h * p.mask_stride_h + i * p.mask_stride_i + j * p.mask_stride_j;
    return ((mask_word(e >> 2u) >> ((e & 3u) * 8u)) & 0xffu) != 0u;
}

// The key ranges of a workgroup's rows, gathered with range_hull_add: their union bounds the
// key tiles to visit, their intersection the keys no range restriction touches. With sink
// keys, hole_lo .. hole_hi are keys between every row's sink keys and its window, which no
// row sees.
struct RangeHull {
    union_lo: i32,
    union_hi: i32,
    common_lo: i32,
    common_hi: i32,
    hole_lo: i32,
    hole_hi: i32,
}

fn range_hull_new(kv_len: u32) -> RangeHull {
    return RangeHull(i32(kv_len), 0, 0, i32(kv_len), 0, i32(kv_len));
}

// Adds a row's range lo..hi and its sink keys 0..se.
fn range_hull_add(h: RangeHull, range: vec2<i32>, se: i32) -> RangeHull {
    var out = h;
    if range.y > range.x {
        out.union_lo = min(out.union_lo, range.x);
        out.union_hi = max(out.union_hi, range.y);
        out.hole_hi = min(out.hole_hi, range.x);
    }
    if se > 0 {
        out.union_lo = 0;
        out.union_hi = max(out.union_hi, se);
        out.hole_lo = max(out.hole_lo, se);
    }
    out.common_lo = max(out.common_lo, range.x);
    out.common_hi = min(out.common_hi, range.y);
    return out;
}

// The key tiles (x .. y) inside the hole of h, which no row sees (0, 0 when none).
fn range_hull_hole_tiles(h: RangeHull) -> vec2<u32> {
    if !HAS_SINK_KEYS || h.hole_hi <= h.hole_lo {
        return vec2<u32>(0u, 0u);
    }
    let first = (u32(h.hole_lo) + TILE - 1u) / TILE;
    let end = u32(h.hole_hi) / TILE;
    return vec2<u32>(first, max(end, first));
}

// The key tiles (x .. y) of `first .. first + count` the rows see any key of, and the keys
// (z .. w) every row may see (0, 0 when none).
fn range_hull_bounds(h: RangeHull, first: u32, count: u32) -> vec4<u32> {
    var bounds = vec4<u32>(0u, 0u, 0u, 0u);
    if h.union_hi > h.union_lo {
        bounds.x = max(u32(h.union_lo) / TILE, first);
        bounds.y = min((u32(h.union_hi) + TILE - 1u) / TILE, first + count);
    }
    if h.common_hi > h.common_lo {
        bounds.z = u32(h.common_lo);
        bounds.w = u32(h.common_hi);
    }
    return bounds;
}
