// Phase 0 of the backward (attention_backward.wgsl's header), one invocation per query row r
// of the call ([batch, heads, q_len], params.rows of them): D_r = dO_r·O_r, and the row's
// shift, into `stats` (lib/backward.wgsl's layout), whose log-sum-exps the host copied in.
// Rows past their sequence's q_lens get D = 0 and no shift: their O is 0 but their dO may
// hold anything (NaN included), and the sinks' gradient sums D over every row.
//
// Bindings (declared by the host from Kernel::slots): params (BackwardParams); o and d_o
// (tensors, read); stats (u32, f32 bits); lens, mparams: the masking options with the bias
// and the mask packed into lens (lib/masking.wgsl, lib/options_packed.wgsl).

const WG: u32 = 64u;

fn delta_and_shift(r: u32) {
    let rows = params.rows;
    let i = r % params.q_len;
    let bh = r / params.q_len;
    let b = bh / params.heads;
    let h = bh % params.heads;
    // q_slot: a packed batch's row among the packed ones (lib/masking.wgsl).
    let base = b * params.o_stride_b + h * params.o_stride_h + q_slot(b, i) * params.o_stride_s;
    var acc = 0.0;
    if i >= seq_q_len(b) {
        stats[r] = bitcast<u32>(acc);
        stats[rows + r] = bitcast<u32>(0.0);
        return;
    }
    for (var d = 0u; d < params.v_head_dim; d++) {
        acc += load_o(base + d) * load_d_o(base + d);
    }
    stats[r] = bitcast<u32>(acc);
    // Every score of a row is at least the floor, and the floor's neighbours in f32 are
    // 1e31 away: an lse of exactly the floor means every key the row sees scored the floor.
    var shift = 0.0;
    if stats[2u * rows + r] == bitcast<u32>(SCORE_FLOOR) {
        let range = key_range(b, i);
        let se = sink_end(b, i);
        // Without a mask, the keys of range ∪ sink keys in closed form (no loop: a loop over
        // every key would pass llvmpipe's loop cap on long rows); with one, counted.
        var n = 0u;
        if masks_keys() {
            for (var j = 0u; j < params.kv_len; j++) {
                if in_keys(j, range.x, range.y, se) && mask_allows(b, h, i, j) {
                    n += 1u;
                }
            }
        } else {
            var keys = max(range.y - range.x, 0);
            if HAS_SINK_KEYS && se > 0 {
                keys += se - max(min(range.y, se) - max(range.x, 0), 0);
            }
            n = u32(keys);
        }
        shift = log(f32(max(n, 1u)));
    }
    stats[rows + r] = bitcast<u32>(shift);
}

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) num_wg: vec3<u32>,
    inv: RowInvocation,
) {
    let r = workgroup_index(wg, num_wg) * WG + inv.lid;
    if r < params.rows {
        delta_and_shift(r);
    }
}
