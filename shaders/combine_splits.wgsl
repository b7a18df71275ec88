// Merges partial attention results over disjoint key sets by their log-sum-exp:
// O = sum_s exp(lse_s - M) O_s / sum_s exp(lse_s - M), lse = M + log(sum_s exp(lse_s - M)),
// M = max_s lse_s (lib/lse.wgsl). Splits with lse -inf (no allowed key) weigh nothing; a row
// where every split has none becomes zeros with lse -inf. A call with learnable sinks
// (has_sinks) adds each head's sink logit as one more part, with no output.
// One workgroup: one query row of one (batch, head). One invocation: every 64th column of it.
// Serves flash-decoding (the splits of the fused kernel) and the public merge.

// Bindings (declared by the host from Kernel::slots): params (CombineParams); p, the partial
// outputs (tensor, read through load_p); part_lses, the partial log-sum-exps as f32 bits from
// lse_offset (may be the same buffer as p); o (tensor); lse, the merged log-sum-exp as f32
// bits, [batch, heads, q_len]; lens, the call's masking buffer (lib/masking.wgsl): the sink
// logits as f32 bits from sink_offset, one per head (read only when has_sinks is set), and a
// packed batch's offsets from varlen_offset (has_varlen).

const WG: u32 = 64u;

// The bits of the log-sum-exp of split s for row (b, h, i).
fn part_lse(s: u32, b: u32, h: u32, i: u32) -> u32 {
    let p = params;
    return part_lses[p.lse_offset + s * p.part_lse_stride_s + b * p.part_lse_stride_b
        + h * p.part_lse_stride_h + i * p.part_lse_stride_i];
}

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) num_wg: vec3<u32>,
    inv: RowInvocation,
) {
    let lid = inv.lid;
    let row = workgroup_index(wg, num_wg);
    if row >= params.rows {
        return;
    }
    let i = row % params.q_len;
    let bh = row / params.q_len;
    let b = bh / params.heads;
    let h = bh % params.heads;

    var sum = LseSum(0.0, 0.0);
    for (var s = 0u; s < params.splits; s++) {
        sum = lse_add(sum, part_lse(s, b, h, i));
    }
    if params.has_sinks != 0u {
        sum = lse_add(sum, lens[params.sink_offset + h]);
    }
    let p = params;
    // A packed batch: the row's place among the packed rows, and no row past its sequence.
    var i_o = i;
    var i_p = i;
    var real = true;
    if p.has_varlen != 0u {
        let start = lens[p.varlen_offset + b];
        real = i < lens[p.varlen_offset + b + 1u] - start;
        i_o = start + i;
        if p.parts_packed != 0u {
            i_p = start + i;
        }
    }
    let part_row = b * p.part_stride_b + h * p.part_stride_h + i_p * p.part_stride_i;
    let o_row = b * p.o_stride_b + h * p.o_stride_h + i_o * p.o_stride_s;
    for (var n = lid; n < params.v_head_dim && real; n += WG) {
        var acc = 0.0;
        for (var s = 0u; s < params.splits; s++) {
            let w = lse_weight(sum, part_lse(s, b, h, i));
            if w > 0.0 {
                acc += w * load_p(s * p.part_stride_s + part_row + n);
            }
        }
        store_o(o_row + n, acc);
    }
    if lid == 0u && params.write_lse != 0u {
        lse[bh * params.q_len + i] = lse_total(sum);
    }
}
