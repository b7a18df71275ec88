// Masked, numerically stable softmax of one chunk of score rows, in place, plus each row's
// log-sum-exp. Applies softcap, bias, boolean mask, causal alignment, window, kv_lens and
// q_lens through the shared masking rules (lib/masking.wgsl), the ones the call has compiled in.
// One workgroup: one query row of one (batch, head). One invocation: every WG-th key of it.
// A row with no allowed key becomes zeros, with log-sum-exp -inf.

override WG: u32 = 256u;

// Bindings (declared by the host from Kernel::slots): params (SoftmaxParams); scores of the
// chunk, [bh_count, rows, kv_len], overwritten by the weights; bias, mask, lens and mparams
// (lib/masking.wgsl); lse, the log-sum-exp as f32 bits, [batch, heads, q_len].

var<workgroup> red_max: array<f32, WG>;
var<workgroup> red_sum: array<f32, WG>;
var<workgroup> any_allowed: atomic<u32>;

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) num_wg: vec3<u32>,
    inv: RowInvocation,
) {
    let lid = inv.lid;
    let row_id = workgroup_index(wg, num_wg);
    if row_id >= params.bh_count * params.rows {
        return;
    }
    let bh = params.bh_start + row_id / params.rows;
    let i = params.row_start + row_id % params.rows;
    let b = bh / params.heads;
    let h = bh % params.heads;
    let base = row_id * mparams.kv_len;
    let range = key_range(b, i);
    // The sink keys 0..se beside the window (HAS_SINK_KEYS): the loops then start at 0 and
    // check each key.
    let se = sink_end(b, i);
    let start = select(u32(range.x), 0u, se > 0);
    let end = u32(max(range.y, se));

    if lid == 0u {
        atomicStore(&any_allowed, 0u);
    }
    // Workgroup memory is not zeroed: nobody may set the flag before it is cleared.
    workgroupBarrier();
    var local_max = NEG_BIG;
    var local_any = false;
    for (var j = start + lid; j < end; j += WG) {
        if in_keys(j, range.x, range.y, se) && mask_allows(b, h, i, j) {
            local_max = max(local_max, adjust_score(scores[base + j], b, h, i, j));
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
    var row_max = red_max[0];
    if HAS_SINKS {
        // The sink joins the maximum and the sum, and attends to nothing.
        row_max = max(row_max, bitcast<f32>(sink_bits(h)));
    }

    var local_sum = 0.0;
    for (var j = start + lid; j < end; j += WG) {
        if in_keys(j, range.x, range.y, se) && mask_allows(b, h, i, j) {
            local_sum += exp(adjust_score(scores[base + j], b, h, i, j) - row_max);
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
    var row_sum = red_sum[0];
    if HAS_SINKS {
        row_sum += exp(bitcast<f32>(sink_bits(h)) - row_max);
    }
    let any = atomicLoad(&any_allowed) != 0u || HAS_SINKS;
    let inv_sum = select(0.0, 1.0 / row_sum, any);

    // The loops above read scores from `start + lid` on, the one below writes them from `lid`
    // on: another invocation's reads of the same scores must be ordered before these writes,
    // which only a barrier on storage memory does.
    storageBarrier();
    // Dropout (lib/masking.wgsl): the weights written, and so P·V, are the kept ones, scaled;
    // the log-sum-exp is the softmax's.
    let drow = dropout_row(bh, i);
    for (var j = lid; j < mparams.kv_len; j += WG) {
        var p = 0.0;
        if j >= start && j < end && in_keys(j, range.x, range.y, se) && mask_allows(b, h, i, j) {
            p = exp(adjust_score(scores[base + j], b, h, i, j) - row_max) * inv_sum;
            p *= dropout_factor(drow, j);
        }
        scores[base + j] = p;
    }
    if lid == 0u && params.write_lse != 0u {
        lse[bh * mparams.q_len + i] = lse_of(row_max, select(0.0, row_sum, any));
    }
}
