// Row reductions of flash_attention.wgsl with subgroup shuffles (devices with
// `Features::SUBGROUP`): no workgroup memory and no barrier. Same interface as
// lib/tile_rows_workgroup.wgsl.
//
// The NX invocations that share a block's rows must be NX consecutive lanes of one subgroup.
// Vulkan does not promise how local_invocation_index maps to lanes, so invocations take their
// place from the subgroup builtins instead: place subgroup_id * subgroup_size +
// subgroup_invocation_id, tx its low bits. That is a permutation of the workgroup's
// invocations when every subgroup is full (num_subgroups * subgroup_size is the workgroup),
// and the xor butterfly over the low bits stays inside the row when subgroup_size >= NX (both
// powers of two). Where either fails (a device's choice of subgroup size, or partial
// subgroups), the workgroup decides so once, uniformly, and reduces through workgroup memory
// (lib/tile_rows.wgsl) with local_invocation_index places, as the other variant does.

struct TileRowsInvocation {
    @builtin(local_invocation_index) li: u32,
    @builtin(subgroup_invocation_id) lane: u32,
    @builtin(subgroup_size) sg_size: u32,
    @builtin(subgroup_id) sg: u32,
    @builtin(num_subgroups) sgs: u32,
}

// Whether the subgroups fit the rows (written by invocation 0, read uniformly by all).
var<workgroup> rows_fit: u32;
// The same, for rows_max and rows_sum.
var<private> by_shuffle: bool;
// This invocation's subgroup (lib/mma_cooperative.wgsl shares tiles out by it).
var<private> place_sg: u32;

// This invocation's place: (tx, ty) of its block, and its index for staging. Called once, in
// uniform control flow (one barrier).
fn tile_place(inv: TileRowsInvocation) -> vec3<u32> {
    if inv.li == 0u {
        rows_fit = u32(inv.sgs * inv.sg_size == tile_invocations() && inv.sg_size >= NX);
    }
    by_shuffle = workgroupUniformLoad(&rows_fit) != 0u;
    place_sg = inv.sg;
    let place = select(inv.li, inv.sg * inv.sg_size + inv.lane, by_shuffle);
    return vec3<u32>(place % NX, place / NX, place);
}

// log2(NX), the butterfly's steps: NX = TILE / BC is 8 or 16.
const NX_STEPS: u32 = 2u + 8u / BC;

// v[r] reduced by max or + over the lanes that share block row r, four rows per shuffle: a
// butterfly over lane bits 1, 2, .., NX / 2, in one flat loop over (row group, step) so that
// every index into the register arrays is a constant once unrolled.
fn rows_shuffle(v: array<f32, BR>, take_max: bool) -> array<f32, BR> {
    var m = array<vec4<f32>, BR4>();
    for (var g = 0u; g < BR4; g++) {
        m[g] = vec4<f32>(v[4u * g], v[4u * g + 1u], v[4u * g + 2u], v[4u * g + 3u]);
    }
    for (var x = 0u; x < BR4 * NX_STEPS; x++) {
        let g = x / NX_STEPS;
        let other = subgroupShuffleXor(m[g], 1u << (x % NX_STEPS));
        m[g] = select(m[g] + other, max(m[g], other), take_max);
    }
    var out = array<f32, BR>();
    for (var r = 0u; r < BR; r++) {
        out[r] = m[r / 4u][r % 4u];
    }
    return out;
}

// v[r] reduced over the NX invocations of block row r (tile row block_row(ty, r)), by max or
// by +. Every invocation calls them in uniform control flow.
fn rows_max(v: array<f32, BR>, ty: u32, tx: u32) -> array<f32, BR> {
    if by_shuffle {
        return rows_shuffle(v, true);
    }
    return rows_reduce_shared(v, ty, tx, true);
}

fn rows_sum(v: array<f32, BR>, ty: u32, tx: u32) -> array<f32, BR> {
    if by_shuffle {
        return rows_shuffle(v, false);
    }
    return rows_reduce_shared(v, ty, tx, false);
}
