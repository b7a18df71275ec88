// The backward of attention (FlashAttention-2's algorithm, deterministic: no float atomics),
// in five phases, each a pipeline constant PHASE of this kernel but the first:
//
// 0. (attention_backward_delta.wgsl) one invocation per query row: D = dO·O, and the row's
//    shift (below), into `stats` (lib/backward.wgsl's layout);
// 1. one invocation per query row: dQ = scale · sum_j dS_j K_j over the keys first ..
//    first + count, into `g_a` (f32, Q's layout);
// 2. one invocation per key row: dV = sum_i P_ij dO_i and dK = scale · sum_i dS_ij Q_i over
//    the (head of the key's GQA group, query row) pairs first .. first + count, head major,
//    into `g_a` (dK, f32, K's layout) and `g_b` (dV, f32, V's layout);
// 3. (on request) one invocation per element of the bias, in the bias's own shape: dS summed
//    over the dimensions the bias is broadcast along (their flattened indices first .. first +
//    count), into `g_a`;
// 4. (on request) one invocation per head: the sink logit's gradient -sum_i P_sink,i D_i over
//    the rows (batch entry, query row) first .. first + count, into `g_a`.
//
// P_ij = exp(s_ij - lse_i - shift_i) is recomputed from the forward's log-sum-exp (natural
// log, which counts a learnable sink). shift_i is 0 but for a row whose every score is the
// score floor (a bias of f32::MIN over the whole row): its f32 lse rounds to the floor itself,
// losing the ln(n) of its n keys, so phase 0 counts them and shift_i = ln(n). dS_ij = P_ij (dO_i·V_j - D_i) times the score's derivative by the
// dot product (1 - tanh² under a softcap, 0 where the score floor clipped it). With dropout
// (Z_ij = 0 for a dropped weight, 1 / (1 - p) for a kept one: O = (P∘Z) V), dV sums
// P_ij Z_ij dO_i and dP_ij = Z_ij dO_i·V_j; D_i = dO_i·O_i = sum_j P_ij dP_ij still. Nothing of size
// q_len x kv_len is stored. A dispatch with `resume` adds to what the previous one wrote: on
// a device that caps loop iterations (llvmpipe) the host splits a phase's keys or rows over
// dispatches, each well under the cap.
//
// Phases 1 and 2 run in attention_backward_tiled.wgsl instead where head_dim and v_head_dim
// are at most 256.
//
// Bindings (declared by the host from Kernel::slots): params (BackwardParams); q, k, v and
// d_o (tensors, read); stats (u32: D, the shifts and the forward's log-sum-exp, as f32 bits;
// lib/backward.wgsl); g_a, g_b (f32); lens, mparams: the masking options, the bias and the
// mask packed into lens (lib/masking.wgsl, lib/options_packed.wgsl). Eight storage buffers:
// WebGPU's default limit per stage.

override PHASE: u32 = 1u;
const WG: u32 = 64u;

// Elements 4c .. 4c + 3 of the row at `base` of Q, K, V, O or dO; zeros past its width.
fn q4(base: u32, c: u32) -> vec4<f32> {
    let d = 4u * c;
    let w = params.head_dim;
    return vec4<f32>(
        select(0.0, load_q(base + d), d < w),
        select(0.0, load_q(base + min(d + 1u, w - 1u)), d + 1u < w),
        select(0.0, load_q(base + min(d + 2u, w - 1u)), d + 2u < w),
        select(0.0, load_q(base + min(d + 3u, w - 1u)), d + 3u < w),
    );
}

fn k4(base: u32, c: u32) -> vec4<f32> {
    let d = 4u * c;
    let w = params.head_dim;
    return vec4<f32>(
        select(0.0, load_k(base + d), d < w),
        select(0.0, load_k(base + min(d + 1u, w - 1u)), d + 1u < w),
        select(0.0, load_k(base + min(d + 2u, w - 1u)), d + 2u < w),
        select(0.0, load_k(base + min(d + 3u, w - 1u)), d + 3u < w),
    );
}

fn v4(base: u32, c: u32) -> vec4<f32> {
    let d = 4u * c;
    let w = params.v_head_dim;
    return vec4<f32>(
        select(0.0, load_v(base + d), d < w),
        select(0.0, load_v(base + min(d + 1u, w - 1u)), d + 1u < w),
        select(0.0, load_v(base + min(d + 2u, w - 1u)), d + 2u < w),
        select(0.0, load_v(base + min(d + 3u, w - 1u)), d + 3u < w),
    );
}

fn do4(base: u32, c: u32) -> vec4<f32> {
    let d = 4u * c;
    let w = params.v_head_dim;
    return vec4<f32>(
        select(0.0, load_d_o(base + d), d < w),
        select(0.0, load_d_o(base + min(d + 1u, w - 1u)), d + 1u < w),
        select(0.0, load_d_o(base + min(d + 2u, w - 1u)), d + 2u < w),
        select(0.0, load_d_o(base + min(d + 3u, w - 1u)), d + 3u < w),
    );
}

// Stores the f32 gradient chunk x (elements 4c .. 4c + 3 of a row of `width` at `base`) into
// `g_a` or `g_b`, added to what is there when the dispatch resumes.
fn store_grad_a(base: u32, c: u32, x: vec4<f32>, width: u32) {
    for (var e = 0u; e < 4u; e++) {
        if 4u * c + e < width {
            add_grad_a(base + 4u * c + e, x[e]);
        }
    }
}

fn store_grad_b(base: u32, c: u32, x: vec4<f32>, width: u32) {
    for (var e = 0u; e < 4u; e++) {
        if 4u * c + e < width {
            add_grad_b(base + 4u * c + e, x[e]);
        }
    }
}

// Phase 1: dQ of query row r over this dispatch's keys.
fn row_dq(r: u32) {
    let i = r % params.q_len;
    let bh = r / params.q_len;
    let h = bh % params.heads;
    let b = bh / params.heads;
    let kvh = h / params.group;
    if !row_is_real(b, i) {
        return;
    }
    let qa = q_at(b, h, i);
    var acc = array<vec4<f32>, D4>();
    for (var c = 0u; c < D4; c++) {
        acc[c] = vec4<f32>(0.0);
    }
    let bits = lse_bits(r);
    if bits != NEG_INF_BITS {
        let lse_v = bitcast<f32>(bits);
        let shift = row_shift(r);
        let dv = row_delta(r);
        var qr = array<vec4<f32>, D4>();
        for (var c = 0u; c < D4; c++) {
            qr[c] = q4(qa, c);
        }
        var dor = array<vec4<f32>, V4>();
        let oa = o_at(b, h, i);
        for (var c = 0u; c < V4; c++) {
            dor[c] = do4(oa, c);
        }
        let range = key_range(b, i);
        let se = sink_end(b, i);
        let alibi = alibi_row(b, h, i);
        let drow = dropout_row(bh, i);
        // The keys of this dispatch the row may see: its range, and its sink keys.
        var lo = max(params.first, u32(max(range.x, 0)));
        if HAS_SINK_KEYS && se > 0 {
            lo = params.first;
        }
        let hi = min(params.first + params.count, u32(max(max(range.y, se), 0)));
        for (var j = lo; j < hi; j++) {
            if !in_keys(j, range.x, range.y, se) || !mask_allows(b, h, i, j) {
                continue;
            }
            let ka = k_at(b, kvh, j);
            var s = 0.0;
            for (var c = 0u; c < D4; c++) {
                s += dot(qr[c], k4(ka, c));
            }
            let xs = score_and_slope(s * params.scale, b, h, i, j, alibi);
            let p = exp(xs.x - lse_v - shift);
            let va = v_at(b, kvh, j);
            var dp = 0.0;
            for (var c = 0u; c < V4; c++) {
                dp += dot(dor[c], v4(va, c));
            }
            let ds = p * (dp * dropout_factor(drow, j) - dv) * xs.y * params.scale;
            for (var c = 0u; c < D4; c++) {
                acc[c] += ds * k4(ka, c);
            }
        }
    }
    for (var c = 0u; c < D4; c++) {
        store_grad_a(qa, c, acc[c], params.head_dim);
    }
}

// Phase 2: dK and dV of key row r over this dispatch's query rows of every head of its group.
fn row_dkv(r: u32) {
    let j = r % params.kv_len;
    let bk = r / params.kv_len;
    let kvh = bk % params.kv_heads;
    let b = bk / params.kv_heads;
    if !key_is_real(b, j) {
        return;
    }
    let ka = k_at(b, kvh, j);
    let va = v_at(b, kvh, j);
    var kr = array<vec4<f32>, D4>();
    var dk = array<vec4<f32>, D4>();
    for (var c = 0u; c < D4; c++) {
        kr[c] = k4(ka, c);
        dk[c] = vec4<f32>(0.0);
    }
    var vr = array<vec4<f32>, V4>();
    var dv = array<vec4<f32>, V4>();
    for (var c = 0u; c < V4; c++) {
        vr[c] = v4(va, c);
        dv[c] = vec4<f32>(0.0);
    }
    // This dispatch's (head of the group, query row) pairs, head major.
    let end = min(params.first + params.count, params.group * params.q_len);
    for (var t = params.first; t < end; t++) {
        let h = kvh * params.group + t / params.q_len;
        let i = t % params.q_len;
        if !row_is_real(b, i) {
            // Past a packed sequence: the next sequence's row.
            continue;
        }
        {
            let range = key_range(b, i);
            if !in_keys(j, range.x, range.y, sink_end(b, i)) || !mask_allows(b, h, i, j) {
                continue;
            }
            let row = (b * params.heads + h) * params.q_len + i;
            let bits = lse_bits(row);
            if bits == NEG_INF_BITS {
                continue;
            }
            let qa = q_at(b, h, i);
            var s = 0.0;
            for (var c = 0u; c < D4; c++) {
                s += dot(q4(qa, c), kr[c]);
            }
            let xs = score_and_slope(s * params.scale, b, h, i, j, alibi_row(b, h, i));
            let p = exp(xs.x - bitcast<f32>(bits) - row_shift(row));
            let oa = o_at(b, h, i);
            let z = dropout_factor(dropout_row(b * params.heads + h, i), j);
            var dp = 0.0;
            for (var c = 0u; c < V4; c++) {
                let g = do4(oa, c);
                dp += dot(g, vr[c]);
                dv[c] += (p * z) * g;
            }
            let ds = p * (dp * z - row_delta(row)) * xs.y * params.scale;
            for (var c = 0u; c < D4; c++) {
                dk[c] += ds * q4(qa, c);
            }
        }
    }
    for (var c = 0u; c < D4; c++) {
        store_grad_a(ka, c, dk[c], params.head_dim);
    }
    for (var c = 0u; c < V4; c++) {
        store_grad_b(va, c, dv[c], params.v_head_dim);
    }
}

// dS of (b, h, i, j) with respect to its final score (before the softcap's slope): 0 for a
// key the row does not see, or a score the floor clipped.
fn score_grad(b: u32, h: u32, i: u32, j: u32) -> f32 {
    let range = key_range(b, i);
    if !in_keys(j, range.x, range.y, sink_end(b, i)) || !mask_allows(b, h, i, j) {
        return 0.0;
    }
    let row = (b * params.heads + h) * params.q_len + i;
    let bits = lse_bits(row);
    if bits == NEG_INF_BITS {
        return 0.0;
    }
    let qa = q_at(b, h, i);
    let ka = k_at(b, h / params.group, j);
    var s = 0.0;
    for (var d = 0u; d < params.head_dim; d++) {
        s += load_q(qa + d) * load_k(ka + d);
    }
    let x = adjust_score_with(s * params.scale, b, h, i, j, alibi_row(b, h, i));
    if x <= SCORE_FLOOR {
        return 0.0;
    }
    let oa = o_at(b, h, i);
    let va = v_at(b, h / params.group, j);
    var dp = 0.0;
    for (var d = 0u; d < params.v_head_dim; d++) {
        dp += load_d_o(oa + d) * load_v(va + d);
    }
    dp *= dropout_factor(dropout_row(b * params.heads + h, i), j);
    return exp(x - bitcast<f32>(bits) - row_shift(row)) * (dp - row_delta(row));
}

// Phase 3: the bias's gradient at element r of its shape.
fn bias_grad(r: u32) {
    let p = params;
    var e = r;
    let cj = e % p.bias_j;
    e /= p.bias_j;
    let ci = e % p.bias_i;
    e /= p.bias_i;
    let ch = e % p.bias_h;
    let cb = e / p.bias_h;
    // The extents the element is broadcast along (1 where the bias has the full size).
    let eb = select(1u, p.batch, p.bias_b == 1u);
    let eh = select(1u, p.heads, p.bias_h == 1u);
    let ei = select(1u, p.q_len, p.bias_i == 1u);
    let ej = select(1u, p.kv_len, p.bias_j == 1u);
    let end = min(p.first + p.count, eb * eh * ei * ej);
    var acc = 0.0;
    for (var t = p.first; t < end; t++) {
        var u = t;
        let j = cj + u % ej;
        u /= ej;
        let i = ci + u % ei;
        u /= ei;
        let h = ch + u % eh;
        let b = cb + u / eh;
        acc += score_grad(b, h, i, j);
    }
    var prev = 0.0;
    if p.resume != 0u {
        prev = g_a[r];
    }
    g_a[r] = prev + acc;
}

// Phase 4: the sink logit's gradient of head h.
fn sink_grad(h: u32) {
    let p = params;
    let sink = bitcast<f32>(sink_bits(h));
    let end = min(p.first + p.count, p.batch * p.q_len);
    var acc = 0.0;
    for (var t = p.first; t < end; t++) {
        let row = ((t / p.q_len) * p.heads + h) * p.q_len + t % p.q_len;
        let bits = lse_bits(row);
        if bits != NEG_INF_BITS {
            acc -= exp(sink - bitcast<f32>(bits)) * row_delta(row);
        }
    }
    var prev = 0.0;
    if p.resume != 0u {
        prev = g_a[h];
    }
    g_a[h] = prev + acc;
}

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) num_wg: vec3<u32>,
    inv: RowInvocation,
) {
    let r = workgroup_index(wg, num_wg) * WG + inv.lid;
    if r >= params.rows {
        return;
    }
    if PHASE == 1u {
        row_dq(r);
    } else if PHASE == 2u {
        row_dkv(r);
    } else if PHASE == 3u {
        bias_grad(r);
    } else {
        sink_grad(r);
    }
}
