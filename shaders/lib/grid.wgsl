// The linear index of this workgroup in a grid the host spilled from x into y and z when x
// was full (`DispatchSize::linear`). Kernels skip indices past the real grid.
fn workgroup_index(wg: vec3<u32>, num_wg: vec3<u32>) -> u32 {
    return wg.x + num_wg.x * (wg.y + num_wg.y * wg.z);
}

// The builtins of a kernel with one row per workgroup (softmax, combine):
// `fn main(inv: RowInvocation)`.
struct RowInvocation {
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) num_wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
}
