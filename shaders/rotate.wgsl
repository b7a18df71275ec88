// Rotary position embedding (src/rotary.rs): pair k of a row's first 2 * pairs elements is
// turned by the angle position * f_k; elements past them are copied. One workgroup: one token
// (b, i), every head of it (they share the token's angles); one invocation: every WG-th pair,
// its angle computed once for all heads, then every WG-th element past the pairs.
//
// The angle's cos and sin come from the host's f64 table by angle addition, never from cos()
// and sin() here: table[(l * ROTARY_ENTRIES + m) * pairs + k] is (cos, sin) of
// m * 64^l * f_k, and a position's four base-64 digits pick the four factors.

// Bindings (declared by the host from Kernel::slots): params (RotateParams); x (tensor, read
// through load_x); y (tensor, store_y; never the buffer of x); table, the angle table;
// positions: with per_row, one position per row [batch, seq] (with axes, three: M-RoPE's
// temporal, height and width, each pair taking one by axis_of); else one start per batch entry
// (i32 bits: a cache's new queries may start before position 0, rows that see no key, turned
// as position 0; padding rows past the last position are turned as the last), and with
// has_counts the rows to write per batch entry from counts_offset.

const WG: u32 = 64u;

fn complex_mul(a: vec2<f32>, b: vec2<f32>) -> vec2<f32> {
    return vec2<f32>(a.x * b.x - a.y * b.y, a.x * b.y + a.y * b.x);
}

// (cos, sin) of pair k's angle at position p.
fn turn(p: u32, k: u32) -> vec2<f32> {
    var r = table[(p & (ROTARY_ENTRIES - 1u)) * params.pairs + k];
    for (var l = 1u; l < ROTARY_LEVELS; l++) {
        let m = (p >> (l * ROTARY_LEVEL_BITS)) & (ROTARY_ENTRIES - 1u);
        r = complex_mul(r, table[(l * ROTARY_ENTRIES + m) * params.pairs + k]);
    }
    return r;
}

// The position axis pair k turns by (Rotary::axis_of: change one, change the other): 0
// without M-RoPE; with it, by sections of consecutive pairs (mrope 1) or cycling T H W over
// the first pairs (mrope 2).
fn axis_of(k: u32) -> u32 {
    let p = params;
    if p.mrope == 1u {
        return select(select(2u, 1u, k < p.section_t + p.section_h), 0u, k < p.section_t);
    }
    if p.mrope == 2u {
        if k % 3u == 1u && k < 3u * p.section_h {
            return 1u;
        }
        if k % 3u == 2u && k < 3u * p.section_w {
            return 2u;
        }
    }
    return 0u;
}

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) num_wg: vec3<u32>,
    inv: RowInvocation,
) {
    let p = params;
    let token = workgroup_index(wg, num_wg);
    if token >= p.tokens {
        return;
    }
    let i = token % p.seq;
    let b = token / p.seq;
    if p.has_counts != 0u && i >= positions[p.counts_offset + b] {
        return;
    }
    var pos = 0u;
    // The row's positions on M-RoPE's three axes (the same one thrice without).
    var axes = vec3<u32>(0u, 0u, 0u);
    var y_i = i;
    if p.axes != 0u {
        let at = 3u * (b * p.seq + i);
        axes = vec3<u32>(positions[at], positions[at + 1u], positions[at + 2u]);
    } else if p.per_row != 0u {
        pos = positions[b * p.seq + i];
    } else {
        let position = bitcast<i32>(positions[b]) + i32(i);
        pos = u32(clamp(position, 0, i32(ROTARY_MAX_POSITION)));
        if p.rows_at_position != 0u {
            y_i = pos;
        }
    }
    if p.axes == 0u {
        axes = vec3<u32>(pos, pos, pos);
    }
    let x_token = b * p.x_stride_b + i * p.x_stride_s;
    let y_token = b * p.y_stride_b + y_i * p.y_stride_s;
    for (var k = inv.lid; k < p.pairs; k += WG) {
        let t = turn(axes[axis_of(k)], k) * p.magnitude;
        let s = select(t.y, -t.y, p.transposed != 0u);
        // The pair's elements: (2k, 2k + 1) interleaved, else (k, k + pairs).
        var d0 = k;
        var d1 = k + p.pairs;
        if p.interleaved != 0u {
            d0 = 2u * k;
            d1 = d0 + 1u;
        }
        for (var h = 0u; h < p.heads; h++) {
            let x_row = x_token + h * p.x_stride_h;
            let y_row = y_token + h * p.y_stride_h;
            let x0 = load_x(x_row + d0);
            let x1 = load_x(x_row + d1);
            // (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos)
            store_y(y_row + d0, x0 * t.x - x1 * s);
            store_y(y_row + d1, x0 * s + x1 * t.x);
        }
    }
    for (var d = 2u * p.pairs + inv.lid; d < p.dim; d += WG) {
        for (var h = 0u; h < p.heads; h++) {
            store_y(y_token + h * p.y_stride_h + d, load_x(x_token + h * p.x_stride_h + d));
        }
    }
}
