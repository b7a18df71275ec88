// Row reductions of flash_attention.wgsl across the NX invocations that share a block's rows,
// through workgroup memory: every invocation puts its values, one barrier, every invocation
// reads its rows' NX values back. lib/tile_rows_workgroup.wgsl uses it for every reduction
// (devices without subgroups, and WebGPU, where wgpu does not map them);
// lib/tile_rows_subgroup.wgsl only where the device's subgroups do not fit the rows.

// [row][tx / 4][tx % 4], read a vec4 at a time (on llvmpipe every load costs about the same
// whatever its width).
var<workgroup> red: array<vec4<f32>, TILE * NX / 4u>;

// The NX values of tile row `row` folded to four by max (`take_max`) or +. NX is 8 or 16 (no
// loop: see flash_attention.wgsl on loops over private arrays).
fn red_fold(row: u32, take_max: bool) -> vec4<f32> {
    let base = row * (NX / 4u);
    if take_max {
        var m = max(red[base], red[base + 1u]);
        if NX == 16u {
            m = max(m, max(red[base + 2u], red[base + 3u]));
        }
        return m;
    }
    var s = red[base] + red[base + 1u];
    if NX == 16u {
        s += red[base + 2u] + red[base + 3u];
    }
    return s;
}

// v[r] reduced by max or + over the NX invocations of block row r (tile row block_row(ty, r)).
// Every invocation calls it, in uniform control flow (one barrier); a barrier must come
// between two calls, or the second's writes race the first's reads.
fn rows_reduce_shared(v: array<f32, BR>, ty: u32, tx: u32, take_max: bool) -> array<f32, BR> {
    for (var r = 0u; r < BR; r++) {
        red[block_row(ty, r) * (NX / 4u) + tx / 4u][tx % 4u] = v[r];
    }
    workgroupBarrier();
    var out = array<f32, BR>();
    for (var r = 0u; r < BR; r++) {
        let f = red_fold(block_row(ty, r), take_max);
        if take_max {
            out[r] = max(max(f.x, f.y), max(f.z, f.w));
        } else {
            out[r] = (f.x + f.y) + (f.z + f.w);
        }
    }
    return out;
}
