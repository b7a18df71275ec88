// The linear index of this workgroup in a grid the host spilled from x into y and z when x
// was full (`DispatchSize::linear`). Kernels skip indices past the real grid.
fn workgroup_index(wg: vec3<u32>, num_wg: vec3<u32>) -> u32 {
    return wg.x + num_wg.x * (wg.y + num_wg.y * wg.z);
}

// The per-invocation builtins of a kernel with one row per workgroup (softmax, combine):
// `fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) num_wg: vec3<u32>,
// inv: RowInvocation)`. The workgroup's builtins are parameters of their own, not members of
// this struct: WGSL's uniformity analysis (enforced by browsers, not by naga) counts a struct
// parameter as a whole, so a workgroup index read from a struct that also holds a local index
// would be "possibly non-uniform", and no barrier could depend on it.
struct RowInvocation {
    @builtin(local_invocation_index) lid: u32,
}
