// The masking rules every attention kernel shares (DESIGN.md, steps 2 to 4), prepended by the
// host to each kernel that masks. A kernel that includes it declares `mparams: MaskParams`
// (uniform), `bias: array<f32>`, `mask: array<u32>` (one byte per element, four to a word) and
// `lens: array<u32>` (kv_lens[0..batch], then q_lens[batch..2 * batch]).

const CAUSAL_TOP_LEFT: u32 = 1u;
const CAUSAL_BOTTOM_RIGHT: u32 = 2u;
const MASK_BIAS: u32 = 1u;
const MASK_BOOL: u32 = 2u;
const MASK_KV_LENS: u32 = 4u;
const MASK_Q_LENS: u32 = 8u;
const MASK_SOFTCAP: u32 = 16u;
const MASK_WINDOW: u32 = 32u;
// WGSL lets implementations assume there are no infinities, so a masked score never becomes
// -inf in arithmetic; kernels track "allowed" explicitly, and write -inf only as bits.
const NEG_BIG: f32 = -3.0e38;
const NEG_INF_BITS: u32 = 0xff800000u;
// Adjusted scores never go below this (a bias of f32::MIN, PyTorch's finfo.min mask, would
// otherwise sink under NEG_BIG and empty the row); Spec and the CPU paths clamp the same way.
const SCORE_FLOOR: f32 = -1.0e38;

struct MaskParams {
    batch: u32,
    q_len: u32,
    kv_len: u32,
    causal: u32,
    flags: u32,
    softcap: f32,
    // Window bounds relative to the aligned diagonal: keys i + off - win_left ..=
    // i + off + win_right, off = win_off * (kv_len - q_len) of the sequence.
    win_left: i32,
    win_right: i32,
    win_off: i32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
    // Element strides of the bias and mask over (b, h, i, j); 0 where broadcast.
    bias_stride: vec4<u32>,
    mask_stride: vec4<u32>,
}

fn mask_has(flag: u32) -> bool {
    return (mparams.flags & flag) != 0u;
}

// Keys lo..hi (half open) that kv_lens, causal alignment, the window and q_lens leave to
// query row i of batch entry b; the boolean mask is checked per key on top.
fn key_range(b: u32, i: u32) -> vec2<i32> {
    let row = i32(i);
    // Bottom-right alignment follows each sequence's own lengths.
    var kv_len = i32(mparams.kv_len);
    var q_len = i32(mparams.q_len);
    if mask_has(MASK_KV_LENS) {
        kv_len = i32(lens[b]);
    }
    if mask_has(MASK_Q_LENS) {
        q_len = i32(lens[mparams.batch + b]);
    }
    let shift = kv_len - q_len;
    var lo = 0;
    var hi = kv_len;
    if mparams.causal == CAUSAL_TOP_LEFT {
        hi = min(hi, row + 1);
    } else if mparams.causal == CAUSAL_BOTTOM_RIGHT {
        hi = min(hi, row + shift + 1);
    }
    if mask_has(MASK_WINDOW) {
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
    if mask_has(MASK_SOFTCAP) {
        // Clamped: tanh(10) is 1 in f32, and some drivers overflow inside tanh for large inputs.
        x = mparams.softcap * tanh(clamp(x / mparams.softcap, -10.0, 10.0));
    }
    if mask_has(MASK_BIAS) {
        let st = mparams.bias_stride;
        x += bias[b * st.x + h * st.y + i * st.z + j * st.w];
    }
    return max(x, SCORE_FLOOR);
}

fn mask_allows(b: u32, h: u32, i: u32, j: u32) -> bool {
    if !mask_has(MASK_BOOL) {
        return true;
    }
    let st = mparams.mask_stride;
    let e = b * st.x + h * st.y + i * st.z + j * st.w;
    return ((mask[e >> 2u] >> ((e & 3u) * 8u)) & 0xffu) != 0u;
}
