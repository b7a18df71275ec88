// Merges partial attention results over disjoint key sets by their log-sum-exp:
// O = sum_s exp(lse_s - M) O_s / sum_s exp(lse_s - M), lse = M + log(sum_s exp(lse_s - M)),
// M = max_s lse_s. Splits with lse -inf (no allowed key) weigh nothing; a row where every
// split has none becomes zeros with lse -inf.
// One workgroup: one query row of one (batch, head). One invocation: every 64th column of it.
// Serves flash-decoding (the splits of the fused kernel) and the public merge.

struct Params {
    splits: u32,
    rows: u32,
    heads: u32,
    q_len: u32,
    v_head_dim: u32,
    write_lse: u32,
    lse_offset: u32,
    _pad0: u32,
    // Element strides of the partial outputs over (split, batch, head, row) and of the
    // partial log-sum-exps (which start at lse_offset); the column stride is 1.
    part_stride: vec4<u32>,
    part_lse_stride: vec4<u32>,
    o_stride_b: u32,
    o_stride_h: u32,
    o_stride_s: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
// @binding(1): the partial outputs P, read through load_p of the prelude.
// The partial log-sum-exps as f32 bits, from lse_offset (may be the same buffer as P).
@group(0) @binding(2) var<storage, read> part_lses: array<u32>;
// @binding(3): O, declared by the prelude.
// The merged log-sum-exp as f32 bits, [batch, heads, q_len].
@group(0) @binding(4) var<storage, read_write> lse: array<u32>;

const WG: u32 = 64u;
const NEG_INF_BITS: u32 = 0xff800000u;

// The bits of the log-sum-exp of split s for row (b, h, i).
fn part_lse(s: u32, b: u32, h: u32, i: u32) -> u32 {
    let st = params.part_lse_stride;
    return part_lses[params.lse_offset + s * st.x + b * st.y + h * st.z + i * st.w];
}

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) num_wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let row = wg.x + num_wg.x * (wg.y + num_wg.y * wg.z);
    if row >= params.rows {
        return;
    }
    let i = row % params.q_len;
    let bh = row / params.q_len;
    let b = bh / params.heads;
    let h = bh % params.heads;

    // The largest finite log-sum-exp; -inf bits mark splits with no key.
    var any = false;
    var top = 0.0;
    for (var s = 0u; s < params.splits; s++) {
        let bits = part_lse(s, b, h, i);
        if bits != NEG_INF_BITS {
            let x = bitcast<f32>(bits);
            top = select(x, max(top, x), any);
            any = true;
        }
    }
    var total = 0.0;
    for (var s = 0u; s < params.splits; s++) {
        let bits = part_lse(s, b, h, i);
        if bits != NEG_INF_BITS {
            total += exp(bitcast<f32>(bits) - top);
        }
    }
    let inv = select(0.0, 1.0 / total, any);
    let st = params.part_stride;
    let o_row = b * params.o_stride_b + h * params.o_stride_h + i * params.o_stride_s;
    for (var n = lid; n < params.v_head_dim; n += WG) {
        var acc = 0.0;
        for (var s = 0u; s < params.splits; s++) {
            let bits = part_lse(s, b, h, i);
            if bits != NEG_INF_BITS {
                let w = exp(bitcast<f32>(bits) - top);
                acc += w * load_p(s * st.x + b * st.y + h * st.z + i * st.w + n);
            }
        }
        store_o(o_row + n, acc * inv);
    }
    if lid == 0u && params.write_lse != 0u {
        var bits = NEG_INF_BITS;
        if any {
            bits = bitcast<u32>(top + log(total));
        }
        lse[bh * params.q_len + i] = bits;
    }
}
