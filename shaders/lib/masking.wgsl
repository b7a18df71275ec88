// The masking rules every attention kernel shares (DESIGN.md, steps 2 to 4), mirroring
// `Spec::key_range` on the CPU: change one, change the other. A kernel that includes it binds
// `mparams: MaskParams` (uniform), `bias: array<f32>`, `mask: array<u32>` (one byte per
// element, four to a word) and `lens: array<u32>` (kv_lens[0..batch], then
// q_lens[batch..2 * batch]).
//
// Which options a call has is compiled in: these pipeline constants are part of the kernel's
// key, so a call without an option runs none of its code, and a key that no per-key option
// (mask, bias, softcap) touches needs no call to mask_allows / adjust_score at all.

// 0: none; CAUSAL_TOP_LEFT or CAUSAL_BOTTOM_RIGHT.
override CAUSAL: u32 = 0u;
override HAS_BIAS: bool = false;
override HAS_MASK: bool = false;
override HAS_KV_LENS: bool = false;
override HAS_Q_LENS: bool = false;
override HAS_SOFTCAP: bool = false;
override HAS_WINDOW: bool = false;

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
    if HAS_KV_LENS {
        kv_len = i32(lens[b]);
    }
    if HAS_Q_LENS {
        q_len = i32(lens[mparams.batch + b]);
    }
    let shift = kv_len - q_len;
    var lo = 0;
    var hi = kv_len;
    if CAUSAL == CAUSAL_TOP_LEFT {
        hi = min(hi, row + 1);
    } else if CAUSAL == CAUSAL_BOTTOM_RIGHT {
        hi = min(hi, row + shift + 1);
    }
    if HAS_WINDOW {
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
