// Rotary position embedding (src/rotary.rs): pair k of a row's first 2 * pairs elements is
// turned by the angle position * f_k; elements past them are copied. One workgroup: one row
// (b, h, i) of x; one invocation: every WG-th element of it.
//
// The angle's cos and sin come from the host's f64 table by angle addition, never from cos()
// and sin() here: table[(l * ROTARY_ENTRIES + m) * pairs + k] is (cos, sin) of
// m * 64^l * f_k, and a position's four base-64 digits pick the four factors.

// Bindings (declared by the host from Kernel::slots): params (RotateParams); x (tensor, read
// through load_x); y (tensor, store_y; never the buffer of x); table, the angle table;
// positions: with per_row, one position per row [batch, seq]; else one start per batch entry
// (i32 bits: a cache's new queries may start before position 0, rows that see no key, turned
// as position 0), and with has_counts the rows to write per batch entry from counts_offset.

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

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) num_wg: vec3<u32>,
    inv: RowInvocation,
) {
    let p = params;
    let row = workgroup_index(wg, num_wg);
    if row >= p.rows {
        return;
    }
    let i = row % p.seq;
    let bh = row / p.seq;
    let h = bh % p.heads;
    let b = bh / p.heads;
    if p.has_counts != 0u && i >= positions[p.counts_offset + b] {
        return;
    }
    var pos = 0u;
    var y_i = i;
    if p.per_row != 0u {
        pos = positions[b * p.seq + i];
    } else {
        let position = bitcast<i32>(positions[b]) + i32(i);
        pos = u32(max(position, 0));
        if p.rows_at_position != 0u {
            y_i = pos;
        }
    }
    let x_row = b * p.x_stride_b + h * p.x_stride_h + i * p.x_stride_s;
    let y_row = b * p.y_stride_b + h * p.y_stride_h + y_i * p.y_stride_s;
    for (var d = inv.lid; d < p.dim; d += WG) {
        let me = load_x(x_row + d);
        var out = me;
        if d < 2u * p.pairs {
            var k = d >> 1u;
            var partner = d ^ 1u;
            var first = (d & 1u) == 0u;
            if p.interleaved == 0u {
                first = d < p.pairs;
                k = select(d - p.pairs, d, first);
                partner = select(d - p.pairs, d + p.pairs, first);
            }
            let t = turn(pos, k);
            let s = select(t.y, -t.y, p.inverse != 0u);
            let other = load_x(x_row + partner);
            // (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos)
            out = select(other * s + me * t.x, me * t.x - other * s, first);
        }
        store_y(y_row + d, out);
    }
}
