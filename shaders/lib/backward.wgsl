// What the two backward kernels share (attention_backward.wgsl, one row per invocation, and
// attention_backward_tiled.wgsl, tiles in workgroup memory): addresses, the score's
// derivative, the row shifts phase 0 writes, and the stores that add to an earlier dispatch's
// gradients. Bindings as in attention_backward.wgsl; `stats` holds, per query row r of the
// call ([batch, heads, q_len]), D_r at r, the row's shift at rows + r and the forward's
// log-sum-exp at 2 rows + r, all as f32 bits (the host copies the log-sum-exp in, so that it
// needs no binding of its own).

// Elements of row i (query) or j (key) of head h of sequence b: through q_slot and key_slot
// (lib/masking.wgsl), so that a packed batch's rows are found among the packed ones (its
// batch strides are 0). A packed sequence's rows are consecutive, so the tiled kernel steps
// from row 0 by the row stride.
fn q_at(b: u32, h: u32, i: u32) -> u32 {
    return b * params.q_stride_b + h * params.q_stride_h + q_slot(b, i) * params.q_stride_s;
}

fn k_at(b: u32, kvh: u32, j: u32) -> u32 {
    return b * params.k_stride_b + kvh * params.k_stride_h + key_slot(b, j) * params.k_stride_s;
}

fn v_at(b: u32, kvh: u32, j: u32) -> u32 {
    return b * params.v_stride_b + kvh * params.v_stride_h + key_slot(b, j) * params.v_stride_s;
}

fn o_at(b: u32, h: u32, i: u32) -> u32 {
    return b * params.o_stride_b + h * params.o_stride_h + q_slot(b, i) * params.o_stride_s;
}

// Whether key j of sequence b has rows of its own in K and V: always, but past a packed
// sequence's keys (which belong to the next sequence). Gradients are written only for rows of
// their own (row_is_real for query rows).
fn key_is_real(b: u32, j: u32) -> bool {
    return !HAS_VARLEN || j < seq_kv_len(b);
}

// The score of (b, h, i, j) from its scaled dot product s (as the forward computes it), and
// its derivative by s.
fn score_and_slope(s: f32, b: u32, h: u32, i: u32, j: u32, alibi: AlibiRow) -> vec2<f32> {
    let x = adjust_score_with(s, b, h, i, j, alibi);
    var slope = 1.0;
    var capped = s;
    if HAS_SOFTCAP {
        let t = tanh(clamp(s / mparams.softcap, -10.0, 10.0));
        slope = 1.0 - t * t;
        capped = mparams.softcap * t;
    }
    if HAS_SCORE_MOD {
        // 0 where the mod's result was clamped, as where the floor clips the score.
        let y = attn_score_mod(capped, b, h, i, j);
        if y >= SCORE_FLOOR && y <= -SCORE_FLOOR {
            slope *= attn_score_mod_grad(capped, b, h, i, j);
        } else {
            slope = 0.0;
        }
    }
    if x <= SCORE_FLOOR {
        slope = 0.0;
    }
    return vec2<f32>(x, slope);
}

// Element e of `g_a` or `g_b` set to x, added to what is there when the dispatch resumes.
fn add_grad_a(e: u32, x: f32) {
    var prev = 0.0;
    if params.resume != 0u {
        prev = g_a[e];
    }
    g_a[e] = prev + x;
}

fn add_grad_b(e: u32, x: f32) {
    var prev = 0.0;
    if params.resume != 0u {
        prev = g_b[e];
    }
    g_b[e] = prev + x;
}

// Query rows of the call: where the shifts start in `stats`.
fn query_rows() -> u32 {
    return params.batch * params.heads * params.q_len;
}

// Row r's D = dO·O.
fn row_delta(r: u32) -> f32 {
    return bitcast<f32>(stats[r]);
}

// Row r's shift (attention_backward.wgsl's header).
fn row_shift(r: u32) -> f32 {
    return bitcast<f32>(stats[query_rows() + r]);
}

// Row r's log-sum-exp, as bits.
fn lse_bits(r: u32) -> u32 {
    return stats[2u * query_rows() + r];
}
