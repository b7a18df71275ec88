// The masking rules every attention kernel shares (DESIGN.md, steps 2 to 4), mirroring
// `Spec::key_range` on the CPU: change one, change the other. A kernel that includes it lists
// in its slots `mparams: MaskParams` (uniform), `bias: array<f32>`, `mask: array<u32>` (one
// byte per element, four to a word) and `lens: array<u32>` (kv_lens[0..batch], then
// q_lens[batch..2 * batch]).
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

// Whether scores need work key by key beyond scaling (a boolean mask, a bias, a softcap).
fn per_key_options() -> bool {
    return HAS_MASK || HAS_BIAS || HAS_SOFTCAP;
}

// Keys lo..hi (half open) that kv_lens, causal alignment, the window and q_lens leave to
// query row i of batch entry b; the boolean mask is checked per key on top.
fn key_range(b: u32, i: u32) -> vec2<i32> {
    let row = i32(i);
    // Bottom-right alignment follows each sequence's own lengths.
    var kv_len = i32(mparams.kv_len);
    var q_len = i32(mparams.q_len);
    // Clamped: lengths on the device are not checked on the host.
    if mparams.has_kv_lens != 0u {
        kv_len = i32(min(lens[b], mparams.kv_len));
    }
    if mparams.has_q_lens != 0u {
        q_len = i32(min(lens[mparams.batch + b], mparams.q_len));
    }
    let shift = kv_len - q_len;
    var lo = 0;
    var hi = kv_len;
    if mparams.causal == CAUSAL_TOP_LEFT {
        hi = min(hi, row + 1);
    } else if mparams.causal == CAUSAL_BOTTOM_RIGHT {
        hi = min(hi, row + shift + 1);
    }
    if mparams.has_window != 0u {
        // win_off is 0 for top-left alignment, or 1 for bottom-right: then the shift applies.
        let off = mparams.win_off * shift;
        lo = max(lo, row + off - mparams.win_left);
        hi = min(hi, row + off + mparams.win_right + 1);
    }
    if row >= q_len {
        hi = 0;
    }
    return vec2<i32>(lo, max(hi, lo));
}

// The score of (b, h, i, j) after softcap and bias, from the scaled dot product s.
fn adjust_score(s: f32, b: u32, h: u32, i: u32, j: u32) -> f32 {
    var x = s;
    if HAS_SOFTCAP {
        // Clamped: tanh(10) is 1 in f32, and some drivers overflow inside tanh for large inputs.
        x = mparams.softcap * tanh(clamp(x / mparams.softcap, -10.0, 10.0));
    }
    if HAS_BIAS {
        let p = mparams;
        x += bias[b * p.bias_stride_b + h * p.bias_stride_h + i * p.bias_stride_i + j * p.bias_stride_j];
    }
    return max(x, SCORE_FLOOR);
}

fn mask_allows(b: u32, h: u32, i: u32, j: u32) -> bool {
    if !HAS_MASK {
        return true;
    }
    let p = mparams;
    let e = b * p.mask_stride_b + h * p.mask_stride_h + i * p.mask_stride_i + j * p.mask_stride_j;
    return ((mask[e >> 2u] >> ((e & 3u) * 8u)) & 0xffu) != 0u;
}

// The key ranges of a workgroup's rows, gathered with range_hull_add: their union bounds the
// key tiles to visit, their intersection the keys no range restriction touches.
struct RangeHull {
    union_lo: i32,
    union_hi: i32,
    common_lo: i32,
    common_hi: i32,
}

fn range_hull_new(kv_len: u32) -> RangeHull {
    return RangeHull(i32(kv_len), 0, 0, i32(kv_len));
}

fn range_hull_add(h: RangeHull, range: vec2<i32>) -> RangeHull {
    var out = h;
    if range.y > range.x {
        out.union_lo = min(out.union_lo, range.x);
        out.union_hi = max(out.union_hi, range.y);
    }
    out.common_lo = max(out.common_lo, range.x);
    out.common_hi = min(out.common_hi, range.y);
    return out;
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
