// Row reductions of flash_attention.wgsl through workgroup memory only (lib/tile_rows.wgsl):
// devices without subgroups, and WebGPU, where wgpu does not map them. The other variant,
// lib/tile_rows_subgroup.wgsl, defines the same TileRowsInvocation, tile_place, rows_max and
// rows_sum.

// The builtins tile_place needs, part of the entry point's arguments.
struct TileRowsInvocation {
    @builtin(local_invocation_index) li: u32,
}

// This invocation's place: (tx, ty) of its block, and its index for staging (a permutation of
// the workgroup's invocations). Called once, in uniform control flow.
fn tile_place(inv: TileRowsInvocation) -> vec3<u32> {
    return vec3<u32>(inv.li % NX, inv.li / NX, inv.li);
}

// v[r] reduced over the NX invocations of block row r (tile row block_row(ty, r)), by max or
// by +. Every invocation calls them in uniform control flow.
fn rows_max(v: array<f32, BR>, ty: u32, tx: u32) -> array<f32, BR> {
    return rows_reduce_shared(v, ty, tx, true);
}

fn rows_sum(v: array<f32, BR>, ty: u32, tx: u32) -> array<f32, BR> {
    return rows_reduce_shared(v, ty, tx, false);
}
