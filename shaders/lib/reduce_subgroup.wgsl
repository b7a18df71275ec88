// The row maxima of a key tile of flash_decode.wgsl, with subgroup operations (devices with
// `Features::SUBGROUP`): a subgroupMax per row, one partial per subgroup through workgroup
// memory, one barrier. The other variant, lib/reduce_workgroup.wgsl, defines the same
// ReduceInvocation and rows_max.

// At most WG / 4 subgroups: wgpu guarantees subgroups of at least 4 invocations.
const MAX_SUBGROUPS: u32 = WG / 4u;

// The builtins rows_max needs, part of the entry point's arguments.
struct ReduceInvocation {
    @builtin(local_invocation_index) lid: u32,
    @builtin(subgroup_id) sg: u32,
    @builtin(subgroup_invocation_id) lane: u32,
    @builtin(num_subgroups) sgs: u32,
}

// [parity][row][subgroup], double-buffered by tile parity like p_sh.
var<workgroup> red: array<f32, 2u * ROWS * MAX_SUBGROUPS>;

// The maximum of v[r] over the workgroup, for every row r. Called in uniform control flow;
// par alternates between consecutive calls.
fn rows_max(v: array<f32, ROWS>, par: u32, inv: ReduceInvocation) -> array<f32, ROWS> {
    for (var r = 0u; r < ROWS; r++) {
        let m = subgroupMax(v[r]);
        if inv.lane == 0u {
            red[(par * ROWS + r) * MAX_SUBGROUPS + inv.sg] = m;
        }
    }
    workgroupBarrier();
    var out = array<f32, ROWS>();
    let groups = min(inv.sgs, MAX_SUBGROUPS);
    for (var r = 0u; r < ROWS; r++) {
        var m = NEG_BIG;
        for (var g = 0u; g < groups; g++) {
            m = max(m, red[(par * ROWS + r) * MAX_SUBGROUPS + g]);
        }
        out[r] = m;
    }
    return out;
}
