// Masked, numerically stable softmax of one chunk of score rows, in place, plus each row's
// log-sum-exp. Applies softcap, bias, boolean mask, causal alignment, kv_lens and q_lens.
// One workgroup: one query row of one (batch, head). One invocation: every WG-th key of it.
// A row with no allowed key becomes zeros, with log-sum-exp -inf.

override WG: u32 = 256u;

const CAUSAL_TOP_LEFT: u32 = 1u;
const CAUSAL_BOTTOM_RIGHT: u32 = 2u;
const HAS_BIAS: u32 = 1u;
const HAS_MASK: u32 = 2u;
const HAS_KV_LENS: u32 = 4u;
const HAS_Q_LENS: u32 = 8u;
const HAS_LSE: u32 = 16u;
const HAS_SOFTCAP: u32 = 32u;
// WGSL lets implementations assume there are no infinities, so masked scores never become
// -inf in arithmetic; "no allowed key" is tracked explicitly. The -inf of the log-sum-exp is
// written as bits.
const NEG_BIG: f32 = -3.0e38;
const NEG_INF_BITS: u32 = 0xff800000u;

struct Params {
    bh_start: u32,
    bh_count: u32,
    row_start: u32,
    rows: u32,
    batch: u32,
    heads: u32,
    q_len: u32,
    kv_len: u32,
    causal: u32,
    flags: u32,
    softcap: f32,
    _pad0: u32,
    // Element strides of the bias and mask over (b, h, i, j); 0 where broadcast.
    bias_stride: vec4<u32>,
    mask_stride: vec4<u32>,
}

@group(0) @binding(0) var<uniform> params: Params;
// Scores of the chunk, [bh_count, rows, kv_len]; overwritten by the weights.
@group(0) @binding(1) var<storage, read_write> scores: array<f32>;
@group(0) @binding(2) var<storage, read> bias: array<f32>;
// Boolean mask, one byte per element, four to a word.
@group(0) @binding(3) var<storage, read> mask: array<u32>;
// kv_lens[0..batch] then q_lens[batch..2 * batch].
@group(0) @binding(4) var<storage, read> lens: array<u32>;
// Log-sum-exp as f32 bits, [batch, heads, q_len].
@group(0) @binding(5) var<storage, read_write> lse: array<u32>;

var<workgroup> red_max: array<f32, WG>;
var<workgroup> red_sum: array<f32, WG>;
var<workgroup> any_allowed: atomic<u32>;

fn has(flag: u32) -> bool {
    return (params.flags & flag) != 0u;
}

// The score of key j after softcap and bias.
fn score(base: u32, b: u32, h: u32, i: u32, j: u32) -> f32 {
    var s = scores[base + j];
    if has(HAS_SOFTCAP) {
        // Clamped: tanh(10) is 1 in f32, and some drivers overflow inside tanh for large inputs.
        s = params.softcap * tanh(clamp(s / params.softcap, -10.0, 10.0));
    }
    if has(HAS_BIAS) {
        let st = params.bias_stride;
        s += bias[b * st.x + h * st.y + i * st.z + j * st.w];
    }
    return s;
}

fn mask_allows(b: u32, h: u32, i: u32, j: u32) -> bool {
    if !has(HAS_MASK) {
        return true;
    }
    let st = params.mask_stride;
    let e = b * st.x + h * st.y + i * st.z + j * st.w;
    return ((mask[e >> 2u] >> ((e & 3u) * 8u)) & 0xffu) != 0u;
}

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) num_wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let row_id = wg.x + num_wg.x * (wg.y + num_wg.y * wg.z);
    if row_id >= params.bh_count * params.rows {
        return;
    }
    let bh = params.bh_start + row_id / params.rows;
    let i = params.row_start + row_id % params.rows;
    let b = bh / params.heads;
    let h = bh % params.heads;
    let base = row_id * params.kv_len;

    // Keys j < hi survive kv_lens, causal alignment and q_lens; the mask is checked per key.
    var hi = i32(params.kv_len);
    if has(HAS_KV_LENS) {
        hi = min(hi, i32(lens[b]));
    }
    if params.causal == CAUSAL_TOP_LEFT {
        hi = min(hi, i32(i) + 1);
    } else if params.causal == CAUSAL_BOTTOM_RIGHT {
        hi = min(hi, i32(i) + i32(params.kv_len) - i32(params.q_len) + 1);
    }
    if has(HAS_Q_LENS) && i >= lens[params.batch + b] {
        hi = 0;
    }
    let end = u32(max(hi, 0));

    if lid == 0u {
        atomicStore(&any_allowed, 0u);
    }
    var local_max = NEG_BIG;
    var local_any = false;
    for (var j = lid; j < end; j += WG) {
        if mask_allows(b, h, i, j) {
            local_max = max(local_max, score(base, b, h, i, j));
            local_any = true;
        }
    }
    red_max[lid] = local_max;
    if local_any {
        atomicOr(&any_allowed, 1u);
    }
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride >>= 1u) {
        if lid < stride {
            red_max[lid] = max(red_max[lid], red_max[lid + stride]);
        }
        workgroupBarrier();
    }
    let row_max = red_max[0];

    var local_sum = 0.0;
    for (var j = lid; j < end; j += WG) {
        if mask_allows(b, h, i, j) {
            local_sum += exp(score(base, b, h, i, j) - row_max);
        }
    }
    red_sum[lid] = local_sum;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride >>= 1u) {
        if lid < stride {
            red_sum[lid] += red_sum[lid + stride];
        }
        workgroupBarrier();
    }
    let row_sum = red_sum[0];
    let any = atomicLoad(&any_allowed) != 0u;
    let inv_sum = select(0.0, 1.0 / row_sum, any);

    for (var j = lid; j < params.kv_len; j += WG) {
        var p = 0.0;
        if j < end && mask_allows(b, h, i, j) {
            p = exp(score(base, b, h, i, j) - row_max) * inv_sum;
        }
        scores[base + j] = p;
    }
    if lid == 0u && has(HAS_LSE) {
        var bits = NEG_INF_BITS;
        if any {
            bits = bitcast<u32>(row_max + log(row_sum));
        }
        lse[bh * params.q_len + i] = bits;
    }
}
